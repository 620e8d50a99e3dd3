//! `Payload`: an encoded value as it travels — codec name, metadata, shared-memory references
//! and small inline bytes.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shm_core::{FormatError, ShmBlock, ShmRef};

use crate::error::{CodecError, Result};

/// The wire format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 2;

/// The most blocks one payload may name: 1,048,576, enough for a frame of several hundred
/// thousand columns. A transport refuses to send a payload of more, and a receiver refuses
/// one that names more before it sets anything aside for them.
pub const MAX_BLOCKS: usize = 1 << 20;

/// An encoded value. Its large data lives in shared memory (`buffers`); everything else is
/// small and travels in the message itself.
///
/// # A payload holds what it names
///
/// A payload built to be sent ([`Payload::new`]) is built from the blocks themselves, not from
/// references to them: it holds each block (an `Arc<ShmBlock>`) for as long as it lives, and
/// its references are derived from those blocks, so no codec can send a reference to a block
/// that may be recycled underneath it. A transport that sends the payload takes its blocks
/// ([`blocks`](Self::blocks)) and keeps them until the receiver has let go. A payload read
/// from the wire ([`from_bytes`](Self::from_bytes), [`from_refs`](Self::from_refs)) names
/// blocks of the sender and holds none; it is for decoding.
///
/// ```
/// use ndarray::Array1;
/// use shm_codec::{Decoder, Encoder, Payload, ShmArray};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = shm_core::ShmPool::new()?;
/// let payload = Encoder::new(pool.clone()).encode(&Array1::from_elem(100_000, 2.0f64))?;
/// assert!(payload.is_backed()); // it holds its block
/// let wire = payload.to_bytes(); // a few dozen bytes: the reference, not the data
/// let read = Payload::from_bytes(&wire)?;
/// assert!(!read.is_backed()); // it names the block and holds nothing
/// let a: ShmArray<f64, ndarray::Ix1> = Decoder::new(pool).decode(&read)?;
/// assert_eq!(a.view().sum(), 200_000.0);
/// # drop(payload); // the sender's block lives while the reader decodes
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Payload {
    /// The format version of the writer; a reader of another version refuses the payload.
    pub version: u16,
    /// The name of the codec that can decode it (`ndarray`, `frame`, `serde`, …). The names of
    /// this workspace's codecs are borrowed, not allocated, on both sides.
    #[serde(deserialize_with = "codec_name")]
    pub codec: Cow<'static, str>,
    /// The codec's metadata, postcard-encoded (shape, dtype, labels, …).
    pub meta: Vec<u8>,
    /// The shared-memory blocks holding the data.
    buffers: Vec<ShmRef>,
    /// Data small enough to travel inline instead of in a block.
    pub inline: Vec<u8>,
    /// The blocks `buffers` name, in the same order (sending side only).
    #[serde(skip)]
    blocks: Vec<Arc<ShmBlock>>,
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        (
            self.version,
            &self.codec,
            &self.meta,
            &self.buffers,
            &self.inline,
        ) == (
            other.version,
            &other.codec,
            &other.meta,
            &other.buffers,
            &other.inline,
        )
    }
}

impl Eq for Payload {}

impl Payload {
    /// A payload of the current format version over `blocks`, which it holds.
    pub fn new(
        codec: impl AsRef<str>,
        meta: Vec<u8>,
        blocks: Vec<Arc<ShmBlock>>,
        inline: Vec<u8>,
    ) -> Self {
        let refs = blocks.iter().map(|b| b.to_ref()).collect();
        Payload {
            blocks,
            ..Self::from_refs(codec, meta, refs, inline)
        }
    }

    /// A payload as a peer sent it: references to blocks this process does not hold, for
    /// decoding only (a transport refuses to send it, see [`is_backed`](Self::is_backed)).
    pub fn from_refs(
        codec: impl AsRef<str>,
        meta: Vec<u8>,
        refs: Vec<ShmRef>,
        inline: Vec<u8>,
    ) -> Self {
        Payload {
            version: FORMAT_VERSION,
            codec: codec_cow(codec.as_ref()),
            meta,
            buffers: refs,
            inline,
            blocks: Vec::new(),
        }
    }

    /// A payload as [`crate::wire::Reader`] read it, every field as it came.
    #[inline]
    pub(crate) fn from_wire(
        version: u16,
        codec: Cow<'static, str>,
        meta: Vec<u8>,
        buffers: Vec<ShmRef>,
        inline: Vec<u8>,
    ) -> Self {
        Payload {
            version,
            codec,
            meta,
            buffers,
            inline,
            blocks: Vec::new(),
        }
    }

    /// Overwrites the payload with what was read from the wire, keeping the allocations of
    /// its vectors (see [`Reader::payload_into`](crate::wire::Reader::payload_into)); no
    /// blocks, as on any receiving side. `buffers` is `None` for none.
    #[inline]
    pub(crate) fn refill(
        &mut self,
        version: u16,
        codec: &str,
        meta: &[u8],
        buffers: Option<Vec<ShmRef>>,
        inline: &[u8],
    ) {
        self.version = version;
        if self.codec != codec {
            self.codec = codec_cow(codec);
        }
        self.meta.clear();
        self.meta.extend_from_slice(meta);
        match buffers {
            Some(buffers) => self.buffers = buffers,
            None => self.buffers.clear(),
        }
        self.inline.clear();
        self.inline.extend_from_slice(inline);
        self.blocks.clear();
    }

    /// The references to the payload's blocks, as they travel.
    pub fn buffers(&self) -> &[ShmRef] {
        &self.buffers
    }

    /// The blocks this payload holds, in the order of [`buffers`](Self::buffers) (empty for
    /// a payload read from the wire).
    pub fn blocks(&self) -> &[Arc<ShmBlock>] {
        &self.blocks
    }

    /// Whether the payload holds every block it names, so that it can be sent.
    #[inline]
    pub fn is_backed(&self) -> bool {
        self.blocks.len() == self.buffers.len()
    }

    /// The payload with its blocks taken out: the sender keeps them while the payload's
    /// wire form travels.
    #[inline]
    pub fn take_blocks(&mut self) -> Vec<Arc<ShmBlock>> {
        std::mem::take(&mut self.blocks)
    }

    /// The payload in its wire form (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising strings, integers and byte vectors into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Reads a payload from its wire form, refusing other format versions.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let malformed = |source| CodecError::Malformed {
            what: "payload",
            len: bytes.len(),
            source: FormatError::from_postcard(source),
        };
        // The version is the first field, so it can be read even when the rest has changed.
        let (version, _): (u16, _) = postcard::take_from_bytes(bytes).map_err(malformed)?;
        if version != FORMAT_VERSION {
            return Err(CodecError::VersionMismatch {
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        postcard::from_bytes(bytes).map_err(malformed)
    }

    /// Serialises codec metadata.
    pub fn encode_meta<M: Serialize>(meta: &M) -> Result<Vec<u8>> {
        postcard::to_stdvec(meta).map_err(|source| CodecError::Serialize {
            source: FormatError::from_postcard(source),
        })
    }

    /// Reads this payload's metadata.
    pub fn decode_meta<'a, M: Deserialize<'a>>(&'a self) -> Result<M> {
        postcard::from_bytes(&self.meta).map_err(|source| CodecError::Malformed {
            what: "codec metadata",
            len: self.meta.len(),
            source: FormatError::from_postcard(source),
        })
    }

    /// Checks that the payload was written by `codec`.
    #[inline]
    pub fn expect_codec(&self, codec: &'static str) -> Result<()> {
        if self.codec == codec {
            Ok(())
        } else {
            Err(CodecError::WrongCodec {
                expected: codec,
                found: self.codec.to_string(),
            })
        }
    }
}

/// The codecs of this workspace, whose names a received payload borrows rather than allocates.
const KNOWN_CODECS: [&str; 5] = [
    crate::ARRAY_CODEC,
    crate::SERDE_CODEC,
    crate::FRAME_CODEC,
    crate::TUPLE_CODEC,
    // shm-arrow's `COLUMNS_CODEC`, a crate above this one.
    "arrow-columns",
];

/// Reads a codec name (see [`codec_cow`]).
fn codec_name<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Cow<'static, str>, D::Error> {
    struct Name;
    impl serde::de::Visitor<'_> for Name {
        type Value = Cow<'static, str>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a codec name")
        }

        fn visit_str<E: serde::de::Error>(self, name: &str) -> std::result::Result<Self::Value, E> {
            Ok(codec_cow(name))
        }
    }
    deserializer.deserialize_str(Name)
}

/// `name` as one of [`KNOWN_CODECS`], borrowed, or else as an owned copy.
#[inline]
pub(crate) fn codec_cow(name: &str) -> Cow<'static, str> {
    KNOWN_CODECS
        .iter()
        .find(|known| **known == name)
        .map_or_else(
            || Cow::Owned(name.to_owned()),
            |known| Cow::Borrowed(*known),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let payload = Payload::new("ndarray", vec![1, 2, 3], Vec::new(), vec![9; 10]);
        assert!(payload.is_backed());
        let bytes = payload.to_bytes();
        assert_eq!(Payload::from_bytes(&bytes).unwrap(), payload);

        let newer = Payload {
            version: FORMAT_VERSION + 1,
            ..payload
        };
        assert!(matches!(
            Payload::from_bytes(&newer.to_bytes()),
            Err(CodecError::VersionMismatch { found, expected: FORMAT_VERSION }) if found == FORMAT_VERSION + 1
        ));
        for cut in 0..bytes.len() {
            assert!(Payload::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn codec_names_read_back_borrowed_when_known_and_owned_when_not() {
        for name in KNOWN_CODECS.into_iter().chain(["parquet", ""]) {
            let payload = Payload::new(name, Vec::new(), Vec::new(), Vec::new());
            let read = Payload::from_bytes(&payload.to_bytes()).unwrap();
            assert_eq!(read.codec, name);
            let known = KNOWN_CODECS.contains(&name);
            assert_eq!(matches!(read.codec, Cow::Borrowed(_)), known, "{name}");
            assert_eq!(matches!(payload.codec, Cow::Borrowed(_)), known, "{name}");
        }
    }
}
