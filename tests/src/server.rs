//! A Flight test server as a process of its own, for the tests of remote workers.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use ndarray::Array1;
use shm_codec::Serde;
use shm_flight::{RemoteConfig, RemoteWorker};
use shm_transport::CalleeExt;

/// A remote worker process on loopback; stops when dropped (its stdin closes).
pub struct ServerProcess {
    /// The address it listens on, `host:port`.
    pub addr: String,
    /// Its instance number.
    pub instance: u64,
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Receiver<String>,
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProcess")
            .field("addr", &self.addr)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl ServerProcess {
    /// Starts `binary` (the test server) on a free loopback port with `args`.
    pub fn start(binary: &str, args: &[&str]) -> Self {
        Self::start_on(binary, "127.0.0.1:0", args)
    }

    /// Starts `binary` listening on `listen` with `args`.
    pub fn start_on(binary: &str, listen: &str, args: &[&str]) -> Self {
        let mut command = Command::new(binary);
        command.args(["--listen", listen]).args(args);
        Self::spawn(command)
    }

    /// A server whose `/dev/shm` is a private tmpfs of `size` (its own mount namespace; the
    /// network is shared). `None` without root.
    pub fn start_with_private_dev_shm(binary: &str, size: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a private /dev/shm needs root");
            return None;
        }
        let script = format!(
            "mount -t tmpfs -o size={size} shm-flight-test /dev/shm && exec \"$0\" --listen \
             127.0.0.1:0"
        );
        let mut command = Command::new("unshare");
        command.args(["-m", "sh", "-c", &script]).arg(binary);
        Some(Self::spawn(command))
    }

    /// Runs `command`, which starts the server, and reads where it listens.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the server starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let (lines, stderr) = channel();
        let err = BufReader::new(child.stderr.take().expect("piped"));
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                let _ = lines.send(line);
            }
        });
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("the server says where it listens");
        let mut words = line.split_whitespace();
        assert_eq!(
            words.next(),
            Some("listening"),
            "unexpected first line {line:?}"
        );
        let addr = words.next().expect("address").to_owned();
        let instance = u64::from_str_radix(words.next().expect("instance"), 16).expect("hex");
        ServerProcess {
            stdin: child.stdin.take(),
            child,
            addr,
            instance,
            stderr,
        }
    }

    /// `http://` and its address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits, up to 30 s, for a line of its stderr that contains `needle`.
    pub fn wait_for_stderr(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .stderr
                .recv_timeout(left)
                .expect("the server's line comes");
            if line.contains(needle) {
                return;
            }
        }
    }

    /// Kills it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes stdin and waits for a clean exit.
    pub fn stop(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("the server waits");
        assert!(status.success(), "the server failed: {status}");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if matches!(self.child.try_wait(), Ok(None)) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.kill();
        }
    }
}

/// An honest client that calls `sum` over 1 MiB every 100 ms on a thread of its own until
/// stopped, and records how long each call took and which failed.
#[derive(Debug)]
pub struct Honest {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<Duration>, Vec<String>)>,
}

impl Honest {
    /// Starts calling the server at `url`.
    pub fn start(url: &str) -> Self {
        let worker = RemoteWorker::new(RemoteConfig::new(url)).expect("a client");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let a = Array1::from_elem(1 << 17, 1.0f64).into_dyn();
            let (mut took, mut failed) = (Vec::new(), Vec::new());
            while !stopping.load(Ordering::Relaxed) {
                let started = Instant::now();
                match worker.call_timeout::<_, Serde<f64>>("sum", &a, Duration::from_secs(10)) {
                    Ok(Serde(sum)) if sum == (1 << 17) as f64 => took.push(started.elapsed()),
                    other => failed.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (took, failed)
        });
        Honest { stop, thread }
    }

    /// Stops, asserts that every call succeeded, and gives the median and the slowest.
    pub fn finish(self) -> (Duration, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut took, failed) = self.thread.join().expect("the honest client");
        assert!(failed.is_empty(), "honest calls failed: {failed:?}");
        assert!(!took.is_empty(), "no honest call was made");
        took.sort();
        let (median, slowest) = (took[took.len() / 2], took[took.len() - 1]);
        eprintln!(
            "honest client: {} calls, median {median:?}, slowest {slowest:?}",
            took.len()
        );
        (median, slowest)
    }
}
