//! The listeners' own limits: how many connections each takes, how long a client may take to
//! send a request's headers and body, how long an idle keep-alive connection is kept, and for
//! gRPC the HTTP/2 stream and keep-alive settings. A client that is slow on purpose holds a
//! connection for a bounded time, and no number of them takes more than the connection limit.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits of the HTTP listeners (`[http]`): the main one and OTLP/HTTP.
#[derive(Clone, Debug, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Most connections each listener (HTTP, OTLP/HTTP, OTLP/gRPC) holds open at once; more
    /// wait in the kernel's backlog until one closes (Prometheus's `--web.max-connections`).
    #[arg(
        id = "http.max_connections",
        long = "http-max-connections",
        env = "SECUMON_HTTP_MAX_CONNECTIONS",
        default_value_t = 512
    )]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers, counted from its first byte (for
    /// OTLP/gRPC: a connection's first byte, from the accept); the connection is closed after
    /// that.
    #[arg(
        id = "http.header_timeout_secs",
        long = "http-header-timeout-secs",
        env = "SECUMON_HTTP_HEADER_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a request's whole body once its headers are in; a slower
    /// one gets 408.
    #[arg(
        id = "http.body_timeout_secs",
        long = "http-body-timeout-secs",
        env = "SECUMON_HTTP_BODY_TIMEOUT_SECS",
        default_value_t = 60
    )]
    pub body_timeout_secs: u64,
    /// Seconds a keep-alive connection may sit with no request in flight and nothing received
    /// before the server closes it.
    #[arg(
        id = "http.idle_timeout_secs",
        long = "http-idle-timeout-secs",
        env = "SECUMON_HTTP_IDLE_TIMEOUT_SECS",
        default_value_t = 60
    )]
    pub idle_timeout_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

/// HTTP/2 settings of the OTLP/gRPC listener (`[grpc]`). Its largest message is the ingest
/// limits', as for OTLP over HTTP.
#[derive(Clone, Debug, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Most concurrent requests (HTTP/2 streams) on one gRPC connection.
    #[arg(
        id = "grpc.max_concurrent_streams",
        long = "grpc-max-concurrent-streams",
        env = "SECUMON_GRPC_MAX_CONCURRENT_STREAMS",
        default_value_t = 100
    )]
    pub max_concurrent_streams: u32,
    /// Seconds between HTTP/2 pings the server sends on an idle gRPC connection.
    #[arg(
        id = "grpc.keepalive_interval_secs",
        long = "grpc-keepalive-interval-secs",
        env = "SECUMON_GRPC_KEEPALIVE_INTERVAL_SECS",
        default_value_t = 60
    )]
    pub keepalive_interval_secs: u64,
    /// Seconds the server waits for a ping's answer before it closes the connection.
    #[arg(
        id = "grpc.keepalive_timeout_secs",
        long = "grpc-keepalive-timeout-secs",
        env = "SECUMON_GRPC_KEEPALIVE_TIMEOUT_SECS",
        default_value_t = 20
    )]
    pub keepalive_timeout_secs: u64,
    /// Seconds one gRPC request may take, its body included, before it fails with
    /// `DEADLINE_EXCEEDED` (a client's shorter `grpc-timeout` wins).
    #[arg(
        id = "grpc.request_timeout_secs",
        long = "grpc-request-timeout-secs",
        env = "SECUMON_GRPC_REQUEST_TIMEOUT_SECS",
        default_value_t = 60
    )]
    pub request_timeout_secs: u64,
    /// Seconds a gRPC connection may live; then the server asks the client to reconnect
    /// (HTTP/2 GOAWAY) and closes it once its requests are done, or --grpc-request-timeout-secs
    /// later. Bounds how long any client, busy or idle, holds a connection slot. 0: no limit.
    #[arg(
        id = "grpc.max_connection_age_secs",
        long = "grpc-max-connection-age-secs",
        env = "SECUMON_GRPC_MAX_CONNECTION_AGE_SECS",
        default_value_t = 1800
    )]
    pub max_connection_age_secs: u64,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

fn now_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// What a connection's watchdog knows of it. Times are ms since the acceptor's epoch.
#[derive(Default)]
struct Activity {
    /// Requests handed to the application and not answered yet.
    in_flight: AtomicUsize,
    /// When a byte last moved either way or a response was last produced.
    last_ms: AtomicU64,
    /// When the first byte of a request whose headers are not complete arrived (0: none).
    receiving_since_ms: AtomicU64,
}

impl Activity {
    fn moved(&self, now: u64, read: bool) {
        self.last_ms.store(now, Ordering::Relaxed);
        if read
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.receiving_since_ms.load(Ordering::Relaxed) == 0
        {
            self.receiving_since_ms.store(now.max(1), Ordering::Relaxed);
        }
    }
}

/// A connection counted against its listener's limit, noting when bytes arrive.
pub struct CountedConn {
    stream: TcpStream,
    activity: Arc<Activity>,
    epoch: Instant,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for CountedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.moved(now_ms(self.epoch), true);
        }
        polled
    }
}

impl AsyncWrite for CountedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.moved(now_ms(self.epoch), false);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.moved(now_ms(self.epoch), false);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl CountedConn {
    /// Registers the socket with the reactor of the runtime this is called on, leaving the one
    /// it was accepted on, so that its readiness events wake that runtime's threads alone (the
    /// live feed's WebSockets, which would otherwise wake an HTTP worker for every pong and
    /// every full send buffer). On an error the socket stays where it was.
    fn move_to_current_runtime(&mut self) -> std::io::Result<()> {
        // A second descriptor of the same socket, registered here; dropping the first
        // deregisters it from the old reactor and closes it, the socket stays open.
        let fd = std::os::fd::AsFd::as_fd(&self.stream).try_clone_to_owned()?;
        let moved = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        self.stream = moved;
        Ok(())
    }
}

impl tonic::transport::server::Connected for CountedConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// A served connection: plain, or TLS over a counted connection (so the limits and timeouts
/// see the TCP bytes, handshake included), with any bytes read ahead to check them (the
/// HTTP/2 preface) given back first.
pub struct Conn {
    io: Io,
    unread: Vec<u8>,
    unread_at: usize,
}

enum Io {
    Plain(CountedConn),
    Tls(Box<tokio_rustls::server::TlsStream<CountedConn>>),
}

/// What every HTTP/2 client sends first (RFC 9113, 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Conn {
    /// Completes the TLS handshake by `deadline` when `tls` is given.
    async fn open(
        conn: CountedConn,
        tls: Option<&tokio_rustls::TlsAcceptor>,
        deadline: tokio::time::Instant,
    ) -> Option<Conn> {
        let io = match tls {
            None => Io::Plain(conn),
            Some(tls) => match tokio::time::timeout_at(deadline, tls.accept(conn)).await {
                Ok(Ok(stream)) => Io::Tls(Box::new(stream)),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return None;
                }
                Err(_) => return None,
            },
        };
        Some(Conn {
            io,
            unread: Vec::new(),
            unread_at: 0,
        })
    }

    /// Moves the connection (TLS state and all) to the reactor of the runtime this is called
    /// on: see `CountedConn::move_to_current_runtime`. It keeps its connection slot.
    pub fn move_to_current_runtime(&mut self) -> std::io::Result<()> {
        match &mut self.io {
            Io::Plain(c) => c.move_to_current_runtime(),
            Io::Tls(c) => c.get_mut().0.move_to_current_runtime(),
        }
    }

    /// Reads the HTTP/2 client preface by `deadline` (hyper waits for it without a limit),
    /// keeping it to be read again; whether it came, and right.
    async fn expect_http2_preface(&mut self, deadline: tokio::time::Instant) -> bool {
        use tokio::io::AsyncReadExt;
        let mut preface = [0u8; 24];
        let read = tokio::time::timeout_at(deadline, self.read_exact(&mut preface)).await;
        if !matches!(read, Ok(Ok(_))) || &preface != HTTP2_PREFACE {
            return false;
        }
        self.unread = preface.to_vec();
        self.unread_at = 0;
        true
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.unread_at < this.unread.len() {
            let n = (this.unread.len() - this.unread_at).min(buf.remaining());
            buf.put_slice(&this.unread[this.unread_at..this.unread_at + n]);
            this.unread_at += n;
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(c) => Pin::new(c).poll_read(cx, buf),
            Io::Tls(c) => Pin::new(c.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(c) => Pin::new(c).poll_write(cx, buf),
            Io::Tls(c) => Pin::new(c.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(c) => Pin::new(c).poll_flush(cx),
            Io::Tls(c) => Pin::new(c.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(c) => Pin::new(c).poll_shutdown(cx),
            Io::Tls(c) => Pin::new(c.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            Io::Tls(c) => Pin::new(c.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(c) => c.is_write_vectored(),
            Io::Tls(c) => c.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match &self.io {
            Io::Plain(c) => c.connect_info(),
            Io::Tls(c) => c.get_ref().0.connect_info(),
        }
    }
}

/// Accepts connections while fewer than `limit` are open: past it, the next accept waits for
/// one to close (as Go's `netutil.LimitListener`, which Prometheus uses).
pub struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    epoch: Instant,
}

impl Acceptor {
    pub fn new(listener: TcpListener, limit: usize) -> Acceptor {
        Acceptor {
            listener,
            permits: Arc::new(Semaphore::new(limit.max(1))),
            epoch: Instant::now(),
        }
    }

    pub async fn accept(&self) -> std::io::Result<(CountedConn, SocketAddr)> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let activity = Arc::new(Activity::default());
                    activity
                        .last_ms
                        .store(now_ms(self.epoch), Ordering::Relaxed);
                    return Ok((
                        CountedConn {
                            stream,
                            activity,
                            epoch: self.epoch,
                            _permit: permit,
                        },
                        peer,
                    ));
                }
                // Out of descriptors or a connection reset before accept: wait and go on,
                // as hyper and Go's http.Server do.
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A stream of accepted connections for tonic, each handed over only once its first byte
    /// has arrived within `first_byte`: HTTP/2 has no header timeout of its own, so a client
    /// that connects and says nothing would otherwise hold its connection slot for good (one
    /// that talks and then goes quiet is closed by the keep-alive pings). Connections wait for
    /// their first byte side by side; accepting stops when tonic drops the stream.
    pub fn into_stream(
        self,
        first_byte: Duration,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> impl futures::Stream<Item = std::io::Result<Conn>> + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = self.accept() => accepted,
                    _ = tx.closed() => return,
                };
                match accepted {
                    Ok((conn, _)) => {
                        let tx = tx.clone();
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            // The first byte, the TLS handshake and the HTTP/2 preface all
                            // within `first_byte` of the accept.
                            let deadline = tokio::time::Instant::now() + first_byte;
                            let mut byte = [0u8; 1];
                            let peeked =
                                tokio::time::timeout_at(deadline, conn.stream.peek(&mut byte))
                                    .await;
                            if !matches!(peeked, Ok(Ok(n)) if n > 0) {
                                return;
                            }
                            let Some(mut conn) = Conn::open(conn, tls.as_ref(), deadline).await
                            else {
                                return;
                            };
                            if conn.expect_http2_preface(deadline).await {
                                let _ = tx.send(Ok(conn)).await;
                            }
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Serves `app` on `acceptor` over HTTP/1.1 until `stopped`, then lets every connection finish
/// its requests (bounded by the timeouts) before returning.
pub async fn serve_http(
    acceptor: Acceptor,
    app: axum::Router,
    config: HttpConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let header_ms = config.header_timeout_secs.max(1) * 1000;
    let idle_ms = config.idle_timeout_secs.max(1) * 1000;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (conn, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::error!(error = %e, "cannot accept connections");
                break;
            }
        };
        // Reap finished connection tasks as we go.
        while connections.try_join_next().is_some() {}
        let activity = conn.activity.clone();
        let epoch = conn.epoch;
        let service = {
            let activity = activity.clone();
            let app = app.clone();
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let activity = activity.clone();
                let mut app = app.clone();
                async move {
                    activity.in_flight.fetch_add(1, Ordering::Relaxed);
                    activity.receiving_since_ms.store(0, Ordering::Relaxed);
                    let mut request = request.map(axum::body::Body::new);
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    let response = tower_service::Service::call(&mut app, request).await;
                    activity.in_flight.fetch_sub(1, Ordering::Relaxed);
                    activity.moved(now_ms(epoch), false);
                    response
                }
            })
        };
        let stop = stop.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            // The handshake counts against the header timeout.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(header_ms);
            let Some(conn) = Conn::open(conn, tls.as_ref(), deadline).await else {
                return;
            };
            watch_connection(
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(conn), service)
                    // The live feed's WebSockets: the upgraded stream leaves this task.
                    .with_upgrades(),
                activity,
                epoch,
                Timeouts { header_ms, idle_ms },
                stop,
            )
            .await
        });
    }
    while connections.join_next().await.is_some() {}
}

/// How request bodies are read.
#[derive(Clone)]
pub struct BodyLimits {
    /// Time to read a body once the headers are in.
    pub timeout: Duration,
    /// The largest body.
    pub max_bytes: usize,
    /// Body bytes held at once across every connection, one permit a byte; at least
    /// `max_bytes` permits.
    pub budget: Arc<Semaphore>,
}

#[derive(Clone, Copy)]
struct Timeouts {
    header_ms: u64,
    idle_ms: u64,
}

/// How often a connection's timeouts are checked.
const WATCHDOG_TICK: Duration = Duration::from_millis(250);

/// Drives one connection. Drops it when a request's headers take longer than the header
/// timeout; closes it when it has been idle (no request in flight, no byte either way) for the
/// idle timeout, or when the server stops. Closing asks hyper to finish the request in
/// progress; a connection still open one header timeout later (a client that does not read
/// its response, say) is dropped.
async fn watch_connection<S>(
    connection: hyper::server::conn::http1::UpgradeableConnection<TokioIo<Conn>, S>,
    activity: Arc<Activity>,
    epoch: Instant,
    timeouts: Timeouts,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = axum::body::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(connection);
    let mut watchdog = tokio::time::interval(WATCHDOG_TICK);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drop_at: Option<u64> = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = stop.wait_for(|stop| *stop), if drop_at.is_none() => {
                connection.as_mut().graceful_shutdown();
                drop_at = Some(now_ms(epoch) + timeouts.header_ms);
            }
            _ = watchdog.tick() => {
                let now = now_ms(epoch);
                if let Some(at) = drop_at {
                    if now >= at {
                        return;
                    }
                    continue;
                }
                if activity.in_flight.load(Ordering::Relaxed) > 0 {
                    continue;
                }
                let receiving = activity.receiving_since_ms.load(Ordering::Relaxed);
                let late_headers = receiving != 0 && now.saturating_sub(receiving) >= timeouts.header_ms;
                let quiet = now.saturating_sub(activity.last_ms.load(Ordering::Relaxed));
                if late_headers {
                    // No request to finish: the client is too slow to send one.
                    return;
                }
                if receiving == 0 && quiet >= timeouts.idle_ms {
                    connection.as_mut().graceful_shutdown();
                    drop_at = Some(now + timeouts.header_ms);
                }
            }
        }
    }
}

/// Reads the whole request body, at most `max_bytes` of it (413 past that), within `timeout`
/// counted once the headers are in (408 past that), so a client that trickles its body holds
/// its connection for a bounded time. Each chunk is charged to the shared body budget before
/// it is kept, and the charge is held until the response is made: past the budget, reading
/// waits (the client's TCP window fills) instead of memory growing. Every endpoint reads
/// whole bodies anyway; handlers then get them at once.
pub async fn read_body_within(
    axum::extract::State(limits): axum::extract::State<BodyLimits>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let timeout = limits.timeout;
    let mut held = None;
    let read = read_charged(body, &limits, &mut held);
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(bytes)) => {
            let body = axum::body::Body::from(bytes);
            let response = next.run(Request::from_parts(parts, body)).await;
            drop(held);
            response
        }
        Ok(Err(e)) if is_length_limit(e.as_ref()) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body over {} bytes (--ingest-max-request-bytes)",
                limits.max_bytes
            ),
        )
            .into_response(),
        Ok(Err(_)) => (StatusCode::BAD_REQUEST, "cannot read the request body").into_response(),
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} s (--http-body-timeout-secs)",
                timeout.as_secs()
            ),
        )
            .into_response(),
    }
}

/// Reads `body` whole into one buffer (however small its chunks), charging each chunk to the
/// budget; the charge accumulates in `held`.
async fn read_charged(
    body: axum::body::Body,
    limits: &BodyLimits,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>> {
    let mut body = http_body_util::Limited::new(body, limits.max_bytes);
    let mut whole = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        // The length limit has refused anything past max_bytes, which the budget covers.
        let permits = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let permit = limits
            .budget
            .clone()
            .acquire_many_owned(permits)
            .await
            .expect("the budget is never closed");
        match held {
            Some(held) => held.merge(permit),
            None => *held = Some(permit),
        }
        whole.extend_from_slice(&data);
    }
    Ok(whole.freeze())
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// A request body whose data frames are each charged to the shared body budget before they
/// are handed on (for OTLP/gRPC, whose bodies tonic reads): past the budget, the frame waits,
/// and so does the client. The charge is given back when the body is dropped.
pub struct BudgetedBody<B> {
    inner: B,
    budget: tokio_util::sync::PollSemaphore,
    pending: Option<http_body::Frame<bytes::Bytes>>,
    held: Option<OwnedSemaphorePermit>,
}

impl<B> BudgetedBody<B> {
    pub fn new(inner: B, budget: Arc<Semaphore>) -> Self {
        BudgetedBody {
            inner,
            budget: tokio_util::sync::PollSemaphore::new(budget),
            pending: None,
            held: None,
        }
    }
}

impl<B> http_body::Body for BudgetedBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        loop {
            if let Some(frame) = self.pending.take() {
                let len = frame.data_ref().map_or(0, |d| d.len());
                if len > 0 {
                    let permits = u32::try_from(len).unwrap_or(u32::MAX);
                    match self.budget.poll_acquire_many(cx, permits) {
                        Poll::Pending => {
                            self.pending = Some(frame);
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(permit)) => match &mut self.held {
                            Some(held) => held.merge(permit),
                            None => self.held = Some(permit),
                        },
                        // Never closed; should it be, the frame passes uncharged.
                        Poll::Ready(None) => {}
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => self.pending = Some(frame),
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
