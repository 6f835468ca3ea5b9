//! The cgroup programs: whether each is attached where it should be by its
//! pinned link, and whether other programs share their hooks.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use aya_obj::generated::bpf_attach_type;

use super::{Check, Context, Status};
use crate::{bpf_sys, datapath};

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
        .or_else(|| crate::cgroup2::cgroup2_root().ok())
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

pub(super) fn programs(cx: &Context) -> Check {
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
    // Kernel object ids differ from node to node and with every load.
    let mut ids = Vec::new();
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
                "{name}: attached to another cgroup than {}",
                cgroup.display()
            ));
            ids.push(format!(
                "{name}: cgroup id {}, not {cgroup_id}",
                info.cgroup_id
            ));
        } else if !bpf_sys::cgroup_prog_ids(&cgroup_dir, info.attach_type, false)
            .is_ok_and(|ids| ids.contains(&info.prog_id))
        {
            problems.push(format!(
                "{name}: its program is not among the cgroup's programs"
            ));
            ids.push(format!("{name}: program id {}", info.prog_id));
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
        .with_volatile(ids)
    }
}

pub(super) fn shared_hooks(cx: &Context) -> Check {
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
    let mut ids = Vec::new();
    for program in datapath::program_names() {
        let Some(attach_type) = attach_type_of(program) else {
            continue;
        };
        // Effective: programs of ancestor cgroups run on these sockets too.
        let Ok(attached) = bpf_sys::cgroup_prog_ids(&cgroup_dir, attach_type as u32, true) else {
            continue;
        };
        for id in attached.into_iter().filter(|id| !ours.contains(id)) {
            let hook = attach_type_name(attach_type);
            let name = names.get(&id).map_or("?", String::as_str);
            others.push(format!("{hook}: program {name}"));
            ids.push(format!("{hook}: {name} is program id {id}"));
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
            "see who loaded them with `bpftool prog show name NAME` and `bpftool cgroup tree`; remove the other proxy",
        )
        .with_details(others)
        .with_volatile(ids)
    }
}
