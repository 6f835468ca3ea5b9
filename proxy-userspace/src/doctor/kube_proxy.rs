//! Whether kube-proxy's rules are on the node too: two proxies at work.

use super::{Check, Status};
use crate::report::chain;

pub(super) fn kube_proxy() -> Check {
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
