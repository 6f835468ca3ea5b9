//! Everything that changes the node to match the desired state, behind one
//! trait: the service maps ([`ebpf`]) and the iptables masquerade fallback
//! ([`iptables`]). The agent's loop hands each the same [`Desired`] and
//! reads the same [`Report`]. The tc programs' maps are a second map
//! writer, handed the outside frontends as its `services`.

use std::collections::BTreeSet;

use crate::model::{DesiredState, L4Addr};

pub mod ebpf;
pub mod iptables;

/// What the node should look like, and how much of it to look at.
pub struct Desired<'a> {
    /// The frontends a map writer serves: the socket programs' (ClusterIPs,
    /// and outside frontends for the node's own sockets), or the tc
    /// programs'.
    pub services: &'a DesiredState,
    pub scope: Scope<'a>,
}

/// How much of the desired state a reconciler must compare.
pub enum Scope<'a> {
    /// Everything; with `prune`, what nothing desires is removed.
    All { prune: bool },
    /// Only these frontends changed since the last apply.
    Changed(&'a BTreeSet<L4Addr>),
}

/// What one apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Entries or rules written or removed.
    pub changes: usize,
    /// Frontends left as they were after a failure, to apply again.
    pub failed: BTreeSet<L4Addr>,
    /// Failures not tied to one frontend: the next apply compares all.
    pub other_failures: usize,
}

impl Report {
    #[must_use]
    pub fn failures(&self) -> usize {
        self.failed.len() + self.other_failures
    }
}

/// Something on the node that is kept equal to the desired state.
pub trait Reconciler {
    /// Brings the node to `desired`, changing only what differs.
    fn apply(&mut self, desired: &Desired<'_>) -> Report;
}
