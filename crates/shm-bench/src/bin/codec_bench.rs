//! Codec benchmark: encoding an array into a recycled block against memcpy of the same bytes,
//! and decoding time across sizes. Writes `target/bench/codec.md`.
//!
//! `cargo xtask bench [--quick]` runs it in release mode.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use ndarray::{Array1, Ix1};
use shm_codec::{Decoder, Encoder, Payload, ShmArray};
use shm_core::ShmPool;

use shm_bench::{Error, human, median_of as median, write_section};

fn main() -> Result<(), Error> {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick {
        &[1 << 10, 1 << 20, 64 << 20]
    } else {
        &[1 << 10, 1 << 20, 64 << 20, 1 << 30]
    };
    let encoder = Encoder::new(ShmPool::new()?);
    let decoder = Decoder::new(ShmPool::new()?);

    let mut report = String::new();
    writeln!(report, "## shm-codec: arrays\n")?;
    writeln!(
        report,
        "f64 arrays. `encode` copies a heap array into a recycled block (the pool is warm); \
         `memcpy` copies the same bytes between warm heap buffers; `decode` turns a received \
         payload into a `ShmArray` (attach through the mapping cache, check, view). Medians.\n"
    )?;
    writeln!(
        report,
        "| size | runs | memcpy GB/s | encode GB/s | encode / memcpy | decode |"
    )?;
    writeln!(report, "| ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for &size in sizes {
        let runs = if size >= 1 << 30 { 5 } else { 21 };
        eprintln!("... {} bytes, {runs} runs", size);
        let array = Array1::from_shape_fn(size / 8, |i| i as f64);
        let mut copy = vec![0f64; size / 8];
        let source = array.as_slice().ok_or("contiguous")?;
        let memcpy = median(runs, || {
            let start = Instant::now();
            copy.copy_from_slice(source);
            Ok(start.elapsed())
        })?;
        drop(encoder.encode(&array)?);
        let encode = median(runs, || {
            let start = Instant::now();
            let payload = encoder.encode(&array)?;
            let time = start.elapsed();
            drop(payload);
            Ok(time)
        })?;
        let wire = encoder.encode(&array)?;
        let bytes = wire.to_bytes();
        let decode = median(runs, || {
            let start = Instant::now();
            let payload = Payload::from_bytes(&bytes)?;
            let decoded: ShmArray<f64, Ix1> = decoder.decode(&payload)?;
            let time = start.elapsed();
            std::hint::black_box(decoded.view()[0]);
            Ok(time)
        })?;
        drop(wire);
        let rate = |t: Duration| size as f64 / t.as_secs_f64() / 1e9;
        writeln!(
            report,
            "| {} | {runs} | {:.1} | {:.1} | {:.2} | {:.1} µs |",
            human(size),
            rate(memcpy),
            rate(encode),
            memcpy.as_secs_f64() / encode.as_secs_f64(),
            decode.as_secs_f64() * 1e6,
        )?;
    }
    write_section("codec.md", &report)
}
