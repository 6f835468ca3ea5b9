//! Two nodes and an external client.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

use super::{Agent, Lab, ip, kill_netns_processes, lab_name};

/// The external segment's network: the client, then node `i` at `.10 + i`.
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
/// The far client, behind the external client (see
/// [`TwoNodeLab::add_far_client`]).
pub const FAR_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 2);

/// Two nodes and an external client, for traffic from outside the node:
///
/// ```text
///   external netns: br0 192.168.100.1 (the client) ──┬── eth0 192.168.100.11 node 1 (pods 10.244.1.0/24)
///                                                    └── eth0 192.168.100.12 node 2 (pods 10.244.2.0/24)
/// ```
///
/// Each node is a [`Lab`] of its own (pods, bridge, cgroup, bpffs, its own
/// agent) and forwards; each routes the other's pods through the other's
/// address on the shared segment.
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
            node.node_output("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
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

    /// Node `number`'s address on the external segment.
    #[must_use]
    pub fn node_ip(&self, number: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 100, 10 + number)
    }

    /// The external client's address.
    #[must_use]
    pub fn client_ip(&self) -> Ipv4Addr {
        EXTERNAL_CLIENT
    }

    /// A command run by the external client.
    #[must_use]
    pub fn external(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.external_netns, program]);
        cmd
    }

    /// Adds a client one router hop further out, at [`FAR_CLIENT`]: the
    /// external namespace forwards to it over a link of MTU `mtu` on the
    /// router's side (1500 on the client's, so the client still offers a
    /// full-size MSS), as a path through a tunnel is. Full-size packets
    /// towards it meet a "fragmentation needed" in the router.
    pub fn add_far_client(&mut self, mtu: u16) -> Result<Ipv4Addr> {
        let far = format!("{}-far", self.external_netns.trim_end_matches("-ext"));
        ip(&["netns", "add", &far])?;
        self.far_netns = Some(far.clone());
        let ext = self.external_netns.as_str();
        ip(&["-n", &far, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", ext, "link", "add", "far", "type", "veth", "peer", "name", "eth0", "netns", &far,
        ])?;
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
        let status = self
            .external("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
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

    /// Routes `cidr` from the external segment to node `number`, as a
    /// router announcing externalIPs, load-balancer IPs or the Service
    /// CIDR would.
    pub fn route_via_node(&self, cidr: &str, number: u8) -> Result<()> {
        ip(&[
            "-n",
            &self.external_netns,
            "route",
            "add",
            cidr,
            "via",
            &self.node_ip(number).to_string(),
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
