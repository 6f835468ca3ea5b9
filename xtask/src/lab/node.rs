//! The single-node lab.

use std::{
    fs, io,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Agent, BPFFS, cgroup2_root, enable_ipv6, ensure_bpffs, ip, lab_name, sweep_stale, teardown,
};

const FIRST_POD_HOST: u8 = 10;

/// A pod: a network namespace with an address of each family on the lab's
/// bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    netns: String,
}

pub struct Lab {
    name: String,
    /// The third octet of the pods' 10.244.x.0/24.
    subnet: u8,
    pub(super) node_netns: String,
    pods: Vec<Pod>,
    cgroup: PathBuf,
    /// Kept open so a client can move itself in between fork and exec.
    cgroup_procs: fs::File,
    bpffs: PathBuf,
    dir: PathBuf,
    servers: Vec<Child>,
}

impl Lab {
    /// Makes the node namespace, the lab's cgroup and its directories.
    pub fn new() -> Result<Self> {
        Self::with_subnet(0)
    }

    /// A node whose pods are in 10.244.`subnet`.0/24.
    pub(super) fn with_subnet(subnet: u8) -> Result<Self> {
        ensure_bpffs()?;
        sweep_stale();
        let name = lab_name();
        let cgroup = cgroup2_root()?.join(&name);
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
        let cgroup_procs = fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))?;
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(dir.join("manifests"))?;
        let node_netns = format!("{name}-node");
        // From here on Drop cleans up whatever was made.
        let lab = Self {
            bpffs: Path::new(BPFFS).join(&name),
            name,
            subnet,
            node_netns,
            pods: Vec::new(),
            cgroup,
            cgroup_procs,
            dir,
            servers: Vec::new(),
        };
        ip(&["netns", "add", &lab.node_netns])?;
        let node = lab.node_netns.as_str();
        enable_ipv6(node)?;
        ip(&["-n", node, "link", "set", "lo", "up"])?;
        ip(&["-n", node, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{}/24", lab.bridge_ip()),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{}/64", lab.bridge_ip6()),
            "dev",
            "br0",
            "nodad",
        ])?;
        ip(&["-n", node, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// The pods added so far, in order.
    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The node's address on its pods' bridge: the pods' gateway.
    #[must_use]
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, 1)
    }

    /// The node's IPv6 address on its pods' bridge:
    /// `fd00:10:244:<subnet>::1`, the pods' IPv6 gateway.
    #[must_use]
    pub fn bridge_ip6(&self) -> Ipv6Addr {
        self.pod_ip6(1)
    }

    /// The pods' IPv6 network, `fd00:10:244:<subnet>::/64`.
    #[must_use]
    pub fn pod_cidr6(&self) -> String {
        format!("{}/64", self.pod_ip6(0))
    }

    /// Host `host` of the pods' fd00:10:244:`subnet`::/64.
    fn pod_ip6(&self, host: u16) -> Ipv6Addr {
        let subnet = decimal_digits_as_hex(self.subnet);
        Ipv6Addr::new(0xfd00, 0x10, 0x244, subnet, 0, 0, 0, host)
    }

    /// Adds a pod on the bridge; pods get 10.244.0.10, .11, ... and
    /// fd00:10:244:0::10, ::11, ... in order (the IPv6 host part written
    /// as the IPv4 one is, in hexadecimal digits).
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        let index = u8::try_from(self.pods.len()).context("too many pods")?;
        let host = FIRST_POD_HOST + index;
        let pod = Pod {
            name: name.to_owned(),
            ip: Ipv4Addr::new(10, 244, self.subnet, host),
            ip6: self.pod_ip6(decimal_digits_as_hex(host)),
            netns: format!("{}-{name}", self.name),
        };
        ip(&["netns", "add", &pod.netns])?;
        self.pods.push(pod.clone());
        let (node, ns) = (self.node_netns.as_str(), pod.netns.as_str());
        enable_ipv6(ns)?;
        let veth = format!("veth{index}");
        ip(&[
            "-n", node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", node, "link", "set", &veth, "master", "br0", "up"])?;
        // As a bridge CNI with hairpinMode (kubelet's hairpin-veth): a pod
        // that reaches itself through its Service per packet gets its
        // packets back through its own port.
        ip(&[
            "-n",
            node,
            "link",
            "set",
            &veth,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", pod.ip),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/64", pod.ip6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &self.bridge_ip().to_string(),
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.bridge_ip6().to_string(),
        ])?;
        Ok(pod)
    }

    /// Adds a pod on a routed veth of its own, as Calico and Cilium wire
    /// pods: no bridge; the node routes the pod's /32 to the veth, and the
    /// pod reaches everything through a gateway, 169.254.1.1, that only its
    /// neighbour entry names (the node's end of the veth). IPv4 only: its
    /// `ip6` is unspecified. Addresses 10.244.(100 + subnet).10, .11, ...
    /// in the order pods of either kind are added.
    pub fn add_routed_pod(&mut self, name: &str) -> Result<Pod> {
        const GATEWAY: &str = "169.254.1.1";
        let index = u8::try_from(self.pods.len()).context("too many pods")?;
        let pod = Pod {
            name: name.to_owned(),
            ip: Ipv4Addr::new(10, 244, 100 + self.subnet, FIRST_POD_HOST + index),
            ip6: Ipv6Addr::UNSPECIFIED,
            netns: format!("{}-{name}", self.name),
        };
        ip(&["netns", "add", &pod.netns])?;
        self.pods.push(pod.clone());
        let (node, ns) = (self.node_netns.as_str(), pod.netns.as_str());
        let veth = format!("veth{index}");
        ip(&[
            "-n", node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", node, "link", "set", &veth, "up"])?;
        let address = format!("{}/32", pod.ip);
        ip(&["-n", node, "route", "add", &address, "dev", &veth])?;
        // The node's end's MAC, from ip: /sys is the host's here.
        let link = String::from_utf8(
            Command::new("ip")
                .args(["-n", node, "-o", "link", "show", &veth])
                .output()?
                .stdout,
        )?;
        let mac = link
            .split_whitespace()
            .skip_while(|word| *word != "link/ether")
            .nth(1)
            .context("the veth has no MAC address")?
            .to_owned();
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "addr", "add", &address, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "neigh",
            "add",
            GATEWAY,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        ip(&[
            "-n", ns, "route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink",
        ])?;
        Ok(pod)
    }

    /// Routes `cidr` from the node onto the bridge, as a node's default route
    /// would: iptables translates a Service address only after the kernel
    /// found a route for it, while the socket hooks need none.
    pub fn route_from_node(&self, cidr: &str) -> Result<()> {
        ip(&["-n", &self.node_netns, "route", "add", cidr, "dev", "br0"])
    }

    /// A new lab with an nginx pod of each name serving on `port` (see
    /// [`Lab::serve_http`]).
    pub fn with_web_pods(names: &[&str], port: u16) -> Result<(Self, Vec<Pod>)> {
        let mut lab = Self::new()?;
        let mut pods = Vec::new();
        for name in names {
            let pod = lab.add_pod(name)?;
            lab.serve_http(&pod, port)?;
            pods.push(pod);
        }
        Ok((lab, pods))
    }

    /// Runs nginx in the pod, answering every request on `port` of both its
    /// addresses with the
    /// pod's name (`/peer` with the client address it sees, `/big` with
    /// [`BIG_BODY`] bytes), and closing every connection so each request is
    /// a new connection (and a new load-balancing decision); except
    /// `/held`, which keeps its connection open for the next request.
    pub fn serve_http(&mut self, pod: &Pod, port: u16) -> Result<()> {
        let dir = self.dir.join(format!("nginx-{}-{port}", pod.name));
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("big"), vec![b'x'; BIG_BODY])?;
        let d = dir.display();
        let config = format!(
            "worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
               access_log off;\n\
               keepalive_timeout 0;\n\
               client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               server {{\n\
                 listen {ip}:{port} backlog=4096;\n\
                 listen [{ip6}]:{port} backlog=4096;\n\
                 location / {{ default_type text/plain; return 200 \"{name}\\n\"; }}\n\
                 location = /peer {{ default_type text/plain; return 200 \"$remote_addr\\n\"; }}\n\
                 location = /held {{ default_type text/plain; keepalive_timeout 60s; return 200 \"{name}\\n\"; }}\n\
                 location = /big {{ default_type text/plain; alias {d}/big; }}\n\
               }}\n\
             }}\n",
            ip = pod.ip,
            ip6 = pod.ip6,
            name = pod.name,
        );
        let config_path = dir.join("nginx.conf");
        fs::write(&config_path, config)?;
        let nginx = crate::prerequisites::which("nginx").context("nginx is not installed")?;
        let child = Self::in_pod(pod, &nginx.display().to_string())
            .arg("-c")
            .arg(&config_path)
            .args(["-p", &d.to_string(), "-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.servers.push(child);
        Self::wait_listening(pod, port, "tcp")
    }

    /// Runs dnsmasq in the pod, answering `whoami.lab TXT` with the pod's
    /// name on UDP `port` of both its addresses.
    pub fn serve_dns(&mut self, pod: &Pod, port: u16) -> Result<()> {
        let dnsmasq = crate::prerequisites::which("dnsmasq").context("dnsmasq is not installed")?;
        let child = Self::in_pod(pod, &dnsmasq.display().to_string())
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
            ])
            .args(["--bind-interfaces", "--user=root"])
            .arg(format!("--listen-address={}", pod.ip))
            .arg(format!("--listen-address={}", pod.ip6))
            .arg(format!("--port={port}"))
            .arg(format!("--txt-record=whoami.lab,{}", pod.name))
            .arg(format!(
                "--pid-file={}",
                self.dir.join(format!("dnsmasq-{}.pid", pod.name)).display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.servers.push(child);
        Self::wait_listening(pod, port, "udp")
    }

    fn in_pod(pod: &Pod, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.netns, program]);
        cmd
    }

    /// Waits until the pod listens on `port` of both its addresses.
    fn wait_listening(pod: &Pod, port: u16, proto: &str) -> Result<()> {
        let flag = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let out = Command::new("ip")
                .args(["netns", "exec", &pod.netns, "ss", flag])
                .arg(format!("sport = :{port}"))
                .output()?;
            if String::from_utf8_lossy(&out.stdout).lines().count() >= 2 {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} did not listen on {proto} port {port} of {} and {} within 10 s",
            pod.name,
            pod.ip,
            pod.ip6
        )
    }

    /// A command that runs in the node namespace inside the lab's cgroup,
    /// where the agent's programs are attached.
    #[must_use]
    pub fn client(&self, program: &str) -> Command {
        self.client_in(&self.node_netns, program)
    }

    /// A client run inside `pod`, in the lab's cgroup as a pod's processes
    /// are in the node's: a pod reaching a Service, itself perhaps.
    #[must_use]
    pub fn pod_client(&self, pod: &Pod, program: &str) -> Command {
        self.client_in(&pod.netns, program)
    }

    fn client_in(&self, netns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, program]);
        let procs = self.cgroup_procs.as_raw_fd();
        // SAFETY: only async-signal-safe calls between fork and exec. Writing
        // "0" to cgroup.procs moves the writing process itself.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        cmd
    }

    /// Runs a client to completion and returns its output; fails if it
    /// could not be started.
    pub fn run_client(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.client(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {program}"))
    }

    /// Runs Python in the lab's client cgroup: the tests' probe for what an
    /// application sees (getpeername, errno and timing of connect).
    /// `args` are the script's `sys.argv[1:]`.
    pub fn python(&self, script: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-c", script];
        all.extend(args);
        self.run_client("python3", &all)
    }

    /// Writes a manifest file atomically, so the agent never reads half.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let path = self.manifests_dir().join(file);
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        fs::remove_file(self.manifests_dir().join(file))?;
        Ok(())
    }

    #[must_use]
    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    #[must_use]
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Removes the lab's cgroup, as a container runtime may: what was
    /// attached to it is gone with it. See [`Lab::make_cgroup_again`].
    pub fn remove_cgroup(&self) -> Result<()> {
        // rmdir needs an empty cgroup; clients of the lab end on their own.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !fs::read_to_string(self.cgroup.join("cgroup.procs"))?
            .trim()
            .is_empty()
        {
            if Instant::now() > deadline {
                bail!("{} still has processes", self.cgroup.display());
            }
            thread::sleep(Duration::from_millis(10));
        }
        fs::remove_dir(&self.cgroup)
            .with_context(|| format!("cannot remove cgroup {}", self.cgroup.display()))
    }

    /// Makes the removed cgroup again under the same path: a new cgroup,
    /// where clients run from now on.
    pub fn make_cgroup_again(&mut self) -> Result<()> {
        fs::create_dir(&self.cgroup)
            .with_context(|| format!("cannot create cgroup {}", self.cgroup.display()))?;
        self.cgroup_procs = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))?;
        Ok(())
    }

    /// `proxy-userspace run` with this lab's manifests, cgroup and pins.
    #[must_use]
    pub fn agent_command(&self, binary: &Path) -> Command {
        let mut cmd = self.agent_command_without_source(binary);
        cmd.arg("--manifests").arg(self.manifests_dir());
        cmd
    }

    /// [`Lab::agent_command`] with no source: add `--kubeconfig` and the
    /// node's name for the Kubernetes source.
    #[must_use]
    pub fn agent_command_without_source(&self, binary: &Path) -> Command {
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs")
            .arg(&self.bpffs)
            // Labs run side by side on the host: each agent takes free
            // ports, found again in its log.
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .args(["--metrics-bind-address", "127.0.0.1:0"])
            // This agent runs in the host's network namespace: it must not
            // write the host's iptables nor attach to the host's devices
            // (start_agent_in_node's may).
            .arg("--install-iptables-rules=false")
            .args(["--devices", "none"]);
        cmd
    }

    /// Starts the agent on this lab and waits until its datapath is ready.
    pub fn start_agent(&self, binary: &Path) -> Result<Agent> {
        self.start_agent_with(binary, &[])
    }

    /// [`Lab::start_agent`] with more `run` flags.
    pub fn start_agent_with(&self, binary: &Path, flags: &[&str]) -> Result<Agent> {
        self.start_agent_command(self.agent_command(binary), binary, flags)
    }

    /// Starts the agent on the Kubernetes source, against the API server
    /// that `kubeconfig` names, as Node `node`.
    pub fn start_agent_on_api(
        &self,
        binary: &Path,
        kubeconfig: &Path,
        node: &str,
    ) -> Result<Agent> {
        self.start_agent_on_api_with(binary, kubeconfig, node, &[])
    }

    /// [`Lab::start_agent_on_api`] with more `run` flags.
    pub fn start_agent_on_api_with(
        &self,
        binary: &Path,
        kubeconfig: &Path,
        node: &str,
        flags: &[&str],
    ) -> Result<Agent> {
        let kubeconfig = kubeconfig.display().to_string();
        let mut all = vec!["--kubeconfig", &kubeconfig, "--hostname-override", node];
        all.extend(flags);
        self.start_agent_command(self.agent_command_without_source(binary), binary, &all)
    }

    /// A command run in the node namespace, outside the lab's cgroup: what
    /// a process of the node itself (the agent, iptables) sees. nsenter,
    /// not `ip netns exec`: that remounts /sys, which would hide bpffs and
    /// the cgroup2 tree from the agent.
    #[must_use]
    pub fn in_node(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.node_netns))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs a command in the node namespace and returns its stdout; fails
    /// when it fails.
    pub fn node_output(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .in_node(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the agent inside the node namespace, as a DaemonSet pod with
    /// hostNetwork runs on a node: its iptables rules, interfaces and
    /// healthCheckNodePorts are the node's.
    pub fn start_agent_in_node(&self, binary: &Path, flags: &[&str]) -> Result<Agent> {
        self.start_agent_in_node_on(binary, &self.bpffs, flags)
    }

    /// [`Lab::start_agent_in_node`] with pins of its own under `bpffs`: a
    /// second agent of the same node, beside the lab's. Its pins are the
    /// caller's to remove.
    pub fn start_agent_in_node_on(
        &self,
        binary: &Path,
        bpffs: &Path,
        flags: &[&str],
    ) -> Result<Agent> {
        let mut command = self.agent_in_node_command_on(binary, bpffs);
        command.arg("--manifests").arg(self.manifests_dir());
        self.start_agent_command_on(command, binary, bpffs, flags)
    }

    /// [`Lab::start_agent_in_node`]'s command with no source: add
    /// `--kubeconfig` and the node's name for the Kubernetes source (whose
    /// API server must then listen in the node namespace, see
    /// [`Lab::in_node_netns`]).
    #[must_use]
    pub fn agent_in_node_command(&self, binary: &Path) -> Command {
        self.agent_in_node_command_on(binary, &self.bpffs)
    }

    fn agent_in_node_command_on(&self, binary: &Path, bpffs: &Path) -> Command {
        let mut command = self.in_node(binary);
        command
            .arg("run")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs")
            .arg(bpffs)
            .args(["--healthz-bind-address", "127.0.0.1:0"])
            .args(["--metrics-bind-address", "127.0.0.1:0"]);
        command
    }

    /// Runs `f` on a thread of its own inside the node namespace: sockets it
    /// makes (a test API server's listener, a client's connection) are the
    /// node's, and the test's own threads stay in the host's namespace.
    pub fn in_node_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = Path::new("/run/netns").join(&self.node_netns);
        let netns =
            fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a valid descriptor changes only this
                    // thread's network namespace; the thread ends with `f`.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!(
                            "cannot enter {}: {}",
                            path.display(),
                            io::Error::last_os_error()
                        );
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts the agent with `command` (one of the `agent_*command`s, with
    /// whatever the test adds to it) and `flags`, and waits until its
    /// datapath is ready.
    pub fn start_agent_command(
        &self,
        command: Command,
        binary: &Path,
        flags: &[&str],
    ) -> Result<Agent> {
        self.start_agent_command_on(command, binary, &self.bpffs, flags)
    }

    fn start_agent_command_on(
        &self,
        mut command: Command,
        binary: &Path,
        bpffs: &Path,
        flags: &[&str],
    ) -> Result<Agent> {
        let run = fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("agent-"))
            .count();
        let log = self.dir.join(format!("agent-{run}.log"));
        // The agent's own default level unless a run asks for another
        // (RUST_LOG would override its -v).
        if let Ok(level) = std::env::var("LAB_AGENT_LOG") {
            command.env("RUST_LOG", level);
        } else {
            command.env_remove("RUST_LOG");
        }
        let child = command
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start the agent {}", binary.display()))?;
        let agent = Agent {
            child,
            log,
            binary: binary.to_owned(),
            bpffs: bpffs.to_owned(),
        };
        agent.wait_for_log("datapath ready", Duration::from_secs(20))?;
        Ok(agent)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let namespaces: Vec<String> = self
            .pods
            .iter()
            .map(|p| p.netns.clone())
            .chain([self.node_netns.clone()])
            .collect();
        teardown(&namespaces, &self.cgroup, &self.bpffs, &self.dir);
    }
}

/// `n` written in decimal and read as hexadecimal: the IPv6 lab addresses
/// repeat the IPv4 ones' digits (10.244.1.12 and fd00:10:244:1::12), so
/// they read alike.
pub(super) fn decimal_digits_as_hex(n: u8) -> u16 {
    let n = u16::from(n);
    n / 100 * 0x100 + n / 10 % 10 * 0x10 + n % 10
}

/// The size of nginx's `/big`: many full-size segments.
pub const BIG_BODY: usize = 256 * 1024;
