//! Remote-write 1.0 over real HTTP into PostgreSQL, read back through the query API.

use crate::support::remote_write::{encode, request, series};
use crate::support::Secumon;
use secumon_proto::prometheus::{metric_metadata::MetricType, MetricMetadata};
use serde_json::json;

const T0: i64 = 1_700_000_000_000;
const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

fn secs(t: i64) -> String {
    format!("{}", t as f64 / 1000.0)
}

/// The value of `query` at `t` as (labels, value) pairs.
async fn instant(s: &Secumon, query: &str, t: i64) -> Vec<(serde_json::Value, String)> {
    let (status, body) = s
        .get_json("/api/v1/query", &[("query", query), ("time", &secs(t))])
        .await;
    assert_eq!(status, 200, "{body}");
    body["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metric"].clone(),
                r["value"][1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn write_ok(s: &Secumon, body: Vec<u8>) {
    let (status, text) = s.write_raw(body).await;
    assert_eq!(status, 204, "write refused: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_land_and_read_back_exactly() {
    let s = Secumon::start().await;
    write_ok(
        &s,
        encode(&request(
            vec![
                // Unsorted labels are sorted, as Prometheus does.
                series(
                    &[
                        ("job", "api"),
                        ("__name__", "http_requests_total"),
                        ("code", "200"),
                    ],
                    &[(T0, 1.0), (T0 + 15_000, 2.5)],
                ),
                series(
                    &[
                        ("__name__", "http_requests_total"),
                        ("job", "api"),
                        ("code", "500"),
                    ],
                    &[(T0, 1e-7)],
                ),
            ],
            vec![],
        )),
    )
    .await;
    let got = instant(&s, "http_requests_total", T0 + 20_000).await;
    assert_eq!(
        got,
        vec![
            (
                json!({"__name__": "http_requests_total", "code": "200", "job": "api"}),
                "2.5".to_owned()
            ),
            (
                json!({"__name__": "http_requests_total", "code": "500", "job": "api"}),
                "1e-07".to_owned()
            ),
        ]
    );
    // Five-minute lookback: gone 5 min after the last sample, present at exactly 5 min.
    assert_eq!(
        instant(
            &s,
            "http_requests_total{code=\"200\"}",
            T0 + 15_000 + 300_000
        )
        .await
        .len(),
        1
    );
    assert!(instant(
        &s,
        "http_requests_total{code=\"200\"}",
        T0 + 15_000 + 300_001
    )
    .await
    .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staleness_markers_end_a_series_and_survive_storage() {
    let s = Secumon::start().await;
    let stale = f64::from_bits(STALE_NAN);
    write_ok(
        &s,
        encode(&request(
            vec![
                series(
                    &[("__name__", "up"), ("job", "a")],
                    &[(T0, 1.0), (T0 + 15_000, stale)],
                ),
                series(&[("__name__", "up"), ("job", "b")], &[(T0, f64::NAN)]),
            ],
            vec![],
        )),
    )
    .await;
    let before = instant(&s, "up", T0 + 10_000).await;
    assert_eq!(before.len(), 2);
    assert_eq!(before[1].1, "NaN", "an ordinary NaN is a value");
    let after = instant(&s, "up", T0 + 20_000).await;
    assert_eq!(after.len(), 1, "the stale marker hides job=a: {after:?}");
    assert_eq!(after[0].0["job"], "b");
    // The marker is not a sample of a range vector either.
    let (_, body) = s
        .get_json(
            "/api/v1/query",
            &[("query", "up{job=\"a\"}[1m]"), ("time", &secs(T0 + 20_000))],
        )
        .await;
    assert_eq!(
        body["data"]["result"][0]["values"],
        json!([[1_700_000_000, "1"]])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_out_of_order_samples() {
    let s = Secumon::start().await;
    let labels = [("__name__", "temp"), ("room", "a")];
    write_ok(
        &s,
        encode(&request(
            vec![series(&labels, &[(T0 + 60_000, 20.0)])],
            vec![],
        )),
    )
    .await;
    // Older than the latest sample: stored (PostgreSQL keeps any order).
    write_ok(
        &s,
        encode(&request(vec![series(&labels, &[(T0, 10.0)])], vec![])),
    )
    .await;
    assert_eq!(instant(&s, "temp", T0 + 1_000).await[0].1, "10");
    // The same sample again (a sender's retry): accepted silently.
    write_ok(
        &s,
        encode(&request(vec![series(&labels, &[(T0, 10.0)])], vec![])),
    )
    .await;
    // Another value for a stored timestamp: refused with 400, the rest of the request stored,
    // and the first value kept.
    let (status, text) = s
        .write_raw(encode(&request(
            vec![series(&labels, &[(T0, 11.0), (T0 + 30_000, 15.0)])],
            vec![],
        )))
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("duplicate sample for timestamp"), "{text}");
    assert_eq!(instant(&s, "temp", T0 + 1_000).await[0].1, "10");
    assert_eq!(instant(&s, "temp", T0 + 31_000).await[0].1, "15");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_is_kept_for_the_metadata_api() {
    let s = Secumon::start().await;
    let metadata = vec![
        MetricMetadata {
            r#type: MetricType::Counter as i32,
            metric_family_name: "http_requests_total".into(),
            help: "Requests <served>.".into(),
            unit: "".into(),
        },
        MetricMetadata {
            r#type: MetricType::Gauge as i32,
            metric_family_name: "temperature_celsius".into(),
            help: "Room temperature.".into(),
            unit: "celsius".into(),
        },
    ];
    write_ok(&s, encode(&request(vec![], metadata.clone()))).await;
    // Sent again, as Prometheus does every minute: no duplicates.
    write_ok(&s, encode(&request(vec![], metadata))).await;
    let (status, body) = s.get_json("/api/v1/metadata", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["data"],
        json!({
            "http_requests_total": [{"type": "counter", "help": "Requests <served>.", "unit": ""}],
            "temperature_celsius": [{"type": "gauge", "help": "Room temperature.", "unit": "celsius"}],
        })
    );
    let (_, one) = s
        .get_json("/api/v1/metadata", &[("metric", "temperature_celsius")])
        .await;
    assert_eq!(one["data"].as_object().unwrap().len(), 1);
    let (_, limited) = s.get_json("/api/v1/metadata", &[("limit", "1")]).await;
    assert_eq!(limited["data"].as_object().unwrap().len(), 1);
}

/// Every malformed request gets a 400 with a reason, the server keeps serving, and data
/// written before is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_earlier_data_is_intact() {
    let s = Secumon::start().await;
    write_ok(
        &s,
        encode(&request(
            vec![series(&[("__name__", "keep"), ("i", "1")], &[(T0, 42.0)])],
            vec![],
        )),
    )
    .await;

    let valid = encode(&request(
        vec![series(&[("__name__", "x")], &[(T0, 1.0)])],
        vec![],
    ));
    let truncated = valid[..valid.len() / 2].to_vec();
    let bomb = snap::raw::Encoder::new()
        .compress_vec(&vec![0u8; 40 << 20])
        .unwrap();
    let protobuf_garbage = snap::raw::Encoder::new()
        .compress_vec(&[0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01])
        .unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty body", vec![], "empty request body"),
        ("truncated body", truncated, "snappy"),
        (
            "not snappy",
            b"this is not snappy at all".to_vec(),
            "snappy",
        ),
        ("snappy bomb", bomb, "exceeds the limit"),
        ("protobuf garbage", protobuf_garbage, "protobuf"),
        (
            "invalid label name",
            encode(&request(
                vec![series(
                    &[("__name__", "x"), ("bad-name", "v")],
                    &[(T0, 1.0)],
                )],
                vec![],
            )),
            "invalid label name",
        ),
        (
            "duplicate label",
            encode(&request(
                vec![series(
                    &[("__name__", "x"), ("a", "1"), ("a", "2")],
                    &[(T0, 1.0)],
                )],
                vec![],
            )),
            "not unique",
        ),
        (
            "missing metric name",
            encode(&request(
                vec![series(&[("job", "x")], &[(T0, 1.0)])],
                vec![],
            )),
            "no metric name",
        ),
        (
            "empty metric name",
            encode(&request(
                vec![series(&[("__name__", ""), ("job", "x")], &[(T0, 1.0)])],
                vec![],
            )),
            "no metric name",
        ),
    ];
    for (name, body, reason) in cases {
        let (status, text) = s.write_raw(body).await;
        assert_eq!(status, 400, "{name}: {text}");
        assert!(text.contains(reason), "{name}: {text:?} lacks {reason:?}");
    }
    // An empty but well-formed request is a success, as Prometheus answers it.
    let (status, text) = s.write_raw(encode(&request(vec![], vec![]))).await;
    assert_eq!(status, 204, "empty request: {text}");

    // A request mixing a bad series with a good one stores the good one.
    let (status, _) = s
        .write_raw(encode(&request(
            vec![
                series(&[("__name__", "x"), ("bad-name", "v")], &[(T0, 1.0)]),
                series(&[("__name__", "keep"), ("i", "2")], &[(T0, 7.0)]),
            ],
            vec![],
        )))
        .await;
    assert_eq!(status, 400);
    let got = instant(&s, "keep", T0).await;
    assert_eq!(
        got.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>(),
        ["42", "7"]
    );

    // Rejections are counted by reason.
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains(r#"secumon_samples_rejected_total{protocol="remote_write",reason="invalid_label_name"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"secumon_samples_ingested_total{protocol="remote_write"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exemplars_are_kept_and_served() {
    use secumon_proto::prometheus::{Exemplar, Label};
    let s = Secumon::start().await;
    let mut with_exemplar = series(&[("__name__", "rpc_total"), ("job", "api")], &[(T0, 1.0)]);
    with_exemplar.exemplars = vec![Exemplar {
        labels: vec![Label {
            name: "trace_id".into(),
            value: "4bf92f3577b34da6".into(),
        }],
        value: 0.25,
        timestamp: T0 + 500,
    }];
    write_ok(&s, encode(&request(vec![with_exemplar], vec![]))).await;
    let (status, body) = s
        .get_json(
            "/api/v1/query_exemplars",
            &[
                ("query", "sum(rate(rpc_total[5m]))"),
                ("start", &secs(T0 - 1000)),
                ("end", &secs(T0 + 1000)),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"],
        json!([{
            "seriesLabels": {"__name__": "rpc_total", "job": "api"},
            "exemplars": [{"labels": {"trace_id": "4bf92f3577b34da6"}, "value": "0.25", "timestamp": 1_700_000_000.5}]
        }])
    );
    // Outside the range: none.
    let (_, body) = s
        .get_json(
            "/api/v1/query_exemplars",
            &[("query", "rpc_total"), ("start", &secs(T0 + 1000))],
        )
        .await;
    assert_eq!(body["data"], json!([]));
}

/// The embedded engine keeps what it acknowledged across a restart (the write-ahead log is
/// replayed on open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_data_survives_a_restart() {
    use crate::support::Backend;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    let s = Secumon::start_on(Backend::Embedded, |c| c.storage = path.clone()).await;
    let metadata = vec![MetricMetadata {
        r#type: MetricType::Gauge as i32,
        metric_family_name: "kept".into(),
        help: "Kept across restarts.".into(),
        unit: "".into(),
    }];
    write_ok(
        &s,
        encode(&request(
            vec![series(
                &[("__name__", "kept"), ("i", "1")],
                &[(T0, 1.0), (T0 + 15_000, 2.0)],
            )],
            metadata,
        )),
    )
    .await;
    s.server.stop().await;

    let s = Secumon::start_on(Backend::Embedded, |c| c.storage = path.clone()).await;
    assert_eq!(instant(&s, "kept", T0 + 20_000).await[0].1, "2");
    let (_, body) = s.get_json("/api/v1/metadata", &[("metric", "kept")]).await;
    assert_eq!(body["data"]["kept"][0]["help"], "Kept across restarts.");
    // And it keeps accepting writes after replay.
    write_ok(
        &s,
        encode(&request(
            vec![series(
                &[("__name__", "kept"), ("i", "1")],
                &[(T0 + 30_000, 3.0)],
            )],
            vec![],
        )),
    )
    .await;
    assert_eq!(instant(&s, "kept", T0 + 31_000).await[0].1, "3");
}

/// A full disk makes the embedded engine answer 503 (senders retry), the server keeps serving,
/// and a torn log tail found at start-up is cut, reported in `/metrics`, and the rest kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_full_disk_and_damaged_log() {
    use crate::support::Backend;
    // /dev/full refuses every write with ENOSPC, like a full disk.
    let full = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(full.path().join("wal")).unwrap();
    std::os::unix::fs::symlink("/dev/full", full.path().join("wal/00000001.wal")).unwrap();
    let path = full.path().display().to_string();
    let s = Secumon::start_on(Backend::Embedded, |c| c.storage = path).await;
    let (status, text) = s
        .write_raw(encode(&request(
            vec![series(&[("__name__", "m")], &[(T0, 1.0)])],
            vec![],
        )))
        .await;
    assert_eq!(status, 503, "{text}");
    // The detail (no space left, the segment's path) is in the log, not the answer.
    assert!(text.contains("request id"), "{text}");
    assert!(!text.contains("wal"), "{text}");
    let ready = s.http.get(s.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert!(instant(&s, "m", T0).await.is_empty());

    // Write, stop, tear the log's tail, restart: what came before the tear is there.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().display().to_string();
    let s = Secumon::start_on(Backend::Embedded, |c| c.storage = path.clone()).await;
    write_ok(
        &s,
        encode(&request(
            vec![series(&[("__name__", "m")], &[(T0, 1.0)])],
            vec![],
        )),
    )
    .await;
    write_ok(
        &s,
        encode(&request(
            vec![series(&[("__name__", "m")], &[(T0 + 1000, 2.0)])],
            vec![],
        )),
    )
    .await;
    s.server.stop().await;
    let segment = dir.path().join("wal/00000001.wal");
    // The segment is zero-filled past its records (fsync before acknowledgement): tear the
    // last record, not the zeros.
    let bytes = std::fs::read(&segment).unwrap();
    let records_end = bytes.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    assert!(
        bytes.len() as u64 > records_end,
        "the segment is zero-filled ahead"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(records_end - 3)
        .unwrap();
    let s = Secumon::start_on(Backend::Embedded, |c| c.storage = path.clone()).await;
    assert_eq!(instant(&s, "m", T0 + 500).await[0].1, "1");
    assert!(
        instant(&s, "m", T0 + 1000)
            .await
            .iter()
            .all(|(_, v)| v == "1"),
        "the torn write is gone"
    );
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains("secumon_storage_damaged_bytes_recovered "),
        "{metrics}"
    );
    assert!(
        !metrics.contains("secumon_storage_damaged_bytes_recovered 0\n"),
        "{metrics}"
    );
}
