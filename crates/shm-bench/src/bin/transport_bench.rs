//! The benchmark of shm against what users would pick instead, in one run: large arrays (B1),
//! Arrow batches (B3), a Python parent against `multiprocessing` (B9), what reading an untrusted worker's replies from private copies costs,
//! resident memory and faults (small calls and steady state are in
//! `channel_bench`). Writes
//! `target/bench/transport.md` and `target/bench/b1.svg`.
//!
//! `cargo xtask bench [--quick]` runs it in release mode, with `SHM_PYTHON` pointing at the
//! Python environment of the Python baselines. The same executable is the worker and the
//! socket peer.

use std::fmt::Write as _;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use ndarray::{Array1, Ix1, IxDyn};
use shm_arrow::ColumnFrame;
use shm_codec::{Decoder, Encoder, Serde, ShmArray, ShmArrayMut};
use shm_transport::{Router, Worker, WorkerConfig, is_worker, serve};

use shm_bench::{Error, gbs, human, median, mixed_batch as batch, ms, sample, write_section};
use shm_transport::CalleeExt;

fn router() -> Router {
    Router::new()
        .handle("echo", |Serde(x): Serde<u64>, _| Ok::<_, String>(Serde(x)))
        .handle("sum", |a: ShmArray<f64, Ix1>, _| {
            let start = Instant::now();
            let sum = a.view().sum();
            Ok::<_, String>(Serde((sum, start.elapsed().as_nanos() as u64)))
        })
        .handle("sleep", |Serde(ms): Serde<u64>, _| {
            std::thread::sleep(Duration::from_millis(ms));
            Ok::<_, String>(())
        })
        .handle("len", |a: ShmArray<f64, Ix1>, _| {
            Ok::<_, String>(Serde(a.len()))
        })
        .handle("double", |a: ShmArray<f64, IxDyn>, ctx| {
            let mut out = ShmArrayMut::<f64, IxDyn>::zeros(ctx.pool(), a.shape())
                .map_err(|e| e.to_string())?;
            out.view_mut().zip_mut_with(&a.view(), |o, x| *o = 2.0 * x);
            Ok::<_, String>(out.freeze())
        })
        .handle("rows", |ColumnFrame(batch): ColumnFrame, _| {
            Ok::<_, String>(Serde(batch.num_rows()))
        })
        .handle("ones", |Serde(n): Serde<usize>, ctx| {
            // One array per size, made once and then returned by reference.
            static MADE: std::sync::Mutex<Vec<ShmArray<f64, Ix1>>> =
                std::sync::Mutex::new(Vec::new());
            let mut made = MADE.lock().map_err(|e| e.to_string())?;
            if let Some(a) = made.iter().find(|a| a.len() == n) {
                return Ok::<_, String>(a.clone());
            }
            let mut a = ShmArrayMut::<f64, Ix1>::zeros(ctx.pool(), n).map_err(|e| e.to_string())?;
            a.view_mut().fill(1.0);
            made.push(a.freeze());
            Ok(made[made.len() - 1].clone())
        })
        .handle("batch", |Serde(rows): Serde<usize>, ctx| {
            // Made once in shared memory, then returned by reference.
            static MADE: std::sync::Mutex<Option<ColumnFrame>> = std::sync::Mutex::new(None);
            let mut made = MADE.lock().map_err(|e| e.to_string())?;
            if made.is_none() {
                let data = batch(rows).map_err(|e| e.to_string())?;
                let payload = Encoder::new(ctx.pool().clone())
                    .encode(&ColumnFrame(data))
                    .map_err(|e| e.to_string())?;
                let decoded: ColumnFrame = Decoder::new(ctx.pool().clone())
                    .decode(&payload)
                    .map_err(|e| e.to_string())?;
                *made = Some(decoded);
            }
            let ColumnFrame(data) = made.as_ref().ok_or("no batch")?;
            Ok::<_, String>(ColumnFrame(data.clone()))
        })
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if is_worker() {
        return Ok(serve(router())?);
    }
    match args.as_slice() {
        [flag, path] if flag == "--socket-server" => return socket_server(path),
        _ => {}
    }
    let quick = args.iter().any(|a| a == "--quick");
    let mut report = String::new();
    rss(&mut report, quick)?;
    b1(&mut report, quick)?;
    b3(&mut report, quick)?;
    python_parent(&mut report, quick)?;
    untrusted(&mut report, quick)?;
    faults(&mut report)?;
    write_section("transport.md", &report)
}

// ---------------------------------------------------------------------------------------------
// Measuring

/// Fields of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

fn python() -> Option<String> {
    std::env::var("SHM_PYTHON").ok()
}

/// Runs a Python baseline; its median round trip.
fn python_baseline(python: &str, args: &[String]) -> Result<Duration, Error> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/bench.py");
    let output = Command::new(python).arg(script).args(args).output()?;
    if !output.status.success() {
        return Err(format!(
            "python bench {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(Duration::from_secs_f64(
        String::from_utf8(output.stdout)?.trim().parse()?,
    ))
}

// ---------------------------------------------------------------------------------------------
// The socket peer: framed arrays (postcard) and batches (Arrow IPC) for B1 and B3.

fn socket_server(path: &str) -> Result<(), Error> {
    let mut stream = BufReader::new(UnixStream::connect(path)?);
    loop {
        let mut header = [0u8; 9];
        if stream.read_exact(&mut header).is_err() {
            return Ok(());
        }
        let len = u64::from_le_bytes(header[1..].try_into()?) as usize;
        let mut message = vec![0u8; len];
        stream.read_exact(&mut message)?;
        let answer = match header[0] {
            b'A' => postcard::from_bytes::<Vec<f64>>(&message)?
                .iter()
                .sum::<f64>()
                .to_le_bytes(),
            b'B' => {
                let reader = StreamReader::try_new(message.as_slice(), None)?;
                let rows: usize = reader
                    .map(|b| b.map(|b| b.num_rows()))
                    .sum::<Result<_, _>>()?;
                (rows as u64).to_le_bytes()
            }
            other => return Err(format!("unknown message type {other}").into()),
        };
        stream.get_mut().write_all(&answer)?;
    }
}

/// A socket peer process and the stream to it.
struct SocketPeer {
    child: Child,
    stream: UnixStream,
    path: std::path::PathBuf,
}

impl SocketPeer {
    fn start(mode: &str) -> Result<Self, Error> {
        let path =
            std::env::temp_dir().join(format!("shm-bench-{}-{mode}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let child = Command::new(std::env::current_exe()?)
            .arg(mode)
            .arg(&path)
            .spawn()?;
        let (stream, _) = listener.accept()?;
        Ok(SocketPeer {
            child,
            stream,
            path,
        })
    }

    fn round_trip(&mut self, kind: u8, message: &[u8]) -> Result<[u8; 8], Error> {
        self.stream.write_all(&[kind])?;
        self.stream
            .write_all(&(message.len() as u64).to_le_bytes())?;
        self.stream.write_all(message)?;
        let mut answer = [0u8; 8];
        self.stream.read_exact(&mut answer)?;
        Ok(answer)
    }

    fn stop(mut self) -> Result<(), Error> {
        self.stream.shutdown(std::net::Shutdown::Both)?;
        self.child.wait()?;
        let _ = std::fs::remove_file(&self.path);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The sections

/// Resident memory of both processes when a 1 GiB array goes to the worker zero-copy.
fn rss(report: &mut String, quick: bool) -> Result<(), Error> {
    let size: usize = if quick { 256 << 20 } else { 1 << 30 };
    eprintln!("... resident memory, {} zero-copy", human(size));
    let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
    let mut x = ShmArrayMut::<f64, Ix1>::zeros(worker.shm_pool(), size / 8)?;
    x.view_mut().fill(1.0);
    let x = x.freeze();
    let Serde((sum, _)): Serde<(f64, u64)> = worker.call("sum", &x)?;
    if sum != (size / 8) as f64 {
        return Err("wrong sum".into());
    }
    let (me, it) = (std::process::id(), worker.pid());
    writeln!(
        report,
        "## Resident memory: {} sent zero-copy\n",
        human(size)
    )?;
    writeln!(
        report,
        "Peak resident set (VmHWM) and its parts now, in MiB, after the parent produced a {} \
         f64 array in shared memory and the worker summed it. Shared pages count in both \
         processes' RSS but exist once; `RssAnon` is private memory, which a copy would grow.\n",
        human(size)
    )?;
    writeln!(report, "| process | VmHWM | RssAnon | RssShmem |")?;
    writeln!(report, "| --- | ---: | ---: | ---: |")?;
    for (name, pid) in [("parent", me), ("worker", it)] {
        writeln!(
            report,
            "| {name} | {} | {} | {} |",
            status_kib(pid, "VmHWM") >> 10,
            status_kib(pid, "RssAnon") >> 10,
            status_kib(pid, "RssShmem") >> 10
        )?;
    }
    drop(x);
    worker.shutdown();
    Ok(())
}

/// Results of B1 for the chart: (method, size, GB/s).
type Points = Vec<(&'static str, usize, f64)>;

fn b1(report: &mut String, quick: bool) -> Result<(), Error> {
    let sizes: &[usize] = if quick {
        &[1 << 20, 64 << 20]
    } else {
        &[1 << 20, 64 << 20, 1 << 30]
    };
    let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
    let mut peer = SocketPeer::start("--socket-server")?;
    writeln!(report, "\n## B1: large array round trip\n")?;
    writeln!(
        report,
        "Parent sends an f64 array, the worker sums it, the sum comes back. GB/s counts the \
         array's bytes per round trip; `/ memcpy` divides by the memcpy bandwidth measured at the \
         same size in this run. For shm, `overhead` is the round trip minus the worker's own \
         summing time; the length-only row is the transport's own cost. A one-copy round trip \
         also moves the fresh data from the writing core's cache to the reading core's, which \
         dominates at 1 MiB.\n"
    )?;
    writeln!(
        report,
        "| size | method | round trip | GB/s | / memcpy | overhead |"
    )?;
    writeln!(report, "| ---: | --- | ---: | ---: | ---: | ---: |")?;
    let mut points: Points = Vec::new();
    // Per size: transport cost, zero-copy overhead over compute, one-copy's copy / memcpy.
    let mut targets: Vec<(usize, Duration, Duration, f64)> = Vec::new();
    for &size in sizes {
        let runs = if size >= 1 << 30 {
            5
        } else if size >= 64 << 20 {
            15
        } else {
            101
        };
        let warmup = (runs / 5).max(2);
        eprintln!("... B1 {}", human(size));
        let n = size / 8;
        let heap = Array1::from_elem(n, 1.0f64);
        let mut copy = vec![0.0f64; n];
        let memcpy = median(&sample(warmup, runs, || {
            copy.copy_from_slice(heap.as_slice().ok_or("contiguous")?);
            Ok(())
        })?);
        let mut rows: Vec<(&'static str, Duration, Option<Duration>)> = Vec::new();

        let mut produced = ShmArrayMut::<f64, Ix1>::zeros(worker.shm_pool(), n)?;
        produced.view_mut().fill(1.0);
        let shared = produced.freeze();
        let mut compute = Vec::new();
        let zero = median(&sample(warmup, runs, || {
            let Serde((_, ns)): Serde<(f64, u64)> = worker.call("sum", &shared)?;
            compute.push(Duration::from_nanos(ns));
            Ok(())
        })?);
        compute.sort();
        let zero_overhead = zero.saturating_sub(median(&compute));
        rows.push(("shm zero-copy", zero, Some(zero_overhead)));
        let transport = median(&sample(warmup, runs, || {
            let Serde(len): Serde<usize> = worker.call("len", &shared)?;
            std::hint::black_box(len);
            Ok(())
        })?);
        rows.push((
            "shm zero-copy, handler reads only the length",
            transport,
            Some(transport),
        ));
        drop(shared);

        let mut compute = Vec::new();
        let one = median(&sample(warmup, runs, || {
            let Serde((_, ns)): Serde<(f64, u64)> = worker.call("sum", &heap)?;
            compute.push(Duration::from_nanos(ns));
            Ok(())
        })?);
        compute.sort();
        rows.push((
            "shm one-copy",
            one,
            Some(one.saturating_sub(median(&compute))),
        ));
        // The copy's own cost: what one-copy adds to the zero-copy round trip.
        let copy = one.saturating_sub(zero);
        targets.push((
            size,
            transport,
            zero_overhead,
            gbs(size, copy) / gbs(size, memcpy),
        ));

        let vector = heap.to_vec();
        let socket = median(&sample(warmup.min(3), runs.min(15), || {
            let message = postcard::to_stdvec(&vector)?;
            peer.round_trip(b'A', &message)?;
            Ok(())
        })?);
        rows.push(("postcard over a Unix socket", socket, None));
        drop(vector);

        if let Some(python) = python() {
            let runs = runs.min(15).to_string();
            for (method, command) in [
                ("Python Pipe (pickle 5)", "pipe-array"),
                ("Python shared_memory + numpy", "shm-array"),
            ] {
                eprintln!("... B1 {} {method}", human(size));
                let time =
                    python_baseline(&python, &[command.into(), size.to_string(), runs.clone()])?;
                rows.push((method, time, None));
            }
        }
        for (method, time, overhead) in rows {
            let reads_data = !method.contains("only the length");
            if reads_data {
                points.push((method, size, gbs(size, time)));
            }
            let (rate, share) = if reads_data {
                (
                    format!("{:.1}", gbs(size, time)),
                    format!("{:.2}", memcpy.as_secs_f64() / time.as_secs_f64()),
                )
            } else {
                (String::new(), String::new())
            };
            writeln!(
                report,
                "| {} | {method} | {} | {rate} | {share} | {} |",
                human(size),
                ms(time),
                overhead.map(ms).unwrap_or_default()
            )?;
        }
        writeln!(
            report,
            "| {} | memcpy (baseline) | {} | {:.1} | 1.00 | |",
            human(size),
            ms(memcpy),
            gbs(size, memcpy)
        )?;
        points.push(("memcpy", size, gbs(size, memcpy)));
    }
    peer.stop()?;
    worker.shutdown();
    chart(&points, sizes)?;
    writeln!(report, "\n![B1 chart](b1.svg)\n")?;
    writeln!(
        report,
        "| size | transport cost (length only) | zero-copy overhead over compute | one-copy's copy / memcpy |"
    )?;
    writeln!(report, "| ---: | ---: | ---: | ---: |")?;
    for (size, transport, overhead, copy) in &targets {
        writeln!(
            report,
            "| {} | {} | {} | {copy:.2} |",
            human(*size),
            ms(*transport),
            ms(*overhead)
        )?;
    }
    if let (Some(first), Some(last)) = (targets.first(), targets.last()) {
        let ratio = last.1.as_secs_f64() / first.1.as_secs_f64();
        let worst_overhead = targets.iter().map(|t| t.2).max().unwrap_or_default();
        let largest_copy = last.3;
        writeln!(
            report,
            "\nTargets: zero-copy cost independent of size — {} is {ratio:.2}x {} ({}); \
             under 1 ms above the worker's compute — worst {} ({}); one-copy at least 0.8x \
             memcpy — {largest_copy:.2} at {} ({}).",
            human(last.0),
            human(first.0),
            if ratio <= 2.0 { "met" } else { "missed" },
            ms(worst_overhead),
            if worst_overhead < Duration::from_millis(1) {
                "met"
            } else {
                "missed"
            },
            human(last.0),
            if largest_copy >= 0.8 {
                "met"
            } else {
                "missed: at this size the copy runs at the speed of moving freshly written cache lines to the other core, not of memcpy within one core"
            },
        )?;
    }
    Ok(())
}

/// A bar chart of B1: GB/s per method and size, on a log scale.
fn chart(points: &Points, sizes: &[usize]) -> Result<(), Error> {
    let mut methods: Vec<&str> = Vec::new();
    for (m, _, _) in points {
        if !methods.contains(m) {
            methods.push(m);
        }
    }
    let colors = [
        "#1b7837", "#5aae61", "#9970ab", "#e08214", "#b35806", "#878787",
    ];
    let (width, height, left, bottom, top) = (900.0, 420.0, 70.0, 60.0, 40.0);
    let plot_h = height - bottom - top;
    let group_w = (width - left - 20.0) / sizes.len() as f64;
    let bar_w = group_w * 0.8 / methods.len() as f64;
    let y = |gbs: f64| {
        let (lo, hi) = (0.01f64.log10(), 100f64.log10());
        top + plot_h * (1.0 - (gbs.max(0.01).log10() - lo) / (hi - lo))
    };
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    write!(
        svg,
        r#"<text x="{left}" y="20" font-size="15">B1: array round trip, GB/s (log scale)</text>"#
    )?;
    for tick in [0.01, 0.1, 1.0, 10.0, 100.0] {
        write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{tick}</text>"##,
            width - 20.0,
            left - 6.0,
            y(tick) + 4.0,
            y = y(tick)
        )?;
    }
    for (g, &size) in sizes.iter().enumerate() {
        let x0 = left + g as f64 * group_w + group_w * 0.1;
        write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x0 + group_w * 0.4,
            height - bottom + 18.0,
            human(size)
        )?;
        for (i, method) in methods.iter().enumerate() {
            if let Some((_, _, v)) = points.iter().find(|(m, s, _)| m == method && *s == size) {
                let x = x0 + i as f64 * bar_w;
                write!(
                    svg,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{method}: {v:.2} GB/s</title></rect>"#,
                    y(*v),
                    bar_w * 0.9,
                    (top + plot_h - y(*v)).max(0.0),
                    colors[i % colors.len()]
                )?;
            }
        }
    }
    for (i, method) in methods.iter().enumerate() {
        let x = left + (i % 3) as f64 * 260.0;
        let ly = height - 22.0 + (i / 3) as f64 * 14.0 - 8.0;
        write!(
            svg,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{method}</text>"#,
            ly - 9.0,
            colors[i % colors.len()],
            x + 14.0,
            ly
        )?;
    }
    svg.push_str("</svg>\n");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("b1.svg"), svg)?;
    Ok(())
}

fn b3(report: &mut String, quick: bool) -> Result<(), Error> {
    let rows = if quick { 1_000_000 } else { 10_000_000 };
    let runs = if quick { 9 } else { 5 };
    eprintln!("... B3 {rows} rows");
    let data = batch(rows)?;
    let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
    let check = |n: usize| {
        if n == rows {
            Ok(())
        } else {
            Err(Error::from(format!("{n} rows came back")))
        }
    };
    let one_copy = median(&sample(2, runs, || {
        let Serde(n): Serde<usize> = worker.call("rows", &ColumnFrame(data.clone()))?;
        check(n)
    })?);
    let payload = Encoder::new(worker.shm_pool().clone()).encode(&ColumnFrame(data.clone()))?;
    let ColumnFrame(shared) = Decoder::new(worker.shm_pool().clone()).decode(&payload)?;
    let zero_copy = median(&sample(2, runs, || {
        let Serde(n): Serde<usize> = worker.call("rows", &ColumnFrame(shared.clone()))?;
        check(n)
    })?);
    drop((shared, payload));
    worker.shutdown();
    let mut peer = SocketPeer::start("--socket-server")?;
    let ipc = median(&sample(1, runs, || {
        let mut writer = StreamWriter::try_new(Vec::new(), &data.schema())?;
        writer.write(&data)?;
        let bytes = writer.into_inner()?;
        let n = u64::from_le_bytes(peer.round_trip(b'B', &bytes)?);
        check(n as usize)
    })?);
    peer.stop()?;
    let pyarrow = match python() {
        Some(python) => Some(python_baseline(
            &python,
            &["pipe-ipc".into(), rows.to_string(), runs.to_string()],
        )?),
        None => None,
    };
    writeln!(report, "\n## B3: RecordBatch round trip\n")?;
    writeln!(
        report,
        "{rows} rows of six columns (f64, i64, utf8, dictionary, timestamp with time zone, bool \
         with nulls) to the worker, which reads the batch (Arrow's validation included) and \
         returns its row count. Medians of {runs}.\n"
    )?;
    writeln!(report, "| method | round trip | IPC over socket / this |")?;
    writeln!(report, "| --- | ---: | ---: |")?;
    let mut rows_out = vec![
        ("shm per-column, batch on the heap (one copy)", one_copy),
        (
            "shm per-column, batch in shared memory (zero-copy)",
            zero_copy,
        ),
        ("Arrow IPC over a Unix socket", ipc),
    ];
    if let Some(time) = pyarrow {
        rows_out.push(("pyarrow IPC over a Pipe", time));
    }
    for (method, time) in rows_out {
        writeln!(
            report,
            "| {method} | {} | {:.1}x |",
            ms(time),
            ipc.as_secs_f64() / time.as_secs_f64()
        )?;
    }
    let speedup = ipc.as_secs_f64() / one_copy.as_secs_f64();
    writeln!(
        report,
        "\nTarget: at least 10x faster than Arrow IPC over a socket — {speedup:.1}x with one copy ({}).",
        if speedup >= 10.0 { "met" } else { "missed" }
    )?;
    Ok(())
}

/// B9: a Python parent (the module `shm`, built into `SHM_PYTHON`'s environment by `cargo
/// xtask bench`) has a worker sum 64 MiB, through shm and through `multiprocessing`.
fn python_parent(report: &mut String, quick: bool) -> Result<(), Error> {
    let Some(python) = python() else {
        writeln!(
            report,
            "\n## B9: a Python parent\n\nSkipped: no SHM_PYTHON."
        )?;
        return Ok(());
    };
    eprintln!("... B9 Python parent");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shm-py/bench/python_parent.py"
    );
    let runs = if quick { "7" } else { "15" };
    let output = Command::new(&python)
        .arg(script)
        .arg("--worker")
        .arg(std::env::current_exe()?)
        .args(["--mib", "64", "--runs", runs])
        .output()?;
    if !output.status.success() {
        return Err(format!("{script}: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    let ways: Vec<(String, Duration)> = String::from_utf8(output.stdout)?
        .lines()
        .map(|line| {
            let (way, seconds) = line.split_once('\t').ok_or("a line without a tab")?;
            Ok((way.to_owned(), Duration::from_secs_f64(seconds.parse()?)))
        })
        .collect::<Result<_, Error>>()?;
    let time_of = |prefix: &str| {
        ways.iter()
            .find(|(way, _)| way.starts_with(prefix))
            .map(|(_, time)| *time)
            .ok_or_else(|| format!("{script} printed no {prefix:?} row"))
    };
    let one_copy = time_of("shm, Rust worker, one copy")?;
    let fastest_baseline =
        time_of("multiprocessing.Pool")?.min(time_of("multiprocessing.shared_memory")?);
    writeln!(report, "\n## B9: a Python parent\n")?;
    writeln!(
        report,
        "A Python program (`import shm`) has a worker sum a 64 MiB f64 array and return the \
         sum: with shm (a Rust worker; a Python worker served by `shm.serve`, which sums with \
         numpy like the baselines), with `multiprocessing.Pool.apply` (the array pickled \
         through a pipe), and with `multiprocessing.shared_memory` done by hand (a segment \
         created, filled, attached by name in the pool's process, unlinked). Medians of \
         {runs}, from `crates/shm-py/bench/python_parent.py`.\n"
    )?;
    writeln!(report, "| way | round trip | / shm one copy |")?;
    writeln!(report, "| --- | ---: | ---: |")?;
    for (way, time) in &ways {
        writeln!(
            report,
            "| {way} | {} | {:.1}x |",
            ms(*time),
            time.as_secs_f64() / one_copy.as_secs_f64()
        )?;
    }
    let speedup = fastest_baseline.as_secs_f64() / one_copy.as_secs_f64();
    writeln!(
        report,
        "\nTarget: a call with one copy at least 2x faster than the fastest way with \
         `multiprocessing` — {speedup:.1}x ({}).",
        if speedup >= 2.0 { "met" } else { "missed" }
    )?;
    Ok(())
}

/// Replies read in place against replies copied into private memory first
/// (`WorkerConfig::untrusted`), in one run.
fn untrusted(report: &mut String, quick: bool) -> Result<(), Error> {
    let sizes: &[usize] = if quick {
        &[1 << 20, 64 << 20]
    } else {
        &[1 << 20, 64 << 20, 1 << 30]
    };
    let rows = if quick { 1_000_000 } else { 10_000_000 };
    let trusted = Worker::spawn(WorkerConfig::current_exe()?)?;
    let untrusted = Worker::spawn(WorkerConfig::current_exe()?.with_untrusted(true))?;
    writeln!(
        report,
        "\n## Untrusted workers: replies read from private copies\n"
    )?;
    writeln!(
        report,
        "The worker returns an f64 array of ones (or a batch, B3's six columns) that it holds \
         in shared memory; the parent reads every element (sums the array; Arrow's full \
         validation for the batch). `in place`: the default, zero-copy. `private copy`: \
         `WorkerConfig::untrusted(true)`, which copies every reply block into private memory \
         before decoding, so that the worker can neither rewrite nor truncate what the parent \
         validated. Medians; `memcpy` is a copy of the same bytes between heap buffers in this \
         run.\n"
    )?;
    writeln!(
        report,
        "| reply | in place | private copy | private / in place | memcpy |"
    )?;
    writeln!(report, "| --- | ---: | ---: | ---: | ---: |")?;
    for &size in sizes {
        let n = size / 8;
        let runs = if size >= 1 << 30 {
            5
        } else if size >= 64 << 20 {
            15
        } else {
            101
        };
        eprintln!("... untrusted {}", human(size));
        let read = |worker: &Worker| -> Result<Duration, Error> {
            median_call(runs, || {
                let a: ShmArray<f64, Ix1> = worker.call("ones", &Serde(n))?;
                let sum = a.view().sum();
                if sum != n as f64 {
                    return Err(format!("sum {sum} of {n} ones").into());
                }
                Ok(())
            })
        };
        let (in_place, private) = (read(&trusted)?, read(&untrusted)?);
        let heap = vec![1u8; size];
        let mut copy = vec![0u8; size];
        let memcpy = median(&sample(2, runs, || {
            copy.copy_from_slice(&heap);
            Ok(())
        })?);
        writeln!(
            report,
            "| {} array | {} | {} | {:.2} | {} |",
            human(size),
            ms(in_place),
            ms(private),
            private.as_secs_f64() / in_place.as_secs_f64(),
            ms(memcpy)
        )?;
    }
    eprintln!("... untrusted {rows} rows");
    let read = |worker: &Worker| -> Result<Duration, Error> {
        median_call(if quick { 9 } else { 5 }, || {
            let ColumnFrame(batch) = worker.call("batch", &Serde(rows))?;
            if batch.num_rows() != rows {
                return Err(format!("{} rows came back", batch.num_rows()).into());
            }
            Ok(())
        })
    };
    let (in_place, private) = (read(&trusted)?, read(&untrusted)?);
    writeln!(
        report,
        "| {rows}-row batch | {} | {} | {:.2} | |",
        ms(in_place),
        ms(private),
        private.as_secs_f64() / in_place.as_secs_f64()
    )?;
    trusted.shutdown();
    untrusted.shutdown();
    Ok(())
}

/// The median of `runs` timed calls of `call`, after two untimed ones.
fn median_call(runs: usize, call: impl FnMut() -> Result<(), Error>) -> Result<Duration, Error> {
    Ok(median(&sample(2, runs, call)?))
}

/// How long a caller waits to learn that its worker died, and how long a restart takes.
fn faults(report: &mut String) -> Result<(), Error> {
    eprintln!("... faults");
    let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
    let mut detections = Vec::new();
    let mut restarts = Vec::new();
    for _ in 0..5 {
        let pid = worker.pid();
        let killed = std::thread::scope(|scope| {
            let call = scope.spawn(|| worker.call::<_, ()>("sleep", &Serde(60_000u64)));
            std::thread::sleep(Duration::from_millis(100));
            let start = Instant::now();
            // SAFETY: kill has no memory preconditions; `pid` is our live worker.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let result = call.join().map_err(|_| "the calling thread panicked")?;
            match result {
                Err(shm_transport::TransportError::WorkerDied { .. }) => {
                    Ok::<_, Error>(start.elapsed())
                }
                other => Err(format!("expected WorkerDied, got {other:?}").into()),
            }
        })?;
        detections.push(killed);
        let start = Instant::now();
        worker.restart()?;
        restarts.push(start.elapsed());
    }
    worker.shutdown();
    detections.sort();
    restarts.sort();
    writeln!(report, "\n## Faults\n")?;
    writeln!(
        report,
        "A worker is killed with SIGKILL while a call waits on it (5 times): the time until the \
         call returns `WorkerDied`, and the time `restart()` takes to have a new worker serving.\n"
    )?;
    writeln!(report, "| what | median | worst |")?;
    writeln!(report, "| --- | ---: | ---: |")?;
    writeln!(
        report,
        "| SIGKILL to `WorkerDied` | {} | {} |",
        ms(median(&detections)),
        ms(detections[detections.len() - 1])
    )?;
    writeln!(
        report,
        "| `restart()` | {} | {} |",
        ms(median(&restarts)),
        ms(restarts[restarts.len() - 1])
    )?;
    Ok(())
}
