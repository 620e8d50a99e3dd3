//! `ShmBlock`: a region of a mapped segment, and the rules for reading and writing it.

use std::sync::Arc;

use crate::error::{Result, ShmError};
use crate::pool::Lease;
use crate::reference::ShmRef;
use crate::segment::Segment;

/// A region of shared memory mapped into this process: either allocated here by
/// [`ShmPool::alloc`](crate::ShmPool::alloc), or attached from a peer's [`ShmRef`] by
/// [`ShmPool::attach`](crate::ShmPool::attach).
///
/// A block keeps its segment mapped for as long as it lives, so a view of its bytes can never
/// dangle, even after the pool that made it is closed. Share a block between threads or values
/// by putting it in an `Arc`: it is `Send + Sync`, and every holder keeps the mapping alive.
///
/// # Who may write when
///
/// - A block allocated here is writable through [`as_mut_slice`](Self::as_mut_slice), which
///   needs `&mut self`: while a block is shared (in an `Arc`, or lent as `&ShmBlock`) nobody in
///   this process can write it.
/// - Once its [`ShmRef`] has been sent, the owner must not write the block until the receiver
///   says it is done with it; the receiver's `&[u8]` views rely on that. The transport enforces
///   this protocol; code that passes refs by hand must keep it too.
/// - An attached block is read-only: [`as_mut_slice`](Self::as_mut_slice) returns
///   [`ShmError::ReadOnly`], because the memory belongs to a peer that may read it.
/// - Dropping a block allocated here returns its memory to the pool for reuse; dropping an
///   attached block releases this process's claim on the mapping.
///
/// A recycled block holds the bytes of its previous use until they are overwritten.
pub struct ShmBlock {
    segment: Arc<Segment>,
    offset: usize,
    capacity: usize,
    len: usize,
    /// `Some` for blocks allocated here: the pool takes the region back on drop.
    lease: Option<Lease>,
    /// Run once when the block is dropped: how a transport learns that nothing in this
    /// process views a peer's block any more (see [`ShmBlock::on_drop`]).
    on_drop: Option<DropHook>,
}

/// What [`ShmBlock::on_drop`] runs. `RefUnwindSafe` because Arrow requires it of a buffer's
/// owner, and a block is one.
pub type DropHook = Box<dyn FnOnce() + Send + Sync + std::panic::RefUnwindSafe>;

impl std::fmt::Debug for ShmBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmBlock")
            .field("name", &self.name())
            .field("offset", &self.offset)
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .field("writable", &self.is_writable())
            .finish()
    }
}

impl ShmBlock {
    /// A block over `segment[offset .. offset + capacity]` whose first `len` bytes are content.
    /// The caller has checked that the range lies inside the segment and `len <= capacity`.
    pub(crate) fn new(
        segment: Arc<Segment>,
        offset: usize,
        capacity: usize,
        len: usize,
        lease: Option<Lease>,
    ) -> Self {
        debug_assert!(len <= capacity && offset + capacity <= segment.len());
        ShmBlock {
            segment,
            offset,
            capacity,
            len,
            lease,
            on_drop: None,
        }
    }

    /// Name of the segment the block lives in.
    pub fn name(&self) -> &str {
        self.segment.name()
    }

    /// Where the block starts inside its segment.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes of content.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the block holds no content.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the block can hold: its content can grow to this with [`set_len`](Self::set_len).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether this process may write the block (it allocated it).
    pub fn is_writable(&self) -> bool {
        self.lease.is_some()
    }

    /// Whether the block is another process's memory, which that process can still write
    /// through its own mapping (its seals stop everyone else): a block a peer sent, or a named
    /// segment of another program. What such a block holds can change while it is read, so
    /// shm-codec's decoders copy the bytes whose validity they check before checking them.
    pub fn is_peer_memory(&self) -> bool {
        self.segment.is_foreign()
    }

    /// Whether the block is a [private copy](crate::ShmPool::private_copy) rather than shared
    /// memory.
    pub fn is_private(&self) -> bool {
        self.segment.is_private()
    }

    /// Sets how many bytes of the block are content.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.capacity {
            return Err(ShmError::LengthExceedsCapacity {
                name: self.name().to_owned(),
                requested: len as u64,
                capacity: self.capacity as u64,
            });
        }
        self.len = len;
        Ok(())
    }

    /// The first byte of the block; 64-byte aligned. Valid while the block lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.start()
    }

    /// The first byte of the block, for structures built for concurrent access from several
    /// processes (atomics, rings with a publication protocol), such as the transport's control
    /// channel. Every access through it must be atomic or ordered by such a protocol; plain
    /// data is read with [`as_slice`](Self::as_slice) and written with
    /// [`as_mut_slice`](Self::as_mut_slice).
    pub fn as_shared_ptr(&self) -> *mut u8 {
        self.start()
    }

    /// The content of the block.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `start()` is inside the mapping and `offset + len <= offset + capacity <=
        // segment.len()` (checked by the pool, and `set_len` keeps `len <= capacity`). The
        // mapping lives as long as `self.segment`, which outlives the returned borrow. Shared
        // memory is always initialised (zero-filled at creation), so every byte is a valid
        // `u8`. No `&mut` to these bytes exists in this process: the pool gives each region to
        // one block, and writing needs `&mut self`. Peers do not write while we read: that is
        // the ownership protocol documented on the type.
        unsafe { std::slice::from_raw_parts(self.start(), self.len) }
    }

    /// The content of the block, for writing. Only blocks allocated by this process are
    /// writable; see the type's documentation for when the owner may write.
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        if !self.is_writable() {
            return Err(ShmError::ReadOnly {
                name: self.name().to_owned(),
            });
        }
        // SAFETY: bounds and initialisation as in `as_slice`. The region belongs to this block
        // alone (the pool's free lists hand it to one block at a time), this block was
        // allocated here rather than attached, and `&mut self` rules out any other borrow of it
        // in this process for the lifetime of the result.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.start(), self.len) })
    }

    /// The reference a peer needs to attach this block.
    pub fn to_ref(&self) -> ShmRef {
        ShmRef {
            name: self.name().to_owned(),
            size: self.capacity as u64,
            offset: self.offset as u64,
            content_size: self.len as u64,
        }
    }

    /// Runs `hook` when this block is dropped, after any hook set before. A transport sets
    /// one on each block it attaches for a peer, so that the peer learns — without polling —
    /// the moment the last value built on the block is gone and the block can be reused.
    /// Share the block in an `Arc` to keep one hook for all its views.
    pub fn on_drop(&mut self, hook: DropHook) {
        self.on_drop = Some(match self.on_drop.take() {
            None => hook,
            Some(earlier) => Box::new(move || {
                earlier();
                hook();
            }),
        });
    }

    /// The segment the block lives in.
    pub(crate) fn segment(&self) -> &Arc<Segment> {
        &self.segment
    }

    fn start(&self) -> *mut u8 {
        // `offset <= segment.len()`, so the result stays inside the mapping or one past its end.
        self.segment.as_ptr().wrapping_add(self.offset)
    }
}

impl Drop for ShmBlock {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release(&self.segment);
        }
        if let Some(hook) = self.on_drop.take() {
            hook();
        }
    }
}
