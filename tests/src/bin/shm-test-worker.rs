//! The worker of the transport tests, and a parent for the test in which the parent is killed.
//!
//! - As a worker (started by `Worker::spawn`): serves the handlers below.
//! - `--fail-at-start`: writes a line to stderr and exits with code 3 before serving.
//! - `--parent`: spawns itself as a worker, prints the worker's pid, makes a call that keeps
//!   arguments alive in the worker, prints `ready`, then waits to be killed.

use std::sync::Mutex;
use std::time::Duration;

use ndarray::{Array1, Ix1, IxDyn};
use shm_codec::{Serde, ShmArray, ShmArrayMut, SimpleFrame};
use shm_transport::{Router, Worker, WorkerConfig, is_worker, serve};

/// Arrays a handler was asked to keep, to test views held past the call.
static KEPT: Mutex<Vec<ShmArray<f64, Ix1>>> = Mutex::new(Vec::new());

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--fail-at-start") {
        eprintln!("this worker refuses to start");
        std::process::exit(3);
    }
    if args.iter().any(|a| a == "--parent") {
        run_parent();
        return;
    }
    if !is_worker() {
        eprintln!("shm-test-worker: start me through shm_transport::Worker::spawn");
        std::process::exit(2);
    }
    if let Err(err) = serve(router()) {
        eprintln!("serve failed: {err}");
        std::process::exit(1);
    }
}

fn router() -> Router {
    shm_tests::model::handlers(Router::new())
        .handle("echo", |Serde(x): Serde<u64>, _| Ok::<_, String>(Serde(x)))
        .handle(
            "repeat",
            |Serde((text, times)): Serde<(String, usize)>, _| {
                Ok::<_, String>(Serde(text.repeat(times)))
            },
        )
        .handle(
            "firsts",
            |(Serde(a), Serde(b)): (Serde<Vec<u8>>, Serde<Vec<u8>>), _| {
                Ok::<_, String>(Serde((
                    a.first().copied(),
                    b.first().copied(),
                    a.len(),
                    b.len(),
                )))
            },
        )
        .handle("pid", |(): (), _| {
            Ok::<_, String>(Serde(std::process::id()))
        })
        .handle("sum", |a: ShmArray<f64, IxDyn>, _| {
            Ok::<_, String>(Serde(a.view().sum()))
        })
        .handle("double", |a: ShmArray<f64, IxDyn>, ctx| {
            let mut out = ShmArrayMut::<f64, IxDyn>::zeros(ctx.pool(), a.shape())
                .map_err(|e| e.to_string())?;
            out.view_mut().zip_mut_with(&a.view(), |o, x| *o = 2.0 * x);
            Ok::<_, String>(out.freeze())
        })
        .handle("fill", |Serde((n, value)): Serde<(usize, f64)>, ctx| {
            let mut out =
                ShmArrayMut::<f64, Ix1>::zeros(ctx.pool(), n).map_err(|e| e.to_string())?;
            out.view_mut().fill(value);
            Ok::<_, String>(out.freeze())
        })
        .handle(
            "fill_pair",
            |Serde((n, value)): Serde<(usize, f64)>, ctx| {
                let mut a =
                    ShmArrayMut::<f64, Ix1>::zeros(ctx.pool(), n).map_err(|e| e.to_string())?;
                let mut b =
                    ShmArrayMut::<f64, Ix1>::zeros(ctx.pool(), n).map_err(|e| e.to_string())?;
                a.view_mut().fill(value);
                b.view_mut().fill(-value);
                Ok::<_, String>((a.freeze(), b.freeze()))
            },
        )
        .handle(
            "axpy",
            |(Serde(a), x, y): (Serde<f64>, ShmArray<f64, Ix1>, ShmArray<f64, Ix1>), _| {
                Ok::<_, String>(&x.view() * a + y.view())
            },
        )
        .handle("column_sums", |frame: SimpleFrame<f64>, _| {
            let sums: Vec<f64> = (0..frame.ncols())
                .filter_map(|j| frame.column_at(j))
                .map(|c| c.sum())
                .collect();
            Ok::<_, String>(Serde((frame.columns().to_vec(), sums)))
        })
        .handle("identity", |a: ShmArray<f64, Ix1>, _| Ok::<_, String>(a))
        .handle("keep", |a: ShmArray<f64, Ix1>, _| {
            KEPT.lock().map_err(|e| e.to_string())?.push(a);
            Ok::<_, String>(())
        })
        .handle("forget", |(): (), _| {
            KEPT.lock().map_err(|e| e.to_string())?.clear();
            Ok::<_, String>(())
        })
        .handle("fail", |(): (), _| Err::<(), _>("the handler says no"))
        .handle("panic", |(): (), _| -> Result<(), String> {
            panic!("the handler panicked")
        })
        .handle("sleep", |Serde(ms): Serde<u64>, _| {
            std::thread::sleep(Duration::from_millis(ms));
            Ok::<_, String>(())
        })
        .handle("sleep_us", |Serde(us): Serde<u64>, _| {
            std::thread::sleep(Duration::from_micros(us));
            Ok::<_, String>(Serde(us))
        })
        .handle("stderr", |Serde(line): Serde<String>, _| {
            eprintln!("{line}");
            Ok::<_, String>(())
        })
        .handle("abort", |(): (), _| -> Result<(), String> {
            std::process::abort()
        })
}

fn run_parent() {
    let exe = std::env::current_exe().expect("own path");
    let worker = Worker::spawn(WorkerConfig::new(exe)).expect("worker starts");
    println!("{}", worker.pid());
    let a = Array1::from_elem(1 << 17, 1.5f64);
    worker.call::<_, ()>("keep", &a).expect("keep");
    println!("ready");
    loop {
        std::thread::park();
    }
}
