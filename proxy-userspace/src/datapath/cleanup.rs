//! Removing the datapath: `proxy-userspace cleanup`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use proxy_common::{MAPS, PROGRAMS};
use tracing::warn;

use super::{
    DatapathError, Pins,
    attach::{detach_clsact, tc_links},
    layout::stale_maps,
};
use crate::maps::PinsError;

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(
        "{path} is in use by a running agent ({holder}): stop it first, or pass --force to \
         detach its datapath under it"
    )]
    Locked { path: PathBuf, holder: String },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Detaches the programs (by dropping their pinned links) and removes the
/// pinned maps and the directory. Safe to run twice. Refused while an agent
/// holds the directory's lock (it would go on writing maps no program
/// reads), unless `force`.
pub fn cleanup(pins: &Pins, force: bool) -> Result<(), DatapathError> {
    let _lock = match pins.lock_existing() {
        Ok(lock) => lock,
        Err(PinsError::Locked { path, holder }) if force => stop_holder(pins, &path, &holder)?,
        Err(PinsError::Locked { path, holder }) => {
            return Err(CleanupError::Locked { path, holder }.into());
        }
        Err(e) => return Err(e.into()),
    };
    let remove = |path: PathBuf| match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(CleanupError::Remove { path, source: e })
        }
        _ => Ok(()),
    };
    // Links first: once they are gone no program uses the maps.
    for name in PROGRAMS {
        remove(pins.link(name))?;
    }
    for (path, _) in tc_links(pins) {
        remove(path)?;
    }
    // clsact filters (kernels without TCX, or `--tcx false`) are listed
    // by no pin: every device of this namespace is asked.
    if let Ok(interfaces) = crate::devices::read() {
        for interface in interfaces {
            detach_clsact(&interface.name);
        }
    }
    for name in MAPS {
        remove(pins.map(name))?;
    }
    // Maps of an older layout version, left by the agent this one upgraded.
    for path in stale_maps(pins) {
        remove(path)?;
    }
    for dir in [pins.links_dir(), pins.maps_dir(), pins.root().to_owned()] {
        match fs::remove_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(CleanupError::Remove {
                    path: dir,
                    source: e,
                }
                .into());
            }
            _ => {}
        }
    }
    Ok(())
}

/// `cleanup --force`: stops the agent holding the directory (SIGTERM, as
/// its DaemonSet would) and takes its lock. A running agent keeps its own
/// descriptors of the links and pins again whatever is removed under it, so
/// removing the datapath under it would not detach anything.
fn stop_holder(
    pins: &Pins,
    path: &Path,
    holder: &str,
) -> Result<Option<crate::maps::pins::PinLock>, DatapathError> {
    let locked = || CleanupError::Locked {
        path: path.to_owned(),
        holder: holder.to_owned(),
    };
    let pid = pins
        .holder()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or_else(locked)?;
    warn!(path = %path.display(), holder, "stopping the agent that holds the datapath (--force)");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM)
        .map_err(|_| locked())?;
    let deadline = std::time::Instant::now() + STOP_TIMEOUT;
    loop {
        match pins.lock_existing() {
            Ok(lock) => return Ok(lock),
            Err(PinsError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(PinsError::Locked { path, holder }) => {
                return Err(CleanupError::Locked { path, holder }.into());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long `cleanup --force` waits for the agent it stopped to exit.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
