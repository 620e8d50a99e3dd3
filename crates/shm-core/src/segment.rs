//! `Segment`: one mapped POSIX shared-memory object, the only place that holds raw pointers.
//!
//! A segment this process creates is reserved (see [`crate::sys`]) and mapped read-write; a
//! segment of another process is mapped read-only, so a view of a peer's memory cannot write
//! it even by mistake. Either way the file descriptor is closed as soon as the memory is
//! mapped: a mapping costs no descriptor. The segment is unlinked at the moment the pool
//! decides — at most once — rather than when the last mapping goes away.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Result, ShmError};
use crate::guard::{self, Watch};
use crate::sys;

/// The name private memory goes by: not a valid POSIX name, so no reference to it can be
/// attached anywhere.
pub(crate) const PRIVATE_NAME: &str = "(private)";

/// One mapping of a shared-memory object, for as long as this value lives.
pub(crate) struct Segment {
    ptr: *mut u8,
    len: usize,
    name: String,
    /// Whether this process created the object and must unlink it.
    owned: bool,
    unlinked: AtomicBool,
    /// Keeps a truncation of the object from killing the process (`None` for empty ones).
    watch: Option<Watch>,
}

// SAFETY: `Segment` holds the address and length of a MAP_SHARED mapping and a name. The
// mapping is valid in every thread of the process until `munmap`, which only `Drop` calls;
// nothing about it is tied to the thread that made it.
unsafe impl Send for Segment {}
// SAFETY: the only methods called through `&Segment` read the address, length and name, which
// never change after construction. Access to the mapped bytes themselves is governed by
// `ShmBlock`, which hands out `&mut [u8]` only through a unique `&mut ShmBlock` of a segment
// mapped writable.
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
    /// Creates, reserves and maps (read-write) a new object of `len` bytes.
    pub(crate) fn create(name: &str, len: usize) -> Result<Self, CreateError> {
        let fd = match sys::create(name) {
            Ok(fd) => fd,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                return Err(CreateError::NameTaken);
            }
            Err(source) => {
                return Err(CreateError::Failed(ShmError::Os {
                    op: "create",
                    name: name.to_owned(),
                    source,
                }));
            }
        };
        let mapped = sys::reserve(&fd, len)
            .map_err(|err| {
                if err.raw_os_error() == Some(libc::ENOSPC) {
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
                }
            })
            .and_then(|()| {
                sys::map(&fd, len, true).map_err(|source| ShmError::Os {
                    op: "map",
                    name: name.to_owned(),
                    source,
                })
            });
        drop(fd);
        let ptr = match mapped {
            Ok(ptr) => ptr,
            Err(err) => {
                let _ = sys::unlink(name);
                return Err(CreateError::Failed(err));
            }
        };
        let watch = (len > 0).then(|| guard::watch(ptr, len, true));
        sys::populate(ptr, len);
        Ok(Segment {
            ptr,
            len,
            name: name.to_owned(),
            owned: true,
            unlinked: AtomicBool::new(false),
            watch,
        })
    }

    /// Private memory of `len` bytes that no other process can reach: where a block of an
    /// untrusted peer is copied before it is read (see [`crate::ShmPool::private_copy`]).
    pub(crate) fn private(len: usize) -> Result<Self> {
        let ptr = sys::map_private(len).map_err(|source| ShmError::Os {
            op: "map private memory for",
            name: format!("a copy of {len} bytes"),
            source,
        })?;
        Ok(Segment {
            ptr,
            len,
            name: PRIVATE_NAME.to_owned(),
            owned: false,
            unlinked: AtomicBool::new(false),
            watch: None,
        })
    }

    /// Whether this is private memory rather than a shared object.
    pub(crate) fn is_private(&self) -> bool {
        self.name == PRIVATE_NAME
    }

    /// Maps an existing object, whatever its length: read-only, or read-write for structures
    /// that both processes update (the transport's channel).
    pub(crate) fn open(name: &str, writable: bool) -> Result<Self> {
        let os = |op| {
            move |source: io::Error| {
                if source.kind() == io::ErrorKind::NotFound {
                    ShmError::SegmentNotFound {
                        name: name.to_owned(),
                    }
                } else {
                    ShmError::Os {
                        op,
                        name: name.to_owned(),
                        source,
                    }
                }
            }
        };
        let fd = sys::open(name, writable).map_err(os("open"))?;
        let len = sys::len_of(&fd).map_err(os("stat"))?;
        let len = usize::try_from(len).map_err(|_| ShmError::Os {
            op: "map",
            name: name.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, "segment larger than memory"),
        })?;
        let ptr = sys::map(&fd, len, writable).map_err(os("map"))?;
        Ok(Segment {
            ptr,
            len,
            name: name.to_owned(),
            owned: false,
            unlinked: AtomicBool::new(false),
            watch: (len > 0).then(|| guard::watch(ptr, len, writable)),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first byte of the mapping. Valid for `len()` bytes while `self` lives; writable
    /// only for segments this process created or opened writable.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Whether another process cut the object short while it was mapped here (see
    /// [`crate::guard`]): its bytes from the cut on read as zero in this process, and writes
    /// there reach nobody.
    pub(crate) fn truncated(&self) -> bool {
        self.watch.as_ref().is_some_and(Watch::truncated)
    }

    /// Removes the object's name so that nobody can attach it any more. Mappings, ours and our
    /// peers', stay valid until they are unmapped. Does nothing for segments we did not create,
    /// or the second time.
    pub(crate) fn unlink(&self) {
        if self.owned && !self.unlinked.swap(true, Ordering::AcqRel) {
            // A segment already removed (by an orphan sweep that misjudged us, or by hand) is
            // gone either way; there is nobody to report the error to during teardown.
            let _ = sys::unlink(&self.name);
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
        // Unwatched before it is unmapped, so that the guard never patches an address range
        // that the kernel may hand to someone else.
        drop(self.watch.take());
        // SAFETY: `ptr` and `len` come from `sys::map` in `create` or `open`; every block
        // over this mapping holds an `Arc` of this segment, so none is left to use it.
        unsafe { sys::unmap(self.ptr, self.len) };
    }
}
