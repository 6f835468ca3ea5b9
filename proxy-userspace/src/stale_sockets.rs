//! Sockets leave backends that left their Service. Socket-level balancing
//! picks a backend once per socket, so a connected UDP socket (a DNS
//! client, a metrics pusher) would go on sending to a backend long after
//! it left the Service: the blackhole kube-proxy avoids by flushing
//! conntrack. When a backend leaves a frontend, the sockets that
//! `connect4` or `connect6` translated from that frontend to that backend
//! (an IPv6 socket's IPv4-mapped translation counting as the IPv4 one) are
//! ended with `SOCK_DESTROY` over sock_diag, in every network namespace of
//! the node (the node's and its pods'): the application gets ECONNABORTED
//! and connects again, to a live backend.
//!
//! Only sockets the datapath translated are touched, and only when their
//! translation names both the frontend and the backend that left: for UDP
//! the translation the connect hook noted under the socket's cookie
//! (`lb4_udp_conn_v2` and `lb6_udp_conn_v1`, whose entries `sock_release`
//! deletes with their sockets; and, after an upgrade, `lb4_udp_conn_v1`
//! while it is pinned, for the sockets connected before it); for TCP the
//! socket's own storage, which sock_diag
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
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    sync::mpsc,
};

use aya::maps::{HashMap, Map, MapData};
use proxy_common::{Ip4, Ip6, PROTO_TCP, PROTO_UDP, RevNatPair, SockRevNat};
use tracing::{debug, info, warn};

use crate::{
    maps::encoding::{HostPort, MapAddress, rev_nat_addresses},
    reconcile::table::TableEvent,
    sock_diag::{Listed, SockDiag, SocketId, enter_network_namespace},
};

/// A backend that left a frontend, both as the datapath holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Departure {
    frontend: HostPort,
    backend: HostPort,
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

/// Where the translations of one family's sockets are: each TCP socket's
/// storage, and the connected UDP sockets' map.
pub struct FamilyTranslations<A: MapAddress> {
    storage: MapData,
    udp_connected: HashMap<MapData, u64, RevNatPair<A>>,
}

impl<A: MapAddress> FamilyTranslations<A> {
    fn open(pins: &crate::maps::Pins) -> io::Result<Self> {
        let storage = MapData::from_pin(pins.map(A::MAPS.sock_rev_nat)).map_err(invalid)?;
        let udp_connected = MapData::from_pin(pins.map(A::MAPS.udp_connected))
            .map_err(invalid)
            .and_then(|data| HashMap::try_from(Map::HashMap(data)).map_err(invalid))?;
        Ok(Self {
            storage,
            udp_connected,
        })
    }

    /// The translations a listed socket of `proto` carries, from its
    /// storage (TCP) or the connected-UDP map.
    fn of(&self, listed: &Listed<'_>, proto: u8) -> Option<Vec<(HostPort, HostPort)>> {
        let pairs = if proto == PROTO_UDP {
            vec![self.udp_connected.get(&listed.cookie, 0).ok()?]
        } else {
            bytemuck::try_pod_read_unaligned::<SockRevNat<A>>(listed.storage?)
                .ok()?
                .pairs
                .to_vec()
        };
        Some(pairs.iter().filter_map(rev_nat_addresses).collect())
    }
}

fn invalid(error: aya::maps::MapError) -> io::Error {
    io::Error::other(error)
}

/// Where the translations of sockets are, for both families.
pub struct Translations {
    ipv4: FamilyTranslations<Ip4>,
    ipv6: FamilyTranslations<Ip6>,
    /// [`UDP_CONNECTED_V1_MAP`], while an upgraded datapath keeps it.
    udp_connected_v1: Option<HashMap<MapData, u64, RevNatPair>>,
}

impl Translations {
    /// Opens the maps from their pins.
    pub fn open(pins: &crate::maps::Pins) -> io::Result<Self> {
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
            ipv4: FamilyTranslations::open(pins)?,
            ipv6: FamilyTranslations::open(pins)?,
            udp_connected_v1,
        })
    }

    /// The translations a listed socket of `family` and `proto` carries.
    fn of(&self, family: u8, listed: &Listed<'_>, proto: u8) -> Vec<(HostPort, HostPort)> {
        if i32::from(family) == libc::AF_INET6 {
            return self.ipv6.of(listed, proto).unwrap_or_default();
        }
        self.ipv4
            .of(listed, proto)
            .or_else(|| {
                let map = self
                    .udp_connected_v1
                    .as_ref()
                    .filter(|_| proto == PROTO_UDP)?;
                let pair = map.get(&listed.cookie, 0).ok()?;
                Some(rev_nat_addresses(&pair).into_iter().collect())
            })
            .unwrap_or_default()
    }

    /// The storage map of `family`'s sockets.
    fn storage(&self, family: u8) -> &MapData {
        if i32::from(family) == libc::AF_INET6 {
            &self.ipv6.storage
        } else {
            &self.ipv4.storage
        }
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
    pub fn follow<A: MapAddress>(&self, events: &[TableEvent<A>]) {
        let departures: Vec<Departure> = events
            .iter()
            .filter_map(|event| match *event {
                TableEvent::BackendLeft { frontend, backend } => Some(Departure {
                    frontend: (frontend.ip, frontend.port),
                    backend: (backend.ip, backend.port),
                    proto: frontend.protocol.number(),
                }),
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
        for family in [libc::AF_INET, libc::AF_INET6] {
            let family = u8::try_from(family).unwrap_or_default();
            for &proto in &protocols {
                match end_in_this_namespace(translations, family, proto, departures) {
                    Ok(n) => ended += n,
                    Err(error) => {
                        warn!(namespace = %namespace.display(), %error, "cannot list or end sockets");
                    }
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

/// Lists the sockets of `family` and `proto` in the current network
/// namespace, and ends those translated to a departed backend. An IPv6
/// socket may hold a translation of an IPv4 Service (an IPv4-mapped
/// address); mapped addresses compare as the IPv4 ones.
fn end_in_this_namespace(
    translations: &Translations,
    family: u8,
    proto: u8,
    departures: &[Departure],
) -> io::Result<usize> {
    let diag = SockDiag::open()?;
    // Connected UDP sockets are in TCP_ESTABLISHED; TCP: all but listeners.
    let (states, storage) = if proto == PROTO_TCP {
        (
            !(1 << TCP_LISTEN),
            Some(translations.storage(family).fd().as_fd()),
        )
    } else {
        (1 << TCP_ESTABLISHED, None)
    };
    let mut stale: Vec<SocketId> = Vec::new();
    diag.list(family, proto, states, storage, |listed| {
        let connected_to: Vec<&Departure> = departures
            .iter()
            .filter(|d| d.proto == proto && d.backend == listed.peer)
            .collect();
        if !connected_to.is_empty()
            && is_stale(&translations.of(family, &listed, proto), &connected_to)
        {
            stale.push(listed.id);
        }
    })?;
    let mut ended = 0;
    for id in stale {
        match diag.destroy(family, proto, &id) {
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
fn is_stale(translations: &[(HostPort, HostPort)], departures: &[&Departure]) -> bool {
    departures.iter().any(|departure| {
        translations.iter().any(|(frontend, backend)| {
            *frontend == departure.frontend && *backend == departure.backend
        })
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn only_sockets_translated_from_the_frontend_to_the_departed_backend_are_stale() {
        let frontend = (Ipv4Addr::new(10, 96, 0, 10).into(), 53);
        let backend = (Ipv4Addr::new(10, 244, 0, 10).into(), 5353);
        let departed = Departure {
            frontend,
            backend,
            proto: PROTO_UDP,
        };
        assert!(is_stale(&[(frontend, backend)], &[&departed]));
        // Straight to the pod: no translation names it.
        assert!(!is_stale(&[], &[&departed]));
        // Through another Service that keeps this backend.
        let other = (Ipv4Addr::new(10, 96, 0, 11).into(), 53);
        assert!(!is_stale(&[(other, backend)], &[&departed]));
        // An unconnected socket's several translations, one of them stale.
        let elsewhere = (Ipv4Addr::new(10, 244, 0, 11).into(), 5353);
        assert!(is_stale(
            &[(other, elsewhere), (frontend, backend)],
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
