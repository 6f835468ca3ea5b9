//! Two nodes and an external client.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

use super::{
    Agent, Lab, Pod, enable_ipv6, ip, kill_netns_processes, lab_name, node::decimal_digits_as_hex,
};

/// The flags of a dual-stack cluster, beside those of
/// [`TwoNodeLab::start_agent`]: a Service CIDR and a cluster CIDR of each
/// family, and NodePorts on the external segment's IPv6 addresses too
/// (`start_agent` names only the IPv4 segment, and a family with no CIDR
/// there serves no NodePort).
pub const DUAL_STACK_FLAGS: &[&str] = &[
    "--service-cidr",
    "10.96.0.0/12,fd10:96::/112",
    "--cluster-cidr",
    "10.244.0.0/16,fd00:10:244::/56",
    "--nodeport-addresses",
    EXTERNAL_SEGMENT6,
];

/// The external segment's IPv6 network, for `--nodeport-addresses`.
pub const EXTERNAL_SEGMENT6: &str = "fd00:192:168:100::/64";

/// The external segment's network: the client, then node `i` at `.10 + i`.
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
/// The external segment's IPv6 network: the client, then node `i` at
/// `::1i`.
const EXTERNAL_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, 1);
/// The far client, behind the external client (see
/// [`TwoNodeLab::add_far_client`]).
pub const FAR_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 2);
/// The far client's IPv6 address.
pub const FAR_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x101, 0, 0, 0, 2);
/// The far link's IPv6 network, the router (the external client) at `::1`.
const FAR_ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x101, 0, 0, 0, 1);
/// The smallest MTU of an IPv6 link: below it the kernel takes IPv6 off it.
const IPV6_MIN_MTU: u16 = 1280;

/// Two nodes and an external client, for traffic from outside the node:
///
/// ```text
///   external netns: br0 192.168.100.1 (the client) ──┬── eth0 192.168.100.11 node 1 (pods 10.244.1.0/24)
///                       fd00:192:168:100::1          │      fd00:192:168:100::11    (fd00:10:244:1::/64)
///                                                    └── eth0 192.168.100.12 node 2 (pods 10.244.2.0/24)
///                                                           fd00:192:168:100::12    (fd00:10:244:2::/64)
/// ```
///
/// Each node is a [`Lab`] of its own (pods, bridge, cgroup, bpffs, its own
/// agent) and forwards both families; each routes the other's pods through
/// the other's address of that family on the shared segment.
pub struct TwoNodeLab {
    nodes: [Lab; 2],
    external_netns: String,
    /// The far client's namespace, once [`TwoNodeLab::add_far_client`]
    /// made it.
    far_netns: Option<String>,
}

impl TwoNodeLab {
    pub fn new() -> Result<Self> {
        let nodes = [Lab::with_subnet(1)?, Lab::with_subnet(2)?];
        let external_netns = format!("{}-ext", lab_name());
        // From here on Drop cleans up whatever was made.
        let lab = Self {
            nodes,
            external_netns,
            far_netns: None,
        };
        let ext = lab.external_netns.as_str();
        ip(&["netns", "add", ext])?;
        enable_ipv6(ext)?;
        ip(&["-n", ext, "link", "set", "lo", "up"])?;
        ip(&["-n", ext, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            ext,
            "addr",
            "add",
            &format!("{EXTERNAL_CLIENT}/24"),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            ext,
            "addr",
            "add",
            &format!("{EXTERNAL_CLIENT6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        ip(&["-n", ext, "link", "set", "br0", "up"])?;
        for (index, node) in lab.nodes.iter().enumerate() {
            let number = u8::try_from(index + 1).unwrap_or(u8::MAX);
            let veth = format!("node{number}");
            let ns = node.node_netns.as_str();
            ip(&[
                "-n", ext, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ])?;
            ip(&["-n", ext, "link", "set", &veth, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", lab.node_ip(number)),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/64", lab.node_ip6(number)),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            let other = 3 - number;
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                &format!("10.244.{other}.0/24"),
                "via",
                &lab.node_ip(other).to_string(),
            ])?;
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                &lab.node(other).pod_cidr6(),
                "via",
                &lab.node_ip6(other).to_string(),
            ])?;
            node.node_output(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )?;
        }
        Ok(lab)
    }

    /// Node 1 or 2.
    #[must_use]
    pub fn node(&self, number: u8) -> &Lab {
        &self.nodes[usize::from(number) - 1]
    }

    /// Node 1 or 2, to add pods to.
    pub fn node_mut(&mut self, number: u8) -> &mut Lab {
        &mut self.nodes[usize::from(number) - 1]
    }

    /// A pod `name` on node `number` whose nginx answers HTTP on 8080 with
    /// its name.
    pub fn add_web_pod(&mut self, number: u8, name: &str) -> Result<Pod> {
        let node = self.node_mut(number);
        let pod = node.add_pod(name)?;
        node.serve_http(&pod, 8080)?;
        Ok(pod)
    }

    /// Node `number`'s address on the external segment.
    #[must_use]
    pub fn node_ip(&self, number: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 100, 10 + number)
    }

    /// Node `number`'s IPv6 address on the external segment:
    /// `fd00:192:168:100::1<number>`.
    #[must_use]
    pub fn node_ip6(&self, number: u8) -> Ipv6Addr {
        let host = decimal_digits_as_hex(10 + number);
        Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x100, 0, 0, 0, host)
    }

    /// The external client's address.
    #[must_use]
    pub fn client_ip(&self) -> Ipv4Addr {
        EXTERNAL_CLIENT
    }

    /// The external client's IPv6 address.
    #[must_use]
    pub fn client_ip6(&self) -> Ipv6Addr {
        EXTERNAL_CLIENT6
    }

    /// A command run by the external client.
    #[must_use]
    pub fn external(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.external_netns, program]);
        cmd
    }

    /// Adds a client one router hop further out, at [`FAR_CLIENT`] and
    /// [`FAR_CLIENT6`]: the external namespace forwards to it over a link
    /// of MTU `mtu` on the router's side (1500 on the client's, so the
    /// client still offers a full-size MSS), as a path through a tunnel
    /// is. Full-size packets towards it meet a "fragmentation needed" in
    /// the router, or for IPv6 (whose routers never fragment) a "packet too
    /// big". An IPv6 link cannot be narrower than 1280 bytes: below that
    /// the far client has no IPv6 address.
    pub fn add_far_client(&mut self, mtu: u16) -> Result<Ipv4Addr> {
        let far = format!("{}-far", self.external_netns.trim_end_matches("-ext"));
        ip(&["netns", "add", &far])?;
        self.far_netns = Some(far.clone());
        enable_ipv6(&far)?;
        let ext = self.external_netns.as_str();
        ip(&["-n", &far, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", ext, "link", "add", "far", "type", "veth", "peer", "name", "eth0", "netns", &far,
        ])?;
        let with_ipv6 = mtu >= IPV6_MIN_MTU;
        let mtu = mtu.to_string();
        ip(&["-n", ext, "link", "set", "far", "mtu", &mtu])?;
        ip(&["-n", ext, "addr", "add", "192.168.101.1/24", "dev", "far"])?;
        ip(&["-n", ext, "link", "set", "far", "up"])?;
        ip(&[
            "-n",
            &far,
            "addr",
            "add",
            &format!("{FAR_CLIENT}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &far, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &far,
            "route",
            "add",
            "default",
            "via",
            "192.168.101.1",
        ])?;
        if with_ipv6 {
            self.add_far_client_ipv6(&far)?;
        }
        let status = self
            .external("sysctl")
            .args([
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ])
            .status()?;
        if !status.success() {
            bail!("cannot turn forwarding on in {ext}");
        }
        for node in &self.nodes {
            ip(&[
                "-n",
                &node.node_netns,
                "route",
                "add",
                "192.168.101.0/24",
                "via",
                &EXTERNAL_CLIENT.to_string(),
            ])?;
        }
        Ok(FAR_CLIENT)
    }

    /// The far link's IPv6 addresses and routes: the far client's default
    /// route via the router, and each node's route back through it.
    fn add_far_client_ipv6(&self, far: &str) -> Result<()> {
        let ext = self.external_netns.as_str();
        ip(&[
            "-n",
            ext,
            "addr",
            "add",
            &format!("{FAR_ROUTER6}/64"),
            "dev",
            "far",
            "nodad",
        ])?;
        ip(&[
            "-n",
            far,
            "addr",
            "add",
            &format!("{FAR_CLIENT6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n",
            far,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &FAR_ROUTER6.to_string(),
        ])?;
        for node in &self.nodes {
            ip(&[
                "-n",
                &node.node_netns,
                "route",
                "add",
                "fd00:192:168:101::/64",
                "via",
                &EXTERNAL_CLIENT6.to_string(),
            ])?;
        }
        Ok(())
    }

    /// Routes `cidr` (of either family) from the external segment to node
    /// `number`, as a router announcing externalIPs, load-balancer IPs or
    /// the Service CIDR would.
    pub fn route_via_node(&self, cidr: &str, number: u8) -> Result<()> {
        let via = if cidr.contains(':') {
            self.node_ip6(number).to_string()
        } else {
            self.node_ip(number).to_string()
        };
        ip(&[
            "-n",
            &self.external_netns,
            "route",
            "add",
            cidr,
            "via",
            &via,
        ])
    }

    /// A command run by the far client.
    ///
    /// # Panics
    /// Before [`TwoNodeLab::add_far_client`].
    #[must_use]
    pub fn far(&self, program: &str) -> Command {
        let far = self.far_netns.as_deref().expect("add_far_client first");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", far, program]);
        cmd
    }

    /// Starts an agent in each node's namespace, as `node-1` and `node-2`,
    /// serving NodePorts on the shared segment's addresses, with `flags`.
    pub fn start_agents(&self, binary: &Path, flags: &[&str]) -> Result<Vec<Agent>> {
        [1, 2]
            .into_iter()
            .map(|number| self.start_agent(number, binary, flags))
            .collect()
    }

    /// Starts node `number`'s agent as [`TwoNodeLab::start_agents`] does.
    pub fn start_agent(&self, number: u8, binary: &Path, flags: &[&str]) -> Result<Agent> {
        let name = format!("node-{number}");
        let mut all = vec![
            "--hostname-override",
            &name,
            "--nodeport-addresses",
            "192.168.100.0/24",
        ];
        all.extend(flags);
        self.node(number).start_agent_in_node(binary, &all)
    }

    /// Writes the same manifest into both nodes' directories, as both
    /// agents watch the same API server.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        for node in &self.nodes {
            node.write_manifest(file, yaml)?;
        }
        Ok(())
    }
}

impl Drop for TwoNodeLab {
    fn drop(&mut self) {
        for ns in std::iter::once(&self.external_netns).chain(&self.far_netns) {
            kill_netns_processes(ns);
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        // The nodes tear themselves down after this.
    }
}
