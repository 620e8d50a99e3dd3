//! The channel's half of docs/format.md, proven: `tests/python/worker.py`, a worker written from
//! that page alone in Python's standard library, is spawned, called from several threads,
//! answers an unknown method with the right error, and shuts down, leaving `/dev/shm` clean.

use shm_codec::Serde;
use shm_tests::{CleanShm, python};
use shm_transport::{RemoteErrorKind, TransportError, Worker, WorkerConfig};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/worker.py");

#[test]
fn a_worker_written_in_python_from_the_format_page_serves_calls() {
    let Some(python) = python() else { return };
    let clean = CleanShm::begin();
    let worker = Worker::spawn(WorkerConfig::new(python).args([SCRIPT])).unwrap();
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
