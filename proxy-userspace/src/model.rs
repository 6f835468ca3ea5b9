//! The desired state: which frontends exist and which backends serve them.
//!
//! Pure: Kubernetes objects in, frontends and problems out, no I/O. The agent
//! recomputes it from the whole snapshot after every change (level
//! triggered), so there is no incremental bookkeeping to go stale.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};
use serde::Serialize;

use crate::source::{Snapshot, Sourced};

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The datapath keeps a Service's backend count in 16 bits.
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

/// The transport protocols the socket hooks balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// Kubernetes spells protocols in capitals and defaults to TCP.
    fn parse(name: Option<&str>) -> Result<Self, String> {
        match name.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Err("protocol SCTP is not supported".to_owned()),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// An address and port that clients connect to (a ClusterIP and port), or
/// that a backend listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct L4Addr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

/// One frontend and the backends it balances over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// `namespace/name:port-name` (or `namespace/name` for an unnamed
    /// port), for logs.
    pub service: String,
    /// Sorted and without duplicates, so equal states compare equal. Empty
    /// means "refuse connections".
    pub backends: Vec<L4Addr>,
}

/// Everything the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<L4Addr, DesiredFrontend>,
}

/// Input that was skipped, with where it came from and which object it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where the object came from: a file, or the API server.
    pub origin: String,
    /// `Kind namespace/name`.
    pub object: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.object, self.message)
    }
}

/// Computes the desired state from a whole snapshot. Bad objects, or bad
/// parts of objects, become [`Problem`]s and are left out; everything else
/// is still served.
#[must_use]
pub fn desired_state(snapshot: &Snapshot) -> (DesiredState, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut slice_problems = Vec::new();
    let slices = checked_slices(&snapshot.endpoint_slices, &mut slice_problems);
    let mut services: Vec<&Sourced<Service>> = snapshot.services.iter().collect();
    // Conflicts are settled the same way whatever order the source gave.
    services.sort_by_key(|s| namespaced_name(&s.object.metadata));

    let mut state = DesiredState::default();
    for service in services {
        let name = namespaced_name(&service.object.metadata);
        let mut problem = |message: String| {
            problems.push(Problem {
                origin: service.origin.clone(),
                object: format!("Service {name}"),
                message,
            });
        };
        let cluster_ip = match cluster_ip(&service.object) {
            Ok(Some(ip)) => ip,
            Ok(None) => continue,
            Err(message) => {
                problem(message);
                continue;
            }
        };
        let ports = service
            .object
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default();
        let service_slices = slices.get(&name).map(Vec::as_slice).unwrap_or_default();
        for port in ports {
            let port_name = port.name.clone().unwrap_or_default();
            let frontend = match frontend(cluster_ip, port) {
                Ok(frontend) => frontend,
                Err(message) => {
                    problem(format!("port {port_name:?}: {message}"));
                    continue;
                }
            };
            let backends = backends(service_slices, &port_name, frontend.protocol);
            if backends.len() > MAX_BACKENDS_PER_FRONTEND {
                problem(format!(
                    "port {port_name:?}: {} endpoints, more than the {MAX_BACKENDS_PER_FRONTEND} a frontend can hold",
                    backends.len()
                ));
                continue;
            }
            if let Some(owner) = state.frontends.get(&frontend) {
                problem(format!(
                    "port {port_name:?}: {frontend} is already served by {}",
                    owner.service
                ));
                continue;
            }
            // kube-proxy's ServicePortName: the port name only when it has one.
            let service = if port_name.is_empty() {
                name.clone()
            } else {
                format!("{name}:{port_name}")
            };
            state
                .frontends
                .insert(frontend, DesiredFrontend { service, backends });
        }
    }
    problems.extend(slice_problems);
    (state, problems)
}

fn namespaced_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The IPv4 ClusterIP, `None` for Services the socket hooks do not serve
/// (headless, ExternalName, not yet allocated, IPv6 only).
fn cluster_ip(service: &Service) -> Result<Option<Ipv4Addr>, String> {
    let Some(spec) = &service.spec else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => Vec::new(),
    };
    let mut first_v4 = None;
    for ip in ips {
        if ip.is_empty() || ip == "None" {
            return Ok(None);
        }
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => {
                first_v4.get_or_insert(v4);
            }
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("invalid clusterIP {ip:?}")),
        }
    }
    Ok(first_v4)
}

fn frontend(cluster_ip: Ipv4Addr, port: &ServicePort) -> Result<L4Addr, String> {
    Ok(L4Addr {
        ip: cluster_ip,
        port: valid_port(port.port)?,
        protocol: Protocol::parse(port.protocol.as_deref())?,
    })
}

fn valid_port(port: i32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port} is out of range 1-65535"))
}

/// An EndpointSlice's ports and endpoints, checked once: the bad parts are
/// problems and left out, so every Service port reads only good data.
struct CheckedSlice {
    /// Port name, protocol and port number.
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<(Ipv4Addr, Readiness)>,
}

#[derive(Clone, Copy)]
enum Readiness {
    Ready,
    /// Serving while it terminates: used only when nothing is ready.
    Terminating,
    Unusable,
}

/// The IPv4 slices by `namespace/service`.
fn checked_slices(
    slices: &[Sourced<EndpointSlice>],
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, Vec<CheckedSlice>> {
    let mut by_service: BTreeMap<String, Vec<CheckedSlice>> = BTreeMap::new();
    for sourced in slices {
        let slice = &sourced.object;
        let meta = &slice.metadata;
        let Some(service) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        if slice.address_type != "IPv4" {
            continue;
        }
        let mut problem = |message: String| {
            problems.push(Problem {
                origin: sourced.origin.clone(),
                object: format!("EndpointSlice {}", namespaced_name(meta)),
                message,
            });
        };
        let mut ports = Vec::new();
        for port in slice.ports.iter().flatten() {
            let name = port.name.clone().unwrap_or_default();
            match valid_port(port.port.unwrap_or(0)) {
                Err(message) => problem(format!("port {name:?}: {message}")),
                // A protocol the Service side refuses matches no frontend.
                Ok(number) => {
                    if let Ok(protocol) = Protocol::parse(port.protocol.as_deref()) {
                        ports.push((name, protocol, number));
                    }
                }
            }
        }
        let mut endpoints = Vec::new();
        for endpoint in slice.endpoints.iter().flatten() {
            // Consumers use only the first address (EndpointSlice API).
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            match address.parse() {
                Ok(ip) => endpoints.push((ip, readiness(endpoint))),
                Err(_) => problem(format!(
                    "endpoint address {address:?} is not an IPv4 address"
                )),
            }
        }
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        by_service
            .entry(format!("{namespace}/{service}"))
            .or_default()
            .push(CheckedSlice { ports, endpoints });
    }
    by_service
}

fn readiness(endpoint: &Endpoint) -> Readiness {
    let conditions = endpoint.conditions.clone().unwrap_or_default();
    // Unset conditions mean ready, serving as ready, and not terminating,
    // as the EndpointSlice API says.
    let ready = conditions.ready.unwrap_or(true);
    let serving = conditions.serving.unwrap_or(ready);
    let terminating = conditions.terminating.unwrap_or(false);
    match (ready, serving, terminating) {
        (true, _, false) => Readiness::Ready,
        (_, true, true) => Readiness::Terminating,
        _ => Readiness::Unusable,
    }
}

/// The endpoints of one Service port: ready ones, or, when none is ready,
/// the ones still serving while they terminate (kube-proxy does the same,
/// so a rolling update never refuses connections it could have served).
fn backends(slices: &[CheckedSlice], port_name: &str, protocol: Protocol) -> Vec<L4Addr> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        let Some(&(_, _, port)) = slice
            .ports
            .iter()
            .find(|(name, p, _)| name == port_name && *p == protocol)
        else {
            continue;
        };
        for &(ip, readiness) in &slice.endpoints {
            let addr = L4Addr { ip, port, protocol };
            match readiness {
                Readiness::Ready => ready.insert(addr),
                Readiness::Terminating => terminating.insert(addr),
                Readiness::Unusable => false,
            };
        }
    }
    let chosen = if ready.is_empty() { terminating } else { ready };
    chosen.into_iter().collect()
}

#[cfg(test)]
mod tests;
