//! shm-transport across real processes: calls, concurrency, errors, crashes on either side,
//! hangs, start-up failures, and who owns which block.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::{Array1, Array2, Ix1, IxDyn};
use shm_codec::{Index, Serde, ShmArray, SimpleFrame};
use shm_core::ShmPool;
use shm_tests::{ChildProcess, CleanShm, process_runs};
use shm_transport::CalleeExt;
use shm_transport::{RemoteErrorKind, StderrSink, TransportError, Worker, WorkerConfig};

const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");

/// Generous bound on calls that must not hang; the tests assert what they return.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn spawn() -> Worker {
    Worker::spawn(WorkerConfig::new(WORKER)).unwrap()
}

#[test]
fn values_arrays_tuples_and_frames_round_trip() {
    let clean = CleanShm::begin();
    let worker = spawn();
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(42u64)).unwrap();
    assert_eq!(x, 42);

    // Frames too large for a ring slot travel in blocks, both ways, call after call.
    let text = "0123456789".repeat(2_000);
    for times in [1, 5, 50] {
        let Serde(long): Serde<String> = worker.call("repeat", &Serde((&text, times))).unwrap();
        assert_eq!(long.len(), text.len() * times);
    }

    let a = Array2::from_shape_fn((700, 300), |(i, j)| (i * 300 + j) as f64);
    let Serde(sum): Serde<f64> = worker.call("sum", &a.t()).unwrap();
    assert_eq!(sum, a.sum());
    let doubled: ShmArray<f64, IxDyn> = worker.call("double", &a.t()).unwrap();
    assert_eq!(doubled.view(), (&a.t() * 2.0).into_dyn());

    let x = Array1::from_shape_fn(100_000, |i| i as f64);
    let y = Array1::from_elem(100_000, 1.0);
    let z: ShmArray<f64, Ix1> = worker.call("axpy", &(Serde(3.0), &x, &y)).unwrap();
    assert_eq!(z.view(), &x * 3.0 + &y);

    let frame = SimpleFrame::from_columns(
        worker.shm_pool(),
        &[("a", &[1.0, 2.0][..]), ("a", &[3.0, 4.0][..])],
        Index::default(),
    )
    .unwrap();
    let Serde((names, sums)): Serde<(Vec<String>, Vec<f64>)> =
        worker.call("column_sums", &frame).unwrap();
    assert_eq!(
        (names, sums),
        (vec!["a".to_owned(), "a".to_owned()], vec![3.0, 7.0])
    );
    drop((doubled, z, frame));
    worker.shutdown();
    clean.end();
}

#[test]
fn many_threads_call_one_worker_and_every_reply_finds_its_call() {
    let clean = CleanShm::begin();
    let worker = spawn();
    std::thread::scope(|scope| {
        for thread in 0..8u64 {
            let worker = &worker;
            scope.spawn(move || {
                for i in 0..300u64 {
                    let value = thread * 1_000_000 + i;
                    if i % 50 == 7 {
                        let a = Array1::from_elem(20_000, value as f64);
                        let Serde(sum): Serde<f64> = worker.call("sum", &a).unwrap();
                        assert_eq!(sum, value as f64 * 20_000.0);
                    } else {
                        let Serde(back): Serde<u64> = worker.call("echo", &Serde(value)).unwrap();
                        assert_eq!(back, value, "a reply reached the wrong call");
                    }
                }
            });
        }
    });
    worker.shutdown();
    clean.end();
}

#[test]
fn both_rings_fill_and_drain_while_more_threads_call_than_they_have_slots() {
    // The request ring has 64 slots. While the handler sleeps, 127 threads queue their calls:
    // 64 fill the ring and the rest wait for room, which comes back only when the worker has
    // read half the ring or found it empty; then the replies come faster than the callers
    // take them. Every call must end, with its own reply, well within its timeout.
    let clean = CleanShm::begin();
    let worker = spawn();
    let timeout = Duration::from_secs(60);
    std::thread::scope(|scope| {
        let worker = &worker;
        let sleeper =
            scope.spawn(move || worker.call_timeout::<_, ()>("sleep", &Serde(300u64), timeout));
        std::thread::sleep(Duration::from_millis(50));
        let callers: Vec<_> = (0..127u64)
            .map(|thread| {
                scope.spawn(move || {
                    for i in 0..40u64 {
                        let value = thread * 1_000 + i;
                        let Serde(back): Serde<u64> =
                            worker.call_timeout("echo", &Serde(value), timeout).unwrap();
                        assert_eq!(back, value, "a reply reached the wrong call");
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.join().unwrap();
        }
        sleeper.join().unwrap().unwrap();
    });
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(5u64)).unwrap();
    assert_eq!(x, 5);
    worker.shutdown();
    clean.end();
}

#[test]
fn handler_errors_panics_and_unknown_methods_come_back_and_the_worker_goes_on() {
    let clean = CleanShm::begin();
    let worker = Worker::spawn(WorkerConfig::new(WORKER).with_stderr(StderrSink::Discard)).unwrap();
    let remote = |result: Result<(), TransportError>| match result {
        Err(TransportError::Remote(remote)) => remote,
        other => panic!("expected a remote error, got {other:?}"),
    };
    let e = remote(worker.call("fail", &()));
    assert_eq!(
        (e.kind, e.method.as_str(), e.message.as_str()),
        (RemoteErrorKind::Handler, "fail", "the handler says no")
    );
    let e = remote(worker.call("panic", &()));
    assert_eq!(
        (e.kind, e.message.as_str()),
        (RemoteErrorKind::Panic, "the handler panicked")
    );
    let e = remote(worker.call("no-such-method", &()));
    assert_eq!(e.kind, RemoteErrorKind::UnknownMethod);
    let e = remote(worker.call("sum", &Serde("not an array")));
    assert_eq!(e.kind, RemoteErrorKind::BadArguments);
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(7u64)).unwrap();
    assert_eq!(x, 7);
    worker.shutdown();
    clean.end();
}

#[test]
fn a_worker_killed_mid_call_fails_every_pending_call_and_restarts() {
    let clean = CleanShm::begin();
    let worker = spawn();
    let Serde(pid): Serde<u32> = worker.call("pid", &()).unwrap();
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| {
                let r = worker.call_timeout::<_, ()>("sleep", &Serde(60_000u64), HANG_GUARD);
                results.lock().unwrap().push(r);
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: kill has no memory preconditions; `pid` is our live child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let results = results.into_inner().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        match r {
            Err(TransportError::WorkerDied { status, .. }) => {
                assert_eq!(status, "killed by signal 9")
            }
            other => panic!("expected WorkerDied, got {other:?}"),
        }
    }
    assert!(!worker.is_alive());
    assert!(matches!(
        worker.call::<_, ()>("pid", &()),
        Err(TransportError::WorkerDied { .. })
    ));
    worker.restart().unwrap();
    let Serde(new_pid): Serde<u32> = worker.call("pid", &()).unwrap();
    assert_ne!(new_pid, pid);
    worker.shutdown();
    clean.end();
}

#[test]
fn a_hung_handler_times_out_and_the_worker_can_be_restarted() {
    let clean = CleanShm::begin();
    let worker = spawn();
    let args = Array1::from_elem(1 << 16, 2.0f64);
    match worker.call_timeout::<_, ()>("sleep", &Serde(60_000u64), Duration::from_millis(300)) {
        Err(TransportError::Timeout { method, timeout }) => {
            assert_eq!(
                (method.as_str(), timeout),
                ("sleep", Duration::from_millis(300))
            );
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(matches!(
        worker.call_timeout::<_, Serde<f64>>("sum", &args, Duration::from_millis(100)),
        Err(TransportError::Timeout { .. })
    ));
    worker.restart().unwrap();
    let Serde(sum): Serde<f64> = worker.call("sum", &args).unwrap();
    assert_eq!(sum, 2.0 * (1 << 16) as f64);
    worker.shutdown();
    clean.end();
}

#[test]
fn workers_that_cannot_start_are_typed_errors() {
    let clean = CleanShm::begin();
    match Worker::spawn(WorkerConfig::new("/nonexistent/shm-worker")) {
        Err(TransportError::Spawn { program, source }) => {
            assert_eq!(program, "/nonexistent/shm-worker");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Spawn, got {other:?}"),
    }
    let config = WorkerConfig::new(WORKER)
        .with_args(["--fail-at-start"])
        .with_stderr(StderrSink::Discard);
    match Worker::spawn(config) {
        Err(TransportError::StartFailed { status, stderr, .. }) => {
            assert_eq!(status, "exit code 3");
            assert!(stderr.contains("this worker refuses to start"), "{stderr}");
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    clean.end();
}

#[test]
fn worker_stderr_reaches_the_parent_with_a_prefix() {
    let clean = CleanShm::begin();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let config =
        WorkerConfig::new(WORKER).with_stderr(StderrSink::Lines(Arc::new(move |l: &str| {
            sink.lock().unwrap().push(l.to_owned());
        })));
    let worker = Worker::spawn(config).unwrap();
    worker
        .call::<_, ()>("stderr", &Serde("hello from the worker"))
        .unwrap();
    let id = worker.id();
    worker.shutdown();
    let lines = lines.lock().unwrap();
    assert!(
        lines.contains(&format!("[worker {id}] hello from the worker")),
        "{lines:?}"
    );
    clean.end();
}

#[test]
fn held_results_are_never_recycled_under_the_caller() {
    let clean = CleanShm::begin();
    let worker = spawn();
    let held: ShmArray<f64, Ix1> = worker.call("fill", &Serde((1usize << 17, 7.0f64))).unwrap();
    for i in 0..1000 {
        let other: ShmArray<f64, Ix1> = worker
            .call("fill", &Serde((1usize << 17, i as f64)))
            .unwrap();
        assert_eq!(other.view()[0], i as f64);
    }
    assert!(
        held.view().iter().all(|&v| v == 7.0),
        "a held result was overwritten"
    );
    drop(held);

    // The same for results that are tuples of arrays.
    let (a, b): (ShmArray<f64, Ix1>, ShmArray<f64, Ix1>) = worker
        .call("fill_pair", &Serde((1usize << 17, 3.0f64)))
        .unwrap();
    for i in 0..300 {
        let (x, _): (ShmArray<f64, Ix1>, ShmArray<f64, Ix1>) = worker
            .call("fill_pair", &Serde((1usize << 17, i as f64)))
            .unwrap();
        assert_eq!(x.view()[0], i as f64);
    }
    assert!(
        a.view().iter().all(|&v| v == 3.0),
        "a held tuple member was overwritten"
    );
    assert!(
        b.view().iter().all(|&v| v == -3.0),
        "a held tuple member was overwritten"
    );
    drop((a, b));
    worker.shutdown();
    clean.end();
}

#[test]
fn arguments_a_handler_keeps_are_not_recycled_until_it_lets_go() {
    let clean = CleanShm::begin();
    let worker = spawn();
    let kept = Array1::from_elem(1 << 17, 5.0f64);
    worker.call::<_, ()>("keep", &kept).unwrap();
    // The worker views the block of `kept`; new arguments must go elsewhere.
    for i in 0..200 {
        let a = Array1::from_elem(1 << 17, i as f64);
        let Serde(sum): Serde<f64> = worker.call("sum", &a).unwrap();
        assert_eq!(sum, i as f64 * (1 << 17) as f64);
    }
    // A result that is the argument itself, sent back by reference, stays valid too.
    let echoed: ShmArray<f64, Ix1> = worker
        .call("identity", &Array1::from_elem(1 << 17, 9.0))
        .unwrap();
    for _ in 0..50 {
        let _: Serde<f64> = worker
            .call("sum", &Array1::from_elem(1 << 17, 1.0))
            .unwrap();
    }
    assert!(echoed.view().iter().all(|&v| v == 9.0));
    worker.call::<_, ()>("forget", &()).unwrap();
    drop(echoed);
    worker.shutdown();
    clean.end();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

#[test]
fn ten_thousand_calls_with_megabyte_payloads_keep_segments_and_memory_flat() {
    let clean = CleanShm::begin();
    let worker = spawn();
    let args = Array1::from_elem(1 << 17, 1.0f64);
    let call = || {
        let doubled: ShmArray<f64, IxDyn> = worker.call("double", &args).unwrap();
        assert_eq!(doubled.view()[[0]], 2.0);
    };
    for _ in 0..500 {
        call();
    }
    let segments = shm_core::list_segments().unwrap().len();
    let (parent_rss, worker_rss) = (rss_kib(std::process::id()), rss_kib(worker.pid()));
    for _ in 0..10_000 {
        call();
    }
    assert_eq!(
        shm_core::list_segments().unwrap().len(),
        segments,
        "segment count grew"
    );
    let parent_growth = rss_kib(std::process::id()).saturating_sub(parent_rss);
    let worker_growth = rss_kib(worker.pid()).saturating_sub(worker_rss);
    assert!(
        parent_growth < 16 << 10,
        "parent RSS grew by {parent_growth} KiB"
    );
    assert!(
        worker_growth < 16 << 10,
        "worker RSS grew by {worker_growth} KiB"
    );
    worker.shutdown();
    clean.end();
}

#[test]
fn large_serde_arguments_in_one_call_each_keep_their_block() {
    let clean = CleanShm::begin();
    let worker = spawn();
    for _ in 0..5 {
        let Serde(firsts): Serde<(Option<u8>, Option<u8>, usize, usize)> = worker
            .call(
                "firsts",
                &(Serde(vec![1u8; 2 << 20]), Serde(vec![2u8; 2 << 20])),
            )
            .unwrap();
        assert_eq!(
            firsts,
            (Some(1), Some(2), 2 << 20, 2 << 20),
            "the worker read another value than was sent"
        );
    }
    worker.shutdown();
    clean.end();
}

/// Time a call with a timeout may take beyond it here: generous, since the point is that it
/// returns at all (before the fix, the 65th call blocked until the worker died).
const TIMEOUT_SLACK: Duration = Duration::from_secs(2);

#[test]
fn call_timeout_bounds_the_call_even_when_the_request_ring_is_full() {
    let clean = CleanShm::begin();
    let worker = spawn();
    let busy = std::thread::scope(|scope| {
        let busy = scope.spawn(|| worker.call::<_, ()>("sleep", &Serde(3_000u64)));
        std::thread::sleep(Duration::from_millis(100));
        // More calls than the request ring has slots, while the handler is busy.
        for i in 0..100u64 {
            let timeout = Duration::from_millis(10);
            let start = Instant::now();
            let outcome = worker.call_timeout::<_, Serde<u64>>("echo", &Serde(i), timeout);
            assert!(
                matches!(outcome, Err(TransportError::Timeout { .. })),
                "call {i}: {outcome:?}"
            );
            assert!(
                start.elapsed() < timeout + TIMEOUT_SLACK,
                "call {i} with a {timeout:?} timeout took {:?}",
                start.elapsed()
            );
        }
        busy.join().unwrap()
    });
    busy.unwrap();
    // The late replies were drained and their blocks returned; the worker serves on.
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(5u64)).unwrap();
    assert_eq!(x, 5);
    worker.shm_pool().reclaim();
    assert_eq!(
        worker.shm_pool().stats().live_blocks,
        1,
        "only the channel is live"
    );
    worker.shutdown();
    clean.end();
}

#[test]
fn timeouts_racing_late_replies_from_eight_threads_neither_hang_nor_leak() {
    let clean = CleanShm::begin();
    let worker = spawn();
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let worker = &worker;
            scope.spawn(move || {
                let args = Array1::from_elem(20_000, t as f64);
                for i in 0..150u64 {
                    let timeout = Duration::from_micros(300 + (t * 131 + i * 71) % 1500);
                    let start = Instant::now();
                    let outcome: Result<Serde<f64>, _> = if i % 3 == 0 {
                        worker.call_timeout("sum", &args, timeout)
                    } else {
                        worker
                            .call_timeout::<_, Serde<u64>>("sleep_us", &Serde(800u64), timeout)
                            .map(|Serde(us)| Serde(us as f64))
                    };
                    match outcome {
                        Ok(Serde(v)) => assert!(v == 800.0 || v == t as f64 * 20_000.0),
                        Err(TransportError::Timeout { .. }) => {}
                        Err(err) => panic!("thread {t}, call {i}: {err}"),
                    }
                    assert!(start.elapsed() < timeout + TIMEOUT_SLACK);
                }
            });
        }
    });
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(9u64)).unwrap();
    assert_eq!(x, 9);
    worker.shm_pool().reclaim();
    assert_eq!(
        worker.shm_pool().stats().live_blocks,
        1,
        "argument blocks were left lent after their calls timed out"
    );
    worker.shutdown();
    clean.end();
}

#[test]
fn a_worker_whose_parent_is_killed_exits_and_cleans_up() {
    let clean = CleanShm::begin();
    let mut parent = ChildProcess::spawn(WORKER, &["--parent"]);
    let worker_pid: u32 = parent.read_line().parse().unwrap();
    assert_eq!(parent.read_line(), "ready");
    parent.child.kill().unwrap();
    parent.child.wait().unwrap();
    let start = Instant::now();
    while process_runs(worker_pid) && start.elapsed() < HANG_GUARD {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!process_runs(worker_pid), "the orphaned worker still runs");
    clean.end();
}

#[test]
fn dropping_a_pool_user_and_worker_leaves_nothing() {
    let clean = CleanShm::begin();
    let pool = ShmPool::new().unwrap();
    let worker = Worker::spawn(WorkerConfig::new(WORKER).with_pool(pool.clone())).unwrap();
    let a = Array1::from_elem(1 << 20, 1.0f64);
    let _: Serde<f64> = worker.call("sum", &a).unwrap();
    drop(worker);
    drop(pool);
    clean.end();
}

/// Runs `step` on another thread; fails the test if it takes longer than `bound` (rather than
/// hanging the test when a lifecycle step waits for ever).
fn within<T: Send + 'static>(
    what: &str,
    bound: Duration,
    step: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(step());
    });
    let value = rx
        .recv_timeout(bound)
        .unwrap_or_else(|_| panic!("{what} did not return within {bound:?}"));
    assert!(
        started.elapsed() < bound,
        "{what} took {:?}",
        started.elapsed()
    );
    value
}

#[test]
fn restart_shutdown_and_drop_end_quickly_while_a_child_of_the_worker_holds_its_stderr() {
    let clean = CleanShm::begin();
    let bound = Duration::from_secs(2);
    let sleeper = |worker: &Worker| -> u32 {
        let Serde(pid) = worker.call("spawn_sleeper", &()).unwrap();
        assert!(process_runs(pid));
        pid
    };
    let gone = |pid: u32| {
        let started = Instant::now();
        while process_runs(pid) {
            assert!(
                started.elapsed() < HANG_GUARD,
                "the worker's child {pid} outlived it"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    let worker = spawn();
    let child = sleeper(&worker);
    let worker = within("restart", bound, move || {
        worker.restart().unwrap();
        worker
    });
    gone(child);
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(5u64)).unwrap();
    assert_eq!(x, 5);
    worker.restart().unwrap();

    let child = sleeper(&worker);
    within("shutdown", bound, move || worker.shutdown());
    gone(child);

    let worker = spawn();
    let child = sleeper(&worker);
    within("drop", bound, move || drop(worker));
    gone(child);
    clean.end();
}
