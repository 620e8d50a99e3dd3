//! What a peer may name, and whether its memory is read in place or copied first.
//!
//! A reference is accepted only for a segment of one of two sessions: ours, or the peer's.
//! Both are fixed at the handshake — the worker learns the parent's from the channel's name,
//! the parent learns the worker's from its hello — and a segment of the peer's session is
//! resolved only among the descriptors that came on this peer's link, never by a name in
//! `/dev/shm`: a peer cannot make this process map anything it did not send itself. A block of
//! a third session that this process wants to send on (a reply of one worker passed to
//! another) is copied into a block of its own first; see [`Admission::localize`].

use std::sync::{Arc, OnceLock};

use shm_codec::Payload;
use shm_core::{SegmentLink, SessionId, ShmBlock, ShmError, ShmPool, ShmRef};

/// The sessions one side of a channel accepts references to, and how it reads them.
#[derive(Debug)]
pub(crate) struct Admission {
    own: SessionId,
    peer: OnceLock<SessionId>,
    /// Whether blocks of the peer are copied into private memory before they are read.
    private_copies: bool,
}

impl Admission {
    /// The admission of a side whose pool is in session `own`; `peer` when already known.
    pub(crate) fn new(own: SessionId, peer: Option<SessionId>, private_copies: bool) -> Arc<Self> {
        let admission = Admission {
            own,
            peer: OnceLock::new(),
            private_copies,
        };
        if let Some(peer) = peer {
            let _ = admission.peer.set(peer);
        }
        Arc::new(admission)
    }

    /// Our own session.
    pub(crate) fn own(&self) -> SessionId {
        self.own
    }

    /// Fixes the peer's session (once; later calls change nothing and say so).
    pub(crate) fn set_peer(&self, peer: SessionId) -> bool {
        self.peer.set(peer).is_ok()
    }

    /// Whether blocks are copied into private memory before decoding.
    pub(crate) fn private_copies(&self) -> bool {
        self.private_copies
    }

    /// The block a reference from the peer names, once it is checked: one of ours (a block we
    /// lent, sent back) from `pool`, or one of the peer's, whose descriptor came on `link`.
    pub(crate) fn attach(
        &self,
        pool: &ShmPool,
        link: &SegmentLink,
        r: &ShmRef,
    ) -> shm_core::Result<ShmBlock> {
        self.check(r)?;
        if SessionId::of_segment(&r.name) == Some(self.own) {
            pool.attach(r)
        } else {
            link.attach(r)
        }
    }

    /// Whether the peer may name segment `name`.
    fn may_name(&self, name: &str) -> bool {
        SessionId::of_segment(name)
            .is_some_and(|session| session == self.own || self.peer.get() == Some(&session))
    }

    /// Refuses a reference outside the two sessions, with the sessions it may name.
    pub(crate) fn check(&self, r: &ShmRef) -> shm_core::Result<()> {
        if self.may_name(&r.name) {
            return Ok(());
        }
        let mut allowed = self.own.to_string();
        if let Some(peer) = self.peer.get() {
            allowed.push_str(", ");
            allowed.push_str(&peer.to_string());
        }
        Err(ShmError::ForeignSegment {
            name: r.name.clone(),
            allowed,
        })
    }

    /// `payload` with every block the peer may not name replaced by a copy in `pool`, so that
    /// the peer accepts it. Blocks of ours and of the peer travel as they are.
    pub(crate) fn localize(&self, payload: Payload, pool: &ShmPool) -> shm_core::Result<Payload> {
        if payload.blocks().iter().all(|b| self.may_name(b.name())) {
            return Ok(payload);
        }
        let mut payload = payload;
        let blocks = payload
            .take_blocks()
            .into_iter()
            .map(|block| {
                if self.may_name(block.name()) {
                    return Ok(block);
                }
                let mut copy = pool.alloc(block.len())?;
                copy.as_mut_slice().copy_from_slice(block.as_slice());
                Ok(copy.freeze())
            })
            .collect::<shm_core::Result<Vec<Arc<ShmBlock>>>>()?;
        Ok(Payload::new(
            payload.codec,
            payload.meta,
            blocks,
            payload.inline,
        ))
    }
}
