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

use crate::model::DesiredState;

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

/// Counts of what one [`MapWriter::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub writes: usize,
    pub deletes: usize,
    pub failures: usize,
}

impl ApplyStats {
    #[must_use]
    pub const fn changes(&self) -> usize {
        self.writes + self.deletes
    }
}

pub struct MapWriter<S, B> {
    services: S,
    backends: B,
    frontends: BTreeMap<ServiceKey, FrontendSlots>,
    backend_by_id: BTreeMap<u32, Backend>,
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
        Ok(Self {
            services,
            backends,
            frontends,
            backend_by_id,
            next_backend_id,
        })
    }

    /// How many frontends and backends the maps hold.
    #[must_use]
    pub fn sizes(&self) -> (usize, usize) {
        (self.frontends.len(), self.backend_by_id.len())
    }

    /// Makes the maps hold `desired`, writing only what differs. A failed
    /// write (a full map, say) is logged with the Service it was for and
    /// leaves that Service as it was; the others are still written, and the
    /// next apply tries again.
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyStats {
        let mut stats = ApplyStats::default();
        let mut id_of: BTreeMap<Backend, u32> =
            self.backend_by_id.iter().map(|(id, b)| (*b, *id)).collect();

        let mut wanted = BTreeSet::new();
        for (frontend, entry) in &desired.frontends {
            let key = frontend.service_key();
            wanted.insert(key);
            let mut ids = Vec::with_capacity(entry.backends.len());
            for backend in entry.backends.iter().map(|b| b.backend()) {
                match self.backend_id(&mut id_of, backend, &mut stats) {
                    Ok(id) => ids.push(id),
                    Err(error) => {
                        warn!(service = %entry.service, error = %describe(&error), "cannot write a backend");
                        stats.failures += 1;
                    }
                }
            }
            if ids.len() != entry.backends.len() {
                continue;
            }
            if let Err(error) = self.write_frontend(key, &ids, &mut stats) {
                warn!(service = %entry.service, %frontend, error = %describe(&error), "cannot write the frontend");
                stats.failures += 1;
                // Slots written past the count are out of the programs' reach;
                // free them, or a Service too big for a full map would keep
                // it full for every other Service.
                let count = self.frontends.get(&key).and_then(|f| f.count).unwrap_or(0);
                if let Err(error) = self.delete_slots_after(key, count, &mut stats) {
                    warn!(%frontend, error = %describe(&error), "cannot delete surplus slots");
                }
            }
        }

        let stale: Vec<ServiceKey> = self
            .frontends
            .keys()
            .filter(|key| !wanted.contains(key))
            .copied()
            .collect();
        for key in stale {
            if let Err(error) = self.delete_frontend(key, &mut stats) {
                warn!(?key, error = %describe(&error), "cannot delete a frontend");
                stats.failures += 1;
            }
        }

        let in_use: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|f| f.slots.values().copied())
            .collect();
        let unused: Vec<u32> = self
            .backend_by_id
            .keys()
            .filter(|id| !in_use.contains(id))
            .copied()
            .collect();
        for id in unused {
            match self.backends.delete(&id) {
                Ok(()) => {
                    self.backend_by_id.remove(&id);
                    stats.deletes += 1;
                }
                Err(error) => {
                    warn!(id, error = %describe(&error), "cannot delete a backend");
                    stats.failures += 1;
                }
            }
        }
        stats
    }

    /// The id of a backend, writing it first if the map lacks it.
    fn backend_id(
        &mut self,
        id_of: &mut BTreeMap<Backend, u32>,
        backend: Backend,
        stats: &mut ApplyStats,
    ) -> Result<u32, MapError> {
        if let Some(id) = id_of.get(&backend) {
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
        id_of.insert(backend, id);
        Ok(id)
    }

    fn write_frontend(
        &mut self,
        key: ServiceKey,
        ids: &[u32],
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        let current = self.frontends.entry(key).or_default();
        let count = u16::try_from(ids.len()).expect("the model caps backends per frontend");
        for (slot, id) in (1..=count).zip(ids) {
            if current.slots.get(&slot) != Some(id) {
                self.services
                    .put(&key.slot(slot), &ServiceValue::backend(*id))?;
                current.slots.insert(slot, *id);
                stats.writes += 1;
            }
        }
        if current.count != Some(count) {
            self.services.put(&key, &ServiceValue::frontend(count))?;
            current.count = Some(count);
            stats.writes += 1;
        }
        self.delete_slots_after(key, count, stats)
    }

    /// Deletes the frontend's slots numbered above `count`.
    fn delete_slots_after(
        &mut self,
        key: ServiceKey,
        count: u16,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        let Some(current) = self.frontends.get_mut(&key) else {
            return Ok(());
        };
        let surplus: Vec<u16> = current.slots.range(count + 1..).map(|(s, _)| *s).collect();
        for slot in surplus {
            self.services.delete(&key.slot(slot))?;
            current.slots.remove(&slot);
            stats.deletes += 1;
        }
        if current.count.is_none() && current.slots.is_empty() {
            self.frontends.remove(&key);
        }
        Ok(())
    }

    fn delete_frontend(&mut self, key: ServiceKey, stats: &mut ApplyStats) -> Result<(), MapError> {
        // Slot 0 first: from then on no program looks at the slots.
        if let Some(current) = self.frontends.get_mut(&key)
            && current.count.is_some()
        {
            self.services.delete(&key)?;
            current.count = None;
            stats.deletes += 1;
        }
        self.delete_slots_after(key, 0, stats)
    }
}

/// A map error with its causes (the errno is in the source), on one line.
fn describe(error: &MapError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests;
