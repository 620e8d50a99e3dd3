//! Element types of arrays, their numpy typestrs, and the byte casts between them and memory.
//! The casts are the unsafe part of this crate; everything else works on checked slices.

use num_complex::Complex;

use crate::error::{CodecError, Result};

/// An element type as it travels: its numpy array-interface typestr names it for any reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum DType {
    Bool,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F32,
    F64,
    C64,
    C128,
}

const ALL: [DType; 13] = [
    DType::Bool,
    DType::I8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::U8,
    DType::U16,
    DType::U32,
    DType::U64,
    DType::F32,
    DType::F64,
    DType::C64,
    DType::C128,
];

impl DType {
    /// The numpy array-interface typestr (`<f8`, `|b1`, `<c16`, …), little-endian.
    pub fn typestr(self) -> &'static str {
        match self {
            DType::Bool => "|b1",
            DType::I8 => "|i1",
            DType::I16 => "<i2",
            DType::I32 => "<i4",
            DType::I64 => "<i8",
            DType::U8 => "|u1",
            DType::U16 => "<u2",
            DType::U32 => "<u4",
            DType::U64 => "<u8",
            DType::F32 => "<f4",
            DType::F64 => "<f8",
            DType::C64 => "<c8",
            DType::C128 => "<c16",
        }
    }

    /// The element type a typestr names.
    pub fn from_typestr(typestr: &str) -> Result<Self> {
        ALL.into_iter()
            .find(|d| d.typestr() == typestr)
            .ok_or_else(|| CodecError::WrongDtype {
                expected: "a known typestr".into(),
                found: typestr.into(),
            })
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        match self {
            DType::Bool | DType::I8 | DType::U8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 | DType::C64 => 8,
            DType::C128 => 16,
        }
    }
}

/// A type that can be an element of an array in shared memory.
///
/// # Safety
///
/// Implementors are plain data with no padding, `size_of` equal to their dtype's itemsize, and
/// every bit pattern valid — except `bool`, whose bytes [`Element::check`] verifies before any
/// `&[bool]` over foreign memory is made.
pub unsafe trait Element: Copy + Send + Sync + 'static + std::fmt::Debug {
    /// The element's dtype.
    const DTYPE: DType;

    /// Checks that bytes from another process are valid values of this type; `Err(index)`
    /// names the first invalid one.
    fn check(_bytes: &[u8]) -> Result<(), (usize, u8)> {
        Ok(())
    }
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        // SAFETY: a primitive number (or a `repr(C)` pair of them): no padding, any bit pattern
        // valid, size equal to the itemsize of its dtype.
        unsafe impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}

element!(
    i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
    f32 => F32, f64 => F64, Complex<f32> => C64, Complex<f64> => C128,
);

// SAFETY: `bool` is one byte without padding; the only invalid bit patterns (bytes other than
// 0 and 1) are rejected by `check`, which every decode runs before viewing foreign bytes.
unsafe impl Element for bool {
    const DTYPE: DType = DType::Bool;

    fn check(bytes: &[u8]) -> Result<(), (usize, u8)> {
        match bytes.iter().position(|&b| b > 1) {
            Some(index) => Err((index, bytes[index])),
            None => Ok(()),
        }
    }
}

/// The bytes of a slice of elements.
pub(crate) fn as_bytes<T: Element>(values: &[T]) -> &[u8] {
    // SAFETY: `T: Element` has no padding, so all `size_of_val(values)` bytes are initialised;
    // `u8` has alignment 1 and any value; the borrow keeps `values` alive.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// Views bytes as elements. Returns `None` unless `bytes` is aligned for `T` and holds a whole
/// number of elements. For `bool` the caller must have checked the bytes with
/// [`Element::check`] (or zeroed them).
pub(crate) fn cast<T: Element>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
    if !aligned || !bytes.len().is_multiple_of(size) {
        return None;
    }
    // SAFETY: aligned and of whole elements (checked above); every bit pattern is a valid `T`
    // except for `bool`, whose bytes the caller has checked or zeroed; the borrow of `bytes`
    // keeps the memory alive and unchanged for the result's lifetime.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size) })
}

/// [`cast`] for writing. The same conditions hold; the bytes must already be valid values of
/// `T` (zeroed bytes are valid for every element type).
pub(crate) fn cast_mut<T: Element>(bytes: &mut [u8]) -> Option<&mut [T]> {
    let size = std::mem::size_of::<T>();
    let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
    if !aligned || !bytes.len().is_multiple_of(size) {
        return None;
    }
    // SAFETY: as in `cast`; `&mut` makes the result the only reference to these bytes.
    Some(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len() / size) })
}
