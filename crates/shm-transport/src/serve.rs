//! The worker side: a router of named handlers, and the loop that serves the parent.

use std::collections::HashMap;
use std::fmt::Display;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shm_codec::{CodecError, Decode, Decoder, Encode, Encoder, Payload};
use shm_core::{SegmentLink, SessionId, ShmError, ShmPool, ShmRef};

use crate::channel::{Channel, Direction, PROTOCOL_VERSION, SLOT_LEN, Side};
use crate::error::{RemoteError, RemoteErrorKind, Result, TransportError, malformed};
use crate::frame::{Endpoint, Frame};
use crate::trust::Admission;

/// The environment variable through which a worker finds its channel: the hex form of the
/// channel block's reference.
pub const CHANNEL_ENV: &str = "SHM_TRANSPORT_CHANNEL";

/// The environment variable that gives a worker the number of the descriptor it inherited:
/// its end of the [`SegmentLink`] over which the parent's segments arrive (the channel's
/// first).
pub const LINK_ENV: &str = "SHM_TRANSPORT_LINK";

/// Whether [`serve`] has taken the inherited link descriptor: it can own it only once.
static LINK_TAKEN: AtomicBool = AtomicBool::new(false);

/// What a handler can use besides its arguments: the worker's pool, to produce results in
/// shared memory (`ShmArrayMut::zeros(ctx.pool(), …)`; [`Router`] shows one).
#[derive(Debug)]
pub struct Context<'a> {
    encoder: &'a Encoder,
    method: &'a str,
}

impl Context<'_> {
    /// The worker's pool; results allocated here are sent without a copy.
    pub fn pool(&self) -> &ShmPool {
        self.encoder.pool()
    }

    /// The method being handled.
    pub fn method(&self) -> &str {
        self.method
    }
}

type Handler = Box<
    dyn Fn(&Payload, &Decoder, &Encoder, &str) -> std::result::Result<Payload, RemoteError>
        + Send
        + Sync,
>;

/// Named handlers. A handler takes its decoded arguments (zero-copy views of the caller's
/// memory) and returns a value that is encoded into the worker's pool.
///
/// ```no_run
/// use ndarray::Ix1;
/// use shm_codec::{Serde, ShmArray, ShmArrayMut};
/// use shm_transport::{Router, is_worker, serve};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let router = Router::new()
///     .handle("sum", |a: ShmArray<f64, Ix1>, _ctx| Ok::<_, String>(Serde(a.view().sum())))
///     .handle("double", |a: ShmArray<f64, Ix1>, ctx| {
///         // The result is produced in the worker's pool and sent without a copy.
///         let mut out = ShmArrayMut::<f64, Ix1>::zeros(ctx.pool(), a.len())
///             .map_err(|e| e.to_string())?;
///         out.view_mut().zip_mut_with(&a.view(), |o, x| *o = 2.0 * x);
///         Ok::<_, String>(out.freeze())
///     });
/// if is_worker() {
///     serve(router)?; // returns when the parent asks the worker to stop
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Default)]
pub struct Router {
    handlers: HashMap<String, Handler>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("Router").field("methods", &names).finish()
    }
}

impl Router {
    /// A router with no handler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under `method`. Its error becomes a [`RemoteError`] of kind
    /// `Handler` at the caller; a panic one of kind `Panic`; the worker goes on serving.
    pub fn handle<A, R, E, F>(mut self, method: &str, handler: F) -> Self
    where
        A: Decode,
        R: Encode,
        E: Display,
        F: Fn(A, &Context<'_>) -> std::result::Result<R, E> + Send + Sync + 'static,
    {
        let erased = move |args: &Payload, decoder: &Decoder, encoder: &Encoder, method: &str| {
            let remote = |kind, message: String| RemoteError {
                method: method.to_owned(),
                kind,
                message,
            };
            let args = A::decode(args, decoder)
                .map_err(|e| remote(RemoteErrorKind::BadArguments, e.to_string()))?;
            let context = Context { encoder, method };
            let result = handler(args, &context)
                .map_err(|e| remote(RemoteErrorKind::Handler, e.to_string()))?;
            result
                .encode(encoder)
                .map_err(|e| RemoteError::from_codec(method, RemoteErrorKind::BadResult, &e))
        };
        self.handlers.insert(method.to_owned(), Box::new(erased));
        self
    }

    /// Registers a handler that works on payloads as they travel, for callers that decode and
    /// encode values themselves (the Python module `shm` serves Python functions through it).
    /// `handler` gets the arguments' payload, the decoder that attaches its blocks and the
    /// context; it returns the result's payload, whose blocks must be in `ctx.pool()`, or the
    /// error to send (any kind; `method` is filled in). A panic becomes an error of kind
    /// `Panic`, as for [`handle`](Self::handle).
    pub fn handle_payload<F>(mut self, method: &str, handler: F) -> Self
    where
        F: Fn(&Payload, &Decoder, &Context<'_>) -> std::result::Result<Payload, RemoteError>
            + Send
            + Sync
            + 'static,
    {
        let erased = move |args: &Payload, decoder: &Decoder, encoder: &Encoder, method: &str| {
            let context = Context { encoder, method };
            handler(args, decoder, &context).map_err(|mut err| {
                err.method = method.to_owned();
                err
            })
        };
        self.handlers.insert(method.to_owned(), Box::new(erased));
        self
    }

    /// Runs the handler of `method` on arguments as they arrived, decoding them with
    /// `decoder` and encoding the result with `encoder` — what [`serve`] does for each call,
    /// for transports of other crates (shm-flight serves remote calls through it). A panic
    /// in the handler is caught and returned as an error of kind `Panic`.
    pub fn dispatch(
        &self,
        method: &str,
        args: &Payload,
        decoder: &Decoder,
        encoder: &Encoder,
    ) -> std::result::Result<Payload, RemoteError> {
        let Some(handler) = self.handlers.get(method) else {
            return Err(RemoteError {
                method: method.to_owned(),
                kind: RemoteErrorKind::UnknownMethod,
                message: format!("no handler named {method:?}"),
            });
        };
        catch_unwind(AssertUnwindSafe(|| handler(args, decoder, encoder, method))).unwrap_or_else(
            |panic| {
                Err(RemoteError {
                    method: method.to_owned(),
                    kind: RemoteErrorKind::Panic,
                    message: shm_codec::panic_message(panic.as_ref()),
                })
            },
        )
    }
}

/// Whether this process was started as a worker (its environment names a channel).
pub fn is_worker() -> bool {
    std::env::var_os(CHANNEL_ENV).is_some()
}

/// Serves the parent until it asks for shutdown, then returns. If the parent dies, the worker
/// exits at once; the kernel frees the segments of both.
pub fn serve(router: Router) -> Result<()> {
    let variable =
        |name| std::env::var(name).map_err(|_| TransportError::NotAWorker { variable: name });
    let channel_ref = ShmRef::from_hex(&variable(CHANNEL_ENV)?)?;
    let link = inherited_link(&variable(LINK_ENV)?)?;
    let pool = ShmPool::new()?;
    let channel = Channel::open(link.attach_shared(&channel_ref)?)?;
    let parent_session = SessionId::of_segment(channel.segment_name());
    watch_parent(channel.parent_pid(), pool.clone())?;
    // The parent may name its own session (the channel's) and ours; it spawned us, so its
    // blocks are read in place.
    let admission = Admission::new(pool.session(), parent_session, false);
    // The parent may keep our results for as long as it likes: it holds what it asked for.
    let endpoint = Endpoint::new(
        channel,
        Side::Worker,
        pool.clone(),
        admission,
        Arc::new(link),
        u64::MAX,
    );
    let encoder = Encoder::new(pool.clone());
    let requests = endpoint.channel().frames(Direction::ToWorker);
    let replies = endpoint.channel().frames(Direction::ToParent);
    send(
        &endpoint,
        Frame::Hello {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            session: pool.session().to_string(),
        },
        Vec::new(),
    )?;
    // Calls are read over the last one, into its buffers.
    let mut frame = Frame::Shutdown;
    loop {
        match endpoint.receive_into(&mut frame) {
            Ok(true) => {}
            Ok(false) => {
                // No deadline: the parent rings when it sends, and if it dies the watcher
                // thread ends this process. Woken without a frame, the worker reads the link:
                // the parent's descriptors found it full.
                let woken = std::cell::Cell::new(false);
                requests.wait_for_frame(None, || {
                    if woken.replace(true) {
                        endpoint.read_link();
                    }
                    false
                });
                continue;
            }
            // Impossible ring positions stay broken: nothing more can
            // come through this channel.
            Err(err) if requests.unread().is_err() => return Err(err),
            Err(err) => {
                // Without an id there is nobody to answer; say so and serve on.
                let _ = writeln!(
                    std::io::stderr(),
                    "dropped a message from the parent: {err}"
                );
                continue;
            }
        };
        match &frame {
            Frame::Call {
                id,
                method,
                args,
                loans,
            } => {
                // The reply's push reads the ring's positions: they come while the handler runs.
                replies.prefetch_positions();
                let outcome = match endpoint.decoder(args, loans) {
                    Ok(decoding) => {
                        let outcome = router.dispatch(method, args, &decoding.decoder, &encoder);
                        decoding.finish();
                        outcome
                    }
                    Err(err) => Err(RemoteError {
                        method: method.clone(),
                        kind: RemoteErrorKind::BadArguments,
                        message: err.to_string(),
                    }),
                };
                reply(&endpoint, *id, method, outcome)?;
                // Only a small call's buffers are kept: not those grown past a slot's size,
                // nor a list of references (each holds its segment's name).
                if !args.buffers().is_empty()
                    || method.capacity() + args.meta.capacity() + args.inline.capacity() > SLOT_LEN
                {
                    frame = Frame::Shutdown;
                }
            }
            Frame::Shutdown => return Ok(()),
            other => {
                let _ = writeln!(
                    std::io::stderr(),
                    "dropped an unexpected message from the parent: {other:?}"
                );
            }
        }
    }
}

/// Sends the outcome of call `id`. A reply that cannot be sent for want of shared memory (a
/// spilled frame) becomes an error reply that needs none.
fn reply(
    endpoint: &Endpoint,
    id: u64,
    method: &str,
    outcome: std::result::Result<Payload, RemoteError>,
) -> Result<()> {
    // A result that names no block is written into the ring as it is, no frame built; one
    // too large for a slot goes the general way below, which spills it.
    if let Ok(payload) = &outcome
        && payload.buffers().is_empty()
        && payload.blocks().is_empty()
    {
        let write = |out: &mut Vec<u8>| Frame::write_reply(out, id, payload, &[]);
        if let Some(sent) = endpoint.send_unlent(write, None, &|| false, &|| false, &|| {})? {
            return sent.map_err(stalled);
        }
    }
    let outcome = outcome.and_then(|mut payload| {
        if payload.is_backed() {
            Ok(payload)
        } else {
            Err(RemoteError {
                method: method.to_owned(),
                kind: RemoteErrorKind::BadResult,
                message: format!(
                    "the result names {} blocks but holds {}: a payload read from a peer \
                     cannot be sent on as it is",
                    payload.buffers().len(),
                    payload.take_blocks().len()
                ),
            })
        }
    });
    let (outcome, blocks) = match outcome.map(|payload| endpoint.localize(payload)) {
        Ok(Ok(mut payload)) => {
            let blocks = payload.take_blocks();
            (Ok(payload), blocks)
        }
        Ok(Err(err)) => {
            let err = CodecError::Shm(err);
            let failed = RemoteError::from_codec(method, RemoteErrorKind::BadResult, &err);
            (Err(failed), Vec::new())
        }
        Err(err) => (Err(err), Vec::new()),
    };
    let frame = Frame::Reply {
        id,
        outcome,
        loans: Vec::new(),
    };
    match send(endpoint, frame, blocks) {
        Err(TransportError::Shm(ShmError::OutOfSharedMemory {
            requested,
            available,
        })) => {
            let err = RemoteError {
                method: method.to_owned(),
                kind: RemoteErrorKind::OutOfSharedMemory {
                    requested,
                    available,
                },
                message: format!(
                    "the reply needs {requested} bytes of shared memory, {available} are free"
                ),
            };
            let frame = Frame::Reply {
                id,
                outcome: Err(err),
                loans: Vec::new(),
            };
            send(endpoint, frame, Vec::new())
        }
        other => other,
    }
}

/// Sends a frame to the parent, waiting as long as the reply ring is full: the parent drains
/// it whenever any of its threads waits for a reply or to send, and if it dies, the watcher
/// ends this process.
fn send(
    endpoint: &Endpoint,
    frame: Frame,
    blocks: Vec<std::sync::Arc<shm_core::ShmBlock>>,
) -> Result<()> {
    endpoint
        .send(frame, blocks, None, &|| false, &|| false, &|| {})?
        .map_err(stalled)
}

/// The error for a send to the parent that stalled (it waits for nothing, so cannot).
fn stalled(stall: crate::frame::Stall) -> TransportError {
    malformed(format!("sending to the parent stalled: {stall:?}"))
}

/// This process's end of the link its parent made, from the descriptor number in
/// [`LINK_ENV`]: checked to be an open socket before it is owned, owned once, and kept from
/// the worker's own children.
fn inherited_link(number: &str) -> Result<SegmentLink> {
    let bad = |why: &str| malformed(format!("{LINK_ENV}={number:?}: {why}"));
    let fd: RawFd = number.parse().map_err(|_| bad("not a descriptor number"))?;
    // SAFETY: `fcntl(F_GETFD)` takes no argument and only reads the descriptor table; an
    // unused number is an error (EBADF), not undefined behaviour.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad("no such open descriptor"));
    }
    if LINK_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(bad("this process serves already"));
    }
    // SAFETY: the descriptor is open (checked above), the parent passed it to this process
    // for the link alone, and `LINK_TAKEN` makes this the only owner that will ever be made
    // of it in this process.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| bad(&format!("cannot keep it from children: {e}")))?;
    Ok(SegmentLink::from_fd(owned)?)
}

/// Ends the worker as soon as the parent process is gone: a thread waits on a pidfd of the
/// parent (no timer), then exits; the kernel frees the segments of both processes once their
/// last descriptors and mappings are gone.
fn watch_parent(parent: u32, pool: ShmPool) -> Result<()> {
    use rustix::process::{Pid, PidfdFlags, getppid, pidfd_open};
    let gone = |what: &str| {
        malformed(format!(
            "parent process {parent} {what}; the worker does not start"
        ))
    };
    let pid = i32::try_from(parent)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| gone("has no valid pid"))?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).map_err(|_| gone("is gone"))?;
    // The pidfd names whatever process has that pid now; if we were re-parented, the parent
    // died before we opened it and the pid may be another process's.
    if getppid() != Some(pid) {
        return Err(gone("is gone"));
    }
    std::thread::Builder::new()
        .name("shm-parent-watch".into())
        .spawn(move || {
            let mut fds = [rustix::event::PollFd::new(
                &pidfd,
                rustix::event::PollFlags::IN,
            )];
            while rustix::event::poll(&mut fds, None).is_err() {}
            // The parent read our stderr: writing may fail now, and must not panic.
            let _ = writeln!(
                std::io::stderr(),
                "parent process {parent} is gone; worker exits"
            );
            pool.close_all();
            std::process::exit(70);
        })
        .map(drop)
        .map_err(|e| malformed(format!("cannot watch the parent process: {e}")))
}
