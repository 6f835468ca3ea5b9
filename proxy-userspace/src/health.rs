//! `/healthz` and `/livez` as kube-proxy serves them (default port 10256),
//! and the small HTTP responder that also serves `/metrics`.
//!
//! `/healthz` is what load balancers and the DaemonSet's readiness probe
//! ask: 200 while the datapath is attached and the maps are not behind the
//! source, 503 otherwise and while the Node is being deleted (KEP-3836), so
//! traffic drains from a node that is going away. `/livez` is 200 as long
//! as the process answers, Node deletion or not.
//!
//! Probes send one GET and read one answer, so a hand-written HTTP/1.1
//! responder (one request per connection, bounded and timed) is all that
//! is needed; a full HTTP stack would add a server the agent does not use.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info};

/// What the loop tells the health endpoint.
#[derive(Debug)]
pub struct Health {
    stale_after: Duration,
    attached: bool,
    /// Why the datapath is not attached where it should be, once it was.
    datapath_problem: Option<String>,
    last_sync: Option<SystemTime>,
    /// Changes (or failed writes) not in the maps yet, since then.
    pending_since: Option<Instant>,
    /// The source's last error, and since when it fails.
    source_error: Option<(String, Instant)>,
    node_deleting: bool,
}

/// Shared between the loop and the HTTP tasks.
pub type SharedHealth = Arc<Mutex<Health>>;

/// kube-proxy's `/healthz` body, plus why it is unhealthy.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthzBody {
    last_updated: String,
    current_time: String,
    node_eligible: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl Health {
    #[must_use]
    pub fn shared(stale_after: Duration) -> SharedHealth {
        Arc::new(Mutex::new(Self {
            stale_after,
            attached: false,
            datapath_problem: None,
            last_sync: None,
            pending_since: None,
            source_error: None,
            node_deleting: false,
        }))
    }

    pub fn set_attached(&mut self) {
        self.attached = true;
    }

    /// The agent's guard found the datapath detached (a cgroup removed
    /// under it, say), or it is whole again.
    pub fn datapath_problem(&mut self, problem: Option<String>) {
        self.datapath_problem = problem;
    }

    /// The maps are up to date with the source.
    pub fn synced(&mut self) {
        self.last_sync = Some(SystemTime::now());
        self.pending_since = None;
    }

    /// Something waits to be written (a change, or a failed write).
    pub fn pending(&mut self) {
        self.pending_since.get_or_insert_with(Instant::now);
    }

    pub fn source_status(&mut self, error: Option<String>) {
        self.source_error = match (error, self.source_error.take()) {
            (Some(error), Some((_, since))) => Some((error, since)),
            (Some(error), None) => Some((error, Instant::now())),
            (None, _) => None,
        };
    }

    pub fn node_deleting(&mut self, deleting: bool) {
        self.node_deleting = deleting;
    }

    /// Whether `/healthz` answers 200; healthCheckNodePorts say it as
    /// `serviceProxyHealthy`.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        self.problem().is_none()
    }

    /// Why the node should not get traffic, if it should not.
    fn problem(&self) -> Option<String> {
        if !self.attached {
            return Some("the datapath is not attached yet".to_owned());
        }
        if let Some(problem) = &self.datapath_problem {
            return Some(problem.clone());
        }
        if self.node_deleting {
            return Some("the Node is being deleted".to_owned());
        }
        if let Some((error, since)) = &self.source_error
            && since.elapsed() >= self.stale_after
        {
            return Some(format!(
                "the source has failed for {}s: {error}",
                since.elapsed().as_secs()
            ));
        }
        if let Some(since) = self.pending_since
            && since.elapsed() >= self.stale_after
        {
            return Some(format!(
                "changes have waited {}s to reach the maps",
                since.elapsed().as_secs()
            ));
        }
        None
    }

    fn healthz(&self) -> (u16, String) {
        let reason = self.problem();
        let timestamp = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .and_then(|d| Timestamp::from_second(i64::try_from(d.as_secs()).ok()?).ok())
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        let body = HealthzBody {
            last_updated: self.last_sync.map(timestamp).unwrap_or_default(),
            current_time: timestamp(SystemTime::now()),
            node_eligible: !self.node_deleting,
            reason: reason.clone(),
        };
        let status = if reason.is_some() { 503 } else { 200 };
        (
            status,
            serde_json::to_string(&body).unwrap_or_default() + "\n",
        )
    }
}

/// What an HTTP listener answers.
pub trait Responder: Send + Sync + 'static {
    /// Status, content type and body for a GET of `path`.
    fn respond(&self, path: &str) -> (u16, &'static str, String);
}

/// The health endpoints.
pub struct HealthEndpoints(pub SharedHealth);

impl Responder for HealthEndpoints {
    fn respond(&self, path: &str) -> (u16, &'static str, String) {
        match path {
            "/healthz" => {
                let health = self.0.lock().unwrap_or_else(PoisonError::into_inner);
                let (status, body) = health.healthz();
                (status, "application/json", body)
            }
            "/livez" => (200, "text/plain", "ok\n".to_owned()),
            _ => (404, "text/plain", "not found\n".to_owned()),
        }
    }
}

/// Binds `address` and answers GETs with `responder` in the background.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve(
    name: &'static str,
    address: SocketAddr,
    responder: Arc<dyn Responder>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    info!(%bound, "{name} listening");
    accept(name, listener, responder);
    Ok(bound)
}

/// [`serve`] for listeners that come and go: binds at once (inside the
/// runtime) and returns the task, to abort when the port is no longer
/// served.
pub fn serve_std(
    name: &'static str,
    address: SocketAddr,
    responder: Arc<dyn Responder>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(accept(name, TcpListener::from_std(listener)?, responder))
}

fn accept(
    name: &'static str,
    listener: TcpListener,
    responder: Arc<dyn Responder>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let responder = responder.clone();
            tokio::spawn(async move {
                if let Err(error) = answer(stream, responder.as_ref()).await {
                    debug!(%peer, %error, "{name}: request failed");
                }
            });
        }
    })
}

/// Reads one request (at most 8 KiB, within 5 s) and writes one answer.
async fn answer(mut stream: TcpStream, responder: &dyn Responder) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buffer = [0_u8; 1024];
    let read = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buffer[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (status, content_type, body) = match (words.next(), words.next()) {
        (Some("GET"), Some(target)) => {
            responder.respond(target.split('?').next().unwrap_or_default())
        }
        _ => (405, "text/plain", "only GET is served\n".to_owned()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_follows_the_datapath_the_source_and_the_node() {
        let health = Health::shared(Duration::ZERO);
        let status = || health.lock().unwrap().healthz().0;
        assert_eq!(status(), 503, "not attached yet");
        health.lock().unwrap().set_attached();
        health.lock().unwrap().synced();
        assert_eq!(status(), 200);
        health
            .lock()
            .unwrap()
            .source_status(Some("connection refused".into()));
        assert_eq!(status(), 503, "stale at once with a zero threshold");
        let body = health.lock().unwrap().healthz().1;
        assert!(body.contains("connection refused"), "{body}");
        health.lock().unwrap().source_status(None);
        assert_eq!(status(), 200);
        health
            .lock()
            .unwrap()
            .datapath_problem(Some("the cgroup /x is gone".into()));
        assert_eq!(status(), 503);
        assert!(health.lock().unwrap().healthz().1.contains("/x is gone"));
        health.lock().unwrap().datapath_problem(None);
        assert_eq!(status(), 200);
        health.lock().unwrap().node_deleting(true);
        assert_eq!(status(), 503);
        assert!(
            health
                .lock()
                .unwrap()
                .healthz()
                .1
                .contains("\"nodeEligible\":false")
        );
    }

    #[test]
    fn a_recent_source_error_is_tolerated() {
        let health = Health::shared(Duration::from_mins(1));
        let mut h = health.lock().unwrap();
        h.set_attached();
        h.source_status(Some("timeout".into()));
        h.pending();
        assert_eq!(h.healthz().0, 200);
    }
}
