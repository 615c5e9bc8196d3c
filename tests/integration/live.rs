//! The live feed with a real WebSocket client (tokio-tungstenite): samples ingested by
//! remote-write and OTLP reach `/ws/metrics/{agent}` within the interval, a subscription
//! narrows them by name, `/ws/agents` reports registry changes, unknown agents and other
//! tenants are closed with 4404, and a client that stops reading is dropped while ingest and
//! another client's feed go on.

use crate::support::remote_write::{encode, request, series};
use crate::support::{Backend, Secumon};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects as a browser does: the token as a subprotocol beside `secumon.v1`.
pub(crate) async fn connect(s: &Secumon, path: &str, token: &str) -> Socket {
    let mut request = s
        .url(path)
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("secumon.v1, bearer.{token}").parse().unwrap(),
    );
    let (socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "secumon.v1",
        "the token is never echoed"
    );
    socket
}

/// What the server answers a hand-written opening handshake to `/ws/metrics/host-1` (head and
/// body as text).
async fn handshake(s: &Secumon, token: &str, version: &str, key: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.server.addr).await.unwrap();
    let request = format!(
        "GET /ws/metrics/host-1 HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n\
         Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The next JSON message within `wait`, skipping pings.
pub(crate) async fn next<S>(
    socket: &mut tokio_tungstenite::WebSocketStream<S>,
    wait: Duration,
) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, socket.next())
            .await
            .expect("no message in time")
            .expect("the feed ended")
            .expect("a WebSocket error");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The next `metrics` message carrying `key`, within `wait`.
async fn reading(socket: &mut Socket, key: &str, wait: Duration) -> Value {
    let deadline = Instant::now() + wait;
    loop {
        let message = next(socket, deadline.saturating_duration_since(Instant::now())).await;
        assert_eq!(message["type"], "metrics", "{message}");
        if let Some(reading) = message["data"].get(key) {
            return reading.clone();
        }
    }
}

/// The close code the server ends a connection with.
async fn closed_with(socket: &mut Socket) -> CloseCode {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => return frame.code,
            Ok(Some(Ok(Message::Text(text)))) => assert!(!text.contains("\"metrics\""), "{text}"),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Writes one sample of each of `series_count` series `cpu_seconds_total{cpu, instance,
/// mode="idle"}`, checking the write answers within 2 s.
pub(crate) async fn write(
    s: &Secumon,
    token: &str,
    instance: &str,
    series_count: usize,
    value: f64,
) {
    let now = chrono::Utc::now().timestamp_millis();
    let body = encode(&request(
        (0..series_count)
            .map(|i| {
                let cpu = i.to_string();
                series(
                    &[
                        ("__name__", "cpu_seconds_total"),
                        ("instance", instance),
                        ("mode", "idle"),
                        ("cpu", &cpu),
                    ],
                    &[(now, value)],
                )
            })
            .collect(),
        vec![],
    ));
    let started = Instant::now();
    let response = s
        .http
        .post(s.url("/api/v1/write"))
        .bearer_auth(token)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a write took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_pushes_ingested_samples_to_its_clients() {
    let (s, catalog) = crate::auth::start(Backend::Embedded, |c| {
        c.fleet.live_interval = Duration::from_millis(200);
        c.fleet.live_queue = 2;
        c.fleet.status_interval_secs = 0;
    })
    .await;
    let mint = |tenant, scopes| crate::auth::mint(&catalog, tenant, scopes, None);
    let ingest = mint("team-a", "ingest").await;
    let reader = mint("team-a", "read").await;
    let admin = mint("team-a", "admin,read").await;
    let outsider = mint("team-b", "read").await;
    assert_eq!(
        crate::opamp::send(
            &s,
            &admin,
            reqwest::Method::POST,
            "/api/v1/agents",
            r#"{"agent_id": "host-1"}"#
        )
        .await
        .0,
        201
    );

    // No token: refused before the upgrade. An unknown agent, or another tenant's: 4404.
    let anonymous = s
        .url("/ws/metrics/host-1")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(anonymous).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
    // A plain GET is told what the endpoint wants.
    let plain = s
        .http
        .get(s.url("/ws/metrics/host-1"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 426);
    assert_eq!(plain.headers()["upgrade"], "websocket");
    assert!(plain.text().await.unwrap().contains("WebSocket"));
    // A version other than 13 is told the one spoken here; a key that is not 16 bytes in
    // base64 is refused.
    for (version, key, status, says) in [
        (
            "12",
            "dGhlIHNhbXBsZSBub25jZQ==",
            "426",
            "sec-websocket-version: 13",
        ),
        ("13", "c2hvcnQ=", "400", "16 bytes in base64"),
    ] {
        let head = handshake(&s, &reader, version, key).await.to_lowercase();
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
        assert!(head.contains(says), "{head}");
    }
    for (path, token) in [
        ("/ws/metrics/nobody", &reader),
        ("/ws/metrics/host-1", &outsider),
    ] {
        let mut socket = connect(&s, path, token).await;
        assert_eq!(
            closed_with(&mut socket).await,
            CloseCode::Library(4404),
            "{path}"
        );
    }

    let mut all = connect(&s, "/ws/metrics/host-1", &reader).await;
    let hello = next(&mut all, Duration::from_secs(5)).await;
    assert_eq!(
        (&hello["type"], &hello["agent_id"], &hello["metrics"]),
        (&json!("subscribed"), &json!("host-1"), &json!([])),
        "{hello}"
    );
    let mut narrow = connect(&s, "/ws/metrics/host-1", &reader).await;
    next(&mut narrow, Duration::from_secs(5)).await;
    narrow
        .send(Message::text(
            r#"{"type":"subscribe","metrics":["system_.*"]}"#,
        ))
        .await
        .unwrap();
    let ack = next(&mut narrow, Duration::from_secs(5)).await;
    assert_eq!(ack["metrics"], json!(["system_.*"]), "{ack}");
    narrow
        .send(Message::text(
            "{\"type\":\"subscribe\",\"metrics\":[\"(\"]}",
        ))
        .await
        .unwrap();
    let error = next(&mut narrow, Duration::from_secs(5)).await;
    assert_eq!(error["type"], "error", "{error}");

    // Both are counted in /metrics (the two closed ones no longer).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.metrics_text().await.contains("secumon_live_clients 2\n") {
        assert!(Instant::now() < deadline, "{}", s.metrics_text().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Remote-write reaches the feed within 3 s.
    let sent = Instant::now();
    write(&s, &ingest, "host-1", 1, 42.0).await;
    write(&s, &ingest, "host-2", 1, 7.0).await;
    let cpu = reading(
        &mut all,
        r#"cpu_seconds_total{cpu="0",instance="host-1",mode="idle"}"#,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(cpu["value"], 42.0, "{cpu}");
    assert!(sent.elapsed() < Duration::from_secs(3));

    // So does OTLP (service.instance.id is the instance).
    let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let otlp = json!({"resourceMetrics": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "secumon-agent"}},
        {"key": "service.instance.id", "value": {"stringValue": "host-1"}}]},
        "scopeMetrics": [{"metrics": [{"name": "system.cpu.load_average.1m", "gauge": {
            "dataPoints": [{"timeUnixNano": now_ns.to_string(), "asDouble": 0.75}]}}]}]}]});
    let response = s
        .http
        .post(s.url("/api/v1/otlp/v1/metrics"))
        .bearer_auth(&ingest)
        .header("Content-Type", "application/json")
        .body(otlp.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let key = r#"system_cpu_load_average_1m{instance="host-1",job="secumon-agent"}"#;
    assert_eq!(
        reading(&mut all, key, Duration::from_secs(3)).await["value"],
        0.75
    );
    // The narrowed client gets only what its patterns name.
    let message = next(&mut narrow, Duration::from_secs(3)).await;
    let keys: Vec<&String> = message["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, [key], "{message}");

    // Registry changes reach /ws/agents.
    let mut fleet = connect(&s, "/ws/agents", &reader).await;
    assert_eq!(
        next(&mut fleet, Duration::from_secs(5)).await["type"],
        "subscribed"
    );
    let page: Value = s
        .http
        .get(s.url("/api/v1/agents"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = page["data"]["agents"][0]["id"].as_str().unwrap().to_owned();
    let patch = s
        .http
        .patch(s.url(&format!("/api/v1/agents/{id}")))
        .bearer_auth(&admin)
        .body(r#"{"name": "web"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), 200);
    let event = next(&mut fleet, Duration::from_secs(5)).await;
    assert_eq!(
        (&event["type"], &event["agent"]["name"]),
        (&json!("updated"), &json!("web"))
    );
    let mut theirs = connect(&s, "/ws/agents", &outsider).await;
    assert_eq!(
        next(&mut theirs, Duration::from_secs(5)).await["type"],
        "subscribed"
    );
    let delete = s
        .http
        .delete(s.url(&format!("/api/v1/agents/{id}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 200);
    let event = next(&mut fleet, Duration::from_secs(5)).await;
    assert_eq!(
        (&event["type"], &event["agent"]["agent_id"]),
        (&json!("deleted"), &json!("host-1"))
    );
    let heard = tokio::time::timeout(Duration::from_millis(500), theirs.next()).await;
    assert!(heard.is_err(), "another tenant hears nothing: {heard:?}");

    // The server's stop sends every client a close (1001) before it returns.
    s.server.stop().await;
    for socket in [&mut fleet, &mut theirs, &mut all, &mut narrow] {
        let code = loop {
            // What was sent before the close may still be unread.
            match tokio::time::timeout(Duration::from_secs(1), socket.next()).await {
                Ok(Some(Ok(Message::Close(Some(frame))))) => break frame.code,
                Ok(Some(Ok(Message::Text(_) | Message::Ping(_)))) => continue,
                other => panic!("expected a close frame already sent, got {other:?}"),
            }
        };
        assert_eq!(code, CloseCode::Away);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_slows_no_one() {
    let (s, catalog) = crate::auth::start(Backend::Embedded, |c| {
        c.fleet.live_interval = Duration::from_millis(200);
        c.fleet.live_queue = 2;
        c.fleet.status_interval_secs = 0;
    })
    .await;
    let ingest = crate::auth::mint(&catalog, "team-a", "ingest", None).await;
    let reader = crate::auth::mint(&catalog, "team-a", "read", None).await;
    let admin = crate::auth::mint(&catalog, "team-a", "admin", None).await;
    assert_eq!(
        crate::opamp::send(
            &s,
            &admin,
            reqwest::Method::POST,
            "/api/v1/agents",
            r#"{"agent_id": "host-1"}"#
        )
        .await
        .0,
        201
    );

    // The stuck client: a tiny receive window, and it never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(s.server.addr).await.unwrap();
    let mut request = s
        .url("/ws/metrics/host-1")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("secumon.v1, bearer.{reader}").parse().unwrap(),
    );
    let (mut stuck, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let mut healthy = connect(&s, "/ws/metrics/host-1", &reader).await;
    next(&mut healthy, Duration::from_secs(5)).await;

    // Large messages (2,000 series each) every 100 ms for 4 s: every write answers quickly
    // (checked in `write`) and the healthy client sees each value within 3 s.
    let key = r#"cpu_seconds_total{cpu="1999",instance="host-1",mode="idle"}"#;
    for round in 0..40 {
        let sent = Instant::now();
        write(&s, &ingest, "host-1", 2000, round as f64).await;
        loop {
            let reading = reading(&mut healthy, key, Duration::from_secs(3)).await;
            if reading["value"] == round as f64 {
                break;
            }
        }
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "round {round}: {:?}",
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stuck client was dropped: what reached its buffers drains, then the stream ends.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = stuck.next().await {}
    })
    .await;
    assert!(drained.is_ok(), "the stuck client is still connected");
}
