//! The other process of the multi-process tests. Commands (one per run):
//!
//! - `read HEXREF SEED`: attach the reference, check the pattern, print `ok LEN` or
//!   `mismatch AT`.
//! - `write SIZE SEED`: allocate and fill a block, print its reference as hex, wait until stdin
//!   closes, exit (the pool unlinks the block).
//! - `hold SIZE`: allocate and fill a block, print the session id and the reference, then wait
//!   forever: the test kills it.

use std::io::{BufRead, Write};

use shm_core::{ShmPool, ShmRef};
use shm_tests::{fill_pattern, pattern_mismatch};

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
            let block = pool.attach(&ShmRef::from_hex(hex)?)?;
            match pattern_mismatch(block.as_slice(), seed.parse()?) {
                None => writeln!(out, "ok {}", block.len())?,
                Some(at) => writeln!(out, "mismatch {at}")?,
            }
        }
        ["write", size, seed] => {
            let mut block = pool.alloc(size.parse()?, false)?;
            fill_pattern(block.as_mut_slice()?, seed.parse()?);
            writeln!(out, "{}", block.to_ref().to_hex())?;
            out.flush()?;
            for line in std::io::stdin().lock().lines() {
                line?;
            }
        }
        ["hold", size] => {
            let mut block = pool.alloc(size.parse()?, false)?;
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
