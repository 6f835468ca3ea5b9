//! The agent's log on stderr: text, or JSON with one object per line
//! (kube-proxy's `--logging-format` and `logging.format`), at the level
//! `RUST_LOG` names, else the one `-v N` (`logging.verbosity`) maps to as
//! klog's verbosity reads: up to 2 the steady-state information, 3 to 5
//! debugging, 6 and up everything.
//!
//! Logging starts before the arguments are read, so that nothing said while
//! reading them is lost; the format and level are then set in place.

use tracing_subscriber::{
    EnvFilter, Layer, Registry, layer::Layered, layer::SubscriberExt as _, reload,
    util::SubscriberInitExt as _,
};

pub use crate::kube_proxy_config::LogFormat;

/// How the log is written, as the flags and the configuration file say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// klog's `-v`; `None` for the default level.
    pub verbosity: Option<u32>,
}

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Format = Box<dyn Layer<Filtered> + Send + Sync>;

/// The running log, whose format and level can still change.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<Format, Filtered>,
}

/// Starts logging as text at the default level.
#[must_use]
pub fn init() -> Logging {
    let (filter, filter_handle) = reload::Layer::new(filter(None));
    let (format, format_handle) = reload::Layer::new(layer(LogFormat::Text));
    tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .init();
    Logging {
        filter: filter_handle,
        format: format_handle,
    }
}

impl Logging {
    /// Writes from now on as `settings` say.
    pub fn apply(&self, settings: LogSettings) {
        // Only a subscriber that was dropped refuses, and this one lives as
        // long as the process.
        let _ = self.filter.reload(filter(settings.verbosity));
        let _ = self.format.reload(layer(settings.format));
    }
}

/// `RUST_LOG` when set, else the level `verbosity` maps to.
fn filter(verbosity: Option<u32>) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| level(verbosity).into())
}

/// klog's verbosity as a filter. notify says at info when a watched
/// directory is removed, which the agent reports itself (the pin
/// directory).
fn level(verbosity: Option<u32>) -> &'static str {
    match verbosity.unwrap_or(0) {
        0..=2 => "info,notify=warn",
        3..=5 => "debug,notify=warn",
        _ => "trace",
    }
}

fn layer(format: LogFormat) -> Format {
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        // The message and fields at the top level, as klog's JSON has
        // them.
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_maps_as_klogs_does() {
        assert_eq!(level(None), "info,notify=warn");
        assert_eq!(level(Some(2)), "info,notify=warn");
        assert_eq!(level(Some(4)), "debug,notify=warn");
        assert_eq!(level(Some(9)), "trace");
    }
}
