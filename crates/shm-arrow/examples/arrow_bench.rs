//! Arrow benchmark: encoding a batch of six mixed columns into shared memory against memcpy of
//! the same bytes, and decoding with and without Arrow's content checks, at two row counts.
//! Writes `target/bench/arrow.md`.
//!
//! `cargo xtask bench [--quick]` runs it in release mode.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, BooleanArray, DictionaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::Int32Type;
use shm_arrow::{ColumnFrame, decode_trusted};
use shm_codec::{Decoder, Encoder, Payload};
use shm_core::ShmPool;

type Error = Box<dyn std::error::Error>;

fn batch(rows: usize) -> Result<RecordBatch, Error> {
    let words = ["alpha", "beta", "gamma", "delta", "epsilon"];
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "f64",
            Arc::new(Float64Array::from_iter_values(
                (0..rows).map(|i| i as f64 * 0.5),
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
                (0..rows).map(|i| format!("row-{:07}", i % 10_000_000)),
            )),
        ),
        (
            "dict",
            Arc::new(
                (0..rows)
                    .map(|i| words[i % words.len()])
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
fn buffers(batch: &RecordBatch) -> Vec<arrow::buffer::Buffer> {
    fn collect(data: &arrow::array::ArrayData, into: &mut Vec<arrow::buffer::Buffer>) {
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

fn median(
    runs: usize,
    mut run: impl FnMut() -> Result<Duration, Error>,
) -> Result<Duration, Error> {
    let mut times = (0..runs).map(|_| run()).collect::<Result<Vec<_>, _>>()?;
    times.sort();
    Ok(times[runs / 2])
}

fn main() -> Result<(), Error> {
    let quick = std::env::args().any(|a| a == "--quick");
    let row_counts: &[usize] = if quick {
        &[100_000, 1_000_000]
    } else {
        &[1_000_000, 10_000_000]
    };
    let encoder = Encoder::new(ShmPool::new()?);
    let decoder = Decoder::new(ShmPool::new()?);

    let mut report = String::new();
    writeln!(report, "## shm-arrow: per-column frames\n")?;
    writeln!(
        report,
        "Six columns: f64, i64, utf8, dictionary, timestamp with time zone, bool with nulls. \
         `encode` copies every buffer into (recycled) shared memory; `memcpy` copies the same \
         buffers into warm heap buffers of the same sizes; `decode` builds the `RecordBatch` over the blocks, \
         with Arrow's validation (default) and without it (`decode_trusted`). Medians.\n"
    )?;
    writeln!(
        report,
        "| rows | bytes | memcpy GB/s | encode GB/s | encode / memcpy | decode (checked) | checked GB/s | decode (trusted) |"
    )?;
    writeln!(
        report,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for &rows in row_counts {
        eprintln!("... {rows} rows");
        let batch = batch(rows)?;
        let sources = buffers(&batch);
        let bytes: usize = sources.iter().map(|b| b.len()).sum();
        let runs = if rows >= 10_000_000 { 5 } else { 11 };
        // The baseline copies the same buffers into heap buffers of the same sizes: memcpy's
        // speed on this machine depends on the size of the copy.
        let mut targets: Vec<Vec<u8>> = sources.iter().map(|b| vec![0u8; b.len()]).collect();
        let memcpy = median(runs, || {
            let start = Instant::now();
            for (target, source) in targets.iter_mut().zip(&sources) {
                target.copy_from_slice(source.as_slice());
            }
            Ok(start.elapsed())
        })?;
        let frame = ColumnFrame(batch.clone());
        drop(encoder.encode(&frame)?);
        let encode = median(runs, || {
            let start = Instant::now();
            let payload = encoder.encode(&frame)?;
            let time = start.elapsed();
            drop(payload);
            Ok(time)
        })?;
        let payload = Payload::from_bytes(&encoder.encode(&frame)?.to_bytes())?;
        let checked = median(runs, || {
            let start = Instant::now();
            let ColumnFrame(back) = decoder.decode(&payload)?;
            let time = start.elapsed();
            std::hint::black_box(back.num_rows());
            Ok(time)
        })?;
        let trusted = median(runs, || {
            let start = Instant::now();
            // SAFETY: this process wrote the payload from a valid batch just above.
            let back = unsafe { decode_trusted(&payload, &decoder) }?;
            let time = start.elapsed();
            std::hint::black_box(back.num_rows());
            Ok(time)
        })?;
        let gbs = |t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
        writeln!(
            report,
            "| {rows} | {:.0} MB | {:.1} | {:.1} | {:.2} | {:.1} ms | {:.1} | {:.1} µs |",
            bytes as f64 / 1e6,
            gbs(memcpy),
            gbs(encode),
            memcpy.as_secs_f64() / encode.as_secs_f64(),
            checked.as_secs_f64() * 1e3,
            gbs(checked),
            trusted.as_secs_f64() * 1e6,
        )?;
        if rows == *row_counts.last().unwrap_or(&rows) {
            let ratio = memcpy.as_secs_f64() / encode.as_secs_f64();
            writeln!(
                report,
                "\nTarget: encoding at least 0.7x memcpy at {rows} rows — {ratio:.2} ({}).",
                if ratio >= 0.7 { "met" } else { "missed" },
            )?;
        }
    }

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("arrow.md"), &report)?;
    print!("{report}");
    Ok(())
}
