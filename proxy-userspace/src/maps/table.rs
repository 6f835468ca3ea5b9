//! The pinned maps as tables: typed handles, the [`Table`] trait the writer
//! writes through (a pinned hash map, or an in-memory map in tests), and the
//! readers shared by the writer's adoption and the listing.
//!
//! Keys and values cross into bytes only through bytemuck (`Pod`), here and
//! in the batch calls, so a type with padding cannot be written at all.

use std::{collections::BTreeMap, io};

use aya::maps::{
    HashMap as BpfHashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray,
    lpm_trie::Key,
};
use proxy_common::{Backend, EVENTS_MAP, Ip4, ServiceKey, ServiceValue, SourceRange};

use super::{encoding::MapAddress, error::MapsError, pins::Pins};
use crate::{bpf_sys, sorted_vec::VecMap};

/// A frontend map of one family (IPv4 unless said).
pub type ServicesMap<A = Ip4> = BpfHashMap<MapData, ServiceKey<A>, ServiceValue<A>>;
/// A backends map of one family.
pub type BackendsMap<A = Ip4> = BpfHashMap<MapData, u32, Backend<A>>;

/// A key-value map the writer can read and change: a pinned BPF hash map,
/// or an in-memory map in tests.
pub trait Table<K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError>;
    /// Writes many entries in this order. The default writes them one by
    /// one; a BPF map does it in one system call where the kernel can (it
    /// too writes them in order). On an error, the entries before the
    /// failing one are written and the rest are not.
    fn put_all(&mut self, entries: &[(K, V)]) -> Result<(), BatchError> {
        for (written, (key, value)) in entries.iter().enumerate() {
            self.put(key, value)
                .map_err(|error| BatchError { written, error })?;
        }
        Ok(())
    }
    /// Removing a key that is not there is not an error.
    fn delete(&mut self, key: &K) -> Result<(), MapError>;
    fn entries(&self) -> Result<Vec<(K, V)>, MapError>;
}

impl<K: aya::Pod + bytemuck::Pod, V: aya::Pod + bytemuck::Pod> Table<K, V>
    for BpfHashMap<MapData, K, V>
{
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.insert(key, value, 0)
    }

    fn put_all(&mut self, entries: &[(K, V)]) -> Result<(), BatchError> {
        let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
        let (written, result) = bpf_sys::map_update_batch(
            self.map().fd(),
            bytemuck::cast_slice(&keys),
            bytemuck::cast_slice(&values),
            entries.len(),
        );
        match result {
            Ok(()) => Ok(()),
            // Kernels before 5.6 have no batch calls.
            Err(error) if written == 0 && bpf_sys::is_unsupported(&error) => {
                for (written, (key, value)) in entries.iter().enumerate() {
                    self.put(key, value)
                        .map_err(|error| BatchError { written, error })?;
                }
                Ok(())
            }
            Err(io_error) => Err(BatchError {
                written,
                error: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error,
                }),
            }),
        }
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

/// One family's loadBalancerSourceRanges trie.
pub type SourceRanges<A = Ip4> = LpmTrie<MapData, SourceRange<A>, u8>;

impl<A: MapAddress> Table<Key<SourceRange<A>>, u8> for SourceRanges<A> {
    fn put(&mut self, key: &Key<SourceRange<A>>, value: &u8) -> Result<(), MapError> {
        self.insert(key, value, 0)
    }

    fn delete(&mut self, key: &Key<SourceRange<A>>) -> Result<(), MapError> {
        let result = self.remove(key);
        if is_missing_key(&result) {
            Ok(())
        } else {
            result
        }
    }

    fn entries(&self) -> Result<Vec<(Key<SourceRange<A>>, u8)>, MapError> {
        self.iter().collect()
    }
}

/// Opens one family's pinned source-range trie
/// ([`proxy_common::SOURCE_RANGES_MAP`]).
pub fn open_pinned_source_ranges<A: MapAddress>(pins: &Pins) -> Result<SourceRanges<A>, MapsError> {
    let name = A::MAPS.source_ranges;
    let map = open_pin(pins, name, Map::LpmTrie)?;
    SourceRanges::try_from(map).map_err(|source| MapsError::Open { name, source })
}

/// A batch write that stopped: the first `written` entries are in the map.
#[derive(Debug)]
pub struct BatchError {
    pub written: usize,
    pub error: MapError,
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
pub struct FrontendSlots<A: MapAddress = Ip4> {
    /// Slot 0's count; `None` when slot 0 is missing.
    pub count: Option<u16>,
    /// Slot 0's flags.
    pub flags: u16,
    /// Slot 0's session affinity timeout, in seconds.
    pub affinity: u32,
    /// Slots 1.. and their values.
    pub slots: VecMap<u16, ServiceValue<A>>,
}

/// The services map's entries grouped by frontend (keyed by slot 0), as
/// they are, torn or not.
pub fn read_frontends<A: MapAddress>(
    services: &impl Table<ServiceKey<A>, ServiceValue<A>>,
) -> Result<BTreeMap<ServiceKey<A>, FrontendSlots<A>>, MapError> {
    let mut frontends: BTreeMap<ServiceKey<A>, FrontendSlots<A>> = BTreeMap::new();
    for (key, value) in services.entries()? {
        let slots = frontends.entry(key.slot(0)).or_default();
        if key.backend_slot == 0 {
            slots.count = Some(value.count);
            slots.flags = value.flags;
            slots.affinity = value.backend_id;
        } else {
            slots.slots.insert(key.backend_slot, value);
        }
    }
    Ok(frontends)
}

/// The service maps of one family, typed.
pub struct ServiceMaps<A: MapAddress = Ip4> {
    pub services: ServicesMap<A>,
    pub backends: BackendsMap<A>,
}

/// A pinned hash map that knows its name and the flag that sizes it, so a
/// write to a full map (E2BIG from the kernel, "Argument list too long")
/// says what to do about it.
pub struct SizedTable<K, V> {
    map: BpfHashMap<MapData, K, V>,
    name: &'static str,
    flag: &'static str,
    max_entries: Option<u32>,
}

impl<K: aya::Pod, V: aya::Pod> SizedTable<K, V> {
    pub fn new(map: BpfHashMap<MapData, K, V>, name: &'static str, flag: &'static str) -> Self {
        let max_entries = map.map().info().ok().map(|info| info.max_entries());
        Self {
            map,
            name,
            flag,
            max_entries,
        }
    }

    fn explain(&self, error: MapError) -> MapError {
        match error {
            MapError::SyscallError(aya::sys::SyscallError { call, io_error })
                if io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                let size = self
                    .max_entries
                    .map_or_else(String::new, |n| format!(" ({n} entries)"));
                MapError::SyscallError(aya::sys::SyscallError {
                    call,
                    io_error: io::Error::new(
                        io::ErrorKind::StorageFull,
                        format!(
                            "the map {} is full{size}; raise {} (then run cleanup and restart)",
                            self.name, self.flag
                        ),
                    ),
                })
            }
            other => other,
        }
    }
}

impl<K: aya::Pod + bytemuck::Pod, V: aya::Pod + bytemuck::Pod> Table<K, V> for SizedTable<K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.map.put(key, value).map_err(|e| self.explain(e))
    }

    fn put_all(&mut self, entries: &[(K, V)]) -> Result<(), BatchError> {
        self.map
            .put_all(entries)
            .map_err(|BatchError { written, error }| BatchError {
                written,
                error: self.explain(error),
            })
    }

    fn delete(&mut self, key: &K) -> Result<(), MapError> {
        self.map.delete(key)
    }

    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        self.map.entries()
    }
}

pub fn typed_map<K: aya::Pod, V: aya::Pod>(
    map: Map,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, MapsError> {
    BpfHashMap::try_from(map).map_err(|source| MapsError::Open { name, source })
}

/// Opens one family's pinned service maps without loading anything: for
/// reading the datapath while the agent runs, or after it is gone.
pub fn open_pinned<A: MapAddress>(pins: &Pins) -> Result<ServiceMaps<A>, MapsError> {
    let names = A::MAPS;
    Ok(ServiceMaps {
        services: typed_map(
            open_pin(pins, names.services, Map::HashMap)?,
            names.services,
        )?,
        backends: typed_map(
            open_pin(pins, names.backends, Map::HashMap)?,
            names.backends,
        )?,
    })
}

/// Opens one family's tc frontend maps, as [`open_pinned`] does the
/// socket programs'.
pub fn open_pinned_external<A: MapAddress>(pins: &Pins) -> Result<ServiceMaps<A>, MapsError> {
    let names = A::MAPS;
    Ok(ServiceMaps {
        services: typed_map(
            open_pin(pins, names.ext_services, Map::HashMap)?,
            names.ext_services,
        )?,
        backends: typed_map(
            open_pin(pins, names.ext_backends, Map::HashMap)?,
            names.ext_backends,
        )?,
    })
}

/// One family's translation counts per backend slot.
pub type Counts<A = Ip4> = aya::maps::HashMap<MapData, ServiceKey<A>, u64>;

/// A tc address filter ([`proxy_common::FRONTEND_FILTER_MAP`]).
pub type Filter = aya::maps::Array<MapData, u64>;

/// One family's tc flow table, read for the filters' rebuild.
pub type Flows<A = Ip4> =
    aya::maps::HashMap<MapData, proxy_common::FlowKey<A>, proxy_common::FlowNat<A>>;

/// Opens one family's pinned per-slot counts ([`proxy_common::COUNTS_MAP`]).
pub fn open_pinned_counts<A: MapAddress>(pins: &Pins) -> Result<Counts<A>, MapsError> {
    let name = A::MAPS.counts;
    let map = open_pin(pins, name, Map::HashMap)?;
    Counts::try_from(map).map_err(|source| MapsError::Open { name, source })
}

/// A slot's count, summed over `counted_by`.
#[must_use]
pub fn slot_count<A: MapAddress>(
    counts: &Counts<A>,
    slot: ServiceKey<A>,
    counted_by: &[u8],
) -> u64 {
    counted_by
        .iter()
        .filter_map(|scope| {
            counts
                .get(
                    &ServiceKey {
                        scope: *scope,
                        ..slot
                    },
                    0,
                )
                .ok()
        })
        .sum()
}

/// Opens the pinned per-CPU event counters, indexed by [`proxy_common::Event`].
pub fn open_pinned_events(pins: &Pins) -> Result<PerCpuArray<MapData, u64>, MapsError> {
    let map = open_pin(pins, EVENTS_MAP, Map::PerCpuArray)?;
    PerCpuArray::try_from(map).map_err(|source| MapsError::Open {
        name: EVENTS_MAP,
        source,
    })
}

fn open_pin(pins: &Pins, name: &'static str, kind: fn(MapData) -> Map) -> Result<Map, MapsError> {
    let path = pins.map(name);
    if !path.exists() {
        return Err(MapsError::Missing { name, path });
    }
    MapData::from_pin(&path)
        .map(kind)
        .map_err(|source| MapsError::Open { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_key_on_delete_is_recognised_as_the_kernel_reports_it() {
        let syscall = |errno| -> Result<(), MapError> {
            Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error: std::io::Error::from_raw_os_error(errno),
            }))
        };
        assert!(is_missing_key(&syscall(libc::ENOENT)));
        assert!(!is_missing_key(&syscall(libc::EPERM)));
        assert!(is_missing_key(&Err(MapError::KeyNotFound)));
        assert!(!is_missing_key(&Ok(())));
    }
}
