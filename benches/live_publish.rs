//! What the live feed costs on the ingest path: `LiveHub::publish` for a remote-write batch of
//! 300 series of one agent (the shape `fleet_live` writes), with no agent watched (the path of
//! every batch when no client is connected), with another agent watched, and with the batch's
//! own agent watched, after the first batch (its series' keys made) and on every later batch.
//! In nanoseconds per series, in-process, single thread; the median of `--repeat` (5) runs of
//! `--batches` (20,000) batches each.
//!
//! `cargo bench --bench live_publish [-- --batches N --repeat N]`

use secumon::fleet::live::LiveHub;
use secumon::model::{Label, Labels, Sample, TenantId};
use secumon::storage::{SeriesWrite, WriteBatch};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn batch(agent: &str, t: i64) -> WriteBatch {
    let series: Vec<SeriesWrite> = (0..300)
        .map(|i| SeriesWrite {
            labels: Labels::from_trusted(vec![
                Label::new("__name__", format!("host_metric_{}", i % 30)),
                Label::new("instance", agent),
                Label::new("job", "secumon-agent"),
                Label::new("k", (i / 30).to_string()),
            ]),
            samples: vec![Sample { t, v: i as f64 }],
        })
        .collect();
    WriteBatch::from_series(&series)
}

/// Median nanoseconds per series of `publish` over `batches` batches.
fn measure(hub: &LiveHub, tenant: &TenantId, batches: &[WriteBatch], repeat: usize) -> f64 {
    let mut runs: Vec<f64> = (0..repeat)
        .map(|_| {
            let started = Instant::now();
            for (i, b) in batches.iter().enumerate() {
                hub.publish(tenant, b);
                // As the ticker does every interval: the pending readings go out.
                if i % 5 == 4 {
                    hub.send_pending(i as i64);
                }
            }
            started.elapsed().as_nanos() as f64 / (batches.len() * 300) as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    let count = arg("--batches", 20_000);
    let repeat = arg("--repeat", 5);
    let tenant = TenantId::new("bench");
    let batches: Vec<WriteBatch> = (0..count).map(|i| batch("agent-1", i as i64)).collect();
    let hub = Arc::new(LiveHub::new(Duration::from_secs(2), 16, 10));
    let none = measure(&hub, &tenant, &batches, repeat);
    let _other = hub.subscribe(&tenant, "agent-2");
    let other = measure(&hub, &tenant, &batches, repeat);
    let mut own = hub.subscribe(&tenant, "agent-1");
    let watched = measure(&hub, &tenant, &batches, repeat);
    // Keep the subscription's queue drained, as a client does.
    while own.receiver.try_recv().is_ok() {}
    println!("LiveHub::publish, per series of a 300-series batch (median of {repeat} runs of {count} batches):");
    println!("  no agent watched:              {none:.1} ns");
    println!("  another agent watched:         {other:.1} ns");
    println!("  the batch's agent watched:     {watched:.1} ns (with sending every 5th batch)");
}
