//! Where Services and EndpointSlices come from. Every source hands over the
//! whole current set as a [`Snapshot`]; the agent recomputes and diffs, so a
//! source never has to describe changes.

pub mod manifests;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// An object and where it came from, so problems can name both.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    /// A file path, or the API server.
    pub origin: String,
    pub object: T,
}

/// The complete set of objects a source knows right now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Sourced<Service>>,
    pub endpoint_slices: Vec<Sourced<EndpointSlice>>,
}

/// A supplier of snapshots.
pub trait Source {
    /// Returns the current snapshot: at once on the first call, then each
    /// time it may have changed. An error is fatal for the source (it has
    /// nothing trustworthy to say); broken objects are not errors, they are
    /// logged and left out.
    fn next_snapshot(&mut self) -> Result<Snapshot, SourceError>;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read the manifest directory {path}")]
    ReadDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
