//! Reading: the series a query matches and their samples, from blocks, samples being
//! flushed and the head.
//!
//! A read takes what it needs under the head's read lock, for as long as copying it takes
//! ([`HeadView`]): the matching series, their head samples in the range, and (taking the
//! blocks' lock inside, in the order a flush takes them) the list of blocks and the samples
//! being flushed. It lets go before reading any block, so a long read never holds up writers
//! (who hold the head shared, or alone for a series new to it) longer than that. Both copies come from one moment: a flush
//! moves samples from the head into `flushing` under both locks, so each sample is in exactly
//! one of the copies (a sample rolled up twice would be counted twice; a flush moves them a
//! batch of series at a time, each under both locks). Labels are fetched afterwards for the
//! series in the answer only (from the blocks' indexes for a series the head forgot since).

use super::*;
use crate::storage::Merge;
use head::SeriesData;
use rayon::prelude::*;

/// What a read takes at one moment: the series that match (sorted ids), their head samples
/// in the range, and the blocks' part.
pub(super) struct HeadView {
    pub ids: Vec<u64>,
    pub samples: HashMap<u64, Vec<Sample>>,
    pub set: BlocksView,
}

/// What a read takes from the blocks' set, under its lock for no longer than cloning takes:
/// the blocks (shared) and the samples being flushed of the series read.
pub(super) struct BlocksView {
    pub blocks: Vec<Arc<Block>>,
    pub flushing: BTreeMap<u64, Vec<Chunk>>,
}

impl EmbeddedStorage {
    /// The blocks' part of a read of `ids` over `[start, end]`; taken with the head's read
    /// lock held ([`HeadView`]).
    fn blocks_view(&self, ids: &[u64], (start, end): (TimestampMs, TimestampMs)) -> BlocksView {
        let set = self.blocks_read();
        BlocksView {
            blocks: set.blocks.clone(),
            flushing: if set.flushing.is_empty() {
                BTreeMap::new()
            } else {
                ids.iter()
                    .filter_map(|id| {
                        let chunks: Vec<Chunk> = set
                            .flushing
                            .get(id)?
                            .iter()
                            .filter(|c| c.max_t >= start && c.min_t <= end)
                            .cloned()
                            .collect();
                        (!chunks.is_empty()).then_some((*id, chunks))
                    })
                    .collect()
            },
        }
    }

    /// The labels of `ids`: from the head, else (a series the head forgot since the read
    /// began) from the blocks' indexes. Many are copied out of the head on the read threads
    /// side by side (64,000 series' label sets take tens of milliseconds on one).
    pub(super) async fn labels_of(&self, ids: Vec<u64>) -> StorageResult<HashMap<u64, Labels>> {
        let mut missing = Vec::new();
        let mut out: HashMap<u64, Labels> = {
            let head = self.read();
            let copy = |&id: &u64| match head.series.get(&id) {
                Some(s) => Ok((id, s.labels.to_labels())),
                None => Err(id),
            };
            let copied: Vec<Result<(u64, Labels), u64>> = match read_pool() {
                Some(pool) if ids.len() >= HEAD_PARALLEL_MIN_SERIES => {
                    pool.install(|| ids.par_iter().with_min_len(256).map(copy).collect())
                }
                _ => ids.iter().map(copy).collect(),
            };
            drop(head);
            let mut out = HashMap::default();
            out.reserve(copied.len());
            for one in copied {
                match one {
                    Ok((id, labels)) => {
                        out.insert(id, labels);
                    }
                    Err(id) => missing.push(id),
                }
            }
            out
        };
        if missing.is_empty() {
            return Ok(out);
        }
        missing.sort_unstable();
        let blocks = self.blocks_read().blocks.clone();
        let found = off_runtime(move |stop| {
            let mut found: HashMap<u64, Labels> = HashMap::default();
            for index in blocks.iter().rev().filter_map(|b| b.index.as_ref()) {
                stopped(stop)?;
                missing.retain(|id| !found.contains_key(id));
                if missing.is_empty() {
                    break;
                }
                // A damaged index leaves its series out of the answer, as a damaged run does.
                match index.labels(&missing) {
                    Ok((labels, _)) => found.extend(labels.into_iter().map(|(id, _, l)| (id, l))),
                    Err(e) => tracing::error!(error = %e, "skipping a damaged series index"),
                }
            }
            Ok(found)
        })
        .await?;
        out.extend(found);
        Ok(out)
    }

    /// The head's part of a read of `matchers` over `[start, end]`, copied under its read
    /// lock; fails as soon as more than `max_samples` (0: no limit) were copied (checked
    /// every [`HEAD_DECODE_SLICE`] series).
    pub(super) fn head_view(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        (start, end): (TimestampMs, TimestampMs),
        max_samples: usize,
    ) -> StorageResult<HeadView> {
        let head = self.read();
        let mut ids = head.matching(tenant.as_str(), matchers);
        ids.sort_unstable();
        // No writer applies while the samples are copied: each request is seen whole or not
        // at all (a sum of a host's memory states never mixes two exports).
        let visible = self.visibility.write().unwrap_or_else(|e| e.into_inner());
        let decode = |id: &u64| {
            let series = head.series.get(id)?;
            let mut range = Vec::new();
            series.held().samples.range_into(start, end, &mut range);
            (!range.is_empty()).then_some((*id, range))
        };
        let mut samples: HashMap<u64, Vec<Sample>> = HashMap::default();
        let mut copied = 0usize;
        // Many series are decoded on the read threads side by side, a slice at a time so
        // the sample limit stops the read within a slice of it.
        for slice in ids.chunks(HEAD_DECODE_SLICE) {
            let decoded: Vec<(u64, Vec<Sample>)> = match read_pool() {
                Some(pool) if slice.len() >= HEAD_PARALLEL_MIN_SERIES => pool.install(|| {
                    slice
                        .par_iter()
                        .with_min_len(64)
                        .filter_map(decode)
                        .collect()
                }),
                _ => slice.iter().filter_map(decode).collect(),
            };
            copied += decoded.iter().map(|(_, s)| s.len()).sum::<usize>();
            if max_samples > 0 && copied > max_samples {
                return Err(StorageError::TooManySamples);
            }
            samples.extend(decoded);
        }
        drop(visible);
        let set = self.blocks_view(&ids, (start, end));
        drop(head);
        Ok(HeadView { ids, samples, set })
    }

    /// The labels of the series of `query` that have samples in its range, in the head, in
    /// samples being flushed or in a block; the head's part taken (and its lock let go)
    /// before any block is read.
    pub(super) async fn series_labels(
        &self,
        tenant: &TenantId,
        query: &SeriesQuery,
    ) -> StorageResult<Vec<Labels>> {
        let (ids, mut found, set) = {
            let head = self.read();
            let mut ids: BTreeSet<u64> = BTreeSet::new();
            if query.matcher_sets.is_empty() {
                ids.extend(head.matching(tenant.as_str(), &[]));
            }
            for set in &query.matcher_sets {
                ids.extend(head.matching(tenant.as_str(), set));
            }
            let found: BTreeSet<u64> = ids
                .iter()
                .copied()
                .filter(|&id| head.has_samples(id, query.start, query.end))
                .collect();
            let ids: Vec<u64> = ids.into_iter().collect();
            let set = self.blocks_view(&ids, (query.start, query.end));
            (ids, found, set)
        };
        let (start, end) = (query.start, query.end);
        let tenant = tenant.as_str().to_owned();
        let matcher_sets = if query.matcher_sets.is_empty() {
            vec![Vec::new()]
        } else {
            query.matcher_sets.clone()
        };
        let (found, mut labels) = off_runtime(move |stop| {
            // Series only blocks hold, with their labels.
            let mut beyond: BTreeMap<u64, Labels> = BTreeMap::new();
            for matchers in &matcher_sets {
                let mut known: Vec<u64> =
                    ids.iter().copied().chain(beyond.keys().copied()).collect();
                known.sort_unstable();
                // Damaged indexes are logged; `/series` has no warnings to carry them.
                let (found, _damaged) =
                    block_series(&set.blocks, &tenant, matchers, (start, end), &known, stop)?;
                beyond.extend(found);
            }
            let mut ids = ids;
            ids.extend(beyond.keys().copied());
            ids.sort_unstable();
            found.extend(ids.iter().copied().filter(|id| {
                set.flushing
                    .get(id)
                    .is_some_and(|chunks| chunks_any_in(chunks, start, end))
            }));
            for block in &set.blocks {
                stopped(stop)?;
                let rest: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|id| !found.contains(id))
                    .collect();
                if rest.is_empty() {
                    break;
                }
                found.extend(
                    block
                        .series_in_range(&rest, start, end)
                        .map_err(block_error)?,
                );
            }
            Ok((found, beyond))
        })
        .await?;
        let in_head: Vec<u64> = found
            .iter()
            .copied()
            .filter(|id| !labels.contains_key(id))
            .collect();
        labels.extend(self.labels_of(in_head).await?);
        Ok(found
            .into_iter()
            .filter_map(|id| labels.remove(&id))
            .collect())
    }
}

impl EmbeddedStorage {
    /// Label names (`name` is `None`) or the values of one label, for a query without
    /// matchers, from indexes: the head's series with samples in `[start, end]`, and the
    /// indexes of the blocks overlapping it. As Prometheus answers from a block's index, a
    /// block contributes every series it holds, wherever in the block their samples lie.
    /// `None` when a block overlapping the range has no index (the caller derives the answer
    /// from the series instead).
    pub(super) async fn indexed_label_values(
        &self,
        tenant: &TenantId,
        name: Option<&str>,
        (start, end): (TimestampMs, TimestampMs),
    ) -> StorageResult<Option<StringList>> {
        let (out, blocks) = {
            let head = self.read();
            let set = self.blocks_read();
            let blocks: Vec<Arc<Block>> = set
                .blocks
                .iter()
                .filter(|b| b.meta.max_t >= start && b.meta.min_t <= end)
                .cloned()
                .collect();
            if blocks.iter().any(|b| b.index.is_none()) {
                return Ok(None);
            }
            // As Prometheus answers from its head and blocks, a series counts when the span
            // of its samples overlaps the range (bounds only, nothing decoded). When the
            // head's whole span lies in the range (a dashboard's usual question), every name
            // and value of the head counts with no series looked at; when it lies outside,
            // none; else a name or value counts once one of its series does (most often the
            // first looked at).
            let mut out = StringList::new();
            if let Some(index) = head.tenants.get(tenant.as_str()) {
                // Whether series `id` (`s` in the head, if it is there) has samples in range.
                let overlaps_series = |id: &u64, s: Option<&SeriesData>| {
                    s.is_some_and(|s| s.held().samples.overlaps(start, end))
                        || set.flushing.get(id).is_some_and(|chunks| {
                            chunks.iter().any(|c| c.min_t <= end && c.max_t >= start)
                        })
                };
                let overlaps = |id: &u64| overlaps_series(id, head.series.get(id));
                let (every, none) = match (head.min_t.get(), head.max_t.get()) {
                    (Some(lo), Some(hi)) => (
                        lo >= start && hi <= end,
                        (hi < start || lo > end) && set.flushing.is_empty(),
                    ),
                    _ => (false, set.flushing.is_empty()),
                };
                // (A postings list may still name series being forgotten, the oldest: the
                // head holds neither them nor their samples. Looked at newest first.)
                let first_used = |key: &u64| -> Option<&SeriesData> {
                    let ids = index.postings.get(key)?;
                    if every {
                        head.newest_live(ids)
                    } else {
                        let id = ids.iter().rev().find(|id| overlaps(id))?;
                        head.series.get(id)
                    }
                };
                if !none {
                    match name {
                        None => {
                            for (name, keys) in &index.names {
                                if keys.iter().any(|k| first_used(k).is_some()) {
                                    out.push(name);
                                }
                            }
                        }
                        Some(name) => {
                            let keys = index.names.get(name);
                            if keys
                                .is_some_and(|k| index.collided || k.len() * 4 >= head.series.len())
                            {
                                // Nearly a value a series (an id, a pid, a path): the series
                                // are read in the order the head stores them, not looked up
                                // value by value (four lookups each, all cache misses). Also
                                // when two pairs met under one postings key: a key's first
                                // series would stand for one of them only.
                                // Each set is prefetched 16 series ahead of its read.
                                let mut ahead = head.series.iter();
                                ahead
                                    .by_ref()
                                    .take(16)
                                    .for_each(|(_, s)| s.labels.prefetch());
                                for (id, s) in &head.series {
                                    if let Some((_, next)) = ahead.next() {
                                        next.labels.prefetch();
                                    }
                                    if *s.tenant != *tenant.as_str() {
                                        continue;
                                    }
                                    if let Some(value) = s.labels.get(name) {
                                        if every || overlaps_series(id, Some(s)) {
                                            out.push(value);
                                        }
                                    }
                                }
                            } else {
                                for key in keys.into_iter().flatten() {
                                    if let Some(value) =
                                        first_used(key).and_then(|s| s.labels.get(name))
                                    {
                                        out.push(value);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            (out, blocks)
        };
        let (tenant, name) = (tenant.as_str().to_owned(), name.map(str::to_owned));
        off_runtime(move |stop| {
            // Sorted with no lock held.
            let mut out = out.sorted_distinct();
            for block in &blocks {
                stopped(stop)?;
                let index = block.index.as_ref().expect("checked above");
                let abandoned = || index::abandoned(stop);
                // Merged as they are read: memory holds the distinct values once, not every
                // block's copy of them.
                let mut merge = Merge::new(&out);
                let read = match &name {
                    None => index
                        .names(&tenant)
                        .map(|names| names.iter().for_each(|n| merge.push(n))),
                    Some(name) => {
                        index.each_value_of(&tenant, name, &abandoned, &mut |v| merge.push(v))
                    }
                };
                out = match (read, &name) {
                    (Ok(()), _) => merge.finish(),
                    // (The names answer from the block's series already when their table is
                    // damaged.)
                    (Err(e), None) => return Err(block_error(e)),
                    (Err(_), Some(name)) => {
                        // Damaged or abandoned: the values again, from the block's series if
                        // its tables cannot say (logged).
                        drop(merge);
                        stopped(stop)?;
                        let values = index
                            .values(&tenant, name, &abandoned)
                            .map_err(block_error)?;
                        let mut merge = Merge::new(&out);
                        values.iter().for_each(|v| merge.push(v));
                        merge.finish()
                    }
                };
            }
            Ok(Some(out))
        })
        .await
    }
}

fn block_error(e: std::io::Error) -> StorageError {
    StorageError::Internal(format!("reading a block: {e}"))
}

/// The series of a tenant that `matchers` select in the blocks overlapping `[start, end]`
/// whose series are not all in the head, other than `known` (sorted; the head's), with their
/// labels, and the number of indexes that could not be read (logged and skipped, as damaged
/// runs are: the answer lacks their series). Each block's index answers for its own series.
pub(super) fn block_series(
    blocks: &[Arc<Block>],
    tenant: &str,
    matchers: &[Matcher],
    (start, end): (TimestampMs, TimestampMs),
    known: &[u64],
    stop: &AtomicBool,
) -> StorageResult<(BTreeMap<u64, Labels>, usize)> {
    let mut out: BTreeMap<u64, Labels> = BTreeMap::new();
    let mut damaged = 0;
    for block in blocks {
        stopped(stop)?;
        let Some(index) = block.index_beyond_head() else {
            continue;
        };
        if block.meta.max_t < start || block.meta.min_t > end {
            continue;
        }
        let read = || -> std::io::Result<index::SeriesRead> {
            let (ids, unmatched) = index.matching(tenant, matchers, stop)?;
            let mut ids: Vec<u64> = ids
                .into_iter()
                .filter(|id| known.binary_search(id).is_err() && !out.contains_key(id))
                .collect();
            // Labels only of series with samples in the range (the block's run index knows
            // each series' first and last sample): a block that overlaps the range by its
            // last minutes holds many series that ended before it. Without raw chunks (gone
            // by retention) its rollups are read, and every series stays.
            if block.chunks.is_some() && !ids.is_empty() {
                ids = block.series_in_range(&ids, start, end)?;
            }
            if ids.is_empty() {
                return Ok((Vec::new(), unmatched));
            }
            let (found, skipped) = index.labels(&ids)?;
            Ok((found, skipped + unmatched))
        };
        match read() {
            Ok((found, skipped)) => {
                damaged += skipped;
                out.extend(found.into_iter().map(|(id, _, labels)| (id, labels)));
            }
            Err(_) if stop.load(Ordering::Relaxed) => stopped(stop)?,
            Err(e) => {
                tracing::error!(error = %e, block = %block.dir.display(), "skipping a damaged series index");
                damaged += 1;
            }
        }
    }
    Ok((out, damaged))
}

/// Sorts series by labels, on the read threads when there are many.
///
/// Many series' labels are compared through a copy in one buffer, each set written as
/// `name 0 value 0 ...`, with the first eight bytes past what every set shares beside its
/// index: most comparisons are of two integers, the rest of two runs of bytes, where comparing
/// [`Labels`] follows two pointers a label (64,000 series: the sort took an eighth of the
/// CPU of the `storage_peers` heavy aggregation, a third of that after). The bytes compare as the labels do
/// (label by label, name then value, a set that is a prefix of another first) when no name
/// or value holds a zero byte; one that does sorts them as labels.
pub(super) fn sort_by_labels(series: &mut Vec<SeriesSamples>) {
    if series.len() < 2 {
        return;
    }
    let mut bytes: Vec<u8> = Vec::new();
    let mut ends: Vec<usize> = Vec::with_capacity(series.len());
    for s in series.iter() {
        for label in s.labels.iter() {
            bytes.extend_from_slice(label.name.as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(label.value.as_bytes());
            bytes.push(0);
        }
        ends.push(bytes.len());
    }
    // (Names from OTLP untranslated may hold any character too.)
    let zero_byte = series.iter().any(|s| {
        s.labels
            .iter()
            .any(|l| l.name.as_bytes().contains(&0) || l.value.as_bytes().contains(&0))
    });
    if zero_byte {
        series.sort_unstable_by(|a, b| a.labels.cmp(&b.labels));
        return;
    }
    let key = |i: usize| &bytes[if i == 0 { 0 } else { ends[i - 1] }..ends[i]];
    let first = key(0);
    let shared = (1..series.len())
        .map(|i| first.iter().zip(key(i)).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(0);
    let mut order: Vec<(u64, u32)> = (0..series.len())
        .map(|i| {
            let rest = &key(i)[shared..];
            let mut head = [0u8; 8];
            let n = rest.len().min(8);
            head[..n].copy_from_slice(&rest[..n]);
            (u64::from_be_bytes(head), i as u32)
        })
        .collect();
    let compare = |a: &(u64, u32), b: &(u64, u32)| {
        a.0.cmp(&b.0)
            .then_with(|| key(a.1 as usize)[shared..].cmp(&key(b.1 as usize)[shared..]))
    };
    match read_pool() {
        Some(pool) if series.len() >= HEAD_PARALLEL_MIN_SERIES => {
            pool.install(|| order.par_sort_unstable_by(compare))
        }
        _ => order.sort_unstable_by(compare),
    }
    let mut slots: Vec<Option<SeriesSamples>> = series.drain(..).map(Some).collect();
    series.extend(order.iter().filter_map(|&(_, i)| slots[i as usize].take()));
}

/// Threads (one per core) that decode a large read's head series while the head's read lock
/// is held, and sort large answers: the reads' own, not the query threads, so a read holding
/// the lock never waits behind a query's evaluation for a thread. `None` on one core, or if
/// the threads cannot be started: reads then decode on their own thread.
fn read_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if threads < 2 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("secumon-read-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Series a head read decodes between checks of the sample limit.
const HEAD_DECODE_SLICE: usize = 8192;

/// Series a head read must decode before it splits them over the read threads.
const HEAD_PARALLEL_MIN_SERIES: usize = 512;

/// `a` (sorted) with the keys of `b`, sorted.
pub(super) fn with_ids(mut a: Vec<u64>, b: &BTreeMap<u64, Labels>) -> Vec<u64> {
    if !b.is_empty() {
        a.extend(b.keys().copied());
        a.sort_unstable();
        a.dedup();
    }
    a
}

/// Raw samples of `ids` (sorted) in `[start, end]` from blocks, samples being flushed and
/// `head` (the head's samples in the range, taken before), per series in time order, with the damaged runs skipped. Fails with
/// [`StorageError::TooManySamples`] as soon as more than `max_samples` were read (0: no
/// limit), before reading the rest.
pub(super) fn samples_of(
    mut head: HashMap<u64, Vec<Sample>>,
    blocks: &[Arc<Block>],
    flushing: &BTreeMap<u64, Vec<Chunk>>,
    ids: &[u64],
    (start, end): (TimestampMs, TimestampMs),
    max_samples: usize,
    stop: &AtomicBool,
) -> StorageResult<(BTreeMap<u64, Vec<Sample>>, usize)> {
    let mut out: BTreeMap<u64, Vec<Sample>> = BTreeMap::new();
    let (mut damaged, mut loaded) = (0, 0usize);
    let over = |loaded: usize| max_samples > 0 && loaded > max_samples;
    for block in blocks {
        stopped(stop)?;
        let stats = block
            .read_samples(ids, start, end, budget_left(max_samples, loaded), &mut out)
            .map_err(|e| StorageError::Internal(format!("reading a block: {e}")))?;
        damaged += stats.damaged;
        loaded += stats.samples;
        if over(loaded) {
            return Err(StorageError::TooManySamples);
        }
    }
    for &id in ids {
        let flushing = flushing.get(&id);
        let mut in_head = head.remove(&id);
        if flushing.is_none() && in_head.is_none() {
            continue;
        }
        let samples = out.entry(id).or_default();
        if flushing.is_none() && samples.is_empty() {
            if let Some(head_samples) = in_head.take() {
                // Only in the head (the usual case for recent data): moved, not copied.
                loaded += head_samples.len();
                *samples = head_samples;
                if over(loaded) {
                    return Err(StorageError::TooManySamples);
                }
                continue;
            }
        }
        let before = samples.len();
        if let Some(chunks) = flushing {
            chunks_range_into(chunks, start, end, samples);
        }
        if let Some(head_samples) = in_head {
            samples.extend(head_samples);
        }
        loaded += samples.len() - before;
        if over(loaded) {
            return Err(StorageError::TooManySamples);
        }
    }
    for samples in out.values_mut() {
        if !samples.windows(2).all(|w| w[0].t < w[1].t) {
            samples.sort_by_key(|s| s.t);
            samples.dedup_by_key(|s| s.t);
        }
    }
    Ok((out, damaged))
}

/// Fails once the caller has stopped waiting for a read (its query timed out or went away).
pub(super) fn stopped(stop: &AtomicBool) -> StorageResult<()> {
    if stop.load(Ordering::Relaxed) {
        return Err(StorageError::Internal("read abandoned".into()));
    }
    Ok(())
}

/// Runs a read of blocks on a blocking thread, off the runtime's workers (which serve
/// ingest), and tells it to stop when the caller stops waiting: a query that times out or
/// whose client goes away stops reading at the next block.
pub(super) async fn off_runtime<T: Send + 'static>(
    read: impl FnOnce(&AtomicBool) -> StorageResult<T> + Send + 'static,
) -> StorageResult<T> {
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Stop(Arc::new(AtomicBool::new(false)));
    let flag = stop.0.clone();
    let result = tokio::task::spawn_blocking(move || read(&flag))
        .await
        .map_err(|e| StorageError::Internal(format!("a read failed: {e}")))?;
    drop(stop);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_the_caller_stops_waiting_for_stops() {
        let saw_stop = Arc::new(AtomicBool::new(false));
        let seen = saw_stop.clone();
        let read = off_runtime(move |stop| {
            // A read of many blocks: it checks between blocks.
            for _ in 0..10_000 {
                if stopped(stop).is_err() {
                    seen.store(true, Ordering::SeqCst);
                    return Err(StorageError::Internal("stopped".into()));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(())
        });
        // The query's timeout drops the read.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), read)
                .await
                .is_err()
        );
        let waited = std::time::Instant::now();
        while !saw_stop.load(Ordering::SeqCst) {
            assert!(
                waited.elapsed() < std::time::Duration::from_secs(5),
                "the read went on after its caller stopped waiting"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn series_sort_as_their_labels_do() {
        use crate::model::{Label, Labels, SeriesSamples};
        let set = |pairs: &[(&str, &str)]| SeriesSamples {
            labels: Labels::from_trusted(pairs.iter().map(|(n, v)| Label::new(*n, *v)).collect()),
            samples: Vec::new(),
        };
        // Shared prefixes, a set that is a prefix of another, values that are prefixes of
        // others, names that are, long runs past the first eight bytes, and many series (the
        // parallel sort).
        let mut all = vec![
            set(&[("__name__", "m")]),
            set(&[("__name__", "m"), ("a", "")]),
            set(&[("__name__", "m"), ("a", "1")]),
            set(&[("__name__", "m"), ("a", "1"), ("b", "2")]),
            set(&[("__name__", "m"), ("a", "10")]),
            set(&[("__name__", "m"), ("aa", "1")]),
            set(&[("__name__", "m"), ("a", "1\u{e9}")]),
            set(&[("__name__", "mm")]),
            set(&[
                ("__name__", "m"),
                ("a", "1"),
                ("b", "2"),
                ("c", "x".repeat(40).as_str()),
            ]),
            set(&[
                ("__name__", "m"),
                ("a", "1"),
                ("b", "2"),
                ("c", "x".repeat(41).as_str()),
            ]),
        ];
        for i in 0..2_000u32 {
            let (host, cpu) = (
                format!("host-{:04}", i.wrapping_mul(7919) % 997),
                (i % 8).to_string(),
            );
            all.push(set(&[
                ("__name__", "node_cpu_seconds_total"),
                ("cpu", &cpu),
                ("instance", &host),
                ("mode", if i % 3 == 0 { "idle" } else { "user" }),
            ]));
        }
        let expect = |series: &[SeriesSamples]| {
            let mut labels: Vec<Labels> = series.iter().map(|s| s.labels.clone()).collect();
            labels.sort();
            labels.dedup();
            labels
        };
        for mut series in [
            all.clone(),
            all[..2].to_vec(),
            all[..1].to_vec(),
            Vec::new(),
        ] {
            series.reverse();
            let want = expect(&series);
            // Duplicates (two of a label set cannot come from a select) left out of the check.
            series.sort_by(|a, b| a.labels.cmp(&b.labels));
            series.dedup_by(|a, b| a.labels == b.labels);
            series.reverse();
            sort_by_labels(&mut series);
            let got: Vec<Labels> = series.into_iter().map(|s| s.labels).collect();
            assert_eq!(got, want);
        }
        // A zero byte in a value or a name: sorted as labels.
        for mut series in [
            vec![
                set(&[("a", "x\0y")]),
                set(&[("a", "x")]),
                set(&[("a", "x\0")]),
            ],
            vec![set(&[("a\0", "b")]), set(&[("a", "x")])],
        ] {
            let want = expect(&series);
            sort_by_labels(&mut series);
            let got: Vec<Labels> = series.into_iter().map(|s| s.labels).collect();
            assert_eq!(got, want);
        }
    }
}
