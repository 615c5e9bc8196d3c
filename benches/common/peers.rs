//! The peers the storage benchmarks run beside SecuMon: Prometheus's blocks measured and
//! VictoriaMetrics started and settled. Included by the benchmarks that include the test
//! support (`#[path] mod support`).

use crate::common::{dir_bytes, get, wait_stable};
use crate::support::process::{free_port, temp_dir, wait_for_port, Managed};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Bytes and samples of a Prometheus data directory's blocks (`meta.json` `numSamples`).
pub fn prometheus_blocks(data: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut samples = 0;
    for entry in std::fs::read_dir(data).into_iter().flatten().flatten() {
        let meta = entry.path().join("meta.json");
        let Ok(text) = std::fs::read_to_string(&meta) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        samples += v["stats"]["numSamples"].as_u64().unwrap_or(0);
        bytes += dir_bytes(&entry.path());
    }
    (bytes, samples)
}

/// [`prometheus_blocks`] once its head compaction has settled (the block samples unchanged
/// over 15 s).
pub fn prometheus_blocks_settled(data: &Path) -> (u64, u64) {
    wait_stable(
        "Prometheus's head compaction",
        Duration::from_secs(15),
        Duration::from_secs(900),
        || prometheus_blocks(data).1 as f64,
    );
    prometheus_blocks(data)
}

/// VictoriaMetrics (the Debian package) on a fresh data directory, its rollup result cache
/// off so that repeated queries are computed, as for the others.
pub struct VictoriaMetrics {
    pub server: Managed,
    pub base: String,
    pub data: PathBuf,
}

impl VictoriaMetrics {
    pub fn start() -> VictoriaMetrics {
        let binary =
            crate::support::find_binary("victoria-metrics", "apt-get install -y victoria-metrics");
        let dir = temp_dir("secumon-vm");
        let data = dir.join("data");
        let port = free_port();
        let mut cmd = Command::new(binary);
        cmd.arg(format!("-storageDataPath={}", data.display()))
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg("-retentionPeriod=1y")
            .arg("-search.latencyOffset=0s")
            .arg("-search.disableCache")
            .arg("-loggerLevel=ERROR");
        let server = Managed::spawn("victoria-metrics", cmd, Some(dir));
        wait_for_port(port, Duration::from_secs(60), "victoria-metrics");
        VictoriaMetrics {
            server,
            base: format!("http://127.0.0.1:{port}"),
            data,
        }
    }

    /// Flushes and merges this month's partition, and returns the data directory's bytes once
    /// they hold still.
    pub fn settle(&self) -> f64 {
        get(&format!("{}/internal/force_flush", self.base));
        let month = chrono::Utc::now().format("%Y_%m").to_string();
        get(&format!(
            "{}/internal/force_merge?partition_prefix={month}",
            self.base
        ));
        wait_stable(
            "VictoriaMetrics's merge",
            Duration::from_secs(10),
            Duration::from_secs(600),
            || dir_bytes(&self.data) as f64,
        )
    }
}
