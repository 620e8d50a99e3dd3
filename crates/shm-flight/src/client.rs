//! The caller's side: a remote worker, called like a local one.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use arrow_flight::FlightData;
use arrow_flight::flight_service_client::FlightServiceClient;
use shm_codec::{Encoder, Payload, Unwritten};
use shm_core::ShmPool;
use shm_transport::{Callee, DecodeReply, Lifecycle, TransportError};

use crate::budget::Reservation;
use crate::error::{FlightError, NetworkFault};
use tonic::transport::{Channel, Endpoint};

use crate::side::{self, DATA_CONNECTION_MIN_BYTES, Kind, Outbound};
use crate::wire::{
    self, CallHead, Connections, Counter, MESSAGE_SLACK, Outcome, Refusal, ReplyHead, WIRE_VERSION,
    WireError,
};
use crate::{Limits, STREAM_WINDOW};

/// How long a remote worker whose connection failed counts as down for a [`WorkerPool`]
/// (which then prefers other workers); its next call reconnects either way.
///
/// [`WorkerPool`]: shm_transport::WorkerPool
pub const DOWN_FOR: Duration = Duration::from_secs(1);

/// How to reach a remote worker: the server's address, and defaults for everything else
/// that the `with_*` methods change.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RemoteConfig {
    pub(crate) addr: String,
    pub(crate) token: Option<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) limits: Limits,
    pub(crate) pool: Option<ShmPool>,
    pub(crate) data_connections: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<ClientTls>,
}

/// How a client checks a server's certificate.
#[cfg(feature = "tls")]
#[derive(Clone, Debug)]
pub(crate) struct ClientTls {
    pub(crate) ca_pem: Vec<u8>,
    pub(crate) domain: Option<String>,
}

impl RemoteConfig {
    /// A configuration for the server at `addr`: `http://host:port`, or `https://host:port`
    /// with TLS.
    pub fn new(addr: impl Into<String>) -> Self {
        RemoteConfig {
            addr: addr.into(),
            token: None,
            connect_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            pool: None,
            data_connections: true,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Sets whether payloads of at least
    /// [`DATA_CONNECTION_MIN_BYTES`](crate::DATA_CONNECTION_MIN_BYTES) go, both ways, over
    /// data connections: plain TCP connections to the server's port beside the gRPC call
    /// (docs/format.md, "Data connections"). Default `true` for `http://` addresses; `https://`
    /// never uses them. Turn it off when a gRPC proxy stands between client and server.
    pub fn with_data_connections(mut self, on: bool) -> Self {
        self.data_connections = on;
        self
    }

    /// Sends `token` with every call (`authorization: Bearer <token>`).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets how long connecting may take. Default 5 s.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the largest result accepted and how Arrow frames are sent (see [`Limits`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Receives results into `pool` (share one with a `WorkerPool` of mixed workers).
    /// Default: a new pool.
    pub fn with_pool(mut self, pool: ShmPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Speaks TLS, trusting the certificate authority `ca_pem` (PEM) for the server's
    /// certificate, which must carry `domain` (`None`: the address's host name). The
    /// system's roots are not consulted.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, ca_pem: impl Into<Vec<u8>>, domain: Option<String>) -> Self {
        self.tls = Some(ClientTls {
            ca_pem: ca_pem.into(),
            domain,
        });
        self
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How long connecting may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// What the client accepts and how it sends frames.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The pool results are received into, if one was set.
    pub fn pool(&self) -> Option<&ShmPool> {
        self.pool.as_ref()
    }

    /// Where data connections go (`host:port`), when the client uses them: for an `http://`
    /// address with data connections on.
    pub(crate) fn data_addr(&self) -> Option<String> {
        if !self.data_connections {
            return None;
        }
        let uri: tonic::codegen::http::Uri = self.addr.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let host = uri.host()?;
        let port = uri.port_u16().unwrap_or(80);
        Some(match host.contains(':') && !host.starts_with('[') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        })
    }
}

/// The runtime every remote worker of this process drives its connections on: two threads,
/// started on first use. Calls block their own thread, as local calls do.
fn runtime() -> Result<&'static tokio::runtime::Runtime, TransportError> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("shm-flight-client")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|reason| TransportError::Spawn {
            program: "the network runtime (shm-flight-client threads)".into(),
            source: std::io::Error::other(reason.clone()),
        })
}

#[derive(Debug, Default)]
struct State {
    /// The connection; `None` before the first call and after one failed.
    client: Option<FlightServiceClient<Channel>>,
    /// The server instance of the last reply.
    instance: Option<u64>,
    /// When the last connection failure happened.
    down_since: Option<Instant>,
    /// Whether the server said it takes data connections (in its last reply).
    server_takes_connection: bool,
}

/// A worker on another host, reached over Arrow Flight. Calls may come from many threads at
/// once; each is its own `DoExchange` stream over one HTTP/2 connection. After a connection
/// failure, the next call connects again.
#[derive(Debug)]
pub struct RemoteWorker {
    config: RemoteConfig,
    /// Where data connections go, if this worker uses them.
    data_addr: Option<String>,
    pool: ShmPool,
    encoder: Encoder,
    state: Mutex<State>,
    cancel: tokio::sync::Notify,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A call's byte counts, for the numbers in its errors.
struct Progress {
    method: String,
    sent: Arc<Counter>,
    to_send: u64,
    received: Counter,
}

impl RemoteWorker {
    /// A remote worker at `config.addr`. Nothing is connected yet: the first call connects
    /// (call [`connect`](Self::connect) to find out now whether the server is there).
    pub fn new(config: RemoteConfig) -> Result<Self, TransportError> {
        let pool = match &config.pool {
            Some(pool) => pool.clone(),
            None => ShmPool::new()?,
        };
        Ok(RemoteWorker {
            data_addr: config.data_addr(),
            encoder: Encoder::new(pool.clone()),
            pool,
            config,
            state: Mutex::new(State::default()),
            cancel: tokio::sync::Notify::new(),
        })
    }

    /// Connects now, if not connected yet.
    pub fn connect(&self) -> Result<(), TransportError> {
        let runtime = runtime()?;
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(FlightError::BlockingInAsync {
                what: "RemoteWorker::connect",
            }
            .into());
        }
        runtime.block_on(self.client()).map(drop)
    }

    /// The server's address, as configured.
    pub fn addr(&self) -> &str {
        &self.config.addr
    }

    /// The pool results are received into, and arguments best encoded into.
    pub fn shm_pool(&self) -> &ShmPool {
        &self.pool
    }

    /// The instance of the server that answered last (it changes when the server restarts).
    pub fn server_instance(&self) -> Option<u64> {
        lock(&self.state).instance
    }

    fn fault(&self, fault: NetworkFault) -> TransportError {
        FlightError::Network {
            addr: self.config.addr.clone(),
            fault,
        }
        .into()
    }

    /// Forgets the connection after it failed: the next call connects again.
    fn disconnect(&self) {
        let mut state = lock(&self.state);
        state.client = None;
        state.down_since = Some(Instant::now());
    }

    async fn client(&self) -> Result<FlightServiceClient<Channel>, TransportError> {
        if let Some(client) = lock(&self.state).client.clone() {
            return Ok(client);
        }
        let refused = |reason: String| {
            lock(&self.state).down_since = Some(Instant::now());
            self.fault(NetworkFault::Refused { reason })
        };
        let endpoint = Endpoint::from_shared(self.config.addr.clone())
            .map_err(|e| refused(format!("not an address: {e}")))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(2 * STREAM_WINDOW);
        #[cfg(feature = "tls")]
        let endpoint = match &self.config.tls {
            Some(tls) => {
                let mut config = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
                if let Some(domain) = &tls.domain {
                    config = config.domain_name(domain.clone());
                }
                endpoint
                    .tls_config(config)
                    .map_err(|e| refused(format!("TLS configuration: {}", chain(&e))))?
            }
            None => endpoint,
        };
        let channel = endpoint.connect().await.map_err(|e| refused(chain(&e)))?;
        let max_message = self.config.limits.max_message().max(wire::CHUNK) + MESSAGE_SLACK;
        let client = FlightServiceClient::new(channel)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(usize::MAX);
        let mut state = lock(&self.state);
        state.client = Some(client.clone());
        state.down_since = None;
        Ok(client)
    }

    async fn exchange(
        &self,
        head: CallHead,
        data: Box<dyn Iterator<Item = FlightData> + Send>,
        connection: Option<Outbound<'_>>,
        progress: &Progress,
    ) -> Result<Payload, TransportError> {
        // The arguments' data connection, written while the head goes over gRPC. It is a
        // future of this call, not a task of its own: its sources may borrow the caller's
        // value, and whatever ends the call (the reply, an error, a timeout, a cancel) drops
        // it before the call returns.
        let push = match (connection, &self.data_addr) {
            (Some(outbound), Some(addr)) => Some(async move {
                let mut stream = side::connect(addr, outbound.key, Kind::Push).await?;
                side::write_blocks(&mut stream, &outbound.sources, &progress.sent, None).await
            }),
            _ => None,
        };
        let exchanged = self.exchange_heads(head, data, progress);
        match push {
            None => exchanged.await,
            Some(pushing) => {
                tokio::pin!(exchanged, pushing);
                // A server that answers without reading everything (it refused the call) gets
                // no more of it: the push is dropped with this future.
                tokio::select! {
                    outcome = &mut exchanged => outcome,
                    pushed = &mut pushing => match pushed {
                        Ok(()) => exchanged.await,
                        Err(err) => Err(self.wire_fault(err, progress)),
                    },
                }
            }
        }
    }

    /// The call's gRPC stream: its head and chunks up, the reply back.
    async fn exchange_heads(
        &self,
        head: CallHead,
        data: Box<dyn Iterator<Item = FlightData> + Send>,
        progress: &Progress,
    ) -> Result<Payload, TransportError> {
        let mut client = self.client().await?;
        let method = &progress.method;
        let expected = head.instance;
        let mut first = wire::head_message(&head);
        first.flight_descriptor = Some(arrow_flight::FlightDescriptor::new_cmd(method.clone()));
        // The head carries the codec metadata and inline data: they count as sent with it.
        let inline = (head.args.meta.len() + head.args.inline.len()) as u64;
        let sent = Arc::clone(&progress.sent);
        let head_message = std::iter::once_with(move || {
            sent.add(inline as usize);
            first
        });
        let messages = futures::stream::iter(head_message.chain(data));
        let mut request = tonic::Request::new(messages);
        if let Some(token) = &self.config.token {
            let value = format!("Bearer {token}").parse().map_err(|_| {
                self.fault(NetworkFault::Unauthenticated {
                    reason: "the token is not a valid header value (printable ASCII only)".into(),
                })
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        let response = client
            .do_exchange(request)
            .await
            .map_err(|status| self.status_fault(status, progress))?;
        let mut stream = response.into_inner();
        let first = stream
            .message()
            .await
            .map_err(|status| self.status_fault(status, progress))?
            .ok_or_else(|| {
                self.fault(NetworkFault::Protocol {
                    what: format!("the reply to {method} ended before its head"),
                })
            })?;
        let reply: ReplyHead = wire::read_head(&first, "reply")
            .map_err(|what| self.fault(NetworkFault::Protocol { what }))?;
        if reply.wire != WIRE_VERSION {
            return Err(self.fault(NetworkFault::Protocol {
                what: format!(
                    "the server speaks wire version {}, this client {WIRE_VERSION}",
                    reply.wire
                ),
            }));
        }
        {
            let mut state = lock(&self.state);
            state.instance = Some(reply.instance);
            state.server_takes_connection = reply.takes_connection;
        }
        let head = match reply.outcome {
            Outcome::Done(head) => head,
            Outcome::Failed(remote) => return Err(TransportError::from_remote(remote)),
            Outcome::Refused(Refusal::Restarted) => {
                return Err(self.fault(NetworkFault::Restarted {
                    method: method.clone(),
                    was: expected.unwrap_or_default(),
                    now: reply.instance,
                }));
            }
            Outcome::Refused(Refusal::TooLarge { size, limit }) => {
                return Err(self.fault(NetworkFault::TooLarge {
                    what: format!("the arguments of {method}"),
                    size,
                    limit,
                }));
            }
            Outcome::Refused(Refusal::Protocol { what }) => {
                return Err(self.fault(NetworkFault::Protocol { what }));
            }
        };
        let unlimited = Reservation::unlimited();
        let bounds = wire::Bounds {
            limit: self.config.limits.max_payload(),
            reservation: &unlimited,
            // The call's own timeout bounds the wait.
            gap: None,
        };
        let connections = match &self.data_addr {
            Some(addr) => Connections::Opened(addr),
            None => Connections::Refused,
        };
        wire::receive(
            &mut stream,
            head,
            &self.encoder,
            &bounds,
            &progress.received,
            connections,
        )
        .await
        .map_err(|err| self.wire_fault(err, progress))
    }

    /// The error for a payload that could not be sent or received.
    fn wire_fault(&self, err: WireError, progress: &Progress) -> TransportError {
        match err {
            WireError::Stream(status) => self.status_fault(status, progress),
            WireError::TooLarge { size, limit } => self.fault(NetworkFault::TooLarge {
                what: format!("the result of {}", progress.method),
                size,
                limit,
            }),
            WireError::Protocol(what) | WireError::Busy(what) => {
                self.fault(NetworkFault::Protocol { what })
            }
            WireError::Stalled { what, after } => self.fault(NetworkFault::Protocol {
                what: format!("{what} did not come within {after:?}"),
            }),
            WireError::Codec(err) => TransportError::Codec(err),
        }
    }

    /// The error for a failed gRPC status: a lost connection (forgotten, so that the next
    /// call reconnects), a refused token, or what the server said.
    fn status_fault(&self, status: tonic::Status, progress: &Progress) -> TransportError {
        use tonic::Code;
        let reason = status_reason(&status);
        match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => {
                self.fault(NetworkFault::Unauthenticated { reason })
            }
            Code::ResourceExhausted => self.fault(NetworkFault::Busy { reason }),
            Code::OutOfRange => self.fault(NetworkFault::Protocol { what: reason }),
            Code::Unimplemented => self.fault(NetworkFault::Protocol {
                what: format!("the server does not serve shm calls: {reason}"),
            }),
            // A draining server refused the call: it did not run.
            Code::Unavailable if status.message() == crate::server::DRAINING => {
                self.disconnect();
                self.fault(NetworkFault::Refused { reason })
            }
            // The connection could not be made again (the server is gone): nothing was sent.
            Code::Unavailable if is_connect_failure(&reason) => {
                self.disconnect();
                self.fault(NetworkFault::Refused { reason })
            }
            _ => {
                self.disconnect();
                self.fault(NetworkFault::Lost {
                    method: progress.method.clone(),
                    sent: progress.sent.get(),
                    to_send: progress.to_send,
                    received: progress.received.get(),
                    reason,
                })
            }
        }
    }
}

/// A status's message with its source chain (the transport's own error is in the source).
fn status_reason(status: &tonic::Status) -> String {
    let mut reason = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        reason.push_str(": ");
        reason.push_str(&err.to_string());
        source = err.source();
    }
    reason
}

/// Whether a transport error is a failure to (re)connect rather than a broken connection.
fn is_connect_failure(reason: &str) -> bool {
    [
        "tcp connect error",
        "Connection refused",
        "No route to host",
    ]
    .iter()
    .any(|needle| reason.contains(needle))
}

/// An error with its source chain.
fn chain(err: &dyn std::error::Error) -> String {
    let mut reason = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        reason.push_str(": ");
        reason.push_str(&err.to_string());
        source = err.source();
    }
    reason
}

impl Callee for RemoteWorker {
    fn call_with(
        &self,
        method: &str,
        args: Payload,
        timeout: Option<Duration>,
        decode: &mut DecodeReply<'_>,
    ) -> Result<(), TransportError> {
        if !args.is_backed() {
            return Err(TransportError::UnbackedPayload {
                method: method.to_owned(),
                named: args.buffers().len(),
                held: args.blocks().len(),
            });
        }
        let sent = Arc::new(Counter::default());
        let outgoing = wire::outgoing(
            args,
            &self.pool,
            self.config.limits.whole_batch_bytes(),
            Arc::clone(&sent),
            self.by_connection(),
        )
        .map_err(|err| match err {
            WireError::Codec(err) => TransportError::Codec(err),
            other => TransportError::Malformed {
                what: format!("cannot send the arguments of {method}: {other:?}"),
            },
        })?;
        self.call_outgoing(method, outgoing, sent, timeout, decode)
    }

    fn takes_unwritten(&self) -> bool {
        true
    }

    /// Arguments whose blocks are still to be written go onto the data connection from where
    /// they lie, skipping the copy into shared memory; below the data connection's threshold,
    /// or when the server takes none, they are written into blocks as for `call_with`.
    fn call_unwritten(
        &self,
        method: &str,
        args: Unwritten<'_>,
        timeout: Option<Duration>,
        decode: &mut DecodeReply<'_>,
    ) -> Result<(), TransportError> {
        if !self.by_connection() || args.block_bytes() < DATA_CONNECTION_MIN_BYTES {
            let args = args.write(&self.encoder)?;
            return self.call_with(method, args, timeout, decode);
        }
        let outgoing = wire::outgoing_unwritten(args);
        self.call_outgoing(
            method,
            outgoing,
            Arc::new(Counter::default()),
            timeout,
            decode,
        )
    }

    fn shm_pool(&self) -> &ShmPool {
        &self.pool
    }

    fn describe(&self) -> String {
        format!("remote {}", self.config.addr)
    }
}

impl RemoteWorker {
    /// Whether arguments of a data connection's size go over one.
    fn by_connection(&self) -> bool {
        self.data_addr.is_some() && lock(&self.state).server_takes_connection
    }

    /// Sends a call's head and arguments, waits for the reply and hands it to `decode`.
    /// `sent` counts the argument bytes sent so far (for the errors' numbers).
    fn call_outgoing(
        &self,
        method: &str,
        outgoing: wire::Outgoing<'_>,
        sent: Arc<Counter>,
        timeout: Option<Duration>,
        decode: &mut DecodeReply<'_>,
    ) -> Result<(), TransportError> {
        let runtime = runtime()?;
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(FlightError::BlockingInAsync {
                what: "RemoteWorker::call",
            }
            .into());
        }
        let progress = Progress {
            method: method.to_owned(),
            sent,
            to_send: outgoing.head.size(),
            received: Counter::default(),
        };
        let head = CallHead {
            wire: WIRE_VERSION,
            method: method.to_owned(),
            instance: lock(&self.state).instance,
            args: outgoing.head,
            takes_connection: self.data_addr.is_some(),
        };
        let cancelled = self.cancel.notified();
        let payload = runtime.block_on(async {
            let call = self.exchange(head, outgoing.data, outgoing.connection, &progress);
            tokio::select! {
                outcome = async {
                    match timeout {
                        Some(timeout) => tokio::time::timeout(timeout, call)
                            .await
                            .unwrap_or_else(|_| Err(self.fault(NetworkFault::Timeout {
                                method: method.to_owned(),
                                timeout,
                                sent: progress.sent.get(),
                                to_send: progress.to_send,
                                received: progress.received.get(),
                            }))),
                        None => call.await,
                    }
                } => outcome,
                () = cancelled => Err(self.fault(NetworkFault::Lost {
                    method: method.to_owned(),
                    sent: progress.sent.get(),
                    to_send: progress.to_send,
                    received: progress.received.get(),
                    reason: "cancelled by this process".into(),
                })),
            }
        })?;
        decode(&payload, &wire::own_decoder(&self.pool, payload.blocks()))
    }
}

impl Lifecycle for RemoteWorker {
    fn is_alive(&self) -> bool {
        lock(&self.state)
            .down_since
            .is_none_or(|since| since.elapsed() >= DOWN_FOR)
    }

    fn restart(&self) -> Result<(), TransportError> {
        let mut state = lock(&self.state);
        state.client = None;
        state.down_since = None;
        Ok(())
    }

    fn cancel(&self) {
        self.cancel.notify_waiters();
        lock(&self.state).client = None;
    }

    fn shutdown(self: Box<Self>) {
        Lifecycle::cancel(&*self);
    }

    fn pid(&self) -> Option<u32> {
        None
    }
}
