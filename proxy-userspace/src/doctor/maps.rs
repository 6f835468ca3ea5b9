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

/// How many entries one family's socket frontend maps hold: each map's
/// name, the flag that sizes it, and its entries.
fn fill<A: MapAddress>(
    cx: &Context,
) -> Result<[(&'static str, &'static str, usize); 2], maps::MapsError> {
    let maps = maps::open_pinned::<A>(&cx.pins)?;
    let services = maps::read_frontends(&maps.services).map(|frontends| {
        frontends
            .values()
            .map(|f| f.slots.len() + usize::from(f.count.is_some()))
            .sum::<usize>()
    });
    let backends = maps.backends.keys().count();
    Ok([
        (
            A::MAPS.services,
            "--services-map-size",
            services.unwrap_or_default(),
        ),
        (A::MAPS.backends, "--backends-map-size", backends),
    ])
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
    for (name, flag, used) in fills {
        let Ok(size) = bpf_sys::obj_get(&cx.pins.map(name))
            .and_then(bpf_sys::map_info)
            .map(|info| info.max_entries)
        else {
            continue;
        };
        let used = u64::try_from(used).unwrap_or(u64::MAX);
        let percent = used * 100 / u64::from(size.max(1));
        facts.push(format!("{name} {used}/{size} ({percent}%)"));
        let status = if used >= u64::from(size) {
            Status::Fail
        } else if percent >= FILL_WARN_PERCENT {
            Status::Warn
        } else {
            Status::Ok
        };
        if status != Status::Ok {
            fixes.push(format!(
                "raise {flag}, then `proxy-userspace cleanup` and restart the agent"
            ));
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
