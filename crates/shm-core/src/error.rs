//! The one error type of shm-core.

use std::io;

/// Everything that can go wrong while creating, attaching or cleaning up shared memory.
///
/// Each variant carries the numbers and names needed to act on it: how many bytes were asked
/// for and how many were there, which segment, which sizes disagreed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// The system cannot give a new segment of this size its memory.
    #[error(
        "out of shared memory: {requested} bytes requested, {available} bytes available \
         (free memory, or raise the memory limit of this process's cgroup)"
    )]
    OutOfSharedMemory {
        /// Bytes the new segment needed.
        requested: u64,
        /// Bytes the kernel said it could still give (`MemAvailable`) when the request failed.
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

    /// A reference names no existing segment (never created, or already released by its
    /// owner).
    #[error("shared-memory segment {name} does not exist (its owner may have released it)")]
    SegmentNotFound {
        /// The segment name from the reference.
        name: String,
    },

    /// A reference names a segment of another process whose descriptor this process never
    /// received: segments travel as descriptors (see [`SegmentLink`](crate::SegmentLink)),
    /// and a name alone opens nothing.
    #[error(
        "no descriptor was received for segment {name}: a segment of another process is \
         attached through the link it was sent on"
    )]
    NoDescriptor {
        /// The segment name from the reference.
        name: String,
    },

    /// A name or a descriptor leads to something that is not a segment: a symbolic link, a
    /// hard link, a FIFO, a directory, a device, another user's file, or a descriptor that is
    /// not a sealed memfd. Refused before anything is mapped.
    #[error("{name} is not a shared-memory segment: {reason}")]
    NotASegment {
        /// The name, or the segment name the descriptor came with.
        name: String,
        /// What it is instead.
        reason: &'static str,
    },

    /// The process has no descriptor left for a new segment (`RLIMIT_NOFILE`): each segment
    /// a pool creates keeps one, to send it to peers.
    #[error(
        "no file descriptor left to create segment {name}: raise the limit (ulimit -n) or \
         lower the pool's cache (PoolConfig::cache_bytes)"
    )]
    TooManyDescriptors {
        /// The segment that could not be created.
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

    /// A reference names memory of this process that no frozen block spans: a block still
    /// being written (a `ShmBlockMut`, which has no reference to give out), or memory that is
    /// free. Attaching it would let a view race its writer.
    #[error(
        "no frozen block of this process spans {size} bytes at offset {offset} of {name}: \
         memory is attached only once its writer has frozen it"
    )]
    NotFrozen {
        /// The segment name.
        name: String,
        /// Where the reference starts.
        offset: u64,
        /// Bytes the reference spans.
        size: u64,
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

    /// A peer has sent descriptors of more segments than one link holds
    /// ([`MAX_RECEIVED_SEGMENTS`](crate::MAX_RECEIVED_SEGMENTS)) without withdrawing them.
    #[error("the peer holds {held} segments on this link, the limit is {limit}")]
    TooManySegments {
        /// Segments of the peer held.
        held: usize,
        /// The limit.
        limit: usize,
    },

    /// The peer does not read the link: its socket stayed full until the deadline.
    #[error("the peer does not take the descriptors sent on the segment link (its socket is full)")]
    LinkStalled,

    /// The peer closed its end of the segment link (it exited).
    #[error("the peer closed the segment link")]
    LinkClosed,

    /// The pool was closed with [`ShmPool::close_all`](crate::ShmPool::close_all).
    #[error("the shared-memory pool is closed")]
    PoolClosed,

    /// A reference could not be decoded from its wire form.
    #[error("malformed shared-memory reference ({len} bytes): {source}")]
    MalformedRef {
        /// Length of the bytes that failed to decode.
        len: usize,
        /// What the wire format's decoder reported.
        #[source]
        source: FormatError,
    },

    /// The operating system refused an operation on a segment.
    #[error("{op} failed for shared-memory segment {name}: {source}")]
    Os {
        /// The operation (`create`, `map`, `reserve`, `seal`, ...).
        op: &'static str,
        /// The segment (or lock) name.
        name: String,
        /// The error the OS reported.
        #[source]
        source: io::Error,
    },
}

/// Why bytes of shm's wire format (references, payloads, codec metadata) could not be read
/// or written: the message of the library that encodes them, whose own type is not part of
/// this API.
#[derive(Debug)]
pub struct FormatError(postcard::Error);

impl FormatError {
    /// Wraps the encoding library's error; for shm's own crates.
    #[doc(hidden)]
    pub fn from_postcard(err: postcard::Error) -> Self {
        FormatError(err)
    }
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for FormatError {}

/// The result type of shm-core.
pub type Result<T, E = ShmError> = std::result::Result<T, E>;
