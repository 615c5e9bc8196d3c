//! Crash safety of the embedded engine: the server binary is killed with SIGKILL several times
//! in the middle of a sustained remote-write load and restarted; every sample whose request
//! got a 2xx must be there afterwards.

use crate::support::process::{free_port, spawn_secumon, Managed};
use crate::support::remote_write::{encode, request, series};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T0: i64 = 1_700_000_000_000;
const KILLS: usize = 3;

/// The server flushes to blocks, checkpoints and deletes log segments every second (the
/// samples are older than the one-second out-of-order window), so kills land in the middle of
/// that too. Retention is long enough to keep the 2023 timestamps.
fn start(dir: &std::path::Path, port: u16) -> Managed {
    spawn_secumon(
        &dir.display().to_string(),
        port,
        &[
            "--embedded-flush-interval-secs",
            "1",
            "--embedded-out-of-order-window-secs",
            "1",
            "--retention-raw-days",
            "100000",
            "--retention-rollup-5m-days",
            "100000",
            "--retention-rollup-1h-days",
            "100000",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_samples_survive_sigkill_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let acknowledged: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let mut next_request = 0u64;
    for _ in 0..KILLS {
        let server = start(dir.path(), port);
        let running = Arc::new(AtomicBool::new(true));
        // Two writers, each request a new series with 20 samples.
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (url, running, acknowledged) =
                    (url.clone(), running.clone(), acknowledged.clone());
                let first = next_request + w * 1_000_000;
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    let mut id = first;
                    while running.load(Ordering::SeqCst) {
                        let samples: Vec<(i64, f64)> =
                            (0..20).map(|i| (T0 + i * 1000, id as f64)).collect();
                        let body = encode(&request(
                            vec![series(
                                &[("__name__", "crash_test"), ("req", &id.to_string())],
                                &samples,
                            )],
                            vec![],
                        ));
                        if let Ok(r) = http.post(&url).body(body).send().await {
                            if r.status().as_u16() == 204 {
                                acknowledged.lock().unwrap().insert(id);
                            }
                        }
                        id += 1;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1_500 + 700 * next_request / 10_000)).await;
        // SIGKILL mid-load (and mid-maintenance, at times): no chance to flush anything.
        unsafe {
            libc::kill(server.pid() as i32, libc::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        running.store(false, Ordering::SeqCst);
        for w in writers {
            w.await.unwrap();
        }
        drop(server);
        next_request += 10_000;
    }

    let _server = start(dir.path(), port);
    let http = reqwest::Client::new();
    let get = |path: &str, query: &[(&str, &str)]| {
        let request = http
            .get(format!("http://127.0.0.1:{port}{path}"))
            .query(query);
        async move {
            request
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let body = get("/api/v1/series", &[("match[]", "crash_test")]).await;
    let present: BTreeSet<u64> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["req"].as_str().unwrap().parse().unwrap())
        .collect();
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 10,
        "the load was too light to prove anything: {}",
        acknowledged.len()
    );
    println!(
        "crash test: {} kills, {} acknowledged requests ({} samples), {} series present, {} blocks",
        KILLS,
        acknowledged.len(),
        acknowledged.len() * 20,
        present.len(),
        std::fs::read_dir(dir.path().join("blocks"))
            .unwrap()
            .count()
    );
    let lost: Vec<&u64> = acknowledged.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged requests lost after SIGKILL: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let blocks = std::fs::read_dir(dir.path().join("blocks"))
        .unwrap()
        .count();
    assert!(
        blocks > 0,
        "nothing was flushed: the test did not exercise flushing"
    );
    // Every acknowledged series has all its 20 samples.
    let count = get(
        "/api/v1/query",
        &[
            ("query", "count(count_over_time(crash_test[1m]) == 20)"),
            ("time", "1700000030"),
        ],
    )
    .await;
    let complete: usize = count["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        complete >= acknowledged.len(),
        "{complete} complete series, {} acknowledged",
        acknowledged.len()
    );
}

/// The binary turns transparent huge pages off for itself (`tune_allocator` in src/main.rs):
/// with them, mimalloc's arenas kept the resident set ~1.4x what the server used.
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), free_port());
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("the kernel reports THP_enabled in /proc/PID/status (Linux 5.0 or later)");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}
