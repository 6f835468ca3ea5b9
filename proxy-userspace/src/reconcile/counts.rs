//! The per-slot translation counts end with their slots: a side job that
//! follows the tables' [`TableEvent::SlotGone`].
//!
//! The socket programs and the tc programs count under scopes of their
//! own. A socket-table slot's ClusterIP may have been counted by the tc
//! programs too (traffic from outside reaching a ClusterIP is served from
//! the socket programs' table). The socket table's NodePorts, externalIPs
//! and load-balancer IPs (for the node's own sockets) are frontends of the
//! tc table as well, under the same keys but with slots of their own: the
//! tc programs' counts of those are the tc table's, and end only with its
//! slots.

use proxy_common::{COUNTED_BY_SOCKETS, COUNTED_BY_TC, ServiceKey};

use super::table::TableEvent;
use crate::maps::{Counts, encoding::MapAddress};

/// One family's counts map, kept to the slots that exist.
pub struct SlotCounts<A: MapAddress>(Counts<A>);

impl<A: MapAddress> SlotCounts<A> {
    #[must_use]
    pub const fn new(counts: Counts<A>) -> Self {
        Self(counts)
    }

    /// Deletes the counts of the slots that went: `socket_table` and
    /// `tc_table` are the two tables' events of one pass, and
    /// `tc_holds_frontend` says whether the tc table (after its pass) still
    /// holds the frontend of a slot.
    pub fn forget(
        &mut self,
        socket_table: &[TableEvent<A>],
        tc_table: &[TableEvent<A>],
        tc_holds_frontend: impl Fn(ServiceKey<A>) -> bool,
    ) {
        for slot in slots_gone(socket_table) {
            self.remove(slot, COUNTED_BY_SOCKETS);
            if !tc_holds_frontend(slot) {
                self.remove(slot, COUNTED_BY_TC);
            }
        }
        for slot in slots_gone(tc_table) {
            self.remove(slot, COUNTED_BY_TC);
        }
    }

    fn remove(&mut self, slot: ServiceKey<A>, scope: u8) {
        // Most slots of a scope were never counted: no entry.
        let _ = self.0.remove(&ServiceKey { scope, ..slot });
    }
}

fn slots_gone<A: MapAddress>(events: &[TableEvent<A>]) -> impl Iterator<Item = ServiceKey<A>> + '_ {
    events.iter().filter_map(|event| match event {
        TableEvent::SlotGone(slot) => Some(*slot),
        TableEvent::BackendLeft { .. } => None,
    })
}
