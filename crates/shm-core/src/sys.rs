//! The operating-system calls that the `shared_memory` crate does not make for us.
//!
//! `shared_memory` sizes a new segment with `ftruncate` alone, which on tmpfs reserves nothing:
//! the first write to a page that `/dev/shm` cannot back kills the process with SIGBUS. The
//! functions here reserve the memory up front and ask the file system how much is free, so that a
//! full `/dev/shm` becomes an error value at creation time.

use std::fs::File;
use std::io;
use std::path::Path;

/// The directory in which Linux keeps POSIX shared-memory objects.
pub(crate) const SHM_DIR: &str = "/dev/shm";

/// The path of a segment's file, from its POSIX name (`/shm-...`).
pub(crate) fn segment_path(name: &str) -> std::path::PathBuf {
    Path::new(SHM_DIR).join(name.trim_start_matches('/'))
}

/// Bytes that an unprivileged process may still allocate in `/dev/shm`.
pub(crate) fn shm_available() -> io::Result<u64> {
    let path = c"/dev/shm";
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated C string and `stat` points to writable memory of the
    // right type; statvfs writes the whole struct when it returns 0.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Allocates the pages of the first `len` bytes of a freshly created segment, so that later
/// writes cannot fault for want of memory. Fails with `ENOSPC` when `/dev/shm` is full.
pub(crate) fn reserve(name: &str, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let file = File::options()
        .read(true)
        .write(true)
        .open(segment_path(name))?;
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
    loop {
        // SAFETY: fallocate only reads its integer arguments; `file` keeps the descriptor open
        // for the duration of the call.
        let rc = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Maps every page of a fresh, reserved mapping into the page table in one call, so that the
/// first write runs at memory speed instead of taking one page fault per 4 KiB. A kernel
/// without `MADV_POPULATE_WRITE` (before Linux 5.14) leaves the faults to the first write, which
/// is slower but correct, so its refusal is not an error.
pub(crate) fn populate(ptr: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: `ptr..ptr+len` is a live MAP_SHARED mapping of a file whose pages are reserved;
    // populating it faults pages in without changing their contents (they are zero-filled or
    // already hold data), so no Rust-visible memory changes.
    let _ = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
}

/// 64 bits from the kernel's random source.
pub(crate) fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut bytes)?;
    Ok(u64::from_ne_bytes(bytes))
}
