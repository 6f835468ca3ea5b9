//! Manifests for the lab, built as the API's own types and written as
//! YAML, so tests read as what they set up and cannot misspell a field.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, NodeSpec, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

/// One document of YAML.
///
/// # Panics
///
/// If `object` cannot be written as YAML, which the API's types always can.
#[must_use]
pub fn yaml(object: &impl Serialize) -> String {
    serde_saphyr::to_string(object).expect("the API's types serialize")
}

/// The metadata of an object of the lab: its name in the default namespace.
fn metadata(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some("default".to_owned()),
        ..ObjectMeta::default()
    }
}

fn port_number(port: i64) -> i32 {
    i32::try_from(port).expect("a port number of a test fits in 32 bits")
}

/// A ClusterIP Service; `ports` are `(name, port, protocol)`.
#[must_use]
pub fn service(name: &str, cluster_ip: &str, ports: &[(&str, i64, &str)]) -> String {
    yaml(&service_object(name, cluster_ip, ports))
}

/// [`service`] as the object, for a test to add to.
#[must_use]
pub fn service_object(name: &str, cluster_ip: &str, ports: &[(&str, i64, &str)]) -> Service {
    Service {
        metadata: metadata(name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.to_owned()),
            ports: Some(
                ports
                    .iter()
                    .map(|&(port_name, port, protocol)| ServicePort {
                        name: Some(port_name.to_owned()),
                        port: port_number(port),
                        protocol: Some(protocol.to_owned()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A ClusterIP Service of `cluster_ips` (one per family, the first also
/// its clusterIP), their families in `ipFamilies` in the same order, and
/// `ipFamilyPolicy` SingleStack for one address, RequireDualStack for two;
/// `ports` are `(name, port, protocol)`. A test that wants families and
/// addresses to disagree changes the object.
#[must_use]
pub fn dual_stack_service_object(
    name: &str,
    cluster_ips: &[&str],
    ports: &[(&str, i64, &str)],
) -> Service {
    let mut service = service_object(name, cluster_ips.first().copied().unwrap_or(""), ports);
    if let Some(spec) = service.spec.as_mut() {
        spec.cluster_ips = Some(cluster_ips.iter().map(|&ip| ip.to_owned()).collect());
        spec.ip_families = Some(
            cluster_ips
                .iter()
                .map(|ip| ip_family_of(ip).to_owned())
                .collect(),
        );
        spec.ip_family_policy = Some(
            if cluster_ips.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            }
            .to_owned(),
        );
    }
    service
}

/// [`dual_stack_service_object`] as YAML.
#[must_use]
pub fn dual_stack_service(name: &str, cluster_ips: &[&str], ports: &[(&str, i64, &str)]) -> String {
    yaml(&dual_stack_service_object(name, cluster_ips, ports))
}

/// The API's name of the family of `address`, as written in `ipFamilies`
/// and a slice's `addressType`.
fn ip_family_of(address: &str) -> &'static str {
    if address.contains(':') {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// The EndpointSlice `name` of `service` over `endpoints`, as the test
/// made them.
#[must_use]
pub fn endpoint_slice_of(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: Vec<Endpoint>,
) -> String {
    endpoint_slice_of_type(name, service, "IPv4", ports, endpoints)
}

/// [`endpoint_slice_of`] with `addressType` `address_type` (IPv4, IPv6,
/// FQDN).
#[must_use]
pub fn endpoint_slice_of_type(
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[(&str, u16, &str)],
    endpoints: Vec<Endpoint>,
) -> String {
    let mut metadata = metadata(name);
    metadata.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_owned(),
        service.to_owned(),
    )]));
    yaml(&EndpointSlice {
        metadata,
        address_type: address_type.to_owned(),
        ports: Some(
            ports
                .iter()
                .map(|&(port_name, port, protocol)| EndpointPort {
                    name: Some(port_name.to_owned()),
                    port: Some(port.into()),
                    protocol: Some(protocol.to_owned()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
        endpoints: Some(endpoints),
    })
}

fn endpoint(address: &impl ToString, ready: bool, node: Option<&str>) -> Endpoint {
    Endpoint {
        addresses: vec![address.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            ..EndpointConditions::default()
        }),
        node_name: node.map(str::to_owned),
        ..Endpoint::default()
    }
}

/// An EndpointSlice of `service`; `endpoints` are `(address, ready)`.
#[must_use]
pub fn endpoint_slice(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(Ipv4Addr, bool)],
) -> String {
    let endpoints = endpoints
        .iter()
        .map(|&(address, ready)| endpoint(&address, ready, None))
        .collect();
    endpoint_slice_of(name, service, ports, endpoints)
}

/// An EndpointSlice of `addressType: IPv6` of `service`; `endpoints` are
/// `(address, ready)`.
#[must_use]
pub fn endpoint_slice_v6(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(Ipv6Addr, bool)],
) -> String {
    let endpoints = endpoints
        .iter()
        .map(|&(address, ready)| endpoint(&address, ready, None))
        .collect();
    endpoint_slice_of_type(name, service, "IPv6", ports, endpoints)
}

/// An EndpointSlice of `address_type` whose ready endpoints are
/// `addresses` as written, whether or not they are of that type: for a
/// test of what the agent makes of a slice that lies about its addresses.
#[must_use]
pub fn endpoint_slice_as_written(
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[(&str, u16, &str)],
    addresses: &[&str],
) -> String {
    let endpoints = addresses
        .iter()
        .map(|&address| endpoint(&address, true, None))
        .collect();
    endpoint_slice_of_type(name, service, address_type, ports, endpoints)
}

/// An EndpointSlice whose endpoints (all ready) name their node; its
/// `addressType` is the family of the addresses (IPv4 when there are none).
#[must_use]
pub fn endpoint_slice_on_nodes<A: Into<IpAddr> + Copy>(
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(A, &str)],
) -> String {
    let address_type = match endpoints.first().map(|&(address, _)| address.into()) {
        Some(IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    let endpoints = endpoints
        .iter()
        .map(|&(address, node)| endpoint(&address.into(), true, Some(node)))
        .collect();
    endpoint_slice_of_type(name, service, address_type, ports, endpoints)
}

/// A Service of `type_` (NodePort, LoadBalancer) with one port `http` and
/// its nodePort; `more` sets whatever else the test needs in its spec.
#[must_use]
pub fn node_port_service(
    name: &str,
    type_: &str,
    cluster_ip: &str,
    port: (i64, i64),
    more: impl FnOnce(&mut ServiceSpec),
) -> String {
    yaml(&node_port_service_object(
        name, type_, cluster_ip, port, more,
    ))
}

/// [`node_port_service`] as the object, for a test to add to.
#[must_use]
pub fn node_port_service_object(
    name: &str,
    type_: &str,
    cluster_ip: &str,
    port: (i64, i64),
    more: impl FnOnce(&mut ServiceSpec),
) -> Service {
    let mut spec = ServiceSpec {
        type_: Some(type_.to_owned()),
        cluster_ip: Some(cluster_ip.to_owned()),
        ports: Some(vec![ServicePort {
            name: Some("http".to_owned()),
            port: port_number(port.0),
            node_port: Some(port_number(port.1)),
            ..ServicePort::default()
        }]),
        ..ServiceSpec::default()
    };
    more(&mut spec);
    Service {
        metadata: metadata(name),
        spec: Some(spec),
        ..Service::default()
    }
}

/// A NodePort Service whose one port is DNS: `port.0` and nodePort
/// `port.1`, UDP.
#[must_use]
pub fn udp_node_port_service(name: &str, cluster_ip: &str, port: (i64, i64)) -> String {
    node_port_service(name, "NodePort", cluster_ip, port, |spec| {
        for service_port in spec.ports.iter_mut().flatten() {
            service_port.name = Some("dns".to_owned());
            service_port.protocol = Some("UDP".to_owned());
        }
    })
}

/// The Node `name`; `more` adds to its metadata.
#[must_use]
pub fn node(name: &str, more: impl FnOnce(&mut ObjectMeta)) -> String {
    let mut metadata = ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    };
    more(&mut metadata);
    yaml(&Node {
        metadata,
        ..Node::default()
    })
}

/// The Node `name` with the spec `more` makes (its taints, say).
#[must_use]
pub fn node_with_spec(name: &str, more: impl FnOnce(&mut NodeSpec)) -> String {
    let mut spec = NodeSpec::default();
    more(&mut spec);
    yaml(&Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        ..Node::default()
    })
}

/// The spec of a Service whose outside traffic goes only to the node's own
/// endpoints.
pub fn local_traffic(spec: &mut ServiceSpec) {
    spec.external_traffic_policy = Some("Local".to_owned());
}

/// Documents joined into one multi-document file.
#[must_use]
pub fn documents(docs: &[String]) -> String {
    docs.join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the lab writes reads back as the object it meant: the label
    /// that ties a slice to its Service, the endpoints' nodes and readiness.
    #[test]
    fn a_slice_reads_back_as_written() {
        let text = documents(&[
            endpoint_slice(
                "web-1",
                "web",
                &[("http", 8080, "TCP")],
                &[(Ipv4Addr::new(10, 244, 0, 10), false)],
            ),
            endpoint_slice_on_nodes(
                "web-2",
                "web",
                &[("dns", 53, "UDP")],
                &[(Ipv4Addr::new(10, 244, 1, 10), "node-2")],
            ),
        ]);
        let slices: Vec<EndpointSlice> = serde_saphyr::from_multiple(&text).unwrap();
        let [first, second] = slices.as_slice() else {
            panic!("two documents in {text}");
        };
        assert_eq!(
            first.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
            "web"
        );
        let endpoint = &first.endpoints.as_ref().unwrap()[0];
        assert_eq!(endpoint.addresses, ["10.244.0.10"]);
        assert_eq!(endpoint.conditions.as_ref().unwrap().ready, Some(false));
        let endpoint = &second.endpoints.as_ref().unwrap()[0];
        assert_eq!(endpoint.node_name.as_deref(), Some("node-2"));
        let port = &second.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.port, port.protocol.as_deref()),
            (Some(53), Some("UDP"))
        );
    }

    /// A dual-stack Service lists its addresses with their families, and an
    /// IPv6 slice says so.
    #[test]
    fn dual_stack_services_and_ipv6_slices_read_back_as_written() {
        let text = documents(&[
            dual_stack_service(
                "both",
                &["10.96.0.20", "fd10:96::20"],
                &[("http", 80, "TCP")],
            ),
            dual_stack_service("six", &["fd10:96::10"], &[("http", 80, "TCP")]),
            endpoint_slice_v6(
                "six-1",
                "six",
                &[("http", 8080, "TCP")],
                &[("fd00:10:244::10".parse().unwrap(), true)],
            ),
        ]);
        let mut docs = text.split("---\n");
        let both: Service = serde_saphyr::from_str(docs.next().unwrap()).unwrap();
        let spec = both.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.20"));
        assert_eq!(spec.cluster_ips.unwrap(), ["10.96.0.20", "fd10:96::20"]);
        assert_eq!(spec.ip_families.unwrap(), ["IPv4", "IPv6"]);
        assert_eq!(spec.ip_family_policy.as_deref(), Some("RequireDualStack"));
        let six: Service = serde_saphyr::from_str(docs.next().unwrap()).unwrap();
        let spec = six.spec.unwrap();
        assert_eq!(spec.ip_families.unwrap(), ["IPv6"]);
        assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));
        let slice: EndpointSlice = serde_saphyr::from_str(docs.next().unwrap()).unwrap();
        assert_eq!(slice.address_type, "IPv6");
        assert_eq!(slice.endpoints.unwrap()[0].addresses, ["fd00:10:244::10"]);
    }

    #[test]
    fn a_node_port_service_carries_what_the_test_adds() {
        let text = node_port_service("web", "LoadBalancer", "10.96.0.30", (80, 30080), |spec| {
            local_traffic(spec);
            spec.health_check_node_port = Some(31999);
        });
        let service: Service = serde_saphyr::from_str(&text).unwrap();
        let spec = service.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.health_check_node_port, Some(31999));
        assert_eq!(spec.ports.unwrap()[0].node_port, Some(30080));
    }
}
