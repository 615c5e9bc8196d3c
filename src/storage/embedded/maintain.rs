//! Maintenance: flushing the head into blocks with a checkpoint of the log, compaction,
//! retention, and the sizes of what is stored.

use super::*;

/// A log is quiet when at most this share of its segments was logged over the last
/// sixteenth of the out-of-order window (and at least [`QUIET_MIN`]) of wall-clock time
/// ([`EmbeddedStorage::compact_log`]).
const QUIET_SHARE: u64 = 64;
/// The shortest time a log must be quiet before it is compacted for it.
pub(super) const QUIET_MIN: std::time::Duration = std::time::Duration::from_secs(60);

impl EmbeddedStorage {
    /// One maintenance run at `now` (ms): flush the head up to the out-of-order window
    /// behind its newest sample, checkpoint and shorten the log, compact closed windows,
    /// apply retention.
    pub fn maintain(&self, now: TimestampMs) -> StorageResult<MaintenanceReport> {
        let cutoff = {
            let head = self.read();
            match head.max_t.get() {
                Some(max_t) => max_t.min(now).saturating_sub(self.window_ms),
                None => i64::MIN,
            }
        };
        self.maintain_with_cutoff(now, cutoff)
    }

    /// Like [`EmbeddedStorage::maintain`] with an explicit flush cutoff: every head sample
    /// older than `cutoff` goes to disk (later samples at or before a series' flushed ones
    /// are refused as out of order). `i64::MAX` flushes everything.
    pub fn maintain_with_cutoff(
        &self,
        now: TimestampMs,
        cutoff: TimestampMs,
    ) -> StorageResult<MaintenanceReport> {
        let _one = self.maintenance.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = MaintenanceReport::default();
        let internal =
            |what: &str, e: std::io::Error| StorageError::Internal(format!("{what}: {e}"));
        // Each step runs whatever the one before returned: a flush that keeps failing must
        // not stop retention from freeing disk.
        let flushed = self
            .flush(cutoff, &mut report)
            .and_then(|()| self.compact_log(&mut report));
        let compacted = self
            .compact(cutoff, &mut report)
            .and_then(|()| self.add_missing_rollups(now, cutoff, &mut report));
        let retained = self.apply_retention(now, &mut report);
        self.series_removed
            .fetch_add(report.series_dropped as u64, Ordering::Relaxed);
        self.writer_hold_max_us.fetch_max(
            u64::try_from(report.longest_writer_hold.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let counter = if flushed.is_ok() && compacted.is_ok() && retained.is_ok() {
            &self.maintenance_runs
        } else {
            &self.maintenance_failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
        flushed?;
        compacted.map_err(|e| internal("compaction", e))?;
        retained.map_err(|e| internal("retention", e))?;
        Ok(report)
    }

    /// Flushes the head's samples older than `cutoff` into a block, checkpoints the log and
    /// forgets the series left with no sample. Writers wait for one step at a time, each
    /// bounded ([`FLUSH_BATCH`] series, or about [`PRUNE_BUDGET`] postings entries), never for
    /// a pass over the whole head but the copy of its ids ([`EmbeddedStorage::head_ids`]): a
    /// step's hold (from the moment it has its locks) is measured in `report`.
    pub(super) fn flush(
        &self,
        cutoff: TimestampMs,
        report: &mut MaintenanceReport,
    ) -> StorageResult<()> {
        // Nothing older than the cutoff, and no block left to write by a flush that failed.
        if self
            .read()
            .min_t
            .get()
            .is_none_or(|oldest| oldest >= cutoff)
            && self.blocks_read().flushing.is_empty()
        {
            return Ok(());
        }
        // A new log segment first: every sample of the segments before it is in the head
        // already (a writer logs and applies its records holding the head, shared; the
        // rotation holds it alone), and each is moved out below if older than the cutoff, so
        // a segment all of whose samples are older holds nothing the head still needs once
        // the block is in.
        // The head's oldest sample is recomputed from what the batches leave and what writers
        // apply from here on (new series included, which the copy of ids below may miss).
        let segment = self.rotate_log(true, report)?;
        #[cfg(test)]
        self.pauses.after_rotation.run();
        let ids = self.head_ids(report);
        self.move_out(&ids, cutoff, report);
        if self.blocks_read().flushing.is_empty() {
            return Ok(());
        }
        // Write the block; readers keep seeing the samples in `flushing` until it is in.
        // A directory number is used once, even when writing there fails. The series' labels
        // are copied first (series leave the head only below, in this maintenance run).
        let number = {
            let mut set = self.blocks_write();
            set.next_dir += 1;
            set.next_dir - 1
        };
        let in_block: Vec<u64> = self.blocks_read().flushing.keys().copied().collect();
        let mut known = self.head_labels(&in_block, report);
        let block = {
            let set = self.blocks_read();
            let dir = self.dir.join("blocks").join(format!("{number:010}"));
            let mut series = |id: u64| {
                Ok(set
                    .flushing
                    .get(&id)
                    .map_or_else(Vec::new, |chunks| chunks_range(chunks, i64::MIN, i64::MAX)))
            };
            // Called once: the copies move into the index writer.
            let mut labels = |ids: &[u64]| Ok(labels_among(std::mem::take(&mut known), ids));
            tokio::task::block_in_place(|| {
                Block::write(
                    &dir,
                    Lineage::flush(set.next_order),
                    &in_block,
                    &mut labels,
                    &mut series,
                )
            })
            .map_err(|e| StorageError::Internal(format!("flush: {e}")))?
        };
        // The block in, in place of the samples being flushed (readers see them in one or
        // the other), then the head forgets the series it no longer holds samples of, when
        // every block has an index to keep their labels.
        let forget = {
            let mut set = self.blocks_write();
            let began = std::time::Instant::now();
            // Freed after the lock is let go (a hundred thousand series' chunks take tens of
            // milliseconds to free).
            let flushed = std::mem::take(&mut set.flushing);
            set.next_order += 1;
            if let Some(block) = block {
                set.blocks.push(Arc::new(block));
                report.blocks_written += 1;
            }
            let forget = set.blocks.iter().all(|b| b.index.is_some());
            // (Only a returning series' writer waits for the set's lock.)
            drop(set);
            report.held(began, "block swapped in");
            drop(flushed);
            forget
        };
        if forget {
            self.forget_empty(&ids, report);
        }
        // The log's samples older than the cutoff are on disk now: checkpoint what else the
        // old segments hold (series, metadata, exemplars), from a copy of the head taken in
        // batches and written with no lock held, and delete them. The copy is of moments
        // after the rotation: replaying the segments from there on on top of it changes
        // nothing they already set. Segments with samples on both sides of the cutoff go too,
        // their newer samples carried into the checkpoint (read back from the files, not from
        // the head, so the checkpoint replays exactly what they did). When those segments are
        // as large as a compaction of the log wants, the head's samples are written instead
        // (in their compact form, from the head: the same samples) and every segment goes.
        let (plan, carry_bytes) = {
            let wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
            let plan = wal.truncation(segment, cutoff);
            let bytes = wal.bytes_of(&plan.carry);
            (plan, bytes)
        };
        if self.compaction_due(carry_bytes) {
            return self.write_compacted_checkpoint(segment, report);
        }
        // No segment can go yet (at real pace, the first hour after a start or a log
        // compaction): the checkpoint there is stays, and replay skips what the block holds.
        // Writing one would only rewrite the series and the previous checkpoint's carried
        // samples, which after a compaction are most of the head, at every flush.
        if plan.delete.is_empty() && plan.carry.is_empty() {
            return Ok(());
        }
        let snapshot = self.checkpoint_snapshot(report);
        let dir = self.dir.join("wal");
        let carried = tokio::task::block_in_place(|| {
            let mut checkpoint = wal::CheckpointWriter::create(&dir)?;
            snapshot.write(&mut checkpoint)?;
            let carried = wal::carry_samples(&dir, &plan, cutoff, &mut checkpoint)?;
            checkpoint.commit(segment)?;
            Ok::<_, std::io::Error>(carried)
        });
        match carried {
            Ok(carried) => report.wal_samples_carried += carried,
            // A carried segment or the checkpoint that does not read whole (damaged on disk)
            // would fail every flush's checkpoint and keep the log growing until a restart,
            // or be carried in part: its samples are in the head, so the head's are written
            // instead.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "checkpoint: writing the head's samples instead");
                return self.write_compacted_checkpoint(segment, report);
            }
            Err(e) => return Err(StorageError::Internal(format!("checkpoint: {e}"))),
        }
        let old: Vec<u64> = plan.delete.iter().chain(&plan.carry).copied().collect();
        self.delete_segments(&old, segment, report)
    }

    /// Compacts the log when its segments take at least [`LOG_COMPACTION_MIN_BYTES`] and twice the
    /// last such compaction's checkpoint: rotates it, writes a checkpoint that holds the
    /// head's samples too (each series' in the blocks' sample encoding, about a byte a sample
    /// where the log's records take two to three) and deletes every closed segment. The log's
    /// disk then follows what the head holds rather than how fast it came (a backfill, a
    /// load that writes hours of data time in minutes), and a restart replays the compact
    /// form. Each compaction rewrites the head's samples once, after at least twice their
    /// size was logged; the first flush after it that lets a segment go carries that
    /// checkpoint's samples newer than its cutoff (at real pace an hour later: few; the
    /// flushes before it write no checkpoint). (A load that flushes nothing never rotates
    /// the log: the segment being written counts too.)
    ///
    /// Consistent as a flush's checkpoint is: every sample of the closed segments is in the
    /// head when the log rotates (writers log and apply holding the head, shared; the
    /// rotation holds it alone) and nothing leaves the head in between (maintenance runs one
    /// step at a time). The copy, made after the rotation, may hold samples the later
    /// segments hold too: replay keeps a timestamp's first sample, the same one.
    ///
    /// A quiet log is compacted sooner: once at most 1/[`QUIET_SHARE`] of its segments was
    /// logged over the last sixteenth of the out-of-order window of wall-clock time (at least
    /// [`QUIET_MIN`]: about four minutes with the default hour), and the log (segments and
    /// checkpoint) takes at least one and a half times the last compaction's checkpoint (at
    /// start, the newest checkpoint) and a sixteenth of [`LOG_COMPACTION_MIN_BYTES`]. After a
    /// backfill or a catch-up ends, the log otherwise keeps, until writes resume, the head's
    /// newer samples in the log's form (two to three bytes a sample), in segments or carried
    /// into a checkpoint, beside samples of a checkpoint flushed since. A load
    /// at real pace fills the log's window of samples in a window of time, so it logs a
    /// sixteenth of the log in that time, four times the share, at any sample rate and
    /// maintenance interval. Between two quiet compactions the log grows by at least half a
    /// checkpoint (a failed one is retried at each maintenance, as the usual one is).
    pub(super) fn compact_log(&self, report: &mut MaintenanceReport) -> StorageResult<()> {
        let (logged, appended) = {
            let wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
            (wal.segment_bytes(), wal.appended())
        };
        if !self.compaction_due(logged) && !self.quiet_compaction_due(logged, appended) {
            return Ok(());
        }
        let segment = self.rotate_log(false, report)?;
        self.write_compacted_checkpoint(segment, report)
    }

    /// Starts a new log segment holding the head alone (writers log and apply holding it
    /// shared, so every record before is applied); returns its number. `flushing`: the
    /// head's oldest sample is then recomputed from what the flush leaves and what writers
    /// apply from here on.
    fn rotate_log(&self, flushing: bool, report: &mut MaintenanceReport) -> StorageResult<u64> {
        let head = self.write();
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        let began = std::time::Instant::now();
        let segment = tokio::task::block_in_place(|| wal.rotate()).map_err(io_error)?;
        if flushing {
            head.applied_min_t.set(None);
        }
        drop((wal, head));
        report.held(began, "log rotation");
        Ok(segment)
    }

    /// Whether `bytes` of the log are worth a compaction: at least
    /// [`LOG_COMPACTION_MIN_BYTES`] and twice the last compaction's checkpoint.
    fn compaction_due(&self, bytes: u64) -> bool {
        let last = self.log_compacted_bytes.load(Ordering::Relaxed);
        bytes > 0 && bytes >= self.log_compaction_min_bytes.max(last.saturating_mul(2))
    }

    /// Whether a log of `bytes` in segments, `appended` bytes logged since the start, has been
    /// quiet long enough and is large enough to compact ([`EmbeddedStorage::compact_log`]).
    /// A log found busy marks the time.
    fn quiet_compaction_due(&self, bytes: u64, appended: u64) -> bool {
        let mut busy = self.log_busy.lock().unwrap_or_else(|e| e.into_inner());
        if appended.saturating_sub(busy.0) > bytes / QUIET_SHARE {
            *busy = (appended, std::time::Instant::now());
            return false;
        }
        if busy.1.elapsed() < self.log_quiet_after || bytes == 0 {
            return false;
        }
        // The segments and the checkpoint, which may hold samples flushed since, or samples
        // carried in the log's form.
        let last = self.log_compacted_bytes.load(Ordering::Relaxed);
        let log = bytes + wal::checkpoint_bytes(&self.dir.join("wal"));
        log >= (self.log_compaction_min_bytes / 16).max(last + last / 2)
    }

    /// Writes checkpoint `segment` (the log rotated to it, every sample of the segments before
    /// it in the head or in blocks) with the head's samples, and deletes those segments.
    fn write_compacted_checkpoint(
        &self,
        segment: u64,
        report: &mut MaintenanceReport,
    ) -> StorageResult<()> {
        let ids = self.head_ids(report);
        let snapshot = self.checkpoint_snapshot(report);
        let dir = self.dir.join("wal");
        let written = tokio::task::block_in_place(|| {
            let mut checkpoint = wal::CheckpointWriter::create(&dir)?;
            snapshot.write(&mut checkpoint)?;
            let mut written = 0u64;
            let mut copies: Vec<(u64, Vec<Sample>)> = Vec::with_capacity(FLUSH_BATCH);
            let mut rest = &ids[..];
            while !rest.is_empty() {
                {
                    // Up to FLUSH_BATCH series or COPY_BATCH_SAMPLES samples a hold,
                    // whichever comes first (one-second scrapes keep thousands a series).
                    let head = self.read();
                    let began = std::time::Instant::now();
                    let mut copied = 0;
                    let mut taken = 0;
                    for id in rest {
                        if taken == FLUSH_BATCH || copied >= COPY_BATCH_SAMPLES {
                            break;
                        }
                        taken += 1;
                        let Some(series) = head.series.get(id) else {
                            continue;
                        };
                        let mut samples = Vec::new();
                        series
                            .held()
                            .samples
                            .range_into(i64::MIN, i64::MAX, &mut samples);
                        if !samples.is_empty() {
                            copied += samples.len();
                            copies.push((*id, samples));
                        }
                    }
                    rest = &rest[taken..];
                    drop(head);
                    report.held(began, "head samples copied");
                }
                for (id, samples) in copies.drain(..) {
                    written += samples.len() as u64;
                    checkpoint.record(&Record::SeriesSamples { id, samples })?;
                }
            }
            checkpoint.commit(segment)?;
            Ok::<_, std::io::Error>(written)
        })
        .map_err(|e| StorageError::Internal(format!("log compaction: {e}")))?;
        let old = self
            .wal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .segments_before(segment);
        self.delete_segments(&old, segment, report)?;
        let bytes = tokio::task::block_in_place(|| wal::checkpoint_bytes(&dir));
        self.log_compacted_bytes.store(bytes, Ordering::Relaxed);
        self.log_compactions.fetch_add(1, Ordering::Relaxed);
        report.wal_samples_compacted += written;
        Ok(())
    }

    /// Deletes log segments checkpoint `checkpoint` made redundant, and older checkpoints:
    /// forgotten under the log's lock, their files deleted without it.
    fn delete_segments(
        &self,
        segments: &[u64],
        checkpoint: u64,
        report: &mut MaintenanceReport,
    ) -> StorageResult<()> {
        let dir = self.dir.join("wal");
        let (gone, deleted) =
            tokio::task::block_in_place(|| wal::delete_redundant(&dir, segments, checkpoint));
        self.wal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(&gone);
        report.wal_segments_deleted += gone.len();
        deleted.map_err(|e| StorageError::Internal(format!("log truncation: {e}")))
    }

    /// Every series id of the head, ascending: the tenants' lists copied under the read
    /// lock (eight bytes a series, a memory copy: with the pruning of one postings list, the
    /// steps of a flush that grow with the head; a flush copies the ids twice).
    fn head_ids(&self, report: &mut MaintenanceReport) -> Vec<u64> {
        let head = self.read();
        let began = std::time::Instant::now();
        let mut ids: Vec<u64> = Vec::with_capacity(head.series.len());
        for index in head.tenants.values() {
            ids.extend_from_slice(&index.all);
        }
        drop(head);
        report.held(began, "series ids copied");
        if !ids.is_sorted() {
            ids.sort_unstable();
            ids.dedup();
        }
        ids
    }

    /// Moves the samples of `ids` older than `cutoff` out of the head into `flushing`,
    /// [`FLUSH_BATCH`] series at a time under the head's and the set's write locks (a reader
    /// copies both under their read locks, so it sees each sample in one place), and
    /// recomputes the head's oldest sample time.
    ///
    /// A writer holds the head (shared) from judging its samples against a series' flushed
    /// time to applying them: a batch moving out in between could leave an accepted sample
    /// at or before the new flushed time, which the apply would drop after the writer
    /// acknowledged it (the cutoff follows the newest sample of any series, a series'
    /// out-of-order window its own latest one).
    fn move_out(&self, ids: &[u64], cutoff: TimestampMs, report: &mut MaintenanceReport) {
        let mut min_t: Option<TimestampMs> = None;
        for (i, batch) in ids.chunks(FLUSH_BATCH).enumerate() {
            if i > 0 {
                // Writers waiting for the lock get it before the next batch.
                std::thread::yield_now();
            }
            let mut head = self.write();
            let mut set = self.blocks_write();
            let began = std::time::Instant::now();
            for id in batch {
                let Some(series) = head.series.get_mut(id) else {
                    continue;
                };
                let held = series.held_mut();
                let chunks = held.samples.split_before(cutoff);
                if let Some(last) = chunks.last() {
                    held.flushed_until = last.max_t;
                    report.flushed_samples +=
                        chunks.iter().map(|c| u64::from(c.count)).sum::<u64>();
                    set.flushing.entry(*id).or_default().extend(chunks);
                }
                if let Some(first) = held.samples.first() {
                    min_t = Some(min_t.map_or(first, |m| m.min(first)));
                }
            }
            drop((set, head));
            report.held(began, "samples moved out");
        }
        // What the batches left, and what writers applied meanwhile (to series of batches
        // already done too).
        let head = self.write();
        head.min_t.set(match (min_t, head.applied_min_t.get()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        });
    }

    /// Forgets the series of `ids` left with no sample in the head, in batches: each with
    /// the head held alone (a writer resolves its series and applies its samples holding the
    /// head, so none is forgotten in between), then their postings pruned a few lists at a
    /// time.
    fn forget_empty(&self, ids: &[u64], report: &mut MaintenanceReport) {
        let mut forgotten = head::Forgotten::default();
        for (i, batch) in ids.chunks(FLUSH_BATCH).enumerate() {
            if i > 0 {
                std::thread::yield_now();
            }
            let mut head = self.write();
            let began = std::time::Instant::now();
            let before = forgotten.ids.len();
            head.forget_empty(batch, &mut forgotten);
            if before == 0 && !forgotten.ids.is_empty() {
                // Reads and returning series look at the blocks' indexes from the first
                // series forgotten on (set before the head's lock is let go: a reader that
                // misses the series in the head sees it).
                for block in &self.blocks_read().blocks {
                    block.all_in_head.store(false, Ordering::Relaxed);
                }
            }
            drop(head);
            report.held(began, "series forgotten");
        }
        report.series_dropped += forgotten.ids.len();
        forgotten.line_up();
        loop {
            std::thread::yield_now();
            let mut head = self.write();
            let began = std::time::Instant::now();
            let more = head.prune_postings(&mut forgotten, PRUNE_BUDGET);
            drop(head);
            report.held(began, "postings pruned");
            if !more {
                break;
            }
        }
    }

    /// What a checkpoint keeps, copied from the head [`FLUSH_BATCH`] series at a time.
    fn checkpoint_snapshot(&self, report: &mut MaintenanceReport) -> CheckpointSnapshot {
        let ids = self.head_ids(report);
        let head = self.read();
        let began = std::time::Instant::now();
        let mut snapshot = CheckpointSnapshot::of_all_but_series(&head);
        drop(head);
        report.held(began, "checkpoint metadata copied");
        for batch in ids.chunks(FLUSH_BATCH) {
            let head = self.read();
            let began = std::time::Instant::now();
            snapshot.add_series(&head, batch);
            drop(head);
            report.held(began, "checkpoint series copied");
        }
        snapshot
    }

    /// (id, tenant, labels) of the given series (ascending) that the head holds, copied
    /// [`FLUSH_BATCH`] at a time under the head's read lock.
    pub(super) fn head_labels(
        &self,
        ids: &[u64],
        report: &mut MaintenanceReport,
    ) -> Vec<index::SeriesLabels> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(FLUSH_BATCH) {
            let head = self.read();
            let began = std::time::Instant::now();
            out.extend(batch.iter().filter_map(|id| {
                let s = head.series.get(id)?;
                Some((*id, s.tenant.clone(), s.labels.clone()))
            }));
            drop(head);
            report.held(began, "labels copied");
        }
        out
    }

    /// Merges runs of consecutive blocks that lie in one closed aligned window. The day's
    /// merge writes the rollups; flushed blocks and the 2-hour merges of an open day have
    /// none (see [`EmbeddedStorage::add_missing_rollups`]).
    pub(super) fn compact(
        &self,
        cutoff: TimestampMs,
        report: &mut MaintenanceReport,
    ) -> std::io::Result<()> {
        let day = COMPACTION_SPANS_MS[1];
        for span in COMPACTION_SPANS_MS {
            let daily = span == day;
            loop {
                let group = {
                    let set = self.blocks_read();
                    compaction_group(&set.blocks, span, cutoff, !daily, &set.not_compactable)
                };
                let Some(range) = group else { break };
                let number = {
                    let mut set = self.blocks_write();
                    set.next_dir += 1;
                    set.next_dir - 1
                };
                // The blocks are shared: the set's lock is not held while they are merged (only
                // maintenance, one run at a time, changes the set, so `range` stays valid).
                let group: Vec<Arc<Block>> = self.blocks_read().blocks[range.clone()].to_vec();
                let merged = {
                    let dir = self.dir.join("blocks").join(format!("{number:010}"));
                    let group: Vec<&Block> = group.iter().map(|b| &**b).collect();
                    let mut labels = |ids: &[u64]| Ok(self.head_labels(ids, report));
                    tokio::task::block_in_place(|| block::compact(&dir, &group, &mut labels, daily))
                };
                drop(group);
                let mut set = self.blocks_write();
                let merged = match merged {
                    Ok(merged) => merged,
                    Err(e) => {
                        // A damaged run must not stop every later compaction: leave these
                        // blocks as they are (until a restart) and go on.
                        tracing::error!(error = %e, "compaction failed; its blocks stay as they are");
                        let dirs: Vec<PathBuf> =
                            set.blocks[range].iter().map(|b| b.dir.clone()).collect();
                        set.not_compactable.extend(dirs);
                        continue;
                    }
                };
                let old: Vec<Arc<Block>> = set.blocks.drain(range.clone()).collect();
                if let Some(merged) = merged {
                    set.blocks.insert(range.start, Arc::new(merged));
                }
                drop(set);
                report.blocks_compacted += old.len();
                for block in old {
                    std::fs::remove_dir_all(&block.dir)?;
                }
            }
        }
        Ok(())
    }

    /// Rollups of data older than this are past their retention (both resolutions').
    fn rollups_kept_after(&self, now: TimestampMs) -> TimestampMs {
        now.saturating_sub(
            self.retention
                .keep_ms(Some(Resolution::FiveMinutes))
                .max(self.retention.keep_ms(Some(Resolution::OneHour))),
        )
    }

    /// Whether a block should have rollups it lacks: its day is closed (the day's end at or
    /// before `cutoff`) or raw retention is about to delete its raw chunks, and they would be
    /// kept.
    fn lacks_rollups(&self, b: &Block, now: TimestampMs, cutoff: TimestampMs) -> bool {
        let day = COMPACTION_SPANS_MS[1];
        let day_closed = (b.meta.min_t.div_euclid(day) + 1).saturating_mul(day) <= cutoff;
        let raw_going = b.meta.max_t < now.saturating_sub(self.retention.keep_ms(None));
        b.chunks.is_some()
            && b.rollups.is_empty()
            && (day_closed || raw_going)
            && b.meta.max_t >= self.rollups_kept_after(now)
    }

    /// Rollups are written only for data of a closed day, as Thanos downsamples only blocks
    /// days old: reads of the open day's blocks aggregate their raw chunks, and a store of
    /// hours of data holds no second copy of it. The day's merge writes them
    /// ([`EmbeddedStorage::compact`]); a block it did not (a day of one block, a block spanning
    /// days, blocks that failed to merge) gets them here, beside its raw chunks, with no lock
    /// held, and before retention takes its raw chunks however far the flush cutoff lags.
    pub(super) fn add_missing_rollups(
        &self,
        now: TimestampMs,
        cutoff: TimestampMs,
        report: &mut MaintenanceReport,
    ) -> std::io::Result<()> {
        let lacking: Vec<Arc<Block>> = self
            .blocks_read()
            .blocks
            .iter()
            .filter(|b| self.lacks_rollups(b, now, cutoff))
            .cloned()
            .collect();
        let mut failed = None;
        for block in lacking {
            match tokio::task::block_in_place(|| block.add_rollups()) {
                Ok(with) => {
                    let mut set = self.blocks_write();
                    // Only maintenance changes the set, one run at a time: it is still there.
                    if let Some(slot) = set.blocks.iter_mut().find(|b| b.dir == with.dir) {
                        *slot = Arc::new(with);
                        report.blocks_rolled_up += 1;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, block = %block.dir.display(), "writing a block's rollups failed; its raw chunks stay");
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Deletes raw chunks and rollups of blocks entirely older than their retention; not the
    /// raw chunks of a block that lacks rollups it would keep (writing them failed).
    pub(super) fn apply_retention(
        &self,
        now: TimestampMs,
        report: &mut MaintenanceReport,
    ) -> std::io::Result<()> {
        let rollups_kept_after = self.rollups_kept_after(now);
        let mut set = self.blocks_write();
        for block in &mut set.blocks {
            for resolution in [
                None,
                Some(Resolution::FiveMinutes),
                Some(Resolution::OneHour),
            ] {
                let present = match resolution {
                    None => block.chunks.is_some(),
                    Some(r) => block.rollup_file(r).is_some(),
                };
                let horizon = now.saturating_sub(self.retention.keep_ms(resolution));
                let rollups_owed = resolution.is_none()
                    && block.rollups.is_empty()
                    && block.meta.max_t >= rollups_kept_after;
                if present && block.meta.max_t < horizon && !rollups_owed {
                    if Arc::get_mut(block).is_none() {
                        // A read holds this block: it keeps the file open to its end, and the
                        // set gets the block without it.
                        *block = Arc::new(block.without(resolution));
                    }
                    Arc::get_mut(block)
                        .expect("a block just made is not shared")
                        .drop_file(resolution)?;
                    report.files_deleted += 1;
                }
            }
        }
        let (empty, kept): (Vec<Arc<Block>>, Vec<Arc<Block>>) = std::mem::take(&mut set.blocks)
            .into_iter()
            .partition(|b| b.is_empty());
        set.blocks = kept;
        drop(set);
        for block in empty {
            std::fs::remove_dir_all(&block.dir)?;
        }
        Ok(())
    }

    /// Sizes of what is stored.
    pub fn sizes(&self) -> StorageStats {
        // The log's lock is let go before the head's is taken: the order is head, then log.
        let wal_bytes = self
            .wal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .disk_bytes();
        let series_in_memory = self.read().series.len() as u64;
        let set = self.blocks_read();
        StorageStats {
            series_in_memory,
            blocks: set.blocks.len() as u64,
            block_samples: set
                .blocks
                .iter()
                .filter(|b| b.chunks.is_some())
                .map(|b| b.meta.samples)
                .sum(),
            block_bytes: set.blocks.iter().map(|b| b.size(false)).sum(),
            rollup_bytes: set.blocks.iter().map(|b| b.size(true)).sum(),
            wal_bytes,
            head_series_removed: self.series_removed.load(Ordering::Relaxed),
            log_compactions: self.log_compactions.load(Ordering::Relaxed),
            lifecycle_runs: self.maintenance_runs.load(Ordering::Relaxed),
            lifecycle_failures: self.maintenance_failures.load(Ordering::Relaxed),
            maintenance_writer_hold_max: Duration::from_micros(
                self.writer_hold_max_us.load(Ordering::Relaxed),
            ),
            ..StorageStats::default()
        }
    }
}

/// The first run of consecutive blocks whose data starts in the same aligned window of `span`
/// and which all still hold raw chunks: all of them (at least two) once the window is closed
/// (its end at or before `cutoff`); while it is open and `merge_small` (the smallest span
/// only), at least two consecutive small ones (below [`SMALL_BLOCK_SAMPLES_PER_SERIES`]).
/// Small blocks of an open day are not merged: series with few samples each (short-lived
/// ones) keep blocks small, and the day's block would be rewritten at every flush.
pub(super) fn compaction_group(
    blocks: &[Arc<Block>],
    span: i64,
    cutoff: TimestampMs,
    merge_small: bool,
    excluded: &std::collections::HashSet<PathBuf>,
) -> Option<std::ops::Range<usize>> {
    let window = |b: &Block| b.meta.min_t.div_euclid(span);
    let mut i = 0;
    while i < blocks.len() {
        let w = window(&blocks[i]);
        let mut j = i + 1;
        while j < blocks.len() && window(&blocks[j]) == w {
            j += 1;
        }
        let window_end = (w + 1).saturating_mul(span);
        let compactable = |b: &Arc<Block>| {
            b.chunks.is_some() && !excluded.contains(&b.dir) && b.meta.max_t < window_end + span
        };
        if window_end <= cutoff {
            if j - i >= 2 && blocks[i..j].iter().all(compactable) {
                return Some(i..j);
            }
        } else if merge_small {
            let small = |b: &Arc<Block>| {
                compactable(b)
                    && b.meta.samples < SMALL_BLOCK_SAMPLES_PER_SERIES * b.meta.series.max(1)
            };
            let mut k = i;
            while k < j {
                let mut l = k;
                while l < j && small(&blocks[l]) {
                    l += 1;
                }
                if l - k >= 2 {
                    return Some(k..l);
                }
                k = l + 1;
            }
        }
        i = j;
    }
    None
}

/// (id, tenant, labels) of `ids` (ascending) among `known` (ascending by id).
fn labels_among(mut known: Vec<index::SeriesLabels>, ids: &[u64]) -> Vec<index::SeriesLabels> {
    known.retain(|k| ids.binary_search(&k.0).is_ok());
    known
}

/// What a checkpoint keeps of the deleted log segments — every series the head holds,
/// metadata, exemplars and flushed times — copied from the head (label sets shared in their
/// packed form), to be written with no lock held.
pub(super) struct CheckpointSnapshot {
    metadata: Vec<Record>,
    series: Vec<(u64, Arc<str>, PackedLabels)>,
    marks: Vec<(u64, TimestampMs)>,
    exemplars: Vec<(u64, TimestampMs, f64, Labels)>,
}

impl CheckpointSnapshot {
    /// Metadata and exemplars (both bounded by limits), and no series yet.
    pub fn of_all_but_series(head: &Head) -> CheckpointSnapshot {
        let mut metadata = Vec::new();
        for (tenant, index) in &head.tenants {
            for entries in index.metadata.values() {
                for m in entries {
                    metadata.push(Record::Metadata {
                        tenant: tenant.clone(),
                        metadata: m.clone(),
                    });
                }
            }
        }
        CheckpointSnapshot {
            metadata,
            series: Vec::new(),
            marks: Vec::new(),
            // In the ring's order, so that replay keeps the same exemplars as the oldest.
            exemplars: head.exemplar_entries(),
        }
    }

    /// Adds the series of `ids` (ascending, after those added before) the head holds, with
    /// their flushed times.
    pub fn add_series(&mut self, head: &Head, ids: &[u64]) {
        for id in ids {
            let Some(s) = head.series.get(id) else {
                continue;
            };
            self.series.push((*id, s.tenant.clone(), s.labels.clone()));
            let flushed_until = s.held().flushed_until;
            if flushed_until > i64::MIN {
                self.marks.push((*id, flushed_until));
            }
        }
    }

    pub fn write(self, out: &mut wal::CheckpointWriter) -> std::io::Result<()> {
        for record in &self.metadata {
            out.record(record)?;
        }
        for (id, tenant, labels) in &self.series {
            out.series(tenant, *id, labels)?;
        }
        if !self.exemplars.is_empty() {
            out.record(&Record::Exemplars {
                exemplars: self.exemplars,
            })?;
        }
        if !self.marks.is_empty() {
            out.record(&Record::Flushed { marks: self.marks })?;
        }
        Ok(())
    }
}
