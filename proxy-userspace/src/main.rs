//! The agent: keeps the eBPF service maps equal to the Services and
//! EndpointSlices it is given, and lets you read them.
// Raw system calls live in bpf_sys, netlink and sock_diag and nowhere else.
#![deny(unsafe_code)]

mod agent;
mod agent_record;
#[expect(
    unsafe_code,
    reason = "bpf(2), statfs(2) and mount(2) have no safe wrapper in aya or std"
)]
mod bpf_sys;
mod cgroup2;
mod cidr;
mod config;
mod datapath;
mod devices;
mod doctor;
mod explain;
mod health;
mod http_get;
mod iptables;
mod kube_proxy_cleanup;
mod kube_proxy_config;
mod listener;
mod listing;
mod logging;
mod maps;
mod metrics;
mod model;
#[expect(
    unsafe_code,
    reason = "netlink sockets have no safe wrapper in std or nix's enabled features"
)]
mod netlink;
mod privileges;
mod reconcile;
mod report;
mod service_health;
#[expect(
    unsafe_code,
    reason = "setns(2) has no safe wrapper in std or nix's enabled features"
)]
mod sock_diag;
mod sorted_vec;
mod source;
mod stale_sockets;
#[cfg(test)]
mod testing;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{debug, info, warn};

use crate::config::{PinDir, RunArgs};

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
    Run(Box<RunArgs>),
    /// Print the datapath's services and backends from the pinned maps.
    Services {
        #[command(flatten)]
        pins: PinDir,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Show how many translations (new connections; datagrams of
        /// unconnected UDP) each frontend and backend slot had, as
        /// `iptables -L -v` counts per rule.
        #[arg(long)]
        stats: bool,
    },
    /// Print what the programs counted since the maps were created, summed
    /// over CPUs: connections forwarded, refused, and so on.
    Stats {
        #[command(flatten)]
        pins: PinDir,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach the programs, remove everything pinned and, unless another
    /// agent runs in this network namespace, the masquerade rules. Refused
    /// while an agent runs on the directory.
    Cleanup {
        #[command(flatten)]
        pins: PinDir,
        /// Stop the agent running on the directory (SIGTERM) and remove its
        /// datapath; it would otherwise pin again whatever is removed.
        #[arg(long)]
        force: bool,
        /// Instead, remove what a kube-proxy left on this node: its iptables
        /// chains (legacy and nft) and its nftables tables. Nothing else.
        #[arg(long)]
        kube_proxy: bool,
    },
    /// Run the troubleshooting checklist: the agent, its source, the
    /// kernel, the programs, drift between the source and the maps, other
    /// proxies, map fill. Exits 1 on any FAIL.
    Doctor {
        #[command(flatten)]
        args: Box<doctor::DoctorArgs>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Put the volatile facts (pids, ages, counters, map fills, kernel
        /// object ids) in the JSON too; the table always has them.
        #[arg(long)]
        verbose: bool,
    },
    /// Say what happens to a connection from this node to ADDR:PORT: which
    /// Service, which backends and why, or that it passes untouched.
    Explain {
        /// The address a client connects to, such as 10.96.0.10:80.
        address: std::net::SocketAddr,
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        #[command(flatten)]
        pins: PinDir,
        #[command(flatten)]
        source: config::SourceArgs,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// `services`: both frontend maps, with `stats` their counts.
fn print_services(pins: &PinDir, output: Output, stats: bool) -> Result<()> {
    let services = listing::list_pinned(&pins.pins(), stats, true).with_context(|| pins.hint())?;
    match output {
        Output::Table => print!("{}", listing::table(&services)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&services)?),
    }
    Ok(())
}

/// `explain`: with the source named, else the running agent's.
fn explain_frontend(
    address: std::net::SocketAddr,
    proto: Proto,
    pins: &PinDir,
    source: config::SourceArgs,
    output: Output,
) -> Result<()> {
    let protocol = match proto {
        Proto::Tcp => model::Protocol::Tcp,
        Proto::Udp => model::Protocol::Udp,
    };
    let running = agent_record::running(&pins.pins());
    let (source, config) = if let agent_record::Running::Agent(record) = &running {
        let source = record.source(&source);
        let config = record.model_config(&source);
        (source, config)
    } else {
        let config = source.model_config();
        (source, config)
    };
    let snapshot = runtime()?.block_on(async {
        let built = source.build().await?.into_source();
        doctor::snapshot::take(built, config).await
    })?;
    let mut explanation = explain::explain(address, protocol, &snapshot, &pins.pins());
    explanation
        .notes
        .push(format!("explained with {}", running.describe(&pins.pins())));
    match output {
        Output::Table => print!("{}", explanation.text()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
    }
    Ok(())
}

fn main() -> Result<()> {
    let log = logging::init();
    match Cli::parse().command {
        Command::Run(args) => {
            log.apply(args.log_flags());
            raise_open_file_limit();
            // Everything is checked before anything is made on the node.
            let (config, source, log_settings) = args.resolve()?;
            log.apply(log_settings);
            // Before any thread starts: capabilities are per thread.
            let (keep, startup) = privileges::agent_capabilities(config.termination.any());
            privileges::drop_to(&keep, &startup)?;
            // Held until the agent exits: one agent per pin directory.
            let _lock = config.pins.prepare()?;
            // Reading a pinned map's BTF takes CAP_SYS_ADMIN (BPF_BTF_GET_FD_BY_ID).
            datapath::check_pinned_maps(&config.pins)?;
            privileges::end_startup(&startup)?;
            // One thread: the loop is cheap, and one thread keeps the
            // agent's memory and its event order simple.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(async {
                let source = source.build().await?.into_source();
                agent::run(config, source)
                    .await
                    .map_err(anyhow::Error::from)
            })?;
            Ok(())
        }
        Command::Services {
            pins,
            output,
            stats,
        } => print_services(&pins, output, stats),
        Command::Stats { pins, output } => {
            let counters = maps::open_pinned_events(&pins.pins()).with_context(|| pins.hint())?;
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
        Command::Doctor {
            args,
            output,
            verbose,
        } => {
            let report = runtime()?.block_on(doctor::run(&args));
            let failed = report.failed();
            match output {
                Output::Table => print!("{}", report.table()),
                Output::Json if verbose => {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                }
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report.without_volatile())?
                ),
            }
            if failed {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Explain {
            address,
            proto,
            pins,
            source,
            output,
        } => explain_frontend(address, proto, &pins, source, output),
        Command::Cleanup { pins, force, .. } => {
            datapath::cleanup(&pins.pins(), force)?;
            info!(bpffs = %pins.bpffs.display(), "removed the datapath");
            // The masquerade chains are the network namespace's, not this
            // directory's: another agent here marks packets for them.
            let others = pins.pins().other_agents();
            if others.is_empty() {
                reconcile::masquerade::cleanup()?;
            } else {
                let others: Vec<String> = others.iter().map(ToString::to_string).collect();
                info!(
                    agents = others.join(", "),
                    "kept the masquerade rules: other agents of this network namespace use them"
                );
            }
            Ok(())
        }
    }
}

/// Raises the soft limit of open files to the hard one, as Go programs
/// (kube-proxy among them) do at start: the usual soft limit of 1,024 is
/// for select(2), which the agent does not use, and an agent that holds
/// its listeners' connections, the maps and the API watches must not run
/// short of descriptors.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            warn!(%error, "cannot read the limit of open files");
            return;
        }
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                debug!(
                    from = soft,
                    to = hard,
                    "raised the soft limit of open files"
                );
                hard
            }
            Err(error) => {
                warn!(%error, soft, hard, "cannot raise the soft limit of open files");
                soft
            }
        }
    } else {
        soft
    };
    let listeners = u64::try_from(listener::ALL_CONNECTIONS).unwrap_or(u64::MAX);
    if limit < 2 * listeners {
        warn!(
            limit,
            listeners,
            "the limit of open files leaves little room beside the listeners' connections; raise its hard limit (LimitNOFILE, ulimit -Hn)"
        );
    }
}

/// One thread is plenty for the commands that read the source once.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
