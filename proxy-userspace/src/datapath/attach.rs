//! Attaching the programs: the cgroup programs by pinned bpf_links, the tc
//! programs by TCX links (pinned) or, where the kernel has no TCX, by
//! clsact filters.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::{fd::OwnedFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    links::FdLink,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use proxy_common::{DeviceRole, PROGRAMS, TC_PROGRAMS, TcHook};
use tracing::{info, warn};

use super::{
    Datapath, DatapathError, HoldError, Pins,
    load::{CgroupProgram, cgroup_program, classifier},
};
use crate::bpf_sys;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "--cgroup {path} is not a cgroup v2 directory (cgroup v1 and plain directories cannot hold these programs)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("cannot open the cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the link of {name} is not a bpf_link (kernel older than 5.7?)")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("cannot pin the link of {name} at {path}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot swap the program behind the pinned link {path}")]
    UpdateLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the defunct link {path}")]
    RemoveDefunct {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks `--cgroup` before anything is made: it must be a cgroup v2
/// directory, or attaching fails only after the maps are pinned.
pub fn check_cgroup(path: &Path) -> Result<(), AttachError> {
    match bpf_sys::is_cgroup2(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(AttachError::NotCgroup2 {
            path: path.to_owned(),
        }),
        Err(source) => Err(AttachError::Cgroup {
            path: path.to_owned(),
            source,
        }),
    }
}

impl Datapath {
    /// Attaches the tc programs to exactly `devices`, each device the
    /// programs of its role: a device's pinned links get the new programs
    /// swapped in, a new device gets links of its own (TCX, pinned; clsact
    /// where the kernel has no TCX), and the links no longer wanted (a
    /// device no longer chosen, or of another role now) are unpinned, which
    /// detaches them. A device that fails is logged and skipped; the others
    /// still go on.
    pub fn attach_devices(&mut self, devices: &BTreeMap<String, DeviceRole>, all: &[String]) {
        let mut wanted = BTreeSet::new();
        for (device, role) in devices {
            for (name, attach_type) in tc_hooks(Some(*role)) {
                wanted.insert((name, device.as_str()));
                if let Err(error) = self.attach_device(name, device, attach_type) {
                    warn!(program = name, device, error = %crate::report::chain(&error), "cannot attach to the device");
                }
            }
        }
        // The links held but no longer pinned too: holding one keeps it.
        let mut links: BTreeSet<(PathBuf, TcLink)> = tc_links(&self.pins).into_iter().collect();
        links.extend(
            self.held
                .tc_links
                .keys()
                .filter_map(|path| Some((path.clone(), tc_link(path)?))),
        );
        for (path, TcLink { program, device }) in links {
            if !wanted.contains(&(program, device.as_str())) {
                let held = self.held.tc_links.remove(&path);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        info!(device, link = %path.display(), "detached from a device no longer used");
                    }
                    Err(error) if error.kind() == io::ErrorKind::NotFound && held.is_some() => {
                        info!(device, "detached from a device no longer used");
                    }
                    Err(error) => {
                        warn!(device, link = %path.display(), %error, "cannot unpin a tc link");
                    }
                }
            }
        }
        if !self.tcx {
            // clsact filters have no pin to list them by: ask every device.
            for device in all.iter().filter(|d| !devices.contains_key(*d)) {
                if detach_clsact(device) {
                    info!(
                        device,
                        "detached the clsact filters from a device no longer used"
                    );
                }
            }
        }
    }

    /// `--tcx false`: attach the tc programs as clsact filters even where
    /// the kernel has TCX.
    pub fn set_tcx(&mut self, tcx: bool) {
        self.tcx = tcx;
    }

    fn attach_device(
        &mut self,
        name: &'static str,
        device: &str,
        attach_type: TcAttachType,
    ) -> Result<(), DatapathError> {
        let link_path = self.pins.link(&format!("{name}@{device}"));
        let program = classifier(&mut self.ebpf, name)?;
        if let Some(link) = swap_pinned(
            name,
            &link_path,
            program
                .fd()
                .map_err(|source| AttachError::Program { name, source })?,
        )? {
            self.held.tc_links.insert(link_path, link);
            return Ok(());
        }
        if !self.tcx {
            return attach_clsact(program, name, device, attach_type);
        }
        let tcx = program.attach_with_options(
            device,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        );
        let link_id = match tcx {
            Ok(link_id) => link_id,
            Err(error) => {
                warn!(program = name, device, error = %crate::report::chain(&error), "TCX is unavailable; using clsact");
                return attach_clsact(program, name, device, attach_type);
            }
        };
        let link = program
            .take_link(link_id)
            .map_err(|source| AttachError::Program { name, source })?;
        let link = FdLink::try_from(link).map_err(|source| AttachError::Link { name, source })?;
        let held = pin_and_hold(name, link, &link_path)?;
        self.held.tc_links.insert(link_path.clone(), held);
        info!(program = name, device, link = %link_path.display(), "attached (TCX)");
        Ok(())
    }

    /// Attaches every program to `cgroup`. Where a link is already pinned
    /// (an earlier agent's), the link is kept and only its program is
    /// swapped, atomically.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let (cgroup_dir, inode) = open_cgroup(cgroup)?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let link_path = self.pins.link(name);
            let program = cgroup_program(&mut self.ebpf, name)?;
            if let Some(link) = swap_pinned(name, &link_path, program.fd()?)? {
                links.push((name, link));
                continue;
            }
            links.push((name, self.attach_anew(name, &cgroup_dir, cgroup)?));
        }
        self.held.cgroup_links = links;
        self.held.cgroup = Some((cgroup.to_owned(), inode));
        Ok(())
    }

    /// Attaches one cgroup program with a link of its own, pinned.
    pub(super) fn attach_anew(
        &mut self,
        name: &'static str,
        cgroup_dir: &fs::File,
        cgroup: &Path,
    ) -> Result<OwnedFd, DatapathError> {
        let link_path = self.pins.link(name);
        let link = cgroup_program(&mut self.ebpf, name)?.attach(cgroup_dir)?;
        let held = pin_and_hold(name, link, &link_path)?;
        info!(program = name, cgroup = %cgroup.display(), link = %link_path.display(), "attached");
        Ok(held)
    }
}

/// The cgroup, opened to attach to, and its inode: a cgroup made again
/// under the same path has another.
pub(super) fn open_cgroup(cgroup: &Path) -> Result<(fs::File, u64), DatapathError> {
    let error = |source| AttachError::Cgroup {
        path: cgroup.to_owned(),
        source,
    };
    let dir = fs::File::open(cgroup).map_err(error)?;
    let inode = dir.metadata().map_err(error)?.ino();
    Ok((dir, inode))
}

/// Pins a new link and opens it again: aya's descriptor goes with the
/// pinned link it returns, and the agent keeps one of its own.
fn pin_and_hold(name: &'static str, link: FdLink, path: &Path) -> Result<OwnedFd, DatapathError> {
    let pinned = link.pin(path).map_err(|source| AttachError::PinLink {
        name,
        path: path.to_owned(),
        source,
    })?;
    let held = bpf_sys::obj_get(path).map_err(|source| HoldError {
        path: path.to_owned(),
        source,
    })?;
    drop(pinned);
    Ok(held)
}

/// Swaps `program` into the link pinned at `link_path`, atomically, and
/// returns the link, to hold; `None` when there is no pinned link to swap
/// into (none, or a defunct one whose cgroup or device is gone, which is
/// unpinned here to be replaced).
fn swap_pinned(
    name: &'static str,
    link_path: &Path,
    program: &aya::programs::ProgramFd,
) -> Result<Option<OwnedFd>, DatapathError> {
    let Ok(link) = bpf_sys::obj_get(link_path) else {
        return Ok(None);
    };
    match bpf_sys::link_update(&link, program) {
        Ok(()) => {
            info!(program = name, link = %link_path.display(), "swapped the program behind the pinned link");
            Ok(Some(link))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
            warn!(program = name, link = %link_path.display(), "the pinned link is defunct; attaching anew");
            fs::remove_file(link_path).map_err(|source| AttachError::RemoveDefunct {
                path: link_path.to_owned(),
                source,
            })?;
            Ok(None)
        }
        Err(source) => Err(AttachError::UpdateLink {
            path: link_path.to_owned(),
            source,
        }
        .into()),
    }
}

/// The tc programs for a device of `role` (every one without), each with
/// the hook it goes on as aya names it.
fn tc_hooks(role: Option<DeviceRole>) -> impl Iterator<Item = (&'static str, TcAttachType)> {
    TC_PROGRAMS
        .into_iter()
        .filter(move |program| role.is_none_or(|role| program.goes_on(role)))
        .map(|program| {
            let attach_type = match program.hook {
                TcHook::Ingress => TcAttachType::Ingress,
                TcHook::Egress => TcAttachType::Egress,
            };
            (program.name, attach_type)
        })
}

/// Where the clsact filters go: a priority and handle of this project's
/// own, so that a restart finds its filter and replaces the program in
/// it, rather than adding a second filter, and no one else's is touched.
const CLSACT_PRIORITY: u16 = 0x0eb5;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x0eb5);

/// Kernels before 6.6 (or `--tcx false`): a clsact filter, which has no
/// link to pin but stays attached when the agent exits. An earlier
/// agent's filter gets the new program in place, atomically.
fn attach_clsact(
    program: &mut SchedClassifier,
    name: &'static str,
    device: &str,
    attach_type: TcAttachType,
) -> Result<(), DatapathError> {
    if let Err(error) = tc::qdisc_add_clsact(device) {
        tracing::debug!(device, %error, "clsact qdisc not added (it may exist)");
    }
    let program_error = |source| AttachError::Program { name, source };
    let ours =
        SchedClassifierLink::attached(device, attach_type, CLSACT_PRIORITY, CLSACT_HANDLE, None)
            .map_err(|error| program_error(tc::TcError::IoError(error).into()))?;
    let (link_id, how) = match program.attach_to_link(ours) {
        Ok(link_id) => (link_id, "replaced the program in the clsact filter"),
        // No filter of ours there yet (ENOENT): a new one.
        Err(_) => (
            program
                .attach_with_options(
                    device,
                    attach_type,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: CLSACT_PRIORITY,
                        handle: CLSACT_HANDLE,
                        classid: None,
                    }),
                )
                .map_err(program_error)?,
            "attached (clsact)",
        ),
    };
    let link = program.take_link(link_id).map_err(program_error)?;
    // Dropping the link would detach the filter.
    std::mem::forget(link);
    info!(program = name, device, "{how}");
    Ok(())
}

/// Removes the clsact filters of the tc programs from `device`; whether
/// there were any.
pub(super) fn detach_clsact(device: &str) -> bool {
    let mut detached = false;
    for (name, attach_type) in tc_hooks(None) {
        match tc::qdisc_detach_program(device, attach_type, name) {
            Ok(()) => detached = true,
            Err(tc::TcError::IoError(error)) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                warn!(device, program = name, %error, "cannot detach the clsact filter");
            }
        }
    }
    detached
}

/// What a tc link's pin (`links/<program>@<device>`) names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TcLink {
    pub program: &'static str,
    pub device: String,
}

fn tc_link(path: &Path) -> Option<TcLink> {
    let name = path.file_name()?.to_str()?;
    let (program, device) = name.split_once('@')?;
    let program = TC_PROGRAMS.iter().find(|tc| tc.name == program)?.name;
    Some(TcLink {
        program,
        device: device.to_owned(),
    })
}

/// The pinned tc links and what each names.
pub fn tc_links(pins: &Pins) -> Vec<(PathBuf, TcLink)> {
    let Ok(dir) = fs::read_dir(pins.links_dir()) else {
        return Vec::new();
    };
    let mut links: Vec<(PathBuf, TcLink)> = dir
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            let link = tc_link(&path)?;
            Some((path, link))
        })
        .collect();
    links.sort();
    links
}

impl CgroupProgram<'_> {
    /// Attaches to `cgroup` by a bpf_link, which it hands back to be pinned.
    fn attach(self, cgroup: &fs::File) -> Result<FdLink, AttachError> {
        // A bpf_link takes no attach flags (the kernel rejects any with
        // EINVAL) and always shares the hook with other programs.
        let mode = CgroupAttachMode::Single;
        let (name, link) = match self {
            Self::SockAddr(name, program) => {
                let error = |source| AttachError::Program { name, source };
                let link_id = program.attach(cgroup, mode).map_err(error)?;
                (
                    name,
                    FdLink::try_from(program.take_link(link_id).map_err(error)?),
                )
            }
            Self::Sock(name, program) => {
                let error = |source| AttachError::Program { name, source };
                let link_id = program.attach(cgroup, mode).map_err(error)?;
                (
                    name,
                    FdLink::try_from(program.take_link(link_id).map_err(error)?),
                )
            }
        };
        link.map_err(|source| AttachError::Link { name, source })
    }
}
