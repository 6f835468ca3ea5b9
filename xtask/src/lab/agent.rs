//! The agent under test, started by a lab.

use std::{
    fs,
    io::{self, Read as _},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A running agent. Dropping it SIGKILLs it: the pinned datapath stays, as
/// it would when a DaemonSet pod dies.
pub struct Agent {
    pub(super) child: Child,
    pub(super) log: PathBuf,
    pub(super) binary: PathBuf,
    pub(super) bpffs: PathBuf,
}

impl Agent {
    /// Everything the agent has logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Waits until the log contains `needle`, failing early if the agent
    /// exits.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent did not log {needle:?} within {timeout:?}; its log:\n{log}");
            }
            if !self.is_running() {
                bail!("the agent exited before logging {needle:?}; its log:\n{log}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in the agent's status")
    }

    /// How many files the agent has open now.
    pub fn open_files(&self) -> Result<usize> {
        Ok(fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    /// The agent's soft and hard limits of open files.
    pub fn open_file_limits(&self) -> Result<(u64, u64)> {
        let limits = fs::read_to_string(format!("/proc/{}/limits", self.pid()))?;
        let line = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .context("no open-file limit in the agent's limits")?;
        let mut values = line
            .trim_start_matches("Max open files")
            .split_whitespace()
            .map(str::parse);
        match (values.next(), values.next()) {
            (Some(Ok(soft)), Some(Ok(hard))) => Ok((soft, hard)),
            _ => bail!("cannot read {line:?}"),
        }
    }

    /// The CPU time the agent has used so far, user and system.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // The fields after the command's ")": state is field 3, utime 14
        // and stime 15, in clock ticks.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let ticks = |index: usize| -> Result<u64> {
            fields
                .get(index - 3)
                .and_then(|field| field.parse().ok())
                .context("cannot read the agent's CPU time")
        };
        // SAFETY: sysconf has no memory-safety preconditions.
        let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .unwrap_or(100)
            .max(1);
        let total = ticks(14)? + ticks(15)?;
        Ok(Duration::from_millis(total * 1000 / per_second))
    }

    #[must_use]
    pub fn is_running(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        let exists = unsafe { libc::kill(pid, 0) } == 0;
        // A zombie still "exists"; look at its state too.
        exists
            && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or_default()
                    .trim_start()
                    .starts_with('Z')
            })
    }

    /// SIGKILL, as an OOM kill or a node problem would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The address the agent serves `what` ("healthz" or "metrics") on,
    /// from its log.
    pub fn address(&self, what: &str) -> Result<String> {
        let needle = format!("{what} listening bound=");
        let log = self.log();
        log.split(&needle)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .with_context(|| format!("the agent logged no {needle:?}:\n{log}"))
    }

    /// One HTTP GET to the agent's `what` listener: status and body.
    pub fn http_get(&self, what: &str, path: &str) -> Result<(u16, String)> {
        let address = self.address(what)?.parse()?;
        http_get(address, path, Duration::from_secs(5)).map_err(anyhow::Error::msg)
    }

    /// Runs `proxy-userspace services --output json` against the lab's pins.
    pub fn services_json(&self) -> Result<String> {
        self.query("services", &[])
    }

    /// `services --stats --output json`: with each slot's translations.
    pub fn services_stats_json(&self) -> Result<String> {
        self.query("services", &["--stats"])
    }

    /// Runs `proxy-userspace stats --output json` against the lab's pins.
    pub fn stats_json(&self) -> Result<String> {
        self.query("stats", &[])
    }

    fn query(&self, command: &str, flags: &[&str]) -> Result<String> {
        let out = Command::new(&self.binary)
            .arg(command)
            .args(flags)
            .args(["--output", "json", "--bpffs"])
            .arg(&self.bpffs)
            .output()?;
        if !out.status.success() {
            bail!("{command} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `command` with open-file limits `soft` and `hard`, as a
/// container runtime or systemd would start the agent.
pub fn limit_open_files(command: &mut Command, soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit is async-signal-safe and reads only `limit`, a copy
    // owned by the closure.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Raises this process's soft limit of open files to its hard limit, for
/// a test that holds thousands of connections; returns the new limit.
pub fn raise_open_file_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write `limit`, which outlives them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            bail!("getrlimit: {}", io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
            bail!("setrlimit: {}", io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// The agent binary the tests and the demo run: `$PROXY_AGENT`, or the
/// workspace's debug build.
#[must_use]
pub fn agent_binary() -> PathBuf {
    std::env::var_os("PROXY_AGENT").map_or_else(
        || crate::workspace_root().join("target/debug/proxy-userspace"),
        PathBuf::from,
    )
}

// The doctor's client, so the tests read the agent's listeners as an
// operator's tools do.
#[path = "../../../proxy-userspace/src/http_get.rs"]
mod shared_http_get;

/// The most of a body the lab reads: a /metrics page of a few thousand
/// frontends fits many times over.
const BODY_LIMIT: usize = 16 << 20;

/// One GET of `path` on a new connection to `address`, answered within
/// `within`: status and body, or what went wrong (connect, the exchange, or
/// an answer that is not HTTP). The socket is made on the calling thread,
/// so a caller inside a lab's netns reaches that netns's listeners.
pub fn http_get(
    address: std::net::SocketAddr,
    path: &str,
    within: Duration,
) -> std::result::Result<(u16, String), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime
        .block_on(shared_http_get::http_get(address, path, within, BODY_LIMIT))
        .map_err(|e| e.to_string())
}
