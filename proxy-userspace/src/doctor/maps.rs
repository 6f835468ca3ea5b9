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
    let mut facts = Vec::new();
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
        facts.push(format!("{name} {used}/{size} ({percent}%)"));
        let status = match full {
            Full::Evicts => Status::Ok,
            _ if percent < FILL_WARN_PERCENT => Status::Ok,
            Full::Refuses(_) if used >= u64::from(size) => Status::Fail,
            Full::Refuses(_) | Full::Degrades => Status::Warn,
        };
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
    let evidence = facts.join(", ");
    if worst == Status::Ok {
        Check::ok(NAME, evidence)
    } else {
        Check::problem(NAME, worst, evidence, fixes.join("; "))
    }
}

pub(super) fn counters(cx: &Context) -> Check {
    const NAME: &str = "counters";
    let counts = match maps::open_pinned_events(&cx.pins)
        .map_err(|e| chain(&e))
        .and_then(|map| listing::events(&map).map_err(|e| chain(&e)))
    {
        Ok(counts) => counts,
        Err(error) => {
            return Check::problem(NAME, Status::Fail, error, cx.restart.clone());
        }
    };
    let get = |event: proxy_common::Event| {
        counts
            .iter()
            .find(|(e, _)| *e == event)
            .map_or(0, |(_, n)| n)
    };
    let evidence = counts
        .iter()
        .map(|(event, count)| format!("{} {count}", event.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let lost = get(proxy_common::Event::NoBackendSlot) + get(proxy_common::Event::NoBackend);
    let forwarded = get(proxy_common::Event::Forwarded);
    // A lost race now and then is a socket made while its Service shrank;
    // many mean the maps change under heavy traffic all the time.
    if lost > 0 && lost.saturating_mul(100) > forwarded {
        Check::problem(
            NAME,
            Status::Warn,
            format!("{evidence}: more than 1% of translations lost a race with a write"),
            "find the Service whose endpoints change constantly (`proxy-userspace services` twice)",
        )
    } else {
        Check::ok(
            NAME,
            format!("{evidence} (refused: connections to Services without endpoints)"),
        )
    }
}
