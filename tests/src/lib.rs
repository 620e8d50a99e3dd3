//! Helpers for the multi-process tests of shm: the child process they drive and a check that
//! `/dev/shm` is left as it was found.

pub mod model;
pub mod server;

use shm_transport::CalleeExt;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The environment variable that gives a linked child the number of its end of the link.
pub const LINK_ENV: &str = "SHM_TEST_LINK";

/// This project's files in `/dev/shm` (segments and session locks).
pub fn shm_listing() -> BTreeSet<String> {
    shm_core::list_files().expect("/dev/shm is readable")
}

/// Held by a test for its whole run: tests of one binary run one at a time, so that one test's
/// segments never look like another's leak, and the listing is compared when it ends.
#[derive(Debug)]
pub struct CleanShm {
    before: BTreeSet<String>,
    _serial: MutexGuard<'static, ()>,
}

impl CleanShm {
    /// Waits for the other tests of this binary, then records the listing.
    pub fn begin() -> Self {
        static SERIAL: Mutex<()> = Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        CleanShm {
            before: shm_listing(),
            _serial: serial,
        }
    }

    /// What `/dev/shm` held at `begin`.
    pub fn before(&self) -> BTreeSet<String> {
        self.before.clone()
    }

    /// Asserts that `/dev/shm` holds exactly what it held at `begin`.
    pub fn end(self) {
        assert_eq!(
            shm_listing(),
            self.before,
            "segments left behind in /dev/shm"
        );
    }
}

/// The pattern both sides write and check: byte `i` of a block seeded with `seed`.
pub fn pattern_byte(i: usize, seed: u8) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(seed)
}

/// Fills `bytes` with the pattern.
pub fn fill_pattern(bytes: &mut [u8], seed: u8) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = pattern_byte(i, seed);
    }
}

/// The index of the first byte that differs from the pattern, if any.
pub fn pattern_mismatch(bytes: &[u8], seed: u8) -> Option<usize> {
    bytes
        .iter()
        .enumerate()
        .position(|(i, &b)| b != pattern_byte(i, seed))
}

/// A running `shm-test-child`, talking line by line over its stdin and stdout.
#[derive(Debug)]
pub struct ChildProcess {
    /// The process, for killing and waiting.
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ChildProcess {
    /// Starts the child binary with the given arguments.
    pub fn spawn(binary: &str, args: &[&str]) -> Self {
        Self::start(Command::new(binary).args(args))
    }

    /// Starts the child binary with the given arguments and a segment link to it, on which
    /// the descriptors of `blocks` already wait: the child takes its end with
    /// [`inherited_link`].
    pub fn spawn_linked(
        binary: &str,
        args: &[&str],
        blocks: &[&shm_core::ShmBlock],
    ) -> (Self, shm_core::SegmentLink) {
        let (link, theirs) = shm_core::SegmentLink::pair().expect("a link");
        for block in blocks {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            link.offer(block, Some(deadline))
                .expect("the link takes the descriptor");
        }
        let fd = theirs.as_raw_fd();
        let mut command = Command::new(binary);
        command.args(args).env(LINK_ENV, fd.to_string());
        // SAFETY: one `fcntl` on a descriptor open in the child, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = Self::start(&mut command);
        drop(theirs);
        (child, link)
    }

    fn start(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("child starts");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        ChildProcess {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line the child prints, without its newline.
    pub fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("child output");
        assert!(!line.is_empty(), "child exited early");
        line.trim_end().to_owned()
    }

    /// The next line the child prints, or `None` once it has closed its output.
    pub fn read_line_or_end(&mut self) -> Option<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("child output");
        (!line.is_empty()).then(|| line.trim_end().to_owned())
    }

    /// Sends one line to the child.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("child reads stdin");
    }

    /// Closes stdin and waits for the child; asserts that it succeeded.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("child waits");
        assert!(status.success(), "child failed: {status}");
    }
}

/// The end of the link a parent made with [`ChildProcess::spawn_linked`]; call once.
pub fn inherited_link() -> shm_core::SegmentLink {
    let fd: i32 = std::env::var(LINK_ENV)
        .expect("started with spawn_linked")
        .parse()
        .expect("a descriptor number");
    // SAFETY: the parent passed this open descriptor for the link, and the child takes it once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    shm_core::SegmentLink::from_fd(owned).expect("a socket")
}

/// Bytes as hex digits, for command lines.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex digits back to bytes; `None` if they are not hex.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The checksum both sides compute of an array: the sum of value × (1 + position in logical
/// order), which tells apart arrays that differ in order, not only in content.
pub fn weighted_sum<'a>(values: impl Iterator<Item = &'a f64>) -> f64 {
    values.enumerate().map(|(i, v)| v * (i + 1) as f64).sum()
}

/// Whether a process runs (exists and is not a zombie waiting to be reaped).
pub fn process_runs(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// This process's resident memory, in bytes.
pub fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|l| l.trim().trim_end_matches(" kB").parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Runs 10,000 calls through an honest worker (`binary`, the test worker) of `pool`, each
/// with a fresh argument block of the pool, and checks that the pool keeps recycling — a
/// hostile neighbour of the same pool fills nothing — and that this process's memory stays
/// flat.
pub fn an_honest_neighbour_runs_on(binary: &str, pool: &shm_core::ShmPool) {
    use shm_codec::Serde;
    let honest = shm_transport::Worker::spawn(
        shm_transport::WorkerConfig::new(binary).with_pool(pool.clone()),
    )
    .expect("the honest worker starts");
    let a = ndarray::Array1::from_elem(8_200, 1.0f64);
    for _ in 0..100 {
        let Serde(_): Serde<f64> = honest.call("sum", &a).expect("sum");
    }
    let (created, resident) = (pool.stats().segments_created, rss());
    for _ in 0..10_000 {
        let Serde(sum): Serde<f64> = honest.call("sum", &a).expect("sum");
        assert_eq!(sum, 8_200.0);
    }
    let created = pool.stats().segments_created - created;
    assert!(
        created <= 2,
        "the honest worker's arguments stopped being recycled: {created} new segments"
    );
    let grown = rss().saturating_sub(resident);
    assert!(
        grown < 32 << 20,
        "the parent grew by {grown} bytes over 10,000 calls"
    );
    honest.shutdown();
}

/// The Python interpreter of the test environment (`SHM_PYTHON`, which `cargo xtask test`
/// always sets). `None` — the caller skips, and this says so — only outside `cargo xtask test`;
/// with `SHM_REQUIRE_PYTHON` set, a missing interpreter fails the test instead.
pub fn python() -> Option<String> {
    match std::env::var("SHM_PYTHON") {
        Ok(python) => Some(python),
        Err(_) if std::env::var_os("SHM_REQUIRE_PYTHON").is_some() => {
            panic!("SHM_PYTHON is not set although SHM_REQUIRE_PYTHON is")
        }
        Err(_) => {
            eprintln!("skipped: no Python environment (cargo xtask test provides one)");
            None
        }
    }
}

/// The random source of the decoders' mutation tests: a xorshift generator, so that a seed
/// gives the same mutations on every machine, and how many rounds to run
/// (`SHM_FUZZ_ROUNDS`, or the test's default).
#[derive(Debug)]
pub struct Mutations {
    state: u64,
    /// Rounds to run.
    pub rounds: usize,
}

impl Mutations {
    /// A generator from `seed` (not 0), running `default_rounds` unless `SHM_FUZZ_ROUNDS`
    /// says otherwise.
    pub fn new(seed: u64, default_rounds: usize) -> Self {
        let rounds = std::env::var("SHM_FUZZ_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_rounds);
        Mutations {
            state: seed,
            rounds,
        }
    }

    /// The next random number.
    pub fn draw(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
}

/// A frame of `columns` Int32 columns of `rows` rows; column `c` holds `c * rows + r` at row
/// `r`.
pub fn wide_batch(columns: usize, rows: usize) -> arrow::array::RecordBatch {
    use arrow::array::{ArrayRef, Int32Array};
    use arrow::datatypes::{DataType, Field, Schema};
    let fields: Vec<Field> = (0..columns)
        .map(|c| Field::new(format!("c{c}"), DataType::Int32, false))
        .collect();
    let arrays: Vec<ArrayRef> = (0..columns)
        .map(|c| {
            std::sync::Arc::new(Int32Array::from_iter_values(
                (0..rows).map(|r| (c * rows + r) as i32),
            )) as ArrayRef
        })
        .collect();
    arrow::array::RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), arrays)
        .expect("a wide batch")
}
