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
    }

    #[derive(Deserialize, Debug)]
    pub struct ReplyHead {
        pub wire: u16,
        pub instance: u64,
        pub outcome: Outcome,
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
            wire: 1,
            method: method.to_owned(),
            instance: None,
            args: PayloadHead {
                codec: "ndarray".to_owned(),
                meta: Vec::new(),
                inline: Vec::new(),
                body: Body::Blocks { lens },
            },
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
        wire: 1,
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
        assert_eq!((reply.wire, reply.instance), (1, server.instance));
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
        if stats.2 == 0 || Instant::now() > deadline {
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
