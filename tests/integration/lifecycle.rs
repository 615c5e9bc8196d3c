//! Plain PostgreSQL's lifecycle, run by the server: partitions ahead and dropped after raw
//! retention, rollup tables filled up to their watermarks, late writes recomputed, rollup
//! retention, progress that survives a restart and shows in `/metrics`.

use crate::support::{rollup_rows, Backend, Postgres, Secumon};
use secumon::model::{Label, Labels, Matcher, Sample, SeriesSamples, TenantId};
use secumon::storage::postgres::{Mode, PostgresConfig, PostgresStorage, TimescaleMode};
use secumon::storage::{
    rollup, Resolution, RetentionConfig, RollupColumns, RollupRow, SelectHints, SeriesWrite,
    Storage,
};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

fn plain() -> PostgresConfig {
    PostgresConfig {
        timescaledb: TimescaleMode::Off,
        ..PostgresConfig::default()
    }
}

async fn connect_plain(url: &str) -> PostgresStorage {
    PostgresStorage::connect(url, &plain(), &RetentionConfig::default())
        .await
        .unwrap()
}

fn write(s: &str, samples: impl Iterator<Item = (i64, f64)>) -> SeriesWrite {
    SeriesWrite {
        labels: Labels::from_trusted(vec![Label::new("__name__", "lc"), Label::new("s", s)]),
        samples: samples.map(|(t, v)| Sample { t, v }).collect(),
    }
}

async fn raw(storage: &PostgresStorage) -> Vec<SeriesSamples> {
    let hints = SelectHints {
        start: 0,
        end: i64::MAX / 2,
        ..SelectHints::default()
    };
    storage
        .select(
            &TenantId::default(),
            &[Matcher::equal("__name__", "lc")],
            &hints,
        )
        .await
        .unwrap()
}

/// Rows of a rollup table for one series, read directly.
async fn table_rows(pool: &sqlx::PgPool, resolution: Resolution, s: &str) -> Vec<RollupRow> {
    rollup_rows(pool, resolution.name(), s).await
}

/// Rows as text, so NaN equals NaN.
fn rows_text(rows: &[RollupRow]) -> String {
    format!("{rows:?}")
}

/// The rollup rows of `samples` in buckets before `watermark`.
fn expected(samples: &[Sample], resolution: Resolution, watermark: i64) -> Vec<RollupRow> {
    rollup(samples, resolution)
        .into_iter()
        .filter(|r| r.t < watermark)
        .collect()
}

/// Rollup reads from `from` on equal aggregating the raw samples.
async fn assert_reads_equal_raw(storage: &PostgresStorage, from: i64) {
    let raw = raw(storage).await;
    for resolution in Resolution::ALL {
        let got = storage
            .select_rollups(
                &TenantId::default(),
                &[Matcher::equal("__name__", "lc")],
                resolution,
                from,
                i64::MAX / 4,
                RollupColumns::ALL.into(),
            )
            .await
            .unwrap();
        assert_eq!(got.len(), raw.len());
        for (g, r) in got.iter().zip(&raw) {
            assert_eq!(g.labels, r.labels);
            assert_eq!(
                rows_text(&g.rows),
                rows_text(&rollup(&r.samples, resolution)),
                "{}",
                resolution.name()
            );
        }
    }
}

async fn partition_bounds(pool: &sqlx::PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid)
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'samples'::regclass ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_lifecycle_keeps_partitions_rollups_and_retention() {
    let url = Postgres::shared().database().await;
    let retention = RetentionConfig::default();
    let storage = PostgresStorage::connect(&url, &plain(), &retention)
        .await
        .unwrap();
    assert_eq!(storage.mode(), Mode::Plain);
    let pool = storage.pool().clone();
    let tenant = TenantId::default();
    let now = chrono::Utc::now().timestamp_millis();
    let old = Resolution::OneHour.bucket(now - 40 * DAY);
    let mid = Resolution::OneHour.bucket(now - 20 * DAY);
    let recent = Resolution::OneHour.bucket(now - 3 * HOUR);
    let batch = vec![
        write("old", (0..60).map(|i| (old + i * MINUTE, i as f64))),
        write(
            "mid",
            (0..240).map(|i| (mid + i * 15_000 + 7, (i % 17) as f64 * 0.5)),
        ),
        write(
            "recent",
            (0..360).map(|i| {
                let v = if i % 50 == 3 {
                    f64::NAN
                } else {
                    (i % 9) as f64
                };
                (recent + i * 30_000, v)
            }),
        ),
    ];
    storage.append(&tenant, &batch).await.unwrap();

    let report = storage.run_lifecycle_at(now).await.unwrap();
    assert_eq!(report.partitions_dropped, 1, "{report:?}");
    assert!(report.partitions_created >= 2, "{report:?}");
    let parts = partition_bounds(&pool).await;
    let ahead = chrono::DateTime::from_timestamp_millis(now + 2 * DAY)
        .unwrap()
        .format("%Y%m%d")
        .to_string();
    assert!(
        parts.iter().any(|(name, _)| name.contains(&ahead)),
        "a partition two days ahead: {parts:?}"
    );
    let left = raw(&storage).await;
    assert_eq!(
        left.iter()
            .map(|s| s.labels.get("s").unwrap_or_default().to_owned())
            .collect::<Vec<_>>(),
        vec!["mid", "recent"],
        "raw samples past retention are gone with their partition"
    );
    // ... once rolled up: their rollups stay.
    let old_raw: Vec<Sample> = batch[0].samples.clone();
    for resolution in Resolution::ALL {
        assert_eq!(
            rows_text(&table_rows(&pool, resolution, "old").await),
            rows_text(&rollup(&old_raw, resolution)),
            "rollups of the dropped partition"
        );
    }

    let stats = storage.stats().expect("plain lifecycle stats");
    let w5 = Resolution::FiveMinutes.bucket(now - 10 * MINUTE);
    let w1 = Resolution::OneHour.bucket(w5);
    assert_eq!(
        stats.rollup_watermarks,
        vec![(Resolution::FiveMinutes, w5), (Resolution::OneHour, w1)]
    );
    for s in &left {
        let name = s.labels.get("s").unwrap_or_default();
        for (resolution, w) in [(Resolution::FiveMinutes, w5), (Resolution::OneHour, w1)] {
            let want = expected(&s.samples, resolution, w);
            assert!(!want.is_empty());
            assert_eq!(
                rows_text(&table_rows(&pool, resolution, name).await),
                rows_text(&want),
                "{name}"
            );
        }
    }
    assert_reads_equal_raw(&storage, mid).await;

    // A late sample below the watermark: reads see it at once (its buckets come from raw
    // data until the job ran), the next run rewrites those buckets.
    let late = write("recent", std::iter::once((recent + 15_000, 1000.0)));
    storage.append(&tenant, &[late]).await.unwrap();
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM rollup_invalidations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 1);
    assert_reads_equal_raw(&storage, mid).await;
    let report = storage.run_lifecycle_at(now).await.unwrap();
    assert_eq!(report.invalidations, 1, "{report:?}");
    let recent_raw = raw(&storage).await.pop().unwrap();
    for (resolution, w) in [(Resolution::FiveMinutes, w5), (Resolution::OneHour, w1)] {
        assert_eq!(
            rows_text(&table_rows(&pool, resolution, "recent").await),
            rows_text(&expected(&recent_raw.samples, resolution, w))
        );
    }
    assert_reads_equal_raw(&storage, mid).await;

    // A restart resumes at the stored watermarks: five minutes later, one bucket more.
    drop(storage);
    let storage = PostgresStorage::connect(&url, &plain(), &retention)
        .await
        .unwrap();
    let report = storage.run_lifecycle_at(now + 5 * MINUTE).await.unwrap();
    assert!(report.rows_5m <= 2, "only the new bucket: {report:?}");
    let stats = storage.stats().unwrap();
    assert_eq!(
        stats.rollup_watermarks[0],
        (
            Resolution::FiveMinutes,
            Resolution::FiveMinutes.bucket(now - 5 * MINUTE)
        )
    );

    // Rollup retention: 5-minute rows go after 90 days, hourly rows after 365.
    for (relation, age) in [
        ("samples_5m", 100),
        ("samples_5m", 50),
        ("samples_1h", 400),
        ("samples_1h", 100),
    ] {
        sqlx::query(&format!(
            "INSERT INTO {relation} (series_id, bucket, min, max, sum, count, last, first_time,
                                     first)
             SELECT id, b, 1, 1, 1, 1, 1, b, 1
             FROM series,
                  date_bin('1 hour', now() - $1 * interval '1 day', timestamptz 'epoch') AS b
             WHERE labels ->> 's' = 'mid'"
        ))
        .bind(f64::from(age))
        .execute(&pool)
        .await
        .unwrap();
    }
    let report = storage.run_lifecycle_at(now + 5 * MINUTE).await.unwrap();
    assert_eq!(report.rows_expired, 2, "{report:?}");
    let ages: Vec<(String, i64)> = sqlx::query_as(
        "SELECT 'samples_5m', round(extract(epoch FROM now() - bucket) / 86400)::int8
         FROM samples_5m WHERE bucket < now() - interval '30 days' AND series_id = (SELECT id FROM series WHERE labels ->> 's' = 'mid')
         UNION ALL
         SELECT 'samples_1h', round(extract(epoch FROM now() - bucket) / 86400)::int8
         FROM samples_1h WHERE bucket < now() - interval '30 days' AND series_id = (SELECT id FROM series WHERE labels ->> 's' = 'mid')
         ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        ages,
        vec![
            ("samples_1h".to_owned(), 100),
            ("samples_5m".to_owned(), 50)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_the_plain_lifecycle_and_reports_its_progress() {
    let s = Secumon::start_on(Backend::Postgres, |c| {
        c.postgres.timescaledb = TimescaleMode::Off;
        c.postgres.lifecycle_interval_secs = 1;
    })
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = s.metrics_text().await;
        let watermark = text
            .lines()
            .find(|l| l.starts_with("secumon_rollup_watermark_seconds{relation=\"samples_5m\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok());
        if let Some(w) = watermark {
            let now = chrono::Utc::now().timestamp();
            // On an empty database the first run starts at the oldest partition, today's:
            // in the first minutes of a day that is past the 10-minute lag.
            let midnight = now - now.rem_euclid(86_400);
            assert!(
                (now - 16 * 60..=now - 10 * 60).contains(&w)
                    || (w == midnight && now - midnight < 16 * 60),
                "watermark {w} vs now {now}"
            );
            assert!(
                text.contains("secumon_storage_lifecycle_failures 0"),
                "{text}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no rollup watermark in /metrics: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sums_past_the_float_range_are_infinite_and_do_not_stop_the_job() {
    let url = Postgres::shared().database().await;
    let storage = connect_plain(&url).await;
    let now = chrono::Utc::now().timestamp_millis();
    let from = Resolution::OneHour.bucket(now - 5 * HOUR);
    let batch = vec![
        write("up", (0..120).map(|i| (from + i * 30_000, 1e308))),
        write("down", (0..120).map(|i| (from + i * 30_000, -1e308))),
    ];
    storage.append(&TenantId::default(), &batch).await.unwrap();
    storage.run_lifecycle_at(now).await.expect("the job runs");
    let pool = storage.pool().clone();
    for (s, inf) in [("up", f64::INFINITY), ("down", f64::NEG_INFINITY)] {
        for resolution in Resolution::ALL {
            let rows = table_rows(&pool, resolution, s).await;
            assert!(!rows.is_empty());
            assert!(rows.iter().all(|r| r.sum == inf), "{s}: {rows:?}");
        }
    }
    assert_reads_equal_raw(&storage, from).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_dropped_by_another_server_is_created_again_on_write() {
    let url = Postgres::shared().database().await;
    let retention = RetentionConfig::default();
    let a = PostgresStorage::connect(&url, &plain(), &retention)
        .await
        .unwrap();
    let b = PostgresStorage::connect(&url, &plain(), &retention)
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let old = Resolution::OneHour.bucket(now - 40 * DAY);
    let tenant = TenantId::default();
    a.append(&tenant, &[write("x", std::iter::once((old, 1.0)))])
        .await
        .unwrap();
    let report = b.run_lifecycle_at(now).await.unwrap();
    assert_eq!(report.partitions_dropped, 1, "{report:?}");
    // Server a still believes the partition exists.
    let outcome = a
        .append(&tenant, &[write("x", std::iter::once((old + MINUTE, 2.0)))])
        .await
        .expect("the write succeeds once the partition is created again");
    assert_eq!(outcome.accepted, 1);
}

/// Every node of an EXPLAIN (FORMAT JSON) plan.
fn plan_nodes(plan: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    out.push(plan.clone());
    for child in plan["Plans"].as_array().into_iter().flatten() {
        plan_nodes(child, out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_are_read_from_the_key_alone_after_a_run() {
    let url = Postgres::shared().database().await;
    // A page is marked all-visible only once the commits of its rows are flushed to the
    // log; the test server commits asynchronously (synchronous_commit=off, fsync=off) and
    // may leave that for seconds, so this database commits as a default server does.
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(
            "DO $$ BEGIN
                 EXECUTE format('ALTER DATABASE %I SET synchronous_commit = on', current_database());
             END $$",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let storage = connect_plain(&url).await;
    let pool = storage.pool().clone();
    let (key_columns, all_columns): (i16, i16) = sqlx::query_as(
        "SELECT indnkeyatts, indnatts FROM pg_index WHERE indexrelid = 'samples_pkey'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (key_columns, all_columns),
        (2, 3),
        "the key is (series_id, time) and carries the value"
    );
    let now = chrono::Utc::now().timestamp_millis();
    // The last nine minutes: not rolled up yet, so not packed; they stay in `samples`.
    let from = now - 9 * MINUTE;
    let batch: Vec<SeriesWrite> = (0..200)
        .map(|s| {
            write(
                &s.to_string(),
                (0..60).map(move |i| (from + i * 9_000, i as f64)),
            )
        })
        .collect();
    storage.append(&TenantId::default(), &batch).await.unwrap();
    let report = storage.run_lifecycle_at(now).await.unwrap();
    assert!(report.partitions_vacuumed >= 1, "{report:?}");

    // The planner is steered to an index path (the table is small); what is checked is that
    // the path never visits the heap.
    let mut conn = pool.acquire().await.unwrap();
    for setting in ["SET enable_seqscan = off", "SET enable_bitmapscan = off"] {
        sqlx::query(setting).execute(&mut *conn).await.unwrap();
    }
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM series ORDER BY id LIMIT 20")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let (plan,): (serde_json::Value,) = sqlx::query_as(
        "EXPLAIN (ANALYZE, FORMAT JSON)
         SELECT series_id, time, value FROM samples
         WHERE series_id = ANY($1) AND time >= now() - interval '2 hours'",
    )
    .bind(&ids)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sqlx::query("RESET ALL").execute(&mut *conn).await.unwrap();
    let mut nodes = Vec::new();
    plan_nodes(&plan[0]["Plan"], &mut nodes);
    let scans: Vec<&serde_json::Value> = nodes
        .iter()
        .filter(|n| n["Node Type"] == "Index Only Scan")
        .collect();
    assert!(!scans.is_empty(), "{plan}");
    let rows: i64 = scans
        .iter()
        .map(|n| n["Actual Rows"].as_i64().unwrap())
        .sum();
    assert_eq!(rows, 20 * 60, "{plan}");
    for scan in scans {
        assert_eq!(scan["Heap Fetches"], 0, "{plan}");
    }
}

/// Samples as text, bit-exact (NaN payloads included).
fn samples_text(series: &[SeriesSamples]) -> String {
    let mut out = String::new();
    for s in series {
        out.push_str(&format!("{}:", s.labels));
        for p in &s.samples {
            out.push_str(&format!(" {}={:x}", p.t, p.v.to_bits()));
        }
        out.push('\n');
    }
    out
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_up_windows_are_packed_one_row_per_series_and_read_back_bit_exact() {
    use secumon::model::STALE_NAN_BITS;
    use secumon::storage::{RejectReason, SeriesQuery};
    let url = Postgres::shared().database().await;
    let storage = connect_plain(&url).await;
    let pool = storage.pool().clone();
    let tenant = TenantId::default();
    let now = chrono::Utc::now().timestamp_millis();
    let from = now - 2 * HOUR;
    let old = now - 3 * DAY;
    let batch = vec![
        write(
            "a",
            (0..480).map(|i| (from + i * 15_000, (i * 3 % 100) as f64)),
        ),
        write(
            "b",
            (0..480).map(|i| {
                let v = match i % 97 {
                    5 => f64::NAN,
                    6 => f64::from_bits(STALE_NAN_BITS),
                    7 => f64::NEG_INFINITY,
                    _ => i as f64 * 0.25,
                };
                (from + i * 15_000 + 3, v)
            }),
        ),
        write("old", (0..40).map(|i| (old + i * MINUTE, -1.0 - i as f64))),
    ];
    storage.append(&tenant, &batch).await.unwrap();
    let before = samples_text(&raw(&storage).await);
    // Packing finds a window's rows through the key, series by series, not by a scan.
    let (plan,): (serde_json::Value,) = sqlx::query_as(
        "EXPLAIN (FORMAT JSON) DELETE FROM samples
         WHERE series_id = ANY(ARRAY(SELECT id FROM series))
           AND time >= now() - interval '1 hour' AND time < now() - interval '45 minutes'
         RETURNING series_id, time, value",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut nodes = Vec::new();
    plan_nodes(&plan[0]["Plan"], &mut nodes);
    assert!(
        nodes
            .iter()
            .any(|n| n["Node Type"] == "Index Scan" && n["Relation Name"] != "series"),
        "{plan}"
    );

    let report = storage.run_lifecycle_at(now).await.unwrap();
    let packed_before: i64 = count(
        &pool,
        "SELECT (extract(epoch FROM watermark) * 1000)::int8 FROM rollup_watermarks
         WHERE relation = 'samples_packed'",
    )
    .await;
    assert!(
        packed_before > now - 30 * MINUTE,
        "{packed_before} vs {now}"
    );
    assert!(
        packed_before <= now - 10 * MINUTE,
        "{packed_before} vs {now}"
    );
    let left_before_watermark =
        format!("SELECT count(*) FROM samples WHERE time < to_timestamp({packed_before} / 1000.0)");
    let still_raw = count(&pool, "SELECT count(*) FROM samples").await;
    assert_eq!(
        report.samples_packed as i64 + still_raw,
        480 + 480 + 40,
        "{report:?}"
    );
    assert_eq!(
        count(&pool, &left_before_watermark).await,
        0,
        "nothing before the packing watermark is left a row per sample"
    );
    // One row per series and 15-minute window: "old" spans 40 minutes from an arbitrary
    // minute (3 or 4 windows), "a" and "b" up to the watermark.
    let rows = count(&pool, "SELECT count(*) FROM samples_packed").await;
    let recent_windows = (packed_before - (from - from.rem_euclid(15 * MINUTE))) / (15 * MINUTE);
    assert!(
        (2 * recent_windows + 3..=2 * recent_windows + 4).contains(&rows),
        "{rows} rows, {recent_windows} windows"
    );
    assert_eq!(
        samples_text(&raw(&storage).await),
        before,
        "packed samples read back bit-exact"
    );
    // Point reads and series listings see packed samples too.
    let at = storage
        .select_instants(
            &tenant,
            &[Matcher::equal("__name__", "lc")],
            &[from + 15_000, from + 15_003, old + MINUTE],
        )
        .await
        .unwrap();
    let got: Vec<(String, Vec<i64>)> = at
        .iter()
        .map(|s| {
            (
                s.labels.to_string(),
                s.samples.iter().map(|p| p.t).collect(),
            )
        })
        .collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|(_, t)| t.len() == 1), "{got:?}");
    let listed = storage
        .series(
            &tenant,
            &SeriesQuery {
                matcher_sets: vec![vec![Matcher::equal("__name__", "lc")]],
                start: old,
                end: old + MINUTE,
                limit: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");

    // Late writes into packed windows: a repeat is accepted, another value for a stored
    // timestamp refused, a new timestamp stored.
    let outcome = storage
        .append(
            &tenant,
            &[
                write("a", [(from + 15_000, 3.0)].into_iter()),
                write("old", [(old + MINUTE, 5.0)].into_iter()),
                write("old", [(old + MINUTE + 1, 5.0)].into_iter()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(outcome.accepted, 2, "{outcome:?}");
    assert_eq!(
        outcome.rejected,
        [(RejectReason::DuplicateTimestamp, 1)],
        "{outcome:?}"
    );
    let after_late = raw(&storage).await;
    let old_series = after_late
        .iter()
        .find(|s| s.labels.to_string().contains("old"))
        .unwrap();
    assert_eq!(old_series.samples.len(), 41);
    assert_eq!(old_series.samples[1].v, -2.0, "the stored value stays");
    assert_eq!(old_series.samples[2].t, old + MINUTE + 1);

    // The next run unpacks the window the late write touched, recomputes its rollups from
    // every sample, and packs it again. The day of "old", packed whole by the run before,
    // then gives its space back: the emptied heap cut to nothing, the key rebuilt down to
    // its metapage.
    let partition = format!(
        "samples_p{}",
        chrono::DateTime::from_timestamp_millis(old - old.rem_euclid(DAY))
            .unwrap()
            .format("%Y%m%d_%H%M")
    );
    let sizes = format!("SELECT pg_relation_size('{partition}') + pg_indexes_size('{partition}')");
    let old_day = count(&pool, &sizes).await;
    assert!(old_day > 8192, "{old_day} bytes before release");
    let report = storage.run_lifecycle_at(now).await.unwrap();
    assert!(report.windows_unpacked >= 1, "{report:?}");
    assert!(report.samples_packed >= 2, "{report:?}");
    assert!(report.partitions_released >= 1, "{report:?}");
    assert_eq!(
        count(&pool, &sizes).await,
        8192,
        "heap and key of a packed day"
    );
    assert_eq!(count(&pool, &left_before_watermark).await, 0);
    assert_eq!(
        samples_text(&raw(&storage).await),
        samples_text(&after_late)
    );
    assert_reads_equal_raw(&storage, old - HOUR).await;
    // A late write into the released day is stored and packed as before.
    let outcome = storage
        .append(&tenant, &[write("old", [(old + 2, 7.0)].into_iter())])
        .await
        .unwrap();
    assert_eq!(outcome.accepted, 1, "{outcome:?}");
    let report = storage.run_lifecycle_at(now).await.unwrap();
    assert_eq!(report.partitions_released, 1, "{report:?}");
    assert_eq!(count(&pool, &sizes).await, 8192, "released again");
    let old_series = raw(&storage).await;
    let old_series = old_series
        .iter()
        .find(|s| s.labels.to_string().contains("old"))
        .unwrap();
    assert_eq!(old_series.samples.len(), 42);
    assert_eq!(old_series.samples[1].t, old + 2);

    // Raw retention drops packed partitions with raw ones.
    storage.run_lifecycle_at(now + 40 * DAY).await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM samples_packed").await, 0);
    assert!(raw(&storage).await.is_empty());
}
