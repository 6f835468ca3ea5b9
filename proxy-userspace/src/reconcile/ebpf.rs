//! The service maps as a [`Reconciler`]: the map writer does the work.

use proxy_common::{Backend, ServiceKey, ServiceValue};

use super::{Desired, Reconciler, Report, Scope};
use crate::{maps::table::Table, writer::MapWriter};

impl<S, B> Reconciler for MapWriter<S, B>
where
    S: Table<ServiceKey, ServiceValue>,
    B: Table<u32, Backend>,
{
    fn apply(&mut self, desired: &Desired<'_>) -> Report {
        let stats = match desired.scope {
            Scope::All { prune } => self.apply_all(desired.services, prune),
            Scope::Changed(changed) => self.apply_changed(desired.services, changed),
        };
        if stats.failures() > 0 {
            tracing::debug!(failures = stats.failures(), "some map writes failed");
        }
        Report {
            changes: stats.changes(),
            failed: stats.failed,
            other_failures: stats.other_failures,
        }
    }
}
