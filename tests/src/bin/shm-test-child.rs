//! The other process of the multi-process tests. Commands (one per run):
//!
//! - `read HEXREF SEED`: attach the reference, check the pattern, print `ok LEN` or
//!   `mismatch AT`.
//! - `write SIZE SEED`: allocate and fill a block, print its reference as hex, wait until stdin
//!   closes, exit (the pool unlinks the block).
//! - `array HEXPAYLOAD`: decode an f64 array payload, print its shape and weighted sum.
//! - `make-array ROWS COLS`: encode an F-ordered f64 array, print the payload as hex, wait until
//!   stdin closes.
//! - `hold SIZE`: allocate and fill a block, print the session id and the reference, then wait
//!   forever: the test kills it.
//! - `sigbus-elsewhere`: use a pool (which installs the truncation guard) and close it, then
//!   read a truncated mapping of a file in `/tmp` that is none of the pool's: the process must
//!   still die of SIGBUS, as it would without the guard.

use std::io::{BufRead, Write};

use ndarray::{Array2, IxDyn};
use shm_codec::{Decoder, Encoder, Payload, ShmArray};
use shm_core::{ShmPool, ShmRef};
use shm_tests::{fill_pattern, from_hex, pattern_mismatch, to_hex, weighted_sum};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if args == ["sigbus-elsewhere"] {
        sigbus_elsewhere();
    }
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
            let block = pool.attach(&ShmRef::from_hex(hex)?)?;
            match pattern_mismatch(block.as_slice(), seed.parse()?) {
                None => writeln!(out, "ok {}", block.len())?,
                Some(at) => writeln!(out, "mismatch {at}")?,
            }
        }
        ["write", size, seed] => {
            let mut block = pool.alloc(size.parse()?)?;
            fill_pattern(block.as_mut_slice()?, seed.parse()?);
            writeln!(out, "{}", block.to_ref().to_hex())?;
            out.flush()?;
            for line in std::io::stdin().lock().lines() {
                line?;
            }
        }
        ["array", hex] => {
            let payload = Payload::from_bytes(&from_hex(hex).ok_or("payload is not hex")?)?;
            let array: ShmArray<f64, IxDyn> = Decoder::new(pool.clone()).decode(&payload)?;
            let sum = weighted_sum(array.view().iter());
            writeln!(out, "{:?} {sum}", array.shape())?;
        }
        ["make-array", rows, cols] => {
            let a =
                Array2::from_shape_fn((cols.parse()?, rows.parse()?), |(j, i)| (i * 7 + j) as f64);
            let payload = Encoder::new(pool.clone()).encode(&a.t())?;
            writeln!(out, "{}", to_hex(&payload.to_bytes()))?;
            out.flush()?;
            for line in std::io::stdin().lock().lines() {
                line?;
            }
        }
        ["hold", size] => {
            let mut block = pool.alloc(size.parse()?)?;
            fill_pattern(block.as_mut_slice()?, 1);
            writeln!(out, "{}", pool.session())?;
            writeln!(out, "{}", block.to_ref().to_hex())?;
            out.flush()?;
            loop {
                std::thread::park();
            }
        }
        _ => return Err(format!("unknown command {args:?}").into()),
    }
    Ok(())
}

/// Dies of SIGBUS on a mapping the guard does not watch (see the module documentation).
fn sigbus_elsewhere() -> ! {
    let pool = ShmPool::new().expect("a pool");
    drop(pool.alloc(1 << 20).expect("a block"));
    drop(pool);
    let path = std::env::temp_dir().join(format!("shm-test-sigbus-{}", std::process::id()));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("a file in /tmp");
    std::fs::remove_file(&path).expect("unlink");
    file.set_len(8192).expect("size");
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared mapping of a file this process owns; read once below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    file.set_len(0).expect("truncate");
    // SAFETY: in bounds of the mapping; the read faults (SIGBUS) because the file is empty,
    // which is what this command is for.
    let byte = unsafe { std::ptr::read_volatile(ptr.cast::<u8>().add(4096)) };
    eprintln!("read {byte} past the end of a truncated file and lived");
    std::process::exit(0);
}
