//! `ShmRef`: what crosses a process boundary instead of the data.

use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result, ShmError};

/// A reference to a block of shared memory, small enough to send anywhere (about 40 bytes as
/// postcard).
///
/// The receiver turns it back into memory with [`ShmPool::attach`](crate::ShmPool::attach),
/// which checks every number here against the segment before it hands out a byte.
///
/// ```
/// use shm_core::ShmRef;
///
/// # fn main() -> Result<(), shm_core::ShmError> {
/// let pool = shm_core::ShmPool::new()?;
/// let block = pool.alloc(4096)?.freeze();
/// let r = block.to_ref();
/// assert_eq!(ShmRef::from_bytes(&r.to_bytes())?, r); // the wire form
/// assert_eq!(ShmRef::from_hex(&r.to_hex())?, r); // for command lines and environments
/// assert!(ShmRef::from_hex("not hex").is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShmRef {
    /// POSIX name of the segment, with its leading slash (`/shm-...`).
    pub name: String,
    /// Bytes of the block: the region from `offset` that belongs to this reference.
    pub size: u64,
    /// Where the block starts inside the segment (non-zero for blocks that share a segment).
    pub offset: u64,
    /// Bytes of the block that hold content (at most `size`); decoders read only these.
    pub content_size: u64,
}

impl ShmRef {
    /// The reference in its wire form (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings and integers into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Reads a reference from its wire form. Only the form is checked here; whether the segment
    /// exists and is large enough is checked by [`ShmPool::attach`](crate::ShmPool::attach).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        postcard::from_bytes(bytes).map_err(|source| ShmError::MalformedRef {
            len: bytes.len(),
            source: FormatError::from_postcard(source),
        })
    }

    /// The reference as a string of hex digits, for command lines and environment variables.
    pub fn to_hex(&self) -> String {
        self.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a reference written by [`ShmRef::to_hex`].
    pub fn from_hex(text: &str) -> Result<Self> {
        let bytes: Option<Vec<u8>> = (0..text.len())
            .step_by(2)
            .map(|i| {
                text.get(i..i + 2)
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
            })
            .collect();
        match bytes {
            Some(bytes) => Self::from_bytes(&bytes),
            None => Err(ShmError::MalformedRef {
                len: text.len(),
                source: FormatError::from_postcard(postcard::Error::DeserializeBadEncoding),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ShmRef {
        ShmRef {
            name: "/shm-deadbeef-0123456789abcdef".into(),
            size: 1 << 30,
            offset: 4096,
            content_size: (1 << 30) - 7,
        }
    }

    #[test]
    fn round_trips_through_postcard_and_hex() {
        let r = sample();
        let bytes = r.to_bytes();
        assert!(bytes.len() <= 48, "{} bytes", bytes.len());
        assert_eq!(ShmRef::from_bytes(&bytes).unwrap(), r);
        assert_eq!(ShmRef::from_hex(&r.to_hex()).unwrap(), r);
    }

    #[test]
    fn truncated_and_garbled_refs_are_errors() {
        let bytes = sample().to_bytes();
        for cut in 0..bytes.len() {
            assert!(matches!(
                ShmRef::from_bytes(&bytes[..cut]),
                Err(ShmError::MalformedRef { len, .. }) if len == cut
            ));
        }
        for text in ["0", "zz", "1"] {
            assert!(matches!(
                ShmRef::from_hex(text),
                Err(ShmError::MalformedRef { .. })
            ));
        }
    }
}
