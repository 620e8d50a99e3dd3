//! Payload codecs over shm-core blocks: the layer that turns values into [`Payload`]s — a codec
//! name, small metadata, [`ShmRef`](shm_core::ShmRef)s and inline bytes — and back.
//!
//! Arrays travel as [`ShmArray`]: an ndarray view over a shared-memory block that keeps the
//! block alive. Encoding copies an ordinary array once (keeping C or F order; a non-contiguous
//! one is copied into C order); encoding a `ShmArray`, a slice of one, or an `ArrayView` that
//! lies in a live block copies nothing; an array produced in place with [`ShmArrayMut`] is sent
//! without a copy too. Decoding checks dtype, shape, strides, alignment and bounds against the
//! block before it makes a view, and bool bytes before it calls them bools; what it hands out
//! is read-only. Small data travels inline. [`SimpleFrame`] is a numeric table in one block;
//! [`Serde`] carries plain serde values; the [`Registry`] picks codecs at run time and takes
//! codecs of the user's own.
//!
//! The metadata follows numpy's array interface (typestr, shape, byte strides), so readers in
//! other languages can map the same memory.
//!
//! # Example
//!
//! ```
//! use ndarray::{Array2, s};
//! use shm_codec::{Decoder, Encoder, Order, ShmArray, array_order};
//! use shm_core::ShmPool;
//!
//! # fn main() -> Result<(), shm_codec::CodecError> {
//! let encoder = Encoder::new(ShmPool::new()?);
//! let a = Array2::from_shape_fn((1000, 300), |(i, j)| (i * 300 + j) as f64).reversed_axes();
//! assert_eq!(array_order(&a), Order::F);
//!
//! let payload = encoder.encode(&a)?; // one copy, into shared memory, F order kept
//! let wire = payload.to_bytes(); // what crosses the process boundary: a few hundred bytes
//!
//! // In the receiving process:
//! let decoder = Decoder::new(ShmPool::new()?);
//! let b: ShmArray<f64, ndarray::Ix2> = decoder.decode(&shm_codec::Payload::from_bytes(&wire)?)?;
//! assert_eq!(b.view(), a.view());
//! assert_eq!(b.order(), Order::F);
//!
//! // A slice of the received array goes back with no copy: the same block, another origin.
//! let column = b.slice(s![.., 7]);
//! let back = encoder.encode(&column)?;
//! assert_eq!(back.buffers()[0].name, payload.buffers()[0].name);
//! # drop((b, column, back, payload));
//! # Ok(())
//! # }
//! ```

mod array;
mod codec;
mod element;
mod error;
mod frame;
mod payload;
mod tuple;
mod unwritten;
mod value;
pub mod wire;

pub use array::{ARRAY_CODEC, ForeignArray, Order, ShmArray, ShmArrayMut, array_order};
pub use codec::{
    AnyValue, Attacher, Codec, DEFAULT_INLINE_THRESHOLD, DEFAULT_SERDE_INLINE_LIMIT, Decode,
    Decoder, Encode, Encoder, Registry, SERDE_CODEC, Serde, SerdeCodec,
};
pub use element::{DType, Element};
pub use error::{CodecError, Result, panic_message};
pub use frame::{FRAME_CODEC, Index, SimpleFrame};
pub use num_complex::Complex;
pub use payload::{FORMAT_VERSION, MAX_BLOCKS, Payload};
pub use tuple::TUPLE_CODEC;
pub use unwritten::{Bytes, Pieces, Source, Unwritten};
pub use value::{MAX_VALUE_DEPTH, Value};
