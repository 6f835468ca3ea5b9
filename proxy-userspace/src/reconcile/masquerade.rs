//! The iptables masquerade fallback: two chains of our own that mirror
//! kube-proxy's KUBE-MARK-MASQ and KUBE-POSTROUTING. The datapath marks
//! packets that need SNAT (externalTrafficPolicy Cluster from outside, and
//! so on); POSTROUTING masquerades the marked ones and clears the mark.
//!
//! - Written in one `iptables-restore --noflush -w` transaction, so no
//!   half-written state is ever visible and nobody else's rules are
//!   touched: declaring our chains flushes only them.
//! - On the iptables back end the node already uses, detected as kube-proxy's
//!   iptables-wrapper does: kubelet's hint chains in iptables-nft, then in
//!   iptables-legacy; failing both, whichever holds more rules (the older
//!   wrapper's rule); nft when all is empty.
//! - Checked on the loop's timer (`--iptables-sync-period`) and rewritten,
//!   with a log line, when someone flushed or changed them.
//! - Removed by `cleanup`, in both back ends, with the jump to them; but
//!   kept while another agent runs in the network namespace (its lock, an
//!   abstract socket, is the namespace's): the chains are the node's, and
//!   that agent's programs mark packets for them.
//! - No iptables at all: one warning naming the package, and everything else
//!   keeps working.

use std::{
    fmt::{self, Write as _},
    path::PathBuf,
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

fn is_ours(chain: &str) -> bool {
    chain == MARK_CHAIN || chain == POSTROUTING_CHAIN
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
    const fn commands(self) -> (&'static str, &'static str) {
        match self {
            Self::Legacy => ("iptables-legacy-save", "iptables-legacy-restore"),
            Self::Nft => ("iptables-nft-save", "iptables-nft-restore"),
            Self::Plain => ("iptables-save", "iptables-restore"),
        }
    }
}

/// A back end's save and restore commands.
#[derive(Clone, Debug)]
struct Backend {
    mode: Mode,
    save: PathBuf,
    restore: PathBuf,
}

impl Backend {
    fn find(mode: Mode) -> Option<Self> {
        let (save, restore) = mode.commands();
        Some(Self {
            mode,
            save: program(save)?,
            restore: program(restore)?,
        })
    }

    fn save(&self) -> Result<String, IptablesError> {
        // Never `-t`: iptables-legacy would create the table to list it.
        iptables::run(&self.save, &[], None)
    }

    fn restore(&self, script: &str) -> Result<String, IptablesError> {
        iptables::run(&self.restore, &["--noflush", "-w"], Some(script))
    }

    /// The back end the node uses, or `None` when iptables is not installed.
    fn detect() -> Option<Self> {
        let (legacy, nft) = (Self::find(Mode::Legacy), Self::find(Mode::Nft));
        match (legacy, nft) {
            (Some(legacy), Some(nft)) => {
                let dumps = |backend: &Self, v6: &str| {
                    let mut text = backend.save().unwrap_or_default();
                    if let Some(v6) = program(v6) {
                        text.push_str(&iptables::run(&v6, &[], None).unwrap_or_default());
                    }
                    text
                };
                let mode = choose_mode(
                    &dumps(&nft, "ip6tables-nft-save"),
                    &dumps(&legacy, "ip6tables-legacy-save"),
                );
                Some(if mode == Mode::Legacy { legacy } else { nft })
            }
            (Some(only), None) | (None, Some(only)) => Some(only),
            (None, None) => Self::find(Mode::Plain),
        }
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
    /// `None`: iptables is not installed (said once, at start).
    backend: Option<Backend>,
    mark: u32,
    /// Our chains' rules as iptables-save printed them after our last
    /// write: versions of iptables spell a rule differently, and a rule
    /// compared with our own spelling would be "repaired" forever.
    canonical: Option<Vec<String>>,
    installed: bool,
}

impl Masquerade {
    /// Finds the back end; masquerades packets whose mark has bit
    /// `masquerade_bit` set.
    #[must_use]
    pub fn new(masquerade_bit: u8) -> Self {
        let backend = Backend::detect();
        if let Some(backend) = &backend {
            info!(backend = %backend.mode, "iptables back end for the masquerade rules");
        } else {
            warn!(
                "iptables is not installed: the masquerade fallback is off (install the \
                 iptables package, e.g. apt-get install iptables); ClusterIP Services keep working"
            );
        }
        Self {
            backend,
            mark: 1 << masquerade_bit,
            canonical: None,
            installed: false,
        }
    }

    /// Our chains' rules, as we write them.
    fn rules(&self) -> Vec<String> {
        let mark = format!("{:#x}/{:#x}", self.mark, self.mark);
        vec![
            format!("-A {MARK_CHAIN} -j MARK --set-xmark {mark}"),
            format!("-A {POSTROUTING_CHAIN} -m mark ! --mark {mark} -j RETURN"),
            // Cleared, so a packet that is routed back out is not
            // masqueraded twice.
            format!(
                "-A {POSTROUTING_CHAIN} -j MARK --set-xmark 0x0/{:#x}",
                self.mark
            ),
            format!(
                "-A {POSTROUTING_CHAIN} -m comment --comment \"{MASQUERADE_COMMENT}\" -j MASQUERADE --random-fully"
            ),
        ]
    }

    /// Checks one pass: writes the rules when they are missing or differ.
    fn sync(&mut self) -> Result<usize, IptablesError> {
        let Some(backend) = self.backend.clone() else {
            return Ok(0);
        };
        let dump = backend.save()?;
        let expected = self.canonical.clone().unwrap_or_else(|| self.rules());
        let state = inspect(&dump, &expected);
        let Some(reason) = state.problem() else {
            if !self.installed {
                info!(
                    mark = format!("{:#x}", self.mark),
                    "masquerade rules in place"
                );
                self.installed = true;
            }
            return Ok(0);
        };
        backend.restore(&script(&self.rules(), &state.jumps))?;
        if self.installed {
            warn!(%reason, "the masquerade rules were changed by someone else; restored them");
        } else {
            info!(
                backend = %backend.mode,
                mark = format!("{:#x}", self.mark),
                "installed the masquerade rules"
            );
            self.installed = true;
        }
        // Learn how this iptables spells our rules.
        let after = backend.save()?;
        let ours = our_rules(&after);
        if ours.len() == self.rules().len() {
            if ours != self.rules() {
                debug!(?ours, "iptables-save spells our rules differently");
            }
            self.canonical = Some(ours);
        }
        Ok(1)
    }
}

/// What is wrong with the masquerade rules of bit `masquerade_bit` on this
/// node's iptables back end, for `doctor`; `Ok(None)` when they are in
/// place, an error when iptables is missing or cannot be read.
pub fn check(masquerade_bit: u8) -> Result<Option<String>, String> {
    let masquerade = Masquerade {
        backend: Backend::detect(),
        mark: 1 << masquerade_bit,
        canonical: None,
        installed: false,
    };
    let backend = masquerade
        .backend
        .as_ref()
        .ok_or("iptables is not installed")?;
    let dump = backend
        .save()
        .map_err(|error| crate::report::chain(&error))?;
    Ok(inspect(&dump, &masquerade.rules()).problem())
}

impl Masquerade {
    /// The periodic task: the rules do not depend on the Services, so each
    /// period only checks them, and repairs what someone else changed.
    pub fn repair(&mut self) {
        if let Err(error) = self.sync() {
            warn!(error = %crate::report::chain(&error), "cannot write the masquerade rules; retrying next period");
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
/// ends (the node may have switched since), and nothing else.
pub fn cleanup() -> Result<(), IptablesError> {
    let mut found = false;
    for mode in [Mode::Legacy, Mode::Nft] {
        let Some(backend) = Backend::find(mode) else {
            continue;
        };
        found = true;
        let removal = removal_script(&backend.save()?, is_ours);
        if removal.chains.is_empty() && removal.jumps == 0 {
            continue;
        }
        backend.restore(&removal.text)?;
        info!(backend = %mode, chains = removal.chains.len(), "removed the masquerade rules");
    }
    if !found && let Some(backend) = Backend::find(Mode::Plain) {
        let removal = removal_script(&backend.save()?, is_ours);
        if !removal.chains.is_empty() || removal.jumps > 0 {
            backend.restore(&removal.text)?;
            info!("removed the masquerade rules");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masquerade() -> Masquerade {
        Masquerade {
            backend: None,
            mark: 0x4000,
            canonical: None,
            installed: false,
        }
    }

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
        let rules = Masquerade {
            mark: 1 << 12,
            ..masquerade()
        }
        .rules();
        assert_eq!(
            rules,
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
        let rules = masquerade().rules();
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
        let rules = masquerade().rules();
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
        let removal = removal_script(&dump(&masquerade().rules(), 1), is_ours);
        assert_eq!(
            removal.text,
            "*nat\n-D POSTROUTING -m comment --comment \"ebpf-proxy postrouting rules\" -j EBPF-PROXY-POSTROUTING\n\
             :EBPF-PROXY-MARK-MASQ - [0:0]\n:EBPF-PROXY-POSTROUTING - [0:0]\n\
             -X EBPF-PROXY-MARK-MASQ\n-X EBPF-PROXY-POSTROUTING\nCOMMIT\n"
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
