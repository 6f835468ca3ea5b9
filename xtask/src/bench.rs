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

use std::{fmt::Write as _, path::Path, process::Stdio};

use anyhow::{Context as _, Result, bail};

use crate::lab::{Lab, Pod, manifests};

const VIP: &str = "10.96.0.10";
const BACKEND_PORT: u16 = 8080;

/// One run's result.
struct Measurement {
    mode: &'static str,
    requests_per_second: f64,
    latency: String,
}

pub struct BenchOptions {
    /// How many Services exist, the measured one included.
    pub services: usize,
    pub seconds: u32,
    pub connections: u32,
}

pub fn run(agent_binary: &Path, options: &BenchOptions) -> Result<()> {
    if options.services == 0 {
        bail!("--services must be at least 1");
    }
    let mut results = Vec::new();

    let (lab, pods) = pod_lab()?;
    results.push(measure(
        &lab,
        "direct to one pod (no Service, 1 nginx)",
        &format!("{}:{BACKEND_PORT}", pods[0].ip),
        options,
    )?);
    lab.write_manifest("services.yaml", &service_manifests(&pods, options.services))?;
    let agent = lab.start_agent(agent_binary)?;
    results.push(measure(&lab, "eBPF ClusterIP", VIP, options)?);
    drop(agent);
    drop(lab);

    // A fresh node namespace, so conntrack and the nat table exist only here.
    let (lab, pods) = pod_lab()?;
    lab.route_from_node("10.96.0.0/12")?;
    iptables_restore(&lab, &kube_proxy_rules(&pods, options.services))?;
    results.push(measure(
        &lab,
        "iptables ClusterIP (kube-proxy rules)",
        VIP,
        options,
    )?);
    drop(lab);

    print_results(&results, options);
    Ok(())
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

fn service_manifests(pods: &[Pod], services: usize) -> String {
    let endpoints: Vec<_> = pods.iter().map(|p| (p.ip, true)).collect();
    let documents: Vec<String> = (0..services)
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

fn iptables_restore(lab: &Lab, rules: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = lab
        .client("iptables-restore")
        .arg("-w")
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot run iptables-restore")?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(rules.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("iptables-restore failed: {status}");
    }
    Ok(())
}

fn measure(
    lab: &Lab,
    mode: &'static str,
    target: &str,
    options: &BenchOptions,
) -> Result<Measurement> {
    let url = format!("http://{target}/");
    // A short warm-up fills caches (and, for iptables, loads the modules).
    lab.run_client("wrk", &["-t1", "-c4", "-d1s", &url])?;
    let out = lab.run_client(
        "wrk",
        &[
            "-t2",
            &format!("-c{}", options.connections),
            &format!("-d{}s", options.seconds),
            &url,
        ],
    )?;
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
    })
}

fn print_results(results: &[Measurement], options: &BenchOptions) {
    println!(
        "\nnew connections per second to one ClusterIP among {} Services \
         (wrk -t2 -c{} -d{}s; every request a new connection)\n",
        options.services, options.connections, options.seconds
    );
    let iptables = results
        .iter()
        .find(|r| r.mode.starts_with("iptables"))
        .map_or(f64::NAN, |r| r.requests_per_second);
    println!(
        "{:<40} {:>12} {:>12} {:>14}",
        "MODE", "REQ/S", "AVG LATENCY", "VS IPTABLES"
    );
    for result in results {
        println!(
            "{:<40} {:>12.0} {:>12} {:>13.2}x",
            result.mode,
            result.requests_per_second,
            result.latency,
            result.requests_per_second / iptables
        );
    }
}
