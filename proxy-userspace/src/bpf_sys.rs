//! The system calls aya does not make for us: opening and pinning an object,
//! reading a map's definition and BTF from the kernel, writing many map
//! entries in one call, swapping the program behind a link, and asking
//! which file system a path is on.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_btf_info, bpf_cmd, bpf_map_info};

const BPF_OBJ_GET: bpf_cmd = bpf_cmd::BPF_OBJ_GET;
const BPF_OBJ_PIN: bpf_cmd = bpf_cmd::BPF_OBJ_PIN;
const BPF_LINK_UPDATE: bpf_cmd = bpf_cmd::BPF_LINK_UPDATE;
const BPF_OBJ_GET_INFO_BY_FD: bpf_cmd = bpf_cmd::BPF_OBJ_GET_INFO_BY_FD;
const BPF_BTF_GET_FD_BY_ID: bpf_cmd = bpf_cmd::BPF_BTF_GET_FD_BY_ID;
const BPF_MAP_UPDATE_BATCH: bpf_cmd = bpf_cmd::BPF_MAP_UPDATE_BATCH;

/// `union bpf_attr` for the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: how many entries; out: how many were processed.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_OBJ_GET and BPF_OBJ_PIN.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    pad: u32,
}

/// `union bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr` for BPF_BTF_GET_FD_BY_ID.
#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

fn bpf<T>(cmd: bpf_cmd, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a bpf_attr prefix of the size passed, valid for the
    // call; commands that write back into it go through `bpf_mut`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_ref(attr),
            size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// [`bpf`] for commands that write results back into the attribute.
fn bpf_mut<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: as in `bpf`; the kernel writes only within the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned BPF object (here, a link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    let fd = i32::try_from(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the map or link behind `fd` at `path`, as the agent does again
/// when its pins were removed under it: the same object, so the programs
/// and a later agent find what the agent holds.
pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: u32::try_from(fd.as_fd().as_raw_fd()).unwrap_or(u32::MAX),
        ..ObjGetAttr::default()
    };
    bpf(BPF_OBJ_PIN, &attr).map(drop)
}

/// The kernel's definition of the map behind `fd`; an error if `fd` is
/// not a map at all (a pinned program or link).
pub fn map_info(fd: impl AsFd) -> io::Result<bpf_map_info> {
    let fd = fd.as_fd();
    // BPF_OBJ_GET_INFO_BY_FD answers for any bpf object, in that object's
    // own layout, so the kind is checked first.
    let kind = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if kind.as_os_str() != "anon_inode:bpf-map" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a map but {}", kind.display()),
        ));
    }
    // SAFETY: bpf_map_info is plain integers, for which zero is valid.
    let mut info: bpf_map_info = unsafe { std::mem::zeroed() };
    let attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
        info_len: u32::try_from(size_of::<bpf_map_info>()).unwrap_or(u32::MAX),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info)
}

/// The raw BTF blob with id `btf_id` (a map's `btf_id`), as it was loaded.
/// Needs CAP_SYS_ADMIN: the kernel hands out objects by id only to it.
pub fn btf_by_id(btf_id: u32) -> io::Result<Vec<u8>> {
    let attr = GetFdByIdAttr {
        id: btf_id,
        ..GetFdByIdAttr::default()
    };
    let fd = bpf(BPF_BTF_GET_FD_BY_ID, &attr)?;
    let fd = i32::try_from(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: BPF_BTF_GET_FD_BY_ID returned a new file descriptor that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The first call, with no buffer, tells the size; BTF never changes
    // once loaded, so the second gets all of it.
    let size = btf_info(&fd, &mut [])?;
    let mut data = vec![0; size as usize];
    let got = btf_info(&fd, &mut data)?;
    data.truncate(got as usize);
    Ok(data)
}

/// BPF_OBJ_GET_INFO_BY_FD on a BTF object: copies at most `data.len()`
/// bytes of it into `data` and returns its full size.
fn btf_info(fd: &OwnedFd, data: &mut [u8]) -> io::Result<u32> {
    // SAFETY: bpf_btf_info is plain integers, for which zero is valid.
    let mut info: bpf_btf_info = unsafe { std::mem::zeroed() };
    if !data.is_empty() {
        info.btf = data.as_mut_ptr() as u64;
        info.btf_size = u32::try_from(data.len()).unwrap_or(u32::MAX);
    }
    let attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
        info_len: u32::try_from(size_of::<bpf_btf_info>()).unwrap_or(u32::MAX),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info.btf_size)
}

/// Writes `count` entries (keys and values laid end to end) in one call, in
/// order, as if by one `bpf_map_update_elem` each; returns how many were
/// written before any error.
pub fn map_update_batch(
    map: impl AsFd,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> (usize, io::Result<()>) {
    if count == 0 {
        return (0, Ok(()));
    }
    // The kernel reads count * key_size bytes from `keys`: refuse slices
    // that do not hold that many, whatever the map's sizes.
    if !keys.len().is_multiple_of(count) || !values.len().is_multiple_of(count) {
        return (
            0,
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "keys or values do not divide into entries",
            )),
        );
    }
    let Ok(wanted) = u32::try_from(count) else {
        return (
            0,
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many entries",
            )),
        );
    };
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: wanted,
        map_fd: u32::try_from(map.as_fd().as_raw_fd()).unwrap_or(u32::MAX),
        ..BatchAttr::default()
    };
    let result = bpf_mut(BPF_MAP_UPDATE_BATCH, &mut attr).map(drop);
    (attr.count.min(wanted) as usize, result)
}

/// Whether an error may mean the kernel lacks the call (EINVAL for an
/// unknown command), so that writing one entry at a time is worth a try: it
/// reports any real error again, entry by entry.
#[must_use]
pub fn is_unsupported(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

/// Atomically points a link at another program: sockets see either the old
/// or the new program, never none.
pub fn link_update(link: impl AsFd, program: impl AsFd) -> io::Result<()> {
    let fd = |f: std::os::fd::BorrowedFd<'_>| u32::try_from(f.as_raw_fd()).unwrap_or(u32::MAX);
    let attr = LinkUpdateAttr {
        link_fd: fd(link.as_fd()),
        new_prog_fd: fd(program.as_fd()),
        ..LinkUpdateAttr::default()
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}

/// The bpffs mount point, where the kernel and every tool expect it.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Makes sure `dir` can hold pins: when its nearest existing ancestor is not
/// on a bpf file system and `dir` is under `/sys/fs/bpf`, mounts bpffs there,
/// as Cilium's agent does on nodes that boot without it.
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_magic(existing)? == libc::BPF_FS_MAGIC {
        return Ok(());
    }
    if !dir.starts_with(BPFFS_MOUNT) {
        return Err(io::Error::other(format!(
            "{} is not on a bpf file system; use a directory under {BPFFS_MOUNT}",
            dir.display()
        )));
    }
    let target = CString::new(BPFFS_MOUNT).expect("no NUL");
    let fstype = CString::new("bpf").expect("no NUL");
    // SAFETY: all pointers are valid C strings for the duration of the call.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `path` is a directory of a cgroup v2 hierarchy (not v1, not a
/// plain directory), where cgroup programs can be attached.
pub fn is_cgroup2(path: &Path) -> io::Result<bool> {
    Ok(fs_magic(path)? == libc::CGROUP2_SUPER_MAGIC)
}

/// The file system type of `path` (statfs's `f_type`).
fn fs_magic(path: &Path) -> io::Result<libc::__fsword_t> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type)
}

/// Whether `path` is on a bpf file system, without mounting anything.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(fs_magic(path)? == libc::BPF_FS_MAGIC)
}

/// What the kernel says of a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the cgroup is gone: the link is defunct.
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// The kernel's description of the link behind `fd`; an error if `fd` is
/// not a link.
fn link_info(fd: BorrowedFd<'_>) -> io::Result<aya_obj::generated::bpf_link_info> {
    let kind = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if kind.as_os_str() != "anon_inode:bpf-link" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a link but {}", kind.display()),
        ));
    }
    // SAFETY: bpf_link_info is plain integers, for which zero is valid.
    let mut info: aya_obj::generated::bpf_link_info = unsafe { std::mem::zeroed() };
    let attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
        info_len: u32::try_from(size_of_val(&info)).unwrap_or(u32::MAX),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info)
}

fn wrong_link_type(found: u32, wanted: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a link of type {found}, not a {wanted} link"),
    )
}

/// The link behind `fd`, if it is a cgroup link; an error if `fd` is not a
/// link, or a link of another kind.
pub fn cgroup_link_info(fd: impl AsFd) -> io::Result<CgroupLinkInfo> {
    use aya_obj::generated::bpf_link_type;
    let info = link_info(fd.as_fd())?;
    if info.type_ != bpf_link_type::BPF_LINK_TYPE_CGROUP as u32 {
        return Err(wrong_link_type(info.type_, "cgroup"));
    }
    // SAFETY: the kernel filled the cgroup member, as the type says.
    let cgroup = unsafe { info.__bindgen_anon_1.cgroup };
    Ok(CgroupLinkInfo {
        link_id: info.id,
        prog_id: info.prog_id,
        cgroup_id: cgroup.cgroup_id,
        attach_type: cgroup.attach_type,
    })
}

/// The device index a TCX link is on: 0 once the device is gone, and the
/// link defunct.
pub fn tcx_link_ifindex(fd: impl AsFd) -> io::Result<u32> {
    use aya_obj::generated::bpf_link_type;
    let info = link_info(fd.as_fd())?;
    if info.type_ != bpf_link_type::BPF_LINK_TYPE_TCX as u32 {
        return Err(wrong_link_type(info.type_, "TCX"));
    }
    // SAFETY: the kernel filled the tcx member, as the type says.
    Ok(unsafe { info.__bindgen_anon_1.tcx }.ifindex)
}

/// `union bpf_attr` for BPF_PROG_QUERY, up to the program count.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    pad: u32,
}

/// The ids of the programs attached to the cgroup `cgroup` (an open
/// directory) for `attach_type`; with `effective`, those inherited from
/// its ancestors too, which run on its sockets as well.
pub fn cgroup_prog_ids(
    cgroup: impl AsFd,
    attach_type: u32,
    effective: bool,
) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: bpf_cmd = bpf_cmd::BPF_PROG_QUERY;
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = QueryAttr {
            target_fd: u32::try_from(cgroup.as_fd().as_raw_fd()).unwrap_or(u32::MAX),
            attach_type,
            query_flags: if effective {
                aya_obj::generated::BPF_F_QUERY_EFFECTIVE
            } else {
                0
            },
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            ..QueryAttr::default()
        };
        // The kernel writes the count back into the attribute.
        let result = bpf_mut(BPF_PROG_QUERY, &mut attr);
        let count = attr.prog_cnt as usize;
        match result {
            Ok(_) => {
                ids.truncate(count);
                return Ok(ids);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count > ids.len() => {
                ids.resize(count, 0);
            }
            Err(e) => return Err(e),
        }
    }
}
