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
    /// The worker's memory could not hold the result (or the reply that carries it). The
    /// caller sees this as [`ShmError::OutOfSharedMemory`]; the worker goes on.
    OutOfSharedMemory {
        /// Bytes the worker asked for.
        requested: u64,
        /// Bytes the worker's system had available.
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

    /// The worker failed inside a call; it goes on serving. (Converting a [`RemoteError`]
    /// with `From` gives [`Shm`](Self::Shm) for a worker that ran out of shared memory, as
    /// [`from_remote`](Self::from_remote) does.)
    #[error("remote error in {0}")]
    Remote(RemoteError),

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

    /// The peer holds more of our blocks on loan than it may (`WorkerConfig::loan_limit`): it
    /// does not give them back. The call's arguments are not sent; the peer's other calls fail
    /// the same way until it returns some, and other workers are untouched.
    #[error(
        "the peer holds {on_loan} bytes of our blocks on loan; {requested} more would pass its \
         limit of {limit} bytes"
    )]
    LoanLimit {
        /// Bytes the peer holds on loan now.
        on_loan: u64,
        /// Bytes the call would have lent it.
        requested: u64,
        /// The limit.
        limit: u64,
    },

    /// The peer sent something that breaks the protocol (a corrupt frame or channel, a hello
    /// that lies, a ring it jammed), or the process a worker runs in is not set up as one.
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

    /// A worker on another host could not be reached, or its connection failed: the error of
    /// the crate that connects to it (shm-flight's `FlightError`, whose `of` finds it here),
    /// kept whole as the source.
    #[error(transparent)]
    Connection(Box<dyn std::error::Error + Send + Sync + 'static>),

    /// The arguments of a call name blocks they do not hold: a payload read from a peer
    /// (which refers to the peer's memory) passed on as it is. Decode it and encode the value,
    /// or re-send the decoded value, which carries its blocks.
    #[error(
        "the arguments of {method} name {named} blocks but hold {held}: a payload read from a \
         peer cannot be sent on as it is"
    )]
    UnbackedPayload {
        /// The method called.
        method: String,
        /// Blocks the payload names.
        named: usize,
        /// Blocks it holds.
        held: usize,
    },

    /// A [`Callee`](crate::Callee) returned without handing the reply of a call to the
    /// decoder (a bug in that `Callee`), or a call of a batch never ran.
    #[error("{method}: the reply was not decoded")]
    NotDecoded {
        /// The method called.
        method: String,
    },

    /// The worker pool was shut down (or has no worker left to call).
    #[error("the worker pool of {workers} workers is shut down")]
    PoolShutdown {
        /// How many workers the pool had.
        workers: usize,
    },
}

impl RemoteError {
    /// The worker's error for a failure to decode arguments or encode a result (`kind`):
    /// running out of shared memory becomes `OutOfSharedMemory`, with its numbers.
    pub fn from_codec(method: &str, kind: RemoteErrorKind, err: &CodecError) -> Self {
        let kind = match err {
            CodecError::Shm(ShmError::OutOfSharedMemory {
                requested,
                available,
            }) => RemoteErrorKind::OutOfSharedMemory {
                requested: *requested,
                available: *available,
            },
            _ => kind,
        };
        RemoteError {
            method: method.to_owned(),
            kind,
            message: err.to_string(),
        }
    }
}

impl TransportError {
    /// The caller's error for a failure inside a worker: running out of shared memory there
    /// is the same error as running out here; anything else is [`TransportError::Remote`].
    pub fn from_remote(remote: RemoteError) -> Self {
        match remote.kind {
            RemoteErrorKind::OutOfSharedMemory {
                requested,
                available,
            } => TransportError::Shm(ShmError::OutOfSharedMemory {
                requested,
                available,
            }),
            _ => TransportError::Remote(remote),
        }
    }
}

impl From<RemoteError> for TransportError {
    fn from(remote: RemoteError) -> Self {
        TransportError::from_remote(remote)
    }
}

/// The result type of shm-transport.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

pub(crate) fn malformed(what: impl Into<String>) -> TransportError {
    TransportError::Malformed { what: what.into() }
}
