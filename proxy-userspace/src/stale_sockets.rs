//! Sockets leave backends that left their Service. Socket-level balancing
//! picks a backend once per socket, so a connected UDP socket (a DNS
//! client, a metrics pusher) would go on sending to a backend long after
//! it left the Service: the blackhole kube-proxy avoids by flushing
//! conntrack. When a backend leaves a frontend, the sockets that
//! `connect4` translated from that frontend to that backend are ended with
//! `SOCK_DESTROY` over sock_diag, in every network namespace of the node
//! (the node's and its pods'): the application gets ECONNABORTED and
//! connects again, to a live backend.
//!
//! Only sockets the datapath translated are touched, and only when their
//! translation names both the frontend and the backend that left: for UDP
//! the translation `connect4` noted under the socket's cookie
//! (`lb4_udp_conn_v2`, whose entries `sock_release` deletes with their
//! sockets; and, after an upgrade, `lb4_udp_conn_v1` while it is pinned,
//! for the sockets connected before it); for TCP the socket's own storage, which sock_diag
//! hands back (`INET_DIAG_REQ_SK_BPF_STORAGES`; the kernel does so for TCP
//! sockets only). A client talking to the pod's address on its own is left
//! alone. TCP is left to the
//! application (a connection to a pod that is gone fails by itself) unless
//! `--terminate-tcp`.
//!
//! The work runs on a thread of its own, which moves between network
//! namespaces (`setns` changes only the calling thread's), so the agent's
//! loop never waits for it.

use std::{
    collections::BTreeSet,
    fs, io,
    net::{IpAddr, Ipv4Addr},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    sync::mpsc,
};

use aya::maps::{HashMap, Map, MapData};
use proxy_common::{PROTO_TCP, PROTO_UDP, RevNatPair, SockRevNat};
use tracing::{debug, info, warn};

use crate::{
    maps::encoding::rev_nat_addresses,
    reconcile::table::TableEvent,
    sock_diag::{Listed, SockDiag, SocketId, enter_network_namespace},
};

/// A backend that left a frontend, both as the datapath holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Departure {
    frontend: (Ipv4Addr, u16),
    backend: (Ipv4Addr, u16),
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    proto: u8,
}

/// `--terminate-udp` and `--terminate-tcp`: which sockets of departed
/// backends are ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Termination {
    pub udp: bool,
    pub tcp: bool,
}

impl Termination {
    #[must_use]
    pub const fn any(self) -> bool {
        self.udp || self.tcp
    }

    const fn covers(self, proto: u8) -> bool {
        match proto {
            PROTO_UDP => self.udp,
            PROTO_TCP => self.tcp,
            _ => false,
        }
    }
}

/// The connected-UDP map of the layout before [`proxy_common::UDP_CONNECTED_MAP`]
/// (an LRU hash, of the same key and value), which programs no longer
/// write: it still names the sockets connected before an upgrade, and
/// socket cookies are never reused, so its stale entries match nothing.
const UDP_CONNECTED_V1_MAP: &str = "lb4_udp_conn_v1";

/// Where the translations of sockets are: each TCP socket's storage, and
/// the connected UDP sockets' map.
pub struct Translations {
    pub storage: MapData,
    pub udp_connected: HashMap<MapData, u64, RevNatPair>,
    /// [`UDP_CONNECTED_V1_MAP`], while an upgraded datapath keeps it.
    pub udp_connected_v1: Option<HashMap<MapData, u64, RevNatPair>>,
}

impl Translations {
    /// Opens the maps from their pins.
    pub fn open(pins: &crate::maps::Pins) -> io::Result<Self> {
        let invalid = |error: aya::maps::MapError| io::Error::other(error.to_string());
        let storage =
            MapData::from_pin(pins.map(proxy_common::SOCK_REV_NAT_MAP)).map_err(invalid)?;
        let udp_connected = MapData::from_pin(pins.map(proxy_common::UDP_CONNECTED_MAP))
            .map_err(invalid)
            .and_then(|data| HashMap::try_from(Map::HashMap(data)).map_err(invalid))?;
        let v1 = pins.map(UDP_CONNECTED_V1_MAP);
        let udp_connected_v1 = if v1.exists() {
            match MapData::from_pin(&v1)
                .map_err(invalid)
                .and_then(|data| HashMap::try_from(Map::LruHashMap(data)).map_err(invalid))
            {
                Ok(map) => Some(map),
                Err(error) => {
                    warn!(map = %v1.display(), %error, "cannot read the connected UDP sockets of before the upgrade; they are not ended");
                    None
                }
            }
        } else {
            None
        };
        Ok(Self {
            storage,
            udp_connected,
            udp_connected_v1,
        })
    }

    /// The translations a listed socket of `proto` carries.
    fn of(&self, listed: &Listed<'_>, proto: u8) -> Vec<RevNatPair> {
        if proto == PROTO_UDP {
            return std::iter::once(&self.udp_connected)
                .chain(&self.udp_connected_v1)
                .find_map(|map| map.get(&listed.cookie, 0).ok())
                .map(|pair| vec![pair])
                .unwrap_or_default();
        }
        listed
            .storage
            .and_then(|value| bytemuck::try_pod_read_unaligned::<SockRevNat>(value).ok())
            .map(|translations| translations.pairs.to_vec())
            .unwrap_or_default()
    }
}

/// Hands departures to the terminating thread.
pub struct StaleSockets {
    sender: mpsc::Sender<Vec<Departure>>,
}

impl StaleSockets {
    /// Starts the thread.
    pub fn start(translations: Translations, termination: Termination) -> io::Result<Self> {
        let (sender, receiver) = mpsc::channel::<Vec<Departure>>();
        std::thread::Builder::new()
            .name("stale-sockets".to_owned())
            .spawn(move || {
                let home = fs::File::open("/proc/thread-self/ns/net");
                while let Ok(mut departures) = receiver.recv() {
                    // Whatever came meanwhile is done in the same pass.
                    departures.extend(receiver.try_iter().flatten());
                    departures.retain(|d| termination.covers(d.proto));
                    if departures.is_empty() {
                        continue;
                    }
                    departures.sort_unstable();
                    departures.dedup();
                    debug!(?departures, "ending sockets");
                    let ended = terminate(&translations, &departures);
                    if let Ok(home) = &home
                        && let Err(error) = enter_network_namespace(home)
                    {
                        warn!(%error, "cannot go back to the agent's network namespace");
                    }
                    if ended > 0 {
                        info!(
                            sockets = ended,
                            backends = departures.len(),
                            "ended sockets still connected to backends that left their Service"
                        );
                    }
                }
            })?;
        Ok(Self { sender })
    }

    /// Ends, soon, the sockets translated to the backends that a pass of
    /// the socket programs' table took from their frontends.
    pub fn follow(&self, events: &[TableEvent<proxy_common::Ip4>]) {
        let departures: Vec<Departure> = events
            .iter()
            .filter_map(|event| match *event {
                TableEvent::BackendLeft { frontend, backend } => {
                    let (IpAddr::V4(frontend_ip), IpAddr::V4(backend_ip)) =
                        (frontend.ip, backend.ip)
                    else {
                        return None;
                    };
                    Some(Departure {
                        frontend: (frontend_ip, frontend.port),
                        backend: (backend_ip, backend.port),
                        proto: frontend.protocol.number(),
                    })
                }
                TableEvent::SlotGone(_) => None,
            })
            .collect();
        if !departures.is_empty() {
            let _ = self.sender.send(departures);
        }
    }
}

/// Ends the matching sockets in every network namespace; how many.
fn terminate(translations: &Translations, departures: &[Departure]) -> usize {
    let protocols: BTreeSet<u8> = departures.iter().map(|d| d.proto).collect();
    let mut ended = 0;
    for namespace in network_namespaces() {
        let Ok(file) = fs::File::open(&namespace) else {
            continue;
        };
        if let Err(error) = enter_network_namespace(&file) {
            debug!(namespace = %namespace.display(), %error, "cannot enter the network namespace");
            continue;
        }
        for &proto in &protocols {
            match end_in_this_namespace(translations, proto, departures) {
                Ok(n) => ended += n,
                Err(error) => {
                    warn!(namespace = %namespace.display(), %error, "cannot list or end sockets");
                }
            }
        }
    }
    ended
}

/// One path per network namespace of the node: the agent's own, every
/// process's, and those bound under /run/netns (`ip netns`, CNI plugins).
fn network_namespaces() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut paths = Vec::new();
    let mut consider = |path: PathBuf| {
        if let Ok(meta) = fs::metadata(&path)
            && seen.insert((meta.dev(), meta.ino()))
        {
            paths.push(path);
        }
    };
    consider(PathBuf::from("/proc/self/ns/net"));
    for dir in ["/run/netns", "/var/run/netns"] {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            consider(entry.path());
        }
    }
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            consider(entry.path().join("ns/net"));
        }
    }
    paths
}

const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;

/// Lists the sockets of `proto` in the current network namespace, and ends
/// those translated to a departed backend.
fn end_in_this_namespace(
    translations: &Translations,
    proto: u8,
    departures: &[Departure],
) -> io::Result<usize> {
    let diag = SockDiag::open()?;
    // Connected UDP sockets are in TCP_ESTABLISHED; TCP: all but listeners.
    let (states, storage) = if proto == PROTO_TCP {
        (!(1 << TCP_LISTEN), Some(translations.storage.fd().as_fd()))
    } else {
        (1 << TCP_ESTABLISHED, None)
    };
    let mut stale: Vec<SocketId> = Vec::new();
    diag.list(proto, states, storage, |listed| {
        let connected_to: Vec<&Departure> = departures
            .iter()
            .filter(|d| d.proto == proto && d.backend == listed.peer)
            .collect();
        if !connected_to.is_empty() && is_stale(&translations.of(&listed, proto), &connected_to) {
            stale.push(listed.id);
        }
    })?;
    let mut ended = 0;
    for id in stale {
        match diag.destroy(proto, &id) {
            Ok(()) => ended += 1,
            // Closed meanwhile.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(ended)
}

/// Whether a socket's translations name one of the departures (all of
/// them of the backend it is connected to).
fn is_stale(translations: &[RevNatPair], departures: &[&Departure]) -> bool {
    departures.iter().any(|departure| {
        translations
            .iter()
            .filter_map(rev_nat_addresses)
            .any(|(frontend, backend)| {
                frontend == departure.frontend && backend == departure.backend
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::encoding::rev_nat_pair;

    #[test]
    fn only_sockets_translated_from_the_frontend_to_the_departed_backend_are_stale() {
        let frontend = (Ipv4Addr::new(10, 96, 0, 10), 53);
        let backend = (Ipv4Addr::new(10, 244, 0, 10), 5353);
        let departed = Departure {
            frontend,
            backend,
            proto: PROTO_UDP,
        };
        assert!(is_stale(&[rev_nat_pair(frontend, backend)], &[&departed]));
        // Straight to the pod: no translation names it.
        assert!(!is_stale(&[], &[&departed]));
        assert!(!is_stale(&[RevNatPair::default()], &[&departed]));
        // Through another Service that keeps this backend.
        let other = (Ipv4Addr::new(10, 96, 0, 11), 53);
        assert!(!is_stale(&[rev_nat_pair(other, backend)], &[&departed]));
        // An unconnected socket's several translations, one of them stale.
        let elsewhere = (Ipv4Addr::new(10, 244, 0, 11), 5353);
        assert!(is_stale(
            &[
                rev_nat_pair(other, elsewhere),
                rev_nat_pair(frontend, backend)
            ],
            &[&departed]
        ));
    }

    #[test]
    fn each_namespace_is_listed_once_and_this_one_first() {
        let namespaces = network_namespaces();
        assert_eq!(namespaces[0], std::path::Path::new("/proc/self/ns/net"));
        let mut inodes: Vec<u64> = namespaces
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.ino())
            .collect();
        let all = inodes.len();
        inodes.sort_unstable();
        inodes.dedup();
        assert_eq!(inodes.len(), all);
    }
}
