//! A model-based test over two real processes: several threads make random calls to one worker
//! — values of every codec, fresh and re-sent, held and dropped on both sides, with timeouts
//! shorter and longer than the handler, restarts (some into workers whose replies are read from
//! private copies) and SIGKILLs — and every value read on either side is checked against its
//! digest, every call against its deadline, and every block and segment against the pool at
//! the end.
//!
//! `SHM_MODEL_STEPS` (default 10,000), `SHM_MODEL_THREADS` (default 4) and `SHM_MODEL_SEED`
//! (default: from the clock, printed) steer it; `cargo xtask soak --steps N` runs it long.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ndarray::{ArrayD, ArrayViewD, IxDyn, SliceInfoElem};
use shm_arrow::ColumnFrame;
use shm_codec::{Encode, Encoder, Payload, Serde, ShmArray};
use shm_tests::CleanShm;
use shm_tests::model::{
    Answer, Command, Digests, Reply, Rng, batch, bytes, digest_batch, digest_bytes, digest_f64,
    digest_frame, digest_tagged, f64_array, frame, i32_array, length,
};
use shm_transport::{CalleeExt, TransportError, Worker, WorkerConfig};

const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");

/// How late a call with a timeout may return: the longest step a call cannot interrupt
/// (encoding or decoding a megabyte) plus scheduling noise on a loaded two-core machine.
const LATENESS_BOUND: Duration = Duration::from_millis(300);

/// With no call finishing for this long, the test reports a hang and fails.
const STALL: Duration = Duration::from_secs(60);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An f64 argument: a view of a heap array (any layout), or a received array sent on.
enum F64Arg<'a> {
    Heap(ArrayViewD<'a, f64>),
    Shm(ShmArray<f64, IxDyn>),
}

impl Encode for F64Arg<'_> {
    fn encode(&self, encoder: &Encoder) -> shm_codec::Result<Payload> {
        match self {
            F64Arg::Heap(view) => view.encode(encoder),
            F64Arg::Shm(array) => array.encode(encoder),
        }
    }
}

impl F64Arg<'_> {
    fn digest(&self) -> u64 {
        match self {
            F64Arg::Heap(v) => digest_f64(v.shape(), v.iter()),
            F64Arg::Shm(a) => {
                let v = a.view();
                digest_f64(v.shape(), v.iter())
            }
        }
    }
}

/// A reply the parent keeps, with the digests it had on arrival.
struct Kept {
    reply: Reply,
    digests: [u64; 4],
    answer: Answer,
    /// The worker's life it came from: a dead worker's segments are gone, so only values of
    /// the living worker (or the parent's own blocks) can be sent on by reference.
    epoch: u64,
}

fn reply_digests(reply: &Reply) -> [u64; 4] {
    let (_, a, Serde(c), d, ColumnFrame(e)) = reply;
    let v = a.view();
    [
        digest_f64(v.shape(), v.iter()),
        digest_bytes(c),
        digest_frame(d),
        digest_batch(e),
    ]
}

#[derive(Default, Debug)]
struct Tally {
    calls: u64,
    ok: u64,
    timeouts: u64,
    died: u64,
    kills: u64,
    restarts: u64,
    resent: u64,
    verified: u64,
    max_late: Duration,
    late: Vec<Duration>,
}

struct Shared {
    worker: RwLock<Worker>,
    /// Bumped at every restart: a `WorkerDied` is expected only across one.
    epoch: AtomicU64,
    next_key: AtomicU64,
    progress: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// What a worker said it dropped: every frame the parent sends must be read.
    dropped: Arc<Mutex<Vec<String>>>,
    tally: Mutex<Tally>,
    done: AtomicBool,
}

/// A worker whose stderr goes to ours, each line that reports a dropped message also kept in
/// `dropped`.
fn worker_config(untrusted: bool, dropped: &Arc<Mutex<Vec<String>>>) -> WorkerConfig {
    let dropped = Arc::clone(dropped);
    let sink = shm_transport::StderrSink::Lines(Arc::new(move |line: &str| {
        eprintln!("{line}");
        if line.contains("dropped") {
            dropped
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(line.to_owned());
        }
    }));
    WorkerConfig::new(WORKER)
        .with_untrusted(untrusted)
        .with_stderr(sink)
}

impl Shared {
    fn fail(&self, what: String) {
        eprintln!("model failure: {what}");
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(what);
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Restarts the worker if it is dead and nobody restarted it since `epoch`: with
    /// `restart()`, or as a new worker whose replies are read from private copies, or as a new
    /// trusted one, in turn.
    fn revive(&self, epoch: u64) {
        let mut worker = self.worker.write().unwrap_or_else(PoisonError::into_inner);
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        let revived = match epoch % 3 {
            0 => worker.restart(),
            turn => Worker::spawn(worker_config(turn == 1, &self.dropped))
                .map(|new| drop(std::mem::replace(&mut *worker, new))),
        };
        if let Err(err) = revived {
            self.fail(format!("restart failed: {err}"));
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.tally().restarts += 1;
    }
}

fn run_thread(shared: &Shared, seed: u64, steps: u64) {
    let mut rng = Rng::new(seed);
    let mut kept: Vec<Kept> = Vec::new();
    let mut keys: Vec<u64> = Vec::new();
    for _ in 0..steps {
        if !shared
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
        {
            return;
        }
        match rng.below(100) {
            0..=59 => call(shared, &mut rng, &mut kept, &mut keys),
            60..=71 => {
                // Let go of some kept replies.
                let n = rng.below(kept.len() as u64 + 1) as usize;
                for _ in 0..n {
                    let at = rng.below(kept.len() as u64) as usize;
                    kept.swap_remove(at);
                }
            }
            72..=81 => {
                for (i, k) in kept.iter().enumerate() {
                    let now = reply_digests(&k.reply);
                    if now != k.digests {
                        shared.fail(format!(
                            "kept reply {i} ({:?}, of worker life {}, now {}) changed under \
                             the parent: {:?} became {now:?}",
                            k.answer,
                            k.epoch,
                            shared.epoch.load(Ordering::Acquire),
                            k.digests,
                        ));
                    }
                }
                shared.tally().verified += kept.len() as u64;
            }
            82..=89 => {
                let worker = shared.worker.read().unwrap_or_else(PoisonError::into_inner);
                match worker.call::<_, Serde<Vec<String>>>("model_verify", &()) {
                    Ok(Serde(bad)) => bad.into_iter().for_each(|b| shared.fail(b)),
                    Err(TransportError::WorkerDied { .. }) => {}
                    Err(err) => shared.fail(format!("model_verify: {err}")),
                }
            }
            90..=97 => {
                let n = rng.below(keys.len() as u64 + 1) as usize;
                let dropped: Vec<u64> = keys.drain(..n).collect();
                let worker = shared.worker.read().unwrap_or_else(PoisonError::into_inner);
                match worker.call::<_, Serde<u64>>("model_drop", &Serde(dropped)) {
                    Ok(_) | Err(TransportError::WorkerDied { .. }) => {}
                    Err(err) => shared.fail(format!("model_drop: {err}")),
                }
            }
            _ => {
                if rng.chance(20) {
                    let epoch = shared.epoch.load(Ordering::Acquire);
                    if rng.chance(50) {
                        let worker = shared.worker.read().unwrap_or_else(PoisonError::into_inner);
                        // SAFETY: kill has no memory preconditions; the pid is the worker's,
                        // which the parent has not reaped (it is alive or a zombie we own).
                        unsafe { libc::kill(worker.pid() as i32, libc::SIGKILL) };
                        shared.tally().kills += 1;
                    }
                    shared.revive(epoch);
                    keys.clear();
                }
            }
        }
        shared.progress.fetch_add(1, Ordering::Relaxed);
    }
}

fn call(shared: &Shared, rng: &mut Rng, kept: &mut Vec<Kept>, keys: &mut Vec<u64>) {
    let seed = rng.next_u64() % 1_000_000;
    let worker = shared.worker.read().unwrap_or_else(PoisonError::into_inner);
    let epoch = shared.epoch.load(Ordering::Acquire);
    let live: Vec<&Kept> = kept.iter().filter(|k| k.epoch == epoch).collect();
    let heap_f64 = f64_array(length(rng), seed);
    let transposed;
    let f64_arg = match (rng.below(5), live.is_empty()) {
        (0, false) | (1, false) => {
            // A received array, or a reversed slice of it, sent on.
            let k = live[rng.below(live.len() as u64) as usize];
            let a = &k.reply.1;
            let arg = if rng.chance(50) {
                let elems: Vec<SliceInfoElem> = a
                    .shape()
                    .iter()
                    .map(|_| SliceInfoElem::Slice {
                        start: 0,
                        end: None,
                        step: -1 - rng.below(2) as isize,
                    })
                    .collect();
                a.slice(&elems[..])
            } else {
                a.clone()
            };
            shared.tally().resent += 1;
            F64Arg::Shm(arg)
        }
        (2, _) => {
            transposed = heap_f64.t().to_owned();
            F64Arg::Heap(transposed.t())
        }
        (3, _) => F64Arg::Heap(heap_f64.slice_each_axis(|_| ndarray::Slice::new(0, None, -1))),
        _ => F64Arg::Heap(heap_f64.view()),
    };
    let i32s: ArrayD<i32> = i32_array(length(rng), seed);
    let serde_bytes = bytes(length(rng) % 300, seed, rng.chance(5));
    let (simple, columns) = match (rng.below(3), live.is_empty()) {
        (0, false) => {
            let k = live[rng.below(live.len() as u64) as usize];
            let ColumnFrame(b) = &k.reply.4;
            let rows = b.num_rows();
            let cut = if rows > 2 && rng.chance(50) {
                b.slice(1, rows - 2)
            } else {
                b.clone()
            };
            (k.reply.3.clone(), ColumnFrame(cut))
        }
        _ => {
            let rows = length(rng) % 700;
            (
                frame(worker.shm_pool(), rows % 300, seed),
                ColumnFrame(batch(rows, seed)),
            )
        }
    };
    let expect = Digests([
        f64_arg.digest(),
        digest_tagged(seed, i32s.shape(), i32s.iter()),
        digest_bytes(&serde_bytes),
        digest_frame(&simple),
        digest_batch(&columns.0),
    ]);
    let hold = rng
        .chance(15)
        .then(|| shared.next_key.fetch_add(1, Ordering::Relaxed));
    let sleep_ms = if rng.chance(15) { rng.below(25) } else { 0 };
    let timeout = rng
        .chance(30)
        .then(|| Duration::from_millis(1 + rng.below(30)));
    let answer = if rng.chance(40) {
        Answer::Resend
    } else {
        Answer::Fresh
    };
    let command = Command {
        expect,
        sleep_ms,
        hold,
        answer,
        seed: rng.next_u64() % 1_000_000,
    };
    let args = (
        Serde(command),
        &f64_arg,
        (Serde(seed), &i32s),
        Serde(serde_bytes),
        &simple,
        &columns,
    );
    let start = Instant::now();
    let outcome: Result<Reply, TransportError> = match timeout {
        Some(t) => worker.call_timeout("model", &args, t),
        None => worker.call("model", &args),
    };
    let elapsed = start.elapsed();
    drop(args);
    drop(live);
    drop(worker);
    keys.extend(hold);
    let mut tally = shared.tally();
    tally.calls += 1;
    if let Some(t) = timeout {
        let late = elapsed.saturating_sub(t);
        tally.late.push(late);
        tally.max_late = tally.max_late.max(late);
        if late > LATENESS_BOUND {
            drop(tally);
            shared.fail(format!(
                "a call with a {t:?} timeout returned after {elapsed:?} ({outcome:?})",
                outcome = outcome.as_ref().err()
            ));
            tally = shared.tally();
        }
    }
    match outcome {
        Ok(reply) => {
            tally.ok += 1;
            drop(tally);
            let Serde(report) = &reply.0;
            let seen = reply_digests(&reply);
            if seen != report.digests {
                shared.fail(format!(
                    "the parent read other values than the worker sent: {:?} vs {seen:?}",
                    report.digests
                ));
            }
            if rng.chance(50) {
                kept.push(Kept {
                    reply,
                    digests: seen,
                    epoch,
                    answer,
                });
                if kept.len() > 24 {
                    kept.remove(0);
                }
            }
        }
        Err(TransportError::Timeout { .. }) if timeout.is_some() => tally.timeouts += 1,
        Err(TransportError::WorkerDied { .. }) => {
            tally.died += 1;
            drop(tally);
            shared.revive(epoch);
        }
        Err(err) => {
            drop(tally);
            shared.fail(format!("call failed: {err}"));
        }
    }
}

#[test]
fn random_interleavings_keep_every_value_intact_and_every_deadline() {
    let clean = CleanShm::begin();
    let steps = env_u64("SHM_MODEL_STEPS", 10_000);
    let threads = env_u64("SHM_MODEL_THREADS", 4).max(1);
    let seed = env_u64(
        "SHM_MODEL_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000),
    );
    eprintln!("model: {steps} steps, {threads} threads, SHM_MODEL_SEED={seed}");
    let dropped = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::new(Shared {
        worker: RwLock::new(Worker::spawn(worker_config(false, &dropped)).unwrap()),
        dropped,
        epoch: AtomicU64::new(0),
        next_key: AtomicU64::new(1),
        progress: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        tally: Mutex::new(Tally::default()),
        done: AtomicBool::new(false),
    });
    let watchdog = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            let mut last = (shared.progress.load(Ordering::Relaxed), Instant::now());
            while !shared.done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                let now = shared.progress.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > STALL {
                    let tally = shared.tally();
                    eprintln!(
                        "model failure: no step finished for {STALL:?} after {now} steps: the \
                         processes are deadlocked ({} calls, {} kills, {} restarts)",
                        tally.calls, tally.kills, tally.restarts
                    );
                    std::process::exit(101);
                }
            }
        })
    };
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let shared = &shared;
            scope.spawn(move || run_thread(shared, seed * 1000 + t, steps / threads));
        }
    });
    let failures = shared
        .failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    {
        let mut tally = shared.tally();
        tally.late.sort();
        let p99 = tally
            .late
            .get(tally.late.len() * 99 / 100)
            .copied()
            .unwrap_or_default();
        eprintln!(
            "model: {} steps in {:?}: {} calls, {} ok, {} timeouts, {} WorkerDied, {} kills, \
             {} restarts, {} arrays re-sent, {} kept values re-checked; lateness p99 {p99:?}, \
             worst {:?}",
            shared.progress.load(Ordering::Relaxed),
            started.elapsed(),
            tally.calls,
            tally.ok,
            tally.timeouts,
            tally.died,
            tally.kills,
            tally.restarts,
            tally.resent,
            tally.verified,
            tally.max_late
        );
    }
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
    let dropped = shared
        .dropped
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert!(
        dropped.is_empty(),
        "the worker dropped messages the parent sent: {dropped:#?}"
    );

    // Everything is let go of: both pools hold nothing but the channel.
    let worker = shared.worker.read().unwrap_or_else(PoisonError::into_inner);
    let all: Vec<u64> = (0..shared.next_key.load(Ordering::Relaxed)).collect();
    let Serde(left): Serde<u64> = worker.call("model_drop", &Serde(all)).unwrap();
    assert_eq!(left, 0, "the worker still holds arguments");
    // A block re-sent back and forth k times comes back over k exchanges: each side takes back
    // what the other returned when it next receives a frame. A parent block the worker sent
    // back and the parent re-sent is such a chain too, with nothing of the worker's pool in it,
    // so both pools are watched until both are empty.
    let mut worker_blocks = u64::MAX;
    for _ in 0..16 {
        worker.shm_pool().reclaim();
        worker_blocks = worker
            .call::<_, Serde<u64>>("model_live_blocks", &())
            .unwrap()
            .0;
        worker.shm_pool().reclaim();
        if worker_blocks == 0 && worker.shm_pool().stats().live_blocks == 1 {
            break;
        }
    }
    assert_eq!(worker_blocks, 0, "blocks of the worker's pool not returned");
    let stats = worker.shm_pool().stats();
    assert_eq!(
        stats.live_blocks, 1,
        "parent blocks not returned (the channel is one): {stats:?}"
    );
    drop(worker);
    shared.done.store(true, Ordering::Release);
    watchdog.join().unwrap();
    match Arc::try_unwrap(shared) {
        Ok(shared) => shared
            .worker
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .shutdown(),
        Err(_) => panic!("a thread still holds the worker"),
    }
    clean.end();
}
