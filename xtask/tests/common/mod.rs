//! What the privileged tests share: the web lab and its manifest, the
//! polls of the pinned maps, `doctor` as a test runs it, and a client
//! that holds its connections open.

// Each test file uses a part of this module; the rest is dead code in
// its binary.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs::DirBuilder,
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt as _,
    path::Path,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use xtask::lab::{Agent, Lab, Pod, agent_binary, manifests};

pub const WEB_VIP: &str = "10.96.0.10";
pub const HTTP: &[(&str, i64, &str)] = &[("http", 80, "TCP")];
pub const HTTP_BACKEND: &[(&str, u16, &str)] = &[("http", 8080, "TCP")];

/// A lab with `names` as nginx pods on port 8080.
pub fn web_lab(names: &[&str]) -> (Lab, Vec<Pod>) {
    Lab::with_web_pods(names, 8080).expect("a lab of nginx pods")
}

pub fn web_manifest(pods: &[&Pod]) -> String {
    let endpoints: Vec<(Ipv4Addr, bool)> = pods.iter().map(|p| (p.ip, true)).collect();
    manifests::documents(&[
        manifests::service("web", WEB_VIP, HTTP),
        manifests::endpoint_slice("web-1", "web", HTTP_BACKEND, &endpoints),
    ])
}

/// `count` HTTP requests to the VIP from one curl, each on a new connection
/// (nginx closes every one), and how many each pod answered; failed
/// requests count under "".
pub fn request_counts(lab: &Lab, vip: &str, count: usize) -> BTreeMap<String, usize> {
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
pub fn wait_for_backends(
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

/// Polls the pinned maps until they hold a frontend for `vip`:80.
pub fn wait_for_frontend(agent: &Agent, vip: &str, within: Duration) {
    let started = Instant::now();
    let frontend = format!("\"frontend\": \"{vip}:80\"");
    while !agent.services_json().expect("services").contains(&frontend) {
        assert!(
            started.elapsed() < within,
            "no frontend {vip}:80 within {within:?}; agent log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `proxy-userspace doctor --output json` on the lab, as `command` runs
/// it: whether it exited 0, and each check's status and its evidence
/// (details and fix included), by name.
pub fn doctor_in(
    command: Command,
    lab: &Lab,
    healthz: &str,
) -> (bool, BTreeMap<String, (String, String)>) {
    let cgroup = lab.cgroup();
    let manifests = lab.manifests_dir();
    doctor_with(
        command,
        lab,
        &[
            OsStr::new("--cgroup"),
            cgroup.as_os_str(),
            OsStr::new("--healthz-address"),
            OsStr::new(healthz),
            OsStr::new("--manifests"),
            manifests.as_os_str(),
        ],
    )
}

/// `doctor --output json --verbose --bpffs` on the lab's pins with
/// `flags`: whether it exited 0, and each check's status and its evidence
/// (details, fix and volatile facts included), by name.
pub fn doctor_with(
    mut command: Command,
    lab: &Lab,
    flags: &[&OsStr],
) -> (bool, BTreeMap<String, (String, String)>) {
    let out = command
        .args(["doctor", "--output", "json", "--verbose", "--bpffs"])
        .arg(lab.bpffs())
        .args(flags)
        .output()
        .expect("doctor");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = json["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|check| {
            (
                check["name"].as_str().unwrap().to_owned(),
                (
                    check["status"].as_str().unwrap().to_owned(),
                    format!(
                        "{} {} {} {}",
                        check["evidence"], check["details"], check["fix"], check["volatile"]
                    ),
                ),
            )
        })
        .collect();
    (out.status.success(), checks)
}

pub fn doctor(lab: &Lab, healthz: &str) -> (bool, BTreeMap<String, (String, String)>) {
    doctor_in(Command::new(agent_binary()), lab, healthz)
}

/// Asserts that `check` has `status` and its evidence names `needle`.
pub fn assert_check(
    checks: &BTreeMap<String, (String, String)>,
    check: &str,
    status: &str,
    needle: &str,
) {
    let (found, evidence) = checks
        .get(check)
        .unwrap_or_else(|| panic!("no check {check}: {checks:#?}"));
    assert!(
        found == status && evidence.contains(needle),
        "{check} should be {status} naming {needle:?}: {checks:#?}"
    );
}

/// A client that prints a line whenever it is given one: the tests hold
/// its connections open across a change of the Service.
pub struct Conversation {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Conversation {
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line it printed, trimmed.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.stdout, &mut line).expect("a line");
        line.trim().to_owned()
    }

    /// One more round: a line to it, and its answer.
    pub fn ask(&mut self) -> String {
        std::io::Write::write_all(&mut self.stdin, b"\n").expect("stdin");
        self.line()
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pins at `path` a map that bpftool makes from `definition` (type, key,
/// value, entries, flags, name), its directory made as the agent makes it:
/// what an agent of another layout, or another datapath, left behind.
pub fn pin_bpftool_map<S: AsRef<OsStr>>(path: &Path, definition: impl IntoIterator<Item = S>) {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path.parent().expect("a pin has a directory"))
        .unwrap();
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args(definition)
        .status()
        .unwrap();
    assert!(status.success(), "bpftool map create {}", path.display());
}

/// `out` printed `expected` (trimmed); its stderr says why not.
pub fn assert_printed(out: &Output, expected: &str) {
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        expected,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `out` is of a command that succeeded; its stderr says why not.
pub fn assert_succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that 20 connects to `vip`:80, a Service without endpoints, are
/// each refused at once (ECONNREFUSED from the hook, as kube-proxy's
/// REJECT), and that the datapath counted them.
pub fn assert_refused_at_once(lab: &Lab, agent: &Agent, vip: &str) {
    // create_connection makes a socket of the address's family.
    let out = lab
        .python(
            include_str!("../clients/refusal_time.py"),
            &[vip, "80", "20"],
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
        // A refusal by the hook takes microseconds; a SYN that went out
        // unanswered would take a second or more. The margin is for a
        // loaded machine.
        assert!(millis < 100.0, "refused only after {millis} ms");
    }
    assert!(
        agent.stats_json().unwrap().contains(r#""refused":20"#),
        "{}",
        agent.stats_json().unwrap()
    );
}

/// Kills `agent` under a stream of requests to `host`:80, then starts a
/// new one with `start` under another, and asserts that no request failed
/// either time, that the listing still worked with no agent, and that the
/// new agent adopted the pinned maps (one frontend of three backends)
/// without writing anything and swapped its programs into the pinned
/// links. Returns the new agent.
pub fn assert_restart_loses_nothing(
    lab: &Lab,
    mut agent: Agent,
    host: &str,
    start: impl FnOnce() -> Agent,
) -> Agent {
    let total = 3000;
    let traffic = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| request_counts(lab, host, total));
        std::thread::sleep(Duration::from_millis(300));
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
    let listed = agent.services_json().unwrap();
    assert!(listed.contains(&format!("\"{host}:80\"")), "{listed}");

    // A new agent adopts the pinned maps and links while traffic flows, and
    // finds nothing to change.
    let (traffic, agent) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| request_counts(lab, host, total));
        std::thread::sleep(Duration::from_millis(300));
        let agent = start();
        (traffic.join().unwrap(), agent)
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
    agent
}
