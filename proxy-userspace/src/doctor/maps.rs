//! What the maps say of themselves: how full they are, and the programs'
//! event counters.

use super::{Check, Context, Status};
use crate::{bpf_sys, listing, maps, report::chain};

/// A map this full warns; a full one fails.
const FILL_WARN_PERCENT: u64 = 90;

pub(super) fn maps(cx: &Context) -> Check {
    const NAME: &str = "maps";
    let maps = match maps::open_pinned(&cx.pins) {
        Ok(maps) => maps,
        Err(error) => {
            return Check::problem(NAME, Status::Fail, chain(&error), cx.restart.clone());
        }
    };
    let services = crate::maps::table::read_frontends(&maps.services).map(|frontends| {
        frontends
            .values()
            .map(|f| f.slots.len() + usize::from(f.count.is_some()))
            .sum::<usize>()
    });
    let backends = maps.backends.keys().count();
    let mut worst = Status::Ok;
    let mut facts = Vec::new();
    let mut fixes = Vec::new();
    for (name, flag, used) in [
        (
            proxy_common::SERVICES_MAP,
            "--services-map-size",
            services.unwrap_or_default(),
        ),
        (proxy_common::BACKENDS_MAP, "--backends-map-size", backends),
    ] {
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
