//! The worker side: a router of named handlers, and the loop that serves the parent.

use std::collections::HashMap;
use std::fmt::Display;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Weak;
use std::time::Duration;

use shm_codec::{Decode, Decoder, Encode, Encoder, Payload};
use shm_core::{ShmBlock, ShmPool, ShmRef};

use crate::channel::{Channel, Direction, PROTOCOL_VERSION, Wake};
use crate::error::{RemoteError, RemoteErrorKind, Result, TransportError};
use crate::frame::Frame;

/// The environment variable through which a worker finds its channel.
pub const CHANNEL_ENV: &str = "SHM_TRANSPORT_CHANNEL";

/// How often an idle worker looks at the views of arguments it still holds.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// What a handler can use besides its arguments: the worker's pool, to produce results in
/// shared memory (`ShmArrayMut::zeros(ctx.pool(), …)`).
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
                .map_err(|e| remote(RemoteErrorKind::BadResult, e.to_string()))
        };
        self.handlers.insert(method.to_owned(), Box::new(erased));
        self
    }

    fn run(
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
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                Err(RemoteError {
                    method: method.to_owned(),
                    kind: RemoteErrorKind::Panic,
                    message,
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
/// removes the parent's orphaned segments and its own, and exits.
pub fn serve(router: Router) -> Result<()> {
    let channel_ref = std::env::var(CHANNEL_ENV).map_err(|_| TransportError::NotAWorker {
        variable: CHANNEL_ENV,
    })?;
    let channel_ref = ShmRef::from_hex(&channel_ref)?;
    let pool = ShmPool::new()?;
    let channel = Channel::open(pool.attach(&channel_ref)?)?;
    watch_parent(channel.parent_pid(), pool.clone());

    let encoder = Encoder::new(pool.clone());
    let requests = channel.ring(Direction::ToWorker);
    let replies = channel.ring(Direction::ToParent);
    let send = |frame: &Frame| frame.send(&replies, &pool, || true);
    send(&Frame::Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
    })?;

    // Results and spilled replies kept alive until the parent releases them, by reply id.
    let mut held: HashMap<u64, (Option<Payload>, Option<ShmBlock>)> = HashMap::new();
    // Arguments a handler kept views of, by call id.
    let mut kept_args: Vec<(u64, Vec<Weak<ShmBlock>>)> = Vec::new();
    loop {
        let mut still_kept = Vec::with_capacity(kept_args.len());
        for (id, views) in kept_args.drain(..) {
            if views.iter().any(|view| view.strong_count() > 0) {
                still_kept.push((id, views));
            } else {
                send(&Frame::ArgsReleased { id })?;
            }
        }
        kept_args = still_kept;
        let Some(bytes) = next_request(&requests, !kept_args.is_empty())? else {
            continue;
        };
        let frame = match Frame::read(&bytes, &pool) {
            Ok(frame) => frame,
            Err(err) => {
                // Without an id there is nobody to answer; say so and serve on.
                let _ = writeln!(
                    std::io::stderr(),
                    "dropped a message from the parent: {err}"
                );
                continue;
            }
        };
        match frame {
            Frame::Call { id, method, args } => {
                let decoder = Decoder::tracking(pool.clone());
                let outcome = router.run(&method, &args, &decoder, &encoder);
                drop(args);
                let views: Vec<_> = decoder
                    .take_attached()
                    .into_iter()
                    .filter(|view| view.strong_count() > 0)
                    .collect();
                let args_kept = !views.is_empty();
                if args_kept {
                    kept_args.push((id, views));
                }
                // A tuple's blocks are its members': look at what the payload keeps alive.
                let has_blocks = matches!(&outcome, Ok(payload)
                    if !payload.buffers.is_empty() || !payload.kept_blocks().is_empty());
                let reply = Frame::Reply {
                    id,
                    outcome,
                    args_kept,
                    needs_release: has_blocks,
                };
                let spill = send(&reply)?;
                if has_blocks || spill.is_some() {
                    let result = match reply {
                        Frame::Reply {
                            outcome: Ok(payload),
                            ..
                        } => Some(payload),
                        _ => None,
                    };
                    held.insert(id, (result, spill));
                }
            }
            Frame::Release { id } => {
                held.remove(&id);
            }
            Frame::Shutdown => return Ok(()),
            other => {
                return Err(crate::error::malformed(format!(
                    "unexpected frame from the parent: {other:?}"
                )));
            }
        }
    }
}

/// Waits for the next request. With views of arguments outstanding, returns `None` after an
/// idle interval, so that their release is noticed and reported.
fn next_request(
    requests: &crate::channel::Ring<'_>,
    views_outstanding: bool,
) -> Result<Option<Vec<u8>>> {
    loop {
        if let Some(bytes) = requests.pop()? {
            return Ok(Some(bytes));
        }
        let woke = requests.wait(None, IDLE_CHECK, || false);
        if woke != Wake::Ready && views_outstanding {
            return Ok(None);
        }
    }
}

/// Exits the worker, after removing the parent's orphaned segments and its own, as soon as the
/// parent process is gone (the worker is then re-parented, so `getppid` changes).
fn watch_parent(parent: u32, pool: ShmPool) {
    std::thread::Builder::new()
        .name("shm-parent-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(IDLE_CHECK);
                // SAFETY: getppid has no preconditions and cannot fail.
                let current = unsafe { libc::getppid() } as u32;
                if current != parent {
                    // The parent read our stderr: writing may fail now, and must not panic.
                    let _ = writeln!(
                        std::io::stderr(),
                        "parent process {parent} is gone; worker exits"
                    );
                    let _ = shm_core::sweep_orphans();
                    pool.close_all();
                    shm_core::end_session();
                    std::process::exit(70);
                }
            }
        })
        .map(drop)
        .unwrap_or_else(|e| {
            let _ = writeln!(std::io::stderr(), "cannot watch the parent process: {e}");
        });
}
