//! The one error type of shm-core.

use std::io;

/// Everything that can go wrong while creating, attaching or cleaning up shared memory.
///
/// Each variant carries the numbers and names needed to act on it: how many bytes were asked
/// for and how many were there, which segment, which sizes disagreed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// `/dev/shm` cannot hold a new segment of this size.
    #[error(
        "out of shared memory: {requested} bytes requested, {available} bytes available in /dev/shm \
         (enlarge it, e.g. docker --shm-size, or free segments)"
    )]
    OutOfSharedMemory {
        /// Bytes the new segment needed.
        requested: u64,
        /// Bytes `/dev/shm` had free (statvfs) when the request failed.
        available: u64,
    },

    /// The pool's own byte limit would be exceeded.
    #[error(
        "pool capacity exceeded: {requested} bytes requested, {in_use} of {capacity} bytes in use"
    )]
    CapacityExceeded {
        /// Bytes the new segment needed.
        requested: u64,
        /// Bytes of segments the pool holds (live, cached and being created).
        in_use: u64,
        /// The limit set with [`PoolConfig::capacity`](crate::PoolConfig::capacity).
        capacity: u64,
    },

    /// A reference names no existing segment (never created, or already unlinked by its owner).
    #[error("shared-memory segment {name} does not exist (its owner may have released it)")]
    SegmentNotFound {
        /// The segment name from the reference.
        name: String,
    },

    /// A segment name that is not of the form `/` followed by 1 to 254 characters of
    /// `[A-Za-z0-9._-]`.
    #[error("malformed segment name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// `offset + size` of a reference does not fit in 64 bits.
    #[error("reference to {name} overflows: offset {offset} + size {size} exceeds 2^64")]
    RefOverflow {
        /// The segment name.
        name: String,
        /// Offset of the block inside the segment.
        offset: u64,
        /// Size of the block.
        size: u64,
    },

    /// A reference reaches past the end of its segment.
    #[error(
        "reference to {name} is out of bounds: offset {offset} + size {size} > segment length {segment_len}"
    )]
    RefOutOfBounds {
        /// The segment name.
        name: String,
        /// Offset of the block inside the segment.
        offset: u64,
        /// Size of the block.
        size: u64,
        /// Length of the segment as the kernel reports it (fstat).
        segment_len: u64,
    },

    /// A reference whose offset is not aligned as every block is.
    #[error("reference to {name} starts at offset {offset}, which is not a multiple of {align}")]
    MisalignedRef {
        /// The segment name.
        name: String,
        /// The offset the reference gives.
        offset: u64,
        /// The alignment every block has.
        align: usize,
    },

    /// A reference claims more content than its block holds.
    #[error("reference to {name} claims {content_size} content bytes in a block of {size} bytes")]
    ContentExceedsSize {
        /// The segment name.
        name: String,
        /// Bytes of content claimed.
        content_size: u64,
        /// Size of the block.
        size: u64,
    },

    /// A block's content length was set beyond its capacity.
    #[error("content length {requested} exceeds the capacity {capacity} of block in {name}")]
    LengthExceedsCapacity {
        /// The segment name.
        name: String,
        /// The length asked for.
        requested: u64,
        /// The bytes the block can hold.
        capacity: u64,
    },

    /// Write access was asked of a block this process attached: its memory belongs to its owner.
    #[error("block in {name} is read-only here: it was attached, and its owner may read it")]
    ReadOnly {
        /// The segment name.
        name: String,
    },

    /// Another process cut a segment short while it was mapped here. The process lives on (the
    /// truncation guard replaced the lost pages with zeros), but the block's bytes are not
    /// what its sender wrote.
    #[error(
        "segment {name} was truncated by another process while mapped here ({mapped} bytes \
         mapped); the bytes past the cut read as zero"
    )]
    Truncated {
        /// The segment name.
        name: String,
        /// The bytes mapped before the cut.
        mapped: u64,
    },

    /// A peer named a segment outside the sessions it may name: neither its own nor ours. A
    /// channel fixes those sessions at its handshake, so a worker cannot make its parent map
    /// (and read) the memory of a third process.
    #[error("segment {name} belongs to none of the sessions this peer may name ({allowed})")]
    ForeignSegment {
        /// The segment name.
        name: String,
        /// The sessions the peer may name, comma-separated.
        allowed: String,
    },

    /// [`end_session`](crate::end_session) was called while pools of the session are open.
    #[error("session {session} still has {open_pools} open pool(s); close them before ending it")]
    SessionInUse {
        /// The session.
        session: crate::SessionId,
        /// How many of its pools are open.
        open_pools: usize,
    },

    /// The pool was closed with [`ShmPool::close_all`](crate::ShmPool::close_all).
    #[error("the shared-memory pool is closed")]
    PoolClosed,

    /// A reference could not be decoded from its wire form.
    #[error("malformed shared-memory reference ({len} bytes): {source}")]
    MalformedRef {
        /// Length of the bytes that failed to decode.
        len: usize,
        /// What postcard reported.
        #[source]
        source: postcard::Error,
    },

    /// The operating system refused an operation on a segment.
    #[error("{op} failed for shared-memory segment {name}: {source}")]
    Os {
        /// The operation (`create`, `map`, `reserve`, `unlink`, ...).
        op: &'static str,
        /// The segment (or lock) name.
        name: String,
        /// The error the OS reported.
        #[source]
        source: io::Error,
    },
}

/// The result type of shm-core.
pub type Result<T, E = ShmError> = std::result::Result<T, E>;
