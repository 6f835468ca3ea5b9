//! `cargo xtask bench`: what a Service proxy costs per connection, this
//! datapath against kube-proxy's, side by side in one run.
//!
//! At each cluster size N (the measured Service in the middle of N, the
//! average place of a Service in kube-proxy's list), every datapath gets a
//! lab of its own (its own conntrack and rule sets):
//! - straight to a pod, no Service: the physical limit;
//! - this agent, fed by the test API server through the real kube client;
//! - kube-proxy's iptables mode on iptables-legacy and on iptables-nft, and
//!   its nftables mode (rules in [`kube_proxy`]).
//!
//! Each family asked for (`--families`) gets these labs: IPv4 against
//! iptables and `table ip kube-proxy`, IPv6 (VIPs in fd10:96::/112, the
//! pods' IPv6 addresses) against ip6tables and `table ip6 kube-proxy`,
//! each against straight to the pod over its own family.
//!
//! Then, in interleaved rounds 65 s apart (so that no round runs while the
//! last one's TIME_WAIT sockets expire), each datapath is measured in turn:
//! - short connections: wrk, every request a new connection (the pods'
//!   nginx closes each one);
//! - connect latency p50 and p99 (a timed `connect()`, [`probe`]);
//! - two endpoint changes: the measured Service's one endpoint moves to
//!   the other pod and back, and a prober connects until the pod it moved
//!   to answers. For the agent that is the API server's watch, the model
//!   and the map writes;
//!   for kube-proxy's modes only the rule update it would write
//!   (`iptables-restore --noflush` of the Service's chains, or one `nft`
//!   transaction), not its watch or its sync period, so theirs is a lower
//!   bound.
//!
//! Once per size, the install time (from nothing to a working datapath), the
//! agent's peak RSS, and what each eBPF program costs per call (from the
//! kernel's bpf_stats: connect4 beside connect6) are taken. The fairness
//! of the random choice ([`fairness`]) and a NodePort table per family
//! and size, against kube-proxy's three modes ([`node_port`]), follow.
//! Everything is printed, written to `target/bench/`, and drawn as a chart
//! per family.
//!
//! [`probe`]: crate::probe

mod chart;
mod fairness;
mod kube_proxy;
mod node_port;
mod report;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    apiserver::ApiServer,
    bpf_stats::{RunTimeStats, cost_of},
    lab::{Agent, Lab, Pod},
    probe::{self, ChangeProber, ConnectLatency},
    scale,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0x96, 0, 0, 0, 0, 0, 0x10);
/// The IPv6 fillers from fd10:96::1000 up fill the rest of the /112.
const MAX_SERVICES6: usize = 0x1_0000 - 0x1000;
const BACKEND_PORT: u16 = 8080;
/// Timed connects per round, and per bpf_stats measurement.
const CONNECTS: usize = 2000;
/// Linux's TIME_WAIT lasts 60 s (TCP_TIMEWAIT_LEN); a margin on top.
const TIME_WAIT_OVER: Duration = Duration::from_secs(65);

/// One wrk run's result.
#[derive(Clone)]
struct Measurement {
    mode: &'static str,
    requests_per_second: f64,
    latency: String,
    /// The tc programs' nanoseconds per packet, ingress and egress, where
    /// they carry the traffic.
    tc_nanoseconds: Option<[f64; 2]>,
}

pub struct BenchOptions {
    /// The cluster sizes (Services, the measured one included) to compare
    /// the ClusterIP datapaths at.
    pub services: Vec<usize>,
    pub seconds: u32,
    pub connections: u32,
    /// Rounds of every datapath in turn, for a median and a spread.
    pub rounds: usize,
    /// Choices counted per Service in the fairness table.
    pub fairness_choices: usize,
    /// The families the ClusterIP datapaths are compared over.
    pub families: Vec<Family>,
}

/// An address family, and how each datapath writes its addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// As the API writes it (`ipFamilies`, a slice's `addressType`).
    const fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }

    /// The measured Service's ClusterIP.
    const fn vip(self) -> IpAddr {
        match self {
            Self::Ipv4 => IpAddr::V4(VIP),
            Self::Ipv6 => IpAddr::V6(VIP6),
        }
    }

    /// Where every Service's ClusterIP lies, routed to the bridge for
    /// kube-proxy's rules (which translate after the route is chosen).
    const fn service_cidr(self) -> &'static str {
        match self {
            Self::Ipv4 => "10.96.0.0/12",
            Self::Ipv6 => "fd10:96::/112",
        }
    }

    fn address_of(self, pod: &Pod) -> IpAddr {
        match self {
            Self::Ipv4 => pod.ip.into(),
            Self::Ipv6 => pod.ip6.into(),
        }
    }

    /// The prefix length of one address (`-d VIP/32`).
    const fn host_prefix(self) -> u8 {
        match self {
            Self::Ipv4 => 32,
            Self::Ipv6 => 128,
        }
    }

    const fn nft_family(self) -> &'static str {
        match self {
            Self::Ipv4 => "ip",
            Self::Ipv6 => "ip6",
        }
    }

    const fn nft_address_type(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4_addr",
            Self::Ipv6 => "ipv6_addr",
        }
    }

    /// The eBPF programs a connect in this family runs: the translation,
    /// the peer's address, and the release every socket pays.
    const fn programs(self) -> [&'static str; 3] {
        match self {
            Self::Ipv4 => ["connect4", "getpeername4", "sock_release"],
            Self::Ipv6 => ["connect6", "getpeername6", "sock_release"],
        }
    }
}

/// What a ClusterIP connection goes through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Datapath {
    /// No Service: straight to one pod, the physical limit.
    Direct,
    Ebpf,
    IptablesLegacy,
    IptablesNft,
    /// kube-proxy's nftables mode (KEP-3866).
    Nftables,
}

impl Datapath {
    const ALL: [Self; 5] = [
        Self::Direct,
        Self::Ebpf,
        Self::IptablesLegacy,
        Self::IptablesNft,
        Self::Nftables,
    ];

    const fn name(self) -> &'static str {
        match self {
            Self::Direct => "straight to a pod",
            Self::Ebpf => "eBPF (this proxy)",
            Self::IptablesLegacy => "kube-proxy iptables (legacy)",
            Self::IptablesNft => "kube-proxy iptables (nft)",
            Self::Nftables => "kube-proxy nftables",
        }
    }
}

/// One datapath at one size in one family, over the rounds.
struct Row {
    services: usize,
    family: Family,
    datapath: Datapath,
    /// wrk's requests per second, one per round.
    rates: Vec<f64>,
    connects: Vec<ConnectLatency>,
    /// One endpoint change reaching the datapath, one per round.
    changes: Vec<Duration>,
    /// From nothing to the rules (or maps) in place.
    install: Duration,
    /// The agent's, for this datapath.
    peak_rss_kib: Option<u64>,
}

/// Nanoseconds per call of the eBPF programs at one size in one family.
struct HotPath {
    services: usize,
    family: Family,
    costs: Vec<Cost>,
}

/// One program's cost over one kind of connect.
struct Cost {
    /// Connects to the ClusterIP (translated), or straight to a pod.
    through_service: bool,
    program: &'static str,
    nanoseconds_per_call: f64,
    calls: u64,
}

/// A lab made ready for one datapath at one size, kept for every round.
struct Prepared {
    family: Family,
    datapath: Datapath,
    lab: Lab,
    pods: Vec<Pod>,
    target: SocketAddr,
    install: Duration,
    prober: Option<ChangeProber>,
    /// The eBPF lab's agent, kept running (its log explains a failure).
    agent: Option<Agent>,
    api: Option<ApiServer>,
}

pub fn run(agent_binary: &Path, options: &BenchOptions) -> Result<()> {
    if options.services.is_empty()
        || options.services.contains(&0)
        || options.rounds == 0
        || options.families.is_empty()
    {
        bail!("--services, --rounds and --families must be at least 1");
    }
    if options.families.contains(&Family::Ipv6)
        && options.services.iter().any(|&n| n > MAX_SERVICES6)
    {
        bail!("over IPv6 the bench places at most {MAX_SERVICES6} Services in fd10:96::/112");
    }
    let mut rows = Vec::new();
    let mut hot_paths = Vec::new();
    for &services in &options.services {
        let (at_size, hot_path) = cluster_ip_at(agent_binary, services, options)?;
        rows.extend(at_size);
        hot_paths.extend(hot_path);
    }
    let fairness = fairness::measure(agent_binary, options.fairness_choices)?;
    let text = report::cluster_ip(&rows, options)
        + &report::hot_paths(&hot_paths)
        + &fairness::table(&fairness, options.fairness_choices);
    print!("{text}");
    let dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("clusterip.md"), &text)?;
    println!("(also written to {})", dir.join("clusterip.md").display());
    for &family in &options.families {
        let (chart, caption) = match family {
            Family::Ipv4 => (
                dir.join("clusterip.png"),
                "New connections per second through one ClusterIP",
            ),
            Family::Ipv6 => (
                dir.join("clusterip-ipv6.png"),
                "New connections per second through one IPv6 ClusterIP",
            ),
        };
        let of_family: Vec<&Row> = rows.iter().filter(|row| row.family == family).collect();
        chart::draw(&of_family, caption, &chart)?;
        println!("(drawn in {})", chart.display());
    }
    for &family in &options.families {
        for (services, results) in node_port::node_port(agent_binary, family, options)? {
            node_port::print_results(
                &format!(
                    "{} NodePort at {services} Services: new connections per second from an \
                     external namespace, through node 1",
                    family.name()
                ),
                &results,
                "direct",
                options,
            );
        }
    }
    println!(
        "\npolicy Cluster masquerades (MASQUERADE --random-fully, as kube-proxy does); the pod\n\
         keeps no TIME_WAIT sockets here, which one client's remapped ports would meet."
    );
    Ok(())
}

/// Every datapath of every family at `services` Services, measured in
/// interleaved rounds, and what the eBPF programs cost there.
fn cluster_ip_at(
    agent_binary: &Path,
    services: usize,
    options: &BenchOptions,
) -> Result<(Vec<Row>, Vec<HotPath>)> {
    let mut prepared = Vec::new();
    for &family in &options.families {
        for datapath in Datapath::ALL {
            eprintln!(
                "bench: {} at {services} {} Services",
                datapath.name(),
                family.name()
            );
            prepared.push(prepare(agent_binary, family, datapath, services)?);
        }
    }
    let mut rows: Vec<Row> = prepared
        .iter()
        .map(|ready| Row {
            services,
            family: ready.family,
            datapath: ready.datapath,
            rates: Vec::new(),
            connects: Vec::new(),
            changes: Vec::new(),
            install: ready.install,
            peak_rss_kib: None,
        })
        .collect();
    for round in 0..options.rounds {
        if round > 0 {
            // A round leaves each pod a quarter of a million TIME_WAIT
            // sockets, and while they expire (60 s on) the pods' nginx
            // serves about 1,000 connections a second: a round run then
            // measured that, in every datapath alike.
            eprintln!(
                "bench: waiting {} s for the last round's TIME_WAIT sockets to expire",
                TIME_WAIT_OVER.as_secs()
            );
            std::thread::sleep(TIME_WAIT_OVER);
        }
        for (ready, row) in prepared.iter_mut().zip(&mut rows) {
            ready
                .measure_round(services, options, row)
                .with_context(|| ready.agent.as_ref().map(Agent::log).unwrap_or_default())?;
        }
    }
    let mut hot_paths = Vec::new();
    for (ready, row) in prepared.iter().zip(&mut rows) {
        if ready.datapath == Datapath::Ebpf {
            hot_paths.push(hot_path(ready, services)?);
            row.peak_rss_kib = ready.agent.as_ref().map(Agent::peak_rss_kib).transpose()?;
        }
    }
    Ok((rows, hot_paths))
}

impl Prepared {
    fn measure_round(
        &mut self,
        services: usize,
        options: &BenchOptions,
        row: &mut Row,
    ) -> Result<()> {
        let measured = measure(
            &|args: &[&str]| self.lab.run_client("wrk", args),
            self.datapath.name(),
            &self.target.to_string(),
            options,
        )?;
        row.rates.push(measured.requests_per_second);
        row.connects.push(probe::connect_latency(
            &self.lab,
            self.target,
            CONNECTS,
            true,
        )?);
        if self.prober.is_some() {
            // Out to pod-b and back, so every round's rate is pod-a's. Each
            // a quiet moment after the last: the agent holds a change that
            // comes within 20 ms of its last sync for the rest of that
            // window, as part of a burst.
            for pod in [1, 0] {
                std::thread::sleep(Duration::from_millis(100));
                row.changes.push(self.change_endpoint(pod, services)?);
            }
        }
        Ok(())
    }

    /// Moves the measured Service's endpoint to pod number `pod` and waits
    /// until that pod answers: how long the change took to reach the
    /// datapath.
    fn change_endpoint(&mut self, pod: usize, services: usize) -> Result<Duration> {
        let new = self.pods[pod].clone();
        let endpoints = [self.family.address_of(&new)];
        let measured = services / 2;
        let prober = self.prober.as_mut().context("no prober")?;
        prober.expect(&new.name)?;
        match self.datapath {
            Datapath::Direct => bail!("no Service to change"),
            Datapath::Ebpf => {
                let api = self.api.as_ref().context("no API server")?;
                api.apply(slice(self.family, &format!("svc-{measured}"), &endpoints))?;
            }
            Datapath::IptablesLegacy | Datapath::IptablesNft => feed(
                &self.lab,
                restore_command(self.family, self.datapath),
                &["-w", "--noflush"],
                &kube_proxy::iptables_endpoint_change(measured, &endpoints),
            )?,
            Datapath::Nftables => feed(
                &self.lab,
                "nft",
                &["-f", "-"],
                &kube_proxy::nftables_endpoint_change(self.family, measured, 0, endpoints[0]),
            )?,
        }
        prober.moved_to(&new.name)
    }
}

/// What the eBPF programs cost per call, in the eBPF lab at this size:
/// connects through the ClusterIP (translated, and asked for their peer),
/// then straight to a pod (not a Service); each socket's release too, which
/// every socket of the node pays.
fn hot_path(ebpf: &Prepared, services: usize) -> Result<HotPath> {
    let _stats = RunTimeStats::enable()?;
    // An agent from before a program existed (an older build measured
    // through PROXY_AGENT, to compare) has no link of it: left out.
    let programs: Vec<&str> = ebpf
        .family
        .programs()
        .into_iter()
        .filter(|program| ebpf.lab.bpffs().join("links").join(program).exists())
        .collect();
    let mut costs = Vec::new();
    for (through_service, target) in [
        (true, ebpf.target),
        (
            false,
            SocketAddr::new(ebpf.family.address_of(&ebpf.pods[0]), BACKEND_PORT),
        ),
    ] {
        let measured = cost_of(&ebpf.lab, &programs, || {
            probe::connect_latency(&ebpf.lab, target, CONNECTS, true).map(drop)
        })?;
        for (program, (cost, calls)) in programs.iter().zip(measured) {
            costs.push(Cost {
                through_service,
                program,
                nanoseconds_per_call: cost,
                calls,
            });
        }
    }
    Ok(HotPath {
        services,
        family: ebpf.family,
        costs,
    })
}

fn restore_command(family: Family, datapath: Datapath) -> &'static str {
    match (family, datapath == Datapath::IptablesLegacy) {
        (Family::Ipv4, true) => "iptables-legacy-restore",
        (Family::Ipv4, false) => "iptables-nft-restore",
        (Family::Ipv6, true) => "ip6tables-legacy-restore",
        (Family::Ipv6, false) => "ip6tables-nft-restore",
    }
}

/// Service `name` with one ClusterIP of `family`, as the API server holds
/// it.
fn service(family: Family, name: &str, cluster_ip: IpAddr) -> Value {
    let mut service = scale::service(name, &cluster_ip.to_string());
    service["spec"]["ipFamilies"] = json!([family.name()]);
    service
}

/// The EndpointSlice of Service `name` in `family`: `endpoints`, all ready.
fn slice(family: Family, name: &str, endpoints: &[IpAddr]) -> Value {
    let mut slice = scale::slice(name, &[], true);
    slice["addressType"] = json!(family.name());
    slice["endpoints"] = endpoints
        .iter()
        .map(|address| {
            json!({
                "addresses": [address.to_string()],
                "conditions": {"ready": true},
                "nodeName": scale::NODE,
            })
        })
        .collect();
    slice
}

fn prepare(
    agent_binary: &Path,
    family: Family,
    datapath: Datapath,
    services: usize,
) -> Result<Prepared> {
    let (lab, pods) = pod_lab()?;
    let vip = SocketAddr::new(family.vip(), 80);
    let mut ready = Prepared {
        family,
        datapath,
        lab,
        pods,
        target: vip,
        install: Duration::ZERO,
        prober: None,
        agent: None,
        api: None,
    };
    let started;
    match datapath {
        Datapath::Direct => {
            started = Instant::now();
            ready.target = SocketAddr::new(family.address_of(&ready.pods[0]), BACKEND_PORT);
        }
        Datapath::Ebpf => {
            let api = ApiServer::start()?;
            let pods = &ready.pods;
            api.apply_all(
                std::iter::once(scale::node()).chain((0..services).flat_map(|i| {
                    let name = format!("svc-{i}");
                    [
                        service(family, &name, service_ip(family, i, services)),
                        slice(family, &name, &endpoints_of(family, pods, i, services)),
                    ]
                })),
            )?;
            started = Instant::now();
            ready.agent = Some(ready.lab.start_agent_on_api(
                agent_binary,
                api.kubeconfig(),
                scale::NODE,
            )?);
            ready.api = Some(api);
        }
        Datapath::IptablesLegacy | Datapath::IptablesNft => {
            ready.lab.route_from_node(family.service_cidr())?;
            started = Instant::now();
            feed(
                &ready.lab,
                restore_command(family, datapath),
                &["-w"],
                &kube_proxy::iptables(family, services, |i| {
                    endpoints_of(family, &ready.pods, i, services)
                }),
            )?;
        }
        Datapath::Nftables => {
            ready.lab.route_from_node(family.service_cidr())?;
            started = Instant::now();
            feed(
                &ready.lab,
                "nft",
                &["-f", "-"],
                &kube_proxy::nftables(family, services, |i| {
                    endpoints_of(family, &ready.pods, i, services)
                }),
            )?;
        }
    }
    ready.install = started.elapsed();
    if datapath != Datapath::Direct {
        ready.prober = Some(ChangeProber::start(&ready.lab, &family.vip().to_string())?);
    }
    Ok(ready)
}

/// Two nginx pods, which the filler Services share.
fn pod_lab() -> Result<(Lab, Vec<Pod>)> {
    Lab::with_web_pods(&["pod-a", "pod-b"], BACKEND_PORT)
}

/// Service `index`'s endpoints. The measured one has pod-a alone, so its
/// rate is one nginx's, as straight to pod-a is: a Service spread over two
/// pods would also measure how the 2-core machine schedules two servers
/// and their clients (wrk's threads pinned to one pod each outrun a random
/// spread by a quarter), not the proxy.
fn endpoints_of(family: Family, pods: &[Pod], index: usize, services: usize) -> Vec<IpAddr> {
    let pods = if index == services / 2 {
        &pods[..1]
    } else {
        &pods[..2]
    };
    pods.iter().map(|pod| family.address_of(pod)).collect()
}

/// The measured Service is number `services / 2`; the others are filler
/// Services at 10.97.x.y, or from fd10:96::1000 on, with the same pods
/// behind them.
fn service_ip(family: Family, index: usize, services: usize) -> IpAddr {
    if index == services / 2 {
        return family.vip();
    }
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    match family {
        Family::Ipv4 => (Ipv4Addr::new(10, 97, 0, 0)
            | Ipv4Addr::from((index / 250) << 8 | (index % 250 + 1)))
        .into(),
        // Above the VIP, and inside the /112 up to 61,439 Services.
        Family::Ipv6 => Ipv6Addr::from(u128::from(VIP6) - 0x10 + 0x1000 + u128::from(index)).into(),
    }
}

fn median<T: Copy + PartialOrd>(values: &[T]) -> Option<T> {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    sorted.get(sorted.len() / 2).copied()
}

/// Feeds `rules` to `program` (iptables-restore, nft) in the node.
fn feed(lab: &Lab, program: &str, args: &[&str], rules: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = lab
        .client(program)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(rules.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{program} failed: {status}");
    }
    Ok(())
}

/// wrk against `target`, run by `wrk` (which takes wrk's arguments, and
/// runs it where the client is).
fn measure(
    wrk: &dyn Fn(&[&str]) -> Result<Output>,
    mode: &'static str,
    target: &str,
    options: &BenchOptions,
) -> Result<Measurement> {
    let url = format!("http://{target}/");
    // A short warm-up fills caches (and, for iptables, loads the modules).
    wrk(&["-t1", "-c4", "-d1s", &url])?;
    let out = wrk(&[
        "-t2",
        &format!("-c{}", options.connections),
        &format!("-d{}s", options.seconds),
        &url,
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!(
            "{mode}: wrk saw errors:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::trim))
            .map(str::to_owned)
    };
    let requests_per_second = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{mode}: no Requests/sec in wrk's output:\n{text}"))?;
    let latency = field("Latency")
        .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default();
    Ok(Measurement {
        mode,
        requests_per_second,
        latency,
        tc_nanoseconds: None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Every IPv6 ClusterIP the largest bench places is distinct, inside
    /// the /112 that is routed and that kube-proxy's rules match, and only
    /// the measured Service has the VIP.
    #[test]
    fn ipv6_service_ips_are_distinct_and_inside_the_service_cidr() {
        let services = MAX_SERVICES6;
        let mut seen = HashSet::new();
        for index in 0..services {
            let IpAddr::V6(address) = service_ip(Family::Ipv6, index, services) else {
                panic!("service {index} is not IPv6");
            };
            assert_eq!(
                u128::from(address) >> 16,
                u128::from(VIP6) >> 16,
                "service {index} at {address} is outside fd10:96::/112"
            );
            assert_eq!(address == VIP6, index == services / 2, "service {index}");
            assert!(seen.insert(address), "service {index} repeats {address}");
        }
    }

    /// kube-proxy's IPv6 rules match one address by /128, DNAT to the
    /// bracketed address and port, and live in the ip6 table.
    #[test]
    fn ipv6_rules_use_the_ipv6_syntax() {
        let pod: IpAddr = "fd00:10:244:1::10".parse().unwrap();
        let iptables = kube_proxy::iptables(Family::Ipv6, 3, |_| vec![pod]);
        assert!(iptables.contains("-d fd10:96::10/128 "), "{iptables}");
        assert!(
            iptables.contains("--to-destination [fd00:10:244:1::10]:8080"),
            "{iptables}"
        );
        let nftables = kube_proxy::nftables(Family::Ipv6, 3, |_| vec![pod]);
        assert!(!nftables.contains(" ip kube-proxy"), "{nftables}");
        assert!(
            nftables.contains("type ipv6_addr . inet_proto"),
            "{nftables}"
        );
        assert!(nftables.contains("services ip6 daddr . meta"), "{nftables}");
        assert!(
            nftables.contains("{ fd10:96::10 . tcp . 80 : goto service-1 }"),
            "{nftables}"
        );
        assert!(
            nftables.contains("dnat to [fd00:10:244:1::10]:8080"),
            "{nftables}"
        );
    }

    /// The IPv4 rules are what they were before the families: /32 and a
    /// bare address.
    #[test]
    fn ipv4_rules_are_unchanged() {
        let pod: IpAddr = "10.244.1.10".parse().unwrap();
        let iptables = kube_proxy::iptables(Family::Ipv4, 1, |_| vec![pod]);
        assert!(iptables.contains("-d 10.96.0.10/32 "), "{iptables}");
        assert!(
            iptables.contains("--to-destination 10.244.1.10:8080"),
            "{iptables}"
        );
        let nftables = kube_proxy::nftables(Family::Ipv4, 1, |_| vec![pod]);
        assert!(
            nftables.starts_with("add table ip kube-proxy\n"),
            "{nftables}"
        );
        assert!(nftables.contains("services ip daddr . meta"), "{nftables}");
        assert!(nftables.contains("dnat to 10.244.1.10:8080"), "{nftables}");
    }
}
