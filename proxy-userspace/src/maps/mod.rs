//! The map format, in one place for everyone who reads or writes the pinned
//! maps: where they are pinned ([`pins`]), how model types become their keys
//! and values ([`encoding`]), and how they are opened and read as tables
//! ([`table`]). The writer and the listing both use this module; neither
//! depends on the other.

pub mod encoding;
pub mod error;
pub mod pins;
pub mod table;

pub use error::MapsError;
pub use pins::{Pins, PinsError};
pub use table::{
    BatchError, Counts, FrontendSlots, ServiceMaps, SizedTable, SourceRanges, Table, open_pinned,
    open_pinned_counts, open_pinned_events, open_pinned_external, open_pinned_source_ranges,
    read_frontends, slot_count,
};
