//! The bench's markdown tables, with the design targets printed beside
//! the results (they are not a pass/fail).

use std::{fmt::Write as _, time::Duration};

use super::{BenchOptions, Datapath, HotPath, Row, median};

/// The ClusterIP comparison: each datapath's rate (median and spread over
/// the rounds) and its ratio to going straight to the pod at the same
/// size, connect latency, endpoint change, install time and memory.
pub fn cluster_ip(rows: &[Row], options: &BenchOptions) -> String {
    let mut out = format!(
        "\n## ClusterIP: this datapath against kube-proxy's\n\n\
         New connections per second to one ClusterIP, the measured Service in \
         the middle of N Services, and straight to its pod: one nginx pod behind it (the \
         other Services have 2), so each rate is one server's; wrk -t2 -c{} -d{}s, every request a new connection; {} \
         interleaved round(s) 65 s apart, median (min–max). Connect: a timed connect(), {} per round, \
         the medians of the rounds' p50 and p99. Endpoint change: until the pod the endpoint moved to answers \
         (two per round, out and back), median (max); for the agent from the API server's watch, for \
         kube-proxy's modes only writing the rules.\n\n\
         | N | datapath | conn/s | vs pod | connect p50 | connect p99 | endpoint change | install | agent peak RSS |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        options.connections,
        options.seconds,
        options.rounds,
        super::CONNECTS,
    );
    for row in rows {
        let direct = rows
            .iter()
            .find(|r| r.services == row.services && r.datapath == Datapath::Direct)
            .and_then(|r| median(&r.rates))
            .unwrap_or(f64::NAN);
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
            rate / direct,
            p50.map_or_else(|| "–".to_owned(), micros),
            p99.map_or_else(|| "–".to_owned(), micros),
            millis(row.install),
            row.peak_rss_kib
                .map_or_else(|| "–".to_owned(), |kib| format!("{} MiB", kib / 1024)),
        );
    }
    out.push_str(
        "\nTargets: eBPF ≥ 0.97 of straight to the pod; an endpoint change ≤ 5 ms (p99, \
         through the API server); agent peak RSS ≤ 100 MiB at 30,000 Services × 4 endpoints \
         (here 1 or 2 endpoints; `bench --api-scale` measures 4).\n",
    );
    out
}

/// What each eBPF program cost per call at each size.
pub fn hot_paths(hot_paths: &[HotPath]) -> String {
    let mut out = format!(
        "\n## The eBPF programs per call (bpf_stats)\n\n\
         {} timed connects, each asked getpeername(), in the eBPF lab.\n\n\
         | N | connects | program | ns per call | calls |\n|---|---|---|---|---|\n",
        super::CONNECTS
    );
    for hot in hot_paths {
        for (what, program, cost, calls) in &hot.costs {
            let _ = writeln!(
                out,
                "| {} | {what} | {program} | {cost:.0} | {calls} |",
                hot.services
            );
        }
    }
    out.push_str(
        "\nTargets: connect4 ≤ 300 ns translated and ≤ 100 ns for other addresses; \
         getpeername4 and sock_release ≤ 100 ns for sockets never translated.\n",
    );
    out
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
