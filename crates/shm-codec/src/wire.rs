//! The postcard forms of the messages a small call consists of, written and read by hand.
//!
//! A small call's round trip is a few thousand instructions on each side, and serde's generic
//! postcard code for a frame and its payload was about half of them. The functions here write
//! the very bytes serde writes and read back what serde reads, for the common shapes only
//! (integers, strings, byte vectors, a payload without blocks); every other shape, and every
//! byte string they cannot read, is left to serde, which stays the reference. The transport
//! checks the agreement in its tests and in the `frame-wire` fuzz target.
//!
//! They are marked `#[inline]`: the transport calls them from another crate, where a build
//! without link-time optimisation would otherwise make each a call of its own.

use shm_core::ShmRef;

use crate::payload::{Payload, codec_cow};

/// Appends `value` as a postcard varint (seven bits a byte, low first).
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a length-prefixed byte string, as postcard writes a `str`, a `String` or a
/// `Vec<u8>`.
#[inline]
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Reads postcard values from the front of a byte string. Every method returns `None` where
/// postcard would report an error; the caller then asks serde, which reports it.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader of `bytes` from their start.
    #[inline]
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    /// What is left to read.
    #[inline]
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    /// A varint of at most `max_bytes` bytes whose last byte is at most `max_last`: postcard's
    /// rule for each integer width (it refuses the bits a wider value would need, and no more).
    #[inline]
    fn varint(&mut self, max_bytes: usize, max_last: u8) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..max_bytes {
            let (&byte, rest) = self.rest.split_first()?;
            self.rest = rest;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return (i + 1 < max_bytes || byte <= max_last).then_some(value);
            }
        }
        None
    }

    /// A `u64` (or a `usize`, a length).
    #[inline]
    pub fn u64(&mut self) -> Option<u64> {
        self.varint(10, 0x01)
    }

    /// A `u32` (or an enum's variant index).
    #[inline]
    pub fn u32(&mut self) -> Option<u32> {
        self.varint(5, 0x0f).map(|v| v as u32)
    }

    /// A `u16`.
    #[inline]
    pub fn u16(&mut self) -> Option<u16> {
        self.varint(3, 0x03).map(|v| v as u16)
    }

    /// A length-prefixed byte string, borrowed.
    #[inline]
    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u64()?).ok()?;
        if len > self.rest.len() {
            return None;
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(bytes)
    }

    /// A length-prefixed UTF-8 string, borrowed.
    #[inline]
    pub fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    /// A sequence of `u64`s, as postcard writes a `Vec<u64>`.
    #[inline]
    pub fn u64s(&mut self) -> Option<Vec<u64>> {
        let mut values = Vec::new();
        self.u64s_into(&mut values)?;
        Some(values)
    }

    /// A sequence of `u64`s into `values`, which keeps its allocation (see
    /// [`u64s`](Self::u64s)).
    #[inline]
    pub fn u64s_into(&mut self, values: &mut Vec<u64>) -> Option<()> {
        let len = usize::try_from(self.u64()?).ok()?;
        // Each takes a byte at least: a length past what is left is a lie, and reserving for
        // it would let a peer pick our allocation.
        if len > self.rest.len() {
            return None;
        }
        values.clear();
        values.reserve(len);
        for _ in 0..len {
            values.push(self.u64()?);
        }
        Some(())
    }

    /// A [`Payload`] read into `payload`, whose vectors keep their allocations: what a
    /// receiver that reads one message after another does to allocate nothing per message.
    /// On `None`, `payload` is as it was.
    #[inline]
    pub fn payload_into(&mut self, payload: &mut Payload) -> Option<()> {
        let parts = self.payload_parts()?;
        payload.refill(
            parts.version,
            parts.codec,
            parts.meta,
            parts.buffers,
            parts.inline,
        );
        Some(())
    }

    /// A [`Payload`], as serde reads it.
    #[inline]
    pub fn payload(&mut self) -> Option<Payload> {
        let parts = self.payload_parts()?;
        Some(Payload::from_wire(
            parts.version,
            codec_cow(parts.codec),
            parts.meta.to_vec(),
            parts.buffers.unwrap_or_default(),
            parts.inline.to_vec(),
        ))
    }

    /// The fields of a payload, borrowed where they can be.
    #[inline]
    fn payload_parts(&mut self) -> Option<PayloadParts<'a>> {
        let version = self.u16()?;
        let codec = self.str()?;
        let meta = self.bytes()?;
        let buffers = match self.rest.first() {
            Some(0) => {
                self.rest = &self.rest[1..];
                None
            }
            // References are read by serde, which is their reference; they come with a block
            // or more, where the encoding is not what a call costs.
            Some(_) => {
                let (refs, rest) = postcard::take_from_bytes::<Vec<ShmRef>>(self.rest).ok()?;
                self.rest = rest;
                Some(refs)
            }
            None => return None,
        };
        let inline = self.bytes()?;
        Some(PayloadParts {
            version,
            codec,
            meta,
            buffers,
            inline,
        })
    }
}

/// A payload's fields as [`Reader::payload_parts`] reads them.
struct PayloadParts<'a> {
    version: u16,
    codec: &'a str,
    meta: &'a [u8],
    /// `None` for no references.
    buffers: Option<Vec<ShmRef>>,
    inline: &'a [u8],
}

impl Payload {
    /// Appends the payload's postcard form to `out`: the bytes [`to_bytes`](Self::to_bytes)
    /// gives, without serde's generic path (for transports that write it inside their own
    /// messages; [`Reader::payload`] reads it back).
    #[inline]
    pub fn write_wire(&self, out: &mut Vec<u8>) {
        put_varint(out, u64::from(self.version));
        put_bytes(out, self.codec.as_bytes());
        put_bytes(out, &self.meta);
        put_varint(out, self.buffers().len() as u64);
        for buffer in self.buffers() {
            // A reference is integers and a string: serialising it into a Vec cannot fail.
            if let Ok(bytes) = postcard::to_stdvec(buffer) {
                out.extend_from_slice(&bytes);
            }
        }
        put_bytes(out, &self.inline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What postcard itself reads from `bytes` as a `T`, and what follows.
    fn postcard_reads<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Option<(T, &'a [u8])> {
        postcard::take_from_bytes(bytes).ok()
    }

    proptest! {
        #[test]
        fn varints_are_read_as_postcard_reads_them(bytes in proptest::collection::vec(any::<u8>(), 0..12)) {
            prop_assert_eq!(Reader::new(&bytes).u64(), postcard_reads::<u64>(&bytes).map(|v| v.0));
            prop_assert_eq!(Reader::new(&bytes).u32(), postcard_reads::<u32>(&bytes).map(|v| v.0));
            prop_assert_eq!(Reader::new(&bytes).u16(), postcard_reads::<u16>(&bytes).map(|v| v.0));
            let mut reader = Reader::new(&bytes);
            if let Some(value) = reader.u64() {
                prop_assert_eq!(reader.rest(), postcard_reads::<u64>(&bytes).unwrap().1);
                let mut out = Vec::new();
                put_varint(&mut out, value);
                prop_assert_eq!(out, postcard::to_stdvec(&value).unwrap());
            }
        }

        #[test]
        fn strings_and_sequences_are_read_as_postcard_reads_them(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            prop_assert_eq!(Reader::new(&bytes).str(), postcard_reads::<&str>(&bytes).map(|v| v.0));
            prop_assert_eq!(Reader::new(&bytes).bytes().map(<[u8]>::to_vec), postcard_reads::<Vec<u8>>(&bytes).map(|v| v.0));
            prop_assert_eq!(Reader::new(&bytes).u64s(), postcard_reads::<Vec<u64>>(&bytes).map(|v| v.0));
        }

        #[test]
        fn payloads_are_written_and_read_as_serde_does(
            codec in prop_oneof![Just("serde".to_string()), Just("ndarray".to_string()), ".{0,8}"],
            meta in proptest::collection::vec(any::<u8>(), 0..300),
            inline in proptest::collection::vec(any::<u8>(), 0..300),
            cut in any::<usize>(),
            flip in any::<(usize, u8)>(),
        ) {
            let payload = Payload::from_refs(&codec, meta, Vec::new(), inline);
            let mut out = Vec::new();
            payload.write_wire(&mut out);
            prop_assert_eq!(&out, &payload.to_bytes());
            // Read back whole, cut short, and with a byte changed: as serde does, or not at all
            // where serde refuses.
            let mut changed = out.clone();
            let at = flip.0 % changed.len();
            changed[at] ^= flip.1;
            for bytes in [&out[..], &out[..cut % (out.len() + 1)], &changed[..]] {
                let mut reader = Reader::new(bytes);
                let ours = reader.payload().map(|p| (p, reader.rest()));
                let theirs = postcard_reads::<Payload>(bytes);
                prop_assert_eq!(&ours, &theirs);
                if let (Some((ours, _)), Some((theirs, _))) = (ours, theirs) {
                    prop_assert_eq!(ours.version, theirs.version);
                    prop_assert_eq!(matches!(ours.codec, std::borrow::Cow::Borrowed(_)),
                        matches!(theirs.codec, std::borrow::Cow::Borrowed(_)));
                }
            }
        }
    }

    #[test]
    fn the_longest_varints_are_read_as_postcard_reads_them() {
        // Every last byte after every run of continuation bytes up to the longest varint: where
        // postcard's width limits bite.
        for run in 0..11 {
            for last in 0..=255u8 {
                let mut bytes = vec![0xffu8; run];
                bytes.push(last);
                let read = |f: fn(&mut Reader<'_>) -> Option<u64>| f(&mut Reader::new(&bytes));
                assert_eq!(
                    read(|r| r.u64()),
                    postcard_reads::<u64>(&bytes).map(|v| v.0)
                );
                assert_eq!(
                    read(|r| r.u32().map(u64::from)),
                    postcard_reads::<u32>(&bytes).map(|v| u64::from(v.0))
                );
                assert_eq!(
                    read(|r| r.u16().map(u64::from)),
                    postcard_reads::<u16>(&bytes).map(|v| u64::from(v.0))
                );
            }
        }
        let mut out = Vec::new();
        put_varint(&mut out, u64::MAX);
        assert_eq!(out, postcard::to_stdvec(&u64::MAX).unwrap());
    }

    #[test]
    fn payloads_with_blocks_are_written_and_read_as_serde_does() {
        let pool = shm_core::ShmPool::new().unwrap();
        let blocks = vec![
            pool.alloc(100).unwrap().freeze(),
            pool.alloc(5 << 20).unwrap().freeze(),
        ];
        let payload = Payload::new("ndarray", vec![1, 2, 3], blocks, vec![9]);
        let mut out = Vec::new();
        payload.write_wire(&mut out);
        assert_eq!(out, payload.to_bytes());
        let mut reader = Reader::new(&out);
        assert_eq!(reader.payload().unwrap(), payload);
        assert!(reader.rest().is_empty());
    }
}
