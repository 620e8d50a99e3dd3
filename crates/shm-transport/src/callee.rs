//! The calling interface every kind of worker shares — a local process ([`Worker`]), a worker
//! on another host (shm-flight's `RemoteWorker`), a [`WorkerPool`](crate::WorkerPool) of
//! either — in three parts:
//!
//! - [`Callee`], small and object-safe: calls with arguments already encoded (a [`Payload`]
//!   that holds its blocks) and hands the reply to a decoding callback, so a `&dyn Callee` or a
//!   `Box<dyn Callee>` can be called.
//! - [`CalleeExt`], the typed `call` and `call_timeout`, written once for every `Callee`
//!   (`dyn Callee` included): `use shm_transport::CalleeExt` brings them into scope.
//! - [`Lifecycle`], what a pool does to its workers: is it alive, restart it, cancel its calls,
//!   shut it down.

use std::time::Duration;

use shm_codec::{Decode, Decoder, Encode, Encoder, Payload, Unwritten};
use shm_core::ShmPool;

use crate::error::{Result, TransportError};
use crate::worker::Worker;

/// What a caller does with a reply: decode it from its payload with the decoder that can read
/// its blocks, keeping what it needs.
pub type DecodeReply<'a> = dyn FnMut(&Payload, &Decoder) -> Result<()> + 'a;

/// A worker that answers calls by method name, wherever it runs.
pub trait Callee: Send + Sync + std::fmt::Debug {
    /// Calls `method` with arguments already encoded (into [`shm_pool`](Self::shm_pool) or any pool
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

    /// Whether this callee copies its arguments' bytes onto a socket anyway, so that it gains
    /// by taking them before they are copied into new blocks
    /// ([`call_unwritten`](Self::call_unwritten)). `false` by default.
    fn takes_unwritten(&self) -> bool {
        false
    }

    /// [`call_with`](Self::call_with) for arguments encoded up to the copy into new blocks
    /// (see [`Unwritten`]). By default the blocks are written into
    /// [`shm_pool`](Self::shm_pool) and the call goes on as `call_with`; a callee that
    /// [`takes_unwritten`](Self::takes_unwritten) sends the pieces from where they lie.
    fn call_unwritten(
        &self,
        method: &str,
        args: Unwritten<'_>,
        timeout: Option<Duration>,
        decode: &mut DecodeReply<'_>,
    ) -> Result<()> {
        let args = args.write(&Encoder::new(self.shm_pool().clone()))?;
        self.call_with(method, args, timeout, decode)
    }

    /// The shared-memory pool arguments are best encoded into (a local worker reads them in
    /// place).
    fn shm_pool(&self) -> &ShmPool;

    /// Who the worker is, for messages: `worker 3 (pid 1234)`, `remote 10.0.0.7:7000`.
    fn describe(&self) -> String;
}

/// The typed calls of every [`Callee`]: arguments encoded into its pool, the result decoded as
/// `R`.
///
/// ```no_run
/// use shm_codec::Serde;
/// use shm_transport::{CalleeExt, Worker, WorkerConfig};
///
/// # fn main() -> Result<(), shm_transport::TransportError> {
/// let worker = Worker::spawn(WorkerConfig::new("my-worker"))?;
/// let Serde(sum): Serde<f64> = worker.call("sum", &Serde(vec![1.0, 2.0]))?;
/// let Serde(again): Serde<f64> =
///     worker.call_timeout("sum", &Serde(vec![sum]), std::time::Duration::from_secs(1))?;
/// # let _ = again;
/// # Ok(())
/// # }
/// ```
pub trait CalleeExt: Callee {
    /// Calls `method` with `args` and decodes its result as `R`; waits as long as it takes,
    /// or until the worker dies.
    fn call<A: Encode + ?Sized, R: Decode>(&self, method: &str, args: &A) -> Result<R> {
        call_decoded(self, method, args, None)
    }

    /// [`call`](Self::call) with a timeout. After a timeout the worker may still be busy with
    /// the call; restart it ([`Lifecycle::restart`]) if it is hung.
    fn call_timeout<A: Encode + ?Sized, R: Decode>(
        &self,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R> {
        call_decoded(self, method, args, Some(timeout))
    }
}

impl<C: Callee + ?Sized> CalleeExt for C {}

fn call_decoded<C: Callee + ?Sized, A: Encode + ?Sized, R: Decode>(
    callee: &C,
    method: &str,
    args: &A,
    timeout: Option<Duration>,
) -> Result<R> {
    let encoder = Encoder::new(callee.shm_pool().clone());
    let mut value = None;
    let mut decode = |payload: &Payload, decoder: &Decoder| {
        value = Some(R::decode(payload, decoder)?);
        Ok(())
    };
    match callee
        .takes_unwritten()
        .then(|| encoder.encode_unwritten(args))
        .transpose()?
        .flatten()
    {
        Some(args) => callee.call_unwritten(method, args, timeout, &mut decode)?,
        None => callee.call_with(method, encoder.encode(args)?, timeout, &mut decode)?,
    }
    value.ok_or_else(|| TransportError::NotDecoded {
        method: method.to_owned(),
    })
}

/// A worker's life, as a [`WorkerPool`](crate::WorkerPool) manages it.
pub trait Lifecycle: Callee {
    /// Whether the worker can take calls now: a local worker's process lives; a remote
    /// worker's last connection did not fail within the last second.
    fn is_alive(&self) -> bool;

    /// Brings a dead worker back: a local worker is started again (calls meanwhile fail at
    /// once, as the dead worker's would); a remote one reconnects on its next call anyway, so
    /// this only clears what it remembers of the failure.
    fn restart(&self) -> Result<()>;

    /// Fails every call in flight at once (a local worker is killed; a remote worker's calls
    /// are cancelled and its connection dropped).
    fn cancel(&self);

    /// Ends the worker: a local one is asked to exit, then killed; a remote one is
    /// disconnected (the server goes on serving others).
    fn shutdown(self: Box<Self>);

    /// The process id of a local worker; `None` for a remote one.
    fn pid(&self) -> Option<u32>;
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

    fn shm_pool(&self) -> &ShmPool {
        Worker::shm_pool(self)
    }

    fn describe(&self) -> String {
        format!("worker {} (pid {})", self.id(), Worker::pid(self))
    }
}

impl Lifecycle for Worker {
    fn is_alive(&self) -> bool {
        Worker::is_alive(self)
    }

    fn restart(&self) -> Result<()> {
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
}
