//! The session: one per process that has a pool, the id that every segment name it creates
//! carries, and the list of its live segments.
//!
//! Segments are memfds that no name in `/dev/shm` reaches, so a session needs no lock file and
//! leaves nothing behind: when the process dies, for any reason, the kernel frees every
//! segment once the last descriptor and mapping of it are gone. The id tells a receiver whose
//! segment a reference names (its own or its peer's), and the list lets any pool of this
//! process attach a segment another pool of it created.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::error::{Result, ShmError};
use crate::name::SessionId;
use crate::segment::Segment;
use crate::sys;

/// The live session of this process, shared by all its pools; created with the first pool and
/// gone with the last.
static CURRENT: Mutex<Weak<Session>> = Mutex::new(Weak::new());

/// The session of this process's pools.
#[derive(Debug)]
pub(crate) struct Session {
    id: SessionId,
    /// The segments the pools of this process created and that still live, by name.
    segments: Mutex<HashMap<String, Weak<Segment>>>,
}

impl Session {
    /// The session of this process, created if no pool holds one.
    pub(crate) fn current() -> Result<Arc<Session>> {
        let mut current = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(session) = current.upgrade() {
            return Ok(session);
        }
        let random = sys::random_u64().map_err(|source| ShmError::Os {
            op: "read random bytes for",
            name: "a new session".to_owned(),
            source,
        })?;
        let session = Arc::new(Session {
            id: SessionId(random as u32),
            segments: Mutex::new(HashMap::new()),
        });
        *current = Arc::downgrade(&session);
        Ok(session)
    }

    pub(crate) fn id(&self) -> SessionId {
        self.id
    }

    fn segments(&self) -> MutexGuard<'_, HashMap<String, Weak<Segment>>> {
        // Every critical section leaves the map consistent.
        self.segments.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lists a segment a pool of this process created.
    pub(crate) fn register(&self, segment: &Arc<Segment>) {
        self.segments()
            .insert(segment.name().to_owned(), Arc::downgrade(segment));
    }

    /// The live segment of this process named `name`.
    pub(crate) fn segment(&self, name: &str) -> Option<Arc<Segment>> {
        let weak = self.segments().get(name).cloned();
        // Upgraded outside the lock: dropping the last `Arc` of a segment takes the lock.
        weak?.upgrade()
    }

    /// Takes a segment off the list: it is gone, or its pool closed.
    pub(crate) fn forget(&self, name: &str) {
        let removed = self.segments().remove(name);
        drop(removed);
    }
}
