use std::{collections::BTreeSet, net::IpAddr};

use super::*;
use crate::{
    model::{Model, ModelConfig},
    source::{Change, manifests::changes_of},
};

fn changes(yaml: &str) -> Vec<Change> {
    changes_of("test.yaml", yaml).expect("valid test manifest")
}

fn config() -> ModelConfig {
    ModelConfig {
        node_name: "node-1".to_owned(),
        ..ModelConfig::default()
    }
}

fn host() -> BTreeSet<IpAddr> {
    ["127.0.0.1", "192.168.100.11", "10.244.1.1"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect()
}

fn model_of(config: ModelConfig, yaml: &str) -> Model {
    let mut model = Model::new(config);
    model.set_host_addresses(host());
    for change in changes(yaml) {
        model.apply(change);
    }
    model.recompute();
    model
}

fn at(ip: &str, port: u16, protocol: Protocol) -> L4Addr {
    L4Addr {
        ip: ip.parse().unwrap(),
        port,
        protocol,
    }
}

fn service(name: &str, cluster_ip: &str, extra: &str, port: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {cluster_ip}\n{extra}  ports:\n  - {{{port}}}\n---\n"
    )
}

/// Two endpoints on node-1 (one not ready), one on node-2.
fn slice(service: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-a\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\n\
         ports:\n- {{name: http, port: 8080}}\nendpoints:\n\
         - {{addresses: [10.244.1.10], nodeName: node-1}}\n\
         - {{addresses: [10.244.1.11], nodeName: node-1, conditions: {{ready: false}}}}\n\
         - {{addresses: [10.244.2.10], nodeName: node-2}}\n---\n"
    )
}

const LB: &str = concat!(
    "  type: LoadBalancer\n",
    "  externalIPs: [203.0.113.7, \"fd00::1\"]\n",
    "  healthCheckNodePort: 31999\n",
);

#[test]
fn a_load_balancer_service_gets_every_kind_of_frontend() {
    let yaml = service(
        "web",
        "10.96.0.20",
        &format!("{LB}  externalTrafficPolicy: Cluster\n"),
        "name: http, port: 80, nodePort: 30080",
    )
    .replace(
        "---\n",
        "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {hostname: lb.example}]}}\n---\n",
    ) + &slice("web");
    let model = model_of(config(), &yaml);
    let state = model.external();
    assert_eq!(model.problems().len(), 0, "{:?}", model.problems());
    // Loopback is not a NodePort address unless asked for.
    assert_eq!(
        state.node_addresses,
        ["10.244.1.1", "192.168.100.11"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect()
    );
    let kinds: Vec<(L4Addr, FrontendKind)> =
        state.frontends.iter().map(|(a, f)| (*a, f.kind)).collect();
    assert!(kinds.contains(&(
        at("192.168.100.11", 30080, Protocol::Tcp),
        FrontendKind::NodePort
    )));
    assert!(kinds.contains(&(
        at("10.244.1.1", 30080, Protocol::Tcp),
        FrontendKind::NodePort
    )));
    assert!(kinds.contains(&(
        at("203.0.113.7", 80, Protocol::Tcp),
        FrontendKind::ExternalIp
    )));
    assert!(kinds.contains(&(
        at("198.51.100.1", 80, Protocol::Tcp),
        FrontendKind::LoadBalancer
    )));
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    let nodeport = &state.frontends[&at("192.168.100.11", 30080, Protocol::Tcp)];
    assert_eq!(nodeport.policy, TrafficPolicy::Cluster);
    assert_eq!(nodeport.backends.len(), 2, "both ready endpoints, any node");
    assert_eq!(nodeport.service, "default/web:http");
    assert!(state.health_checks.is_empty(), "only policy Local has one");
}

#[test]
fn policy_local_keeps_this_nodes_endpoints_and_counts_them() {
    let yaml = service(
        "web",
        "10.96.0.20",
        &format!("{LB}  externalTrafficPolicy: Local\n"),
        "name: http, port: 80, nodePort: 30080",
    ) + &slice("web");
    let model = model_of(config(), &yaml);
    let frontend = &model.external().frontends[&at("192.168.100.11", 30080, Protocol::Tcp)];
    assert_eq!(frontend.policy, TrafficPolicy::Local);
    assert_eq!(*frontend.backends, [at("10.244.1.10", 8080, Protocol::Tcp)]);
    assert_eq!(
        model.external().health_checks[&31999],
        HealthCheck {
            service: ObjectName::new("default", "web"),
            local_endpoints: 1,
        }
    );
    // On another node: nothing local, so drop, and the check says 0.
    let other = model_of(
        ModelConfig {
            node_name: "node-3".to_owned(),
            ..ModelConfig::default()
        },
        &yaml,
    );
    let frontend = &other.external().frontends[&at("192.168.100.11", 30080, Protocol::Tcp)];
    assert!(frontend.backends.is_empty());
    assert_eq!(other.external().health_checks[&31999].local_endpoints, 0);
    // The ClusterIP frontend is not affected by the external policy.
    assert_eq!(
        other.desired().frontends[&at("10.96.0.20", 80, Protocol::Tcp)]
            .backends
            .len(),
        2
    );
    // kube-proxy's no_local_endpoints: one Service port, counted once
    // however many node addresses and load-balancer IPs it has.
    assert_eq!(model.no_local_endpoints(), (0, 0));
    assert_eq!(other.no_local_endpoints(), (0, 1));
    let internal = model_of(
        ModelConfig {
            node_name: "node-3".to_owned(),
            ..ModelConfig::default()
        },
        &(service(
            "web",
            "10.96.0.20",
            "  internalTrafficPolicy: Local\n",
            "name: http, port: 80",
        ) + &slice("web")),
    );
    assert_eq!(internal.no_local_endpoints(), (1, 0));
}

#[test]
fn a_node_port_outside_the_range_is_a_problem_and_the_rest_is_kept() {
    let yaml = service(
        "web",
        "10.96.0.20",
        "  type: NodePort\n",
        "name: http, port: 80, nodePort: 8080",
    ) + &service(
        "api",
        "10.96.0.21",
        "  type: NodePort\n",
        "name: http, port: 80, nodePort: 30081",
    );
    let model = model_of(config(), &yaml);
    let problems: Vec<String> = model.problems().iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "test.yaml: Service default/web: port \"http\": nodePort 8080 is outside --nodeport-range 30000-32767"
        ]
    );
    assert!(
        model
            .desired()
            .frontends
            .contains_key(&at("10.96.0.20", 80, Protocol::Tcp))
    );
    let ports: BTreeSet<u16> = model.external().frontends.keys().map(|a| a.port).collect();
    assert_eq!(ports, [30081].into_iter().collect());
    // A wider range takes it.
    let model = model_of(
        ModelConfig {
            node_port_range: "8000-32767".parse().unwrap(),
            ..config()
        },
        &yaml,
    );
    assert!(model.problems().is_empty());
}

#[test]
fn a_node_port_claimed_twice_stays_with_the_service_that_had_it() {
    let first = service(
        "a",
        "10.96.0.20",
        "  type: NodePort\n",
        "port: 80, nodePort: 30080",
    );
    let second = service(
        "b",
        "10.96.0.21",
        "  type: NodePort\n",
        "port: 81, nodePort: 30080",
    );
    let mut model = Model::new(config());
    model.set_host_addresses(host());
    for change in changes(&first) {
        model.apply(change);
    }
    model.recompute();
    for change in changes(&second) {
        model.apply(change);
    }
    model.recompute();
    let owner = |model: &Model| {
        model.external().frontends[&at("192.168.100.11", 30080, Protocol::Tcp)]
            .service
            .clone()
    };
    assert_eq!(owner(&model), "default/a");
    let problems: Vec<String> = model.problems().iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        ["test.yaml: Service default/b: nodePort 30080/TCP is already used by Service default/a"]
    );
    // When the owner goes, the other gets it.
    model.apply(Change::Service(ObjectName::new("default", "a"), None));
    model.recompute();
    assert_eq!(owner(&model), "default/b");
    assert!(model.problems().is_empty());
}

#[test]
fn node_port_addresses_select_the_nodes_addresses() {
    let node = NodeObject {
        name: "node-1".to_owned(),
        addresses: vec!["192.168.100.11".to_owned(), "fd00::11".to_owned()],
        ..NodeObject::default()
    };
    let parse = |list: &[&str]| -> Vec<NodePortAddress> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    };
    let ips =
        |list: &[&str]| -> BTreeSet<IpAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };
    assert_eq!(
        node_addresses(&[], Some(&node), &host()),
        ips(&["10.244.1.1", "192.168.100.11"])
    );
    assert_eq!(
        node_addresses(&parse(&["192.168.0.0/16"]), None, &host()),
        ips(&["192.168.100.11"])
    );
    assert_eq!(
        node_addresses(&parse(&["primary"]), Some(&node), &host()),
        ips(&["192.168.100.11", "fd00::11"]),
        "the Node's addresses of both families"
    );
    let dual_stack_host: BTreeSet<IpAddr> = host()
        .into_iter()
        .chain(ips(&["::1", "fd00:192:168:100::11"]))
        .collect();
    assert_eq!(
        node_addresses(&[], None, &dual_stack_host),
        ips(&["10.244.1.1", "192.168.100.11", "fd00:192:168:100::11"]),
        "every address of both families but loopback"
    );
    assert_eq!(
        node_addresses(&parse(&["fd00:192:168::/48"]), None, &dual_stack_host),
        ips(&["fd00:192:168:100::11"])
    );
    assert_eq!(
        node_addresses(&parse(&["127.0.0.0/8"]), None, &host()),
        ips(&["127.0.0.1"]),
        "localhost NodePorts only when asked for"
    );
}

#[test]
fn node_ports_follow_the_node_addresses() {
    let yaml = service(
        "web",
        "10.96.0.20",
        "  type: NodePort\n",
        "port: 80, nodePort: 30080",
    );
    let mut model = model_of(config(), &yaml);
    model.set_host_addresses(["192.168.100.12".parse().unwrap()].into_iter().collect());
    assert!(model.is_dirty());
    let changes = model.recompute();
    let addrs: Vec<L4Addr> = model.external().frontends.keys().copied().collect();
    assert_eq!(addrs, [at("192.168.100.12", 30080, Protocol::Tcp)]);
    // Gone from both old addresses, there on the new one.
    assert_eq!(changes.tc.len(), 3);
    assert_eq!(
        model
            .tc_desired()
            .frontends
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        addrs
    );
}

#[test]
fn bad_external_ips_are_problems_and_the_good_ones_are_served() {
    let yaml = service(
        "web",
        "10.96.0.20",
        "  externalIPs: [127.0.0.1, nonsense, 203.0.113.8]\n",
        "port: 80",
    );
    let model = model_of(config(), &yaml);
    assert_eq!(model.problems().len(), 2, "{:?}", model.problems());
    let addrs: Vec<L4Addr> = model.external().frontends.keys().copied().collect();
    assert_eq!(addrs, [at("203.0.113.8", 80, Protocol::Tcp)]);
}

#[test]
fn incremental_changes_end_as_if_computed_from_scratch() {
    let a = service(
        "a",
        "10.96.0.20",
        &format!("{LB}  externalTrafficPolicy: Local\n"),
        "name: http, port: 80, nodePort: 30080",
    ) + &slice("a");
    let b = service(
        "b",
        "10.96.0.21",
        "  type: NodePort\n",
        "port: 80, nodePort: 30080",
    );
    let steps = [
        a.clone(),
        b.clone(),
        a.replace("Local", "Cluster"),
        b.replace("30080", "30090"),
    ];
    let mut incremental = Model::new(config());
    incremental.set_host_addresses(host());
    for step in &steps {
        for change in changes(step) {
            incremental.apply(change);
        }
        incremental.recompute();
    }
    let scratch = model_of(config(), &(steps[2].clone() + &steps[3]));
    assert_eq!(incremental.external(), scratch.external());
    assert_eq!(incremental.tc_desired(), scratch.tc_desired());
}

#[test]
fn port_ranges_parse_as_the_api_server_writes_them() {
    assert_eq!("30000-32767".parse::<PortRange>(), Ok(PortRange::default()));
    assert_eq!("30000+2767".parse::<PortRange>(), Ok(PortRange::default()));
    assert!("32767-30000".parse::<PortRange>().is_err());
    assert!("0-10".parse::<PortRange>().is_err());
    assert!("30000".parse::<PortRange>().is_err());
}

/// The node's own sockets reach an outside frontend over every endpoint,
/// as kube-proxy sends traffic that starts on the node; the tc programs'
/// view follows the policy. A ClusterIP on the same address and port wins.
#[test]
fn the_nodes_own_sockets_reach_outside_frontends_over_every_endpoint() {
    let yaml = service(
        "web",
        "10.96.0.20",
        "  type: NodePort\n  externalTrafficPolicy: Local\n",
        "name: http, port: 80, nodePort: 30080",
    ) + &slice("web");
    let model = model_of(config(), &yaml);
    let node_port = at("192.168.100.11", 30080, Protocol::Tcp);
    let all = vec![
        at("10.244.1.10", 8080, Protocol::Tcp),
        at("10.244.2.10", 8080, Protocol::Tcp),
    ];
    let socket = &model.desired().frontends[&node_port];
    assert_eq!(*socket.backends, all);
    assert_eq!(socket.flags, proxy_common::FRONTEND_NODE_PORT);
    let outside = model.external().frontends[&node_port].desired();
    assert_eq!(*outside.backends, all[..1]);
    assert_eq!(outside.flags, proxy_common::FRONTEND_NODE_PORT);

    // A Service whose ClusterIP is that node address and port keeps it.
    let squatter = service("squat", "192.168.100.11", "", "name: http, port: 30080");
    let model = model_of(config(), &(yaml + &squatter));
    assert_eq!(
        model.desired().frontends[&node_port].service,
        "default/squat:http"
    );
}

/// A LoadBalancer Service at 198.51.100.1 (and an externalIP) with
/// `ranges` as its loadBalancerSourceRanges, over `slice`'s endpoints.
fn fenced(ranges: &str) -> Model {
    let yaml = service(
        "web",
        "10.96.0.20",
        &format!("{LB}  loadBalancerSourceRanges: {ranges}\n"),
        "name: http, port: 80, nodePort: 30080",
    )
    .replace(
        "---\n",
        "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}\n---\n",
    ) + &slice("web");
    model_of(config(), &yaml)
}

#[test]
fn source_ranges_restrict_load_balancer_ips_only_and_bad_ones_are_named() {
    // Spaces trimmed, host bits cleared, the other family's range left to
    // that family, a bad range named and left out.
    let model = fenced("[\" 10.255.77.1/30\", \"fd00::/64\", \"10.0.0.0/33\"]");
    let problems: Vec<String> = model.problems().iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("Service default/web")
            && problems[0].contains("loadBalancerSourceRanges")
            && problems[0].contains("10.0.0.0/33"),
        "{problems:?}"
    );
    let state = model.external();
    let lb = &state.frontends[&at("198.51.100.1", 80, Protocol::Tcp)];
    let ranges: Vec<String> = lb
        .source_ranges
        .as_deref()
        .expect("restricted")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ranges, ["10.255.77.0/30"]);
    assert_ne!(lb.desired().flags & proxy_common::FRONTEND_SOURCE_RANGES, 0);
    // kube-proxy restricts load-balancer IPs, not NodePorts or externalIPs.
    for open in [
        at("203.0.113.7", 80, Protocol::Tcp),
        at("192.168.100.11", 30080, Protocol::Tcp),
    ] {
        let frontend = &state.frontends[&open];
        assert_eq!(frontend.source_ranges, None, "{open}");
        assert_eq!(
            frontend.desired().flags & proxy_common::FRONTEND_SOURCE_RANGES,
            0
        );
    }
}

#[test]
fn ranges_none_usable_for_the_family_admit_no_one_and_say_so() {
    let model = fenced("[\"fd00::/64\"]");
    let lb = &model.external().frontends[&at("198.51.100.1", 80, Protocol::Tcp)];
    assert_eq!(lb.source_ranges.as_deref(), Some(&[][..]));
    let problems: Vec<String> = model.problems().iter().map(ToString::to_string).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("no valid IPv4 range") && p.contains("admit no client")),
        "{problems:?}"
    );
}

#[test]
fn load_balancer_ips_of_ip_mode_proxy_are_left_to_the_load_balancer() {
    let yaml = service(
        "web",
        "10.96.0.20",
        "  type: LoadBalancer\n",
        "name: http, port: 80, nodePort: 30080",
    )
    .replace(
        "---\n",
        "status: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2, ipMode: VIP}, \
         {ip: 198.51.100.3, ipMode: Proxy}, {ip: 198.51.100.4, ipMode: Tunnel}]}}\n---\n",
    ) + &slice("web");
    let model = model_of(config(), &yaml);
    let lb_ips: Vec<IpAddr> = model
        .external()
        .frontends
        .iter()
        .filter(|(_, f)| f.kind == FrontendKind::LoadBalancer)
        .map(|(addr, _)| addr.ip)
        .collect();
    let expected: Vec<IpAddr> = ["198.51.100.1", "198.51.100.2", "198.51.100.4"]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
    assert_eq!(lb_ips, expected);
    // Not for the node's own sockets either.
    let proxied: IpAddr = "198.51.100.3".parse().unwrap();
    assert!(model.desired().frontends.keys().all(|f| f.ip != proxied));
    assert_eq!(model.proxied_load_balancer_ip(proxied).len(), 1);
    let problems: Vec<String> = model.problems().iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("198.51.100.4") && problems[0].contains("\"Tunnel\""),
        "{problems:?}"
    );
}
