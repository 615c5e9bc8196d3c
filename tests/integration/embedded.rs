//! The embedded engine over a long life, through the server binary: series that come and go
//! (memory follows the active ones, every sample still reads back) and long queries beside
//! ingest (writers keep their latency).

use crate::support::process::{free_port, spawn_secumon, Managed};
use crate::support::remote_write::{encode, request, series};
use std::time::{Duration, Instant};

const HOUR: i64 = 3_600_000;

/// A server on the embedded engine in `dir`, flushing every second with a one-minute
/// out-of-order window.
fn start(dir: &std::path::Path, port: u16) -> Managed {
    spawn_secumon(
        &dir.display().to_string(),
        port,
        &[
            "--retention-raw-days",
            "100000",
            "--embedded-flush-interval-secs",
            "1",
            "--embedded-out-of-order-window-secs",
            "60",
            "--embedded-fsync",
            "never",
            // Its own metrics, written at the wall clock's time, would move the flush cutoff
            // (the newest sample's time) past the simulated days.
            "--self-monitor-interval-secs",
            "0",
            // The active-series limit counts a series for an hour of the wall clock after its
            // last sample (20-40 bytes each): these tests send hours of data time within
            // minutes, so it would count every series ever sent. Its memory is bounded by its
            // limit (docs/operations.md, "Sizing"); here memory must follow the engine's own
            // active set.
            "--ingest-max-series-per-tenant",
            "0",
        ],
    )
}

/// An HTTP client with a generous timeout, and the wall clock's time in ms.
fn client_and_now() -> (reqwest::Client, i64) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    (http, now)
}

fn rss_mib(process: &Managed) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid()))
        .expect("server process alive");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024
}

/// A value of the server's own `/metrics`.
async fn metric(http: &reqwest::Client, base: &str, name: &str) -> u64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics")) as u64
}

async fn series_in_memory(http: &reqwest::Client, base: &str) -> u64 {
    metric(http, base, "secumon_storage_series_in_memory").await
}

/// Waits until a maintenance run (flush, compaction, retention) that began after this call
/// has ended, and returns the series in memory then.
async fn after_a_maintenance_run(http: &reqwest::Client, base: &str) -> u64 {
    let runs = "secumon_storage_lifecycle_runs";
    let before = metric(http, base, runs).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(http, base, runs).await < before + 2 {
        assert!(Instant::now() < deadline, "no maintenance run ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    series_in_memory(http, base).await
}

async fn write(http: &reqwest::Client, base: &str, body: Vec<u8>) {
    let response = http
        .post(format!("{base}/api/v1/write"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert_eq!(status, 204, "{}", response.text().await.unwrap());
}

/// The single value of an instant query's answer.
async fn scalar(http: &reqwest::Client, base: &str, query: &str, time_ms: i64) -> f64 {
    let time = format!("{}", time_ms as f64 / 1000.0);
    let (status, body) = crate::support::post_form(
        http,
        &format!("{base}/api/v1/query"),
        &[("query", query), ("time", &time)],
    )
    .await;
    assert_eq!(status, 200, "{query}: {body}");
    body["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap_or_else(|| panic!("{query}: {body}"))
        .parse()
        .unwrap()
}

const GENERATIONS: i64 = 20;
const ACTIVE: i64 = 50_000;
const PER_REQUEST: i64 = 10_000;

/// One million distinct series pass through the engine, 50,000 at a time (generations of
/// series alive for an hour of data time each, like processes on hosts): after each flush the
/// head holds the active generation and at most the one before it, the resident set stays
/// within a bound set by the active series, a restart replays quickly and holds only the
/// active series, and every sample of every generation reads back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_series_churn_through_with_memory_bounded_by_the_active_set() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let (http, now) = client_and_now();
    // Data time: 30 days ago, on the hour; generation g lives in hour g (two samples).
    let t0 = (now - 30 * 24 * HOUR) / HOUR * HOUR;
    let mut server = start(dir.path(), port);
    let (mut most_in_memory, mut rss_early, mut rss_each) = (0, 0, Vec::new());
    let started = Instant::now();
    for g in 0..GENERATIONS {
        for first in (0..ACTIVE).step_by(PER_REQUEST as usize) {
            let batch: Vec<_> = (first..first + PER_REQUEST)
                .map(|i| {
                    let n = g * ACTIVE + i;
                    let pid = n.to_string();
                    let gen = g.to_string();
                    series(
                        &[("__name__", "churn"), ("gen", &gen), ("pid", &pid)],
                        &[
                            (t0 + g * HOUR, n as f64),
                            (t0 + g * HOUR + HOUR / 2, n as f64 + 1.0),
                        ],
                    )
                })
                .collect();
            write(&http, &base, encode(&request(batch, vec![]))).await;
        }
        // A flush takes the generation before out of the head: it holds the active one.
        let in_memory = after_a_maintenance_run(&http, &base).await;
        assert_eq!(in_memory, ACTIVE as u64, "generation {g}");
        most_in_memory = most_in_memory.max(in_memory);
        rss_each.push(rss_mib(&server));
        if g == 1 {
            rss_early = rss_each[1];
        }
    }
    let rss_end = rss_mib(&server);
    println!(
        "churn: {} series written in {:.1} s; most series in memory after a flush {most_in_memory}; forgotten {}; RSS {rss_early} MiB after 100,000 series, {rss_end} MiB after 1,000,000 (after each generation: {rss_each:?})",
        GENERATIONS * ACTIVE,
        started.elapsed().as_secs_f64(),
        metric(&http, &base, "secumon_storage_head_series_removed").await,
    );
    // Without forgetting, the head would hold 20 times the series of generation 1 (about a
    // kilobyte each). The bound: twice what 100,000 series took. Beside the head (bounded by
    // the active series) memory holds each block's fingerprint table, 16 bytes a series the
    // block holds (16 MB for a million), the compaction of blocks that hold every series, and
    // the allocator's slack.
    assert!(
        rss_end <= rss_early * 2,
        "RSS grew from {rss_early} MiB to {rss_end} MiB with the active set constant; after each generation (MiB): {rss_each:?}"
    );
    // Every generation reads back exactly: 50,000 series with both samples, and their sum.
    let check = |g: i64| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let at = t0 + g * HOUR + HOUR / 2;
            let q = format!("count(count_over_time(churn{{gen=\"{g}\"}}[1h]) == 2)");
            assert_eq!(scalar(&http, &base, &q, at).await, ACTIVE as f64, "{q}");
            let q = format!("sum(sum_over_time(churn{{gen=\"{g}\"}}[1h]))");
            let first = g * ACTIVE;
            let want: i64 = (first..first + ACTIVE).map(|n| 2 * n + 1).sum();
            assert_eq!(scalar(&http, &base, &q, at).await, want as f64, "{q}");
        }
    };
    for g in 0..GENERATIONS {
        check(g).await;
    }
    // A regex over a label with a million values, and label values from the indexes.
    let q = "count(count_over_time(churn{pid=~\"99999.|1999999\"}[30d]))";
    assert_eq!(scalar(&http, &base, q, t0 + 20 * HOUR).await, 10.0, "{q}");
    let (status, body) =
        crate::support::get_json(&http, &format!("{base}/api/v1/label/gen/values"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), GENERATIONS as usize);
    // A restart replays the log and checkpoint: only the active series come back to memory.
    drop(server);
    let restarted = Instant::now();
    server = start(dir.path(), port);
    let replay = restarted.elapsed();
    let in_memory = series_in_memory(&http, &base).await;
    println!(
        "churn: restart listened after {:.2} s with {in_memory} series in memory",
        replay.as_secs_f64()
    );
    assert!(
        in_memory <= ACTIVE as u64,
        "{in_memory} series after restart"
    );
    assert!(replay < Duration::from_secs(20), "replay took {replay:?}");
    for g in [0, GENERATIONS / 2, GENERATIONS - 1] {
        check(g).await;
    }
    drop(server);
}

/// While queries read millions of samples for seconds, remote-write requests keep their
/// latency and a small query answers promptly: reads copy what they need from the head under
/// a short lock and decode blocks on blocking threads with no engine lock held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_queries_do_not_stall_ingest_or_other_queries() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let (http, now) = client_and_now();
    let t0 = (now - 10 * 24 * HOUR) / HOUR * HOUR;
    let _server = start(dir.path(), port);
    // 20,000 series of 240 samples (an hour at 15 s), flushed to blocks.
    for first in (0..20_000).step_by(2_000) {
        let batch: Vec<_> = (first..first + 2_000)
            .map(|i: i64| {
                let samples: Vec<(i64, f64)> = (0..240)
                    .map(|j| (t0 + j * 15_000, (i + j) as f64))
                    .collect();
                series(&[("__name__", "load"), ("i", &i.to_string())], &samples)
            })
            .collect();
        write(&http, &base, encode(&request(batch, vec![]))).await;
    }
    write(
        &http,
        &base,
        encode(&request(
            vec![series(&[("__name__", "small")], &[(t0, 1.0)])],
            vec![],
        )),
    )
    .await;
    let samples_written = |at: i64| {
        encode(&request(
            (0..100)
                .map(|i| series(&[("__name__", "live"), ("i", &i.to_string())], &[(at, 1.0)]))
                .collect(),
            vec![],
        ))
    };
    // Data 10 days ago flushes at once (the cutoff follows the newest sample).
    write(&http, &base, samples_written(now)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Long queries: each reads 4.8 million samples from blocks and evaluates every step.
    let long = |_| {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let began = Instant::now();
            let (status, body) = crate::support::post_form(
                &http,
                &format!("{base}/api/v1/query_range"),
                &[
                    ("query", "sum(rate(load[5m]))"),
                    ("start", &format!("{}", t0 / 1000)),
                    ("end", &format!("{}", (t0 + HOUR) / 1000)),
                    ("step", "15"),
                ],
            )
            .await;
            assert_eq!(status, 200, "{body}");
            began.elapsed()
        })
    };
    let queries: Vec<_> = (0..4).map(long).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile: writes one after another, and a small query. Enough of them (a few hundred
    // while the long queries run) that the 99th percentile is not simply the slowest one.
    let mut latencies = Vec::new();
    let mut at = now;
    let writing = Instant::now();
    while !queries.iter().all(|q| q.is_finished()) || latencies.len() < 100 {
        at += 1_000;
        let body = samples_written(at);
        let began = Instant::now();
        write(&http, &base, body).await;
        latencies.push(began.elapsed());
        if latencies.len() == 10 {
            let began = Instant::now();
            let v = scalar(&http, &base, "sum(small)", t0).await;
            assert_eq!(v, 1.0);
            let small = began.elapsed();
            println!("stall: a small query beside the long ones took {small:?}");
            assert!(
                small < Duration::from_millis(500),
                "small query took {small:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut long_took = Vec::new();
    for q in queries {
        long_took.push(q.await.unwrap());
    }
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
    println!(
        "stall: long queries took {long_took:?}; {} writes in {:.1} s, median {:?}, p99 {p99:?}, max {:?}",
        latencies.len(),
        writing.elapsed().as_secs_f64(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(
        long_took.iter().any(|t| *t > Duration::from_secs(1)),
        "the queries were too short to prove anything: {long_took:?}"
    );
    assert!(p99 < Duration::from_millis(100), "write p99 {p99:?}");
}
