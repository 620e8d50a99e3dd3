//! Pool benchmark: writing into a fresh segment versus a recycled block, against memcpy in the
//! same run; attaching a segment (with the truncation guard) against the bare system calls.
//! Writes `target/bench/core.md`.
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

    attach(&mut report, quick)?;
    write_section("core.md", &report)
}

/// Attaching a segment nobody in this process has mapped: the pool's checks, mapping and the
/// truncation guard's registration, against `shm_open` + `fstat` + `mmap` + `munmap` alone.
fn attach(report: &mut String, quick: bool) -> Result<(), Error> {
    use rustix::mm::{MapFlags, ProtFlags};
    let runs = if quick { 2_001 } else { 20_001 };
    let live = 1_000;
    eprintln!("... attach, {runs} runs beside {live} live mappings");
    let owner = ShmPool::with_config(PoolConfig {
        slab_threshold: 0,
        ..PoolConfig::default()
    })?;
    // Other mappings the guard watches meanwhile, as in a busy process.
    let others: Vec<_> = (0..live)
        .map(|_| owner.alloc(4096))
        .collect::<Result<_, _>>()?;
    let block = owner.alloc(1 << 20)?;
    let r = block.to_ref();
    let reader = ShmPool::with_config(PoolConfig {
        attach_cache_bytes: 0,
        sweep_orphans: false,
        ..PoolConfig::default()
    })?;
    let pooled = median(runs, || {
        let start = Instant::now();
        let view = reader.attach(&r)?;
        std::hint::black_box(view.as_slice()[0]);
        drop(view);
        reader.trim();
        Ok(start.elapsed())
    })?;
    let bare = median(runs, || {
        let start = Instant::now();
        let fd = rustix::shm::open(r.name.as_str(), rustix::shm::OFlags::RDONLY, 0.into())?;
        let len = rustix::fs::fstat(&fd)?.st_size as usize;
        // SAFETY: a fresh read-only mapping at an address the kernel picks; read once and
        // unmapped before the next run.
        unsafe {
            let ptr = rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                &fd,
                0,
            )?;
            drop(fd);
            std::hint::black_box(std::ptr::read_volatile(ptr.cast::<u8>()));
            rustix::mm::munmap(ptr, len)?;
        }
        Ok(start.elapsed())
    })?;
    writeln!(
        report,
        "\n## Attaching a segment, truncation guard included\n"
    )?;
    writeln!(
        report,
        "Median of {runs} runs, with {live} other mappings under the guard's watch. `pooled`: \
         `ShmPool::attach` of a segment the pool has not mapped (name and bounds checks, \
         `shm_open`, `fstat`, `mmap`, the guard's registration), one read, drop and unmap. \
         `bare`: `shm_open`, `fstat`, `mmap`, one read, `munmap`. Reads and writes themselves \
         cost the guard nothing.\n"
    )?;
    writeln!(report, "| bare | pooled | pooled / bare |")?;
    writeln!(report, "| ---: | ---: | ---: |")?;
    writeln!(
        report,
        "| {:.2} µs | {:.2} µs | {:.2} |",
        bare.as_secs_f64() * 1e6,
        pooled.as_secs_f64() * 1e6,
        pooled.as_secs_f64() / bare.as_secs_f64()
    )?;
    drop((others, block, reader, owner));
    Ok(())
}
