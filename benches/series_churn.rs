//! Series churn beside Prometheus 2.42 and VictoriaMetrics 1.79, one after the other in one
//! run, on the same remote-write bodies: 100,000 active series (the label sets of
//! `storage_peers`, plus a `pid`) of which a tenth is replaced every 15 simulated minutes, over
//! 24 simulated hours at one sample every 3 minutes: 48 M samples, 1,050,000 distinct series.
//! Each 15-minute round sends every active series' five samples (2,000 series a request, over
//! two connections). For each server:
//!
//! - resident set: at the end (after its flush and compaction settled), its peak, and its
//!   slope over the second half of the load (MiB per simulated hour, a least-squares fit of
//!   one reading a second);
//! - whole data directory bytes per sample, once flushed and compacted; and SecuMon's again
//!   once its log was compacted (it waits until the log has been quiet for a sixteenth of the
//!   out-of-order window: about 4 minutes), settled as the peers' figures are
//!   (VictoriaMetrics's merged by force, Prometheus's blocks written);
//! - ingest: samples/s and server CPU-seconds per million samples;
//! - latency (median of 21 warm runs) of `sum by (job) (rate(...[5m]))` over the last hour
//!   (1 min steps) and over the whole 24 h (15 min steps), of a regex matcher over the whole
//!   24 h, and of `/api/v1/label/job/values` (20 values), `/api/v1/label/pid/values` (one a
//!   series) and `/api/v1/labels` over the 24 h (1,050,000 series in the index).
//!
//! `cargo bench --bench series_churn [-- --hours N] [--hold]`
//! (`--hold` keeps the loaded SecuMon up for ten minutes after its phase, for profiling)
//! (`apt-get install prometheus victoria-metrics` first).

mod common;
#[path = "common/peers.rs"]
mod peers;
#[path = "../tests/integration/support/mod.rs"]
mod support;

use common::{
    cpu_seconds, dir_bytes, get, labels_of, metric, peak_rss_mib, push, rss_mib, time_get,
    time_query, value, Options,
};
use secumon_proto::prometheus::{Label, Sample, TimeSeries};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::process::{free_port, spawn_secumon, temp_dir};

const SLOTS: usize = 100_000;
/// One sample every 3 minutes.
const STEP_MS: i64 = 180_000;
/// A round is 15 minutes: five samples of every active series.
const ROUND_STEPS: usize = 5;
const SERIES_PER_REQUEST: usize = 2_000;
const HOUR: i64 = 3_600_000;

/// How many times slot `slot`'s series was replaced by round `round`: at the start of round
/// r (r >= 1), the slots with `slot % 10 == r % 10` get a new series.
fn generation(slot: usize, round: usize) -> usize {
    let c = slot % 10;
    if c == 0 {
        round / 10
    } else if round < c {
        0
    } else {
        (round - c) / 10 + 1
    }
}

/// The labels of slot `slot`'s series in round `round`: `storage_peers`'s, plus a `pid`
/// unique to the series (sorted by name: `pid` goes between `path` and `status`).
fn labels(slot: usize, round: usize) -> Vec<Label> {
    let mut labels = labels_of(slot);
    let pid = generation(slot, round) * SLOTS + slot;
    let at = labels
        .iter()
        .position(|l| l.name.as_str() > "pid")
        .unwrap_or(labels.len());
    labels.insert(
        at,
        Label {
            name: "pid".into(),
            value: pid.to_string(),
        },
    );
    labels
}

fn encode(rounds: usize, t0: i64) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    for round in 0..rounds {
        for first in (0..SLOTS).step_by(SERIES_PER_REQUEST) {
            let timeseries = (first..first + SERIES_PER_REQUEST)
                .map(|slot| TimeSeries {
                    labels: labels(slot, round),
                    samples: (0..ROUND_STEPS)
                        .map(|k| {
                            let n = round * ROUND_STEPS + k;
                            Sample {
                                value: value(slot, n),
                                timestamp: t0 + n as i64 * STEP_MS,
                            }
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect();
            bodies.push(common::snappy_body(timeseries));
        }
    }
    bodies
}

/// Readings of a process's resident set, one a second, while a load runs.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, f64)>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            let mut readings = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                readings.push((began.elapsed().as_secs_f64(), rss_mib(pid)));
                std::thread::sleep(Duration::from_secs(1));
            }
            readings
        });
        RssSampler { stop, thread }
    }

    /// The least-squares slope over the second half of the readings, in MiB per simulated
    /// hour (the load spread evenly over `hours`).
    fn stop(self, hours: f64) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let readings = self.thread.join().unwrap();
        let Some(&(last, _)) = readings.last() else {
            return 0.0;
        };
        let half: Vec<(f64, f64)> = readings
            .into_iter()
            .filter(|(t, _)| *t >= last / 2.0)
            .collect();
        let n = half.len() as f64;
        if n < 2.0 {
            return 0.0;
        }
        let (mx, my) = (
            half.iter().map(|p| p.0).sum::<f64>() / n,
            half.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let sxy: f64 = half.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let sxx: f64 = half.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let per_second = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        per_second * last / hours
    }
}

struct Measured {
    name: &'static str,
    rate: f64,
    cpu_per_million: f64,
    dir_bytes_per_sample: f64,
    /// The whole directory once the server's own compaction settled (SecuMon: its log
    /// compacted after the load; the peers: as `dir_bytes_per_sample`, read settled).
    settled_bytes_per_sample: f64,
    rss_end_mib: f64,
    rss_peak_mib: f64,
    rss_slope: f64,
    latencies_ms: Vec<f64>,
}

/// The queries, each with its start and step; then the label endpoints.
fn queries(end: i64, hours: i64) -> Vec<(&'static str, String, i64, u64)> {
    let rate = "sum by (job) (rate(http_server_requests_seconds_bucket_7[5m]))";
    vec![
        ("sum by (job) (rate), 1 h", rate.into(), end - HOUR, 60),
        ("sum by (job) (rate), whole range", rate.into(), end - hours * HOUR, 900),
        (
            "regex matcher, whole range",
            "count by (job) (http_server_requests_seconds_bucket_7{path=~\"/api/v1/resource/1.*\"})"
                .into(),
            end - hours * HOUR,
            900,
        ),
    ]
}

/// Label endpoints over the whole range: a label of a few values and one of a million (each
/// series' own), with every series in the index; and the names.
const LABEL_QUERIES: [(&str, &str); 3] = [
    ("label job values", "/api/v1/label/job/values"),
    ("label pid values", "/api/v1/label/pid/values"),
    ("label names", "/api/v1/labels"),
];

fn measure_queries(name: &str, base: &str, end: i64, hours: i64) -> Vec<f64> {
    let mut out = Vec::new();
    for (label, q, start, step) in queries(end, hours) {
        let (ms, series) = time_query(base, &q, start, end, step);
        eprintln!("{name}: {label}: {ms:.1} ms, {series} series");
        assert!(series > 0, "{name} answered {label} with nothing");
        out.push(ms);
    }
    let range = format!("start={}&end={}", (end - hours * HOUR) / 1000, end / 1000);
    for (label, path) in LABEL_QUERIES {
        let (ms, answer) = time_get(&format!("{base}{path}?{range}"));
        let n = answer["data"].as_array().map_or(0, Vec::len);
        eprintln!("{name}: {label}: {ms:.1} ms, {n} values");
        assert!(n > 0, "{name} answered {label} with nothing");
        out.push(ms);
    }
    out
}

fn main() {
    let hours = common::arg("--hours", 24) as i64;
    let rounds = (hours * HOUR / (ROUND_STEPS as i64 * STEP_MS)) as usize;
    let o = Options {
        series: SLOTS,
        series_per_request: SERIES_PER_REQUEST,
        samples_per_series: ROUND_STEPS,
        rounds,
        connections: 2,
    };
    let points = (rounds * ROUND_STEPS) as i64;
    let t0 = (chrono::Utc::now().timestamp_millis() - points * STEP_MS - 120_000) / HOUR * HOUR;
    let end = t0 + (points - 1) * STEP_MS;
    let distinct = SLOTS + (1..rounds).count() * SLOTS / 10;
    eprintln!(
        "encoding {} samples of {distinct} series ({SLOTS} active)",
        o.total_samples()
    );
    let bodies = Arc::new(encode(rounds, t0));
    let mut results = Vec::new();

    // SecuMon, embedded engine, default settings but a short maintenance interval.
    {
        let dir = temp_dir("secumon-churn");
        let port = free_port();
        let server = spawn_secumon(
            &dir.join("data").display().to_string(),
            port,
            // A label of a million values answers past the default metadata limit (500,000):
            // Prometheus 2.42 and VictoriaMetrics 1.79 have none for label values.
            // Its own metrics off: written at the wall clock's time, they would move the flush
            // cutoff (an hour behind the newest sample) past the load's last samples while
            // the benchmark waits for compaction, and the head would hold no active series at
            // the end, unlike Prometheus's.
            &[
                "--embedded-flush-interval-secs",
                "10",
                "--query-max-series",
                "2000000",
                "--self-monitor-interval-secs",
                "0",
            ],
        );
        let base = format!("http://127.0.0.1:{port}");
        let sampler = RssSampler::start(server.pid());
        let cpu_before = cpu_seconds(server.pid());
        let outcome = push(&format!("{base}/api/v1/write"), bodies.clone(), &o);
        let cpu = cpu_seconds(server.pid()) - cpu_before;
        // Log compactions so far: one after this (the load's last write) leaves it settled.
        let compactions = metric(
            &get(&format!("{base}/metrics")),
            "secumon_storage_log_compactions",
        );
        eprintln!(
            "SecuMon: ingest {:.0} samples/s, {:.2} CPU-s per 1M samples",
            outcome.accepted as f64 / outcome.seconds,
            cpu / (outcome.accepted as f64 / 1e6)
        );
        let rss_slope = sampler.stop(hours as f64);
        // Flushed (all but the out-of-order window's hour) and compacted: the block count
        // unchanged across two whole maintenance runs (a run can take long: a closed day).
        let page = || get(&format!("{base}/metrics"));
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut blocks = metric(&page(), "secumon_storage_blocks");
        loop {
            let runs = metric(&page(), "secumon_storage_lifecycle_runs");
            while metric(&page(), "secumon_storage_lifecycle_runs") < runs + 2.0 {
                assert!(
                    Instant::now() < deadline,
                    "SecuMon's maintenance did not settle"
                );
                std::thread::sleep(Duration::from_secs(1));
            }
            let now = metric(&page(), "secumon_storage_blocks");
            if now == blocks {
                break;
            }
            blocks = now;
        }
        let page = get(&format!("{base}/metrics"));
        eprintln!(
            "SecuMon: {} series in memory, {} forgotten, longest writer wait on a maintenance step {:.1} ms",
            metric(&page, "secumon_storage_series_in_memory"),
            metric(&page, "secumon_storage_head_series_removed"),
            1e3 * metric(&page, "secumon_storage_maintenance_writer_hold_max_seconds")
        );
        let dir_bytes_per_sample = dir_bytes(&dir.join("data")) as f64 / outcome.accepted as f64;
        let (rss_end_mib, rss_peak_mib) = (rss_mib(server.pid()), peak_rss_mib(server.pid()));
        let latencies_ms = measure_queries("SecuMon", &base, end, hours);
        let settled_bytes_per_sample = common::secumon_settled_bytes_per_sample(
            &base,
            &dir.join("data"),
            compactions,
            outcome.accepted as f64,
            (dir_bytes_per_sample, "with its blocks settled"),
        );
        results.push(Measured {
            name: "SecuMon embedded",
            rate: outcome.accepted as f64 / outcome.seconds,
            cpu_per_million: cpu / (outcome.accepted as f64 / 1e6),
            dir_bytes_per_sample,
            settled_bytes_per_sample,
            rss_end_mib,
            rss_peak_mib,
            rss_slope,
            latencies_ms,
        });
        if std::env::args().any(|a| a == "--hold") {
            // For profiling: keep the loaded server up for ten minutes.
            eprintln!("holding SecuMon at {base} (pid {})", server.pid());
            std::thread::sleep(Duration::from_secs(600));
            return;
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Prometheus 2.42.
    {
        let prometheus = support::Prometheus::start(|_| "global:\n  scrape_interval: 1h\n".into());
        let pid = common::listener_pid(prometheus.port);
        let sampler = RssSampler::start(pid);
        let cpu_before = cpu_seconds(pid);
        let outcome = push(&prometheus.url("/api/v1/write"), bodies.clone(), &o);
        let cpu = cpu_seconds(pid) - cpu_before;
        let rss_slope = sampler.stop(hours as f64);
        peers::prometheus_blocks_settled(&prometheus.data_dir);
        let bytes = dir_bytes(&prometheus.data_dir) as f64 / outcome.accepted as f64;
        results.push(Measured {
            name: "Prometheus 2.42",
            rate: outcome.accepted as f64 / outcome.seconds,
            cpu_per_million: cpu / (outcome.accepted as f64 / 1e6),
            dir_bytes_per_sample: bytes,
            settled_bytes_per_sample: bytes,
            rss_end_mib: rss_mib(pid),
            rss_peak_mib: peak_rss_mib(pid),
            rss_slope,
            latencies_ms: measure_queries("Prometheus", &prometheus.base, end, hours),
        });
    }

    // VictoriaMetrics 1.79.
    {
        let vm = peers::VictoriaMetrics::start();
        let pid = vm.server.pid();
        let sampler = RssSampler::start(pid);
        let cpu_before = cpu_seconds(pid);
        let outcome = push(&format!("{}/api/v1/write", vm.base), bodies.clone(), &o);
        get(&format!("{}/internal/force_flush", vm.base));
        let cpu = cpu_seconds(pid) - cpu_before;
        let rss_slope = sampler.stop(hours as f64);
        let bytes = vm.settle();
        results.push(Measured {
            name: "VictoriaMetrics 1.79",
            rate: outcome.accepted as f64 / outcome.seconds,
            cpu_per_million: cpu / (outcome.accepted as f64 / 1e6),
            dir_bytes_per_sample: bytes / outcome.accepted as f64,
            settled_bytes_per_sample: bytes / outcome.accepted as f64,
            rss_end_mib: rss_mib(pid),
            rss_peak_mib: peak_rss_mib(pid),
            rss_slope,
            latencies_ms: measure_queries("VictoriaMetrics", &vm.base, end, hours),
        });
    }

    println!(
        "\n{hours} simulated hours: {SLOTS} active series, a tenth replaced every 15 min ({distinct} series), one sample every 3 min, {} samples; {SERIES_PER_REQUEST} series x {ROUND_STEPS} samples per request, {} connections\n",
        o.total_samples(),
        o.connections
    );
    let names: Vec<&str> = queries(end, hours)
        .iter()
        .map(|q| q.0)
        .chain(LABEL_QUERIES.iter().map(|q| q.0))
        .collect();
    let rows: Vec<(Vec<String>, &[f64])> = results
        .iter()
        .map(|r| {
            let cells = vec![
                r.name.to_owned(),
                format!("{:.0}", r.rss_end_mib),
                format!("{:.0}", r.rss_peak_mib),
                format!("{:.1}", r.rss_slope),
                format!("{:.2}", r.dir_bytes_per_sample),
                format!("{:.2}", r.settled_bytes_per_sample),
                format!("{:.0}", r.rate),
                format!("{:.2}", r.cpu_per_million),
            ];
            (cells, r.latencies_ms.as_slice())
        })
        .collect();
    common::print_table(
        &[
            "server",
            "RSS at end MiB",
            "peak RSS MiB",
            "RSS slope MiB per simulated h",
            "bytes/sample whole dir",
            "bytes/sample whole dir settled",
            "samples/s",
            "CPU-s per 1M samples",
        ],
        &names,
        &rows,
    );
    let (s, p, v) = (&results[0], &results[1], &results[2]);
    println!("\nratios (SecuMon / peer; below 1 is better for SecuMon):");
    for (what, ours, theirs) in [
        ("RSS at end", s.rss_end_mib, (p.rss_end_mib, v.rss_end_mib)),
        ("peak RSS", s.rss_peak_mib, (p.rss_peak_mib, v.rss_peak_mib)),
        (
            "bytes per sample",
            s.dir_bytes_per_sample,
            (p.dir_bytes_per_sample, v.dir_bytes_per_sample),
        ),
        (
            "bytes per sample, SecuMon's log compacted",
            s.settled_bytes_per_sample,
            (p.settled_bytes_per_sample, v.settled_bytes_per_sample),
        ),
        (
            "CPU per sample",
            s.cpu_per_million,
            (p.cpu_per_million, v.cpu_per_million),
        ),
    ] {
        println!(
            "- {what}: vs Prometheus {:.2}, vs VictoriaMetrics {:.2}",
            ours / theirs.0,
            ours / theirs.1
        );
    }
    for (i, name) in names.iter().enumerate() {
        println!(
            "- {name} latency: vs Prometheus {:.2}, vs VictoriaMetrics {:.2}",
            s.latencies_ms[i] / p.latencies_ms[i],
            s.latencies_ms[i] / v.latencies_ms[i]
        );
    }
}
