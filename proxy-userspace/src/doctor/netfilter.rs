//! The kernel's netfilter parts the masquerade fallback needs: conntrack
//! and NAT, and, where a bridge carries pods, br_netfilter handing bridged
//! traffic to iptables (else a reply between two pods of one bridge skips
//! the masquerade's un-NAT). Each is judged by what it makes appear, not by
//! a list of modules: a kernel may have them built in, with no
//! /lib/modules and nothing in /sys/module. Read in doctor's network
//! namespace, since the sysctls are per namespace.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::Path,
};

use super::{Check, Context, Status};
use crate::datapath;

/// There while conntrack is in the kernel, in every network namespace.
const CONNTRACK_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// A function of nf_nat's, built in or a module: the kernel lists it here.
const NAT_SYMBOL: &str = "nf_nat_setup_info";
const KALLSYMS: &str = "/proc/kallsyms";
/// nf_nat as a loaded module.
const NAT_MODULE: &str = "/sys/module/nf_nat";
/// The legacy iptables tables in use in this namespace, each family's.
const TABLE_LISTS: [&str; 2] = ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"];
/// br_netfilter's switches, with the sysctl name that sets each. The IPv6
/// one matters only where the node has IPv6.
const BRIDGE_SWITCHES: [(&str, &str); 2] = [
    (
        "/proc/sys/net/bridge/bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-iptables",
    ),
    (
        "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
        "net.bridge.bridge-nf-call-ip6tables",
    ),
];
const IPV6_PROC_FILE: &str = "/proc/net/if_inet6";

/// Whether the kernel has nf_nat, and how that is known.
#[derive(Debug, PartialEq, Eq)]
enum Nat {
    Present(&'static str),
    /// The kernel's symbols were read and nf_nat's are not among them.
    Absent,
    /// Nothing says either way (no /proc/kallsyms here).
    Unknown,
}

fn nat() -> Nat {
    if let Ok(symbols) = fs::File::open(KALLSYMS) {
        return match lists_symbol(BufReader::new(symbols), NAT_SYMBOL) {
            Some(true) => Nat::Present("in the kernel's symbols"),
            Some(false) => Nat::Absent,
            None => nat_otherwise(),
        };
    }
    nat_otherwise()
}

/// Where the kernel's symbols cannot be read, the signs nf_nat leaves
/// when it is a module, or when a nat table is in use.
fn nat_otherwise() -> Nat {
    if Path::new(NAT_MODULE).exists() {
        return Nat::Present("a loaded module");
    }
    let in_use = TABLE_LISTS.iter().any(|list| {
        fs::read_to_string(list).is_ok_and(|tables| tables.lines().any(|t| t.trim() == "nat"))
    });
    if in_use {
        Nat::Present("its nat table is in use")
    } else {
        Nat::Unknown
    }
}

/// Whether /proc/kallsyms (`address type name [module]` lines) lists
/// `symbol`; `None` when it lists nothing, as it may where it is hidden.
fn lists_symbol(kallsyms: impl BufRead, symbol: &str) -> Option<bool> {
    let mut any = false;
    for line in kallsyms.lines() {
        let Ok(line) = line else {
            break;
        };
        any = true;
        if line.split_whitespace().nth(2) == Some(symbol) {
            return Some(true);
        }
    }
    any.then_some(false)
}

/// The bridges of this network namespace, by name.
fn bridges() -> Vec<String> {
    crate::devices::read()
        .unwrap_or_default()
        .into_iter()
        .filter(|device| device.kind == "bridge")
        .map(|device| device.name)
        .collect()
}

/// A sysctl's value, trimmed; `None` when there is no such sysctl.
fn sysctl(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|v| v.trim().to_owned())
}

pub(super) fn netfilter(cx: &Context) -> Check {
    const NAME: &str = "netfilter";
    // With tc programs on a device the fallback is at work: NodePort
    // replies of masqueraded flows need conntrack and NAT now.
    let needed = if datapath::tc_links(&cx.pins).is_empty() {
        Status::Warn
    } else {
        Status::Fail
    };
    let mut facts = Vec::new();
    let mut problems: Vec<(Status, String, String)> = Vec::new();
    if Path::new(CONNTRACK_SYSCTL).exists() {
        facts.push("nf_conntrack (net.netfilter.nf_conntrack_max is there)".to_owned());
    } else {
        problems.push((
            needed,
            format!("no nf_conntrack (no {CONNTRACK_SYSCTL})"),
            "modprobe nf_conntrack".to_owned(),
        ));
    }
    match nat() {
        Nat::Present(how) => facts.push(format!("nf_nat ({how})")),
        Nat::Absent => problems.push((
            needed,
            format!("no nf_nat ({NAT_SYMBOL} is not among the kernel's symbols)"),
            "modprobe nf_nat".to_owned(),
        )),
        Nat::Unknown => problems.push((
            Status::Warn,
            format!(
                "cannot tell whether the kernel has nf_nat (no {KALLSYMS}, no {NAT_MODULE}, no nat table in use)"
            ),
            "modprobe nf_nat".to_owned(),
        )),
    }
    let bridges = bridges();
    if bridges.is_empty() {
        facts.push("no bridge in this network namespace, so br_netfilter is not needed".to_owned());
    } else {
        let on = bridges.join(", ");
        bridge_facts(&on, &mut facts, &mut problems);
    }
    let worst = problems.iter().map(|p| p.0).max().unwrap_or(Status::Ok);
    let fixes: Vec<String> = problems.iter().map(|p| p.2.clone()).collect();
    facts.extend(problems.into_iter().map(|p| p.1));
    let evidence = facts.join(", ");
    if worst == Status::Ok {
        Check::ok(NAME, evidence)
    } else {
        Check::problem(NAME, worst, evidence, fixes.join("; "))
    }
}

/// br_netfilter's part where bridges (`on`) carry pods: loaded, and
/// handing bridged traffic to iptables in each family the node has.
fn bridge_facts(on: &str, facts: &mut Vec<String>, problems: &mut Vec<(Status, String, String)>) {
    let families = if Path::new(IPV6_PROC_FILE).exists() {
        &BRIDGE_SWITCHES[..]
    } else {
        &BRIDGE_SWITCHES[..1]
    };
    let mut off = Vec::new();
    for (path, name) in families {
        match sysctl(path) {
            None => {
                problems.push((
                    Status::Warn,
                    format!("bridge {on}, but no br_netfilter (no {path})"),
                    "modprobe br_netfilter".to_owned(),
                ));
                return;
            }
            Some(value) if value == "1" => {}
            Some(value) => off.push((*name, value)),
        }
    }
    if off.is_empty() {
        let names: Vec<&str> = families.iter().map(|(_, name)| *name).collect();
        facts.push(format!(
            "br_netfilter for bridge {on}, {} = 1",
            names.join(" and ")
        ));
    } else {
        problems.push((
            Status::Warn,
            format!(
                "bridge {on}, but br_netfilter does not hand its traffic to iptables ({})",
                off.iter()
                    .map(|(name, value)| format!("{name} = {value}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            off.iter()
                .map(|(name, _)| format!("sysctl -w {name}=1"))
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symbol_is_found_built_in_or_in_a_module_and_an_empty_list_says_nothing() {
        let kallsyms = "ffffffff81fa9830 T nf_nat_setup_info\n";
        assert_eq!(lists_symbol(kallsyms.as_bytes(), NAT_SYMBOL), Some(true));
        let module = "0000000000000000 t other\n0000000000000000 T nf_nat_setup_info\t[nf_nat]\n";
        assert_eq!(lists_symbol(module.as_bytes(), NAT_SYMBOL), Some(true));
        let without = "ffffffff81fa9830 T nf_nat_setup_info_more\nffff t x nf_nat_setup_info\n";
        assert_eq!(lists_symbol(without.as_bytes(), NAT_SYMBOL), Some(false));
        assert_eq!(lists_symbol(&b""[..], NAT_SYMBOL), None);
        assert_eq!(lists_symbol(&b"\xff\xfe garbage"[..], NAT_SYMBOL), None);
    }
}
