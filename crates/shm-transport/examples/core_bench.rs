//! Pool benchmark: writing into a fresh segment versus a recycled block, against memcpy in the
//! same run. Writes `target/bench/core.md`.
//!
//! `cargo xtask bench [--quick]` runs it in release mode.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use shm_core::{PoolConfig, ShmPool};

mod common;
use common::{Error, human, median_of as median, write_section};

fn main() -> Result<(), Error> {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick {
        &[1 << 20, 64 << 20]
    } else {
        &[1 << 20, 64 << 20, 1 << 30]
    };
    let fresh_pool = ShmPool::with_config(PoolConfig {
        cache_bytes: 0,
        slab_threshold: 0,
        ..PoolConfig::default()
    })?;
    let recycling_pool = ShmPool::new()?;

    let mut report = String::new();
    writeln!(
        report,
        "## shm-core: fresh segment vs recycled block (B5)\n"
    )?;
    writeln!(
        report,
        "Median of the given number of runs per cell. `fresh` creates, reserves and populates a new segment \
         and copies into it; `recycled` takes a block from the free list and copies into it; \
         `memcpy` copies between two warm heap buffers.\n"
    )?;
    writeln!(
        report,
        "| size | runs | memcpy GB/s | fresh GB/s | recycled GB/s | recycled / memcpy | recycled / fresh |"
    )?;
    writeln!(report, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for &size in sizes {
        let runs = if size >= 1 << 30 { 5 } else { 15 };
        eprintln!("... {} MiB, {runs} runs", size >> 20);
        let src = vec![0x5au8; size];
        let mut dst = vec![0u8; size];
        let memcpy = median(runs, || {
            let start = Instant::now();
            dst.copy_from_slice(&src);
            Ok(start.elapsed())
        })?;
        let fresh = median(runs, || {
            let start = Instant::now();
            let mut block = fresh_pool.alloc(size)?;
            block.as_mut_slice()?.copy_from_slice(&src);
            let time = start.elapsed();
            drop(block);
            Ok(time)
        })?;
        drop(recycling_pool.alloc(size)?);
        let created = recycling_pool.stats().segments_created;
        let recycled = median(runs, || {
            let start = Instant::now();
            let mut block = recycling_pool.alloc(size)?;
            block.as_mut_slice()?.copy_from_slice(&src);
            Ok(start.elapsed())
        })?;
        if recycling_pool.stats().segments_created != created {
            return Err("the recycling pool created segments during the measurement".into());
        }
        let rate = |t: Duration| size as f64 / t.as_secs_f64() / 1e9;
        writeln!(
            report,
            "| {} | {runs} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1}x |",
            human(size),
            rate(memcpy),
            rate(fresh),
            rate(recycled),
            memcpy.as_secs_f64() / recycled.as_secs_f64(),
            fresh.as_secs_f64() / recycled.as_secs_f64(),
        )?;
    }
    drop(fresh_pool);
    drop(recycling_pool);

    write_section("core.md", &report)
}
