//! Privileged datapath tests: the real agent, real programs attached to a
//! lab's cgroup, real servers in pod namespaces and real clients.
//!
//! They need root, so they are `#[ignore]`d in a plain `cargo test`;
//! `cargo xtask test` builds the agent and runs them with `--ignored`.

use std::{
    collections::BTreeMap,
    fs::{self, DirBuilder},
    io::Read as _,
    net::Ipv4Addr,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
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
    // The full map and the flag that sizes it, not "Argument list too long".
    assert!(
        lines[0].contains("cannot write the frontend")
            && lines[0]
                .contains("the map lb4_svc_v1 is full (8 entries); raise --services-map-size"),
        "{}",
        lines[0]
    );
    assert_eq!(request_counts(&lab, WEB_VIP, 10).get("pod-a"), Some(&10));
    assert!(!agent.services_json().unwrap().contains("10.96.0.60"));
    assert!(agent.is_running());
}

/// Runs a command that must exit on its own (an agent that refuses to
/// start) and returns whether it succeeded and what it wrote to stderr.
fn run_to_exit(mut cmd: Command) -> (bool, String) {
    let mut child = cmd
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} was still running after 20 s: it did not refuse");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    (status.success(), stderr)
}

fn cleanup_command(bpffs: &Path, force: bool) -> Command {
    let mut cmd = Command::new(agent_binary());
    cmd.args(["cleanup", "--bpffs"]).arg(bpffs);
    if force {
        cmd.arg("--force");
    }
    cmd
}

/// Nothing was attached: no link is pinned.
fn assert_nothing_attached(bpffs: &Path) {
    for program in ["connect4", "sendmsg4", "recvmsg4", "getpeername4"] {
        let link = bpffs.join("links").join(program);
        assert!(
            fs::symlink_metadata(&link).is_err(),
            "{} was pinned",
            link.display()
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_second_agent_on_the_same_pins_is_refused_naming_the_first() {
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();

    let (ok, stderr) = run_to_exit(lab.agent_command(&agent_binary()));
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{} is in use by another agent (pid {})",
            lab.bpffs().display(),
            agent.pid()
        )),
        "{stderr}"
    );
    assert!(agent.is_running());
    assert_eq!(request_counts(&lab, WEB_VIP, 10).get("pod-a"), Some(&10));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_pinned_map_of_another_layout_is_refused_naming_cleanup() {
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let maps = lab.bpffs().join("maps");
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&maps)
        .unwrap();
    // The right name, the wrong key: 8 bytes where the programs read 12.
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(maps.join("lb4_svc_v1"))
        .args([
            "type", "hash", "key", "8", "value", "8", "entries", "16", "name", "x",
        ])
        .status()
        .unwrap();
    assert!(status.success());

    let (ok, stderr) = run_to_exit(lab.agent_command(&agent_binary()));
    assert!(!ok);
    assert!(
        stderr.contains("lb4_svc_v1")
            && stderr.contains("8-byte keys")
            && stderr.contains(&format!(
                "proxy-userspace cleanup --bpffs {}",
                lab.bpffs().display()
            )),
        "{stderr}"
    );
    assert_nothing_attached(lab.bpffs());

    // The way out it names works.
    let (ok, stderr) = run_to_exit(cleanup_command(lab.bpffs(), false));
    assert!(ok, "{stderr}");
    let _agent = lab.start_agent(&agent_binary()).unwrap();
    assert_eq!(request_counts(&lab, WEB_VIP, 10).get("pod-a"), Some(&10));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_pin_directory_that_others_control_is_refused() {
    let lab = Lab::new().unwrap();
    let root = lab.bpffs().to_owned();
    let refused = |reason: &str| {
        let (ok, stderr) = run_to_exit(lab.agent_command(&agent_binary()));
        assert!(!ok);
        assert!(
            stderr.contains("refusing the pin directory") && stderr.contains(reason),
            "expected {reason:?}: {stderr}"
        );
        assert_nothing_attached(&root);
        fs::remove_dir_all(&root).unwrap();
    };

    // Made in advance by nobody, who could then unpin the links.
    fs::create_dir(&root).unwrap();
    std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
    refused("owned by uid 65534");

    // Root's, but anyone may write to it.
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
    refused("mode 777");

    // maps/ pointing at another datapath's maps, which the agent would
    // then rewrite.
    let victim = root.join("victim");
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&victim)
        .unwrap();
    std::os::unix::fs::symlink(&victim, root.join("maps")).unwrap();
    refused("symlink");

    // cleanup does not follow links/ to another datapath's links either.
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&victim)
        .unwrap();
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(victim.join("connect4"))
        .args([
            "type", "array", "key", "4", "value", "4", "entries", "1", "name", "victim",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    std::os::unix::fs::symlink(&victim, root.join("links")).unwrap();
    let (ok, stderr) = run_to_exit(cleanup_command(&root, true));
    assert!(!ok && stderr.contains("symlink"), "{stderr}");
    assert!(
        victim.join("connect4").exists(),
        "cleanup removed through a symlink"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn cleanup_is_refused_while_an_agent_runs_unless_forced() {
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();

    let (ok, stderr) = run_to_exit(cleanup_command(lab.bpffs(), false));
    assert!(!ok);
    assert!(
        stderr.contains(&format!("pid {}", agent.pid())) && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(request_counts(&lab, WEB_VIP, 10).get("pod-a"), Some(&10));

    let (ok, stderr) = run_to_exit(cleanup_command(lab.bpffs(), true));
    assert!(ok, "{stderr}");
    assert!(!lab.bpffs().exists());
    // Detached: the ClusterIP is no longer translated.
    assert_eq!(request_counts(&lab, WEB_VIP, 3).get(""), Some(&3));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn bad_arguments_and_missing_privileges_are_refused_before_anything_is_made() {
    let lab = Lab::new().unwrap();
    let run = |wrapper: &[&str], cgroup: &Path, extra: &[&str]| {
        let binary = agent_binary();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&binary);
                cmd
            }
            None => Command::new(&binary),
        };
        cmd.args(["run", "--manifests"])
            .arg(lab.manifests_dir())
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs")
            .arg(lab.bpffs())
            .args(extra);
        run_to_exit(cmd)
    };
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let cases: [(&[&str], &Path, &[&str], &str); 5] = [
        (
            &[],
            Path::new("/tmp"),
            &[],
            "--cgroup /tmp is not a cgroup v2 directory",
        ),
        (
            &[],
            Path::new("/nonexistent"),
            &[],
            "cannot open the cgroup /nonexistent",
        ),
        (
            &[],
            lab.cgroup(),
            &["--backends-map-size", "0"],
            "--backends-map-size must be at least 1",
        ),
        (
            &nobody,
            lab.cgroup(),
            &[],
            "needs root or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN",
        ),
        (
            &["setpriv", "--bounding-set=-bpf", "--inh-caps=-bpf"],
            lab.cgroup(),
            &[],
            "(missing: CAP_BPF)",
        ),
    ];
    for (wrapper, cgroup, extra, message) in cases {
        let (ok, stderr) = run(wrapper, cgroup, extra);
        assert!(
            !ok && stderr.contains(message),
            "expected {message:?}: {stderr}"
        );
        assert!(
            !lab.bpffs().exists(),
            "{} was made before the refusal: {stderr}",
            lab.bpffs().display()
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_running_agent_holds_only_the_documented_capabilities() {
    let (lab, pods) = web_lab(&["pod-a"]);
    lab.write_manifest("web.yaml", &web_manifest(&[&pods[0]]))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();

    // The set the DaemonSet grants (capability numbers are kernel ABI).
    let documented: u64 = [
        12, // CAP_NET_ADMIN
        13, // CAP_NET_RAW
        38, // CAP_PERFMON
        39, // CAP_BPF
    ]
    .iter()
    .map(|bit| 1u64 << bit)
    .sum();
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let set = |name: &str| {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {status}"));
        u64::from_str_radix(line.trim(), 16).unwrap()
    };
    for name in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(set(name), documented, "{name}: {status}");
    }
    for name in ["CapInh", "CapAmb"] {
        assert_eq!(set(name), 0, "{name}: {status}");
    }
    // And it works with them: it follows an edit and traffic flows.
    assert_eq!(request_counts(&lab, WEB_VIP, 10).get("pod-a"), Some(&10));
    lab.remove_manifest("web.yaml").unwrap();
    wait_for_backends(&agent, WEB_VIP, &[], Duration::from_secs(2));
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
        "ebpf_proxy_frontends_programmed 1",
        "ebpf_proxy_backends_programmed 2",
        "ebpf_proxy_datapath_events_total{event=\"forwarded\"} 10",
        "ebpf_proxy_map_fill_ratio{map=\"lb4_be_v1\"}",
        "ebpf_proxy_sync_duration_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
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
    use xtask::apiserver::{ApiServer, Resource};
    let (lab, pods) = web_lab(&["pod-a", "pod-b", "pod-c"]);
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    let mut api = ApiServer::start().expect("test API server");
    api.apply_yaml(&web_manifest(&[a, b])).unwrap();
    api.apply_yaml("apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n")
        .unwrap();
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

/// A lab of two nginx pods and a test API server holding the web Service
/// over both and Node node-1 (`node_extra` is added to its metadata).
fn api_lab(node_extra: &str) -> (Lab, Vec<Pod>, xtask::apiserver::ApiServer) {
    let (lab, pods) = web_lab(&["pod-a", "pod-b"]);
    let api = xtask::apiserver::ApiServer::start().expect("test API server");
    api.apply_yaml(&web_manifest(&pods.iter().collect::<Vec<_>>()))
        .unwrap();
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node-1{node_extra}}}\n"
    ))
    .unwrap();
    (lab, pods, api)
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

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_stopped_api_server_keeps_traffic_and_healthz_turns_503_until_it_is_back() {
    let (lab, pods, mut api) = api_lab("");
    let agent = lab
        .start_agent_on_api_with(
            &agent_binary(),
            api.kubeconfig(),
            "node-1",
            &["--health-stale-after", "2s"],
        )
        .unwrap();
    wait_for_backends(
        &agent,
        WEB_VIP,
        &[pods[0].ip, pods[1].ip],
        Duration::from_secs(2),
    );
    wait_for_healthz(&agent, 200, Duration::from_secs(2));

    api.stop();
    let stopped = Instant::now();
    // The last state keeps serving while the API server is away.
    let counts = request_counts(&lab, WEB_VIP, 50);
    assert_eq!(counts.get(""), None, "{counts:?}");
    let body = wait_for_healthz(&agent, 503, Duration::from_secs(15));
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "503 before --health-stale-after: {body}"
    );
    let counts = request_counts(&lab, WEB_VIP, 50);
    assert_eq!(counts.get(""), None, "{counts:?}");

    api.resume().unwrap();
    wait_for_healthz(&agent, 200, Duration::from_secs(15));
    // And it follows the API again.
    api.apply_yaml(&web_manifest(&[&pods[1]])).unwrap();
    wait_for_backends(&agent, WEB_VIP, &[pods[1].ip], Duration::from_secs(5));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_node_being_deleted_is_not_eligible_and_keeps_serving() {
    let (lab, pods, api) = api_lab("");
    let agent = lab
        .start_agent_on_api(&agent_binary(), api.kubeconfig(), "node-1")
        .unwrap();
    wait_for_backends(
        &agent,
        WEB_VIP,
        &[pods[0].ip, pods[1].ip],
        Duration::from_secs(2),
    );
    let body = wait_for_healthz(&agent, 200, Duration::from_secs(2));
    assert!(body.contains("\"nodeEligible\":true"), "{body}");

    api.apply_yaml(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-1, \
         deletionTimestamp: \"2026-01-01T00:00:00Z\", finalizers: [example.com/hold]}\n",
    )
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
    let (lab, pods, api) = api_lab("");
    let other = |proxy: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: other\n  namespace: default\n  \
             labels: {{service.kubernetes.io/service-proxy-name: {proxy}}}\n\
             spec:\n  clusterIP: 10.96.0.11\n  ports: [{{name: http, port: 80}}]\n---\n{}",
            manifests::endpoint_slice("other-1", "other", HTTP_BACKEND, &[(pods[0].ip, true)])
        )
    };
    api.apply_yaml(&other("other")).unwrap();
    let agent = lab
        .start_agent_on_api(&agent_binary(), api.kubeconfig(), "node-1")
        .unwrap();
    // The web Service is served: the view is complete, yet no frontend for
    // the other proxy's Service.
    wait_for_backends(
        &agent,
        WEB_VIP,
        &[pods[0].ip, pods[1].ip],
        Duration::from_secs(2),
    );
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
    // A burst is applied in a few syncs, not one per change.
    assert!(result.burst_applies >= 1, "{result:?}");
    assert!(result.burst_applies <= 20, "{result:?}");
    assert!(result.peak_rss_kib > 0, "{result:?}");
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
