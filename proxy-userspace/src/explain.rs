//! `proxy-userspace explain ADDR:PORT`: what happens to a connection from
//! this node to that address, and why.
//!
//! The verdict is the datapath's (the pinned maps decide what a socket
//! gets); the reasons are the source's objects as the agent's model reads
//! them. Where the two disagree, both are shown: that is drift, and
//! `doctor` names it too.

use std::{fmt::Write as _, net::SocketAddr};

use serde::Serialize;

use crate::{
    doctor::snapshot::Snapshot,
    listing,
    maps::Pins,
    model::{
        L4Addr, Protocol,
        candidates::{Candidate, Claim, Condition, Exclusion},
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
    address: SocketAddr,
    protocol: Protocol,
    snapshot: &Snapshot,
    pins: &Pins,
) -> Explanation {
    let frontend = L4Addr {
        ip: address.ip(),
        port: address.port(),
        protocol,
    };
    let mut notes = Vec::new();
    let key = frontend.host_port();
    let maps = match listing::list_pinned(pins, false, false).map_err(|e| crate::report::chain(&e))
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
    let desired_backends: Option<Vec<String>> =
        desired.map(|d| d.backends.iter().map(L4Addr::host_port).collect());
    let endpoints = owner
        .map(|claim| claim.candidates.iter().map(|c| view(c, claim)).collect())
        .unwrap_or_default();
    for service in model.proxied_load_balancer_ip(frontend.ip) {
        notes.push(format!(
            "{} is a load-balancer IP of Service {service} with ipMode Proxy: not programmed, \
             so connections go to the load balancer, which reaches the Service through its \
             NodePort (as kube-proxy 1.30+ does)",
            frontend.ip
        ));
    }
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
    if let Some(ranges) = model
        .external()
        .frontends
        .get(&frontend)
        .and_then(|outside| outside.source_ranges.as_deref())
    {
        notes.push(source_ranges_note(ranges));
    }
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

/// What loadBalancerSourceRanges do to connections from outside the node.
fn source_ranges_note(ranges: &[crate::model::Cidr]) -> String {
    let mine = "this node's own sockets are not restricted";
    if ranges.is_empty() {
        return format!(
            "loadBalancerSourceRanges lists no usable range of this family: from outside the \
             node, every client's new connections are dropped; {mine}"
        );
    }
    let ranges: Vec<String> = ranges.iter().map(ToString::to_string).collect();
    format!(
        "loadBalancerSourceRanges: from outside the node, a client outside {} has its new \
         connections dropped; {mine}",
        ranges.join(", ")
    )
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
    // Ready endpoints a rule passed over do not hold back terminating ones.
    let ready_exists = claim
        .candidates
        .iter()
        .any(|c| c.condition == Condition::Ready && c.excluded.is_none());
    let others_on_other_nodes = claim
        .candidates
        .iter()
        .any(|c| c.excluded == Some(Exclusion::OtherNode));
    let why = match (candidate.condition, candidate.chosen, candidate.excluded) {
        (Condition::Ready, true, _) => "ready".to_owned(),
        (Condition::Terminating, true, _) if others_on_other_nodes => {
            "terminating but serving, and no endpoint of this node is ready: kept as a fallback"
                .to_owned()
        }
        (Condition::Terminating, true, _) => {
            "terminating but serving, and no endpoint is ready: kept as a fallback".to_owned()
        }
        (_, false, Some(Exclusion::OtherNode)) => {
            "not on this node: internalTrafficPolicy Local uses only this node's endpoints"
                .to_owned()
        }
        (_, false, Some(Exclusion::HintedForOtherNodes)) => {
            "hinted for other nodes: trafficDistribution PreferSameNode keeps traffic on the node \
             when an endpoint is hinted for it"
                .to_owned()
        }
        (_, false, Some(Exclusion::OtherZone)) => match &claim.hinted_zone {
            Some(zone) => format!(
                "not hinted for this node's zone {zone}: topology hints keep traffic in the zone"
            ),
            None => "not hinted for this node's zone".to_owned(),
        },
        (Condition::Terminating, false, None) if ready_exists => {
            "terminating: used only while no endpoint is ready, and some are".to_owned()
        }
        (Condition::NotReady, false, None) => "not ready and not serving".to_owned(),
        (Condition::ServiceAddress, _, _) => {
            "its address is a Service's ClusterIP, which no pod can have: refused".to_owned()
        }
        (_, true, _) => "chosen".to_owned(),
        (_, false, _) => "not among the frontend's backends".to_owned(),
    };
    EndpointView {
        slice: candidate.slice.to_string(),
        backend: candidate.backend.host_port(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Model, ModelConfig},
        source::{Change, NodeObject, manifests::changes_of},
    };

    /// What `explain 10.96.0.10:80` says of each endpoint on node-1, in
    /// zone-a, with no datapath: backend, candidate, why.
    fn reasons(spec: &str, endpoints: &str) -> Vec<(String, bool, String)> {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80}}]{spec}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
        );
        let mut model = Model::new(ModelConfig {
            node_name: "node-1".to_owned(),
            ..ModelConfig::default()
        });
        for change in changes_of("test.yaml", &yaml).unwrap() {
            model.apply(change);
        }
        model.apply(Change::Node(Some(NodeObject {
            name: "node-1".to_owned(),
            zone: Some("zone-a".to_owned()),
            ..NodeObject::default()
        })));
        model.recompute();
        let snapshot = Snapshot {
            model,
            complete: true,
            error: None,
        };
        let explanation = explain(
            "10.96.0.10:80".parse().unwrap(),
            Protocol::Tcp,
            &snapshot,
            &Pins::new("/nonexistent/ebpf-proxy"),
        );
        explanation
            .endpoints
            .into_iter()
            .map(|e| (e.backend, e.candidate, e.why))
            .collect()
    }

    #[test]
    fn an_endpoint_on_another_node_under_local_policy_says_so() {
        let found = reasons(
            ", internalTrafficPolicy: Local",
            "- {addresses: [10.244.0.10], nodeName: node-1}\n\
             - {addresses: [10.244.0.11], nodeName: node-2}\n\
             - {addresses: [10.244.0.12]}\n",
        );
        assert_eq!(found[0], ("10.244.0.10:8080".into(), true, "ready".into()));
        for (backend, candidate, why) in &found[1..] {
            assert!(!candidate, "{backend}");
            assert!(
                why.contains("not on this node") && why.contains("internalTrafficPolicy Local"),
                "{backend}: {why}"
            );
        }
        // Another node's ready endpoint does not keep this node's
        // terminating one from serving.
        let found = reasons(
            ", internalTrafficPolicy: Local",
            "- {addresses: [10.244.0.10], nodeName: node-1, \
                conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.244.0.11], nodeName: node-2}\n",
        );
        assert!(found[0].1, "{found:?}");
        assert!(
            found[0].2.contains("no endpoint of this node is ready"),
            "{found:?}"
        );
    }

    #[test]
    fn an_endpoint_hinted_for_another_zone_says_so() {
        let found = reasons(
            "",
            "- {addresses: [10.244.0.10], hints: {forZones: [{name: zone-a}]}}\n\
             - {addresses: [10.244.0.11], hints: {forZones: [{name: zone-b}]}}\n\
             - {addresses: [10.244.0.12], conditions: {ready: false}}\n",
        );
        assert_eq!(
            found,
            [
                ("10.244.0.10:8080".into(), true, "ready".into()),
                (
                    "10.244.0.11:8080".into(),
                    false,
                    "not hinted for this node's zone zone-a: topology hints keep traffic in the zone"
                        .into()
                ),
                (
                    "10.244.0.12:8080".into(),
                    false,
                    "not ready and not serving".into()
                ),
            ]
        );
    }
}
