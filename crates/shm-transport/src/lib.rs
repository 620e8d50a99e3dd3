//! The parent/worker channel: spawn a worker process, call its handlers by name, and pass
//! arrays, frames and plain values as shared-memory references.
//!
//! The parent holds a [`Worker`]; the worker process runs [`serve`] with a [`Router`] of named
//! handlers. Control messages are small postcard frames in a shared-memory ring; payloads
//! travel as [`ShmRef`](shm_core::ShmRef)s, so a gigabyte costs what a byte costs. Waiting
//! sides spin for a few microseconds, then sleep on a futex: a small call takes microseconds,
//! an idle worker takes no CPU.
//!
//! What can go wrong is a value, never a hang: a worker that dies fails every pending call with
//! [`TransportError::WorkerDied`] at once; a call with a timeout returns
//! [`TransportError::Timeout`]; a handler's error or panic comes back as a
//! [`RemoteError`] and the worker goes on; a worker whose parent dies exits and removes what
//! both left in `/dev/shm`.
//!
//! Who owns which block: arguments are allocated in the parent's pool and recycled once the
//! reply has come (later, if the handler kept a view of them); results are allocated in the
//! worker's pool and recycled once the parent has dropped every value decoded from them (the
//! parent tells the worker on its next call).
//!
//! Handlers run one at a time, in the order calls arrive — the right thing for the
//! single-threaded libraries that workers usually isolate. Many threads may call at once.
//!
//! # Example
//!
//! The worker is usually the same executable, re-run: `main` serves when it is a worker.
//!
//! ```no_run
//! use ndarray::Array1;
//! use shm_codec::{Serde, ShmArray};
//! use shm_transport::{Router, Worker, WorkerConfig, is_worker, serve};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     if is_worker() {
//!         let router = Router::new().handle("sum", |a: ShmArray<f64, ndarray::Ix1>, _ctx| {
//!             Ok::<_, String>(Serde(a.view().sum()))
//!         });
//!         return Ok(serve(router)?);
//!     }
//!     let worker = Worker::spawn(WorkerConfig::current_exe()?)?;
//!     let a = Array1::from_shape_fn(10_000_000, |i| i as f64);
//!     let Serde(sum): Serde<f64> = worker.call("sum", &a)?;
//!     assert_eq!(sum, a.sum());
//!     worker.shutdown();
//!     Ok(())
//! }
//! ```

mod channel;
mod conn;
mod error;
mod frame;
mod loans;
mod serve;
mod worker;

pub use channel::PROTOCOL_VERSION;
pub use error::{RemoteError, RemoteErrorKind, Result, TransportError};
pub use serve::{CHANNEL_ENV, Context, Router, is_worker, serve};
pub use worker::{StderrSink, Worker, WorkerConfig};

/// The README's example, compiled as a doc test so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
