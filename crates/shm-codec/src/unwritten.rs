//! A value encoded up to the copy: its metadata decided, its new blocks not yet written.
//!
//! A codec that copies a value's bytes into fresh blocks (an Arrow batch on the heap, say)
//! can stop short of the copy and describe each new block as the pieces that would fill it.
//! A local transport writes the blocks ([`Unwritten::write`]) and sends them as usual. A
//! transport that copies the bytes again anyway — onto a socket — sends the pieces straight
//! from where they lie and saves the first copy: the receiver gets the same bytes at the same
//! offsets, and the same metadata.

use std::borrow::Cow;
use std::sync::Arc;

use shm_core::ShmBlock;

use crate::codec::Encoder;
use crate::error::{CodecError, Result};
use crate::payload::Payload;

/// Bytes owned elsewhere that stay alive as long as the piece that names them: an Arrow buffer
/// (which the piece keeps alive), or the memory of a value the caller lends for `'a`, the
/// length of its call.
pub type Bytes<'a> = Arc<dyn AsRef<[u8]> + Send + Sync + 'a>;

/// What fills one block of an [`Unwritten`] payload, in the order of the payload's blocks.
#[derive(Clone, Debug)]
pub enum Source<'a> {
    /// A block that already holds its bytes (a value sent on, a buffer already in shared
    /// memory).
    Block(Arc<ShmBlock>),
    /// A block still to be written: its length, and the pieces that go into it.
    Pieces(Pieces<'a>),
}

impl Source<'_> {
    /// The bytes of the block.
    pub fn len(&self) -> usize {
        match self {
            Source::Block(block) => block.len(),
            Source::Pieces(pieces) => pieces.len,
        }
    }

    /// Whether the block holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A block still to be written: byte strings at increasing, non-overlapping offsets; the bytes
/// between and after them are padding, whose value nobody reads.
#[derive(Clone)]
pub struct Pieces<'a> {
    len: usize,
    pieces: Vec<(Bytes<'a>, usize)>,
}

impl std::fmt::Debug for Pieces<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pieces")
            .field("len", &self.len)
            .field("pieces", &self.pieces.len())
            .finish()
    }
}

impl<'a> Pieces<'a> {
    /// A block of `len` bytes, nothing placed yet.
    pub fn new(len: usize) -> Self {
        Pieces {
            len,
            pieces: Vec::new(),
        }
    }

    /// Places `bytes` at `offset`, past every piece placed so far and inside the block.
    pub fn place(&mut self, bytes: Bytes<'a>, offset: usize) -> Result<()> {
        let end = self
            .pieces
            .last()
            .map_or(0, |(b, at)| at + (**b).as_ref().len());
        let len = (*bytes).as_ref().len();
        if offset < end || offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(CodecError::Layout {
                reason: format!(
                    "a piece of {len} bytes at offset {offset} of a block of {} bytes whose \
                     pieces so far end at {end}",
                    self.len
                ),
            });
        }
        self.pieces.push((bytes, offset));
        Ok(())
    }

    /// The pieces, in order, each with its offset.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], usize)> {
        self.pieces.iter().map(|(b, at)| ((**b).as_ref(), *at))
    }

    /// Writes the pieces into `bytes` (the block's memory, `len` bytes), padding untouched.
    fn write_into(&self, bytes: &mut [u8]) {
        for (piece, at) in self.iter() {
            bytes[at..at + piece.len()].copy_from_slice(piece);
        }
    }
}

/// A payload whose new blocks are still to be written: see the module's documentation.
#[derive(Clone, Debug)]
pub struct Unwritten<'a> {
    /// The codec's name, as in [`Payload::codec`].
    pub codec: Cow<'static, str>,
    /// The codec's metadata, as in [`Payload::meta`]: it names blocks by their index in
    /// `sources`.
    pub meta: Vec<u8>,
    /// The inline bytes, as in [`Payload::inline`].
    pub inline: Vec<u8>,
    /// What fills each block, in order.
    pub sources: Vec<Source<'a>>,
}

impl Unwritten<'_> {
    /// The payload, its new blocks allocated from `encoder`'s pool, written and frozen: the
    /// payload the codec's own `encode` gives.
    pub fn write(self, encoder: &Encoder) -> Result<Payload> {
        let blocks = self
            .sources
            .into_iter()
            .map(|source| match source {
                Source::Block(block) => Ok(block),
                Source::Pieces(pieces) => {
                    let mut block = encoder.pool().alloc(pieces.len)?;
                    pieces.write_into(block.as_mut_slice());
                    Ok(encoder.freeze(block))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Payload::new(self.codec, self.meta, blocks, self.inline))
    }

    /// Bytes of all its blocks, written or not.
    pub fn block_bytes(&self) -> u64 {
        self.sources.iter().map(|s| s.len() as u64).sum()
    }
}
