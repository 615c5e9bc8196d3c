//! The Prometheus HTTP API of SecuMon over real HTTP: envelopes, parameters, errors.

use crate::support::remote_write::{encode, request, series};
use crate::support::Secumon;
use serde_json::json;

const T0: i64 = 1_700_000_000_000;

async fn loaded() -> Secumon {
    let s = Secumon::start().await;
    let samples: Vec<(i64, f64)> = (0..20).map(|i| (T0 + i * 15_000, i as f64)).collect();
    let body = encode(&request(
        vec![
            series(
                &[
                    ("__name__", "node_load1"),
                    ("instance", "a:9100"),
                    ("job", "node"),
                ],
                &samples,
            ),
            series(
                &[
                    ("__name__", "node_load1"),
                    ("instance", "b:9100"),
                    ("job", "node"),
                ],
                &samples[..4],
            ),
            series(
                &[("__name__", "up"), ("instance", "a:9100"), ("job", "node")],
                &samples,
            ),
        ],
        vec![],
    ));
    let (status, text) = s.write_raw(body).await;
    assert_eq!(status, 204, "{text}");
    s
}

fn secs(t: i64) -> String {
    format!("{}", t as f64 / 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_form_post_answer_the_same() {
    let s = loaded().await;
    let t = secs(T0 + 60_000);
    let params = [
        ("query", "node_load1{instance=~\"a.*\"}"),
        ("time", t.as_str()),
    ];
    let (status, get) = s.get_json("/api/v1/query", &params).await;
    assert_eq!(status, 200);
    let (status, post) = s.post_form("/api/v1/query", &params).await;
    assert_eq!(status, 200);
    assert_eq!(get, post);
    assert_eq!(
        get,
        json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"__name__": "node_load1", "instance": "a:9100", "job": "node"}, "value": [1_700_000_060, "4"]}
        ]}})
    );

    let start = secs(T0);
    let end = secs(T0 + 120_000);
    let range = [
        ("query", "node_load1"),
        ("start", start.as_str()),
        ("end", end.as_str()),
        ("step", "60s"),
    ];
    let (status, get) = s.get_json("/api/v1/query_range", &range).await;
    assert_eq!(status, 200);
    let (_, post) = s.post_form("/api/v1/query_range", &range).await;
    assert_eq!(get, post);
    assert_eq!(
        get["data"]["result"],
        json!([
            {"metric": {"__name__": "node_load1", "instance": "a:9100", "job": "node"},
             "values": [[1_700_000_000, "0"], [1_700_000_060, "4"], [1_700_000_120, "8"]]},
            {"metric": {"__name__": "node_load1", "instance": "b:9100", "job": "node"},
             "values": [[1_700_000_000, "0"], [1_700_000_060, "3"], [1_700_000_120, "3"]]},
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_offset_at_and_literals() {
    let s = loaded().await;
    let t = secs(T0 + 150_000);
    let q = |query: &'static str| {
        let t = t.clone();
        let s = &s;
        async move {
            let (status, body) = s
                .get_json("/api/v1/query", &[("query", query), ("time", t.as_str())])
                .await;
            assert_eq!(status, 200, "{query}: {body}");
            body["data"].clone()
        }
    };
    let value = |data: &serde_json::Value| data["result"][0]["value"][1].clone();
    assert_eq!(value(&q("up offset 1m").await), "6");
    assert_eq!(value(&q("up offset -1m").await), "14");
    assert_eq!(value(&q("up @ 1700000030").await), "2");
    assert_eq!(value(&q("up @ 1700000030 offset 15s").await), "1");
    assert_eq!(value(&q("up{job!=\"x\", instance!~\"b.*\"}").await), "10");
    assert_eq!(
        q("42").await,
        json!({"resultType": "scalar", "result": [1_700_000_150, "42"]})
    );
    assert_eq!(
        q("\"hello\"").await,
        json!({"resultType": "string", "result": [1_700_000_150, "hello"]})
    );
    assert_eq!(
        q("-up").await["result"][0]["metric"],
        json!({"instance": "a:9100", "job": "node"})
    );
    let matrix = q("up[30s]").await;
    assert_eq!(matrix["resultType"], "matrix");
    assert_eq!(
        matrix["result"][0]["values"],
        json!([
            [1_700_000_120, "8"],
            [1_700_000_135, "9"],
            [1_700_000_150, "10"]
        ]),
        "a 2.x range selector includes both ends"
    );
    assert_eq!(value(&q("count_over_time(up[1m])").await), "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_labels_and_values() {
    let s = loaded().await;
    let (status, body) = s
        .get_json(
            "/api/v1/series",
            &[("match[]", "node_load1"), ("match[]", "up")],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().unwrap().len(), 3);
    // Series with no sample in the range are left out.
    let late = secs(T0 + 100_000);
    let (_, body) = s
        .get_json(
            "/api/v1/series",
            &[("match[]", "node_load1"), ("start", late.as_str())],
        )
        .await;
    assert_eq!(
        body["data"],
        json!([{"__name__": "node_load1", "instance": "a:9100", "job": "node"}])
    );
    let (_, body) = s.get_json("/api/v1/labels", &[]).await;
    assert_eq!(body["data"], json!(["__name__", "instance", "job"]));
    let (_, body) = s
        .get_json("/api/v1/label/instance/values", &[("match[]", "up")])
        .await;
    assert_eq!(body["data"], json!(["a:9100"]));
    let (_, body) = s
        .get_json("/api/v1/label/__name__/values", &[("limit", "1")])
        .await;
    assert_eq!(body["data"], json!(["node_load1"]));
    let (_, body) = s.post_form("/api/v1/labels", &[("match[]", "up")]).await;
    assert_eq!(body["data"], json!(["__name__", "instance", "job"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_get_prometheus_errors() {
    let s = loaded().await;
    // (path, parameters, status, errorType, part of the message)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        ("/api/v1/query", vec![("query", "up{")], 400, "bad_data", "invalid parameter \"query\""),
        ("/api/v1/query", vec![("query", "")], 400, "bad_data", "invalid parameter \"query\""),
        ("/api/v1/query", vec![("query", "up"), ("time", "yesterday")], 400, "bad_data", "cannot parse \"yesterday\" to a valid timestamp"),
        ("/api/v1/query", vec![("query", "up"), ("timeout", "soon")], 400, "bad_data", "cannot parse \"soon\" to a valid duration"),
        ("/api/v1/query_range", vec![("query", "up"), ("start", "0"), ("end", "100000"), ("step", "1")], 400, "bad_data", "exceeded maximum resolution of 11,000 points per timeseries"),
        ("/api/v1/query_range", vec![("query", "up"), ("start", "10"), ("end", "0"), ("step", "1")], 400, "bad_data", "end timestamp must not be before start time"),
        ("/api/v1/query_range", vec![("query", "up"), ("start", "0"), ("end", "10"), ("step", "0")], 400, "bad_data", "zero or negative query resolution step widths"),
        ("/api/v1/query_range", vec![("query", "up"), ("start", "0"), ("end", "10"), ("step", "1x")], 400, "bad_data", "invalid parameter \"step\""),
        ("/api/v1/query_range", vec![("query", "up"), ("end", "10"), ("step", "1")], 400, "bad_data", "invalid parameter \"start\""),
        ("/api/v1/query_range", vec![("query", "up[5m]"), ("start", "0"), ("end", "10"), ("step", "1")], 400, "bad_data", "invalid expression type \"range vector\" for range query, must be Scalar or instant Vector"),
        ("/api/v1/query_range", vec![("query", "\"s\""), ("start", "0"), ("end", "10"), ("step", "1")], 400, "bad_data", "invalid expression type \"string\""),
        ("/api/v1/series", vec![], 400, "bad_data", "no match[] parameter provided"),
        ("/api/v1/series", vec![("match[]", "{job=~\".*\"}")], 400, "bad_data", "at least one non-empty matcher"),
        ("/api/v1/label/1bad/values", vec![], 400, "bad_data", "invalid label name: \"1bad\""),
        ("/api/v1/metadata", vec![("limit", "x")], 400, "bad_data", "limit must be a number"),
    ];
    for (path, params, code, error_type, message) in cases {
        let (status, body) = s.get_json(path, &params).await;
        assert_eq!(status, code, "{path} {params:?}: {body}");
        assert_eq!(body["status"], "error");
        assert_eq!(body["errorType"], error_type, "{path} {params:?}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(message),
            "{path} {params:?}: {error:?} lacks {message:?}"
        );
    }
    // The server still answers.
    let (status, _) = s.get_json("/api/v1/query", &[("query", "up")]).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_limit_fails_a_query_with_execution_error() {
    let s = {
        let s = Secumon::start_with(|c| c.query.max_samples = 10).await;
        let samples: Vec<(i64, f64)> = (0..20).map(|i| (T0 + i * 15_000, i as f64)).collect();
        let (status, _) = s
            .write_raw(encode(&request(
                vec![series(&[("__name__", "m")], &samples)],
                vec![],
            )))
            .await;
        assert_eq!(status, 204);
        s
    };
    let t = secs(T0 + 300_000);
    let (status, body) = s
        .get_json(
            "/api/v1/query",
            &[("query", "m[10m]"), ("time", t.as_str())],
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["errorType"], "execution");
    assert_eq!(
        body["error"],
        "query processing would load too many samples into memory in query execution"
    );
    // Within the limit it answers.
    let (status, _) = s
        .get_json("/api/v1/query", &[("query", "m[1m]"), ("time", t.as_str())])
        .await;
    assert_eq!(status, 200);
    let metrics = s.metrics_text().await;
    let refused = r#"secumon_queries_refused_total{reason="too_many_samples"} 1"#;
    assert!(metrics.contains(refused), "{refused} not in:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_metrics_and_buildinfo() {
    let s = loaded().await;
    let health = s.http.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = s.http.get(s.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let (_, _) = s.get_json("/api/v1/query", &[("query", "up")]).await;
    let metrics = s.metrics_text().await;
    for expected in [
        r#"secumon_samples_ingested_total{protocol="remote_write"} 44"#,
        r#"secumon_http_requests_total{handler="/api/v1/write",code="204"} 1"#,
        r#"secumon_query_duration_seconds_count{kind="instant"} 1"#,
    ] {
        assert!(metrics.contains(expected), "{expected} not in:\n{metrics}");
    }
    let (status, body) = s.get_json("/api/v1/status/buildinfo", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["version"], env!("CARGO_PKG_VERSION"));
}

/// The server records what `/metrics` shows into its own storage, as `job="secumon"` of the
/// configured tenant, with the exposition's metadata; other tenants do not see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_records_its_own_metrics() {
    let s = Secumon::start_with(|c| {
        c.self_monitor.interval_secs = 1;
        c.self_monitor.tenant = "ops".into();
        // Tenants are told apart by a trusted proxy's X-Scope-OrgID.
        c.auth.mode = secumon::auth::AuthMode::On;
        c.auth.trusted_proxies = "127.0.0.0/8".into();
    })
    .await;
    let port = s.server.addr.port();
    // A GET in `tenant`, named by the trusted proxy's header; its JSON.
    let in_tenant = |tenant: &'static str, path: &str, params: Vec<(&'static str, &str)>| {
        let request = s
            .http
            .get(s.url(path))
            .header("X-Scope-OrgID", tenant)
            .query(&params);
        async move {
            request
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Two recordings, so a rate has two points.
    let query = r#"rate(secumon_http_requests_total{job="secumon"}[10s])"#;
    let body = loop {
        let body = in_tenant("ops", "/api/v1/query", vec![("query", query)]).await;
        if body["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no recording of {query}: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    let series = &body["data"]["result"][0]["metric"];
    let instance = series["instance"].as_str().unwrap();
    assert!(instance.ends_with(&format!(":{port}")), "{series}");
    for query in [
        r#"process_resident_memory_bytes{job="secumon"} > 1e6"#,
        r#"process_cpu_seconds_total{job="secumon"} > 0"#,
        r#"secumon_queries_refused_total{job="secumon",reason="timeout"} == 0"#,
        r#"secumon_storage_series_in_memory{job="secumon"}"#,
    ] {
        let body = in_tenant("ops", "/api/v1/query", vec![("query", query)]).await;
        assert_eq!(
            body["data"]["result"].as_array().map(Vec::len),
            Some(1),
            "{query}: {body}"
        );
    }
    let metadata = in_tenant(
        "ops",
        "/api/v1/metadata",
        vec![("metric", "process_cpu_seconds")],
    )
    .await;
    assert_eq!(
        metadata["data"]["process_cpu_seconds"][0]["type"], "counter",
        "{metadata}"
    );
    // Not in another tenant.
    let body = in_tenant(
        "default",
        "/api/v1/query",
        vec![("query", "process_cpu_seconds_total")],
    )
    .await;
    assert_eq!(body["data"]["result"], serde_json::json!([]), "{body}");
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains(r#"secumon_samples_ingested_total{protocol="self"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_fails_when_the_database_is_gone() {
    let s = Secumon::start_on(crate::support::Backend::Postgres, |_| {}).await;
    let url = s.database_url.clone().expect("a PostgreSQL database");
    let name = url.rsplit('/').next().unwrap().to_owned();
    use sqlx::Connection;
    let mut admin =
        sqlx::PgConnection::connect(&crate::support::Postgres::shared().url("postgres"))
            .await
            .unwrap();
    sqlx::Executor::execute(
        &mut admin,
        format!("DROP DATABASE {name} WITH (FORCE)").as_str(),
    )
    .await
    .unwrap();
    let ready = s.http.get(s.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    // The remote-write answer is one a sender retries.
    let (status, text) = s
        .write_raw(encode(&request(
            vec![series(&[("__name__", "m")], &[(T0, 1.0)])],
            vec![],
        )))
        .await;
    assert!(status >= 500, "{status} {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_format_and_exemplar_endpoints() {
    let s = loaded().await;
    let (status, body) = s
        .get_json(
            "/api/v1/format_query",
            &[("query", "sum by(job)(rate(up[5m]))")],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], "sum by (job) (rate(up[5m]))");
    let (status, body) = s
        .post_form("/api/v1/format_query", &[("query", "sum(")])
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errorType"], "bad_data");

    let (status, body) = s
        .get_json("/api/v1/query_exemplars", &[("query", "up")])
        .await;
    assert_eq!((status, body["data"].clone()), (200, json!([])));

    let (_, body) = s.get_json("/api/v1/status/flags", &[]).await;
    assert_eq!(body["data"]["query.lookback-delta"], "300s");
    let (_, body) = s.get_json("/api/v1/status/runtimeinfo", &[]).await;
    assert!(
        body["data"]["startTime"].as_str().unwrap().ends_with('Z'),
        "{body}"
    );
    let (_, body) = s.get_json("/api/v1/status/tsdb", &[]).await;
    assert_eq!(body["data"]["headStats"]["numSeries"], 3);
    assert_eq!(
        body["data"]["seriesCountByMetricName"],
        json!([{"name": "node_load1", "value": 2}, {"name": "up", "value": 1}])
    );
    assert_eq!(
        body["data"]["labelValueCountByLabelName"][0],
        json!({"name": "__name__", "value": 2})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_beyond_the_concurrency_limit_wait_their_turn() {
    let s = Secumon::start_with(|c| c.query.max_concurrency = 1).await;
    let samples: Vec<(i64, f64)> = (0..200).map(|i| (T0 + i * 15_000, i as f64)).collect();
    let (status, _) = s
        .write_raw(encode(&request(
            vec![series(&[("__name__", "m")], &samples)],
            vec![],
        )))
        .await;
    assert_eq!(status, 204);
    let (start, end) = (secs(T0), secs(T0 + 3_000_000));
    let params = [
        ("query", "rate(m[5m])"),
        ("start", start.as_str()),
        ("end", end.as_str()),
        ("step", "15"),
    ];
    let answers =
        futures::future::join_all((0..6).map(|_| s.get_json("/api/v1/query_range", &params))).await;
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["data"]["result"][0]["values"]
                .as_array()
                .unwrap()
                .len(),
            200
        );
    }
}
