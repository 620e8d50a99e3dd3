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

use crate::channel::{Channel, Direction, RELEASE_COUNT};
use crate::trust::Admission;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ids waiting for room in the release ring towards the peer past which the peer counts as one
/// that takes nothing back. A peer that serves drains the ring whenever it receives a frame, so
/// an honest one never lets more than the ring's length wait.
pub(crate) const MAX_WAITING_RETURNS: usize = 4 * RELEASE_COUNT;

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
/// Never blocks; ids that find the ring full wait here and go first next time — on the
/// parent's side up to [`MAX_WAITING_RETURNS`], past which the worker is one that takes nothing
/// back. A worker keeps every id for its parent, which it trusts to drain.
#[derive(Debug)]
pub(crate) struct Returner {
    channel: Arc<Channel>,
    ring: Direction,
    /// Ids not yet written; held while producing into the ring, which has a single producer.
    waiting: Mutex<Vec<u64>>,
    /// Whether `waiting` holds ids, so that a send need not take the lock to learn it does not.
    pending: AtomicBool,
    /// How many ids may wait before the peer counts as one that does not drain its ring.
    max_waiting: usize,
    /// Whether more than `max_waiting` ids waited at once: what the peer is owed is dropped
    /// rather than queued without end.
    overflowed: AtomicBool,
}

impl Returner {
    /// A returner writing into the release ring in direction `ring`, with at most
    /// `max_waiting` ids waiting for room.
    pub(crate) fn new(channel: Arc<Channel>, ring: Direction, max_waiting: usize) -> Arc<Self> {
        Arc::new(Returner {
            channel,
            ring,
            waiting: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            max_waiting,
            overflowed: AtomicBool::new(false),
        })
    }

    /// Returns loans to the peer.
    pub(crate) fn release(&self, ids: &[u64]) {
        let mut waiting = lock(&self.waiting);
        waiting.extend_from_slice(ids);
        let ring = self.channel.releases(self.ring);
        let written = waiting.iter().take_while(|&&id| ring.push(id)).count();
        waiting.drain(..written);
        if waiting.len() > self.max_waiting {
            self.overflowed.store(true, Ordering::Release);
            waiting.clear();
        }
        self.pending.store(!waiting.is_empty(), Ordering::Release);
    }

    /// Writes ids that found the ring full earlier.
    pub(crate) fn flush(&self) {
        if self.pending.load(Ordering::Acquire) {
            self.release(&[]);
        }
    }

    /// Whether the peer let more than the bound of returns wait.
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
    /// The payload's references with their loan ids; `None` once claimed by an attach.
    loans: Vec<(ShmRef, Option<u64>)>,
    /// Blocks attached so far, so that a reference named twice gives one block (held until
    /// decoding ends, so that a later attach of the same reference finds it).
    attached: Vec<(ShmRef, Arc<ShmBlock>)>,
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
                loans: refs
                    .iter()
                    .cloned()
                    .zip(loans.iter().copied().map(Some))
                    .collect(),
                attached: Vec::new(),
            }),
        })
    }

    /// Ends decoding: lets go of the attacher's own hold on the attached blocks, and returns
    /// the loans of every reference that decoding did not attach.
    pub(crate) fn release_unclaimed(&self) {
        let (unclaimed, attached): (Vec<u64>, Vec<_>) = {
            let mut state = lock(&self.state);
            let unclaimed = state
                .loans
                .iter_mut()
                .filter_map(|(_, id)| id.take())
                .collect();
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
        if let Some((_, block)) = state.attached.iter().find(|(seen, _)| seen == r) {
            return Ok(Arc::clone(block));
        }
        let mut block = self.admission.attach(pool, &self.link, r)?;
        let ids: Vec<u64> = state
            .loans
            .iter_mut()
            .filter(|(named, _)| named == r)
            .filter_map(|(_, id)| id.take())
            .collect();
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
        state.attached.push((r.clone(), Arc::clone(&block)));
        Ok(block)
    }
}

impl Drop for LoanAttacher {
    fn drop(&mut self) {
        self.release_unclaimed();
    }
}
