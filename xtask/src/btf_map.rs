//! BTF made by hand, and a map pinned with it: what the tests need to show
//! the agent a map of the right sizes but another layout. bpftool's
//! `map create` cannot attach BTF, so this loads the blob itself
//! (BPF_BTF_LOAD), creates the map with its key and value types
//! (BPF_MAP_CREATE) and pins it (BPF_OBJ_PIN).
//!
//! aya 0.14 cannot do it: it loads BTF only from an object's `.BTF`
//! section (its BPF_BTF_LOAD wrapper is crate-private), and the
//! `aya_obj::Map::Btf` that `MapData::create` takes with type ids can only
//! be made by aya-obj's own ELF parser (its fields are crate-private).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_TYPEDEF: u32 = 8;
const INT_SIGNED: u32 = 1;

/// Writes a BTF blob type by type, in this machine's byte order. Ids are
/// handed out from 1, in the order types are added.
#[derive(Debug)]
pub struct BtfBuilder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

impl Default for BtfBuilder {
    fn default() -> Self {
        Self {
            types: Vec::new(),
            // Offset 0 is the empty name.
            strings: vec![0],
            next_id: 1,
        }
    }
}

impl BtfBuilder {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn string(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let offset = u32::try_from(self.strings.len()).expect("small BTF");
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        offset
    }

    /// Appends a type given as its raw words (the name given as a string):
    /// for types this builder has no helper for, or for broken ones.
    pub fn raw(&mut self, name: &str, words: &[u32]) -> u32 {
        let name_off = self.string(name);
        self.types.extend_from_slice(&name_off.to_ne_bytes());
        for word in words {
            self.types.extend_from_slice(&word.to_ne_bytes());
        }
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn int(&mut self, name: &str, size: u32, signed: bool) -> u32 {
        let encoding = if signed { INT_SIGNED } else { 0 };
        self.raw(name, &[KIND_INT << 24, size, (encoding << 24) | (size * 8)])
    }

    pub fn pointer(&mut self, to: u32) -> u32 {
        self.raw("", &[KIND_PTR << 24, to])
    }

    pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
        self.raw(name, &[KIND_TYPEDEF << 24, to])
    }

    /// `[elem; len]`; `index` is any integer type (the kernel wants one).
    pub fn array(&mut self, elem: u32, index: u32, len: u32) -> u32 {
        self.raw("", &[KIND_ARRAY << 24, 0, elem, index, len])
    }

    /// A struct of `size` bytes with `members` as (name, type, bit offset).
    pub fn structure(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let mut words = vec![
            (KIND_STRUCT << 24) | u32::try_from(members.len()).expect("few members"),
            size,
        ];
        for &(member, ty, offset) in members {
            words.extend([self.string(member), ty, offset]);
        }
        self.raw(name, &words)
    }

    /// The blob: header, types, strings.
    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        let type_len = u32::try_from(self.types.len()).expect("small BTF");
        let str_len = u32::try_from(self.strings.len()).expect("small BTF");
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9f_u16.to_ne_bytes());
        out.extend([1, 0]); // version, flags
        for word in [24, 0, type_len, type_len, str_len] {
            out.extend_from_slice(&u32::to_ne_bytes(word));
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// What [`pin_map`] creates.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub key_type_id: u32,
    pub value_type_id: u32,
}

/// `BPF_MAP_TYPE_HASH`.
pub const MAP_TYPE_HASH: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct BtfLoadAttr {
    btf: u64,
    log_buf: u64,
    btf_size: u32,
    log_size: u32,
    log_level: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    btf_vmlinux_value_type_id: u32,
    map_extra: u64,
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_BTF_LOAD: libc::c_long = 18;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a bpf_attr prefix of the size passed, valid for the call.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads `btf`, creates a map of `spec` whose key and value are described
/// by it, and pins the map at `path`. The kernel's BTF log is in the error.
pub fn pin_map(path: &Path, btf: &[u8], spec: MapSpec) -> io::Result<()> {
    let mut log = vec![0_u8; 64 * 1024];
    let mut load = BtfLoadAttr {
        btf: btf.as_ptr() as u64,
        log_buf: log.as_mut_ptr() as u64,
        btf_size: u32::try_from(btf.len()).map_err(io::Error::other)?,
        log_size: u32::try_from(log.len()).map_err(io::Error::other)?,
        log_level: 1,
    };
    let btf_fd = bpf(BPF_BTF_LOAD, &mut load).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        io::Error::new(
            e.kind(),
            format!(
                "BPF_BTF_LOAD: {e}: {}",
                String::from_utf8_lossy(&log[..end])
            ),
        )
    })?;
    let btf_fd = owned(btf_fd)?;
    let mut create = MapCreateAttr {
        map_type: spec.map_type,
        key_size: spec.key_size,
        value_size: spec.value_size,
        max_entries: spec.max_entries,
        map_flags: spec.flags,
        btf_fd: u32::try_from(btf_fd.as_raw_fd()).map_err(io::Error::other)?,
        btf_key_type_id: spec.key_type_id,
        btf_value_type_id: spec.value_type_id,
        ..MapCreateAttr::default()
    };
    create.map_name[..4].copy_from_slice(b"test");
    let map_fd = owned(bpf(BPF_MAP_CREATE, &mut create)?)?;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut pin = ObjPinAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: u32::try_from(map_fd.as_raw_fd()).map_err(io::Error::other)?,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut pin).map(drop)
}
