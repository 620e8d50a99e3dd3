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
//!   caller and never sends anything — blocks go back to the worker through the release
//!   ring, which never blocks — so the reader of the reply ring cannot be held up by a full
//!   request ring.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A lock whose acquisition gives up at a deadline.
#[derive(Default)]
struct TimedLock {
    state: Mutex<TimedState>,
    freed: Condvar,
}

#[derive(Default)]
struct TimedState {
    busy: bool,
    /// Threads waiting for the lock: releasing it makes a system call only when there are.
    waiting: usize,
}

struct TimedGuard<'a>(&'a TimedLock);

impl TimedLock {
    fn lock(&self, deadline: Option<Instant>) -> Option<TimedGuard<'_>> {
        let mut state = lock(&self.state);
        while state.busy {
            let left = match deadline {
                None => None,
                Some(deadline) => Some(deadline.checked_duration_since(Instant::now())?),
            };
            state.waiting += 1;
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
            state.waiting -= 1;
        }
        state.busy = true;
        Some(TimedGuard(self))
    }
}

impl Drop for TimedGuard<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.busy = false;
        if state.waiting > 0 {
            self.0.freed.notify_one();
        }
    }
}

/// Why the worker is gone, and how many calls are still under way.
#[derive(Debug, Default)]
pub(crate) struct Life {
    pub(crate) ended: Option<String>,
    /// Calls between their start and the end of their decoding. A reply the dead worker sent
    /// may name our own blocks, one hop back; until every call that may decode such a reply
    /// is over, the loans to the dead worker stay (a decoded view of our own block holds the
    /// block through its loan, see `loans.rs`).
    calls: usize,
}

/// Counts a call as under way for as long as it lives.
struct InFlight<'a>(&'a Conn);

impl<'a> InFlight<'a> {
    fn start(conn: &'a Conn) -> Self {
        lock(&conn.life).calls += 1;
        InFlight(conn)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut life = lock(&self.0.life);
        life.calls -= 1;
        let last_after_death = life.calls == 0 && life.ended.is_some();
        drop(life);
        if last_after_death {
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
        let Some(Delivered { outcome, loans }) = delivered else {
            return Err(match waited {
                Err(TransportError::Timeout { .. }) => timed_out(),
                Err(err) => err,
                Ok(()) => malformed(format!("call {id} woke without its reply")),
            });
        };
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
                let _ = self.drain();
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
                let read = self.drain().and_then(|()| {
                    if lock(&slot.state).outcome.is_none() {
                        let ring = self.endpoint.channel().frames(Direction::ToParent);
                        // Woken without a frame, read the link: the worker's descriptors
                        // found it full.
                        let woken = std::cell::Cell::new(false);
                        ring.wait_for_frame(deadline, || {
                            if woken.replace(true) {
                                self.endpoint.read_link();
                            }
                            self.is_dead()
                        });
                        self.drain()?;
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
    /// more have their blocks returned at once.
    fn drain(&self) -> Result<()> {
        while let Some(frame) = self.endpoint.receive()? {
            match frame {
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
        Ok(())
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
        let idle = {
            let mut life = lock(&self.life);
            life.ended = Some(status);
            self.dead.store(true, Ordering::Release);
            life.calls == 0
        };
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
