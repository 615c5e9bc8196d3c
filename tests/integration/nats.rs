//! Several server nodes: two `secumon serve` on one PostgreSQL database and a real
//! `nats-server` (`--nats-url`). A client of node B sees samples ingested on node A, and
//! registry changes made on node A.

use crate::support::process::{free_port, wait_for_port, Managed};
use crate::support::{find_binary, Backend, Secumon};
use futures::StreamExt;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn start_nats() -> (Managed, u16) {
    let binary = find_binary("nats-server", "sudo apt-get install nats-server");
    let port = free_port();
    let mut command = std::process::Command::new(binary);
    command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    let process = Managed::spawn("nats-server", command, None);
    wait_for_port(port, Duration::from_secs(20), "nats-server");
    (process, port)
}

async fn connect(s: &Secumon, path: &str, token: &str) -> crate::live::Socket {
    let mut request = s
        .url(path)
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// The next text message as JSON, within `wait`; `None` when none came.
async fn next(socket: &mut crate::live::Socket, wait: Duration) -> Option<Value> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_one_node_sees_what_another_node_ingests() {
    let (_nats, port) = start_nats();
    let url = format!("nats://127.0.0.1:{port}");
    let configure = |c: &mut secumon::config::Config| {
        c.fleet.nats_url = url.clone();
        c.fleet.live_interval = Duration::from_millis(200);
        c.fleet.status_interval_secs = 0;
    };
    let (a, catalog) = crate::auth::start(Backend::Postgres, configure).await;
    let shared = a.storage.clone();
    let (b, _) = crate::auth::start(Backend::Postgres, |c| {
        configure(c);
        c.storage = shared;
    })
    .await;
    let ingest = crate::auth::mint(&catalog, "team-a", "ingest", None).await;
    let admin = crate::auth::mint(&catalog, "team-a", "admin,read", None).await;
    let (status, created) = crate::opamp::send(
        &a,
        &admin,
        reqwest::Method::POST,
        "/api/v1/agents",
        r#"{"agent_id": "host-1"}"#,
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["data"]["id"].as_str().unwrap().to_owned();

    let mut feed = connect(&b, "/ws/metrics/host-1", &admin).await;
    assert_eq!(
        next(&mut feed, Duration::from_secs(5)).await.unwrap()["type"],
        "subscribed"
    );
    let mut fleet = connect(&b, "/ws/agents", &admin).await;
    assert_eq!(
        next(&mut fleet, Duration::from_secs(5)).await.unwrap()["type"],
        "subscribed"
    );

    // Node A learns of B's client within an interval or two; until then its samples reach B's
    // client only if A already knew, so write until one arrives.
    let key = r#"cpu_seconds_total{cpu="0",instance="host-1",mode="idle"}"#;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut value = 0.0;
    let reading = loop {
        assert!(
            Instant::now() < deadline,
            "nothing from node A reached node B's client"
        );
        value += 1.0;
        crate::live::write(&a, &ingest, "host-1", 1, value).await;
        if let Some(message) = next(&mut feed, Duration::from_millis(700)).await {
            assert_eq!(message["type"], "metrics", "{message}");
            if let Some(reading) = message["data"].get(key) {
                break reading.clone();
            }
        }
    };
    assert!(reading["value"].as_f64().unwrap() >= 1.0, "{reading}");
    // Once interest is known, a sample written on A reaches B's client within 3 s.
    let sent = Instant::now();
    crate::live::write(&a, &ingest, "host-1", 1, 1000.0).await;
    loop {
        let message = next(&mut feed, Duration::from_secs(3))
            .await
            .expect("no reading within 3 s");
        if message["data"][key]["value"] == 1000.0 {
            break;
        }
    }
    assert!(sent.elapsed() < Duration::from_secs(3));

    // A registry change made on node A reaches node B's fleet page.
    assert_eq!(
        crate::opamp::send(
            &a,
            &admin,
            reqwest::Method::PATCH,
            &format!("/api/v1/agents/{id}"),
            r#"{"name": "renamed on A"}"#
        )
        .await
        .0,
        200
    );
    let event = next(&mut fleet, Duration::from_secs(5))
        .await
        .expect("no registry change reached node B");
    assert_eq!(
        (&event["type"], &event["agent"]["name"]),
        (
            &serde_json::json!("updated"),
            &serde_json::json!("renamed on A")
        ),
        "{event}"
    );
}
