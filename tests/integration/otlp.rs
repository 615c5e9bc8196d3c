//! OTLP ingest with real clients: the OpenTelemetry Python SDK over gRPC and HTTP, then PromQL
//! sees Prometheus-style names; and bad input over both transports.

use crate::support::Secumon;
use prost::Message;
use serde_json::json;
use std::process::Command;

const PIP_INSTALL: &str =
    "python3 -m pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http";

/// Runs tests/otlp/export.py; fails loudly when Python or the SDK is missing.
fn python_export(protocol: &str, endpoint: &str, temporality: &str, run: &str) -> (bool, String) {
    python_export_with(protocol, endpoint, temporality, run, &[])
}

/// [`python_export`] with more environment, such as `OTEL_EXPORTER_OTLP_HEADERS`.
pub(crate) fn python_export_with(
    protocol: &str,
    endpoint: &str,
    temporality: &str,
    run: &str,
    env: &[(&str, &str)],
) -> (bool, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp/export.py");
    let output = Command::new("python3")
        .args([script, protocol, endpoint, temporality, run])
        // requests lets these override the exporter's own CA (OTEL_EXPORTER_OTLP_CERTIFICATE).
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .envs(env.iter().copied())
        // Record exemplars without a sampled trace, so the export carries some.
        .env("OTEL_METRICS_EXEMPLAR_FILTER", "always_on")
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 not found ({e}): install Python 3, then `{PIP_INSTALL}`")
        });
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    if stderr.contains("ModuleNotFoundError") {
        panic!(
            "the OpenTelemetry Python SDK is missing: install it with `{PIP_INSTALL}`\n{stderr}"
        );
    }
    (output.status.success(), stderr)
}

async fn value(s: &Secumon, query: &str) -> Option<f64> {
    let (status, body) = s.get_json("/api/v1/query", &[("query", query)]).await;
    assert_eq!(status, 200, "{query}: {body}");
    let result = body["data"]["result"].as_array()?;
    assert!(result.len() <= 1, "{query}: {body}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

async fn check_sdk_series(s: &Secumon, run: &str) {
    let sel =
        |name: &str, extra: &str| format!("{name}{{job=\"pytest\",instance=\"{run}\"{extra}}}");
    assert_eq!(
        value(s, &sel("requests_total", ",route=\"/a\"")).await,
        Some(5.0)
    );
    assert_eq!(
        value(s, &sel("requests_total", ",route=\"/b\"")).await,
        Some(2.0)
    );
    assert_eq!(value(s, &sel("queue_depth", "")).await, Some(2.0));
    assert_eq!(
        value(s, &sel("http_latency_seconds_count", ",route=\"/a\"")).await,
        Some(2.0)
    );
    assert_eq!(
        value(s, &sel("http_latency_seconds_sum", ",route=\"/a\"")).await,
        Some(3.2)
    );
    assert_eq!(
        value(
            s,
            &sel("http_latency_seconds_bucket", ",route=\"/a\",le=\"+Inf\"")
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        value(
            s,
            &sel("http_latency_seconds_bucket", ",route=\"/a\",le=\"5\"")
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        value(
            s,
            &sel("http_latency_seconds_bucket", ",route=\"/a\",le=\"0\"")
        )
        .await,
        Some(0.0)
    );
    assert_eq!(
        value(s, &sel("room_temperature_celsius", ",room=\"lab\"")).await,
        Some(21.5)
    );
    assert_eq!(
        value(s, &sel("target_info", ",host_name=\"ci_host\"")).await,
        None
    );
    assert_eq!(
        value(s, &sel("target_info", ",host_name=\"ci-host\"")).await,
        Some(1.0)
    );
    let median = value(
        s,
        &format!(
            "histogram_quantile(0.5, {})",
            sel("exp_latency_milliseconds_bucket", "")
        ),
    )
    .await
    .expect("exponential histogram answers histogram_quantile");
    assert!(
        (4.5..=5.5).contains(&median),
        "median of 5 and 50 lands in the bucket of 5: {median}"
    );
    let p90 = value(
        s,
        &format!(
            "histogram_quantile(0.9, {})",
            sel("exp_latency_milliseconds_bucket", "")
        ),
    )
    .await
    .unwrap();
    assert!(
        (45.0..=55.0).contains(&p90),
        "p90 lands in the bucket of 50: {p90}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_over_grpc_and_http() {
    let s = Secumon::start().await;
    let grpc = format!("http://{}", s.server.otlp_grpc_addr.unwrap());
    let (ok, log) = python_export("grpc", &grpc, "cumulative", "grpc-run");
    assert!(ok, "gRPC export failed: {log}");
    check_sdk_series(&s, "grpc-run").await;

    let http = format!("http://{}", s.server.otlp_http_addr.unwrap());
    let (ok, log) = python_export("http", &http, "cumulative", "http-run");
    assert!(ok, "HTTP export failed: {log}");
    check_sdk_series(&s, "http-run").await;

    // The same over the main port's Prometheus-compatible path.
    let (ok, log) = python_export("http", &s.url("/api/v1/otlp"), "cumulative", "main-run");
    assert!(ok, "export to /api/v1/otlp failed: {log}");
    check_sdk_series(&s, "main-run").await;

    let (_, metadata) = s
        .get_json("/api/v1/metadata", &[("metric", "requests_total")])
        .await;
    assert_eq!(
        metadata["data"]["requests_total"],
        json!([{"type": "counter", "help": "Requests served", "unit": ""}])
    );
    let (_, metadata) = s
        .get_json("/api/v1/metadata", &[("metric", "http_latency_seconds")])
        .await;
    assert_eq!(
        metadata["data"]["http_latency_seconds"][0]["unit"],
        "seconds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_temporality_is_refused_point_by_point() {
    let s = Secumon::start().await;
    let grpc = format!("http://{}", s.server.otlp_grpc_addr.unwrap());
    // The export succeeds (partial success); the delta counter and histogram are refused,
    // the cumulative up-down counter and gauge are stored.
    let (ok, log) = python_export("grpc", &grpc, "delta", "delta-run");
    assert!(ok, "{log}");
    let sel = |name: &str| format!("{name}{{instance=\"delta-run\"}}");
    assert_eq!(value(&s, &sel("requests_total")).await, None);
    assert_eq!(value(&s, &sel("queue_depth")).await, Some(2.0));
    assert_eq!(
        value(&s, &sel("room_temperature_celsius")).await,
        Some(21.5)
    );
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains(
            r#"secumon_samples_rejected_total{protocol="otlp",reason="unsupported_temporality"} 4"#
        ),
        "{metrics}"
    );
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

async fn post(
    s: &Secumon,
    content_type: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let mut request = s
        .http
        .post(format!(
            "http://{}/v1/metrics",
            s.server.otlp_http_addr.unwrap()
        ))
        .header("Content-Type", content_type)
        .body(body);
    if let Some(encoding) = encoding {
        request = request.header("Content-Encoding", encoding);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

fn gauge_json(points: serde_json::Value) -> Vec<u8> {
    json!({"resourceMetrics": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "bad-input"}}]},
        "scopeMetrics": [{"metrics": [{"name": "probe", "gauge": {"dataPoints": points}}]}]
    }]})
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_otlp_answers_and_good_points_are_stored() {
    let s = Secumon::start().await;
    let now_ns = (chrono::Utc::now().timestamp_millis() as u64 * 1_000_000).to_string();

    // Protobuf garbage: 400 with a google.rpc.Status body, code INVALID_ARGUMENT.
    let (status, body) = post(
        &s,
        "application/x-protobuf",
        None,
        vec![0x0a, 0xff, 0xff, 0xff, 0x0f],
    )
    .await;
    assert_eq!(status, 400);
    let rpc = secumon_proto::google_rpc::Status::decode(body.as_slice()).unwrap();
    assert_eq!(rpc.code, 3);
    assert!(rpc.message.starts_with("protobuf"), "{}", rpc.message);

    // JSON that does not match the schema: 400, JSON status.
    let (status, body) = post(
        &s,
        "application/json",
        None,
        br#"{"resourceMetrics": {"x": 1}}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    let rpc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(rpc["code"], 3);

    // A gzip bomb: refused at the decompressed limit (32 MiB).
    let bomb = gzip(&vec![b' '; 40 << 20]);
    let (status, _) = post(&s, "application/json", Some("gzip"), bomb).await;
    assert_eq!(status, 413);

    // Unknown content type and encoding.
    let (status, _) = post(&s, "text/plain", None, b"x".to_vec()).await;
    assert_eq!(status, 415);
    let (status, _) = post(&s, "application/json", Some("br"), b"{}".to_vec()).await;
    assert_eq!(status, 400);

    // Empty resource metrics: accepted, nothing refused.
    let (status, body) = post(
        &s,
        "application/json",
        None,
        br#"{"resourceMetrics": [{}]}"#.to_vec(),
    )
    .await;
    assert_eq!(
        (
            status,
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        ),
        (200, json!({}))
    );

    // Good and bad points together, gzip-compressed: partial success, good points stored.
    let points = json!([
        {"timeUnixNano": now_ns, "asDouble": 1.5, "attributes": [{"key": "n", "value": {"stringValue": "good"}}]},
        {"asDouble": 2.0, "attributes": [{"key": "n", "value": {"stringValue": "no-time"}}]},
        {"timeUnixNano": now_ns, "asDouble": 3.0, "attributes": [{"key": "", "value": {"stringValue": "empty-key"}}]},
        {"timeUnixNano": now_ns, "asDouble": "NaN", "attributes": [{"key": "n", "value": {"stringValue": "nan"}}]},
    ]);
    let (status, body) = post(
        &s,
        "application/json",
        Some("gzip"),
        gzip(&gauge_json(points)),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let response: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let partial = &response["partialSuccess"];
    // An int64 in the protobuf JSON mapping is a decimal string.
    assert_eq!(partial["rejectedDataPoints"], "2", "{response}");
    assert!(
        partial["errorMessage"].as_str().unwrap().contains("probe"),
        "{response}"
    );
    assert_eq!(value(&s, "probe{n=\"good\"}").await, Some(1.5));
    let (_, nan) = s
        .get_json("/api/v1/query", &[("query", "probe{n=\"nan\"}")])
        .await;
    assert_eq!(
        nan["data"]["result"][0]["value"][1], "NaN",
        "a NaN gauge value is a value"
    );

    // The server still answers, and nothing stored earlier is lost.
    assert_eq!(value(&s, "probe{n=\"good\"}").await, Some(1.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_answers_invalid_argument_for_garbage_and_partial_success_for_bad_points() {
    let s = Secumon::start().await;
    let addr = s.server.otlp_grpc_addr.unwrap();
    let status = crate::support::raw_grpc::export(addr, vec![0x0a, 0xff, 0xff, 0xff, 0x0f])
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let json = gauge_json(json!([
        {"timeUnixNano": "1700000000000000000", "asDouble": 1.0},
        {"asDouble": 2.0},
    ]));
    let request =
        secumon::ingest::otlp::decode(&json, secumon::ingest::otlp::Encoding::Json).unwrap();
    let response = crate::support::raw_grpc::export(addr, request.encode_to_vec())
        .await
        .unwrap();
    let partial = response.partial_success.expect("partial success");
    assert_eq!(partial.rejected_data_points, 1);
    assert!(
        partial.error_message.contains("missing timestamp"),
        "{}",
        partial.error_message
    );
}
