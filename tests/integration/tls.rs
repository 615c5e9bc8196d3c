//! TLS with certificates made in the test (rcgen): every listener serves TLS to real clients
//! (reqwest, the OpenTelemetry Python SDK over gRPC and HTTP), picks up a renewed certificate
//! from its files, requires client certificates when given a client CA; the PostgreSQL backend
//! connects over TLS with `sslmode=verify-full`.

use crate::support::{Backend, Postgres, Secumon};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A CA and what it signs.
pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub(crate) fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `127.0.0.1` and `localhost` (a server's) or for a client: PEM
    /// certificate and key.
    pub(crate) fn issue(&self, client: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub(crate) fn client(ca: &Ca, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        builder = builder
            .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// The certificate the server at `addr` presents (DER).
async fn served_certificate(addr: std::net::SocketAddr, ca: &Ca) -> Vec<u8> {
    let tls = tls_connect(addr, ca).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A TLS connection to `addr`, trusting `ca`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &Ca,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_serves_tls_and_picks_up_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("secumon test CA");
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let (cert, key) = ca.issue(false);
    let cert_path = write(dir.path(), "server.crt", &cert);
    let key_path = write(dir.path(), "server.key", &key);
    let s = Secumon::start_on(Backend::Embedded, |c| {
        c.tls.cert = cert_path.display().to_string();
        c.tls.key = key_path.display().to_string();
    })
    .await;
    let https = client(&ca, None);
    let url = format!("https://{}/api/v1/labels", s.server.addr);
    let response = https.get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // Plain HTTP to a TLS listener gets no answer.
    let plain = reqwest::get(format!("http://{}/api/v1/labels", s.server.addr)).await;
    assert!(
        plain.is_err() || plain.unwrap().status().as_u16() != 200,
        "plain HTTP answered"
    );

    // The OpenTelemetry SDK over gRPC and HTTP with TLS, trusting the test CA.
    let ca_env = ca_path.display().to_string();
    let env = [("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_env.as_str())];
    let grpc = format!(
        "https://127.0.0.1:{}",
        s.server.otlp_grpc_addr.unwrap().port()
    );
    let (ok, log) = crate::otlp::python_export_with("grpc", &grpc, "cumulative", "tls-grpc", &env);
    assert!(ok, "gRPC export over TLS failed: {log}");
    let http = format!(
        "https://127.0.0.1:{}",
        s.server.otlp_http_addr.unwrap().port()
    );
    let (ok, log) = crate::otlp::python_export_with("http", &http, "cumulative", "tls-http", &env);
    assert!(ok, "HTTP export over TLS failed: {log}");
    let answer: serde_json::Value = https
        .get(format!("https://{}/api/v1/query", s.server.addr))
        .query(&[("query", "count by (instance) (requests_total)")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["data"]["result"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );

    // A renewed certificate in the same files is served within seconds, on every listener.
    let before = served_certificate(s.server.addr, &ca).await;
    let (renewed, renewed_key) = ca.issue(false);
    write(dir.path(), "server.key", &renewed_key);
    write(dir.path(), "server.crt", &renewed);
    let want = rustls::pki_types::CertificateDer::from_pem_slice(renewed.as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for addr in [
        s.server.addr,
        s.server.otlp_http_addr.unwrap(),
        s.server.otlp_grpc_addr.unwrap(),
    ] {
        loop {
            let served = served_certificate(addr, &ca).await;
            if served == want.as_ref() {
                break;
            }
            assert_eq!(served, before, "{addr} served an unexpected certificate");
            assert!(Instant::now() < deadline, "{addr} kept the old certificate");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // A broken pair is not taken: the renewed one stays.
    write(dir.path(), "server.crt", "not a certificate");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(served_certificate(s.server.addr, &ca).await, want.as_ref());
}

use rustls::pki_types::pem::PemObject;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_requires_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("secumon test CA");
    let clients = Ca::new("secumon clients CA");
    let (cert, key) = ca.issue(false);
    let (cert_path, key_path) = (
        write(dir.path(), "server.crt", &cert),
        write(dir.path(), "server.key", &key),
    );
    let clients_path = write(dir.path(), "clients.pem", &clients.pem());
    let s = Secumon::start_on(Backend::Embedded, |c| {
        c.tls.cert = cert_path.display().to_string();
        c.tls.key = key_path.display().to_string();
        c.tls.client_ca = clients_path.display().to_string();
    })
    .await;
    let url = format!("https://{}/api/v1/labels", s.server.addr);
    assert!(client(&ca, None).get(&url).send().await.is_err());
    // A certificate from another CA is refused too.
    let (stranger, stranger_key) = ca.issue(true);
    assert!(client(&ca, Some((&stranger, &stranger_key)))
        .get(&url)
        .send()
        .await
        .is_err());
    let (mine, mine_key) = clients.issue(true);
    let response = client(&ca, Some((&mine, &mine_key)))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

/// The live feed over TLS, through the handover of the connection (TLS state and all) from the
/// HTTP server to the feed's runtime: a `wss://` client is answered, its messages read, and
/// registry changes reach it. (That the socket leaves the HTTP runtime's reactor is seen in
/// the fleet_live bench, in the server's epoll sets.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_serves_wss() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("secumon test CA");
    let (cert, key) = ca.issue(false);
    let (cert_path, key_path) = (
        write(dir.path(), "server.crt", &cert),
        write(dir.path(), "server.key", &key),
    );
    let s = Secumon::start_on(Backend::Embedded, |c| {
        c.tls.cert = cert_path.display().to_string();
        c.tls.key = key_path.display().to_string();
    })
    .await;
    let mut request = format!("wss://127.0.0.1:{}/ws/agents", s.server.addr.port())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "secumon.v1".parse().unwrap());
    let tls = tls_connect(s.server.addr, &ca).await;
    let (mut socket, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "secumon.v1");
    assert_eq!(
        crate::live::next(&mut socket, Duration::from_secs(5)).await["type"],
        "subscribed"
    );
    // What the client says is read and answered over the moved connection.
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        crate::live::next(&mut socket, Duration::from_secs(5)).await["type"],
        "error"
    );
    let created = client(&ca, None)
        .post(format!("https://{}/api/v1/agents", s.server.addr))
        .json(&serde_json::json!({"agent_id": "tls-host"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let event = crate::live::next(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(
        (&event["type"], &event["agent"]["agent_id"]),
        (
            &serde_json::json!("registered"),
            &serde_json::json!("tls-host")
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_storage_connects_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("secumon test CA");
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let (cert, key) = ca.issue(false);
    let pg = Postgres::start_tls(&cert, &key);
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca_path.display()
    );
    let s = Secumon::start_on(Backend::Embedded, |c| c.storage = url.clone()).await;
    let body = crate::support::remote_write::encode(&crate::support::remote_write::request(
        vec![crate::support::remote_write::series(
            &[("__name__", "over_tls")],
            &[(chrono::Utc::now().timestamp_millis(), 1.0)],
        )],
        vec![],
    ));
    let (status, text) = s.write_raw(body).await;
    assert_eq!(status, 204, "{text}");
    let (_, answer) = s.get_json("/api/v1/query", &[("query", "over_tls")]).await;
    assert_eq!(answer["data"]["result"][0]["value"][1], "1", "{answer}");
    // The connection is encrypted.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl);
    // A server certificate the given root does not vouch for is refused.
    let other = write(dir.path(), "other.pem", &Ca::new("another CA").pem());
    let wrong = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        other.display()
    );
    let refused = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&wrong)
        .await;
    assert!(refused.is_err(), "an unverified server was accepted");
}
