//! Tuples of encodable values, for calls with several arguments or results.

use serde::{Deserialize, Serialize};

use crate::codec::{Decode, Decoder, Encode, Encoder};
use crate::error::{CodecError, Result};
use crate::payload::Payload;

/// The codec name of tuples: the metadata is the sequence of the members' payloads.
pub const TUPLE_CODEC: &str = "tuple";

#[derive(Serialize, Deserialize)]
struct TupleMeta {
    members: Vec<Payload>,
}

fn encode_members(members: Vec<Payload>) -> Result<Payload> {
    let kept: Vec<_> = members
        .iter()
        .flat_map(|m| m.kept_blocks().iter().cloned())
        .collect();
    let meta = Payload::encode_meta(&TupleMeta { members })?;
    Ok(kept.into_iter().fold(
        Payload::new(TUPLE_CODEC, meta, Vec::new(), Vec::new()),
        Payload::keeping,
    ))
}

fn decode_members(payload: &Payload, arity: usize) -> Result<Vec<Payload>> {
    payload.expect_codec(TUPLE_CODEC)?;
    let meta: TupleMeta = payload.decode_meta()?;
    if meta.members.len() != arity {
        return Err(CodecError::Layout {
            reason: format!(
                "a tuple of {} where {arity} values were expected",
                meta.members.len()
            ),
        });
    }
    Ok(meta.members)
}

macro_rules! tuple {
    ($n:expr; $($name:ident),*) => {
        impl<$($name: Encode),*> Encode for ($($name,)*) {
            #[allow(non_snake_case, unused_variables)]
            fn encode(&self, encoder: &Encoder) -> Result<Payload> {
                let ($($name,)*) = self;
                encode_members(vec![$($name.encode(encoder)?),*])
            }
        }

        impl<$($name: Decode),*> Decode for ($($name,)*) {
            #[allow(non_snake_case, unused_variables)]
            fn decode(payload: &Payload, decoder: &Decoder) -> Result<Self> {
                let members: [Payload; $n] = decode_members(payload, $n)?
                    .try_into()
                    .map_err(|_| CodecError::Layout { reason: "tuple arity".into() })?;
                let [$($name),*] = members;
                Ok(($(<$name as Decode>::decode(&$name, decoder)?,)*))
            }
        }
    };
}

tuple!(0;);
tuple!(1; A);
tuple!(2; A, B);
tuple!(3; A, B, C);
tuple!(4; A, B, C, D);
tuple!(5; A, B, C, D, E);
tuple!(6; A, B, C, D, E, F);

impl<T: Encode + ?Sized> Encode for &T {
    fn encode(&self, encoder: &Encoder) -> Result<Payload> {
        (**self).encode(encoder)
    }
}
