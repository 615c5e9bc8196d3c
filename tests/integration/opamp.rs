//! OpAMP over HTTP (`POST /v1/opamp`): the official OpenTelemetry Python OpAMP client
//! registers, heartbeats and applies a remote configuration an operator set over REST; and the
//! protocol's edges with hand-made messages: sequence gaps, instance-uid requests and
//! duplicates, malformed and oversized messages, gzip, tokens and tenants.

use crate::support::{Backend, Secumon};
use prost::Message;
use secumon_proto::opamp::{
    any_value, AgentDescription, AgentToServer, AnyValue, KeyValue, RemoteConfigStatus,
    ServerToAgent,
};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PIP_INSTALL: &str = "python3 -m pip install opentelemetry-opamp-client";

/// Flag and capability bits of the specification.
const REPORT_FULL_STATE: u64 = 1;
const REQUEST_INSTANCE_UID: u64 = 1;
const REPORTS_STATUS: u64 = 0x1;
const ACCEPTS_REMOTE_CONFIG: u64 = 0x2;
const BAD_REQUEST: i32 = 1;

async fn get(s: &Secumon, token: &str, path: &str) -> (u16, Value) {
    let response = s
        .http
        .get(s.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Sends `body` (JSON text) with `token`; the status and the answer as JSON.
pub(crate) async fn send(
    s: &Secumon,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: impl Into<String>,
) -> (u16, Value) {
    let response = s
        .http
        .request(method, s.url(path))
        .bearer_auth(token)
        .body(body.into())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Registers a new agent on `host` over OpAMP (its first message, with a description); its
/// instance uid.
pub(crate) async fn register(s: &Secumon, token: &str, host: &str) -> uuid::Uuid {
    let uid = uuid::Uuid::now_v7();
    let (status, answer) = post(
        s,
        token,
        message(&uid, 0, Some(host)).encode_to_vec(),
        false,
    )
    .await;
    assert_eq!(status, 200);
    assert!(answer.unwrap().error_response.is_none());
    uid
}

/// Sends one OpAMP message as bytes; the HTTP status and the decoded answer (if 200).
pub(crate) async fn post(
    s: &Secumon,
    token: &str,
    body: Vec<u8>,
    gzip: bool,
) -> (u16, Option<ServerToAgent>) {
    let mut request = s
        .http
        .post(s.url("/v1/opamp"))
        .bearer_auth(token)
        .header("Content-Type", "application/x-protobuf");
    let body = if gzip {
        request = request.header("Content-Encoding", "gzip");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&body).unwrap();
        encoder.finish().unwrap()
    } else {
        body
    };
    let response = request.body(body).send().await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        (status == 200).then(|| ServerToAgent::decode(bytes.as_ref()).unwrap()),
    )
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

pub(crate) fn message(uid: &uuid::Uuid, sequence_num: u64, host: Option<&str>) -> AgentToServer {
    AgentToServer {
        instance_uid: uid.as_bytes().to_vec(),
        sequence_num,
        capabilities: REPORTS_STATUS | ACCEPTS_REMOTE_CONFIG,
        agent_description: host.map(|h| AgentDescription {
            identifying_attributes: vec![text("service.name", "hand-made")],
            non_identifying_attributes: vec![text("host.name", h)],
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_opamp_client_registers_and_applies_a_remote_configuration() {
    let (s, catalog) = crate::auth::start(Backend::Embedded, |_| {}).await;
    let agent_token = crate::auth::mint(&catalog, "team-a", "ingest", None).await;
    let admin = crate::auth::mint(&catalog, "team-a", "admin,read", None).await;
    let other = crate::auth::mint(&catalog, "team-b", "admin,read", None).await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/opamp/agent.py");
    let mut child = Command::new("python3")
        .args([script, &s.url("/v1/opamp"), &agent_token, "py-host"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("python3 not found ({e}): install Python 3, then `{PIP_INSTALL}`")
        });
    let (events, receive) = std::sync::mpsc::channel::<Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(event) = serde_json::from_str(&line) {
                if events.send(event).is_err() {
                    break;
                }
            }
        }
    });
    let next_event = |wait: Duration| receive.recv_timeout(wait).ok();
    let Some(first) = next_event(Duration::from_secs(30)) else {
        let output = child.wait_with_output().unwrap();
        panic!(
            "the OpAMP agent did not start; is the client installed (`{PIP_INSTALL}`)?\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    assert_eq!(first["event"], "uid", "{first}");
    let uid = first["instance_uid"].as_str().unwrap().to_owned();

    // Registered from its first (full state) message, and seen again with each poll.
    let deadline = Instant::now() + Duration::from_secs(20);
    let agent = loop {
        let (status, page) = get(&s, &admin, "/api/v1/agents").await;
        assert_eq!(status, 200, "{page}");
        if let Some(agent) = page["data"]["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent_id"] == uid.as_str())
        {
            break agent.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never registered: {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (
            &agent["auto_registered"],
            &agent["hostname"],
            &agent["name"],
            &agent["agent_type"],
            &agent["agent_version"],
            &agent["os"],
            &agent["os_version"],
            &agent["ip_address"],
            &agent["online"],
        ),
        (
            &json!(true),
            &json!("py-host"),
            &json!("py-host"),
            &json!("python-opamp-test"),
            &json!("1.2.3"),
            &json!("linux"),
            &json!("Debian GNU/Linux 12"),
            &json!("127.0.0.1"),
            &json!(true),
        ),
        "{agent}"
    );
    assert!(
        agent.get("attributes").is_none(),
        "listings are slim: {agent}"
    );
    let id = agent["id"].as_str().unwrap().to_owned();
    let (_, full) = get(&s, &admin, &format!("/api/v1/agents/{id}")).await;
    assert_eq!(
        full["data"]["attributes"]["service.version"], "1.2.3",
        "{full}"
    );
    let first_seen = agent["last_seen_at"].as_str().unwrap().to_owned();

    // An operator sets a remote configuration; the agent receives it with its next poll,
    // applies it and reports so.
    let config = json!({"config_map": {"": {"body": "{\"sampler\": \"always_on\"}",
        "content_type": "application/json"}}});
    assert_eq!(
        crate::opamp::send(
            &s,
            &admin,
            reqwest::Method::PUT,
            &format!("/api/v1/agents/{id}/config"),
            config.to_string()
        )
        .await
        .0,
        200
    );
    let received = loop {
        let Some(event) = next_event(Duration::from_secs(20)) else {
            panic!("no remote configuration reached the agent");
        };
        if event["event"] == "config" {
            break event;
        }
        assert_ne!(event["event"], "error", "{event}");
    };
    assert_eq!(
        received["files"][""],
        json!({"sampler": "always_on"}),
        "{received}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(&s, &admin, &format!("/api/v1/agents/{id}/config")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["data"]["config_hash"], received["config_hash"],
            "{body}"
        );
        if body["data"]["reported"]["status"] == "applied" {
            assert_eq!(
                body["data"]["reported"]["config_hash"], received["config_hash"],
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never reported applied: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The effective configuration follows in the agent's next full state.
    let deadline = Instant::now() + Duration::from_secs(20);
    let agent = loop {
        let (_, agent) = get(&s, &admin, &format!("/api/v1/agents/{id}")).await;
        if !agent["data"]["effective_config"].is_null() {
            break agent["data"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no effective configuration: {agent}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        agent["effective_config"]["config_map"][""]["body"], "{\"sampler\": \"always_on\"}",
        "{agent}"
    );
    assert_eq!(
        agent["remote_config"]["status"]["status"], "applied",
        "{agent}"
    );
    assert!(
        agent["last_seen_at"].as_str().unwrap() > first_seen.as_str(),
        "{agent}"
    );
    // Applied once: no more offers of the same configuration.
    assert!(
        next_event(Duration::from_millis(2500)).is_none_or(|e| e["event"] != "config"),
        "offered again after it was applied"
    );

    // Another tenant sees none of it.
    let (_, theirs) = get(&s, &other, "/api/v1/agents").await;
    assert_eq!(theirs["data"]["total"], 0, "{theirs}");
    let (status, _) = get(&s, &other, &format!("/api/v1/agents/{id}/config")).await;
    assert_eq!(status, 404);

    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_edges_sequence_uids_malformed_and_tenants() {
    let (s, catalog) = crate::auth::start(Backend::Embedded, |c| {
        c.fleet.opamp_max_message_bytes = 64 * 1024;
    })
    .await;
    let token = crate::auth::mint(&catalog, "team-a", "ingest", None).await;
    let reader = crate::auth::mint(&catalog, "team-a", "read", None).await;
    let other = crate::auth::mint(&catalog, "team-b", "ingest", None).await;
    let uid = uuid::Uuid::now_v7();

    // A first message without a description: registered, and asked for the full state.
    let (status, answer) = post(&s, &token, message(&uid, 0, None).encode_to_vec(), false).await;
    assert_eq!(status, 200);
    let answer = answer.unwrap();
    assert_eq!(answer.instance_uid, uid.as_bytes());
    assert_eq!(answer.flags & REPORT_FULL_STATE, REPORT_FULL_STATE);
    assert_eq!(
        answer.capabilities & 0x7,
        0x7,
        "status, remote config, effective config"
    );
    assert!(answer.error_response.is_none());
    // The full state, in sequence and gzipped: nothing more asked.
    let (_, answer) = post(
        &s,
        &token,
        message(&uid, 1, Some("h1")).encode_to_vec(),
        true,
    )
    .await;
    assert_eq!(answer.unwrap().flags & REPORT_FULL_STATE, 0);
    let (_, answer) = post(&s, &token, message(&uid, 2, None).encode_to_vec(), false).await;
    assert_eq!(answer.unwrap().flags & REPORT_FULL_STATE, 0, "a plain poll");
    // A gap in the sequence: the server may have missed a report, so it asks again.
    let (_, answer) = post(&s, &token, message(&uid, 5, None).encode_to_vec(), false).await;
    assert_eq!(answer.unwrap().flags & REPORT_FULL_STATE, REPORT_FULL_STATE);

    // The same uid from another host while the first is online: the newcomer gets a new uid
    // and its own row.
    let (_, answer) = post(
        &s,
        &token,
        message(&uid, 0, Some("h2")).encode_to_vec(),
        false,
    )
    .await;
    let answer = answer.unwrap();
    let new_uid = answer
        .agent_identification
        .expect("a duplicate gets a new instance_uid")
        .new_instance_uid;
    assert_eq!(new_uid.len(), 16);
    assert_eq!(
        answer.instance_uid,
        uid.as_bytes(),
        "answers the uid it was sent"
    );
    let new_uid = uuid::Uuid::from_slice(&new_uid).unwrap();
    let (_, page) = get(&s, &reader, "/api/v1/agents?sort=hostname").await;
    let rows: Vec<(&str, &str)> = page["data"]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["agent_id"].as_str().unwrap(),
                a["hostname"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (uid.to_string().as_str(), "h1"),
            (new_uid.to_string().as_str(), "h2")
        ],
        "{page}"
    );

    // An agent that asks for a uid gets one, and is registered under it.
    let temporary = uuid::Uuid::now_v7();
    let mut asking = message(&temporary, 0, Some("h3"));
    asking.flags = REQUEST_INSTANCE_UID;
    let (_, answer) = post(&s, &token, asking.encode_to_vec(), false).await;
    let assigned = uuid::Uuid::from_slice(
        &answer
            .unwrap()
            .agent_identification
            .unwrap()
            .new_instance_uid,
    )
    .unwrap();
    let (_, page) = get(&s, &reader, "/api/v1/agents?hostname=h3").await;
    assert_eq!(
        page["data"]["agents"][0]["agent_id"],
        assigned.to_string(),
        "{page}"
    );

    // Remote configuration: offered to an agent that accepts it until it reports the hash.
    let admin = crate::auth::mint(&catalog, "team-a", "admin", None).await;
    let id = page["data"]["agents"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        crate::opamp::send(
            &s,
            &admin,
            reqwest::Method::PUT,
            &format!("/api/v1/agents/{id}/config"),
            r#"{"config_map":{"agent.yaml":{"body":"interval: 10s","content_type":"text/yaml"}}}"#
        )
        .await
        .0,
        200
    );
    let (_, answer) = post(
        &s,
        &token,
        message(&assigned, 1, None).encode_to_vec(),
        false,
    )
    .await;
    let offer = answer
        .unwrap()
        .remote_config
        .expect("the configuration is offered");
    let file = &offer.config.as_ref().unwrap().config_map["agent.yaml"];
    assert_eq!(
        (file.body.as_slice(), file.content_type.as_str()),
        (&b"interval: 10s"[..], "text/yaml")
    );
    let mut applied = message(&assigned, 2, None);
    applied.remote_config_status = Some(RemoteConfigStatus {
        last_remote_config_hash: offer.config_hash.clone(),
        status: 1,
        error_message: String::new(),
    });
    let (_, answer) = post(&s, &token, applied.encode_to_vec(), false).await;
    assert!(
        answer.unwrap().remote_config.is_none(),
        "applied: not offered again"
    );
    let (_, answer) = post(
        &s,
        &token,
        message(&assigned, 3, None).encode_to_vec(),
        false,
    )
    .await;
    assert!(
        answer.unwrap().remote_config.is_none(),
        "the stored status counts"
    );
    let mut refusing = message(&assigned, 4, None);
    refusing.capabilities = REPORTS_STATUS;
    assert_eq!(
        crate::opamp::send(
            &s,
            &admin,
            reqwest::Method::PUT,
            &format!("/api/v1/agents/{id}/config"),
            r#"{"config_map":{"agent.yaml":{"body":"interval: 20s"}}}"#
        )
        .await
        .0,
        200
    );
    let (_, answer) = post(&s, &token, refusing.encode_to_vec(), false).await;
    assert!(
        answer.unwrap().remote_config.is_none(),
        "never offered to an agent that does not accept remote configuration"
    );
    assert_eq!(
        crate::opamp::send(
            &s,
            &admin,
            reqwest::Method::PUT,
            &format!("/api/v1/agents/{id}/config"),
            r#"{"config_map":{}}"#
        )
        .await
        .0,
        400
    );

    // Malformed: answered in the protocol, BadRequest.
    for bad in [
        vec![0xff, 0xff, 0xff],
        message(&uid, 6, None).encode_to_vec()[2..].to_vec(),
    ] {
        let (status, answer) = post(&s, &token, bad, false).await;
        assert_eq!(status, 200);
        let error = answer.unwrap().error_response.expect("an error answer");
        assert_eq!(error.r#type, BAD_REQUEST, "{}", error.error_message);
    }
    let mut short = message(&uid, 6, None);
    short.instance_uid = vec![1, 2, 3];
    let (_, answer) = post(&s, &token, short.encode_to_vec(), false).await;
    let error = answer.unwrap().error_response.unwrap();
    assert!(
        error.error_message.contains("16 bytes"),
        "{}",
        error.error_message
    );
    // Too large, before or after decompression: 413.
    let mut large = message(&uid, 7, Some("h1"));
    large
        .agent_description
        .as_mut()
        .unwrap()
        .non_identifying_attributes = vec![text("big", &"x".repeat(100 * 1024))];
    let (status, _) = post(&s, &token, large.encode_to_vec(), false).await;
    assert_eq!(status, 413);
    let (status, _) = post(&s, &token, large.encode_to_vec(), true).await;
    assert_eq!(status, 413, "a gzip bomb stops at the limit");
    let response = s
        .http
        .post(s.url("/v1/opamp"))
        .bearer_auth(&token)
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);

    // Tokens: none is 401, a read-only one 403; another tenant's agents are its own.
    let response = s
        .http
        .post(s.url("/v1/opamp"))
        .header("Content-Type", "application/x-protobuf")
        .body(message(&uid, 8, None).encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let (status, _) = post(&s, &reader, message(&uid, 8, None).encode_to_vec(), false).await;
    assert_eq!(status, 403);
    let (_, answer) = post(
        &s,
        &other,
        message(&uid, 0, Some("h1")).encode_to_vec(),
        false,
    )
    .await;
    assert!(
        answer.unwrap().agent_identification.is_none(),
        "the same uid in another tenant is another agent"
    );
    let other_reader = crate::auth::mint(&catalog, "team-b", "read", None).await;
    let (_, page) = get(&s, &other_reader, "/api/v1/agents").await;
    assert_eq!(page["data"]["total"], 1, "{page}");
    let (_, page) = get(&s, &reader, "/api/v1/agents").await;
    assert_eq!(page["data"]["total"], 3, "{page}");

    // A disconnect ends the sequence, and the agent is offline at once (in the listing's
    // filter, its own page and the counts); its next message starts a new sequence with no
    // gap, and it is online again.
    let listed = async |query: &str| -> bool {
        let (_, page) = get(&s, &reader, &format!("/api/v1/agents?{query}")).await;
        page["data"]["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["agent_id"] == uid.to_string())
    };
    let online_count = async || -> i64 {
        let (_, stats) = get(&s, &reader, "/api/v1/agents/stats").await;
        stats["data"]["online"].as_i64().unwrap()
    };
    assert!(listed("online=true").await && !listed("online=false").await);
    // A PUT replaces what the agent described: the agent stays online, and its next message
    // that brings no description is asked for its full state (the poll before it was not).
    let (_, answer) = post(&s, &token, message(&uid, 6, None).encode_to_vec(), false).await;
    assert_eq!(answer.unwrap().flags & REPORT_FULL_STATE, 0);
    let (_, page) = get(&s, &reader, "/api/v1/agents?online=true").await;
    let row = page["data"]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent_id"] == uid.to_string())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, put) = send(
        &s,
        &admin,
        reqwest::Method::PUT,
        &format!("/api/v1/agents/{row}"),
        json!({"agent_id": uid.to_string(), "name": "replaced"}).to_string(),
    )
    .await;
    assert_eq!(
        (status, &put["data"]["online"]),
        (200, &json!(true)),
        "{put}"
    );
    let (_, answer) = post(&s, &token, message(&uid, 7, None).encode_to_vec(), false).await;
    assert_eq!(answer.unwrap().flags & REPORT_FULL_STATE, REPORT_FULL_STATE);
    let (_, answer) = post(
        &s,
        &token,
        message(&uid, 8, Some("h1")).encode_to_vec(),
        false,
    )
    .await;
    assert_eq!(answer.unwrap().flags & REPORT_FULL_STATE, 0);
    let online_before = online_count().await;
    let mut bye = message(&uid, 9, None);
    bye.agent_disconnect = Some(Default::default());
    let (_, answer) = post(&s, &token, bye.encode_to_vec(), false).await;
    assert!(answer.unwrap().error_response.is_none());
    assert!(!listed("online=true").await && listed("online=false").await);
    assert_eq!(online_count().await, online_before - 1);
    let (_, page) = get(&s, &reader, "/api/v1/agents?online=false").await;
    let gone = page["data"]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent_id"] == uid.to_string())
        .unwrap();
    assert_eq!(gone["online"], false, "{gone}");
    let (_, answer) = post(
        &s,
        &token,
        message(&uid, 0, Some("h1")).encode_to_vec(),
        false,
    )
    .await;
    assert_eq!(answer.unwrap().flags & REPORT_FULL_STATE, 0);
    assert!(listed("online=true").await);
    assert_eq!(online_count().await, online_before);
}

/// The instant vector `query` gives to `token`'s tenant, as (labels, value) pairs.
async fn instant(s: &Secumon, token: &str, query: &str) -> Vec<(Value, f64)> {
    let response = s
        .http
        .get(s.url("/api/v1/query"))
        .query(&[("query", query)])
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "success", "{query}: {body}");
    body["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metric"].clone(),
                r["value"][1].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_health_is_written_as_series_into_each_tenant() {
    let (s, catalog) = crate::auth::start(Backend::Embedded, |c| {
        c.fleet.status_interval_secs = 1;
    })
    .await;
    let token = crate::auth::mint(&catalog, "team-a", "ingest", None).await;
    let admin = crate::auth::mint(&catalog, "team-a", "admin,read", None).await;
    let other = crate::auth::mint(&catalog, "team-b", "read", None).await;
    let uid = register(&s, &token, "web-1").await;
    // Pre-registered, never seen: down.
    assert_eq!(
        crate::opamp::send(
            &s,
            &admin,
            reqwest::Method::POST,
            "/api/v1/agents",
            r#"{"agent_id": "planned-1", "hostname": "db-9"}"#
        )
        .await
        .0,
        201
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let up = loop {
        let up = instant(&s, &admin, "secumon_agent_up").await;
        if up.len() == 2 {
            break up;
        }
        assert!(Instant::now() < deadline, "no fleet series: {up:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let by_host = |host: &str| {
        up.iter()
            .find(|(labels, _)| labels["hostname"] == host)
            .unwrap_or_else(|| panic!("{host}: {up:?}"))
    };
    let (labels, value) = by_host("web-1");
    assert_eq!(*value, 1.0, "{labels}");
    assert_eq!(
        (
            &labels["job"],
            &labels["instance"],
            &labels["agent_id"],
            &labels["agent_type"],
            &labels["status"]
        ),
        (
            &json!("secumon-fleet"),
            &json!(uid.to_string()),
            &json!(uid.to_string()),
            &json!("hand-made"),
            &json!("active")
        ),
        "{labels}"
    );
    assert_eq!(by_host("db-9").1, 0.0);
    let seen = instant(&s, &admin, "secumon_agent_last_seen_timestamp_seconds").await;
    assert_eq!(seen.len(), 1, "only agents ever seen: {seen:?}");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((now - seen[0].1).abs() < 30.0, "{seen:?} at {now}");
    assert!(
        instant(&s, &other, "secumon_agent_up").await.is_empty(),
        "another tenant's fleet is not in team-b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_latest_values_and_history() {
    use crate::support::remote_write::{encode, request, series};
    let (s, catalog) = crate::auth::start(Backend::Embedded, |c| {
        c.fleet.status_interval_secs = 0;
    })
    .await;
    let token = crate::auth::mint(&catalog, "team-a", "ingest,read", None).await;
    let other = crate::auth::mint(&catalog, "team-b", "ingest,read", None).await;
    let uid = register(&s, &token, "web-1").await;
    let instance = uid.to_string();
    // Whole seconds, so the history's steps (given in seconds) fall on the samples.
    let now = chrono::Utc::now().timestamp() * 1000;
    let minute = |n: i64| now - 60_000 * (10 - n);
    let body = encode(&request(
        vec![
            series(
                &[
                    ("__name__", "cpu_seconds_total"),
                    ("instance", &instance),
                    ("mode", "idle"),
                ],
                &(0..10)
                    .map(|n| (minute(n), n as f64 * 10.0))
                    .collect::<Vec<_>>(),
            ),
            series(
                &[("__name__", "load1"), ("instance", &instance)],
                &[(minute(8), 0.5), (minute(9), f64::NAN)],
            ),
            // Another host's series, and one too old for "latest".
            series(
                &[("__name__", "load1"), ("instance", "elsewhere")],
                &[(minute(9), 9.0)],
            ),
            series(
                &[("__name__", "stale_gauge"), ("instance", &instance)],
                &[(now - 3_600_000, 1.0)],
            ),
        ],
        vec![],
    ));
    let response = s
        .http
        .post(s.url("/api/v1/write"))
        .bearer_auth(&token)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());

    let (status, latest) = get(&s, &token, &format!("/api/v1/metrics/latest/{instance}")).await;
    assert_eq!(status, 200, "{latest}");
    assert_eq!(
        latest["data"]["metrics"],
        json!([
            {"name": "cpu_seconds_total", "labels": {"instance": instance, "mode": "idle"},
             "value": 90.0, "timestamp": minute(9)},
            {"name": "load1", "labels": {"instance": instance}, "value": "NaN", "timestamp": minute(9)},
        ]),
        "{latest}"
    );
    // By registry id too.
    let (_, page) = get(&s, &token, "/api/v1/agents").await;
    let id = page["data"]["agents"][0]["id"].as_str().unwrap().to_owned();
    let (status, by_id) = get(&s, &token, &format!("/api/v1/metrics/latest/{id}")).await;
    assert_eq!((status, &by_id["data"]), (200, &latest["data"]));

    let range = format!(
        "/api/v1/metrics/history/{instance}?metric=cpu_seconds_total&start={}&end={}&step=120",
        minute(0) / 1000,
        minute(9) / 1000
    );
    let (status, history) = get(&s, &token, &range).await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["data"]["resultType"], "matrix", "{history}");
    let values: Vec<&str> = history["data"]["result"][0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[1].as_str().unwrap())
        .collect();
    assert_eq!(values, ["0", "20", "40", "60", "80"], "{history}");

    // Bad parameters, another tenant, an unknown agent.
    for (path, want) in [
        (format!("/api/v1/metrics/history/{instance}"), 400),
        (
            format!("/api/v1/metrics/history/{instance}?metric=rate(x[1m])"),
            400,
        ),
        (
            format!("/api/v1/metrics/history/{instance}?metric=up&step=0"),
            400,
        ),
        (
            format!("/api/v1/metrics/history/{instance}?metric=up&start=0&end=100000&step=1"),
            400,
        ),
        ("/api/v1/metrics/latest/nobody".to_string(), 404),
    ] {
        let (status, body) = get(&s, &token, &path).await;
        assert_eq!(status, want, "{path}: {body}");
    }
    let (status, _) = get(&s, &other, &format!("/api/v1/metrics/latest/{instance}")).await;
    assert_eq!(status, 404, "another tenant's agent is not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_bound_to_its_token_and_keeps_its_row_when_renamed() {
    let (s, catalog) = crate::auth::start(Backend::Embedded, |c| {
        c.fleet.status_interval_secs = 0;
    })
    .await;
    // The agent's own token lives 3 s; another host's token of the same tenant.
    let own = crate::auth::mint(&catalog, "team-a", "ingest", Some(3_000)).await;
    let neighbour = crate::auth::mint(&catalog, "team-a", "ingest", None).await;
    let admin = crate::auth::mint(&catalog, "team-a", "admin,read", None).await;
    let uid = register(&s, &own, "h1").await;
    let (_, page) = get(&s, &admin, "/api/v1/agents").await;
    let id = page["data"]["agents"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        crate::opamp::send(
            &s,
            &admin,
            reqwest::Method::PUT,
            &format!("/api/v1/agents/{id}/config"),
            r#"{"config_map":{"":{"body":"secret: 1"}}}"#
        )
        .await
        .0,
        200
    );

    // Another token speaking for the uid gets neither the configuration nor the row.
    let mut impostor = message(&uid, 1, Some("h1"));
    impostor.flags = REQUEST_INSTANCE_UID;
    let (_, answer) = post(&s, &neighbour, impostor.encode_to_vec(), false).await;
    let answer = answer.unwrap();
    let error = answer.error_response.expect("refused");
    assert!(
        error.error_message.contains("another API token"),
        "{}",
        error.error_message
    );
    assert!(answer.remote_config.is_none() && answer.agent_identification.is_none());
    let (_, agent) = get(&s, &admin, &format!("/api/v1/agents/{id}")).await;
    assert_eq!(agent["data"]["agent_id"], uid.to_string(), "{agent}");

    // Its own token may rename it: the same row moves to the new uid, and stays there.
    let mut asking = message(&uid, 1, None);
    asking.flags = REQUEST_INSTANCE_UID;
    let (_, answer) = post(&s, &own, asking.encode_to_vec(), false).await;
    let answer = answer.unwrap();
    assert!(
        answer.remote_config.is_some(),
        "its own token is offered its configuration"
    );
    let new_uid = uuid::Uuid::from_slice(
        &answer
            .agent_identification
            .expect("a new uid")
            .new_instance_uid,
    )
    .unwrap();
    let (_, answer) = post(&s, &own, message(&new_uid, 2, None).encode_to_vec(), false).await;
    assert_eq!(
        answer.unwrap().flags & REPORT_FULL_STATE,
        0,
        "{new_uid} is the same agent"
    );
    let (_, page) = get(&s, &admin, "/api/v1/agents").await;
    assert_eq!(page["data"]["total"], 1, "{page}");
    assert_eq!(
        (
            &page["data"]["agents"][0]["id"],
            &page["data"]["agents"][0]["agent_id"]
        ),
        (&json!(id), &json!(new_uid.to_string())),
        "{page}"
    );

    // Once its token is gone (rotated: expired or revoked), a new one may take the agent over.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let (_, answer) = post(
        &s,
        &neighbour,
        message(&new_uid, 3, None).encode_to_vec(),
        false,
    )
    .await;
    assert!(answer.unwrap().error_response.is_none());
    let (_, answer) = post(&s, &own, message(&new_uid, 4, None).encode_to_vec(), false).await;
    assert_eq!(answer, None, "the expired token is refused at the door");

    // A forged cursor whose key does not fit its sort is refused, not sent to SQL.
    use base64::Engine;
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(r#"{"sort":"name","key":5,"id":"x"}"#);
    let (status, body) = get(
        &s,
        &admin,
        &format!("/api/v1/agents?sort=name&cursor={forged}"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_transport_answers_and_pushes_a_new_configuration() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message as Ws;
    let (s, catalog) = crate::auth::start(Backend::Embedded, |c| {
        c.fleet.status_interval_secs = 0;
        c.fleet.opamp_max_message_bytes = 64 * 1024;
    })
    .await;
    let token = crate::auth::mint(&catalog, "team-a", "ingest", None).await;
    let admin = crate::auth::mint(&catalog, "team-a", "admin,read", None).await;
    let mut request = s
        .url("/v1/opamp")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (mut sink, mut stream) = socket.split();
    // Every message: a 0 header byte, then the protobuf.
    let framed = |message: &AgentToServer| {
        let mut bytes = vec![0u8];
        bytes.extend(message.encode_to_vec());
        Ws::binary(bytes)
    };
    let mut receive = async || -> ServerToAgent {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("no answer in time")
                .unwrap()
                .unwrap();
            if let Ws::Binary(bytes) = message {
                assert_eq!(bytes[0], 0, "the header");
                return ServerToAgent::decode(&bytes[1..]).unwrap();
            }
        }
    };
    let uid = uuid::Uuid::now_v7();
    sink.send(framed(&message(&uid, 0, Some("ws-host"))))
        .await
        .unwrap();
    let answer = receive().await;
    assert!(answer.error_response.is_none());
    assert_eq!(answer.instance_uid, uid.as_bytes());
    let (_, page) = get(&s, &admin, "/api/v1/agents?hostname=ws-host").await;
    let id = page["data"]["agents"][0]["id"].as_str().unwrap().to_owned();

    // An operator's new configuration arrives without the agent asking.
    assert_eq!(
        send(
            &s,
            &admin,
            reqwest::Method::PUT,
            &format!("/api/v1/agents/{id}/config"),
            r#"{"config_map":{"":{"body":"pushed: true"}}}"#
        )
        .await
        .0,
        200
    );
    let pushed = receive().await;
    assert_eq!(pushed.instance_uid, uid.as_bytes());
    let offered = pushed.remote_config.expect("the configuration is pushed");
    assert_eq!(offered.config.unwrap().config_map[""].body, b"pushed: true");

    // A header other than 0, or a text message: BadRequest, and the session goes on.
    sink.send(Ws::binary(vec![1u8, 2, 3])).await.unwrap();
    let error = receive().await.error_response.expect("an error answer");
    assert_eq!(error.r#type, BAD_REQUEST, "{}", error.error_message);
    sink.send(Ws::text("hello")).await.unwrap();
    assert_eq!(receive().await.error_response.unwrap().r#type, BAD_REQUEST);
    sink.send(framed(&message(&uid, 1, None))).await.unwrap();
    assert!(receive().await.error_response.is_none());

    // A message over --fleet-opamp-max-message-bytes ends the session instead of being read.
    let _ = sink.send(Ws::binary(vec![0u8; 200 * 1024])).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.next().await {
                None | Some(Err(_)) | Some(Ok(Ws::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "an oversized message did not end the session"
    );
}

/// `--fleet-forget-auto-registered-after`: an agent that registered itself and went silent is
/// removed (and announced as deleted); one an operator registered, one an operator tagged, and
/// one that keeps reporting, stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_auto_registered_agents_are_forgotten() {
    let (s, catalog) = crate::auth::start(Backend::Embedded, |c| {
        c.fleet.status_interval_secs = 1;
        c.fleet.forget_auto_registered_after = Duration::from_secs(2);
    })
    .await;
    let token = crate::auth::mint(&catalog, "team-a", "ingest", None).await;
    let admin = crate::auth::mint(&catalog, "team-a", "admin,read", None).await;
    let [silent, operators, tagged, talking] = [(); 4].map(|_| uuid::Uuid::now_v7());
    let body = json!({"agent_id": operators.to_string()}).to_string();
    assert_eq!(
        send(&s, &admin, reqwest::Method::POST, "/api/v1/agents", &body)
            .await
            .0,
        201
    );
    for (uid, host) in [
        (&silent, "h1"),
        (&operators, "h2"),
        (&tagged, "h3"),
        (&talking, "h4"),
    ] {
        let message = message(uid, 0, Some(host)).encode_to_vec();
        assert_eq!(post(&s, &token, message, false).await.0, 200);
    }
    let listed = async || -> Vec<(String, String)> {
        let (_, page) = get(&s, &admin, "/api/v1/agents").await;
        page["data"]["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let field = |name: &str| a[name].as_str().unwrap().to_owned();
                (field("agent_id"), field("id"))
            })
            .collect()
    };
    // A 1 s heartbeat, so the silent ones are offline after 3 s (the online rule is tested
    // apart from the operator's).
    let rows = listed().await;
    for (uid, patch) in [
        (&silent, json!({"heartbeat_secs": 1})),
        (&operators, json!({"heartbeat_secs": 1})),
        (
            &tagged,
            json!({"heartbeat_secs": 1, "tags": {"keep": "yes"}}),
        ),
    ] {
        let id = &rows.iter().find(|(a, _)| *a == uid.to_string()).unwrap().1;
        let path = format!("/api/v1/agents/{id}");
        let (status, answer) =
            send(&s, &admin, reqwest::Method::PATCH, &path, patch.to_string()).await;
        assert_eq!(status, 200, "{answer}");
    }
    let mut fleet = crate::live::connect(&s, "/ws/agents", &admin).await;
    assert_eq!(
        crate::live::next(&mut fleet, Duration::from_secs(5)).await["type"],
        "subscribed"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut sequence = 1;
    while listed().await.iter().any(|(a, _)| *a == silent.to_string()) {
        assert!(
            Instant::now() < deadline,
            "the silent agent is still listed"
        );
        let message = message(&talking, sequence, None).encode_to_vec();
        assert_eq!(post(&s, &token, message, false).await.0, 200);
        sequence += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let left: Vec<String> = listed().await.into_iter().map(|(a, _)| a).collect();
    for kept in [operators, tagged, talking] {
        assert!(left.contains(&kept.to_string()), "{kept} gone: {left:?}");
    }
    loop {
        let event = crate::live::next(&mut fleet, Duration::from_secs(5)).await;
        if event["type"] == "deleted" {
            assert_eq!(event["agent"]["agent_id"], silent.to_string(), "{event}");
            break;
        }
    }
}
