//! Least privilege: the agent checks at start that it may do its work, and
//! then gives up every capability it does not need, in every set, so that
//! a bug in it (or in a tool it runs) cannot do more than the agent must.
//!
//! Capabilities are per thread: drop them before any thread is spawned,
//! and every later thread inherits the reduced sets.

use caps::{CapSet, Capability, CapsHashSet};

/// What the agent keeps while it runs, and why (the DaemonSet grants
/// these, plus CAP_SYS_ADMIN for the start, see [`STARTUP_CAPABILITIES`]):
/// - `CAP_BPF`: create maps, load programs, pin and open pins, load BTF.
/// - `CAP_NET_ADMIN`: load cgroup `sock_addr` programs (the kernel asks
///   for it for network program types); later, the iptables rules.
/// - `CAP_PERFMON`: the verifier treats programs of a loader without it
///   more strictly (no pointer comparisons, speculation hardening), so
///   programs verified under root could be refused without it.
/// - `CAP_NET_RAW`: the masquerade fallback will run iptables-restore; its
///   legacy back-end reads and writes tables through a raw socket and fails
///   with "unable to initialize table" without it (the nft back-end needs
///   only CAP_NET_ADMIN). Children get the bounding set, since the agent
///   runs as uid 0.
///
/// Cgroup attach (BPF_LINK_CREATE) and BPF_LINK_UPDATE need no
/// CAP_SYS_ADMIN with CAP_BPF (kernel 5.8 on); tested on 6.18.
/// Not kept, in particular: `CAP_DAC_OVERRIDE` (root owns every file the
/// agent touches), `CAP_SETPCAP`, `CAP_SYS_MODULE`, `CAP_SYS_PTRACE`. The
/// HTTP listeners on 10256 and 10249 need nothing: they are above 1023.
pub const AGENT_CAPABILITIES: [Capability; 4] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_PERFMON,
    Capability::CAP_NET_RAW,
];

/// Held only until the pin directory is ready: `CAP_SYS_ADMIN` for
/// mount(2) of bpffs on a host that has not mounted it, and for reading
/// the BTF of the pinned maps (BPF_BTF_GET_FD_BY_ID) to check their layout.
pub const STARTUP_CAPABILITIES: [Capability; 1] = [Capability::CAP_SYS_ADMIN];

/// Kept as well while the agent ends sockets of departed backends in other
/// network namespaces: entering one (`setns`) takes CAP_SYS_ADMIN, and
/// opening another process's namespace CAP_SYS_PTRACE.
pub const SOCKET_TERMINATION_CAPABILITIES: [Capability; 2] =
    [Capability::CAP_SYS_ADMIN, Capability::CAP_SYS_PTRACE];

/// What the agent keeps for good, and what only while it starts.
#[must_use]
pub fn agent_capabilities(terminates_sockets: bool) -> (Vec<Capability>, Vec<Capability>) {
    if terminates_sockets {
        let keep = AGENT_CAPABILITIES
            .iter()
            .chain(&SOCKET_TERMINATION_CAPABILITIES)
            .copied()
            .collect();
        (keep, Vec::new())
    } else {
        (AGENT_CAPABILITIES.to_vec(), STARTUP_CAPABILITIES.to_vec())
    }
}

/// Without these the agent cannot start at all.
const REQUIRED: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "the agent needs root or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN \
         (missing: {missing})"
    )]
    Missing { missing: String },
    #[error("cannot read the capabilities of the agent")]
    Read(#[source] caps::errors::CapsError),
    #[error("cannot drop {capability} from the {set} set")]
    Drop {
        capability: String,
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
}

/// Refuses to start, before anything is made, when the agent cannot do its
/// work: better one clear line than a half-made datapath.
pub fn check() -> Result<(), PrivilegeError> {
    let effective = caps::read(None, CapSet::Effective).map_err(PrivilegeError::Read)?;
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|cap| !effective.contains(cap))
        .map(ToString::to_string)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing {
            missing: missing.join(", "),
        })
    }
}

/// Keeps only `keep` in the bounding set, `keep` and `startup` (of what
/// the agent has) in the permitted and effective sets, and empties the
/// inheritable and ambient sets. The bounding set goes first: dropping from
/// it needs CAP_SETPCAP, which goes with the rest. `startup` goes later,
/// with [`end_startup`], which needs no CAP_SETPCAP.
pub fn drop_to(keep: &[Capability], startup: &[Capability]) -> Result<(), PrivilegeError> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    let bounding = caps::read(None, CapSet::Bounding).map_err(PrivilegeError::Read)?;
    for capability in bounding.difference(&keep) {
        caps::drop(None, CapSet::Bounding, *capability).map_err(|source| PrivilegeError::Drop {
            capability: capability.to_string(),
            set: "bounding",
            source,
        })?;
    }
    caps::clear(None, CapSet::Ambient).map_err(failed("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(failed("inheritable"))?;
    let wanted: CapsHashSet = keep.iter().chain(startup).copied().collect();
    keep_only(&wanted)
}

/// Drops the capabilities needed only to start.
pub fn end_startup(startup: &[Capability]) -> Result<(), PrivilegeError> {
    let mut wanted = caps::read(None, CapSet::Permitted).map_err(PrivilegeError::Read)?;
    for capability in startup {
        wanted.remove(capability);
    }
    keep_only(&wanted)
}

fn keep_only(wanted: &CapsHashSet) -> Result<(), PrivilegeError> {
    let permitted = caps::read(None, CapSet::Permitted).map_err(PrivilegeError::Read)?;
    let kept: CapsHashSet = permitted.intersection(wanted).copied().collect();
    // Effective must stay within permitted, so it shrinks first.
    caps::set(None, CapSet::Effective, &kept).map_err(failed("effective"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(failed("permitted"))?;
    Ok(())
}

fn failed(set: &'static str) -> impl Fn(caps::errors::CapsError) -> PrivilegeError {
    move |source| PrivilegeError::Drop {
        capability: "every other capability".to_owned(),
        set,
        source,
    }
}
