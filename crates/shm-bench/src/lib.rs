//! The benchmarks of shm, as binaries of their own so that no library crate carries them:
//! `cargo xtask bench` runs `core_bench`, `codec_bench`, `arrow_bench`, `transport_bench`,
//! `channel_bench`, `workers_bench` and `flight_bench`, each of which writes a section of
//! `target/bench/report.md`. This library is what they and the demo (`examples/demo.rs`,
//! which `cargo xtask demo` runs) share: timing, formatting, the mixed Arrow batch they send,
//! and where reports go.

pub mod peers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, BooleanArray, DictionaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::buffer::Buffer;
use arrow::datatypes::Int32Type;

/// The benchmarks' error: anything, with its message.
pub type Error = Box<dyn std::error::Error>;

/// The categories of the batch's dictionary column.
pub const KINDS: [&str; 5] = ["alpha", "beta", "gamma", "delta", "epsilon"];

/// Times `runs` runs after `warmup` more; the times come back sorted.
pub fn sample(
    warmup: usize,
    runs: usize,
    mut run: impl FnMut() -> Result<(), Error>,
) -> Result<Vec<Duration>, Error> {
    for _ in 0..warmup {
        run()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times)
}

/// Runs every method once per round, `rounds` times, in the same order each round; each
/// method returns the times it took (one run, or a block of calls). A machine whose speed drifts
/// during the run (a shared VM's does) slows every method alike, where timing one method after
/// another would compare them under different conditions. Each method's times come back sorted,
/// in the order of `methods`.
pub fn in_rounds(
    rounds: usize,
    methods: &mut [&mut dyn FnMut() -> Result<Vec<Duration>, Error>],
) -> Result<Vec<Vec<Duration>>, Error> {
    let mut times = vec![Vec::new(); methods.len()];
    for _ in 0..rounds {
        for (method, times) in methods.iter_mut().zip(&mut times) {
            times.extend(method()?);
        }
    }
    for times in &mut times {
        times.sort();
    }
    Ok(times)
}

/// The median of runs that time themselves (to leave set-up and tear-down out).
pub fn median_of(
    runs: usize,
    mut run: impl FnMut() -> Result<Duration, Error>,
) -> Result<Duration, Error> {
    let mut times = (0..runs).map(|_| run()).collect::<Result<Vec<_>, _>>()?;
    times.sort();
    Ok(times[runs / 2])
}

/// The median of sorted times.
pub fn median(times: &[Duration]) -> Duration {
    times[times.len() / 2]
}

/// Gigabytes per second.
pub fn gbs(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

/// A size in binary units: `1 GiB`, `64 MiB`, `1.50 GiB`.
pub fn human(bytes: usize) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift {
            let value = bytes as f64 / (1u64 << shift) as f64;
            return if value.fract() == 0.0 {
                format!("{value:.0} {unit}")
            } else {
                format!("{value:.2} {unit}")
            };
        }
    }
    format!("{bytes} B")
}

/// A duration in µs or ms.
pub fn ms(time: Duration) -> String {
    let ms = time.as_secs_f64() * 1e3;
    if ms < 1.0 {
        format!("{:.1} µs", ms * 1e3)
    } else {
        format!("{ms:.1} ms")
    }
}

/// A batch of six mixed columns: f64, i64, utf8, dictionary, timestamp with time zone, and
/// bool with nulls.
pub fn mixed_batch(rows: usize) -> Result<RecordBatch, Error> {
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "f64",
            Arc::new(Float64Array::from_iter_values(
                (0..rows).map(|i| (i % 100) as f64),
            )),
        ),
        (
            "i64",
            Arc::new(Int64Array::from_iter_values(
                (0..rows).map(|i| i as i64 * 3),
            )),
        ),
        (
            "utf8",
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("row-{i:07}")),
            )),
        ),
        (
            "dict",
            Arc::new(
                (0..rows)
                    .map(|i| KINDS[i % KINDS.len()])
                    .collect::<DictionaryArray<Int32Type>>(),
            ),
        ),
        (
            "ts_tz",
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    (0..rows).map(|i| i as i64 * 1_000_000),
                )
                .with_timezone("Europe/Zurich"),
            ),
        ),
        (
            "bool",
            Arc::new(
                (0..rows)
                    .map(|i| (i % 11 != 0).then_some(i % 2 == 0))
                    .collect::<BooleanArray>(),
            ),
        ),
    ];
    Ok(RecordBatch::try_from_iter(columns)?)
}

/// Every buffer of a batch: what an encoder must copy.
pub fn buffers(batch: &RecordBatch) -> Vec<Buffer> {
    fn collect(data: &arrow::array::ArrayData, into: &mut Vec<Buffer>) {
        into.extend(data.nulls().map(|n| n.buffer().clone()));
        into.extend(data.buffers().iter().cloned());
        data.child_data().iter().for_each(|c| collect(c, into));
    }
    let mut all = Vec::new();
    batch
        .columns()
        .iter()
        .for_each(|c| collect(&c.to_data(), &mut all));
    all
}

/// Writes one section of the benchmark report into `target/bench/`, and prints it.
pub fn write_section(name: &str, text: &str) -> Result<(), Error> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), text)?;
    print!("{text}");
    Ok(())
}
