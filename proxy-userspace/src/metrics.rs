//! Prometheus metrics on `/metrics` (kube-proxy's port 10249), with the
//! prometheus-client crate: how long syncs take, how long a change takes
//! from the EndpointSlice controller to the maps (kube-proxy's network
//! programming latency), what is programmed, how full the maps are, sync
//! errors by kind, and the datapath's own counters, read from the pinned
//! per-CPU map at each scrape.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
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

/// The agent's metrics; cheap to clone (every field is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
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
        let mut registry = Registry::with_prefix("ebpf_proxy");
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
            registry: Arc::new(Mutex::new(registry)),
            sync_duration,
            programming_latency,
            frontends,
            backends,
            map_fill,
            sync_errors,
            source_failing,
        }
    }

    pub fn observe_sync(&self, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
    }

    pub fn observe_programming(&self, latency: Duration) {
        self.programming_latency.observe(latency.as_secs_f64());
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
