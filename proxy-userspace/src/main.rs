//! The agent: keeps the eBPF service maps equal to the Services and
//! EndpointSlices it is given, and lets you read them.
// Raw system calls live in bpf_sys and nowhere else.
#![deny(unsafe_code)]

#[expect(
    unsafe_code,
    reason = "bpf(2), statfs(2) and mount(2) have no safe wrapper in aya or std"
)]
mod bpf_sys;
mod datapath;
mod encoding;
mod kube_proxy_cleanup;
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "the lead merges it with the flags of `run`")
)]
mod kube_proxy_config;
mod listing;
mod model;
mod source;
mod writer;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::{info, warn};

use crate::{
    datapath::{Datapath, MapSizes, Pins},
    source::manifests::ManifestDir,
    writer::MapWriter,
};

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/ebpf-proxy";

#[derive(Parser)]
#[command(
    version,
    about = "eBPF service load balancer: a kube-proxy replacement"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath, then keep its maps in step with the
    /// Services and EndpointSlices.
    Run {
        /// Read Service and EndpointSlice manifests (multi-document YAML)
        /// from this directory, and follow edits.
        #[arg(long, value_name = "DIR")]
        manifests: PathBuf,
        /// The cgroup (v2) whose sockets are load-balanced. Default: the
        /// cgroup2 root, from /proc/mounts.
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        #[command(flatten)]
        pins: PinDir,
        /// Entries of the services map: one per Service port plus one per
        /// backend of it.
        #[arg(long, value_name = "N", default_value_t = MapSizes::default().services)]
        services_map_size: u32,
        /// Entries of the backends map: one per distinct endpoint address and port.
        #[arg(long, value_name = "N", default_value_t = MapSizes::default().backends)]
        backends_map_size: u32,
        /// Entries of the reverse-translation LRU map: about one per live
        /// socket talking to a Service.
        #[arg(long, value_name = "N", default_value_t = MapSizes::default().sock_rev_nat)]
        sock_rev_nat_map_size: u32,
    },
    /// Print the datapath's services and backends from the pinned maps.
    Services {
        #[command(flatten)]
        pins: PinDir,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print what the programs counted since the maps were created, summed
    /// over CPUs: connections forwarded, refused, and so on.
    Stats {
        #[command(flatten)]
        pins: PinDir,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach the programs and remove everything pinned. Stop the agent
    /// first, or it keeps the programs attached until it exits.
    Cleanup {
        #[command(flatten)]
        pins: PinDir,
        /// Instead, remove what a kube-proxy left on this node: its iptables
        /// chains (legacy and nft) and its nftables tables. Nothing else.
        #[arg(long)]
        kube_proxy: bool,
    },
}

/// `--bpffs`, shared by every command.
#[derive(Args)]
struct PinDir {
    /// Where maps and links are pinned.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
}

impl PinDir {
    fn pins(&self) -> Pins {
        Pins::new(&self.bpffs)
    }

    /// For errors of the commands that only read the pins.
    fn hint(&self) -> String {
        format!("is the agent set up at {}?", self.bpffs.display())
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            manifests,
            cgroup,
            pins,
            services_map_size,
            backends_map_size,
            sock_rev_nat_map_size,
        } => {
            let cgroup = match cgroup {
                Some(path) => path,
                None => cgroup2_root()?,
            };
            let sizes = MapSizes {
                services: services_map_size,
                backends: backends_map_size,
                sock_rev_nat: sock_rev_nat_map_size,
            };
            run(ManifestDir::new(manifests), &cgroup, pins.pins(), sizes)
        }
        Command::Services { pins, output } => {
            let maps = datapath::open_pinned(&pins.pins()).with_context(|| pins.hint())?;
            let services = listing::list(&maps)?;
            match output {
                Output::Table => print!("{}", listing::table(&services)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&services)?),
            }
            Ok(())
        }
        Command::Stats { pins, output } => {
            let counters =
                datapath::open_pinned_events(&pins.pins()).with_context(|| pins.hint())?;
            let events = listing::events(&counters)?;
            match output {
                Output::Table => print!("{}", events.table()),
                Output::Json => println!("{}", serde_json::to_string(&events)?),
            }
            Ok(())
        }
        Command::Cleanup {
            kube_proxy: true, ..
        } => Ok(kube_proxy_cleanup::remove_kube_proxy_leftovers()?),
        Command::Cleanup { pins, .. } => {
            datapath::cleanup(&pins.pins())?;
            info!(bpffs = %pins.bpffs.display(), "removed the datapath");
            Ok(())
        }
    }
}

/// Level-triggered: every snapshot is turned into a whole desired state and
/// only its difference from the maps is written.
fn run(mut source: ManifestDir, cgroup: &Path, pins: Pins, sizes: MapSizes) -> Result<()> {
    let mut datapath = Datapath::load(pins, sizes)?;
    let maps = datapath.take_service_maps()?;
    let mut writer =
        MapWriter::adopt(maps.services, maps.backends).context("cannot read the pinned maps")?;
    let (frontends, backends) = writer.sizes();
    info!(frontends, backends, "adopted the pinned maps");

    let mut attached = false;
    let mut reported = BTreeSet::new();
    loop {
        let snapshot = source.next_snapshot()?;
        let started = Instant::now();
        let (desired, problems) = model::desired_state(&snapshot);
        // Each problem is logged once, not again with every unrelated edit.
        let problems: BTreeSet<String> = problems.iter().map(ToString::to_string).collect();
        for problem in problems.difference(&reported) {
            warn!("{problem}; skipped");
        }
        reported = problems;
        let stats = writer.apply(&desired);
        info!(
            frontends = desired.frontends.len(),
            changes = stats.changes(),
            failures = stats.failures,
            took_us = started.elapsed().as_micros(),
            "applied"
        );
        // Attach only once the maps hold the services, so no socket ever
        // sees a half-filled datapath.
        if !attached {
            datapath.attach(cgroup)?;
            attached = true;
            info!("datapath ready");
        }
    }
}

/// The cgroup2 mount point, as /proc/mounts has it (it is not always
/// /sys/fs/cgroup: hybrid hosts mount it at /sys/fs/cgroup/unified).
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        if let (Some(_), Some(path), Some("cgroup2")) =
            (fields.next(), fields.next(), fields.next())
        {
            return Ok(PathBuf::from(path));
        }
    }
    bail!("no cgroup2 file system is mounted (see /proc/mounts); pass --cgroup")
}
