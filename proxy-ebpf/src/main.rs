//! The datapath: cgroup socket-address hooks that load-balance ClusterIP
//! Services where the socket is made, before any packet exists; and tc
//! hooks on the node's devices that translate NodePort, externalIP and
//! load-balancer traffic from outside, packet by packet (and, with
//! `--socket-lb-scope=host`, pods' Service traffic on their interfaces).
//!
//! One file per hook; the backend choice they share lives in `lb`, the
//! packet rewrites in `packet`, the maps in `maps`. Every hook fails
//! open: an address that is not a Service is left alone.
#![no_std]
#![no_main]
// `atomic_xadd`, for the per-slot counts: the bpf target has atomic adds
// but no compare-and-swap, so `AtomicU64::fetch_add` does not exist there.
// Only for the kernel: the workspace's host check runs on stable.
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "core::intrinsics::atomic_xadd"),
    feature(core_intrinsics)
)]

mod connect4;
mod connect6;
mod getpeername4;
mod getpeername6;
mod lb;
mod maps;
mod packet;
mod recvmsg4;
mod recvmsg6;
mod sendmsg4;
mod sendmsg6;
mod sock_addr;
mod sock_release;
mod tc_egress;
mod tc_ingress;
mod tc_pod_ingress;

/// The socket-storage and set-retval helpers need a GPL-compatible license;
/// Cargo.toml declares the crate's license to match.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

// Only for the kernel: a host check (`cargo clippy --workspace`) links std
// through a dependency, which brings its own.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this, so it is never
    // called; it exists because no_std demands it.
    loop {}
}
