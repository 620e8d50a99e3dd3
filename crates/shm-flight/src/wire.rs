//! What travels in a `DoExchange` stream, each way: one head message, then the payload's data.
//!
//! The head is a `FlightData` whose `app_metadata` is a postcard [`CallHead`] (client to
//! server) or [`ReplyHead`] (server to client), and whose `data_header` is an IPC message
//! without header ([`no_ipc_header`]), which a standard Flight decoder passes on as metadata.
//! What follows depends on the payload's [`Body`]:
//! - `Arrow`: the frame as standard Flight record batches — a schema message, dictionary
//!   messages, then one record batch message (a frame of up to `whole_batch_bytes`) or
//!   several of about [`SPLIT_BATCH_BYTES`] — that any Flight client reads;
//! - `Blocks`: the payload's blocks, in order, as `data_body` chunks of at most [`CHUNK`]
//!   bytes (`data_header` the header-less message, `app_metadata` empty);
//! - `Connection`: nothing more on the stream; the blocks come as bare bytes on the data
//!   connection the head names (`side`), when the peer said it takes one.
//!
//! The receiver allocates the blocks in its own pool once the head has said how large they
//! are, copies each chunk straight into place, and holds the sender to the sizes it declared.
//! docs/format.md has the byte-level description.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions};
use arrow_flight::FlightData;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use shm_arrow::{COLUMNS_CODEC, ColumnFrame};
use shm_codec::{Attacher, Decoder, Encoder, Payload, Source, Unwritten};
use shm_core::{ShmBlock, ShmBlockMut, ShmPool, ShmRef};
use shm_transport::RemoteError;

use crate::assemble::Assembly;
use crate::budget::Reservation;
use crate::side::{self, DATA_CONNECTION_MIN_BYTES, Key, Kind, Outbound, Rendezvous};

/// The version of this wire format; a peer of another version is refused at its first message.
pub const WIRE_VERSION: u16 = 2;

/// The largest `data_body` of a block chunk. Several chunks are in flight at once, bounded by
/// HTTP/2 flow control: a sender never runs more than a few chunks ahead of its receiver.
pub const CHUNK: usize = 2 << 20;

/// The size aimed at for each record batch of an Arrow frame too large to travel whole: small
/// enough that encoding, sending and receiving overlap (gRPC buffers each message whole on
/// both sides; `cargo xtask bench` measured a 41 MiB frame at 37–43 ms in 2 MiB batches,
/// 88 ms as one message).
pub const SPLIT_BATCH_BYTES: usize = 2 << 20;

/// Room for a message's head and framing beyond its data, when sizing gRPC message limits.
pub(crate) const MESSAGE_SLACK: usize = 64 << 10;

/// The first message of a call.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CallHead {
    pub wire: u16,
    pub method: String,
    /// The server instance the client talked to last; a server of another instance refuses the
    /// call (its handlers' state is gone). `None` on first contact.
    pub instance: Option<u64>,
    pub args: PayloadHead,
    /// Whether the client takes a large result over a data connection
    /// ([`Body::Connection`]).
    pub takes_connection: bool,
}

/// The first message of a reply.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ReplyHead {
    pub wire: u16,
    /// The server's instance: a random number drawn when it started.
    pub instance: u64,
    pub outcome: Outcome,
    /// Whether the server takes arguments over a data connection ([`Body::Connection`]);
    /// a client sends its first call's arguments in gRPC messages, before it knows.
    pub takes_connection: bool,
}

/// How a call ended on the server.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// The handler returned; its result follows.
    Done(PayloadHead),
    /// The handler (or decoding its arguments) failed.
    Failed(RemoteError),
    /// The server did not run the call.
    Refused(Refusal),
}

/// Why a server did not run a call.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Refusal {
    /// The client expected another instance.
    Restarted,
    /// The arguments are larger than the server accepts.
    TooLarge { size: u64, limit: u64 },
    /// The call broke the protocol.
    Protocol { what: String },
}

/// A payload's description: everything but its data.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PayloadHead {
    pub codec: String,
    pub meta: Vec<u8>,
    pub inline: Vec<u8>,
    pub body: Body,
}

/// How a payload's data follows its head.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Body {
    /// The payload's blocks, with these lengths, as chunks. At most
    /// [`MAX_BLOCKS`](shm_codec::MAX_BLOCKS): a head that lists more is refused as it is read,
    /// before the list is built.
    Blocks {
        #[serde(deserialize_with = "bounded_lens")]
        lens: Vec<u64>,
    },
    /// A record batch of `rows` rows and about `bytes` bytes of buffers, as Flight record
    /// batches. `data` declares the bytes of variable-length data of each column (empty when
    /// the frame has a column of another layout than flat), so that the receiver can copy
    /// batches straight into blocks of the whole frame.
    Arrow {
        rows: u64,
        bytes: u64,
        /// One entry per column, so at most `MAX_BLOCKS` too (every column is at least one
        /// buffer), refused as it is read.
        #[serde(deserialize_with = "bounded_lens")]
        data: Vec<u64>,
    },
    /// The payload's blocks, with these lengths, as bare bytes over the data connection
    /// named `key` (see `side`); nothing more comes on the gRPC stream.
    Connection {
        #[serde(deserialize_with = "bounded_lens")]
        lens: Vec<u64>,
        key: Key,
    },
}

/// Reads a list of block lengths (or of a frame's columns), refusing one of more than
/// `MAX_BLOCKS` entries before it holds them.
fn bounded_lens<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u64>, D::Error> {
    struct Lens;
    impl<'de> serde::de::Visitor<'de> for Lens {
        type Value = Vec<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {} block lengths", shm_codec::MAX_BLOCKS)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
            let declared = seq.size_hint().unwrap_or(0);
            if declared > shm_codec::MAX_BLOCKS {
                return Err(serde::de::Error::custom(format!(
                    "a payload of {declared} blocks: one may name at most {}",
                    shm_codec::MAX_BLOCKS
                )));
            }
            let mut lens = Vec::with_capacity(declared.min(4096));
            while let Some(len) = seq.next_element()? {
                if lens.len() == shm_codec::MAX_BLOCKS {
                    return Err(serde::de::Error::custom(format!(
                        "a payload of more than {} blocks",
                        shm_codec::MAX_BLOCKS
                    )));
                }
                lens.push(len);
            }
            Ok(lens)
        }
    }
    deserializer.deserialize_seq(Lens)
}

impl PayloadHead {
    /// The bytes of data the payload declares.
    pub fn size(&self) -> u64 {
        let data = match &self.body {
            Body::Blocks { lens } | Body::Connection { lens, .. } => {
                lens.iter().fold(0u64, |a, &l| a.saturating_add(l))
            }
            Body::Arrow { bytes, .. } => *bytes,
        };
        data.saturating_add((self.meta.len() + self.inline.len()) as u64)
    }
}

/// An IPC `Message` flatbuffer with no header (type `NONE`, body length 0): the
/// `data_header` of messages that carry no Arrow data, so that standard Flight decoders pass
/// them on as metadata instead of failing on an empty header.
pub(crate) fn no_ipc_header() -> Bytes {
    static HEADER: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    HEADER
        .get_or_init(|| {
            let mut fbb = flatbuffers::FlatBufferBuilder::new();
            let mut message = arrow::ipc::MessageBuilder::new(&mut fbb);
            message.add_version(arrow::ipc::MetadataVersion::V5);
            message.add_header_type(arrow::ipc::MessageHeader::NONE);
            message.add_bodyLength(0);
            let message = message.finish();
            fbb.finish(message, None);
            Bytes::copy_from_slice(fbb.finished_data())
        })
        .clone()
}

/// Whether `data_header` is what a message without Arrow data carries: nothing, or an IPC
/// message of type `NONE` without body. Anything else in such a message is refused.
pub(crate) fn is_no_header(data_header: &[u8]) -> bool {
    data_header.is_empty()
        || arrow::ipc::root_as_message(data_header).is_ok_and(|m| {
            m.header_type() == arrow::ipc::MessageHeader::NONE && m.bodyLength() == 0
        })
}

/// A message that carries only `app_metadata`.
pub(crate) fn head_message<H: Serialize>(head: &H) -> FlightData {
    FlightData {
        data_header: no_ipc_header(),
        app_metadata: postcard::to_stdvec(head).unwrap_or_default().into(),
        ..Default::default()
    }
}

/// Reads a head from a message's `app_metadata`.
pub(crate) fn read_head<H: for<'a> Deserialize<'a>>(
    message: &FlightData,
    what: &str,
) -> Result<H, String> {
    postcard::from_bytes(&message.app_metadata).map_err(|e| {
        format!(
            "the first message should carry the {what} head in app_metadata, but its {} bytes \
             do not decode: {e} (a head lists at most {} blocks)",
            message.app_metadata.len(),
            shm_codec::MAX_BLOCKS
        )
    })
}

/// Counts bytes of data as they pass, for the numbers in errors.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a payload could not be sent or received.
#[derive(Debug)]
pub(crate) enum WireError {
    /// The stream broke (a transport error, as the gRPC layer reported it).
    Stream(tonic::Status),
    /// More data than the receiver accepts.
    TooLarge { size: u64, limit: u64 },
    /// The peer broke the format.
    Protocol(String),
    /// Shared memory, or the codecs, refused.
    Codec(shm_codec::CodecError),
    /// The receiver's budget of shared memory has no room for the data: the call is refused
    /// (`RESOURCE_EXHAUSTED`) and what it held is given back.
    Busy(String),
    /// The peer sent nothing for this long where a message was due.
    Stalled { what: &'static str, after: Duration },
}

impl From<shm_core::ShmError> for WireError {
    fn from(err: shm_core::ShmError) -> Self {
        WireError::Codec(err.into())
    }
}

impl From<shm_codec::CodecError> for WireError {
    fn from(err: shm_codec::CodecError) -> Self {
        WireError::Codec(err)
    }
}

/// A payload ready to be sent: its head, and the messages that carry its data, or the blocks
/// that go over a data connection.
pub(crate) struct Outgoing<'a> {
    pub head: PayloadHead,
    pub data: Box<dyn Iterator<Item = FlightData> + Send>,
    pub connection: Option<Outbound<'a>>,
}

/// Prepares a payload whose new blocks are still to be written for sending over a data
/// connection: the head names the blocks' lengths, and the connection writes their pieces from
/// where they lie (the copy into shared memory that [`outgoing`] would send from is skipped).
pub(crate) fn outgoing_unwritten(args: Unwritten<'_>) -> Outgoing<'_> {
    let key = side::new_key();
    let head = PayloadHead {
        codec: args.codec.to_string(),
        meta: args.meta,
        inline: args.inline,
        body: Body::Connection {
            lens: args.sources.iter().map(|s| s.len() as u64).collect(),
            key,
        },
    };
    Outgoing {
        head,
        data: Box::new(std::iter::empty()),
        connection: Some(Outbound {
            key,
            sources: args.sources,
        }),
    }
}

/// Prepares `payload` for sending. When `by_connection` (the peer takes data connections)
/// and its blocks hold at least [`DATA_CONNECTION_MIN_BYTES`], they go over a data
/// connection, whatever the codec. Otherwise an Arrow frame is decoded (from our own blocks,
/// without a copy) and sent as Flight record batches (one, if it holds at most
/// `whole_batch_bytes`), anything else as its blocks in chunks.
pub(crate) fn outgoing(
    payload: Payload,
    pool: &ShmPool,
    whole_batch_bytes: usize,
    sent: Arc<Counter>,
    by_connection: bool,
) -> Result<Outgoing<'static>, WireError> {
    let block_bytes: u64 = payload.blocks().iter().map(|b| b.len() as u64).sum();
    if by_connection && block_bytes >= DATA_CONNECTION_MIN_BYTES {
        let mut payload = payload;
        let blocks = payload.take_blocks();
        let key = side::new_key();
        let head = PayloadHead {
            codec: payload.codec.to_string(),
            meta: payload.meta.clone(),
            inline: payload.inline.clone(),
            body: Body::Connection {
                lens: blocks.iter().map(|b| b.len() as u64).collect(),
                key,
            },
        };
        return Ok(Outgoing {
            head,
            data: Box::new(std::iter::empty()),
            connection: Some(Outbound {
                key,
                sources: blocks.into_iter().map(Source::Block).collect(),
            }),
        });
    }
    if payload.codec == COLUMNS_CODEC {
        let decoder = own_decoder(pool, payload.blocks());
        // SAFETY: the payload is this process's own: our encoder wrote its blocks, which no
        // peer can write, from a batch this process built, so it is as valid as that batch
        // was. Only the IPC writer reads it, with bounds-checked slicing (a panic there, on a
        // batch built unchecked with bad offsets, is contained in `ArrowMessages::next`), and
        // the receiver validates what arrives.
        let batch = unsafe { shm_arrow::decode_trusted(&payload, &decoder) }?;
        let bytes: u64 = batch
            .columns()
            .iter()
            .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0) as u64)
            .sum();
        let head = PayloadHead {
            codec: payload.codec.to_string(),
            meta: Vec::new(),
            inline: Vec::new(),
            body: Body::Arrow {
                rows: batch.num_rows() as u64,
                bytes,
                data: crate::assemble::declared_layout(&batch).unwrap_or_default(),
            },
        };
        let rows_per_batch = rows_per_batch(
            batch.num_rows(),
            batch.num_columns(),
            bytes,
            whole_batch_bytes,
        );
        let data = ArrowMessages::new(batch, rows_per_batch, sent);
        return Ok(Outgoing {
            head,
            data: Box::new(data),
            connection: None,
        });
    }
    let mut payload = payload;
    let blocks = payload.take_blocks();
    let head = PayloadHead {
        codec: payload.codec.to_string(),
        meta: payload.meta.clone(),
        inline: payload.inline.clone(),
        body: Body::Blocks {
            lens: blocks.iter().map(|b| b.len() as u64).collect(),
        },
    };
    let chunks = blocks.into_iter().flat_map(move |block| {
        let sent = Arc::clone(&sent);
        let len = block.len();
        (0..len.div_ceil(CHUNK)).map(move |i| {
            let range = i * CHUNK..len.min((i + 1) * CHUNK);
            sent.add(range.len());
            FlightData {
                data_header: no_ipc_header(),
                data_body: Bytes::copy_from_slice(&block.as_slice()[range]),
                ..Default::default()
            }
        })
    });
    Ok(Outgoing {
        head,
        data: Box::new(chunks),
        connection: None,
    })
}

/// Rows per record batch: all of them when the frame's `bytes` fit in `whole` (the receiver
/// then copies the frame once); otherwise about [`SPLIT_BATCH_BYTES`] per batch — or, for a
/// wide frame, 512 bytes per column (at most [`WIDE_BATCH_BYTES`]), so that each batch's
/// metadata, about 50 bytes per column, stays a small part of it — in a multiple of 64 rows
/// so that validity bitmaps stay byte-aligned.
fn rows_per_batch(rows: usize, columns: usize, bytes: u64, whole: usize) -> usize {
    if rows == 0 || bytes <= whole as u64 {
        return rows.max(1);
    }
    let per_row = (bytes / rows as u64).max(1);
    let target = (columns as u64 * 512).clamp(SPLIT_BATCH_BYTES as u64, WIDE_BATCH_BYTES as u64);
    let rows_per = (target / per_row).max(64) as usize;
    rows_per.next_multiple_of(64).min(rows)
}

/// The largest record batch a wide frame is cut into.
const WIDE_BATCH_BYTES: usize = 64 << 20;

/// A record batch as Flight messages, encoded one slice at a time as the stream pulls them.
struct ArrowMessages {
    batch: RecordBatch,
    rows_per_batch: usize,
    next_row: usize,
    started: bool,
    generator: IpcDataGenerator,
    tracker: DictionaryTracker,
    options: IpcWriteOptions,
    context: IpcWriteContext,
    pending: VecDeque<FlightData>,
    sent: Arc<Counter>,
    failed: bool,
}

impl ArrowMessages {
    fn new(batch: RecordBatch, rows_per_batch: usize, sent: Arc<Counter>) -> Self {
        ArrowMessages {
            batch,
            rows_per_batch,
            next_row: 0,
            started: false,
            generator: IpcDataGenerator::default(),
            tracker: DictionaryTracker::new(false),
            options: IpcWriteOptions::default(),
            context: IpcWriteContext::default(),
            pending: VecDeque::new(),
            sent,
            failed: false,
        }
    }

    fn refill(&mut self) -> Result<(), arrow::error::ArrowError> {
        if !self.started {
            self.started = true;
            let schema = self.generator.schema_to_bytes_with_dictionary_tracker(
                self.batch.schema().as_ref(),
                &mut self.tracker,
                &self.options,
            );
            self.pending.push_back(schema.into());
            if self.batch.num_rows() == 0 {
                let (dictionaries, batch) = self.generator.encode(
                    &self.batch,
                    &mut self.tracker,
                    &self.options,
                    &mut self.context,
                )?;
                self.pending
                    .extend(dictionaries.into_iter().map(Into::into));
                self.pending.push_back(batch.into());
            }
            return Ok(());
        }
        if self.next_row >= self.batch.num_rows() {
            return Ok(());
        }
        let len = self
            .rows_per_batch
            .min(self.batch.num_rows() - self.next_row);
        let slice = self.batch.slice(self.next_row, len);
        self.next_row += len;
        let (dictionaries, batch) =
            self.generator
                .encode(&slice, &mut self.tracker, &self.options, &mut self.context)?;
        self.pending
            .extend(dictionaries.into_iter().map(Into::into));
        self.pending.push_back(batch.into());
        Ok(())
    }
}

impl Iterator for ArrowMessages {
    type Item = FlightData;

    fn next(&mut self) -> Option<FlightData> {
        if self.failed {
            return None;
        }
        if self.pending.is_empty() {
            // An encoding failure (or a panic of arrow's writer) ends the stream early; the
            // receiver reports the short stream.
            let refilled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.refill()));
            if !matches!(refilled, Ok(Ok(()))) {
                self.failed = true;
                return None;
            }
        }
        let message = self.pending.pop_front()?;
        self.sent
            .add(message.data_body.len() + message.data_header.len());
        Some(message)
    }
}

/// A decoder that attaches exactly the blocks this process holds, and nothing else: a
/// payload received over the network names only the blocks it was received into.
pub(crate) fn own_decoder(pool: &ShmPool, blocks: &[Arc<ShmBlock>]) -> Decoder {
    let blocks = blocks.iter().map(|b| (b.to_ref(), Arc::clone(b))).collect();
    Decoder::with_attacher(pool.clone(), Arc::new(OwnBlocks(blocks)))
}

/// The blocks a payload was received into, by reference: a frame of many columns finds each
/// of its buffers in constant time.
struct OwnBlocks(HashMap<ShmRef, Arc<ShmBlock>>);

impl Attacher for OwnBlocks {
    fn attach(&self, _pool: &ShmPool, r: &ShmRef) -> shm_core::Result<Arc<ShmBlock>> {
        self.0
            .get(r)
            .cloned()
            .ok_or_else(|| shm_core::ShmError::ForeignSegment {
                name: r.name.clone(),
                allowed: "the blocks this payload was received into".to_owned(),
            })
    }
}

/// The next message of `stream`, waiting at most `gap` (`what` names it in the error).
pub(crate) async fn next_message<S>(
    stream: &mut S,
    gap: Option<Duration>,
    what: &'static str,
) -> Result<Option<FlightData>, WireError>
where
    S: Stream<Item = Result<FlightData, tonic::Status>> + Unpin,
{
    let next = match gap {
        Some(after) => tokio::time::timeout(after, stream.next())
            .await
            .map_err(|_| WireError::Stalled { what, after })?,
        None => stream.next().await,
    };
    next.transpose().map_err(WireError::Stream)
}

/// How a receiver holds a sender to account: the most bytes it accepts, the shared memory it
/// may reserve for them (as they arrive), and how long it waits for each message.
pub(crate) struct Bounds<'a> {
    pub limit: u64,
    pub reservation: &'a Reservation,
    pub gap: Option<Duration>,
}

/// Where this side finds a payload's data connection.
pub(crate) enum Connections<'a> {
    /// None: this side takes no data connection.
    Refused,
    /// A server: the connection its client opens, matched by key.
    Accepted(&'a Rendezvous),
    /// A client: connects to the server at `host:port` to take the result.
    Opened(&'a str),
}

/// Receives the data of a payload whose head has arrived, into blocks of `encoder`'s pool,
/// within `bounds`. Memory is reserved as the data arrives: a block when its first byte
/// comes, a frame's columns with its first record batch. The stream must end after the
/// payload; a payload over a data connection is read from the one `connections` gives.
pub(crate) async fn receive<S>(
    stream: &mut S,
    head: PayloadHead,
    encoder: &Encoder,
    bounds: &Bounds<'_>,
    received: &Counter,
    connections: Connections<'_>,
) -> Result<Payload, WireError>
where
    S: Stream<Item = Result<FlightData, tonic::Status>> + Unpin,
{
    let size = head.size();
    if size > bounds.limit {
        return Err(WireError::TooLarge {
            size,
            limit: bounds.limit,
        });
    }
    // `lens` holds at most `MAX_BLOCKS` entries: `bounded_lens` read it.
    let sizes = |lens: &[u64]| {
        lens.iter()
            .map(|&len| {
                usize::try_from(len).map_err(|_| WireError::TooLarge {
                    size: len,
                    limit: usize::MAX as u64,
                })
            })
            .collect::<Result<Vec<usize>, _>>()
    };
    match head.body {
        Body::Blocks { lens } => {
            let lens = sizes(&lens)?;
            let blocks = fill_blocks(stream, &lens, encoder, bounds, received).await?;
            let blocks = blocks.into_iter().map(|b| encoder.freeze(b)).collect();
            Ok(Payload::new(head.codec, head.meta, blocks, head.inline))
        }
        Body::Connection { lens, key } => {
            let lens = sizes(&lens)?;
            let mut connection = match connections {
                Connections::Refused => {
                    return Err(WireError::Protocol(
                        "a payload over a data connection, which this side does not take (TLS, \
                         or turned off)"
                            .into(),
                    ));
                }
                Connections::Accepted(rendezvous) => {
                    rendezvous.claim(key, Kind::Push, bounds.gap).await?
                }
                Connections::Opened(addr) => side::connect(addr, key, Kind::Pull).await?,
            };
            let blocks =
                side::read_blocks(&mut connection, &lens, encoder, bounds, received).await?;
            let blocks = blocks.into_iter().map(|b| encoder.freeze(b)).collect();
            Ok(Payload::new(head.codec, head.meta, blocks, head.inline))
        }
        Body::Arrow { rows, data, .. } => {
            let batch = receive_batches(stream, rows, &data, encoder, bounds, received).await?;
            // An assembled batch, or one that came whole, lies in the blocks it was received
            // into and is referenced there; a concatenated one is copied into blocks of its own.
            Ok(encoder.encode(&ColumnFrame(batch))?)
        }
    }
}

/// Copies the data messages, in order, into blocks of `lens` bytes, each allocated (and
/// charged to the reservation) when its first byte comes, until the stream ends.
async fn fill_blocks<S>(
    stream: &mut S,
    lens: &[usize],
    encoder: &Encoder,
    bounds: &Bounds<'_>,
    received: &Counter,
) -> Result<Vec<ShmBlockMut>, WireError>
where
    S: Stream<Item = Result<FlightData, tonic::Status>> + Unpin,
{
    let total: u64 = lens.iter().map(|&l| l as u64).sum();
    let mut blocks: Vec<ShmBlockMut> = Vec::with_capacity(lens.len().min(4096));
    let mut at = 0usize;
    let allocate = |blocks: &mut Vec<ShmBlockMut>| -> Result<(), WireError> {
        let len = lens[blocks.len()];
        bounds.reservation.charge(len as u64)?;
        blocks.push(encoder.pool().alloc(len)?);
        Ok(())
    };
    while let Some(message) = next_message(stream, bounds.gap, "the next chunk").await? {
        if !is_no_header(&message.data_header) {
            return Err(WireError::Protocol(format!(
                "a chunk's data_header of {} bytes is not an IPC message of type NONE",
                message.data_header.len()
            )));
        }
        let mut body = &message.data_body[..];
        while !body.is_empty() {
            // The current block, once full, is followed by the next non-empty one.
            while blocks.last().is_none_or(|b| at == b.len()) {
                if blocks.len() == lens.len() {
                    return Err(WireError::Protocol(format!(
                        "the payload declared {total} bytes of blocks and more came"
                    )));
                }
                allocate(&mut blocks)?;
                at = 0;
            }
            let Some(block) = blocks.last_mut() else {
                return Err(WireError::Protocol("no block to copy a chunk into".into()));
            };
            let into = &mut block.as_mut_slice()[at..];
            let n = into.len().min(body.len());
            into[..n].copy_from_slice(&body[..n]);
            body = &body[n..];
            at += n;
            received.add(n);
        }
    }
    if received.get() < total {
        return Err(WireError::Protocol(format!(
            "the stream ended after {} of the {total} bytes of blocks the payload declared",
            received.get()
        )));
    }
    // Empty blocks after the last byte.
    while blocks.len() < lens.len() {
        allocate(&mut blocks)?;
    }
    Ok(blocks)
}

/// Reads Flight record batches until the stream ends, and makes them one batch. Each
/// message's body is copied into a block of `encoder`'s pool and decoded in place.
async fn receive_batches<S>(
    stream: &mut S,
    rows: u64,
    layout: &[u64],
    encoder: &Encoder,
    bounds: &Bounds<'_>,
    received: &Counter,
) -> Result<RecordBatch, WireError>
where
    S: Stream<Item = Result<FlightData, tonic::Status>> + Unpin,
{
    let mut schema: Option<SchemaRef> = None;
    let mut dictionaries: HashMap<i64, ArrayRef> = HashMap::new();
    let mut batches = Vec::new();
    let mut got_rows = 0u64;
    // Set once the schema has come, if the frame can be assembled in one copy.
    let mut assembly: Option<Assembly> = None;
    let limit = bounds.limit;
    while let Some(message) = next_message(stream, bounds.gap, "the next record batch").await? {
        received.add(message.data_header.len() + message.data_body.len());
        if received.get() > limit {
            return Err(WireError::TooLarge {
                size: received.get(),
                limit,
            });
        }
        // Messages without Arrow data (metadata only) are passed over.
        if is_no_header(&message.data_header) {
            continue;
        }
        if let Some(assembly) = assembly.as_mut() {
            assembly.reserve(encoder, bounds.reservation)?;
            let appended = contain(|| {
                let ipc = arrow::ipc::root_as_message(&message.data_header).map_err(|e| {
                    WireError::Protocol(format!("a data_header is not an IPC message: {e}"))
                })?;
                match ipc.header_as_record_batch() {
                    Some(batch) => assembly.append(batch, &message.data_body).map(|()| true),
                    None => Ok(false),
                }
            })?;
            if appended {
                continue;
            }
        }
        // Assembled keys point into the dictionary they were sent with: it may not change.
        if assembly.as_ref().is_some_and(|a| a.rows_so_far() > 0)
            && arrow::ipc::root_as_message(&message.data_header)
                .is_ok_and(|m| m.header_type() == arrow::ipc::MessageHeader::DictionaryBatch)
        {
            return Err(WireError::Protocol(
                "a dictionary was sent again in the middle of a frame with a declared layout"
                    .into(),
            ));
        }
        bounds.reservation.charge(message.data_body.len() as u64)?;
        let mut block = encoder.pool().alloc(message.data_body.len())?;
        block.as_mut_slice().copy_from_slice(&message.data_body);
        let body =
            shm_arrow::block_buffer(&encoder.freeze(block), 0, message.data_body.len() as u64)?;
        let had_schema = schema.is_some();
        let batch = contain(|| read_message(&message, body, &mut schema, &mut dictionaries))?;
        if let (false, Some(schema)) = (had_schema, &schema) {
            assembly = Assembly::new(schema, rows, layout, limit)?;
        }
        if let Some(batch) = batch {
            got_rows += batch.num_rows() as u64;
            if got_rows > rows {
                return Err(WireError::Protocol(format!(
                    "the frame declared {rows} rows and more came"
                )));
            }
            batches.push(batch);
        }
    }
    let Some(schema) = schema else {
        return Err(WireError::Protocol(
            "the stream ended before the frame's schema".into(),
        ));
    };
    if let Some(mut assembly) = assembly {
        assembly.reserve(encoder, bounds.reservation)?;
        if !batches.is_empty() {
            return Err(WireError::Protocol(
                "a frame with a declared layout also came as whole batches".into(),
            ));
        }
        return contain(|| assembly.finish(encoder, &dictionaries));
    }
    if got_rows != rows {
        return Err(WireError::Protocol(format!(
            "the stream ended after {got_rows} of the {rows} rows the frame declared"
        )));
    }
    match batches.len() {
        1 => Ok(batches.remove(0)),
        _ => contain(|| arrow::compute::concat_batches(&schema, &batches).map_err(arrow_error)),
    }
}

/// Decodes one IPC message of a Flight stream: a schema, a dictionary, or a record batch.
fn read_message(
    message: &FlightData,
    body: Buffer,
    schema: &mut Option<SchemaRef>,
    dictionaries: &mut HashMap<i64, ArrayRef>,
) -> Result<Option<RecordBatch>, WireError> {
    use arrow::ipc::{MessageHeader, reader, root_as_message};
    let ipc = root_as_message(&message.data_header)
        .map_err(|e| WireError::Protocol(format!("a data_header is not an IPC message: {e}")))?;
    match ipc.header_type() {
        MessageHeader::Schema => {
            if schema.is_some() {
                return Err(WireError::Protocol("a second schema message came".into()));
            }
            let fb = ipc
                .header_as_schema()
                .ok_or_else(|| WireError::Protocol("a schema message without schema".into()))?;
            let decoded = arrow::ipc::convert::try_fb_to_schema(fb).map_err(arrow_error)?;
            *schema = Some(Arc::new(decoded));
            Ok(None)
        }
        MessageHeader::DictionaryBatch => {
            let schema = schema.as_ref().ok_or_else(before_schema)?;
            let batch = ipc.header_as_dictionary_batch().ok_or_else(|| {
                WireError::Protocol("a dictionary message without dictionary".into())
            })?;
            reader::read_dictionary(&body, batch, schema, dictionaries, &ipc.version())
                .map_err(arrow_error)?;
            Ok(None)
        }
        MessageHeader::RecordBatch => {
            let schema = schema.as_ref().ok_or_else(before_schema)?;
            let batch = ipc.header_as_record_batch().ok_or_else(|| {
                WireError::Protocol("a record batch message without batch".into())
            })?;
            reader::read_record_batch(
                &body,
                batch,
                Arc::clone(schema),
                dictionaries,
                None,
                &ipc.version(),
            )
            .map(Some)
            .map_err(arrow_error)
        }
        other => Err(WireError::Protocol(format!(
            "an IPC message of type {other:?} in a frame"
        ))),
    }
}

fn before_schema() -> WireError {
    WireError::Protocol("a data message came before the schema".into())
}

fn arrow_error(err: arrow::error::ArrowError) -> WireError {
    WireError::Codec(shm_codec::CodecError::InvalidData {
        codec: COLUMNS_CODEC,
        reason: err.to_string(),
    })
}

/// Runs a decoder of network bytes, turning a panic inside arrow into an error.
fn contain<T>(decode: impl FnOnce() -> Result<T, WireError>) -> Result<T, WireError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|panic| {
        let message = shm_codec::panic_message(panic.as_ref());
        Err(arrow_error(arrow::error::ArrowError::IpcError(message)))
    })
}
