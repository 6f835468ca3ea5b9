//! The desired state: which frontends exist and which backends serve them.
//!
//! Pure: objects in, frontends and problems out, no I/O. The [`Model`] holds
//! the objects the sources reported and, per Service, what that Service
//! asks of the datapath. A change marks the Services it touches; a
//! [`Model::recompute`] recomputes only those and says which frontends
//! changed, so the writer applies only their difference. Nothing is patched
//! by hand: each touched Service is recomputed from its objects, so the
//! result equals a computation from scratch (a property test checks it).

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use serde::Serialize;

#[cfg(test)]
pub use self::external::{ExternalFrontend, TrafficPolicy};
pub use self::external::{ExternalState, FrontendKind, HealthCheck, PortRange};
pub use crate::cidr::Cidr;
use crate::{
    kube_proxy_config::NodePortAddress,
    source::{
        Change, NodeObject, ObjectName, ServiceObject, SliceObject, Sourced,
        objects::{EndpointObject, FamilyName, ServicePortObject},
    },
};

mod external;

use crate::sorted_vec::{VecMap, VecSet};

/// The datapath keeps a Service's backend count in 16 bits.
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

/// The value of the `service.kubernetes.io/service-proxy-name` label that
/// names this proxy; Services naming any other proxy are left to it.
pub const PROXY_NAME: &str = "ebpf-proxy";

/// The transport protocols the datapath balances.
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
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl L4Addr {
    /// `10.96.0.10:80`, `[fd10:96::10]:80`: the address and port as a
    /// socket address is written.
    #[must_use]
    pub fn host_port(&self) -> String {
        std::net::SocketAddr::new(self.ip, self.port).to_string()
    }
}

impl fmt::Display for L4Addr {
    /// `10.96.0.10:80/TCP`, `[fd10:96::10]:80/TCP`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host_port(), self.protocol)
    }
}

/// An address family, as Services (`ipFamilies`) and EndpointSlices
/// (`addressType`) name them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    #[default]
    Ipv4,
    Ipv6,
}

impl IpFamily {
    #[must_use]
    pub const fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::Ipv4,
            IpAddr::V6(_) => Self::Ipv6,
        }
    }

    /// `IPv4` and `IPv6`; anything else (`FQDN`) is no family of ours.
    fn parse(name: &str) -> Option<Self> {
        match name {
            "IPv4" => Some(Self::Ipv4),
            "IPv6" => Some(Self::Ipv6),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }
}

/// What the model is told about the node it runs on, and the operator's
/// limits. Fixed for the agent's lifetime.
#[derive(Clone, Debug, Default)]
pub struct ModelConfig {
    /// ClusterIPs outside these ranges are refused; empty means any unicast
    /// address that is not loopback or unspecified.
    pub service_cidrs: Vec<Cidr>,
    /// This node's name, as endpoints' `nodeName` spells it: internalTrafficPolicy
    /// Local serves only the endpoints that carry it.
    pub node_name: String,
    /// nodePorts outside this range are refused.
    pub node_port_range: PortRange,
    /// Which node addresses NodePorts are served on (kube-proxy's
    /// `nodePortAddresses`); empty means every non-loopback address.
    pub node_port_addresses: Vec<NodePortAddress>,
}

/// One frontend and the backends it balances over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// kube-proxy's ServicePortName: `namespace/name:port-name` (or
    /// `namespace/name` for an unnamed port), for logs.
    pub service: String,
    /// Sorted and without duplicates, so equal states compare equal. Empty
    /// means "refuse connections". Shared: the desired state holds the
    /// owning Service's own, not a copy (30,000 Services of four
    /// endpoints would hold 120,000 addresses twice).
    pub backends: Arc<[L4Addr]>,
    /// Slot 0's flags in the maps: 0 for ClusterIPs; outside frontends
    /// carry `proxy_common::FRONTEND_MASQUERADE` under policy Cluster.
    pub flags: u16,
    /// sessionAffinity ClientIP: its timeout in seconds; 0 for none.
    pub affinity: u32,
}

/// Everything one frontend table should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<L4Addr, DesiredFrontend>,
}

/// The frontends whose desired state changed in one
/// [`Model::recompute`], per table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Of the socket programs' table ([`Model::desired`]).
    pub sockets: BTreeSet<L4Addr>,
    /// Of the tc programs' table ([`Model::tc_desired`]).
    pub tc: BTreeSet<L4Addr>,
}

/// Input that was skipped, with where it came from and which object it was.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

/// A Service as the model keeps it.
#[derive(Clone, Debug)]
struct ServiceEntry {
    service: Sourced<ServiceObject>,
    /// When the model first saw this Service: with the creation time, it
    /// settles which of two Services claiming one frontend keeps it.
    first_seen: u64,
}

/// What one Service asks of the datapath.
#[derive(Clone, Debug, Default)]
struct ServiceOutput {
    frontends: VecMap<L4Addr, DesiredFrontend>,
    external: external::ExternalOutput,
    problems: Vec<Problem>,
}

/// An EndpointSlice's ports and endpoints, checked once: the bad parts are
/// problems and left out, so every Service port reads only good data.
#[derive(Clone, Debug, Default)]
struct CheckedSlice {
    /// Where the slice came from, for problems found later (an endpoint
    /// that turns out to be a Service's address).
    origin: Arc<str>,
    /// `addressType`: every endpoint kept is of this family, and serves
    /// the Service's ClusterIP of the same family only.
    family: IpFamily,
    /// Port name, protocol and port number.
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<CheckedEndpoint>,
    problems: Vec<Problem>,
}

/// What endpoint selection reads of one endpoint.
#[derive(Clone, Debug)]
struct CheckedEndpoint {
    ip: IpAddr,
    readiness: Readiness,
    /// On this node (its `nodeName` is ours), for internalTrafficPolicy Local.
    local: bool,
    /// `hints.forZones`: the zones the EndpointSlice controller wants this
    /// endpoint used from. Almost always none: then a null pointer, where
    /// a boxed slice would take two words of 120,000 endpoints.
    #[expect(
        clippy::box_collection,
        reason = "a thin pointer to the rare list, not a fat one in every endpoint"
    )]
    zone_hints: Option<Box<Vec<String>>>,
    /// `hints.forNodes`, as it concerns this node.
    node_hint: NodeHint,
}

/// What an endpoint's `hints.forNodes` (trafficDistribution
/// PreferSameNode) says of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeHint {
    /// No node hints.
    None,
    /// Hinted for this node, among others perhaps.
    ThisNode,
    /// Hinted for other nodes only.
    OtherNodes,
}

impl CheckedEndpoint {
    fn zone_hints(&self) -> &[String] {
        self.zone_hints.as_deref().map_or(&[], Vec::as_slice)
    }
}

/// What topology hints narrow a port's ready endpoints to, when they do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hinted<'a> {
    /// Those hinted for this node (`hints.forNodes`).
    Node,
    /// Those hinted for this node's zone (`hints.forZones`).
    Zone(&'a str),
}

/// How one Service picks its endpoints on this node.
#[derive(Clone, Copy, Debug)]
struct Selection<'a> {
    /// internalTrafficPolicy Local: this node's endpoints or none at all.
    local_only: bool,
    /// This node's zone, for topology hints.
    zone: Option<&'a str>,
}

impl<'a> Selection<'a> {
    /// What hints narrow the ready endpoints to, if they do: never under
    /// internalTrafficPolicy Local; this node when every ready endpoint has
    /// node hints and one names it (see [`prefers_node`]), else this
    /// node's zone under the same rule for zones (see [`prefers_zone`]).
    fn hinted<'e>(
        self,
        endpoints: impl Iterator<Item = &'e CheckedEndpoint> + Clone,
    ) -> Option<Hinted<'a>> {
        if self.local_only {
            return None;
        }
        if prefers_node(endpoints.clone()) {
            return Some(Hinted::Node);
        }
        self.zone
            .filter(|zone| prefers_zone(endpoints, zone))
            .map(Hinted::Zone)
    }

    /// Why these rules pass over `endpoint` before its readiness counts,
    /// `hinted` being what [`Self::hinted`] gave for the endpoints of its
    /// port. Hints hold back only ready endpoints: when none is ready, the
    /// terminating ones serve wherever they are hinted for.
    fn passes_over(
        self,
        endpoint: &CheckedEndpoint,
        hinted: Option<Hinted<'_>>,
    ) -> Option<candidates::Exclusion> {
        let ready = matches!(endpoint.readiness, Readiness::Ready);
        if self.local_only && !endpoint.local {
            Some(candidates::Exclusion::OtherNode)
        } else if hinted == Some(Hinted::Node) && ready && endpoint.node_hint != NodeHint::ThisNode
        {
            Some(candidates::Exclusion::HintedForOtherNodes)
        } else if let Some(Hinted::Zone(zone)) = hinted
            && ready
            && !endpoint.zone_hints().iter().any(|z| z == zone)
        {
            Some(candidates::Exclusion::OtherZone)
        } else {
            None
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Readiness {
    Ready,
    /// Serving while it terminates: used only when nothing is ready.
    Terminating,
    Unusable,
}

/// Who may own a frontend: the oldest Service first, as the API server's
/// allocator would have refused the younger one's address.
type Seniority = (i64, u64, ObjectName);

/// The objects and, per Service, the frontends they ask for.
#[derive(Debug, Default)]
pub struct Model {
    config: ModelConfig,
    /// Boxed: a B-tree node has room for eleven entries whether it holds
    /// them or not, and a Service is hundreds of bytes.
    services: BTreeMap<ObjectName, Box<ServiceEntry>>,
    slices: BTreeMap<ObjectName, CheckedSlice>,
    /// The slices of each Service, by the Service's name.
    slices_of: BTreeMap<ObjectName, VecSet<ObjectName>>,
    /// The Service each slice belongs to, by the slice's name.
    service_of_slice: BTreeMap<ObjectName, ObjectName>,
    node: Option<NodeObject>,
    outputs: BTreeMap<ObjectName, ServiceOutput>,
    /// Every Service that asks for a frontend, whether it got it or not.
    claims: BTreeMap<L4Addr, VecSet<ObjectName>>,
    /// Frontends that more than one Service claims.
    contested: BTreeSet<L4Addr>,
    /// Services and slices with problems, so listing problems costs what
    /// there are, not what there is.
    troubled_services: BTreeSet<ObjectName>,
    troubled_slices: BTreeSet<ObjectName>,
    desired: DesiredState,
    dirty: BTreeSet<ObjectName>,
    /// Every Service's ClusterIPs, with how many Services name each: an
    /// endpoint at one of these is no pod, and is refused.
    service_ips: BTreeMap<IpAddr, u32>,
    /// ClusterIPs that became, or stopped being, some Service's since the
    /// last recompute: the Services with endpoints there must be computed
    /// again.
    service_ips_changed: BTreeSet<IpAddr>,
    next_seen: u64,
    external: external::ExternalModel,
}

impl Model {
    #[must_use]
    pub fn new(config: ModelConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Takes in one change, marking the Services it touches. Nothing is
    /// computed until [`Model::recompute`].
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Service(name, object) => self.apply_service(name, object),
            Change::EndpointSlice(name, object) => self.apply_slice(name, object),
            Change::Node(node) => {
                if self.node != node {
                    self.node = node;
                    // Zones and node-local endpoints may change for all.
                    self.dirty.extend(self.services.keys().cloned());
                    self.node_changed();
                }
            }
        }
    }

    fn apply_service(&mut self, name: ObjectName, object: Option<Sourced<ServiceObject>>) {
        let old_ips = self
            .services
            .get(&name)
            .map(|entry| service_ips(&entry.service.object));
        let new_ips = object.as_ref().map(|service| service_ips(&service.object));
        if old_ips != new_ips {
            for ip in old_ips.into_iter().flatten() {
                self.forget_service_ip(ip);
            }
            for ip in new_ips.into_iter().flatten() {
                let count = self.service_ips.entry(ip).or_default();
                *count += 1;
                if *count == 1 {
                    self.service_ips_changed.insert(ip);
                }
            }
        }
        match object {
            Some(service) => {
                if let Some(entry) = self.services.get_mut(&name) {
                    if entry.service == service {
                        return;
                    }
                    entry.service = service;
                } else {
                    self.next_seen += 1;
                    let first_seen = self.next_seen;
                    self.services.insert(
                        name.clone(),
                        Box::new(ServiceEntry {
                            service,
                            first_seen,
                        }),
                    );
                }
            }
            None => {
                if self.services.remove(&name).is_none() {
                    return;
                }
            }
        }
        self.dirty.insert(name);
    }

    fn forget_service_ip(&mut self, ip: IpAddr) {
        if let Some(count) = self.service_ips.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                self.service_ips.remove(&ip);
                self.service_ips_changed.insert(ip);
            }
        }
    }

    /// Marks the Services whose endpoints sit at a ClusterIP that came or
    /// went: one pass over every endpoint, and only when the set of
    /// ClusterIPs changed (a Service made or deleted), never for an
    /// endpoint change.
    fn mark_endpoints_at_changed_service_ips(&mut self) {
        if self.service_ips_changed.is_empty() {
            return;
        }
        let changed = std::mem::take(&mut self.service_ips_changed);
        for (slice_name, slice) in &self.slices {
            if slice.endpoints.iter().any(|e| changed.contains(&e.ip))
                && let Some(service) = self.service_of_slice.get(slice_name)
            {
                self.dirty.insert(service.clone());
            }
        }
    }

    fn apply_slice(&mut self, name: ObjectName, object: Option<Sourced<SliceObject>>) {
        if let Some(old_service) = self.service_of_slice.remove(&name) {
            if let Some(slices) = self.slices_of.get_mut(&old_service) {
                slices.remove(&name);
                if slices.is_empty() {
                    self.slices_of.remove(&old_service);
                }
            }
            self.dirty.insert(old_service);
        }
        self.slices.remove(&name);
        self.troubled_slices.remove(&name);
        let Some(slice) = object else {
            return;
        };
        // FQDN slices are not ours; a slice that names no Service belongs
        // to nobody (custom controllers make such).
        let Some(service) = slice.object.service_name() else {
            return;
        };
        let Some(family) = IpFamily::parse(&slice.object.address_type) else {
            return;
        };
        let checked = check_slice(&slice, family, &self.config.node_name);
        if !checked.problems.is_empty() {
            self.troubled_slices.insert(name.clone());
        }
        self.slices.insert(name.clone(), checked);
        self.slices_of
            .entry(service.clone())
            .or_default()
            .insert(name.clone());
        self.service_of_slice.insert(name, service.clone());
        self.dirty.insert(service);
    }

    /// Recomputes the Services touched since the last call and returns the
    /// frontends whose desired state changed (added, changed or removed),
    /// in each table.
    pub fn recompute(&mut self) -> Changes {
        self.mark_endpoints_at_changed_service_ips();
        let mut touched = BTreeSet::new();
        let mut external_touched = external::ExternalTouched::default();
        for name in std::mem::take(&mut self.dirty) {
            let output = self
                .services
                .get(&name)
                .map(|entry| self.compute_service(&entry.service))
                .unwrap_or_default();
            let old = self.outputs.remove(&name).unwrap_or_default();
            self.reclaim_external(
                &name,
                &old.external,
                &output.external,
                &mut external_touched,
            );
            for frontend in old.frontends.keys() {
                if let Some(claimants) = self.claims.get_mut(frontend) {
                    claimants.remove(&name);
                    if claimants.is_empty() {
                        self.claims.remove(frontend);
                    }
                }
                touched.insert(*frontend);
            }
            for frontend in output.frontends.keys() {
                self.claims
                    .entry(*frontend)
                    .or_default()
                    .insert(name.clone());
                touched.insert(*frontend);
            }
            self.troubled_services.remove(&name);
            if self.services.contains_key(&name) {
                if !output.problems.is_empty() {
                    self.troubled_services.insert(name.clone());
                }
                self.outputs.insert(name, output);
            }
        }
        // Outside frontends are served to the node's own sockets too; a
        // ClusterIP on the same address and port wins.
        let tc = self.settle_external(external_touched);
        touched.extend(tc.iter().copied());
        let mut changed = BTreeSet::new();
        for frontend in touched {
            if self.claims.get(&frontend).is_some_and(|c| c.len() > 1) {
                self.contested.insert(frontend);
            } else {
                self.contested.remove(&frontend);
            }
            let wanted = self
                .owner(frontend)
                .and_then(|owner| self.outputs[&owner].frontends.get(&frontend))
                .cloned()
                .or_else(|| self.local_view(frontend));
            if self.desired.frontends.get(&frontend) != wanted.as_ref() {
                match wanted {
                    Some(wanted) => self.desired.frontends.insert(frontend, wanted),
                    None => self.desired.frontends.remove(&frontend),
                };
                changed.insert(frontend);
            }
        }
        Changes {
            sockets: changed,
            tc,
        }
    }

    /// The Service that keeps a frontend several Services claim.
    fn owner(&self, frontend: L4Addr) -> Option<ObjectName> {
        self.claims
            .get(&frontend)?
            .iter()
            .min_by_key(|name| self.seniority(name))
            .cloned()
    }

    fn seniority(&self, name: &ObjectName) -> Seniority {
        let entry = &self.services[name];
        (
            entry.service.object.created.unwrap_or(i64::MAX),
            entry.first_seen,
            name.clone(),
        )
    }

    /// What the socket programs' table should hold (ClusterIPs, and the
    /// outside frontends as the node's own sockets reach them), as of the
    /// last [`Model::recompute`].
    #[must_use]
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`: the
    /// Service ports of traffic policy Local (internal, then external)
    /// that have no endpoint on this node to send that traffic to.
    #[must_use]
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        let mut internal = BTreeSet::new();
        for (name, entry) in &self.services {
            if entry.service.object.internal_traffic_policy.as_deref() != Some("Local") {
                continue;
            }
            for frontend in self
                .outputs
                .get(name)
                .into_iter()
                .flat_map(|o| o.frontends.values())
            {
                if frontend.backends.is_empty() {
                    internal.insert(frontend.service.as_str());
                }
            }
        }
        let external: BTreeSet<&str> = self
            .external()
            .frontends
            .values()
            .filter(|f| f.policy == external::TrafficPolicy::Local && f.backends.is_empty())
            .map(|f| f.service.as_str())
            .collect();
        (internal.len(), external.len())
    }

    /// Whether changes are waiting for [`Model::recompute`].
    #[must_use]
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.service_ips_changed.is_empty() || self.external_is_dirty()
    }

    /// Every problem with the input, in a stable order.
    #[must_use]
    pub fn problems(&self) -> BTreeSet<Problem> {
        let mut problems: BTreeSet<Problem> = self
            .troubled_services
            .iter()
            .flat_map(|name| self.outputs[name].problems.iter().cloned())
            .chain(
                self.troubled_slices
                    .iter()
                    .flat_map(|name| self.slices[name].problems.iter().cloned()),
            )
            .collect();
        for frontend in &self.contested {
            let claimants = &self.claims[frontend];
            let owner = self
                .owner(*frontend)
                .expect("claimed frontends have an owner");
            for name in claimants.iter().filter(|n| **n != owner) {
                let service = &self.services[name].service;
                problems.insert(Problem {
                    origin: service.origin.to_string(),
                    object: format!("Service {name}"),
                    message: format!(
                        "{frontend} is already served by {}",
                        self.outputs[&owner].frontends[frontend].service
                    ),
                });
            }
        }
        self.external_problems(&mut problems);
        problems
    }

    fn compute_service(&self, sourced: &Sourced<ServiceObject>) -> ServiceOutput {
        let service = &sourced.object;
        let mut output = ServiceOutput::default();
        let mut problem = |message: String| {
            output.problems.push(Problem {
                origin: sourced.origin.to_string(),
                object: format!("Service {}", service.name),
                message,
            });
        };
        if service
            .proxy_name
            .as_deref()
            .is_some_and(|name| name != PROXY_NAME)
        {
            return output;
        }
        let cluster_ips = match self.cluster_ips(service) {
            Ok(ips) => ips,
            Err(message) => {
                problem(message);
                return output;
            }
        };
        if cluster_ips.is_empty() {
            return output;
        }
        let (all_slices, refused) = self.slices_of_service(&service.name);
        let affinity = match session_affinity(service) {
            Ok(affinity) => affinity,
            Err(message) => {
                problem(message);
                0
            }
        };
        // A dual-stack Service has a ClusterIP of each family, each served
        // by the endpoints of its own family, as kube-proxy runs one proxier
        // per family.
        for &cluster_ip in &cluster_ips {
            let family = IpFamily::of(cluster_ip);
            let slices: Vec<&CheckedSlice> = all_slices
                .iter()
                .map(AsRef::as_ref)
                .filter(|slice| slice.family == family)
                .collect();
            self.compute_family(sourced, cluster_ip, &slices, affinity, &mut output);
        }
        output.problems.extend(refused);
        output
    }

    /// The frontends of one of a Service's ClusterIPs, from the slices of
    /// its family.
    fn compute_family(
        &self,
        sourced: &Sourced<ServiceObject>,
        cluster_ip: IpAddr,
        slices: &[&CheckedSlice],
        affinity: u32,
        output: &mut ServiceOutput,
    ) {
        let service = &sourced.object;
        let selection = self.selection(service);
        let mut problem = |message: String| {
            output.problems.push(Problem {
                origin: sourced.origin.to_string(),
                object: format!("Service {}", service.name),
                message,
            });
        };
        for port in &service.ports {
            // A dual-stack Service's bad port is found for each family; the
            // model's problems are a set, so it is reported once.
            let frontend = match frontend(cluster_ip, port) {
                Ok(frontend) => frontend,
                Err(message) => {
                    problem(format!("port {:?}: {message}", port.name));
                    continue;
                }
            };
            let mut backends = backends(slices, &port.name, frontend.protocol, selection);
            if backends.len() > MAX_BACKENDS_PER_FRONTEND {
                // Serving the first endpoints beats dropping the Service.
                problem(format!(
                    "port {:?}: {} endpoints, more than the {MAX_BACKENDS_PER_FRONTEND} a frontend can hold; serving the first {MAX_BACKENDS_PER_FRONTEND}",
                    port.name,
                    backends.len()
                ));
                backends.truncate(MAX_BACKENDS_PER_FRONTEND);
            }
            let name = if port.name.is_empty() {
                service.name.to_string()
            } else {
                format!("{}:{}", service.name, port.name)
            };
            output.frontends.insert(
                frontend,
                DesiredFrontend {
                    service: name,
                    backends: backends.into(),
                    flags: 0,
                    affinity,
                },
            );
        }
        let (external, problems) = self.compute_external(sourced, slices, cluster_ip, output);
        output.external.merge(external);
        output.problems.extend(problems);
    }

    /// The slices of a Service, each without its endpoints at some
    /// Service's ClusterIP (no pod has one: a VIP as a backend would loop,
    /// or reach whatever the node serves on it), and a problem naming the
    /// slice for each such endpoint. Slices without any are borrowed.
    /// How `service` picks its endpoints on this node.
    fn selection(&self, service: &ServiceObject) -> Selection<'_> {
        Selection {
            local_only: service.internal_traffic_policy.as_deref() == Some("Local"),
            zone: self.node.as_ref().and_then(|node| node.zone.as_deref()),
        }
    }

    fn slices_of_service(
        &self,
        service: &ObjectName,
    ) -> (Vec<Cow<'_, CheckedSlice>>, Vec<Problem>) {
        let mut problems = Vec::new();
        let slices = self
            .slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                let slice = self.slices.get(name)?;
                let at_service_ip = |e: &CheckedEndpoint| self.service_ips.contains_key(&e.ip);
                if !slice.endpoints.iter().any(at_service_ip) {
                    return Some(Cow::Borrowed(slice));
                }
                let mut kept = slice.clone();
                kept.endpoints.retain(|endpoint| {
                    let refused = at_service_ip(endpoint);
                    if refused {
                        problems.push(Problem {
                            origin: slice.origin.to_string(),
                            object: format!("EndpointSlice {name}"),
                            message: format!(
                                "endpoint address {} is a Service's ClusterIP, which no pod can have",
                                endpoint.ip
                            ),
                        });
                    }
                    !refused
                });
                Some(Cow::Owned(kept))
            })
            .collect();
        (slices, problems)
    }

    /// The Service's ClusterIPs, at most one per family; none for
    /// Services without one (headless, ExternalName, not yet allocated).
    /// Any address that is not a valid Service address refuses the whole
    /// Service, naming the address, as the API server would have refused
    /// it.
    fn cluster_ips(&self, service: &ServiceObject) -> Result<Vec<IpAddr>, String> {
        if service.type_.as_deref() == Some("ExternalName") {
            return Ok(Vec::new());
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for text in &service.cluster_ips {
            if text.is_empty() || text == "None" {
                return Ok(Vec::new());
            }
            let ip: IpAddr = text
                .parse()
                .map_err(|_| format!("invalid clusterIP {text:?}"))?;
            if let Some(other) = ips
                .iter()
                .find(|other| IpFamily::of(**other) == IpFamily::of(ip))
            {
                return Err(format!(
                    "clusterIPs {other} and {ip} are of one family; a dual-stack Service has one of each"
                ));
            }
            self.check_cluster_ip(ip)?;
            ips.push(ip);
        }
        // `ipFamilies` lists the families of `clusterIPs` in order; where
        // they disagree, one of them is wrong, and guessing which would
        // serve an address the cluster did not mean.
        if !service.ip_families.is_empty() && !ips.is_empty() {
            let families: Vec<Option<IpFamily>> = service
                .ip_families
                .iter()
                .map(|name| match name {
                    FamilyName::Ipv4 => Some(IpFamily::Ipv4),
                    FamilyName::Ipv6 => Some(IpFamily::Ipv6),
                    FamilyName::Other => None,
                })
                .collect();
            let agree = ips.len() <= families.len()
                && ips
                    .iter()
                    .zip(&families)
                    .all(|(ip, family)| *family == Some(IpFamily::of(*ip)));
            if !agree {
                let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "clusterIPs [{}] disagree with ipFamilies [{}]",
                    ips.join(", "),
                    service.ip_families
                ));
            }
        }
        Ok(ips)
    }

    /// Whether `ip` may be a ClusterIP: a unicast address of the cluster,
    /// inside `--service-cidr` for its family when one is given.
    fn check_cluster_ip(&self, ip: IpAddr) -> Result<(), String> {
        // A ClusterIP that is not a unicast address of the cluster would
        // capture traffic the node sends elsewhere (127.0.0.1:80 to a pod).
        let refused = match ip {
            IpAddr::V4(v4) => {
                (v4.is_unspecified() || v4.is_loopback() || v4.is_broadcast() || v4.is_multicast())
                    .then_some("loopback, unspecified, broadcast and multicast are refused")
            }
            IpAddr::V6(v6) => (v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some())
            .then_some("loopback, unspecified, link-local, multicast and IPv4-mapped are refused"),
        };
        if let Some(why) = refused {
            return Err(format!(
                "clusterIP {ip} is not a unicast Service address ({why})"
            ));
        }
        let family = IpFamily::of(ip);
        let ranges: Vec<&Cidr> = self
            .config
            .service_cidrs
            .iter()
            .filter(|cidr| IpFamily::of(cidr.address) == family)
            .collect();
        if !ranges.is_empty() && !ranges.iter().any(|cidr| cidr.contains(ip)) {
            let ranges: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            return Err(format!(
                "clusterIP {ip} is outside --service-cidr {}",
                ranges.join(",")
            ));
        }
        Ok(())
    }
}

/// A Service's ClusterIPs as written, valid as Service addresses or not:
/// whatever a Service claims, no pod can be.
fn service_ips(service: &ServiceObject) -> Vec<IpAddr> {
    service
        .cluster_ips
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

/// Why no pod can have `ip`, if none can: these addresses reach the node
/// itself, every host, or the cloud's metadata service (169.254.169.254,
/// whose credentials a Service must never forward to). The API server
/// refuses them; a manifest directory must be held to the same rule.
fn non_pod_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) if ip.is_link_local() => {
            Some("link-local (169.254.0.0/16, the cloud metadata address among them)")
        }
        IpAddr::V4(ip) if ip.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(ip) if ip.is_unicast_link_local() => Some("link-local (fe80::/10)"),
        IpAddr::V6(ip) if ip.to_ipv4_mapped().is_some() => {
            Some("IPv4-mapped (an IPv4 address in an IPv6 slice)")
        }
        ip if ip.is_loopback() => Some("loopback"),
        ip if ip.is_unspecified() => Some("unspecified"),
        ip if ip.is_multicast() => Some("multicast"),
        _ => None,
    }
}

fn frontend(cluster_ip: IpAddr, port: &ServicePortObject) -> Result<L4Addr, String> {
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

fn check_slice(sourced: &Sourced<SliceObject>, family: IpFamily, node_name: &str) -> CheckedSlice {
    let slice = &sourced.object;
    let mut checked = CheckedSlice::default();
    let mut problem = |message: String| {
        checked.problems.push(Problem {
            origin: sourced.origin.to_string(),
            object: format!("EndpointSlice {}", slice.name),
            message,
        });
    };
    let mut ports = Vec::new();
    for port in &slice.ports {
        match valid_port(port.port.unwrap_or(0)) {
            Err(message) => problem(format!("port {:?}: {message}", port.name)),
            // A protocol the Service side refuses matches no frontend.
            Ok(number) => {
                if let Ok(protocol) = Protocol::parse(port.protocol.as_deref()) {
                    ports.push((port.name.clone(), protocol, number));
                }
            }
        }
    }
    let mut endpoints = Vec::new();
    for endpoint in &slice.endpoints {
        let Some(address) = &endpoint.address else {
            continue;
        };
        match address.parse::<IpAddr>() {
            Ok(ip) if IpFamily::of(ip) != family => problem(format!(
                "endpoint address {ip} is not of the slice's addressType {}",
                family.name()
            )),
            Ok(ip) if let Some(why) = non_pod_address(ip) => problem(format!(
                "endpoint address {ip} is {why}, which no pod can have"
            )),
            Ok(ip) => endpoints.push(CheckedEndpoint {
                ip,
                readiness: readiness(endpoint),
                local: !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name),
                zone_hints: (!endpoint.zone_hints().is_empty())
                    .then(|| Box::new(endpoint.zone_hints().to_vec())),
                node_hint: if endpoint.node_hints().is_empty() {
                    NodeHint::None
                } else if !node_name.is_empty()
                    && endpoint.node_hints().iter().any(|n| n == node_name)
                {
                    NodeHint::ThisNode
                } else {
                    NodeHint::OtherNodes
                },
            }),
            Err(_) => problem(format!(
                "endpoint address {address:?} is not an {} address",
                family.name()
            )),
        }
    }
    // Kept for the slice's life: without the room pushing reserved.
    ports.shrink_to_fit();
    endpoints.shrink_to_fit();
    checked.ports = ports;
    checked.endpoints = endpoints;
    checked.origin = sourced.origin.clone();
    checked.family = family;
    checked
}

fn readiness(endpoint: &EndpointObject) -> Readiness {
    // Unset conditions mean ready, serving as ready, and not terminating,
    // as the EndpointSlice API says.
    let ready = endpoint.ready.unwrap_or(true);
    let serving = endpoint.serving.unwrap_or(ready);
    let terminating = endpoint.terminating.unwrap_or(false);
    match (ready, serving, terminating) {
        (true, _, false) => Readiness::Ready,
        (_, true, true) => Readiness::Terminating,
        _ => Readiness::Unusable,
    }
}

/// The endpoints of one Service port, merged over its slices (an endpoint
/// listed by two slices counts once), chosen as kube-proxy's
/// `CategorizeEndpoints` does:
/// - internalTrafficPolicy Local: this node's ready endpoints, else its
///   serving terminating ones, else none (connections are refused, as
///   kube-proxy drops them);
/// - otherwise the ready endpoints, narrowed to those hinted for this node
///   when every ready endpoint has node hints and one names the node
///   (trafficDistribution PreferSameNode), else to those hinted for this
///   node's zone when every ready endpoint has zone hints and one names the
///   zone (PreferClose, PreferSameZone: the EndpointSlice controller writes
///   the hints, the proxy reads only them); when nothing is ready, the ones still
///   serving while they terminate, whatever their zone (kube-proxy does the
///   same, so a rolling update never refuses connections it could have
///   served).
fn backends(
    slices: &[&CheckedSlice],
    port_name: &str,
    protocol: Protocol,
    selection: Selection<'_>,
) -> Vec<L4Addr> {
    // Named target ports resolve per slice: each slice says which number
    // its port name has.
    let endpoints = || {
        slices.iter().flat_map(move |slice| {
            slice
                .ports
                .iter()
                .find(|(name, p, _)| name == port_name && *p == protocol)
                .map(|&(_, _, port)| (port, slice.endpoints.as_slice()))
                .into_iter()
                .flat_map(|(port, endpoints)| endpoints.iter().map(move |e| (port, e)))
        })
    };
    let hinted = selection.hinted(endpoints().map(|(_, e)| e));
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for (port, endpoint) in endpoints() {
        if selection.passes_over(endpoint, hinted).is_some() {
            continue;
        }
        let addr = L4Addr {
            ip: endpoint.ip,
            port,
            protocol,
        };
        match endpoint.readiness {
            Readiness::Ready => ready.insert(addr),
            Readiness::Terminating => terminating.insert(addr),
            Readiness::Unusable => false,
        };
    }
    let chosen = if ready.is_empty() { terminating } else { ready };
    chosen.into_iter().collect()
}

pub mod candidates;

/// kube-proxy's `topologyModeFromHints` for nodes (1.33+,
/// PreferSameTrafficDistribution): node hints count only when every ready
/// endpoint has some and at least one names this node.
fn prefers_node<'a>(endpoints: impl Iterator<Item = &'a CheckedEndpoint>) -> bool {
    let mut for_node = false;
    for endpoint in endpoints {
        if !matches!(endpoint.readiness, Readiness::Ready) {
            continue;
        }
        match endpoint.node_hint {
            NodeHint::None => return false,
            NodeHint::ThisNode => for_node = true,
            NodeHint::OtherNodes => {}
        }
    }
    for_node
}

/// kube-proxy's `topologyModeFromHints` for zones: hints count only when
/// every ready endpoint has some and at least one names `zone`; otherwise
/// the hints are incomplete or not meant for this zone, and all endpoints
/// are used.
fn prefers_zone<'a>(endpoints: impl Iterator<Item = &'a CheckedEndpoint>, zone: &str) -> bool {
    let mut any_ready = false;
    let mut for_zone = false;
    for endpoint in endpoints {
        if !matches!(endpoint.readiness, Readiness::Ready) {
            continue;
        }
        any_ready = true;
        if endpoint.zone_hints().is_empty() {
            return false;
        }
        for_zone |= endpoint.zone_hints().iter().any(|z| z == zone);
    }
    any_ready && for_zone
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// sessionAffinity ClientIP's timeout in seconds, 0 for `None`. A timeout
/// outside 1..=86400 (the API server's bounds) is refused; the Service is
/// then served without affinity.
fn session_affinity(service: &ServiceObject) -> Result<u32, String> {
    match service.session_affinity.as_deref() {
        None | Some("None") => Ok(0),
        Some("ClientIP") => match service.affinity_timeout_seconds {
            None => Ok(DEFAULT_AFFINITY_SECONDS),
            Some(seconds @ 1..=86_400) => Ok(seconds.unsigned_abs()),
            Some(seconds) => Err(format!(
                "sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is outside 1-86400; served without affinity"
            )),
        },
        Some(other) => Err(format!(
            "sessionAffinity {other:?} is not None or ClientIP; served without affinity"
        )),
    }
}

#[cfg(test)]
mod tests;
