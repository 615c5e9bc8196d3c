//! The embedded storage engine, SecuMon's zero-setup default (`--storage ./data`).
//!
//! Writes go to a write-ahead log (`wal.rs`) and are acknowledged only once logged (and
//! fsynced, by policy); the in-memory head (`head.rs`) is rebuilt from the log on start.
//! This first version keeps every sample in memory and in the log: compressed chunks,
//! compaction, rollups and retention are still to come (docs/storage.md).

mod chunk;
mod head;
mod wal;

pub use wal::FsyncPolicy;

use super::{
    AppendOutcome, ExemplarWrite, RejectReason, SelectHints, SeriesQuery, SeriesWrite, Storage,
    StorageError, StorageResult,
};
use crate::model::{
    Labels, Matcher, MetricMetadata, Sample, SeriesExemplars, SeriesSamples, TenantId,
};
use async_trait::async_trait;
use head::{insert_sample, place, place_sorted, Head, Placement, SampleStore};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Mutex, RwLock};
use wal::{Record, Wal};

/// Settings of the embedded engine (`[embedded]` in the config file).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// When writes reach the disk: `always` (fsync before acknowledging) or `never` (leave it
    /// to the OS: survives a process crash, not a power loss).
    pub fsync: FsyncPolicy,
    /// How far behind a series' latest sample a new sample may be, in seconds.
    pub out_of_order_window_secs: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::Always,
            out_of_order_window_secs: 3600,
        }
    }
}

pub struct EmbeddedStorage {
    head: RwLock<Head>,
    /// Serialises writers: classification, logging and applying happen in one order.
    wal: Mutex<Wal>,
    window_ms: i64,
    /// Bytes cut off a damaged log tail when opening.
    damaged_bytes: u64,
}

fn io_error(e: std::io::Error) -> StorageError {
    // A full disk or unwritable directory may clear up: clients retry.
    StorageError::Unavailable(format!("write-ahead log: {e}"))
}

impl EmbeddedStorage {
    /// Opens (or creates) the data directory and replays the log.
    pub fn open(dir: &Path, config: &EmbeddedConfig) -> StorageResult<EmbeddedStorage> {
        let mut head = Head::default();
        let (wal, report) = Wal::open(&dir.join("wal"), config.fsync, |record| {
            apply(&mut head, record)
        })
        .map_err(|e| StorageError::Internal(format!("cannot open {}: {e}", dir.display())))?;
        if let Some((path, bytes)) = &report.truncated {
            tracing::warn!(
                segment = %path.display(),
                bytes_cut = bytes,
                "write-ahead log damaged: replayed up to the last intact record and cut the rest"
            );
        }
        tracing::info!(
            records = report.records,
            series = head.series.len(),
            dir = %dir.display(),
            "embedded storage opened"
        );
        Ok(EmbeddedStorage {
            head: RwLock::new(head),
            wal: Mutex::new(wal),
            window_ms: config.out_of_order_window_secs as i64 * 1000,
            damaged_bytes: report.truncated.as_ref().map_or(0, |(_, bytes)| *bytes),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Head> {
        self.head.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Head> {
        self.head.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Series ids for label sets, with the records of the new ones (ids not yet taken).
    fn resolve(
        &self,
        head: &Head,
        tenant: &str,
        labels: &[&Labels],
        records: &mut Vec<Record>,
    ) -> Vec<u64> {
        let index = head.tenants.get(tenant);
        let mut fresh: HashMap<u128, u64> = HashMap::new();
        let mut next = head.next_id;
        labels
            .iter()
            .map(|labels| {
                let fp = labels.fingerprint();
                if let Some(&id) = index.and_then(|i| i.by_fingerprint.get(&fp)) {
                    return id;
                }
                *fresh.entry(fp).or_insert_with(|| {
                    let id = next;
                    next += 1;
                    records.push(Record::Series {
                        tenant: tenant.to_owned(),
                        id,
                        labels: (*labels).clone(),
                    });
                    id
                })
            })
            .collect()
    }

    /// Logs `records` (durably, by policy), then applies them to the head.
    fn commit(&self, wal: &mut Wal, records: Vec<Record>) -> StorageResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        tokio::task::block_in_place(|| wal.append(&records)).map_err(io_error)?;
        let mut head = self.write();
        for record in records {
            apply(&mut head, record);
        }
        Ok(())
    }

    fn append_sync(
        &self,
        tenant: &TenantId,
        batch: &[SeriesWrite],
    ) -> StorageResult<AppendOutcome> {
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        let mut outcome = AppendOutcome::default();
        let mut records = Vec::new();
        let mut accepted: Vec<(u64, i64, f64)> = Vec::new();
        {
            let head = self.read();
            let labels: Vec<&Labels> = batch.iter().map(|s| &s.labels).collect();
            let ids = self.resolve(&head, tenant.as_str(), &labels, &mut records);
            // Samples of this batch per series, to judge repeats inside the batch too.
            let mut pending: HashMap<u64, Vec<Sample>> = HashMap::new();
            for (series, &id) in batch.iter().zip(&ids) {
                let empty = SampleStore::default();
                let stored = head.series.get(&id).map_or(&empty, |s| &s.samples);
                for sample in &series.samples {
                    let mine = pending.entry(id).or_default();
                    let placement = match place(stored, sample, self.window_ms) {
                        Placement::Insert => place_sorted(mine, sample),
                        other => other,
                    };
                    match placement {
                        Placement::Insert => {
                            insert_sample(mine, *sample);
                            accepted.push((id, sample.t, sample.v));
                            outcome.accepted += 1;
                        }
                        Placement::Duplicate => outcome.accepted += 1,
                        Placement::Conflict => outcome.reject(RejectReason::DuplicateTimestamp, 1, || {
                            format!(
                                "duplicate sample for timestamp {} with a different value, series {}",
                                sample.t, series.labels
                            )
                        }),
                        Placement::TooOld => outcome.reject(RejectReason::OutOfOrder, 1, || {
                            format!(
                                "out of order sample: timestamp {} is older than the out-of-order window, series {}",
                                sample.t, series.labels
                            )
                        }),
                    }
                }
            }
        }
        if !accepted.is_empty() {
            records.push(Record::Samples { samples: accepted });
        }
        self.commit(&mut wal, records)?;
        Ok(outcome)
    }

    fn series_ids(&self, head: &Head, tenant: &TenantId, query: &SeriesQuery) -> Vec<u64> {
        let mut ids: BTreeSet<u64> = BTreeSet::new();
        if query.matcher_sets.is_empty() {
            ids.extend(head.matching(tenant.as_str(), &[]));
        }
        for set in &query.matcher_sets {
            ids.extend(head.matching(tenant.as_str(), set));
        }
        ids.into_iter()
            .filter(|&id| head.has_samples(id, query.start, query.end))
            .collect()
    }
}

/// Applies one log record to the head (on replay and after logging).
fn apply(head: &mut Head, record: Record) {
    match record {
        Record::Series { tenant, id, labels } => {
            if !head.series.contains_key(&id) {
                head.create_series(&tenant, id, labels);
            }
        }
        Record::Samples { samples } => {
            for (id, t, v) in samples {
                if let Some(series) = head.series.get_mut(&id) {
                    series.samples.insert(Sample { t, v });
                }
            }
        }
        Record::Metadata { tenant, metadata } => head.add_metadata(&tenant, metadata),
        Record::Exemplars { exemplars } => {
            for (id, t, value, labels) in exemplars {
                if let Some(series) = head.series.get_mut(&id) {
                    if !series.exemplars.iter().any(|e| e.t == t) {
                        let at = series.exemplars.partition_point(|e| e.t < t);
                        series
                            .exemplars
                            .insert(at, crate::model::Exemplar { labels, value, t });
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Storage for EmbeddedStorage {
    async fn append(
        &self,
        tenant: &TenantId,
        batch: &[SeriesWrite],
    ) -> StorageResult<AppendOutcome> {
        self.append_sync(tenant, batch)
    }

    async fn append_metadata(
        &self,
        tenant: &TenantId,
        metadata: &[MetricMetadata],
    ) -> StorageResult<()> {
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        let records: Vec<Record> = {
            let head = self.read();
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
        self.commit(&mut wal, records)
    }

    async fn append_exemplars(
        &self,
        tenant: &TenantId,
        batch: &[ExemplarWrite],
    ) -> StorageResult<()> {
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        let mut records = Vec::new();
        let exemplars: Vec<(u64, i64, f64, Labels)> = {
            let head = self.read();
            let labels: Vec<&Labels> = batch.iter().map(|w| &w.series).collect();
            let ids = self.resolve(&head, tenant.as_str(), &labels, &mut records);
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
        self.commit(&mut wal, records)
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
        out.sort_by(|a, b| a.labels.cmp(&b.labels));
        Ok(out)
    }

    async fn select(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        hints: &SelectHints,
    ) -> StorageResult<Vec<SeriesSamples>> {
        let head = self.read();
        let mut loaded = 0usize;
        let mut out = Vec::new();
        for id in head.matching(tenant.as_str(), matchers) {
            let Some(series) = head.series.get(&id) else {
                continue;
            };
            let samples = series.samples.range(hints.start, hints.end);
            if samples.is_empty() {
                continue;
            }
            loaded += samples.len();
            if hints.max_samples > 0 && loaded > hints.max_samples {
                return Err(StorageError::TooManySamples);
            }
            out.push(SeriesSamples {
                labels: series.labels.clone(),
                samples,
            });
        }
        out.sort_by(|a, b| a.labels.cmp(&b.labels));
        Ok(out)
    }

    async fn series(&self, tenant: &TenantId, query: &SeriesQuery) -> StorageResult<Vec<Labels>> {
        let head = self.read();
        let mut out: Vec<Labels> = self
            .series_ids(&head, tenant, query)
            .into_iter()
            .filter_map(|id| head.series.get(&id).map(|s| s.labels.clone()))
            .collect();
        out.sort();
        if query.limit > 0 {
            out.truncate(query.limit);
        }
        Ok(out)
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
        self.damaged_bytes
    }
}
