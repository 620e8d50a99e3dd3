//! The one error type of shm-codec.

use shm_core::{FormatError, ShmError};

/// Everything that can go wrong while encoding or decoding a payload. Decoding checks every
/// number it is given, so corrupt, truncated or mismatched payloads end here, never in a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Allocating or attaching shared memory failed.
    #[error(transparent)]
    Shm(#[from] ShmError),

    /// The payload was written by a peer with another wire format.
    #[error("payload format version {found}, this build reads version {expected}")]
    VersionMismatch {
        /// The version in the payload.
        found: u16,
        /// The version this build writes and reads.
        expected: u16,
    },

    /// The payload or its metadata could not be read.
    #[error("malformed {what} ({len} bytes): {source}")]
    Malformed {
        /// What was being read.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// What the wire format's decoder or encoder reported.
        #[source]
        source: FormatError,
    },

    /// No codec of the registry has this name.
    #[error("unknown codec {name:?}; registered: {known:?}")]
    UnknownCodec {
        /// The name in the payload.
        name: String,
        /// The names the registry knows.
        known: Vec<String>,
    },

    /// No codec of the registry accepts a value of this type.
    #[error("no codec accepts a value of type {type_name}")]
    NoCodec {
        /// The Rust type of the value.
        type_name: &'static str,
    },

    /// The payload is of another codec than the one asked to decode it.
    #[error("payload of codec {found:?} where codec {expected:?} was expected")]
    WrongCodec {
        /// The codec that can read it.
        expected: &'static str,
        /// The codec that wrote it.
        found: String,
    },

    /// The payload decoded to another type than the one asked for.
    #[error("codec {codec:?} decoded a value that is not a {expected}")]
    WrongType {
        /// The codec that decoded it.
        codec: String,
        /// The type asked for.
        expected: &'static str,
    },

    /// An element type this build does not know, or not the one asked for.
    #[error("element type {found:?} where {expected} was expected")]
    WrongDtype {
        /// The numpy typestr expected (or "a known typestr").
        expected: String,
        /// The typestr in the payload.
        found: String,
    },

    /// The number of dimensions differs from the one asked for.
    #[error("array of {found} dimensions where {expected} were expected")]
    WrongDimensions {
        /// Dimensions of the requested array type.
        expected: usize,
        /// Dimensions in the payload.
        found: usize,
    },

    /// Shape, strides and sizes that disagree with each other or with the data.
    #[error("invalid layout: {reason}")]
    Layout {
        /// What is inconsistent, with the numbers.
        reason: String,
    },

    /// Data that would be misaligned for its element type.
    #[error("data at byte {offset} is not aligned to {align} bytes")]
    Misaligned {
        /// The offending byte offset or stride.
        offset: i64,
        /// The alignment the element type needs.
        align: usize,
    },

    /// A byte of a bool array that is neither 0 nor 1.
    #[error("bool array holds byte {value} at element {index}")]
    InvalidBool {
        /// The element index in memory order.
        index: usize,
        /// The byte found.
        value: u8,
    },

    /// A payload with a different number of shared-memory buffers than its codec needs.
    #[error("payload carries {found} buffers, codec {codec:?} needs {expected}")]
    BufferCount {
        /// The codec.
        codec: &'static str,
        /// Buffers needed.
        expected: usize,
        /// Buffers present.
        found: usize,
    },

    /// A payload that names more blocks than one may ([`MAX_BLOCKS`](crate::MAX_BLOCKS)).
    #[error("a payload of {blocks} blocks: one may name at most {limit}")]
    TooManyBlocks {
        /// Blocks the payload names.
        blocks: usize,
        /// The most one may name.
        limit: usize,
    },

    /// Data its codec rejects: invalid UTF-8, a dictionary key out of range, offsets that run
    /// backwards, a type the codec does not know.
    #[error("invalid {codec} data: {reason}")]
    InvalidData {
        /// The codec.
        codec: &'static str,
        /// What is wrong, as the codec or Arrow reports it.
        reason: String,
    },

    /// A value could not be serialised.
    #[error("cannot serialise the value: {source}")]
    Serialize {
        /// What the wire format's decoder or encoder reported.
        #[source]
        source: FormatError,
    },
}

/// The result type of shm-codec.
pub type Result<T, E = CodecError> = std::result::Result<T, E>;

pub(crate) fn layout(reason: impl Into<String>) -> CodecError {
    CodecError::Layout {
        reason: reason.into(),
    }
}

/// The message of a caught panic (`catch_unwind`'s payload): the text given to `panic!`, or a
/// placeholder for a payload of another type.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
