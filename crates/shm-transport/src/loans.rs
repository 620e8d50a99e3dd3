//! Who keeps a block alive across processes: loans, and their return through release rings.
//!
//! The rule this module keeps — a block is recycled only when the last `Arc` of it is dropped
//! in the process that allocated it, however many processes and hops it went through — and
//! the invariants that follow are written once, in docs/architecture.md, "Block lifetimes
//! across processes". The pieces: the [`Lender`] keeps an `Arc` of every block a frame lends,
//! under its loan id, and is its pool's [`Reclaim`]er; a [`LoanAttacher`] puts a drop hook on
//! each block it attaches for a decoder, which hands the loan id to a [`Returner`]; the
//! returner writes it into the release ring towards the owner (no system call, never
//! blocking), or keeps it, up to a bound, while the ring is full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use shm_codec::Attacher;
use shm_core::{Reclaim, SegmentLink, ShmBlock, ShmPool, ShmRef};

use crate::channel::{Channel, Direction, RELEASE_COUNT, SLOT_COUNT};
use crate::trust::Admission;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ids waiting for room in the release ring towards the peer past which the peer counts as one
/// that takes nothing back, whatever it does: room for the blocks of two payloads of the most
/// blocks one may name, dropped at once before the peer had a chance to drain, beyond four
/// rings' worth (about 17 MB of ids at most).
pub(crate) const MAX_WAITING_RETURNS: usize = 4 * RELEASE_COUNT + 2 * shm_codec::MAX_BLOCKS;

/// Why the peer may not be lent anything more.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// It holds this many bytes on loan; `requested` more would pass `limit`.
    OverLimit {
        on_loan: u64,
        requested: u64,
        limit: u64,
    },
    /// It wrote impossible positions into the ring it returns loans through.
    CorruptReturns,
}

/// The blocks one side has lent to its peer, by loan id, and the ring through which the peer
/// gives them back.
#[derive(Debug)]
pub(crate) struct Lender {
    channel: Arc<Channel>,
    /// The ring the peer returns our loans through (this side is its consumer).
    returns: Direction,
    next: AtomicU64,
    /// Bytes the peer may hold on loan at once.
    limit: u64,
    /// Held while draining `returns`, which has a single consumer.
    lent: Mutex<Lent>,
    /// Whether the peer broke the ring it returns loans through: nothing it holds can come
    /// back, so it is lent nothing more.
    corrupt: AtomicBool,
}

#[derive(Debug, Default)]
struct Lent {
    blocks: HashMap<u64, Arc<ShmBlock>>,
    /// Capacity of `blocks`, in bytes.
    bytes: u64,
}

impl Lent {
    fn remove(&mut self, id: u64) -> Option<Arc<ShmBlock>> {
        let block = self.blocks.remove(&id)?;
        self.bytes -= block.capacity() as u64;
        Some(block)
    }
}

impl Lender {
    /// A lender whose loans come back through the release ring in direction `returns`, and
    /// whose peer may hold at most `limit` bytes of them at once.
    pub(crate) fn new(channel: Arc<Channel>, returns: Direction, limit: u64) -> Self {
        Lender {
            channel,
            returns,
            next: AtomicU64::new(1),
            limit,
            lent: Mutex::new(Lent::default()),
            corrupt: AtomicBool::new(false),
        }
    }

    /// Lends `blocks` to the peer; the ids go into the frame, one per block, in order. Lends
    /// nothing when the peer would hold more than its limit, or broke its ring of returns.
    pub(crate) fn lend(&self, blocks: Vec<Arc<ShmBlock>>) -> Result<Vec<u64>, Refusal> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        if self.corrupt.load(Ordering::Acquire) {
            return Err(Refusal::CorruptReturns);
        }
        let requested: u64 = blocks.iter().map(|b| b.capacity() as u64).sum();
        let mut lent = lock(&self.lent);
        if lent.bytes.saturating_add(requested) > self.limit {
            return Err(Refusal::OverLimit {
                on_loan: lent.bytes,
                requested,
                limit: self.limit,
            });
        }
        let first = self.next.fetch_add(blocks.len() as u64, Ordering::Relaxed);
        let ids: Vec<u64> = (first..first + blocks.len() as u64).collect();
        lent.bytes += requested;
        lent.blocks.extend(ids.iter().copied().zip(blocks));
        Ok(ids)
    }

    /// Takes back loans the peer never saw (the frame that carried them was not sent).
    pub(crate) fn cancel(&self, ids: &[u64]) {
        let dropped: Vec<Arc<ShmBlock>> = {
            let mut lent = lock(&self.lent);
            ids.iter().filter_map(|&id| lent.remove(id)).collect()
        };
        drop(dropped);
    }

    /// Forgets every loan: the peer is dead, and nothing of ours is in use there any more.
    pub(crate) fn forget_all(&self) {
        let dropped = std::mem::take(&mut *lock(&self.lent));
        drop(dropped);
    }

    /// Blocks currently lent.
    #[cfg(test)]
    pub(crate) fn outstanding(&self) -> usize {
        lock(&self.lent).blocks.len()
    }
}

impl Reclaim for Lender {
    fn reclaim(&self) {
        // Most calls find nothing returned: look before taking the lock. (Impossible positions
        // read as empty too, and are looked at under the lock.)
        let ring = self.channel.releases(self.returns);
        if ring.is_empty() && !ring.is_corrupt() {
            return;
        }
        let returned: Vec<Arc<ShmBlock>> = {
            let mut lent = lock(&self.lent);
            // Under the lock the head cannot move — this side is the ring's only consumer, and
            // consumes only here — so impossible positions are the peer's doing, not a look
            // taken while another thread of ours was consuming.
            if ring.is_corrupt() {
                self.corrupt.store(true, Ordering::Release);
                return;
            }
            std::iter::from_fn(|| ring.pop())
                .filter_map(|id| lent.remove(id))
                .collect()
        };
        // Dropped outside the lock: returning a block to the pool takes the pool's lock.
        drop(returned);
    }
}

/// Gives the peer's blocks back: writes loan ids into the release ring towards the peer.
/// Never blocks; ids that find the ring full wait here and go first next time. On the parent's
/// side, the worker counts as one that takes nothing back — and its calls fail — when the ring
/// stays full although the worker has read or sent frames since it filled (a serving side
/// drains the ring whenever it does either), or when more than [`MAX_WAITING_RETURNS`] ids
/// wait. A worker keeps every id for its parent, which it trusts to drain.
#[derive(Debug)]
pub(crate) struct Returner {
    channel: Arc<Channel>,
    ring: Direction,
    /// Ids not yet written, and since when the ring has had no room; held while producing
    /// into the ring, which has a single producer.
    waiting: Mutex<Waiting>,
    /// Whether `waiting` holds ids, so that a send need not take the lock to learn it does not.
    pending: AtomicBool,
    /// Whether the peer is judged (the parent judges its worker).
    judged: bool,
    /// Frames received from the peer so far.
    received: AtomicU64,
    /// Whether the peer was found not to drain its ring: what it is owed is dropped rather
    /// than queued without end.
    overflowed: AtomicBool,
}

#[derive(Debug, Default)]
struct Waiting {
    ids: Vec<u64>,
    /// How many frames the peer had sent when the ring was first found with no room for a
    /// waiting id; cleared whenever an id is written.
    full_since: Option<u64>,
}

impl Returner {
    /// A returner writing into the release ring in direction `ring`; `judged` says whether a
    /// peer that does not drain it is failed.
    pub(crate) fn new(channel: Arc<Channel>, ring: Direction, judged: bool) -> Arc<Self> {
        Arc::new(Returner {
            channel,
            ring,
            waiting: Mutex::new(Waiting::default()),
            pending: AtomicBool::new(false),
            judged,
            received: AtomicU64::new(0),
            overflowed: AtomicBool::new(false),
        })
    }

    /// Counts a frame received from the peer.
    pub(crate) fn peer_sent_a_frame(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns loans to the peer.
    pub(crate) fn release(&self, ids: &[u64]) {
        let mut waiting = lock(&self.waiting);
        waiting.ids.extend_from_slice(ids);
        let ring = self.channel.releases(self.ring);
        let written = waiting.ids.iter().take_while(|&&id| ring.push(id)).count();
        waiting.ids.drain(..written);
        let received = self.received.load(Ordering::Relaxed);
        if written > 0 || waiting.ids.is_empty() {
            waiting.full_since = None;
        } else if waiting.full_since.is_none() {
            waiting.full_since = Some(received);
        }
        // The peer drains the ring whenever it reads or sends a frame. Of the frames received
        // since the ring filled, the first `SLOT_COUNT` may have been sent before (the ring of
        // frames holds that many), and as many more by senders that had drained and then
        // waited for room; a peer that sent more drained after the ring filled.
        let not_draining = waiting
            .full_since
            .is_some_and(|since| received > since + 2 * SLOT_COUNT as u64);
        if self.judged && (not_draining || waiting.ids.len() > MAX_WAITING_RETURNS) {
            self.overflowed.store(true, Ordering::Release);
            waiting.ids.clear();
            waiting.full_since = None;
        }
        self.pending
            .store(!waiting.ids.is_empty(), Ordering::Release);
    }

    /// Writes ids that found the ring full earlier.
    pub(crate) fn flush(&self) {
        if self.pending.load(Ordering::Acquire) {
            self.release(&[]);
        }
    }

    /// Whether the peer was found not to take back what it is returned.
    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }
}

/// Attaches the blocks of one received payload, marking each so that its loan goes back to
/// the peer when the last value built on it is dropped.
pub(crate) struct LoanAttacher {
    returner: Arc<Returner>,
    /// Which references may be attached, and whether to copy them.
    admission: Arc<Admission>,
    /// Where the peer's segments come from.
    link: Arc<SegmentLink>,
    state: Mutex<AttachState>,
}

struct AttachState {
    /// The loan ids of the payload's references not yet claimed by an attach (a reference
    /// named twice is lent twice).
    loans: HashMap<ShmRef, Vec<u64>>,
    /// Blocks attached so far, so that a reference named twice gives one block (held until
    /// decoding ends, so that a later attach of the same reference finds it).
    attached: HashMap<ShmRef, Arc<ShmBlock>>,
}

impl std::fmt::Debug for LoanAttacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoanAttacher").finish_non_exhaustive()
    }
}

impl LoanAttacher {
    /// An attacher for a payload whose references are `refs`, lent under `loans` (one each).
    pub(crate) fn new(
        returner: Arc<Returner>,
        admission: Arc<Admission>,
        link: Arc<SegmentLink>,
        refs: &[ShmRef],
        loans: &[u64],
    ) -> Arc<Self> {
        Arc::new(LoanAttacher {
            returner,
            admission,
            link,
            state: Mutex::new(AttachState {
                loans: refs.iter().cloned().zip(loans.iter().copied()).fold(
                    HashMap::with_capacity(refs.len()),
                    |mut loans: HashMap<ShmRef, Vec<u64>>, (r, id)| {
                        loans.entry(r).or_default().push(id);
                        loans
                    },
                ),
                attached: HashMap::new(),
            }),
        })
    }

    /// Ends decoding: lets go of the attacher's own hold on the attached blocks, and returns
    /// the loans of every reference that decoding did not attach.
    pub(crate) fn release_unclaimed(&self) {
        let (unclaimed, attached): (Vec<u64>, HashMap<_, _>) = {
            let mut state = lock(&self.state);
            let unclaimed = state.loans.drain().flat_map(|(_, ids)| ids).collect();
            (unclaimed, std::mem::take(&mut state.attached))
        };
        drop(attached);
        if !unclaimed.is_empty() {
            self.returner.release(&unclaimed);
        }
    }
}

impl Attacher for LoanAttacher {
    fn attach(&self, pool: &ShmPool, r: &ShmRef) -> shm_core::Result<Arc<ShmBlock>> {
        let mut state = lock(&self.state);
        if let Some(block) = state.attached.get(r) {
            return Ok(Arc::clone(block));
        }
        let mut block = self.admission.attach(pool, &self.link, r)?;
        let ids = state.loans.remove(r).unwrap_or_default();
        if !ids.is_empty() {
            let returner = Arc::clone(&self.returner);
            block.on_drop(Box::new(move || returner.release(&ids)));
        }
        // For an untrusted peer, what is validated and read is a private copy; the peer's
        // block goes back (its hooks run) as soon as it is copied.
        let block = Arc::new(if self.admission.private_copies() {
            pool.private_copy(&block)?
        } else {
            block
        });
        state.attached.insert(r.clone(), Arc::clone(&block));
        Ok(block)
    }
}

impl Drop for LoanAttacher {
    fn drop(&mut self) {
        self.release_unclaimed();
    }
}
