//! A node in network namespaces: pods with real servers, clients in a
//! cgroup of the lab's own, and the agent pinned under a bpffs directory of
//! the lab's own. Used by the privileged tests and the demo.
//!
//! ```text
//!   node netns ── br0 10.244.0.1/24 ─────────┬── veth ── pod netns 10.244.0.10 (nginx, dnsmasq)
//!   (clients run here,  fd00:10:244:0::1/64  │                     fd00:10:244:0::10
//!    inside the lab's cgroup)                ├── veth ── pod netns 10.244.0.11
//!                                            │                     fd00:10:244:0::11
//!                                            └── ...
//! ```
//!
//! Every pod is dual-stack: its IPv6 address repeats the digits of its IPv4
//! one, and its default routes of both families go via the bridge. The
//! lab's IPv6 addresses skip duplicate address detection (`nodad`), so they
//! are usable at once.
//!
//! Nothing the lab makes is shared with the host or with another lab, and
//! [`Drop`] takes it all down again, even when a test panics. A lab whose
//! process was SIGKILLed is swept up by the next lab that starts.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

mod agent;
// The agent's own way to find cgroup2, so the lab's clients and the
// agent's default attach to the same hierarchy.
#[path = "../../../proxy-userspace/src/cgroup2.rs"]
mod cgroup2;
pub mod manifests;
mod node;
mod two_nodes;

pub use cgroup2::cgroup2_root;

pub use agent::{Agent, agent_binary, http_get, limit_open_files, raise_open_file_limit};
pub use node::{BIG_BODY, Lab, Pod};
pub use two_nodes::{DUAL_STACK_FLAGS, EXTERNAL_SEGMENT6, FAR_CLIENT, FAR_CLIENT6, TwoNodeLab};

const PREFIX: &str = "plab";
const BPFFS: &str = "/sys/fs/bpf";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Takes down what a lab made; every step is tried whatever failed before.
fn teardown(namespaces: &[String], cgroup: &Path, bpffs: &Path, dir: &Path) {
    for ns in namespaces {
        kill_netns_processes(ns);
    }
    if cgroup.exists() {
        let _ = fs::write(cgroup.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(10));
        }
        // rmdir detaches whatever is still attached to the cgroup.
        if let Err(e) = fs::remove_dir(cgroup) {
            eprintln!("lab: cannot remove cgroup {}: {e}", cgroup.display());
        }
    }
    // Unpinning the links detaches the programs; the maps go with the pins.
    if bpffs.exists()
        && let Err(e) = fs::remove_dir_all(bpffs)
    {
        eprintln!("lab: cannot remove {}: {e}", bpffs.display());
    }
    for ns in namespaces {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    // The settings records killed agents left, named after their pins as
    // the agent's `agent_record` names them (a test's second pin
    // directory beside the lab's too).
    let record = bpffs
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "%2F");
    for entry in fs::read_dir("/run/ebpf-proxy")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == format!("{record}.json") || name.starts_with(&format!("{record}-")) {
            let _ = fs::remove_file(entry.path());
        }
    }
    let _ = fs::remove_dir_all(dir);
}

fn lab_name() -> String {
    format!(
        "{PREFIX}-{}-{}",
        std::process::id(),
        NEXT_LAB.fetch_add(1, Ordering::Relaxed)
    )
}

fn kill_netns_processes(ns: &str) {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes what labs of processes that no longer exist left behind (a
/// SIGKILLed test run cannot run its destructors).
fn sweep_stale() {
    let stale = |name: &str| -> Option<String> {
        let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
        let pid = rest.split('-').next()?;
        let alive = Path::new("/proc").join(pid).exists();
        let lab: Vec<&str> = rest.splitn(3, '-').take(2).collect();
        (!alive && lab.len() == 2).then(|| format!("{PREFIX}-{}-{}", lab[0], lab[1]))
    };
    let mut labs = std::collections::BTreeMap::<String, Vec<String>>::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let ns = line.split_whitespace().next().unwrap_or_default();
            if let Some(lab) = stale(ns) {
                labs.entry(lab).or_default().push(ns.to_owned());
            }
        }
    }
    let mut dirs: Vec<PathBuf> = vec![Path::new(BPFFS).to_path_buf(), std::env::temp_dir()];
    if let Ok(root) = cgroup2_root() {
        dirs.push(root);
    }
    for dir in dirs {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Some(lab) = stale(&entry.file_name().to_string_lossy()) {
                labs.entry(lab).or_default();
            }
        }
    }
    for (lab, namespaces) in labs {
        let cgroup = cgroup2_root().map(|r| r.join(&lab)).unwrap_or_default();
        teardown(
            &namespaces,
            &cgroup,
            &Path::new(BPFFS).join(&lab),
            &std::env::temp_dir().join(&lab),
        );
    }
}

/// Mounts bpffs at /sys/fs/bpf before any agent starts. The agent mounts it
/// too when it is missing, but two agents of parallel labs that both found
/// it missing would mount it twice, and the second mount would hide the
/// first agent's pins.
fn ensure_bpffs() -> Result<()> {
    static CHECKED: Mutex<bool> = Mutex::new(false);
    let mut checked = CHECKED.lock().unwrap_or_else(PoisonError::into_inner);
    if *checked {
        return Ok(());
    }
    let mounted = fs::read_to_string("/proc/mounts")?.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if !mounted {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", BPFFS])
            .status()
            .context("cannot run mount")?;
        if !status.success() {
            bail!("cannot mount bpffs at {BPFFS}: {status}");
        }
    }
    *checked = true;
    Ok(())
}

/// Makes sure IPv6 is on in the namespace `netns` and on the links made in
/// it from now on: a host may boot with it disabled, and a new namespace
/// may take its defaults from the host's.
fn enable_ipv6(netns: &str) -> Result<()> {
    ip(&[
        "netns",
        "exec",
        netns,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=0",
        "net.ipv6.conf.default.disable_ipv6=0",
    ])
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
