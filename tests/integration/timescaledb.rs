//! SecuMon on a real TimescaleDB (PGlite's build, behind the project's wire-protocol shim):
//! the harness itself, the lifecycle `secumon migrate` sets up (hypertable, hierarchical
//! continuous aggregates, compression, refresh and retention policies, idempotent and updated
//! in place), what TimescaleDB's jobs then do to the data (run with `CALL run_job`, since
//! PGlite runs no background workers), and PromQL answers over it against Prometheus.

use crate::support::{rollup_rows, Backend, Secumon, TimescaleDb};
use secumon::model::{Label, Labels, Matcher, Sample, TenantId, STALE_NAN_BITS};
use secumon::storage::postgres::{
    Job, JobChange, Mode, PostgresConfig, PostgresStorage, TimescaleMode,
};
use secumon::storage::{
    rollup, RejectReason, Resolution, RetentionConfig, RollupColumns, RollupRow, SelectHints,
    SeriesQuery, SeriesWrite, Storage,
};
use sqlx::PgPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescaledb_answers_through_the_shim_and_secumon_stores_on_it() {
    let url = TimescaleDb::shared().url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("connect to the shim");
    sqlx::query("CREATE EXTENSION IF NOT EXISTS timescaledb")
        .execute(&pool)
        .await
        .unwrap();
    let version: String =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(version.starts_with("2."), "timescaledb {version}");

    // Prepared statements with bound arrays, from two connections in turn.
    sqlx::query("CREATE TABLE shim_check (time timestamptz NOT NULL, v float8)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT create_hypertable('shim_check', 'time')")
        .execute(&pool)
        .await
        .unwrap();
    let times: Vec<chrono::DateTime<chrono::Utc>> = (0..1000)
        .map(|i| chrono::DateTime::from_timestamp(1_700_000_000 + i * 60, 0).unwrap())
        .collect();
    let values: Vec<f64> = (0..1000).map(|i| i as f64 * 0.5).collect();
    sqlx::query("INSERT INTO shim_check SELECT * FROM unnest($1::timestamptz[], $2::float8[])")
        .bind(&times)
        .bind(&values)
        .execute(&pool)
        .await
        .unwrap();
    let (count, sum): (i64, f64) = sqlx::query_as("SELECT count(*), sum(v) FROM shim_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((count, sum), (1000, 249_750.0));

    // SecuMon's PostgreSQL storage (migrations, unnest writes, binary COPY reads) on it.
    let storage = PostgresStorage::connect(&url, &on(), &RetentionConfig::default())
        .await
        .expect("SecuMon's migrations on TimescaleDB");
    let tenant = TenantId::default();
    let labels = Labels::from_trusted(vec![Label::new("__name__", "up"), Label::new("job", "x")]);
    let samples: Vec<Sample> = (0..100)
        .map(|i| Sample {
            t: 1_700_000_000_000 + i * 15_000,
            v: i as f64,
        })
        .collect();
    let outcome = storage
        .append(
            &tenant,
            &[SeriesWrite {
                labels: labels.clone(),
                samples: samples.clone(),
            }],
        )
        .await
        .unwrap();
    assert_eq!(outcome.accepted, 100);
    let hints = SelectHints {
        start: 0,
        end: i64::MAX / 2,
        ..SelectHints::default()
    };
    let got = storage
        .select(&tenant, &[Matcher::equal("job", "x")], &hints)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].labels, labels);
    assert_eq!(got[0].samples, samples);
}

/// TimescaleDB mode; writes without COPY FROM STDIN, which PGlite cannot take (see
/// ARCHITECTURE.md, "TimescaleDB in tests").
fn on() -> PostgresConfig {
    PostgresConfig {
        timescaledb: TimescaleMode::On,
        copy_writes: false,
        ..PostgresConfig::default()
    }
}

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn series(name: &str, s: &str, samples: Vec<Sample>) -> SeriesWrite {
    SeriesWrite {
        labels: Labels::from_trusted(vec![Label::new("__name__", name), Label::new("s", s)]),
        samples,
    }
}

/// Samples every 10 s over `hours` from `from`: dyadic values (sums are exact), NaN now and
/// then, one bucket of NaN only, and a staleness marker at the end.
fn dataset(from: i64, hours: i64) -> Vec<SeriesWrite> {
    let n = hours * 360;
    let gauge: Vec<Sample> = (0..n)
        .map(|i| Sample {
            t: from + i * 10_000 + 1_234,
            v: if i % 97 == 5 {
                f64::NAN
            } else {
                (i % 13) as f64 * 0.25 - 1.0
            },
        })
        .chain(std::iter::once(Sample {
            t: from + n * 10_000 + 1_234,
            v: f64::from_bits(STALE_NAN_BITS),
        }))
        .collect();
    let nan_bucket: Vec<Sample> = (0..60)
        .map(|i| Sample {
            t: from + i * 10_000,
            v: if i < 30 { f64::NAN } else { i as f64 },
        })
        .collect();
    // Two finite values whose sum is past the float range: +Inf, as Prometheus adds them.
    let huge: Vec<Sample> = (0..4)
        .map(|i| Sample {
            t: from + i * 60_000,
            v: 1e308,
        })
        .collect();
    vec![
        series("ts_gauge", "a", gauge),
        series("ts_gauge", "b", nan_bucket),
        series("ts_gauge", "c", huge),
    ]
}

fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

fn assert_rows_equal(what: &str, got: &[RollupRow], want: &[RollupRow]) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (g, w) in got.iter().zip(want) {
        let ok = g.t == w.t
            && same(g.min, w.min)
            && same(g.max, w.max)
            && same(g.sum, w.sum)
            && same(g.count, w.count)
            && same(g.last, w.last)
            && g.first_t == w.first_t
            && same(g.first, w.first);
        assert!(ok, "{what}: got {g:?}, want {w:?}");
    }
}

async fn pool(db: &TimescaleDb) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url())
        .await
        .expect("connect")
}

fn job<'a>(jobs: &'a [Job], proc_name: &str, relation: &str) -> &'a Job {
    jobs.iter()
        .find(|j| j.proc_name == proc_name && j.relation == relation)
        .unwrap_or_else(|| panic!("no {proc_name} job on {relation} in {jobs:#?}"))
}

/// Whether a job's config has `key` equal to `interval`.
async fn setting(pool: &PgPool, id: i32, key: &str, interval: &str) -> bool {
    sqlx::query_scalar(
        "SELECT (config ->> $2)::interval = $3::interval
         FROM timescaledb_information.jobs WHERE job_id = $1",
    )
    .bind(id)
    .bind(key)
    .bind(interval)
    .fetch_one(pool)
    .await
    .expect("job config")
}

async fn run_job(pool: &PgPool, id: i32) {
    // PGlite refuses a subquery as the argument: the id goes in literally.
    sqlx::raw_sql(&format!("CALL run_job({id})"))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("CALL run_job({id}): {e}"));
}

fn migrate(url: &str, extra: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_secumon"))
        .args(["migrate", "--storage", url, "--timescaledb", "on"])
        .args(extra)
        .output()
        .expect("run secumon migrate");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "secumon migrate failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_lifecycle_once_and_updates_changed_policies_in_place() {
    let db = TimescaleDb::fresh();
    let url = db.url();

    // `secumon migrate` prints every job it created; a second run changes nothing.
    let first = migrate(&url, &[]);
    let job_lines: Vec<&str> = first.lines().filter(|l| l.starts_with("job ")).collect();
    assert_eq!(job_lines.len(), 6, "{first}");
    assert!(
        job_lines.iter().all(|l| l.ends_with("(created)")),
        "{first}"
    );
    for expected in [
        "policy_compression on samples",
        "policy_refresh_continuous_aggregate on samples_5m",
        "policy_refresh_continuous_aggregate on samples_1h",
        "policy_retention on samples ",
        "policy_retention on samples_5m",
        "policy_retention on samples_1h",
    ] {
        assert!(first.contains(expected), "missing {expected:?} in {first}");
    }
    let second = migrate(&url, &[]);
    let lines_of = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.starts_with("job "))
            .map(|l| l.replace("(created)", "(unchanged)"))
            .collect()
    };
    assert_eq!(lines_of(&second), lines_of(&first), "{second}");
    assert!(!second.contains("(created)") && !second.contains("(updated)"));

    let pool = pool(&db).await;
    let hypertable: (bool,) = sqlx::query_as(
        "SELECT compression_enabled FROM timescaledb_information.hypertables
         WHERE hypertable_name = 'samples'",
    )
    .fetch_one(&pool)
    .await
    .expect("samples is a hypertable");
    assert!(hypertable.0, "compression enabled on samples");
    let compression: (String, String) = sqlx::query_as(
        "SELECT segmentby, orderby FROM timescaledb_information.hypertable_compression_settings
         WHERE hypertable = 'samples'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(compression.0, "series_id");
    assert!(compression.1.contains("time"), "{compression:?}");
    // Both continuous aggregates, the hourly one over the 5-minute one, real-time.
    let aggregates: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT view_name::text, hypertable_name::text, materialization_hypertable_name::text,
                materialized_only
         FROM timescaledb_information.continuous_aggregates ORDER BY view_name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(aggregates.len(), 2, "{aggregates:?}");
    let (one_h, five_m) = (&aggregates[0], &aggregates[1]);
    assert_eq!(
        (one_h.0.as_str(), five_m.0.as_str()),
        ("samples_1h", "samples_5m")
    );
    assert_eq!(five_m.1, "samples");
    assert_eq!(one_h.1, five_m.2, "samples_1h is computed from samples_5m");
    assert!(!one_h.3 && !five_m.3, "real-time aggregation");

    let defaults = PostgresStorage::connect(&url, &on(), &RetentionConfig::default())
        .await
        .unwrap();
    assert_eq!(defaults.mode(), Mode::TimescaleDb);
    let jobs = defaults.jobs().to_vec();
    assert!(
        jobs.iter().all(|j| j.change == JobChange::Unchanged),
        "{jobs:#?}"
    );
    let compress = job(&jobs, "policy_compression", "samples").id;
    let raw = job(&jobs, "policy_retention", "samples").id;
    let keep_5m = job(&jobs, "policy_retention", "samples_5m").id;
    let keep_1h = job(&jobs, "policy_retention", "samples_1h").id;
    let refresh_5m = job(&jobs, "policy_refresh_continuous_aggregate", "samples_5m").id;
    assert!(setting(&pool, compress, "compress_after", "7 days").await);
    assert!(setting(&pool, raw, "drop_after", "30 days").await);
    assert!(setting(&pool, keep_5m, "drop_after", "90 days").await);
    assert!(setting(&pool, keep_1h, "drop_after", "365 days").await);
    assert!(setting(&pool, refresh_5m, "start_offset", "72 hours").await);
    assert!(setting(&pool, refresh_5m, "end_offset", "10 minutes").await);

    // Changed settings update the same jobs.
    let changed = PostgresStorage::connect(
        &url,
        &PostgresConfig {
            compress_after_days: 10,
            ..on()
        },
        &RetentionConfig {
            raw_days: 40,
            ..RetentionConfig::default()
        },
    )
    .await
    .unwrap();
    let after = changed.jobs().to_vec();
    assert_eq!(
        after.iter().map(|j| j.id).collect::<Vec<_>>(),
        jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        "the same jobs"
    );
    for j in &after {
        let expected = if j.id == compress || j.id == raw {
            JobChange::Updated
        } else {
            JobChange::Unchanged
        };
        assert_eq!(j.change, expected, "{j}");
    }
    assert!(setting(&pool, compress, "compress_after", "10 days").await);
    assert!(setting(&pool, raw, "drop_after", "40 days").await);
    assert!(setting(&pool, keep_5m, "drop_after", "90 days").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_jobs_fill_both_rollups_with_the_expected_aggregates() {
    let db = TimescaleDb::fresh();
    let storage = PostgresStorage::connect(&db.url(), &on(), &RetentionConfig::default())
        .await
        .unwrap();
    let tenant = TenantId::default();
    let from = Resolution::OneHour.bucket(now_ms() - 30 * HOUR);
    let data = dataset(from, 3);
    storage.append(&tenant, &data).await.unwrap();
    let pool = pool(&db).await;
    run_job(
        &pool,
        job(
            storage.jobs(),
            "policy_refresh_continuous_aggregate",
            "samples_5m",
        )
        .id,
    )
    .await;
    run_job(
        &pool,
        job(
            storage.jobs(),
            "policy_refresh_continuous_aggregate",
            "samples_1h",
        )
        .id,
    )
    .await;

    for resolution in Resolution::ALL {
        // What the refresh materialized, read from the aggregate's own hypertable.
        let (schema, table): (String, String) = sqlx::query_as(
            "SELECT materialization_hypertable_schema::text, materialization_hypertable_name::text
             FROM timescaledb_information.continuous_aggregates WHERE view_name = $1",
        )
        .bind(resolution.name())
        .fetch_one(&pool)
        .await
        .unwrap();
        for s in &data {
            let label = s.labels.get("s").unwrap_or_default();
            let got = rollup_rows(&pool, &format!("{schema}.{table}"), label).await;
            let want = rollup(&s.samples, resolution);
            assert!(!want.is_empty());
            assert_rows_equal(
                &format!("materialized {} of {}", resolution.name(), s.labels),
                &got,
                &want,
            );
        }
        // And through the storage trait.
        let got = storage
            .select_rollups(
                &tenant,
                &[Matcher::equal("__name__", "ts_gauge")],
                resolution,
                from,
                from + 4 * HOUR,
                RollupColumns::ALL.into(),
            )
            .await
            .unwrap();
        assert_eq!(got.len(), 3);
        for (g, s) in got.iter().zip(&data) {
            assert_eq!(g.labels, s.labels);
            assert_rows_equal(resolution.name(), &g.rows, &rollup(&s.samples, resolution));
        }
    }
}

/// Every answer the storage gives over the dataset's range.
async fn answers(storage: &PostgresStorage, from: i64, to: i64) -> String {
    let tenant = TenantId::default();
    let matchers = [Matcher::equal("__name__", "ts_gauge")];
    let hints = SelectHints {
        start: from,
        end: to,
        ..SelectHints::default()
    };
    let raw = storage.select(&tenant, &matchers, &hints).await.unwrap();
    let mut out = String::new();
    for s in &raw {
        out += &format!(
            "{} {:?}\n",
            s.labels,
            s.samples
                .iter()
                .map(|p| (p.t, p.v.to_bits()))
                .collect::<Vec<_>>()
        );
    }
    for resolution in Resolution::ALL {
        for s in storage
            .select_rollups(
                &tenant,
                &matchers,
                resolution,
                from,
                to,
                RollupColumns::ALL.into(),
            )
            .await
            .unwrap()
        {
            out += &format!(
                "{} {} {:?}\n",
                resolution.name(),
                s.labels,
                s.rows
                    .iter()
                    .map(|r| (
                        r.t,
                        r.min.to_bits(),
                        r.max.to_bits(),
                        r.sum.to_bits(),
                        r.count.to_bits(),
                        r.last.to_bits()
                    ))
                    .collect::<Vec<_>>()
            );
        }
    }
    let series = storage
        .series(
            &tenant,
            &SeriesQuery {
                matcher_sets: vec![matchers.to_vec()],
                start: from,
                end: to,
                limit: 0,
            },
        )
        .await
        .unwrap();
    out += &format!("{series:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_chunks_give_identical_answers_and_still_refuse_conflicts() {
    let db = TimescaleDb::fresh();
    let storage = PostgresStorage::connect(&db.url(), &on(), &RetentionConfig::default())
        .await
        .unwrap();
    let tenant = TenantId::default();
    let from = Resolution::OneHour.bucket(now_ms() - 10 * DAY);
    let data = dataset(from, 2);
    storage.append(&tenant, &data).await.unwrap();
    let recent = Resolution::OneHour.bucket(now_ms() - 2 * HOUR);
    storage.append(&tenant, &dataset(recent, 1)).await.unwrap();
    let pool = pool(&db).await;
    let before = answers(&storage, from - HOUR, now_ms()).await;

    run_job(
        &pool,
        job(storage.jobs(), "policy_compression", "samples").id,
    )
    .await;
    let compressed: Vec<(String, bool)> = sqlx::query_as(
        "SELECT chunk_name::text, is_compressed FROM timescaledb_information.chunks
         WHERE hypertable_name = 'samples' ORDER BY range_start",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        compressed.first().is_some_and(|c| c.1),
        "old chunk compressed: {compressed:?}"
    );
    assert!(
        compressed.last().is_some_and(|c| !c.1),
        "recent chunk not compressed: {compressed:?}"
    );
    let after = answers(&storage, from - HOUR, now_ms()).await;
    assert_eq!(after, before, "answers changed after compression");

    // Writing into a compressed chunk: a repeat is accepted silently, a conflict refused,
    // and nothing is duplicated.
    let first = &data[0].samples[0];
    let repeat = series("ts_gauge", "a", vec![*first]);
    let outcome = storage.append(&tenant, &[repeat]).await.unwrap();
    assert_eq!((outcome.accepted, outcome.rejected_total()), (1, 0));
    let conflict = series(
        "ts_gauge",
        "a",
        vec![Sample {
            t: first.t,
            v: first.v + 1.0,
        }],
    );
    let outcome = storage.append(&tenant, &[conflict]).await.unwrap();
    assert_eq!(
        outcome.rejected,
        vec![(RejectReason::DuplicateTimestamp, 1)]
    );
    assert_eq!(answers(&storage, from - HOUR, now_ms()).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_jobs_drop_exactly_what_is_past_each_retention() {
    let db = TimescaleDb::fresh();
    let storage = PostgresStorage::connect(&db.url(), &on(), &RetentionConfig::default())
        .await
        .unwrap();
    let tenant = TenantId::default();
    let now = now_ms();
    let ages = [2 * DAY, 45 * DAY, 120 * DAY, 400 * DAY];
    for age in ages {
        let from = Resolution::OneHour.bucket(now - age);
        storage
            .append(
                &tenant,
                &[series(
                    "ts_age",
                    &format!("{}d", age / DAY),
                    (0..60)
                        .map(|i| Sample {
                            t: from + i * MINUTE,
                            v: i as f64,
                        })
                        .collect(),
                )],
            )
            .await
            .unwrap();
    }
    let pool = pool(&db).await;
    for view in ["samples_5m", "samples_1h"] {
        sqlx::raw_sql(&format!(
            "CALL refresh_continuous_aggregate('{view}', NULL, NULL)"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    for relation in ["samples", "samples_5m", "samples_1h"] {
        run_job(&pool, job(storage.jobs(), "policy_retention", relation).id).await;
    }
    // Per age: raw samples, 5-minute rows, 1-hour rows left.
    let mut left = Vec::new();
    for age in ages {
        let s = format!("{}d", age / DAY);
        let count = |relation: &str| {
            let sql = if relation == "samples" {
                "SELECT count(*) FROM samples JOIN series ON series.id = series_id WHERE labels ->> 's' = $1".to_owned()
            } else {
                format!("SELECT count(*) FROM {relation} r JOIN series ON series.id = r.series_id WHERE labels ->> 's' = $1")
            };
            let pool = pool.clone();
            let s = s.clone();
            async move {
                sqlx::query_scalar::<_, i64>(&sql)
                    .bind(s)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        left.push((
            s.clone(),
            count("samples").await,
            count("samples_5m").await,
            count("samples_1h").await,
        ));
    }
    assert_eq!(
        left,
        vec![
            ("2d".to_owned(), 60, 12, 1),
            ("45d".to_owned(), 0, 12, 1),
            ("120d".to_owned(), 0, 0, 1),
            ("400d".to_owned(), 0, 0, 0),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promql_answers_on_timescaledb_equal_prometheus() {
    crate::promql_diff::differential(Secumon::start_on(Backend::TimescaleDb, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollup_answers_on_timescaledb_equal_prometheus() {
    crate::rollup_queries::exact_answers(Backend::TimescaleDb).await;
}
