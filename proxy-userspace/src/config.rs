//! The agent's configuration: `run`'s flags, checked before anything on
//! the system is changed.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use tracing::{info, warn};

use crate::{
    agent::AgentConfig,
    agent_record::AgentRecord,
    datapath::MapSizes,
    kube_proxy_config::{self, KubeProxyConfig, NodePortAddress, parse_go_duration},
    logging::{LogFormat, LogSettings},
    maps::Pins,
    model::{Cidr, ModelConfig, PortRange},
    source::{Source, SourceError, kube::KubeSource, manifests::ManifestDir},
};

/// The default pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/ebpf-proxy";

/// `--bpffs`, shared by every command.
#[derive(Args)]
pub struct PinDir {
    /// Where maps and links are pinned.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

impl PinDir {
    #[must_use]
    pub fn pins(&self) -> Pins {
        Pins::new(&self.bpffs)
    }

    /// For errors of the commands that only read the pins.
    #[must_use]
    pub fn hint(&self) -> String {
        format!("is the agent set up at {}?", self.bpffs.display())
    }
}

/// `proxy-userspace run`.
#[derive(Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "command-line flags, as kube-proxy and Cilium name them"
)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// The cgroup (v2) whose sockets are load-balanced. Default: the
    /// cgroup2 root, from /proc/mounts.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    #[command(flatten)]
    pub pins: PinDir,
    /// At most one sync per this period; changes that come sooner are
    /// applied together (kube-proxy's --min-sync-period), e.g. 1s, 500ms.
    /// [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration)]
    pub min_sync_period: Option<Duration>,
    /// Where /healthz and /livez are served (kube-proxy's
    /// healthzBindAddress) [default: 0.0.0.0:10256]
    #[arg(long, value_name = "IP:PORT")]
    pub healthz_bind_address: Option<SocketAddr>,
    /// Where /metrics is served (kube-proxy's metricsBindAddress)
    /// [default: 127.0.0.1:10249]
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_bind_address: Option<SocketAddr>,
    /// kube-proxy's own KubeProxyConfiguration file
    /// (kubeproxy.config.k8s.io/v1alpha1), so a kube-proxy ConfigMap keeps
    /// working; flags of the same meaning override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// /healthz turns 503 when changes have waited this long to reach the
    /// maps; a failing source with nothing waiting does not turn it, as in
    /// kube-proxy.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_go_duration)]
    pub health_stale_after: Duration,
    /// Entries of the services map: one per Service port plus one per
    /// backend of it.
    #[arg(long, value_name = "N", default_value_t = MapSizes::default().services)]
    pub services_map_size: u32,
    /// Entries of the backends map: one per distinct endpoint address and port.
    #[arg(long, value_name = "N", default_value_t = MapSizes::default().backends)]
    pub backends_map_size: u32,
    /// Entries of the tc programs' frontend map (NodePorts on each node
    /// address, externalIPs, load-balancer IPs): one per frontend and one
    /// per backend of each.
    #[arg(long, value_name = "N", default_value_t = MapSizes::default().external_services)]
    pub external_services_map_size: u32,
    /// Entries of the tc programs' backend map.
    #[arg(long, value_name = "N", default_value_t = MapSizes::default().external_backends)]
    pub external_backends_map_size: u32,
    /// Entries of the tc programs' connection table (an LRU: two per flow,
    /// the least recently used forgotten when it is full).
    #[arg(long, value_name = "N", default_value_t = MapSizes::default().flows)]
    pub flow_table_size: u32,
    /// Ignored: reverse translations now live in each socket's own storage,
    /// which has no size. Still accepted so that old command lines start.
    #[arg(long, value_name = "N", hide = true)]
    pub sock_rev_nat_map_size: Option<u32>,
    /// The ports nodePorts are allocated from (the API server's
    /// --service-node-port-range); a nodePort outside is refused.
    #[arg(long, value_name = "FIRST-LAST", default_value = "30000-32767")]
    pub nodeport_range: PortRange,
    /// Which node addresses serve NodePorts (kube-proxy's
    /// --nodeport-addresses): CIDRs, `primary` (the Node's addresses) or
    /// `all`. Default: the config file's nodePortAddresses, else every
    /// non-loopback address.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// The bit of the packet mark that asks for masquerading (kube-proxy's
    /// --iptables-masquerade-bit) [default: iptables.masqueradeBit, else 14,
    /// mark 0x4000]
    #[arg(long, value_name = "0-31", value_parser = clap::value_parser!(u8).range(0..=31))]
    pub iptables_masquerade_bit: Option<u8>,
    /// The pods' addresses (kube-proxy's --cluster-cidr): ClusterIP traffic
    /// that arrives from outside them is masqueraded. Default: the config
    /// file's clusterCIDR, else none (such traffic keeps its source).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub cluster_cidr: Vec<kube_proxy_config::Cidr>,
    /// Masquerade all ClusterIP traffic that arrives from outside the node
    /// (kube-proxy's --masquerade-all) [default: iptables.masqueradeAll]
    #[arg(long)]
    pub masquerade_all: bool,
    /// Keep the iptables masquerade fallback (as Cilium's
    /// install-iptables-rules). Turn it off where something else
    /// masquerades the node's outside traffic.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub install_iptables_rules: bool,
    /// How often the masquerade rules are checked, and repaired if someone
    /// removed them; the node's interfaces are looked at as often.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_go_duration)]
    pub iptables_sync_period: Duration,
    /// The interfaces that NodePort and external traffic arrive on
    /// (comma-separated; `none` for no device). Default: those carrying
    /// the NodePort addresses.
    /// One that does not exist yet is picked up when it appears.
    #[arg(long, value_name = "IFACE,...", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Which sockets are balanced at connect(): `all`, or `host`, the
    /// node's own network namespace only. With `host`, pods' connections
    /// leave the pod addressed to the Service, past the pod's own iptables
    /// (a service mesh's sidecar redirect needs to see it), and are
    /// translated per packet on the pods' interfaces (Cilium's
    /// socketLB.hostNamespaceOnly).
    #[arg(long, value_enum, value_name = "SCOPE", default_value_t = SocketLbScope::All)]
    pub socket_lb_scope: SocketLbScope,
    /// With --socket-lb-scope=host: the pods' interfaces on the host's
    /// side, as globs (`veth*,cali*`; comma-separated). Default: every veth
    /// whose peer is in another network namespace and that has no address.
    /// Interfaces that appear later are picked up.
    #[arg(long, value_name = "GLOB,...", value_delimiter = ',')]
    pub pod_devices: Vec<String>,
    /// Attach the tc programs with TCX links (Linux 6.6 and later, pinned
    /// like the cgroup links). `false` uses clsact filters, as on older
    /// kernels, where TCX is also given up for clsact by itself.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub tcx: bool,
    /// End the connected UDP sockets translated to a backend when it leaves
    /// the Service, in every network namespace of the node, as kube-proxy
    /// flushes UDP conntrack entries (keeps CAP_SYS_ADMIN and CAP_SYS_PTRACE).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub terminate_udp: bool,
    /// Likewise for TCP connections (off: a connection to a pod that went
    /// away fails by itself, and one to a pod still running is kept).
    #[arg(long, value_name = "BOOL", default_value_t = false, action = clap::ArgAction::Set)]
    pub terminate_tcp: bool,
    /// Log every translation the programs make (aya-log), under the target
    /// `ebpf`: for debugging one node. Off, the programs carry no cost for
    /// it (the verifier drops the log statements).
    #[arg(long)]
    pub trace: bool,
    /// The log's format: text, or JSON with one object per line
    /// (kube-proxy's --logging-format) [default: logging.format, else text]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub logging_format: Option<LogFormat>,
    /// The log's verbosity, as kube-proxy's -v: up to 2 information, 3 to
    /// 5 debugging, 6 and up everything; RUST_LOG, when set, is used
    /// instead [default: logging.verbosity, else 0]
    #[arg(short = 'v', long = "v", value_name = "N")]
    pub verbosity: Option<u32>,
}

impl RunArgs {
    /// The log settings the flags alone give, for what is said while the
    /// rest is resolved.
    #[must_use]
    pub fn log_flags(&self) -> LogSettings {
        self.log_settings(&KubeProxyConfig::default())
    }

    /// The log settings of the flags, else of the --config `file`.
    fn log_settings(&self, file: &KubeProxyConfig) -> LogSettings {
        LogSettings {
            format: self
                .logging_format
                .or(file.logging_format)
                .unwrap_or_default(),
            verbosity: self.verbosity.or(file.verbosity),
        }
    }

    /// The agent's configuration, its source and its log settings (the
    /// flags over the --config file), or an error that says which flag is
    /// wrong. It reads what it checks (the --config file, the capabilities,
    /// /proc/mounts, the cgroup's file system, the host name) and changes
    /// nothing, so a wrong flag leaves the node as it was.
    pub fn resolve(self) -> Result<(AgentConfig, SourceArgs, LogSettings)> {
        let file = match &self.config {
            Some(path) => {
                let file = kube_proxy_config::load(path)
                    .with_context(|| format!("--config {}", path.display()))?;
                if !file.ignored.is_empty() {
                    warn!(
                        fields = %file.ignored.join(", "),
                        "these KubeProxyConfiguration fields do not apply to this proxy and are ignored"
                    );
                }
                file
            }
            None => KubeProxyConfig::default(),
        };
        let logging = self.log_settings(&file);
        crate::privileges::check()?;
        let cgroup = match self.cgroup {
            Some(path) => path,
            None => crate::cgroup2::cgroup2_root().context("pass --cgroup")?,
        };
        crate::datapath::check_cgroup(&cgroup)?;
        // The manifest source needs it too: endpoints' nodeName says which
        // are local, for internalTrafficPolicy Local.
        let mut source = self.source;
        let node_name = match source.hostname_override.take().or(file.hostname_override) {
            Some(name) => name,
            None => host_name()?,
        };
        source.hostname_override = Some(node_name.clone());
        if let Some(dir) = &source.manifests
            && !dir.is_dir()
        {
            bail!("--manifests {}: not a directory", dir.display());
        }
        let sizes = MapSizes {
            services: self.services_map_size,
            backends: self.backends_map_size,
            external_services: self.external_services_map_size,
            external_backends: self.external_backends_map_size,
            flows: self.flow_table_size,
        };
        let cluster_cidrs = if self.cluster_cidr.is_empty() {
            file.cluster_cidrs
        } else {
            self.cluster_cidr
        };
        if self.sock_rev_nat_map_size.is_some() {
            warn!(
                "--sock-rev-nat-map-size is ignored: reverse translations live in socket-local storage, which has no size"
            );
        }
        sizes.check()?;
        let mut config = AgentConfig {
            cgroup,
            pins: self.pins.pins(),
            sizes,
            min_sync_period: self
                .min_sync_period
                .or(file.min_sync_period)
                .unwrap_or_default(),
            healthz_bind_address: self
                .healthz_bind_address
                .or(file.healthz_bind_address)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 10256))),
            metrics_bind_address: self
                .metrics_bind_address
                .or(file.metrics_bind_address)
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 10249))),
            health_stale_after: self.health_stale_after,
            model: ModelConfig {
                service_cidrs: source.service_cidr.clone(),
                node_name,
                node_port_range: self.nodeport_range,
                node_port_addresses: if self.nodeport_addresses.is_empty() {
                    file.node_port_addresses
                } else {
                    self.nodeport_addresses
                },
            },
            masquerade_bit: self
                .iptables_masquerade_bit
                .or(file.masquerade_bit)
                .unwrap_or(14),
            cluster_cidrs: one_per_family(&cluster_cidrs)?,
            masquerade_all: self.masquerade_all || file.masquerade_all,
            iptables_sync_period: self.iptables_sync_period,
            install_iptables_rules: self.install_iptables_rules,
            devices: self.devices,
            pod_devices: self.socket_lb_scope.pod_devices(self.pod_devices),
            programs: crate::agent::ProgramOptions {
                tcx: self.tcx,
                trace: self.trace,
            },
            termination: crate::stale_sockets::Termination {
                udp: self.terminate_udp,
                tcp: self.terminate_tcp,
            },
            record: None,
        };
        config.record = Some(AgentRecord::of(&config, &source));
        Ok((config, source, logging))
    }
}

/// `--socket-lb-scope`: whose sockets the socket programs balance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLbScope {
    /// Every socket of the cgroup, pods' included: the cheapest path.
    #[default]
    All,
    /// The host's network namespace only; pods' traffic per packet.
    Host,
}

impl SocketLbScope {
    /// `--pod-devices` where the scope has pods' interfaces to attach to.
    fn pod_devices(self, patterns: Vec<String>) -> Option<Vec<String>> {
        match self {
            Self::All => {
                if !patterns.is_empty() {
                    warn!("--pod-devices is ignored without --socket-lb-scope=host");
                }
                None
            }
            Self::Host => Some(patterns),
        }
    }
}

/// `--cluster-cidr`: at most one range per family, as kube-proxy takes it
/// (`10.244.0.0/16,fd00:10:244::/56` on a dual-stack cluster).
fn one_per_family(cidrs: &[Cidr]) -> Result<Vec<Cidr>> {
    let mut out: Vec<Cidr> = Vec::new();
    for cidr in cidrs {
        if let Some(other) = out.iter().find(|other| other.family() == cidr.family()) {
            bail!(
                "--cluster-cidr: one {} range, not several ({other} and {cidr})",
                cidr.family()
            );
        }
        out.push(*cidr);
    }
    Ok(out)
}

/// Where Services and EndpointSlices come from: flags shared by `run`,
/// `doctor` and `explain`, so that they read the same source the same way.
#[derive(Args, Clone, Debug)]
pub struct SourceArgs {
    /// Read Service and EndpointSlice manifests (multi-document YAML) from
    /// this directory, and follow edits, instead of watching the Kubernetes
    /// API.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// A kubeconfig for the API server. Default: the pod's service account,
    /// then $KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The name of this node's Node object [default: $NODE_NAME, else the
    /// host name].
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub hostname_override: Option<String>,
    /// ClusterIPs outside these ranges are refused (comma-separated
    /// CIDRs); by default any unicast address is accepted.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub service_cidr: Vec<Cidr>,
}

/// The source the flags name, made but not started.
pub enum Built {
    Manifests(PathBuf, ManifestDir),
    Kube(KubeSource),
}

impl Built {
    #[must_use]
    pub fn into_source(self) -> Box<dyn Source> {
        match self {
            Self::Manifests(_, source) => Box::new(source),
            Self::Kube(source) => Box::new(source),
        }
    }
}

impl SourceArgs {
    /// The source these flags name, made inside the runtime (kube reads
    /// its configuration asynchronously); nothing is requested yet.
    pub async fn build(&self) -> Result<Built, SourceError> {
        if let Some(dir) = &self.manifests {
            return Ok(Built::Manifests(dir.clone(), ManifestDir::new(dir)));
        }
        let node = match &self.hostname_override {
            Some(name) => name.clone(),
            None => host_name().map_err(|e| SourceError::Kube(format!("{e:#}")))?,
        };
        info!(node = %node, "watching the Kubernetes API");
        Ok(Built::Kube(
            KubeSource::new(self.kubeconfig.as_deref(), &node).await?,
        ))
    }

    /// The node name the Kubernetes source follows.
    #[must_use]
    pub fn node_name(&self) -> Option<String> {
        self.hostname_override.clone().or_else(|| host_name().ok())
    }

    /// The model's view of these flags, for `doctor` and `explain` (`run`
    /// adds the NodePort settings).
    #[must_use]
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            service_cidrs: self.service_cidr.clone(),
            node_name: self.node_name().unwrap_or_default(),
            ..ModelConfig::default()
        }
    }
}

/// The host name, kube-proxy's default node name.
pub fn host_name() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the host name; pass --hostname-override")?;
    Ok(name.trim().to_lowercase())
}
