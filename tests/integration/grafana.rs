//! The Grafana dashboards (grafana/dashboards) against the real server fed by the real agent
//! (and by its own metrics, for the SecuMon dashboard):
//! every template variable and every panel query, with Grafana's variables substituted as
//! Grafana substitutes them, parses and returns data (unless the panel is marked as rightly
//! empty); and the JSON files are what grafana/generate.py writes.

use crate::support::{Backend, Secumon};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The agent's interval in this test (Grafana's data source `timeInterval` in production).
const SCRAPE_SECONDS: u64 = 1;
/// The time range of the dashboards' queries, as a user's "last N seconds".
const RANGE_SECONDS: u64 = 30;

fn dashboards() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/dashboards");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn the_dashboards_are_what_the_generator_writes() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/generate.py");
    let output = Command::new("python3")
        .arg(script)
        .arg("--check")
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let names: Vec<String> = dashboards().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["fleet-overview.json", "host-overview.json", "secumon.json"]
    );
}

/// Grafana's multi-value formatting for a regex matcher (`prometheusSpecialRegexEscape` of its
/// Prometheus data source): `\` doubled twice, each of `$^*{}[]'+?.()|` preceded by an escaped
/// backslash (the PromQL string then holds the regex escape), values joined as `(a|b)`.
fn regex_values(values: &[String]) -> String {
    let escaped: Vec<String> = values
        .iter()
        .map(|v| {
            let mut out = String::new();
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\\\\\"),
                    '$' | '^' | '*' | '{' | '}' | '[' | ']' | '\'' | '+' | '?' | '.' | '('
                    | ')' | '|' => {
                        out.push_str("\\\\");
                        out.push(c);
                    }
                    _ => out.push(c),
                }
            }
            out
        })
        .collect();
    format!("({})", escaped.join("|"))
}

/// `$__rate_interval` as Grafana computes it: max(`$__interval` + scrape interval, 4 × scrape
/// interval); `$__interval` is the step, here the scrape interval itself.
fn substitute(query: &str, variables: &BTreeMap<String, String>) -> String {
    let rate_interval = (2 * SCRAPE_SECONDS).max(4 * SCRAPE_SECONDS);
    let mut q = query
        .replace("$__rate_interval", &format!("{rate_interval}s"))
        .replace("$__interval", &format!("{SCRAPE_SECONDS}s"))
        .replace("$__range", &format!("{RANGE_SECONDS}s"));
    // Longest names first, so `$instance` is not taken for a `$inst` prefix.
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        q = q.replace(&format!("${name}"), &variables[name]);
    }
    assert!(!q.contains('$'), "a variable is left in {q}");
    q
}

/// A request as Grafana's data source sends it: queries as form POST (`httpMethod: POST`),
/// label values as GET.
async fn get(s: &Secumon, path: &str, params: &[(&str, String)]) -> Value {
    let request = if path.starts_with("/api/v1/label/") {
        s.http.get(s.url(path)).query(params)
    } else {
        s.http.post(s.url(path)).form(params)
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 200, "{path} {params:?}: {body}");
    assert_eq!(body["status"], "success", "{body}");
    body
}

/// `label_values(selector, label)` as Grafana's Prometheus data source asks it (Prometheus 2.24
/// and later): the label's values among the series `selector` matches in the time range.
async fn label_values(s: &Secumon, query: &str, start: u64, end: u64) -> Vec<String> {
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not a label_values query: {query}"));
    let (selector, label) = inner.rsplit_once(',').unwrap();
    let body = get(
        s,
        &format!("/api/v1/label/{}/values", label.trim()),
        &[
            ("match[]", selector.trim().to_owned()),
            ("start", start.to_string()),
            ("end", end.to_string()),
        ],
    )
    .await;
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_the_agent() {
    let s = Secumon::start_on(Backend::Embedded, |c| {
        c.fleet.status_interval_secs = 1;
        c.self_monitor.interval_secs = SCRAPE_SECONDS;
    })
    .await;
    let dir = crate::support::process::temp_dir("secumon-grafana-agent");
    let agent_bin = Path::new(env!("CARGO_BIN_EXE_secumon")).with_file_name("secumon-agent");
    assert!(
        agent_bin.is_file(),
        "{} is missing: cargo build -p secumon-agent",
        agent_bin.display()
    );
    let mut cmd = Command::new(agent_bin);
    cmd.args([
        "--server",
        &format!("http://{}", s.server.otlp_grpc_addr.unwrap()),
    ])
    .args([
        "--interval",
        &format!("{SCRAPE_SECONDS}s"),
        "--opamp-url",
        &s.url("/v1/opamp"),
        "--opamp-heartbeat",
        "1s",
    ])
    .arg("--state-dir")
    .arg(dir.join("state"));
    let _agent = crate::support::process::Managed::spawn("secumon-agent", cmd, None);
    // Enough readings for every rate() window, the fleet's status series, top processes by CPU.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = get(
            &s,
            "/api/v1/query",
            &[(
                "query",
                "count(secumon_agent_up) * count(rate(system_cpu_time_seconds_total[4s]))".into(),
            )],
        )
        .await;
        if body["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            break;
        }
        assert!(Instant::now() < deadline, "the agent's data did not arrive");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;

    let end = unix_now();
    let start = end - RANGE_SECONDS;
    let mut checked = 0;
    for (file, dashboard) in dashboards() {
        // Variables in order, each query seeing the ones before it (as Grafana resolves them),
        // every value selected.
        let mut variables = BTreeMap::new();
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            let name = variable["name"].as_str().unwrap().to_owned();
            let query = substitute(variable["query"]["query"].as_str().unwrap(), &variables);
            let values = label_values(&s, &query, start, end).await;
            assert!(
                !values.is_empty(),
                "{file}: variable {name} ({query}) has no value"
            );
            variables.insert(name, regex_values(&values));
            checked += 1;
        }
        for panel in dashboard["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            let may_be_empty = panel["secumonMayBeEmpty"] == true;
            for target in panel["targets"].as_array().unwrap() {
                let expr = substitute(target["expr"].as_str().unwrap(), &variables);
                let instant = target["instant"] == true;
                let body = if instant {
                    get(
                        &s,
                        "/api/v1/query",
                        &[("query", expr.clone()), ("time", end.to_string())],
                    )
                    .await
                } else {
                    get(
                        &s,
                        "/api/v1/query_range",
                        &[
                            ("query", expr.clone()),
                            ("start", start.to_string()),
                            ("end", end.to_string()),
                            ("step", SCRAPE_SECONDS.to_string()),
                        ],
                    )
                    .await
                };
                let result = body["data"]["result"].as_array().unwrap();
                assert!(
                    may_be_empty || !result.is_empty(),
                    "{file}: panel {title:?}: no data for {expr}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "{checked} queries");
}
