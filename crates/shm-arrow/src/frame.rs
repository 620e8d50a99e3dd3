//! The per-column frame: a `RecordBatch` whose every buffer lives in shared memory.
//!
//! Each column is laid out in a block of its own: its validity bitmap, offsets, values,
//! children and dictionary, each at a 64-byte aligned offset (the block's size counts the
//! padding). The schema travels as an Arrow IPC schema message; a tree of nodes per column
//! says where each buffer is. A buffer that already lies in a live block (a column of a batch
//! that was itself decoded from shared memory) is referenced where it is, not copied.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::GenericByteViewArray;
use arrow::array::{
    Array, ArrayData, ArrayDataBuilder, ArrayRef, AsArray, BufferSpec, MutableArrayData,
    RecordBatch, RecordBatchOptions, layout, make_array,
};
use arrow::buffer::{BooleanBuffer, Buffer, NullBuffer};
use arrow::datatypes::{ByteViewType, DataType, Schema};
use arrow::error::ArrowError;
use serde::{Deserialize, Serialize};
use shm_codec::{
    AnyValue, Codec, CodecError, Decode, Decoder, Encode, Encoder, Payload, Pieces, Source,
    Unwritten,
};
use shm_core::{BLOCK_ALIGN, ShmBlock};

use crate::buffer::block_buffer;

/// The codec name of per-column frames.
pub const COLUMNS_CODEC: &str = "arrow-columns";

/// A `RecordBatch` carried as a per-column frame. Decoding gives a batch whose buffers point
/// into the sender's blocks; encoding a batch decoded this way copies only the columns that
/// changed.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnFrame(pub RecordBatch);

#[derive(Serialize, Deserialize)]
struct FrameMeta {
    /// The schema as an Arrow IPC `Message` flatbuffer whose header is the schema.
    schema: Vec<u8>,
    rows: u64,
    columns: Vec<Node>,
}

/// Where the parts of one array (an `ArrayData`) are.
#[derive(Serialize, Deserialize)]
struct Node {
    len: u64,
    offset: u64,
    nulls: Option<Nulls>,
    buffers: Vec<BufRef>,
    children: Vec<Node>,
}

#[derive(Serialize, Deserialize)]
struct Nulls {
    bits: BufRef,
    bit_offset: u64,
    null_count: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
struct BufRef {
    /// Index into the payload's buffers.
    block: u32,
    offset: u64,
    len: u64,
}

fn invalid(reason: impl Into<String>) -> CodecError {
    CodecError::InvalidData {
        codec: COLUMNS_CODEC,
        reason: reason.into(),
    }
}

/// Marks a buffer planned for the column's new block, before the block has its index.
const NEW_BLOCK: u32 = u32::MAX;

/// The blocks a frame refers to, and the buffers still to be copied into the column's new block.
#[derive(Default)]
struct Plan {
    /// What fills each block the frame names: a live block, or the pieces of a new one.
    sources: Vec<Source<'static>>,
    /// The index in `blocks` of each block, by its address: a frame of many columns finds
    /// the block of each buffer in constant time.
    indices: HashMap<usize, u32>,
    copies: Vec<(Buffer, u64)>,
    cursor: u64,
}

impl Plan {
    /// Where `buffer` will be: in the live block it already lies in, or at the next aligned
    /// offset of the column's new block (marked [`NEW_BLOCK`] until it has an index).
    fn place(&mut self, encoder: &Encoder, buffer: &Buffer) -> BufRef {
        if let Some(block) = encoder.block_holding(buffer.as_ptr(), buffer.len()) {
            let next = self.sources.len() as u32;
            let index = *self
                .indices
                .entry(Arc::as_ptr(&block) as usize)
                .or_insert(next);
            if index == next {
                self.sources.push(Source::Block(Arc::clone(&block)));
            }
            return BufRef {
                block: index,
                offset: (buffer.as_ptr() as usize - block.as_ptr() as usize) as u64,
                len: buffer.len() as u64,
            };
        }
        let offset = self.cursor.next_multiple_of(BLOCK_ALIGN as u64);
        self.cursor = offset + buffer.len() as u64;
        self.copies.push((buffer.clone(), offset));
        BufRef {
            block: NEW_BLOCK,
            offset,
            len: buffer.len() as u64,
        }
    }

    fn node(&mut self, encoder: &Encoder, data: &ArrayData) -> Node {
        let nulls = data.nulls().map(|nulls| Nulls {
            bits: self.place(encoder, nulls.inner().inner()),
            bit_offset: nulls.offset() as u64,
            null_count: nulls.null_count() as u64,
        });
        Node {
            len: data.len() as u64,
            offset: data.offset() as u64,
            nulls,
            buffers: data
                .buffers()
                .iter()
                .map(|b| self.place(encoder, b))
                .collect(),
            children: data
                .child_data()
                .iter()
                .map(|c| self.node(encoder, c))
                .collect(),
        }
    }
}

impl Encode for ColumnFrame {
    fn encode(&self, encoder: &Encoder) -> shm_codec::Result<Payload> {
        self.plan(encoder)?.write(encoder)
    }

    /// The frame with the columns it would copy left where they are: a transport that sends
    /// them over a socket writes them from there (shm-flight's data connections).
    fn encode_unwritten(&self, encoder: &Encoder) -> shm_codec::Result<Option<Unwritten<'_>>> {
        self.plan(encoder).map(Some)
    }
}

impl ColumnFrame {
    /// The frame's metadata and what fills each of its blocks: the live blocks its buffers
    /// already lie in, and for the rest, new blocks as the pieces that go into them.
    fn plan(&self, encoder: &Encoder) -> shm_codec::Result<Unwritten<'static>> {
        let batch = &self.0;
        let schema = arrow::ipc::writer::IpcDataGenerator::default()
            .schema_to_bytes_with_dictionary_tracker(
                batch.schema().as_ref(),
                &mut arrow::ipc::writer::DictionaryTracker::new(false),
                &arrow::ipc::writer::IpcWriteOptions::default(),
            )
            .ipc_message;
        let mut plan = Plan::default();
        let mut columns = Vec::with_capacity(batch.num_columns());
        // Columns copied into shared memory share blocks of up to `PACKED_BLOCK` bytes (a
        // column larger than that has a block of its own): a frame of 100,000 narrow columns
        // is a few dozen blocks, not 100,000, while a value kept from one column holds at most
        // one such block beyond its own bytes.
        let mut packed = Packing::default();
        for column in batch.columns() {
            let start = plan.copies.len();
            plan.cursor = 0;
            let mut node = plan.node(encoder, &compact_if_copied(encoder, column));
            if plan.copies.len() > start {
                let base = packed.cursor.next_multiple_of(BLOCK_ALIGN as u64);
                if packed.columns.is_empty() || base + plan.cursor <= PACKED_BLOCK {
                    each_ref_in(&mut node, NEW_BLOCK, &mut |r| r.offset += base);
                    for (_, offset) in &mut plan.copies[start..] {
                        *offset += base;
                    }
                    packed.cursor = base + plan.cursor;
                } else {
                    packed.flush(&mut plan, start, &mut columns)?;
                    packed.cursor = plan.cursor;
                }
                packed.columns.push(columns.len());
            }
            columns.push(node);
        }
        let end = plan.copies.len();
        packed.flush(&mut plan, end, &mut columns)?;
        let meta = Payload::encode_meta(&FrameMeta {
            schema,
            rows: batch.num_rows() as u64,
            columns,
        })?;
        Ok(Unwritten {
            codec: COLUMNS_CODEC.into(),
            meta,
            inline: Vec::new(),
            sources: plan.sources,
        })
    }
}

/// An Arrow buffer as the bytes of a piece of an unwritten block (it keeps them alive).
struct ArrowBytes(Buffer);

impl AsRef<[u8]> for ArrowBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// The column's data as it will be placed: as it is when every buffer already lies in a live
/// block (referenced, nothing copied); otherwise — it is copied anyway — only the slice's own
/// range of values, offsets rebased to start at zero, when the slice uses less than its
/// buffers hold (a 10-row slice of a 100,000-row string column carries 10 strings, not all).
fn compact_if_copied(encoder: &Encoder, column: &ArrayRef) -> ArrayData {
    let data = column.to_data();
    if is_shared(encoder, &data) {
        return data;
    }
    // Arrow's size arithmetic panics on invalid offsets (which a batch built unchecked may
    // have): such a batch is sent whole, and its receiver's validation refuses it.
    let compacted = crate::contain(|| {
        // Arrow counts every data buffer of a view array as the slice's: a view array is
        // compacted when its views use fewer bytes than its data buffers hold.
        let wasteful = match column.data_type() {
            DataType::Utf8View => views_waste(column.as_string_view()),
            DataType::BinaryView => views_waste(column.as_binary_view()),
            _ => data.get_slice_memory_size().unwrap_or(usize::MAX) < held_bytes(&data),
        };
        if !wasteful {
            return Ok(data.clone());
        }
        Ok(match column.data_type() {
            DataType::Utf8View => compact_views(column.as_string_view()),
            DataType::BinaryView => compact_views(column.as_binary_view()),
            _ => {
                let mut copy = MutableArrayData::new(vec![&data], false, data.len());
                copy.try_extend(0, 0, data.len())
                    .map_err(|e| invalid(e.to_string()))?;
                copy.freeze()
            }
        })
    });
    // A layout arrow cannot copy piecewise is sent whole: correct, only larger.
    compacted.unwrap_or(data)
}

/// The bytes of `data`'s buffers (validity, children and all) that an encoder would copy:
/// their lengths, not their capacities (a builder's buffer has spare capacity that is never
/// copied, so it is no reason to compact).
fn held_bytes(data: &ArrayData) -> usize {
    data.nulls().map_or(0, |n| n.buffer().len())
        + data.buffers().iter().map(Buffer::len).sum::<usize>()
        + data.child_data().iter().map(held_bytes).sum::<usize>()
}

/// Whether a view array's data buffers hold bytes none of its views use.
fn views_waste<T: ByteViewType + ?Sized>(array: &GenericByteViewArray<T>) -> bool {
    // A view of at most 12 bytes holds them inline; a longer one points into a data buffer.
    let used: usize = array
        .views()
        .iter()
        .map(|&view| view as u32 as usize)
        .filter(|&len| len > 12)
        .sum();
    let held: usize = array.data_buffers().iter().map(Buffer::len).sum();
    used < held
}

/// A view array with only the bytes its views use, and a validity bitmap of its own length:
/// views point anywhere into their data buffers, so only garbage collection drops the rest.
fn compact_views<T: ByteViewType + ?Sized>(array: &GenericByteViewArray<T>) -> ArrayData {
    let (views, buffers, _) = array.gc().into_parts();
    let nulls = array
        .nulls()
        .map(|nulls| NullBuffer::new(nulls.iter().collect()));
    GenericByteViewArray::<T>::new(views, buffers, nulls).into_data()
}

/// Whether every buffer of `data` (validity, children and all) lies in a live block.
fn is_shared(encoder: &Encoder, data: &ArrayData) -> bool {
    let live = |b: &Buffer| encoder.block_holding(b.as_ptr(), b.len()).is_some();
    data.nulls().is_none_or(|n| live(n.inner().inner()))
        && data.buffers().iter().all(live)
        && data.child_data().iter().all(|c| is_shared(encoder, c))
}

/// Points the buffers planned for the column's new block (`from`) at its index.
/// The largest block that narrow columns copied into shared memory share.
const PACKED_BLOCK: u64 = 256 << 10;

/// Columns planned into the next shared block: their copies are `plan.copies[first_copy..]`,
/// at offsets up to `cursor`.
#[derive(Default)]
struct Packing {
    columns: Vec<usize>,
    first_copy: usize,
    cursor: u64,
}

impl Packing {
    /// Plans a block of their own for the planned columns (`plan.copies[first_copy..end]`)
    /// and points them at it; the next block's copies start at `end`.
    fn flush(
        &mut self,
        plan: &mut Plan,
        end: usize,
        columns: &mut [Node],
    ) -> shm_codec::Result<()> {
        if self.columns.is_empty() {
            return Ok(());
        }
        let mut pieces = Pieces::new(self.cursor as usize);
        for (buffer, offset) in &plan.copies[self.first_copy..end] {
            pieces.place(Arc::new(ArrowBytes(buffer.clone())), *offset as usize)?;
        }
        plan.sources.push(Source::Pieces(pieces));
        let index = plan.sources.len() as u32 - 1;
        for &column in &self.columns {
            each_ref_in(&mut columns[column], NEW_BLOCK, &mut |r| r.block = index);
        }
        self.columns.clear();
        self.first_copy = end;
        self.cursor = 0;
        Ok(())
    }
}

/// Calls `fix` on every buffer reference of `node` and its children that names `block`.
fn each_ref_in(node: &mut Node, block: u32, fix: &mut impl FnMut(&mut BufRef)) {
    let refs = node
        .buffers
        .iter_mut()
        .chain(node.nulls.as_mut().map(|n| &mut n.bits));
    refs.filter(|r| r.block == block).for_each(&mut *fix);
    for child in &mut node.children {
        each_ref_in(child, block, fix);
    }
}

impl Decode for ColumnFrame {
    fn decode(payload: &Payload, decoder: &Decoder) -> shm_codec::Result<Self> {
        decode_batch(payload, decoder, None, true).map(ColumnFrame)
    }
}

/// Decodes only the columns at `projection` (in that order), without touching the others'
/// blocks.
///
/// ```
/// use std::sync::Arc;
/// use arrow::array::{Int64Array, RecordBatch, StringArray};
/// use shm_arrow::{ColumnFrame, decode_projection, decode_trusted};
/// use shm_codec::{Decoder, Encoder};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = shm_core::ShmPool::new()?;
/// let batch = RecordBatch::try_from_iter([
///     ("id", Arc::new(Int64Array::from(vec![1, 2])) as _),
///     ("name", Arc::new(StringArray::from(vec!["a", "b"])) as _),
/// ])?;
/// let payload = Encoder::new(pool.clone()).encode(&ColumnFrame(batch.clone()))?;
/// let decoder = Decoder::new(pool);
/// let names = decode_projection(&payload, &decoder, &[1])?;
/// assert_eq!(names.schema().field(0).name(), "name");
/// // SAFETY: this process wrote the payload: its Arrow data is valid.
/// let whole = unsafe { decode_trusted(&payload, &decoder)? };
/// assert_eq!(whole, batch);
/// # Ok(())
/// # }
/// ```
pub fn decode_projection(
    payload: &Payload,
    decoder: &Decoder,
    projection: &[usize],
) -> shm_codec::Result<RecordBatch> {
    decode_batch(payload, decoder, Some(projection), true)
}

/// Decodes a frame without Arrow's O(data) content checks (UTF-8, offsets, dictionary keys);
/// the O(1)-per-buffer structural checks remain. Decoding then costs time proportional to the
/// number of columns, not rows.
///
/// # Safety
///
/// The peer must be trusted to have written valid Arrow data: invalid offsets or dictionary
/// keys in an unchecked batch are undefined behaviour when the batch is read.
pub unsafe fn decode_trusted(
    payload: &Payload,
    decoder: &Decoder,
) -> shm_codec::Result<RecordBatch> {
    decode_batch(payload, decoder, None, false)
}

fn decode_batch(
    payload: &Payload,
    decoder: &Decoder,
    projection: Option<&[usize]>,
    validate: bool,
) -> shm_codec::Result<RecordBatch> {
    crate::contain(|| decode_unguarded(payload, decoder, projection, validate))
}

fn decode_unguarded(
    payload: &Payload,
    decoder: &Decoder,
    projection: Option<&[usize]>,
    validate: bool,
) -> shm_codec::Result<RecordBatch> {
    payload.expect_codec(COLUMNS_CODEC)?;
    let meta: FrameMeta = payload.decode_meta()?;
    let schema = arrow::ipc::convert::try_schema_from_flatbuffer_bytes(&meta.schema)
        .map_err(|e| invalid(format!("schema: {e}")))?;
    if schema.fields().len() != meta.columns.len() {
        return Err(invalid(format!(
            "{} fields and {} columns",
            schema.fields().len(),
            meta.columns.len()
        )));
    }
    let chosen: Vec<usize> = match projection {
        Some(p) => p.to_vec(),
        None => (0..meta.columns.len()).collect(),
    };
    let mut blocks: Vec<Option<Arc<ShmBlock>>> = vec![None; payload.buffers().len()];
    let mut fields = Vec::with_capacity(chosen.len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(chosen.len());
    for &i in &chosen {
        let (Some(field), Some(node)) = (schema.fields().get(i), meta.columns.get(i)) else {
            return Err(invalid(format!("column {i} of {}", meta.columns.len())));
        };
        let mut context = BuildContext {
            payload,
            decoder,
            blocks: &mut blocks,
            validate,
        };
        let data = context.build(node, field.data_type(), false)?;
        fields.push(Arc::clone(field));
        columns.push(make_array(data));
    }
    let rows = usize::try_from(meta.rows).map_err(|_| invalid(format!("{} rows", meta.rows)))?;
    let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    RecordBatch::try_new_with_options(
        schema,
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(|e| invalid(e.to_string()))
}

struct BuildContext<'a> {
    payload: &'a Payload,
    decoder: &'a Decoder,
    blocks: &'a mut Vec<Option<Arc<ShmBlock>>>,
    validate: bool,
}

impl BuildContext<'_> {
    /// The buffer `r` names, in place — or, if `checked` (its bytes carry an invariant that
    /// validation checks) and the block is a peer's that the decoder copies, as a copy in this
    /// process, so that a peer rewriting its block cannot make a checked buffer invalid.
    fn buffer(&mut self, r: BufRef, checked: bool) -> shm_codec::Result<Buffer> {
        let index = r.block as usize;
        let Some(slot) = self.blocks.get_mut(index) else {
            return Err(invalid(format!(
                "buffer in block {index} of {}",
                self.payload.buffers().len()
            )));
        };
        let block = match slot {
            Some(block) => Arc::clone(block),
            None => {
                let block = self.decoder.attach(&self.payload.buffers()[index])?;
                *slot = Some(Arc::clone(&block));
                block
            }
        };
        let buffer = block_buffer(&block, r.offset, r.len)?;
        if checked && self.decoder.must_copy(&block) {
            return Ok(Buffer::from_slice_ref(buffer.as_slice()));
        }
        Ok(buffer)
    }

    /// The array `node` describes. `within_checked` when a parent's validity depends on this
    /// node's values (run ends), so its buffers are copied like offsets are.
    fn build(
        &mut self,
        node: &Node,
        data_type: &DataType,
        within_checked: bool,
    ) -> shm_codec::Result<ArrayData> {
        // Arrow's layout tables assume sizes that a schema from outside may not have.
        if let DataType::FixedSizeBinary(size) | DataType::FixedSizeList(_, size) = data_type
            && *size < 0
        {
            return Err(invalid(format!("{data_type} has a negative size")));
        }
        let child_types: Vec<&DataType> = match data_type {
            DataType::List(f)
            | DataType::LargeList(f)
            | DataType::ListView(f)
            | DataType::LargeListView(f)
            | DataType::FixedSizeList(f, _)
            | DataType::Map(f, _) => vec![f.data_type()],
            DataType::Struct(fields) => fields.iter().map(|f| f.data_type()).collect(),
            DataType::Dictionary(_, values) => vec![values.as_ref()],
            DataType::RunEndEncoded(runs, values) => vec![runs.data_type(), values.data_type()],
            DataType::Union(fields, _) => fields.iter().map(|(_, f)| f.data_type()).collect(),
            _ => Vec::new(),
        };
        if child_types.len() != node.children.len() {
            return Err(invalid(format!(
                "{data_type} needs {} children, the frame has {}",
                child_types.len(),
                node.children.len()
            )));
        }
        let len = usize::try_from(node.len).map_err(|_| invalid("length"))?;
        let offset = usize::try_from(node.offset).map_err(|_| invalid("offset"))?;
        let nulls = match &node.nulls {
            None => None,
            Some(nulls) => {
                // Any bits are a valid bitmap: read in place.
                let bits = self.buffer(nulls.bits, false)?;
                let bit_offset =
                    usize::try_from(nulls.bit_offset).map_err(|_| invalid("bit offset"))?;
                let fits = bit_offset
                    .checked_add(len)
                    .is_some_and(|end| end <= bits.len().saturating_mul(8));
                if !fits {
                    return Err(invalid(format!(
                        "validity of {len} bits at bit {bit_offset} in {} bytes",
                        bits.len()
                    )));
                }
                let bits = BooleanBuffer::new(bits, bit_offset, len);
                Some(if self.validate {
                    NullBuffer::new(bits)
                } else {
                    let count =
                        usize::try_from(nulls.null_count).map_err(|_| invalid("null count"))?;
                    if count > len {
                        return Err(invalid(format!("{count} nulls in {len} values")));
                    }
                    // SAFETY: the caller of `decode_trusted` vouches for the peer's data; the
                    // count is at most the length, so no arithmetic on it can go wrong here.
                    unsafe { NullBuffer::new_unchecked(bits, count) }
                })
            }
        };
        let checked = within_checked || carries_invariants(data_type);
        let buffers = node
            .buffers
            .iter()
            .map(|r| self.buffer(*r, checked))
            .collect::<shm_codec::Result<Vec<_>>>()?;
        // Arrow's validation views fixed-width buffers as typed slices, and panics on one that
        // is misaligned or not a whole number of elements: check both first.
        for (i, (buffer, spec)) in buffers.iter().zip(&layout(data_type).buffers).enumerate() {
            if let BufferSpec::FixedWidth {
                byte_width,
                alignment,
            } = spec
                && (!(buffer.as_ptr() as usize).is_multiple_of(*alignment)
                    || !buffer.len().is_multiple_of(*byte_width))
            {
                return Err(invalid(format!(
                    "buffer {i} of a {data_type} column: {} bytes at an address that must be \
                     aligned to {alignment} and a length that must be a multiple of {byte_width}",
                    buffer.len()
                )));
            }
        }
        let run_ends = matches!(data_type, DataType::RunEndEncoded(..));
        let children = node
            .children
            .iter()
            .zip(child_types)
            .map(|(child, t)| self.build(child, t, within_checked || run_ends))
            .collect::<shm_codec::Result<Vec<_>>>()?;
        let builder = ArrayDataBuilder::new(data_type.clone())
            .len(len)
            .offset(offset)
            .nulls(nulls)
            .buffers(buffers)
            .child_data(children);
        if self.validate {
            validated(builder, data_type).map_err(|e| invalid(e.to_string()))
        } else {
            // SAFETY: the caller of `decode_trusted` vouches that the peer wrote valid Arrow
            // content; the structure is checked right below.
            let data = unsafe { builder.build_unchecked() };
            // The O(1) structural checks (buffer counts and sizes against length and offset,
            // children) run even for trusted peers: only the O(data) content checks are
            // skipped, so a truncated or mislabelled buffer is an error, not a read out of
            // bounds.
            data.validate().map_err(|e| invalid(e.to_string()))?;
            Ok(data)
        }
    }
}

/// Builds `builder`'s array with Arrow's full validation of its own level (children are
/// built, so validated, before it) — for string and dictionary columns, the same checks in
/// fewer passes.
///
/// Arrow checks a string column offset by offset (each in bounds, each no less than the one
/// before, each on a character boundary of the values, which it reads as UTF-8 once), and a
/// dictionary column key by key (each null or within the dictionary), one branch per item.
/// Those loops were most of a worker's time to read a million-row batch. Here the string
/// conditions are checked in three tight loops (see [`check_string_offsets`]) and the keys in
/// one that ignores nulls: if every key is within the dictionary, null ones too, the column is
/// valid, and otherwise Arrow's own check says which is wrong, or that only null keys are. All
/// other checks are Arrow's. The tests `strings_are_refused_as_arrow_refuses_them` and
/// `keys_are_refused_as_arrow_refuses_them` hold both to Arrow's verdict on every array they
/// make.
pub(crate) fn validated(
    builder: ArrayDataBuilder,
    data_type: &DataType,
) -> Result<ArrayData, ArrowError> {
    if !matches!(
        data_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Dictionary(..)
    ) {
        return builder.build();
    }
    // SAFETY: nothing reads the array's contents before the checks below, which are those
    // of `build` (`validate_data`: `validate`, `validate_nulls`, `validate_values`), the last
    // done here in its stead; an array that fails one is dropped unread.
    let data = unsafe { builder.build_unchecked() };
    data.validate()?;
    data.validate_nulls()?;
    match data_type {
        DataType::Utf8 => check_string_offsets::<i32>(&data)?,
        DataType::LargeUtf8 => check_string_offsets::<i64>(&data)?,
        _ if keys_within_dictionary(&data) => {}
        _ => data.validate_values()?,
    }
    Ok(data)
}

/// Whether every key of a dictionary column whose structure `validate` has checked, null or
/// not, is a position in its dictionary (a negative key, wrapped to a huge one, is not).
fn keys_within_dictionary(data: &ArrayData) -> bool {
    fn below<K: arrow::datatypes::ArrowNativeType>(data: &ArrayData, bound: usize) -> bool {
        let keys: &[K] = data.buffer(0);
        // One comparison a key and no branch: no early exit to predict.
        keys.get(..data.len())
            .is_some_and(|keys| keys.iter().fold(true, |ok, k| ok & (k.as_usize() < bound)))
    }
    let (DataType::Dictionary(key, _), Some(values)) =
        (data.data_type(), data.child_data().first())
    else {
        return false;
    };
    let bound = values.len();
    match key.as_ref() {
        DataType::Int8 => below::<i8>(data, bound),
        DataType::Int16 => below::<i16>(data, bound),
        DataType::Int32 => below::<i32>(data, bound),
        DataType::Int64 => below::<i64>(data, bound),
        DataType::UInt8 => below::<u8>(data, bound),
        DataType::UInt16 => below::<u16>(data, bound),
        DataType::UInt32 => below::<u32>(data, bound),
        DataType::UInt64 => below::<u64>(data, bound),
        _ => false,
    }
}

/// What Arrow's `validate_values` checks of a string column whose structure `validate` has
/// checked (so that its offsets buffer holds `offset + len + 1` aligned offsets, or none for
/// an empty column): every offset from the array's first to its last is at least 0, at most
/// the length of the values, and no less than the one before; the values between the first
/// and the last offset are UTF-8, and every offset falls on a character boundary of them —
/// which makes each string UTF-8, and is what each string being UTF-8 requires.
fn check_string_offsets<O>(data: &ArrayData) -> Result<(), ArrowError>
where
    O: arrow::datatypes::ArrowNativeType + Into<i64>,
{
    let fail = |what: String| Err(ArrowError::InvalidArgumentError(what));
    let buffers = data.buffers();
    let (Some(offsets), Some(values)) = (buffers.first(), buffers.get(1)) else {
        return fail("a string column without its two buffers".into());
    };
    if data.is_empty() && offsets.is_empty() {
        return Ok(());
    }
    let offsets: &[O] = offsets.typed_data();
    let Some(offsets) = offsets.get(data.offset()..=data.offset() + data.len()) else {
        return fail(format!(
            "{} offsets for {} strings at offset {}",
            offsets.len(),
            data.len(),
            data.offset()
        ));
    };
    let values = values.as_slice();
    let at = |o: &O| -> i64 { (*o).into() };
    let (first, last) = (at(&offsets[0]), at(&offsets[offsets.len() - 1]));
    // Branch-free, so that the compiler runs it over whole vectors: what Arrow's per-offset
    // checks of bounds and order come down to once the ends are known.
    let ascending = offsets
        .iter()
        .zip(&offsets[1..])
        .fold(true, |ok, (a, b)| ok & (at(a) <= at(b)));
    if first < 0 || last > values.len() as i64 || !ascending {
        return fail(format!(
            "string offsets from {first} to {last}, not ascending within the {} bytes of \
             their values",
            values.len()
        ));
    }
    // In bounds and ascending, so `0 <= first <= last <= values.len()` (`get` rather than
    // an index all the same: memory a peer shares can change between two reads).
    let (first, last) = (first as usize, last as usize);
    let Some(span) = values.get(first..last) else {
        return fail(format!(
            "string offsets from {first} to {last} changed while read"
        ));
    };
    let text = std::str::from_utf8(span)
        .map_err(|e| ArrowError::InvalidArgumentError(format!("strings not UTF-8: {e}")))?;
    if let Some(at) = offsets
        .iter()
        // Wrapping, not panicking, should the bytes change under us: an offset then outside
        // the text is no character boundary, and the column is refused.
        .map(|o| (at(o) as usize).wrapping_sub(first))
        .find(|&o| !text.is_char_boundary(o))
    {
        return fail(format!(
            "a string offset at byte {} falls inside a character",
            at.wrapping_add(first)
        ));
    }
    Ok(())
}

/// Whether a node of `data_type` has buffers whose bytes must hold an invariant that Arrow's
/// validation checks and its readers then rely on: offsets, string bytes, dictionary keys,
/// union type ids, views. Numbers, bitmaps and fixed-size bytes are valid whatever they hold.
fn carries_invariants(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::List(_)
            | DataType::LargeList(_)
            | DataType::ListView(_)
            | DataType::LargeListView(_)
            | DataType::Map(..)
            | DataType::Dictionary(..)
            | DataType::Union(..)
            | DataType::RunEndEncoded(..)
    )
}

/// The registry's codec for [`ColumnFrame`]s (register it with
/// `registry.register(ColumnsCodec)`).
#[derive(Debug)]
pub struct ColumnsCodec;

impl Codec for ColumnsCodec {
    fn name(&self) -> &str {
        COLUMNS_CODEC
    }

    fn encode(
        &self,
        value: &dyn std::any::Any,
        encoder: &Encoder,
    ) -> Option<shm_codec::Result<Payload>> {
        if let Some(frame) = value.downcast_ref::<ColumnFrame>() {
            return Some(frame.encode(encoder));
        }
        value
            .downcast_ref::<RecordBatch>()
            .map(|batch| ColumnFrame(batch.clone()).encode(encoder))
    }

    fn decode(&self, payload: &Payload, decoder: &Decoder) -> shm_codec::Result<AnyValue> {
        Ok(Box::new(ColumnFrame::decode(payload, decoder)?.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pieces of string bytes: ASCII, characters of two, three and four bytes, and bytes that
    /// are no UTF-8 (a lone continuation byte, 0xff, a cut four-byte character).
    const PIECES: [&[u8]; 8] = [
        b"a",
        b"xyz",
        "\u{e9}".as_bytes(),
        "\u{20ac}".as_bytes(),
        "\u{1f600}".as_bytes(),
        &[0x80],
        &[0xff],
        &[0xf0, 0x9f],
    ];

    fn column(
        large: bool,
        values: &[u8],
        offsets: &[i64],
        offset: usize,
        nulls: Option<Vec<bool>>,
    ) -> (ArrayDataBuilder, DataType) {
        let (data_type, offsets) = if large {
            (DataType::LargeUtf8, Buffer::from_slice_ref(offsets))
        } else {
            let narrow: Vec<i32> = offsets.iter().map(|o| *o as i32).collect();
            (DataType::Utf8, Buffer::from_slice_ref(&narrow))
        };
        let len = offsets.len() / if large { 8 } else { 4 };
        let len = len.saturating_sub(1 + offset);
        let nulls = nulls.map(|bits| {
            let bits: Vec<bool> = bits.into_iter().cycle().take(offset + len).collect();
            NullBuffer::from(bits).slice(offset, len)
        });
        let builder = ArrayDataBuilder::new(data_type.clone())
            .len(len)
            .offset(offset)
            .nulls(nulls)
            .buffers(vec![offsets, Buffer::from_slice_ref(values)]);
        (builder, data_type)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The string check refuses exactly what Arrow's own validation refuses, and what it
        /// accepts is the array Arrow would have built: offsets ascending or not, in bounds or
        /// not, on character boundaries or not, over UTF-8 or not, with an offset into the
        /// column and with nulls.
        #[test]
        fn strings_are_refused_as_arrow_refuses_them(
            large in any::<bool>(),
            pieces in proptest::collection::vec(0..PIECES.len(), 0..12),
            valid_only in any::<bool>(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 1..10),
            sorted in any::<bool>(),
            skew in -2i64..=2,
            first_skew in -2i64..=0,
            offset in 0usize..3,
            nulls in proptest::option::of(proptest::collection::vec(any::<bool>(), 1..8)),
        ) {
            let values: Vec<u8> = pieces
                .iter()
                .filter(|&&p| !valid_only || p < 5)
                .flat_map(|&p| PIECES[p].iter().copied())
                .collect();
            let mut offsets: Vec<i64> = cuts
                .iter()
                .map(|c| c.index(values.len() + 1) as i64)
                .collect();
            if sorted {
                offsets.sort_unstable();
            }
            // Now and then an offset out of bounds, or below zero.
            if let Some(last) = offsets.last_mut() {
                *last += skew;
            }
            if let Some(first) = offsets.first_mut() {
                *first += first_skew;
            }
            let make = || column(large, &values, &offsets, offset, nulls.clone());
            let arrow = make().0.build();
            let (builder, data_type) = make();
            let ours = validated(builder, &data_type);
            prop_assert_eq!(
                ours.is_ok(),
                arrow.is_ok(),
                "values {:?} offsets {:?}: ours {:?}, Arrow's {:?}",
                values, offsets, ours, arrow
            );
            if let (Ok(ours), Ok(arrow)) = (ours, arrow) {
                prop_assert_eq!(ours, arrow);
            }
        }
    }

    /// A dictionary column of `keys` over `dictionary` values, and its type.
    fn keyed<K: arrow::datatypes::ArrowNativeType>(
        key: DataType,
        keys: &[i64],
        dictionary: usize,
        offset: usize,
        nulls: &Option<Vec<bool>>,
    ) -> (ArrayDataBuilder, DataType) {
        let narrow: Vec<K> = keys.iter().map(|k| K::usize_as(*k as usize)).collect();
        let len = keys.len().saturating_sub(offset);
        let values = ArrayDataBuilder::new(DataType::Int32)
            .len(dictionary)
            .buffers(vec![Buffer::from_slice_ref(vec![7i32; dictionary])])
            .build()
            .unwrap();
        let nulls = nulls.clone().map(|bits| {
            let bits: Vec<bool> = bits.into_iter().cycle().take(offset + len).collect();
            NullBuffer::from(bits).slice(offset, len)
        });
        let data_type = DataType::Dictionary(Box::new(key), Box::new(DataType::Int32));
        let builder = ArrayDataBuilder::new(data_type.clone())
            .len(len)
            .offset(offset)
            .nulls(nulls)
            .buffers(vec![Buffer::from_slice_ref(&narrow)])
            .child_data(vec![values]);
        (builder, data_type)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The key check refuses exactly what Arrow's own validation refuses: keys of every
        /// width, signed and not, within the dictionary or past it or below zero, at null
        /// positions and not, with an offset into the column, over an empty dictionary too.
        #[test]
        fn keys_are_refused_as_arrow_refuses_them(
            width in 0usize..8,
            dictionary in 0usize..5,
            keys in proptest::collection::vec(-2i64..7, 0..20),
            offset in 0usize..3,
            nulls in proptest::option::of(proptest::collection::vec(any::<bool>(), 1..8)),
        ) {
            let make = || match width {
                0 => keyed::<i8>(DataType::Int8, &keys, dictionary, offset, &nulls),
                1 => keyed::<i16>(DataType::Int16, &keys, dictionary, offset, &nulls),
                2 => keyed::<i32>(DataType::Int32, &keys, dictionary, offset, &nulls),
                3 => keyed::<i64>(DataType::Int64, &keys, dictionary, offset, &nulls),
                4 => keyed::<u8>(DataType::UInt8, &keys, dictionary, offset, &nulls),
                5 => keyed::<u16>(DataType::UInt16, &keys, dictionary, offset, &nulls),
                6 => keyed::<u32>(DataType::UInt32, &keys, dictionary, offset, &nulls),
                _ => keyed::<u64>(DataType::UInt64, &keys, dictionary, offset, &nulls),
            };
            let arrow = make().0.build();
            let (builder, data_type) = make();
            let ours = validated(builder, &data_type);
            prop_assert_eq!(ours.is_ok(), arrow.is_ok(), "keys {:?}: ours {:?}, Arrow's {:?}", keys, ours, arrow);
            if let (Ok(ours), Ok(arrow)) = (ours, arrow) {
                prop_assert_eq!(ours, arrow);
            }
        }
    }

    #[test]
    fn an_empty_column_may_have_no_offsets() {
        for data_type in [DataType::Utf8, DataType::LargeUtf8] {
            let builder = || {
                ArrayDataBuilder::new(data_type.clone())
                    .len(0)
                    .buffers(vec![
                        Buffer::from_slice_ref::<u8, _>([]),
                        Buffer::from_slice_ref(b""),
                    ])
            };
            // (Arrow's own comparison of two such arrays indexes their missing offsets.)
            assert_eq!(validated(builder(), &data_type).unwrap().len(), 0);
            assert_eq!(builder().build().unwrap().len(), 0);
        }
    }
}
