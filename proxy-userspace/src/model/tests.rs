use std::fmt::Write as _;

use super::*;
use crate::source::manifests::snapshot_of;

fn snapshot(yaml: &str) -> Snapshot {
    snapshot_of("test.yaml", yaml).expect("valid test manifest")
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
    let backends = |port, protocol| &state.frontends[&addr("10.96.0.10", port, protocol)].backends;
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
        state.frontends[&addr("10.96.0.20", 80, Protocol::Tcp)].backends,
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
            .clone()
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
---
apiVersion: v1
kind: Service
metadata: {name: v6}
spec: {clusterIP: 'fd00::10', ports: [{port: 80}]}
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
            "test.yaml: Service default/mixed: port \"sig\": protocol SCTP is not supported",
            "test.yaml: Service default/mixed: port \"big\": port 70000 is out of range 1-65535",
            "test.yaml: Service default/mixed: port \"zero\": port 0 is out of range 1-65535",
            "test.yaml: Service shop/bad-ip: invalid clusterIP \"10.96.0.999\"",
        ]
    );
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        [addr("10.96.0.30", 8080, Protocol::Tcp)]
    );
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_first_by_name() {
    let service = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{clusterIP: 10.96.0.40, ports: [{{port: 80}}]}}\n"
        )
    };
    let yaml = format!("{}---\n{}", service("zeta"), service("alpha"));
    let (state, problems) = desired_state(&snapshot(&yaml));
    assert_eq!(
        state.frontends[&addr("10.96.0.40", 80, Protocol::Tcp)].service,
        "default/alpha"
    );
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].to_string().contains("Service default/zeta"),
        "{problems:?}"
    );
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
        state.frontends[&addr("10.96.0.20", 80, Protocol::Tcp)].backends,
        [addr("10.244.0.9", 8080, Protocol::Tcp)]
    );
    assert_eq!(
        problems[0].to_string(),
        "test.yaml: EndpointSlice default/web-1: endpoint address \"not-an-ip\" is not an IPv4 address"
    );
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
        snapshot
            .endpoint_slices
            .extend(self::snapshot(&slice(index)).endpoint_slices);
    }
    let (state, problems) = desired_state(&snapshot);
    assert!(state.frontends.is_empty());
    assert!(
        problems[0].message.contains("65536 endpoints"),
        "{problems:?}"
    );
}

#[test]
fn the_result_does_not_depend_on_the_order_of_objects() {
    let mut forward = snapshot(DNS);
    let (expected, _) = desired_state(&forward);
    forward.services.reverse();
    forward.endpoint_slices.reverse();
    assert_eq!(desired_state(&forward).0, expected);
}
