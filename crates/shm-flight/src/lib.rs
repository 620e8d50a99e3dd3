//! Remote workers over Arrow Flight: the handlers a local worker serves, served to other
//! hosts, and called through the same interface.
//!
//! A host runs a [`Server`] over a [`Router`](shm_transport::Router) — the very router its
//! local workers would [`serve`](shm_transport::serve). A caller holds a [`RemoteWorker`],
//! which implements [`Callee`](shm_transport::Callee) like a local
//! [`Worker`](shm_transport::Worker) does, so user code and a
//! [`WorkerPool`](shm_transport::WorkerPool) mix local and remote workers freely.
//!
//! Each call is one Flight `DoExchange` stream: the arguments go up, the result comes back,
//! each as a head message (the payload's codec and metadata in `app_metadata`) followed by
//! its data. Arrow frames travel as standard Flight record batches, which any Flight client
//! reads; arrays and other payloads as their shared-memory blocks, cut into chunks of at most
//! [`CHUNK`] bytes. Either way the receiver copies the data once, off the network, into
//! blocks of its own pool, so handlers receive `ShmArray`, `SimpleFrame`, `ColumnFrame` and
//! `Serde` values exactly as they would from a local parent, and results come back into the
//! caller's pool. HTTP/2 flow control bounds how far a sender runs ahead of its receiver
//! (about [`STREAM_WINDOW`] bytes per call).
//!
//! A payload of at least [`DATA_CONNECTION_MIN_BYTES`] of blocks, of any codec, travels
//! instead as bare bytes on a *data connection*: a TCP connection of its own to the server's
//! port, named by a random key in the call's head, which costs the kernel's two copies where
//! gRPC's messages cost five. Over TLS, or with
//! [`RemoteConfig::with_data_connections(false)`](RemoteConfig::with_data_connections), the
//! blocks go as gRPC chunks.
//!
//! DoExchange is the Flight verb for this: one bidirectional stream per call carries the
//! arguments, the result, and the metadata of both; DoPut plus DoGet would take two round
//! trips and a ticket to tie them, DoAction carries opaque bytes without Arrow data.
//!
//! What can go wrong is a [`FlightError::Network`] (inside
//! [`TransportError::Connection`](shm_transport::TransportError::Connection); see
//! [`FlightError::of`]) with the server's address and the numbers ([`NetworkFault`]):
//! refused, lost mid-call, server restarted, timed out, too large, unauthenticated. The
//! client connects again on its next call. A server checks a bearer token when it has one
//! and, with the `tls` feature, speaks TLS.
//!
//! # Example
//!
//! ```no_run
//! use shm_codec::Serde;
//! use shm_flight::{RemoteConfig, RemoteWorker, Server, ServerConfig};
//! use shm_transport::{CalleeExt, Router};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // On the worker host:
//! let router = Router::new().handle("add", |Serde((a, b)): Serde<(i64, i64)>, _| {
//!     Ok::<_, String>(Serde(a + b))
//! });
//! let server = Server::start(router, ServerConfig::new("0.0.0.0:7000".parse()?).with_token("s3cret"))?;
//!
//! // On the calling host:
//! let worker = RemoteWorker::new(RemoteConfig::new("http://10.0.0.7:7000").with_token("s3cret"))?;
//! let Serde(sum): Serde<i64> = worker.call("add", &Serde((2, 3)))?;
//! assert_eq!(sum, 5);
//! # drop(server);
//! # Ok(())
//! # }
//! ```

mod assemble;
mod budget;
mod client;
mod error;
mod server;
mod side;
mod wire;

pub use client::{DOWN_FOR, RemoteConfig, RemoteWorker};
pub use error::{FlightError, NetworkFault};
pub use server::{Server, ServerConfig};
pub use side::DATA_CONNECTION_MIN_BYTES;
pub use wire::{CHUNK, SPLIT_BATCH_BYTES, WIRE_VERSION};

/// The HTTP/2 window of each call, in bytes: how much data may be in flight, unread by the
/// receiver, on one call (the connection's window is twice this).
pub const STREAM_WINDOW: u32 = 8 << 20;

/// Default for the largest payload a side accepts: 16 GiB.
pub const DEFAULT_MAX_PAYLOAD: u64 = 16 << 30;

/// Default for the largest Arrow frame sent as one Flight record batch: 8 MiB; a larger one
/// travels as batches of about [`SPLIT_BATCH_BYTES`] (faster than one large gRPC message).
/// A receiver copies a frame of flat columns (fixed-width, boolean, strings, binaries,
/// dictionaries) once, from each message straight into blocks of the whole frame, however
/// many batches it came in; a frame with nested columns that came as several batches is
/// concatenated (one more copy).
pub const DEFAULT_WHOLE_BATCH_BYTES: usize = 8 << 20;

/// Default for the largest single gRPC message a side accepts: 256 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 256 << 20;

/// What one side of a remote call accepts, and how it sends Arrow frames: the same three
/// numbers for a client ([`RemoteConfig::with_limits`]) and a server
/// ([`ServerConfig::with_limits`]).
///
/// ```
/// use shm_flight::{Limits, RemoteConfig};
///
/// let limits = Limits::default().with_max_payload(1 << 30);
/// let config = RemoteConfig::new("http://10.0.0.7:7000").with_limits(limits);
/// assert_eq!(config.limits().max_payload(), 1 << 30);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    max_payload: u64,
    whole_batch_bytes: usize,
    max_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: DEFAULT_MAX_PAYLOAD,
            whole_batch_bytes: DEFAULT_WHOLE_BATCH_BYTES,
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }
}

impl Limits {
    /// Sets the largest payload accepted, in bytes: a server refuses larger arguments before
    /// it reads any of their data, a client fails a call whose result is larger. Default
    /// 16 GiB.
    pub fn with_max_payload(mut self, bytes: u64) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Sets the largest Arrow frame sent as one Flight record batch; a larger one goes as
    /// batches of about [`SPLIT_BATCH_BYTES`]. Default 8 MiB (see
    /// [`DEFAULT_WHOLE_BATCH_BYTES`]).
    pub fn with_whole_batch_bytes(mut self, bytes: usize) -> Self {
        self.whole_batch_bytes = bytes;
        self
    }

    /// Sets the largest single gRPC message accepted (a chunk, or one record batch of an
    /// Arrow frame). Default 256 MiB.
    pub fn with_max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// The largest payload accepted.
    pub fn max_payload(&self) -> u64 {
        self.max_payload
    }

    /// The largest Arrow frame sent as one record batch.
    pub fn whole_batch_bytes(&self) -> usize {
        self.whole_batch_bytes
    }

    /// The largest single gRPC message accepted.
    pub fn max_message(&self) -> usize {
        self.max_message
    }
}

/// Entry points for the mutation tests: what a server does with the messages of a call, and
/// the messages a client sends. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use arrow_flight::FlightData;
    use shm_codec::{Encoder, Payload, Registry};
    use shm_core::ShmPool;

    use crate::wire::{self, CallHead, Counter, WIRE_VERSION};

    /// The messages of a call of `method` with `args`, as a client sends them.
    pub fn call_messages(pool: &ShmPool, method: &str, args: Payload) -> Vec<FlightData> {
        let sent = std::sync::Arc::new(Counter::default());
        let Ok(outgoing) =
            wire::outgoing(args, pool, crate::DEFAULT_WHOLE_BATCH_BYTES, sent, false)
        else {
            return Vec::new();
        };
        let head = CallHead {
            wire: WIRE_VERSION,
            method: method.to_owned(),
            instance: None,
            args: outgoing.head,
            takes_connection: false,
        };
        std::iter::once(wire::head_message(&head))
            .chain(outgoing.data)
            .collect()
    }

    /// Receives a call whose arguments are an Arrow frame, as a server does, and gives the
    /// frame's batch.
    pub fn receive_frame(
        pool: &ShmPool,
        messages: Vec<FlightData>,
    ) -> Result<arrow::array::RecordBatch, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| e.to_string())?;
        let payload = runtime.block_on(receive_payload(pool, messages, u64::MAX))?;
        let decoder = wire::own_decoder(pool, payload.blocks());
        decoder
            .decode::<shm_arrow::ColumnFrame>(&payload)
            .map(|frame| frame.0)
            .map_err(|e| e.to_string())
    }

    async fn receive_payload(
        pool: &ShmPool,
        messages: Vec<FlightData>,
        limit: u64,
    ) -> Result<Payload, String> {
        let mut stream = futures::stream::iter(messages.into_iter().map(Ok));
        let Some(Ok(first)) = futures::StreamExt::next(&mut stream).await else {
            return Err("no head".to_owned());
        };
        let head: CallHead = wire::read_head(&first, "call")?;
        let encoder = Encoder::new(pool.clone());
        let received = Counter::default();
        let unlimited = crate::budget::Reservation::unlimited();
        let bounds = wire::Bounds {
            limit,
            reservation: &unlimited,
            gap: None,
        };
        let connections = wire::Connections::Refused;
        wire::receive(
            &mut stream,
            head.args,
            &encoder,
            &bounds,
            &received,
            connections,
        )
        .await
        .map_err(|e| format!("{e:?}"))
    }

    /// Receives a call's messages as a server does — its head, then its data into `pool`,
    /// at most `limit` bytes — and decodes the arguments with every codec there is.
    pub fn receive_call(
        pool: &ShmPool,
        messages: Vec<FlightData>,
        limit: u64,
    ) -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let payload = receive_payload(pool, messages, limit).await?;
            let decoder = wire::own_decoder(pool, payload.blocks());
            // Serde values have no codec of their own in the registry: they decode by type.
            if payload.codec == shm_codec::SERDE_CODEC {
                return decoder
                    .decode::<shm_codec::Serde<Vec<u8>>>(&payload)
                    .map(drop)
                    .map_err(|e| e.to_string());
            }
            let mut registry = Registry::new();
            registry.register(shm_arrow::ColumnsCodec);
            registry
                .decode(&payload, &decoder)
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}
