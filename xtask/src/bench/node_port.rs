//! The NodePort table, one per family: an external namespace's
//! connections to a pod on node 1, straight to its address (routed through
//! node 1) against through a NodePort of each externalTrafficPolicy, under
//! the eBPF datapath and under kube-proxy's iptables (ip6tables) rules.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::Result;

use super::{BACKEND_PORT, BenchOptions, Family, Measurement, feed, kube_proxy, measure};
use crate::lab::{DUAL_STACK_FLAGS, Pod, TwoNodeLab, manifests};

/// The external client's connections to one pod on node 1: straight to
/// its address (routed through node 1), and through a NodePort of each
/// externalTrafficPolicy (Cluster adds the masquerade), under the eBPF
/// datapath and under kube-proxy's rules, all over `family`.
pub fn node_port(
    agent_binary: &Path,
    family: Family,
    options: &BenchOptions,
) -> Result<Vec<Measurement>> {
    // Each datapath gets nodes of its own. The pod keeps the TIME_WAIT of
    // every connection it closed, under the pod-side tuple, which a NodePort
    // shares with a direct connection from the same client port, but not
    // the client's sequence numbers and timestamps, which Linux derives
    // from the address the client dialled. A SYN that meets such a
    // TIME_WAIT is answered with an ACK, and the client retries after a
    // second: in one lab, one mode's leftovers would stall the next.
    let (lab, pod) = node_port_lab(family)?;
    let mut results = vec![measure(
        &|args: &[&str]| Ok(lab.external("wrk").args(args).output()?),
        "direct to the pod (routed by node 1)",
        &host_port(family.address_of(&pod), BACKEND_PORT),
        options,
    )?];
    drop(lab);

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
    results.extend(node_ports(&lab, family, "eBPF", options)?);
    drop(agents);
    drop(lab);

    // Conntrack and the nat table exist only in this last pair.
    let (lab, pod) = node_port_lab(family)?;
    let restore = match family {
        Family::Ipv4 => "iptables-restore",
        Family::Ipv6 => "ip6tables-restore",
    };
    feed(
        lab.node(1),
        restore,
        &["-w"],
        &kube_proxy::node_ports(
            &host_port(family.address_of(&pod), BACKEND_PORT),
            LOCAL_NODE_PORT,
            CLUSTER_NODE_PORT,
        ),
    )?;
    results.extend(node_ports(&lab, family, "iptables", options)?);
    Ok(results)
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
    let pods = match family {
        Family::Ipv4 => "10.244.1.0/24".to_owned(),
        Family::Ipv6 => lab.node(1).pod_cidr6(),
    };
    lab.route_via_node(&pods, 1)?;
    Ok((lab, pod))
}

/// Both NodePorts of node 1's address of `family`, as `datapath` serves
/// them.
fn node_ports(
    lab: &TwoNodeLab,
    family: Family,
    datapath: &'static str,
    options: &BenchOptions,
) -> Result<[Measurement; 2]> {
    let wrk = |args: &[&str]| Ok(lab.external("wrk").args(args).output()?);
    let node: IpAddr = match family {
        Family::Ipv4 => lab.node_ip(1).into(),
        Family::Ipv6 => lab.node_ip6(1).into(),
    };
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
        measure(&wrk, local, &host_port(node, LOCAL_NODE_PORT), options)?,
        measure(&wrk, cluster, &host_port(node, CLUSTER_NODE_PORT), options)?,
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
