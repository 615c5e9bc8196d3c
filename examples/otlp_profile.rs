//! Decode-and-translate cost of one OTLP export (1,000 series x 2 points, 7 attributes each),
//! without network or storage, for profiling the OTLP ingest path:
//! `cargo run --release --example otlp_profile` (or under `perf record`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use prost::Message;
use std::time::Instant;

fn main() {
    let mut metrics = Vec::new();
    for m in 0..5 {
        let mut points = Vec::new();
        for i in 0..200 {
            let attrs: Vec<KeyValue> = [
                "cluster", "env", "instance", "job", "method", "path", "status",
            ]
            .iter()
            .map(|k| KeyValue {
                key: k.to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(format!("{k}-{i}-{m}"))),
                }),
                ..Default::default()
            })
            .collect();
            for k in 0..2u64 {
                points.push(NumberDataPoint {
                    attributes: attrs.clone(),
                    time_unix_nano: 1_700_000_000_000_000_000 + k * 15_000_000_000,
                    value: Some(number_data_point::Value::AsDouble(1.0)),
                    ..Default::default()
                });
            }
        }
        metrics.push(Metric {
            name: format!("metric_{m}"),
            data: Some(Data::Gauge(Gauge {
                data_points: points,
            })),
            ..Default::default()
        });
    }
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let bytes = request.encode_to_vec();
    println!("request bytes {}", bytes.len());
    let config = secumon::ingest::otlp::OtlpConfig::default();
    let cache = secumon::ingest::otlp::LabelCache::default();
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        let r = ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap();
        std::hint::black_box(r);
    }
    let decode = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    for _ in 0..n {
        let r = ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap();
        let b = secumon::ingest::otlp::to_batch(
            r,
            &config,
            &cache,
            &secumon::ingest::RequestLimits::NONE,
        )
        .expect("within limits");
        std::hint::black_box(b);
    }
    let both = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "per 2000-point request: decode {:.2} ms, translate {:.2} ms => {:.2} s per 1M points",
        decode * 1e3,
        (both - decode) * 1e3,
        both * 500.0
    );
}
