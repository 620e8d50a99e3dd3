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
//! [`RemoteError`] and the worker goes on; a worker whose parent dies exits, and the kernel frees
//! the segments of both.
//!
//! Segments reach the other side as descriptors, on a [`SegmentLink`](shm_core::SegmentLink)
//! made at spawn beside the channel: a worker can name only segments it sent and the parent's,
//! and the kernel's seals keep it from truncating or writing any segment it was sent.
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
//! use shm_transport::{CalleeExt, Router, Worker, WorkerConfig, is_worker, serve};
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

mod callee;
mod channel;
mod conn;
mod error;
mod frame;
mod loans;
mod pool;
mod process;
mod serve;
mod trust;
mod worker;

pub use callee::{Callee, CalleeExt, DecodeReply, Lifecycle};
pub use channel::{CONTROL_LEN, ChannelState, PROTOCOL_VERSION, RingState};
pub use error::{RemoteError, RemoteErrorKind, Result, TransportError};
pub use pool::{ShutdownMode, WorkerPool};
pub use serve::{CHANNEL_ENV, Context, LINK_ENV, Router, is_worker, serve};
pub use worker::{StderrSink, Worker, WorkerConfig};

/// Entry points for the fuzzer (`crates/shm-fuzz`): what the worker does with bytes a peer put
/// into its ring. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::Arc;

    use shm_codec::{Payload, Serde};
    use shm_core::{ShmBlock, ShmPool};

    use crate::channel::{Channel, Direction, Side, channel_len};
    use crate::frame::{Endpoint, Frame};

    /// Pushes `bytes` into a fresh channel as the parent would, and has the worker's end
    /// receive it: frame parsing, spills, loans and the decoding of a call's arguments.
    pub fn receive(pool: &ShmPool, bytes: &[u8]) -> crate::Result<()> {
        let channel = Channel::create(pool.alloc_shared(channel_len())?, std::process::id())?;
        if !channel.frames(Direction::ToWorker).push(bytes)? {
            return Ok(());
        }
        let admission = crate::trust::Admission::new(pool.session(), None, false);
        let (link, _parent_end) = shm_core::SegmentLink::pair()?;
        let worker = Endpoint::new(
            channel,
            Side::Worker,
            pool.clone(),
            admission,
            std::sync::Arc::new(link),
            u64::MAX,
        );
        if let Some(Frame::Call { args, loans, .. }) = worker.receive()? {
            let decoding = worker.decoder(&args, &loans)?;
            let _ = decoding.decoder.decode::<Serde<Vec<u8>>>(&args);
            decoding.finish();
        }
        Ok(())
    }

    /// Reads `bytes` as a frame twice, by the hand-written reader and by serde, and panics where
    /// the two disagree (one accepts what the other refuses, or they read different frames), or
    /// where a frame read is written back other than as serde writes it. Says whether the
    /// bytes were a frame.
    pub fn frame_wire_agrees(bytes: &[u8]) -> bool {
        let ours = Frame::from_wire(bytes).map(|frame| format!("{frame:?}"));
        let theirs = postcard::from_bytes::<Frame>(bytes).map(|frame| format!("{frame:?}"));
        assert_eq!(ours.is_ok(), theirs.is_ok(), "{ours:?} / {theirs:?}");
        // Read over a call read before, as a worker reads call after call: the same verdict
        // and the same frame, nothing of the earlier call left.
        let mut reused = Frame::Call {
            id: 9,
            method: "a method read before".into(),
            args: shm_codec::Payload::from_refs(
                "a codec",
                vec![1; 40],
                vec![shm_core::ShmRef {
                    name: "/shm-00000000-0000000000000000".into(),
                    size: 64,
                    offset: 0,
                    content_size: 8,
                }],
                vec![2; 70],
            ),
            loans: vec![3, 4],
        };
        let again = reused.read_wire(bytes).map(|()| format!("{reused:?}"));
        assert_eq!(again.ok(), ours.as_ref().ok().cloned(), "read over a call");
        let Ok(frame) = Frame::from_wire(bytes) else {
            return false;
        };
        assert_eq!(ours.ok(), theirs.ok());
        let mut written = Vec::new();
        frame
            .write_wire(&mut written)
            .expect("a frame read can be written");
        assert_eq!(
            written,
            postcard::to_stdvec(&frame).expect("serde writes it")
        );
        true
    }

    /// Valid frames to start from: calls with inline and block arguments, a hello, a shutdown
    /// and a spilled frame; and the blocks they name, which can be attached while they live.
    pub fn seeds(pool: &ShmPool) -> (Vec<Vec<u8>>, Vec<Arc<ShmBlock>>) {
        let encoder = shm_codec::Encoder::new(pool.clone());
        let mut frames = vec![Frame::Hello {
            version: crate::PROTOCOL_VERSION,
            pid: 1,
            session: pool.session().to_string(),
        }];
        frames.push(Frame::Shutdown);
        let mut blocks = Vec::new();
        // A call too large for a slot, spilled into a block.
        let spilled = Frame::Call {
            id: 2,
            method: "m".repeat(100_000),
            args: Payload::new(shm_codec::SERDE_CODEC, Vec::new(), Vec::new(), vec![0]),
            loans: Vec::new(),
        };
        if let Ok(bytes) = postcard::to_stdvec(&spilled)
            && let Ok(mut block) = pool.alloc(bytes.len())
        {
            block.as_mut_slice().copy_from_slice(&bytes);
            let block = block.freeze();
            frames.push(Frame::Spilled {
                frame: block.to_ref(),
                loan: 7,
            });
            blocks.push(block);
        }
        for value in [vec![1u8; 10], vec![2u8; 2 << 20]] {
            if let Ok(args) = encoder.encode(&Serde(value)) {
                blocks.extend(args.blocks().iter().cloned());
                let loans = (1..=args.buffers().len() as u64).collect();
                frames.push(Frame::Reply {
                    id: 1,
                    outcome: Ok(args.clone()),
                    loans: Vec::clone(&loans),
                });
                frames.push(Frame::Call {
                    id: 1,
                    method: "m".into(),
                    args,
                    loans,
                });
            }
        }
        frames.push(Frame::Reply {
            id: u64::MAX,
            outcome: Err(crate::RemoteError {
                method: "m".into(),
                kind: crate::RemoteErrorKind::Handler,
                message: "no".into(),
            }),
            loans: Vec::new(),
        });
        let frames = frames
            .iter()
            .filter_map(|f| postcard::to_stdvec(f).ok())
            .collect();
        (frames, blocks)
    }
}

/// The README's example, compiled as a doc test so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
