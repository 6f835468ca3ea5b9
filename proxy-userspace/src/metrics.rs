//! Prometheus metrics on `/metrics` (kube-proxy's port 10249), with the
//! prometheus-client crate: how long syncs take, how long a change takes
//! from the EndpointSlice controller to the maps (kube-proxy's network
//! programming latency), what is programmed, how full the maps are, sync
//! errors by kind, and the datapath's own counters, read from the pinned
//! per-CPU map at each scrape.
//!
//! Under `ebpf_proxy_*` this project's own; under kube-proxy's names and
//! types (`kubeproxy_sync_proxy_rules_*`,
//! `kubeproxy_network_programming_duration_seconds`) what it measures
//! alike, so the dashboards and alerts written for kube-proxy keep working
//! ([`KubeProxyMetrics`]); and the process's `process_*`, as every Go
//! component exports them ([`ProcessCollector`]).

use std::{
    fmt, fs,
    sync::{Arc, Mutex, PoisonError, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use crate::{listener::Responder, maps::Pins};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// The address family, as kube-proxy labels its per-family metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    ip_family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrafficPolicyLabel {
    traffic_policy: &'static str,
}

/// kube-proxy's sync metrics, under its names, types and buckets.
#[derive(Clone)]
struct KubeProxyMetrics {
    sync_duration: Histogram,
    sync_full_duration: Histogram,
    sync_partial_duration: Histogram,
    programming_latency: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    endpoint_changes: Counter,
    endpoint_changes_pending: Gauge,
    service_changes: Counter,
    service_changes_pending: Gauge,
    no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
}

impl KubeProxyMetrics {
    fn register(registry: &mut Registry) -> Self {
        // kube-proxy's buckets: 1 ms doubling, and for programming latency
        // 0.25 s up to 5 min.
        let sync = || Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let programming = Histogram::new(
            [0.25, 0.5]
                .into_iter()
                .chain((1..=59).map(f64::from))
                .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
                .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i))),
        );
        let metrics = Self {
            sync_duration: sync(),
            sync_full_duration: sync(),
            sync_partial_duration: sync(),
            programming_latency: programming,
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            endpoint_changes: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            no_local_endpoints: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("kubeproxy");
        r.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            metrics.sync_duration.clone(),
        );
        r.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            metrics.sync_full_duration.clone(),
        );
        r.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            metrics.sync_partial_duration.clone(),
        );
        r.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            metrics.programming_latency.clone(),
        );
        r.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            metrics.last_sync.clone(),
        );
        r.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            metrics.last_queued.clone(),
        );
        r.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            metrics.endpoint_changes.clone(),
        );
        r.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            metrics.endpoint_changes_pending.clone(),
        );
        r.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            metrics.service_changes.clone(),
        );
        r.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            metrics.service_changes_pending.clone(),
        );
        r.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            metrics.no_local_endpoints.clone(),
        );
        metrics
    }
}

/// The agent's metrics; cheap to clone (every field is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    kube_proxy: KubeProxyMetrics,
    sync_duration: Histogram,
    programming_latency: Histogram,
    frontends: Family<FamilyLabel, Gauge>,
    backends: Family<FamilyLabel, Gauge>,
    map_fill: Family<MapLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    sync_errors: Family<KindLabel, Counter>,
    source_failing: Gauge,
}

impl Metrics {
    /// Registers everything; `pins` locates the datapath's counters.
    #[must_use]
    pub fn new(pins: Pins) -> Self {
        let mut root = Registry::default();
        let kube_proxy = KubeProxyMetrics::register(&mut root);
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("ebpf_proxy");
        let sync_duration = Histogram::new(exponential_buckets(0.000_1, 2.0, 18));
        registry.register(
            "sync_duration_seconds",
            "How long one sync of the maps took",
            sync_duration.clone(),
        );
        let programming_latency = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time) to the maps",
            programming_latency.clone(),
        );
        let frontends = Family::default();
        registry.register(
            "frontends_programmed",
            "Service frontends in the socket programs' maps, per family",
            frontends.clone(),
        );
        let backends = Family::default();
        registry.register(
            "backends_programmed",
            "Distinct backends in the socket programs' maps, per family",
            backends.clone(),
        );
        let map_fill = Family::default();
        registry.register(
            "map_fill_ratio",
            "Entries of each map over its size",
            map_fill.clone(),
        );
        let sync_errors = Family::default();
        registry.register(
            "sync_errors",
            "Failures while syncing, by kind",
            sync_errors.clone(),
        );
        let source_failing = Gauge::default();
        registry.register(
            "source_failing",
            "1 while the source (the API server, the manifests) fails; /healthz stays 200 unless changes wait",
            source_failing.clone(),
        );
        registry.register_collector(Box::new(DatapathCounters(pins.clone())));
        registry.register_collector(Box::new(FrontendCounts(pins)));
        Self {
            registry: Arc::new(Mutex::new(root)),
            kube_proxy,
            sync_duration,
            programming_latency,
            frontends,
            backends,
            map_fill,
            sync_errors,
            source_failing,
        }
    }

    /// A sync took `took`; `full` when it compared everything. Pending
    /// changes are now in the maps.
    pub fn observe_sync(&self, took: Duration, full: bool) {
        let seconds = took.as_secs_f64();
        self.sync_duration.observe(seconds);
        let kube_proxy = &self.kube_proxy;
        kube_proxy.sync_duration.observe(seconds);
        if full {
            kube_proxy.sync_full_duration.observe(seconds);
        } else {
            kube_proxy.sync_partial_duration.observe(seconds);
        }
        kube_proxy.endpoint_changes_pending.set(0);
        kube_proxy.service_changes_pending.set(0);
    }

    /// The sync ended with every write done.
    pub fn synced(&self) {
        self.kube_proxy.last_sync.set(unix_seconds());
    }

    /// Changes arrived (Services, EndpointSlices) and a sync is queued.
    pub fn queued(&self, services: u64, endpoint_slices: u64) {
        let kube_proxy = &self.kube_proxy;
        kube_proxy.service_changes.inc_by(services);
        kube_proxy.endpoint_changes.inc_by(endpoint_slices);
        kube_proxy
            .service_changes_pending
            .inc_by(i64::try_from(services).unwrap_or(i64::MAX));
        kube_proxy
            .endpoint_changes_pending
            .inc_by(i64::try_from(endpoint_slices).unwrap_or(i64::MAX));
        kube_proxy.last_queued.set(unix_seconds());
    }

    /// Service ports of traffic policy Local without a local endpoint.
    pub fn no_local_endpoints(&self, internal: usize, external: usize) {
        for (traffic_policy, count) in [("internal", internal), ("external", external)] {
            self.kube_proxy
                .no_local_endpoints
                .get_or_create(&TrafficPolicyLabel { traffic_policy })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    pub fn observe_programming(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        self.programming_latency.observe(seconds);
        self.kube_proxy.programming_latency.observe(seconds);
    }

    /// `ip_family` is `"IPv4"` or `"IPv6"`.
    pub fn programmed(&self, ip_family: &'static str, frontends: usize, backends: usize) {
        let label = FamilyLabel { ip_family };
        self.frontends
            .get_or_create(&label)
            .set(i64::try_from(frontends).unwrap_or(i64::MAX));
        self.backends
            .get_or_create(&label)
            .set(i64::try_from(backends).unwrap_or(i64::MAX));
    }

    pub fn map_fill(&self, map: &'static str, entries: usize, size: u32) {
        #[expect(
            clippy::cast_precision_loss,
            reason = "a ratio for people; map sizes are far below 2^52"
        )]
        let ratio = entries as f64 / f64::from(size.max(1));
        self.map_fill.get_or_create(&MapLabel { map }).set(ratio);
    }

    pub fn sync_error(&self, kind: &'static str, count: usize) {
        self.sync_errors
            .get_or_create(&KindLabel { kind })
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    pub fn source_failing(&self, failing: bool) {
        self.source_failing.set(i64::from(failing));
    }

    fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            text.clear();
        }
        text
    }
}

impl Responder for Metrics {
    fn respond(&self, path: &str) -> (u16, &'static str, String) {
        match path {
            "/metrics" => (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.render(),
            ),
            _ => (404, "text/plain", "not found\n".to_owned()),
        }
    }
}

/// Translations per frontend (its slots' counts summed, both programs'),
/// read from the pinned counts at each scrape: one series per frontend,
/// not per slot, to keep a large cluster's series in bounds.
#[derive(Debug)]
struct FrontendCounts(Pins);

impl Collector for FrontendCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut per_frontend: std::collections::BTreeMap<String, u64> =
            std::collections::BTreeMap::new();
        add_counts::<proxy_common::Ip4>(&self.0, &mut per_frontend);
        add_counts::<proxy_common::Ip6>(&self.0, &mut per_frontend);
        let mut family = encoder.encode_descriptor(
            "frontend_translations",
            "Connections (and unconnected UDP datagrams) the programs sent to a backend, per frontend",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (frontend, count) in &per_frontend {
            let counter = ConstCounter::new(*count);
            let labels = [("frontend", frontend.as_str())];
            counter.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Adds one family's pinned counts to `per_frontend`.
fn add_counts<A: crate::maps::encoding::MapAddress>(
    pins: &Pins,
    per_frontend: &mut std::collections::BTreeMap<String, u64>,
) {
    let Ok(counts) = crate::maps::open_pinned_counts::<A>(pins) else {
        return;
    };
    for (key, count) in counts.iter().filter_map(Result::ok) {
        let Some(frontend) = crate::model::L4Addr::from_service_key(&key.slot(0)) else {
            continue;
        };
        *per_frontend.entry(frontend.to_string()).or_default() += count;
    }
}

/// The datapath's per-CPU event counters, summed at each scrape.
#[derive(Debug)]
struct DatapathCounters(Pins);

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Ok(map) = crate::maps::open_pinned_events(&self.0) else {
            return Ok(());
        };
        let Ok(events) = crate::listing::events(&map) else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "datapath_events",
            "What the eBPF programs counted, summed over CPUs",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (event, count) in events.iter() {
            let counter = ConstCounter::new(count);
            let labels = [("event", event.name())];
            counter.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// The `process_*` metrics of Prometheus's client libraries, from /proc
/// at each scrape: CPU time, memory, file descriptors and start time.
#[derive(Debug)]
struct ProcessCollector;

/// What /proc says of this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
}

impl ProcessStats {
    /// From `/proc/self/stat` and `/proc/stat`'s boot time; the fields
    /// after the command (which may hold spaces and parentheses) counted
    /// from its closing parenthesis, as proc(5) numbers them.
    fn parse(stat: &str, boot_time: u64, ticks_per_second: f64, page_size: u64) -> Option<Self> {
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        // proc(5) numbers fields from 1 and `state` is the 3rd: field n is
        // fields[n - 3].
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        #[expect(
            clippy::cast_precision_loss,
            reason = "clock ticks of one process fit an f64's mantissa"
        )]
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks_per_second,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page_size,
            start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks_per_second,
        })
    }

    fn read() -> Option<Self> {
        let stat = fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())?;
        let sysconf = |var| nix::unistd::sysconf(var).ok().flatten();
        let ticks = sysconf(nix::unistd::SysconfVar::CLK_TCK)?;
        let page = sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?;
        #[expect(
            clippy::cast_precision_loss,
            reason = "the clock tick rate is a small number"
        )]
        Self::parse(&stat, boot_time, ticks as f64, u64::try_from(page).ok()?)
    }
}

/// Open file descriptors and the most there may be.
fn file_descriptors() -> Option<(u64, u64)> {
    let open = fs::read_dir("/proc/self/fd").ok()?.count();
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let max = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some((u64::try_from(open).ok()?, max))
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        use prometheus_client::metrics::{MetricType, gauge::ConstGauge};
        if let Some(stats) = ProcessStats::read() {
            ConstCounter::new(stats.cpu_seconds).encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?)?;
            for (name, help, value) in [
                (
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    stats.resident_bytes,
                ),
                (
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    stats.virtual_bytes,
                ),
            ] {
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "memory sizes far below 2^52 bytes"
                )]
                let value = value as f64;
                ConstGauge::new(value).encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    MetricType::Gauge,
                )?)?;
            }
            ConstGauge::new(stats.start_time_seconds).encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Some((open, max)) = file_descriptors() {
            for (name, help, value) in [
                ("process_open_fds", "Number of open file descriptors", open),
                (
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    max,
                ),
            ] {
                ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
                    .encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_read_past_a_command_with_spaces_and_parentheses() {
        // pid (comm) state ppid ... as proc(5): utime 14, stime 15,
        // starttime 22, vsize 23, rss 24 (pages).
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 \
                    123456789 2000 18446744073709551615";
        let stats = ProcessStats::parse(stat, 1_700_000_000, 100.0, 4096).unwrap();
        assert_eq!(
            stats,
            ProcessStats {
                cpu_seconds: 3.0,
                resident_bytes: 2000 * 4096,
                virtual_bytes: 123_456_789,
                start_time_seconds: 1_700_000_010.0,
            }
        );
        assert!(ProcessStats::read().is_some_and(|s| s.resident_bytes > 0));
        let (open, max) = file_descriptors().unwrap();
        assert!(open > 0 && max >= open, "{open} {max}");
    }
}
