//! `ShmPool`: allocation, recycling, slabs, the mapping cache and teardown.
//!
//! Fresh shared memory is expensive here: creating and reserving a 1 GiB segment costs a
//! quarter of a second and its first write as much again, while rewriting a segment that is
//! already mapped runs at memcpy speed. The pool therefore keeps what it can:
//!
//! - **Recycling.** A dropped block of its own segment goes to a free list ordered by size and
//!   is handed out again to a request that fits it within 25%, mapped and with its pages
//!   present. The free list is bounded in bytes ([`PoolConfig::with_cache_bytes`]); the least
//!   recently used segments beyond the bound are unlinked.
//! - **Slabs.** Requests up to [`PoolConfig::with_slab_threshold`] share 1 MiB slab segments, cut
//!   into slots of a power of two between 64 bytes and the threshold. Every slot is 64-byte
//!   aligned and its size includes its padding, so many small payloads cost a few segments and
//!   file descriptors, not one each.
//! - **Mapping cache.** Attaching a segment that is already mapped reuses the mapping. Idle
//!   mappings are kept up to [`PoolConfig::with_attach_cache_bytes`], and dropped as soon as their
//!   owner has unlinked the segment (an unlinked segment lives on while anyone maps it).
//! - **Giving memory back.** A pool that has been idle — no block taken from or returned to
//!   its cache — for [`PoolConfig::with_idle_release`]'s time releases what it caches beyond
//!   that setting's bytes, like an allocator's decay: after a burst, a long-lived server's
//!   shared memory returns to its baseline. A thread of the pool's own does it; it exists only
//!   while there is something to release, so an idle pool with a small cache wakes nobody.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::block::{ShmAtomicBlock, ShmBlock, ShmBlockMut};
use crate::error::{Result, ShmError};
use crate::name::{SegmentHolds, SessionId, validate_name};
use crate::reference::ShmRef;
use crate::segment::Segment;
use crate::session::Session;
use crate::sys;

mod attached;
mod free;
mod slab;

use slab::SlabClass;

/// Bytes of one slab segment.
const SLAB_LEN: usize = 1 << 20;
/// The smallest slot, and the alignment of every block.
pub const BLOCK_ALIGN: usize = 64;
/// Segments of at least this many bytes are checked against the memory available before they
/// are reserved.
const CHECKED_LEN: usize = 64 << 20;
/// New segments are sized in whole pages.
const PAGE: usize = 4096;

/// How a pool behaves. `PoolConfig::default()` suits most programs; the `with_*` methods
/// change one setting each.
///
/// ```
/// use shm_core::{PoolConfig, ShmPool};
///
/// # fn main() -> Result<(), shm_core::ShmError> {
/// let pool = ShmPool::with_config(
///     PoolConfig::default()
///         .with_capacity(Some(8 << 30))
///         .with_cache_bytes(512 << 20),
/// )?;
/// assert_eq!(pool.config().capacity(), Some(8 << 30));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    capacity: Option<u64>,
    cache_bytes: u64,
    attach_cache_bytes: u64,
    slab_threshold: usize,
    idle_keep_bytes: u64,
    idle_after: Option<Duration>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            capacity: None,
            cache_bytes: 2 << 30,
            attach_cache_bytes: 4 << 30,
            slab_threshold: 64 << 10,
            idle_keep_bytes: 64 << 20,
            idle_after: Some(Duration::from_secs(10)),
        }
    }
}

impl PoolConfig {
    /// Sets the upper bound on the bytes of all segments the pool holds (in use, cached,
    /// slabs); past it, allocating is [`ShmError::CapacityExceeded`]. Default `None`: bounded
    /// only by memory.
    pub fn with_capacity(mut self, bytes: Option<u64>) -> Self {
        self.capacity = bytes;
        self
    }

    /// Sets the bytes of idle segments kept for reuse. Default 2 GiB.
    pub fn with_cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// Sets the bytes of idle mappings of other programs' named segments kept, so that a
    /// segment attached again is not mapped afresh. Default 4 GiB.
    pub fn with_attach_cache_bytes(mut self, bytes: u64) -> Self {
        self.attach_cache_bytes = bytes;
        self
    }

    /// Sets the size up to which requests share slab segments. Default 64 KiB; at least 64
    /// bytes (the smallest slot), at most 512 KiB.
    pub fn with_slab_threshold(mut self, bytes: usize) -> Self {
        self.slab_threshold = bytes;
        self
    }

    /// Sets what an idle pool gives back: once no block has been taken from or returned to
    /// its cache for `after`, the cached segments beyond `keep_bytes` (oldest first), its empty
    /// slabs and its idle private mappings are released. Default: keep 64 MiB, after 10 s;
    /// `after` `None` keeps the cache (up to [`with_cache_bytes`](Self::with_cache_bytes))
    /// for as long as the pool lives.
    pub fn with_idle_release(mut self, keep_bytes: u64, after: Option<Duration>) -> Self {
        self.idle_keep_bytes = keep_bytes;
        self.idle_after = after;
        self
    }

    /// Cached bytes an idle pool keeps, and after how long it releases the rest.
    pub fn idle_release(&self) -> (u64, Option<Duration>) {
        (self.idle_keep_bytes, self.idle_after)
    }

    /// The bound on the bytes of all the pool's segments, if any.
    pub fn capacity(&self) -> Option<u64> {
        self.capacity
    }

    /// Bytes of idle segments kept for reuse.
    pub fn cache_bytes(&self) -> u64 {
        self.cache_bytes
    }

    /// Bytes of idle mappings of other programs' segments kept.
    pub fn attach_cache_bytes(&self) -> u64 {
        self.attach_cache_bytes
    }

    /// The size up to which requests share slab segments.
    pub fn slab_threshold(&self) -> usize {
        self.slab_threshold
    }
}

/// What a pool holds, for tests, benchmarks and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks allocated by this pool and not yet dropped.
    pub live_blocks: usize,
    /// Bytes of all mappings the pool holds: its own segments and attached ones.
    pub bytes_mapped: u64,
    /// Bytes of the pool's own segments that hold no live block (free list and empty slabs).
    pub bytes_cached: u64,
    /// Segments this pool has created since it was made (slabs included).
    pub segments_created: u64,
    /// Segments this pool has created and not yet unlinked.
    pub segments_owned: usize,
    /// Segments of others that this pool has mapped.
    pub segments_attached: usize,
}

/// A pool of shared-memory blocks: allocates, recycles, attaches, and unlinks everything it
/// created when it is closed or dropped.
///
/// `ShmPool` is a cheap handle (`Clone`, `Send`, `Sync`); all clones share one pool, which
/// closes when the last clone is dropped. Blocks keep their mappings after that, but not their
/// names: nobody can attach them any more.
#[derive(Clone)]
pub struct ShmPool {
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for ShmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmPool")
            .field("session", &self.session())
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

struct PoolShared {
    config: PoolConfig,
    state: Mutex<State>,
    session: Arc<Session>,
    /// Holders of this pool's blocks that can give some back on request (see
    /// [`ShmPool::add_reclaimer`]). Called without `state` held, since giving a block back
    /// takes that lock.
    reclaimers: Mutex<Vec<Weak<dyn Reclaim>>>,
}

/// Something that holds blocks of a pool on behalf of others and can return those they are
/// done with — a transport holding blocks it lent to a peer until the peer says it released
/// them. The pool asks before every allocation, so memory released by a peer is reused
/// without any thread having to poll for it.
pub trait Reclaim: Send + Sync {
    /// Drops every held block whose holders have let go of it. Must not allocate from the
    /// pool and must not block.
    fn reclaim(&self);
}

/// Where a block allocated by the pool came from, so that dropping it can give it back.
#[derive(Debug)]
pub(crate) struct Lease {
    pool: Weak<PoolShared>,
    slot: Slot,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    /// The block is a whole segment.
    Whole,
    /// The block is a whole segment that a peer may write (see [`ShmPool::alloc_shared`]).
    Shared,
    /// The block is slot `index` of slab `slab` of size class `class`.
    Slab {
        class: usize,
        slab: usize,
        index: u32,
    },
    /// The block is a whole mapping of private memory (a [`ShmPool::private_copy`]).
    Private,
}

impl Lease {
    pub(crate) fn release(self, segment: &Arc<Segment>) {
        if let Some(pool) = self.pool.upgrade() {
            pool.release(self.slot, segment);
        }
    }
}

#[derive(Default)]
struct State {
    closed: bool,
    /// A counter that orders uses, for least-recently-used eviction.
    tick: u64,
    /// Bytes of own segments: live, cached, slabs, and those being created.
    owned_bytes: u64,
    /// Whole segments handed out as blocks, by name, so that closing can unlink them.
    live: HashMap<String, Weak<Segment>>,
    /// Idle whole segments by length; each list is ordered oldest first.
    free: BTreeMap<usize, Vec<(u64, Arc<Segment>)>>,
    free_bytes: u64,
    /// Slab classes, smallest slot first.
    slabs: Vec<SlabClass>,
    /// Idle private mappings by length, for the next private copy.
    private_free: BTreeMap<usize, Vec<Arc<Segment>>>,
    private_free_bytes: u64,
    /// Mappings of other processes' segments, by name.
    attached: HashMap<String, (u64, Arc<Segment>)>,
    attached_bytes: u64,
    live_blocks: usize,
    segments_created: u64,
    /// When a block was last taken from or returned to the cache.
    last_use: Option<Instant>,
    /// Whether the thread that releases an idle cache runs.
    decaying: bool,
}

impl State {
    /// Bytes of own segments that hold no live block: the free list, empty slabs, and idle
    /// private mappings.
    fn cached_bytes(&self) -> u64 {
        let empty_slabs = self
            .slabs
            .iter()
            .flat_map(|c| c.slabs.iter().flatten())
            .filter(|slab| slab.live == 0)
            .count() as u64;
        self.free_bytes + empty_slabs * SLAB_LEN as u64 + self.private_free_bytes
    }

    /// Releases what an idle pool gives back: free segments beyond `keep` bytes, oldest
    /// first, empty slabs and idle private mappings.
    fn release_idle(&mut self, keep: u64) -> Vec<Arc<Segment>> {
        let mut released = Vec::new();
        while self.free_bytes > keep {
            match self.evict_free() {
                Some(segment) => released.push(segment),
                None => break,
            }
        }
        released.extend(self.take_empty_slabs());
        released.extend(self.private_free.split_off(&0).into_values().flatten());
        self.private_free_bytes = 0;
        released
    }
}

impl PoolShared {
    /// Notes a use of the cache, and starts the thread that gives an idle cache back if the
    /// cache holds more than it keeps and the thread does not run yet.
    fn used_cache(self: &Arc<Self>, state: &mut State) {
        let Some(after) = self.config.idle_after else {
            return;
        };
        state.last_use = Some(Instant::now());
        if state.decaying || state.closed || state.cached_bytes() <= self.config.idle_keep_bytes {
            return;
        }
        let pool = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("shm-pool-decay".into())
            .spawn(move || decay(pool, after));
        // Without a thread the cache stays bounded by `cache_bytes`, as before.
        state.decaying = spawned.is_ok();
    }
}

/// The thread of a pool with a cache beyond what it keeps: waits until the pool has been idle
/// for `after`, gives the excess back, and ends (a later burst starts another).
fn decay(pool: Weak<PoolShared>, after: Duration) {
    loop {
        let wait = {
            let Some(pool) = pool.upgrade() else { return };
            let mut state = pool.lock();
            let idle = state.last_use.map_or(after, |t| t.elapsed());
            if state.closed {
                state.decaying = false;
                return;
            }
            if idle >= after {
                let released = state.release_idle(pool.config.idle_keep_bytes);
                state.decaying = false;
                drop(state);
                drop(released);
                return;
            }
            after - idle
        };
        std::thread::sleep(wait);
    }
}

impl ShmPool {
    /// A pool with the default configuration.
    pub fn new() -> Result<Self> {
        Self::with_config(PoolConfig::default())
    }

    /// A pool with the given configuration.
    pub fn with_config(mut config: PoolConfig) -> Result<Self> {
        config.slab_threshold = config.slab_threshold.clamp(BLOCK_ALIGN, SLAB_LEN / 2);
        let session = Session::current()?;
        let mut slabs = Vec::new();
        let mut slot_len = BLOCK_ALIGN;
        while slot_len <= config.slab_threshold.next_power_of_two() && slot_len <= SLAB_LEN / 2 {
            slabs.push(SlabClass { slabs: Vec::new() });
            slot_len *= 2;
        }
        Ok(ShmPool {
            shared: Arc::new(PoolShared {
                config,
                state: Mutex::new(State {
                    slabs,
                    ..State::default()
                }),
                session,
                reclaimers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Registers a holder of this pool's blocks that [`alloc`](Self::alloc) asks to give
    /// back what it no longer needs, before every allocation. The pool keeps only a weak
    /// reference: a dropped holder is forgotten.
    pub fn add_reclaimer(&self, reclaimer: Weak<dyn Reclaim>) {
        let mut reclaimers = self
            .shared
            .reclaimers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        reclaimers.retain(|r| r.strong_count() > 0);
        reclaimers.push(reclaimer);
    }

    /// Asks every registered holder to give back the blocks it is done with (see
    /// [`add_reclaimer`](Self::add_reclaimer)); `alloc` does this by itself.
    pub fn reclaim(&self) {
        self.shared.reclaim();
    }

    /// The session whose id every segment of this pool carries in its name.
    pub fn session(&self) -> SessionId {
        self.shared.session.id()
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// A writable block of `size` bytes (content length `size`, capacity possibly more),
    /// 64-byte aligned. `size` may be 0.
    ///
    /// The block comes from the free list or a slab when one fits; otherwise a new segment is
    /// created and its memory reserved, so that a full `/dev/shm` is reported here as
    /// [`ShmError::OutOfSharedMemory`] rather than as a SIGBUS on first write. A recycled
    /// block holds stale bytes.
    pub fn alloc(&self, size: usize) -> Result<ShmBlockMut> {
        self.shared.reclaim();
        if size <= self.shared.config.slab_threshold {
            self.shared.alloc_slot(size)
        } else {
            self.shared.alloc_whole(size, false)
        }
    }

    /// A block of `size` bytes in a segment of its own that a peer may map writable too: for
    /// structures both sides update through atomics or a publication protocol (the transport's
    /// channel). Other blocks' segments are sealed so that only their creator can write them;
    /// this one is not, it is never recycled for data, and it hands out no slices.
    pub fn alloc_shared(&self, size: usize) -> Result<ShmAtomicBlock> {
        let block = self.shared.alloc_whole(size, true)?;
        Ok(ShmAtomicBlock::new(block.into_unlisted()))
    }

    /// The block a reference names, read-only, after checking the reference against the
    /// segment: the name's form, an offset aligned to [`BLOCK_ALIGN`], `offset + size` without
    /// overflow and inside the segment, `content_size <= size`.
    ///
    /// A reference here names a frozen block of this process (made by any of its pools; see
    /// [`ShmBlockMut::freeze`]), or a range inside one; the view keeps that block alive, so its
    /// memory is not recycled while the view lives. A range no frozen block spans — memory
    /// still being written, or free — is [`ShmError::NotFrozen`]. A segment of another process
    /// is not reached by its name: its descriptor arrives on a
    /// [`SegmentLink`](crate::SegmentLink), which attaches it (here such a name is
    /// [`ShmError::NoDescriptor`]); a named object of another program is attached with
    /// [`attach_segment`](Self::attach_segment).
    pub fn attach(&self, r: &ShmRef) -> Result<ShmBlock> {
        let end = check_ref(r)?;
        let segment = self.segment_of(&r.name)?;
        check_bounds(&segment, r, end)?;
        let frozen = segment
            .frozen_spanning(r.offset, end)
            .ok_or_else(|| ShmError::NotFrozen {
                name: r.name.clone(),
                offset: r.offset,
                size: r.size,
            })?;
        Ok(ShmBlock::view_of(frozen, r))
    }

    /// Maps a whole named segment of another program (Python's `SharedMemory`, say),
    /// whatever its length, read-only. `name` may lack the leading slash, as Python's
    /// `SharedMemory.name` does. The block starts at the segment's first byte and holds all of
    /// it; the mapping is shared with [`attach`](Self::attach).
    ///
    /// The name must lead to a regular file of this user with a single name: a symbolic link,
    /// a hard link, a FIFO, a directory or a device is [`ShmError::NotASegment`], refused
    /// before anything is mapped (and without blocking on a FIFO).
    ///
    /// # Safety
    ///
    /// A named object is not sealed: the program that made it can still write it, and cut it
    /// short, which makes reading the cut pages kill this process with SIGBUS. The caller
    /// promises that the other program neither shrinks the object nor writes the bytes this
    /// process reads while the block lives — the same promise a numpy program makes when it
    /// shares an array through `SharedMemory`.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // What another program (Python's SharedMemory, say) leaves in /dev/shm.
    /// let name = format!("psm_doc_{}", std::process::id());
    /// let path = std::path::Path::new("/dev/shm").join(&name);
    /// struct Removed<'a>(&'a std::path::Path);
    /// impl Drop for Removed<'_> {
    ///     fn drop(&mut self) {
    ///         let _ = std::fs::remove_file(self.0);
    ///     }
    /// }
    /// let _removed = Removed(&path);
    /// std::fs::write(&path, b"written by another program")?;
    ///
    /// let pool = shm_core::ShmPool::new()?;
    /// // SAFETY: nothing writes or shrinks the object while the block lives.
    /// let block = unsafe { pool.attach_segment(&name)? };
    /// assert_eq!(block.as_slice(), b"written by another program");
    /// // A symbolic link, a FIFO or a hard link under a name is refused before it is mapped.
    /// # Ok(())
    /// # }
    /// ```
    pub unsafe fn attach_segment(&self, name: &str) -> Result<ShmBlock> {
        let name = if name.starts_with('/') {
            name.to_owned()
        } else {
            format!("/{name}")
        };
        validate_name(&name)?;
        if SessionId::of_segment(&name).is_some() {
            return Err(ShmError::NotASegment {
                name,
                reason: "segments of this project are attached by reference, not by name",
            });
        }
        let segment = self.shared.mapping(&name)?;
        let len = segment.len() as u64;
        let r = ShmRef {
            name,
            size: len,
            offset: 0,
            content_size: len,
        };
        block_of(segment, &r, len)
    }

    /// The block a reference to a segment of this process made by
    /// [`alloc_shared`](Self::alloc_shared) names, mapped read-write, for structures that both
    /// sides update through atomics or a publication protocol (the transport's channel), with
    /// the checks of [`attach`](Self::attach).
    pub fn attach_shared(&self, r: &ShmRef) -> Result<ShmAtomicBlock> {
        let end = check_ref(r)?;
        if self.shared.lock().closed {
            return Err(ShmError::PoolClosed);
        }
        let segment =
            self.shared
                .session
                .segment(&r.name)
                .ok_or_else(|| ShmError::SegmentNotFound {
                    name: r.name.clone(),
                })?;
        if !segment.is_shared() {
            return Err(ShmError::NotASegment {
                name: r.name.clone(),
                reason: "it is sealed against writes, and this structure is written by both sides",
            });
        }
        block_of(segment, r, end).map(ShmAtomicBlock::new)
    }

    /// The segment `name` names for [`attach`](Self::attach).
    fn segment_of(&self, name: &str) -> Result<Arc<Segment>> {
        match SessionId::of_segment(name) {
            Some(session) if session == self.session() => {
                if self.shared.lock().closed {
                    return Err(ShmError::PoolClosed);
                }
                self.shared
                    .session
                    .segment(name)
                    .ok_or_else(|| ShmError::SegmentNotFound {
                        name: name.to_owned(),
                    })
            }
            Some(_) => Err(ShmError::NoDescriptor {
                name: name.to_owned(),
            }),
            None => Err(ShmError::NotASegment {
                name: name.to_owned(),
                reason: "a segment of another program is attached by name (attach_segment), \
                         not by reference",
            }),
        }
    }

    /// A copy of `block`'s content in private memory that no other process can reach, write or
    /// truncate (`untrusted(true)` workers' replies are read this way):
    ///
    /// ```
    /// # fn main() -> Result<(), shm_core::ShmError> {
    /// let pool = shm_core::ShmPool::new()?;
    /// let mut block = pool.alloc(3)?;
    /// block.as_mut_slice().copy_from_slice(b"abc");
    /// let copy = pool.private_copy(&block.freeze())?;
    /// assert!(copy.is_private() && copy.as_slice() == b"abc");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// It is what a reader of an untrusted peer validates and reads instead of the peer's
    /// block, which the peer could change after validation. The copy is aligned like any
    /// block; it cannot be sent (it names no segment, so encoders copy out of it), and its
    /// memory is recycled for later copies, as blocks are.
    pub fn private_copy(&self, block: &ShmBlock) -> Result<ShmBlock> {
        let len = block.len().next_multiple_of(PAGE);
        let reused = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(ShmError::PoolClosed);
            }
            state.live_blocks += 1;
            let upper = len.saturating_add(len / 4);
            let found = state
                .private_free
                .range_mut(len..=upper)
                .next()
                .and_then(|(&key, list)| Some((key, list.pop()?)));
            found.map(|(key, segment)| {
                if state.private_free.get(&key).is_some_and(Vec::is_empty) {
                    state.private_free.remove(&key);
                }
                state.private_free_bytes -= segment.len() as u64;
                segment
            })
        };
        let segment = match reused {
            Some(segment) => segment,
            None => match Segment::private(len) {
                Ok(segment) => Arc::new(segment),
                Err(err) => {
                    self.shared.lock().live_blocks -= 1;
                    return Err(err);
                }
            },
        };
        let capacity = segment.len();
        let mut copy = ShmBlockMut::new(
            segment,
            0,
            capacity,
            block.len(),
            self.shared.lease(Slot::Private),
        );
        copy.as_mut_slice().copy_from_slice(block.as_slice());
        Ok(copy.into_unlisted())
    }

    /// Releases every segment this pool created, drops its caches, and refuses further
    /// allocations with [`ShmError::PoolClosed`]. Blocks still alive stay readable (and
    /// writable by their owner), but no other pool of this process can attach them any more;
    /// a peer that holds a segment's descriptor keeps its memory until it lets go.
    pub fn close_all(&self) {
        self.shared.close();
    }

    /// Releases every idle segment and mapping the pool keeps for reuse: the free list, empty
    /// slabs, and attached mappings no block uses.
    pub fn trim(&self) {
        let released = {
            let mut state = self.shared.lock();
            let mut released: Vec<Arc<Segment>> = Vec::new();
            while let Some(segment) = state.evict_free() {
                released.push(segment);
            }
            released.extend(state.take_empty_slabs());
            released.extend(state.evict_attached(|_| true, 0));
            released.extend(state.private_free.split_off(&0).into_values().flatten());
            state.private_free_bytes = 0;
            released
        };
        drop(released);
    }

    /// What the pool holds now.
    pub fn stats(&self) -> PoolStats {
        let state = self.shared.lock();
        let slab_segments = state.slabs.iter().flat_map(|c| c.slabs.iter().flatten());
        let (slab_count, empty_slab_bytes) = slab_segments.fold((0, 0), |(n, empty), slab| {
            let idle = if slab.live == 0 { SLAB_LEN as u64 } else { 0 };
            (n + 1, empty + idle)
        });
        let free_count: usize = state.free.values().map(Vec::len).sum();
        PoolStats {
            live_blocks: state.live_blocks,
            bytes_mapped: state.owned_bytes + state.attached_bytes,
            bytes_cached: state.free_bytes + empty_slab_bytes + state.private_free_bytes,
            segments_created: state.segments_created,
            segments_owned: state.live.len() + free_count + slab_count,
            segments_attached: state.attached.len(),
        }
    }
}

/// Checks the numbers of a reference that need no segment; returns `offset + size`.
pub(crate) fn check_ref(r: &ShmRef) -> Result<u64> {
    validate_name(&r.name)?;
    // Every block starts 64-byte aligned, and readers rely on it (atomics in the channel,
    // Arrow buffers): a reference that says otherwise is refused, not trusted.
    if !r.offset.is_multiple_of(BLOCK_ALIGN as u64) {
        return Err(ShmError::MisalignedRef {
            name: r.name.clone(),
            offset: r.offset,
            align: BLOCK_ALIGN,
        });
    }
    let end = r.offset.checked_add(r.size).ok_or(ShmError::RefOverflow {
        name: r.name.clone(),
        offset: r.offset,
        size: r.size,
    })?;
    if r.content_size > r.size {
        return Err(ShmError::ContentExceedsSize {
            name: r.name.clone(),
            content_size: r.content_size,
            size: r.size,
        });
    }
    Ok(end)
}

/// Refuses a reference that ends (at `end`) past its segment.
fn check_bounds(segment: &Segment, r: &ShmRef, end: u64) -> Result<()> {
    let segment_len = segment.len() as u64;
    if end > segment_len {
        return Err(ShmError::RefOutOfBounds {
            name: r.name.clone(),
            offset: r.offset,
            size: r.size,
            segment_len,
        });
    }
    Ok(())
}

/// The block `r` names in `segment`, once the segment is known to be long enough.
pub(crate) fn block_of(segment: Arc<Segment>, r: &ShmRef, end: u64) -> Result<ShmBlock> {
    check_bounds(&segment, r, end)?;
    // All three are at most the segment length, which is a usize.
    Ok(ShmBlock::new(
        segment,
        r.offset as usize,
        r.size as usize,
        r.content_size as usize,
        None,
    ))
}

impl PoolShared {
    fn reclaim(&self) {
        let reclaimers: Vec<Arc<dyn Reclaim>> = self
            .reclaimers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for reclaimer in reclaimers {
            reclaimer.reclaim();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves `State` consistent before it can panic, so a poisoned
        // lock holds usable data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lease(self: &Arc<Self>, slot: Slot) -> Lease {
        Lease {
            pool: Arc::downgrade(self),
            slot,
        }
    }

    /// Counts `len` new bytes against the capacity, first evicting idle segments if that makes
    /// room. Returns the evicted segments, to be dropped outside the lock.
    fn reserve_bytes(&self, state: &mut State, len: u64) -> Result<Vec<Arc<Segment>>> {
        let mut evicted = Vec::new();
        if let Some(capacity) = self.config.capacity {
            while state.owned_bytes + len > capacity {
                match state.evict_free() {
                    Some(segment) => evicted.push(segment),
                    None => break,
                }
            }
            if state.owned_bytes + len > capacity {
                evicted.extend(state.take_empty_slabs());
            }
            if state.owned_bytes + len > capacity {
                return Err(ShmError::CapacityExceeded {
                    requested: len,
                    in_use: state.owned_bytes,
                    capacity,
                });
            }
        }
        state.owned_bytes += len;
        Ok(evicted)
    }

    /// Creates, reserves and seals a segment of `len` bytes under a fresh random name, listed
    /// in the session so that other pools of this process can attach it.
    fn create_segment(
        &self,
        len: usize,
        holds: SegmentHolds,
        shared: bool,
    ) -> Result<Arc<Segment>> {
        let random = sys::random_u64().map_err(|source| ShmError::Os {
            op: "read random bytes for",
            name: "a segment name".to_owned(),
            source,
        })?;
        let name = self.session.id().segment_name(random, holds);
        // Large requests are checked first: reserving more than the system has would push
        // everything else out of memory page by page (or wake the OOM killer) before it
        // failed. Small ones skip the check, which costs more than their reservation.
        if len >= CHECKED_LEN {
            let available = sys::memory_available();
            if len as u64 > available {
                return Err(ShmError::OutOfSharedMemory {
                    requested: len as u64,
                    available,
                });
            }
        }
        let segment = Arc::new(Segment::create(&name, len, shared, &self.session)?);
        self.session.register(&segment);
        Ok(segment)
    }

    /// Creates a segment of `len` bytes that [`reserve_bytes`](Self::reserve_bytes) has
    /// already counted, and returns it with the pool's lock held, ready to be listed. The
    /// bytes are given back if creating fails, or if the pool closed meanwhile.
    fn create_reserved(
        &self,
        len: usize,
        holds: SegmentHolds,
        shared: bool,
    ) -> Result<(Arc<Segment>, MutexGuard<'_, State>)> {
        let segment = match self.create_segment(len, holds, shared) {
            Ok(segment) => segment,
            Err(err) => {
                self.lock().owned_bytes -= len as u64;
                return Err(err);
            }
        };
        let mut state = self.lock();
        state.segments_created += 1;
        if state.closed {
            state.owned_bytes -= len as u64;
            drop(state);
            segment.retire();
            return Err(ShmError::PoolClosed);
        }
        Ok((segment, state))
    }

    /// Takes back a block's region; called when an allocated block is dropped.
    fn release(self: &Arc<Self>, slot: Slot, segment: &Arc<Segment>) {
        let mut dropped: Vec<Arc<Segment>> = Vec::new();
        {
            let mut state = self.lock();
            state.live_blocks -= 1;
            match slot {
                Slot::Whole => {
                    state.live.remove(segment.name());
                    if state.closed || segment.len() as u64 > self.config.cache_bytes {
                        state.owned_bytes -= segment.len() as u64;
                        segment.retire();
                    } else {
                        state.tick += 1;
                        let tick = state.tick;
                        state
                            .free
                            .entry(segment.len())
                            .or_default()
                            .push((tick, Arc::clone(segment)));
                        state.free_bytes += segment.len() as u64;
                        while state.free_bytes > self.config.cache_bytes {
                            dropped.extend(state.evict_free());
                        }
                    }
                }
                Slot::Shared => {
                    state.live.remove(segment.name());
                    state.owned_bytes -= segment.len() as u64;
                    segment.retire();
                }
                Slot::Slab { class, slab, index } => {
                    dropped.extend(state.release_slot(class, slab, index));
                }
                Slot::Private => {
                    let len = segment.len() as u64;
                    if !state.closed && state.private_free_bytes + len <= self.config.cache_bytes {
                        state.private_free_bytes += len;
                        let list = state.private_free.entry(segment.len()).or_default();
                        list.push(Arc::clone(segment));
                    }
                }
            }
            self.used_cache(&mut state);
        }
        drop(dropped);
    }

    fn close(&self) {
        let released = {
            let mut state = self.lock();
            state.closed = true;
            let mut released: Vec<Arc<Segment>> = state
                .live
                .drain()
                .filter_map(|(_, weak)| weak.upgrade())
                .collect();
            while let Some(segment) = state.evict_free() {
                released.push(segment);
            }
            for class in &mut state.slabs {
                for slab in class.slabs.drain(..).flatten() {
                    released.push(slab.segment);
                }
            }
            released.extend(state.attached.drain().map(|(_, (_, segment))| segment));
            state.attached_bytes = 0;
            released.extend(state.private_free.split_off(&0).into_values().flatten());
            state.private_free_bytes = 0;
            released
        };
        for segment in &released {
            segment.retire();
        }
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
