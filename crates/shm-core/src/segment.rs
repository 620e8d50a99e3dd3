//! `Segment`: one mapped POSIX shared-memory object, the only place that holds raw pointers.
//!
//! `shared_memory::Shmem` does the `shm_open` and `mmap`, but it is neither `Send` nor `Sync`,
//! it sizes new objects with `ftruncate` only, and it unlinks on drop whatever it created. This
//! wrapper adds what is missing: it reserves the memory of a new segment (see [`crate::sys`]),
//! it can be shared between threads, and it unlinks at the moment the pool decides — at most
//! once — rather than when the last mapping goes away.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use shared_memory::{Shmem, ShmemConf, ShmemError};

use crate::error::{Result, ShmError};
use crate::sys;

/// One mapping of a shared-memory object, read-write, for as long as this value lives.
pub(crate) struct Segment {
    shmem: Shmem,
    name: String,
    /// Whether this process created the object and must unlink it.
    owned: bool,
    unlinked: AtomicBool,
}

// SAFETY: `Shmem` holds a pointer to a `MAP_SHARED` mapping, its length, a file descriptor and
// a name. None of these is tied to the thread that made them: the mapping is valid in every
// thread of the process until `munmap`, which only `Shmem`'s drop calls, and `Segment` calls no
// `&mut self` method of `Shmem`. Moving it to another thread is therefore sound.
unsafe impl Send for Segment {}
// SAFETY: the only methods called through `&Segment` read the pointer, length and name, which
// never change after construction. Access to the mapped bytes themselves is governed by
// `ShmBlock`, which hands out `&mut [u8]` only through a unique `&mut ShmBlock`.
unsafe impl Sync for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("len", &self.len())
            .field("owned", &self.owned)
            .finish()
    }
}

/// Why a segment could not be created.
#[derive(Debug)]
pub(crate) enum CreateError {
    /// The random name was taken: try another.
    NameTaken,
    /// Any other failure, reported to the caller.
    Failed(ShmError),
}

impl Segment {
    /// Creates, reserves and maps a new object of `len` bytes (`len > 0`).
    pub(crate) fn create(name: &str, len: usize) -> Result<Self, CreateError> {
        let mut shmem = match ShmemConf::new().os_id(name).size(len).create() {
            Ok(shmem) => shmem,
            Err(ShmemError::MappingIdExists) => return Err(CreateError::NameTaken),
            Err(err) => return Err(CreateError::Failed(os_error("create", name, err))),
        };
        shmem.set_owner(false);
        let segment = Segment {
            shmem,
            name: name.to_owned(),
            owned: true,
            unlinked: AtomicBool::new(false),
        };
        // On failure `segment` is dropped here, which unmaps and unlinks the object.
        sys::reserve(name, len).map_err(|err| {
            CreateError::Failed(if err.raw_os_error() == Some(libc::ENOSPC) {
                ShmError::OutOfSharedMemory {
                    requested: len as u64,
                    available: sys::shm_available().unwrap_or(0),
                }
            } else {
                ShmError::Os {
                    op: "reserve",
                    name: name.to_owned(),
                    source: err,
                }
            })
        })?;
        sys::populate(segment.as_ptr(), len);
        Ok(segment)
    }

    /// Maps an existing object, whatever its length.
    pub(crate) fn open(name: &str) -> Result<Self> {
        let mut shmem = ShmemConf::new()
            .os_id(name)
            .open()
            .map_err(|err| match err {
                ShmemError::MapOpenFailed(errno) if errno == libc::ENOENT as u32 => {
                    ShmError::SegmentNotFound {
                        name: name.to_owned(),
                    }
                }
                other => os_error("map", name, other),
            })?;
        shmem.set_owner(false);
        Ok(Segment {
            shmem,
            name: name.to_owned(),
            owned: false,
            unlinked: AtomicBool::new(false),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn len(&self) -> usize {
        self.shmem.len()
    }

    /// The first byte of the mapping. Valid for `len()` bytes while `self` lives.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.shmem.as_ptr()
    }

    /// Removes the object's name so that nobody can attach it any more. Mappings, ours and our
    /// peers', stay valid until they are unmapped. Does nothing for segments we did not create,
    /// or the second time.
    pub(crate) fn unlink(&self) {
        if self.owned && !self.unlinked.swap(true, Ordering::AcqRel) {
            // A segment already removed (by an orphan sweep that misjudged us, or by hand) is
            // gone either way; there is nobody to report the error to during teardown.
            let _ = std::fs::remove_file(sys::segment_path(&self.name));
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
    }
}

fn os_error(op: &'static str, name: &str, err: ShmemError) -> ShmError {
    let source = match err {
        ShmemError::MapCreateFailed(errno)
        | ShmemError::MapOpenFailed(errno)
        | ShmemError::UnknownOsError(errno) => io::Error::from_raw_os_error(errno as i32),
        other => io::Error::other(other.to_string()),
    };
    ShmError::Os {
        op,
        name: name.to_owned(),
        source,
    }
}
