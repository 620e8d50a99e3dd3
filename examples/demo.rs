//! The main job: a parent process and a worker process moving real data through shared memory.
//!
//! The parent spawns a worker (this same executable), sends it a 1 GiB f64 array produced in
//! shared memory (zero-copy) and one from the heap (one copy), gets a computed 1 GiB array back,
//! then sends a 10-million-row Arrow batch of mixed types, from the heap and then from shared
//! memory, and gets a summary frame back. It prints what each step moved and how fast, checks
//! every result, and leaves `/dev/shm` as it found it.
//!
//! `cargo xtask demo [--size 256MiB]` runs it in release mode; `--size` scales the array, and
//! the batch with it (10 million rows per GiB).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{Float64Type, Int32Type, Int64Type};
use ndarray::Ix1;
use shm_arrow::ColumnFrame;
use shm_codec::{Decoder, Encoder, Serde, ShmArray, ShmArrayMut};
use shm_transport::{Router, Worker, WorkerConfig, is_worker, serve};

use shm_bench::{Error, KINDS, buffers, human, mixed_batch};
use shm_transport::CalleeExt;

fn main() {
    let result = if is_worker() {
        serve(router()).map_err(Error::from)
    } else {
        parent()
    };
    if let Err(err) = result {
        eprintln!("demo failed: {err}");
        std::process::exit(1);
    }
}

/// The worker's handlers.
fn router() -> Router {
    Router::new()
        .handle("len", |x: ShmArray<f64, Ix1>, _| {
            Ok::<_, String>(Serde(x.len()))
        })
        .handle("stats", |x: ShmArray<f64, Ix1>, _| {
            let view = x.view();
            let (mut sum, mut min, mut max) = (0.0, f64::INFINITY, f64::NEG_INFINITY);
            for &v in view.iter() {
                sum += v;
                min = min.min(v);
                max = max.max(v);
            }
            Ok::<_, String>(Serde((sum, min, max)))
        })
        .handle(
            "affine",
            |(x, Serde((a, b))): (ShmArray<f64, Ix1>, Serde<(f64, f64)>), ctx| {
                let mut y = ShmArrayMut::<f64, Ix1>::zeros(ctx.pool(), x.len())
                    .map_err(|e| e.to_string())?;
                y.view_mut().zip_mut_with(&x.view(), |y, x| *y = a * x + b);
                Ok::<_, String>(y.freeze())
            },
        )
        .handle("summarize", |ColumnFrame(batch): ColumnFrame, _| {
            summarize(&batch).map(ColumnFrame)
        })
}

/// Rows, mean value and flagged rows per kind: a group-by over the dictionary column.
fn summarize(batch: &RecordBatch) -> Result<RecordBatch, String> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or(format!("no column {name}"))
    };
    let kind = column("dict")?.as_dictionary::<Int32Type>();
    let names = kind.values().as_string::<i32>();
    let value = column("f64")?.as_primitive::<Float64Type>();
    let flag = column("bool")?.as_boolean();
    let mut rows = vec![0i64; names.len()];
    let mut sums = vec![0.0f64; names.len()];
    let mut flagged = vec![0i64; names.len()];
    for (i, key) in kind.keys().values().iter().enumerate() {
        let k = *key as usize;
        rows[k] += 1;
        sums[k] += value.value(i);
        flagged[k] += i64::from(flag.is_valid(i) && flag.value(i));
    }
    let means: Vec<f64> = sums
        .iter()
        .zip(&rows)
        .map(|(s, &n)| s / n.max(1) as f64)
        .collect();
    RecordBatch::try_from_iter([
        // The kinds are copied: a result that pointed into the arguments would keep the
        // caller's blocks from being recycled until the caller drops the result.
        (
            "kind",
            Arc::new(StringArray::from_iter(names.iter())) as ArrayRef,
        ),
        ("rows", Arc::new(Int64Array::from(rows)) as ArrayRef),
        (
            "mean_value",
            Arc::new(Float64Array::from(means)) as ArrayRef,
        ),
        ("flagged", Arc::new(Int64Array::from(flagged)) as ArrayRef),
    ])
    .map_err(|e| e.to_string())
}

struct Report {
    rows: Vec<(String, usize, Duration)>,
}

impl Report {
    /// Runs one step, with a progress line, and records what it moved and how long it took.
    fn step<T>(
        &mut self,
        what: &str,
        bytes: usize,
        run: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        eprint!("... {what}");
        let _ = std::io::stderr().flush();
        let start = Instant::now();
        let value = run()?;
        let time = start.elapsed();
        eprintln!(" ({:.1} ms)", time.as_secs_f64() * 1e3);
        self.rows.push((what.to_owned(), bytes, time));
        Ok(value)
    }

    fn print(&self) {
        println!("| step | bytes | time | GB/s |");
        println!("| --- | ---: | ---: | ---: |");
        for (what, bytes, time) in &self.rows {
            let rate = if *bytes > 0 {
                format!("{:.1}", *bytes as f64 / time.as_secs_f64() / 1e9)
            } else {
                String::new()
            };
            let size = if *bytes > 0 {
                human(*bytes)
            } else {
                String::new()
            };
            let time = if time.as_secs_f64() < 1e-3 {
                format!("{:.1} µs", time.as_secs_f64() * 1e6)
            } else {
                format!("{:.1} ms", time.as_secs_f64() * 1e3)
            };
            println!("| {what} | {size} | {time} | {rate} |");
        }
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), Error> {
    if ok { Ok(()) } else { Err(what().into()) }
}

fn parent() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = match args.as_slice() {
        [] => 1 << 30,
        [flag, value] if flag == "--size" => parse_size(value)?,
        _ => return Err("usage: demo [--size BYTES|KiB|MiB|GiB]".into()),
    };
    let n = (size / 8).max(1);
    let bytes = n * 8;
    let rows = ((bytes as u128 * 10_000_000) >> 30).max(1000) as usize;
    let before = segment_names()?;
    let mut report = Report { rows: Vec::new() };
    {
        let worker = report.step("spawn the worker and shake hands", 0, || {
            Ok(Worker::spawn(WorkerConfig::current_exe()?)?)
        })?;
        let expected_sum = |len: usize| {
            let full = (len / 1000) as f64 * (999.0 * 1000.0 / 2.0);
            let rest = (len % 1000) as f64;
            full + rest * (rest - 1.0) / 2.0
        };

        let shared = report.step(
            "parent: produce the f64 array in shared memory",
            bytes,
            || {
                let mut x = ShmArrayMut::<f64, Ix1>::zeros(worker.shm_pool(), n)?;
                for (i, v) in x.view_mut().iter_mut().enumerate() {
                    *v = (i % 1000) as f64;
                }
                Ok(x.freeze())
            },
        )?;
        let len = report.step(
            "send it to the worker (zero-copy), which reads its length",
            0,
            || {
                let Serde(len): Serde<usize> = worker.call("len", &shared)?;
                Ok(len)
            },
        )?;
        check(len == n, || format!("the worker saw {len} values, not {n}"))?;
        let (sum, min, max) = report.step(
            "worker: stats of the shared array (zero-copy)",
            bytes,
            || {
                let Serde(stats): Serde<(f64, f64, f64)> = worker.call("stats", &shared)?;
                Ok(stats)
            },
        )?;
        let top = (n.min(1000) - 1) as f64;
        check(sum == expected_sum(n) && min == 0.0 && max == top, || {
            format!("stats of the shared array: {sum} {min} {max}")
        })?;

        let heap = ndarray::Array1::from_shape_fn(n, |i| (i % 1000) as f64);
        for what in [
            "worker: stats of a heap array (one copy, into a fresh block)",
            "worker: stats of a heap array (one copy, into a recycled block)",
        ] {
            let (sum, ..) = report.step(what, bytes, || {
                let Serde(stats): Serde<(f64, f64, f64)> = worker.call("stats", &heap)?;
                Ok(stats)
            })?;
            check(sum == expected_sum(n), || {
                format!("stats of the heap array: {sum}")
            })?;
        }
        drop(heap);

        let y: ShmArray<f64, Ix1> = report.step(
            "worker: y = 2x + 1 into its shared memory",
            2 * bytes,
            || Ok(worker.call("affine", &(&shared, Serde((2.0, 1.0))))?),
        )?;
        let y_sum = report.step("parent: read the result in place", bytes, || {
            Ok(y.view().sum())
        })?;
        check(y_sum == 2.0 * expected_sum(n) + n as f64, || {
            format!("sum of y: {y_sum}")
        })?;
        drop((y, shared));

        let batch = report.step(
            &format!("parent: build a {rows}-row batch of six columns"),
            0,
            || mixed_batch(rows),
        )?;
        let batch_bytes: usize = buffers(&batch).iter().map(|b| b.len()).sum();
        if let Some((_, bytes, _)) = report.rows.last_mut() {
            *bytes = batch_bytes;
        }
        for what in [
            "worker: summarize the heap batch (one copy, fresh blocks)",
            "worker: summarize the heap batch (one copy, recycled blocks)",
        ] {
            let summary = report.step(what, batch_bytes, || {
                let ColumnFrame(summary) = worker.call("summarize", &ColumnFrame(batch.clone()))?;
                Ok(summary)
            })?;
            check_summary(&summary, rows)?;
        }
        let in_shm = report.step(
            "parent: copy the batch into shared memory, view it there",
            batch_bytes,
            || {
                let payload =
                    Encoder::new(worker.shm_pool().clone()).encode(&ColumnFrame(batch.clone()))?;
                let ColumnFrame(in_shm) =
                    Decoder::new(worker.shm_pool().clone()).decode(&payload)?;
                Ok(in_shm)
            },
        )?;
        drop(batch);
        let summary = report.step(
            "worker: summarize the shared batch (zero-copy)",
            batch_bytes,
            || {
                let ColumnFrame(summary) =
                    worker.call("summarize", &ColumnFrame(in_shm.clone()))?;
                Ok(summary)
            },
        )?;
        check_summary(&summary, rows)?;
        drop(in_shm);
        report.step("shut the worker down", 0, || {
            worker.shutdown();
            Ok(())
        })?;
    }
    println!();
    println!(
        "shm demo: a parent (pid {}) and a worker moving {} of f64 and a {rows}-row Arrow batch",
        std::process::id(),
        human(bytes)
    );
    println!();
    report.print();
    println!();
    println!("every result checked; GB/s counts the bytes each step moved or read");
    let after = segment_names()?;
    check(after == before, || {
        format!("/dev/shm changed: before {before:?}, after {after:?}")
    })?;
    println!("/dev/shm: left as it was found");
    Ok(())
}

fn check_summary(summary: &RecordBatch, rows: usize) -> Result<(), Error> {
    let counts = summary
        .column_by_name("rows")
        .ok_or("no rows column")?
        .as_primitive::<Int64Type>();
    let total: i64 = counts.values().iter().sum();
    check(
        total == rows as i64 && summary.num_rows() == KINDS.len(),
        || {
            format!(
                "the summary counts {total} rows in {} kinds",
                summary.num_rows()
            )
        },
    )
}

fn segment_names() -> Result<Vec<String>, Error> {
    Ok(shm_core::list_files()?.into_iter().collect())
}

fn parse_size(text: &str) -> Result<usize, Error> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse()?;
    let scale = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(format!("unknown size unit {unit:?} (use B, KiB, MiB or GiB)").into()),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("size {text} is too large").into())
}
