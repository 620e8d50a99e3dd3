//! `Segment`: one mapped shared-memory object, the only place that holds raw pointers.
//!
//! A segment this process creates is an anonymous memfd: reserved, sealed so that its length
//! can never change, and mapped read-write. No name in `/dev/shm` leads to it; another process
//! gets it only as a descriptor this process sends (see [`crate::SegmentLink`]), and the kernel
//! frees it when the last descriptor and mapping are gone — a crash leaks nothing. The creator
//! keeps the descriptor for as long as the segment lives, to send it to peers.
//!
//! A segment of another process is mapped read-only, so a view of a peer's memory cannot write
//! it even by mistake: either a descriptor a peer sent, accepted only if it is sealed, or a
//! named object of another program (Python's `SharedMemory`, say), opened without following
//! links and checked before it is mapped.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::block::ShmBlock;
use crate::error::{Result, ShmError};
use crate::session::Session;
use crate::sys::{self, OpenError};

/// The name private memory goes by: not a valid segment name, so no reference to it can be
/// attached anywhere.
pub(crate) const PRIVATE_NAME: &str = "(private)";

/// What a segment is to this process.
#[derive(Debug)]
enum Origin {
    /// A memfd this process created; the descriptor is kept for sending it to peers, and the
    /// session lists it so that other pools of the process can attach it.
    Own {
        fd: OwnedFd,
        session: Arc<Session>,
        /// Whether a peer may map it writable (the seals leave writes open).
        shared: bool,
        /// The frozen blocks of the segment, by offset: the only parts of it that may be
        /// attached by reference in this process (see [`crate::ShmBlockMut::freeze`]).
        frozen: Mutex<BTreeMap<usize, Weak<ShmBlock>>>,
    },
    /// A sealed memfd a peer sent, or a named object of another program; mapped writable only
    /// for a structure both sides update.
    Foreign { writable: bool },
    /// Private memory of this process.
    Private,
}

/// One mapping of a shared-memory object, for as long as this value lives.
pub(crate) struct Segment {
    ptr: *mut u8,
    len: usize,
    name: String,
    origin: Origin,
}

// SAFETY: `Segment` holds the address and length of a mapping, a name and a descriptor. The
// mapping is valid in every thread of the process until `munmap`, which only `Drop` calls;
// nothing about it is tied to the thread that made it.
unsafe impl Send for Segment {}
// SAFETY: the only methods called through `&Segment` read the address, length, name and
// descriptor, which never change after construction. Access to the mapped bytes themselves is
// governed by `ShmBlock`, which hands out `&mut [u8]` only through a unique `&mut ShmBlock` of
// a segment this process created.
unsafe impl Sync for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("len", &self.len())
            .field("own", &self.descriptor().is_some())
            .finish()
    }
}

impl Segment {
    /// Creates, reserves, maps (read-write) and seals a new memfd of `len` bytes, known in
    /// `session` as `name`. Unless `shared`, the seals keep everyone but this mapping from
    /// writing it; a `shared` segment (the transport's channel) its receiver maps writable.
    pub(crate) fn create(
        name: &str,
        len: usize,
        shared: bool,
        session: &Arc<Session>,
    ) -> Result<Self> {
        let os = |op| {
            move |source: io::Error| ShmError::Os {
                op,
                name: name.to_owned(),
                source,
            }
        };
        let fd = sys::create_memfd(name).map_err(|source| {
            if source.raw_os_error() == Some(libc::EMFILE)
                || source.raw_os_error() == Some(libc::ENFILE)
            {
                ShmError::TooManyDescriptors {
                    name: name.to_owned(),
                }
            } else {
                os("create")(source)
            }
        })?;
        sys::reserve(&fd, len).map_err(|err| match err.raw_os_error() {
            Some(libc::ENOSPC | libc::ENOMEM) => ShmError::OutOfSharedMemory {
                requested: len as u64,
                available: sys::memory_available(),
            },
            _ => os("reserve")(err),
        })?;
        let ptr = sys::map(&fd, len, true).map_err(os("map"))?;
        let segment = Segment {
            ptr,
            len,
            name: name.to_owned(),
            origin: Origin::Own {
                fd,
                session: Arc::clone(session),
                shared,
                frozen: Mutex::new(BTreeMap::new()),
            },
        };
        if let Origin::Own { fd, .. } = &segment.origin {
            sys::seal(fd, shared).map_err(os("seal"))?;
        }
        sys::populate(ptr, len);
        Ok(segment)
    }

    /// Maps a descriptor a peer sent for its segment `name`. Refused unless it is a memfd
    /// sealed against shrinking and growing, so the peer can never cut it short under this
    /// mapping. A segment sealed against writes is mapped read-only; one that is not (the
    /// transport's channel, which both sides update) read-write, and
    /// [`is_shared`](Self::is_shared) says so.
    pub(crate) fn adopt(fd: OwnedFd, name: &str) -> Result<Self> {
        let os = |op| {
            move |source: io::Error| ShmError::Os {
                op,
                name: name.to_owned(),
                source,
            }
        };
        match sys::sealed(&fd).map_err(os("check the seals of"))? {
            sys::Sealed::No => Err(ShmError::NotASegment {
                name: name.to_owned(),
                reason: "its descriptor is not a memfd sealed against shrinking and growing",
            }),
            sys::Sealed::Length => Self::map_whole(fd, name, true),
            sys::Sealed::LengthAndWrites => Self::map_whole(fd, name, false),
        }
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
            origin: Origin::Private,
        })
    }

    /// Whether this is private memory rather than a shared object.
    pub(crate) fn is_private(&self) -> bool {
        matches!(self.origin, Origin::Private)
    }

    /// Maps a named object of another program (`/dev/shm/NAME`), whatever its length,
    /// read-only, after checking that the name leads to a regular file of this user with one
    /// name (see [`sys::open_named`]). Nothing is mapped when the check fails.
    pub(crate) fn open_named(name: &str) -> Result<Self> {
        let fd = sys::open_named(name, false).map_err(|err| match err {
            OpenError::Os(source) if source.kind() == io::ErrorKind::NotFound => {
                ShmError::SegmentNotFound {
                    name: name.to_owned(),
                }
            }
            OpenError::Os(source) => ShmError::Os {
                op: "open",
                name: name.to_owned(),
                source,
            },
            OpenError::NotASegment(reason) => ShmError::NotASegment {
                name: name.to_owned(),
                reason,
            },
        })?;
        Self::map_whole(fd, name, false)
    }

    /// Maps all of `fd` and lets the descriptor go: a mapping costs no descriptor.
    fn map_whole(fd: OwnedFd, name: &str, writable: bool) -> Result<Self> {
        let os = |op| {
            move |source: io::Error| ShmError::Os {
                op,
                name: name.to_owned(),
                source,
            }
        };
        let len = sys::len_of(&fd).map_err(os("stat"))?;
        let len = usize::try_from(len).map_err(|_| {
            os("map")(io::Error::new(
                io::ErrorKind::InvalidData,
                "segment larger than memory",
            ))
        })?;
        let ptr = sys::map(&fd, len, writable).map_err(os("map"))?;
        Ok(Segment {
            ptr,
            len,
            name: name.to_owned(),
            origin: Origin::Foreign { writable },
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first byte of the mapping. Valid for `len()` bytes while `self` lives; writable
    /// only for segments this process created or adopted writable.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Whether the memory belongs to another process, which can still write it through its
    /// own mapping: a segment a peer sent, or a named segment of another program.
    pub(crate) fn is_foreign(&self) -> bool {
        matches!(self.origin, Origin::Foreign { .. })
    }

    /// Whether both sides may write the segment: one this process created for that (see
    /// [`crate::ShmPool::alloc_shared`]), or one a peer sent unsealed against writes.
    pub(crate) fn is_shared(&self) -> bool {
        match self.origin {
            Origin::Own { shared, .. } => shared,
            Origin::Foreign { writable } => writable,
            Origin::Private => false,
        }
    }

    /// Takes a segment this process created off the session's list, so that no other pool of
    /// this process can attach it any more; its blocks and peers keep their mappings.
    pub(crate) fn retire(&self) {
        if let Origin::Own { session, .. } = &self.origin {
            session.forget(&self.name);
        }
    }

    /// Lists the frozen block at `offset` of a segment this process created.
    pub(crate) fn list_frozen(&self, offset: usize, block: Weak<ShmBlock>) {
        if let Origin::Own { frozen, .. } = &self.origin {
            frozen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(offset, block);
        }
    }

    /// Takes the frozen block at `offset` off the list; called as it is dropped, before its
    /// region can be handed out again (so the entry is its own).
    pub(crate) fn unlist_frozen(&self, offset: usize) {
        if let Origin::Own { frozen, .. } = &self.origin {
            let removed = frozen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&offset);
            drop(removed);
        }
    }

    /// The live frozen block of this segment that spans `[offset, end)`, if one does.
    pub(crate) fn frozen_spanning(&self, offset: u64, end: u64) -> Option<Arc<ShmBlock>> {
        let Origin::Own { frozen, .. } = &self.origin else {
            return None;
        };
        let start = usize::try_from(offset).ok()?;
        let candidate = frozen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .range(..=start)
            .next_back()
            .map(|(_, weak)| weak.clone())?;
        // Upgraded outside the lock: dropping the last `Arc` of a block takes the lock.
        let block = candidate.upgrade()?;
        block.spans(offset, end).then_some(block)
    }

    /// The descriptor of a segment this process created, to send to a peer.
    pub(crate) fn descriptor(&self) -> Option<BorrowedFd<'_>> {
        match &self.origin {
            Origin::Own { fd, .. } => Some(fd.as_fd()),
            _ => None,
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.descriptor().is_some() {
            crate::link::segment_retired();
        }
        self.retire();
        // SAFETY: `ptr` and `len` come from `sys::map` or `sys::map_private`; every block over
        // this mapping holds an `Arc` of this segment, so none is left to use it.
        unsafe { sys::unmap(self.ptr, self.len) };
    }
}
