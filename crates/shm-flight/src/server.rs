//! The worker side: a Flight server that runs a [`Router`]'s handlers for remote callers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::{Stream, StreamExt};
use shm_codec::Encoder;
use shm_core::ShmPool;
use shm_transport::{RemoteError, RemoteErrorKind, Router};
use tokio::sync::{Semaphore, TryAcquireError};
use tonic::{Request, Response, Status, Streaming};

use crate::budget::Budget;
use crate::side::{self, Kind, Rendezvous};

use crate::wire::{
    self, CallHead, Connections, Counter, MESSAGE_SLACK, Outcome, Refusal, ReplyHead, WIRE_VERSION,
    WireError,
};
use crate::{Limits, STREAM_WINDOW};

/// How to run a remote worker: where to listen, and defaults for everything else that the
/// `with_*` methods change.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    pub(crate) addr: SocketAddr,
    pub(crate) token: Option<String>,
    pub(crate) limits: Limits,
    pub(crate) io_threads: usize,
    pub(crate) pool: Option<ShmPool>,
    pub(crate) handlers: usize,
    pub(crate) queue: usize,
    pub(crate) memory: Option<(u64, u64)>,
    pub(crate) message_timeout: Duration,
    pub(crate) data_connections: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<ServerTls>,
}

/// A server's TLS identity.
#[cfg(feature = "tls")]
#[derive(Clone, Debug)]
pub(crate) struct ServerTls {
    pub(crate) cert_pem: Vec<u8>,
    pub(crate) key_pem: Vec<u8>,
}

impl ServerConfig {
    /// A configuration listening on `addr` (port 0 picks a free port, which
    /// [`Server::local_addr`] reports) with defaults for everything else.
    pub fn new(addr: SocketAddr) -> Self {
        ServerConfig {
            addr,
            token: None,
            limits: Limits::default(),
            io_threads: 2,
            pool: None,
            handlers: 1,
            queue: 64,
            memory: None,
            message_timeout: Duration::from_secs(30),
            data_connections: true,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Sets how many handlers run at once, each on a thread of its own. Default 1: calls run
    /// one at a time, as in a local worker.
    pub fn with_handlers(mut self, handlers: usize) -> Self {
        self.handlers = handlers.max(1);
        self
    }

    /// Sets how many received calls may wait for a handler when none is free (0: a call runs
    /// at once or is refused); past it, a call is refused (`RESOURCE_EXHAUSTED`,
    /// [`NetworkFault::Busy`](crate::NetworkFault::Busy)). A waiting
    /// call whose client has gone — cancelled, past its deadline, disconnected — leaves the
    /// queue without running. Default 64.
    pub fn with_queue(mut self, calls: usize) -> Self {
        self.queue = calls;
        self
    }

    /// Sets the shared memory that arguments may hold at once: `total` bytes for all calls,
    /// `per_connection` bytes for the calls of one connection. Memory is reserved as data
    /// arrives, not when a call declares it; a call that does not fit is refused
    /// (`RESOURCE_EXHAUSTED`) and gives back what it held. Default: half the memory available
    /// when the server starts, a quarter per connection.
    pub fn with_memory_budget(mut self, total: u64, per_connection: u64) -> Self {
        self.memory = Some((total, per_connection));
        self
    }

    /// Sets how long the server waits for a call's head, for each message of its arguments,
    /// and for the client to take each message of the result; a call that stalls longer is
    /// dropped with what it held. Default 30 s.
    pub fn with_message_timeout(mut self, timeout: Duration) -> Self {
        self.message_timeout = timeout;
        self
    }

    /// Sets whether clients may send arguments, and take results, of at least
    /// [`DATA_CONNECTION_MIN_BYTES`](crate::DATA_CONNECTION_MIN_BYTES) over data connections:
    /// plain TCP connections to the server's own port, beside the gRPC call, which cost two
    /// copies where gRPC costs five (docs/format.md, "Data connections"). Default `true`;
    /// a server that speaks TLS takes none.
    pub fn with_data_connections(mut self, on: bool) -> Self {
        self.data_connections = on;
        self
    }

    /// Requires `token` of every caller (`authorization: Bearer <token>`). Default: none,
    /// which accepts every caller — only for a listener no one else can reach.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the largest arguments a call may bring (refused before any of their data is
    /// read) and how Arrow frames are sent (see [`Limits`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the threads that move data (handlers run on threads of their own, see
    /// [`with_handlers`](Self::with_handlers)). Default 2.
    pub fn with_io_threads(mut self, threads: usize) -> Self {
        self.io_threads = threads;
        self
    }

    /// Sets the pool received arguments and results live in. Default: a new pool.
    pub fn with_pool(mut self, pool: ShmPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Speaks TLS with this certificate chain and private key (PEM).
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls = Some(ServerTls {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
        });
        self
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server accepts and how it sends frames.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The threads that move data.
    pub fn io_threads(&self) -> usize {
        self.io_threads
    }

    /// How many handlers run at once.
    pub fn handlers(&self) -> usize {
        self.handlers
    }

    /// How many calls may wait for a handler.
    pub fn queue(&self) -> usize {
        self.queue
    }

    /// The shared memory arguments may hold, in all and per connection, if set (otherwise
    /// derived from the memory available at start).
    pub fn memory_budget(&self) -> Option<(u64, u64)> {
        self.memory
    }

    /// How long the server waits for each message of a call.
    pub fn message_timeout(&self) -> Duration {
        self.message_timeout
    }

    /// Whether the server takes data connections (never over TLS).
    pub fn data_connections(&self) -> bool {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return false;
        }
        self.data_connections
    }
}

/// A running remote worker: a Flight server on its own threads. Dropping it stops it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    instance: u64,
    /// Handler slots: closed at shutdown, which refuses the calls still waiting.
    slots: Arc<Semaphore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    /// Binds `config.addr` and serves `router` on background threads.
    pub fn start(router: Router, config: ServerConfig) -> std::io::Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.io_threads.max(1))
            .thread_name("shm-flight-server")
            .enable_all()
            .build()?;
        let pool = match &config.pool {
            Some(pool) => pool.clone(),
            None => ShmPool::new().map_err(std::io::Error::other)?,
        };
        let instance = random_instance();
        let (total, per_connection) = config.memory.unwrap_or_else(|| {
            let available = shm_core::memory_available();
            (available / 2, available / 4)
        });
        let slots = Arc::new(Semaphore::new(config.handlers.max(1)));
        let rendezvous = config
            .data_connections()
            .then(|| Arc::new(Rendezvous::default()));
        let service = WorkerService {
            rendezvous: rendezvous.clone(),
            router: Arc::new(router),
            slots: Arc::clone(&slots),
            waiting: AtomicUsize::new(0),
            queue: config.queue,
            budget: Budget::new(total, per_connection),
            message_timeout: config.message_timeout,
            encoder: Encoder::new(pool),
            token: config.token.clone().map(|t| format!("Bearer {t}")),
            instance,
            max_payload: config.limits.max_payload(),
            whole_batch_bytes: config.limits.whole_batch_bytes(),
        };
        let max_message = config.limits.max_message().max(wire::CHUNK) + MESSAGE_SLACK;
        let service = FlightServiceServer::new(service)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(usize::MAX);
        let listener = runtime.block_on(tokio::net::TcpListener::bind(config.addr))?;
        let addr = listener.local_addr()?;
        let incoming = {
            let _context = runtime.enter();
            side::route(listener, rendezvous, config.message_timeout)
        };
        let builder = tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(2 * STREAM_WINDOW)
            // Calls in progress on one connection: each may buffer a message of up to
            // `max_message` bytes in the gRPC layer.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
        #[cfg(feature = "tls")]
        let builder = match &config.tls {
            Some(tls) => builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                    tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
                ))
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            None => builder,
        };
        let mut builder = builder;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(builder.add_service(service).serve_with_incoming_shutdown(
            incoming,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Server {
            addr,
            instance,
            slots,
            stop: Some(stop),
            task: Some(task),
            runtime: Some(runtime),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// This run's instance number: clients that talked to another instance are told that
    /// the server restarted.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Serves until the server fails (it does not stop by itself).
    pub fn wait(mut self) -> std::io::Result<()> {
        let (Some(runtime), Some(task)) = (self.runtime.take(), self.task.take()) else {
            return Ok(());
        };
        let outcome = runtime.block_on(task);
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(std::io::Error::other(err)),
            Err(err) => Err(std::io::Error::other(err)),
        }
    }

    /// Drains and stops: refuses new calls and those waiting for a handler
    /// (`UNAVAILABLE`), lets the handlers running finish and their results go out, then
    /// stops, and removes everything the server made once its last clone of the pool goes.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.slots.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let (Some(runtime), Some(task)) = (self.runtime.take(), self.task.take()) {
            let _ = runtime.block_on(task);
            // Handlers still running belong to calls whose clients left; their threads
            // hold the pool, so wait for them (a handler that never returns is the one
            // thing that keeps a server from stopping).
            drop(runtime);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// A random instance number, from the kernel's generator.
fn random_instance() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
    u64::from_le_bytes(bytes) | 1
}

struct WorkerService {
    router: Arc<Router>,
    /// Where data connections meet their calls; `None` when the server takes none.
    rendezvous: Option<Arc<Rendezvous>>,
    /// One permit per handler that may run at once; closed when the server drains.
    slots: Arc<Semaphore>,
    /// Calls received and waiting for a permit.
    waiting: AtomicUsize,
    /// How many may wait.
    queue: usize,
    budget: Arc<Budget>,
    message_timeout: Duration,
    encoder: Encoder,
    /// `Bearer <token>`, as the `authorization` header must read.
    token: Option<String>,
    instance: u64,
    max_payload: u64,
    whole_batch_bytes: usize,
}

type Messages<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl WorkerService {
    fn check_token(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let given = metadata
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, expected.as_bytes()) {
            Ok(())
        } else if given.is_empty() {
            Err(Status::unauthenticated(
                "this worker requires a bearer token (authorization: Bearer <token>)",
            ))
        } else {
            Err(Status::unauthenticated(
                "the bearer token is not this worker's",
            ))
        }
    }

    fn reply(&self, outcome: Outcome) -> FlightData {
        wire::head_message(&ReplyHead {
            wire: WIRE_VERSION,
            instance: self.instance,
            outcome,
            takes_connection: self.rendezvous.is_some(),
        })
    }

    /// A reply that is only its head: a refusal or a failure.
    fn head_only(&self, outcome: Outcome) -> Response<Messages<FlightData>> {
        let head = self.reply(outcome);
        Response::new(Box::pin(futures::stream::iter([Ok(head)])))
    }

    fn refuse(&self, refusal: Refusal) -> Response<Messages<FlightData>> {
        self.head_only(Outcome::Refused(refusal))
    }

    async fn exchange(
        &self,
        connection: Option<SocketAddr>,
        mut stream: Streaming<FlightData>,
    ) -> Result<Response<Messages<FlightData>>, Status> {
        let gap = Some(self.message_timeout);
        let first = match wire::next_message(&mut stream, gap, "the call's head").await {
            Ok(Some(first)) => first,
            Ok(None) => {
                return Ok(self.refuse(Refusal::Protocol {
                    what: "the call ended before its head".into(),
                }));
            }
            Err(err) => return Err(status_of(err)),
        };
        if !wire::is_no_header(&first.data_header) {
            return Ok(self.refuse(Refusal::Protocol {
                what: format!(
                    "the head's data_header of {} bytes is not an IPC message of type NONE",
                    first.data_header.len()
                ),
            }));
        }
        let head: CallHead = match wire::read_head(&first, "call") {
            Ok(head) => head,
            Err(what) => return Ok(self.refuse(Refusal::Protocol { what })),
        };
        drop(first);
        if head.wire != WIRE_VERSION {
            return Ok(self.refuse(Refusal::Protocol {
                what: format!(
                    "the client speaks wire version {}, this server {WIRE_VERSION}",
                    head.wire
                ),
            }));
        }
        if head.instance.is_some_and(|i| i != self.instance) {
            return Ok(self.refuse(Refusal::Restarted));
        }
        if self.slots.is_closed() {
            return Err(draining());
        }
        let method = head.method;
        // Refused at once if the arguments cannot fit now; reserved as they arrive.
        let reservation = self.budget.reservation(connection);
        reservation.check(head.args.size()).map_err(status_of)?;
        let received = Counter::default();
        let bounds = wire::Bounds {
            limit: self.max_payload,
            reservation: &reservation,
            gap,
        };
        let connections = match &self.rendezvous {
            Some(rendezvous) => Connections::Accepted(rendezvous),
            None => Connections::Refused,
        };
        let received = wire::receive(
            &mut stream,
            head.args,
            &self.encoder,
            &bounds,
            &received,
            connections,
        );
        let args = match received.await {
            Ok(args) => args,
            Err(WireError::TooLarge { size, limit }) => {
                return Ok(self.refuse(Refusal::TooLarge { size, limit }));
            }
            Err(WireError::Protocol(what)) => return Ok(self.refuse(Refusal::Protocol { what })),
            Err(WireError::Codec(err)) => {
                let failed = RemoteError::from_codec(&method, RemoteErrorKind::BadArguments, &err);
                return Ok(self.head_only(Outcome::Failed(failed)));
            }
            // The caller is gone (or its connection is), stalled, or over the budget.
            Err(err) => return Err(status_of(err)),
        };
        drop(stream);
        // A free handler takes the call at once; otherwise it waits, unless too many wait
        // already. A client that leaves while its call waits drops this future, and the call
        // with it: it never runs.
        let permit = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(draining()),
            Err(TryAcquireError::NoPermits) => {
                let _in_queue = QueuePlace::take(&self.waiting, self.queue)?;
                Arc::clone(&self.slots)
                    .acquire_owned()
                    .await
                    .map_err(|_| draining())?
            }
        };
        let (router, encoder) = (Arc::clone(&self.router), self.encoder.clone());
        let name = method.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let decoder = wire::own_decoder(encoder.pool(), args.blocks());
            let outcome = router.dispatch(&name, &args, &decoder, &encoder);
            drop((args, reservation, permit));
            outcome
        })
        .await
        .map_err(|e| Status::internal(format!("the handler's thread failed: {e}")))?;
        let result = match outcome {
            Ok(result) => result,
            Err(failed) => {
                return Ok(self.head_only(Outcome::Failed(failed)));
            }
        };
        if !result.is_backed() {
            let failed = RemoteError {
                method: method.clone(),
                kind: RemoteErrorKind::BadResult,
                message: "the result names blocks it does not hold: a payload read from a peer \
                          cannot be sent on as it is"
                    .into(),
            };
            return Ok(self.head_only(Outcome::Failed(failed)));
        }
        let sent = Arc::new(Counter::default());
        let by_connection = head.takes_connection && self.rendezvous.is_some();
        let outgoing = wire::outgoing(
            result,
            self.encoder.pool(),
            self.whole_batch_bytes,
            Arc::clone(&sent),
            by_connection,
        );
        let outgoing = match outgoing {
            Ok(outgoing) => outgoing,
            Err(err) => {
                let failed = match err {
                    WireError::Codec(err) => {
                        RemoteError::from_codec(&method, RemoteErrorKind::BadResult, &err)
                    }
                    other => RemoteError {
                        method: method.clone(),
                        kind: RemoteErrorKind::BadResult,
                        message: format!("{other:?}"),
                    },
                };
                return Ok(self.head_only(Outcome::Failed(failed)));
            }
        };
        let head = self.reply(Outcome::Done(outgoing.head));
        let messages = paced(
            std::iter::once(head).chain(outgoing.data),
            self.message_timeout,
        );
        let (Some(outbound), Some(rendezvous)) = (outgoing.connection, &self.rendezvous) else {
            return Ok(Response::new(messages));
        };
        // The result's blocks wait for the client's data connection, as long as a message
        // would, and are written to it; the reply's stream ends when they are written. A
        // client that cancels the call (or leaves) drops the stream, and with it the wait
        // and the blocks.
        let (rendezvous, timeout) = (Arc::clone(rendezvous), self.message_timeout);
        let pull = futures::stream::once(async move {
            let mut connection = rendezvous
                .claim(outbound.key, Kind::Pull, Some(timeout))
                .await?;
            side::write_blocks(&mut connection, &outbound.sources, &sent, Some(timeout)).await
        })
        .filter_map(|written: Result<(), WireError>| async move {
            written
                .err()
                .map(|err| Err(Status::unavailable(format!("{err:?}"))))
        });
        Ok(Response::new(Box::pin(messages.chain(pull))))
    }
}

/// The most calls in progress on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// A place in the queue of calls waiting for a handler, given back when dropped.
struct QueuePlace<'a>(&'a AtomicUsize);

impl<'a> QueuePlace<'a> {
    fn take(waiting: &'a AtomicUsize, limit: usize) -> Result<Self, Status> {
        let before = waiting.fetch_add(1, Ordering::AcqRel);
        let place = QueuePlace(waiting);
        if before >= limit {
            return Err(Status::resource_exhausted(format!(
                "{before} calls wait for a handler already, as many as this server queues"
            )));
        }
        Ok(place)
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a draining server says to the calls it refuses.
pub(crate) const DRAINING: &str = "the server is shutting down and runs no more calls";

fn draining() -> Status {
    Status::unavailable(DRAINING)
}

/// The status that ends a call the server will not answer with a head.
fn status_of(err: WireError) -> Status {
    match err {
        WireError::Stream(status) => status,
        WireError::Busy(what) => Status::resource_exhausted(what),
        WireError::Stalled { what, after } => {
            Status::deadline_exceeded(format!("{what} did not come within {after:?}"))
        }
        other => Status::invalid_argument(format!("{other:?}")),
    }
}

/// A reply's messages as a stream that a client must keep reading: messages are produced at
/// most one ahead of what the connection has taken, and a client that takes none for
/// `timeout` ends the reply, which lets go of the result's blocks.
fn paced(
    messages: impl Iterator<Item = FlightData> + Send + 'static,
    timeout: Duration,
) -> Messages<FlightData> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<FlightData>(1);
    tokio::spawn(async move {
        for message in messages {
            if sender.send_timeout(message, timeout).await.is_err() {
                // The client stopped reading, or left: drop the rest.
                return;
            }
        }
    });
    Box::pin(futures::stream::unfold(
        receiver,
        |mut receiver| async move {
            let message = receiver.recv().await?;
            Some((Ok(message), receiver))
        },
    ))
}

/// Compares a secret without leaking, through timing, how much of it matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for (i, &x) in b.iter().enumerate() {
        diff |= x ^ a.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

#[tonic::async_trait]
impl FlightService for WorkerService {
    type HandshakeStream = Messages<HandshakeResponse>;
    type ListFlightsStream = Messages<FlightInfo>;
    type DoGetStream = Messages<FlightData>;
    type DoPutStream = Messages<PutResult>;
    type DoExchangeStream = Messages<FlightData>;
    type DoActionStream = Messages<arrow_flight::Result>;
    type ListActionsStream = Messages<ActionType>;

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.check_token(request.metadata())?;
        let connection = request.remote_addr();
        self.exchange(connection, request.into_inner()).await
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(unused("Handshake"))
    }

    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(unused("ListFlights"))
    }

    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(unused("GetFlightInfo"))
    }

    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(unused("PollFlightInfo"))
    }

    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(unused("GetSchema"))
    }

    async fn do_get(&self, _: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        Err(unused("DoGet"))
    }

    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(unused("DoPut"))
    }

    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        Err(unused("DoAction"))
    }

    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Err(unused("ListActions"))
    }
}

fn unused(verb: &str) -> Status {
    Status::unimplemented(format!(
        "an shm worker answers DoExchange only (calls by method name); {verb} is not served"
    ))
}
