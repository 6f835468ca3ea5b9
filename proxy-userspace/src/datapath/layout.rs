//! Whether a pinned map is laid out as the programs expect.

use std::{fs, io, path::PathBuf};

use aya::maps::MapData;
use proxy_common::MAPS;

use super::{DatapathError, EBPF_OBJECT, LoadError, Pins, btf};
use crate::bpf_sys;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A pinned map the programs would misread. The way out is the same
    /// whatever is wrong with it, and said here once.
    #[error(
        "{problem}. Run `proxy-userspace cleanup --bpffs {root}` to remove the old datapath \
         (its Services stop being balanced until the agent starts again), then start the agent"
    )]
    Foreign { root: PathBuf, problem: ForeignMap },
    #[error("cannot read the BTF of the pinned map {path}")]
    MapBtf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the eBPF object's BTF is unreadable")]
    ObjectBtf(#[source] btf::BtfError),
    #[error("cannot read the pinned map {path}")]
    MapInfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What is wrong with a pinned map that this agent did not make.
#[derive(Debug, thiserror::Error)]
pub enum ForeignMap {
    #[error(
        "the pinned map {path} is {found}, but this agent's {name} is {expected}; it was made \
         by another program or version"
    )]
    Definition {
        name: &'static str,
        path: PathBuf,
        found: MapLayout,
        expected: MapLayout,
    },
    #[error(
        "the pinned map {path} is laid out otherwise than this agent's {name}: {difference}. \
         It was made by another program or version"
    )]
    Btf {
        name: &'static str,
        path: PathBuf,
        difference: String,
    },
    #[error(
        "the BTF of the pinned map {path} is unreadable ({reason}); it was not made by this agent"
    )]
    UnreadableBtf {
        path: PathBuf,
        reason: btf::BtfError,
    },
}

/// What the programs assume of a map: the parts of its definition that
/// decide how its bytes are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = aya_obj::generated::bpf_map_type::try_from(self.map_type).map_or_else(
            |_| format!("map type {}", self.map_type),
            |kind| format!("{kind:?}"),
        );
        write!(
            f,
            "{kind} with {}-byte keys, {}-byte values and flags {:#x}",
            self.key_size, self.value_size, self.flags
        )
    }
}

/// How much of a pinned map [`check_layouts`] compares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    /// Type, sizes and flags: needs only CAP_BPF.
    Definition,
    /// And the key and value types of its BTF: needs CAP_SYS_ADMIN too.
    WithBtf,
}

/// Refuses pinned maps the programs would misread: made by another
/// program, by a build with another layout under the same versioned name,
/// or by hand. Reading a map's BTF needs CAP_SYS_ADMIN, which the agent
/// holds only while it starts: call this then, before [`Datapath::load`].
pub fn check_pinned_maps(pins: &Pins) -> Result<(), DatapathError> {
    check_layouts(pins, Check::WithBtf)
}

pub(super) fn check_layouts(pins: &Pins, check: Check) -> Result<(), DatapathError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(LoadError::Parse)?;
    let mut object_btf = None;
    for name in MAPS {
        let path = pins.map(name);
        if !Pins::check_entry(&path)? {
            continue;
        }
        let def = object.maps.get(name).ok_or(LoadError::MissingMap(name))?;
        let expected = MapLayout {
            map_type: def.map_type(),
            key_size: def.key_size(),
            value_size: def.value_size(),
            flags: def.map_flags(),
        };
        let info = MapData::from_pin(&path)
            .map_err(io::Error::other)
            .and_then(|map| bpf_sys::map_info(map.fd()))
            .map_err(|source| LayoutError::MapInfo {
                path: path.clone(),
                source,
            })?;
        let found = MapLayout {
            map_type: info.type_,
            key_size: info.key_size,
            value_size: info.value_size,
            flags: info.map_flags,
        };
        if found != expected {
            return Err(foreign(
                pins,
                ForeignMap::Definition {
                    name,
                    path,
                    found,
                    expected,
                },
            ));
        }
        // A map made without BTF (by bpftool, say) can only be judged by
        // the definition above.
        let aya_obj::Map::Btf(ours) = def else {
            continue;
        };
        if check == Check::Definition || info.btf_id == 0 {
            continue;
        }
        if object_btf.is_none() {
            let Some(btf) = &object.btf else { continue };
            object_btf = Some(btf::Btf::parse(&btf.to_bytes()).map_err(LayoutError::ObjectBtf)?);
        }
        let Some(ours_btf) = &object_btf else {
            continue;
        };
        let theirs = bpf_sys::btf_by_id(info.btf_id).map_err(|source| LayoutError::MapBtf {
            path: path.clone(),
            source,
        })?;
        let bad = |reason| {
            foreign(
                pins,
                ForeignMap::UnreadableBtf {
                    path: path.clone(),
                    reason,
                },
            )
        };
        let theirs = btf::Btf::parse(&theirs).map_err(bad)?;
        let mut differences = Vec::new();
        for (what, found_id, expected_id) in [
            ("key", info.btf_key_type_id, ours.def.btf_key_type_id),
            ("value", info.btf_value_type_id, ours.def.btf_value_type_id),
        ] {
            // A side without a type id is described by its size alone.
            if found_id == 0 || expected_id == 0 {
                continue;
            }
            let expected = ours_btf
                .layout(expected_id)
                .map_err(LayoutError::ObjectBtf)?;
            let found = theirs.layout(found_id).map_err(bad)?;
            differences.extend(found.differences(&expected, what));
        }
        if !differences.is_empty() {
            return Err(foreign(
                pins,
                ForeignMap::Btf {
                    name,
                    path,
                    difference: differences.join("; "),
                },
            ));
        }
    }
    Ok(())
}

fn foreign(pins: &Pins, problem: ForeignMap) -> DatapathError {
    LayoutError::Foreign {
        root: pins.root().to_owned(),
        problem,
    }
    .into()
}

/// Pinned maps of ours that this build does not use: other layout versions
/// of its maps (`lb4_svc_v1` after an upgrade to `lb4_svc_v2`).
pub(super) fn stale_maps(pins: &Pins) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(pins.maps_dir()) else {
        return Vec::new();
    };
    let mut stale: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            ["lb4_", "lb6_", "lb_"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
                && !MAPS.contains(&name.as_ref())
        })
        .map(|entry| entry.path())
        .collect();
    stale.sort();
    stale
}
