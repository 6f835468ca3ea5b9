//! `proxy-userspace doctor`: the troubleshooting checklist of a Service
//! proxy as one command. Each check says OK, WARN or FAIL, with one line
//! of evidence and, for a problem, the command that fixes it.
//!
//! The output has a fixed order of checks and no timestamps; what changes
//! from one run to the next on the same node (pids, ages, counters, how full
//! a map is, kernel object ids) is kept apart from the evidence as its
//! volatile facts, which the JSON leaves out unless asked, so the JSON of
//! two nodes diffs cleanly. The exit status is 1 on any FAIL, so it can
//! serve as a probe or a cron job. Nothing on the node is changed: the
//! maps are read through the same readers as `services` and `stats`, the
//! desired state through the agent's own source and model; the one thing
//! made is the kernel check's trial load of the programs, with small
//! unpinned maps, all unloaded when it ends.
//!
//! One file per group of checks; this one holds what they share (the
//! verdict types, the facts read once) and the fixed order they run in.

use std::{fmt::Write as _, net::SocketAddr, path::PathBuf};

use clap::Args;
use serde::Serialize;

use crate::{config::PinDir, maps::Pins};

mod agent;
mod drift;
mod kernel;
mod kube_proxy;
mod maps;
mod masquerade;
mod netfilter;
mod programs;
pub mod snapshot;
mod source;
mod xtables_lock;

use snapshot::SourceArgs;

/// `proxy-userspace doctor`.
#[derive(Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub pins: PinDir,
    /// The cgroup the programs should be attached to (the agent's --cgroup).
    /// Default: the cgroup2 root.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Where the agent serves /healthz (its --healthz-bind-address)
    /// [default: the running agent's, else 127.0.0.1:10256].
    #[arg(long, value_name = "IP:PORT")]
    pub healthz_address: Option<SocketAddr>,
    /// The mark bit the agent masquerades (its --iptables-masquerade-bit)
    /// [default: the running agent's, else 14].
    #[arg(long, value_name = "0-31", value_parser = clap::value_parser!(u8).range(0..32))]
    pub iptables_masquerade_bit: Option<u8>,
    /// The source to compare the maps with [default: the running agent's].
    #[command(flatten)]
    pub source: SourceArgs,
}

/// The settings the checks use: the flags, else the running agent's
/// record, else the defaults.
struct Settings {
    cgroup: Option<PathBuf>,
    healthz_address: SocketAddr,
    masquerade_bit: u8,
    source: SourceArgs,
    /// The model's settings for `source`, the agent's NodePort settings
    /// among them.
    model: crate::model::ModelConfig,
    /// Where they came from, for the agent check.
    origin: String,
}

impl Settings {
    fn of(args: &DoctorArgs, pins: &Pins) -> Self {
        let running = crate::agent_record::running(pins);
        let record = match &running {
            crate::agent_record::Running::Agent(record) => Some(record),
            _ => None,
        };
        let source = record.map_or_else(|| args.source.clone(), |r| r.source(&args.source));
        let model = record.map_or_else(|| source.model_config(), |r| r.model_config(&source));
        Self {
            cgroup: args
                .cgroup
                .clone()
                .or_else(|| record.map(|r| r.cgroup.clone())),
            healthz_address: args
                .healthz_address
                .or_else(|| record.map(|r| r.healthz_address()))
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 10256))),
            masquerade_bit: args
                .iptables_masquerade_bit
                .or_else(|| record.map(|r| r.masquerade_bit))
                .unwrap_or(14),
            source,
            model,
            origin: running.origin(pins),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Status {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "FAIL")]
    Fail,
}

impl Status {
    const fn label(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        }
    }
}

/// One check's verdict.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub evidence: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The items behind the evidence (frontends that differ, chains
    /// found), sorted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    /// What changes between two runs on the same node, or differs between
    /// two healthy nodes: pids, ages, counters, fills, kernel object ids.
    /// Kept out of the evidence, and out of the JSON unless `--verbose`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volatile: Vec<String>,
}

impl Check {
    fn ok(name: &'static str, evidence: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            evidence: evidence.into(),
            fix: None,
            details: Vec::new(),
            volatile: Vec::new(),
        }
    }

    fn problem(
        name: &'static str,
        status: Status,
        evidence: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name,
            status,
            evidence: evidence.into(),
            fix: Some(fix.into()),
            details: Vec::new(),
            volatile: Vec::new(),
        }
    }

    fn with_details(mut self, mut details: Vec<String>) -> Self {
        details.sort();
        self.details = details;
        self
    }

    /// `volatile` in the order given: the evidence's figures, as it reads.
    fn with_volatile(mut self, volatile: Vec<String>) -> Self {
        self.volatile = volatile;
        self
    }
}

/// Every check, in their fixed order.
#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    #[must_use]
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// The report without its volatile facts: what two nodes, or two runs,
    /// are compared by.
    #[must_use]
    pub fn without_volatile(mut self) -> Self {
        for check in &mut self.checks {
            check.volatile.clear();
        }
        self
    }

    /// One line per check, its volatile facts in brackets after the
    /// evidence, its details and fix indented below it.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = String::new();
        for check in &self.checks {
            let _ = write!(
                out,
                "{:<5} {:<13} {}",
                check.status.label(),
                check.name,
                check.evidence
            );
            if check.volatile.is_empty() {
                out.push('\n');
            } else {
                let _ = writeln!(out, " [{}]", check.volatile.join(", "));
            }
            for detail in &check.details {
                let _ = writeln!(out, "{:20}{detail}", "");
            }
            if let Some(fix) = &check.fix {
                let _ = writeln!(out, "{:20}fix: {fix}", "");
            }
        }
        out
    }
}

/// What the checks share: the node's facts, read once.
struct Context<'a> {
    args: &'a Settings,
    pins: Pins,
    holder: Option<u32>,
    /// How to start or restart the agent here.
    restart: String,
}

/// Runs every check.
pub async fn run(args: &DoctorArgs) -> Report {
    let pins = args.pins.pins();
    let settings = Settings::of(args, &pins);
    let args = &settings;
    let holder = pins.holder();
    // No pid here: the fix is in the JSON, which has none (the agent
    // check's volatile facts give it).
    let restart = match holder {
        Some(_) => "restart the agent: `kubectl -n kube-system delete pod` of the ebpf-proxy pod on this node, or kill it (its pid is the agent check's) and start `proxy-userspace run` again".to_owned(),
        None => format!(
            "start the agent: `proxy-userspace run --bpffs {}` (or check the ebpf-proxy DaemonSet pod on this node)",
            pins.root().display()
        ),
    };
    let cx = Context {
        args,
        pins,
        holder,
        restart,
    };
    // The source is read first: the drift check compares the maps with it.
    let (source_check, snapshot) = source::source(&cx).await;
    let checks = vec![
        agent::agent(&cx),
        agent::sync(&cx).await,
        source_check,
        kernel::kernel(&cx),
        programs::programs(&cx),
        masquerade::masquerade(&cx),
        netfilter::netfilter(&cx),
        xtables_lock::xtables_lock(),
        drift::drift(&cx, snapshot.as_ref()),
        kube_proxy::kube_proxy(),
        programs::shared_hooks(&cx),
        maps::maps(&cx),
        maps::counters(&cx),
    ];
    Report { checks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_has_a_fixed_shape_and_no_time() {
        let report = Report {
            checks: vec![
                Check::ok("agent", "x"),
                Check::problem("drift", Status::Fail, "y", "z")
                    .with_details(vec!["b".into(), "a".into()]),
            ],
        };
        assert!(report.failed());
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            r#"{"checks":[{"name":"agent","status":"OK","evidence":"x"},{"name":"drift","status":"FAIL","evidence":"y","fix":"z","details":["a","b"]}]}"#
        );
    }

    #[test]
    fn volatile_facts_are_in_the_table_and_the_verbose_json_only() {
        let report = Report {
            checks: vec![Check::ok("agent", "x holds y").with_volatile(vec!["pid 7".into()])],
        };
        assert_eq!(report.table(), "OK    agent         x holds y [pid 7]\n");
        assert!(
            serde_json::to_string(&report)
                .unwrap()
                .ends_with(r#""volatile":["pid 7"]}]}"#)
        );
        assert_eq!(
            serde_json::to_string(&report.without_volatile()).unwrap(),
            r#"{"checks":[{"name":"agent","status":"OK","evidence":"x holds y"}]}"#
        );
    }
}
