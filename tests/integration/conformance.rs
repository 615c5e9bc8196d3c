//! The storage conformance suite: the same behaviour proven on every backend through the
//! `Storage` trait itself. Each test runs against PostgreSQL (as written, and with its
//! lifecycle job run after every write, so rollups come from the rollup tables and their
//! invalidations), TimescaleDB (a fresh instance per test; hypertable and continuous
//! aggregates), the embedded engine with its data in the head, and the embedded engine with
//! every write flushed to on-disk blocks.

use crate::support::{Postgres, TimescaleDb};
use secumon::model::{
    Exemplar, Label, Labels, Matcher, MetricMetadata, MetricType, Sample, SeriesSamples, TenantId,
    STALE_NAN_BITS,
};
use secumon::storage::embedded::{EmbeddedConfig, EmbeddedStorage, FsyncPolicy};
use secumon::storage::postgres::{Mode, PostgresConfig, PostgresStorage, TimescaleMode};
use secumon::storage::{
    rollup, AppendOutcome, DynStorage, ExemplarWrite, RejectReason, Resolution, RetentionConfig,
    RollupColumns, SelectHints, SeriesQuery, SeriesWrite, StorageError,
};
use std::sync::Arc;

const T0: i64 = 1_700_000_000_000;

/// One backend under test.
struct Subject {
    name: &'static str,
    storage: DynStorage,
    /// Set for the embedded engine when every write is flushed to blocks at once.
    flushed: Option<Arc<EmbeddedStorage>>,
    /// Set for PostgreSQL when its lifecycle job runs after every write.
    lifecycle: Option<Arc<PostgresStorage>>,
    _dir: Option<tempfile::TempDir>,
    _timescaledb: Option<TimescaleDb>,
}

impl Subject {
    async fn append(&self, tenant: &TenantId, batch: &[SeriesWrite]) -> AppendOutcome {
        let outcome = self.storage.append(tenant, batch).await.expect("append");
        if let Some(embedded) = &self.flushed {
            embedded
                .maintain_with_cutoff(T0, i64::MAX)
                .expect("flush to blocks");
        }
        if let Some(postgres) = &self.lifecycle {
            postgres
                .run_lifecycle_at(chrono::Utc::now().timestamp_millis())
                .await
                .expect("lifecycle run");
        }
        outcome
    }

    async fn select(&self, tenant: &TenantId, matchers: &[Matcher]) -> Vec<SeriesSamples> {
        self.select_range(tenant, matchers, i64::MIN / 2, i64::MAX / 2)
            .await
            .expect("select")
    }

    async fn select_range(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        start: i64,
        end: i64,
    ) -> Result<Vec<SeriesSamples>, StorageError> {
        let hints = SelectHints {
            start,
            end,
            ..SelectHints::default()
        };
        self.storage.select(tenant, matchers, &hints).await
    }
}

async fn embedded(name: &'static str, flush: bool) -> Subject {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = Arc::new(
        EmbeddedStorage::open(
            dir.path(),
            &EmbeddedConfig {
                fsync: FsyncPolicy::Never,
                ..EmbeddedConfig::default()
            },
            &RetentionConfig {
                raw_days: 100_000,
                rollup_5m_days: 100_000,
                rollup_1h_days: 100_000,
            },
        )
        .expect("open embedded storage"),
    );
    Subject {
        name,
        storage: storage.clone(),
        flushed: flush.then_some(storage),
        lifecycle: None,
        _dir: Some(dir),
        _timescaledb: None,
    }
}

/// Test data sits in 2023: no retention may touch it.
fn keep_all() -> RetentionConfig {
    RetentionConfig {
        raw_days: 100_000,
        rollup_5m_days: 100_000,
        rollup_1h_days: 100_000,
    }
}

async fn postgres(name: &'static str, lifecycle: bool) -> Subject {
    let url = Postgres::shared().database().await;
    let config = PostgresConfig {
        timescaledb: TimescaleMode::Off,
        ..PostgresConfig::default()
    };
    let storage = Arc::new(
        PostgresStorage::connect(&url, &config, &keep_all())
            .await
            .expect("connect"),
    );
    Subject {
        name,
        storage: storage.clone(),
        flushed: None,
        lifecycle: lifecycle.then_some(storage),
        _dir: None,
        _timescaledb: None,
    }
}

async fn timescaledb() -> Subject {
    let instance = TimescaleDb::fresh();
    let config = PostgresConfig {
        timescaledb: TimescaleMode::On,
        // PGlite cannot take COPY FROM STDIN (ARCHITECTURE.md, "TimescaleDB in tests").
        copy_writes: false,
        ..PostgresConfig::default()
    };
    let storage = PostgresStorage::connect(&instance.url(), &config, &keep_all())
        .await
        .expect("connect to TimescaleDB");
    assert_eq!(storage.mode(), Mode::TimescaleDb);
    Subject {
        name: "timescaledb",
        storage: Arc::new(storage),
        flushed: None,
        lifecycle: None,
        _dir: None,
        _timescaledb: Some(instance),
    }
}

/// Every backend, each on fresh storage.
async fn subjects() -> Vec<Subject> {
    vec![
        postgres("postgres", false).await,
        postgres("postgres (rollup tables)", true).await,
        timescaledb().await,
        embedded("embedded (head)", false).await,
        embedded("embedded (blocks)", true).await,
    ]
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::from_trusted(pairs.iter().map(|(n, v)| Label::new(*n, *v)).collect())
}

fn write(pairs: &[(&str, &str)], samples: &[(i64, f64)]) -> SeriesWrite {
    SeriesWrite {
        labels: labels(pairs),
        samples: samples.iter().map(|&(t, v)| Sample { t, v }).collect(),
    }
}

fn names(result: &[SeriesSamples]) -> Vec<String> {
    result.iter().map(|s| s.labels.to_string()).collect()
}

fn fleet() -> Vec<SeriesWrite> {
    let mut out = Vec::new();
    for (job, instance) in [("api", "a:1"), ("api", "b:1"), ("db", "c:1")] {
        out.push(write(
            &[("__name__", "up"), ("instance", instance), ("job", job)],
            &(0..10).map(|i| (T0 + i * 15_000, 1.0)).collect::<Vec<_>>(),
        ));
    }
    out.push(write(
        &[("__name__", "odd"), ("job", "api"), ("path", "/ü/\"q\"")],
        &[
            (T0, f64::NAN),
            (T0 + 1_000, f64::INFINITY),
            (T0 + 2_000, f64::NEG_INFINITY),
            (T0 + 3_000, -0.0),
            (T0 + 4_000, f64::from_bits(STALE_NAN_BITS)),
        ],
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_round_trip_bit_exact_and_sorted_by_labels() {
    let tenant = TenantId::default();
    for s in subjects().await {
        let outcome = s.append(&tenant, &fleet()).await;
        assert_eq!(outcome.accepted, 35, "{}", s.name);
        let all = s
            .select(&tenant, &[Matcher::regex("__name__", ".+", false).unwrap()])
            .await;
        assert_eq!(all.len(), 4, "{}", s.name);
        let mut sorted = names(&all);
        sorted.sort();
        assert_eq!(names(&all), sorted, "{}: sorted by labels", s.name);
        let odd = all
            .iter()
            .find(|x| x.labels.metric_name() == Some("odd"))
            .unwrap();
        let bits: Vec<u64> = odd.samples.iter().map(|x| x.v.to_bits()).collect();
        assert_eq!(
            bits[1..],
            [
                f64::INFINITY.to_bits(),
                f64::NEG_INFINITY.to_bits(),
                (-0.0f64).to_bits(),
                STALE_NAN_BITS
            ],
            "{}",
            s.name
        );
        assert!(odd.samples[0].v.is_nan(), "{}", s.name);
        assert_eq!(odd.labels.get("path"), Some("/ü/\"q\""), "{}", s.name);
        // A time range cuts samples exactly at its inclusive ends.
        let part = s
            .select_range(
                &tenant,
                &[Matcher::equal("instance", "a:1")],
                T0 + 15_000,
                T0 + 45_000,
            )
            .await
            .unwrap();
        let times: Vec<i64> = part[0].samples.iter().map(|x| x.t).collect();
        assert_eq!(times, [T0 + 15_000, T0 + 30_000, T0 + 45_000], "{}", s.name);
        // Series without samples in the range are left out.
        let none = s
            .select_range(
                &tenant,
                &[Matcher::equal("__name__", "up")],
                T0 + 1_000_000,
                T0 + 2_000_000,
            )
            .await
            .unwrap();
        assert!(none.is_empty(), "{}", s.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_matcher_type_selects_as_prometheus_does() {
    let tenant = TenantId::default();
    for s in subjects().await {
        s.append(&tenant, &fleet()).await;
        let up = || Matcher::equal("__name__", "up");
        let cases: Vec<(Vec<Matcher>, usize)> = vec![
            (vec![up(), Matcher::equal("job", "api")], 2),
            (
                vec![
                    up(),
                    Matcher {
                        name: "job".into(),
                        op: secumon::model::MatchOp::NotEqual("api".into()),
                    },
                ],
                1,
            ),
            (
                vec![up(), Matcher::regex("instance", "[ab]:1", false).unwrap()],
                2,
            ),
            (
                vec![up(), Matcher::regex("instance", "a", false).unwrap()],
                0,
            ),
            (
                vec![up(), Matcher::regex("instance", "a:.*", true).unwrap()],
                2,
            ),
            // A missing label matches the empty string.
            (vec![Matcher::equal("path", "")], 3),
            (vec![Matcher::regex("path", ".+", false).unwrap()], 1),
            (vec![Matcher::equal("job", "nope")], 0),
        ];
        for (matchers, expected) in cases {
            let got = s.select(&tenant, &matchers).await;
            assert_eq!(
                got.len(),
                expected,
                "{}: {matchers:?} → {:?}",
                s.name,
                names(&got)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_are_silent_conflicts_are_refused() {
    let tenant = TenantId::default();
    for s in subjects().await {
        // Embedded with every write flushed refuses anything in a flushed range; that rule
        // has its own test below.
        if s.flushed.is_some() {
            continue;
        }
        let series = [("__name__", "m")];
        s.append(&tenant, &[write(&series, &[(T0, 1.0), (T0 + 10, 2.0)])])
            .await;
        let again = s
            .append(
                &tenant,
                &[write(&series, &[(T0, 1.0), (T0 + 10, 5.0), (T0 + 5, 9.0)])],
            )
            .await;
        assert_eq!(again.accepted, 2, "{}", s.name);
        assert_eq!(
            again.rejected,
            [(RejectReason::DuplicateTimestamp, 1)],
            "{}",
            s.name
        );
        // Inside one batch too.
        let batch = s
            .append(
                &tenant,
                &[write(
                    &series,
                    &[(T0 + 20, 1.0), (T0 + 20, 1.0), (T0 + 20, 3.0)],
                )],
            )
            .await;
        assert_eq!(
            batch.rejected,
            [(RejectReason::DuplicateTimestamp, 1)],
            "{}",
            s.name
        );
        // The same series as two entries of one batch (a remote-write request repeating it):
        // judged as if it came once with all the samples.
        let twice = s
            .append(
                &tenant,
                &[
                    write(&series, &[(T0 + 30, 1.0), (T0 + 40, 4.0)]),
                    write(&series, &[(T0 + 30, 1.0), (T0 + 40, 6.0), (T0 + 35, 2.0)]),
                ],
            )
            .await;
        assert_eq!(twice.accepted, 4, "{}", s.name);
        assert_eq!(
            twice.rejected,
            [(RejectReason::DuplicateTimestamp, 1)],
            "{}",
            s.name
        );
        let stored = s.select(&tenant, &[Matcher::equal("__name__", "m")]).await;
        let got: Vec<(i64, f64)> = stored[0].samples.iter().map(|x| (x.t, x.v)).collect();
        assert_eq!(
            got,
            [
                (T0, 1.0),
                (T0 + 5, 9.0),
                (T0 + 10, 2.0),
                (T0 + 20, 1.0),
                (T0 + 30, 1.0),
                (T0 + 35, 2.0),
                (T0 + 40, 4.0)
            ],
            "{}",
            s.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_ranges_refuse_new_samples_on_the_embedded_engine() {
    let tenant = TenantId::default();
    let s = embedded("embedded (blocks)", true).await;
    let series = [("__name__", "m")];
    s.append(&tenant, &[write(&series, &[(T0, 1.0), (T0 + 10, 2.0)])])
        .await;
    let late = s
        .append(&tenant, &[write(&series, &[(T0 + 5, 1.0), (T0 + 20, 3.0)])])
        .await;
    assert_eq!(late.accepted, 1);
    assert_eq!(late.rejected, [(RejectReason::OutOfOrder, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_data() {
    let (a, b) = (TenantId::new("team-a"), TenantId::new("team-b"));
    for s in subjects().await {
        s.append(&a, &fleet()).await;
        s.append(
            &b,
            &[write(&[("__name__", "up"), ("job", "b")], &[(T0, 0.0)])],
        )
        .await;
        let up = [Matcher::equal("__name__", "up")];
        assert_eq!(s.select(&a, &up).await.len(), 3, "{}", s.name);
        assert_eq!(
            names(&s.select(&b, &up).await),
            ["{__name__=\"up\", job=\"b\"}"],
            "{}",
            s.name
        );
        assert!(
            s.select(&TenantId::new("nobody"), &up).await.is_empty(),
            "{}",
            s.name
        );
        let query = SeriesQuery {
            matcher_sets: vec![],
            start: T0,
            end: T0 + 1_000_000,
            limit: 0,
        };
        let values = s.storage.label_values(&b, "job", &query).await.unwrap();
        assert_eq!(values, ["b"], "{}", s.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_labels_and_values_honour_range_and_limit() {
    let tenant = TenantId::default();
    for s in subjects().await {
        s.append(&tenant, &fleet()).await;
        let query = |start, end, limit| SeriesQuery {
            matcher_sets: vec![vec![Matcher::equal("__name__", "up")]],
            start,
            end,
            limit,
        };
        let all = s
            .storage
            .series(&tenant, &query(T0, T0 + 150_000, 0))
            .await
            .unwrap();
        assert_eq!(all.len(), 3, "{}", s.name);
        let limited = s
            .storage
            .series(&tenant, &query(T0, T0 + 150_000, 2))
            .await
            .unwrap();
        assert_eq!(limited, all[..2], "{}", s.name);
        let later = s
            .storage
            .series(&tenant, &query(T0 + 10_000_000, T0 + 20_000_000, 0))
            .await
            .unwrap();
        assert!(later.is_empty(), "{}", s.name);
        let names = s
            .storage
            .label_names(&tenant, &query(T0, T0 + 150_000, 0))
            .await
            .unwrap();
        assert_eq!(names, ["__name__", "instance", "job"], "{}", s.name);
        let jobs = s
            .storage
            .label_values(&tenant, "job", &query(T0, T0 + 150_000, 0))
            .await
            .unwrap();
        assert_eq!(jobs, ["api", "db"], "{}", s.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_exemplars_are_kept() {
    let tenant = TenantId::default();
    for s in subjects().await {
        let meta = MetricMetadata {
            metric_family_name: "http_requests".into(),
            metric_type: MetricType::Counter,
            help: "Requests.".into(),
            unit: String::new(),
        };
        s.storage
            .append_metadata(&tenant, &[meta.clone(), meta.clone()])
            .await
            .unwrap();
        let got = s.storage.metadata(&tenant, None, 0).await.unwrap();
        assert_eq!(got, std::slice::from_ref(&meta), "{}", s.name);
        assert!(s
            .storage
            .metadata(&tenant, Some("other"), 0)
            .await
            .unwrap()
            .is_empty());
        let series = labels(&[("__name__", "http_requests_total"), ("job", "api")]);
        s.append(
            &tenant,
            &[SeriesWrite {
                labels: series.clone(),
                samples: vec![Sample { t: T0, v: 1.0 }],
            }],
        )
        .await;
        let exemplar = Exemplar {
            labels: labels(&[("trace_id", "abc")]),
            value: 0.25,
            t: T0,
        };
        s.storage
            .append_exemplars(
                &tenant,
                &[ExemplarWrite {
                    series: series.clone(),
                    exemplars: vec![exemplar.clone()],
                }],
            )
            .await
            .unwrap();
        let found = s
            .storage
            .exemplars(
                &tenant,
                &SeriesQuery {
                    matcher_sets: vec![vec![Matcher::equal("job", "api")]],
                    start: T0 - 1,
                    end: T0 + 1,
                    limit: 0,
                },
            )
            .await
            .unwrap();
        assert_eq!(found.len(), 1, "{}", s.name);
        assert_eq!(found[0].labels, series, "{}", s.name);
        assert_eq!(found[0].exemplars, [exemplar], "{}", s.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_limit_stops_a_select() {
    let tenant = TenantId::default();
    for s in subjects().await {
        s.append(&tenant, &fleet()).await;
        let hints = SelectHints {
            start: T0,
            end: T0 + 1_000_000,
            max_samples: 25,
            ..SelectHints::default()
        };
        let result = s
            .storage
            .select(&tenant, &[Matcher::equal("__name__", "up")], &hints)
            .await;
        assert!(
            matches!(result, Err(StorageError::TooManySamples)),
            "{}",
            s.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_aggregates_of_the_raw_samples() {
    let tenant = TenantId::default();
    for s in subjects().await {
        // Two days of a counter with a reset and a gauge with NaN, in batches of an hour.
        for hour in 0..48i64 {
            let from = T0 + hour * 3_600_000;
            let batch = vec![
                write(
                    &[("__name__", "c"), ("job", "x")],
                    &(0..120)
                        .map(|i| (from + i * 30_000, ((hour * 120 + i) % 1000) as f64))
                        .collect::<Vec<_>>(),
                ),
                write(
                    &[("__name__", "g"), ("job", "x")],
                    &(0..120)
                        .map(|i| {
                            let v = if i == 7 {
                                f64::NAN
                            } else {
                                ((hour * 31 + i * 7) % 13) as f64 - 6.5
                            };
                            (from + i * 30_000, v)
                        })
                        .collect::<Vec<_>>(),
                ),
            ];
            s.append(&tenant, &batch).await;
        }
        if let Some(postgres) = &s.lifecycle {
            // The rows below come from the rollup tables (rewritten by invalidations of each
            // later batch), not from raw samples.
            let stats = secumon::storage::Storage::stats(postgres.as_ref()).expect("stats");
            assert!(
                stats
                    .rollup_watermarks
                    .iter()
                    .any(|&(r, w)| r == Resolution::OneHour && w > T0 + 48 * 3_600_000),
                "{stats:?}"
            );
            assert!(stats.rollup_rows_written > 0, "{stats:?}");
        }
        let raw = s.select(&tenant, &[Matcher::equal("job", "x")]).await;
        // Every aggregate, and subsets as queries ask for them (a backend may leave the
        // others out; those it reads must be exact).
        let only = |f: fn(&mut RollupColumns)| {
            let mut c = RollupColumns::default();
            f(&mut c);
            c
        };
        let column_sets = [
            RollupColumns::ALL,
            only(|c| (c.max, c.first) = (true, true)),
            only(|c| (c.sum, c.count, c.first) = (true, true, true)),
            only(|c| (c.min, c.last) = (true, true)),
            RollupColumns::default(),
        ];
        for (resolution, columns) in Resolution::ALL
            .into_iter()
            .flat_map(|r| column_sets.map(|c| (r, c)))
        {
            let start = T0 + 5 * 3_600_000;
            let end = T0 + 40 * 3_600_000;
            let got = s
                .storage
                .select_rollups(
                    &tenant,
                    &[Matcher::equal("job", "x")],
                    resolution,
                    start,
                    end,
                    columns.into(),
                )
                .await
                .unwrap();
            assert_eq!(got.len(), 2, "{}", s.name);
            for (series, rows) in raw.iter().zip(&got) {
                assert_eq!(series.labels, rows.labels);
                let expected: Vec<_> = rollup(&series.samples, resolution)
                    .into_iter()
                    .filter(|r| r.t >= resolution.bucket(start) && r.t <= resolution.bucket(end))
                    .map(|r| columns.project(&r))
                    .collect();
                let got: Vec<_> = rows.rows.iter().map(|r| columns.project(r)).collect();
                assert_eq!(
                    format!("{got:?}"),
                    format!("{expected:?}"),
                    "{} {resolution:?} {columns:?}",
                    s.name
                );
            }
        }
        // A row limit stops the read: 36 hours of 5-minute rows of two series are far more
        // than 100, wherever the rows come from (rollup relations, raw tails, the head).
        let limited = s
            .storage
            .select_rollups(
                &tenant,
                &[Matcher::equal("job", "x")],
                Resolution::FiveMinutes,
                T0 + 5 * 3_600_000,
                T0 + 40 * 3_600_000,
                secumon::storage::RollupRead {
                    max_rows: 100,
                    ..RollupColumns::ALL.into()
                },
            )
            .await;
        assert!(
            matches!(limited, Err(StorageError::TooManySamples)),
            "{}: {limited:?}",
            s.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instants_select_exactly_the_samples_at_those_times() {
    let tenant = TenantId::default();
    let stale = f64::from_bits(STALE_NAN_BITS);
    for s in subjects().await {
        let batch = vec![
            write(
                &[("__name__", "m"), ("k", "b")],
                &[(T0, 1.0), (T0 + 60_000, stale), (T0 + 300_000, -0.0)],
            ),
            write(
                &[("__name__", "m"), ("k", "a")],
                &[(T0 + 30_000, 2.0), (T0 + 300_000, f64::NAN)],
            ),
            write(&[("__name__", "m"), ("k", "c")], &[(T0 + 10_000, 3.0)]),
        ];
        s.append(&tenant, &batch).await;
        // Unsorted, repeated, and times without samples.
        let instants = [T0 + 300_000, T0 + 60_000, T0 + 1, T0 + 300_000, T0];
        let got = s
            .storage
            .select_instants(&tenant, &[Matcher::equal("__name__", "m")], &instants)
            .await
            .unwrap();
        let summary: Vec<(String, Vec<(i64, u64)>)> = got
            .iter()
            .map(|series| {
                let points = series
                    .samples
                    .iter()
                    .map(|p| (p.t, p.v.to_bits()))
                    .collect();
                (series.labels.get("k").unwrap_or("").to_owned(), points)
            })
            .collect();
        let expected = vec![
            ("a".to_owned(), vec![(T0 + 300_000, f64::NAN.to_bits())]),
            (
                "b".to_owned(),
                vec![
                    (T0, 1f64.to_bits()),
                    (T0 + 60_000, STALE_NAN_BITS),
                    (T0 + 300_000, (-0.0f64).to_bits()),
                ],
            ),
        ];
        assert_eq!(summary, expected, "{}", s.name);
        let none = s
            .storage
            .select_instants(&tenant, &[Matcher::equal("__name__", "m")], &[])
            .await
            .unwrap();
        assert!(none.is_empty(), "{}", s.name);
    }
}
