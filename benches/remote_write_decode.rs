//! The remote-write decode path alone, in process: snappy, the protobuf reader, label
//! validation and the write batch (with its fingerprints), on the request shape of
//! `storage_peers` (1,000 series of 8 labels and 2 samples a request). It prints nanoseconds
//! per sample and per series; under `valgrind --tool=callgrind --toggle-collect='secumon::ingest::remote_write::decode'`
//! (with `--passes 1`) it gives an instruction count that does not depend on what else the
//! machine runs.
//!
//! `cargo bench --bench remote_write_decode [-- --series N --rounds N --passes N]`

mod common;

use common::Options;
use secumon::ingest::{remote_write, IngestConfig};
use std::time::Instant;

/// The server's allocator, so that allocation costs what it costs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let o = Options::from_args(Options {
        series: 10_000,
        series_per_request: 1_000,
        samples_per_series: 2,
        rounds: 10,
        connections: 1,
    });
    let passes: usize = std::env::args()
        .skip_while(|a| a != "--passes")
        .nth(1)
        .map_or(20, |v| v.parse().expect("--passes N"));
    let bodies = common::encode_requests(&o, 1_700_000_000_000, 60_000, |i, n| {
        (i as u64 * 1000 + n as u64 * (1 + i as u64 % 50)) as f64
    });
    let config = IngestConfig::default();
    let mut per_pass = Vec::with_capacity(passes);
    let mut checksum = 0usize;
    for _ in 0..passes {
        let started = Instant::now();
        for body in &bodies {
            let batch = remote_write::decode(body, &config, &secumon::ingest::RequestLimits::NONE)
                .expect("a valid request");
            checksum += batch.series.sample_count();
        }
        per_pass.push(started.elapsed().as_secs_f64());
    }
    assert_eq!(checksum, o.total_samples() * passes, "every sample decoded");
    per_pass.sort_by(f64::total_cmp);
    let median = per_pass[passes / 2];
    let samples = o.total_samples() as f64;
    println!(
        "remote-write decode: {} requests, {} samples a pass; median of {passes} passes {:.1} ms: {:.1} ns/sample, {:.1} ns/series, {:.2} M samples/s",
        bodies.len(),
        o.total_samples(),
        median * 1e3,
        median * 1e9 / samples,
        median * 1e9 / (samples / o.samples_per_series as f64),
        samples / median / 1e6
    );
}
