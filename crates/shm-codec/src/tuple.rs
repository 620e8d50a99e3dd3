//! Tuples of encodable values, for calls with several arguments or results.

use serde::{Deserialize, Serialize};

use crate::codec::{Decode, Decoder, Encode, Encoder};
use crate::error::{CodecError, Result};
use crate::payload::Payload;

/// The codec name of tuples. The tuple's buffers are its members' buffers, in member order;
/// the metadata lists each member's codec, metadata, inline bytes and number of buffers.
pub const TUPLE_CODEC: &str = "tuple";

#[derive(Serialize, Deserialize)]
struct TupleMeta {
    members: Vec<Member>,
}

/// One member of a tuple: a payload whose buffers are the next `buffers` of the tuple's.
#[derive(Serialize, Deserialize)]
struct Member {
    codec: String,
    meta: Vec<u8>,
    inline: Vec<u8>,
    buffers: u32,
}

fn encode_members(members: Vec<Payload>) -> Result<Payload> {
    let mut blocks = Vec::new();
    let mut meta = TupleMeta {
        members: Vec::with_capacity(members.len()),
    };
    for mut member in members {
        let held = member.take_blocks();
        if held.len() != member.buffers().len() {
            return Err(CodecError::Layout {
                reason: format!(
                    "a tuple member of codec {} names {} blocks but holds {}",
                    member.codec,
                    member.buffers().len(),
                    held.len()
                ),
            });
        }
        meta.members.push(Member {
            codec: member.codec.into_owned(),
            meta: member.meta,
            inline: member.inline,
            buffers: held.len() as u32,
        });
        blocks.extend(held);
    }
    let meta = Payload::encode_meta(&meta)?;
    Ok(Payload::new(TUPLE_CODEC, meta, blocks, Vec::new()))
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
    let mut refs = payload.buffers();
    let mut members = Vec::with_capacity(arity);
    for member in meta.members {
        let count = member.buffers as usize;
        if count > refs.len() {
            return Err(CodecError::Layout {
                reason: format!(
                    "a tuple member claims {count} buffers, {} are left of the tuple's {}",
                    refs.len(),
                    payload.buffers().len()
                ),
            });
        }
        let (mine, rest) = refs.split_at(count);
        refs = rest;
        members.push(Payload::from_refs(
            member.codec,
            member.meta,
            mine.to_vec(),
            member.inline,
        ));
    }
    if !refs.is_empty() {
        return Err(CodecError::Layout {
            reason: format!("{} buffers of a tuple belong to no member", refs.len()),
        });
    }
    Ok(members)
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
