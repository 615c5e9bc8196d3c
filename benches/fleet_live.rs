//! The fleet side under load: the live feed's cost and delay, and the registry's listing time.
//!
//! 1. Registry: 10,000 agents pre-registered over REST, then `GET /api/v1/agents` (the first
//!    page of 100, a page of 1,000, a hostname search with a tag filter, the offline agents by
//!    last seen), each repeated, client-side p50 and p99 in ms (one kept-alive connection).
//! 2. Live feed: `--agents` agents (100) each remote-write `--series` series (300) every
//!    `--interval-secs` (10, staggered evenly), for `--seconds` (60) with no WebSocket client,
//!    then for as long with `--clients` (1,000) clients subscribed across the agents (10 each),
//!    then with the same clients narrowed to a metric no agent has (the hub keeps and coalesces
//!    readings but sends nothing: the feed's cost on the ingest side alone), then with none;
//!    `--rounds` (1) times over, new clients each round. Reported for each window: server CPU-seconds per million samples
//!    (the whole process: ingest, the hub, every socket write), ingest request p50/p99; for the
//!    window with clients, the delay from a sample's timestamp (stamped when its request was
//!    sent) to its arrival at a client, p50/p99/max, messages received, and server RSS per
//!    connected client (RSS with the clients connected, minus before, over the clients).
//!
//! Server CPU is read from /proc for the whole process and for the live feed's own threads
//! (`secumon-live`, `--fleet-live-threads`); "the rest" (every other thread: ingest, storage,
//! the hub's share of ingest) is what the feed costs ingest.
//!
//! The release binary on the embedded engine, auth off, `--live-interval 2s`, no maintenance run
//! during the windows (`--embedded-flush-interval-secs 3600`); the clients run in this process
//! on the same machine.
//!
//! The summary compares the windows of each kind added up over the rounds (CPU over samples),
//! against every window without clients: more rounds, less of the machine's drift between
//! windows in the figure.
//!
//! `cargo bench --bench fleet_live [-- --agents N --series N --clients N --seconds N --interval-secs N --registry N --rounds N]`

mod common;
#[path = "../tests/integration/support/mod.rs"]
mod support;

use futures::{SinkExt, StreamExt};
use prost::Message;
use secumon_proto::prometheus::{Label, Sample, TimeSeries, WriteRequest};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::process::{free_port, spawn_secumon, temp_dir};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn body(agent: usize, series: usize, t: i64, round: u64) -> Vec<u8> {
    let instance = format!("agent-{agent}");
    let request = WriteRequest {
        timeseries: (0..series)
            .map(|i| TimeSeries {
                labels: vec![
                    Label {
                        name: "__name__".into(),
                        value: format!("host_metric_{}", i % 30),
                    },
                    Label {
                        name: "instance".into(),
                        value: instance.clone(),
                    },
                    Label {
                        name: "job".into(),
                        value: "secumon-agent".into(),
                    },
                    Label {
                        name: "k".into(),
                        value: (i / 30).to_string(),
                    },
                ],
                samples: vec![Sample {
                    value: (round as f64) + i as f64,
                    timestamp: t,
                }],
                ..Default::default()
            })
            .collect(),
        metadata: vec![],
    };
    snap::raw::Encoder::new()
        .compress_vec(&request.encode_to_vec())
        .unwrap()
}

/// The names of the server's live-feed threads (`--fleet-live-threads`).
const FEED_THREADS: &str = "secumon-live";

struct Window {
    /// The whole server process.
    cpu: f64,
    /// The live feed's own threads (its ticker and the clients' sockets).
    feed_cpu: f64,
    samples: usize,
    latencies: Vec<f64>,
}

/// Every agent writes its series once per interval, staggered, for `seconds`.
async fn ingest(
    http: &reqwest::Client,
    url: &str,
    pid: u32,
    agents: usize,
    series: usize,
    interval: Duration,
    seconds: u64,
) -> Window {
    let cpu0 = common::cpu_seconds(pid);
    let feed0 = common::threads_cpu_seconds(pid, FEED_THREADS);
    let started = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let samples = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for agent in 0..agents {
        let (http, url) = (http.clone(), url.to_owned());
        let (latencies, samples) = (latencies.clone(), samples.clone());
        let offset = interval.mul_f64(agent as f64 / agents as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(interval);
            let mut round = 0;
            while started.elapsed() < Duration::from_secs(seconds) {
                tick.tick().await;
                let now = chrono::Utc::now().timestamp_millis();
                let sent = Instant::now();
                let response = http
                    .post(&url)
                    .header("Content-Type", "application/x-protobuf")
                    .header("Content-Encoding", "snappy")
                    .body(body(agent, series, now, round))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 204);
                latencies
                    .lock()
                    .unwrap()
                    .push(sent.elapsed().as_secs_f64() * 1000.0);
                samples.fetch_add(series, Ordering::Relaxed);
                round += 1;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort_by(f64::total_cmp);
    Window {
        cpu: common::cpu_seconds(pid) - cpu0,
        feed_cpu: common::threads_cpu_seconds(pid, FEED_THREADS) - feed0,
        samples: samples.load(Ordering::Relaxed),
        latencies,
    }
}

impl Window {
    /// CPU-s per 1 M samples: the whole process, and every thread but the feed's (ingest,
    /// queries, storage, the hub's share of ingest).
    fn per_sample(&self) -> (f64, f64) {
        let per = |cpu: f64| cpu / self.samples as f64 * 1e6;
        (per(self.cpu), per(self.cpu - self.feed_cpu))
    }
}

fn report(name: &str, w: &Window) {
    let (whole, ingest) = w.per_sample();
    println!(
        "{name}: {} samples, server CPU {:.2} s = {whole:.3} CPU-s per 1 M samples (of it the feed's threads {:.2} s; the rest {ingest:.3} CPU-s per 1 M samples); ingest request p50 {:.1} ms, p99 {:.1} ms",
        w.samples,
        w.cpu,
        w.feed_cpu,
        percentile(&w.latencies, 0.5),
        percentile(&w.latencies, 0.99)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let agents = common::arg("--agents", 100) as usize;
    let series = common::arg("--series", 300) as usize;
    let clients = common::arg("--clients", 1000) as usize;
    let seconds = common::arg("--seconds", 60);
    let interval = Duration::from_secs(common::arg("--interval-secs", 10));
    let registry = common::arg("--registry", 10_000) as usize;
    let rounds = common::arg("--rounds", 1).max(1) as usize;

    let dir = temp_dir("secumon-fleet-bench");
    let port = free_port();
    let connections = (clients + 256).to_string();
    let _server = spawn_secumon(
        dir.to_str().unwrap(),
        port,
        &[
            "--auth",
            "off",
            "--http-max-connections",
            &connections,
            "--fleet-live-max-clients",
            &connections,
            // No flush lands in a window: its cost is the engine's, not the feed's, and it
            // would fall in one window and not another.
            "--embedded-flush-interval-secs",
            "3600",
        ],
    );
    let pid = common::listener_pid(port);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    // 1. The registry.
    let made = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, base, next) = (http.clone(), base.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= registry {
                    return;
                }
                let agent = serde_json::json!({"agent_id": format!("agent-{i}"),
                    "hostname": format!("host-{i}.example"), "os": "linux",
                    "tags": {"rack": (i % 10).to_string()}});
                let response = http
                    .post(format!("{base}/api/v1/agents"))
                    .body(agent.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    println!(
        "registry: {registry} agents registered over REST in {:.1} s",
        made.elapsed().as_secs_f64()
    );
    for (what, path, times) in [
        ("first page (100)", "/api/v1/agents", 200),
        ("page of 1,000", "/api/v1/agents?limit=1000", 50),
        (
            "hostname search + tag",
            "/api/v1/agents?hostname=HOST-99&tag=rack:9",
            200,
        ),
        (
            "offline, by last seen",
            "/api/v1/agents?online=false&sort=-last_seen_at",
            200,
        ),
    ] {
        let mut ms = Vec::new();
        for _ in 0..times {
            let started = Instant::now();
            let response = http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "GET {path} ({what}) over {registry} agents: p50 {:.2} ms, p99 {:.2} ms",
            percentile(&ms, 0.5),
            percentile(&ms, 0.99)
        );
    }

    // 2. The live feed, after an unmeasured round that creates every series (the agents' and
    // the registry's status series) and lets the first status writes pass.
    let write_url = format!("{base}/api/v1/write");
    let warm = ingest(&http, &write_url, pid, agents, series, interval, 20).await;
    println!("(warm-up: {} samples)", warm.samples);
    let mut off = vec![ingest(&http, &write_url, pid, agents, series, interval, seconds).await];
    report("feed off", &off[0]);
    let (mut on, mut narrowed) = (Vec::new(), Vec::new());
    let (mut delay, mut on_messages) = (Vec::new(), 0);
    let (mut rss_before, mut rss_with) = (0.0, 0.0);
    for round in 1..=rounds {
        if rounds > 1 {
            println!("round {round} of {rounds}");
        }
        let clients = Clients::connect(port, pid, clients, agents).await;
        if round == 1 {
            (rss_before, rss_with) = clients.rss;
        }
        let window = ingest(&http, &write_url, pid, agents, series, interval, seconds).await;
        report(&format!("feed on, {} clients", clients.count), &window);
        on.push(window);
        on_messages += clients.messages.load(Ordering::Relaxed);
        delay.append(&mut clients.delays.lock().unwrap());
        let clients = clients.narrow().await;
        let window = ingest(&http, &write_url, pid, agents, series, interval, seconds).await;
        report(
            &format!("feed on, {} clients sent nothing", clients.count),
            &window,
        );
        narrowed.push(window);
        clients.close().await;
        let window = ingest(&http, &write_url, pid, agents, series, interval, seconds).await;
        report("feed off again", &window);
        off.push(window);
    }
    delay.sort_by(f64::total_cmp);
    println!(
        "delay from sample to client: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} messages; server RSS {:.1} MiB before the clients, {:.1} MiB with them: {:.1} KiB per client",
        percentile(&delay, 0.5),
        percentile(&delay, 0.99),
        delay.last().copied().unwrap_or(f64::NAN),
        on_messages,
        rss_before,
        rss_with,
        (rss_with - rss_before) * 1024.0 / clients as f64
    );
    let total = |windows: &[Window]| Window {
        cpu: windows.iter().map(|w| w.cpu).sum(),
        feed_cpu: windows.iter().map(|w| w.feed_cpu).sum(),
        samples: windows.iter().map(|w| w.samples).sum(),
        latencies: Vec::new(),
    };
    let (off, on, narrowed) = (total(&off), total(&on), total(&narrowed));
    let (base, base_ingest) = off.per_sample();
    let change = |w: &Window| {
        let (whole, ingest) = w.per_sample();
        (
            (whole / base - 1.0) * 100.0,
            (ingest / base_ingest - 1.0) * 100.0,
        )
    };
    let ((on_whole, on_ingest), (narrowed_whole, narrowed_ingest)) =
        (change(&on), change(&narrowed));
    println!(
        "CPU per sample over every window without clients ({} windows, {rounds} round(s)): whole process: feed on and sending {on_whole:+.1} %, feed on but sending nothing {narrowed_whole:+.1} %; every thread but the feed's (ingest): sending {on_ingest:+.1} %, sending nothing {narrowed_ingest:+.1} %; the feed's threads while sending: {:.1} us per message received",
        rounds + 1,
        on.feed_cpu / on_messages.max(1) as f64 * 1e6
    );
}

/// The WebSocket clients of one round, subscribed across the agents (client `c` to agent
/// `c % agents`), noting each message's delay from its oldest reading.
struct Clients {
    count: usize,
    readers: Vec<tokio::task::JoinHandle<()>>,
    writers: Vec<
        futures::stream::SplitSink<
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
            tokio_tungstenite::tungstenite::Message,
        >,
    >,
    delays: Arc<Mutex<Vec<f64>>>,
    messages: Arc<AtomicUsize>,
    /// Server RSS (MiB) before they connected and 2 s after.
    rss: (f64, f64),
}

impl Clients {
    async fn connect(port: u16, pid: u32, count: usize, agents: usize) -> Clients {
        let rss_before = common::rss_mib(pid);
        let delays = Arc::new(Mutex::new(Vec::<f64>::new()));
        let messages = Arc::new(AtomicUsize::new(0));
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for c in 0..count {
            let url = format!("ws://127.0.0.1:{port}/ws/metrics/agent-{}", c % agents);
            let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let (delays, messages) = (delays.clone(), messages.clone());
            let (write, mut read) = socket.split();
            writers.push(write);
            readers.push(tokio::spawn(async move {
                while let Some(Ok(message)) = read.next().await {
                    let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
                        continue;
                    };
                    let now = chrono::Utc::now().timestamp_millis();
                    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if value["type"] != "metrics" {
                        continue;
                    }
                    messages.fetch_add(1, Ordering::Relaxed);
                    let oldest = value["data"]
                        .as_object()
                        .unwrap()
                        .values()
                        .filter_map(|r| r["timestamp"].as_i64())
                        .min()
                        .unwrap_or(now);
                    delays.lock().unwrap().push((now - oldest) as f64);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_with = common::rss_mib(pid);
        Clients {
            count,
            readers,
            writers,
            delays,
            messages,
            rss: (rss_before, rss_with),
        }
    }

    /// Narrows every client to a metric no agent has: the hub still keeps and coalesces every
    /// watched agent's readings, but sends nothing. This is the feed's cost on the ingest
    /// side, without the fan-out to sockets.
    async fn narrow(mut self) -> Clients {
        for write in &mut self.writers {
            write
                .send(tokio_tungstenite::tungstenite::Message::text(
                    r#"{"type":"subscribe","metrics":["no_such_metric"]}"#,
                ))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        self
    }

    async fn close(self) {
        for reader in self.readers {
            reader.abort();
        }
        drop(self.writers);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
