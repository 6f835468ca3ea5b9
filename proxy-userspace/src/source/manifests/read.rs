//! Reading and parsing one manifest file, safely whatever the file holds.
//!
//! A manifest directory is input the agent does not control, and one bad
//! file must cost neither time nor memory that the other files need. So a
//! file is opened without ever blocking (a FIFO or a device is refused, not
//! waited on), read up to a size limit, and parsed under budgets for
//! nesting depth, alias expansion, documents and nodes that are checked
//! while parsing, so a hostile file is refused after at most its own size
//! in work. The error says which limit a file hit.
//!
//! Kubernetes objects are read as `kubectl` writes them: multi-document
//! YAML, a JSON object or a stream of them, and `List`s (`kind: List`,
//! `ServiceList`, ...). Objects of other kinds are counted, so the caller
//! can say what it ignored.

use std::{
    collections::BTreeMap,
    fmt,
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::Value;

/// No manifest is near this; a bigger file is refused before it is read.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Kubernetes objects nest about ten levels deep.
pub const MAX_DEPTH: usize = 64;
/// Events that aliases (`*name`) may replay, all of a file's together:
/// manifests rarely use aliases, and this keeps a small file from
/// expanding into gigabytes.
pub const MAX_ALIAS_EVENTS: usize = 25_000;
/// Documents (YAML) or top-level objects (JSON) in a file.
pub const MAX_DOCUMENTS: usize = 10_000;
/// Nodes (mappings, sequences, scalars; JSON: values and keys) in a file,
/// aliases expanded: room for about 500 Services as `kubectl get -o yaml`
/// prints them (managedFields and all), or 2,000 written by hand. It bounds
/// the time and memory of a file's parse, which holds up other edits: a
/// file at this limit is refused in about 0.05 s (0.3 s in a debug build).
pub const MAX_NODES: usize = 50_000;

/// The limit a file hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Size,
    Depth,
    Aliases,
    Documents,
    Nodes,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Size => write!(f, "size limit ({} MiB)", MAX_FILE_BYTES >> 20),
            Self::Depth => write!(f, "depth limit ({MAX_DEPTH} levels of nesting)"),
            Self::Aliases => write!(
                f,
                "alias limit (aliases may expand to {MAX_ALIAS_EVENTS} events)"
            ),
            Self::Documents => write!(f, "documents limit ({MAX_DOCUMENTS} per file)"),
            Self::Nodes => write!(f, "nodes limit ({MAX_NODES} per file)"),
        }
    }
}

/// Why a file could not be read. Each message reads after the file's name.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot open it: {source}")]
    Open { source: io::Error },
    #[error("cannot read it: {source}")]
    Read { source: io::Error },
    #[error("not a regular file but a {kind}")]
    NotRegularFile { kind: &'static str },
    #[error("over the {limit}: {detail}")]
    Limit { limit: Limit, detail: String },
    #[error("not UTF-8 text (invalid bytes at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("invalid {format}: {detail}")]
    Syntax {
        format: &'static str,
        detail: String,
    },
    #[error("{at}: not a Kubernetes object (no apiVersion and kind)")]
    NotAnObject { at: String },
    #[error("{at}: {kind} has no list of items")]
    NoItems { at: String, kind: String },
    #[error("{at}: {kind} {name}: {detail}")]
    Object {
        at: String,
        kind: String,
        name: String,
        detail: String,
    },
}

impl ManifestError {
    /// The limit the file hit, if that is what is wrong with it.
    #[cfg(test)]
    #[must_use]
    pub fn limit(&self) -> Option<Limit> {
        match self {
            Self::Limit { limit, .. } => Some(*limit),
            _ => None,
        }
    }

    fn limit_of(limit: Limit, detail: impl fmt::Display) -> Self {
        Self::Limit {
            limit,
            detail: detail.to_string(),
        }
    }
}

/// The objects of one file.
#[derive(Clone, Debug, Default)]
pub struct FileObjects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Objects of other kinds, as `apiVersion kind`, and how many of each.
    pub ignored: BTreeMap<String, usize>,
}

/// How a file's text is parsed, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Multi-document YAML (JSON objects are YAML too).
    Yaml,
    /// JSON objects one after another, as `kubectl get -o json` or `jq`
    /// write them.
    Json,
}

impl Format {
    #[must_use]
    pub fn of(path: &Path) -> Self {
        if path.extension().is_some_and(|e| e == "json") {
            Self::Json
        } else {
            Self::Yaml
        }
    }
}

/// Reads and parses one manifest file. Never blocks on the file: a FIFO,
/// socket or device (also behind a symlink) is refused at once.
pub fn read_manifest_file(path: &Path) -> Result<FileObjects, ManifestError> {
    let bytes = read_bounded(path)?;
    parse_manifests(&bytes, Format::of(path))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ManifestError> {
    // O_NONBLOCK: opening a FIFO for reading waits for a writer otherwise,
    // and the file may have become one since the directory was listed.
    // O_NOCTTY: a terminal must not become the agent's.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| ManifestError::Open { source })?;
    // What was opened counts, not what the name was when it was listed.
    let meta = file
        .metadata()
        .map_err(|source| ManifestError::Read { source })?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_fifo() {
            "FIFO"
        } else if kind.is_socket() {
            "socket"
        } else if kind.is_char_device() {
            "character device"
        } else if kind.is_block_device() {
            "block device"
        } else if kind.is_dir() {
            "directory"
        } else {
            "special file"
        };
        return Err(ManifestError::NotRegularFile { kind });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ManifestError::limit_of(
            Limit::Size,
            format_args!("{} bytes", meta.len()),
        ));
    }
    // The file may grow after the fstat: read one byte past the limit to
    // tell.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    Read::take(&file, MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| ManifestError::Read { source })?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ManifestError::limit_of(
            Limit::Size,
            "it grew past the limit while being read",
        ));
    }
    drop::<File>(file);
    Ok(bytes)
}

/// Parses a file's contents. One bad object fails the whole file, so a
/// half-read file never drops the objects it did not reach.
pub fn parse_manifests(bytes: &[u8], format: Format) -> Result<FileObjects, ManifestError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ManifestError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    // Editors on Windows start files with a byte order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let documents = match format {
        Format::Yaml => parse_yaml(text)?,
        Format::Json => parse_json(text)?,
    };
    let mut objects = FileObjects::default();
    for (index, document) in documents.into_iter().enumerate() {
        if document.is_null() {
            continue; // an empty document, as after a trailing `---`
        }
        add_object(document, &format!("document {}", index + 1), &mut objects)?;
    }
    Ok(objects)
}

fn parse_yaml(text: &str) -> Result<Vec<Value>, ManifestError> {
    serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(yaml_error)
}

fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    // The scanner runs ahead of the depth count in flow collections.
    budget.flow_nesting_limit = MAX_DEPTH;
    budget.max_documents = MAX_DOCUMENTS;
    budget.max_nodes = MAX_NODES;
    // Every node is one event, plus one for each collection's end.
    budget.max_events = 2 * MAX_NODES + 2 * MAX_DOCUMENTS;
    budget.max_aliases = MAX_ALIAS_EVENTS;
    budget.max_recorded_anchor_events = MAX_ALIAS_EVENTS;
    // Without aliases, scalars are at most the file's size.
    let scalar_bytes = usize::try_from(2 * MAX_FILE_BYTES).unwrap_or(usize::MAX);
    budget.max_total_scalar_bytes = scalar_bytes;
    budget.max_recorded_anchor_bytes = scalar_bytes;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = MAX_ALIAS_EVENTS;
    // One line per problem: the message and its line and column.
    options.with_snippet = false;
    options
}

fn yaml_error(error: serde_saphyr::Error) -> ManifestError {
    use serde_saphyr::{Error, ExternalMessageSource, budget::BudgetBreach, granit_parser};
    // The error itself, without the snippet and alias locations around it.
    let mut inner = &error;
    while let Error::AliasError { error, .. } | Error::WithSnippet { error, .. } = inner {
        inner = error;
    }
    let limit = match inner {
        Error::Budget { breach, .. } => match breach {
            BudgetBreach::InputBytes { .. } => Some(Limit::Size),
            BudgetBreach::Depth { .. } => Some(Limit::Depth),
            BudgetBreach::Documents { .. } => Some(Limit::Documents),
            BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. } => Some(Limit::Nodes),
            // Scalars beyond the file's size can only come from aliases.
            BudgetBreach::Aliases { .. }
            | BudgetBreach::Anchors { .. }
            | BudgetBreach::ScalarBytes { .. }
            | BudgetBreach::AliasAnchorRatio { .. }
            | BudgetBreach::MergeKeys { .. }
            | BudgetBreach::RecordedAnchorEvents { .. }
            | BudgetBreach::RecordedAnchorBytes { .. } => Some(Limit::Aliases),
            _ => None,
        },
        Error::AliasReplayLimitExceeded { .. }
        | Error::AliasExpansionLimitExceeded { .. }
        | Error::AliasReplayStackDepthExceeded { .. } => Some(Limit::Aliases),
        Error::ExternalMessage { source, .. } => match &**source {
            ExternalMessageSource::Parser(scan)
                if *scan.kind() == granit_parser::ErrorKind::RecursionLimitExceeded =>
            {
                Some(Limit::Depth)
            }
            _ => None,
        },
        _ => None,
    };
    match limit {
        Some(limit) => ManifestError::limit_of(limit, error),
        None => ManifestError::Syntax {
            format: "YAML",
            detail: error.to_string(),
        },
    }
}

fn parse_json(text: &str) -> Result<Vec<Value>, ManifestError> {
    check_json_shape(text)?;
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .map_err(|e| ManifestError::Syntax {
            format: "JSON",
            detail: e.to_string(),
        })
}

/// Checks a JSON stream against the depth, documents and nodes limits
/// before it is parsed, so a parse never builds what would be refused.
/// Exact for valid JSON; invalid JSON fails the parse after this anyway.
fn check_json_shape(text: &str) -> Result<(), ManifestError> {
    let (mut depth, mut documents, mut nodes) = (0_usize, 0_usize, 0_usize);
    let (mut in_string, mut escaped) = (false, false);
    for (offset, byte) in text.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                if depth == 0 {
                    documents += 1;
                }
                depth += 1;
                nodes += 1;
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            // Every key and value but a collection's first follows one.
            b',' | b':' => nodes += 1,
            _ => continue,
        }
        let at = || format!("at byte {offset}");
        if depth > MAX_DEPTH {
            return Err(ManifestError::limit_of(Limit::Depth, at()));
        }
        if documents > MAX_DOCUMENTS {
            return Err(ManifestError::limit_of(Limit::Documents, at()));
        }
        if nodes > MAX_NODES {
            return Err(ManifestError::limit_of(Limit::Nodes, at()));
        }
    }
    Ok(())
}

/// Adds one object, or the items of a list, to `objects`.
fn add_object(value: Value, at: &str, objects: &mut FileObjects) -> Result<(), ManifestError> {
    let field = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
        return Err(ManifestError::NotAnObject { at: at.to_owned() });
    };
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned();
    let object_error = |e: serde_json::Error| ManifestError::Object {
        at: at.to_owned(),
        kind: kind.clone(),
        name: name.clone(),
        detail: e.to_string(),
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => objects
            .services
            .push(serde_json::from_value(value).map_err(object_error)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => objects
            .endpoint_slices
            .push(serde_json::from_value(value).map_err(object_error)?),
        (_, list) if list.ends_with("List") => {
            // `kind: List` items say what they are; the items of a typed
            // list (`ServiceList`) from the API may not.
            let item_kind = list.strip_suffix("List").filter(|k| !k.is_empty());
            let items = match value {
                Value::Object(mut fields) => fields.remove("items"),
                _ => None,
            };
            let Some(Value::Array(items)) = items else {
                return Err(ManifestError::NoItems {
                    at: at.to_owned(),
                    kind,
                });
            };
            for (index, mut item) in items.into_iter().enumerate() {
                if let (Some(item_kind), Some(fields)) = (item_kind, item.as_object_mut()) {
                    fields
                        .entry("apiVersion")
                        .or_insert_with(|| api_version.clone().into());
                    fields
                        .entry("kind")
                        .or_insert_with(|| item_kind.to_owned().into());
                }
                add_object(item, &format!("{at}, item {}", index + 1), objects)?;
            }
        }
        _ => {
            *objects
                .ignored
                .entry(format!("{api_version} {kind}"))
                .or_default() += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
