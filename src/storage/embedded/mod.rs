//! The embedded storage engine, SecuMon's zero-setup default (`--storage ./data`).
//!
//! Writes go to a write-ahead log (`wal.rs`) and are acknowledged only once logged (and
//! fsynced, by policy), then applied to the in-memory head (`head.rs`). Maintenance
//! ([`EmbeddedStorage::maintain`], run every `flush_interval_secs`) flushes head samples older
//! than the out-of-order window into an on-disk block (`block.rs`, with its 5 min and 1 h
//! rollups), writes a checkpoint and deletes the log segments it covers, compacts blocks into
//! larger ones and deletes what passed retention. On start blocks are opened and the log is
//! replayed on top of them. docs/storage.md describes the formats and rules.
//!
//! Where each concern lives: `open.rs` (opening blocks, replaying the log), `append.rs` (series
//! resolved, records logged and applied), `read.rs` (the series a query matches and their
//! samples), `maintain.rs` (flush and checkpoint, compaction, retention, sizes); this file
//! holds the engine's state and the `Storage` trait on top of them. Formats: `wal.rs`,
//! `block.rs`, `runfile/` (the container of block files), `frames.rs`; the sample encodings
//! are `crate::storage::encoding`, which PostgreSQL's packed rows share.

mod append;
mod block;
mod frames;
mod head;
mod index;
mod lock;
mod maintain;
mod open;
mod read;
mod runfile;
mod wal;

pub use wal::FsyncPolicy;

// The sample encodings, shared with PostgreSQL's packed rows.
use super::encoding::{self as codec, chunk};

use super::{
    budget_left, AppendOutcome, ExemplarWrite, RejectReason, Resolution, RetentionConfig,
    RollupRead, RollupRow, SelectHints, SeriesQuery, SeriesRollups, Storage, StorageError,
    StorageResult, StorageStats, StringList, WriteBatch,
};
use crate::model::{
    Labels, Matcher, MetricMetadata, PackedLabels, Sample, SeriesExemplars, SeriesSamples,
    TenantId, TimestampMs,
};
use async_trait::async_trait;
use block::{Block, Lineage};
use chunk::Chunk;
use head::{
    chunks_any_in, chunks_range, chunks_range_into, insert_sample, place, place_sorted, Head, Held,
    Placement, SampleStore,
};
use rustc_hash::FxHashMap as HashMap;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use wal::{Record, Wal};

/// Settings of the embedded engine (`[embedded]` in the config file).
#[derive(Clone, Debug, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Embedded engine: when writes reach the disk: `always` (fsync the write-ahead log
    /// before acknowledging) or `never` (leave it to the OS: survives a process crash, not a
    /// power loss).
    #[arg(
        id = "embedded.fsync",
        long = "embedded-fsync",
        env = "SECUMON_EMBEDDED_FSYNC",
        value_enum,
        default_value_t = FsyncPolicy::Always
    )]
    pub fsync: FsyncPolicy,
    /// Embedded engine: how far behind a series' latest sample a new sample may be, in
    /// seconds. Head samples older than this behind the newest sample are flushed to disk.
    #[arg(
        id = "embedded.out_of_order_window_secs",
        long = "embedded-out-of-order-window-secs",
        env = "SECUMON_EMBEDDED_OUT_OF_ORDER_WINDOW_SECS",
        default_value_t = 3600
    )]
    pub out_of_order_window_secs: u64,
    /// Embedded engine: seconds between maintenance runs (flush to disk, checkpoint,
    /// compaction, retention).
    #[arg(
        id = "embedded.flush_interval_secs",
        long = "embedded-flush-interval-secs",
        env = "SECUMON_EMBEDDED_FLUSH_INTERVAL_SECS",
        default_value_t = 300
    )]
    pub flush_interval_secs: u64,
    /// Embedded engine: most exemplars kept, across every series and tenant; storing one
    /// more drops the oldest (Prometheus's `--storage.tsdb.max-exemplars`). 0 keeps none.
    #[arg(
        id = "embedded.max_exemplars",
        long = "embedded-max-exemplars",
        env = "SECUMON_EMBEDDED_MAX_EXEMPLARS",
        default_value_t = 100_000
    )]
    pub max_exemplars: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

/// Compacted blocks cover aligned windows of these widths: flushed blocks of a closed 2 h
/// window merge into one, then those of a closed day.
const COMPACTION_SPANS_MS: [i64; 2] = [2 * 3_600_000, 24 * 3_600_000];

/// In a window still open, consecutive blocks holding fewer samples per series than this (one
/// head chunk's worth) are merged: each block costs every series a run header, an index entry
/// and a compressed frame (about 60 bytes), which small flushes would otherwise pay per flush.
/// A block past this size waits for its window to close, so nothing is rewritten more than a
/// few times before then.
const SMALL_BLOCK_SAMPLES_PER_SERIES: u64 = 120;

/// Series a flush handles under one hold of the head's lock: writers wait for one batch at
/// most, never for a pass over the whole head (4,096 held writers up to 37 ms in
/// `storage_peers`, where every series' open chunk is split and re-encoded).
const FLUSH_BATCH: usize = 1024;
/// Head samples a log compaction copies under one hold of the head's lock, at most (and
/// [`FLUSH_BATCH`] series): a few milliseconds of decoding, whatever the scrape interval.
const COPY_BATCH_SAMPLES: usize = 1 << 18;
/// The log is compacted ([`EmbeddedStorage::compact_log`]) only past this many bytes of
/// segments (and twice its last compaction's checkpoint).
const LOG_COMPACTION_MIN_BYTES: u64 = 16 << 20;

/// Postings entries a flush prunes of forgotten series under one hold of the head's lock
/// (65,536 held writers 21 ms in `series_churn`, mostly lists of one series each).
const PRUNE_BUDGET: usize = 16_384;

/// The blocks on disk and the samples on their way there.
#[derive(Default)]
struct BlockSet {
    /// Sorted by `meta.order`; shared, so a read holds the blocks it reads without holding
    /// this set's lock, and a block replaced meanwhile stays readable until it is done.
    blocks: Vec<Arc<Block>>,
    /// Samples taken out of the head whose block is not written yet (kept here, readable,
    /// when writing it failed, and written with the next flush).
    flushing: BTreeMap<u64, Vec<Chunk>>,
    /// Blocks whose compaction failed (a damaged run): left alone until a restart.
    not_compactable: std::collections::HashSet<PathBuf>,
    next_order: u64,
    next_dir: u64,
}

/// What one maintenance run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MaintenanceReport {
    pub flushed_samples: u64,
    pub blocks_written: usize,
    pub blocks_compacted: usize,
    pub files_deleted: usize,
    pub wal_segments_deleted: usize,
    /// Samples of deleted segments (or of the checkpoint before) that the new checkpoint
    /// holds: newer than the cutoff, they are still in the head.
    pub wal_samples_carried: u64,
    /// Head samples a compaction of the log wrote into its checkpoint.
    pub wal_samples_compacted: u64,
    /// Series the head forgot (no sample left in it; their labels are in blocks' indexes).
    pub series_dropped: usize,
    /// Blocks whose rollup files were written beside their raw chunks (a closed day's lone
    /// block, or one retention was about to take the raw chunks of).
    pub blocks_rolled_up: usize,
    /// The longest time writers waited on this run (the head's lock or the log held), and
    /// the step that held them.
    pub longest_writer_hold: Duration,
    pub longest_writer_hold_step: &'static str,
}

impl MaintenanceReport {
    /// Whether the run changed anything.
    pub fn did_work(&self) -> bool {
        MaintenanceReport {
            longest_writer_hold: Duration::ZERO,
            longest_writer_hold_step: "",
            ..self.clone()
        } != MaintenanceReport::default()
    }

    fn held(&mut self, since: std::time::Instant, step: &'static str) {
        let held = since.elapsed();
        if held > self.longest_writer_hold {
            self.longest_writer_hold = held;
            self.longest_writer_hold_step = step;
        }
    }
}

pub struct EmbeddedStorage {
    dir: PathBuf,
    head: RwLock<Head>,
    /// Taken after the head (shared or alone), for the write to the log alone: see
    /// [`EmbeddedStorage::append_and_sync`].
    wal: Mutex<Wal>,
    blocks: RwLock<BlockSet>,
    /// One maintenance run at a time.
    maintenance: Mutex<()>,
    window_ms: i64,
    flush_interval: Duration,
    retention: RetentionConfig,
    /// Bytes of damaged data found (log tails cut, block files recovered).
    damaged_bytes: AtomicU64,
    /// Since start: maintenance runs completed and failed, series the head forgot.
    maintenance_runs: AtomicU64,
    maintenance_failures: AtomicU64,
    /// Since start: the longest [`MaintenanceReport::longest_writer_hold`], in µs.
    writer_hold_max_us: AtomicU64,
    series_removed: AtomicU64,
    /// Bytes of the checkpoint the last compaction of the log wrote (at open, of the newest
    /// checkpoint): the log is compacted again once its closed segments take twice as much.
    log_compacted_bytes: AtomicU64,
    /// Since start: checkpoints written with the head's samples (the log compacted).
    log_compactions: AtomicU64,
    /// [`LOG_COMPACTION_MIN_BYTES`] (lower in tests).
    log_compaction_min_bytes: u64,
    /// [`wal::Wal::appended`] and the time when a maintenance last found the log busy (see
    /// [`EmbeddedStorage::compact_log`]).
    log_busy: Mutex<(u64, std::time::Instant)>,
    /// How long the log must be quiet for that compaction: a sixteenth of the out-of-order
    /// window, at least a minute (shorter in tests).
    log_quiet_after: Duration,
    /// Compressors for records packed by writers side by side.
    packers: wal::Packers,
    /// What makes each request's samples visible to reads all at once (isolation, as
    /// Prometheus's head gives an append): writers side by side hold it shared from locking
    /// their series to the end of their apply, a read holds it alone while it copies the
    /// head's samples. Taken after the head's lock, before any series' lock.
    visibility: RwLock<()>,
    /// Held while the storage is open: no second server on the directory.
    _lock: lock::DirLock,
    #[cfg(test)]
    pauses: Pauses,
}

/// Points where a test runs code of its own, to order a writer and maintenance exactly.
#[cfg(test)]
#[derive(Default)]
struct Pauses {
    /// In a writer, between judging its samples and logging them.
    after_judging: Pause,
    /// In a flush, after the log rotation, before samples move out of the head.
    after_rotation: Pause,
}

#[cfg(test)]
#[derive(Default)]
struct Pause(Mutex<Option<Box<dyn Fn() + Send + Sync>>>);

#[cfg(test)]
impl Pause {
    fn set(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.0.lock().unwrap() = Some(Box::new(f));
    }

    fn run(&self) {
        if let Some(f) = &*self.0.lock().unwrap() {
            f();
        }
    }
}

fn io_error(e: std::io::Error) -> StorageError {
    // A full disk or unwritable directory may clear up: clients retry.
    StorageError::Unavailable(format!("write-ahead log: {e}"))
}

impl EmbeddedStorage {
    fn blocks_read(&self) -> std::sync::RwLockReadGuard<'_, BlockSet> {
        self.blocks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn blocks_write(&self) -> std::sync::RwLockWriteGuard<'_, BlockSet> {
        self.blocks.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Head> {
        self.head.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Head> {
        self.head.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Storage for EmbeddedStorage {
    async fn append_batch(
        &self,
        tenant: &TenantId,
        batch: &WriteBatch,
    ) -> StorageResult<AppendOutcome> {
        self.append_and_sync(tenant, batch).await
    }

    async fn append_metadata(
        &self,
        tenant: &TenantId,
        metadata: &[MetricMetadata],
    ) -> StorageResult<()> {
        let logged = {
            let head = self.write();
            let records: Vec<Record> = {
                let known = head.tenants.get(tenant.as_str()).map(|t| &t.metadata);
                metadata
                    .iter()
                    .filter(|m| {
                        !known
                            .and_then(|k| k.get(&m.metric_family_name))
                            .is_some_and(|v| v.contains(m))
                    })
                    .map(|m| Record::Metadata {
                        tenant: tenant.as_str().to_owned(),
                        metadata: m.clone(),
                    })
                    .collect()
            };
            self.commit(head, records)?
        };
        self.durable(logged).await
    }

    async fn append_exemplars(
        &self,
        tenant: &TenantId,
        batch: &[ExemplarWrite],
    ) -> StorageResult<()> {
        let logged = {
            let head = self.write();
            let mut records = Vec::new();
            let exemplars: Vec<(u64, i64, f64, Labels)> = {
                let series = WriteBatch::of_labels(batch.iter().map(|w| &w.series));
                let ids = self.resolve(
                    &head,
                    tenant.as_str(),
                    &series,
                    &mut records,
                    &mut HashMap::default(),
                )?;
                batch
                    .iter()
                    .zip(ids)
                    .flat_map(|(w, id)| {
                        w.exemplars
                            .iter()
                            .map(move |e| (id, e.t, e.value, e.labels.clone()))
                    })
                    .collect()
            };
            records.push(Record::Exemplars { exemplars });
            self.commit(head, records)?
        };
        self.durable(logged).await
    }

    async fn exemplars(
        &self,
        tenant: &TenantId,
        query: &SeriesQuery,
    ) -> StorageResult<Vec<SeriesExemplars>> {
        let head = self.read();
        let mut ids: BTreeSet<u64> = BTreeSet::new();
        for set in &query.matcher_sets {
            ids.extend(head.matching(tenant.as_str(), set));
        }
        let mut out: Vec<SeriesExemplars> = ids
            .into_iter()
            .filter_map(|id| head.exemplars_in(id, query.start, query.end))
            .collect();
        out.sort_unstable_by(|a, b| a.labels.cmp(&b.labels));
        Ok(out)
    }

    async fn select(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        hints: &SelectHints,
    ) -> StorageResult<Vec<SeriesSamples>> {
        // The head first, then the blocks, with no lock on the head while blocks are read.
        let view = self.head_view(
            tenant,
            matchers,
            (hints.start, hints.end),
            hints.max_samples,
        )?;
        let set = view.set;
        let mut loaded = 0usize;
        let mut out = Vec::new();
        let (ids, head, range, max) = (
            view.ids,
            view.samples,
            (hints.start, hints.end),
            hints.max_samples,
        );
        let (tenant_name, matchers_owned) = (tenant.as_str().to_owned(), matchers.to_vec());
        let (read, damaged, mut labels) = read::off_runtime(move |stop| {
            let (beyond, damaged_indexes) = read::block_series(
                &set.blocks,
                &tenant_name,
                &matchers_owned,
                range,
                &ids,
                stop,
            )?;
            let ids = read::with_ids(ids, &beyond);
            let (read, damaged) =
                read::samples_of(head, &set.blocks, &set.flushing, &ids, range, max, stop)?;
            Ok((read, damaged + damaged_indexes, beyond))
        })
        .await?;
        if damaged > 0 {
            hints.warnings.push(format!(
                "{damaged} damaged block runs skipped: the answer may lack samples of some series (the server log names them)"
            ));
        }
        let in_head: Vec<u64> = read
            .keys()
            .copied()
            .filter(|id| !labels.contains_key(id))
            .collect();
        labels.extend(self.labels_of(in_head).await?);
        for (id, samples) in read {
            let Some(labels) = labels.remove(&id) else {
                continue;
            };
            if samples.is_empty() {
                continue;
            }
            loaded += samples.len();
            if hints.max_samples > 0 && loaded > hints.max_samples {
                return Err(StorageError::TooManySamples);
            }
            out.push(SeriesSamples { labels, samples });
        }
        read::sort_by_labels(&mut out);
        Ok(out)
    }

    async fn select_rollups(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        resolution: Resolution,
        start: TimestampMs,
        end: TimestampMs,
        read: RollupRead,
    ) -> StorageResult<Vec<SeriesRollups>> {
        // Rollup runs decode whole; every aggregate comes at no extra cost.
        let (start, end) = (resolution.bucket(start), resolution.bucket(end));
        // The head first (its samples not in blocks yet are aggregated below), then the
        // blocks, with no lock on the head while blocks are read.
        let raw_range = (start, end.saturating_add(resolution.ms() - 1));
        let view = self.head_view(tenant, matchers, raw_range, read.max_rows)?;
        let set = view.set;
        let (ids, head, max_rows) = (view.ids, view.samples, read.max_rows);
        let (tenant_name, matchers_owned) = (tenant.as_str().to_owned(), matchers.to_vec());
        let (mut rows, raw, damaged, mut labels) = read::off_runtime(move |stop| {
            let (beyond, damaged_indexes) = read::block_series(
                &set.blocks,
                &tenant_name,
                &matchers_owned,
                raw_range,
                &ids,
                stop,
            )?;
            let ids = read::with_ids(ids, &beyond);
            let mut rows: BTreeMap<u64, Vec<RollupRow>> = BTreeMap::new();
            // Rows so far, checked after each block against `max_rows` (0: no limit).
            let (mut loaded, mut damaged) = (0usize, damaged_indexes);
            for block in &set.blocks {
                read::stopped(stop)?;
                damaged += block
                    .read_rollups(&ids, resolution, start, end, &mut rows)
                    .map_err(|e| StorageError::Internal(format!("reading a block: {e}")))?;
                if max_rows > 0 {
                    loaded = rows.values().map(Vec::len).sum();
                    if loaded > max_rows {
                        return Err(StorageError::TooManySamples);
                    }
                }
            }
            // Samples not in blocks yet are aggregated below, within what is left.
            let (raw, _) = read::samples_of(
                head,
                &[],
                &set.flushing,
                &ids,
                raw_range,
                budget_left(max_rows, loaded),
                stop,
            )?;
            Ok((rows, raw, damaged, beyond))
        })
        .await?;
        if damaged > 0 {
            read.warnings.push(format!(
                "{damaged} damaged block runs skipped: the answer may lack rollups of some series (the server log names them)"
            ));
        }
        for (id, samples) in raw {
            let fresh: Vec<RollupRow> = super::rollup(&samples, resolution)
                .into_iter()
                .filter(|r| r.t >= start && r.t <= end)
                .collect();
            let entry = rows.entry(id).or_default();
            *entry = super::merge_rollups(std::mem::take(entry), &fresh);
        }
        let in_head: Vec<u64> = rows
            .keys()
            .copied()
            .filter(|id| !labels.contains_key(id))
            .collect();
        labels.extend(self.labels_of(in_head).await?);
        let mut out: Vec<SeriesRollups> = rows
            .into_iter()
            .filter(|(_, rows)| !rows.is_empty())
            .filter_map(|(id, rows)| {
                Some(SeriesRollups {
                    labels: labels.remove(&id)?,
                    rows,
                })
            })
            .collect();
        out.sort_unstable_by(|a, b| a.labels.cmp(&b.labels));
        Ok(out)
    }

    async fn series(&self, tenant: &TenantId, query: &SeriesQuery) -> StorageResult<Vec<Labels>> {
        let mut out: Vec<Labels> = self.series_labels(tenant, query).await?;
        out.sort();
        if query.limit > 0 {
            out.truncate(query.limit);
        }
        Ok(out)
    }

    async fn label_names(
        &self,
        tenant: &TenantId,
        query: &SeriesQuery,
    ) -> StorageResult<StringList> {
        if query.matcher_sets.is_empty() {
            let range = (query.start, query.end);
            if let Some(names) = self.indexed_label_values(tenant, None, range).await? {
                return Ok(names.limited(query.limit));
            }
        }
        super::label_names_of_series(self, tenant, query).await
    }

    async fn label_values(
        &self,
        tenant: &TenantId,
        name: &str,
        query: &SeriesQuery,
    ) -> StorageResult<StringList> {
        if query.matcher_sets.is_empty() {
            let range = (query.start, query.end);
            if let Some(values) = self.indexed_label_values(tenant, Some(name), range).await? {
                return Ok(values.limited(query.limit));
            }
        }
        super::label_values_of_series(self, tenant, name, query).await
    }

    async fn metadata(
        &self,
        tenant: &TenantId,
        metric: Option<&str>,
        limit: usize,
    ) -> StorageResult<Vec<MetricMetadata>> {
        let head = self.read();
        let Some(index) = head.tenants.get(tenant.as_str()) else {
            return Ok(Vec::new());
        };
        Ok(index
            .metadata
            .iter()
            .filter(|(name, _)| metric.is_none_or(|m| m == name.as_str()))
            .take(if limit == 0 { usize::MAX } else { limit })
            .flat_map(|(_, entries)| entries.iter().cloned())
            .collect())
    }

    async fn ping(&self) -> StorageResult<()> {
        Ok(())
    }

    fn damaged_bytes_recovered(&self) -> u64 {
        self.damaged_bytes.load(Ordering::Relaxed)
    }

    fn stats(&self) -> Option<StorageStats> {
        Some(self.sizes())
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        Some(self.flush_interval)
    }

    async fn run_maintenance(&self) -> StorageResult<()> {
        let now = chrono::Utc::now().timestamp_millis();
        let began = std::time::Instant::now();
        let report = tokio::task::block_in_place(|| self.maintain(now))?;
        if report.did_work() {
            let seconds = began.elapsed().as_secs_f64();
            tracing::info!(?report, seconds, "embedded storage maintenance");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Label;
    use crate::storage::{RollupColumns, SeriesWrite};

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    fn config() -> EmbeddedConfig {
        EmbeddedConfig {
            fsync: FsyncPolicy::Never,
            ..EmbeddedConfig::default()
        }
    }

    /// A store on `dir` with [`config`], shared by the tasks of a test.
    fn open_shared(dir: &Path) -> Arc<EmbeddedStorage> {
        Arc::new(EmbeddedStorage::open(dir, &config(), &RetentionConfig::default()).unwrap())
    }

    /// `writers` tasks, each appending `rounds` requests of `series` series with one sample
    /// each, `sample(writer, round, series)` giving each its labels and sample; each task
    /// returns the samples accepted.
    fn write_rounds(
        s: &Arc<EmbeddedStorage>,
        (writers, rounds, series): (i64, i64, i64),
        sample: fn(i64, i64, i64) -> (Labels, Sample),
    ) -> Vec<tokio::task::JoinHandle<usize>> {
        (0..writers)
            .map(|w| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut accepted = 0;
                    for r in 0..rounds {
                        let batch: Vec<SeriesWrite> = (0..series)
                            .map(|k| {
                                let (labels, sample) = sample(w, r, k);
                                SeriesWrite {
                                    labels,
                                    samples: vec![sample],
                                }
                            })
                            .collect();
                        let outcome = s.append(&TenantId::default(), &batch).await.unwrap();
                        accepted += outcome.accepted;
                        tokio::task::yield_now().await;
                    }
                    accepted
                })
            })
            .collect()
    }

    fn series(name: &str, job: &str, from: i64, to: i64, step: i64) -> SeriesWrite {
        SeriesWrite {
            labels: Labels::from_trusted(vec![
                Label::new("__name__", name),
                Label::new("job", job),
            ]),
            samples: (0..)
                .map(|i| from + i * step)
                .take_while(|&t| t <= to)
                .map(|t| Sample {
                    t,
                    v: (t / step % 97) as f64,
                })
                .collect(),
        }
    }

    async fn everything(s: &EmbeddedStorage) -> Vec<SeriesSamples> {
        let hints = SelectHints {
            start: i64::MIN,
            end: i64::MAX,
            ..SelectHints::default()
        };
        s.select(&TenantId::default(), &[Matcher::equal("job", "a")], &hints)
            .await
            .unwrap()
    }

    /// Every series of `job` with its samples, in the whole time range.
    async fn job_series(s: &EmbeddedStorage, matchers: &[Matcher]) -> Vec<SeriesSamples> {
        let hints = SelectHints {
            start: i64::MIN,
            end: i64::MAX,
            ..SelectHints::default()
        };
        s.select(&TenantId::default(), matchers, &hints)
            .await
            .unwrap()
    }

    /// The head answers a label's values by reading its series (a value nearly every series:
    /// `job` here) or by looking up each value (`zone`, two values): both as the series
    /// themselves say, in range, for the asking tenant only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn label_values_of_the_head_agree_with_its_series() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        let (a, b) = (TenantId::new("a"), TenantId::new("b"));
        let write = |tenant: &str, i: i64| SeriesWrite {
            labels: Labels::from_trusted(vec![
                Label::new("__name__", "m"),
                Label::new("job", format!("{tenant}-{i:02}")),
                Label::new("zone", format!("z{}", i % 2)),
            ]),
            samples: vec![Sample {
                t: if i < 10 { 1_000 } else { 1_000_000 },
                v: 1.0,
            }],
        };
        let of = |tenant: &'static str| (0..20).map(move |i| write(tenant, i));
        s.append(&a, &of("a").collect::<Vec<_>>()).await.unwrap();
        s.append(&b, &of("b").collect::<Vec<_>>()).await.unwrap();
        for (start, end) in [
            (i64::MIN, i64::MAX),
            (500_000, 2_000_000),
            (0, 5_000),
            (2_000, 3_000),
        ] {
            let query = SeriesQuery {
                matcher_sets: vec![],
                start,
                end,
                limit: 0,
            };
            for name in ["job", "zone", "absent"] {
                let got = s.label_values(&a, name, &query).await.unwrap();
                let want = super::super::label_values_of_series(&s, &a, name, &query)
                    .await
                    .unwrap();
                assert_eq!(got, want, "{name} in {start}..{end}");
            }
            let names = s.label_names(&a, &query).await.unwrap();
            let want = super::super::label_names_of_series(&s, &a, &query)
                .await
                .unwrap();
            assert_eq!(names, want, "names in {start}..{end}");
        }
        let all = SeriesQuery {
            matcher_sets: vec![],
            start: i64::MIN,
            end: i64::MAX,
            limit: 0,
        };
        let jobs = s.label_values(&a, "job", &all).await.unwrap();
        assert_eq!(jobs.len(), 20);
        assert!(jobs.iter().all(|j| j.starts_with("a-")), "{jobs:?}");
        let later = SeriesQuery {
            start: 500_000,
            ..all.clone()
        };
        assert_eq!(
            s.label_values(&a, "job", &later).await.unwrap().get(0),
            Some("a-10")
        );
        assert_eq!(
            s.label_values(&a, "zone", &all).await.unwrap(),
            ["z0", "z1"]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_head_forgets_series_without_samples_and_blocks_answer_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let start = 10 * DAY;
        // Four generations of 50 series, each alive one hour; a flush after each hour.
        let generation = |g: i64| -> Vec<SeriesWrite> {
            (0..50)
                .map(|i| {
                    let from = start + g * HOUR;
                    series("proc", &format!("g{g}-{i}"), from, from + HOUR - 1, 60_000)
                })
                .collect()
        };
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        let mut written: Vec<SeriesWrite> = Vec::new();
        for g in 0..4 {
            s.append(&tenant, &generation(g)).await.unwrap();
            written.extend(generation(g));
            let report = s
                .maintain_with_cutoff(start, start + (g + 1) * HOUR)
                .unwrap();
            assert_eq!(report.series_dropped, 50, "generation {g}");
            assert_eq!(s.sizes().series_in_memory, 0);
        }
        let want = |matchers: &[Matcher]| -> Vec<(Labels, usize)> {
            let mut out: Vec<(Labels, usize)> = written
                .iter()
                .filter(|w| crate::model::matches_all(matchers, &w.labels))
                .map(|w| (w.labels.clone(), w.samples.len()))
                .collect();
            out.sort();
            out
        };
        let got = |answer: Vec<SeriesSamples>| -> Vec<(Labels, usize)> {
            answer
                .into_iter()
                .map(|s| (s.labels, s.samples.len()))
                .collect()
        };
        let cases = [
            vec![Matcher::equal("__name__", "proc")],
            vec![Matcher::regex("job", "g1-.*|g3-4.", false).unwrap()],
            vec![
                Matcher::equal("__name__", "proc"),
                Matcher::regex("job", "g[023]-.*", true).unwrap(),
            ],
        ];
        for matchers in &cases {
            assert_eq!(
                got(job_series(&s, matchers).await),
                want(matchers),
                "{matchers:?}"
            );
        }
        // A series comes back: same id, its flushed samples refused, new ones kept.
        let back = series("proc", "g0-7", start, start + 2 * HOUR, 60_000);
        let outcome = s
            .append(&tenant, std::slice::from_ref(&back))
            .await
            .unwrap();
        assert_eq!(outcome.accepted, 61, "{outcome:?}");
        assert_eq!(outcome.rejected_total(), 60);
        assert_eq!(s.sizes().series_in_memory, 1);
        let one = job_series(&s, &[Matcher::equal("job", "g0-7")]).await;
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].samples, back.samples);
        // A new series takes an id no block holds.
        s.append(
            &tenant,
            &[series(
                "proc",
                "new",
                start + 5 * HOUR,
                start + 5 * HOUR,
                60_000,
            )],
        )
        .await
        .unwrap();
        let ids: BTreeSet<u64> = s.read().series.keys().copied().collect();
        assert_eq!(ids.len(), 2);
        // Series, labels and rollups find the forgotten series too.
        let query = SeriesQuery {
            matcher_sets: vec![vec![Matcher::regex("job", "g2-.*", false).unwrap()]],
            start: i64::MIN,
            end: i64::MAX,
            limit: 0,
        };
        assert_eq!(s.series(&tenant, &query).await.unwrap().len(), 50);
        let values = s
            .label_values(
                &tenant,
                "job",
                &SeriesQuery {
                    matcher_sets: vec![],
                    ..query.clone()
                },
            )
            .await
            .unwrap();
        assert_eq!(values.len(), 201);
        let hourly = s
            .select_rollups(
                &tenant,
                &[Matcher::regex("job", "g3-.*", false).unwrap()],
                Resolution::OneHour,
                0,
                20 * DAY,
                RollupColumns::ALL.into(),
            )
            .await
            .unwrap();
        assert_eq!(hourly.len(), 50);
        assert!(hourly
            .iter()
            .all(|s| s.rows.len() == 1 && s.rows[0].count == 60.0));
        // After a restart the head holds only what the log still has of active series; the
        // forgotten ones answer from blocks, and ids go on after every block's.
        s.maintain_with_cutoff(start, start + 6 * HOUR).unwrap();
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert!(s.sizes().series_in_memory <= 2);
        let mut expected = want(&cases[0]);
        for (labels, n) in &mut expected {
            if labels.get("job") == Some("g0-7") {
                *n = 121;
            }
        }
        expected.push((series("proc", "new", 0, 0, 1).labels, 1));
        expected.sort();
        assert_eq!(got(job_series(&s, &cases[0]).await), expected);
        assert_eq!(s.read().next_id, 201, "200 series, then one new");
        // Compaction of the day merges blocks whose series the head forgot: their labels come
        // from the blocks' indexes.
        s.maintain_with_cutoff(start, start + 2 * DAY).unwrap();
        assert_eq!(s.sizes().blocks, 1);
        assert_eq!(got(job_series(&s, &cases[0]).await), expected);
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert_eq!(got(job_series(&s, &cases[1]).await), {
            let mut w = want(&cases[1]);
            w.sort();
            w
        });
    }

    /// Writers appending while flushes move samples out, forget series and copy the head
    /// in batches lose nothing and duplicate nothing, before and after a reopen: series
    /// whose batch is done or still to come, series forgotten and coming back, new series.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_during_batched_flushes_lose_nothing() {
        use std::sync::atomic::AtomicI64;
        const SERIES: i64 = 3 * FLUSH_BATCH as i64 + 100;
        const ROUNDS: i64 = 12;
        const STEP: i64 = 60_000;
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let t0 = 40 * DAY;
        let one = |k: i64, r: i64| SeriesWrite {
            labels: Labels::from_trusted(vec![
                Label::new("__name__", "m"),
                Label::new("k", k.to_string()),
            ]),
            samples: vec![Sample {
                t: t0 + r * STEP,
                v: (k * 1000 + r) as f64,
            }],
        };
        // Round r writes series k unless (k + r) % 4 == 0: a flush then often finds it empty
        // and forgets it, and it comes back the round after. Round r adds series SERIES + r.
        let written = |k: i64, r: i64| k < SERIES + r && (k + r) % 4 != 0;
        let s = open_shared(dir.path());
        // The latest round written whole: flushes move out every round before it.
        let last_round = Arc::new(AtomicI64::new(i64::MIN));
        let (done, maintained) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let maintainer = {
            let (s, last_round) = (s.clone(), last_round.clone());
            let (done, maintained) = (done.clone(), maintained.clone());
            tokio::spawn(async move {
                let (mut runs, mut forgotten) = (0, 0);
                while !done.load(Ordering::SeqCst) {
                    let cutoff = last_round.load(Ordering::SeqCst);
                    if cutoff > i64::MIN {
                        let report = s.maintain_with_cutoff(t0 + DAY, cutoff).unwrap();
                        runs += usize::from(report.blocks_written > 0);
                        forgotten += report.series_dropped;
                    }
                    maintained.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
                (runs, forgotten)
            })
        };
        for r in 0..ROUNDS {
            let batch: Vec<SeriesWrite> = (0..SERIES + r)
                .filter(|&k| written(k, r))
                .map(|k| one(k, r))
                .collect();
            for part in batch.chunks(500) {
                let outcome = s.append(&tenant, part).await.unwrap();
                assert!(
                    outcome.rejected.is_empty(),
                    "round {r}: {:?}",
                    outcome.rejected
                );
            }
            let seen = maintained.load(Ordering::SeqCst);
            last_round.store(t0 + r * STEP, Ordering::SeqCst);
            if r % 2 == 0 {
                // A whole flush before the next round: the series this round skipped are
                // forgotten (after odd rounds the next one is written during the flush).
                while maintained.load(Ordering::SeqCst) < seen + 2 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        done.store(true, Ordering::SeqCst);
        let (runs, forgotten) = maintainer.await.unwrap();
        assert!(runs >= 2, "{runs} flushes wrote a block");
        assert!(forgotten > 0, "no series was forgotten");
        let want: BTreeMap<String, Vec<Sample>> = (0..SERIES + ROUNDS)
            .filter_map(|k| {
                let samples: Vec<Sample> = (0..ROUNDS)
                    .filter(|&r| written(k, r))
                    .map(|r| one(k, r).samples[0])
                    .collect();
                (!samples.is_empty()).then(|| (one(k, 0).labels.to_string(), samples))
            })
            .collect();
        let read = |s: Arc<EmbeddedStorage>| async move {
            job_series(&s, &[Matcher::equal("__name__", "m")])
                .await
                .into_iter()
                .map(|series| (series.labels.to_string(), series.samples))
                .collect::<BTreeMap<String, Vec<Sample>>>()
        };
        let got = read(s.clone()).await;
        assert_eq!(got.len(), want.len());
        assert!(got == want, "samples differ after the flushes");
        drop(s);
        let s = open_shared(dir.path());
        let got = read(s).await;
        assert!(got == want, "samples differ after a reopen");
    }

    /// A flush that moves a series' samples out between a writer's judgement of an
    /// out-of-order sample and its apply must not make the apply drop the sample the writer
    /// acknowledges: the lagging series' sample is inside its own out-of-order window but
    /// older than the flush cutoff (which follows the newest sample of any series).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_between_judging_and_applying_loses_no_accepted_sample() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let t0 = 20 * DAY;
        let s = open_shared(dir.path());
        let one = |job: &str, t: i64| SeriesWrite {
            labels: Labels::from_trusted(vec![Label::new("__name__", "m"), Label::new("job", job)]),
            samples: vec![Sample { t, v: t as f64 }],
        };
        // The lagging series holds t0 and t0 + 2 min; another is 5 hours ahead, so the
        // cutoff (its newest sample less the 1 h window) is past both.
        for part in [
            one("lag", t0),
            one("lag", t0 + 120_000),
            one("lead", t0 + 5 * HOUR),
        ] {
            let outcome = s.append(&tenant, &[part]).await.unwrap();
            assert_eq!(outcome.accepted, 1);
        }
        let (judged_tx, judged_rx) = std::sync::mpsc::channel::<()>();
        let (rotated_tx, rotated_rx) = std::sync::mpsc::channel::<()>();
        let judged_rx = Mutex::new(judged_rx);
        s.pauses.after_rotation.set(move || {
            rotated_tx.send(()).unwrap();
            // Samples move out only once the writer below has judged its sample.
            judged_rx.lock().unwrap().recv().unwrap();
        });
        let judged_tx = Mutex::new(judged_tx);
        s.pauses.after_judging.set(move || {
            if judged_tx.lock().unwrap().send(()).is_ok() {
                // Time for the flush to move the series' samples out, if nothing stops it.
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let maintainer = {
            let s = s.clone();
            std::thread::spawn(move || s.maintain(t0 + DAY).unwrap())
        };
        rotated_rx.recv().unwrap();
        // Out of order, inside the series' window (2 min behind its latest sample).
        let outcome = s.append(&tenant, &[one("lag", t0 + 60_000)]).await.unwrap();
        assert_eq!(outcome.accepted, 1, "{:?}", outcome.rejected);
        let report = maintainer.join().unwrap();
        assert!(report.blocks_written > 0, "the flush wrote no block");
        let times = |got: Vec<SeriesSamples>| -> Vec<i64> {
            got.into_iter()
                .flat_map(|series| series.samples.into_iter().map(|s| s.t))
                .collect()
        };
        let want = vec![t0, t0 + 60_000, t0 + 120_000];
        let lag = [Matcher::equal("job", "lag")];
        assert_eq!(times(job_series(&s, &lag).await), want, "after the flush");
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert_eq!(times(job_series(&s, &lag).await), want, "after a reopen");
    }

    /// Writers racing on the same series at the same times, each with values of its own:
    /// every (series, time) is accepted exactly once, the rest refused as conflicts, and what
    /// is stored is what the log replays (the log's order is the order samples were judged
    /// and applied in).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writers_racing_on_the_same_series_accept_each_sample_once() {
        const SERIES: i64 = 200;
        const ROUNDS: i64 = 150;
        let dir = tempfile::tempdir().unwrap();
        let s = open_shared(dir.path());
        // Every writer the same series at the same times, each with values of its own.
        let writers = write_rounds(&s, (4, ROUNDS, SERIES), |w, r, k| {
            let labels = Labels::from_trusted(vec![
                Label::new("__name__", "m"),
                Label::new("k", k.to_string()),
            ]);
            let v = (w * 1000 + k) as f64;
            (
                labels,
                Sample {
                    t: 30 * DAY + r * 15_000,
                    v,
                },
            )
        });
        let mut accepted = 0;
        for writer in writers {
            accepted += writer.await.unwrap();
        }
        assert_eq!(accepted as i64, SERIES * ROUNDS, "samples accepted");
        let all = [Matcher::equal("__name__", "m")];
        let before = job_series(&s, &all).await;
        assert_eq!(before.len() as i64, SERIES);
        assert!(before.iter().all(|x| x.samples.len() as i64 == ROUNDS));
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert!(
            job_series(&s, &all).await == before,
            "the log replays other values"
        );
    }

    /// A read sees each request whole or not at all, while writers of other series append
    /// side by side: every request of a writer gives each of its 200 series a sample at the
    /// same time, so in any read all of a writer's series hold the same number of samples.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_read_sees_each_request_whole_or_not_at_all() {
        const WRITERS: i64 = 3;
        let dir = tempfile::tempdir().unwrap();
        let s = open_shared(dir.path());
        // Each writer series of its own, all at one time in a request.
        let writers = write_rounds(&s, (WRITERS, 400, 200), |w, r, k| {
            let labels = Labels::from_trusted(vec![
                Label::new("__name__", "m"),
                Label::new("k", k.to_string()),
                Label::new("w", w.to_string()),
            ]);
            let v = r as f64;
            (
                labels,
                Sample {
                    t: 30 * DAY + r * 15_000,
                    v,
                },
            )
        });
        let (mut reads, mut partial) = (0, Vec::new());
        while !writers.iter().all(|w| w.is_finished()) {
            for w in 0..WRITERS {
                let read = job_series(&s, &[Matcher::equal("w", w.to_string())]).await;
                let counts: BTreeSet<usize> = read.iter().map(|x| x.samples.len()).collect();
                if counts.len() > 1 {
                    partial.push(counts);
                }
                reads += 1;
            }
        }
        for writer in writers {
            assert_eq!(writer.await.unwrap(), 400 * 200, "samples accepted");
        }
        assert!(reads > 20, "only {reads} reads while the writers wrote");
        assert!(
            partial.is_empty(),
            "{} of {reads} reads saw part of a request (samples per series: {:?})",
            partial.len(),
            &partial[..partial.len().min(5)]
        );
    }

    /// A flush that forgets no series leaves its blocks answered from the head alone: a read
    /// does not consult their indexes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocks_stay_answered_by_the_head_while_no_series_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let now = 40 * DAY;
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        s.append(
            &TenantId::default(),
            &[series("up", "a", now - 3 * HOUR, now, 15_000)],
        )
        .await
        .unwrap();
        let report = s.maintain(now).unwrap();
        assert_eq!((report.blocks_written, report.series_dropped), (1, 0));
        assert!(s.blocks_read().blocks.iter().all(|b| b.all_in_head()));
        // Once a series is forgotten, reads consult the indexes.
        let report = s.maintain_with_cutoff(now, i64::MAX).unwrap();
        assert_eq!(report.series_dropped, 1);
        assert!(s.blocks_read().blocks.iter().all(|b| !b.all_in_head()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushed_blocks_answer_like_the_head_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let now = 40 * DAY;
        let batch = vec![
            series("up", "a", now - 6 * HOUR, now, 15_000),
            series("load", "a", now - 5 * HOUR, now - 2 * HOUR, 60_000),
        ];
        let before;
        {
            let s =
                EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
            s.append(&tenant, &batch).await.unwrap();
            before = everything(&s).await;
            let report = s.maintain(now).unwrap();
            // Everything older than an hour behind the newest sample went to disk.
            assert_eq!(report.blocks_written, 1);
            assert_eq!(report.flushed_samples, (5 * 240 + 3 * 60 + 1) as u64);
            assert_eq!(everything(&s).await, before);
            let stats = s.sizes();
            assert_eq!(stats.blocks, 1);
            assert_eq!(stats.block_samples, report.flushed_samples);
            // Samples in the flushed range are refused; later ones are taken.
            let late = s
                .append(
                    &tenant,
                    &[series("up", "a", now - 3 * HOUR, now - 3 * HOUR, 15_000)],
                )
                .await
                .unwrap();
            assert_eq!(late.rejected, [(RejectReason::OutOfOrder, 1)]);
            // Rollups from the block plus the head equal rollups of the raw samples.
            for r in Resolution::ALL {
                let rows = s
                    .select_rollups(
                        &tenant,
                        &[Matcher::equal("job", "a")],
                        r,
                        0,
                        now,
                        RollupColumns::ALL.into(),
                    )
                    .await
                    .unwrap();
                let expected: Vec<Vec<RollupRow>> = before
                    .iter()
                    .map(|s| super::super::rollup(&s.samples, r))
                    .collect();
                assert_eq!(
                    format!("{:?}", rows.iter().map(|s| &s.rows).collect::<Vec<_>>()),
                    format!("{:?}", expected.iter().collect::<Vec<_>>())
                );
            }
        }
        // Reopen: blocks plus the replayed log give the same answer, nothing twice.
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert_eq!(everything(&s).await, before);
        let labels = s
            .series(
                &tenant,
                &SeriesQuery {
                    matcher_sets: vec![vec![Matcher::equal("__name__", "load")]],
                    start: now - 5 * HOUR,
                    end: now - 4 * HOUR,
                    limit: 0,
                },
            )
            .await
            .unwrap();
        assert_eq!(labels.len(), 1, "a series only on disk is found");
    }

    /// (bucket start, count) of the first series' hourly rollup rows over days 0-20.
    async fn hourly_counts(s: &EmbeddedStorage) -> Vec<(i64, f64)> {
        let rows = s
            .select_rollups(
                &TenantId::default(),
                &[],
                Resolution::OneHour,
                0,
                20 * DAY,
                RollupColumns::ALL.into(),
            )
            .await
            .unwrap();
        rows[0].rows.iter().map(|r| (r.t, r.count)).collect()
    }

    /// Raw samples 2 days, 5-minute rollups 3, hourly ones 4.
    fn short_retention() -> RetentionConfig {
        RetentionConfig {
            raw_days: 2,
            rollup_5m_days: 3,
            rollup_1h_days: 4,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_segments_go_compaction_merges_and_retention_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let retention = short_retention();
        let s = EmbeddedStorage::open(dir.path(), &config(), &retention).unwrap();
        let start = 10 * DAY;
        // Six hours a batch, flushing after each: 4 days of data in 16 blocks.
        for i in 0..16 {
            let from = start + i * 6 * HOUR;
            s.append(
                &tenant,
                &[series("up", "a", from, from + 6 * HOUR - 1, 30_000)],
            )
            .await
            .unwrap();
            s.maintain_with_cutoff(start, from + 6 * HOUR).unwrap();
        }
        let all = everything(&s).await;
        assert_eq!(all[0].samples.len(), 16 * 720);
        // Closed days were compacted into one block each.
        let stats = s.sizes();
        assert_eq!(stats.blocks, 4, "one block per day");
        assert_eq!(stats.block_samples, 16 * 720);
        // The log keeps only what is not in blocks: the current segment and a checkpoint.
        let wal_files = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
        assert!(wal_files <= 3, "log segments left: {wal_files}");
        // Retention at day 14: raw of days 10 and 11 leave disk, rollups stay longer.
        let bytes_before = stats.block_bytes;
        // A read under way holds the blocks it reads: retention deletes their files all the
        // same, and the read goes on reading what it holds.
        let held: Vec<Arc<Block>> = s.blocks_read().blocks.clone();
        // The head forgot the series (no sample left in it): the block's index has it.
        assert_eq!(s.sizes().series_in_memory, 0);
        let ids: Vec<u64> = held[0].index.as_ref().unwrap().ids().collect();
        assert_eq!(ids.len(), 1);
        let report = s.maintain_with_cutoff(14 * DAY, i64::MIN).unwrap();
        assert_eq!(report.files_deleted, 2 + 1, "raw of two days, 5m of one");
        assert!(s.sizes().block_bytes < bytes_before);
        assert!(!held[0].file_path(None).exists());
        let mut read = BTreeMap::new();
        held[0]
            .read_samples(&ids, 0, i64::MAX, 0, &mut read)
            .unwrap();
        assert_eq!(read.values().map(Vec::len).sum::<usize>(), 4 * 720);
        assert!(s.blocks_read().blocks[0].chunks.is_none());
        drop(held);
        let left = everything(&s).await;
        assert_eq!(left[0].samples.first().unwrap().t, 12 * DAY);
        let hourly = hourly_counts(&s).await;
        assert_eq!(hourly.first().unwrap().0, 10 * DAY);
        assert_eq!(hourly.len(), 96);
        assert!(hourly.iter().all(|&(_, count)| count == 120.0));
        // A year later everything is gone from disk.
        s.maintain_with_cutoff(400 * DAY, i64::MIN).unwrap();
        assert_eq!(s.sizes().blocks, 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join("blocks"))
                .unwrap()
                .count(),
            0
        );
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &retention).unwrap();
        assert!(everything(&s).await.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rollups_are_written_once_a_day_closes_or_before_raw_retention() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let retention = short_retention();
        let s = EmbeddedStorage::open(dir.path(), &config(), &retention).unwrap();
        let t0 = 10 * DAY;
        s.append(&tenant, &[series("up", "a", t0, t0 + 6 * HOUR - 1, 30_000)])
            .await
            .unwrap();
        // A block of an open day: raw chunks only, rollups read from them.
        s.maintain_with_cutoff(t0 + 7 * HOUR, t0 + 6 * HOUR)
            .unwrap();
        let rollup_files = |s: &EmbeddedStorage| -> Vec<usize> {
            s.blocks_read()
                .blocks
                .iter()
                .map(|b| b.rollups.len())
                .collect()
        };
        assert_eq!(rollup_files(&s), [0]);
        assert_eq!(s.sizes().rollup_bytes, 0);
        let expected: Vec<(i64, f64)> = (0..6).map(|h| (t0 + h * HOUR, 120.0)).collect();
        assert_eq!(hourly_counts(&s).await, expected);
        // No more data comes (the flush cutoff stays behind, the day never closes): once raw
        // retention takes the raw chunks, the block gets its rollups first, and they answer.
        let report = s.maintain_with_cutoff(12 * DAY + HOUR, i64::MIN).unwrap();
        assert_eq!(report.blocks_rolled_up, 0, "{report:?}");
        assert_eq!(rollup_files(&s), [0]);
        let report = s
            .maintain_with_cutoff(12 * DAY + 7 * HOUR, i64::MIN)
            .unwrap();
        assert_eq!(report.blocks_rolled_up, 1, "{report:?}");
        assert_eq!(report.files_deleted, 1, "{report:?}");
        assert_eq!(rollup_files(&s), [2]);
        assert!(s.blocks_read().blocks[0].chunks.is_none());
        assert_eq!(hourly_counts(&s).await, expected);
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &retention).unwrap();
        assert_eq!(hourly_counts(&s).await, expected);
        drop(s);

        // A closed day's lone block gets them beside its raw chunks, once, not rewritten.
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStorage::open(dir.path(), &config(), &retention).unwrap();
        s.append(&tenant, &[series("up", "a", t0, t0 + 6 * HOUR - 1, 30_000)])
            .await
            .unwrap();
        s.maintain_with_cutoff(t0 + 7 * HOUR, t0 + 6 * HOUR)
            .unwrap();
        assert_eq!(rollup_files(&s), [0]);
        let report = s.maintain_with_cutoff(t0 + DAY + HOUR, t0 + DAY).unwrap();
        assert_eq!(report.blocks_rolled_up, 1, "{report:?}");
        assert_eq!(report.blocks_compacted, 0, "{report:?}");
        assert_eq!(rollup_files(&s), [2]);
        assert!(s.sizes().rollup_bytes > 0);
        let report = s
            .maintain_with_cutoff(t0 + DAY + 2 * HOUR, t0 + DAY)
            .unwrap();
        assert_eq!(report.blocks_rolled_up, 0, "{report:?}");
        assert_eq!(report.blocks_compacted, 0, "{report:?}");
        assert_eq!(hourly_counts(&s).await, expected);
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &retention).unwrap();
        assert_eq!(hourly_counts(&s).await, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_blocks_of_an_open_window_merge_and_larger_ones_wait_for_it_to_close() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        let start = 10 * DAY;
        let mut blocks = Vec::new();
        // Half an hour a flush at 30 s: 60 samples a series per block, 4 blocks in one 2 h
        // window (cutoff 0:30, 1:00, 1:30, then 2:00 closes it).
        for i in 0..4 {
            let from = start + i * HOUR / 2;
            s.append(
                &tenant,
                &[
                    series("up", "a", from, from + HOUR / 2 - 1, 30_000),
                    series("up", "b", from, from + HOUR / 2 - 1, 30_000),
                ],
            )
            .await
            .unwrap();
            s.maintain_with_cutoff(start, from + HOUR / 2).unwrap();
            blocks.push(s.sizes().blocks);
        }
        // Two small blocks merge into one of 120 a series; the next small one waits beside
        // it (not rewritten with it); the closed window merges the rest.
        assert_eq!(blocks, [1, 1, 2, 1]);
        let all = everything(&s).await;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].samples.len(), 240);
        assert!(all[0].samples.windows(2).all(|w| w[1].t - w[0].t == 30_000));
        assert_eq!(s.sizes().block_samples, 480);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backfill_s_segments_go_at_the_flush_and_their_newer_samples_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (s, tenant, t0) = backfill_of_two(dir.path(), LOG_COMPACTION_MIN_BYTES).await;
        let first_segment = dir.path().join("wal/00000001.wal");
        let copy = std::fs::read(&first_segment).unwrap();
        let report = s.maintain_with_cutoff(t0, t0 + 3 * HOUR).unwrap();
        assert_eq!(report.flushed_samples, 2 * 3 * 120);
        assert_eq!(report.wal_samples_carried, 2 * 120, "{report:?}");
        assert_eq!(report.wal_segments_deleted, 1);
        assert_eq!(
            wal_files(dir.path()),
            ["00000002.wal", "checkpoint.00000002"]
        );
        s.append(
            &tenant,
            &[series("up", "c", t0 + 3 * HOUR, t0 + 5 * HOUR - 1, 30_000)],
        )
        .await
        .unwrap();
        // The checkpoint's carried samples are carried again as far as they are newer than
        // the new cutoff, before the next segment's.
        let report = s
            .maintain_with_cutoff(t0, t0 + 3 * HOUR + HOUR / 2)
            .unwrap();
        assert_eq!(report.wal_samples_carried, 2 * 60 + 180, "{report:?}");
        assert_eq!(
            wal_files(dir.path()),
            ["00000003.wal", "checkpoint.00000003"]
        );
        // Samples written after the flush, one older than the cutoff of the next.
        s.append(
            &tenant,
            &[series("up", "a", t0 + 4 * HOUR, t0 + 4 * HOUR, 1)],
        )
        .await
        .unwrap();
        let before = all_up(&s).await;
        let counts: Vec<usize> = before.iter().map(|(_, samples)| samples.len()).collect();
        assert_eq!(counts, [481, 480, 240]);
        reopen_as_before(s, dir.path(), (&first_segment, copy), &before).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_after_the_checkpoint_was_damaged_writes_the_head_instead() {
        let dir = tempfile::tempdir().unwrap();
        let (s, tenant, t0) = backfill_of_two(dir.path(), LOG_COMPACTION_MIN_BYTES).await;
        let report = s.maintain_with_cutoff(t0, t0 + 3 * HOUR).unwrap();
        assert_eq!(report.wal_samples_carried, 2 * 120, "{report:?}");
        // The checkpoint's carried samples change on disk; the next flush would carry them
        // in part.
        damage_near_the_end(&dir.path().join("wal/checkpoint.00000002"));
        s.append(
            &tenant,
            &[series("up", "c", t0 + 3 * HOUR, t0 + 5 * HOUR - 1, 30_000)],
        )
        .await
        .unwrap();
        let before = all_up(&s).await;
        let report = s
            .maintain_with_cutoff(t0, t0 + 3 * HOUR + HOUR / 2)
            .unwrap();
        assert_eq!(report.wal_samples_carried, 0, "{report:?}");
        assert_eq!(report.wal_samples_compacted, 2 * 60 + 180, "{report:?}");
        assert_eq!(
            wal_files(dir.path()),
            ["00000003.wal", "checkpoint.00000003"]
        );
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert_eq!(all_up(&s).await, before, "replay differs");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_whose_straddling_segments_are_large_or_damaged_writes_the_head_instead() {
        // Segments as large as a log compaction wants; then a segment whose last record
        // changed on disk after it was written (carrying it would fail every flush).
        for (compaction_bytes, damaged) in [(1, false), (LOG_COMPACTION_MIN_BYTES, true)] {
            let dir = tempfile::tempdir().unwrap();
            let (s, _, t0) = backfill_of_two(dir.path(), compaction_bytes).await;
            if damaged {
                damage_near_the_end(&dir.path().join("wal/00000001.wal"));
            }
            let before = all_up(&s).await;
            let report = s.maintain_with_cutoff(t0, t0 + 3 * HOUR).unwrap();
            assert_eq!(report.flushed_samples, 2 * 3 * 120);
            assert_eq!(report.wal_samples_carried, 0, "{report:?}");
            assert_eq!(report.wal_samples_compacted, 2 * 120, "{report:?}");
            assert_eq!(
                wal_files(dir.path()),
                ["00000002.wal", "checkpoint.00000002"]
            );
            drop(s);
            let s =
                EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
            let after = all_up(&s).await;
            assert_eq!(after, before, "replay differs");
            assert_eq!(after[0].1.len(), 480);
        }
    }

    /// Closes `s`, opens its directory again and checks it reads `before`; then again with
    /// `segment` put back as it was, as a crash between a checkpoint and the deletion of the
    /// segments it replaced leaves them: their samples replay twice, to the same head.
    /// A store (log compaction from `compaction_bytes` of segments) with a backfill of two
    /// series: each request holds 4 hours of its series, so each segment holds samples on
    /// both sides of a cutoff at 3 hours (30 s apart: 120 an hour). (store, tenant, start)
    async fn backfill_of_two(
        dir: &Path,
        compaction_bytes: u64,
    ) -> (EmbeddedStorage, TenantId, i64) {
        let tenant = TenantId::default();
        let mut s = EmbeddedStorage::open(dir, &config(), &RetentionConfig::default()).unwrap();
        s.log_compaction_min_bytes = compaction_bytes;
        let t0 = 10 * DAY;
        for job in ["a", "b"] {
            s.append(&tenant, &[series("up", job, t0, t0 + 4 * HOUR - 1, 30_000)])
                .await
                .unwrap();
        }
        (s, tenant, t0)
    }

    /// Changes a byte of a log file's last record, as a disk might after it was written.
    fn damage_near_the_end(path: &Path) {
        let mut bytes = std::fs::read(path).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 0x55;
        std::fs::write(path, &bytes).unwrap();
    }

    async fn reopen_as_before(
        s: EmbeddedStorage,
        dir: &Path,
        segment: (&Path, Vec<u8>),
        before: &[(String, Vec<(i64, u64)>)],
    ) {
        drop(s);
        let s = EmbeddedStorage::open(dir, &config(), &RetentionConfig::default()).unwrap();
        assert_eq!(all_up(&s).await, before, "replay differs");
        drop(s);
        std::fs::write(segment.0, segment.1).unwrap();
        let s = EmbeddedStorage::open(dir, &config(), &RetentionConfig::default()).unwrap();
        assert_eq!(all_up(&s).await, before, "replay twice differs");
    }

    /// The names in `dir`'s log directory, sorted.
    fn wal_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Every series of metric `up`, by job: (job, samples as (time, value bits)).
    async fn all_up(s: &EmbeddedStorage) -> Vec<(String, Vec<(i64, u64)>)> {
        let hints = SelectHints {
            start: i64::MIN,
            end: i64::MAX,
            ..SelectHints::default()
        };
        let matchers = [Matcher::equal("__name__", "up")];
        let mut back = s
            .select(&TenantId::default(), &matchers, &hints)
            .await
            .unwrap();
        back.sort_by(|a, b| a.labels.cmp(&b.labels));
        back.into_iter()
            .map(|s| {
                let samples = s.samples.iter().map(|p| (p.t, p.v.to_bits())).collect();
                (s.labels.get("job").unwrap().to_owned(), samples)
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compacted_log_keeps_the_head_s_samples_in_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let mut s =
            EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        s.log_compaction_min_bytes = 1;
        let (t0, minute) = (10 * DAY, 60_000);
        for job in ["a", "b", "c"] {
            s.append(&tenant, &[series("up", job, t0, t0 + 50 * minute, 15_000)])
                .await
                .unwrap();
        }
        // Values the sample encoding keeps bit for bit: a staleness marker, a long fraction
        // (newer than the flush below: they stay in the head and in the checkpoints).
        let mut odd = series("up", "d", t0 + 40 * minute, t0 + 42 * minute, minute);
        odd.samples[1].v = f64::from_bits(crate::model::STALE_NAN_BITS);
        odd.samples[2].v = 0.1 + 0.2;
        s.append(&tenant, &[odd]).await.unwrap();
        let first_segment = dir.path().join("wal/00000001.wal");
        let copy = std::fs::read(&first_segment).unwrap();
        let mut report = MaintenanceReport::default();
        s.compact_log(&mut report).unwrap();
        assert_eq!(report.wal_samples_compacted, 3 * 201 + 3, "{report:?}");
        assert_eq!(report.wal_segments_deleted, 1);
        assert_eq!(
            wal_files(dir.path()),
            ["00000002.wal", "checkpoint.00000002"]
        );
        // Nothing logged since: nothing to compact; then below the bound.
        let mut again = MaintenanceReport::default();
        s.compact_log(&mut again).unwrap();
        // A series on both sides of the next flush's cutoff (40 samples older, 121 not).
        s.append(
            &tenant,
            &[series(
                "up",
                "e",
                t0 + 20 * minute,
                t0 + 60 * minute,
                15_000,
            )],
        )
        .await
        .unwrap();
        s.log_compaction_min_bytes = u64::MAX;
        s.compact_log(&mut again).unwrap();
        assert_eq!(again, MaintenanceReport::default());
        // A flush then carries the compacted samples newer than its cutoff, and the
        // straddling segment's.
        let report = s.maintain_with_cutoff(t0, t0 + 30 * minute).unwrap();
        assert_eq!(report.flushed_samples, 3 * 120 + 40);
        assert_eq!(report.wal_samples_carried, 3 * 81 + 3 + 121, "{report:?}");
        assert_eq!(
            wal_files(dir.path()),
            ["00000003.wal", "checkpoint.00000003"]
        );
        // A flush that can delete no segment (all of the one closed holds newer samples)
        // keeps the checkpoint there is rather than rewrite it.
        s.append(
            &tenant,
            &[series(
                "up",
                "a",
                t0 + 61 * minute,
                t0 + 65 * minute,
                15_000,
            )],
        )
        .await
        .unwrap();
        let report = s.maintain_with_cutoff(t0, t0 + 31 * minute).unwrap();
        assert_eq!(report.flushed_samples, 4 * 4, "{report:?}");
        assert_eq!(report.wal_samples_carried, 0, "{report:?}");
        assert_eq!(
            wal_files(dir.path()),
            ["00000003.wal", "00000004.wal", "checkpoint.00000003"]
        );
        let before = all_up(&s).await;
        let counts: Vec<usize> = before.iter().map(|(_, samples)| samples.len()).collect();
        assert_eq!(counts, [218, 201, 201, 3, 161]);
        assert_eq!(before[3].1[1].1, crate::model::STALE_NAN_BITS);
        reopen_as_before(s, dir.path(), (&first_segment, copy), &before).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_log_is_compacted_sooner() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let mut s =
            EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert!(s.log_quiet_after >= maintain::QUIET_MIN);
        s.log_compaction_min_bytes = 16;
        let (t0, minute) = (10 * DAY, 60_000);
        for job in ["a", "b", "c"] {
            s.append(&tenant, &[series("up", job, t0, t0 + 50 * minute, 15_000)])
                .await
                .unwrap();
        }
        // As if the last compaction's checkpoint took two thirds of the log: the usual bound
        // (twice that) is not met, the quiet one (one and a half times) is.
        let logged = s.wal.lock().unwrap().segment_bytes();
        s.log_compacted_bytes
            .store(logged * 2 / 3, Ordering::Relaxed);
        let mut report = MaintenanceReport::default();
        let compact = |s: &EmbeddedStorage| {
            let mut report = MaintenanceReport::default();
            s.compact_log(&mut report).unwrap();
            report.wal_samples_compacted
        };
        // The maintenance that sees the writes finds the log busy; the next finds it quiet,
        // but not for long enough.
        assert_eq!(compact(&s), 0);
        assert_eq!(compact(&s), 0);
        assert_eq!(wal_files(dir.path()), ["00000001.wal"]);
        assert_eq!(s.sizes().log_compactions, 0);
        // Quiet for long enough (here at once), and large enough.
        s.log_quiet_after = Duration::ZERO;
        s.compact_log(&mut report).unwrap();
        assert_eq!(report.wal_samples_compacted, 3 * 201, "{report:?}");
        assert_eq!(s.sizes().log_compactions, 1);
        assert_eq!(
            wal_files(dir.path()),
            ["00000002.wal", "checkpoint.00000002"]
        );
        // Quiet still, with nothing logged: nothing to do.
        assert_eq!(compact(&s), 0);
        // The log (segments and checkpoint) under one and a half times the last compaction's
        // checkpoint (as if it took a megabyte): busy, then quiet but too small.
        s.log_compacted_bytes.store(1 << 20, Ordering::Relaxed);
        s.append(&tenant, &[series("up", "d", t0, t0 + 10 * minute, 15_000)])
            .await
            .unwrap();
        assert_eq!(compact(&s), 0);
        assert_eq!(compact(&s), 0);
        assert_eq!(
            wal_files(dir.path()),
            ["00000002.wal", "checkpoint.00000002"]
        );
        // The samples all come back after a restart.
        let before = all_up(&s).await;
        assert_eq!(before.len(), 4);
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert_eq!(all_up(&s).await, before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_compactions_among_writers_lose_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s =
            EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        s.log_compaction_min_bytes = 1;
        let s = Arc::new(s);
        fn sample(w: i64, r: i64, k: i64) -> (Labels, Sample) {
            let labels = Labels::from_trusted(vec![
                Label::new("__name__", "up"),
                Label::new("instance", k.to_string()),
                Label::new("job", w.to_string()),
            ]);
            let v = (w * 1_000_000 + r * 100 + k) as f64;
            (
                labels,
                Sample {
                    t: 10 * DAY + r * 1000,
                    v,
                },
            )
        }
        let writers = write_rounds(&s, (3, 300, 50), sample);
        let done = Arc::new(AtomicBool::new(false));
        let compactor = {
            let (s, done) = (s.clone(), done.clone());
            tokio::spawn(async move {
                let mut report = MaintenanceReport::default();
                while !done.load(Ordering::Relaxed) {
                    s.compact_log(&mut report).unwrap();
                    tokio::task::yield_now().await;
                }
                report
            })
        };
        let mut accepted = 0;
        for w in writers {
            accepted += w.await.unwrap();
        }
        assert_eq!(accepted, 3 * 300 * 50);
        done.store(true, Ordering::Relaxed);
        let report = compactor.await.unwrap();
        assert!(report.wal_segments_deleted >= 3, "{report:?}");
        drop(s);
        let s = open_shared(dir.path());
        let hints = SelectHints {
            start: i64::MIN,
            end: i64::MAX,
            ..SelectHints::default()
        };
        let back = s
            .select(
                &TenantId::default(),
                &[Matcher::equal("__name__", "up")],
                &hints,
            )
            .await
            .unwrap();
        let mut count = 0;
        for series in &back {
            let w: i64 = series.labels.get("job").unwrap().parse().unwrap();
            let k: i64 = series.labels.get("instance").unwrap().parse().unwrap();
            for p in &series.samples {
                let r = (p.t - 10 * DAY) / 1000;
                assert_eq!(p.v, sample(w, r, k).1.v, "{}", series.labels);
                count += 1;
            }
        }
        assert_eq!(count, accepted);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn samples_gone_by_retention_stay_gone_when_their_log_segment_remains() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let retention = RetentionConfig {
            raw_days: 1,
            ..RetentionConfig::default()
        };
        let s = EmbeddedStorage::open(dir.path(), &config(), &retention).unwrap();
        // Old samples and, in the same log segment, one far in the future: the segment
        // cannot be deleted, and raw retention then deletes the old samples' block.
        s.append(&tenant, &[series("up", "a", 0, HOUR, 60_000)])
            .await
            .unwrap();
        s.append(&tenant, &[series("far", "a", 100 * DAY, 100 * DAY, 60_000)])
            .await
            .unwrap();
        s.maintain_with_cutoff(0, 2 * HOUR).unwrap();
        s.maintain_with_cutoff(10 * DAY, i64::MIN).unwrap();
        assert_eq!(s.sizes().block_samples, 0, "raw data past retention left");
        drop(s);
        let s = EmbeddedStorage::open(dir.path(), &config(), &retention).unwrap();
        let hints = SelectHints {
            start: i64::MIN,
            end: 50 * DAY,
            ..SelectHints::default()
        };
        let back = s
            .select(&tenant, &[Matcher::equal("__name__", "up")], &hints)
            .await
            .unwrap();
        assert!(back.is_empty(), "replay brought back {back:?}");
    }

    /// Copies every block directory (one level of files) from `from` into `to`.
    fn copy_blocks(from: &Path, to: &Path) {
        for block in std::fs::read_dir(from).unwrap() {
            let block = block.unwrap();
            let target = to.join(block.file_name());
            std::fs::create_dir(&target).unwrap();
            for file in std::fs::read_dir(block.path()).unwrap() {
                let file = file.unwrap();
                std::fs::copy(file.path(), target.join(file.file_name())).unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocks_a_compaction_replaced_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        for i in 0..2 {
            let from = i * HOUR;
            s.append(&tenant, &[series("up", "a", from, from + HOUR - 1, 30_000)])
                .await
                .unwrap();
            s.maintain_with_cutoff(0, from + HOUR - 1).unwrap();
        }
        // Before the window closes: two blocks. Keep copies of them, then compact.
        let blocks = dir.path().join("blocks");
        let copies = tempfile::tempdir().unwrap();
        copy_blocks(&blocks, copies.path());
        let report = s.maintain_with_cutoff(0, 10 * HOUR).unwrap();
        assert_eq!(report.blocks_compacted, 2);
        let before = everything(&s).await;
        drop(s);
        // A crash before the sources were deleted: they are back beside the merged block.
        copy_blocks(copies.path(), &blocks);
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert_eq!(s.sizes().blocks, 1);
        assert_eq!(everything(&s).await, before);
        let rows = s
            .select_rollups(
                &tenant,
                &[],
                Resolution::OneHour,
                0,
                10 * HOUR,
                RollupColumns::ALL.into(),
            )
            .await
            .unwrap();
        assert!(
            rows[0].rows.iter().all(|r| r.count == 120.0),
            "no double counting"
        );
    }

    /// The one block directory under `dir`.
    fn only_block(dir: &Path) -> PathBuf {
        std::fs::read_dir(dir.join("blocks"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    }

    /// Flips the byte of a run file at `at` (0..1) of the way through its runs, before its
    /// index: the frame holding it fails its checksum.
    fn flip_a_runs_byte(path: &Path, at: f64) {
        let mut bytes = std::fs::read(path).unwrap();
        let footer = &bytes[bytes.len() - 32..];
        let index_offset = u64::from_le_bytes(footer[..8].try_into().unwrap()) as usize;
        bytes[(index_offset as f64 * at) as usize] ^= 0xff;
        std::fs::write(path, &bytes).unwrap();
    }

    /// Writes 300 series of two hours into `dir` and flushes them to one block.
    async fn write_one_block_of_300_series(dir: &Path, tenant: &TenantId) {
        let s = EmbeddedStorage::open(dir, &config(), &RetentionConfig::default()).unwrap();
        let batch: Vec<SeriesWrite> = (0..300)
            .map(|i| series("up", &format!("j{i}"), 0, 2 * HOUR, 60_000))
            .collect();
        s.append(tenant, &batch).await.unwrap();
        s.maintain_with_cutoff(0, i64::MAX).unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_damaged_series_index_answers_from_what_it_still_holds() {
        let tenant = TenantId::default();
        let hints = || SelectHints {
            start: i64::MIN,
            end: i64::MAX,
            ..SelectHints::default()
        };
        // A byte flipped at several places of the index (series runs, tables): every time
        // the read succeeds, and whatever it lacks is said in a warning.
        for at in [0.2, 0.5, 0.8, 0.95] {
            let dir = tempfile::tempdir().unwrap();
            write_one_block_of_300_series(dir.path(), &tenant).await;
            flip_a_runs_byte(&only_block(dir.path()).join(index::FILE_NAME), at);
            let s =
                EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
            assert_eq!(
                s.sizes().series_in_memory,
                0,
                "the series live in the index"
            );
            let hints = hints();
            let read = s
                .select(
                    &tenant,
                    &[Matcher::regex("job", "j.*", false).unwrap()],
                    &hints,
                )
                .await
                .unwrap();
            let warnings = hints.warnings.take();
            assert!(
                read.len() == 300 || (!read.is_empty() && !warnings.is_empty()),
                "at {at}: {} series, warnings {warnings:?}",
                read.len()
            );
            let values = s
                .label_values(
                    &tenant,
                    "job",
                    &SeriesQuery {
                        matcher_sets: vec![],
                        start: i64::MIN,
                        end: i64::MAX,
                        limit: 0,
                    },
                )
                .await
                .unwrap();
            assert!(values.len() >= read.len(), "at {at}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_damaged_run_met_by_a_read_is_reported_as_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        write_one_block_of_300_series(dir.path(), &tenant).await;
        let block = only_block(dir.path());
        // Flip a byte in the middle of the runs: the frame holding it fails its checksum.
        flip_a_runs_byte(&block.join("chunks"), 0.5);
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        let hints = SelectHints {
            start: i64::MIN,
            end: i64::MAX,
            ..SelectHints::default()
        };
        let read = s
            .select(&tenant, &[Matcher::equal("__name__", "up")], &hints)
            .await
            .unwrap();
        assert!(
            read.len() < 300,
            "{} series: nothing was skipped",
            read.len()
        );
        assert!(!read.is_empty());
        let warnings = hints.warnings.take();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("damaged block runs skipped"),
            "{warnings:?}"
        );
        drop(s);

        // The same in the block's 5-minute rollups.
        flip_a_runs_byte(&block.join(Resolution::FiveMinutes.name()), 0.5);
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        let read: RollupRead = RollupColumns::ALL.into();
        let rows = s
            .select_rollups(
                &tenant,
                &[Matcher::equal("__name__", "up")],
                Resolution::FiveMinutes,
                0,
                2 * HOUR,
                read.clone(),
            )
            .await
            .unwrap();
        assert!(
            rows.len() < 300 && !rows.is_empty(),
            "{} series",
            rows.len()
        );
        let warnings = read.warnings.take();
        assert!(
            warnings.iter().any(|w| w.contains("lack rollups")),
            "{warnings:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_block_file_is_recovered_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::default();
        write_one_block_of_300_series(dir.path(), &tenant).await;
        let blocks: Vec<PathBuf> = std::fs::read_dir(dir.path().join("blocks"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let chunks = blocks[0].join("chunks");
        // Cut halfway through the runs (the footer's first field is where the index starts).
        let bytes = std::fs::read(&chunks).unwrap();
        let footer = &bytes[bytes.len() - 32..];
        let index_offset = u64::from_le_bytes(footer[..8].try_into().unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&chunks)
            .unwrap()
            .set_len(index_offset / 2)
            .unwrap();
        let s = EmbeddedStorage::open(dir.path(), &config(), &RetentionConfig::default()).unwrap();
        assert!(s.damaged_bytes_recovered() > 0);
        let hints = SelectHints {
            start: i64::MIN,
            end: i64::MAX,
            ..SelectHints::default()
        };
        let left = s
            .select(&tenant, &[Matcher::equal("__name__", "up")], &hints)
            .await
            .unwrap();
        assert!(
            left.len() > 100 && left.len() < 300,
            "the intact half is kept: {}",
            left.len()
        );
        assert!(left.iter().all(|s| s.samples.len() == 121));
        // The recovered runs keep their real time ranges: later samples are still taken.
        let later: Vec<SeriesWrite> = left
            .iter()
            .map(|x| SeriesWrite {
                labels: x.labels.clone(),
                samples: vec![Sample {
                    t: 3 * HOUR,
                    v: 1.0,
                }],
            })
            .collect();
        let outcome = s.append(&tenant, &later).await.unwrap();
        assert_eq!(outcome.accepted, left.len());
    }
}
