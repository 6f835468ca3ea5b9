//! Frontends reached from outside the node's sockets: NodePorts on the
//! node's addresses, a Service's externalIPs, and its load-balancer IPs,
//! each with its externalTrafficPolicy; and the healthCheckNodePorts that
//! load balancers probe for Services of policy Local.
//!
//! Kept apart from [`super::DesiredState`], which holds the ClusterIP
//! frontends the socket programs serve: the tc programs read these, and
//! the two never share an entry. Same rules as ClusterIPs: the model is
//! pure, each Service's claims are recomputed from its objects, and of two
//! Services claiming one frontend (or one nodePort, on every address) the
//! one that had it keeps it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use super::{
    CheckedSlice, Cidr, IpFamily, L4Addr, Model, Problem, Protocol, Readiness, Selection,
    ServiceOutput, backends, valid_port,
};
use crate::{
    kube_proxy_config::NodePortAddress,
    source::{NodeObject, ObjectName, ServiceObject, Sourced, objects::ServicePortObject},
};

/// `--nodeport-range`: the ports the API server allocates nodePorts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    /// The API server's default `--service-node-port-range`.
    fn default() -> Self {
        Self {
            first: 30000,
            last: 32767,
        }
    }
}

impl PortRange {
    fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    /// `30000-32767`, as the API server writes it (`30000+2768` too).
    fn from_str(text: &str) -> Result<Self, String> {
        let error = || format!("{text:?} is not a port range such as 30000-32767");
        let port = |p: &str| p.trim().parse::<u16>().map_err(|_| error());
        let (first, last) = if let Some((first, last)) = text.split_once('-') {
            (port(first)?, port(last)?)
        } else if let Some((first, size)) = text.split_once('+') {
            let first = port(first)?;
            (first, first.checked_add(port(size)?).ok_or_else(error)?)
        } else {
            return Err(error());
        };
        if first == 0 || first > last {
            return Err(error());
        }
        Ok(Self { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// How an outside frontend is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    /// `nodeIP:nodePort`, on every node address.
    NodePort,
    /// An address in `spec.externalIPs`.
    ExternalIp,
    /// An address in `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
}

impl FrontendKind {
    /// The slot-0 bits that tell readers of the maps the kind.
    #[must_use]
    pub const fn flag(self) -> u16 {
        match self {
            Self::NodePort => proxy_common::FRONTEND_NODE_PORT,
            Self::ExternalIp => proxy_common::FRONTEND_EXTERNAL_IP,
            Self::LoadBalancer => proxy_common::FRONTEND_LOAD_BALANCER,
        }
    }

    /// The kind a frontend's slot-0 flags name.
    #[must_use]
    pub const fn from_flags(flags: u16) -> Option<Self> {
        match flags & proxy_common::FRONTEND_KIND {
            proxy_common::FRONTEND_NODE_PORT => Some(Self::NodePort),
            proxy_common::FRONTEND_EXTERNAL_IP => Some(Self::ExternalIp),
            proxy_common::FRONTEND_LOAD_BALANCER => Some(Self::LoadBalancer),
            _ => None,
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NodePort => "NodePort",
            Self::ExternalIp => "ExternalIP",
            Self::LoadBalancer => "LoadBalancer",
        })
    }
}

/// `spec.externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficPolicy {
    /// Any ready endpoint; the client's address is masqueraded to the node.
    #[default]
    Cluster,
    /// Only endpoints on this node, the client's address kept; with none,
    /// the traffic is dropped.
    Local,
}

/// One outside frontend and the backends it balances over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalFrontend {
    /// kube-proxy's ServicePortName, as for ClusterIP frontends.
    pub service: String,
    pub kind: FrontendKind,
    pub policy: TrafficPolicy,
    /// Sorted. Empty under policy Local means "drop": no endpoint is on
    /// this node.
    pub backends: Arc<[L4Addr]>,
    /// The ClusterIP's backends, for the node's own sockets: kube-proxy
    /// sends traffic that starts on the node to every endpoint, whatever
    /// the policy (its KUBE-EXT chains jump to KUBE-SVC for
    /// `--src-type LOCAL`).
    pub cluster_backends: Arc<[L4Addr]>,
    /// sessionAffinity ClientIP timeout in seconds (0: none), by the
    /// client's address.
    pub affinity: u32,
    /// A load-balancer IP's loadBalancerSourceRanges of its family,
    /// networks only: new flows from clients outside them are dropped.
    /// `None`: the Service restricts no one. Empty: it lists ranges, none
    /// usable for this family, and admits no one here.
    pub source_ranges: Option<Arc<[Cidr]>>,
}

impl ExternalFrontend {
    /// The frontend as the tc programs' maps hold it: policy Cluster
    /// masquerades, so that replies come back through this node.
    #[must_use]
    pub fn desired(&self) -> super::DesiredFrontend {
        super::DesiredFrontend {
            service: self.service.clone(),
            backends: self.backends.clone(),
            flags: self.kind.flag()
                | match self.policy {
                    TrafficPolicy::Cluster => proxy_common::FRONTEND_MASQUERADE,
                    TrafficPolicy::Local => 0,
                }
                | if self.source_ranges.is_some() {
                    proxy_common::FRONTEND_SOURCE_RANGES
                } else {
                    0
                },
            affinity: self.affinity,
        }
    }
}

/// What a healthCheckNodePort answers: kube-proxy's count of the
/// Service's ready endpoints on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectName,
    pub local_endpoints: usize,
}

/// Everything the tc programs and the health-check servers should serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalState {
    pub frontends: BTreeMap<L4Addr, ExternalFrontend>,
    /// By healthCheckNodePort.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// The addresses NodePorts are served on, of both families.
    pub node_addresses: BTreeSet<IpAddr>,
}

/// What a Service claims: a nodePort is one claim for every node address
/// of its family, so that two Services never split one port between them;
/// a dual-stack Service claims it in both families, each served by the
/// endpoints of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum ExternalKey {
    NodePort {
        port: u16,
        protocol: Protocol,
        family: IpFamily,
    },
    Address(L4Addr),
}

impl fmt::Display for ExternalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A dual-stack Service claims a nodePort in both families:
            // one conflict, one message.
            Self::NodePort { port, protocol, .. } => write!(f, "nodePort {port}/{protocol}"),
            Self::Address(addr) => write!(f, "{addr}"),
        }
    }
}

/// One Service's outside frontends and health check, before claims are
/// settled.
#[derive(Clone, Debug, Default)]
pub(super) struct ExternalOutput {
    frontends: BTreeMap<ExternalKey, ExternalFrontend>,
    health_check: Option<(u16, HealthCheck)>,
}

impl ExternalOutput {
    /// Adds the outside frontends of a Service's other family.
    pub(super) fn merge(&mut self, other: Self) {
        self.frontends.extend(other.frontends);
        self.health_check = self.health_check.take().or(other.health_check);
    }
}

/// Claims of one kind of key, and who owns each.
#[derive(Debug)]
struct Claims<K> {
    claims: BTreeMap<K, super::VecSet<ObjectName>>,
}

impl<K> Default for Claims<K> {
    fn default() -> Self {
        Self {
            claims: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy> Claims<K> {
    fn release(&mut self, key: K, name: &ObjectName) {
        if let Some(claimants) = self.claims.get_mut(&key) {
            claimants.remove(name);
            if claimants.is_empty() {
                self.claims.remove(&key);
            }
        }
    }

    fn claim(&mut self, key: K, name: &ObjectName) {
        self.claims.entry(key).or_default().insert(name.clone());
    }
}

/// The model's part for outside frontends.
#[derive(Debug, Default)]
pub(super) struct ExternalModel {
    /// Addresses of the node's interfaces, from the agent.
    host_addresses: BTreeSet<IpAddr>,
    frontend_claims: Claims<ExternalKey>,
    health_claims: Claims<u16>,
    /// The owner's frontend of each claimed key.
    owned: BTreeMap<ExternalKey, ExternalFrontend>,
    state: ExternalState,
    /// The outside frontends as the tc programs' table holds them.
    tc_desired: super::DesiredState,
    /// The node's addresses may have changed: every NodePort is settled
    /// again.
    addresses_dirty: bool,
}

impl Model {
    /// The outside frontends and health checks, as of the last
    /// [`Model::recompute`].
    #[must_use]
    pub fn external(&self) -> &ExternalState {
        &self.external.state
    }

    /// What the tc programs' table should hold, as of the last
    /// [`Model::recompute`].
    #[must_use]
    pub fn tc_desired(&self) -> &super::DesiredState {
        &self.external.tc_desired
    }

    /// The addresses on this node's interfaces, which NodePorts are
    /// served on (as `--nodeport-addresses` selects).
    pub fn set_host_addresses(&mut self, addresses: BTreeSet<IpAddr>) {
        if self.external.host_addresses != addresses {
            self.external.host_addresses = addresses;
            self.external.addresses_dirty = true;
        }
    }

    /// The Node changed: its addresses may be the `primary` ones.
    pub(super) fn node_changed(&mut self) {
        self.external.addresses_dirty = true;
    }

    pub(super) fn external_is_dirty(&self) -> bool {
        self.external.addresses_dirty
    }

    /// A Service's outside frontends, from its ClusterIP frontends' backends
    /// (policy Cluster) or its endpoints on this node (policy Local).
    pub(super) fn compute_external(
        &self,
        sourced: &Sourced<ServiceObject>,
        slices: &[&CheckedSlice],
        cluster_ip: IpAddr,
        output: &ServiceOutput,
    ) -> (ExternalOutput, Vec<Problem>) {
        let family = IpFamily::of(cluster_ip);
        let service = &sourced.object;
        let mut external = ExternalOutput::default();
        let mut problems = Vec::new();
        let mut problem = |message: String| {
            problems.push(Problem {
                origin: sourced.origin.to_string(),
                object: format!("Service {}", service.name),
                message,
            });
        };
        let type_ = service.type_.as_deref().unwrap_or("ClusterIP");
        let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
        let policy = match service.external_traffic_policy.as_deref() {
            Some("Local") if node_ports || !service.external_ips.is_empty() => TrafficPolicy::Local,
            _ => TrafficPolicy::Cluster,
        };
        let (external_ips, lb_ips, source_ranges) =
            outside_addresses(service, family, &mut problem);
        for port in &service.ports {
            let Ok(protocol) = Protocol::parse(port.protocol.as_deref()) else {
                continue;
            };
            let Ok(number) = valid_port(port.port) else {
                continue;
            };
            let cluster = L4Addr {
                ip: cluster_ip,
                port: number,
                protocol,
            };
            // The ClusterIP side already reported whatever kept it out.
            let Some(frontend) = output.frontends.get(&cluster) else {
                continue;
            };
            let backends = match policy {
                TrafficPolicy::Cluster => frontend.backends.clone(),
                // externalTrafficPolicy Local: this node's endpoints, chosen
                // as for all (ready, else serving while terminating).
                TrafficPolicy::Local => backends(
                    slices,
                    &port.name,
                    protocol,
                    Selection {
                        local_only: true,
                        zone: None,
                    },
                )
                .into(),
            };
            let entry = |kind| ExternalFrontend {
                service: frontend.service.clone(),
                kind,
                policy,
                backends: backends.clone(),
                cluster_backends: frontend.backends.clone(),
                affinity: frontend.affinity,
                // kube-proxy restricts load-balancer IPs only: NodePorts
                // and externalIPs stay open to all.
                source_ranges: (kind == FrontendKind::LoadBalancer)
                    .then(|| source_ranges.clone())
                    .flatten(),
            };
            if node_ports {
                match self.node_port(port) {
                    Ok(Some(node_port)) => {
                        external.frontends.insert(
                            ExternalKey::NodePort {
                                port: node_port,
                                protocol,
                                family,
                            },
                            entry(FrontendKind::NodePort),
                        );
                    }
                    Ok(None) => {}
                    Err(message) => problem(format!("port {:?}: {message}", port.name)),
                }
            }
            for (ips, kind) in [
                (&external_ips, FrontendKind::ExternalIp),
                (&lb_ips, FrontendKind::LoadBalancer),
            ] {
                for &ip in ips {
                    external.frontends.insert(
                        ExternalKey::Address(L4Addr {
                            ip,
                            port: number,
                            protocol,
                        }),
                        entry(kind),
                    );
                }
            }
        }
        if policy == TrafficPolicy::Local && type_ == "LoadBalancer" {
            match health_check(service, slices) {
                Ok(check) => external.health_check = check,
                Err(message) => problem(message),
            }
        }
        (external, problems)
    }

    /// A port's nodePort: `None` when it has none (not allocated yet, or
    /// `allocateLoadBalancerNodePorts: false`).
    fn node_port(&self, port: &ServicePortObject) -> Result<Option<u16>, String> {
        let Some(node_port) = port.node_port.filter(|p| *p != 0) else {
            return Ok(None);
        };
        let range = self.config.node_port_range;
        match u16::try_from(node_port) {
            Ok(p) if range.contains(p) => Ok(Some(p)),
            _ => Err(format!(
                "nodePort {node_port} is outside --nodeport-range {range}"
            )),
        }
    }

    /// Moves a recomputed Service's claims from `old` to `new`, noting the
    /// keys and health-check ports whose owner or value may change.
    pub(super) fn reclaim_external(
        &mut self,
        name: &ObjectName,
        old: &ExternalOutput,
        new: &ExternalOutput,
        touched: &mut ExternalTouched,
    ) {
        let external = &mut self.external;
        for key in old.frontends.keys() {
            external.frontend_claims.release(*key, name);
            touched.keys.insert(*key);
        }
        for key in new.frontends.keys() {
            external.frontend_claims.claim(*key, name);
            touched.keys.insert(*key);
        }
        if let Some((port, _)) = &old.health_check {
            external.health_claims.release(*port, name);
            touched.health_ports.insert(*port);
        }
        if let Some((port, _)) = &new.health_check {
            external.health_claims.claim(*port, name);
            touched.health_ports.insert(*port);
        }
    }

    /// Settles ownership of the touched keys and updates the outside
    /// frontends they expand to; returns the frontends that changed.
    pub(super) fn settle_external(&mut self, mut touched: ExternalTouched) -> BTreeSet<L4Addr> {
        let mut changed = BTreeSet::new();
        let mut addrs: BTreeSet<L4Addr> = BTreeSet::new();
        if std::mem::take(&mut self.external.addresses_dirty) {
            let addresses = node_addresses(
                &self.config.node_port_addresses,
                self.node.as_ref(),
                &self.external.host_addresses,
            );
            if addresses != self.external.state.node_addresses {
                // Every NodePort, on the old addresses and the new.
                addrs.extend(
                    self.external
                        .state
                        .frontends
                        .iter()
                        .filter(|(_, f)| f.kind == FrontendKind::NodePort)
                        .map(|(addr, _)| *addr),
                );
                self.external.state.node_addresses = addresses;
                touched.keys.extend(
                    self.external
                        .owned
                        .keys()
                        .filter(|k| matches!(k, ExternalKey::NodePort { .. })),
                );
            }
        }
        for key in touched.keys {
            let wanted = self
                .external_owner(&self.external.frontend_claims, &key)
                .and_then(|owner| self.outputs.get(&owner))
                .and_then(|output| output.external.frontends.get(&key))
                .cloned();
            match wanted {
                Some(frontend) => self.external.owned.insert(key, frontend),
                None => self.external.owned.remove(&key),
            };
            match key {
                ExternalKey::Address(addr) => {
                    addrs.insert(addr);
                }
                ExternalKey::NodePort {
                    port,
                    protocol,
                    family,
                } => {
                    addrs.extend(
                        self.external
                            .state
                            .node_addresses
                            .iter()
                            .filter(|ip| IpFamily::of(**ip) == family)
                            .map(|&ip| L4Addr { ip, port, protocol }),
                    );
                }
            }
        }
        for addr in addrs {
            let external = &mut self.external;
            // An externalIP or load-balancer IP on a node address wins over
            // a nodePort there, as kube-proxy's KUBE-SERVICES rules come
            // before its KUBE-NODEPORTS jump.
            let wanted = external
                .owned
                .get(&ExternalKey::Address(addr))
                .or_else(|| {
                    external
                        .state
                        .node_addresses
                        .contains(&addr.ip)
                        .then(|| {
                            external.owned.get(&ExternalKey::NodePort {
                                port: addr.port,
                                protocol: addr.protocol,
                                family: IpFamily::of(addr.ip),
                            })
                        })
                        .flatten()
                })
                .cloned();
            if external.state.frontends.get(&addr) != wanted.as_ref() {
                if let Some(wanted) = wanted {
                    external.tc_desired.frontends.insert(addr, wanted.desired());
                    external.state.frontends.insert(addr, wanted);
                } else {
                    external.tc_desired.frontends.remove(&addr);
                    external.state.frontends.remove(&addr);
                }
                changed.insert(addr);
            }
        }
        for port in touched.health_ports {
            let wanted = self
                .external_owner(&self.external.health_claims, &port)
                .and_then(|owner| self.outputs.get(&owner))
                .and_then(|output| output.external.health_check.as_ref())
                .map(|(_, check)| check.clone());
            let checks = &mut self.external.state.health_checks;
            match wanted {
                Some(check) => checks.insert(port, check),
                None => checks.remove(&port),
            };
        }
        changed
    }

    /// An outside frontend as the node's own sockets reach it: a connect()
    /// to a NodePort on a node address, an externalIP or a load-balancer IP
    /// is balanced at the socket like a ClusterIP, over every endpoint.
    pub(super) fn local_view(&self, addr: L4Addr) -> Option<super::DesiredFrontend> {
        let frontend = self.external.state.frontends.get(&addr)?;
        Some(super::DesiredFrontend {
            service: frontend.service.clone(),
            backends: frontend.cluster_backends.clone(),
            // For readers of the maps; the socket programs ignore flags.
            flags: frontend.kind.flag(),
            affinity: frontend.affinity,
        })
    }

    fn external_owner<K: Ord>(&self, claims: &Claims<K>, key: &K) -> Option<ObjectName> {
        claims
            .claims
            .get(key)?
            .iter()
            .min_by_key(|name| self.seniority(name))
            .cloned()
    }

    /// Services that lost a claim to an older one.
    pub(super) fn external_problems(&self, problems: &mut BTreeSet<Problem>) {
        let lost = |what: String, claimants: &super::VecSet<ObjectName>, owner: &ObjectName| {
            claimants
                .iter()
                .filter(|name| *name != owner)
                .map(|name| Problem {
                    origin: self.services[name].service.origin.to_string(),
                    object: format!("Service {name}"),
                    message: format!("{what} is already used by Service {owner}"),
                })
                .collect::<Vec<_>>()
        };
        for (key, claimants) in &self.external.frontend_claims.claims {
            if claimants.len() > 1
                && let Some(owner) = self.external_owner(&self.external.frontend_claims, key)
            {
                problems.extend(lost(key.to_string(), claimants, &owner));
            }
        }
        for (port, claimants) in &self.external.health_claims.claims {
            if claimants.len() > 1
                && let Some(owner) = self.external_owner(&self.external.health_claims, port)
            {
                problems.extend(lost(
                    format!("healthCheckNodePort {port}"),
                    claimants,
                    &owner,
                ));
            }
        }
    }
}

/// Keys and health-check ports a recompute touched.
#[derive(Debug, Default)]
pub(super) struct ExternalTouched {
    keys: BTreeSet<ExternalKey>,
    health_ports: BTreeSet<u16>,
}

/// A Service's externalIPs and load-balancer IPs of `family`, and the
/// load-balancer IPs' source ranges. Each family's go with its ClusterIP's
/// backends; those of a family the Service has no ClusterIP of are not
/// served, as kube-proxy's proxier of that family never sees the Service.
fn outside_addresses(
    service: &ServiceObject,
    family: IpFamily,
    problem: &mut impl FnMut(String),
) -> (Vec<IpAddr>, Vec<IpAddr>, Option<Arc<[Cidr]>>) {
    let external_ips = addresses(&service.external_ips, family, "externalIP", problem);
    let lb_ips = if service.type_.as_deref() == Some("LoadBalancer") {
        let mut served = Vec::new();
        for ingress in &service.load_balancer_ingress {
            match ingress.ip_mode.as_deref() {
                None | Some("VIP") => served.push(ingress.ip.clone()),
                // kube-proxy 1.30+ leaves these to the load balancer, which
                // may terminate TLS or add the PROXY protocol, and reaches
                // the Service through its NodePort.
                Some("Proxy") => {}
                Some(other) => {
                    problem(format!(
                        "load-balancer IP {}: unknown ipMode {other:?}; served as VIP",
                        ingress.ip
                    ));
                    served.push(ingress.ip.clone());
                }
            }
        }
        addresses(&served, family, "load-balancer IP", problem)
    } else {
        Vec::new()
    };
    let source_ranges = if lb_ips.is_empty() {
        None
    } else {
        source_ranges(service, family, problem)
    };
    (external_ips, lb_ips, source_ranges)
}

/// A Service's loadBalancerSourceRanges of `family`, as kube-proxy reads
/// them (spaces trimmed, each family's ranges for its own load-balancer
/// IPs). A range that does not parse is a problem and left out. Where
/// kube-proxy would then restrict nothing (every range bad, or none of
/// this family), the load-balancer IPs admit no one instead: the Service
/// asked for a restriction, and opening it to all is the one reading that
/// cannot be what was meant.
fn source_ranges(
    service: &ServiceObject,
    family: IpFamily,
    problem: &mut impl FnMut(String),
) -> Option<Arc<[Cidr]>> {
    if service.load_balancer_source_ranges.is_empty() {
        return None;
    }
    let mut ranges = Vec::new();
    for text in &service.load_balancer_source_ranges {
        match text.trim().parse::<Cidr>() {
            Ok(range) if IpFamily::of(range.address) == family => ranges.push(range.network()),
            // Each family's pass says it alike: the model keeps one.
            Err(message) => problem(format!("loadBalancerSourceRanges: {message}; left out")),
            Ok(_) => {}
        }
    }
    if ranges.is_empty() {
        problem(format!(
            "loadBalancerSourceRanges has no valid {} range: its {} load-balancer IPs admit no client",
            family.name(),
            family.name()
        ));
    }
    ranges.sort_unstable();
    ranges.dedup();
    Some(ranges.into())
}

/// The addresses of a list of one family (the others are the other
/// family's to serve); bad ones are problems.
fn addresses(
    list: &[String],
    family: IpFamily,
    what: &str,
    problem: &mut impl FnMut(String),
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for text in list {
        match text.parse::<IpAddr>() {
            Ok(ip) if IpFamily::of(ip) != family => {}
            Ok(ip)
                if ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_multicast()
                    || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
                    || matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local() || v6.to_ipv4_mapped().is_some()) =>
            {
                problem(format!(
                    "{what} {ip} is not a unicast address (loopback, unspecified, link-local, broadcast, multicast and IPv4-mapped are refused)"
                ));
            }
            Ok(ip) => out.push(ip),
            // Reported once, with the IPv4 family's pass.
            Err(_) if family == IpFamily::Ipv4 => problem(format!("invalid {what} {text:?}")),
            Err(_) => {}
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The node addresses NodePorts are served on. Unset, every address of the
/// node's interfaces but loopback (kube-proxy's iptables mode serves them
/// all; localhost NodePorts stay off by default, CVE-2020-8558). `primary`
/// is the Node object's addresses; a CIDR selects the interface addresses
/// inside it (127.0.0.0/8 turns localhost NodePorts on).
#[must_use]
pub fn node_addresses(
    config: &[NodePortAddress],
    node: Option<&NodeObject>,
    host: &BTreeSet<IpAddr>,
) -> BTreeSet<IpAddr> {
    let not_loopback = || host.iter().copied().filter(|ip| !ip.is_loopback());
    if config.is_empty() {
        return not_loopback().collect();
    }
    let mut out = BTreeSet::new();
    for entry in config {
        match entry {
            NodePortAddress::All => out.extend(not_loopback()),
            NodePortAddress::Localhost => {
                out.extend(host.iter().copied().filter(IpAddr::is_loopback));
            }
            NodePortAddress::Primary => out.extend(
                node.into_iter()
                    .flat_map(|n| &n.addresses)
                    .filter_map(|a| a.parse::<IpAddr>().ok()),
            ),
            NodePortAddress::Cidr(cidr) => {
                out.extend(host.iter().copied().filter(|ip| cidr.contains(*ip)));
            }
        }
    }
    out
}

/// A policy-Local load balancer's healthCheckNodePort, if it has one.
fn health_check(
    service: &ServiceObject,
    slices: &[&CheckedSlice],
) -> Result<Option<(u16, HealthCheck)>, String> {
    let Some(port) = service.health_check_node_port.filter(|p| *p != 0) else {
        return Ok(None);
    };
    let port = valid_port(port).map_err(|message| format!("healthCheckNodePort: {message}"))?;
    Ok(Some((
        port,
        HealthCheck {
            service: service.name.clone(),
            local_endpoints: local_ready_endpoints(slices),
        },
    )))
}

/// kube-proxy's `localEndpoints`: ready endpoints on this node (each
/// address once).
fn local_ready_endpoints(slices: &[&CheckedSlice]) -> usize {
    slices
        .iter()
        .flat_map(|slice| &slice.endpoints)
        .filter(|e| e.local && matches!(e.readiness, Readiness::Ready))
        .map(|e| e.ip)
        .collect::<BTreeSet<_>>()
        .len()
}

#[cfg(test)]
mod tests;
