//! Arrow IPC streams in shared memory, for readers in other languages.
//!
//! A block written here holds a standard Arrow IPC stream (schema, dictionaries, record
//! batches, end marker), 64-byte aligned, as pyarrow's `pa.ipc.open_stream` reads it. Reading
//! such a block maps the batches' buffers onto the block itself: nothing is copied. Any valid
//! IPC stream reads, including those of other writers: the format aligns buffers to 8 bytes
//! only, so a buffer whose type wants more (a decimal128 after a one-byte column, in a stream
//! pyarrow wrote) is copied into aligned memory — that buffer alone, its values unchanged —
//! while every other buffer stays in the block.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamDecoder;
use arrow::ipc::writer::StreamWriter;
use shm_codec::CodecError;
use shm_core::{ShmBlock, ShmPool};

use crate::buffer::block_buffer;

/// The name used in errors about IPC blocks.
const IPC: &str = "arrow-ipc";

fn invalid(reason: impl Into<String>) -> CodecError {
    CodecError::InvalidData {
        codec: IPC,
        reason: reason.into(),
    }
}

/// Writes `batches` (all of `schema`) as one Arrow IPC stream into a new block of `pool`,
/// frozen: ready to send, or to read back with [`read_ipc_block`].
///
/// ```
/// use std::sync::Arc;
/// use arrow::array::{Int64Array, RecordBatch};
/// use shm_arrow::{read_ipc_block, write_ipc_block};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = shm_core::ShmPool::new()?;
/// let batch = RecordBatch::try_from_iter([("n", Arc::new(Int64Array::from(vec![1, 2, 3])) as _)])?;
/// let block = write_ipc_block(&pool, &batch.schema(), std::slice::from_ref(&batch))?;
/// // pyarrow reads the same block with pa.ipc.open_stream; here it is read back in place.
/// assert_eq!(read_ipc_block(&block)?, vec![batch]);
/// # Ok(())
/// # }
/// ```
pub fn write_ipc_block(
    pool: &ShmPool,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Arc<ShmBlock>, CodecError> {
    let mut writer =
        StreamWriter::try_new(Vec::new(), schema).map_err(|e| invalid(e.to_string()))?;
    for batch in batches {
        writer.write(batch).map_err(|e| invalid(e.to_string()))?;
    }
    let bytes = writer.into_inner().map_err(|e| invalid(e.to_string()))?;
    let mut block = pool.alloc(bytes.len())?;
    block.as_mut_slice().copy_from_slice(&bytes);
    Ok(block.freeze())
}

/// Reads every batch of the IPC stream in `block`, zero-copy: the batches' buffers point into
/// the block, which they keep alive. A buffer not aligned for its type (the IPC format only
/// promises 8 bytes) is copied, alone.
pub fn read_ipc_block(block: &Arc<ShmBlock>) -> Result<Vec<RecordBatch>, CodecError> {
    crate::contain(|| read_unguarded(block))
}

fn read_unguarded(block: &Arc<ShmBlock>) -> Result<Vec<RecordBatch>, CodecError> {
    let mut buffer = block_buffer(block, 0, block.len() as u64)?;
    let mut decoder = StreamDecoder::new().with_require_alignment(false);
    let mut batches = Vec::new();
    while !buffer.is_empty() {
        match decoder
            .decode(&mut buffer)
            .map_err(|e| invalid(e.to_string()))?
        {
            Some(batch) => batches.push(batch),
            None if buffer.is_empty() => break,
            None => {}
        }
    }
    decoder.finish().map_err(|e| invalid(e.to_string()))?;
    Ok(batches)
}
