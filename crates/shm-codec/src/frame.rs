//! The simple frame: a numeric table in one block, column-major, with column and row labels.

use std::borrow::Cow;
use std::sync::Arc;

use ndarray::{ArrayView1, Axis, Ix2};
use serde::{Deserialize, Serialize};
use shm_core::{ShmBlock, ShmPool};

use crate::array::{ArrayMeta, Order, ShmArray, ShmArrayMut};
use crate::codec::{AnyValue, Codec, Decode, Decoder, Encode, Encoder};
use crate::element::{DType, Element};
use crate::error::{CodecError, Result, layout};
use crate::payload::Payload;

/// The codec name of simple frames.
pub const FRAME_CODEC: &str = "frame";

/// The row labels of a frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Index {
    /// Rows numbered `start, start + step, …`.
    Range {
        /// The first label.
        start: i64,
        /// The distance between labels.
        step: i64,
    },
    /// One label per row.
    Labels(Vec<String>),
}

impl Default for Index {
    fn default() -> Self {
        Index::Range { start: 0, step: 1 }
    }
}

#[derive(Serialize, Deserialize)]
struct FrameMeta {
    array: ArrayMeta,
    columns: Vec<String>,
    index: Index,
}

/// A table of `nrows × ncols` numbers of one type in one shared-memory block, stored
/// column-major so that each column is a contiguous slice. Column names may repeat; an empty
/// frame keeps its column names.
///
/// ```
/// use shm_codec::{Index, SimpleFrame};
/// use shm_core::ShmPool;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = ShmPool::new()?;
/// let (x, y) = ([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]);
/// let frame = SimpleFrame::from_columns(
///     &pool,
///     &[("x", &x[..]), ("y", &y[..])],
///     Index::Range { start: 0, step: 1 },
/// )?;
/// assert_eq!(frame.columns(), ["x", "y"]);
/// assert_eq!(frame.column("y").unwrap()[2], 30.0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SimpleFrame<T: Element> {
    data: ShmArray<T, Ix2>,
    columns: Vec<String>,
    index: Index,
}

impl<T: Element> SimpleFrame<T> {
    /// A frame over a block holding `nrows × ncols` values of `T`, column after column.
    pub fn from_block(
        block: Arc<ShmBlock>,
        nrows: usize,
        ncols: usize,
        columns: Vec<String>,
        index: Option<Index>,
    ) -> Result<Self> {
        let data = ShmArray::from_block(block, (nrows, ncols), Order::F)?;
        Self::new(data, columns, index.unwrap_or_default())
    }

    /// A frame over an array of shape `(nrows, ncols)` in any layout.
    pub fn new(data: ShmArray<T, Ix2>, columns: Vec<String>, index: Index) -> Result<Self> {
        let (nrows, ncols) = (data.shape()[0], data.shape()[1]);
        if columns.len() != ncols {
            return Err(layout(format!(
                "{} column names for {ncols} columns",
                columns.len()
            )));
        }
        if let Index::Labels(labels) = &index
            && labels.len() != nrows
        {
            return Err(layout(format!(
                "{} row labels for {nrows} rows",
                labels.len()
            )));
        }
        Ok(SimpleFrame {
            data,
            columns,
            index,
        })
    }

    /// Writes columns of equal length into a new block of `pool`.
    pub fn from_columns(pool: &ShmPool, columns: &[(&str, &[T])], index: Index) -> Result<Self> {
        let nrows = columns.first().map_or(0, |(_, values)| values.len());
        if let Some((name, values)) = columns.iter().find(|(_, v)| v.len() != nrows) {
            return Err(layout(format!(
                "column {name:?} has {} rows, the first has {nrows}",
                values.len()
            )));
        }
        let mut data =
            ShmArrayMut::<T, Ix2>::zeros_with_order(pool, (nrows, columns.len()), Order::F)?;
        for (mut target, (_, values)) in data.view_mut().axis_iter_mut(Axis(1)).zip(columns) {
            target.assign(&ArrayView1::from(*values));
        }
        let names = columns.iter().map(|(name, _)| (*name).to_owned()).collect();
        Self::new(data.freeze(), names, index)
    }

    /// Number of rows.
    pub fn nrows(&self) -> usize {
        self.data.shape()[0]
    }

    /// Number of columns.
    pub fn ncols(&self) -> usize {
        self.data.shape()[1]
    }

    /// The column names, in order (repeats allowed).
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The row labels.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The first column called `name`.
    pub fn column(&self, name: &str) -> Option<ArrayView1<'_, T>> {
        let at = self.columns.iter().position(|c| c == name)?;
        self.column_at(at)
    }

    /// The column at position `at`.
    pub fn column_at(&self, at: usize) -> Option<ArrayView1<'_, T>> {
        (at < self.ncols()).then(|| self.data.view().index_axis_move(Axis(1), at))
    }

    /// The values as a 2-D array.
    pub fn data(&self) -> &ShmArray<T, Ix2> {
        &self.data
    }
}

impl<T: Element> Encode for SimpleFrame<T> {
    fn encode(&self, encoder: &Encoder) -> Result<Payload> {
        let mut payload = self.data.encode(encoder)?;
        let array: ArrayMeta = payload.decode_meta()?;
        payload.meta = Payload::encode_meta(&FrameMeta {
            array,
            columns: self.columns.clone(),
            index: self.index.clone(),
        })?;
        payload.codec = Cow::Borrowed(FRAME_CODEC);
        Ok(payload)
    }
}

impl<T: Element> Decode for SimpleFrame<T> {
    fn decode(payload: &Payload, decoder: &Decoder) -> Result<Self> {
        payload.expect_codec(FRAME_CODEC)?;
        let meta: FrameMeta = payload.decode_meta()?;
        let data = ShmArray::decode_with(meta.array, payload, decoder, FRAME_CODEC)?;
        Self::new(data, meta.columns, meta.index)
    }
}

/// The registry's frame codec: frames of `f64`, `f32`, `i64` and `i32`.
#[derive(Debug)]
pub(crate) struct FrameCodec;

impl Codec for FrameCodec {
    fn name(&self) -> &str {
        FRAME_CODEC
    }

    fn encode(&self, value: &dyn std::any::Any, encoder: &Encoder) -> Option<Result<Payload>> {
        if let Some(f) = value.downcast_ref::<SimpleFrame<f64>>() {
            return Some(f.encode(encoder));
        }
        if let Some(f) = value.downcast_ref::<SimpleFrame<f32>>() {
            return Some(f.encode(encoder));
        }
        if let Some(f) = value.downcast_ref::<SimpleFrame<i64>>() {
            return Some(f.encode(encoder));
        }
        value
            .downcast_ref::<SimpleFrame<i32>>()
            .map(|f| f.encode(encoder))
    }

    fn decode(&self, payload: &Payload, decoder: &Decoder) -> Result<AnyValue> {
        let meta: FrameMeta = payload.decode_meta()?;
        match DType::from_typestr(&meta.array.typestr)? {
            DType::F64 => Ok(Box::new(SimpleFrame::<f64>::decode(payload, decoder)?)),
            DType::F32 => Ok(Box::new(SimpleFrame::<f32>::decode(payload, decoder)?)),
            DType::I64 => Ok(Box::new(SimpleFrame::<i64>::decode(payload, decoder)?)),
            DType::I32 => Ok(Box::new(SimpleFrame::<i32>::decode(payload, decoder)?)),
            other => Err(CodecError::WrongDtype {
                expected: "<f8, <f4, <i8 or <i4 for a frame".into(),
                found: other.typestr().into(),
            }),
        }
    }
}
