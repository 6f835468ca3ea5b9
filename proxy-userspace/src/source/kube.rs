//! Services, EndpointSlices and the agent's own Node from the Kubernetes API.
//!
//! Three kube-runtime watchers (list, then watch from the list's
//! resourceVersion; relist after `410 Gone`), each with the default backoff,
//! feed one task that keeps the slim objects it has sent and reports only
//! differences:
//! - a listing (the first, or a relist) is sent in batches of up to 500
//!   objects, and with its last batch the deletions for objects it had
//!   before and did not list again;
//!   objects that did not change are not sent, so a relist after a restarted
//!   API server costs what actually changed while it was away;
//! - `Synced { complete: true }` waits for the first listing of all three
//!   watchers, because a partial view would delete live Services;
//! - a failing watcher is reported with `Status(Some(..))` and `Status(None)`
//!   once it works again. A watcher that recovers silently (its watch is
//!   simply accepted again) says nothing, so while one fails, a cheap probe
//!   (a list of one object) tells when the API server answers again.
//!
//! API objects are converted into the model's slim objects as they arrive
//! and dropped at once; lists are paged, so at most one page of full objects
//! is held at a time.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{Hash, Hasher as _},
    path::Path,
    pin::pin,
    time::Duration,
};

use ::kube::{
    Api, Client, Config,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, watcher},
    },
};
use futures::{StreamExt as _, stream};
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
        let services = watcher(Api::<Service>::all(self.client.clone()), config.clone())
            .default_backoff()
            .map(|event| Update::Service(Box::new(event)));
        let slices = watcher(Api::<EndpointSlice>::all(self.client.clone()), config)
            .default_backoff()
            .map(|event| Update::EndpointSlice(Box::new(event)));
        let nodes = watcher(Api::<Node>::all(self.client.clone()), node_config)
            .default_backoff()
            .map(|event| Update::Node(Box::new(event)));
        let mut updates = pin!(stream::select(services, stream::select(slices, nodes)));
        let mut state = State::new(sink);
        loop {
            let probing = state.failing();
            tokio::select! {
                update = updates.next() => {
                    // The watchers retry forever, so their streams never end.
                    let Some(update) = update else { return };
                    if !state.update(update) {
                        debug!("the agent stopped listening; the Kubernetes source stops");
                        return;
                    }
                }
                () = tokio::time::sleep(PROBE_INTERVAL), if probing => {
                    if !state.probe(&self.client, &self.node_name).await {
                        return;
                    }
                }
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

/// One watcher's event, tagged with its kind (boxed: a Node is three
/// times the size of a Service).
enum Update {
    Service(Box<Result<watcher::Event<Service>, watcher::Error>>),
    EndpointSlice(Box<Result<watcher::Event<EndpointSlice>, watcher::Error>>),
    Node(Box<Result<watcher::Event<Node>, watcher::Error>>),
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

    fn follower_error(&mut self, watch: Watch) -> &mut Option<String> {
        match watch {
            Watch::Services => &mut self.services.error,
            Watch::EndpointSlices => &mut self.slices.error,
            Watch::Node => &mut self.node.error,
        }
    }

    fn set_error(&mut self, watch: Watch, error: Option<String>) {
        let slot = self.follower_error(watch);
        match (&*slot, &error) {
            (None, Some(message)) => warn!("{message}; retrying"),
            (Some(_), None) => info!("{} works again", watch.describe()),
            _ => {}
        }
        *slot = error;
    }

    fn failing(&self) -> bool {
        [&self.services.error, &self.slices.error, &self.node.error]
            .iter()
            .any(|e| e.is_some())
    }

    /// Sends the overall status if it changed; `false` once the agent
    /// stopped listening.
    fn send_status(&mut self) -> bool {
        let status = [&self.services.error, &self.slices.error, &self.node.error]
            .into_iter()
            .find_map(Clone::clone);
        if status == self.status {
            return true;
        }
        self.status.clone_from(&status);
        self.sink.send(SourceEvent::Status(status))
    }

    /// Asks the API server for one object of each failing kind; one that
    /// answers clears its watcher's error.
    async fn probe(&mut self, client: &Client, node_name: &str) -> bool {
        let params = ListParams::default().limit(1);
        for watch in [Watch::Services, Watch::EndpointSlices, Watch::Node] {
            if self.follower_error(watch).is_none() {
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
                Ok(()) => self.set_error(watch, None),
                Err(error) => debug!(?watch, error, "probe failed"),
            }
        }
        self.send_status()
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
    error: Option<String>,
}

impl<T: Hash> Follower<T> {
    fn new(change: fn(ObjectName, Option<T>) -> Change) -> Self {
        Self {
            known: HashMap::new(),
            listed: None,
            dirty: BTreeMap::new(),
            change,
            synced: false,
            error: None,
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
