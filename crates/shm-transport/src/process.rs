//! The worker process's life, seen from the parent: starting it with its channel, forwarding
//! its stderr, reaping it (and marking its connection dead first), killing it, and stopping it
//! with a grace period.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Pid, WaitId, WaitIdOptions, WaitIdStatus, waitid};
use shm_core::{SegmentLink, ShmPool};

use crate::channel::{Channel, Side, channel_len};
use crate::conn::{Conn, Threads, lock};
use crate::error::{Result, TransportError};
use crate::frame::Endpoint;
use crate::serve::{CHANNEL_ENV, LINK_ENV};
use crate::trust::Admission;
use crate::worker::{StderrSink, WorkerConfig};

/// Lines of a worker's stderr kept for start-up failure reports.
const STDERR_TAIL: usize = 20;

/// How long stopping a worker waits for the last lines of its stderr once it is gone: a
/// descendant of the worker that outlived it may hold the pipe open for ever.
const STDERR_DRAIN: Duration = Duration::from_millis(100);

impl Conn {
    pub(crate) fn start(config: &WorkerConfig, pool: &ShmPool, worker: u32) -> Result<Arc<Conn>> {
        let program = config.program.display().to_string();
        let channel = Channel::create(pool.alloc_shared(channel_len())?, std::process::id())?;
        // The worker's end of the link is its only way to our segments; the channel's
        // descriptor waits in it for the worker to start.
        let (link, worker_link) = SegmentLink::pair()?;
        link.offer_atomic(
            channel.block(),
            Some(Instant::now() + config.startup_timeout),
        )?;
        let worker_fd = worker_link.as_raw_fd();
        let mut command = Command::new(&config.program);
        command
            .args(&config.args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .env(CHANNEL_ENV, channel.to_ref().to_hex())
            .env(LINK_ENV, worker_fd.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            // A group of its own, so that stopping the worker stops what it started too.
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: it makes one `fcntl` system call on a
        // descriptor that is open in the child (it was open in the parent at fork, and
        // `worker_link` outlives `spawn`). Clearing close-on-exec there, and only there, is
        // how the worker inherits its end of the link while other children spawned meanwhile
        // do not.
        unsafe {
            command.pre_exec(move || {
                let fd = rustix::fd::BorrowedFd::borrow_raw(worker_fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| TransportError::Spawn {
            program: program.clone(),
            source,
        })?;
        drop(worker_link);
        // The worker may name our session and, once its hello has said which, its own.
        let admission = Admission::new(pool.session(), None, config.untrusted);
        let endpoint = Endpoint::new(
            channel,
            Side::Parent,
            pool.clone(),
            admission,
            Arc::new(link),
            config.loan_limit,
        );
        let conn = Arc::new(Conn::new(worker, child.id(), pool, endpoint));
        let mut threads = Threads::default();
        let stderr = child.stderr.take();
        let started = stderr
            .map(|stderr| {
                forward_stderr(
                    stderr,
                    worker,
                    config.stderr.clone(),
                    Arc::clone(&conn.stderr_tail),
                )
            })
            .transpose()
            .and_then(|forwarder| {
                threads.forwarder = forwarder;
                reap(&mut child, Arc::downgrade(&conn))
            });
        match started {
            Ok(reaper) => threads.reaper = Some(reaper),
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TransportError::Spawn { program, source });
            }
        }
        *lock(&conn.threads) = threads;
        match conn.handshake(config.startup_timeout) {
            Ok(()) => Ok(conn),
            Err(err) => {
                conn.kill_and_reap();
                Err(match err {
                    TransportError::WorkerDied { status, .. } => TransportError::StartFailed {
                        program,
                        status,
                        stderr: conn.stderr_tail(),
                    },
                    TransportError::Timeout { timeout, .. } => TransportError::StartFailed {
                        program,
                        status: format!("no handshake within {timeout:?}"),
                        stderr: conn.stderr_tail(),
                    },
                    other => other,
                })
            }
        }
    }

    pub(crate) fn kill_and_reap(&self) {
        {
            let life = lock(&self.life);
            // The pid is still ours: the reaper marks the worker ended (under `life`, which we
            // hold) before it reaps it, so the process has not been reaped and its pid — which
            // is also its process group's id — cannot have been reused. The group goes too: the
            // processes the worker started. A kill that fails finds them already gone.
            if life.ended.is_none()
                && let Some(pid) = i32::try_from(self.pid).ok().and_then(Pid::from_raw)
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        self.join_threads();
    }

    pub(crate) fn shutdown(&self, grace: Duration) {
        let until = Instant::now() + grace;
        if !self.dead.load(Ordering::Acquire) && self.send_shutdown(until) {
            while !self.dead.load(Ordering::Acquire) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.kill_and_reap();
    }

    /// Joins the reaper (the process is gone or killed, so it ends) and the stderr forwarder
    /// if it ends within [`STDERR_DRAIN`]; otherwise leaves the forwarder to end by itself.
    fn join_threads(&self) {
        let threads = std::mem::take(&mut *lock(&self.threads));
        if let Some(reaper) = threads.reaper {
            let _ = reaper.join();
        }
        if let Some((forwarder, ended)) = threads.forwarder {
            // The sender is dropped when the thread ends: `Disconnected` is the news.
            let timed_out = matches!(
                ended.recv_timeout(STDERR_DRAIN),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if !timed_out {
                let _ = forwarder.join();
            }
        }
    }
}

/// How a process ended, from what `waitid` reported.
fn describe(status: Option<WaitIdStatus>) -> String {
    match status {
        Some(status) => match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "ended".to_owned(),
        },
        None => "ended (waitid reported nothing)".to_owned(),
    }
}

/// Waits for the worker process to end, marks it dead before reaping it (so that nobody can
/// signal a reused pid), kills what it started (its process group), then reaps it.
fn reap(child: &mut Child, conn: Weak<Conn>) -> std::io::Result<JoinHandle<()>> {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("the worker has no valid pid"))?;
    std::thread::Builder::new()
        .name("shm-worker-reaper".into())
        .spawn(move || {
            // WNOWAIT leaves the child unreaped, so its pid stays ours until the second call.
            let ended = loop {
                match waitid(
                    WaitId::Pid(pid),
                    WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
                ) {
                    Err(rustix::io::Errno::INTR) => continue,
                    Ok(status) => break describe(status),
                    Err(err) => break format!("ended (waitid failed: {err})"),
                }
            };
            if let Some(conn) = conn.upgrade() {
                conn.ended(ended);
            }
            // What the worker started ends with it. Its pid names its process group, and the
            // unreaped worker keeps the number from being reused, so this reaches only them.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            let _ = waitid(WaitId::Pid(pid), WaitIdOptions::EXITED);
        })
}

/// Copies the worker's stderr, line by line, with its prefix, to the sink, keeping the last
/// lines for error reports.
fn forward_stderr(
    stderr: std::process::ChildStderr,
    worker: u32,
    sink: StderrSink,
    tail: Arc<Mutex<VecDeque<String>>>,
) -> std::io::Result<(JoinHandle<()>, std::sync::mpsc::Receiver<()>)> {
    let (ended, ended_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("shm-worker-stderr".into())
        .spawn(move || {
            // Dropped when the thread ends, however it ends: that is the signal.
            let _ended = ended;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = format!("[worker {worker}] {line}");
                match &sink {
                    StderrSink::Inherit => {
                        let _ = writeln!(std::io::stderr().lock(), "{line}");
                    }
                    StderrSink::Lines(f) => f(&line),
                    StderrSink::Discard => {}
                }
                let mut tail = lock(&tail);
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        })?;
    Ok((thread, ended_rx))
}
