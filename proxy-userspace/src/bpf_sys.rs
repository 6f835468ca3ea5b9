//! The system calls aya does not make for us: opening a pinned object,
//! reading a map's definition and BTF from the kernel, swapping the program
//! behind a link, and asking which file system a path is on.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_btf_info, bpf_cmd, bpf_map_info};

const BPF_OBJ_GET: bpf_cmd = bpf_cmd::BPF_OBJ_GET;
const BPF_LINK_UPDATE: bpf_cmd = bpf_cmd::BPF_LINK_UPDATE;
const BPF_OBJ_GET_INFO_BY_FD: bpf_cmd = bpf_cmd::BPF_OBJ_GET_INFO_BY_FD;
const BPF_BTF_GET_FD_BY_ID: bpf_cmd = bpf_cmd::BPF_BTF_GET_FD_BY_ID;

/// `union bpf_attr` for BPF_OBJ_GET.
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
    // SAFETY: attr is a bpf_attr prefix of the size passed, valid for the call.
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
