//! The operating-system calls of shm-core, through `rustix`: creating, reserving, mapping and
//! unmapping segments, and asking `/dev/shm` how much room it has.
//!
//! `shared_memory` is not used for these: it sizes a new object with `ftruncate` alone (which
//! on tmpfs reserves nothing, so a full `/dev/shm` is a SIGBUS at first write), maps every
//! object read-write, and keeps a file descriptor open for as long as the mapping lives (so
//! a process with the common limit of 1,024 descriptors fails at about the thousandth live
//! segment). Here a descriptor lives only between `shm_open` and `mmap`.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{FallocateFlags, Mode};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::shm;

/// The directory in which Linux keeps POSIX shared-memory objects.
pub(crate) const SHM_DIR: &str = "/dev/shm";

/// The path of a segment's file, from its POSIX name (`/shm-...`).
pub(crate) fn segment_path(name: &str) -> std::path::PathBuf {
    Path::new(SHM_DIR).join(name.trim_start_matches('/'))
}

/// Bytes that an unprivileged process may still allocate in `/dev/shm`.
pub(crate) fn shm_available() -> io::Result<u64> {
    let stat = rustix::fs::statvfs(SHM_DIR)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Creates a new object, readable and writable by this user only; `AlreadyExists` when the
/// name is taken.
pub(crate) fn create(name: &str) -> io::Result<OwnedFd> {
    let flags = shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR;
    Ok(shm::open(name, flags, Mode::RUSR | Mode::WUSR)?)
}

/// Opens an existing object, for reading only or for reading and writing.
pub(crate) fn open(name: &str, writable: bool) -> io::Result<OwnedFd> {
    let flags = if writable {
        shm::OFlags::RDWR
    } else {
        shm::OFlags::RDONLY
    };
    Ok(shm::open(name, flags, Mode::empty())?)
}

/// The length of an open object.
pub(crate) fn len_of(fd: &OwnedFd) -> io::Result<u64> {
    u64::try_from(rustix::fs::fstat(fd)?.st_size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "negative object size"))
}

/// Sizes a freshly created object to `len` bytes and allocates its pages, so that later
/// writes cannot fault for want of memory. Fails with `ENOSPC` when `/dev/shm` is full.
pub(crate) fn reserve(fd: &OwnedFd, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    loop {
        match rustix::fs::fallocate(fd, FallocateFlags::empty(), 0, len as u64) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(err) => return Err(err.into()),
        }
    }
}

/// Maps `len` bytes of an object, shared with every other mapping of it; read-only unless
/// `writable`. The descriptor may be closed afterwards: the mapping stays.
pub(crate) fn map(fd: &OwnedFd, len: usize, writable: bool) -> io::Result<*mut u8> {
    if len == 0 {
        return Ok(std::ptr::NonNull::<u64>::dangling().as_ptr().cast());
    }
    let prot = if writable {
        ProtFlags::READ | ProtFlags::WRITE
    } else {
        ProtFlags::READ
    };
    // SAFETY: a null address lets the kernel choose where to map, so no existing memory of
    // this process is replaced; `fd` is open for the duration of the call.
    let ptr =
        unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0)? };
    Ok(ptr.cast())
}

/// Maps `len` bytes of fresh, private, zero-filled memory, its pages populated at once.
pub(crate) fn map_private(len: usize) -> io::Result<*mut u8> {
    if len == 0 {
        return Ok(std::ptr::NonNull::<u64>::dangling().as_ptr().cast());
    }
    // SAFETY: a null address lets the kernel choose where to map, so no existing memory of
    // this process is replaced; an anonymous mapping needs no descriptor.
    let ptr = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::POPULATE,
        )?
    };
    Ok(ptr.cast())
}

/// Unmaps what [`map`] or [`map_private`] returned.
///
/// # Safety
///
/// `ptr` and `len` come from one call of [`map`] or [`map_private`], and nothing reads or writes the mapping
/// afterwards.
pub(crate) unsafe fn unmap(ptr: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the caller guarantees that the range is one whole mapping of ours that is no
    // longer used. A failure leaves the mapping in place, which is only a leak of address
    // space; there is nobody to report it to in a destructor.
    let _ = unsafe { rustix::mm::munmap(ptr.cast(), len) };
}

/// Maps every page of a fresh, reserved mapping into the page table in one call, so that the
/// first write runs at memory speed instead of taking one page fault per 4 KiB. A kernel
/// without `MADV_POPULATE_WRITE` (before Linux 5.14) leaves the faults to the first write, which
/// is slower but correct, so its refusal is not an error.
pub(crate) fn populate(ptr: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: `ptr..ptr+len` is a live, writable MAP_SHARED mapping of a file whose pages are
    // reserved; populating it faults pages in without changing their contents (they are
    // zero-filled or already hold data), so no Rust-visible memory changes.
    let _ = unsafe { rustix::mm::madvise(ptr.cast(), len, rustix::mm::Advice::LinuxPopulateWrite) };
}

/// Removes an object's name.
pub(crate) fn unlink(name: &str) -> io::Result<()> {
    Ok(shm::unlink(name)?)
}

/// 64 bits from the kernel's random source.
pub(crate) fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    let mut filled = 0;
    while filled < bytes.len() {
        match rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(u64::from_ne_bytes(bytes))
}
