//! healthCheckNodePorts: for each Service of externalTrafficPolicy Local
//! (type LoadBalancer), an HTTP server on its healthCheckNodePort that a
//! cloud load balancer probes, answering as kube-proxy does: 200 while this
//! node has a ready endpoint of the Service and the proxy itself is healthy
//! (`/healthz`'s rule without the Node's state), 503 otherwise, with
//! kube-proxy's JSON body. Any path is answered, over IPv4 and IPv6. The
//! ports share one pool of connections.

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use nix::{
    errno::Errno,
    sys::socket::{setsockopt, sockopt},
};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    health::SharedHealth,
    listener::{Connections, HEALTH_CHECK_CONNECTIONS, Responder},
    model::HealthCheck,
};

/// tokio's `TcpListener::bind` backlog.
const LISTEN_BACKLOG: u32 = 1024;

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
            match bind_both_families(*port) {
                Ok(listener) => {
                    let listener = crate::listener::accept(
                        "healthCheckNodePort",
                        listener,
                        responder as Arc<dyn Responder>,
                        self.connections.clone(),
                    );
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

/// Binds `port` for probes of both families: one IPv6 socket that takes
/// IPv4 too (IPV6_V6ONLY off, whatever net.ipv6.bindv6only says), as a
/// load balancer may probe the node on either of its addresses; on a node
/// whose kernel has no IPv6, IPv4 alone.
fn bind_both_families(port: u16) -> io::Result<TcpListener> {
    let (socket, address) = match TcpSocket::new_v6() {
        Ok(socket) => {
            setsockopt(&socket, sockopt::Ipv6V6Only, &false)?;
            (socket, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        }
        Err(error) if error.raw_os_error() == Some(Errno::EAFNOSUPPORT as i32) => {
            debug!(
                port,
                "no IPv6 on this node: the healthCheckNodePort serves IPv4 only"
            );
            (
                TcpSocket::new_v4()?,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            )
        }
        Err(error) => return Err(error),
    };
    // As std's and tokio's own bind: a port just closed (its connections in
    // TIME_WAIT) can be bound again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
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
