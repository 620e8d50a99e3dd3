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

    /// A remote worker could not be reached, or its connection failed during a call.
    #[error("remote worker {addr}: {fault}")]
    Network {
        /// The worker's address, as the caller configured it (`http://10.0.0.7:7000`).
        addr: String,
        /// What failed, with the numbers.
        fault: NetworkFault,
    },

    /// A blocking call was made on a thread that drives an async runtime, which it would
    /// stall (or deadlock).
    #[error(
        "{what} blocks, and was called on a thread of an async runtime; call it from \
         `spawn_blocking` or a plain thread"
    )]
    BlockingInAsync {
        /// The function called.
        what: &'static str,
    },

    /// The worker pool was shut down (or has no worker left to call).
    #[error("the worker pool of {workers} workers is shut down")]
    PoolShutdown {
        /// How many workers the pool had.
        workers: usize,
    },
}

/// What went wrong between a caller and a remote worker. Every fault but `Unauthenticated`
/// and `TooLarge` leaves the client ready to reconnect on its next call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkFault {
    /// Nothing accepted the connection (no server on the port, a firewall, a bad name).
    #[error("connection refused: {reason}")]
    Refused {
        /// What the operating system or the TLS layer said.
        reason: String,
    },
    /// The connection broke during the call; the call may or may not have run.
    #[error(
        "connection lost during {method} after sending {sent} of {to_send} bytes and \
         receiving {received}: {reason}"
    )]
    Lost {
        /// The method called.
        method: String,
        /// Argument bytes handed to the connection.
        sent: u64,
        /// Argument bytes the call had to send.
        to_send: u64,
        /// Result bytes received.
        received: u64,
        /// What the transport said.
        reason: String,
    },
    /// The server is not the instance this client talked to before (it restarted, and what
    /// its handlers held is gone). The call was not run; the next call runs on the new
    /// instance.
    #[error("the server restarted (instance {was:016x}, now {now:016x}); {method} was not run")]
    Restarted {
        /// The method called.
        method: String,
        /// The instance the client knew.
        was: u64,
        /// The instance that answered.
        now: u64,
    },
    /// The call did not finish within its timeout; it was cancelled on the connection (the
    /// server finishes a handler already running, and drops its result).
    #[error(
        "{method} timed out after {timeout:?}, having sent {sent} of {to_send} bytes and \
         received {received}"
    )]
    Timeout {
        /// The method called.
        method: String,
        /// The timeout that passed.
        timeout: Duration,
        /// Argument bytes handed to the connection.
        sent: u64,
        /// Argument bytes the call had to send.
        to_send: u64,
        /// Result bytes received.
        received: u64,
    },
    /// A payload is larger than the receiving side accepts.
    #[error("{what} of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// `the arguments of M` or `the result of M`.
        what: String,
        /// Its size.
        size: u64,
        /// The receiver's limit.
        limit: u64,
    },
    /// The server refused the caller's bearer token (or its absence).
    #[error("the server refused the call: {reason}")]
    Unauthenticated {
        /// What the server said.
        reason: String,
    },
    /// The peer broke the remote protocol (a stream that ends early, sizes that disagree).
    #[error("protocol error: {what}")]
    Protocol {
        /// What was wrong, with the numbers.
        what: String,
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

/// The result type of shm-transport.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

pub(crate) fn malformed(what: impl Into<String>) -> TransportError {
    TransportError::Malformed { what: what.into() }
}
