//! Services and EndpointSlices from a directory of multi-document YAML
//! files, followed with inotify.
//!
//! The directory itself is watched (not the files), so editors that
//! replace a file and the symlink swaps of a mounted ConfigMap (`..data`)
//! are seen too. Events are debounced, then the directory is stat'ed and
//! only files whose stamp changed are read again. Each file's objects are
//! diffed against what the file held before, and only the difference is
//! sent to the agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use notify::Watcher as _;
use tracing::{debug, info, warn};

use self::read::{FileObjects, read_manifest_file};
use super::{
    Change, EventSink, ObjectName, ServiceObject, SliceObject, Source, SourceError, SourceEvent,
    Sourced,
};

mod read;

/// Editors and `kubectl cp` write in several steps; changes are read once
/// the directory has been quiet this long.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A file that suddenly holds nothing is often being rewritten
/// (`truncate`, then write): its objects are kept this long before the
/// emptiness is believed. A deleted file is believed at once.
const EMPTY_GRACE: Duration = Duration::from_secs(2);
/// inotify can overflow and miss events; a slow rescan catches up.
const RESCAN: Duration = Duration::from_secs(10);

/// What tells a file changed, without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// An object of the model's, keyed as the model keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
}

/// The slim objects of one file, by kind and name.
type Objects = BTreeMap<(Kind, ObjectName), Change>;

/// One file as the source last understood it.
#[derive(Debug, Default)]
struct FileState {
    stamp: Option<Stamp>,
    /// What the file contributes, as of its last good parse.
    objects: Objects,
    /// It did not parse last time (its last good objects are kept).
    broken: bool,
    /// It read as empty after holding objects, since this instant.
    empty_since: Option<Instant>,
}

pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The file each object was taken from: an object defined in two files
    /// is taken from the first (by path) and the other is warned about.
    sent: BTreeMap<(Kind, ObjectName), PathBuf>,
    complete: Option<bool>,
}

impl ManifestDir {
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            sent: BTreeMap::new(),
            complete: None,
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
            if meta.is_dir() {
                continue;
            }
            stamps.insert(
                path,
                Stamp {
                    modified: meta.modified().ok(),
                    len: meta.len(),
                    inode: std::os::unix::fs::MetadataExt::ino(&meta),
                },
            );
        }
        Ok(stamps)
    }

    /// Reads the files whose stamps changed (and held-back empty files
    /// whose grace is over) and returns the changes for the agent.
    fn refresh(&mut self, now: Instant) -> Result<Vec<Change>, SourceError> {
        let stamps = self.scan()?;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !stamps.contains_key(*path))
            .cloned()
            .collect();
        for path in gone {
            debug!(file = %path.display(), "manifest removed");
            self.files.remove(&path);
        }
        let mut read = BTreeSet::new();
        for (path, stamp) in stamps {
            let state = self.files.entry(path.clone()).or_default();
            let due = state
                .empty_since
                .is_some_and(|since| now.duration_since(since) >= EMPTY_GRACE);
            if state.stamp.as_ref() == Some(&stamp) && !due {
                continue;
            }
            state.stamp = Some(stamp);
            match read_file(&path) {
                Ok(objects) => {
                    state.broken = false;
                    if objects.is_empty() && !state.objects.is_empty() {
                        let since = *state.empty_since.get_or_insert(now);
                        if now.duration_since(since) < EMPTY_GRACE {
                            warn!(
                                file = %path.display(),
                                "the file now holds no objects; keeping its {} objects for {EMPTY_GRACE:?} in case it is being rewritten",
                                state.objects.len()
                            );
                            continue;
                        }
                        info!(file = %path.display(), "the file stayed empty; removing its objects");
                    }
                    state.empty_since = None;
                    state.objects = objects;
                    read.insert(path);
                }
                Err(message) => {
                    let kept = if state.objects.is_empty() {
                        "skipping it"
                    } else {
                        "keeping its last good contents"
                    };
                    warn!("{}: {message}; {kept}", path.display());
                    state.broken = true;
                }
            }
        }
        Ok(self.changes(&read))
    }

    /// The difference between what the files hold now and what was sent:
    /// objects of files that were read again, objects that moved to another
    /// file, and objects that are gone.
    fn changes(&mut self, read: &BTreeSet<PathBuf>) -> Vec<Change> {
        let mut now: BTreeMap<(Kind, ObjectName), (&PathBuf, &Change)> = BTreeMap::new();
        for (path, state) in &self.files {
            for (key, change) in &state.objects {
                if let Some((first, _)) = now.get(key) {
                    // Said when either file is read, not on every edit.
                    if read.contains(path) || read.contains(*first) {
                        warn!(
                            file = %path.display(),
                            "{:?} {} is also defined in {}; that one is used",
                            key.0,
                            key.1,
                            first.display()
                        );
                    }
                    continue;
                }
                now.insert(key.clone(), (path, change));
            }
        }
        let mut changes = Vec::new();
        for key in self.sent.keys() {
            if !now.contains_key(key) {
                changes.push(match key.0 {
                    Kind::Service => Change::Service(key.1.clone(), None),
                    Kind::EndpointSlice => Change::EndpointSlice(key.1.clone(), None),
                });
            }
        }
        // An object of a file that was read again is sent even if it did
        // not change: the model drops equal updates at once, and the source
        // keeps no second copy to compare with.
        let mut sent = BTreeMap::new();
        for (key, (path, change)) in now {
            if read.contains(path) || self.sent.get(&key) != Some(path) {
                changes.push(change.clone());
            }
            sent.insert(key, path.clone());
        }
        self.sent = sent;
        changes
    }

    fn is_complete(&self) -> bool {
        self.files.values().all(|f| !f.broken)
    }

    /// Sends changes and, when completeness changed, a new `Synced`.
    fn report(&mut self, sink: &EventSink, changes: Vec<Change>) -> bool {
        if !changes.is_empty() && !sink.send(SourceEvent::Changes(changes)) {
            return false;
        }
        let complete = self.is_complete();
        if self.complete != Some(complete) {
            self.complete = Some(complete);
            return sink.send(SourceEvent::Synced { complete });
        }
        true
    }

    fn follow(mut self, sink: &EventSink, events: &mpsc::Receiver<()>) {
        let mut last_error = None;
        loop {
            let now = Instant::now();
            let changes = match self.refresh(now) {
                Ok(changes) => {
                    if last_error.take().is_some() {
                        sink.send(SourceEvent::Status(None));
                    }
                    changes
                }
                Err(error) => {
                    let message = crate::report::chain(&error);
                    if last_error.as_ref() != Some(&message) {
                        warn!("{message}");
                        sink.send(SourceEvent::Status(Some(message.clone())));
                        last_error = Some(message);
                    }
                    Vec::new()
                }
            };
            debug!(changes = changes.len(), "manifests read");
            if !self.report(sink, changes) {
                return; // the agent is gone
            }
            let wait = self
                .files
                .values()
                .filter_map(|f| f.empty_since)
                .map(|since| (since + EMPTY_GRACE).saturating_duration_since(now))
                .min()
                .unwrap_or(RESCAN);
            match events.recv_timeout(wait) {
                Ok(()) => {
                    // Debounce: read once the writer has finished.
                    let deadline = Instant::now() + DEBOUNCE * 5;
                    while Instant::now() < deadline {
                        if events.recv_timeout(DEBOUNCE).is_err() {
                            break;
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

impl Source for ManifestDir {
    fn start(self: Box<Self>, sink: EventSink) -> Result<(), SourceError> {
        let (tx, events) = mpsc::channel();
        let watch_error = |source| SourceError::Watch {
            path: self.dir.display().to_string(),
            source,
        };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reads, our own included (every scan opens the directory), are
                // not changes; answering them would rescan in a loop.
                if !event.is_ok_and(|e| matches!(e.kind, notify::EventKind::Access(_))) {
                    let _ = tx.send(());
                }
            })
            .map_err(watch_error)?;
        watcher
            .watch(&self.dir, notify::RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        std::thread::Builder::new()
            .name("manifests".into())
            .spawn(move || {
                // The watcher lives as long as the thread that reads it.
                let _watcher = watcher;
                self.follow(&sink, &events);
            })
            .map_err(|source| SourceError::ReadDir {
                path: String::new(),
                source,
            })?;
        Ok(())
    }
}

/// Reads one file into the model's objects, by kind and name.
fn read_file(path: &Path) -> Result<Objects, String> {
    let objects = read_manifest_file(path).map_err(|e| e.to_string())?;
    for (kind, count) in &objects.ignored {
        warn!(
            "{}: ignoring {count} {kind} object(s): only v1 Service and discovery.k8s.io/v1 EndpointSlice are read",
            path.display()
        );
    }
    Ok(objects.into_changes(&path.display().to_string()))
}

impl FileObjects {
    fn into_changes(self, origin: &str) -> Objects {
        let origin: std::sync::Arc<str> = origin.into();
        let mut objects = Objects::new();
        for service in &self.services {
            let object = ServiceObject::from(service);
            let name = object.name.clone();
            objects.insert(
                (Kind::Service, name.clone()),
                Change::Service(name, Some(sourced(&origin, object))),
            );
        }
        for slice in &self.endpoint_slices {
            let object = SliceObject::from(slice);
            let name = object.name.clone();
            objects.insert(
                (Kind::EndpointSlice, name.clone()),
                Change::EndpointSlice(name, Some(sourced(&origin, object))),
            );
        }
        objects
    }
}

fn sourced<T>(origin: &std::sync::Arc<str>, object: T) -> Sourced<T> {
    Sourced {
        origin: origin.clone(),
        object,
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

/// The changes one manifest text makes, as if read from the file
/// `origin`: the model's tests are written in YAML.
#[cfg(test)]
pub fn changes_of(origin: &str, text: &str) -> Result<Vec<Change>, read::ManifestError> {
    Ok(read::parse_manifests(text.as_bytes(), read::Format::Yaml)?
        .into_changes(origin)
        .into_values()
        .collect())
}

#[cfg(test)]
mod tests;
