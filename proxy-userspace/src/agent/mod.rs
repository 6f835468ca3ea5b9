//! The agent's loop: source events in, through the model, out to the
//! reconcilers, plus timers.
//!
//! Level-triggered and incremental: events update the model's objects, the
//! model recomputes the Services they touched and says which frontends of
//! each table changed, and each table's reconciler writes their
//! difference, retrying what failed on its own timer. Nothing is written
//! before the source's view is complete, bursts of events are coalesced
//! into one pass (and spaced by `--min-sync-period`). What the passes did
//! to slots and backends goes on to the jobs that follow them: the
//! per-slot counts and the sockets of departed backends. The masquerade
//! rules, the devices and the guard of the datapath run on timers of their
//! own.

mod attachment;
mod tables;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use proxy_common::{Ip4, Ip6};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc::UnboundedReceiver,
    time::sleep_until,
};
use tracing::{info, warn};

use self::{attachment::Attachment, tables::FamilyTables};
use crate::{
    agent_record,
    datapath::{Datapath, DatapathError, MapSizes, ProgramSettings},
    devices::{self, DeviceWatch},
    health::{Health, HealthEndpoints, SharedHealth},
    listener::{Connections, HEALTHZ_CONNECTIONS, METRICS_CONNECTIONS, Responder},
    maps::{Pins, encoding::MapAddress},
    metrics::Metrics,
    model::{Model, ModelConfig, Problem},
    reconcile::{filters::Filters, masquerade::Masquerade},
    service_health::ServiceHealthServers,
    source::{Change, EventSink, NodeObject, Source, SourceError, SourceEvent},
    stale_sockets::{StaleSockets, Termination, Translations},
};

/// Syncs closer together than this are a burst, and are coalesced.
const BURST_WINDOW: Duration = Duration::from_millis(20);
/// A removal under the pin directory comes as a burst of events (`rm -rf`
/// removes one pin at a time): the guard looks once it has settled.
const GUARD_SETTLE: Duration = Duration::from_millis(100);

/// Everything `run` needs, from its flags and kube-proxy's config file.
pub struct AgentConfig {
    pub cgroup: PathBuf,
    pub pins: Pins,
    pub sizes: MapSizes,
    pub min_sync_period: Duration,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    pub health_stale_after: Duration,
    pub model: ModelConfig,
    /// `--iptables-masquerade-bit`.
    pub masquerade_bit: u8,
    /// `--cluster-cidr`: a range per family, at most.
    pub cluster_cidrs: Vec<crate::model::Cidr>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// Whether the masquerade fallback is kept.
    pub install_iptables_rules: bool,
    /// How often the masquerade rules and the devices are looked at.
    pub iptables_sync_period: Duration,
    /// `--devices`.
    pub devices: Vec<String>,
    /// `--pod-devices`, with `--socket-lb-scope=host`; `None` with `all`,
    /// where pods' sockets are balanced at `connect()`.
    pub pod_devices: Option<Vec<String>>,
    /// `--tcx` and `--trace`.
    pub programs: ProgramOptions,
    /// `--terminate-udp`, `--terminate-tcp`.
    pub termination: Termination,
    /// What to record for `doctor` and `explain` once /healthz is bound.
    pub record: Option<agent_record::AgentRecord>,
}

/// How the programs are attached and loaded.
#[derive(Clone, Copy, Debug)]
pub struct ProgramOptions {
    /// `--tcx`: TCX links for the tc programs where the kernel has them.
    pub tcx: bool,
    /// `--trace`: the programs log each translation.
    pub trace: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("cannot read the pinned maps")]
    Adopt(#[source] aya::maps::MapError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the source stopped")]
    SourceStopped,
    #[error("cannot listen for signals")]
    Signals(#[source] std::io::Error),
    #[error(
        "cannot read this network namespace's cookie (--socket-lb-scope=host needs Linux 5.14)"
    )]
    NetnsCookie(#[source] std::io::Error),
    #[error("cannot follow the programs' log records")]
    Trace(#[source] std::io::Error),
    #[error("cannot serve {what} on {address}")]
    Listen {
        what: &'static str,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the source has given a complete view yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    /// Not yet: nothing may be written.
    Partial,
    /// Complete, but some input could not be read: pinned frontends no
    /// object claims are kept.
    Incomplete,
    Complete,
}

struct Loop {
    model: Model,
    view: View,
    ipv4: FamilyTables<Ip4>,
    ipv6: FamilyTables<Ip6>,
    /// The tc programs' address filters, kept ahead of both families'
    /// tables.
    filters: Filters,
    /// Follows the backends that leave; `None` with `--terminate-udp=false`
    /// and `--terminate-tcp=false`.
    stale_sockets: Option<StaleSockets>,
    attachment: Attachment,
    /// `None` with `--install-iptables-rules=false`.
    masquerade: Option<Masquerade>,
    service_health: ServiceHealthServers,
    health: SharedHealth,
    metrics: Metrics,
    sizes: MapSizes,
    /// When the EndpointSlice changes waiting to be applied were made.
    triggers: Vec<SystemTime>,
    /// Problems already logged.
    reported: BTreeSet<Problem>,
}

/// Loads and attaches the datapath, then follows `source` until SIGTERM or
/// SIGINT. The pinned datapath keeps serving after the agent exits.
pub async fn run(config: AgentConfig, source: Box<dyn Source>) -> Result<(), AgentError> {
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;

    let (datapath, mut ipv4, mut ipv6, filters) = load(&config)?;

    let health = Health::shared(config.health_stale_after);
    let metrics = Metrics::new(config.pins.clone());
    let healthz = serve_endpoints(&config, &health, &metrics).await?;
    // Removed when the agent returns.
    let _record = record(&config, healthz);

    let (sink, mut events) = EventSink::channel();
    source.start(sink)?;
    let (guard_changes, mut guard_events) = tokio::sync::mpsc::unbounded_channel();
    let mut link_events = follow_links();
    let stale_sockets = start_stale_sockets(&config);
    if stale_sockets.is_some() {
        ipv4.sockets.report_departures();
        ipv6.sockets.report_departures();
    }
    let mut state = Loop {
        model: Model::new(config.model.clone()),
        view: View::Partial,
        ipv4,
        ipv6,
        filters,
        stale_sockets,
        attachment: Attachment::new(
            datapath,
            DeviceWatch::new(config.devices.clone(), config.pod_devices.clone()),
        ),
        masquerade: config
            .install_iptables_rules
            .then(|| Masquerade::new(config.masquerade_bit)),
        service_health: ServiceHealthServers::new(health.clone()),
        health: health.clone(),
        metrics,
        sizes: config.sizes,
        triggers: Vec::new(),
        reported: BTreeSet::new(),
    };
    // Before the first sync, so that it already has the node's addresses
    // (a second sync just for them would be wasted).
    state.housekeeping();
    let mut housekeeping = housekeeping_timer(config.iptables_sync_period);
    let mut last_sync: Option<Instant> = None;
    // A sync held back by --min-sync-period, and when it is due.
    let mut deferred: Option<Instant> = None;
    loop {
        let wake = [state.ipv4.retry_at(), state.ipv6.retry_at(), deferred]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    return Err(AgentError::SourceStopped);
                };
                state.take(event);
                drain(&mut events, &mut state);
            }
            () = async { sleep_until(wake.expect("guarded").into()).await }, if wake.is_some() => {
                let now = Instant::now();
                state.ipv4.wake(now);
                state.ipv6.wake(now);
            }
            _ = housekeeping.tick() => state.housekeeping(),
            Some(()) = link_events.recv() => {
                while link_events.try_recv().is_ok() {}
                state.follow_interfaces();
            }
            Some(()) = guard_events.recv() => state.guard_settled(&mut guard_events).await,
            _ = terminate.recv() => {
                info!("SIGTERM: exiting; the pinned datapath keeps serving");
                return Ok(());
            }
            _ = interrupt.recv() => {
                info!("SIGINT: exiting; the pinned datapath keeps serving");
                return Ok(());
            }
        }
        if state.view == View::Partial {
            continue;
        }
        // kube-proxy's minSyncPeriod: changes that come sooner wait, and
        // are applied together. Even at 0, a change that comes within
        // BURST_WINDOW of the last sync is part of a burst (a rollout, a
        // relist) and waits for the window to end, so 1,000 changes make a
        // few applies, while a change after a quiet moment is applied at
        // once.
        if let Some(last) = last_sync {
            let due = last + config.min_sync_period.max(BURST_WINDOW);
            if Instant::now() < due {
                deferred = Some(due);
                continue;
            }
        }
        deferred = None;
        if state.sync() {
            last_sync = Some(Instant::now());
        }
        // Attach only once the maps hold the services, so no socket ever
        // sees a half-filled datapath.
        if !state.attachment.is_attached() {
            state
                .attachment
                .attach(&config.cgroup, config.pins.root(), &guard_changes)?;
            // The devices follow the NodePort addresses, which the first
            // sync has just computed: choose them now, not a period later.
            state.housekeeping();
            state.health().set_attached();
        }
    }
}

/// Loads the datapath and adopts its pinned maps: per family, the socket
/// programs' table and the tc programs', each with a reconciler of its own,
/// and the tc programs' address filters; with `--trace`, follows the
/// programs' log.
fn load(
    config: &AgentConfig,
) -> Result<(Datapath, FamilyTables<Ip4>, FamilyTables<Ip6>, Filters), AgentError> {
    let mut datapath = Datapath::load(
        config.pins.clone(),
        config.sizes,
        ProgramSettings {
            masquerade_mark: 1 << config.masquerade_bit,
            cluster_cidr: config
                .cluster_cidrs
                .iter()
                .find(|cidr| cidr.address.is_ipv4())
                .copied(),
            cluster_cidr6: config
                .cluster_cidrs
                .iter()
                .find_map(|cidr| match cidr.address {
                    std::net::IpAddr::V6(address) => Some((address, cidr.prefix_len)),
                    std::net::IpAddr::V4(_) => None,
                }),
            masquerade_all: config.masquerade_all,
            host_netns_cookie: if config.pod_devices.is_some() {
                crate::bpf_sys::netns_cookie().map_err(AgentError::NetnsCookie)?
            } else {
                0
            },
            trace: config.programs.trace,
        },
    )?;
    let ipv4 = FamilyTables::adopt(&mut datapath)?;
    let ipv6 = FamilyTables::adopt(&mut datapath)?;
    let filters = datapath.take_filters()?;
    datapath.set_tcx(config.programs.tcx);
    if config.programs.trace {
        follow_trace(&mut datapath)?;
    }
    Ok((datapath, ipv4, ipv6, filters))
}

/// `--trace`: the programs' log records, read twenty times a second on a
/// thread of their own (a debugging mode: the polling costs nothing that
/// matters, and the loop never waits for the log).
fn follow_trace(datapath: &mut Datapath) -> Result<(), AgentError> {
    let mut reader = datapath.trace_reader()?;
    std::thread::Builder::new()
        .name("trace".to_owned())
        .spawn(move || {
            loop {
                reader.flush();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .map_err(AgentError::Trace)?;
    info!("tracing every translation (--trace): expect a line per connection");
    Ok(())
}

/// The kernel's notices of links and addresses, a unit each; without
/// them the interfaces are still read on the housekeeping timer.
fn follow_links() -> UnboundedReceiver<()> {
    let (changes, events) = tokio::sync::mpsc::unbounded_channel();
    if let Err(error) = devices::follow_links(changes) {
        warn!(%error, "cannot follow the links' notices; interfaces are looked at every --iptables-sync-period");
    }
    events
}

/// The thread that ends sockets of departed backends; without it (the
/// storage map cannot be opened, say) the agent goes on, and says so.
fn start_stale_sockets(config: &AgentConfig) -> Option<StaleSockets> {
    if !config.termination.any() {
        return None;
    }
    match Translations::open(&config.pins)
        .and_then(|translations| StaleSockets::start(translations, config.termination))
    {
        Ok(stale_sockets) => Some(stale_sockets),
        Err(error) => {
            warn!(%error, "cannot end sockets of backends that leave their Service; connected UDP sockets keep their backend");
            None
        }
    }
}

/// Starts /healthz, /livez and /metrics; returns where /healthz answers.
async fn serve_endpoints(
    config: &AgentConfig,
    health: &SharedHealth,
    metrics: &Metrics,
) -> Result<SocketAddr, AgentError> {
    let mut healthz = config.healthz_bind_address;
    for (what, address, responder, connections) in [
        (
            "healthz",
            config.healthz_bind_address,
            Arc::new(HealthEndpoints(health.clone())) as Arc<dyn Responder>,
            HEALTHZ_CONNECTIONS,
        ),
        (
            "metrics",
            config.metrics_bind_address,
            Arc::new(metrics.clone()),
            METRICS_CONNECTIONS,
        ),
    ] {
        let bound = crate::listener::serve(what, address, responder, Connections::new(connections))
            .await
            .map_err(|source| AgentError::Listen {
                what,
                address,
                source,
            })?;
        if what == "healthz" {
            healthz = bound;
        }
    }
    Ok(healthz)
}

/// Records the agent's settings for `doctor` and `explain`, with the
/// address /healthz is bound to (a port of 0 is chosen at bind); a failure
/// costs them only their defaults, so it is a warning.
fn record(config: &AgentConfig, healthz: SocketAddr) -> Option<agent_record::Written> {
    let mut record = config.record.clone()?;
    record.healthz_bind_address = healthz;
    agent_record::write(&config.pins, &record)
        .inspect_err(|error| {
            warn!(%error, dir = agent_record::RECORD_DIR, "cannot record the agent's settings; doctor and explain will need flags");
        })
        .ok()
}

/// The masquerade rules and the node's addresses are looked at on this
/// timer: a flushed rule set is repaired within one period.
fn housekeeping_timer(period: Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

/// Takes every event already waiting, so a burst becomes one apply.
fn drain(events: &mut UnboundedReceiver<SourceEvent>, state: &mut Loop) {
    while let Ok(event) = events.try_recv() {
        state.take(event);
    }
}

impl Loop {
    fn take(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Changes(changes) => {
                let (mut services, mut endpoint_slices) = (0, 0);
                for change in changes {
                    match &change {
                        Change::EndpointSlice(_, slice) => {
                            endpoint_slices += 1;
                            if let Some(time) = slice
                                .as_ref()
                                .and_then(|slice| slice.object.trigger_time.as_deref())
                                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                                .and_then(|t| u64::try_from(t.as_millisecond()).ok())
                            {
                                self.triggers
                                    .push(SystemTime::UNIX_EPOCH + Duration::from_millis(time));
                            }
                        }
                        Change::Service(..) => services += 1,
                        Change::Node(node) => self
                            .health()
                            .node_leaving(node.as_ref().and_then(NodeObject::leaving)),
                    }
                    self.model.apply(change);
                }
                self.metrics.queued(services, endpoint_slices);
                self.health().pending();
            }
            SourceEvent::Synced { complete } => {
                let view = if complete {
                    View::Complete
                } else {
                    View::Incomplete
                };
                if view != self.view {
                    // The first view, and each change of completeness,
                    // reconciles everything the pins hold.
                    self.view = view;
                    self.ipv4.view(complete);
                    self.ipv6.view(complete);
                    if !complete {
                        warn!(
                            "some input could not be read: frontends in the maps that no object claims are kept until it can"
                        );
                    }
                }
            }
            SourceEvent::Status(None) => {
                info!("the source works again");
                self.metrics.source_failing(false);
                self.health().source_status(None);
            }
            SourceEvent::Status(Some(error)) => {
                warn!(%error, "the source fails; the maps keep what they hold");
                self.metrics.source_failing(true);
                self.health().source_status(Some(error));
            }
        }
    }

    /// The periodic tasks: the masquerade rules, then the node's
    /// interfaces and addresses (NodePorts follow the addresses, the
    /// devices both), then the guard.
    fn housekeeping(&mut self) {
        if let Some(masquerade) = &mut self.masquerade {
            masquerade.repair();
        }
        self.follow_interfaces();
        if self.filters.rebuild_due(Instant::now()) {
            self.filters
                .rebuild(&self.model, self.view == View::Complete);
        }
        self.guard();
    }

    /// The node's interfaces and addresses: NodePorts follow the
    /// addresses, the devices both.
    fn follow_interfaces(&mut self) {
        match devices::read() {
            Ok(interfaces) => {
                self.model
                    .set_host_addresses(devices::host_addresses(&interfaces));
                // Devices follow the NodePort addresses as last computed;
                // an address change is seen one period later at worst.
                self.attachment
                    .follow_devices(interfaces, &self.model.external().node_addresses);
            }
            Err(error) => {
                warn!(error = %crate::report::chain(&error), "cannot read the interfaces");
            }
        }
    }

    /// [`Loop::guard`] once a burst of changes has settled.
    async fn guard_settled(&mut self, changes: &mut UnboundedReceiver<()>) {
        tokio::time::sleep(GUARD_SETTLE).await;
        while changes.try_recv().is_ok() {}
        self.guard();
    }

    /// Puts back what went from under the datapath, and tells `/healthz`
    /// while it is not attached where it should be.
    fn guard(&mut self) {
        self.attachment.guard();
        let problem = self.attachment.problem().map(str::to_owned);
        self.health().datapath_problem(problem);
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings both tables up to date; `false` when there was nothing to do.
    fn sync(&mut self) -> bool {
        if !self.model.is_dirty() && !self.ipv4.has_work() && !self.ipv6.has_work() {
            return false;
        }
        let started = Instant::now();
        let changes = self.model.recompute();
        self.log_problems();
        // The filters' bits before the tables' frontends, or a new
        // frontend's first packets would leave the programs untranslated.
        self.filters
            .before_pass(&self.model, &changes, self.view == View::Complete);
        self.ipv4.changed(&changes);
        self.ipv6.changed(&changes);
        self.service_health
            .update(&self.model.external().health_checks);
        let ipv4 = self.ipv4.reconcile(&self.model);
        let ipv6 = self.ipv6.reconcile(&self.model);
        if let Some(stale_sockets) = &self.stale_sockets {
            stale_sockets.follow(&ipv4.socket_events);
            stale_sockets.follow(&ipv6.socket_events);
        }
        let passes = [
            ipv4.sockets,
            ipv4.tc,
            ipv4.source_ranges,
            ipv6.sockets,
            ipv6.tc,
            ipv6.source_ranges,
        ];
        let failures = passes.iter().map(|pass| pass.failures).sum::<usize>();
        info!(
            frontends = self.model.desired().frontends.len(),
            external = self.model.tc_desired().frontends.len(),
            changed = passes.iter().map(|pass| pass.looked_at).sum::<usize>(),
            changes = passes.iter().map(|pass| pass.changes).sum::<usize>(),
            failures,
            took_us = started.elapsed().as_micros(),
            "applied"
        );
        let full = passes.iter().any(|pass| pass.full);
        self.observe_sync(started.elapsed(), full);
        if failures == 0 {
            self.metrics.synced();
            let now = SystemTime::now();
            for trigger in self.triggers.drain(..) {
                if let Ok(latency) = now.duration_since(trigger) {
                    self.metrics.observe_programming(latency);
                }
            }
            self.health().synced();
        } else {
            self.metrics.sync_error("map_write", failures);
        }
        true
    }

    fn observe_sync(&self, took: Duration, full: bool) {
        self.metrics.observe_sync(took, full);
        let (internal, external) = self.model.no_local_endpoints();
        self.metrics.no_local_endpoints(internal, external);
        self.observe_tables(&self.ipv4);
        self.observe_tables(&self.ipv6);
    }

    fn observe_tables<A: MapAddress>(&self, tables: &FamilyTables<A>) {
        let (frontends, backends) = tables.sockets.sizes();
        self.metrics.programmed(A::MAPS.family, frontends, backends);
        self.metrics.map_fill(
            A::MAPS.services,
            tables.sockets.service_entries(),
            self.sizes.services,
        );
        self.metrics
            .map_fill(A::MAPS.backends, backends, self.sizes.backends);
    }

    /// Each problem is logged once, not again with every unrelated edit.
    fn log_problems(&mut self) {
        let problems = self.model.problems();
        for problem in problems.difference(&self.reported) {
            warn!("{problem}; skipped");
        }
        self.reported = problems;
    }
}
