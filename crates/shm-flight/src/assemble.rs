//! One copy for an Arrow frame that arrives as many record batches: each batch's buffers are
//! copied off the network straight to their place in one block per buffer of the whole
//! frame, so the frame needs no concatenation afterwards.
//!
//! This works when the sender declared the frame's layout (`Body::Arrow::data`, the bytes of
//! variable-length data per column) and every column is flat: fixed-width values, booleans,
//! strings and binaries (32- or 64-bit offsets), and dictionaries with integer keys. Batches
//! start at multiples of 8 rows, so validity bitmaps are copied byte for byte. Anything else
//! is received batch by batch and concatenated, as before. Everything read from the message
//! is bounds-checked here, and the finished batch goes through Arrow's validation.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayData, ArrayRef, RecordBatch, make_array};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, SchemaRef};
use shm_codec::Encoder;
use shm_core::ShmBlockMut;

use crate::budget::Reservation;
use crate::wire::WireError;

fn protocol(what: impl Into<String>) -> WireError {
    WireError::Protocol(what.into())
}

/// How one column is laid out.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// Values of this many bytes each (dictionary keys included).
    Fixed(usize),
    /// A bitmap of values.
    Bool,
    /// Offsets of this many bytes, then the data.
    Bytes(usize),
}

fn shape(data_type: &DataType) -> Option<Shape> {
    match data_type {
        DataType::Boolean => Some(Shape::Bool),
        DataType::Utf8 | DataType::Binary => Some(Shape::Bytes(4)),
        DataType::LargeUtf8 | DataType::LargeBinary => Some(Shape::Bytes(8)),
        DataType::Dictionary(key, _) if key.is_dictionary_key_type() => {
            key.primitive_width().map(Shape::Fixed)
        }
        other => other.primitive_width().map(Shape::Fixed),
    }
}

/// The bytes of variable-length data of each column of `batch`, when every column can be
/// assembled; `None` otherwise (the receiver then concatenates).
pub(crate) fn declared_layout(batch: &RecordBatch) -> Option<Vec<u64>> {
    batch
        .columns()
        .iter()
        .map(|column| {
            let data = column.to_data();
            match shape(column.data_type())? {
                Shape::Bytes(width) => {
                    let offsets = data.buffers().first()?.as_slice();
                    let read = |i: usize| -> Option<u64> {
                        let at = (data.offset() + i) * width;
                        let bytes = offsets.get(at..at + width)?;
                        Some(if width == 4 {
                            i32::from_le_bytes(bytes.try_into().ok()?) as u64
                        } else {
                            i64::from_le_bytes(bytes.try_into().ok()?) as u64
                        })
                    };
                    read(data.len())?.checked_sub(read(0)?)
                }
                _ => Some(0),
            }
        })
        .collect()
}

/// Where a buffer of the frame is assembled: a range of one of the assembly's blocks.
#[derive(Clone, Copy, Debug)]
struct Region {
    block: usize,
    offset: usize,
    len: usize,
}

/// One column being assembled.
struct Column {
    shape: Shape,
    nullable: bool,
    validity: Region,
    nulls: u64,
    values: Region,
    /// Variable-length data and how much of it is written (`Bytes` only).
    data: Option<(Region, usize)>,
}

/// A frame being assembled from its record batches.
pub(crate) struct Assembly {
    schema: SchemaRef,
    rows: usize,
    at: usize,
    columns: Vec<Column>,
    /// The blocks the columns' buffers are assembled in: a buffer of up to
    /// [`PACKED_BLOCK`] bytes shares a block with its neighbours (a frame of 100,000 narrow
    /// columns takes a few dozen blocks), a larger one has a block of its own. Allocated
    /// when the first record batch comes ([`reserve`](Self::reserve)), from `sizes`.
    blocks: Vec<ShmBlockMut>,
    sizes: Vec<usize>,
}

/// The largest block that small buffers of a frame share.
const PACKED_BLOCK: usize = 256 << 10;

/// Alignment of each buffer in a shared block (Arrow's).
const ALIGN: usize = 64;

/// Lays buffers out in blocks, then allocates them.
#[derive(Default)]
struct Layout {
    /// Bytes of each block to allocate.
    sizes: Vec<usize>,
    /// The block small buffers go into now, if any.
    open: Option<usize>,
}

impl Layout {
    fn place(&mut self, len: usize) -> Region {
        if len > PACKED_BLOCK / 4 {
            self.sizes.push(len);
            return Region {
                block: self.sizes.len() - 1,
                offset: 0,
                len,
            };
        }
        let block = match self.open {
            Some(block) if self.sizes[block].next_multiple_of(ALIGN) + len <= PACKED_BLOCK => block,
            _ => {
                self.sizes.push(0);
                self.open = Some(self.sizes.len() - 1);
                self.sizes.len() - 1
            }
        };
        let offset = self.sizes[block].next_multiple_of(ALIGN);
        self.sizes[block] = offset + len;
        Region { block, offset, len }
    }
}

/// The bytes of `region` in `blocks`.
fn bytes_of(blocks: &mut [ShmBlockMut], region: Region) -> &mut [u8] {
    &mut blocks[region.block].as_mut_slice()[region.offset..region.offset + region.len]
}

fn bytes_for(count: usize, width: usize) -> Result<usize, WireError> {
    count
        .checked_mul(width)
        .ok_or_else(|| protocol(format!("{count} values of {width} bytes overflow")))
}

impl Assembly {
    /// An assembly of `rows` rows of `schema` whose columns hold `data` bytes of
    /// variable-length data each; `None` if the frame cannot be assembled.
    pub(crate) fn new(
        schema: &SchemaRef,
        rows: u64,
        data: &[u64],
        limit: u64,
    ) -> Result<Option<Self>, WireError> {
        let shapes: Option<Vec<Shape>> = schema
            .fields()
            .iter()
            .map(|f| shape(f.data_type()))
            .collect();
        let Some(shapes) = shapes else {
            return Ok(None);
        };
        if data.len() != shapes.len() {
            return Ok(None);
        }
        let rows = usize::try_from(rows).map_err(|_| protocol(format!("{rows} rows")))?;
        let bitmap = rows.div_ceil(8);
        let mut total = 0u64;
        let mut sizes = Vec::with_capacity(shapes.len());
        for (shape, &data) in shapes.iter().zip(data) {
            let values = match shape {
                Shape::Fixed(width) => bytes_for(rows, *width)?,
                Shape::Bool => bitmap,
                Shape::Bytes(width) => bytes_for(rows + 1, *width)?,
            };
            let data = usize::try_from(data).map_err(|_| protocol(format!("{data} bytes")))?;
            total = total
                .saturating_add(values as u64)
                .saturating_add(bitmap as u64)
                .saturating_add(data as u64);
            sizes.push((values, data));
        }
        if total > limit {
            return Err(WireError::TooLarge { size: total, limit });
        }
        let mut layout = Layout::default();
        let mut columns = Vec::with_capacity(shapes.len());
        for ((field, shape), (values, data)) in schema.fields().iter().zip(shapes).zip(sizes) {
            columns.push(Column {
                shape,
                nullable: field.is_nullable(),
                validity: layout.place(if field.is_nullable() { bitmap } else { 0 }),
                nulls: 0,
                values: layout.place(values),
                data: match shape {
                    Shape::Bytes(_) => Some((layout.place(data), 0)),
                    _ => None,
                },
            });
        }
        Ok(Some(Assembly {
            schema: Arc::clone(schema),
            rows,
            at: 0,
            columns,
            blocks: Vec::new(),
            sizes: layout.sizes,
        }))
    }

    /// Allocates the frame's blocks, charged to `reservation`, unless done already.
    pub(crate) fn reserve(
        &mut self,
        encoder: &Encoder,
        reservation: &Reservation,
    ) -> Result<(), WireError> {
        if self.blocks.len() == self.sizes.len() {
            return Ok(());
        }
        reservation.charge(self.sizes.iter().map(|&s| s as u64).sum())?;
        for &size in &self.sizes {
            self.blocks.push(encoder.pool().alloc(size)?);
        }
        for column in &self.columns {
            if let Shape::Bytes(_) = column.shape {
                // The first offset; every batch writes the ones after its rows.
                bytes_of(&mut self.blocks, column.values).fill(0);
            }
        }
        Ok(())
    }

    /// Copies the buffers of one record batch message into place.
    pub(crate) fn append(
        &mut self,
        batch: arrow::ipc::RecordBatch<'_>,
        body: &[u8],
    ) -> Result<(), WireError> {
        if batch.compression().is_some() {
            return Err(protocol(
                "a compressed batch in a frame with a declared layout",
            ));
        }
        let n = usize::try_from(batch.length())
            .map_err(|_| protocol(format!("a batch of {} rows", batch.length())))?;
        if !self.at.is_multiple_of(8) && n > 0 {
            return Err(protocol(format!(
                "a batch starts at row {}: in a frame with a declared layout, only the last \
                 batch may hold a number of rows that is not a multiple of 8",
                self.at
            )));
        }
        if n > self.rows - self.at {
            return Err(protocol(format!(
                "the frame declared {} rows and more came",
                self.rows
            )));
        }
        let nodes = batch
            .nodes()
            .ok_or_else(|| protocol("a batch without field nodes"))?;
        let buffers = batch
            .buffers()
            .ok_or_else(|| protocol("a batch without buffers"))?;
        if nodes.len() != self.columns.len() {
            return Err(protocol(format!(
                "a batch of {} fields for a schema of {}",
                nodes.len(),
                self.columns.len()
            )));
        }
        let slice = |index: usize| -> Result<&[u8], WireError> {
            let buffer = (index < buffers.len())
                .then(|| buffers.get(index))
                .ok_or_else(|| {
                    protocol(format!("buffer {index} of {} is missing", buffers.len()))
                })?;
            let (offset, len) = (buffer.offset(), buffer.length());
            usize::try_from(offset)
                .ok()
                .zip(usize::try_from(len).ok())
                .and_then(|(o, l)| body.get(o..o.checked_add(l)?))
                .ok_or_else(|| {
                    protocol(format!(
                        "buffer {index} at {offset}+{len} lies outside a body of {} bytes",
                        body.len()
                    ))
                })
        };
        let (at, bitmap) = (self.at, n.div_ceil(8));
        let mut next = 0usize;
        let blocks = &mut self.blocks;
        for (c, column) in self.columns.iter_mut().enumerate() {
            let node = nodes.get(c);
            if node.length() != n as i64 {
                return Err(protocol(format!(
                    "field {c} has {} values in a batch of {n} rows",
                    node.length()
                )));
            }
            let validity = slice(next)?;
            next += 1;
            let nulls = u64::try_from(node.null_count())
                .map_err(|_| protocol(format!("{} nulls", node.null_count())))?;
            if nulls > 0 || column.nullable {
                let into = bytes_of(blocks, column.validity)
                    .get_mut(at / 8..at / 8 + bitmap)
                    .ok_or_else(|| protocol(format!("nulls in non-nullable field {c}")))?;
                match validity.get(..bitmap) {
                    Some(bits) if nulls > 0 => into.copy_from_slice(bits),
                    None if nulls > 0 => {
                        return Err(protocol(format!(
                            "field {c} has {nulls} nulls and a validity bitmap of {} bytes",
                            validity.len()
                        )));
                    }
                    _ => into.fill(0xff),
                }
                column.nulls += nulls;
            }
            match column.shape {
                Shape::Fixed(width) => {
                    let values = slice(next)?;
                    next += 1;
                    let len = n * width;
                    let from = values.get(..len).ok_or_else(|| {
                        protocol(format!("field {c}: {} bytes of values", values.len()))
                    })?;
                    bytes_of(blocks, column.values)[at * width..at * width + len]
                        .copy_from_slice(from);
                }
                Shape::Bool => {
                    let values = slice(next)?;
                    next += 1;
                    let from = values.get(..bitmap).ok_or_else(|| {
                        protocol(format!("field {c}: {} bytes of bits", values.len()))
                    })?;
                    bytes_of(blocks, column.values)[at / 8..at / 8 + bitmap].copy_from_slice(from);
                }
                Shape::Bytes(width) => {
                    let (offsets, data) = (slice(next)?, slice(next + 1)?);
                    next += 2;
                    let offset = |i: usize| -> Result<u64, WireError> {
                        let bytes = offsets
                            .get(i * width..(i + 1) * width)
                            .ok_or_else(|| protocol(format!("field {c}: offset {i} is missing")))?;
                        let value = if width == 4 {
                            i64::from(i32::from_le_bytes(bytes.try_into().unwrap_or_default()))
                        } else {
                            i64::from_le_bytes(bytes.try_into().unwrap_or_default())
                        };
                        u64::try_from(value)
                            .map_err(|_| protocol(format!("field {c}: offset {value}")))
                    };
                    let (first, last) = (offset(0)?, offset(n)?);
                    let Some((region, written)) = column.data.as_mut() else {
                        return Err(protocol("a string column without data"));
                    };
                    let from = usize::try_from(first)
                        .ok()
                        .zip(usize::try_from(last).ok())
                        .and_then(|(f, l)| data.get(f..l))
                        .ok_or_else(|| {
                            protocol(format!(
                                "field {c}: data {first}..{last} outside {} bytes",
                                data.len()
                            ))
                        })?;
                    let into = bytes_of(blocks, *region)
                        .get_mut(*written..*written + from.len())
                        .ok_or_else(|| protocol(format!("field {c}: more data than declared")))?;
                    into.copy_from_slice(from);
                    let dest = bytes_of(blocks, column.values);
                    for i in 1..=n {
                        let rebased = offset(i)?
                            .checked_sub(first)
                            .ok_or_else(|| protocol(format!("field {c}: offsets go down")))?
                            + *written as u64;
                        let at = (at + i) * width;
                        if width == 4 {
                            let value = i32::try_from(rebased)
                                .map_err(|_| protocol(format!("field {c}: offset {rebased}")))?;
                            dest[at..at + 4].copy_from_slice(&value.to_le_bytes());
                        } else {
                            dest[at..at + 8].copy_from_slice(&(rebased as i64).to_le_bytes());
                        }
                    }
                    *written += from.len();
                }
            }
        }
        self.at += n;
        Ok(())
    }

    /// Rows assembled so far.
    pub(crate) fn rows_so_far(&self) -> usize {
        self.at
    }

    /// The frame, over its blocks; dictionary columns take their values from
    /// `dictionaries`, in the order of their ids.
    pub(crate) fn finish(
        self,
        encoder: &Encoder,
        dictionaries: &HashMap<i64, ArrayRef>,
    ) -> Result<RecordBatch, WireError> {
        if self.at != self.rows {
            return Err(protocol(format!(
                "the stream ended after {} of the {} rows the frame declared",
                self.at, self.rows
            )));
        }
        let mut ids: Vec<&i64> = dictionaries.keys().collect();
        ids.sort();
        let mut ids = ids.into_iter();
        let blocks: Vec<_> = self.blocks.into_iter().map(|b| encoder.freeze(b)).collect();
        let shared = |region: Region, len: usize| -> Result<Buffer, WireError> {
            Ok(shm_arrow::block_buffer(
                &blocks[region.block],
                region.offset as u64,
                len as u64,
            )?)
        };
        let mut arrays = Vec::with_capacity(self.columns.len());
        for (field, column) in self.schema.fields().iter().zip(self.columns) {
            let mut builder = ArrayData::builder(field.data_type().clone()).len(self.rows);
            if column.nulls > 0 {
                builder =
                    builder.null_bit_buffer(Some(shared(column.validity, self.rows.div_ceil(8))?));
            }
            builder = builder.add_buffer(shared(column.values, column.values.len)?);
            if let Some((data, written)) = column.data {
                builder = builder.add_buffer(shared(data, written)?);
            }
            if let DataType::Dictionary(_, value_type) = field.data_type() {
                let values = ids
                    .next()
                    .and_then(|id| dictionaries.get(id))
                    .ok_or_else(|| protocol(format!("no dictionary for field {}", field.name())))?;
                if values.data_type() != value_type.as_ref() {
                    return Err(protocol(format!(
                        "field {}'s dictionary holds {} values, not {value_type}",
                        field.name(),
                        values.data_type()
                    )));
                }
                builder = builder.child_data(vec![values.to_data()]);
            }
            let data = builder.build().map_err(|e| {
                WireError::Codec(shm_codec::CodecError::InvalidData {
                    codec: shm_arrow::COLUMNS_CODEC,
                    reason: e.to_string(),
                })
            })?;
            arrays.push(make_array(data));
        }
        RecordBatch::try_new(Arc::clone(&self.schema), arrays).map_err(|e| {
            WireError::Codec(shm_codec::CodecError::InvalidData {
                codec: shm_arrow::COLUMNS_CODEC,
                reason: e.to_string(),
            })
        })
    }
}
