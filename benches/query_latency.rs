//! Query latency benchmark: 10,000 series x 2 hours at 15 s, loaded through remote-write into
//! SecuMon (release binary, once on PostgreSQL and once on its embedded engine) and
//! Prometheus 2.42 in the same run; then each query is timed on all three, warm, and the
//! medians compared.
//!
//! `cargo bench --bench query_latency [-- --runs N]`

#[path = "../tests/integration/support/mod.rs"]
mod support;

mod common;

use secumon_proto::prometheus::{Label, Sample, TimeSeries};
use std::time::Instant;
use support::process::{free_port, spawn_secumon};

const SERIES_COUNTERS: usize = 9_000;
const HISTOGRAM_GROUPS: usize = 100; // x 10 buckets = 1,000 series
const BUCKETS: [&str; 10] = [
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "+Inf",
];
const POINTS: i64 = 480; // 2 h at 15 s
const STEP_MS: i64 = 15_000;
const SLICE: i64 = 8; // samples per series per request (2 min)

fn label(name: &str, value: String) -> Label {
    Label {
        name: name.into(),
        value,
    }
}

/// A series: its labels and its value at sample index k.
type SeriesSpec = (Vec<Label>, Box<dyn Fn(i64) -> f64>);

/// Label sets and a value function per series.
fn dataset() -> Vec<SeriesSpec> {
    let mut out: Vec<SeriesSpec> = Vec::new();
    for i in 0..SERIES_COUNTERS {
        let labels = vec![
            label("__name__", "bench_requests_total".into()),
            label("instance", format!("10.0.{}.{}:9100", i / 250, i % 250)),
            label("job", format!("job-{}", i % 20)),
            label("method", ["GET", "POST", "PUT"][i % 3].into()),
        ];
        let rate = 1.0 + (i % 7) as f64;
        out.push((labels, Box::new(move |k| (k as f64 * rate * 15.0).floor())));
    }
    for g in 0..HISTOGRAM_GROUPS {
        for (b, le) in BUCKETS.iter().enumerate() {
            let labels = vec![
                label("__name__", "bench_latency_seconds_bucket".into()),
                label("instance", format!("10.1.0.{g}:9100")),
                label("job", format!("job-{}", g % 20)),
                label("le", le.to_string()),
            ];
            let share = (b + 1) as f64 / BUCKETS.len() as f64;
            out.push((labels, Box::new(move |k| (k as f64 * 20.0 * share).floor())));
        }
    }
    out
}

/// Request bodies in time order for each of `workers` disjoint blocks of series.
fn bodies(start: i64, workers: usize) -> Vec<Vec<Vec<u8>>> {
    let data = dataset();
    let per_worker = data.len().div_ceil(workers);
    let mut out = vec![Vec::new(); workers];
    for (w, block) in data.chunks(per_worker).enumerate() {
        for slice in 0..POINTS / SLICE {
            let timeseries = block
                .iter()
                .map(|(labels, value)| TimeSeries {
                    labels: labels.clone(),
                    samples: (slice * SLICE..(slice + 1) * SLICE)
                        .map(|k| Sample {
                            value: value(k),
                            timestamp: start + k * STEP_MS,
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect();
            out[w].push(common::snappy_body(timeseries));
        }
    }
    out
}

/// `secumon_storage_lifecycle_runs` of the server at `base`.
async fn lifecycle_runs(base: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("/metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix("secumon_storage_lifecycle_runs "))
        .and_then(|v| v.trim().parse().ok())
        .expect("secumon_storage_lifecycle_runs in /metrics")
}

/// Median wall time of `runs` answers (after one warm-up), checking each is a success.
async fn time_query(
    client: &reqwest::Client,
    url: &str,
    params: &[(&str, String)],
    runs: usize,
) -> (f64, usize) {
    let mut times = Vec::new();
    let mut series = 0;
    for i in 0..=runs {
        let started = Instant::now();
        let response = client.get(url).query(params).send().await.expect("query");
        let status = response.status();
        let body: serde_json::Value = response.json().await.expect("json");
        assert!(status.is_success(), "{url} {params:?}: {body}");
        series = body["data"]["result"].as_array().map_or(0, Vec::len);
        if i > 0 {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times[times.len() / 2], series)
}

fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let now = chrono::Utc::now().timestamp_millis();
    let start = (now - POINTS * STEP_MS - 600_000).div_euclid(60_000) * 60_000;
    let end = start + (POINTS - 1) * STEP_MS;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    eprintln!("encoding 10,000 series x {POINTS} samples");
    let bodies = bodies(start, 4);

    // SECUMON_BENCH_URL points the benchmark at a server started by hand (for profiling);
    // otherwise it starts the release binary on a PostgreSQL of its own.
    let (_secumon, secumon) = match std::env::var("SECUMON_BENCH_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let postgres = support::Postgres::shared();
            let database = runtime.block_on(postgres.database());
            let port = free_port();
            let process = spawn_secumon(&database, port, &[]);
            (Some(process), format!("http://127.0.0.1:{port}"))
        }
    };
    let data = tempfile::tempdir().expect("temp dir");
    let embedded_port = free_port();
    let _embedded = spawn_secumon(&data.path().display().to_string(), embedded_port, &[]);
    let embedded = format!("http://127.0.0.1:{embedded_port}");
    let prometheus = support::Prometheus::start(|_| {
        "global:\n  scrape_interval: 1h\n  evaluation_interval: 1m\n".into()
    });

    let loaded = Instant::now();
    runtime.block_on(common::post_blocks(
        &format!("{secumon}/api/v1/write"),
        bodies.clone(),
    ));
    eprintln!("SecuMon loaded in {:.1} s", loaded.elapsed().as_secs_f64());
    // Steady state: the lifecycle job (every 60 s by default) has run once since the load,
    // as it has on a server that ingests continuously (it vacuums the partitions being
    // written, so reads are index-only scans).
    let runs_after_load = runtime.block_on(lifecycle_runs(&secumon));
    runtime.block_on(common::post_blocks(
        &format!("{embedded}/api/v1/write"),
        bodies.clone(),
    ));
    let loaded = Instant::now();
    runtime.block_on(common::post_blocks(
        &prometheus.url("/api/v1/write"),
        bodies.clone(),
    ));
    eprintln!(
        "Prometheus loaded in {:.1} s",
        loaded.elapsed().as_secs_f64()
    );

    // Two runs: one may have been under way when the load ended. Only for the server this
    // benchmark started (plain PostgreSQL); one given by SECUMON_BENCH_URL is taken as it is.
    let waited = Instant::now();
    while _secumon.is_some() && runtime.block_on(lifecycle_runs(&secumon)) < runs_after_load + 2 {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(180),
            "the lifecycle job did not run"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    let range = |q: &str| {
        vec![
            ("query", q.to_owned()),
            ("start", format!("{}", start / 1000 + 600)),
            ("end", format!("{}", end / 1000)),
            ("step", "60".to_owned()),
        ]
    };
    let instant = |q: &str| vec![("query", q.to_owned()), ("time", format!("{}", end / 1000))];
    // (name, path, parameters)
    type Query<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);
    let queries: Vec<Query> = vec![
        ("selector", "/api/v1/query_range", range("bench_requests_total{job=\"job-3\"}")),
        ("rate", "/api/v1/query_range", range("rate(bench_requests_total{job=\"job-3\"}[5m])")),
        ("sum by", "/api/v1/query_range", range("sum by (job) (rate(bench_requests_total[5m]))")),
        (
            "histogram_quantile",
            "/api/v1/query_range",
            range("histogram_quantile(0.9, sum by (le, job) (rate(bench_latency_seconds_bucket[5m])))"),
        ),
        ("topk", "/api/v1/query", instant("topk(5, rate(bench_requests_total[5m]))")),
        (
            "regex matcher",
            "/api/v1/query_range",
            range("sum(rate(bench_requests_total{instance=~\"10\\\\.0\\\\.1\\\\..*\"}[5m]))"),
        ),
        (
            "subquery",
            "/api/v1/query",
            instant("max_over_time(sum by (job) (rate(bench_requests_total[5m]))[30m:1m])"),
        ),
    ];
    let client = reqwest::Client::new();
    println!("\n10,000 series x 2 h at 15 s; median of {runs} warm runs, client wall time\n");
    println!("| query | series out | SecuMon on PostgreSQL ms | SecuMon embedded ms | Prometheus 2.42 ms | PostgreSQL ratio | embedded ratio |");
    println!("|---|---|---|---|---|---|---|");
    for (name, path, params) in &queries {
        let (ours, n) = runtime.block_on(time_query(
            &client,
            &format!("{secumon}{path}"),
            params,
            runs,
        ));
        let (local, e) = runtime.block_on(time_query(
            &client,
            &format!("{embedded}{path}"),
            params,
            runs,
        ));
        let (theirs, m) =
            runtime.block_on(time_query(&client, &prometheus.url(path), params, runs));
        assert_eq!(n, m, "{name}: {n} series vs Prometheus's {m}");
        assert_eq!(e, m, "{name}: embedded {e} series vs Prometheus's {m}");
        println!(
            "| {name} | {n} | {ours:.1} | {local:.1} | {theirs:.1} | {:.2} | {:.2} |",
            ours / theirs,
            local / theirs
        );
    }
}
