//! The agent's own descriptors of every map and link it pinned or
//! adopted: while it holds them, nothing that happens to the pins detaches
//! a program (see `guard.rs`, which pins them again when they go).

use std::{collections::BTreeMap, io, os::fd::OwnedFd, path::PathBuf};

use proxy_common::MAPS;

use super::{DatapathError, Pins};
use crate::bpf_sys;

/// A map or link the agent pinned or adopted that it could not open again
/// to keep a descriptor of its own.
#[derive(Debug, thiserror::Error)]
#[error("cannot open {path}, just pinned, to hold it")]
pub struct HoldError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The agent's own descriptors of what it pinned or adopted.
#[derive(Default)]
pub(super) struct Held {
    pub(super) maps: Vec<(&'static str, OwnedFd)>,
    pub(super) cgroup_links: Vec<(&'static str, OwnedFd)>,
    /// The cgroup the links are on, with its inode when they were made.
    pub(super) cgroup: Option<(PathBuf, u64)>,
    /// By their pins' paths.
    pub(super) tc_links: BTreeMap<PathBuf, OwnedFd>,
}

impl Held {
    /// Opens every pinned map once more, right after loading: the maps the
    /// programs use, whatever becomes of the pins.
    pub(super) fn maps_of(pins: &Pins) -> Result<Self, DatapathError> {
        let mut maps = Vec::new();
        for name in MAPS {
            let path = pins.map(name);
            let fd = bpf_sys::obj_get(&path).map_err(|source| HoldError { path, source })?;
            maps.push((name, fd));
        }
        Ok(Self {
            maps,
            ..Self::default()
        })
    }
}
