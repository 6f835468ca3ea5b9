//! healthCheckNodePorts: for each Service of externalTrafficPolicy Local
//! (type LoadBalancer), an HTTP server on its healthCheckNodePort that a
//! cloud load balancer probes, answering as kube-proxy does: 200 while this
//! node has a ready endpoint of the Service and the proxy itself is healthy
//! (`/healthz`'s rule without the Node's state), 503 otherwise, with
//! kube-proxy's JSON body. Any path is answered. The ports share one pool
//! of connections.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    health::SharedHealth,
    listener::{Connections, HEALTH_CHECK_CONNECTIONS, Responder},
    model::HealthCheck,
};

/// The servers, one per healthCheckNodePort.
pub struct ServiceHealthServers {
    health: SharedHealth,
    checks: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    listeners: BTreeMap<u16, JoinHandle<()>>,
    connections: Arc<Connections>,
    /// Ports that could not be bound, warned about once.
    failed: BTreeMap<u16, String>,
}

impl ServiceHealthServers {
    #[must_use]
    pub fn new(health: SharedHealth) -> Self {
        Self {
            health,
            checks: Arc::default(),
            listeners: BTreeMap::new(),
            connections: Connections::new(HEALTH_CHECK_CONNECTIONS),
            failed: BTreeMap::new(),
        }
    }

    /// Serves exactly `checks`: new ports are bound, gone ones closed,
    /// counts change at once. Must run inside the agent's runtime.
    pub fn update(&mut self, checks: &BTreeMap<u16, HealthCheck>) {
        *self.checks.lock().unwrap_or_else(PoisonError::into_inner) = checks.clone();
        self.listeners.retain(|port, listener| {
            let keep = checks.contains_key(port);
            if !keep {
                listener.abort();
                info!(port, "healthCheckNodePort closed");
            }
            keep
        });
        self.failed.retain(|port, _| checks.contains_key(port));
        for (port, check) in checks {
            if self.listeners.contains_key(port) {
                continue;
            }
            let responder = Arc::new(PortResponder {
                port: *port,
                checks: self.checks.clone(),
                health: self.health.clone(),
            });
            let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            match crate::listener::serve_std(
                "healthCheckNodePort",
                address,
                responder as Arc<dyn Responder>,
                self.connections.clone(),
            ) {
                Ok(listener) => {
                    self.failed.remove(port);
                    info!(port, service = %check.service, "healthCheckNodePort serving");
                    self.listeners.insert(*port, listener);
                }
                Err(error) => {
                    let error = error.to_string();
                    if self.failed.get(port) != Some(&error) {
                        warn!(port, service = %check.service, %error, "cannot serve healthCheckNodePort; retrying with the next sync");
                        self.failed.insert(*port, error);
                    }
                }
            }
        }
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        for listener in self.listeners.values() {
            listener.abort();
        }
    }
}

/// kube-proxy's body (pkg/proxy/healthcheck).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

struct PortResponder {
    port: u16,
    checks: Arc<Mutex<BTreeMap<u16, HealthCheck>>>,
    health: SharedHealth,
}

impl Responder for PortResponder {
    fn respond(&self, _path: &str) -> (u16, &'static str, String) {
        let healthy = self
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .proxy_healthy();
        let checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(check) = checks.get(&self.port) else {
            return (404, "text/plain", "no such service\n".to_owned());
        };
        answer(check, healthy)
    }
}

/// Status and body for one check.
fn answer(check: &HealthCheck, proxy_healthy: bool) -> (u16, &'static str, String) {
    let body = Body {
        service: ServiceName {
            namespace: check.service.namespace(),
            name: check.service.name(),
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    let status = if check.local_endpoints > 0 && proxy_healthy {
        200
    } else {
        503
    };
    let body = serde_json::to_string_pretty(&body).unwrap_or_default();
    (status, "application/json", body + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ObjectName;

    #[test]
    fn the_answer_is_kube_proxys() {
        let check = |n| HealthCheck {
            service: ObjectName::new("default", "web"),
            local_endpoints: n,
        };
        let (status, content_type, body) = answer(&check(2), true);
        assert_eq!((status, content_type), (200, "application/json"));
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "service": {"namespace": "default", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
        assert_eq!(answer(&check(0), true).0, 503, "no local endpoint");
        assert_eq!(answer(&check(2), false).0, 503, "the proxy is unhealthy");
    }
}
