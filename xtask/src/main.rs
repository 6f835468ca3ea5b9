//! `cargo xtask`: building the eBPF object, the demo and the tests.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use xtask::{
    apiserver::ApiServer,
    bench, cargo,
    lab::{self, Lab, TwoNodeLab, manifests},
    prerequisites, probe, run_checked, scale,
};

mod image;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (installing rust-src and bpf-linker if needed).
    BuildEbpf,
    /// Set up the machine, then show the agent balancing real traffic in a
    /// netns lab: pods, a ClusterIP, the maps; then a NodePort on two nodes
    /// reached from an external client. Needs root.
    Demo {
        /// Feed the agent from a test Kubernetes API server instead of a
        /// manifest directory, and change the endpoints there to show the
        /// traffic follow.
        #[arg(long)]
        api: bool,
    },
    /// Set up the machine, then run the unit tests and the privileged
    /// tests (a file per area in xtask/tests/). Needs root.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Measure a ClusterIP under this datapath and under kube-proxy's
    /// iptables and nftables modes, side by side in one run (new connections
    /// per second, connect latency, endpoint changes, install time, memory,
    /// the eBPF programs' cost), then the fairness of the random choice and
    /// NodePorts per family and size against kube-proxy's three modes.
    /// Writes target/bench/clusterip.{md,png}.
    /// Needs root.
    Bench {
        /// Cluster sizes to compare the ClusterIP and NodePort datapaths at
        /// (comma-separated, e.g. 1,1000,10000,30000).
        #[arg(
            long,
            value_name = "N,...",
            value_delimiter = ',',
            default_value = "1000"
        )]
        services: Vec<usize>,
        /// Rounds of every datapath in turn (median and spread).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Address families to compare the ClusterIP and NodePort
        /// datapaths over (comma-separated).
        #[arg(
            long,
            value_name = "FAMILY,...",
            value_delimiter = ',',
            default_value = "ipv4,ipv6"
        )]
        families: Vec<bench::Family>,
        /// Choices counted per Service in the fairness table.
        #[arg(long, default_value_t = 100_000)]
        fairness_choices: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Concurrent connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Instead, measure the agent itself fed by the test API server at
        /// these numbers of Services (comma-separated, e.g. 1000,10000,30000):
        /// full sync, endpoint change latency, a burst, peak memory.
        #[arg(long, value_name = "N,...", value_delimiter = ',')]
        api_scale: Vec<usize>,
        /// With --api-scale: endpoint changes measured one at a time.
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// With --api-scale: endpoint changes in the burst.
        #[arg(long, default_value_t = 1000)]
        burst: usize,
        /// Measure the debug build of the agent (quick to build, for smoke
        /// runs; its numbers are not the agent's). PROXY_AGENT=PATH measures
        /// that binary instead.
        #[arg(long)]
        debug_agent: bool,
    },
    /// Build the agent's container image from deploy/Dockerfile, then check
    /// that its agent runs and that it has iptables-legacy-save,
    /// iptables-nft-save and nft. With the Docker engine when one answers,
    /// otherwise with buildah (installed if missing; the Debian base is
    /// debootstrapped when Docker Hub cannot be reached). Needs root.
    Image {
        /// The image's name.
        #[arg(long, default_value = "localhost/ebpf-proxy:dev")]
        tag: String,
    },
    /// The bench's own clients, run by it inside a lab's client cgroup.
    #[command(hide = true, subcommand)]
    Probe(Probe),
}

#[derive(Subcommand)]
enum Probe {
    /// Timed TCP connects; prints the p50 and p99 in nanoseconds.
    Connect {
        target: std::net::SocketAddr,
        count: usize,
        /// Fail unless getpeername() shows the address dialled.
        #[arg(long)]
        check_peer: bool,
    },
    /// UDP sockets connected and closed: one load-balancing choice each.
    UdpChoices {
        target: std::net::SocketAddrV4,
        count: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::BuildEbpf => {
            let object = prerequisites::build_ebpf()?;
            println!("{}", object.display());
            Ok(())
        }
        Task::Demo { api } => demo(api),
        Task::Probe(Probe::Connect {
            target,
            count,
            check_peer,
        }) => probe::run_connect(target, count, check_peer),
        Task::Probe(Probe::UdpChoices { target, count }) => probe::run_udp_choices(target, count),
        Task::Test { filter } => test(filter.as_deref()),
        Task::Image { tag } => {
            require_root()?;
            image::build(&tag)
        }
        Task::Bench {
            services,
            seconds,
            connections,
            rounds,
            families,
            fairness_choices,
            api_scale,
            changes,
            burst,
            debug_agent,
        } => {
            require_root()?;
            prerequisites::ensure_tools()?;
            let agent = match std::env::var_os("PROXY_AGENT") {
                Some(binary) => binary.into(),
                None if debug_agent => prerequisites::build_agent()?,
                None => prerequisites::build_agent_release()?,
            };
            if api_scale.is_empty() {
                bench::run(
                    &agent,
                    &bench::BenchOptions {
                        services,
                        seconds,
                        connections,
                        rounds,
                        fairness_choices,
                        families,
                    },
                )
            } else {
                scale::run(
                    &agent,
                    &scale::ScaleOptions {
                        sizes: api_scale,
                        changes,
                        burst,
                    },
                )
            }
        }
    }
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root (network namespaces, cgroups and BPF): run it with sudo");
    }
    Ok(())
}

fn test(filter: Option<&str>) -> Result<()> {
    require_root()?;
    prerequisites::ensure_tools()?;
    let agent = prerequisites::build_agent()?;
    // Unit tests of every crate; the privileged tests are #[ignore]d there.
    run_checked(cargo().args(["test", "--workspace"]))?;
    let mut args = vec!["test", "--package", "xtask"];
    args.extend([
        "--test",
        "api",
        "--test",
        "clusterip",
        "--test",
        "doctor",
        "--test",
        "hostile",
        "--test",
        "ipv6",
        "--test",
        "kube_proxy",
        "--test",
        "lifecycle",
        "--test",
        "mesh",
        "--test",
        "listeners",
        "--test",
        "nodeport",
        "--test",
        "nodeport6",
        "--",
    ]);
    args.extend(filter);
    // Two labs at a time: each runs nginx pods and an agent, and the
    // machine has two cores.
    args.extend(["--ignored", "--test-threads=2"]);
    run_checked(cargo().args(&args).env("PROXY_AGENT", &agent))
}

/// The example the demo serves: one HTTP Service over three pods, and a
/// dual-stack one over the same pods with a ClusterIP and an
/// EndpointSlice per family.
fn demo_manifest(pods: &[lab::Pod]) -> String {
    let endpoints: Vec<_> = pods.iter().map(|p| (p.ip, true)).collect();
    let endpoints6: Vec<_> = pods.iter().map(|p| (p.ip6, true)).collect();
    let http = [("http", 80, "TCP")];
    let backend = [("http", 8080, "TCP")];
    manifests::documents(&[
        manifests::service("web", "10.96.0.10", &http),
        manifests::endpoint_slice("web-1", "web", &backend, &endpoints),
        manifests::dual_stack_service("dual", &DUAL_STACK_VIPS, &http),
        manifests::endpoint_slice("dual-ipv4", "dual", &backend, &endpoints),
        manifests::endpoint_slice_v6("dual-ipv6", "dual", &backend, &endpoints6),
    ])
}

/// The dual-stack Service's ClusterIPs, IPv4 first.
const DUAL_STACK_VIPS: [&str; 2] = ["10.96.0.20", "fd10:96::20"];

/// The dual-stack Service answering on each of its ClusterIPs: which pod
/// answered, and the client address a pod saw (the node's own, of the
/// family dialled: the datapath translates only the destination).
fn show_dual_stack(lab: &Lab) -> Result<()> {
    println!(
        "\n# the dual-stack Service \"dual\": clusterIPs {} and {}, an EndpointSlice per family",
        DUAL_STACK_VIPS[0], DUAL_STACK_VIPS[1]
    );
    for vip in DUAL_STACK_VIPS {
        let host = if vip.contains(':') {
            format!("[{vip}]")
        } else {
            vip.to_owned()
        };
        for path in ["", "", "", "peer"] {
            let url = format!("http://{host}/{path}");
            let out = lab.run_client("curl", &["-s", "-g", "--max-time", "2", &url])?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let answer = if answer.is_empty() {
                format!("no answer (curl exit {})", out.status)
            } else if path == "peer" {
                format!("{answer} (the client address the pod saw)")
            } else {
                answer
            };
            println!("curl {url} -> {answer}");
        }
    }
    Ok(())
}

/// The Node the agent of `demo --api` runs as.
const DEMO_NODE: &str = "node-1";

/// Who answers `count` requests to the demo's ClusterIP ("refused" for a
/// request that got no answer).
fn tally(lab: &Lab, count: usize) -> Result<std::collections::BTreeMap<String, usize>> {
    let url = format!("http://10.96.0.10/[1-{count}]");
    let out = lab.run_client("curl", &["-s", "--max-time", "30", &url])?;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for pod in String::from_utf8_lossy(&out.stdout).lines() {
        *counts.entry(pod.to_owned()).or_default() += 1;
    }
    let answered: usize = counts.values().sum();
    if answered < count {
        counts.insert("refused".to_owned(), count - answered);
    }
    Ok(counts)
}

/// `demo --api`: endpoint changes in the API server, and the traffic
/// following them.
fn follow_the_api(lab: &Lab, server: &ApiServer, pods: &[lab::Pod]) -> Result<()> {
    let slice = |endpoints: &[(std::net::Ipv4Addr, bool)]| {
        manifests::endpoint_slice("web-1", "web", &[("http", 8080, "TCP")], endpoints)
    };
    let steps = [
        (
            "the EndpointSlice now lists only pod-c, as the EndpointSlice controller \
             would after a scale-down",
            slice(&[(pods[2].ip, true)]),
            Some("pod-c"),
        ),
        (
            "pod-a comes back, and pod-c is no longer ready",
            slice(&[(pods[0].ip, true), (pods[2].ip, false)]),
            Some("pod-a"),
        ),
    ];
    for (what, yaml, moved_to) in steps {
        println!("\n# {what}\n{yaml}");
        let applied = std::time::Instant::now();
        server.apply_yaml(&yaml)?;
        if let Some(pod) = moved_to {
            wait_for_answer(lab, pod)?;
            println!(
                "traffic moved to {pod} {:?} after the API server had the change",
                applied.elapsed()
            );
        }
        println!(
            "30 requests, counted by the pod that answered: {:?}",
            tally(lab, 30)?
        );
    }
    Ok(())
}

/// Asks the ClusterIP until `pod` answers.
fn wait_for_answer(lab: &Lab, pod: &str) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        let out = lab.run_client("curl", &["-s", "--max-time", "1", "http://10.96.0.10/"])?;
        if String::from_utf8_lossy(&out.stdout).trim() == pod {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("{pod} did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn demo(api: bool) -> Result<()> {
    require_root()?;
    prerequisites::ensure_tools()?;
    let agent_binary = prerequisites::build_agent()?;
    let (lab, pods) = Lab::with_web_pods(&["pod-a", "pod-b", "pod-c"], 8080)?;
    for pod in &pods {
        println!(
            "started {} at {}:8080 and [{}]:8080 (nginx answering with its name)",
            pod.name, pod.ip, pod.ip6
        );
    }
    let manifest = demo_manifest(&pods);
    let mut api_server = None;
    let agent = if api {
        let server = ApiServer::start()?;
        let node = manifests::node(DEMO_NODE, |_| ());
        server.apply_yaml(&format!("{node}---\n{manifest}"))?;
        println!(
            "\n# applied to a test API server at {} (kubeconfig {})\n{node}---\n{manifest}",
            server.url(),
            server.kubeconfig().display()
        );
        let agent = lab.start_agent_on_api(&agent_binary, server.kubeconfig(), DEMO_NODE)?;
        api_server = Some(server);
        agent
    } else {
        lab.write_manifest("web.yaml", &manifest)?;
        println!("\n# manifests/web.yaml\n{manifest}");
        lab.start_agent(&agent_binary)?
    };
    println!(
        "agent running: programs attached to {}",
        lab.cgroup().display()
    );

    println!("\n# 6 requests to the ClusterIP, each a new connection");
    for _ in 0..6 {
        let out = lab.run_client("curl", &["-s", "--max-time", "2", "http://10.96.0.10/"])?;
        println!(
            "curl http://10.96.0.10/ -> {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let tally = lab.run_client(
        "curl",
        &["-s", "--max-time", "30", "http://10.96.0.10/[1-300]"],
    )?;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for pod in String::from_utf8_lossy(&tally.stdout).lines() {
        *counts.entry(pod.to_owned()).or_default() += 1;
    }
    println!("300 more, counted by the pod that answered: {counts:?}");
    show_dual_stack(&lab)?;
    if let Some(server) = &api_server {
        follow_the_api(&lab, server, &pods)?;
    }
    let bpffs = lab.bpffs().display().to_string();
    let map = format!("{bpffs}/maps/{}", proxy_common::SERVICES_MAP);
    let proxy = agent_binary.display().to_string();
    show_command("proxy-userspace", &proxy, &["services", "--bpffs", &bpffs])?;
    show_command("proxy-userspace", &proxy, &["stats", "--bpffs", &bpffs])?;
    show_command("bpftool", "bpftool", &["map", "dump", "pinned", &map])?;

    println!("\n# the agent is SIGKILLed; the pinned datapath keeps serving");
    drop(agent);
    std::thread::sleep(Duration::from_millis(100));
    let out = lab.run_client("curl", &["-s", "--max-time", "2", "http://10.96.0.10/"])?;
    println!(
        "curl http://10.96.0.10/ -> {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    println!("\ncleaning up the lab");
    // Torn down before the second part, so that only its agents run.
    drop(api_server);
    drop(lab);
    node_port_demo(&agent_binary)
}

/// Prints `# name args`, then runs `program` with `args` and prints what
/// it wrote.
fn show_command(name: &str, program: &str, args: &[&str]) -> Result<()> {
    println!("\n# {name} {}", args.join(" "));
    let out = Command::new(program).args(args).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// The demo's second part: a NodePort reached by a client outside the
/// cluster, on two nodes with a pod each and an agent each, as a DaemonSet
/// would run them; the tc programs on node 1's eth0 answer from both pods.
fn node_port_demo(agent_binary: &Path) -> Result<()> {
    println!(
        "\n## a NodePort from outside the cluster: two nodes on 192.168.100.0/24 \
         and an external client at 192.168.100.1"
    );
    let mut lab = TwoNodeLab::new()?;
    let mut endpoints = Vec::new();
    for number in [1, 2] {
        let node = lab.node_mut(number);
        let name = format!("node-{number}-pod");
        let pod = node.add_pod(&name)?;
        node.serve_http(&pod, 8080)?;
        println!("started {name} at {}:8080 on node-{number}", pod.ip);
        endpoints.push((pod.ip, format!("node-{number}")));
    }
    let endpoints: Vec<_> = endpoints.iter().map(|(ip, n)| (*ip, n.as_str())).collect();
    let manifest = manifests::documents(&[
        manifests::node_port_service("web", "NodePort", "10.96.0.40", (80, 30080), |_| ()),
        manifests::endpoint_slice_on_nodes("web-1", "web", &[("http", 8080, "TCP")], &endpoints),
    ]);
    // Both agents read the same Services, as they would from one API server.
    lab.write_manifest("web.yaml", &manifest)?;
    println!("\n# manifests/web.yaml on both nodes\n{manifest}");
    // Inside its node's namespace each agent sees the node's devices and
    // attaches its tc programs to them.
    let agents = lab.start_agents(agent_binary, &[])?;
    for agent in &agents {
        agent.wait_for_log("attached (TCX)", Duration::from_secs(10))?;
    }
    println!("agents running on node-1 and node-2: tc programs attached to their devices");

    let url = format!("http://{}:30080/", lab.node_ip(1));
    println!("\n# 10 requests from the external client to node 1's NodePort");
    for _ in 0..10 {
        let out = lab
            .external("curl")
            .args(["-s", "--max-time", "2", &url])
            .output()?;
        println!(
            "curl {url} -> {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let bpffs = lab.node(1).bpffs().display().to_string();
    let proxy = agent_binary.display().to_string();
    show_command("proxy-userspace", &proxy, &["stats", "--bpffs", &bpffs])?;
    println!("\ncleaning up the lab");
    drop(agents);
    Ok(())
}
