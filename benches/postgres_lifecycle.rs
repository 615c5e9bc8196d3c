//! PostgreSQL (plain mode) at 10 million samples: ingest rate through remote-write into the
//! release binary, bytes per stored sample (table + indexes), the lifecycle job's catch-up
//! over the whole history, packing the history into `samples_packed` and the bytes per sample
//! left once packed, and a 30-day read at 1 h resolution from `samples_1h` beside the
//! same read over raw samples. PostgreSQL is started by the test harness with its durable
//! defaults (fsync on).
//!
//! `cargo bench --bench postgres_lifecycle [-- --series N --rounds N --connections N]`
//! (defaults: 250 series in blocks of 50 per request, 216 rounds of 200 samples per series at
//! 60 s = 30 days, 10.8 M samples; a block's next request waits for its previous one, so
//! several blocks keep the connections busy).

mod common;
#[path = "../tests/integration/support/mod.rs"]
mod support;

use common::{cpu_seconds, push, tree_cpu_seconds, Options};
use secumon::model::{Matcher, TenantId};
use secumon::storage::postgres::{PostgresConfig, PostgresStorage, TimescaleMode};
use secumon::storage::{rollup, Resolution, RetentionConfig, RollupColumns, SelectHints, Storage};
use std::sync::Arc;
use std::time::Instant;
use support::process::{free_port, spawn_secumon};

const INTERVAL_MS: i64 = 60_000;

fn postmaster_pid(port: u16) -> u32 {
    common::listener_pid(port)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let o = Options::from_args(Options {
        series: 250,
        series_per_request: 50,
        samples_per_series: 200,
        rounds: 216,
        connections: 4,
    });
    std::env::set_var("SECUMON_PG_DURABLE", "1");
    let span = (o.rounds * o.samples_per_series) as i64 * INTERVAL_MS;
    let now = chrono::Utc::now().timestamp_millis();
    let t0 = Resolution::OneHour.bucket(now - span - 3_600_000);
    eprintln!("encoding {} samples", o.total_samples());
    let bodies = Arc::new(common::encode_requests(&o, t0, INTERVAL_MS, |i, n| {
        ((n * 7 + i) % 1000) as f64 * 0.25
    }));

    let postgres = support::Postgres::shared();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let database = runtime.block_on(postgres.database());
    // SecuMon in plain mode with its lifecycle job out of the way (run once, measured, below).
    let plain_server = |port: u16, extra: &[&str]| {
        let mut args = vec![
            "--timescaledb",
            "off",
            "--postgres-lifecycle-interval-secs",
            "86400",
        ];
        args.extend_from_slice(extra);
        spawn_secumon(&database, port, &args)
    };
    let port = free_port();
    let secumon = plain_server(port, &["--retention-raw-days", "400"]);
    let pg_pid = postmaster_pid(postgres.port);
    let (cpu_before, pg_before) = (cpu_seconds(secumon.pid()), tree_cpu_seconds(pg_pid));
    let outcome = push(&format!("http://127.0.0.1:{port}/api/v1/write"), bodies, &o);
    let (cpu, pg_cpu) = (
        cpu_seconds(secumon.pid()) - cpu_before,
        tree_cpu_seconds(pg_pid) - pg_before,
    );
    drop(secumon);
    let rate = outcome.accepted as f64 / outcome.seconds;
    let million = outcome.accepted as f64 / 1e6;
    println!(
        "\n{} series, {} samples per series at {} s ({} days), {} samples per request, {} connections\n",
        o.series,
        o.rounds * o.samples_per_series,
        INTERVAL_MS / 1000,
        span / 86_400_000,
        o.series_per_request * o.samples_per_series,
        o.connections
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| ingest, samples/s (remote-write, backfill) | {rate:.0} |");
    println!(
        "| CPU-s per 1M samples, SecuMon / PostgreSQL | {:.2} / {:.2} |",
        cpu / million,
        pg_cpu / million
    );
    println!("| refused requests | {} |", outcome.refused_requests);

    runtime.block_on(async {
        let retention = RetentionConfig {
            raw_days: 400,
            ..RetentionConfig::default()
        };
        let config = PostgresConfig {
            timescaledb: TimescaleMode::Off,
            ..PostgresConfig::default()
        };
        let storage = PostgresStorage::connect(&database, &config, &retention)
            .await
            .expect("connect");
        let pool = storage.pool().clone();
        sqlx::query("VACUUM ANALYZE").execute(&pool).await.ok();
        let (rows, bytes): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM samples),
                    (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::int8
                     FROM pg_inherits WHERE inhparent = 'samples'::regclass)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let series_bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('series')")
            .fetch_one(&pool)
            .await
            .unwrap();
        println!("| stored samples | {rows} |");
        println!(
            "| bytes per sample, samples table + indexes | {:.1} |",
            bytes as f64 / rows as f64
        );
        println!(
            "| series table + indexes, bytes per series | {:.0} |",
            series_bytes as f64 / o.series as f64
        );

        let started = Instant::now();
        let report = storage
            .run_lifecycle_at(chrono::Utc::now().timestamp_millis())
            .await
            .expect("lifecycle");
        println!(
            "| lifecycle catch-up over the whole history: s (rows 5m / 1h) | {:.1} ({} / {}) |",
            started.elapsed().as_secs_f64(),
            report.rows_5m,
            report.rows_1h
        );
        // Packing moves at most 30 s of windows a run: run until every window before the
        // watermark is packed, then weigh what is left per sample.
        let (mut packed, mut runs) = (report.samples_packed, 1);
        let started = Instant::now();
        loop {
            let more = storage
                .run_lifecycle_at(chrono::Utc::now().timestamp_millis())
                .await
                .expect("lifecycle");
            if more.samples_packed == 0 {
                break;
            }
            packed += more.samples_packed;
            runs += 1;
        }
        println!(
            "| packing the whole history: samples packed, lifecycle runs, s after the first run | {packed} / {runs} / {:.1} |",
            started.elapsed().as_secs_f64()
        );
        sqlx::query("VACUUM ANALYZE").execute(&pool).await.ok();
        let (left, raw_bytes, packed_bytes): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM samples),
                    (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::int8
                     FROM pg_inherits WHERE inhparent = 'samples'::regclass),
                    (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::int8
                     FROM pg_inherits WHERE inhparent = 'samples_packed'::regclass)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        println!(
            "| bytes per sample once packed: samples_packed / samples ({left} rows left) | {:.2} / {:.2} |",
            packed_bytes as f64 / rows as f64,
            raw_bytes as f64 / rows as f64
        );
        let rollup_bytes: i64 = sqlx::query_scalar(
            "SELECT pg_total_relation_size('samples_5m') + pg_total_relation_size('samples_1h')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        println!(
            "| rollup tables, bytes per raw sample | {:.1} |",
            rollup_bytes as f64 / rows as f64
        );

        let tenant = TenantId::default();
        // What `max_over_time` reads: the maximum, and the first sample for the boundary.
        let max_columns = RollupColumns {
            max: true,
            first: true,
            ..RollupColumns::default()
        };
        let end = now;
        let start = end - 30 * 86_400_000;
        for (what, matchers) in [
            ("13 series", vec![Matcher::equal("job", "service-3")]),
            ("250 series", vec![Matcher::equal("env", "production")]),
        ] {
            let (mut from_raw, mut from_rollups) = (Vec::new(), Vec::new());
            let mut check = (0usize, 0usize);
            for _ in 0..5 {
                let t = Instant::now();
                let hints = SelectHints {
                    start,
                    end,
                    ..SelectHints::default()
                };
                let raw = storage.select(&tenant, &matchers, &hints).await.unwrap();
                let rows: usize = raw
                    .iter()
                    .map(|s| rollup(&s.samples, Resolution::OneHour).len())
                    .sum();
                from_raw.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                let rolled = storage
                    .select_rollups(
                        &tenant,
                        &matchers,
                        Resolution::OneHour,
                        start,
                        end,
                        max_columns.into(),
                    )
                    .await
                    .unwrap();
                from_rollups.push(t.elapsed().as_secs_f64() * 1e3);
                check = (rows, rolled.iter().map(|s| s.rows.len()).sum());
            }
            assert_eq!(check.0, check.1, "the same hourly rows either way");
            let (raw_ms, rollup_ms) = (median(from_raw), median(from_rollups));
            println!(
                "| 30 days at 1 h, {what}: raw ms / samples_1h ms (speed-up) | {raw_ms:.0} / {rollup_ms:.1} ({:.0}x) |",
                raw_ms / rollup_ms
            );
        }
    });

    // The same through PromQL: a 30-day range query at a 1 h step, answered from samples_1h
    // (plus the samples exactly at each step) and, with --query-rollups=false, from raw.
    let end = Resolution::OneHour.bucket(now);
    let start = end - 30 * 86_400_000;
    let mut answers = Vec::new();
    for (what, rollups) in [("raw", "false"), ("samples_1h", "true")] {
        let port = free_port();
        let server = plain_server(port, &["--query-rollups", rollups]);
        for (selector, series) in [("{job=\"service-3\"}", 13), ("{env=\"production\"}", 250)] {
            let query = format!("max_over_time({selector}[1h])");
            let mut times = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                let body: serde_json::Value = runtime.block_on(async {
                    reqwest::Client::new()
                        .get(format!("http://127.0.0.1:{port}/api/v1/query_range"))
                        .query(&[
                            ("query", query.as_str()),
                            ("start", &(start / 1000).to_string()),
                            ("end", &(end / 1000).to_string()),
                            ("step", "3600"),
                        ])
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap()
                });
                times.push(t.elapsed().as_secs_f64() * 1e3);
                assert_eq!(body["status"], "success", "{body}");
                if times.len() == 1 {
                    answers.push((series, body["data"].clone()));
                }
            }
            println!(
                "| PromQL `max_over_time(...[1h])`, 30 d at 1 h, {series} series, from {what}: median ms | {:.0} |",
                median(times)
            );
        }
        drop(server);
    }
    let (raw, rolled) = answers.split_at(2);
    assert_eq!(raw, rolled, "rollup and raw answers differ");
    println!(
        "\ningest target 300,000 samples/s: {}",
        if rate >= 300_000.0 { "met" } else { "NOT met" }
    );
}
