//! `cleanup --kube-proxy`: removes the rules a kube-proxy left on the node,
//! so a cluster can move to this agent without kube-proxy's own `--cleanup`.
//!
//! What goes, in the current network namespace:
//! - kube-proxy's iptables chains (`KUBE-SERVICES`, `KUBE-SVC-*`,
//!   `KUBE-SEP-*`, ...) in the nat, filter and mangle tables, IPv4 and IPv6,
//!   in both iptables back ends (legacy and nft), and every rule elsewhere
//!   that jumps to one of them;
//! - the `kube-proxy` nftables tables (families ip and ip6) of its nftables
//!   mode;
//! - what its IPVS mode leaves besides chains: the `kube-ipvs0` dummy
//!   device that holds the Service addresses, its ipsets (by their exact
//!   names, IPv4 and IPv6, so another program's `KUBE-*` sets stay), and
//!   the IPVS virtual servers, where the kernel has IPVS (with `ipvsadm
//!   --clear`, as kube-proxy's own cleanup flushes them all).
//!
//! Nothing else is touched. In particular kubelet's own chains stay
//! (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, `KUBE-IPTABLES-HINT`,
//! `KUBE-MARK-DROP`), as they do under kube-proxy's `--cleanup`. Each table
//! changes in one `iptables-restore --noflush` transaction that deletes the
//! jumps, then flushes and deletes the chains, so a rule added by someone
//! else meanwhile survives and no half-removed state is ever visible.

use std::path::{Path, PathBuf};

use tracing::{debug, info};

use crate::iptables::{IptablesError, program, removal_script, run};

/// Chains kube-proxy's iptables mode makes under these exact names.
const KUBE_PROXY_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    // IPVS mode's.
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];

/// The ipsets of kube-proxy's IPVS mode; its IPv6 proxier names each
/// `KUBE-6-` and the rest of the name.
const IPVS_SETS: &[&str] = &[
    "KUBE-LOOP-BACK",
    "KUBE-CLUSTER-IP",
    "KUBE-EXTERNAL-IP",
    "KUBE-EXTERNAL-IP-LOCAL",
    "KUBE-LOAD-BALANCER",
    "KUBE-LOAD-BALANCER-LOCAL",
    "KUBE-LOAD-BALANCER-FW",
    "KUBE-LOAD-BALANCER-SOURCE-IP",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR",
    "KUBE-NODE-PORT-TCP",
    "KUBE-NODE-PORT-LOCAL-TCP",
    "KUBE-NODE-PORT-UDP",
    "KUBE-NODE-PORT-LOCAL-UDP",
    "KUBE-NODE-PORT-SCTP-HASH",
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "KUBE-HEALTH-CHECK-NODE-PORT",
    "KUBE-IPVS-IPS",
];

/// The dummy device IPVS mode binds every Service address to; removed by
/// its name, which is kube-proxy's alone.
const IPVS_DEVICE: &str = "kube-ipvs0";

/// Whether kube-proxy's IPVS mode owns an ipset of this name.
fn is_ipvs_set(name: &str) -> bool {
    IPVS_SETS.contains(&name)
        || name
            .strip_prefix("KUBE-6-")
            .is_some_and(|rest| IPVS_SETS.contains(&format!("KUBE-{rest}").as_str()))
}

/// Per-Service and per-endpoint chains: service, service-local, external,
/// firewall, endpoint, and the pre-1.24 external-local ones.
const KUBE_PROXY_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
    "KUBE-XLB-",
];

/// The name of the nftables table of kube-proxy's nftables mode.
const NFT_TABLE: &str = "kube-proxy";

/// An iptables back end and address family: its save and restore commands.
#[derive(Clone, Copy, Debug)]
struct Backend {
    save: &'static str,
    restore: &'static str,
}

const BACKENDS: &[Backend] = &[
    Backend {
        save: "iptables-legacy-save",
        restore: "iptables-legacy-restore",
    },
    Backend {
        save: "ip6tables-legacy-save",
        restore: "ip6tables-legacy-restore",
    },
    Backend {
        save: "iptables-nft-save",
        restore: "iptables-nft-restore",
    },
    Backend {
        save: "ip6tables-nft-save",
        restore: "ip6tables-nft-restore",
    },
];

/// Whether kube-proxy (rather than kubelet or anyone else) owns a chain.
fn is_kube_proxy_chain(chain: &str) -> bool {
    KUBE_PROXY_CHAINS.contains(&chain)
        || KUBE_PROXY_CHAIN_PREFIXES
            .iter()
            .any(|prefix| chain.starts_with(prefix))
}

/// Removes what kube-proxy left behind in this network namespace. Back ends
/// whose commands are not installed are skipped (and logged).
pub fn remove_kube_proxy_leftovers() -> Result<(), IptablesError> {
    for backend in BACKENDS {
        let (Some(save), Some(restore)) = (program(backend.save), program(backend.restore)) else {
            info!(backend = backend.save, "not installed; skipped");
            continue;
        };
        let dump = run(&save, &[], None)?;
        let script = removal_script(&dump, is_kube_proxy_chain);
        if script.chains.is_empty() && script.jumps == 0 {
            debug!(backend = backend.save, "no kube-proxy chains");
            continue;
        }
        run(&restore, &["--noflush", "-w"], Some(&script.text))?;
        info!(
            backend = backend.restore,
            chains = script.chains.len(),
            jumps = script.jumps,
            "removed kube-proxy's iptables chains"
        );
    }
    let Some(nft) = program("nft") else {
        info!("nft is not installed; kube-proxy's nftables tables (if any) were not looked for");
        return Ok(());
    };
    let tables = run(&nft, &["list", "tables"], None)?;
    for family in nft_kube_proxy_families(&tables) {
        run(&nft, &["delete", "table", family, NFT_TABLE], None)?;
        info!(family, "removed kube-proxy's nftables table");
    }
    remove_ipvs_leftovers()
}

/// IPVS mode's device, ipsets and virtual servers; after its chains,
/// whose rules hold the ipsets (a set in use cannot be destroyed).
fn remove_ipvs_leftovers() -> Result<(), IptablesError> {
    if let Some(ip) = program("ip")
        && has_ipvs_device()
    {
        run(&ip, &["link", "delete", IPVS_DEVICE], None)?;
        info!(device = IPVS_DEVICE, "removed kube-proxy's IPVS device");
    }
    if let Some(ipset) = program("ipset") {
        for set in ipvs_sets(&ipset)? {
            run(&ipset, &["destroy", &set], None)?;
            info!(set, "removed kube-proxy's ipset");
        }
    } else {
        info!("ipset is not installed; kube-proxy's ipsets (if any) were not looked for");
    }
    if !Path::new(IPVS_PROC).exists() {
        info!("the kernel has no IPVS: no virtual servers to remove");
    } else if let Some(ipvsadm) = program("ipvsadm") {
        run(&ipvsadm, &["--clear"], None)?;
        info!("removed the IPVS virtual servers");
    } else {
        info!("ipvsadm is not installed; IPVS virtual servers (if any) were left");
    }
    Ok(())
}

/// Present while the kernel has IPVS.
const IPVS_PROC: &str = "/proc/net/ip_vs";

fn has_ipvs_device() -> bool {
    Path::new("/sys/class/net").join(IPVS_DEVICE).exists()
}

/// kube-proxy's ipsets among those in this network namespace.
fn ipvs_sets(ipset: &PathBuf) -> Result<Vec<String>, IptablesError> {
    Ok(run(ipset, &["list", "-n"], None)?
        .lines()
        .map(str::trim)
        .filter(|name| is_ipvs_set(name))
        .map(str::to_owned)
        .collect())
}

/// What a kube-proxy left (or keeps) in this network namespace, without
/// changing anything: `backend: table/chain` for each chain (with the jumps
/// to it counted), and `nft: family kube-proxy` for each nftables table, in
/// a stable order. Back ends that are not installed are not looked at.
pub fn find_kube_proxy_leftovers() -> Result<Vec<String>, IptablesError> {
    let mut found = Vec::new();
    for backend in BACKENDS {
        let Some(save) = program(backend.save) else {
            continue;
        };
        let script = removal_script(&run(&save, &[], None)?, is_kube_proxy_chain);
        found.extend(
            script
                .chains
                .iter()
                .map(|chain| format!("{}: {chain}", backend.save)),
        );
    }
    if let Some(nft) = program("nft") {
        let tables = run(&nft, &["list", "tables"], None)?;
        found.extend(
            nft_kube_proxy_families(&tables)
                .into_iter()
                .map(|family| format!("nft: table {family} {NFT_TABLE}")),
        );
    }
    if has_ipvs_device() {
        found.push(format!("device {IPVS_DEVICE}"));
    }
    if let Some(ipset) = program("ipset") {
        found.extend(
            ipvs_sets(&ipset)?
                .into_iter()
                .map(|set| format!("ipset: {set}")),
        );
    }
    Ok(found)
}

/// The families with a `kube-proxy` table in `nft list tables` output.
fn nft_kube_proxy_families(tables: &str) -> Vec<&'static str> {
    ["ip", "ip6"]
        .into_iter()
        .filter(|family| {
            tables.lines().any(|line| {
                line.split_whitespace().collect::<Vec<_>>() == ["table", family, NFT_TABLE]
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kube_proxys_own_ipsets_are_its() {
        for ours in ["KUBE-CLUSTER-IP", "KUBE-6-CLUSTER-IP", "KUBE-6-LOOP-BACK"] {
            assert!(is_ipvs_set(ours), "{ours}");
        }
        // kube-router's policy sets, and a near miss.
        for theirs in [
            "KUBE-DST-ABCDEF",
            "KUBE-SRC-ABCDEF",
            "KUBE-CLUSTER-IPS",
            "KUBE-6-",
        ] {
            assert!(!is_ipvs_set(theirs), "{theirs}");
        }
    }
    use crate::iptables::RemovalScript;

    const DUMP: &str = r#"# Generated by iptables-save v1.8.9
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [10:600]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-AAA - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-BBB - [0:0]
:MY-CHAIN - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m comment --comment "mine: not -j KUBE-SERVICES" -j MY-CHAIN
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SEP-AAA -p tcp -m tcp -j DNAT --to-destination 10.244.0.10:8080
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-BBB
-A KUBE-SVC-BBB -j KUBE-SEP-AAA
-A MY-CHAIN -g KUBE-MARK-MASQ
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:KUBE-SVC-NOT-OURS - [0:0]
COMMIT
"#;

    #[test]
    fn the_script_removes_kube_proxy_chains_and_jumps_and_nothing_else() {
        let script = removal_script(DUMP, is_kube_proxy_chain);
        assert_eq!(
            script.text,
            r#"*mangle
:KUBE-PROXY-CANARY - [0:0]
-X KUBE-PROXY-CANARY
COMMIT
*nat
-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-D OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-D POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-D MY-CHAIN -g KUBE-MARK-MASQ
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-AAA - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-BBB - [0:0]
-X KUBE-MARK-MASQ
-X KUBE-POSTROUTING
-X KUBE-SEP-AAA
-X KUBE-SERVICES
-X KUBE-SVC-BBB
COMMIT
"#
        );
        assert_eq!(script.jumps, 4);
        assert_eq!(script.chains.len(), 6);
    }

    #[test]
    fn a_dump_without_kube_proxy_needs_nothing() {
        let dump = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n\
                    -A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        assert_eq!(
            removal_script(dump, is_kube_proxy_chain),
            RemovalScript::default()
        );
    }

    #[test]
    fn kubelet_chains_are_not_kube_proxy_chains() {
        for chain in [
            "KUBE-FIREWALL",
            "KUBE-KUBELET-CANARY",
            "KUBE-IPTABLES-HINT",
            "KUBE-MARK-DROP",
            "INPUT",
        ] {
            assert!(!is_kube_proxy_chain(chain), "{chain}");
        }
        for chain in ["KUBE-SERVICES", "KUBE-SVC-X", "KUBE-SEP-X", "KUBE-FW-X"] {
            assert!(is_kube_proxy_chain(chain), "{chain}");
        }
    }

    #[test]
    fn nft_tables_of_kube_proxy_are_found_by_family() {
        let tables = "table ip nat\ntable ip kube-proxy\ntable inet kube-proxy\n\
                      table ip6 kube-proxy\ntable ip kube-proxy-x\n";
        assert_eq!(nft_kube_proxy_families(tables), ["ip", "ip6"]);
        assert!(nft_kube_proxy_families("table ip filter\n").is_empty());
    }
}
