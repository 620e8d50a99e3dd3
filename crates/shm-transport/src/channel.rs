//! The control channel: two single-producer, single-consumer rings of fixed slots in one
//! shared-memory block, with a futex doorbell each.
//!
//! Layout (every field on its own 64-byte line, offsets from the block start):
//!
//! ```text
//!   0  header: magic u64, version u32, slot_len u32, slots u32, parent_pid u32
//!  64  ring 0 (parent -> worker): head u64 | 128 tail u64 | 192 sleeping u32, bell u32
//! 256  ring 1 (worker -> parent): head u64 | 320 tail u64 | 384 sleeping u32, bell u32
//! 448  ring 0 slots, then ring 1 slots; a slot is a u32 length and the frame's bytes
//! ```
//!
//! A consumer that finds its ring empty spins for a short while (a reply usually comes within
//! microseconds), then announces that it sleeps and waits on the futex word `bell`; a producer
//! rings the bell only when the consumer sleeps, so a busy channel makes no system calls.
//!
//! Why a futex and not `raw_sync::Event`: the event guards its state with a process-shared
//! mutex that is not robust, so a peer killed while holding it leaves the survivor blocked
//! forever in `set()`, with no timeout; and its timed waits fail with EINVAL for some
//! deadlines (upstream issue 39). A futex word holds no lock — a dead peer cannot block us — and
//! `FUTEX_WAIT` takes a relative timeout that the kernel handles.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use shm_core::ShmBlock;

use crate::error::{Result, TransportError, malformed};

/// Identifies a channel block.
const MAGIC: u64 = 0x7368_6d2d_6368_616e; // "shm-chan"
/// The version of the channel layout and of the frames.
pub const PROTOCOL_VERSION: u32 = 1;

const LINE: usize = 64;
const HEADER: usize = 0;
const RINGS: usize = LINE;
const RING_CONTROL: usize = 3 * LINE;
const SLOTS: usize = RINGS + 2 * RING_CONTROL;
/// Bytes of one slot, its length word included.
pub(crate) const SLOT_LEN: usize = 4096;
/// Slots per ring.
pub(crate) const SLOT_COUNT: usize = 64;

/// How long a waiter spins before it sleeps: longer than a small call's round trip, short
/// enough that an idle side uses no CPU to speak of.
const SPIN: Duration = Duration::from_micros(50);

/// Bytes of a channel block.
pub(crate) fn channel_len() -> usize {
    SLOTS + 2 * SLOT_COUNT * SLOT_LEN
}

/// One direction of the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    ToWorker = 0,
    ToParent = 1,
}

/// A view of a channel block. The block is kept alive by the owner of this value.
#[derive(Debug)]
pub(crate) struct Channel {
    block: std::sync::Arc<ShmBlock>,
}

impl Channel {
    /// Lays out a fresh channel in `block` (allocated by the parent, at least
    /// [`channel_len`] bytes, not yet shared).
    pub(crate) fn create(mut block: ShmBlock, parent_pid: u32) -> Result<Self> {
        let bytes = block.as_mut_slice()?;
        bytes[..SLOTS].fill(0);
        bytes[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[8..12].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes[12..16].copy_from_slice(&(SLOT_LEN as u32).to_le_bytes());
        bytes[16..20].copy_from_slice(&(SLOT_COUNT as u32).to_le_bytes());
        bytes[20..24].copy_from_slice(&parent_pid.to_le_bytes());
        Ok(Channel {
            block: std::sync::Arc::new(block),
        })
    }

    /// A channel the parent laid out, as the worker attached it; checks the header.
    pub(crate) fn open(block: ShmBlock) -> Result<Self> {
        if block.len() < channel_len() {
            return Err(malformed(format!(
                "channel block of {} bytes, at least {} expected",
                block.len(),
                channel_len()
            )));
        }
        let header = &block.as_slice()[HEADER..HEADER + 24];
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let magic = u64::from_le_bytes(header[0..8].try_into().unwrap_or_default());
        if magic != MAGIC {
            return Err(malformed(format!("channel magic {magic:#x}")));
        }
        if word(8) != PROTOCOL_VERSION {
            return Err(TransportError::ProtocolMismatch {
                ours: PROTOCOL_VERSION,
                theirs: word(8),
            });
        }
        if (word(12), word(16)) != (SLOT_LEN as u32, SLOT_COUNT as u32) {
            return Err(malformed(format!(
                "channel of {} slots of {} bytes, this build uses {SLOT_COUNT} of {SLOT_LEN}",
                word(16),
                word(12)
            )));
        }
        Ok(Channel {
            block: std::sync::Arc::new(block),
        })
    }

    /// The parent's pid, as the parent wrote it.
    pub(crate) fn parent_pid(&self) -> u32 {
        let header = &self.block.as_slice()[20..24];
        u32::from_le_bytes([header[0], header[1], header[2], header[3]])
    }

    /// The reference the worker attaches the channel by.
    pub(crate) fn to_ref(&self) -> shm_core::ShmRef {
        self.block.to_ref()
    }

    pub(crate) fn ring(&self, direction: Direction) -> Ring<'_> {
        Ring {
            channel: self,
            index: direction as usize,
        }
    }

    fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= SLOTS);
        // SAFETY: `offset` lies in the control area of the block, which the channel keeps
        // mapped for `&self`'s lifetime; the block starts 64-byte aligned, so the address is
        // aligned for u64. Both processes touch these words only through atomics.
        unsafe { &*self.block.as_shared_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset.is_multiple_of(4) && offset + 4 <= SLOTS);
        // SAFETY: as in `atomic_u64`, for a 4-byte aligned word of the control area.
        unsafe { &*self.block.as_shared_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn slot_ptr(&self, ring: usize, slot: usize) -> *mut u8 {
        let offset = SLOTS + (ring * SLOT_COUNT + slot % SLOT_COUNT) * SLOT_LEN;
        // In bounds: `ring < 2` and `slot % SLOT_COUNT < SLOT_COUNT`.
        self.block.as_shared_ptr().wrapping_add(offset)
    }
}

/// One ring of a channel: the producer pushes frames, the consumer pops them.
#[derive(Debug)]
pub(crate) struct Ring<'a> {
    channel: &'a Channel,
    index: usize,
}

/// What a wait for a frame ended with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The ring holds a frame.
    Ready,
    /// The deadline passed.
    TimedOut,
    /// `stop()` said to give up.
    Stopped,
}

impl Ring<'_> {
    fn base(&self) -> usize {
        RINGS + self.index * RING_CONTROL
    }
    fn head(&self) -> &AtomicU64 {
        self.channel.atomic_u64(self.base())
    }
    fn tail(&self) -> &AtomicU64 {
        self.channel.atomic_u64(self.base() + LINE)
    }
    fn sleeping(&self) -> &AtomicU32 {
        self.channel.atomic_u32(self.base() + 2 * LINE)
    }
    fn bell(&self) -> &AtomicU32 {
        self.channel.atomic_u32(self.base() + 2 * LINE + 4)
    }

    /// Appends a frame; `Ok(false)` when the ring is full. Only one thread of one process
    /// produces into a ring at a time (the caller holds the producer lock).
    pub(crate) fn push(&self, frame: &[u8]) -> Result<bool> {
        if frame.len() > SLOT_LEN - 4 {
            return Err(malformed(format!(
                "frame of {} bytes in a slot of {}",
                frame.len(),
                SLOT_LEN - 4
            )));
        }
        let tail = self.tail().load(Ordering::Relaxed);
        let head = self.head().load(Ordering::Acquire);
        if tail.wrapping_sub(head) >= SLOT_COUNT as u64 {
            return Ok(false);
        }
        let slot = self.channel.slot_ptr(self.index, tail as usize);
        // SAFETY: the slot lies inside the block (see `slot_ptr`) and belongs to the producer:
        // the consumer reads it only after `tail` is published below, and has released it
        // (`head` passed it, loaded with Acquire above). Only this thread produces.
        unsafe {
            std::ptr::copy_nonoverlapping((frame.len() as u32).to_le_bytes().as_ptr(), slot, 4);
            std::ptr::copy_nonoverlapping(frame.as_ptr(), slot.add(4), frame.len());
        }
        self.tail().store(tail.wrapping_add(1), Ordering::Release);
        // Pairs with the consumer's fence in `wait`: either it sees the new tail, or we see
        // that it sleeps and wake it.
        fence(Ordering::SeqCst);
        if self.sleeping().load(Ordering::SeqCst) != 0 {
            self.bell().fetch_add(1, Ordering::SeqCst);
            futex_wake(self.bell());
        }
        Ok(true)
    }

    /// Wakes a consumer sleeping on this ring without producing anything (used when the peer
    /// died, so that waiters look at the news).
    pub(crate) fn ring_bell(&self) {
        self.bell().fetch_add(1, Ordering::SeqCst);
        futex_wake(self.bell());
    }

    /// Takes the next frame, if any. Only one thread of one process consumes a ring at a time.
    pub(crate) fn pop(&self) -> Result<Option<Vec<u8>>> {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        if head == tail {
            return Ok(None);
        }
        if tail.wrapping_sub(head) > SLOT_COUNT as u64 {
            return Err(malformed(format!(
                "ring positions head {head} and tail {tail} are more than {SLOT_COUNT} apart"
            )));
        }
        let slot = self.channel.slot_ptr(self.index, head as usize);
        let mut len = [0u8; 4];
        // SAFETY: the slot lies inside the block; the producer published it with a Release
        // store of `tail`, which the Acquire load above synchronises with, and will not touch
        // it again until `head` moves past it below.
        unsafe { std::ptr::copy_nonoverlapping(slot, len.as_mut_ptr(), 4) };
        let len = u32::from_le_bytes(len) as usize;
        if len > SLOT_LEN - 4 {
            return Err(malformed(format!(
                "frame length {len} in a slot of {}",
                SLOT_LEN - 4
            )));
        }
        let mut frame = vec![0u8; len];
        // SAFETY: as above; `4 + len <= SLOT_LEN` was just checked.
        unsafe { std::ptr::copy_nonoverlapping(slot.add(4), frame.as_mut_ptr(), len) };
        self.head().store(head.wrapping_add(1), Ordering::Release);
        Ok(Some(frame))
    }

    fn is_empty(&self) -> bool {
        self.head().load(Ordering::Relaxed) == self.tail().load(Ordering::Acquire)
    }

    /// Waits until the ring holds a frame, `deadline` passes, or `stop()` returns true (checked
    /// at least every `check_every`). Spins first, then sleeps on the bell.
    pub(crate) fn wait(
        &self,
        deadline: Option<Instant>,
        check_every: Duration,
        stop: impl Fn() -> bool,
    ) -> Wake {
        let spin_until = Instant::now() + SPIN;
        let mut spins = 0u32;
        loop {
            if !self.is_empty() {
                return Wake::Ready;
            }
            if Instant::now() >= spin_until {
                break;
            }
            // After a few hundred nanoseconds, give the core away between looks: on a small
            // machine the peer we wait for may be queued behind us on this very core.
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
            spins += 1;
        }
        loop {
            if stop() {
                return Wake::Stopped;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Wake::TimedOut;
            }
            let slice = deadline.map_or(check_every, |d| (d - now).min(check_every));
            self.sleeping().store(1, Ordering::SeqCst);
            let bell = self.bell().load(Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.is_empty() {
                self.sleeping().store(0, Ordering::SeqCst);
                return Wake::Ready;
            }
            futex_wait(self.bell(), bell, slice);
            self.sleeping().store(0, Ordering::SeqCst);
            if !self.is_empty() {
                return Wake::Ready;
            }
        }
    }
}

/// Sleeps while `word` holds `expected`, for at most `timeout`. Returns early on a wake, a
/// change of the word, a signal, or the timeout: the caller always re-checks its condition.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: FUTEX_WAIT reads the aligned u32 at `word`, which lives as long as the borrow,
    // and the timespec on our stack; it writes nothing. Not FUTEX_PRIVATE: the word is in
    // memory shared with another process.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &timeout as *const libc::timespec,
        );
    }
}

/// Wakes every thread, in any process, sleeping on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address of `word` as a key; it reads and writes no memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use shm_core::{PoolConfig, ShmPool};

    use super::*;
    use crate::frame::Frame;

    fn pool() -> ShmPool {
        ShmPool::with_config(PoolConfig {
            sweep_orphans: false,
            ..PoolConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn frames_cross_the_ring_in_order_and_a_full_ring_says_so() {
        let pool = pool();
        let channel = Channel::create(pool.alloc(channel_len(), false).unwrap(), 1).unwrap();
        let ring = channel.ring(Direction::ToWorker);
        for i in 0..SLOT_COUNT {
            assert!(ring.push(&[i as u8; 100]).unwrap());
        }
        assert!(!ring.push(&[0; 10]).unwrap(), "a full ring refuses");
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
    fn a_peer_attaching_checks_the_header() {
        let pool = pool();
        let channel = Channel::create(pool.alloc(channel_len(), false).unwrap(), 42).unwrap();
        let reader = pool.attach(&channel.to_ref()).unwrap();
        let opened = Channel::open(reader).unwrap();
        assert_eq!(opened.parent_pid(), 42);

        let mut block = pool.alloc(channel_len(), false).unwrap();
        block.as_mut_slice().unwrap()[..64].fill(0);
        let garbage = pool.attach(&block.to_ref()).unwrap();
        assert!(matches!(
            Channel::open(garbage),
            Err(TransportError::Malformed { .. })
        ));

        let mut newer = pool.alloc(channel_len(), false).unwrap();
        let bytes = newer.as_mut_slice().unwrap();
        bytes[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[8..12].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let newer = pool.attach(&newer.to_ref()).unwrap();
        assert!(matches!(
            Channel::open(newer),
            Err(TransportError::ProtocolMismatch { theirs, .. }) if theirs == PROTOCOL_VERSION + 1
        ));

        let small = pool.alloc(1000, false).unwrap();
        let small = pool.attach(&small.to_ref()).unwrap();
        assert!(matches!(
            Channel::open(small),
            Err(TransportError::Malformed { .. })
        ));
    }

    #[test]
    fn corrupt_slots_and_positions_are_errors_not_crashes() {
        let pool = pool();
        let channel = Channel::create(pool.alloc(channel_len(), false).unwrap(), 1).unwrap();
        let ring = channel.ring(Direction::ToParent);

        // Garbage that is not a frame.
        assert!(ring.push(&[0xff; 37]).unwrap());
        let bytes = ring.pop().unwrap().unwrap();
        assert!(matches!(
            Frame::read(&bytes, &pool),
            Err(TransportError::Malformed { .. })
        ));

        // A length word larger than the slot.
        assert!(ring.push(&[1, 2, 3]).unwrap());
        // SAFETY: the test owns the channel; the slot was published and is not being read.
        unsafe {
            let slot = channel.slot_ptr(1, 1);
            std::ptr::copy_nonoverlapping(u32::MAX.to_le_bytes().as_ptr(), slot, 4);
        }
        assert!(matches!(ring.pop(), Err(TransportError::Malformed { .. })));

        // A tail that ran away from the head.
        ring.tail().store(
            ring.head().load(Ordering::Relaxed) + 1000,
            Ordering::Release,
        );
        assert!(matches!(ring.pop(), Err(TransportError::Malformed { .. })));

        // A spill that points at a segment that does not exist.
        let spill = Frame::Spilled(shm_core::ShmRef {
            name: "/shm-00000000-0000000000000000".into(),
            size: 10,
            offset: 0,
            content_size: 10,
            temporary: true,
        });
        let bytes = postcard::to_stdvec(&spill).unwrap();
        assert!(matches!(
            Frame::read(&bytes, &pool),
            Err(TransportError::Shm(
                shm_core::ShmError::SegmentNotFound { .. }
            ))
        ));
    }

    #[test]
    fn a_frame_too_large_for_a_slot_travels_in_a_block() {
        let pool = pool();
        let channel = Channel::create(pool.alloc(channel_len(), false).unwrap(), 1).unwrap();
        let ring = channel.ring(Direction::ToWorker);
        let method = "m".repeat(3 * SLOT_LEN);
        let frame = Frame::Call {
            id: 9,
            method: method.clone(),
            args: shm_codec::Payload::new("serde", Vec::new(), Vec::new(), vec![1, 2, 3]),
        };
        let spill = frame.send(&ring, &pool, || true).unwrap();
        assert!(spill.is_some(), "the sender keeps the spill block");
        let bytes = ring.pop().unwrap().unwrap();
        match Frame::read(&bytes, &pool).unwrap() {
            Frame::Call {
                id,
                method: m,
                args,
            } => {
                assert_eq!((id, m.len(), args.inline), (9, method.len(), vec![1, 2, 3]));
            }
            other => panic!("expected the call back, got {other:?}"),
        }
    }
}
