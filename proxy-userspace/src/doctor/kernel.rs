//! Whether the kernel can run the datapath: its version, BTF, cgroup2,
//! bpffs, and whether the programs load.

use std::{fs, path::Path};

use super::{Check, Context, Status};
use crate::{bpf_sys, datapath, report::chain};

/// The kernel where sock_addr hooks may set the errno that refusing a
/// Service without endpoints needs.
const KERNEL_FOR_REFUSAL: (u32, u32) = (6, 1);
/// Below this there are no bpf_links for cgroups at all.
const KERNEL_MINIMUM: (u32, u32) = (5, 7);

pub(super) fn kernel(cx: &Context) -> Check {
    const NAME: &str = "kernel";
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let version = parse_version(&release);
    let mut facts = vec![format!("Linux {release}")];
    let mut problems: Vec<(Status, String, &str)> = Vec::new();
    let mut problem = |status: Status, fact: String, fix: &'static str| {
        problems.push((status, fact, fix));
    };
    match version {
        Some(v) if v < KERNEL_MINIMUM => problem(
            Status::Fail,
            "older than 5.7: no bpf_link for cgroups".to_owned(),
            "upgrade the kernel to 6.1 or newer",
        ),
        Some(v) if v < KERNEL_FOR_REFUSAL => problem(
            Status::Warn,
            "older than 6.1: Services without endpoints cannot refuse at once".to_owned(),
            "upgrade the kernel to 6.1 or newer",
        ),
        Some(_) => {}
        None => problem(
            Status::Warn,
            "version unreadable".to_owned(),
            "check /proc/sys/kernel/osrelease",
        ),
    }
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        facts.push("BTF".to_owned());
    } else {
        problem(
            Status::Warn,
            "no /sys/kernel/btf/vmlinux".to_owned(),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        );
    }
    match crate::cgroup2::cgroup2_root() {
        Ok(root) => facts.push(format!("cgroup2 at {}", root.display())),
        Err(_) => problem(
            Status::Fail,
            "no cgroup2 mounted".to_owned(),
            "mount cgroup2: `mount -t cgroup2 none /sys/fs/cgroup`",
        ),
    }
    let existing = cx
        .pins
        .root()
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match bpf_sys::is_bpffs(existing) {
        Ok(true) => facts.push(format!("bpffs at {}", existing.display())),
        _ => problem(
            Status::Fail,
            format!("{} is not on bpffs", existing.display()),
            "mount bpffs: `mount -t bpf bpf /sys/fs/bpf`",
        ),
    }
    match datapath::probe_load() {
        Ok(()) => facts.push(format!(
            "the {} programs load",
            datapath::program_names().len()
        )),
        Err(error) => problem(
            Status::Fail,
            format!("the programs do not load: {}", chain(&error)),
            "run as root (CAP_BPF, CAP_SYS_ADMIN) on a kernel 6.1 or newer with CONFIG_CGROUP_BPF=y",
        ),
    }
    let worst = problems.iter().map(|p| p.0).max().unwrap_or(Status::Ok);
    let mut fixes: Vec<&str> = problems.iter().map(|p| p.2).collect();
    fixes.dedup();
    facts.extend(problems.into_iter().map(|p| p.1));
    let evidence = facts.join(", ");
    if worst == Status::Ok {
        Check::ok(NAME, evidence)
    } else {
        Check::problem(NAME, worst, evidence, fixes.join("; "))
    }
}

/// `major.minor` of a kernel release such as `6.18.44-fc`.
fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_version("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(parse_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_version("6.0.1") < Some(KERNEL_FOR_REFUSAL));
        assert_eq!(parse_version("weird"), None);
    }
}
