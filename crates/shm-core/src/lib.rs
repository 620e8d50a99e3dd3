//! Blocks and pools of POSIX shared memory: the bottom layer of shm.
//!
//! A process allocates a [`ShmBlock`] from a [`ShmPool`], writes into it, and sends its
//! [`ShmRef`] — a name, an offset and two sizes, about 40 bytes — to another process. That
//! process attaches the reference with its own pool and reads the same memory, with no copy.
//! Everything above this crate (arrays, Arrow frames, the worker channel) moves data this way.
//!
//! This layer owns the parts of shared memory that are easy to get wrong:
//!
//! - **No SIGBUS.** A new segment's memory is reserved when it is created, so a full
//!   `/dev/shm` is [`ShmError::OutOfSharedMemory`] with the bytes requested and available.
//! - **No leaks.** Dropping a pool, or [`ShmPool::close_all`], unlinks every segment it made.
//!   Segments of a process that was killed are found by their session id and removed by
//!   [`sweep_orphans`], which new pools run by default.
//! - **No fresh page faults on the hot path.** Dropped blocks are recycled, small blocks share
//!   slab segments, and attached mappings are cached (see [`ShmPool`]).
//! - **No trust in numbers from outside.** [`ShmPool::attach`] checks a reference's name,
//!   offset and sizes against the segment, with checked arithmetic, before it maps a byte.
//!
//! Linux only: segments live in `/dev/shm`, and liveness locks use `flock`.
//!
//! # Example
//!
//! ```
//! use shm_core::{ShmPool, ShmRef};
//!
//! # fn main() -> Result<(), shm_core::ShmError> {
//! let pool = ShmPool::new()?;
//! let mut block = pool.alloc(1 << 20)?;
//! block.as_mut_slice()?.fill(7);
//!
//! // The reference is all another process needs; here it travels as bytes.
//! let wire: Vec<u8> = block.to_ref().to_bytes();
//!
//! // In the other process (another pool; here the same process, for the example):
//! let reader = ShmPool::new()?;
//! let view = reader.attach(&ShmRef::from_bytes(&wire)?)?;
//! assert_eq!(view.len(), 1 << 20);
//! assert!(view.as_slice().iter().all(|&b| b == 7));
//! assert!(!view.is_writable(), "attached memory is read-only");
//! # drop(view);
//! # Ok(())
//! # }
//! ```

mod block;
mod cleanup;
mod error;
mod guard;
mod name;
mod pool;
mod reference;
mod segment;
mod session;
mod sys;

pub use block::{DropHook, ShmBlock};
pub use cleanup::{
    SegmentEntry, SessionEntry, SessionState, SweepReport, list_files, list_segments,
    list_sessions, sweep_orphans, sweep_session,
};
pub use error::{Result, ShmError};
pub use name::{NAME_PREFIX, SegmentHolds, SessionId, validate_name};
pub use pool::{BLOCK_ALIGN, PoolConfig, PoolStats, Reclaim, ShmPool};
pub use reference::ShmRef;
pub use session::end_session;

/// The bytes `/dev/shm` can still give an unprivileged process (statvfs).
pub fn shm_available() -> Result<u64> {
    sys::shm_available().map_err(|source| ShmError::Os {
        op: "statvfs",
        name: sys::SHM_DIR.to_owned(),
        source,
    })
}
