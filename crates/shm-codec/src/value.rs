//! `Value`: a plain value that describes itself, for peers that do not share Rust types (a
//! Python program's dicts and mixed lists).

use serde::de::{self, DeserializeSeed, EnumAccess, SeqAccess, VariantAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Nesting deeper than this is refused when a value is read, so that a hostile peer cannot
/// exhaust the reader's stack with a few bytes per level.
pub const MAX_VALUE_DEPTH: usize = 64;

/// A self-describing plain value, carried as [`Serde<Value>`](crate::Serde): postcard encodes
/// it as a variant index (in the order below) followed by the variant's content, so any
/// program can read and write it without knowing a Rust type (docs/format.md, "`serde`: plain
/// values"). The Python module `shm` sends dicts and lists of mixed kinds as a `Value`.
///
/// ```
/// use shm_codec::Value;
///
/// let v = Value::Map(vec![(Value::Str("n".into()), Value::Int(3))]);
/// let bytes = postcard::to_stdvec(&v).unwrap();
/// assert_eq!(bytes, [7, 1, 4, 1, b'n', 2, 6]);
/// assert_eq!(postcard::from_bytes::<Value>(&bytes).unwrap(), v);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Value {
    /// Nothing (Python's `None`).
    Unit,
    /// A boolean.
    Bool(bool),
    /// An integer that fits an `i64`.
    Int(i64),
    /// A float.
    Float(f64),
    /// UTF-8 text.
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A sequence (a Python list or tuple).
    List(Vec<Value>),
    /// Key-value pairs in their order (a Python dict).
    Map(Vec<(Value, Value)>),
}

const VARIANTS: &[&str] = &[
    "Unit", "Bool", "Int", "Float", "Str", "Bytes", "List", "Map",
];

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Depth(0).deserialize(deserializer)
    }
}

/// Reads a value at this nesting depth.
#[derive(Clone, Copy)]
struct Depth(usize);

impl<'de> DeserializeSeed<'de> for Depth {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        if self.0 > MAX_VALUE_DEPTH {
            return Err(de::Error::custom(format!(
                "a value nested deeper than {MAX_VALUE_DEPTH} levels"
            )));
        }
        deserializer.deserialize_enum("Value", VARIANTS, self)
    }
}

impl<'de> Visitor<'de> for Depth {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Value")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (variant, content) = data.variant::<u32>()?;
        let inner = Depth(self.0 + 1);
        Ok(match variant {
            0 => {
                content.unit_variant()?;
                Value::Unit
            }
            1 => Value::Bool(content.newtype_variant()?),
            2 => Value::Int(content.newtype_variant()?),
            3 => Value::Float(content.newtype_variant()?),
            4 => Value::Str(content.newtype_variant()?),
            5 => Value::Bytes(content.newtype_variant()?),
            6 => Value::List(content.newtype_variant_seed(Items(inner))?),
            7 => Value::Map(content.newtype_variant_seed(Pairs(inner))?),
            other => {
                return Err(de::Error::invalid_value(
                    de::Unexpected::Unsigned(other.into()),
                    &"a variant index below 8",
                ));
            }
        })
    }
}

/// The items of a `List`, each at the depth given.
struct Items(Depth);

impl<'de> DeserializeSeed<'de> for Items {
    type Value = Vec<Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Value>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Items {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of Values")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        // The count is the peer's word: grow as items arrive rather than trusting it.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(self.0)? {
            out.push(item);
        }
        Ok(out)
    }
}

/// The pairs of a `Map`, each key and value at the depth given.
struct Pairs(Depth);

impl<'de> DeserializeSeed<'de> for Pairs {
    type Value = Vec<(Value, Value)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Pairs {
    type Value = Vec<(Value, Value)>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of (Value, Value) pairs")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(pair) = seq.next_element_seed(Pair(self.0))? {
            out.push(pair);
        }
        Ok(out)
    }
}

/// One key and its value.
struct Pair(Depth);

impl<'de> DeserializeSeed<'de> for Pair {
    type Value = (Value, Value);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_tuple(2, self)
    }
}

impl<'de> Visitor<'de> for Pair {
    type Value = (Value, Value);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a (Value, Value) pair")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let key = seq
            .next_element_seed(self.0)?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let value = seq
            .next_element_seed(self.0)?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        Ok((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: &Value) -> Value {
        postcard::from_bytes(&postcard::to_stdvec(v).unwrap()).unwrap()
    }

    #[test]
    fn every_variant_round_trips() {
        let v = Value::List(vec![
            Value::Unit,
            Value::Bool(true),
            Value::Int(i64::MIN),
            Value::Int(i64::MAX),
            Value::Float(-0.5),
            Value::Str("é∑".into()),
            Value::Bytes(vec![0, 255]),
            Value::Map(vec![(Value::Int(1), Value::List(vec![]))]),
        ]);
        assert_eq!(round_trip(&v), v);
    }

    #[test]
    fn nesting_is_read_to_the_limit_and_refused_beyond_it() {
        let nested =
            |depth: usize| (0..depth).fold(Value::Unit, |inner, _| Value::List(vec![inner]));
        let deepest = nested(MAX_VALUE_DEPTH);
        assert_eq!(round_trip(&deepest), deepest);
        let bytes = postcard::to_stdvec(&nested(MAX_VALUE_DEPTH + 1)).unwrap();
        assert!(postcard::from_bytes::<Value>(&bytes).is_err());
        // A million levels in two bytes each: refused without exhausting the stack.
        let hostile: Vec<u8> = std::iter::repeat_n([6u8, 1], 1_000_000).flatten().collect();
        assert!(postcard::from_bytes::<Value>(&hostile).is_err());
    }

    #[test]
    fn unknown_variants_and_truncations_are_refused() {
        assert!(postcard::from_bytes::<Value>(&[8]).is_err());
        assert!(postcard::from_bytes::<Value>(&[7, 2, 0]).is_err());
        assert!(postcard::from_bytes::<Value>(&[4, 5, b'a']).is_err());
    }
}
