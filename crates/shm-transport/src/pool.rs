//! `WorkerPool`: several workers behind one calling interface — local processes of one
//! executable, remote workers ([`Callee`]s of other crates), or both.
//!
//! A call goes to the worker with the fewest calls in flight. A worker that dies fails only its
//! own calls in flight (with [`TransportError::WorkerDied`], which names it) and is restarted
//! in the background while the others go on; calls arriving meanwhile go to the living ones.
//! Every worker allocates from, and attaches through, the pool's one [`ShmPool`], so a value
//! encoded once ([`Payload`] is itself [`Encode`]) is written to shared memory once however
//! many workers receive it: [`WorkerPool::broadcast`] does exactly that.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::Duration;

use shm_codec::{Decode, Encode, Encoder, Payload};
use shm_core::ShmPool;

use crate::callee::{Callee, CalleeExt, DecodeReply, Lifecycle};
use crate::error::{Result, TransportError};
use crate::worker::{Worker, WorkerConfig};

/// How [`WorkerPool::shutdown`] treats calls in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Refuse new calls, let the calls in flight finish, then stop the workers.
    Drain,
    /// Refuse new calls and kill the workers at once: calls in flight fail with
    /// [`TransportError::WorkerDied`].
    Cancel,
}

/// One worker of the pool and what the pool knows about it.
#[derive(Debug)]
struct Slot {
    /// `None` once the pool is shut down. Calls and restarts hold the read lock (a restart
    /// swaps the worker's process in under a lock of the worker's own, so calls meanwhile fail
    /// fast instead of waiting for it to start); shutting down takes the write lock.
    worker: RwLock<Option<Box<dyn Lifecycle>>>,
    in_flight: AtomicUsize,
    restarting: AtomicBool,
}

#[derive(Debug)]
struct Shared {
    slots: Vec<Slot>,
    closed: AtomicBool,
    /// Calls in flight over all workers, for `ShutdownMode::Drain`.
    busy: Mutex<usize>,
    idle: Condvar,
    /// Restarts that failed, with the reason, for the caller to see.
    failed_restarts: Mutex<Vec<String>>,
}

/// N workers serving the same handlers. Share it between threads by reference (it is `Sync`)
/// or in an `Arc`. It is a [`Callee`] itself: the typed calls come from [`CalleeExt`], and
/// each goes to the worker with the fewest calls in flight.
///
/// ```no_run
/// use ndarray::Array1;
/// use shm_codec::Serde;
/// use shm_transport::{CalleeExt, ShutdownMode, WorkerConfig, WorkerPool};
///
/// # fn main() -> Result<(), shm_transport::TransportError> {
/// let workers = WorkerPool::with_workers(WorkerConfig::new("my-worker"), 4)?;
/// let Serde(sum): Serde<f64> = workers.call("sum", &Array1::from_elem(1000, 1.0))?;
/// // Written to shared memory once, read in place by every worker.
/// let each: Vec<_> = workers.broadcast::<_, Serde<f64>>("sum", &Array1::from_elem(10, 2.0))?;
/// // In the order of the items, four calls at a time.
/// let sums = workers.map::<_, Serde<f64>, _>(
///     "sum",
///     (0..100).map(|i| Array1::from_elem(100, i as f64)),
///     4,
///     |done, started| eprintln!("{done}/{started}"),
/// );
/// workers.shutdown(ShutdownMode::Drain);
/// # let _ = (sum, each, sums);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct WorkerPool {
    shared: Arc<Shared>,
    pool: ShmPool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a call in flight on one slot and on the pool, until dropped.
struct InFlight<'a> {
    slot: &'a Slot,
    shared: &'a Shared,
}

impl<'a> InFlight<'a> {
    fn start(slot: &'a Slot, shared: &'a Shared) -> Self {
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        *lock(&shared.busy) += 1;
        InFlight { slot, shared }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
        let mut busy = lock(&self.shared.busy);
        *busy -= 1;
        if *busy == 0 {
            self.shared.idle.notify_all();
        }
    }
}

impl WorkerPool {
    /// Starts one worker per available core from `config`; see
    /// [`with_workers`](Self::with_workers).
    pub fn new(config: WorkerConfig) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_workers(config, cores)
    }

    /// Starts `workers` workers (at least one) from `config`, all sharing one shared-memory
    /// pool (the config's [`pool`](WorkerConfig::with_pool), or a new one). Fails if any worker
    /// fails to start; those already started are shut down.
    pub fn with_workers(config: WorkerConfig, workers: usize) -> Result<Self> {
        let count = workers.max(1);
        let pool = match config.pool() {
            Some(pool) => pool.clone(),
            None => ShmPool::new()?,
        };
        let config = config.with_pool(pool.clone());
        let mut workers: Vec<Box<dyn Lifecycle>> = Vec::with_capacity(count);
        for _ in 0..count {
            // A worker that fails to start drops (and so shuts down) those already started.
            workers.push(Box::new(Worker::spawn(config.clone())?));
        }
        Ok(Self::from_workers(pool, workers))
    }

    /// A pool over workers started elsewhere: local [`Worker`]s (best spawned with
    /// `config.with_pool(pool.clone())`, so that a value encoded once is read in place by
    /// each of them), remote workers, or a mix. Arguments are encoded into `pool`. A pool
    /// without workers fails every call with [`TransportError::PoolShutdown`].
    pub fn from_workers(pool: ShmPool, workers: Vec<Box<dyn Lifecycle>>) -> Self {
        let slots = workers
            .into_iter()
            .map(|worker| Slot {
                worker: RwLock::new(Some(worker)),
                in_flight: AtomicUsize::new(0),
                restarting: AtomicBool::new(false),
            })
            .collect();
        WorkerPool {
            shared: Arc::new(Shared {
                slots,
                closed: AtomicBool::new(false),
                busy: Mutex::new(0),
                idle: Condvar::new(),
                failed_restarts: Mutex::new(Vec::new()),
            }),
            pool,
        }
    }

    /// How many workers the pool has.
    pub fn len(&self) -> usize {
        self.shared.slots.len()
    }

    /// Whether the pool has no workers (never: it starts at least one).
    pub fn is_empty(&self) -> bool {
        self.shared.slots.is_empty()
    }

    /// The shared-memory pool every worker's arguments come from: produce arguments in place
    /// here to send them without a copy.
    pub fn shm_pool(&self) -> &ShmPool {
        &self.pool
    }

    /// Calls in flight on each worker, in worker order.
    pub fn in_flight(&self) -> Vec<usize> {
        self.shared
            .slots
            .iter()
            .map(|s| s.in_flight.load(Ordering::Acquire))
            .collect()
    }

    /// The process ids of the workers now (a restarted worker has a new one; a remote worker
    /// has none).
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.shared
            .slots
            .iter()
            .map(|s| {
                s.worker
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .and_then(|w| w.pid())
            })
            .collect()
    }

    /// Restarts that failed in the background so far, with their errors (a worker whose
    /// restart failed is tried again after its next failed call).
    pub fn failed_restarts(&self) -> Vec<String> {
        lock(&self.shared.failed_restarts).clone()
    }

    /// Calls `method` on every worker with the same arguments, encoded once: a block is
    /// written once and lent to each worker. The outer error is a failure to encode; the
    /// results come in worker order.
    pub fn broadcast<A: Encode + ?Sized, R: Decode + Send>(
        &self,
        method: &str,
        args: &A,
    ) -> Result<Vec<Result<R>>> {
        let payload = Encoder::new(self.pool.clone()).encode(args)?;
        Ok(std::thread::scope(|scope| {
            let calls: Vec<_> = (0..self.len())
                .map(|i| {
                    let payload = &payload;
                    scope.spawn(move || {
                        let mut value = None;
                        self.call_on(i, method, payload.clone(), None, &mut |reply, decoder| {
                            value = Some(R::decode(reply, decoder)?);
                            Ok(())
                        })?;
                        value.ok_or_else(|| TransportError::NotDecoded {
                            method: method.to_owned(),
                        })
                    })
                })
                .collect();
            calls
                .into_iter()
                .map(|call| {
                    call.join().unwrap_or_else(|_| {
                        Err(TransportError::NotDecoded {
                            method: method.to_owned(),
                        })
                    })
                })
                .collect()
        }))
    }

    /// Calls `method` once per item, at most `in_flight` calls at a time (at least one; each
    /// waits on a thread of its own, so `in_flight` is also the number of threads), spread
    /// over the workers. Results come back in the order of `items`, whatever order the
    /// calls finish in; `progress(done, started)` is called after each call finishes.
    pub fn map<A, R, I>(
        &self,
        method: &str,
        items: I,
        in_flight: usize,
        progress: impl FnMut(usize, usize) + Send,
    ) -> Vec<Result<R>>
    where
        I: IntoIterator<Item = A>,
        I::IntoIter: Send,
        A: Encode + Send,
        R: Decode + Send,
    {
        let items = Mutex::new(items.into_iter().enumerate());
        let results: Mutex<Vec<Option<Result<R>>>> = Mutex::new(Vec::new());
        let progress = Mutex::new((progress, 0usize, 0usize));
        std::thread::scope(|scope| {
            for _ in 0..in_flight.max(1) {
                scope.spawn(|| {
                    loop {
                        let next = {
                            let mut items = lock(&items);
                            let next = items.next();
                            if next.is_some() {
                                lock(&progress).2 += 1;
                            }
                            next
                        };
                        let Some((index, item)) = next else { break };
                        let result = self.call(method, &item);
                        drop(item);
                        {
                            let mut results = lock(&results);
                            if results.len() <= index {
                                results.resize_with(index + 1, || None);
                            }
                            results[index] = Some(result);
                        }
                        let mut progress = lock(&progress);
                        progress.1 += 1;
                        let (done, started) = (progress.1, progress.2);
                        (progress.0)(done, started);
                    }
                });
            }
        });
        results
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(TransportError::NotDecoded {
                        method: method.to_owned(),
                    })
                })
            })
            .collect()
    }

    /// Kills every worker that has a call in flight: those calls fail at once with
    /// [`TransportError::WorkerDied`] and the workers are restarted in the background, as after
    /// any death; idle workers and the pool go on. For a caller that gives up on everything
    /// under way (the Python module does on Ctrl-C).
    pub fn cancel_in_flight(&self) {
        self.cancel_where(|slot| slot.in_flight.load(Ordering::Acquire) > 0);
    }

    /// Kills the workers of the slots `pick` chooses.
    fn cancel_where(&self, pick: impl Fn(&Slot) -> bool) {
        for slot in self.shared.slots.iter().filter(|slot| pick(slot)) {
            if let Some(worker) = slot
                .worker
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
            {
                worker.cancel();
            }
        }
    }

    /// Stops the pool: new calls fail with [`TransportError::PoolShutdown`]; calls in flight
    /// finish ([`ShutdownMode::Drain`]) or fail at once ([`ShutdownMode::Cancel`]); then every
    /// worker is stopped and its segments removed. Dropping the pool drains it.
    pub fn shutdown(&self, how: ShutdownMode) {
        self.shared.closed.store(true, Ordering::Release);
        if how == ShutdownMode::Cancel {
            self.cancel_where(|_| true);
        }
        let mut busy = lock(&self.shared.busy);
        while *busy > 0 {
            busy = self
                .shared
                .idle
                .wait(busy)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(busy);
        for slot in &self.shared.slots {
            let worker = slot
                .worker
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(worker) = worker {
                worker.shutdown();
            }
        }
    }

    /// The slot with the fewest calls in flight among the living workers (any, if none lives:
    /// its call then fails with the worker's death and starts its restart).
    fn pick(&self) -> Result<usize> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(TransportError::PoolShutdown {
                workers: self.len(),
            });
        }
        let alive = |slot: &Slot| {
            !slot.restarting.load(Ordering::Acquire)
                && slot
                    .worker
                    .try_read()
                    .is_ok_and(|w| w.as_ref().is_some_and(|w| w.is_alive()))
        };
        let least = |candidates: &mut dyn Iterator<Item = (usize, &Slot)>| {
            candidates
                .min_by_key(|(_, slot)| slot.in_flight.load(Ordering::Acquire))
                .map(|(i, _)| i)
        };
        let slots = &self.shared.slots;
        least(&mut slots.iter().enumerate().filter(|(_, s)| alive(s)))
            .or_else(|| least(&mut slots.iter().enumerate()))
            .ok_or(TransportError::PoolShutdown { workers: 0 })
    }

    fn call_on(
        &self,
        index: usize,
        method: &str,
        args: Payload,
        timeout: Option<Duration>,
        decode: &mut DecodeReply<'_>,
    ) -> Result<()> {
        let slot = &self.shared.slots[index];
        let result = {
            let _in_flight = InFlight::start(slot, &self.shared);
            let worker = slot.worker.read().unwrap_or_else(PoisonError::into_inner);
            let Some(worker) = worker.as_ref() else {
                return Err(TransportError::PoolShutdown {
                    workers: self.len(),
                });
            };
            worker.call_with(method, args, timeout, decode)
        };
        if matches!(result, Err(TransportError::WorkerDied { .. })) {
            self.restart_in_background(index);
        }
        result
    }

    /// Restarts worker `index` on a thread of its own, once however many calls saw it die.
    fn restart_in_background(&self, index: usize) {
        let slot = &self.shared.slots[index];
        if self.shared.closed.load(Ordering::Acquire)
            || slot.restarting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new()
            .name("shm-pool-restart".into())
            .spawn(move || {
                let slot = &shared.slots[index];
                {
                    let worker = slot.worker.read().unwrap_or_else(PoisonError::into_inner);
                    if !shared.closed.load(Ordering::Acquire)
                        && let Some(worker) = worker.as_ref()
                        && !worker.is_alive()
                        && let Err(err) = worker.restart()
                    {
                        lock(&shared.failed_restarts).push(format!("worker {index}: {err}"));
                    }
                }
                slot.restarting.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            slot.restarting.store(false, Ordering::Release);
        }
    }
}

impl Callee for WorkerPool {
    /// Calls `method` on the worker with the fewest calls in flight; a worker found dead is
    /// restarted in the background.
    fn call_with(
        &self,
        method: &str,
        args: Payload,
        timeout: Option<Duration>,
        decode: &mut DecodeReply<'_>,
    ) -> Result<()> {
        self.call_on(self.pick()?, method, args, timeout, decode)
    }

    fn shm_pool(&self) -> &ShmPool {
        &self.pool
    }

    fn describe(&self) -> String {
        format!("a pool of {} workers", self.len())
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown(ShutdownMode::Drain);
    }
}
