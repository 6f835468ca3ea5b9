//! Developer commands and the netns lab they share.
//!
//! The lab is a library so that the privileged tests (`tests/`), the demo
//! and the bench all stand on the same harness.

pub mod apiserver;
pub mod bench;
pub mod bpf_stats;
pub mod btf_map;
pub mod ebpf_build;
pub mod lab;
pub mod prerequisites;
pub mod probe;
pub mod scale;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The workspace root (xtask lives one level below it).
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command to completion; its failure is an error naming it.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// `cargo`, in the workspace.
#[must_use]
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}
