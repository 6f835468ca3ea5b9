//! `/healthz` and `/livez` as kube-proxy serves them (default port 10256).
//!
//! `/healthz` is what load balancers and the DaemonSet's readiness probe
//! ask, and it means what kube-proxy's means: 503 only while a change has
//! waited longer than `--health-stale-after` to reach the maps, before the
//! datapath is attached, and while the Node is being deleted or carries the
//! cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint (KEP-3836),
//! so traffic drains from a node that is going away. A source that fails with
//! nothing waiting (the API server away, the maps as they were) is no
//! reason to drain every node at once: it is logged, counted in the
//! metrics and named in the body, and the status stays 200. `/livez` is 200
//! as long as the process answers, Node deletion or not.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::listener::Responder;

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
    /// Why the Node is going away, while it is.
    node_leaving: Option<&'static str>,
}

/// Shared between the loop and the HTTP tasks.
pub type SharedHealth = Arc<Mutex<Health>>;

/// kube-proxy's `/healthz` body, plus why it is unhealthy, and what fails
/// without making it so.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthzBody {
    last_updated: String,
    current_time: String,
    node_eligible: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_error: Option<String>,
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
            node_leaving: None,
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

    /// The Node is going away (`Some`, why), or not.
    pub fn node_leaving(&mut self, why: Option<&'static str>) {
        self.node_leaving = why;
    }

    /// Whether `/healthz` answers 200.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        self.problem().is_none()
    }

    /// The proxy's own health, whatever the Node's state: what
    /// healthCheckNodePorts say as `serviceProxyHealthy`, as kube-proxy's
    /// do (the endpoints of a Node being deleted leave by themselves).
    #[must_use]
    pub fn proxy_healthy(&self) -> bool {
        self.proxy_problem().is_none()
    }

    /// Why the node should not get traffic, if it should not.
    fn problem(&self) -> Option<String> {
        self.proxy_problem()
            .or_else(|| self.node_leaving.map(str::to_owned))
    }

    /// Why the maps cannot be trusted, if they cannot: not in use yet, not
    /// attached where they should be, or a change has waited too long to
    /// reach them.
    fn proxy_problem(&self) -> Option<String> {
        if !self.attached {
            return Some("the datapath is not attached yet".to_owned());
        }
        if let Some(problem) = &self.datapath_problem {
            return Some(problem.clone());
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
            node_eligible: self.node_leaving.is_none(),
            reason: reason.clone(),
            source_error: self.source_error.as_ref().map(|(error, since)| {
                format!("failing for {}s: {error}", since.elapsed().as_secs())
            }),
        };
        let status = if self.is_healthy() { 200 } else { 503 };
        (
            status,
            serde_json::to_string(&body).unwrap_or_default() + "\n",
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_follows_the_datapath_waiting_changes_and_the_node() {
        let health = Health::shared(Duration::ZERO);
        let status = || health.lock().unwrap().healthz().0;
        assert_eq!(status(), 503, "not attached yet");
        assert!(!health.lock().unwrap().proxy_healthy());
        health.lock().unwrap().set_attached();
        health.lock().unwrap().synced();
        assert_eq!(status(), 200);
        health.lock().unwrap().pending();
        assert_eq!(status(), 503, "late at once with a zero threshold");
        let body = health.lock().unwrap().healthz().1;
        assert!(body.contains("changes have waited"), "{body}");
        assert!(!health.lock().unwrap().proxy_healthy());
        health.lock().unwrap().synced();
        assert_eq!(status(), 200);
        health
            .lock()
            .unwrap()
            .datapath_problem(Some("the cgroup /x is gone".into()));
        assert_eq!(status(), 503);
        assert!(health.lock().unwrap().healthz().1.contains("/x is gone"));
        health.lock().unwrap().datapath_problem(None);
        assert_eq!(status(), 200);
        health
            .lock()
            .unwrap()
            .node_leaving(Some("the Node is being deleted"));
        assert_eq!(status(), 503);
        let body = health.lock().unwrap().healthz().1;
        assert!(body.contains("\"nodeEligible\":false"), "{body}");
        assert!(body.contains("the Node is being deleted"), "{body}");
        assert!(
            health.lock().unwrap().proxy_healthy(),
            "healthCheckNodePorts ignore the Node's state, as kube-proxy's do"
        );
    }

    #[test]
    fn a_failing_source_with_nothing_waiting_is_healthy() {
        let health = Health::shared(Duration::ZERO);
        let mut h = health.lock().unwrap();
        h.set_attached();
        h.synced();
        h.source_status(Some("connection refused".into()));
        let (status, body) = h.healthz();
        assert_eq!(status, 200, "{body}");
        assert!(h.proxy_healthy());
        assert!(
            body.contains("\"sourceError\":\"failing for 0s: connection refused\""),
            "{body}"
        );
        assert!(!body.contains("reason"), "{body}");
        h.source_status(None);
        assert!(!h.healthz().1.contains("sourceError"));
    }

    #[test]
    fn a_recent_change_is_tolerated() {
        let health = Health::shared(Duration::from_mins(1));
        let mut h = health.lock().unwrap();
        h.set_attached();
        h.source_status(Some("timeout".into()));
        h.pending();
        assert_eq!(h.healthz().0, 200);
    }
}
