//! The parent side: spawning a worker, calling it from any number of threads, noticing its
//! death, restarting it, and shutting it down without leaving a process or a segment behind.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Pid, WaitId, WaitIdOptions, WaitIdStatus, waitid};
use shm_codec::{Decode, Encode};
use shm_core::ShmPool;

use crate::channel::{Channel, Side, channel_len};
use crate::conn::{Conn, lock};
use crate::error::{Result, TransportError};
use crate::frame::Endpoint;
use crate::serve::CHANNEL_ENV;
use crate::trust::Admission;

/// Lines of a worker's stderr kept for start-up failure reports.
const STDERR_TAIL: usize = 20;

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
    /// Whether the worker is untrusted: every block of its replies is copied into private
    /// memory before it is validated and decoded, so that the worker can neither rewrite nor
    /// truncate what the parent has checked and reads. Costs one copy of every reply byte
    /// (`cargo xtask bench` measures it). Default `false`: replies are read in place.
    pub untrusted: bool,
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
            untrusted: false,
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

    /// Reads the worker's replies from private copies (see [`untrusted`](Self::untrusted)).
    pub fn untrusted(mut self, untrusted: bool) -> Self {
        self.untrusted = untrusted;
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

    /// Kills the worker process at once: pending calls fail with `WorkerDied`.
    pub(crate) fn kill(&self) {
        self.conn.kill_and_reap();
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
        let channel = Channel::create(pool.alloc(channel_len())?, std::process::id())?;
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
        // The worker may name our session and, once its hello has said which, its own.
        let admission = Admission::new(pool.session(), None, config.untrusted);
        let endpoint = Endpoint::new(channel, Side::Parent, pool.clone(), admission);
        let conn = Arc::new(Conn::new(worker, child.id(), pool, endpoint));
        let mut threads = Vec::new();
        let stderr = child.stderr.take();
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

    fn kill_and_reap(&self) {
        {
            let life = lock(&self.life);
            // The pid is still ours: the reaper marks the worker ended (under `life`, which we
            // hold) before it reaps it, so the process has not been reaped and its pid cannot
            // have been reused. A kill that fails finds the process already gone.
            if life.ended.is_none()
                && let Some(pid) = i32::try_from(self.pid).ok().and_then(Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        self.join_threads();
    }

    fn shutdown(&self, grace: Duration) {
        let until = Instant::now() + grace;
        if !self.dead.load(Ordering::Acquire) && self.send_shutdown(until) {
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

/// How a process ended, from what `waitid` reported.
fn describe(status: Option<WaitIdStatus>) -> String {
    match status {
        Some(status) => match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "ended".to_owned(),
        },
        None => "ended (waitid reported nothing)".to_owned(),
    }
}

/// Waits for the worker process to end, marks it dead before reaping it (so that nobody can
/// signal a reused pid), then reaps it.
fn reap(child: &mut Child, conn: Weak<Conn>) -> std::io::Result<JoinHandle<()>> {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("the worker has no valid pid"))?;
    std::thread::Builder::new()
        .name("shm-worker-reaper".into())
        .spawn(move || {
            // WNOWAIT leaves the child unreaped, so its pid stays ours until the second call.
            let ended = loop {
                match waitid(
                    WaitId::Pid(pid),
                    WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
                ) {
                    Err(rustix::io::Errno::INTR) => continue,
                    Ok(status) => break describe(status),
                    Err(err) => break format!("ended (waitid failed: {err})"),
                }
            };
            if let Some(conn) = conn.upgrade() {
                conn.ended(ended);
            }
            let _ = waitid(WaitId::Pid(pid), WaitIdOptions::EXITED);
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
