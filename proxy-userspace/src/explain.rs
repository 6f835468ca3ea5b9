//! `proxy-userspace explain ADDR:PORT`: what happens to a connection from
//! this node to that address, and why.
//!
//! The verdict is the datapath's (the pinned maps decide what a socket
//! gets); the reasons are the source's objects as the agent's model reads
//! them. Where the two disagree, both are shown: that is drift, and
//! `doctor` names it too.

use std::{fmt::Write as _, net::SocketAddrV4};

use serde::Serialize;

use crate::{
    doctor::snapshot::Snapshot,
    listing,
    maps::{self, Pins},
    model::{
        L4Addr, Protocol,
        candidates::{Candidate, Claim, Condition},
    },
};

/// What the datapath does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Rewritten to one of the backends, chosen uniformly at random.
    Forwarded,
    /// connect() fails at once with ECONNREFUSED (no endpoints).
    Refused,
    /// Not a frontend in the maps: the socket is left alone.
    Untouched,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub frontend: String,
    pub verdict: Verdict,
    /// The verdict in a sentence.
    pub summary: String,
    /// `namespace/name:port` of the Service holding the frontend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub endpoints: Vec<EndpointView>,
    /// The backends the maps hold, in slot order; `None` when the maps
    /// have no such frontend.
    pub maps: Option<Vec<String>>,
    /// Other facts: drift, other claimants, skipped objects.
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub slice: String,
    pub backend: String,
    pub condition: &'static str,
    pub candidate: bool,
    pub why: String,
}

/// Explains `address` with the desired state of `snapshot` and the maps at
/// `pins` (which may be missing: then nothing is translated).
#[must_use]
pub fn explain(
    address: SocketAddrV4,
    protocol: Protocol,
    snapshot: &Snapshot,
    pins: &Pins,
) -> Explanation {
    let frontend = L4Addr {
        ip: *address.ip(),
        port: address.port(),
        protocol,
    };
    let mut notes = Vec::new();
    let key = format!("{}:{}", frontend.ip, frontend.port);
    let maps = match maps::open_pinned(pins)
        .map_err(|e| crate::report::chain(&e))
        .and_then(|maps| listing::list(&maps, None).map_err(|e| crate::report::chain(&e)))
    {
        Ok(listed) => listed
            .into_iter()
            .find(|s| s.frontend == key && s.protocol == protocol.to_string())
            .map(|s| {
                s.backends
                    .into_iter()
                    .map(|b| b.address)
                    .collect::<Vec<_>>()
            }),
        Err(error) => {
            notes.push(format!(
                "no datapath to ask at {} ({error}): nothing is translated",
                pins.root().display()
            ));
            None
        }
    };
    let model = &snapshot.model;
    let claims = model.claims_of(frontend);
    let owner = claims.iter().find(|c| c.owner);
    for claim in claims.iter().filter(|c| !c.owner) {
        notes.push(format!(
            "Service {} asks for the same frontend too, but {} is older and keeps it",
            claim.service,
            owner.map_or_else(|| "another".to_owned(), |o| o.service.to_string())
        ));
    }
    let desired = model.desired().frontends.get(&frontend);
    let desired_backends: Option<Vec<String>> = desired.map(|d| {
        d.backends
            .iter()
            .map(|b| format!("{}:{}", b.ip, b.port))
            .collect()
    });
    let endpoints = owner
        .map(|claim| claim.candidates.iter().map(|c| view(c, claim)).collect())
        .unwrap_or_default();
    if owner.is_none() {
        for (service, frontends) in model.services_at(frontend.ip) {
            let ports: Vec<String> = frontends.iter().map(ToString::to_string).collect();
            notes.push(format!(
                "{} is the ClusterIP of Service {service}, which serves {}, not {frontend}",
                frontend.ip,
                if ports.is_empty() {
                    "no port".to_owned()
                } else {
                    ports.join(", ")
                }
            ));
        }
    }
    let ip = frontend.ip.to_string();
    for problem in model.problems() {
        if problem.message.contains(&ip)
            || owner.is_some_and(|o| problem.object == format!("Service {}", o.service))
        {
            notes.push(format!("skipped by the agent: {problem}"));
        }
    }
    notes.extend(drift(maps.as_ref(), desired_backends.as_ref(), pins));
    let (verdict, summary) = verdict(frontend, maps.as_ref());
    Explanation {
        frontend: frontend.to_string(),
        verdict,
        summary,
        service: desired.map(|d| d.service.clone()),
        endpoints,
        maps,
        notes,
    }
}

/// Where the maps and the source disagree on this frontend.
fn drift(maps: Option<&Vec<String>>, desired: Option<&Vec<String>>, pins: &Pins) -> Option<String> {
    match (maps, desired) {
        (Some(held), Some(wanted)) => {
            let mut sorted = held.clone();
            sorted.sort();
            (&sorted != wanted).then(|| {
                format!(
                    "drift: the maps hold [{}] but the source asks for [{}]; run `proxy-userspace doctor`",
                    held.join(", "),
                    wanted.join(", ")
                )
            })
        }
        (Some(_), None) => Some(
            "drift: the maps hold this frontend but no Service asks for it; run `proxy-userspace doctor`"
                .to_owned(),
        ),
        (None, Some(_)) if pins.root().exists() => Some(
            "drift: a Service asks for this frontend but the maps do not hold it; run `proxy-userspace doctor`"
                .to_owned(),
        ),
        _ => None,
    }
}

/// What the maps make of a connection to `frontend`.
fn verdict(frontend: L4Addr, maps: Option<&Vec<String>>) -> (Verdict, String) {
    match maps {
        Some(held) if held.is_empty() => (
            Verdict::Refused,
            format!(
                "connect() to {frontend} is refused at once (ECONNREFUSED): the Service has no ready or serving endpoint"
            ),
        ),
        Some(held) => (
            Verdict::Forwarded,
            format!(
                "a connection to {frontend} goes to one of {} backends, chosen at random per connection: {}",
                held.len(),
                held.join(", ")
            ),
        ),
        None => (
            Verdict::Untouched,
            format!("{frontend} is not a Service frontend: connections to it pass untouched"),
        ),
    }
}

fn view(candidate: &Candidate, claim: &Claim) -> EndpointView {
    let ready_exists = claim
        .candidates
        .iter()
        .any(|c| c.condition == Condition::Ready);
    let why = match (candidate.condition, candidate.chosen) {
        (Condition::Ready, true) => "ready".to_owned(),
        (Condition::Terminating, true) => {
            "terminating but serving, and no endpoint is ready: kept as a fallback".to_owned()
        }
        (Condition::Terminating, false) if ready_exists => {
            "terminating: used only while no endpoint is ready, and some are".to_owned()
        }
        (Condition::NotReady, false) => "not ready and not serving".to_owned(),
        (Condition::ServiceAddress, _) => {
            "its address is a Service's ClusterIP, which no pod can have: refused".to_owned()
        }
        (_, true) => "chosen".to_owned(),
        (_, false) => "not among the frontend's backends".to_owned(),
    };
    EndpointView {
        slice: candidate.slice.to_string(),
        backend: format!("{}:{}", candidate.backend.ip, candidate.backend.port),
        condition: candidate.condition.describe(),
        candidate: candidate.chosen,
        why,
    }
}

impl Explanation {
    /// For people: the verdict, the Service, each endpoint and the notes.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = format!("{}\n", self.summary);
        if let Some(service) = &self.service {
            let _ = writeln!(out, "Service: {service}");
        }
        if !self.endpoints.is_empty() {
            let _ = writeln!(out, "Endpoints:");
        }
        for endpoint in &self.endpoints {
            let _ = writeln!(
                out,
                "  {:<21} {:<13} {} ({}, slice {})",
                endpoint.backend,
                if endpoint.candidate {
                    "candidate"
                } else {
                    "not candidate"
                },
                endpoint.why,
                endpoint.condition,
                endpoint.slice
            );
        }
        if let Some(maps) = &self.maps {
            let _ = writeln!(
                out,
                "The maps hold: {}",
                if maps.is_empty() {
                    "no backends (connections are refused)".to_owned()
                } else {
                    maps.join(", ")
                }
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "Note: {note}");
        }
        out
    }
}
