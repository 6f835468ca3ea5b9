//! The pin directory: where it is, who may own it, and who may use it.
//!
//! The agent is root and the directory holds what steers every socket on
//! the node, so nobody else may have prepared it or be able to change it:
//! it is made here with mode 0700, a directory owned by another user or
//! writable by group or others is refused, and so is a symlink anywhere
//! under it. Every ancestor must be root's and not writable by others
//! (unless sticky, as /sys/fs/bpf is on some hosts), or its owner could swap
//! the whole directory. Since only root can then change anything inside,
//! checking the paths once is enough: no later rename can race the checks.
//!
//! One agent at a time: [`Pins::prepare`] takes an exclusive `flock` on the
//! directory itself (bpffs holds no regular files) for the agent's lifetime,
//! and a second agent, or a `cleanup`, is refused with the holder's pid.

use std::{
    fs::{self, DirBuilder, File, OpenOptions, TryLockError},
    io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use crate::bpf_sys;

/// Where things are pinned under the bpffs directory.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("cannot use {path} for pins")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the pin directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing the pin directory {path}: {reason}; whoever controls it controls the \
         datapath. Remove it as root or choose another --bpffs"
    )]
    Unsafe { path: PathBuf, reason: String },
    #[error("{path} is in use by another agent ({holder}); stop it first")]
    Locked { path: PathBuf, holder: String },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The exclusive lock on the pin directory: held while it lives, released
/// when it is dropped (or when the process dies, however it dies).
#[derive(Debug)]
#[must_use = "the lock is released when the guard is dropped"]
pub struct PinLock {
    _dir: File,
}

impl Pins {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub(crate) fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    #[must_use]
    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// Makes the pin directory (mounting bpffs if the host has not), checks
    /// that nobody but root controls it, and locks it for this agent. Keep
    /// the guard for as long as the agent runs.
    pub fn prepare(&self) -> Result<PinLock, PinsError> {
        bpf_sys::ensure_bpffs(&self.root).map_err(|source| PinsError::Bpffs {
            path: self.root.clone(),
            source,
        })?;
        check_ancestors(&self.root)?;
        make_private_dir(&self.root)?;
        let lock = self.lock()?;
        for dir in [self.maps_dir(), self.links_dir()] {
            make_private_dir(&dir)?;
        }
        Ok(lock)
    }

    /// Checks an existing pin directory as [`Pins::prepare`] does, making
    /// nothing, and locks it, for `cleanup`: `None` when there is no
    /// directory. Removing pins through a directory another user controls
    /// could detach some other datapath.
    pub fn lock_existing(&self) -> Result<Option<PinLock>, PinsError> {
        if fs::symlink_metadata(&self.root).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
            return Ok(None);
        }
        check_ancestors_only(&self.root)?;
        check_dir(&self.root)?;
        let lock = self.lock()?;
        for dir in [self.maps_dir(), self.links_dir()] {
            if fs::symlink_metadata(&dir).is_ok() {
                check_dir(&dir)?;
            }
        }
        Ok(Some(lock))
    }

    fn lock(&self) -> Result<PinLock, PinsError> {
        let dir = open_dir(&self.root)?;
        match dir.try_lock() {
            Ok(()) => Ok(PinLock { _dir: dir }),
            Err(TryLockError::WouldBlock) => Err(PinsError::Locked {
                path: self.root.clone(),
                holder: lock_holder(&dir).map_or_else(
                    || "its pid is not in /proc/locks".to_owned(),
                    |pid| format!("pid {pid}"),
                ),
            }),
            Err(TryLockError::Error(source)) => Err(PinsError::Lock {
                path: self.root.clone(),
                source,
            }),
        }
    }

    /// The pid of the agent holding the directory's lock, without taking
    /// it: `None` when nobody holds it (or the directory is missing).
    #[must_use]
    pub fn holder(&self) -> Option<u32> {
        lock_holder(&open_dir(&self.root).ok()?)
    }

    /// Refuses a pin that is not what it claims: a symlink would make the
    /// kernel open whatever it points at.
    pub(crate) fn check_entry(path: &Path) -> Result<bool, PinsError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => Err(PinsError::Unsafe {
                path: path.to_owned(),
                reason: "it is a symlink".to_owned(),
            }),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(PinsError::Create {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// Creates `dir` with mode 0700, or accepts it if it exists as root's own
/// real directory that only root can write to.
fn make_private_dir(dir: &Path) -> Result<(), PinsError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        // Someone may have made it first; the checks below decide.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(PinsError::Create {
                path: dir.to_owned(),
                source,
            });
        }
    }
    check_dir(dir)
}

/// A real directory, root's, that only root can write to.
fn check_dir(dir: &Path) -> Result<(), PinsError> {
    let meta = open_dir(dir)?
        .metadata()
        .map_err(|source| PinsError::Create {
            path: dir.to_owned(),
            source,
        })?;
    check_owner(dir, &meta, false)
}

/// Opens a directory without following a symlink at its last component.
fn open_dir(dir: &Path) -> Result<File, PinsError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP)
                || source.raw_os_error() == Some(libc::ENOTDIR)
            {
                PinsError::Unsafe {
                    path: dir.to_owned(),
                    reason: "it is a symlink or not a directory".to_owned(),
                }
            } else {
                PinsError::Create {
                    path: dir.to_owned(),
                    source,
                }
            }
        })
}

/// Root's, and writable by nobody else; a sticky directory (/sys/fs/bpf,
/// /tmp) may be world-writable, since nobody can then move what root made.
fn check_owner(path: &Path, meta: &fs::Metadata, sticky_ok: bool) -> Result<(), PinsError> {
    let refuse = |reason: String| {
        Err(PinsError::Unsafe {
            path: path.to_owned(),
            reason,
        })
    };
    if meta.uid() != 0 {
        return refuse(format!("it is owned by uid {}, not root", meta.uid()));
    }
    let mode = meta.mode();
    let shared_write = mode & (libc::S_IWGRP | libc::S_IWOTH) != 0;
    let sticky = mode & libc::S_ISVTX != 0;
    if shared_write && !(sticky_ok && sticky) {
        return refuse(format!(
            "its mode {:o} lets group or others write to it",
            mode & 0o7777
        ));
    }
    Ok(())
}

fn check_ancestors(root: &Path) -> Result<(), PinsError> {
    check_ancestors_only(root)?;
    // Missing ancestors are made by root, for root.
    if let Some(parent) = root.parent()
        && !parent.as_os_str().is_empty()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|source| PinsError::Create {
                path: parent.to_owned(),
                source,
            })?;
    }
    Ok(())
}

fn check_ancestors_only(root: &Path) -> Result<(), PinsError> {
    for ancestor in root.ancestors().skip(1) {
        if ancestor.as_os_str().is_empty() {
            continue;
        }
        match fs::metadata(ancestor) {
            Ok(meta) => check_owner(ancestor, &meta, true)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(PinsError::Create {
                    path: ancestor.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The pid holding the flock on `dir`, from /proc/locks (flock has no call
/// that names the holder).
fn lock_holder(dir: &File) -> Option<u32> {
    let meta = dir.metadata().ok()?;
    let locks = fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// Parses lines such as `1: FLOCK  ADVISORY  WRITE 4242 00:1f:1234 0 EOF`
/// (device as hex major:minor, then the inode).
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let wanted = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Waiters are listed as "1: -> FLOCK ..."; only the holder counts.
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&wanted.as_str()))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let dev = libc::makedev(0, 0x1f);
        let locks = "1: POSIX  ADVISORY  WRITE 100 00:1f:99 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:1f:1234 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 777 00:1f:1234 0 EOF\n";
        assert_eq!(holder_in(locks, dev, 1234), Some(4242));
        assert_eq!(holder_in(locks, dev, 99), None);
        assert_eq!(holder_in(locks, libc::makedev(8, 1), 1234), None);
    }

    #[test]
    fn a_directory_others_can_write_is_refused_unless_sticky() {
        let dir = std::env::temp_dir().join(format!("pins-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mode = |m: u32| {
            fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap();
            fs::metadata(&dir).unwrap()
        };
        let is_root = fs::metadata(&dir).unwrap().uid() == 0;
        if is_root {
            assert!(check_owner(&dir, &mode(0o700), false).is_ok());
            assert!(check_owner(&dir, &mode(0o755), false).is_ok());
            assert!(check_owner(&dir, &mode(0o777), false).is_err());
            assert!(check_owner(&dir, &mode(0o770), false).is_err());
            assert!(check_owner(&dir, &mode(0o1777), true).is_ok());
            assert!(check_owner(&dir, &mode(0o1777), false).is_err());
        } else {
            assert!(check_owner(&dir, &mode(0o700), false).is_err());
        }
        fs::remove_dir(&dir).unwrap();
    }
}
