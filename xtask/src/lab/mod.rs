//! A node in network namespaces: pods with real servers, clients in a
//! cgroup of the lab's own, and the agent pinned under a bpffs directory of
//! the lab's own. Used by the privileged tests and the demo.
//!
//! ```text
//!   node netns ── br0 10.244.0.1/24 ──┬── veth ── pod netns 10.244.0.10 (nginx, dnsmasq)
//!   (clients run here, inside          ├── veth ── pod netns 10.244.0.11
//!    the lab's cgroup)                 └── ...
//! ```
//!
//! Nothing the lab makes is shared with the host or with another lab, and
//! [`Drop`] takes it all down again, even when a test panics. A lab whose
//! process was SIGKILLed is swept up by the next lab that starts.

use std::{
    fs,
    io::{self, Read as _},
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const PREFIX: &str = "plab";
const FIRST_POD_HOST: u8 = 10;
const BPFFS: &str = "/sys/fs/bpf";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A pod: a network namespace with one address on the lab's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    netns: String,
}

pub struct Lab {
    name: String,
    /// The third octet of the pods' 10.244.x.0/24.
    subnet: u8,
    node_netns: String,
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
    fn with_subnet(subnet: u8) -> Result<Self> {
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

    /// Adds a pod on the bridge; pods get 10.244.0.10, .11, ... in order.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        let index = u8::try_from(self.pods.len()).context("too many pods")?;
        let pod = Pod {
            name: name.to_owned(),
            ip: Ipv4Addr::new(10, 244, self.subnet, FIRST_POD_HOST + index),
            netns: format!("{}-{name}", self.name),
        };
        ip(&["netns", "add", &pod.netns])?;
        self.pods.push(pod.clone());
        let (node, ns) = (self.node_netns.as_str(), pod.netns.as_str());
        let veth = format!("veth{index}");
        ip(&[
            "-n", node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", node, "link", "set", &veth, "master", "br0", "up"])?;
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

    /// Runs nginx in the pod, answering every request on `port` with the
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
                 location / {{ default_type text/plain; return 200 \"{name}\\n\"; }}\n\
                 location = /peer {{ default_type text/plain; return 200 \"$remote_addr\\n\"; }}\n\
                 location = /held {{ default_type text/plain; keepalive_timeout 60s; return 200 \"{name}\\n\"; }}\n\
                 location = /big {{ default_type text/plain; alias {d}/big; }}\n\
               }}\n\
             }}\n",
            ip = pod.ip,
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
    /// name on UDP `port`.
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

    fn wait_listening(pod: &Pod, port: u16, proto: &str) -> Result<()> {
        let flag = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let out = Command::new("ip")
                .args(["netns", "exec", &pod.netns, "ss", flag])
                .arg(format!("sport = :{port}"))
                .output()?;
            if !out.stdout.is_empty() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "{} did not listen on {proto} port {port} within 10 s",
            pod.name
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
    pub fn python(&self, script: &str) -> Result<Output> {
        self.run_client("python3", &["-c", script])
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
        let child = command
            .args(flags)
            .env(
                "RUST_LOG",
                std::env::var("LAB_AGENT_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
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

/// Takes down what a lab made; every step is tried whatever failed before.
fn teardown(namespaces: &[String], cgroup: &Path, bpffs: &Path, dir: &Path) {
    for ns in namespaces {
        kill_netns_processes(ns);
    }
    if cgroup.exists() {
        let _ = fs::write(cgroup.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(10));
        }
        // rmdir detaches whatever is still attached to the cgroup.
        if let Err(e) = fs::remove_dir(cgroup) {
            eprintln!("lab: cannot remove cgroup {}: {e}", cgroup.display());
        }
    }
    // Unpinning the links detaches the programs; the maps go with the pins.
    if bpffs.exists()
        && let Err(e) = fs::remove_dir_all(bpffs)
    {
        eprintln!("lab: cannot remove {}: {e}", bpffs.display());
    }
    for ns in namespaces {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    let _ = fs::remove_dir_all(dir);
}

fn lab_name() -> String {
    format!(
        "{PREFIX}-{}-{}",
        std::process::id(),
        NEXT_LAB.fetch_add(1, Ordering::Relaxed)
    )
}

/// The size of nginx's `/big`: many full-size segments.
pub const BIG_BODY: usize = 256 * 1024;

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

fn kill_netns_processes(ns: &str) {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes what labs of processes that no longer exist left behind (a
/// SIGKILLed test run cannot run its destructors).
fn sweep_stale() {
    let stale = |name: &str| -> Option<String> {
        let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
        let pid = rest.split('-').next()?;
        let alive = Path::new("/proc").join(pid).exists();
        let lab: Vec<&str> = rest.splitn(3, '-').take(2).collect();
        (!alive && lab.len() == 2).then(|| format!("{PREFIX}-{}-{}", lab[0], lab[1]))
    };
    let mut labs = std::collections::BTreeMap::<String, Vec<String>>::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let ns = line.split_whitespace().next().unwrap_or_default();
            if let Some(lab) = stale(ns) {
                labs.entry(lab).or_default().push(ns.to_owned());
            }
        }
    }
    let mut dirs: Vec<PathBuf> = vec![Path::new(BPFFS).to_path_buf(), std::env::temp_dir()];
    if let Ok(root) = cgroup2_root() {
        dirs.push(root);
    }
    for dir in dirs {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Some(lab) = stale(&entry.file_name().to_string_lossy()) {
                labs.entry(lab).or_default();
            }
        }
    }
    for (lab, namespaces) in labs {
        let cgroup = cgroup2_root().map(|r| r.join(&lab)).unwrap_or_default();
        teardown(
            &namespaces,
            &cgroup,
            &Path::new(BPFFS).join(&lab),
            &std::env::temp_dir().join(&lab),
        );
    }
}

/// Mounts bpffs at /sys/fs/bpf before any agent starts. The agent mounts it
/// too when it is missing, but two agents of parallel labs that both found
/// it missing would mount it twice, and the second mount would hide the
/// first agent's pins.
fn ensure_bpffs() -> Result<()> {
    static CHECKED: Mutex<bool> = Mutex::new(false);
    let mut checked = CHECKED.lock().unwrap_or_else(PoisonError::into_inner);
    if *checked {
        return Ok(());
    }
    let mounted = fs::read_to_string("/proc/mounts")?.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if !mounted {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", BPFFS])
            .status()
            .context("cannot run mount")?;
        if !status.success() {
            bail!("cannot mount bpffs at {BPFFS}: {status}");
        }
    }
    *checked = true;
    Ok(())
}

/// The cgroup2 mount point, from /proc/mounts (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, so it is never assumed).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| PathBuf::from(f[1]))
        .context("no cgroup2 file system is mounted")
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A running agent. Dropping it SIGKILLs it: the pinned datapath stays, as
/// it would when a DaemonSet pod dies.
pub struct Agent {
    child: Child,
    log: PathBuf,
    binary: PathBuf,
    bpffs: PathBuf,
}

impl Agent {
    /// Everything the agent has logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Waits until the log contains `needle`, failing early if the agent
    /// exits.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent did not log {needle:?} within {timeout:?}; its log:\n{log}");
            }
            if !self.is_running() {
                bail!("the agent exited before logging {needle:?}; its log:\n{log}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in the agent's status")
    }

    /// How many files the agent has open now.
    pub fn open_files(&self) -> Result<usize> {
        Ok(fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    /// The agent's soft and hard limits of open files.
    pub fn open_file_limits(&self) -> Result<(u64, u64)> {
        let limits = fs::read_to_string(format!("/proc/{}/limits", self.pid()))?;
        let line = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .context("no open-file limit in the agent's limits")?;
        let mut values = line
            .trim_start_matches("Max open files")
            .split_whitespace()
            .map(str::parse);
        match (values.next(), values.next()) {
            (Some(Ok(soft)), Some(Ok(hard))) => Ok((soft, hard)),
            _ => bail!("cannot read {line:?}"),
        }
    }

    /// The CPU time the agent has used so far, user and system.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // The fields after the command's ")": state is field 3, utime 14
        // and stime 15, in clock ticks.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let ticks = |index: usize| -> Result<u64> {
            fields
                .get(index - 3)
                .and_then(|field| field.parse().ok())
                .context("cannot read the agent's CPU time")
        };
        // SAFETY: sysconf has no memory-safety preconditions.
        let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .unwrap_or(100)
            .max(1);
        let total = ticks(14)? + ticks(15)?;
        Ok(Duration::from_millis(total * 1000 / per_second))
    }

    #[must_use]
    pub fn is_running(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        let exists = unsafe { libc::kill(pid, 0) } == 0;
        // A zombie still "exists"; look at its state too.
        exists
            && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or_default()
                    .trim_start()
                    .starts_with('Z')
            })
    }

    /// SIGKILL, as an OOM kill or a node problem would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The address the agent serves `what` ("healthz" or "metrics") on,
    /// from its log.
    pub fn address(&self, what: &str) -> Result<String> {
        let needle = format!("{what} listening bound=");
        let log = self.log();
        log.split(&needle)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .with_context(|| format!("the agent logged no {needle:?}:\n{log}"))
    }

    /// One HTTP GET to the agent's `what` listener: status and body.
    pub fn http_get(&self, what: &str, path: &str) -> Result<(u16, String)> {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect(self.address(what)?)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP response: {response:?}"))?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// Runs `proxy-userspace services --output json` against the lab's pins.
    pub fn services_json(&self) -> Result<String> {
        self.query("services", &[])
    }

    /// `services --stats --output json`: with each slot's translations.
    pub fn services_stats_json(&self) -> Result<String> {
        self.query("services", &["--stats"])
    }

    /// Runs `proxy-userspace stats --output json` against the lab's pins.
    pub fn stats_json(&self) -> Result<String> {
        self.query("stats", &[])
    }

    fn query(&self, command: &str, flags: &[&str]) -> Result<String> {
        let out = Command::new(&self.binary)
            .arg(command)
            .args(flags)
            .args(["--output", "json", "--bpffs"])
            .arg(&self.bpffs)
            .output()?;
        if !out.status.success() {
            bail!("{command} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `command` with open-file limits `soft` and `hard`, as a
/// container runtime or systemd would start the agent.
pub fn limit_open_files(command: &mut Command, soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit is async-signal-safe and reads only `limit`, a copy
    // owned by the closure.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Raises this process's soft limit of open files to its hard limit, for
/// a test that holds thousands of connections; returns the new limit.
pub fn raise_open_file_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write `limit`, which outlives them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            bail!("getrlimit: {}", io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
            bail!("setrlimit: {}", io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// The agent binary the tests and the demo run: `$PROXY_AGENT`, or the
/// workspace's debug build.
#[must_use]
pub fn agent_binary() -> PathBuf {
    std::env::var_os("PROXY_AGENT").map_or_else(
        || crate::workspace_root().join("target/debug/proxy-userspace"),
        PathBuf::from,
    )
}

/// Manifest text for the lab, so tests read as what they set up.
pub mod manifests {
    use std::{fmt::Write as _, net::Ipv4Addr};

    /// A ClusterIP Service; `ports` are `(name, port, protocol)`.
    #[must_use]
    pub fn service(name: &str, cluster_ip: &str, ports: &[(&str, i64, &str)]) -> String {
        let mut yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
             spec:\n  clusterIP: {cluster_ip}\n  ports:\n"
        );
        for (port_name, port, protocol) in ports {
            let _ = writeln!(
                yaml,
                "  - name: {port_name:?}\n    port: {port}\n    protocol: {protocol}"
            );
        }
        yaml
    }

    /// An EndpointSlice of `service`; `endpoints` are `(address, ready)`.
    #[must_use]
    pub fn endpoint_slice(
        name: &str,
        service: &str,
        ports: &[(&str, u16, &str)],
        endpoints: &[(Ipv4Addr, bool)],
    ) -> String {
        let mut yaml = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\n\
             addressType: IPv4\nports:\n"
        );
        for (port_name, port, protocol) in ports {
            let _ = writeln!(
                yaml,
                "- name: {port_name:?}\n  port: {port}\n  protocol: {protocol}"
            );
        }
        yaml.push_str("endpoints:\n");
        for (address, ready) in endpoints {
            let _ = writeln!(
                yaml,
                "- addresses: [\"{address}\"]\n  conditions:\n    ready: {ready}"
            );
        }
        yaml
    }

    /// An EndpointSlice whose endpoints (all ready) name their node.
    #[must_use]
    pub fn endpoint_slice_on_nodes(
        name: &str,
        service: &str,
        ports: &[(&str, u16, &str)],
        endpoints: &[(Ipv4Addr, &str)],
    ) -> String {
        let mut yaml = endpoint_slice(name, service, ports, &[]);
        for (address, node) in endpoints {
            let _ = writeln!(
                yaml,
                "- addresses: [\"{address}\"]\n  nodeName: {node}\n  conditions:\n    ready: true"
            );
        }
        yaml
    }

    /// A Service of `type_` (NodePort, LoadBalancer) with one port and
    /// its nodePort, and `extra` spec lines (indented two spaces).
    #[must_use]
    pub fn node_port_service(
        name: &str,
        type_: &str,
        cluster_ip: &str,
        port: (i64, i64),
        extra: &str,
    ) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
             spec:\n  type: {type_}\n  clusterIP: {cluster_ip}\n{extra}  ports:\n  \
             - name: http\n    port: {}\n    nodePort: {}\n",
            port.0, port.1
        )
    }

    /// Documents joined into one multi-document file.
    #[must_use]
    pub fn documents(docs: &[String]) -> String {
        docs.join("---\n")
    }
}
