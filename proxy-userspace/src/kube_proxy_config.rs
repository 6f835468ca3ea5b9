//! kube-proxy's own configuration file (`KubeProxyConfiguration`,
//! `kubeproxy.config.k8s.io/v1alpha1`, YAML or JSON), so a cluster that
//! swaps kube-proxy for this agent keeps its ConfigMap.
//!
//! Every field of the real type is known here. The ones this agent acts on
//! come back in [`KubeProxyConfig`]; the ones that mean nothing to it
//! (`mode`, `ipvs.*`, `conntrack.*`, ...) are listed in
//! [`KubeProxyConfig::ignored`] when they hold something other than their
//! zero value, so the agent can say once that it ignores them. A field the
//! real type does not have is an error: it is a typo or a file meant for
//! something else, and guessing would run the node with settings nobody
//! asked for.
//!
//! This module uses only std, serde, thiserror and `crate::cidr`: the
//! deploy test in xtask includes both by path to check the ConfigMap that
//! `deploy/` ships.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::de::DeserializeOwned;
use serde_json::Value;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// kube-proxy's log formats (`logging.format`, `--logging-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// kube-proxy's defaults for the bind addresses given without a port.
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

/// What a KubeProxyConfiguration says that applies to this agent. `None`
/// and empty lists mean the file leaves the setting to its default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeProxyConfig {
    /// `clusterCIDR`: one range, or a comma-separated dual-stack pair.
    pub cluster_cidrs: Vec<Cidr>,
    /// `nodePortAddresses`.
    pub node_port_addresses: Vec<NodePortAddress>,
    /// `iptables.masqueradeAll`.
    pub masquerade_all: bool,
    /// `iptables.masqueradeBit`, 0 to 31.
    pub masquerade_bit: Option<u8>,
    /// `healthzBindAddress`.
    pub healthz_bind_address: Option<SocketAddr>,
    /// `metricsBindAddress`.
    pub metrics_bind_address: Option<SocketAddr>,
    /// `hostnameOverride`: the name of this node's Node object.
    pub hostname_override: Option<String>,
    /// `iptables.minSyncPeriod`. kube-proxy reads 0 as "use the default",
    /// so a zero period is `None` too.
    pub min_sync_period: Option<Duration>,
    /// `logging.format`: `text` or `json`.
    pub logging_format: Option<LogFormat>,
    /// `logging.verbosity`, klog's `-v`.
    pub verbosity: Option<u32>,
    /// Fields of the real type that are set but do not apply to this
    /// agent, as dotted paths (`ipvs.scheduler`), sorted.
    pub ignored: Vec<String>,
}

pub use crate::cidr::Cidr;

/// One entry of `nodePortAddresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(Cidr),
    /// The Node object's primary addresses.
    Primary,
    /// 127.0.0.0/8 and ::1/128.
    Localhost,
    /// Every address.
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the kube-proxy configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the kube-proxy configuration is not valid YAML or JSON")]
    Syntax(#[source] serde_saphyr::Error),
    #[error("the kube-proxy configuration is not an object")]
    NotAnObject,
    #[error(
        "the configuration is apiVersion {api_version:?}, kind {kind:?}; \
         expected apiVersion {API_VERSION}, kind {KIND}"
    )]
    WrongType { api_version: String, kind: String },
    #[error("unknown field {path} (not in {KIND} {API_VERSION})")]
    UnknownField { path: String },
    #[error("field {path} is an object in {KIND}, not {found}")]
    NotAnObjectField { path: String, found: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Reads and parses a KubeProxyConfiguration file.
pub fn load(path: &Path) -> Result<KubeProxyConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text)
}

/// Parses a KubeProxyConfiguration, YAML or JSON.
pub fn parse(text: &str) -> Result<KubeProxyConfig, ConfigError> {
    // JSON is YAML, so one parser reads both.
    let value: Value = serde_saphyr::from_str(text).map_err(ConfigError::Syntax)?;
    let Value::Object(fields) = &value else {
        return Err(ConfigError::NotAnObject);
    };
    let text_of = |key| {
        fields
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (text_of("apiVersion"), text_of("kind"));
    if api_version != API_VERSION || kind != KIND {
        return Err(ConfigError::WrongType { api_version, kind });
    }
    let mut ignored = Vec::new();
    check_fields(fields, TOP_LEVEL, "", &mut ignored)?;
    applicable(&value, ignored)
}

/// Where a field of the real type goes.
enum Field {
    /// Read into [`KubeProxyConfig`].
    Used,
    /// In the real type, but no concern of this agent.
    Ignored,
    /// An object whose own fields are all known.
    Object(&'static [(&'static str, Field)]),
}

use Field::{Ignored, Object, Used};

/// Every field of `KubeProxyConfiguration` (kubernetes
/// staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go), including the
/// ones older releases had, since upgraded clusters still carry them.
const TOP_LEVEL: &[(&str, Field)] = &[
    ("apiVersion", Used),
    ("kind", Used),
    ("featureGates", Ignored),
    (
        "clientConnection",
        Object(&[
            // The agent talks to the API server as its ServiceAccount.
            ("kubeconfig", Ignored),
            ("acceptContentTypes", Ignored),
            ("contentType", Ignored),
            ("qps", Ignored),
            ("burst", Ignored),
        ]),
    ),
    (
        "logging",
        Object(&[
            ("format", Used),
            ("flushFrequency", Ignored),
            ("verbosity", Used),
            ("vmodule", Ignored),
            (
                "options",
                Object(&[("text", Object(LOG_OUTPUT)), ("json", Object(LOG_OUTPUT))]),
            ),
        ]),
    ),
    ("hostnameOverride", Used),
    ("bindAddress", Ignored),
    ("healthzBindAddress", Used),
    ("metricsBindAddress", Used),
    ("bindAddressHardFail", Ignored),
    ("enableProfiling", Ignored),
    ("showHiddenMetricsForVersion", Ignored),
    ("mode", Ignored),
    (
        "iptables",
        Object(&[
            ("masqueradeBit", Used),
            ("masqueradeAll", Used),
            ("localhostNodePorts", Ignored),
            ("snatNodeInternalIP", Ignored),
            ("syncPeriod", Ignored),
            ("minSyncPeriod", Used),
        ]),
    ),
    (
        "ipvs",
        Object(&[
            ("syncPeriod", Ignored),
            ("minSyncPeriod", Ignored),
            ("scheduler", Ignored),
            ("excludeCIDRs", Ignored),
            ("strictARP", Ignored),
            ("tcpTimeout", Ignored),
            ("tcpFinTimeout", Ignored),
            ("udpTimeout", Ignored),
        ]),
    ),
    (
        "nftables",
        Object(&[
            ("masqueradeBit", Ignored),
            ("masqueradeAll", Ignored),
            ("syncPeriod", Ignored),
            ("minSyncPeriod", Ignored),
        ]),
    ),
    (
        "winkernel",
        Object(&[
            ("networkName", Ignored),
            ("sourceVip", Ignored),
            ("enableDSR", Ignored),
            ("rootHnsEndpointName", Ignored),
            ("forwardHealthCheckVip", Ignored),
        ]),
    ),
    ("detectLocalMode", Ignored),
    (
        "detectLocal",
        Object(&[
            ("bridgeInterface", Ignored),
            ("interfaceNamePrefix", Ignored),
        ]),
    ),
    ("clusterCIDR", Used),
    ("nodePortAddresses", Used),
    ("oomScoreAdj", Ignored),
    (
        "conntrack",
        Object(&[
            ("max", Ignored),
            ("maxPerCore", Ignored),
            ("min", Ignored),
            ("tcpEstablishedTimeout", Ignored),
            ("tcpCloseWaitTimeout", Ignored),
            ("tcpBeLiberal", Ignored),
            ("udpTimeout", Ignored),
            ("udpStreamTimeout", Ignored),
        ]),
    ),
    ("configSyncPeriod", Ignored),
    ("portRange", Ignored),
    ("windowsRunAsService", Ignored),
    ("udpIdleTimeout", Ignored),
    ("resourceContainer", Ignored),
];

/// `logging.options.text` and `.json`.
const LOG_OUTPUT: &[(&str, Field)] = &[("splitStream", Ignored), ("infoBufferSize", Ignored)];

/// Fails on a field `schema` does not know; records the ignored fields
/// that are set.
fn check_fields(
    fields: &serde_json::Map<String, Value>,
    schema: &[(&str, Field)],
    prefix: &str,
    ignored: &mut Vec<String>,
) -> Result<(), ConfigError> {
    for (name, value) in fields {
        let path = format!("{prefix}{name}");
        let Some((_, field)) = schema.iter().find(|(known, _)| known == name) else {
            return Err(ConfigError::UnknownField { path });
        };
        match (field, value) {
            (Used, _) | (Object(_), Value::Null) => {}
            (Ignored, value) => {
                if !is_unset(value) {
                    ignored.push(path);
                }
            }
            (Object(schema), Value::Object(inner)) => {
                check_fields(inner, schema, &format!("{path}."), ignored)?;
            }
            (Object(_), other) => {
                return Err(ConfigError::NotAnObjectField {
                    path,
                    found: other.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Whether a value is the zero value Go would write for an unset field
/// (kubeadm writes every field, most of them as `""`, `0s`, `null`).
fn is_unset(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || parse_go_duration(s) == Ok(Duration::ZERO),
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => fields.values().all(is_unset),
    }
}

/// A field that applies, by its dotted path; absent and `null` are `None`.
fn field<T: DeserializeOwned>(
    config: &Value,
    field: &'static str,
) -> Result<Option<T>, ConfigError> {
    match config.pointer(&format!("/{}", field.replace('.', "/"))) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => T::deserialize(value)
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                field,
                reason: e.to_string(),
            }),
    }
}

/// The fields that apply, read and checked.
fn applicable(config: &Value, ignored: Vec<String>) -> Result<KubeProxyConfig, ConfigError> {
    let cluster_cidrs = non_empty(field::<String>(config, "clusterCIDR")?)
        .map(|cidrs| {
            cidrs
                .split(',')
                .map(|cidr| cidr.trim().parse().map_err(invalid("clusterCIDR")))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    let node_port_addresses = field::<Vec<String>>(config, "nodePortAddresses")?
        .unwrap_or_default()
        .iter()
        .map(|entry| entry.parse().map_err(invalid("nodePortAddresses")))
        .collect::<Result<_, _>>()?;
    let masquerade_bit = field::<i64>(config, "iptables.masqueradeBit")?
        .map(|bit| {
            u8::try_from(bit)
                .ok()
                .filter(|bit| *bit <= 31)
                .ok_or_else(|| ConfigError::Invalid {
                    field: "iptables.masqueradeBit",
                    reason: format!("{bit} is not within 0 to 31"),
                })
        })
        .transpose()?;
    let min_sync_period = non_empty(field::<String>(config, "iptables.minSyncPeriod")?)
        .map(|period| parse_go_duration(&period).map_err(invalid("iptables.minSyncPeriod")))
        .transpose()?
        .filter(|period| !period.is_zero());
    Ok(KubeProxyConfig {
        cluster_cidrs,
        node_port_addresses,
        masquerade_all: field(config, "iptables.masqueradeAll")?.unwrap_or(false),
        masquerade_bit,
        healthz_bind_address: bind_address(config, "healthzBindAddress", HEALTHZ_PORT)?,
        metrics_bind_address: bind_address(config, "metricsBindAddress", METRICS_PORT)?,
        // kube-proxy trims and lowercases it the same way.
        hostname_override: non_empty(field::<String>(config, "hostnameOverride")?)
            .map(|name| name.trim().to_lowercase()),
        min_sync_period,
        logging_format: non_empty(field::<String>(config, "logging.format")?)
            .map(|format| match format.as_str() {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                other => Err(ConfigError::Invalid {
                    field: "logging.format",
                    reason: format!("{other:?} is neither \"text\" nor \"json\""),
                }),
            })
            .transpose()?,
        verbosity: field::<i64>(config, "logging.verbosity")?
            .map(|v| {
                u32::try_from(v).map_err(|_| ConfigError::Invalid {
                    field: "logging.verbosity",
                    reason: format!("{v} is not a verbosity (0 or more)"),
                })
            })
            .transpose()?,
        ignored,
    })
}

fn non_empty(text: Option<String>) -> Option<String> {
    text.filter(|t| !t.trim().is_empty())
}

fn invalid(field: &'static str) -> impl Fn(String) -> ConfigError {
    move |reason| ConfigError::Invalid { field, reason }
}

/// `IP:port`, `[IPv6]:port`, or a bare IP with kube-proxy's default port.
fn bind_address(
    config: &Value,
    name: &'static str,
    default_port: u16,
) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(text) = non_empty(field(config, name)?) else {
        return Ok(None);
    };
    let text = text.trim();
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(Some(address));
    }
    text.parse::<IpAddr>()
        .map(|ip| Some(SocketAddr::new(ip, default_port)))
        .map_err(|_| ConfigError::Invalid {
            field: name,
            reason: format!("{text:?} is not an IP address with an optional port"),
        })
}

impl std::fmt::Display for NodePortAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cidr(cidr) => write!(f, "{cidr}"),
            Self::Primary => f.write_str("primary"),
            Self::Localhost => f.write_str("localhost"),
            Self::All => f.write_str("all"),
        }
    }
}

impl FromStr for NodePortAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "primary" => Ok(Self::Primary),
            "localhost" => Ok(Self::Localhost),
            "all" => Ok(Self::All),
            cidr => cidr
                .parse()
                .map(Self::Cidr)
                .map_err(|e| format!("{e}, nor primary, localhost or all")),
        }
    }
}

/// A Go `time.Duration` string: `1s`, `500ms`, `1m30s`, `1.5h`, or `0`.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("{text:?} is not a duration like 1s, 500ms or 1m30s: {why}");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let rest = text.strip_prefix('+').unwrap_or(text);
    if rest.starts_with('-') {
        return Err(bad("it is negative"));
    }
    if rest.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut rest = rest;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| bad("a number has no unit"))?;
        let (number, tail) = rest.split_at(number_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad("unknown unit")),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(bad("a unit has no number"));
        }
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("not a number"));
        }
        let digits = |d: &str| -> Result<u128, String> {
            if d.is_empty() {
                Ok(0)
            } else {
                d.parse().map_err(|_| bad("not a number"))
            }
        };
        let mut part = digits(whole)?
            .checked_mul(unit_nanos)
            .ok_or_else(|| bad("too long"))?;
        // Go keeps the fraction's digits that still count at this unit.
        let mut scale = unit_nanos;
        for digit in fraction.bytes() {
            scale /= 10;
            part += u128::from(digit - b'0') * scale;
        }
        nanos = nanos.checked_add(part).ok_or_else(|| bad("too long"))?;
        rest = tail;
    }
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| bad("too long"))
}

// By path, so the module reads the same when xtask includes it.
#[cfg(test)]
#[path = "kube_proxy_config/tests.rs"]
mod tests;
