//! Why each endpoint of a frontend is, or is not, one of its backends: the
//! model's side of `explain`.
//!
//! The verdict on each endpoint is read from the desired state itself (is
//! it among the frontend's backends?); the reasons are the endpoint's
//! conditions and the rule of the Service that passed it over, if one did
//! (internalTrafficPolicy Local, topology hints), taken from the same
//! rules the desired state is computed with.

use std::net::IpAddr;

use super::{CheckedEndpoint, Hinted, IpFamily, L4Addr, Model, Readiness, Selection, frontend};
use crate::source::{ObjectName, ServiceObject};

/// What an endpoint's conditions say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Ready and not terminating.
    Ready,
    /// Terminating but still serving: used only while nothing is ready.
    Terminating,
    /// Neither ready nor serving.
    NotReady,
    /// At a Service's ClusterIP, which no pod can have: never used.
    ServiceAddress,
}

impl Condition {
    #[must_use]
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Terminating => "terminating, still serving",
            Self::NotReady => "not ready",
            Self::ServiceAddress => "a Service's ClusterIP",
        }
    }
}

/// Why a Service's selection rules pass over an endpoint whatever its
/// condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exclusion {
    /// internalTrafficPolicy Local, and the endpoint's nodeName is not this
    /// node (or it has none).
    OtherNode,
    /// Topology hints narrow the ready endpoints to those for this node's
    /// zone ([`Claim::hinted_zone`]), and this ready one is not hinted for it.
    OtherZone,
    /// Node hints (trafficDistribution PreferSameNode) narrow the ready
    /// endpoints to those for this node, and this ready one is hinted for
    /// other nodes only.
    HintedForOtherNodes,
}

/// One endpoint of one slice of a Service, for one of its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub slice: ObjectName,
    pub backend: L4Addr,
    pub condition: Condition,
    /// Whether the desired state has it among the frontend's backends.
    pub chosen: bool,
    /// The rule that passed it over, if one did. `None` for an endpoint at
    /// a Service's ClusterIP: it is refused before the rules apply.
    pub excluded: Option<Exclusion>,
}

/// A Service that asks for a frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub service: ObjectName,
    /// The Service port's name (empty for an unnamed port).
    pub port_name: String,
    /// Whether this Service holds the frontend (of several claimants, the
    /// oldest does).
    pub owner: bool,
    /// Every endpoint its slices list for the port, in slice and address
    /// order.
    pub candidates: Vec<Candidate>,
    /// This node's zone, when topology hints narrow the port's ready
    /// endpoints to those hinted for it.
    pub hinted_zone: Option<String>,
    /// Whether node hints narrow them to those hinted for this node.
    pub hinted_node: bool,
}

impl Model {
    /// Every Service that asks for `frontend`, the one holding it first.
    #[must_use]
    pub fn claims_of(&self, frontend: L4Addr) -> Vec<Claim> {
        let owner = self.owner(frontend);
        let chosen = self.desired.frontends.get(&frontend);
        let mut claims: Vec<Claim> = self
            .claims
            .get(&frontend)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                let service = &self.services.get(name)?.service.object;
                let ip = self.cluster_ip_of(service, IpFamily::of(frontend.ip))?;
                // Of two ports on one frontend (the API server refuses
                // that, a manifest may not), the desired state serves the
                // last.
                let port = service
                    .ports
                    .iter()
                    .rfind(|p| frontend_of(ip, p) == Some(frontend))?;
                let is_owner = owner.as_ref() == Some(name);
                let (candidates, hinted) = self.candidates(
                    name,
                    self.selection(service),
                    &port.name,
                    frontend,
                    |backend| is_owner && chosen.is_some_and(|f| f.backends.contains(&backend)),
                );
                Some(Claim {
                    service: name.clone(),
                    port_name: port.name.clone(),
                    owner: is_owner,
                    candidates,
                    hinted_zone: match hinted {
                        Some(Hinted::Zone(zone)) => Some(zone.to_owned()),
                        _ => None,
                    },
                    hinted_node: hinted == Some(Hinted::Node),
                })
            })
            .collect();
        claims.sort_by_key(|c| !c.owner);
        claims
    }

    /// The Services whose ClusterIP is `ip`, and their frontends: for an
    /// address that is a Service's but on a port it does not serve.
    #[must_use]
    pub fn services_at(&self, ip: IpAddr) -> Vec<(ObjectName, Vec<L4Addr>)> {
        self.services
            .iter()
            .filter_map(|(name, entry)| {
                let service = &entry.service.object;
                let cluster_ip = self.cluster_ip_of(service, IpFamily::of(ip))?;
                (cluster_ip == ip).then(|| {
                    let ports = service
                        .ports
                        .iter()
                        .filter_map(|p| frontend_of(ip, p))
                        .collect();
                    (name.clone(), ports)
                })
            })
            .collect()
    }

    /// The LoadBalancer Services that list `ip` with ipMode Proxy: this
    /// proxy leaves it to the load balancer.
    #[must_use]
    pub fn proxied_load_balancer_ip(&self, ip: IpAddr) -> Vec<ObjectName> {
        let text = ip.to_string();
        self.services
            .iter()
            .filter(|(_, entry)| {
                let service = &entry.service.object;
                service.type_.as_deref() == Some("LoadBalancer")
                    && service.load_balancer_ingress.iter().any(|ingress| {
                        ingress.ip == text && ingress.ip_mode.as_deref() == Some("Proxy")
                    })
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The Service's valid ClusterIP of `family`, if it has one.
    fn cluster_ip_of(&self, service: &ServiceObject, family: IpFamily) -> Option<IpAddr> {
        self.cluster_ips(service)
            .ok()?
            .into_iter()
            .find(|ip| IpFamily::of(*ip) == family)
    }

    /// The candidates of one Service port, and what hints narrowed them
    /// to, if any.
    fn candidates<'a>(
        &'a self,
        service: &ObjectName,
        selection: Selection<'a>,
        port_name: &str,
        frontend: L4Addr,
        chosen: impl Fn(L4Addr) -> bool,
    ) -> (Vec<Candidate>, Option<Hinted<'a>>) {
        let mut listed = Vec::new();
        for slice_name in self.slices_of.get(service).into_iter().flatten() {
            let Some(slice) = self
                .slices
                .get(slice_name)
                .filter(|slice| slice.family == IpFamily::of(frontend.ip))
            else {
                continue;
            };
            let Some(&(_, _, port)) = slice
                .ports
                .iter()
                .find(|(name, p, _)| name == port_name && *p == frontend.protocol)
            else {
                continue;
            };
            listed.extend(slice.endpoints.iter().map(|e| (slice_name, port, e)));
        }
        let at_service_ip = |e: &CheckedEndpoint| self.service_ips.contains_key(&e.ip);
        // Over the endpoints the desired state was chosen from: those at a
        // Service's address are refused before.
        let hinted = selection.hinted(
            listed
                .iter()
                .map(|&(_, _, e)| e)
                .filter(|e| !at_service_ip(e)),
        );
        let candidates = listed
            .into_iter()
            .map(|(slice_name, port, endpoint)| {
                let backend = L4Addr {
                    ip: endpoint.ip,
                    port,
                    protocol: frontend.protocol,
                };
                let (condition, excluded) = if at_service_ip(endpoint) {
                    (Condition::ServiceAddress, None)
                } else {
                    let condition = match endpoint.readiness {
                        Readiness::Ready => Condition::Ready,
                        Readiness::Terminating => Condition::Terminating,
                        Readiness::Unusable => Condition::NotReady,
                    };
                    (condition, selection.passes_over(endpoint, hinted))
                };
                Candidate {
                    slice: slice_name.clone(),
                    backend,
                    condition,
                    chosen: chosen(backend),
                    excluded,
                }
            })
            .collect();
        (candidates, hinted)
    }
}

fn frontend_of(ip: IpAddr, port: &crate::source::objects::ServicePortObject) -> Option<L4Addr> {
    frontend(ip, port).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{ModelConfig, Protocol, tests::random_change},
        source::{Change, NodeObject, manifests::changes_of},
        testing::XorShift,
    };

    fn model(yaml: &str) -> Model {
        let mut model = Model::new(ModelConfig::default());
        for change in changes_of("test.yaml", yaml).unwrap() {
            model.apply(change);
        }
        model.recompute();
        model
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
        spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n";

    fn slice(endpoints: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
        )
    }

    const WEB: L4Addr = L4Addr {
        ip: IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10)),
        port: 80,
        protocol: Protocol::Tcp,
    };

    fn last_octet(ip: IpAddr) -> u8 {
        match ip {
            IpAddr::V4(ip) => ip.octets()[3],
            IpAddr::V6(ip) => ip.octets()[15],
        }
    }

    fn verdicts(model: &Model) -> Vec<(u8, Condition, bool)> {
        let claims = model.claims_of(WEB);
        assert_eq!(claims.len(), 1);
        claims[0]
            .candidates
            .iter()
            .map(|c| (last_octet(c.backend.ip), c.condition, c.chosen))
            .collect()
    }

    #[test]
    fn ready_endpoints_are_chosen_and_the_others_say_why_not() {
        let model = model(
            &(SERVICE.to_owned()
                + &slice(
                    "- {addresses: [10.244.0.10], conditions: {ready: true}}\n\
                 - {addresses: [10.244.0.11], conditions: {ready: false, serving: true, terminating: true}}\n\
                 - {addresses: [10.244.0.12], conditions: {ready: false}}\n",
                )),
        );
        assert_eq!(
            verdicts(&model),
            [
                (10, Condition::Ready, true),
                (11, Condition::Terminating, false),
                (12, Condition::NotReady, false),
            ]
        );
    }

    #[test]
    fn an_endpoint_at_a_services_address_says_so() {
        let model = model(
            &(SERVICE.to_owned()
                + &slice("- {addresses: [10.96.0.10]}\n- {addresses: [10.244.0.12]}\n")),
        );
        assert_eq!(
            verdicts(&model),
            [
                (10, Condition::ServiceAddress, false),
                (12, Condition::Ready, true)
            ]
        );
    }

    #[test]
    fn terminating_endpoints_are_chosen_when_none_is_ready() {
        let model = model(
            &(SERVICE.to_owned()
                + &slice(
                    "- {addresses: [10.244.0.11], conditions: {ready: false, serving: true, terminating: true}}\n\
                 - {addresses: [10.244.0.12], conditions: {ready: false}}\n",
                )),
        );
        assert_eq!(
            verdicts(&model),
            [
                (11, Condition::Terminating, true),
                (12, Condition::NotReady, false)
            ]
        );
    }

    /// `yaml` seen from node-1, in `zone`.
    fn model_on_node(yaml: &str, zone: Option<&str>) -> Model {
        let mut model = Model::new(ModelConfig {
            node_name: "node-1".to_owned(),
            ..ModelConfig::default()
        });
        for change in changes_of("test.yaml", yaml).unwrap() {
            model.apply(change);
        }
        model.apply(Change::Node(Some(NodeObject {
            name: "node-1".to_owned(),
            zone: zone.map(str::to_owned),
            ..NodeObject::default()
        })));
        model.recompute();
        model
    }

    /// Each endpoint's last octet, whether it is chosen, and the rule that
    /// passed it over.
    fn exclusions(model: &Model) -> Vec<(u8, bool, Option<Exclusion>)> {
        model.claims_of(WEB)[0]
            .candidates
            .iter()
            .map(|c| (last_octet(c.backend.ip), c.chosen, c.excluded))
            .collect()
    }

    #[test]
    fn under_internal_traffic_policy_local_other_nodes_endpoints_say_so() {
        let local = SERVICE.replace("}]}", "}], internalTrafficPolicy: Local}");
        let model = model_on_node(
            &(local
                + &slice(
                    "- {addresses: [10.244.0.10], nodeName: node-1}\n\
                     - {addresses: [10.244.0.11], nodeName: node-2}\n\
                     - {addresses: [10.244.0.12]}\n\
                     - {addresses: [10.244.0.13], nodeName: node-2, conditions: {ready: false}}\n",
                )),
            Some("zone-a"),
        );
        let other_node = Some(Exclusion::OtherNode);
        assert_eq!(
            exclusions(&model),
            [
                (10, true, None),
                (11, false, other_node),
                (12, false, other_node),
                (13, false, other_node),
            ]
        );
        // Hints play no part under Local.
        assert_eq!(model.claims_of(WEB)[0].hinted_zone, None);
    }

    #[test]
    fn with_topology_hints_ready_endpoints_of_other_zones_say_so() {
        let endpoints = "- {addresses: [10.244.0.10], hints: {forZones: [{name: zone-a}]}}\n\
             - {addresses: [10.244.0.11], hints: {forZones: [{name: zone-b}]}}\n\
             - {addresses: [10.244.0.12], hints: {forZones: [{name: zone-b}]}, \
                conditions: {ready: false, serving: true, terminating: true}}\n";
        let model = model_on_node(&(SERVICE.to_owned() + &slice(endpoints)), Some("zone-a"));
        // The terminating one is not used because others are ready, not
        // because of its zone.
        assert_eq!(
            exclusions(&model),
            [
                (10, true, None),
                (11, false, Some(Exclusion::OtherZone)),
                (12, false, None),
            ]
        );
        assert_eq!(
            model.claims_of(WEB)[0].hinted_zone.as_deref(),
            Some("zone-a")
        );
        // A node in a zone no hint names uses every ready endpoint.
        let model = model_on_node(&(SERVICE.to_owned() + &slice(endpoints)), Some("zone-c"));
        assert_eq!(
            exclusions(&model),
            [(10, true, None), (11, true, None), (12, false, None)]
        );
        assert_eq!(model.claims_of(WEB)[0].hinted_zone, None);
    }

    #[test]
    fn with_node_hints_prefer_same_node_keeps_this_nodes_endpoints_before_zones() {
        let endpoints = "- {addresses: [10.244.0.10], nodeName: node-1, \
                hints: {forNodes: [{name: node-1}], forZones: [{name: zone-a}]}}\n\
             - {addresses: [10.244.0.11], nodeName: node-2, \
                hints: {forNodes: [{name: node-2}], forZones: [{name: zone-a}]}}\n\
             - {addresses: [10.244.0.12], nodeName: node-3, \
                hints: {forNodes: [{name: node-3}], forZones: [{name: zone-b}]}}\n";
        let model = model_on_node(&(SERVICE.to_owned() + &slice(endpoints)), Some("zone-a"));
        let other = Some(Exclusion::HintedForOtherNodes);
        assert_eq!(
            exclusions(&model),
            [(10, true, None), (11, false, other), (12, false, other)]
        );
        let claim = &model.claims_of(WEB)[0];
        assert!(
            claim.hinted_node && claim.hinted_zone.is_none(),
            "{claim:?}"
        );

        // No endpoint hinted for this node: the zone hints, as kube-proxy
        // falls back.
        let elsewhere =
            endpoints.replace("forNodes: [{name: node-1}]", "forNodes: [{name: node-9}]");
        let model = model_on_node(&(SERVICE.to_owned() + &slice(&elsewhere)), Some("zone-a"));
        assert_eq!(
            exclusions(&model),
            [
                (10, true, None),
                (11, true, None),
                (12, false, Some(Exclusion::OtherZone))
            ]
        );
        // One ready endpoint without node hints: they are not complete, and
        // count for nothing.
        let incomplete = endpoints.replace("forNodes: [{name: node-3}], ", "");
        let model = model_on_node(&(SERVICE.to_owned() + &slice(&incomplete)), None);
        assert_eq!(
            exclusions(&model),
            [(10, true, None), (11, true, None), (12, true, None)]
        );
    }

    /// The reasons come from the rules the desired state is chosen with:
    /// whatever the objects, an endpoint is chosen exactly when no rule
    /// passed it over and its condition makes it one of the backends.
    #[test]
    fn the_reasons_agree_with_the_desired_state() {
        let mut rng = XorShift(0x5eed_cafe);
        let mut model = Model::new(ModelConfig {
            node_name: "node-1".to_owned(),
            ..ModelConfig::default()
        });
        let mut checked = 0;
        for round in 0..400 {
            model.apply(random_change(&mut rng));
            model.recompute();
            for &frontend in model.desired().frontends.keys() {
                let claims = model.claims_of(frontend);
                let Some(owner) = claims.iter().find(|c| c.owner) else {
                    continue;
                };
                let ready_exists = owner
                    .candidates
                    .iter()
                    .any(|c| c.excluded.is_none() && c.condition == Condition::Ready);
                let would_choose = |c: &Candidate| {
                    c.excluded.is_none()
                        && match c.condition {
                            Condition::Ready => true,
                            Condition::Terminating => !ready_exists,
                            Condition::NotReady | Condition::ServiceAddress => false,
                        }
                };
                for candidate in &owner.candidates {
                    // An endpoint two slices list is one backend.
                    let expected = owner
                        .candidates
                        .iter()
                        .filter(|c| c.backend == candidate.backend)
                        .any(would_choose);
                    assert_eq!(
                        candidate.chosen, expected,
                        "round {round}, {frontend}: {candidate:?} in {owner:?}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000, "only {checked} candidates checked");
    }

    #[test]
    fn a_port_the_service_does_not_serve_is_found_by_its_address() {
        let model = model(SERVICE);
        let other_port = L4Addr { port: 81, ..WEB };
        assert!(model.claims_of(other_port).is_empty());
        assert_eq!(
            model.services_at(WEB.ip),
            [(ObjectName::new("default", "web"), vec![WEB])]
        );
        assert!(
            model
                .services_at(std::net::Ipv4Addr::new(10, 96, 0, 11).into())
                .is_empty()
        );
    }
}
