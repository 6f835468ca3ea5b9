//! The tc programs on the devices and the masquerade rules behind them.

use super::{Check, Context, Status};
use crate::{bpf_sys, datapath};

/// The tc programs on the devices, and the masquerade chains their
/// policy-Cluster flows depend on: the agent's mark and POSTROUTING chains,
/// and the one jump to them.
pub(super) fn masquerade(cx: &Context) -> Check {
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
