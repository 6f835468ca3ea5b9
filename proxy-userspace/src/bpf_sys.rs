//! The system calls aya does not make for us: opening a pinned link,
//! swapping the program behind it, and mounting bpffs.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

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

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a bpf_attr prefix of the size passed, valid for the call.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<T>()) };
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
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `dir` can hold pins: when its nearest existing ancestor is not
/// on a bpf file system and `dir` is under `/sys/fs/bpf`, mounts bpffs there,
/// as Cilium's agent does on nodes that boot without it.
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
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

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type == BPF_FS_MAGIC)
}
