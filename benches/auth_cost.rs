//! What authentication and the per-tenant series limit cost at ingest: the same pre-encoded
//! remote-write bodies pushed into the embedded engine (release binary, a fresh data directory
//! each run) with `--auth off --ingest-max-series-per-tenant 0` (neither), `--auth off` with the
//! default series limit, and `--auth on` with it (every request carries a bearer token),
//! alternated run by run. Reports accepted samples per second and server CPU-seconds per
//! million samples for each run. Then queries: the same small instant query (`sum(up)`)
//! 2,000 times over one kept-alive connection with auth off and on, alternated, in
//! microseconds per request (client-side latency) and server CPU microseconds per request.
//!
//! `cargo bench --bench auth_cost [-- --series N --rounds N --connections N --repeat N]`

mod common;
#[path = "../tests/integration/support/mod.rs"]
mod support;

use common::{cpu_seconds, push_with, Options};
use std::sync::Arc;
use support::process::{free_port, spawn_secumon};

/// A token of tenant `bench` with the ingest and read scopes, made in the catalog of `dir` by the same
/// binary the server runs.
fn create_token(dir: &str) -> String {
    let binary = std::env::var_os("SECUMON_BENCH_BINARY").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_BIN_EXE_secumon")),
        std::path::PathBuf::from,
    );
    let output = std::process::Command::new(binary)
        .args(["token", "create", "--storage", dir, "--tenant", "bench"])
        .args([
            "--scopes",
            "ingest,read",
            "--name",
            "bench",
            "--log-level",
            "warn",
        ])
        .output()
        .expect("run secumon token create");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn main() {
    let o = Options::from_args(Options {
        series: 10_000,
        series_per_request: 1_000,
        samples_per_series: 2,
        rounds: 100,
        connections: 5,
    });
    let args: Vec<String> = std::env::args().collect();
    let repeat: usize = args
        .iter()
        .position(|a| a == "--repeat")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(3);
    let t0 = chrono::Utc::now().timestamp_millis()
        - (o.rounds * o.samples_per_series) as i64 * 15_000
        - 300_000;
    let bodies = Arc::new(common::encode_requests(&o, t0, 15_000, |i, n| {
        (n / o.samples_per_series * 10 + n % o.samples_per_series + i) as f64 * 0.5
    }));
    println!(
        "\n{} series, {} series x {} samples per request, {} connections, {} samples, embedded engine\n",
        o.series,
        o.series_per_request,
        o.samples_per_series,
        o.connections,
        o.total_samples()
    );
    println!("| run | configuration | accepted samples/s | server CPU-s per 1M samples |");
    println!("|---|---|---|---|");
    let configurations: [(&str, &[&str], bool); 3] = [
        (
            "auth off, no series limit",
            &["--auth", "off", "--ingest-max-series-per-tenant", "0"],
            false,
        ),
        ("auth off, series limit on", &["--auth", "off"], false),
        ("auth on, series limit on", &["--auth", "on"], true),
    ];
    let mut sums = [0.0f64; 3];
    for run in 1..=repeat {
        // The order turns with each repetition, so no configuration always runs first or last.
        for k in (0..3).map(|i| (i + run - 1) % 3) {
            let (name, flags, auth) = &configurations[k];
            let data = tempfile::tempdir().expect("temp dir");
            let dir = data.path().display().to_string();
            let authorization = auth.then(|| format!("Bearer {}", create_token(&dir)));
            let flags: &[&str] = flags;
            let port = free_port();
            let secumon = spawn_secumon(&dir, port, flags);
            let before = cpu_seconds(secumon.pid());
            let outcome = push_with(
                &format!("http://127.0.0.1:{port}/api/v1/write"),
                bodies.clone(),
                &o,
                authorization,
            );
            let cpu = cpu_seconds(secumon.pid()) - before;
            assert_eq!(outcome.refused_requests, 0, "{name}: requests refused");
            let per_million = cpu / (outcome.accepted as f64 / 1e6);
            sums[k] += per_million;
            println!(
                "| {run} | {name} | {:.0} | {per_million:.3} |",
                outcome.accepted as f64 / outcome.seconds
            );
        }
    }
    println!();
    for (k, (name, _, _)) in configurations.iter().enumerate() {
        println!(
            "mean CPU-s per 1M samples, {name}: {:.3}",
            sums[k] / repeat as f64
        );
    }

    // The token check alone, in process: one authenticate() of a cached token.
    let checks = runtime_check();
    println!("\none token check (Authorization header to caller, token cached): {checks:.0} ns");
    let admit = active_series_check();
    println!("active-series count, per series of a 1,000-series request over 10,000 known: {admit:.1} ns");

    println!("\n| run | queries | µs per request (median of 2,000) | server CPU µs per request |");
    println!("|---|---|---|---|");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for run in 1..=repeat {
        for auth in [false, true] {
            let data = tempfile::tempdir().expect("temp dir");
            let dir = data.path().display().to_string();
            let token = auth.then(|| create_token(&dir));
            let port = free_port();
            let secumon = spawn_secumon(&dir, port, &["--auth", if auth { "on" } else { "off" }]);
            let url = format!("http://127.0.0.1:{port}/api/v1/query");
            let (latencies, cpu) = runtime.block_on(async {
                let client = reqwest::Client::new();
                let query = || {
                    let mut request = client.get(&url).query(&[("query", "sum(up)")]);
                    if let Some(token) = &token {
                        request = request.header("Authorization", format!("Bearer {token}"));
                    }
                    request.send()
                };
                // Warm the connection and the token cache.
                for _ in 0..50 {
                    assert!(query().await.unwrap().status().is_success());
                }
                let before = cpu_seconds(secumon.pid());
                let mut latencies = Vec::with_capacity(2_000);
                for _ in 0..2_000 {
                    let started = std::time::Instant::now();
                    let response = query().await.unwrap();
                    assert!(response.status().is_success());
                    response.bytes().await.unwrap();
                    latencies.push(started.elapsed().as_secs_f64() * 1e6);
                }
                (latencies, cpu_seconds(secumon.pid()) - before)
            });
            let mut sorted = latencies;
            sorted.sort_by(f64::total_cmp);
            println!(
                "| {run} | auth {} | {:.0} | {:.0} |",
                if auth { "on" } else { "off" },
                sorted[sorted.len() / 2],
                cpu / 2_000.0 * 1e6
            );
        }
    }
}

/// Nanoseconds one `Authenticator::authenticate` of a cached, valid bearer token takes.
fn runtime_check() -> f64 {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let catalog = secumon::catalog::open(&dir.path().display().to_string())
            .await
            .unwrap();
        let (token, _) = secumon::auth::create_token(
            catalog.as_ref(),
            "bench",
            "ingest".parse().unwrap(),
            "bench",
            None,
            1_000,
        )
        .await
        .unwrap();
        let config = secumon::auth::AuthConfig {
            cache_secs: 3600,
            ..Default::default()
        };
        let auth = secumon::auth::Authenticator::new(catalog, true, &config).unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        let peer = Some(std::net::IpAddr::from([10, 0, 0, 1]));
        auth.authenticate(&headers, peer).await.unwrap();
        let n = 200_000;
        let started = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(auth.authenticate(&headers, peer).await.unwrap());
        }
        started.elapsed().as_nanos() as f64 / n as f64
    })
}

/// Nanoseconds the active-series count takes per series of a request of 1,000 known series
/// (of 10,000), as a scrape's remote-write brings them.
fn active_series_check() -> f64 {
    let active = secumon::ingest::active_series::ActiveSeries::new(5_000_000);
    let tenant = secumon::model::TenantId::default();
    let fingerprints: Vec<u128> = (0..10_000u128)
        .map(|i| xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes()))
        .collect();
    active.admit(&tenant, fingerprints.iter().copied());
    let rounds = 2_000;
    let started = std::time::Instant::now();
    for r in 0..rounds {
        let block = &fingerprints[(r % 10) * 1_000..(r % 10 + 1) * 1_000];
        std::hint::black_box(active.admit(&tenant, block.iter().copied()));
    }
    started.elapsed().as_nanos() as f64 / (rounds * 1_000) as f64
}
