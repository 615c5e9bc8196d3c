//! secumon-agent against the real server and the real node_exporter: its readings equal
//! node_exporter's on this host; PromQL sees this host's series in both namings over both
//! transports; a server outage (with an agent restart in it) loses no reading.

use crate::support::process::{free_port, spawn_secumon, temp_dir, wait_for_port, Managed};
use crate::support::{NodeExporter, Secumon};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The agent built beside the server by `cargo test --workspace` (or `cargo build`).
fn agent_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_secumon")).with_file_name("secumon-agent");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p secumon-agent`",
        path.display()
    );
    path
}

/// `secumon-agent --once` with `args`: its snapshot.
fn once(args: &[&str]) -> Value {
    let output = Command::new(agent_binary())
        .arg("--once")
        .args(args)
        .output()
        .expect("run secumon-agent");
    assert!(
        output.status.success(),
        "secumon-agent --once failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("--once prints JSON")
}

/// Samples of a snapshot: (name, sorted attributes) -> value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

fn snapshot_samples(snapshot: &Value) -> Samples {
    let mut samples = Samples::new();
    for metric in snapshot["metrics"].as_array().expect("metrics") {
        let name = metric["name"].as_str().unwrap().to_owned();
        for point in metric["points"].as_array().unwrap() {
            let attributes = point["attributes"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            samples.insert((name.clone(), attributes), point["value"].as_f64().unwrap());
        }
    }
    samples
}

/// The Prometheus text format, as node_exporter writes it (no escaped quotes in the labels
/// this test reads).
fn exposition_samples(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .filter_map(|pair| {
                let (k, v) = pair.split_once("=\"")?;
                Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
            })
            .collect();
        samples.insert((name.to_owned(), labels), value.parse().unwrap_or(f64::NAN));
    }
    samples
}

fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The series of `name` in `samples`, keyed by the values of `key`.
fn by_label(samples: &Samples, name: &str, key: &str) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|((n, _), _)| n == name)
        .map(|((_, labels), v)| (labels.get(key).cloned().unwrap_or_default(), *v))
        .collect()
}

fn close(ours: f64, theirs: f64, relative: f64, absolute: f64) -> bool {
    (ours - theirs).abs() <= theirs.abs() * relative + absolute
}

/// `--collector.filesystem.mount-points-exclude` of Debian's prometheus-node-exporter 1.5.
const DEBIAN_MOUNT_POINTS_EXCLUDE: &str =
    "^/(dev|proc|run|sys|mnt|media|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)";

#[test]
fn readings_equal_node_exporters_on_this_host() {
    let node = NodeExporter::start();
    // Debian's node_exporter leaves out more mount points, and `lo`, where upstream's defaults
    // (which are the agent's) keep them: the agent is given Debian's lists, to read the same.
    let mounts = [
        "--collectors-filesystem-exclude-mount-points",
        DEBIAN_MOUNT_POINTS_EXCLUDE,
        "--collectors-network-exclude-devices",
        "^lo$",
    ];
    let ours = snapshot_samples(&once(
        &[&["--naming", "node_exporter"][..], &mounts].concat(),
    ));
    let theirs = exposition_samples(&scrape(node.port));
    let otel = snapshot_samples(&once(&mounts));

    // Equal: memory total and every filesystem's size, on the same mount points.
    let key = |name: &str| (name.to_owned(), BTreeMap::new());
    let mem_total = theirs[&key("node_memory_MemTotal_bytes")];
    assert_eq!(ours[&key("node_memory_MemTotal_bytes")], mem_total);
    assert_eq!(otel[&key("system.memory.limit")], mem_total);
    let our_fs = by_label(&ours, "node_filesystem_size_bytes", "mountpoint");
    let their_fs = by_label(&theirs, "node_filesystem_size_bytes", "mountpoint");
    assert!(
        !their_fs.is_empty(),
        "node_exporter reports no filesystem here"
    );
    assert_eq!(our_fs, their_fs, "filesystem sizes");
    assert_eq!(
        by_label(&ours, "node_filesystem_files", "mountpoint"),
        by_label(&theirs, "node_filesystem_files", "mountpoint"),
        "inodes"
    );
    // The OpenTelemetry states of a filesystem add up to its size.
    for (mountpoint, size) in &their_fs {
        let states: f64 = otel
            .iter()
            .filter(|((n, l), _)| n == "system.filesystem.usage" && &l["mountpoint"] == mountpoint)
            .map(|(_, v)| v)
            .sum();
        assert_eq!(states, *size, "used + free + reserved of {mountpoint}");
    }

    // Counters, read within a second of each other: CPU seconds per mode (2 % and 2 s over all
    // cores), network and disk bytes (1 % and 1 MiB: the scrape itself moves bytes on lo).
    for mode in ["user", "system", "idle", "iowait", "softirq"] {
        let sum = |s: &Samples| -> f64 {
            s.iter()
                .filter(|((n, l), _)| n == "node_cpu_seconds_total" && l["mode"] == mode)
                .map(|(_, v)| v)
                .sum()
        };
        let (a, b) = (sum(&ours), sum(&theirs));
        assert!(
            close(a, b, 0.02, 2.0),
            "CPU {mode}: ours {a}, node_exporter {b}"
        );
    }
    for (name, key) in [
        ("node_network_receive_bytes_total", "device"),
        ("node_network_transmit_bytes_total", "device"),
        ("node_disk_read_bytes_total", "device"),
        ("node_disk_written_bytes_total", "device"),
        ("node_disk_reads_completed_total", "device"),
    ] {
        let a = by_label(&ours, name, key);
        let b = by_label(&theirs, name, key);
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{name}: the same devices"
        );
        for (device, theirs) in &b {
            let ours = a[device];
            assert!(
                close(ours, *theirs, 0.01, 1048576.0),
                "{name}{{{key}={device}}}: ours {ours}, node_exporter {theirs}"
            );
        }
    }
    assert_eq!(
        by_label(&ours, "node_uname_info", "release"),
        by_label(&theirs, "node_uname_info", "release")
    );
}

/// An agent process sending to `server` every second, its state in `dir`.
fn start_agent(dir: &Path, server: &str, args: &[&str]) -> Managed {
    let mut cmd = Command::new(agent_binary());
    cmd.args([
        "--server",
        server,
        "--interval",
        "1s",
        "--log-level",
        "debug",
    ])
    .arg("--state-dir")
    .arg(dir.join("state"))
    .args(args);
    Managed::spawn("secumon-agent", cmd, None)
}

fn agent_id(dir: &Path) -> String {
    let path = dir.join("state/agent-id");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(id) = std::fs::read_to_string(&path) {
            return id.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "the agent wrote no id");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An instant query against the server at `base`.
async fn query(base: &str, q: &str) -> Vec<Value> {
    query_as(base, None, q).await
}

async fn query_as(base: &str, token: Option<&str>, q: &str) -> Vec<Value> {
    query_with(&reqwest::Client::new(), base, token, q).await
}

/// An instant query with `client` (a TLS client, say), as `token` if given.
async fn query_with(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    q: &str,
) -> Vec<Value> {
    let mut request = client
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)]);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 200, "{q}: {body}");
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until `q` has a result; the result.
async fn eventually(s: &str, q: &str) -> Vec<Value> {
    eventually_with(&reqwest::Client::new(), s, q).await
}

async fn eventually_with(client: &reqwest::Client, s: &str, q: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let result = query_with(client, s, None, q).await;
        if !result.is_empty() {
            return result;
        }
        assert!(Instant::now() < deadline, "no result for {q}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn promql_sees_this_host_in_both_namings_over_both_transports() {
    let server = Secumon::start().await;
    let s = server.base.as_str();
    let grpc = format!("http://{}", server.server.otlp_grpc_addr.unwrap());
    let http = format!("http://{}", server.server.otlp_http_addr.unwrap());
    let otel_dir = temp_dir("secumon-agent-otel");
    let node_dir = temp_dir("secumon-agent-node");
    let _otel = start_agent(&otel_dir, &grpc, &[]);
    let _node = start_agent(
        &node_dir,
        &http,
        &["--protocol", "http", "--naming", "node_exporter"],
    );
    let otel_id = agent_id(&otel_dir);
    let node_id = agent_id(&node_dir);
    let of = |id: &str| format!("job=\"secumon-agent\",instance=\"{id}\"");

    // OpenTelemetry names, as Prometheus's translation gives the collector's.
    let i = of(&otel_id);
    let cpu = eventually(
        s,
        &format!("system_cpu_time_seconds_total{{{i},cpu=\"cpu0\"}}"),
    )
    .await;
    let states: BTreeSet<&str> = cpu
        .iter()
        .map(|r| r["metric"]["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        BTreeSet::from([
            "idle",
            "interrupt",
            "nice",
            "softirq",
            "steal",
            "system",
            "user",
            "wait"
        ])
    );
    assert!(cpu.iter().any(|r| value(r) > 0.0));
    let memory = eventually(
        s,
        &format!("sum(system_memory_usage_bytes{{{i},state=~\"used|free|buffered|cached\"}})"),
    )
    .await;
    let limit = eventually(s, &format!("system_memory_limit_bytes{{{i}}}")).await;
    assert_eq!(
        value(&memory[0]),
        value(&limit[0]),
        "the states add up to the total"
    );
    let fs = eventually(
        s,
        &format!("system_filesystem_usage_bytes{{{i},state=\"used\"}}"),
    )
    .await;
    assert!(fs.iter().all(|r| r["metric"]["mountpoint"].is_string()
        && r["metric"]["type"].is_string()
        && r["metric"]["mode"].is_string()));
    eventually(
        s,
        &format!("system_network_io_bytes_total{{{i},device=\"lo\",direction=\"receive\"}} > 0"),
    )
    .await;
    eventually(
        s,
        &format!("system_network_connections{{{i},protocol=\"tcp\",state=\"ESTABLISHED\"}}"),
    )
    .await;
    eventually(s, &format!("system_cpu_load_average_1m{{{i}}}")).await;
    eventually(s, &format!("system_cpu_utilization_ratio{{{i}}}")).await;
    eventually(s, &format!("system_disk_io_bytes_total{{{i}}}")).await;
    eventually(s, &format!("system_uptime_seconds{{{i}}} > 0")).await;
    eventually(
        s,
        &format!("system_processes_count{{{i},status=\"running\"}}"),
    )
    .await;
    // Each process its own series: as many series as process ids.
    let processes = eventually(s, &format!("process_memory_usage_bytes{{{i}}}")).await;
    let pids: BTreeSet<&str> = processes
        .iter()
        .map(|r| r["metric"]["process_pid"].as_str().unwrap())
        .collect();
    assert!(
        pids.len() >= 2 && pids.len() == processes.len(),
        "{processes:?}"
    );
    eventually(
        s,
        &format!("process_cpu_time_seconds_total{{{i},state=\"user\"}}"),
    )
    .await;
    // The agent's own metrics ride along.
    eventually(s, &format!("secumon_agent_queue_size_bytes{{{i}}}")).await;
    eventually(
        s,
        &format!("secumon_agent_export_requests_total{{{i},result=\"delivered\"}} > 0"),
    )
    .await;

    // node_exporter names, over OTLP/HTTP.
    let n = of(&node_id);
    let cpu = eventually(
        s,
        &format!("node_cpu_seconds_total{{{n},cpu=\"0\",mode=\"idle\"}}"),
    )
    .await;
    assert!(value(&cpu[0]) > 0.0);
    let available = eventually(s, &format!("node_memory_MemAvailable_bytes{{{n}}}")).await;
    let total = eventually(s, &format!("node_memory_MemTotal_bytes{{{n}}}")).await;
    assert!(value(&available[0]) > 0.0 && value(&available[0]) <= value(&total[0]));
    let fs = eventually(s, &format!("node_filesystem_avail_bytes{{{n}}}")).await;
    assert!(fs
        .iter()
        .all(|r| r["metric"]["fstype"].is_string() && r["metric"]["device"].is_string()));
    eventually(
        s,
        &format!("node_network_receive_bytes_total{{{n},device=\"lo\"}}"),
    )
    .await;
    eventually(s, &format!("node_load1{{{n}}}")).await;
    let uname = eventually(s, &format!("node_uname_info{{{n},sysname=\"Linux\"}}")).await;
    assert_eq!(value(&uname[0]), 1.0);
    eventually(
        s,
        &format!("rate(node_cpu_seconds_total{{{n},mode=\"idle\"}}[1m])"),
    )
    .await;
    // Neither naming leaks into the other.
    assert!(query(s, &format!("node_cpu_seconds_total{{{i}}}"))
        .await
        .is_empty());
    assert!(query(s, &format!("system_cpu_time_seconds_total{{{n}}}"))
        .await
        .is_empty());
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The timestamps (whole seconds) of `system_uptime_seconds` of `id` in the last `range`, and
/// the readings the agent reports it skipped between the first and the last of them: the
/// increments of `secumon_agent_collection_skipped_total` (which each reading carries, so it
/// counts the skips just before that reading) from one reading to the next, summed over the
/// agent's restarts (each process counts from 0). One query, so both describe one moment.
async fn readings(s: &str, id: &str, range: &str) -> (Vec<i64>, i64) {
    let result = query(
        s,
        &format!(
            "{{__name__=~\"system_uptime_seconds|secumon_agent_collection_skipped_total\",instance=\"{id}\"}}[{range}]"
        ),
    )
    .await;
    let points = |name: &str| -> Vec<(i64, i64)> {
        result
            .iter()
            .filter(|series| series["metric"]["__name__"] == name)
            .flat_map(|series| series["values"].as_array().unwrap().iter())
            .map(|v| {
                (
                    v[0].as_f64().unwrap().round() as i64,
                    v[1].as_str().unwrap().parse::<f64>().unwrap() as i64,
                )
            })
            .collect()
    };
    let times: Vec<i64> = points("system_uptime_seconds")
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    let counter: BTreeMap<i64, i64> = points("secumon_agent_collection_skipped_total")
        .into_iter()
        .collect();
    let skipped = times
        .windows(2)
        .map(|w| match (counter.get(&w[0]), counter.get(&w[1])) {
            (Some(&before), Some(&after)) if after >= before => after - before,
            // A new process: its count since it started.
            (_, Some(&after)) => after,
            (_, None) => 0,
        })
        .sum();
    (times, skipped)
}

/// [`readings`] from 30 s before `since` (Unix seconds) once one at or after `until` is in,
/// asked until `deadline`.
async fn readings_until(
    s: &str,
    id: &str,
    since: f64,
    until: f64,
    deadline: Instant,
) -> (Vec<i64>, i64) {
    let range = format!("{}s", (unix_now() - since + 30.0) as u64);
    loop {
        let (times, skipped) = readings(s, id, &range).await;
        if times.last().is_some_and(|&t| t as f64 >= until) {
            return (times, skipped);
        }
        assert!(
            Instant::now() < deadline,
            "no reading at or after {until} arrived: {times:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The server stops for `outage` while the agent keeps reading (and is itself killed and
/// started again in the middle); once the server is back every reading of the outage
/// arrives, in order, and the series has no hole but the agent's own downtime.
async fn outage_loses_nothing(outage: Duration) {
    let data = temp_dir("secumon-agent-outage-data");
    let agent_dir = temp_dir("secumon-agent-outage");
    let (http_port, grpc_port) = (free_port(), free_port());
    let storage = data.display().to_string();
    let grpc_listen = format!("127.0.0.1:{grpc_port}");
    let serve = || spawn_secumon(&storage, http_port, &["--otlp-grpc-listen", &grpc_listen]);
    let server = serve();
    wait_for_port(grpc_port, Duration::from_secs(30), "OTLP/gRPC");
    let base = format!("http://127.0.0.1:{http_port}");
    let client = base.as_str();
    let grpc = format!("http://127.0.0.1:{grpc_port}");
    let mut agent = start_agent(&agent_dir, &grpc, &["--export-max-backoff", "2s"]);
    let id = agent_id(&agent_dir);
    eventually(
        client,
        &format!("system_uptime_seconds{{instance=\"{id}\"}}"),
    )
    .await;

    let down_at = unix_now();
    drop(server);
    // The server's ports stay taken while it is down: the suite runs beside this test, and
    // another test's server given the OTLP port would take (and acknowledge) the agent's
    // readings. A listener that never answers: the agent's exports time out and fail.
    let held = [http_port, grpc_port].map(|port| {
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the stopped server's port")
    });
    tokio::time::sleep(outage / 2).await;
    // The agent dies (SIGQUIT: no clean shutdown) and comes back during the outage.
    let agent_down = unix_now();
    drop(agent);
    agent = start_agent(&agent_dir, &grpc, &["--export-max-backoff", "2s"]);
    let agent_up = unix_now();
    tokio::time::sleep(outage / 2).await;
    drop(held);
    let server = serve();
    let up_at = unix_now();

    // Every reading of the outage arrives: the last second before the server came back is in.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (times, skipped) = readings_until(client, &id, down_at, up_at + 2.0, deadline).await;
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate: {times:?}"
    );
    // The agent may be late for a boundary on a loaded machine (a slow fsync, no CPU in time)
    // and then skips that reading; it counts each one. Those are readings never taken, not
    // readings lost: every hole outside the agent's own restart must be one it reports.
    let holes: Vec<(i64, i64)> = times
        .windows(2)
        .filter(|w| w[1] - w[0] > 1)
        .map(|w| (w[0], w[1]))
        .collect();
    let unexplained: i64 = holes
        .iter()
        .filter(|(before, after)| {
            !(*before as f64 >= agent_down - 1.5 && *after as f64 <= agent_up + 2.5)
        })
        .map(|(before, after)| after - before - 1)
        .sum();
    assert!(
        unexplained <= skipped,
        "{unexplained} readings missing outside the agent's own restart ({agent_down:.1}..{agent_up:.1}) where the agent reports {skipped} skipped; holes {holes:?}, readings {times:?}"
    );
    let during: usize = times
        .iter()
        .filter(|&&t| t as f64 > down_at && (t as f64) < up_at)
        .count();
    let expected = (up_at - down_at - (agent_up - agent_down)) as usize;
    assert!(
        during + skipped as usize + 3 >= expected,
        "{during} readings taken during the outage ({skipped} skipped), about {expected} expected"
    );
    drop(server);
    drop(agent);
}

#[tokio::test]
async fn a_30_second_outage_loses_no_reading() {
    outage_loses_nothing(Duration::from_secs(30)).await;
}

/// An agent stopped for a few seconds (as an overloaded host can leave it unscheduled) skips
/// the readings it was too late for, and says so: its skipped count is exactly the hole.
#[tokio::test]
async fn a_paused_agent_counts_the_readings_it_skipped() {
    let data = temp_dir("secumon-agent-paused-data");
    let agent_dir = temp_dir("secumon-agent-paused");
    let (http_port, grpc_port) = (free_port(), free_port());
    let grpc_listen = format!("127.0.0.1:{grpc_port}");
    let _server = spawn_secumon(
        &data.display().to_string(),
        http_port,
        &["--otlp-grpc-listen", &grpc_listen],
    );
    wait_for_port(grpc_port, Duration::from_secs(30), "OTLP/gRPC");
    let base = format!("http://127.0.0.1:{http_port}");
    let agent = start_agent(&agent_dir, &format!("http://127.0.0.1:{grpc_port}"), &[]);
    let id = agent_id(&agent_dir);
    eventually(
        &base,
        &format!("system_uptime_seconds{{instance=\"{id}\"}}"),
    )
    .await;
    let since = unix_now();
    let pid = agent.pid() as i32;
    assert!(pid > 0, "the agent is not running");
    // SAFETY: kill(2) on the agent's own pid; it is resumed below.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    tokio::time::sleep(Duration::from_secs(4)).await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let resumed = unix_now();

    let deadline = Instant::now() + Duration::from_secs(30);
    let (times, skipped) = readings_until(&base, &id, since, resumed + 3.0, deadline).await;
    let missing: i64 = times.windows(2).map(|w| w[1] - w[0] - 1).sum();
    assert!(
        missing >= 3,
        "a 4-second pause left {missing} readings missing: {times:?}"
    );
    assert_eq!(
        skipped, missing,
        "the agent reports {skipped} readings skipped, {missing} are missing: {times:?}"
    );
}

/// Ten minutes of waiting, mostly asleep: its name sorts it first in the suite, so it runs on
/// one test thread while the rest of the suite goes on beside it.
#[tokio::test]
async fn a_10_minute_outage_loses_no_reading() {
    outage_loses_nothing(Duration::from_secs(600)).await;
}

async fn rest(
    s: &Secumon,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let mut request = s.http.request(method, s.url(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    assert!(status < 300, "{path}: {status} {body}");
    body
}

/// Seconds between the agent's last readings (`system_uptime_seconds` timestamps).
async fn spacing(s: &Secumon, token: &str, id: &str) -> Vec<i64> {
    let result = query_as(
        &s.base,
        Some(token),
        &format!("system_uptime_seconds{{instance=\"{id}\"}}[8s]"),
    )
    .await;
    let Some(series) = result.first() else {
        return Vec::new();
    };
    let times: Vec<i64> = series["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[0].as_f64().unwrap().round() as i64)
        .collect();
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Waits until the agent's readings come every `seconds`.
async fn readings_every(s: &Secumon, token: &str, id: &str, seconds: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let gaps = spacing(s, token, id).await;
        if gaps.len() >= 2 && gaps.iter().all(|&g| g == seconds) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "readings not every {seconds}s: gaps {gaps:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An operator sets the agent's remote configuration: one TOML file, `agent.toml`.
async fn set_config(s: &Secumon, admin: &str, row: &str, toml: &str) {
    let config = serde_json::json!({"config_map": {"agent.toml": {"body": toml, "content_type": "text/toml"}}});
    rest(
        s,
        admin,
        reqwest::Method::PUT,
        &format!("/api/v1/agents/{row}/config"),
        Some(config),
    )
    .await;
}

/// Waits until the agent reports the remote configuration's status `status`; the report.
async fn reported(s: &Secumon, admin: &str, row: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = rest(
            s,
            admin,
            reqwest::Method::GET,
            &format!("/api/v1/agents/{row}/config"),
            None,
        )
        .await;
        if body["data"]["reported"]["status"] == status
            && body["data"]["reported"]["config_hash"] == body["data"]["config_hash"]
        {
            return body["data"]["reported"].clone();
        }
        assert!(Instant::now() < deadline, "never reported {status}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opamp_registers_heartbeats_and_applies_a_remote_interval() {
    let (s, catalog) = crate::auth::start(crate::support::Backend::Embedded, |_| {}).await;
    let ingest = crate::auth::mint(&catalog, "team-a", "ingest", None).await;
    let admin = crate::auth::mint(&catalog, "team-a", "admin,read", None).await;
    let dir = temp_dir("secumon-agent-opamp");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{ingest}\n")).unwrap();
    let grpc = format!("http://{}", s.server.otlp_grpc_addr.unwrap());
    let opamp_url = s.url("/v1/opamp");
    let args = [
        "--interval",
        "2s",
        "--export-token-file",
        token_file.to_str().unwrap(),
        "--opamp-url",
        &opamp_url,
        "--opamp-heartbeat",
        "1s",
    ];
    let start = || {
        let mut cmd = Command::new(agent_binary());
        cmd.args(["--server", &grpc, "--log-level", "debug"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(args);
        Managed::spawn("secumon-agent", cmd, None)
    };
    let mut agent = start();
    let id = agent_id(&dir);

    // Registered under its own id, described, healthy, and seen again at each heartbeat.
    let deadline = Instant::now() + Duration::from_secs(30);
    let row = loop {
        let page = rest(&s, &admin, reqwest::Method::GET, "/api/v1/agents", None).await;
        if let Some(agent) = page["data"]["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent_id"] == id.as_str())
        {
            break agent.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never registered: {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(row["hostname"], hostname.trim(), "{row}");
    assert_eq!(row["agent_type"], "secumon-agent", "{row}");
    assert_eq!(row["agent_version"], env!("CARGO_PKG_VERSION"), "{row}");
    assert_eq!(row["os"], "linux", "{row}");
    assert_eq!(row["online"], true, "{row}");
    let row_id = row["id"].as_str().unwrap().to_owned();
    let first_seen = row["last_seen_at"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let full = loop {
        let full = rest(
            &s,
            &admin,
            reqwest::Method::GET,
            &format!("/api/v1/agents/{row_id}"),
            None,
        )
        .await;
        if full["data"]["last_seen_at"].as_str().unwrap() > first_seen.as_str()
            && full["data"]["health"]["healthy"] == true
        {
            break full["data"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat, or never healthy: {full}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let effective = full["effective_config"]["config_map"]["agent.toml"]["body"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(effective.contains("interval = \"2s\""), "{full}");
    // Heartbeats are heartbeats: seen again, nothing changed (health is sent when it changes).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = rest(
        &s,
        &admin,
        reqwest::Method::GET,
        &format!("/api/v1/agents/{row_id}"),
        None,
    )
    .await;
    assert!(
        later["data"]["last_seen_at"].as_str() > full["last_seen_at"].as_str(),
        "{later}"
    );
    assert_eq!(
        later["data"]["updated_at"], full["updated_at"],
        "a heartbeat changed the row: {later}"
    );
    readings_every(&s, &admin, &id, 2).await;
    // The registry row finds the agent's readings (its instance uid is its `instance`).
    let latest = rest(
        &s,
        &admin,
        reqwest::Method::GET,
        &format!("/api/v1/metrics/latest/{row_id}"),
        None,
    )
    .await;
    let names: BTreeSet<&str> = latest["data"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    for name in [
        "system_cpu_time_seconds_total",
        "system_memory_usage_bytes",
        "system_uptime_seconds",
    ] {
        assert!(
            names.contains(name),
            "{name} not in the agent's latest metrics: {names:?}"
        );
    }

    // The operator halves the interval: the agent applies it without a restart, says so, and
    // the data shows it.
    set_config(&s, &admin, &row_id, "interval = \"1s\"\n").await;
    reported(&s, &admin, &row_id, "applied").await;
    readings_every(&s, &admin, &id, 1).await;

    // Restarted, it keeps the remote interval.
    drop(agent);
    agent = start();
    tokio::time::sleep(Duration::from_secs(4)).await;
    readings_every(&s, &admin, &id, 1).await;

    // A configuration it cannot apply is refused with the reason; the running one stays.
    set_config(&s, &admin, &row_id, "server = \"http://elsewhere\"\n").await;
    let report = reported(&s, &admin, &row_id, "failed").await;
    assert!(
        report["error_message"]
            .as_str()
            .unwrap()
            .contains("cannot be set remotely"),
        "{report}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    readings_every(&s, &admin, &id, 1).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_over_mutual_tls_on_both_transports() {
    use crate::tls::{write, Ca};

    let dir = temp_dir("secumon-agent-tls");
    let ca = Ca::new("secumon test CA");
    let clients = Ca::new("secumon clients CA");
    let (cert, key) = ca.issue(false);
    let (cert_path, key_path) = (
        write(&dir, "server.crt", &cert),
        write(&dir, "server.key", &key),
    );
    let clients_path = write(&dir, "clients.pem", &clients.pem());
    let ca_path = write(&dir, "ca.pem", &ca.pem());
    let (mine, mine_key) = clients.issue(true);
    let (mine_path, mine_key_path) = (
        write(&dir, "agent.crt", &mine),
        write(&dir, "agent.key", &mine_key),
    );
    let s = Secumon::start_on(crate::support::Backend::Embedded, |c| {
        c.tls.cert = cert_path.display().to_string();
        c.tls.key = key_path.display().to_string();
        c.tls.client_ca = clients_path.display().to_string();
    })
    .await;
    let tls = [
        "--export-ca-file",
        ca_path.to_str().unwrap(),
        "--export-client-cert",
        mine_path.to_str().unwrap(),
        "--export-client-key",
        mine_key_path.to_str().unwrap(),
    ];
    let grpc = format!(
        "https://localhost:{}",
        s.server.otlp_grpc_addr.unwrap().port()
    );
    let http = format!(
        "https://localhost:{}",
        s.server.otlp_http_addr.unwrap().port()
    );
    let (grpc_dir, http_dir) = (dir.join("grpc"), dir.join("http"));
    let _grpc_agent = start_agent(&grpc_dir, &grpc, &tls);
    let _http_agent = start_agent(
        &http_dir,
        &http,
        &[&tls[..], &["--protocol", "http"]].concat(),
    );
    // The query API serves TLS too, to clients of the client CA.
    let api = crate::tls::client(&ca, Some((&mine, &mine_key)));
    let base = format!("https://localhost:{}", s.server.addr.port());
    for id in [agent_id(&grpc_dir), agent_id(&http_dir)] {
        eventually_with(
            &api,
            &base,
            &format!("system_uptime_seconds{{instance=\"{id}\"}}"),
        )
        .await;
    }
}
