//! What the load benchmarks share: the options, the label sets, request encoding, the
//! remote-write sender and the process measurements (CPU seconds, peak RSS, listener pids).

#![allow(dead_code)]

use prost::Message;
use secumon_proto::prometheus::{Label, Sample, TimeSeries, WriteRequest};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Timed runs of each query, after one warm-up; the median is reported.
pub const QUERY_RUNS: usize = 21;

pub struct Options {
    pub series: usize,
    pub series_per_request: usize,
    pub samples_per_series: usize,
    pub rounds: usize,
    pub connections: usize,
}

impl Options {
    /// `defaults` overridden by `--series N --series-per-request N --samples-per-series N
    /// --rounds N --connections N`.
    pub fn from_args(defaults: Options) -> Options {
        let mut o = defaults;
        let args: Vec<String> = std::env::args().collect();
        let mut i = 1;
        while i < args.len() {
            let value = || args.get(i + 1).and_then(|v| v.parse().ok());
            match args[i].as_str() {
                "--series" => o.series = value().expect("--series N"),
                "--series-per-request" => {
                    o.series_per_request = value().expect("--series-per-request N")
                }
                "--samples-per-series" => {
                    o.samples_per_series = value().expect("--samples-per-series N")
                }
                "--rounds" => o.rounds = value().expect("--rounds N"),
                "--connections" => o.connections = value().expect("--connections N"),
                _ => {
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
        o
    }

    pub fn total_samples(&self) -> usize {
        self.series * self.samples_per_series * self.rounds
    }
}

/// Label sets shaped like a node/HTTP fleet: 8 labels, metric names with a few hundred
/// values, instances, and high-cardinality paths.
pub fn labels_of(i: usize) -> Vec<Label> {
    let l = |name: &str, value: String| Label {
        name: name.into(),
        value,
    };
    vec![
        l(
            "__name__",
            format!("http_server_requests_seconds_bucket_{}", i % 200),
        ),
        l("cluster", format!("eu-west-{}", i % 3)),
        l("env", "production".into()),
        l(
            "instance",
            format!("10.0.{}.{}:9100", (i / 250) % 256, i % 250),
        ),
        l("job", format!("service-{}", i % 20)),
        l("method", ["GET", "POST", "PUT", "DELETE"][i % 4].into()),
        l("path", format!("/api/v1/resource/{}", i % 500)),
        l("status", ["200", "201", "404", "500"][(i / 4) % 4].into()),
    ]
}

/// Every request body of the run, in send order, snappy-compressed. Each round writes every
/// series once; timestamps only grow per series, so Prometheus accepts all of them.
/// `value(series, n)` is the n-th sample's value of a series.
pub fn encode_requests(
    o: &Options,
    t0: i64,
    interval_ms: i64,
    value: impl Fn(usize, usize) -> f64,
) -> Vec<Vec<u8>> {
    encode_requests_of(o, t0, interval_ms, labels_of, value)
}

/// [`encode_requests`] with the label sets of `labels_of`.
pub fn encode_requests_of(
    o: &Options,
    t0: i64,
    interval_ms: i64,
    labels_of: impl Fn(usize) -> Vec<Label>,
    value: impl Fn(usize, usize) -> f64,
) -> Vec<Vec<u8>> {
    let labels: Vec<Vec<Label>> = (0..o.series).map(labels_of).collect();
    let mut bodies = Vec::new();
    for round in 0..o.rounds {
        let first = round * o.samples_per_series;
        for chunk in (0..o.series)
            .collect::<Vec<_>>()
            .chunks(o.series_per_request)
        {
            let timeseries = chunk
                .iter()
                .map(|&i| TimeSeries {
                    labels: labels[i].clone(),
                    samples: (0..o.samples_per_series)
                        .map(|k| Sample {
                            value: value(i, first + k),
                            timestamp: t0 + (first + k) as i64 * interval_ms,
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect();
            bodies.push(snappy_body(timeseries));
        }
    }
    bodies
}

/// A remote-write body: the request of `timeseries`, snappy-compressed.
pub fn snappy_body(timeseries: Vec<TimeSeries>) -> Vec<u8> {
    let request = WriteRequest {
        timeseries,
        metadata: vec![],
    };
    snap::raw::Encoder::new()
        .compress_vec(&request.encode_to_vec())
        .unwrap()
}

/// The number after `name` on the command line, else `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

/// Resident set (VmRSS) in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) of a process and of its reaped children.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // After the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let ticks: f64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

/// CPU seconds (user + system) of a process's threads whose name starts with `prefix` (live
/// threads only: what an exited thread spent is counted by [`cpu_seconds`] alone).
pub fn threads_cpu_seconds(pid: u32, prefix: &str) -> f64 {
    let mut ticks = 0.0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("", |(_, name)| name);
        if !name.starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>();
    }
    ticks / clock_ticks()
}

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU seconds of a process tree: the process, its live descendants, and reaped children.
pub fn tree_cpu_seconds(root: u32) -> f64 {
    let mut total = cpu_seconds(root);
    for pid in descendants(root) {
        total += cpu_seconds(pid);
    }
    total
}

pub fn descendants(root: u32) -> Vec<u32> {
    let mut parents = std::collections::HashMap::<u32, Vec<u32>>::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                parents.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for &child in parents.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(child);
            stack.push(child);
        }
    }
    out
}

/// Peak resident set (VmHWM) in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub struct Outcome {
    pub seconds: f64,
    pub accepted: usize,
    pub refused_requests: usize,
}

pub fn push(url: &str, bodies: Arc<Vec<Vec<u8>>>, o: &Options) -> Outcome {
    push_with(url, bodies, o, None)
}

/// [`push`] with an `Authorization` header value on every request.
pub fn push_with(
    url: &str,
    bodies: Arc<Vec<Vec<u8>>>,
    o: &Options,
    authorization: Option<String>,
) -> Outcome {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let samples_per_request = o.series_per_request * o.samples_per_series;
    let connections = o.connections;
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let accepted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = Vec::new();
        let blocks = o.series.div_ceil(o.series_per_request);
        // Bodies go out in round order from one queue, so every series stays within a round
        // of the others (Prometheus refuses samples more than an hour behind its newest as
        // out of bounds); a block's next round waits until its previous one is answered, so
        // no series ever sees an older sample after a newer one.
        let next = Arc::new(AtomicUsize::new(0));
        let done: Arc<Vec<AtomicUsize>> =
            Arc::new((0..blocks).map(|_| AtomicUsize::new(0)).collect());
        for _ in 0..connections {
            let authorization = authorization.clone();
            let (client, bodies, accepted, refused, url, next, done) = (
                client.clone(),
                bodies.clone(),
                accepted.clone(),
                refused.clone(),
                url.to_owned(),
                next.clone(),
                done.clone(),
            );
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= bodies.len() {
                        break;
                    }
                    let (block, round) = (i % blocks, i / blocks);
                    while done[block].load(Ordering::SeqCst) < round {
                        tokio::task::yield_now().await;
                    }
                    let body = &bodies[i];
                    let mut request = client.post(&url);
                    if let Some(value) = &authorization {
                        request = request.header("Authorization", value);
                    }
                    let response = request
                        .header("Content-Type", "application/x-protobuf")
                        .header("Content-Encoding", "snappy")
                        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
                        .body(body.clone())
                        .send()
                        .await;
                    match response {
                        Ok(r) if r.status().is_success() => {
                            accepted.fetch_add(samples_per_request, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            if refused.fetch_add(1, Ordering::SeqCst) < 3 {
                                eprintln!("refused ({status}): {}", text.trim());
                            }
                        }
                        Err(e) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            eprintln!("request failed: {e}");
                        }
                    }
                    done[block].store(round + 1, Ordering::SeqCst);
                }
            }));
        }
        for worker in workers {
            worker.await.unwrap();
        }
        Outcome {
            seconds: started.elapsed().as_secs_f64(),
            accepted: accepted.load(Ordering::SeqCst),
            refused_requests: refused.load(Ordering::SeqCst),
        }
    })
}

/// The pid of the process listening on a loopback port (from /proc/net/tcp and fd links).
pub fn listener_pid(port: u16) -> u32 {
    let hex_port = format!(":{port:04X}");
    let inode = std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(1).is_some_and(|a| a.ends_with(&hex_port)) && f.get(3) == Some(&"0A"))
                .then(|| f[9].to_owned())
        })
        .expect("listening socket");
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                return pid;
            }
        }
    }
    panic!("no process listens on port {port}")
}

/// Posts each block of snappy remote-write bodies in order over its own connection, the blocks
/// at once; any refused write fails the bench with the server's answer.
pub async fn post_blocks(url: &str, blocks: Vec<Vec<Vec<u8>>>) {
    let client = reqwest::Client::new();
    let tasks = blocks.into_iter().map(|block| {
        let (client, url) = (client.clone(), url.to_owned());
        tokio::spawn(async move {
            for body in block {
                let response = client
                    .post(&url)
                    .header("Content-Encoding", "snappy")
                    .header("Content-Type", "application/x-protobuf")
                    .body(body)
                    .send()
                    .await
                    .expect("write");
                let status = response.status();
                assert!(
                    status.is_success(),
                    "write refused: {status} {}",
                    response.text().await.unwrap_or_default()
                );
            }
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
}

/// A deterministic hash of (series, n) for jitter.
pub fn mix(i: usize, n: usize) -> u64 {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (n as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// The n-th value of series i: half busy counters (integer increments), a quarter slow
/// counters (like histogram buckets that rarely move), a quarter gauges with two decimals.
pub fn value(i: usize, n: usize) -> f64 {
    match i % 4 {
        0 | 1 => {
            let rate = 1 + (i as u64 * 7) % 50;
            let jitter = mix(i, n) % rate;
            ((i as u64 % 1000) * 1000 + n as u64 * rate + jitter) as f64
        }
        2 => ((n as u64 + mix(i, n) % 3) / 3) as f64,
        _ => {
            let wave = 50.0 + 30.0 * ((n as f64) / 17.0 + i as f64).sin();
            ((wave + (mix(i, n) % 100) as f64 / 100.0) * 100.0).round() / 100.0
        }
    }
}

pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

pub fn get(url: &str) -> String {
    let output = Command::new("curl")
        .args(["-sf", "--max-time", "600", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A gauge's value from a `/metrics` page.
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// SecuMon's whole directory `dir` in bytes per sample (of `samples`) once settled as the
/// peers' figures are (VictoriaMetrics merged by force, Prometheus's blocks written): after a
/// log compaction that followed the load (`since`: `secumon_storage_log_compactions` as it
/// ended), waited for at most 330 s (a quiet log is compacted after a sixteenth of the
/// out-of-order window, 225 s by default), or then if none was due. Printed beside `before`,
/// the figure read `when`.
pub fn secumon_settled_bytes_per_sample(
    base: &str,
    dir: &Path,
    since: f64,
    samples: f64,
    (before, when): (f64, &str),
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(330);
    let compacted = loop {
        let page = get(&format!("{base}/metrics"));
        if metric(&page, "secumon_storage_log_compactions") > since {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_secs(5));
    };
    let settled = dir_bytes(dir) as f64 / samples;
    eprintln!(
        "SecuMon: whole directory {before:.2} bytes/sample {when}, {settled:.2} {}",
        if compacted {
            "once the log was compacted"
        } else {
            "330 s later (no log compaction was due)"
        }
    );
    settled
}

/// Waits until `read` gives the same positive value twice `every` apart.
pub fn wait_stable(what: &str, every: Duration, limit: Duration, read: impl Fn() -> f64) -> f64 {
    let deadline = Instant::now() + limit;
    let mut last = read();
    loop {
        std::thread::sleep(every);
        let now = read();
        if now > 0.0 && now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "{what} did not settle");
        last = now;
    }
}

/// Median wall time in ms of a range query (`step_secs` apart), after one warm-up; and the
/// series it returned.
/// Timed from the request to the last byte of the answer over one kept-alive connection, as a
/// dashboard asks (a process started per query would add its own start-up to every figure).
pub fn time_query(base: &str, query: &str, start: i64, end: i64, step_secs: u64) -> (f64, usize) {
    let url = format!(
        "{base}/api/v1/query_range?query={}&start={}&end={}&step={step_secs}",
        form_urlencoded::byte_serialize(query.as_bytes()).collect::<String>(),
        start / 1000,
        end / 1000
    );
    let (ms, body) = time_get(&url);
    let series = body["data"]["result"].as_array().map_or(0, Vec::len);
    (ms, series)
}

/// Median wall time in ms of a GET answered with JSON, after one warm-up, and the answer.
/// Timed from the request to the last byte over one kept-alive connection, as a dashboard
/// asks.
pub fn time_get(url: &str) -> (f64, serde_json::Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let fetch = || async {
            let response = client.get(url).send().await.expect("query");
            assert!(
                response.status().is_success(),
                "{url}: {}",
                response.status()
            );
            response.bytes().await.expect("query body")
        };
        let body = fetch().await;
        let answer = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
        let mut times = Vec::with_capacity(QUERY_RUNS);
        for _ in 0..QUERY_RUNS {
            let started = Instant::now();
            fetch().await;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        (times[QUERY_RUNS / 2], answer)
    })
}

/// Prints a Markdown table of results: the `fixed` columns, then one column of milliseconds
/// for each of `latencies`; each row gives its fixed cells and its latencies.
pub fn print_table(fixed: &[&str], latencies: &[&str], rows: &[(Vec<String>, &[f64])]) {
    let headers: Vec<String> = fixed
        .iter()
        .map(|h| h.to_string())
        .chain(latencies.iter().map(|n| format!("{n} ms")))
        .collect();
    println!("| {} |", headers.join(" | "));
    println!("|{}", "---|".repeat(headers.len()));
    for (cells, ms) in rows {
        let ms = ms.iter().map(|ms| format!("{ms:.1}"));
        let row: Vec<String> = cells.iter().cloned().chain(ms).collect();
        println!("| {} |", row.join(" | "));
    }
}
