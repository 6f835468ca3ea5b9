//! sock_diag over netlink, as much of it as the agent needs: list a
//! namespace's sockets of one family and protocol (with their values in a
//! socket-local storage map, `INET_DIAG_REQ_SK_BPF_STORAGES`, which the
//! kernel gives for TCP sockets only), and end one (`SOCK_DESTROY`); and
//! move the calling thread into a network namespace.
//! Wire formats from linux/sock_diag.h and linux/inet_diag.h.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use crate::netlink::{self, NLA_F_NESTED, find_attr, push_attr, u32_at};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
/// `struct inet_diag_sockid`: ports, addresses, interface and cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, the socket id,
/// then five u32s.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// A socket as sock_diag names it, cookie included: what `SOCK_DESTROY`
/// wants back.
pub type SocketId = [u8; SOCKID_LEN];

/// One listed socket.
pub struct Listed<'a> {
    pub id: SocketId,
    /// The remote address and port; an IPv4-mapped IPv6 address as the
    /// IPv4 address it stands for.
    pub peer: (IpAddr, u16),
    /// The socket's cookie, as `bpf_get_socket_cookie` gives it.
    pub cookie: u64,
    /// The socket's value in the storage map, if it has one.
    pub storage: Option<&'a [u8]>,
}

/// A sock_diag socket, in the network namespace of the thread that made it.
pub struct SockDiag(netlink::Socket);

impl SockDiag {
    pub fn open() -> io::Result<Self> {
        netlink::Socket::open(libc::NETLINK_SOCK_DIAG).map(Self)
    }

    /// Lists the sockets of `family` (`AF_INET` or `AF_INET6`) and `proto`
    /// in any of `states` (a bit per TCP state), each with its value in
    /// `storage` if given. The kernel reports socket-local storage for TCP
    /// sockets only.
    pub fn list(
        &self,
        family: u8,
        proto: u8,
        states: u32,
        storage: Option<BorrowedFd<'_>>,
        mut each: impl FnMut(Listed<'_>),
    ) -> io::Result<()> {
        let mut request = request(family, proto, states, &[0; SOCKID_LEN]);
        if let Some(storage) = storage {
            let mut map = Vec::new();
            let fd = u32::try_from(storage.as_raw_fd()).unwrap_or(u32::MAX);
            push_attr(&mut map, SK_DIAG_BPF_STORAGE_REQ_MAP_FD, &fd.to_ne_bytes());
            push_attr(
                &mut request,
                INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED,
                &map,
            );
        }
        self.0.send(
            SOCK_DIAG_BY_FAMILY,
            libc::NLM_F_REQUEST | libc::NLM_F_DUMP,
            &request,
        )?;
        self.0.receive(|kind, message| {
            if kind == SOCK_DIAG_BY_FAMILY
                && let Some(listed) = listed(message)
            {
                each(listed);
            }
        })
    }

    /// Ends the socket `id` of `proto`: its owner's next call fails with
    /// ECONNABORTED. ENOENT when it closed meanwhile.
    pub fn destroy(&self, family: u8, proto: u8, id: &SocketId) -> io::Result<()> {
        self.0.send(
            SOCK_DESTROY,
            libc::NLM_F_REQUEST | libc::NLM_F_ACK,
            &request(family, proto, u32::MAX, id),
        )?;
        self.0.receive(|_, _| {})
    }
}

/// Moves the calling thread, and only it, into the network namespace
/// `namespace` (a /proc/PID/ns/net or /run/netns file).
pub fn enter_network_namespace(namespace: &fs::File) -> io::Result<()> {
    // SAFETY: setns with an open namespace file; it changes only this
    // thread's namespace.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An `inet_diag_msg` and its attributes, as the agent reads them.
fn listed(message: &[u8]) -> Option<Listed<'_>> {
    let id: SocketId = message.get(4..4 + SOCKID_LEN)?.try_into().ok()?;
    // idiag_dst: four words, of which IPv4 uses the first.
    let peer_ip = if i32::from(*message.first()?) == libc::AF_INET6 {
        let octets: [u8; 16] = id[20..36].try_into().ok()?;
        Ipv6Addr::from(octets).to_canonical()
    } else {
        IpAddr::V4(Ipv4Addr::new(id[20], id[21], id[22], id[23]))
    };
    let peer = (peer_ip, u16::from_be_bytes([id[2], id[3]]));
    // idiag_cookie: the low half first, each in host order.
    let cookie = u64::from(u32_at(&id, 40)) | u64::from(u32_at(&id, 44)) << 32;
    Some(Listed {
        id,
        peer,
        cookie,
        storage: message.get(DIAG_MSG_LEN..).and_then(storage_value),
    })
}

/// The storage map's value among a listed socket's attributes.
fn storage_value(attributes: &[u8]) -> Option<&[u8]> {
    let storages = find_attr(attributes, INET_DIAG_SK_BPF_STORAGES)?;
    let storage = find_attr(storages, SK_DIAG_BPF_STORAGE)?;
    find_attr(storage, SK_DIAG_BPF_STORAGE_MAP_VALUE)
}

/// `struct inet_diag_req_v2` for sockets of `family` and `proto`.
fn request(family: u8, proto: u8, states: u32, id: &SocketId) -> Vec<u8> {
    let mut request = vec![family, proto, 0, 0];
    request.extend_from_slice(&states.to_ne_bytes());
    request.extend_from_slice(id);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listed socket as the kernel sends it: peer 10.244.0.10:5353, a
    /// congestion-control attribute, then the storage's value.
    fn message(value: &[u8]) -> Vec<u8> {
        let mut message = vec![2, 1, 0, 0];
        let mut id = [0_u8; SOCKID_LEN];
        id[2..4].copy_from_slice(&5353_u16.to_be_bytes());
        id[20..24].copy_from_slice(&[10, 244, 0, 10]);
        id[40..44].copy_from_slice(&7_u32.to_ne_bytes());
        id[44..48].copy_from_slice(&1_u32.to_ne_bytes());
        message.extend_from_slice(&id);
        message.resize(DIAG_MSG_LEN, 0);
        push_attr(&mut message, 4, b"cubic");
        let mut storage = Vec::new();
        push_attr(&mut storage, 2, &7_u32.to_ne_bytes());
        push_attr(&mut storage, SK_DIAG_BPF_STORAGE_MAP_VALUE, value);
        let mut storages = Vec::new();
        push_attr(&mut storages, SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &storage);
        push_attr(
            &mut message,
            INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED,
            &storages,
        );
        message
    }

    #[test]
    fn a_listed_socket_gives_its_peer_and_its_storage_through_the_nesting() {
        let message = message(b"value!");
        let listed = listed(&message).unwrap();
        assert_eq!(listed.peer, (Ipv4Addr::new(10, 244, 0, 10).into(), 5353));
        assert_eq!(listed.cookie, (1 << 32) | 7);
        assert_eq!(listed.storage, Some(&b"value!"[..]));
        assert_eq!(listed.id[..], message[4..4 + SOCKID_LEN]);
        // Cut short: no storage, and no panic.
        assert!(listed_storage(&message[..DIAG_MSG_LEN + 12]).is_none());
        assert!(super::listed(&message[..10]).is_none());
    }

    #[test]
    fn an_ipv6_socket_gives_its_peer_and_a_mapped_one_the_ipv4_address() {
        let ipv6 = |dst: Ipv6Addr| {
            let mut message = message(b"");
            message[0] = u8::try_from(libc::AF_INET6).unwrap();
            message[4 + 20..4 + 36].copy_from_slice(&dst.octets());
            message
        };
        let pod: Ipv6Addr = "fd00:10:244::10".parse().unwrap();
        assert_eq!(listed(&ipv6(pod)).unwrap().peer, (pod.into(), 5353));
        let mapped = Ipv4Addr::new(10, 244, 0, 10).to_ipv6_mapped();
        assert_eq!(
            listed(&ipv6(mapped)).unwrap().peer,
            (Ipv4Addr::new(10, 244, 0, 10).into(), 5353)
        );
    }

    fn listed_storage(message: &[u8]) -> Option<&[u8]> {
        listed(message)?.storage
    }
}
