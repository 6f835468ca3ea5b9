//! `proxy-userspace services` and `stats`: the datapath as the pinned maps
//! hold it, in the spirit of `cilium-dbg service list`. They read only the
//! pins, so they work whether or not the agent is running.

use std::{collections::BTreeMap, fmt::Write as _};

use aya::maps::{MapData, MapError, PerCpuArray};
use proxy_common::Event;
use serde::Serialize;

use proxy_common::{COUNTED_BY_SOCKETS, COUNTED_BY_TC};

use crate::{
    maps::{
        Counts, MapsError, Pins, ServiceMaps, Table as _, encoding::MapAddress, open_pinned,
        open_pinned_counts, open_pinned_external, open_pinned_source_ranges, read_frontends,
        slot_count,
    },
    model::{FrontendKind, L4Addr},
};

/// Why the pinned maps could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Open(#[from] MapsError),
    #[error("cannot read the pinned maps")]
    Read(#[from] MapError),
}

/// The frontends of both families at `pins`, IPv4 then IPv6: the socket
/// programs', and with `external` the tc programs' too; with `stats`, the
/// translation counts.
pub fn list_pinned(
    pins: &Pins,
    stats: bool,
    external: bool,
) -> Result<Vec<ListedService>, ListError> {
    let mut listed = list_family::<proxy_common::Ip4>(pins, stats, external)?;
    listed.extend(list_family::<proxy_common::Ip6>(pins, stats, external)?);
    Ok(listed)
}

fn list_family<A: MapAddress>(
    pins: &Pins,
    stats: bool,
    external: bool,
) -> Result<Vec<ListedService>, ListError> {
    let maps = open_pinned::<A>(pins)?;
    let counts = if stats {
        Some(open_pinned_counts::<A>(pins)?)
    } else {
        None
    };
    let mut listed = list(&maps, counts.as_ref())?;
    // Pins of an agent from before the tc programs have no such maps.
    if external && let Ok(maps) = open_pinned_external::<A>(pins) {
        let ranges = source_ranges::<A>(pins)?;
        listed.extend(list_external(&maps, counts.as_ref(), &ranges)?);
    }
    Ok(listed)
}

/// Each load-balancer frontend's loadBalancerSourceRanges, as the trie
/// holds them; none from pins of an agent from before the trie.
fn source_ranges<A: MapAddress>(pins: &Pins) -> Result<BTreeMap<L4Addr, Vec<String>>, ListError> {
    let mut ranges: BTreeMap<L4Addr, Vec<String>> = BTreeMap::new();
    let Ok(trie) = open_pinned_source_ranges::<A>(pins) else {
        return Ok(ranges);
    };
    for (key, _) in trie.entries()? {
        if let Some((frontend, range)) = L4Addr::from_source_range_key(&key) {
            ranges.entry(frontend).or_default().push(range.to_string());
        }
    }
    Ok(ranges)
}

/// One frontend as the maps hold it.
#[derive(Debug, Serialize)]
pub struct ListedService {
    pub frontend: String,
    pub protocol: String,
    /// `ClusterIP` or `NodePort/sockets` (and `ExternalIP/...`,
    /// `LoadBalancer/...`: the socket programs'), or `NodePort/Cluster`,
    /// `NodePort/Local` and so on (the tc programs', with the traffic
    /// policy).
    pub kind: String,
    /// sessionAffinity ClientIP's timeout, in seconds; absent without.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_seconds: Option<u32>,
    /// A load-balancer frontend's loadBalancerSourceRanges (the tc
    /// programs'): new flows from outside them are dropped; empty, from
    /// everyone. Absent for a frontend that restricts no one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<Vec<String>>,
    /// With `--stats`: translations through this frontend (new connections;
    /// datagrams of unconnected UDP), its backends' sum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub translations: Option<u64>,
    /// Backend addresses in slot order; a slot whose id or backend is missing
    /// shows as such, since that is exactly what a reader needs to see.
    pub backends: Vec<ListedBackend>,
}

#[derive(Debug, Serialize)]
pub struct ListedBackend {
    pub slot: u16,
    pub id: u32,
    pub address: String,
    /// With `--stats`: translations to this slot since it got its backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub translations: Option<u64>,
}

/// The socket programs' frontends: ClusterIPs, and the outside frontends
/// as the node's own sockets reach them.
/// With `counts`, each slot's translations: a ClusterIP's as the socket
/// programs counted them and as the tc programs did (traffic from outside).
fn list<A: MapAddress>(
    maps: &ServiceMaps<A>,
    counts: Option<&Counts<A>>,
) -> Result<Vec<ListedService>, MapError> {
    list_with(
        maps,
        counts,
        &BTreeMap::new(),
        |flags| match FrontendKind::from_flags(flags) {
            None => (
                "ClusterIP".to_owned(),
                &[COUNTED_BY_SOCKETS, COUNTED_BY_TC][..],
            ),
            Some(kind) => (format!("{kind}/sockets"), &[COUNTED_BY_SOCKETS][..]),
        },
    )
}

/// The tc programs' frontends, each with its kind and traffic policy.
fn list_external<A: MapAddress>(
    maps: &ServiceMaps<A>,
    counts: Option<&Counts<A>>,
    source_ranges: &BTreeMap<L4Addr, Vec<String>>,
) -> Result<Vec<ListedService>, MapError> {
    list_with(maps, counts, source_ranges, |flags| {
        let kind =
            FrontendKind::from_flags(flags).map_or_else(|| "?".to_owned(), |k| k.to_string());
        let policy = if flags & proxy_common::FRONTEND_MASQUERADE == 0 {
            "Local"
        } else {
            "Cluster"
        };
        (format!("{kind}/{policy}"), &[COUNTED_BY_TC][..])
    })
}

/// The frontends of `maps`; `kind` names a frontend by its slot-0 flags,
/// and says under which scopes its slots are counted. `source_ranges` are
/// shown for the frontends whose flags say they have some.
fn list_with<A: MapAddress>(
    maps: &ServiceMaps<A>,
    counts: Option<&Counts<A>>,
    source_ranges: &BTreeMap<L4Addr, Vec<String>>,
    kind: impl Fn(u16) -> (String, &'static [u8]),
) -> Result<Vec<ListedService>, MapError> {
    let backends: BTreeMap<u32, proxy_common::Backend<A>> =
        maps.backends.entries()?.into_iter().collect();
    let mut listed = Vec::new();
    // Slots without a slot 0 are out of the programs' reach: not listed.
    for (key, frontend_slots) in read_frontends(&maps.services)? {
        let Some(count) = frontend_slots.count else {
            continue;
        };
        let addr = L4Addr::from_service_key(&key);
        let (frontend, protocol) = match addr {
            Some(addr) => (addr.host_port(), addr.protocol.to_string()),
            None => (format!("{key:?}"), format!("proto {}", key.proto)),
        };
        let ranges =
            (frontend_slots.flags & proxy_common::FRONTEND_SOURCE_RANGES != 0).then(|| {
                addr.and_then(|addr| source_ranges.get(&addr).cloned())
                    .unwrap_or_default()
            });
        let (kind, counted_by) = kind(frontend_slots.flags);
        let backends: Vec<ListedBackend> = (1..=count)
            .map(|slot| {
                let value = frontend_slots.slots.get(&slot).copied();
                let id = value.map_or(0, |v| v.backend_id);
                // The programs use the slot's own copy of the address; a
                // slot that disagrees with its backend shows both.
                let address = match (value, backends.get(&id)) {
                    (None, _) | (_, None) => "<missing>".to_owned(),
                    (Some(v), Some(b)) => {
                        let shown = L4Addr::from_backend(*b)
                            .map_or_else(|| format!("{b:?}"), |b| b.host_port());
                        if v.addr_be == b.addr_be && v.port_be == b.port_be {
                            shown
                        } else {
                            format!("{shown} (slot holds {:?})", (v.addr_be, v.port_be))
                        }
                    }
                };
                ListedBackend {
                    slot,
                    id,
                    address,
                    translations: counts.map(|c| slot_count(c, key.slot(slot), counted_by)),
                }
            })
            .collect();
        let translations = counts.map(|_| backends.iter().filter_map(|b| b.translations).sum());
        listed.push(ListedService {
            frontend,
            protocol,
            kind,
            translations,
            affinity_seconds: (frontend_slots.affinity != 0).then_some(frontend_slots.affinity),
            source_ranges: ranges,
            backends,
        });
    }
    Ok(listed)
}

/// A table, one backend per line, like `cilium-dbg service list`.
#[must_use]
pub fn table(services: &[ListedService]) -> String {
    let mut out = format!(
        "{:<22} {:<6} {:<21} {}\n",
        "FRONTEND", "PROTO", "KIND", "BACKENDS"
    );
    for service in services {
        let mut first = true;
        let mut line = |backend: &str| {
            let (frontend, protocol, kind) = if first {
                (
                    service.frontend.as_str(),
                    service.protocol.as_str(),
                    service.kind.as_str(),
                )
            } else {
                ("", "", "")
            };
            first = false;
            let _ = writeln!(out, "{frontend:<22} {protocol:<6} {kind:<21} {backend}");
        };
        if service.backends.is_empty() {
            line("(no ready endpoints: connections are refused)");
        }
        for backend in &service.backends {
            let counted = backend
                .translations
                .map_or_else(String::new, |n| format!(", {n} translations"));
            line(&format!(
                "{} => {} (id {}){counted}",
                backend.slot, backend.address, backend.id
            ));
        }
        if let Some(seconds) = service.affinity_seconds {
            line(&format!("sessionAffinity ClientIP, {seconds} s"));
        }
        match service.source_ranges.as_deref() {
            None => {}
            Some([]) => line("loadBalancerSourceRanges: none usable, every client dropped"),
            Some(ranges) => line(&format!(
                "loadBalancerSourceRanges: {} (other clients dropped)",
                ranges.join(", ")
            )),
        }
    }
    out
}

/// The event counters summed over CPUs, in [`Event::ALL`] order; as JSON,
/// an object in that same order.
pub struct EventCounts(Vec<(Event, u64)>);

pub fn events(counters: &PerCpuArray<MapData, u64>) -> Result<EventCounts, MapError> {
    Event::ALL
        .iter()
        .map(|event| {
            let per_cpu = counters.get(&(*event as u32), 0)?;
            Ok((*event, per_cpu.iter().sum()))
        })
        .collect::<Result<_, _>>()
        .map(EventCounts)
}

impl EventCounts {
    /// Each event and its count, in [`Event::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Event, u64)> + '_ {
        self.0.iter().copied()
    }

    /// One `name count` line per event.
    #[must_use]
    pub fn table(&self) -> String {
        self.0
            .iter()
            .fold(String::new(), |mut out, (event, count)| {
                let _ = writeln!(out, "{:<10} {count}", event.name());
                out
            })
    }
}

impl Serialize for EventCounts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (event, count) in &self.0 {
            map.serialize_entry(event.name(), count)?;
        }
        map.end()
    }
}
