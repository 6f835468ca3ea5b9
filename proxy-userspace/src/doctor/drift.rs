//! Whether the maps hold what the source asks for: each frontend and its
//! backends, compared both ways, in the socket programs' maps and in the
//! tc programs' (NodePorts, externalIPs, load-balancer IPs; named `tc ...`
//! below, since one address may be a frontend of both with other
//! backends).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use super::{Check, Context, Status, snapshot::Snapshot};
use crate::{
    listing::{self, ListedService},
    report::chain,
};

/// A frontend as both sides are compared: its address and its backends.
type Frontends = BTreeMap<String, (String, BTreeSet<String>)>;

/// How the tc programs' frontends are told apart from the sockets'.
const TC: &str = "tc ";

fn listed_frontends(services: &[ListedService]) -> Frontends {
    services
        .iter()
        .map(|s| {
            // The socket programs' kinds are `ClusterIP` and `.../sockets`;
            // the tc programs' name their traffic policy.
            let table = if s.kind == "ClusterIP" || s.kind.ends_with("/sockets") {
                ""
            } else {
                TC
            };
            (
                format!("{table}{}/{}", s.frontend, s.protocol),
                (
                    String::new(),
                    s.backends.iter().map(|b| b.address.clone()).collect(),
                ),
            )
        })
        .collect()
}

fn desired_frontends(snapshot: &Snapshot) -> Frontends {
    let model = &snapshot.model;
    let sockets = model.desired().frontends.iter().map(|f| ("", f));
    let tc = model.tc_desired().frontends.iter().map(|f| (TC, f));
    sockets
        .chain(tc)
        .map(|(table, (frontend, desired))| {
            (
                format!("{table}{frontend}"),
                (
                    desired.service.clone(),
                    desired
                        .backends
                        .iter()
                        .map(crate::model::L4Addr::host_port)
                        .collect(),
                ),
            )
        })
        .collect()
}

/// What differs between the source and the maps, one line per frontend.
fn differences(desired: &Frontends, held: &Frontends, complete: bool) -> Vec<String> {
    let list = |set: &BTreeSet<String>| {
        if set.is_empty() {
            "none (refuses)".to_owned()
        } else {
            set.iter().cloned().collect::<Vec<_>>().join(", ")
        }
    };
    let mut lines = Vec::new();
    for (frontend, (service, backends)) in desired {
        match held.get(frontend) {
            None => lines.push(format!(
                "missing {frontend} ({service}): the source has backends {}, the maps nothing",
                list(backends)
            )),
            Some((_, held)) if held != backends => lines.push(format!(
                "stale {frontend} ({service}): the maps have {}, the source {}",
                list(held),
                list(backends)
            )),
            Some(_) => {}
        }
    }
    for (frontend, (_, backends)) in held {
        if !desired.contains_key(frontend) {
            let why = if complete {
                "no Service asks for it"
            } else {
                "no Service that could be read asks for it"
            };
            lines.push(format!(
                "extra {frontend}: the maps have {}; {why}",
                list(backends)
            ));
        }
    }
    lines
}

pub(super) fn drift(cx: &Context, snapshot: Option<&Snapshot>) -> Check {
    const NAME: &str = "drift";
    let Some(snapshot) = snapshot else {
        return Check::problem(
            NAME,
            Status::Warn,
            "not compared: the source could not be read (see the source check)",
            "fix the source first",
        );
    };
    let read_maps = || -> Result<Frontends, String> {
        Ok(listed_frontends(
            &listing::list_pinned(&cx.pins, false, true).map_err(|e| chain(&e))?,
        ))
    };
    let desired = desired_frontends(snapshot);
    let mut found = match read_maps() {
        Ok(held) => differences(&desired, &held, snapshot.complete),
        Err(error) => {
            return Check::problem(
                NAME,
                Status::Fail,
                format!("cannot read the maps: {error}"),
                cx.restart.clone(),
            );
        }
    };
    // A running agent may be writing a change right now: only what still
    // differs a moment later is drift.
    if !found.is_empty() && cx.holder.is_some() {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(held) = read_maps() {
            let again: BTreeSet<String> = differences(&desired, &held, snapshot.complete)
                .into_iter()
                .collect();
            found.retain(|line| again.contains(line));
        }
    }
    if found.is_empty() {
        return Check::ok(
            NAME,
            format!(
                "the maps hold the {} frontends of the source, with the same backends",
                desired.len()
            ),
        );
    }
    let count = |kind: &str| found.iter().filter(|l| l.starts_with(kind)).count();
    let (missing, stale, extra) = (count("missing"), count("stale"), count("extra"));
    let status = if missing + stale == 0 && !snapshot.complete {
        // Kept on purpose while a file does not parse.
        Status::Warn
    } else {
        Status::Fail
    };
    let fix = if cx.holder.is_some() {
        format!(
            "the agent's view of the maps is out of step with them (changed behind its back?); {}: it reads the maps again and rewrites what differs",
            cx.restart
        )
    } else {
        format!("{}: it rewrites what differs", cx.restart)
    };
    Check::problem(
        NAME,
        status,
        format!(
            "{} of {} frontends differ from the source: {missing} missing, {stale} stale, {extra} extra",
            found.len(),
            desired.len() + extra
        ),
        fix,
    )
    .with_details(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontends(entries: &[(&str, &[&str])]) -> Frontends {
        entries
            .iter()
            .map(|(f, b)| {
                (
                    (*f).to_owned(),
                    (
                        "default/web".to_owned(),
                        b.iter().map(|s| (*s).to_owned()).collect(),
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn the_tc_programs_frontends_are_kept_apart_from_the_sockets() {
        let listed = |kind: &str| ListedService {
            frontend: "192.168.100.11:30080".to_owned(),
            protocol: "TCP".to_owned(),
            kind: kind.to_owned(),
            affinity_seconds: None,
            source_ranges: None,
            translations: None,
            backends: Vec::new(),
        };
        let keys: Vec<String> =
            listed_frontends(&[listed("NodePort/sockets"), listed("NodePort/Local")])
                .into_keys()
                .collect();
        assert_eq!(
            keys,
            ["192.168.100.11:30080/TCP", "tc 192.168.100.11:30080/TCP"]
        );
    }

    #[test]
    fn each_frontend_is_missing_stale_or_extra() {
        let desired = frontends(&[
            ("10.96.0.10:80/TCP", &["10.244.0.10:8080"]),
            ("10.96.0.11:80/TCP", &["10.244.0.10:8080"]),
            ("10.96.0.12:80/TCP", &[]),
        ]);
        let held = frontends(&[
            ("10.96.0.10:80/TCP", &["10.244.0.10:8080"]),
            ("10.96.0.12:80/TCP", &["<missing>"]),
            ("10.96.0.13:53/UDP", &["10.244.0.11:53"]),
        ]);
        let lines = differences(&desired, &held, true);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("missing 10.96.0.11:80/TCP"));
        assert!(lines[1].starts_with("stale 10.96.0.12:80/TCP"));
        assert!(lines[1].contains("<missing>") && lines[1].contains("none (refuses)"));
        assert!(lines[2].starts_with("extra 10.96.0.13:53/UDP"));
        assert!(differences(&desired, &desired, true).is_empty());
    }
}
