//! `SegmentLink`: how segments reach another process — as descriptors, never as names.
//!
//! Two processes that exchange references hold the two ends of a Unix socket pair. Before a
//! reference to one of its segments leaves, the sender passes the segment's descriptor once
//! (`SCM_RIGHTS`) with the segment's name; the receiver maps it (only if it is a memfd sealed
//! against any change of length) and from then on resolves references to that name in this
//! link's table. Nothing is looked up in `/dev/shm`, so no symbolic link, hard link or FIFO
//! planted there can stand in for a segment, and the kernel frees every segment when the last
//! descriptor and mapping of it are gone.
//!
//! A descriptor is sent before the message that names it, so the receiver finds it waiting in
//! the socket when it reads that message: resolving a reference drains the socket without
//! blocking, and a name whose descriptor never came is [`ShmError::NoDescriptor`] at once.
//! When a segment of the sender is gone (its pool released it), the sender tells the receiver
//! to forget it, so the memory is freed on both sides.
//!
//! The messages, one per datagram (`SOCK_SEQPACKET`): `+NAME` with one descriptor, or `-NAME`
//! without. docs/format.md describes them for readers in other languages.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::FileType;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use crate::block::{ShmAtomicBlock, ShmBlock};
use crate::error::{Result, ShmError};
use crate::name::{SessionId, validate_name};
use crate::pool::{block_of, check_ref};
use crate::reference::ShmRef;
use crate::segment::Segment;
#[cfg(test)]
use crate::sys;

/// Segments one peer may have sent and not yet withdrawn; past this, what it sends is refused.
pub const MAX_RECEIVED_SEGMENTS: usize = 1 << 16;

/// Longest message: a tag and a segment name (at most 255 bytes).
const MESSAGE_LEN: usize = 256;

/// Segments of this process that died since the process started, so that a link learns
/// cheaply whether any segment it sent may be gone.
static RETIRED: AtomicU64 = AtomicU64::new(0);

/// Counts a segment of this process that is gone (called from its destructor).
pub(crate) fn segment_retired() {
    RETIRED.fetch_add(1, Ordering::Relaxed);
}

/// One end of a link between two processes, over which segment descriptors travel.
///
/// The creator of a segment [`offer`](Self::offer)s a block before it sends the block's
/// reference; the peer [`attach`](Self::attach)es the reference through its end, which maps
/// the segment (read-only) from the descriptor that came. The transport runs one per worker;
/// a program of its own makes a [`pair`](Self::pair) and gives the child the second end.
///
/// ```
/// use shm_core::{SegmentLink, ShmPool};
///
/// # fn main() -> Result<(), shm_core::ShmError> {
/// let pool = ShmPool::new()?;
/// let (ours, theirs) = SegmentLink::pair()?;
/// // `theirs` is an OwnedFd: a child inherits it; here it stays in this process.
/// let theirs = SegmentLink::from_fd(theirs)?;
///
/// let mut block = pool.alloc(4096)?;
/// block.as_mut_slice().fill(42);
/// let block = block.freeze();
/// ours.offer(&block, None)?; // the descriptor goes first, once per segment
/// let view = theirs.attach(&block.to_ref())?; // then any reference into that segment
/// assert!(view.is_peer_memory() && view.as_slice().iter().all(|&b| b == 42));
/// # Ok(())
/// # }
/// ```
pub struct SegmentLink {
    socket: OwnedFd,
    sent: Mutex<Sent>,
    received: Mutex<HashMap<String, Arc<Segment>>>,
    /// Held while reading the socket: a thread that did not find a name looks again under it,
    /// so it never misses a descriptor another thread has taken from the socket and is still
    /// mapping.
    draining: Mutex<()>,
    /// Called while a message waits for room in the socket, to wake the peer so that it reads.
    nudge: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Why the last message read ahead of need (by `read_pending`) was refused: reported to
    /// the reference that names its segment, instead of a missing descriptor.
    refused: Mutex<Option<ShmError>>,
}

impl std::fmt::Debug for SegmentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentLink")
            .field("socket", &self.socket)
            .field("received", &lock(&self.received).len())
            .finish_non_exhaustive()
    }
}

/// How long a sender waits for room in the socket before it wakes the peer again.
const NUDGE_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// The segments of this process whose descriptors the peer holds.
#[derive(Debug, Default)]
struct Sent {
    segments: HashMap<String, Weak<Segment>>,
    /// `RETIRED` when the list was last checked for segments that are gone.
    checked: u64,
    /// Names whose withdrawal did not fit into the socket yet.
    withdrawn: Vec<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn link_error(what: &'static str) -> impl Fn(rustix::io::Errno) -> ShmError {
    move |errno| ShmError::Os {
        op: what,
        name: "the segment link".to_owned(),
        source: errno.into(),
    }
}

/// One datagram: `message`, with `fd` beside it if given. Never blocks, never raises SIGPIPE.
fn send_message(
    socket: BorrowedFd<'_>,
    message: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> rustix::io::Result<()> {
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    rustix::net::sendmsg(socket, &[IoSlice::new(message)], &mut control, flags).map(drop)
}

impl SegmentLink {
    /// A connected pair of link ends: one for this process, one to hand to another (a child
    /// inherits it). Both are close-on-exec; a spawner clears the flag in the child only.
    pub fn pair() -> Result<(SegmentLink, OwnedFd)> {
        let (ours, theirs) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(link_error("create"))?;
        Ok((SegmentLink::new(ours), theirs))
    }

    /// This process's end of a link whose descriptor it was given (inherited from its parent,
    /// say). Refused unless `fd` is a socket.
    pub fn from_fd(fd: OwnedFd) -> Result<SegmentLink> {
        let stat = rustix::fs::fstat(&fd).map_err(link_error("stat"))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::Socket {
            return Err(ShmError::NotASegment {
                name: "the segment link".to_owned(),
                reason: "its descriptor is not a socket",
            });
        }
        Ok(SegmentLink::new(fd))
    }

    fn new(socket: OwnedFd) -> Self {
        SegmentLink {
            socket,
            sent: Mutex::new(Sent {
                checked: RETIRED.load(Ordering::Relaxed),
                ..Sent::default()
            }),
            received: Mutex::new(HashMap::new()),
            draining: Mutex::new(()),
            nudge: std::sync::OnceLock::new(),
            refused: Mutex::new(None),
        }
    }

    /// Sets how to wake the peer when a descriptor waits for room in the socket (the kernel
    /// queues only a few messages, and the peer reads them only when it resolves a reference
    /// or calls [`read_pending`](Self::read_pending)): a transport rings the peer's bell, and
    /// the peer reads what is pending when it wakes without news. Set once; later calls are
    /// ignored.
    pub fn when_full(&self, nudge: impl Fn() + Send + Sync + 'static) {
        let _ = self.nudge.set(Box::new(nudge));
    }

    /// Reads, without blocking, every message waiting in the socket, so that a peer that sends
    /// descriptors faster than this side resolves them can go on. Does nothing if another
    /// thread is reading.
    pub fn read_pending(&self) -> Result<()> {
        let read = match self.draining.try_lock() {
            Ok(_draining) => self.drain(""),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                let _draining = poisoned.into_inner();
                self.drain("")
            }
            Err(std::sync::TryLockError::WouldBlock) => Ok(()),
        };
        let kept = match &read {
            Err(ShmError::NotASegment { name, reason }) => Some(ShmError::NotASegment {
                name: name.clone(),
                reason,
            }),
            Err(ShmError::TooManySegments { held, limit }) => Some(ShmError::TooManySegments {
                held: *held,
                limit: *limit,
            }),
            _ => None,
        };
        if kept.is_some() {
            *lock(&self.refused) = kept;
        }
        read
    }

    /// The socket, for a spawner to hand the other end's number to a child.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Makes sure the peer can attach `block`: sends its segment's descriptor unless it was
    /// sent before. Does nothing for a block of another process (the peer got it from its
    /// owner) or private memory. Waits for room in the socket until `deadline` (forever with
    /// `None`, unless the peer hangs up).
    pub fn offer(&self, block: &ShmBlock, deadline: Option<Instant>) -> Result<()> {
        self.offer_segment(block.segment(), deadline)
    }

    /// [`offer`](Self::offer) for a block both sides write (the transport's channel).
    pub fn offer_atomic(&self, block: &ShmAtomicBlock, deadline: Option<Instant>) -> Result<()> {
        self.offer_segment(block.block().segment(), deadline)
    }

    fn offer_segment(&self, segment: &Arc<Segment>, deadline: Option<Instant>) -> Result<()> {
        let Some(fd) = segment.descriptor() else {
            return Ok(());
        };
        let mut sent = lock(&self.sent);
        self.withdraw_gone(&mut sent, deadline)?;
        if sent.segments.contains_key(segment.name()) {
            return Ok(());
        }
        self.send(b'+', segment.name(), Some(fd), deadline)?;
        sent.segments
            .insert(segment.name().to_owned(), Arc::downgrade(segment));
        Ok(())
    }

    /// Tells the peer about segments of ours it holds that are gone here, so that it lets go
    /// of them too; cheap when none died since the last look.
    fn withdraw_gone(&self, sent: &mut Sent, deadline: Option<Instant>) -> Result<()> {
        let retired = RETIRED.load(Ordering::Relaxed);
        if retired != sent.checked {
            sent.checked = retired;
            let gone: Vec<String> = sent
                .segments
                .iter()
                .filter(|(_, segment)| segment.strong_count() == 0)
                .map(|(name, _)| name.clone())
                .collect();
            for name in &gone {
                sent.segments.remove(name);
            }
            sent.withdrawn.extend(gone);
        }
        while let Some(name) = sent.withdrawn.last() {
            // Withdrawals never wait: the memory stays until the peer reads them, nothing more.
            match self.send(
                b'-',
                name,
                None,
                Some(deadline.unwrap_or_else(Instant::now)),
            ) {
                Ok(()) => {
                    sent.withdrawn.pop();
                }
                Err(ShmError::LinkStalled) => break,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    fn send(
        &self,
        tag: u8,
        name: &str,
        fd: Option<BorrowedFd<'_>>,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let message = [&[tag][..], name.as_bytes()].concat();
        loop {
            match send_message(self.socket.as_fd(), &message, fd) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    // The peer may be asleep, waiting for the frame this descriptor precedes,
                    // or sending to us in turn: wake it, read what it sent, and look again
                    // soon.
                    if let Some(nudge) = self.nudge.get() {
                        nudge();
                    }
                    // A bad message of the peer's is kept for the reference that names its
                    // segment; it does not fail this send.
                    let _ = self.read_pending();
                    let soon = Instant::now() + NUDGE_EVERY;
                    match self.wait(
                        PollFlags::OUT | PollFlags::IN,
                        Some(deadline.map_or(soon, |d| d.min(soon))),
                    ) {
                        Err(ShmError::LinkStalled)
                            if deadline.is_none_or(|d| Instant::now() < d) => {}
                        other => other?,
                    }
                }
                Err(rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) => {
                    return Err(ShmError::LinkClosed);
                }
                Err(errno) => return Err(link_error("send a descriptor on")(errno)),
            }
        }
    }

    /// Waits until the socket is ready for `flags`, or fails at `deadline`.
    fn wait(&self, flags: PollFlags, deadline: Option<Instant>) -> Result<()> {
        let timeout = match deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ShmError::LinkStalled);
                }
                Some(Timespec::try_from(left).unwrap_or(Timespec {
                    tv_sec: i64::MAX,
                    tv_nsec: 0,
                }))
            }
        };
        let mut fds = [PollFd::new(&self.socket, flags)];
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(0) => Err(ShmError::LinkStalled),
            Ok(_) if fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR) => {
                Err(ShmError::LinkClosed)
            }
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(errno) => Err(link_error("wait on")(errno)),
        }
    }

    /// The block a reference to one of the peer's segments names, read-only, with the checks
    /// of [`ShmPool::attach`](crate::ShmPool::attach).
    pub fn attach(&self, r: &ShmRef) -> Result<ShmBlock> {
        let end = check_ref(r)?;
        let segment = self.received(&r.name)?;
        block_of(segment, r, end)
    }

    /// The block a reference names in a segment the peer shares for both sides to write (see
    /// [`ShmPool::alloc_shared`](crate::ShmPool::alloc_shared)): the transport's channel.
    pub fn attach_shared(&self, r: &ShmRef) -> Result<ShmAtomicBlock> {
        let end = check_ref(r)?;
        let segment = self.received(&r.name)?;
        if !segment.is_shared() {
            return Err(ShmError::NotASegment {
                name: r.name.clone(),
                reason: "it is sealed against writes, and this structure is written by both sides",
            });
        }
        block_of(segment, r, end).map(ShmAtomicBlock::new)
    }

    /// The peer's segment `name`, reading what waits in the socket if it is not known yet.
    fn received(&self, name: &str) -> Result<Arc<Segment>> {
        let known = || lock(&self.received).get(name).cloned();
        if let Some(segment) = known() {
            return Ok(segment);
        }
        let _draining = lock(&self.draining);
        if let Some(segment) = known() {
            return Ok(segment);
        }
        self.drain(name)?;
        if let Some(segment) = known() {
            return Ok(segment);
        }
        // A message refused when it was read ahead of need explains the missing descriptor.
        let mut refused = lock(&self.refused);
        match refused.take() {
            Some(ShmError::NotASegment { name: n, reason }) if n == name => {
                Err(ShmError::NotASegment { name: n, reason })
            }
            Some(err @ ShmError::TooManySegments { .. }) => Err(err),
            other => {
                *refused = other;
                Err(ShmError::NoDescriptor {
                    name: name.to_owned(),
                })
            }
        }
    }

    /// Reads the messages waiting in the socket, without blocking, until the one that brings
    /// `wanted`, or until none is left.
    fn drain(&self, wanted: &str) -> Result<()> {
        loop {
            let mut data = [0u8; MESSAGE_LEN];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = rustix::net::recvmsg(
                &self.socket,
                &mut [IoSliceMut::new(&mut data)],
                &mut control,
                RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
            );
            let message = match received {
                Ok(message) => message,
                // A peer that closed its end with messages of ours unread makes the next read
                // report the reset, once; what the peer sent before it closed still waits
                // behind it, and the next reads take it.
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNRESET) => continue,
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(errno) => return Err(link_error("receive a descriptor on")(errno)),
            };
            // Taken at once, so that every descriptor that came is closed if refused.
            let mut fds: Vec<OwnedFd> = control
                .drain()
                .filter_map(|message| match message {
                    RecvAncillaryMessage::ScmRights(fds) => Some(fds),
                    _ => None,
                })
                .flatten()
                .collect();
            if message.bytes == 0 && fds.is_empty() {
                // The peer closed its end; what it sent before is all there is.
                return Ok(());
            }
            let malformed = |reason| {
                Err(ShmError::NotASegment {
                    name: String::from_utf8_lossy(&data[..message.bytes.min(MESSAGE_LEN)])
                        .into_owned(),
                    reason,
                })
            };
            if message
                .flags
                .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
            {
                return malformed("the link message is longer than a tag, a name and a descriptor");
            }
            let Some((&tag, name)) = data[..message.bytes].split_first() else {
                return malformed("the link message is empty");
            };
            let Ok(name) = std::str::from_utf8(name) else {
                return malformed("the link message's name is not UTF-8");
            };
            validate_name(name)?;
            if SessionId::of_segment(name).is_none() {
                return malformed("the link message names no segment of this project");
            }
            match (tag, fds.pop(), fds.is_empty()) {
                (b'+', Some(fd), true) => {
                    self.adopt(name, fd)?;
                    if name == wanted {
                        return Ok(());
                    }
                }
                (b'-', None, true) => {
                    let forgotten = lock(&self.received).remove(name);
                    drop(forgotten);
                }
                _ => {
                    return malformed(
                        "the link message is neither +NAME with one descriptor nor -NAME",
                    );
                }
            }
        }
    }

    fn adopt(&self, name: &str, fd: OwnedFd) -> Result<()> {
        {
            let received = lock(&self.received);
            if received.contains_key(name) {
                return Err(ShmError::NotASegment {
                    name: name.to_owned(),
                    reason: "the peer sent a second descriptor under a name it already used",
                });
            }
            if received.len() >= MAX_RECEIVED_SEGMENTS {
                return Err(ShmError::TooManySegments {
                    held: received.len(),
                    limit: MAX_RECEIVED_SEGMENTS,
                });
            }
        }
        // Mapped outside the lock: it is the slow part.
        let segment = Arc::new(Segment::adopt(fd, name)?);
        lock(&self.received).insert(name.to_owned(), segment);
        Ok(())
    }

    /// Lets go of every segment the peer sent (it died): their memory is freed once no block
    /// built on them is left here.
    pub fn forget_received(&self) {
        let forgotten = std::mem::take(&mut *lock(&self.received));
        drop(forgotten);
    }

    /// Segments of the peer this end holds.
    pub fn received_count(&self) -> usize {
        lock(&self.received).len()
    }
}

/// Entry points for the fuzzer (`crates/shm-fuzz`): what a link end does with a message a peer
/// wrote. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use std::os::fd::BorrowedFd;

    use super::SegmentLink;
    use crate::ShmBlock;

    /// The descriptor of the segment of a block this process created.
    pub fn descriptor(block: &ShmBlock) -> Option<BorrowedFd<'_>> {
        block.segment().descriptor()
    }

    /// Sends `message` as it is, with `fd` beside it, on a fresh link, and has the other end
    /// read it: how many segments that end holds afterwards, or the error it gave.
    pub fn receive(message: &[u8], fd: Option<BorrowedFd<'_>>) -> crate::Result<usize> {
        let (ours, theirs) = SegmentLink::pair()?;
        let theirs = SegmentLink::from_fd(theirs)?;
        // A message longer than the socket takes is the sender's error, not the receiver's.
        if super::send_message(ours.as_fd(), message, fd).is_err() {
            return Ok(0);
        }
        theirs.drain("")?;
        Ok(theirs.received_count())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::test_support::mapping_of;
    use crate::{PoolConfig, ShmPool};

    fn pool() -> ShmPool {
        ShmPool::with_config(PoolConfig::default()).unwrap()
    }

    /// Both ends of a link in this process: `a` sends, `b` receives.
    fn pair() -> (SegmentLink, SegmentLink) {
        let (a, b) = SegmentLink::pair().unwrap();
        (a, SegmentLink::from_fd(b).unwrap())
    }

    #[test]
    fn a_block_offered_once_is_attached_read_only_by_the_peer() {
        let pool = pool();
        let (a, b) = pair();
        let mut block = pool.alloc(3 << 20).unwrap();
        block.as_mut_slice().fill(0x5a);
        block.as_mut_slice()[7] = 1;
        let block = block.freeze();
        let r = block.to_ref();
        assert!(matches!(b.attach(&r), Err(ShmError::NoDescriptor { .. })));
        a.offer(&block, None).unwrap();
        a.offer(&block, None).unwrap();
        let view = b.attach(&r).unwrap();
        let again = b.attach(&r).unwrap();
        assert_eq!(view.as_ptr(), again.as_ptr(), "one mapping per segment");
        assert_ne!(view.as_ptr(), block.as_ptr(), "the peer's own mapping");
        assert!(view.as_slice()[..7].iter().all(|&x| x == 0x5a));
        assert_eq!(b.received_count(), 1, "sent once");
        assert!(mapping_of(view.as_ptr() as usize).contains(" r--s "));
        assert!(view.is_peer_memory());
        assert!(matches!(
            b.attach_shared(&r),
            Err(ShmError::NotASegment { .. })
        ));
        assert_eq!(view.as_slice()[7], 1);
    }

    #[test]
    fn a_shared_block_is_writable_on_both_sides() {
        let pool = pool();
        let (a, b) = pair();
        let block = pool.alloc_shared(4096).unwrap();
        a.offer_atomic(&block, None).unwrap();
        let peer = b.attach_shared(&block.to_ref()).unwrap();
        assert!(mapping_of(peer.as_ptr() as usize).contains(" rw-s "));
        // SAFETY: both pointers are valid for 4096 bytes; nothing else uses the block.
        unsafe {
            peer.as_ptr().write(9);
            assert_eq!(block.as_ptr().read(), 9);
        }
    }

    #[test]
    fn descriptors_that_are_not_sealed_memfds_are_refused() {
        let (a, b) = pair();
        let name = "/shm-00000001-0000000000000001";
        let file = std::fs::File::open("/etc/passwd").unwrap();
        a.send(b'+', name, Some(file.as_fd()), None).unwrap();
        let r = ShmRef {
            name: name.to_owned(),
            size: 64,
            offset: 0,
            content_size: 64,
        };
        assert!(matches!(
            b.attach(&r),
            Err(ShmError::NotASegment { reason, .. }) if reason.contains("sealed")
        ));
        let memfd = sys::create_memfd("unsealed").unwrap();
        sys::reserve(&memfd, 4096).unwrap();
        a.send(b'+', name, Some(memfd.as_fd()), None).unwrap();
        assert!(matches!(b.attach(&r), Err(ShmError::NotASegment { .. })));
        let (fifo_read, _fifo_write) = std::io::pipe().unwrap();
        a.send(b'+', name, Some(fifo_read.as_fd()), None).unwrap();
        assert!(matches!(b.attach(&r), Err(ShmError::NotASegment { .. })));
        assert_eq!(b.received_count(), 0);
        // Garbage names and a withdrawal without a name are refused too.
        a.send(b'+', "/etc/passwd", Some(memfd.as_fd()), None)
            .unwrap();
        assert!(matches!(b.attach(&r), Err(ShmError::InvalidName { .. })));
        a.send(b'*', name, None, None).unwrap();
        assert!(matches!(b.attach(&r), Err(ShmError::NotASegment { .. })));
    }

    #[test]
    fn a_name_cannot_be_given_a_second_descriptor() {
        let pool = pool();
        let (a, b) = pair();
        let first = pool.alloc(1 << 20).unwrap().freeze();
        let second = pool.alloc(1 << 20).unwrap().freeze();
        a.offer(&first, None).unwrap();
        let view = b.attach(&first.to_ref()).unwrap();
        let fd = second.segment().descriptor().unwrap();
        a.send(b'+', first.name(), Some(fd), None).unwrap();
        assert!(matches!(
            b.attach(&second.to_ref()),
            Err(ShmError::NotASegment { reason, .. }) if reason.contains("second descriptor")
        ));
        assert_eq!(b.attach(&first.to_ref()).unwrap().as_ptr(), view.as_ptr());
    }

    #[test]
    fn a_segment_gone_at_its_owner_is_withdrawn_from_the_peer() {
        let pool = pool();
        let (a, b) = pair();
        let first = pool.alloc(2 << 20).unwrap().freeze();
        a.offer(&first, None).unwrap();
        drop(b.attach(&first.to_ref()).unwrap());
        assert_eq!(b.received_count(), 1);
        let name = first.name().to_owned();
        drop(first);
        pool.trim();
        let second = pool.alloc(2 << 20).unwrap().freeze();
        assert_ne!(second.name(), name);
        a.offer(&second, None).unwrap();
        b.attach(&second.to_ref()).unwrap();
        assert_eq!(b.received_count(), 1, "the first segment was withdrawn");
    }

    #[test]
    fn a_peer_that_never_reads_stalls_only_until_the_deadline() {
        let pool = pool();
        let (a, _b) = pair();
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let mut blocks = Vec::new();
        let outcome = loop {
            let block = pool.alloc(100_000).unwrap().freeze();
            match a.offer(&block, Some(deadline)) {
                Ok(()) => blocks.push(block),
                Err(err) => break err,
            }
            assert!(blocks.len() < 100_000, "the socket never filled");
        };
        assert!(matches!(outcome, ShmError::LinkStalled), "{outcome:?}");
        assert!(Instant::now() >= deadline);
    }

    #[test]
    fn threads_resolving_at_once_never_miss_a_descriptor_another_one_is_taking() {
        let pool = pool();
        for _ in 0..20 {
            let (a, b) = pair();
            let blocks: Vec<Arc<ShmBlock>> = (0..64)
                .map(|_| pool.alloc(100_000).unwrap().freeze())
                .collect();
            for block in &blocks {
                a.offer(block, None).unwrap();
            }
            let barrier = std::sync::Barrier::new(8);
            std::thread::scope(|scope| {
                for chunk in blocks.chunks(8) {
                    let (b, barrier) = (&b, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        for block in chunk {
                            b.attach(&block.to_ref()).unwrap();
                        }
                    });
                }
            });
            assert_eq!(b.received_count(), 64);
        }
    }

    #[test]
    fn a_peer_that_closed_its_end_is_link_closed() {
        let pool = pool();
        let (a, b) = pair();
        drop(b);
        let block = pool.alloc(4096).unwrap().freeze();
        assert!(matches!(a.offer(&block, None), Err(ShmError::LinkClosed)));
    }

    #[test]
    fn descriptors_a_peer_sent_before_it_closed_with_our_messages_unread_still_arrive() {
        let pool = pool();
        let (a, b) = pair();
        let theirs = pool.alloc(4096).unwrap().freeze();
        b.offer(&theirs, None).unwrap();
        // b never reads what a sends, and closes: a's next read reports ECONNRESET once.
        a.offer(&pool.alloc(4096).unwrap().freeze(), None).unwrap();
        drop(b);
        let view = a.attach(&theirs.to_ref()).unwrap();
        assert_eq!(view.len(), 4096);
    }

    #[test]
    fn a_link_end_must_be_a_socket() {
        let file = std::fs::File::open("/etc/passwd").unwrap();
        assert!(matches!(
            SegmentLink::from_fd(file.into()),
            Err(ShmError::NotASegment { .. })
        ));
    }
}
