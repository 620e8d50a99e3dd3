//! `Callee`: one calling interface for every kind of worker — a local process ([`Worker`])
//! or a worker on another host (shm-flight's `RemoteWorker`) — so that user code and
//! [`WorkerPool`](crate::WorkerPool) can mix them.
//!
//! The interface is object-safe: arguments arrive encoded (a [`Payload`] that holds its
//! blocks) and the reply goes to a decoding callback, so a `Box<dyn Callee>` can be called;
//! [`call`](trait.Callee.html#method.call) on `dyn Callee` adds the typed layer.

use std::time::Duration;

use shm_codec::{Decode, Decoder, Encode, Encoder, Payload};
use shm_core::ShmPool;

use crate::error::Result;
use crate::worker::Worker;

/// What a caller does with a reply: decode it from its payload with the decoder that can read
/// its blocks, keeping what it needs.
pub type DecodeReply<'a> = dyn FnMut(&Payload, &Decoder) -> Result<()> + 'a;

/// A worker that answers calls by method name, wherever it runs.
pub trait Callee: Send + Sync + std::fmt::Debug {
    /// Calls `method` with arguments already encoded (into [`pool`](Self::pool) or any pool
    /// of this process; the call takes the payload, so it is sent without a copy), waiting at
    /// most `timeout`, and hands the reply to `decode` while the call is still under way (a
    /// local worker's loans stay in place until it returns).
    fn call_with(
        &self,
        method: &str,
        args: Payload,
        timeout: Option<Duration>,
        decode: &mut DecodeReply<'_>,
    ) -> Result<()>;

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
        self.call_decoded(method, args, None)
    }

    /// [`call`](Self::call) with a timeout.
    pub fn call_timeout<A: Encode + ?Sized, R: Decode>(
        &self,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R> {
        self.call_decoded(method, args, Some(timeout))
    }

    fn call_decoded<A: Encode + ?Sized, R: Decode>(
        &self,
        method: &str,
        args: &A,
        timeout: Option<Duration>,
    ) -> Result<R> {
        let args = Encoder::new(self.pool().clone()).encode(args)?;
        let mut value = None;
        self.call_with(method, args, timeout, &mut |payload, decoder| {
            value = Some(R::decode(payload, decoder)?);
            Ok(())
        })?;
        value.ok_or_else(|| crate::error::malformed(format!("{method}: the reply was not decoded")))
    }
}

impl Callee for Worker {
    fn call_with(
        &self,
        method: &str,
        args: Payload,
        timeout: Option<Duration>,
        decode: &mut DecodeReply<'_>,
    ) -> Result<()> {
        self.conn().call_decode(method, args, timeout, decode)
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
