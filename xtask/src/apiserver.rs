//! A test Kubernetes API server that speaks the real list/watch protocol.
//!
//! There is no cluster and no kube-apiserver binary where the tests run, yet
//! the agent's Kubernetes source must be tested with the real kube client
//! against the real wire protocol: paginated JSON lists carrying a
//! resourceVersion, chunked watch streams from a resourceVersion on,
//! bookmarks, and `410 Gone` for a resourceVersion older than the retained
//! history, after which a client must list again. This server does exactly
//! that for Services, EndpointSlices and Nodes, and nothing else.
//!
//! Plain std threads and hand-written HTTP/1.1 (one thread per connection):
//! the server must keep working while the test's own tokio runtime is busy
//! or blocked, and a few hundred lines are easier to trust than a framework
//! whose connection handling would hide what a restart does to the client.
//!
//! Tests drive it from Rust: [`ApiServer::start`], then
//! [`apply`](ApiServer::apply) and [`delete`](ApiServer::delete) objects,
//! [`restart`](ApiServer::restart) it (every connection dropped, history
//! compacted, so resumed watches get 410), [`stop`](ApiServer::stop) and
//! [`resume`](ApiServer::resume) it (connections refused in between, same
//! port after), make a resource [`fail`](ApiServer::fail) with an HTTP
//! status, and read [`counters`](ApiServer::counters).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::Write as _,
    fs,
    io::{self, BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// Watch events kept for resumed watches; older ones are compacted away, as
/// etcd and the watch cache do.
const HISTORY_LIMIT: usize = 100_000;
/// What the real server uses when a watch names no timeout.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_mins(30);
/// The first resourceVersion handed out: far from 0, which means "any" in
/// the protocol, so a bug that confuses the two shows.
const FIRST_REVISION: u64 = 1000;

/// The kinds this server keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Service,
    EndpointSlice,
    Node,
}

impl Resource {
    pub const ALL: [Self; 3] = [Self::Service, Self::EndpointSlice, Self::Node];

    #[must_use]
    pub fn kind(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }

    #[must_use]
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Service => "services",
            Self::EndpointSlice => "endpointslices",
            Self::Node => "nodes",
        }
    }

    fn namespaced(self) -> bool {
        self != Self::Node
    }

    fn group_prefix(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "/api/v1",
            Self::EndpointSlice => "/apis/discovery.k8s.io/v1",
        }
    }

    fn of(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.api_version() == api_version && r.kind() == kind)
    }
}

/// What a resource's clients have asked for, for assertions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// List requests, one per page.
    pub lists: u64,
    /// Watch requests, whatever their outcome.
    pub watches: u64,
    /// Lists and watches answered `410 Gone` (resourceVersion too old).
    pub expired: u64,
    /// BOOKMARK events sent.
    pub bookmarks: u64,
    /// Requests answered with the status set by [`ApiServer::fail`].
    pub failed: u64,
}

/// One change, kept for watches that resume from an older resourceVersion.
struct Record {
    revision: u64,
    resource: Resource,
    type_: &'static str,
    object: Arc<Value>,
}

type Key = (Resource, String, String);

struct State {
    /// The last resourceVersion handed out: one counter for every kind, as
    /// etcd's revision is.
    revision: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Record>,
    /// Watches from this resourceVersion or newer can be served from
    /// `history`; older ones get 410.
    oldest: u64,
    /// Bumped by `stop` and `restart`: connections of an older epoch end.
    epoch: u64,
    next_uid: u64,
    failures: HashMap<Resource, u16>,
    counters: HashMap<Resource, Counters>,
    bookmark_interval: Option<Duration>,
    connections: HashMap<u64, TcpStream>,
    next_connection: u64,
    /// Each object's JSON, made once when it is stored: lists of 30,000
    /// objects are then copies of text, not a clone and a serialization of
    /// every object on every page (the real server caches serializations
    /// for the same reason).
    rendered: HashMap<Key, Arc<str>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every change of `state`, so watches wake up.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test thread that panicked while holding the lock leaves the
        // state consistent (every update is complete before it unlocks).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The listening half: present while the server accepts connections.
struct Listening {
    stop: Arc<Mutex<bool>>,
    thread: JoinHandle<()>,
}

/// A test API server on its own threads. Dropping it stops it and removes
/// its kubeconfig.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    listening: Option<Listening>,
    kubeconfig: PathBuf,
}

impl ApiServer {
    /// Starts on 127.0.0.1 on a free port.
    pub fn start() -> Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts on `addr` (port 0 picks a free one), and writes a kubeconfig
    /// that points at it ([`kubeconfig`](Self::kubeconfig)).
    pub fn start_on(addr: SocketAddr) -> Result<Self> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                revision: FIRST_REVISION,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                oldest: FIRST_REVISION,
                epoch: 0,
                next_uid: 1,
                failures: HashMap::new(),
                counters: HashMap::new(),
                bookmark_interval: None,
                connections: HashMap::new(),
                next_connection: 0,
                rendered: HashMap::new(),
            }),
            changed: Condvar::new(),
        });
        let kubeconfig = std::env::temp_dir().join(format!(
            "ebpf-proxy-apiserver-{}-{}.kubeconfig",
            std::process::id(),
            addr.port()
        ));
        let mut server = Self {
            shared,
            addr,
            listening: None,
            kubeconfig,
        };
        server.write_kubeconfig(&server.kubeconfig.clone())?;
        server.listen(listener);
        Ok(server)
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file for this server, written at start (no auth, http).
    #[must_use]
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for this server to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: test\n  cluster:\n    server: {}\n\
             users:\n\
             - name: test\n  user: {{}}\n\
             contexts:\n\
             - name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\n",
            self.url()
        );
        fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Adds or replaces an object given as JSON (a Service, an EndpointSlice
    /// or a Node), as a server-side apply would, and returns its new
    /// resourceVersion. A missing namespace is `default`; uid and
    /// creationTimestamp are kept from the stored object, else taken from
    /// the input, else made up.
    pub fn apply(&self, object: Value) -> Result<u64> {
        let mut state = self.shared.lock();
        let revision = state.apply(object)?;
        drop(state);
        self.shared.changed.notify_all();
        Ok(revision)
    }

    /// [`apply`](Self::apply) for many objects under one lock, with one
    /// wake-up of the watches: how a benchmark loads 30,000 Services
    /// without paying a lock round and a watch wake-up per object. Watches
    /// see the objects as separate events, as they would after a burst.
    pub fn apply_all(&self, objects: impl IntoIterator<Item = Value>) -> Result<u64> {
        let mut state = self.shared.lock();
        let mut revision = state.revision;
        for object in objects {
            revision = state.apply(object)?;
        }
        drop(state);
        self.shared.changed.notify_all();
        Ok(revision)
    }

    /// [`apply`](Self::apply) for anything that serializes to a Kubernetes
    /// object, such as the k8s-openapi types.
    pub fn apply_typed<T: serde::Serialize>(&self, object: &T) -> Result<u64> {
        self.apply(serde_json::to_value(object)?)
    }

    /// [`apply`](Self::apply) for every document of a YAML (or JSON) text.
    pub fn apply_yaml(&self, text: &str) -> Result<()> {
        for value in serde_saphyr::from_multiple::<Value>(text)? {
            if !value.is_null() {
                self.apply(value)?;
            }
        }
        Ok(())
    }

    /// Deletes an object (`namespace` is ignored for Nodes); `false` when
    /// there was none.
    #[must_use = "false means there was no such object"]
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let namespace = if resource.namespaced() { namespace } else { "" };
        let key = (resource, namespace.to_owned(), name.to_owned());
        let mut state = self.shared.lock();
        state.rendered.remove(&key);
        let Some(object) = state.objects.remove(&key) else {
            return false;
        };
        // A deletion's watch event carries the object at the deletion's
        // resourceVersion, as the real server sends it.
        let mut object = (*object).clone();
        object["metadata"]["resourceVersion"] = (state.revision + 1).to_string().into();
        state.record(resource, "DELETED", Arc::new(object));
        drop(state);
        self.shared.changed.notify_all();
        true
    }

    /// The stored object, as a client would get it.
    #[must_use]
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let namespace = if resource.namespaced() { namespace } else { "" };
        let key = (resource, namespace.to_owned(), name.to_owned());
        self.shared.lock().objects.get(&key).map(|o| (**o).clone())
    }

    /// The last resourceVersion handed out.
    #[must_use]
    pub fn revision(&self) -> u64 {
        self.shared.lock().revision
    }

    /// Forgets the watch history, so that every watch resuming from an
    /// older resourceVersion (and every list continued from one) gets
    /// `410 Gone`. Open watches that have seen everything carry on.
    pub fn compact(&self) {
        let mut state = self.shared.lock();
        state.history.clear();
        state.oldest = state.revision;
        drop(state);
        self.shared.changed.notify_all();
    }

    /// What a restarted kube-apiserver looks like to its clients: every
    /// connection dropped and the history compacted, so resumed watches get
    /// 410 and the clients list again. Listens again if stopped.
    pub fn restart(&mut self) -> Result<()> {
        self.drop_connections();
        // Something else in a cluster (a Lease, an Event) always moved the
        // revision on, so no client's position survives the compaction.
        self.shared.lock().revision += 1;
        self.compact();
        self.resume()
    }

    /// Stops listening and drops every connection: connections are refused
    /// until [`resume`](Self::resume). The objects and their history stay,
    /// as if only the network had failed.
    pub fn stop(&mut self) {
        if let Some(listening) = self.listening.take() {
            *listening
                .stop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
            // Wakes the accept call; it then sees the flag and closes the socket.
            let _ = TcpStream::connect(self.addr);
            let _ = listening.thread.join();
        }
        self.drop_connections();
    }

    /// Listens again on the same address after [`stop`](Self::stop).
    pub fn resume(&mut self) -> Result<()> {
        if self.listening.is_none() {
            // std sets SO_REUSEADDR, so the port is free again at once.
            let listener = TcpListener::bind(self.addr)
                .with_context(|| format!("cannot listen on {} again", self.addr))?;
            self.listen(listener);
        }
        Ok(())
    }

    /// Answers every list and watch of `resource` with this HTTP status (a
    /// Status object, as the real server sends), or normally again (`None`).
    pub fn fail(&self, resource: Resource, status: Option<u16>) {
        let mut state = self.shared.lock();
        match status {
            Some(code) => state.failures.insert(resource, code),
            None => state.failures.remove(&resource),
        };
    }

    /// Sends a BOOKMARK on every watch that asked for them this often
    /// (default: never; the real server sends one about every minute).
    pub fn set_bookmark_interval(&self, interval: Option<Duration>) {
        self.shared.lock().bookmark_interval = interval;
        self.shared.changed.notify_all();
    }

    #[must_use]
    pub fn counters(&self, resource: Resource) -> Counters {
        self.shared
            .lock()
            .counters
            .get(&resource)
            .copied()
            .unwrap_or_default()
    }

    fn drop_connections(&self) {
        let mut state = self.shared.lock();
        state.epoch += 1;
        for (_, stream) in state.connections.drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    fn listen(&mut self, listener: TcpListener) {
        let stop = Arc::new(Mutex::new(false));
        let shared = Arc::clone(&self.shared);
        let stop_flag = Arc::clone(&stop);
        let thread = thread::spawn(move || accept_loop(&shared, &listener, &stop_flag));
        self.listening = Some(Listening { stop, thread });
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_file(&self.kubeconfig);
    }
}

impl State {
    /// [`ApiServer::apply`], with the lock held; the caller wakes the
    /// watches.
    fn apply(&mut self, object: Value) -> Result<u64> {
        let Value::Object(mut object) = object else {
            bail!("not a JSON object: {object}");
        };
        let field = |name: &str| object.get(name).and_then(Value::as_str).unwrap_or("");
        let (api_version, kind) = (field("apiVersion").to_owned(), field("kind").to_owned());
        let Some(resource) = Resource::of(&api_version, &kind) else {
            bail!("this server keeps no {api_version} {kind}");
        };
        let metadata = object
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .context("metadata is not an object")?;
        let name = metadata
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .context("the object has no metadata.name")?
            .to_owned();
        let namespace = if resource.namespaced() {
            let namespace = metadata
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned();
            metadata.insert("namespace".into(), namespace.clone().into());
            namespace
        } else {
            metadata.remove("namespace");
            String::new()
        };
        let key = (resource, namespace, name);

        let previous = self.objects.get(&key).cloned();
        let kept = |field: &str| {
            previous
                .as_ref()
                .and_then(|p| p.pointer(&format!("/metadata/{field}")))
                .cloned()
        };
        for field in ["uid", "creationTimestamp"] {
            if let Some(value) = kept(field) {
                metadata.insert(field.into(), value);
            }
        }
        if !metadata.contains_key("uid") {
            let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_uid);
            self.next_uid += 1;
            metadata.insert("uid".into(), uid.into());
        }
        if !metadata.contains_key("creationTimestamp") {
            metadata.insert("creationTimestamp".into(), now_rfc3339().into());
        }
        let revision = self.revision + 1;
        metadata.insert("resourceVersion".into(), revision.to_string().into());
        let type_ = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let object = Arc::new(Value::Object(object));
        self.rendered
            .insert(key.clone(), Arc::from(object.to_string()));
        self.objects.insert(key, Arc::clone(&object));
        self.record(resource, type_, object);
        Ok(revision)
    }

    fn record(&mut self, resource: Resource, type_: &'static str, object: Arc<Value>) {
        self.revision += 1;
        self.history.push_back(Record {
            revision: self.revision,
            resource,
            type_,
            object,
        });
        if self.history.len() > HISTORY_LIMIT
            && let Some(dropped) = self.history.pop_front()
        {
            self.oldest = dropped.revision;
        }
    }

    fn count(&mut self, resource: Resource, update: impl FnOnce(&mut Counters)) {
        update(self.counters.entry(resource).or_default());
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener, stop: &Mutex<bool>) {
    for stream in listener.incoming() {
        if *stop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            return;
        }
        let Ok(stream) = stream else { continue };
        // As Go's net/http does: without it, the last segment of every
        // response waits for the client's delayed ACK (40 ms), which
        // turns a paged list of 30,000 objects into seconds.
        let _ = stream.set_nodelay(true);
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        let mut state = shared.lock();
        let (id, epoch) = (state.next_connection, state.epoch);
        state.next_connection += 1;
        state.connections.insert(id, registered);
        drop(state);
        let shared = Arc::clone(shared);
        thread::spawn(move || {
            // An I/O error only means the client went away.
            let _ = serve_connection(&shared, stream, epoch);
            shared.lock().connections.remove(&id);
        });
    }
}

/// One parsed request line: the path and the decoded query.
struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
}

fn read_request<R: BufRead>(reader: &mut R) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let (method, target) = (method.to_owned(), target.to_owned());
    let mut content_length = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    // This server takes no bodies, but must not read one as the next request.
    io::copy(
        &mut io::Read::take(&mut *reader, content_length),
        &mut io::sink(),
    )?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_owned(),
        query,
    }))
}

fn percent_decode(text: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'+', ..) => out.push(b' '),
            (b'%', Some(high), Some(low)) if hex(high).is_some() && hex(low).is_some() => {
                let digits = hex(high).unwrap_or(0) * 16 + hex(low).unwrap_or(0);
                out.push(u8::try_from(digits).unwrap_or(b'?'));
                i += 2;
            }
            (byte, ..) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve_connection(shared: &Shared, stream: TcpStream, epoch: u64) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader)? {
        if !handle(shared, &request, &mut writer, epoch)? {
            break;
        }
    }
    Ok(())
}

/// Answers one request; `false` when the connection must close.
fn handle(shared: &Shared, request: &Request, out: &mut TcpStream, epoch: u64) -> io::Result<bool> {
    if request.method != "GET" {
        let body = status(405, "MethodNotAllowed", "this test server only serves GET");
        return respond(out, 405, &body).map(|()| true);
    }
    if request.path == "/version" {
        let body = json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-ebpf-proxy-test"});
        return respond(out, 200, &body).map(|()| true);
    }
    let Some((resource, namespace, name)) = route(&request.path) else {
        let body = status(
            404,
            "NotFound",
            &format!("the server could not find {}", request.path),
        );
        return respond(out, 404, &body).map(|()| true);
    };
    let filter = match Filter::parse(namespace, name.clone(), &request.query) {
        Ok(filter) => filter,
        Err(message) => {
            return respond(out, 400, &status(400, "BadRequest", &message)).map(|()| true);
        }
    };
    let watching = request
        .query
        .get("watch")
        .is_some_and(|w| w == "true" || w == "1");
    if watching {
        return watch(shared, resource, &filter, &request.query, out, epoch);
    }
    let (code, body) = match name {
        Some(name) => get(shared, resource, &filter, &name),
        None => return respond_text(out, list(shared, resource, &filter, &request.query)),
    };
    respond(out, code, &body).map(|()| true)
}

/// `(resource, namespace, name)` of an API path.
fn route(path: &str) -> Option<(Resource, Option<String>, Option<String>)> {
    Resource::ALL.into_iter().find_map(|resource| {
        let rest = path
            .strip_prefix(resource.group_prefix())?
            .strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        let (namespace, segments) = match segments.as_slice() {
            ["namespaces", namespace, rest @ ..] if resource.namespaced() && !rest.is_empty() => {
                (Some((*namespace).to_owned()), rest.to_vec())
            }
            _ => (None, segments),
        };
        match segments.as_slice() {
            [plural] if *plural == resource.plural() => Some((resource, namespace, None)),
            [plural, name] if *plural == resource.plural() => {
                Some((resource, namespace, Some((*name).to_owned())))
            }
            _ => None,
        }
    })
}

/// Which objects a request is about: its path and its selectors.
struct Filter {
    namespace: Option<String>,
    /// `(field, equal, value)`, from the fieldSelector and a named path.
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelRequirement>,
}

enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Filter {
    fn parse(
        namespace: Option<String>,
        name: Option<String>,
        query: &HashMap<String, String>,
    ) -> Result<Self, String> {
        let mut fields = Vec::new();
        if let Some(name) = name {
            fields.push(("metadata.name".to_owned(), true, name));
        }
        for term in query
            .get("fieldSelector")
            .into_iter()
            .flat_map(|s| s.split(','))
        {
            let (field, equal, value) = split_requirement(term)
                .ok_or_else(|| format!("unsupported field selector {term:?}"))?;
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(format!("field label not supported: {field}"));
            }
            fields.push((field.to_owned(), equal, value.to_owned()));
        }
        let mut labels = Vec::new();
        for term in query
            .get("labelSelector")
            .into_iter()
            .flat_map(|s| s.split(','))
        {
            let term = term.trim();
            labels.push(match split_requirement(term) {
                Some((key, true, value)) => LabelRequirement::Equals(key.into(), value.into()),
                Some((key, false, value)) => LabelRequirement::NotEquals(key.into(), value.into()),
                None if term.contains([' ', '(', '<', '>']) => {
                    return Err(format!("unsupported label selector {term:?}"));
                }
                None => match term.strip_prefix('!') {
                    Some(key) => LabelRequirement::Absent(key.into()),
                    None => LabelRequirement::Exists(term.into()),
                },
            });
        }
        Ok(Self {
            namespace,
            fields,
            labels,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = |field: &str| {
            object
                .pointer(&format!("/metadata/{field}"))
                .and_then(Value::as_str)
                .unwrap_or("")
        };
        let label = |key: &str| {
            object
                .pointer("/metadata/labels")
                .and_then(|l| l.get(key)?.as_str())
        };
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta("namespace") == ns)
            && self.fields.iter().all(|(field, equal, value)| {
                let actual = meta(field.trim_start_matches("metadata."));
                (actual == value) == *equal
            })
            && self.labels.iter().all(|requirement| match requirement {
                LabelRequirement::Equals(key, value) => label(key) == Some(value),
                LabelRequirement::NotEquals(key, value) => label(key) != Some(value),
                LabelRequirement::Exists(key) => label(key).is_some(),
                LabelRequirement::Absent(key) => label(key).is_none(),
            })
    }
}

/// `key=value`, `key==value` or `key!=value`.
fn split_requirement(term: &str) -> Option<(&str, bool, &str)> {
    if let Some((key, value)) = term.split_once("!=") {
        return Some((key.trim(), false, value.trim()));
    }
    let (key, value) = term.split_once('=')?;
    let value = value.strip_prefix('=').unwrap_or(value);
    Some((key.trim(), true, value.trim()))
}

fn get(shared: &Shared, resource: Resource, filter: &Filter, name: &str) -> (u16, Value) {
    let mut state = shared.lock();
    if let Some(code) = state.failures.get(&resource).copied() {
        state.count(resource, |c| c.failed += 1);
        return (code, failure(code));
    }
    let found = state
        .objects
        .range((resource, String::new(), String::new())..)
        .take_while(|((r, ..), _)| *r == resource)
        .find(|(_, object)| filter.matches(object));
    if let Some((_, object)) = found {
        (200, (**object).clone())
    } else {
        let message = format!("{} {name:?} not found", resource.plural());
        (404, status(404, "NotFound", &message))
    }
}

fn list(
    shared: &Shared,
    resource: Resource,
    filter: &Filter,
    query: &HashMap<String, String>,
) -> (u16, String) {
    let mut state = shared.lock();
    state.count(resource, |c| c.lists += 1);
    if let Some(code) = state.failures.get(&resource).copied() {
        state.count(resource, |c| c.failed += 1);
        return (code, failure(code).to_string());
    }
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    // The token names the list's resourceVersion and the last key served.
    let token = query.get("continue").filter(|c| !c.is_empty());
    let (list_revision, after) = match token {
        None => (state.revision, None),
        Some(token) => {
            let parsed = token.split_once(':').and_then(|(revision, key)| {
                let (namespace, name) = key.split_once('/')?;
                Some((revision.parse::<u64>().ok()?, namespace, name))
            });
            let Some((revision, namespace, name)) = parsed else {
                return (
                    400,
                    status(400, "BadRequest", "invalid continue token").to_string(),
                );
            };
            if revision < state.oldest {
                state.count(resource, |c| c.expired += 1);
                let message = "The provided continue parameter is too old to display a \
                    consistent list result. You can start a new list without the continue \
                    parameter.";
                return (410, status(410, "Expired", message).to_string());
            }
            (
                revision,
                Some((resource, namespace.to_owned(), name.to_owned())),
            )
        }
    };
    let start = after
        .clone()
        .unwrap_or((resource, String::new(), String::new()));
    let mut matching = state
        .objects
        .range(start..)
        .filter(|(key, _)| Some(*key) != after.as_ref())
        .take_while(|((r, ..), _)| *r == resource)
        .filter(|(_, object)| filter.matches(object));
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for (key, _) in &mut matching {
        if limit.is_some_and(|limit| items.len() == limit) {
            more = true;
            break;
        }
        items.push(Arc::clone(&state.rendered[key]));
        last = Some(key);
    }
    // Pages are cut from the current objects rather than a snapshot at the
    // list's resourceVersion: an object changed in between shows up newer,
    // and the watch from that resourceVersion replays the change, which a
    // level-triggered client takes in its stride.
    let mut metadata = json!({"resourceVersion": list_revision.to_string()});
    if more && let Some((_, namespace, name)) = last {
        metadata["continue"] = format!("{list_revision}:{namespace}/{name}").into();
    }
    let mut body = format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{metadata},\"items\":[",
        resource.kind(),
        resource.api_version(),
    );
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    (200, body)
}

/// What ends a watch loop's wait for something to send.
enum Next {
    Events(Vec<String>),
    Bookmark(u64),
    Expired(String),
    TimedOut,
    Closed,
}

fn watch(
    shared: &Shared,
    resource: Resource,
    filter: &Filter,
    query: &HashMap<String, String>,
    out: &mut TcpStream,
    epoch: u64,
) -> io::Result<bool> {
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let mut state = shared.lock();
    state.count(resource, |c| c.watches += 1);
    if let Some(code) = state.failures.get(&resource).copied() {
        state.count(resource, |c| c.failed += 1);
        drop(state);
        return respond(out, code, &failure(code)).map(|()| true);
    }
    let requested = query.get("resourceVersion").map(String::as_str);
    // No resourceVersion, or 0: the current objects as ADDED, then changes.
    let (mut position, first) = match requested {
        None | Some("" | "0") => {
            let added = state
                .objects
                .range((resource, String::new(), String::new())..)
                .take_while(|((r, ..), _)| *r == resource)
                .filter(|(_, object)| filter.matches(object))
                .map(|(_, object)| event_line("ADDED", object))
                .collect();
            (state.revision, Next::Events(added))
        }
        Some(requested) => {
            let Ok(revision) = requested.parse::<u64>() else {
                drop(state);
                let body = status(
                    400,
                    "BadRequest",
                    &format!("invalid resourceVersion {requested:?}"),
                );
                return respond(out, 400, &body).map(|()| true);
            };
            if revision < state.oldest {
                state.count(resource, |c| c.expired += 1);
                let message = format!("too old resource version: {revision} ({})", state.oldest);
                (revision, Next::Expired(message))
            } else {
                (revision, Next::Events(Vec::new()))
            }
        }
    };
    drop(state);
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    let mut next = first;
    let mut last_bookmark = Instant::now();
    loop {
        match next {
            Next::Events(lines) => {
                for line in lines {
                    write_chunk(out, line.as_bytes())?;
                }
            }
            Next::Bookmark(revision) => {
                let bookmark = json!({
                    "kind": resource.kind(),
                    "apiVersion": resource.api_version(),
                    "metadata": {"resourceVersion": revision.to_string()},
                });
                write_chunk(out, event_line("BOOKMARK", &bookmark).as_bytes())?;
                shared.lock().count(resource, |c| c.bookmarks += 1);
                last_bookmark = Instant::now();
            }
            Next::Expired(message) => {
                write_chunk(
                    out,
                    event_line("ERROR", &status(410, "Expired", &message)).as_bytes(),
                )?;
                break;
            }
            Next::TimedOut => break,
            // A restart or stop: the connection just dies, as it would.
            Next::Closed => return Ok(false),
        }
        out.flush()?;
        let bookmark_since = bookmarks.then_some(last_bookmark);
        next = wait_for_changes(
            shared,
            resource,
            filter,
            &mut position,
            epoch,
            deadline,
            bookmark_since,
        );
    }
    out.write_all(b"0\r\n\r\n")?;
    out.flush()?;
    Ok(true)
}

/// Waits until there is something to send on a watch at `position`.
/// `bookmark_since` is when the last bookmark went out, if the client wants
/// them.
fn wait_for_changes(
    shared: &Shared,
    resource: Resource,
    filter: &Filter,
    position: &mut u64,
    epoch: u64,
    deadline: Instant,
    bookmark_since: Option<Instant>,
) -> Next {
    let mut state = shared.lock();
    loop {
        // Read on every wake-up, so a changed interval applies to open watches.
        let bookmark_at = bookmark_since
            .zip(state.bookmark_interval)
            .map(|(at, i)| at + i);
        if state.epoch != epoch {
            return Next::Closed;
        }
        if *position < state.oldest {
            let message = format!("too old resource version: {position} ({})", state.oldest);
            state.count(resource, |c| c.expired += 1);
            return Next::Expired(message);
        }
        let from = state.history.partition_point(|r| r.revision <= *position);
        let lines: Vec<String> = state
            .history
            .range(from..)
            .filter(|r| r.resource == resource && filter.matches(&r.object))
            .map(|r| event_line(r.type_, &r.object))
            .collect();
        *position = state.revision;
        if !lines.is_empty() {
            return Next::Events(lines);
        }
        let now = Instant::now();
        if now >= deadline {
            return Next::TimedOut;
        }
        if bookmark_at.is_some_and(|at| now >= at) {
            return Next::Bookmark(state.revision);
        }
        let until = bookmark_at.map_or(deadline, |at| at.min(deadline));
        state = shared
            .changed
            .wait_timeout(state, until - now)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

fn event_line(type_: &str, object: &Value) -> String {
    let mut line = json!({"type": type_, "object": object}).to_string();
    line.push('\n');
    line
}

/// One chunk in one write: with TCP_NODELAY each write is a segment.
fn write_chunk(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.reserve(data.len() + 2);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    out.write_all(&chunk)
}

fn respond(out: &mut impl Write, code: u16, body: &Value) -> io::Result<()> {
    respond_text(out, (code, body.to_string())).map(|_| ())
}

/// [`respond`] with a body that is JSON text already; `true` (keep the
/// connection) once sent.
fn respond_text(out: &mut impl Write, (code, body): (u16, String)) -> io::Result<bool> {
    let mut head = String::new();
    let _ = write!(
        head,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    head.push_str(&body);
    out.write_all(head.as_bytes())?;
    out.flush()?;
    Ok(true)
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A `Status` object, as the real server sends with every error.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// The Status for a status set with [`ApiServer::fail`].
fn failure(code: u16) -> Value {
    let reason = match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        410 => "Expired",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    status(code, reason, &format!("injected by the test: {reason}"))
}

/// Now as RFC 3339 in UTC, whole seconds, as metadata timestamps are.
fn now_rfc3339() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests;
