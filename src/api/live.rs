//! The live feed over WebSocket (`read` scope): `GET /ws/metrics/{agent}` pushes an agent's
//! readings as they are ingested, `GET /ws/agents` the tenant's registry changes. What the
//! hub does is `fleet::live`'s; this is the socket side: subprotocol, subscriptions,
//! keep-alive, and closing a client that cannot keep up (it never slows anyone else).
//!
//! Messages from the server: `{"type":"subscribed",…}` once the feed is set up (and after each
//! `subscribe`), `{"type":"metrics",…}` or `{"type":<registry change>,"agent":{…}}`,
//! `{"type":"error","error":…}` for a bad client message, and `{"type":"lagged","dropped":N}`
//! just before a close with code 4429 when the client fell more than `--fleet-live-queue`
//! messages behind. A client whose socket takes no message for that many intervals (at least
//! a second) has stopped reading: it is dropped without a word, as none would reach it. Close codes: 4404 unknown agent (or another tenant's),
//! 4429 too slow, 1001 server stopping or client silent past the keep-alive.

use super::auth::Tenant;
use super::SharedState;
use crate::fleet::live::{AgentEvent, Client};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast::error::RecvError;
use tokio_tungstenite::tungstenite::protocol::{frame::CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// The subprotocol of the feed (a browser offers it beside `bearer.<token>`).
pub const PROTOCOL: &str = "secumon.v1";
/// Largest message a client may send.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Most name patterns in one subscription, and the longest.
const MAX_PATTERNS: usize = 64;
const MAX_PATTERN_BYTES: usize = 256;
/// The least time between two subscriptions of one client.
const SUBSCRIBE_EVERY: Duration = Duration::from_secs(1);
/// A ping every so often; a client silent for three is gone.
const PING_EVERY: Duration = Duration::from_secs(20);
/// Longest a close may wait for the client's socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The least time a message may wait for the client's socket; the most is `--fleet-live-queue`
/// intervals, as far behind as a client may fall.
const MIN_STALL: Duration = Duration::from_secs(1);

pub const CLOSE_UNKNOWN_AGENT: u16 = 4404;
pub const CLOSE_TOO_SLOW: u16 = 4429;
const CLOSE_GOING_AWAY: u16 = 1001;

fn busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "too many live-feed clients (--fleet-live-max-clients); retry later\n",
    )
        .into_response()
}

/// What a feed's socket reads from and writes to: the connection itself, moved to the feed's
/// runtime, or (for a connection not served by our listener) hyper's upgraded stream.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

type WebSocket = WebSocketStream<Box<dyn Stream>>;

/// A WebSocket opening handshake (RFC 6455, 4.2), checked; `accept` answers it and runs the
/// feed on the feed's own runtime.
///
/// axum's `WebSocketUpgrade` would leave the socket registered with the reactor of the HTTP
/// runtime, where every readiness event of every feed client (a pong, a send buffer that
/// drained) wakes a worker serving ingest and queries. Here the connection is taken back from
/// hyper after the 101 and registered with the feed's runtime, TLS state included.
pub(super) struct Upgrade {
    key: HeaderValue,
    /// Whether the client offered `secumon.v1`.
    protocol: bool,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Upgrade, Response> {
        let refuse = |status: StatusCode, why: &str| (status, format!("{why}\n")).into_response();
        // 426 names what to upgrade to (RFC 9110, 15.5.22), and a wrong version the one
        // spoken here (RFC 6455, 4.4).
        let upgrade_required = |why: &str| {
            let mut response = refuse(StatusCode::UPGRADE_REQUIRED, why);
            let headers = response.headers_mut();
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            response
        };
        if parts.method != Method::GET {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket is opened with GET",
            ));
        }
        if !has_token(&parts.headers, header::CONNECTION, "upgrade")
            || !has_token(&parts.headers, header::UPGRADE, "websocket")
        {
            return Err(upgrade_required(
                "this endpoint is a WebSocket: send Connection: Upgrade and Upgrade: websocket",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(upgrade_required("Sec-WebSocket-Version must be 13"));
        }
        // The key is 16 random bytes, base64-encoded (RFC 6455, 4.1).
        let key = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned();
        let valid = key.as_ref().is_some_and(|key| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .is_ok_and(|bytes| bytes.len() == 16)
        });
        let (Some(key), true) = (key, valid) else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key must be 16 bytes in base64",
            ));
        };
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(upgrade_required(
                "this connection cannot be upgraded to a WebSocket",
            ));
        };
        // Subprotocols are compared as sent: a browser checks the answer byte for byte.
        let protocol = parts
            .headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .any(|offered| offered.trim_ascii() == PROTOCOL.as_bytes());
        Ok(Upgrade {
            key,
            protocol,
            on_upgrade,
        })
    }
}

impl Upgrade {
    /// Answers 101 and, once hyper has handed the connection over, runs `feed` on it on the
    /// feed's runtime. The subprotocol is `secumon.v1` when offered; a `bearer.<token>`
    /// offered beside it is never echoed.
    fn accept<F, Fut>(self, live: &crate::fleet::live::LiveHub, feed: F) -> Response
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Upgrade {
            key,
            protocol,
            on_upgrade,
        } = self;
        live.spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => feed(open(upgraded).await).await,
                Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept);
        if protocol {
            response = response.header(header::SEC_WEBSOCKET_PROTOCOL, PROTOCOL);
        }
        response
            .body(axum::body::Body::empty())
            .expect("a valid 101 response")
    }
}

/// The WebSocket over an upgraded connection, moved to the runtime this runs on.
async fn open(upgraded: hyper::upgrade::Upgraded) -> WebSocket {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
        // Clients send little: a small read buffer (the default is 128 KiB a connection), and
        // each message written at once rather than gathered.
        .read_buffer_size(4096)
        .write_buffer_size(0);
    type Served = hyper_util::rt::TokioIo<crate::server::listener::Conn>;
    match upgraded.downcast::<Served>() {
        Ok(parts) => {
            let mut conn = parts.io.into_inner();
            if let Err(e) = conn.move_to_current_runtime() {
                // It works where it is, at the HTTP workers' cost.
                tracing::warn!(error = %e, "live feed socket stays on the HTTP runtime");
            }
            let conn: Box<dyn Stream> = Box::new(conn);
            WebSocketStream::from_partially_read(
                conn,
                parts.read_buf.to_vec(),
                Role::Server,
                Some(config),
            )
            .await
        }
        Err(upgraded) => {
            // Works, but on the HTTP runtime: every event of this socket wakes its workers.
            tracing::warn!("live feed socket of an unexpected type stays on the HTTP runtime");
            let io: Box<dyn Stream> = Box::new(hyper_util::rt::TokioIo::new(upgraded));
            WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
        }
    }
}

/// `GET /ws/metrics/{agent}` (the registry `id` or the `agent_id`).
#[utoipa::path(get, path = "/ws/metrics/{agent}", tag = "live",
    params(("agent" = String, Path, description = "The registry id or the agent_id")),
    responses(
        (status = 101, description = "A WebSocket (subprotocol secumon.v1) of the agent's readings: see docs/api.md"),
        (status = 401, description = "No valid token"),
        (status = 503, description = "Too many live-feed clients")))]
pub(super) async fn metrics(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(key): Path<String>,
    upgrade: Upgrade,
) -> Response {
    let Some(client) = state.live.join() else {
        return busy();
    };
    let agent = super::agent_metrics::find_agent(&state, &tenant, &key).await;
    let live = state.live.clone();
    upgrade.accept(&live, move |mut socket| async move {
        let agent = match agent {
            Ok(agent) => agent,
            Err(e) => {
                close(&mut socket, CLOSE_UNKNOWN_AGENT, &e.message).await;
                return;
            }
        };
        let subscription = state.live.subscribe(&tenant, &agent.agent_id);
        Feed::new(socket, &state, client)
            .metrics(subscription, &agent.agent_id)
            .await;
    })
}

/// `GET /ws/agents`: the tenant's registry changes.
#[utoipa::path(get, path = "/ws/agents", tag = "live",
    responses(
        (status = 101, description = "A WebSocket (subprotocol secumon.v1) of the tenant's registry changes"),
        (status = 401, description = "No valid token"),
        (status = 503, description = "Too many live-feed clients")))]
pub(super) async fn agents(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    upgrade: Upgrade,
) -> Response {
    let Some(client) = state.live.join() else {
        return busy();
    };
    let events = state.live.watch_agents(&tenant);
    let live = state.live.clone();
    upgrade.accept(&live, move |socket| async move {
        Feed::new(socket, &state, client).agents(events).await
    })
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    // A close reason is at most 123 bytes.
    let reason = crate::fleet::remote::truncate(reason, 123);
    let frame = Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from(reason),
    }));
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(frame)).await;
}

/// What a client said.
enum Heard {
    Nothing,
    Text(String),
    Gone,
}

/// One connected client.
struct Feed {
    socket: WebSocket,
    state: SharedState,
    _client: Client,
    last_heard: Instant,
    /// How long one message may wait for the client's socket: a client that takes longer
    /// (it stopped reading, and the buffers between are full) is dropped, with no notice, as
    /// none can reach it.
    stall: Duration,
    ping: tokio::time::Interval,
    closing: tokio::sync::watch::Receiver<bool>,
}

impl Feed {
    fn new(socket: WebSocket, state: &SharedState, client: Client) -> Feed {
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Feed {
            socket,
            state: state.clone(),
            _client: client,
            last_heard: Instant::now(),
            stall: (state.live.interval() * state.fleet.live_queue.max(1) as u32).max(MIN_STALL),
            ping,
            closing: state.live.closing(),
        }
    }

    /// Sends `text`; false when the client is gone or did not take it in time.
    async fn send(&mut self, text: impl Into<Utf8Bytes>) -> bool {
        matches!(
            tokio::time::timeout(self.stall, self.socket.send(Message::Text(text.into()))).await,
            Ok(Ok(()))
        )
    }

    async fn lagged(&mut self, dropped: u64) {
        let notice = json!({"type": "lagged", "dropped": dropped}).to_string();
        if self.send(notice).await {
            close(
                &mut self.socket,
                CLOSE_TOO_SLOW,
                &format!("client too slow: {dropped} messages dropped"),
            )
            .await;
        }
    }

    /// Handles what arrives from the client or the clock; `Gone` ends the feed.
    fn heard(
        &mut self,
        message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Heard {
        match message {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Heard::Gone,
            Some(Ok(Message::Text(text))) => {
                self.last_heard = Instant::now();
                Heard::Text(text.to_string())
            }
            // Pongs (and pings, which the library answers) keep the client alive.
            Some(Ok(_)) => {
                self.last_heard = Instant::now();
                Heard::Nothing
            }
        }
    }

    /// Sends a ping, or closes a client silent for three.
    async fn keep_alive(&mut self) -> bool {
        if self.last_heard.elapsed() > PING_EVERY * 3 {
            close(&mut self.socket, CLOSE_GOING_AWAY, "no pong").await;
            return false;
        }
        matches!(
            tokio::time::timeout(
                SEND_TIMEOUT,
                self.socket.send(Message::Ping(Default::default()))
            )
            .await,
            Ok(Ok(()))
        )
    }

    async fn metrics(mut self, mut subscription: crate::fleet::live::Subscription, agent_id: &str) {
        let interval_ms = self.state.live.interval().as_millis() as u64;
        let subscribed = |patterns: &[String]| {
            json!({"type": "subscribed", "agent_id": agent_id, "metrics": patterns,
                "interval_ms": interval_ms})
            .to_string()
        };
        if !self.send(subscribed(&[])).await {
            return;
        }
        let filter = std::sync::Mutex::new(None::<regex::Regex>);
        // Patterns are compiled at most once a second, so a client cannot keep a worker busy.
        let last_subscribe = std::sync::Mutex::new(None::<Instant>);
        self.run(
            &mut subscription.receiver,
            |snapshot| {
                // Shared bytes, not a copy per client.
                snapshot.to_json(filter.lock().expect("filter lock").as_ref())
            },
            |text| {
                let mut last = last_subscribe.lock().expect("subscribe lock");
                if last.is_some_and(|at| at.elapsed() < SUBSCRIBE_EVERY) {
                    return json!({"type": "error",
                        "error": "at most one subscribe a second; the subscription is unchanged"})
                    .to_string();
                }
                *last = Some(Instant::now());
                match parse_subscribe(text) {
                    Ok((patterns, regex)) => {
                        *filter.lock().expect("filter lock") = regex;
                        subscribed(&patterns)
                    }
                    Err(e) => json!({"type": "error", "error": e}).to_string(),
                }
            },
        )
        .await;
    }

    async fn agents(mut self, mut events: tokio::sync::broadcast::Receiver<Arc<AgentEvent>>) {
        if !self
            .send(json!({"type": "subscribed", "agents": "all"}).to_string())
            .await
        {
            return;
        }
        let fleet = self.state.fleet.clone();
        self.run(
            &mut events,
            |event| {
                let now = chrono::Utc::now().timestamp_millis();
                Some(
                    json!({
                        "type": event.kind.as_str(),
                        "agent": super::agents::describe(&event.agent, now, &fleet, false),
                    })
                    .to_string(),
                )
            },
            |_| json!({"type": "error", "error": "/ws/agents takes no messages"}).to_string(),
        )
        .await;
    }

    /// Sends what `item` makes of each message of `receiver`, answers each text from the
    /// client with what `text` makes of it, keeps the connection alive, and ends when either
    /// side goes, the client falls behind, or the server stops.
    async fn run<T: Clone, M: Into<Utf8Bytes>>(
        mut self,
        receiver: &mut tokio::sync::broadcast::Receiver<T>,
        item: impl Fn(T) -> Option<M>,
        text: impl Fn(&str) -> String,
    ) {
        enum Event<T> {
            Received(Result<T, RecvError>),
            Message(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
            Ping,
            Closing,
        }
        loop {
            let event = tokio::select! {
                received = receiver.recv() => Event::Received(received),
                message = self.socket.next() => Event::Message(message),
                _ = self.ping.tick() => Event::Ping,
                _ = self.closing.wait_for(|c| *c) => Event::Closing,
            };
            match event {
                Event::Received(Ok(value)) => {
                    if let Some(message) = item(value) {
                        if !self.send(message).await {
                            return;
                        }
                    }
                }
                Event::Received(Err(RecvError::Lagged(dropped))) => {
                    return self.lagged(dropped).await
                }
                Event::Received(Err(RecvError::Closed)) => return,
                Event::Message(message) => match self.heard(message) {
                    Heard::Gone => return,
                    Heard::Nothing => {}
                    Heard::Text(said) => {
                        let answer = text(&said);
                        if !self.send(answer).await {
                            return;
                        }
                    }
                },
                Event::Ping => {
                    if !self.keep_alive().await {
                        return;
                    }
                }
                Event::Closing => {
                    close(&mut self.socket, CLOSE_GOING_AWAY, "server stopping").await;
                    return;
                }
            }
        }
    }
}

/// `{"type":"subscribe","metrics":[<pattern>, …]}`: metric names matching any pattern (an
/// anchored regular expression, as PromQL's `=~` takes one); none means every metric.
fn parse_subscribe(text: &str) -> Result<(Vec<String>, Option<regex::Regex>), String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Subscribe {
        r#type: String,
        #[serde(default)]
        metrics: Vec<String>,
    }
    let message: Subscribe = serde_json::from_str(text)
        .map_err(|e| format!("expected {{\"type\":\"subscribe\",\"metrics\":[…]}}: {e}"))?;
    if message.r#type != "subscribe" {
        return Err(format!("unknown message type {:?}", message.r#type));
    }
    if message.metrics.len() > MAX_PATTERNS {
        return Err(format!("more than {MAX_PATTERNS} patterns"));
    }
    if let Some(long) = message.metrics.iter().find(|p| p.len() > MAX_PATTERN_BYTES) {
        return Err(format!(
            "pattern {long:?} is longer than {MAX_PATTERN_BYTES} bytes"
        ));
    }
    if message.metrics.is_empty() {
        return Ok((message.metrics, None));
    }
    let alternatives: Vec<String> = message.metrics.iter().map(|p| format!("(?:{p})")).collect();
    let regex = regex::RegexBuilder::new(&format!("^(?:{})$", alternatives.join("|")))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("bad pattern: {e}"))?;
    Ok((message.metrics, Some(regex)))
}

#[cfg(test)]
mod tests {
    use super::parse_subscribe;

    #[test]
    fn subscriptions_are_anchored_patterns_within_bounds() {
        let (_, regex) =
            parse_subscribe(r#"{"type":"subscribe","metrics":["cpu.*","load1"]}"#).unwrap();
        let regex = regex.unwrap();
        assert!(regex.is_match("cpu_seconds_total"));
        assert!(regex.is_match("load1"));
        assert!(!regex.is_match("load15"));
        assert!(!regex.is_match("node_cpu"));
        assert!(parse_subscribe(r#"{"type":"subscribe"}"#)
            .unwrap()
            .1
            .is_none());
        for bad in [
            r#"{"type":"unsubscribe","metrics":[]}"#,
            r#"{"type":"subscribe","metrics":["("]}"#,
            r#"{"type":"subscribe","metrics":"cpu"}"#,
            "not json",
        ] {
            assert!(parse_subscribe(bad).is_err(), "{bad}");
        }
        let many = format!(r#"{{"type":"subscribe","metrics":{:?}}}"#, vec!["a"; 65]);
        assert!(parse_subscribe(&many).is_err());
    }
}
