//! The one error type of shm-transport.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shm_codec::CodecError;
use shm_core::ShmError;

/// What went wrong inside the worker while it handled a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RemoteErrorKind {
    /// The handler returned an error.
    Handler,
    /// The handler panicked; the worker caught it and goes on serving.
    Panic,
    /// No handler has this name.
    UnknownMethod,
    /// The arguments could not be decoded as the handler's argument type.
    BadArguments,
    /// The handler's result could not be encoded.
    BadResult,
    /// The worker's `/dev/shm` could not hold the result (or the reply that carries it). The
    /// caller sees this as [`ShmError::OutOfSharedMemory`]; the worker goes on.
    OutOfSharedMemory {
        /// Bytes the worker asked for.
        requested: u64,
        /// Bytes `/dev/shm` had free.
        available: u64,
    },
}

/// An error that happened in the worker, as the caller receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{method}: {kind:?}: {message}")]
pub struct RemoteError {
    /// The method called.
    pub method: String,
    /// What kind of failure.
    pub kind: RemoteErrorKind,
    /// The handler's error message, the panic message, or what failed to decode.
    pub message: String,
}

/// Everything that can go wrong between a parent and its worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Shared memory could not be allocated or attached.
    #[error(transparent)]
    Shm(#[from] ShmError),

    /// A value could not be encoded, or a payload decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),

    /// The worker failed inside a call; it goes on serving.
    #[error("remote error in {0}")]
    Remote(#[from] RemoteError),

    /// The worker process ended; every pending call fails with this.
    #[error("worker {worker} (pid {pid}) died: {status}")]
    WorkerDied {
        /// The worker's id, as in its stderr prefix.
        worker: u32,
        /// Its process id.
        pid: u32,
        /// How it ended: `exit code N` or `killed by signal N`.
        status: String,
    },

    /// A call got no reply within its timeout. The worker may be hung: restart it.
    #[error("call {method} timed out after {timeout:?}")]
    Timeout {
        /// The method called.
        method: String,
        /// The timeout that passed.
        timeout: Duration,
    },

    /// The worker process could not be started.
    #[error("cannot start worker {program}: {source}")]
    Spawn {
        /// The executable.
        program: String,
        /// Why the OS refused.
        #[source]
        source: std::io::Error,
    },

    /// The worker started but ended (or hung) before its handshake.
    #[error("worker {program} failed to start ({status}); end of its stderr:\n{stderr}")]
    StartFailed {
        /// The executable.
        program: String,
        /// `exit code N`, `killed by signal N`, or `no handshake within Ns`.
        status: String,
        /// The last lines the worker wrote to stderr.
        stderr: String,
    },

    /// The two sides speak different protocol versions.
    #[error("protocol mismatch: this side speaks version {ours}, the peer {theirs}")]
    ProtocolMismatch {
        /// Our version.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },

    /// The peer sent something that breaks the protocol (a corrupt frame or channel).
    #[error("malformed message from the peer: {what}")]
    Malformed {
        /// What was wrong, with the numbers.
        what: String,
    },

    /// The process was not started as a worker (no channel in its environment).
    #[error("not a worker process: {variable} is not set")]
    NotAWorker {
        /// The environment variable that names the channel.
        variable: &'static str,
    },

    /// The worker was shut down.
    #[error("worker {worker} is shut down")]
    ShutDown {
        /// The worker's id.
        worker: u32,
    },

    /// The worker pool was shut down (or has no worker left to call).
    #[error("the worker pool of {workers} workers is shut down")]
    PoolShutDown {
        /// How many workers the pool had.
        workers: usize,
    },
}

/// The result type of shm-transport.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

pub(crate) fn malformed(what: impl Into<String>) -> TransportError {
    TransportError::Malformed { what: what.into() }
}
