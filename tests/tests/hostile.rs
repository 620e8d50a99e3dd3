//! A hostile worker of the same user: it names a third process's memory, truncates or rewrites
//! what it sent, truncates the channel, jams a ring. The parent must get typed errors (or, for
//! memory rewritten in place, the values it would read from a trusted worker's mistake: zeros),
//! never a crash or a hang, and leave `/dev/shm` as it found it.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use arrow::array::Array;
use ndarray::{Array1, Ix1};
use shm_arrow::ColumnFrame;
use shm_codec::{Serde, ShmArray};
use shm_core::ShmError;
use shm_tests::{ChildProcess, CleanShm};
use shm_transport::{TransportError, Worker, WorkerConfig};

const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");
const CHILD: &str = env!("CARGO_BIN_EXE_shm-test-child");

/// Generous bound on calls that must not hang.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn spawn(untrusted: bool) -> Worker {
    Worker::spawn(WorkerConfig::new(WORKER).untrusted(untrusted)).unwrap()
}

/// Runs `f` on another thread and fails the test if it does not return within the guard.
fn without_hanging<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG_GUARD)
        .expect("the call hung past the guard")
}

/// Waits (up to the guard) until every segment of sessions other than `ours` — the worker's —
/// that `pick` selects by length passes `done`: until its delayed act of sabotage has happened.
fn wait_for_worker_segments(
    ours: shm_core::SessionId,
    pick: impl Fn(u64) -> bool,
    done: impl Fn(&str) -> bool,
) {
    let started = Instant::now();
    loop {
        let sessions = shm_core::list_sessions().unwrap();
        let theirs: Vec<String> = sessions
            .iter()
            .filter(|s| s.session != ours)
            .flat_map(|s| &s.segments)
            .filter(|s| pick(s.len))
            .map(|s| format!("/dev/shm{}", s.name))
            .collect();
        if !theirs.is_empty() && theirs.iter().all(|path| done(path)) {
            return;
        }
        assert!(started.elapsed() < HANG_GUARD, "the worker never did it");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the file at `path` is empty (truncated).
fn truncated(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == 0)
}

/// Whether the file at `path` starts with a 0xff byte (rewritten).
fn rewritten(path: &str) -> bool {
    use std::io::Read;
    let mut first = [0u8; 1];
    std::fs::File::open(path)
        .is_ok_and(|mut f| f.read_exact(&mut first).is_ok() && first[0] == 0xff)
}

/// Whether this process maps a segment of this name.
fn mapped_here(name: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|line| line.ends_with(name))
}

#[test]
fn a_worker_cannot_make_the_parent_map_a_third_process_memory() {
    let clean = CleanShm::begin();
    let mut victim = ChildProcess::spawn(CHILD, &["write", "100000", "5"]);
    let secret = victim.read_line();
    let name = shm_core::ShmRef::from_hex(&secret).unwrap().name;
    let worker = spawn(false);
    match worker.call::<_, Serde<Vec<u8>>>("foreign", &Serde(secret)) {
        Err(TransportError::Codec(err)) => {
            let ShmError::ForeignSegment { name: named, .. } = shm_err(&err) else {
                panic!("expected ForeignSegment, got {err:?}");
            };
            assert_eq!(named, &name);
        }
        other => panic!("expected ForeignSegment, got {other:?}"),
    }
    assert!(!mapped_here(&name), "the parent mapped {name}");
    // The worker serves on.
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(7u64)).unwrap();
    assert_eq!(x, 7);
    worker.shutdown();
    victim.finish();
    clean.end();
}

fn shm_err(err: &shm_codec::CodecError) -> &ShmError {
    match err {
        shm_codec::CodecError::Shm(err) => err,
        other => panic!("expected an shm error, got {other:?}"),
    }
}

#[test]
fn a_worker_cannot_claim_another_session_at_the_handshake() {
    let clean = CleanShm::begin();
    // The forged hello names the parent's own session: its lock holds the parent's pid.
    match Worker::spawn(WorkerConfig::new(WORKER).args(["--forge-hello"])) {
        Err(TransportError::Malformed { what }) => {
            assert!(what.contains("says it is pid"), "{what}")
        }
        other => panic!("expected the hello to be refused, got {other:?}"),
    }
    clean.end();
}

#[test]
fn a_result_passed_from_one_worker_to_another_is_copied_not_refused() {
    let clean = CleanShm::begin();
    let (first, second) = (spawn(false), spawn(false));
    let a: ShmArray<f64, Ix1> = first.call("fill", &Serde((1usize << 17, 2.5f64))).unwrap();
    let Serde(sum): Serde<f64> = second.call("sum", &a).unwrap();
    assert_eq!(sum, 2.5 * (1 << 17) as f64);
    // And back to its own worker, by reference.
    let b: ShmArray<f64, Ix1> = first.call("identity", &a).unwrap();
    assert_eq!(b.view(), a.view());
    drop((a, b));
    first.shutdown();
    second.shutdown();
    clean.end();
}

#[test]
fn a_result_truncated_after_the_reply_reads_as_zeros_and_the_parent_lives_on() {
    let clean = CleanShm::begin();
    let n = 1usize << 20;
    let worker = spawn(false);
    let a: ShmArray<f64, Ix1> = worker.call("truncate_later", &Serde((n, 100u64))).unwrap();
    // The result's segment, before the cut or after it.
    let result = |len: u64| len >= (n * 8) as u64 || len == 0;
    wait_for_worker_segments(worker.pool().session(), result, truncated);
    // Without the truncation guard, this read is a SIGBUS.
    assert_eq!(a.view().sum(), 0.0, "past the cut, zeros");
    drop(a);
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(9u64)).unwrap();
    assert_eq!(x, 9);
    worker.shutdown();

    // Read from a private copy, the same result keeps the values the worker sent.
    let worker = spawn(true);
    let a: ShmArray<f64, Ix1> = worker.call("truncate_later", &Serde((n, 100u64))).unwrap();
    // The result's segment, before the cut or after it.
    let result = |len: u64| len >= (n * 8) as u64 || len == 0;
    wait_for_worker_segments(worker.pool().session(), result, truncated);
    assert_eq!(a.view().sum(), 1.5 * n as f64);
    // A value read from a private copy can be sent on: it is copied into a block.
    let Serde(sum): Serde<f64> = worker.call("sum", &a).unwrap();
    assert_eq!(sum, 1.5 * n as f64);
    drop(a);
    worker.shutdown();
    clean.end();
}

#[test]
fn an_untrusted_worker_cannot_change_a_batch_after_the_parent_validated_it() {
    let clean = CleanShm::begin();
    let rows = 100_000usize;
    let worker = spawn(true);
    let ColumnFrame(batch) = worker.call("rewrite_later", &Serde((rows, 50u64))).unwrap();
    // Once the worker has overwritten every byte of its segments with 0xff: offsets of -1.
    let columns = |len: u64| len >= (rows * 4) as u64;
    wait_for_worker_segments(worker.pool().session(), columns, rewritten);
    let text = batch
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .unwrap();
    assert_eq!(text.len(), rows);
    for i in 0..rows {
        assert_eq!(text.value(i), format!("s{i}"), "row {i}");
    }
    drop(batch);
    worker.shutdown();
    clean.end();
}

#[test]
fn a_truncated_channel_fails_calls_instead_of_killing_or_hanging_the_parent() {
    let clean = CleanShm::begin();
    let worker = std::sync::Arc::new(std::sync::Mutex::new(spawn(false)));
    let calling = std::sync::Arc::clone(&worker);
    let outcome = without_hanging(move || {
        let worker = calling.lock().unwrap();
        let first = worker.call::<_, ()>("truncate_channel", &());
        let second = worker.call::<_, Serde<u64>>("echo", &Serde(1u64));
        (first.map(drop), second.map(drop))
    });
    for result in [outcome.0, outcome.1] {
        match result {
            Err(TransportError::Shm(ShmError::Truncated { .. }))
            | Err(TransportError::WorkerDied { .. }) => {}
            other => panic!("expected Truncated, got {other:?}"),
        }
    }
    let mut worker = std::sync::Arc::into_inner(worker)
        .unwrap()
        .into_inner()
        .unwrap();
    worker.restart().unwrap();
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(3u64)).unwrap();
    assert_eq!(x, 3);
    worker.shutdown();
    clean.end();
}

#[test]
fn a_jammed_request_ring_ends_calls_at_their_deadline_or_at_once() {
    let clean = CleanShm::begin();
    let timeout = Duration::from_millis(300);
    // Impossible positions: every later call fails at once, with or without a timeout.
    let worker = spawn(false);
    let jam = worker.call_timeout::<_, ()>("jam", &Serde(Jam::Impossible), timeout);
    assert!(
        matches!(jam, Err(TransportError::Timeout { .. })),
        "{jam:?}"
    );
    wait_for_calls_ring(&worker, |waiting| waiting > 64);
    let worker = std::sync::Arc::new(worker);
    let calling = std::sync::Arc::clone(&worker);
    let echo = without_hanging(move || calling.call::<_, Serde<u64>>("echo", &Serde(1u64)));
    match echo {
        Err(TransportError::Malformed { what }) => {
            assert!(what.contains("ring positions"), "{what}")
        }
        other => panic!("expected a malformed ring, got {other:?}"),
    }
    drop(worker);

    // A ring that looks full for ever is a worker that does not read: the deadline ends it.
    let worker = spawn(false);
    let jam = worker.call_timeout::<_, ()>("jam", &Serde(Jam::Full), timeout);
    assert!(
        matches!(jam, Err(TransportError::Timeout { .. })),
        "{jam:?}"
    );
    wait_for_calls_ring(&worker, |waiting| waiting == 64);
    let started = Instant::now();
    let echo = worker.call_timeout::<_, Serde<u64>>("echo", &Serde(1u64), timeout);
    assert!(
        matches!(echo, Err(TransportError::Timeout { .. })),
        "{echo:?}"
    );
    assert!(started.elapsed() < HANG_GUARD);
    drop(worker);
    clean.end();
}

/// Waits until the worker's ring of calls holds a number of frames that `jammed` accepts, as
/// the channel's control area shows it: until the `jam` handler has done its work, however slow
/// the machine.
fn wait_for_calls_ring(worker: &Worker, jammed: impl Fn(u64) -> bool) {
    let started = Instant::now();
    loop {
        let sessions = shm_core::list_sessions().unwrap();
        let state = sessions
            .iter()
            .filter(|s| s.session == worker.pool().session())
            .flat_map(|s| &s.segments)
            .find_map(|s| {
                let mut control = vec![0u8; shm_transport::CONTROL_LEN];
                let file = std::fs::File::open(format!("/dev/shm{}", s.name)).ok()?;
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut control, 0).ok()?;
                shm_transport::ChannelState::parse(&control)
            });
        if state.is_some_and(|state| jammed(state.frame_rings[0].occupied())) {
            return;
        }
        assert!(started.elapsed() < HANG_GUARD, "the ring was never jammed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The test worker's `Jam` (same serde form).
#[derive(serde::Serialize)]
enum Jam {
    #[allow(dead_code)]
    Full,
    Impossible,
}

#[test]
fn untrusted_workers_round_trip_every_value() {
    let clean = CleanShm::begin();
    let worker = spawn(true);
    let x = Array1::from_iter((0..100_000).map(f64::from));
    let doubled: ShmArray<f64, ndarray::IxDyn> = worker.call("double", &x).unwrap();
    assert!(doubled.view().iter().zip(&x).all(|(d, x)| *d == 2.0 * x));
    let (a, b): (ShmArray<f64, Ix1>, ShmArray<f64, Ix1>) = worker
        .call("fill_pair", &Serde((50_000usize, 4.0f64)))
        .unwrap();
    assert!(a.view().iter().all(|&v| v == 4.0) && b.view().iter().all(|&v| v == -4.0));
    drop((doubled, a, b));
    worker.shutdown();
    clean.end();
}
