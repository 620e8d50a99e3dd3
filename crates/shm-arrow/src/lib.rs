//! Apache Arrow record batches in shared memory: per-column frames, and Arrow IPC blocks that
//! other languages read.
//!
//! [`ColumnFrame`] carries a `RecordBatch` through the shm-codec machinery (and so through the
//! transport): every buffer of every column — validity bitmaps, offsets, values, children,
//! dictionaries, views — is placed in shared memory, one block per column, each buffer 64-byte
//! aligned. Decoding builds a `RecordBatch` whose buffers point into those blocks
//! (`Buffer::from_custom_allocation`, the block as owner), so nothing is copied and the batch
//! keeps the memory mapped. Arrow's own validation runs by default (UTF-8, offsets, dictionary
//! keys: O(data)); [`decode_trusted`] skips it for trusted peers, which makes decoding cost
//! proportional to the number of columns. A batch decoded from shared memory and sent on is
//! referenced where it lies; only columns that changed are copied — a frame always carries
//! exactly the batch's current columns.
//!
//! [`write_ipc_block`] and [`read_ipc_block`] do the same for standard Arrow IPC streams, the
//! form that pyarrow and other Arrow implementations read from a shared-memory segment.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use arrow::array::{Float64Array, RecordBatch, StringArray};
//! use shm_arrow::ColumnFrame;
//! use shm_codec::{Decoder, Encoder};
//! use shm_core::ShmPool;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let batch = RecordBatch::try_from_iter([
//!     ("x", Arc::new(Float64Array::from(vec![1.0, 2.5])) as _),
//!     ("name", Arc::new(StringArray::from(vec![Some("a"), None])) as _),
//! ])?;
//! let encoder = Encoder::new(ShmPool::new()?);
//! let payload = encoder.encode(&ColumnFrame(batch.clone()))?;
//!
//! let decoder = Decoder::new(ShmPool::new()?);
//! let ColumnFrame(back) = decoder.decode(&payload)?;
//! assert_eq!(back, batch);
//! # drop((back, payload));
//! # Ok(())
//! # }
//! ```

mod buffer;
mod frame;
mod ipc;

pub use buffer::block_buffer;
pub use frame::{COLUMNS_CODEC, ColumnFrame, ColumnsCodec, decode_projection, decode_trusted};
pub use ipc::{read_ipc_block, write_ipc_block};

/// Runs a decoder of foreign bytes, turning a panic inside arrow — whose readers and builders
/// assert on some hostile inputs (slice bounds, alignment, offset overflow) — into an error:
/// bytes from another process can fail their own decode, never the process.
fn contain<T>(
    decode: impl FnOnce() -> Result<T, shm_codec::CodecError>,
) -> Result<T, shm_codec::CodecError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|panic| {
        Err(shm_codec::CodecError::InvalidData {
            codec: frame::COLUMNS_CODEC,
            reason: format!(
                "arrow refused the data: {}",
                shm_codec::panic_message(panic.as_ref())
            ),
        })
    })
}
