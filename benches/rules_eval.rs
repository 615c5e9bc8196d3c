//! Rule evaluation beside Prometheus 2.42: 1,000 recording rules and 1,000 alerting rules (100
//! groups of 10 + 10) over 100,000 counter series at a 15 s interval, on SecuMon's embedded
//! engine, SecuMon on PostgreSQL and Prometheus, one server at a time on the same data.
//!
//! Each server starts with an empty rule file and is given 13 minutes of samples at 15 s
//! (from 6 minutes before now to 7 after, so evaluations during the run read 5-minute windows
//! of real data); its whole CPU is measured for 60 s without rules, the rules are loaded by
//! SIGHUP, and after 30 s its CPU is measured for 120 s (eight evaluations of every group)
//! while its own group duration metrics are read every 5 s. On PostgreSQL the figures add the
//! CPU of the PostgreSQL server's processes.
//!
//! Printed per server: CPU seconds per 15 s interval with rules, without rules, and the
//! difference (the cost of evaluation); the slowest group's evaluation time (the largest
//! `*_rule_group_last_duration_seconds` seen) and the mean over groups; iterations missed and
//! failed evaluations. Every server must end with the same 10,000 recorded series and 1,000
//! firing alerts.
//!
//! `cargo bench --bench rules_eval [-- --only embedded|postgres|prometheus]`

#[path = "../tests/integration/support/mod.rs"]
mod support;

mod common;

use common::{cpu_seconds, listener_pid, tree_cpu_seconds};
use prost::Message;
use secumon_proto::prometheus::{Label, Sample, TimeSeries, WriteRequest};
use std::path::Path;
use std::time::{Duration, Instant};
use support::process::{free_port, spawn_secumon};

const METRICS: usize = 100;
const SHARDS: usize = 10;
const INSTANCES: usize = 100;
const STEP_MS: i64 = 15_000;
const SERIES_PER_REQUEST: usize = 2_000;
const IDLE_WINDOW: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(30);
const RULES_WINDOW: Duration = Duration::from_secs(120);

fn label(name: &str, value: String) -> Label {
    Label {
        name: name.into(),
        value,
    }
}

/// The rule file: one group per metric, a recording and an alerting rule per shard. One
/// instance in each (metric, shard) counts faster than 10.85/s: 1,000 alerts fire.
fn rules() -> String {
    let mut out = String::from("groups:\n");
    for m in 0..METRICS {
        out.push_str(&format!(
            "  - name: bench_m{m}\n    interval: 15s\n    rules:\n"
        ));
        for s in 0..SHARDS {
            out.push_str(&format!(
                "      - record: job_shard:bench_rule_m{m}:rate5m\n        expr: sum by (job, shard) (rate(bench_rule_m{m}{{shard=\"s{s}\"}}[5m]))\n"
            ));
        }
        for s in 0..SHARDS {
            out.push_str(&format!(
                "      - alert: BenchHigh{m}\n        expr: rate(bench_rule_m{m}{{shard=\"s{s}\"}}[5m]) > 10.85\n        for: 1m\n        labels:\n          severity: page\n        annotations:\n          summary: \"{{{{ $labels.instance }}}} at {{{{ $value | humanize }}}}/s\"\n"
            ));
        }
    }
    out
}

/// Remote-write bodies: every series from `start` for `points` samples, in time order per
/// series, `SERIES_PER_REQUEST` series a request.
fn bodies(start: i64, points: i64) -> Vec<Vec<u8>> {
    let mut series = Vec::with_capacity(METRICS * SHARDS * INSTANCES);
    for m in 0..METRICS {
        for s in 0..SHARDS {
            for k in 0..INSTANCES {
                let labels = vec![
                    label("__name__", format!("bench_rule_m{m}")),
                    label("instance", format!("host-{k}:9100")),
                    label("job", format!("job-{}", k % 10)),
                    label("shard", format!("s{s}")),
                ];
                let rate = 1.0 + k as f64 / 10.0;
                series.push((labels, rate));
            }
        }
    }
    series
        .chunks(SERIES_PER_REQUEST)
        .map(|chunk| {
            let request = WriteRequest {
                timeseries: chunk
                    .iter()
                    .map(|(labels, rate)| TimeSeries {
                        labels: labels.clone(),
                        samples: (0..points)
                            .map(|j| Sample {
                                value: (j as f64 * 15.0 * rate).round(),
                                timestamp: start + j * STEP_MS,
                            })
                            .collect(),
                        ..Default::default()
                    })
                    .collect(),
                metadata: vec![],
            };
            snap::raw::Encoder::new()
                .compress_vec(&request.encode_to_vec())
                .unwrap()
        })
        .collect()
}

/// The values of the series of `/metrics` whose name is `name` (any labels).
async fn metric_values(base: &str, name: &str) -> Vec<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("/metrics body");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect()
}

async fn instant(base: &str, query: &str) -> f64 {
    let body: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("json");
    body["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Figures {
    name: &'static str,
    idle_cpu: f64,
    rules_cpu: f64,
    slowest_group_s: f64,
    mean_group_s: f64,
    missed: f64,
    failures: f64,
    recorded: f64,
    firing: f64,
}

/// One server through the run: `cpu` reads its CPU seconds, `prefix` names its metrics.
fn measure(
    runtime: &tokio::runtime::Runtime,
    name: &'static str,
    base: &str,
    pid: u32,
    cpu: &dyn Fn() -> f64,
    prefix: &str,
    rule_file: &Path,
) -> Figures {
    let now = chrono::Utc::now().timestamp_millis();
    let start = (now - 6 * 60_000).div_euclid(STEP_MS) * STEP_MS;
    let points = 13 * 60_000 / STEP_MS;
    let bodies = bodies(start, points);
    let loaded = Instant::now();
    let mut first = bodies;
    let second = first.split_off(first.len() / 2);
    runtime.block_on(common::post_blocks(
        &format!("{base}/api/v1/write"),
        vec![first, second],
    ));
    eprintln!(
        "{name}: {} series x {points} samples loaded in {:.1} s",
        METRICS * SHARDS * INSTANCES,
        loaded.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(15));
    let before = cpu();
    std::thread::sleep(IDLE_WINDOW);
    let idle = cpu() - before;

    std::fs::write(rule_file, rules()).unwrap();
    // SAFETY: kill has no memory preconditions; pid is the server's.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    std::thread::sleep(SETTLE);
    let values =
        |metric: &str| runtime.block_on(metric_values(base, &format!("{prefix}_{metric}")));
    let sum = |metric: &str| values(metric).iter().sum::<f64>();
    let durations = || values("rule_group_last_duration_seconds");
    assert_eq!(
        durations().len(),
        METRICS,
        "{name}: the groups did not load"
    );
    let missed_before = sum("rule_group_iterations_missed_total");
    let failures_before = sum("rule_evaluation_failures_total");
    let before = cpu();
    let started = Instant::now();
    let (mut slowest, mut mean_sum, mut mean_n) = (0.0f64, 0.0f64, 0.0f64);
    while started.elapsed() < RULES_WINDOW {
        std::thread::sleep(Duration::from_secs(5));
        let durations = durations();
        for d in &durations {
            slowest = slowest.max(*d);
        }
        mean_sum += durations.iter().sum::<f64>() / durations.len().max(1) as f64;
        mean_n += 1.0;
    }
    let used = cpu() - before;
    let missed = sum("rule_group_iterations_missed_total") - missed_before;
    let failures = sum("rule_evaluation_failures_total") - failures_before;
    let recorded = runtime.block_on(instant(base, "count({__name__=~\"job_shard:.+\"})"));
    let firing = runtime.block_on(instant(base, "count(ALERTS{alertstate=\"firing\"})"));
    let intervals = RULES_WINDOW.as_secs_f64() / 15.0;
    Figures {
        name,
        idle_cpu: idle / (IDLE_WINDOW.as_secs_f64() / 15.0),
        rules_cpu: used / intervals,
        slowest_group_s: slowest,
        mean_group_s: mean_sum / mean_n.max(1.0),
        missed,
        failures,
        recorded,
        firing,
    }
}

/// SecuMon on `storage` with the rule file `rules` (self-monitoring off, as Prometheus here
/// scrapes nothing), and its port.
fn secumon(storage: &str, rules: &Path) -> (support::process::Managed, u16) {
    let port = free_port();
    let rules = rules.display().to_string();
    let server = spawn_secumon(
        storage,
        port,
        &["--rules", &rules, "--self-monitor-interval-secs", "0"],
    );
    (server, port)
}

fn main() {
    let only = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .unwrap_or_default();
    let runs = |name: &str| only.is_empty() || only == name;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = "groups: []\n";
    let mut figures = Vec::new();

    if runs("embedded") {
        let file = dir.path().join("embedded.yml");
        std::fs::write(&file, empty).unwrap();
        let data = dir.path().join("embedded-data");
        let (server, port) = secumon(&data.display().to_string(), &file);
        let pid = server.pid();
        figures.push(measure(
            &runtime,
            "SecuMon, embedded engine",
            &format!("http://127.0.0.1:{port}"),
            pid,
            &|| cpu_seconds(pid),
            "secumon",
            &file,
        ));
    }
    if runs("postgres") {
        let postgres = support::Postgres::shared();
        let database = runtime.block_on(postgres.database());
        let file = dir.path().join("postgres.yml");
        std::fs::write(&file, empty).unwrap();
        let (server, port) = secumon(&database, &file);
        let pid = server.pid();
        let postmaster = listener_pid(postgres.port);
        figures.push(measure(
            &runtime,
            "SecuMon on PostgreSQL (+ PostgreSQL's CPU)",
            &format!("http://127.0.0.1:{port}"),
            pid,
            &|| cpu_seconds(pid) + tree_cpu_seconds(postmaster),
            "secumon",
            &file,
        ));
    }
    if runs("prometheus") {
        let file = dir.path().join("prometheus-rules.yml");
        std::fs::write(&file, empty).unwrap();
        let path = file.display().to_string();
        let prometheus = support::Prometheus::start(|_| {
            format!(
                "global:\n  scrape_interval: 1h\n  evaluation_interval: 15s\nrule_files:\n  - {path}\n"
            )
        });
        let pid = listener_pid(prometheus.port);
        figures.push(measure(
            &runtime,
            "Prometheus 2.42",
            &prometheus.base,
            pid,
            &|| cpu_seconds(pid),
            "prometheus",
            &file,
        ));
    }

    println!(
        "\n{} recording + {} alerting rules in {METRICS} groups over {} series, 15 s interval",
        METRICS * SHARDS,
        METRICS * SHARDS,
        METRICS * SHARDS * INSTANCES
    );
    println!(
        "CPU seconds per 15 s interval (whole process; mean over {} s with rules, {} s without)\n",
        RULES_WINDOW.as_secs(),
        IDLE_WINDOW.as_secs()
    );
    println!("| server | CPU-s / interval with rules | without rules | evaluation (difference) | slowest group s | mean group s | missed iterations | failed evaluations | recorded series | firing alerts |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for f in &figures {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {} | {} | {} | {} |",
            f.name,
            f.rules_cpu,
            f.idle_cpu,
            f.rules_cpu - f.idle_cpu,
            f.slowest_group_s,
            f.mean_group_s,
            f.missed,
            f.failures,
            f.recorded,
            f.firing
        );
    }
    for f in &figures {
        assert_eq!(f.failures, 0.0, "{}: evaluations failed", f.name);
        assert_eq!(
            f.recorded,
            (METRICS * SHARDS * 10) as f64,
            "{}: recorded series",
            f.name
        );
        assert_eq!(
            f.firing,
            (METRICS * SHARDS) as f64,
            "{}: firing alerts",
            f.name
        );
    }
}
