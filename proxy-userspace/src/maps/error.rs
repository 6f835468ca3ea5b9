//! Why a pinned map could not be opened as a table.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing at {path}")]
    Missing { name: &'static str, path: PathBuf },
    #[error("cannot open map {name}")]
    Open {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}
