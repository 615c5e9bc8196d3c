//! Appending: series resolved, records logged, then applied to the head, in one order.

use super::open::apply;
use super::*;

impl EmbeddedStorage {
    /// Series ids for the series of a batch, with the records of the new ones; only a new
    /// series' labels are copied. A series the head forgot but a block holds comes back with
    /// its id, and with its samples up to its latest one in blocks refused as out of order
    /// (its entry in `returning`); any other new series gets an id not taken yet.
    pub(super) fn resolve(
        &self,
        head: &Head,
        tenant: &str,
        batch: &WriteBatch,
        records: &mut Vec<Record>,
        returning: &mut HashMap<u64, TimestampMs>,
    ) -> StorageResult<Vec<u64>> {
        let index = head.tenants.get(tenant);
        let mut fresh: HashMap<u128, u64> = HashMap::default();
        let mut next = head.next_id;
        // Blocks whose series are not all in the head, newest first (read order).
        let mut beyond: Option<Vec<Arc<Block>>> = None;
        let mut marks = Vec::new();
        let mut failed: Option<std::io::Error> = None;
        let ids = batch
            .iter()
            .map(|series| {
                let fp = series.fingerprint;
                if let Some(&id) = index.and_then(|i| i.by_fingerprint.get(&fp)) {
                    return id;
                }
                *fresh.entry(fp).or_insert_with(|| {
                    let labels = series.labels.to_labels();
                    let blocks = beyond.get_or_insert_with(|| {
                        let set = self.blocks_read();
                        set.blocks
                            .iter()
                            .rev()
                            .filter(|b| b.index_beyond_head().is_some())
                            .cloned()
                            .collect()
                    });
                    let mut found = None;
                    for block in blocks.iter() {
                        let Some(index) = block.index_beyond_head() else {
                            continue;
                        };
                        match index.find(tenant, fp, &labels) {
                            Ok(Some(id)) => {
                                found = Some((id, block.latest_sample_of(id)));
                                break;
                            }
                            Ok(None) => {}
                            // Unknown whether the series is there: a new id could make two
                            // series of one label set. The sender retries.
                            Err(e) => {
                                failed.get_or_insert(e);
                                break;
                            }
                        }
                    }
                    let id = match found {
                        Some((id, until)) => {
                            returning.insert(id, until);
                            marks.push((id, until));
                            id
                        }
                        None => {
                            next += 1;
                            next - 1
                        }
                    };
                    records.push(Record::Series {
                        tenant: tenant.to_owned(),
                        id,
                        labels,
                    });
                    id
                })
            })
            .collect();
        if let Some(e) = failed {
            return Err(StorageError::Unavailable(format!(
                "reading a block's series index: {e}"
            )));
        }
        if !marks.is_empty() {
            records.push(Record::Flushed { marks });
        }
        Ok(ids)
    }

    /// Logs `records` and applies them to the head with the log held (so the next writer
    /// judges its samples against these), then lets the log go and waits until the records
    /// are durable (by policy) before the caller acknowledges: concurrent writers share one
    /// fsync (group commit). If that fsync fails the log refuses writes until a restart, so
    /// nothing is acknowledged that a restart would not find.
    pub(super) fn commit(
        &self,
        mut wal: std::sync::MutexGuard<'_, Wal>,
        records: Vec<Record>,
    ) -> StorageResult<()> {
        let end = if records.is_empty() {
            // Nothing new, but what this request repeats may still be waiting for its fsync.
            wal.end()
        } else {
            tokio::task::block_in_place(|| wal.append(&records)).map_err(io_error)?
        };
        if !records.is_empty() {
            let mut head = self.write();
            let none = HashMap::default();
            for record in records {
                apply(&mut head, record, &none);
            }
        }
        let (policy, syncer) = (wal.fsync_policy(), wal.syncer());
        drop(wal);
        if policy == FsyncPolicy::Always {
            tokio::task::block_in_place(|| syncer.sync_to(end)).map_err(io_error)?;
        }
        Ok(())
    }

    pub(super) fn append_sync(
        &self,
        tenant: &TenantId,
        batch: &WriteBatch,
    ) -> StorageResult<AppendOutcome> {
        let wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        let mut outcome = AppendOutcome::default();
        let mut records = Vec::new();
        let mut accepted: Vec<(u64, i64, f64)> = Vec::new();
        {
            let head = self.read();
            let mut returning = HashMap::default();
            let ids = self.resolve(&head, tenant.as_str(), batch, &mut records, &mut returning)?;
            // Samples of this batch per series, to judge repeats inside the batch too; only
            // needed for a series that comes twice or whose samples are not strictly in order.
            let mut pending: HashMap<u64, Vec<Sample>> = HashMap::default();
            let mut occurrences: HashMap<u64, u32> = HashMap::default();
            for &id in &ids {
                *occurrences.entry(id).or_default() += 1;
            }
            accepted.reserve(batch.sample_count());
            let empty = SampleStore::default();
            for (series, &id) in batch.iter().zip(&ids) {
                let (stored, flushed_until) = head.series.get(&id).map_or_else(
                    || (&empty, returning.get(&id).copied().unwrap_or(i64::MIN)),
                    |s| (&s.samples, s.flushed_until),
                );
                let simple = occurrences.get(&id) == Some(&1)
                    && series.samples.windows(2).all(|w| w[0].t < w[1].t);
                for sample in series.samples {
                    let placement = match place(stored, flushed_until, sample, self.window_ms) {
                        Placement::Insert if simple => Placement::Insert,
                        Placement::Insert => place_sorted(pending.entry(id).or_default(), sample),
                        other => other,
                    };
                    match placement {
                        Placement::Insert => {
                            if !simple {
                                insert_sample(pending.entry(id).or_default(), *sample);
                            }
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
        #[cfg(test)]
        self.pauses.after_judging.run();
        if !accepted.is_empty() {
            records.push(Record::Samples { samples: accepted });
        }
        self.commit(wal, records)?;
        Ok(outcome)
    }
}
