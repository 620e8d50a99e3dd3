//! Helpers for the multi-process tests of shm: the child process they drive and a check that
//! `/dev/shm` is left as it was found.

pub mod model;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};

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
        let mut child = Command::new(binary)
            .args(args)
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
