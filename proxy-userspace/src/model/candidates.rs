//! Why each endpoint of a frontend is, or is not, one of its backends: the
//! model's side of `explain`.
//!
//! The verdict on each endpoint is read from the desired state itself (is
//! it among the frontend's backends?), so it stays true whatever the
//! selection rules become; the reasons come from the endpoint's conditions.

use std::net::Ipv4Addr;

use super::{L4Addr, Model, Readiness, frontend};
use crate::source::ObjectName;

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

/// One endpoint of one slice of a Service, for one of its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub slice: ObjectName,
    pub backend: L4Addr,
    pub condition: Condition,
    /// Whether the desired state has it among the frontend's backends.
    pub chosen: bool,
    // Node-local (internalTrafficPolicy) and zone (hints) reasons go here
    // once the model selects by them.
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
                let ip = self.cluster_ip(service).ok()??;
                let port = service
                    .ports
                    .iter()
                    .find(|p| frontend_of(ip, p) == Some(frontend))?;
                let is_owner = owner.as_ref() == Some(name);
                Some(Claim {
                    service: name.clone(),
                    port_name: port.name.clone(),
                    owner: is_owner,
                    candidates: self.candidates(name, &port.name, frontend, |backend| {
                        is_owner && chosen.is_some_and(|f| f.backends.contains(&backend))
                    }),
                })
            })
            .collect();
        claims.sort_by_key(|c| !c.owner);
        claims
    }

    /// The Services whose ClusterIP is `ip`, and their frontends: for an
    /// address that is a Service's but on a port it does not serve.
    #[must_use]
    pub fn services_at(&self, ip: Ipv4Addr) -> Vec<(ObjectName, Vec<L4Addr>)> {
        self.services
            .iter()
            .filter_map(|(name, entry)| {
                let service = &entry.service.object;
                let cluster_ip = self.cluster_ip(service).ok()??;
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

    fn candidates(
        &self,
        service: &ObjectName,
        port_name: &str,
        frontend: L4Addr,
        chosen: impl Fn(L4Addr) -> bool,
    ) -> Vec<Candidate> {
        let mut candidates = Vec::new();
        for slice_name in self.slices_of.get(service).into_iter().flatten() {
            let Some(slice) = self.slices.get(slice_name) else {
                continue;
            };
            let Some(&(_, _, port)) = slice
                .ports
                .iter()
                .find(|(name, p, _)| name == port_name && *p == frontend.protocol)
            else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let backend = L4Addr {
                    ip: endpoint.ip,
                    port,
                    protocol: frontend.protocol,
                };
                candidates.push(Candidate {
                    slice: slice_name.clone(),
                    backend,
                    condition: match endpoint.readiness {
                        _ if self.service_ips.contains_key(&endpoint.ip) => {
                            Condition::ServiceAddress
                        }
                        Readiness::Ready => Condition::Ready,
                        Readiness::Terminating => Condition::Terminating,
                        Readiness::Unusable => Condition::NotReady,
                    },
                    chosen: chosen(backend),
                });
            }
        }
        candidates
    }
}

fn frontend_of(ip: Ipv4Addr, port: &crate::source::objects::ServicePortObject) -> Option<L4Addr> {
    frontend(ip, port).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{ModelConfig, Protocol},
        source::manifests::changes_of,
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
        ip: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        protocol: Protocol::Tcp,
    };

    fn verdicts(model: &Model) -> Vec<(u8, Condition, bool)> {
        let claims = model.claims_of(WEB);
        assert_eq!(claims.len(), 1);
        claims[0]
            .candidates
            .iter()
            .map(|c| (c.backend.ip.octets()[3], c.condition, c.chosen))
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

    #[test]
    fn a_port_the_service_does_not_serve_is_found_by_its_address() {
        let model = model(SERVICE);
        let other_port = L4Addr { port: 81, ..WEB };
        assert!(model.claims_of(other_port).is_empty());
        assert_eq!(
            model.services_at(WEB.ip),
            [(ObjectName::new("default", "web"), vec![WEB])]
        );
        assert!(model.services_at(Ipv4Addr::new(10, 96, 0, 11)).is_empty());
    }
}
