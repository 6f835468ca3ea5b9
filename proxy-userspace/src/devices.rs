//! Which interfaces the tc programs attach to: those NodePort and
//! external traffic arrive on (named by `--devices`, or by default those
//! carrying a NodePort address), and with `--socket-lb-scope=host` the
//! pods' interfaces (named by `--pod-devices`, or by default every veth
//! whose peer is in another network namespace). Read from getifaddrs(3)
//! and rtnetlink on the loop's timer: a device named in `--devices` that
//! does not exist yet is a warning, and is picked up when it appears; so
//! are new pods' interfaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
};

use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};
pub use proxy_common::DeviceRole;
use tracing::{info, warn};

use crate::netlink::{self, find_attr};

/// `--devices none`: attach the tc programs nowhere.
pub const NO_DEVICES: &str = "none";

/// One network interface of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// The kernel's index: a device deleted and made again under the same
    /// name gets a new one, and the tc programs must be attached again.
    pub index: u32,
    pub loopback: bool,
    pub addresses: BTreeSet<IpAddr>,
    /// The kind of link (`veth`, `bridge`, ...), as rtnetlink names it;
    /// empty for a physical device.
    pub kind: String,
    /// A veth whose peer is in another network namespace: on a node, a
    /// pod's interface seen from the host (or, in a node that is itself a
    /// container, its own uplink, which carries addresses).
    pub veth_to_other_namespace: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("cannot list the network interfaces")]
    Addresses(#[source] nix::Error),
    #[error("cannot list the network links (rtnetlink)")]
    Links(#[source] io::Error),
}

/// The interfaces of the agent's network namespace, with their IPv4 and
/// IPv6 addresses (an interface without one is listed too). Link-local
/// IPv6 addresses are left out: every interface has one, and a NodePort
/// is no use on an address that needs a zone to be reached.
pub fn read() -> Result<Vec<Interface>, DevicesError> {
    let links = links().map_err(DevicesError::Links)?;
    let mut interfaces: BTreeMap<String, Interface> = BTreeMap::new();
    for entry in getifaddrs().map_err(DevicesError::Addresses)? {
        let interface = interfaces
            .entry(entry.interface_name.clone())
            .or_insert_with(|| Interface {
                name: entry.interface_name.clone(),
                index: nix::net::if_::if_nametoindex(entry.interface_name.as_str()).unwrap_or(0),
                kind: links
                    .get(&entry.interface_name)
                    .map(|link| link.kind.clone())
                    .unwrap_or_default(),
                veth_to_other_namespace: links
                    .get(&entry.interface_name)
                    .is_some_and(|link| link.kind == "veth" && link.peer_elsewhere),
                ..Interface::default()
            });
        interface.loopback |= entry.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        let Some(address) = entry.address.as_ref() else {
            continue;
        };
        if let Some(v4) = address.as_sockaddr_in() {
            interface.addresses.insert(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = address.as_sockaddr_in6()
            && !v6.ip().is_unicast_link_local()
        {
            interface.addresses.insert(IpAddr::V6(v6.ip()));
        }
    }
    Ok(interfaces.into_values().collect())
}

/// Follows the kernel's notices of links and addresses coming and going
/// on a thread of its own, with a unit on `changed` for each: a new pod's
/// interface gets its programs before the pod's first connection, not a
/// housekeeping period later.
pub fn follow_links(changed: tokio::sync::mpsc::UnboundedSender<()>) -> io::Result<()> {
    const GROUPS: u32 =
        (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
    let socket = netlink::Socket::subscribe(libc::NETLINK_ROUTE, GROUPS)?;
    std::thread::Builder::new()
        .name("links".to_owned())
        .spawn(move || {
            loop {
                if let Err(error) = socket.wait() {
                    warn!(%error, "cannot follow the links' notices; interfaces are looked at every --iptables-sync-period");
                    return;
                }
                if changed.send(()).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

/// `struct ifinfomsg`: family, type, index, flags, change mask.
const IFINFOMSG_LEN: usize = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;

/// What rtnetlink says of a link that getifaddrs(3) does not.
#[derive(Debug, PartialEq, Eq)]
struct Link {
    kind: String,
    /// Its peer (a veth's other end) is in another network namespace.
    peer_elsewhere: bool,
}

/// This namespace's links, by name: asked over a socket, so of the
/// caller's namespace, where /sys/class/net is of the namespace sysfs was
/// mounted in (which `nsenter --net` does not change).
fn links() -> io::Result<BTreeMap<String, Link>> {
    let socket = netlink::Socket::open(libc::NETLINK_ROUTE)?;
    socket.send(
        libc::RTM_GETLINK,
        libc::NLM_F_REQUEST | libc::NLM_F_DUMP,
        &[0; IFINFOMSG_LEN],
    )?;
    let mut links = BTreeMap::new();
    socket.receive(|kind, message| {
        if kind == libc::RTM_NEWLINK
            && let Some((name, link)) = link(message)
        {
            links.insert(name, link);
        }
    })?;
    Ok(links)
}

/// The link an RTM_NEWLINK message describes: its kind, and whether the
/// kernel names its peer's namespace (`IFLA_LINK_NETNSID`), which it does
/// for a peer in another one.
fn link(message: &[u8]) -> Option<(String, Link)> {
    let attributes = message.get(IFINFOMSG_LEN..)?;
    let name = c_string(find_attr(attributes, IFLA_IFNAME)?);
    let kind = find_attr(attributes, IFLA_LINKINFO)
        .and_then(|info| find_attr(info, IFLA_INFO_KIND))
        .map(c_string)
        .unwrap_or_default();
    Some((
        String::from_utf8_lossy(name).into_owned(),
        Link {
            kind: String::from_utf8_lossy(kind).into_owned(),
            peer_elsewhere: find_attr(attributes, IFLA_LINK_NETNSID).is_some(),
        },
    ))
}

/// A netlink string attribute without its terminating NUL.
fn c_string(value: &[u8]) -> &[u8] {
    value.split(|b| *b == 0).next().unwrap_or_default()
}

/// Every address of the node.
#[must_use]
pub fn host_addresses(interfaces: &[Interface]) -> BTreeSet<IpAddr> {
    interfaces
        .iter()
        .flat_map(|i| i.addresses.iter().copied())
        .collect()
}

/// The devices to attach to, and those `--devices` names that are missing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Choice {
    pub devices: BTreeSet<String>,
    pub missing: BTreeSet<String>,
}

/// `--devices` when given (those that exist; `none` for no device at all,
/// where NodePorts are served to local sockets only), else every interface
/// but loopback that carries one of `node_addresses`.
#[must_use]
pub fn choose(
    interfaces: &[Interface],
    requested: &[String],
    node_addresses: &BTreeSet<IpAddr>,
) -> Choice {
    if requested == [NO_DEVICES] {
        return Choice::default();
    }
    if requested.is_empty() {
        return Choice {
            devices: interfaces
                .iter()
                .filter(|i| !i.loopback && !i.addresses.is_disjoint(node_addresses))
                .map(|i| i.name.clone())
                .collect(),
            missing: BTreeSet::new(),
        };
    }
    let (devices, missing) = requested
        .iter()
        .cloned()
        .partition(|name| interfaces.iter().any(|i| &i.name == name));
    Choice { devices, missing }
}

/// `--socket-lb-scope=host`: the pods' interfaces, on the host's side.
/// Those whose names match `--pod-devices` (globs, `*` for any run of
/// characters) when given, else every veth whose peer is in another
/// namespace and that carries no address (a pod's does not; a node's
/// uplink does). Never one of `node_devices`: what comes in there is the
/// outside's, which those devices' own programs serve.
#[must_use]
pub fn choose_pod_devices(
    interfaces: &[Interface],
    patterns: &[String],
    node_devices: &BTreeSet<String>,
) -> BTreeSet<String> {
    interfaces
        .iter()
        .filter(|i| !i.loopback && !node_devices.contains(&i.name))
        .filter(|i| {
            if patterns.is_empty() {
                i.veth_to_other_namespace && i.addresses.is_empty()
            } else {
                patterns
                    .iter()
                    .any(|pattern| glob_matches(pattern, &i.name))
            }
        })
        .map(|i| i.name.clone())
        .collect()
}

/// Whether `name` matches `pattern`, where `*` stands for any run of
/// characters (none included) and everything else for itself.
fn glob_matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The devices as last seen, so only changes are logged.
#[derive(Debug, Default)]
pub struct DeviceWatch {
    requested: Vec<String>,
    /// `--pod-devices`, with `--socket-lb-scope=host`; `None` for no pod
    /// devices at all.
    pod_patterns: Option<Vec<String>>,
    chosen: Option<Choice>,
    /// Every device attached to, with its role.
    roles: BTreeMap<String, DeviceRole>,
    /// The chosen devices' indexes.
    indexes: BTreeMap<String, u32>,
}

impl DeviceWatch {
    #[must_use]
    pub fn new(requested: Vec<String>, pod_patterns: Option<Vec<String>>) -> Self {
        Self {
            requested,
            pod_patterns,
            chosen: None,
            roles: BTreeMap::new(),
            indexes: BTreeMap::new(),
        }
    }

    /// Chooses again; logs what changed and returns every device and its
    /// role when they did.
    pub fn update(
        &mut self,
        interfaces: &[Interface],
        node_addresses: &BTreeSet<IpAddr>,
    ) -> Option<&BTreeMap<String, DeviceRole>> {
        let choice = choose(interfaces, &self.requested, node_addresses);
        let pods = self
            .pod_patterns
            .as_ref()
            .map_or_else(BTreeSet::new, |patterns| {
                choose_pod_devices(interfaces, patterns, &choice.devices)
            });
        let old = self.chosen.take().unwrap_or_default();
        for name in choice.missing.difference(&old.missing) {
            warn!(
                device = %name,
                "--devices names an interface that does not exist; it is used when it appears"
            );
        }
        for name in old.missing.intersection(&choice.devices) {
            info!(device = %name, "an interface named in --devices appeared");
        }
        let roles: BTreeMap<String, DeviceRole> = choice
            .devices
            .iter()
            .map(|name| (name.clone(), DeviceRole::Node))
            .chain(pods.iter().map(|name| (name.clone(), DeviceRole::Pod)))
            .collect();
        let indexes: BTreeMap<String, u32> = interfaces
            .iter()
            .filter(|i| roles.contains_key(&i.name))
            .map(|i| (i.name.clone(), i.index))
            .collect();
        for (name, index) in &indexes {
            if self.indexes.get(name).is_some_and(|old| old != index) {
                info!(device = %name, "a device was made again; attaching to it anew");
            }
        }
        if choice.devices != old.devices {
            let list: Vec<&str> = choice.devices.iter().map(String::as_str).collect();
            info!(
                devices = %list.join(","),
                "devices for NodePort and external traffic"
            );
        }
        log_pod_devices(&self.roles, &roles);
        let changed = roles != self.roles || indexes != self.indexes;
        self.indexes = indexes;
        self.roles = roles;
        self.chosen = Some(choice);
        changed.then_some(&self.roles)
    }
}

/// Logs the pods' interfaces that came and went: one line per change, not
/// the whole list, which grows with the pods.
fn log_pod_devices(old: &BTreeMap<String, DeviceRole>, new: &BTreeMap<String, DeviceRole>) {
    let pods = |roles: &BTreeMap<String, DeviceRole>| -> BTreeSet<String> {
        roles
            .iter()
            .filter(|(_, role)| **role == DeviceRole::Pod)
            .map(|(name, _)| name.clone())
            .collect()
    };
    let (old, new) = (pods(old), pods(new));
    let list = |names: Vec<&String>| {
        names
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let added = list(new.difference(&old).collect());
    let gone = list(old.difference(&new).collect());
    if !added.is_empty() || !gone.is_empty() {
        info!(
            added = %added,
            gone = %gone,
            count = new.len(),
            "pods' interfaces, where their Service traffic is translated"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interface(name: &str, addresses: &[&str]) -> Interface {
        Interface {
            name: name.to_owned(),
            index: 1,
            loopback: name == "lo",
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            kind: String::new(),
            veth_to_other_namespace: false,
        }
    }

    /// A pod's interface, seen from the node.
    fn pod_veth(name: &str) -> Interface {
        Interface {
            veth_to_other_namespace: true,
            ..interface(name, &[])
        }
    }

    fn roles(node: &[&str], pods: &[&str]) -> BTreeMap<String, DeviceRole> {
        let role = |role| move |name: &&str| ((*name).to_owned(), role);
        node.iter()
            .map(role(DeviceRole::Node))
            .chain(pods.iter().map(role(DeviceRole::Pod)))
            .collect()
    }

    fn node() -> Vec<Interface> {
        vec![
            interface("lo", &["127.0.0.1"]),
            interface("eth0", &["192.168.100.11"]),
            interface("eth1", &["172.16.0.5"]),
            interface("br0", &["10.244.1.1"]),
            interface("dummy0", &[]),
        ]
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn by_default_the_interfaces_with_node_addresses_are_chosen() {
        let addresses = [
            "192.168.100.11".parse().unwrap(),
            "172.16.0.5".parse().unwrap(),
        ]
        .into_iter()
        .collect();
        let choice = choose(&node(), &[], &addresses);
        assert_eq!(choice.devices, set(&["eth0", "eth1"]));
        assert!(choice.missing.is_empty());
        // Loopback never, even when its address is a NodePort address.
        let loopback = ["127.0.0.1".parse().unwrap()].into_iter().collect();
        assert!(choose(&node(), &[], &loopback).devices.is_empty());
    }

    #[test]
    fn devices_named_are_used_and_missing_ones_are_reported() {
        let requested = vec!["eth1".to_owned(), "bond0".to_owned()];
        let choice = choose(&node(), &requested, &BTreeSet::new());
        assert_eq!(choice.devices, set(&["eth1"]));
        assert_eq!(choice.missing, set(&["bond0"]));
    }

    #[test]
    fn devices_none_chooses_nothing() {
        let everything = host_addresses(&node());
        let choice = choose(&node(), &[NO_DEVICES.to_owned()], &everything);
        assert_eq!(choice, Choice::default());
    }

    #[test]
    fn a_named_device_that_appears_later_is_picked_up() {
        let mut watch = DeviceWatch::new(vec!["bond0".to_owned()], None);
        let none = BTreeSet::new();
        assert_eq!(watch.update(&node(), &none), None, "nothing to attach yet");
        let mut later = node();
        later.push(interface("bond0", &["192.168.100.11"]));
        assert_eq!(watch.update(&later, &none), Some(&roles(&["bond0"], &[])));
        assert_eq!(watch.update(&later, &none), None, "no change, no news");
        // Deleted and made again: a new index, attached again.
        later.last_mut().unwrap().index = 9;
        assert_eq!(watch.update(&later, &none), Some(&roles(&["bond0"], &[])));
    }

    #[test]
    fn pods_interfaces_are_the_veths_to_other_namespaces_without_addresses() {
        let mut interfaces = node();
        interfaces.extend([pod_veth("veth1"), pod_veth("lxc2")]);
        // A node that is itself a container: its uplink is a veth too.
        interfaces.push(Interface {
            veth_to_other_namespace: true,
            ..interface("eth9", &["172.18.0.2"])
        });
        let node_devices = set(&["eth0"]);
        assert_eq!(
            choose_pod_devices(&interfaces, &[], &node_devices),
            set(&["lxc2", "veth1"])
        );
        // Named by globs; a NodePort device never, even when named.
        let patterns = ["veth*".to_owned(), "eth*".to_owned(), "dummy0".to_owned()];
        assert_eq!(
            choose_pod_devices(&interfaces, &patterns, &node_devices),
            set(&["dummy0", "eth1", "eth9", "veth1"])
        );
    }

    #[test]
    fn globs_match_runs_of_characters() {
        for (pattern, name) in [
            ("veth*", "veth1"),
            ("*", "x"),
            ("a*b*c", "aXbYc"),
            ("eth0", "eth0"),
            ("*1", "veth1"),
            ("cali*", "cali"),
        ] {
            assert!(glob_matches(pattern, name), "{pattern} {name}");
        }
        for (pattern, name) in [
            ("veth*", "eth1"),
            ("eth0", "eth01"),
            ("a*b*c", "aXc"),
            ("*1", "veth2"),
            ("ab*ba", "aba"),
        ] {
            assert!(!glob_matches(pattern, name), "{pattern} {name}");
        }
    }

    #[test]
    fn pods_interfaces_come_and_go_with_host_scope_only() {
        let addresses = ["192.168.100.11".parse().unwrap()].into_iter().collect();
        let mut interfaces = node();
        interfaces.push(pod_veth("veth1"));
        let mut all = DeviceWatch::new(Vec::new(), None);
        assert_eq!(
            all.update(&interfaces, &addresses),
            Some(&roles(&["eth0"], &[]))
        );
        let mut host = DeviceWatch::new(Vec::new(), Some(Vec::new()));
        assert_eq!(
            host.update(&interfaces, &addresses),
            Some(&roles(&["eth0"], &["veth1"]))
        );
        interfaces.push(pod_veth("veth2"));
        assert_eq!(
            host.update(&interfaces, &addresses),
            Some(&roles(&["eth0"], &["veth1", "veth2"]))
        );
        assert_eq!(host.update(&interfaces, &addresses), None);
        interfaces.retain(|i| i.name != "veth1");
        assert_eq!(
            host.update(&interfaces, &addresses),
            Some(&roles(&["eth0"], &["veth2"]))
        );
    }

    /// A netlink answer as the kernel sends it for a veth whose peer is
    /// elsewhere, and for the same veth with its peer here.
    #[test]
    fn a_links_kind_and_its_peers_namespace_come_from_its_attributes() {
        let message = |netnsid: bool| {
            let mut message = vec![0_u8; IFINFOMSG_LEN];
            netlink::push_attr(&mut message, IFLA_IFNAME, b"veth7\0");
            let mut info = Vec::new();
            netlink::push_attr(&mut info, IFLA_INFO_KIND, b"veth\0");
            netlink::push_attr(&mut message, IFLA_LINKINFO | netlink::NLA_F_NESTED, &info);
            if netnsid {
                netlink::push_attr(&mut message, IFLA_LINK_NETNSID, &0_i32.to_ne_bytes());
            }
            message
        };
        let veth = |peer_elsewhere| {
            Some((
                "veth7".to_owned(),
                Link {
                    kind: "veth".to_owned(),
                    peer_elsewhere,
                },
            ))
        };
        assert_eq!(link(&message(true)), veth(true));
        assert_eq!(link(&message(false)), veth(false));
    }

    /// What the kernel lists here comes back one entry per interface, each
    /// with its own index and its IPv4 addresses: loopback, and only
    /// loopback, is flagged as such and holds 127.0.0.1.
    #[test]
    fn this_namespace_is_read_one_interface_each_with_its_addresses() {
        let interfaces = read().unwrap();
        let loopbacks: Vec<&Interface> = interfaces.iter().filter(|i| i.loopback).collect();
        let [loopback] = loopbacks.as_slice() else {
            panic!("one loopback interface: {interfaces:?}");
        };
        assert!(
            loopback
                .addresses
                .contains(&IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            "{interfaces:?}"
        );
        let indexes: BTreeSet<u32> = interfaces.iter().map(|i| i.index).collect();
        assert_eq!(indexes.len(), interfaces.len(), "{interfaces:?}");
        assert!(!indexes.contains(&0), "{interfaces:?}");
    }
}
