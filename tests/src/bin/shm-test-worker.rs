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
use shm_arrow::ColumnFrame;
use shm_codec::{Serde, ShmArray, ShmArrayMut, SimpleFrame, Value};
use shm_transport::CalleeExt;
use shm_transport::{Router, Worker, WorkerConfig, is_worker, serve};

/// Arrays a handler was asked to keep, to test views held past the call.
static KEPT: Mutex<Vec<ShmArray<f64, Ix1>>> = Mutex::new(Vec::new());

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--fail-at-start") {
        eprintln!("this worker refuses to start");
        std::process::exit(3);
    }
    if let Some(at) = args.iter().position(|a| a == "--slow-start") {
        let ms = args
            .get(at + 1)
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(1000);
        std::thread::sleep(Duration::from_millis(ms));
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
        .handle("echo_value", |Serde(v): Serde<Value>, _| {
            Ok::<_, String>(Serde(v))
        })
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
        .handle("spawn_sleeper", |(): (), _| {
            // A child that outlives the call and holds the worker's stderr, as a library that
            // starts a helper process would.
            let child = std::process::Command::new("sleep")
                .arg("600")
                .stdin(std::process::Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(Serde(child.id()))
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
        .handle("locate", |a: ShmArray<f64, IxDyn>, _| {
            // Which block the worker read, and what it found there: a parent that wrote the
            // array in place sees its own block's name and offset.
            let block = a.block().ok_or("the array came inline")?;
            let at = (block.name().to_owned(), block.offset() as u64);
            Ok::<_, String>(Serde((at, a.view().sum())))
        })
        .handle("identity", |a: ShmArray<f64, Ix1>, _| Ok::<_, String>(a))
        .handle("batch", |ColumnFrame(b), _| Ok::<_, String>(ColumnFrame(b)))
        .handle(
            "wide",
            |Serde((columns, rows)): Serde<(usize, usize)>, _| {
                Ok::<_, String>(ColumnFrame(shm_tests::wide_batch(columns, rows)))
            },
        )
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
            hostile::forge_reply(
                1,
                shm_core::ShmRef::from_hex(&hex).map_err(|e| e.to_string())?,
            );
            // Let the parent read the forgery before the transport's own reply comes.
            std::thread::sleep(Duration::from_millis(500));
            Ok::<_, String>(())
        })
        .handle("forge_spill", |Serde(bytes): Serde<usize>, ctx| {
            hostile::forge_spill(ctx.pool(), bytes)?;
            // Let the parent read the forgery before the transport's own reply comes.
            std::thread::sleep(Duration::from_millis(500));
            Ok::<_, String>(())
        })
        .handle(
            "forge_descriptor",
            |Serde((id, kind)): Serde<(u64, String)>, _| {
                hostile::forge_descriptor(id, &kind)?;
                // Let the parent read the forgery before the transport's own reply comes.
                std::thread::sleep(Duration::from_millis(500));
                Ok::<_, String>(())
            },
        )
        .handle(
            "truncate_later",
            |Serde((n, delay_ms)): Serde<(usize, u64)>, ctx| {
                let mut out =
                    ShmArrayMut::<f64, Ix1>::zeros(ctx.pool(), n).map_err(|e| e.to_string())?;
                out.view_mut().fill(1.5);
                hostile::later(delay_ms, move || hostile::cut_own_segments(n * 8));
                Ok::<_, String>(out.freeze())
            },
        )
        .handle(
            "bools_rewrite_later",
            |Serde((n, delay_ms)): Serde<(usize, u64)>, ctx| {
                let mut out =
                    ShmArrayMut::<bool, Ix1>::zeros(ctx.pool(), n).map_err(|e| e.to_string())?;
                out.view_mut()
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = i % 3 == 0);
                hostile::later(delay_ms, move || hostile::scribble_own_segments(n / 4));
                Ok::<_, String>(out.freeze())
            },
        )
        .handle("sabotage_report", |(): (), _| {
            Ok::<_, String>(Serde(hostile::report()))
        })
        .handle(
            "rewrite_later",
            |Serde((rows, delay_ms)): Serde<(usize, u64)>, _| {
                hostile::later(delay_ms, move || hostile::scribble_own_segments(rows));
                Ok::<_, String>(shm_arrow::ColumnFrame(hostile::strings(rows)))
            },
        )
        .handle("jam_returns", |(): (), _| {
            hostile::jam_returns_to_parent();
            Ok::<_, String>(())
        })
        .handle("truncate_channel", |(): (), _| {
            Ok::<_, String>(Serde(hostile::cut_channel()))
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
/// processes' memory, send descriptors that are not segments, try to truncate its segments or
/// the channel after sending them, rewrite them through its own mappings, corrupt the channel.
mod hostile {
    use std::io::IoSlice;
    use std::mem::MaybeUninit;
    use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;

    use arrow::array::{RecordBatch, StringArray};

    use shm_codec::{Payload, SERDE_CODEC};
    use shm_core::{SegmentLink, ShmPool, ShmRef};
    use shm_transport::{CHANNEL_ENV, LINK_ENV, RemoteError};

    /// Attempts to change a segment after sending it, and how many the kernel refused.
    static TRIED: AtomicUsize = AtomicUsize::new(0);
    static REFUSED: AtomicUsize = AtomicUsize::new(0);
    /// Segments rewritten through this worker's own mappings.
    static SCRIBBLED: AtomicUsize = AtomicUsize::new(0);

    /// (tried, refused, rewritten) so far.
    pub fn report() -> (usize, usize, usize) {
        (
            TRIED.load(Ordering::SeqCst),
            REFUSED.load(Ordering::SeqCst),
            SCRIBBLED.load(Ordering::SeqCst),
        )
    }

    fn attempt(refused: bool) {
        TRIED.fetch_add(1, Ordering::SeqCst);
        REFUSED.fetch_add(usize::from(refused), Ordering::SeqCst);
    }

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
        #[allow(dead_code)]
        Shutdown,
        Spilled {
            frame: ShmRef,
            loan: u64,
        },
    }

    /// Sends the parent, as a spilled frame, a block of `bytes` bytes of this worker's pool
    /// (its descriptor first, on the link).
    pub fn forge_spill(pool: &ShmPool, bytes: usize) -> Result<(), String> {
        let mut block = pool.alloc(bytes).map_err(|e| e.to_string())?;
        block.as_mut_slice().fill(0xff);
        let block = block.freeze();
        let fd = shm_core::fuzzing::descriptor(&block).ok_or("a block of its own")?;
        let r = block.to_ref();
        send_on_link(&r.name, fd);
        let frame = WireFrame::Spilled { frame: r, loan: 1 };
        push_to_parent(channel(), &postcard::to_stdvec(&frame).expect("a frame"));
        // The parent may map the block: it stays for as long as this worker lives.
        std::mem::forget(block);
        Ok(())
    }

    /// Puts a reply to call `id` into the reply ring, ahead of the transport's own, whose
    /// serde value is the block `r` names.
    pub fn forge_reply(id: u64, r: ShmRef) {
        let payload = Payload::from_refs(SERDE_CODEC, Vec::new(), vec![r], Vec::new());
        let frame = WireFrame::Reply {
            id,
            outcome: Ok(payload),
            loans: vec![1],
        };
        push_to_parent(channel(), &postcard::to_stdvec(&frame).expect("a frame"));
    }

    /// Sends, on the link and under a name of this worker's session, a descriptor of `kind`
    /// that is not a segment (or, for `unsent`, nothing), then forges a reply to call `id`
    /// that names it.
    pub fn forge_descriptor(id: u64, kind: &str) -> Result<(), String> {
        let session = ShmPool::new().map_err(|e| e.to_string())?.session();
        let name = format!("/shm-{session}-{:016x}", 0x1234_5678_9abc_def0u64 + id);
        let file = |path: &str| std::fs::File::open(path).map(OwnedFd::from);
        let fd: Option<OwnedFd> = match kind {
            "file" => Some(file("/etc/passwd").map_err(|e| e.to_string())?),
            "directory" => Some(file("/tmp").map_err(|e| e.to_string())?),
            "fifo" => {
                let (reader, writer) = std::io::pipe().map_err(|e| e.to_string())?;
                std::mem::forget(writer);
                Some(OwnedFd::from(reader))
            }
            "unsealed" => {
                let memfd = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC)
                    .map_err(|e| e.to_string())?;
                rustix::fs::ftruncate(&memfd, 4096).map_err(|e| e.to_string())?;
                Some(memfd)
            }
            "unsent" => None,
            other => return Err(format!("unknown kind {other}")),
        };
        if let Some(fd) = &fd {
            send_on_link(&name, fd.as_fd());
        }
        forge_reply(
            id,
            ShmRef {
                name,
                size: 4096,
                offset: 0,
                content_size: 4096,
            },
        );
        Ok(())
    }

    /// Writes `+NAME` with `fd` into this worker's end of the link, as docs/format.md says.
    fn send_on_link(name: &str, fd: BorrowedFd<'_>) {
        let number: i32 = std::env::var(LINK_ENV).unwrap().parse().unwrap();
        // SAFETY: the transport keeps this descriptor open for as long as the worker serves.
        let link = unsafe { BorrowedFd::borrow_raw(number) };
        let message = [b"+", name.as_bytes()].concat();
        let fds = [fd];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds));
        rustix::net::sendmsg(
            link,
            &[IoSlice::new(&message)],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .expect("the link takes the message");
    }

    /// Sends a hello as the transport would, but naming the parent's session (the one in the
    /// channel's name) as this worker's own. Runs instead of `serve`, so it takes the link.
    pub fn forge_hello() {
        let channel_ref = ShmRef::from_hex(&std::env::var(CHANNEL_ENV).expect("a worker")).unwrap();
        let parents = shm_core::SessionId::of_segment(&channel_ref.name).expect("an shm name");
        let number: i32 = std::env::var(LINK_ENV).unwrap().parse().unwrap();
        // SAFETY: the parent passed this descriptor for the link; nothing else here owns it.
        let link = SegmentLink::from_fd(unsafe { OwnedFd::from_raw_fd(number) }).unwrap();
        let channel = link.attach_shared(&channel_ref).expect("the channel");
        let frame = WireFrame::Hello {
            version: shm_transport::PROTOCOL_VERSION,
            pid: std::process::id(),
            session: parents.to_string(),
        };
        push_to_parent(
            channel.as_ptr(),
            &postcard::to_stdvec(&frame).expect("a frame"),
        );
        std::mem::forget((channel, link));
    }

    /// The mappings of this process whose `/proc/self/maps` line `pick` selects, as
    /// (address, length).
    fn mappings(pick: impl Fn(&str) -> bool) -> Vec<(usize, usize)> {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        maps.lines()
            .filter(|line| pick(line))
            .map(|line| {
                let (range, _) = line.split_once(' ').unwrap();
                let (start, end) = range.split_once('-').unwrap();
                let start = usize::from_str_radix(start, 16).unwrap();
                (start, usize::from_str_radix(end, 16).unwrap() - start)
            })
            .collect()
    }

    /// The first byte of the channel, as this worker maps it (read-write).
    fn channel() -> *mut u8 {
        let r = ShmRef::from_hex(&std::env::var(CHANNEL_ENV).expect("a worker")).unwrap();
        let memfd = format!("/memfd:{} (deleted)", &r.name[1..]);
        let found = mappings(|line| line.ends_with(&memfd) && line.contains(" rw-s "));
        found.first().expect("the channel is mapped").0 as *mut u8
    }

    /// Writes one frame into the ring towards the parent and rings the parent's bell.
    fn push_to_parent(base: *mut u8, bytes: &[u8]) {
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

    /// The memfds of this project that process `pid` holds of at least `at_least` bytes,
    /// opened read-write through `/proc/PID/fd`, as any process of the same user can.
    fn memfds(pid: &str, prefix: &str, at_least: u64) -> Vec<std::fs::File> {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let target = std::fs::read_link(&path).ok()?;
                if !target.to_string_lossy().starts_with(prefix) {
                    return None;
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path);
                file.ok()
                    .filter(|f| f.metadata().is_ok_and(|m| m.len() >= at_least))
            })
            .collect()
    }

    /// Tries to truncate this worker's segments of at least `at_least` bytes.
    pub fn cut_own_segments(at_least: usize) {
        let session = ShmPool::new().expect("the worker's pool").session();
        let prefix = format!("/memfd:shm-{session}-");
        for file in memfds("self", &prefix, at_least as u64) {
            attempt(file.set_len(0).is_err());
        }
    }

    /// Overwrites, through this worker's own writable mappings, every segment of its that
    /// could hold `rows` strings with 0xff bytes: every offset becomes -1 and every length
    /// huge. The seals stop everyone but the creator; the creator can always do this.
    pub fn scribble_own_segments(rows: usize) {
        let session = ShmPool::new().expect("the worker's pool").session();
        let tag = format!("/memfd:shm-{session}-");
        for (start, len) in mappings(|line| line.contains(&tag) && line.contains(" rw-s ")) {
            if len >= rows * 4 {
                // SAFETY: a whole writable mapping of this process; the test wants its bytes
                // changed under the parent, which reads it (or a private copy of it).
                unsafe { std::ptr::write_bytes(start as *mut u8, 0xff, len) };
                SCRIBBLED.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// `rows` strings `s0`, `s1`, ….
    pub fn strings(rows: usize) -> RecordBatch {
        let text: StringArray = (0..rows).map(|i| Some(format!("s{i}"))).collect();
        RecordBatch::try_from_iter([("text", Arc::new(text) as _)]).expect("a batch")
    }

    /// Tries to truncate the channel, through the parent's descriptor of it in
    /// `/proc/PPID/fd`; returns (tried, refused).
    pub fn cut_channel() -> (usize, usize) {
        let r = ShmRef::from_hex(&std::env::var(CHANNEL_ENV).expect("a worker")).unwrap();
        let parent = std::os::unix::process::parent_id().to_string();
        let files = memfds(&parent, &format!("/memfd:{}", &r.name[1..]), 0);
        let refused = files.iter().filter(|f| f.set_len(0).is_err()).count();
        (files.len(), refused)
    }

    /// Writes an impossible tail (a million ids ahead of the head) into the release ring towards
    /// the parent (head at 704, tail at 768): nothing this worker holds can come back.
    pub fn jam_returns_to_parent() {
        let base = channel();
        // SAFETY: both words are inside the channel block and 8-byte aligned.
        let (head, tail) = unsafe {
            (
                &*base.add(704).cast::<AtomicU64>(),
                &*base.add(768).cast::<AtomicU64>(),
            )
        };
        tail.store(head.load(Ordering::Acquire) + 1_000_000, Ordering::Release);
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
    /// is at 256, as the layout in `crates/shm-transport/src/channel.rs` says), then says so
    /// on stderr.
    pub fn jam_request_ring(jam: Jam) {
        let base = channel();
        // SAFETY: both words are inside the channel block and 8-byte aligned.
        let (head, tail) = unsafe {
            (
                &*base.add(192).cast::<AtomicU64>(),
                &*base.add(256).cast::<AtomicU64>(),
            )
        };
        let tail = tail.load(Ordering::Acquire);
        head.store(
            match jam {
                Jam::Full => tail.wrapping_sub(64),
                Jam::Impossible => tail.wrapping_add(1000),
            },
            Ordering::Release,
        );
        eprintln!("jammed");
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
