//! Opening the engine: its blocks, then the write-ahead log replayed on top of them.

use super::*;

impl EmbeddedStorage {
    /// Opens (or creates) the data directory: opens its blocks, then replays the log on top.
    pub fn open(
        dir: &Path,
        config: &EmbeddedConfig,
        retention: &RetentionConfig,
    ) -> StorageResult<EmbeddedStorage> {
        let fail = |e: std::io::Error| {
            StorageError::Internal(format!("cannot open {}: {e}", dir.display()))
        };
        // Before anything is read: another server may be writing.
        let lock =
            lock::DirLock::acquire(dir).map_err(|e| StorageError::Internal(e.to_string()))?;
        let (set, mut damaged) = open_blocks(&dir.join("blocks")).map_err(fail)?;
        // Samples up to these times are in blocks; the log's copies are not replayed.
        let mut flushed: HashMap<u64, TimestampMs> = HashMap::default();
        for block in &set.blocks {
            for (id, t) in block.max_times().map_err(fail)? {
                let at = flushed.entry(id).or_insert(t);
                *at = (*at).max(t);
            }
        }
        let mut head = Head {
            exemplar_limit: config.max_exemplars,
            ..Head::default()
        };
        let (wal, report) = Wal::open(&dir.join("wal"), config.fsync, |record| {
            apply(&mut head, record, &flushed)
        })
        .map_err(fail)?;
        let checkpoint_bytes = wal::checkpoint_bytes(&dir.join("wal"));
        // The head holds the series of the checkpoint and the log; the blocks may hold more
        // (series the head forgot): ids go on after theirs, and reads and returning series
        // consult the indexes of the blocks whose series are not all in the head.
        let block_ids = flushed
            .keys()
            .copied()
            .chain(set.blocks.iter().filter_map(|b| b.meta.max_series_id))
            .chain(
                set.blocks
                    .iter()
                    .filter_map(|b| b.index.as_ref())
                    .flat_map(|index| index.ids()),
            );
        if let Some(max) = block_ids.max() {
            head.next_id = head.next_id.max(max + 1);
        }
        for block in &set.blocks {
            let all_in_head = block
                .index
                .as_ref()
                .is_none_or(|index| index.ids().all(|id| head.series.contains_key(&id)));
            block.all_in_head.store(all_in_head, Ordering::Relaxed);
        }
        if let Some((path, bytes)) = &report.truncated {
            tracing::warn!(
                segment = %path.display(),
                bytes_cut = bytes,
                "write-ahead log damaged: replayed up to the last intact record and cut the rest"
            );
            damaged += bytes;
        }
        tracing::info!(
            records = report.records,
            series = head.series.len(),
            blocks = set.blocks.len(),
            dir = %dir.display(),
            "embedded storage opened"
        );
        Ok(EmbeddedStorage {
            dir: dir.to_owned(),
            head: RwLock::new(head),
            wal: Mutex::new(wal),
            blocks: RwLock::new(set),
            maintenance: Mutex::new(()),
            window_ms: config.out_of_order_window_secs as i64 * 1000,
            flush_interval: Duration::from_secs(config.flush_interval_secs.max(1)),
            retention: retention.clone(),
            damaged_bytes: AtomicU64::new(damaged),
            maintenance_runs: AtomicU64::new(0),
            maintenance_failures: AtomicU64::new(0),
            writer_hold_max_us: AtomicU64::new(0),
            series_removed: AtomicU64::new(0),
            log_compacted_bytes: AtomicU64::new(checkpoint_bytes),
            log_compactions: AtomicU64::new(0),
            log_compaction_min_bytes: LOG_COMPACTION_MIN_BYTES,
            log_busy: Mutex::new((0, std::time::Instant::now())),
            log_quiet_after: (Duration::from_secs(config.out_of_order_window_secs) / 16)
                .max(maintain::QUIET_MIN),
            packers: wal::Packers::default(),
            visibility: RwLock::default(),
            _lock: lock,
            #[cfg(test)]
            pauses: Pauses::default(),
        })
    }
}

/// Opens every block under `dir` (creating it), sorted by read order; removes unfinished
/// `.tmp` blocks and sets damaged ones aside. Returns the set and the damaged bytes found.
pub(super) fn open_blocks(dir: &Path) -> std::io::Result<(BlockSet, u64)> {
    std::fs::create_dir_all(dir)?;
    let mut set = BlockSet::default();
    let mut damaged = 0;
    let mut names: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".tmp") {
            std::fs::remove_dir_all(&path)?;
        } else if let Ok(n) = name.parse::<u64>() {
            names.push((n, path));
        }
    }
    names.sort();
    // Blocks a compacted block replaces are gone once it exists (a crash can leave them).
    let replaced: std::collections::HashSet<u64> = names
        .iter()
        .filter_map(|(_, path)| std::fs::read(path.join("meta.json")).ok())
        .filter_map(|bytes| serde_json::from_slice::<block::Meta>(&bytes).ok())
        .flat_map(|meta| meta.replaces)
        .collect();
    for (n, path) in &names {
        if replaced.contains(n) {
            tracing::info!(block = %path.display(), "removing a block replaced by compaction");
            std::fs::remove_dir_all(path)?;
        }
    }
    for (n, path) in names {
        set.next_dir = set.next_dir.max(n + 1);
        if replaced.contains(&n) {
            continue;
        }
        match Block::open(&path) {
            Ok((block, bytes)) => {
                damaged += bytes;
                set.blocks.push(Arc::new(block));
            }
            Err(e) => {
                let aside = path.with_extension("damaged");
                tracing::error!(block = %path.display(), error = %e, moved_to = %aside.display(), "cannot open a block; set it aside");
                damaged += wal::dir_bytes(&path);
                std::fs::rename(&path, &aside)?;
            }
        }
    }
    set.blocks.sort_by_key(|b| b.meta.order);
    set.next_order = set.blocks.last().map_or(0, |b| b.meta.order + 1);
    Ok((set, damaged))
}

/// Applies one log record to the head (on replay and after logging). Samples at or before a
/// series' flushed time are already in blocks (replay) and are skipped.
pub(super) fn apply(head: &mut Head, record: Record, flushed: &HashMap<u64, TimestampMs>) {
    match record {
        Record::Series { tenant, id, labels } => {
            if !head.series.contains_key(&id) {
                head.create_series(&tenant, id, &labels);
                if let (Some(&t), Some(series)) = (flushed.get(&id), head.series.get_mut(&id)) {
                    series.held_mut().flushed_until = t;
                }
            }
        }
        Record::Samples { samples } => {
            let (mut min_t, mut max_t) = (i64::MAX, i64::MIN);
            for (id, t, v) in samples {
                if let Some(series) = head.series.get_mut(&id) {
                    let held = series.held_mut();
                    if t > held.flushed_until {
                        held.samples.insert(Sample { t, v });
                        (min_t, max_t) = (min_t.min(t), max_t.max(t));
                    }
                }
            }
            head.applied(min_t, max_t);
        }
        Record::SeriesSamples { id, samples } => {
            let (mut min_t, mut max_t) = (i64::MAX, i64::MIN);
            if let Some(series) = head.series.get_mut(&id) {
                let held = series.held_mut();
                for sample in samples {
                    if sample.t > held.flushed_until {
                        held.samples.insert(sample);
                        (min_t, max_t) = (min_t.min(sample.t), max_t.max(sample.t));
                    }
                }
            }
            head.applied(min_t, max_t);
        }
        Record::Metadata { tenant, metadata } => head.add_metadata(&tenant, metadata),
        Record::Flushed { marks } => {
            for (id, t) in marks {
                if let Some(series) = head.series.get_mut(&id) {
                    let held = series.held_mut();
                    held.flushed_until = held.flushed_until.max(t);
                }
            }
        }
        Record::Exemplars { exemplars } => {
            for (id, t, value, labels) in exemplars {
                head.add_exemplar(id, crate::model::Exemplar { labels, value, t });
            }
        }
    }
}
