//! Netlink, as much of it as the agent needs: a socket of one netlink
//! protocol, a request sent on it, the answers read until the dump ends or
//! the request is acknowledged, and the attributes of a message. Used by
//! sock_diag (ending sockets) and rtnetlink (the node's links).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
pub const NLMSG_HDR_LEN: usize = 16;

/// A netlink socket, in the network namespace of the thread that made it.
pub struct Socket(OwnedFd);

impl Socket {
    /// A socket of `protocol` (`NETLINK_SOCK_DIAG`, `NETLINK_ROUTE`).
    pub fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: a plain socket call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A socket of `protocol` that hears the kernel's notices to the
    /// multicast `groups` (`RTMGRP_LINK` and the like).
    pub fn subscribe(protocol: libc::c_int, groups: u32) -> io::Result<Self> {
        let socket = Self::open(protocol)?;
        // SAFETY: an all-zero sockaddr_nl is valid; the fields are set next.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or_default();
        address.nl_groups = groups;
        // SAFETY: the address is this frame's, of the length given.
        let bound = unsafe {
            libc::bind(
                socket.0.as_raw_fd(),
                (&raw const address).cast(),
                libc::socklen_t::try_from(size_of::<libc::sockaddr_nl>()).unwrap_or_default(),
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    /// Waits for the next notice and drops it: what it says is read anew
    /// by whoever listens. An overrun (ENOBUFS: notices were lost) is a
    /// notice too.
    pub fn wait(&self) -> io::Result<()> {
        let mut buffer = [0_u8; 8192];
        // SAFETY: the buffer is valid for its length.
        let got = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if got < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(error);
            }
        }
        Ok(())
    }

    pub fn send(&self, kind: u16, flags: libc::c_int, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(NLMSG_HDR_LEN + payload.len()).unwrap_or(u32::MAX);
        let mut message = Vec::with_capacity(NLMSG_HDR_LEN + payload.len());
        message.extend_from_slice(&len.to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&u16::try_from(flags).unwrap_or_default().to_ne_bytes());
        message.extend_from_slice(&1_u32.to_ne_bytes());
        message.extend_from_slice(&0_u32.to_ne_bytes());
        message.extend_from_slice(payload);
        // SAFETY: the buffer is valid for its length.
        let sent = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads answers until the dump ends or the request is acknowledged,
    /// handing each message's type and payload to `each`.
    pub fn receive(&self, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            // SAFETY: the buffer is valid for its length.
            let got = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            let Ok(got) = usize::try_from(got) else {
                return Err(io::Error::last_os_error());
            };
            let mut messages = &buffer[..got];
            while messages.len() >= NLMSG_HDR_LEN {
                let len = usize::try_from(u32_at(messages, 0)).unwrap_or(usize::MAX);
                if len < NLMSG_HDR_LEN || len > messages.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a truncated netlink message",
                    ));
                }
                let kind = u16::from_ne_bytes([messages[4], messages[5]]);
                let payload = &messages[NLMSG_HDR_LEN..len];
                match i32::from(kind) {
                    libc::NLMSG_DONE => return Ok(()),
                    libc::NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(u32_at(payload, 0).to_ne_bytes());
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => each(kind, payload),
                }
                messages = messages.get(align4(len)..).unwrap_or_default();
            }
        }
    }
}

pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The value of the attribute `wanted` among `attributes`, nested or not.
pub fn find_attr(mut attributes: &[u8], wanted: u16) -> Option<&[u8]> {
    while attributes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attributes.len() {
            return None;
        }
        if kind == wanted {
            return Some(&attributes[4..len]);
        }
        attributes = attributes.get(align4(len)..).unwrap_or_default();
    }
    None
}

pub const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Appends an attribute, padded to four bytes.
pub fn push_attr(buffer: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buffer.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    buffer.extend_from_slice(&kind.to_ne_bytes());
    buffer.extend_from_slice(value);
    buffer.resize(align4(buffer.len()), 0);
}
