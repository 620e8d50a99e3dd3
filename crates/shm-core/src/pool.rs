//! `ShmPool`: allocation, recycling, slabs, the mapping cache and teardown.
//!
//! Fresh shared memory is expensive here: creating and reserving a 1 GiB segment costs a
//! quarter of a second and its first write as much again, while rewriting a segment that is
//! already mapped runs at memcpy speed. The pool therefore keeps what it can:
//!
//! - **Recycling.** A dropped block of its own segment goes to a free list ordered by size and
//!   is handed out again to a request that fits it within 25%, mapped and with its pages
//!   present. The free list is bounded in bytes ([`PoolConfig::cache_bytes`]); the least
//!   recently used segments beyond the bound are unlinked.
//! - **Slabs.** Requests up to [`PoolConfig::slab_threshold`] share 1 MiB slab segments, cut
//!   into slots of a power of two between 64 bytes and the threshold. Every slot is 64-byte
//!   aligned and its size includes its padding, so many small payloads cost a few segments and
//!   file descriptors, not one each.
//! - **Mapping cache.** Attaching a segment that is already mapped reuses the mapping. Idle
//!   mappings are kept up to [`PoolConfig::attach_cache_bytes`], and dropped as soon as their
//!   owner has unlinked the segment (an unlinked segment lives on while anyone maps it).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::block::ShmBlock;
use crate::cleanup;
use crate::error::{Result, ShmError};
use crate::name::{SessionId, validate_name};
use crate::reference::ShmRef;
use crate::segment::{CreateError, Segment};
use crate::session::Session;
use crate::sys;

/// Bytes of one slab segment.
const SLAB_LEN: usize = 1 << 20;
/// The smallest slot, and the alignment of every block.
pub const BLOCK_ALIGN: usize = 64;
/// New segments are sized in whole pages.
const PAGE: usize = 4096;
/// How many random names to try before giving up on creating a segment.
const NAME_ATTEMPTS: usize = 16;

/// How a pool behaves. `PoolConfig::default()` suits most programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Upper bound on the bytes of all segments the pool holds (in use, cached, slabs).
    /// `None`: bounded only by `/dev/shm`.
    pub capacity: Option<u64>,
    /// Bytes of idle segments kept for reuse. Default 2 GiB.
    pub cache_bytes: u64,
    /// Bytes of idle attached mappings kept, so that a peer's recycled segment is not mapped
    /// afresh. Default 4 GiB.
    pub attach_cache_bytes: u64,
    /// Requests of at most this many bytes share slab segments. Default 64 KiB; at least 64
    /// bytes (the smallest slot), at most 512 KiB.
    pub slab_threshold: usize,
    /// Whether creating the pool first removes the segments of dead sessions
    /// ([`sweep_orphans`](crate::sweep_orphans)). Default `true`.
    pub sweep_orphans: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            capacity: None,
            cache_bytes: 2 << 30,
            attach_cache_bytes: 4 << 30,
            slab_threshold: 64 << 10,
            sweep_orphans: true,
        }
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
}

struct SlabClass {
    slabs: Vec<Option<Slab>>,
}

struct Slab {
    segment: Arc<Segment>,
    free: Vec<u32>,
    live: u32,
}

impl ShmPool {
    /// A pool with the default configuration.
    pub fn new() -> Result<Self> {
        Self::with_config(PoolConfig::default())
    }

    /// A pool with the given configuration.
    pub fn with_config(mut config: PoolConfig) -> Result<Self> {
        config.slab_threshold = config.slab_threshold.clamp(BLOCK_ALIGN, SLAB_LEN / 2);
        if config.sweep_orphans {
            cleanup::sweep_orphans()?;
        }
        let session = Session::current()?;
        session.pool_opened();
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
    pub fn alloc(&self, size: usize) -> Result<ShmBlock> {
        self.shared.reclaim();
        if size <= self.shared.config.slab_threshold {
            self.shared.alloc_slot(size)
        } else {
            self.shared.alloc_whole(size)
        }
    }

    /// Maps the block a peer's reference names, after checking the reference against the
    /// segment: the name's form, an offset aligned to [`BLOCK_ALIGN`], `offset + size` without
    /// overflow and inside the segment, `content_size <= size`. The block is read-only, and so
    /// is the mapping: nothing in this process can write a peer's memory. Attaching a segment
    /// that is already mapped reuses the mapping.
    pub fn attach(&self, r: &ShmRef) -> Result<ShmBlock> {
        let end = check_ref(r)?;
        let segment = self.shared.mapping(&r.name)?;
        block_of(segment, r, end)
    }

    /// Maps a whole segment, whatever its length, read-only: for segments another program made
    /// (Python's `SharedMemory`, say), whose length no reference states. `name` may lack the
    /// leading slash, as Python's `SharedMemory.name` does. The block starts at the segment's
    /// first byte and holds all of it; the mapping is shared with [`attach`](Self::attach).
    pub fn attach_segment(&self, name: &str) -> Result<ShmBlock> {
        let name = if name.starts_with('/') {
            name.to_owned()
        } else {
            format!("/{name}")
        };
        validate_name(&name)?;
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

    /// Maps the block a reference names read-write, for structures that both processes update
    /// through atomics or a publication protocol (the transport's channel), with the checks of
    /// [`attach`](Self::attach). The mapping is the block's own, not shared with other blocks.
    /// Plain data is never attached this way: `as_slice` views of it would race the peer.
    pub fn attach_shared(&self, r: &ShmRef) -> Result<ShmBlock> {
        let end = check_ref(r)?;
        if self.shared.lock().closed {
            return Err(ShmError::PoolClosed);
        }
        block_of(Arc::new(Segment::open(&r.name, true)?), r, end)
    }

    /// A copy of `block`'s content in private memory that no other process can reach, write or
    /// truncate: what a reader of an untrusted peer validates and reads instead of the peer's
    /// block, which the peer could change after validation. The copy is aligned like any
    /// block; it cannot be sent (it names no segment, so encoders copy out of it), and its
    /// memory is recycled for later copies, as blocks are. Fails with
    /// [`ShmError::Truncated`] when the peer truncated the block during the copy.
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
        let mut copy = ShmBlock::new(
            segment,
            0,
            capacity,
            block.len(),
            self.shared.lease(Slot::Private),
        );
        copy.as_mut_slice()?.copy_from_slice(block.as_slice());
        block.check_intact()?;
        Ok(copy)
    }

    /// Unlinks every segment this pool created, drops its caches, and refuses further
    /// allocations with [`ShmError::PoolClosed`]. Blocks still alive stay readable (and
    /// writable by their owner), but nobody can attach them any more.
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
fn check_ref(r: &ShmRef) -> Result<u64> {
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

/// The block `r` names in `segment`, once the segment is known to be long enough.
fn block_of(segment: Arc<Segment>, r: &ShmRef, end: u64) -> Result<ShmBlock> {
    let segment_len = segment.len() as u64;
    if end > segment_len {
        return Err(ShmError::RefOutOfBounds {
            name: r.name.clone(),
            offset: r.offset,
            size: r.size,
            segment_len,
        });
    }
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

    fn lease(self: &Arc<Self>, slot: Slot) -> Option<Lease> {
        Some(Lease {
            pool: Arc::downgrade(self),
            slot,
        })
    }

    fn alloc_whole(self: &Arc<Self>, size: usize) -> Result<ShmBlock> {
        let len = size
            .checked_next_multiple_of(PAGE)
            .ok_or(ShmError::OutOfSharedMemory {
                requested: size as u64,
                available: sys::shm_available().unwrap_or(0),
            })?;
        let evicted;
        {
            let mut state = self.lock();
            if state.closed {
                return Err(ShmError::PoolClosed);
            }
            if let Some(segment) = state.take_free(len) {
                state
                    .live
                    .insert(segment.name().to_owned(), Arc::downgrade(&segment));
                state.live_blocks += 1;
                let capacity = segment.len();
                drop(state);
                return Ok(ShmBlock::new(
                    segment,
                    0,
                    capacity,
                    size,
                    self.lease(Slot::Whole),
                ));
            }
            evicted = self.reserve_bytes(&mut state, len as u64)?;
        }
        drop(evicted);
        let segment = match self.create_segment(len) {
            Ok(segment) => Arc::new(segment),
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
            segment.unlink();
            return Err(ShmError::PoolClosed);
        }
        state
            .live
            .insert(segment.name().to_owned(), Arc::downgrade(&segment));
        state.live_blocks += 1;
        drop(state);
        Ok(ShmBlock::new(
            segment,
            0,
            len,
            size,
            self.lease(Slot::Whole),
        ))
    }

    fn alloc_slot(self: &Arc<Self>, size: usize) -> Result<ShmBlock> {
        let slot_len = size.max(BLOCK_ALIGN).next_power_of_two();
        let class = slot_len.trailing_zeros() as usize - BLOCK_ALIGN.trailing_zeros() as usize;
        loop {
            let evicted;
            {
                let mut state = self.lock();
                if state.closed {
                    return Err(ShmError::PoolClosed);
                }
                let slabs = &mut state.slabs[class].slabs;
                let found = slabs.iter_mut().enumerate().find_map(|(i, slab)| {
                    let slab = slab.as_mut()?;
                    let index = slab.free.pop()?;
                    slab.live += 1;
                    Some((i, index, Arc::clone(&slab.segment)))
                });
                if let Some((slab, index, segment)) = found {
                    state.live_blocks += 1;
                    drop(state);
                    return Ok(ShmBlock::new(
                        segment,
                        index as usize * slot_len,
                        slot_len,
                        size,
                        self.lease(Slot::Slab { class, slab, index }),
                    ));
                }
                evicted = self.reserve_bytes(&mut state, SLAB_LEN as u64)?;
            }
            drop(evicted);
            let segment = match self.create_segment(SLAB_LEN) {
                Ok(segment) => Arc::new(segment),
                Err(err) => {
                    self.lock().owned_bytes -= SLAB_LEN as u64;
                    return Err(err);
                }
            };
            let mut state = self.lock();
            state.segments_created += 1;
            if state.closed {
                state.owned_bytes -= SLAB_LEN as u64;
                drop(state);
                segment.unlink();
                return Err(ShmError::PoolClosed);
            }
            let slots = (SLAB_LEN / slot_len) as u32;
            let slab = Slab {
                segment,
                free: (0..slots).rev().collect(),
                live: 0,
            };
            let slabs = &mut state.slabs[class].slabs;
            match slabs.iter().position(Option::is_none) {
                Some(i) => slabs[i] = Some(slab),
                None => slabs.push(Some(slab)),
            }
            // The next turn of the loop takes a slot from the new slab (or from one a
            // concurrent release freed).
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

    /// Creates and reserves a segment of `len` bytes under a fresh random name.
    fn create_segment(&self, len: usize) -> Result<Segment> {
        let available = sys::shm_available().map_err(|source| ShmError::Os {
            op: "statvfs",
            name: sys::SHM_DIR.to_owned(),
            source,
        })?;
        // Checking first spares the system a reservation that would fill `/dev/shm` page by
        // page before failing; `Segment::create` still reports a race lost to another process.
        if len as u64 > available {
            return Err(ShmError::OutOfSharedMemory {
                requested: len as u64,
                available,
            });
        }
        let session = self.session.id();
        for _ in 0..NAME_ATTEMPTS {
            let random = sys::random_u64().map_err(|source| ShmError::Os {
                op: "read random bytes for",
                name: "a segment name".to_owned(),
                source,
            })?;
            match Segment::create(&session.segment_name(random), len) {
                Ok(segment) => return Ok(segment),
                Err(CreateError::NameTaken) => continue,
                Err(CreateError::Failed(err)) => return Err(err),
            }
        }
        Err(ShmError::Os {
            op: "create",
            name: format!("a segment of session {session}"),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        })
    }

    /// Takes back a block's region; called when an allocated block is dropped.
    fn release(&self, slot: Slot, segment: &Arc<Segment>) {
        let mut dropped: Vec<Arc<Segment>> = Vec::new();
        {
            let mut state = self.lock();
            state.live_blocks -= 1;
            match slot {
                Slot::Whole => {
                    state.live.remove(segment.name());
                    // A segment someone truncated is not handed out again: its tail is
                    // private zero pages now, which no peer would see.
                    if state.closed
                        || segment.len() as u64 > self.config.cache_bytes
                        || segment.truncated()
                    {
                        state.owned_bytes -= segment.len() as u64;
                        segment.unlink();
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
        }
        drop(dropped);
    }

    /// The mapping of `name`, from the cache or new.
    fn mapping(&self, name: &str) -> Result<Arc<Segment>> {
        {
            let mut state = self.lock();
            if state.closed {
                return Err(ShmError::PoolClosed);
            }
            state.tick += 1;
            let tick = state.tick;
            if let Some((used, segment)) = state.attached.get_mut(name) {
                *used = tick;
                return Ok(Arc::clone(segment));
            }
        }
        let segment = Arc::new(Segment::open(name, false)?);
        let (segment, evicted) = {
            let mut state = self.lock();
            let tick = state.tick;
            if let Some((_, existing)) = state.attached.get(name) {
                // Another thread mapped it meanwhile: use one mapping.
                (Arc::clone(existing), Vec::new())
            } else {
                state.attached_bytes += segment.len() as u64;
                state
                    .attached
                    .insert(name.to_owned(), (tick, Arc::clone(&segment)));
                // A new mapping is the moment to let go of idle ones whose owner has unlinked
                // them, and of the least recently used beyond the bound.
                let gone = state.evict_attached(
                    |segment| !sys::segment_path(segment.name()).exists(),
                    u64::MAX,
                );
                let mut evicted = gone;
                evicted.extend(state.evict_attached(|_| true, self.config.attach_cache_bytes));
                (segment, evicted)
            }
        };
        drop(evicted);
        Ok(segment)
    }

    fn close(&self) {
        let released = {
            let mut state = self.lock();
            if !state.closed {
                self.session.pool_closed();
            }
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
            segment.unlink();
        }
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        self.close();
    }
}

impl State {
    /// Takes the most recently freed segment of length `len` to `len * 5/4`, the smallest
    /// that fits.
    fn take_free(&mut self, len: usize) -> Option<Arc<Segment>> {
        let upper = len.saturating_add(len / 4);
        let (&key, list) = self.free.range_mut(len..=upper).next()?;
        let (_, segment) = list.pop()?;
        if list.is_empty() {
            self.free.remove(&key);
        }
        self.free_bytes -= segment.len() as u64;
        Some(segment)
    }

    /// Removes the least recently freed segment from the free list.
    fn evict_free(&mut self) -> Option<Arc<Segment>> {
        let (&key, _) = self
            .free
            .iter()
            .min_by_key(|(_, list)| list.first().map_or(u64::MAX, |(tick, _)| *tick))?;
        let list = self.free.get_mut(&key)?;
        let (_, segment) = list.remove(0);
        if list.is_empty() {
            self.free.remove(&key);
        }
        self.free_bytes -= segment.len() as u64;
        self.owned_bytes -= segment.len() as u64;
        segment.unlink();
        Some(segment)
    }

    /// Returns a slot to its slab. A slab left empty is kept while it is its class's only slab
    /// with free slots, and released otherwise.
    fn release_slot(&mut self, class: usize, slab: usize, index: u32) -> Option<Arc<Segment>> {
        let slabs = &mut self.slabs.get_mut(class)?.slabs;
        let entry = slabs.get_mut(slab)?.as_mut()?;
        entry.free.push(index);
        entry.live -= 1;
        if entry.live > 0 {
            return None;
        }
        let others_have_room = slabs
            .iter()
            .enumerate()
            .any(|(i, s)| i != slab && s.as_ref().is_some_and(|s| !s.free.is_empty()));
        if !others_have_room {
            return None;
        }
        let empty = slabs[slab].take()?;
        self.owned_bytes -= SLAB_LEN as u64;
        empty.segment.unlink();
        Some(empty.segment)
    }

    /// Removes every slab with no live slot.
    fn take_empty_slabs(&mut self) -> Vec<Arc<Segment>> {
        let mut taken = Vec::new();
        for class in &mut self.slabs {
            for entry in &mut class.slabs {
                if entry.as_ref().is_some_and(|slab| slab.live == 0)
                    && let Some(slab) = entry.take()
                {
                    slab.segment.unlink();
                    taken.push(slab.segment);
                }
            }
        }
        self.owned_bytes -= (taken.len() * SLAB_LEN) as u64;
        taken
    }

    /// Drops idle attached mappings that `doomed` selects, least recently used first, until no
    /// more than `keep_bytes` of mappings remain (`u64::MAX`: drop every selected one).
    fn evict_attached(
        &mut self,
        doomed: impl Fn(&Segment) -> bool,
        keep_bytes: u64,
    ) -> Vec<Arc<Segment>> {
        let mut idle: Vec<(u64, String)> = self
            .attached
            .iter()
            .filter(|(_, (_, segment))| Arc::strong_count(segment) == 1)
            .map(|(name, (tick, _))| (*tick, name.clone()))
            .collect();
        idle.sort_unstable();
        let mut evicted = Vec::new();
        for (_, name) in idle {
            if keep_bytes != u64::MAX && self.attached_bytes <= keep_bytes {
                break;
            }
            let selected = self.attached.get(&name).is_some_and(|(_, s)| doomed(s));
            if selected && let Some((_, segment)) = self.attached.remove(&name) {
                self.attached_bytes -= segment.len() as u64;
                evicted.push(segment);
            }
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::MutexGuard;

    use super::*;

    /// Tests that compare `/dev/shm` before and after run one at a time: every pool of this
    /// process shares one session, so a concurrent test's segments would look like a leak.
    fn serial() -> MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn listing() -> BTreeSet<String> {
        crate::list_files().unwrap()
    }

    /// Runs `test` and asserts that `/dev/shm` holds the same files of ours afterwards.
    fn leaves_shm_clean(test: impl FnOnce()) {
        let _serial = serial();
        let before = listing();
        test();
        assert_eq!(listing(), before, "segments left behind in /dev/shm");
    }

    fn quiet_pool(config: PoolConfig) -> ShmPool {
        ShmPool::with_config(PoolConfig {
            sweep_orphans: false,
            ..config
        })
        .unwrap()
    }

    #[test]
    fn recycled_blocks_create_no_new_segment() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let size = 8 << 20;
            drop(pool.alloc(size).unwrap());
            let warm = pool.stats().segments_created;
            for i in 0..1000 {
                let mut block = pool.alloc(size - (i % 7) * 4096).unwrap();
                block.as_mut_slice().unwrap()[0] = i as u8;
            }
            let stats = pool.stats();
            assert_eq!(stats.segments_created, warm, "recycling created segments");
            assert_eq!(stats.live_blocks, 0);
            assert_eq!(stats.bytes_cached, size as u64);
        });
    }

    #[test]
    fn small_allocations_share_slab_segments() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let blocks: Vec<ShmBlock> = (0..10_000)
                .map(|i| {
                    let mut block = pool.alloc(1 + i % 200).unwrap();
                    block.as_mut_slice().unwrap().fill((i % 251) as u8);
                    block
                })
                .collect();
            for (i, block) in blocks.iter().enumerate() {
                assert_eq!(block.offset() % BLOCK_ALIGN, 0, "slot {i} misaligned");
                assert!(block.capacity() >= block.len() && block.capacity() >= BLOCK_ALIGN);
                assert!(
                    block.as_slice().iter().all(|&b| b == (i % 251) as u8),
                    "slot {i} was overwritten by another slot"
                );
            }
            let stats = pool.stats();
            assert!(
                stats.segments_created <= 8,
                "{} segments for 10,000 small blocks",
                stats.segments_created
            );
            assert_eq!(stats.live_blocks, 10_000);
            drop(blocks);
            assert_eq!(pool.stats().live_blocks, 0);
        });
    }

    #[test]
    fn segments_are_private_to_their_user_and_named_for_macos() {
        use std::os::unix::fs::PermissionsExt;
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            for size in [10, 1 << 20] {
                let block = pool.alloc(size).unwrap();
                assert!(
                    block.name().len() <= 30,
                    "{} is too long for macOS",
                    block.name()
                );
                let mode = std::fs::metadata(sys::segment_path(block.name()))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{}", block.name());
            }
        });
    }

    #[test]
    fn zero_size_blocks_are_valid() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let block = pool.alloc(0).unwrap();
            assert!(block.is_empty());
            let r = block.to_ref();
            assert_eq!(r.content_size, 0);
            let view = pool.attach(&r).unwrap();
            assert_eq!(view.as_slice(), &[] as &[u8]);
        });
    }

    #[test]
    fn attaching_twice_reuses_one_mapping() {
        leaves_shm_clean(|| {
            let owner = quiet_pool(PoolConfig::default());
            let reader = quiet_pool(PoolConfig::default());
            let mut block = owner.alloc(3 << 20).unwrap();
            block.as_mut_slice().unwrap().fill(0xab);
            let a = reader.attach(&block.to_ref()).unwrap();
            let b = reader.attach(&block.to_ref()).unwrap();
            assert_eq!(a.as_ptr(), b.as_ptr());
            assert_eq!(reader.stats().segments_attached, 1);
            assert!(b.as_slice().iter().all(|&x| x == 0xab));
        });
    }

    #[test]
    fn mappings_of_segments_their_owner_unlinked_are_released() {
        leaves_shm_clean(|| {
            let owner = quiet_pool(PoolConfig::default());
            let reader = quiet_pool(PoolConfig::default());
            let first = owner.alloc(2 << 20).unwrap();
            drop(reader.attach(&first.to_ref()).unwrap());
            assert_eq!(
                reader.stats().segments_attached,
                1,
                "idle mapping is cached"
            );
            drop(first);
            owner.trim();
            let second = owner.alloc(5 << 20).unwrap();
            let _view = reader.attach(&second.to_ref()).unwrap();
            let stats = reader.stats();
            assert_eq!(
                stats.segments_attached, 1,
                "the unlinked segment is still mapped"
            );
            assert_eq!(stats.bytes_mapped, 5 << 20);
        });
    }

    #[test]
    fn attached_blocks_are_read_only() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let block = pool.alloc(100_000).unwrap();
            let mut view = pool.attach(&block.to_ref()).unwrap();
            match view.as_mut_slice() {
                Err(ShmError::ReadOnly { name }) => assert_eq!(name, block.name()),
                other => panic!("expected ReadOnly, got {other:?}"),
            }
            // Not only by convention: the mapping itself is read-only.
            let address = view.as_ptr() as usize;
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let mapping = maps
                .lines()
                .find(|line| {
                    let (range, _) = line.split_once(' ').unwrap();
                    let (start, end) = range.split_once('-').unwrap();
                    let start = usize::from_str_radix(start, 16).unwrap();
                    let end = usize::from_str_radix(end, 16).unwrap();
                    (start..end).contains(&address)
                })
                .unwrap();
            assert!(mapping.contains(" r--s "), "attached mapping: {mapping}");
        });
    }

    #[test]
    fn a_segment_truncated_under_its_readers_reads_as_zeros_instead_of_killing_them() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let mut block = pool.alloc(1 << 20).unwrap();
            block.as_mut_slice().unwrap().fill(7);
            let view = pool.attach(&block.to_ref()).unwrap();
            assert!(!view.is_truncated());
            // What a hostile peer of the same user can do to any segment it can name.
            std::fs::OpenOptions::new()
                .write(true)
                .open(sys::segment_path(block.name()))
                .unwrap()
                .set_len(PAGE as u64)
                .unwrap();
            let bytes = view.as_slice();
            assert_eq!(bytes[PAGE - 1], 7, "the bytes before the cut are intact");
            assert_eq!(bytes[PAGE], 0, "past the cut: zeros, not SIGBUS");
            assert!(bytes[PAGE..].iter().all(|&b| b == 0));
            assert!(view.is_truncated());
            match view.check_intact() {
                Err(ShmError::Truncated { name, mapped }) => {
                    assert_eq!(name, block.name());
                    assert_eq!(mapped, 1 << 20);
                }
                other => panic!("expected Truncated, got {other:?}"),
            }
            assert!(matches!(
                pool.private_copy(&view),
                Err(ShmError::Truncated { .. })
            ));
            // The owner's own mapping survives a write past the cut just the same.
            assert!(!block.is_truncated());
            block.as_mut_slice().unwrap()[PAGE * 2] = 1;
            assert!(block.is_truncated());
            let name = block.name().to_owned();
            drop(view);
            let cached = pool.stats().bytes_cached;
            drop(block);
            assert_eq!(
                pool.stats().bytes_cached,
                cached,
                "a truncated segment is not reused"
            );
            assert!(!sys::segment_path(&name).exists());
        });
    }

    #[test]
    fn private_copies_hold_the_content_and_cannot_be_named() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            for size in [0, 100, 3 << 20] {
                let mut block = pool.alloc(size).unwrap();
                block
                    .as_mut_slice()
                    .unwrap()
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = i as u8);
                let view = pool.attach(&block.to_ref()).unwrap();
                let copy = pool.private_copy(&view).unwrap();
                assert_eq!(copy.as_slice(), view.as_slice());
                assert!(copy.is_private() && !view.is_private());
                assert!(copy.as_ptr().cast::<u64>().is_aligned() || size == 0);
                assert!(matches!(
                    pool.attach(&copy.to_ref()),
                    Err(ShmError::InvalidName { .. })
                ));
                // The copy outlives the block and its segment.
                drop(view);
                drop(block);
                pool.trim();
                assert!(
                    copy.as_slice()
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == i as u8)
                );
                // Its memory serves the next copy of that size.
                drop(copy);
                let again = pool.alloc(size).unwrap();
                let copy = pool.private_copy(&again).unwrap();
                assert_eq!(
                    pool.stats().bytes_cached,
                    0,
                    "the cached private memory was reused"
                );
                drop((copy, again));
            }
        });
    }

    #[test]
    fn whole_segments_attach_by_name_with_or_without_the_slash() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let mut block = pool.alloc(100_000).unwrap();
            block.as_mut_slice().unwrap().fill(3);
            let name = block.name().to_owned();
            for given in [name.as_str(), &name[1..]] {
                let whole = pool.attach_segment(given).unwrap();
                assert_eq!(whole.name(), name);
                assert_eq!(whole.len(), 102_400, "the segment's length, page-rounded");
                assert!(whole.as_slice()[..100_000].iter().all(|&b| b == 3));
            }
            assert!(matches!(
                pool.attach_segment("no-such-segment"),
                Err(ShmError::SegmentNotFound { .. })
            ));
            assert!(matches!(
                pool.attach_segment("a/b"),
                Err(ShmError::InvalidName { .. })
            ));
        });
    }

    #[test]
    fn bad_refs_are_typed_errors() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let block = pool.alloc(1 << 20).unwrap();
            let good = block.to_ref();
            let segment_len = (1u64 << 20).next_multiple_of(PAGE as u64);

            let missing = ShmRef {
                name: "/shm-00000000-0000000000000000".into(),
                ..good.clone()
            };
            assert!(matches!(
                pool.attach(&missing),
                Err(ShmError::SegmentNotFound { name }) if name == missing.name
            ));

            let malformed = ShmRef {
                name: "shm-no-slash".into(),
                ..good.clone()
            };
            assert!(matches!(
                pool.attach(&malformed),
                Err(ShmError::InvalidName { .. })
            ));

            let too_big = ShmRef {
                size: segment_len + 1,
                content_size: segment_len + 1,
                ..good.clone()
            };
            assert!(matches!(
                pool.attach(&too_big),
                Err(ShmError::RefOutOfBounds { size, segment_len: len, .. })
                    if size == segment_len + 1 && len == segment_len
            ));

            let past_end = ShmRef {
                offset: segment_len,
                size: 64,
                content_size: 64,
                ..good.clone()
            };
            assert!(matches!(
                pool.attach(&past_end),
                Err(ShmError::RefOutOfBounds { offset, .. }) if offset == segment_len
            ));

            let overflowing = ShmRef {
                offset: u64::MAX - 63,
                size: 64,
                content_size: 0,
                ..good.clone()
            };
            assert!(matches!(
                pool.attach(&overflowing),
                Err(ShmError::RefOverflow { offset, size: 64, .. }) if offset == u64::MAX - 63
            ));

            let misaligned = ShmRef {
                offset: 8,
                size: 64,
                content_size: 64,
                ..good.clone()
            };
            assert!(matches!(
                pool.attach(&misaligned),
                Err(ShmError::MisalignedRef {
                    offset: 8,
                    align: 64,
                    ..
                })
            ));

            let content_too_long = ShmRef {
                content_size: good.size + 1,
                ..good.clone()
            };
            assert!(matches!(
                pool.attach(&content_too_long),
                Err(ShmError::ContentExceedsSize { .. })
            ));

            assert_eq!(pool.attach(&good).unwrap().len(), 1 << 20);
        });
    }

    #[test]
    fn capacity_is_enforced_with_the_numbers() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig {
                capacity: Some(10 << 20),
                ..PoolConfig::default()
            });
            let held = pool.alloc(6 << 20).unwrap();
            match pool.alloc(6 << 20) {
                Err(ShmError::CapacityExceeded {
                    requested,
                    in_use,
                    capacity,
                }) => {
                    assert_eq!((requested, in_use, capacity), (6 << 20, 6 << 20, 10 << 20));
                }
                other => panic!("expected CapacityExceeded, got {other:?}"),
            }
            drop(held);
            // The cached segment is evicted to make room for a different size.
            let _ = pool.alloc(9 << 20).unwrap();
            assert!(pool.stats().bytes_mapped <= 10 << 20);
        });
    }

    #[test]
    fn exhausting_dev_shm_is_an_error_not_a_crash() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let available = crate::shm_available().unwrap();
            let request = available + (1 << 30);
            match pool.alloc(request as usize) {
                Err(ShmError::OutOfSharedMemory {
                    requested,
                    available: reported,
                }) => {
                    assert!(requested >= request);
                    assert!(reported < requested);
                }
                other => panic!("expected OutOfSharedMemory, got {other:?}"),
            }
            let mut block = pool.alloc(1 << 20).unwrap();
            block.as_mut_slice().unwrap().fill(1);
            assert_eq!(pool.stats().live_blocks, 1);
        });
    }

    #[test]
    fn close_all_unlinks_live_blocks_which_stay_readable() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let mut big = pool.alloc(1 << 20).unwrap();
            big.as_mut_slice().unwrap().fill(9);
            let mut small = pool.alloc(10).unwrap();
            small.as_mut_slice().unwrap().fill(3);
            drop(pool.alloc(2 << 20).unwrap());
            let names = [big.name().to_owned(), small.name().to_owned()];
            pool.close_all();
            for name in &names {
                assert!(!sys::segment_path(name).exists(), "{name} still linked");
            }
            assert!(big.as_slice().iter().all(|&b| b == 9));
            assert!(small.as_slice().iter().all(|&b| b == 3));
            assert!(matches!(pool.alloc(1), Err(ShmError::PoolClosed)));
            assert!(matches!(
                pool.attach(&big.to_ref()),
                Err(ShmError::PoolClosed)
            ));
        });
    }

    #[test]
    fn a_session_cannot_be_ended_while_a_pool_of_it_is_open() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let lock = sys::segment_path(&pool.session().lock_name());
            match crate::end_session() {
                Err(ShmError::SessionInUse { open_pools, .. }) => assert_eq!(open_pools, 1),
                other => panic!("expected SessionInUse, got {other:?}"),
            }
            assert!(lock.exists(), "the live pool's lock was removed");
            pool.close_all();
            crate::end_session().unwrap();
            assert!(!lock.exists());
        });
    }

    #[test]
    fn reclaimers_are_asked_before_every_allocation() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Counting(AtomicUsize);
        impl Reclaim for Counting {
            fn reclaim(&self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            let counting = Arc::new(Counting(AtomicUsize::new(0)));
            let weak: Weak<dyn Reclaim> = Arc::downgrade(&counting) as Weak<dyn Reclaim>;
            pool.add_reclaimer(weak);
            drop(pool.alloc(10).unwrap());
            drop(pool.alloc(1 << 20).unwrap());
            assert_eq!(counting.0.load(Ordering::Relaxed), 2);
            drop(counting);
            drop(pool.alloc(10).unwrap());
        });
    }

    #[test]
    fn many_threads_share_one_pool() {
        leaves_shm_clean(|| {
            let pool = quiet_pool(PoolConfig::default());
            std::thread::scope(|scope| {
                for thread in 0..8u8 {
                    let pool = pool.clone();
                    scope.spawn(move || {
                        for i in 0..300usize {
                            let size = [17, 4000, 70_000, 300_000, 2 << 20][i % 5];
                            let mut block = pool.alloc(size).unwrap();
                            block.as_mut_slice().unwrap().fill(thread);
                            std::thread::yield_now();
                            assert!(
                                block.as_slice().iter().all(|&b| b == thread),
                                "a block was handed to two threads at once"
                            );
                        }
                    });
                }
            });
            assert_eq!(pool.stats().live_blocks, 0);
        });
    }
}
