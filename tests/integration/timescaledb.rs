//! The TimescaleDB harness works: a real TimescaleDB (PGlite build) answers through the
//! project's wire-protocol shim to sqlx, and SecuMon's PostgreSQL storage runs on it.
//! (The TimescaleDB lifecycle itself — hypertables, continuous aggregates, policies — is the
//! TimescaleDB issue's work; this proves the ground it stands on.)

use crate::support::TimescaleDb;
use secumon::model::{Label, Labels, Matcher, Sample, TenantId};
use secumon::storage::postgres::{PostgresConfig, PostgresStorage};
use secumon::storage::{SelectHints, SeriesWrite, Storage};

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
    let storage = PostgresStorage::connect(&url, &PostgresConfig::default())
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
