//! Privileged tests of how Services reach the agent and what it reports:
//! manifest files and their edits, the Kubernetes API and its outages,
//! Node and proxy-name filtering, /healthz and /metrics, the scale bench.
//!
//! They need root, so they are `#[ignore]`d in a plain `cargo test`;
//! `cargo xtask test` builds the agent and runs them with `--ignored`.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Taint, apimachinery::pkg::apis::meta::v1::Time};
use xtask::{
    apiserver::ApiServer,
    lab::{Agent, Lab, Pod, agent_binary, manifests},
};

use common::{
    HTTP, HTTP_BACKEND, WEB_VIP, request_counts, wait_for_backends, wait_for_frontend, web_lab,
    web_manifest,
};

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn agent_follows_manifest_edits_within_a_second() {
    let (lab, pods) = web_lab(&["pod-a", "pod-b", "pod-c"]);
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    lab.write_manifest("web.yaml", &web_manifest(&[a, b]))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    let within = Duration::from_secs(1);
    wait_for_backends(&agent, WEB_VIP, &[a.ip, b.ip], within);

    // pod-b goes, pod-c comes.
    lab.write_manifest("web.yaml", &web_manifest(&[a, c]))
        .unwrap();
    let took = wait_for_backends(&agent, WEB_VIP, &[a.ip, c.ip], within);
    eprintln!("endpoint change reached the maps in {took:?}");
    let counts = request_counts(&lab, WEB_VIP, 300);
    assert_eq!(
        counts.get("pod-b"),
        None,
        "a removed endpoint got connections: {counts:?}"
    );
    assert!(
        counts.contains_key("pod-c"),
        "the added endpoint got none: {counts:?}"
    );
    assert_eq!(counts.get(""), None, "failed requests: {counts:?}");

    // The Service goes.
    lab.remove_manifest("web.yaml").unwrap();
    let took = wait_for_backends(&agent, WEB_VIP, &[], within);
    eprintln!("service deletion reached the maps in {took:?}");
    let counts = request_counts(&lab, WEB_VIP, 3);
    assert_eq!(
        counts.get(""),
        Some(&3),
        "a deleted Service still answers: {counts:?}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn healthz_and_metrics_report_the_datapath_as_kube_proxy_does() {
    let (lab, pods) = web_lab(&["pod-a", "pod-b"]);
    lab.write_manifest("web.yaml", &web_manifest(&pods.iter().collect::<Vec<_>>()))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    let (status, body) = agent.http_get("healthz", "/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"lastUpdated\":\"20"), "{body}");
    assert!(body.contains("\"nodeEligible\":true"), "{body}");
    assert_eq!(agent.http_get("healthz", "/livez").unwrap().0, 200);
    assert_eq!(agent.http_get("healthz", "/nope").unwrap().0, 404);

    let counts = request_counts(&lab, WEB_VIP, 10);
    assert_eq!(counts.get(""), None, "{counts:?}");
    let (status, metrics) = agent.http_get("metrics", "/metrics").unwrap();
    assert_eq!(status, 200);
    for line in [
        "ebpf_proxy_frontends_programmed{ip_family=\"IPv4\"} 1",
        "ebpf_proxy_backends_programmed{ip_family=\"IPv4\"} 2",
        "ebpf_proxy_frontends_programmed{ip_family=\"IPv6\"} 0",
        "ebpf_proxy_datapath_events_total{event=\"forwarded\"} 10",
        "ebpf_proxy_frontend_translations_total{frontend=\"10.96.0.10:80/TCP\"} 10",
        "ebpf_proxy_map_fill_ratio{map=\"lb4_be_v2\"}",
        "ebpf_proxy_sync_duration_seconds_count 1",
        // kube-proxy's own names: one full sync of one Service and its
        // slice, nothing pending, and the process.
        "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
        "kubeproxy_sync_proxy_rules_service_changes_total 1",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
        "kubeproxy_sync_proxy_rules_service_changes_pending 0",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 0",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 0",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"}",
        "process_cpu_seconds_total ",
        "process_max_fds ",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for stamp in [
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "process_start_time_seconds",
    ] {
        let at = sample(stamp);
        assert!(
            (now - 600.0..=now + 1.0).contains(&at),
            "{stamp} {at}, now {now}"
        );
    }
    assert!(sample("process_resident_memory_bytes") > 1e6);
    assert!(sample("process_open_fds") > 3.0);
    assert_dashboard_queries_name_exported_metrics(&metrics);
}

/// Every metric deploy/grafana-dashboard.json queries is one the agent
/// exports (a histogram by its `_bucket`, `_count` and `_sum` series).
fn assert_dashboard_queries_name_exported_metrics(metrics: &str) {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/grafana-dashboard.json"),
        )
        .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let mut queried = BTreeSet::new();
    let exprs = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned));
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if ["kubeproxy_", "process_", "ebpf_proxy_"]
                .iter()
                .any(|prefix| word.starts_with(prefix))
            {
                queried.insert(word.to_owned());
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    for name in &queried {
        assert!(
            exported.contains(name.as_str()),
            "the dashboard queries {name}, which the agent does not export:\n{metrics}"
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_restart_while_a_file_is_broken_keeps_its_services() {
    let (lab, pods) = web_lab(&["pod-a", "pod-b"]);
    lab.write_manifest("web.yaml", &web_manifest(&pods.iter().collect::<Vec<_>>()))
        .unwrap();
    let mut agent = lab.start_agent(&agent_binary()).unwrap();
    agent.kill();
    lab.write_manifest(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
    )
    .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    let log = agent.log();
    assert!(log.contains("keeping") || log.contains("skipping"), "{log}");
    assert!(log.contains("are kept until it can"), "{log}");
    let counts = request_counts(&lab, WEB_VIP, 20);
    assert_eq!(
        counts.get(""),
        None,
        "the broken file's Service went: {counts:?}"
    );

    // Once the file parses again, it is followed as usual.
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[1]]))
        .unwrap();
    wait_for_backends(&agent, WEB_VIP, &[pods[1].ip], Duration::from_secs(1));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_file_rewritten_in_two_steps_loses_no_connection() {
    let (lab, pods) = web_lab(&["pod-a", "pod-b"]);
    let manifest = web_manifest(&pods.iter().collect::<Vec<_>>());
    lab.write_manifest("web.yaml", &manifest).unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    let path = lab.manifests_dir().join("web.yaml");
    let traffic = thread::scope(|scope| {
        let traffic = scope.spawn(|| request_counts(&lab, WEB_VIP, 4000));
        thread::sleep(Duration::from_millis(200));
        // As `cat new > web.yaml` does it: truncate, then write.
        std::fs::write(&path, "").unwrap();
        thread::sleep(Duration::from_millis(600));
        std::fs::write(&path, &manifest).unwrap();
        traffic.join().unwrap()
    });
    assert_eq!(traffic.get(""), None, "connections failed: {traffic:?}");
    let log = agent.log();
    assert!(log.contains("the file now holds no objects"), "{log}");
    assert!(!log.contains("stayed empty"), "{log}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_agent_follows_the_kubernetes_api_and_a_restarted_server_flushes_nothing() {
    use xtask::apiserver::Resource;
    let (lab, pods) = web_lab(&["pod-a", "pod-b", "pod-c"]);
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    let mut api = ApiServer::start().expect("test API server");
    api.apply_yaml(&web_manifest(&[a, b])).unwrap();
    api.apply_yaml(&manifests::node("node-1", |_| ())).unwrap();
    let agent = lab
        .start_agent_on_api(&agent_binary(), api.kubeconfig(), "node-1")
        .unwrap();
    let within = Duration::from_secs(1);
    wait_for_backends(&agent, WEB_VIP, &[a.ip, b.ip], within);

    // An endpoint change in the API reaches the traffic within a second.
    api.apply_yaml(&web_manifest(&[a, c])).unwrap();
    let took = wait_for_backends(&agent, WEB_VIP, &[a.ip, c.ip], within);
    eprintln!("an endpoint change through the API reached the maps in {took:?}");
    let counts = request_counts(&lab, WEB_VIP, 100);
    assert_eq!(counts.get("pod-b"), None, "{counts:?}");
    assert_eq!(counts.get(""), None, "{counts:?}");

    // The API server restarts mid-watch (resumed watches get 410): the
    // agent lists again and converges without a failed connection.
    let traffic = thread::scope(|scope| {
        let traffic = scope.spawn(|| request_counts(&lab, WEB_VIP, 2000));
        thread::sleep(Duration::from_millis(100));
        api.restart().unwrap();
        traffic.join().unwrap()
    });
    assert_eq!(traffic.get(""), None, "connections failed: {traffic:?}");
    assert!(api.delete(Resource::Service, "default", "web"));
    wait_for_backends(&agent, WEB_VIP, &[], Duration::from_secs(5));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn after_an_api_restart_storm_a_change_is_applied_within_five_seconds() {
    let (lab, pods, mut api) = api_lab();
    let (a, b) = (&pods[0], &pods[1]);
    let agent = lab
        .start_agent_on_api(&agent_binary(), api.kubeconfig(), "node-1")
        .unwrap();
    wait_for_backends(&agent, WEB_VIP, &[a.ip, b.ip], Duration::from_secs(5));

    // Twenty seconds of a server that is away more than it is there: every
    // watcher fails over and over, and its back-off grows.
    let storm = Instant::now();
    let mut round = 0;
    while storm.elapsed() < Duration::from_secs(20) {
        api.stop();
        thread::sleep(Duration::from_millis(700));
        if round % 3 == 0 {
            // Connections dropped and history compacted: watches get 410.
            api.restart().unwrap();
        } else {
            api.resume().unwrap();
        }
        thread::sleep(Duration::from_millis(500));
        round += 1;
    }
    api.restart().unwrap();
    let last_restart = Instant::now();
    api.apply_yaml(&web_manifest(&[a])).unwrap();
    wait_for_backends(&agent, WEB_VIP, &[a.ip], Duration::from_secs(5));
    eprintln!(
        "the change after the storm reached the maps {:?} after the last restart",
        last_restart.elapsed()
    );
    assert_eq!(request_counts(&lab, WEB_VIP, 20).get("pod-a"), Some(&20));
}

/// A lab of two nginx pods and a test API server holding the web Service
/// over both and Node node-1.
fn api_lab() -> (Lab, Vec<Pod>, ApiServer) {
    let (lab, pods) = web_lab(&["pod-a", "pod-b"]);
    let api = ApiServer::start().expect("test API server");
    api.apply_yaml(&web_manifest(&pods.iter().collect::<Vec<_>>()))
        .unwrap();
    api.apply_yaml(&manifests::node("node-1", |_| ())).unwrap();
    (lab, pods, api)
}

/// The agent of [`api_lab`]'s node, once it serves the web Service over
/// both pods.
fn start_agent_as_node_1(lab: &Lab, pods: &[Pod], api: &ApiServer) -> Agent {
    let agent = lab
        .start_agent_on_api(&agent_binary(), api.kubeconfig(), "node-1")
        .unwrap();
    wait_for_backends(
        &agent,
        WEB_VIP,
        &[pods[0].ip, pods[1].ip],
        Duration::from_secs(2),
    );
    agent
}

/// Polls `/healthz` until it answers `status`; returns the body.
fn wait_for_healthz(agent: &Agent, status: u16, within: Duration) -> String {
    let started = Instant::now();
    loop {
        let (got, body) = agent.http_get("healthz", "/healthz").expect("healthz");
        if got == status {
            return body;
        }
        assert!(
            started.elapsed() < within,
            "/healthz stayed {got} ({body}) for {within:?}, not {status}; agent log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// KEP-3836, as kube-proxy 1.30+: /healthz answers 503 with
/// `nodeEligible: false` while the cluster autoscaler's taint is on the
/// Node and while it is being deleted, so load balancers drain it first;
/// /livez stays 200, and the node's own pods keep their Services.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_node_being_deleted_or_drained_by_the_autoscaler_is_not_eligible_and_keeps_serving() {
    let (lab, pods, api) = api_lab();
    let agent = start_agent_as_node_1(&lab, &pods, &api);
    let body = wait_for_healthz(&agent, 200, Duration::from_secs(2));
    assert!(body.contains("\"nodeEligible\":true"), "{body}");

    let tainted =
        |taints: Vec<Taint>| manifests::node_with_spec("node-1", |spec| spec.taints = Some(taints));
    api.apply_yaml(&tainted(vec![Taint {
        key: "ToBeDeletedByClusterAutoscaler".to_owned(),
        value: Some("1733400000".to_owned()),
        effect: "NoSchedule".to_owned(),
        ..Taint::default()
    }]))
    .unwrap();
    let body = wait_for_healthz(&agent, 503, Duration::from_secs(2));
    assert!(
        body.contains("\"nodeEligible\":false") && body.contains("ToBeDeletedByClusterAutoscaler"),
        "{body}"
    );
    assert_eq!(agent.http_get("healthz", "/livez").unwrap().0, 200);
    // Another taint is no reason.
    api.apply_yaml(&tainted(vec![Taint {
        key: "node.kubernetes.io/unschedulable".to_owned(),
        effect: "NoSchedule".to_owned(),
        ..Taint::default()
    }]))
    .unwrap();
    wait_for_healthz(&agent, 200, Duration::from_secs(2));

    api.apply_yaml(&manifests::node("node-1", |node| {
        node.deletion_timestamp = Some(Time("2026-01-01T00:00:00Z".parse().unwrap()));
        node.finalizers = Some(vec!["example.com/hold".to_owned()]);
    }))
    .unwrap();
    let body = wait_for_healthz(&agent, 503, Duration::from_secs(2));
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    // Load balancers drain the node, but its own pods keep their Services.
    let counts = request_counts(&lab, WEB_VIP, 20);
    assert_eq!(counts.get(""), None, "{counts:?}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_service_of_another_proxy_is_not_served() {
    let (lab, pods, api) = api_lab();
    let other = |proxy: &str| {
        let mut service = manifests::service_object("other", "10.96.0.11", HTTP);
        service.metadata.labels = Some(BTreeMap::from([(
            "service.kubernetes.io/service-proxy-name".to_owned(),
            proxy.to_owned(),
        )]));
        manifests::documents(&[
            manifests::yaml(&service),
            manifests::endpoint_slice("other-1", "other", HTTP_BACKEND, &[(pods[0].ip, true)]),
        ])
    };
    api.apply_yaml(&other("other")).unwrap();
    // The web Service is served: the view is complete, yet no frontend for
    // the other proxy's Service.
    let agent = start_agent_as_node_1(&lab, &pods, &api);
    let json = agent.services_json().unwrap();
    assert!(!json.contains("10.96.0.11"), "{json}");
    let counts = request_counts(&lab, "10.96.0.11", 3);
    assert_eq!(counts.get(""), Some(&3), "{counts:?}");

    // Naming this proxy, the Service is ours.
    api.apply_yaml(&other("ebpf-proxy")).unwrap();
    let started = Instant::now();
    while !agent.services_json().unwrap().contains("10.96.0.11:80") {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let counts = request_counts(&lab, "10.96.0.11", 3);
    assert_eq!(counts.get("pod-a"), Some(&3), "{counts:?}");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_scale_bench_runs_and_coalesces_a_burst() {
    use xtask::scale::{ScaleOptions, measure};
    let options = ScaleOptions {
        sizes: vec![200],
        changes: 10,
        burst: 200,
    };
    let result = measure(&agent_binary(), 200, &options).expect("api-scale at 200 Services");
    eprintln!("{result:?}");
    assert!(result.full_sync < Duration::from_secs(20), "{result:?}");
    assert!(result.change_p99 < Duration::from_secs(1), "{result:?}");
    // A burst is applied in a few syncs, not one per change, and none of
    // its changes is lost on the way.
    assert!(result.burst_applies <= 20, "{result:?}");
    assert_eq!(result.burst_lost, 0, "{result:?}");
    // VmHWM, read in KiB: a debug agent at 200 Services holds some 40 MiB,
    // a bare process a few; the design allows 100 MiB at 30,000 Services.
    assert!(
        (4 * 1024..100 * 1024).contains(&result.peak_rss_kib),
        "{result:?}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn min_sync_period_applies_changes_that_come_sooner_together() {
    let (lab, pods) = web_lab(&["pod-a"]);
    let service = |name: &str, vip: &str| {
        let endpoints = [(pods[0].ip, true)];
        manifests::documents(&[
            manifests::service(name, vip, HTTP),
            manifests::endpoint_slice(&format!("{name}-1"), name, HTTP_BACKEND, &endpoints),
        ])
    };
    let agent = lab
        .start_agent_with(&agent_binary(), &["--min-sync-period", "1s"])
        .unwrap();
    let applied = || agent.log().matches(" applied").count();
    thread::sleep(Duration::from_millis(1200));
    let before = applied();
    lab.write_manifest("a.yaml", &service("a", "10.96.0.71"))
        .unwrap();
    wait_for_frontend(&agent, "10.96.0.71", Duration::from_secs(1));
    let first = Instant::now();
    thread::sleep(Duration::from_millis(100));
    lab.write_manifest("b.yaml", &service("b", "10.96.0.72"))
        .unwrap();
    thread::sleep(Duration::from_millis(100));
    lab.write_manifest("c.yaml", &service("c", "10.96.0.73"))
        .unwrap();
    wait_for_frontend(&agent, "10.96.0.73", Duration::from_secs(3));
    assert!(
        first.elapsed() >= Duration::from_millis(800),
        "the second sync came {:?} after the first",
        first.elapsed()
    );
    assert_eq!(
        applied() - before,
        2,
        "b and c were not applied together:\n{}",
        agent.log()
    );
    assert!(agent.services_json().unwrap().contains("10.96.0.72:80"));

    // An object defined twice is taken from the first file, and said once.
    lab.write_manifest("d.yaml", &service("a", "10.96.0.74"))
        .unwrap();
    lab.write_manifest("e.yaml", &service("e", "10.96.0.75"))
        .unwrap();
    wait_for_frontend(&agent, "10.96.0.75", Duration::from_secs(3));
    thread::sleep(Duration::from_millis(300));
    let log = agent.log();
    assert_eq!(
        log.matches("Service default/a is also defined in").count(),
        1,
        "{log}"
    );
    assert!(!agent.services_json().unwrap().contains("10.96.0.74"));
}
