//! The messages of the channel, and the endpoint through which one side sends and receives
//! them: lending the blocks a message names, spilling a message too large for a slot into a
//! block, and waiting for room in a full ring.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use shm_codec::{Decoder, MAX_BLOCKS, Payload, wire};
use shm_core::{Reclaim, SegmentLink, ShmBlock, ShmError, ShmPool, ShmRef};

use crate::channel::{Channel, FRAME_MAX, SLOT_COUNT, SLOT_LEN, Side, Wake};
use crate::error::{RemoteError, Result, TransportError, malformed};
use crate::loans::{Lender, LoanAttacher, MAX_WAITING_RETURNS, Refusal, Returner};
use crate::trust::Admission;

/// A control message. Payloads inside travel as references; the frames themselves are small.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Clone))]
pub(crate) enum Frame {
    /// Worker → parent, once, first: the worker is ready, and the session of its pool (eight
    /// hex digits), whose lock holds `pid`.
    Hello {
        version: u32,
        pid: u32,
        session: String,
    },
    /// Parent → worker: call `method` with `args`; the reply carries the same `id`.
    /// `loans[i]` is the loan id of `args.buffers()[i]`.
    Call {
        id: u64,
        method: String,
        args: Payload,
        loans: Vec<u64>,
    },
    /// Worker → parent: the outcome of call `id`, its blocks lent under `loans`.
    Reply {
        id: u64,
        outcome: std::result::Result<Payload, RemoteError>,
        loans: Vec<u64>,
    },
    /// Parent → worker: finish and exit.
    Shutdown,
    /// Either way: the real frame is in this block, lent under `loan`; the receiver returns
    /// it as soon as it has read the frame.
    Spilled { frame: ShmRef, loan: u64 },
}

/// The variant indexes of the frames postcard writes first: the order of [`Frame`]'s variants.
const CALL: u32 = 1;
const REPLY: u32 = 2;

impl Frame {
    /// Appends the frame's postcard form to `out`. Calls and replies, which every call sends,
    /// are written by hand (`shm_codec::wire`), the rest by serde; the bytes are serde's either
    /// way (checked in the tests and by the `frame-wire` fuzz target).
    pub(crate) fn write_wire(&self, out: &mut Vec<u8>) -> std::result::Result<(), postcard::Error> {
        match self {
            Frame::Call {
                id,
                method,
                args,
                loans,
            } => Self::write_call(out, *id, method, args, loans),
            Frame::Reply {
                id,
                outcome: Ok(payload),
                loans,
            } => Self::write_reply(out, *id, payload, loans),
            Frame::Reply {
                id,
                outcome: Err(err),
                loans,
            } => {
                wire::put_varint(out, REPLY.into());
                wire::put_varint(out, *id);
                out.push(1);
                *out = postcard::to_extend(err, std::mem::take(out))?;
                put_loans(out, loans);
            }
            other => *out = postcard::to_extend(other, std::mem::take(out))?,
        }
        Ok(())
    }

    /// Appends the postcard form of `Frame::Call` with these fields, without building it.
    pub(crate) fn write_call(
        out: &mut Vec<u8>,
        id: u64,
        method: &str,
        args: &Payload,
        loans: &[u64],
    ) {
        wire::put_varint(out, CALL.into());
        wire::put_varint(out, id);
        wire::put_bytes(out, method.as_bytes());
        args.write_wire(out);
        put_loans(out, loans);
    }

    /// Appends the postcard form of `Frame::Reply` with an `Ok` outcome, without building it.
    pub(crate) fn write_reply(out: &mut Vec<u8>, id: u64, payload: &Payload, loans: &[u64]) {
        wire::put_varint(out, REPLY.into());
        wire::put_varint(out, id);
        out.push(0);
        payload.write_wire(out);
        put_loans(out, loans);
    }

    /// Reads a frame from `bytes` as postcard does (trailing bytes ignored): calls and replies
    /// with a payload by hand, anything else — other frames, errors, and bytes the hand-written
    /// reader refuses — by serde, which then also reports what is wrong.
    pub(crate) fn from_wire(bytes: &[u8]) -> std::result::Result<Frame, postcard::Error> {
        Self::read_by_hand(bytes).map_or_else(|| postcard::from_bytes(bytes), Ok)
    }

    /// [`from_wire`](Self::from_wire) into `self`: a call read over a call keeps the
    /// allocations of its method name, payload and loans, so a worker that reads call after
    /// call allocates nothing to read them. On an error, `self` holds part of what was read.
    pub(crate) fn read_wire(&mut self, bytes: &[u8]) -> std::result::Result<(), postcard::Error> {
        if let Frame::Call {
            id,
            method,
            args,
            loans,
        } = self
        {
            let mut reader = wire::Reader::new(bytes);
            let read = (|| {
                (reader.u32()? == CALL).then_some(())?;
                *id = reader.u64()?;
                let name = reader.str()?;
                method.clear();
                method.push_str(name);
                reader.payload_into(args)?;
                reader.u64s_into(loans)
            })();
            if read.is_some() {
                return Ok(());
            }
        }
        *self = Self::from_wire(bytes)?;
        Ok(())
    }

    fn read_by_hand(bytes: &[u8]) -> Option<Frame> {
        let mut reader = wire::Reader::new(bytes);
        match reader.u32()? {
            CALL => Some(Frame::Call {
                id: reader.u64()?,
                method: reader.str()?.to_owned(),
                args: reader.payload()?,
                loans: reader.u64s()?,
            }),
            REPLY => {
                let id = reader.u64()?;
                // `Ok` only: an error is rare, and serde reads it.
                if reader.u32()? != 0 {
                    return None;
                }
                let payload = reader.payload()?;
                Some(Frame::Reply {
                    id,
                    outcome: Ok(payload),
                    loans: reader.u64s()?,
                })
            }
            _ => None,
        }
    }

    /// The loan ids of the frame's payload, for filling in before sending.
    fn loans_mut(&mut self) -> Option<&mut Vec<u64>> {
        match self {
            Frame::Call { loans, .. } | Frame::Reply { loans, .. } => Some(loans),
            _ => None,
        }
    }
}

/// Appends loan ids as postcard writes a `Vec<u64>`.
fn put_loans(out: &mut Vec<u8>, loans: &[u64]) {
    wire::put_varint(out, loans.len() as u64);
    for &loan in loans {
        wire::put_varint(out, loan);
    }
}

/// Decoding one received payload: the decoder, and the attacher that returns its loans.
pub(crate) struct Decoding {
    pub(crate) decoder: Decoder,
    attacher: Option<Arc<LoanAttacher>>,
}

impl Decoding {
    /// Ends decoding: returns the loans of every block that decoding did not attach.
    pub(crate) fn finish(&self) {
        if let Some(attacher) = &self.attacher {
            attacher.release_unclaimed();
        }
    }
}

/// The largest frame a peer may spill: room for a payload of `MAX_BLOCKS` references and
/// the metadata of a frame of as many columns.
const MAX_SPILLED_FRAME: usize = 256 << 20;

/// The error for a send the lender refused.
fn refused(refusal: Refusal) -> TransportError {
    match refusal {
        Refusal::OverLimit {
            on_loan,
            requested,
            limit,
        } => TransportError::LoanLimit {
            on_loan,
            requested,
            limit,
        },
        Refusal::CorruptReturns => malformed(
            "the peer's ring of returned blocks has impossible positions: nothing it holds can \
             come back",
        ),
    }
}

/// A frame's bytes for the ring, and the loan id of the block it was spilled into, if any.
type WireForm = (Vec<u8>, Option<u64>);

/// Why a send did not happen.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stall {
    /// The ring stayed full until the deadline.
    TimedOut,
    /// `stop()` said the peer is gone.
    Stopped,
}

/// One side's end of a channel.
#[derive(Debug)]
pub(crate) struct Endpoint {
    channel: Arc<Channel>,
    side: Side,
    pool: ShmPool,
    /// Our blocks the peer holds.
    lender: Arc<Lender>,
    /// Gives the peer's blocks back.
    returner: Arc<Returner>,
    /// What the peer may name, and how its blocks are read.
    admission: Arc<Admission>,
    /// Where the descriptors of our segments go to the peer, and the peer's come from.
    link: Arc<SegmentLink>,
    /// The buffer a frame is encoded into before it is copied into the ring, kept between
    /// sends; a thread that finds it taken encodes into one of its own.
    scratch: Mutex<Vec<u8>>,
}

/// The endpoint's frame buffer, taken for one send: a fresh one when another thread has it.
/// Given back when dropped, whatever the send came to, unless it grew past a slot for a frame
/// that had to spill.
struct Scratch<'a> {
    kept: Option<MutexGuard<'a, Vec<u8>>>,
    bytes: Vec<u8>,
}

impl<'a> Scratch<'a> {
    fn take(kept: &'a Mutex<Vec<u8>>) -> Self {
        let mut kept = kept.try_lock().ok();
        let bytes = kept.as_deref_mut().map(std::mem::take).unwrap_or_default();
        Scratch { kept, bytes }
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if let Some(kept) = self.kept.as_deref_mut()
            && self.bytes.capacity() <= SLOT_LEN
        {
            *kept = std::mem::take(&mut self.bytes);
        }
    }
}

impl Endpoint {
    /// `side`'s end of `channel`; blocks are allocated from `pool`, references are accepted as
    /// `admission` says, segments travel on `link`, and the peer may hold at most
    /// `loan_limit` bytes of our blocks at once.
    pub(crate) fn new(
        channel: Arc<Channel>,
        side: Side,
        pool: ShmPool,
        admission: Arc<Admission>,
        link: Arc<SegmentLink>,
        loan_limit: u64,
    ) -> Self {
        let lender = Arc::new(Lender::new(
            Arc::clone(&channel),
            side.inbound(),
            loan_limit,
        ));
        let reclaimer: Weak<dyn Reclaim> = Arc::downgrade(&lender) as Weak<dyn Reclaim>;
        pool.add_reclaimer(reclaimer);
        // A worker trusts its parent to drain what it returns; the parent judges a worker.
        let returner = Returner::new(Arc::clone(&channel), side.outbound(), side == Side::Parent);
        // A descriptor that waits for room on the link wakes the peer, which then reads the
        // link (`read_link`) although no frame has come.
        let peer = match side {
            Side::Parent => Side::Worker,
            Side::Worker => Side::Parent,
        };
        let bell = Arc::downgrade(&channel);
        link.when_full(move || {
            if let Some(channel) = bell.upgrade() {
                channel.wake_all(peer);
            }
        });
        Endpoint {
            channel,
            side,
            pool,
            lender,
            returner,
            admission,
            link,
            scratch: Mutex::new(Vec::new()),
        }
    }

    /// Reads the descriptors waiting on the link: called by a side woken without a frame,
    /// since the peer wakes it when its descriptors find the link full. A bad message is
    /// reported when a frame names its segment.
    pub(crate) fn read_link(&self) {
        let _ = self.link.read_pending();
    }

    pub(crate) fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    pub(crate) fn admission(&self) -> &Admission {
        &self.admission
    }

    /// `payload` ready for this peer: blocks of a third session are copied into our pool.
    pub(crate) fn localize(&self, payload: Payload) -> shm_core::Result<Payload> {
        self.admission.localize(payload, &self.pool)
    }

    /// Sends `frame`, lending `blocks` (the blocks of its payload, in order). Waits while the
    /// ring is full, giving up at `deadline` or when `stop()` holds. While it waits, it calls
    /// `help` whenever `can_help()` says that doing so lets the peer make progress (the parent
    /// reads replies, so that a worker blocked on a full reply ring can go on and read this
    /// ring). A frame that was not sent lends nothing.
    pub(crate) fn send(
        &self,
        mut frame: Frame,
        blocks: Vec<Arc<ShmBlock>>,
        deadline: Option<Instant>,
        stop: &dyn Fn() -> bool,
        can_help: &dyn Fn() -> bool,
        help: &dyn Fn(),
    ) -> Result<std::result::Result<(), Stall>> {
        self.returner.flush();
        self.lender.reclaim();
        if self.returner.overflowed() {
            return Err(self.takes_nothing_back());
        }
        // The peer gets each segment's descriptor before the frame that names it.
        for block in &blocks {
            if let Err(stall) = self.offer(block, deadline)? {
                return Ok(Err(stall));
            }
        }
        let mut ids = self.lender.lend(blocks).map_err(refused)?;
        if let Some(loans) = frame.loans_mut() {
            loans.clone_from(&ids);
        }
        let mut scratch = Scratch::take(&self.scratch);
        let buffer = std::mem::take(&mut scratch.bytes);
        scratch.bytes = match self.wire_form(&frame, deadline, buffer) {
            Ok(Ok((bytes, spill))) => {
                ids.extend(spill);
                bytes
            }
            Ok(Err(stall)) => {
                self.lender.cancel(&ids);
                return Ok(Err(stall));
            }
            Err(err) => {
                self.lender.cancel(&ids);
                return Err(err);
            }
        };
        let pushed = self.push(&scratch.bytes, deadline, stop, can_help, help);
        if !matches!(pushed, Ok(Ok(()))) {
            self.lender.cancel(&ids);
        }
        pushed
    }

    /// Sends a frame that lends nothing, written by `write` straight from its parts (a small
    /// call or reply: no frame is built, no loan taken). `Ok(None)` when the bytes do not fit
    /// a slot: nothing was sent, and the caller sends the frame with [`send`](Self::send),
    /// which spills it. Waits as `send` does.
    pub(crate) fn send_unlent(
        &self,
        write: impl FnOnce(&mut Vec<u8>),
        deadline: Option<Instant>,
        stop: &dyn Fn() -> bool,
        can_help: &dyn Fn() -> bool,
        help: &dyn Fn(),
    ) -> Result<Option<std::result::Result<(), Stall>>> {
        self.returner.flush();
        self.lender.reclaim();
        if self.returner.overflowed() {
            return Err(self.takes_nothing_back());
        }
        let mut scratch = Scratch::take(&self.scratch);
        let bytes = &mut scratch.bytes;
        bytes.clear();
        bytes.reserve(256);
        write(bytes);
        if bytes.len() > FRAME_MAX {
            return Ok(None);
        }
        Ok(Some(self.push(bytes, deadline, stop, can_help, help)?))
    }

    /// The error for a peer that does not take back what it is returned.
    fn takes_nothing_back(&self) -> TransportError {
        malformed(format!(
            "the peer takes no blocks back: its release ring stayed full while it sent {} \
             frames, or more than {MAX_WAITING_RETURNS} returns waited for room",
            2 * SLOT_COUNT
        ))
    }

    /// Pushes a frame's bytes into the ring, waiting while it is full (see [`send`](Self::send)).
    fn push(
        &self,
        bytes: &[u8],
        deadline: Option<Instant>,
        stop: &dyn Fn() -> bool,
        can_help: &dyn Fn() -> bool,
        help: &dyn Fn(),
    ) -> Result<std::result::Result<(), Stall>> {
        let ring = self.channel.frames(self.side.outbound());
        loop {
            if ring.push(bytes)? {
                return Ok(Ok(()));
            }
            help();
            // Woken without room, read the link: the peer may be sending descriptors while
            // this side's frames fill its ring.
            let woken = std::cell::Cell::new(false);
            let stop_or_read = || {
                if woken.replace(true) {
                    self.read_link();
                }
                stop()
            };
            let stall = match ring.wait_for_room(deadline, stop_or_read, can_help) {
                Wake::Ready => continue,
                Wake::TimedOut => Stall::TimedOut,
                Wake::Stopped => Stall::Stopped,
            };
            return Ok(Err(stall));
        }
    }

    /// Sends the descriptor of `block`'s segment to the peer if it does not have it yet.
    fn offer(
        &self,
        block: &ShmBlock,
        deadline: Option<Instant>,
    ) -> Result<std::result::Result<(), Stall>> {
        match self.link.offer(block, deadline) {
            Ok(()) => Ok(Ok(())),
            Err(ShmError::LinkStalled) => Ok(Err(Stall::TimedOut)),
            Err(ShmError::LinkClosed) => Ok(Err(Stall::Stopped)),
            Err(err) => Err(err.into()),
        }
    }

    /// The bytes that go into the ring: the frame itself, or a pointer to a lent block that
    /// holds it (and that block's loan id).
    fn wire_form(
        &self,
        frame: &Frame,
        deadline: Option<Instant>,
        mut buffer: Vec<u8>,
    ) -> Result<std::result::Result<WireForm, Stall>> {
        buffer.clear();
        // Sized for a small call at once: growing the vector costs more than the encoding.
        buffer.reserve(256);
        let mut bytes = buffer;
        frame
            .write_wire(&mut bytes)
            .map_err(|e| malformed(format!("cannot encode frame: {e}")))?;
        if bytes.len() <= FRAME_MAX {
            return Ok(Ok((bytes, None)));
        }
        let mut block = self.pool.alloc(bytes.len())?;
        block.as_mut_slice().copy_from_slice(&bytes);
        let block = block.freeze();
        if let Err(stall) = self.offer(&block, deadline)? {
            return Ok(Err(stall));
        }
        let frame_ref = block.to_ref();
        let loan = self.lender.lend(vec![block]).map_err(refused)?;
        let pointer = Frame::Spilled {
            frame: frame_ref,
            loan: loan[0],
        };
        match postcard::to_stdvec(&pointer) {
            Ok(bytes) => Ok(Ok((bytes, Some(loan[0])))),
            Err(e) => {
                self.lender.cancel(&loan);
                Err(malformed(format!("cannot encode frame: {e}")))
            }
        }
    }

    /// The next frame from the peer, if one is waiting; a spilled frame is read from its block,
    /// which is returned at once. Takes back what the peer returned meanwhile, so that an
    /// answer reports the blocks it freed.
    pub(crate) fn receive(&self) -> Result<Option<Frame>> {
        let mut frame = Frame::Shutdown;
        Ok(self.receive_into(&mut frame)?.then_some(frame))
    }

    /// [`receive`](Self::receive) into `frame`, which keeps the allocations of a call read
    /// over a call (see [`Frame::read_wire`]); `false` when no frame was waiting. On an
    /// error, `frame` holds part of what was read.
    pub(crate) fn receive_into(&self, into: &mut Frame) -> Result<bool> {
        self.lender.reclaim();
        let mut slot = [std::mem::MaybeUninit::uninit(); SLOT_LEN];
        let Some(bytes) = self
            .channel
            .frames(self.side.inbound())
            .pop_into(&mut slot)?
        else {
            return Ok(false);
        };
        self.returner.peer_sent_a_frame();
        into.read_wire(bytes)
            .map_err(|e| malformed(format!("frame of {} bytes: {e}", bytes.len())))?;
        let Frame::Spilled { frame, loan } = into else {
            return Ok(true);
        };
        let (frame, loan) = (frame.clone(), *loan);
        // Copied before it is parsed: the peer may still write its own block, and the parser
        // reads some fields twice (a string's bytes, checked as UTF-8, then copied). Refused
        // past `MAX_SPILLED_FRAME` before the copy.
        let inner = self
            .admission
            .attach(&self.pool, &self.link, &frame)
            .map_err(Into::into)
            .and_then(|block| {
                if block.len() > MAX_SPILLED_FRAME {
                    return Err(malformed(format!(
                        "a spilled frame of {} bytes, more than the {MAX_SPILLED_FRAME} a \
                         frame may take",
                        block.len()
                    )));
                }
                Ok(block.as_slice().to_vec())
            })
            .and_then(|bytes| {
                Frame::from_wire(&bytes)
                    .map_err(|e| malformed(format!("spilled frame of {} bytes: {e}", bytes.len())))
            });
        self.returner.release(&[loan]);
        match inner? {
            Frame::Spilled { .. } => Err(malformed("a spilled frame points to another spill")),
            inner => {
                *into = inner;
                Ok(true)
            }
        }
    }

    /// A decoder for a payload received with `loans`: each block it attaches is returned to the
    /// peer when the last value built on it is dropped. Call [`Decoding::finish`] once decoding
    /// is over.
    pub(crate) fn decoder(&self, payload: &Payload, loans: &[u64]) -> Result<Decoding> {
        if payload.buffers().len() > MAX_BLOCKS {
            self.release(loans);
            return Err(malformed(format!(
                "a payload of {} blocks, more than the {MAX_BLOCKS} one may name",
                payload.buffers().len()
            )));
        }
        if payload.buffers().len() != loans.len() {
            self.release(loans);
            return Err(malformed(format!(
                "a payload of {} blocks came with {} loans",
                payload.buffers().len(),
                loans.len()
            )));
        }
        // A payload with nothing in shared memory (a small call's) needs no attacher.
        if loans.is_empty() {
            return Ok(Decoding {
                decoder: Decoder::new(self.pool.clone()),
                attacher: None,
            });
        }
        let attacher = LoanAttacher::new(
            Arc::clone(&self.returner),
            Arc::clone(&self.admission),
            Arc::clone(&self.link),
            payload.buffers(),
            loans,
        );
        // The parent reads a worker's blocks, which the worker can rewrite whenever it likes:
        // what validation checks is copied first (an untrusted worker's blocks are private
        // copies already). A worker trusts the parent that started it, and reads in place.
        let decoder = Decoder::with_attacher(self.pool.clone(), attacher.clone())
            .copying_invariants(self.side == Side::Parent);
        Ok(Decoding {
            decoder,
            attacher: Some(attacher),
        })
    }

    /// Returns the peer's loans unread (a reply nobody waits for any more).
    pub(crate) fn release(&self, loans: &[u64]) {
        if !loans.is_empty() {
            self.returner.release(loans);
        }
    }

    /// The peer is dead: nothing we lent it is in use any more, and its segments are freed
    /// once nothing here views them.
    pub(crate) fn forget_loans(&self) {
        self.lender.forget_all();
        self.link.forget_received();
    }

    /// Blocks lent to the peer and not yet returned.
    #[cfg(test)]
    pub(crate) fn outstanding_loans(&self) -> usize {
        self.lender.outstanding()
    }
}

#[cfg(test)]
mod wire_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::RemoteErrorKind;
    use crate::fuzzing::frame_wire_agrees;

    fn payload() -> impl Strategy<Value = Payload> {
        (
            prop_oneof![
                Just("serde".to_string()),
                Just("arrow-columns".to_string()),
                ".{0,6}"
            ],
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(any::<u8>(), 0..200),
        )
            .prop_map(|(codec, meta, inline)| Payload::from_refs(codec, meta, Vec::new(), inline))
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let loans = proptest::collection::vec(any::<u64>(), 0..4);
        prop_oneof![
            (any::<u64>(), ".{0,12}", payload(), loans.clone()).prop_map(
                |(id, method, args, loans)| Frame::Call {
                    id,
                    method,
                    args,
                    loans
                }
            ),
            (any::<u64>(), payload(), loans).prop_map(|(id, payload, loans)| Frame::Reply {
                id,
                outcome: Ok(payload),
                loans
            }),
            (any::<u64>(), ".{0,12}").prop_map(|(id, message)| Frame::Reply {
                id,
                outcome: Err(RemoteError {
                    method: "m".into(),
                    kind: RemoteErrorKind::Panic,
                    message
                }),
                loans: Vec::new()
            }),
            Just(Frame::Shutdown),
        ]
    }

    proptest! {
        #[test]
        fn frames_are_written_and_read_as_serde_does(
            frame in frame(),
            cut in any::<usize>(),
            flips in proptest::collection::vec(any::<(usize, u8)>(), 1..3),
        ) {
            let mut written = Vec::new();
            frame.write_wire(&mut written).unwrap();
            prop_assert_eq!(&written, &postcard::to_stdvec(&frame).unwrap());
            prop_assert!(frame_wire_agrees(&written));
            prop_assert_eq!(format!("{:?}", Frame::from_wire(&written).unwrap()), format!("{frame:?}"));
            // Cut short, and with bytes changed: both readers refuse, or both read the same.
            frame_wire_agrees(&written[..cut % written.len()]);
            let mut changed = written.clone();
            for (at, bits) in flips {
                let at = at % changed.len();
                changed[at] ^= bits;
            }
            frame_wire_agrees(&changed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::channel::{channel_len, test_pool as pool};

    fn pair(pool: &ShmPool) -> (Endpoint, Endpoint) {
        let channel = Channel::create(pool.alloc_shared(channel_len()).unwrap(), 1).unwrap();
        let worker_channel = Channel::open(pool.attach_shared(&channel.to_ref()).unwrap()).unwrap();
        let admission = || Admission::new(pool.session(), None, false);
        let (link, other) = SegmentLink::pair().unwrap();
        let other = SegmentLink::from_fd(other).unwrap();
        (
            Endpoint::new(
                channel,
                Side::Parent,
                pool.clone(),
                admission(),
                Arc::new(link),
                u64::MAX,
            ),
            Endpoint::new(
                worker_channel,
                Side::Worker,
                pool.clone(),
                admission(),
                Arc::new(other),
                u64::MAX,
            ),
        )
    }

    fn never() -> bool {
        false
    }

    #[test]
    fn a_frame_too_large_for_a_slot_travels_in_a_lent_block_that_comes_back() {
        let pool = pool();
        let (parent, worker) = pair(&pool);
        let method = "m".repeat(3 * SLOT_LEN);
        let frame = Frame::Call {
            id: 9,
            method: method.clone(),
            args: Payload::new("serde", Vec::new(), Vec::new(), vec![1, 2, 3]),
            loans: Vec::new(),
        };
        parent
            .send(frame, Vec::new(), None, &never, &never, &|| {})
            .unwrap()
            .unwrap();
        assert_eq!(parent.outstanding_loans(), 1, "the spill block is lent");
        match worker.receive().unwrap().unwrap() {
            Frame::Call {
                id,
                method: m,
                args,
                loans,
            } => {
                assert_eq!((id, m.len(), args.inline), (9, method.len(), vec![1, 2, 3]));
                assert!(loans.is_empty());
            }
            other => panic!("expected the call back, got {other:?}"),
        }
        parent.lender.reclaim();
        assert_eq!(parent.outstanding_loans(), 0, "the spill block came back");
    }

    #[test]
    fn frames_on_either_side_of_the_slot_size_arrive_whole_and_in_order() {
        let pool = pool();
        let (parent, worker) = pair(&pool);
        let call = |id: u64, len: usize| Frame::Call {
            id,
            method: "m".into(),
            args: Payload::new("serde", Vec::new(), Vec::new(), vec![id as u8; len]),
            loans: Vec::new(),
        };
        let wire_len = |frame: &Frame| postcard::to_stdvec(frame).unwrap().len();
        // The inline length at which the frame fills its slot exactly.
        let fits = (0..SLOT_LEN)
            .rev()
            .find(|&len| wire_len(&call(0, len)) <= FRAME_MAX)
            .unwrap();
        assert_eq!(
            wire_len(&call(0, fits)),
            FRAME_MAX,
            "a frame that fills its slot"
        );
        // Small, full, one byte over (spilled), small again: the buffer kept between sends
        // grows for the spilled frame and must not leak its bytes into the next.
        let lens = [1, fits - 1, fits, fits + 1, 2 * SLOT_LEN, 3, fits, 0];
        for (id, &len) in lens.iter().enumerate() {
            parent
                .send(
                    call(id as u64, len),
                    Vec::new(),
                    None,
                    &never,
                    &never,
                    &|| {},
                )
                .unwrap()
                .unwrap();
        }
        for (id, &len) in lens.iter().enumerate() {
            let Some(Frame::Call { id: got, args, .. }) = worker.receive().unwrap() else {
                panic!("expected call {id}");
            };
            assert_eq!(got, id as u64);
            assert_eq!(args.inline, vec![id as u8; len], "call {id} of {len} bytes");
        }
        assert!(worker.receive().unwrap().is_none());
        parent.lender.reclaim();
        assert_eq!(parent.outstanding_loans(), 0, "every spill block came back");
    }

    #[test]
    fn blocks_come_back_when_the_last_view_is_dropped_and_unread_ones_at_once() {
        let pool = pool();
        let (parent, worker) = pair(&pool);
        let mut a = pool.alloc(100_000).unwrap();
        a.as_mut_slice().fill(1);
        let b = pool.alloc(200_000).unwrap();
        let blocks = vec![a.freeze(), b.freeze()];
        let args = Payload::new("two", Vec::new(), blocks.clone(), Vec::new());
        let mut sent = args.clone();
        let frame = Frame::Call {
            id: 1,
            method: "m".into(),
            args,
            loans: Vec::new(),
        };
        parent
            .send(frame, sent.take_blocks(), None, &never, &never, &|| {})
            .unwrap()
            .unwrap();
        drop((blocks, sent));
        let Some(Frame::Call { args, loans, .. }) = worker.receive().unwrap() else {
            panic!("expected a call");
        };
        let decoding = worker.decoder(&args, &loans).unwrap();
        let view = decoding.decoder.attach(&args.buffers()[0]).unwrap();
        let again = decoding.decoder.attach(&args.buffers()[0]).unwrap();
        assert!(Arc::ptr_eq(&view, &again), "one block for one reference");
        decoding.finish();
        drop((decoding, again));
        parent.lender.reclaim();
        assert_eq!(
            parent.outstanding_loans(),
            1,
            "the unread block came back at once"
        );
        assert!(view.as_slice().iter().all(|&x| x == 1));
        drop(view);
        parent.lender.reclaim();
        assert_eq!(
            parent.outstanding_loans(),
            0,
            "the viewed block came back on drop"
        );
        assert_eq!(pool.stats().live_blocks, 1, "only the channel is live");
    }

    #[test]
    fn a_send_on_a_full_ring_gives_up_at_its_deadline_and_lends_nothing() {
        let pool = pool();
        let (parent, _worker) = pair(&pool);
        let small = || Frame::Hello {
            version: 0,
            pid: 0,
            session: String::new(),
        };
        while parent
            .send(
                small(),
                Vec::new(),
                Some(Instant::now()),
                &never,
                &never,
                &|| {},
            )
            .unwrap()
            .is_ok()
        {}
        let block = pool.alloc(10).unwrap().freeze();
        let deadline = Instant::now() + Duration::from_millis(20);
        let stall = parent
            .send(small(), vec![block], Some(deadline), &never, &never, &|| {})
            .unwrap();
        assert_eq!(stall, Err(Stall::TimedOut));
        assert!(Instant::now() >= deadline);
        assert_eq!(parent.outstanding_loans(), 0);
        let stall = parent
            .send(small(), Vec::new(), None, &|| true, &never, &|| {})
            .unwrap();
        assert_eq!(stall, Err(Stall::Stopped));
    }
}
