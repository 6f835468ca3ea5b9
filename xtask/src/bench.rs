//! `cargo xtask bench`: new-connection throughput to a ClusterIP under the
//! eBPF datapath and under kube-proxy's iptables rules, side by side.
//!
//! Every request is a new connection (the pods' nginx closes each one), so
//! what is measured is what a Service proxy adds per connection: a socket
//! hook and two map lookups at `connect()`, against a walk of the nat
//! table's Service rules and a conntrack NAT entry. The iptables rules have
//! the shape kube-proxy writes (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-*),
//! with the measured Service in the middle of `services` Services: the
//! average place of a Service in kube-proxy's list.
//!
//! A second table measures traffic from outside the node: an external
//! namespace's connections to a NodePort (the tc programs) against its
//! connections straight to the pod's address, routed through the same
//! node, so the ratio is what the NodePort translation costs.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::lab::{Lab, Pod, TwoNodeLab, manifests};

const VIP: &str = "10.96.0.10";
const BACKEND_PORT: u16 = 8080;

/// One run's result.
struct Measurement {
    mode: &'static str,
    requests_per_second: f64,
    latency: String,
    /// wrk's p50 and p99 request latency.
    percentiles: (String, String),
}

pub struct BenchOptions {
    /// The cluster sizes (Services, the measured one included) to compare
    /// the ClusterIP datapaths at.
    pub services: Vec<usize>,
    pub seconds: u32,
    pub connections: u32,
    /// Rounds of every datapath in turn, for a median and a spread.
    pub rounds: usize,
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

/// One datapath at one size, over the rounds.
struct Row {
    services: usize,
    datapath: Datapath,
    rates: Vec<f64>,
    /// wrk's p50 and p99 request latency, of the last round.
    latency: (String, String),
    /// From nothing to the rules (or maps) in place.
    install: Duration,
}

/// A lab made ready for one datapath at one size, kept for every round.
struct Prepared {
    lab: Lab,
    target: String,
    install: Duration,
    /// The eBPF lab's agent, kept running (its log explains a failure).
    agent: Option<crate::lab::Agent>,
}

pub fn run(agent_binary: &Path, options: &BenchOptions) -> Result<()> {
    if options.services.is_empty() || options.services.contains(&0) || options.rounds == 0 {
        bail!("--services and --rounds must be at least 1");
    }
    let mut rows = Vec::new();
    for &services in &options.services {
        rows.extend(cluster_ip_at(agent_binary, services, options)?);
    }
    let table = cluster_ip_table(&rows, options);
    print!("{table}");
    let file = crate::workspace_root().join("target/bench/clusterip.md");
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&file, &table)?;
    println!("(also written to {})", file.display());
    let results = node_port(agent_binary, options)?;
    print_results(
        "new connections per second from an external namespace, through node 1",
        &results,
        "direct",
        options,
    );
    println!(
        "\npolicy Cluster masquerades (MASQUERADE --random-fully, as kube-proxy does): from one\n\
         client at this rate, remapped source ports meet the pod's TIME_WAIT sockets and SYNs\n\
         are retransmitted. Both datapaths pay it alike; many clients do not."
    );
    Ok(())
}

/// The external client's connections to one pod on node 1: straight to
/// its address (routed through node 1), and through a NodePort of each
/// externalTrafficPolicy (Cluster adds the masquerade), under the eBPF
/// datapath and under kube-proxy's rules.
fn node_port(agent_binary: &Path, options: &BenchOptions) -> Result<Vec<Measurement>> {
    let (lab, pod) = node_port_lab()?;
    let backend = [("http", BACKEND_PORT, "TCP")];
    let endpoints = [(pod.ip, "node-1")];
    lab.write_manifest(
        "nodeport.yaml",
        &manifests::documents(&[
            manifests::node_port_service(
                "local",
                "NodePort",
                "10.96.0.20",
                (80, LOCAL_NODE_PORT.into()),
                "  externalTrafficPolicy: Local\n",
            ),
            manifests::endpoint_slice_on_nodes("local-1", "local", &backend, &endpoints),
            manifests::node_port_service(
                "cluster",
                "NodePort",
                "10.96.0.21",
                (80, CLUSTER_NODE_PORT.into()),
                "",
            ),
            manifests::endpoint_slice_on_nodes("cluster-1", "cluster", &backend, &endpoints),
        ]),
    )?;
    let agents = lab.start_agents(agent_binary, &[])?;
    agents[0].wait_for_log("attached (TCX)", Duration::from_secs(10))?;
    let mut results = vec![measure(
        &|args: &[&str]| Ok(lab.external("wrk").args(args).output()?),
        "direct to the pod (routed by node 1)",
        &format!("{}:{BACKEND_PORT}", pod.ip),
        options,
    )?];
    results.extend(node_ports(&lab, "eBPF", options)?);
    drop(agents);
    drop(lab);

    // A fresh pair of nodes, so conntrack and the nat table exist only here.
    let (lab, pod) = node_port_lab()?;
    feed(
        lab.node(1),
        "iptables-restore",
        &["-w"],
        &kube_proxy_node_port_rules(&pod),
    )?;
    results.extend(node_ports(&lab, "iptables", options)?);
    Ok(results)
}

const LOCAL_NODE_PORT: u16 = 30080;
const CLUSTER_NODE_PORT: u16 = 30081;

/// Two nodes, one nginx pod on node 1, and the external client's route
/// to the pods through node 1.
fn node_port_lab() -> Result<(TwoNodeLab, Pod)> {
    let mut lab = TwoNodeLab::new()?;
    let node = lab.node_mut(1);
    let pod = node.add_pod("pod-a")?;
    node.serve_http(&pod, BACKEND_PORT)?;
    lab.route_via_node("10.244.1.0/24", 1)?;
    Ok((lab, pod))
}

/// Both NodePorts of node 1, as `datapath` serves them.
fn node_ports(
    lab: &TwoNodeLab,
    datapath: &'static str,
    options: &BenchOptions,
) -> Result<[Measurement; 2]> {
    let wrk = |args: &[&str]| Ok(lab.external("wrk").args(args).output()?);
    let node = lab.node_ip(1);
    let (local, cluster) = if datapath == "eBPF" {
        (
            "eBPF NodePort, policy Local",
            "eBPF NodePort, policy Cluster (masq.)",
        )
    } else {
        (
            "iptables NodePort, policy Local",
            "iptables NodePort, Cluster (masq.)",
        )
    };
    Ok([
        measure(&wrk, local, &format!("{node}:{LOCAL_NODE_PORT}"), options)?,
        measure(
            &wrk,
            cluster,
            &format!("{node}:{CLUSTER_NODE_PORT}"),
            options,
        )?,
    ])
}

/// kube-proxy's nat rules for the two NodePorts: KUBE-NODEPORTS behind the
/// LOCAL address-type match, KUBE-EXT-* marking policy Cluster for the
/// masquerade, and KUBE-POSTROUTING doing it.
fn kube_proxy_node_port_rules(pod: &Pod) -> String {
    format!(
        "*nat\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n:KUBE-EXT-CLUSTER - [0:0]\n:KUBE-SEP-POD - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-NODEPORTS -p tcp -m tcp --dport {LOCAL_NODE_PORT} -j KUBE-SEP-POD\n\
         -A KUBE-NODEPORTS -p tcp -m tcp --dport {CLUSTER_NODE_PORT} -j KUBE-EXT-CLUSTER\n\
         -A KUBE-EXT-CLUSTER -j KUBE-MARK-MASQ\n\
         -A KUBE-EXT-CLUSTER -j KUBE-SEP-POD\n\
         -A KUBE-SEP-POD -p tcp -m tcp -j DNAT --to-destination {}:{BACKEND_PORT}\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n\
         COMMIT\n",
        pod.ip
    )
}

/// Every datapath at `services` Services, each in a lab of its own (its own
/// conntrack and rule sets), measured in interleaved rounds.
fn cluster_ip_at(agent_binary: &Path, services: usize, options: &BenchOptions) -> Result<Vec<Row>> {
    let mut prepared = Vec::new();
    for datapath in Datapath::ALL {
        eprintln!("bench: {} at {services} Services", datapath.name());
        prepared.push((datapath, prepare(agent_binary, datapath, services)?));
    }
    let mut rows: Vec<Row> = prepared
        .iter()
        .map(|(datapath, ready)| Row {
            services,
            datapath: *datapath,
            rates: Vec::new(),
            latency: (String::new(), String::new()),
            install: ready.install,
        })
        .collect();
    for _ in 0..options.rounds {
        for ((_, ready), row) in prepared.iter().zip(&mut rows) {
            let measured = measure(
                &|args: &[&str]| ready.lab.run_client("wrk", args),
                row.datapath.name(),
                &ready.target,
                options,
            )
            .with_context(|| {
                ready
                    .agent
                    .as_ref()
                    .map(crate::lab::Agent::log)
                    .unwrap_or_default()
            })?;
            row.rates.push(measured.requests_per_second);
            row.latency = measured.percentiles;
        }
    }
    Ok(rows)
}

fn prepare(agent_binary: &Path, datapath: Datapath, services: usize) -> Result<Prepared> {
    let (lab, pods) = pod_lab()?;
    let started = std::time::Instant::now();
    let mut agent = None;
    let target = match datapath {
        Datapath::Direct => format!("{}:{BACKEND_PORT}", pods[0].ip),
        Datapath::Ebpf => {
            // In files of 100 Services: the manifest source refuses a file
            // of more than 50,000 YAML nodes, as hostile input.
            for first in (0..services).step_by(100) {
                lab.write_manifest(
                    &format!("services-{first}.yaml"),
                    &service_manifests(&pods, first..services.min(first + 100), services),
                )?;
            }
            agent = Some(lab.start_agent(agent_binary)?);
            VIP.to_owned()
        }
        Datapath::IptablesLegacy | Datapath::IptablesNft => {
            lab.route_from_node("10.96.0.0/12")?;
            let restore = if datapath == Datapath::IptablesLegacy {
                "iptables-legacy-restore"
            } else {
                "iptables-nft-restore"
            };
            feed(&lab, restore, &["-w"], &kube_proxy_rules(&pods, services))?;
            VIP.to_owned()
        }
        Datapath::Nftables => {
            lab.route_from_node("10.96.0.0/12")?;
            feed(
                &lab,
                "nft",
                &["-f", "-"],
                &kube_proxy_nftables(&pods, services),
            )?;
            VIP.to_owned()
        }
    };
    Ok(Prepared {
        lab,
        target,
        install: started.elapsed(),
        agent,
    })
}

/// kube-proxy's nftables mode for these Services: one `service-ips`
/// verdict map from address, protocol and port to each Service's chain,
/// which picks an endpoint chain with `numgen random`, which DNATs.
fn kube_proxy_nftables(pods: &[Pod], services: usize) -> String {
    let mut chains = String::from(
        "add table ip kube-proxy\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; policy accept ; }\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; policy accept ; }\n\
         add chain ip kube-proxy services\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n",
    );
    let mut rules = String::from(
        "add rule ip kube-proxy nat-output jump services\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    let mut elements = String::new();
    for i in 0..services {
        let _ = writeln!(chains, "add chain ip kube-proxy service-{i}");
        let mut arms = Vec::new();
        for (p, pod) in pods.iter().enumerate() {
            let _ = writeln!(chains, "add chain ip kube-proxy endpoint-{i}-{p}");
            let _ = writeln!(
                rules,
                "add rule ip kube-proxy endpoint-{i}-{p} meta l4proto tcp dnat to {}:{BACKEND_PORT}",
                pod.ip
            );
            arms.push(format!("{p} : goto endpoint-{i}-{p}"));
        }
        let _ = writeln!(
            rules,
            "add rule ip kube-proxy service-{i} numgen random mod {} vmap {{ {} }}",
            pods.len(),
            arms.join(" , ")
        );
        let _ = writeln!(
            elements,
            "add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto service-{i} }}",
            service_ip(i, services)
        );
    }
    chains + &rules + &elements
}

/// The markdown table of the ClusterIP comparison: median and spread of
/// each datapath's rate, its ratio to going straight to the pod at the
/// same size, latency and install time.
fn cluster_ip_table(rows: &[Row], options: &BenchOptions) -> String {
    let mut out = format!(
        "\nnew connections per second to one ClusterIP (2 nginx pods), the measured Service in \
         the middle of N; wrk -t2 -c{} -d{}s, every request a new connection; {} interleaved \
         round(s), median (min–max)\n\n\
         | N | datapath | req/s | vs pod | p50 | p99 | install |\n|---|---|---|---|---|---|---|\n",
        options.connections, options.seconds, options.rounds
    );
    for row in rows {
        let direct = rows
            .iter()
            .find(|r| r.services == row.services && r.datapath == Datapath::Direct)
            .map_or(f64::NAN, |r| median(&r.rates));
        let (low, high) = row
            .rates
            .iter()
            .fold((f64::INFINITY, 0.0_f64), |(lo, hi), r| {
                (lo.min(*r), hi.max(*r))
            });
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} ({low:.0}–{high:.0}) | {:.2} | {} | {} | {:.2} s |",
            row.services,
            row.datapath.name(),
            median(&row.rates),
            median(&row.rates) / direct,
            row.latency.0,
            row.latency.1,
            row.install.as_secs_f64()
        );
    }
    out.push_str("\ntargets: eBPF ≥ 0.97 of straight to the pod (printed, not a pass/fail)\n");
    out
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn pod_lab() -> Result<(Lab, Vec<Pod>)> {
    let mut lab = Lab::new()?;
    let mut pods = Vec::new();
    for name in ["pod-a", "pod-b"] {
        let pod = lab.add_pod(name)?;
        lab.serve_http(&pod, BACKEND_PORT)?;
        pods.push(pod);
    }
    Ok((lab, pods))
}

/// The measured Service is number `services / 2`; the others are filler
/// Services at 10.97.x.y with the same pods behind them.
fn service_ip(index: usize, services: usize) -> String {
    if index == services / 2 {
        VIP.to_owned()
    } else {
        format!("10.97.{}.{}", index / 250, index % 250 + 1)
    }
}

/// Services `range` of `services`, each over `pods`, as one manifest.
fn service_manifests(pods: &[Pod], range: std::ops::Range<usize>, services: usize) -> String {
    let endpoints: Vec<_> = pods.iter().map(|p| (p.ip, true)).collect();
    let documents: Vec<String> = range
        .flat_map(|i| {
            let name = format!("svc-{i}");
            [
                manifests::service(&name, &service_ip(i, services), &[("http", 80, "TCP")]),
                manifests::endpoint_slice(
                    &format!("{name}-1"),
                    &name,
                    &[("http", BACKEND_PORT, "TCP")],
                    &endpoints,
                ),
            ]
        })
        .collect();
    manifests::documents(&documents)
}

/// The nat rules kube-proxy's iptables mode writes for these Services.
fn kube_proxy_rules(pods: &[Pod], services: usize) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    for i in 0..services {
        let _ = writeln!(chains, ":KUBE-SVC-{i} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"default/svc-{i}:http cluster IP\" \
             -m tcp --dport 80 -j KUBE-SVC-{i}",
            service_ip(i, services)
        );
        for (p, pod) in pods.iter().enumerate() {
            let _ = writeln!(chains, ":KUBE-SEP-{i}-{p} - [0:0]");
            // kube-proxy's equal split: 1/n, then 1/(n-1), ..., then the rest.
            let remaining = pods.len() - p;
            let jump = format!("-j KUBE-SEP-{i}-{p}");
            if remaining > 1 {
                let _ = writeln!(
                    rules,
                    "-A KUBE-SVC-{i} -m statistic --mode random --probability {:.11} {jump}",
                    1.0 / f64::from(u32::try_from(remaining).unwrap_or(u32::MAX))
                );
            } else {
                let _ = writeln!(rules, "-A KUBE-SVC-{i} {jump}");
            }
            let _ = writeln!(
                rules,
                "-A KUBE-SEP-{i}-{p} -p tcp -m tcp -j DNAT --to-destination {}:{BACKEND_PORT}",
                pod.ip
            );
        }
    }
    chains + &rules + "COMMIT\n"
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
        "--latency",
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
    let percentile = |at: &str| field(at).unwrap_or_default();
    Ok(Measurement {
        mode,
        requests_per_second,
        latency,
        percentiles: (percentile("50%"), percentile("99%")),
    })
}

/// One table: every mode's rate, and its ratio to the mode whose name
/// starts with `baseline`.
fn print_results(title: &str, results: &[Measurement], baseline: &str, options: &BenchOptions) {
    println!(
        "\n{title} (wrk -t2 -c{} -d{}s; every request a new connection)\n",
        options.connections, options.seconds
    );
    let base = results
        .iter()
        .find(|r| r.mode.starts_with(baseline))
        .map_or(f64::NAN, |r| r.requests_per_second);
    println!(
        "{:<40} {:>12} {:>12} {:>14}",
        "MODE",
        "REQ/S",
        "AVG LATENCY",
        format!("VS {}", baseline.to_uppercase())
    );
    for result in results {
        println!(
            "{:<40} {:>12.0} {:>12} {:>13.2}x",
            result.mode,
            result.requests_per_second,
            result.latency,
            result.requests_per_second / base
        );
    }
}
