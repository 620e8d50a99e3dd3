//! `WorkerPool` across real processes: spreading calls, ordered `map`, `broadcast` writing a
//! block once, a dying worker failing only its own calls and coming back, and both kinds of
//! shutdown — with `/dev/shm` left as it was.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ndarray::Array1;
use shm_codec::Serde;
use shm_tests::CleanShm;
use shm_transport::CalleeExt;
use shm_transport::{ShutdownMode, TransportError, WorkerConfig, WorkerPool};

const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");

/// Polls `done` until it holds; fails the test after a generous bound.
fn wait_until(done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never happened"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pool(workers: usize) -> WorkerPool {
    WorkerPool::with_workers(WorkerConfig::new(WORKER), workers).unwrap()
}

#[test]
fn map_spreads_calls_over_the_workers_and_keeps_the_input_order() {
    let clean = CleanShm::begin();
    let workers = pool(3);
    assert_eq!(workers.len(), 3);
    let progress = Mutex::new(Vec::new());
    // Each call sleeps a little and returns its argument.
    let results = workers.map(
        "sleep_us",
        (0..30u64).map(|i| Serde(5_000 + i)),
        6,
        |done, started| progress.lock().unwrap().push((done, started)),
    );
    let values: Vec<u64> = results
        .into_iter()
        .map(|r| r.map(|Serde(v): Serde<u64>| v).unwrap())
        .collect();
    assert_eq!(values, (0..30).map(|i| 5_000 + i).collect::<Vec<_>>());
    let progress = progress.into_inner().unwrap();
    assert_eq!(progress.len(), 30);
    assert_eq!(progress.last(), Some(&(30, 30)));
    assert!(progress.windows(2).all(|w| w[0].0 < w[1].0));
    // Six calls at a time over three workers: more than one worker served them.
    let pids: Vec<u32> = workers
        .map("pid", (0..12).map(|_| ()), 6, |_, _| {})
        .into_iter()
        .map(|r| r.map(|Serde(pid): Serde<u32>| pid).unwrap())
        .collect();
    let distinct: BTreeSet<u32> = pids.into_iter().collect();
    assert!(
        distinct.len() > 1,
        "every call went to one worker: {distinct:?}"
    );
    assert_eq!(workers.in_flight(), vec![0, 0, 0]);
    drop(workers);
    clean.end();
}

#[test]
fn broadcast_writes_the_block_once_and_reaches_every_worker() {
    let clean = CleanShm::begin();
    let workers = pool(3);
    let x = Array1::from_elem(1 << 17, 0.5f64); // 1 MiB: a block of its own
    let created = workers.shm_pool().stats().segments_created;
    let sums: Vec<f64> = workers
        .broadcast("sum", &x)
        .unwrap()
        .into_iter()
        .map(|r| r.map(|Serde(s): Serde<f64>| s).unwrap())
        .collect();
    assert_eq!(sums, vec![0.5 * (1 << 17) as f64; 3]);
    assert_eq!(
        workers.shm_pool().stats().segments_created,
        created + 1,
        "one block for three workers"
    );
    drop(workers);
    clean.end();
}

#[test]
fn calls_while_a_slow_worker_restarts_end_by_their_timeout() {
    let clean = CleanShm::begin();
    // Each start of this worker takes 2 s.
    let config = WorkerConfig::new(WORKER).with_args(["--slow-start", "2000"]);
    let workers = WorkerPool::with_workers(config, 1).unwrap();
    let before = workers.pids();
    assert!(matches!(
        workers.call::<_, ()>("abort", &()),
        Err(TransportError::WorkerDied { .. })
    ));
    // The restart is under way in the background; no call waits for it.
    let started = Instant::now();
    let mut calls = 0;
    while workers.pids() == before && started.elapsed() < Duration::from_millis(1500) {
        let call = Instant::now();
        let result =
            workers.call_timeout::<_, Serde<u64>>("echo", &Serde(1u64), Duration::from_millis(100));
        assert!(
            call.elapsed() < Duration::from_millis(200),
            "a call with a 100 ms timeout took {:?} while its worker restarted",
            call.elapsed()
        );
        assert!(
            matches!(
                result,
                Err(TransportError::WorkerDied { .. } | TransportError::Timeout { .. })
            ),
            "{result:?}"
        );
        calls += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(calls >= 10, "only {calls} calls during the restart");
    // Then the new process serves.
    while workers.pids() == before {
        assert!(started.elapsed() < Duration::from_secs(30), "no restart");
        std::thread::sleep(Duration::from_millis(10));
    }
    let Serde(x): Serde<u64> = workers.call("echo", &Serde(9u64)).unwrap();
    assert_eq!(x, 9);
    assert!(workers.failed_restarts().is_empty());
    drop(workers);
    clean.end();
}

#[test]
fn a_dying_worker_fails_only_its_own_calls_and_comes_back() {
    let clean = CleanShm::begin();
    let workers = pool(2);
    let before = workers.pids();
    std::thread::scope(|scope| {
        // The first worker is busy for a while; the abort goes to the idle second one.
        let slow = scope.spawn(|| workers.call::<_, ()>("sleep", &Serde(400u64)));
        wait_until(|| workers.in_flight() == vec![1, 0]);
        match workers.call::<_, ()>("abort", &()) {
            Err(TransportError::WorkerDied { pid, .. }) => assert_eq!(Some(pid), before[1]),
            other => panic!("expected WorkerDied, got {other:?}"),
        }
        slow.join()
            .unwrap()
            .expect("the other worker's call is unaffected");
    });
    // Restarted in the background, with a new process.
    let started = Instant::now();
    while workers.pids()[1] == before[1] || workers.in_flight() != vec![0, 0] {
        assert!(started.elapsed() < Duration::from_secs(20), "no restart");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(workers.pids()[0], before[0]);
    let results: Vec<Result<Serde<u64>, _>> =
        workers.map("echo", (0..8u64).map(Serde), 4, |_, _| {});
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(workers.failed_restarts().is_empty());
    drop(workers);
    clean.end();
}

#[test]
fn shutdown_drains_or_cancels_the_calls_in_flight() {
    let clean = CleanShm::begin();
    let workers = pool(2);
    std::thread::scope(|scope| {
        let call = scope.spawn(|| workers.call::<_, ()>("sleep", &Serde(300u64)));
        wait_until(|| workers.in_flight().iter().sum::<usize>() == 1);
        workers.shutdown(ShutdownMode::Drain);
        call.join().unwrap().expect("a drained call finishes");
    });
    assert!(matches!(
        workers.call::<_, Serde<u64>>("echo", &Serde(1u64)),
        Err(TransportError::PoolShutdown { workers: 2 })
    ));
    drop(workers);

    let workers = pool(2);
    std::thread::scope(|scope| {
        let call = scope.spawn(|| workers.call::<_, ()>("sleep", &Serde(60_000u64)));
        wait_until(|| workers.in_flight().iter().sum::<usize>() == 1);
        let started = Instant::now();
        workers.shutdown(ShutdownMode::Cancel);
        assert!(matches!(
            call.join().unwrap(),
            Err(TransportError::WorkerDied { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(30));
    });
    drop(workers);
    clean.end();
}

#[test]
fn cancelling_the_calls_in_flight_kills_only_their_workers_and_the_pool_goes_on() {
    let clean = CleanShm::begin();
    let workers = pool(2);
    let pids = workers.pids();
    std::thread::scope(|scope| {
        let call = scope.spawn(|| workers.call::<_, ()>("sleep", &Serde(60_000u64)));
        wait_until(|| workers.in_flight().iter().sum::<usize>() == 1);
        let busy = workers.in_flight().iter().position(|&n| n == 1).unwrap();
        workers.cancel_in_flight();
        assert!(matches!(
            call.join().unwrap(),
            Err(TransportError::WorkerDied { .. })
        ));
        // The idle worker was left alone; the cancelled one comes back with a new process.
        let idle = 1 - busy;
        assert_eq!(workers.pids()[idle], pids[idle]);
        wait_until(|| {
            let now = workers.pids()[busy];
            now.is_some() && now != pids[busy]
        });
    });
    for i in 0..4u64 {
        let Serde(echoed): Serde<u64> = workers.call("echo", &Serde(i)).unwrap();
        assert_eq!(echoed, i);
    }
    drop(workers);
    clean.end();
}

#[test]
fn calls_from_many_threads_survive_workers_dying_under_them() {
    let clean = CleanShm::begin();
    let workers = pool(3);
    let until = Instant::now() + Duration::from_secs(2);
    let (ok, died) = std::thread::scope(|scope| {
        let callers: Vec<_> = (0..4u64)
            .map(|t| {
                let workers = &workers;
                scope.spawn(move || {
                    let (mut ok, mut died) = (0u64, 0u64);
                    let mut i = 0u64;
                    while Instant::now() < until {
                        i += 1;
                        let results = workers.map(
                            "echo",
                            (0..8).map(|k| Serde(t * 1_000_000 + i * 10 + k)),
                            3,
                            |_, _| {},
                        );
                        for (k, result) in results.into_iter().enumerate() {
                            match result {
                                Ok(Serde(v)) => {
                                    let v: u64 = v;
                                    assert_eq!(v, t * 1_000_000 + i * 10 + k as u64);
                                    ok += 1;
                                }
                                Err(TransportError::WorkerDied { .. }) => died += 1,
                                Err(other) => panic!("unexpected {other:?}"),
                            }
                        }
                    }
                    (ok, died)
                })
            })
            .collect();
        // Kill a worker every 100 ms, whichever the pool picks.
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
            let _ = workers.call::<_, ()>("abort", &());
        }
        callers
            .into_iter()
            .map(|c| c.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    });
    eprintln!("{ok} calls succeeded, {died} saw their worker die");
    assert!(
        ok > 100 && died > 0,
        "{ok} calls succeeded, {died} saw their worker die"
    );
    // Every worker comes back.
    let started = Instant::now();
    while workers.pids().iter().any(Option::is_none) || workers.in_flight() != vec![0, 0, 0] {
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    let results: Vec<shm_transport::Result<Serde<u64>>> =
        workers.map("echo", (0..30u64).map(Serde), 6, |_, _| {});
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(
        workers.failed_restarts().is_empty(),
        "{:?}",
        workers.failed_restarts()
    );
    drop(workers);
    clean.end();
}
