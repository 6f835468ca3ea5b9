//! Privileged tests of bad input: wrong and hostile manifests, endpoint
//! addresses no pod can have, a Service too big for the map. Each is
//! refused by name while the rest keeps being served.
//!
//! They need root, so they are `#[ignore]`d in a plain `cargo test`;
//! `cargo xtask test` builds the agent and runs them with `--ignored`.

mod common;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use xtask::lab::{Agent, Lab, agent_binary, manifests};

use common::{
    HTTP, HTTP_BACKEND, WEB_VIP, request_counts, wait_for_frontend, web_lab, web_manifest,
};

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn bad_input_is_logged_once_and_skipped_while_the_rest_keeps_working() {
    let (lab, pods) = web_lab(&["pod-a"]);
    let bad = [
        (
            "broken.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: broken\nspec: [\n".to_owned(),
            "invalid YAML",
        ),
        (
            "bad-ip.yaml",
            manifests::service("bad-ip", "10.96.0.999", HTTP),
            "Service default/bad-ip: invalid clusterIP \"10.96.0.999\"",
        ),
        (
            "bad-port.yaml",
            manifests::service("bad-port", "10.96.0.31", &[("http", 70000, "TCP")]),
            "Service default/bad-port: port \"http\": port 70000 is out of range",
        ),
        (
            "sctp.yaml",
            manifests::service("sctp", "10.96.0.32", &[("sig", 80, "SCTP")]),
            "Service default/sctp: port \"sig\": protocol SCTP is not supported",
        ),
    ];
    for (file, yaml, _) in &bad {
        lab.write_manifest(file, yaml).unwrap();
    }
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();

    let assert_logged_once = || {
        let log = agent.log();
        for (file, _, message) in &bad {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(*file)).collect();
            assert_eq!(lines.len(), 1, "{file}: expected one log line, got:\n{log}");
            assert!(
                lines[0].contains(message),
                "{file}: {:?} lacks {message:?}",
                lines[0]
            );
        }
    };
    assert_logged_once();
    assert_eq!(request_counts(&lab, WEB_VIP, 10).get("pod-a"), Some(&10));

    // An unrelated edit is applied without logging the same problems again.
    let extra = manifests::service("extra", "10.96.0.33", HTTP);
    lab.write_manifest("extra.yaml", &extra).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while agent.log().matches(" applied ").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the edit was not applied:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_logged_once();
    assert!(agent.is_running());
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn endpoint_addresses_no_pod_can_have_are_refused_by_name() {
    let (lab, pods) = web_lab(&["pod-a"]);
    // What a VIP to 127.0.0.1 would reach: a server of the node's own,
    // listening on loopback only.
    let _loopback_server = ChildGuard(
        lab.in_node("python3")
            .args(["-c", include_str!("clients/loopback_server.py")])
            .stdin(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let refused: [Ipv4Addr; 7] = [
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        Ipv4Addr::new(224, 0, 0, 1),
        Ipv4Addr::new(169, 254, 1, 1),
        Ipv4Addr::new(169, 254, 169, 254),
        // Another Service's VIP.
        Ipv4Addr::new(10, 96, 0, 11),
    ];
    let endpoints: Vec<(Ipv4Addr, bool)> = refused
        .iter()
        .map(|ip| (*ip, true))
        .chain([(pods[0].ip, true)])
        .collect();
    lab.write_manifest(
        "web.yaml",
        &manifests::documents(&[
            manifests::service("web", WEB_VIP, HTTP),
            manifests::endpoint_slice("web-1", "web", HTTP_BACKEND, &endpoints),
            manifests::service("other", "10.96.0.11", HTTP),
            manifests::endpoint_slice("other-1", "other", HTTP_BACKEND, &[(pods[0].ip, true)]),
        ]),
    )
    .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    for vip in [WEB_VIP, "10.96.0.11"] {
        wait_for_frontend(&agent, vip, Duration::from_secs(5));
    }

    let counts = request_counts(&lab, WEB_VIP, 40);
    assert_eq!(counts.get("pod-a"), Some(&40), "{counts:?}");
    let log = agent.log();
    for ip in refused {
        let needle = format!("EndpointSlice default/web-1: endpoint address {ip} is");
        assert!(
            log.lines()
                .any(|l| l.contains(&needle) && l.contains("WARN")),
            "no warning {needle:?}:\n{log}"
        );
    }
    assert!(agent.is_running());
}

/// Kills a background process when the test ends, however it ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_service_too_big_for_the_map_is_logged_and_the_rest_keeps_working() {
    let (lab, pods) = web_lab(&["pod-a"]);
    let many: Vec<(Ipv4Addr, bool)> = (1..=10)
        .map(|i| (Ipv4Addr::new(10, 244, 9, i), true))
        .collect();
    lab.write_manifest(
        "big.yaml",
        &manifests::documents(&[
            manifests::service("big", "10.96.0.60", HTTP),
            manifests::endpoint_slice("big-1", "big", HTTP_BACKEND, &many),
        ]),
    )
    .unwrap();
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    // Room for web (2 entries) but not for big (11).
    let agent = lab
        .start_agent_with(&agent_binary(), &["--services-map-size", "8"])
        .unwrap();

    let log = agent.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("default/big")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    // The full map and the flag that sizes it, not "Argument list too long".
    assert!(
        lines[0].contains("cannot write the frontend")
            && lines[0]
                .contains("the map lb4_svc_v2 is full (8 entries); raise --services-map-size"),
        "{}",
        lines[0]
    );
    assert_eq!(request_counts(&lab, WEB_VIP, 10).get("pod-a"), Some(&10));
    assert!(!agent.services_json().unwrap().contains("10.96.0.60"));
    assert!(agent.is_running());
}

/// The agent's peak resident memory (VmHWM), in KiB.
fn peak_memory_kib(agent: &Agent) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in:\n{status}"))
}

/// The hostile corpus (`tests/hostile/`, with what the agent must log
/// about each file in `expected.tsv`), plus what cannot be kept in a
/// repository: a file over the size limit, FIFOs and a device.
fn hostile_cases(lab: &Lab) -> Vec<(String, PathBuf, String)> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile");
    let expected = std::fs::read_to_string(corpus.join("expected.tsv")).unwrap();
    let mut cases: Vec<(String, PathBuf, String)> = expected
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (file, message) = line.split_once('\t').expect("file<TAB>message");
            (file.to_owned(), corpus.join(file), message.to_owned())
        })
        .collect();
    assert!(cases.len() >= 30, "the corpus has {} files", cases.len());
    let made = lab.manifests_dir().join(".made");
    std::fs::create_dir_all(&made).unwrap();
    let huge = made.join("huge.yaml");
    // Sparse: only its size matters, and it is refused unread.
    std::fs::File::create(&huge)
        .unwrap()
        .set_len((4 << 20) + 1)
        .unwrap();
    cases.push((
        "huge.yaml".to_owned(),
        huge,
        "size limit (4 MiB)".to_owned(),
    ));
    let fifo = made.join("fifo.yaml");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    cases.push(("fifo.yaml".to_owned(), fifo.clone(), "a FIFO".to_owned()));
    // A ConfigMap mount's files are symlinks; one to a FIFO must not block.
    let target = made.join("target-fifo");
    let status = Command::new("mkfifo").arg(&target).status().unwrap();
    assert!(status.success());
    let link = made.join("fifo-link.yaml");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    cases.push(("fifo-link.yaml".to_owned(), link, "a FIFO".to_owned()));
    let zero = made.join("zero.yaml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    cases.push((
        "zero.yaml".to_owned(),
        zero,
        "a character device".to_owned(),
    ));
    cases
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn hostile_manifests_are_refused_by_name_while_the_agent_keeps_serving() {
    const MEMORY_BOUND_KIB: u64 = 150 << 10;
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    let dir = lab.manifests_dir();
    let started = Instant::now();

    for (index, (file, source, expected)) in hostile_cases(&lab).into_iter().enumerate() {
        // Into place in one rename, so the agent never sees half a file
        // (hidden names are not read).
        let staged = dir.join(format!(".{file}"));
        if source.starts_with(dir.join(".made")) {
            std::fs::rename(&source, &staged).unwrap();
        } else {
            std::fs::copy(&source, &staged).unwrap();
        }
        std::fs::rename(&staged, dir.join(&file)).unwrap();

        // An unrelated edit lands within a second all the same.
        let probe = format!("10.96.1.{}", index + 1);
        let edited = Instant::now();
        lab.write_manifest("probe.yaml", &manifests::service("probe", &probe, HTTP))
            .unwrap();
        let frontend = format!("\"frontend\": \"{probe}:80\"");
        while !agent.services_json().unwrap().contains(&frontend) {
            assert!(
                edited.elapsed() < Duration::from_secs(1),
                "{file}: an edit beside it did not land within a second; agent log:\n{}",
                agent.log()
            );
            thread::sleep(Duration::from_millis(20));
        }

        // The file was read before the probe (it was there first): one
        // line names it and its problem, or none when it is fine.
        let log = agent.log();
        let named = format!("/{file}:");
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(&named)).collect();
        if expected == "-" {
            assert!(
                lines.is_empty(),
                "{file}: expected no warning, got {lines:#?}"
            );
        } else {
            assert_eq!(lines.len(), 1, "{file}: expected one line, got {lines:#?}");
            assert!(
                lines[0].contains(&expected),
                "{file}: {:?} lacks {expected:?}",
                lines[0]
            );
        }
        eprintln!(
            "{file}: an edit beside it landed in {:?}; {}",
            edited.elapsed(),
            lines
                .first()
                .map_or("no warning", |l| l.split_once(&named).map_or(l, |(_, m)| m))
        );
        let peak = peak_memory_kib(&agent);
        assert!(
            peak < MEMORY_BOUND_KIB,
            "{file}: the agent's peak memory reached {peak} KiB"
        );
        assert_eq!(
            request_counts(&lab, WEB_VIP, 1).get("pod-a"),
            Some(&1),
            "{file}: the good Service stopped answering"
        );
        std::fs::remove_file(dir.join(&file)).unwrap();
    }
    assert!(agent.is_running());
    eprintln!(
        "hostile corpus done in {:?}; the agent's peak memory was {} KiB",
        started.elapsed(),
        peak_memory_kib(&agent)
    );
}
