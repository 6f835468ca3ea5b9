//! Loading the object: the maps' sizes and the programs' globals, the
//! programs themselves, and a trial load for `doctor`.

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{CgroupSock, CgroupSockAddr, Program, ProgramError, SchedClassifier},
};
use proxy_common::{
    BACKENDS_MAP, BACKENDS_MAX_ENTRIES, BACKENDS6_MAP, CLUSTER_CIDR_ADDR_GLOBAL,
    CLUSTER_CIDR_MASK_GLOBAL, CLUSTER_CIDR6_ADDR_GLOBAL, CLUSTER_CIDR6_MASK_GLOBAL,
    EXT_BACKENDS_MAP, EXT_BACKENDS_MAX_ENTRIES, EXT_BACKENDS6_MAP, EXT_SERVICES_MAP,
    EXT_SERVICES_MAX_ENTRIES, EXT_SERVICES6_MAP, FLOWS_MAP, FLOWS_MAX_ENTRIES, FLOWS6_MAP,
    HOST_NETNS_COOKIE_GLOBAL, MAPS, MASQUERADE_ALL_GLOBAL, MASQUERADE_MARK_GLOBAL, PROGRAMS,
    SERVICES_MAP, SERVICES_MAX_ENTRIES, SERVICES6_MAP, TC_PROGRAMS, TcProgram,
};
use tracing::warn;

use super::{
    Datapath, DatapathError, EBPF_OBJECT, Pins, held,
    layout::{Check, check_layouts, stale_maps},
};
use std::net::Ipv6Addr;

use crate::model::Cidr;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{flag} must be at least 1")]
    ZeroSize { flag: &'static str },
    #[error("cannot parse the eBPF object")]
    Parse(#[source] aya_obj::ParseError),
    #[error("cannot load the eBPF object")]
    Object(#[source] aya::EbpfError),
    #[error("cannot read the programs' log records")]
    Trace(#[source] aya_log::Error),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("cannot load program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
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
    pub fn check(self) -> Result<(), LoadError> {
        for (name, size) in self.by_name() {
            if size == 0 {
                return Err(LoadError::ZeroSize {
                    flag: size_flag(name),
                });
            }
        }
        Ok(())
    }

    /// Each flag sizes the map of both families, as Cilium's
    /// `--bpf-lb-map-max` does.
    fn by_name(self) -> [(&'static str, u32); 10] {
        [
            (SERVICES_MAP, self.services),
            (BACKENDS_MAP, self.backends),
            (EXT_SERVICES_MAP, self.external_services),
            (EXT_BACKENDS_MAP, self.external_backends),
            (FLOWS_MAP, self.flows),
            (SERVICES6_MAP, self.services),
            (BACKENDS6_MAP, self.backends),
            (EXT_SERVICES6_MAP, self.external_services),
            (EXT_BACKENDS6_MAP, self.external_backends),
            (FLOWS6_MAP, self.flows),
        ]
    }
}

/// The `run` flag that sizes a map.
#[must_use]
pub fn size_flag(map: &str) -> &'static str {
    match map {
        SERVICES_MAP | SERVICES6_MAP => "--services-map-size",
        BACKENDS_MAP | BACKENDS6_MAP => "--backends-map-size",
        EXT_SERVICES_MAP | EXT_SERVICES6_MAP => "--external-services-map-size",
        EXT_BACKENDS_MAP | EXT_BACKENDS6_MAP => "--external-backends-map-size",
        FLOWS_MAP | FLOWS6_MAP => "--flow-table-size",
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
    /// The IPv6 `--cluster-cidr`, as its network and prefix length:
    /// IPv6 ClusterIP traffic from outside it is masqueraded.
    pub cluster_cidr6: Option<(Ipv6Addr, u8)>,
    /// `--masquerade-all`: all ClusterIP traffic from outside is.
    pub masquerade_all: bool,
    /// `--socket-lb-scope=host`: the cookie of the network namespace whose
    /// sockets alone are balanced at `connect()`; 0 for every socket.
    pub host_netns_cookie: u64,
    /// `run --trace`: the programs log each translation (aya-log).
    pub trace: bool,
}

impl ProgramSettings {
    /// The tc ingress program's globals and their values.
    fn globals(&self) -> [(&'static str, u32); 4] {
        let (addr, mask) = self
            .cluster_cidr
            .map_or((0, 0), crate::model::Cidr::ipv4_network_and_mask_be);
        [
            (MASQUERADE_MARK_GLOBAL, self.masquerade_mark),
            (CLUSTER_CIDR_ADDR_GLOBAL, addr),
            (CLUSTER_CIDR_MASK_GLOBAL, mask),
            (MASQUERADE_ALL_GLOBAL, u32::from(self.masquerade_all)),
        ]
    }

    /// The tc ingress program's IPv6 globals: the cluster CIDR's network
    /// and netmask, each as four words in network byte order, as the
    /// program compares them with an address; all zero for none.
    fn globals6(&self) -> [(&'static str, [u32; 4]); 2] {
        let (net, mask) = self.cluster_cidr6.map_or((0, 0), |(addr, prefix)| {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            (u128::from(addr) & mask, mask)
        });
        [
            (CLUSTER_CIDR6_ADDR_GLOBAL, network_words(net)),
            (CLUSTER_CIDR6_MASK_GLOBAL, network_words(mask)),
        ]
    }
}

/// An IPv6 address (or mask) as the programs hold it: its sixteen octets
/// in network order, read as four native `u32`s.
fn network_words(value: u128) -> [u32; 4] {
    let octets = value.to_be_bytes();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
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
        let globals6 = settings.globals6();
        for (name, value) in &globals6 {
            loader.override_global(name, value, true);
        }
        loader.override_global(HOST_NETNS_COOKIE_GLOBAL, &settings.host_netns_cookie, true);
        // aya-log's level: off (0) unless tracing, so that the verifier,
        // which sees a constant, drops every log statement.
        let log_level: u8 = if settings.trace {
            aya_log::Level::Info as u8
        } else {
            0
        };
        loader.override_global(aya_log::LEVEL, &log_level, true);
        for name in MAPS {
            // Opens the pinned map when there is one, else creates and pins it.
            loader.map_pin_path(name, pins.map(name));
        }
        for (name, size) in sizes.by_name() {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Object)?;
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
        let held = held::Held::maps_of(&pins)?;
        Ok(Self {
            ebpf,
            pins,
            tcx: true,
            held,
        })
    }
}

/// Loads every program of the object into the kernel.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    for name in PROGRAMS {
        cgroup_program(ebpf, name)?.load()?;
    }
    for TcProgram { name, .. } in TC_PROGRAMS {
        classifier(ebpf, name)?
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(())
}

/// A program of the object as its type (a cgroup sock_addr program, a tc
/// classifier).
fn typed_program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// A cgroup program of the object: a socket-address hook, or a socket
/// hook (`sock_release`).
pub(super) enum CgroupProgram<'a> {
    SockAddr(&'static str, &'a mut CgroupSockAddr),
    Sock(&'static str, &'a mut CgroupSock),
}

pub(super) fn cgroup_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<CgroupProgram<'a>, LoadError> {
    match ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
    {
        Program::CgroupSockAddr(program) => Ok(CgroupProgram::SockAddr(name, program)),
        Program::CgroupSock(program) => Ok(CgroupProgram::Sock(name, program)),
        _ => Err(LoadError::Program {
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

    fn load(&mut self) -> Result<(), LoadError> {
        let name = self.name();
        match self {
            Self::SockAddr(_, program) => program.load(),
            Self::Sock(_, program) => program.load(),
        }
        .map_err(|source| LoadError::Program { name, source })
    }

    pub(super) fn fd(&self) -> Result<&aya::programs::ProgramFd, LoadError> {
        let name = self.name();
        match self {
            Self::SockAddr(_, program) => program.fd(),
            Self::Sock(_, program) => program.fd(),
        }
        .map_err(|source| LoadError::Program { name, source })
    }
}

pub(super) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    typed_program(ebpf, name)
}

/// Loads every program into the kernel with tiny, unpinned maps and
/// attaches nothing, then unloads them: the verifier's word on whether this
/// kernel has the program types, attach types and helpers they need.
pub fn probe_load() -> Result<(), DatapathError> {
    let mut loader = EbpfLoader::new();
    // As an agent without --trace loads them (see `Datapath::load`).
    loader.override_global(aya_log::LEVEL, &0_u8, true);
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
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Object)?;
    load_programs(&mut ebpf)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proxy_common::{
        Backend, EVENTS_MAP, Event, SOCK_REV_NAT_MAP, ServiceKey, ServiceValue, SockRevNat,
    };

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
        assert_eq!(
            programs,
            PROGRAMS
                .into_iter()
                .chain(TC_PROGRAMS.map(|program| program.name))
                .collect()
        );

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

    /// The IPv6 cluster CIDR reaches the program as it compares: network
    /// and mask in network byte order, word by word; none is all zero.
    #[test]
    fn the_ipv6_cluster_cidr_is_network_and_mask_in_network_order() {
        let words = |text: &str| {
            let octets = text.parse::<Ipv6Addr>().unwrap().octets();
            std::array::from_fn::<u32, 4, _>(|i| {
                u32::from_ne_bytes([
                    octets[4 * i],
                    octets[4 * i + 1],
                    octets[4 * i + 2],
                    octets[4 * i + 3],
                ])
            })
        };
        let settings = |cidr6| ProgramSettings {
            cluster_cidr6: cidr6,
            ..ProgramSettings::default()
        };
        let host_bits_set = ("fd00:10:244:12::1".parse().unwrap(), 56);
        assert_eq!(
            settings(Some(host_bits_set)).globals6(),
            [
                (CLUSTER_CIDR6_ADDR_GLOBAL, words("fd00:10:244::")),
                (CLUSTER_CIDR6_MASK_GLOBAL, words("ffff:ffff:ffff:ff00::")),
            ]
        );
        let everything = ("::".parse().unwrap(), 0);
        for none in [None, Some(everything)] {
            assert_eq!(
                settings(none).globals6(),
                [
                    (CLUSTER_CIDR6_ADDR_GLOBAL, [0; 4]),
                    (CLUSTER_CIDR6_MASK_GLOBAL, [0; 4]),
                ]
            );
        }
    }
}
