//! Reading: the series a query matches and their samples, from blocks, samples being
//! flushed and the head.

use super::*;

impl EmbeddedStorage {
    /// Raw samples of `ids` (sorted) in `[start, end]` from blocks, samples being flushed and
    /// the head, per series in time order, with the damaged runs skipped. Fails with
    /// [`StorageError::TooManySamples`] as soon as more than `max_samples` were read (0: no
    /// limit), before reading the rest.
    pub(super) fn samples_of(
        &self,
        head: &Head,
        blocks: &[Block],
        flushing: &BTreeMap<u64, Vec<Chunk>>,
        ids: &[u64],
        (start, end): (TimestampMs, TimestampMs),
        max_samples: usize,
    ) -> StorageResult<(BTreeMap<u64, Vec<Sample>>, usize)> {
        let mut out: BTreeMap<u64, Vec<Sample>> = BTreeMap::new();
        let (mut damaged, mut loaded) = (0, 0usize);
        let over = |loaded: usize| max_samples > 0 && loaded > max_samples;
        for block in blocks {
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
            let in_head = head.series.get(&id);
            if flushing.is_none() && in_head.is_none() {
                continue;
            }
            let samples = out.entry(id).or_default();
            let before = samples.len();
            if let Some(chunks) = flushing {
                chunks_range_into(chunks, start, end, samples);
            }
            if let Some(series) = in_head {
                series.samples.range_into(start, end, samples);
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

    pub(super) fn series_ids(
        &self,
        head: &Head,
        tenant: &TenantId,
        query: &SeriesQuery,
    ) -> StorageResult<Vec<u64>> {
        let mut ids: BTreeSet<u64> = BTreeSet::new();
        if query.matcher_sets.is_empty() {
            ids.extend(head.matching(tenant.as_str(), &[]));
        }
        for set in &query.matcher_sets {
            ids.extend(head.matching(tenant.as_str(), set));
        }
        let ids: Vec<u64> = ids.into_iter().collect();
        let set = self.blocks_read();
        let mut found: BTreeSet<u64> = ids
            .iter()
            .copied()
            .filter(|&id| {
                head.has_samples(id, query.start, query.end)
                    || set
                        .flushing
                        .get(&id)
                        .is_some_and(|chunks| chunks_any_in(chunks, query.start, query.end))
            })
            .collect();
        for block in &set.blocks {
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
                    .series_in_range(&rest, query.start, query.end)
                    .map_err(|e| StorageError::Internal(format!("reading a block: {e}")))?,
            );
        }
        Ok(found.into_iter().collect())
    }
}
