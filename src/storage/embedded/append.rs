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

    /// Appends a batch. When the head holds every series of it (the usual case), the head is
    /// held shared: each of its series is locked (in id order, so writers never wait on each
    /// other in a circle) while its samples are judged, the batch's record is logged, and
    /// the accepted samples are applied; writers of other series do the same side by side,
    /// and only the log's write itself is one at a time. A batch with a series new to the
    /// head holds the head alone. Either way a series' samples are judged, logged and applied
    /// in one order, and maintenance (which holds the head alone) never comes in between.
    /// The log's fsync starts as soon as the record is written (the flusher thread's), and,
    /// with no lock held, the writer then waits, as a task, until its records are durable
    /// (by policy) before the caller acknowledges: concurrent writers share one fsync (group
    /// commit).
    pub(super) async fn append_and_sync(
        &self,
        tenant: &TenantId,
        batch: &WriteBatch,
    ) -> StorageResult<AppendOutcome> {
        let (outcome, logged) = self.append_logged(tenant, batch)?;
        self.durable(logged).await?;
        Ok(outcome)
    }

    /// [`EmbeddedStorage::append_and_sync`] up to the wait for durability: the outcome and where the
    /// log's write ended.
    fn append_logged(
        &self,
        tenant: &TenantId,
        batch: &WriteBatch,
    ) -> StorageResult<(AppendOutcome, Logged)> {
        let known = {
            let head = self.read();
            match known_ids(&head, tenant.as_str(), batch) {
                Some(ids) => self.append_known(&head, batch, &ids)?,
                None => None,
            }
        };
        if let Some(known) = known {
            return Ok(known);
        }
        let head = self.write();
        let mut records = Vec::new();
        let mut returning = HashMap::default();
        let ids = self.resolve(&head, tenant.as_str(), batch, &mut records, &mut returning)?;
        let (outcome, accepted, _) = {
            let held = lock_series(&head, &ids);
            self.judge(batch, &ids, &held, &returning)
        };
        #[cfg(test)]
        self.pauses.after_judging.run();
        if !accepted.is_empty() {
            records.push(Record::Samples { samples: accepted });
        }
        Ok((outcome, self.commit(head, records)?))
    }

    /// [`EmbeddedStorage::append_and_sync`] of a batch whose series the head all holds (`ids`),
    /// with the head shared: returns the outcome and where the log's write ended (`None` if
    /// the head no longer holds one of the series).
    fn append_known(
        &self,
        head: &Head,
        batch: &WriteBatch,
        ids: &[u64],
    ) -> StorageResult<Option<(AppendOutcome, Logged)>> {
        // Until every accepted sample is applied: a read sees all of them or none.
        let _visible = self.visibility.read().unwrap_or_else(|e| e.into_inner());
        let mut held = lock_series(head, ids);
        if held.series.len() != held.distinct {
            return Ok(None);
        }
        let (outcome, accepted, slots) = self.judge(batch, ids, &held, &HashMap::default());
        #[cfg(test)]
        self.pauses.after_judging.run();
        let records = if accepted.is_empty() {
            Vec::new()
        } else {
            vec![Record::Samples { samples: accepted }]
        };
        let packed = self.pack(&records)?;
        let logged = self.log(packed.as_ref())?;
        let (mut min_t, mut max_t) = (i64::MAX, i64::MIN);
        if let Some(Record::Samples { samples }) = records.first() {
            for (&(_, t, v), &at) in samples.iter().zip(&slots) {
                let series = &mut held.series[at as usize].1;
                if t > series.flushed_until {
                    series.samples.insert(Sample { t, v });
                    (min_t, max_t) = (min_t.min(t), max_t.max(t));
                }
            }
        }
        head.applied(min_t, max_t);
        Ok(Some((outcome, logged)))
    }

    /// Places each sample of `batch` (series `ids`) against what its series holds (`held`,
    /// by id; a series not there holds nothing, flushed up to its time in `returning`) and
    /// against the batch's earlier samples of the same series. Returns the outcome, the
    /// samples to log and apply: (series, time, value), and for each its series' place in
    /// `held`.
    fn judge(
        &self,
        batch: &WriteBatch,
        ids: &[u64],
        held: &Locked<'_>,
        returning: &HashMap<u64, TimestampMs>,
    ) -> (AppendOutcome, Vec<(u64, i64, f64)>, Vec<u32>) {
        let mut outcome = AppendOutcome::default();
        let mut accepted: Vec<(u64, i64, f64)> = Vec::with_capacity(batch.sample_count());
        let mut slots: Vec<u32> = Vec::with_capacity(batch.sample_count());
        // Samples of this batch per series, to judge repeats inside the batch too; only
        // needed for a series that comes twice or whose samples are not strictly in order.
        let mut pending: HashMap<u64, Vec<Sample>> = HashMap::default();
        let repeated = ids.len() != held.distinct;
        let mut occurrences: HashMap<u64, u32> = HashMap::default();
        if repeated {
            for &id in ids {
                *occurrences.entry(id).or_default() += 1;
            }
        }
        let empty = SampleStore::default();
        for (i, (series, &id)) in batch.iter().zip(ids).enumerate() {
            let at = held.slot(i, id);
            let (stored, flushed_until) = match at {
                Some(at) => {
                    let series = &held.series[at].1;
                    series.samples.prefetch_open();
                    (&series.samples, series.flushed_until)
                }
                None => (&empty, returning.get(&id).copied().unwrap_or(i64::MIN)),
            };
            let simple = (!repeated || occurrences.get(&id) == Some(&1))
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
                        slots.push(at.unwrap_or(usize::MAX) as u32);
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
        (outcome, accepted, slots)
    }

    /// `records` framed and compressed as the log writes them (`None` for none).
    pub(super) fn pack(&self, records: &[Record]) -> StorageResult<Option<wal::Packed>> {
        if records.is_empty() {
            return Ok(None);
        }
        self.packers.pack(records).map(Some).map_err(io_error)
    }

    /// Writes `packed` to the log (the one step writers take one at a time); with nothing
    /// to write, notes where the log ends: what a request repeats may still be waiting for
    /// its fsync.
    pub(super) fn log(&self, packed: Option<&wal::Packed>) -> StorageResult<Logged> {
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        let end = match packed {
            None => wal.end(),
            // A write of a few kilobytes into the page cache usually takes microseconds: handing the
            // runtime thread's work to another thread around it (`block_in_place` wakes a
            // thread every time) cost more than the write. Appends that start a segment or
            // zero-fill ahead can take milliseconds and still hand it off.
            Some(packed) if !wal.append_may_block(packed) => {
                wal.append_packed(packed).map_err(io_error)?
            }
            Some(packed) => {
                tokio::task::block_in_place(|| wal.append_packed(packed)).map_err(io_error)?
            }
        };
        // The fsync starts now, while the writer applies its samples.
        let syncer = wal.syncer();
        syncer.request(end);
        Ok(Logged { end, syncer })
    }

    /// Waits until the log is durable up to `logged` (by policy). If that fsync fails the
    /// log refuses writes until a restart, so nothing is acknowledged that a restart would
    /// not find.
    pub(super) async fn durable(&self, logged: Logged) -> StorageResult<()> {
        logged
            .syncer
            .synced_to_async(logged.end)
            .await
            .map_err(io_error)
    }

    /// Logs `records` and applies them to the head, held alone throughout, then lets it go;
    /// returns where the log's write ended, for [`EmbeddedStorage::durable`].
    pub(super) fn commit(
        &self,
        mut head: std::sync::RwLockWriteGuard<'_, Head>,
        records: Vec<Record>,
    ) -> StorageResult<Logged> {
        let packed = self.pack(&records)?;
        let logged = self.log(packed.as_ref())?;
        let none = HashMap::default();
        for record in records {
            apply(&mut head, record, &none);
        }
        drop(head);
        Ok(logged)
    }
}

/// Where a write to the log ended, and how to wait until it is durable.
pub(super) struct Logged {
    end: wal::Position,
    syncer: Arc<wal::Syncer>,
}

/// The ids of a batch's series, in its order, if the head's index knows every one of them.
fn known_ids(head: &Head, tenant: &str, batch: &WriteBatch) -> Option<Vec<u64>> {
    let index = head.tenants.get(tenant)?;
    batch
        .iter()
        .map(|series| index.by_fingerprint.get(&series.fingerprint).copied())
        .collect()
}

/// The series of a batch the head holds, each locked once, in ascending id order (writers
/// lock in one order, so none waits on another in a circle).
struct Locked<'h> {
    series: Vec<(u64, MutexGuard<'h, Held>)>,
    /// Distinct series in the batch (held or not).
    distinct: usize,
    /// Whether the batch's series are `series` in its order (ascending, each once, all held).
    in_order: bool,
}

impl Locked<'_> {
    /// The place in `series` of the batch's `i`-th series, `id`.
    fn slot(&self, i: usize, id: u64) -> Option<usize> {
        if self.in_order {
            Some(i)
        } else {
            self.series.binary_search_by_key(&id, |(id, _)| *id).ok()
        }
    }
}

fn lock_series<'h>(head: &'h Head, ids: &[u64]) -> Locked<'h> {
    let mut order = ids.to_vec();
    if !order.is_sorted() {
        order.sort_unstable();
    }
    order.dedup();
    let distinct = order.len();
    let series: Vec<_> = order
        .into_iter()
        .filter_map(|id| Some((id, head.series.get(&id)?.held())))
        .collect();
    let in_order = series.len() == ids.len() && ids.is_sorted();
    Locked {
        series,
        distinct,
        in_order,
    }
}
