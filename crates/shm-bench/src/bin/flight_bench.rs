//! B7, remote workers: arrays and a record batch to a worker over loopback Flight, against
//! Arrow IPC over a plain TCP socket and against a local shared-memory worker, all in one run;
//! the raw loopback TCP bandwidth of the same run is the yardstick. Writes
//! `target/bench/flight.md`. `--quick` for a short run.
//!
//! The binary plays every part: run plainly it is the bench; `--serve` is the remote host (a
//! Flight server and a TCP server for the baselines); started by `Worker::spawn` it is the
//! local worker. Every worker runs the same router.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, Float64Array, RecordBatch};
use arrow::datatypes::Float64Type;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use ndarray::{Array1, IxDyn};
use shm_arrow::ColumnFrame;
use shm_codec::{Encode, Encoder, Serde, ShmArray};
use shm_flight::{RemoteConfig, RemoteWorker, Server, ServerConfig};
use shm_transport::{Callee, Router, Worker, WorkerConfig, is_worker, serve};

use shm_bench::{Error, gbs, human, in_rounds, median, ms, sample, write_section};
use shm_transport::CalleeExt;

fn router() -> Router {
    Router::new()
        .handle("sum", |a: ShmArray<f64, IxDyn>, _| {
            Ok::<_, String>(Serde(a.view().sum()))
        })
        .handle("rows", |ColumnFrame(b), _| {
            Ok::<_, String>(Serde(b.num_rows()))
        })
        .handle("echo", |ColumnFrame(b), _| Ok::<_, String>(ColumnFrame(b)))
}

fn main() -> Result<(), Error> {
    if is_worker() {
        return Ok(serve(router())?);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--serve") {
        return remote_host();
    }
    let quick = args.iter().any(|a| a == "--quick");
    bench(quick)
}

/// The remote host: a Flight server on one port, the TCP baselines on another; prints both
/// and serves until stdin closes.
fn remote_host() -> Result<(), Error> {
    let server = Server::start(router(), ServerConfig::new("127.0.0.1:0".parse()?))?;
    let tcp = TcpListener::bind("127.0.0.1:0")?;
    println!("{} {}", server.local_addr(), tcp.local_addr()?);
    std::io::stdout().flush()?;
    std::thread::spawn(move || {
        for stream in tcp.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                // A broken connection ends that connection only.
                let _ = serve_tcp(stream);
            });
        }
    });
    std::io::stdin().read_to_end(&mut Vec::new())?;
    server.shutdown();
    Ok(())
}

/// One baseline exchange per request, until the peer closes: `R` + length + bytes (read and
/// discarded: the bare bandwidth of the socket, answered with the length), or `I` + an Arrow IPC stream (read, validated and
/// reduced as the Flight handlers do, answered with the row count or the sum's bits).
fn serve_tcp(stream: TcpStream) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(1 << 20, stream.try_clone()?);
    let mut writer = stream;
    let mut kind = [0u8; 1];
    while reader.read_exact(&mut kind).is_ok() {
        let answer: u64 = match kind[0] {
            b'R' => {
                let mut len = [0u8; 8];
                reader.read_exact(&mut len)?;
                let len = u64::from_le_bytes(len);
                let copied = std::io::copy(&mut (&mut reader).take(len), &mut std::io::sink())?;
                if copied != len {
                    return Err(format!("{copied} of {len} bytes came").into());
                }
                len
            }
            b'I' => {
                let mut batches = StreamReader::try_new(&mut reader, None)?;
                let mut rows = 0u64;
                let mut sum = 0.0f64;
                for batch in &mut batches {
                    let batch = batch?;
                    rows += batch.num_rows() as u64;
                    if batch.num_columns() == 1
                        && let Some(values) = batch.column(0).as_primitive_opt::<Float64Type>()
                    {
                        sum += values.values().iter().sum::<f64>();
                    }
                }
                if sum != 0.0 { sum.to_bits() } else { rows }
            }
            other => return Err(format!("unknown request {other}").into()),
        };
        writer.write_all(&answer.to_le_bytes())?;
    }
    Ok(())
}

/// The remote host process, stopped when dropped.
struct RemoteHost {
    child: Child,
    flight: String,
    tcp: String,
}

impl RemoteHost {
    fn start() -> Result<Self, Error> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        std::io::BufRead::read_line(&mut out, &mut line)?;
        let mut words = line.split_whitespace();
        let flight = words.next().ok_or("no Flight address")?.to_owned();
        let tcp = words.next().ok_or("no TCP address")?.to_owned();
        Ok(RemoteHost { child, flight, tcp })
    }
}

impl Drop for RemoteHost {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A TCP connection to the baseline server.
struct Tcp {
    reader: TcpStream,
    writer: BufWriter<TcpStream>,
}

impl Tcp {
    fn connect(addr: &str) -> Result<Self, Error> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Tcp {
            reader: stream.try_clone()?,
            writer: BufWriter::with_capacity(1 << 20, stream),
        })
    }

    fn answer(&mut self) -> Result<u64, Error> {
        self.writer.flush()?;
        let mut answer = [0u8; 8];
        self.reader.read_exact(&mut answer)?;
        Ok(u64::from_le_bytes(answer))
    }

    fn raw(&mut self, bytes: &[u8]) -> Result<u64, Error> {
        self.writer.write_all(b"R")?;
        self.writer.write_all(&(bytes.len() as u64).to_le_bytes())?;
        self.writer.write_all(bytes)?;
        self.answer()
    }

    fn ipc(&mut self, batch: &RecordBatch) -> Result<u64, Error> {
        self.writer.write_all(b"I")?;
        let mut writer = StreamWriter::try_new(&mut self.writer, &batch.schema())?;
        writer.write(batch)?;
        writer.finish()?;
        drop(writer);
        self.answer()
    }
}

/// The remote rows' method names.
const REMOTE_HEAP: &str = "shm-flight remote worker (value on the heap)";
const REMOTE_SHM: &str = "shm-flight remote worker (value already in shared memory)";
const REMOTE_GRPC: &str = "shm-flight remote worker, gRPC messages only (value on the heap)";

/// The yardstick's method name.
const RAW_TCP: &str = "raw bytes over loopback TCP (the yardstick)";

/// A method of B7 other than the yardstick: its name, and one run of it.
type Method<'a> = (&'static str, &'a mut dyn FnMut() -> Result<(), Error>);

/// B7's rows for one payload of `bytes` bytes: the yardstick (as many raw bytes over the
/// baseline connection) and `methods`, in rounds that run each of them once (after one round of
/// warm-up), so that all of them meet the same state of the machine.
fn payload_rows(
    what: &str,
    bytes: usize,
    runs: usize,
    tcp: &RefCell<Tcp>,
    methods: Vec<Method<'_>>,
) -> Result<Vec<Row>, Error> {
    let raw_bytes = vec![7u8; bytes];
    let mut raw = || {
        sample(0, 1, || {
            let n = tcp.borrow_mut().raw(&raw_bytes)?;
            (n as usize == bytes)
                .then_some(())
                .ok_or("short read".into())
        })
    };
    let mut names = vec![RAW_TCP];
    let mut timed: Vec<&mut dyn FnMut() -> Result<Vec<Duration>, Error>> = vec![&mut raw];
    let mut runs_of: Vec<_> = methods
        .into_iter()
        .map(|(name, run)| {
            names.push(name);
            move || sample(0, 1, &mut *run)
        })
        .collect();
    timed.extend(
        runs_of
            .iter_mut()
            .map(|run| run as &mut dyn FnMut() -> Result<Vec<Duration>, Error>),
    );
    in_rounds(1, &mut timed)?;
    let times = in_rounds(runs, &mut timed)?;
    Ok(names
        .into_iter()
        .zip(times)
        .map(|(method, times)| Row {
            what: what.to_owned(),
            method,
            time: median(&times),
            bytes,
        })
        .collect())
}

/// One row of the table: what moved, how, and its median time.
struct Row {
    what: String,
    method: &'static str,
    time: Duration,
    bytes: usize,
}

fn bench(quick: bool) -> Result<(), Error> {
    let host = RemoteHost::start()?;
    let remote = RemoteWorker::new(RemoteConfig::new(format!("http://{}", host.flight)))?;
    // The same server, its payloads in gRPC messages: what gRPC framing itself allows.
    let grpc = RemoteWorker::new(
        RemoteConfig::new(format!("http://{}", host.flight)).with_data_connections(false),
    )?;
    let local = Worker::spawn(WorkerConfig::current_exe()?)?;
    let tcp = RefCell::new(Tcp::connect(&host.tcp)?);
    let sizes: &[usize] = if quick {
        &[64 << 20]
    } else {
        &[64 << 20, 1 << 30]
    };
    let batch_rows = if quick { 1_000_000 } else { 10_000_000 };
    let mut rows = Vec::new();
    for &size in sizes {
        let runs = if size >= 1 << 30 { 3 } else { 9 };
        eprintln!("... B7 array of {}", human(size));
        let array = Array1::from_shape_fn(size / 8, |i| (i % 1000) as f64).into_dyn();
        let expected = array.sum();
        let check = |sum: f64| {
            if sum == expected {
                Ok(())
            } else {
                Err(Error::from(format!("sum {sum}, expected {expected}")))
            }
        };
        let values = Float64Array::from(array.as_slice().ok_or("contiguous")?.to_vec());
        let record = RecordBatch::try_from_iter([("x", Arc::new(values) as Arc<dyn Array>)])?;
        let in_shm = Encoder::new(remote.shm_pool().clone()).encode(&array)?;
        let sum_of = |callee: &dyn Callee, value: &dyn Encode| -> Result<(), Error> {
            let Serde(sum): Serde<f64> = callee.call("sum", value)?;
            check(sum)
        };
        rows.extend(payload_rows(
            &format!("array of {}", human(size)),
            size,
            runs,
            &tcp,
            vec![
                ("Arrow IPC over loopback TCP", &mut || {
                    check(f64::from_bits(tcp.borrow_mut().ipc(&record)?))
                }),
                (REMOTE_HEAP, &mut || sum_of(&remote, &array)),
                (REMOTE_SHM, &mut || sum_of(&remote, &in_shm)),
                (REMOTE_GRPC, &mut || sum_of(&grpc, &array)),
                (
                    "local shm worker (array on the heap: one copy)",
                    &mut || sum_of(&local, &array),
                ),
            ],
        )?);
    }
    eprintln!("... B7 batch of {batch_rows} rows");
    let batch = shm_bench::mixed_batch(batch_rows)?;
    let bytes: usize = shm_bench::buffers(&batch).iter().map(|b| b.len()).sum();
    let runs = if quick { 5 } else { 3 };
    let check = |n: u64| {
        if n as usize == batch_rows {
            Ok(())
        } else {
            Err(Error::from(format!("{n} rows")))
        }
    };
    let what = format!("batch of {batch_rows} rows ({})", human(bytes));
    let in_shm = Encoder::new(remote.shm_pool().clone()).encode(&ColumnFrame(batch.clone()))?;
    let rows_of = |callee: &dyn Callee, value: &dyn Encode| -> Result<(), Error> {
        let Serde(n): Serde<usize> = callee.call("rows", value)?;
        check(n as u64)
    };
    rows.extend(payload_rows(
        &what,
        bytes,
        runs,
        &tcp,
        vec![
            ("Arrow IPC over loopback TCP", &mut || {
                check(tcp.borrow_mut().ipc(&batch)?)
            }),
            (REMOTE_HEAP, &mut || {
                rows_of(&remote, &ColumnFrame(batch.clone()))
            }),
            (REMOTE_SHM, &mut || rows_of(&remote, &in_shm)),
            (REMOTE_GRPC, &mut || {
                rows_of(&grpc, &ColumnFrame(batch.clone()))
            }),
            (
                "local shm worker (batch on the heap: one copy)",
                &mut || rows_of(&local, &ColumnFrame(batch.clone())),
            ),
        ],
    )?);
    drop(in_shm);
    let wide = wide_frames(quick, &local, &remote)?;
    local.shutdown();
    drop((remote, grpc, tcp, host));

    let mut report = String::new();
    writeln!(report, "## B7: remote workers over Arrow Flight\n")?;
    writeln!(
        report,
        "One call with the payload as argument and a small result, to a worker in another \
         process over loopback (127.0.0.1, plain TCP, no TLS), against the same payload as an \
         Arrow IPC stream over a plain TCP socket and against a local shared-memory worker. \
         The worker reads every value (sums the array; Arrow's validation for the batch, whose \
         six columns are B3's). Times are medians of 9 runs (3 for 1 GiB, 5 for the quick \
         batch, 3 for the full one), taken in rounds after one of warm-up: each round runs every \
         method of the payload once, the yardstick first, so that a drift of the machine's \
         speed slows them alike. `/ TCP` is the rate divided by that of the same number of raw \
         bytes over loopback TCP (read and discarded). The remote worker takes payloads of \
         1 MiB and more over a data connection beside the gRPC call (docs/format.md); `on the \
         heap` includes encoding the value (an array is copied into shared memory first; a \
         batch's buffers go onto the data connection from where they lie), `already in shared \
         memory` sends a payload encoded before, `gRPC messages only` is \
         the same call with data connections off.\n"
    )?;
    writeln!(report, "| payload | method | time | GB/s | / TCP |")?;
    writeln!(report, "| --- | --- | ---: | ---: | ---: |")?;
    let mut tcp_gbs = f64::NAN;
    let mut targets = String::new();
    for row in &rows {
        let rate = gbs(row.bytes, row.time);
        if row.method == RAW_TCP {
            tcp_gbs = rate;
        }
        if row.method == REMOTE_HEAP || row.method == REMOTE_SHM {
            let ratio = rate / tcp_gbs;
            writeln!(
                targets,
                "- {}, {}: {ratio:.2}x ({})",
                row.what,
                row.method,
                if ratio >= 0.8 { "met" } else { "missed" }
            )?;
        }
        writeln!(
            report,
            "| {} | {} | {} | {rate:.2} | {:.2}x |",
            row.what,
            row.method,
            ms(row.time),
            rate / tcp_gbs
        )?;
    }
    writeln!(
        report,
        "\nTarget: a remote call at least 0.8x raw loopback TCP.\n{targets}"
    )?;
    report.push_str(&wide);
    write_section("flight.md", &report)
}

/// A frame of `columns` Int8 columns of `rows` rows.
fn wide_batch(columns: usize, rows: usize) -> Result<RecordBatch, Error> {
    let fields: Vec<arrow::datatypes::Field> = (0..columns)
        .map(|c| {
            arrow::datatypes::Field::new(format!("c{c}"), arrow::datatypes::DataType::Int8, false)
        })
        .collect();
    let arrays: Vec<Arc<dyn Array>> = (0..columns)
        .map(|c| {
            Arc::new(arrow::array::Int8Array::from_iter_values(
                (0..rows).map(|r| (c + r) as i8),
            )) as Arc<dyn Array>
        })
        .collect();
    Ok(RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(fields)),
        arrays,
    )?)
}

/// B8: round trips of frames of 10,000 and 100,000 columns through the local and the remote
/// worker (the handler returns its argument), with the cost per column.
fn wide_frames(quick: bool, local: &Worker, remote: &RemoteWorker) -> Result<String, Error> {
    let shapes: &[(usize, usize)] = if quick {
        &[(10_000, 1), (100_000, 1), (10_000, 1_000), (100_000, 1_000)]
    } else {
        &[
            (10_000, 1),
            (100_000, 1),
            (10_000, 10_000),
            (100_000, 10_000),
        ]
    };
    let mut report = String::new();
    writeln!(report, "\n## B8: wide frames\n")?;
    writeln!(
        report,
        "One call whose argument and result are a frame of Int8 columns (the handler returns \
         its argument), to the local worker and to the remote one of B7; medians of 3 runs \
         after one. The cost per column should not grow with the number of columns.\n"
    )?;
    writeln!(
        report,
        "| columns | rows | local | per column | remote | per column |"
    )?;
    writeln!(report, "| ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let mut per_column = std::collections::HashMap::new();
    for &(columns, rows) in shapes {
        eprintln!("... B8 {columns} columns of {rows} rows");
        let batch = ColumnFrame(wide_batch(columns, rows)?);
        let check = |back: &RecordBatch| -> Result<(), Error> {
            (back.num_columns() == columns && back.num_rows() == rows)
                .then_some(())
                .ok_or_else(|| Error::from("the frame came back another shape"))
        };
        let mut times = Vec::new();
        for callee in [local as &dyn Callee, remote] {
            let time = median(&sample(1, 3, || {
                let ColumnFrame(back): ColumnFrame = callee.call("echo", &batch)?;
                check(&back)
            })?);
            times.push(time);
        }
        let per = |t: Duration| t / columns as u32;
        per_column.insert((columns, rows), (per(times[0]), per(times[1])));
        writeln!(
            report,
            "| {columns} | {rows} | {} | {:.1} µs | {} | {:.1} µs |",
            ms(times[0]),
            per(times[0]).as_secs_f64() * 1e6,
            ms(times[1]),
            per(times[1]).as_secs_f64() * 1e6,
        )?;
    }
    let (_, remote_wide) = per_column.get(&(100_000, 1)).copied().unwrap_or_default();
    let (local_wide, _) = per_column.get(&(100_000, 1)).copied().unwrap_or_default();
    let (local_narrow, remote_narrow) = per_column.get(&(10_000, 1)).copied().unwrap_or_default();
    let growth = |wide: Duration, narrow: Duration| wide.as_secs_f64() / narrow.as_secs_f64();
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let local_growth = growth(local_wide, local_narrow);
    let remote_growth = growth(remote_wide, remote_narrow);
    writeln!(
        report,
        "\nTarget: cost per column of 100,000 columns at most 1.5x that of 10,000 (1 row): \
         local {local_growth:.2}x ({}), remote {remote_growth:.2}x ({}). A 100,000-column \
         round trip under 1 s: local {} ({}), remote {} ({}).",
        verdict(local_growth <= 1.5),
        verdict(remote_growth <= 1.5),
        ms(local_wide * 100_000),
        verdict(local_wide * 100_000 < Duration::from_secs(1)),
        ms(remote_wide * 100_000),
        verdict(remote_wide * 100_000 < Duration::from_secs(1)),
    )?;
    Ok(report)
}
