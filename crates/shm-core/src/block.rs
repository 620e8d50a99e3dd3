//! `ShmBlock`: a region of a mapped segment, and the rules for reading and writing it.

use std::sync::Arc;

use crate::error::{Result, ShmError};
use crate::pool::Lease;
use crate::reference::ShmRef;
use crate::segment::Segment;

/// A read-only region of shared memory mapped into this process: a block this process
/// allocated and then [froze](ShmBlockMut::freeze), or one attached from a [`ShmRef`] (by
/// [`ShmPool::attach`](crate::ShmPool::attach), or by a [`SegmentLink`](crate::SegmentLink)
/// for a peer's segment).
///
/// A block keeps its segment mapped for as long as it lives, so a view of its bytes can never
/// dangle, even after the pool that made it is closed. Share a block between threads or values
/// by putting it in an `Arc`: it is `Send + Sync`, and every holder keeps the mapping alive.
///
/// # Who may write when
///
/// Nobody in this process writes a `ShmBlock`: the types say so.
///
/// - Memory is written only through a [`ShmBlockMut`], which [`ShmPool::alloc`](crate::ShmPool::alloc)
///   returns and which has no [`ShmRef`]: nothing can be attached over it while it is
///   writable. [`ShmBlockMut::freeze`] ends the writing for good and gives the `ShmBlock` that
///   can be sent; only then may another pool or a peer attach it.
/// - Attaching one's own memory by reference finds the frozen block that holds the range and
///   keeps it alive: its region is not recycled, hence not written, while the view lives.
/// - A peer's block is mapped read-only, and its segment is sealed so that only the peer can
///   write it ([`is_peer_memory`](Self::is_peer_memory) says when that is the case). A peer
///   that rewrites its block while we read it changes the values we see, never the memory
///   safety of this process: shm-codec copies the bytes that carry an invariant before
///   checking them.
/// - Dropping the last `Arc` of a frozen block returns its memory to the pool for reuse;
///   dropping an attached block releases this process's claim on the mapping.
///
/// A recycled block holds the bytes of its previous use until they are overwritten.
pub struct ShmBlock {
    segment: Arc<Segment>,
    offset: usize,
    capacity: usize,
    len: usize,
    /// `Some` for blocks allocated here: the pool takes the region back on drop.
    lease: Option<Lease>,
    /// Whether the block is listed among its segment's frozen blocks (see
    /// [`ShmBlockMut::freeze`]), to be taken off the list when dropped.
    listed: bool,
    /// For a view of one of this process's frozen blocks: that block, kept alive (and so
    /// unwritten) while the view lives.
    keep: Option<Arc<ShmBlock>>,
    /// Run once when the block is dropped: how a transport learns that nothing in this
    /// process views a peer's block any more (see [`ShmBlock::on_drop`]).
    on_drop: Option<DropHook>,
}

/// What [`ShmBlock::on_drop`] runs. `RefUnwindSafe` because Arrow requires it of a buffer's
/// owner, and a block is one.
pub type DropHook = Box<dyn FnOnce() + Send + Sync + std::panic::RefUnwindSafe>;

/// A block of shared memory this process allocated and is still writing: the only way to
/// write shared memory. It has no [`ShmRef`], so no other pool, thread or process can attach
/// it while it is writable; [`freeze`](Self::freeze) it to send it.
///
/// Dropping it returns its memory to the pool.
pub struct ShmBlockMut {
    block: ShmBlock,
}

/// A block that both sides of a channel write, through atomics only: the transport's control
/// channel. It hands out no slices, because the peer may write any of its bytes at any time;
/// every access goes through [`as_ptr`](Self::as_ptr) as an atomic, or through
/// [`snapshot`](Self::snapshot).
pub struct ShmAtomicBlock {
    block: ShmBlock,
}

impl std::fmt::Debug for ShmBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmBlock")
            .field("name", &self.name())
            .field("offset", &self.offset)
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .field("peer_memory", &self.is_peer_memory())
            .finish()
    }
}

impl std::fmt::Debug for ShmBlockMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmBlockMut")
            .field("name", &self.name())
            .field("offset", &self.block.offset)
            .field("capacity", &self.block.capacity)
            .field("len", &self.block.len)
            .finish()
    }
}

impl std::fmt::Debug for ShmAtomicBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmAtomicBlock")
            .field("name", &self.name())
            .field("len", &self.len())
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
            listed: false,
            keep: None,
            on_drop: None,
        }
    }

    /// A read-only view of `r`'s range of the frozen block `frozen`, which holds the range
    /// (checked by the caller); the view keeps `frozen` alive.
    pub(crate) fn view_of(frozen: Arc<ShmBlock>, r: &ShmRef) -> Self {
        debug_assert!(
            frozen.offset as u64 <= r.offset
                && r.offset + r.size <= (frozen.offset + frozen.capacity) as u64
        );
        let mut view = ShmBlock::new(
            Arc::clone(&frozen.segment),
            r.offset as usize,
            r.size as usize,
            r.content_size as usize,
            None,
        );
        view.keep = Some(frozen);
        view
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

    /// Bytes the block spans: content and the stale bytes after it.
    pub fn capacity(&self) -> usize {
        self.capacity
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

    /// Sets how many bytes of the block are content: at most its capacity.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        self.len = checked_len(self, len)?;
        Ok(())
    }

    /// The first byte of the block; 64-byte aligned. Valid while the block lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.start()
    }

    /// The content of the block.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `start()` is inside the mapping and `offset + len <= offset + capacity <=
        // segment.len()` (checked by the pool, and `set_len` keeps `len <= capacity`). The
        // mapping lives as long as `self.segment`, which outlives the returned borrow. Shared
        // memory is always initialised (zero-filled at creation), so every byte is a valid
        // `u8`. Nothing in this process writes these bytes while the borrow lives: they are
        // written only through a `ShmBlockMut`, which has no reference by which to attach it,
        // and a frozen block's region is not recycled while any block over it (a view keeps
        // the frozen block in `keep`) lives. A peer's segment is sealed so that only the peer
        // writes it; what it writes changes values, which is all a `u8` can hold.
        unsafe { std::slice::from_raw_parts(self.start(), self.len) }
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

    /// Whether `[offset, end)` lies inside this block's span.
    pub(crate) fn spans(&self, offset: u64, end: u64) -> bool {
        self.offset as u64 <= offset && end <= (self.offset + self.capacity) as u64
    }

    fn start(&self) -> *mut u8 {
        // `offset <= segment.len()`, so the result stays inside the mapping or one past its end.
        self.segment.as_ptr().wrapping_add(self.offset)
    }
}

/// `len`, if it fits `block`'s capacity.
fn checked_len(block: &ShmBlock, len: usize) -> Result<usize> {
    if len > block.capacity {
        return Err(ShmError::LengthExceedsCapacity {
            name: block.name().to_owned(),
            requested: len as u64,
            capacity: block.capacity as u64,
        });
    }
    Ok(len)
}

impl Drop for ShmBlock {
    fn drop(&mut self) {
        // Off the frozen list before the region can be handed out again.
        if self.listed {
            self.segment.unlist_frozen(self.offset);
        }
        if let Some(lease) = self.lease.take() {
            lease.release(&self.segment);
        }
        if let Some(hook) = self.on_drop.take() {
            hook();
        }
    }
}

impl ShmBlockMut {
    /// A writable block over a region of `segment` that the pool gave to it alone (see
    /// [`ShmBlock::new`] for the bounds).
    pub(crate) fn new(
        segment: Arc<Segment>,
        offset: usize,
        capacity: usize,
        len: usize,
        lease: Lease,
    ) -> Self {
        ShmBlockMut {
            block: ShmBlock::new(segment, offset, capacity, len, Some(lease)),
        }
    }

    /// Name of the segment the block lives in.
    pub fn name(&self) -> &str {
        self.block.name()
    }

    /// Where the block starts inside its segment.
    pub fn offset(&self) -> usize {
        self.block.offset
    }

    /// Bytes of content.
    pub fn len(&self) -> usize {
        self.block.len
    }

    /// Whether the block holds no content.
    pub fn is_empty(&self) -> bool {
        self.block.len == 0
    }

    /// The segment the block lives in.
    #[cfg(test)]
    pub(crate) fn segment(&self) -> &Arc<Segment> {
        &self.block.segment
    }

    /// Bytes the block can hold: its content can grow to this with [`set_len`](Self::set_len).
    pub fn capacity(&self) -> usize {
        self.block.capacity
    }

    /// Sets how many bytes of the block are content: at most its capacity.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        self.block.set_len(len)
    }

    /// The first byte of the block; 64-byte aligned. Valid while the block lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.block.start()
    }

    /// The first byte of the block, for writing. Valid for [`capacity`](Self::capacity)
    /// bytes while the block lives, and nothing else in this process or any other reads or
    /// writes them until the block is frozen.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.block.start()
    }

    /// The content of the block.
    pub fn as_slice(&self) -> &[u8] {
        self.block.as_slice()
    }

    /// The content of the block, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: bounds and initialisation as in `ShmBlock::as_slice`. The region belongs to
        // this block alone: the pool hands each region to one block at a time, the block has no
        // reference (so no pool can attach it and no peer has been told of it), and its
        // segment is sealed so that no other process can write it. `&mut self` rules out any
        // other borrow of it in this process for the lifetime of the result.
        unsafe { std::slice::from_raw_parts_mut(self.block.start(), self.block.len) }
    }

    /// Ends the writing: the block becomes a read-only [`ShmBlock`] that can be sent, and that
    /// other pools of this process can attach by its reference. Its memory goes back to the
    /// pool when the last `Arc` (and every view attached over it) is dropped.
    ///
    /// ```
    /// use shm_core::{ShmError, ShmPool, ShmRef};
    ///
    /// # fn main() -> Result<(), ShmError> {
    /// let pool = ShmPool::new()?;
    /// let mut block = pool.alloc(100)?;
    /// block.as_mut_slice().copy_from_slice(&[7; 100]);
    /// // While it is written, nothing can attach it, even by its numbers.
    /// let made_up = ShmRef {
    ///     name: block.name().to_owned(),
    ///     offset: block.offset() as u64,
    ///     size: block.capacity() as u64,
    ///     content_size: 100,
    /// };
    /// assert!(matches!(pool.attach(&made_up), Err(ShmError::NotFrozen { .. })));
    /// let block = block.freeze();
    /// assert_eq!(pool.attach(&block.to_ref())?.as_slice(), &[7; 100]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn freeze(self) -> Arc<ShmBlock> {
        let segment = Arc::clone(&self.block.segment);
        let offset = self.block.offset;
        let mut block = self.block;
        block.listed = true;
        let block = Arc::new(block);
        segment.list_frozen(offset, Arc::downgrade(&block));
        block
    }

    /// The block, read-only, without listing it as frozen: for memory that no reference can
    /// reach (a private copy).
    pub(crate) fn into_unlisted(self) -> ShmBlock {
        self.block
    }
}

impl ShmAtomicBlock {
    pub(crate) fn new(block: ShmBlock) -> Self {
        ShmAtomicBlock { block }
    }

    /// Name of the segment the block lives in.
    pub fn name(&self) -> &str {
        self.block.name()
    }

    /// Bytes of the block.
    pub fn len(&self) -> usize {
        self.block.len
    }

    /// Whether the block has no bytes.
    pub fn is_empty(&self) -> bool {
        self.block.len == 0
    }

    /// The first byte of the block; 64-byte aligned, mapped writable in both processes,
    /// valid for [`len`](Self::len) bytes while the block lives. Every access through it must
    /// be atomic, or ordered by a publication protocol both sides follow (a ring's slots).
    pub fn as_ptr(&self) -> *mut u8 {
        self.block.start()
    }

    /// A copy of `range`, read byte by byte with relaxed atomic loads: for tools that look at
    /// the structure from outside. Bytes the peer writes meanwhile may be old or new.
    pub fn snapshot(&self, range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        checked_len(&self.block, range.end)?;
        Ok(range
            .map(|i| {
                // SAFETY: `i < range.end <= len <= capacity`: inside the mapping, which lives
                // as long as `self`. An `AtomicU8` has the size and alignment of a `u8`, and
                // every access to these bytes from either side is atomic or ordered.
                let byte = unsafe {
                    &*self
                        .block
                        .start()
                        .add(i)
                        .cast::<std::sync::atomic::AtomicU8>()
                };
                byte.load(std::sync::atomic::Ordering::Relaxed)
            })
            .collect())
    }

    /// The reference the peer attaches the block with.
    pub fn to_ref(&self) -> ShmRef {
        self.block.to_ref()
    }

    /// The block, for sending its segment on a [`SegmentLink`](crate::SegmentLink).
    pub(crate) fn block(&self) -> &ShmBlock {
        &self.block
    }
}
