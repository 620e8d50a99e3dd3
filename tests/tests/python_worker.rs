//! The channel's half of docs/format.md, proven: `tests/python/worker.py`, a worker written from
//! that page alone in Python's standard library, is spawned, called from several threads,
//! answers an unknown method with the right error, sends replies in lent blocks of its own
//! sealed segment, and shuts down, leaving `/dev/shm` untouched. It never takes back what is
//! returned to it, which the parent bounds: its calls fail, its neighbours' do not.

use shm_codec::Serde;
use shm_tests::{CleanShm, an_honest_neighbour_runs_on, python, rss};
use shm_transport::{CalleeExt, RemoteErrorKind, TransportError, Worker, WorkerConfig};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/worker.py");
const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");

#[test]
fn a_worker_written_in_python_from_the_format_page_serves_calls() {
    let Some(python) = python() else { return };
    let clean = CleanShm::begin();
    let worker = Worker::spawn(WorkerConfig::new(python).with_args([SCRIPT])).unwrap();
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(42u64)).unwrap();
    assert_eq!(x, 42);
    let Serde(sum): Serde<u64> = worker.call("add", &Serde((2u64, 300u64))).unwrap();
    assert_eq!(sum, 302);
    let Serde(loud): Serde<String> = worker.call("shout", &Serde("quiet".to_owned())).unwrap();
    assert_eq!(loud, "QUIET");
    match worker.call::<_, Serde<u64>>("nope", &Serde(1u64)) {
        Err(TransportError::Remote(remote)) => {
            assert_eq!(remote.kind, RemoteErrorKind::UnknownMethod);
            assert_eq!(remote.method, "nope");
        }
        other => panic!("expected UnknownMethod, got {other:?}"),
    }
    // Replies find their calls when several threads call at once.
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let worker = &worker;
            scope.spawn(move || {
                for i in 0..100u64 {
                    let v = t * 1000 + i;
                    let Serde(back): Serde<u64> = worker.call("echo", &Serde(v)).unwrap();
                    assert_eq!(back, v);
                }
            });
        }
    });
    worker.shutdown();
    clean.end();
}

#[test]
fn a_worker_that_never_drains_what_is_returned_to_it_fails_only_its_own_calls() {
    let Some(python) = python() else { return };
    let clean = CleanShm::begin();
    let pool = shm_core::ShmPool::new().unwrap();
    let worker = Worker::spawn(
        WorkerConfig::new(python)
            .with_args([SCRIPT])
            .with_pool(pool.clone()),
    )
    .unwrap();
    // Each reply comes in a lent block, which the parent returns once it has read it; the
    // worker never takes the returns, so they wait in the parent, up to a bound.
    let resident = rss();
    let mut calls = 0u64;
    let refused = loop {
        match worker.call::<_, Serde<String>>("spill", &Serde(5_000u64)) {
            Ok(Serde(text)) => assert!(text.len() == 5_000 && text.bytes().all(|b| b == b'z')),
            Err(err) => break err,
        }
        calls += 1;
        assert!(calls < 100_000, "the parent queued returns without end");
    };
    match refused {
        TransportError::Malformed { what } => {
            assert!(what.contains("takes no blocks back"), "{what}")
        }
        other => panic!("expected the worker's calls to fail, got {other:?}"),
    }
    // Not before the ring of returns (4,096 ids) was full.
    assert!(calls > 4_096, "refused after {calls} calls");
    let grown = rss().saturating_sub(resident);
    assert!(grown < 32 << 20, "the parent grew by {grown} bytes");
    an_honest_neighbour_runs_on(WORKER, &pool);
    worker.shutdown();
    drop(pool);
    clean.end();
}
