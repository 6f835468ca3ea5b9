//! The NodePort table: an external namespace's connections to a pod on
//! node 1, straight to its address (routed through node 1) against through
//! a NodePort of each externalTrafficPolicy, under the eBPF datapath and
//! under kube-proxy's iptables rules.

use std::{path::Path, time::Duration};

use anyhow::Result;

use super::{BACKEND_PORT, BenchOptions, Measurement, feed, kube_proxy, measure};
use crate::lab::{Pod, TwoNodeLab, manifests};

/// The external client's connections to one pod on node 1: straight to
/// its address (routed through node 1), and through a NodePort of each
/// externalTrafficPolicy (Cluster adds the masquerade), under the eBPF
/// datapath and under kube-proxy's rules.
pub fn node_port(agent_binary: &Path, options: &BenchOptions) -> Result<Vec<Measurement>> {
    // Each datapath gets nodes of its own. The pod keeps the TIME_WAIT of
    // every connection it closed, under the pod-side tuple, which a NodePort
    // shares with a direct connection from the same client port, but not
    // the client's sequence numbers and timestamps, which Linux derives
    // from the address the client dialled. A SYN that meets such a
    // TIME_WAIT is answered with an ACK, and the client retries after a
    // second: in one lab, one mode's leftovers would stall the next.
    let (lab, pod) = node_port_lab()?;
    let mut results = vec![measure(
        &|args: &[&str]| Ok(lab.external("wrk").args(args).output()?),
        "direct to the pod (routed by node 1)",
        &format!("{}:{BACKEND_PORT}", pod.ip),
        options,
    )?];
    drop(lab);

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
                manifests::local_traffic,
            ),
            manifests::endpoint_slice_on_nodes("local-1", "local", &backend, &endpoints),
            manifests::node_port_service(
                "cluster",
                "NodePort",
                "10.96.0.21",
                (80, CLUSTER_NODE_PORT.into()),
                |_| (),
            ),
            manifests::endpoint_slice_on_nodes("cluster-1", "cluster", &backend, &endpoints),
        ]),
    )?;
    let agents = lab.start_agents(agent_binary, &[])?;
    agents[0].wait_for_log("attached (TCX)", Duration::from_secs(10))?;
    results.extend(node_ports(&lab, "eBPF", options)?);
    drop(agents);
    drop(lab);

    // Conntrack and the nat table exist only in this last pair.
    let (lab, pod) = node_port_lab()?;
    feed(
        lab.node(1),
        "iptables-restore",
        &["-w"],
        &kube_proxy::node_ports(&pod, LOCAL_NODE_PORT, CLUSTER_NODE_PORT),
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
