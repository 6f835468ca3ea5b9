//! The model's view of Kubernetes objects: only the fields it reads.
//!
//! Sources turn API objects into these at their edge, so the agent never
//! holds managedFields, annotations or status it does not use (at 30,000
//! Services that is most of the memory a whole object takes). Values stay
//! as the API spells them (strings, `i32` ports): checking them is the
//! model's job, so that every problem is reported in one place.

use std::sync::Arc;

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service with this label is served by the proxy it names, not by us
/// (unless it names us).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller: when the change behind a slice
/// happened, for the network programming latency metric.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The Node label that names its zone, for topology-aware routing.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// `namespace/name`: how objects are keyed everywhere in the agent.
///
/// One shared allocation: the model keys half a dozen maps by the names of
/// 30,000 Services and their slices, and a clone costs a reference count,
/// not two strings. Ordered and compared as (namespace, name).
#[derive(Clone)]
pub struct ObjectName {
    /// `namespace/name`, as it is displayed.
    text: Arc<str>,
    /// Where the namespace ends in `text`.
    namespace_len: usize,
}

impl ObjectName {
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            text: format!("{namespace}/{name}").into(),
            namespace_len: namespace.len(),
        }
    }

    /// An object's name; a missing namespace is `default`, as kubectl
    /// would make it.
    #[must_use]
    pub fn of(meta: &ObjectMeta) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or(""),
        )
    }

    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.text[..self.namespace_len]
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.text[self.namespace_len + 1..]
    }

    fn parts(&self) -> (&str, &str) {
        (self.namespace(), self.name())
    }
}

impl Default for ObjectName {
    fn default() -> Self {
        Self::new("", "")
    }
}

impl PartialEq for ObjectName {
    fn eq(&self, other: &Self) -> bool {
        self.namespace_len == other.namespace_len && self.text == other.text
    }
}

impl Eq for ObjectName {}

impl PartialOrd for ObjectName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ObjectName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl std::hash::Hash for ObjectName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl std::fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectName")
            .field("namespace", &self.namespace())
            .field("name", &self.name())
            .finish()
    }
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// One port of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServicePortObject {
    /// Empty for the single unnamed port.
    pub name: String,
    /// `None` means TCP.
    pub protocol: Option<String>,
    pub port: i32,
    pub node_port: Option<i32>,
}

/// What the model reads of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceObject {
    pub name: ObjectName,
    /// Seconds since the epoch; the older of two Services claiming one
    /// frontend keeps it, as the API server's allocator would have had it.
    pub created: Option<i64>,
    /// The `service.kubernetes.io/service-proxy-name` label.
    pub proxy_name: Option<String>,
    /// `spec.type`; `None` means ClusterIP.
    pub type_: Option<String>,
    /// `spec.clusterIPs`, or `spec.clusterIP` when the list is empty.
    pub cluster_ips: Vec<String>,
    /// `spec.ipFamilies`: the family of each of `cluster_ips`, in order.
    pub ip_families: IpFamilies,
    pub ports: Vec<ServicePortObject>,
    pub external_ips: Vec<String>,
    /// `status.loadBalancer.ingress[]` entries that have an IP.
    pub load_balancer_ingress: Vec<LoadBalancerIngressObject>,
    /// `spec.loadBalancerSourceRanges`: boxed, since few Services have any.
    pub load_balancer_source_ranges: Box<[String]>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub health_check_node_port: Option<i32>,
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_seconds: Option<i32>,
    pub traffic_distribution: Option<String>,
}

/// An entry of `status.loadBalancer.ingress` with an IP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LoadBalancerIngressObject {
    pub ip: String,
    /// `ipMode`: `None` (or `VIP`) when traffic to the IP arrives with the
    /// IP as its destination; `Proxy` when the load balancer proxies it.
    pub ip_mode: Option<String>,
}

/// One entry of `spec.ipFamilies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FamilyName {
    Ipv4,
    Ipv6,
    /// Anything else, kept so that the Service is refused by name.
    Other,
}

/// `spec.ipFamilies`, packed: the API server sets it on every Service, so
/// it must not cost an allocation each. Up to two families, in order; a
/// third entry is kept as [`FamilyName::Other`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpFamilies([Option<FamilyName>; 3]);

impl IpFamilies {
    #[must_use]
    pub fn from_names(names: &[String]) -> Self {
        let mut families = [None; 3];
        for (slot, name) in families.iter_mut().zip(names) {
            *slot = Some(match name.as_str() {
                "IPv4" => FamilyName::Ipv4,
                "IPv6" => FamilyName::Ipv6,
                _ => FamilyName::Other,
            });
        }
        if names.len() > 3 {
            families[2] = Some(FamilyName::Other);
        }
        Self(families)
    }

    pub fn iter(&self) -> impl Iterator<Item = FamilyName> + '_ {
        self.0.iter().map_while(|family| *family)
    }

    #[must_use]
    pub const fn is_empty(self) -> bool {
        self.0[0].is_none()
    }
}

impl std::fmt::Display for IpFamilies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, family) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(match family {
                FamilyName::Ipv4 => "IPv4",
                FamilyName::Ipv6 => "IPv6",
                FamilyName::Other => "(no family)",
            })?;
        }
        Ok(())
    }
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlicePortObject {
    /// Empty for the unnamed port.
    pub name: String,
    pub protocol: Option<String>,
    pub port: Option<i32>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointObject {
    /// The first address: consumers use only that one (EndpointSlice API).
    pub address: Option<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints`, boxed: few endpoints have any, and a list of all of a
    /// cluster's slices passes through here at once.
    pub hints: Option<Box<HintsObject>>,
}

/// An endpoint's topology hints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HintsObject {
    /// `forZones[].name`.
    pub zones: Vec<String>,
    /// `forNodes[].name` (trafficDistribution PreferSameNode).
    pub nodes: Vec<String>,
}

impl EndpointObject {
    #[must_use]
    pub fn zone_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| h.zones.as_slice())
    }

    #[must_use]
    pub fn node_hints(&self) -> &[String] {
        self.hints.as_deref().map_or(&[], |h| h.nodes.as_slice())
    }
}

/// What the model reads of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SliceObject {
    /// The slice's own name.
    pub name: ObjectName,
    /// The `kubernetes.io/service-name` label: the Service in the slice's
    /// namespace that it belongs to.
    pub service: Option<String>,
    pub address_type: String,
    pub ports: Vec<SlicePortObject>,
    pub endpoints: Vec<EndpointObject>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub trigger_time: Option<String>,
}

impl SliceObject {
    /// The Service this slice belongs to, if it names one.
    #[must_use]
    pub fn service_name(&self) -> Option<ObjectName> {
        self.service
            .as_deref()
            .map(|service| ObjectName::new(self.name.namespace(), service))
    }
}

/// What the agent reads of its own Node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeObject {
    pub name: String,
    /// The `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// InternalIP and ExternalIP addresses, as listed.
    pub addresses: Vec<String>,
    /// Set while the Node is being deleted: /healthz then answers 503
    /// (KEP-3836), so load balancers drain this node.
    pub deleting: bool,
    /// Set while the Node carries the cluster autoscaler's
    /// `ToBeDeletedByClusterAutoscaler` taint: it is about to go, and
    /// /healthz answers 503 as for `deleting` (kube-proxy 1.30+).
    pub autoscaler_deleting: bool,
}

impl From<&Service> for ServiceObject {
    fn from(service: &Service) -> Self {
        let meta = &service.metadata;
        let spec = service.spec.clone().unwrap_or_default();
        let cluster_ips = match (spec.cluster_ips, spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips,
            (_, Some(ip)) => vec![ip],
            _ => Vec::new(),
        };
        let load_balancer_ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ingress| {
                Some(LoadBalancerIngressObject {
                    ip: ingress.ip.clone()?,
                    ip_mode: ingress.ip_mode.clone(),
                })
            })
            .collect();
        Self {
            name: ObjectName::of(meta),
            created: meta.creation_timestamp.as_ref().map(|t| t.0.as_second()),
            proxy_name: label(meta, SERVICE_PROXY_NAME_LABEL),
            type_: spec.type_,
            cluster_ips,
            ip_families: IpFamilies::from_names(&spec.ip_families.unwrap_or_default()),
            ports: spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(|p| ServicePortObject {
                    name: p.name.unwrap_or_default(),
                    protocol: p.protocol,
                    port: p.port,
                    node_port: p.node_port,
                })
                .collect(),
            external_ips: spec.external_ips.unwrap_or_default(),
            load_balancer_ingress,
            load_balancer_source_ranges: spec
                .load_balancer_source_ranges
                .unwrap_or_default()
                .into(),
            external_traffic_policy: spec.external_traffic_policy,
            internal_traffic_policy: spec.internal_traffic_policy,
            health_check_node_port: spec.health_check_node_port,
            session_affinity: spec.session_affinity,
            affinity_timeout_seconds: spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            traffic_distribution: spec.traffic_distribution,
        }
    }
}

impl From<&EndpointSlice> for SliceObject {
    fn from(slice: &EndpointSlice) -> Self {
        let meta = &slice.metadata;
        Self {
            name: ObjectName::of(meta),
            service: label(meta, SERVICE_NAME_LABEL),
            address_type: slice.address_type.clone(),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePortObject {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: p.protocol.clone(),
                    port: p.port,
                })
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .flatten()
                .map(|e| {
                    let conditions = e.conditions.clone().unwrap_or_default();
                    EndpointObject {
                        address: e.addresses.first().cloned(),
                        ready: conditions.ready,
                        serving: conditions.serving,
                        terminating: conditions.terminating,
                        node_name: e.node_name.clone(),
                        zone: e.zone.clone(),
                        hints: e.hints.as_ref().map(|h| {
                            let names = |list: Option<Vec<String>>| list.unwrap_or_default();
                            Box::new(HintsObject {
                                zones: names(
                                    h.for_zones
                                        .as_ref()
                                        .map(|z| z.iter().map(|z| z.name.clone()).collect()),
                                ),
                                nodes: names(
                                    h.for_nodes
                                        .as_ref()
                                        .map(|n| n.iter().map(|n| n.name.clone()).collect()),
                                ),
                            })
                        }),
                    }
                })
                .collect(),
            trigger_time: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
                .cloned(),
        }
    }
}

impl From<&Node> for NodeObject {
    fn from(node: &Node) -> Self {
        let meta = &node.metadata;
        Self {
            name: meta.name.clone().unwrap_or_default(),
            zone: label(meta, ZONE_LABEL),
            addresses: node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                .map(|a| a.address.clone())
                .collect(),
            deleting: meta.deletion_timestamp.is_some(),
            autoscaler_deleting: node
                .spec
                .as_ref()
                .and_then(|spec| spec.taints.as_ref())
                .is_some_and(|taints| taints.iter().any(|taint| taint.key == TO_BE_DELETED_TAINT)),
        }
    }
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl NodeObject {
    /// Why load balancers should drain this node, if they should: it is
    /// going away (KEP-3836).
    #[must_use]
    pub const fn leaving(&self) -> Option<&'static str> {
        if self.deleting {
            Some("the Node is being deleted")
        } else if self.autoscaler_deleting {
            Some("the Node is tainted ToBeDeletedByClusterAutoscaler")
        } else {
            None
        }
    }
}

fn label(meta: &ObjectMeta, key: &str) -> Option<String> {
    meta.labels.as_ref().and_then(|l| l.get(key)).cloned()
}
