//! The parent side: spawning a worker, calling it from any number of threads, noticing its
//! death, restarting it, and shutting it down without leaving a process or a segment behind.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shm_codec::{Decode, Decoder, Encode, Encoder, Payload};
use shm_core::{ShmBlock, ShmPool};

use crate::channel::{Channel, Direction, PROTOCOL_VERSION, Wake, channel_len};
use crate::error::{RemoteError, Result, TransportError, malformed};
use crate::frame::Frame;
use crate::serve::CHANNEL_ENV;

/// Lines of a worker's stderr kept for start-up failure reports.
const STDERR_TAIL: usize = 20;
/// How long a thread waiting for a reply sleeps before it looks around again.
const CHECK_EVERY: Duration = Duration::from_millis(20);
/// How often the janitor returns released results to the worker while nobody calls.
const JANITOR_EVERY: Duration = Duration::from_millis(50);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a worker's stderr goes. Every line is prefixed with `[worker N]`.
#[derive(Clone)]
pub enum StderrSink {
    /// To this process's stderr.
    Inherit,
    /// To a function of the caller's.
    Lines(Arc<dyn Fn(&str) + Send + Sync>),
    /// Nowhere (the last lines are still kept for start-up failure reports).
    Discard,
}

impl std::fmt::Debug for StderrSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StderrSink::Inherit => "Inherit",
            StderrSink::Lines(_) => "Lines",
            StderrSink::Discard => "Discard",
        })
    }
}

/// How to start a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The executable; it must call [`serve`](crate::serve) when started as a worker.
    pub program: std::path::PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Where its stderr goes.
    pub stderr: StderrSink,
    /// How long the worker may take to start serving. Default 10 s.
    pub startup_timeout: Duration,
    /// How long [`Worker::shutdown`] waits for a clean exit before it kills. Default 2 s.
    pub grace: Duration,
    /// The pool that argument blocks are allocated from; `None` for a new pool.
    pub pool: Option<ShmPool>,
}

impl WorkerConfig {
    /// A configuration that runs `program` with defaults for everything else.
    pub fn new(program: impl Into<std::path::PathBuf>) -> Self {
        WorkerConfig {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            stderr: StderrSink::Inherit,
            startup_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(2),
            pool: None,
        }
    }

    /// The same executable as this process, re-run as a worker.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self::new(std::env::current_exe()?))
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets where stderr goes.
    pub fn stderr(mut self, sink: StderrSink) -> Self {
        self.stderr = sink;
        self
    }
}

/// A worker process and the channel to it. Calls may come from many threads at once; each
/// reply is matched to its call by id.
#[derive(Debug)]
pub struct Worker {
    config: WorkerConfig,
    pool: ShmPool,
    id: u32,
    conn: Arc<Conn>,
}

static NEXT_WORKER: AtomicU32 = AtomicU32::new(1);

/// The outcome of one call, filled in by whoever reads its reply.
#[derive(Default)]
struct CallSlot {
    outcome: Mutex<Option<Result<Delivered>>>,
    ready: Condvar,
}

/// A reply as delivered to its caller.
struct Delivered {
    outcome: std::result::Result<Payload, RemoteError>,
    args_kept: bool,
    needs_release: bool,
}

/// Why the worker is gone.
#[derive(Debug, Default)]
struct Life {
    ended: Option<String>,
}

struct Conn {
    worker: u32,
    pid: u32,
    pool: ShmPool,
    encoder: Encoder,
    channel: Channel,
    /// Held while pushing into the parent → worker ring.
    sending: Mutex<()>,
    /// Held by the one thread that reads the worker → parent ring for everyone.
    reading: Mutex<()>,
    calls: Mutex<HashMap<u64, Arc<CallSlot>>>,
    next_call: AtomicU64,
    life: Mutex<Life>,
    dead: AtomicBool,
    /// Argument payloads the worker still views, or whose call timed out, by call id.
    lent: Mutex<HashMap<u64, (Payload, Option<ShmBlock>)>>,
    /// Replies whose blocks the worker keeps for us, with the views we made of them.
    borrowed: Mutex<Vec<(u64, Vec<Weak<ShmBlock>>)>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// The threads that reap the process and forward its stderr; joined when it is gone.
    threads: Mutex<Vec<JoinHandle<()>>>,
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

impl Worker {
    /// Starts a worker and waits for its handshake.
    pub fn spawn(config: WorkerConfig) -> Result<Self> {
        let pool = match &config.pool {
            Some(pool) => pool.clone(),
            None => ShmPool::new()?,
        };
        let id = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
        let conn = Conn::start(&config, &pool, id)?;
        Ok(Worker {
            config,
            pool,
            id,
            conn,
        })
    }

    /// The worker's id, as in its stderr prefix.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.conn.pid
    }

    /// The pool argument blocks come from; produce arguments in place here to send them
    /// without a copy.
    pub fn pool(&self) -> &ShmPool {
        &self.pool
    }

    /// Whether the worker process is alive.
    pub fn is_alive(&self) -> bool {
        !self.conn.dead.load(Ordering::Acquire)
    }

    /// Calls `method` with `args` and decodes its result as `R`; waits as long as it takes,
    /// or until the worker dies.
    pub fn call<A: Encode + ?Sized, R: Decode>(&self, method: &str, args: &A) -> Result<R> {
        self.conn.call(method, args, None)
    }

    /// [`call`](Self::call) with a timeout. After a timeout the worker may still be busy with
    /// the call; [`restart`](Self::restart) it if it is hung.
    pub fn call_timeout<A: Encode + ?Sized, R: Decode>(
        &self,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R> {
        self.conn.call(method, args, Some(timeout))
    }

    /// Kills the worker (if it still runs), removes what it left in `/dev/shm`, and starts a
    /// new one with the same configuration.
    pub fn restart(&mut self) -> Result<()> {
        self.conn.kill_and_reap();
        self.conn = Conn::start(&self.config, &self.pool, self.id)?;
        Ok(())
    }

    /// Asks the worker to finish, waits up to the grace period, then kills it. Pending calls
    /// fail; the worker's segments are removed either way. Dropping a `Worker` does the same.
    pub fn shutdown(self) {
        self.conn.shutdown(self.config.grace);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.conn.shutdown(self.config.grace);
    }
}

impl Conn {
    fn start(config: &WorkerConfig, pool: &ShmPool, worker: u32) -> Result<Arc<Conn>> {
        let program = config.program.display().to_string();
        let channel = Channel::create(pool.alloc(channel_len(), false)?, std::process::id())?;
        let mut child = Command::new(&config.program)
            .args(&config.args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .env(CHANNEL_ENV, channel.to_ref().to_hex())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| TransportError::Spawn {
                program: program.clone(),
                source,
            })?;
        let pid = child.id();
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take();
        let conn = Arc::new(Conn {
            worker,
            pid,
            pool: pool.clone(),
            encoder: Encoder::new(pool.clone()),
            channel,
            sending: Mutex::new(()),
            reading: Mutex::new(()),
            calls: Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(1),
            life: Mutex::new(Life::default()),
            dead: AtomicBool::new(false),
            lent: Mutex::new(HashMap::new()),
            borrowed: Mutex::new(Vec::new()),
            stderr_tail,
            threads: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        let started = stderr
            .map(|stderr| {
                forward_stderr(
                    stderr,
                    worker,
                    config.stderr.clone(),
                    Arc::clone(&conn.stderr_tail),
                )
            })
            .transpose()
            .and_then(|forwarder| {
                threads.extend(forwarder);
                threads.push(janitor(Arc::downgrade(&conn))?);
                reap(&mut child, Arc::downgrade(&conn))
            });
        match started {
            Ok(reaper) => threads.push(reaper),
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TransportError::Spawn { program, source });
            }
        }
        *lock(&conn.threads) = threads;
        match conn.handshake(config.startup_timeout) {
            Ok(()) => Ok(conn),
            Err(err) => {
                conn.kill_and_reap();
                Err(match err {
                    TransportError::WorkerDied { status, .. } => TransportError::StartFailed {
                        program,
                        status,
                        stderr: conn.stderr_tail(),
                    },
                    TransportError::Timeout { timeout, .. } => TransportError::StartFailed {
                        program,
                        status: format!("no handshake within {timeout:?}"),
                        stderr: conn.stderr_tail(),
                    },
                    other => other,
                })
            }
        }
    }

    fn handshake(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let ring = self.channel.ring(Direction::ToParent);
        loop {
            if let Some(bytes) = ring.pop()? {
                return match Frame::read(&bytes, &self.pool)? {
                    Frame::Hello { version, .. } if version == PROTOCOL_VERSION => Ok(()),
                    Frame::Hello { version, .. } => Err(TransportError::ProtocolMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    }),
                    other => Err(malformed(format!(
                        "expected the worker's hello, got {other:?}"
                    ))),
                };
            }
            match ring.wait(Some(deadline), CHECK_EVERY, || {
                self.dead.load(Ordering::Acquire)
            }) {
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

    /// The error for calls to a dead worker.
    fn died(&self) -> TransportError {
        let life = lock(&self.life);
        TransportError::WorkerDied {
            worker: self.worker,
            pid: self.pid,
            status: life.ended.clone().unwrap_or_else(|| "ended".into()),
        }
    }

    /// The last lines of the worker's stderr (complete once the worker is reaped).
    fn stderr_tail(&self) -> String {
        lock(&self.stderr_tail)
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn send(&self, frame: &Frame) -> Result<Option<ShmBlock>> {
        let _sending = lock(&self.sending);
        if self.dead.load(Ordering::Acquire) {
            return Err(self.died());
        }
        let alive = || !self.dead.load(Ordering::Acquire);
        frame
            .send(&self.channel.ring(Direction::ToWorker), &self.pool, alive)
            // A full ring that never drains means the worker died while we waited.
            .map_err(|err| if alive() { err } else { self.died() })
    }

    fn call<A: Encode + ?Sized, R: Decode>(
        &self,
        method: &str,
        args: &A,
        timeout: Option<Duration>,
    ) -> Result<R> {
        if self.dead.load(Ordering::Acquire) {
            return Err(self.died());
        }
        self.release_borrowed()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let args = self.encoder.encode(args)?;
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(CallSlot::default());
        lock(&self.calls).insert(id, Arc::clone(&slot));
        let frame = Frame::Call {
            id,
            method: method.to_owned(),
            args,
        };
        let spill = match self.send(&frame) {
            Ok(spill) => spill,
            Err(err) => {
                lock(&self.calls).remove(&id);
                return Err(err);
            }
        };
        let Frame::Call { args, .. } = frame else {
            unreachable!("the frame was built as a call above")
        };
        let delivered = self.wait(&slot, deadline);
        lock(&self.calls).remove(&id);
        let delivered = match delivered {
            Ok(delivered) => delivered,
            Err(err) => {
                // The worker may still read the arguments of a call that timed out: keep them
                // until its reply comes, or the worker dies.
                if matches!(err, TransportError::Timeout { .. }) {
                    lock(&self.lent).insert(id, (args, spill));
                }
                return Err(match err {
                    TransportError::Timeout { .. } => TransportError::Timeout {
                        method: method.to_owned(),
                        timeout: timeout.unwrap_or_default(),
                    },
                    other => other,
                });
            }
        };
        if delivered.args_kept {
            lock(&self.lent).insert(id, (args, spill));
        } else {
            drop((args, spill));
        }
        let result = match delivered.outcome {
            Ok(result) => result,
            Err(remote) => {
                if delivered.needs_release {
                    self.send(&Frame::Release { id })?;
                }
                return Err(remote.into());
            }
        };
        let decoder = Decoder::tracking(self.pool.clone());
        let value = R::decode(&result, &decoder);
        drop(result);
        if delivered.needs_release {
            lock(&self.borrowed).push((id, decoder.take_attached()));
            self.release_borrowed()?;
        }
        Ok(value?)
    }

    /// Tells the worker about replies none of whose blocks we view any more.
    fn release_borrowed(&self) -> Result<()> {
        let released: Vec<u64> = {
            let mut borrowed = lock(&self.borrowed);
            let mut released = Vec::new();
            borrowed.retain(|(id, views)| {
                let in_use = views.iter().any(|v| v.strong_count() > 0);
                if !in_use {
                    released.push(*id);
                }
                in_use
            });
            released
        };
        for id in released {
            self.send(&Frame::Release { id })?;
        }
        Ok(())
    }

    /// Waits for the reply of one call: reads the reply ring on everyone's behalf when no
    /// other thread does, or sleeps until the thread that does hands the reply over.
    fn wait(&self, slot: &CallSlot, deadline: Option<Instant>) -> Result<Delivered> {
        let outcome = loop {
            if let Some(outcome) = lock(&slot.outcome).take() {
                break outcome;
            }
            if self.dead.load(Ordering::Acquire) {
                break Err(self.died());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Err(TransportError::Timeout {
                    method: String::new(),
                    timeout: Duration::ZERO,
                });
            }
            if let Ok(_reading) = self.reading.try_lock() {
                self.drain()?;
                if lock(&slot.outcome).is_some() {
                    continue;
                }
                let ring = self.channel.ring(Direction::ToParent);
                ring.wait(deadline, CHECK_EVERY, || {
                    self.dead.load(Ordering::Acquire) || lock(&slot.outcome).is_some()
                });
                self.drain()?;
            } else {
                let outcome = lock(&slot.outcome);
                if outcome.is_none() {
                    let sleep = deadline.map_or(CHECK_EVERY, |d| {
                        d.saturating_duration_since(Instant::now()).min(CHECK_EVERY)
                    });
                    drop(slot.ready.wait_timeout(outcome, sleep));
                }
            }
        };
        // Whoever waits next must read the ring now that this thread leaves it.
        for other in lock(&self.calls).values() {
            other.ready.notify_all();
        }
        outcome
    }

    /// Reads every frame in the reply ring and delivers it.
    fn drain(&self) -> Result<()> {
        let ring = self.channel.ring(Direction::ToParent);
        while let Some(bytes) = ring.pop()? {
            let (frame, spilled) = Frame::read_marked(&bytes, &self.pool)?;
            match frame {
                Frame::Reply {
                    id,
                    outcome,
                    args_kept,
                    needs_release,
                } => {
                    let needs_release = needs_release || spilled;
                    let slot = lock(&self.calls).get(&id).cloned();
                    match slot {
                        Some(slot) => {
                            *lock(&slot.outcome) = Some(Ok(Delivered {
                                outcome,
                                args_kept,
                                needs_release,
                            }));
                            slot.ready.notify_all();
                        }
                        None => {
                            // The caller gave up (timeout): nobody will view this reply.
                            if !args_kept {
                                lock(&self.lent).remove(&id);
                            }
                            if needs_release {
                                self.send(&Frame::Release { id })?;
                            }
                        }
                    }
                }
                Frame::ArgsReleased { id } => {
                    lock(&self.lent).remove(&id);
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

    /// Marks the worker dead and fails every pending call. Called by the reaper, before it
    /// reaps the process.
    fn ended(&self, status: String) {
        {
            let mut life = lock(&self.life);
            life.ended = Some(status);
            self.dead.store(true, Ordering::Release);
        }
        for slot in lock(&self.calls).values() {
            slot.ready.notify_all();
        }
        self.channel.ring(Direction::ToParent).ring_bell();
        // Nothing the dead worker held can be in use there any more.
        lock(&self.lent).clear();
        lock(&self.borrowed).clear();
    }

    fn kill_and_reap(&self) {
        {
            let life = lock(&self.life);
            if life.ended.is_none() {
                // SAFETY: kill has no memory preconditions. The pid is still ours: the reaper
                // marks the worker ended (under `life`, which we hold) before it reaps it, so
                // the process has not been reaped and its pid cannot have been reused.
                unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        self.join_threads();
    }

    fn shutdown(&self, grace: Duration) {
        if !self.dead.load(Ordering::Acquire) && self.send(&Frame::Shutdown).is_ok() {
            let until = Instant::now() + grace;
            while !self.dead.load(Ordering::Acquire) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.kill_and_reap();
    }

    fn join_threads(&self) {
        let threads = std::mem::take(&mut *lock(&self.threads));
        for thread in threads {
            let _ = thread.join();
        }
        // A worker killed before it could clean up leaves its segments; its session lock is
        // free now, so the sweep removes exactly those.
        let _ = shm_core::sweep_orphans();
    }
}

/// How a process ended, from the `siginfo_t` of `waitid`.
fn describe(info: &libc::siginfo_t) -> String {
    // SAFETY: `si_status` reads a field that `waitid` filled in for a child-state event.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => format!("exit code {status}"),
        libc::CLD_KILLED | libc::CLD_DUMPED => format!("killed by signal {status}"),
        code => format!("ended (si_code {code}, status {status})"),
    }
}

/// Waits for the worker process to end, marks it dead before reaping it (so that nobody can
/// signal a reused pid), then reaps it.
fn reap(child: &mut Child, conn: Weak<Conn>) -> std::io::Result<JoinHandle<()>> {
    let pid = child.id();
    std::thread::Builder::new()
        .name("shm-worker-reaper".into())
        .spawn(move || {
            // SAFETY: an all-zero siginfo_t is a valid value for waitid to overwrite.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            loop {
                // SAFETY: `info` is valid for writes; WNOWAIT leaves the child unreaped, so
                // its pid stays ours until the second waitid below.
                let rc = unsafe {
                    libc::waitid(
                        libc::P_PID,
                        pid as libc::id_t,
                        &mut info,
                        libc::WEXITED | libc::WNOWAIT,
                    )
                };
                if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break;
                }
            }
            if let Some(conn) = conn.upgrade() {
                conn.ended(describe(&info));
            }
            // SAFETY: as above; this call reaps the child that the first one reported.
            unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED) };
        })
}

/// Between calls, tells the worker about results the caller has dropped and reads what the
/// worker sent meanwhile (arguments it no longer views), so that blocks on both sides are
/// recycled even when nobody calls.
fn janitor(conn: Weak<Conn>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("shm-worker-janitor".into())
        .spawn(move || {
            loop {
                std::thread::sleep(JANITOR_EVERY);
                let Some(conn) = conn.upgrade() else { return };
                if conn.dead.load(Ordering::Acquire) {
                    return;
                }
                // Errors here surface at the next call, which meets the same condition.
                let _ = conn.release_borrowed();
                if let Ok(_reading) = conn.reading.try_lock() {
                    let _ = conn.drain();
                }
            }
        })
}

/// Copies the worker's stderr, line by line, with its prefix, to the sink, keeping the last
/// lines for error reports.
fn forward_stderr(
    stderr: std::process::ChildStderr,
    worker: u32,
    sink: StderrSink,
    tail: Arc<Mutex<VecDeque<String>>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("shm-worker-stderr".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = format!("[worker {worker}] {line}");
                match &sink {
                    StderrSink::Inherit => {
                        let _ = writeln!(std::io::stderr().lock(), "{line}");
                    }
                    StderrSink::Lines(f) => f(&line),
                    StderrSink::Discard => {}
                }
                let mut tail = lock(&tail);
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        })
}
