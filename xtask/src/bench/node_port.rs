//! The NodePort tables, one per family and cluster size: an external
//! namespace's connections to a pod on node 1, straight to its address
//! (routed through node 1) against through a NodePort of each
//! externalTrafficPolicy, under the eBPF datapath and under kube-proxy's
//! three modes (iptables on legacy and on nft, nftables), with the same
//! filler ClusterIP Services loaded into each (kube-proxy matches a
//! NodePort packet against its ClusterIPs first: every KUBE-SERVICES rule
//! in its iptables modes, one verdict map in nftables). The eBPF rows also
//! say what the tc programs cost per packet, from bpf_stats over a run of
//! their own, so the rates are measured without the stats' overhead.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Output,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    BACKEND_PORT, BenchOptions, Datapath, Family, Measurement, feed, kube_proxy, measure,
    restore_command, service_ip,
};
use crate::{
    bpf_stats::{RunTimeStats, cost_of},
    lab::{DUAL_STACK_FLAGS, Pod, TwoNodeLab, manifests},
};

/// The external client's connections to one pod on node 1: straight to
/// its address (routed through node 1), and through a NodePort of each
/// externalTrafficPolicy (Cluster adds the masquerade), under the eBPF
/// datapath and under kube-proxy's rules, all over `family`; a table for
/// each of `options.services` (the direct row measured once).
pub fn node_port(
    agent_binary: &Path,
    family: Family,
    options: &BenchOptions,
) -> Result<Vec<(usize, Vec<Measurement>)>> {
    // Each datapath gets nodes of its own: its own rules, maps and
    // conntrack, and no connection state left by the mode before.
    let (lab, pod) = node_port_lab(family)?;
    let direct = measure(
        &|args: &[&str]| Ok(lab.external("wrk").args(args).output()?),
        "direct to the pod (routed by node 1)",
        &host_port(family.address_of(&pod), BACKEND_PORT),
        options,
    )?;
    drop(lab);
    let mut tables = Vec::new();
    for &services in &options.services {
        let mut results = vec![direct.clone()];
        results.extend(ebpf_node_ports(agent_binary, family, services, options)?);
        for datapath in KUBE_PROXY_MODES {
            results.extend(kube_proxy_node_ports(family, datapath, services, options)?);
        }
        tables.push((services, results));
    }
    Ok(tables)
}

/// Both NodePorts under the eBPF datapath, with `services` filler
/// ClusterIP Services beside them.
fn ebpf_node_ports(
    agent_binary: &Path,
    family: Family,
    services: usize,
    options: &BenchOptions,
) -> Result<[Measurement; 2]> {
    let (lab, pod) = node_port_lab(family)?;
    let backend = [("http", BACKEND_PORT, "TCP")];
    let endpoints = [(family.address_of(&pod), "node-1")];
    let (local_ip, cluster_ip) = match family {
        Family::Ipv4 => ("10.96.0.20", "10.96.0.21"),
        Family::Ipv6 => ("fd10:96::20", "fd10:96::21"),
    };
    let of_family = |spec: &mut k8s_openapi::api::core::v1::ServiceSpec| {
        spec.ip_families = Some(vec![family.name().to_owned()]);
    };
    let fillers: Vec<String> = (0..services)
        .flat_map(|i| {
            let name = format!("svc-{i}");
            [
                manifests::dual_stack_service(
                    &name,
                    &[&service_ip(family, i, services).to_string()],
                    &[("http", 80, "TCP")],
                ),
                manifests::endpoint_slice_on_nodes(
                    &format!("{name}-1"),
                    &name,
                    &backend,
                    &endpoints,
                ),
            ]
        })
        .collect();
    lab.write_manifest("fillers.yaml", &manifests::documents(&fillers))?;
    lab.write_manifest(
        "nodeport.yaml",
        &manifests::documents(&[
            manifests::node_port_service(
                "local",
                "NodePort",
                local_ip,
                (80, LOCAL_NODE_PORT.into()),
                |spec| {
                    manifests::local_traffic(spec);
                    of_family(spec);
                },
            ),
            manifests::endpoint_slice_on_nodes("local-1", "local", &backend, &endpoints),
            manifests::node_port_service(
                "cluster",
                "NodePort",
                cluster_ip,
                (80, CLUSTER_NODE_PORT.into()),
                of_family,
            ),
            manifests::endpoint_slice_on_nodes("cluster-1", "cluster", &backend, &endpoints),
        ]),
    )?;
    let flags = match family {
        Family::Ipv4 => &[][..],
        Family::Ipv6 => DUAL_STACK_FLAGS,
    };
    let agents = lab.start_agents(agent_binary, flags)?;
    agents[0].wait_for_log("attached (TCX)", Duration::from_secs(10))?;
    node_ports(&lab, family, Datapath::Ebpf, options)
}

/// kube-proxy's modes, each measured on nodes of its own.
const KUBE_PROXY_MODES: [Datapath; 3] = [
    Datapath::IptablesLegacy,
    Datapath::IptablesNft,
    Datapath::Nftables,
];

/// Both NodePorts under kube-proxy's rules in `datapath`'s mode, with
/// `services` filler ClusterIP Services before them.
fn kube_proxy_node_ports(
    family: Family,
    datapath: Datapath,
    services: usize,
    options: &BenchOptions,
) -> Result<[Measurement; 2]> {
    // Conntrack and the nat table exist only in these nodes.
    let (lab, pod) = node_port_lab(family)?;
    let pod = family.address_of(&pod);
    let (local, cluster) = (LOCAL_NODE_PORT, CLUSTER_NODE_PORT);
    match datapath {
        Datapath::Nftables => feed(
            lab.node(1),
            "nft",
            &["-f", "-"],
            &kube_proxy::nftables_node_ports(family, services, pod, local, cluster),
        )?,
        _ => feed(
            lab.node(1),
            restore_command(family, datapath),
            &["-w"],
            &kube_proxy::node_ports(family, services, pod, local, cluster),
        )?,
    }
    node_ports(&lab, family, datapath, options)
}

/// `address:port`, the address in brackets if IPv6, as wrk's URLs and
/// iptables' `--to-destination` write it.
fn host_port(address: IpAddr, port: u16) -> String {
    SocketAddr::new(address, port).to_string()
}

const LOCAL_NODE_PORT: u16 = 30080;
const CLUSTER_NODE_PORT: u16 = 30081;

/// Two nodes, one nginx pod on node 1, and the external client's route
/// to the pods of `family` through node 1.
fn node_port_lab(family: Family) -> Result<(TwoNodeLab, Pod)> {
    let mut lab = TwoNodeLab::new()?;
    let node = lab.node_mut(1);
    let pod = node.add_pod("pod-a")?;
    node.serve_http(&pod, BACKEND_PORT)?;
    // nginx closes each connection, so the pod keeps its TIME_WAIT. Policy
    // Cluster masquerades with random source ports (`--random-fully`, as
    // kube-proxy does), which at this rate from one client soon meet one
    // of those, whose sequence check refuses the SYN until it is sent
    // again a second later: then the table would compare that clash, not
    // the datapaths. A pod of a real node hears many clients, and every
    // row here pays alike for this.
    node.pod_client(&pod, "sysctl")
        .args(["-qw", "net.ipv4.tcp_max_tw_buckets=0"])
        .status()?
        .success()
        .then_some(())
        .context("cannot set the pod's tcp_max_tw_buckets")?;
    let pods = match family {
        Family::Ipv4 => "10.244.1.0/24".to_owned(),
        Family::Ipv6 => lab.node(1).pod_cidr6(),
    };
    lab.route_via_node(&pods, 1)?;
    Ok((lab, pod))
}

/// Both NodePorts of node 1's address of `family`, as `datapath` serves
/// them; under the eBPF datapath with what its tc programs cost.
fn node_ports(
    lab: &TwoNodeLab,
    family: Family,
    datapath: Datapath,
    options: &BenchOptions,
) -> Result<[Measurement; 2]> {
    let wrk = |args: &[&str]| Ok(lab.external("wrk").args(args).output()?);
    let node: IpAddr = match family {
        Family::Ipv4 => lab.node_ip(1).into(),
        Family::Ipv6 => lab.node_ip6(1).into(),
    };
    let (local, cluster) = match datapath {
        Datapath::Ebpf => ("eBPF, policy Local", "eBPF, Cluster (masq.)"),
        Datapath::IptablesLegacy => (
            "kube-proxy iptables (legacy), Local",
            "kube-proxy iptables (legacy), Cluster",
        ),
        Datapath::IptablesNft => (
            "kube-proxy iptables (nft), Local",
            "kube-proxy iptables (nft), Cluster",
        ),
        Datapath::Nftables => ("kube-proxy nftables, Local", "kube-proxy nftables, Cluster"),
        Datapath::Direct => bail!("a NodePort is no direct path"),
    };
    let measure_port = |mode: &'static str, port: u16| -> Result<Measurement> {
        let target = host_port(node, port);
        let mut measured = measure(&wrk, mode, &target, options)?;
        if datapath == Datapath::Ebpf {
            measured.tc_nanoseconds = Some(tc_cost(lab, &wrk, &target, options)?);
        }
        Ok(measured)
    };
    Ok([
        measure_port(local, LOCAL_NODE_PORT)?,
        measure_port(cluster, CLUSTER_NODE_PORT)?,
    ])
}

/// What node 1's tc programs cost per packet, ingress and egress, over a
/// short run of `wrk` to `target` of its own: bpf_stats adds two clock
/// reads to every call, which the measured rate should not pay.
fn tc_cost(
    lab: &TwoNodeLab,
    wrk: &dyn Fn(&[&str]) -> Result<Output>,
    target: &str,
    options: &BenchOptions,
) -> Result<[f64; 2]> {
    let _stats = RunTimeStats::enable()?;
    let url = format!("http://{target}/");
    let connections = format!("-c{}", options.connections);
    let costs = cost_of(lab.node(1), &["tc_ingress@eth0", "tc_egress@eth0"], || {
        wrk(&["-t2", &connections, "-d2s", &url]).map(drop)
    })?;
    Ok([costs[0].0, costs[1].0])
}

/// One table: every mode's rate, and its ratio to the mode whose name
/// starts with `baseline`.
pub fn print_results(title: &str, results: &[Measurement], baseline: &str, options: &BenchOptions) {
    println!(
        "\n{title} (wrk -t2 -c{} -d{}s; every request a new connection)\n",
        options.connections, options.seconds
    );
    let base = results
        .iter()
        .find(|r| r.mode.starts_with(baseline))
        .map_or(f64::NAN, |r| r.requests_per_second);
    println!(
        "{:<40} {:>12} {:>12} {:>14} {:>16}",
        "MODE",
        "REQ/S",
        "AVG LATENCY",
        format!("VS {}", baseline.to_uppercase()),
        "TC IN/OUT NS"
    );
    for result in results {
        let tc = result.tc_nanoseconds.map_or_else(
            || "-".to_owned(),
            |[ingress, egress]| format!("{ingress:.0} / {egress:.0}"),
        );
        println!(
            "{:<40} {:>12.0} {:>12} {:>13.2}x {:>16}",
            result.mode,
            result.requests_per_second,
            result.latency,
            result.requests_per_second / base,
            tc
        );
    }
}
