//! Which interfaces NodePort and external traffic arrive on, so the tc
//! programs know where to attach: those named by `--devices`, or by
//! default those carrying a NodePort address. Read from getifaddrs(3) on
//! the loop's timer: a device named in `--devices` that does not exist yet
//! is a warning, and is picked up when it appears.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};
use tracing::{info, warn};

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
}

#[derive(Debug, thiserror::Error)]
#[error("cannot list the network interfaces")]
pub struct DevicesError(#[source] nix::Error);

/// The interfaces of the agent's network namespace, with their IPv4 and
/// IPv6 addresses (an interface without one is listed too). Link-local
/// IPv6 addresses are left out: every interface has one, and a NodePort
/// is no use on an address that needs a zone to be reached.
pub fn read() -> Result<Vec<Interface>, DevicesError> {
    let mut interfaces: BTreeMap<String, Interface> = BTreeMap::new();
    for entry in getifaddrs().map_err(DevicesError)? {
        let interface = interfaces
            .entry(entry.interface_name.clone())
            .or_insert_with(|| Interface {
                name: entry.interface_name.clone(),
                index: nix::net::if_::if_nametoindex(entry.interface_name.as_str()).unwrap_or(0),
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

/// The devices as last seen, so only changes are logged.
#[derive(Debug, Default)]
pub struct DeviceWatch {
    requested: Vec<String>,
    chosen: Option<Choice>,
    /// The chosen devices' indexes.
    indexes: BTreeMap<String, u32>,
}

impl DeviceWatch {
    #[must_use]
    pub fn new(requested: Vec<String>) -> Self {
        Self {
            requested,
            chosen: None,
            indexes: BTreeMap::new(),
        }
    }

    /// Chooses again; logs what changed and returns the devices when they
    /// did.
    pub fn update(
        &mut self,
        interfaces: &[Interface],
        node_addresses: &BTreeSet<IpAddr>,
    ) -> Option<&BTreeSet<String>> {
        let choice = choose(interfaces, &self.requested, node_addresses);
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
        let indexes: BTreeMap<String, u32> = interfaces
            .iter()
            .filter(|i| choice.devices.contains(&i.name))
            .map(|i| (i.name.clone(), i.index))
            .collect();
        for (name, index) in &indexes {
            if self.indexes.get(name).is_some_and(|old| old != index) {
                info!(device = %name, "a device was made again; attaching to it anew");
            }
        }
        let changed = choice.devices != old.devices || indexes != self.indexes;
        self.indexes = indexes;
        if changed {
            let list: Vec<&str> = choice.devices.iter().map(String::as_str).collect();
            info!(
                devices = %list.join(","),
                "devices for NodePort and external traffic"
            );
        }
        let chosen = self.chosen.insert(choice);
        changed.then_some(&chosen.devices)
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
        }
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
        let mut watch = DeviceWatch::new(vec!["bond0".to_owned()]);
        let none = BTreeSet::new();
        assert_eq!(watch.update(&node(), &none), None, "nothing to attach yet");
        let mut later = node();
        later.push(interface("bond0", &["192.168.100.11"]));
        assert_eq!(watch.update(&later, &none), Some(&set(&["bond0"])));
        assert_eq!(watch.update(&later, &none), None, "no change, no news");
        // Deleted and made again: a new index, attached again.
        later.last_mut().unwrap().index = 9;
        assert_eq!(watch.update(&later, &none), Some(&set(&["bond0"])));
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
