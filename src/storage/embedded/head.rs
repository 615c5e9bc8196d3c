//! The in-memory state of the embedded engine: series with their samples, a postings index
//! per tenant (label name → value → series ids) and metadata. Everything here is rebuilt from
//! the write-ahead log on start.

use super::chunk::{Appender, Chunk};
use super::index::{gallop, postings_for_matchers, Candidates, PostingsSource};
use crate::model::{
    matches_all, Exemplar, Labels, Matcher, MetricMetadata, PackedLabels, Sample, SeriesExemplars,
    TimestampMs,
};
use rustc_hash::FxHashMap as HashMap;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub(super) struct SeriesData {
    /// Shared with the tenant's index.
    pub tenant: Arc<str>,
    /// Packed: one allocation instead of two strings per label.
    pub labels: PackedLabels,
    /// Its samples: writers lock it with the head shared, from judging a request's samples
    /// to applying them, so writers of other series go on side by side.
    held: Mutex<Held>,
    /// Sorted by time, unique times; in the head's exemplar ring.
    pub exemplars: VecDeque<Exemplar>,
}

/// What a series holds in the head that writers change.
pub(super) struct Held {
    pub samples: SampleStore,
    /// The latest sample time already flushed to a block: samples at or before it are
    /// refused (they would land in a range that is on disk).
    pub flushed_until: TimestampMs,
}

impl SeriesData {
    /// Its samples, locked (with the head shared).
    pub fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its samples, with the head held alone.
    pub fn held_mut(&mut self) -> &mut Held {
        self.held.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

/// A time writers change with the head shared; `NONE` stands for no time yet.
pub(super) struct SharedTime<const NONE: i64>(AtomicI64);

/// The latest of the times it is raised to (`None` before any).
pub(super) type Latest = SharedTime<{ i64::MIN }>;

/// The earliest of the times it is lowered to (`None` before any, or once reset).
pub(super) type Earliest = SharedTime<{ i64::MAX }>;

impl<const NONE: i64> Default for SharedTime<NONE> {
    fn default() -> Self {
        SharedTime(AtomicI64::new(NONE))
    }
}

impl<const NONE: i64> SharedTime<NONE> {
    pub fn get(&self) -> Option<TimestampMs> {
        let t = self.0.load(Ordering::Relaxed);
        (t != NONE).then_some(t)
    }

    pub fn set(&self, t: Option<TimestampMs>) {
        self.0.store(t.unwrap_or(NONE), Ordering::Relaxed);
    }
}

impl Latest {
    pub fn raise(&self, t: TimestampMs) {
        self.0.fetch_max(t, Ordering::Relaxed);
    }
}

impl Earliest {
    pub fn lower(&self, t: TimestampMs) {
        self.0.fetch_min(t, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub(super) struct TenantIndex {
    pub tenant: Arc<str>,
    pub by_fingerprint: HashMap<u128, u64>,
    /// hash of (label name, value) → series ids (ascending). Keyed by a hash so the strings
    /// are not held twice; a collision only adds candidates, which the matchers then drop.
    pub postings: HashMap<u64, Vec<u64>>,
    /// Two label pairs of this tenant met under one postings key: its reads then check every
    /// candidate's labels against the matchers (postings alone are trusted otherwise).
    pub collided: bool,
    /// label name → the postings keys of its values: a matcher other than `=` runs over a
    /// label's values (each read from the first series of its postings), not over series.
    pub names: HashMap<Box<str>, HashSet<u64>>,
    /// Ascending.
    pub all: Vec<u64>,
    pub metadata: BTreeMap<String, Vec<MetricMetadata>>,
}

#[derive(Default)]
pub(super) struct Head {
    pub series: HashMap<u64, SeriesData>,
    pub tenants: HashMap<String, TenantIndex>,
    pub next_id: u64,
    /// The latest sample time ever applied.
    pub max_t: Latest,
    /// No sample in the head is older (recomputed at each flush; `None`: none applied yet).
    pub min_t: Earliest,
    /// The oldest sample applied since a flush rotated the log (it resets this then): with
    /// the oldest of what the flush leaves, the head's new `min_t`.
    pub applied_min_t: Earliest,
    /// Every exemplar kept, (series, time), oldest stored first: a ring of at most
    /// `exemplar_limit`, as Prometheus's circular exemplar storage
    /// (`--storage.tsdb.max-exemplars`); storing one more drops the oldest.
    pub exemplar_order: VecDeque<(u64, TimestampMs)>,
    pub exemplar_limit: usize,
}

/// Series taken out of the head whose postings are still to prune ([`Head::forget_empty`]).
#[derive(Default)]
pub(super) struct Forgotten {
    /// Ascending (the order they were forgotten in).
    pub ids: Vec<u64>,
    lists: PruneLists,
}

/// Per tenant, the postings lists to prune: key → label name.
#[derive(Default)]
struct PruneLists {
    lists: HashMap<Arc<str>, HashMap<u64, Box<str>>>,
    /// The lists being pruned, taken from `lists`, last first: per tenant its list of every
    /// series (`None`) below its postings lists.
    queue: Vec<(Arc<str>, PruneList, u64)>,
}

/// A postings list (key, label name), or (`None`) a tenant's list of every series.
type PruneList = Option<(u64, Box<str>)>;

impl Forgotten {
    /// Lines up the lists to prune: with no lock held, before [`Head::prune_postings`] (which
    /// does it itself otherwise), since it costs a step per list.
    pub fn line_up(&mut self) {
        self.lists.line_up();
    }
}

impl PruneLists {
    fn line_up(&mut self) {
        for (tenant, lists) in self.lists.drain() {
            self.queue.push((tenant.clone(), None, 0));
            self.queue.extend(
                lists
                    .into_iter()
                    .map(|(key, name)| (tenant.clone(), Some((key, name)), 0)),
            );
        }
    }

    /// The next list to prune, and the id to start at.
    fn next(&mut self) -> Option<(Arc<str>, PruneList, u64)> {
        if self.queue.is_empty() {
            self.line_up();
        }
        self.queue.pop()
    }

    /// A list to go on with next, from id `from`.
    fn resume(&mut self, tenant: Arc<str>, list: PruneList, from: u64) {
        self.queue.push((tenant, list, from));
    }
}

/// Where a sample goes in a series, or why it does not.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Placement {
    /// New timestamp: store it.
    Insert,
    /// Same timestamp and value bits as stored: nothing to do (a sender's retry).
    Duplicate,
    /// Same timestamp, other value.
    Conflict,
    /// Older than the out-of-order window allows.
    TooOld,
}

/// What taking a list up costs [`Head::prune_postings`], counted in ids looked at: a million
/// one-series lists (a `pid` label) cost more than their million ids.
const PRUNE_LIST_COST: usize = 16;

/// Series few enough that checking a query's other matchers on their label sets beats reading
/// the postings of every value those matchers accept.
const FEW_CANDIDATES: usize = 4096;

/// Samples per compressed chunk: Prometheus's 120 (two hours at one-minute scrapes).
const CHUNK_SAMPLES: usize = 120;

/// One series' samples: closed compressed chunks, then the open run of recent samples.
/// Timestamps are unique and ascending across both.
#[derive(Default)]
pub(super) struct SampleStore {
    chunks: Vec<Chunk>,
    /// The open chunk: recent samples, compressed as they arrive.
    open: Appender,
}

impl SampleStore {
    /// See [`Appender::prefetch_tail`].
    pub fn prefetch_open(&self) {
        self.open.prefetch_tail();
    }

    pub fn latest(&self) -> Option<TimestampMs> {
        if self.open.is_empty() {
            self.chunks.last().map(|c| c.max_t)
        } else {
            Some(self.open.max_t())
        }
    }

    /// The chunk a time belongs to for lookups and out-of-order inserts: the last chunk that
    /// starts at or before it (or the first chunk).
    fn chunk_for(&self, t: TimestampMs) -> Option<usize> {
        if self.chunks.is_empty() {
            return None;
        }
        Some(
            self.chunks
                .partition_point(|c| c.min_t <= t)
                .saturating_sub(1),
        )
    }

    /// Whether `t` belongs to the open chunk (at or after its first sample, or nothing is
    /// closed yet).
    fn in_open(&self, t: TimestampMs) -> bool {
        (!self.open.is_empty() && self.open.min_t() <= t) || self.chunks.is_empty()
    }

    /// The value bits stored at `t`.
    pub fn get(&self, t: TimestampMs) -> Option<u64> {
        let latest = self.latest()?;
        if t > latest {
            return None;
        }
        if t == latest && !self.open.is_empty() {
            return Some(self.open.last_bits());
        }
        let found = |samples: Vec<Sample>| {
            samples
                .binary_search_by_key(&t, |s| s.t)
                .ok()
                .map(|i| samples[i].v.to_bits())
        };
        if self.in_open(t) {
            return found(self.open.decode());
        }
        let chunk = &self.chunks[self.chunk_for(t)?];
        if t < chunk.min_t || t > chunk.max_t {
            return None;
        }
        found(chunk.decode())
    }

    /// Stores a sample (a timestamp already stored is left as it is).
    pub fn insert(&mut self, sample: Sample) {
        let after_all = self.latest().is_none_or(|latest| sample.t > latest);
        if after_all {
            self.open.append(sample);
            if self.open.len() >= CHUNK_SAMPLES {
                self.chunks.push(std::mem::take(&mut self.open).finish());
            }
        } else if self.in_open(sample.t) {
            let mut samples = self.open.decode();
            insert_sample(&mut samples, sample);
            self.open = Appender::of(&samples);
        } else if let Some(i) = self.chunk_for(sample.t) {
            // Out of order into a closed chunk: rewrite that chunk.
            let mut samples = self.chunks[i].decode();
            insert_sample(&mut samples, sample);
            self.chunks[i] = Chunk::encode(&samples);
        }
    }

    /// Takes every sample older than `cutoff` out of the store (for flushing), as compressed
    /// chunks in order.
    pub fn split_before(&mut self, cutoff: TimestampMs) -> Vec<Chunk> {
        let whole = self.chunks.partition_point(|c| c.max_t < cutoff);
        let mut out: Vec<Chunk> = self.chunks.drain(..whole).collect();
        if self.chunks.first().is_some_and(|c| c.min_t < cutoff) {
            let samples = self.chunks[0].decode();
            let at = samples.partition_point(|s| s.t < cutoff);
            out.push(Chunk::encode(&samples[..at]));
            self.chunks[0] = Chunk::encode(&samples[at..]);
        }
        if self.chunks.is_empty() && !self.open.is_empty() && self.open.min_t() < cutoff {
            let samples = self.open.decode();
            let at = samples.partition_point(|s| s.t < cutoff);
            out.push(Chunk::encode(&samples[..at]));
            self.open = Appender::of(&samples[at..]);
        }
        out
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.open.is_empty()
    }

    /// Samples in `[start, end]`.
    #[cfg(test)]
    pub fn range(&self, start: TimestampMs, end: TimestampMs) -> Vec<Sample> {
        let mut out = Vec::new();
        self.range_into(start, end, &mut out);
        out
    }

    /// Appends the samples in `[start, end]` to `out`.
    pub fn range_into(&self, start: TimestampMs, end: TimestampMs, out: &mut Vec<Sample>) {
        let open = !self.open.is_empty() && self.open.max_t() >= start && self.open.min_t() <= end;
        let closed = overlapping(&self.chunks, start, end);
        // One allocation instead of several: what the chunks hold in the range, assuming their
        // samples evenly spread (the vector becomes the query's series as it is).
        out.reserve(
            closed
                .clone()
                .map(|c| share_in(c.min_t, c.max_t, c.count as usize, start, end))
                .sum::<usize>()
                + if open {
                    share_in(
                        self.open.min_t(),
                        self.open.max_t(),
                        self.open.len(),
                        start,
                        end,
                    )
                } else {
                    0
                },
        );
        for chunk in closed {
            chunk.decode_range_into(start, end, out);
        }
        if open {
            self.open.decode_range_into(start, end, out);
        }
    }

    /// The time of its first sample.
    pub fn first(&self) -> Option<TimestampMs> {
        self.chunks
            .first()
            .map(|c| c.min_t)
            .or_else(|| (!self.open.is_empty()).then(|| self.open.min_t()))
    }

    /// Whether the span of its samples (first to last, not whether one lies inside)
    /// overlaps `[start, end]`: from the chunks' bounds, with nothing decoded.
    pub fn overlaps(&self, start: TimestampMs, end: TimestampMs) -> bool {
        match (self.first(), self.latest()) {
            (Some(first), Some(last)) => first <= end && last >= start,
            _ => false,
        }
    }

    /// Whether any sample lies in `[start, end]`.
    pub fn any_in(&self, start: TimestampMs, end: TimestampMs) -> bool {
        chunks_any_in(&self.chunks, start, end)
            || (!self.open.is_empty()
                && ends_tell(self.open.min_t(), self.open.max_t(), start, end).unwrap_or_else(
                    || {
                        let mut found = Vec::new();
                        self.open.decode_range_into(start, end, &mut found);
                        !found.is_empty()
                    },
                ))
    }
}

/// Whether a chunk from `min_t` to `max_t` holds a sample in `[start, end]`, when its ends
/// tell: they are its first and last samples, so only a chunk that spans the whole range
/// (`None`) needs decoding.
fn ends_tell(min_t: i64, max_t: i64, start: i64, end: i64) -> Option<bool> {
    if max_t < start || min_t > end {
        Some(false)
    } else if (start..=end).contains(&min_t) || (start..=end).contains(&max_t) {
        Some(true)
    } else {
        None
    }
}

/// Whether any of `chunks` holds a sample in `[start, end]`.
pub(super) fn chunks_any_in(chunks: &[Chunk], start: TimestampMs, end: TimestampMs) -> bool {
    chunks.iter().any(|c| {
        ends_tell(c.min_t, c.max_t, start, end).unwrap_or_else(|| {
            let mut found = Vec::new();
            c.decode_range_into(start, end, &mut found);
            !found.is_empty()
        })
    })
}

/// About how many of `count` samples spread over `[min_t, max_t]` lie in `[start, end]`.
fn share_in(min_t: i64, max_t: i64, count: usize, start: i64, end: i64) -> usize {
    if start <= min_t && max_t <= end {
        return count;
    }
    let span = max_t.saturating_sub(min_t).max(1) as f64;
    let covered = end.min(max_t).saturating_sub(start.max(min_t)).max(0) as f64;
    ((count as f64 * covered / span) as usize + 1).min(count)
}

/// Samples in `[start, end]` of chunks sorted by time.
pub(super) fn chunks_range(chunks: &[Chunk], start: TimestampMs, end: TimestampMs) -> Vec<Sample> {
    let mut out = Vec::new();
    chunks_range_into(chunks, start, end, &mut out);
    out
}

/// [`chunks_range`], appending to `out`.
pub(super) fn chunks_range_into(
    chunks: &[Chunk],
    start: TimestampMs,
    end: TimestampMs,
    out: &mut Vec<Sample>,
) {
    for chunk in overlapping(chunks, start, end) {
        chunk.decode_range_into(start, end, out);
    }
}

fn overlapping(
    chunks: &[Chunk],
    start: TimestampMs,
    end: TimestampMs,
) -> impl Iterator<Item = &Chunk> + Clone {
    chunks
        .iter()
        .filter(move |c| c.max_t >= start && c.min_t <= end)
}

/// Decides a sample's fate against what a series holds.
pub(super) fn place(
    store: &SampleStore,
    flushed_until: TimestampMs,
    sample: &Sample,
    window_ms: i64,
) -> Placement {
    if sample.t <= flushed_until {
        return Placement::TooOld;
    }
    match store.get(sample.t) {
        Some(bits) if bits == sample.v.to_bits() => Placement::Duplicate,
        Some(_) => Placement::Conflict,
        None => match store.latest() {
            Some(latest) if sample.t < latest.saturating_sub(window_ms) => Placement::TooOld,
            _ => Placement::Insert,
        },
    }
}

/// Decides a sample's fate against samples sorted by time (a batch's pending ones).
pub(super) fn place_sorted(samples: &[Sample], sample: &Sample) -> Placement {
    match samples.binary_search_by_key(&sample.t, |s| s.t) {
        Ok(i) if samples[i].v.to_bits() == sample.v.to_bits() => Placement::Duplicate,
        Ok(_) => Placement::Conflict,
        Err(_) => Placement::Insert,
    }
}

/// Inserts keeping order (appends in the common case).
pub(super) fn insert_sample(samples: &mut Vec<Sample>, sample: Sample) {
    match samples.last() {
        Some(last) if last.t >= sample.t => {
            if let Err(i) = samples.binary_search_by_key(&sample.t, |s| s.t) {
                samples.insert(i, sample);
            }
        }
        _ => samples.push(sample),
    }
}

impl Head {
    /// Notes samples applied between `min_t` and `max_t` (none when `min_t > max_t`).
    pub fn applied(&self, min_t: TimestampMs, max_t: TimestampMs) {
        if min_t <= max_t {
            self.max_t.raise(max_t);
            self.min_t.lower(min_t);
            self.applied_min_t.lower(min_t);
        }
    }

    fn tenant_mut(&mut self, tenant: &str) -> &mut TenantIndex {
        tenant_entry(&mut self.tenants, tenant)
    }

    pub fn create_series(&mut self, tenant: &str, id: u64, labels: &Labels) {
        let index = tenant_entry(&mut self.tenants, tenant);
        index.by_fingerprint.insert(labels.fingerprint(), id);
        for (name, value) in labels.pairs() {
            let key = posting_key(name, value);
            let ids = index.postings.entry(key).or_default();
            // A series already under this key must have this very pair (a postings list
            // holds one pair's series): else two pairs share a hash. The newest first: the
            // oldest may be series forgotten and not yet pruned, which a load that turns its
            // series over leaves by the tens of thousands at the front of a busy pair's list.
            if !index.collided {
                let first = ids.iter().rev().find_map(|id| self.series.get(id));
                if first.is_some_and(|first| first.labels.get(name) != Some(value)) {
                    index.collided = true;
                }
            }
            if ids.is_empty() {
                match index.names.get_mut(name) {
                    Some(keys) => {
                        keys.insert(key);
                    }
                    None => {
                        index.names.insert(name.into(), HashSet::from_iter([key]));
                    }
                }
            }
            insert_id(ids, id);
        }
        insert_id(&mut index.all, id);
        self.series.insert(
            id,
            SeriesData {
                tenant: index.tenant.clone(),
                labels: PackedLabels::from(labels),
                held: Mutex::new(Held {
                    samples: SampleStore::default(),
                    flushed_until: i64::MIN,
                }),
                exemplars: VecDeque::new(),
            },
        );
        self.next_id = self.next_id.max(id + 1);
    }

    /// Forgets those of `ids` with no sample in the head and no exemplar (Prometheus's head
    /// garbage collection after compaction): their samples are in blocks, whose indexes keep
    /// their labels, and one that receives samples again comes back with its id. The first of
    /// two steps, each run in batches by the caller: this one takes the series out of the
    /// head and its fingerprint table, and notes in `forgotten` their ids and the postings
    /// lists they were in; [`Head::prune_postings`] then takes the ids out of those lists.
    /// In between, postings lists may name series the head no longer holds: readers of
    /// postings check the series (see [`Head::newest_live`]).
    pub fn forget_empty(&mut self, ids: &[u64], forgotten: &mut Forgotten) {
        for id in ids {
            let Some(series) = self.series.get_mut(id) else {
                continue;
            };
            if !series.held_mut().samples.is_empty() || !series.exemplars.is_empty() {
                continue;
            }
            let series = self.series.remove(id).expect("just seen");
            let Some(index) = self.tenants.get_mut(&*series.tenant) else {
                continue;
            };
            let fingerprint = series.labels.fingerprint();
            if index.by_fingerprint.get(&fingerprint) == Some(id) {
                index.by_fingerprint.remove(&fingerprint);
            }
            forgotten.ids.push(*id);
            let lists = forgotten
                .lists
                .lists
                .entry(series.tenant.clone())
                .or_default();
            for (name, value) in series.labels.pairs() {
                lists
                    .entry(posting_key(name, value))
                    .or_insert_with(|| Box::from(name));
            }
        }
    }

    /// The second step of forgetting: takes `forgotten`'s ids out of the postings lists (and
    /// the tenants' lists of every series) they were in, about `budget` ids looked at a call
    /// (each list taken up counting [`PRUNE_LIST_COST`] more; a long list in several calls,
    /// resumed at the id it stopped at). Ids of series that
    /// came back in between stay. Returns whether lists are left.
    pub fn prune_postings(&mut self, forgotten: &mut Forgotten, budget: usize) -> bool {
        let Forgotten { ids: gone, lists } = forgotten;
        let Head {
            series, tenants, ..
        } = self;
        let back = |id: u64| series.contains_key(&id);
        let mut spent = 0;
        while spent < budget {
            let Some((tenant, list, from)) = lists.next() else {
                return false;
            };
            let Some(index) = tenants.get_mut(&*tenant) else {
                continue;
            };
            let ids = match &list {
                None => &mut index.all,
                Some((key, _)) => match index.postings.get_mut(key) {
                    Some(ids) => ids,
                    None => continue,
                },
            };
            let (looked, resume) = remove_ids_from(ids, gone, back, from, budget - spent);
            spent += looked + PRUNE_LIST_COST;
            let emptied = ids.is_empty();
            if let Some(resume) = resume {
                lists.resume(tenant, list, resume);
                continue;
            }
            if let (Some((key, name)), true) = (list, emptied) {
                index.postings.remove(&key);
                if let Some(keys) = index.names.get_mut(&name) {
                    keys.remove(&key);
                    if keys.is_empty() {
                        index.names.remove(&name);
                    }
                }
            }
        }
        true
    }

    /// A series of a postings list the head holds: the newest, since the oldest may be
    /// series being forgotten (see [`Head::forget_empty`]).
    pub fn newest_live(&self, ids: &[u64]) -> Option<&SeriesData> {
        ids.iter().rev().find_map(|id| self.series.get(id))
    }

    pub fn add_metadata(&mut self, tenant: &str, metadata: MetricMetadata) {
        let entries = self
            .tenant_mut(tenant)
            .metadata
            .entry(metadata.metric_family_name.clone())
            .or_default();
        if !entries.contains(&metadata) {
            entries.push(metadata);
        }
    }

    /// Series ids of a tenant matching every matcher (ascending), from postings: an equality
    /// matcher reads its pair's postings, any other runs over the label's values
    /// ([`postings_for_matchers`]), unless the matchers applied so far (equality first) leave at most
    /// [`FEW_CANDIDATES`] series; those candidates' label sets are checked at the end, and
    /// every candidate's in a tenant where two label pairs met under one postings key (a
    /// hash: a collision adds candidates, never drops one).
    pub fn matching(&self, tenant: &str, matchers: &[Matcher]) -> Vec<u64> {
        let Some(index) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        let values = |name: &str| -> std::io::Result<Vec<String>> {
            let Some(keys) = index.names.get(name) else {
                return Ok(Vec::new());
            };
            Ok(keys
                .iter()
                .filter_map(|key| {
                    let first = self.newest_live(index.postings.get(key)?)?;
                    Some(first.labels.get(name)?.to_owned())
                })
                .collect())
        };
        let postings = |name: &str, value: &str| -> std::io::Result<Vec<u64>> {
            Ok(index
                .postings
                .get(&posting_key(name, value))
                .cloned()
                .unwrap_or_default())
        };
        let candidates = postings_for_matchers(
            matchers,
            PostingsSource {
                all: &|| Ok(index.all.clone()),
                values: &values,
                postings: &postings,
                postings_of: None,
                few: FEW_CANDIDATES,
            },
        )
        .unwrap_or_else(|_| Candidates {
            ids: Vec::new(),
            exact: true,
        });
        // Postings may name series the head forgot a moment ago (skipped); label sets are
        // checked only when the postings did not apply every matcher (a read of 64,000 series
        // would otherwise visit each one's labels for nothing).
        let mut ids = candidates.ids;
        if candidates.exact && !index.collided {
            ids.retain(|id| self.series.contains_key(id));
        } else {
            ids.retain(|id| {
                self.series
                    .get(id)
                    .is_some_and(|s| matches_all(matchers, &s.labels))
            });
        }
        ids
    }

    /// Whether a series has a sample in `[start, end]`.
    pub fn has_samples(&self, id: u64, start: TimestampMs, end: TimestampMs) -> bool {
        self.series
            .get(&id)
            .is_some_and(|s| s.held().samples.any_in(start, end))
    }

    /// Stores an exemplar of a series (once per time), dropping the oldest exemplar of the
    /// head when the ring is full. Logarithmic in the series' exemplars; appends at the end
    /// and drops at the front in constant time.
    pub fn add_exemplar(&mut self, id: u64, exemplar: Exemplar) {
        if self.exemplar_limit == 0 {
            return;
        }
        let Some(series) = self.series.get_mut(&id) else {
            return;
        };
        let t = exemplar.t;
        let at = series.exemplars.partition_point(|e| e.t < t);
        if series.exemplars.get(at).is_some_and(|e| e.t == t) {
            return;
        }
        series.exemplars.insert(at, exemplar);
        self.exemplar_order.push_back((id, t));
        while self.exemplar_order.len() > self.exemplar_limit {
            let Some((old_id, old_t)) = self.exemplar_order.pop_front() else {
                break;
            };
            if let Some(old) = self.series.get_mut(&old_id) {
                let at = old.exemplars.partition_point(|e| e.t < old_t);
                if old.exemplars.get(at).is_some_and(|e| e.t == old_t) {
                    old.exemplars.remove(at);
                }
            }
        }
    }

    /// The exemplars of the ring, oldest stored first, as log entries.
    pub fn exemplar_entries(&self) -> Vec<(u64, TimestampMs, f64, Labels)> {
        self.exemplar_order
            .iter()
            .filter_map(|&(id, t)| {
                let series = self.series.get(&id)?;
                let at = series.exemplars.partition_point(|e| e.t < t);
                let e = series.exemplars.get(at).filter(|e| e.t == t)?;
                Some((id, t, e.value, e.labels.clone()))
            })
            .collect()
    }

    pub fn exemplars_in(
        &self,
        id: u64,
        start: TimestampMs,
        end: TimestampMs,
    ) -> Option<SeriesExemplars> {
        let s = self.series.get(&id)?;
        let exemplars: Vec<Exemplar> = s
            .exemplars
            .iter()
            .filter(|e| e.t >= start && e.t <= end)
            .cloned()
            .collect();
        (!exemplars.is_empty()).then(|| SeriesExemplars {
            labels: s.labels.to_labels(),
            exemplars,
        })
    }
}

/// A tenant's index, made when it is first needed.
fn tenant_entry<'a>(
    tenants: &'a mut HashMap<String, TenantIndex>,
    tenant: &str,
) -> &'a mut TenantIndex {
    tenants
        .entry(tenant.to_owned())
        .or_insert_with(|| TenantIndex {
            tenant: Arc::from(tenant),
            ..TenantIndex::default()
        })
}

fn posting_key(name: &str, value: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(name.as_bytes());
    h.update(&[0xFF]);
    h.update(value.as_bytes());
    h.digest()
}

/// Takes the ids of `gone` (ascending) out of `ids` (ascending), but those `back` keeps.
#[cfg(test)]
fn remove_ids(ids: &mut Vec<u64>, gone: &[u64], back: impl Fn(u64) -> bool) {
    remove_ids_from(ids, gone, back, 0, usize::MAX);
}

/// [`remove_ids`] from id `from` on, looking at `at_most` ids (at least one): returns how
/// many it looked at and, when the list goes on, the id to resume from. Each id is searched
/// for in `gone` from where the last one was found ([`gallop`]), so a short list costs a few
/// searches however many series went, and a long one about a step an id (and a move of
/// the list's tail).
fn remove_ids_from(
    ids: &mut Vec<u64>,
    gone: &[u64],
    back: impl Fn(u64) -> bool,
    from: u64,
    at_most: usize,
) -> (usize, Option<u64>) {
    let start = gallop(ids, from);
    let end = start.saturating_add(at_most.max(1)).min(ids.len());
    let resume = ids.get(end).copied();
    let mut gone = &gone[gallop(gone, from)..];
    let mut kept = start;
    for i in start..end {
        let id = ids[i];
        gone = &gone[gallop(gone, id)..];
        if gone.first() != Some(&id) || back(id) {
            ids[kept] = id;
            kept += 1;
        }
    }
    ids.drain(kept..end);
    (end - start, resume)
}

/// Adds an id to an ascending list: at the end for a new series (ids grow), in its place for
/// one the head forgot and that came back with its id.
fn insert_id(ids: &mut Vec<u64>, id: u64) {
    match ids.last() {
        Some(&last) if last >= id => {
            if let Err(at) = ids.binary_search(&id) {
                ids.insert(at, id);
            }
        }
        _ => ids.push(id),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exemplars_form_one_ring_across_series_oldest_dropped_first() {
        let mut head = Head {
            exemplar_limit: 3,
            ..Head::default()
        };
        let labels = |n: &str| Labels::from_trusted(vec![crate::model::Label::new("__name__", n)]);
        head.create_series("t", 1, &labels("a"));
        head.create_series("t", 2, &labels("b"));
        let exemplar = |t| Exemplar {
            labels: Labels::empty(),
            value: 1.0,
            t,
        };
        for (id, t) in [(1, 10), (2, 5), (1, 10), (1, 30), (2, 20), (1, 20)] {
            head.add_exemplar(id, exemplar(t));
        }
        // (1, 10) came twice and is kept once; (1, 10) and (2, 5) were stored first.
        let kept: Vec<(u64, i64)> = head.exemplar_entries().iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(kept, [(1, 30), (2, 20), (1, 20)]);
        let times: Vec<i64> = head.series[&1].exemplars.iter().map(|e| e.t).collect();
        assert_eq!(times, [20, 30], "sorted by time within a series");
        head.exemplar_limit = 0;
        head.add_exemplar(2, exemplar(99));
        assert_eq!(head.series[&2].exemplars.len(), 1);
    }

    use super::*;

    fn s(t: i64, v: f64) -> Sample {
        Sample { t, v }
    }

    fn store(samples: &[Sample]) -> SampleStore {
        let mut store = SampleStore::default();
        for &sample in samples {
            store.insert(sample);
        }
        store
    }

    #[test]
    fn placement_follows_prometheus_duplicate_rules_and_the_window() {
        let samples = store(&[s(10, 1.0), s(20, 2.0), s(30, 3.0)]);
        assert_eq!(place(&samples, i64::MIN, &s(40, 4.0), 0), Placement::Insert);
        assert_eq!(
            place(&samples, i64::MIN, &s(20, 2.0), 0),
            Placement::Duplicate
        );
        assert_eq!(
            place(&samples, i64::MIN, &s(20, 9.0), 0),
            Placement::Conflict
        );
        assert_eq!(place(&samples, i64::MIN, &s(25, 9.0), 0), Placement::TooOld);
        assert_eq!(
            place(&samples, i64::MIN, &s(25, 9.0), 10),
            Placement::Insert
        );
        assert_eq!(place(&samples, i64::MIN, &s(5, 9.0), 10), Placement::TooOld);
        let mut v = vec![s(10, 1.0), s(20, 2.0), s(30, 3.0)];
        insert_sample(&mut v, s(25, 9.0));
        insert_sample(&mut v, s(50, 5.0));
        assert_eq!(
            v.iter().map(|p| p.t).collect::<Vec<_>>(),
            [10, 20, 25, 30, 50]
        );
    }

    #[test]
    fn stores_seal_chunks_and_take_out_of_order_samples() {
        let mut all: Vec<Sample> = (0..500).map(|i| s(i * 10, i as f64)).collect();
        let mut st = store(&all);
        assert_eq!(st.chunks.len(), 4, "120 samples per chunk");
        assert_eq!(st.range(0, 10_000), all);
        // Out of order into a sealed chunk, before everything, and into the open run.
        for late in [s(15, -1.0), s(-5, -2.0), s(4_995, -3.0)] {
            st.insert(late);
            insert_sample(&mut all, late);
        }
        assert_eq!(st.range(-100, 10_000), all);
        assert_eq!(
            st.range(100, 200),
            all.iter()
                .copied()
                .filter(|p| p.t >= 100 && p.t <= 200)
                .collect::<Vec<_>>()
        );
        assert_eq!(st.get(15), Some((-1.0f64).to_bits()));
        assert_eq!(st.get(16), None);
        assert_eq!(st.latest(), Some(4_995));
        // A stored timestamp is not overwritten.
        st.insert(s(20, 99.0));
        assert_eq!(st.get(20), Some(2.0f64.to_bits()));
    }

    #[test]
    fn ranges_and_any_in_agree_with_the_samples_and_reserve_about_what_they_keep() {
        // Samples every 10 ms with a gap: 0..=1190, then 3000..=4190 (chunks of 120, the
        // last one open).
        let all: Vec<Sample> = (0..120)
            .map(|i| s(i * 10, i as f64))
            .chain((0..120).map(|i| s(3_000 + i * 10, i as f64)))
            .chain((0..50).map(|i| s(5_000 + i * 10, i as f64)))
            .collect();
        let st = store(&all);
        for (start, end) in [
            (i64::MIN, i64::MAX),
            (-100, -1),
            (1_191, 2_999),
            (1_195, 1_199),
            (5, 9),
            (5, 10),
            (1_190, 3_000),
            (3_000, 3_000),
            (3_001, 3_009),
            (5_001, 5_009),
            (5_490, 9_000),
            (100, 4_000),
        ] {
            let want: Vec<Sample> = all
                .iter()
                .copied()
                .filter(|p| p.t >= start && p.t <= end)
                .collect();
            let mut got = Vec::new();
            st.range_into(start, end, &mut got);
            assert_eq!(got, want, "[{start}, {end}]");
            // Within the estimate's rounding (and a vector's smallest allocation, 4).
            let most = (want.len() + 2).max(4);
            assert!(
                got.capacity() <= most,
                "[{start}, {end}]: {}",
                got.capacity()
            );
            assert_eq!(st.any_in(start, end), !want.is_empty(), "[{start}, {end}]");
        }
    }

    #[test]
    fn split_before_takes_exactly_the_older_samples() {
        let all: Vec<Sample> = (0..300).map(|i| s(i * 10, i as f64)).collect();
        let mut st = store(&all);
        let taken = st.split_before(1_005);
        assert_eq!(chunks_range(&taken, i64::MIN, i64::MAX), all[..101]);
        assert_eq!(st.range(0, 10_000), all[101..]);
        let rest = st.split_before(i64::MAX);
        assert_eq!(chunks_range(&rest, i64::MIN, i64::MAX), all[101..]);
        assert!(st.is_empty());
        assert_eq!(place(&st, 2_990, &s(2_990, 0.0), 0), Placement::TooOld);
    }

    #[test]
    fn head_matchers_run_over_postings_and_values_and_agree_with_the_label_sets() {
        let mut head = Head::default();
        let mut all = Vec::new();
        // Ids out of order (a series that came back keeps its older id).
        for (n, id) in [5u64, 1, 9, 3, 7, 2, 8].iter().enumerate() {
            let job = format!("j{}", n % 3);
            let mut pairs = vec![
                crate::model::Label::new("__name__", "m"),
                crate::model::Label::new("job", &job),
            ];
            if n % 2 == 0 {
                pairs.push(crate::model::Label::new("pid", n.to_string()));
            }
            let labels = Labels::from_trusted(pairs);
            head.create_series("t", *id, &labels);
            all.push((*id, labels));
        }
        let re = |name: &str, p: &str, negate| Matcher::regex(name, p, negate).unwrap();
        for matchers in [
            vec![Matcher::equal("job", "j1")],
            vec![re("job", "j[02]", false)],
            vec![re("pid", ".+", false), re("job", "j0", true)],
            vec![Matcher::equal("pid", "")],
            vec![Matcher::equal("__name__", "m"), re("job", "j[02]", false)],
            vec![Matcher::equal("job", "j0"), re("pid", "", true)],
            vec![],
        ] {
            let mut want: Vec<u64> = all
                .iter()
                .filter(|(_, l)| matches_all(&matchers, l))
                .map(|(id, _)| *id)
                .collect();
            want.sort_unstable();
            assert_eq!(head.matching("t", &matchers), want, "{matchers:?}");
        }
        assert!(head.tenants["t"].all.is_sorted());
        // Forgetting series prunes postings and the values' keys, in two steps.
        for (id, _) in &all {
            if let Some(s) = head.series.get_mut(id) {
                if *id != 8 && *id != 2 {
                    s.held_mut().samples.insert(Sample { t: 1, v: 1.0 });
                }
            }
        }
        let mut forgotten = Forgotten::default();
        head.forget_empty(&[1, 2, 3], &mut forgotten);
        head.forget_empty(&[5, 7, 8, 9], &mut forgotten);
        assert_eq!(forgotten.ids, [2, 8]);
        // Between the steps, postings name series the head no longer holds (2 is the first of
        // `job="j2"`): matchers answer as if they were gone.
        assert_eq!(head.matching("t", &[re("job", "j2", false)]), [9]);
        assert_eq!(head.matching("t", &[Matcher::equal("pid", "6")]), [0u64; 0]);
        // One comes back before its postings are pruned: they stay.
        let eight = all.iter().find(|(id, _)| *id == 8).unwrap().1.clone();
        head.create_series("t", 8, &eight);
        while head.prune_postings(&mut forgotten, 1) {}
        let index = &head.tenants["t"];
        assert_eq!(index.all, [1, 3, 5, 7, 8, 9]);
        assert_eq!(index.postings[&posting_key("job", "j2")], [9]);
        assert_eq!(head.matching("t", &[Matcher::equal("pid", "6")]), [8]);
        assert_eq!(
            head.matching("t", &[Matcher::equal("job", "j0")]),
            [3, 5, 8]
        );
        // Forgotten for good: its pair's postings and the value's key go.
        let mut forgotten = Forgotten::default();
        head.forget_empty(&[8], &mut forgotten);
        while head.prune_postings(&mut forgotten, 1_000) {}
        assert_eq!(
            head.matching("t", &[Matcher::equal("pid", "6")]),
            Vec::<u64>::new()
        );
        assert!(!head.tenants["t"]
            .postings
            .contains_key(&posting_key("pid", "6")));
        assert!(!head.tenants["t"].names["pid"].contains(&posting_key("pid", "6")));
        assert_eq!(head.matching("t", &[Matcher::equal("job", "j0")]), [3, 5]);
    }

    #[test]
    fn removing_ids_keeps_those_not_gone_and_those_back() {
        let mut ids: Vec<u64> = (0..100).collect();
        let gone: Vec<u64> = (0..200).filter(|i| i % 3 == 0).collect();
        remove_ids(&mut ids, &gone, |id| id == 30);
        let want: Vec<u64> = (0..100).filter(|i| i % 3 != 0 || *i == 30).collect();
        assert_eq!(ids, want);
        let mut short = vec![7u64, 150];
        remove_ids(&mut short, &gone, |_| false);
        assert_eq!(short, [7]);
        // In slices, resumed where each stopped, as in one go.
        let list: Vec<u64> = (0..1_000).collect();
        let gone: Vec<u64> = (0..1_000).filter(|i| i % 4 != 1).collect();
        let mut sliced = list.clone();
        let mut from = Some(0);
        while let Some(at) = from {
            let (looked, resume) = remove_ids_from(&mut sliced, &gone, |id| id == 500, at, 7);
            assert!(looked <= 7);
            from = resume;
        }
        let mut whole = list;
        remove_ids(&mut whole, &gone, |id| id == 500);
        assert_eq!(sliced, whole);
        // Against a set, over lists and gaps of many lengths.
        for (len, every, step) in [(1, 1, 1), (50, 7, 3), (1_000, 2, 1), (3, 1_000, 17)] {
            let list: Vec<u64> = (0..len).map(|i| i * step).collect();
            let gone: Vec<u64> = (0..len * step + 5).filter(|i| i % every == 0).collect();
            let set: HashSet<u64> = gone.iter().copied().collect();
            let mut got = list.clone();
            remove_ids(&mut got, &gone, |_| false);
            let want: Vec<u64> = list.into_iter().filter(|i| !set.contains(i)).collect();
            assert_eq!(got, want, "{len} {every} {step}");
        }
    }
}
