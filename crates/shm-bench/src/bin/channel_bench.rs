//! The benchmark of the channel itself: small calls (B2), steady state (B4), what an idle
//! parent and worker cost, and how late calls with a timeout return when replies race them.
//! Writes `target/bench/channel.md`.
//!
//! `cargo xtask bench [--quick]` runs it in release mode, with iceoryx2 (feature `iceoryx2`)
//! for B2's peers. The same executable is the worker and every peer process of B2 (the socket,
//! the spin floor, iceoryx2: see `shm_bench::peers`).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

use ndarray::{Array1, IxDyn};
use shm_codec::{Serde, ShmArray, ShmArrayMut};
use shm_core::{PoolConfig, ShmPool};
use shm_transport::{Router, TransportError, Worker, WorkerConfig, is_worker, serve};

use shm_bench::peers::Peer;
use shm_bench::{Error, in_rounds, median, ms, sample, write_section};
use shm_transport::CalleeExt;

fn router() -> Router {
    Router::new()
        .handle("echo", |Serde(x): Serde<u64>, _| Ok::<_, String>(Serde(x)))
        .handle("sleep", |Serde(us): Serde<u64>, _| {
            std::thread::sleep(Duration::from_micros(us));
            Ok::<_, String>(())
        })
        .handle("double", |a: ShmArray<f64, IxDyn>, ctx| {
            let mut out = ShmArrayMut::<f64, IxDyn>::zeros(ctx.pool(), a.shape())
                .map_err(|e| e.to_string())?;
            out.view_mut().zip_mut_with(&a.view(), |o, x| *o = 2.0 * x);
            Ok::<_, String>(out.freeze())
        })
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if is_worker() {
        return Ok(serve(router())?);
    }
    if let [flag, path] = args.as_slice()
        && flag == "--socket-echo"
    {
        return socket_echo(path);
    }
    if shm_bench::peers::serve_peer(&args)? {
        return Ok(());
    }
    if args.iter().any(|a| a == "--parent") {
        return parent_of_a_worker();
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `--b2`: the small calls alone, for profiling; prints the section instead of writing it.
    if args.iter().any(|a| a == "--b2") {
        let mut report = String::new();
        b2(&mut report, quick)?;
        println!("{report}");
        return Ok(());
    }
    let mut report = String::new();
    b2(&mut report, quick)?;
    b4(&mut report, quick)?;
    idle(&mut report, quick)?;
    lateness(&mut report, quick)?;
    parent_death(&mut report)?;
    write_section("channel.md", &report)
}

fn socket_echo(path: &str) -> Result<(), Error> {
    let mut stream = UnixStream::connect(path)?;
    let mut buf = [0u8; 8];
    while stream.read_exact(&mut buf).is_ok() {
        stream.write_all(&buf)?;
    }
    Ok(())
}

fn p99(times: &[Duration]) -> Duration {
    times[times.len() * 99 / 100]
}

fn b2(report: &mut String, quick: bool) -> Result<(), Error> {
    let calls = if quick { 20_000 } else { 100_000 };
    // Every channel takes a block of calls per round, in the same order each round: a drift of
    // the machine's speed during the run slows them alike.
    let rounds = if quick { 5 } else { 10 };
    let block = calls / rounds;
    eprintln!("... B2 {calls} small calls and ping-pongs per channel, in {rounds} rounds");
    let path = std::env::temp_dir().join(format!("shm-bench-{}-echo.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let mut peer = Command::new(std::env::current_exe()?)
        .arg("--socket-echo")
        .arg(&path)
        .spawn()?;
    let (mut stream, _) = listener.accept()?;

    // The peers, in the same rounds; /dev/shm must be as they found it.
    let dev_shm = || -> Result<Vec<String>, Error> {
        let mut names: Vec<String> = std::fs::read_dir("/dev/shm")?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        Ok(names)
    };
    let before = dev_shm()?;
    // A fresh worker per block, as the peers start fresh processes for theirs.
    let mut shm_calls = || {
        let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
        let times = sample(block / 10, block, || {
            let Serde(x): Serde<u64> = worker.call("echo", &Serde(7u64))?;
            std::hint::black_box(x);
            Ok(())
        });
        worker.shutdown();
        times
    };
    let mut socket_calls = || {
        sample(block / 10, block, || {
            stream.write_all(&7u64.to_le_bytes())?;
            let mut buf = [0u8; 8];
            stream.read_exact(&mut buf)?;
            Ok(())
        })
    };
    let available = Peer::available();
    let mut peer_runs: Vec<_> = available
        .iter()
        .map(|&peer| move || shm_bench::peers::ping_pong(peer, block))
        .collect();
    let mut methods: Vec<&mut dyn FnMut() -> Result<Vec<Duration>, Error>> =
        vec![&mut shm_calls, &mut socket_calls];
    methods.extend(
        peer_runs
            .iter_mut()
            .map(|run| run as &mut dyn FnMut() -> Result<Vec<Duration>, Error>),
    );
    let mut times = in_rounds(rounds, &mut methods)?.into_iter();
    drop(methods);
    let (shm, socket) = (
        times.next().ok_or("no shm times")?,
        times.next().ok_or("no socket times")?,
    );
    let peers: Vec<_> = available
        .iter()
        .map(|peer| peer.name())
        .zip(times)
        .collect();
    let after = dev_shm()?;
    stream.shutdown(std::net::Shutdown::Both)?;
    peer.wait()?;
    let _ = std::fs::remove_file(&path);
    if after != before {
        return Err(format!("the peers left /dev/shm changed: {before:?} -> {after:?}").into());
    }

    writeln!(report, "\n## B2: small call round trip\n")?;
    writeln!(
        report,
        "A call with an 8-byte argument and result, {calls} calls after warm-up, against 8-byte \
         ping-pongs between two processes in the same run, in {rounds} rounds of {block} per \
         channel (each round runs every channel once, in the same order, each with a fresh \
         worker or peer process, after a tenth as many of warm-up): over a Unix socket (one \
         peer for all rounds), spinning on a \
         shared page (the floor of any shared-memory channel), and over iceoryx2 (the crate, \
         publish-subscribe) busy-polling and sleeping on an event. shm's waiter spins 50 µs, \
         then sleeps on a futex: it burns no core while idle.{}\n",
        if cfg!(feature = "iceoryx2") {
            ""
        } else {
            " This build has no iceoryx2 (`cargo xtask bench` turns on the feature)."
        }
    )?;
    writeln!(
        report,
        "| channel | median | p99 | socket / this (median) | this / shm (median) |"
    )?;
    writeln!(report, "| --- | ---: | ---: | ---: | ---: |")?;
    let mut rows = vec![("shm channel", &shm), ("Unix socket", &socket)];
    rows.extend(peers.iter().map(|(name, times)| (*name, times)));
    for (name, times) in &rows {
        writeln!(
            report,
            "| {name} | {} | {} | {:.1}x | {:.2}x |",
            ms(median(times)),
            ms(p99(times)),
            median(&socket).as_secs_f64() / median(times).as_secs_f64(),
            median(times).as_secs_f64() / median(&shm).as_secs_f64()
        )?;
    }
    let fastest = rows
        .iter()
        .filter(|(name, _)| *name != "shm channel")
        .min_by_key(|(_, times)| median(times))
        .map(|(name, times)| (*name, median(times)));
    if let Some((name, time)) = fastest {
        let ratio = median(&shm).as_secs_f64() / time.as_secs_f64();
        writeln!(
            report,
            "\nFastest peer: {name}, {}; shm takes {ratio:.2}x its time.",
            ms(time)
        )?;
    }
    // The target: no slower than the busy-polling iceoryx2, a channel that burns a core while
    // idle where shm sleeps.
    if let Some((_, times)) = peers
        .iter()
        .find(|(peer, _)| *peer == Peer::IceoryxPoll.name())
    {
        let (shm, ice) = (median(&shm), median(times));
        writeln!(
            report,
            "\nTarget: at or below iceoryx2 busy-polling in the same run — {} against {} ({}).",
            ms(shm),
            ms(ice),
            if shm <= ice { "met" } else { "missed" }
        )?;
    }
    Ok(())
}

fn b4(report: &mut String, quick: bool) -> Result<(), Error> {
    let calls = if quick { 2_000 } else { 10_000 };
    writeln!(report, "\n## B4: steady state\n")?;
    writeln!(
        report,
        "{calls} calls, each with a 1 MiB f64 array argument (one copy) and a 1 MiB result \
         produced in the worker's shared memory, after 200 calls of warm-up. Segments: the \
         live segments of both processes. The second row gives the parent's pool the most \
         eager idle release there is (keep nothing, release after 1 ms idle): the cost of the \
         decay thread when calls come back to back, in the same run.\n"
    )?;
    writeln!(
        report,
        "| parent's pool | calls/s | segments before | segments after | parent RSS before → after | worker RSS before → after |"
    )?;
    writeln!(report, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    let eager = PoolConfig::default().with_idle_release(0, Some(Duration::from_millis(1)));
    for (name, config) in [
        (
            "default (keep 64 MiB, release after 10 s idle)",
            PoolConfig::default(),
        ),
        ("keep nothing, release after 1 ms idle", eager),
    ] {
        eprintln!("... B4 {calls} calls with 1 MiB payloads, {name}");
        let pool = ShmPool::with_config(config)?;
        let worker = Worker::spawn(WorkerConfig::current_exe()?.with_pool(pool))?;
        let args = Array1::from_elem(1 << 17, 1.0f64);
        let call = || -> Result<(), Error> {
            let doubled: ShmArray<f64, IxDyn> = worker.call("double", &args)?;
            if doubled.view()[[0]] != 2.0 {
                return Err("wrong result".into());
            }
            Ok(())
        };
        for _ in 0..200 {
            call()?;
        }
        // The live segments of both processes (memfds, found in /proc).
        let segments = || -> Result<usize, Error> {
            let pids = [std::process::id(), worker.pid()];
            Ok(shm_core::list_live_segments()?
                .iter()
                .filter(|s| pids.contains(&s.pid))
                .count())
        };
        let segments_before = segments()?;
        let rss_before = (rss_kib(std::process::id()), rss_kib(worker.pid()));
        let start = Instant::now();
        for _ in 0..calls {
            call()?;
        }
        let elapsed = start.elapsed();
        let segments_after = segments()?;
        let rss_after = (rss_kib(std::process::id()), rss_kib(worker.pid()));
        worker.shutdown();
        writeln!(
            report,
            "| {name} | {:.0} | {segments_before} | {segments_after} | {} → {} MiB | {} → {} MiB |",
            calls as f64 / elapsed.as_secs_f64(),
            rss_before.0 >> 10,
            rss_after.0 >> 10,
            rss_before.1 >> 10,
            rss_after.1 >> 10
        )?;
    }
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// Context switches of every thread of a process, and its CPU time in clock ticks, from /proc.
fn activity(pid: u32) -> (u64, u64) {
    let mut switches = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            switches += status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
            [11, 12]
                .iter()
                .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    (switches, ticks)
}

/// What a parent and its worker cost while nobody calls: wake-ups (context switches of all
/// their threads) per second and CPU, over an idle interval after a burst of calls.
fn idle(report: &mut String, quick: bool) -> Result<(), Error> {
    let seconds = if quick { 3 } else { 10 };
    eprintln!("... idle for {seconds} s");
    let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
    let args = Array1::from_elem(1 << 17, 1.0f64);
    for _ in 0..100 {
        let _: ShmArray<f64, IxDyn> = worker.call("double", &args)?;
    }
    // Past every spin, and past one more scheduling round.
    std::thread::sleep(Duration::from_millis(200));
    let pids = [std::process::id(), worker.pid()];
    let before = pids.map(activity);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let elapsed = start.elapsed().as_secs_f64();
    let after = pids.map(activity);
    worker.shutdown();
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    writeln!(report, "\n## Idle\n")?;
    writeln!(
        report,
        "A parent and a worker after 100 calls with 1 MiB arrays, then {seconds} s with no \
         call: context switches of all their threads per second, and CPU time (from /proc). \
         The parent's count includes this benchmark's own sleeping thread (one switch).\n"
    )?;
    writeln!(report, "| process | wake-ups/s | CPU |")?;
    writeln!(report, "| --- | ---: | ---: |")?;
    for (i, name) in ["parent", "worker"].iter().enumerate() {
        let switches = after[i].0.saturating_sub(before[i].0) as f64;
        let ticks = after[i].1.saturating_sub(before[i].1) as f64;
        writeln!(
            report,
            "| {name} | {:.1} | {:.2} % |",
            switches / elapsed,
            100.0 * ticks / hz / elapsed
        )?;
    }
    Ok(())
}

/// How late calls with a timeout return when the handler is slower than the timeout, so that
/// timeouts race late replies: 8 threads, each call sleeping 2 ms in the worker with a timeout
/// of 0.5 to 3 ms.
fn lateness(report: &mut String, quick: bool) -> Result<(), Error> {
    let per_thread = if quick { 100 } else { 500 };
    eprintln!("... timeout lateness, 8 threads x {per_thread} calls");
    let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
    let results: Vec<Result<(Vec<Duration>, usize), String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let worker = &worker;
                scope.spawn(move || {
                    let mut late = Vec::with_capacity(per_thread);
                    let mut timeouts = 0;
                    for i in 0..per_thread as u64 {
                        let timeout = Duration::from_micros(500 + (t * 311 + i * 97) % 2500);
                        let start = Instant::now();
                        match worker.call_timeout::<_, ()>("sleep", &Serde(2000u64), timeout) {
                            Ok(()) => {}
                            Err(TransportError::Timeout { .. }) => timeouts += 1,
                            Err(err) => return Err(err.to_string()),
                        }
                        late.push(start.elapsed().saturating_sub(timeout));
                    }
                    Ok((late, timeouts))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err("a thread panicked".into())))
            .collect()
    });
    worker.shutdown();
    let mut late = Vec::new();
    let mut timeouts = 0;
    for result in results {
        let (times, n) = result?;
        late.extend(times);
        timeouts += n;
    }
    late.sort();
    writeln!(report, "\n## Timeouts under load\n")?;
    writeln!(
        report,
        "8 threads × {per_thread} calls to a handler that sleeps 2 ms, each with a timeout of \
         0.5–3 ms ({timeouts} of {} timed out): how long after its timeout a call returned.\n",
        late.len()
    )?;
    writeln!(report, "| median | p99 | worst |")?;
    writeln!(report, "| ---: | ---: | ---: |")?;
    writeln!(
        report,
        "| {} | {} | {} |",
        ms(median(&late)),
        ms(p99(&late)),
        ms(late[late.len() - 1])
    )?;
    Ok(())
}

/// The parent of the parent-death row: spawns a worker, says its pid, waits to be killed.
fn parent_of_a_worker() -> Result<(), Error> {
    let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
    let _: Serde<u64> = worker.call("echo", &Serde(1u64))?;
    println!("{}", worker.pid());
    std::io::stdout().flush()?;
    loop {
        std::thread::park();
    }
}

/// Whether a process runs (exists and is not a zombie).
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, Some("Z") | Some("X") | None)
    })
}

/// How long a worker lives on after its parent is killed with SIGKILL.
fn parent_death(report: &mut String) -> Result<(), Error> {
    eprintln!("... parent death, 5 times");
    let mut exits = Vec::new();
    for _ in 0..5 {
        let mut parent = Command::new(std::env::current_exe()?)
            .arg("--parent")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(parent.stdout.take().ok_or("no stdout")?),
            &mut line,
        )?;
        let worker: u32 = line.trim().parse()?;
        let start = Instant::now();
        parent.kill()?;
        while runs(worker) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_micros(200));
        }
        exits.push(start.elapsed());
        parent.wait()?;
    }
    exits.sort();
    writeln!(report, "\n## Parent death\n")?;
    writeln!(
        report,
        "A parent with a live worker is killed with SIGKILL (5 times): the time until the worker \
         has exited (the kernel frees the segments of both; nothing is left to remove).\n"
    )?;
    writeln!(report, "| median | worst |")?;
    writeln!(report, "| ---: | ---: |")?;
    writeln!(
        report,
        "| {} | {} |",
        ms(median(&exits)),
        ms(exits[exits.len() - 1])
    )?;
    Ok(())
}
