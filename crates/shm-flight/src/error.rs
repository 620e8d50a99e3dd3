//! The errors of remote workers: the network's, kept apart from shm-transport's.
//!
//! A `RemoteWorker` is a [`Callee`](shm_transport::Callee), whose calls return a
//! [`TransportError`]; what only a network can do wrong arrives there as
//! [`TransportError::Connection`] holding a [`FlightError`], which [`FlightError::of`] finds.

use std::time::Duration;

use shm_transport::TransportError;

/// What went wrong with a remote worker that a local one cannot do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlightError {
    /// The worker could not be reached, or its connection failed during a call.
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
}

impl FlightError {
    /// The `FlightError` a call's error carries, if it carries one.
    ///
    /// ```
    /// use shm_flight::{FlightError, NetworkFault};
    /// use shm_transport::TransportError;
    ///
    /// let err = TransportError::from(FlightError::Network {
    ///     addr: "http://10.0.0.7:7000".into(),
    ///     fault: NetworkFault::Refused { reason: "nobody listens".into() },
    /// });
    /// assert!(matches!(
    ///     FlightError::of(&err),
    ///     Some(FlightError::Network { fault: NetworkFault::Refused { .. }, .. })
    /// ));
    /// ```
    pub fn of(err: &TransportError) -> Option<&FlightError> {
        match err {
            TransportError::Connection(source) => source.downcast_ref(),
            _ => None,
        }
    }

    /// The network fault a call's error carries, with the worker's address, if it carries one.
    pub fn fault_of(err: &TransportError) -> Option<(&str, &NetworkFault)> {
        match Self::of(err)? {
            FlightError::Network { addr, fault } => Some((addr, fault)),
            FlightError::BlockingInAsync { .. } => None,
        }
    }
}

impl From<FlightError> for TransportError {
    fn from(err: FlightError) -> Self {
        TransportError::Connection(Box::new(err))
    }
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
    /// The server is at one of its limits — its shared memory for arguments, or the calls it
    /// lets wait for a handler — and did not run the call; the next call may find room.
    #[error("the server is busy and did not run the call: {reason}")]
    Busy {
        /// What the server said, with its numbers.
        reason: String,
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
