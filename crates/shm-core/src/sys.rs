//! The operating-system calls of shm-core, through `rustix`: creating, sealing, reserving,
//! checking, mapping and unmapping segments.
//!
//! `shared_memory` is not used for these: it sizes a new object with `ftruncate` alone (which
//! on tmpfs reserves nothing, so a full `/dev/shm` is a SIGBUS at first write), maps every
//! object read-write, keeps a file descriptor open for as long as each mapping lives, and
//! opens whatever a name points to. Here a segment is an anonymous, sealed memfd that no name
//! reaches, and a named object of another program is opened without following links or
//! blocking, and checked before a byte of it is mapped.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{FallocateFlags, FileType, MemfdFlags, Mode, OFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

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

/// The seals every segment carries before anyone else can see it: its length can never change
/// (so no peer can truncate it under our mapping, and a read never faults with SIGBUS), and no
/// seal can be added (so no peer can forbid writes its owner relies on).
const LENGTH_SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// The seals of a segment of data, which only its creator writes: besides [`LENGTH_SEALS`],
/// no writable mapping can be made of it any more, nor can it be written or have holes punched
/// in it — by anyone, through any descriptor, `/proc/PID/fd` included. The creator's own
/// mapping, made before the seal, stays writable.
const DATA_SEALS: SealFlags = LENGTH_SEALS.union(SealFlags::FUTURE_WRITE);

/// Creates an anonymous memory file that allows sealing. `name` shows in `/proc/PID/fd` and
/// `/proc/PID/maps` only; no other process can open it by that name.
pub(crate) fn create_memfd(name: &str) -> io::Result<OwnedFd> {
    let name = name.trim_start_matches('/');
    Ok(rustix::fs::memfd_create(
        name,
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?)
}

/// Seals a reserved and mapped memfd: against any change of length, and, unless `shared`
/// (a structure both sides write, such as the transport's channel), against writes by anyone
/// but the mapping that already exists.
pub(crate) fn seal(fd: &OwnedFd, shared: bool) -> io::Result<()> {
    let seals = if shared { LENGTH_SEALS } else { DATA_SEALS };
    Ok(rustix::fs::fcntl_add_seals(fd, seals)?)
}

/// What a received descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sealed {
    /// Not a memfd sealed against shrinking and growing: refused.
    No,
    /// Sealed against any change of length, writable by both sides.
    Length,
    /// Sealed against any change of length and against writes but its creator's.
    LengthAndWrites,
}

/// How `fd` is sealed: a receiver maps only memfds whose length nobody can change.
pub(crate) fn sealed(fd: &OwnedFd) -> io::Result<Sealed> {
    let stat = rustix::fs::fstat(fd)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Ok(Sealed::No);
    }
    let seals = match rustix::fs::fcntl_get_seals(fd) {
        Ok(seals) => seals,
        // Files that cannot carry seals at all.
        Err(rustix::io::Errno::INVAL) => return Ok(Sealed::No),
        Err(err) => return Err(err.into()),
    };
    Ok(if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
        Sealed::No
    } else if seals.contains(SealFlags::FUTURE_WRITE) || seals.contains(SealFlags::WRITE) {
        Sealed::LengthAndWrites
    } else {
        Sealed::Length
    })
}

/// Why a named object is refused before it is mapped.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The system refused: no such name, permissions, …
    Os(io::Error),
    /// The name leads to something that is not a segment.
    NotASegment(&'static str),
}

/// Opens an existing named object of another program, for reading only or for reading and
/// writing, and checks it before anything maps it: the name must be the object itself (not a
/// symbolic link, which `O_NOFOLLOW` refuses), opening must not block (a FIFO would, so
/// `O_NONBLOCK`) nor make a terminal ours (`O_NOCTTY`), and the object must be a regular file
/// of this user with a single name (a hard link can give a second name to someone else's
/// object).
pub(crate) fn open_named(name: &str, writable: bool) -> Result<OwnedFd, OpenError> {
    let access = if writable {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    let flags = access | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(segment_path(name), flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::LOOP) => {
            return Err(OpenError::NotASegment("it is a symbolic link"));
        }
        Err(err) => return Err(OpenError::Os(err.into())),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| OpenError::Os(e.into()))?;
    let refuse = |why| Err(OpenError::NotASegment(why));
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => {}
        FileType::Directory => return refuse("it is a directory"),
        FileType::Fifo => return refuse("it is a FIFO"),
        FileType::CharacterDevice | FileType::BlockDevice => return refuse("it is a device"),
        FileType::Socket => return refuse("it is a socket"),
        _ => return refuse("it is not a regular file"),
    }
    if stat.st_uid != rustix::process::geteuid().as_raw() {
        return refuse("it belongs to another user");
    }
    if stat.st_nlink != 1 {
        return refuse("it has more than one name (a hard link)");
    }
    Ok(fd)
}

/// The length of an open object.
pub(crate) fn len_of(fd: &OwnedFd) -> io::Result<u64> {
    u64::try_from(rustix::fs::fstat(fd)?.st_size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "negative object size"))
}

/// Sizes a freshly created object to `len` bytes and allocates its pages, so that later
/// writes cannot fault for want of memory. Fails with `ENOSPC` or `ENOMEM` when the memory is
/// not there.
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

/// Bytes of memory this process can still be given: the kernel's `MemAvailable`, or less when
/// the process's cgroup (a container) has a lower memory limit. `u64::MAX` when neither can
/// be read.
pub fn memory_available() -> u64 {
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| {
            let line = meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))?;
            let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
        .unwrap_or(u64::MAX);
    system.min(cgroup_room().unwrap_or(u64::MAX))
}

/// `memory.max - memory.current` of this process's cgroup (v2), when it has a limit.
fn cgroup_room() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |file| -> Option<u64> {
        std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let max = read("memory.max")?;
    Some(max.saturating_sub(read("memory.current")?))
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
