//! Packets from a pod, on the host's side of its interface, with
//! `--socket-lb-scope=host`: the pod's sockets are not balanced at
//! `connect()` there, so its packets leave it with the Service address as
//! their destination, past whatever the pod's own iptables do with it (a
//! mesh's sidecar redirect), and are translated here, as `tc_ingress`
//! translates a node's outside traffic, on the same flow table. Replies go
//! back through `tc_egress` on the same interface, whether they crossed the
//! node's routing or only its bridge.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::tc_ingress::{FROM_POD, by_family};

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro hands the context over by value"
)]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    by_family::<FROM_POD>(&ctx)
}
