//! A parent process writes a large block of f64 values into shared memory; a second process
//! attaches it by its `ShmRef` and sums it. Then the parent recycles the block and does it
//! again, to show what the pool's recycling and the reader's mapping cache save.
//!
//! `cargo xtask demo [--size 1GiB]` runs it in release mode.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use shm_core::{ShmBlock, ShmPool, ShmRef, list_segments};

type Error = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--child") => child(),
        _ => parent(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The reading side: attaches each reference it is sent and sums the f64 values in it.
fn child() -> Result<(), Error> {
    let pool = ShmPool::new()?;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let r = ShmRef::from_hex(&line?)?;
        let start = Instant::now();
        let block = pool.attach(&r)?;
        let attached = start.elapsed();
        let start = Instant::now();
        let sum = sum_f64(block.as_slice());
        let summed = start.elapsed();
        writeln!(out, "{} {} {sum}", attached.as_nanos(), summed.as_nanos())?;
        out.flush()?;
    }
    Ok(())
}

fn parent(args: &[String]) -> Result<(), Error> {
    let size = match args {
        [] => 1 << 30,
        [flag, value] if flag == "--size" => parse_size(value)?,
        _ => return Err("usage: demo [--size BYTES|KiB|MiB|GiB]".into()),
    };
    let size = size / 8 * 8;
    let values = size / 8;
    let expected = expected_sum(values);
    let before = segment_names()?;

    let mut rows = Vec::new();
    let mut exit = Ok(());
    {
        let pool = ShmPool::new()?;
        let mut reader = Command::new(std::env::current_exe()?)
            .arg("--child")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut to_reader = reader.stdin.take().ok_or("reader stdin")?;
        let mut from_reader = BufReader::new(reader.stdout.take().ok_or("reader stdout")?);
        let mut ask = |block: &ShmBlock| -> Result<(Duration, Duration), Error> {
            writeln!(to_reader, "{}", block.to_ref().to_hex())?;
            let mut line = String::new();
            from_reader.read_line(&mut line)?;
            let mut fields = line.split_whitespace();
            let mut next = || fields.next().ok_or("reader gave no answer");
            let attach = Duration::from_nanos(next()?.parse()?);
            let sum_time = Duration::from_nanos(next()?.parse()?);
            let sum: f64 = next()?.parse()?;
            if sum != expected {
                return Err(format!("reader summed {sum}, expected {expected}").into());
            }
            Ok((attach, sum_time))
        };

        progress(&format!(
            "preparing {} of f64 values on the heap",
            human(size)
        ));
        let mut values_on_heap = vec![0u8; size];
        fill_f64(&mut values_on_heap);
        progress(&format!(
            "creating a fresh {} segment and copying them in",
            human(size)
        ));
        let start = Instant::now();
        let mut block = pool.alloc(size, false)?;
        let created = start.elapsed();
        let start = Instant::now();
        block.as_mut_slice()?.copy_from_slice(&values_on_heap);
        let fresh_fill = start.elapsed();
        progress("the reader attaches it and sums it");
        let (attach1, sum1) = ask(&block)?;

        progress("recycling the block and writing it again");
        let segments = pool.stats().segments_created;
        drop(block);
        let start = Instant::now();
        let mut block = pool.alloc(size, false)?;
        let realloc = start.elapsed();
        let start = Instant::now();
        block.as_mut_slice()?.copy_from_slice(&values_on_heap);
        let warm_fill = start.elapsed();
        if pool.stats().segments_created != segments {
            exit = Err("the second allocation created a new segment instead of recycling".into());
        }
        progress("the reader sums it again through its cached mapping");
        let (attach2, sum2) = ask(&block)?;

        progress("timing memcpy between two warm heap buffers, for comparison");
        let memcpy = memcpy_time(&values_on_heap);

        rows.push(("fresh segment: create + reserve", created, 0));
        rows.push(("fresh segment: copy in (first write)", fresh_fill, size));
        rows.push(("reader: attach (new mapping)", attach1, 0));
        rows.push(("reader: sum (first touch)", sum1, size));
        rows.push(("recycled block: alloc", realloc, 0));
        rows.push(("recycled block: copy in", warm_fill, size));
        rows.push(("reader: attach (cached mapping)", attach2, 0));
        rows.push(("reader: sum (cached mapping)", sum2, size));
        rows.push(("baseline: memcpy between warm heap buffers", memcpy, size));

        drop(block);
        drop(to_reader);
        let status = reader.wait()?;
        if !status.success() {
            exit = Err(format!("reader exited with {status}").into());
        }
        let fresh = created + fresh_fill;
        println!();
        println!(
            "shm-core demo: {} of f64 ({values} values), written by pid {}, summed by a second process",
            human(size),
            std::process::id()
        );
        println!();
        println!("| step | time | GB/s |");
        println!("| --- | ---: | ---: |");
        for (step, time, bytes) in &rows {
            let rate = if *bytes > 0 {
                format!("{:.1}", *bytes as f64 / time.as_secs_f64() / 1e9)
            } else {
                String::new()
            };
            println!("| {step} | {} | {rate} |", ms(*time));
        }
        println!();
        println!(
            "recycled block vs fresh segment (create + reserve + first copy): {:.1}x faster",
            fresh.as_secs_f64() / warm_fill.as_secs_f64()
        );
        println!(
            "copy into a recycled block: {:.2}x of memcpy bandwidth",
            memcpy.as_secs_f64() / warm_fill.as_secs_f64()
        );
        println!("sum checked by both sides: {expected}");
    }
    let after = segment_names()?;
    if after != before {
        return Err(format!("/dev/shm changed: before {before:?}, after {after:?}").into());
    }
    println!(
        "/dev/shm: left as it was found ({} segments of ours)",
        after.len()
    );
    exit
}

fn segment_names() -> Result<Vec<String>, Error> {
    let mut names: Vec<String> = list_segments()?.into_iter().map(|s| s.name).collect();
    names.sort();
    Ok(names)
}

fn fill_f64(bytes: &mut [u8]) {
    for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&((i % 1024) as f64).to_ne_bytes());
    }
}

fn sum_f64(bytes: &[u8]) -> f64 {
    // Four accumulators let the loop use more than one adder; the values are small integers, so
    // the sum is exact in any order.
    let mut acc = [0.0f64; 4];
    let mut chunks = bytes.chunks_exact(32);
    for chunk in &mut chunks {
        for (lane, value) in acc.iter_mut().zip(chunk.chunks_exact(8)) {
            *lane += f64::from_ne_bytes(value.try_into().unwrap_or_default());
        }
    }
    let tail: f64 = chunks
        .remainder()
        .chunks_exact(8)
        .map(|v| f64::from_ne_bytes(v.try_into().unwrap_or_default()))
        .sum();
    acc.iter().sum::<f64>() + tail
}

fn expected_sum(values: usize) -> f64 {
    let full = (values / 1024) as f64 * (1023.0 * 1024.0 / 2.0);
    let rest = (values % 1024) as f64;
    full + rest * (rest - 1.0) / 2.0
}

fn memcpy_time(src: &[u8]) -> Duration {
    let mut dst = vec![0u8; src.len()];
    dst.copy_from_slice(src);
    let start = Instant::now();
    dst.copy_from_slice(src);
    let time = start.elapsed();
    std::hint::black_box(&dst);
    time
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

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{:.0} MiB", b as f64 / (1 << 20) as f64),
        b => format!("{b} B"),
    }
}

fn ms(time: Duration) -> String {
    let ms = time.as_secs_f64() * 1e3;
    if ms < 0.1 {
        format!("{:.1} µs", ms * 1e3)
    } else {
        format!("{ms:.1} ms")
    }
}

fn progress(step: &str) {
    eprintln!("... {step}");
}
