//! The tc programs on the devices and the masquerade rules behind them.

use super::{Check, Context, Status};
use crate::{
    bpf_sys, datapath,
    reconcile::masquerade::{Family, FamilyCheck},
};

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
        .filter_map(|(path, link)| {
            let on_device = bpf_sys::obj_get(path).and_then(bpf_sys::tcx_link_ifindex);
            let now = nix::net::if_::if_nametoindex(link.device.as_str()).ok();
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
    // The pods' interfaces by role, not by name: there is one per pod.
    let mut devices: Vec<&str> = links
        .iter()
        .filter(|(_, link)| link.program == "tc_ingress")
        .map(|(_, link)| link.device.as_str())
        .collect();
    devices.dedup();
    if links
        .iter()
        .any(|(_, link)| link.program == "tc_pod_ingress")
    {
        devices.push("the pods' interfaces (--socket-lb-scope=host)");
    }
    let on = format!("tc programs on {}", devices.join(", "));
    let families = match crate::reconcile::masquerade::check(cx.args.masquerade_bit) {
        Ok(families) => families,
        Err(error) => {
            return Check::problem(
                NAME,
                Status::Warn,
                format!("{on}, but the masquerade rules cannot be read: {error}"),
                "install iptables (apt-get install iptables), or masquerade marked packets otherwise",
            );
        }
    };
    rules_check(&on, &families, &cx.restart)
}

/// The check from each family's rules: FAIL when some are wrong, WARN when
/// some cannot be read, OK when all are in place (a node without IPv6 has
/// only the IPv4 ones).
fn rules_check(on: &str, families: &[(Family, FamilyCheck)], restart: &str) -> Check {
    const NAME: &str = "masquerade";
    let named = |pick: fn(&FamilyCheck) -> Option<&String>| {
        families
            .iter()
            .filter_map(|(family, found)| pick(found).map(|what| format!("{family}: {what}")))
            .collect::<Vec<_>>()
    };
    let wrong = named(|found| match found {
        FamilyCheck::Wrong(problem) => Some(problem),
        _ => None,
    });
    if !wrong.is_empty() {
        return Check::problem(
            NAME,
            Status::Fail,
            format!(
                "{on}, but the masquerade rules are not right: {}",
                wrong.join("; ")
            ),
            format!(
                "{restart}: the agent restores them within --iptables-sync-period (unless \
                 --install-iptables-rules=false)"
            ),
        );
    }
    let unreadable = named(|found| match found {
        FamilyCheck::Unreadable(error) => Some(error),
        _ => None,
    });
    if !unreadable.is_empty() {
        return Check::problem(
            NAME,
            Status::Warn,
            format!(
                "{on}, but the masquerade rules cannot be read: {}",
                unreadable.join("; ")
            ),
            "install iptables (apt-get install iptables, which has ip6tables too), or masquerade \
             marked packets otherwise",
        );
    }
    let in_place: Vec<String> = families
        .iter()
        .filter(|(_, found)| *found == FamilyCheck::InPlace)
        .map(|(family, _)| family.to_string())
        .collect();
    // The reason names the family.
    let off = families.iter().filter_map(|(_, found)| match found {
        FamilyCheck::Off(reason) => Some(reason),
        _ => None,
    });
    let mut evidence = format!(
        "{on}; the masquerade chains are in place and POSTROUTING jumps to them once ({})",
        in_place.join(" and ")
    );
    for reason in off {
        evidence.push_str("; ");
        evidence.push_str(reason);
    }
    Check::ok(NAME, evidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(families: &[(Family, FamilyCheck)]) -> (Status, String) {
        let check = rules_check("tc programs on eth0", families, "restart the agent");
        (check.status, check.evidence)
    }

    #[test]
    fn both_families_are_reported() {
        let (status, text) = evidence(&[
            (Family::V4, FamilyCheck::InPlace),
            (Family::V6, FamilyCheck::InPlace),
        ]);
        assert_eq!(status, Status::Ok);
        assert!(text.ends_with("once (IPv4 and IPv6)"), "{text}");

        let (status, text) = evidence(&[
            (Family::V4, FamilyCheck::InPlace),
            (
                Family::V6,
                FamilyCheck::Wrong("a chain is missing".to_owned()),
            ),
        ]);
        assert_eq!(status, Status::Fail);
        assert!(
            text.ends_with("not right: IPv6: a chain is missing"),
            "{text}"
        );

        let (status, text) = evidence(&[
            (Family::V4, FamilyCheck::InPlace),
            (
                Family::V6,
                FamilyCheck::Unreadable("ip6tables-nft-save failed".to_owned()),
            ),
        ]);
        assert_eq!(status, Status::Warn);
        assert!(text.ends_with("IPv6: ip6tables-nft-save failed"), "{text}");
    }

    #[test]
    fn a_node_without_ipv6_is_fine_with_the_ipv4_rules() {
        let (status, text) = evidence(&[
            (Family::V4, FamilyCheck::InPlace),
            (
                Family::V6,
                FamilyCheck::Off("IPv6 is disabled on this node".to_owned()),
            ),
        ]);
        assert_eq!(status, Status::Ok);
        assert!(
            text.ends_with("once (IPv4); IPv6 is disabled on this node"),
            "{text}"
        );
    }
}
