//! How the eBPF object is built. Shared, by `#[path]`, between
//! `cargo xtask build-ebpf` and the agent's build script, so that both build
//! the same object the same way. Only `std` may be used here.
//!
//! Not aya-build (in the lock through aya-ebpf's build scripts): it wants
//! the eBPF crate as a build-dependency, so a host-buildable library in a
//! crate that builds only for bpfel; it keeps its target directory under
//! the build script's OUT_DIR, so `cargo xtask build-ebpf` and the agent's
//! build could no longer share one build at one fixed path; and it checks
//! none of nightly, rust-src and bpf-linker before it starts.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The eBPF target triple.
pub const TARGET: &str = "bpfel-unknown-none";
/// The toolchain that builds the eBPF crate (build-std needs a nightly).
pub const TOOLCHAIN: &str = "nightly";

/// Where the eBPF build keeps its artifacts, apart from the host build so the
/// two cargo invocations never wait on each other's lock.
#[must_use]
pub fn target_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("ebpf")
}

/// The object the agent embeds.
#[must_use]
pub fn object_path(workspace: &Path) -> PathBuf {
    target_dir(workspace)
        .join(TARGET)
        .join("release")
        .join("proxy-ebpf")
}

/// Something the eBPF build needs that this machine lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Nightly,
    RustSrc,
    BpfLinker,
}

impl Missing {
    /// One line: what is missing and the command that fixes it.
    #[must_use]
    pub fn advice(self) -> &'static str {
        match self {
            Self::Nightly => {
                "the nightly toolchain is missing: install it with `rustup toolchain install nightly`"
            }
            Self::RustSrc => {
                "rust-src for nightly is missing: run `cargo xtask build-ebpf` (or `rustup component add rust-src --toolchain nightly`)"
            }
            Self::BpfLinker => {
                "bpf-linker is missing: run `cargo xtask build-ebpf`, which installs it against the nightly's LLVM"
            }
        }
    }
}

/// The nightly's sysroot, if that toolchain is installed.
#[must_use]
pub fn nightly_sysroot() -> Option<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The first prerequisite of the eBPF build that is missing, if any.
#[must_use]
pub fn first_missing() -> Option<Missing> {
    let Some(sysroot) = nightly_sysroot() else {
        return Some(Missing::Nightly);
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Some(Missing::RustSrc);
    }
    if bpf_linker().is_none() {
        return Some(Missing::BpfLinker);
    }
    None
}

/// bpf-linker on PATH or in cargo's bin directory.
#[must_use]
pub fn bpf_linker() -> Option<PathBuf> {
    let cargo_bins = [
        std::env::var_os("CARGO_HOME").map(|home| PathBuf::from(home).join("bin")),
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin")),
    ];
    find_program("bpf-linker", cargo_bins.into_iter().flatten())
}

/// `name` in a PATH directory, or else in one of `more_dirs`.
pub fn find_program(name: &str, more_dirs: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(more_dirs)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The command that builds the eBPF object into [`object_path`]. Cargo's own
/// fingerprints make it a no-op when nothing changed.
#[must_use]
pub fn build_command(workspace: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        TOOLCHAIN,
        "cargo",
        "build",
        "--release",
        "--target",
        TARGET,
    ])
    .args(["-Z", "build-std=core", "--manifest-path"])
    .arg(workspace.join("proxy-ebpf/Cargo.toml"))
    .arg("--target-dir")
    .arg(target_dir(workspace))
    // BTF for the maps, so `bpftool map dump` shows field names.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    // A build script runs inside another cargo; none of its settings apply.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    if let Some(linker) = bpf_linker()
        && let Some(dir) = linker.parent()
    {
        // Cargo looks bpf-linker up on PATH.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        dirs.push(dir.to_path_buf());
        if let Ok(joined) = std::env::join_paths(dirs) {
            cmd.env("PATH", joined);
        }
    }
    cmd
}
