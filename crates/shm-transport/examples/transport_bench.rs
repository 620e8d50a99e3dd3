//! Transport benchmark: small-call round trips against a Unix-socket ping-pong, and the cost of
//! sending arrays that already live in shared memory, by size. Writes
//! `target/bench/transport.md`.
//!
//! `cargo xtask bench [--quick]` runs it in release mode. The same executable is the worker.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use ndarray::{Array1, Ix1};
use shm_codec::{Serde, ShmArray, ShmArrayMut};
use shm_transport::{Router, Worker, WorkerConfig, is_worker, serve};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if is_worker() {
        let router = Router::new()
            .handle("echo", |Serde(x): Serde<u64>, _| Ok::<_, String>(Serde(x)))
            .handle("len", |a: ShmArray<f64, Ix1>, _| {
                Ok::<_, String>(Serde(a.len()))
            });
        return Ok(serve(router)?);
    }
    if let [flag, path] = args.as_slice()
        && flag == "--socket-echo"
    {
        return socket_echo(path);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let calls = if quick { 20_000 } else { 100_000 };

    let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
    let median = |v: &[Duration]| v[v.len() / 2];
    let p99 = |v: &[Duration]| v[v.len() * 99 / 100];

    eprintln!("... {calls} small calls");
    let shm = sample(calls, || {
        let Serde(x): Serde<u64> = worker.call("echo", &Serde(7u64))?;
        std::hint::black_box(x);
        Ok(())
    })?;

    let mut arrays = String::new();
    writeln!(
        arrays,
        "\n## shm-transport: arrays already in shared memory (B1, zero-copy part)\n"
    )?;
    writeln!(
        arrays,
        "A call whose argument is an array produced in place (`ShmArrayMut`) and whose handler \
         only reads its length: what the transport costs, apart from any compute. `one copy` \
         sends the same data from the heap.\n"
    )?;
    writeln!(
        arrays,
        "| size | zero-copy call | one-copy call | one-copy GB/s |"
    )?;
    writeln!(arrays, "| ---: | ---: | ---: | ---: |")?;
    let sizes: &[usize] = if quick {
        &[1 << 20, 64 << 20]
    } else {
        &[1 << 20, 64 << 20, 1 << 30]
    };
    for &size in sizes {
        let runs = if size >= 1 << 30 { 5 } else { 31 };
        eprintln!("... {} MiB arrays", size >> 20);
        let mut produced = ShmArrayMut::<f64, Ix1>::zeros(worker.pool(), size / 8)?;
        produced.view_mut().fill(1.0);
        let shared = produced.freeze();
        let zero_copy = sample(runs, || {
            let Serde(n): Serde<usize> = worker.call("len", &shared)?;
            std::hint::black_box(n);
            Ok(())
        })?;
        let heap = Array1::from_elem(size / 8, 1.0f64);
        let one_copy = sample(runs, || {
            let Serde(n): Serde<usize> = worker.call("len", &heap)?;
            std::hint::black_box(n);
            Ok(())
        })?;
        writeln!(
            arrays,
            "| {} MiB | {:.1} µs | {:.2} ms | {:.1} |",
            size >> 20,
            median(&zero_copy).as_secs_f64() * 1e6,
            median(&one_copy).as_secs_f64() * 1e3,
            size as f64 / median(&one_copy).as_secs_f64() / 1e9,
        )?;
    }

    eprintln!("... {calls} socket round trips");
    let socket = socket_round_trips(calls)?;
    let mut report = String::new();
    writeln!(report, "## shm-transport: small calls (B2)\n")?;
    writeln!(
        report,
        "Round trip of a call with an 8-byte argument and result, {calls} calls after warm-up, \
         against a ping-pong of 8 bytes over a Unix socket between two processes.\n"
    )?;
    writeln!(
        report,
        "| channel | median | p99 | ratio to socket (median) |"
    )?;
    writeln!(report, "| --- | ---: | ---: | ---: |")?;
    for (name, times) in [("shm channel", &shm), ("Unix socket", &socket)] {
        writeln!(
            report,
            "| {name} | {:.1} µs | {:.1} µs | {:.1}x |",
            median(times).as_secs_f64() * 1e6,
            p99(times).as_secs_f64() * 1e6,
            median(&socket).as_secs_f64() / median(times).as_secs_f64(),
        )?;
    }
    report.push_str(&arrays);
    worker.shutdown();

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("transport.md"), &report)?;
    print!("{report}");
    Ok(())
}

/// Times `runs` calls after a tenth as many (at least 50) for warm-up; sorted times.
fn sample(
    runs: usize,
    mut call: impl FnMut() -> Result<(), Error>,
) -> Result<Vec<Duration>, Error> {
    for _ in 0..(runs / 10).max(50) {
        call()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        call()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times)
}

/// The peer of the socket baseline: echoes 8-byte messages until the socket closes.
fn socket_echo(path: &str) -> Result<(), Error> {
    let mut stream = UnixStream::connect(path)?;
    let mut buf = [0u8; 8];
    while stream.read_exact(&mut buf).is_ok() {
        stream.write_all(&buf)?;
    }
    Ok(())
}

fn socket_round_trips(calls: usize) -> Result<Vec<Duration>, Error> {
    let path = std::env::temp_dir().join(format!("shm-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--socket-echo")
        .arg(&path)
        .spawn()?;
    let (mut stream, _) = listener.accept()?;
    let times = sample(calls, || {
        stream.write_all(&7u64.to_le_bytes())?;
        let mut buf = [0u8; 8];
        stream.read_exact(&mut buf)?;
        Ok(())
    });
    drop(stream);
    child.wait()?;
    let _ = std::fs::remove_file(&path);
    times
}
