//! Privileged tests of `--socket-lb-scope=host`: pods' connections leave
//! the pod addressed to the Service, so that a service mesh's iptables in
//! the pod see it, and are translated per packet on the pod's interface.
//!
//! They need root, so they are `#[ignore]`d in a plain `cargo test`;
//! `cargo xtask test` builds the agent and runs them with `--ignored`.

mod common;

use std::{
    collections::BTreeMap,
    fs,
    process::{Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use xtask::lab::{Agent, DUAL_STACK_FLAGS, Lab, Pod, TwoNodeLab, agent_binary, manifests};

use common::HTTP_BACKEND;

const WEB: &str = "10.96.0.90";
const WEB6: &str = "fd10:96::90";
const DNS: &str = "10.96.0.91";
/// A Service over a pod on a routed veth and one on the bridge.
const ROUTED: &str = "10.96.0.92";

/// Runs `program` in `pod` (in the lab's cgroup, as the pod's processes
/// are) and returns its output; fails the test if it cannot start.
fn in_pod(node: &Lab, pod: &Pod, program: &str, args: &[&str]) -> Output {
    node.pod_client(pod, program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("{program} in {}: {error}", pod.name))
}

/// The counting rules, each with the iptables of its family: a mesh's
/// sidecar redirect, as far as this test needs it, matches the Service
/// address in the pod's own OUTPUT chain.
const COUNTED: [(&str, &str, &str, &str); 4] = [
    ("iptables", WEB, "tcp", "80"),
    ("ip6tables", WEB6, "tcp", "80"),
    ("iptables", DNS, "udp", "53"),
    ("iptables", ROUTED, "tcp", "80"),
];

fn add_counting_rules(node: &Lab, pod: &Pod) {
    for (iptables, address, proto, port) in COUNTED {
        let out = in_pod(
            node,
            pod,
            iptables,
            &[
                "-w", "-A", "OUTPUT", "-d", address, "-p", proto, "--dport", port,
            ],
        );
        assert!(out.status.success(), "{iptables}: {out:?}");
    }
}

/// The packets the pod's OUTPUT rules counted to each Service address, and
/// the counters zeroed.
fn counted_and_zeroed(node: &Lab, pod: &Pod) -> BTreeMap<String, u64> {
    let mut counted = BTreeMap::new();
    for iptables in ["iptables", "ip6tables"] {
        let out = in_pod(
            node,
            pod,
            iptables,
            &["-w", "-L", "OUTPUT", "-v", "-n", "-x", "-Z"],
        );
        assert!(out.status.success(), "{iptables}: {out:?}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = COUNTED
                .iter()
                .map(|(_, address, _, _)| *address)
                .find(|address| {
                    fields
                        .iter()
                        .any(|f| f.trim_end_matches("/128") == *address)
                });
            if let (Some(address), Some(Ok(packets))) =
                (address, fields.first().map(|f| f.parse::<u64>()))
            {
                counted.insert(address.to_owned(), packets);
            }
        }
    }
    counted
}

/// `count` HTTP requests from `pod` to the web Service at `address`, each
/// on a new connection, and how many each backend answered ("" for
/// failures).
fn answers(node: &Lab, pod: &Pod, address: &str, count: usize) -> BTreeMap<String, usize> {
    let url = if address.contains(':') {
        format!("http://[{address}]/")
    } else {
        format!("http://{address}/")
    };
    // Room for a SYN sent again twice (1 s, then 3 s): in these namespaces
    // a first packet to the other node's pod is now and then lost while
    // its neighbours are found, with or without this proxy.
    let mut args = vec!["-s", "-g", "--max-time", "60", "--connect-timeout", "5"];
    args.extend(std::iter::repeat_n(url.as_str(), count));
    let out = in_pod(node, pod, "curl", &args);
    let mut counts = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
    let answered: usize = counts.values().sum();
    if answered < count {
        *counts.entry(String::new()).or_default() += count - answered;
    }
    counts
}

/// Asserts that all `count` requests were answered, by every one of
/// `backends`.
fn assert_answered_by(node: &Lab, pod: &Pod, address: &str, count: usize, backends: &[&str]) {
    let counts = answers(node, pod, address, count);
    assert_eq!(counts.get(""), None, "{address}: {counts:?}");
    for backend in backends {
        assert!(
            counts.contains_key(*backend),
            "{address}: {backend} never answered: {counts:?}"
        );
    }
}

/// The DNS Service's answer to `pod`; dig drops a reply from any other
/// address than the one it asked, so an answer is also the reply's source
/// shown as the Service.
fn dns_answer(node: &Lab, pod: &Pod) -> String {
    let out = in_pod(
        node,
        pod,
        "dig",
        &[
            &format!("@{DNS}"),
            "+short",
            "+tries=2",
            "+time=2",
            "whoami.lab",
            "TXT",
        ],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A few requests of each family whose answers do not count: in these
/// namespaces the first packets to a pod over IPv6 can be lost while the
/// neighbour and route caches fill (TCP sends them again a second later,
/// past the requests' patience), with or without this proxy.
fn warm(node: &Lab, pod: &Pod) {
    for address in [WEB, WEB6] {
        answers(node, pod, address, 6);
    }
}

/// The devices whose pinned tc links hold the pods' program.
fn pod_links(node: &Lab) -> Vec<String> {
    let mut links: Vec<String> = fs::read_dir(node.bpffs().join("links"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|entry| {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("tc_pod_ingress@").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    links.sort();
    links
}

/// Polls `done` until it holds, for at most `within`; fails the test with
/// `what` and the agent's log.
fn wait_until(agent: &Agent, what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The lab's pods that the test talks from or checks.
struct Pods {
    /// web-1a, on node 1's bridge.
    near: Pod,
    /// A client on node 1's bridge, with the counting rules.
    client: Pod,
    /// A client on a routed veth of node 1, with the counting rules.
    routed_client: Pod,
}

/// Two nodes: on node 1's bridge a web pod and a client pod, and on routed
/// veths of node 1 a web pod and a client pod, both clients with the
/// counting rules; on node 2 a web pod and a DNS pod. A dual-stack web
/// Service over both bridge web pods, a DNS Service over UDP, and a
/// Service over node 1's routed and bridge web pods.
fn mesh_lab() -> (TwoNodeLab, Pods) {
    let mut lab = TwoNodeLab::new().expect("lab");
    let near = lab.add_web_pod(1, "web-1a").expect("pod");
    let far = lab.add_web_pod(2, "web-2a").expect("pod");
    let dns = {
        let node = lab.node_mut(2);
        let pod = node.add_pod("dns-2a").expect("pod");
        node.serve_dns(&pod, 5353).expect("dnsmasq");
        pod
    };
    let client = lab.node_mut(1).add_pod("client-1").expect("pod");
    let routed_web = lab.node_mut(1).add_routed_pod("routed-web").expect("pod");
    lab.node_mut(1)
        .serve_http(&routed_web, 8080)
        .expect("nginx");
    let routed_client = lab
        .node_mut(1)
        .add_routed_pod("routed-client")
        .expect("pod");
    lab.write_manifest(
        "mesh.yaml",
        &manifests::documents(&[
            manifests::dual_stack_service("web", &[WEB, WEB6], common::HTTP),
            manifests::endpoint_slice_on_nodes(
                "web-1",
                "web",
                HTTP_BACKEND,
                &[(near.ip, "node-1"), (far.ip, "node-2")],
            ),
            manifests::endpoint_slice_on_nodes(
                "web-2",
                "web",
                HTTP_BACKEND,
                &[(near.ip6, "node-1"), (far.ip6, "node-2")],
            ),
            manifests::service("dns", DNS, &[("dns", 53, "UDP")]),
            manifests::endpoint_slice_on_nodes(
                "dns-1",
                "dns",
                &[("dns", 5353, "UDP")],
                &[(dns.ip, "node-2")],
            ),
            manifests::service("routed", ROUTED, common::HTTP),
            manifests::endpoint_slice_on_nodes(
                "routed-1",
                "routed",
                HTTP_BACKEND,
                &[(routed_web.ip, "node-1"), (near.ip, "node-1")],
            ),
        ]),
    )
    .expect("manifest");
    for pod in [&client, &routed_client] {
        add_counting_rules(lab.node(1), pod);
    }
    let pods = Pods {
        near,
        client,
        routed_client,
    };
    (lab, pods)
}

/// Issue 18, item 2. A client pod on node 1 counts, with iptables rules in
/// its own OUTPUT chain, its packets to three Service addresses. With
/// `--socket-lb-scope=host` the rules see them, and the Services still
/// answer: HTTP over both families from a pod on the client's node (the
/// reply crosses only the bridge) and one on node 2 (it crosses the
/// nodes' routing), DNS over UDP from node 2, with the Service's address
/// as the replies' source; a pod reaches itself through its Service; a
/// pod on a routed veth (as Calico and Cilium wire them) reaches a Service
/// over a routed pod of its own node and a bridge one; a pod made after
/// the agent started is served at once. With `all`, the
/// default, the rules see nothing (the socket went to the pod at
/// `connect()`), the pods' interfaces lose their programs, and the
/// Services answer the same.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn socket_lb_scope_host_lets_the_pods_iptables_see_the_service() {
    let (mut lab, pods) = mesh_lab();
    let Pods {
        near,
        client,
        routed_client,
    } = &pods;
    let mut flags = vec![
        "--socket-lb-scope",
        "host",
        // The pods' bridge as a NodePort device too, as a bridge CNI's is
        // on a node whose every address serves NodePorts: the pods'
        // translated packets come into the node through it.
        "--devices",
        "eth0,br0",
        // Longer than the test: a pod's interface must be picked up as it
        // appears, not on the next housekeeping.
        "--iptables-sync-period",
        "600s",
    ];
    flags.extend(DUAL_STACK_FLAGS);
    let mut agent = lab.start_agent(1, &agent_binary(), &flags).expect("agent");
    // Both of node 1's pods, the client and web-1a.
    wait_until(
        &agent,
        "the pods' interfaces got their program",
        Duration::from_secs(10),
        // node 1's four pods, two on the bridge and two routed.
        || pod_links(lab.node(1)).len() == 4,
    );

    warm(lab.node(1), client);
    counted_and_zeroed(lab.node(1), client);
    for address in [WEB, WEB6] {
        assert_answered_by(lab.node(1), client, address, 30, &["web-1a", "web-2a"]);
    }
    assert_eq!(dns_answer(lab.node(1), client), "\"dns-2a\"");
    let counted = counted_and_zeroed(lab.node(1), client);
    // 30 connections of at least a SYN, an ACK and a request each.
    assert!(counted[WEB] >= 90 && counted[WEB6] >= 90, "{counted:?}");
    assert!(counted[DNS] >= 1, "{counted:?}");

    // doctor names the pods' interfaces by their role, not one by one.
    let mut doctor = lab.node(1).in_node(agent_binary());
    doctor.stdin(Stdio::null());
    let healthz = agent.address("healthz").unwrap();
    let checks = common::doctor_in(doctor, lab.node(1), &healthz).1;
    common::assert_check(
        &checks,
        "masquerade",
        "OK",
        "tc programs on br0, eth0, the pods' interfaces (--socket-lb-scope=host)",
    );

    // A pod reaching itself through its Service (hairpin): masqueraded, as
    // kube-proxy does, or it would see its own address as the source.
    assert_answered_by(lab.node(1), near, WEB, 20, &["web-1a"]);

    // Routed veths: pod to pod on one node (the reply goes from one routed
    // veth to the other through the node's routing) and to the bridge.
    assert_answered_by(
        lab.node(1),
        routed_client,
        ROUTED,
        20,
        &["routed-web", "web-1a"],
    );
    let counted = counted_and_zeroed(lab.node(1), routed_client);
    assert!(counted[ROUTED] >= 60, "{counted:?}");

    let late = lab.node_mut(1).add_pod("late-1").expect("pod");
    wait_until(
        &agent,
        "the pod made later was served",
        Duration::from_secs(5),
        || !answers(lab.node(1), &late, WEB, 1).contains_key(""),
    );

    agent.kill();
    let agent = lab
        .start_agent(1, &agent_binary(), DUAL_STACK_FLAGS)
        .expect("agent");
    wait_until(
        &agent,
        "the pods' interfaces lost their program",
        Duration::from_secs(10),
        || pod_links(lab.node(1)).is_empty(),
    );
    warm(lab.node(1), client);
    counted_and_zeroed(lab.node(1), client);
    for address in [WEB, WEB6] {
        assert_answered_by(lab.node(1), client, address, 10, &[]);
    }
    assert_eq!(dns_answer(lab.node(1), client), "\"dns-2a\"");
    assert_answered_by(lab.node(1), routed_client, ROUTED, 10, &[]);
    for pod in [client, routed_client] {
        let counted = counted_and_zeroed(lab.node(1), pod);
        assert!(counted.values().all(|n| *n == 0), "{counted:?}");
        assert_eq!(counted.len(), COUNTED.len(), "{counted:?}");
    }
}
