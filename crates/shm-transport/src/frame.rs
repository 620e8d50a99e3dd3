//! The messages of the channel, and how one too large for a slot travels in a block.

use serde::{Deserialize, Serialize};
use shm_codec::Payload;
use shm_core::{ShmBlock, ShmPool, ShmRef};

use crate::channel::{Ring, SLOT_LEN};
use crate::error::{RemoteError, Result, malformed};

/// A control message. Payloads inside travel as references; the frames themselves are small.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Frame {
    /// Worker → parent, once, first: the worker is ready.
    Hello { version: u32, pid: u32 },
    /// Parent → worker: call `method` with `args`; the reply carries the same `id`.
    Call {
        id: u64,
        method: String,
        args: Payload,
    },
    /// Worker → parent: the outcome of call `id`.
    Reply {
        id: u64,
        outcome: std::result::Result<Payload, RemoteError>,
        /// The worker still holds views of the arguments; the parent must not recycle them
        /// until `ArgsReleased { id }`.
        args_kept: bool,
        /// The worker keeps the result's blocks alive until the parent sends
        /// `Release { id }`. A reply that arrives spilled is released the same way, whatever
        /// this says: the worker keeps the spill block until then.
        needs_release: bool,
    },
    /// Parent → worker: nothing of reply `id` is used any more.
    Release { id: u64 },
    /// Worker → parent: the arguments of call `id` are no longer viewed.
    ArgsReleased { id: u64 },
    /// Parent → worker: finish and exit.
    Shutdown,
    /// Either way: the real frame is in this block, which the sender keeps alive as part of the
    /// call or reply it belongs to.
    Spilled(ShmRef),
}

impl Frame {
    /// Pushes the frame into `ring`, waiting while it is full. A frame too large for a slot is
    /// written to a block of `pool`, which is returned: the caller keeps it alive until the
    /// peer is done with the call or reply.
    pub(crate) fn send(
        &self,
        ring: &Ring<'_>,
        pool: &ShmPool,
        mut peer_alive: impl FnMut() -> bool,
    ) -> Result<Option<ShmBlock>> {
        let bytes = postcard::to_stdvec(self)
            .map_err(|e| malformed(format!("cannot encode frame: {e}")))?;
        let (bytes, spill) = if bytes.len() > SLOT_LEN - 4 {
            let mut block = pool.alloc(bytes.len(), true)?;
            block.as_mut_slice()?.copy_from_slice(&bytes);
            let pointer = postcard::to_stdvec(&Frame::Spilled(block.to_ref()))
                .map_err(|e| malformed(format!("cannot encode frame: {e}")))?;
            (pointer, Some(block))
        } else {
            (bytes, None)
        };
        let mut backoff = 0u32;
        while !ring.push(&bytes)? {
            if !peer_alive() {
                return Err(malformed("the peer stopped reading its ring"));
            }
            backoff = (backoff + 1).min(10);
            std::thread::sleep(std::time::Duration::from_micros(1 << backoff));
        }
        Ok(spill)
    }

    /// Reads a frame popped from a ring, following a spill into its block.
    pub(crate) fn read(bytes: &[u8], pool: &ShmPool) -> Result<Frame> {
        Self::read_marked(bytes, pool).map(|(frame, _)| frame)
    }

    /// [`read`](Self::read), also saying whether the frame travelled in a block (whose sender
    /// keeps it until the call or reply it belongs to is released).
    pub(crate) fn read_marked(bytes: &[u8], pool: &ShmPool) -> Result<(Frame, bool)> {
        let frame: Frame = postcard::from_bytes(bytes)
            .map_err(|e| malformed(format!("frame of {} bytes: {e}", bytes.len())))?;
        match frame {
            Frame::Spilled(r) => {
                let block = pool.attach(&r)?;
                let inner: Frame = postcard::from_bytes(block.as_slice()).map_err(|e| {
                    malformed(format!("spilled frame of {} bytes: {e}", block.len()))
                })?;
                if matches!(inner, Frame::Spilled(_)) {
                    return Err(malformed("a spilled frame points to another spill"));
                }
                Ok((inner, true))
            }
            frame => Ok((frame, false)),
        }
    }
}
