//! The session: one per process that has a pool, marked alive by a lock the kernel releases
//! when the process dies.
//!
//! The lock is a small file in `/dev/shm` (`shm-SSSSSSSS-lock`) held with `flock`. A process
//! that dies for any reason, SIGKILL included, loses the lock, and the orphan sweep
//! ([`crate::sweep_orphans`]) can then take it and remove the session's segments. Unlike a
//! pid, a lock cannot be mistaken for that of a newer process that happens to reuse the number.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::error::{Result, ShmError};
use crate::name::SessionId;
use crate::sys;

/// The live session of this process, shared by all its pools; created with the first pool and
/// removed with the last.
static CURRENT: Mutex<Weak<Session>> = Mutex::new(Weak::new());

/// A held session lock. Dropping it removes the lock file and releases the lock.
#[derive(Debug)]
pub(crate) struct Session {
    id: SessionId,
    path: PathBuf,
    /// Holds the `flock` for as long as the session lives.
    _lock: File,
    /// Pools of this session not yet closed: while there is one, the lock must stay.
    open_pools: AtomicUsize,
}

impl Session {
    /// The session of this process, created if no pool holds one.
    pub(crate) fn current() -> Result<Arc<Session>> {
        let mut current = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(session) = current.upgrade() {
            return Ok(session);
        }
        let session = Arc::new(Session::create()?);
        *current = Arc::downgrade(&session);
        Ok(session)
    }

    pub(crate) fn id(&self) -> SessionId {
        self.id
    }

    pub(crate) fn pool_opened(&self) {
        self.open_pools.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn pool_closed(&self) {
        self.open_pools.fetch_sub(1, Ordering::AcqRel);
    }

    fn create() -> Result<Session> {
        loop {
            let random = sys::random_u64().map_err(|source| ShmError::Os {
                op: "read random bytes for",
                name: "a new session".to_owned(),
                source,
            })?;
            let id = SessionId(random as u32);
            let name = id.lock_name();
            let path = sys::segment_path(&name);
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            let mut file = match file {
                Ok(file) => file,
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(ShmError::Os {
                        op: "create session lock",
                        name,
                        source,
                    });
                }
            };
            // A sweeper may hold the lock for a moment while it looks at this new, empty file;
            // it leaves empty young locks alone, so waiting here is short.
            let locked = file
                .lock()
                .and_then(|()| write!(file, "{}", std::process::id()));
            if let Err(source) = locked {
                let _ = std::fs::remove_file(&path);
                // The pid did not fit: `/dev/shm` is full.
                if source.raw_os_error() == Some(libc::ENOSPC) {
                    return Err(ShmError::OutOfSharedMemory {
                        requested: std::process::id().to_string().len() as u64,
                        available: sys::shm_available().unwrap_or(0),
                    });
                }
                return Err(ShmError::Os {
                    op: "lock session",
                    name,
                    source,
                });
            }
            return Ok(Session {
                id,
                path,
                _lock: file,
                open_pools: AtomicUsize::new(0),
            });
        }
    }
}

/// Removes this process's session lock at once, for a process about to exit without running
/// destructors (`std::process::exit` from a watchdog, say) after closing its pools with
/// [`ShmPool::close_all`](crate::ShmPool::close_all). Without it, the lock would stay in
/// `/dev/shm` until the next orphan sweep.
///
/// Refuses with [`ShmError::SessionInUse`] while a pool of the session is open: without its
/// lock, a live pool's segments would look orphaned to every other process's sweep.
pub fn end_session() -> Result<()> {
    let current = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(session) = current.upgrade() {
        let open_pools = session.open_pools.load(Ordering::Acquire);
        if open_pools > 0 {
            return Err(ShmError::SessionInUse {
                session: session.id,
                open_pools,
            });
        }
        let _ = std::fs::remove_file(&session.path);
    }
    Ok(())
}

impl Drop for Session {
    fn drop(&mut self) {
        // Remove the name first, then let the lock go with the file: a sweeper that opened the
        // file in between sees a lock it can take, and finds no segments of ours to remove.
        let _ = std::fs::remove_file(&self.path);
    }
}
