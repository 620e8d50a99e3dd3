//! Data connections: a payload's blocks as bare bytes over a TCP connection of their own,
//! beside the gRPC call that carries the heads.
//!
//! gRPC copies every byte of a message four or five times (into the encoder's buffer, the
//! HTTP/2 frames, the decoder's buffer, the message) and holds each message whole; a data
//! connection costs the kernel's two copies, and the receiver reads straight into the blocks
//! the payload will live in. A client opens every data connection, to the server's own port:
//! the server tells a data connection from an HTTP/2 one by its first eight bytes
//! ([`MAGIC`]). The connection names its call by a random key that only the call's head
//! carries, so it is bound to a call that passed the server's token check.
//!
//! Plain TCP only: over TLS (or through a gRPC proxy, with
//! `RemoteConfig::with_data_connections(false)`) the blocks go as gRPC chunks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shm_codec::{Encoder, Source};
use shm_core::ShmBlockMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::{Bounds, Counter, WireError};

/// The first bytes of a data connection (an HTTP/2 connection starts with `PRI * HT`).
pub(crate) const MAGIC: [u8; 8] = *b"SHM-DATA";

/// The smallest payload whose blocks go over a data connection: below it, opening the
/// connection costs more than the copies it saves.
pub const DATA_CONNECTION_MIN_BYTES: u64 = 1 << 20;

/// Bytes asked of the kernel per read. Sender and receiver overlap best when each read takes
/// part of what is queued: on loopback here, reads of 32 KiB–256 KiB moved 64 MiB about as
/// fast as each other, and measurably faster than reads of 1 MiB or of everything at once.
const READ_PIECE: usize = 256 << 10;

/// Bytes handed to the kernel per write: 1 MiB beat 256 KiB and 8 MiB here.
const WRITE_PIECE: usize = 1 << 20;

/// The most data connections a server keeps waiting for their call's head; past it, a new
/// one is closed at once.
pub(crate) const MAX_WAITING: usize = 256;

/// A data connection's name: random, drawn by the side that will write the head naming it.
pub(crate) type Key = [u8; 16];

/// What a data connection is for, as its preamble says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The client sends a call's arguments.
    Push,
    /// The client takes a call's result.
    Pull,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Push => b'P',
            Kind::Pull => b'G',
        }
    }

    fn of(byte: u8) -> Option<Kind> {
        match byte {
            b'P' => Some(Kind::Push),
            b'G' => Some(Kind::Pull),
            _ => None,
        }
    }
}

/// A new random key, from the kernel's generator.
pub(crate) fn new_key() -> Key {
    let mut key = [0u8; 16];
    let _ = rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::empty());
    key
}

/// A payload's blocks, to be written on the data connection named `key`: blocks that hold
/// their bytes, or the pieces of blocks never written here (an Arrow batch's buffers on the
/// heap, an array the caller lends for `'a`), which go onto the connection from where they
/// lie.
pub(crate) struct Outbound<'a> {
    pub key: Key,
    pub sources: Vec<Source<'a>>,
}

fn lost(what: &str, err: std::io::Error) -> WireError {
    WireError::Stream(tonic::Status::unavailable(format!(
        "the data connection, {what}: {err}"
    )))
}

/// Runs `io`, waiting at most `gap` for it.
async fn within<T>(
    gap: Option<Duration>,
    what: &'static str,
    io: impl Future<Output = std::io::Result<T>>,
) -> Result<T, WireError> {
    let done = match gap {
        Some(after) => tokio::time::timeout(after, io)
            .await
            .map_err(|_| WireError::Stalled { what, after })?,
        None => io.await,
    };
    done.map_err(|err| lost(what, err))
}

/// Opens a data connection to `addr` (`host:port`) for `kind`, named `key`.
pub(crate) async fn connect(addr: &str, key: Key, kind: Kind) -> Result<TcpStream, WireError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|err| lost("connecting", err))?;
    stream
        .set_nodelay(true)
        .map_err(|err| lost("connecting", err))?;
    let mut preamble = [0u8; PREAMBLE];
    preamble[..8].copy_from_slice(&MAGIC);
    preamble[8..24].copy_from_slice(&key);
    preamble[24] = kind.byte();
    stream
        .write_all(&preamble)
        .await
        .map_err(|err| lost("sending its preamble", err))?;
    Ok(stream)
}

/// The preamble's length: [`MAGIC`], the key, the kind.
const PREAMBLE: usize = 8 + 16 + 1;

/// Bytes of the buffer that gathers small pieces (and the padding between them) into fewer
/// writes: a frame of 100,000 narrow columns is 100,000 pieces.
const GATHER: usize = 256 << 10;

/// Writes the blocks of `sources` in order, waiting at most `gap` for each write to be taken.
/// The padding between the pieces of an unwritten block goes as zeros.
pub(crate) async fn write_blocks(
    stream: &mut TcpStream,
    sources: &[Source<'_>],
    sent: &Counter,
    gap: Option<Duration>,
) -> Result<(), WireError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut out = tokio::io::BufWriter::with_capacity(GATHER, stream);
    let mut write = async |bytes: &[u8]| {
        for part in bytes.chunks(WRITE_PIECE) {
            within(gap, "the receiver taking the data", out.write_all(part)).await?;
            sent.add(part.len());
        }
        Ok::<_, WireError>(())
    };
    let zeros = |len: usize| {
        (0..len.div_ceil(ZEROS.len()))
            .map(move |i| &ZEROS[..(len - i * ZEROS.len()).min(ZEROS.len())])
    };
    for source in sources {
        match source {
            Source::Block(block) => write(block.as_slice()).await?,
            Source::Pieces(pieces) => {
                let mut at = 0;
                for (piece, offset) in pieces.iter() {
                    for pad in zeros(offset - at) {
                        write(pad).await?;
                    }
                    write(piece).await?;
                    at = offset + piece.len();
                }
                for pad in zeros(source.len() - at) {
                    write(pad).await?;
                }
            }
        }
    }
    within(gap, "the receiver taking the data", out.flush()).await
}

/// Reads blocks of `lens` bytes, in order, into blocks of `encoder`'s pool, each allocated
/// (and charged to the reservation) when its first byte comes, within `bounds`.
pub(crate) async fn read_blocks(
    stream: &mut TcpStream,
    lens: &[usize],
    encoder: &Encoder,
    bounds: &Bounds<'_>,
    received: &Counter,
) -> Result<Vec<ShmBlockMut>, WireError> {
    let mut blocks = Vec::with_capacity(lens.len().min(4096));
    for &len in lens {
        let mut block = if len == 0 {
            encoder.pool().alloc(0)?
        } else {
            // Its first byte, before its memory.
            let mut first = [0u8; 1];
            let n = within(
                bounds.gap,
                "the next bytes of data",
                stream.read(&mut first),
            )
            .await?;
            if n == 0 {
                return Err(short(received.get(), lens));
            }
            bounds.reservation.charge(len as u64)?;
            let mut block = encoder.pool().alloc(len)?;
            block.as_mut_slice()[0] = first[0];
            received.add(1);
            block
        };
        let mut at = len.min(1);
        while at < len {
            let end = len.min(at + READ_PIECE);
            let into = &mut block.as_mut_slice()[at..end];
            let n = within(bounds.gap, "the next bytes of data", stream.read(into)).await?;
            if n == 0 {
                return Err(short(received.get(), lens));
            }
            at += n;
            received.add(n);
        }
        blocks.push(block);
    }
    Ok(blocks)
}

fn short(got: u64, lens: &[usize]) -> WireError {
    let total: u64 = lens.iter().map(|&l| l as u64).sum();
    WireError::Protocol(format!(
        "the data connection closed after {got} of the {total} bytes of blocks the payload \
         declared"
    ))
}

/// Data connections and the calls they belong to, matched by key on a server: whichever
/// comes first waits for the other.
#[derive(Default)]
pub(crate) struct Rendezvous {
    waiting: Mutex<HashMap<Key, Waiting>>,
    serials: AtomicU64,
}

enum Waiting {
    /// A connection came before its call claimed it; `serial` tells it from a later one of
    /// the same key when its time runs out.
    Connection {
        stream: TcpStream,
        kind: Kind,
        serial: u64,
    },
    /// A call waits for its connection.
    Call(tokio::sync::oneshot::Sender<(TcpStream, Kind)>),
}

impl Rendezvous {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Waiting>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the preamble of a connection whose first bytes are [`MAGIC`] and hands it to its
    /// call, or keeps it for `timeout` for its call to claim. A preamble that does not come
    /// within `timeout`, or a key already waiting, closes the connection; past
    /// [`MAX_WAITING`] waiting, the one that has waited longest is closed.
    pub(crate) async fn arrive(self: Arc<Self>, mut stream: TcpStream, timeout: Duration) {
        let mut preamble = [0u8; PREAMBLE];
        let read = tokio::time::timeout(timeout, stream.read_exact(&mut preamble)).await;
        if !matches!(read, Ok(Ok(_))) {
            return;
        }
        let Some(kind) = Kind::of(preamble[24]) else {
            return;
        };
        let mut key = [0u8; 16];
        key.copy_from_slice(&preamble[8..24]);
        let serial = {
            let mut waiting = self.lock();
            match waiting.remove(&key) {
                Some(Waiting::Call(call)) => {
                    let _ = call.send((stream, kind));
                    return;
                }
                Some(other) => {
                    // A second connection of a key: both go.
                    drop(other);
                    return;
                }
                None => {
                    if waiting.len() >= MAX_WAITING {
                        // Full: the connection that has waited longest goes. An honest one
                        // is claimed within a round trip of coming, so under a flood of
                        // connections no call claims, it is the flood's that go.
                        let oldest = waiting
                            .iter()
                            .filter_map(|(key, w)| match w {
                                Waiting::Connection { serial, .. } => Some((*serial, *key)),
                                Waiting::Call(_) => None,
                            })
                            .min();
                        match oldest {
                            Some((_, key)) => drop(waiting.remove(&key)),
                            None => return,
                        }
                    }
                    let serial = self.serials.fetch_add(1, Ordering::Relaxed);
                    waiting.insert(
                        key,
                        Waiting::Connection {
                            stream,
                            kind,
                            serial,
                        },
                    );
                    serial
                }
            }
        };
        tokio::time::sleep(timeout).await;
        let mut waiting = self.lock();
        if matches!(waiting.get(&key), Some(Waiting::Connection { serial: s, .. }) if *s == serial)
        {
            waiting.remove(&key);
        }
    }

    /// The data connection named `key`, for `kind`, waiting at most `timeout` for it. A call
    /// that gives up (or is dropped) leaves nothing behind. Calls are not counted against
    /// [`MAX_WAITING`]: they passed the token check, and the server bounds them as calls.
    pub(crate) async fn claim(
        &self,
        key: Key,
        kind: Kind,
        timeout: Option<Duration>,
    ) -> Result<TcpStream, WireError> {
        let receiver = {
            let mut waiting = self.lock();
            match waiting.remove(&key) {
                Some(Waiting::Connection {
                    stream, kind: k, ..
                }) => return checked(stream, k, kind),
                Some(Waiting::Call(_)) => {
                    return Err(WireError::Protocol(
                        "two calls name the same data connection".into(),
                    ));
                }
                None => {
                    let (sender, receiver) = tokio::sync::oneshot::channel();
                    waiting.insert(key, Waiting::Call(sender));
                    receiver
                }
            }
        };
        let _unclaimed = Unclaimed {
            rendezvous: self,
            key,
        };
        let what = "the call's data connection";
        let arrived = match timeout {
            Some(after) => tokio::time::timeout(after, receiver)
                .await
                .map_err(|_| WireError::Stalled { what, after })?,
            None => receiver.await,
        };
        let (stream, k) = arrived
            .map_err(|_| WireError::Protocol("a second data connection of a key came".into()))?;
        checked(stream, k, kind)
    }
}

fn checked(stream: TcpStream, came: Kind, wanted: Kind) -> Result<TcpStream, WireError> {
    if came == wanted {
        Ok(stream)
    } else {
        Err(WireError::Protocol(format!(
            "the data connection came for {came:?}, the call wanted it for {wanted:?}"
        )))
    }
}

/// Removes a call's entry when the call stops waiting, however it stops.
struct Unclaimed<'a> {
    rendezvous: &'a Rendezvous,
    key: Key,
}

impl Drop for Unclaimed<'_> {
    fn drop(&mut self) {
        let mut waiting = self.rendezvous.lock();
        if matches!(waiting.get(&self.key), Some(Waiting::Call(_))) {
            waiting.remove(&self.key);
        }
    }
}

/// A server's accepted connections, routed by their first bytes: data connections to
/// `rendezvous` (when the server takes them), the rest, as a stream, to gRPC. Each
/// connection is told apart on a task of its own, so a client that sends nothing holds up no
/// other; one that sends nothing for `timeout` goes to gRPC, which deals with it as before.
pub(crate) fn route(
    listener: tokio::net::TcpListener,
    rendezvous: Option<Arc<Rendezvous>>,
    timeout: Duration,
) -> impl futures::Stream<Item = std::io::Result<TcpStream>> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<TcpStream>>(64);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of descriptors, say: gRPC hears of it; accepting resumes shortly.
                    if sender.send(Err(err)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Some(rendezvous) = rendezvous.clone() else {
                if sender.send(Ok(stream)).await.is_err() {
                    return;
                }
                continue;
            };
            let sender = sender.clone();
            tokio::spawn(async move {
                match starts_with_magic(&stream, timeout).await {
                    Some(true) => rendezvous.arrive(stream, timeout).await,
                    Some(false) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    None => {}
                }
            });
        }
    });
    futures::stream::unfold(receiver, |mut receiver| async move {
        let next = receiver.recv().await?;
        Some((next, receiver))
    })
}

/// Whether the connection's first bytes are [`MAGIC`]: `Some(false)` as soon as one differs
/// (or nothing came within `timeout`), `None` if it closed first.
async fn starts_with_magic(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = [0u8; MAGIC.len()];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await;
        let n = match peeked {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => n,
            Err(_) => return Some(false),
        };
        if first[..n] != MAGIC[..n] {
            return Some(false);
        }
        if n == MAGIC.len() {
            return Some(true);
        }
        // A peek returns at once while any byte waits: wait a little for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
        if tokio::time::Instant::now() >= deadline {
            return Some(false);
        }
    }
}
