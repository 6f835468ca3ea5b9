//! The desired state as the source holds it now, computed with the agent's
//! own source and model: what `doctor` compares the maps with and what
//! `explain` reasons from. The source runs exactly as under the agent,
//! until its first complete view.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use tokio::time::Instant;

use crate::{
    model::{Cidr, Model, ModelConfig},
    source::{
        EventSink, Source, SourceError, SourceEvent, kube::KubeSource, manifests::ManifestDir,
    },
};

/// How long the source may take to give a complete view.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the agent reads its Services: the same flags as `run`'s.
#[derive(Args, Clone, Debug)]
pub struct SourceArgs {
    /// Read Services and EndpointSlices from this manifest directory, as
    /// `run --manifests` does, instead of the Kubernetes API.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// A kubeconfig for the API server (default: the pod's service
    /// account, then $KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's Node name [default: $NODE_NAME, else the host name].
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub hostname_override: Option<String>,
    /// The agent's --service-cidr, so Services it refuses are refused here.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub service_cidr: Vec<Cidr>,
}

/// The source to read, made but not started.
pub enum Built {
    Manifests(PathBuf, ManifestDir),
    Kube(KubeSource),
}

impl SourceArgs {
    /// The source these flags name (nothing is requested yet).
    pub async fn build(&self) -> Result<Built, SourceError> {
        if let Some(dir) = &self.manifests {
            return Ok(Built::Manifests(dir.clone(), ManifestDir::new(dir)));
        }
        let node = match &self.hostname_override {
            Some(name) => name.clone(),
            None => crate::config::host_name().map_err(|e| SourceError::Kube(format!("{e:#}")))?,
        };
        Ok(Built::Kube(
            KubeSource::new(self.kubeconfig.as_deref(), &node).await?,
        ))
    }

    /// The node name the Kubernetes source follows.
    pub fn node_name(&self) -> Option<String> {
        self.hostname_override
            .clone()
            .or_else(|| crate::config::host_name().ok())
    }
}

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
