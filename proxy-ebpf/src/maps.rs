//! The pinned maps. Names must match `proxy_common::*_MAP`, which the agent
//! uses to pin and open them; they carry a layout version.

use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use proxy_common::{
    BACKENDS_MAX_ENTRIES, Backend, Event, SERVICES_MAX_ENTRIES, SOCK_REV_NAT_MAX_ENTRIES,
    ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue,
};

/// Frontend slots: slot 0 is the frontend, slots `1..=count` backend ids.
#[btf_map(name = "lb4_svc_v1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { SERVICES_MAX_ENTRIES as usize }> =
    HashMap::new();

/// Backend id to address.
#[btf_map(name = "lb4_be_v1")]
pub static BACKENDS: HashMap<u32, Backend, { BACKENDS_MAX_ENTRIES as usize }> = HashMap::new();

/// Socket cookie and backend to the frontend the socket asked for.
#[btf_map(name = "lb4_sk_rnat_v1")]
pub static SOCK_REV_NAT: LruHashMap<
    SockRevNatKey,
    SockRevNatValue,
    { SOCK_REV_NAT_MAX_ENTRIES as usize },
> = LruHashMap::new();

/// Per-CPU counters, one per [`Event`]: no atomics, no contention.
#[btf_map(name = "lb4_events_v1")]
pub static EVENTS: PerCpuArray<u64, { Event::ALL.len() }> = PerCpuArray::new();

/// Counts one event on this CPU.
#[inline(always)]
pub fn record(event: Event) {
    if let Some(counter) = EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: a per-CPU slot, and programs do not migrate CPUs mid-run.
        unsafe { *counter += 1 };
    }
}
