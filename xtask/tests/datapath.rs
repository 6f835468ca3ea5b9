//! Privileged datapath tests: the real agent, real programs attached to a
//! lab's cgroup, real servers in pod namespaces and real clients.
//!
//! They need root, so they are `#[ignore]`d in a plain `cargo test`;
//! `cargo xtask test` builds the agent and runs them with `--ignored`.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use xtask::lab::{Agent, Lab, Pod, agent_binary, manifests};

const WEB_VIP: &str = "10.96.0.10";
const HTTP: &[(&str, i64, &str)] = &[("http", 80, "TCP")];
const HTTP_BACKEND: &[(&str, u16, &str)] = &[("http", 8080, "TCP")];

/// A lab with `names` as nginx pods on port 8080.
fn web_lab(names: &[&str]) -> (Lab, Vec<Pod>) {
    let mut lab = Lab::new().expect("lab");
    let pods = names
        .iter()
        .map(|name| {
            let pod = lab.add_pod(name).expect("pod");
            lab.serve_http(&pod, 8080).expect("nginx");
            pod
        })
        .collect();
    (lab, pods)
}

fn web_manifest(pods: &[&Pod]) -> String {
    let endpoints: Vec<(Ipv4Addr, bool)> = pods.iter().map(|p| (p.ip, true)).collect();
    manifests::documents(&[
        manifests::service("web", WEB_VIP, HTTP),
        manifests::endpoint_slice("web-1", "web", HTTP_BACKEND, &endpoints),
    ])
}

/// `count` HTTP requests to the VIP from one curl, each on a new connection
/// (nginx closes every one), and how many each pod answered; failed
/// requests count under "".
fn request_counts(lab: &Lab, vip: &str, count: usize) -> BTreeMap<String, usize> {
    let url = format!("http://{vip}/[1-{count}]");
    let out = lab
        .run_client(
            "curl",
            &["-s", "--max-time", "60", "--connect-timeout", "2", &url],
        )
        .expect("curl");
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

/// Polls the pinned maps until the VIP's backends are `expected` (empty:
/// the frontend is gone) and returns how long that took.
fn wait_for_backends(
    agent: &Agent,
    vip: &str,
    expected: &[Ipv4Addr],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let frontend = format!("\"frontend\": \"{vip}:80\"");
    loop {
        let json = agent.services_json().expect("services");
        let matches = if expected.is_empty() {
            !json.contains(&frontend)
        } else {
            json.contains(&frontend)
                && expected
                    .iter()
                    .all(|ip| json.contains(&format!("\"{ip}:8080\"")))
                && json.matches("\"address\"").count() == expected.len()
        };
        if matches {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "the maps did not reach {expected:?} within {within:?}:\n{json}\nagent log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn tcp_through_clusterip_reaches_each_backend_uniformly() {
    let (lab, pods) = web_lab(&["pod-a", "pod-b", "pod-c"]);
    lab.write_manifest("web.yaml", &web_manifest(&pods.iter().collect::<Vec<_>>()))
        .unwrap();
    let _agent = lab.start_agent(&agent_binary()).unwrap();

    let total = 3000;
    let counts = request_counts(&lab, WEB_VIP, total);
    assert_eq!(counts.get(""), None, "failed requests: {counts:?}");
    let expected = f64::from(u32::try_from(total).unwrap()) / 3.0;
    let chi_square: f64 = pods
        .iter()
        .map(|pod| {
            let observed =
                f64::from(u32::try_from(counts.get(&pod.name).copied().unwrap_or(0)).unwrap());
            (observed - expected).powi(2) / expected
        })
        .sum();
    // The critical value of chi-square with 2 degrees of freedom at p = 0.001.
    assert!(
        chi_square < 13.816,
        "the spread {counts:?} is not uniform (chi-square {chi_square:.2})"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn getpeername_shows_the_vip_and_other_addresses_are_untouched() {
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();

    let probe = |host: &str, port: u16| {
        let out = lab
            .python(&format!(
                "import socket\n\
                 s = socket.create_connection(('{host}', {port}), timeout=2)\n\
                 s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
                 body = s.recv(4096).split(b'\\r\\n\\r\\n', 1)[1].strip().decode()\n\
                 print(*s.getpeername(), body)"
            ))
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(probe(WEB_VIP, 80), format!("{WEB_VIP} 80 pod-a"));
    // Not a Service: the programs fail open and leave the socket alone.
    assert_eq!(
        probe(&pods[0].ip.to_string(), 8080),
        format!("{} 8080 pod-a", pods[0].ip)
    );
    // One connect forwarded (the pod-IP one is not a Service), its peer
    // reversed at least once (Python's socket asks for the peer on its own
    // too), nothing refused or raced.
    let stats = agent.stats_json().unwrap();
    assert!(
        stats.starts_with(r#"{"forwarded":1,"refused":0,"lost_race":0,"reversed":"#)
            && !stats.contains(r#""reversed":0"#),
        "{stats}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn udp_dns_through_clusterip_answers_from_the_vip() {
    let mut lab = Lab::new().unwrap();
    let pod = lab.add_pod("dns-a").unwrap();
    lab.serve_dns(&pod, 5353).unwrap();
    lab.write_manifest(
        "dns.yaml",
        &manifests::documents(&[
            manifests::service("dns", "10.96.0.53", &[("dns", 53, "UDP")]),
            manifests::endpoint_slice("dns-1", "dns", &[("dns", 5353, "UDP")], &[(pod.ip, true)]),
        ]),
    )
    .unwrap();
    let _agent = lab.start_agent(&agent_binary()).unwrap();

    // dig discards replies that do not come from the server it asked.
    let dig = lab
        .run_client(
            "dig",
            &[
                "@10.96.0.53",
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
    assert_eq!(
        String::from_utf8_lossy(&dig.stdout).trim(),
        "\"dns-a\"",
        "dig: {}",
        String::from_utf8_lossy(&dig.stderr)
    );

    // An unconnected socket (sendto/recvfrom: sendmsg4 and recvmsg4), then
    // a connected one (connect4, recvmsg4 and getpeername4).
    let out = lab
        .python(
            "import socket, struct\n\
             query = struct.pack('>6H', 0x1234, 0x0100, 1, 0, 0, 0) \
                 + b'\\x06whoami\\x03lab\\x00' + struct.pack('>2H', 16, 1)\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.settimeout(3)\n\
             s.sendto(query, ('10.96.0.53', 53))\n\
             reply, (host, port) = s.recvfrom(512)\n\
             print(host, port, reply[:2].hex(), b'dns-a' in reply)\n\
             c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             c.settimeout(3)\n\
             c.connect(('10.96.0.53', 53))\n\
             c.send(query)\n\
             reply, (host, port) = c.recvfrom(512)\n\
             print(host, port, *c.getpeername(), b'dns-a' in reply)",
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "10.96.0.53 53 1234 True\n10.96.0.53 53 10.96.0.53 53 True",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn service_without_endpoints_refuses_at_once() {
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest(
        "empty.yaml",
        &manifests::documents(&[
            manifests::service("empty", "10.96.0.20", HTTP),
            // Only an endpoint that is not ready: no backends at all.
            manifests::endpoint_slice("empty-1", "empty", HTTP_BACKEND, &[(pods[0].ip, false)]),
        ]),
    )
    .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();

    let out = lab
        .python(
            "import socket, time\n\
             for attempt in range(20):\n\
             \x20   started = time.monotonic()\n\
             \x20   try:\n\
             \x20       socket.create_connection(('10.96.0.20', 80), timeout=5)\n\
             \x20       print('connected')\n\
             \x20   except ConnectionRefusedError:\n\
             \x20       print('refused', round((time.monotonic() - started) * 1000, 3))",
        )
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        lines.lines().count(),
        20,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in lines.lines() {
        let millis: f64 = line
            .strip_prefix("refused ")
            .unwrap_or_else(|| panic!("not refused: {line}"))
            .parse()
            .unwrap();
        assert!(millis < 10.0, "refused only after {millis} ms");
    }
    assert!(
        agent.stats_json().unwrap().contains(r#""refused":20"#),
        "{}",
        agent.stats_json().unwrap()
    );
}

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
fn sigkilled_agent_loses_no_connection_and_a_restart_adopts_the_state() {
    let (lab, pods) = web_lab(&["pod-a", "pod-b", "pod-c"]);
    lab.write_manifest("web.yaml", &web_manifest(&pods.iter().collect::<Vec<_>>()))
        .unwrap();
    let mut agent = lab.start_agent(&agent_binary()).unwrap();

    let total = 3000;
    let traffic = thread::scope(|scope| {
        let traffic = scope.spawn(|| request_counts(&lab, WEB_VIP, total));
        thread::sleep(Duration::from_millis(300));
        agent.kill();
        traffic.join().unwrap()
    });
    assert_eq!(
        traffic.get(""),
        None,
        "connections failed while the agent died: {traffic:?}"
    );
    assert_eq!(traffic.values().sum::<usize>(), total);
    // The listing reads the pins, so it works with no agent running.
    assert!(agent.services_json().unwrap().contains("\"10.96.0.10:80\""));

    // A new agent adopts the pinned maps and links while traffic flows, and
    // finds nothing to change.
    let traffic = thread::scope(|scope| {
        let traffic = scope.spawn(|| request_counts(&lab, WEB_VIP, total));
        thread::sleep(Duration::from_millis(300));
        agent = lab.start_agent(&agent_binary()).unwrap();
        traffic.join().unwrap()
    });
    assert_eq!(
        traffic.get(""),
        None,
        "connections failed during the restart: {traffic:?}"
    );
    let log = agent.log();
    assert!(
        log.contains("adopted the pinned maps frontends=1 backends=3"),
        "{log}"
    );
    assert!(
        log.contains("changes=0"),
        "the restart rewrote the maps:\n{log}"
    );
    assert!(
        log.contains("swapped the program behind the pinned link"),
        "{log}"
    );

    // And it stays correct: it follows the next edit.
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    wait_for_backends(&agent, WEB_VIP, &[pods[0].ip], Duration::from_secs(1));
    let counts = request_counts(&lab, WEB_VIP, 30);
    assert_eq!(counts.get("pod-a"), Some(&30), "{counts:?}");
}

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
    assert!(
        lines[0].contains("cannot write the frontend"),
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
