//! The rules kube-proxy writes, for the bench to load instead of the
//! agent: its iptables mode (KUBE-SERVICES → KUBE-SVC-* with statistic
//! random → KUBE-SEP-* DNAT) and its nftables mode (KEP-3866: the
//! `service-ips` verdict map, numgen random), for N Services over the same
//! pods; and the update each mode writes when one endpoint of one Service
//! changes; and its NodePort rules in each mode.
//!
//! kube-proxy writes the same rules for each family, in its own table:
//! ip6tables' nat table, and `table ip6 kube-proxy` beside `table ip
//! kube-proxy`; only the address syntax differs ([`Family`]).

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use super::{BACKEND_PORT, Family, service_ip};

/// `endpoint`'s backend port as iptables' DNAT and nft's `dnat to` write
/// it (an IPv6 address in brackets).
fn backend(endpoint: IpAddr) -> SocketAddr {
    SocketAddr::new(endpoint, BACKEND_PORT)
}

/// The nat table of kube-proxy's iptables mode for these Services in
/// `family`, for `iptables-restore` or `ip6tables-restore`.
pub fn iptables(
    family: Family,
    services: usize,
    endpoints_of: impl Fn(usize) -> Vec<IpAddr>,
) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    iptables_services(family, services, endpoints_of, &mut chains, &mut rules);
    chains + &rules + "COMMIT\n"
}

/// Each Service's KUBE-SERVICES rule, KUBE-SVC chain and KUBE-SEP chains.
fn iptables_services(
    family: Family,
    services: usize,
    endpoints_of: impl Fn(usize) -> Vec<IpAddr>,
    chains: &mut String,
    rules: &mut String,
) {
    for i in 0..services {
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/{} -p tcp -m comment --comment \"default/svc-{i}:http cluster IP\" \
             -m tcp --dport 80 -j KUBE-SVC-{i}",
            service_ip(family, i, services),
            family.host_prefix()
        );
        iptables_service(i, &endpoints_of(i), chains, rules);
    }
}

/// What kube-proxy restores (`iptables-restore --noflush`) when the
/// endpoints of Service `index` become `endpoints`: only that Service's
/// chains (KEP-3453, minimizing iptables-restore input). Declaring a chain
/// flushes it.
pub fn iptables_endpoint_change(index: usize, endpoints: &[IpAddr]) -> String {
    let mut chains = String::from("*nat\n");
    let mut rules = String::new();
    iptables_service(index, endpoints, &mut chains, &mut rules);
    chains + &rules + "COMMIT\n"
}

/// Service `i`'s KUBE-SVC chain and its KUBE-SEP chains.
fn iptables_service(i: usize, endpoints: &[IpAddr], chains: &mut String, rules: &mut String) {
    let _ = writeln!(chains, ":KUBE-SVC-{i} - [0:0]");
    for (p, endpoint) in endpoints.iter().enumerate() {
        let _ = writeln!(chains, ":KUBE-SEP-{i}-{p} - [0:0]");
        // kube-proxy's equal split: 1/n, then 1/(n-1), ..., then the rest.
        let remaining = endpoints.len() - p;
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
            "-A KUBE-SEP-{i}-{p} -p tcp -m tcp -j DNAT --to-destination {}",
            backend(*endpoint)
        );
    }
}

/// kube-proxy's nftables mode for these Services in `family`, for `nft
/// -f`: one `service-ips` verdict map from address, protocol and port to
/// each Service's chain, which picks an endpoint chain with `numgen
/// random`, which DNATs.
pub fn nftables(
    family: Family,
    services: usize,
    endpoints_of: impl Fn(usize) -> Vec<IpAddr>,
) -> String {
    let table = format!("{} kube-proxy", family.nft_family());
    let mut chains = format!(
        "add table {table}\n\
         add chain {table} nat-output {{ type nat hook output priority -100 ; policy accept ; }}\n\
         add chain {table} nat-prerouting {{ type nat hook prerouting priority -100 ; policy accept ; }}\n\
         add chain {table} services\n\
         add map {table} service-ips {{ type {} . inet_proto . inet_service : verdict ; }}\n",
        family.nft_address_type()
    );
    let mut rules = format!(
        "add rule {table} nat-output jump services\n\
         add rule {table} nat-prerouting jump services\n\
         add rule {table} services {} daddr . meta l4proto . th dport vmap @service-ips\n",
        family.nft_family()
    );
    let mut elements = String::new();
    for i in 0..services {
        let _ = writeln!(chains, "add chain {table} service-{i}");
        let mut arms = Vec::new();
        let endpoints = endpoints_of(i);
        for (p, endpoint) in endpoints.iter().enumerate() {
            let _ = writeln!(chains, "add chain {table} endpoint-{i}-{p}");
            let _ = writeln!(rules, "{}", nftables_endpoint_rule(family, i, p, *endpoint));
            arms.push(format!("{p} : goto endpoint-{i}-{p}"));
        }
        let _ = writeln!(
            rules,
            "add rule {table} service-{i} numgen random mod {} vmap {{ {} }}",
            endpoints.len(),
            arms.join(" , ")
        );
        let _ = writeln!(
            elements,
            "add element {table} service-ips {{ {} . tcp . 80 : goto service-{i} }}",
            service_ip(family, i, services)
        );
    }
    chains + &rules + &elements
}

/// The transaction that points endpoint `slot` of Service `index` at
/// `endpoint`: one chain flushed and given its new DNAT.
pub fn nftables_endpoint_change(
    family: Family,
    index: usize,
    slot: usize,
    endpoint: IpAddr,
) -> String {
    format!(
        "flush chain {} kube-proxy endpoint-{index}-{slot}\n{}\n",
        family.nft_family(),
        nftables_endpoint_rule(family, index, slot, endpoint)
    )
}

fn nftables_endpoint_rule(family: Family, index: usize, slot: usize, endpoint: IpAddr) -> String {
    format!(
        "add rule {} kube-proxy endpoint-{index}-{slot} meta l4proto tcp dnat to {}",
        family.nft_family(),
        backend(endpoint)
    )
}

/// kube-proxy's nat rules for the two NodePorts: KUBE-NODEPORTS behind the
/// LOCAL address-type match, KUBE-EXT-* marking policy Cluster for the
/// masquerade, and KUBE-POSTROUTING doing it; `pod` is the backend's
/// address, and the same rules serve ip6tables-restore. `services` filler
/// Services over the same pod come first in KUBE-SERVICES, as a cluster's
/// ClusterIPs do: kube-proxy's NodePort jump is its last rule, so a
/// NodePort packet is matched against every ClusterIP rule first.
pub fn node_ports(
    family: Family,
    services: usize,
    pod: IpAddr,
    local: u16,
    cluster: u16,
) -> String {
    let mut filler_chains = String::new();
    let mut filler_rules = String::new();
    iptables_services(
        family,
        services,
        |_| vec![pod],
        &mut filler_chains,
        &mut filler_rules,
    );
    let pod = backend(pod);
    format!(
        "*nat\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n:KUBE-EXT-CLUSTER - [0:0]\n:KUBE-SEP-POD - [0:0]\n\
         {filler_chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         {filler_rules}\
         -A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-NODEPORTS -p tcp -m tcp --dport {local} -j KUBE-SEP-POD\n\
         -A KUBE-NODEPORTS -p tcp -m tcp --dport {cluster} -j KUBE-EXT-CLUSTER\n\
         -A KUBE-EXT-CLUSTER -j KUBE-MARK-MASQ\n\
         -A KUBE-EXT-CLUSTER -j KUBE-SEP-POD\n\
         -A KUBE-SEP-POD -p tcp -m tcp -j DNAT --to-destination {pod}\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n\
         COMMIT\n"
    )
}

/// kube-proxy's nftables mode for the two NodePorts, after `services`
/// filler Services over the same pod: the `services` chain's last rule
/// looks the node's own addresses up in the `service-nodeports` verdict
/// map, whose policy Cluster arm marks for the masquerade that
/// `masquerading` does in postrouting; `pod` is the backend's address.
pub fn nftables_node_ports(
    family: Family,
    services: usize,
    pod: IpAddr,
    local: u16,
    cluster: u16,
) -> String {
    let table = format!("{} kube-proxy", family.nft_family());
    let nft_family = family.nft_family();
    let loopback = match family {
        Family::Ipv4 => "127.0.0.0/8",
        Family::Ipv6 => "::1",
    };
    format!(
        "{fillers}\
         add chain {table} nat-postrouting {{ type nat hook postrouting priority 100 ; policy accept ; }}\n\
         add chain {table} masquerading\n\
         add chain {table} mark-for-masquerade\n\
         add chain {table} nodeport-pod\n\
         add chain {table} external-cluster\n\
         add map {table} service-nodeports {{ type inet_proto . inet_service : verdict ; }}\n\
         add rule {table} nat-postrouting jump masquerading\n\
         add rule {table} masquerading mark and 0x4000 == 0 return\n\
         add rule {table} masquerading mark set mark xor 0x4000\n\
         add rule {table} masquerading masquerade fully-random\n\
         add rule {table} mark-for-masquerade mark set mark or 0x4000\n\
         add rule {table} nodeport-pod meta l4proto tcp dnat to {pod}\n\
         add rule {table} external-cluster jump mark-for-masquerade\n\
         add rule {table} external-cluster goto nodeport-pod\n\
         add rule {table} services fib daddr type local {nft_family} daddr != {loopback} \
         meta l4proto . th dport vmap @service-nodeports\n\
         add element {table} service-nodeports {{ tcp . {local} : goto nodeport-pod , \
         tcp . {cluster} : goto external-cluster }}\n",
        fillers = nftables(family, services, |_| vec![pod]),
        pod = backend(pod),
    )
}
