//! Developer commands and the netns lab they share.
//!
//! The lab is a library so that the privileged tests (`tests/`), the demo
//! and the bench all stand on the same harness.

pub mod bench;
pub mod ebpf_build;
pub mod lab;
pub mod prerequisites;

use std::path::{Path, PathBuf};

/// The workspace root (xtask lives one level below it).
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}
