//! Clients that hold the token and still try to stall or starve a Flight server, each beside
//! an honest client whose calls must keep succeeding. The hostile ones write the wire format
//! of docs/format.md themselves (`hostile` below), as an outside client would.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ndarray::Array1;
use shm_codec::Serde;
use shm_flight::{FlightError, NetworkFault, RemoteConfig, RemoteWorker};
use shm_tests::CleanShm;
use shm_tests::server::{Honest, ServerProcess};
use shm_transport::{CalleeExt, TransportError};

const SERVER: &str = env!("CARGO_BIN_EXE_shm-flight-test-server");

/// The wire format, written from docs/format.md.
mod hostile {
    use arrow_flight::FlightData;
    use arrow_flight::flight_service_client::FlightServiceClient;
    use bytes::Bytes;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize)]
    pub struct CallHead {
        pub wire: u16,
        pub method: String,
        pub instance: Option<u64>,
        pub args: PayloadHead,
        pub takes_connection: bool,
    }

    #[derive(Serialize, Deserialize, Debug)]
    pub struct PayloadHead {
        pub codec: String,
        pub meta: Vec<u8>,
        pub inline: Vec<u8>,
        pub body: Body,
    }

    #[derive(Serialize, Deserialize, Debug)]
    pub enum Body {
        Blocks {
            lens: Vec<u64>,
        },
        Arrow {
            rows: u64,
            bytes: u64,
            data: Vec<u64>,
        },
        Connection {
            lens: Vec<u64>,
            key: [u8; 16],
        },
    }

    #[derive(Deserialize, Debug)]
    pub struct ReplyHead {
        pub wire: u16,
        pub instance: u64,
        pub outcome: Outcome,
        pub takes_connection: bool,
    }

    // Every variant mirrors the format; the tests read some fields only through `Debug`.
    #[allow(dead_code)]
    #[derive(Deserialize, Debug)]
    pub enum Outcome {
        Done(PayloadHead),
        Failed(shm_transport::RemoteError),
        Refused(Refusal),
    }

    #[allow(dead_code)]
    #[derive(Deserialize, Debug)]
    pub enum Refusal {
        Restarted,
        TooLarge { size: u64, limit: u64 },
        Protocol { what: String },
    }

    /// The head of a call of `method` whose arguments are blocks of `lens` bytes.
    pub fn head(method: &str, lens: Vec<u64>) -> FlightData {
        message(&CallHead {
            wire: 2,
            method: method.to_owned(),
            instance: None,
            args: PayloadHead {
                codec: "ndarray".to_owned(),
                meta: Vec::new(),
                inline: Vec::new(),
                body: Body::Blocks { lens },
            },
            takes_connection: false,
        })
    }

    /// The message that carries `head`.
    pub fn message(head: &CallHead) -> FlightData {
        FlightData {
            app_metadata: postcard::to_stdvec(head).expect("a head").into(),
            ..Default::default()
        }
    }

    /// A chunk of block data.
    pub fn chunk(bytes: usize) -> FlightData {
        FlightData {
            data_body: Bytes::from(vec![7u8; bytes]),
            ..Default::default()
        }
    }

    /// A connection to `url`.
    pub async fn connect(url: String) -> Result<tonic::transport::Channel, tonic::Status> {
        tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))
    }

    /// Calls on a connection of its own; see [`call_on`].
    pub async fn call(url: String, messages: Vec<FlightData>) -> Result<ReplyHead, tonic::Status> {
        call_on(connect(url).await?, messages).await
    }

    /// Calls on `channel`: sends `messages`, then holds the stream open without sending more
    /// until the server answers. Gives the reply's head, or the status the server ended the
    /// call with.
    pub async fn call_on(
        channel: tonic::transport::Channel,
        messages: Vec<FlightData>,
    ) -> Result<ReplyHead, tonic::Status> {
        let mut client = FlightServiceClient::new(channel);
        let stream = futures::stream::iter(messages).chain(futures::stream::pending());
        let mut reply = client.do_exchange(stream).await?.into_inner();
        let first = reply
            .message()
            .await?
            .ok_or_else(|| tonic::Status::data_loss("no reply head"))?;
        postcard::from_bytes(&first.app_metadata)
            .map_err(|e| tonic::Status::data_loss(format!("reply head: {e}")))
    }

    /// Calls on a connection of its own, ending its half of the stream after `messages` as
    /// a client does, and gives the reply's head with the rest of the reply's stream, held
    /// open; dropping it cancels the call.
    pub async fn call_held(
        url: String,
        messages: Vec<FlightData>,
    ) -> Result<(ReplyHead, tonic::Streaming<FlightData>), tonic::Status> {
        let mut client = FlightServiceClient::new(connect(url).await?);
        let stream = futures::stream::iter(messages);
        let mut reply = client.do_exchange(stream).await?.into_inner();
        let first = reply
            .message()
            .await?
            .ok_or_else(|| tonic::Status::data_loss("no reply head"))?;
        let head = postcard::from_bytes(&first.app_metadata)
            .map_err(|e| tonic::Status::data_loss(format!("reply head: {e}")))?;
        Ok((head, reply))
    }

    /// Opens a data connection to the server at `url` for `kind` (`b'P'` to send arguments,
    /// `b'G'` to take a result) named `key`, as docs/format.md says.
    pub fn data_connection(url: &str, key: [u8; 16], kind: u8) -> std::net::TcpStream {
        use std::io::Write;
        let addr = url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).expect("a data connection");
        let mut preamble = b"SHM-DATA".to_vec();
        preamble.extend_from_slice(&key);
        preamble.push(kind);
        stream.write_all(&preamble).expect("the preamble");
        stream
    }

    /// The head of a call of `method` whose arguments, blocks of `lens` bytes, come over the
    /// data connection `key`.
    pub fn connection_head(
        method: &str,
        codec: &str,
        meta: Vec<u8>,
        lens: Vec<u64>,
        key: [u8; 16],
        takes: bool,
    ) -> FlightData {
        message(&CallHead {
            wire: 2,
            method: method.to_owned(),
            instance: None,
            args: PayloadHead {
                codec: codec.to_owned(),
                meta,
                inline: Vec::new(),
                body: Body::Connection { lens, key },
            },
            takes_connection: takes,
        })
    }

    use futures::StreamExt;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn remote(server: &ServerProcess) -> RemoteWorker {
    RemoteWorker::new(RemoteConfig::new(server.url())).expect("a client")
}

fn fault(err: &TransportError) -> &NetworkFault {
    FlightError::fault_of(err)
        .map(|(_, fault)| fault)
        .unwrap_or_else(|| panic!("expected a network fault, got {err:?}"))
}

/// A process's resident memory in bytes, and its peak (`VmRSS`, `VmHWM`).
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn streams_that_declare_memory_and_send_nothing_hold_none_of_it() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &["--message-timeout-ms", "3000"]);
    let honest = Honest::start(&server.url());
    let (rss_before, _) = memory_of(server.pid());
    let runtime = runtime();
    let started = Instant::now();
    // 40 connections, each a call declaring a block of 64 MiB, and not a byte of it.
    let attackers: Vec<_> = (0..40)
        .map(|_| {
            runtime.spawn(hostile::call(
                server.url(),
                vec![hostile::head("sum", vec![64 << 20])],
            ))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (rss_during, _) = memory_of(server.pid());
    // An honest call of 64 MiB goes through beside them.
    let a = Array1::from_elem(8 << 20, 1.0f64).into_dyn();
    let Serde(sum): Serde<f64> = remote(&server)
        .call("sum", &a)
        .expect("the honest 64 MiB call");
    assert_eq!(sum, (8 << 20) as f64);
    // The server ends each stalled call once its head's data is overdue.
    for attacker in attackers {
        let ended = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), attacker).await })
            .expect("the server ends a stalled call")
            .expect("the attacker's task");
        match ended {
            Err(status) => assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}"),
            Ok(reply) => panic!("a stalled call was answered: {reply:?}"),
        }
    }
    let ended_after = started.elapsed();
    eprintln!(
        "40 stalled streams: server RSS {} MiB before, {} MiB with them open; ended after \
         {ended_after:?}",
        rss_before >> 20,
        rss_during >> 20
    );
    assert!(
        rss_during < rss_before + (64 << 20),
        "the server grew from {rss_before} to {rss_during} bytes for 2.5 GiB declared"
    );
    assert!(ended_after < Duration::from_secs(20), "{ended_after:?}");
    honest.finish();
    drop(runtime);
    server.stop();
    clean.end();
}

#[test]
fn one_connection_holds_no_more_than_its_budget_and_stalled_data_is_given_back() {
    let clean = CleanShm::begin();
    let total = 512u64 << 20;
    let per_connection = 160u64 << 20;
    let server = ServerProcess::start(
        SERVER,
        &[
            "--memory",
            &format!("{total},{per_connection}"),
            "--message-timeout-ms",
            "2000",
        ],
    );
    let honest = Honest::start(&server.url());
    let runtime = runtime();
    // One connection, 8 calls, each sending the first byte of a 64 MiB block, then nothing:
    // the first byte reserves the block.
    let url = server.url();
    let attack = runtime.spawn(async move {
        let channel = hostile::connect(url).await.expect("a connection");
        let calls = (0..8).map(|_| {
            hostile::call_on(
                channel.clone(),
                vec![hostile::head("sum", vec![64 << 20]), hostile::chunk(1)],
            )
        });
        futures::future::join_all(calls).await
    });
    std::thread::sleep(Duration::from_millis(500));
    // Another connection's 64 MiB call fits in what the others left.
    let a = Array1::from_elem(8 << 20, 1.0f64).into_dyn();
    let Serde(sum): Serde<f64> = remote(&server)
        .call("sum", &a)
        .expect("the honest 64 MiB call");
    assert_eq!(sum, (8 << 20) as f64);
    let outcomes = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), attack).await })
        .expect("the server ends stalled calls")
        .expect("the attack");
    let codes: Vec<tonic::Code> = outcomes
        .iter()
        .map(|o| match o {
            Err(status) => status.code(),
            Ok(reply) => panic!("a stalled call was answered: {reply:?}"),
        })
        .collect();
    let refused = codes
        .iter()
        .filter(|&&c| c == tonic::Code::ResourceExhausted)
        .count();
    let stalled = codes
        .iter()
        .filter(|&&c| c == tonic::Code::DeadlineExceeded)
        .count();
    eprintln!("8 trickling calls on one connection: {refused} refused, {stalled} timed out");
    // 160 MiB per connection: two blocks of 64 MiB; the others were refused.
    assert_eq!((refused, stalled), (6, 2), "{codes:?}");
    // Given back: a 64 MiB call on a new connection fits again, as do two at once.
    let worker = remote(&server);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                let Serde(sum): Serde<f64> = worker.call("sum", &a).expect("a 64 MiB call");
                assert_eq!(sum, (8 << 20) as f64);
            });
        }
    });
    honest.finish();
    drop(runtime);
    server.stop();
    clean.end();
}

#[test]
fn a_head_of_millions_of_block_entries_is_refused_before_they_are_built() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &[]);
    let honest = Honest::start(&server.url());
    let runtime = runtime();
    let (_, peak_before) = memory_of(server.pid());
    // A frame's declared layout of 16,000,000 columns (as a list, 128 MB).
    let declared_layout = hostile::message(&hostile::CallHead {
        wire: 2,
        method: "batch".into(),
        instance: None,
        args: hostile::PayloadHead {
            codec: "arrow-columns".into(),
            meta: Vec::new(),
            inline: Vec::new(),
            body: hostile::Body::Arrow {
                rows: 1,
                bytes: 0,
                data: vec![0; 16_000_000],
            },
        },
        takes_connection: false,
    });
    let heads = [
        hostile::head("sum", vec![0u64; 4_000_000]),
        hostile::head("sum", vec![1u64; 4_000_000]),
        declared_layout,
    ];
    for head in heads {
        let reply = runtime
            .block_on(hostile::call(server.url(), vec![head]))
            .expect("a reply");
        assert_eq!((reply.wire, reply.instance), (2, server.instance));
        match reply.outcome {
            hostile::Outcome::Refused(hostile::Refusal::Protocol { what }) => {
                assert!(what.contains("at most 1048576 blocks"), "{what}")
            }
            other => panic!("expected the head to be refused, got {other:?}"),
        }
    }
    let (_, peak_after) = memory_of(server.pid());
    eprintln!(
        "heads of 4,000,000 blocks (of 0 and 1 byte) and 16,000,000 columns: server peak RSS {} MiB before, {} MiB after",
        peak_before >> 20,
        peak_after >> 20
    );
    // The heads themselves are 4 and 16 MB; their entries would have been 32 and 128 MB as
    // lists, and 350 bytes each as blocks.
    assert!(
        peak_after < peak_before + (48 << 20),
        "peak RSS grew from {peak_before} to {peak_after} bytes"
    );
    honest.finish();
    drop(runtime);
    server.stop();
    clean.end();
}

#[test]
fn calls_whose_clients_left_never_run_and_the_queue_is_bounded() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &["--handlers", "1", "--queue", "256"]);
    let worker = remote(&server);
    // 200 callers of a 1 s handler, each giving up after 300 ms.
    let left = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..200 {
            scope.spawn(|| {
                let outcome = worker.call_timeout::<_, Serde<u64>>(
                    "sleep",
                    &Serde(1000u64),
                    Duration::from_millis(300),
                );
                match &outcome {
                    Err(err) => {
                        assert!(matches!(fault(err), NetworkFault::Timeout { .. }), "{err}")
                    }
                    Ok(_) => panic!("a call of 1 s returned within 300 ms"),
                }
                left.lock().unwrap().push(Instant::now());
            });
        }
    });
    let last_left = left.lock().unwrap().iter().max().copied().expect("callers");
    // The one handler that started finishes its second; nothing else of theirs runs.
    let Serde(pid): Serde<u32> = worker
        .call_timeout("pid", &(), Duration::from_secs(10))
        .expect("an honest call");
    assert_eq!(pid, server.pid());
    let answered_after = last_left.elapsed();
    let Serde(sleeps): Serde<u64> = worker.call("sleeps", &()).expect("the count");
    eprintln!(
        "200 abandoned calls: {sleeps} handlers ran; an honest call answered \
         {answered_after:?} after the last caller left"
    );
    // The first call's handler runs; a caller whose thread started late may slip into the
    // next second. Without the queue dropping abandoned calls, all 200 would run.
    assert!(sleeps <= 5, "{sleeps} abandoned calls ran");
    assert!(
        answered_after < Duration::from_secs(3),
        "{answered_after:?}"
    );
    drop(worker);
    server.stop();

    // A queue of 4: of 20 calls at once, one runs, 4 wait, and 15 are refused as busy.
    let server = ServerProcess::start(SERVER, &["--handlers", "1", "--queue", "4"]);
    let worker = remote(&server);
    let (done, busy) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|scope| {
        for _ in 0..20 {
            scope.spawn(
                || match worker.call::<_, Serde<u64>>("sleep", &Serde(1000u64)) {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        assert!(matches!(fault(&err), NetworkFault::Busy { .. }), "{err}");
                        busy.fetch_add(1, Ordering::Relaxed);
                    }
                },
            );
        }
    });
    let (done, busy) = (done.into_inner(), busy.into_inner());
    eprintln!("20 calls on a queue of 4: {done} ran, {busy} refused as busy");
    // Exactly (5, 15) when the 20 calls arrive within the first handler's second; a caller
    // whose thread started late may find a place that came free. Unbounded, all 20 would run.
    assert_eq!(done + busy, 20);
    assert!(done >= 5 && busy >= 10, "{done} ran, {busy} refused");
    drop(worker);
    server.stop();

    // No queue at all: a call that finds the handler free still runs.
    let server = ServerProcess::start(SERVER, &["--handlers", "1", "--queue", "0"]);
    let Serde(pid): Serde<u32> = remote(&server).call("pid", &()).expect("a call");
    assert_eq!(pid, server.pid());
    server.stop();
    clean.end();
}

#[test]
fn an_idle_server_gives_its_shared_memory_back() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &["--idle-release-ms", "500"]);
    let worker = remote(&server);
    let live_segments = || {
        shm_core::list_live_segments()
            .expect("/proc is readable")
            .iter()
            .filter(|s| s.pid == server.pid())
            .count()
    };
    let baseline = live_segments();
    // A burst: 64 MiB each way, and a few smaller results.
    let a = Array1::from_elem(8 << 20, 1.0f64).into_dyn();
    let _: Serde<f64> = worker.call("sum", &a).expect("sum");
    for mib in [64usize, 8, 1] {
        let zeros: shm_codec::ShmArray<u8, ndarray::Ix1> =
            worker.call("zeros", &Serde(mib << 20)).expect("zeros");
        assert_eq!(zeros.len(), mib << 20);
    }
    let Serde((_, owned, cached)): Serde<(u64, u64, u64)> =
        worker.call("pool_stats", &()).expect("stats");
    let after_burst = live_segments();
    eprintln!(
        "after the burst: {owned} segments owned, {cached} bytes cached, {after_burst} live \
         (baseline {baseline})"
    );
    assert!(cached >= 64 << 20, "{cached} bytes cached after the burst");
    let deadline = Instant::now() + Duration::from_secs(20);
    let idle = loop {
        std::thread::sleep(Duration::from_millis(250));
        let Serde(stats): Serde<(u64, u64, u64)> = worker.call("pool_stats", &()).expect("stats");
        // The pool forgets a segment before its thread closes it: wait for both.
        if (stats.2 == 0 && live_segments() <= baseline) || Instant::now() > deadline {
            break stats;
        }
    };
    let (_, owned, cached) = idle;
    let live = live_segments();
    eprintln!("idle: {owned} segments owned, {cached} bytes cached, {live} live");
    assert_eq!((owned, cached), (0, 0), "what the idle server still holds");
    assert!(
        live <= baseline,
        "{live} segments live, {baseline} at the start"
    );
    drop(worker);
    server.stop();
    clean.end();
}

#[test]
fn shutdown_finishes_the_running_call_refuses_the_waiting_one_and_removes_everything() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &["--handlers", "1"]);
    let worker = remote(&server);
    std::thread::scope(|scope| {
        let running = scope.spawn(|| worker.call::<_, Serde<u64>>("sleep", &Serde(1500u64)));
        server.wait_for_stderr("sleeping 1500 ms");
        let waiting = scope.spawn(|| worker.call::<_, Serde<u64>>("sleep", &Serde(10u64)));
        std::thread::sleep(Duration::from_millis(300));
        // Stdin closes: the server drains, then exits with success.
        server.stop();
        let Serde(ms) = running.join().unwrap().expect("the running call finishes");
        assert_eq!(ms, 1500);
        match waiting.join().unwrap() {
            Err(err) => assert!(matches!(fault(&err), NetworkFault::Refused { .. }), "{err}"),
            Ok(value) => panic!("the waiting call ran during shutdown: {value:?}"),
        }
    });
    clean.end();
}

/// The number of descriptors a process holds open.
fn descriptors_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn the_data_connection_format_carries_arguments_and_results_as_docs_format_md_says() {
    use std::io::{Read, Write};
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &[]);
    let runtime = runtime();
    // The arguments of echo_u8, 2 MiB, over a data connection; the result asked over one too.
    let values: Vec<u8> = (0..2u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let pool = shm_core::ShmPool::new().expect("a pool");
    let payload = shm_codec::Encoder::new(pool)
        .encode(&Array1::from(values.clone()).into_dyn())
        .expect("the arguments");
    let key = [0x5au8; 16];
    let head = hostile::connection_head(
        "echo_u8",
        &payload.codec,
        payload.meta.clone(),
        vec![values.len() as u64],
        key,
        true,
    );
    let mut push = hostile::data_connection(&server.url(), key, b'P');
    push.write_all(&values).expect("the arguments' bytes");
    // The reply's stream stays open while the result's bytes come: closing it cancels the
    // call.
    let (reply, mut rest) = runtime
        .block_on(hostile::call_held(server.url(), vec![head]))
        .expect("a reply");
    assert!(
        reply.takes_connection,
        "the server says it takes data connections"
    );
    let hostile::Outcome::Done(result) = reply.outcome else {
        panic!("expected a result, got {:?}", reply.outcome);
    };
    let hostile::Body::Connection { lens, key } = result.body else {
        panic!("a result of 2 MiB to a client that takes data connections: {result:?}");
    };
    assert_eq!(lens, vec![values.len() as u64]);
    let mut pull = hostile::data_connection(&server.url(), key, b'G');
    let mut back = vec![0u8; values.len()];
    pull.read_exact(&mut back).expect("the result's bytes");
    assert!(
        back == values,
        "the result's bytes differ from the arguments'"
    );
    // Then the data connection closes, and the reply's stream ends with OK, without messages.
    assert_eq!(
        pull.read(&mut [0u8; 1]).expect("the end"),
        0,
        "more bytes came"
    );
    let next = runtime.block_on(rest.message());
    assert!(
        matches!(next, Ok(None)),
        "after the head: {next:?}, expected the stream's end"
    );
    drop(runtime);
    server.stop();
    clean.end();
}

#[test]
fn data_connections_that_name_no_call_hold_up_no_call_and_go() {
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &["--message-timeout-ms", "3000"]);
    // Its 1 MiB calls go over data connections.
    let honest = Honest::start(&server.url());
    std::thread::sleep(Duration::from_millis(300));
    let before = descriptors_of(server.pid());
    // 400 data connections under keys no call names, and 50 that stop inside the magic.
    let mut flood: Vec<std::net::TcpStream> = (0..400u32)
        .map(|i| {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&i.to_le_bytes());
            hostile::data_connection(&server.url(), key, b'P')
        })
        .collect();
    for _ in 0..50 {
        use std::io::Write;
        let addr = server.url().trim_start_matches("http://").to_owned();
        let mut stream = std::net::TcpStream::connect(addr).expect("a connection");
        stream.write_all(b"SHM-").expect("half the magic");
        flood.push(stream);
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = descriptors_of(server.pid());
    // A 64 MiB call over a data connection goes through beside them.
    let worker = remote(&server);
    let a = Array1::from_elem(8 << 20, 1.0f64).into_dyn();
    for _ in 0..2 {
        let Serde(sum): Serde<f64> = worker.call("sum", &a).expect("the honest 64 MiB call");
        assert_eq!(sum, (8 << 20) as f64);
    }
    // Past the message timeout, the server has closed every one of them.
    std::thread::sleep(Duration::from_millis(3500));
    let after = descriptors_of(server.pid());
    eprintln!(
        "450 idle data connections: server descriptors {before} before, {during} with them, \
         {after} after the timeout"
    );
    assert!(
        during <= before + 256 + 50 + 16,
        "the server kept {during} descriptors (before: {before}); at most 256 data connections \
         wait"
    );
    assert!(
        after <= before + 16,
        "{after} descriptors after the timeout (before: {before})"
    );
    honest.finish();
    drop(flood);
    server.stop();
    clean.end();
}

#[test]
fn a_call_whose_data_connection_never_comes_or_stalls_ends_and_gives_its_memory_back() {
    use std::io::Write;
    let clean = CleanShm::begin();
    let server = ServerProcess::start(
        SERVER,
        &[
            "--message-timeout-ms",
            "2000",
            "--memory",
            "104857600,104857600",
        ],
    );
    let honest = Honest::start(&server.url());
    let runtime = runtime();
    let meta = {
        let pool = shm_core::ShmPool::new().expect("a pool");
        let payload = shm_codec::Encoder::new(pool)
            .encode(&Array1::from_elem(8 << 20, 1.0f64).into_dyn())
            .expect("an array");
        payload.meta.clone()
    };
    let ends_at_the_timeout = |call: tokio::task::JoinHandle<
        Result<hostile::ReplyHead, tonic::Status>,
    >| {
        let started = Instant::now();
        let ended = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), call).await })
            .expect("the server ends the call")
            .expect("the task");
        match ended {
            Err(status) => assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}"),
            Ok(reply) => panic!("a call without its data was answered: {reply:?}"),
        }
        started.elapsed()
    };
    // A call names a data connection that never comes.
    let never = runtime.spawn(hostile::call(
        server.url(),
        vec![hostile::connection_head(
            "sum",
            "ndarray",
            meta.clone(),
            vec![64 << 20],
            [1; 16],
            false,
        )],
    ));
    let never_ended = ends_at_the_timeout(never);
    // A call whose data connection sends one byte of its 64 MiB and stops.
    let mut stalled_data = hostile::data_connection(&server.url(), [2; 16], b'P');
    stalled_data.write_all(&[0]).expect("one byte");
    let stalled = runtime.spawn(hostile::call(
        server.url(),
        vec![hostile::connection_head(
            "sum",
            "ndarray",
            meta,
            vec![64 << 20],
            [2; 16],
            false,
        )],
    ));
    std::thread::sleep(Duration::from_millis(500));
    // While it holds its 64 MiB, another 64 MiB does not fit the server's 100 MiB.
    let a = Array1::from_elem(8 << 20, 1.0f64).into_dyn();
    let worker = remote(&server);
    let err = worker
        .call::<_, Serde<f64>>("sum", &a)
        .expect_err("no room for a second 64 MiB");
    assert!(matches!(fault(&err), NetworkFault::Busy { .. }), "{err:?}");
    let stalled_ended = ends_at_the_timeout(stalled);
    eprintln!(
        "a missing data connection: the call ended after {never_ended:?}; a stalled one: after \
         {stalled_ended:?} more"
    );
    assert!(never_ended < Duration::from_secs(10), "{never_ended:?}");
    assert!(stalled_ended < Duration::from_secs(10), "{stalled_ended:?}");
    // The stalled call's 64 MiB is given back: the call fits now.
    for _ in 0..2 {
        let Serde(sum): Serde<f64> = worker.call("sum", &a).expect("a 64 MiB call");
        assert_eq!(sum, (8 << 20) as f64);
    }
    honest.finish();
    drop((stalled_data, runtime));
    server.stop();
    clean.end();
}

#[test]
fn a_result_whose_client_never_takes_it_is_given_back_when_the_call_ends() {
    use std::io::Write;
    let clean = CleanShm::begin();
    let server = ServerProcess::start(SERVER, &["--message-timeout-ms", "3000"]);
    let runtime = runtime();
    let worker = remote(&server);
    let values = vec![3u8; 4 << 20];
    let meta = {
        let pool = shm_core::ShmPool::new().expect("a pool");
        let payload = shm_codec::Encoder::new(pool)
            .encode(&Array1::from(values.clone()).into_dyn())
            .expect("an array");
        payload.meta.clone()
    };
    let live = || {
        let Serde(live): Serde<usize> = worker.call("live_blocks", &()).expect("live blocks");
        live
    };
    let idle = live();
    // A call of echo_u8 whose client takes the head of its 4 MiB result and opens no data
    // connection for it.
    let call = |key: [u8; 16]| {
        let head = hostile::connection_head(
            "echo_u8",
            "ndarray",
            meta.clone(),
            vec![values.len() as u64],
            key,
            true,
        );
        // The head first: the server reads a data connection once its call claims it.
        let reply = runtime.spawn(hostile::call_held(server.url(), vec![head]));
        let mut push = hostile::data_connection(&server.url(), key, b'P');
        push.write_all(&values).expect("the arguments' bytes");
        let (reply, rest) = runtime.block_on(reply).expect("the task").expect("a reply");
        let hostile::Outcome::Done(result) = reply.outcome else {
            panic!("expected a result, got {:?}", reply.outcome);
        };
        assert!(matches!(result.body, hostile::Body::Connection { .. }));
        rest
    };
    // Cancelled (its stream dropped): the result goes at once, not after the timeout.
    let started = Instant::now();
    drop(call([0x11; 16]));
    let mut held = live();
    while held > idle && started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        held = live();
    }
    assert_eq!(
        held,
        idle,
        "the server holds a cancelled call's result {:?} after the cancel",
        started.elapsed()
    );
    // Held open, but never taken: the call ends at the message timeout, with the result.
    let mut rest = call([0x22; 16]);
    assert!(live() > idle, "the result waits for its data connection");
    let started = Instant::now();
    let end = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), rest.message()).await });
    let waited = started.elapsed();
    assert!(
        matches!(end, Ok(Err(ref status)) if status.code() == tonic::Code::Unavailable),
        "a result never taken ends its call with an error, got {end:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert_eq!(live(), idle, "a result never taken is given back");
    drop((worker, runtime));
    server.stop();
    clean.end();
}
