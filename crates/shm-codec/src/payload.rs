//! `Payload`: an encoded value as it travels — codec name, metadata, shared-memory references
//! and small inline bytes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shm_core::{ShmBlock, ShmRef};

use crate::error::{CodecError, Result};

/// The wire format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// An encoded value. Its large data lives in shared memory (`buffers`); everything else is
/// small and travels in the message itself.
///
/// On the sending side a payload also holds the blocks its references point to, so that they
/// cannot be recycled while the payload is in flight: drop the payload when the receiver is
/// done with it. That part does not travel and is ignored by `==`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Payload {
    /// The format version of the writer; a reader of another version refuses the payload.
    pub version: u16,
    /// The name of the codec that can decode it (`ndarray`, `frame`, `serde`, …).
    pub codec: String,
    /// The codec's metadata, postcard-encoded (shape, dtype, labels, …).
    pub meta: Vec<u8>,
    /// The shared-memory blocks holding the data.
    pub buffers: Vec<ShmRef>,
    /// Data small enough to travel inline instead of in a block.
    pub inline: Vec<u8>,
    /// The blocks `buffers` point to, kept alive on the sending side.
    #[serde(skip)]
    keep_alive: Vec<Arc<ShmBlock>>,
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
    /// A payload of the current format version.
    pub fn new(
        codec: impl Into<String>,
        meta: Vec<u8>,
        buffers: Vec<ShmRef>,
        inline: Vec<u8>,
    ) -> Self {
        Payload {
            version: FORMAT_VERSION,
            codec: codec.into(),
            meta,
            buffers,
            inline,
            keep_alive: Vec::new(),
        }
    }

    /// The payload, holding `block` alive for as long as it lives.
    pub fn keeping(mut self, block: Arc<ShmBlock>) -> Self {
        self.keep_alive.push(block);
        self
    }

    /// The blocks this payload keeps alive.
    pub fn kept_blocks(&self) -> &[Arc<ShmBlock>] {
        &self.keep_alive
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
            source,
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
        postcard::to_stdvec(meta).map_err(|source| CodecError::Serialize { source })
    }

    /// Reads this payload's metadata.
    pub fn decode_meta<'a, M: Deserialize<'a>>(&'a self) -> Result<M> {
        postcard::from_bytes(&self.meta).map_err(|source| CodecError::Malformed {
            what: "codec metadata",
            len: self.meta.len(),
            source,
        })
    }

    /// Checks that the payload was written by `codec`.
    pub fn expect_codec(&self, codec: &'static str) -> Result<()> {
        if self.codec == codec {
            Ok(())
        } else {
            Err(CodecError::WrongCodec {
                expected: codec,
                found: self.codec.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_versions() {
        let payload = Payload::new("ndarray", vec![1, 2, 3], Vec::new(), vec![9; 10]);
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
}
