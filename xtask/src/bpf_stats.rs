//! What each of a lab's eBPF programs costs per call, from the kernel's
//! own run-time statistics (`run_time_ns` and `run_cnt`), read through
//! aya.

use std::os::fd::OwnedFd;

use anyhow::{Context as _, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
    sys::{Stats, enable_stats},
};

use crate::lab::Lab;

/// Turns on the kernel's per-program run-time statistics for as long as it
/// lives. BPF_ENABLE_STATS is reference-counted, unlike the
/// `kernel.bpf_stats_enabled` sysctl, so labs running side by side cannot
/// turn it off under each other.
pub struct RunTimeStats {
    _fd: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> Result<Self> {
        Ok(Self {
            _fd: enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS")?,
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
        let pin = lab.bpffs().join("links").join(program);
        let link = PinnedLink::from_pin(&pin)
            .with_context(|| format!("cannot open the link pinned at {}", pin.display()))?;
        let id = FdLink::from(link).info()?.program_id();
        // Other labs load and unload programs meanwhile: one that went
        // between listing and reading is theirs, not an error.
        let info = loaded_programs()
            .filter_map(Result::ok)
            .find(|info| info.id() == id)
            .with_context(|| format!("program {id} behind {} is gone", pin.display()))?;
        Ok(Self {
            nanoseconds: u64::try_from(info.run_time().as_nanos())?,
            calls: info.run_count(),
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
