//! The agent's HTTP listeners (`/healthz` and `/livez`, `/metrics`, the
//! healthCheckNodePorts), served by hyper's HTTP/1 server.
//!
//! Anything that reaches the node reaches them, so no peer may starve the
//! agent, nor lock the probes out:
//! - a listener holds a bounded number of connections (the
//!   healthCheckNodePorts one pool between them), far below the open-file
//!   limit, so the loop, the API watches and the device checks always find
//!   a descriptor;
//! - at that bound, the oldest connection that has not sent its request
//!   yet is closed to make room: a probe sends its request at once and is
//!   answered in microseconds, so a peer holding idle connections cannot
//!   keep it out; only when every connection is being answered is the new
//!   one closed at once (never queued);
//! - a request's head must arrive within [`HEADER_READ_TIMEOUT`], and the
//!   whole exchange end within [`REQUEST_TIMEOUT`];
//! - when accept fails (out of descriptors, say), the loop sleeps, 100 ms
//!   doubling to 1 s, instead of spinning on the error; meanwhile the
//!   connections it holds are answered or time out.
//!
//! One request per connection, as probes and scrapers make them.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

/// Connections `/healthz` holds at once: kubelet's probes and a few load
/// balancers' checkers need a handful.
pub const HEALTHZ_CONNECTIONS: usize = 128;
/// Connections `/metrics` holds at once: a scraper or two.
pub const METRICS_CONNECTIONS: usize = 32;
/// Connections all the healthCheckNodePorts hold at once, together: a
/// cluster with many Local load balancers does not multiply descriptors.
pub const HEALTH_CHECK_CONNECTIONS: usize = 256;
/// What every listener together may hold.
pub const ALL_CONNECTIONS: usize =
    HEALTHZ_CONNECTIONS + METRICS_CONNECTIONS + HEALTH_CHECK_CONNECTIONS;

/// A probe sends its request with the connection; a client that has not
/// sent a request head by then is idle or slow on purpose.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// From accept to the last byte of the answer: a scrape of a large
/// cluster's metrics included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest request head read (hyper's minimum).
const MAX_REQUEST_HEAD: usize = 8192;
/// How long a new connection waits for the slot of the idle one closed
/// for it.
const ROOM_WAIT: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A full listener is warned about at most this often.
const CROWDED_WARNING_EVERY: Duration = Duration::from_mins(1);
/// A listener that cannot accept is warned about at most this often.
const FAILURE_WARNING_EVERY: Duration = Duration::from_mins(1);

/// What an HTTP listener answers.
pub trait Responder: Send + Sync + 'static {
    /// Status, content type and body for a GET of `path`.
    fn respond(&self, path: &str) -> (u16, &'static str, String);
}

/// Sent to an idle connection to close it; dropped once its socket and
/// its slot are free.
type CloseRequest = oneshot::Sender<()>;

/// The connections of a listener (or of a group of listeners): at most
/// `capacity`, and those that have not sent their request yet, oldest
/// first, to be closed when room is needed.
pub struct Connections {
    capacity: usize,
    slots: Arc<Semaphore>,
    idle: Mutex<BTreeMap<u64, oneshot::Sender<CloseRequest>>>,
    next_id: AtomicU64,
    header_read_timeout: Duration,
}

impl Connections {
    #[must_use]
    pub fn new(capacity: usize) -> Arc<Self> {
        Self::with_header_read_timeout(capacity, HEADER_READ_TIMEOUT)
    }

    fn with_header_read_timeout(capacity: usize, header_read_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            slots: Arc::new(Semaphore::new(capacity)),
            idle: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            header_read_timeout,
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<CloseRequest>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot of the oldest connection that has sent no request, closed
    /// for a new one; `None` when every connection is being answered.
    async fn make_room(&self) -> Option<OwnedSemaphorePermit> {
        let (_, close) = self.idle().pop_first()?;
        let (request, done) = oneshot::channel();
        if close.send(request).is_ok() {
            // Done when its task drops the request, which it does last.
            let _ = tokio::time::timeout(ROOM_WAIT, done).await;
        }
        self.slots.clone().try_acquire_owned().ok()
    }

    /// A new connection, idle until its request comes; the receiver says
    /// when it is to be closed to make room.
    fn open_idle(&self) -> (u64, oneshot::Receiver<CloseRequest>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        self.idle().insert(id, close);
        (id, closed)
    }

    /// Its request came: the connection is no longer a candidate to close.
    fn answering(&self, id: u64) {
        self.idle().remove(&id);
    }
}

/// A connection's hold on its listener; dropped after its socket.
struct Slot {
    connections: Arc<Connections>,
    id: u64,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.answering(self.id);
    }
}

/// Binds `address` and answers GETs with `responder` in the background,
/// holding at most what `connections` allows. Returns the bound address
/// (port 0 picks a free one).
pub async fn serve(
    name: &'static str,
    address: SocketAddr,
    responder: Arc<dyn Responder>,
    connections: Arc<Connections>,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    info!(%bound, "{name} listening");
    accept(name, listener, responder, connections);
    Ok(bound)
}

/// Answers on a listener bound elsewhere (with socket options of its
/// own), in the background, as [`serve`] does; returns the task, to abort
/// when the port is no longer served.
pub fn accept(
    name: &'static str,
    listener: TcpListener,
    responder: Arc<dyn Responder>,
    connections: Arc<Connections>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut failures = AcceptFailures::default();
        let mut crowded_warned: Option<Instant> = None;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => {
                    failures.recovered(name);
                    accepted
                }
                Err(error) if concerns_one_connection(&error) => {
                    debug!(%error, "{name}: a connection failed before it was accepted");
                    continue;
                }
                Err(error) => {
                    // Out of descriptors, most likely. Closing an idle
                    // connection instead would not do: accept(2) fails
                    // with EMFILE before it looks for a waiting connection,
                    // so the one closed could be the probe just accepted.
                    failures.back_off(name, &error).await;
                    continue;
                }
            };
            let slot = if let Ok(slot) = connections.slots.clone().try_acquire_owned() {
                Some(slot)
            } else {
                let slot = connections.make_room().await;
                if crowded_warned.is_none_or(|at| at.elapsed() >= CROWDED_WARNING_EVERY) {
                    crowded_warned = Some(Instant::now());
                    warn!(
                        capacity = connections.capacity,
                        "{name}: every connection is taken; {}",
                        if slot.is_some() {
                            "closing the oldest that sent no request for each new one"
                        } else {
                            "closing new ones at once"
                        }
                    );
                }
                slot
            };
            let Some(slot) = slot else {
                debug!(%peer, "{name}: no room; closed the new connection");
                continue;
            };
            answer(name, stream, peer, responder.clone(), &connections, slot);
        }
    })
}

/// Serves one connection in a task of its own.
fn answer(
    name: &'static str,
    stream: TcpStream,
    peer: SocketAddr,
    responder: Arc<dyn Responder>,
    connections: &Arc<Connections>,
    permit: OwnedSemaphorePermit,
) {
    let (id, closed) = connections.open_idle();
    let slot = Slot {
        connections: connections.clone(),
        id,
        _permit: permit,
    };
    tokio::spawn(async move {
        let slot = slot;
        let connections = slot.connections.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            connections.answering(id);
            std::future::ready(Ok::<_, Infallible>(respond(responder.as_ref(), &request)))
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(slot.connections.header_read_timeout)
            .keep_alive(false)
            .max_buf_size(MAX_REQUEST_HEAD)
            .serve_connection(TokioIo::new(stream), service);
        let close_request = tokio::select! {
            // Only a send closes it: a dropped sender means it is answering.
            Ok(request) = closed => {
                debug!(%peer, "{name}: closed a connection that sent no request, to make room");
                Some(request)
            }
            served = tokio::time::timeout(REQUEST_TIMEOUT, connection) => {
                match served {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => debug!(%peer, %error, "{name}: request failed"),
                    Err(_) => debug!(%peer, "{name}: request timed out"),
                }
                None
            }
        };
        // The socket is closed by now; then the slot is freed, and then
        // whoever asked for the room is told.
        drop(slot);
        drop(close_request);
    });
}

fn respond(responder: &dyn Responder, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if request.method() == Method::GET {
        responder.respond(request.uri().path())
    } else {
        (405, "text/plain", "only GET is served\n".to_owned())
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if status == 405 {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
    }
    response
}

/// Errors accept(2) passes on from one connection (aborted before it was
/// accepted, refused by a firewall rule): the next one may well work.
fn concerns_one_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    ) || matches!(
        error.raw_os_error(),
        Some(
            libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// Accept's failures in a row, how long the loop sleeps after the next,
/// and when they were last warned about: a listener short of descriptors
/// for minutes says so once a minute, not at every retry.
#[derive(Default)]
struct AcceptFailures {
    delay: Option<Duration>,
    warned: Option<Instant>,
    /// Failures since the last warning.
    count: u64,
    /// Whether this run of failures was warned about.
    warned_this_run: bool,
}

impl AcceptFailures {
    async fn back_off(&mut self, name: &str, error: &io::Error) {
        let delay = self.delay.map_or(ACCEPT_BACKOFF_FIRST, |delay| {
            (delay * 2).min(ACCEPT_BACKOFF_MAX)
        });
        self.delay = Some(delay);
        self.count += 1;
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= FAILURE_WARNING_EVERY)
        {
            warn!(
                %error,
                failures = self.count,
                "{name}: cannot accept connections; trying again, at most every {ACCEPT_BACKOFF_MAX:?}"
            );
            self.warned = Some(Instant::now());
            self.warned_this_run = true;
            self.count = 0;
        }
        tokio::time::sleep(delay).await;
    }

    fn recovered(&mut self, name: &str) {
        if self.delay.take().is_some() && std::mem::take(&mut self.warned_this_run) {
            info!("{name}: accepting connections again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    struct Hello;

    impl Responder for Hello {
        fn respond(&self, path: &str) -> (u16, &'static str, String) {
            match path {
                "/hello" => (200, "text/plain", "hello\n".to_owned()),
                _ => (404, "text/plain", "not found\n".to_owned()),
            }
        }
    }

    async fn hello(capacity: usize) -> (SocketAddr, Arc<Connections>) {
        let connections =
            Connections::with_header_read_timeout(capacity, Duration::from_millis(300));
        let address = serve(
            "test",
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::new(Hello),
            connections.clone(),
        )
        .await
        .unwrap();
        (address, connections)
    }

    async fn get(address: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        response
    }

    /// Whether the server closed `stream` (it reads end of file).
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut byte = [0_u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn answers_gets_and_only_gets() {
        let (address, _) = hello(4).await;
        let ok = get(address, "GET /hello?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("content-type: text/plain\r\n"), "{ok}");
        assert!(ok.contains("connection: close\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nhello\n"), "{ok}");
        let missing = get(address, "GET /nope HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(
            address,
            "POST /hello HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.contains("allow: GET\r\n"), "{post}");
        let junk = get(address, "\x16\x03\x01 not http\r\n\r\n").await;
        assert!(
            junk.starts_with("HTTP/1.1 400") || junk.is_empty(),
            "{junk}"
        );
    }

    #[tokio::test]
    async fn a_full_listener_closes_its_oldest_idle_connection_for_a_new_one() {
        let (address, connections) = hello(2).await;
        let mut oldest = TcpStream::connect(address).await.unwrap();
        let mut newer = TcpStream::connect(address).await.unwrap();
        // Both accepted and idle before the request comes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(connections.idle().len(), 2);

        let answer = get(address, "GET /hello HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(closed(&mut oldest).await, "the oldest idle one stays");
        // The newer idle one still has its slot, and may still ask.
        newer
            .write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        newer.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_header_timeout() {
        let (address, connections) = hello(2).await;
        let mut idle = TcpStream::connect(address).await.unwrap();
        let opened = Instant::now();
        assert!(closed(&mut idle).await);
        let took = opened.elapsed();
        assert!(took >= Duration::from_millis(250), "closed after {took:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(connections.idle().is_empty());
        assert_eq!(connections.slots.available_permits(), 2);
    }

    #[test]
    fn out_of_descriptors_is_not_one_connections_failure() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!concerns_one_connection(&io::Error::from_raw_os_error(
                errno
            )));
        }
        for errno in [libc::ECONNABORTED, libc::EPERM, libc::EPROTO] {
            assert!(concerns_one_connection(&io::Error::from_raw_os_error(
                errno
            )));
        }
    }
}
