//! The agent guards its datapath while it runs.
//!
//! The pins are what keeps the datapath attached when no agent runs, and
//! what a starting agent adopts; but anyone with root can remove them (an
//! `rm -rf` of the pin directory), and a cgroup can be removed and made
//! again under its path. So the agent holds descriptors of its own for
//! every map and link: while it runs, nothing that happens to the pins
//! detaches a program. [`Datapath::guard`], called when the pin directory
//! changes and on the housekeeping timer, pins again what went, making the
//! directories again, and attaches anew to a cgroup whose links are
//! defunct.

use std::{
    fs, io,
    os::{fd::OwnedFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use proxy_common::PROGRAMS;
use tracing::{error, warn};

use super::{AttachError, Datapath, DatapathError, attach::open_cgroup};
use crate::bpf_sys;

/// What one look at the datapath found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GuardReport {
    /// Something was pinned or attached again (the directory may be new).
    pub repaired: bool,
    /// Why the datapath is not attached where it should be, or cannot be
    /// found by the next agent, while it is so.
    pub problem: Option<String>,
}

impl Datapath {
    /// Pins again whatever of its own went from the pin directory (making
    /// the directories again), and attaches anew to a cgroup made again
    /// under the same path.
    pub fn guard(&mut self) -> GuardReport {
        let mut report = GuardReport::default();
        let gone: Vec<PathBuf> = [
            self.pins.root().to_owned(),
            self.pins.maps_dir(),
            self.pins.links_dir(),
        ]
        .into_iter()
        .filter(|dir| is_gone(dir))
        .collect();
        if let Some(first) = gone.first() {
            error!(
                "{} is gone; making it again and pinning there what the agent holds",
                first.display()
            );
            if let Err(e) = self.pins.make_dirs() {
                report.problem = Some(format!(
                    "{} is gone and cannot be made again: {}",
                    first.display(),
                    crate::report::chain(&e)
                ));
                return report;
            }
        }
        let maps: Vec<(String, &OwnedFd, PathBuf)> = self
            .held
            .maps
            .iter()
            .map(|(name, fd)| ((*name).to_owned(), fd, self.pins.map(name)))
            .collect();
        self.pin_again("map", maps, &mut report);
        self.guard_cgroup(&mut report);
        let links: Vec<(String, &OwnedFd, PathBuf)> = self
            .held
            .cgroup_links
            .iter()
            .map(|(name, fd)| ((*name).to_owned(), fd, self.pins.link(name)))
            .chain(self.held.tc_links.iter().map(|(path, fd)| {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, fd, path.clone())
            }))
            .collect();
        self.pin_again("link", links, &mut report);
        report
    }

    /// Pins each object whose pin is gone again, from the agent's own
    /// descriptor: the same map or link, so programs and agents share it.
    fn pin_again(
        &self,
        what: &str,
        objects: Vec<(String, &OwnedFd, PathBuf)>,
        report: &mut GuardReport,
    ) {
        let gone: Vec<_> = objects
            .into_iter()
            .filter(|(_, _, pin)| is_gone(pin))
            .collect();
        if gone.is_empty() {
            return;
        }
        let names: Vec<&str> = gone.iter().map(|(name, _, _)| name.as_str()).collect();
        error!(
            pins = %self.pins.root().display(),
            "the pinned {what}s {} are gone; pinning the agent's own there again",
            names.join(", ")
        );
        for (name, fd, pin) in gone {
            match bpf_sys::obj_pin(fd, &pin) {
                Ok(()) => report.repaired = true,
                Err(e) => {
                    report.problem.get_or_insert_with(|| {
                        format!(
                            "cannot pin the {what} {name} again at {}: {e}",
                            pin.display()
                        )
                    });
                }
            }
        }
    }

    /// Attaches anew when the cgroup links are defunct: the cgroup was
    /// removed (and perhaps made again under its path), or someone detached
    /// them.
    fn guard_cgroup(&mut self, report: &mut GuardReport) {
        let Some((cgroup, inode)) = self.held.cgroup.clone() else {
            return;
        };
        let now = fs::metadata(&cgroup).ok().map(|meta| meta.ino());
        let detached = self
            .held
            .cgroup_links
            .iter()
            .any(|(_, fd)| bpf_sys::cgroup_link_info(fd).is_ok_and(|info| info.cgroup_id == 0));
        if now == Some(inode) && !detached {
            return;
        }
        let Some(now) = now else {
            report.problem = Some(format!(
                "the cgroup {} is gone: the programs are attached nowhere until it is made again",
                cgroup.display()
            ));
            return;
        };
        let why = if now == inode {
            "they were detached"
        } else {
            "the cgroup was removed and made again"
        };
        error!(
            "the cgroup links on {} are defunct ({why}); attaching to it anew",
            cgroup.display()
        );
        match self.attach_again(&cgroup) {
            Ok(()) => report.repaired = true,
            Err(e) => {
                report.problem = Some(format!(
                    "cannot attach to the cgroup {} again: {}",
                    cgroup.display(),
                    crate::report::chain(&e)
                ));
            }
        }
    }

    /// New links on `cgroup`, replacing the defunct ones and their pins.
    fn attach_again(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        super::check_cgroup(cgroup)?;
        let (cgroup_dir, inode) = open_cgroup(cgroup)?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let pin = self.pins.link(name);
            match fs::remove_file(&pin) {
                Err(source) if source.kind() != io::ErrorKind::NotFound => {
                    return Err(AttachError::RemoveDefunct { path: pin, source }.into());
                }
                _ => {}
            }
            links.push((name, self.attach_anew(name, &cgroup_dir, cgroup)?));
        }
        self.held.cgroup_links = links;
        self.held.cgroup = Some((cgroup.to_owned(), inode));
        Ok(())
    }
}

fn is_gone(path: &Path) -> bool {
    fs::symlink_metadata(path).is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
}

/// inotify on what the datapath depends on: the pin directory (all of it)
/// and the cgroup's parent (where the cgroup is removed and made again).
pub struct GuardWatch {
    watcher: notify::RecommendedWatcher,
    pins: PathBuf,
}

impl GuardWatch {
    /// Starts following `pins` and the parent of `cgroup`; each change is
    /// a unit on `changed`.
    pub fn start(
        pins: &Path,
        cgroup: &Path,
        changed: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> notify::Result<Self> {
        use notify::Watcher as _;
        let (ours, cgroup_path) = (pins.to_owned(), cgroup.to_owned());
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reads are no change; the cgroup's siblings come and go
                // with their pods. An error (an overflow) may hide anything.
                let relevant = event.map_or(true, |e| {
                    !matches!(e.kind, notify::EventKind::Access(_))
                        && (e.paths.is_empty()
                            || e.paths
                                .iter()
                                .any(|p| p.starts_with(&ours) || *p == cgroup_path))
                });
                if relevant {
                    let _ = changed.send(());
                }
            })?;
        // Without it the housekeeping timer still sees the cgroup go.
        if let Some(parent) = cgroup.parent()
            && let Err(error) = watcher.watch(parent, notify::RecursiveMode::NonRecursive)
        {
            warn!(%error, cgroup = %cgroup.display(), "cannot follow the cgroup's parent with inotify");
        }
        let mut watch = Self {
            watcher,
            pins: pins.to_owned(),
        };
        watch.follow_pins()?;
        Ok(watch)
    }

    /// Follows the pin directory again: a directory made again is a new
    /// one, which inotify does not know yet.
    pub fn follow_pins(&mut self) -> notify::Result<()> {
        use notify::Watcher as _;
        let _ = self.watcher.unwatch(&self.pins);
        self.watcher
            .watch(&self.pins, notify::RecursiveMode::Recursive)
    }
}
