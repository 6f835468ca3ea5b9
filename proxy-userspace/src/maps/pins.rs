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
//! One agent at a time: [`Pins::prepare`] binds an abstract unix socket
//! named after the directory's path (`@ebpf-proxy/agent/<path>`) for the
//! agent's lifetime, and a second agent, or a `cleanup`, is refused with the
//! holder's pid. The lock is not in the directory, so removing the
//! directory cannot release it (a lock on the directory itself went with
//! it): only the process's end does. Abstract sockets belong to a network
//! namespace, as iptables does, so the locks of a namespace are also the
//! list of the agents that share its masquerade rules; the agents of one
//! node run in its namespace (hostNetwork).

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
            net::{SocketAddr, UnixListener},
        },
    },
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
    _socket: UnixListener,
}

/// Where the agents' locks are, among the abstract socket names.
const LOCK_PREFIX: &str = "ebpf-proxy/agent/";
/// The longest abstract socket name (`sun_path` less its leading NUL).
const ABSTRACT_NAME_MAX: usize = 107;

/// Another agent of this network namespace, by the lock it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherAgent {
    /// Its pin directory (as its lock names it).
    pub pins: String,
    pub pid: Option<u32>,
}

impl std::fmt::Display for OtherAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid} on {}", self.pins),
            None => write!(f, "an agent on {}", self.pins),
        }
    }
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
        // First, so that the lock is named after the parent as it will be.
        check_ancestors(&self.root)?;
        let lock = self.lock()?;
        self.make_dirs()?;
        Ok(lock)
    }

    /// Makes the directory and its `maps` and `links` as [`Pins::prepare`]
    /// does, checking what is already there: also for an agent whose
    /// directory was removed under it, to pin again what it holds.
    pub fn make_dirs(&self) -> Result<(), PinsError> {
        check_ancestors(&self.root)?;
        for dir in [self.root.clone(), self.maps_dir(), self.links_dir()] {
            make_private_dir(&dir)?;
        }
        Ok(())
    }

    /// Checks an existing pin directory as [`Pins::prepare`] does, making
    /// nothing, and locks it, for `cleanup`: `None` when there is no
    /// directory (and no agent holds its lock: one whose directory was
    /// removed is about to make it again). Removing pins through a
    /// directory another user controls could detach some other datapath.
    pub fn lock_existing(&self) -> Result<Option<PinLock>, PinsError> {
        if fs::symlink_metadata(&self.root).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
            drop(self.lock()?);
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
        let lock_error = |source| PinsError::Lock {
            path: self.root.clone(),
            source,
        };
        let address =
            SocketAddr::from_abstract_name(self.lock_name().as_bytes()).map_err(lock_error)?;
        match UnixListener::bind_addr(&address) {
            Ok(socket) => Ok(PinLock { _socket: socket }),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(PinsError::Locked {
                path: self.root.clone(),
                holder: self.holder().map_or_else(
                    || "its pid is not in /proc".to_owned(),
                    |pid| format!("pid {pid}"),
                ),
            }),
            Err(source) => Err(lock_error(source)),
        }
    }

    /// The name of the directory's lock: its path made absolute, with the
    /// parent's symlinks resolved (the directory itself may be gone), so
    /// that every spelling of one directory takes the same lock. A path too
    /// long for a socket name is named by its hash.
    fn lock_name(&self) -> String {
        let absolute = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
        let canonical = match (absolute.parent(), absolute.file_name()) {
            (Some(parent), Some(name)) => {
                fs::canonicalize(parent).map_or_else(|_| absolute.clone(), |p| p.join(name))
            }
            _ => absolute,
        };
        let path = canonical.to_string_lossy();
        let name = format!("{LOCK_PREFIX}{}", path.trim_start_matches('/'));
        if name.len() <= ABSTRACT_NAME_MAX {
            name
        } else {
            format!("{LOCK_PREFIX}#{:016x}", fnv1a(path.as_bytes()))
        }
    }

    /// The pid of the agent holding the directory's lock, without taking
    /// it: `None` when nobody holds it (or /proc does not say).
    #[must_use]
    pub fn holder(&self) -> Option<u32> {
        let name = self.lock_name();
        let unix = fs::read_to_string("/proc/net/unix").ok()?;
        let inode = agent_locks(&unix)
            .into_iter()
            .find(|(lock, _)| *lock == name)?
            .1;
        socket_owner(inode)
    }

    /// The agents of this network namespace other than this directory's:
    /// those whose masquerade rules are the same as its own.
    #[must_use]
    pub fn other_agents(&self) -> Vec<OtherAgent> {
        let ours = self.lock_name();
        let unix = fs::read_to_string("/proc/net/unix").unwrap_or_default();
        agent_locks(&unix)
            .into_iter()
            .filter(|(name, _)| *name != ours)
            .map(|(name, inode)| OtherAgent {
                pins: format!("/{}", name.strip_prefix(LOCK_PREFIX).unwrap_or(&name)),
                pid: socket_owner(inode),
            })
            .collect()
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

/// The agents' locks among the sockets of /proc/net/unix (`Num RefCount
/// Protocol Flags Type St Inode Path`, an abstract name shown with a leading
/// `@`): each name with its socket's inode.
fn agent_locks(unix: &str) -> Vec<(String, u64)> {
    let prefix = format!("@{LOCK_PREFIX}");
    let mut locks: Vec<(String, u64)> = unix
        .lines()
        .filter_map(|line| {
            let at = line.find(&prefix)?;
            let inode = line[..at].split_whitespace().last()?.parse().ok()?;
            Some((line[at + 1..].to_owned(), inode))
        })
        .collect();
    locks.sort();
    locks.dedup();
    locks
}

/// The process that has the socket `inode` open, from /proc/*/fd (a
/// socket has no call that names its owner).
fn socket_owner(inode: u64) -> Option<u32> {
    let wanted = format!("socket:[{inode}]");
    fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|process| {
            let pid: u32 = process.file_name().to_str()?.parse().ok()?;
            fs::read_dir(process.path().join("fd"))
                .ok()?
                .filter_map(Result::ok)
                .any(|fd| {
                    fs::read_link(fd.path())
                        .is_ok_and(|target| target.as_os_str() == wanted.as_str())
                })
                .then_some(pid)
        })
}

/// FNV-1a, 64 bits: a hash that every build computes alike, for lock
/// names too long to be the path itself.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_locks_are_read_from_proc_net_unix() {
        let unix = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                    0000000000000000: 00000002 00000000 00010000 0001 01 4242 @ebpf-proxy/agent/sys/fs/bpf/a\n\
                    0000000000000000: 00000002 00000000 00010000 0001 01 77 @ebpf-proxy/agent/sys/fs/bpf/my pins\n\
                    0000000000000000: 00000002 00000000 00010000 0001 01 99 @/tmp/.X11-unix/X0\n\
                    0000000000000000: 00000003 00000000 00000000 0001 03 100 /run/systemd/notify\n";
        assert_eq!(
            agent_locks(unix),
            vec![
                ("ebpf-proxy/agent/sys/fs/bpf/a".to_owned(), 4242),
                ("ebpf-proxy/agent/sys/fs/bpf/my pins".to_owned(), 77),
            ]
        );
    }

    #[test]
    fn every_spelling_of_a_directory_takes_one_lock() {
        let name = |path: &str| Pins::new(path).lock_name();
        // An existing parent, its own spelling resolved.
        let tmp = fs::canonicalize(std::env::temp_dir()).unwrap();
        let tmp = tmp.display();
        assert_eq!(
            name(&format!("{tmp}/x")),
            format!("ebpf-proxy/agent{tmp}/x")
        );
        assert_eq!(
            name(&format!("{tmp}/../{tmp}/x/")),
            name(&format!("{tmp}/x"))
        );
        let long = format!("/sys/fs/bpf/{}", "y".repeat(200));
        assert!(name(&long).len() <= ABSTRACT_NAME_MAX);
        assert_ne!(name(&long), name(&format!("{long}z")));
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let pins = Pins::new(format!("/nonexistent/pins-test-{}", std::process::id()));
        let _lock = pins.lock().unwrap();
        assert_eq!(pins.holder(), Some(std::process::id()));
        match pins.lock() {
            Err(PinsError::Locked { holder, .. }) => {
                assert_eq!(holder, format!("pid {}", std::process::id()));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Pins::new("/nonexistent/other")
                .other_agents()
                .iter()
                .any(|a| a.pid == Some(std::process::id()))
        );
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
