//! The worker of the transport tests, and a parent for the test in which the parent is killed.
//!
//! - As a worker (started by `Worker::spawn`): serves the handlers below, some of which
//!   behave as a hostile worker would (see `hostile`).
//! - `--fail-at-start`: writes a line to stderr and exits with code 3 before serving.
//! - `--forge-hello`: a hostile worker whose hello claims the parent's session as its own; it
//!   then waits to be killed.
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
    if args.iter().any(|a| a == "--forge-hello") {
        hostile::forge_hello();
        loop {
            std::thread::park();
        }
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
        .handle("foreign", |Serde(hex): Serde<String>, _| {
            hostile::forge_reply(1, &hex);
            // Let the parent read the forgery before the transport's own reply comes.
            std::thread::sleep(Duration::from_millis(500));
            Ok::<_, String>(())
        })
        .handle(
            "truncate_later",
            |Serde((n, delay_ms)): Serde<(usize, u64)>, ctx| {
                let mut out =
                    ShmArrayMut::<f64, Ix1>::zeros(ctx.pool(), n).map_err(|e| e.to_string())?;
                out.view_mut().fill(1.5);
                hostile::later(delay_ms, move || hostile::cut_own_segments(n * 8, 0));
                Ok::<_, String>(out.freeze())
            },
        )
        .handle(
            "rewrite_later",
            |Serde((rows, delay_ms)): Serde<(usize, u64)>, _| {
                hostile::later(delay_ms, move || hostile::scribble_own_segments(rows));
                Ok::<_, String>(shm_arrow::ColumnFrame(hostile::strings(rows)))
            },
        )
        .handle("truncate_channel", |(): (), _| {
            hostile::cut_channel();
            Ok::<_, String>(())
        })
        .handle(
            "jam",
            |Serde(jam): Serde<hostile::Jam>, _| -> Result<(), String> {
                hostile::jam_request_ring(jam);
                loop {
                    std::thread::park();
                }
            },
        )
}

/// What a hostile worker of the same user can do beyond sending bad bytes: name other
/// processes' memory, truncate or rewrite segments after sending them, corrupt the channel.
mod hostile {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::time::Duration;

    use arrow::array::{RecordBatch, StringArray};
    use std::sync::atomic::{AtomicU64, Ordering};

    use shm_codec::{Payload, SERDE_CODEC};
    use shm_core::{ShmPool, ShmRef, list_segments};
    use shm_transport::{CHANNEL_ENV, RemoteError};

    /// The channel's frames as they travel (postcard), written here from the layout rather
    /// than through the transport, which would not send what a hostile worker sends.
    #[derive(serde::Serialize)]
    enum WireFrame {
        Hello {
            version: u32,
            pid: u32,
            session: String,
        },
        #[allow(dead_code)]
        Call {
            id: u64,
            method: String,
            args: Payload,
            loans: Vec<u64>,
        },
        Reply {
            id: u64,
            outcome: Result<Payload, RemoteError>,
            loans: Vec<u64>,
        },
    }

    /// Puts a reply to call `id` into the reply ring, ahead of the transport's own, whose
    /// serde value is the block a hex reference names: another process's memory.
    pub fn forge_reply(id: u64, hex: &str) {
        let r = ShmRef::from_hex(hex).expect("a reference");
        let payload = Payload::from_refs(SERDE_CODEC, Vec::new(), vec![r], Vec::new());
        let frame = WireFrame::Reply {
            id,
            outcome: Ok(payload),
            loans: vec![1],
        };
        push_to_parent(&postcard::to_stdvec(&frame).expect("a frame"));
    }

    /// Sends a hello as the transport would, but naming the parent's session (the one in the
    /// channel's name) as this worker's own.
    pub fn forge_hello() {
        let channel = ShmRef::from_hex(&std::env::var(CHANNEL_ENV).expect("a worker")).unwrap();
        let parents = shm_core::SessionId::of_segment(&channel.name).expect("an shm name");
        let frame = WireFrame::Hello {
            version: shm_transport::PROTOCOL_VERSION,
            pid: std::process::id(),
            session: parents.to_string(),
        };
        push_to_parent(&postcard::to_stdvec(&frame).expect("a frame"));
    }

    /// Writes one frame into the ring towards the parent and rings the parent's bell.
    fn push_to_parent(bytes: &[u8]) {
        let pool = ShmPool::new().expect("a pool");
        let channel = ShmRef::from_hex(&std::env::var(CHANNEL_ENV).expect("a worker")).unwrap();
        let channel = pool.attach_shared(&channel).expect("the channel");
        let base = channel.as_shared_ptr();
        // SAFETY: offsets of the layout in docs/format.md, inside the channel block and 8-byte
        // aligned; this thread is the ring's only producer while it writes.
        unsafe {
            let tail = &*base.add(448).cast::<AtomicU64>();
            let position = tail.load(Ordering::Acquire);
            let slot = base.add(1024 + (64 + (position % 64) as usize) * 4096);
            std::ptr::copy_nonoverlapping((bytes.len() as u32).to_le_bytes().as_ptr(), slot, 4);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), slot.add(4), bytes.len());
            tail.store(position + 1, Ordering::Release);
            // Ring the parent's bell (its futex word at 64), as the transport does.
            let bell = &*base.add(64).cast::<std::sync::atomic::AtomicU32>();
            bell.fetch_add(1, Ordering::SeqCst);
            libc::syscall(libc::SYS_futex, bell.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
        }
    }

    /// Runs `act` on another thread after `delay_ms`: after the reply has gone.
    pub fn later(delay_ms: u64, act: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            act();
        });
    }

    fn own_segments(at_least: usize) -> Vec<std::path::PathBuf> {
        let session = ShmPool::new().expect("the worker's pool").session();
        list_segments()
            .expect("a listing")
            .into_iter()
            .filter(|s| s.session == session && s.len >= at_least as u64)
            .map(|s| std::path::Path::new("/dev/shm").join(&s.name[1..]))
            .collect()
    }

    /// Truncates this worker's segments of at least `at_least` bytes to `len`.
    pub fn cut_own_segments(at_least: usize, len: u64) {
        for path in own_segments(at_least) {
            let file = std::fs::OpenOptions::new().write(true).open(path);
            let _ = file.and_then(|f| f.set_len(len));
        }
    }

    /// Overwrites every segment of this worker that could hold `rows` strings with 0xff bytes:
    /// every offset becomes -1 and every length huge.
    pub fn scribble_own_segments(rows: usize) {
        for path in own_segments(rows * 4) {
            if let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) {
                let len = file.metadata().map_or(0, |m| m.len());
                let _ = file.write_all_at(&vec![0xff; len as usize], 0);
            }
        }
    }

    /// `rows` strings `s0`, `s1`, ….
    pub fn strings(rows: usize) -> RecordBatch {
        let text: StringArray = (0..rows).map(|i| Some(format!("s{i}"))).collect();
        RecordBatch::try_from_iter([("text", Arc::new(text) as _)]).expect("a batch")
    }

    fn channel_path() -> std::path::PathBuf {
        let hex = std::env::var(CHANNEL_ENV).expect("a worker");
        let r = ShmRef::from_hex(&hex).expect("the channel's reference");
        std::path::Path::new("/dev/shm").join(&r.name[1..])
    }

    /// Truncates the channel to nothing.
    pub fn cut_channel() {
        let file = std::fs::OpenOptions::new().write(true).open(channel_path());
        let _ = file.and_then(|f| f.set_len(0));
    }

    /// How to corrupt the head (the consumer's position) of the ring of calls.
    #[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug)]
    pub enum Jam {
        /// A full ring's worth behind the tail: the ring looks full for ever.
        Full,
        /// Ahead of the tail: positions no ring can have.
        Impossible,
    }

    /// Writes `jam` into the head of the ring of calls (offset 192 of the channel; its tail
    /// is at 256, as the layout in `crates/shm-transport/src/channel.rs` says).
    pub fn jam_request_ring(jam: Jam) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(channel_path())
            .expect("the channel");
        let mut tail = [0u8; 8];
        file.read_exact_at(&mut tail, 256).expect("the tail");
        let tail = u64::from_le_bytes(tail);
        let head = match jam {
            Jam::Full => tail.wrapping_sub(64),
            Jam::Impossible => tail.wrapping_add(1000),
        };
        file.write_all_at(&head.to_le_bytes(), 192)
            .expect("the head");
    }
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
