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

use aya::maps::MapError;
use proxy_common::{Backend, ServiceKey, ServiceValue};
use tracing::warn;

use crate::{
    maps::{BatchError, FrontendSlots, Table, encoding::MapAddress, read_frontends},
    model::{DesiredFrontend, DesiredState, L4Addr},
};

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

/// A backend in the backends map, and how many slots name its id: a
/// backend is deleted when its last slot goes, without scanning every
/// frontend.
#[derive(Clone, Copy)]
struct HeldBackend<A: MapAddress> {
    backend: Backend<A>,
    slots: usize,
}

impl<A: MapAddress> HeldBackend<A> {
    const fn unused(backend: Backend<A>) -> Self {
        Self { backend, slots: 0 }
    }
}

/// Frontends per batch of [`MapWriter::fill_new`].
const FILL_CHUNK: usize = 4096;

/// The writer of one family's maps: of the desired state, it writes the
/// frontends of its family ([`L4Addr::service_key`] is `None` for the
/// others), whose backends the model keeps of the same family.
pub struct MapWriter<A: MapAddress, S, B> {
    services: S,
    backends: B,
    frontends: BTreeMap<ServiceKey<A>, FrontendSlots<A>>,
    backend_by_id: BTreeMap<u32, HeldBackend<A>>,
    id_of: BTreeMap<Backend<A>, u32>,
    next_backend_id: u32,
    /// Slots deleted, or given another backend, since the last
    /// [`MapWriter::take_slots_gone`]: their counts are over.
    slots_gone: Vec<ServiceKey<A>>,
}

impl<A, S, B> MapWriter<A, S, B>
where
    A: MapAddress,
    S: Table<ServiceKey<A>, ServiceValue<A>>,
    B: Table<u32, Backend<A>>,
{
    /// Takes over the maps with whatever they already hold.
    pub fn adopt(services: S, backends: B) -> Result<Self, MapError> {
        let frontends = read_frontends(&services)?;
        let entries = backends.entries()?;
        let id_of = entries.iter().map(|(id, b)| (*b, *id)).collect();
        let mut backend_by_id: BTreeMap<u32, HeldBackend<A>> = entries
            .into_iter()
            .map(|(id, backend)| (id, HeldBackend::unused(backend)))
            .collect();
        let next_backend_id = backend_by_id.last_key_value().map_or(1, |(id, _)| id + 1);
        // A slot naming an id the backends map lacks (a torn map) counts
        // for nothing: there is no backend to keep.
        for slot in frontends.values().flat_map(|f| f.slots.values()) {
            if let Some(held) = backend_by_id.get_mut(&slot.backend_id) {
                held.slots += 1;
            }
        }
        Ok(Self {
            services,
            backends,
            frontends,
            backend_by_id,
            id_of,
            next_backend_id,
            slots_gone: Vec::new(),
        })
    }

    /// The slots deleted, or given another backend, since the last call.
    pub fn take_slots_gone(&mut self) -> Vec<ServiceKey<A>> {
        std::mem::take(&mut self.slots_gone)
    }

    /// Whether the maps hold the frontend of `slot` (any of its slots).
    #[must_use]
    pub fn holds_frontend(&self, slot: ServiceKey<A>) -> bool {
        self.frontends.contains_key(&slot.slot(0))
    }

    /// How many frontends and backends the maps hold.
    #[must_use]
    pub fn sizes(&self) -> (usize, usize) {
        (self.frontends.len(), self.backend_by_id.len())
    }

    /// The backends a frontend's slots name now.
    #[must_use]
    pub fn backends_of(&self, frontend: L4Addr) -> Vec<Backend<A>> {
        frontend
            .service_key()
            .and_then(|key| self.frontends.get(&key))
            .into_iter()
            .flat_map(|f| f.slots.values())
            .filter_map(|slot| self.backend_by_id.get(&slot.backend_id))
            .map(|held| held.backend)
            .collect()
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
            let wanted: BTreeSet<ServiceKey<A>> = desired
                .frontends
                .keys()
                .filter_map(|f| f.service_key())
                .collect();
            let stray = self
                .frontends
                .keys()
                .filter(|key| !wanted.contains(key))
                .copied()
                .collect();
            let unused = self
                .backend_by_id
                .iter()
                .filter(|(_, held)| held.slots == 0)
                .map(|(id, _)| *id)
                .collect();
            (stray, unused)
        } else {
            Default::default()
        };
        let all: Vec<L4Addr> = desired
            .frontends
            .keys()
            .filter(|f| f.service_key::<A>().is_some())
            .copied()
            .collect();
        let filled = all
            .chunks(FILL_CHUNK)
            .map(|chunk| self.fill_new(desired, chunk))
            .sum::<usize>();
        let mut stats = self.apply(desired, &all, &stray, unused);
        stats.writes += filled;
        stats
    }

    /// Writes those of `frontends` that the maps lack altogether in two
    /// batch calls: their new backends, then every slot and count, each
    /// frontend's slots before its count. The kernel writes a batch in
    /// order, so a program reading concurrently sees what `write_service`
    /// would have shown it. Called with [`FILL_CHUNK`] frontends at a time,
    /// so a first sync of 30k Services costs a few system calls, not 150k,
    /// and no batch grows past a few hundred KiB. Whatever a batch could not write is left to the entry-by-entry path
    /// that follows, which names the Service that failed. Returns how many
    /// entries were written.
    fn fill_new(&mut self, desired: &DesiredState, frontends: &[L4Addr]) -> usize {
        let mut new_backends: Vec<(u32, Backend<A>)> = Vec::new();
        let mut planned: BTreeMap<Backend<A>, u32> = BTreeMap::new();
        let mut entries: Vec<(ServiceKey<A>, ServiceValue<A>)> = Vec::new();
        let mut next = self.next_backend_id;
        for frontend in frontends {
            let Some(key) = frontend.service_key() else {
                continue;
            };
            let Some(entry) = desired.frontends.get(frontend) else {
                continue;
            };
            if self.frontends.contains_key(&key) {
                continue;
            }
            let backends: Vec<Backend<A>> = backends_of_family(entry).collect();
            let Ok(count) = u16::try_from(backends.len()) else {
                continue;
            };
            for (slot, backend) in (1..=count).zip(backends) {
                let id = if let Some(id) = self.id_of.get(&backend).or(planned.get(&backend)) {
                    *id
                } else {
                    // As in `backend_id`: ids grow, holes are not filled.
                    while next == 0 || self.backend_by_id.contains_key(&next) {
                        next = next.wrapping_add(1);
                    }
                    let id = next;
                    next = next.wrapping_add(1);
                    planned.insert(backend, id);
                    new_backends.push((id, backend));
                    id
                };
                entries.push((key.slot(slot), ServiceValue::backend(id, &backend)));
            }
            entries.push((
                key,
                ServiceValue::frontend(count, entry.flags, entry.affinity),
            ));
        }
        if entries.is_empty() {
            return 0;
        }
        let (written, complete) = match self.backends.put_all(&new_backends) {
            Ok(()) => (new_backends.len(), true),
            Err(BatchError { written, .. }) => (written, false),
        };
        for (id, backend) in &new_backends[..written] {
            self.backend_by_id
                .insert(*id, HeldBackend::unused(*backend));
            self.id_of.insert(*backend, *id);
            self.next_backend_id = id.wrapping_add(1);
        }
        if !complete {
            return written;
        }
        let slots_written = match self.services.put_all(&entries) {
            Ok(()) => entries.len(),
            Err(BatchError { written, .. }) => written,
        };
        for (key, value) in &entries[..slots_written] {
            let current = self.frontends.entry(key.slot(0)).or_default();
            if key.backend_slot == 0 {
                current.count = Some(value.count);
                current.flags = value.flags;
                current.affinity = value.backend_id;
            } else {
                current.slots.insert(key.backend_slot, *value);
                if let Some(held) = self.backend_by_id.get_mut(&value.backend_id) {
                    held.slots += 1;
                }
            }
        }
        written + slots_written
    }

    /// A failed write (a full map, say) is logged with the Service it was
    /// for and leaves that frontend as it was; the others are still
    /// written, and the frontend is reported in [`ApplyStats::failed`] to
    /// be tried again.
    fn apply<'a>(
        &mut self,
        desired: &DesiredState,
        frontends: impl IntoIterator<Item = &'a L4Addr>,
        stray: &BTreeSet<ServiceKey<A>>,
        mut released: BTreeSet<u32>,
    ) -> ApplyStats {
        let mut stats = ApplyStats::default();
        for frontend in frontends {
            let Some(key) = frontend.service_key() else {
                continue;
            };
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
            if self
                .backend_by_id
                .get(&id)
                .is_some_and(|held| held.slots > 0)
            {
                continue;
            }
            match self.backends.delete(&id) {
                Ok(()) => {
                    if let Some(held) = self.backend_by_id.remove(&id) {
                        self.id_of.remove(&held.backend);
                    }
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
        key: ServiceKey<A>,
        entry: &DesiredFrontend,
        released: &mut BTreeSet<u32>,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        let mut ids = Vec::with_capacity(entry.backends.len());
        for backend in backends_of_family(entry) {
            match self.backend_id(backend, stats) {
                Ok(id) => ids.push(id),
                Err(error) => {
                    // A backend written for this frontend but never used
                    // by a slot must not stay behind.
                    released.extend(ids.iter().copied());
                    return Err(error);
                }
            }
        }
        if let Err(error) = self.write_frontend(key, &ids, entry, released, stats) {
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
    fn backend_id(&mut self, backend: Backend<A>, stats: &mut ApplyStats) -> Result<u32, MapError> {
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
        self.backend_by_id.insert(id, HeldBackend::unused(backend));
        self.id_of.insert(backend, id);
        Ok(id)
    }

    fn write_frontend(
        &mut self,
        key: ServiceKey<A>,
        ids: &[u32],
        entry: &DesiredFrontend,
        released: &mut BTreeSet<u32>,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        let current = self.frontends.entry(key).or_default();
        let count = u16::try_from(ids.len()).expect("the model caps backends per frontend");
        for (slot, id) in (1..=count).zip(ids) {
            let backend = self
                .backend_by_id
                .get(id)
                .map(|held| held.backend)
                .unwrap_or_default();
            let value = ServiceValue::backend(*id, &backend);
            if current.slots.get(&slot) != Some(&value) {
                self.services.put(&key.slot(slot), &value)?;
                if let Some(old) = current.slots.insert(slot, value) {
                    release(&mut self.backend_by_id, old.backend_id, released);
                    self.slots_gone.push(key.slot(slot));
                }
                if let Some(held) = self.backend_by_id.get_mut(id) {
                    held.slots += 1;
                }
                stats.writes += 1;
            }
        }
        if current.count != Some(count)
            || current.flags != entry.flags
            || current.affinity != entry.affinity
        {
            self.services.put(
                &key,
                &ServiceValue::frontend(count, entry.flags, entry.affinity),
            )?;
            current.count = Some(count);
            current.flags = entry.flags;
            current.affinity = entry.affinity;
            stats.writes += 1;
        }
        self.delete_slots_after(key, count, released, stats)
    }

    /// Deletes the frontend's slots numbered above `count`.
    fn delete_slots_after(
        &mut self,
        key: ServiceKey<A>,
        count: u16,
        released: &mut BTreeSet<u32>,
        stats: &mut ApplyStats,
    ) -> Result<(), MapError> {
        let Some(current) = self.frontends.get_mut(&key) else {
            return Ok(());
        };
        let surplus: Vec<u16> = current
            .slots
            .keys()
            .filter(|s| **s > count)
            .copied()
            .collect();
        for slot in surplus {
            self.services.delete(&key.slot(slot))?;
            if let Some(old) = current.slots.remove(&slot) {
                release(&mut self.backend_by_id, old.backend_id, released);
            }
            self.slots_gone.push(key.slot(slot));
            stats.deletes += 1;
        }
        if current.count.is_none() && current.slots.is_empty() {
            self.frontends.remove(&key);
        }
        Ok(())
    }

    fn delete_frontend(
        &mut self,
        key: ServiceKey<A>,
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

/// A frontend's backends as its family's map holds them. The model gives
/// a frontend backends of its own family only; one of the other would have
/// no place in the map and is passed over.
fn backends_of_family<A: MapAddress>(entry: &DesiredFrontend) -> impl Iterator<Item = Backend<A>> {
    entry
        .backends
        .iter()
        .filter_map(|backend| backend.backend())
}

/// One slot fewer names `id`; at none it is a candidate for deletion.
fn release<A: MapAddress>(
    held: &mut BTreeMap<u32, HeldBackend<A>>,
    id: u32,
    released: &mut BTreeSet<u32>,
) {
    if let Some(held) = held.get_mut(&id) {
        held.slots = held.slots.saturating_sub(1);
    }
    released.insert(id);
}

fn describe(error: &MapError) -> String {
    crate::report::chain(error)
}

#[cfg(test)]
pub(crate) mod tests;
