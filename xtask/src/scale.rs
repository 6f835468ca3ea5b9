//! `cargo xtask bench --api-scale N,...`: the agent at scale, fed by the
//! test API server through the real kube client.
//!
//! For each size N, a fresh lab and API server hold N Services of 4
//! endpoints each (N - 1 fillers whose endpoints are addresses nobody
//! dials, and one probe Service at 10.96.0.10 in front of a real nginx
//! pod), and the agent is measured as a node would feel it:
//! - **full sync**: from the agent's start to the first connection that a
//!   prober in the lab gets through the probe's ClusterIP (the agent
//!   attaches its programs only once the maps hold the complete view, so
//!   that connection means everything is written);
//! - **endpoint change**: the probe's slice moves its endpoint to the other
//!   pod in the API server, and the prober, told at once, connects until
//!   the other pod answers; repeated, and reported as p50 and p99. The
//!   agent's own `took_us` (model and map writes only) is shown beside;
//! - **burst**: 1,000 filler slices change back to back, then the probe
//!   once more; once the probe has moved, every change before it has been
//!   applied (the slices come on one watch, in order), and the agent's
//!   "applied" lines since the burst began are counted;
//! - **peak RSS**: the agent's VmHWM after all of that.
//!
//! The prober ([`ChangeProber`]) is Python in the lab's cgroup, so what it
//! measures includes a few hundred microseconds of its own per connection.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    apiserver::ApiServer,
    lab::{Agent, Lab},
    probe::{ChangeProber, percentiles},
};

const PROBE_VIP: &str = "10.96.0.10";
const BACKEND_PORT: u16 = 8080;
const ENDPOINTS_PER_SERVICE: u32 = 4;
/// The Node the agent runs as.
pub const NODE: &str = "node-1";
/// Pause between two measured changes, so that each is applied alone
/// (longer than the agent's 20 ms burst window).
const CHANGE_GAP: Duration = Duration::from_millis(50);

pub struct ScaleOptions {
    /// Services per run, one run per size.
    pub sizes: Vec<usize>,
    /// Measured endpoint changes per size.
    pub changes: usize,
    /// Endpoint changes in the burst.
    pub burst: usize,
}

/// One size's results.
#[derive(Debug)]
pub struct ScaleResult {
    pub services: usize,
    pub full_sync: Duration,
    /// From the API apply to the prober seeing the new endpoint.
    pub change_p50: Duration,
    pub change_p99: Duration,
    /// The agent's `took_us` for those changes.
    pub applied_p50: Duration,
    pub applied_p99: Duration,
    pub burst: usize,
    /// "applied" lines the burst caused.
    pub burst_applies: usize,
    /// Services the burst changed whose frontend, once the probe moved,
    /// still lists the backend the burst took out: changes coalesced away.
    pub burst_lost: usize,
    pub peak_rss_kib: u64,
}

pub fn run(agent_binary: &Path, options: &ScaleOptions) -> Result<()> {
    let mut results = Vec::new();
    for &services in &options.sizes {
        eprintln!("api-scale: {services} Services x {ENDPOINTS_PER_SERVICE} endpoints");
        results.push(measure(agent_binary, services, options)?);
    }
    print!("{}", table(&results, options));
    Ok(())
}

/// Runs every measurement at one size.
pub fn measure(
    agent_binary: &Path,
    services: usize,
    options: &ScaleOptions,
) -> Result<ScaleResult> {
    if services == 0 {
        bail!("--api-scale sizes must be at least 1");
    }
    let (lab, pods) = Lab::with_web_pods(&["pod-a", "pod-b"], BACKEND_PORT)?;
    let api = ApiServer::start()?;
    let loading = Instant::now();
    api.apply_all(
        std::iter::once(node())
            .chain((1..services).flat_map(filler))
            .chain([
                service("probe", PROBE_VIP),
                slice("probe", &[pods[0].ip], true),
            ]),
    )?;
    eprintln!(
        "  loaded {} objects into the API server in {:?}",
        services * 2 + 1,
        loading.elapsed()
    );

    // What the server alone takes to serve the lists the agent will ask
    // for, so that the full sync below can be read as server plus agent.
    let listing = Instant::now();
    let listed = list_all(&api, "/api/v1/services")?
        + list_all(&api, "/apis/discovery.k8s.io/v1/endpointslices")?;
    eprintln!(
        "  the API server alone serves the {listed} objects in pages of 500 in {:?}",
        listing.elapsed()
    );

    let mut prober = ChangeProber::start(&lab, PROBE_VIP)?;
    // The prober tries before the agent runs: connections to the VIP fail
    // at once (no route) until the programs are attached.
    prober.expect("")?;
    let started = SystemTime::now();
    let agent = lab.start_agent_on_api(agent_binary, api.kubeconfig(), NODE)?;
    let (answer, _, at) = prober.answer()?;
    if answer != "pod-a" {
        bail!("the probe Service answered {answer:?}, not pod-a");
    }
    let full_sync = at
        .duration_since(started)
        .context("the prober's clock went back")?;
    eprintln!("  full sync: {full_sync:?}; the agent's start, as it logged it:");
    for line in agent
        .log()
        .lines()
        .take_while(|l| !l.contains("datapath ready"))
    {
        if !line.contains("attached program") {
            eprintln!("    {line}");
        }
    }

    let applied_before = applied_lines(&agent).len();
    let mut latencies = Vec::new();
    for change in 0..options.changes {
        let pod = &pods[(change + 1) % 2];
        std::thread::sleep(CHANGE_GAP);
        api.apply(slice("probe", &[pod.ip], true))?;
        prober.expect(&pod.name)?;
        latencies.push(prober.moved_to(&pod.name)?);
    }
    let took: Vec<Duration> = applied_lines(&agent)
        .into_iter()
        .skip(applied_before)
        .collect();

    // The burst: filler slices flip an endpoint's readiness back to back.
    std::thread::sleep(Duration::from_millis(200));
    let applied_before = applied_lines(&agent).len();
    let fillers = services.saturating_sub(1).max(1);
    for change in 0..options.burst {
        let index = change % fillers + 1;
        if index < services {
            api.apply(filler_slice(index, false))?;
        }
    }
    let last = &pods[(options.changes + 1) % 2];
    api.apply(slice("probe", &[last.ip], true))?;
    prober.expect(&last.name)?;
    prober.moved_to(&last.name)?;
    std::thread::sleep(Duration::from_millis(200));
    let burst_applies = applied_lines(&agent).len() - applied_before;
    let burst_lost = burst_lost(&agent, services, options.burst)?;

    let peak_rss_kib = agent.peak_rss_kib()?;
    let (change_p50, change_p99) = percentiles(&mut latencies);
    let mut took = took;
    let (applied_p50, applied_p99) = percentiles(&mut took);
    drop(agent);
    Ok(ScaleResult {
        services,
        full_sync,
        change_p50,
        change_p99,
        applied_p50,
        applied_p99,
        burst: options.burst,
        burst_applies,
        burst_lost,
        peak_rss_kib,
    })
}

/// How many of the fillers the burst flipped still have all their
/// endpoints in the maps (the burst takes each one's first endpoint out).
fn burst_lost(agent: &Agent, services: usize, burst: usize) -> Result<usize> {
    let listed: Vec<Value> = serde_json::from_str(&agent.services_json()?)?;
    let fillers = services.saturating_sub(1).max(1);
    let flipped: std::collections::BTreeSet<usize> = (0..burst)
        .map(|change| change % fillers + 1)
        .filter(|&index| index < services)
        .collect();
    Ok(flipped
        .into_iter()
        .filter(|&index| {
            let frontend = format!("{}:80", filler_ip(index));
            let backends = listed
                .iter()
                .find(|service| service["frontend"] == frontend.as_str())
                .and_then(|service| service["backends"].as_array())
                .map_or(0, Vec::len);
            backends != ENDPOINTS_PER_SERVICE as usize - 1
        })
        .count())
}

/// The markdown table the README shows.
#[must_use]
pub fn table(results: &[ScaleResult], options: &ScaleOptions) -> String {
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let mut text = format!(
        "\nthe agent on the test API server: Services x {ENDPOINTS_PER_SERVICE} endpoints; \
         {} endpoint changes, one at a time; a burst of {} changes\n\n\
         | Services | full sync to first reachable ClusterIP | endpoint change p50 / p99 (API to traffic) | agent's apply p50 / p99 | applies for the burst | peak RSS |\n\
         |---|---|---|---|---|---|\n",
        options.changes, options.burst
    );
    for r in results {
        let _ = writeln!(
            text,
            "| {} | {} | {} / {} | {} / {} | {} for {} changes | {} MiB |",
            r.services,
            ms(r.full_sync),
            ms(r.change_p50),
            ms(r.change_p99),
            ms(r.applied_p50),
            ms(r.applied_p99),
            r.burst_applies,
            r.burst,
            r.peak_rss_kib / 1024,
        );
    }
    text
}

/// Lists `path` page by page as a client would, and counts the items.
fn list_all(api: &ApiServer, path: &str) -> Result<usize> {
    use std::io::Read as _;
    let mut items = 0;
    let mut token = String::new();
    loop {
        let mut stream = std::net::TcpStream::connect(api.addr())?;
        write!(
            stream,
            "GET {path}?limit=500&continue={token} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.shutdown(std::net::Shutdown::Write)?;
        // The server keeps the connection for the next request: read the
        // body by its length.
        let mut reader = BufReader::new(stream);
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse()?;
            }
        }
        response.resize(length, 0);
        reader.read_exact(&mut response)?;
        let list: Value = serde_json::from_slice(&response)?;
        items += list["items"].as_array().map_or(0, Vec::len);
        match list["metadata"]["continue"].as_str() {
            Some(next) if !next.is_empty() => token = next.replace('/', "%2F"),
            _ => return Ok(items),
        }
    }
}

/// The `took_us` of every "applied" line the agent has logged.
fn applied_lines(agent: &Agent) -> Vec<Duration> {
    agent
        .log()
        .lines()
        .filter(|line| line.contains(" applied"))
        .filter_map(|line| {
            let value = line.split("took_us=").nth(1)?.split_whitespace().next()?;
            value.parse().ok().map(Duration::from_micros)
        })
        .collect()
}

/// Filler Service `index` (1-based) at 10.100.0.0 + index, with endpoints
/// at 10.64.0.0 + 4 * index + k: addresses that are never dialled.
fn filler_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + as_u32(index))
}

fn filler(index: usize) -> [Value; 2] {
    let ip = filler_ip(index);
    [
        service(&format!("svc-{index}"), &ip.to_string()),
        filler_slice(index, true),
    ]
}

fn filler_slice(index: usize, first_ready: bool) -> Value {
    let base = u32::from(Ipv4Addr::new(10, 64, 0, 0)) + ENDPOINTS_PER_SERVICE * as_u32(index);
    let endpoints: Vec<Ipv4Addr> = (0..ENDPOINTS_PER_SERVICE)
        .map(|k| Ipv4Addr::from(base + k))
        .collect();
    slice(&format!("svc-{index}"), &endpoints, first_ready)
}

/// The agent's Node.
#[must_use]
pub fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
}

fn as_u32(index: usize) -> u32 {
    u32::try_from(index).expect("sizes fit the address ranges")
}

/// A ClusterIP Service of one TCP port, 80 to the pods' 8080.
#[must_use]
pub fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            // As the API server fills them in on every Service.
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": BACKEND_PORT}],
        },
    })
}

/// The slice of Service `name`; the first endpoint is ready or not.
#[must_use]
pub fn slice(name: &str, endpoints: &[Ipv4Addr], first_ready: bool) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(k, ip)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": k > 0 || first_ready},
                "nodeName": NODE,
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-1"),
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}
