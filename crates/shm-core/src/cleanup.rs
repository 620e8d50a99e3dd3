//! Finding the segments in `/dev/shm` and removing those whose owner is dead.
//!
//! A process killed with SIGKILL cannot unlink its segments, and `/dev/shm` keeps them — in
//! memory — until someone does. Every segment this project creates carries its session id in
//! its name, and every live session holds a lock ([`crate::session`]); a session whose lock can
//! be taken has no owner, and its segments are orphans.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::time::{Duration, SystemTime};

use crate::error::{Result, ShmError};
use crate::name::{NameKind, SessionId, parse_name};
use crate::sys;

/// A session lock that is still empty is being created; one this old and still empty belongs
/// to a process that died while creating it.
const LOCK_CREATION_GRACE: Duration = Duration::from_secs(10);

/// One segment of this project found in `/dev/shm`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentEntry {
    /// POSIX name, with the leading slash.
    pub name: String,
    /// The session that created it.
    pub session: SessionId,
    /// Its length in bytes.
    pub len: u64,
    /// When it was last modified (created, for most), if the file system says.
    pub modified: Option<SystemTime>,
}

/// What [`sweep_orphans`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// The dead sessions whose segments were removed.
    pub sessions: Vec<SessionId>,
    /// Segments unlinked.
    pub segments: usize,
    /// Bytes those segments held.
    pub bytes: u64,
    /// Entries left alone because this process may not open or remove them (another user's
    /// files, for instance), each with the reason.
    pub skipped: Vec<String>,
}

/// Whether the process that owns a session is alive, as the orphan sweep judges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// Its lock is held (or being created): the owner runs.
    Alive,
    /// Its lock is free, or gone while segments remain: the sweep removes what is left.
    Dead,
    /// This process may not look (another user's session, say); the reason.
    Unknown(String),
}

/// One session found in `/dev/shm`: its lock and its segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEntry {
    /// The session.
    pub session: SessionId,
    /// Whether its owner is alive.
    pub state: SessionState,
    /// The pid its lock names, if the lock exists and holds one.
    pub pid: Option<u32>,
    /// Whether its lock file exists.
    pub has_lock: bool,
    /// Its segments.
    pub segments: Vec<SegmentEntry>,
}

/// Every session of this project in `/dev/shm`, live or dead, with its segments: what an
/// operator's tool shows (`shm ls`) and what [`sweep_orphans`] would remove (the dead ones).
pub fn list_sessions() -> Result<Vec<SessionEntry>> {
    Ok(scan()?
        .into_iter()
        .map(|(session, found)| SessionEntry {
            session,
            state: session_state(session, &found.segments),
            pid: session.owner_pid(),
            has_lock: found.has_lock,
            segments: found.segments,
        })
        .collect())
}

/// Judges a session as the sweep does, without removing anything (the lock, taken if the
/// session is dead, is let go at once).
fn session_state(session: SessionId, segments: &[SegmentEntry]) -> SessionState {
    match judge(session, segments) {
        Judged::Alive => SessionState::Alive,
        Judged::Dead(_) => SessionState::Dead,
        Judged::Unknown(err) => SessionState::Unknown(err.to_string()),
    }
}

/// What a look at a session's lock found.
enum Judged {
    Alive,
    /// Dead: its lock, now held by us, or `None` when the session has segments but no lock
    /// (its owner removed the lock and died before its segments were gone).
    Dead(Option<File>),
    /// This process may not open the lock.
    Unknown(io::Error),
}

/// Looks at the lock itself, now: the listing the caller made is not atomic.
fn judge(session: SessionId, segments: &[SegmentEntry]) -> Judged {
    match File::options()
        .read(true)
        .write(true)
        .open(sys::segment_path(&session.lock_name()))
    {
        Ok(lock) if lock.try_lock().is_err() || is_being_created(&lock) => Judged::Alive,
        Ok(lock) => Judged::Dead(Some(lock)),
        Err(err) if err.kind() == io::ErrorKind::NotFound && segments.is_empty() => Judged::Alive,
        Err(err) if err.kind() == io::ErrorKind::NotFound => Judged::Dead(None),
        Err(err) => Judged::Unknown(err),
    }
}

/// The file names (without a leading slash) of every segment and session lock of this project
/// in `/dev/shm`: what a check that a program leaves `/dev/shm` as it found it compares.
pub fn list_files() -> Result<std::collections::BTreeSet<String>> {
    let mut files = std::collections::BTreeSet::new();
    for (session, found) in scan()? {
        if found.has_lock {
            files.insert(session.lock_name()[1..].to_owned());
        }
        files.extend(found.segments.into_iter().map(|s| s.name[1..].to_owned()));
    }
    Ok(files)
}

/// Every segment of this project in `/dev/shm`, of live and dead sessions alike (session
/// locks are not segments and are not listed).
pub fn list_segments() -> Result<Vec<SegmentEntry>> {
    Ok(scan()?
        .into_values()
        .flat_map(|found| found.segments)
        .collect())
}

/// Unlinks the segments of every session whose owner process has died, and their locks.
///
/// Pools of this version create nothing in `/dev/shm`; this removes what an earlier version's
/// crashed processes left there (`shm gc` runs it):
///
/// ```no_run
/// # fn main() -> Result<(), shm_core::ShmError> {
/// let report = shm_core::sweep_orphans()?;
/// println!("{report:?}"); // what was removed, and what this user may not touch
/// # Ok(())
/// # }
/// ```
///
/// Safe to call at any time from any process: a live session's lock cannot be taken, so its
/// segments are never touched, and a lock the kernel released cannot belong to a live process
/// (unlike a pid, which a new process may reuse). Entries this process may not remove (another
/// user's, say) are skipped and listed in the report, never an error.
pub fn sweep_orphans() -> Result<SweepReport> {
    let mut report = SweepReport::default();
    for (session, found) in scan()? {
        sweep_one(session, &found.segments, &mut report);
    }
    Ok(report)
}

/// Unlinks the segments of one session once its owner is dead, waiting up to `wait` for the
/// kernel to release the owner's lock: a process that learns of a peer's death (from a pidfd
/// or `waitid`) may look before the peer's files are closed. Returns an empty report when the
/// session is still alive after `wait`.
pub fn sweep_session(session: SessionId, wait: Duration) -> Result<SweepReport> {
    let deadline = std::time::Instant::now() + wait;
    let mut report = SweepReport::default();
    loop {
        let segments: Vec<SegmentEntry> = scan()?
            .remove(&session)
            .map(|found| found.segments)
            .unwrap_or_default();
        if sweep_one(session, &segments, &mut report) || std::time::Instant::now() >= deadline {
            return Ok(report);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Removes a session's segments and lock if its owner is dead; returns whether it was.
fn sweep_one(session: SessionId, segments: &[SegmentEntry], report: &mut SweepReport) -> bool {
    let lock = match judge(session, segments) {
        Judged::Alive => return false,
        Judged::Unknown(err) => {
            report
                .skipped
                .push(format!("{}: {err}", session.lock_name()));
            return false;
        }
        Judged::Dead(lock) => lock,
    };
    let lock_path = sys::segment_path(&session.lock_name());
    // Either we hold the dead session's lock, or the session has no lock at all (its owner
    // removed the lock but died before its segments were gone).
    for segment in segments {
        match std::fs::remove_file(sys::segment_path(&segment.name)) {
            Ok(()) => {
                report.segments += 1;
                report.bytes += segment.len;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => report.skipped.push(format!("{}: {err}", segment.name)),
        }
    }
    if lock.is_some() {
        let _ = std::fs::remove_file(&lock_path);
    }
    report.sessions.push(session);
    true
}

/// An empty, young lock file: its creator has not yet locked it and written its pid.
fn is_being_created(lock: &File) -> bool {
    let Ok(meta) = lock.metadata() else {
        return false;
    };
    let young = meta
        .modified()
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_none_or(|age| age < LOCK_CREATION_GRACE);
    meta.len() == 0 && young
}

#[derive(Default)]
struct SessionFiles {
    segments: Vec<SegmentEntry>,
    has_lock: bool,
}

/// This project's files in `/dev/shm`, grouped by session.
fn scan() -> Result<BTreeMap<SessionId, SessionFiles>> {
    let os_error = |source| ShmError::Os {
        op: "list",
        name: sys::SHM_DIR.to_owned(),
        source,
    };
    let mut sessions: BTreeMap<SessionId, SessionFiles> = BTreeMap::new();
    for entry in std::fs::read_dir(sys::SHM_DIR).map_err(os_error)? {
        let entry = entry.map_err(os_error)?;
        let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        match parse_name(&file_name) {
            Some(NameKind::Segment(session)) => {
                // A segment unlinked since the listing has no metadata; it needs no sweeping.
                let Ok(meta) = entry.metadata() else { continue };
                sessions
                    .entry(session)
                    .or_default()
                    .segments
                    .push(SegmentEntry {
                        name: format!("/{file_name}"),
                        session,
                        len: meta.len(),
                        modified: meta.modified().ok(),
                    });
            }
            Some(NameKind::Lock(session)) => {
                sessions.entry(session).or_default().has_lock = true;
            }
            None => {}
        }
    }
    Ok(sessions)
}
