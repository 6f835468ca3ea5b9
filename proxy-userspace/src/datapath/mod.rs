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

use std::{
    collections::BTreeSet,
    fs, io,
    os::{fd::OwnedFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, Program, ProgramError,
        SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use proxy_common::{
    BACKENDS_MAP, BACKENDS_MAX_ENTRIES, Backend, EXT_BACKENDS_MAP, EXT_BACKENDS_MAX_ENTRIES,
    EXT_SERVICES_MAP, EXT_SERVICES_MAX_ENTRIES, FLOWS_MAP, FLOWS_MAX_ENTRIES, MAPS, PROGRAMS,
    SERVICES_MAP, SERVICES_MAX_ENTRIES, ServiceKey, ServiceValue, TC_PROGRAMS,
};
use tracing::{info, warn};

// doctor/ still reaches these through here; it imports them from
// crate::maps when it is split.
pub use crate::maps::{Pins, open_pinned, open_pinned_events};
use crate::{
    bpf_sys,
    maps::{Counts, MapsError, PinsError, SizedTable, table::typed_map},
    model::Cidr,
};

pub mod btf;
mod guard;
pub use guard::GuardWatch;

/// The object built from proxy-ebpf by build.rs. Every map of
/// [`proxy_common::MAPS`] is pinned: a restarted agent's programs carry on
/// with the same services, reverse translations and counters.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PROXY_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Pins(#[from] PinsError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(
        "the pinned map {path} is {found}, but this agent's {name} is {expected}; it was made \
         by another program or version. Run `proxy-userspace cleanup --bpffs {root}` to \
         remove the old datapath (its Services stop being balanced until the agent starts \
         again), then start the agent"
    )]
    Layout {
        name: &'static str,
        path: PathBuf,
        root: PathBuf,
        found: MapLayout,
        expected: MapLayout,
    },
    #[error(
        "the pinned map {path} is laid out otherwise than this agent's {name}: {difference}. \
         It was made by another program or version. Run `proxy-userspace cleanup --bpffs \
         {root}` to remove the old datapath (its Services stop being balanced until the \
         agent starts again), then start the agent"
    )]
    BtfLayout {
        name: &'static str,
        path: PathBuf,
        root: PathBuf,
        difference: String,
    },
    #[error(
        "the BTF of the pinned map {path} is unreadable; it was not made by this agent. Run \
         `proxy-userspace cleanup --bpffs {root}` to remove the old datapath, then start the \
         agent"
    )]
    BadMapBtf {
        path: PathBuf,
        root: PathBuf,
        #[source]
        source: btf::BtfError,
    },
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
    #[error("cannot parse the eBPF object")]
    Parse(#[source] aya_obj::ParseError),
    #[error(
        "--cgroup {path} is not a cgroup v2 directory (cgroup v1 and plain directories cannot hold these programs)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error(
        "{path} is in use by a running agent ({holder}): stop it first, or pass --force to \
         detach its datapath under it"
    )]
    CleanupLocked { path: PathBuf, holder: String },
    #[error("{flag} must be at least 1")]
    ZeroSize { flag: &'static str },
    #[error("cannot load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("cannot read the programs' log records")]
    Trace(#[source] aya_log::Error),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("cannot load program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open the cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the link of {name} is not a bpf_link (kernel older than 5.7?)")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("cannot pin the link of {name} at {path}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot open {path}, just pinned, to hold it")]
    Hold {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot swap the program behind the pinned link {path}")]
    UpdateLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {name} is missing at {path}")]
    MissingMap { name: &'static str, path: PathBuf },
    #[error("cannot open map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How many entries each map holds. Sizes apply when a map is created; a
/// pinned map keeps the size it was made with. The reverse translations
/// live in socket-local storage, which has no size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub external_services: u32,
    pub external_backends: u32,
    /// Flows of the tc programs, each counted once per direction.
    pub flows: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: SERVICES_MAX_ENTRIES,
            backends: BACKENDS_MAX_ENTRIES,
            external_services: EXT_SERVICES_MAX_ENTRIES,
            external_backends: EXT_BACKENDS_MAX_ENTRIES,
            flows: FLOWS_MAX_ENTRIES,
        }
    }
}

impl MapSizes {
    /// A map of no entries cannot be created; say so before anything is.
    pub fn check(self) -> Result<(), DatapathError> {
        for (name, size) in self.by_name() {
            if size == 0 {
                return Err(DatapathError::ZeroSize {
                    flag: size_flag(name),
                });
            }
        }
        Ok(())
    }

    fn by_name(self) -> [(&'static str, u32); 5] {
        [
            (SERVICES_MAP, self.services),
            (BACKENDS_MAP, self.backends),
            (EXT_SERVICES_MAP, self.external_services),
            (EXT_BACKENDS_MAP, self.external_backends),
            (FLOWS_MAP, self.flows),
        ]
    }
}

/// The `run` flag that sizes a map.
#[must_use]
pub fn size_flag(map: &str) -> &'static str {
    match map {
        SERVICES_MAP => "--services-map-size",
        BACKENDS_MAP => "--backends-map-size",
        EXT_SERVICES_MAP => "--external-services-map-size",
        EXT_BACKENDS_MAP => "--external-backends-map-size",
        FLOWS_MAP => "--flow-table-size",
        _ => "(fixed size)",
    }
}

/// What the programs are told when they load, as globals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramSettings {
    /// `1 << --iptables-masquerade-bit`.
    pub masquerade_mark: u32,
    /// `--cluster-cidr`: ClusterIP traffic from outside it is masqueraded.
    pub cluster_cidr: Option<Cidr>,
    /// `--masquerade-all`: all ClusterIP traffic from outside is.
    pub masquerade_all: bool,
    /// `run --trace`: the programs log each translation (aya-log).
    pub trace: bool,
}

impl ProgramSettings {
    /// The tc ingress program's globals and their values.
    fn globals(&self) -> [(&'static str, u32); 4] {
        let (addr, mask) = self.cluster_cidr.map_or((0, 0), |cidr| {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(cidr.prefix))
                .unwrap_or(0);
            ((u32::from(cidr.addr) & mask).to_be(), mask.to_be())
        });
        [
            ("MASQUERADE_MARK", self.masquerade_mark),
            ("CLUSTER_CIDR_ADDR", addr),
            ("CLUSTER_CIDR_MASK", mask),
            ("MASQUERADE_ALL", u32::from(self.masquerade_all)),
        ]
    }
}

/// The service maps as a writer gets them (the socket programs', or the
/// tc programs'): a full map says which flag sizes it.
pub struct WritableMaps {
    pub services: SizedTable<ServiceKey, ServiceValue>,
    pub backends: SizedTable<u32, Backend>,
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
enum Check {
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

fn check_layouts(pins: &Pins, check: Check) -> Result<(), DatapathError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(DatapathError::Parse)?;
    let mut object_btf = None;
    for name in MAPS {
        let path = pins.map(name);
        if !Pins::check_entry(&path)? {
            continue;
        }
        let def = object
            .maps
            .get(name)
            .ok_or_else(|| DatapathError::MissingMap {
                name,
                path: path.clone(),
            })?;
        let expected = MapLayout {
            map_type: def.map_type(),
            key_size: def.key_size(),
            value_size: def.value_size(),
            flags: def.map_flags(),
        };
        let info = bpf_sys::obj_get(&path)
            .and_then(bpf_sys::map_info)
            .map_err(|source| DatapathError::MapInfo {
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
            return Err(DatapathError::Layout {
                name,
                path,
                root: pins.root().to_owned(),
                found,
                expected,
            });
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
            object_btf = Some(btf::Btf::parse(&btf.to_bytes()).map_err(DatapathError::ObjectBtf)?);
        }
        let Some(ours_btf) = &object_btf else {
            continue;
        };
        let theirs = bpf_sys::btf_by_id(info.btf_id).map_err(|source| DatapathError::MapBtf {
            path: path.clone(),
            source,
        })?;
        let bad = |source| DatapathError::BadMapBtf {
            path: path.clone(),
            root: pins.root().to_owned(),
            source,
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
                .map_err(DatapathError::ObjectBtf)?;
            let found = theirs.layout(found_id).map_err(bad)?;
            differences.extend(found.differences(&expected, what));
        }
        if !differences.is_empty() {
            return Err(DatapathError::BtfLayout {
                name,
                path,
                root: pins.root().to_owned(),
                difference: differences.join("; "),
            });
        }
    }
    Ok(())
}

/// Checks `--cgroup` before anything is made: it must be a cgroup v2
/// directory, or attaching fails only after the maps are pinned.
pub fn check_cgroup(path: &Path) -> Result<(), DatapathError> {
    match bpf_sys::is_cgroup2(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(DatapathError::NotCgroup2 {
            path: path.to_owned(),
        }),
        Err(source) => Err(DatapathError::Cgroup {
            path: path.to_owned(),
            source,
        }),
    }
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
    held: guard::Held,
}

impl Datapath {
    /// Loads the programs and maps, reusing every map that is already pinned
    /// and laid out as the programs expect. The directory must have been
    /// prepared and locked with [`Pins::prepare`], and its maps' BTF checked
    /// with [`check_pinned_maps`] while the agent could still read it.
    pub fn load(
        pins: Pins,
        sizes: MapSizes,
        settings: ProgramSettings,
    ) -> Result<Self, DatapathError> {
        // Again, as far as the agent's capabilities now allow: a map could
        // have been pinned since by hand.
        check_layouts(&pins, Check::Definition)?;
        for path in stale_maps(&pins) {
            // Left for a rollback to adopt; a full sync rewrites it anyway.
            warn!(map = %path.display(), "a map of an older layout is pinned but unused; `cleanup` removes it");
        }
        let mut loader = EbpfLoader::new();
        let globals = settings.globals();
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        // aya-log's level: off (0) unless tracing, so that the verifier,
        // which sees a constant, drops every log statement.
        let log_level: u8 = if settings.trace {
            aya_log::Level::Info as u8
        } else {
            0
        };
        loader.override_global("AYA_LOG_LEVEL", &log_level, true);
        for name in MAPS {
            // Opens the pinned map when there is one, else creates and pins it.
            loader.map_pin_path(name, pins.map(name));
        }
        for (name, size) in sizes.by_name() {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Load)?;
        for (name, size) in sizes.by_name() {
            let pinned = MapData::from_pin(pins.map(name))
                .and_then(|map| map.info())
                .map(|info| info.max_entries());
            if let Ok(pinned) = pinned
                && pinned != size
            {
                // Resizing means a new map, and so dropping every entry the
                // programs depend on; that is for an operator to choose.
                warn!(
                    map = name,
                    pinned,
                    requested = size,
                    "the pinned map keeps its size; run cleanup and restart to resize it"
                );
            }
        }
        load_programs(&mut ebpf)?;
        let held = guard::Held::maps_of(&pins)?;
        Ok(Self {
            ebpf,
            pins,
            tcx: true,
            held,
        })
    }

    /// Hands out the tc programs' frontend maps, for their writer.
    pub fn take_external_maps(&mut self) -> Result<WritableMaps, DatapathError> {
        Ok(WritableMaps {
            services: self.take_table(EXT_SERVICES_MAP)?,
            backends: self.take_table(EXT_BACKENDS_MAP)?,
        })
    }

    /// Attaches the tc programs to exactly `devices`: a device's pinned
    /// links get the new programs swapped in, a new device gets links of
    /// its own (TCX, pinned; clsact where the kernel has no TCX), and the
    /// links of devices no longer chosen are unpinned, which detaches them.
    /// A device that fails is logged and skipped; the others still go on.
    pub fn attach_devices(&mut self, devices: &BTreeSet<String>, all: &[String]) {
        for device in devices {
            for (name, attach_type) in TC_HOOKS {
                if let Err(error) = self.attach_device(name, device, attach_type) {
                    warn!(program = name, device, error = %crate::report::chain(&error), "cannot attach to the device");
                }
            }
        }
        // The links held but no longer pinned too: holding one keeps it.
        let mut links: BTreeSet<(PathBuf, String)> = tc_links(&self.pins).into_iter().collect();
        links.extend(
            self.held
                .tc_links
                .keys()
                .filter_map(|path| Some((path.clone(), tc_link_device(path)?))),
        );
        for (path, device) in links {
            if !devices.contains(&device) {
                let held = self.held.tc_links.remove(&path);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        info!(device, link = %path.display(), "detached from a device no longer used");
                    }
                    Err(error) if error.kind() == io::ErrorKind::NotFound && held.is_some() => {
                        info!(device, "detached from a device no longer used");
                    }
                    Err(error) => {
                        warn!(device, link = %path.display(), %error, "cannot unpin a tc link");
                    }
                }
            }
        }
        if !self.tcx {
            // clsact filters have no pin to list them by: ask every device.
            for device in all.iter().filter(|d| !devices.contains(*d)) {
                if detach_clsact(device) {
                    info!(
                        device,
                        "detached the clsact filters from a device no longer used"
                    );
                }
            }
        }
    }

    /// `--tcx false`: attach the tc programs as clsact filters even where
    /// the kernel has TCX.
    pub fn set_tcx(&mut self, tcx: bool) {
        self.tcx = tcx;
    }

    fn attach_device(
        &mut self,
        name: &'static str,
        device: &str,
        attach_type: TcAttachType,
    ) -> Result<(), DatapathError> {
        let link_path = self.pins.link(&format!("{name}@{device}"));
        let program = classifier(&mut self.ebpf, name)?;
        if let Some(link) = swap_pinned(
            name,
            &link_path,
            program
                .fd()
                .map_err(|source| DatapathError::Program { name, source })?,
        )? {
            self.held.tc_links.insert(link_path, link);
            return Ok(());
        }
        if !self.tcx {
            return attach_clsact(program, name, device, attach_type);
        }
        let tcx = program.attach_with_options(
            device,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        );
        let link_id = match tcx {
            Ok(link_id) => link_id,
            Err(error) => {
                warn!(program = name, device, error = %crate::report::chain(&error), "TCX is unavailable; using clsact");
                return attach_clsact(program, name, device, attach_type);
            }
        };
        let link = program
            .take_link(link_id)
            .map_err(|source| DatapathError::Program { name, source })?;
        let link = FdLink::try_from(link).map_err(|source| DatapathError::Link { name, source })?;
        let held = pin_and_hold(name, link, &link_path)?;
        self.held.tc_links.insert(link_path.clone(), held);
        info!(program = name, device, link = %link_path.display(), "attached (TCX)");
        Ok(())
    }

    /// The programs' log records (`run --trace`), forwarded to `tracing`
    /// under the target `ebpf` each time the returned reader is flushed.
    pub fn trace_reader(&mut self) -> Result<aya_log::EbpfLogger<TraceLog>, DatapathError> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, TraceLog)
            .map_err(DatapathError::Trace)
    }

    /// Hands out the per-slot counts, for the agent to delete those of
    /// slots that go.
    pub fn take_counts(&mut self) -> Result<Counts, DatapathError> {
        let map = self.take_map(proxy_common::COUNTS_MAP)?;
        Counts::try_from(map).map_err(|source| DatapathError::Map {
            name: proxy_common::COUNTS_MAP,
            source,
        })
    }

    /// Hands out the service maps, for the writer.
    pub fn take_service_maps(&mut self) -> Result<WritableMaps, DatapathError> {
        Ok(WritableMaps {
            services: self.take_table(SERVICES_MAP)?,
            backends: self.take_table(BACKENDS_MAP)?,
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
        self.ebpf
            .take_map(name)
            .ok_or_else(|| DatapathError::MissingMap {
                name,
                path: self.pins.map(name),
            })
    }

    /// Attaches every program to `cgroup`. Where a link is already pinned
    /// (an earlier agent's), the link is kept and only its program is
    /// swapped, atomically.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let (cgroup_dir, inode) = open_cgroup(cgroup)?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let link_path = self.pins.link(name);
            let program = cgroup_program(&mut self.ebpf, name)?;
            if let Some(link) = swap_pinned(name, &link_path, program.fd()?)? {
                links.push((name, link));
                continue;
            }
            links.push((name, self.attach_anew(name, &cgroup_dir, cgroup)?));
        }
        self.held.cgroup_links = links;
        self.held.cgroup = Some((cgroup.to_owned(), inode));
        Ok(())
    }

    /// Attaches one cgroup program with a link of its own, pinned.
    fn attach_anew(
        &mut self,
        name: &'static str,
        cgroup_dir: &fs::File,
        cgroup: &Path,
    ) -> Result<OwnedFd, DatapathError> {
        let link_path = self.pins.link(name);
        let link = cgroup_program(&mut self.ebpf, name)?.attach(cgroup_dir)?;
        let held = pin_and_hold(name, link, &link_path)?;
        info!(program = name, cgroup = %cgroup.display(), link = %link_path.display(), "attached");
        Ok(held)
    }
}

/// The cgroup, opened to attach to, and its inode: a cgroup made again
/// under the same path has another.
fn open_cgroup(cgroup: &Path) -> Result<(fs::File, u64), DatapathError> {
    let error = |source| DatapathError::Cgroup {
        path: cgroup.to_owned(),
        source,
    };
    let dir = fs::File::open(cgroup).map_err(error)?;
    let inode = dir.metadata().map_err(error)?.ino();
    Ok((dir, inode))
}

/// Pins a new link and opens it again: aya's descriptor goes with the
/// pinned link it returns, and the agent keeps one of its own.
fn pin_and_hold(name: &'static str, link: FdLink, path: &Path) -> Result<OwnedFd, DatapathError> {
    let pinned = link.pin(path).map_err(|source| DatapathError::PinLink {
        name,
        path: path.to_owned(),
        source,
    })?;
    let held = bpf_sys::obj_get(path).map_err(|source| DatapathError::Hold {
        path: path.to_owned(),
        source,
    })?;
    drop(pinned);
    Ok(held)
}

/// Swaps `program` into the link pinned at `link_path`, atomically, and
/// returns the link, to hold; `None` when there is no pinned link to swap
/// into (none, or a defunct one whose cgroup or device is gone, which is
/// unpinned here to be replaced).
fn swap_pinned(
    name: &'static str,
    link_path: &Path,
    program: &aya::programs::ProgramFd,
) -> Result<Option<OwnedFd>, DatapathError> {
    let Ok(link) = bpf_sys::obj_get(link_path) else {
        return Ok(None);
    };
    match bpf_sys::link_update(&link, program) {
        Ok(()) => {
            info!(program = name, link = %link_path.display(), "swapped the program behind the pinned link");
            Ok(Some(link))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
            warn!(program = name, link = %link_path.display(), "the pinned link is defunct; attaching anew");
            fs::remove_file(link_path).map_err(|source| DatapathError::Remove {
                path: link_path.to_owned(),
                source,
            })?;
            Ok(None)
        }
        Err(source) => Err(DatapathError::UpdateLink {
            path: link_path.to_owned(),
            source,
        }),
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

/// The tc programs and the hooks they go on.
const TC_HOOKS: [(&str, TcAttachType); 2] = [
    ("tc_ingress", TcAttachType::Ingress),
    ("tc_egress", TcAttachType::Egress),
];

/// Where the clsact filters go: a priority and handle of this project's
/// own, so that a restart finds its filter and replaces the program in
/// it, rather than adding a second filter, and no one else's is touched.
const CLSACT_PRIORITY: u16 = 0x0eb5;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x0eb5);

/// Kernels before 6.6 (or `--tcx false`): a clsact filter, which has no
/// link to pin but stays attached when the agent exits. An earlier
/// agent's filter gets the new program in place, atomically.
fn attach_clsact(
    program: &mut SchedClassifier,
    name: &'static str,
    device: &str,
    attach_type: TcAttachType,
) -> Result<(), DatapathError> {
    if let Err(error) = tc::qdisc_add_clsact(device) {
        tracing::debug!(device, %error, "clsact qdisc not added (it may exist)");
    }
    let program_error = |source| DatapathError::Program { name, source };
    let ours =
        SchedClassifierLink::attached(device, attach_type, CLSACT_PRIORITY, CLSACT_HANDLE, None)
            .map_err(|error| program_error(tc::TcError::IoError(error).into()))?;
    let (link_id, how) = match program.attach_to_link(ours) {
        Ok(link_id) => (link_id, "replaced the program in the clsact filter"),
        // No filter of ours there yet (ENOENT): a new one.
        Err(_) => (
            program
                .attach_with_options(
                    device,
                    attach_type,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: CLSACT_PRIORITY,
                        handle: CLSACT_HANDLE,
                        classid: None,
                    }),
                )
                .map_err(program_error)?,
            "attached (clsact)",
        ),
    };
    let link = program.take_link(link_id).map_err(program_error)?;
    // Dropping the link would detach the filter.
    std::mem::forget(link);
    info!(program = name, device, "{how}");
    Ok(())
}

/// Removes the clsact filters of the tc programs from `device`; whether
/// there were any.
fn detach_clsact(device: &str) -> bool {
    let mut detached = false;
    for (name, attach_type) in TC_HOOKS {
        match tc::qdisc_detach_program(device, attach_type, name) {
            Ok(()) => detached = true,
            Err(tc::TcError::IoError(error)) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                warn!(device, program = name, %error, "cannot detach the clsact filter");
            }
        }
    }
    detached
}

/// The device a tc link's pin (`links/<program>@<device>`) names.
fn tc_link_device(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let (program, device) = name.split_once('@')?;
    TC_PROGRAMS.contains(&program).then(|| device.to_owned())
}

/// The pinned tc links and the device each is on.
pub fn tc_links(pins: &Pins) -> Vec<(PathBuf, String)> {
    let Ok(dir) = fs::read_dir(pins.links_dir()) else {
        return Vec::new();
    };
    let mut links: Vec<(PathBuf, String)> = dir
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            let device = tc_link_device(&path)?;
            Some((path, device))
        })
        .collect();
    links.sort();
    links
}

/// Loads every program of the object into the kernel.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    for name in PROGRAMS {
        cgroup_program(ebpf, name)?.load()?;
    }
    for name in TC_PROGRAMS {
        classifier(ebpf, name)?
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
    }
    Ok(())
}

/// A program of the object as its type (a cgroup sock_addr program, a tc
/// classifier).
fn typed_program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// A cgroup program of the object: a socket-address hook, or a socket
/// hook (`sock_release`).
enum CgroupProgram<'a> {
    SockAddr(&'static str, &'a mut CgroupSockAddr),
    Sock(&'static str, &'a mut CgroupSock),
}

fn cgroup_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<CgroupProgram<'a>, DatapathError> {
    match ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
    {
        Program::CgroupSockAddr(program) => Ok(CgroupProgram::SockAddr(name, program)),
        Program::CgroupSock(program) => Ok(CgroupProgram::Sock(name, program)),
        _ => Err(DatapathError::Program {
            name,
            source: ProgramError::UnexpectedProgramType,
        }),
    }
}

impl CgroupProgram<'_> {
    const fn name(&self) -> &'static str {
        match self {
            Self::SockAddr(name, _) | Self::Sock(name, _) => name,
        }
    }

    fn load(&mut self) -> Result<(), DatapathError> {
        let name = self.name();
        match self {
            Self::SockAddr(_, program) => program.load(),
            Self::Sock(_, program) => program.load(),
        }
        .map_err(|source| DatapathError::Program { name, source })
    }

    fn fd(&self) -> Result<&aya::programs::ProgramFd, DatapathError> {
        let name = self.name();
        match self {
            Self::SockAddr(_, program) => program.fd(),
            Self::Sock(_, program) => program.fd(),
        }
        .map_err(|source| DatapathError::Program { name, source })
    }

    /// Attaches to `cgroup` by a bpf_link, which it hands back to be pinned.
    fn attach(self, cgroup: &fs::File) -> Result<FdLink, DatapathError> {
        // A bpf_link takes no attach flags (the kernel rejects any with
        // EINVAL) and always shares the hook with other programs.
        let mode = CgroupAttachMode::Single;
        let (name, link) = match self {
            Self::SockAddr(name, program) => {
                let error = |source| DatapathError::Program { name, source };
                let link_id = program.attach(cgroup, mode).map_err(error)?;
                (
                    name,
                    FdLink::try_from(program.take_link(link_id).map_err(error)?),
                )
            }
            Self::Sock(name, program) => {
                let error = |source| DatapathError::Program { name, source };
                let link_id = program.attach(cgroup, mode).map_err(error)?;
                (
                    name,
                    FdLink::try_from(program.take_link(link_id).map_err(error)?),
                )
            }
        };
        link.map_err(|source| DatapathError::Link { name, source })
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    typed_program(ebpf, name)
}

/// Pinned maps of ours that this build does not use: other layout versions
/// of its maps (`lb4_svc_v1` after an upgrade to `lb4_svc_v2`).
fn stale_maps(pins: &Pins) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(pins.maps_dir()) else {
        return Vec::new();
    };
    let mut stale: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("lb4_") && !MAPS.contains(&name.as_ref())
        })
        .map(|entry| entry.path())
        .collect();
    stale.sort();
    stale
}

/// Detaches the programs (by dropping their pinned links) and removes the
/// pinned maps and the directory. Safe to run twice. Refused while an agent
/// holds the directory's lock (it would go on writing maps no program
/// reads), unless `force`.
pub fn cleanup(pins: &Pins, force: bool) -> Result<(), DatapathError> {
    let _lock = match pins.lock_existing() {
        Ok(lock) => lock,
        Err(PinsError::Locked { path, holder }) if force => stop_holder(pins, &path, &holder)?,
        Err(PinsError::Locked { path, holder }) => {
            return Err(DatapathError::CleanupLocked { path, holder });
        }
        Err(e) => return Err(e.into()),
    };
    let remove = |path: PathBuf| match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(DatapathError::Remove { path, source: e })
        }
        _ => Ok(()),
    };
    // Links first: once they are gone no program uses the maps.
    for name in PROGRAMS {
        remove(pins.link(name))?;
    }
    for (path, _) in tc_links(pins) {
        remove(path)?;
    }
    // clsact filters (kernels without TCX, or `--tcx false`) are listed
    // by no pin: every device of this namespace is asked.
    if let Ok(interfaces) = crate::devices::read() {
        for interface in interfaces {
            detach_clsact(&interface.name);
        }
    }
    for name in MAPS {
        remove(pins.map(name))?;
    }
    // Maps of an older layout version, left by the agent this one upgraded.
    for path in stale_maps(pins) {
        remove(path)?;
    }
    for dir in [pins.links_dir(), pins.maps_dir(), pins.root().to_owned()] {
        match fs::remove_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(DatapathError::Remove {
                    path: dir,
                    source: e,
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// `cleanup --force`: stops the agent holding the directory (SIGTERM, as
/// its DaemonSet would) and takes its lock. A running agent keeps its own
/// descriptors of the links and pins again whatever is removed under it, so
/// removing the datapath under it would not detach anything.
fn stop_holder(
    pins: &Pins,
    path: &Path,
    holder: &str,
) -> Result<Option<crate::maps::pins::PinLock>, DatapathError> {
    let locked = || DatapathError::CleanupLocked {
        path: path.to_owned(),
        holder: holder.to_owned(),
    };
    let pid = pins
        .holder()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or_else(locked)?;
    warn!(path = %path.display(), holder, "stopping the agent that holds the datapath (--force)");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM)
        .map_err(|_| locked())?;
    let deadline = std::time::Instant::now() + STOP_TIMEOUT;
    loop {
        match pins.lock_existing() {
            Ok(lock) => return Ok(lock),
            Err(PinsError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(PinsError::Locked { path, holder }) => {
                return Err(DatapathError::CleanupLocked { path, holder });
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long `cleanup --force` waits for the agent it stopped to exit.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The cgroup programs, by the names of their functions (and of their
/// pinned links), for `doctor`.
#[must_use]
pub fn program_names() -> &'static [&'static str] {
    &PROGRAMS
}

/// Loads every program into the kernel with tiny, unpinned maps and
/// attaches nothing, then unloads them: the verifier's word on whether this
/// kernel has the program types, attach types and helpers they need.
pub fn probe_load() -> Result<(), DatapathError> {
    let mut loader = EbpfLoader::new();
    // As an agent without --trace loads them (see `Datapath::load`).
    loader.override_global("AYA_LOG_LEVEL", &0_u8, true);
    // The sized maps made small (socket storage has no size, and the
    // events array keeps its own); nothing is pinned.
    let tc_maps = [EXT_SERVICES_MAP, EXT_BACKENDS_MAP, proxy_common::FLOWS_MAP];
    for name in MapSizes::default()
        .by_name()
        .map(|(name, _)| name)
        .into_iter()
        .chain(tc_maps)
    {
        loader.map_max_entries(name, 1024);
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Load)?;
    load_programs(&mut ebpf)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proxy_common::{EVENTS_MAP, Event, SOCK_REV_NAT_MAP, SockRevNat};

    use super::*;

    /// The names and sizes the agent (and xtask, and the listing) take from
    /// proxy_common are the ones the programs were built with.
    #[test]
    fn the_object_has_exactly_the_shared_maps_programs_and_events() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        // `.rodata` holds the programs' globals, and AYA_LOGS is aya-log's
        // ring buffer (`run --trace`): both are made anew at every load
        // and never pinned.
        let maps: BTreeSet<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !name.starts_with('.') && *name != "AYA_LOGS")
            .collect();
        assert_eq!(maps, MAPS.into_iter().collect());
        let programs: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        assert_eq!(programs, PROGRAMS.into_iter().chain(TC_PROGRAMS).collect());

        let events = &object.maps[EVENTS_MAP];
        assert_eq!(events.max_entries() as usize, Event::ALL.len());
        let sizes = |name: &str| {
            let map = &object.maps[name];
            (map.key_size() as usize, map.value_size() as usize)
        };
        assert_eq!(
            sizes(SERVICES_MAP),
            (size_of::<ServiceKey>(), size_of::<ServiceValue>())
        );
        assert_eq!(
            sizes(BACKENDS_MAP),
            (size_of::<u32>(), size_of::<Backend>())
        );
        assert_eq!(
            sizes(SOCK_REV_NAT_MAP),
            (size_of::<i32>(), size_of::<SockRevNat>())
        );
    }
}
