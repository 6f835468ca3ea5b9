//! One family's frontend tables, the socket programs' and the tc
//! programs' (with its loadBalancerSourceRanges), with the per-slot counts
//! that follow them. The agent keeps one for IPv4 and one for IPv6: the
//! same code over maps of their own.

use std::time::Instant;

use proxy_common::{Backend, ServiceKey, ServiceValue};
use tracing::{info, warn};

use super::AgentError;
use crate::{
    datapath::Datapath,
    maps::{SizedTable, SourceRanges, encoding::MapAddress},
    model::{Changes, Model},
    reconcile::{
        counts::SlotCounts,
        source_ranges::SourceRangeTable,
        table::{Pass, TableEvent, TableReconciler},
    },
};

/// A frontend table: a services map and its backends map.
pub type FrontendTable<A> =
    TableReconciler<A, SizedTable<ServiceKey<A>, ServiceValue<A>>, SizedTable<u32, Backend<A>>>;

pub struct FamilyTables<A: MapAddress> {
    /// The socket programs' table: ClusterIPs, and the outside frontends
    /// as the node's own sockets reach them.
    pub sockets: FrontendTable<A>,
    /// The tc programs' table: NodePorts, externalIPs and load-balancer
    /// IPs reached from outside.
    pub tc: FrontendTable<A>,
    /// The tc frontends' loadBalancerSourceRanges, written around `tc`.
    pub source_ranges: SourceRangeTable<A, SourceRanges<A>>,
    /// Follows the tables' slots; `None` when the map cannot be opened.
    counts: Option<SlotCounts<A>>,
}

/// What one family's pass did.
pub struct FamilyPass<A: MapAddress> {
    pub sockets: Pass,
    pub tc: Pass,
    pub source_ranges: Pass,
    /// The socket table's events, for the sockets of departed backends.
    pub socket_events: Vec<TableEvent<A>>,
}

impl<A: MapAddress> FamilyTables<A> {
    /// Takes over this family's pinned maps, with whatever they hold.
    pub fn adopt(datapath: &mut Datapath) -> Result<Self, AgentError> {
        let family = A::MAPS.family;
        let maps = datapath.take_service_maps::<A>()?;
        let sockets = TableReconciler::adopt(family, maps.services, maps.backends)
            .map_err(AgentError::Adopt)?;
        let maps = datapath.take_external_maps::<A>()?;
        let tc = TableReconciler::adopt(family, maps.services, maps.backends)
            .map_err(AgentError::Adopt)?;
        let source_ranges =
            SourceRangeTable::adopt(A::MAPS.source_ranges, datapath.take_source_ranges::<A>()?)
                .map_err(AgentError::Adopt)?;
        let counts = datapath
            .take_counts::<A>()
            .inspect_err(|error| warn!(family, error = %crate::report::chain(error), "the per-slot counts are not kept tidy"))
            .ok()
            .map(SlotCounts::new);
        let (frontends, backends) = sockets.sizes();
        let (external, _) = tc.sizes();
        info!(
            frontends,
            backends,
            external,
            source_ranges = source_ranges.entries(),
            family,
            "adopted the pinned maps"
        );
        Ok(Self {
            sockets,
            tc,
            source_ranges,
            counts,
        })
    }

    /// See [`TableReconciler::view`].
    pub fn view(&mut self, complete: bool) {
        self.sockets.owed.view(complete);
        self.tc.owed.view(complete);
        self.source_ranges.owed.view(complete);
    }

    /// The model's changes; those of the other family are passed over.
    pub fn changed(&mut self, changes: &Changes) {
        self.sockets.owed.changed(changes.sockets.iter().copied());
        self.tc.owed.changed(changes.tc.iter().copied());
        self.source_ranges.owed.changed(changes.tc.iter().copied());
    }

    pub fn has_work(&self) -> bool {
        self.sockets.owed.has_work()
            || self.tc.owed.has_work()
            || self.source_ranges.owed.has_work()
    }

    pub fn retry_at(&self) -> Option<Instant> {
        [
            self.sockets.owed.retry_at(),
            self.tc.owed.retry_at(),
            self.source_ranges.owed.retry_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn wake(&mut self, now: Instant) {
        self.sockets.owed.wake(now);
        self.tc.owed.wake(now);
        self.source_ranges.owed.wake(now);
    }

    /// Brings both tables up to the model, and ends the counts of the
    /// slots that went.
    pub fn reconcile(&mut self, model: &Model) -> FamilyPass<A> {
        let (mut socket_events, mut tc_events) = (Vec::new(), Vec::new());
        let sockets = self.sockets.reconcile(model.desired(), &mut socket_events);
        // A frontend's ranges are in before its flag, and out after it.
        let ranges_added = self.source_ranges.add(model.external());
        let tc = self.tc.reconcile(model.tc_desired(), &mut tc_events);
        let source_ranges = self.source_ranges.remove_leaving(ranges_added);
        if let Some(counts) = &mut self.counts {
            counts.forget(&socket_events, &tc_events, |slot| {
                self.tc.holds_frontend(slot)
            });
        }
        FamilyPass {
            sockets,
            tc,
            source_ranges,
            socket_events,
        }
    }
}
