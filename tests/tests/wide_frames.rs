//! Frames of tens of thousands of columns, to a local and to a remote worker: the cost of a
//! call grows with the number of columns, not with its square.

use std::time::{Duration, Instant};

use arrow::array::{Array, Int32Array, RecordBatch};
use shm_arrow::ColumnFrame;
use shm_codec::Serde;
use shm_flight::{RemoteConfig, RemoteWorker};
use shm_tests::CleanShm;
use shm_tests::server::{Honest, ServerProcess};
use shm_transport::{Callee, CalleeExt, Worker, WorkerConfig};

const WORKER: &str = env!("CARGO_BIN_EXE_shm-test-worker");
const SERVER: &str = env!("CARGO_BIN_EXE_shm-flight-test-server");

/// Asserts that `got` holds every value `shm_tests::wide_batch(columns, rows)` does.
fn check(got: &RecordBatch, columns: usize, rows: usize) {
    assert_eq!((got.num_columns(), got.num_rows()), (columns, rows));
    for (c, column) in got.columns().iter().enumerate() {
        let values = column
            .as_any()
            .downcast_ref::<Int32Array>()
            .expect("Int32 columns");
        for r in 0..rows {
            assert_eq!(
                values.value(r),
                (c * rows + r) as i32,
                "column {c}, row {r}"
            );
        }
    }
}

/// The time of one round trip of a frame of `columns` columns through `callee`.
fn round_trip(callee: &dyn Callee, columns: usize, rows: usize) -> Duration {
    let batch = ColumnFrame(shm_tests::wide_batch(columns, rows));
    let started = Instant::now();
    let ColumnFrame(back): ColumnFrame =
        callee.call("batch", &batch).expect("the frame comes back");
    let took = started.elapsed();
    check(&back, columns, rows);
    took
}

/// The best of two round trips.
fn best_of_two(callee: &dyn Callee, columns: usize, rows: usize) -> Duration {
    round_trip(callee, columns, rows).min(round_trip(callee, columns, rows))
}

/// Ten times the columns may cost at most 25 times as much (the square would be 100 times):
/// a ratio within one run, so that a slow or loaded machine does not fail it. The previous
/// version took 4 s for 10,000 columns and over 4 minutes for 100,000.
fn assert_linear(name: &str, callee: &dyn Callee) {
    let narrow = best_of_two(callee, 10_000, 1);
    let wide = round_trip(callee, 100_000, 1);
    let ratio = wide.as_secs_f64() / narrow.as_secs_f64();
    eprintln!("{name}: 10,000 columns {narrow:?}, 100,000 columns {wide:?}: {ratio:.1}x");
    assert!(
        ratio < 25.0,
        "{name}: 100,000 columns took {ratio:.1} times as long as 10,000"
    );
    // Rows as well as columns: every value of 2,000 columns of 10,000 rows comes back.
    round_trip(callee, 2_000, 10_000);
    // A result in more segments of the worker's than the link between the two processes
    // queues at once (100 columns of 1.2 MB, a block each).
    let ColumnFrame(made): ColumnFrame = callee
        .call("wide", &Serde((100usize, 300_000usize)))
        .expect("the worker's frame comes");
    check(&made, 100, 300_000);
}

#[test]
fn wide_frames_cost_in_proportion_to_their_columns_locally() {
    let clean = CleanShm::begin();
    let local = Worker::spawn(WorkerConfig::new(WORKER)).expect("a worker");
    assert_linear("local", &local);
    // The worker gave back every block of the parent's frames, and the parent every one of
    // the worker's: its next calls are served.
    for _ in 0..3 {
        round_trip(&local, 1_000, 1);
    }
    local.shutdown();
    clean.end();
}

#[test]
fn wide_frames_cost_in_proportion_to_their_columns_remotely() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &[]);
    // An honest client's calls go on beside the wide frames (they wait for the handler, which
    // runs one call at a time).
    let honest = Honest::start(&server.url());
    let remote = RemoteWorker::new(RemoteConfig::new(server.url())).expect("a client");
    assert_linear("remote", &remote);
    honest.finish();
    drop(remote);
    server.stop();
    clean.end();
}
