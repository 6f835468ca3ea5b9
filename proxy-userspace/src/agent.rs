//! The agent's loop: source events in, map writes out.
//!
//! Level-triggered and incremental: events update the model's objects, the
//! model recomputes the Services they touched, and the writer applies the
//! frontends that changed. Nothing is written before the source's view is
//! complete, bursts of events are coalesced into one apply (and spaced by
//! `--min-sync-period`), and frontends whose write failed are retried on a
//! timer with backoff, not only when the source next changes.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use proxy_common::{Backend, COUNTED_BY_SOCKETS, COUNTED_BY_TC, ServiceKey, ServiceValue};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc::UnboundedReceiver,
    time::sleep_until,
};
use tracing::{info, warn};

use crate::{
    datapath::{Counts, Datapath, DatapathError, MapSizes, Pins, ProgramSettings, SizedTable},
    devices::{self, DeviceWatch},
    health::{Health, HealthEndpoints, SharedHealth},
    listener::{Connections, HEALTHZ_CONNECTIONS, METRICS_CONNECTIONS, Responder},
    metrics::Metrics,
    model::{DesiredState, L4Addr, Model, ModelConfig, Problem},
    reconcile::{Desired, Reconciler, Scope, iptables::Masquerade},
    service_health::ServiceHealthServers,
    source::{Change, EventSink, Source, SourceError, SourceEvent},
    stale_sockets::{Departure, StaleSockets, Termination, Translations},
    writer::MapWriter,
};

/// The first retry of a failed write comes after this, then twice as long
/// each time, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Syncs closer together than this are a burst, and are coalesced.
const BURST_WINDOW: Duration = Duration::from_millis(20);

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
    /// `--cluster-cidr`, its IPv4 range.
    pub cluster_cidr: Option<crate::model::Cidr>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// Whether the masquerade fallback is kept.
    pub install_iptables_rules: bool,
    /// How often the masquerade rules and the devices are looked at.
    pub iptables_sync_period: Duration,
    /// `--devices`.
    pub devices: Vec<String>,
    /// `--tcx` and `--trace`.
    pub programs: ProgramOptions,
    /// `--terminate-udp`, `--terminate-tcp`.
    pub termination: Termination,
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

type Writer = MapWriter<SizedTable<ServiceKey, ServiceValue>, SizedTable<u32, Backend>>;

struct Loop {
    model: Model,
    writer: Writer,
    /// The tc programs' frontends, written by a writer of their own.
    external_writer: Writer,
    /// The model's outside frontends as the tc maps hold them, kept up to
    /// date with the model's changes (not rebuilt each sync).
    external_desired: DesiredState,
    /// Outside frontends changed since the last apply, or whose write
    /// failed.
    external_pending: BTreeSet<L4Addr>,
    datapath: Datapath,
    /// Whether the programs are attached yet; devices wait for that.
    attached: bool,
    /// Devices chosen but not yet attached to.
    devices_wanted: Option<BTreeSet<String>>,
    /// Every interface of the namespace, as last read: where clsact
    /// filters may have to be taken off.
    interface_names: Vec<String>,
    view: View,
    /// The view that the maps were last fully reconciled against.
    reconciled: Option<View>,
    /// Frontends changed since the last apply, or whose write failed.
    pending: BTreeSet<L4Addr>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
    reported: BTreeSet<Problem>,
    health: SharedHealth,
    metrics: Metrics,
    sizes: MapSizes,
    /// When the EndpointSlice changes waiting to be applied were made.
    triggers: Vec<SystemTime>,
    /// `None` with `--install-iptables-rules=false`.
    masquerade: Option<Masquerade>,
    devices: DeviceWatch,
    service_health: ServiceHealthServers,
    /// `None` with `--terminate-udp=false` and `--terminate-tcp=false`.
    stale_sockets: Option<StaleSockets>,
    /// The per-slot counts, whose entries go with their slots.
    counts: Option<Counts>,
}

/// Loads and attaches the datapath, then follows `source` until SIGTERM or
/// SIGINT. The pinned datapath keeps serving after the agent exits.
pub async fn run(config: AgentConfig, source: Box<dyn Source>) -> Result<(), AgentError> {
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;

    let (mut datapath, writer, external_writer) = load(&config)?;
    if config.programs.trace {
        follow_trace(&mut datapath)?;
    }
    let counts = datapath
        .take_counts()
        .inspect_err(|error| warn!(error = %crate::report::chain(error), "the per-slot counts are not kept tidy"))
        .ok();

    let health = Health::shared(config.health_stale_after);
    let metrics = Metrics::new(config.pins.clone());
    serve_endpoints(&config, &health, &metrics).await?;

    let (sink, mut events) = EventSink::channel();
    source.start(sink)?;
    let mut state = Loop {
        model: Model::new(config.model.clone()),
        writer,
        external_writer,
        external_desired: DesiredState::default(),
        external_pending: BTreeSet::new(),
        datapath,
        attached: false,
        devices_wanted: None,
        interface_names: Vec::new(),
        view: View::Partial,
        reconciled: None,
        pending: BTreeSet::new(),
        retry_at: None,
        retry_delay: RETRY_FIRST,
        reported: BTreeSet::new(),
        health: health.clone(),
        metrics,
        sizes: config.sizes,
        triggers: Vec::new(),
        masquerade: config
            .install_iptables_rules
            .then(|| Masquerade::new(config.masquerade_bit)),
        devices: DeviceWatch::new(config.devices.clone()),
        service_health: ServiceHealthServers::new(health.clone()),
        stale_sockets: start_stale_sockets(&config),
        counts,
    };
    // Before the first sync, so that it already has the node's addresses
    // (a second sync just for them would be wasted).
    state.housekeeping();
    let mut housekeeping = housekeeping_timer(config.iptables_sync_period);
    let mut last_sync: Option<Instant> = None;
    // A sync held back by --min-sync-period, and when it is due.
    let mut deferred: Option<Instant> = None;
    loop {
        let wake = [state.retry_at, deferred].into_iter().flatten().min();
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
                if state.retry_at.is_some_and(|at| at <= now) {
                    state.retry_at = None;
                }
            }
            _ = housekeeping.tick() => state.housekeeping(),
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
        if !state.attached {
            state.datapath.attach(&config.cgroup)?;
            state.attached = true;
            // The devices follow the NodePort addresses, which the first
            // sync has just computed: choose them now, not a period later.
            state.housekeeping();
            health
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_attached();
            info!("datapath ready");
        }
    }
}

/// Loads the datapath and adopts its pinned maps: the socket programs'
/// frontends and the tc programs', each with a writer of its own.
fn load(config: &AgentConfig) -> Result<(Datapath, Writer, Writer), AgentError> {
    let mut datapath = Datapath::load(
        config.pins.clone(),
        config.sizes,
        ProgramSettings {
            masquerade_mark: 1 << config.masquerade_bit,
            cluster_cidr: config.cluster_cidr,
            masquerade_all: config.masquerade_all,
            trace: config.programs.trace,
        },
    )?;
    let maps = datapath.take_service_maps()?;
    let writer = MapWriter::adopt(maps.services, maps.backends).map_err(AgentError::Adopt)?;
    let maps = datapath.take_external_maps()?;
    let external_writer =
        MapWriter::adopt(maps.services, maps.backends).map_err(AgentError::Adopt)?;
    datapath.set_tcx(config.programs.tcx);
    let (frontends, backends) = writer.sizes();
    let (external, _) = external_writer.sizes();
    info!(frontends, backends, external, "adopted the pinned maps");
    Ok((datapath, writer, external_writer))
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

/// The backends the maps give each changed frontend that `desired` no
/// longer does, with the frontend.
fn departures(
    writer: &Writer,
    desired: &DesiredState,
    changed: &BTreeSet<L4Addr>,
) -> Vec<(L4Addr, Departure)> {
    let mut out = Vec::new();
    for frontend in changed {
        let staying: BTreeSet<Backend> = desired
            .frontends
            .get(frontend)
            .map(|f| f.backends.iter().map(|b| b.backend()).collect())
            .unwrap_or_default();
        for backend in writer.backends_of(*frontend) {
            if !staying.contains(&backend) {
                out.push((
                    *frontend,
                    Departure {
                        frontend: (frontend.ip, frontend.port),
                        backend: (
                            std::net::Ipv4Addr::from(u32::from_be(backend.addr_be)),
                            u16::from_be(backend.port_be),
                        ),
                        proto: frontend.protocol.number(),
                    },
                ));
            }
        }
    }
    out
}

/// Starts /healthz, /livez and /metrics.
async fn serve_endpoints(
    config: &AgentConfig,
    health: &SharedHealth,
    metrics: &Metrics,
) -> Result<(), AgentError> {
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
        crate::listener::serve(what, address, responder, Connections::new(connections))
            .await
            .map_err(|source| AgentError::Listen {
                what,
                address,
                source,
            })?;
    }

    Ok(())
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
                for change in changes {
                    match &change {
                        Change::EndpointSlice(_, Some(slice)) => {
                            if let Some(time) = slice
                                .object
                                .trigger_time
                                .as_deref()
                                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                                .and_then(|t| u64::try_from(t.as_millisecond()).ok())
                            {
                                self.triggers
                                    .push(SystemTime::UNIX_EPOCH + Duration::from_millis(time));
                            }
                        }
                        Change::Node(node) => self
                            .health()
                            .node_deleting(node.as_ref().is_some_and(|n| n.deleting)),
                        _ => {}
                    }
                    self.model.apply(change);
                }
                self.health().pending();
            }
            SourceEvent::Synced { complete } => {
                self.view = if complete {
                    View::Complete
                } else {
                    View::Incomplete
                };
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

    /// Checks the masquerade rules, and the node's interfaces and
    /// addresses: NodePorts follow the addresses, the devices both.
    fn housekeeping(&mut self) {
        if let Some(masquerade) = &mut self.masquerade {
            masquerade.apply(&Desired {
                services: self.model.desired(),
                scope: Scope::All { prune: false },
            });
        }
        match devices::read() {
            Ok(interfaces) => {
                self.model
                    .set_host_addresses(devices::host_addresses(&interfaces));
                // Devices follow the NodePort addresses as last computed;
                // an address change is seen one period later at worst.
                if let Some(devices) = self
                    .devices
                    .update(&interfaces, &self.model.external().node_addresses)
                {
                    self.devices_wanted = Some(devices.clone());
                }
                self.interface_names = interfaces.into_iter().map(|i| i.name).collect();
                self.attach_devices();
            }
            Err(error) => {
                warn!(error = %crate::report::chain(&error), "cannot read the interfaces");
            }
        }
    }

    /// Attaches the tc programs to the devices last chosen, once the maps
    /// are filled and the cgroup programs attached.
    fn attach_devices(&mut self) {
        if self.attached
            && let Some(devices) = self.devices_wanted.take()
        {
            self.datapath
                .attach_devices(&devices, &self.interface_names);
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings the maps up to date; `false` when there was nothing to do.
    fn sync(&mut self) -> bool {
        let retrying = self.retry_at.is_none()
            && !(self.pending.is_empty() && self.external_pending.is_empty());
        let full = self.reconciled != Some(self.view);
        if !self.model.is_dirty() && !full && !retrying {
            return false;
        }
        let started = Instant::now();
        let changed = self.model.recompute();
        self.log_problems();
        self.pending.extend(changed);
        for addr in self.model.take_external_changes() {
            match self.model.external().frontends.get(&addr) {
                Some(frontend) => self
                    .external_desired
                    .frontends
                    .insert(addr, frontend.desired()),
                None => self.external_desired.frontends.remove(&addr),
            };
            self.external_pending.insert(addr);
        }
        self.service_health
            .update(&self.model.external().health_checks);
        let scope = if full {
            // The first complete view (and each change of completeness)
            // reconciles everything the pins hold; later views only what
            // changed.
            let prune = self.view == View::Complete;
            self.reconciled = Some(self.view);
            if !prune {
                warn!(
                    "some input could not be read: frontends in the maps that no object claims are kept until it can"
                );
            }
            Scope::All { prune }
        } else {
            Scope::Changed(&self.pending)
        };
        let desired = Desired {
            services: self.model.desired(),
            scope,
        };
        let departures = match (&self.stale_sockets, &desired.scope) {
            (Some(_), Scope::Changed(changed)) => {
                departures(&self.writer, desired.services, changed)
            }
            _ => Vec::new(),
        };
        let mut stats = Reconciler::apply(&mut self.writer, &desired);
        self.end_stale_sockets(departures, &stats.failed);
        let external_scope = match desired.scope {
            Scope::All { prune } => Scope::All { prune },
            Scope::Changed(_) => Scope::Changed(&self.external_pending),
        };
        let external_stats = Reconciler::apply(
            &mut self.external_writer,
            &Desired {
                services: &self.external_desired,
                scope: external_scope,
            },
        );
        self.forget_counts();
        stats.changes += external_stats.changes;
        stats.other_failures += external_stats.other_failures;
        let external_failed = external_stats.failed;
        info!(
            frontends = self.model.desired().frontends.len(),
            external = self.external_desired.frontends.len(),
            changed = self.pending.len(),
            changes = stats.changes,
            failures = stats.failures() + external_failed.len(),
            took_us = started.elapsed().as_micros(),
            "applied"
        );
        self.observe_sync(started.elapsed());
        if stats.failures() == 0 && external_failed.is_empty() {
            let now = SystemTime::now();
            for trigger in self.triggers.drain(..) {
                if let Ok(latency) = now.duration_since(trigger) {
                    self.metrics.observe_programming(latency);
                }
            }
            self.health().synced();
            self.retry_delay = RETRY_FIRST;
            self.retry_at = None;
        } else {
            self.metrics.sync_error("map_write", stats.failures());
            warn!(
                failed = stats.failed.len(),
                retry_in_ms = self.retry_delay.as_millis(),
                "some writes failed; retrying"
            );
            self.retry_at = Some(Instant::now() + self.retry_delay);
            self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        }
        self.pending = stats.failed;
        self.external_pending = external_failed;
        // Failures that are not tied to a frontend are retried by a full
        // pass.
        if stats.other_failures > 0 {
            self.reconciled = None;
        }
        true
    }

    /// Sockets translated to the backends that left (from frontends that
    /// were written as desired) are ended, off the loop's thread.
    fn end_stale_sockets(&self, departures: Vec<(L4Addr, Departure)>, failed: &BTreeSet<L4Addr>) {
        if let Some(stale_sockets) = &self.stale_sockets {
            stale_sockets.backends_left(
                departures
                    .into_iter()
                    .filter(|(frontend, _)| !failed.contains(frontend))
                    .map(|(_, departure)| departure)
                    .collect(),
            );
        }
    }

    /// The counts of slots that went (or got another backend) end with
    /// them. A socket-map slot's ClusterIP may have been counted by the tc
    /// programs too (traffic from outside). The socket map's NodePorts,
    /// externalIPs and load-balancer IPs (for the node's own sockets) are
    /// frontends of the tc map as well, under the same keys but with slots
    /// of their own: the tc programs' counts of those are the tc map's, and
    /// end only with its slots.
    fn forget_counts(&mut self) {
        let Some(counts) = &mut self.counts else {
            return;
        };
        let mut gone: Vec<(ServiceKey, u8)> = Vec::new();
        for slot in self.writer.take_slots_gone() {
            gone.push((slot, COUNTED_BY_SOCKETS));
            if !self.external_writer.holds_frontend(slot) {
                gone.push((slot, COUNTED_BY_TC));
            }
        }
        for slot in self.external_writer.take_slots_gone() {
            gone.push((slot, COUNTED_BY_TC));
        }
        for (slot, scope) in gone {
            // Most slots of a scope were never counted: no entry.
            let _ = counts.remove(&ServiceKey { scope, ..slot });
        }
    }

    fn observe_sync(&self, took: Duration) {
        self.metrics.observe_sync(took);
        let (frontends, backends) = self.writer.sizes();
        self.metrics.programmed(frontends, backends);
        self.metrics.map_fill(
            proxy_common::SERVICES_MAP,
            self.writer.service_entries(),
            self.sizes.services,
        );
        self.metrics
            .map_fill(proxy_common::BACKENDS_MAP, backends, self.sizes.backends);
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
