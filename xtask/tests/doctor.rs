//! Privileged tests of `doctor` and `explain` on a real lab.
//!
//! They need root, so they are `#[ignore]`d in a plain `cargo test`;
//! `cargo xtask test` builds the agent and runs them with `--ignored`.

mod common;

use std::{
    collections::BTreeMap,
    fs::{self},
    net::Ipv4Addr,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
use xtask::lab::{Lab, TwoNodeLab, agent_binary, manifests};

use common::{
    HTTP, HTTP_BACKEND, WEB_VIP, assert_check, doctor, doctor_in, request_counts,
    wait_for_backends, wait_for_frontend, web_lab, web_manifest,
};

fn assert_all_ok(ok: bool, checks: &BTreeMap<String, (String, String)>) {
    let bad: Vec<_> = checks.iter().filter(|(_, (s, _))| s != "OK").collect();
    assert!(ok && bad.is_empty(), "not all OK: {bad:#?}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_is_all_ok_on_a_healthy_lab_and_names_a_map_entry_deleted_behind_the_agent() {
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    let healthz = agent.address("healthz").unwrap();
    let (ok, checks) = doctor(&lab, &healthz);
    assert_all_ok(ok, &checks);
    assert_check(&checks, "drift", "OK", "1 frontends");
    assert_check(&checks, "sync", "OK", "last sync");

    // Slot 0 of 10.96.0.10:80/TCP, as the kernel stores the key.
    let map = lab.bpffs().join("maps").join(proxy_common::SERVICES_MAP);
    let status = Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&map)
        .args([
            "key", "10", "96", "0", "10", "0", "80", "0", "0", "6", "0", "0", "0",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let (ok, checks) = doctor(&lab, &healthz);
    assert!(!ok, "a FAIL exits 1");
    assert_check(
        &checks,
        "drift",
        "FAIL",
        "missing 10.96.0.10:80/TCP (default/web:http)",
    );
    // The agent cannot see it: it is up and believes the maps are right.
    assert_check(&checks, "sync", "OK", "/healthz 200");

    // The fix doctor gives: a restarted agent rewrites what differs.
    drop(agent);
    let agent = lab.start_agent(&agent_binary()).unwrap();
    let (ok, checks) = doctor(&lab, &agent.address("healthz").unwrap());
    assert_all_ok(ok, &checks);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_names_a_dead_agent_a_service_added_meanwhile_an_unpinned_link_and_kube_proxy() {
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let mut agent = lab.start_agent(&agent_binary()).unwrap();
    let healthz = agent.address("healthz").unwrap();

    agent.kill();
    lab.write_manifest(
        "api.yaml",
        &manifests::documents(&[
            manifests::service("api", "10.96.0.20", HTTP),
            manifests::endpoint_slice("api-1", "api", HTTP_BACKEND, &[(pods[0].ip, true)]),
        ]),
    )
    .unwrap();
    let (ok, checks) = doctor(&lab, &healthz);
    assert!(!ok);
    assert_check(&checks, "agent", "FAIL", "no agent holds");
    assert_check(&checks, "sync", "FAIL", "no answer from /healthz");
    assert_check(
        &checks,
        "drift",
        "FAIL",
        "missing 10.96.0.20:80/TCP (default/api:http)",
    );
    // What the dead agent left keeps serving, and says so.
    assert_check(&checks, "programs", "OK", "connect4");

    let mut agent = lab.start_agent(&agent_binary()).unwrap();
    let healthz = agent.address("healthz").unwrap();
    assert_all_ok(doctor(&lab, &healthz).0, &doctor(&lab, &healthz).1);
    // A running agent pins again what is removed under it (see the
    // lifecycle tests); with none, the program goes with its pin.
    agent.kill();
    fs::remove_file(lab.bpffs().join("links/connect4")).unwrap();
    let (ok, checks) = doctor(&lab, &healthz);
    assert!(!ok);
    assert_check(&checks, "programs", "FAIL", "connect4: no pinned link");

    // kube-proxy's chain where it matters: the node's network namespace.
    let created = lab
        .run_client("iptables-legacy", &["-t", "nat", "-N", "KUBE-SERVICES"])
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let mut in_node = lab.client(&agent_binary().display().to_string());
    in_node.stdin(Stdio::null());
    let (ok, checks) = doctor_in(in_node, &lab, &healthz);
    assert!(!ok);
    assert_check(&checks, "kube-proxy", "FAIL", "nat/KUBE-SERVICES");
    // The host's own rules are not the node's.
    assert_check(
        &doctor(&lab, &healthz).1,
        "kube-proxy",
        "OK",
        "no KUBE-SERVICES",
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
#[expect(
    clippy::too_many_lines,
    reason = "one lab, taken through ready, fallback and refused in turn"
)]
fn explain_says_why_each_endpoint_is_a_candidate_or_not_and_what_passes_untouched() {
    let (lab, pods) = web_lab(&["pod-a"]);
    let endpoint = |address: &str, ready: bool, serving: Option<bool>| Endpoint {
        addresses: vec![address.to_owned()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving,
            terminating: serving.map(|_| true),
        }),
        ..Endpoint::default()
    };
    let slice = |endpoints: Vec<Endpoint>| {
        manifests::endpoint_slice_of("web-1", "web", HTTP_BACKEND, endpoints)
    };
    let ready_pod = endpoint(&pods[0].ip.to_string(), true, None);
    let terminating_pod = endpoint("10.244.0.50", false, Some(true));
    let not_ready_pod = endpoint("10.244.0.51", false, None);
    lab.write_manifest(
        "web.yaml",
        &manifests::documents(&[
            manifests::service("web", WEB_VIP, HTTP),
            slice(vec![
                ready_pod,
                terminating_pod.clone(),
                not_ready_pod.clone(),
            ]),
        ]),
    )
    .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    let explain = |address: &str| {
        let out = Command::new(agent_binary())
            .args(["explain", address, "--output", "json", "--bpffs"])
            .arg(lab.bpffs())
            .arg("--manifests")
            .arg(lab.manifests_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let endpoint = |json: &serde_json::Value, backend: &str| {
        json["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["backend"] == backend)
            .unwrap_or_else(|| panic!("no endpoint {backend}: {json:#}"))
            .clone()
    };

    let json = explain("10.96.0.10:80");
    assert_eq!(json["verdict"], "forwarded", "{json:#}");
    assert_eq!(json["service"], "default/web:http");
    assert_eq!(
        json["maps"],
        serde_json::json!([format!("{}:8080", pods[0].ip)])
    );
    let ready = endpoint(&json, &format!("{}:8080", pods[0].ip));
    assert_eq!(
        (&ready["candidate"], &ready["why"]),
        (&true.into(), &"ready".into())
    );
    let terminating = endpoint(&json, "10.244.0.50:8080");
    assert_eq!(terminating["candidate"], false);
    assert!(
        terminating["why"]
            .as_str()
            .unwrap()
            .contains("no endpoint is ready")
    );
    let not_ready = endpoint(&json, "10.244.0.51:8080");
    assert_eq!(not_ready["candidate"], false);
    assert_eq!(not_ready["why"], "not ready and not serving");

    // The ready pod goes: the terminating one is the fallback.
    lab.write_manifest(
        "web.yaml",
        &manifests::documents(&[
            manifests::service("web", WEB_VIP, HTTP),
            slice(vec![terminating_pod, not_ready_pod.clone()]),
        ]),
    )
    .unwrap();
    wait_for_backends(
        &agent,
        WEB_VIP,
        &[Ipv4Addr::new(10, 244, 0, 50)],
        Duration::from_secs(5),
    );
    let json = explain("10.96.0.10:80");
    assert_eq!(json["verdict"], "forwarded", "{json:#}");
    let terminating = endpoint(&json, "10.244.0.50:8080");
    assert_eq!(terminating["candidate"], true, "{json:#}");
    assert!(terminating["why"].as_str().unwrap().contains("fallback"));

    // Nothing ready or serving: refused.
    lab.write_manifest(
        "web.yaml",
        &manifests::documents(&[
            manifests::service("web", WEB_VIP, HTTP),
            slice(vec![not_ready_pod]),
        ]),
    )
    .unwrap();
    let started = Instant::now();
    let json = loop {
        let json = explain("10.96.0.10:80");
        if json["verdict"] == "refused" || started.elapsed() > Duration::from_secs(5) {
            break json;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(json["verdict"], "refused", "{json:#}");
    assert_eq!(endpoint(&json, "10.244.0.51:8080")["candidate"], false);

    let json = explain("10.96.0.99:80");
    assert_eq!(json["verdict"], "untouched", "{json:#}");
    assert!(json["summary"].as_str().unwrap().contains("pass untouched"));
    let json = explain("10.96.0.10:81");
    assert_eq!(json["verdict"], "untouched", "{json:#}");
    assert!(
        json["notes"][0]
            .as_str()
            .unwrap()
            .contains("ClusterIP of Service default/web"),
        "{json:#}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_and_explain_read_the_ipv6_maps_too() {
    const VIP6: &str = "fd10:96::20";
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest(
        "both.yaml",
        &manifests::documents(&[
            manifests::dual_stack_service("both", &[WEB_VIP, VIP6], HTTP),
            manifests::endpoint_slice("both-v4", "both", HTTP_BACKEND, &[(pods[0].ip, true)]),
            manifests::endpoint_slice_v6("both-v6", "both", HTTP_BACKEND, &[(pods[0].ip6, true)]),
        ]),
    )
    .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    let frontend6 = format!("[{VIP6}]:80");
    wait_for_frontend(&agent, &format!("[{VIP6}]"), Duration::from_secs(10));
    let healthz = agent.address("healthz").unwrap();
    let (ok, checks) = doctor(&lab, &healthz);
    assert_all_ok(ok, &checks);
    assert_check(&checks, "drift", "OK", "2 frontends");

    let explain = Command::new(agent_binary())
        .args(["explain", &frontend6, "--output", "json", "--bpffs"])
        .arg(lab.bpffs())
        .arg("--manifests")
        .arg(lab.manifests_dir())
        .output()
        .unwrap();
    assert!(explain.status.success(), "{explain:?}");
    let json: serde_json::Value = serde_json::from_slice(&explain.stdout).unwrap();
    assert_eq!(json["verdict"], "forwarded", "{json:#}");
    assert_eq!(json["service"], "default/both:http", "{json:#}");
    assert_eq!(
        json["maps"],
        serde_json::json!([format!("[{}]:8080", pods[0].ip6)]),
        "{json:#}"
    );

    // Slot 0 of [fd10:96::20]:80/TCP in the IPv6 map, as the kernel
    // stores the key: the address's sixteen octets, the port, slot 0,
    // TCP, scope and padding.
    let vip: std::net::Ipv6Addr = VIP6.parse().unwrap();
    let mut key: Vec<String> = vip.octets().iter().map(u8::to_string).collect();
    key.extend(["0", "80", "0", "0", "6", "0", "0", "0"].map(str::to_owned));
    let map = lab.bpffs().join("maps").join(proxy_common::SERVICES6_MAP);
    let status = Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&map)
        .arg("key")
        .args(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let (ok, checks) = doctor(&lab, &healthz);
    assert!(!ok, "a FAIL exits 1");
    assert_check(
        &checks,
        "drift",
        "FAIL",
        &format!("missing {frontend6}/TCP (default/both:http)"),
    );
}

/// Issue 18: on a node, `doctor` and `explain` need no flags but
/// `--bpffs`: the running agent's record gives its source (here its
/// manifests directory), its /healthz address and its cgroup, and both
/// say so. With the agent gone they say that and fall back to defaults.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_and_explain_use_the_running_agents_settings_without_flags() {
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let mut agent = lab.start_agent(&agent_binary()).unwrap();
    let (ok, checks) = common::doctor_with(Command::new(agent_binary()), &lab, &[]);
    assert_all_ok(ok, &checks);
    assert_check(&checks, "agent", "OK", "settings of the agent running on");
    assert_check(&checks, "drift", "OK", "1 frontends");
    assert_check(&checks, "sync", "OK", "/healthz 200");

    let explain = |what: &str| {
        let out = Command::new(agent_binary())
            .args(["explain", &format!("{WEB_VIP}:80"), "--bpffs"])
            .arg(lab.bpffs())
            .output()
            .expect("explain");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{what}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let text = explain("with the agent");
    assert!(
        text.contains("default/web") && text.contains("settings of the agent running on"),
        "{text}"
    );

    agent.kill();
    let (_, checks) = common::doctor_with(Command::new(agent_binary()), &lab, &[]);
    assert_check(&checks, "agent", "FAIL", "defaults: no agent runs on");
}

/// `doctor --output json` on the lab's pins, exactly as printed, with
/// `--verbose` or without.
fn doctor_json(lab: &Lab, healthz: &str, verbose: bool) -> String {
    let mut command = Command::new(agent_binary());
    command
        .args(["doctor", "--output", "json", "--bpffs"])
        .arg(lab.bpffs())
        .arg("--cgroup")
        .arg(lab.cgroup())
        .args(["--healthz-address", healthz])
        .arg("--manifests")
        .arg(lab.manifests_dir());
    if verbose {
        command.arg("--verbose");
    }
    let out = command.output().expect("doctor");
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The number after `name ` in a check's volatile facts, as the helpers
/// give them.
fn figure(evidence: &str, name: &str) -> u64 {
    let needle = format!("\"{name} ");
    let at = evidence
        .find(&needle)
        .unwrap_or_else(|| panic!("no {name} in {evidence}"));
    evidence[at + needle.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no count of {name} in {evidence}"))
}

/// Two runs of `doctor --output json` with traffic and time
/// between them print the same bytes: pids, the sync's age, the event
/// counts and the maps' fills are volatile, and only `--verbose` puts them
/// in. The event counts are judged: an unconnected UDP socket that loses
/// a translation slot warns, the count given only with `--verbose`.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_json_is_the_same_across_traffic_and_verbose_adds_the_counts() {
    let (lab, pods) = web_lab(&["pod-a"]);
    // Five UDP Services of one endpoint each, none answering: one socket
    // sending to all of them needs five translation slots.
    let mut documents = vec![web_manifest(&[&pods[0]])];
    for i in 1..=5 {
        let name = format!("dns-{i}");
        documents.push(manifests::service(
            &name,
            &format!("10.96.2.{i}"),
            &[("dns", 53, "UDP")],
        ));
        documents.push(manifests::endpoint_slice(
            &format!("{name}-1"),
            &name,
            &[("dns", 53, "UDP")],
            &[(Ipv4Addr::new(10, 244, 0, 60 + i), true)],
        ));
    }
    lab.write_manifest("all.yaml", &documents.join("---\n"))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    wait_for_frontend(&agent, WEB_VIP, Duration::from_secs(10));
    let healthz = agent.address("healthz").unwrap();

    let before = doctor_json(&lab, &healthz, false);
    let verbose_before = doctor_json(&lab, &healthz, true);
    // The sync's age is in whole seconds.
    thread::sleep(Duration::from_millis(1100));
    let answered = request_counts(&lab, WEB_VIP, 10);
    assert_eq!(answered.get(""), None, "{answered:?}");
    let after = doctor_json(&lab, &healthz, false);
    let verbose_after = doctor_json(&lab, &healthz, true);
    assert_eq!(before, after, "the JSON changed with traffic and time");
    assert!(
        !before.contains("volatile") && !before.contains("pid "),
        "{before}"
    );
    assert_ne!(verbose_before, verbose_after, "--verbose has the counts");
    let (ok, checks) = doctor(&lab, &healthz);
    assert!(ok, "{checks:#?}");
    assert_check(&checks, "agent", "OK", &format!("pid {}", agent.pid()));
    assert_check(&checks, "sync", "OK", "last sync");
    assert_check(&checks, "counters", "OK", "externalTrafficPolicy Local");
    assert!(
        figure(&checks["counters"].1, "forwarded") >= 10,
        "{checks:#?}"
    );
    assert_check(&checks, "maps", "OK", "lb4_svc_v2 ");

    let out = lab
        .python(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             for i in range(1, 6): s.sendto(b'x', ('10.96.2.%d' % i, 53))\n",
            &[],
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (ok, checks) = doctor(&lab, &healthz);
    assert!(ok, "a WARN exits 0: {checks:#?}");
    assert_check(
        &checks,
        "counters",
        "WARN",
        "rev_nat_evicted: an unconnected UDP socket",
    );
    assert_eq!(figure(&checks["counters"].1, "rev_nat_evicted"), 1);
    let plain = doctor_json(&lab, &healthz, false);
    assert!(!plain.contains("rev_nat_evicted 1"), "{plain}");
}

/// A held xtables lock names its holder, and doctor does not
/// wait for it. The lock is a file of the test's own, through iptables'
/// XTABLES_LOCKFILE, so the node's iptables never wait on the test.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_names_who_holds_the_xtables_lock_without_waiting() {
    let lab = Lab::new().expect("lab");
    let lock = std::env::temp_dir().join(format!("doctor-xtables-{}.lock", std::process::id()));
    fs::write(&lock, "").unwrap();
    let doctor_here = || {
        let mut command = Command::new(agent_binary());
        command.env("XTABLES_LOCKFILE", &lock);
        let started = Instant::now();
        let checks = doctor_in(command, &lab, "127.0.0.1:1").1;
        (checks, started.elapsed())
    };
    let (checks, _) = doctor_here();
    assert_check(&checks, "xtables-lock", "OK", "is free");

    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "60"])
        .spawn()
        .expect("flock");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Command::new("flock")
        .arg("--nonblock")
        .arg(&lock)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "flock did not take the lock");
        thread::sleep(Duration::from_millis(20));
    }
    let (checks, took) = doctor_here();
    let _ = holder.kill();
    let _ = holder.wait();
    fs::remove_file(&lock).unwrap();
    assert_check(&checks, "xtables-lock", "WARN", "is held by flock");
    assert_check(
        &checks,
        "xtables-lock",
        "WARN",
        &format!("flock is pid {}", holder.id()),
    );
    // Its five tries take half a second; the rest is the other checks.
    assert!(took < Duration::from_secs(20), "doctor took {took:?}");
}

/// On a node whose tc programs drop NodePort packets of a
/// Service of policy Local with no endpoint there, doctor counts the drops
/// as kube-proxy's behaviour, not a problem; and it reads br_netfilter in
/// the node's own namespace, where the pods' bridge is, even through
/// `nsenter --net`, whose /sys is still the host's.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_explains_ext_dropped_and_checks_br_netfilter_in_the_nodes_namespace() {
    let lab = TwoNodeLab::new().expect("lab");
    lab.write_manifest(
        "local.yaml",
        &manifests::documents(&[
            manifests::node_port_service(
                "local",
                "NodePort",
                "10.96.0.41",
                (80, 30081),
                manifests::local_traffic,
            ),
            manifests::endpoint_slice_on_nodes(
                "local-1",
                "local",
                HTTP_BACKEND,
                &[(Ipv4Addr::new(10, 244, 1, 10), "node-1")],
            ),
        ]),
    )
    .unwrap();
    let agent = lab.start_agent(2, &agent_binary(), &[]).unwrap();
    agent
        .wait_for_log("attached (TCX)", Duration::from_secs(10))
        .unwrap();
    let node = lab.node(2);
    let healthz = agent.address("healthz").unwrap();
    let doctor_here = || {
        let mut command = node.in_node(agent_binary());
        command.stdin(Stdio::null());
        doctor_in(command, node, &healthz).1
    };
    let url = format!("http://{}:30081/", lab.node_ip(2));
    let curl = lab
        .external("curl")
        .args(["-s", "--max-time", "2", &url])
        .output()
        .unwrap();
    assert!(!curl.status.success(), "node 2 has no local endpoint");
    let checks = doctor_here();
    assert_check(&checks, "counters", "OK", "kube-proxy drops");
    assert!(
        figure(&checks["counters"].1, "ext_dropped") > 0,
        "{checks:#?}"
    );
    assert_check(&checks, "netfilter", "OK", "br_netfilter for bridge br0");
    assert_check(&checks, "netfilter", "OK", "nf_conntrack");
    assert_check(&checks, "netfilter", "OK", "nf_nat");

    node.node_output("sysctl", &["-w", "net.bridge.bridge-nf-call-iptables=0"])
        .unwrap();
    let checks = doctor_here();
    assert_check(
        &checks,
        "netfilter",
        "WARN",
        "bridge br0, but br_netfilter does not hand its traffic to iptables",
    );
    assert_check(
        &checks,
        "netfilter",
        "WARN",
        "sysctl -w net.bridge.bridge-nf-call-iptables=1",
    );
    // The sysctl is the node namespace's: the host's doctor does not see it.
    let host = common::doctor_with(Command::new(agent_binary()), node, &[]).1;
    assert!(
        !host["netfilter"].1.contains("bridge-nf-call-iptables = 0"),
        "{host:#?}"
    );
}
