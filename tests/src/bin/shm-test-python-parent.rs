//! A Rust parent of a Python worker (`crates/shm-py/tests/served.py`, served by the Python
//! module's `shm.serve`): started by the Python package's tests with the worker's command line
//! as its arguments, it makes typed calls, checks every result, and prints one line per check.
//! It exits non-zero at the first check that fails.

use std::time::Duration;

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, DictionaryArray, Float64Array, Int64Array, ListArray, RecordBatch,
    StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{Int32Type, Int64Type};
use ndarray::{Array1, Array2, Ix1, Ix2, ShapeBuilder};
use shm_arrow::ColumnFrame;
use shm_codec::{Serde, ShmArray, Value};
use shm_transport::{CalleeExt, RemoteErrorKind, TransportError, Worker, WorkerConfig};

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((program, args)) = argv.split_first() else {
        eprintln!("usage: shm-test-python-parent PYTHON WORKER.py");
        std::process::exit(2);
    };
    if let Err(err) = drive(WorkerConfig::new(program).with_args(args.iter().cloned())) {
        eprintln!("FAILED: {err}");
        std::process::exit(1);
    }
}

fn check(what: &str, ok: bool) -> Result<(), String> {
    if ok {
        println!("ok: {what}");
        Ok(())
    } else {
        Err(what.to_owned())
    }
}

fn remote_kind<T: std::fmt::Debug>(result: Result<T, TransportError>) -> Option<RemoteErrorKind> {
    match result {
        Err(TransportError::Remote(remote)) => Some(remote.kind),
        other => {
            println!("not a remote error: {other:?}");
            None
        }
    }
}

/// A batch of the types a Python worker sees most, nulls and a slice among them.
fn mixed_batch(rows: usize) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = rows as i64;
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(Int64Array::from_iter_values(0..n))),
        (
            "x",
            Arc::new(Float64Array::from_iter(
                (0..n).map(|i| (i % 5 != 0).then_some(i as f64 / 3.0)),
            )),
        ),
        (
            "name",
            Arc::new(StringArray::from_iter(
                (0..n).map(|i| (i % 7 != 0).then(|| format!("row {i} ☃"))),
            )),
        ),
        (
            "kind",
            Arc::new(DictionaryArray::<Int32Type>::from_iter(
                (0..n).map(|i| ["a", "b", "c"][i as usize % 3]),
            )),
        ),
        (
            "at",
            Arc::new(TimestampMicrosecondArray::from_iter_values(0..n).with_timezone("UTC")),
        ),
        (
            "flag",
            Arc::new(BooleanArray::from_iter(
                (0..n).map(|i| (i % 11 != 0).then_some(i % 2 == 0)),
            )),
        ),
        (
            "list",
            Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(
                (0..n).map(|i| (i % 4 != 0).then(|| vec![Some(i), None, Some(-i)])),
            )),
        ),
    ];
    Ok(RecordBatch::try_from_iter(columns)?.slice(3, rows - 10))
}

fn drive(config: WorkerConfig) -> Result<(), Box<dyn std::error::Error>> {
    let worker = Worker::spawn(config)?;

    let a = Array1::from_shape_fn(1_000_000, |i| i as f64);
    let Serde(sum): Serde<f64> = worker.call("sum", &a)?;
    check("a 1M-element array summed by Python", sum == a.sum())?;

    let m = Array2::from_shape_fn((300, 200).f(), |(i, j)| (i * 1000 + j) as f64);
    let doubled: ShmArray<f64, Ix2> = worker.call("double", &m)?;
    check(
        "an F-ordered array doubled in the worker's memory",
        doubled.view() == m.mapv(|x| 2.0 * x),
    )?;
    let block = doubled.block().ok_or("the result came inline")?;
    check(
        "the result is read in place from the worker's block",
        block.is_peer_memory(),
    )?;

    let Serde(text): Serde<String> = worker.call("describe", &Serde(("apples", 12u64)))?;
    check("a (String, u64) read by a schema", text == "apples x12")?;

    let x = Array1::from_shape_fn(5000, |i| i as f64);
    let scaled: ShmArray<f64, Ix1> = worker.call("scale", &(Serde(0.5f64), x.clone()))?;
    check(
        "a tuple of a float and an array",
        scaled.view() == x.mapv(|v| v * 0.5),
    )?;

    let value = Value::Map(vec![
        (
            Value::Str("nested".into()),
            Value::List(vec![Value::Int(-7), Value::Float(2.5), Value::Unit]),
        ),
        (Value::Int(3), Value::Bytes(vec![0, 1, 255])),
        (Value::Str("flag".into()), Value::Bool(false)),
    ]);
    let Serde(echoed): Serde<Value> = worker.call("echo_value", &Serde(value.clone()))?;
    check(
        "a self-describing Value through a Python dict",
        echoed == value,
    )?;

    let batch = mixed_batch(50_000)?;
    let ColumnFrame(back) = worker.call("echo", &ColumnFrame(batch.clone()))?;
    check("an Arrow batch through pyarrow and back", back == batch)?;
    let ColumnFrame(wide) = worker.call("echo", &ColumnFrame(shm_tests::wide_batch(2_000, 10)))?;
    check(
        "a batch of 2,000 columns",
        wide == shm_tests::wide_batch(2_000, 10),
    )?;

    let () = worker.call("nothing", &())?;
    check("a handler without a result", true)?;

    check(
        "a Python exception is a RemoteError of kind Handler",
        remote_kind(worker.call::<_, ()>("fail", &())) == Some(RemoteErrorKind::Handler),
    )?;
    check(
        "arguments Python cannot read are BadArguments",
        remote_kind(worker.call::<_, Serde<f64>>("half_f64", &Serde("no")))
            == Some(RemoteErrorKind::BadArguments),
    )?;
    check(
        "an unknown method is UnknownMethod",
        remote_kind(worker.call::<_, ()>("nope", &())) == Some(RemoteErrorKind::UnknownMethod),
    )?;
    let Serde(half): Serde<f64> = worker.call("half_f64", &Serde(3.0f64))?;
    check("the worker goes on after errors", half == 1.5)?;

    let timed_out =
        worker.call_timeout::<_, ()>("sleep", &Serde(30.0f64), Duration::from_millis(200));
    check(
        "a call past its timeout returns Timeout",
        matches!(timed_out, Err(TransportError::Timeout { .. })),
    )?;
    worker.restart()?;
    let first = worker.pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: a plain kill(2) of the worker this program started.
        unsafe { libc::kill(first as i32, libc::SIGKILL) };
    });
    let died = worker.call::<_, ()>("sleep", &Serde(30.0f64));
    killer.join().map_err(|_| "the killer thread panicked")?;
    check(
        "a Python worker killed during a call is WorkerDied",
        matches!(died, Err(TransportError::WorkerDied { .. })),
    )?;
    worker.restart()?;
    let Serde(pid): Serde<u32> = worker.call("pid", &())?;
    check("it restarts", pid == worker.pid() && pid != first)?;
    worker.shutdown();
    println!("all checks passed");
    Ok(())
}
