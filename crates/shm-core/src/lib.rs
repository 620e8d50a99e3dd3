//! Blocks and pools of shared memory: the bottom layer of shm.
//!
//! A process allocates a [`ShmBlock`] from a [`ShmPool`], writes into it, and sends its
//! [`ShmRef`] — a segment name, an offset and two sizes, about 40 bytes — to another process,
//! with the segment's descriptor beside it on a [`SegmentLink`]. That process attaches the
//! reference through its end of the link and reads the same memory, with no copy. Everything
//! above this crate (arrays, Arrow frames, the worker channel) moves data this way.
//!
//! This layer owns the parts of shared memory that are easy to get wrong:
//!
//! - **Nothing to attack by name.** A segment is an anonymous memfd: no file in `/dev/shm` can
//!   be swapped for a link, a FIFO or someone else's segment, because nothing is opened by
//!   name. A named segment of another program is opened only by the explicit, `unsafe`
//!   [`ShmPool::attach_segment`], which refuses links, FIFOs, directories, devices, other users'
//!   files and hard links before it maps anything.
//! - **No SIGBUS, no rewrites.** Before anyone else sees a segment it is sealed: nobody can
//!   change its length, and nobody but its creator can write it. A receiver refuses a
//!   descriptor that is not sealed. No signal handler is needed, and none is installed.
//! - **No leaks.** The kernel frees a segment when the last process holding it lets go, or
//!   dies: a SIGKILL leaves nothing behind, and `/dev/shm` is never touched.
//! - **Errors, not crashes.** A new segment's memory is reserved when it is created, so a lack
//!   of memory is [`ShmError::OutOfSharedMemory`] with the bytes requested and available.
//! - **No fresh page faults on the hot path.** Dropped blocks are recycled, small blocks share
//!   slab segments, and a segment is mapped once per process (see [`ShmPool`]).
//! - **No trust in numbers from outside.** Attaching checks a reference's name, offset and
//!   sizes against the segment, with checked arithmetic, before it hands out a byte.
//!
//! Linux only (memfd, seals, `SCM_RIGHTS`).
//!
//! # Example
//!
//! ```
//! use shm_core::{ShmPool, ShmRef};
//!
//! # fn main() -> Result<(), shm_core::ShmError> {
//! let pool = ShmPool::new()?;
//! let mut block = pool.alloc(1 << 20)?; // a ShmBlockMut: writable, and no reference yet
//! block.as_mut_slice().fill(7);
//! let block = block.freeze(); // an Arc<ShmBlock>: read-only from now on
//!
//! // The reference is all another process needs; here it travels as bytes.
//! let wire: Vec<u8> = block.to_ref().to_bytes();
//!
//! // In the other process (another pool; here the same process, for the example; another
//! // process gets the segment's descriptor on a `SegmentLink` and attaches through it):
//! let reader = ShmPool::new()?;
//! let view = reader.attach(&ShmRef::from_bytes(&wire)?)?;
//! assert_eq!(view.len(), 1 << 20);
//! assert!(view.as_slice().iter().all(|&b| b == 7));
//! # drop(view);
//! # Ok(())
//! # }
//! ```

mod block;
mod cleanup;
mod error;
mod link;
mod live;
mod name;
mod pool;
mod reference;
mod segment;
mod session;
mod sys;

pub use block::{DropHook, ShmAtomicBlock, ShmBlock, ShmBlockMut};
pub use cleanup::{
    SegmentEntry, SessionEntry, SessionState, SweepReport, list_files, list_segments,
    list_sessions, sweep_orphans, sweep_session,
};
pub use error::{FormatError, Result, ShmError};
pub use link::{MAX_RECEIVED_SEGMENTS, SegmentLink, fuzzing};
pub use live::{LiveSegment, list_live_segments};
pub use name::{NAME_PREFIX, SegmentHolds, SessionId, validate_name};
pub use pool::{BLOCK_ALIGN, PoolConfig, PoolStats, Reclaim, ShmPool};
pub use reference::ShmRef;
pub use sys::memory_available;

/// The bytes `/dev/shm` can still give an unprivileged process (statvfs).
pub fn shm_available() -> Result<u64> {
    sys::shm_available().map_err(|source| ShmError::Os {
        op: "statvfs",
        name: sys::SHM_DIR.to_owned(),
        source,
    })
}

/// Helpers of this crate's unit tests.
#[cfg(test)]
mod test_support {
    /// The line of `/proc/self/maps` of the mapping that holds `address`.
    pub(crate) fn mapping_of(address: usize) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .find(|line| {
                let (range, _) = line.split_once(' ').unwrap();
                let (start, end) = range.split_once('-').unwrap();
                let start = usize::from_str_radix(start, 16).unwrap();
                let end = usize::from_str_radix(end, 16).unwrap();
                (start..end).contains(&address)
            })
            .unwrap()
            .to_owned()
    }
}
