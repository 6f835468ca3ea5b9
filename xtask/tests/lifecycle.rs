//! Privileged tests of the agent guarding its datapath while it runs: pins,
//! the pin directory and the cgroup taken away under it, and a `cleanup`
//! beside another agent of the same node.
//!
//! They need root, so they are `#[ignore]`d in a plain `cargo test`;
//! `cargo xtask test` builds the agent and runs them with `--ignored`.

use std::{
    fs,
    io::Read as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use xtask::lab::{Agent, Lab, Pod, agent_binary, manifests};

const WEB_VIP: &str = "10.96.0.10";

/// A lab with one nginx pod behind the ClusterIP [`WEB_VIP`], and its agent.
fn web_lab() -> (Lab, Agent) {
    let (lab, pods) = Lab::with_web_pods(&["pod-a"], 8080).expect("a lab of nginx pods");
    lab.write_manifest("web.yaml", &web_manifest(&pods[0]))
        .unwrap();
    let agent = lab.start_agent(&agent_binary()).unwrap();
    assert!(served(&lab), "not served at the start");
    (lab, agent)
}

fn web_manifest(pod: &Pod) -> String {
    let endpoints: Vec<(Ipv4Addr, bool)> = vec![(pod.ip, true)];
    manifests::documents(&[
        manifests::service("web", WEB_VIP, &[("http", 80, "TCP")]),
        manifests::endpoint_slice("web-1", "web", &[("http", 8080, "TCP")], &endpoints),
    ])
}

/// One request to the ClusterIP from the lab's cgroup, answered by the pod.
fn served(lab: &Lab) -> bool {
    let url = format!("http://{WEB_VIP}/");
    lab.run_client(
        "curl",
        &["-s", "--max-time", "2", "--connect-timeout", "2", &url],
    )
    .is_ok_and(|out| out.status.success() && out.stdout.starts_with(b"pod-a"))
}

/// Every pin of a running agent: its cgroup links and its maps.
fn missing_pins(bpffs: &Path) -> Vec<PathBuf> {
    proxy_common::PROGRAMS
        .iter()
        .map(|program| bpffs.join("links").join(program))
        .chain(
            proxy_common::MAPS
                .iter()
                .map(|map| bpffs.join("maps").join(map)),
        )
        .filter(|pin| fs::symlink_metadata(pin).is_err())
        .collect()
}

/// Runs a command that should exit at once; whether it succeeded, and its
/// stderr.
fn run_to_exit(mut cmd: Command) -> (bool, String) {
    let mut child = cmd
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
            panic!("{cmd:?} was still running after 20 s");
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

/// Issue 16: `rm -rf` of the pin directory under traffic. The agent holds
/// its links, so the programs stay attached; it puts the pins back, and
/// the directory's lock, which never lived in it, still refuses a second
/// agent.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_pin_directory_removed_under_traffic_is_pinned_again_and_still_locked() {
    let (lab, agent) = web_lab();
    let stop = AtomicBool::new(false);
    let (requests, health, repinned) = thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut requests = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                requests.push((Instant::now(), served(&lab)));
                thread::sleep(Duration::from_millis(50));
            }
            requests
        });
        thread::sleep(Duration::from_millis(500));
        let removed = Instant::now();
        fs::remove_dir_all(lab.bpffs()).unwrap();
        // /healthz and the pins, sampled until the pins are back and the
        // traffic has run on for two seconds more.
        let mut health = Vec::new();
        let mut repinned = None;
        while removed.elapsed() < Duration::from_secs(12) {
            let status = agent.http_get("healthz", "/healthz").map_or(0, |(s, _)| s);
            health.push((removed.elapsed(), status));
            if repinned.is_none() && missing_pins(lab.bpffs()).is_empty() {
                repinned = Some(removed.elapsed());
            }
            if repinned.is_some_and(|at| removed.elapsed() > at + Duration::from_secs(2)) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        (traffic.join().unwrap(), health, repinned)
    });
    let log = agent.log();

    let repinned = repinned.unwrap_or_else(|| {
        panic!(
            "still missing after 12 s: {:?}; the agent's log:\n{log}",
            missing_pins(lab.bpffs())
        )
    });
    assert!(repinned < Duration::from_secs(10), "{repinned:?}");
    // Served throughout, or again within 10 s of the first failure.
    let failures: Vec<Instant> = requests
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(at, _)| *at)
        .collect();
    if let (Some(first), Some(last)) = (failures.first(), failures.last()) {
        let outage = last.duration_since(*first);
        assert!(
            outage < Duration::from_secs(10),
            "requests failed for {outage:?}; the agent's log:\n{log}"
        );
        // The node was unhealthy for as long as it did not serve.
        assert!(
            health.iter().any(|(_, status)| *status == 503),
            "requests failed but /healthz stayed 200: {health:?}"
        );
    }
    assert!(
        requests.last().is_some_and(|(_, ok)| *ok),
        "not served at the end ({} of {} requests failed); the agent's log:\n{log}",
        failures.len(),
        requests.len()
    );
    assert!(served(&lab));
    assert!(
        log.contains(&format!("{} is gone", lab.bpffs().display())),
        "the log does not say what went:\n{log}"
    );
    assert_eq!(agent.http_get("healthz", "/healthz").unwrap().0, 200);

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
    assert!(served(&lab));
}

/// Issue 16: the lab's cgroup removed and made again while the agent runs,
/// as a container runtime may: while it is gone the programs are attached
/// nowhere and `/healthz` says so; then the links on the old cgroup are
/// defunct, and the agent attaches to the new one and says so.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_cgroup_removed_and_made_again_is_attached_to_again() {
    let (mut lab, agent) = web_lab();
    lab.remove_cgroup().unwrap();
    let cgroup = lab.cgroup().display().to_string();
    let removed = Instant::now();
    loop {
        let (status, body) = agent.http_get("healthz", "/healthz").unwrap();
        if status == 503 {
            assert!(
                body.contains(&format!("the cgroup {cgroup} is gone")),
                "{body}"
            );
            break;
        }
        assert!(
            removed.elapsed() < Duration::from_secs(10),
            "/healthz stayed {status} with the cgroup gone; the agent's log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }

    lab.make_cgroup_again().unwrap();
    let made = Instant::now();
    while !served(&lab) {
        assert!(
            made.elapsed() < Duration::from_secs(10),
            "not served in the new cgroup within 10 s; the agent's log:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "the cgroup links on {cgroup} are defunct (the cgroup was removed and made again)"
        )),
        "the log does not say what happened:\n{log}"
    );
    // One link per program on the new cgroup, not one per attempt.
    let attached = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(lab.cgroup())
        .output()
        .unwrap();
    let attached = String::from_utf8_lossy(&attached.stdout);
    for program in proxy_common::PROGRAMS {
        assert_eq!(
            attached.matches(&format!(" {program}")).count(),
            1,
            "{program} in:\n{attached}"
        );
    }
    assert_eq!(agent.http_get("healthz", "/healthz").unwrap().0, 200);
    for program in proxy_common::PROGRAMS {
        assert!(lab.bpffs().join("links").join(program).exists());
    }
}

/// Removes a second agent's pins however the test ends.
struct ExtraPins(PathBuf);

impl Drop for ExtraPins {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Issue 16: the masquerade chains are the node's, shared by every agent
/// of its network namespace: `cleanup` of one agent's pins keeps them while
/// another agent runs there, and removes them once none does.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn cleanup_keeps_the_masquerade_rules_while_another_agent_of_the_node_runs() {
    let lab = Lab::new().unwrap();
    let other = ExtraPins(PathBuf::from(format!("{}-b", lab.bpffs().display())));
    let flags = ["--devices", "none"];
    let first = lab.start_agent_in_node(&agent_binary(), &flags).unwrap();
    let second = lab
        .start_agent_in_node_on(&agent_binary(), &other.0, &flags)
        .unwrap();
    // The first agent installs the chains, the second finds them in place.
    first
        .wait_for_log("installed the masquerade rules", Duration::from_secs(10))
        .unwrap();
    second
        .wait_for_log("masquerade rules in place", Duration::from_secs(10))
        .unwrap();
    let chains = || {
        let nat = lab.node_output("iptables-save", &["-t", "nat"]).unwrap();
        nat.contains(":EBPF-PROXY-POSTROUTING") && nat.contains(":EBPF-PROXY-MARK-MASQ")
    };
    assert!(chains());
    let cleanup = |bpffs: &Path| {
        let mut cmd = lab.in_node(agent_binary());
        cmd.args(["cleanup", "--bpffs"]).arg(bpffs);
        let (ok, stderr) = run_to_exit(cmd);
        assert!(ok, "{stderr}");
        stderr
    };

    drop(first);
    let stderr = cleanup(lab.bpffs());
    assert!(!lab.bpffs().exists());
    assert!(
        stderr.contains("kept the masquerade rules")
            && stderr.contains(&format!("{}", second.pid())),
        "{stderr}"
    );
    assert!(chains(), "cleanup removed the chains the other agent uses");

    drop(second);
    let stderr = cleanup(&other.0);
    assert!(!other.0.exists());
    assert!(!chains(), "the chains outlived the last agent: {stderr}");
}
