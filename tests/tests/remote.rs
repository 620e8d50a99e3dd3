//! Remote workers over loopback, each side its own process: every payload kind both ways,
//! the faults a network brings, and a server or a client killed in the middle of a call.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, DictionaryArray, Float64Array, Int32Array, Int64Array, ListArray, RecordBatch,
    StringArray, StructArray,
};
use arrow::datatypes::{DataType, Field, Int32Type};
use ndarray::{Array1, Array2, Array3, ShapeBuilder};
use shm_arrow::ColumnFrame;
use shm_codec::{Index, Serde, ShmArray, SimpleFrame};
use shm_flight::{FlightError, NetworkFault, RemoteConfig, RemoteWorker};
use shm_tests::CleanShm;
use shm_tests::server::ServerProcess;
use shm_transport::{
    CalleeExt, Lifecycle, RemoteErrorKind, TransportError, Worker, WorkerConfig, WorkerPool,
};

const SERVER: &str = env!("CARGO_BIN_EXE_shm-flight-test-server");

fn remote(server: &ServerProcess) -> RemoteWorker {
    RemoteWorker::new(RemoteConfig::new(server.url())).expect("a client")
}

fn network_fault(result: Result<impl std::fmt::Debug, TransportError>) -> (String, NetworkFault) {
    match result {
        Err(err) => match FlightError::fault_of(&err) {
            Some((addr, fault)) => {
                // The message a user sees, for the test log.
                eprintln!("fault: {err}");
                (addr.to_owned(), fault.clone())
            }
            None => panic!("expected a network fault, got {err:?}"),
        },
        Ok(value) => panic!("expected a network fault, got {value:?}"),
    }
}

/// A batch with a column of each layout family: primitive with nulls, strings, a dictionary,
/// a list, and a struct.
fn mixed_batch(rows: usize) -> RecordBatch {
    let ints = Int64Array::from_iter((0..rows).map(|i| (i % 7 != 0).then_some(i as i64 * 3)));
    let floats = Float64Array::from_iter_values((0..rows).map(|i| i as f64 / 4.0));
    let strings = StringArray::from_iter((0..rows).map(|i| (i % 5 != 0).then(|| format!("s{i}"))));
    let keys = Int32Array::from_iter_values((0..rows).map(|i| (i % 3) as i32));
    let values = StringArray::from(vec!["red", "green", "blue"]);
    let dictionary = DictionaryArray::<Int32Type>::try_new(keys, Arc::new(values)).expect("dict");
    let lists = ListArray::from_iter_primitive::<Int32Type, _, _>(
        (0..rows).map(|i| (i % 4 != 0).then(|| (0..(i % 3) as i32).map(Some).collect::<Vec<_>>())),
    );
    let structs = StructArray::from(vec![
        (
            Arc::new(Field::new("a", DataType::Int32, false)),
            Arc::new(Int32Array::from_iter_values((0..rows).map(|i| i as i32))) as ArrayRef,
        ),
        (
            Arc::new(Field::new("b", DataType::Utf8, true)),
            Arc::new(StringArray::from_iter(
                (0..rows).map(|i| (i % 2 == 0).then(|| i.to_string())),
            )) as ArrayRef,
        ),
    ]);
    RecordBatch::try_from_iter([
        ("ints", Arc::new(ints) as ArrayRef),
        ("floats", Arc::new(floats) as ArrayRef),
        ("strings", Arc::new(strings) as ArrayRef),
        ("colour", Arc::new(dictionary) as ArrayRef),
        ("lists", Arc::new(lists) as ArrayRef),
        ("pairs", Arc::new(structs) as ArrayRef),
    ])
    .expect("batch")
}

#[test]
fn every_payload_kind_round_trips_through_a_remote_worker() {
    // Payloads of 1 MiB and more over data connections, both ways.
    every_payload_kind_round_trips(&[], true);
}

#[test]
fn every_payload_kind_round_trips_in_grpc_messages_when_the_client_opens_no_data_connection() {
    every_payload_kind_round_trips(&[], false);
}

#[test]
fn every_payload_kind_round_trips_in_grpc_messages_when_the_server_takes_no_data_connection() {
    every_payload_kind_round_trips(&["--no-data-connections"], true);
}

fn every_payload_kind_round_trips(server_args: &[&str], data_connections: bool) {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, server_args);
    let client = |config: RemoteConfig| {
        RemoteWorker::new(config.with_data_connections(data_connections)).expect("a client")
    };
    let worker = client(RemoteConfig::new(server.url()));

    // Arrays: large (in blocks, several chunks), small (inline), 2-D in Fortran order, 3-D.
    let big = Array1::from_shape_fn(3_000_000, |i| i as f64 * 0.5).into_dyn();
    let back: ShmArray<f64, ndarray::IxDyn> = worker.call("echo_f64", &big).expect("echo");
    assert_eq!(back.view(), big.view());
    let doubled: ShmArray<f64, ndarray::IxDyn> = worker.call("double", &big).expect("double");
    assert!(
        doubled
            .view()
            .iter()
            .zip(big.iter())
            .all(|(d, x)| *d == 2.0 * x)
    );
    let small = Array1::from_vec(vec![1.5f64, -2.0, 3.25]).into_dyn();
    let back: ShmArray<f64, ndarray::IxDyn> = worker.call("echo_f64", &small).expect("small");
    assert_eq!(back.view(), small.view());
    // 1.2 MB: over a data connection from where it lies, in Fortran order.
    let fortran = Array2::from_shape_fn((600, 500).f(), |(i, j)| (i * 1000 + j) as i32).into_dyn();
    let back: ShmArray<i32, ndarray::IxDyn> = worker.call("echo_i32", &fortran).expect("2-D");
    assert_eq!(back.view(), fortran.view());
    let cube = Array3::from_shape_fn((2, 3, 4), |(i, j, k)| (i * 12 + j * 4 + k) as u8).into_dyn();
    let back: ShmArray<u8, ndarray::IxDyn> = worker.call("echo_u8", &cube).expect("3-D");
    assert_eq!(back.view(), cube.view());
    let empty = Array1::<f64>::zeros(0).into_dyn();
    let back: ShmArray<f64, ndarray::IxDyn> = worker.call("echo_f64", &empty).expect("empty");
    assert_eq!(back.shape(), &[0]);

    // A simple frame with labels and an index.
    let pool = worker.shm_pool().clone();
    let frame = SimpleFrame::from_columns(
        &pool,
        &[
            ("x", &(0..50_000).map(f64::from).collect::<Vec<_>>()),
            ("y", &vec![2.5; 50_000]),
        ],
        Index::Range { start: 10, step: 2 },
    )
    .expect("frame");
    let back: SimpleFrame<f64> = worker.call("frame", &frame).expect("frame");
    assert_eq!(back.columns(), frame.columns());
    assert_eq!(back.index(), frame.index());
    assert_eq!(back.data().view(), frame.data().view());

    // Arrow frames: as Flight record batches, one batch and one split into many (the client
    // and the server aim at small batches here), or as blocks over a data connection.
    let batch = mixed_batch(20_000);
    let ColumnFrame(back) = worker
        .call("batch", &ColumnFrame(batch.clone()))
        .expect("batch");
    assert_eq!(back, batch);
    let config = RemoteConfig::new(server.url())
        .with_limits(shm_flight::Limits::default().with_whole_batch_bytes(64 << 10));
    let splitting = client(config);
    let big_batch = mixed_batch(300_000);
    let Serde(rows): Serde<usize> = splitting
        .call("batch_rows", &ColumnFrame(big_batch.clone()))
        .expect("split batch");
    assert_eq!(rows, 300_000);
    let ColumnFrame(back) = splitting
        .call("batch", &ColumnFrame(big_batch.clone()))
        .expect("split");
    assert_eq!(back, big_batch);
    // Over a data connection a batch on the heap goes from where it lies: the client's pool
    // writes no block for it (once a first call has told the client that the server takes
    // data connections). Otherwise it is written into blocks first.
    let lean_pool = shm_core::ShmPool::new().expect("a pool");
    let lean = client(RemoteConfig::new(server.url()).with_pool(lean_pool.clone()));
    let Serde(_): Serde<usize> = lean
        .call("batch_rows", &ColumnFrame(batch.slice(0, 1)))
        .expect("a first call");
    let before = lean_pool.stats().segments_created;
    let Serde(rows): Serde<usize> = lean
        .call("batch_rows", &ColumnFrame(big_batch.clone()))
        .expect("a batch from the heap");
    assert_eq!(rows, 300_000);
    let created = lean_pool.stats().segments_created - before;
    let by_connection = data_connections && server_args.is_empty();
    assert_eq!(created == 0, by_connection, "{created} segments created");
    // Flat columns only: assembled in one copy on each side, however many batches.
    let flat = big_batch.project(&[0, 1, 2, 3]).expect("flat columns");
    let ColumnFrame(back) = splitting
        .call("batch", &ColumnFrame(flat.clone()))
        .expect("a flat frame, split");
    assert_eq!(back, flat);
    let ColumnFrame(back) = worker
        .call("batch", &ColumnFrame(batch.slice(0, 0)))
        .expect("no rows");
    assert_eq!(back.num_rows(), 0);
    assert_eq!(back.schema(), batch.schema());

    // Serde values, inline and in a block of their own (over the inline limit).
    let words: Vec<String> = (0..10).map(|i| format!("word {i}")).collect();
    let Serde(back): Serde<Vec<String>> =
        worker.call("serde", &Serde(words.clone())).expect("serde");
    assert_eq!(back, words);
    let many: Vec<String> = (0..200_000).map(|i| format!("{i:08}")).collect();
    let Serde(back): Serde<Vec<String>> = worker
        .call("serde", &Serde(many.clone()))
        .expect("big serde");
    assert_eq!(back, many);

    // A tuple of an array and a value.
    let ints = Array1::from_shape_fn(100_000, |i| i as i64 - 50_000).into_dyn();
    let (back, Serde(text)): (ShmArray<i64, ndarray::IxDyn>, Serde<String>) = worker
        .call("pair", &(ints.clone(), Serde("abc".to_owned())))
        .expect("tuple");
    assert_eq!(back.view(), ints.view());
    assert_eq!(text, "ABC");

    // Handler failures come back as they do from a local worker.
    match worker.call::<_, ()>("fail", &()) {
        Err(TransportError::Remote(e)) => assert!(e.message.contains("says no"), "{e}"),
        other => panic!("expected a remote error, got {other:?}"),
    }
    match worker.call::<_, ()>("panic", &()) {
        Err(TransportError::Remote(e)) => assert!(e.message.contains("panics"), "{e}"),
        other => panic!("expected a remote error, got {other:?}"),
    }
    match worker.call::<_, ()>("no_such_method", &()) {
        Err(TransportError::Remote(e)) => assert_eq!(e.method, "no_such_method"),
        other => panic!("expected a remote error, got {other:?}"),
    }

    // Nothing the calls received is still held by the server.
    drop((back, doubled));
    let Serde(live): Serde<usize> = worker.call("live_blocks", &()).expect("stats");
    assert_eq!(live, 0, "blocks the server still holds after the calls");
    drop((worker, splitting, frame, pool));
    server.stop();
    clean.end();
}

#[test]
fn each_network_fault_is_a_typed_error_with_the_address_and_the_numbers() {
    let clean = CleanShm::begin();

    // Refused: a port that nothing listens on (bound, then released).
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = free.local_addr().expect("addr");
    drop(free);
    let nobody = RemoteWorker::new(RemoteConfig::new(format!("http://{addr}"))).expect("client");
    let (at, fault) = network_fault(nobody.call::<_, Serde<u32>>("pid", &()));
    assert_eq!(at, format!("http://{addr}"));
    assert!(matches!(fault, NetworkFault::Refused { .. }), "{fault:?}");
    assert!(
        !(&nobody as &dyn Lifecycle).is_alive(),
        "a refused worker counts as down"
    );

    // Unauthenticated: no token, and a wrong one; the right one works.
    let server = ServerProcess::start(
        SERVER,
        &["--token", "open sesame", "--max-payload", "1000000"],
    );
    let anonymous = remote(&server);
    let (_, fault) = network_fault(anonymous.call::<_, Serde<u32>>("pid", &()));
    match fault {
        NetworkFault::Unauthenticated { reason } => {
            assert!(reason.contains("requires a bearer token"), "{reason}")
        }
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
    let wrong = RemoteWorker::new(RemoteConfig::new(server.url()).with_token("open sesame!"))
        .expect("client");
    let (_, fault) = network_fault(wrong.call::<_, Serde<u32>>("pid", &()));
    assert!(
        matches!(fault, NetworkFault::Unauthenticated { .. }),
        "{fault:?}"
    );
    let worker = RemoteWorker::new(RemoteConfig::new(server.url()).with_token("open sesame"))
        .expect("client");
    let Serde(pid): Serde<u32> = worker.call("pid", &()).expect("the right token");
    assert_eq!(pid, server.pid());

    // Too large: the server accepts 1,000,000 bytes of arguments; the call is refused before
    // its data is read, and the connection serves the next call.
    let big = Array1::from_elem(200_000, 1.0f64).into_dyn();
    let (_, fault) = network_fault(worker.call::<_, Serde<f64>>("sum", &big));
    match fault {
        NetworkFault::TooLarge { what, size, limit } => {
            assert_eq!(what, "the arguments of sum");
            assert!(size >= 1_600_000, "{size}");
            assert_eq!(limit, 1_000_000);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // A result larger than the client accepts.
    let config = RemoteConfig::new(server.url())
        .with_token("open sesame")
        .with_limits(shm_flight::Limits::default().with_max_payload(4096));
    let small_client = RemoteWorker::new(config).expect("client");
    let (_, fault) = network_fault(
        small_client.call::<_, ShmArray<u8, ndarray::Ix1>>("zeros", &Serde(100_000usize)),
    );
    match fault {
        NetworkFault::TooLarge { what, size, limit } => {
            assert_eq!(what, "the result of zeros");
            // The array's 100,000 bytes and its few bytes of metadata.
            assert!((100_000..100_100).contains(&size), "{size}");
            assert_eq!(limit, 4096);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }

    // Timeout: the call is abandoned; the server finishes the handler and the next call runs.
    let started = Instant::now();
    let (_, fault) = network_fault(worker.call_timeout::<_, Serde<u64>>(
        "sleep",
        &Serde(1500u64),
        Duration::from_millis(200),
    ));
    match fault {
        NetworkFault::Timeout {
            method, timeout, ..
        } => {
            assert_eq!(method, "sleep");
            assert_eq!(timeout, Duration::from_millis(200));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the timeout waited for the handler"
    );
    let Serde(slept): Serde<u64> = worker.call("sleep", &Serde(1u64)).expect("after a timeout");
    assert_eq!(slept, 1);

    // The server goes away between calls: the next call is refused, not lost.
    let url = server.url();
    server.stop();
    let (at, fault) = network_fault(worker.call::<_, Serde<u32>>("pid", &()));
    assert_eq!(at, url);
    assert!(matches!(fault, NetworkFault::Refused { .. }), "{fault:?}");

    drop((worker, wrong, anonymous, small_client));
    drop(nobody);
    clean.end();
}

#[test]
fn a_server_killed_mid_call_fails_that_call_then_says_it_restarted_then_serves() {
    let clean = CleanShm::begin();
    let mut server = ServerProcess::start(SERVER, &[]);
    let worker = Arc::new(remote(&server));
    let Serde(first_pid): Serde<u32> = worker.call("pid", &()).expect("first call");
    assert_eq!(worker.server_instance(), Some(server.instance));

    let caller = {
        let worker = Arc::clone(&worker);
        std::thread::spawn(move || worker.call::<_, Serde<u64>>("sleep", &Serde(60_000u64)))
    };
    server.wait_for_stderr("sleeping 60000 ms");
    server.kill();
    let (_, fault) = network_fault(caller.join().expect("the caller returns"));
    match fault {
        NetworkFault::Lost { method, .. } => assert_eq!(method, "sleep"),
        other => panic!("expected Lost, got {other:?}"),
    }
    // The killed server's segments went with it: nothing to sweep.

    // The same address, a new server: the first call is refused as Restarted, and not run;
    // the next one runs.
    let restarted = ServerProcess::start_on(SERVER, &server.addr, &[]);
    let (_, fault) = network_fault(worker.call::<_, Serde<u32>>("pid", &()));
    match fault {
        NetworkFault::Restarted { method, was, now } => {
            assert_eq!(method, "pid");
            assert_eq!((was, now), (server.instance, restarted.instance));
        }
        other => panic!("expected Restarted, got {other:?}"),
    }
    let Serde(pid): Serde<u32> = worker.call("pid", &()).expect("after the restart");
    assert_eq!(pid, restarted.pid());
    assert_ne!(pid, first_pid);
    drop(worker);
    restarted.stop();
    clean.end();
}

#[test]
fn a_client_killed_mid_stream_leaves_the_server_healthy_and_dev_shm_clean() {
    // Killed while sending its arguments, then while receiving its result.
    for direction in ["--send-mib", "--receive-mib"] {
        kill_a_client_mid_stream(direction);
    }
}

fn kill_a_client_mid_stream(direction: &str) {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &[]);
    let observer = remote(&server);
    let Serde(idle): Serde<usize> = observer.call("live_blocks", &()).expect("stats");
    assert_eq!(idle, 0);

    let mut client = Command::new(SERVER)
        .args(["--client", &server.url(), direction, "512"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the client starts");
    let mut out = BufReader::new(client.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the client says it calls");
    assert_eq!(line.trim(), "calling");
    // The server allocates the arguments' block when the call's head arrives (or the
    // result's, when the handler runs); then the data streams for a while. Kill the client in
    // the middle of it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let Serde(live): Serde<usize> = observer.call("live_blocks", &()).expect("stats");
        if live > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server never started receiving"
        );
        assert!(
            matches!(client.try_wait(), Ok(None)),
            "the client finished too soon"
        );
    }
    client.kill().expect("kill");
    client.wait().expect("reap");

    // The server lets go of the half-received block, and serves on.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let Serde(live): Serde<usize> = observer.call("live_blocks", &()).expect("stats");
        if live == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server still holds {live} blocks"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = Array1::from_elem(1 << 20, 2.0f64).into_dyn();
    let Serde(sum): Serde<f64> = observer.call("sum", &a).expect("the server serves on");
    assert_eq!(sum, 2.0 * (1 << 20) as f64);

    drop(observer);
    server.stop();
    clean.end();
}

#[test]
fn a_worker_pool_mixes_local_and_remote_workers_running_the_same_handlers() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &[]);
    let pool = shm_core::ShmPool::new().expect("pool");
    let local =
        Worker::spawn(WorkerConfig::new(SERVER).with_pool(pool.clone())).expect("a local worker");
    let local_pid = local.pid();
    let remote = RemoteWorker::new(RemoteConfig::new(server.url()).with_pool(pool.clone()))
        .expect("a remote worker");
    let workers: Vec<Box<dyn Lifecycle>> = vec![Box::new(local), Box::new(remote)];
    let workers = WorkerPool::from_workers(pool.clone(), workers);
    assert_eq!(workers.pids(), vec![Some(local_pid), None]);

    // Many calls at once spread over both; every result checks out.
    let items: Vec<_> = (0..40)
        .map(|i| Array1::from_elem(100_000 + i, i as f64).into_dyn())
        .collect();
    let sums = workers.map::<_, Serde<f64>, _>("sum", items.iter().cloned(), 8, |_, _| {});
    for (item, sum) in items.iter().zip(sums) {
        assert_eq!(sum.expect("sum").0, item.sum());
    }
    let pids = workers
        .broadcast::<_, Serde<u32>>("pid", &())
        .expect("broadcast");
    let pids: Vec<u32> = pids.into_iter().map(|p| p.expect("pid").0).collect();
    assert_eq!(pids, vec![local_pid, server.pid()]);

    // One interface for both: the same code calls either.
    let doubled: Vec<ShmArray<f64, ndarray::IxDyn>> = (0..2)
        .map(|_| workers.call("double", &items[1]).expect("double"))
        .collect();
    for d in &doubled {
        assert!(d.view().iter().all(|&x| x == 2.0));
    }
    drop(doubled);
    workers.shutdown(shm_transport::ShutdownMode::Drain);
    drop((workers, pool));
    server.stop();
    clean.end();
}

#[cfg(feature = "tls")]
#[test]
fn over_tls_calls_carry_data_and_a_plain_client_is_turned_away() {
    let clean = CleanShm::begin();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls");
    let cert = format!("{dir}/server.pem");
    let key = format!("{dir}/server.key");
    let server = ServerProcess::start(
        SERVER,
        &["--tls-cert", &cert, "--tls-key", &key, "--token", "t0k"],
    );
    let port = server.addr.rsplit(':').next().expect("port");
    let config = RemoteConfig::new(format!("https://localhost:{port}"))
        .with_token("t0k")
        .with_tls(
            std::fs::read(format!("{dir}/ca.pem")).expect("the test CA"),
            None,
        );
    let worker = RemoteWorker::new(config).expect("client");
    let a = Array1::from_shape_fn(1_000_000, |i| i as f64).into_dyn();
    let back: ShmArray<f64, ndarray::IxDyn> = worker.call("echo_f64", &a).expect("over TLS");
    assert_eq!(back.view(), a.view());
    let ColumnFrame(batch) = worker
        .call("batch", &ColumnFrame(mixed_batch(5_000)))
        .expect("a frame over TLS");
    assert_eq!(batch, mixed_batch(5_000));

    // Plain HTTP/2 to a TLS port: the handshake fails, and says so.
    let plain =
        RemoteWorker::new(RemoteConfig::new(format!("http://localhost:{port}")).with_token("t0k"))
            .expect("client");
    let (_, fault) = network_fault(plain.call::<_, Serde<u32>>("pid", &()));
    assert!(
        matches!(
            fault,
            NetworkFault::Lost { .. } | NetworkFault::Refused { .. }
        ),
        "{fault:?}"
    );
    drop((back, batch, worker, plain));
    server.stop();
    clean.end();
}

#[test]
fn a_server_in_a_tiny_dev_shm_serves_calls_larger_than_it() {
    let clean = CleanShm::begin();
    let Some(server) = ServerProcess::start_with_private_dev_shm(SERVER, "8m") else {
        return;
    };
    let worker = remote(&server);
    // 16 MiB through a server whose /dev/shm holds 8: its segments are memfds.
    let big = Array1::from_elem(2 << 20, 1.0f64).into_dyn();
    let Serde(sum): Serde<f64> = worker
        .call("sum", &big)
        .expect("a call larger than /dev/shm");
    assert_eq!(sum, (2 << 20) as f64);
    drop(worker);
    server.stop();
    clean.end();
}

#[test]
fn a_server_out_of_room_in_its_pool_says_so_and_serves_on() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &["--capacity", &(8u64 << 20).to_string()]);
    let worker = remote(&server);
    let big = Array1::from_elem(2 << 20, 1.0f64).into_dyn();
    // The arguments cannot be received: the caller learns why, with the numbers.
    match worker.call::<_, Serde<f64>>("sum", &big) {
        Err(TransportError::Remote(err)) if err.kind == RemoteErrorKind::BadArguments => {
            assert!(
                err.message
                    .contains("capacity exceeded: 16777216 bytes requested")
                    && err.message.contains("of 8388608 bytes"),
                "{err:?}"
            );
        }
        other => panic!("expected the server's capacity error, got {other:?}"),
    }
    // The server lives on, and serves what fits.
    let small = Array1::from_elem(100_000, 1.0f64).into_dyn();
    let Serde(sum): Serde<f64> = worker.call("sum", &small).expect("a call that fits");
    assert_eq!(sum, 100_000.0);
    drop(worker);
    server.stop();
    clean.end();
}

/// A small xorshift generator: the soak's choices, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn threads_calling_while_timeouts_fire_and_the_server_is_killed_get_values_or_typed_faults() {
    let clean = CleanShm::begin();
    let steps: usize = std::env::var("SHM_FLIGHT_SOAK_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let seed = std::env::var("SHM_FLIGHT_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    eprintln!("soak: {steps} steps per thread, SHM_FLIGHT_SOAK_SEED={seed}");
    let server = std::sync::Mutex::new(ServerProcess::start(SERVER, &[]));
    let addr = server.lock().expect("lock").addr.clone();
    let worker = RemoteWorker::new(RemoteConfig::new(format!("http://{addr}"))).expect("client");
    let done = std::sync::atomic::AtomicUsize::new(0);
    let (ok, faults, kills) = (
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
    );
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let (worker, done, ok, faults) = (&worker, &done, &ok, &faults);
            scope.spawn(move || {
                let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
                for _ in 0..steps {
                    let timeout = match rng.below(4) {
                        0 => Some(Duration::from_millis(1 + rng.below(30))),
                        _ => None,
                    };
                    let outcome = match rng.below(4) {
                        0 => {
                            let n = 1 + rng.below(400_000) as usize;
                            let start = rng.below(1000) as f64;
                            let a = Array1::from_shape_fn(n, |i| start + i as f64).into_dyn();
                            let call = match timeout {
                                Some(t) => worker.call_timeout("echo_f64", &a, t),
                                None => worker.call("echo_f64", &a),
                            };
                            call.map(|back: ShmArray<f64, ndarray::IxDyn>| {
                                assert_eq!(back.view(), a.view(), "an array came back changed")
                            })
                        }
                        1 => {
                            let rows = 1 + rng.below(50_000) as usize;
                            let batch = mixed_batch(rows);
                            let call = match timeout {
                                Some(t) => {
                                    worker.call_timeout("batch", &ColumnFrame(batch.clone()), t)
                                }
                                None => worker.call("batch", &ColumnFrame(batch.clone())),
                            };
                            call.map(|ColumnFrame(back)| {
                                assert_eq!(back, batch, "a batch came back changed")
                            })
                        }
                        2 => {
                            let ms = rng.below(40);
                            let call = match timeout {
                                Some(t) => worker.call_timeout("sleep", &Serde(ms), t),
                                None => worker.call("sleep", &Serde(ms)),
                            };
                            call.map(|Serde(back): Serde<u64>| assert_eq!(back, ms))
                        }
                        _ => {
                            let words: Vec<String> =
                                (0..rng.below(2000)).map(|i| format!("w{i}")).collect();
                            worker
                                .call("serde", &Serde(words.clone()))
                                .map(|Serde(back): Serde<Vec<String>>| assert_eq!(back, words))
                        }
                    };
                    match outcome {
                        Ok(()) => ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                        Err(err) if FlightError::fault_of(&err).is_some() => {
                            faults.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        }
                        Err(other) => panic!("a call failed with {other:?}"),
                    };
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Release);
            });
        }
        // Kill the server now and then, and start it again on the same port.
        let mut rng = Rng(seed);
        while done.load(std::sync::atomic::Ordering::Acquire) < 4 {
            std::thread::sleep(Duration::from_millis(200 + rng.below(300)));
            if done.load(std::sync::atomic::Ordering::Acquire) == 4 {
                break;
            }
            let mut server = server.lock().expect("lock");
            server.kill();
            *server = ServerProcess::start_on(SERVER, &addr, &[]);
            kills.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let (ok, faults, kills) = (ok.into_inner(), faults.into_inner(), kills.into_inner());
    eprintln!(
        "soak: {ok} calls returned values, {faults} typed network faults, {kills} server kills"
    );
    assert!(ok > 0, "no call succeeded");
    // The last server holds nothing of the calls, and serves.
    let Serde(live): Serde<usize> = loop {
        match worker.call("live_blocks", &()) {
            Ok(live) => break live,
            Err(err) if FlightError::fault_of(&err).is_some() => continue,
            Err(other) => panic!("{other:?}"),
        }
    };
    assert_eq!(live, 0, "blocks the server still holds");
    drop(worker);
    server.into_inner().expect("lock").stop();
    clean.end();
}

#[test]
fn a_call_lending_a_heap_array_ends_at_its_timeout_when_the_server_stops_reading() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &[]);
    let worker = remote(&server);
    // A first call over a data connection: the client learns that the server takes them.
    let small = Array1::from_elem(200_000, 1.0f64).into_dyn();
    let Serde(sum): Serde<f64> = worker.call("sum", &small).expect("sum");
    assert_eq!(sum, 200_000.0);

    // The server stops reading: 64 MiB from the heap fill the socket's buffers and the writer
    // of the data connection waits, on the array's own memory. The call still ends at its
    // timeout, and then the array is the caller's again, to write and to drop.
    let stop = |signal| {
        // SAFETY: kill(2) on the server process this test started.
        assert_eq!(unsafe { libc::kill(server.pid() as i32, signal) }, 0);
    };
    stop(libc::SIGSTOP);
    let mut big = Array1::from_elem(8 << 20, 2.0f64).into_dyn();
    let (done, ended) = std::sync::mpsc::channel();
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| {
            let result =
                worker.call_timeout::<_, Serde<f64>>("sum", &big, Duration::from_millis(500));
            let _ = done.send(result);
        });
        let outcome = ended.recv_timeout(Duration::from_secs(20));
        // Whatever happened, the server runs again (and a call stuck on it ends).
        stop(libc::SIGCONT);
        outcome.expect("the call ended within 20 s of a 500 ms timeout")
    });
    match network_fault(outcome).1 {
        NetworkFault::Timeout { method, .. } => assert_eq!(method, "sum"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    big.fill(3.0);
    drop(big);

    // The server serves on.
    let Serde(sum): Serde<f64> = worker.call("sum", &small).expect("after the timeout");
    assert_eq!(sum, 200_000.0);
    drop(worker);
    server.stop();
    clean.end();
}
