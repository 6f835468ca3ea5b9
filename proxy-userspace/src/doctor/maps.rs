//! What the maps say of themselves: how full they are, and the programs'
//! event counters.

use super::{Check, Context, Status};
use crate::{
    bpf_sys, listing,
    maps::{self, encoding::MapAddress},
    report::chain,
};

/// A map this full warns; a full one fails.
const FILL_WARN_PERCENT: u64 = 90;

/// How a map's fill is judged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Full {
    /// Full, it refuses new entries: a problem, fixed by its flag.
    Refuses(&'static str),
    /// Full, it refuses new entries of a kind that degrades, not breaks
    /// (connected UDP sockets left out of their ending, a count lost).
    Degrades,
    /// An LRU: full is its steady state, the least recently used goes.
    Evicts,
}

/// A pinned hash map's entries, counted by its keys.
fn count<K: aya::Pod, V: aya::Pod>(map: aya::maps::MapData) -> usize {
    aya::maps::HashMap::<_, K, V>::try_from(aya::maps::Map::HashMap(map))
        .map_or(0, |m| m.keys().count())
}

/// Every map of one family that has a size: its name, how its fill is
/// judged, and its entries.
fn fill<A: MapAddress>(cx: &Context) -> Result<Vec<(&'static str, Full, usize)>, maps::MapsError> {
    use proxy_common::{
        AffinityKey, AffinityValue, Backend, FlowKey, FlowNat, RevNatPair, ServiceKey, ServiceValue,
    };
    let names = A::MAPS;
    let sized = |name| Full::Refuses(crate::datapath::size_flag(name));
    let maps = maps::open_pinned::<A>(&cx.pins)?;
    let services = maps::read_frontends(&maps.services).map(|frontends| {
        frontends
            .values()
            .map(|f| f.slots.len() + usize::from(f.count.is_some()))
            .sum::<usize>()
    });
    let mut fills = vec![
        (
            names.services,
            sized(names.services),
            services.unwrap_or_default(),
        ),
        (
            names.backends,
            sized(names.backends),
            maps.backends.keys().count(),
        ),
    ];
    let pinned = |name| aya::maps::MapData::from_pin(cx.pins.map(name)).ok();
    for (name, full, entries) in [
        (
            names.ext_services,
            sized(names.ext_services),
            pinned(names.ext_services).map(count::<ServiceKey<A>, ServiceValue<A>>),
        ),
        (
            names.ext_backends,
            sized(names.ext_backends),
            pinned(names.ext_backends).map(count::<u32, Backend<A>>),
        ),
        (
            names.flows,
            Full::Evicts,
            pinned(names.flows).map(count::<FlowKey<A>, FlowNat<A>>),
        ),
        (
            names.affinity,
            Full::Evicts,
            pinned(names.affinity).map(count::<AffinityKey<A>, AffinityValue<A>>),
        ),
        (
            names.udp_connected,
            Full::Degrades,
            pinned(names.udp_connected).map(count::<u64, RevNatPair<A>>),
        ),
        (
            names.counts,
            Full::Degrades,
            pinned(names.counts).map(count::<ServiceKey<A>, u64>),
        ),
        (
            names.source_ranges,
            sized(names.source_ranges),
            maps::open_pinned_source_ranges::<A>(&cx.pins)
                .ok()
                .map(|trie| trie.keys().count()),
        ),
    ] {
        // Pins of an agent from before these maps have none of them.
        if let Some(entries) = entries {
            fills.push((name, full, entries));
        }
    }
    Ok(fills)
}

pub(super) fn maps(cx: &Context) -> Check {
    const NAME: &str = "maps";
    let fills = match fill::<proxy_common::Ip4>(cx)
        .and_then(|ipv4| Ok([ipv4, fill::<proxy_common::Ip6>(cx)?].concat()))
    {
        Ok(fills) => fills,
        Err(error) => {
            return Check::problem(NAME, Status::Fail, chain(&error), cx.restart.clone());
        }
    };
    let mut worst = Status::Ok;
    // How full a map is changes with traffic (the LRUs, connected UDP
    // sockets) or with the Services: the fills are volatile, and the
    // evidence names only the maps that are a problem.
    let mut fills_read = Vec::new();
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    for (name, full, used) in fills {
        let Ok(size) = bpf_sys::obj_get(&cx.pins.map(name))
            .and_then(bpf_sys::map_info)
            .map(|info| info.max_entries)
        else {
            continue;
        };
        let used = u64::try_from(used).unwrap_or(u64::MAX);
        let percent = used * 100 / u64::from(size.max(1));
        fills_read.push(format!("{name} {used}/{size} {percent}%"));
        let status = match full {
            Full::Evicts => Status::Ok,
            _ if percent < FILL_WARN_PERCENT => Status::Ok,
            Full::Refuses(_) if used >= u64::from(size) => Status::Fail,
            Full::Refuses(_) | Full::Degrades => Status::Warn,
        };
        match status {
            Status::Fail => problems.push(format!("{name} is full")),
            Status::Warn => problems.push(format!("{name} is {FILL_WARN_PERCENT}% full or more")),
            Status::Ok => {}
        }
        match full {
            Full::Refuses(flag) if status != Status::Ok && flag.starts_with("--") => {
                fixes.push(format!(
                    "raise {flag}, then `proxy-userspace cleanup` and restart the agent"
                ));
            }
            Full::Refuses(_) if status != Status::Ok => fixes.push(format!(
                "{name} has a fixed size: fewer entries of its kind (load-balancer source ranges) are all it can take"
            )),
            Full::Degrades if status != Status::Ok => fixes.push(format!(
                "{name} is near full: see `proxy-userspace stats` for what it refused"
            )),
            _ => {}
        }
        worst = worst.max(status);
    }
    let check = if worst == Status::Ok {
        Check::ok(
            NAME,
            format!(
                "{} maps with a size: those that refuse entries when full are below {FILL_WARN_PERCENT}%; the flow and affinity LRUs evict",
                fills_read.len()
            ),
        )
    } else {
        Check::problem(NAME, worst, problems.join(", "), fixes.join("; "))
    };
    check.with_volatile(fills_read)
}

/// The events that only ever count a problem, with what it is and its fix.
const PROBLEM_EVENTS: &[(proxy_common::Event, &str, &str)] = &[
    (
        proxy_common::Event::RevNatNotStored,
        "rev_nat_not_stored: replies could not be given their Service's address (no memory for a socket's storage, or a NodePort flow not stored): UDP clients get answers from the wrong address",
        "look for memory pressure (`free`, `dmesg`); the count says how often since the datapath was loaded",
    ),
    (
        proxy_common::Event::RevNatEvicted,
        "rev_nat_evicted: an unconnected UDP socket talked to more backends at once than its translation slots hold, so a late reply shows the backend's address",
        "connect() such clients' UDP sockets, or have them talk to fewer Service backends at once",
    ),
    (
        proxy_common::Event::UdpConnectedFull,
        "udp_connected_full: the connected UDP socket map was full: those sockets work, but are not ended when their backend leaves",
        "fewer connected UDP sockets at once (the map has a fixed size)",
    ),
];

/// The problems the event counts show, each with its fix, in
/// [`proxy_common::Event::ALL`] order. Every one warns: the datapath goes
/// on, but some traffic is not handled as it should be.
fn problems_counted(counts: &[(proxy_common::Event, u64)]) -> Vec<(&'static str, &'static str)> {
    use proxy_common::Event;
    let get = |event: Event| {
        counts
            .iter()
            .find(|(e, _)| *e == event)
            .map_or(0, |(_, n)| *n)
    };
    let lost = get(Event::NoBackendSlot).saturating_add(get(Event::NoBackend));
    let forwarded = get(Event::Forwarded);
    let mut problems = Vec::new();
    // A lost race now and then is a socket made while its Service shrank;
    // many mean the maps change under heavy traffic all the time.
    if lost > 0 && lost.saturating_mul(100) > forwarded {
        problems.push((
            "no_backend_slot and no_backend: more than 1% of translations lost a race with a write, and their sockets went untranslated",
            "find the Service whose endpoints change constantly (`proxy-userspace services` twice)",
        ));
    }
    for (event, problem, fix) in PROBLEM_EVENTS {
        if get(*event) > 0 {
            problems.push((*problem, *fix));
        }
    }
    problems
}

/// What the counts that are no problem mean: said whatever they are, so
/// that the evidence does not change with traffic.
const EXPECTED_EVENTS: &str = "refused counts connections to Services without endpoints; \
ext_dropped, packets to a NodePort, externalIP or load-balancer IP with no backend for them here, \
expected under externalTrafficPolicy Local on a node without local endpoints (kube-proxy drops \
them too); ext_source_range_dropped, new flows from clients outside a Service's \
loadBalancerSourceRanges; ipv6_ext_header_passed, IPv6 packets with extension headers, MLD \
reports among them, left alone";

pub(super) fn counters(cx: &Context) -> Check {
    const NAME: &str = "counters";
    let counts = match maps::open_pinned_events(&cx.pins)
        .map_err(|e| chain(&e))
        .and_then(|map| listing::events(&map).map_err(|e| chain(&e)))
    {
        Ok(counts) => counts.iter().collect::<Vec<_>>(),
        Err(error) => {
            return Check::problem(NAME, Status::Fail, error, cx.restart.clone());
        }
    };
    counters_verdict(&counts)
}

/// The counters check from the counts read.
fn counters_verdict(counts: &[(proxy_common::Event, u64)]) -> Check {
    const NAME: &str = "counters";
    let figures = counts
        .iter()
        .map(|(event, count)| format!("{} {count}", event.name()))
        .collect();
    let problems = problems_counted(counts);
    let check = if problems.is_empty() {
        Check::ok(
            NAME,
            format!("no event counts a problem: {EXPECTED_EVENTS}"),
        )
    } else {
        Check::problem(
            NAME,
            Status::Warn,
            format!(
                "{} of the datapath's event counts show a problem",
                problems.len()
            ),
            problems
                .iter()
                .map(|(_, fix)| *fix)
                .collect::<Vec<_>>()
                .join("; "),
        )
        .with_details(
            problems
                .iter()
                .map(|(problem, _)| (*problem).to_owned())
                .collect(),
        )
    };
    check.with_volatile(figures)
}

#[cfg(test)]
mod tests {
    use proxy_common::Event;

    use super::*;

    fn counts(nonzero: &[(Event, u64)]) -> Vec<(Event, u64)> {
        Event::ALL
            .iter()
            .map(|event| {
                let count = nonzero
                    .iter()
                    .find(|(e, _)| e == event)
                    .map_or(0, |(_, n)| *n);
                (*event, count)
            })
            .collect()
    }

    #[test]
    fn expected_drops_are_ok_and_their_evidence_does_not_change_with_traffic() {
        let quiet = counters_verdict(&counts(&[]));
        let busy = counters_verdict(&counts(&[
            (Event::Forwarded, 1000),
            (Event::Refused, 7),
            (Event::ExtDropped, 40),
            (Event::ExtSourceRangeDropped, 3),
            (Event::Ipv6ExtHeaderPassed, 12),
            (Event::NoBackendSlot, 2),
        ]));
        assert_eq!(busy.status, Status::Ok);
        assert_eq!(quiet.evidence, busy.evidence);
        assert!(busy.evidence.contains("externalTrafficPolicy Local"));
        assert!(busy.volatile.contains(&"ext_dropped 40".to_owned()));
        assert!(
            busy.volatile
                .contains(&"ext_source_range_dropped 3".to_owned())
        );
        assert_eq!(busy.volatile.len(), Event::ALL.len());
    }

    #[test]
    fn lost_storage_full_maps_and_many_lost_races_warn() {
        for event in [
            Event::RevNatNotStored,
            Event::RevNatEvicted,
            Event::UdpConnectedFull,
        ] {
            let check = counters_verdict(&counts(&[(event, 1)]));
            assert_eq!(check.status, Status::Warn, "{}", event.name());
            assert!(check.details[0].starts_with(event.name()), "{check:?}");
            assert!(check.fix.is_some());
        }
        let races = counters_verdict(&counts(&[(Event::Forwarded, 100), (Event::NoBackend, 2)]));
        assert_eq!(races.status, Status::Warn);
        assert!(races.details[0].contains("lost a race"));
    }
}
