//! Pool benchmark: writing into a fresh segment versus a recycled block, against memcpy in the
//! same run; creating a sealed memfd segment against a named one; receiving a segment over a
//! link against opening a named one; and what sealing a reply would cost against the private
//! copy. Writes `target/bench/core.md`.
//!
//! `cargo xtask bench [--quick]` runs it in release mode.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use shm_core::{PoolConfig, SegmentLink, ShmBlockMut, ShmPool};

use shm_bench::{Error, human, median_of as median, write_section};

fn main() -> Result<(), Error> {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick {
        &[1 << 20, 64 << 20]
    } else {
        &[1 << 20, 64 << 20, 1 << 30]
    };
    let fresh_pool = ShmPool::with_config(
        PoolConfig::default()
            .with_cache_bytes(0)
            .with_slab_threshold(0),
    )?;
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
            block.as_mut_slice().copy_from_slice(&src);
            let time = start.elapsed();
            drop(block);
            Ok(time)
        })?;
        drop(recycling_pool.alloc(size)?);
        let created = recycling_pool.stats().segments_created;
        let recycled = median(runs, || {
            let start = Instant::now();
            let mut block = recycling_pool.alloc(size)?;
            block.as_mut_slice().copy_from_slice(&src);
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

    creation(&mut report, quick)?;
    receiving(&mut report, quick)?;
    sealed_reply(&mut report, quick)?;
    write_section("core.md", &report)
}

/// Maps `len` bytes of `fd` shared, read-only or read-write.
fn map(fd: &std::os::fd::OwnedFd, len: usize, writable: bool) -> Result<*mut u8, Error> {
    use rustix::mm::{MapFlags, ProtFlags};
    let prot = if writable {
        ProtFlags::READ | ProtFlags::WRITE
    } else {
        ProtFlags::READ
    };
    // SAFETY: a fresh mapping at an address the kernel picks; the caller unmaps it.
    Ok(
        unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0)? }
            .cast(),
    )
}

/// Unmaps what [`map`] returned.
fn unmap(ptr: *mut u8, len: usize) -> Result<(), Error> {
    // SAFETY: `ptr` and `len` are one whole mapping from `map`, used by nothing any more.
    unsafe { rustix::mm::munmap(ptr.cast(), len)? };
    Ok(())
}

/// A named segment in `/dev/shm`, unlinked when dropped: the baseline of the old design.
struct Named {
    name: String,
}

impl Named {
    fn create(len: usize) -> Result<Self, Error> {
        let name = format!("/shm-bench-{}", std::process::id());
        let flags =
            rustix::shm::OFlags::CREATE | rustix::shm::OFlags::EXCL | rustix::shm::OFlags::RDWR;
        let fd = rustix::shm::open(
            name.as_str(),
            flags,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        )?;
        let named = Named { name };
        rustix::fs::fallocate(&fd, rustix::fs::FallocateFlags::empty(), 0, len as u64)?;
        Ok(named)
    }

    /// `shm_open`, `fstat`, `mmap`, one read, `munmap`.
    fn open_read_unmap(&self) -> Result<(), Error> {
        let fd = rustix::shm::open(self.name.as_str(), rustix::shm::OFlags::RDONLY, 0.into())?;
        let len = rustix::fs::fstat(&fd)?.st_size as usize;
        let ptr = map(&fd, len, false)?;
        drop(fd);
        // SAFETY: the first byte of a live mapping of `len > 0` bytes.
        std::hint::black_box(unsafe { std::ptr::read_volatile(ptr) });
        unmap(ptr, len)
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = rustix::shm::unlink(self.name.as_str());
    }
}

/// What a new segment costs to make: a pool's sealed memfd (create, reserve, map, seal,
/// populate) against a named object (`shm_open`, `fallocate`, `mmap`, populate, unlink) — the
/// design before memfds.
fn creation(report: &mut String, quick: bool) -> Result<(), Error> {
    let runs = if quick { 201 } else { 1_001 };
    eprintln!("... segment creation, {runs} runs");
    let pool = ShmPool::with_config(
        PoolConfig::default()
            .with_cache_bytes(0)
            .with_slab_threshold(0),
    )?;
    writeln!(
        report,
        "\n## Creating a segment: sealed memfd vs named object\n"
    )?;
    writeln!(
        report,
        "Median of {runs} runs. `memfd`: `ShmPool::alloc` with no cache, so a new segment every \
         time: `memfd_create`, `fallocate`, `mmap`, three seals, populate, and its release. \
         `named`: what the same took with named objects: `shm_open`, `fallocate`, `mmap`, \
         populate, `munmap`, `shm_unlink`.\n"
    )?;
    writeln!(report, "| size | named | memfd | memfd / named |")?;
    writeln!(report, "| ---: | ---: | ---: | ---: |")?;
    for size in [64usize << 10, 1 << 20] {
        let memfd = median(runs, || {
            let start = Instant::now();
            drop(pool.alloc(size)?);
            Ok(start.elapsed())
        })?;
        let named = median(runs, || {
            let start = Instant::now();
            let segment = Named::create(size)?;
            let fd = rustix::shm::open(segment.name.as_str(), rustix::shm::OFlags::RDWR, 0.into())?;
            let ptr = map(&fd, size, true)?;
            // SAFETY: a live mapping of `size` bytes; populating it changes no byte.
            let _ = unsafe {
                rustix::mm::madvise(ptr.cast(), size, rustix::mm::Advice::LinuxPopulateWrite)
            };
            unmap(ptr, size)?;
            drop((fd, segment));
            Ok(start.elapsed())
        })?;
        writeln!(
            report,
            "| {} | {:.2} µs | {:.2} µs | {:.2} |",
            human(size),
            named.as_secs_f64() * 1e6,
            memfd.as_secs_f64() * 1e6,
            memfd.as_secs_f64() / named.as_secs_f64()
        )?;
    }
    Ok(())
}

/// Receiving a segment another process made, the first time: over a link (`sendmsg` with the
/// descriptor, `recvmsg`, `fstat`, the seals checked, `mmap`), against opening a named object.
fn receiving(report: &mut String, quick: bool) -> Result<(), Error> {
    let runs = if quick { 1_001 } else { 10_001 };
    eprintln!("... receiving a segment, {runs} runs");
    let owner = ShmPool::with_config(PoolConfig::default().with_slab_threshold(0))?;
    // Made ahead in batches, each descriptor sent once: a link carries a segment once.
    let batch = 500;
    let mut linked = Vec::new();
    let mut left = runs;
    while left > 0 {
        let n = left.min(batch);
        let blocks: Vec<_> = (0..n)
            .map(|_| owner.alloc(1 << 20).map(ShmBlockMut::freeze))
            .collect::<Result<_, _>>()?;
        let (sender, receiver) = SegmentLink::pair()?;
        let receiver = SegmentLink::from_fd(receiver)?;
        for block in &blocks {
            let start = Instant::now();
            sender.offer(block, None)?;
            let view = receiver.attach(&block.to_ref())?;
            std::hint::black_box(view.as_slice()[0]);
            drop(view);
            receiver.forget_received();
            linked.push(start.elapsed());
        }
        left -= n;
    }
    linked.sort_unstable();
    let linked = linked[linked.len() / 2];
    let named = Named::create(1 << 20)?;
    let bare = median(runs, || {
        let start = Instant::now();
        named.open_read_unmap()?;
        Ok(start.elapsed())
    })?;
    drop(named);
    writeln!(report, "\n## Receiving a segment: over a link vs by name\n")?;
    writeln!(
        report,
        "Median of {runs} runs, 1 MiB segments. `link`: the creator sends the descriptor \
         (`sendmsg`, `SCM_RIGHTS`), the receiver takes it (`recvmsg`), checks it (`fstat`, \
         `F_GET_SEALS`), maps it, reads a byte, and unmaps it. `named`: `shm_open`, `fstat`, \
         `mmap`, one read, `munmap` — the old design's attach, without its checks. Both happen \
         once per segment and peer: later references reuse the mapping.\n"
    )?;
    writeln!(report, "| named | link | link / named |")?;
    writeln!(report, "| ---: | ---: | ---: |")?;
    writeln!(
        report,
        "| {:.2} µs | {:.2} µs | {:.2} |",
        bare.as_secs_f64() * 1e6,
        linked.as_secs_f64() * 1e6,
        linked.as_secs_f64() / bare.as_secs_f64()
    )?;
    Ok(())
}

/// What reading an untrusted worker's reply in place would cost if the worker sealed it against
/// writes (`F_SEAL_WRITE` needs a segment with no writable mapping left, so a fresh one per
/// reply: create, reserve, map, write, unmap, seal, and the reader's mapping), against what
/// `untrusted(true)` does (a private copy of a block the reader already maps), by size.
fn sealed_reply(report: &mut String, quick: bool) -> Result<(), Error> {
    use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};
    let sizes: &[usize] = if quick {
        &[1 << 10, 64 << 10, 1 << 20, 64 << 20]
    } else {
        &[1 << 10, 64 << 10, 1 << 20, 64 << 20, 1 << 30]
    };
    let pool = ShmPool::new()?;
    writeln!(
        report,
        "\n## An untrusted reply: sealed against writes vs copied privately\n"
    )?;
    writeln!(
        report,
        "Median per size. `sealed`: the worker makes a fresh memfd, reserves, maps and fills it, \
         unmaps it and adds `F_SEAL_WRITE`; the parent maps it read-only and reads it once — \
         zero-copy for the parent, and no peer can write it any more. `private copy`: the \
         parent copies a block it already maps into recycled private memory \
         (`ShmPool::private_copy`, what `untrusted(true)` does) and reads the copy once. \
         The worker's own write of the data is in `sealed` and not in `private copy`.\n"
    )?;
    writeln!(
        report,
        "| size | runs | private copy | sealed | sealed / private copy |"
    )?;
    writeln!(report, "| ---: | ---: | ---: | ---: | ---: |")?;
    for &size in sizes {
        let runs = if size >= 64 << 20 { 9 } else { 201 };
        eprintln!("... sealed reply, {} KiB, {runs} runs", size >> 10);
        let src = vec![0x3cu8; size];
        let mut block = pool.alloc(size)?;
        block.as_mut_slice().copy_from_slice(&src);
        let block = block.freeze();
        let read = |bytes: &[u8]| {
            bytes
                .iter()
                .step_by(4096)
                .map(|&b| u64::from(b))
                .sum::<u64>()
        };
        let copied = median(runs, || {
            let start = Instant::now();
            let copy = pool.private_copy(&block)?;
            std::hint::black_box(read(copy.as_slice()));
            Ok(start.elapsed())
        })?;
        let sealed = median(runs, || {
            let start = Instant::now();
            let fd =
                rustix::fs::memfd_create("reply", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
            rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size as u64)?;
            let writer = map(&fd, size, true)?;
            // SAFETY: `writer` is a live, writable mapping of `size` bytes that nothing else
            // uses; `src` holds `size` bytes.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), writer, size) };
            unmap(writer, size)?;
            let seals = SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW;
            rustix::fs::fcntl_add_seals(&fd, seals)?;
            let reader = map(&fd, size, false)?;
            // SAFETY: a live mapping of `size` bytes, sealed against writes: nobody changes it.
            std::hint::black_box(read(unsafe { std::slice::from_raw_parts(reader, size) }));
            unmap(reader, size)?;
            Ok(start.elapsed())
        })?;
        writeln!(
            report,
            "| {} | {runs} | {:.1} µs | {:.1} µs | {:.2} |",
            human(size),
            copied.as_secs_f64() * 1e6,
            sealed.as_secs_f64() * 1e6,
            sealed.as_secs_f64() / copied.as_secs_f64()
        )?;
    }
    Ok(())
}
