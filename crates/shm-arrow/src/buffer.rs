//! Arrow buffers over shared memory: the one place where this crate makes memory Arrow's.

use std::ptr::NonNull;
use std::sync::Arc;

use arrow::buffer::Buffer;
use shm_codec::CodecError;
use shm_core::ShmBlock;

use crate::frame::COLUMNS_CODEC;

/// An Arrow buffer over `len` bytes at `offset` of `block`'s content, owned by the block: the
/// batch that holds the buffer keeps the mapping alive. Checks the range first. Transports
/// use it to decode Arrow IPC bodies they received into shared memory in place.
pub fn block_buffer(block: &Arc<ShmBlock>, offset: u64, len: u64) -> Result<Buffer, CodecError> {
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > block.len() as u64) {
        return Err(CodecError::InvalidData {
            codec: COLUMNS_CODEC,
            reason: format!(
                "buffer at {offset}..{offset}+{len} outside block {} of {} bytes",
                block.name(),
                block.len()
            ),
        });
    }
    let start = block.as_ptr().wrapping_add(offset as usize);
    let Some(ptr) = NonNull::new(start.cast_mut()) else {
        return Err(CodecError::InvalidData {
            codec: COLUMNS_CODEC,
            reason: "null block address".into(),
        });
    };
    let owner: Arc<ShmBlock> = Arc::clone(block);
    // SAFETY: `ptr..ptr+len` lies inside the block's content (checked above), which is mapped
    // and initialised for as long as the block lives; the block is the buffer's owner, so it
    // lives as long as any clone of the buffer. Arrow only reads through the pointer: the
    // buffer is immutable, and Arrow's mutation paths copy (`into_mutable` fails for custom
    // allocations). Peers do not write a block while its views live (the ownership protocol).
    Ok(unsafe { Buffer::from_custom_allocation(ptr, len as usize, owner) })
}
