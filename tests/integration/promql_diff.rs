//! Differential PromQL test: one seeded dataset remote-written into SecuMon and into a real
//! Prometheus 2.42; every query of the set is asked of both as instant queries at several
//! times and as range queries, and the answers must agree: result type, labels and timestamps
//! exactly, values up to float noise, errors by type.

use crate::support::dataset::{self, INTERVAL_MS};
use crate::support::{get_json, Prometheus, Secumon};
use serde_json::Value;
use std::collections::BTreeMap;

/// Points in the dataset: one hour at 15 s.
const POINTS: usize = 240;

/// The query set, over the dataset's metrics. `at` is an absolute time inside the data.
fn queries(at: i64) -> Vec<String> {
    let mut q: Vec<String> = Vec::new();
    let at = format!("{}", at / 1000);

    // Selectors, matchers, offset and @.
    let selectors = [
        "test_requests_total",
        "test_requests_total{code=\"500\"}",
        "test_requests_total{job=~\"a.*\"}",
        "test_requests_total{instance!~\"a.*\",code!=\"200\"}",
        "test_requests_total{job=~\"api|db\", instance=~\".*:80\"}",
        "test_temperature_celsius",
        "test_stopping",
        "test_sparse",
        "test_unicode",
        "test_unicode{name=\"héllo wörld ✓\"}",
        "{__name__=~\"test_rpc.*\"}",
        "{__name__=~\"test_latency_seconds_(sum|count)\", job!=\"db\"}",
        "test_latency_seconds_bucket{le=\"+Inf\"}",
        "nonexistent_metric",
    ];
    for s in selectors {
        q.push(s.to_string());
    }
    for s in &selectors[..8] {
        q.push(format!("{s} offset 5m"));
        q.push(format!("{s} offset -2m"));
        q.push(format!("{s} @ {at}"));
    }
    q.push("test_requests_total @ start()".into());
    q.push("test_requests_total @ end()".into());
    q.push(format!("test_temperature_celsius @ {at} offset 1m"));
    q.push(format!("test_temperature_celsius offset 1m @ {at}"));

    // Range selectors (instant queries answer a matrix; range queries refuse them).
    for s in [
        "test_requests_total[1m]",
        "test_stopping[5m]",
        "test_sparse[30m]",
        "test_temperature_celsius[2m] offset 3m",
    ] {
        q.push(s.to_string());
    }

    // Range functions over range selectors.
    let range_functions = [
        "rate",
        "increase",
        "delta",
        "irate",
        "idelta",
        "deriv",
        "resets",
        "changes",
        "avg_over_time",
        "sum_over_time",
        "min_over_time",
        "max_over_time",
        "count_over_time",
        "last_over_time",
        "present_over_time",
        "stddev_over_time",
        "stdvar_over_time",
        "absent_over_time",
    ];
    let range_args = [
        "test_requests_total[5m]",
        "test_temperature_celsius[10m]",
        "test_stopping[2m]",
        "test_sparse[15m]",
        "test_requests_total{code=\"500\"}[1m] offset 3m",
    ];
    for f in range_functions {
        for a in range_args {
            q.push(format!("{f}({a})"));
        }
    }
    q.push("absent_over_time(nonexistent_metric{job=\"x\"}[5m])".into());
    for quantile in ["0", "0.5", "0.9", "1", "-1", "2"] {
        q.push(format!(
            "quantile_over_time({quantile}, test_temperature_celsius[10m])"
        ));
    }
    q.push("quantile_over_time(0.5, test_requests_total[5m])".into());
    q.push("predict_linear(test_requests_total[10m], 600)".into());
    q.push("predict_linear(test_temperature_celsius[10m], -300)".into());
    q.push("holt_winters(test_temperature_celsius[10m], 0.5, 0.5)".into());
    q.push("holt_winters(test_requests_total[10m], 0.1, 0.9)".into());
    q.push(format!("rate(test_requests_total[5m] @ {at})"));
    q.push("rate(test_requests_total[5m] offset -1m)".into());

    // Aggregations.
    let aggregations = [
        "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar",
    ];
    let groupings = [
        "",
        " by (job)",
        " without (instance)",
        " by (job, code)",
        " without (code, instance, job)",
        " by ()",
    ];
    for a in aggregations {
        for g in groupings {
            q.push(format!("{a}{g} (test_requests_total)"));
        }
        q.push(format!("{a} by (room) (test_temperature_celsius)"));
        q.push(format!("{a}(test_temperature_celsius)"));
        q.push(format!("{a}(rate(test_requests_total[5m])) by (code)"));
    }
    for k in ["1", "2", "5", "0", "-1"] {
        q.push(format!("topk({k}, test_requests_total)"));
        q.push(format!("bottomk({k}, test_requests_total)"));
        q.push(format!("topk({k}, test_requests_total) by (job)"));
        q.push(format!("bottomk({k}, test_temperature_celsius)"));
    }
    q.push("topk(2, test_temperature_celsius)".into());
    for quantile in ["0", "0.5", "0.9", "1", "-1", "2"] {
        q.push(format!("quantile({quantile}, test_requests_total)"));
        q.push(format!(
            "quantile by (job) ({quantile}, rate(test_requests_total[5m]))"
        ));
    }
    q.push("quantile(0.5, test_temperature_celsius)".into());
    q.push("count_values(\"value\", test_stopping)".into());
    q.push("count_values(\"v\", test_requests_total) by (job)".into());
    q.push("count_values without (instance) (\"v\", round(rate(test_requests_total[5m])))".into());
    q.push("count_values(\"le\", test_temperature_celsius)".into());

    // Binary operators.
    for op in ["+", "-", "*", "/", "%", "^", "atan2"] {
        q.push(format!("test_requests_total {op} 2"));
        q.push(format!("2 {op} test_temperature_celsius"));
        q.push(format!("test_requests_total{{code=\"200\"}} {op} on(job, instance) test_requests_total{{code=\"500\"}}"));
        q.push(format!(
            "test_latency_seconds_sum {op} test_latency_seconds_count"
        ));
        q.push(format!("3 {op} 2"));
    }
    for op in ["==", "!=", ">", "<", ">=", "<="] {
        q.push(format!("test_requests_total {op} 100"));
        q.push(format!("100 {op} test_requests_total"));
        q.push(format!("test_temperature_celsius {op} bool 21"));
        q.push(format!(
            "test_latency_seconds_sum {op} bool test_latency_seconds_count"
        ));
        q.push(format!("test_requests_total{{code=\"200\"}} {op} ignoring(code) test_requests_total{{code=\"500\"}}"));
        q.push(format!("1 {op} bool 2"));
    }
    for op in ["and", "or", "unless"] {
        q.push(format!(
            "test_requests_total {op} test_requests_total{{code=\"500\"}}"
        ));
        q.push(format!("test_requests_total{{code=\"200\"}} {op} on(job, instance) test_requests_total{{code=\"500\"}} > 50"));
        q.push(format!("test_stopping {op} test_sparse"));
        q.push(format!(
            "test_temperature_celsius {op} ignoring(room) test_rpc_seconds_count"
        ));
        q.push(format!("nonexistent_metric {op} test_stopping"));
    }
    q.push("test_requests_total * on(job) group_left test_latency_seconds_count".into());
    q.push(
        "test_requests_total * on(job) group_left(le) test_latency_seconds_bucket{le=\"1\"}".into(),
    );
    q.push("test_latency_seconds_count * on(job) group_right test_requests_total".into());
    q.push("test_latency_seconds_count / on(job) group_right(code) test_requests_total".into());
    q.push("test_requests_total > on(job) group_left test_latency_seconds_count".into());
    q.push("test_requests_total == bool on(job, instance, code) test_requests_total".into());
    q.push("test_requests_total + on(job) test_requests_total".into());
    q.push("test_requests_total + ignoring(code) test_requests_total".into());
    q.push("test_requests_total * on(job) group_left test_requests_total".into());
    q.push("2 ^ 3 ^ 2".into());
    q.push("-2 ^ 2".into());
    q.push("1 + 2 * 3 - 4 / 2 % 3".into());
    q.push("-test_temperature_celsius".into());
    q.push("-(test_requests_total)".into());
    q.push("+test_sparse".into());
    q.push("(test_requests_total + 1) * -1".into());
    q.push("test_temperature_celsius + test_temperature_celsius".into());
    q.push("-{__name__=~\"test_latency_seconds_(sum|count)\"}".into());
    q.push("{__name__=~\"test_latency_seconds_(sum|count)\"} * 1".into());
    q.push("{__name__=~\"test_latency_seconds_(sum|count)\"} > 0".into());

    // Math.
    for f in [
        "abs", "ceil", "floor", "exp", "sqrt", "ln", "log2", "log10", "sin", "cos", "tan", "asin",
        "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "deg", "rad", "sgn",
        "round",
    ] {
        q.push(format!("{f}(test_temperature_celsius)"));
        q.push(format!("{f}(test_temperature_celsius / 30 - 0.5)"));
    }
    q.push("pi()".into());
    q.push("clamp(test_temperature_celsius, 20, 22)".into());
    q.push("clamp(test_temperature_celsius, 22, 20)".into());
    q.push("clamp_min(test_temperature_celsius, 21)".into());
    q.push("clamp_max(test_temperature_celsius, 21)".into());
    q.push("round(test_temperature_celsius, 0.5)".into());
    q.push("round(test_requests_total, 5)".into());
    q.push("round(-test_temperature_celsius / 3)".into());

    // Time.
    q.push("time()".into());
    q.push("timestamp(test_sparse)".into());
    q.push("timestamp(test_requests_total offset 1m)".into());
    q.push("timestamp(-test_requests_total)".into());
    for f in [
        "minute",
        "hour",
        "day_of_week",
        "day_of_month",
        "day_of_year",
        "days_in_month",
        "month",
        "year",
    ] {
        q.push(format!("{f}()"));
        q.push(format!("{f}(vector(1709251199))"));
        q.push(format!("{f}(test_requests_total * 1e6)"));
    }
    q.push("days_in_month(vector(1675209600))".into());

    // Labels.
    q.push(
        "label_replace(test_requests_total, \"host\", \"$1\", \"instance\", \"(.*):.*\")".into(),
    );
    q.push("label_replace(test_requests_total, \"job\", \"x-$1\", \"code\", \"(5..)\")".into());
    q.push("label_replace(test_requests_total, \"code\", \"\", \"code\", \".*\")".into());
    q.push("label_replace(test_requests_total, \"new\", \"${1}y\", \"nope\", \"(.*)\")".into());
    q.push(
        "label_join(test_requests_total, \"key\", \"-\", \"job\", \"instance\", \"code\")".into(),
    );
    q.push("label_join(test_requests_total, \"job\", \"\", \"nope\")".into());
    q.push("label_replace(test_requests_total, \"a-b\", \"x\", \"job\", \".*\")".into());
    q.push("label_replace(test_requests_total, \"x\", \"y\", \"job\", \"(\")".into());

    // Histograms and summaries.
    for quantile in ["0", "0.25", "0.5", "0.9", "0.99", "1", "-0.5", "1.5"] {
        q.push(format!(
            "histogram_quantile({quantile}, rate(test_latency_seconds_bucket[5m]))"
        ));
    }
    q.push("histogram_quantile(0.9, sum by (le) (rate(test_latency_seconds_bucket[5m])))".into());
    q.push("histogram_quantile(0.5, test_latency_seconds_bucket{le!=\"+Inf\"})".into());
    q.push("histogram_quantile(0.5, test_latency_seconds_bucket)".into());
    q.push("histogram_quantile(0.5, test_requests_total)".into());
    q.push("histogram_quantile(0.9, label_replace(test_latency_seconds_bucket, \"le\", \"0.7\", \"le\", \"0.5\"))".into());
    q.push("rate(test_latency_seconds_sum[5m]) / rate(test_latency_seconds_count[5m])".into());
    q.push(
        "test_rpc_seconds{quantile=\"0.9\"} - on() group_right test_rpc_seconds{quantile=\"0.5\"}"
            .into(),
    );

    // Sorting, scalar, vector, absent.
    q.push("sort(test_temperature_celsius)".into());
    q.push("sort_desc(test_requests_total)".into());
    q.push("sort(rate(test_requests_total[5m]))".into());
    q.push("scalar(test_sparse)".into());
    q.push("scalar(test_requests_total)".into());
    q.push("scalar(sum(test_requests_total))".into());
    q.push("test_requests_total / scalar(sum(test_requests_total))".into());
    q.push("vector(1)".into());
    q.push("vector(time())".into());
    q.push("vector(scalar(test_stopping{kind=\"marked\"}))".into());
    q.push("absent(test_requests_total)".into());
    q.push("absent(nonexistent_metric{job=\"x\", instance=~\"y\"})".into());
    q.push("absent(test_stopping{kind=\"marked\"})".into());
    q.push("absent(sum(nonexistent_metric))".into());

    // Subqueries.
    q.push("rate(test_requests_total[5m])[10m:1m]".into());
    q.push("max_over_time(rate(test_requests_total[5m])[10m:])".into());
    q.push("sum_over_time(test_temperature_celsius[10m:30s] offset 2m)".into());
    q.push("avg_over_time(sum by (job) (test_requests_total)[15m:45s])".into());
    q.push(format!(
        "min_over_time(test_temperature_celsius[10m:1m] @ {at})"
    ));
    q.push("deriv(sum(test_requests_total)[10m:2m])".into());
    q.push("count_over_time((test_stopping > 3)[20m:1m])".into());
    q.push("max_over_time(max_over_time(test_temperature_celsius[5m:1m])[10m:2m])".into());
    q.push("test_sparse[30m:5m]".into());
    q.push("last_over_time(test_stopping[10m:1m])".into());
    q.push("rate(test_requests_total[5m:30s])".into());

    // Literals.
    for l in [
        "1",
        "-1.5",
        "1e3",
        "0x10",
        "Inf",
        "-Inf",
        "NaN",
        "\"a string\"",
        "(1)",
        "- - 1",
    ] {
        q.push(l.to_string());
    }

    // Errors.
    for e in [
        "rate(test_requests_total)",
        "sum(test_temperature_celsius[5m])",
        "test_requests_total[5m] + 1",
        "foo{",
        "1 +",
        "topk(\"a\", test_requests_total)",
        "count_values(\"invalid-label\", test_requests_total)",
        "{job=~\".*\"}",
        "test_requests_total and 1",
    ] {
        q.push(e.to_string());
    }
    q
}

/// Equal floats up to noise: the same special value, or a relative difference below 1e-9.
fn same_value(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => {
            if x.is_nan() || y.is_nan() || x.is_infinite() || y.is_infinite() {
                return false;
            }
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        _ => false,
    }
}

fn same_points(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_array(), b.as_array()) else {
        return a == b;
    };
    a.len() == b.len()
        && a.iter().zip(b).all(|(p, q)| {
            p[0] == q[0] && same_value(p[1].as_str().unwrap_or(""), q[1].as_str().unwrap_or(""))
        })
}

/// Why two answers differ, or `None`. Vector order is compared only for `sort` queries
/// (Prometheus's order is otherwise an implementation detail, and random for some functions).
fn difference(query: &str, ours: &(u16, Value), theirs: &(u16, Value)) -> Option<String> {
    let (o, t) = (&ours.1, &theirs.1);
    if t["status"] == "error" || o["status"] == "error" {
        if o["status"] != t["status"] || o["errorType"] != t["errorType"] {
            return Some(format!("errors differ: {o} vs {t}"));
        }
        return None;
    }
    let (od, td) = (&o["data"], &t["data"]);
    if od["resultType"] != td["resultType"] {
        return Some(format!(
            "result types differ: {} vs {}",
            od["resultType"], td["resultType"]
        ));
    }
    match td["resultType"].as_str() {
        Some("vector") | Some("matrix") => {
            let key = |r: &Value| r["metric"].to_string();
            let points = |r: &Value| {
                if r.get("value").is_some() {
                    Value::Array(vec![r["value"].clone()])
                } else {
                    r["values"].clone()
                }
            };
            let ordered = query.starts_with("sort");
            let (or, tr) = (od["result"].as_array()?, td["result"].as_array()?);
            if or.len() != tr.len() {
                return Some(format!("{} series vs {}: {o} vs {t}", or.len(), tr.len()));
            }
            if ordered {
                for (a, b) in or.iter().zip(tr) {
                    if !same_points(&points(a), &points(b)) {
                        return Some(format!("order or values differ: {o} vs {t}"));
                    }
                }
            }
            let ours: BTreeMap<String, Value> = or.iter().map(|r| (key(r), points(r))).collect();
            let theirs: BTreeMap<String, Value> = tr.iter().map(|r| (key(r), points(r))).collect();
            if ours.len() != or.len() {
                return Some("duplicate label sets in our answer".into());
            }
            for (labels, expected) in &theirs {
                match ours.get(labels) {
                    None => return Some(format!("missing series {labels}: {o} vs {t}")),
                    Some(got) if !same_points(got, expected) => {
                        return Some(format!("series {labels} differs: {got} vs {expected}"))
                    }
                    _ => {}
                }
            }
            None
        }
        _ => {
            let (a, b) = (&od["result"], &td["result"]);
            if a[0] == b[0] && same_value(a[1].as_str().unwrap_or(""), b[1].as_str().unwrap_or(""))
            {
                None
            } else {
                Some(format!("{a} vs {b}"))
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promql_answers_equal_prometheus() {
    // Every query's parts split over two query threads, however small: the parallel paths
    // answer every query of the set (the single-thread paths are compared with them bit for
    // bit in the evaluator's unit tests).
    differential(
        Secumon::start_with(|c| {
            c.query.threads = 2;
            c.query.parallel_min_points = 0;
        })
        .await,
    )
    .await;
}

/// Loads the dataset into `secumon` and a fresh Prometheus, asks both every query, and fails
/// unless every answer agrees.
pub async fn differential(secumon: Secumon) {
    let prometheus =
        Prometheus::start(|_| "global:\n  scrape_interval: 1h\n  evaluation_interval: 1m\n".into());
    let now = chrono::Utc::now().timestamp_millis();
    // Whole minutes, ending ten minutes ago so every query time is in the past.
    let start = (now - 70 * 60_000).div_euclid(60_000) * 60_000;
    let data = dataset::generate(42, start, POINTS);
    dataset::load_into_both(&secumon, &prometheus, dataset::requests(&data, 20)).await;
    let http = reqwest::Client::new();

    let secs = |t: i64| format!("{}", t as f64 / 1000.0);
    let end = start + (POINTS as i64 - 1) * INTERVAL_MS;
    let instants = [
        start + 20 * 60_000,
        start + 45 * 60_000 + 7_000,
        end + 3 * 60_000,
    ];
    let ranges = [
        (start, end + 5 * 60_000, "60"),
        (start + 10 * 60_000, start + 40 * 60_000, "37"),
    ];
    let queries = queries(start + 30 * 60_000);
    let (mut passed, mut failed) = (0usize, Vec::new());
    for query in &queries {
        let mut cases: Vec<(&str, Vec<(&str, String)>)> = instants
            .iter()
            .map(|&t| {
                (
                    "/api/v1/query",
                    vec![("query", query.clone()), ("time", secs(t))],
                )
            })
            .collect();
        for (s, e, step) in ranges {
            cases.push((
                "/api/v1/query_range",
                vec![
                    ("query", query.clone()),
                    ("start", secs(s)),
                    ("end", secs(e)),
                    ("step", step.to_string()),
                ],
            ));
        }
        let mut problem = None;
        for (path, params) in &cases {
            let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let ours = get_json(&http, &secumon.url(path), &params).await;
            let theirs = get_json(&http, &prometheus.url(path), &params).await;
            if let Some(why) = difference(query, &ours, &theirs) {
                problem = Some(format!("{path} {params:?}: {why}"));
                break;
            }
        }
        match problem {
            None => passed += 1,
            Some(why) => failed.push(format!("{query}\n    {why}")),
        }
    }
    for f in &failed {
        let cut: String = f.chars().take(1500).collect();
        println!("FAILED {cut}");
    }
    println!(
        "promql differential: {passed} passed, {} failed",
        failed.len()
    );
    assert!(
        queries.len() >= 400,
        "the set has only {} queries",
        queries.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} queries differ from Prometheus",
        failed.len(),
        queries.len()
    );
}
