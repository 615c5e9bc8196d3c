//! End to end: a real Prometheus 2.42 scrapes itself and node exporter and remote-writes
//! everything to SecuMon; then the same queries go to both and must get the same JSON; and
//! the requests Grafana's Prometheus data source makes get answers of the same shape.

use crate::support::{get_json, post_form, NodeExporter, Prometheus, Secumon};
use std::time::{Duration, Instant};

/// Selector queries answered as instant and as range queries.
const QUERIES: &[&str] = &[
    "up",
    "up{job=\"node\"}",
    "prometheus_build_info",
    "node_cpu_seconds_total{mode!=\"idle\"}",
    "{__name__=~\"node_load.*\"}",
    "{__name__=~\"prometheus_http_requests_total\", handler!~\"/api/.*\"}",
    "scrape_duration_seconds offset 2s",
    "process_resident_memory_bytes{job=\"prometheus\"} offset -1s",
    "node_memory_MemFree_bytes @ end()",
    "-up",
    "42",
    "time()",
    "vector(7)",
    "count_over_time(up[5s])",
];

/// Queries only an instant query can answer.
const INSTANT_ONLY: &[&str] = &["up[5s]", "node_load1[3s] offset 1s", "\"a string\""];

fn secs(t: i64) -> String {
    format!("{}.{:03}", t.div_euclid(1000), t.rem_euclid(1000))
}

/// Asks both servers until their answers agree (the remote-write queue may lag by a batch), or
/// fails with both answers.
async fn assert_same(
    http: &reqwest::Client,
    secumon: &Secumon,
    prometheus: &Prometheus,
    path: &str,
    params: &[(&str, &str)],
    post: bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ours, theirs) = if post {
            (
                post_form(http, &secumon.url(path), params).await,
                post_form(http, &prometheus.url(path), params).await,
            )
        } else {
            (
                get_json(http, &secumon.url(path), params).await,
                get_json(http, &prometheus.url(path), params).await,
            )
        };
        assert_eq!(
            theirs.0, 200,
            "Prometheus refused {path} {params:?}: {}",
            theirs.1
        );
        let nonempty = theirs.1["data"]["result"]
            .as_array()
            .is_none_or(|r| !r.is_empty());
        if ours == theirs && nonempty {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{} {path} {params:?} differs\nSecuMon:    {}\nPrometheus: {}",
                if post { "POST" } else { "GET" },
                ours.1,
                theirs.1
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SecuMon, node exporter, and a Prometheus 2.42 scraping itself and node exporter every second
/// and remote-writing everything to SecuMon, with ten seconds of data in both.
async fn start_pair() -> (Secumon, NodeExporter, Prometheus, reqwest::Client) {
    let secumon = Secumon::start().await;
    let node = NodeExporter::start();
    let write_url = secumon.url("/api/v1/write");
    let prometheus = Prometheus::start(|port| {
        format!(
            r#"
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
  - job_name: node
    static_configs: [{{targets: ["127.0.0.1:{node}"]}}]
remote_write:
  - url: {write_url}
    queue_config: {{batch_send_deadline: 500ms, min_backoff: 100ms, max_backoff: 1s}}
    metadata_config: {{send: true, send_interval: 1s}}
"#,
            node = node.port
        )
    });
    let http = reqwest::Client::new();
    // Prometheus applies scrape targets a few seconds after start; wait for its first scrape,
    // then let ten seconds of data accumulate.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, up) = get_json(&http, &prometheus.url("/api/v1/query"), &[("query", "up")]).await;
        if up["data"]["result"]
            .as_array()
            .is_some_and(|r| r.len() == 2)
        {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never scraped: {up}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    (secumon, node, prometheus, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_remote_writes_and_both_answer_alike() {
    let (secumon, _node, prometheus, http) = start_pair().await;
    let now = chrono::Utc::now().timestamp_millis();
    let t = secs(now - 3_000);
    let start = secs(now - 9_000);

    for &query in QUERIES.iter().chain(INSTANT_ONLY) {
        for post in [false, true] {
            assert_same(
                &http,
                &secumon,
                &prometheus,
                "/api/v1/query",
                &[("query", query), ("time", &t)],
                post,
            )
            .await;
        }
    }
    for &query in QUERIES {
        for (step, post) in [("1", false), ("2.5", true), ("2s", false)] {
            let params = [
                ("query", query),
                ("start", start.as_str()),
                ("end", t.as_str()),
                ("step", step),
            ];
            assert_same(
                &http,
                &secumon,
                &prometheus,
                "/api/v1/query_range",
                &params,
                post,
            )
            .await;
        }
    }
    let range = [("start", start.as_str()), ("end", t.as_str())];
    for (path, extra) in [
        (
            "/api/v1/series",
            vec![("match[]", "up"), ("match[]", "node_load1")],
        ),
        ("/api/v1/labels", vec![("match[]", "prometheus_build_info")]),
        ("/api/v1/label/job/values", vec![("match[]", "up")]),
        (
            "/api/v1/label/mode/values",
            vec![("match[]", "node_cpu_seconds_total")],
        ),
    ] {
        let params: Vec<(&str, &str)> = range.iter().copied().chain(extra).collect();
        assert_same(&http, &secumon, &prometheus, path, &params, false).await;
    }
    for metric in [
        "node_load1",
        "prometheus_http_requests_total",
        "prometheus_engine_query_duration_seconds",
    ] {
        assert_same(
            &http,
            &secumon,
            &prometheus,
            "/api/v1/metadata",
            &[("metric", metric)],
            false,
        )
        .await;
    }

    // Nothing Prometheus sent was refused.
    let metrics = secumon.metrics_text().await;
    assert!(
        !metrics.contains("secumon_samples_rejected_total{"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("handler=\"/api/v1/write\",code=\"4"),
        "{metrics}"
    );
    let (_, failed) = get_json(
        &http,
        &prometheus.url("/api/v1/query"),
        &[("query", "sum(prometheus_remote_storage_samples_failed_total) + sum(prometheus_remote_storage_samples_dropped_total)")],
    )
    .await;
    assert_eq!(failed["data"]["result"][0]["value"][1], "0", "{failed}");
}

/// A request Grafana makes: path, sent as form POST, parameters.
type GrafanaRequest<'a> = (&'a str, bool, Vec<(&'a str, &'a str)>);

/// A JSON value's shape: object keys with their values' shapes, an array's first element's
/// shape, and the type of anything else.
fn shape(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::{json, Value};
    match v {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => json!([items.first().map(shape)]),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => Value::Null,
    }
}

/// What Grafana's Prometheus data source (prometheusType Prometheus, version 2.42) sends: on
/// "Save & test" (an instant `1+1`, build info), on dashboard load and in the query editor
/// (rules, exemplars, the metrics browser's labels and label values with `match[]`, series,
/// metadata, range queries as form POST). SecuMon and Prometheus, fed the same data, must answer
/// each with the same status and the same shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_data_source_requests_get_prometheus_shaped_answers() {
    let (secumon, _node, prometheus, http) = start_pair().await;
    let now = chrono::Utc::now().timestamp_millis();
    let (start, end) = (secs(now - 9_000), secs(now - 3_000));
    let requests: Vec<GrafanaRequest> = vec![
        (
            "/api/v1/query",
            true,
            vec![("query", "1+1"), ("time", &end)],
        ),
        ("/api/v1/status/buildinfo", false, vec![]),
        ("/api/v1/rules", false, vec![]),
        ("/api/v1/alerts", false, vec![]),
        (
            "/api/v1/query_exemplars",
            true,
            vec![("query", "node_load1"), ("start", &start), ("end", &end)],
        ),
        (
            "/api/v1/labels",
            false,
            vec![("start", &start), ("end", &end)],
        ),
        (
            "/api/v1/label/__name__/values",
            false,
            vec![("start", &start), ("end", &end)],
        ),
        (
            "/api/v1/label/job/values",
            false,
            vec![("match[]", "up"), ("start", &start), ("end", &end)],
        ),
        (
            "/api/v1/series",
            true,
            vec![("match[]", "node_load1"), ("start", &start), ("end", &end)],
        ),
        ("/api/v1/metadata", false, vec![("limit", "5")]),
        ("/api/v1/metadata", false, vec![("metric", "node_load1")]),
        (
            "/api/v1/query_range",
            true,
            vec![
                ("query", "sum by (mode) (rate(node_cpu_seconds_total[4s]))"),
                ("start", &start),
                ("end", &end),
                ("step", "1"),
            ],
        ),
    ];
    for (path, post, params) in requests {
        let (ours, theirs) = if post {
            (
                post_form(&http, &secumon.url(path), &params).await,
                post_form(&http, &prometheus.url(path), &params).await,
            )
        } else {
            (
                get_json(&http, &secumon.url(path), &params).await,
                get_json(&http, &prometheus.url(path), &params).await,
            )
        };
        assert_eq!(
            ours.0, theirs.0,
            "{path} {params:?}: status\nSecuMon: {}\nPrometheus: {}",
            ours.1, theirs.1
        );
        // Metadata is keyed by metric name, and a `limit` picks any of them: its shape is the
        // shape of one entry.
        let one_entry = |mut v: serde_json::Value| {
            if path == "/api/v1/metadata" {
                let first = v["data"]
                    .as_object()
                    .and_then(|m| m.values().next().cloned());
                v["data"] = serde_json::json!({ "<metric>": first });
            }
            v
        };
        assert_eq!(
            shape(&one_entry(ours.1.clone())),
            shape(&one_entry(theirs.1.clone())),
            "{path} {params:?}: shape\nSecuMon: {}\nPrometheus: {}",
            ours.1,
            theirs.1
        );
    }
}
