//! secumon-agent beside node_exporter on this host, in the same run: the agent at its default
//! settings sends to a real SecuMon at `--interval-secs` (10), while this bench scrapes the
//! Debian node_exporter (default collectors) at the same interval as Prometheus would
//! (`Accept-Encoding: gzip`), for `--seconds` (600). Reported for each: average CPU over the
//! window (user + system of the whole process, as a share of one core), RSS (average of one
//! reading per interval, and the peak), bytes on the wire per interval (the agent's, counted by
//! a TCP relay between it and the server: OTLP/gRPC with gzip, HTTP/2 framing included; node
//! exporter's: the scrape's whole HTTP response with gzip), and samples per interval.
//!
//! The agent's CPU includes everything it does per reading: reading /proc, encoding, gzip,
//! the fsync of its on-disk queue and the export; node_exporter's includes serving the scrape.
//!
//! `cargo build --release -p secumon-agent && cargo bench --bench agent_host [-- --seconds N --interval-secs N]`

mod common;
#[path = "../tests/integration/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::process::{free_port, spawn_secumon, temp_dir, wait_for_port, Managed};

/// Relays 127.0.0.1:`listen` to 127.0.0.1:`to`, counting the bytes the client sends.
fn relay(listen: u16, to: u16, sent: Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", listen)).unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) = (server, client);
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
            });
        }
    });
}

mod plain_http {
    /// A GET with one query parameter, blocking (the bench has no runtime).
    pub fn get(url: &str, query: &str) -> serde_json::Value {
        let encoded: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
        let (host, path) = url.trim_start_matches("http://").split_once('/').unwrap();
        let mut stream = std::net::TcpStream::connect(host).unwrap();
        use std::io::{Read, Write};
        write!(
            stream,
            "GET /{path}?query={encoded} HTTP/1.0\r\nHost: {host}\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap_or_default()
    }
}

/// One scrape as Prometheus makes it: the response's bytes and its sample count.
fn scrape(port: u16) -> (u64, u64) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/plain;version=0.0.4\r\nAccept-Encoding: gzip\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut text = String::new();
    let _ = flate2::read::GzDecoder::new(&response[split..]).read_to_string(&mut text);
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    (response.len() as u64, samples as u64)
}

fn main() {
    let seconds = common::arg("--seconds", 600);
    let interval = common::arg("--interval-secs", 10);
    let agent_bin = PathBuf::from(env!("CARGO_BIN_EXE_secumon")).with_file_name("secumon-agent");
    assert!(
        agent_bin.is_file(),
        "{} is missing: cargo build --release -p secumon-agent",
        agent_bin.display()
    );
    let data = temp_dir("secumon-bench-agent");
    let (http_port, grpc_port, relay_port) = (free_port(), free_port(), free_port());
    let grpc_listen = format!("127.0.0.1:{grpc_port}");
    let _server = spawn_secumon(
        &data.join("server").display().to_string(),
        http_port,
        &["--otlp-grpc-listen", &grpc_listen],
    );
    wait_for_port(grpc_port, Duration::from_secs(30), "OTLP/gRPC");
    let sent = Arc::new(AtomicU64::new(0));
    relay(relay_port, grpc_port, sent.clone());
    let node = support::NodeExporter::start();
    let node_pid = common::listener_pid(node.port);
    let mut cmd = Command::new(&agent_bin);
    cmd.args(["--server", &format!("http://127.0.0.1:{relay_port}")])
        .args(["--interval", &format!("{interval}s"), "--log-level", "warn"])
        .arg("--state-dir")
        .arg(data.join("agent"));
    let agent = Managed::spawn("secumon-agent", cmd, None);
    let agent_pid = agent.pid();

    // One interval to settle (first connections, first readings), then the window.
    std::thread::sleep(Duration::from_secs(interval + 1));
    let (agent_cpu0, node_cpu0) = (
        common::cpu_seconds(agent_pid),
        common::cpu_seconds(node_pid),
    );
    let sent0 = sent.load(Ordering::Relaxed);
    let start = Instant::now();
    let (mut agent_rss, mut node_rss) = (Vec::new(), Vec::new());
    let (mut scraped, mut scrape_samples, mut scrapes) = (0u64, 0u64, 0u64);
    while start.elapsed() < Duration::from_secs(seconds) {
        let (bytes, samples) = scrape(node.port);
        scraped += bytes;
        scrape_samples = samples;
        scrapes += 1;
        agent_rss.push(common::rss_mib(agent_pid));
        node_rss.push(common::rss_mib(node_pid));
        let next = Duration::from_secs(interval * scrapes);
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let window = start.elapsed().as_secs_f64();
    let intervals = window / interval as f64;
    let agent_cpu = (common::cpu_seconds(agent_pid) - agent_cpu0) / window * 100.0;
    let node_cpu = (common::cpu_seconds(node_pid) - node_cpu0) / window * 100.0;
    let agent_bytes = (sent.load(Ordering::Relaxed) - sent0) as f64 / intervals;
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    // What the server stored from the agent's last reading: its series with a sample in the
    // last interval (target_info included).
    let query = format!("count(last_over_time({{job=\"secumon-agent\"}}[{interval}s]))");
    let url = format!("http://127.0.0.1:{http_port}/api/v1/query");
    let answer: serde_json::Value = plain_http::get(&url, &query);
    let agent_points = answer["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    println!("secumon-agent beside node_exporter, {window:.0} s at {interval} s ({intervals:.0} intervals)");
    println!("| figure | secumon-agent | node_exporter |");
    println!("|---|---|---|");
    println!("| average CPU, % of one core | {agent_cpu:.3} | {node_cpu:.3} |");
    println!(
        "| RSS, MiB: average (peak) | {:.1} ({:.1}) | {:.1} ({:.1}) |",
        avg(&agent_rss),
        common::peak_rss_mib(agent_pid),
        avg(&node_rss),
        common::peak_rss_mib(node_pid)
    );
    println!(
        "| bytes on the wire per interval | {agent_bytes:.0} | {:.0} |",
        scraped as f64 / scrapes as f64
    );
    println!("| samples per interval | {agent_points} | {scrape_samples} |");
    drop(agent);
}
