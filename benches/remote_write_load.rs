//! Remote-write load generator: pushes the same pre-encoded batches into SecuMon (the release
//! binary, on a PostgreSQL the harness starts) and into Prometheus 2.42's remote-write
//! receiver, one after the other in the same run, and reports for each: accepted samples per
//! second, server CPU-seconds per million samples, and peak RSS. The same data also goes
//! through SecuMon's OTLP/gRPC receiver (gauges, 1,000 points per export) for the ratio of the
//! two ingest paths.
//!
//! `cargo bench --bench remote_write_load [-- --series N --rounds N --connections N]`

mod common;
#[path = "../tests/integration/support/mod.rs"]
mod support;

use common::{
    cpu_seconds, labels_of, listener_pid, peak_rss_mib, push, tree_cpu_seconds, Options, Outcome,
};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use secumon_proto::prometheus::Label;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::process::{free_port, spawn_secumon, wait_for_port};

/// The same data as OTLP export requests (gauges, one data point per sample, the labels other
/// than the name as attributes), in the same order and blocks as the remote-write bodies.
fn encode_otlp_requests(o: &Options, t0: i64) -> Vec<ExportMetricsServiceRequest> {
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::{
        metric::Data, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics,
        ScopeMetrics,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    let labels: Vec<Vec<Label>> = (0..o.series).map(labels_of).collect();
    let mut requests = Vec::new();
    for round in 0..o.rounds {
        let base = t0 + (round * o.samples_per_series) as i64 * 15_000;
        for chunk in (0..o.series)
            .collect::<Vec<_>>()
            .chunks(o.series_per_request)
        {
            let mut metrics: Vec<Metric> = Vec::new();
            for &i in chunk {
                let name = &labels[i][0].value;
                let attributes: Vec<KeyValue> = labels[i][1..]
                    .iter()
                    .map(|l| KeyValue {
                        key: l.name.clone(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(l.value.clone())),
                        }),
                        ..Default::default()
                    })
                    .collect();
                let points = (0..o.samples_per_series).map(|k| NumberDataPoint {
                    attributes: attributes.clone(),
                    time_unix_nano: (base + k as i64 * 15_000) as u64 * 1_000_000,
                    value: Some(number_data_point::Value::AsDouble(
                        (round * 10 + k + i) as f64 * 0.5,
                    )),
                    ..Default::default()
                });
                match metrics.iter_mut().find(|m| &m.name == name) {
                    Some(Metric {
                        data: Some(Data::Gauge(gauge)),
                        ..
                    }) => gauge.data_points.extend(points),
                    _ => metrics.push(Metric {
                        name: name.clone(),
                        data: Some(Data::Gauge(Gauge {
                            data_points: points.collect(),
                        })),
                        ..Default::default()
                    }),
                }
            }
            requests.push(ExportMetricsServiceRequest {
                resource_metrics: vec![ResourceMetrics {
                    resource: Some(Resource::default()),
                    scope_metrics: vec![ScopeMetrics {
                        metrics,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            });
        }
    }
    requests
}

/// Sends pre-encoded export requests, so the client spends no CPU encoding during the run
/// (as the remote-write client sends pre-encoded bodies).
fn push_otlp(addr: &str, requests: Arc<Vec<ExportMetricsServiceRequest>>, o: &Options) -> Outcome {
    let requests: Arc<Vec<bytes::Bytes>> = Arc::new(
        requests
            .iter()
            .map(|r| bytes::Bytes::from(r.encode_to_vec()))
            .collect(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let points_per_request = o.series_per_request * o.samples_per_series;
    let (connections, blocks) = (o.connections, o.series.div_ceil(o.series_per_request));
    runtime.block_on(async {
        let accepted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = Vec::new();
        for worker in 0..connections {
            // One connection per worker, as the remote-write client has.
            let channel = tonic::transport::Endpoint::from_shared(addr.to_owned())
                .unwrap()
                .connect()
                .await
                .expect("connect to OTLP/gRPC");
            let mut client = tonic::client::Grpc::new(channel);
            let (requests, accepted, refused) =
                (requests.clone(), accepted.clone(), refused.clone());
            workers.push(tokio::spawn(async move {
                for i in (0..requests.len()).filter(|i| (i % blocks) % connections == worker) {
                    client.ready().await.expect("gRPC channel ready");
                    let path = http::uri::PathAndQuery::from_static(support::raw_grpc::EXPORT);
                    let request = tonic::Request::new(requests[i].clone());
                    match client
                        .unary(request, path, support::raw_grpc::RawCodec)
                        .await
                    {
                        Ok(r) if r.get_ref().partial_success.is_none() => {
                            accepted.fetch_add(points_per_request, Ordering::SeqCst);
                        }
                        other => {
                            if refused.fetch_add(1, Ordering::SeqCst) < 3 {
                                eprintln!("OTLP export refused: {other:?}");
                            }
                        }
                    }
                }
            }));
        }
        for worker in workers {
            worker.await.unwrap();
        }
        Outcome {
            seconds: started.elapsed().as_secs_f64(),
            accepted: accepted.load(Ordering::SeqCst),
            refused_requests: refused.load(Ordering::SeqCst),
        }
    })
}

fn report(name: &str, outcome: &Outcome, cpu: f64, rss: &str) -> f64 {
    let rate = outcome.accepted as f64 / outcome.seconds;
    let cpu_per_million = cpu / (outcome.accepted.max(1) as f64 / 1e6);
    println!(
        "| {name} | {:.0} | {:.2} | {cpu_per_million:.2} | {rss} | {} |",
        rate, outcome.seconds, outcome.refused_requests
    );
    rate
}

fn main() {
    let o = Options::from_args(Options {
        series: 10_000,
        series_per_request: 1_000,
        samples_per_series: 2,
        rounds: 100,
        connections: 5,
    });
    // Benchmarks run PostgreSQL with its durable defaults (fsync on).
    std::env::set_var("SECUMON_PG_DURABLE", "1");
    let t0 = chrono::Utc::now().timestamp_millis()
        - (o.rounds * o.samples_per_series) as i64 * 15_000
        - 300_000;
    eprintln!(
        "encoding {} requests ({} series x {} samples each, {} samples in all)",
        o.series / o.series_per_request * o.rounds,
        o.series_per_request,
        o.samples_per_series,
        o.total_samples()
    );
    let bodies = Arc::new(common::encode_requests(&o, t0, 15_000, |i, n| {
        (n / o.samples_per_series * 10 + n % o.samples_per_series + i) as f64 * 0.5
    }));
    let mean_body = bodies.iter().map(Vec::len).sum::<usize>() / bodies.len();
    eprintln!("mean request body: {mean_body} bytes compressed");

    println!(
        "\n{} series, {} series x {} samples per request, {} connections, {} samples\n",
        o.series,
        o.series_per_request,
        o.samples_per_series,
        o.connections,
        o.total_samples()
    );
    println!("| server | accepted samples/s | wall s | server CPU-s per 1M samples | peak RSS MiB | refused requests |");
    println!("|---|---|---|---|---|---|");

    // SecuMon, release binary, on PostgreSQL.
    let postgres = support::Postgres::shared();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let database = runtime.block_on(postgres.database());
    let port = free_port();
    let secumon = spawn_secumon(&database, port, &[]);
    let pg_pid = postmaster_pid(postgres.port);
    let (cpu_before, pg_before) = (cpu_seconds(secumon.pid()), tree_cpu_seconds(pg_pid));
    let outcome = push(
        &format!("http://127.0.0.1:{port}/api/v1/write"),
        bodies.clone(),
        &o,
    );
    let (cpu, pg_cpu) = (
        cpu_seconds(secumon.pid()) - cpu_before,
        tree_cpu_seconds(pg_pid) - pg_before,
    );
    let rss = peak_rss_mib(secumon.pid());
    let secumon_rate = report(
        "SecuMon (server process)",
        &outcome,
        cpu,
        &format!("{rss:.0}"),
    );
    report(
        "SecuMon + PostgreSQL (both processes)",
        &outcome,
        cpu + pg_cpu,
        "",
    );
    drop(secumon);

    // SecuMon's embedded engine (write-ahead log fsynced per request), same bodies.
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let secumon = spawn_secumon(&data.path().display().to_string(), port, &[]);
    let cpu_before = cpu_seconds(secumon.pid());
    let outcome = push(
        &format!("http://127.0.0.1:{port}/api/v1/write"),
        bodies.clone(),
        &o,
    );
    let cpu = cpu_seconds(secumon.pid()) - cpu_before;
    let rss = peak_rss_mib(secumon.pid());
    report(
        "SecuMon embedded engine (WAL, fsync per request)",
        &outcome,
        cpu,
        &format!("{rss:.0}"),
    );
    drop(secumon);

    // SecuMon's OTLP/gRPC receiver, same data as gauges, a fresh database.
    let otlp_requests = Arc::new(encode_otlp_requests(&o, t0));
    let database = runtime.block_on(postgres.database());
    let (port, grpc_port) = (free_port(), free_port());
    let grpc = format!("127.0.0.1:{grpc_port}");
    let secumon = spawn_secumon(&database, port, &["--otlp-grpc-listen", &grpc]);
    wait_for_port(grpc_port, Duration::from_secs(30), "secumon OTLP/gRPC");
    let (cpu_before, pg_before) = (cpu_seconds(secumon.pid()), tree_cpu_seconds(pg_pid));
    let outcome = push_otlp(&format!("http://127.0.0.1:{grpc_port}"), otlp_requests, &o);
    let (cpu, pg_cpu) = (
        cpu_seconds(secumon.pid()) - cpu_before,
        tree_cpu_seconds(pg_pid) - pg_before,
    );
    let rss = peak_rss_mib(secumon.pid());
    let otlp_rate = report(
        "SecuMon OTLP/gRPC (server process)",
        &outcome,
        cpu,
        &format!("{rss:.0}"),
    );
    report("SecuMon OTLP/gRPC + PostgreSQL", &outcome, cpu + pg_cpu, "");
    drop(secumon);

    // Prometheus 2.42's receiver, same bodies.
    let prometheus = support::Prometheus::start(|_| "global:\n  scrape_interval: 1h\n".into());
    let prom_pid = prometheus_pid(prometheus.port);
    let cpu_before = cpu_seconds(prom_pid);
    let outcome = push(&prometheus.url("/api/v1/write"), bodies, &o);
    let cpu = cpu_seconds(prom_pid) - cpu_before;
    let rss = peak_rss_mib(prom_pid);
    let prometheus_rate = report(
        "Prometheus 2.42 (remote-write receiver)",
        &outcome,
        cpu,
        &format!("{rss:.0}"),
    );
    println!(
        "\nSecuMon on PostgreSQL / Prometheus ingest rate: {:.2}",
        secumon_rate / prometheus_rate
    );
    println!(
        "SecuMon OTLP/gRPC / remote-write ingest rate: {:.2}",
        otlp_rate / secumon_rate
    );
}

fn postmaster_pid(port: u16) -> u32 {
    listener_pid(port)
}

fn prometheus_pid(port: u16) -> u32 {
    listener_pid(port)
}
