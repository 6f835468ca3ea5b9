//! Privileged tests of IPv6 and dual-stack ClusterIP Services at the
//! socket (issue 17): TCP and UDP through an IPv6 VIP, what getpeername
//! shows, a Service of both families, IPv4-mapped addresses, bad IPv6
//! input, a restart under IPv6 traffic and connected UDP sockets ended when
//! their backend leaves.
//!
//! Each test first proves the lab itself carries IPv6 (the node reaches
//! every pod's server straight over it), so a failure past that point is
//! the agent's.
//!
//! They need root, so they are `#[ignore]`d in a plain `cargo test`;
//! `cargo xtask test` builds the agent and runs them with `--ignored`.

mod common;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    thread,
    time::{Duration, Instant},
};

use xtask::lab::{Agent, FAR_CLIENT6, Lab, Pod, TwoNodeLab, agent_binary, manifests};

use common::{
    Conversation, HTTP, HTTP_BACKEND, assert_printed, assert_refused_at_once,
    assert_restart_loses_nothing, request_counts, wait_for_frontend, web_lab,
};

/// One Service CIDR per family, as a dual-stack cluster has.
const SERVICE_CIDRS: &[&str] = &["--service-cidr", "10.96.0.0/12,fd10:96::/112"];
const WEB6_VIP: &str = "fd10:96::10";
const DNS: &[(&str, i64, &str)] = &[("dns", 53, "UDP")];
const DNS_BACKEND: &[(&str, u16, &str)] = &[("dns", 5353, "UDP")];

/// What a lab's pods serve, on which port.
#[derive(Clone, Copy)]
enum Serves {
    Http(u16),
    Dns(u16),
}

/// Proves the lab carries IPv6 before any agent runs: from the node, each
/// pod's server answers straight at the pod's IPv6 address, and nginx saw
/// the node's IPv6 address on the bridge as the client.
fn assert_pods_answer_over_ipv6(lab: &Lab, pods: &[Pod], serves: Serves) {
    for pod in pods {
        let (out, expected) = match serves {
            Serves::Http(port) => (
                lab.run_client(
                    "curl",
                    &[
                        "-s",
                        "-g",
                        "--max-time",
                        "5",
                        &format!("http://[{}]:{port}/", pod.ip6),
                        &format!("http://[{}]:{port}/peer", pod.ip6),
                    ],
                )
                .unwrap(),
                format!("{}\n{}", pod.name, lab.bridge_ip6()),
            ),
            Serves::Dns(port) => (
                lab.run_client(
                    "dig",
                    &[
                        "-6",
                        &format!("@{}", pod.ip6),
                        "-p",
                        &port.to_string(),
                        "whoami.lab",
                        "TXT",
                        "+short",
                        "+tries=2",
                        "+timeout=2",
                    ],
                )
                .unwrap(),
                format!("\"{}\"", pod.name),
            ),
        };
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected,
            "the lab does not reach {} at {} over IPv6: {}",
            pod.name,
            pod.ip6,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A lab of nginx pods on 8080 that answer over IPv6.
fn web6_lab(names: &[&str]) -> (Lab, Vec<Pod>) {
    let (lab, pods) = web_lab(names);
    assert_pods_answer_over_ipv6(&lab, &pods, Serves::Http(8080));
    (lab, pods)
}

/// A lab of dnsmasq pods on 5353 that answer over IPv6.
fn dns6_lab(names: &[&str]) -> (Lab, Vec<Pod>) {
    let mut lab = Lab::new().unwrap();
    let pods: Vec<Pod> = names
        .iter()
        .map(|name| {
            let pod = lab.add_pod(name).unwrap();
            lab.serve_dns(&pod, 5353).unwrap();
            pod
        })
        .collect();
    assert_pods_answer_over_ipv6(&lab, &pods, Serves::Dns(5353));
    (lab, pods)
}

/// The IPv6-only HTTP Service `name` at `vip`:80 over `pods`' port 8080.
fn web6_manifest(name: &str, vip: &str, pods: &[&Pod]) -> String {
    let endpoints: Vec<(Ipv6Addr, bool)> = pods.iter().map(|p| (p.ip6, true)).collect();
    manifests::documents(&[
        manifests::dual_stack_service(name, &[vip], HTTP),
        manifests::endpoint_slice_v6(&format!("{name}-1"), name, HTTP_BACKEND, &endpoints),
    ])
}

/// The IPv6-only UDP Service `dns` at `vip`:53 over `pods`' port 5353.
fn dns6_manifest(vip: &str, pods: &[&Pod]) -> String {
    let endpoints: Vec<(Ipv6Addr, bool)> = pods.iter().map(|p| (p.ip6, true)).collect();
    manifests::documents(&[
        manifests::dual_stack_service("dns", &[vip], DNS),
        manifests::endpoint_slice_v6("dns-1", "dns", DNS_BACKEND, &endpoints),
    ])
}

fn start_dual_stack_agent(lab: &Lab) -> Agent {
    lab.start_agent_with(&agent_binary(), SERVICE_CIDRS)
        .unwrap()
}

/// `vip` as a URL's host and as the listing shows a frontend's address.
fn bracketed(vip: &str) -> String {
    format!("[{vip}]")
}

/// Waits until the maps hold the frontend `frontend` (address:port, an
/// IPv6 address in brackets).
fn wait_for_vip(agent: &Agent, frontend: &str) {
    let started = Instant::now();
    while !agent
        .services_json()
        .unwrap()
        .contains(&format!("\"frontend\": \"{frontend}\""))
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{frontend} never appeared:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls the pinned maps until the IPv6 VIP's port 80 has exactly the
/// backends `expected`:8080.
fn wait_for_backends6(agent: &Agent, vip: &str, expected: &[Ipv6Addr], within: Duration) {
    let started = Instant::now();
    let frontend = format!("\"frontend\": \"[{vip}]:80\"");
    loop {
        let json = agent.services_json().expect("services");
        if json.contains(&frontend)
            && expected
                .iter()
                .all(|ip| json.contains(&format!("\"[{ip}]:8080\"")))
            && json.matches("\"address\"").count() == expected.len()
        {
            return;
        }
        assert!(
            started.elapsed() < within,
            "the maps did not reach {expected:?} within {within:?}:\n{json}\nagent log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The lab itself, with no agent: every pod's nginx and dnsmasq answer at
/// its IPv6 address, and nginx sees the node's IPv6 address.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_lab_reaches_every_pod_directly() {
    let (mut lab, pods) = web6_lab(&["pod-a", "pod-b"]);
    for pod in &pods {
        lab.serve_dns(pod, 5353).unwrap();
    }
    assert_pods_answer_over_ipv6(&lab, &pods, Serves::Dns(5353));
    // And IPv4 as before.
    let out = lab
        .run_client(
            "curl",
            &[
                "-s",
                "--max-time",
                "5",
                &format!("http://{}:8080/peer", pods[0].ip),
            ],
        )
        .unwrap();
    assert_printed(&out, &lab.bridge_ip().to_string());
}

/// The two-node lab, with no agent: node 1's pod is reached over IPv6
/// from the other node (its route to node 1's pods), from the external
/// client and from the far client one router further out (routed to node
/// 1 as a router would), and each sees the client's own address.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_two_node_lab_routes_every_client_to_the_pods() {
    let mut lab = TwoNodeLab::new().unwrap();
    let pod = lab.node_mut(1).add_pod("pod-a").unwrap();
    lab.node_mut(1).serve_http(&pod, 8080).unwrap();
    lab.route_via_node(&lab.node(1).pod_cidr6(), 1).unwrap();
    assert_eq!(lab.add_far_client(1280).unwrap(), xtask::lab::FAR_CLIENT);
    let url = format!("http://[{}]:8080/peer", pod.ip6);
    let args = ["-s", "-g", "--max-time", "5", url.as_str()];
    let clients = [
        (lab.node(2).client("curl"), lab.node_ip6(2)),
        (lab.external("curl"), lab.client_ip6()),
        (lab.far("curl"), FAR_CLIENT6),
    ];
    for (mut command, source) in clients {
        let out = command.args(args).output().unwrap();
        assert_printed(&out, &source.to_string());
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_tcp_spreads_over_every_pod() {
    let (lab, pods) = web6_lab(&["pod-a", "pod-b", "pod-c"]);
    lab.write_manifest(
        "web6.yaml",
        &web6_manifest("web6", WEB6_VIP, &pods.iter().collect::<Vec<_>>()),
    )
    .unwrap();
    let agent = start_dual_stack_agent(&lab);
    wait_for_frontend(&agent, &bracketed(WEB6_VIP), Duration::from_secs(10));

    let counts = request_counts(&lab, &bracketed(WEB6_VIP), 150);
    assert_eq!(counts.get(""), None, "failed requests: {counts:?}");
    for pod in &pods {
        assert!(
            counts.get(&pod.name).is_some_and(|n| *n > 0),
            "{} answered none: {counts:?}",
            pod.name
        );
    }
    // The per-slot counts of the IPv6 map: each pod's slot counted what
    // it answered.
    let listed: serde_json::Value =
        serde_json::from_str(&agent.services_stats_json().unwrap()).unwrap();
    let web = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["frontend"] == format!("[{WEB6_VIP}]:80"))
        .expect("the IPv6 web frontend");
    assert_eq!(web["translations"], 150, "{web}");
    for pod in &pods {
        let slot = web["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["address"] == format!("[{}]:8080", pod.ip6))
            .unwrap_or_else(|| panic!("no slot of {}: {web}", pod.name));
        assert_eq!(slot["translations"], counts[&pod.name], "{web}");
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_service_without_endpoints_refuses_at_once() {
    const VIP: &str = "fd10:96::20";
    let (lab, pods) = web6_lab(&["pod-a"]);
    lab.write_manifest(
        "empty.yaml",
        &manifests::documents(&[
            manifests::dual_stack_service("empty", &[VIP], HTTP),
            // Only an endpoint that is not ready: no backends at all.
            manifests::endpoint_slice_v6("empty-1", "empty", HTTP_BACKEND, &[(pods[0].ip6, false)]),
        ]),
    )
    .unwrap();
    let agent = start_dual_stack_agent(&lab);

    // create_connection resolves the IPv6 literal to an AF_INET6 socket.
    assert_refused_at_once(&lab, &agent, VIP);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_unconnected_udp_dns_answers_from_the_vip() {
    const VIP: &str = "fd10:96::53";
    let (lab, pods) = dns6_lab(&["dns-a", "dns-b"]);
    lab.write_manifest("dns.yaml", &dns6_manifest(VIP, &[&pods[0], &pods[1]]))
        .unwrap();
    let agent = start_dual_stack_agent(&lab);
    wait_for_vip(&agent, &format!("[{VIP}]:53"));

    // dig discards replies that do not come from the server it asked: an
    // answer is one the VIP sent (sendmsg6 and recvmsg6).
    for _ in 0..5 {
        let dig = lab
            .run_client(
                "dig",
                &[
                    "-6",
                    &format!("@{VIP}"),
                    "-p",
                    "53",
                    "whoami.lab",
                    "TXT",
                    "+short",
                    "+tries=1",
                    "+timeout=2",
                ],
            )
            .unwrap();
        let answer = String::from_utf8_lossy(&dig.stdout).trim().to_owned();
        assert!(
            answer == "\"dns-a\"" || answer == "\"dns-b\"",
            "dig answered {answer:?}: {}\n{}",
            String::from_utf8_lossy(&dig.stderr),
            agent.log()
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_connected_udp_and_getpeername_show_the_vip() {
    const DNS_VIP: &str = "fd10:96::53";
    let (mut lab, pods) = web6_lab(&["pod-a"]);
    lab.serve_dns(&pods[0], 5353).unwrap();
    assert_pods_answer_over_ipv6(&lab, &pods, Serves::Dns(5353));
    lab.write_manifest(
        "services.yaml",
        &manifests::documents(&[
            web6_manifest("web6", WEB6_VIP, &[&pods[0]]),
            dns6_manifest(DNS_VIP, &[&pods[0]]),
        ]),
    )
    .unwrap();
    let agent = start_dual_stack_agent(&lab);
    wait_for_vip(&agent, &format!("[{DNS_VIP}]:53"));
    wait_for_frontend(&agent, &bracketed(WEB6_VIP), Duration::from_secs(10));

    // A connected UDP socket (connect6, recvmsg6, getpeername6).
    let out = lab
        .python(include_str!("clients/dns6.py"), &[DNS_VIP, "pod-a"])
        .unwrap();
    assert_printed(&out, &format!("{DNS_VIP} 53 {DNS_VIP} 53 pod-a"));
    // A TCP socket: peer.py prints the whole IPv6 peer (flow info and
    // scope too).
    let out = lab
        .python(include_str!("clients/peer.py"), &[WEB6_VIP, "80"])
        .unwrap();
    assert_printed(&out, &format!("{WEB6_VIP} 80 0 0 pod-a"));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn dual_stack_service_answers_on_both_families() {
    const VIP4: &str = "10.96.0.20";
    const VIP6: &str = "fd10:96::20";
    let (lab, pods) = web6_lab(&["pod-a", "pod-b"]);
    let endpoints4: Vec<(Ipv4Addr, bool)> = pods.iter().map(|p| (p.ip, true)).collect();
    let endpoints6: Vec<(Ipv6Addr, bool)> = pods.iter().map(|p| (p.ip6, true)).collect();
    lab.write_manifest(
        "both.yaml",
        &manifests::documents(&[
            manifests::dual_stack_service("both", &[VIP4, VIP6], HTTP),
            manifests::endpoint_slice("both-v4", "both", HTTP_BACKEND, &endpoints4),
            manifests::endpoint_slice_v6("both-v6", "both", HTTP_BACKEND, &endpoints6),
        ]),
    )
    .unwrap();
    let agent = start_dual_stack_agent(&lab);
    wait_for_frontend(&agent, VIP4, Duration::from_secs(10));
    wait_for_frontend(&agent, &bracketed(VIP6), Duration::from_secs(10));

    for host in [VIP4.to_owned(), bracketed(VIP6)] {
        let counts = request_counts(&lab, &host, 20);
        assert_eq!(
            counts.values().sum::<usize>(),
            20,
            "through {host}: {counts:?}"
        );
        assert_eq!(counts.get(""), None, "through {host}: {counts:?}");
    }
    // Each family reaches the pods in its own: the pod sees the node's
    // address of the VIP's family.
    let peer = |host: &str| {
        let out = lab
            .run_client(
                "curl",
                &[
                    "-s",
                    "-g",
                    "--max-time",
                    "5",
                    &format!("http://{host}/peer"),
                ],
            )
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let through6 = peer(&bracketed(VIP6));
    assert_eq!(
        through6.parse::<Ipv6Addr>().ok(),
        Some(lab.bridge_ip6()),
        "through {VIP6} the pod saw {through6:?}"
    );
    let through4 = peer(VIP4);
    assert_eq!(
        through4.parse::<Ipv4Addr>().ok(),
        Some(lab.bridge_ip()),
        "through {VIP4} the pod saw {through4:?}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv4_mapped_address_of_an_ipv4_service_is_balanced() {
    const VIP: &str = "10.96.0.30";
    let (lab, pods) = web6_lab(&["pod-a"]);
    lab.write_manifest(
        "web4.yaml",
        &manifests::documents(&[
            manifests::service("web4", VIP, HTTP),
            manifests::endpoint_slice("web4-1", "web4", HTTP_BACKEND, &[(pods[0].ip, true)]),
        ]),
    )
    .unwrap();
    let agent = start_dual_stack_agent(&lab);
    wait_for_frontend(&agent, VIP, Duration::from_secs(10));

    // An AF_INET6 socket that speaks IPv4 through a mapped address: the
    // kernel runs the IPv6 hooks on it.
    let mapped = format!("::ffff:{VIP}");
    let out = lab
        .python(include_str!("clients/mapped_peer.py"), &[&mapped, "80"])
        .unwrap();
    assert_printed(&out, &format!("{mapped} 80 pod-a"));
}

/// True if `line` names `address` as a whole, not as a part of a longer
/// address (`::` is in most IPv6 addresses).
fn names_address(line: &str, address: &str) -> bool {
    let part_of_an_address = |c: char| c.is_ascii_hexdigit() || c == ':' || c == '.';
    line.match_indices(address).any(|(at, _)| {
        !line[..at].ends_with(part_of_an_address)
            && !line[at + address.len()..].starts_with(part_of_an_address)
    })
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_bad_input_is_refused_by_name_and_the_rest_served() {
    let (lab, pods) = web6_lab(&["pod-a"]);
    // (file and object, what is written, the address the warning names)
    let mut bad: Vec<(&str, String, String)> = [
        ("loopback6", "::1"),
        ("unspecified6", "::"),
        ("link-local6", "fe80::1"),
        ("multicast6", "ff02::1"),
        ("mapped6", "::ffff:10.96.0.40"),
        ("outside6", "fd99::1"),
    ]
    .into_iter()
    .map(|(name, vip)| {
        let yaml = manifests::dual_stack_service(name, &[vip], HTTP);
        (name, yaml, vip.to_owned())
    })
    .collect();
    let mut families = manifests::dual_stack_service_object("families", &["fd10:96::41"], HTTP);
    families.spec.as_mut().unwrap().ip_families = Some(vec!["IPv4".to_owned()]);
    bad.push((
        "families",
        manifests::yaml(&families),
        "fd10:96::41".to_owned(),
    ));
    // An IPv6 slice of the good Service, with an IPv4 address in it.
    let ipv4_address = pods[0].ip.to_string();
    bad.push((
        "web6-2",
        manifests::endpoint_slice_as_written(
            "web6-2",
            "web6",
            "IPv6",
            HTTP_BACKEND,
            &[&ipv4_address],
        ),
        ipv4_address.clone(),
    ));
    for (name, yaml, _) in &bad {
        lab.write_manifest(&format!("{name}.yaml"), yaml).unwrap();
    }
    lab.write_manifest("web6.yaml", &web6_manifest("web6", WEB6_VIP, &[&pods[0]]))
        .unwrap();
    let agent = start_dual_stack_agent(&lab);
    wait_for_backends6(&agent, WEB6_VIP, &[pods[0].ip6], Duration::from_secs(10));

    let counts = request_counts(&lab, &bracketed(WEB6_VIP), 10);
    assert_eq!(counts.get("pod-a"), Some(&10), "{counts:?}");
    let listed = agent.services_json().unwrap();
    assert_eq!(
        listed.matches("\"frontend\"").count(),
        1,
        "only the good Service has a frontend:\n{listed}"
    );
    let log = agent.log();
    for (name, _, address) in &bad {
        let kind = if name.starts_with("web6") {
            "EndpointSlice"
        } else {
            "Service"
        };
        let object = format!("{kind} default/{name}");
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(&object) && names_address(l, address)),
            "no warning naming {object} and {address}:\n{log}"
        );
    }
    assert!(agent.is_running());
}

/// Mirrors the IPv4 restart test in lifecycle.rs with IPv6 traffic.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_restart_under_traffic_loses_nothing() {
    let (lab, pods) = web6_lab(&["pod-a", "pod-b", "pod-c"]);
    lab.write_manifest(
        "web6.yaml",
        &web6_manifest("web6", WEB6_VIP, &pods.iter().collect::<Vec<_>>()),
    )
    .unwrap();
    let agent = start_dual_stack_agent(&lab);
    wait_for_frontend(&agent, &bracketed(WEB6_VIP), Duration::from_secs(10));
    let agent = assert_restart_loses_nothing(&lab, agent, &bracketed(WEB6_VIP), || {
        start_dual_stack_agent(&lab)
    });

    // And it stays correct: it follows the next edit.
    lab.write_manifest("web6.yaml", &web6_manifest("web6", WEB6_VIP, &[&pods[0]]))
        .unwrap();
    wait_for_backends6(&agent, WEB6_VIP, &[pods[0].ip6], Duration::from_secs(1));
    let counts = request_counts(&lab, &bracketed(WEB6_VIP), 30);
    assert_eq!(counts.get("pod-a"), Some(&30), "{counts:?}");
}

/// Mirrors `connected_udp_sockets_leave_a_backend_that_leaves_the_service`
/// in clusterip.rs over IPv6: a connected UDP socket translated to a
/// backend that leaves the Service is ended, while a socket straight to
/// that pod's address is left alone.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_connected_udp_socket_ends_when_its_backend_leaves() {
    const VIP: &str = "fd10:96::253";
    let (mut lab, pods) = dns6_lab(&["dns-a", "dns-b"]);
    let client = lab.add_pod("client").unwrap();
    lab.write_manifest("dns.yaml", &dns6_manifest(VIP, &[&pods[0], &pods[1]]))
        .unwrap();
    let agent = start_dual_stack_agent(&lab);
    wait_for_vip(&agent, &format!("[{VIP}]:53"));

    let mut held = Conversation::start({
        let mut command = lab.pod_client(&client, "python3");
        command.args([
            "-c",
            include_str!("clients/held_udp.py"),
            "service-and-pod",
            VIP,
            &pods[0].ip6.to_string(),
        ]);
        command
    });
    assert_eq!(held.ask(), "dns-a dns-a", "{}", agent.log());

    lab.write_manifest("dns.yaml", &dns6_manifest(VIP, &[&pods[1]]))
        .unwrap();
    agent
        .wait_for_log("ended sockets still connected", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        held.ask(),
        // Ended and disconnected: the next send has no address.
        "EDESTADDRREQ dns-b dns-a",
        "{}",
        agent.log()
    );
}

/// The bad-input test's reading of a warning finds an address only as a
/// whole.
#[test]
fn names_address_matches_whole_addresses_only() {
    assert!(names_address("clusterIP \"::\" is unspecified", "::"));
    assert!(names_address("clusterIP :: is unspecified", "::"));
    assert!(!names_address("clusterIP fd10:96::41 is outside", "::"));
    assert!(names_address(
        "address 10.244.0.10 is not IPv6",
        "10.244.0.10"
    ));
    assert!(!names_address("address 10.244.0.100", "10.244.0.10"));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn ipv6_run_trace_logs_each_translation() {
    let (lab, pods) = web6_lab(&["pod-a"]);
    lab.write_manifest("web6.yaml", &web6_manifest("web6", WEB6_VIP, &[&pods[0]]))
        .unwrap();
    let agent = lab
        .start_agent_with(
            &agent_binary(),
            &[SERVICE_CIDRS[0], SERVICE_CIDRS[1], "--trace"],
        )
        .unwrap();
    wait_for_frontend(&agent, &bracketed(WEB6_VIP), Duration::from_secs(10));
    assert_eq!(
        request_counts(&lab, &bracketed(WEB6_VIP), 3).get("pod-a"),
        Some(&3)
    );
    let line = format!("connect [{WEB6_VIP}]:80 -> [{}]:8080", pods[0].ip6);
    agent.wait_for_log(&line, Duration::from_secs(5)).unwrap();
}
