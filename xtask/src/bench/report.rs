//! The bench's markdown tables, with the design targets printed beside
//! the results (they are not a pass/fail).

use std::{fmt::Write as _, time::Duration};

use super::{BenchOptions, Datapath, Family, HotPath, Row, median};

/// The ClusterIP comparison, one table per family: each datapath's rate
/// (median and spread over the rounds) and its ratio to going straight to
/// the pod at the same size over the same family, connect latency,
/// endpoint change, install time and memory.
pub fn cluster_ip(rows: &[Row], options: &BenchOptions) -> String {
    let mut out = String::new();
    for &family in &options.families {
        let of_family: Vec<&Row> = rows.iter().filter(|row| row.family == family).collect();
        match family {
            Family::Ipv4 => {
                let _ = write!(
                    out,
                    "\n## ClusterIP: this datapath against kube-proxy's\n\n\
                 New connections per second to one ClusterIP, the measured Service in \
                 the middle of N Services, and straight to its pod: one nginx pod behind it (the \
                 other Services have 2), so each rate is one server's; wrk -t2 -c{} -d{}s, every request a new connection; {} \
                 interleaved round(s) 65 s apart, median (min–max). Connect: a timed connect(), {} per round, \
                 the medians of the rounds' p50 and p99. Endpoint change: until the pod the endpoint moved to answers \
                 (two per round, out and back), median (max); for the agent from the API server's watch, for \
                 kube-proxy's modes only writing the rules.\n\n",
                    options.connections,
                    options.seconds,
                    options.rounds,
                    super::CONNECTS,
                );
            }
            Family::Ipv6 => out.push_str(
                "\n## ClusterIP over IPv6: this datapath against kube-proxy's\n\n\
                 The same measurement over IPv6, in the same interleaved rounds: ClusterIPs in \
                 fd10:96::/112 (the measured one fd10:96::10), the pods' IPv6 addresses as \
                 endpoints (slices of addressType IPv6), kube-proxy's rules loaded with \
                 ip6tables-restore (legacy and nft) and as `table ip6 kube-proxy`; \
                 \"vs pod\" is straight to the pod over IPv6.\n\n",
            ),
        }
        out.push_str(&table(&of_family));
        out.push_str(&match family {
            Family::Ipv4 => "\nTargets: eBPF ≥ 0.97 of straight to the pod; an endpoint change ≤ 5 ms (p99, \
                 through the API server); agent peak RSS ≤ 100 MiB at 30,000 Services × 4 endpoints \
                 (here 1 or 2 endpoints; `bench --api-scale` measures 4).\n"
                .to_owned(),
            Family::Ipv6 => "\nTarget (issue 17): eBPF over IPv6 ≥ 0.97 of straight to the pod over IPv6.\n"
                .to_owned(),
        });
        out.push_str(&direct_ratio_verdicts(&of_family));
    }
    out
}

/// One family's rows as a markdown table.
fn table(rows: &[&Row]) -> String {
    let mut out = String::from(
        "| N | datapath | conn/s | vs pod | connect p50 | connect p99 | endpoint change | install | agent peak RSS |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let rate = median(&row.rates).unwrap_or(f64::NAN);
        let (low, high) = spread(&row.rates);
        let p50 = median(&row.connects.iter().map(|c| c.p50).collect::<Vec<_>>());
        let p99 = median(&row.connects.iter().map(|c| c.p99).collect::<Vec<_>>());
        let change = median(&row.changes).map_or_else(
            || "–".to_owned(),
            |m| {
                let max = row.changes.iter().max().copied().unwrap_or(m);
                format!("{} ({})", millis(m), millis(max))
            },
        );
        let _ = writeln!(
            out,
            "| {} | {} | {rate:.0} ({low:.0}–{high:.0}) | {:.2} | {} | {} | {change} | {} | {} |",
            row.services,
            row.datapath.name(),
            rate / direct_rate(rows, row.services),
            p50.map_or_else(|| "–".to_owned(), micros),
            p99.map_or_else(|| "–".to_owned(), micros),
            millis(row.install),
            row.peak_rss_kib
                .map_or_else(|| "–".to_owned(), |kib| format!("{} MiB", kib / 1024)),
        );
    }
    out
}

/// The median rate straight to the pod at `services`, among one family's
/// rows.
fn direct_rate(rows: &[&Row], services: usize) -> f64 {
    rows.iter()
        .find(|r| r.services == services && r.datapath == Datapath::Direct)
        .and_then(|r| median(&r.rates))
        .unwrap_or(f64::NAN)
}

/// Whether the eBPF rows of one family met 0.97 of straight to the pod,
/// size by size.
fn direct_ratio_verdicts(rows: &[&Row]) -> String {
    let mut out = String::new();
    for row in rows.iter().filter(|row| row.datapath == Datapath::Ebpf) {
        let ratio = median(&row.rates).unwrap_or(f64::NAN) / direct_rate(rows, row.services);
        let _ = writeln!(
            out,
            "- N = {}: eBPF over {} at {ratio:.2} of straight to the pod: {}",
            row.services,
            row.family.name(),
            verdict(ratio >= 0.97)
        );
    }
    out
}

/// What each eBPF program cost per call at each size, and connect6 beside
/// connect4 where both families ran.
pub fn hot_paths(hot_paths: &[HotPath]) -> String {
    let mut out = format!(
        "\n## The eBPF programs per call (bpf_stats)\n\n\
         {} timed connects, each asked getpeername(), in each family's eBPF lab.\n\n\
         | N | connects | program | ns per call | calls |\n|---|---|---|---|---|\n",
        super::CONNECTS
    );
    for hot in hot_paths {
        for cost in &hot.costs {
            let what = match (hot.family, cost.through_service) {
                (Family::Ipv4, true) => "through the ClusterIP",
                (Family::Ipv4, false) => "straight to a pod",
                (Family::Ipv6, true) => "through the IPv6 ClusterIP",
                (Family::Ipv6, false) => "straight to a pod over IPv6",
            };
            let _ = writeln!(
                out,
                "| {} | {what} | {} | {:.0} | {} |",
                hot.services, cost.program, cost.nanoseconds_per_call, cost.calls
            );
        }
    }
    out.push_str(
        "\nTargets: connect4 ≤ 300 ns translated and ≤ 100 ns for other addresses; \
         getpeername4 and sock_release ≤ 100 ns for sockets never translated; \
         connect6 within 10 % of connect4 per call (issue 17).\n",
    );
    let mut sizes: Vec<usize> = hot_paths.iter().map(|hot| hot.services).collect();
    sizes.dedup();
    for services in sizes {
        for through_service in [true, false] {
            let cost = |family: Family, program: &str| {
                hot_paths
                    .iter()
                    .filter(|hot| hot.services == services && hot.family == family)
                    .flat_map(|hot| &hot.costs)
                    .find(|cost| cost.through_service == through_service && cost.program == program)
                    .map(|cost| cost.nanoseconds_per_call)
            };
            if let (Some(four), Some(six)) = (
                cost(Family::Ipv4, "connect4"),
                cost(Family::Ipv6, "connect6"),
            ) {
                let ratio = six / four;
                let _ = writeln!(
                    out,
                    "- N = {services}, {}: connect6 / connect4 = {six:.0} / {four:.0} ns = {ratio:.2}: {}",
                    if through_service {
                        "through the ClusterIP"
                    } else {
                        "straight to a pod"
                    },
                    verdict(ratio <= 1.10)
                );
            }
        }
    }
    out
}

const fn verdict(met: bool) -> &'static str {
    if met { "target met" } else { "target NOT met" }
}

fn spread(values: &[f64]) -> (f64, f64) {
    values.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), r| {
        (lo.min(*r), hi.max(*r))
    })
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}
