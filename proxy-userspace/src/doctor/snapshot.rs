//! The desired state as the source holds it now, computed with the agent's
//! own source and model: what `doctor` compares the maps with and what
//! `explain` reasons from. The source runs exactly as under the agent,
//! until its first complete view.

use std::time::Duration;

use tokio::time::Instant;

pub use crate::config::{Built, SourceArgs};
use crate::{
    model::{Model, ModelConfig},
    source::{EventSink, Source, SourceError, SourceEvent},
};

/// How long the source may take to give a complete view.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// The model after the source's first complete view.
pub struct Snapshot {
    pub model: Model,
    /// `false` when some input could not be read (a file that does not
    /// parse): the agent then keeps frontends no object claims.
    pub complete: bool,
    /// The source's last error while it was read, if any.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the source gave no complete view within {timeout:?}{}", last_error.as_ref().map_or_else(String::new, |e| format!(": {e}")))]
    Timeout {
        timeout: Duration,
        last_error: Option<String>,
    },
}

/// Runs `source` until its first complete view and computes the desired
/// state from it, as the agent would.
pub async fn take(source: Box<dyn Source>, config: ModelConfig) -> Result<Snapshot, SnapshotError> {
    let (sink, mut events) = EventSink::channel();
    source.start(sink)?;
    let mut model = Model::new(config);
    // NodePorts reach the maps on the node's addresses, as in the agent,
    // which runs in this same network namespace.
    if let Ok(interfaces) = crate::devices::read() {
        model.set_host_addresses(crate::devices::host_addresses(&interfaces));
    }
    let mut error = None;
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv()).await;
        match event {
            Ok(Some(SourceEvent::Changes(changes))) => {
                for change in changes {
                    model.apply(change);
                }
            }
            Ok(Some(SourceEvent::Status(status))) => error = status,
            Ok(Some(SourceEvent::Synced { complete })) => {
                model.recompute();
                return Ok(Snapshot {
                    model,
                    complete,
                    error,
                });
            }
            Ok(None) | Err(_) => {
                return Err(SnapshotError::Timeout {
                    timeout: SYNC_TIMEOUT,
                    last_error: error,
                });
            }
        }
    }
}
