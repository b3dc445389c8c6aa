//! Raw bpf(2) commands aya 0.14 does not expose: cgroup links made, pinned, opened and
//! updated as plain file descriptors (aya cannot turn a sockopt link into a pinnable one), and
//! the program id behind a link (to replace it with `BPF_F_REPLACE`).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::Context as _;

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_LINK_UPDATE` flag: fail unless the link still runs `old_prog_fd`'s program, so two
/// writers never silently replace each other's program.
const BPF_F_REPLACE: u32 = 1 << 2;

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The BPF_OBJ_PIN / BPF_OBJ_GET part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info`; the kernel copies only as much as we ask for.
#[repr(C)]
#[derive(Default)]
struct LinkInfoHead {
    link_type: u32,
    id: u32,
    prog_id: u32,
}

/// The BPF_MAP_*_BATCH part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

fn bpf_syscall<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of `union bpf_attr` for `cmd`, and its size is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_fd(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the bpf command returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Attaches `program` to `cgroup` through a new (multi-attach) link.
pub fn link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> anyhow::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf_syscall(BPF_LINK_CREATE, &mut attr).context("BPF_LINK_CREATE")?;
    Ok(owned_fd(fd))
}

/// Attaches `program` to the network device `ifindex` through a new TCX link (appended after
/// the device's other TCX programs).
pub fn link_create_ifindex(
    program: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> anyhow::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: ifindex,
        attach_type,
        flags: 0,
    };
    let fd = bpf_syscall(BPF_LINK_CREATE, &mut attr).context("BPF_LINK_CREATE (tcx)")?;
    Ok(owned_fd(fd))
}

pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> anyhow::Result<()> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf_syscall(BPF_OBJ_PIN, &mut attr).context("BPF_OBJ_PIN")?;
    Ok(())
}

pub fn obj_get(path: &Path) -> anyhow::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf_syscall(BPF_OBJ_GET, &mut attr)
        .with_context(|| format!("opening pin {}", path.display()))?;
    Ok(owned_fd(fd))
}

/// Id of the program a link runs.
pub fn link_prog_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = LinkInfoHead::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfoHead>() as u32,
        info: &raw mut info as u64,
    };
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.prog_id)
}

fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    bpf_syscall(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned_fd)
}

/// Swaps the program behind an attached link for `program`, atomically (the cgroup is never
/// without a program) and only if the link still runs the program it ran when we looked.
pub fn link_replace(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let old = prog_fd_by_id(link_prog_id(link)?)?;
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old.as_raw_fd() as u32,
    };
    bpf_syscall(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// A batch update that stopped at an element: how many were written before it, and why.
#[derive(Debug)]
pub struct BatchError {
    pub written: usize,
    pub error: io::Error,
}

/// Writes `count` elements in one `BPF_MAP_UPDATE_BATCH` call: `keys` and `values` are the
/// elements' bytes back to back (per-CPU values: one slot per possible CPU, each rounded up to
/// 8 bytes). The kernel stops at the first element it cannot write.
pub fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
    elem_flags: u64,
) -> Result<(), BatchError> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags,
        ..Default::default()
    };
    match bpf_syscall(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => Ok(()),
        Err(error) => Err(BatchError {
            written: attr.count as usize,
            error,
        }),
    }
}

/// Elements `0..end` of an array map, read with `BPF_MAP_LOOKUP_BATCH` a few thousand at a
/// time and handed to `each` as (first index, values back to back). Only the indexes in use
/// are read: an array sized for 131k services costs ten times more to read whole than
/// the 10k a node may use. Per-CPU values as for `map_lookup_batch_each`.
pub fn array_lookup_batch_each(
    map: BorrowedFd<'_>,
    value_size: usize,
    end: u32,
    mut each: impl FnMut(u32, &[u8]),
) -> io::Result<()> {
    const CHUNK: u32 = 4096;
    let mut keys = vec![0u8; CHUNK as usize * size_of::<u32>()];
    let mut values = vec![0u8; CHUNK as usize * value_size];
    // The batch token of an array is the last index read.
    let (mut start, mut last) = (0u32, 0u32);
    while start < end {
        let want = (end - start).min(CHUNK);
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if start == 0 {
                0
            } else {
                &raw const last as u64
            },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf_syscall(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count.min(want);
        if result.is_ok() || matches!(&result, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
            each(start, &values[..got as usize * value_size]);
        }
        match result {
            // An array has no holes: `got` elements from `start` on.
            Ok(_) if got > 0 => {
                start += got;
                last = next;
            }
            Ok(_) => return Err(io::Error::other("BPF_MAP_LOOKUP_BATCH returned nothing")),
            // The array ends before `end`.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Every element of a hash map, read with `BPF_MAP_LOOKUP_BATCH` a few thousand at a time
/// instead of two syscalls per element, each batch handed to `each` (keys, values; each back
/// to back) as it is read, in buffers reused from one batch to the next: a caller that
/// reduces the elements never holds them all (40k pairs' counters are 7 MB).
/// Per-CPU values: one slot per possible CPU, each rounded up to 8 bytes. Not for arrays
/// (their batch token is key-sized, a hash map's a bucket number).
pub fn map_lookup_batch_each(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut each: impl FnMut(&[u8], &[u8]),
) -> io::Result<()> {
    let mut chunk: usize = 4096;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut token: u64 = 0;
    let mut first = true;
    // Each call returns at least one element or ends; bounded by the map's size anyway.
    for _ in 0..(1 << 20) {
        keys.resize(chunk * key_size, 0);
        values.resize(chunk * value_size, 0);
        let mut next: u64 = 0;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf_syscall(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = (attr.count as usize).min(chunk);
        // The kernel reports the elements it copied, also along with ENOENT (the last batch).
        if result.is_ok() || matches!(&result, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
            each(&keys[..got * key_size], &values[..got * value_size]);
        }
        match result {
            Ok(_) => {
                token = next;
                first = false;
            }
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            // One bucket holds more elements than fit: ask for more at once.
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) && chunk < (1 << 20) => {
                chunk *= 2;
            }
            Err(err) => return Err(err),
        }
    }
    Err(io::Error::other("BPF_MAP_LOOKUP_BATCH did not end"))
}
