//! Services, EndpointSlices and the agent's own Node from the Kubernetes API.
//!
//! Three kube-runtime watchers (list, then watch from the list's
//! resourceVersion; relist after `410 Gone`) feed one task that keeps the
//! slim objects it has sent and reports only differences:
//! - a listing (the first, or a relist) is sent in batches of up to 500
//!   objects, and with its last batch the deletions for objects it had
//!   before and did not list again;
//!   objects that did not change are not sent, so a relist after a restarted
//!   API server costs what actually changed while it was away;
//! - `Synced { complete: true }` waits for the first listing of all three
//!   watchers, because a partial view would delete live Services;
//! - a failing watcher is reported with `Status(Some(..))`, and
//!   `Status(None)` comes only once every watcher works again (see
//!   [`WatchHealth`] for how a silently resumed watch is told to work).
//!
//! The task drives each watcher itself, with its own back-off (client-go's:
//! 800 ms doubling to 30 s, with jitter; reset by any event but `Init`, and
//! by a `410 Gone`, which is an answer). kube's `default_backoff()` is not
//! used: a watch resumed from a resourceVersion yields no event, so over a
//! storm of short outages its back-off only grew, and a watcher slept up to
//! a minute after the API server was back, missing what changed meanwhile.
//! While a watcher fails, a cheap probe (a list of one object, every 2 s)
//! tells when the API server answers again, and an answer cuts that
//! watcher's back-off short: a down server gets few requests, and a server
//! that is back is watched again at once.
//!
//! API objects are converted into the model's slim objects as they arrive
//! and dropped at once; lists are paged, so at most one page of full objects
//! is held at a time.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{Hash, Hasher as _},
    path::Path,
    pin::Pin,
    time::Duration,
};

use ::kube::{
    Api, Client, Config,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        utils::Backoff as _,
        watcher::{self, DefaultBackoff, watcher},
    },
};
use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tracing::{debug, info, warn};

use super::{
    Change, EventSink, NodeObject, ObjectName, ServiceObject, SliceObject, Source, SourceError,
    SourceEvent, Sourced,
};

/// `Sourced::origin` of every object from the API server.
pub const ORIGIN: &str = "api-server";
/// client-go's page size.
const DEFAULT_PAGE_SIZE: u32 = 500;
/// Objects a listing holds before sending them on.
const SEND_WHILE_LISTING: usize = 500;
/// How often a failing watcher's API is probed for recovery.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a watcher resumed after an answered probe must go without
/// failing to count as working; see [`WatchHealth`].
const RESUME_GRACE: Duration = Duration::from_secs(1);
/// A `410 Gone` this soon after the last one is retried after a back-off,
/// not at once.
const GONE_AGAIN: Duration = Duration::from_secs(10);

/// Follows the API server that a kubeconfig (or the in-cluster config)
/// names.
pub struct KubeSource {
    client: Client,
    node_name: String,
    page_size: u32,
}

impl KubeSource {
    /// A client for the API server of `kubeconfig`, or else of the
    /// in-cluster config (the pod's service account), or else of the
    /// default kubeconfig (`$KUBECONFIG`, `~/.kube/config`). Nothing is
    /// requested yet: an unreachable server is reported once started.
    pub async fn new(kubeconfig: Option<&Path>, node_name: &str) -> Result<Self, SourceError> {
        let config = load_config(kubeconfig).await?;
        let client = Client::try_from(config)
            .map_err(|e| SourceError::Kube(one_line("cannot make a Kubernetes client", &e)))?;
        Ok(Self {
            client,
            node_name: node_name.to_owned(),
            page_size: DEFAULT_PAGE_SIZE,
        })
    }

    /// Objects per list request (default 500).
    #[must_use]
    #[cfg(test)]
    pub fn with_page_size(mut self, page_size: u32) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    /// The client, for `doctor`'s own requests to the same API server.
    #[must_use]
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    async fn run(self, sink: EventSink) {
        let config = watcher::Config::default().page_size(self.page_size);
        let node_config = config
            .clone()
            .fields(&format!("metadata.name={}", self.node_name));
        let mut services = Watcher::new(Api::<Service>::all(self.client.clone()), config.clone());
        let mut slices = Watcher::new(Api::<EndpointSlice>::all(self.client.clone()), config);
        let mut node = Watcher::new(Api::<Node>::all(self.client.clone()), node_config);
        let mut probes = tokio::time::interval(PROBE_INTERVAL);
        probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state = State::new(sink);
        loop {
            let probing = state.failing();
            let settles = state.settles_at();
            let update = tokio::select! {
                step = services.next() => step.map(Update::Service, Watch::Services),
                step = slices.next() => step.map(Update::EndpointSlice, Watch::EndpointSlices),
                step = node.next() => step.map(Update::Node, Watch::Node),
                _ = probes.tick(), if probing => {
                    for watch in state.probe(&self.client, &self.node_name).await {
                        // The API server answers: a back-off only spares a
                        // server that does not.
                        match watch {
                            Watch::Services => services.cut_back_off_short(),
                            Watch::EndpointSlices => slices.cut_back_off_short(),
                            Watch::Node => node.cut_back_off_short(),
                        }
                    }
                    Update::Settle
                }
                () = sleep_until_some(settles), if settles.is_some() => Update::Settle,
            };
            if !state.update(update) {
                debug!("the agent stopped listening; the Kubernetes source stops");
                return;
            }
        }
    }
}

impl Source for KubeSource {
    fn start(self: Box<Self>, sink: EventSink) -> Result<(), SourceError> {
        tokio::runtime::Handle::try_current()
            .map_err(|e| SourceError::Kube(one_line("not inside the agent's runtime", &e)))?;
        tokio::spawn(self.run(sink));
        Ok(())
    }
}

async fn load_config(kubeconfig: Option<&Path>) -> Result<Config, SourceError> {
    let options = KubeConfigOptions::default();
    if let Some(path) = kubeconfig {
        let what = format!("cannot use the kubeconfig {}", path.display());
        let file =
            Kubeconfig::read_from(path).map_err(|e| SourceError::Kube(one_line(&what, &e)))?;
        return Config::from_custom_kubeconfig(file, &options)
            .await
            .map_err(|e| SourceError::Kube(one_line(&what, &e)));
    }
    match Config::incluster() {
        Ok(config) => Ok(config),
        Err(in_cluster) => Config::from_kubeconfig(&options).await.map_err(|e| {
            let in_cluster = one_line("no in-cluster config", &in_cluster);
            SourceError::Kube(one_line(&format!("{in_cluster}; and no kubeconfig"), &e))
        }),
    }
}

/// What the source's loop has to take in, tagged with the watcher's kind
/// (boxed: a Node is three times the size of a Service).
enum Update {
    Service(Box<Result<watcher::Event<Service>, watcher::Error>>),
    EndpointSlice(Box<Result<watcher::Event<EndpointSlice>, watcher::Error>>),
    Node(Box<Result<watcher::Event<Node>, watcher::Error>>),
    /// The watcher is back from its back-off and asks the API server again.
    Resumed(Watch),
    /// Time passed, or a probe answered: a silent watcher may have
    /// settled.
    Settle,
}

/// One kube-runtime watcher and its back-off, driven here rather than by
/// kube's `StreamBackoff`: that one resets its back-off only on an event,
/// and a watch resumed from a resourceVersion is accepted silently, so
/// after a few outages of a quiet cluster the back-off had grown to its
/// cap (30 s, up to 60 s with jitter) and a watcher slept that long after
/// the API server answered again. Here a probe that gets an answer cuts
/// the back-off short.
struct Watcher<K> {
    stream: BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
    /// client-go's: 800 ms doubling to 30 s, with jitter.
    back_off: DefaultBackoff,
    /// While backing off, when the watcher asks the API server again.
    asleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last `410 Gone`.
    last_gone: Option<tokio::time::Instant>,
}

/// What a [`Watcher`] did next.
enum Step<K> {
    Event(Result<watcher::Event<K>, watcher::Error>),
    /// Back from a back-off.
    Resumed,
}

impl<K> Step<K> {
    fn map(
        self,
        update: fn(Box<Result<watcher::Event<K>, watcher::Error>>) -> Update,
        watch: Watch,
    ) -> Update {
        match self {
            Self::Event(event) => update(Box::new(event)),
            Self::Resumed => Update::Resumed(watch),
        }
    }
}

impl<K> Watcher<K>
where
    K: ::kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    fn new(api: Api<K>, config: watcher::Config) -> Self {
        Self {
            stream: watcher(api, config).boxed(),
            back_off: DefaultBackoff::default(),
            asleep: None,
            last_gone: None,
        }
    }

    /// The next event, or the end of a back-off. Cancel-safe: the back-off
    /// is kept here, and a watcher stream loses nothing to a dropped
    /// `next`.
    async fn next(&mut self) -> Step<K> {
        if let Some(asleep) = &mut self.asleep {
            asleep.await;
            self.asleep = None;
            return Step::Resumed;
        }
        // kube's watchers retry for ever; their streams never end.
        let Some(event) = self.stream.next().await else {
            return std::future::pending().await;
        };
        match &event {
            // `Init` comes before the list request, so it proves nothing.
            Ok(watcher::Event::Init) => {}
            Ok(_) => self.back_off.reset(),
            // The API server answered, and the watcher lists again at
            // once, which is the recovery: no back-off, unless it answers
            // 410 again and again, which a relist should have ended.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                let now = tokio::time::Instant::now();
                self.back_off.reset();
                if self
                    .last_gone
                    .is_some_and(|gone| now.duration_since(gone) < GONE_AGAIN)
                {
                    self.back_off();
                }
                self.last_gone = Some(now);
            }
            Err(_) => self.back_off(),
        }
        Step::Event(event)
    }

    fn back_off(&mut self) {
        // `DefaultBackoff` never gives up.
        let delay = self.back_off.next().unwrap_or(PROBE_INTERVAL);
        self.asleep = Some(Box::pin(tokio::time::sleep(delay)));
    }

    /// Ends the back-off now, if there is one.
    fn cut_back_off_short(&mut self) {
        if let Some(asleep) = &mut self.asleep {
            asleep.as_mut().reset(tokio::time::Instant::now());
        }
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Which watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    Services,
    EndpointSlices,
    Node,
}

/// What the source has sent, per watcher, and what it still owes the agent.
struct State {
    sink: EventSink,
    services: Follower<ServiceObject>,
    slices: Follower<SliceObject>,
    node: Follower<NodeObject>,
    synced: bool,
    status: Option<String>,
}

impl State {
    fn new(sink: EventSink) -> Self {
        Self {
            sink,
            services: Follower::new(|name, object| Change::Service(name, object.map(sourced))),
            slices: Follower::new(|name, object| Change::EndpointSlice(name, object.map(sourced))),
            node: Follower::new(|_, object| Change::Node(object)),
            synced: false,
            status: None,
        }
    }

    /// Takes one watcher event in; `false` once the agent stopped listening.
    fn update(&mut self, update: Update) -> bool {
        let (watch, outcome) = match update {
            Update::Service(event) => (
                Watch::Services,
                (*event).map(|e| {
                    self.services
                        .event(e, |s| (ObjectName::of(&s.metadata), ServiceObject::from(s)))
                }),
            ),
            Update::EndpointSlice(event) => (
                Watch::EndpointSlices,
                (*event).map(|e| {
                    self.slices
                        .event(e, |s| (ObjectName::of(&s.metadata), SliceObject::from(s)))
                }),
            ),
            Update::Node(event) => (
                Watch::Node,
                (*event).map(|e| {
                    self.node
                        .event(e, |n| (ObjectName::of(&n.metadata), NodeObject::from(n)))
                }),
            ),
            Update::Resumed(watch) => {
                self.health(watch).resumed();
                return self.send_status();
            }
            Update::Settle => {
                let now = tokio::time::Instant::now();
                for watch in Watch::ALL {
                    if self.health(watch).settles_at().is_some_and(|at| at <= now) {
                        debug!(?watch, "resumed after an answered probe and quiet since");
                        self.set_error(watch, None);
                    }
                }
                return self.send_status();
            }
        };
        match outcome {
            Ok(Outcome { changes, healthy }) => {
                if healthy {
                    self.set_error(watch, None);
                }
                if !changes.is_empty() && !self.sink.send(SourceEvent::Changes(changes)) {
                    return false;
                }
                if !self.synced && self.services.synced && self.slices.synced && self.node.synced {
                    self.synced = true;
                    info!("the Kubernetes API view is complete");
                    if !self.sink.send(SourceEvent::Synced { complete: true }) {
                        return false;
                    }
                }
            }
            // A compacted history: the watcher relists at once, and the
            // relist is the recovery, not a failure to report.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                debug!(?watch, "watch expired (410 Gone); listing again");
            }
            Err(error) => {
                let message = one_line(watch.describe(), &error);
                self.set_error(watch, Some(message));
            }
        }
        self.send_status()
    }

    fn health(&mut self, watch: Watch) -> &mut WatchHealth {
        match watch {
            Watch::Services => &mut self.services.health,
            Watch::EndpointSlices => &mut self.slices.health,
            Watch::Node => &mut self.node.health,
        }
    }

    fn healths(&self) -> [&WatchHealth; 3] {
        [
            &self.services.health,
            &self.slices.health,
            &self.node.health,
        ]
    }

    fn set_error(&mut self, watch: Watch, error: Option<String>) {
        let health = self.health(watch);
        match (&health.error, &error) {
            (None, Some(message)) => warn!("{message}; retrying"),
            (Some(_), None) => info!("{} works again", watch.describe()),
            _ => {}
        }
        *health = WatchHealth {
            error,
            ..WatchHealth::default()
        };
    }

    fn failing(&self) -> bool {
        self.healths().iter().any(|h| h.error.is_some())
    }

    /// When the next silent watcher may be taken to work again.
    fn settles_at(&self) -> Option<tokio::time::Instant> {
        self.healths().iter().filter_map(|h| h.settles_at()).min()
    }

    /// Sends the overall status if it changed; `false` once the agent
    /// stopped listening.
    fn send_status(&mut self) -> bool {
        let status = self.healths().iter().find_map(|h| h.error.clone());
        if status == self.status {
            return true;
        }
        if status.is_none() {
            info!("the Kubernetes API works again: every watcher streams");
        }
        self.status.clone_from(&status);
        self.sink.send(SourceEvent::Status(status))
    }

    /// Asks the API server for one object of each failing kind, and
    /// returns the kinds it answered for. An answer does not clear the
    /// watcher's error: only the watcher itself can tell that it works.
    async fn probe(&mut self, client: &Client, node_name: &str) -> Vec<Watch> {
        let params = ListParams::default().limit(1);
        let mut answered = Vec::new();
        for watch in Watch::ALL {
            if self.health(watch).error.is_none() {
                continue;
            }
            let answer = match watch {
                Watch::Services => probe(Api::<Service>::all(client.clone()), params.clone()).await,
                Watch::EndpointSlices => {
                    probe(Api::<EndpointSlice>::all(client.clone()), params.clone()).await
                }
                Watch::Node => {
                    let params = params.clone().fields(&format!("metadata.name={node_name}"));
                    probe(Api::<Node>::all(client.clone()), params).await
                }
            };
            match answer {
                Ok(()) => {
                    self.health(watch).answered = Some(tokio::time::Instant::now());
                    answered.push(watch);
                }
                Err(error) => debug!(?watch, error, "probe failed"),
            }
        }
        answered
    }
}

async fn probe<K>(api: Api<K>, params: ListParams) -> Result<(), String>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match tokio::time::timeout(PROBE_TIMEOUT, api.list(&params)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(one_line("list", &error)),
        Err(_) => Err("timed out".to_owned()),
    }
}

impl Watch {
    const ALL: [Self; 3] = [Self::Services, Self::EndpointSlices, Self::Node];

    fn describe(self) -> &'static str {
        match self {
            Self::Services => "watching Services",
            Self::EndpointSlices => "watching EndpointSlices",
            Self::Node => "watching the Node",
        }
    }
}

fn sourced<T>(object: T) -> Sourced<T> {
    /// One allocation for every object's origin.
    static SHARED_ORIGIN: std::sync::LazyLock<std::sync::Arc<str>> =
        std::sync::LazyLock::new(|| ORIGIN.into());
    Sourced {
        origin: SHARED_ORIGIN.clone(),
        object,
    }
}

/// What one watcher event amounts to.
struct Outcome {
    changes: Vec<Change>,
    /// The event proves the watcher works (an `Init` does not: it comes
    /// before the list request).
    healthy: bool,
}

/// One watcher's objects, as sent to the agent.
///
/// The agent keeps the objects; the source keeps only a fingerprint of each
/// (64 bits of SipHash of the slim object), enough to tell a change from a
/// repeat when a relist sends every object again. A second copy of 30,000
/// Services and their slices would double the agent's memory.
struct Follower<T> {
    known: HashMap<ObjectName, u64>,
    /// Names listed so far, while a listing is under way.
    listed: Option<HashSet<ObjectName>>,
    /// Changed but not sent yet (`None`: gone). Kept across a listing that
    /// failed half-way, so its changes are sent by the next one.
    dirty: BTreeMap<ObjectName, Option<T>>,
    change: fn(ObjectName, Option<T>) -> Change,
    /// A listing has completed.
    synced: bool,
    health: WatchHealth,
}

/// Whether a watcher works.
///
/// It does again when it yields an event other than `Init`. But a watch
/// resumed from a resourceVersion is accepted silently when nothing
/// changed, and an idle watch says nothing for minutes, so a watcher also
/// counts as working when, since its error, a probe of its kind got an
/// answer and the watcher came back from its back-off (in that order, as
/// the answer cuts the back-off short, or the other), and it has not failed
/// again for [`RESUME_GRACE`] after both: a watch request that a server
/// which answers would refuse fails well within that.
#[derive(Default)]
struct WatchHealth {
    /// The last error, until the watcher works again.
    error: Option<String>,
    /// When a probe last got an answer since the error.
    answered: Option<tokio::time::Instant>,
    /// When the watcher came back from its back-off since the error.
    resumed: Option<tokio::time::Instant>,
}

impl WatchHealth {
    fn resumed(&mut self) {
        if self.error.is_some() {
            self.resumed = Some(tokio::time::Instant::now());
        }
    }

    fn settles_at(&self) -> Option<tokio::time::Instant> {
        self.error.as_ref()?;
        Some(self.resumed?.max(self.answered?) + RESUME_GRACE)
    }
}

impl<T: Hash> Follower<T> {
    fn new(change: fn(ObjectName, Option<T>) -> Change) -> Self {
        Self {
            known: HashMap::new(),
            listed: None,
            dirty: BTreeMap::new(),
            change,
            synced: false,
            health: WatchHealth::default(),
        }
    }

    /// `slim` converts an API object; the object is dropped right after.
    fn event<K>(
        &mut self,
        event: watcher::Event<K>,
        slim: impl Fn(&K) -> (ObjectName, T),
    ) -> Outcome {
        let healthy = !matches!(event, watcher::Event::Init);
        match event {
            watcher::Event::Init => self.listed = Some(HashSet::new()),
            watcher::Event::InitApply(object) => {
                let (name, object) = slim(&object);
                if let Some(listed) = &mut self.listed {
                    listed.insert(name.clone());
                }
                self.upsert(name, object);
            }
            watcher::Event::InitDone => {
                let listed = self.listed.take().unwrap_or_default();
                let gone: Vec<ObjectName> = self
                    .known
                    .keys()
                    .filter(|name| !listed.contains(*name))
                    .cloned()
                    .collect();
                for name in gone {
                    self.known.remove(&name);
                    self.dirty.insert(name, None);
                }
                self.synced = true;
            }
            watcher::Event::Apply(object) => {
                let (name, object) = slim(&object);
                self.upsert(name, object);
            }
            watcher::Event::Delete(object) => {
                let (name, _) = slim(&object);
                if self.known.remove(&name).is_some() {
                    self.dirty.insert(name, None);
                }
            }
        }
        // A listing goes out a page's worth at a time, not whole at its
        // end: holding 30,000 slim objects here until then would add their
        // size to the agent's peak memory. That is safe: nothing is written
        // before `Synced`, only upserts come before `InitDone`, and
        // deletions of what was not listed again only at `InitDone`.
        let changes = if self.listed.is_some() && self.dirty.len() < SEND_WHILE_LISTING {
            Vec::new()
        } else {
            self.flush()
        };
        Outcome { changes, healthy }
    }

    fn upsert(&mut self, name: ObjectName, object: T) {
        let fingerprint = fingerprint(&object);
        if self.known.get(&name) != Some(&fingerprint) {
            self.known.insert(name.clone(), fingerprint);
            self.dirty.insert(name, Some(object));
        }
    }

    fn flush(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|(name, object)| (self.change)(name, object))
            .collect()
    }
}

/// SipHash with fixed keys: the same object always has the same
/// fingerprint, and two versions of one object collide with odds of 2^-64.
fn fingerprint(object: &impl Hash) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    object.hash(&mut hasher);
    hasher.finish()
}

/// An error and its causes as one line, for logs and `Status`.
fn one_line(context: &str, error: &dyn std::error::Error) -> String {
    let mut line = format!("{context}: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Many errors already print their source.
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests;
