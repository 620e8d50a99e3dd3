//! A hostile worker of the same user: it names a third process's memory, passes off files,
//! FIFOs, directories and unsealed memory as segments, tries to truncate what it sent and the
//! channel, rewrites what it sent through its own mappings, jams a ring. The parent must get
//! typed errors, never a crash or a hang, and leave `/dev/shm` as it found it.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use arrow::array::Array;
use ndarray::{Array1, Ix1};
use shm_arrow::ColumnFrame;
use shm_codec::{Serde, ShmArray};
use shm_core::ShmError;
use shm_tests::{ChildProcess, CleanShm};
use shm_transport::CalleeExt;
use shm_transport::{TransportError, Worker, WorkerConfig};

const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");
const CHILD: &str = env!("CARGO_BIN_EXE_shm-test-child");

/// Generous bound on calls that must not hang.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn spawn(untrusted: bool) -> Worker {
    Worker::spawn(WorkerConfig::new(WORKER).with_untrusted(untrusted)).unwrap()
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

/// Asks the worker, until the guard, for its report of sabotage — (tried, refused, rewritten)
/// — until `done` accepts it: until its delayed act has happened.
fn wait_for_sabotage(
    worker: &Worker,
    done: impl Fn((usize, usize, usize)) -> bool,
) -> (usize, usize, usize) {
    let started = Instant::now();
    loop {
        let Serde(report) = worker.call("sabotage_report", &()).unwrap();
        if done(report) {
            return report;
        }
        assert!(started.elapsed() < HANG_GUARD, "the worker never did it");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether this process maps a segment of this name.
fn mapped_here(name: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|line| line.contains(&name[1..]))
}

#[test]
fn a_worker_cannot_make_the_parent_map_a_third_process_memory() {
    let clean = CleanShm::begin();
    let (mut victim, _link) = ChildProcess::spawn_linked(CHILD, &["write", "100000", "5"], &[]);
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

#[test]
fn a_worker_cannot_make_the_parent_read_memory_the_parent_is_still_writing() {
    let clean = CleanShm::begin();
    // Blocks the parent is writing, in a slab (where the worker may know the segment from
    // another block) and in a segment of their own. The worker names each by its numbers, in
    // a reply to its first call.
    for size in [100, 1 << 20] {
        let worker = spawn(false);
        let mut block = worker.shm_pool().alloc(size).unwrap();
        block.as_mut_slice().fill(9);
        let forged = shm_core::ShmRef {
            name: block.name().to_owned(),
            offset: block.offset() as u64,
            size: block.capacity() as u64,
            content_size: block.len() as u64,
        };
        match worker.call::<_, Serde<Vec<u8>>>("foreign", &Serde(forged.to_hex())) {
            Err(TransportError::Codec(err)) => {
                let ShmError::NotFrozen { name, offset, .. } = shm_err(&err) else {
                    panic!("expected NotFrozen, got {err:?}");
                };
                assert_eq!((name.as_str(), *offset), (block.name(), forged.offset));
            }
            other => panic!("size {size}: expected NotFrozen, got {other:?}"),
        }
        // Still the parent's alone to write.
        block.as_mut_slice().fill(1);
        // Once frozen, the same numbers are a view of the frozen block, as the parent froze it.
        let frozen = block.freeze();
        let view = worker.shm_pool().attach(&forged).unwrap();
        assert!(view.as_slice().iter().all(|&b| b == 1));
        drop((view, frozen));
        let Serde(x): Serde<u64> = worker.call("echo", &Serde(7u64)).unwrap();
        assert_eq!(x, 7);
        worker.shutdown();
    }
    clean.end();
}

#[test]
fn a_worker_cannot_pass_off_files_fifos_directories_or_unsealed_memory_as_segments() {
    let clean = CleanShm::begin();
    for kind in ["file", "directory", "fifo", "unsealed", "unsent"] {
        let worker = std::sync::Arc::new(spawn(false));
        let calling = std::sync::Arc::clone(&worker);
        let started = Instant::now();
        let outcome = without_hanging(move || {
            calling
                .call::<_, Serde<Vec<u8>>>("forge_descriptor", &Serde((1u64, kind.to_owned())))
                .map(drop)
        });
        match (&outcome, kind) {
            (Err(TransportError::Codec(err)), "unsent") => {
                assert!(
                    matches!(shm_err(err), ShmError::NoDescriptor { .. }),
                    "{err:?}"
                )
            }
            (Err(TransportError::Codec(err)), _) => {
                assert!(
                    matches!(shm_err(err), ShmError::NotASegment { .. }),
                    "{kind}: {err:?}"
                )
            }
            _ => panic!("{kind}: expected a refusal, got {outcome:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{kind}");
        assert!(
            !mapped_here("/etc/passwd"),
            "{kind}: the parent mapped the file"
        );
        // The worker serves on.
        let Serde(x): Serde<u64> = worker.call("echo", &Serde(7u64)).unwrap();
        assert_eq!(x, 7);
        std::sync::Arc::into_inner(worker).unwrap().shutdown();
    }
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
    // The forged hello names the parent's own session.
    match Worker::spawn(WorkerConfig::new(WORKER).with_args(["--forge-hello"])) {
        Err(TransportError::Malformed { what }) => {
            assert!(what.contains("which is the parent's"), "{what}")
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
fn a_worker_cannot_truncate_a_result_it_sent_and_the_parent_reads_it_whole() {
    let clean = CleanShm::begin();
    let n = 1usize << 20;
    for untrusted in [false, true] {
        let worker = spawn(untrusted);
        let a: ShmArray<f64, Ix1> = worker.call("truncate_later", &Serde((n, 100u64))).unwrap();
        let (tried, refused, _) = wait_for_sabotage(&worker, |(tried, ..)| tried > 0);
        assert_eq!(
            refused, tried,
            "the kernel let the worker truncate its segment"
        );
        assert_eq!(a.view().sum(), 1.5 * n as f64);
        // A value read from the worker can be sent on, by reference or as a copy.
        let Serde(sum): Serde<f64> = worker.call("sum", &a).unwrap();
        assert_eq!(sum, 1.5 * n as f64);
        drop(a);
        worker.shutdown();
    }
    clean.end();
}

#[test]
fn no_worker_can_change_a_batch_or_bools_after_the_parent_checked_them() {
    let clean = CleanShm::begin();
    let rows = 100_000usize;
    for untrusted in [false, true] {
        let worker = spawn(untrusted);
        let ColumnFrame(batch) = worker.call("rewrite_later", &Serde((rows, 50u64))).unwrap();
        // Once the worker has overwritten its segments with 0xff: offsets of -1, bytes that
        // are not UTF-8. What the parent checked is a copy of its own (default mode: the
        // offsets and strings; untrusted: everything).
        wait_for_sabotage(&worker, |(.., rewritten)| rewritten > 0);
        let text = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .unwrap();
        assert_eq!(text.len(), rows);
        for i in 0..rows {
            assert_eq!(
                text.value(i),
                format!("s{i}"),
                "row {i}, untrusted {untrusted}"
            );
        }
        drop(batch);
        // A bool of a worker's block that became 0xff would be undefined behaviour to read.
        let before = wait_for_sabotage(&worker, |_| true).2;
        let bools: ShmArray<bool, Ix1> = worker
            .call("bools_rewrite_later", &Serde((rows, 50u64)))
            .unwrap();
        wait_for_sabotage(&worker, |(.., rewritten)| rewritten > before);
        assert!(
            bools
                .view()
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 3 == 0)),
            "untrusted {untrusted}"
        );
        drop(bools);
        worker.shutdown();
    }
    clean.end();
}

#[test]
fn a_worker_cannot_truncate_the_channel() {
    let clean = CleanShm::begin();
    let worker = spawn(false);
    let Serde((tried, refused)): Serde<(usize, usize)> =
        worker.call("truncate_channel", &()).unwrap();
    assert!(
        tried >= 1,
        "the worker found no descriptor of the channel to try"
    );
    assert_eq!(
        refused, tried,
        "the kernel let the worker truncate the channel"
    );
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
    let (worker, jammed) = spawn_watched();
    let jam = worker.call_timeout::<_, ()>("jam", &Serde(Jam::Impossible), timeout);
    assert!(
        matches!(jam, Err(TransportError::Timeout { .. })),
        "{jam:?}"
    );
    wait_until_jammed(&jammed);
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
    let (worker, jammed) = spawn_watched();
    let jam = worker.call_timeout::<_, ()>("jam", &Serde(Jam::Full), timeout);
    assert!(
        matches!(jam, Err(TransportError::Timeout { .. })),
        "{jam:?}"
    );
    wait_until_jammed(&jammed);
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

/// A worker whose stderr sets the flag when its `jam` handler says it has jammed the ring.
fn spawn_watched() -> (Worker, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let jammed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&jammed);
    let sink = shm_transport::StderrSink::Lines(std::sync::Arc::new(move |line: &str| {
        if line.ends_with("jammed") {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }));
    let worker = Worker::spawn(WorkerConfig::new(WORKER).with_stderr(sink)).unwrap();
    (worker, jammed)
}

/// Waits until the worker's `jam` handler has done its work, however slow the machine.
fn wait_until_jammed(jammed: &std::sync::atomic::AtomicBool) {
    let started = Instant::now();
    while !jammed.load(std::sync::atomic::Ordering::SeqCst) {
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
fn a_worker_that_jams_its_returns_fails_only_its_own_calls() {
    let clean = CleanShm::begin();
    let pool = shm_core::ShmPool::new().unwrap();
    let hostile = Worker::spawn(WorkerConfig::new(WORKER).with_pool(pool.clone())).unwrap();
    hostile.call::<_, ()>("jam_returns", &()).unwrap();
    let a = Array1::from_elem(100_000, 1.0f64);
    for _ in 0..3 {
        match hostile.call::<_, Serde<f64>>("sum", &a) {
            Err(TransportError::Malformed { what }) => {
                assert!(what.contains("returned blocks"), "{what}")
            }
            other => panic!("expected the jammed returns to be malformed, got {other:?}"),
        }
    }
    shm_tests::an_honest_neighbour_runs_on(WORKER, &pool);
    hostile.shutdown();
    drop(pool);
    clean.end();
}

#[test]
fn a_worker_that_never_gives_blocks_back_meets_its_loan_limit() {
    let clean = CleanShm::begin();
    let pool = shm_core::ShmPool::new().unwrap();
    let limit = 16u64 << 20;
    let hoarder = Worker::spawn(
        WorkerConfig::new(WORKER)
            .with_pool(pool.clone())
            .with_loan_limit(limit),
    )
    .unwrap();
    let a = Array1::from_elem(1 << 17, 1.0f64); // 1 MiB
    let mut kept = 0;
    let refused = loop {
        match hoarder.call::<_, ()>("keep", &a) {
            Ok(()) => kept += 1,
            Err(err) => break err,
        }
        assert!(kept <= 16, "kept {kept} MiB past a limit of 16 MiB");
    };
    match refused {
        TransportError::LoanLimit {
            on_loan,
            requested,
            limit: l,
        } => {
            assert_eq!(l, limit);
            assert!(
                on_loan + requested > limit && on_loan <= limit,
                "{refused:?}"
            );
        }
        other => panic!("expected LoanLimit, got {other:?}"),
    }
    assert!(kept >= 14, "only {kept} arrays kept before the limit");
    shm_tests::an_honest_neighbour_runs_on(WORKER, &pool);
    // Once it lets go, it is served again.
    hoarder.call::<_, ()>("forget", &()).unwrap();
    let Serde(sum): Serde<f64> = hoarder.call("sum", &a).unwrap();
    assert_eq!(sum, (1 << 17) as f64);
    hoarder.shutdown();
    drop(pool);
    clean.end();
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

#[test]
fn a_worker_cannot_make_the_parent_copy_a_spilled_frame_of_any_size() {
    let clean = CleanShm::begin();
    let worker = spawn(false);
    let resident = shm_tests::rss();
    // 300 MiB named as one spilled frame: refused before a byte is copied.
    let outcome = worker.call::<_, ()>("forge_spill", &Serde(300usize << 20));
    let grown = shm_tests::rss().saturating_sub(resident);
    eprintln!("forged spill of 300 MiB: {outcome:?}; the parent grew by {grown} bytes");
    assert!(grown < 64 << 20, "the parent grew by {grown} bytes");
    match outcome {
        Err(TransportError::Malformed { what }) => {
            assert!(what.contains("spilled frame of 314572800 bytes"), "{what}")
        }
        other => panic!("expected the spill to be refused, got {other:?}"),
    }
    // The worker serves on.
    let Serde(x): Serde<u64> = worker.call("echo", &Serde(7u64)).unwrap();
    assert_eq!(x, 7);
    worker.shutdown();
    clean.end();
}
