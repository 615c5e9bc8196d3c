//! The embedded engine beside Prometheus 2.42 and VictoriaMetrics 1.79, one after the other in
//! one run, on the same data: 100,000 active series with realistic labels and values
//! (counters, slow bucket-like counters, gauges with two decimals), 24 M samples over 4 hours,
//! pushed through remote-write by the same sender. For each server:
//!
//! - ingest: samples/s and server CPU-seconds per million samples;
//! - disk: bytes per sample once each has flushed and compacted: its whole data directory
//!   over all samples (the headline), and its persisted part over the samples in it (SecuMon:
//!   its blocks whole, raw chunks, rollups and series indexes; Prometheus: its blocks, chunks
//!   and index; VictoriaMetrics: its whole store, as it has no other part); and SecuMon's
//!   whole directory again once its log was compacted (it waits until the log has been quiet
//!   for a sixteenth of the out-of-order window: about 4 minutes), settled as the peers'
//!   figures are (VictoriaMetrics's merged by force, Prometheus's blocks written);
//! - memory: peak RSS per active series;
//! - query latency (median of warm runs) on the loaded data: a selector, `rate` summed by a
//!   label, a regex matcher (each a range query over the last hour at 1 min steps), and the
//!   summed rate over all 4 hours (which reads flushed data).
//!
//! A second load, `--scenario node`: 100,000 node_exporter-like series (1,000 hosts of 64
//! `node_cpu_seconds_total` series and 36 others), 100 samples each at 15 s, 2,000 series per
//! request over 2 connections: recent data, all of it within the head's hour; disk is each
//! server's whole directory 40 s after the load (VictoriaMetrics: flushed and merged), and the
//! queries (range queries over the last hour at 15 s steps) include the heavy aggregation
//! `sum by (job) (rate(node_cpu_seconds_total[5m]))` over 64,000 series.
//!
//! `cargo bench --bench storage_peers [-- --scenario steady|node --series N --rounds N --connections N]`
//! (`--hold` keeps the loaded SecuMon up for ten minutes after its phase, for profiling)
//! (`--ingest-only N` instead loads SecuMon and VictoriaMetrics alone, N rounds, taking
//! turns, on fresh directories, and reports each round's ingest figures and the median ratios:
//! for changes to the write path on a machine whose speed varies over minutes;
//! `SECUMON_BENCH_BINARY_B=<path>` adds a second build to each round)
//! (`apt-get install prometheus victoria-metrics` first).

mod common;
#[path = "common/peers.rs"]
mod peers;
#[path = "../tests/integration/support/mod.rs"]
mod support;

use common::{
    cpu_seconds, dir_bytes, get, listener_pid, metric, mix, peak_rss_mib, push, time_query, value,
    wait_stable, Options,
};
use secumon_proto::prometheus::Label;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::process::{free_port, spawn_secumon, temp_dir};

/// The load: see the module's documentation.
#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Steady,
    Node,
}

impl Scenario {
    fn from_args() -> Scenario {
        let args: Vec<String> = std::env::args().collect();
        match args.iter().position(|a| a == "--scenario") {
            None => Scenario::Steady,
            Some(i) => match args.get(i + 1).map(String::as_str) {
                Some("steady") => Scenario::Steady,
                Some("node") => Scenario::Node,
                other => panic!("--scenario steady|node, not {other:?}"),
            },
        }
    }

    fn interval_ms(self) -> i64 {
        match self {
            Scenario::Steady => 60_000,
            Scenario::Node => 15_000,
        }
    }

    fn defaults(self) -> Options {
        match self {
            Scenario::Steady => Options {
                series: 100_000,
                series_per_request: 1_000,
                samples_per_series: 2,
                rounds: 120,
                connections: 4,
            },
            Scenario::Node => Options {
                series: 100_000,
                series_per_request: 2_000,
                samples_per_series: 1,
                rounds: 100,
                connections: 2,
            },
        }
    }

    /// Range queries: label, query, start; each ends at the last sample.
    fn queries(self, end: i64) -> Vec<(&'static str, String, i64)> {
        let hour = 3_600_000;
        match self {
            Scenario::Steady => vec![
                (
                    "selector",
                    "http_server_requests_seconds_bucket_7".into(),
                    end - hour,
                ),
                (
                    "sum by (job) (rate)",
                    "sum by (job) (rate(http_server_requests_seconds_bucket_7[5m]))".into(),
                    end - hour,
                ),
                (
                    "regex matcher",
                    "http_server_requests_seconds_bucket_7{path=~\"/api/v1/resource/1.*\"}".into(),
                    end - hour,
                ),
                (
                    "sum by (job) (rate), 4 h",
                    "sum by (job) (rate(http_server_requests_seconds_bucket_7[5m]))".into(),
                    end - 4 * hour,
                ),
            ],
            Scenario::Node => vec![
                (
                    "selector",
                    "node_memory_MemAvailable_bytes".into(),
                    end - hour,
                ),
                (
                    "sum by (job) (rate(node_cpu_seconds_total[5m])), 64k series",
                    "sum by (job) (rate(node_cpu_seconds_total[5m]))".into(),
                    end - hour,
                ),
                (
                    "regex matcher",
                    "node_filesystem_avail_bytes{device=~\"dev1.*\"}".into(),
                    end - hour,
                ),
                (
                    "sum by (instance) (rate(network))",
                    "sum by (instance) (rate(node_network_receive_bytes_total[5m]))".into(),
                    end - hour,
                ),
            ],
        }
    }

    fn step_secs(self) -> u64 {
        self.interval_ms() as u64 / 1000
    }
}

/// The modes of `node_cpu_seconds_total` and each one's share of a CPU's time.
const CPU_MODES: [(&str, f64); 8] = [
    ("idle", 0.80),
    ("iowait", 0.01),
    ("irq", 0.001),
    ("nice", 0.001),
    ("softirq", 0.005),
    ("steal", 0.001),
    ("system", 0.06),
    ("user", 0.122),
];

/// Series `i` of the node load: host `i / 100`; of its 100 series, 64 are
/// `node_cpu_seconds_total` (8 CPUs, 8 modes), then memory, filesystems, network and disks.
fn node_labels_of(i: usize) -> Vec<Label> {
    let host = i / 100;
    let k = i % 100;
    let mut labels = vec![
        label("instance", format!("host-{host:04}:9100")),
        label(
            "job",
            ["node", "node-db", "node-web", "node-cache"][host % 4].into(),
        ),
    ];
    if k < 64 {
        labels.push(label("__name__", "node_cpu_seconds_total".into()));
        labels.push(label("cpu", (k / 8).to_string()));
        labels.push(label("mode", CPU_MODES[k % 8].0.into()));
    } else if k == 64 {
        labels.push(label("__name__", "node_memory_MemAvailable_bytes".into()));
    } else {
        let name = [
            "node_filesystem_avail_bytes",
            "node_network_receive_bytes_total",
            "node_disk_read_bytes_total",
        ][(k - 65) % 3];
        labels.push(label("__name__", name.into()));
        labels.push(label("device", format!("dev{}", (k - 65) / 3)));
    }
    labels.sort_by(|a, b| a.name.cmp(&b.name));
    labels
}

fn label(name: &str, value: String) -> Label {
    Label {
        name: name.into(),
        value,
    }
}

/// Sample `n` of node series `i`: CPU seconds as node_exporter reports them (a counter with
/// two decimals growing by its mode's share of each 15 s), the rest as the steady load's.
fn node_value(i: usize, n: usize) -> f64 {
    let k = i % 100;
    if k >= 64 {
        return value(i, n);
    }
    let grown = (i / 100) as f64 * 1000.0 + n as f64 * 15.0 * CPU_MODES[k % 8].1;
    let jitter = (mix(i, n) % 2) as f64 * 0.01;
    ((grown + jitter) * 100.0).round() / 100.0
}

struct Measured {
    name: &'static str,
    rate: f64,
    cpu_per_million: f64,
    persisted_bytes_per_sample: f64,
    dir_bytes_per_sample: f64,
    /// The whole directory once the server's own compaction settled (SecuMon: its log
    /// compacted after the load; the peers: as `dir_bytes_per_sample`, read settled).
    settled_bytes_per_sample: f64,
    rss_mib: f64,
    queries_ms: Vec<f64>,
}

fn run_queries(scenario: Scenario, name: &str, base: &str, end: i64) -> Vec<f64> {
    scenario
        .queries(end)
        .into_iter()
        .map(|(label, q, start)| {
            let (ms, series) = time_query(base, &q, start, end, scenario.step_secs());
            eprintln!("{name}: {label}: {ms:.1} ms, {series} series");
            assert!(series > 0, "{name} answered {label} with nothing");
            ms
        })
        .collect()
}

/// Idle and total jiffies of the whole machine (from /proc/stat).
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (idle, fields.iter().sum())
}

/// The share of the machine's CPU time left idle since `before`.
fn idle_since(before: (u64, u64)) -> f64 {
    let now = machine_jiffies();
    (now.0 - before.0) as f64 / (now.1 - before.1).max(1) as f64
}

/// SecuMon's flags in both modes: default settings but a short maintenance interval, so
/// that flushes (and their CPU) fall within the run (the default is every 5 minutes), and its
/// own metrics not recorded: as Prometheus here (which scrapes nothing), it then holds only
/// the load (its own samples would be counted in its directory and in no peer's).
const SECUMON_FLAGS: &[&str] = &[
    "--embedded-flush-interval-secs",
    "10",
    "--self-monitor-interval-secs",
    "0",
];

/// `--ingest-only N`: the number of rounds to load.
fn ingest_only_pairs() -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--ingest-only")?;
    Some(
        args.get(i + 1)
            .and_then(|n| n.parse().ok())
            .expect("--ingest-only N"),
    )
}

/// Ingest alone, SecuMon (with [`SECUMON_FLAGS`], as in the full run) and VictoriaMetrics taking turns on fresh
/// directories: samples/s, CPU-seconds per million samples and the machine's idle share
/// during each load, and their ratios. With `SECUMON_BENCH_BINARY_B` set, that build
/// takes its turn too (after the one under test), for an A/B comparison of two builds.
fn ingest_pairs(rounds: usize, bodies: Arc<Vec<Vec<u8>>>, o: &Options) {
    let builds: Vec<Option<String>> = std::iter::once(std::env::var("SECUMON_BENCH_BINARY").ok())
        .chain(std::env::var("SECUMON_BENCH_BINARY_B").ok().map(Some))
        .collect();
    let measure = |pid: u32, url: &str| {
        let cpu_before = cpu_seconds(pid);
        let machine = machine_jiffies();
        let outcome = push(url, bodies.clone(), o);
        let cpu = cpu_seconds(pid) - cpu_before;
        Load {
            rate: outcome.accepted as f64 / outcome.seconds,
            cpu_per_million: cpu / (outcome.accepted as f64 / 1e6),
            idle: idle_since(machine),
        }
    };
    let mut names: Vec<String> = (0..builds.len())
        .map(|i| ["SecuMon", "SecuMon B"][i].to_owned())
        .collect();
    names.push("VictoriaMetrics".into());
    let mut table: Vec<Vec<Load>> = Vec::new();
    for round in 1..=rounds {
        let mut row = Vec::new();
        for build in &builds {
            match build {
                Some(path) => std::env::set_var("SECUMON_BENCH_BINARY", path),
                None => std::env::remove_var("SECUMON_BENCH_BINARY"),
            }
            let dir = temp_dir("secumon-peers");
            let port = free_port();
            let server =
                spawn_secumon(&dir.join("data").display().to_string(), port, SECUMON_FLAGS);
            row.push(measure(
                server.pid(),
                &format!("http://127.0.0.1:{port}/api/v1/write"),
            ));
            drop(server);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let vm = peers::VictoriaMetrics::start();
        row.push(measure(
            vm.server.pid(),
            &format!("{}/api/v1/write", vm.base),
        ));
        drop(vm);
        let cells: Vec<String> = row
            .iter()
            .zip(&names)
            .map(|(l, name)| {
                format!(
                    "{name} {:.0} samples/s, {:.2} CPU-s/1M, {:.0} % idle",
                    l.rate,
                    l.cpu_per_million,
                    100.0 * l.idle
                )
            })
            .collect();
        println!("round {round}: {}", cells.join("; "));
        table.push(row);
    }
    let median = |f: &dyn Fn(&[Load]) -> f64| {
        let mut v: Vec<f64> = table.iter().map(|row| f(row)).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let vm = builds.len();
    for (i, name) in names.iter().enumerate().take(vm) {
        println!(
            "median of {rounds} rounds, {name} / VictoriaMetrics: samples/s {:.2}, CPU per sample {:.2}",
            median(&|r| r[i].rate / r[vm].rate),
            median(&|r| r[i].cpu_per_million / r[vm].cpu_per_million)
        );
    }
    if vm == 2 {
        println!(
            "median of {rounds} rounds, SecuMon / SecuMon B: samples/s {:.2}, CPU per sample {:.2}",
            median(&|r| r[0].rate / r[1].rate),
            median(&|r| r[0].cpu_per_million / r[1].cpu_per_million)
        );
    }
}

/// One load's figures in [`ingest_pairs`].
struct Load {
    rate: f64,
    cpu_per_million: f64,
    idle: f64,
}

fn main() {
    let scenario = Scenario::from_args();
    let o = Options::from_args(scenario.defaults());
    let interval_ms = scenario.interval_ms();
    let total = o.total_samples();
    let points = (o.rounds * o.samples_per_series) as i64;
    let t0 = chrono::Utc::now().timestamp_millis() - points * interval_ms - 120_000;
    let end = t0 + (points - 1) * interval_ms;
    eprintln!("encoding {total} samples of {} series", o.series);
    let bodies = Arc::new(match scenario {
        Scenario::Steady => common::encode_requests(&o, t0, interval_ms, value),
        Scenario::Node => {
            common::encode_requests_of(&o, t0, interval_ms, node_labels_of, node_value)
        }
    });
    if let Some(pairs) = ingest_only_pairs() {
        ingest_pairs(pairs, bodies, &o);
        return;
    }
    // The node load's figures are read this long after it ends, as a user looking at a
    // server just loaded would.
    let after_load = Duration::from_secs(40);
    let url_of = |port: u16| format!("http://127.0.0.1:{port}");
    let mut results = Vec::new();

    // SecuMon, embedded engine, with `SECUMON_FLAGS`.
    {
        let dir = temp_dir("secumon-peers");
        let port = free_port();
        let server = spawn_secumon(&dir.join("data").display().to_string(), port, SECUMON_FLAGS);
        let base = url_of(port);
        let cpu_before = cpu_seconds(server.pid());
        let outcome = push(&format!("{base}/api/v1/write"), bodies.clone(), &o);
        let cpu = cpu_seconds(server.pid()) - cpu_before;
        // Log compactions so far: one after this (the load's last write) leaves it settled.
        let compactions = metric(
            &get(&format!("{base}/metrics")),
            "secumon_storage_log_compactions",
        );
        let rate = outcome.accepted as f64 / outcome.seconds;
        let cpu_per_million = cpu / (outcome.accepted as f64 / 1e6);
        eprintln!("SecuMon: ingest {rate:.0} samples/s, {cpu_per_million:.2} CPU-s per 1M samples");
        if scenario == Scenario::Node {
            std::thread::sleep(after_load);
        }
        // Everything older than the out-of-order window (1 h) behind the newest sample goes
        // to blocks: all but the last 61 samples of each series of the steady load, none of
        // the node load (25 minutes).
        let expected = match scenario {
            Scenario::Steady => (o.series * (points as usize).saturating_sub(61)) as f64,
            Scenario::Node => 0.0,
        };
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let now = metric(
                &get(&format!("{base}/metrics")),
                "secumon_storage_block_samples",
            );
            if now >= expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SecuMon did not flush: {now} of {expected}"
            );
            std::thread::sleep(Duration::from_secs(2));
        }
        // Then let compaction settle: the block count unchanged over two maintenance runs.
        if scenario == Scenario::Steady {
            wait_stable(
                "SecuMon's compaction",
                Duration::from_secs(25),
                Duration::from_secs(900),
                || metric(&get(&format!("{base}/metrics")), "secumon_storage_blocks"),
            );
        }
        let page = get(&format!("{base}/metrics"));
        let block_samples = metric(&page, "secumon_storage_block_samples");
        let block_bytes = metric(&page, "secumon_storage_disk_bytes{kind=\"chunks\"}");
        let rollup_bytes = metric(&page, "secumon_storage_disk_bytes{kind=\"rollups\"}");
        eprintln!(
            "SecuMon: {block_samples} samples in blocks: raw chunks and series indexes {:.2} bytes/sample, 5m+1h rollups {:.2} bytes/raw sample",
            block_bytes / block_samples,
            rollup_bytes / block_samples
        );
        eprintln!(
            "SecuMon: longest writer wait on a maintenance step {:.1} ms",
            1e3 * metric(&page, "secumon_storage_maintenance_writer_hold_max_seconds")
        );
        let queries_ms = run_queries(scenario, "SecuMon", &base, end);
        if std::env::args().any(|a| a == "--hold") {
            // For profiling: keep the loaded server up for ten minutes.
            eprintln!("holding SecuMon at {base} (pid {})", server.pid());
            std::thread::sleep(Duration::from_secs(600));
            return;
        }
        let dir_bytes_per_sample = dir_bytes(&dir.join("data")) as f64 / outcome.accepted as f64;
        let rss_mib = peak_rss_mib(server.pid());
        let settled_bytes_per_sample = common::secumon_settled_bytes_per_sample(
            &base,
            &dir.join("data"),
            compactions,
            outcome.accepted as f64,
            (dir_bytes_per_sample, "after the queries"),
        );
        results.push(Measured {
            name: "SecuMon embedded",
            rate,
            cpu_per_million,
            persisted_bytes_per_sample: (block_bytes + rollup_bytes) / block_samples,
            dir_bytes_per_sample,
            settled_bytes_per_sample,
            rss_mib,
            queries_ms,
        });
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Prometheus 2.42: its head compacts the oldest 2 h into a block once it spans 3 h.
    {
        let prometheus = support::Prometheus::start(|_| "global:\n  scrape_interval: 1h\n".into());
        let pid = listener_pid(prometheus.port);
        let cpu_before = cpu_seconds(pid);
        let outcome = push(&prometheus.url("/api/v1/write"), bodies.clone(), &o);
        let cpu = cpu_seconds(pid) - cpu_before;
        let data = prometheus.data_dir.clone();
        let (block_bytes, block_samples) = match scenario {
            Scenario::Steady => peers::prometheus_blocks_settled(&data),
            // All in the head: nothing persisted but the WAL.
            Scenario::Node => {
                std::thread::sleep(after_load);
                (0, 0)
            }
        };
        let queries_ms = run_queries(scenario, "Prometheus", &prometheus.base, end);
        let bytes = dir_bytes(&data) as f64 / outcome.accepted as f64;
        results.push(Measured {
            name: "Prometheus 2.42",
            rate: outcome.accepted as f64 / outcome.seconds,
            cpu_per_million: cpu / (outcome.accepted as f64 / 1e6),
            persisted_bytes_per_sample: block_bytes as f64 / block_samples as f64,
            dir_bytes_per_sample: bytes,
            settled_bytes_per_sample: bytes,
            rss_mib: peak_rss_mib(pid),
            queries_ms,
        });
    }

    // VictoriaMetrics 1.79: everything goes to compressed parts; force the flush and merge.
    {
        let vm = peers::VictoriaMetrics::start();
        let pid = vm.server.pid();
        let cpu_before = cpu_seconds(pid);
        let outcome = push(&format!("{}/api/v1/write", vm.base), bodies.clone(), &o);
        get(&format!("{}/internal/force_flush", vm.base));
        let cpu = cpu_seconds(pid) - cpu_before;
        let bytes = vm.settle();
        let queries_ms = run_queries(scenario, "VictoriaMetrics", &vm.base, end);
        results.push(Measured {
            name: "VictoriaMetrics 1.79",
            rate: outcome.accepted as f64 / outcome.seconds,
            cpu_per_million: cpu / (outcome.accepted as f64 / 1e6),
            persisted_bytes_per_sample: bytes / outcome.accepted as f64,
            dir_bytes_per_sample: bytes / outcome.accepted as f64,
            settled_bytes_per_sample: bytes / outcome.accepted as f64,
            rss_mib: peak_rss_mib(pid),
            queries_ms,
        });
    }

    println!(
        "\n{} series, {} samples ({} per series, one every {} s), {} series x {} samples per request, {} connections\n",
        o.series,
        total,
        points,
        interval_ms / 1000,
        o.series_per_request,
        o.samples_per_series,
        o.connections
    );
    let names: Vec<&str> = scenario.queries(end).iter().map(|q| q.0).collect();
    let rows: Vec<(Vec<String>, &[f64])> = results
        .iter()
        .map(|r| {
            let cells = vec![
                r.name.to_owned(),
                format!("{:.0}", r.rate),
                format!("{:.2}", r.cpu_per_million),
                format!("{:.2}", r.persisted_bytes_per_sample),
                format!("{:.2}", r.dir_bytes_per_sample),
                format!("{:.2}", r.settled_bytes_per_sample),
                format!("{:.0}", r.rss_mib),
                format!("{:.2}", r.rss_mib * 1024.0 / o.series as f64),
            ];
            (cells, r.queries_ms.as_slice())
        })
        .collect();
    common::print_table(
        &[
            "server",
            "samples/s",
            "CPU-s per 1M samples",
            "bytes/sample persisted",
            "bytes/sample whole dir",
            "bytes/sample whole dir settled",
            "peak RSS MiB",
            "RSS KiB per series",
        ],
        &names,
        &rows,
    );
    let (s, p, v) = (&results[0], &results[1], &results[2]);
    println!("\nratios (SecuMon / peer; below 1 is better for SecuMon):");
    println!(
        "- CPU per sample: vs Prometheus {:.2}, vs VictoriaMetrics {:.2}",
        s.cpu_per_million / p.cpu_per_million,
        s.cpu_per_million / v.cpu_per_million
    );
    println!(
        "- whole directory bytes per sample: vs Prometheus {:.2}, vs VictoriaMetrics {:.2}",
        s.dir_bytes_per_sample / p.dir_bytes_per_sample,
        s.dir_bytes_per_sample / v.dir_bytes_per_sample
    );
    println!(
        "- the same, SecuMon's log compacted: vs Prometheus {:.2}, vs VictoriaMetrics {:.2}",
        s.settled_bytes_per_sample / p.settled_bytes_per_sample,
        s.settled_bytes_per_sample / v.settled_bytes_per_sample
    );
    if scenario == Scenario::Steady {
        println!(
            "- persisted bytes per sample (SecuMon's blocks with rollups and indexes): vs Prometheus {:.2}, vs VictoriaMetrics {:.2}",
            s.persisted_bytes_per_sample / p.persisted_bytes_per_sample,
            s.persisted_bytes_per_sample / v.persisted_bytes_per_sample
        );
    }
    println!(
        "- peak RSS: vs Prometheus {:.2}, vs VictoriaMetrics {:.2}",
        s.rss_mib / p.rss_mib,
        s.rss_mib / v.rss_mib
    );
    for (i, name) in names.iter().enumerate() {
        println!(
            "- {name} latency: vs Prometheus {:.2}, vs VictoriaMetrics {:.2}",
            s.queries_ms[i] / p.queries_ms[i],
            s.queries_ms[i] / v.queries_ms[i]
        );
    }
}
