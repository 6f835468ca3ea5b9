//! Services and EndpointSlices from a directory of multi-document YAML
//! files, re-read when a file changes.
//!
//! The directory is polled rather than watched with inotify: a polled stat
//! of a few files is cheap, and it also sees the symlink swaps of a mounted
//! ConfigMap, which inotify watches on the files miss.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, SystemTime},
};

use tracing::{debug, warn};

use self::read::{FileObjects, read_manifest_file};
use super::{Snapshot, SourceError, Sourced};

mod read;

/// How often the directory is checked: well inside the 1 s in which an edit
/// must reach the datapath.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What tells a file changed, without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

pub struct ManifestDir {
    dir: PathBuf,
    stamps: BTreeMap<PathBuf, Stamp>,
    files: BTreeMap<PathBuf, FileObjects>,
    first: bool,
}

impl ManifestDir {
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            stamps: BTreeMap::new(),
            files: BTreeMap::new(),
            first: true,
        }
    }

    fn scan(&self) -> Result<BTreeMap<PathBuf, Stamp>, SourceError> {
        let read_dir_error = |source| SourceError::ReadDir {
            path: self.dir.display().to_string(),
            source,
        };
        let mut stamps = BTreeMap::new();
        for entry in fs::read_dir(&self.dir).map_err(read_dir_error)? {
            let path = entry.map_err(read_dir_error)?.path();
            if !is_manifest(&path) {
                continue;
            }
            // Follows symlinks, so a ConfigMap's `..data` swap changes the stamp.
            let Ok(meta) = fs::metadata(&path) else {
                continue; // deleted between read_dir and here
            };
            // Anything but a directory is listed, so that a FIFO or device
            // is reported (the reader refuses it without blocking), not
            // silently passed over.
            if !meta.is_dir() {
                stamps.insert(
                    path,
                    Stamp {
                        modified: meta.modified().ok(),
                        len: meta.len(),
                        inode: std::os::unix::fs::MetadataExt::ino(&meta),
                    },
                );
            }
        }
        Ok(stamps)
    }

    fn reload(&mut self, stamps: BTreeMap<PathBuf, Stamp>) {
        self.files.retain(|path, _| stamps.contains_key(path));
        for (path, stamp) in &stamps {
            if self.stamps.get(path) == Some(stamp) {
                continue;
            }
            match read_manifest_file(path) {
                Ok(objects) => {
                    debug!(file = %path.display(), "read manifests");
                    for (kind, count) in &objects.ignored {
                        warn!(
                            "{}: ignoring {count} {kind} object(s): only v1 Service and \
                             discovery.k8s.io/v1 EndpointSlice are read",
                            path.display()
                        );
                    }
                    self.files.insert(path.clone(), objects);
                }
                Err(error) => {
                    let kept = if self.files.contains_key(path) {
                        "keeping its last good contents"
                    } else {
                        "skipping it"
                    };
                    warn!("{}: {error}; {kept}", path.display());
                }
            }
        }
        self.stamps = stamps;
    }

    fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (path, objects) in &self.files {
            objects.add_to(&mut snapshot, &path.display().to_string());
        }
        snapshot
    }
}

impl FileObjects {
    fn add_to(&self, snapshot: &mut Snapshot, origin: &str) {
        snapshot.services.extend(sourced(origin, &self.services));
        snapshot
            .endpoint_slices
            .extend(sourced(origin, &self.endpoint_slices));
    }
}

fn sourced<'a, T: Clone>(
    origin: &'a str,
    objects: &'a [T],
) -> impl Iterator<Item = Sourced<T>> + 'a {
    objects.iter().map(move |object| Sourced {
        origin: origin.to_owned(),
        object: object.clone(),
    })
}

impl ManifestDir {
    pub fn next_snapshot(&mut self) -> Result<Snapshot, SourceError> {
        loop {
            let stamps = self.scan()?;
            if self.first || stamps != self.stamps {
                self.first = false;
                self.reload(stamps);
                return Ok(self.snapshot());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
    yaml && !hidden
}

/// A snapshot of one manifest text, as if read from the file `origin`: the
/// model's tests are written in YAML.
#[cfg(test)]
pub fn snapshot_of(origin: &str, text: &str) -> Result<Snapshot, read::ManifestError> {
    let mut snapshot = Snapshot::default();
    read::parse_manifests(text.as_bytes(), read::Format::Yaml)?.add_to(&mut snapshot, origin);
    Ok(snapshot)
}

#[cfg(test)]
mod tests;
