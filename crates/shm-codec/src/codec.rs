//! Encoding and decoding: the typed traits, the contexts they run in, the serde codec, and the
//! ordered registry for values whose type is known only at run time.

use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use shm_core::{FormatError, ShmBlock, ShmBlockMut, ShmPool, ShmRef};

use crate::error::{CodecError, Result};
use crate::payload::Payload;
use crate::unwritten::Unwritten;

/// Default size under which array data travels inline rather than in a block.
pub const DEFAULT_INLINE_THRESHOLD: usize = 64 << 10;
/// Default size over which a serde value goes to a block of its own rather than inline.
pub const DEFAULT_SERDE_INLINE_LIMIT: usize = 1 << 20;

/// Where encoded values go: the pool that holds their blocks, and the inline thresholds.
#[derive(Clone, Debug)]
pub struct Encoder {
    pool: ShmPool,
    /// Array data of fewer bytes travels inline.
    pub inline_threshold: usize,
    /// Serde values of more bytes go to a block of their own.
    pub serde_inline_limit: usize,
}

impl Encoder {
    /// An encoder over `pool` with the default thresholds.
    pub fn new(pool: ShmPool) -> Self {
        Encoder {
            pool,
            inline_threshold: DEFAULT_INLINE_THRESHOLD,
            serde_inline_limit: DEFAULT_SERDE_INLINE_LIMIT,
        }
    }

    /// The pool blocks are allocated from.
    pub fn pool(&self) -> &ShmPool {
        &self.pool
    }

    /// Encodes a value.
    pub fn encode<V: Encode + ?Sized>(&self, value: &V) -> Result<Payload> {
        let payload = value.encode(self)?;
        if payload.buffers().len() > crate::MAX_BLOCKS {
            return Err(CodecError::TooManyBlocks {
                blocks: payload.buffers().len(),
                limit: crate::MAX_BLOCKS,
            });
        }
        Ok(payload)
    }

    /// Encodes a value up to the copy into new blocks, where its codec can (see
    /// [`Encode::encode_unwritten`]).
    pub fn encode_unwritten<'v, V: Encode + ?Sized>(
        &self,
        value: &'v V,
    ) -> Result<Option<Unwritten<'v>>> {
        let unwritten = value.encode_unwritten(self)?;
        if let Some(unwritten) = &unwritten
            && unwritten.sources.len() > crate::MAX_BLOCKS
        {
            return Err(CodecError::TooManyBlocks {
                blocks: unwritten.sources.len(),
                limit: crate::MAX_BLOCKS,
            });
        }
        Ok(unwritten)
    }

    /// A block this encoder's codec has filled, frozen for sending: from now on, encoding a
    /// view into it (an `ArrayView`, an Arrow buffer) sends a reference to it, not a copy.
    pub fn freeze(&self, block: ShmBlockMut) -> Arc<ShmBlock> {
        let block = block.freeze();
        crate::array::register_live(&block);
        block
    }

    /// The live block of this process that holds the `len` bytes at `ptr`, if one does: a
    /// block decoded from a peer or frozen here, which a codec can reference instead of
    /// copying the bytes.
    pub fn block_holding(&self, ptr: *const u8, len: usize) -> Option<Arc<ShmBlock>> {
        crate::array::find_live_block(ptr, len)
    }
}

/// Where decoded values come from: the pool that attaches their blocks, and optionally an
/// [`Attacher`] that decides how (a transport attaches through one, to learn when each block
/// is released).
#[derive(Clone)]
pub struct Decoder {
    pool: ShmPool,
    attacher: Option<Arc<dyn Attacher>>,
    /// Whether bytes of a peer's blocks that carry an invariant are copied before they are
    /// checked (see [`Decoder::copying_invariants`]).
    copy_invariants: bool,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("pool", &self.pool)
            .field("attacher", &self.attacher.is_some())
            .field("copy_invariants", &self.copy_invariants)
            .finish()
    }
}

/// How a [`Decoder`] turns references into blocks. The default attaches through the pool;
/// a transport supplies its own, which marks each block so that the peer that lent it learns
/// when it is dropped, and hands out one block for a reference that a payload names twice.
pub trait Attacher: Send + Sync {
    /// The block `r` names, attached through `pool`.
    fn attach(&self, pool: &ShmPool, r: &ShmRef) -> shm_core::Result<Arc<ShmBlock>>;
}

impl Decoder {
    /// A decoder attaching through `pool`.
    pub fn new(pool: ShmPool) -> Self {
        Decoder {
            pool,
            attacher: None,
            copy_invariants: false,
        }
    }

    /// A decoder that attaches through `attacher`.
    pub fn with_attacher(pool: ShmPool, attacher: Arc<dyn Attacher>) -> Self {
        Decoder {
            pool,
            attacher: Some(attacher),
            copy_invariants: false,
        }
    }

    /// Sets whether the bytes of a peer's blocks that carry an invariant are copied into this
    /// process before they are checked: `bool` arrays (a byte other than 0 or 1 is undefined
    /// behaviour), serde values (UTF-8), and Arrow offsets, strings, dictionary keys, union type
    /// ids and views. A peer can rewrite its own blocks at any time, even after they were
    /// checked; plain numbers it rewrites only change their values, so they are read in place.
    /// A transport turns this on for what it reads from a worker.
    pub fn copying_invariants(mut self, on: bool) -> Self {
        self.copy_invariants = on;
        self
    }

    /// Whether the checked bytes of `block` must be copied before they are checked: it is a
    /// peer's memory and [`copying_invariants`](Self::copying_invariants) is on.
    pub fn must_copy(&self, block: &ShmBlock) -> bool {
        self.copy_invariants && block.is_peer_memory()
    }

    /// The pool blocks are attached with.
    pub fn pool(&self) -> &ShmPool {
        &self.pool
    }

    /// Attaches the block a reference names. The block is remembered as backing live values,
    /// so that encoding a view into it sends a reference instead of a copy (unless the
    /// attacher returned a [private copy](shm_core::ShmPool::private_copy)).
    pub fn attach(&self, r: &ShmRef) -> Result<Arc<ShmBlock>> {
        let block = match &self.attacher {
            Some(attacher) => attacher.attach(&self.pool, r)?,
            None => Arc::new(self.pool.attach(r)?),
        };
        // A private copy names no segment: a value built on it is copied when re-sent.
        if !block.is_private() {
            crate::array::register_live(&block);
        }
        Ok(block)
    }

    /// Decodes a value of type `V`.
    pub fn decode<V: Decode>(&self, payload: &Payload) -> Result<V> {
        V::decode(payload, self)
    }
}

/// A value that can be encoded into a payload.
pub trait Encode {
    /// Encodes the value; large data goes into blocks of the encoder's pool.
    fn encode(&self, encoder: &Encoder) -> Result<Payload>;

    /// Encodes the value up to the copy into new blocks ([`Unwritten`]), for a transport that
    /// copies the bytes once more anyway (onto a socket) and can send them from where they lie.
    /// `None` (the default) where the codec does not do this: the transport then calls
    /// [`encode`](Self::encode). Where it does, `encode_unwritten(e)?.write(e)` must give what
    /// `encode(e)` gives. The pieces may borrow the value's own memory.
    fn encode_unwritten(&self, encoder: &Encoder) -> Result<Option<Unwritten<'_>>> {
        let _ = encoder;
        Ok(None)
    }
}

/// A value that can be decoded from a payload.
pub trait Decode: Sized {
    /// Decodes the value, checking every number in the payload.
    fn decode(payload: &Payload, decoder: &Decoder) -> Result<Self>;
}

/// An encoded payload encodes as itself (its blocks shared, nothing copied): a value encoded
/// once can be sent to several peers. A payload read from a peer holds none of its blocks, and
/// a transport refuses to send it.
impl Encode for Payload {
    fn encode(&self, _encoder: &Encoder) -> Result<Payload> {
        Ok(self.clone())
    }
}

/// A plain serde value (numbers, strings, structs, vectors, maps) carried by the `serde` codec:
/// postcard bytes, inline when small, in a block of their own when large.
///
/// ```
/// use std::collections::BTreeMap;
/// use shm_codec::{Decoder, Encoder, Serde};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = shm_core::ShmPool::new()?;
/// let value = BTreeMap::from([("rows".to_owned(), 3u64), ("cols".to_owned(), 2)]);
/// let payload = Encoder::new(pool.clone()).encode(&Serde(value.clone()))?;
/// assert!(payload.buffers().is_empty(), "small values travel inline");
/// let Serde(back): Serde<BTreeMap<String, u64>> = Decoder::new(pool).decode(&payload)?;
/// assert_eq!(back, value);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serde<T>(pub T);

/// The codec name of [`Serde`] values.
pub const SERDE_CODEC: &str = "serde";

impl<T: Serialize> Encode for Serde<T> {
    fn encode(&self, encoder: &Encoder) -> Result<Payload> {
        // A small value (a small call's) is written on the stack first, then allocated once
        // at its size, rather than grown byte by byte.
        let mut small = [0u8; 64];
        let bytes = match postcard::to_slice(&self.0, &mut small) {
            Ok(written) => written.to_vec(),
            Err(_) => postcard::to_stdvec(&self.0).map_err(|source| CodecError::Serialize {
                source: FormatError::from_postcard(source),
            })?,
        };
        if bytes.len() <= encoder.serde_inline_limit {
            return Ok(Payload::new(SERDE_CODEC, Vec::new(), Vec::new(), bytes));
        }
        let mut block = encoder.pool().alloc(bytes.len())?;
        block.as_mut_slice().copy_from_slice(&bytes);
        Ok(Payload::new(
            SERDE_CODEC,
            Vec::new(),
            vec![block.freeze()],
            Vec::new(),
        ))
    }
}

impl<T: DeserializeOwned> Decode for Serde<T> {
    fn decode(payload: &Payload, decoder: &Decoder) -> Result<Self> {
        payload.expect_codec(SERDE_CODEC)?;
        decode_serde(payload, decoder).map(Serde)
    }
}

/// Reads the postcard value of a serde payload, whatever its codec name.
fn decode_serde<T: DeserializeOwned>(payload: &Payload, decoder: &Decoder) -> Result<T> {
    let malformed = |len| {
        move |source| CodecError::Malformed {
            what: "serde value",
            len,
            source: FormatError::from_postcard(source),
        }
    };
    match payload.buffers() {
        [] => postcard::from_bytes(&payload.inline).map_err(malformed(payload.inline.len())),
        [r] => {
            let block = decoder.attach(r)?;
            if decoder.must_copy(&block) {
                // postcard checks a string's bytes, then copies them: two reads.
                let bytes = block.as_slice().to_vec();
                return postcard::from_bytes(&bytes).map_err(malformed(bytes.len()));
            }
            postcard::from_bytes(block.as_slice()).map_err(malformed(block.len()))
        }
        more => Err(CodecError::BufferCount {
            codec: SERDE_CODEC,
            expected: 1,
            found: more.len(),
        }),
    }
}

/// A decoded value of a type known only at run time.
pub type AnyValue = Box<dyn Any + Send + Sync>;

/// A codec of the [`Registry`]: encodes the values it accepts, decodes its payloads.
pub trait Codec: Send + Sync {
    /// The name written into its payloads.
    fn name(&self) -> &str;

    /// Encodes `value` if this codec accepts its type; `None` lets the next codec try.
    fn encode(&self, value: &dyn Any, encoder: &Encoder) -> Option<Result<Payload>>;

    /// Decodes one of its payloads.
    fn decode(&self, payload: &Payload, decoder: &Decoder) -> Result<AnyValue>;
}

/// An ordered list of codecs: on encode the first that accepts the value wins; on decode the
/// codec is found by the payload's name.
///
/// ```
/// use shm_codec::{Decoder, Encoder, Registry, SerdeCodec};
/// use shm_core::ShmPool;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = ShmPool::new()?;
/// let (encoder, decoder) = (Encoder::new(pool.clone()), Decoder::new(pool));
/// let mut registry = Registry::new(); // arrays and simple frames
/// registry.register(SerdeCodec::<Vec<String>>::new("names"));
/// let payload = registry.encode(&vec!["a".to_owned(), "b".to_owned()], &encoder)?;
/// assert_eq!(payload.codec, "names");
/// let back: Vec<String> = registry.decode_as(&payload, &decoder)?;
/// assert_eq!(back, ["a", "b"]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Registry {
    codecs: Vec<Arc<dyn Codec>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// The built-in codecs: n-dimensional arrays (`ndarray`) and simple frames (`frame`).
    pub fn new() -> Self {
        Registry {
            codecs: vec![
                Arc::new(crate::array::ArrayCodec),
                Arc::new(crate::frame::FrameCodec),
            ],
        }
    }

    /// A registry with no codec at all.
    pub fn empty() -> Self {
        Registry { codecs: Vec::new() }
    }

    /// Adds a codec after the others: it sees only the values no earlier codec accepts.
    pub fn register(&mut self, codec: impl Codec + 'static) -> &mut Self {
        self.codecs.push(Arc::new(codec));
        self
    }

    /// Adds a codec before the others: it gets the first look at every value.
    pub fn register_first(&mut self, codec: impl Codec + 'static) -> &mut Self {
        self.codecs.insert(0, Arc::new(codec));
        self
    }

    /// The codec names, in order.
    pub fn names(&self) -> Vec<String> {
        self.codecs.iter().map(|c| c.name().to_owned()).collect()
    }

    /// Encodes `value` with the first codec that accepts it.
    pub fn encode<V: Any>(&self, value: &V, encoder: &Encoder) -> Result<Payload> {
        self.codecs
            .iter()
            .find_map(|codec| codec.encode(value, encoder))
            .unwrap_or(Err(CodecError::NoCodec {
                type_name: std::any::type_name::<V>(),
            }))
    }

    /// Decodes a payload with the codec it names.
    pub fn decode(&self, payload: &Payload, decoder: &Decoder) -> Result<AnyValue> {
        let codec = self
            .codecs
            .iter()
            .find(|c| c.name() == payload.codec)
            .ok_or_else(|| CodecError::UnknownCodec {
                name: payload.codec.to_string(),
                known: self.names(),
            })?;
        codec.decode(payload, decoder)
    }

    /// Decodes a payload and checks that the value is a `V`.
    pub fn decode_as<V: Any>(&self, payload: &Payload, decoder: &Decoder) -> Result<V> {
        self.decode(payload, decoder)?
            .downcast::<V>()
            .map(|value| *value)
            .map_err(|_| CodecError::WrongType {
                codec: payload.codec.to_string(),
                expected: std::any::type_name::<V>(),
            })
    }
}

/// A registry codec for one serde type, under a name of the user's choosing.
pub struct SerdeCodec<T> {
    name: String,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for SerdeCodec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerdeCodec")
            .field("name", &self.name)
            .finish()
    }
}

impl<T> SerdeCodec<T> {
    /// A codec that carries `T` values in payloads named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        SerdeCodec {
            name: name.into(),
            _type: std::marker::PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Codec for SerdeCodec<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn encode(&self, value: &dyn Any, encoder: &Encoder) -> Option<Result<Payload>> {
        let value = value.downcast_ref::<T>()?;
        Some(Serde(value).encode(encoder).map(|mut payload| {
            payload.codec = Cow::Owned(self.name.clone());
            payload
        }))
    }

    fn decode(&self, payload: &Payload, decoder: &Decoder) -> Result<AnyValue> {
        Ok(Box::new(decode_serde::<T>(payload, decoder)?))
    }
}
