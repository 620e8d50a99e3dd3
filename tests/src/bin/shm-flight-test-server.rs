//! The remote worker that shm-flight's tests and benchmark drive, and its one router.
//!
//! - `--listen ADDR [--token T] [--max-payload BYTES] [--tls-cert PEM --tls-key PEM]
//!   [--handlers N] [--queue N] [--memory TOTAL,PER_CONNECTION] [--message-timeout-ms MS]
//!   [--idle-release-ms MS]`: serves the router over Flight, prints `listening ADDR INSTANCE`
//!   on stdout, and drains and stops when its stdin closes.
//! - Started by `Worker::spawn` (as a local worker): serves the same router over shared
//!   memory — the handlers do not know which.
//! - `--client URL --send-mib N`: a caller that sends one array of N MiB to `sum` and prints
//!   the sum; `--receive-mib N` instead asks `zeros` for N MiB. The tests kill it mid-stream.

use std::io::{BufRead, Write};
use std::time::Duration;

use ndarray::{Array1, IxDyn};
use shm_arrow::ColumnFrame;
use shm_codec::{Serde, ShmArray, ShmArrayMut, SimpleFrame};
use shm_flight::{RemoteConfig, RemoteWorker, Server, ServerConfig};
use shm_transport::CalleeExt;
use shm_transport::{Router, is_worker, serve};

/// How many `sleep` handlers have started.
static SLEEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn router() -> Router {
    Router::new()
        .handle("pid", |(): (), _| {
            Ok::<_, String>(Serde(std::process::id()))
        })
        .handle("echo_f64", |a: ShmArray<f64, IxDyn>, _| Ok::<_, String>(a))
        .handle("echo_i32", |a: ShmArray<i32, IxDyn>, _| Ok::<_, String>(a))
        .handle("echo_u8", |a: ShmArray<u8, IxDyn>, _| Ok::<_, String>(a))
        .handle("double", |a: ShmArray<f64, IxDyn>, ctx| {
            let mut out = ShmArrayMut::<f64, IxDyn>::zeros(ctx.pool(), a.shape().to_vec())
                .map_err(|e| e.to_string())?;
            out.view_mut().zip_mut_with(&a.view(), |o, x| *o = 2.0 * x);
            Ok::<_, String>(out.freeze())
        })
        .handle("sum", |a: ShmArray<f64, IxDyn>, _| {
            Ok::<_, String>(Serde(a.view().sum()))
        })
        .handle("len", |a: ShmArray<u8, IxDyn>, _| {
            Ok::<_, String>(Serde(a.len()))
        })
        .handle("zeros", |Serde(n): Serde<usize>, ctx| {
            ShmArrayMut::<u8, ndarray::Ix1>::zeros(ctx.pool(), n)
                .map(ShmArrayMut::freeze)
                .map_err(|e| e.to_string())
        })
        .handle("frame", |f: SimpleFrame<f64>, _| Ok::<_, String>(f))
        .handle("batch", |ColumnFrame(b), _| Ok::<_, String>(ColumnFrame(b)))
        .handle(
            "wide",
            |Serde((columns, rows)): Serde<(usize, usize)>, _| {
                Ok::<_, String>(ColumnFrame(shm_tests::wide_batch(columns, rows)))
            },
        )
        .handle("batch_rows", |ColumnFrame(b), _| {
            Ok::<_, String>(Serde(b.num_rows()))
        })
        .handle("serde", |Serde(v): Serde<Vec<String>>, _| {
            Ok::<_, String>(Serde(v))
        })
        .handle(
            "pair",
            |(a, Serde(s)): (ShmArray<i64, IxDyn>, Serde<String>), _| {
                Ok::<_, String>((a, Serde(s.to_uppercase())))
            },
        )
        .handle("sleep", |Serde(ms): Serde<u64>, _| {
            SLEEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!("sleeping {ms} ms");
            std::thread::sleep(Duration::from_millis(ms));
            Ok::<_, String>(Serde(ms))
        })
        .handle("sleeps", |(): (), _| {
            Ok::<_, String>(Serde(SLEEPS.load(std::sync::atomic::Ordering::Relaxed)))
        })
        .handle("pool_stats", |(): (), ctx| {
            let stats = ctx.pool().stats();
            Ok::<_, String>(Serde((
                stats.live_blocks as u64,
                stats.segments_owned as u64,
                stats.bytes_cached,
            )))
        })
        .handle("live_blocks", |(): (), ctx| {
            Ok::<_, String>(Serde(ctx.pool().stats().live_blocks))
        })
        .handle("fail", |(): (), _| Err::<(), _>("the handler says no"))
        .handle("panic", |(): (), _| -> Result<(), String> {
            panic!("the handler panics")
        })
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    if is_worker() {
        if let Err(err) = serve(router()) {
            eprintln!("serve failed: {err}");
            std::process::exit(1);
        }
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(url) = flag(&args, "--client") {
        client(&url, &args);
        return;
    }
    let Some(listen) = flag(&args, "--listen") else {
        eprintln!("usage: shm-flight-test-server --listen ADDR [--token T] | --client URL");
        std::process::exit(2);
    };
    let addr = listen.parse().unwrap_or_else(|e| {
        eprintln!("--listen {listen}: {e}");
        std::process::exit(2);
    });
    let mut config = ServerConfig::new(addr);
    if let Some(token) = flag(&args, "--token") {
        config = config.with_token(token);
    }
    if let Some(max) = flag(&args, "--max-payload").and_then(|m| m.parse().ok()) {
        config = config.with_limits(shm_flight::Limits::default().with_max_payload(max));
    }
    if let Some(n) = flag(&args, "--handlers").and_then(|m| m.parse().ok()) {
        config = config.with_handlers(n);
    }
    if let Some(n) = flag(&args, "--queue").and_then(|m| m.parse().ok()) {
        config = config.with_queue(n);
    }
    if let Some((total, per)) = flag(&args, "--memory").and_then(|m| {
        let (total, per) = m.split_once(',')?;
        Some((total.parse().ok()?, per.parse().ok()?))
    }) {
        config = config.with_memory_budget(total, per);
    }
    if args.iter().any(|a| a == "--no-data-connections") {
        config = config.with_data_connections(false);
    }
    if let Some(ms) = flag(&args, "--message-timeout-ms").and_then(|m| m.parse().ok()) {
        config = config.with_message_timeout(Duration::from_millis(ms));
    }
    let capacity = flag(&args, "--capacity").and_then(|m| m.parse().ok());
    let idle = flag(&args, "--idle-release-ms").and_then(|m| m.parse().ok());
    if capacity.is_some() || idle.is_some() {
        let mut pool_config = shm_core::PoolConfig::default().with_capacity(capacity);
        if let Some(ms) = idle {
            pool_config = pool_config.with_idle_release(0, Some(Duration::from_millis(ms)));
        }
        let pool = shm_core::ShmPool::with_config(pool_config);
        config = config.with_pool(pool.unwrap_or_else(|e| {
            eprintln!("cannot make a pool: {e}");
            std::process::exit(1);
        }));
    }
    #[cfg(feature = "tls")]
    if let (Some(cert), Some(key)) = (flag(&args, "--tls-cert"), flag(&args, "--tls-key")) {
        let read = |path: &str| {
            std::fs::read(path).unwrap_or_else(|e| {
                eprintln!("{path}: {e}");
                std::process::exit(2);
            })
        };
        config = config.with_tls(read(&cert), read(&key));
    }
    let server = Server::start(router(), config).unwrap_or_else(|e| {
        eprintln!("cannot serve on {listen}: {e}");
        std::process::exit(1);
    });
    println!(
        "listening {} {:016x}",
        server.local_addr(),
        server.instance()
    );
    let _ = std::io::stdout().flush();
    // Serve until the driver closes our stdin.
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    server.shutdown();
}

fn client(url: &str, args: &[String]) {
    let mib: usize = flag(args, "--send-mib")
        .and_then(|m| m.parse().ok())
        .unwrap_or(64);
    let mut config = RemoteConfig::new(url);
    if let Some(token) = flag(args, "--token") {
        config = config.with_token(token);
    }
    let worker = RemoteWorker::new(config).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1);
    });
    println!("calling");
    let _ = std::io::stdout().flush();
    if let Some(mib) = flag(args, "--receive-mib").and_then(|m| m.parse::<usize>().ok()) {
        match worker.call::<_, ShmArray<u8, ndarray::Ix1>>("zeros", &Serde(mib << 20)) {
            Ok(zeros) => println!("received {}", zeros.len()),
            Err(err) => {
                eprintln!("{err}");
                std::process::exit(1);
            }
        }
        return;
    }
    let a = Array1::from_elem(mib << 17, 1.0f64).into_dyn();
    match worker.call::<_, Serde<f64>>("sum", &a) {
        Ok(Serde(sum)) => println!("sum {sum}"),
        Err(err) => {
            eprintln!("{err}");
            std::process::exit(1);
        }
    }
}
