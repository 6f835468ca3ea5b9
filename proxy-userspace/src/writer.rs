//! The one place that writes the service maps: it diffs the desired state
//! against a mirror of what the maps hold and writes only the difference.
//!
//! The mirror is read back from the pinned maps at start-up, so a restarted
//! agent whose desired state has not changed writes nothing at all.
//!
//! Writes are ordered so that a program reading concurrently never follows
//! a slot to a missing backend and never reads a count beyond the slots that
//! exist: backends first, then a frontend's slots, then its count; on
//! shrinking, the count first, then the surplus slots, then unused backends.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData, MapError},
};
use proxy_common::{Backend, ServiceKey, ServiceValue};
use tracing::warn;

use crate::model::{DesiredFrontend, DesiredState, L4Addr};

/// A key-value map the writer can read and change: a pinned BPF hash map,
/// or an in-memory map in tests.
pub trait Table<K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError>;
    /// Removing a key that is not there is not an error.
    fn delete(&mut self, key: &K) -> Result<(), MapError>;
    fn entries(&self) -> Result<Vec<(K, V)>, MapError>;
}

impl<K: Pod, V: Pod> Table<K, V> for BpfHashMap<MapData, K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.insert(key, value, 0)
    }

    fn delete(&mut self, key: &K) -> Result<(), MapError> {
        let result = self.remove(key);
        if is_missing_key(&result) {
            Ok(())
        } else {
            result
        }
    }

    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        self.iter().collect()
    }
}

/// Whether a delete failed only because the key was not there: aya hands
/// the kernel's ENOENT back as a failed `bpf_map_delete_elem`, not as
/// [`MapError::KeyNotFound`].
fn is_missing_key(result: &Result<(), MapError>) -> bool {
    match result {
        Err(MapError::KeyNotFound) => true,
        Err(MapError::SyscallError(error)) => error.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// What a frontend's entries in the services map hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendSlots {
    /// Slot 0's count; `None` when slot 0 is missing.
    pub count: Option<u16>,
    /// Slots 1.. and their backend ids.
    pub slots: BTreeMap<u16, u32>,
}

/// The services map's entries grouped by frontend (keyed by slot 0), as
/// they are, torn or not.
pub fn read_frontends(
    services: &impl Table<ServiceKey, ServiceValue>,
) -> Result<BTreeMap<ServiceKey, FrontendSlots>, MapError> {
    let mut frontends: BTreeMap<ServiceKey, FrontendSlots> = BTreeMap::new();
    for (key, value) in services.entries()? {
        let slots = frontends.entry(key.slot(0)).or_default();
        if key.backend_slot == 0 {
            slots.count = Some(value.count);
        } else {
            slots.slots.insert(key.backend_slot, value.backend_id);
        }
    }
    Ok(frontends)
}

/// What one [`MapWriter::apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub writes: usize,
    pub deletes: usize,
    /// Frontends that could not be written (or deleted) as desired; they
    /// are left as they were and should be applied again later.
    pub failed: BTreeSet<L4Addr>,
    /// Other failures (stray entries, backends that could not be removed).
    pub other_failures: usize,
}

impl ApplyStats {
    #[must_use]
    pub const fn changes(&self) -> usize {
        self.writes + self.deletes
    }

    #[must_use]
    pub fn failures(&self) -> usize {
        self.failed.len() + self.other_failures
    }
}

pub struct MapWriter<S, B> {
    services: S,
    backends: B,
    frontends: BTreeMap<ServiceKey, FrontendSlots>,
    backend_by_id: BTreeMap<u32, Backend>,
    id_of: BTreeMap<Backend, u32>,
    /// How many slots name each backend id: a backend is deleted when its
    /// last slot goes, without scanning every frontend.
    refs: BTreeMap<u32, usize>,
    next_backend_id: u32,
}

impl<S, B> MapWriter<S, B>
where
    S: Table<ServiceKey, ServiceValue>,
    B: Table<u32, Backend>,
{
    /// Takes over the maps with whatever they already hold.
    pub fn adopt(services: S, backends: B) -> Result<Self, MapError> {
        let frontends = read_frontends(&services)?;
        let backend_by_id: BTreeMap<u32, Backend> = backends.entries()?.into_iter().collect();
        let next_backend_id = backend_by_id.last_key_value().map_or(1, |(id, _)| id + 1);
        let id_of = backend_by_id.iter().map(|(id, b)| (*b, *id)).collect();
        let mut refs: BTreeMap<u32, usize> = backend_by_id.keys().map(|id| (*id, 0)).collect();
        for id in frontends.values().flat_map(|f| f.slots.values()) {
            *refs.entry(*id).or_default() += 1;
        }
        Ok(Self {
            services,
            backends,
            frontends,
            backend_by_id,
            id_of,
            refs,
            next_backend_id,
        })
    }

    /// How many frontends and backends the maps hold.
    #[must_use]
    pub fn sizes(&self) -> (usize, usize) {
        (self.frontends.len(), self.backend_by_id.len())
    }

    /// How many entries the services map holds (slot 0 and the slots).
    #[must_use]
    pub fn service_entries(&self) -> usize {
        self.frontends
            .values()
            .map(|f| f.slots.len() + usize::from(f.count.is_some()))
            .sum()
    }

    /// Makes the maps hold `desired` for the frontends that changed,
    /// writing only what differs: each is written when `desired` has it
    /// and deleted when not.
    pub fn apply_changed(
        &mut self,
        desired: &DesiredState,
        changed: &BTreeSet<L4Addr>,
    ) -> ApplyStats {
        self.apply(desired, changed, &BTreeSet::new(), BTreeSet::new())
    }

    /// Makes the maps hold all of `desired`. With `prune`, entries that no
    /// frontend of `desired` names are deleted too (frontends, and backends
    /// no slot uses); without, they are kept, for input that could not be
    /// read may still claim them.
    pub fn apply_all(&mut self, desired: &DesiredState, prune: bool) -> ApplyStats {
        let (stray, unused) = if prune {
            let wanted: BTreeSet<ServiceKey> =
                desired.frontends.keys().map(|f| f.service_key()).collect();
            let stray = self
                .frontends
                .keys()
                .filter(|key| !wanted.contains(key))
                .copied()
                .collect();
            let unused = self
                .refs
                .iter()
                .filter(|(_, n)| **n == 0)
                .map(|(id, _)| *id)
                .collect();
            (stray, unused)
        } else {
            Default::default()
        };
        let all: BTreeSet<L4Addr> = desired.frontends.keys().copied().collect();
        self.apply(desired, &all, &stray, unused)
    }

    /// A failed write (a full map, say) is logged with the Service it was
    /// for and leaves that frontend as it was; the others are still
    /// written, and the frontend is reported in [`ApplyStats::failed`] to
    /// be tried again.
    fn apply(
        &mut self,
        desired: &DesiredState,
        frontends: &BTreeSet<L4Addr>,
        stray: &BTreeSet<ServiceKey>,
        mut released: BTreeSet<u32>,
    ) -> ApplyStats {
        let mut stats = ApplyStats::default();
        for frontend in frontends {
            let key = frontend.service_key();
            let result = match desired.frontends.get(frontend) {
                Some(entry) => self.write_service(key, entry, &mut released, &mut stats),
                None => self.delete_frontend(key, &mut released, &mut stats),
            };
            if let Err(error) = result {
                let service = desired
                    .frontends
                    .get(frontend)
                    .map_or("(removed)", |e| e.service.as_str());
                warn!(service, %frontend, error = %describe(&error), "cannot write the frontend");
                stats.failed.insert(*frontend);
            }
        }
        for key in stray {
            if let Err(error) = self.delete_frontend(*key, &mut released, &mut stats) {
                warn!(?key, error = %describe(&error), "cannot delete a frontend");
                stats.other_failures += 1;
            }
        }
        for id in released {
            if self.refs.get(&id).is_some_and(|n| *n > 0) {
                continue;
            }
            match self.backends.delete(&id) {
                Ok(()) => {
                    if let Some(backend) = self.backend_by_id.remove(&id) {
                        self.id_of.remove(&backend);
                    }
                    self.refs.remove(&id);
                    stats.deletes += 1;
                }
                Err(error) => {
                    warn!(id, error = %describe(&error), "cannot delete a backend");
                    stats.other_failures += 1;
                }
            }
        }
        stats
    }

    /// Writes one frontend: its backends, then its slots, then its count.
    fn write_service(
        &mut self,
        key: ServiceKey,
        entry: &DesiredFrontend,
        released: &mut BTreeSet<u32>,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        let mut ids = Vec::with_capacity(entry.backends.len());
        for backend in &entry.backends {
            match self.backend_id(backend.backend(), stats) {
                Ok(id) => ids.push(id),
                Err(error) => {
                    // A backend written for this frontend but never used
                    // by a slot must not stay behind.
                    released.extend(ids.iter().copied());
                    return Err(error);
                }
            }
        }
        if let Err(error) = self.write_frontend(key, &ids, released, stats) {
            released.extend(ids.iter().copied());
            // Slots written past the count are out of the programs' reach;
            // free them, or a Service too big for a full map would keep
            // it full for every other Service.
            let count = self.frontends.get(&key).and_then(|f| f.count).unwrap_or(0);
            if let Err(error) = self.delete_slots_after(key, count, released, stats) {
                warn!(?key, error = %describe(&error), "cannot delete surplus slots");
            }
            return Err(error);
        }
        Ok(())
    }

    /// The id of a backend, writing it first if the map lacks it.
    fn backend_id(&mut self, backend: Backend, stats: &mut ApplyStats) -> Result<u32, MapError> {
        if let Some(id) = self.id_of.get(&backend) {
            return Ok(*id);
        }
        // Ids keep growing rather than filling holes: a program that read a
        // slot just before its backend was deleted must not find a new
        // backend (of another Service, perhaps) under the same id.
        let mut id = self.next_backend_id;
        while id == 0 || self.backend_by_id.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_backend_id = id.wrapping_add(1);
        self.backends.put(&id, &backend)?;
        stats.writes += 1;
        self.backend_by_id.insert(id, backend);
        self.id_of.insert(backend, id);
        self.refs.insert(id, 0);
        Ok(id)
    }

    fn write_frontend(
        &mut self,
        key: ServiceKey,
        ids: &[u32],
        released: &mut BTreeSet<u32>,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        let current = self.frontends.entry(key).or_default();
        let count = u16::try_from(ids.len()).expect("the model caps backends per frontend");
        for (slot, id) in (1..=count).zip(ids) {
            if current.slots.get(&slot) != Some(id) {
                self.services
                    .put(&key.slot(slot), &ServiceValue::backend(*id))?;
                if let Some(old) = current.slots.insert(slot, *id) {
                    release(&mut self.refs, old, released);
                }
                *self.refs.entry(*id).or_default() += 1;
                stats.writes += 1;
            }
        }
        if current.count != Some(count) {
            self.services.put(&key, &ServiceValue::frontend(count))?;
            current.count = Some(count);
            stats.writes += 1;
        }
        self.delete_slots_after(key, count, released, stats)
    }

    /// Deletes the frontend's slots numbered above `count`.
    fn delete_slots_after(
        &mut self,
        key: ServiceKey,
        count: u16,
        released: &mut BTreeSet<u32>,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        let Some(current) = self.frontends.get_mut(&key) else {
            return Ok(());
        };
        let surplus: Vec<u16> = current.slots.range(count + 1..).map(|(s, _)| *s).collect();
        for slot in surplus {
            self.services.delete(&key.slot(slot))?;
            if let Some(id) = current.slots.remove(&slot) {
                release(&mut self.refs, id, released);
            }
            stats.deletes += 1;
        }
        if current.count.is_none() && current.slots.is_empty() {
            self.frontends.remove(&key);
        }
        Ok(())
    }

    fn delete_frontend(
        &mut self,
        key: ServiceKey,
        released: &mut BTreeSet<u32>,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        // Slot 0 first: from then on no program looks at the slots.
        if let Some(current) = self.frontends.get_mut(&key)
            && current.count.is_some()
        {
            self.services.delete(&key)?;
            current.count = None;
            stats.deletes += 1;
        }
        self.delete_slots_after(key, 0, released, stats)
    }
}

/// One slot fewer names `id`; at none it is a candidate for deletion.
fn release(refs: &mut BTreeMap<u32, usize>, id: u32, released: &mut BTreeSet<u32>) {
    if let Some(n) = refs.get_mut(&id) {
        *n = n.saturating_sub(1);
    }
    released.insert(id);
}

fn describe(error: &MapError) -> String {
    crate::report::chain(error)
}

#[cfg(test)]
mod tests;
