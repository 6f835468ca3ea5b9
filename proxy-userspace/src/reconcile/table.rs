//! One frontend table (a services map and its backends map) kept equal to
//! the model's desired state for it, in the manner of Cilium's
//! `bpf_reconciler`: the reconciler owns what is still to be written (the
//! frontends changed since the last pass, and those whose write failed),
//! the retry of failures with backoff, and the choice between a pass over
//! the changed frontends and a pass over everything. The socket programs'
//! table and the tc programs' are two instances of it.
//!
//! What a pass did that others must follow is handed out as
//! [`TableEvent`]s: a slot that went (its translation count is over) and a
//! backend that left a frontend (sockets translated to it must end). The
//! jobs that follow them subscribe to the events, not to the writer.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use aya::maps::MapError;
use proxy_common::{Backend, ServiceKey, ServiceValue};
use tracing::{debug, warn};

use super::writer::{ApplyStats, MapWriter};
use crate::{
    maps::{encoding::MapAddress, table::Table},
    model::{DesiredState, L4Addr},
};

/// The first retry of a failed write comes after this, then twice as long
/// each time, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// When a table's failed writes go again: after [`RETRY_FIRST`], then
/// twice as long each time they fail again, up to [`RETRY_MAX`]; a pass
/// without failures starts over.
#[derive(Debug)]
pub struct Retry {
    /// `None` while nothing waits for a retry.
    at: Option<Instant>,
    delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            at: None,
            delay: RETRY_FIRST,
        }
    }
}

impl Retry {
    /// When failed writes are due again.
    #[must_use]
    pub const fn at(&self) -> Option<Instant> {
        self.at
    }

    /// Whether failed writes are held back until [`Retry::at`].
    #[must_use]
    pub const fn is_waiting(&self) -> bool {
        self.at.is_some()
    }

    /// Lets failed writes go again once their time has come.
    pub fn wake(&mut self, now: Instant) {
        if self.at.is_some_and(|at| at <= now) {
            self.at = None;
        }
    }

    /// A pass of `table` ended with `failures` writes failed.
    pub fn settle(&mut self, table: &'static str, failures: usize) {
        if failures == 0 {
            *self = Self::default();
            return;
        }
        warn!(
            table,
            failed = failures,
            retry_in_ms = self.delay.as_millis(),
            "some writes failed; retrying"
        );
        self.at = Some(Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(RETRY_MAX);
    }
}

/// What a pass changed that other jobs follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEvent<A: MapAddress> {
    /// A slot was deleted or given another backend: what was counted
    /// under it is over.
    SlotGone(ServiceKey<A>),
    /// A frontend no longer has this backend (written: the frontend's
    /// write succeeded).
    BackendLeft { frontend: L4Addr, backend: L4Addr },
}

/// What one [`TableReconciler::reconcile`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Entries written or deleted.
    pub changes: usize,
    /// Frontends left as they were after a failure, and failures not tied
    /// to a frontend; all are retried.
    pub failures: usize,
    /// Frontends the pass looked at.
    pub looked_at: usize,
    /// Whether it compared everything (kube-proxy's full sync) rather than
    /// the changes (a partial one).
    pub full: bool,
}

/// What a table of one family still owes the desired state, and when it
/// may try: shared by the frontend tables and the source-range trie.
#[derive(Debug)]
pub struct Owed<A> {
    /// Frontends changed since the last pass, or whose write failed.
    pub(super) pending: BTreeSet<L4Addr>,
    /// A pass over everything is owed: the first complete view, a change
    /// of completeness, or a failure not tied to one frontend.
    pub(super) full_pass: bool,
    /// Whether a pass over everything deletes what nothing desires: only
    /// while the source's view is complete, or a file that does not parse
    /// would take its Services down.
    pub(super) prune: bool,
    pub(super) retry: Retry,
    family: std::marker::PhantomData<A>,
}

impl<A> Default for Owed<A> {
    fn default() -> Self {
        Self {
            pending: BTreeSet::new(),
            full_pass: false,
            prune: false,
            retry: Retry::default(),
            family: std::marker::PhantomData,
        }
    }
}

impl<A: MapAddress> Owed<A> {
    /// The source's view became complete (`true`) or incomplete: the next
    /// pass compares everything, and deletes what nothing desires only
    /// when complete.
    pub fn view(&mut self, complete: bool) {
        self.full_pass = true;
        self.prune = complete;
    }

    /// These frontends' desired state changed; those of the other family
    /// are passed over.
    pub fn changed(&mut self, frontends: impl IntoIterator<Item = L4Addr>) {
        self.pending.extend(
            frontends
                .into_iter()
                .filter(|frontend| frontend.service_key::<A>().is_some()),
        );
    }

    /// Whether a pass now would do something: a full pass is owed, or
    /// frontends wait and no retry timer holds them back.
    #[must_use]
    pub fn has_work(&self) -> bool {
        self.full_pass || (!self.pending.is_empty() && !self.retry.is_waiting())
    }

    /// When failed writes are due again.
    #[must_use]
    pub const fn retry_at(&self) -> Option<Instant> {
        self.retry.at()
    }

    /// Lets failed writes go again once their time has come.
    pub fn wake(&mut self, now: Instant) {
        self.retry.wake(now);
    }
}

/// One frontend table of one family and what it still owes the desired
/// state. Its frontends are the desired state's of its family; changes
/// of the other family's are passed over, so one list of changes feeds
/// both families' instances.
pub struct TableReconciler<A: MapAddress, S, B> {
    /// For the log: which table.
    name: &'static str,
    writer: MapWriter<A, S, B>,
    pub owed: Owed<A>,
    /// Whether [`TableEvent::BackendLeft`] is wanted: finding them costs a
    /// look at each changed frontend's backends before it is written.
    report_departures: bool,
}

impl<A, S, B> TableReconciler<A, S, B>
where
    A: MapAddress,
    S: Table<ServiceKey<A>, ServiceValue<A>>,
    B: Table<u32, Backend<A>>,
{
    /// Takes over the table with whatever it already holds; nothing is
    /// written before the first [`Owed::view`].
    pub fn adopt(name: &'static str, services: S, backends: B) -> Result<Self, MapError> {
        Ok(Self {
            name,
            writer: MapWriter::adopt(services, backends)?,
            owed: Owed::default(),
            report_departures: false,
        })
    }

    /// Hands out [`TableEvent::BackendLeft`] from now on.
    pub const fn report_departures(&mut self) {
        self.report_departures = true;
    }

    /// Brings the table to `desired`: everything when a full pass is owed,
    /// else the frontends pending. What went is appended to `events`.
    pub fn reconcile(&mut self, desired: &DesiredState, events: &mut Vec<TableEvent<A>>) -> Pass {
        let full = std::mem::take(&mut self.owed.full_pass);
        let looked_at;
        let departures;
        let stats = if full {
            looked_at = desired.frontends.len();
            // Which sockets a full pass strands is unknown: only a change
            // says which backend left.
            departures = Vec::new();
            self.writer.apply_all(desired, self.owed.prune)
        } else {
            looked_at = self.owed.pending.len();
            departures = if self.report_departures {
                self.departures(desired)
            } else {
                Vec::new()
            };
            self.writer.apply_changed(desired, &self.owed.pending)
        };
        events.extend(
            self.writer
                .take_slots_gone()
                .into_iter()
                .map(TableEvent::SlotGone),
        );
        events.extend(
            departures
                .into_iter()
                .filter(|(frontend, _)| !stats.failed.contains(frontend))
                .map(|(frontend, backend)| TableEvent::BackendLeft { frontend, backend }),
        );
        self.settle(&stats);
        Pass {
            changes: stats.changes(),
            failures: stats.failures(),
            looked_at,
            full,
        }
    }

    /// Keeps what failed for a retry after a backoff; failures not tied to
    /// one frontend owe a full pass.
    fn settle(&mut self, stats: &ApplyStats) {
        self.owed.pending.clone_from(&stats.failed);
        if stats.other_failures > 0 {
            self.owed.full_pass = true;
        }
        self.owed.retry.settle(self.name, stats.failures());
        if stats.failures() > 0 {
            debug!(table = self.name, frontends = ?stats.failed, "failed frontends");
        }
    }

    /// The backends the table gives each pending frontend that `desired`
    /// no longer does.
    fn departures(&self, desired: &DesiredState) -> Vec<(L4Addr, L4Addr)> {
        let mut out = Vec::new();
        for frontend in &self.owed.pending {
            // A set: a frontend may hold tens of thousands of backends.
            let staying: BTreeSet<&L4Addr> = desired
                .frontends
                .get(frontend)
                .map(|f| f.backends.iter().collect())
                .unwrap_or_default();
            for backend in self.writer.backends_of(*frontend) {
                if let Some(backend) = L4Addr::from_backend(backend)
                    && !staying.contains(&backend)
                {
                    out.push((*frontend, backend));
                }
            }
        }
        out
    }

    /// Whether the table holds the frontend of `slot` (any of its slots).
    #[must_use]
    pub fn holds_frontend(&self, slot: ServiceKey<A>) -> bool {
        self.writer.holds_frontend(slot)
    }

    /// How many frontends and backends the table holds.
    #[must_use]
    pub fn sizes(&self) -> (usize, usize) {
        self.writer.sizes()
    }

    /// How many entries the services map holds.
    #[must_use]
    pub fn service_entries(&self) -> usize {
        self.writer.service_entries()
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use super::*;
    use crate::reconcile::writer::tests::{Backends, Kernel, Services, state, tcp};

    fn table(
        kernel: &Rc<RefCell<Kernel>>,
    ) -> TableReconciler<proxy_common::Ip4, Services, Backends> {
        TableReconciler::adopt("test", Services(kernel.clone()), Backends(kernel.clone())).unwrap()
    }

    #[test]
    fn nothing_is_written_before_a_view_and_a_view_owes_a_full_pass() {
        let kernel = Rc::default();
        let mut table = table(&kernel);
        assert!(!table.owed.has_work());
        table.owed.view(true);
        assert!(table.owed.has_work());
        let desired = state(&[(tcp(100, 80), &[tcp(1, 8080)])]);
        let pass = table.reconcile(&desired, &mut Vec::new());
        assert_eq!((pass.changes, pass.failures, pass.looked_at), (3, 0, 1));
        assert!(!table.owed.has_work());
    }

    #[test]
    fn a_changed_pass_reports_the_slots_and_backends_that_went() {
        let kernel = Rc::default();
        let mut table = table(&kernel);
        table.report_departures();
        let frontend = tcp(100, 80);
        table.owed.view(true);
        table.reconcile(
            &state(&[(frontend, &[tcp(1, 8080), tcp(2, 8080)])]),
            &mut Vec::new(),
        );
        table.owed.changed([frontend]);
        let mut events = Vec::new();
        table.reconcile(&state(&[(frontend, &[tcp(1, 8080)])]), &mut events);
        assert!(
            events.contains(&TableEvent::BackendLeft {
                frontend,
                backend: tcp(2, 8080)
            }),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, TableEvent::SlotGone(slot) if slot.backend_slot == 2)),
            "{events:?}"
        );
    }

    #[test]
    fn failed_frontends_wait_for_their_retry_and_are_written_then() {
        let kernel: Rc<RefCell<Kernel>> = Rc::default();
        let mut table = table(&kernel);
        table.owed.view(true);
        table.reconcile(&state(&[]), &mut Vec::new());
        // Room for nothing: the frontend's write fails.
        kernel.borrow_mut().services_capacity = Some(0);
        let frontend = tcp(100, 80);
        let desired = state(&[(frontend, &[tcp(1, 8080)])]);
        table.owed.changed([frontend]);
        let pass = table.reconcile(&desired, &mut Vec::new());
        assert!(pass.failures > 0);
        let retry_at = table.owed.retry_at().expect("a retry is due");
        assert!(!table.owed.has_work(), "held back until the retry");
        kernel.borrow_mut().services_capacity = None;
        table.owed.wake(retry_at);
        assert!(table.owed.has_work());
        let pass = table.reconcile(&desired, &mut Vec::new());
        assert_eq!(pass.failures, 0);
        assert_eq!(table.owed.retry_at(), None);
        assert_eq!(kernel.borrow().view()[&frontend], [tcp(1, 8080)]);
    }
}
