//! Arrow benchmark: encoding a batch of six mixed columns into shared memory against memcpy of
//! the same bytes, and decoding with and without Arrow's content checks, at two row counts.
//! Writes `target/bench/arrow.md`.
//!
//! `cargo xtask bench [--quick]` runs it in release mode.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use shm_arrow::{ColumnFrame, decode_trusted};
use shm_codec::{Decoder, Encoder, Payload};
use shm_core::ShmPool;

use shm_bench::{Error, buffers, median_of as median, mixed_batch as batch, write_section};

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
    let mut targets_met = Vec::new();
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
        // The decoder reads the frame from its reference, so the encoded blocks must live.
        let encoded = encoder.encode(&frame)?;
        let payload = Payload::from_bytes(&encoded.to_bytes())?;
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
        if rows >= 1_000_000 {
            targets_met.push((rows, memcpy.as_secs_f64() / encode.as_secs_f64()));
        }
    }
    for (rows, ratio) in targets_met {
        writeln!(
            report,
            "\nTarget: encoding at least 0.8x memcpy at {rows} rows — {ratio:.2} ({}).",
            if ratio >= 0.8 { "met" } else { "missed" },
        )?;
    }

    write_section("arrow.md", &report)
}
