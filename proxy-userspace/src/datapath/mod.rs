//! Loading, pinning and attaching the eBPF programs and maps.
//!
//! Everything lives under one bpffs directory:
//! `maps/<name>` for the maps (versioned names, see `proxy_common`) and
//! `links/<program>` for the cgroup links and `links/<program>@<device>`
//! for the tc links (TCX; where the kernel has no TCX, clsact filters,
//! which stay attached without a pin). Pinned links keep the programs
//! attached while no agent runs; a starting agent reuses the pinned maps and
//! swaps its programs into the pinned links atomically, so a restart or an
//! upgrade never leaves a socket without a program.
//!
//! A pinned map is adopted only if the kernel's definition of it (type, key
//! and value sizes, flags, and the key and value types in its BTF when it
//! has any) is the one the programs were built for; anything else would
//! make the programs misread it.

use aya::{Ebpf, maps::Map};
use proxy_common::{Backend, PROGRAMS, ServiceKey, ServiceValue};
use tracing::info;

use crate::maps::{
    Counts, MapsError, Pins, PinsError, SizedTable, SourceRanges,
    encoding::MapAddress,
    table::{Filter, Flows, typed_map},
};

mod attach;
pub mod btf;
mod cleanup;
mod guard;
mod held;
mod layout;
mod load;

pub use attach::{AttachError, check_cgroup, tc_links};
pub use cleanup::{CleanupError, cleanup};
pub use guard::GuardWatch;
pub use held::HoldError;
pub use layout::{LayoutError, check_pinned_maps};
pub use load::{LoadError, MapSizes, ProgramSettings, probe_load, size_flag};

/// The object built from proxy-ebpf by build.rs. Every map of
/// [`proxy_common::MAPS`] is pinned: a restarted agent's programs carry on
/// with the same services, reverse translations and counters.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PROXY_EBPF_OBJECT"));

/// Why the datapath could not be loaded, attached or removed; each concern
/// has its own error, with its own advice.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Pins(#[from] PinsError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Hold(#[from] HoldError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
}

/// One family's service maps as a writer gets them (the socket
/// programs', or the tc programs'): a full map says which flag sizes it.
pub struct WritableMaps<A: MapAddress> {
    pub services: SizedTable<ServiceKey<A>, ServiceValue<A>>,
    pub backends: SizedTable<u32, Backend<A>>,
}

/// The loaded object: programs loaded into the kernel, maps created or
/// reused from their pins.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    /// `--tcx`: TCX links where the kernel has them; else clsact filters.
    tcx: bool,
    /// The agent's own descriptors of its maps and links: the programs
    /// stay attached while it runs, whatever happens to the pins, and what
    /// is unpinned under it is pinned again from these.
    held: held::Held,
}

impl Datapath {
    /// Hands out one family's tc frontend maps, for their writer.
    pub fn take_external_maps<A: MapAddress>(&mut self) -> Result<WritableMaps<A>, DatapathError> {
        Ok(WritableMaps {
            services: self.take_table(A::MAPS.ext_services)?,
            backends: self.take_table(A::MAPS.ext_backends)?,
        })
    }

    /// The programs' log records (`run --trace`), forwarded to `tracing`
    /// under the target `ebpf` each time the returned reader is flushed.
    pub fn trace_reader(&mut self) -> Result<aya_log::EbpfLogger<TraceLog>, DatapathError> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, TraceLog)
            .map_err(|error| LoadError::Trace(error).into())
    }

    /// Hands out the per-slot counts, for the agent to delete those of
    /// slots that go.
    pub fn take_counts<A: MapAddress>(&mut self) -> Result<Counts<A>, DatapathError> {
        let name = A::MAPS.counts;
        let map = self.take_map(name)?;
        Ok(Counts::try_from(map).map_err(|source| MapsError::Open { name, source })?)
    }

    /// Hands out the tc programs' address filters and both families' flow
    /// tables, whose flows keep their bits.
    pub fn take_filters(&mut self) -> Result<crate::reconcile::filters::Filters, DatapathError> {
        let mut typed = |name: &'static str| -> Result<Map, DatapathError> { self.take_map(name) };
        let (frontends, backends, flows4, flows6) = (
            typed(proxy_common::FRONTEND_FILTER_MAP)?,
            typed(proxy_common::BACKEND_FILTER_MAP)?,
            typed(proxy_common::FLOWS_MAP)?,
            typed(proxy_common::FLOWS6_MAP)?,
        );
        let open = |name: &'static str| move |source| MapsError::Open { name, source };
        Ok(crate::reconcile::filters::Filters::adopt(
            Filter::try_from(frontends).map_err(open(proxy_common::FRONTEND_FILTER_MAP))?,
            Filter::try_from(backends).map_err(open(proxy_common::BACKEND_FILTER_MAP))?,
            Flows::try_from(flows4).map_err(open(proxy_common::FLOWS_MAP))?,
            Flows::try_from(flows6).map_err(open(proxy_common::FLOWS6_MAP))?,
        ))
    }

    /// Hands out one family's loadBalancerSourceRanges trie, for its table.
    pub fn take_source_ranges<A: MapAddress>(&mut self) -> Result<SourceRanges<A>, DatapathError> {
        let name = A::MAPS.source_ranges;
        let map = self.take_map(name)?;
        Ok(SourceRanges::try_from(map).map_err(|source| MapsError::Open { name, source })?)
    }

    /// Hands out one family's socket frontend maps, for their writer.
    pub fn take_service_maps<A: MapAddress>(&mut self) -> Result<WritableMaps<A>, DatapathError> {
        Ok(WritableMaps {
            services: self.take_table(A::MAPS.services)?,
            backends: self.take_table(A::MAPS.backends)?,
        })
    }

    /// One hash map, typed, with the flag that sizes it.
    fn take_table<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<SizedTable<K, V>, DatapathError> {
        Ok(SizedTable::new(
            typed_map(self.take_map(name)?, name)?,
            name,
            size_flag(name),
        ))
    }

    fn take_map(&mut self, name: &'static str) -> Result<Map, DatapathError> {
        self.ebpf.take_map(name).ok_or_else(|| {
            MapsError::Missing {
                name,
                path: self.pins.map(name),
            }
            .into()
        })
    }
}

/// Hands the programs' log records to `tracing`.
pub struct TraceLog;

impl log::Log for TraceLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        info!(target: "ebpf", "{}", record.args());
    }

    fn flush(&self) {}
}

/// The cgroup programs, by the names of their functions (and of their
/// pinned links), for `doctor`.
#[must_use]
pub fn program_names() -> &'static [&'static str] {
    &PROGRAMS
}
