//! `ShmArray`: n-dimensional arrays whose elements live in shared memory, and their codec.
//!
//! The metadata of an array follows numpy's array interface — a typestr, a shape, strides in
//! bytes — plus the byte offset of element `[0, 0, …]` inside the data, so that a reader in any
//! language can view it, and so that a slice of a received array (with an offset and any
//! strides, negative ones included) can be sent on without a copy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use ndarray::{
    ArrayBase, ArrayView, ArrayViewMut, Data, Dimension, IntoDimension, ShapeBuilder, SliceArg,
};
use serde::{Deserialize, Serialize};
use shm_core::{ShmBlock, ShmBlockMut, ShmPool};

use crate::codec::{AnyValue, Codec, Decode, Decoder, Encode, Encoder};
use crate::element::{DType, Element, as_bytes, cast, cast_mut};
use crate::error::{CodecError, Result, layout};
use crate::payload::Payload;
use crate::unwritten::{Pieces, Source, Unwritten};

/// The codec name of arrays.
pub const ARRAY_CODEC: &str = "ndarray";

/// Most dimensions an array may have (numpy's limit).
const MAX_NDIM: usize = 64;

/// An array that another program wrote into a shared-memory segment, described the way
/// numpy's array interface describes it: what [`ShmArray::from_foreign`] needs to view it in
/// place.
///
/// For a numpy array `a` over `SharedMemory` `shm`: `name` is `shm.name` (with or without the
/// leading slash), `offset` is the byte offset of `a[0, 0, …]` from the start of the segment
/// (`a.ctypes.data - address of shm.buf`, or the `offset` given to `np.ndarray`), `typestr`
/// is `a.dtype.str`, `shape` is `a.shape` and `strides` is `a.strides`.
///
/// ```
/// use shm_codec::{ForeignArray, ShmArray};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // What numpy leaves in /dev/shm: np.ndarray((2, 3), '<f8', buffer=shm.buf) of 0, 1, … 5.
/// let name = format!("psm_doc_array_{}", std::process::id());
/// let path = std::path::Path::new("/dev/shm").join(&name);
/// struct Removed<'a>(&'a std::path::Path);
/// impl Drop for Removed<'_> {
///     fn drop(&mut self) {
///         let _ = std::fs::remove_file(self.0);
///     }
/// }
/// let _removed = Removed(&path);
/// let bytes: Vec<u8> = (0..6).flat_map(|i| f64::from(i).to_le_bytes()).collect();
/// std::fs::write(&path, &bytes)?;
///
/// let foreign = ForeignArray {
///     name,
///     offset: 0,
///     typestr: "<f8".into(),
///     shape: vec![2, 3],
///     strides: None,
/// };
/// let pool = shm_core::ShmPool::new()?;
/// // SAFETY: nothing writes or shrinks the segment while the array lives.
/// let a = unsafe { ShmArray::<f64, ndarray::Ix2>::from_foreign(&pool, &foreign)? };
/// assert_eq!(a.view()[[1, 2]], 5.0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignArray {
    /// The segment's POSIX name; the leading `/` may be left out.
    pub name: String,
    /// Byte offset of element `[0, 0, …]` from the first byte of the segment.
    pub offset: u64,
    /// numpy's type string (`<f8`, `|u1`, `<c16`, …).
    pub typestr: String,
    /// Elements along each axis.
    pub shape: Vec<u64>,
    /// Bytes between consecutive elements along each axis, negative ones included; `None`
    /// for a C-contiguous array (numpy's `__array_interface__` says `None` then too).
    pub strides: Option<Vec<i64>>,
}

/// How an array's elements lie in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    /// Row-major and contiguous: the last index varies fastest.
    C,
    /// Column-major and contiguous: the first index varies fastest.
    F,
    /// Neither: gaps, a transposition of more than two axes, or negative strides.
    NonContiguous,
}

/// How an array can be rebuilt from a raw buffer: `C`, `F`, or `NonContiguous` (then the
/// encoder copies it into C order).
pub fn array_order<S: Data, D: Dimension>(a: &ArrayBase<S, D>) -> Order {
    if a.is_standard_layout() {
        Order::C
    } else if a.t().is_standard_layout() {
        Order::F
    } else {
        Order::NonContiguous
    }
}

/// The metadata of an array payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ArrayMeta {
    pub typestr: String,
    pub shape: Vec<u64>,
    /// Bytes between consecutive elements along each axis; may be negative or zero.
    pub strides: Vec<i64>,
    /// Byte offset of element `[0, 0, …]` in the data.
    pub origin: u64,
}

/// Bytes an array's elements live in: a shared-memory block, or (for small arrays that
/// travelled inline) an aligned heap buffer.
#[derive(Clone, Debug)]
pub(crate) enum Storage {
    Block(Arc<ShmBlock>),
    Heap(Arc<HeapBytes>),
}

/// Heap bytes aligned to 8, enough for every element type.
#[derive(Debug)]
pub(crate) struct HeapBytes {
    words: Vec<u64>,
    len: usize,
}

impl HeapBytes {
    pub(crate) fn copy_of(bytes: &[u8]) -> Self {
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(word)
            })
            .collect();
        HeapBytes {
            words,
            len: bytes.len(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        &as_bytes(&self.words)[..self.len]
    }
}

impl Storage {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Storage::Block(block) => block.as_slice(),
            Storage::Heap(heap) => heap.as_slice(),
        }
    }
}

/// Blocks that back live arrays, by address, so that the encoder can recognise a plain
/// `ArrayView` into one of them and send a reference instead of a copy.
static LIVE_BLOCKS: Mutex<BTreeMap<usize, (usize, Weak<ShmBlock>)>> = Mutex::new(BTreeMap::new());

/// The live block that holds `len` bytes at `ptr`, if a registered block does.
pub(crate) fn find_live_block(ptr: *const u8, len: usize) -> Option<Arc<ShmBlock>> {
    let low = ptr as usize;
    find_live(low, low.checked_add(len)?)
}

/// Records that `block` backs values of this process, so that encoders recognise memory inside
/// it and send a reference instead of a copy. Every attached and every frozen block is here.
pub(crate) fn register_live(block: &Arc<ShmBlock>) {
    let start = block.as_ptr() as usize;
    let end = start + block.len();
    let mut live = LIVE_BLOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    live.insert(start, (end, Arc::downgrade(block)));
    // Dead entries are dropped now and then, so the map stays as small as the live set.
    if live.len().is_power_of_two() && live.len() >= 64 {
        live.retain(|_, (_, weak)| weak.strong_count() > 0);
    }
}

/// The live block that holds all of `low..high`, if any.
fn find_live(low: usize, high: usize) -> Option<Arc<ShmBlock>> {
    let mut live = LIVE_BLOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    // Live blocks never overlap, so only the nearest live entry at or below `low` can hold it.
    // Dead entries in the way are removed as they are met, each once, so a search stays
    // logarithmic however many blocks died since the last sweep.
    loop {
        let (&start, (end, weak)) = live.range(..=low).next_back()?;
        match weak.upgrade() {
            Some(block) => return (high <= *end).then_some(block),
            None => {
                live.remove(&start);
            }
        }
    }
}

/// An n-dimensional array whose elements live in shared memory (or, when it travelled inline,
/// in a small heap buffer). It keeps its block, and so the mapping, alive; [`view`](Self::view)
/// gives an ordinary read-only `ArrayView`.
///
/// Decoded arrays are read-only: the memory belongs to the process that sent it. To change the
/// data, copy it ([`to_owned`](Self::to_owned)); to produce data in shared memory, use
/// [`ShmArrayMut`]. A slice of a `ShmArray` ([`slice`](Self::slice)) is a `ShmArray` over the
/// same block, and encoding it sends a reference, not a copy.
pub struct ShmArray<T: Element, D: Dimension> {
    storage: Storage,
    dim: D,
    /// Elements between neighbours along each axis; may be negative or zero.
    strides: Vec<isize>,
    /// Byte offset of element `[0, 0, …]` in the storage.
    origin: usize,
    _element: std::marker::PhantomData<T>,
}

impl<T: Element, D: Dimension> Clone for ShmArray<T, D> {
    fn clone(&self) -> Self {
        ShmArray {
            storage: self.storage.clone(),
            dim: self.dim.clone(),
            strides: self.strides.clone(),
            origin: self.origin,
            _element: std::marker::PhantomData,
        }
    }
}

impl<T: Element, D: Dimension> std::fmt::Debug for ShmArray<T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmArray")
            .field("dtype", &T::DTYPE)
            .field("shape", &self.shape())
            .field("strides", &self.strides)
            .field("origin", &self.origin)
            .field("storage", &self.storage)
            .finish()
    }
}

impl<T: Element, D: Dimension> ShmArray<T, D> {
    /// An array over a whole block whose content is `shape` elements in `order` (`C` or `F`).
    /// The block's content length must be exactly the array's bytes.
    pub fn from_block(
        block: Arc<ShmBlock>,
        shape: impl IntoDimension<Dim = D>,
        order: Order,
    ) -> Result<Self> {
        let dim = shape.into_dimension();
        let nbytes = byte_len::<T>(dim.slice())?;
        if block.len() != nbytes {
            return Err(layout(format!(
                "block {} holds {} bytes, shape {:?} of {} needs {nbytes}",
                block.name(),
                block.len(),
                dim.slice(),
                T::DTYPE.typestr()
            )));
        }
        let strides = contiguous_strides(dim.slice(), order, size_of::<T>())?;
        register_live(&block);
        Self::from_parts(Storage::Block(block), dim, &strides, 0)
    }

    /// Views an array that another program (numpy, say) wrote into a shared-memory segment,
    /// in place: the segment is attached read-only through `pool` and kept mapped for as long
    /// as the array (or a view of it) lives. Every number is checked against the segment as a
    /// peer's would be: the type string against `T`, the number of axes against `D`, and the
    /// elements' span and alignment against the segment's length. A view into the array sent
    /// on through a transport is copied into a block of ours (the segment is not one a peer
    /// may name). The name must lead to a regular file of this user with one name; see
    /// [`ShmPool::attach_segment`].
    ///
    /// # Safety
    ///
    /// The other program's segment is not sealed: the caller promises that, while the array
    /// or any view of it lives, the other program neither shrinks the segment (reading the
    /// lost pages would kill this process with SIGBUS) nor writes the elements (a `&T` would
    /// see them change) — as [`ShmPool::attach_segment`] requires.
    pub unsafe fn from_foreign(pool: &ShmPool, foreign: &ForeignArray) -> Result<Self> {
        let dim = checked_dim::<T, D>(&foreign.typestr, &foreign.shape)?;
        let strides = match &foreign.strides {
            Some(strides) => strides.clone(),
            None => contiguous_strides(dim.slice(), Order::C, size_of::<T>())?,
        };
        // SAFETY: the caller's promise is the one `attach_segment` asks for.
        let block = Arc::new(unsafe { pool.attach_segment(&foreign.name) }?);
        register_live(&block);
        Self::from_parts(Storage::Block(block), dim, &strides, foreign.offset)
    }

    /// Checks a layout against its storage and builds the array.
    pub(crate) fn from_parts(
        storage: Storage,
        dim: D,
        strides_bytes: &[i64],
        origin: u64,
    ) -> Result<Self> {
        let itemsize = size_of::<T>();
        let shape = dim.slice();
        if strides_bytes.len() != shape.len() {
            return Err(layout(format!(
                "{} strides for {} dimensions",
                strides_bytes.len(),
                shape.len()
            )));
        }
        let nbytes = byte_len::<T>(shape)?;
        let count = nbytes / itemsize.max(1);
        // An axis of length 0 or 1 never steps: its stride is never used, whatever the peer
        // wrote (i64::MIN included), so it is kept as 0.
        let strides_bytes: Vec<i64> = strides_bytes
            .iter()
            .zip(shape)
            .map(|(&stride, &len)| if len <= 1 { 0 } else { stride })
            .collect();
        let strides_bytes = strides_bytes.as_slice();
        let mut strides = Vec::with_capacity(shape.len());
        for &stride in strides_bytes {
            if stride % itemsize as i64 != 0 {
                return Err(CodecError::Misaligned {
                    offset: stride,
                    align: itemsize,
                });
            }
            strides.push(
                isize::try_from(stride / itemsize as i64)
                    .map_err(|_| layout(format!("stride {stride} does not fit this machine")))?,
            );
        }
        let array = |origin| ShmArray {
            storage: storage.clone(),
            dim: dim.clone(),
            strides: strides.clone(),
            origin,
            _element: std::marker::PhantomData,
        };
        if count == 0 {
            return Ok(array(0));
        }
        let bytes = storage.bytes();
        // Strides that alias elements (zero, or overlapping) could make a few bytes stand for
        // more elements than memory can hold once copied: no array has more elements than its
        // data has room for.
        if nbytes > bytes.len() {
            return Err(layout(format!(
                "{count} elements of {itemsize} bytes in data of {} bytes",
                bytes.len()
            )));
        }
        let (low, high) = extent(shape, strides_bytes, origin, itemsize);
        if low < 0 || high > bytes.len() as i128 {
            return Err(layout(format!(
                "elements span bytes {low}..{high} of data that holds {} bytes",
                bytes.len()
            )));
        }
        let (low, high) = (low as usize, high as usize);
        let start = bytes.as_ptr() as usize + origin as usize;
        if !start.is_multiple_of(align_of::<T>()) {
            return Err(CodecError::Misaligned {
                offset: origin as i64,
                align: align_of::<T>(),
            });
        }
        T::check(&bytes[low..high]).map_err(|(index, value)| CodecError::InvalidBool {
            index: index + low,
            value,
        })?;
        Ok(array(origin as usize))
    }

    /// A read-only ndarray view of the elements.
    pub fn view(&self) -> ArrayView<'_, T, D> {
        let itemsize = size_of::<T>();
        let bytes = self.storage.bytes();
        let shape = self.dim.slice();
        if shape.contains(&0) {
            let empty = ArrayView::from_shape(self.dim.clone(), &[]);
            return empty.expect("an empty shape fits an empty slice");
        }
        // The lowest address any element has: the origin moved back along negative strides.
        let back: isize = shape
            .iter()
            .zip(&self.strides)
            .map(|(&len, &stride)| (len as isize - 1) * stride.min(0))
            .sum();
        let low = (self.origin as isize + back * itemsize as isize) as usize;
        // Exactly the elements' span, which `from_parts` checked (bool bytes included): no
        // byte past it is ever seen as a `T`.
        let span: usize = shape
            .iter()
            .zip(&self.strides)
            .map(|(&len, &stride)| (len - 1) * stride.unsigned_abs())
            .sum::<usize>()
            + 1;
        let elements = cast::<T>(&bytes[low..low + span * itemsize])
            .expect("alignment and bounds checked when the array was built");
        let mut abs = D::zeros(shape.len());
        for (axis, stride) in self.strides.iter().enumerate() {
            abs[axis] = stride.unsigned_abs();
        }
        let mut view = ArrayView::from_shape(self.dim.clone().strides(abs), elements)
            .expect("layout checked when the array was built");
        for (axis, stride) in self.strides.iter().enumerate() {
            if *stride < 0 {
                view.invert_axis(ndarray::Axis(axis));
            }
        }
        view
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        self.dim.slice()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.dim.size()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How the elements lie in memory.
    pub fn order(&self) -> Order {
        array_order(&self.view())
    }

    /// The shared-memory block behind the array (`None` for a small array that travelled
    /// inline).
    pub fn block(&self) -> Option<&Arc<ShmBlock>> {
        match &self.storage {
            Storage::Block(block) => Some(block),
            Storage::Heap(_) => None,
        }
    }

    /// A copy in ordinary memory, to change or to keep after the block is released.
    pub fn to_owned(&self) -> ndarray::Array<T, D> {
        self.view().to_owned()
    }

    /// A slice of the array over the same memory (see `ndarray::s!`); encoding it sends a
    /// reference, not a copy.
    pub fn slice<I: SliceArg<D>>(&self, info: I) -> ShmArray<T, I::OutDim> {
        let view = self.view().slice_move(info);
        // An empty slice may point anywhere; its origin is never used.
        let origin = (view.as_ptr() as usize).wrapping_sub(self.storage.bytes().as_ptr() as usize);
        ShmArray {
            storage: self.storage.clone(),
            strides: view.strides().to_vec(),
            dim: view.raw_dim(),
            origin,
            _element: std::marker::PhantomData,
        }
    }

    /// The array with a dynamic number of dimensions.
    pub fn into_dyn(self) -> ShmArray<T, ndarray::IxDyn> {
        ShmArray {
            storage: self.storage,
            dim: self.dim.into_dyn(),
            strides: self.strides,
            origin: self.origin,
            _element: std::marker::PhantomData,
        }
    }

    pub(crate) fn meta(&self) -> ArrayMeta {
        let itemsize = size_of::<T>() as i64;
        ArrayMeta {
            typestr: T::DTYPE.typestr().to_owned(),
            shape: self.shape().iter().map(|&n| n as u64).collect(),
            strides: self.strides.iter().map(|&s| s as i64 * itemsize).collect(),
            origin: self.origin as u64,
        }
    }
}

/// Bytes of `shape` elements of `T`, with checked arithmetic.
fn byte_len<T: Element>(shape: &[usize]) -> Result<usize> {
    if shape.len() > MAX_NDIM {
        return Err(layout(format!(
            "{} dimensions, at most {MAX_NDIM} are supported",
            shape.len()
        )));
    }
    let product = |skip_zeros: bool| {
        shape
            .iter()
            .filter(|&&n| !(skip_zeros && n == 0))
            .try_fold(size_of::<T>(), |acc, &n| acc.checked_mul(n))
            .filter(|&bytes| bytes <= isize::MAX as usize)
    };
    // ndarray also needs the product of the non-zero lengths to fit, even when another axis
    // is empty: a shape like [0, 2^62] holds no element but cannot be viewed.
    match (product(false), product(true)) {
        (Some(bytes), Some(_)) => Ok(bytes),
        _ => Err(layout(format!(
            "shape {shape:?} of {} overflows",
            T::DTYPE.typestr()
        ))),
    }
}

/// The strides, in bytes, of a contiguous array in C or F order.
fn contiguous_strides(shape: &[usize], order: Order, itemsize: usize) -> Result<Vec<i64>> {
    let mut strides = vec![0i64; shape.len()];
    let mut step = itemsize as i64;
    let axes: Box<dyn Iterator<Item = usize>> = match order {
        Order::C => Box::new((0..shape.len()).rev()),
        Order::F => Box::new(0..shape.len()),
        Order::NonContiguous => {
            return Err(layout(
                "an array built from a block must be in C or F order",
            ));
        }
    };
    for axis in axes {
        strides[axis] = step;
        step = step.saturating_mul(shape[axis].max(1) as i64);
    }
    Ok(strides)
}

/// The bytes `low..high` that the elements of a non-empty array cover.
fn extent(shape: &[usize], strides: &[i64], origin: u64, itemsize: usize) -> (i128, i128) {
    let mut low = origin as i128;
    let mut high = origin as i128 + itemsize as i128;
    for (&len, &stride) in shape.iter().zip(strides) {
        let reach = (len as i128 - 1) * stride as i128;
        if reach < 0 {
            low += reach;
        } else {
            high += reach;
        }
    }
    (low, high)
}

impl<S: Data<Elem = T>, T: Element, D: Dimension> Encode for ArrayBase<S, D> {
    fn encode(&self, encoder: &Encoder) -> Result<Payload> {
        if let Some(payload) = encode_if_shared(&self.view()) {
            return Ok(payload);
        }
        let (order, meta, nbytes) = heap_meta(self)?;
        let itemsize = size_of::<T>();
        let write = |target: &mut [u8]| match order {
            Order::C => target.copy_from_slice(as_bytes(self.as_slice().unwrap_or_default())),
            Order::F => target.copy_from_slice(as_bytes(self.t().as_slice().unwrap_or_default())),
            Order::NonContiguous => {
                for (chunk, value) in target.chunks_exact_mut(itemsize).zip(self.iter()) {
                    chunk.copy_from_slice(as_bytes(std::slice::from_ref(value)));
                }
            }
        };
        if nbytes < encoder.inline_threshold {
            let mut inline = vec![0u8; nbytes];
            write(&mut inline);
            return Ok(Payload::new(ARRAY_CODEC, meta, Vec::new(), inline));
        }
        let mut block = encoder.pool().alloc(nbytes)?;
        write(block.as_mut_slice());
        Ok(Payload::new(
            ARRAY_CODEC,
            meta,
            vec![block.freeze()],
            Vec::new(),
        ))
    }

    /// A contiguous array on the heap, too large to go inline, as one block still to be
    /// written whose only piece is the array's own memory, lent for the call: a transport that
    /// copies it onto a socket anyway skips the copy into shared memory. `None` (encode as
    /// usual) for an array already in shared memory, a small one, or one whose elements are
    /// not contiguous.
    fn encode_unwritten(&self, encoder: &Encoder) -> Result<Option<Unwritten<'_>>> {
        let data = match array_order(self) {
            Order::C => self.as_slice(),
            Order::F if self.t().is_standard_layout() => self.as_slice_memory_order(),
            _ => None,
        };
        let Some(data) = data else {
            return Ok(None);
        };
        if encode_if_shared(&self.view()).is_some() {
            return Ok(None);
        }
        let (_, meta, nbytes) = heap_meta(self)?;
        if nbytes < encoder.inline_threshold || nbytes != std::mem::size_of_val(data) {
            return Ok(None);
        }
        let mut pieces = Pieces::new(nbytes);
        pieces.place(Arc::new(as_bytes(data)), 0)?;
        Ok(Some(Unwritten {
            codec: ARRAY_CODEC.into(),
            meta,
            inline: Vec::new(),
            sources: vec![Source::Pieces(pieces)],
        }))
    }
}

/// How an array not in shared memory is encoded: its order, its metadata (contiguous strides
/// from offset 0) and its bytes.
fn heap_meta<S: Data<Elem = T>, T: Element, D: Dimension>(
    array: &ArrayBase<S, D>,
) -> Result<(Order, Vec<u8>, usize)> {
    let order = array_order(array);
    let nbytes = byte_len::<T>(array.shape())?;
    let strides = contiguous_strides(
        array.shape(),
        if order == Order::F {
            Order::F
        } else {
            Order::C
        },
        size_of::<T>(),
    )?;
    let meta = Payload::encode_meta(&ArrayMeta {
        typestr: T::DTYPE.typestr().to_owned(),
        shape: array.shape().iter().map(|&n| n as u64).collect(),
        strides,
        origin: 0,
    })?;
    Ok((order, meta, nbytes))
}

/// A reference to the live block a view lies in, if it lies in one: no copy at all.
fn encode_if_shared<T: Element, D: Dimension>(view: &ArrayView<'_, T, D>) -> Option<Payload> {
    if view.is_empty() {
        return None;
    }
    let itemsize = size_of::<T>() as i64;
    let strides: Vec<i64> = view
        .strides()
        .iter()
        .map(|&s| s as i64 * itemsize)
        .collect();
    let first = view.as_ptr() as usize;
    let (low, high) = extent(view.shape(), &strides, first as u64, itemsize as usize);
    // A view whose strides alias elements (a broadcast) is copied: a reader refuses arrays
    // with more elements than their data holds.
    if (view.len() as i128).saturating_mul(itemsize as i128) > high - low {
        return None;
    }
    let block = find_live(usize::try_from(low).ok()?, usize::try_from(high).ok()?)?;
    let meta = ArrayMeta {
        typestr: T::DTYPE.typestr().to_owned(),
        shape: view.shape().iter().map(|&n| n as u64).collect(),
        strides,
        origin: (first - block.as_ptr() as usize) as u64,
    };
    let meta = Payload::encode_meta(&meta).ok()?;
    Some(Payload::new(ARRAY_CODEC, meta, vec![block], Vec::new()))
}

impl<T: Element, D: Dimension> Encode for ShmArray<T, D> {
    fn encode(&self, encoder: &Encoder) -> Result<Payload> {
        match &self.storage {
            Storage::Block(block) => {
                let meta = Payload::encode_meta(&self.meta())?;
                Ok(Payload::new(
                    ARRAY_CODEC,
                    meta,
                    vec![Arc::clone(block)],
                    Vec::new(),
                ))
            }
            Storage::Heap(_) => self.view().encode(encoder),
        }
    }
}

impl<T: Element, D: Dimension> Decode for ShmArray<T, D> {
    fn decode(payload: &Payload, decoder: &Decoder) -> Result<Self> {
        payload.expect_codec(ARRAY_CODEC)?;
        Self::decode_with(payload.decode_meta()?, payload, decoder, ARRAY_CODEC)
    }
}

impl<T: Element, D: Dimension> ShmArray<T, D> {
    /// Decodes an array from its metadata and the payload's data.
    pub(crate) fn decode_with(
        meta: ArrayMeta,
        payload: &Payload,
        decoder: &Decoder,
        codec: &'static str,
    ) -> Result<Self> {
        let dim = checked_dim::<T, D>(&meta.typestr, &meta.shape)?;
        let storage = match storage_of(payload, decoder, codec)? {
            // A byte of a bool must stay 0 or 1 after it is checked: a peer's is copied first.
            Storage::Block(block) if T::DTYPE == DType::Bool && decoder.must_copy(&block) => {
                Storage::Heap(Arc::new(HeapBytes::copy_of(block.as_slice())))
            }
            storage => storage,
        };
        Self::from_parts(storage, dim, &meta.strides, meta.origin)
    }
}

/// The dimensions of an array of `T` with `typestr` and `shape`, after checking both against
/// the array type asked for.
fn checked_dim<T: Element, D: Dimension>(typestr: &str, shape: &[u64]) -> Result<D> {
    let dtype = DType::from_typestr(typestr)?;
    if dtype != T::DTYPE {
        return Err(CodecError::WrongDtype {
            expected: T::DTYPE.typestr().to_owned(),
            found: typestr.to_owned(),
        });
    }
    if let Some(ndim) = D::NDIM
        && ndim != shape.len()
    {
        return Err(CodecError::WrongDimensions {
            expected: ndim,
            found: shape.len(),
        });
    }
    if shape.len() > MAX_NDIM {
        return Err(layout(format!("{} dimensions", shape.len())));
    }
    let mut dim = D::zeros(shape.len());
    for (axis, &len) in shape.iter().enumerate() {
        dim[axis] = usize::try_from(len)
            .map_err(|_| layout(format!("axis {axis} of length {len} does not fit")))?;
    }
    Ok(dim)
}

/// The data of a payload with at most one buffer: its block, attached, or its inline bytes.
pub(crate) fn storage_of(
    payload: &Payload,
    decoder: &Decoder,
    codec: &'static str,
) -> Result<Storage> {
    match payload.buffers() {
        [] => Ok(Storage::Heap(Arc::new(HeapBytes::copy_of(&payload.inline)))),
        [r] => Ok(Storage::Block(decoder.attach(r)?)),
        more => Err(CodecError::BufferCount {
            codec,
            expected: 1,
            found: more.len(),
        }),
    }
}

/// An array being produced in shared memory: allocated zeroed, filled through
/// [`view_mut`](Self::view_mut), then frozen into a [`ShmArray`] that is sent without a copy.
///
/// ```
/// use ndarray::Ix2;
/// use shm_codec::{Decoder, Encoder, ShmArray, ShmArrayMut};
/// use shm_core::ShmPool;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = ShmPool::new()?;
/// let mut a = ShmArrayMut::<f32, Ix2>::zeros(&pool, (1000, 3))?;
/// a.view_mut().column_mut(1).fill(1.5);
/// let a = a.freeze();
/// // Encoding a frozen array (or a slice of it) sends a reference to its block.
/// let payload = Encoder::new(pool.clone()).encode(&a.slice(ndarray::s![..10, ..]))?;
/// assert_eq!(payload.buffers()[0].name, a.block().unwrap().name());
/// let back: ShmArray<f32, Ix2> = Decoder::new(pool).decode(&payload)?;
/// assert_eq!(back.view()[[9, 1]], 1.5);
/// # Ok(())
/// # }
/// ```
pub struct ShmArrayMut<T: Element, D: Dimension> {
    block: ShmBlockMut,
    dim: D,
    fortran: bool,
    _element: std::marker::PhantomData<T>,
}

impl<T: Element, D: Dimension> std::fmt::Debug for ShmArrayMut<T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmArrayMut")
            .field("dtype", &T::DTYPE)
            .field("shape", &self.dim.slice())
            .field("fortran", &self.fortran)
            .field("block", &self.block)
            .finish()
    }
}

impl<T: Element, D: Dimension> ShmArrayMut<T, D> {
    /// A C-ordered array of zeros (`false` for bool) in a block of `pool`.
    pub fn zeros(pool: &ShmPool, shape: impl IntoDimension<Dim = D>) -> Result<Self> {
        Self::zeros_with_order(pool, shape, Order::C)
    }

    /// An array of zeros in C or F order.
    pub fn zeros_with_order(
        pool: &ShmPool,
        shape: impl IntoDimension<Dim = D>,
        order: Order,
    ) -> Result<Self> {
        let dim = shape.into_dimension();
        // Checks the order before allocating.
        contiguous_strides(dim.slice(), order, size_of::<T>())?;
        let mut block = pool.alloc(byte_len::<T>(dim.slice())?)?;
        block.as_mut_slice().fill(0);
        Ok(ShmArrayMut {
            block,
            dim,
            fortran: order == Order::F,
            _element: std::marker::PhantomData,
        })
    }

    /// The elements, for writing.
    pub fn view_mut(&mut self) -> ArrayViewMut<'_, T, D> {
        let bytes = self.block.as_mut_slice();
        let elements = cast_mut::<T>(bytes).unwrap_or_default();
        ArrayViewMut::from_shape(self.dim.clone().set_f(self.fortran), elements)
            .expect("the block was sized and aligned for this shape")
    }

    /// The finished array, read-only from now on.
    pub fn freeze(self) -> ShmArray<T, D> {
        let order = if self.fortran { Order::F } else { Order::C };
        let block = self.block.freeze();
        register_live(&block);
        let itemsize = size_of::<T>() as i64;
        let strides = contiguous_strides(self.dim.slice(), order, size_of::<T>())
            .unwrap_or_default()
            .iter()
            .map(|&s| (s / itemsize) as isize)
            .collect();
        ShmArray {
            storage: Storage::Block(block),
            strides,
            dim: self.dim,
            origin: 0,
            _element: std::marker::PhantomData,
        }
    }
}

/// The registry's array codec: accepts owned arrays and `ShmArray`s of every element type
/// (one to three dimensions, or dynamic), decodes to `ShmArray<T, IxDyn>`.
#[derive(Debug)]
pub(crate) struct ArrayCodec;

macro_rules! try_encode {
    ($value:expr, $encoder:expr, $($t:ty),*) => {$(
        if let Some(a) = $value.downcast_ref::<ndarray::ArrayD<$t>>() { return Some(a.encode($encoder)); }
        if let Some(a) = $value.downcast_ref::<ndarray::Array1<$t>>() { return Some(a.encode($encoder)); }
        if let Some(a) = $value.downcast_ref::<ndarray::Array2<$t>>() { return Some(a.encode($encoder)); }
        if let Some(a) = $value.downcast_ref::<ndarray::Array3<$t>>() { return Some(a.encode($encoder)); }
        if let Some(a) = $value.downcast_ref::<ShmArray<$t, ndarray::IxDyn>>() { return Some(a.encode($encoder)); }
        if let Some(a) = $value.downcast_ref::<ShmArray<$t, ndarray::Ix1>>() { return Some(a.encode($encoder)); }
        if let Some(a) = $value.downcast_ref::<ShmArray<$t, ndarray::Ix2>>() { return Some(a.encode($encoder)); }
        if let Some(a) = $value.downcast_ref::<ShmArray<$t, ndarray::Ix3>>() { return Some(a.encode($encoder)); }
    )*};
}

macro_rules! decode_dyn {
    ($dtype:expr, $payload:expr, $decoder:expr, $($d:ident => $t:ty),*) => {
        match $dtype {
            $(DType::$d => Ok(Box::new(ShmArray::<$t, ndarray::IxDyn>::decode($payload, $decoder)?)),)*
        }
    };
}

impl Codec for ArrayCodec {
    fn name(&self) -> &str {
        ARRAY_CODEC
    }

    fn encode(&self, value: &dyn std::any::Any, encoder: &Encoder) -> Option<Result<Payload>> {
        use num_complex::Complex;
        try_encode!(
            value,
            encoder,
            bool,
            i8,
            i16,
            i32,
            i64,
            u8,
            u16,
            u32,
            u64,
            f32,
            f64,
            Complex<f32>,
            Complex<f64>
        );
        None
    }

    fn decode(&self, payload: &Payload, decoder: &Decoder) -> Result<AnyValue> {
        use num_complex::Complex;
        let meta: ArrayMeta = payload.decode_meta()?;
        decode_dyn!(
            DType::from_typestr(&meta.typestr)?, payload, decoder,
            Bool => bool, I8 => i8, I16 => i16, I32 => i32, I64 => i64,
            U8 => u8, U16 => u16, U32 => u32, U64 => u64, F32 => f32, F64 => f64,
            C64 => Complex<f32>, C128 => Complex<f64>
        )
    }
}
