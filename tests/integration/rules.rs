//! Rules against Prometheus 2.42: the same rule file evaluated by both over the same
//! remote-written data gives the same recorded series, the same ALERTS and ALERTS_FOR_STATE
//! samples at the same evaluation times, and the same `/api/v1/rules` and `/api/v1/alerts`
//! documents up to timestamps; `secumon check rules` accepts and refuses what
//! `promtool check rules` does.

use crate::support::dataset::load_into_both;
use crate::support::remote_write::{request, series};
use crate::support::{find_binary, get_json, Prometheus, Secumon};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A real Alertmanager (Debian's `prometheus-alertmanager`) that routes every alert to a
/// receiver that does nothing, so its API shows what it was sent.
struct Alertmanager {
    base: String,
    log: std::path::PathBuf,
    _process: crate::support::process::Managed,
}

impl Alertmanager {
    /// One that routes every alert to a receiver that does nothing.
    fn start() -> Alertmanager {
        Alertmanager::start_with(
            "route:\n  receiver: \"null\"\n  group_wait: 0s\nreceivers:\n  - name: \"null\"\n",
        )
    }

    fn start_with(config_text: &str) -> Alertmanager {
        let binary = find_binary(
            "prometheus-alertmanager",
            "apt-get install -y prometheus-alertmanager",
        );
        let dir = crate::support::process::temp_dir("secumon-am");
        let config = dir.join("alertmanager.yml");
        std::fs::write(&config, config_text).unwrap();
        let port = crate::support::process::free_port();
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn");
        let process =
            crate::support::process::Managed::spawn("alertmanager", cmd, Some(dir.clone()));
        crate::support::process::wait_for_port(port, Duration::from_secs(30), "alertmanager");
        Alertmanager {
            base: format!("http://127.0.0.1:{port}"),
            log: dir.join("alertmanager.log"),
            _process: process,
        }
    }

    /// The alerts it holds, as compared: labels, annotations, start and end, state; the
    /// generator URL without the sender's own address.
    async fn alerts(&self, http: &reqwest::Client) -> Vec<Value> {
        let alerts: Vec<Value> = http
            .get(format!("{}/api/v2/alerts", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut out: Vec<Value> = alerts
            .iter()
            .map(|a| {
                let url = a["generatorURL"].as_str().unwrap_or("");
                serde_json::json!({
                    "labels": a["labels"],
                    "annotations": a["annotations"],
                    "startsAt": a["startsAt"],
                    "endsAt": a["endsAt"],
                    "state": a["status"]["state"],
                    "generator": url.find("/graph").map_or(url, |i| &url[i..]),
                })
            })
            .collect();
        out.sort_by_key(|a| a.to_string());
        out
    }
}

const RULES: &str = r#"groups:
  - name: recording
    interval: 1s
    rules:
      - record: job:m:sum
        expr: sum by (job) (m)
      - record: m_doubled
        expr: m * 2
        labels:
          source: rule
  - name: alerts
    interval: 1s
    rules:
      - alert: High
        expr: m > 5
        for: 3s
        labels:
          severity: page
        annotations:
          summary: "{{ $labels.instance }} is at {{ $value | humanize }}"
          value: "{{ $value }}"
          total: "{{ with query \"sum(m)\" }}{{ . | first | value }}{{ end }} in {{ $externalLabels.cluster }}"
      - alert: Sticky
        expr: m > 8
        keep_firing_for: 4s
      - alert: Present
        expr: count(m) >= 1
        labels:
          team: "{{ $labels.nothing }}"
"#;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `m` of two instances, a sample a second for 40 s from `t0`: instance a goes over 5 (High
/// pending, then firing), over 8 (Sticky fires, then keeps firing after it drops), back to 1
/// (both resolve) and over 5 again; b stays at 1. `Present` fires from the first evaluation
/// that sees the data: its activation time, unlike that of an alert on `vector(1)`, does not
/// depend on when each server started.
fn dataset(t0: i64) -> Vec<secumon_proto::prometheus::TimeSeries> {
    let a: Vec<(i64, f64)> = (0..40)
        .map(|i| {
            let v = match i {
                0..=4 => 1.0,
                5..=14 => 7.0,
                15..=19 => 9.5,
                20..=29 => 1.0,
                _ => 7.25,
            };
            (t0 + i * 1000, v)
        })
        .collect();
    let b: Vec<(i64, f64)> = (0..40).map(|i| (t0 + i * 1000, 1.0)).collect();
    vec![
        series(&[("__name__", "m"), ("job", "j"), ("instance", "a")], &a),
        series(&[("__name__", "m"), ("job", "j"), ("instance", "b")], &b),
    ]
}

/// Every raw sample of the rules' output over the last two minutes, by series.
async fn outputs(
    http: &reqwest::Client,
    base: &str,
    at: i64,
) -> BTreeMap<String, Vec<(i64, String)>> {
    let (status, body) = get_json(
        http,
        &format!("{base}/api/v1/query"),
        &[
            (
                "query",
                r#"{__name__=~"ALERTS|ALERTS_FOR_STATE|job:m:sum|m_doubled"}[2m]"#,
            ),
            ("time", &format!("{}", at as f64 / 1000.0)),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut out = BTreeMap::new();
    for s in body["data"]["result"].as_array().unwrap() {
        let samples = s["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    (p[0].as_f64().unwrap() * 1000.0).round() as i64,
                    p[1].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        out.insert(s["metric"].to_string(), samples);
    }
    out
}

/// A rules or alerts document with what differs between runs taken out: evaluation times
/// and durations, and the sub-millisecond digits of activation times (Prometheus keeps
/// nanoseconds of its evaluation slot, SecuMon milliseconds).
fn normalized(mut doc: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.remove("evaluationTime");
                map.remove("lastEvaluation");
                for key in ["activeAt", "keepFiringSince"] {
                    // To the millisecond, as SecuMon keeps times; a whole second is written
                    // with no fraction (as Go writes it), and is ".000" here too.
                    if let Some(Value::String(t)) = map.get_mut(key) {
                        let trimmed = t.trim_end_matches('Z');
                        let (head, fraction) = trimmed.split_once('.').unwrap_or((trimmed, ""));
                        let ms: String = fraction.chars().chain("000".chars()).take(3).collect();
                        *t = format!("{head}.{ms}Z");
                    }
                }
                for value in map.values_mut() {
                    walk(value);
                }
            }
            Value::Array(items) => {
                for item in items.iter_mut() {
                    walk(item);
                }
                // Alert order is unspecified in Prometheus.
                items.sort_by_key(|i| i.to_string());
            }
            _ => {}
        }
    }
    walk(&mut doc);
    doc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_evaluate_as_prometheus_evaluates_them() {
    let dir = crate::support::process::temp_dir("secumon-rules");
    let file = dir.join("rules.yml");
    std::fs::write(&file, RULES).unwrap();
    let path = file.display().to_string();
    let (am_secumon, am_prometheus) = (Alertmanager::start(), Alertmanager::start());
    let secumon = Secumon::start_with(|c| {
        c.rules.files = vec![path.clone()];
        c.rules.evaluation_interval = Duration::from_secs(1);
        c.rules.alertmanager_urls = vec![am_secumon.base.clone()];
        c.rules.external_labels = vec!["cluster=c1".into()];
    })
    .await;
    let prometheus = Prometheus::start(|_| {
        format!(
            "global:\n  evaluation_interval: 1s\n  external_labels:\n    cluster: c1\nrule_files:\n  - {path}\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{}\"]\n",
            am_prometheus.base.trim_start_matches("http://")
        )
    });
    // Both have evaluated every group several times (ALERTS are written from the third
    // evaluation on, as Prometheus writes them once its `for` state is restored) before the
    // data starts.
    let t0 = (now_ms() / 1000 + 6) * 1000;
    load_into_both(&secumon, &prometheus, vec![request(dataset(t0), vec![])]).await;
    let end = t0 + 40_000;
    tokio::time::sleep(Duration::from_millis((end + 3_000 - now_ms()).max(0) as u64)).await;

    let http = reqwest::Client::new();
    let expected = outputs(&http, &prometheus.base, end).await;
    let actual = outputs(&http, &secumon.base, end).await;
    assert!(
        expected.len() >= 8,
        "Prometheus's rules wrote too little: {expected:#?}"
    );
    // Samples from t0 on: before it, each server's first evaluations depend on when it
    // started.
    let from_t0 =
        |m: &BTreeMap<String, Vec<(i64, String)>>| -> BTreeMap<String, Vec<(i64, String)>> {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.iter()
                            .filter(|(t, _)| *t >= t0)
                            .cloned()
                            .collect::<Vec<_>>(),
                    )
                })
                .filter(|(_, v): &(String, Vec<(i64, String)>)| !v.is_empty())
                .collect()
        };
    let (expected, actual) = (from_t0(&expected), from_t0(&actual));
    for (series, samples) in &expected {
        assert_eq!(
            actual.get(series),
            Some(samples),
            "{series}: SecuMon differs from Prometheus"
        );
    }
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );

    for path in ["/api/v1/rules", "/api/v1/alerts"] {
        let (_, p) = get_json(&http, &prometheus.url(path), &[]).await;
        let (_, s) = get_json(&http, &secumon.url(path), &[]).await;
        assert_eq!(normalized(s), normalized(p), "{path}");
    }
    // Both Alertmanagers were sent the same alerts, at the same times: those that started
    // firing with the data (Prometheus drops what fires before it has discovered its
    // Alertmanager, and sends it again only a resend delay later).
    let since_t0 = |alerts: Vec<Value>| -> Vec<Value> {
        alerts
            .into_iter()
            .filter(|a| {
                chrono::DateTime::parse_from_rfc3339(a["startsAt"].as_str().unwrap())
                    .unwrap()
                    .timestamp_millis()
                    >= t0
            })
            .collect()
    };
    let expected = since_t0(am_prometheus.alerts(&http).await);
    assert!(!expected.is_empty(), "Prometheus sent nothing");
    let sent = am_secumon.alerts(&http).await;
    assert!(
        sent.iter().any(|a| a["labels"]["alertname"] == "Present"),
        "{sent:#?}"
    );
    assert_eq!(since_t0(sent), expected);
    let metrics = secumon.metrics_text().await;
    assert!(
        metrics.contains("secumon_notifications_sent_total{alertmanager="),
        "{metrics}"
    );
    let (status, body) = get_json(&http, &secumon.url("/api/v1/rules"), &[("type", "foo")]).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        "invalid parameter \"type\": not supported value \"foo\""
    );
}

/// Files and the verdict both tools must give.
const CHECKED: &[(&str, &str)] = &[
    ("good.yml", RULES),
    ("empty.yml", ""),
    (
        "both.yml",
        "groups:\n  - name: g\n    rules:\n      - record: a\n        alert: A\n        expr: up\n",
    ),
    ("neither.yml", "groups:\n  - name: g\n    rules:\n      - expr: up\n"),
    ("noexpr.yml", "groups:\n  - name: g\n    rules:\n      - record: a\n"),
    ("badexpr.yml", "groups:\n  - name: g\n    rules:\n      - record: a\n        expr: sum(up\n"),
    ("badname.yml", "groups:\n  - name: g\n    rules:\n      - record: bad-name\n        expr: up\n"),
    ("forrecord.yml", "groups:\n  - name: g\n    rules:\n      - record: a\n        expr: up\n        for: 1m\n"),
    ("badlabel.yml", "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        labels:\n          bad-label: x\n"),
    ("namelabel.yml", "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        labels:\n          __name__: x\n"),
    ("badtemplate.yml", "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        annotations:\n          s: \"{{ $foo }}\"\n"),
    ("unclosed.yml", "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        annotations:\n          s: \"{{ humanize $value \"\n"),
    ("dupgroup.yml", "groups:\n  - name: g\n    rules: []\n  - name: g\n    rules: []\n"),
    ("nogroupname.yml", "groups:\n  - rules: []\n"),
    ("unknown.yml", "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        annotation: {}\n"),
    ("baddur.yml", "groups:\n  - name: g\n    interval: 5 minutes\n    rules: []\n"),
    ("notyaml.yml", "groups: [\n"),
    ("templatesok.yml", "groups:\n  - name: g\n    rules:\n      - alert: A 1\n        expr: up == 0\n        for: 5m\n        keep_firing_for: 1m\n        labels:\n          s: \"{{ if gt $value 1.0 }}hi{{ else }}lo{{ end }}\"\n        annotations:\n          d: '{{ $labels.instance | toUpper }} {{ printf \"%.2f\" $value }} {{ humanizeDuration 90 }}'\n"),
];

/// The problems promtool reports, and how SecuMon words each.
const PROBLEMS: &[(&str, &str)] = &[
    (
        "only one of 'record' and 'alert' must be set",
        "only one of 'record' and 'alert' must be set",
    ),
    (
        "one of 'record' or 'alert' must be set",
        "one of 'record' or 'alert' must be set",
    ),
    (
        "field 'expr' must be set in rule",
        "field 'expr' must be set in rule",
    ),
    ("could not parse expression", "could not parse expression"),
    (
        "invalid field 'for' in recording rule",
        "invalid field 'for' in recording rule",
    ),
    (
        "invalid recording rule name: bad-name",
        "invalid recording rule name: bad-name",
    ),
    (
        "invalid label name: bad-label",
        "invalid label name: bad-label",
    ),
    (
        "invalid label name: __name__",
        "invalid label name: __name__",
    ),
    ("undefined variable \"$foo\"", "undefined variable \"$foo\""),
    ("annotation \"s\": template", "annotation \"s\": template"),
    (
        "groupname: \"g\" is repeated in the same file",
        "groupname: \"g\" is repeated in the same file",
    ),
    ("Groupname must not be empty", "Groupname must not be empty"),
    (
        "field annotation not found in type",
        "unknown field `annotation`",
    ),
    (
        "not a valid duration string: \"5 minutes\"",
        "not a valid duration string: \"5 minutes\"",
    ),
];

#[test]
fn secumon_check_rules_agrees_with_promtool() {
    let promtool = find_binary("promtool", "apt-get install -y prometheus");
    let dir = crate::support::process::temp_dir("secumon-check-rules");
    for (name, text) in CHECKED {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let run = |program: &Path, args: &[&str]| {
            let out = Command::new(program)
                .args(args)
                .arg(&path)
                .current_dir(&dir)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (p_code, p_out, p_err) = run(&promtool, &["check", "rules"]);
        let (s_code, s_out, s_err) = run(
            Path::new(env!("CARGO_BIN_EXE_secumon")),
            &["check", "rules"],
        );
        assert_eq!(
            s_code, p_code,
            "{name}: promtool said {p_out}{p_err}; SecuMon said {s_out}{s_err}"
        );
        if p_code == Some(0) {
            assert_eq!(s_out, p_out, "{name}");
        } else {
            assert!(s_err.starts_with("  FAILED:\n"), "{name}: {s_err}");
            // Every problem promtool names is named too (YAML syntax errors aside: each
            // parser words them its own way).
            for (promtool_says, secumon_says) in PROBLEMS {
                if p_err.contains(promtool_says) {
                    assert!(
                        s_err.contains(secumon_says),
                        "{name}: promtool says {p_err}; SecuMon says {s_err}"
                    );
                }
            }
        }
    }
}

const RESTART_RULES: &str = r#"groups:
  - name: restart
    interval: 1s
    rules:
      - alert: Pending
        expr: m > 0
        for: 20s
      - alert: Firing
        expr: m > 0
        for: 5s
"#;

/// The alerts `/api/v1/alerts` shows, by name: state and when active (ms).
async fn alerts_by_name(http: &reqwest::Client, base: &str) -> BTreeMap<String, (String, i64)> {
    let (_, body) = get_json(http, &format!("{base}/api/v1/alerts"), &[]).await;
    body["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let at = chrono::DateTime::parse_from_rfc3339(a["activeAt"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            (
                a["labels"]["alertname"].as_str().unwrap().to_owned(),
                (a["state"].as_str().unwrap().to_owned(), at),
            )
        })
        .collect()
}

/// A restart in the middle of a `for`: after it, the alert that was pending keeps the time it
/// had spent pending (its activation moves forward by the outage) and the one that was
/// firing fires again at once, as Prometheus's restore of `ALERTS_FOR_STATE` gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_a_for_keeps_its_state() {
    use crate::support::process::{free_port, spawn_secumon};
    let dir = crate::support::process::temp_dir("secumon-rules-restart");
    let file = dir.join("rules.yml");
    std::fs::write(&file, RESTART_RULES).unwrap();
    let data = dir.join("data").display().to_string();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let rules = file.display().to_string();
    let args = [
        "--rules",
        rules.as_str(),
        "--rules-evaluation-interval",
        "1s",
        "--rules-for-grace-period",
        "4s",
    ];
    let http = reqwest::Client::new();
    let server = spawn_secumon(&data, port, &args);
    // `m` is 1 from now on, for longer than the test.
    let start = now_ms() / 1000 * 1000;
    let samples: Vec<(i64, f64)> = (0..180).map(|i| (start + i * 1000, 1.0)).collect();
    let body = crate::support::remote_write::encode(&request(
        vec![series(&[("__name__", "m")], &samples)],
        vec![],
    ));
    let response = http
        .post(format!("{base}/api/v1/write"))
        .header("Content-Encoding", "snappy")
        .header("Content-Type", "application/x-protobuf")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    // Until Firing fires and ALERTS_FOR_STATE has been written a few times.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let before = loop {
        let alerts = alerts_by_name(&http, &base).await;
        if alerts.get("Firing").is_some_and(|(s, _)| s == "firing")
            && alerts
                .get("Pending")
                .is_some_and(|(_, at)| now_ms() - at > 8_000)
        {
            break alerts;
        }
        assert!(std::time::Instant::now() < deadline, "{alerts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(before["Pending"].0, "pending");
    // A graceful stop (SIGTERM), which must not mark the alerts' series stale.
    // SAFETY: kill sends a signal to a process this test started.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(server);
    let stopped = now_ms();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restarted = now_ms();
    let _server = spawn_secumon(&data, port, &args);

    // After its second evaluation the server restores; by its third both alerts show it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let alerts = alerts_by_name(&http, &base).await;
        if alerts.get("Firing").is_some_and(|(s, _)| s == "firing") {
            break alerts;
        }
        assert!(std::time::Instant::now() < deadline, "{alerts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let fired_after = now_ms() - restarted;
    // Restored to its first activation, in whole seconds (as ALERTS_FOR_STATE keeps it),
    // so it fired at the third evaluation, not `for` (5 s) after the restart.
    assert_eq!(
        after["Firing"].1,
        before["Firing"].1 / 1000 * 1000,
        "{after:?}"
    );
    assert!(
        fired_after < 5_000,
        "fired {fired_after} ms after the restart"
    );
    // Pending moved forward by the outage: what it had spent pending before is kept.
    let (state, active_at) = &after["Pending"];
    assert_eq!(state, "pending");
    let shift = active_at - before["Pending"].1 / 1000 * 1000;
    let outage = restarted - stopped;
    assert!(
        shift >= outage - 1_000 && shift <= outage + 6_000,
        "activation moved {shift} ms for an outage of {outage} ms"
    );
}

/// The ruler API: each tenant stores, reads and deletes its own groups, which are evaluated in
/// its tenant only; bad groups and groups past the limits are refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ruler_api_manages_each_tenant_s_groups() {
    let (s, catalog) = crate::auth::start(crate::support::Backend::of_run(), |c| {
        c.rules.max_rules_per_group = 2;
        c.rules.max_groups_per_tenant = 2;
        c.rules.min_interval = Duration::from_secs(1);
    })
    .await;
    let t1 = crate::auth::mint(&catalog, "t1", "read,admin", None).await;
    let t2 = crate::auth::mint(&catalog, "t2", "read,admin", None).await;
    let reader = crate::auth::mint(&catalog, "t1", "read", None).await;
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, token: &str, body: &str| {
        http.request(method, s.url(path))
            .bearer_auth(token)
            .body(body.to_owned())
            .send()
    };
    let get_as = |path: &str, token: &str| {
        let response = call(reqwest::Method::GET, path, token, "");
        async move { response.await.unwrap().json::<Value>().await.unwrap() }
    };
    let group = "name: g\ninterval: 1s\nrules:\n  - record: t1:one\n    expr: vector(1)\n    labels:\n      from: ruler\n";
    let r = call(reqwest::Method::POST, "/api/v1/rules/ns1", &t1, group)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
    // A read-only token cannot write.
    let r = call(reqwest::Method::POST, "/api/v1/rules/ns1", &reader, group)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    let r = call(reqwest::Method::GET, "/api/v1/rules/ns1", &t1, "")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.starts_with("ns1:\n") && text.contains("record: t1:one"),
        "{text}"
    );
    let r = call(reqwest::Method::GET, "/api/v1/rules/ns1/g", &t1, "")
        .await
        .unwrap();
    assert!(r.text().await.unwrap().starts_with("name: g\n"));
    // Another tenant sees none of it.
    let r = call(reqwest::Method::GET, "/api/v1/rules/ns1", &t2, "")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // Evaluated in its tenant, shown on its /api/v1/rules with the namespace as the file.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body: Value = get_as("/api/v1/query?query=t1:one", &t1).await;
        if body["data"]["result"]
            .as_array()
            .is_some_and(|r| r.len() == 1)
        {
            assert_eq!(body["data"]["result"][0]["metric"]["from"], "ruler");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let other: Value = get_as("/api/v1/query?query=t1:one", &t2).await;
    assert_eq!(other["data"]["result"], serde_json::json!([]));
    let rules: Value = get_as("/api/v1/rules", &t1).await;
    assert_eq!(rules["data"]["groups"][0]["file"], "ns1");
    assert_eq!(rules["data"]["groups"][0]["rules"][0]["health"], "ok");
    let rules: Value = get_as("/api/v1/rules", &t2).await;
    assert_eq!(rules["data"]["groups"], serde_json::json!([]));

    // Refused with the reason: a bad expression, too many rules, a bad namespace.
    for (path, body, reason) in [
        ("/api/v1/rules/ns1", "name: bad\nrules:\n  - record: x\n    expr: sum(\n", "could not parse expression"),
        (
            "/api/v1/rules/ns1",
            "name: big\nrules:\n  - record: a\n    expr: up\n  - record: b\n    expr: up\n  - record: c\n    expr: up\n",
            "rules per rule group limit (limit: 2)",
        ),
        ("/api/v1/rules/ns1", "name: x\nrules: []\nunknown: 1\n", "unknown field `unknown`"),
        ("/api/v1/rules/ns1", "name: x\ninterval: 500ms\nrules: []\n", "interval below --rules-min-interval (1s)"),
    ] {
        let r = call(reqwest::Method::POST, path, &t1, body).await.unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let error: Value = r.json().await.unwrap();
        assert!(error["error"].as_str().unwrap().contains(reason), "{error}");
    }

    // A changed group keeps its alerts' state (Prometheus's CopyState).
    let alerting = "name: a\ninterval: 1s\nrules:\n  - alert: On\n    expr: vector(1)\n";
    let r = call(reqwest::Method::POST, "/api/v1/rules/ns2", &t1, alerting)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let active_at = loop {
        let body: Value = get_as("/api/v1/alerts", &t1).await;
        if let Some(alert) = body["data"]["alerts"].as_array().and_then(|a| a.first()) {
            assert_eq!(alert["state"], "firing");
            break alert["activeAt"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Two groups stored: a third is refused, replacing one is not.
    let r = call(
        reqwest::Method::POST,
        "/api/v1/rules/ns3",
        &t1,
        "name: x\nrules: []\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let error: Value = r.json().await.unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("rule groups limit (limit: 2)"),
        "{error}"
    );
    let changed = format!("{alerting}    annotations:\n      summary: changed\n");
    let r = call(reqwest::Method::POST, "/api/v1/rules/ns2", &t1, &changed)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let body: Value = get_as("/api/v1/alerts", &t1).await;
    let alert = &body["data"]["alerts"][0];
    assert_eq!(alert["annotations"]["summary"], "changed", "{body}");
    assert_eq!(alert["activeAt"], active_at, "{body}");
    assert_eq!(alert["state"], "firing");
    let r = call(reqwest::Method::DELETE, "/api/v1/rules/ns2", &t1, "")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);

    let r = call(reqwest::Method::DELETE, "/api/v1/rules/ns1/g", &t1, "")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let r = call(reqwest::Method::DELETE, "/api/v1/rules/ns1/g", &t1, "")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let rules: Value = get_as("/api/v1/rules", &t1).await;
    assert_eq!(rules["data"]["groups"], serde_json::json!([]));
}

/// What a webhook receiver was sent, by the path it was sent to; the first request to
/// `/secumon` is answered 500, so that SecuMon must try again.
struct WebhookSink {
    base: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>,
}

impl WebhookSink {
    async fn start() -> WebhookSink {
        use axum::extract::{Path as UrlPath, State};
        type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;
        let received: Received = Default::default();
        let failed_once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let app = axum::Router::new()
            .route(
                "/{sender}",
                axum::routing::post(
                    |State((received, failed_once)): State<(
                        Received,
                        std::sync::Arc<std::sync::atomic::AtomicBool>,
                    )>,
                     UrlPath(sender): UrlPath<String>,
                     body: String| async move {
                        if sender == "secumon"
                            && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst)
                        {
                            return http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        let body: Value = serde_json::from_str(&body).unwrap();
                        received.lock().unwrap().push((sender, body));
                        http::StatusCode::OK
                    },
                ),
            )
            .with_state((received.clone(), failed_once));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        WebhookSink { base, received }
    }

    fn from(&self, sender: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| s == sender)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

/// An SMTP server that takes mail only over STARTTLS from one authenticated user
/// (tests/smtp/sink.py, Python's aiosmtpd); each message it took, as a JSON object.
struct SmtpSink {
    port: u16,
    child: std::process::Child,
    received: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

const AIOSMTPD: &str = "python3 -m pip install aiosmtpd";

impl SmtpSink {
    fn start(cert: &Path, key: &Path, user: &str, password: &str) -> SmtpSink {
        use std::io::BufRead;
        let port = crate::support::process::free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp/sink.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(cert)
            .arg(key)
            .args([user, password])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("python3 not found ({e}): install Python 3, then `{AIOSMTPD}`")
            });
        let received: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let sink = received.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(message) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if message["ready"] == true {
                    let _ = ready.send(());
                } else {
                    sink.lock().unwrap().push(message);
                }
            }
        });
        if is_ready.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "the SMTP sink did not start; is aiosmtpd installed (`{AIOSMTPD}`)?\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        SmtpSink {
            port,
            child,
            received,
        }
    }

    fn to(&self, address: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m["to"][0] == address)
            .cloned()
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook message with what differs between senders taken out: each one's own URL, and
/// times below the millisecond (Prometheus keeps nanoseconds of its evaluation slot).
fn webhook_normalized(mut message: Value) -> Value {
    message.as_object_mut().unwrap().remove("externalURL");
    for alert in message["alerts"].as_array_mut().unwrap() {
        let url = alert["generatorURL"].as_str().unwrap_or("").to_owned();
        alert["generatorURL"] = Value::from(url.find("/graph").map_or(url.as_str(), |i| &url[i..]));
        for key in ["startsAt", "endsAt"] {
            let ms = chrono::DateTime::parse_from_rfc3339(alert[key].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            alert[key] = Value::from(ms);
        }
    }
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_receivers_notify_as_alertmanager_does() {
    let dir = crate::support::process::temp_dir("secumon-receivers");
    let ca = crate::tls::Ca::new("receivers test CA");
    let (cert, key) = ca.issue(false);
    let ca_file = crate::tls::write(&dir, "ca.pem", &ca.pem());
    let cert_file = crate::tls::write(&dir, "smtp.pem", &cert);
    let key_file = crate::tls::write(&dir, "smtp.key", &key);
    let smtp = SmtpSink::start(&cert_file, &key_file, "alerts", "s3cret");
    let hook = WebhookSink::start().await;
    // One configuration in Alertmanager's format for both, apart from where it goes.
    let receivers = |sender: &str| {
        format!(
            "global:
  smtp_smarthost: 127.0.0.1:{port}
  smtp_from: alerts@example.com
  smtp_auth_username: alerts
  smtp_auth_password: s3cret
route:
  receiver: team
  group_by: [alertname]
  group_wait: 1s
  group_interval: 2s
  repeat_interval: 5s
receivers:
  - name: team
    webhook_configs:
      - url: {hook}/{sender}
    email_configs:
      - to: {sender}@example.com
        tls_config:
          ca_file: {ca}
",
            port = smtp.port,
            hook = hook.base,
            ca = ca_file.display()
        )
    };
    let rules = dir.join("rules.yml");
    std::fs::write(
        &rules,
        r#"groups:
  - name: receivers
    interval: 1s
    rules:
      - alert: High
        expr: m > 5
        labels:
          severity: page
        annotations:
          summary: "{{ $labels.instance }} is at {{ $value }}"
"#,
    )
    .unwrap();
    let receivers_file = crate::tls::write(&dir, "receivers.yml", &receivers("secumon"));
    let alertmanager = Alertmanager::start_with(&receivers("alertmanager"));
    let rules_path = rules.display().to_string();
    let secumon = Secumon::start_with(|c| {
        c.rules.files = vec![rules_path.clone()];
        c.rules.evaluation_interval = Duration::from_secs(1);
        c.rules.alert_receivers = receivers_file.display().to_string();
        c.rules.external_url = "http://secumon.example:9090".into();
    })
    .await;
    let prometheus = Prometheus::start(|_| {
        format!(
            "global:\n  evaluation_interval: 1s\nrule_files:\n  - {rules_path}\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{}\"]\n",
            alertmanager.base.trim_start_matches("http://")
        )
    });
    // Instance a over 5 for 10 s, b for 14 s: both fire together, are notified, notified
    // again after the repeat interval, then each resolves. Groups are looked at an odd number
    // of seconds after the first evaluation that fires, so changes at even ones are a second
    // from any look.
    let t0 = (now_ms() / 1000 + 6) * 1000;
    let at = |until: i64| -> Vec<(i64, f64)> {
        (0..30)
            .map(|i| (t0 + i * 1000, if i < until { 7.0 } else { 1.0 }))
            .collect()
    };
    load_into_both(
        &secumon,
        &prometheus,
        vec![request(
            vec![
                series(
                    &[("__name__", "m"), ("job", "j"), ("instance", "a")],
                    &at(10),
                ),
                series(
                    &[("__name__", "m"), ("job", "j"), ("instance", "b")],
                    &at(14),
                ),
            ],
            vec![],
        )],
    )
    .await;
    tokio::time::sleep(Duration::from_millis((t0 + 24_000 - now_ms()).max(0) as u64)).await;

    let expected: Vec<Value> = hook
        .from("alertmanager")
        .into_iter()
        .map(webhook_normalized)
        .collect();
    let actual: Vec<Value> = hook
        .from("secumon")
        .into_iter()
        .map(webhook_normalized)
        .collect();
    let statuses: Vec<(&str, usize)> = expected
        .iter()
        .map(|m| {
            (
                m["status"].as_str().unwrap(),
                m["alerts"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [("firing", 2), ("firing", 2), ("firing", 2), ("resolved", 1)],
        "Alertmanager's notifications: {expected:#?}\nits log: {}",
        std::fs::read_to_string(&alertmanager.log).unwrap_or_default()
    );
    assert_eq!(actual, expected);
    assert_eq!(expected[0]["groupKey"], "{}:{alertname=\"High\"}");

    // Email: the same subjects (resolved alerts are not emailed by default), over STARTTLS
    // as the configured user; SecuMon's as plain text.
    let subjects = |to: &str| -> Vec<String> {
        smtp.to(to)
            .iter()
            .map(|m| m["subject"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        subjects("alertmanager@example.com"),
        [
            "[FIRING:2] High (j page)",
            "[FIRING:2] High (j page)",
            "[FIRING:1] High (b j page)"
        ]
    );
    assert_eq!(
        subjects("secumon@example.com"),
        subjects("alertmanager@example.com")
    );
    let mail = &smtp.to("secumon@example.com")[0];
    assert_eq!(mail["login"], "alerts");
    assert_eq!(mail["tls"], true);
    assert_eq!(mail["from"], "alerts@example.com");
    assert_eq!(mail["content_type"], "text/plain");
    let body = mail["body"].as_str().unwrap();
    assert!(
        body.contains("Firing alerts: 2") && body.contains("summary = a is at 7"),
        "{body}"
    );

    // The webhook's first answer was an error: tried again, and counted.
    let metrics = secumon.metrics_text().await;
    for line in [
        "secumon_receiver_notification_requests_failed_total{receiver=\"team\",integration=\"webhook\"} 1",
        "secumon_receiver_notifications_total{receiver=\"team\",integration=\"webhook\"} 4",
        "secumon_receiver_notifications_total{receiver=\"team\",integration=\"email\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    assert!(
        !metrics.contains("secumon_receiver_notifications_failed_total{"),
        "{metrics}"
    );
}
