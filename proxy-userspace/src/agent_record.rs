//! What a running agent tells `doctor` and `explain` about itself, so that
//! on a node they need no flags: the source it reads (the manifests
//! directory, or the kubeconfig and the node name), its Service CIDRs and
//! NodePort settings, its cgroup, where it answers /healthz and the
//! masquerade bit.
//!
//! The agent writes it when it starts, to a file of its own under
//! [`RECORD_DIR`] named after its pin directory (bpffs holds only BPF
//! objects), root's and readable by all, and removes it when it exits. A
//! reader trusts it only while the agent that wrote it holds the pin
//! directory's lock, so a record left by a killed agent is never used.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{agent::AgentConfig, config::SourceArgs, maps::Pins, model::ModelConfig};

/// Where the records live: tmpfs, gone with a reboot as the agents are.
pub const RECORD_DIR: &str = "/run/ebpf-proxy";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub pid: u32,
    /// Absolute, as the agent resolved it.
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub service_cidrs: Vec<String>,
    /// `--nodeport-addresses` (or `nodePortAddresses`), as written.
    pub node_port_addresses: Vec<String>,
    /// `--nodeport-range`.
    pub node_port_range: String,
    /// The cgroup its socket programs are attached to.
    pub cgroup: PathBuf,
    pub healthz_bind_address: SocketAddr,
    pub masquerade_bit: u8,
}

impl AgentRecord {
    /// The record of an agent of `config` reading `source`, this process.
    #[must_use]
    pub fn of(config: &AgentConfig, source: &SourceArgs) -> Self {
        let absolute = |path: &Option<PathBuf>| {
            path.as_deref()
                .and_then(|path| std::path::absolute(path).ok())
        };
        Self {
            pid: std::process::id(),
            manifests: absolute(&source.manifests),
            kubeconfig: absolute(&source.kubeconfig),
            node_name: config.model.node_name.clone(),
            service_cidrs: config
                .model
                .service_cidrs
                .iter()
                .map(ToString::to_string)
                .collect(),
            node_port_addresses: config
                .model
                .node_port_addresses
                .iter()
                .map(ToString::to_string)
                .collect(),
            node_port_range: config.model.node_port_range.to_string(),
            cgroup: config.cgroup.clone(),
            healthz_bind_address: config.healthz_bind_address,
            masquerade_bit: config.masquerade_bit,
        }
    }

    /// `given` with what it leaves out taken from the agent's: its source
    /// (unless `given` names one), node name and Service CIDRs, so that a
    /// reader sees the Services as this agent does.
    #[must_use]
    pub fn source(&self, given: &SourceArgs) -> SourceArgs {
        let names_a_source = given.manifests.is_some() || given.kubeconfig.is_some();
        SourceArgs {
            manifests: if names_a_source {
                given.manifests.clone()
            } else {
                self.manifests.clone()
            },
            kubeconfig: if names_a_source {
                given.kubeconfig.clone()
            } else {
                self.kubeconfig.clone()
            },
            hostname_override: given
                .hostname_override
                .clone()
                .or_else(|| Some(self.node_name.clone())),
            service_cidr: if given.service_cidr.is_empty() {
                self.service_cidrs
                    .iter()
                    .filter_map(|cidr| cidr.parse().ok())
                    .collect()
            } else {
                given.service_cidr.clone()
            },
        }
    }

    /// The model's settings for `source` (see [`AgentRecord::source`]),
    /// with the agent's NodePort settings, so that a reader computes the
    /// same NodePorts.
    #[must_use]
    pub fn model_config(&self, source: &SourceArgs) -> ModelConfig {
        ModelConfig {
            node_port_addresses: self
                .node_port_addresses
                .iter()
                .filter_map(|address| address.parse().ok())
                .collect(),
            node_port_range: self.node_port_range.parse().unwrap_or_default(),
            ..source.model_config()
        }
    }

    /// Where this node's own tools reach /healthz: a wildcard bind is
    /// asked on loopback.
    #[must_use]
    pub fn healthz_address(&self) -> SocketAddr {
        let mut address = self.healthz_bind_address;
        match address.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => address.set_ip(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V6(ip) if ip.is_unspecified() => address.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
        address
    }
}

/// The record file of the agent on `pins`.
fn path_of(pins: &Pins) -> PathBuf {
    let root = std::path::absolute(pins.root()).unwrap_or_else(|_| pins.root().to_owned());
    let name = root.to_string_lossy().trim_matches('/').replace('/', "%2F");
    Path::new(RECORD_DIR).join(format!("{name}.json"))
}

/// The written record; dropping it removes the file.
#[derive(Debug)]
pub struct Written(PathBuf);

impl Drop for Written {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Writes `record` for the agent on `pins`, replacing the file whole so a
/// reader never sees half of it.
pub fn write(pins: &Pins, record: &AgentRecord) -> io::Result<Written> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(RECORD_DIR)?;
    let path = path_of(pins);
    let partial = path.with_extension(format!("json.{}", record.pid));
    let text = serde_json::to_string_pretty(record).map_err(io::Error::other)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&partial)?;
    io::Write::write_all(&mut file, text.as_bytes())?;
    fs::rename(&partial, &path)?;
    Ok(Written(path))
}

/// What is known of the agent on `pins`.
#[derive(Debug)]
pub enum Running {
    /// It runs, and this is its record.
    Agent(Box<AgentRecord>),
    /// An agent runs (this pid) but left no record: an older build, or
    /// one that could not write it.
    Unrecorded(u32),
    /// No agent holds the pins.
    None,
}

/// The record of the agent running on `pins`, if one runs.
#[must_use]
pub fn running(pins: &Pins) -> Running {
    let Some(pid) = pins.holder() else {
        return Running::None;
    };
    fs::read_to_string(path_of(pins))
        .ok()
        .and_then(|text| serde_json::from_str::<AgentRecord>(&text).ok())
        .filter(|record| record.pid == pid)
        .map_or(Running::Unrecorded(pid), |record| {
            Running::Agent(Box::new(record))
        })
}

impl Running {
    /// One line saying where the settings of `doctor` or `explain` came
    /// from, with the agent's pid.
    #[must_use]
    pub fn describe(&self, pins: &Pins) -> String {
        match self.pid() {
            Some(pid) => format!("{} (agent pid {pid})", self.origin(pins)),
            None => self.origin(pins),
        }
    }

    /// [`Running::describe`] without the pid, which changes with every
    /// restart: what `doctor`'s JSON says.
    #[must_use]
    pub fn origin(&self, pins: &Pins) -> String {
        let root = pins.root().display();
        match self {
            Self::Agent(_) => format!("the settings of the agent running on {root}"),
            Self::Unrecorded(_) => {
                format!("defaults: the agent on {root} left no record of its settings")
            }
            Self::None => format!("defaults: no agent runs on {root}"),
        }
    }

    /// The running agent's pid.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Agent(record) => Some(record.pid),
            Self::Unrecorded(pid) => Some(*pid),
            Self::None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_names_its_pins_and_asks_a_wildcard_healthz_on_loopback() {
        let pins = Pins::new(Path::new("/sys/fs/bpf/ebpf-proxy"));
        assert_eq!(
            path_of(&pins),
            Path::new("/run/ebpf-proxy/sys%2Ffs%2Fbpf%2Febpf-proxy.json")
        );
        let mut record = AgentRecord {
            pid: 7,
            manifests: None,
            kubeconfig: Some("/etc/kube.conf".into()),
            node_name: "node-1".into(),
            service_cidrs: vec!["10.96.0.0/12".into(), "fd10:96::/112".into()],
            node_port_addresses: vec!["192.168.100.0/24".into(), "primary".into()],
            node_port_range: "30000-32767".into(),
            cgroup: "/sys/fs/cgroup".into(),
            healthz_bind_address: "0.0.0.0:10256".parse().unwrap(),
            masquerade_bit: 14,
        };
        assert_eq!(record.healthz_address(), "127.0.0.1:10256".parse().unwrap());
        record.healthz_bind_address = "[::]:10256".parse().unwrap();
        assert_eq!(record.healthz_address(), "[::1]:10256".parse().unwrap());
        let none = SourceArgs {
            manifests: None,
            kubeconfig: None,
            hostname_override: None,
            service_cidr: Vec::new(),
        };
        let source = record.source(&none);
        assert_eq!(source.kubeconfig, record.kubeconfig);
        assert_eq!(source.hostname_override.as_deref(), Some("node-1"));
        assert_eq!(source.service_cidr.len(), 2);
        let model = record.model_config(&source);
        assert_eq!(model.node_port_addresses.len(), 2);
        assert_eq!(model.node_name, "node-1");
        // What is given wins, the rest is the agent's.
        let given = SourceArgs {
            manifests: Some("/tmp/m".into()),
            ..none
        };
        let source = record.source(&given);
        assert_eq!(
            (source.manifests, source.kubeconfig),
            (Some("/tmp/m".into()), None)
        );
        assert_eq!(source.hostname_override.as_deref(), Some("node-1"));
    }
}
