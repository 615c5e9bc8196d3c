//! Range functions answered from rollups against a real Prometheus 2.42: a dataset with
//! samples exactly on 5-minute and hour boundaries and between them, NaN, ±Inf, ±0 and
//! staleness markers is written into both; aligned `min/max/count/last/present_over_time`
//! queries must give exactly Prometheus's answer while `secumon_query_rollup_selects_total`
//! shows the rollup path answered, and with `max_source_resolution` `sum/avg_over_time` must
//! agree up to float rounding.

use crate::support::dataset::{self, Rng, Series, STALE_NAN};
use crate::support::{get_json, Backend, Prometheus, Secumon};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
/// The dataset spans this much from its first hour boundary.
const SPAN: i64 = 5 * HOUR;

fn series(kind: &str, samples: Vec<(i64, f64)>) -> Series {
    Series {
        labels: vec![
            ("__name__".into(), "rq_gauge".into()),
            ("kind".into(), kind.into()),
        ],
        samples,
    }
}

/// Values with three decimals, like scraped gauges.
fn decimal(rng: &mut Rng, low: f64, high: f64) -> f64 {
    ((low + rng.f64() * (high - low)) * 1000.0).round() / 1000.0
}

/// The dataset from `h0` (an hour boundary) over [`SPAN`].
fn generate(h0: i64) -> Vec<Series> {
    let mut rng = Rng::new(11);
    let mut out = Vec::new();

    // Every minute: a sample on every 5-minute and hour boundary, one +Inf.
    let mut regular = Vec::new();
    for (i, t) in (h0..=h0 + SPAN).step_by(MINUTE as usize).enumerate() {
        let v = if i == 97 {
            f64::INFINITY
        } else {
            decimal(&mut rng, 10.0, 90.0)
        };
        regular.push((t, v));
    }
    out.push(series("regular", regular));

    // Every 47 s from 13 s past the hour: mostly between boundaries.
    let between = (h0 + 13_000..=h0 + SPAN)
        .step_by(47_000)
        .map(|t| (t, decimal(&mut rng, 1.0, 5.0)))
        .collect();
    out.push(series("between", between));

    // Only on 20-minute boundaries, plus one 17 s later every other time.
    let mut sparse = Vec::new();
    for (i, t) in (h0..=h0 + SPAN).step_by(20 * MINUTE as usize).enumerate() {
        sparse.push((t, i as f64));
        if i % 2 == 1 {
            sparse.push((t + 17_000, i as f64 + 0.5));
        }
    }
    out.push(series("sparse", sparse));

    // NaN now and then, on the 2-hour boundary, and for all of one 5-minute bucket.
    let mut nan = Vec::new();
    for t in (h0..=h0 + SPAN).step_by(30_000) {
        let all_nan = t >= h0 + HOUR && t < h0 + HOUR + 5 * MINUTE;
        let v = if all_nan || t == h0 + 2 * HOUR || rng.below(5) == 0 {
            f64::NAN
        } else {
            decimal(&mut rng, 100.0, 200.0)
        };
        nan.push((t, v));
    }
    out.push(series("nan", nan));

    // Stops with a staleness marker exactly on the 2-hour boundary, comes back, stops again
    // with a marker between boundaries, comes back for the last hour.
    let mut stale = Vec::new();
    for t in (h0..=h0 + SPAN).step_by(MINUTE as usize) {
        let off = t - h0;
        if off == 2 * HOUR {
            stale.push((t, STALE_NAN));
        } else if !(2 * HOUR..2 * HOUR + 30 * MINUTE).contains(&off)
            && !(3 * HOUR..4 * HOUR).contains(&off)
        {
            stale.push((t, decimal(&mut rng, 0.0, 10.0)));
        }
    }
    stale.push((h0 + 3 * HOUR + 90_000, 4.25));
    stale.push((h0 + 3 * HOUR + 150_000, STALE_NAN));
    stale.sort_by_key(|p| p.0);
    out.push(series("stale", stale));

    // Zeros of both signs: min and max must pick the same one as Prometheus.
    let zero = (h0..=h0 + SPAN)
        .step_by(150_000)
        .map(|t| (t, [0.0, -0.0, 1.5, -1.5][rng.below(4) as usize]))
        .collect();
    out.push(series("zero", zero));
    out
}

/// `secumon_query_rollup_selects_total` by resolution (5m, 1h).
async fn rollup_selects(secumon: &Secumon) -> (f64, f64) {
    let text = secumon.metrics_text().await;
    let value = |resolution: &str| {
        let prefix = format!("secumon_query_rollup_selects_total{{resolution=\"{resolution}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0.0, |v| v.trim().parse().expect("counter value"))
    };
    (value("5m"), value("1h"))
}

/// Series of an answer by labels, with their points as (time, value text).
fn points_by_series(answer: &Value) -> Result<BTreeMap<String, Vec<(String, String)>>, String> {
    if answer["status"] != "success" {
        return Err(format!("error {}", answer["errorType"]));
    }
    let mut out = BTreeMap::new();
    for r in answer["data"]["result"].as_array().ok_or("no result")? {
        let points = match r.get("value") {
            Some(p) => vec![p.clone()],
            None => r["values"].as_array().ok_or("no values")?.clone(),
        };
        let points = points
            .iter()
            .map(|p| (p[0].to_string(), p[1].as_str().unwrap_or("").to_owned()))
            .collect();
        if out.insert(r["metric"].to_string(), points).is_some() {
            return Err("duplicate label sets".into());
        }
    }
    Ok(out)
}

/// Why two answers differ, or `None`. `tolerance` bounds the relative difference of values
/// (of at least 1 in magnitude, so noise around 0 counts as absolute, as in promql_diff.rs);
/// 0 requires the same text.
fn difference(ours: &Value, theirs: &Value, tolerance: f64) -> Option<String> {
    if ours["data"]["resultType"] != theirs["data"]["resultType"] {
        return Some(format!("result types differ: {ours} vs {theirs}"));
    }
    let close = |a: &str, b: &str| {
        a == b
            || match (a.parse::<f64>(), b.parse::<f64>()) {
                (Ok(x), Ok(y)) if x.is_finite() && y.is_finite() => {
                    (x - y).abs() <= tolerance * x.abs().max(y.abs()).max(1.0)
                }
                _ => false,
            }
    };
    let (o, t) = match (points_by_series(ours), points_by_series(theirs)) {
        (Ok(o), Ok(t)) => (o, t),
        (o, t) if o == t => return None,
        _ => return Some(format!("{ours} vs {theirs}")),
    };
    if o.keys().ne(t.keys()) {
        return Some(format!("series differ: {ours} vs {theirs}"));
    }
    for ((labels, op), tp) in o.iter().zip(t.values()) {
        if op.len() != tp.len() {
            return Some(format!("{labels}: {op:?} vs {tp:?}"));
        }
        if let Some((a, b)) = op
            .iter()
            .zip(tp)
            .find(|(a, b)| a.0 != b.0 || !close(&a.1, &b.1))
        {
            return Some(format!("{labels}: {a:?} vs {b:?}"));
        }
    }
    None
}

struct Harness {
    secumon: Secumon,
    prometheus: Prometheus,
    http: reqwest::Client,
}

impl Harness {
    /// Asks both one query; returns why they differ (or `None`), how many rollup reads of
    /// each resolution SecuMon made for it, and how many points Prometheus answered.
    async fn compare(
        &self,
        path: &str,
        params: &[(&str, String)],
        tolerance: f64,
    ) -> (Option<String>, (f64, f64), usize) {
        let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // Prometheus ignores parameters it does not know.
        let before = rollup_selects(&self.secumon).await;
        let ours = get_json(&self.http, &self.secumon.url(path), &params).await;
        let after = rollup_selects(&self.secumon).await;
        let theirs = get_json(&self.http, &self.prometheus.url(path), &params).await;
        let why = difference(&ours.1, &theirs.1, tolerance).map(|w| format!("{params:?}: {w}"));
        let points = points_by_series(&theirs.1).map_or(0, |s| s.values().map(Vec::len).sum());
        (why, (after.0 - before.0, after.1 - before.1), points)
    }
}

fn secs(t: i64) -> String {
    format!("{}", t / 1000)
}

/// Instant and range cases over aligned times: (path, parameters without the query).
fn cases(h0: i64) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let mut out = Vec::new();
    for t in [
        h0 + HOUR,
        h0 + 2 * HOUR,
        h0 + 3 * HOUR,
        h0 + 2 * HOUR + 35 * MINUTE,
        h0 + SPAN,
        h0 + SPAN + HOUR,
    ] {
        out.push(("/api/v1/query", vec![("time", secs(t))]));
    }
    for (start, end, step) in [
        (h0 + HOUR, h0 + SPAN + HOUR, 5 * MINUTE),
        (h0, h0 + SPAN + HOUR, HOUR),
        (h0 + 2 * HOUR, h0 + 4 * HOUR, 10 * MINUTE),
    ] {
        out.push((
            "/api/v1/query_range",
            vec![
                ("start", secs(start)),
                ("end", secs(end)),
                ("step", format!("{}", step / 1000)),
            ],
        ));
    }
    out
}

/// Range arguments whose windows fall on boundaries at every case's times.
fn arguments(h0: i64) -> Vec<String> {
    vec![
        "rq_gauge[5m]".into(),
        "rq_gauge[1h]".into(),
        "rq_gauge[2h]".into(),
        "rq_gauge[10m] offset 5m".into(),
        "rq_gauge[1h] offset 1h".into(),
        "rq_gauge{kind=~\"nan|stale\"}[1h] offset -1h".into(),
        format!("rq_gauge[1h] @ {}", secs(h0 + 3 * HOUR)),
        format!("rq_gauge[2h] @ {} offset 30m", secs(h0 + SPAN)),
    ]
}

async fn start(h0: i64, backend: Backend) -> Harness {
    // The embedded engine flushes every second, so most rows come from block files and
    // buckets cut by a flush are merged across blocks and the head.
    let secumon = Secumon::start_on(backend, |c| {
        c.embedded.flush_interval_secs = 1;
        c.embedded.out_of_order_window_secs = 60;
    })
    .await;
    let prometheus =
        Prometheus::start(|_| "global:\n  scrape_interval: 1h\n  evaluation_interval: 1m\n".into());
    dataset::load_into_both(&secumon, &prometheus, dataset::requests(&generate(h0), 20)).await;
    let http = reqwest::Client::new();
    if backend == Backend::TimescaleDb {
        // Materialize both continuous aggregates (PGlite runs no background jobs), so the
        // answers come from materialized rows, not only from real-time aggregation.
        let url = secumon.database_url.clone().expect("database url");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("connect");
        let jobs: Vec<i32> = sqlx::query_scalar(
            "SELECT job_id FROM timescaledb_information.jobs
             WHERE proc_name = 'policy_refresh_continuous_aggregate' ORDER BY job_id",
        )
        .fetch_all(&pool)
        .await
        .expect("refresh jobs");
        assert_eq!(jobs.len(), 2);
        for id in jobs {
            sqlx::raw_sql(&format!("CALL run_job({id})"))
                .execute(&pool)
                .await
                .expect("run_job");
        }
    }
    if backend == Backend::Embedded {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !secumon
            .metrics_text()
            .await
            .lines()
            .any(|l| l.starts_with("secumon_storage_blocks ") && !l.ends_with(" 0"))
        {
            assert!(
                Instant::now() < deadline,
                "the embedded engine never flushed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Harness {
        secumon,
        prometheus,
        http,
    }
}

/// The first hour boundary of the data: eight hours ago, so every query time is past.
fn first_hour() -> i64 {
    let now = chrono::Utc::now().timestamp_millis();
    now.div_euclid(HOUR) * HOUR - 8 * HOUR
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_range_functions_from_rollups_equal_prometheus() {
    exact_answers(Backend::of_run()).await;
}

/// Aligned min/max/count/last/present_over_time answered from rollups on `backend` equal
/// Prometheus's answers exactly.
pub async fn exact_answers(backend: Backend) {
    let h0 = first_hour();
    let harness = start(h0, backend).await;
    let mut queries: Vec<String> = Vec::new();
    for f in [
        "min_over_time",
        "max_over_time",
        "count_over_time",
        "last_over_time",
        "present_over_time",
    ] {
        queries.extend(arguments(h0).iter().map(|arg| format!("{f}({arg})")));
    }
    // Calls inside subqueries (evaluated at the subquery's steps) and under operators.
    queries.extend(
        [
            "max_over_time(min_over_time(rq_gauge[5m])[1h:5m])",
            "count_over_time(last_over_time(rq_gauge[1h])[2h:1h])",
            "max_over_time(rq_gauge[1h]) > 50",
            "-last_over_time(rq_gauge{kind=\"zero\"}[5m])",
        ]
        .map(String::from),
    );
    let (mut passed, mut failed) = (0usize, Vec::new());
    let (mut reads, mut points) = ((0.0, 0.0), 0);
    for query in &queries {
        for (path, mut params) in cases(h0) {
            params.push(("query", query.clone()));
            let (why, (five, hour), n) = harness.compare(path, &params, 0.0).await;
            reads = (reads.0 + five, reads.1 + hour);
            points += n;
            match why {
                Some(why) => failed.push(why),
                None if five + hour < 1.0 => {
                    failed.push(format!("{params:?}: answered without rollups"))
                }
                None => passed += 1,
            }
        }
    }
    for f in &failed {
        let cut: String = f.chars().take(1500).collect();
        println!("FAILED {cut}");
    }
    println!(
        "rollup queries: {passed} passed, {} failed; {points} points compared; rollup reads \
         5m {}, 1h {}",
        failed.len(),
        reads.0,
        reads.1
    );
    assert!(reads.0 >= 1.0 && reads.1 >= 1.0, "both resolutions answer");
    assert!(points > 10_000, "only {points} points: is the data there?");
    assert!(failed.is_empty(), "{} answers differ", failed.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sum_and_avg_read_rollups_only_when_allowed() {
    let h0 = first_hour();
    let harness = start(h0, Backend::of_run()).await;
    let mut failed = Vec::new();
    for f in ["sum_over_time", "avg_over_time"] {
        for arg in arguments(h0) {
            let query = format!("{f}({arg})");
            for (path, mut params) in cases(h0) {
                params.push(("query", query.clone()));
                // Raw by default: the answer comes from raw samples.
                let (why, (five, hour), _) = harness.compare(path, &params, 1e-9).await;
                if let Some(why) = why {
                    failed.push(format!("raw {why}"));
                } else if five + hour > 0.0 {
                    failed.push(format!("{params:?}: read rollups without being allowed"));
                }
                params.push(("max_source_resolution", "1h".into()));
                let (why, (five, hour), _) = harness.compare(path, &params, 1e-9).await;
                if let Some(why) = why {
                    failed.push(why);
                } else if five + hour < 1.0 {
                    failed.push(format!("{params:?}: answered without rollups"));
                }
            }
        }
    }
    // `auto`: no coarser than the step.
    for (step, want) in [(5 * MINUTE, (1.0, 0.0)), (HOUR, (0.0, 1.0))] {
        let params = vec![
            ("query", "sum_over_time(rq_gauge[1h])".to_string()),
            ("start", secs(h0 + 2 * HOUR)),
            ("end", secs(h0 + 4 * HOUR)),
            ("step", format!("{}", step / 1000)),
            ("max_source_resolution", "auto".into()),
        ];
        let (why, reads, _) = harness.compare("/api/v1/query_range", &params, 1e-9).await;
        if let Some(why) = why {
            failed.push(why);
        } else if reads != want {
            failed.push(format!(
                "{params:?}: rollup reads {reads:?}, expected {want:?}"
            ));
        }
    }
    for f in &failed {
        let cut: String = f.chars().take(1500).collect();
        println!("FAILED {cut}");
    }
    assert!(failed.is_empty(), "{} answers differ", failed.len());

    let (status, body) = harness
        .secumon
        .get_json(
            "/api/v1/query",
            &[
                ("query", "sum_over_time(rq_gauge[1h])"),
                ("max_source_resolution", "10m"),
            ],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errorType"], "bad_data", "{body}");
}
