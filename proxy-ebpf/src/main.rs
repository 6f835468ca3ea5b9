//! The datapath: cgroup socket-address hooks that load-balance ClusterIP
//! Services where the socket is made, before any packet exists.
//!
//! One file per hook; the shared translation lives in `lb`, the maps in
//! `maps`. Every hook fails open: an address that is not a Service is left
//! alone.
#![no_std]
#![no_main]

mod connect4;
mod getpeername4;
mod lb;
mod maps;
mod recvmsg4;
mod sendmsg4;

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
