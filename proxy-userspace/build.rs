//! Builds the eBPF object the agent embeds, so a build of the agent never
//! uses a stale one: cargo re-runs this whenever the eBPF or shared sources
//! change, and the nested cargo rebuilds only what changed.

#[path = "../xtask/src/ebpf_build.rs"]
mod ebpf_build;

use std::path::Path;

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let workspace = Path::new(&manifest_dir)
        .parent()
        .expect("the agent lives in the workspace");
    for path in [
        "proxy-ebpf/src",
        "proxy-ebpf/Cargo.toml",
        "proxy-common/src",
        "proxy-common/Cargo.toml",
        "xtask/src/ebpf_build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    if let Some(missing) = ebpf_build::first_missing() {
        eprintln!("error: cannot build the eBPF object: {}", missing.advice());
        std::process::exit(1);
    }
    let status = ebpf_build::build_command(workspace)
        .status()
        .expect("rustup runs");
    if !status.success() {
        eprintln!("error: the eBPF build failed ({status}); see its output above");
        std::process::exit(1);
    }
    let object = ebpf_build::object_path(workspace);
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=PROXY_EBPF_OBJECT={}", object.display());
}
