//! The control channel: one shared-memory block with two frame rings (calls and replies), two
//! release rings (blocks given back), and one doorbell per side.
//!
//! Layout (offsets from the block start; every group on its own 64-byte line):
//!
//! ```text
//!    0  header: magic u64, version u32, slot_len u32, slots u32, parent_pid u32, releases u32
//!   64  bell of the parent: seq u32, sleepers u32
//!  128  bell of the worker: seq u32, sleepers u32
//!  192  frame ring to the worker: head u64 | 256 tail u64 | 320 producer_waiting u32
//!  384  frame ring to the parent: head u64 | 448 tail u64 | 512 producer_waiting u32
//!  576  release ring to the worker: head u64 | 640 tail u64
//!  704  release ring to the parent: head u64 | 768 tail u64
//! 1024  frame slots to the worker, then to the parent: `slots` × `slot_len` bytes each, a slot
//!       being a u32 length and the frame's bytes; then release slots to the worker, then to
//!       the parent: `releases` × u64 each
//! ```
//!
//! Every ring has one producer and one consumer (one thread at a time on each side; the
//! owners of the rings serialise their threads). A frame ring's consumer keeps its read
//! position in its own memory and gives the slots it has read back — stores `head` — only when
//! it finds the ring empty, before it waits, and once half the ring waits to go back: the
//! store costs a cache miss and a fence, which a reader that has its reply should not pay
//! before it returns. A side that must wait — for a frame, or for
//! room in a full ring — spins for a short while, then sleeps on its own doorbell: it counts
//! itself in `sleepers`, reads `seq`, checks its condition once more, and waits on the futex
//! `seq`. The other side, after it publishes a frame (or frees a slot of a ring whose producer
//! said it waits), increments `seq` and wakes the sleepers — only when there are any, so a busy
//! channel makes no system calls. Release rings have no doorbell: their consumer drains them
//! when it needs memory, never on a timer.
//!
//! Why a futex and not `raw_sync::Event`: the event guards its state with a process-shared
//! mutex that is not robust, so a peer killed while holding it leaves the survivor blocked
//! forever, with no timeout; its timed waits fail with EINVAL for some deadlines (upstream
//! issue 39). A futex word holds no lock: a dead peer cannot block us.

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use rustix::thread::futex;
use shm_core::ShmAtomicBlock;

use crate::error::{Result, TransportError, malformed};

/// Identifies a channel block.
const MAGIC: u64 = 0x7368_6d2d_6368_616e; // "shm-chan"
/// The version of the channel layout and of the frames.
pub const PROTOCOL_VERSION: u32 = 4;

const LINE: usize = 64;
const BELLS: usize = LINE;
const FRAME_RINGS: usize = 3 * LINE;
const FRAME_RING_LEN: usize = 3 * LINE;
const RELEASE_RINGS: usize = FRAME_RINGS + 2 * FRAME_RING_LEN;
const RELEASE_RING_LEN: usize = 2 * LINE;
const SLOTS: usize = 1024;
/// Bytes of one slot, its length word included.
pub(crate) const SLOT_LEN: usize = 4096;
/// The largest frame a slot holds (after its u32 length).
pub(crate) const FRAME_MAX: usize = SLOT_LEN - 4;
/// Slots per frame ring.
pub(crate) const SLOT_COUNT: usize = 64;
/// Entries per release ring.
pub(crate) const RELEASE_COUNT: usize = 4096;
/// How many read slots of a frame ring its consumer gives back at the latest, without waiting
/// for the ring to be empty: half the ring, so that a producer that fills it is never held up
/// for long by a consumer that keeps reading.
pub(crate) const GIVE_BACK: u64 = SLOT_COUNT as u64 / 2;

/// How long a waiter spins before it sleeps: longer than a small call's round trip, short
/// enough that an idle side uses no CPU to speak of.
const SPIN: Duration = Duration::from_micros(50);

/// How long of that a waiter spins without yielding the core: a small call's round trip, so
/// that a reply coming at once is seen at once rather than after a `sched_yield`.
const BUSY_SPIN: Duration = Duration::from_micros(4);

/// The longest a parent's thread sleeps without looking again. Wakes come from the bell; this
/// bound is for a bell that cannot ring any more — a worker that zeroed the sleeper count and
/// then died. Only threads waiting for a call sleep on the parent's bell, so an idle parent never
/// wakes for it; a worker sleeps without a bound (its parent's death ends the process).
const SLEEP_CHECK: Duration = Duration::from_secs(1);

/// Bytes of a channel block.
pub(crate) fn channel_len() -> usize {
    SLOTS + 2 * SLOT_COUNT * SLOT_LEN + 2 * RELEASE_COUNT * 8
}

/// Bytes of a channel block's control area (header, bells, ring positions).
pub const CONTROL_LEN: usize = SLOTS;

/// The positions of one ring, as a snapshot of the control area shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingState {
    /// Entries the consumer has given back (a frame ring's consumer may have read up to 31
    /// more, under half the ring, which it gives back when it next waits).
    pub head: u64,
    /// Entries the producer has put.
    pub tail: u64,
    /// Whether the producer waits for room (frame rings only).
    pub producer_waiting: Option<bool>,
}

impl RingState {
    /// Entries waiting in the ring (`tail - head`; more than the ring holds means a broken
    /// peer).
    pub fn occupied(&self) -> u64 {
        self.tail.wrapping_sub(self.head)
    }
}

/// What a channel block's control area says: for tools that inspect a channel from outside
/// (`shm inspect`), from a snapshot of its first [`CONTROL_LEN`] bytes. docs/format.md
/// describes every field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelState {
    /// The layout and protocol version.
    pub version: u32,
    /// Bytes of one frame slot.
    pub slot_len: u32,
    /// Slots per frame ring.
    pub slots: u32,
    /// Entries per release ring.
    pub releases: u32,
    /// The parent's pid.
    pub parent_pid: u32,
    /// The parent's and the worker's bells: `(seq, sleepers)`.
    pub bells: [(u32, u32); 2],
    /// The frame rings to the worker and to the parent.
    pub frame_rings: [RingState; 2],
    /// The release rings to the worker and to the parent.
    pub release_rings: [RingState; 2],
}

impl ChannelState {
    /// Reads a snapshot of a control area; `None` when it is too short or not a channel's
    /// (another magic number).
    pub fn parse(control: &[u8]) -> Option<Self> {
        let u64_at = |at: usize| {
            Some(u64::from_le_bytes(
                control.get(at..at + 8)?.try_into().ok()?,
            ))
        };
        let u32_at = |at: usize| {
            Some(u32::from_le_bytes(
                control.get(at..at + 4)?.try_into().ok()?,
            ))
        };
        if u64_at(0)? != MAGIC {
            return None;
        }
        let frame_ring = |d: usize| {
            let base = FRAME_RINGS + d * FRAME_RING_LEN;
            Some(RingState {
                head: u64_at(base)?,
                tail: u64_at(base + LINE)?,
                producer_waiting: Some(u32_at(base + 2 * LINE)? != 0),
            })
        };
        let release_ring = |d: usize| {
            let base = RELEASE_RINGS + d * RELEASE_RING_LEN;
            Some(RingState {
                head: u64_at(base)?,
                tail: u64_at(base + LINE)?,
                producer_waiting: None,
            })
        };
        let bell = |side: usize| {
            Some((
                u32_at(BELLS + side * LINE)?,
                u32_at(BELLS + side * LINE + 4)?,
            ))
        };
        Some(ChannelState {
            version: u32_at(8)?,
            slot_len: u32_at(12)?,
            slots: u32_at(16)?,
            parent_pid: u32_at(20)?,
            releases: u32_at(24)?,
            bells: [bell(0)?, bell(1)?],
            frame_rings: [frame_ring(0)?, frame_ring(1)?],
            release_rings: [release_ring(0)?, release_ring(1)?],
        })
    }
}

/// One direction of the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    ToWorker = 0,
    ToParent = 1,
}

/// One end of the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Parent = 0,
    Worker = 1,
}

impl Side {
    /// The direction in which this side receives.
    pub(crate) fn inbound(self) -> Direction {
        match self {
            Side::Parent => Direction::ToParent,
            Side::Worker => Direction::ToWorker,
        }
    }

    /// The direction in which this side sends.
    pub(crate) fn outbound(self) -> Direction {
        match self {
            Side::Parent => Direction::ToWorker,
            Side::Worker => Direction::ToParent,
        }
    }
}

impl Direction {
    fn consumer(self) -> Side {
        match self {
            Direction::ToWorker => Side::Worker,
            Direction::ToParent => Side::Parent,
        }
    }

    fn producer(self) -> Side {
        match self {
            Direction::ToWorker => Side::Parent,
            Direction::ToParent => Side::Worker,
        }
    }
}

/// What a wait ended with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The condition holds.
    Ready,
    /// The deadline passed.
    TimedOut,
    /// `stop()` said to give up.
    Stopped,
}

/// A view of a channel block, shared by everything that uses the channel.
#[derive(Debug)]
pub(crate) struct Channel {
    block: ShmAtomicBlock,
    /// Per frame ring, how far this process has read it: ahead of the ring's `head` by the
    /// frames read since the consumer last published (see [`FrameRing::publish_read`]). Only
    /// the ring's consumer uses its entry, one thread at a time.
    read: [AtomicU64; 2],
}

impl Channel {
    /// Lays out a fresh channel in `block` (made by the parent's
    /// [`alloc_shared`](shm_core::ShmPool::alloc_shared), so zero-filled; at least
    /// [`channel_len`] bytes; not yet shared).
    pub(crate) fn create(block: ShmAtomicBlock, parent_pid: u32) -> Result<Arc<Self>> {
        let channel = Channel::over(block)?;
        let word = |at: usize, value: u32| {
            channel
                .atomic_u32(at)
                .store(value.to_le(), Ordering::Relaxed)
        };
        word(8, PROTOCOL_VERSION);
        word(12, SLOT_LEN as u32);
        word(16, SLOT_COUNT as u32);
        word(20, parent_pid);
        word(24, RELEASE_COUNT as u32);
        // The magic last: a header with it is complete. The worker learns of the channel only
        // after this (through its environment and the link), which orders the rest.
        channel
            .atomic_u64(0)
            .store(MAGIC.to_le(), Ordering::Release);
        Ok(Arc::new(channel))
    }

    /// The channel in `block`, once the block is known to hold one.
    fn over(block: ShmAtomicBlock) -> Result<Self> {
        if block.len() < channel_len() {
            return Err(malformed(format!(
                "channel block of {} bytes, at least {} expected",
                block.len(),
                channel_len()
            )));
        }
        let channel = Channel {
            block,
            read: [AtomicU64::new(0), AtomicU64::new(0)],
        };
        for direction in [Direction::ToWorker, Direction::ToParent] {
            let ring = channel.frames(direction);
            ring.read()
                .store(ring.head().load(Ordering::Acquire), Ordering::Relaxed);
        }
        Ok(channel)
    }

    /// A channel the parent laid out, as the worker attached it; checks the header.
    pub(crate) fn open(block: ShmAtomicBlock) -> Result<Arc<Self>> {
        let channel = Channel::over(block)?;
        // The peer may write any word of the block at any time: read the header through
        // atomics, never through a `&[u8]` of memory that may change under it.
        let word = |at: usize| u32::from_le(channel.atomic_u32(at).load(Ordering::Acquire));
        let magic = u64::from_le(channel.atomic_u64(0).load(Ordering::Acquire));
        if magic != MAGIC {
            return Err(malformed(format!("channel magic {magic:#x}")));
        }
        if word(8) != PROTOCOL_VERSION {
            return Err(TransportError::ProtocolMismatch {
                ours: PROTOCOL_VERSION,
                theirs: word(8),
            });
        }
        let geometry = (word(12), word(16), word(24));
        if geometry != (SLOT_LEN as u32, SLOT_COUNT as u32, RELEASE_COUNT as u32) {
            return Err(malformed(format!(
                "channel of {} slots of {} bytes and {} release entries, this build uses \
                 {SLOT_COUNT} of {SLOT_LEN} and {RELEASE_COUNT}",
                geometry.1, geometry.0, geometry.2
            )));
        }
        Ok(Arc::new(channel))
    }

    /// The parent's pid, as the parent wrote it.
    pub(crate) fn parent_pid(&self) -> u32 {
        u32::from_le(self.atomic_u32(20).load(Ordering::Acquire))
    }

    /// The name of the segment the channel lives in (the parent's session is in it).
    pub(crate) fn segment_name(&self) -> &str {
        self.block.name()
    }

    /// The block the channel lives in, for sending its segment to the worker.
    pub(crate) fn block(&self) -> &ShmAtomicBlock {
        &self.block
    }

    /// The reference the worker attaches the channel by.
    pub(crate) fn to_ref(&self) -> shm_core::ShmRef {
        self.block.to_ref()
    }

    pub(crate) fn frames(&self, direction: Direction) -> FrameRing<'_> {
        FrameRing {
            channel: self,
            direction,
        }
    }

    pub(crate) fn releases(&self, direction: Direction) -> ReleaseRing<'_> {
        ReleaseRing {
            channel: self,
            index: direction as usize,
        }
    }

    fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= channel_len());
        // SAFETY: `offset` lies inside the block (the control area or the release slots),
        // which `self` keeps mapped for the lifetime of the borrow; the block starts 64-byte
        // aligned and `offset` is a multiple of 8, so the address is aligned for u64. Both
        // processes touch these words only through atomics.
        unsafe { &*self.block.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset.is_multiple_of(4) && offset + 4 <= SLOTS);
        // SAFETY: as in `atomic_u64`, for a 4-byte aligned word of the control area.
        unsafe { &*self.block.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn bell_seq(&self, side: Side) -> &AtomicU32 {
        self.atomic_u32(BELLS + side as usize * LINE)
    }

    fn bell_sleepers(&self, side: Side) -> &AtomicU32 {
        self.atomic_u32(BELLS + side as usize * LINE + 4)
    }

    /// Wakes every thread of `side` that sleeps on its bell, if any does. The caller has
    /// published what the sleepers wait for, before this call.
    pub(crate) fn ring(&self, side: Side) {
        // Pairs with the fence in `wait`: either the sleeper sees what we published, or we see
        // that it sleeps and wake it.
        fence(Ordering::SeqCst);
        if self.bell_sleepers(side).load(Ordering::SeqCst) != 0 {
            self.wake_all(side);
        }
    }

    /// Wakes every thread of `side` that sleeps on its bell, whatever the sleeper count says
    /// (which the peer may have overwritten): for news that does not come through the channel,
    /// such as the peer's death.
    pub(crate) fn wake_all(&self, side: Side) {
        self.bell_seq(side).fetch_add(1, Ordering::SeqCst);
        // Every sleeper (the kernel reads the count as an int). A failed wake leaves the
        // sleeper to its next look (`SLEEP_CHECK`); nothing to report here.
        let _ = futex::wake(self.bell_seq(side), futex::Flags::empty(), i32::MAX as u32);
    }

    /// Waits on `side`'s bell until `ready()` holds, `deadline` passes, or `stop()` holds.
    /// Spins first, then sleeps until the bell rings — whoever changes what `ready` or `stop`
    /// looks at rings it — or the deadline; the parent looks again at least every
    /// `SLEEP_CHECK`.
    pub(crate) fn wait(
        &self,
        side: Side,
        deadline: Option<Instant>,
        ready: impl Fn() -> bool,
        stop: impl Fn() -> bool,
    ) -> Wake {
        let start = Instant::now();
        let (busy_until, spin_until) = (start + BUSY_SPIN, start + SPIN);
        let mut spins = 0u32;
        loop {
            if ready() {
                return Wake::Ready;
            }
            spins = spins.wrapping_add(1);
            // Look at the clock only now and then: it costs more than a look at the ring.
            if !spins.is_multiple_of(16) {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now >= spin_until {
                break;
            }
            // Past the first microseconds, give the core away between looks: on a small
            // machine the peer we wait for may be queued behind us on this very core.
            if now >= busy_until {
                std::thread::yield_now();
            }
        }
        let sleepers = self.bell_sleepers(side);
        loop {
            if stop() {
                return Wake::Stopped;
            }
            let remaining = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Wake::TimedOut,
                },
                None => None,
            };
            let remaining = match side {
                Side::Parent => Some(remaining.map_or(SLEEP_CHECK, |left| left.min(SLEEP_CHECK))),
                Side::Worker => remaining,
            };
            sleepers.fetch_add(1, Ordering::SeqCst);
            let seq = self.bell_seq(side).load(Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if ready() {
                sleepers.fetch_sub(1, Ordering::SeqCst);
                return Wake::Ready;
            }
            if stop() {
                sleepers.fetch_sub(1, Ordering::SeqCst);
                return Wake::Stopped;
            }
            let timeout = remaining.map(|left| futex::Timespec {
                tv_sec: left.as_secs().min(i64::MAX as u64) as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            });
            // Returns on a wake, a change of `seq`, a signal or the timeout; the loop checks.
            let _ = futex::wait(
                self.bell_seq(side),
                futex::Flags::empty(),
                seq,
                timeout.as_ref(),
            );
            sleepers.fetch_sub(1, Ordering::SeqCst);
            if ready() {
                return Wake::Ready;
            }
        }
    }
}

/// One frame ring: the producer pushes frames, the consumer pops them.
#[derive(Debug)]
pub(crate) struct FrameRing<'a> {
    channel: &'a Channel,
    direction: Direction,
}

impl FrameRing<'_> {
    fn base(&self) -> usize {
        FRAME_RINGS + self.direction as usize * FRAME_RING_LEN
    }
    fn head(&self) -> &AtomicU64 {
        self.channel.atomic_u64(self.base())
    }
    fn tail(&self) -> &AtomicU64 {
        self.channel.atomic_u64(self.base() + LINE)
    }
    fn producer_waiting(&self) -> &AtomicU32 {
        self.channel.atomic_u32(self.base() + 2 * LINE)
    }
    fn read(&self) -> &AtomicU64 {
        &self.channel.read[self.direction as usize]
    }

    fn slot_ptr(&self, position: u64) -> *mut u8 {
        let slot = (position % SLOT_COUNT as u64) as usize;
        let offset = SLOTS + (self.direction as usize * SLOT_COUNT + slot) * SLOT_LEN;
        // In bounds: `direction < 2` and `slot < SLOT_COUNT`.
        self.channel.block.as_ptr().wrapping_add(offset)
    }

    /// How many frames the ring holds, as its producer sees it (the consumer's published
    /// `head`); an error when its positions are impossible (the peer wrote garbage into
    /// them). The error stays, so a caller that meets it gives up rather than waiting for a
    /// ring that cannot move.
    pub(crate) fn occupied(&self) -> Result<u64> {
        let head = self.head().load(Ordering::Acquire);
        Self::apart(head, self.tail().load(Ordering::Acquire))
    }

    /// How many frames the ring holds that this process, its consumer, has not read; an error
    /// when the producer's `tail` is impossible.
    pub(crate) fn unread(&self) -> Result<u64> {
        let read = self.read().load(Ordering::Relaxed);
        Self::apart(read, self.tail().load(Ordering::Acquire))
    }

    fn apart(head: u64, tail: u64) -> Result<u64> {
        let occupied = tail.wrapping_sub(head);
        if occupied > SLOT_COUNT as u64 {
            return Err(malformed(format!(
                "ring positions head {head} and tail {tail} are more than {SLOT_COUNT} apart"
            )));
        }
        Ok(occupied)
    }

    /// Whether every slot holds a frame its consumer has not given back (a broken ring is not
    /// full: waiting for room in it ends, and pushing reports what is wrong). The producer's
    /// view.
    pub(crate) fn is_full(&self) -> bool {
        let head = self.head().load(Ordering::Acquire);
        self.tail().load(Ordering::Acquire).wrapping_sub(head) == SLOT_COUNT as u64
    }

    /// Whether the ring holds no frame this process has not read (a broken ring is not empty:
    /// waiting for a frame ends, and popping reports what is wrong). The consumer's view.
    pub(crate) fn is_empty(&self) -> bool {
        let read = self.read().load(Ordering::Relaxed);
        self.tail().load(Ordering::Acquire) == read
    }

    /// Has this core's cache fetch the ring's positions, which [`push`](Self::push) reads
    /// first: the consumer writes `head` whenever it waits, so the line is usually in the other
    /// core's cache, and a push that waits for it delays the call it carries. Issued before
    /// the frame is built, the fetch overlaps that work. Only a hint: nothing changes if the
    /// line is moved again meanwhile.
    pub(crate) fn prefetch_positions(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            // SAFETY: SSE, which the instruction needs, is part of every x86_64 target; a
            // prefetch neither reads into the program nor faults, and both words lie in the
            // block besides.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(self.head()).cast());
                _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(self.tail()).cast());
            }
        }
    }

    /// Appends a frame and wakes the consumer if it sleeps; `Ok(false)` when the ring is full.
    /// Only one thread of one process produces into a ring at a time.
    pub(crate) fn push(&self, frame: &[u8]) -> Result<bool> {
        if frame.len() > FRAME_MAX {
            return Err(malformed(format!(
                "frame of {} bytes in a slot of {FRAME_MAX}",
                frame.len(),
            )));
        }
        if self.occupied()? >= SLOT_COUNT as u64 {
            return Ok(false);
        }
        let tail = self.tail().load(Ordering::Relaxed);
        let slot = self.slot_ptr(tail);
        // SAFETY: the slot lies inside the block (see `slot_ptr`) and belongs to the producer:
        // the consumer reads it only after `tail` is published below, and has released it
        // (`head` passed it, loaded with Acquire in `occupied`). Only this thread produces.
        unsafe {
            std::ptr::copy_nonoverlapping((frame.len() as u32).to_le_bytes().as_ptr(), slot, 4);
            std::ptr::copy_nonoverlapping(frame.as_ptr(), slot.add(4), frame.len());
        }
        self.tail().store(tail.wrapping_add(1), Ordering::Release);
        self.channel.ring(self.direction.consumer());
        Ok(true)
    }

    /// Takes the next frame, if any. Only one thread of one process consumes a ring at a time.
    #[cfg(test)]
    pub(crate) fn pop(&self) -> Result<Option<Vec<u8>>> {
        let mut slot = [MaybeUninit::uninit(); SLOT_LEN];
        Ok(self.pop_into(&mut slot)?.map(<[u8]>::to_vec))
    }

    /// [`pop`](Self::pop) into `into`, without an allocation or a fill: returns the frame's
    /// bytes, a prefix of `into`. The frame is copied out of shared memory before it is parsed,
    /// so the peer cannot change it under the parser.
    ///
    /// The slots it read go back to the producer when [`publish_read`](Self::publish_read)
    /// runs: here, once the ring is found empty or half its slots wait to go back, and before
    /// every wait for a frame. So a reader that takes the frame it waited for returns at once,
    /// and gives the slot back while it next waits, when the peer is busy with what it sent.
    pub(crate) fn pop_into<'b>(
        &self,
        into: &'b mut [MaybeUninit<u8>; SLOT_LEN],
    ) -> Result<Option<&'b [u8]>> {
        if self.unread()? == 0 {
            self.publish_read();
            return Ok(None);
        }
        let read = self.read().load(Ordering::Relaxed);
        let slot = self.slot_ptr(read);
        let mut len = [0u8; 4];
        // SAFETY: the slot lies inside the block; the producer published it with a Release
        // store of `tail`, which the Acquire load in `unread` synchronises with, and will not
        // touch it again until `head` moves past it (`publish_read`).
        unsafe { std::ptr::copy_nonoverlapping(slot, len.as_mut_ptr(), 4) };
        let len = u32::from_le_bytes(len) as usize;
        if len > FRAME_MAX {
            return Err(malformed(format!(
                "frame length {len} in a slot of {FRAME_MAX}"
            )));
        }
        // SAFETY: as above; `4 + len <= SLOT_LEN` was just checked, and `into` holds `len`
        // bytes. The copy initialises the first `len` of them, which the slice then covers.
        let frame = unsafe {
            std::ptr::copy_nonoverlapping(slot.add(4), into.as_mut_ptr().cast::<u8>(), len);
            std::slice::from_raw_parts(into.as_ptr().cast::<u8>(), len)
        };
        let read = read.wrapping_add(1);
        self.read().store(read, Ordering::Relaxed);
        if read.wrapping_sub(self.head().load(Ordering::Relaxed)) >= GIVE_BACK {
            self.publish_read();
        }
        Ok(Some(frame))
    }

    /// Gives the slots this process has read back to the producer — moves `head` up to them —
    /// and wakes the producer if it waits for room. The store must reach the other core
    /// before the producer's flag can be read, which costs a fence: this is why it is not done
    /// at every frame.
    fn publish_read(&self) {
        let read = self.read().load(Ordering::Relaxed);
        if self.head().load(Ordering::Relaxed) == read {
            return;
        }
        // Release: the slots were copied out before the producer may write them again.
        self.head().store(read, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.producer_waiting().load(Ordering::SeqCst) != 0 {
            self.channel.ring(self.direction.producer());
        }
    }

    /// Waits, as the producer, until the ring has room or `also()` holds (`Ready`), `deadline`
    /// passes or `stop()` holds. Whoever changes what `also` looks at rings the producer's
    /// bell.
    pub(crate) fn wait_for_room(
        &self,
        deadline: Option<Instant>,
        stop: impl Fn() -> bool,
        also: impl Fn() -> bool,
    ) -> Wake {
        self.producer_waiting().store(1, Ordering::SeqCst);
        let wake = self.channel.wait(
            self.direction.producer(),
            deadline,
            || !self.is_full() || also(),
            stop,
        );
        self.producer_waiting().store(0, Ordering::SeqCst);
        wake
    }

    /// Waits, as the consumer, until the ring holds a frame, `deadline` passes or `stop()`
    /// holds.
    pub(crate) fn wait_for_frame(
        &self,
        deadline: Option<Instant>,
        stop: impl Fn() -> bool,
    ) -> Wake {
        self.publish_read();
        self.channel.wait(
            self.direction.consumer(),
            deadline,
            || !self.is_empty(),
            stop,
        )
    }
}

/// One release ring: loan ids on their way back to the owner of the blocks.
#[derive(Debug)]
pub(crate) struct ReleaseRing<'a> {
    channel: &'a Channel,
    index: usize,
}

impl ReleaseRing<'_> {
    fn base(&self) -> usize {
        RELEASE_RINGS + self.index * RELEASE_RING_LEN
    }
    fn head(&self) -> &AtomicU64 {
        self.channel.atomic_u64(self.base())
    }
    fn tail(&self) -> &AtomicU64 {
        self.channel.atomic_u64(self.base() + LINE)
    }
    fn entry(&self, position: u64) -> &AtomicU64 {
        let slot = (position % RELEASE_COUNT as u64) as usize;
        let slots = SLOTS + 2 * SLOT_COUNT * SLOT_LEN;
        self.channel
            .atomic_u64(slots + (self.index * RELEASE_COUNT + slot) * 8)
    }

    /// Appends a loan id; `false` when the ring is full. One producer at a time.
    pub(crate) fn push(&self, id: u64) -> bool {
        let tail = self.tail().load(Ordering::Relaxed);
        if tail.wrapping_sub(self.head().load(Ordering::Acquire)) >= RELEASE_COUNT as u64 {
            return false;
        }
        self.entry(tail).store(id, Ordering::Relaxed);
        self.tail().store(tail.wrapping_add(1), Ordering::Release);
        true
    }

    /// Whether the ring holds no id (a corrupt pair of positions reads as empty, as in `pop`).
    pub(crate) fn is_empty(&self) -> bool {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        head == tail || tail.wrapping_sub(head) > RELEASE_COUNT as u64
    }

    /// Whether the positions are impossible (more ids than the ring holds): the peer that
    /// produces into it broke it, and nothing more can come through.
    pub(crate) fn is_corrupt(&self) -> bool {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        tail.wrapping_sub(head) > RELEASE_COUNT as u64
    }

    /// Takes the next loan id, if any. One consumer at a time. A corrupt pair of positions
    /// reads as empty (and [`is_corrupt`](Self::is_corrupt) says so).
    pub(crate) fn pop(&self) -> Option<u64> {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        if head == tail || tail.wrapping_sub(head) > RELEASE_COUNT as u64 {
            return None;
        }
        let id = self.entry(head).load(Ordering::Relaxed);
        self.head().store(head.wrapping_add(1), Ordering::Release);
        Some(id)
    }
}

/// A pool for this crate's unit tests.
#[cfg(test)]
pub(crate) fn test_pool() -> shm_core::ShmPool {
    shm_core::ShmPool::new().unwrap()
}

#[cfg(test)]
mod tests {
    use super::test_pool as pool;
    use super::*;

    #[test]
    fn a_snapshot_of_the_control_area_reads_back_as_the_channel_state() {
        let pool = pool();
        let channel = Channel::create(pool.alloc_shared(channel_len()).unwrap(), 4321).unwrap();
        channel
            .frames(Direction::ToParent)
            .push(&[1, 2, 3])
            .unwrap();
        channel.frames(Direction::ToParent).push(&[4]).unwrap();
        assert!(channel.releases(Direction::ToWorker).push(9));
        let control = channel.block.snapshot(0..CONTROL_LEN).unwrap();
        let state = ChannelState::parse(&control).unwrap();
        assert_eq!(
            (
                state.version,
                state.slot_len,
                state.slots,
                state.releases,
                state.parent_pid
            ),
            (
                PROTOCOL_VERSION,
                SLOT_LEN as u32,
                SLOT_COUNT as u32,
                RELEASE_COUNT as u32,
                4321
            )
        );
        assert_eq!(state.frame_rings[1].occupied(), 2);
        assert_eq!(state.frame_rings[0].occupied(), 0);
        assert_eq!(state.release_rings[0].tail, 1);
        assert_eq!(ChannelState::parse(&control[..100]), None);
        assert_eq!(ChannelState::parse(&[0; CONTROL_LEN]), None);
    }

    #[test]
    fn frames_cross_the_ring_in_order_and_a_full_ring_says_so() {
        let pool = pool();
        let channel = Channel::create(pool.alloc_shared(channel_len()).unwrap(), 1).unwrap();
        let ring = channel.frames(Direction::ToWorker);
        for i in 0..SLOT_COUNT {
            assert!(ring.push(&[i as u8; 100]).unwrap());
        }
        assert!(!ring.push(&[0; 10]).unwrap(), "a full ring refuses");
        assert!(ring.is_full());
        for i in 0..SLOT_COUNT {
            assert_eq!(ring.pop().unwrap().unwrap(), vec![i as u8; 100]);
        }
        assert_eq!(ring.pop().unwrap(), None);
        assert!(matches!(
            ring.push(&vec![0; SLOT_LEN]),
            Err(TransportError::Malformed { .. })
        ));
    }

    #[test]
    fn release_rings_carry_ids_in_order_and_refuse_when_full() {
        let pool = pool();
        let channel = Channel::create(pool.alloc_shared(channel_len()).unwrap(), 1).unwrap();
        let ring = channel.releases(Direction::ToParent);
        for id in 0..RELEASE_COUNT as u64 {
            assert!(ring.push(id * 3));
        }
        assert!(!ring.push(1), "a full ring refuses");
        for id in 0..RELEASE_COUNT as u64 {
            assert_eq!(ring.pop(), Some(id * 3));
        }
        assert_eq!(ring.pop(), None);
        assert_eq!(channel.releases(Direction::ToWorker).pop(), None);
    }

    #[test]
    fn a_producer_waiting_for_room_is_woken_by_the_consumer() {
        let pool = pool();
        let channel = Channel::create(pool.alloc_shared(channel_len()).unwrap(), 1).unwrap();
        let ring = channel.frames(Direction::ToParent);
        while ring.push(&[7; 8]).unwrap() {}
        std::thread::scope(|scope| {
            let consumer = scope.spawn(|| {
                // Long enough for the producer to be asleep, past its spin.
                std::thread::sleep(Duration::from_millis(50));
                let ring = channel.frames(Direction::ToParent);
                let frame = ring.pop().unwrap();
                // A reader that goes on to wait gives the slot back first.
                let deadline = Instant::now() + Duration::from_secs(20);
                assert_eq!(ring.wait_for_frame(Some(deadline), || false), Wake::Ready);
                frame
            });
            let start = Instant::now();
            let deadline = start + Duration::from_secs(20);
            assert_eq!(
                ring.wait_for_room(Some(deadline), || false, || false),
                Wake::Ready
            );
            // A producer that was not woken finds the room only when its sleep ends, at the
            // deadline.
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the producer was not woken: it waited {:?}",
                start.elapsed()
            );
            assert!(consumer.join().unwrap().is_some());
        });
        assert!(ring.push(&[8; 8]).unwrap());
    }

    #[test]
    fn read_slots_go_back_when_the_reader_finds_the_ring_empty_waits_or_reads_half() {
        let pool = pool();
        let channel = Channel::create(pool.alloc_shared(channel_len()).unwrap(), 1).unwrap();
        let ring = channel.frames(Direction::ToWorker);
        let deadline = || Some(Instant::now() + Duration::from_secs(20));
        for _ in 0..3 {
            assert!(ring.push(&[1; 8]).unwrap());
        }
        // The reader sees what it has read; the producer, what was given back.
        assert!(ring.pop().unwrap().is_some());
        assert_eq!((ring.unread().unwrap(), ring.occupied().unwrap()), (2, 3));
        assert_eq!(ring.wait_for_frame(deadline(), || false), Wake::Ready);
        assert_eq!((ring.unread().unwrap(), ring.occupied().unwrap()), (2, 2));
        assert!(ring.pop().unwrap().is_some());
        assert!(ring.pop().unwrap().is_some());
        assert!(ring.is_empty());
        assert_eq!(ring.occupied().unwrap(), 2);
        assert_eq!(ring.pop().unwrap(), None);
        assert_eq!(ring.occupied().unwrap(), 0);

        // A full ring read without a pause gives back half of it as soon as half is read.
        while ring.push(&[2; 8]).unwrap() {}
        for read in 1..=GIVE_BACK {
            assert!(ring.pop().unwrap().is_some());
            let given_back = if read < GIVE_BACK { 0 } else { read };
            assert_eq!(ring.occupied().unwrap(), SLOT_COUNT as u64 - given_back);
        }
    }

    #[test]
    fn waits_end_at_their_deadline_and_when_told_to_stop() {
        let pool = pool();
        let channel = Channel::create(pool.alloc_shared(channel_len()).unwrap(), 1).unwrap();
        let ring = channel.frames(Direction::ToWorker);
        let deadline = Instant::now() + Duration::from_millis(20);
        assert_eq!(
            ring.wait_for_frame(Some(deadline), || false),
            Wake::TimedOut
        );
        assert!(Instant::now() >= deadline);
        assert_eq!(ring.wait_for_frame(None, || true), Wake::Stopped);
    }

    #[test]
    fn a_peer_attaching_checks_the_header() {
        let pool = pool();
        let channel = Channel::create(pool.alloc_shared(channel_len()).unwrap(), 42).unwrap();
        let reader = pool.attach_shared(&channel.to_ref()).unwrap();
        let opened = Channel::open(reader).unwrap();
        assert_eq!(opened.parent_pid(), 42);

        let garbage = pool.alloc_shared(channel_len()).unwrap();
        assert!(matches!(
            Channel::open(garbage),
            Err(TransportError::Malformed { .. })
        ));

        let newer = pool.alloc_shared(channel_len()).unwrap();
        // SAFETY: the block is fresh, 64-byte aligned, and used by nothing else.
        unsafe {
            newer.as_ptr().cast::<u64>().write(MAGIC.to_le());
            (newer.as_ptr().add(8).cast::<u32>()).write((PROTOCOL_VERSION + 1).to_le());
        }
        assert!(matches!(
            Channel::open(newer),
            Err(TransportError::ProtocolMismatch { theirs, .. }) if theirs == PROTOCOL_VERSION + 1
        ));

        let small = pool.alloc_shared(1000).unwrap();
        assert!(matches!(
            Channel::open(small),
            Err(TransportError::Malformed { .. })
        ));
    }

    #[test]
    fn corrupt_slots_and_positions_are_errors_not_crashes() {
        let pool = pool();
        let channel = Channel::create(pool.alloc_shared(channel_len()).unwrap(), 1).unwrap();
        let ring = channel.frames(Direction::ToParent);

        // A length word larger than the slot.
        assert!(ring.push(&[1, 2, 3]).unwrap());
        // SAFETY: the test owns the channel; the slot was published and is not being read.
        unsafe {
            let slot = ring.slot_ptr(0);
            std::ptr::copy_nonoverlapping(u32::MAX.to_le_bytes().as_ptr(), slot, 4);
        }
        assert!(matches!(ring.pop(), Err(TransportError::Malformed { .. })));

        // A tail that ran away from the head.
        ring.tail().store(
            ring.head().load(Ordering::Relaxed) + 1000,
            Ordering::Release,
        );
        assert!(matches!(ring.pop(), Err(TransportError::Malformed { .. })));

        // A producer that rewinds the consumer's `head` does not make it read a frame twice.
        let ring = channel.frames(Direction::ToWorker);
        assert!(ring.push(&[1]).unwrap());
        assert!(ring.push(&[2]).unwrap());
        assert_eq!(ring.pop().unwrap(), Some(vec![1]));
        assert_eq!(ring.pop().unwrap(), Some(vec![2]));
        assert_eq!(ring.pop().unwrap(), None);
        assert_eq!(ring.head().load(Ordering::Acquire), 2);
        assert!(ring.push(&[3]).unwrap());
        ring.head().store(0, Ordering::Release);
        assert_eq!(ring.pop().unwrap(), Some(vec![3]));
        assert_eq!(ring.pop().unwrap(), None);

        let releases = channel.releases(Direction::ToWorker);
        releases.tail().store(1 << 40, Ordering::Release);
        assert_eq!(
            releases.pop(),
            None,
            "a corrupt release ring reads as empty"
        );
    }
}
