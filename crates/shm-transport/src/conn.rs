//! The parent's half of a channel: calls from any number of threads, each matched to its
//! reply, each bounded by its deadline.
//!
//! # Locks, and why no interleaving can deadlock
//!
//! - `sending` (a lock with a deadline) serialises the producers of the parent → worker ring.
//!   Its holder may wait for room in the ring, but only until the call's deadline or the
//!   worker's death, and while it waits it reads replies whenever no other thread does.
//! - `reading` serialises the consumer of the worker → parent ring. It is only ever taken
//!   with `try_lock`: nobody blocks on it. Its holder (the *leader*) reads replies for every
//!   caller and never waits to send anything — blocks go back to the worker through the
//!   release ring, which never blocks — so the reader of the reply ring cannot be held up by
//!   a full request ring. The one frame a leader sends is its own small call, when it found
//!   the channel idle (`call_alone`): only if `sending` is free at once (`try_lock`), the
//!   ring has room, and the frame names no block and fits a slot, so that sending it cannot
//!   wait.
//! - `calls`, then a call's `outcome`: the order in which the leader delivers a reply and in
//!   which a leaving leader wakes the others. A waiting caller holds only its own `outcome`
//!   (and may `try_lock` `reading` under it).
//! - The lender's table and the returner's queue are leaves: nothing is taken under them but
//!   the pool's lock, which is itself a leaf.
//!
//! The worker serves one frame at a time and waits only for room in the reply ring, which the
//! leader — or any caller waiting to send — drains. So every wait on either side ends when
//! the other side makes progress, at the waiter's deadline, or at the peer's death.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shm_codec::{Encode, Encoder, Payload};
use shm_core::{SessionId, ShmPool};

use crate::channel::{Direction, PROTOCOL_VERSION, Side, Wake};
use crate::error::{RemoteError, Result, TransportError, malformed};
use crate::frame::{Endpoint, Frame, Stall};

/// How long a caller that does not read the reply ring sleeps before it looks around again;
/// a safety net only, since the reader wakes it.
const FOLLOWER_CHECK: Duration = Duration::from_secs(1);

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The outcome of one call, filled in by whoever reads its reply.
#[derive(Default)]
struct CallSlot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

#[derive(Default)]
struct SlotState {
    outcome: Option<Delivered>,
    /// Whether the caller sleeps on `ready`: only then is it worth a system call to wake it.
    sleeping: bool,
}

impl CallSlot {
    /// Wakes the caller if it sleeps; `state` is this slot's, locked.
    fn wake(&self, state: &SlotState) {
        if state.sleeping {
            self.ready.notify_all();
        }
    }
}

/// A reply as delivered to its caller: the outcome and the loans of its blocks.
struct Delivered {
    outcome: std::result::Result<Payload, RemoteError>,
    loans: Vec<u64>,
}

/// A lock whose acquisition gives up at a deadline. Free, it is taken and given back with
/// one atomic operation each; the mutex and condition variable are for threads that wait.
#[derive(Default)]
struct TimedLock {
    busy: AtomicBool,
    /// Threads waiting for the lock, changed only under `state`: releasing it takes `state`
    /// and makes a system call only when there are.
    waiting: AtomicUsize,
    state: Mutex<()>,
    freed: Condvar,
}

struct TimedGuard<'a>(&'a TimedLock);

impl TimedLock {
    /// The lock if it is free, at once.
    fn try_lock(&self) -> Option<TimedGuard<'_>> {
        // A guard is made only once the lock is ours: dropping one frees the lock.
        match self
            .busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed)
        {
            Ok(_) => Some(TimedGuard(self)),
            Err(_) => None,
        }
    }

    fn lock(&self, deadline: Option<Instant>) -> Option<TimedGuard<'_>> {
        if let Some(guard) = self.try_lock() {
            return Some(guard);
        }
        let mut state = lock(&self.state);
        // Counted before the last look: a holder that frees the lock after that look sees
        // the count (both SeqCst) and wakes us under `state`, which we hold until we sleep.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let taken = loop {
            if let Some(guard) = self.try_lock() {
                break Some(guard);
            }
            let left = match deadline {
                None => None,
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) => Some(left),
                    None => break None,
                },
            };
            state = match left {
                None => self
                    .freed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(left) => {
                    self.freed
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        taken
    }
}

impl Drop for TimedGuard<'_> {
    fn drop(&mut self) {
        let timed = self.0;
        timed.busy.store(false, Ordering::SeqCst);
        if timed.waiting.load(Ordering::SeqCst) > 0 {
            let _state = lock(&timed.state);
            timed.freed.notify_one();
        }
    }
}

/// Why the worker is gone.
#[derive(Debug, Default)]
pub(crate) struct Life {
    pub(crate) ended: Option<String>,
}

/// Counts a call as under way (in [`Conn::under_way`]) for as long as it lives.
struct InFlight<'a>(&'a Conn);

impl<'a> InFlight<'a> {
    fn start(conn: &'a Conn) -> Self {
        conn.under_way.fetch_add(1, Ordering::SeqCst);
        InFlight(conn)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Pairs with `ended`, which marks the worker dead, then reads the count (all SeqCst):
        // of the last call and the reaper, at least one sees the other, and forgets the loans.
        // Both may: forgetting twice forgets nothing more.
        let left = self.0.under_way.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 && self.0.dead.load(Ordering::SeqCst) {
            self.0.endpoint.forget_loans();
        }
    }
}

/// Hashes the ids of calls under way, which this side hands out in sequence: one
/// multiplication spreads them over the table. (SipHash, the default, guards a table against
/// keys an adversary picks; the worker picks none of the keys stored here, only those it asks
/// for in replies, which cost one probe each whatever they are.)
#[derive(Clone, Copy, Debug, Default)]
struct CallIds;

impl std::hash::BuildHasher for CallIds {
    type Hasher = CallIdHasher;

    fn build_hasher(&self) -> CallIdHasher {
        CallIdHasher(0)
    }
}

/// The hasher of [`CallIds`].
#[derive(Debug)]
struct CallIdHasher(u64);

impl std::hash::Hasher for CallIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // 2^64 divided by the golden ratio: odd, so distinct ids stay distinct in every bit
        // range the table looks at.
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One live worker process and the channel to it.
pub(crate) struct Conn {
    pub(crate) worker: u32,
    pub(crate) pid: u32,
    encoder: Encoder,
    endpoint: Endpoint,
    sending: TimedLock,
    reading: Mutex<()>,
    calls: Mutex<HashMap<u64, Arc<CallSlot>, CallIds>>,
    next_call: AtomicU64,
    /// Calls between their start and the end of their decoding. A reply the dead worker sent
    /// may name our own blocks, one hop back; until every call that may decode such a reply
    /// is over, the loans to the dead worker stay (a decoded view of our own block holds the
    /// block through its loan, see `loans.rs`).
    under_way: AtomicUsize,
    pub(crate) life: Mutex<Life>,
    pub(crate) dead: AtomicBool,
    pub(crate) stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// The threads that reap the process and forward its stderr.
    pub(crate) threads: Mutex<Threads>,
}

/// The threads of a worker process: the reaper, joined once the process is gone (which a kill
/// makes certain), and the stderr forwarder, which ends only when every process holding the
/// pipe has closed it — a grandchild may hold it for ever — so it is waited for briefly, for
/// the last lines, then left to end by itself.
#[derive(Debug, Default)]
pub(crate) struct Threads {
    pub(crate) reaper: Option<JoinHandle<()>>,
    /// The forwarder, and what tells that it has ended.
    pub(crate) forwarder: Option<(JoinHandle<()>, std::sync::mpsc::Receiver<()>)>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("worker", &self.worker)
            .field("pid", &self.pid)
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish()
    }
}

impl Conn {
    pub(crate) fn new(worker: u32, pid: u32, pool: &ShmPool, endpoint: Endpoint) -> Self {
        Conn {
            worker,
            pid,
            encoder: Encoder::new(pool.clone()),
            endpoint,
            sending: TimedLock::default(),
            reading: Mutex::new(()),
            calls: Mutex::new(HashMap::default()),
            next_call: AtomicU64::new(1),
            under_way: AtomicUsize::new(0),
            life: Mutex::new(Life::default()),
            dead: AtomicBool::new(false),
            stderr_tail: Arc::new(Mutex::new(VecDeque::new())),
            threads: Mutex::new(Threads::default()),
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// The error for calls to a dead worker.
    pub(crate) fn died(&self) -> TransportError {
        let life = lock(&self.life);
        TransportError::WorkerDied {
            worker: self.worker,
            pid: self.pid,
            status: life.ended.clone().unwrap_or_else(|| "ended".into()),
        }
    }

    /// Waits for the worker's `Hello`.
    pub(crate) fn handshake(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let ring = self.endpoint.channel().frames(Direction::ToParent);
        loop {
            if let Some(frame) = self.endpoint.receive()? {
                return match frame {
                    Frame::Hello {
                        version,
                        pid,
                        session,
                    } if version == PROTOCOL_VERSION => self.admit(pid, &session),
                    Frame::Hello { version, .. } => Err(TransportError::ProtocolMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    }),
                    other => Err(malformed(format!(
                        "expected the worker's hello, got {other:?}"
                    ))),
                };
            }
            match ring.wait_for_frame(Some(deadline), || self.is_dead()) {
                Wake::Ready => {}
                Wake::Stopped => return Err(self.died()),
                Wake::TimedOut => {
                    return Err(TransportError::Timeout {
                        method: "handshake".into(),
                        timeout,
                    });
                }
            }
        }
    }

    /// Fixes the worker's session from its hello, after checking the pid the hello gives
    /// against the child's. A session is only the prefix of the worker's segment names: the
    /// descriptors of those segments come on the worker's own link, so claiming another
    /// process's session gains nothing but the refusal of its own references — except ours,
    /// which it may not claim.
    fn admit(&self, pid: u32, session: &str) -> Result<()> {
        let claimed: SessionId = session
            .parse()
            .map_err(|_| malformed(format!("the worker's hello names session {session:?}")))?;
        if pid != self.pid {
            return Err(malformed(format!(
                "the worker (pid {}) says it is pid {pid}",
                self.pid
            )));
        }
        if claimed == self.endpoint.admission().own() {
            return Err(malformed(format!(
                "the worker claims session {claimed}, which is the parent's"
            )));
        }
        self.endpoint.admission().set_peer(claimed);
        Ok(())
    }

    /// Calls `method`, handing the reply to `decode` while the call still counts as under way
    /// (see [`Life::calls`]); every blocking step — encoding into a fresh block, waiting to
    /// send, waiting for the reply — ends by the deadline.
    pub(crate) fn call_decode<T>(
        &self,
        method: &str,
        args: impl Args,
        timeout: Option<Duration>,
        decode: impl FnOnce(&Payload, &shm_codec::Decoder) -> std::result::Result<T, TransportError>,
    ) -> Result<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let timed_out = || TransportError::Timeout {
            method: method.to_owned(),
            timeout: timeout.unwrap_or_default(),
        };
        let _in_flight = InFlight::start(self);
        if self.is_dead() {
            return Err(self.died());
        }
        // The push reads the ring's positions: they come while the arguments are encoded.
        self.endpoint
            .channel()
            .frames(Direction::ToWorker)
            .prefetch_positions();
        let args = args.encoded(&self.encoder)?;
        if !args.is_backed() {
            return Err(TransportError::UnbackedPayload {
                method: method.to_owned(),
                named: args.buffers().len(),
                held: args.blocks().len(),
            });
        }
        let mut args = self.endpoint.localize(args)?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(timed_out());
        }
        let blocks = args.take_blocks();
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (args, blocks) = match self.call_alone(id, method, args, blocks, deadline) {
            Alone::Delivered(delivered) => return self.decoded(delivered, decode),
            Alone::Failed(err) => {
                return Err(match err {
                    TransportError::Timeout { .. } => timed_out(),
                    err => err,
                });
            }
            Alone::Declined(args, blocks) => (args, blocks),
        };
        let slot = Arc::new(CallSlot::default());
        lock(&self.calls).insert(id, Arc::clone(&slot));
        let frame = Frame::Call {
            id,
            method: method.to_owned(),
            args,
            loans: Vec::new(),
        };
        let sent = self.send(frame, blocks, deadline);
        let waited = match sent {
            Ok(Ok(())) => self.wait(&slot, deadline),
            Ok(Err(Stall::TimedOut)) => Err(timed_out()),
            Ok(Err(Stall::Stopped)) => Err(self.died()),
            Err(err) => Err(err),
        };
        // Once the call is out of the table, no reader can deliver to it: whatever it holds
        // now is all it will ever get, even if it came after the deadline.
        lock(&self.calls).remove(&id);
        let delivered = lock(&slot.state).outcome.take();
        let Some(delivered) = delivered else {
            return Err(match waited {
                Err(TransportError::Timeout { .. }) => timed_out(),
                Err(err) => err,
                Ok(()) => malformed(format!("call {id} woke without its reply")),
            });
        };
        self.decoded(delivered, decode)
    }

    /// Hands a delivered reply to `decode`, or turns the worker's error into ours.
    fn decoded<T>(
        &self,
        Delivered { outcome, loans }: Delivered,
        decode: impl FnOnce(&Payload, &shm_codec::Decoder) -> std::result::Result<T, TransportError>,
    ) -> Result<T> {
        let result = match outcome {
            Ok(result) => result,
            Err(remote) => {
                self.endpoint.release(&loans);
                return Err(TransportError::from_remote(remote));
            }
        };
        let decoding = self.endpoint.decoder(&result, &loans)?;
        let value = decode(&result, &decoding.decoder);
        decoding.finish();
        value
    }

    /// The call of a thread that finds nobody reading replies, nobody sending and room in the
    /// ring: it sends its frame and reads the reply ring itself until its own reply comes,
    /// delivering any other reply it meets to its caller. Its call never enters the table of
    /// calls, so no other thread can take its reply: none reads the ring meanwhile.
    ///
    /// Only a frame that can neither wait nor lend takes this way: one without blocks, small
    /// enough for a slot. Holding `reading` while waiting to send — for room, or for the link
    /// to take a descriptor — could stall a worker blocked on a full reply ring. The others go
    /// back to the caller, as they were, for the general way.
    fn call_alone(
        &self,
        id: u64,
        method: &str,
        args: Payload,
        blocks: Vec<Arc<shm_core::ShmBlock>>,
        deadline: Option<Instant>,
    ) -> Alone {
        let small = blocks.is_empty()
            && args.buffers().is_empty()
            && method.len() + args.codec.len() + args.meta.len() + args.inline.len() < SMALL_FRAME;
        if !small || self.is_dead() {
            return Alone::Declined(args, blocks);
        }
        let Ok(reading) = self.reading.try_lock() else {
            return Alone::Declined(args, blocks);
        };
        let requests = self.endpoint.channel().frames(Direction::ToWorker);
        let sending = match self.sending.try_lock() {
            Some(sending) if !requests.is_full() => sending,
            _ => {
                // A caller that found `reading` taken meanwhile may sleep: a leader that
                // leaves wakes the others, however briefly it led.
                drop(reading);
                self.hand_over();
                return Alone::Declined(args, blocks);
            }
        };
        // Neither waits: the ring has room and only this thread produces into it; the frame
        // names no block and fits a slot. It is written from its parts, no frame built.
        let write = |out: &mut Vec<u8>| Frame::write_call(out, id, method, &args, &[]);
        let never = || false;
        let sent = self
            .endpoint
            .send_unlent(write, deadline, &|| self.is_dead(), &never, &|| {});
        drop(sending);
        let read = match sent {
            Ok(Some(Ok(()))) => self.read_own(id, deadline),
            Ok(Some(Err(Stall::TimedOut))) => Err(TransportError::Timeout {
                method: String::new(),
                timeout: Duration::ZERO,
            }),
            Ok(Some(Err(Stall::Stopped))) => Err(self.died()),
            Ok(None) => {
                // Larger than `SMALL_FRAME` allows for: the general way spills it.
                drop(reading);
                self.hand_over();
                return Alone::Declined(args, blocks);
            }
            Err(err) => Err(err),
        };
        drop(reading);
        self.hand_over();
        match read {
            Ok(delivered) => Alone::Delivered(delivered),
            Err(err) => Alone::Failed(err),
        }
    }

    /// Reads the reply ring, holding `reading`, until the reply to call `id` comes; replies
    /// to other calls go to their callers on the way.
    fn read_own(&self, id: u64, deadline: Option<Instant>) -> Result<Delivered> {
        loop {
            if let Some(delivered) = self.drain(Some(id))? {
                return Ok(delivered);
            }
            if self.is_dead() {
                return Err(self.died());
            }
            if self.wait_for_reply(deadline) == Wake::TimedOut {
                return Err(TransportError::Timeout {
                    method: String::new(),
                    timeout: Duration::ZERO,
                });
            }
        }
    }

    /// Waits, as the reader of replies, for a frame in the reply ring, the worker's death or
    /// `deadline`.
    fn wait_for_reply(&self, deadline: Option<Instant>) -> Wake {
        // Woken without a frame, read the link: the worker's descriptors found it full.
        let woken = std::cell::Cell::new(false);
        self.endpoint
            .channel()
            .frames(Direction::ToParent)
            .wait_for_frame(deadline, || {
                if woken.replace(true) {
                    self.endpoint.read_link();
                }
                self.is_dead()
            })
    }

    /// Sends a frame under the sending lock, reading replies while the ring is full.
    fn send(
        &self,
        frame: Frame,
        blocks: Vec<Arc<shm_core::ShmBlock>>,
        deadline: Option<Instant>,
    ) -> Result<std::result::Result<(), Stall>> {
        let Some(_sending) = self.sending.lock(deadline) else {
            return Ok(Err(Stall::TimedOut));
        };
        if self.is_dead() {
            return Ok(Err(Stall::Stopped));
        }
        let stop = || self.is_dead();
        // Replies wait and nobody reads them: reading them lets a worker blocked on a full
        // reply ring go on, and so read the request ring this thread waits on.
        let replies = self.endpoint.channel().frames(Direction::ToParent);
        let can_read = || !replies.is_empty() && self.reading.try_lock().is_ok();
        let read_replies = || {
            if let Ok(reading) = self.reading.try_lock() {
                // A malformed reply fails the call it belongs to when that caller reads it.
                let _ = self.drain(None);
                drop(reading);
                self.hand_over();
            }
        };
        self.endpoint
            .send(frame, blocks, deadline, &stop, &can_read, &read_replies)
    }

    /// Waits until the call's reply is in its slot: reads the reply ring on everyone's behalf
    /// when no other thread does, or sleeps until the thread that does hands the reply over.
    fn wait(&self, slot: &CallSlot, deadline: Option<Instant>) -> Result<()> {
        loop {
            if lock(&slot.state).outcome.is_some() {
                return Ok(());
            }
            if self.is_dead() {
                return Err(self.died());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(TransportError::Timeout {
                    method: String::new(),
                    timeout: Duration::ZERO,
                });
            }
            if let Ok(reading) = self.reading.try_lock() {
                let read = self.drain(None).and_then(|_| {
                    if lock(&slot.state).outcome.is_none() {
                        self.wait_for_reply(deadline);
                        self.drain(None)?;
                    }
                    Ok(())
                });
                drop(reading);
                self.hand_over();
                read?;
            } else {
                let mut state = lock(&slot.state);
                // Checked under our slot's lock: a leader that leaves after this point wakes
                // us (it frees `reading` first, then takes this lock to notify).
                if state.outcome.is_some() || self.is_dead() || self.reading.try_lock().is_ok() {
                    continue;
                }
                let sleep = deadline.map_or(FOLLOWER_CHECK, |d| {
                    d.saturating_duration_since(Instant::now())
                        .min(FOLLOWER_CHECK)
                });
                state.sleeping = true;
                let (mut state, _) = slot
                    .ready
                    .wait_timeout(state, sleep)
                    .unwrap_or_else(PoisonError::into_inner);
                state.sleeping = false;
            }
        }
    }

    /// Wakes every waiting caller, one of which takes over reading the reply ring, and any
    /// sender waiting for room, which reads replies if nobody else does.
    fn hand_over(&self) {
        for slot in lock(&self.calls).values() {
            slot.wake(&lock(&slot.state));
        }
        self.endpoint.channel().ring(Side::Parent);
    }

    /// Reads every frame in the reply ring and delivers it; replies nobody waits for any
    /// more have their blocks returned at once. The reply to call `own`, if it comes, is
    /// returned instead, and the frames after it are left in the ring.
    fn drain(&self, own: Option<u64>) -> Result<Option<Delivered>> {
        while let Some(frame) = self.endpoint.receive()? {
            match frame {
                Frame::Reply { id, outcome, loans } if Some(id) == own => {
                    return Ok(Some(Delivered { outcome, loans }));
                }
                Frame::Reply { id, outcome, loans } => {
                    let calls = lock(&self.calls);
                    match calls.get(&id) {
                        Some(slot) => {
                            let mut state = lock(&slot.state);
                            state.outcome = Some(Delivered { outcome, loans });
                            slot.wake(&state);
                        }
                        None => {
                            drop(calls);
                            self.endpoint.release(&loans);
                        }
                    }
                }
                other => {
                    return Err(malformed(format!(
                        "unexpected frame from the worker: {other:?}"
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Asks the worker to finish; gives up at `deadline`.
    pub(crate) fn send_shutdown(&self, deadline: Instant) -> bool {
        matches!(
            self.send(Frame::Shutdown, Vec::new(), Some(deadline)),
            Ok(Ok(()))
        )
    }

    /// Marks the worker dead and fails every pending call. Called by the reaper, before it
    /// reaps the process.
    pub(crate) fn ended(&self, status: String) {
        {
            let mut life = lock(&self.life);
            life.ended = Some(status);
            self.dead.store(true, Ordering::SeqCst);
        }
        let idle = self.under_way.load(Ordering::SeqCst) == 0;
        self.hand_over();
        // Whatever the dead worker left in the sleeper count.
        self.endpoint.channel().wake_all(Side::Parent);
        // Nothing the dead worker held can be in use there any more; if calls are under way,
        // the last of them forgets the loans once it has decoded what it got.
        if idle {
            self.endpoint.forget_loans();
        }
    }

    /// The last lines of the worker's stderr (complete once the worker is reaped).
    pub(crate) fn stderr_tail(&self) -> String {
        lock(&self.stderr_tail)
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// How far a call went on its own (see [`Conn::call_alone`]).
enum Alone {
    /// Its reply.
    Delivered(Delivered),
    /// It failed: sending, reading, or at its deadline.
    Failed(TransportError),
    /// It did not start: the arguments and their blocks, untouched, for the general way.
    Declined(Payload, Vec<Arc<shm_core::ShmBlock>>),
}

/// The bytes of method name, codec name, metadata and inline data under which a call without
/// blocks surely fits a slot (the rest of a frame is a few varints), so it cannot spill.
const SMALL_FRAME: usize = crate::channel::SLOT_LEN / 2;

/// Arguments as a call takes them: a value to encode, or a payload already encoded, which is
/// moved into the call rather than copied.
pub(crate) trait Args {
    fn encoded(self, encoder: &Encoder) -> shm_codec::Result<Payload>;
}

impl<A: Encode + ?Sized> Args for &A {
    fn encoded(self, encoder: &Encoder) -> shm_codec::Result<Payload> {
        encoder.encode(self)
    }
}

impl Args for Payload {
    fn encoded(self, _encoder: &Encoder) -> shm_codec::Result<Payload> {
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_that_is_held_stays_held_whoever_else_tries() {
        let timed = TimedLock::default();
        let held = timed.try_lock().expect("a new lock is free");
        assert!(timed.try_lock().is_none());
        assert!(timed.try_lock().is_none(), "a failed try freed the lock");
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(timed.lock(Some(soon)).is_none(), "taken while held");
        assert!(Instant::now() >= soon, "gave up before its deadline");
        drop(held);
        assert!(timed.try_lock().is_some(), "not freed by its holder");
    }

    #[test]
    fn one_thread_at_a_time_holds_the_lock_and_every_waiter_gets_it() {
        let timed = TimedLock::default();
        let inside = AtomicBool::new(false);
        let entered = AtomicUsize::new(0);
        let hold = |guard: TimedGuard<'_>| {
            assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
            entered.fetch_add(1, Ordering::Relaxed);
            std::hint::spin_loop();
            inside.store(false, Ordering::SeqCst);
            drop(guard);
        };
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (timed, hold) = (&timed, &hold);
                scope.spawn(move || {
                    for round in 0..20_000 {
                        match (thread + round) % 3 {
                            0 => {
                                if let Some(guard) = timed.try_lock() {
                                    hold(guard);
                                }
                            }
                            1 => hold(timed.lock(None).expect("no deadline")),
                            _ => {
                                let deadline = Instant::now() + Duration::from_secs(10);
                                hold(timed.lock(Some(deadline)).expect("ten seconds"));
                            }
                        }
                    }
                });
            }
        });
        assert!(entered.load(Ordering::Relaxed) >= 4 * 20_000 * 2 / 3);
        assert!(timed.try_lock().is_some());
    }
}
