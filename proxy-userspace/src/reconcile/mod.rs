//! What keeps the node equal to the model.
//!
//! - [`table::TableReconciler`]: one instance per frontend table (the
//!   socket programs' and the tc programs'), each owning what it still has
//!   to write, retries with backoff, and full versus changed passes; it
//!   hands out [`table::TableEvent`]s for the jobs that follow slots and
//!   backends (the per-slot counts, the sockets of departed backends).
//! - [`writer::MapWriter`]: the diff engine under a table, the only code
//!   that writes the service maps.
//! - [`source_ranges::SourceRangeTable`]: each family's
//!   loadBalancerSourceRanges trie, written around the tc table's pass.
//! - [`counts::SlotCounts`]: the per-slot counts end with their slots.
//! - [`masquerade::Masquerade`]: the iptables masquerade rules, which do
//!   not depend on the Services, checked and repaired on a timer of their
//!   own.

pub mod counts;
pub mod filters;
pub mod masquerade;
pub mod source_ranges;
pub mod table;
pub mod writer;
