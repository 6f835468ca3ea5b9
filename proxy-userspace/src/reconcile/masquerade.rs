//! The iptables masquerade fallback: two chains of our own that mirror
//! kube-proxy's KUBE-MARK-MASQ and KUBE-POSTROUTING. The datapath marks
//! packets that need SNAT (externalTrafficPolicy Cluster from outside, and
//! so on); POSTROUTING masquerades the marked ones and clears the mark.
//!
//! - In both address families: the same chains, mark and rules with
//!   iptables and with ip6tables.
//! - Written in one `iptables-restore --noflush -w` transaction per family,
//!   so no half-written state is ever visible and nobody else's rules are
//!   touched: declaring our chains flushes only them.
//! - On the iptables back end the node already uses, detected as kube-proxy's
//!   iptables-wrapper does, from the IPv4 and IPv6 dumps together, one
//!   choice for both families: kubelet's hint chains in iptables-nft, then
//!   in iptables-legacy; failing both, whichever holds more rules (the older
//!   wrapper's rule); nft when all is empty.
//! - Checked on the loop's timer (`--iptables-sync-period`) and rewritten,
//!   with a log line, when someone flushed or changed them.
//! - Removed by `cleanup`, in both back ends and both families, with the
//!   jump to them; but kept while another agent runs in the network
//!   namespace (its lock, an abstract socket, is the namespace's): the
//!   chains are the node's, and that agent's programs mark packets for them.
//! - No iptables at all: one warning naming the package, and everything else
//!   keeps working. No IPv6 on the node (no /proc/net/if_inet6), no
//!   ip6tables, or an ip6tables the kernel refuses: one warning, and the
//!   IPv4 rules are kept as ever.

use std::{
    fmt::{self, Write as _},
    path::{Path, PathBuf},
};

use tracing::{debug, info, warn};

use crate::iptables::{self, IptablesError, parse_dump, program, removal_script};

/// Our KUBE-MARK-MASQ: jumping here asks for masquerading.
pub const MARK_CHAIN: &str = "EBPF-PROXY-MARK-MASQ";
/// Our KUBE-POSTROUTING.
pub const POSTROUTING_CHAIN: &str = "EBPF-PROXY-POSTROUTING";
const JUMP_COMMENT: &str = "ebpf-proxy postrouting rules";
const MASQUERADE_COMMENT: &str = "ebpf-proxy service traffic requiring SNAT";

/// kubelet's chains in the mangle table (Kubernetes 1.17 and later): where
/// they are is the back end the node uses.
const KUBELET_HINT_CHAINS: &[&str] = &["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// Present while the kernel has IPv6 (it is not there when IPv6 is disabled
/// at boot, `ipv6.disable=1`, or not built in).
const IPV6_PROC_FILE: &str = "/proc/net/if_inet6";

fn is_ours(chain: &str) -> bool {
    chain == MARK_CHAIN || chain == POSTROUTING_CHAIN
}

/// The address families the rules are kept in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// Why this node has no IPv6 for the rules, or `None` when it has.
fn ipv6_off() -> Option<String> {
    (!Path::new(IPV6_PROC_FILE).exists())
        .then(|| format!("IPv6 is disabled on this node (no {IPV6_PROC_FILE})"))
}

/// The iptables back ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Legacy,
    Nft,
    /// Only plain `iptables-save`/`-restore` are installed: whatever they
    /// are.
    Plain,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Legacy => "iptables-legacy",
            Self::Nft => "iptables-nft",
            Self::Plain => "iptables",
        })
    }
}

impl Mode {
    const fn commands(self, family: Family) -> (&'static str, &'static str) {
        match (self, family) {
            (Self::Legacy, Family::V4) => ("iptables-legacy-save", "iptables-legacy-restore"),
            (Self::Legacy, Family::V6) => ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
            (Self::Nft, Family::V4) => ("iptables-nft-save", "iptables-nft-restore"),
            (Self::Nft, Family::V6) => ("ip6tables-nft-save", "ip6tables-nft-restore"),
            (Self::Plain, Family::V4) => ("iptables-save", "iptables-restore"),
            (Self::Plain, Family::V6) => ("ip6tables-save", "ip6tables-restore"),
        }
    }

    /// The back end the node uses, or `None` when iptables is not
    /// installed.
    fn detect() -> Option<Self> {
        let installed = |mode| Backend::find(mode, Family::V4);
        match (installed(Self::Legacy), installed(Self::Nft)) {
            (Some(legacy), Some(nft)) => {
                // Both families' dumps, as the wrapper reads them: a node
                // whose rules are all IPv6 still tells.
                let dumps = |backend: &Backend| {
                    let mut text = backend.save().unwrap_or_default();
                    if let Some(v6) = Backend::find(backend.mode, Family::V6) {
                        text.push_str(&v6.save().unwrap_or_default());
                    }
                    text
                };
                Some(choose_mode(&dumps(&nft), &dumps(&legacy)))
            }
            (Some(only), None) | (None, Some(only)) => Some(only.mode),
            (None, None) => installed(Self::Plain).map(|plain| plain.mode),
        }
    }
}

/// A back end's save and restore commands for one family.
#[derive(Clone, Debug)]
struct Backend {
    mode: Mode,
    family: Family,
    save: PathBuf,
    restore: PathBuf,
}

impl Backend {
    fn find(mode: Mode, family: Family) -> Option<Self> {
        let (save, restore) = mode.commands(family);
        Some(Self {
            mode,
            family,
            save: program(save)?,
            restore: program(restore)?,
        })
    }

    /// The IPv6 back end of `mode`, or why there is none.
    fn ipv6(mode: Mode) -> Result<Self, String> {
        if let Some(off) = ipv6_off() {
            return Err(off);
        }
        Self::find(mode, Family::V6).ok_or_else(|| {
            let (save, restore) = mode.commands(Family::V6);
            format!("{save} or {restore} is not installed")
        })
    }

    fn save(&self) -> Result<String, IptablesError> {
        // Never `-t`: iptables-legacy would create the table to list it.
        iptables::run(&self.save, &[], None)
    }

    fn restore(&self, script: &str) -> Result<String, IptablesError> {
        iptables::run(&self.restore, &["--noflush", "-w"], Some(script))
    }
}

/// Which back end the node uses, from the dumps of both (IPv4 and IPv6
/// together), as kube-proxy's iptables-wrapper decides.
fn choose_mode(nft: &str, legacy: &str) -> Mode {
    let hinted = |dump: &str| {
        dump.lines().any(|line| {
            line.strip_prefix(':')
                .and_then(|l| l.split_whitespace().next())
                .is_some_and(|chain| KUBELET_HINT_CHAINS.contains(&chain))
        })
    };
    let rules = |dump: &str| dump.lines().filter(|l| l.starts_with('-')).count();
    if hinted(nft) {
        Mode::Nft
    } else if hinted(legacy) || rules(legacy) > rules(nft) {
        Mode::Legacy
    } else {
        Mode::Nft
    }
}

/// The masquerade fallback.
pub struct Masquerade {
    /// One per family that has iptables; none when iptables is not
    /// installed (said once, at start).
    families: Vec<FamilyRules>,
    mark: u32,
}

/// The rules of one family.
struct FamilyRules {
    backend: Backend,
    /// Our chains' rules as iptables-save printed them after our last
    /// write: versions of iptables spell a rule differently, and a rule
    /// compared with our own spelling would be "repaired" forever.
    canonical: Option<Vec<String>>,
    installed: bool,
    /// The last write that failed, warned about once until it changes or
    /// a write succeeds: an ip6tables the kernel refuses fails every
    /// period.
    failing: Option<String>,
}

impl FamilyRules {
    fn new(backend: Backend) -> Self {
        Self {
            backend,
            canonical: None,
            installed: false,
            failing: None,
        }
    }
}

impl Masquerade {
    /// Finds the back end; masquerades packets whose mark has bit
    /// `masquerade_bit` set.
    #[must_use]
    pub fn new(masquerade_bit: u8) -> Self {
        let mut families = Vec::new();
        if let Some(mode) = Mode::detect() {
            families.extend(Backend::find(mode, Family::V4).map(FamilyRules::new));
            match Backend::ipv6(mode) {
                Ok(v6) => families.push(FamilyRules::new(v6)),
                Err(reason) => warn!(
                    %reason,
                    "no IPv6 masquerade rules; the IPv4 ones are kept as ever"
                ),
            }
            info!(backend = %mode, "iptables back end for the masquerade rules");
        } else {
            warn!(
                "iptables is not installed: the masquerade fallback is off (install the \
                 iptables package, e.g. apt-get install iptables); ClusterIP Services keep working"
            );
        }
        Self {
            families,
            mark: 1 << masquerade_bit,
        }
    }
}

/// Our chains' rules, as we write them, for the mark `mark`: the same in
/// both families.
fn rules(mark: u32) -> Vec<String> {
    let masked = format!("{mark:#x}/{mark:#x}");
    vec![
        format!("-A {MARK_CHAIN} -j MARK --set-xmark {masked}"),
        format!("-A {POSTROUTING_CHAIN} -m mark ! --mark {masked} -j RETURN"),
        // Cleared, so a packet that is routed back out is not
        // masqueraded twice.
        format!("-A {POSTROUTING_CHAIN} -j MARK --set-xmark 0x0/{mark:#x}"),
        format!(
            "-A {POSTROUTING_CHAIN} -m comment --comment \"{MASQUERADE_COMMENT}\" -j MASQUERADE --random-fully"
        ),
    ]
}

impl FamilyRules {
    /// Checks one pass: writes the rules when they are missing or differ.
    fn sync(&mut self, mark: u32) -> Result<usize, IptablesError> {
        let (backend, family) = (&self.backend, self.backend.family);
        let dump = backend.save()?;
        let wanted = rules(mark);
        let expected = self.canonical.clone().unwrap_or_else(|| wanted.clone());
        let state = inspect(&dump, &expected);
        let Some(reason) = state.problem() else {
            if !self.installed {
                info!(%family, mark = format!("{mark:#x}"), "masquerade rules in place");
                self.installed = true;
            }
            return Ok(0);
        };
        backend.restore(&script(&wanted, &state.jumps))?;
        if self.installed {
            warn!(%family, %reason, "the masquerade rules were changed by someone else; restored them");
        } else {
            info!(
                backend = %backend.mode,
                %family,
                mark = format!("{mark:#x}"),
                "installed the masquerade rules"
            );
            self.installed = true;
        }
        // Learn how this iptables spells our rules.
        let after = backend.save()?;
        let ours = our_rules(&after);
        if ours.len() == wanted.len() {
            if ours != wanted {
                debug!(%family, ?ours, "iptables-save spells our rules differently");
            }
            self.canonical = Some(ours);
        }
        Ok(1)
    }
}

/// What `doctor` finds of the rules in one family.
#[derive(Debug, PartialEq, Eq)]
pub enum FamilyCheck {
    InPlace,
    /// What is wrong with them.
    Wrong(String),
    /// Why they cannot be read (ip6tables missing, iptables failing).
    Unreadable(String),
    /// The node has no IPv6: nothing to masquerade there.
    Off(String),
}

/// The masquerade rules of bit `masquerade_bit` on this node's iptables
/// back end, per family, for `doctor`; an error when iptables is missing.
pub fn check(masquerade_bit: u8) -> Result<Vec<(Family, FamilyCheck)>, String> {
    let mode = Mode::detect().ok_or("iptables is not installed")?;
    let expected = rules(1 << masquerade_bit);
    let inspect_with = |backend: Option<Backend>| match backend.map(|b| b.save()) {
        None => FamilyCheck::Unreadable("not installed".to_owned()),
        Some(Err(error)) => FamilyCheck::Unreadable(crate::report::chain(&error)),
        Some(Ok(dump)) => inspect(&dump, &expected)
            .problem()
            .map_or(FamilyCheck::InPlace, FamilyCheck::Wrong),
    };
    let v6 = if let Some(off) = ipv6_off() {
        FamilyCheck::Off(off)
    } else {
        match Backend::ipv6(mode) {
            Ok(backend) => inspect_with(Some(backend)),
            Err(missing) => FamilyCheck::Unreadable(missing),
        }
    };
    Ok(vec![
        (Family::V4, inspect_with(Backend::find(mode, Family::V4))),
        (Family::V6, v6),
    ])
}

impl Masquerade {
    /// The periodic task: the rules do not depend on the Services, so each
    /// period only checks them, and repairs what someone else changed, in
    /// each family on its own: one that fails leaves the other be.
    pub fn repair(&mut self) {
        for rules in &mut self.families {
            match rules.sync(self.mark) {
                Ok(_) => rules.failing = None,
                Err(error) => {
                    let error = crate::report::chain(&error);
                    let family = rules.backend.family;
                    if rules.failing.as_ref() == Some(&error) {
                        debug!(%family, %error, "the masquerade rules still cannot be written");
                    } else {
                        warn!(
                            %family,
                            %error,
                            "cannot write the masquerade rules; retrying each period"
                        );
                    }
                    rules.failing = Some(error);
                }
            }
        }
    }
}

/// What a dump holds of ours.
#[derive(Debug, PartialEq, Eq)]
struct Inspection {
    chains: usize,
    rules_match: bool,
    /// POSTROUTING's rules that jump to our chain, as saved.
    jumps: Vec<String>,
}

impl Inspection {
    fn problem(&self) -> Option<String> {
        if self.chains < 2 {
            Some("a chain is missing".to_owned())
        } else if !self.rules_match {
            Some("their rules differ".to_owned())
        } else if self.jumps.len() != 1 {
            Some(format!(
                "POSTROUTING jumps to {POSTROUTING_CHAIN} {} times",
                self.jumps.len()
            ))
        } else {
            None
        }
    }
}

fn inspect(dump: &str, expected: &[String]) -> Inspection {
    let nat = parse_dump(dump).into_iter().find(|t| t.name == "nat");
    let Some(nat) = nat else {
        return Inspection {
            chains: 0,
            rules_match: false,
            jumps: Vec::new(),
        };
    };
    Inspection {
        chains: nat.chains.iter().filter(|c| is_ours(c)).count(),
        rules_match: our_rules(dump) == expected,
        jumps: nat
            .rules
            .iter()
            .filter(|r| r.chain == "POSTROUTING" && r.target.as_deref() == Some(POSTROUTING_CHAIN))
            .map(|r| r.spec.clone())
            .collect(),
    }
}

/// Our chains' rules in the nat table, as `-A` lines.
fn our_rules(dump: &str) -> Vec<String> {
    parse_dump(dump)
        .into_iter()
        .filter(|t| t.name == "nat")
        .flat_map(|t| t.rules)
        .filter(|r| is_ours(&r.chain))
        .map(|r| format!("-A {}", r.spec))
        .collect()
}

/// The restore input that makes our chains exactly `rules` and leaves one
/// jump from POSTROUTING, touching nothing else.
fn script(rules: &[String], jumps: &[String]) -> String {
    let mut text = format!("*nat\n:{MARK_CHAIN} - [0:0]\n:{POSTROUTING_CHAIN} - [0:0]\n");
    for rule in rules {
        text.push_str(rule);
        text.push('\n');
    }
    if jumps.is_empty() {
        // First, as kube-proxy puts its own: a rule before it that accepts
        // would keep marked packets from being masqueraded.
        let _ = writeln!(
            text,
            "-I POSTROUTING 1 -m comment --comment \"{JUMP_COMMENT}\" -j {POSTROUTING_CHAIN}"
        );
    }
    for extra in jumps.iter().skip(1) {
        let _ = writeln!(text, "-D {extra}");
    }
    text.push_str("COMMIT\n");
    text
}

/// `cleanup`: removes our chains and the jumps to them from both back
/// ends (the node may have switched since) and both families, and nothing
/// else. IPv6 that cannot be cleaned (a kernel without ip6_tables) is
/// warned about and does not fail the IPv4 cleanup.
pub fn cleanup() -> Result<(), IptablesError> {
    let ipv6 = ipv6_off().is_none();
    let mut found = false;
    for mode in [Mode::Legacy, Mode::Nft] {
        if let Some(backend) = Backend::find(mode, Family::V4) {
            found = true;
            remove(&backend)?;
        }
        if ipv6 && let Some(backend) = Backend::find(mode, Family::V6) {
            remove_ipv6(&backend);
        }
    }
    if !found {
        if let Some(backend) = Backend::find(Mode::Plain, Family::V4) {
            remove(&backend)?;
        }
        if ipv6 && let Some(backend) = Backend::find(Mode::Plain, Family::V6) {
            remove_ipv6(&backend);
        }
    }
    Ok(())
}

fn remove(backend: &Backend) -> Result<(), IptablesError> {
    let removal = removal_script(&backend.save()?, is_ours);
    if removal.chains.is_empty() && removal.jumps == 0 {
        return Ok(());
    }
    backend.restore(&removal.text)?;
    info!(
        backend = %backend.mode,
        family = %backend.family,
        chains = removal.chains.len(),
        "removed the masquerade rules"
    );
    Ok(())
}

fn remove_ipv6(backend: &Backend) {
    if let Err(error) = remove(backend) {
        warn!(
            backend = %backend.mode,
            error = %crate::report::chain(&error),
            "cannot remove the IPv6 masquerade rules; the IPv4 ones are removed regardless"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(rules: &[String], jumps: usize) -> String {
        let mut text = "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
                        :EBPF-PROXY-MARK-MASQ - [0:0]\n:EBPF-PROXY-POSTROUTING - [0:0]\n:OTHER - [0:0]\n"
            .to_owned();
        for _ in 0..jumps {
            text.push_str(
                "-A POSTROUTING -m comment --comment \"ebpf-proxy postrouting rules\" -j EBPF-PROXY-POSTROUTING\n",
            );
        }
        text.push_str("-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE\n");
        for rule in rules {
            text.push_str(rule);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        text
    }

    #[test]
    fn the_rules_mirror_kube_proxy_with_the_configured_bit() {
        assert_eq!(
            rules(1 << 12),
            [
                "-A EBPF-PROXY-MARK-MASQ -j MARK --set-xmark 0x1000/0x1000",
                "-A EBPF-PROXY-POSTROUTING -m mark ! --mark 0x1000/0x1000 -j RETURN",
                "-A EBPF-PROXY-POSTROUTING -j MARK --set-xmark 0x0/0x1000",
                "-A EBPF-PROXY-POSTROUTING -m comment --comment \"ebpf-proxy service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            ]
        );
    }

    #[test]
    fn rules_in_place_need_nothing_and_a_flush_is_seen() {
        let rules = super::rules(0x4000);
        assert_eq!(inspect(&dump(&rules, 1), &rules).problem(), None);
        // `iptables -t nat -F EBPF-PROXY-POSTROUTING`.
        let flushed: Vec<String> = rules.iter().take(1).cloned().collect();
        assert_eq!(
            inspect(&dump(&flushed, 1), &rules).problem().as_deref(),
            Some("their rules differ")
        );
        assert!(inspect(&dump(&rules, 0), &rules).problem().is_some());
        assert!(inspect(&dump(&rules, 2), &rules).problem().is_some());
        assert!(inspect("*filter\nCOMMIT\n", &rules).problem().is_some());
    }

    #[test]
    fn the_script_adds_one_jump_or_removes_extra_ones_and_flushes_only_ours() {
        let rules = super::rules(0x4000);
        let text = script(&rules, &[]);
        assert!(
            text.starts_with(
                "*nat\n:EBPF-PROXY-MARK-MASQ - [0:0]\n:EBPF-PROXY-POSTROUTING - [0:0]\n"
            )
        );
        assert!(text.contains("-I POSTROUTING 1 -m comment"));
        assert!(
            !text.contains(":POSTROUTING"),
            "POSTROUTING is never flushed"
        );
        let jump = "POSTROUTING -m comment --comment \"ebpf-proxy postrouting rules\" -j EBPF-PROXY-POSTROUTING".to_owned();
        let text = script(&rules, &[jump.clone(), jump.clone(), jump]);
        assert_eq!(text.matches("-D POSTROUTING").count(), 2);
        assert!(!text.contains("-I POSTROUTING"));
    }

    #[test]
    fn cleanup_removes_our_chains_and_jump_only() {
        let removal = removal_script(&dump(&rules(0x4000), 1), is_ours);
        assert_eq!(
            removal.text,
            "*nat\n-D POSTROUTING -m comment --comment \"ebpf-proxy postrouting rules\" -j EBPF-PROXY-POSTROUTING\n\
             :EBPF-PROXY-MARK-MASQ - [0:0]\n:EBPF-PROXY-POSTROUTING - [0:0]\n\
             -X EBPF-PROXY-MARK-MASQ\n-X EBPF-PROXY-POSTROUTING\nCOMMIT\n"
        );
    }

    #[test]
    fn each_family_uses_the_commands_of_the_one_back_end() {
        assert_eq!(
            Mode::Legacy.commands(Family::V6),
            ("ip6tables-legacy-save", "ip6tables-legacy-restore")
        );
        assert_eq!(
            Mode::Nft.commands(Family::V6),
            ("ip6tables-nft-save", "ip6tables-nft-restore")
        );
        assert_eq!(
            Mode::Plain.commands(Family::V6),
            ("ip6tables-save", "ip6tables-restore")
        );
        assert_eq!(
            Mode::Nft.commands(Family::V4),
            ("iptables-nft-save", "iptables-nft-restore")
        );
    }

    #[test]
    fn the_back_end_is_chosen_as_iptables_wrapper_does() {
        let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        let busy = "*filter\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n";
        assert_eq!(choose_mode(hint, busy), Mode::Nft, "nft's hint first");
        assert_eq!(choose_mode(busy, hint), Mode::Legacy);
        assert_eq!(choose_mode("", busy), Mode::Legacy, "more legacy rules");
        assert_eq!(choose_mode(busy, ""), Mode::Nft);
        assert_eq!(choose_mode("", ""), Mode::Nft, "nft when nothing tells");
    }
}
