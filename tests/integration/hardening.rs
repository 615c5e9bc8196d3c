//! Hostile requests against the server binary over real HTTP: each class of request that could
//! take the process down, freeze it or grow it without bound gets its protocol's error, and
//! afterwards the server still answers a normal query within a second, its resident set stayed
//! within a stated bound, and data written before is intact.

use crate::support::process::{free_port, spawn_secumon, Managed};
use crate::support::remote_write::{encode, request, series};
use std::time::{Duration, Instant};

const T0: i64 = 1_700_000_000_000;

/// A server binary on the embedded engine, with a few samples written before each test.
struct Target {
    process: Managed,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

impl Target {
    async fn start(extra: &[&str]) -> Target {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut args = vec!["--retention-raw-days", "100000"];
        args.extend_from_slice(extra);
        let process = spawn_secumon(&dir.path().display().to_string(), port, &args);
        let target = Target {
            process,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let samples: Vec<(i64, f64)> = (0..20).map(|i| (T0 + i * 15_000, i as f64)).collect();
        let body = encode(&request(
            vec![series(&[("__name__", "before"), ("job", "a")], &samples)],
            vec![],
        ));
        let response = target
            .http
            .post(format!("{}/api/v1/write", target.base))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 204);
        target
    }

    async fn query(&self, params: &[(&str, &str)]) -> (u16, serde_json::Value) {
        crate::support::post_form(&self.http, &format!("{}/api/v1/query", self.base), params).await
    }

    async fn query_range(&self, params: &[(&str, &str)]) -> (u16, serde_json::Value) {
        crate::support::post_form(
            &self.http,
            &format!("{}/api/v1/query_range", self.base),
            params,
        )
        .await
    }

    /// Resident set of the server, in MiB.
    fn rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.pid()))
            .expect("server process alive");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .expect("VmRSS");
        kib / 1024
    }

    /// CPU time the server has used, in seconds.
    fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.process.pid()))
            .expect("server process alive");
        // Fields after the command name: state is field 3, utime 14 and stime 15.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// The server is alive, answers a normal query within a second with the data written
    /// before, and its resident set is below `max_rss_mib`.
    async fn assert_healthy(&self, max_rss_mib: u64) {
        let started = Instant::now();
        let t = format!("{}", (T0 + 300_000) as f64 / 1000.0);
        let (status, body) = self
            .query(&[("query", "sum(before)"), ("time", t.as_str())])
            .await;
        let took = started.elapsed();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["result"][0]["value"][1], "19", "{body}");
        assert!(took < Duration::from_secs(1), "normal query took {took:?}");
        let rss = self.rss_mib();
        assert!(
            rss < max_rss_mib,
            "resident set {rss} MiB over {max_rss_mib}"
        );
    }
}

fn error_of(body: &serde_json::Value) -> (&str, &str) {
    (
        body["errorType"].as_str().unwrap_or_default(),
        body["error"].as_str().unwrap_or_default(),
    )
}

/// A subquery of a literal over a year at 1 ms names 3·10¹⁰ steps: refused by the sample
/// limit before its steps are allocated, as are ranges whose arithmetic would overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_of_unbounded_steps_are_refused_before_they_allocate() {
    let s = Target::start(&[]).await;
    let t = format!("{}", T0 as f64 / 1000.0);
    for query in [
        "count_over_time(vector(1)[1y:1ms])",
        "count_over_time(vector(time())[1y:1ms])",
        "max_over_time((vector(1) + 1)[1y:1ms])",
        "count_over_time(vector(scalar(before))[1y:1ms])",
        "sum_over_time(vector(pi())[5y:1ms])",
        "count_over_time(absent(nothing)[1y:1ms])",
    ] {
        let started = Instant::now();
        let (status, body) = s.query(&[("query", query), ("time", t.as_str())]).await;
        assert_eq!(status, 422, "{query}: {body}");
        let (kind, message) = error_of(&body);
        assert_eq!(kind, "execution", "{query}: {body}");
        assert!(message.contains("too many samples"), "{query}: {body}");
        assert!(started.elapsed() < Duration::from_secs(5), "{query}");
    }
    // Times at Prometheus's extremes: no overflow, a clear refusal or an answer.
    for (start, end, step) in [
        (
            "-292273086-05-16T16:47:06Z",
            "292277025-08-18T07:12:54.999999999Z",
            "1",
        ),
        ("-9223372036854775", "9223372036854775", "1000000000"),
    ] {
        let (status, body) = s
            .query_range(&[
                ("query", "before"),
                ("start", start),
                ("end", end),
                ("step", step),
            ])
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(error_of(&body).1.contains("11,000 points"), "{body}");
    }
    for query in [
        "before offset -300000000y",
        "count_over_time(before[1y:1ms] offset 292y)",
        "before @ 9223372036854775",
        "count_over_time(vector(1)[1ms:1ms] @ -9223372036854775 offset 1y)",
    ] {
        let (status, body) = s.query(&[("query", query), ("time", t.as_str())]).await;
        assert!(
            status == 200 || status == 400 || status == 422,
            "{query}: {status} {body}"
        );
    }
    // A range the parser cannot hold in a Duration (it panicked; found by fuzzing).
    let query = format!("up[5{}]", "6".repeat(60));
    let (status, body) = s.query(&[("query", &query), ("time", t.as_str())]).await;
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).1.contains("out of range"), "{body}");
    s.assert_healthy(200).await;
}

/// A query that runs past its timeout stops, answers 503 `timeout`, and stops using CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_its_timeout_stops_within_a_second() {
    let s = Target::start(&[]).await;
    let t = format!("{}", T0 as f64 / 1000.0);
    // 3·10¹⁰ steps over one series with a sample: points only near it, so the sample limit
    // never trips and only the deadline stops the loop.
    let started = Instant::now();
    let (status, body) = s
        .query(&[
            ("query", "count_over_time(before[100y:1ms])"),
            ("time", t.as_str()),
            ("timeout", "1s"),
        ])
        .await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_of(&body).0, "timeout", "{body}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    let cpu = s.cpu_secs();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = s.cpu_secs() - cpu;
    assert!(spent < 0.5, "{spent} CPU seconds spent after the timeout");
    s.assert_healthy(200).await;
}

/// Deeply nested text is refused before the parser recurses; text at the nesting limit of
/// every shape parses, plans and evaluates without exhausting a stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_queries_are_refused_and_the_deepest_allowed_ones_answer() {
    let s = Target::start(&[]).await;
    let t = format!("{}", (T0 + 300_000) as f64 / 1000.0);
    let deep = |open: &str, inner: &str, close: &str, n: usize| {
        format!("{}{inner}{}", open.repeat(n), close.repeat(n))
    };
    // Under the body limit, far over the query limits.
    let hostile = [
        deep("(", "1", ")", 1_000_000),
        deep("-", "1", "", 2_000_000),
        deep("", "1", "+1", 1_000_000),
        deep("sum(", "before", ")", 200_000),
        deep("", "before", "[1m:]", 100_000),
    ];
    for query in &hostile {
        let (status, body) = s.query(&[("query", query), ("time", t.as_str())]).await;
        assert_eq!(status, 400, "{}: {body}", &query[..20]);
        assert_eq!(error_of(&body).0, "bad_data");
    }
    // Within the length limit, over the depth limit.
    let (status, body) = s
        .query(&[("query", &deep("(", "1", ")", 5_000)), ("time", t.as_str())])
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body).1.contains("nests deeper than 200"),
        "{body}"
    );
    let (status, body) = s
        .query(&[
            ("query", &deep("(", "1", ")", 40_000)),
            ("time", t.as_str()),
        ])
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body)
            .1
            .contains("exceeds the limit of 65536 bytes"),
        "{body}"
    );
    s.assert_healthy(200).await;

    // The deepest queries the ceiling allows (a larger setting is clamped to it), each
    // shape, over data: they answer (or fail as PromQL says), and the process survives them
    // on its threads' stacks.
    let s = Target::start(&["--query-max-depth", "100000"]).await;
    let (status, body) = s
        .query(&[("query", &deep("(", "1", ")", 1_001)), ("time", t.as_str())])
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body).1.contains("nests deeper than 1000"),
        "{body}"
    );
    let allowed = [
        deep("(", "before", ")", 999),
        deep("-", "before", "", 999),
        deep("", "before", " + before", 998),
        deep("sum(", "before", ")", 999),
        deep("abs(", "before", ")", 999),
        deep("max_over_time(", "before", "[5m:1m])", 499),
        deep("", "1", " * 1", 998),
        deep("-(", "before", ")", 499),
        deep("sum(before + ", "before", ")", 330),
        deep(
            "label_replace(",
            "before",
            ", \"a\", \"b\", \"c\", \"d\")",
            999,
        ),
    ];
    for query in &allowed {
        let (status, body) = s.query(&[("query", query), ("time", t.as_str())]).await;
        assert!(
            status == 200 || status == 422,
            "{}: {status} {body}",
            &query[..20]
        );
        let (status, body) = s
            .query_range(&[
                ("query", query),
                ("start", "1700000000"),
                ("end", "1700000600"),
                ("step", "15"),
            ])
            .await;
        assert!(
            status == 200 || status == 422,
            "{}: {status} {body}",
            &query[..20]
        );
        let (status, body) = crate::support::post_form(
            &s.http,
            &format!("{}/api/v1/format_query", s.base),
            &[("query", query)],
        )
        .await;
        assert_eq!(status, 200, "{}: {body}", &query[..20]);
    }
    s.assert_healthy(200).await;
}

/// A second server on the same data directory fails at start, naming the first; the first
/// goes on serving what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_directory_fails_at_start() {
    let s = Target::start(&[]).await;
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_secumon"))
        .args(["serve", "--storage", &s._dir.path().display().to_string()])
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--otlp-grpc-listen", "", "--otlp-http-listen", ""])
        .output()
        .expect("run a second server");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!(
            "is in use by another SecuMon server (pid {})",
            s.process.pid()
        )),
        "{stderr}"
    );
    s.assert_healthy(200).await;
}

/// A storage failure reaches the client as a short message and an id; the SQL and the
/// database's own words stay in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_errors_reach_clients_as_a_message_and_a_request_id() {
    use sqlx::Connection;
    let s = crate::support::Secumon::start_on(crate::support::Backend::Postgres, |_| {}).await;
    let url = s.database_url.clone().expect("a PostgreSQL database");
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::Executor::execute(&mut admin, "ALTER TABLE series RENAME TO series_moved")
        .await
        .unwrap();
    let (status, body) = s
        .get_json("/api/v1/query", &[("query", "up"), ("time", "1700000000")])
        .await;
    assert!(status >= 500, "{status} {body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("request id"), "{message}");
    assert!(
        !message.contains("series") && !message.contains("relation"),
        "{message}"
    );
    let (status, text) = s
        .write_raw(encode(&request(
            vec![series(&[("__name__", "m")], &[(T0, 1.0)])],
            vec![],
        )))
        .await;
    assert!(status >= 500, "{status} {text}");
    assert!(text.contains("request id"), "{text}");
    assert!(!text.contains("relation"), "{text}");
}

/// Clients that hold connections on purpose: headers sent a byte at a time, a body that
/// never completes, idle keep-alive connections. Each is closed within its timeout, and the
/// connection limit is taken back, so normal clients get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_the_connection_limit_recovers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let grpc_port = free_port();
    let grpc_listen = format!("127.0.0.1:{grpc_port}");
    let s = Target::start(&[
        "--otlp-grpc-listen",
        &grpc_listen,
        "--http-max-connections",
        "6",
        "--http-header-timeout-secs",
        "1",
        "--http-body-timeout-secs",
        "2",
        "--http-idle-timeout-secs",
        "2",
    ])
    .await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    // Every connection the limit allows, each in the middle of its headers.
    let mut slow = Vec::new();
    for _ in 0..6 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /api/v1/query?query=up HTTP/1.1\r\n")
            .await
            .unwrap();
        slow.push(c);
    }
    // A normal client waits for a free connection, then is answered: within the header
    // timeout and a watchdog tick or two, not forever.
    let started = Instant::now();
    let (status, body) = s
        .query(&[("query", "sum(before)"), ("time", "1700000300")])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["result"][0]["value"][1], "19", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    for mut c in slow {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "slow header connection still open"
        );
    }
    // A body that never completes: 408 after the body timeout.
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    c.write_all(
        b"POST /api/v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nquery=up",
    )
    .await
    .unwrap();
    let mut answer = vec![0; 64];
    let n = c.read(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // An idle keep-alive connection is closed after the idle timeout.
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = c.read(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
    // The rest of the response, then the end of the stream.
    assert!(
        matches!(read, Ok(Ok(_))),
        "idle connection not closed: {read:?}"
    );
    assert!(rest.ends_with(b"OK"), "{}", String::from_utf8_lossy(&rest));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1_500), "{took:?}");

    // gRPC: every connection slot taken by clients that never send a byte or stop within
    // the HTTP/2 preface; a real export gets through once they are dropped at the header
    // timeout.
    let mut silent = Vec::new();
    for i in 0..6 {
        let mut c = tokio::net::TcpStream::connect(&grpc_listen).await.unwrap();
        if i % 2 == 0 {
            c.write_all(b"PRI * HTTP/2.0").await.unwrap();
        }
        silent.push(c);
    }
    let started = Instant::now();
    let addr: std::net::SocketAddr = grpc_listen.parse().unwrap();
    let exported = tokio::time::timeout(
        Duration::from_secs(10),
        crate::support::raw_grpc::export(addr, Vec::new()),
    )
    .await
    .expect("the export got a connection");
    exported.expect("an empty export is taken");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // Those that stopped within the preface were closed by the server, not left to hyper.
    for (i, c) in silent.iter_mut().enumerate().filter(|(i, _)| i % 2 == 0) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), c.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "connection {i} stopped within the preface is still open: {read:?}"
        );
    }
    drop(silent);
    s.assert_healthy(200).await;
}

/// OTLP over gRPC takes no larger message than OTLP over HTTP: the same body limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_messages_have_the_http_body_limit() {
    let s = crate::support::Secumon::start_on(crate::support::Backend::Embedded, |c| {
        c.ingest.max_request_bytes = 100_000;
    })
    .await;
    // An unknown field of n bytes: valid protobuf with nothing to store.
    let message = |n: usize| {
        let mut len = n;
        let mut varint = Vec::new();
        while len >= 0x80 {
            varint.push((len as u8) | 0x80);
            len >>= 7;
        }
        varint.push(len as u8);
        let mut body = vec![0x9a, 0x06]; // field 99, length-delimited
        body.extend(varint);
        body.resize(body.len() + n, b'x');
        body
    };
    let addr = s.server.otlp_grpc_addr.unwrap();
    crate::support::raw_grpc::export(addr, message(90_000))
        .await
        .expect("a message under the limit is taken");
    let status = crate::support::raw_grpc::export(addr, message(150_000))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("larger than 100000 bytes"),
        "{status:?}"
    );
    let http = s
        .http
        .post(format!(
            "http://{}/v1/metrics",
            s.server.otlp_http_addr.unwrap()
        ))
        .header("Content-Type", "application/x-protobuf")
        .body(message(150_000))
        .send()
        .await
        .unwrap();
    assert_eq!(http.status().as_u16(), 413);
}

impl Target {
    async fn write(&self, body: Vec<u8>) -> (u16, String) {
        let response = self
            .http
            .post(format!("{}/api/v1/write", self.base))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// The value of `query` at `t` (ms), if any series answers.
    async fn value_at(&self, query: &str, t: i64) -> Option<String> {
        let t = format!("{}", t as f64 / 1000.0);
        let (status, body) = self.query(&[("query", query), ("time", t.as_str())]).await;
        assert_eq!(status, 200, "{body}");
        body["data"]["result"][0]["value"][1]
            .as_str()
            .map(str::to_owned)
    }
}

/// Label limits refuse the series they bound and store the rest; a request past the series
/// limit is refused whole; samples too far ahead of the clock are refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_limits_refuse_what_they_bound_and_keep_the_rest() {
    let s = Target::start(&[]).await;
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("l{i:03}"), "v".into())).collect();
    let mut wide: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    wide.push(("__name__", "wide"));
    let long_value = "v".repeat(5_000);
    let long_name = "n".repeat(2_000);
    let body = encode(&request(
        vec![
            series(&[("__name__", "kept"), ("job", "a")], &[(T0, 7.0)]),
            series(&wide, &[(T0, 1.0)]),
            series(
                &[("__name__", "long_value"), ("a", &long_value)],
                &[(T0, 1.0)],
            ),
            series(
                &[("__name__", "long_name"), (&long_name, "v")],
                &[(T0, 1.0)],
            ),
        ],
        vec![],
    ));
    let (status, text) = s.write(body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("1 samples stored, 3 refused"), "{text}");
    assert!(
        text.contains("201 labels, more than the limit of 128"),
        "{text}"
    );
    assert_eq!(s.value_at("kept", T0).await.as_deref(), Some("7"));
    assert_eq!(s.value_at("wide", T0).await, None);
    let metrics = reqwest::get(format!("{}/metrics", s.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in [
        "too_many_labels",
        "label_value_too_long",
        "label_name_too_long",
    ] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "{reason} not counted"
        );
    }

    // Past the series limit: refused whole, nothing stored.
    let tiny: Vec<_> = (0..100_001)
        .map(|i| series(&[("__name__", "tiny"), ("i", &i.to_string())], &[(T0, 1.0)]))
        .collect();
    let (status, text) = s.write(encode(&request(tiny, vec![]))).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("more than 100000 time series"), "{text}");
    assert_eq!(s.value_at("count(tiny)", T0).await, None);

    // A day ahead of the clock: refused; now: stored.
    let now = chrono::Utc::now().timestamp_millis();
    let body = encode(&request(
        vec![series(
            &[("__name__", "clock")],
            &[(now, 1.0), (now + 86_400_000, 2.0)],
        )],
        vec![],
    ));
    let (status, text) = s.write(body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("too far in the future"), "{text}");
    assert_eq!(s.value_at("clock", now).await.as_deref(), Some("1"));
    s.assert_healthy(250).await;
}

/// Millions of invalid series in one body cost memory in proportion to the body: refusals
/// are counted by reason, not described one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_invalid_series_costs_memory_in_proportion_to_the_body() {
    let s = Target::start(&[
        "--ingest-max-series-per-request",
        "100000000",
        "--ingest-max-samples-per-request",
        "100000000",
    ])
    .await;
    // 6 bytes a series: a TimeSeries of one empty Label (so no metric name) and one sample
    // (a series without samples is not judged at all, as in Prometheus).
    let series_count = 4_000_000;
    let mut raw = Vec::with_capacity(series_count * 6);
    for _ in 0..series_count {
        raw.extend_from_slice(&[0x0a, 0x04, 0x0a, 0x00, 0x12, 0x00]);
    }
    let body = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
    let before = s.rss_mib();
    let (status, text) = s.write(body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("no metric name"), "{text}");
    assert!(text.len() < 1_000, "{} bytes of answer", text.len());
    // 24 MB of body; one description per series would have been about 400 MB.
    let grown = s.rss_mib().saturating_sub(before);
    assert!(grown < 150, "resident set grew by {grown} MiB");
    s.assert_healthy(300).await;
}

/// Exemplars are a bounded ring on every backend: past the limit the oldest go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exemplars_are_kept_up_to_the_limit_newest_first() {
    use crate::support::Backend;
    use secumon_proto::prometheus::{Exemplar, Label};
    for backend in [Backend::Embedded, Backend::Postgres] {
        let s = crate::support::Secumon::start_on(backend, |c| {
            c.embedded.max_exemplars = 3;
            c.postgres.max_exemplars = 3;
            c.postgres.lifecycle_interval_secs = 1;
        })
        .await;
        let mut with_exemplars = series(&[("__name__", "traced")], &[(T0, 1.0)]);
        with_exemplars.exemplars = (0..5)
            .map(|i| Exemplar {
                labels: vec![Label {
                    name: "trace_id".into(),
                    value: format!("t{i}"),
                }],
                value: i as f64,
                timestamp: T0 + i * 1000,
            })
            .collect();
        let (status, text) = s
            .write_raw(encode(&request(vec![with_exemplars], vec![])))
            .await;
        assert_eq!(status, 204, "{text}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = s
                .get_json(
                    "/api/v1/query_exemplars",
                    &[
                        ("query", "traced"),
                        ("start", "1699999999"),
                        ("end", "1700000100"),
                    ],
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let times: Vec<i64> = body["data"][0]["exemplars"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| (e["timestamp"].as_f64().unwrap() * 1000.0).round() as i64)
                        .collect()
                })
                .unwrap_or_default();
            if times == [T0 + 2000, T0 + 3000, T0 + 4000] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{backend:?}: exemplars {times:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Metadata endpoints run under the query limits: a slot of `--query-max-concurrency`, the
/// timeout, and `--query-max-series`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_endpoints_run_under_the_query_limits() {
    let s = Target::start(&["--query-max-concurrency", "1", "--query-max-series", "2"]).await;
    let more = encode(&request(
        vec![
            series(&[("__name__", "before"), ("job", "b")], &[(T0, 1.0)]),
            series(&[("__name__", "before"), ("job", "c")], &[(T0, 1.0)]),
        ],
        vec![],
    ));
    assert_eq!(s.write(more).await.0, 204);
    let get = |path: &'static str, params: Vec<(&'static str, &'static str)>| {
        let http = s.http.clone();
        let url = format!("{}{path}", s.base);
        async move { crate::support::get_json(&http, &url, &params).await }
    };
    for (path, params) in [
        ("/api/v1/series", vec![("match[]", "before")]),
        ("/api/v1/label/job/values", vec![]),
        ("/api/v1/status/tsdb", vec![]),
        ("/api/v1/query_exemplars", vec![("query", "before")]),
    ] {
        let (status, body) = get(path, params).await;
        if path == "/api/v1/query_exemplars" {
            // No exemplars: nothing to count.
            assert_eq!(status, 200, "{path}: {body}");
            continue;
        }
        assert_eq!(status, 422, "{path}: {body}");
        assert!(
            error_of(&body).1.contains("more than 2 series"),
            "{path}: {body}"
        );
    }
    // At the limit is allowed: two label names.
    let (status, body) = get("/api/v1/labels", vec![]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2, "{body}");
    // One slow query takes the only slot: a metadata read waits its timeout, then 503.
    let slow = {
        let http = s.http.clone();
        let url = format!("{}/api/v1/query", s.base);
        tokio::spawn(async move {
            crate::support::post_form(
                &http,
                &url,
                &[
                    ("query", "count_over_time(before[100y:1ms])"),
                    ("time", "1700000000"),
                    ("timeout", "4s"),
                ],
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let (status, body) = get(
        "/api/v1/series",
        vec![("match[]", "before{job=\"a\"}"), ("timeout", "1s")],
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_of(&body).0, "timeout", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.await.unwrap().0, 503);
    let (status, body) = get("/api/v1/series", vec![("match[]", "before{job=\"a\"}")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
}

/// Damaged data a query meets is reported in the answer's `warnings` and in `/metrics`, not
/// dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_data_met_by_a_query_is_reported_in_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().display().to_string();
    let port = free_port();
    let args = [
        "--retention-raw-days",
        "100000",
        "--embedded-flush-interval-secs",
        "1",
        "--embedded-out-of-order-window-secs",
        "1",
    ];
    let server = spawn_secumon(&storage, port, &args);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let series_count = 300;
    let all: Vec<_> = (0..series_count)
        .map(|i| {
            let samples: Vec<(i64, f64)> = (0..100).map(|j| (T0 + j * 60_000, j as f64)).collect();
            series(&[("__name__", "up"), ("job", &format!("j{i}"))], &samples)
        })
        .collect();
    let response = http
        .post(format!("{base}/api/v1/write"))
        .body(encode(&request(all, vec![])))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    // Wait for the block, then stop the server and flip a byte in its runs. A block is written
    // under `<name>.tmp` and renamed once whole (its `meta.json` last): only a renamed one counts.
    let blocks = dir.path().join("blocks");
    let find_block = || {
        std::fs::read_dir(&blocks).ok().and_then(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_none_or(|x| x != "tmp"))
                .filter(|p| p.join("meta.json").exists())
                .map(|p| p.join("chunks"))
                .find(|p| p.exists())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while find_block().is_none() {
        assert!(Instant::now() < deadline, "no block was flushed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(server);
    // Looked up again with the server stopped: a maintenance run in the meantime may have
    // compacted the first block into another.
    let chunks = find_block().expect("a block survives the stop");
    let mut bytes = std::fs::read(&chunks).unwrap();
    let footer = &bytes[bytes.len() - 32..];
    let index_offset = u64::from_le_bytes(footer[..8].try_into().unwrap()) as usize;
    bytes[index_offset / 2] ^= 0xff;
    std::fs::write(&chunks, &bytes).unwrap();
    let _server = spawn_secumon(&storage, port, &args);
    let (status, body) = crate::support::get_json(
        &http,
        &format!("{base}/api/v1/query"),
        &[("query", "count(up)"), ("time", "1700003000")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let count: usize = body["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(count < series_count, "{body}");
    let warnings = body["warnings"].as_array().expect("warnings");
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("damaged block runs skipped"),
        "{body}"
    );
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("secumon_query_warnings_total 1"),
        "{metrics}"
    );
}

/// The largest requests the default limits allow, of every kind, survive a SIGKILL and a
/// restart whole: no log record they make is too large for replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_allowed_requests_survive_a_restart() {
    use secumon_proto::prometheus::{Exemplar, Label};
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().display().to_string();
    let port = free_port();
    let args = ["--retention-raw-days", "100000"];
    let server = spawn_secumon(&storage, port, &args);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let write = |body: Vec<u8>| {
        let (http, url) = (http.clone(), format!("{base}/api/v1/write"));
        async move {
            let response = http.post(url).body(body).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
    };
    // The series limit: 100,000 series in one request.
    let wide: Vec<_> = (0..100_000)
        .map(|i| series(&[("__name__", "wide"), ("i", &i.to_string())], &[(T0, 1.0)]))
        .collect();
    let (status, text) = write(encode(&request(wide, vec![]))).await;
    assert_eq!(status, 204, "{text}");
    // As many samples as the decompressed body limit (32 MiB) holds at 18 bytes a sample:
    // 1,600,000 (8,000 series of 200).
    let samples: Vec<(i64, f64)> = (0..200).map(|i| (T0 + i * 1_000, i as f64)).collect();
    let big: Vec<_> = (0..8_000)
        .map(|i| series(&[("__name__", "big"), ("i", &i.to_string())], &samples))
        .collect();
    let (status, text) = write(encode(&request(big, vec![]))).await;
    assert_eq!(status, 204, "{text}");
    // Exemplars up to the per-series limit on 1,000 series: the whole ring.
    let traced: Vec<_> = (0..1_000)
        .map(|i| {
            let mut s = series(
                &[("__name__", "traced"), ("i", &i.to_string())],
                &[(T0, 1.0)],
            );
            s.exemplars = (0..100)
                .map(|j| Exemplar {
                    labels: vec![Label {
                        name: "trace_id".into(),
                        value: format!("{i}-{j}"),
                    }],
                    value: j as f64,
                    timestamp: T0 + j,
                })
                .collect();
            s
        })
        .collect();
    let (status, text) = write(encode(&request(traced, vec![]))).await;
    assert_eq!(status, 204, "{text}");

    // SIGKILL: nothing is flushed; everything comes back from the log.
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGKILL);
    }
    drop(server);
    let _server = spawn_secumon(&storage, port, &args);
    let value = |query: &'static str| {
        let (http, url) = (http.clone(), format!("{base}/api/v1/query"));
        async move {
            let (status, body) =
                crate::support::get_json(&http, &url, &[("query", query), ("time", "1700000300")])
                    .await;
            assert_eq!(status, 200, "{body}");
            body["data"]["result"][0]["value"][1]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
    };
    assert_eq!(value("count(wide)").await, "100000");
    assert_eq!(value("sum(count_over_time(big[10m]))").await, "1600000");
    let (status, body) = crate::support::get_json(
        &http,
        &format!("{base}/api/v1/query_exemplars"),
        &[
            ("query", "traced"),
            ("start", "1699999999"),
            ("end", "1700000001"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let kept: usize = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["exemplars"].as_array().unwrap().len())
        .sum();
    assert_eq!(kept, 100_000);
}

/// Past `--ingest-max-inflight-requests`, a request waits a second for a slot, then gets 503
/// with `Retry-After`; the requests holding the slots are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_requests_past_the_inflight_limit_are_asked_to_retry() {
    use sqlx::Connection;
    let s = crate::support::Secumon::start_on(crate::support::Backend::Postgres, |c| {
        c.ingest.max_inflight_requests = 1;
    })
    .await;
    let url = s.database_url.clone().expect("a PostgreSQL database");
    // Writes wait on this lock, so the first request holds the only slot.
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::Executor::execute(
        &mut admin,
        "BEGIN; LOCK TABLE samples IN ACCESS EXCLUSIVE MODE",
    )
    .await
    .unwrap();
    let first = {
        let (http, url) = (s.http.clone(), s.url("/api/v1/write"));
        let body = encode(&request(
            vec![series(&[("__name__", "held")], &[(T0, 1.0)])],
            vec![],
        ));
        tokio::spawn(async move { http.post(url).body(body).send().await.unwrap().status() })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let response = s
        .http
        .post(s.url("/api/v1/write"))
        .body(encode(&request(
            vec![series(&[("__name__", "later")], &[(T0, 1.0)])],
            vec![],
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    sqlx::Executor::execute(&mut admin, "COMMIT").await.unwrap();
    assert_eq!(first.await.unwrap().as_u16(), 204);
    let (status, text) = s
        .write_raw(encode(&request(
            vec![series(&[("__name__", "later")], &[(T0, 1.0)])],
            vec![],
        )))
        .await;
    assert_eq!(status, 204, "{text}");
}

/// A tenant's active series are bounded on every backend: past the limit a request's new
/// series are refused by name (remote-write 400, OTLP partial success) while its known series,
/// and every later sample of them, are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_series_past_the_tenant_limit_are_refused_and_known_ones_stored() {
    use crate::support::Backend;
    for backend in [Backend::Embedded, Backend::Postgres] {
        let s = crate::support::Secumon::start_on(backend, |c| {
            c.ingest.max_series_per_tenant = 100;
        })
        .await;
        let now = chrono::Utc::now().timestamp_millis() - 60_000;
        let named = |name: &str, n: usize, t: i64| -> Vec<_> {
            (0..n)
                .map(|i| series(&[("__name__", name), ("i", &i.to_string())], &[(t, 1.0)]))
                .collect()
        };
        let (status, text) = s
            .write_raw(encode(&request(named("known", 80, now), vec![])))
            .await;
        assert_eq!(status, 204, "{backend:?}: {text}");

        // 80 known series and 40 new ones: 20 new fit, 20 are refused.
        let mut body = named("known", 80, now + 1000);
        body.extend(named("fresh", 40, now + 1000));
        let (status, text) = s.write_raw(encode(&request(body, vec![]))).await;
        assert_eq!(status, 400, "{backend:?}: {text}");
        assert!(
            text.starts_with("100 samples stored, 20 refused; first refused: series {__name__=\"fresh\", i=\"20\"} is new and tenant default has 100 active series, the limit (--ingest-max-series-per-tenant)"),
            "{backend:?}: {text}"
        );
        let count = |q: &'static str| {
            let s = &s;
            async move {
                let t = format!("{}", (now + 1000) as f64 / 1000.0);
                let (status, body) = s
                    .get_json("/api/v1/query", &[("query", q), ("time", t.as_str())])
                    .await;
                assert_eq!(status, 200, "{body}");
                body["data"]["result"][0]["value"][1]
                    .as_str()
                    .unwrap_or("none")
                    .to_owned()
            }
        };
        assert_eq!(count("count(known)").await, "80", "{backend:?}");
        assert_eq!(count("count(fresh)").await, "20", "{backend:?}");

        // Over OTLP/HTTP: a new series is refused as a partial success naming the limit.
        let point = json_point(now + 2000);
        let (status, answer) = otlp_json(&s, "otlp_new", &point).await;
        assert_eq!(status, 200, "{backend:?}: {answer}");
        assert_eq!(
            answer["partialSuccess"]["rejectedDataPoints"], "1",
            "{backend:?}: {answer}"
        );
        assert!(
            answer["partialSuccess"]["errorMessage"]
                .as_str()
                .unwrap_or_default()
                .contains("--ingest-max-series-per-tenant"),
            "{backend:?}: {answer}"
        );

        // A refused series' exemplars go with it: dropped and counted.
        let mut traced = series(&[("__name__", "traced_new")], &[(now + 2000, 1.0)]);
        traced.exemplars = vec![secumon_proto::prometheus::Exemplar {
            labels: vec![secumon_proto::prometheus::Label {
                name: "trace_id".into(),
                value: "abc".into(),
            }],
            value: 1.0,
            timestamp: now + 2000,
        }];
        let (status, text) = s.write_raw(encode(&request(vec![traced], vec![]))).await;
        assert_eq!(status, 400, "{backend:?}: {text}");
        let (start, end) = (format!("{}", now / 1000), format!("{}", now / 1000 + 10));
        let (status, body) = s
            .get_json(
                "/api/v1/query_exemplars",
                &[("query", "traced_new"), ("start", &start), ("end", &end)],
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"], serde_json::json!([]), "{backend:?}: {body}");

        // Known series keep being stored at the limit.
        let (status, text) = s
            .write_raw(encode(&request(named("known", 80, now + 3000), vec![])))
            .await;
        assert_eq!(status, 204, "{backend:?}: {text}");
        let metrics = s.metrics_text().await;
        assert!(
            metrics.contains("secumon_active_series{tenant=\"default\"} 100"),
            "{backend:?}: {metrics}"
        );
        assert!(
            metrics.contains(
                "secumon_samples_rejected_total{protocol=\"remote_write\",reason=\"per_tenant_series_limit\"} 21"
            ),
            "{backend:?}: {metrics}"
        );
        assert!(
            metrics.contains("secumon_exemplars_dropped_total{protocol=\"remote_write\"} 1"),
            "{backend:?}: {metrics}"
        );
    }
}

/// One OTLP/JSON gauge point at `t_ms`.
fn json_point(t_ms: i64) -> serde_json::Value {
    serde_json::json!([{"timeUnixNano": (t_ms * 1_000_000).to_string(), "asDouble": 1.0}])
}

async fn otlp_json(
    s: &crate::support::Secumon,
    name: &str,
    points: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"resourceMetrics": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "limit"}}]},
        "scopeMetrics": [{"metrics": [{"name": name, "gauge": {"dataPoints": points}}]}]
    }]});
    let response = s
        .http
        .post(format!(
            "http://{}/v1/metrics",
            s.server.otlp_http_addr.unwrap()
        ))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// A sender at its tenant's limit that keeps naming new series costs neither memory nor
/// stored series: half a million refused series leave the resident set where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_series_at_the_limit_grows_nothing() {
    let s = Target::start(&["--ingest-max-series-per-tenant", "1000"]).await;
    let batch = |round: usize| {
        let all: Vec<_> = (0..100_000)
            .map(|i| {
                let i = (round * 100_000 + i).to_string();
                series(&[("__name__", "flood"), ("i", &i)], &[(T0, 1.0)])
            })
            .collect();
        encode(&request(all, vec![]))
    };
    let (status, text) = s.write(batch(0)).await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.starts_with("999 samples stored, 99001 refused"),
        "{text}"
    );
    let before = s.rss_mib();
    for round in 1..6 {
        let (status, text) = s.write(batch(round)).await;
        assert_eq!(status, 400, "{text}");
        assert!(
            text.starts_with("0 samples stored, 100000 refused"),
            "{text}"
        );
    }
    let grown = s.rss_mib().saturating_sub(before);
    assert!(grown < 64, "resident set grew by {grown} MiB");
    assert_eq!(s.value_at("count(flood)", T0).await.as_deref(), Some("999"));
    s.assert_healthy(300).await;
}
