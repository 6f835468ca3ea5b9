//! Where Services, EndpointSlices and the Node come from.
//!
//! A source runs on its own (a thread, or tasks on the agent's runtime) and
//! tells the agent what changed, as [`SourceEvent`]s on one channel: objects
//! added, changed or gone, and when its view is complete. The agent keeps
//! the objects, so a source never describes the whole world twice, and a
//! change costs in proportion to what it touched.
//!
//! A source must never report an object as gone merely because it has not
//! seen it yet: deletions of objects it did not list come only once a full
//! listing is done (a watcher's `InitDone`, a directory read to the end).

pub mod kube;
pub mod manifests;
pub mod objects;

pub use objects::{NodeObject, ObjectName, ServiceObject, SliceObject};
use tokio::sync::mpsc;

/// An object and where it came from, so problems can name both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sourced<T> {
    /// A file path, or the API server; shared by all its objects.
    pub origin: std::sync::Arc<str>,
    pub object: T,
}

/// One object added or changed (`Some`), or gone (`None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Service(ObjectName, Option<Sourced<ServiceObject>>),
    /// Keyed by the slice's own name.
    EndpointSlice(ObjectName, Option<Sourced<SliceObject>>),
    /// The agent's own Node.
    Node(Option<NodeObject>),
}

/// What a source tells the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// Objects changed. A batch is applied as one, so a source that knows
    /// of several changes at once (a file, a relist) sends them together.
    Changes(Vec<Change>),
    /// The source's view is complete: every object that exists has been
    /// sent. Nothing is written to the datapath before the first of these,
    /// or a partial view would delete live Services.
    ///
    /// `complete: false` says that some input could not be read (a broken
    /// manifest file): the view is as complete as it can be, but pinned
    /// frontends that no object claims may belong to the unreadable input
    /// and are kept until a later `Synced { complete: true }`.
    Synced { complete: bool },
    /// The source's health for `/healthz` and `doctor`: `None` when all is
    /// well, else the last error, as one line.
    Status(Option<String>),
}

/// The sending half of the agent's event channel. Cheap to clone, and
/// usable from threads as well as tasks.
#[derive(Clone, Debug)]
pub struct EventSink(mpsc::UnboundedSender<SourceEvent>);

impl EventSink {
    /// A sink and the agent's receiving end.
    #[must_use]
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<SourceEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }

    /// Sends an event; `false` once the agent has stopped listening, which
    /// is the source's cue to stop.
    pub fn send(&self, event: SourceEvent) -> bool {
        self.0.send(event).is_ok()
    }
}

/// A supplier of [`SourceEvent`]s.
pub trait Source {
    /// Starts following the source in the background. Must be called from
    /// within the agent's tokio runtime. An error here is fatal (the source
    /// cannot start at all); later trouble is reported as
    /// [`SourceEvent::Status`] and retried by the source itself.
    fn start(self: Box<Self>, sink: EventSink) -> Result<(), SourceError>;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read the manifest directory {path}")]
    ReadDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the manifest directory {path}")]
    Watch {
        path: String,
        #[source]
        source: notify::Error,
    },
    #[error("cannot set up the Kubernetes client: {0}")]
    Kube(String),
}
