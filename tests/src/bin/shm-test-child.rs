//! The other process of the multi-process tests. Commands (one per run); those that move
//! segments take their end of a link from the parent (`ChildProcess::spawn_linked`):
//!
//! - `read HEXREF SEED`: attach the reference (its descriptor came on the link), check the
//!   pattern, print `ok LEN` or `mismatch AT`.
//! - `write SIZE SEED`: allocate and fill a block, send its descriptor on the link, print its
//!   reference as hex, wait until stdin closes, exit.
//! - `array HEXPAYLOAD`: decode an f64 array payload (its blocks' descriptors came on the
//!   link), print its shape and weighted sum.
//! - `make-array ROWS COLS`: encode an F-ordered f64 array, send its descriptors, print the
//!   payload as hex, wait until stdin closes.
//! - `hold SIZE`: allocate and fill a block, send it, print the reference, then wait forever:
//!   the test kills it.
//! - `attack PID`: what a peer of the same user can do to the segments of process `PID`
//!   without being sent anything: open each of them through `/proc/PID/fd`, and try to
//!   truncate, grow, write, punch and map them writable. Prints `refused N of N`, counting
//!   the attempts the kernel refused.

use std::io::{BufRead, Write};

use ndarray::{Array2, IxDyn};
use std::sync::Arc;

use shm_codec::{Attacher, Decoder, Encoder, Payload, ShmArray};
use shm_core::{SegmentLink, ShmBlock, ShmPool, ShmRef};
use shm_tests::{fill_pattern, from_hex, inherited_link, pattern_mismatch, to_hex, weighted_sum};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if let Err(err) = run(&args) {
        eprintln!("shm-test-child: {err}");
        std::process::exit(1);
    }
}

fn run(args: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let pool = ShmPool::new()?;
    let mut out = std::io::stdout().lock();
    match args {
        ["read", hex, seed] => {
            let block = inherited_link().attach(&ShmRef::from_hex(hex)?)?;
            match pattern_mismatch(block.as_slice(), seed.parse()?) {
                None => writeln!(out, "ok {}", block.len())?,
                Some(at) => writeln!(out, "mismatch {at}")?,
            }
        }
        ["write", size, seed] => {
            let mut block = pool.alloc(size.parse()?)?;
            fill_pattern(block.as_mut_slice(), seed.parse()?);
            let block = block.freeze();
            inherited_link().offer(&block, None)?;
            writeln!(out, "{}", block.to_ref().to_hex())?;
            out.flush()?;
            for line in std::io::stdin().lock().lines() {
                line?;
            }
        }
        ["array", hex] => {
            let payload = Payload::from_bytes(&from_hex(hex).ok_or("payload is not hex")?)?;
            let link = Arc::new(inherited_link());
            let decoder = Decoder::with_attacher(pool.clone(), Arc::new(Linked(link)));
            let array: ShmArray<f64, IxDyn> = decoder.decode(&payload)?;
            let sum = weighted_sum(array.view().iter());
            writeln!(out, "{:?} {sum}", array.shape())?;
        }
        ["make-array", rows, cols] => {
            let a =
                Array2::from_shape_fn((cols.parse()?, rows.parse()?), |(j, i)| (i * 7 + j) as f64);
            let payload = Encoder::new(pool.clone()).encode(&a.t())?;
            let link = inherited_link();
            for block in payload.blocks() {
                link.offer(block, None)?;
            }
            writeln!(out, "{}", to_hex(&payload.to_bytes()))?;
            out.flush()?;
            for line in std::io::stdin().lock().lines() {
                line?;
            }
        }
        ["hold", size] => {
            let mut block = pool.alloc(size.parse()?)?;
            fill_pattern(block.as_mut_slice(), 1);
            let block = block.freeze();
            let link = inherited_link();
            link.offer(&block, None)?;
            writeln!(out, "{}", block.to_ref().to_hex())?;
            out.flush()?;
            loop {
                std::thread::park();
            }
        }
        ["attack", pid] => {
            let (refused, tried) = attack(pid.parse()?)?;
            writeln!(out, "refused {refused} of {tried}")?;
        }
        _ => return Err(format!("unknown command {args:?}").into()),
    }
    Ok(())
}

/// Resolves a payload's references on a link, as a transport does for its peer's blocks.
struct Linked(Arc<SegmentLink>);

impl Attacher for Linked {
    fn attach(&self, _pool: &ShmPool, r: &ShmRef) -> shm_core::Result<Arc<ShmBlock>> {
        self.0.attach(r).map(Arc::new)
    }
}

/// Opens every segment of this project that process `pid` holds, through `/proc/PID/fd`, and
/// tries everything that would change it under its readers. Returns (refused, tried).
fn attack(pid: u32) -> Result<(usize, usize), Box<dyn std::error::Error>> {
    use std::os::fd::AsFd;
    let (mut refused, mut tried) = (0, 0);
    let mut count = |outcome: bool| {
        tried += 1;
        refused += usize::from(outcome);
    };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let path = entry?.path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:shm-") {
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        count(file.set_len(0).is_err());
        count(file.set_len(len + 4096).is_err());
        count(std::os::unix::fs::FileExt::write_at(&file, b"x", 0).is_err());
        let punch = rustix::fs::fallocate(
            file.as_fd(),
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            4096,
        );
        count(punch.is_err());
        // SAFETY: a fresh mapping at an address the kernel picks; unmapped at once if made.
        let mapped = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                4096,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &file,
                0,
            )
        };
        if let Ok(ptr) = mapped {
            // SAFETY: the mapping just made, used by nothing.
            let _ = unsafe { rustix::mm::munmap(ptr, 4096) };
        }
        count(mapped.is_err());
    }
    Ok((refused, tried))
}
