use std::fmt::Write as _;

use super::*;
use crate::source::manifests::changes_of;
use crate::testing::XorShift;

fn snapshot(yaml: &str) -> Vec<Change> {
    changes_of("test.yaml", yaml).expect("valid test manifest")
}

/// The node the tests' model runs on.
const NODE: &str = "node-1";

fn config() -> ModelConfig {
    ModelConfig {
        node_name: NODE.to_owned(),
        ..ModelConfig::default()
    }
}

/// The desired state and problems of a model fed `changes` at once.
fn desired_state(changes: &[Change]) -> (DesiredState, Vec<Problem>) {
    let mut model = Model::new(config());
    for change in changes {
        model.apply(change.clone());
    }
    model.recompute();
    (
        model.desired().clone(),
        model.problems().into_iter().collect(),
    )
}

fn addr(ip: &str, port: u16, protocol: Protocol) -> L4Addr {
    L4Addr {
        ip: ip.parse().unwrap(),
        port,
        protocol,
    }
}

const DNS: &str = r"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
  - {name: metrics, port: 9153}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: dns-abc
  namespace: kube-system
  labels: {kubernetes.io/service-name: dns}
addressType: IPv4
ports:
- {name: dns, port: 5353, protocol: UDP}
- {name: dns-tcp, port: 5353, protocol: TCP}
- {name: metrics, port: 9153, protocol: TCP}
endpoints:
- addresses: [10.244.0.3]
- addresses: [10.244.0.2]
  conditions: {ready: true}
- addresses: [10.244.0.4]
  conditions: {ready: false}
";

#[test]
fn named_ports_and_protocols_map_to_their_endpoint_ports() {
    let (state, problems) = desired_state(&snapshot(DNS));
    assert_eq!(problems, []);
    let backends = |port, protocol| &*state.frontends[&addr("10.96.0.10", port, protocol)].backends;
    // Sorted, the not-ready endpoint left out, an unset condition is ready.
    assert_eq!(
        backends(53, Protocol::Udp),
        &[
            addr("10.244.0.2", 5353, Protocol::Udp),
            addr("10.244.0.3", 5353, Protocol::Udp)
        ]
    );
    assert_eq!(
        backends(53, Protocol::Tcp)[0],
        addr("10.244.0.2", 5353, Protocol::Tcp)
    );
    assert_eq!(backends(9153, Protocol::Tcp).len(), 2);
    assert_eq!(
        state.frontends[&addr("10.96.0.10", 53, Protocol::Udp)].service,
        "kube-system/dns:dns"
    );
}

#[test]
fn endpoints_in_other_namespaces_or_of_other_services_do_not_count() {
    let yaml = DNS.replace(
        "namespace: kube-system\n  labels",
        "namespace: default\n  labels",
    );
    let (state, _) = desired_state(&snapshot(&yaml));
    assert!(state.frontends.values().all(|f| f.backends.is_empty()));
}

#[test]
fn session_affinity_client_ip_gives_its_timeout_and_bad_ones_are_problems() {
    let service = |name: &str, ip: &str, spec: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80}}]{spec}}}\n---\n"
        )
    };
    let yaml = [
        service("plain", "10.96.0.20", ""),
        service("sticky", "10.96.0.21", ", sessionAffinity: ClientIP"),
        service(
            "short",
            "10.96.0.22",
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
        ),
        service(
            "broken",
            "10.96.0.23",
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
        ),
    ]
    .concat();
    let (state, problems) = desired_state(&snapshot(&yaml));
    let affinity = |ip: &str| state.frontends[&addr(ip, 80, Protocol::Tcp)].affinity;
    assert_eq!(affinity("10.96.0.20"), 0);
    assert_eq!(affinity("10.96.0.21"), 10_800, "kube-proxy's default");
    assert_eq!(affinity("10.96.0.22"), 60);
    // Served, without affinity, and said so.
    assert_eq!(affinity("10.96.0.23"), 0);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].object, "Service default/broken");
    assert!(
        problems[0].message.contains("timeoutSeconds 0"),
        "{problems:?}"
    );
}

#[test]
fn a_service_without_ready_endpoints_has_an_empty_frontend() {
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
";
    let (state, problems) = desired_state(&snapshot(yaml));
    assert_eq!(problems, []);
    assert_eq!(
        *state.frontends[&addr("10.96.0.20", 80, Protocol::Tcp)].backends,
        []
    );
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let slice = |ready_one: bool| {
        format!(
            r"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{clusterIP: 10.96.0.20, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- addresses: [10.244.0.2]
  conditions: {{ready: false, serving: true, terminating: true}}
- addresses: [10.244.0.3]
  conditions: {{ready: {ready_one}}}
- addresses: [10.244.0.4]
  conditions: {{ready: false, serving: true}}
"
        )
    };
    let backends = |yaml: &str| {
        desired_state(&snapshot(yaml)).0.frontends[&addr("10.96.0.20", 80, Protocol::Tcp)]
            .backends
            .to_vec()
    };
    assert_eq!(
        backends(&slice(true)),
        [addr("10.244.0.3", 8080, Protocol::Tcp)]
    );
    assert_eq!(
        backends(&slice(false)),
        [addr("10.244.0.2", 8080, Protocol::Tcp)]
    );
}

#[test]
fn headless_external_name_and_unallocated_services_are_skipped_silently() {
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: external}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: pending}
spec: {ports: [{port: 80}]}
";
    let (state, problems) = desired_state(&snapshot(yaml));
    assert_eq!(state, DesiredState::default());
    assert_eq!(problems, []);
}

#[test]
fn bad_fields_are_problems_naming_the_object_and_the_rest_is_kept() {
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: bad-ip, namespace: shop}
spec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec:
  clusterIP: 10.96.0.30
  ports:
  - {name: sig, port: 80, protocol: SCTP}
  - {name: big, port: 70000}
  - {name: zero, port: 0}
  - {name: web, port: 8080}
";
    let (state, problems) = desired_state(&snapshot(yaml));
    let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "test.yaml: Service default/mixed: port \"big\": port 70000 is out of range 1-65535",
            "test.yaml: Service default/mixed: port \"sig\": protocol SCTP is not supported",
            "test.yaml: Service default/mixed: port \"zero\": port 0 is out of range 1-65535",
            "test.yaml: Service shop/bad-ip: invalid clusterIP \"10.96.0.999\"",
        ]
    );
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        [addr("10.96.0.30", 8080, Protocol::Tcp)]
    );
}

fn service_at(name: &str, cluster_ip: &str) -> Vec<Change> {
    snapshot(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
         spec: {{clusterIP: '{cluster_ip}', ports: [{{port: 80}}]}}\n"
    ))
}

fn owner(model: &Model, frontend: L4Addr) -> Option<String> {
    model
        .desired()
        .frontends
        .get(&frontend)
        .map(|f| f.service.clone())
}

#[test]
fn a_frontend_claimed_twice_stays_with_the_service_that_had_it() {
    let frontend = addr("10.96.0.40", 80, Protocol::Tcp);
    let mut model = Model::new(ModelConfig::default());
    for change in service_at("zeta", "10.96.0.40") {
        model.apply(change);
    }
    model.recompute();
    // "alpha" sorts first, but comes later: it must not take over.
    for change in service_at("alpha", "10.96.0.40") {
        model.apply(change);
    }
    assert_eq!(
        model.recompute().sockets,
        BTreeSet::new(),
        "the frontend moved"
    );
    assert_eq!(owner(&model, frontend).as_deref(), Some("default/zeta"));
    let problems: Vec<String> = model.problems().iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        ["test.yaml: Service default/alpha: 10.96.0.40:80/TCP is already served by default/zeta"]
    );
    // Once the incumbent is gone, the other claimant gets the frontend.
    model.apply(Change::Service(ObjectName::new("default", "zeta"), None));
    assert_eq!(model.recompute().sockets, BTreeSet::from([frontend]));
    assert_eq!(owner(&model, frontend).as_deref(), Some("default/alpha"));
    assert!(model.problems().is_empty());
}

#[test]
fn the_older_service_keeps_a_contested_frontend_whatever_the_order() {
    let with_time = |name: &str, time: &str| {
        snapshot(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, creationTimestamp: '{time}'}}\n\
             spec: {{clusterIP: 10.96.0.41, ports: [{{port: 80}}]}}\n"
        ))
    };
    let young = with_time("young", "2026-01-02T00:00:00Z");
    let old = with_time("old", "2025-01-01T00:00:00Z");
    for changes in [[young.clone(), old.clone()], [old, young]] {
        let (state, problems) = desired_state(&changes.concat());
        assert_eq!(
            state.frontends[&addr("10.96.0.41", 80, Protocol::Tcp)].service,
            "default/old"
        );
        assert_eq!(problems.len(), 1);
    }
}

#[test]
fn cluster_ips_that_would_capture_other_traffic_are_refused() {
    for ip in [
        "0.0.0.0",
        "127.0.0.1",
        "127.9.9.9",
        "255.255.255.255",
        "224.0.0.5",
    ] {
        let (state, problems) = desired_state(&service_at("bad", ip));
        assert!(state.frontends.is_empty(), "{ip} was accepted");
        assert!(
            problems[0]
                .message
                .contains("not a unicast Service address"),
            "{ip}: {problems:?}"
        );
    }
    let mut model = Model::new(ModelConfig {
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        ..config()
    });
    for change in [
        service_at("inside", "10.96.0.1"),
        service_at("outside", "10.112.0.1"),
    ]
    .concat()
    {
        model.apply(change);
    }
    model.recompute();
    assert_eq!(
        model
            .desired()
            .frontends
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [addr("10.96.0.1", 80, Protocol::Tcp)]
    );
    let problems: Vec<String> = model.problems().iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "test.yaml: Service default/outside: clusterIP 10.112.0.1 is outside --service-cidr 10.96.0.0/12"
        ]
    );
}

#[test]
fn services_of_another_proxy_are_left_to_it() {
    let labelled = |proxy: &str| {
        snapshot(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels: {{service.kubernetes.io/service-proxy-name: {proxy}}}\n\
             spec: {{clusterIP: 10.96.0.42, ports: [{{port: 80}}]}}\n"
        ))
    };
    assert!(desired_state(&labelled("other")).0.frontends.is_empty());
    assert_eq!(desired_state(&labelled(PROXY_NAME)).0.frontends.len(), 1);
}

#[test]
fn bad_endpoints_are_problems_and_are_skipped() {
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [not-an-ip]
- addresses: [10.244.0.9]
";
    let (state, problems) = desired_state(&snapshot(yaml));
    assert_eq!(
        *state.frontends[&addr("10.96.0.20", 80, Protocol::Tcp)].backends,
        [addr("10.244.0.9", 8080, Protocol::Tcp)]
    );
    assert_eq!(
        problems[0].to_string(),
        "test.yaml: EndpointSlice default/web-1: endpoint address \"not-an-ip\" is not an IPv4 address"
    );
}

/// Service default/web at 10.96.0.20:80 and its slice web-1 with these
/// endpoint addresses on port 8080.
fn web_with_endpoints(addresses: &[&str]) -> Vec<Change> {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n",
    );
    for address in addresses {
        let _ = writeln!(yaml, "- addresses: [{address}]");
    }
    snapshot(&yaml)
}

#[test]
fn endpoint_addresses_no_pod_can_have_are_problems_and_are_skipped() {
    let other = service_at("other", "10.96.0.21");
    let web = web_with_endpoints(&[
        "127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "169.254.1.1",
        "169.254.169.254",
        "10.96.0.21",
        "10.96.0.20",
        "10.244.0.9",
    ]);
    let changes: Vec<Change> = other.into_iter().chain(web).collect();
    let (state, problems) = desired_state(&changes);
    assert_eq!(
        *state.frontends[&addr("10.96.0.20", 80, Protocol::Tcp)].backends,
        [addr("10.244.0.9", 8080, Protocol::Tcp)],
        "{problems:#?}"
    );
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let slice = "test.yaml: EndpointSlice default/web-1: endpoint address";
    for (ip, why) in [
        ("127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "the broadcast address"),
        ("224.0.0.1", "multicast"),
        ("169.254.1.1", "link-local"),
        ("169.254.169.254", "link-local"),
        ("10.96.0.21", "a Service's ClusterIP"),
        ("10.96.0.20", "a Service's ClusterIP"),
    ] {
        let prefix = format!("{slice} {ip} is {why}");
        assert!(
            problems.iter().any(|p| p.starts_with(&prefix)),
            "no problem {prefix:?} in {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 8, "{problems:#?}");
}

#[test]
fn an_endpoint_follows_whether_its_address_is_a_services() {
    let web = web_with_endpoints(&["10.96.5.5", "10.244.0.9"]);
    let mut model = Model::new(config());
    for change in web {
        model.apply(change);
    }
    model.recompute();
    let frontend = addr("10.96.0.20", 80, Protocol::Tcp);
    let backends = |model: &Model| model.desired().frontends[&frontend].backends.len();
    assert_eq!(backends(&model), 2);
    // A Service made at that address later takes it away from the slice...
    for change in service_at("later", "10.96.5.5") {
        model.apply(change);
    }
    assert!(model.recompute().sockets.contains(&frontend));
    assert_eq!(backends(&model), 1);
    assert_eq!(model.problems().len(), 1, "{:?}", model.problems());
    // ...and gives it back when it goes.
    model.apply(Change::Service(ObjectName::new("default", "later"), None));
    assert!(model.recompute().sockets.contains(&frontend));
    assert_eq!(backends(&model), 2);
    assert!(model.problems().is_empty(), "{:?}", model.problems());
}

#[test]
fn too_many_endpoints_is_a_problem() {
    // In slices from several files: one file that big is over the manifest
    // reader's limit on nodes.
    let files = 8;
    let per_file = (MAX_BACKENDS_PER_FRONTEND + 1) / files;
    let slice = |index: usize| {
        let endpoints =
            (index * per_file..(index + 1) * per_file).fold(String::new(), |mut yaml, i| {
                let _ = writeln!(
                    yaml,
                    "- addresses: [10.{}.{}.{}]",
                    i >> 16,
                    (i >> 8) & 255,
                    i & 255
                );
                yaml
            });
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: huge-{index}\n  \
             labels: {{kubernetes.io/service-name: huge}}\naddressType: IPv4\nports: [{{port: 80}}]\n\
             endpoints:\n{endpoints}"
        )
    };
    let mut snapshot = snapshot(
        "apiVersion: v1\nkind: Service\nmetadata: {name: huge}\n\
         spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}\n",
    );
    for index in 0..files {
        snapshot.extend(self::snapshot(&slice(index)));
    }
    let (state, problems) = desired_state(&snapshot);
    // The first endpoints are still served.
    assert_eq!(
        state.frontends[&addr("10.96.0.50", 80, Protocol::Tcp)]
            .backends
            .len(),
        MAX_BACKENDS_PER_FRONTEND
    );
    assert!(
        problems[0].message.contains("65536 endpoints"),
        "{problems:?}"
    );
}

#[test]
fn the_result_does_not_depend_on_the_order_of_objects() {
    let mut changes = snapshot(DNS);
    let (expected, _) = desired_state(&changes);
    changes.reverse();
    assert_eq!(desired_state(&changes).0, expected);
}

const ZONES: [Option<&str>; 3] = [Some("zone-a"), Some("zone-b"), None];

pub(super) fn random_change(rng: &mut XorShift) -> Change {
    let sourced = |object| Sourced {
        origin: "random".into(),
        object,
    };
    // The Node's zone moves every Service's choice of endpoints.
    if rng.below(12) == 0 {
        return Change::Node((rng.below(4) != 0).then(|| NodeObject {
            name: NODE.to_owned(),
            zone: ZONES[usize::from(rng.pick(3))].map(str::to_owned),
            ..NodeObject::default()
        }));
    }
    if rng.below(2) == 0 {
        let service = rng.pick(5);
        let name = ObjectName::new("default", &format!("svc-{service}"));
        if rng.below(4) == 0 {
            return Change::Service(name, None);
        }
        let ports = (0..rng.below(3))
            .map(|i| ServicePortObject {
                name: format!("p{i}"),
                protocol: Some(if rng.below(3) == 0 { "UDP" } else { "TCP" }.to_owned()),
                port: 80 + i32::from(rng.pick(2)),
                node_port: None,
            })
            .collect();
        Change::Service(
            name.clone(),
            Some(sourced(ServiceObject {
                name,
                cluster_ips: vec![format!("10.96.0.{}", service + 1)],
                ports,
                internal_traffic_policy: (rng.below(3) == 0).then(|| "Local".to_owned()),
                ..ServiceObject::default()
            })),
        )
    } else {
        let slice = rng.pick(8);
        let name = ObjectName::new("default", &format!("slice-{slice}"));
        if rng.below(4) == 0 {
            return Change::EndpointSlice(name, None);
        }
        let endpoints = (0..rng.below(4))
            .map(|_| EndpointObject {
                // Now and then a Service's address, which no pod can have.
                address: Some(if rng.below(4) == 0 {
                    format!("10.96.0.{}", rng.pick(5) + 1)
                } else {
                    format!("10.244.0.{}", rng.pick(6) + 1)
                }),
                ready: Some(rng.below(4) != 0),
                serving: Some(rng.below(2) == 0),
                terminating: Some(rng.below(3) == 0),
                node_name: Some(format!("node-{}", rng.pick(2) + 1)),
                hints: Some(Box::new(crate::source::objects::HintsObject {
                    zones: (0..rng.below(3))
                        .filter_map(|_| ZONES[usize::from(rng.pick(3))].map(str::to_owned))
                        .collect(),
                    nodes: Vec::new(),
                })),
                ..EndpointObject::default()
            })
            .collect();
        let ports = (0..2)
            .map(|i| crate::source::objects::SlicePortObject {
                name: format!("p{i}"),
                protocol: Some(if rng.below(3) == 0 { "UDP" } else { "TCP" }.to_owned()),
                port: Some(8080 + i32::from(rng.pick(3))),
            })
            .collect();
        Change::EndpointSlice(
            name.clone(),
            Some(Sourced {
                origin: "random".into(),
                object: SliceObject {
                    name,
                    service: Some(format!("svc-{}", rng.pick(5))),
                    address_type: "IPv4".to_owned(),
                    ports,
                    endpoints,
                    ..SliceObject::default()
                },
            }),
        )
    }
}

#[test]
fn any_sequence_of_changes_ends_as_if_computed_from_scratch() {
    let mut rng = XorShift(0x0dd5_eed5);
    let mut model = Model::new(config());
    let mut objects: BTreeMap<String, Change> = BTreeMap::new();
    let mut previous = DesiredState::default();
    for round in 0..500 {
        for _ in 0..=rng.below(3) {
            let change = random_change(&mut rng);
            let key = match &change {
                Change::Service(name, _) => format!("svc {name}"),
                Change::EndpointSlice(name, _) => format!("slice {name}"),
                Change::Node(_) => "node".to_owned(),
            };
            match &change {
                Change::Service(_, None) | Change::EndpointSlice(_, None) => {
                    objects.remove(&key);
                }
                _ => {
                    objects.insert(key, change.clone());
                }
            }
            model.apply(change);
        }
        let changed = model.recompute().sockets;
        let (scratch, _) = desired_state(&objects.values().cloned().collect::<Vec<_>>());
        assert_eq!(model.desired(), &scratch, "round {round}");
        // The frontends reported as changed are exactly those that differ.
        let differ: BTreeSet<L4Addr> = previous
            .frontends
            .keys()
            .chain(scratch.frontends.keys())
            .filter(|f| previous.frontends.get(f) != scratch.frontends.get(f))
            .copied()
            .collect();
        assert_eq!(changed, differ, "round {round}");
        previous = scratch;
    }
}

/// A Service whose endpoints (`address`, `nodeName`, `hints.forZones`,
/// `ready`) sit in one slice; `spec` is added to the Service's spec.
fn spread_service(spec: &str, endpoints: &[(&str, &str, &[&str], bool)]) -> Vec<Change> {
    let mut yaml = format!(
        r"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{clusterIP: 10.96.0.20, ports: [{{port: 80}}]{spec}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
"
    );
    for (address, node, zones, ready) in endpoints {
        let hints: Vec<String> = zones.iter().map(|z| format!("{{name: {z}}}")).collect();
        let hints = if zones.is_empty() {
            String::new()
        } else {
            format!("\n  hints: {{forZones: [{}]}}", hints.join(", "))
        };
        let _ = write!(
            yaml,
            "- addresses: [{address}]\n  nodeName: {node}\n  conditions: {{ready: {ready}}}{hints}\n"
        );
    }
    snapshot(&yaml)
}

fn node_in(zone: Option<&str>) -> Change {
    Change::Node(Some(NodeObject {
        name: NODE.to_owned(),
        zone: zone.map(str::to_owned),
        ..NodeObject::default()
    }))
}

/// The backend addresses of 10.96.0.20:80 after `changes`.
fn web_backends(changes: &[Change]) -> Vec<String> {
    let (state, problems) = desired_state(changes);
    assert_eq!(problems, []);
    state.frontends[&addr("10.96.0.20", 80, Protocol::Tcp)]
        .backends
        .iter()
        .map(|b| b.ip.to_string())
        .collect()
}

#[test]
fn zone_hints_keep_traffic_in_the_nodes_zone() {
    // What the EndpointSlice controller writes for PreferClose: every
    // endpoint hinted for its own zone.
    let hinted: &[(&str, &str, &[&str], bool)] = &[
        ("10.244.0.2", "node-1", &["zone-a"], true),
        ("10.244.0.3", "node-2", &["zone-a"], true),
        ("10.244.0.4", "node-3", &["zone-b"], true),
    ];
    let prefer_close = ", trafficDistribution: PreferClose";
    let with_node = |zone, endpoints| {
        let mut changes = spread_service(prefer_close, endpoints);
        changes.push(node_in(zone));
        web_backends(&changes)
    };
    assert_eq!(
        with_node(Some("zone-a"), hinted),
        ["10.244.0.2", "10.244.0.3"]
    );
    assert_eq!(with_node(Some("zone-b"), hinted), ["10.244.0.4"]);
    // No endpoint is hinted for the node's zone, the node has no zone, or
    // the Node is not known: all endpoints, as kube-proxy falls back.
    let all = ["10.244.0.2", "10.244.0.3", "10.244.0.4"];
    assert_eq!(with_node(Some("zone-c"), hinted), all);
    assert_eq!(with_node(None, hinted), all);
    assert_eq!(web_backends(&spread_service(prefer_close, hinted)), all);
    // One ready endpoint without hints makes the hints incomplete.
    let partial: &[(&str, &str, &[&str], bool)] = &[
        ("10.244.0.2", "node-1", &["zone-a"], true),
        ("10.244.0.3", "node-2", &[], true),
        ("10.244.0.4", "node-3", &["zone-b"], true),
    ];
    assert_eq!(with_node(Some("zone-a"), partial), all);
    // ...but a not-ready one does not count either way.
    let unready: &[(&str, &str, &[&str], bool)] = &[
        ("10.244.0.2", "node-1", &["zone-a"], true),
        ("10.244.0.3", "node-2", &[], false),
        ("10.244.0.4", "node-3", &["zone-b"], true),
    ];
    assert_eq!(with_node(Some("zone-a"), unready), ["10.244.0.2"]);
}

#[test]
fn a_zone_change_of_the_node_moves_its_traffic() {
    let hinted: &[(&str, &str, &[&str], bool)] = &[
        ("10.244.0.2", "node-1", &["zone-a"], true),
        ("10.244.0.3", "node-2", &["zone-b"], true),
    ];
    let mut model = Model::new(config());
    for change in spread_service("", hinted) {
        model.apply(change);
    }
    model.apply(node_in(Some("zone-a")));
    model.recompute();
    let frontend = addr("10.96.0.20", 80, Protocol::Tcp);
    let backends = |model: &Model| model.desired().frontends[&frontend].backends.to_vec();
    assert_eq!(backends(&model), [addr("10.244.0.2", 8080, Protocol::Tcp)]);
    model.apply(node_in(Some("zone-b")));
    assert_eq!(model.recompute().sockets, BTreeSet::from([frontend]));
    assert_eq!(backends(&model), [addr("10.244.0.3", 8080, Protocol::Tcp)]);
}

#[test]
fn internal_traffic_policy_local_serves_only_this_nodes_endpoints() {
    let local = ", internalTrafficPolicy: Local";
    let endpoints: &[(&str, &str, &[&str], bool)] = &[
        ("10.244.0.2", "node-1", &[], true),
        ("10.244.0.3", "node-2", &[], true),
        ("10.244.0.4", NODE, &[], false),
    ];
    assert_eq!(
        web_backends(&spread_service(local, endpoints)),
        ["10.244.0.2"]
    );
    // Cluster (the default) uses every ready endpoint.
    assert_eq!(
        web_backends(&spread_service(
            ", internalTrafficPolicy: Cluster",
            endpoints
        )),
        ["10.244.0.2", "10.244.0.3"]
    );
    // No local endpoint: the frontend exists and refuses, though other
    // nodes have ready endpoints.
    let remote: &[(&str, &str, &[&str], bool)] = &[("10.244.0.3", "node-2", &[], true)];
    assert_eq!(
        web_backends(&spread_service(local, remote)),
        Vec::<String>::new()
    );
    // Zone hints do not widen or narrow Local.
    let hinted: &[(&str, &str, &[&str], bool)] = &[
        ("10.244.0.2", "node-1", &["zone-b"], true),
        ("10.244.0.3", "node-2", &["zone-a"], true),
    ];
    let mut changes = spread_service(local, hinted);
    changes.push(node_in(Some("zone-a")));
    assert_eq!(web_backends(&changes), ["10.244.0.2"]);
}

#[test]
fn internal_traffic_policy_local_falls_back_to_local_terminating_endpoints() {
    let yaml = r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}], internalTrafficPolicy: Local}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.0.2]
  nodeName: node-1
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.0.3]
  nodeName: node-2
  conditions: {ready: true}
";
    assert_eq!(web_backends(&snapshot(yaml)), ["10.244.0.2"]);
}

const DUAL_STACK: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, 'fd10:96::20']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.10]}, {addresses: [10.244.0.11]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ['fd00:10:244::10']}]
";

#[test]
fn a_dual_stack_service_has_a_frontend_per_family_each_with_its_own_endpoints() {
    let (state, problems) = desired_state(&snapshot(DUAL_STACK));
    assert_eq!(problems, []);
    assert_eq!(
        *state.frontends[&addr("10.96.0.20", 80, Protocol::Tcp)].backends,
        [
            addr("10.244.0.10", 8080, Protocol::Tcp),
            addr("10.244.0.11", 8080, Protocol::Tcp)
        ]
    );
    assert_eq!(
        *state.frontends[&addr("fd10:96::20", 80, Protocol::Tcp)].backends,
        [addr("fd00:10:244::10", 8080, Protocol::Tcp)]
    );
    assert_eq!(
        addr("fd10:96::20", 80, Protocol::Tcp).to_string(),
        "[fd10:96::20]:80/TCP"
    );
    // An IPv6-only Service of the same slices takes the IPv6 ones only.
    let single = DUAL_STACK
        .replace("  clusterIP: 10.96.0.20\n", "")
        .replace("[10.96.0.20, 'fd10:96::20']", "['fd10:96::20']")
        .replace("[IPv4, IPv6]", "[IPv6]")
        .replace("RequireDualStack", "SingleStack");
    let (state, problems) = desired_state(&snapshot(&single));
    assert_eq!(problems, []);
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        [addr("fd10:96::20", 80, Protocol::Tcp)]
    );
}

#[test]
fn bad_ipv6_cluster_ips_are_refused_naming_the_service_and_the_address() {
    for ip in ["::1", "::", "fe80::1", "ff02::1", "::ffff:10.96.0.40"] {
        let (state, problems) = desired_state(&service_at("bad", ip));
        assert!(state.frontends.is_empty(), "{ip} was accepted");
        let shown: std::net::IpAddr = ip.parse().unwrap();
        assert!(
            problems.len() == 1
                && problems[0].object == "Service default/bad"
                && problems[0].message.contains(&format!(
                    "clusterIP {shown} is not a unicast Service address"
                )),
            "{ip}: {problems:?}"
        );
    }
    let mut model = Model::new(ModelConfig {
        service_cidrs: vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd10:96::/112".parse().unwrap(),
        ],
        ..config()
    });
    for change in [
        service_at("inside", "fd10:96::1"),
        service_at("outside", "fd99::1"),
        service_at("ipv4", "10.96.0.1"),
    ]
    .concat()
    {
        model.apply(change);
    }
    model.recompute();
    assert_eq!(
        model
            .desired()
            .frontends
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [
            addr("10.96.0.1", 80, Protocol::Tcp),
            addr("fd10:96::1", 80, Protocol::Tcp)
        ]
    );
    let problems: Vec<String> = model.problems().iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "test.yaml: Service default/outside: clusterIP fd99::1 is outside --service-cidr fd10:96::/112"
        ]
    );
}

#[test]
fn cluster_ips_that_disagree_with_ip_families_are_refused() {
    for (ips, families, message) in [
        (
            "['fd10:96::41']",
            "[IPv4]",
            "clusterIPs [fd10:96::41] disagree with ipFamilies [IPv4]",
        ),
        (
            "[10.96.0.41, 'fd10:96::41']",
            "[IPv6, IPv4]",
            "clusterIPs [10.96.0.41, fd10:96::41] disagree with ipFamilies [IPv6, IPv4]",
        ),
        (
            "[10.96.0.41, 10.96.0.42]",
            "[IPv4, IPv4]",
            "clusterIPs 10.96.0.41 and 10.96.0.42 are of one family",
        ),
    ] {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\n\
             spec: {{clusterIPs: {ips}, ipFamilies: {families}, ports: [{{port: 80}}]}}\n"
        );
        let (state, problems) = desired_state(&snapshot(&yaml));
        assert!(state.frontends.is_empty(), "{ips} was accepted");
        assert!(
            problems.len() == 1 && problems[0].message.contains(message),
            "{ips}: {problems:?}"
        );
    }
}

#[test]
fn an_endpoint_not_of_its_slices_address_type_is_refused() {
    let yaml = DUAL_STACK.replace(
        "endpoints: [{addresses: ['fd00:10:244::10']}]",
        "endpoints: [{addresses: [10.244.0.12]}, {addresses: ['fd00:10:244::10']}]",
    );
    let (state, problems) = desired_state(&snapshot(&yaml));
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "test.yaml: EndpointSlice default/web-v6: endpoint address 10.244.0.12 is not of the slice's addressType IPv6"
        ]
    );
    assert_eq!(
        *state.frontends[&addr("fd10:96::20", 80, Protocol::Tcp)].backends,
        [addr("fd00:10:244::10", 8080, Protocol::Tcp)]
    );
}
