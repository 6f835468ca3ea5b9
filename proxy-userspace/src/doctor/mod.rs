//! `proxy-userspace doctor`: the troubleshooting checklist of a Service
//! proxy as one command. Each check says OK, WARN or FAIL, with one line
//! of evidence and, for a problem, the command that fixes it.
//!
//! The output has a fixed order of checks and no timestamps, so the JSON
//! of two nodes diffs cleanly; the exit status is 1 on any FAIL, so it can
//! serve as a probe or a cron job. Everything is read, nothing is changed:
//! the maps through the same readers as `services` and `stats`, the
//! desired state through the agent's own source and model.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use aya_obj::generated::bpf_attach_type;
use clap::Args;
use serde::Serialize;

use crate::{
    bpf_sys,
    config::PinDir,
    datapath::{self, Pins},
    listing::{self, ListedService},
    report::chain,
};

pub mod snapshot;

use snapshot::{Built, Snapshot, SourceArgs};

/// The kernel where sock_addr hooks may set the errno that refusing a
/// Service without endpoints needs.
const KERNEL_FOR_REFUSAL: (u32, u32) = (6, 1);
/// Below this there are no bpf_links for cgroups at all.
const KERNEL_MINIMUM: (u32, u32) = (5, 7);
/// A map this full warns; a full one fails.
const FILL_WARN_PERCENT: u64 = 90;

/// `proxy-userspace doctor`.
#[derive(Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub pins: PinDir,
    /// The cgroup the programs should be attached to (the agent's --cgroup).
    /// Default: the cgroup2 root.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Where the agent serves /healthz (its --healthz-bind-address).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:10256")]
    pub healthz_address: SocketAddr,
    /// The mark bit the agent masquerades (its --iptables-masquerade-bit).
    #[arg(long, value_name = "0-31", default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..32))]
    pub iptables_masquerade_bit: u8,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Status {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "FAIL")]
    Fail,
}

impl Status {
    const fn label(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        }
    }
}

/// One check's verdict.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub evidence: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The items behind the evidence (frontends that differ, chains
    /// found), sorted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl Check {
    fn ok(name: &'static str, evidence: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            evidence: evidence.into(),
            fix: None,
            details: Vec::new(),
        }
    }

    fn problem(
        name: &'static str,
        status: Status,
        evidence: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name,
            status,
            evidence: evidence.into(),
            fix: Some(fix.into()),
            details: Vec::new(),
        }
    }

    fn with_details(mut self, mut details: Vec<String>) -> Self {
        details.sort();
        self.details = details;
        self
    }
}

/// Every check, in their fixed order.
#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    #[must_use]
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// One line per check, its details and fix indented below it.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = String::new();
        for check in &self.checks {
            let _ = writeln!(
                out,
                "{:<5} {:<13} {}",
                check.status.label(),
                check.name,
                check.evidence
            );
            for detail in &check.details {
                let _ = writeln!(out, "{:20}{detail}", "");
            }
            if let Some(fix) = &check.fix {
                let _ = writeln!(out, "{:20}fix: {fix}", "");
            }
        }
        out
    }
}

/// What the checks share: the node's facts, read once.
struct Context<'a> {
    args: &'a DoctorArgs,
    pins: Pins,
    holder: Option<u32>,
    /// How to start or restart the agent here.
    restart: String,
}

/// Runs every check.
pub async fn run(args: &DoctorArgs) -> Report {
    let pins = args.pins.pins();
    let holder = pins.holder();
    let restart = match holder {
        Some(pid) => format!(
            "restart the agent (pid {pid}): `kubectl -n kube-system delete pod` of the ebpf-proxy pod on this node, or `kill {pid}` and start `proxy-userspace run` again"
        ),
        None => format!(
            "start the agent: `proxy-userspace run --bpffs {}` (or check the ebpf-proxy DaemonSet pod on this node)",
            pins.root().display()
        ),
    };
    let cx = Context {
        args,
        pins,
        holder,
        restart,
    };
    let (source_check, snapshot) = source(&cx).await;
    let mut checks = vec![
        agent(&cx),
        sync(&cx),
        source_check,
        kernel(&cx),
        programs(&cx),
        masquerade(&cx),
    ];
    checks.push(drift(&cx, snapshot.as_ref()));
    checks.push(kube_proxy());
    checks.push(shared_hooks(&cx));
    checks.push(maps(&cx));
    checks.push(counters(&cx));
    Report { checks }
}

fn agent(cx: &Context) -> Check {
    const NAME: &str = "agent";
    let root = cx.pins.root().display();
    match cx.holder {
        Some(pid) => {
            let command = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            Check::ok(NAME, format!("{} (pid {pid}) holds {root}", command.trim()))
        }
        None if !cx.pins.root().exists() => Check::problem(
            NAME,
            Status::Fail,
            format!("no datapath at {root}: the agent never ran with this --bpffs"),
            cx.restart.clone(),
        ),
        None => Check::problem(
            NAME,
            Status::Fail,
            format!(
                "no agent holds {root}: the pinned datapath serves what it last had, and nothing updates it"
            ),
            cx.restart.clone(),
        ),
    }
}

/// kube-proxy's `/healthz` body, as far as it is read here.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Healthz {
    #[serde(default)]
    last_updated: String,
    reason: Option<String>,
}

fn sync(cx: &Context) -> Check {
    const NAME: &str = "sync";
    let address = cx.args.healthz_address;
    let (status, body) = match http_get(address, "/healthz") {
        Ok(answer) => answer,
        Err(error) => {
            return Check::problem(
                NAME,
                Status::Fail,
                format!("no answer from /healthz at {address}: {error}"),
                if cx.holder.is_some() {
                    "pass the agent's --healthz-bind-address as --healthz-address".to_owned()
                } else {
                    cx.restart.clone()
                },
            );
        }
    };
    let health: Option<Healthz> = serde_json::from_str(&body).ok();
    let age = health
        .as_ref()
        .and_then(|h| h.last_updated.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .and_then(|t| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()?;
            Some(
                now.as_secs()
                    .saturating_sub(u64::try_from(t.as_second()).ok()?),
            )
        })
        .map_or_else(
            || "no sync yet".to_owned(),
            |age| format!("last sync {age}s ago"),
        );
    if status == 200 {
        return Check::ok(NAME, format!("/healthz 200 at {address}: {age}"));
    }
    let reason = health
        .and_then(|h| h.reason)
        .unwrap_or_else(|| body.trim().to_owned());
    Check::problem(
        NAME,
        Status::Fail,
        format!("/healthz {status} at {address}: {reason} ({age})"),
        "read the agent's log for the failing writes or the Node's deletion; the source check below says whether the source answers",
    )
}

/// One GET, one answer: the agent's responder serves one request per
/// connection.
fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.take(64 * 1024).read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

async fn source(cx: &Context<'_>) -> (Check, Option<Snapshot>) {
    const NAME: &str = "source";
    let args = &cx.args.source;
    let model = args.model_config();
    let built = match args.build().await {
        Ok(built) => built,
        Err(error) => {
            return (
                Check::problem(
                    NAME,
                    Status::Fail,
                    chain(&error),
                    "pass --manifests DIR, or --kubeconfig FILE for the API server",
                ),
                None,
            );
        }
    };
    let (what, source): (String, Box<dyn crate::source::Source>) = match built {
        Built::Manifests(dir, source) => {
            if let Err(error) = fs::read_dir(&dir) {
                return (
                    Check::problem(
                        NAME,
                        Status::Fail,
                        format!(
                            "cannot read the manifest directory {}: {error}",
                            dir.display()
                        ),
                        format!(
                            "make {} a readable directory, or pass the agent's --manifests",
                            dir.display()
                        ),
                    ),
                    None,
                );
            }
            (format!("manifests in {}", dir.display()), Box::new(source))
        }
        Built::Kube(source) => {
            let node = args.node_name().unwrap_or_default();
            if let Some(check) = kube_access(&source.client(), &node).await {
                return (check, None);
            }
            ("the API server".to_owned(), Box::new(source))
        }
    };
    let snapshot = match snapshot::take(source, model).await {
        Ok(snapshot) => snapshot,
        Err(error) => {
            return (
                Check::problem(
                    NAME,
                    Status::Fail,
                    format!("{what}: {}", chain(&error)),
                    "fix the source's error above; the agent names it in /healthz's body (sourceError) and its metrics (source_failing)",
                ),
                None,
            );
        }
    };
    let check = source_verdict(&what, &snapshot);
    (check, Some(snapshot))
}

/// The source check once the source was read.
fn source_verdict(what: &str, snapshot: &Snapshot) -> Check {
    const NAME: &str = "source";
    let frontends = snapshot.model.desired().frontends.len();
    let problems: Vec<String> = snapshot
        .model
        .problems()
        .iter()
        .map(ToString::to_string)
        .collect();
    if let Some(error) = &snapshot.error {
        Check::problem(
            NAME,
            Status::Warn,
            format!("{what}: {frontends} frontends; last error: {error}"),
            "fix the source's error; the agent retries by itself",
        )
    } else if !snapshot.complete {
        Check::problem(
            NAME,
            Status::Warn,
            format!(
                "{what}: {frontends} frontends, but some files do not parse (named in the warnings above); the agent keeps their last good contents"
            ),
            "fix or remove the files that do not parse",
        )
    } else if problems.is_empty() {
        Check::ok(NAME, format!("{what}: {frontends} frontends"))
    } else {
        Check::problem(
            NAME,
            Status::Warn,
            format!(
                "{what}: {frontends} frontends; {} objects or ports are skipped",
                problems.len()
            ),
            "fix the objects named below; the rest is served",
        )
        .with_details(problems)
    }
}

/// Whether the API server answers, and lets this client list what the
/// agent watches: `None` when all is well.
async fn kube_access(client: &kube::Client, node: &str) -> Option<Check> {
    use k8s_openapi::api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    };
    use kube::{Api, api::ListParams};
    const NAME: &str = "source";
    let params = ListParams::default().limit(1);
    let timeout = Duration::from_secs(5);
    let answers = [
        (
            "list services",
            tokio::time::timeout(timeout, Api::<Service>::all(client.clone()).list(&params))
                .await
                .map(|r| r.map(drop)),
        ),
        (
            "list endpointslices",
            tokio::time::timeout(
                timeout,
                Api::<EndpointSlice>::all(client.clone()).list(&params),
            )
            .await
            .map(|r| r.map(drop)),
        ),
        (
            "get the Node",
            tokio::time::timeout(timeout, Api::<Node>::all(client.clone()).get(node))
                .await
                .map(|r| r.map(drop)),
        ),
    ];
    for (what, answer) in answers {
        let evidence = match answer {
            Ok(Ok(())) => continue,
            Err(_) => format!("the API server did not answer {what} within {timeout:?}"),
            Ok(Err(kube::Error::Api(status))) if status.code == 403 => {
                return Some(Check::problem(
                    NAME,
                    Status::Fail,
                    format!("not authorised to {what}: {}", status.message),
                    "grant the ClusterRole of deploy/rbac.yaml: `kubectl apply -k deploy/` (get, list, watch on services, nodes and endpointslices)",
                ));
            }
            Ok(Err(kube::Error::Api(status))) if status.code == 404 && what == "get the Node" => {
                return Some(Check::problem(
                    NAME,
                    Status::Fail,
                    format!("there is no Node {node:?}"),
                    "pass the node's name as --hostname-override (or NODE_NAME)",
                ));
            }
            Ok(Err(error)) => format!("cannot {what}: {}", chain(&error)),
        };
        return Some(Check::problem(
            NAME,
            Status::Fail,
            evidence,
            "check the API server's address in the kubeconfig and that this node reaches it",
        ));
    }
    None
}

fn kernel(cx: &Context) -> Check {
    const NAME: &str = "kernel";
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let version = parse_version(&release);
    let mut facts = vec![format!("Linux {release}")];
    let mut problems: Vec<(Status, String, &str)> = Vec::new();
    let mut problem = |status: Status, fact: String, fix: &'static str| {
        problems.push((status, fact, fix));
    };
    match version {
        Some(v) if v < KERNEL_MINIMUM => problem(
            Status::Fail,
            "older than 5.7: no bpf_link for cgroups".to_owned(),
            "upgrade the kernel to 6.1 or newer",
        ),
        Some(v) if v < KERNEL_FOR_REFUSAL => problem(
            Status::Warn,
            "older than 6.1: Services without endpoints cannot refuse at once".to_owned(),
            "upgrade the kernel to 6.1 or newer",
        ),
        Some(_) => {}
        None => problem(
            Status::Warn,
            "version unreadable".to_owned(),
            "check /proc/sys/kernel/osrelease",
        ),
    }
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        facts.push("BTF".to_owned());
    } else {
        problem(
            Status::Warn,
            "no /sys/kernel/btf/vmlinux".to_owned(),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        );
    }
    match crate::config::cgroup2_root() {
        Ok(root) => facts.push(format!("cgroup2 at {}", root.display())),
        Err(_) => problem(
            Status::Fail,
            "no cgroup2 mounted".to_owned(),
            "mount cgroup2: `mount -t cgroup2 none /sys/fs/cgroup`",
        ),
    }
    let existing = cx
        .pins
        .root()
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match bpf_sys::is_bpffs(existing) {
        Ok(true) => facts.push(format!("bpffs at {}", existing.display())),
        _ => problem(
            Status::Fail,
            format!("{} is not on bpffs", existing.display()),
            "mount bpffs: `mount -t bpf bpf /sys/fs/bpf`",
        ),
    }
    match datapath::probe_load() {
        Ok(()) => facts.push(format!(
            "the {} programs load",
            datapath::program_names().len()
        )),
        Err(error) => problem(
            Status::Fail,
            format!("the programs do not load: {}", chain(&error)),
            "run as root (CAP_BPF, CAP_SYS_ADMIN) on a kernel 6.1 or newer with CONFIG_CGROUP_BPF=y",
        ),
    }
    let worst = problems.iter().map(|p| p.0).max().unwrap_or(Status::Ok);
    let mut fixes: Vec<&str> = problems.iter().map(|p| p.2).collect();
    fixes.dedup();
    facts.extend(problems.into_iter().map(|p| p.1));
    let evidence = facts.join(", ");
    if worst == Status::Ok {
        Check::ok(NAME, evidence)
    } else {
        Check::problem(NAME, worst, evidence, fixes.join("; "))
    }
}

/// `major.minor` of a kernel release such as `6.18.44-fc`.
fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The hook each program attaches to, by program name.
fn attach_type_of(program: &str) -> Option<bpf_attach_type> {
    Some(match program {
        "connect4" => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        "sendmsg4" => bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG,
        "recvmsg4" => bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG,
        "getpeername4" => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
        "sock_release" => bpf_attach_type::BPF_CGROUP_INET_SOCK_RELEASE,
        _ => return None,
    })
}

fn attach_type_name(attach_type: bpf_attach_type) -> &'static str {
    match attach_type {
        bpf_attach_type::BPF_CGROUP_INET4_CONNECT => "cgroup/connect4",
        bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG => "cgroup/sendmsg4",
        bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG => "cgroup/recvmsg4",
        bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME => "cgroup/getpeername4",
        bpf_attach_type::BPF_CGROUP_INET_SOCK_RELEASE => "cgroup/sock_release",
        _ => "cgroup",
    }
}

/// The cgroup the programs should be on.
fn cgroup(cx: &Context) -> Option<PathBuf> {
    cx.args
        .cgroup
        .clone()
        .or_else(|| crate::config::cgroup2_root().ok())
}

/// Our program's id behind each pinned link that is alive.
fn our_programs(cx: &Context) -> BTreeMap<&'static str, bpf_sys::CgroupLinkInfo> {
    datapath::program_names()
        .iter()
        .filter_map(|name| {
            let link = bpf_sys::obj_get(&cx.pins.link(name)).ok()?;
            Some((*name, bpf_sys::cgroup_link_info(link).ok()?))
        })
        .collect()
}

fn programs(cx: &Context) -> Check {
    const NAME: &str = "programs";
    let Some(cgroup) = cgroup(cx) else {
        return Check::problem(
            NAME,
            Status::Fail,
            "no cgroup2 is mounted",
            "pass the agent's --cgroup",
        );
    };
    let cgroup_dir = match fs::File::open(&cgroup) {
        Ok(dir) => dir,
        Err(error) => {
            return Check::problem(
                NAME,
                Status::Fail,
                format!("cannot open the cgroup {}: {error}", cgroup.display()),
                "pass the agent's --cgroup",
            );
        }
    };
    // On cgroup2 a cgroup's id is its directory's inode number.
    let cgroup_id = cgroup_dir.metadata().map(|m| m.ino()).unwrap_or_default();
    let mut problems = Vec::new();
    for name in datapath::program_names() {
        let path = cx.pins.link(name);
        if !path.exists() {
            problems.push(format!(
                "{name}: no pinned link at {}, so it is detached",
                path.display()
            ));
            continue;
        }
        let info = match bpf_sys::obj_get(&path).and_then(bpf_sys::cgroup_link_info) {
            Ok(info) => info,
            Err(error) => {
                problems.push(format!(
                    "{name}: {} is not a cgroup link: {error}",
                    path.display()
                ));
                continue;
            }
        };
        if info.cgroup_id == 0 {
            problems.push(format!(
                "{name}: the link {} is defunct (its cgroup is gone)",
                path.display()
            ));
        } else if info.cgroup_id != cgroup_id {
            problems.push(format!(
                "{name}: attached to cgroup id {}, not {} (id {cgroup_id})",
                info.cgroup_id,
                cgroup.display()
            ));
        } else if !bpf_sys::cgroup_prog_ids(&cgroup_dir, info.attach_type, false)
            .is_ok_and(|ids| ids.contains(&info.prog_id))
        {
            problems.push(format!(
                "{name}: program {} is not among the cgroup's programs",
                info.prog_id
            ));
        }
    }
    if problems.is_empty() {
        Check::ok(
            NAME,
            format!(
                "{} attached to {} by pinned links",
                datapath::program_names().join(", "),
                cgroup.display()
            ),
        )
    } else {
        Check::problem(
            NAME,
            Status::Fail,
            format!(
                "{} of {} programs are not attached as they should be",
                problems.len(),
                datapath::program_names().len()
            ),
            format!(
                "{}: a starting agent attaches anew where a link is missing or defunct",
                cx.restart
            ),
        )
        .with_details(problems)
    }
}

/// The tc programs on the devices, and the masquerade chains their
/// policy-Cluster flows depend on: the agent's mark and POSTROUTING chains,
/// and the one jump to them.
fn masquerade(cx: &Context) -> Check {
    const NAME: &str = "masquerade";
    let links = datapath::tc_links(&cx.pins);
    if links.is_empty() {
        return Check::ok(
            NAME,
            "no pinned tc link (--devices none, no NodePort address, or clsact filters, \
             which are not pinned): nothing to masquerade",
        );
    }
    let defunct: Vec<String> = links
        .iter()
        .filter_map(|(path, device)| {
            let on_device = bpf_sys::obj_get(path).and_then(bpf_sys::tcx_link_ifindex);
            let now = nix::net::if_::if_nametoindex(device.as_str()).ok();
            match on_device {
                Ok(index) if index != 0 && Some(index) == now => None,
                Ok(_) => Some(format!(
                    "{} (its device is gone or was made again)",
                    path.display()
                )),
                Err(error) => Some(format!("{}: {error}", path.display())),
            }
        })
        .collect();
    if !defunct.is_empty() {
        return Check::problem(
            NAME,
            Status::Fail,
            format!("defunct tc links: {}", defunct.join("; ")),
            format!(
                "a running agent attaches anew within --iptables-sync-period; if it stays, {}",
                cx.restart
            ),
        );
    }
    let mut devices: Vec<&str> = links.iter().map(|(_, device)| device.as_str()).collect();
    devices.dedup();
    let on = format!("tc programs on {}", devices.join(", "));
    match crate::reconcile::masquerade::check(cx.args.iptables_masquerade_bit) {
        Ok(None) => Check::ok(
            NAME,
            format!("{on}; the masquerade chains are in place and POSTROUTING jumps to them once"),
        ),
        Ok(Some(problem)) => Check::problem(
            NAME,
            Status::Fail,
            format!("{on}, but the masquerade rules are not right: {problem}"),
            format!(
                "{}: the agent restores them within --iptables-sync-period (unless \
                 --install-iptables-rules=false)",
                cx.restart
            ),
        ),
        Err(error) => Check::problem(
            NAME,
            Status::Warn,
            format!("{on}, but the masquerade rules cannot be read: {error}"),
            "install iptables (apt-get install iptables), or masquerade marked packets otherwise",
        ),
    }
}

/// A frontend as both sides are compared: its address and its backends.
type Frontends = BTreeMap<String, (String, BTreeSet<String>)>;

fn listed_frontends(services: &[ListedService]) -> Frontends {
    services
        .iter()
        .map(|s| {
            (
                format!("{}/{}", s.frontend, s.protocol),
                (
                    String::new(),
                    s.backends.iter().map(|b| b.address.clone()).collect(),
                ),
            )
        })
        .collect()
}

fn desired_frontends(snapshot: &Snapshot) -> Frontends {
    snapshot
        .model
        .desired()
        .frontends
        .iter()
        .map(|(frontend, desired)| {
            (
                frontend.to_string(),
                (
                    desired.service.clone(),
                    desired
                        .backends
                        .iter()
                        .map(|b| format!("{}:{}", b.ip, b.port))
                        .collect(),
                ),
            )
        })
        .collect()
}

/// What differs between the source and the maps, one line per frontend.
fn differences(desired: &Frontends, held: &Frontends, complete: bool) -> Vec<String> {
    let list = |set: &BTreeSet<String>| {
        if set.is_empty() {
            "none (refuses)".to_owned()
        } else {
            set.iter().cloned().collect::<Vec<_>>().join(", ")
        }
    };
    let mut lines = Vec::new();
    for (frontend, (service, backends)) in desired {
        match held.get(frontend) {
            None => lines.push(format!(
                "missing {frontend} ({service}): the source has backends {}, the maps nothing",
                list(backends)
            )),
            Some((_, held)) if held != backends => lines.push(format!(
                "stale {frontend} ({service}): the maps have {}, the source {}",
                list(held),
                list(backends)
            )),
            Some(_) => {}
        }
    }
    for (frontend, (_, backends)) in held {
        if !desired.contains_key(frontend) {
            let why = if complete {
                "no Service asks for it"
            } else {
                "no Service that could be read asks for it"
            };
            lines.push(format!(
                "extra {frontend}: the maps have {}; {why}",
                list(backends)
            ));
        }
    }
    lines
}

fn drift(cx: &Context, snapshot: Option<&Snapshot>) -> Check {
    const NAME: &str = "drift";
    let Some(snapshot) = snapshot else {
        return Check::problem(
            NAME,
            Status::Warn,
            "not compared: the source could not be read (see the source check)",
            "fix the source first",
        );
    };
    let read_maps = || -> Result<Frontends, String> {
        let maps = datapath::open_pinned(&cx.pins).map_err(|e| chain(&e))?;
        Ok(listed_frontends(
            &listing::list(&maps, None).map_err(|e| chain(&e))?,
        ))
    };
    let desired = desired_frontends(snapshot);
    let mut found = match read_maps() {
        Ok(held) => differences(&desired, &held, snapshot.complete),
        Err(error) => {
            return Check::problem(
                NAME,
                Status::Fail,
                format!("cannot read the maps: {error}"),
                cx.restart.clone(),
            );
        }
    };
    // A running agent may be writing a change right now: only what still
    // differs a moment later is drift.
    if !found.is_empty() && cx.holder.is_some() {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(held) = read_maps() {
            let again: BTreeSet<String> = differences(&desired, &held, snapshot.complete)
                .into_iter()
                .collect();
            found.retain(|line| again.contains(line));
        }
    }
    if found.is_empty() {
        return Check::ok(
            NAME,
            format!(
                "the maps hold the {} frontends of the source, with the same backends",
                desired.len()
            ),
        );
    }
    let count = |kind: &str| found.iter().filter(|l| l.starts_with(kind)).count();
    let (missing, stale, extra) = (count("missing"), count("stale"), count("extra"));
    let status = if missing + stale == 0 && !snapshot.complete {
        // Kept on purpose while a file does not parse.
        Status::Warn
    } else {
        Status::Fail
    };
    let fix = if cx.holder.is_some() {
        format!(
            "the agent's view of the maps is out of step with them (changed behind its back?); {}: it reads the maps again and rewrites what differs",
            cx.restart
        )
    } else {
        format!("{}: it rewrites what differs", cx.restart)
    };
    Check::problem(
        NAME,
        status,
        format!(
            "{} of {} frontends differ from the source: {missing} missing, {stale} stale, {extra} extra",
            found.len(),
            desired.len() + extra
        ),
        fix,
    )
    .with_details(found)
}

fn kube_proxy() -> Check {
    const NAME: &str = "kube-proxy";
    match crate::kube_proxy_cleanup::find_kube_proxy_leftovers() {
        Ok(found) if found.is_empty() => Check::ok(
            NAME,
            "no KUBE-SERVICES or other kube-proxy chains (iptables legacy and nft), no kube-proxy nftables table",
        ),
        Ok(found) => Check::problem(
            NAME,
            Status::Fail,
            format!(
                "kube-proxy's rules are on this node ({} chains or tables): both proxies are at work",
                found.len()
            ),
            "stop kube-proxy (see deploy/README.md), then `proxy-userspace cleanup --kube-proxy`",
        )
        .with_details(found),
        Err(error) => Check::problem(
            NAME,
            Status::Warn,
            format!("cannot read the rules: {}", chain(&error)),
            "run as root with iptables and nft installed",
        ),
    }
}

fn shared_hooks(cx: &Context) -> Check {
    const NAME: &str = "shared-hooks";
    let Some(cgroup) = cgroup(cx) else {
        return Check::problem(
            NAME,
            Status::Warn,
            "no cgroup to look at",
            "pass the agent's --cgroup",
        );
    };
    let Ok(cgroup_dir) = fs::File::open(&cgroup) else {
        return Check::problem(
            NAME,
            Status::Warn,
            format!("cannot open {}", cgroup.display()),
            "pass the agent's --cgroup",
        );
    };
    let ours: BTreeSet<u32> = our_programs(cx).values().map(|l| l.prog_id).collect();
    let names: BTreeMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
        .collect();
    let mut others = Vec::new();
    for program in datapath::program_names() {
        let Some(attach_type) = attach_type_of(program) else {
            continue;
        };
        // Effective: programs of ancestor cgroups run on these sockets too.
        let Ok(ids) = bpf_sys::cgroup_prog_ids(&cgroup_dir, attach_type as u32, true) else {
            continue;
        };
        for id in ids.into_iter().filter(|id| !ours.contains(id)) {
            others.push(format!(
                "{}: program {id} ({})",
                attach_type_name(attach_type),
                names.get(&id).map_or("?", String::as_str)
            ));
        }
    }
    if others.is_empty() {
        Check::ok(
            NAME,
            format!("no other program runs on the hooks of {}", cgroup.display()),
        )
    } else {
        Check::problem(
            NAME,
            Status::Warn,
            format!(
                "{} other programs run on the same hooks of {} and may rewrite the same sockets",
                others.len(),
                cgroup.display()
            ),
            "see who loaded them with `bpftool prog show id ID` and `bpftool cgroup tree`; remove the other proxy",
        )
        .with_details(others)
    }
}

fn maps(cx: &Context) -> Check {
    const NAME: &str = "maps";
    let maps = match datapath::open_pinned(&cx.pins) {
        Ok(maps) => maps,
        Err(error) => {
            return Check::problem(NAME, Status::Fail, chain(&error), cx.restart.clone());
        }
    };
    let services = crate::maps::table::read_frontends(&maps.services).map(|frontends| {
        frontends
            .values()
            .map(|f| f.slots.len() + usize::from(f.count.is_some()))
            .sum::<usize>()
    });
    let backends = maps.backends.keys().count();
    let mut worst = Status::Ok;
    let mut facts = Vec::new();
    let mut fixes = Vec::new();
    for (name, flag, used) in [
        (
            proxy_common::SERVICES_MAP,
            "--services-map-size",
            services.unwrap_or_default(),
        ),
        (proxy_common::BACKENDS_MAP, "--backends-map-size", backends),
    ] {
        let Ok(size) = bpf_sys::obj_get(&cx.pins.map(name))
            .and_then(bpf_sys::map_info)
            .map(|info| info.max_entries)
        else {
            continue;
        };
        let used = u64::try_from(used).unwrap_or(u64::MAX);
        let percent = used * 100 / u64::from(size.max(1));
        facts.push(format!("{name} {used}/{size} ({percent}%)"));
        let status = if used >= u64::from(size) {
            Status::Fail
        } else if percent >= FILL_WARN_PERCENT {
            Status::Warn
        } else {
            Status::Ok
        };
        if status != Status::Ok {
            fixes.push(format!(
                "raise {flag}, then `proxy-userspace cleanup` and restart the agent"
            ));
        }
        worst = worst.max(status);
    }
    let evidence = facts.join(", ");
    if worst == Status::Ok {
        Check::ok(NAME, evidence)
    } else {
        Check::problem(NAME, worst, evidence, fixes.join("; "))
    }
}

fn counters(cx: &Context) -> Check {
    const NAME: &str = "counters";
    let counts = match datapath::open_pinned_events(&cx.pins)
        .map_err(|e| chain(&e))
        .and_then(|map| listing::events(&map).map_err(|e| chain(&e)))
    {
        Ok(counts) => counts,
        Err(error) => {
            return Check::problem(NAME, Status::Fail, error, cx.restart.clone());
        }
    };
    let get = |event: proxy_common::Event| {
        counts
            .iter()
            .find(|(e, _)| *e == event)
            .map_or(0, |(_, n)| n)
    };
    let evidence = counts
        .iter()
        .map(|(event, count)| format!("{} {count}", event.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let lost = get(proxy_common::Event::NoBackendSlot) + get(proxy_common::Event::NoBackend);
    let forwarded = get(proxy_common::Event::Forwarded);
    // A lost race now and then is a socket made while its Service shrank;
    // many mean the maps change under heavy traffic all the time.
    if lost > 0 && lost.saturating_mul(100) > forwarded {
        Check::problem(
            NAME,
            Status::Warn,
            format!("{evidence}: more than 1% of translations lost a race with a write"),
            "find the Service whose endpoints change constantly (`proxy-userspace services` twice)",
        )
    } else {
        Check::ok(
            NAME,
            format!("{evidence} (refused: connections to Services without endpoints)"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontends(entries: &[(&str, &[&str])]) -> Frontends {
        entries
            .iter()
            .map(|(f, b)| {
                (
                    (*f).to_owned(),
                    (
                        "default/web".to_owned(),
                        b.iter().map(|s| (*s).to_owned()).collect(),
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn each_frontend_is_missing_stale_or_extra() {
        let desired = frontends(&[
            ("10.96.0.10:80/TCP", &["10.244.0.10:8080"]),
            ("10.96.0.11:80/TCP", &["10.244.0.10:8080"]),
            ("10.96.0.12:80/TCP", &[]),
        ]);
        let held = frontends(&[
            ("10.96.0.10:80/TCP", &["10.244.0.10:8080"]),
            ("10.96.0.12:80/TCP", &["<missing>"]),
            ("10.96.0.13:53/UDP", &["10.244.0.11:53"]),
        ]);
        let lines = differences(&desired, &held, true);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("missing 10.96.0.11:80/TCP"));
        assert!(lines[1].starts_with("stale 10.96.0.12:80/TCP"));
        assert!(lines[1].contains("<missing>") && lines[1].contains("none (refuses)"));
        assert!(lines[2].starts_with("extra 10.96.0.13:53/UDP"));
        assert!(differences(&desired, &desired, true).is_empty());
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_version("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(parse_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_version("6.0.1") < Some(KERNEL_FOR_REFUSAL));
        assert_eq!(parse_version("weird"), None);
    }

    #[test]
    fn the_json_has_a_fixed_shape_and_no_time() {
        let report = Report {
            checks: vec![
                Check::ok("agent", "x"),
                Check::problem("drift", Status::Fail, "y", "z")
                    .with_details(vec!["b".into(), "a".into()]),
            ],
        };
        assert!(report.failed());
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            r#"{"checks":[{"name":"agent","status":"OK","evidence":"x"},{"name":"drift","status":"FAIL","evidence":"y","fix":"z","details":["a","b"]}]}"#
        );
    }
}
