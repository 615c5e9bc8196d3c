//! The agent's life: the agent id, the collection loop (aligned to the interval, into the
//! queue) and the export loop (from the queue, in order, with backoff), and `--once`.

use crate::collect::Collector;
use crate::config::{CollectorsConfig, Config, Naming};
use crate::export::{backoff, Exporter, Outcome};
use crate::names::{self, Kind, Metric};
use crate::queue::Queue;
use crate::{opamp, otlp};
use anyhow::Context;
use prost::Message;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// What a remote configuration may change while the agent runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub interval: Duration,
    pub naming: Naming,
    pub collectors: CollectorsConfig,
}

impl Settings {
    pub fn of(config: &Config) -> Settings {
        Settings {
            interval: config.interval,
            naming: config.naming,
            collectors: config.collectors.clone(),
        }
    }
}

/// The agent's own counters, exported with every reading.
#[derive(Default)]
pub struct Stats {
    delivered: AtomicU64,
    retried: AtomicU64,
    refused: AtomicU64,
    rejected_points: AtomicU64,
    export_nanos: AtomicU64,
    /// Readings lost before they reached the queue (it could not be written).
    unqueued: AtomicU64,
    /// Interval boundaries passed with no reading taken: the agent was late for them (a
    /// collection overran the interval, the process was not scheduled, the clock jumped).
    skipped: AtomicU64,
    /// Creation time (Unix ms) of the oldest unsent reading; 0 when none waits.
    oldest_unsent_ms: AtomicU64,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
    stats: Stats,
    started: SystemTime,
    health: Arc<Health>,
    /// The agent id (the OpAMP server may replace it).
    identity: Arc<std::sync::RwLock<String>>,
}

/// Whether readings reach the server, as OpAMP reports the agent's health.
#[derive(Default)]
pub struct Health {
    /// The reason exports fail, `None` while they work.
    failing: Mutex<Option<String>>,
    changed: Notify,
}

impl Health {
    /// (healthy, status, last error).
    pub fn report(&self) -> (bool, String, String) {
        match &*self.failing.lock().unwrap_or_else(|p| p.into_inner()) {
            None => (true, "exporting".into(), String::new()),
            Some(reason) => (
                false,
                "export failing; readings queued on disk".into(),
                reason.clone(),
            ),
        }
    }

    /// Records the export's state; wakes the OpAMP client when it flips.
    fn set(&self, failing: Option<String>) {
        let mut current = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let flipped = current.is_some() != failing.is_some();
        *current = failing;
        if flipped {
            self.changed.notify_one();
        }
    }

    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The agent's id: a UUID made at first start and kept in the state directory. It is the
/// OpAMP `instance_uid` and the `service.instance.id` (so `instance`) of every series.
/// Replaces the kept agent id (the OpAMP server gave the agent a new one).
pub fn store_agent_id(state_dir: &Path, id: &str) -> std::io::Result<()> {
    let tmp = state_dir.join("agent-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, state_dir.join("agent-id"))
}

pub fn agent_id(state_dir: &Path, create: bool) -> anyhow::Result<Option<String>> {
    let path = state_dir.join("agent-id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            uuid::Uuid::parse_str(id)
                .with_context(|| format!("{} does not hold a UUID", path.display()))?;
            Ok(Some(id.to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            std::fs::create_dir_all(state_dir)
                .with_context(|| format!("creating {}", state_dir.display()))?;
            let id = uuid::Uuid::new_v4().to_string();
            store_agent_id(state_dir, &id)?;
            Ok(Some(id))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `--once`: one reading as JSON on stdout.
pub fn once(config: &Config) -> anyhow::Result<()> {
    let mut collector = Collector::new(&config.root_path, config.collectors.clone())?;
    let facts = collector.collect();
    let id = agent_id(&config.state_dir, false)?.unwrap_or_default();
    let resource: serde_json::Map<String, serde_json::Value> = otlp::resource(&facts.host, &id)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect();
    let time = facts
        .time
        .unwrap_or_else(SystemTime::now)
        .duration_since(UNIX_EPOCH)?
        .as_secs_f64();
    let snapshot = serde_json::json!({
        "time": time,
        "naming": config.naming,
        "resource": resource,
        "metrics": names::metrics(&facts, config.naming),
    });
    println!("{}", serde_json::to_string_pretty(&snapshot)?);
    Ok(())
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let id = agent_id(&config.state_dir, true)?.expect("created");
    let queue = Queue::open(
        &config.state_dir.join("queue"),
        config.queue.max_bytes,
        config.queue.max_age,
    )
    .with_context(|| format!("opening the queue in {}", config.state_dir.display()))?;
    let exporter = Exporter::new(&config)?;
    let collector = Collector::new(&config.root_path, config.collectors.clone())?;
    // A remote configuration applied before a restart applies again at once.
    let remote = opamp::load_stored(&config.state_dir);
    let mut initial = Settings::of(&config);
    // The body kept is the last one applied (a refused offer keeps the one before it).
    if let Some(stored) = remote.as_ref().filter(|r| !r.body.is_empty()) {
        match opamp::apply_remote(&initial, &stored.body) {
            Ok(settings) => initial = settings,
            Err(e) => tracing::warn!(
                "the kept remote configuration no longer applies ({e}); local settings used"
            ),
        }
    }
    tracing::info!(agent_id = %id, server = %config.server, protocol = ?config.protocol, interval = ?initial.interval, naming = ?initial.naming, "secumon-agent started");
    let host = collector.host().clone();
    let shared = Arc::new(Shared {
        queue: Mutex::new(queue),
        wake: Notify::new(),
        stats: Stats::default(),
        started: SystemTime::now(),
        health: Arc::new(Health::default()),
        identity: Arc::new(std::sync::RwLock::new(id.clone())),
    });
    let (settings_tx, settings) = watch::channel(initial);
    let (stop_tx, stop) = watch::channel(false);
    let opamp_task = if config.opamp.url.is_empty() {
        None
    } else {
        let client = opamp::Client::new(
            &config,
            crate::export::http_client(&config)?,
            settings_tx.clone(),
            shared.identity.clone(),
            otlp::resource(&host, &id),
            shared.health.clone(),
            remote,
        );
        Some(tokio::spawn(client.run(stop)))
    };
    let export_task = tokio::spawn(export_loop(shared.clone(), exporter, config.clone()));
    let collect = collect_loop(shared.clone(), collector, settings);
    let result = tokio::select! {
        result = collect => result,
        result = export_task => result.context("export loop"),
        _ = shutdown_signal() => {
            tracing::info!("stopping; unsent readings stay queued on disk");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    if let Some(task) = opamp_task {
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    drop(settings_tx);
    result
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The next multiple of `interval` since the Unix epoch after `now`.
pub fn next_boundary(now: SystemTime, interval: Duration) -> SystemTime {
    let since = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let step = interval.as_millis().max(1);
    UNIX_EPOCH + Duration::from_millis(((since / step + 1) * step) as u64)
}

async fn collect_loop(
    shared: Arc<Shared>,
    collector: Collector,
    mut settings: watch::Receiver<Settings>,
) -> anyhow::Result<()> {
    let collector = Arc::new(Mutex::new(collector));
    // The last reading's time and interval.
    let mut last: Option<(SystemTime, Duration)> = None;
    loop {
        let current = settings.borrow_and_update().clone();
        let mut at = next_boundary(SystemTime::now(), current.interval);
        // Boundaries between the last reading and this one: readings never taken (not
        // counted across a change of interval).
        let mut skipped = 0;
        if let Some((last, interval)) = last {
            // The wall clock stepped back: readings keep moving forward, or the server would
            // refuse them as out of order.
            if at <= last {
                at = next_boundary(last, current.interval);
            } else if interval == current.interval {
                let gap = at.duration_since(last).unwrap_or_default().as_millis();
                let step = current.interval.as_millis().max(1);
                skipped = (gap / step).saturating_sub(1) as u64;
            }
        }
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // A new interval or naming applies from the next boundary of the new interval.
            _ = settings.changed() => continue,
        }
        if skipped > 0 {
            // Counted once the reading after them is due (it carries the count).
            shared.stats.skipped.fetch_add(skipped, Ordering::Relaxed);
            let why = "readings skipped: a collection took longer than the interval, the agent was not scheduled in time, or the clock jumped";
            // One boundary missed now and then is a busy host; more is worth a warning.
            if skipped > 1 {
                tracing::warn!(skipped, "{why}");
            } else {
                tracing::info!(skipped, "{why}");
            }
        }
        last = Some((at, current.interval));
        let shared_ = shared.clone();
        let collector = collector.clone();
        let taken =
            tokio::task::spawn_blocking(move || take_reading(&shared_, &collector, &current, at))
                .await;
        // One reading that fails (a full disk, a collector's panic) costs that reading, counted;
        // the agent goes on, and so does the export of what is queued.
        let failure = match taken {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(format!("collection panicked: {e}")),
        };
        if let Some(reason) = failure {
            shared.stats.unqueued.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%reason, "a reading was lost before it was queued");
        }
    }
}

/// Reads the host and queues the reading (blocking: file reads, statvfs, fsync).
fn take_reading(
    shared: &Shared,
    collector: &Mutex<Collector>,
    settings: &Settings,
    at: SystemTime,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut collector = collector.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = collector.reconfigure_if_changed(&settings.collectors) {
        tracing::warn!("collectors configuration refused: {e}");
    }
    let facts = collector.collect();
    drop(collector);
    let mut metrics = names::metrics(&facts, settings.naming);
    let took = started.elapsed();
    let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
    metrics.extend(self_metrics(shared, &queue, took));
    let id = shared
        .identity
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let resource = otlp::resource(&facts.host, &id);
    let encoded = otlp::request(&resource, at, &metrics).encode_to_vec();
    // Queued gzip-compressed (about 6 times smaller): the queue holds days, not hours, and
    // OTLP/HTTP with gzip sends the record as it is.
    let payload = crate::export::gzip(&encoded);
    let created = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    queue
        .push(created, &payload)
        .context("writing the reading to the queue")?;
    drop(queue);
    shared.wake.notify_one();
    tracing::debug!(
        metrics = metrics.len(),
        bytes = encoded.len(),
        queued_bytes = payload.len(),
        ?took,
        "reading queued"
    );
    Ok(())
}

fn self_metrics(shared: &Shared, queue: &Queue, collection: Duration) -> Vec<Metric> {
    let stats = &shared.stats;
    let start = shared
        .started
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64());
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let oldest = load(&stats.oldest_unsent_ms);
    let age = if oldest == 0 {
        0.0
    } else {
        now_ms().saturating_sub(oldest) as f64 / 1000.0
    };
    let d = queue.dropped;
    vec![
        Metric::new("secumon.agent.queue.size", "Bytes of unsent readings in the on-disk queue.", "By", Kind::UpDownCounter)
            .int(vec![], queue.pending_bytes(), None),
        Metric::new("secumon.agent.queue.age", "Age of the oldest unsent reading (0 when none waits).", "s", Kind::Gauge)
            .double(vec![], age, None),
        Metric::new("secumon.agent.queue.dropped", "Readings that left the queue unsent, by reason.", "{readings}", Kind::Counter)
            .int(names::attrs([("reason", "full")]), d.full, start)
            .int(names::attrs([("reason", "age")]), d.age, start)
            .int(names::attrs([("reason", "corrupt")]), d.corrupt, start)
            .int(names::attrs([("reason", "refused")]), load(&stats.refused), start)
            .int(names::attrs([("reason", "unqueued")]), load(&stats.unqueued), start),
        Metric::new("secumon.agent.export.requests", "Export attempts by result.", "{requests}", Kind::Counter)
            .int(names::attrs([("result", "delivered")]), load(&stats.delivered), start)
            .int(names::attrs([("result", "retried")]), load(&stats.retried), start)
            .int(names::attrs([("result", "refused")]), load(&stats.refused), start),
        Metric::new("secumon.agent.export.rejected_points", "Points the server refused in readings it otherwise took (OTLP partial success).", "{points}", Kind::Counter)
            .int(vec![], load(&stats.rejected_points), start),
        Metric::new("secumon.agent.export.duration", "Seconds spent in delivered exports (divide by delivered requests for the mean latency).", "s", Kind::Counter)
            .double(vec![], load(&stats.export_nanos) as f64 / 1e9, start),
        Metric::new("secumon.agent.collection.duration", "Seconds the last collection took.", "s", Kind::Gauge)
            .double(vec![], collection.as_secs_f64(), None),
        Metric::new("secumon.agent.collection.skipped", "Interval boundaries with no reading: the agent was late for them.", "{readings}", Kind::Counter)
            .int(vec![], load(&stats.skipped), start),
    ]
}

async fn export_loop(shared: Arc<Shared>, mut exporter: Exporter, config: Config) {
    let mut attempt = 0u32;
    loop {
        // Queue reads and cursor writes touch the disk: off the runtime's one thread.
        let from = shared.clone();
        let peeked = tokio::task::spawn_blocking(move || {
            from.queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .peek(now_ms())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        let record = match peeked {
            Ok(Some(record)) => record,
            Ok(None) => {
                shared.stats.oldest_unsent_ms.store(0, Ordering::Relaxed);
                shared.wake.notified().await;
                continue;
            }
            Err(e) => {
                tracing::error!("reading the queue: {e}");
                tokio::time::sleep(config.export.max_backoff).await;
                continue;
            }
        };
        shared
            .stats
            .oldest_unsent_ms
            .store(record.created_ms.max(1), Ordering::Relaxed);
        let started = std::time::Instant::now();
        let outcome = exporter.send(&record.payload).await;
        let stats = &shared.stats;
        let done = match outcome {
            Outcome::Delivered { rejected, message } => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                stats
                    .export_nanos
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                if rejected > 0 {
                    stats
                        .rejected_points
                        .fetch_add(rejected as u64, Ordering::Relaxed);
                    tracing::warn!(rejected, %message, "the server refused part of a reading");
                }
                if attempt > 0 {
                    tracing::info!(after_attempts = attempt, "export works again");
                }
                shared.health.set(None);
                attempt = 0;
                true
            }
            Outcome::Refused { reason } => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%reason, "the server refused a reading for good; dropped");
                shared.health.set(Some(format!("refused: {reason}")));
                attempt = 0;
                true
            }
            Outcome::Retry { after, reason } => {
                stats.retried.fetch_add(1, Ordering::Relaxed);
                shared.health.set(Some(reason.clone()));
                // The server's delay when it gives one, but never a tight loop on `0`.
                let wait = backoff(
                    attempt,
                    config.export.initial_backoff,
                    config.export.max_backoff,
                )
                .max(after.unwrap_or_default());
                if attempt == 0 {
                    tracing::warn!(%reason, ?wait, "export failed; readings stay queued and are retried");
                } else {
                    tracing::debug!(%reason, ?wait, attempt, "export failed again");
                }
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(wait).await;
                false
            }
        };
        if done {
            let to = shared.clone();
            let acked = tokio::task::spawn_blocking(move || {
                to.queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ack(&record)
            })
            .await;
            if let Ok(Err(e)) | Err(e) = acked.map_err(|e| std::io::Error::other(e.to_string())) {
                tracing::error!("recording a sent reading in the queue: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_fall_on_multiples_of_the_interval() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_003_250);
        assert_eq!(
            next_boundary(t, Duration::from_secs(10)),
            UNIX_EPOCH + Duration::from_secs(1_700_000_010)
        );
        let on = UNIX_EPOCH + Duration::from_secs(1_700_000_010);
        assert_eq!(
            next_boundary(on, Duration::from_secs(10)),
            UNIX_EPOCH + Duration::from_secs(1_700_000_020)
        );
    }

    #[test]
    fn the_agent_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(agent_id(dir.path(), false).unwrap(), None);
        let id = agent_id(dir.path(), true).unwrap().unwrap();
        assert_eq!(agent_id(dir.path(), true).unwrap().unwrap(), id);
        std::fs::write(dir.path().join("agent-id"), "not a uuid").unwrap();
        assert!(agent_id(dir.path(), true).is_err());
    }
}
