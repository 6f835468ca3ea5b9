//! Where cgroup2 is mounted, as /proc/mounts has it: not always
//! /sys/fs/cgroup (hybrid hosts mount it at /sys/fs/cgroup/unified).
//!
//! std only: xtask's lab includes this file by path, so the agent and the
//! lab find the cgroup one way.

use std::{io, path::PathBuf};

/// The first cgroup2 mount point.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            match (fields.next(), fields.next(), fields.next()) {
                (Some(_), Some(path), Some("cgroup2")) => Some(PathBuf::from(path)),
                _ => None,
            }
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 file system is mounted (see /proc/mounts)",
            )
        })
}
