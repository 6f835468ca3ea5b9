//! Privileged test of `proxy-userspace cleanup --kube-proxy`: a network
//! namespace gets the rules a kube-proxy writes (iptables legacy and nft,
//! IPv4 and IPv6, and its nftables tables) beside rules of its own; after
//! the cleanup it must hold exactly what a twin namespace given only those
//! other rules holds.
//!
//! Needs root, so `#[ignore]`d in a plain `cargo test`; `cargo xtask test`
//! runs it with `--ignored`. Only namespaces the test makes are touched,
//! never the host's rules.

use std::{
    io::Write as _,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use xtask::lab::agent_binary;

/// A network namespace of the test's own, deleted on drop. Named like the
/// lab's (`plab-<pid>-...`), so a lab sweeps it up should a killed run
/// leave it behind.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "plab-{}-kp{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip");
        assert!(status.success(), "ip netns add {name}: {status}");
        Self(name)
    }

    /// Runs `program` in the namespace, feeding it `stdin`; panics if it fails.
    fn run(&self, program: &str, args: &[&str], stdin: &str) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(stdin.as_bytes())
            .expect("stdin");
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().expect("wait");
        assert!(
            status.success(),
            "{program} {args:?} in {} failed ({status}):\n{}\n{}\ninput:\n{stdin}",
            self.0,
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr),
        );
        String::from_utf8_lossy(&stdout).into_owned()
    }

    /// Everything in the namespace's netfilter state, comments (dates) and
    /// counters left out, so two namespaces compare by their rules alone.
    fn rules(&self) -> String {
        let mut all = String::new();
        for save in [
            "iptables-legacy-save",
            "ip6tables-legacy-save",
            "iptables-nft-save",
            "ip6tables-nft-save",
        ] {
            all.push_str("## ");
            all.push_str(save);
            all.push('\n');
            for line in self.run(save, &[], "").lines() {
                if line.starts_with('#') {
                    continue;
                }
                let line = match line.split_once(" [") {
                    Some((chain, _counters)) if line.starts_with(':') => chain,
                    _ => line,
                };
                all.push_str(line);
                all.push('\n');
            }
        }
        all.push_str("## nft list ruleset\n");
        all.push_str(&self.run("nft", &["list", "ruleset"], ""));
        all
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Marks a line as kube-proxy's: it is left out of the twin's rules.
const KUBE: &str = "K ";

/// Lines of `ruleset` (kube-proxy's marked with [`KUBE`]), with or without
/// kube-proxy's.
fn rules(ruleset: &str, with_kube_proxy: bool) -> String {
    let mut out = String::new();
    for line in ruleset.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.strip_prefix(KUBE) {
            Some(kube) if with_kube_proxy => out.push_str(kube),
            Some(_) => continue,
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The shape of kube-proxy's iptables mode (one Service with two
/// endpoints, one without endpoints, a NodePort) beside a node's other
/// rules: kubelet's chains (which must stay), a CNI's chain, plain rules.
const IPV4: &str = r#"
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
K :KUBE-PROXY-CANARY - [0:0]
-A PREROUTING -p tcp -m tcp --dport 22 -j MARK --set-xmark 0x1/0xffffffff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
K :KUBE-MARK-MASQ - [0:0]
K :KUBE-NODEPORTS - [0:0]
K :KUBE-POSTROUTING - [0:0]
K :KUBE-PROXY-CANARY - [0:0]
K :KUBE-SEP-6E7XQMQ4RAYOWTTM - [0:0]
K :KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
K :KUBE-SERVICES - [0:0]
K :KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
K -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
K -A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
K -A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE
-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8443 -j DNAT --to-destination 10.244.0.30:443
K -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
K -A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-SVC-TCOU7JCQXEZGVUNU
K -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
K -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
K -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
K -A KUBE-SEP-6E7XQMQ4RAYOWTTM -s 10.244.0.10/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
K -A KUBE-SEP-6E7XQMQ4RAYOWTTM -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.0.10:8080
K -A KUBE-SEP-IT2ZTR26TO4XFPTO -s 10.244.0.11/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
K -A KUBE-SEP-IT2ZTR26TO4XFPTO -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.0.11:8080
K -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-TCOU7JCQXEZGVUNU
K -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
K -A KUBE-SVC-TCOU7JCQXEZGVUNU ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
K -A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "default/web:http -> 10.244.0.10:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-6E7XQMQ4RAYOWTTM
K -A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment "default/web:http -> 10.244.0.11:8080" -j KUBE-SEP-IT2ZTR26TO4XFPTO
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
K :KUBE-EXTERNAL-SERVICES - [0:0]
K :KUBE-FORWARD - [0:0]
K :KUBE-NODEPORTS - [0:0]
K :KUBE-PROXY-CANARY - [0:0]
K :KUBE-PROXY-FIREWALL - [0:0]
K :KUBE-SERVICES - [0:0]
K -A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
K -A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
K -A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
K -A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
K -A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
K -A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
K -A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -s 10.244.0.0/16 -j ACCEPT
K -A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
K -A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
K -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
K -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
K -A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment "default/empty:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
"#;

/// kube-proxy writes IPv6 rules too, wherever the node has IPv6.
const IPV6: &str = r#"
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
K :KUBE-SERVICES - [0:0]
K :KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
K -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -d fd00::1/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd00::2]:8080
K -A KUBE-SERVICES -d fd00:96::10/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-ABCDEFGHIJKLMNOP
COMMIT
"#;

/// kube-proxy's nftables mode (its `ip` and `ip6` tables, abridged) and
/// tables of others, one with a name close to kube-proxy's.
const NFT: &str = r"
K table ip kube-proxy {
K   chain services { }
K   chain nat-prerouting { type nat hook prerouting priority dstnat; jump services; }
K }
K table ip6 kube-proxy {
K   chain services { }
K   chain nat-output { type nat hook output priority -100; jump services; }
K }
table inet firewall {
  chain input { type filter hook input priority 0; tcp dport 22 accept; }
}
table ip kube-proxy-not {
  chain c { }
}
table inet kube-proxy {
  chain c { }
}
";

fn load(ns: &Netns, with_kube_proxy: bool) {
    for backend in ["legacy", "nft"] {
        ns.run(
            &format!("iptables-{backend}-restore"),
            &[],
            &rules(IPV4, with_kube_proxy),
        );
        ns.run(
            &format!("ip6tables-{backend}-restore"),
            &[],
            &rules(IPV6, with_kube_proxy),
        );
    }
    ns.run("nft", &["-f", "-"], &rules(NFT, with_kube_proxy));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn cleanup_kube_proxy_removes_its_rules_and_nothing_else() {
    let node = Netns::new("node");
    let twin = Netns::new("twin");
    load(&node, true);
    load(&twin, false);
    let others_only = twin.rules();
    assert_ne!(node.rules(), others_only, "kube-proxy's rules did not load");

    let agent = agent_binary();
    let agent = agent.to_str().expect("UTF-8 path");
    for round in ["first", "second (nothing left to do)"] {
        node.run(agent, &["cleanup", "--kube-proxy"], "");
        let left = node.rules();
        for chain in [
            "KUBE-SERVICES",
            "KUBE-SVC-",
            "KUBE-SEP-",
            "KUBE-MARK-MASQ",
            "KUBE-POSTROUTING",
            "KUBE-NODEPORTS",
            "KUBE-FORWARD",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-PROXY-",
            "table ip kube-proxy {",
            "table ip6 kube-proxy {",
        ] {
            assert!(
                !left.contains(chain),
                "{chain} is still there after the {round} run:\n{left}"
            );
        }
        assert_eq!(
            left, others_only,
            "after the {round} run, the node's other rules are not exactly as they were"
        );
    }
}

/// The ipsets of the namespace, by name, sorted.
fn ipsets(ns: &Netns) -> Vec<String> {
    let mut sets: Vec<String> = ns
        .run("ipset", &["list", "-n"], "")
        .lines()
        .map(str::to_owned)
        .collect();
    sets.sort();
    sets
}

/// IPVS mode's leftovers besides its chains: the `kube-ipvs0` device, its
/// ipsets of both families (one held by a rule in its `KUBE-LOAD-BALANCER`
/// chain, so the chain must go first), all removed; a `KUBE-*` set of
/// another program (kube-router names its policy sets so) and another
/// device stay. This kernel has no IPVS: the cleanup says so and
/// goes on.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn cleanup_kube_proxy_removes_ipvs_modes_device_and_ipsets() {
    let node = Netns::new("ipvs");
    // kube-proxy makes a dummy device; this kernel has no dummy driver,
    // and the cleanup goes by the name.
    node.run("ip", &["link", "add", "kube-ipvs0", "type", "bridge"], "");
    node.run("ip", &["link", "add", "mine0", "type", "bridge"], "");
    for (set, family) in [
        ("KUBE-CLUSTER-IP", "inet"),
        ("KUBE-LOOP-BACK", "inet"),
        ("KUBE-6-CLUSTER-IP", "inet6"),
        ("KUBE-DST-POLICY1", "inet"),
    ] {
        node.run("ipset", &["create", set, "hash:ip", "family", family], "");
    }
    node.run(
        "iptables-legacy-restore",
        &["--noflush"],
        "*nat\n:KUBE-LOAD-BALANCER - [0:0]\n\
         -A PREROUTING -j KUBE-LOAD-BALANCER\n\
         -A KUBE-LOAD-BALANCER -m set --match-set KUBE-CLUSTER-IP dst -j RETURN\n\
         COMMIT\n",
    );

    let agent = agent_binary();
    let agent = agent.to_str().expect("UTF-8 path");
    node.run(agent, &["cleanup", "--kube-proxy"], "");
    assert_eq!(ipsets(&node), ["KUBE-DST-POLICY1"]);
    let links = node.run("ip", &["-o", "link", "show"], "");
    assert!(!links.contains("kube-ipvs0"), "{links}");
    assert!(links.contains("mine0"), "{links}");
    let nat = node.run("iptables-legacy-save", &["-t", "nat"], "");
    assert!(!nat.contains("KUBE-LOAD-BALANCER"), "{nat}");
}
