//! The bpf(2) calls aya does not make for us, and two questions about file
//! systems.
//!
//! aya opens pinned maps and links (`MapData::from_pin`,
//! `PinnedLink::from_pin`) and reads a map's size and type (`MapInfo`), and
//! the agent uses those where they suffice. What is here, aya does not
//! offer: a descriptor of a pinned link the agent can hold and swap a
//! program into (aya keeps a link's descriptor to itself), pinning a held
//! descriptor again, a map's BTF ids and its BTF by id, writing many
//! entries in one call, and what the kernel says of a cgroup or TCX link
//! and of a cgroup's programs. The attribute layouts are aya-obj's
//! generated `bpf_attr`.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_btf_info, bpf_cmd, bpf_map_info};
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, FsType};

/// An attribute of all zeroes, as the kernel expects every field a command
/// does not use.
fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of structs of integers, for which all
    // zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// A descriptor as the attribute's fields hold one.
fn fd_field(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// The bpf(2) system call; the kernel may write results back into `attr`.
///
/// # Safety
///
/// Every address in `attr` that `cmd` has the kernel follow (a path, keys,
/// values, an info struct, an array of ids) must be valid for the kernel to
/// read, and to write where `cmd` writes, for the length `attr` gives, until
/// the call returns.
unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a whole, writable bpf_attr of the size passed, so
    // the kernel reads and writes within it; the addresses inside it are
    // the caller's to vouch for, as above.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A descriptor a command returned, now ours to close.
fn owned_fd(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: the kernel just made this descriptor for us, and no one else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens a pinned BPF object as a descriptor of our own: for links, which
/// aya opens but keeps the descriptor of, and for `doctor`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET reads the path, a C string that outlives the call.
    let fd = unsafe { bpf(bpf_cmd::BPF_OBJ_GET, &mut attr) }?;
    owned_fd(fd)
}

/// Pins the map or link behind `fd` at `path`, as the agent does again
/// when its pins were removed under it: the same object, so the programs
/// and a later agent find what the agent holds.
pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = fd_field(fd.as_fd());
    // SAFETY: BPF_OBJ_PIN reads the path, a C string that outlives the call.
    unsafe { bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// BPF_OBJ_GET_INFO_BY_FD: the kernel's description of the object behind
/// `fd`, in the layout of its kind, into `info`.
///
/// # Safety
///
/// `T` must be the kernel's info struct for the kind of `fd` (or one that
/// the kernel fills only with integers), and any buffer an address in
/// `info` names (`bpf_btf_info::btf`) must be valid for writes of the size
/// given beside it.
unsafe fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd_field(fd);
    attr.info.info_len = u32::try_from(size_of::<T>()).unwrap_or(u32::MAX);
    attr.info.info = std::ptr::from_mut(info) as u64;
    // SAFETY: the kernel writes at most `info_len` bytes to `info`, which
    // is that big and ours until the call returns; the buffers inside it
    // are the caller's to vouch for, as above.
    unsafe { bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.map(drop)
}

/// Whether `fd` is a bpf object of `kind` (`bpf-map`, `bpf-link`):
/// BPF_OBJ_GET_INFO_BY_FD answers for any bpf object, in that object's
/// own layout, so the kind is checked first.
fn check_kind(fd: BorrowedFd<'_>, kind: &str) -> io::Result<()> {
    let found = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if found.as_os_str() == format!("anon_inode:{kind}").as_str() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a {} but {}", &kind[4..], found.display()),
        ))
    }
}

/// The kernel's definition of the map behind `fd`, with its BTF ids (which
/// aya's `MapInfo` does not give); an error if `fd` is not a map at all (a
/// pinned program or link).
pub fn map_info(fd: impl AsFd) -> io::Result<bpf_map_info> {
    let fd = fd.as_fd();
    check_kind(fd, "bpf-map")?;
    // SAFETY: bpf_map_info is plain integers, for which zero is valid.
    let mut info: bpf_map_info = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a map, whose info is a bpf_map_info, of integers only.
    unsafe { obj_info(fd, &mut info) }?;
    Ok(info)
}

/// The raw BTF blob with id `btf_id` (a map's `btf_id`), as it was loaded.
/// Needs CAP_SYS_ADMIN: the kernel hands out objects by id only to it.
pub fn btf_by_id(btf_id: u32) -> io::Result<Vec<u8>> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = btf_id;
    // SAFETY: BPF_BTF_GET_FD_BY_ID follows no address.
    let fd = owned_fd(unsafe { bpf(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr) }?)?;
    // The first call, with no buffer, tells the size; BTF never changes
    // once loaded, so the second gets all of it.
    let size = btf_info(fd.as_fd(), &mut [])?;
    let mut data = vec![0; size as usize];
    let got = btf_info(fd.as_fd(), &mut data)?;
    data.truncate(got as usize);
    Ok(data)
}

/// BPF_OBJ_GET_INFO_BY_FD on a BTF object: copies at most `data.len()`
/// bytes of it into `data` and returns its full size.
fn btf_info(fd: BorrowedFd<'_>, data: &mut [u8]) -> io::Result<u32> {
    // SAFETY: bpf_btf_info is plain integers, for which zero is valid.
    let mut info: bpf_btf_info = unsafe { std::mem::zeroed() };
    if !data.is_empty() {
        info.btf = data.as_mut_ptr() as u64;
        info.btf_size = u32::try_from(data.len()).unwrap_or(u32::MAX);
    }
    // SAFETY: `fd` is a BTF object, whose info is a bpf_btf_info; its `btf`
    // is null or `data`, writable for the `btf_size` bytes given.
    unsafe { obj_info(fd, &mut info) }?;
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
    let map = map.as_fd();
    // The kernel reads count * key_size bytes from `keys`, and as many
    // values: refuse slices that are not exactly that long.
    let info = match map_info(map) {
        Ok(info) => info,
        Err(error) => return (0, Err(error)),
    };
    if Some(keys.len()) != count.checked_mul(info.key_size as usize)
        || Some(values.len()) != count.checked_mul(info.value_size as usize)
    {
        return (
            0,
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "keys or values are not of the map's sizes",
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
    let mut attr = zeroed_attr();
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = wanted;
    attr.batch.map_fd = fd_field(map);
    // SAFETY: BPF_MAP_UPDATE_BATCH reads `count` keys and values of the
    // map's sizes, which the slices were checked to hold exactly, and they
    // outlive the call; it writes back only into `attr`.
    let result = unsafe { bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop);
    // SAFETY: `batch` is the member written above and by the kernel.
    let written = unsafe { attr.batch.count };
    (written.min(wanted) as usize, result)
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
    let mut attr = zeroed_attr();
    attr.link_update.link_fd = fd_field(link.as_fd());
    attr.link_update.__bindgen_anon_1.new_prog_fd = fd_field(program.as_fd());
    // SAFETY: BPF_LINK_UPDATE follows no address.
    unsafe { bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr) }.map(drop)
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
    if fs_type(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    if !dir.starts_with(BPFFS_MOUNT) {
        return Err(io::Error::other(format!(
            "{} is not on a bpf file system; use a directory under {BPFFS_MOUNT}",
            dir.display()
        )));
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS_MOUNT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Whether `path` is a directory of a cgroup v2 hierarchy (not v1, not a
/// plain directory), where cgroup programs can be attached.
pub fn is_cgroup2(path: &Path) -> io::Result<bool> {
    Ok(fs_type(path)? == CGROUP2_SUPER_MAGIC)
}

/// The file system type of `path` (statfs's `f_type`).
fn fs_type(path: &Path) -> io::Result<FsType> {
    Ok(nix::sys::statfs::statfs(path)?.filesystem_type())
}

/// Whether `path` is on a bpf file system, without mounting anything.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    Ok(fs_type(path)? == BPF_FS_MAGIC)
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

/// The kernel's description of the link behind `fd` (aya's `LinkInfo`
/// leaves out the cgroup and the device); an error if `fd` is not a link.
fn link_info(fd: BorrowedFd<'_>) -> io::Result<aya_obj::generated::bpf_link_info> {
    check_kind(fd, "bpf-link")?;
    // SAFETY: bpf_link_info is plain integers, for which zero is valid.
    let mut info: aya_obj::generated::bpf_link_info = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a link, whose info is a bpf_link_info; its few
    // addresses are zero, which the kernel takes as no buffer.
    unsafe { obj_info(fd, &mut info) }?;
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

/// The cookie of the calling thread's network namespace, as
/// `bpf_get_netns_cookie` gives it to the programs (Linux 5.14 and later).
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: a plain socket call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let socket = owned_fd(libc::c_long::from(fd))?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or_default();
    // SAFETY: the value and its length are this frame's, valid for the call.
    let got = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if got != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
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

/// The ids of the programs attached to the cgroup `cgroup` (an open
/// directory) for `attach_type`; with `effective`, those inherited from
/// its ancestors too, which run on its sockets as well.
pub fn cgroup_prog_ids(
    cgroup: impl AsFd,
    attach_type: u32,
    effective: bool,
) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = zeroed_attr();
        attr.query.__bindgen_anon_1.target_fd = fd_field(cgroup.as_fd());
        attr.query.attach_type = attach_type;
        attr.query.query_flags = if effective {
            aya_obj::generated::BPF_F_QUERY_EFFECTIVE
        } else {
            0
        };
        attr.query.prog_ids = ids.as_mut_ptr() as u64;
        attr.query.__bindgen_anon_2.prog_cnt = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        // SAFETY: BPF_PROG_QUERY writes at most `prog_cnt` ids into `ids`,
        // which holds that many and outlives the call, and the count back
        // into `attr`.
        let result = unsafe { bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr) };
        // SAFETY: `query` is the member written above and by the kernel.
        let count = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
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
