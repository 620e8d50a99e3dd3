//! The parent side: spawning a worker, calling it from any number of threads, noticing its
//! death, restarting it, and shutting it down without leaving a process or a segment behind.
//! The process itself — start, stderr, reaping, killing — is in `process.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use shm_codec::{Decode, Encode};
use shm_core::ShmPool;

use crate::conn::Conn;
use crate::error::Result;

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
    /// memory before it is validated and decoded, so that the worker cannot rewrite what the
    /// parent has checked and reads (no peer can truncate a segment: they are sealed). Costs one copy of every reply byte
    /// (`cargo xtask bench` measures it). Default `false`: replies are read in place.
    pub untrusted: bool,
    /// Bytes of the parent's blocks the worker may hold on loan at once (arguments it has not
    /// finished with). A worker that keeps more — one that never gives blocks back — gets
    /// [`TransportError::LoanLimit`](crate::TransportError::LoanLimit) for its calls instead of
    /// filling the pool its neighbours share. Default 4 GiB.
    pub loan_limit: u64,
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
            loan_limit: 4 << 30,
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

    /// Sets [`loan_limit`](Self::loan_limit).
    pub fn loan_limit(mut self, bytes: u64) -> Self {
        self.loan_limit = bytes;
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

    /// The channel to the worker process now.
    pub(crate) fn conn(&self) -> &Conn {
        &self.conn
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
