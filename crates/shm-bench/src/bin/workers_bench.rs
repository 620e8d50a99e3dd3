//! Throughput with several workers (B6): calls per second through a `WorkerPool` of 1, 2 and N
//! workers, with an 8-byte and a 1 MiB argument, against the same work done the way a user
//! would otherwise write it — `std::process` children and pipes of postcard bytes — in the same
//! run. Writes `target/bench/workers.md`.
//!
//! `cargo xtask bench [--quick] [--workers N]` runs it in release mode; N defaults to the
//! number of cores.

use std::fmt::Write as _;
use std::io::{BufReader, BufWriter, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use ndarray::Ix1;
use shm_codec::{Serde, ShmArray, ShmArrayMut};
use shm_transport::{Router, WorkerConfig, WorkerPool, is_worker, serve};

use shm_bench::{Error, write_section};

/// Elements of the 1 MiB argument.
const LARGE: usize = (1 << 20) / 8;

fn router() -> Router {
    Router::new()
        .handle("echo", |Serde(x): Serde<u64>, _| Ok::<_, String>(Serde(x)))
        .handle("sum", |a: ShmArray<f64, Ix1>, _| {
            Ok::<_, String>(Serde(a.view().sum()))
        })
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if is_worker() {
        return Ok(serve(router())?);
    }
    if args.iter().any(|a| a == "--pipe-worker") {
        return pipe_worker();
    }
    let quick = args.iter().any(|a| a == "--quick");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = args
        .iter()
        .position(|a| a == "--workers")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(cores)
        .max(1);
    let mut counts = vec![1, 2, most];
    counts.sort_unstable();
    counts.dedup();
    let (small_calls, large_calls) = if quick { (4_000, 400) } else { (20_000, 2_000) };

    let mut report = String::new();
    writeln!(report, "\n## B6: throughput with several workers\n")?;
    writeln!(
        report,
        "Calls per second, one call in flight per worker, {small_calls} calls with an 8-byte \
         argument (echoed) and {large_calls} with a 1 MiB f64 array (summed by the worker). shm: a \
         `WorkerPool`, the array already in shared memory and sent by reference. Pipes: one \
         `std::process` child per worker, postcard bytes over its stdin and stdout, the array \
         serialised for every call. {cores} cores on this machine.\n"
    )?;
    writeln!(
        report,
        "| workers | argument | shm calls/s | pipes calls/s | shm / pipes |"
    )?;
    writeln!(report, "| ---: | --- | ---: | ---: | ---: |")?;
    for &workers in &counts {
        eprintln!("... B6 {workers} workers");
        let pool = WorkerPool::with_workers(WorkerConfig::current_exe()?, workers)?;
        let mut array = ShmArrayMut::<f64, Ix1>::zeros(pool.shm_pool(), LARGE)?;
        array.view_mut().fill(0.25);
        let array = array.freeze();
        let small = rate(small_calls, || {
            let results = pool.map(
                "echo",
                (0..small_calls as u64).map(Serde),
                workers,
                |_, _| {},
            );
            check(results, |Serde(v): Serde<u64>, i| v == i as u64)
        })?;
        let large = rate(large_calls, || {
            let results = pool.map("sum", (0..large_calls).map(|_| &array), workers, |_, _| {});
            check(results, |Serde(s): Serde<f64>, _| s == 0.25 * LARGE as f64)
        })?;
        drop(array);
        drop(pool);
        let mut pipes = Pipes::start(workers)?;
        let small_pipes = rate(small_calls, || pipes.run(small_calls, Message::Echo))?;
        let large_pipes = rate(large_calls, || pipes.run(large_calls, Message::Sum))?;
        pipes.stop()?;
        for (argument, shm, pipe) in [
            ("8 bytes", small, small_pipes),
            ("1 MiB", large, large_pipes),
        ] {
            writeln!(
                report,
                "| {workers} | {argument} | {shm:.0} | {pipe:.0} | {:.1}x |",
                shm / pipe
            )?;
        }
    }
    writeln!(
        report,
        "\nWorkers have a channel each and share nothing but the parent's pool; a machine with \
         more cores runs this with `--workers N`.\n"
    )?;
    write_section("workers.md", &report)
}

/// Calls per second of `run`, which makes `calls` calls; the best of three runs after one
/// warm-up (noise on a shared machine only ever slows a run down).
fn rate(calls: usize, mut run: impl FnMut() -> Result<(), Error>) -> Result<f64, Error> {
    run()?;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        run()?;
        best = best.min(start.elapsed());
    }
    Ok(calls as f64 / best.as_secs_f64())
}

fn check<R>(
    results: Vec<shm_transport::Result<R>>,
    right: impl Fn(R, usize) -> bool,
) -> Result<(), Error> {
    for (i, result) in results.into_iter().enumerate() {
        if !right(result?, i) {
            return Err(format!("call {i} came back wrong").into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The baseline: children that read length-prefixed postcard messages from stdin.

#[derive(Clone, Copy)]
enum Message {
    Echo,
    Sum,
}

struct Pipes {
    children: Vec<(Child, BufWriter<ChildStdin>, BufReader<ChildStdout>)>,
}

impl Pipes {
    fn start(workers: usize) -> Result<Self, Error> {
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for _ in 0..workers {
            let mut child = Command::new(&exe)
                .arg("--pipe-worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let stdin = BufWriter::new(child.stdin.take().ok_or("no stdin")?);
            let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
            children.push((child, stdin, stdout));
        }
        Ok(Pipes { children })
    }

    /// `calls` calls spread over the children, one thread and one call in flight per child.
    fn run(&mut self, calls: usize, message: Message) -> Result<(), Error> {
        let share = calls.div_ceil(self.children.len());
        std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .children
                .iter_mut()
                .map(|(_, stdin, stdout)| {
                    scope.spawn(move || -> Result<(), String> {
                        let array = vec![0.25f64; LARGE];
                        for i in 0..share as u64 {
                            let (tag, body) = match message {
                                Message::Echo => (0u8, postcard::to_stdvec(&i)),
                                Message::Sum => (1u8, postcard::to_stdvec(&array)),
                            };
                            let body = body.map_err(|e| e.to_string())?;
                            let header = [&[tag][..], &(body.len() as u32).to_le_bytes()].concat();
                            stdin.write_all(&header).map_err(|e| e.to_string())?;
                            stdin.write_all(&body).map_err(|e| e.to_string())?;
                            stdin.flush().map_err(|e| e.to_string())?;
                            let mut reply = [0u8; 8];
                            stdout.read_exact(&mut reply).map_err(|e| e.to_string())?;
                            let ok = match message {
                                Message::Echo => u64::from_le_bytes(reply) == i,
                                Message::Sum => f64::from_le_bytes(reply) == 0.25 * LARGE as f64,
                            };
                            if !ok {
                                return Err(format!("call {i} came back wrong"));
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for thread in threads {
                thread.join().map_err(|_| "a pipe thread panicked")??;
            }
            Ok::<(), Error>(())
        })
    }

    fn stop(self) -> Result<(), Error> {
        for (mut child, stdin, stdout) in self.children {
            drop((stdin, stdout));
            child.wait()?;
        }
        Ok(())
    }
}

/// The child of the baseline: answers each message until stdin closes.
fn pipe_worker() -> Result<(), Error> {
    let mut stdin = BufReader::new(std::io::stdin().lock());
    let mut stdout = std::io::stdout().lock();
    let mut header = [0u8; 5];
    let mut body = Vec::new();
    while stdin.read_exact(&mut header).is_ok() {
        let len = u32::from_le_bytes(header[1..5].try_into()?) as usize;
        body.resize(len, 0);
        stdin.read_exact(&mut body)?;
        let reply = match header[0] {
            0 => postcard::from_bytes::<u64>(&body)?.to_le_bytes(),
            _ => postcard::from_bytes::<Vec<f64>>(&body)?
                .iter()
                .sum::<f64>()
                .to_le_bytes(),
        };
        stdout.write_all(&reply)?;
        stdout.flush()?;
    }
    Ok(())
}
