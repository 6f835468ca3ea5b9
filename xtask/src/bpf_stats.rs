//! What each of a lab's eBPF programs costs per call, from the kernel's
//! own run-time statistics (`run_time_ns` and `run_cnt`, as `bpftool prog
//! show` reports them).

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::lab::Lab;

/// Turns on the kernel's per-program run-time statistics for as long as it
/// lives. BPF_ENABLE_STATS is reference-counted, unlike the
/// `kernel.bpf_stats_enabled` sysctl, so labs running side by side cannot
/// turn it off under each other.
pub struct RunTimeStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> Result<Self> {
        use std::os::fd::FromRawFd as _;
        /// `BPF_ENABLE_STATS` and `BPF_STATS_RUN_TIME` in linux/bpf.h.
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        let attr = BPF_STATS_RUN_TIME;
        // SAFETY: the attribute is the u32 the command reads.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                std::ptr::from_ref(&attr),
                size_of::<u32>(),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("BPF_ENABLE_STATS");
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(Self {
            _fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd)?) },
        })
    }
}

/// A program's totals so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunTime {
    pub nanoseconds: u64,
    pub calls: u64,
}

impl RunTime {
    /// The totals of the program behind the lab agent's pinned link
    /// `program` (a name from `proxy_common::PROGRAMS`).
    pub fn of(lab: &Lab, program: &str) -> Result<Self> {
        let link = lab.bpffs().join("links").join(program);
        let link = bpftool(&["link", "show", "pinned", &link.display().to_string()])?;
        let id = link["prog_id"].to_string();
        let prog = bpftool(&["prog", "show", "id", &id])?;
        let field = |name: &str| prog[name].as_u64().unwrap_or(0);
        Ok(Self {
            nanoseconds: field("run_time_ns"),
            calls: field("run_cnt"),
        })
    }

    /// What ran between `self` and `later`: nanoseconds per call, and calls.
    #[must_use]
    pub fn until(self, later: Self) -> (f64, u64) {
        let calls = later.calls.saturating_sub(self.calls);
        #[expect(clippy::cast_precision_loss, reason = "a ratio for humans")]
        let cost = later.nanoseconds.saturating_sub(self.nanoseconds) as f64 / calls.max(1) as f64;
        (cost, calls)
    }
}

/// Nanoseconds per call of each of `programs`, and its calls, while `work`
/// runs.
pub fn cost_of(
    lab: &Lab,
    programs: &[&str],
    work: impl FnOnce() -> Result<()>,
) -> Result<Vec<(f64, u64)>> {
    let before = programs
        .iter()
        .map(|program| RunTime::of(lab, program))
        .collect::<Result<Vec<_>>>()?;
    work()?;
    programs
        .iter()
        .zip(before)
        .map(|(program, before)| Ok(before.until(RunTime::of(lab, program)?)))
        .collect()
}

fn bpftool(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("cannot run bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
