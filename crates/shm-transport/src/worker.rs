//! The parent side: spawning a worker, calling it from any number of threads, noticing its
//! death, restarting it, and shutting it down without leaving a process or a segment behind.
//! The process itself — start, stderr, reaping, killing — is in `process.rs`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use shm_core::ShmPool;

use crate::conn::Conn;
use crate::error::Result;

/// Where a worker's stderr goes. Every line is prefixed with `[worker N]`.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use shm_transport::{StderrSink, WorkerConfig};
///
/// let lines = Arc::new(Mutex::new(Vec::<String>::new()));
/// let kept = Arc::clone(&lines);
/// let sink = StderrSink::Lines(Arc::new(move |line: &str| kept.lock().unwrap().push(line.into())));
/// let _config = WorkerConfig::new("my-worker").with_stderr(sink);
/// ```
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

/// How to start a worker: the program, and defaults for everything else that the `with_*`
/// methods change.
///
/// ```
/// use std::time::Duration;
/// use shm_transport::{StderrSink, WorkerConfig};
///
/// let config = WorkerConfig::new("/usr/local/bin/my-worker")
///     .with_args(["--threads", "4"])
///     .with_env("RUST_LOG", "info")
///     .with_stderr(StderrSink::Discard)
///     .with_startup_timeout(Duration::from_secs(30))
///     .with_loan_limit(1 << 30);
/// assert_eq!(config.startup_timeout(), Duration::from_secs(30));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerConfig {
    pub(crate) program: std::path::PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) stderr: StderrSink,
    pub(crate) startup_timeout: Duration,
    pub(crate) grace: Duration,
    pub(crate) pool: Option<ShmPool>,
    pub(crate) untrusted: bool,
    pub(crate) loan_limit: u64,
}

impl WorkerConfig {
    /// A configuration that runs `program` (an executable that calls
    /// [`serve`](crate::serve) when started as a worker) with defaults for everything else.
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
    pub fn with_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable of the worker.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets where the worker's stderr goes. Default: this process's stderr.
    pub fn with_stderr(mut self, sink: StderrSink) -> Self {
        self.stderr = sink;
        self
    }

    /// Sets how long the worker may take to start serving. Default 10 s.
    pub fn with_startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Sets how long shutting the worker down waits for a clean exit before it kills.
    /// Default 2 s.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Sets the pool that argument blocks are allocated from. Default: a new pool per worker
    /// (a [`WorkerPool`](crate::WorkerPool) gives all its workers one).
    pub fn with_pool(mut self, pool: ShmPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Sets whether the worker is untrusted: every block of its replies is copied into
    /// private memory before it is validated and decoded, so that the worker cannot rewrite
    /// what the parent has checked and reads. Costs one copy of every reply byte
    /// (`cargo xtask bench` measures it). Default `false`: replies are read in place, with
    /// the bytes that carry an invariant copied before they are checked.
    pub fn with_untrusted(mut self, untrusted: bool) -> Self {
        self.untrusted = untrusted;
        self
    }

    /// Sets the bytes of the parent's blocks the worker may hold on loan at once (arguments
    /// it has not finished with). A worker that keeps more — one that never gives blocks back
    /// — gets [`TransportError::LoanLimit`](crate::TransportError::LoanLimit) for its calls
    /// instead of filling the pool its neighbours share. Default 4 GiB.
    pub fn with_loan_limit(mut self, bytes: u64) -> Self {
        self.loan_limit = bytes;
        self
    }

    /// The executable.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// Its arguments.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Its extra environment variables.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Where its stderr goes.
    pub fn stderr(&self) -> &StderrSink {
        &self.stderr
    }

    /// How long it may take to start.
    pub fn startup_timeout(&self) -> Duration {
        self.startup_timeout
    }

    /// How long shutting it down waits before it kills.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The pool its arguments come from, if one was set.
    pub fn pool(&self) -> Option<&ShmPool> {
        self.pool.as_ref()
    }

    /// Whether its replies are read from private copies.
    pub fn is_untrusted(&self) -> bool {
        self.untrusted
    }

    /// The bytes of the parent's blocks it may hold on loan.
    pub fn loan_limit(&self) -> u64 {
        self.loan_limit
    }
}

/// A worker process and the channel to it. Calls may come from many threads at once; each
/// reply is matched to its call by id. The typed calls come from [`CalleeExt`](crate::CalleeExt),
/// restarting and stopping from [`Lifecycle`](crate::Lifecycle) (and the inherent methods of
/// the same names).
#[derive(Debug)]
pub struct Worker {
    config: WorkerConfig,
    pool: ShmPool,
    id: u32,
    /// The channel to the process now. A restart builds the next one without this lock and
    /// swaps it in under it, so calls never wait for a worker to start.
    conn: RwLock<Arc<Conn>>,
    /// Held by a restart from start to swap: two restarts at once start one process.
    restarting: Mutex<()>,
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
            conn: RwLock::new(conn),
            restarting: Mutex::new(()),
        })
    }

    /// The worker's id, as in its stderr prefix.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.conn().pid
    }

    /// The shared-memory pool argument blocks come from; produce arguments in place here to
    /// send them without a copy.
    pub fn shm_pool(&self) -> &ShmPool {
        &self.pool
    }

    /// Whether the worker process is alive.
    pub fn is_alive(&self) -> bool {
        !self.conn().dead.load(Ordering::Acquire)
    }

    /// Kills the worker (if it still runs) and starts a new one with the same configuration.
    /// Calls made meanwhile fail at once with
    /// [`WorkerDied`](crate::TransportError::WorkerDied), as calls to the dead worker would:
    /// none waits for the new process to start.
    pub fn restart(&self) -> Result<()> {
        let _restarting = self
            .restarting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.conn().kill_and_reap();
        let next = Conn::start(&self.config, &self.pool, self.id)?;
        let previous = std::mem::replace(
            &mut *self.conn.write().unwrap_or_else(PoisonError::into_inner),
            next,
        );
        drop(previous);
        Ok(())
    }

    /// The channel to the worker process now.
    pub(crate) fn conn(&self) -> Arc<Conn> {
        Arc::clone(&self.conn.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Kills the worker process at once: pending calls fail with `WorkerDied`.
    pub(crate) fn kill(&self) {
        self.conn().kill_and_reap();
    }

    /// Asks the worker to finish, waits up to the grace period, then kills it. Pending calls
    /// fail; the worker's segments are removed either way. Dropping a `Worker` does the same.
    pub fn shutdown(self) {
        // `Drop` does it.
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.conn().shutdown(self.config.grace);
    }
}
