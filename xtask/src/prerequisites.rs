//! What the project needs on a machine, installed where that is possible,
//! otherwise named in one line with the command that fixes it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    ebpf_build::{self, Missing},
    run_checked,
};

/// Commands the lab, the tests and the demo run, and their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nginx", "nginx-light"),
    ("dnsmasq", "dnsmasq"),
    ("dig", "dnsutils"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("python3", "python3"),
    ("wrk", "wrk"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    // kube-proxy's IPVS leftovers, in the `cleanup --kube-proxy` test.
    ("ipset", "ipset"),
];

/// Where Debian's fonts-dejavu-core puts the font the bench's chart labels
/// are drawn in.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Files the bench reads, and their Debian packages.
const FILES: &[(&str, &str)] = &[(FONT, "fonts-dejavu-core")];

fn on_path(tool: &str) -> bool {
    which(tool).is_some()
}

/// `tool`'s path, looking on PATH and in the sbin directories a non-login
/// shell may lack.
#[must_use]
pub fn which(tool: &str) -> Option<PathBuf> {
    ebpf_build::find_program(tool, ["/usr/sbin", "/sbin"].map(PathBuf::from))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs the Debian packages of the lab's tools that are missing.
pub fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .chain(FILES.iter().filter(|(file, _)| !Path::new(file).exists()))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// Installs Debian packages with apt-get, as root, trying again when the
/// mirror hiccups.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    if !is_root() || !on_path("apt-get") {
        bail!(
            "missing packages {}: install them with `apt-get install {}` (as root)",
            packages.join(" "),
            packages.join(" ")
        );
    }
    eprintln!("installing {}", packages.join(" "));
    // A mirror that hiccups once should not fail a CI run.
    let mut attempt = 1;
    loop {
        let installed =
            run_checked(Command::new("apt-get").args(["update", "-qq"])).and_then(|()| {
                run_checked(
                    Command::new("apt-get")
                        .args(["install", "-y", "-qq", "--no-install-recommends"])
                        .args(packages)
                        .env("DEBIAN_FRONTEND", "noninteractive"),
                )
            });
        match installed {
            Err(error) if attempt < 3 => {
                eprintln!("{error:#}; trying again");
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_secs(5));
            }
            result => return result,
        }
    }
}

/// Installs rust-src and bpf-linker for the nightly when they are missing.
pub fn ensure_ebpf_toolchain() -> Result<()> {
    while let Some(missing) = ebpf_build::first_missing() {
        match missing {
            Missing::Nightly => bail!("{}", missing.advice()),
            Missing::RustSrc => run_checked(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                ebpf_build::TOOLCHAIN,
            ]))?,
            Missing::BpfLinker => install_bpf_linker()?,
        }
        if ebpf_build::first_missing() == Some(missing) {
            bail!("installing did not help: {}", missing.advice());
        }
    }
    Ok(())
}

/// Builds bpf-linker against the nightly's own libLLVM, so no LLVM has to be
/// fetched: cargo install finds it through an LLVM_PREFIX whose `lib/`
/// holds a `libLLVM.so` link to the nightly's library.
fn install_bpf_linker() -> Result<()> {
    let sysroot = ebpf_build::nightly_sysroot().context("no nightly sysroot")?;
    let lib_dir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("the nightly has no libLLVM in {}", lib_dir.display()))?;
    let major = llvm_major(&libllvm)
        .with_context(|| format!("cannot tell the LLVM version of {}", libllvm.display()))?;
    let prefix = crate::workspace_root().join("target/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    eprintln!("installing bpf-linker against {}", libllvm.display());
    run_checked(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", "^0.13"])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` → 22.
fn llvm_major(lib: &Path) -> Option<u32> {
    let name = lib.file_name()?.to_str()?;
    name.strip_prefix("libLLVM.so.")?
        .split(['.', '-'])
        .next()?
        .parse()
        .ok()
}

/// Builds the eBPF object, installing what its build needs first.
pub fn build_ebpf() -> Result<PathBuf> {
    ensure_ebpf_toolchain()?;
    let workspace = crate::workspace_root();
    run_checked(&mut ebpf_build::build_command(&workspace))?;
    Ok(ebpf_build::object_path(&workspace))
}

/// Builds the agent (its build script builds the eBPF object) and returns
/// the binary.
pub fn build_agent() -> Result<PathBuf> {
    ensure_ebpf_toolchain()?;
    run_checked(crate::cargo().args(["build", "--package", "proxy-userspace"]))?;
    Ok(crate::workspace_root().join("target/debug/proxy-userspace"))
}

/// The agent as it ships: measurements of its speed and memory need the
/// optimised build.
pub fn build_agent_release() -> Result<PathBuf> {
    ensure_ebpf_toolchain()?;
    run_checked(crate::cargo().args(["build", "--release", "--package", "proxy-userspace"]))?;
    Ok(crate::workspace_root().join("target/release/proxy-userspace"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_reads_the_nightly_library_name() {
        assert_eq!(
            llvm_major(Path::new("/x/libLLVM.so.22.1-rust-1.97.0-nightly")),
            Some(22)
        );
        assert_eq!(llvm_major(Path::new("/x/libLLVM.so")), None);
    }
}
