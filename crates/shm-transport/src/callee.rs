//! `Callee`: one calling interface for every kind of worker — a local process ([`Worker`])
//! or a worker on another host (shm-flight's `RemoteWorker`) — so that user code and
//! [`WorkerPool`](crate::WorkerPool) can mix them.
//!
//! The interface is object-safe: arguments arrive encoded (a [`Payload`] that holds its
//! blocks) and the reply leaves undecoded (a [`Reply`]), so a `Box<dyn Callee>` can be
//! called; [`call`](trait.Callee.html#method.call) on `dyn Callee` adds the typed layer.

use std::time::Duration;

use shm_codec::{Decode, Decoder, Encode, Encoder, Payload};
use shm_core::ShmPool;

use crate::error::Result;
use crate::worker::Worker;

/// A worker that answers calls by method name, wherever it runs.
pub trait Callee: Send + Sync + std::fmt::Debug {
    /// Calls `method` with arguments already encoded (into [`pool`](Self::pool) or any pool
    /// of this process), waiting at most `timeout`; the reply is decoded by the caller.
    fn call_encoded(
        &self,
        method: &str,
        args: &Payload,
        timeout: Option<Duration>,
    ) -> Result<Reply>;

    /// The pool arguments are best encoded into (a local worker reads them in place).
    fn pool(&self) -> &ShmPool;

    /// Whether the worker can take calls now: a local worker's process lives; a remote
    /// worker's last connection did not fail within the last second.
    fn is_alive(&self) -> bool;

    /// Brings a dead worker back: a local worker is started again; a remote one reconnects
    /// on its next call anyway, so this only clears what it remembers of the failure.
    fn restart(&mut self) -> Result<()>;

    /// Fails every call in flight at once (a local worker is killed; a remote worker's calls
    /// are cancelled and its connection dropped).
    fn cancel(&self);

    /// Ends the worker: a local one is asked to exit, then killed; a remote one is
    /// disconnected (the server goes on serving others).
    fn shutdown(self: Box<Self>);

    /// The process id of a local worker; `None` for a remote one.
    fn pid(&self) -> Option<u32>;

    /// Who the worker is, for messages: `worker 3 (pid 1234)`, `remote 10.0.0.7:7000`.
    fn describe(&self) -> String;
}

impl dyn Callee {
    /// Calls `method` with `args` and decodes its result as `R`.
    pub fn call<A: Encode + ?Sized, R: Decode>(&self, method: &str, args: &A) -> Result<R> {
        let args = Encoder::new(self.pool().clone()).encode(args)?;
        self.call_encoded(method, &args, None)?.decode()
    }

    /// [`call`](Self::call) with a timeout.
    pub fn call_timeout<A: Encode + ?Sized, R: Decode>(
        &self,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R> {
        let args = Encoder::new(self.pool().clone()).encode(args)?;
        self.call_encoded(method, &args, Some(timeout))?.decode()
    }
}

/// A result as it arrived, not yet decoded: the payload, the decoder that can read its
/// blocks, and what the transport must learn once decoding is over (which blocks the values
/// kept).
pub struct Reply {
    payload: Payload,
    /// `None` once decoding is over: the decoder goes before `finish` runs.
    decoder: Option<Decoder>,
    finish: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}

impl Reply {
    /// A reply whose blocks `decoder` attaches; `finish` runs once decoding is over (or the
    /// reply is dropped undecoded).
    pub fn new(payload: Payload, decoder: Decoder, finish: impl FnOnce() + Send + 'static) -> Self {
        Reply {
            payload,
            decoder: Some(decoder),
            finish: Some(Box::new(finish)),
        }
    }

    /// The payload as it arrived.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// Decodes the result as `R`.
    pub fn decode<R: Decode>(mut self) -> Result<R> {
        let value = match &self.decoder {
            Some(decoder) => R::decode(&self.payload, decoder),
            None => unreachable_decoded(),
        };
        self.end();
        Ok(value?)
    }

    /// Ends decoding: the decoder goes, then the transport learns what the values kept.
    fn end(&mut self) {
        self.decoder = None;
        if let Some(finish) = self.finish.take() {
            finish();
        }
    }
}

/// A reply is decoded once (`decode` takes it by value), so its decoder is always there.
fn unreachable_decoded<R>() -> shm_codec::Result<R> {
    Err(shm_codec::CodecError::InvalidData {
        codec: "reply",
        reason: "the reply was already decoded".into(),
    })
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.end();
    }
}

impl Callee for Worker {
    fn call_encoded(
        &self,
        method: &str,
        args: &Payload,
        timeout: Option<Duration>,
    ) -> Result<Reply> {
        self.conn().call_encoded(method, args, timeout)
    }

    fn pool(&self) -> &ShmPool {
        Worker::pool(self)
    }

    fn is_alive(&self) -> bool {
        Worker::is_alive(self)
    }

    fn restart(&mut self) -> Result<()> {
        Worker::restart(self)
    }

    fn cancel(&self) {
        self.kill();
    }

    fn shutdown(self: Box<Self>) {
        Worker::shutdown(*self);
    }

    fn pid(&self) -> Option<u32> {
        Some(Worker::pid(self))
    }

    fn describe(&self) -> String {
        format!("worker {} (pid {})", self.id(), Worker::pid(self))
    }
}
