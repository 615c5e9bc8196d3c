//! On-disk blocks: what the head flushes and compaction merges.
//!
//! A block is a directory `blocks/<id>/` with a `meta.json` and up to three *run files*:
//! `chunks` (raw samples as compressed chunks), `samples_5m` and `samples_1h` (rollups). Each
//! is deleted on its own when its retention passes, so raw data can leave the disk while the
//! rollups of the same time range stay. The container format of those files is `runfile.rs`.

use super::codec;
use super::index::{self, BlockIndex};
use super::runfile::{damaged, RunFile, RunWriter, TimeRange};
use crate::model::{PackedLabels, Sample, TimestampMs};
use crate::storage::{merge_rollups, rollup, Resolution, RollupRow};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Samples per separately decodable piece of a run.
const PIECE_SAMPLES: usize = 720;

/// The time range of a raw run, from its piece headers.
fn chunks_time_range(payload: &[u8]) -> Option<(TimestampMs, TimestampMs)> {
    let mut r = codec::Reader(payload);
    let (mut first, mut last) = (None, None);
    while !r.0.is_empty() {
        let min_t = codec::unzigzag(r.varint().ok()?);
        let max_t = min_t.wrapping_add(r.varint().ok()? as i64);
        r.varint().ok()?;
        let len = usize::try_from(r.varint().ok()?).ok()?;
        r.0 = r.0.get(len..)?;
        first.get_or_insert(min_t);
        last = Some(max_t);
    }
    Some((first?, last?))
}

/// The time range of a rollup run, from its bucket starts.
fn rollups_time_range(payload: &[u8]) -> Option<(TimestampMs, TimestampMs)> {
    let (times, _) = codec::decode_columns(payload).ok()?;
    Some((*times.first()?, *times.last()?))
}

/// Payload of a run: the samples in pieces of up to [`PIECE_SAMPLES`], each
/// `zigzag min_t | varint max_t - min_t | varint count | varint len | bytes` with the bytes
/// from `codec.rs`, so a read decodes only the pieces its range overlaps. A run of one piece
/// is not compressed on its own: the run file compresses the runs of many series together
/// (run files version 3), which is where short runs gain. A run of several pieces compresses
/// each (so a short range decompresses only its pieces), as every run of earlier files did.
pub(super) fn encode_samples(samples: &[Sample]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in samples.chunks(PIECE_SAMPLES) {
        let (Some(first), Some(last)) = (piece.first(), piece.last()) else {
            continue;
        };
        let bytes = if samples.len() > PIECE_SAMPLES {
            codec::encode(piece)
        } else {
            codec::encode_uncompressed(piece)
        };
        codec::put_varint(&mut out, codec::zigzag(first.t));
        codec::put_varint(&mut out, last.t.wrapping_sub(first.t) as u64);
        codec::put_varint(&mut out, piece.len() as u64);
        codec::put_varint(&mut out, bytes.len() as u64);
        out.extend_from_slice(&bytes);
    }
    out
}

/// Samples of a run in `[start, end]`.
pub(super) fn decode_samples(
    payload: &[u8],
    start: TimestampMs,
    end: TimestampMs,
) -> io::Result<Vec<Sample>> {
    let mut out = Vec::new();
    decode_samples_into(payload, start, end, &mut out)?;
    Ok(out)
}

/// [`decode_samples`], appending to `out`; on an error `out` is left as it was.
pub(super) fn decode_samples_into(
    payload: &[u8],
    start: TimestampMs,
    end: TimestampMs,
    out: &mut Vec<Sample>,
) -> io::Result<()> {
    let before = out.len();
    let result = decode_pieces_into(payload, start, end, out);
    if result.is_err() {
        out.truncate(before);
    }
    result
}

fn decode_pieces_into(
    payload: &[u8],
    start: TimestampMs,
    end: TimestampMs,
    out: &mut Vec<Sample>,
) -> io::Result<()> {
    let mut r = codec::Reader(payload);
    while !r.0.is_empty() {
        let min_t = codec::unzigzag(r.varint()?);
        let max_t = min_t.wrapping_add(r.varint()? as i64);
        let count = usize::try_from(r.varint()?).map_err(|_| damaged("bad piece".into()))?;
        let len = usize::try_from(r.varint()?).map_err(|_| damaged("bad piece".into()))?;
        if r.0.len() < len {
            return Err(damaged("piece cut short".into()));
        }
        let (bytes, rest) = r.0.split_at(len);
        if max_t >= start
            && min_t <= end
            && codec::decode_range_into(bytes, start, end, out)? != count
        {
            return Err(damaged("piece holds another sample count".into()));
        }
        r.0 = rest;
    }
    Ok(())
}

/// Adds a series' rollup run (of `samples`, sorted by time) to each resolution's writer.
fn add_rollup_runs(
    writers: &mut [(Resolution, RunWriter)],
    id: u64,
    samples: &[Sample],
) -> io::Result<()> {
    for (resolution, writer) in writers {
        let rows = rollup(samples, *resolution);
        if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
            writer.add(id, a.t, b.t, &encode_rollups(&rows))?;
        }
    }
    Ok(())
}

/// Series whose raw samples a rollup read of a block without rollups holds at once.
const RAW_ROLLUP_BATCH: usize = 256;

/// Payload of a rollup run: the bucket starts and seven value columns (min, max, sum, count,
/// last, the first sample's offset in its bucket in ms, the first sample's value) in one
/// codec frame, left for the run file to compress. Runs written before the first sample was
/// kept have five columns.
fn encode_rollups(rows: &[RollupRow]) -> Vec<u8> {
    let times: Vec<i64> = rows.iter().map(|r| r.t).collect();
    let column = |f: fn(&RollupRow) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let mut columns = vec![
        column(|r| r.min),
        column(|r| r.max),
        column(|r| r.sum),
        column(|r| r.count),
        column(|r| r.last),
    ];
    if rows.iter().all(|r| r.first_t != RollupRow::UNKNOWN) {
        columns.push(column(|r| (r.first_t - r.t) as f64));
        columns.push(column(|r| r.first));
    }
    codec::encode_columns_with(&times, &columns, false)
}

fn decode_rollups(payload: &[u8]) -> io::Result<Vec<RollupRow>> {
    let (times, columns) = codec::decode_columns(payload)?;
    let (min, max, sum, count, last, first) = match columns.as_slice() {
        [min, max, sum, count, last] => (min, max, sum, count, last, None),
        [min, max, sum, count, last, offset, first] => {
            (min, max, sum, count, last, Some((offset, first)))
        }
        _ => return Err(damaged("rollup run without five or seven columns".into())),
    };
    Ok(times
        .iter()
        .enumerate()
        .map(|(i, &t)| RollupRow {
            t,
            min: min[i],
            max: max[i],
            sum: sum[i],
            count: count[i],
            last: last[i],
            first_t: first.map_or(RollupRow::UNKNOWN, |(offset, _)| t + offset[i] as i64),
            first: first.map_or(f64::NAN, |(_, first)| first[i]),
        })
        .collect())
}

/// `meta.json` of a block.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Meta {
    /// Blocks are read in this order: per series, a block's samples are later than those of
    /// every block before it.
    pub order: u64,
    pub min_t: TimestampMs,
    pub max_t: TimestampMs,
    pub series: u64,
    pub samples: u64,
    /// Flushes merged into it (1 for a flushed block).
    pub sources: u64,
    /// Directory numbers of the blocks this one replaces (compaction): if they are still
    /// there when the engine opens (a crash before they were deleted), they are deleted then.
    #[serde(default)]
    pub replaces: Vec<u64>,
    /// The largest series id it holds: new series take ids past it even when its files
    /// cannot be read (absent in blocks written before).
    #[serde(default)]
    pub max_series_id: Option<u64>,
}

/// A block on disk.
pub(super) struct Block {
    pub dir: PathBuf,
    pub meta: Meta,
    /// Shared, so a block without one of its files is made without opening the others.
    pub chunks: Option<Arc<RunFile>>,
    pub rollups: Vec<(Resolution, Arc<RunFile>)>,
    /// The labels of its series (`index.rs`); `None` for blocks written before blocks had
    /// one (while such a block exists, the head forgets no series).
    pub index: Option<Arc<BlockIndex>>,
    /// Whether every series of the block is in the head: reads and new series then need not
    /// look at its index. Cleared when the head forgets one of them.
    pub all_in_head: AtomicBool,
}

/// Where a block comes from: its read order, how many flushes it holds, the blocks it
/// replaces, and whether its runs go in label order (else id order, as blocks were written
/// before: a compaction with a source in id order keeps id order, since reading that source
/// in label order would decompress one of its frames for every series).
pub(super) struct Lineage {
    pub order: u64,
    pub sources: u64,
    pub replaces: Vec<u64>,
    pub by_labels: bool,
    /// Whether the block gets its rollups (a closed day's block does; flushed blocks and
    /// the 2-hour compactions of an open day do not: reads aggregate their raw chunks).
    pub rollups: bool,
}

impl Lineage {
    /// A flush's block: one source, replacing none, in label order, no rollups.
    pub fn flush(order: u64) -> Lineage {
        Lineage {
            order,
            sources: 1,
            replaces: Vec::new(),
            by_labels: true,
            rollups: false,
        }
    }
}

/// Labels of the series a block is written with: (id, tenant, labels) of the given ids
/// (ascending), those known.
pub(super) type LabelSource<'a> = &'a mut dyn FnMut(&[u64]) -> io::Result<Vec<index::SeriesLabels>>;

fn file_name(resolution: Option<Resolution>) -> &'static str {
    resolution.map_or("chunks", Resolution::name)
}

/// What a read of a block's samples met.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadStats {
    /// Samples added.
    pub samples: usize,
    /// Damaged runs skipped.
    pub damaged: usize,
}

impl Block {
    /// Writes a block of the series `ids` (ascending), each series' samples (sorted by time)
    /// from `samples`, with both rollups if `lineage` says so. Written into `<dir>.tmp` and renamed, so a crash
    /// leaves either the whole block or a `.tmp` directory that opening removes.
    ///
    /// With every series' labels known, the block gets its index and its runs are written in
    /// label order (tenant, then the packed label set's bytes: series with the same first label,
    /// usually the metric name, lie together): a
    /// metric's series share frames, so a query of one metric decompresses a frame for every
    /// 16 of its series rather than one for each. With no labels (blocks from before indexes,
    /// merged while the head still holds every series, or tests): no index, id order. With
    /// some unknown (a source's index is damaged): no block, since its series would be
    /// unreachable once the head forgets them.
    pub fn write(
        dir: &Path,
        lineage: Lineage,
        ids: &[u64],
        labels: LabelSource,
        samples: &mut dyn FnMut(u64) -> io::Result<Vec<Sample>>,
    ) -> io::Result<Option<Block>> {
        let Lineage {
            order,
            sources,
            replaces,
            by_labels,
            rollups: with_rollups,
        } = lineage;
        let mut known = labels(ids)?;
        known.sort_unstable_by_key(|s| s.0);
        if !known.is_empty() && !known.iter().map(|s| s.0).eq(ids.iter().copied()) {
            return Err(damaged(format!(
                "labels of {} of {} series unknown: a series index is damaged",
                ids.len().saturating_sub(known.len()),
                ids.len()
            )));
        }
        if by_labels {
            known.sort_unstable_by(index::label_order);
        }
        let in_order: Vec<u64> = if known.is_empty() {
            ids.to_vec()
        } else {
            known.iter().map(|s| s.0).collect()
        };
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let mut chunks = RunWriter::create(&tmp.join(file_name(None)))?;
        let mut rollups = Resolution::ALL
            .iter()
            .filter(|_| with_rollups)
            .map(|&r| Ok((r, RunWriter::create(&tmp.join(file_name(Some(r))))?)))
            .collect::<io::Result<Vec<_>>>()?;
        let mut meta = Meta {
            order,
            min_t: i64::MAX,
            max_t: i64::MIN,
            series: 0,
            samples: 0,
            sources,
            replaces,
            max_series_id: None,
        };
        let mut written = Vec::with_capacity(ids.len());
        for id in in_order {
            let samples = samples(id)?;
            let samples = samples.as_slice();
            let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
                continue;
            };
            written.push(id);
            chunks.add(id, first.t, last.t, &encode_samples(samples))?;
            add_rollup_runs(&mut rollups, id, samples)?;
            meta.min_t = meta.min_t.min(first.t);
            meta.max_t = meta.max_t.max(last.t);
            meta.series += 1;
            meta.samples += samples.len() as u64;
        }
        if chunks.is_empty() {
            std::fs::remove_dir_all(&tmp)?;
            return Ok(None);
        }
        let chunks = chunks.finish()?;
        let rollups = rollups
            .into_iter()
            .map(|(r, w)| Ok((r, w.finish()?)))
            .collect::<io::Result<Vec<_>>>()?;
        written.sort_unstable();
        if !known.is_empty() {
            // The index holds the series written (those with samples), in the same order.
            known.retain(|s| written.binary_search(&s.0).is_ok());
            index::write(&tmp.join(index::FILE_NAME), &known)?;
        }
        drop(known);
        meta.max_series_id = written.last().copied();
        let meta_path = tmp.join("meta.json");
        let mut f = File::create(&meta_path)?;
        f.write_all(&serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?)?;
        f.sync_all()?;
        File::open(&tmp)?.sync_all()?;
        drop((chunks, rollups));
        std::fs::rename(&tmp, dir)?;
        if let Some(parent) = dir.parent() {
            File::open(parent)?.sync_all()?;
        }
        Block::open(dir).map(|(block, _)| Some(block))
    }

    /// Opens a block directory: (block, damaged bytes recovered from its files).
    pub fn open(dir: &Path) -> io::Result<(Block, u64)> {
        let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?)
            .map_err(|e| damaged(format!("{}: meta.json: {e}", dir.display())))?;
        let mut damaged_bytes = 0;
        let mut open = |name: &str| -> io::Result<Option<Arc<RunFile>>> {
            let path = dir.join(name);
            if !path.exists() {
                return Ok(None);
            }
            let time_range: TimeRange = if name == file_name(None) {
                chunks_time_range
            } else {
                rollups_time_range
            };
            let opened = RunFile::open(&path, time_range)?;
            if opened.damaged_bytes > 0 {
                tracing::warn!(
                    file = %path.display(),
                    bytes_cut = opened.damaged_bytes,
                    "block file damaged: kept its intact runs and rebuilt its index"
                );
            }
            damaged_bytes += opened.damaged_bytes;
            Ok(Some(Arc::new(opened.file)))
        };
        let chunks = open(file_name(None))?;
        let mut rollups = Vec::new();
        for r in Resolution::ALL {
            if let Some(f) = open(file_name(Some(r)))? {
                rollups.push((r, f));
            }
        }
        let path = dir.join(index::FILE_NAME);
        let index = match path.exists().then(|| BlockIndex::open(&path)).transpose() {
            Ok(index) => index.map(|(index, bytes)| {
                damaged_bytes += bytes;
                Arc::new(index)
            }),
            Err(e) => {
                // Its samples stay readable; the head keeps every series while it is there.
                tracing::error!(file = %path.display(), error = %e, "block index unreadable: the block is read without it");
                damaged_bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
                None
            }
        };
        Ok((
            Block {
                dir: dir.to_owned(),
                meta,
                chunks,
                rollups,
                index,
                all_in_head: AtomicBool::new(true),
            },
            damaged_bytes,
        ))
    }

    /// The number in the block's directory name.
    pub fn number(&self) -> Option<u64> {
        self.dir.file_name()?.to_str()?.parse().ok()
    }

    pub fn rollup_file(&self, resolution: Resolution) -> Option<&RunFile> {
        self.rollups
            .iter()
            .find(|(r, _)| *r == resolution)
            .map(|(_, f)| &**f)
    }

    /// Bytes on disk of the raw chunks and the series index, or of the rollups.
    pub fn size(&self, rollups: bool) -> u64 {
        if rollups {
            self.rollups.iter().map(|(_, f)| f.size()).sum()
        } else {
            self.chunks.iter().map(|f| f.size()).sum::<u64>()
                + self.index.as_ref().map_or(0, |i| i.size())
        }
    }

    /// The path of its raw chunks (`None`) or of a rollup file.
    pub fn file_path(&self, resolution: Option<Resolution>) -> PathBuf {
        self.dir.join(file_name(resolution))
    }

    /// Writes its rollup files from its raw chunks (a block about to lose them to retention
    /// that has none): each into a temporary name, synced, then renamed into the block's
    /// directory, so a crash leaves the block as it was or with them (a stray temporary file
    /// goes with the directory). A damaged run is logged and left out, as a read leaves it out.
    /// Returns the block opened again, with them.
    pub fn add_rollups(&self) -> io::Result<Block> {
        let file = self
            .chunks
            .as_ref()
            .ok_or_else(|| io::Error::other("no raw chunks to roll up"))?;
        let mut entries = file.all_entries()?;
        entries.sort_by_key(|e| e.offset);
        let mut reader = file.reader_once();
        let tmp = |r: Resolution| self.dir.join(format!("{}.tmp", file_name(Some(r))));
        let mut writers = Resolution::ALL
            .iter()
            .map(|&r| Ok((r, RunWriter::create(&tmp(r))?)))
            .collect::<io::Result<Vec<_>>>()?;
        for entry in &entries {
            let samples = match reader
                .read(entry)
                .and_then(|run| decode_samples(&run, i64::MIN, i64::MAX))
            {
                Ok(samples) => samples,
                Err(e) => {
                    tracing::error!(error = %e, block = %self.dir.display(), series = entry.series, "skipping a damaged run");
                    continue;
                }
            };
            add_rollup_runs(&mut writers, entry.series, &samples)?;
        }
        for (r, writer) in writers {
            drop(writer.finish()?);
            std::fs::rename(tmp(r), self.file_path(Some(r)))?;
        }
        File::open(&self.dir)?.sync_all()?;
        let (block, _) = Block::open(&self.dir)?;
        block
            .all_in_head
            .store(self.all_in_head(), Ordering::Relaxed);
        Ok(block)
    }

    /// This block without its raw chunks (`None`) or one rollup file, its other files shared:
    /// for retention while a read still holds the block. No I/O.
    pub fn without(&self, resolution: Option<Resolution>) -> Block {
        Block {
            dir: self.dir.clone(),
            meta: self.meta.clone(),
            chunks: self.chunks.clone().filter(|_| resolution.is_some()),
            rollups: self
                .rollups
                .iter()
                .filter(|(r, _)| Some(*r) != resolution)
                .cloned()
                .collect(),
            index: self.index.clone(),
            all_in_head: AtomicBool::new(self.all_in_head()),
        }
    }

    /// The latest sample time this block holds of a series: from its raw chunks' index, or
    /// the block's end once they are gone.
    pub fn latest_sample_of(&self, id: u64) -> TimestampMs {
        self.chunks
            .as_ref()
            .and_then(|file| file.lookup(&[id]).ok()?.pop())
            .map_or(self.meta.max_t, |e| e.max_t)
    }

    pub fn all_in_head(&self) -> bool {
        self.all_in_head.load(Ordering::Relaxed)
    }

    /// The index to consult for series the head may not hold (`None` when the head holds
    /// every series of the block).
    pub fn index_beyond_head(&self) -> Option<&BlockIndex> {
        self.index.as_deref().filter(|_| !self.all_in_head())
    }

    /// Deletes the raw chunks (`None`) or a rollup file from disk.
    pub fn drop_file(&mut self, resolution: Option<Resolution>) -> io::Result<()> {
        let path = self.file_path(resolution);
        match resolution {
            None => self.chunks = None,
            Some(r) => self.rollups.retain(|(x, _)| *x != r),
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether no samples are left (its index alone is no reason to keep it).
    pub fn is_empty(&self) -> bool {
        self.chunks.is_none() && self.rollups.is_empty()
    }

    /// Samples in `[start, end]` of the given series (sorted ascending), appended per series
    /// to `out`. A damaged run is logged and skipped, and counted in the answer; the rest is
    /// still answered. Stops once more than `max_samples` were added (0: no limit).
    pub fn read_samples(
        &self,
        ids: &[u64],
        start: TimestampMs,
        end: TimestampMs,
        max_samples: usize,
        out: &mut BTreeMap<u64, Vec<Sample>>,
    ) -> io::Result<ReadStats> {
        let mut stats = ReadStats::default();
        let Some(file) = &self.chunks else {
            return Ok(stats);
        };
        if self.meta.max_t < start || self.meta.min_t > end {
            return Ok(stats);
        }
        let mut reader = file.reader();
        for entry in file.lookup_in_file_order(ids)? {
            if entry.max_t < start || entry.min_t > end {
                continue;
            }
            let samples = out.entry(entry.series).or_default();
            let before = samples.len();
            if let Err(e) = reader
                .read(&entry)
                .and_then(|p| decode_samples_into(&p, start, end, samples))
            {
                tracing::error!(error = %e, block = %self.dir.display(), series = entry.series, "skipping a damaged run");
                stats.damaged += 1;
            }
            stats.samples += samples.len().saturating_sub(before);
            if max_samples > 0 && stats.samples > max_samples {
                break;
            }
        }
        Ok(stats)
    }

    /// Rollup rows with bucket starts in `[start, end]`, merged into `out` per series. Reads
    /// the block's rollup file, or aggregates its raw chunks if the rollup is gone. Returns
    /// the damaged runs it skipped (logged; the other series are answered).
    pub fn read_rollups(
        &self,
        ids: &[u64],
        resolution: Resolution,
        start: TimestampMs,
        end: TimestampMs,
        out: &mut BTreeMap<u64, Vec<RollupRow>>,
    ) -> io::Result<usize> {
        if self.meta.max_t < start || self.meta.min_t > end.saturating_add(resolution.ms()) {
            return Ok(0);
        }
        let Some(file) = self.rollup_file(resolution) else {
            // Aggregated from the raw chunks (the open day's blocks have no rollups), a few
            // hundred series at a time: what is held is their raw samples, not every series'.
            let mut damaged = 0;
            for batch in ids.chunks(RAW_ROLLUP_BATCH) {
                let mut raw = BTreeMap::new();
                let stats = self.read_samples(
                    batch,
                    start,
                    end.saturating_add(resolution.ms() - 1),
                    0,
                    &mut raw,
                )?;
                damaged += stats.damaged;
                for (id, samples) in raw {
                    let rows: Vec<RollupRow> = rollup(&samples, resolution)
                        .into_iter()
                        .filter(|r| r.t >= start && r.t <= end)
                        .collect();
                    merge_into(out, id, &rows);
                }
            }
            return Ok(damaged);
        };
        let mut damaged = 0;
        let mut reader = file.reader();
        for entry in file.lookup_in_file_order(ids)? {
            if entry.max_t < start || entry.min_t > end {
                continue;
            }
            match reader.read(&entry).and_then(|p| decode_rollups(&p)) {
                Ok(rows) => {
                    let rows: Vec<RollupRow> = rows
                        .into_iter()
                        .filter(|r| r.t >= start && r.t <= end)
                        .collect();
                    merge_into(out, entry.series, &rows);
                }
                Err(e) => {
                    tracing::error!(error = %e, block = %self.dir.display(), series = entry.series, "skipping a damaged rollup run");
                    damaged += 1;
                }
            }
        }
        Ok(damaged)
    }

    /// Which of `ids` (sorted) have raw samples overlapping `[start, end]`, by the index.
    pub fn series_in_range(
        &self,
        ids: &[u64],
        start: TimestampMs,
        end: TimestampMs,
    ) -> io::Result<Vec<u64>> {
        let Some(file) = &self.chunks else {
            return Ok(Vec::new());
        };
        if self.meta.max_t < start || self.meta.min_t > end {
            return Ok(Vec::new());
        }
        Ok(file
            .lookup(ids)?
            .into_iter()
            .filter(|e| e.max_t >= start && e.min_t <= end)
            .map(|e| e.series)
            .collect())
    }

    /// Every sample of the block per series.
    #[cfg(test)]
    pub fn all_samples(&self) -> io::Result<BTreeMap<u64, Vec<Sample>>> {
        let mut out = BTreeMap::new();
        if let Some(file) = &self.chunks {
            let ids: Vec<u64> = file.all_entries()?.iter().map(|e| e.series).collect();
            self.read_samples(&ids, i64::MIN, i64::MAX, 0, &mut out)?;
        }
        Ok(out)
    }

    /// The latest raw sample time per series, for replay (samples up to it were flushed:
    /// the log's copies are not replayed). Once retention deleted the raw chunks, the block's
    /// end for each series of its index: their samples left with the chunks and must not come
    /// back from a log segment that outlived them.
    pub fn max_times(&self) -> io::Result<Vec<(u64, TimestampMs)>> {
        Ok(match (&self.chunks, &self.index) {
            (Some(file), _) => file
                .all_entries()?
                .iter()
                .map(|e| (e.series, e.max_t))
                .collect(),
            (None, Some(index)) => index.ids().map(|id| (id, self.meta.max_t)).collect(),
            (None, None) => Vec::new(),
        })
    }
}

/// Merges blocks (consecutive in read order, all with raw chunks) into one block at `dir`,
/// one series at a time: chunks are re-cut to full size and, with `rollups`, rollups
/// computed. Labels come from the blocks' indexes, else from `labels` (the head).
pub(super) fn compact(
    dir: &Path,
    blocks: &[&Block],
    labels: LabelSource,
    rollups: bool,
) -> io::Result<Option<Block>> {
    let mut indexes = Vec::with_capacity(blocks.len());
    for block in blocks {
        let file = block
            .chunks
            .as_ref()
            .ok_or_else(|| io::Error::other("cannot compact a block without raw chunks"))?;
        indexes.push((file.reader_once(), file.all_entries()?));
    }
    let mut ids: Vec<u64> = indexes
        .iter()
        .flat_map(|(_, entries)| entries.iter().map(|e| e.series))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    // Sources written in id order (before blocks were written by labels) are read in id
    // order: the merged block keeps it. A file of one frame is in both orders.
    let by_labels = !indexes.iter().any(|(_, entries)| {
        entries.len() > 16 && entries.windows(2).all(|w| w[0].offset <= w[1].offset)
    });
    let order = blocks.iter().map(|b| b.meta.order).min().unwrap_or(0);
    let sources = blocks.iter().map(|b| b.meta.sources).sum();
    // Series come in the merged block's order (by labels), which is each source's frame
    // order when the sources were written by labels too: each frame is decompressed once.
    let mut series = |id: u64| -> io::Result<Vec<Sample>> {
        let mut samples: Vec<Sample> = Vec::new();
        for (reader, entries) in &mut indexes {
            if let Ok(i) = entries.binary_search_by_key(&id, |e| e.series) {
                // Compaction must not spread damage or lose the rest: a damaged run stops
                // it, and the sources stay as they are.
                let run = reader.read(&entries[i])?;
                samples.extend(decode_samples(&run, i64::MIN, i64::MAX)?);
            }
        }
        if !samples.windows(2).all(|w| w[0].t < w[1].t) {
            samples.sort_by_key(|s| s.t);
            samples.dedup_by_key(|s| s.t);
        }
        Ok(samples)
    };
    let replaces = blocks.iter().filter_map(|b| b.number()).collect();
    let mut from_sources = |ids: &[u64]| -> io::Result<Vec<index::SeriesLabels>> {
        let mut found: BTreeMap<u64, (Arc<str>, PackedLabels)> = BTreeMap::new();
        for block in blocks {
            let Some(index) = &block.index else { continue };
            let rest: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| !found.contains_key(id))
                .collect();
            if rest.is_empty() {
                break;
            }
            for (id, tenant, l) in index.packed_labels(&rest)?.0 {
                found.insert(id, (tenant, l));
            }
        }
        let rest: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| !found.contains_key(id))
            .collect();
        if !rest.is_empty() {
            for (id, tenant, l) in labels(&rest)? {
                found.insert(id, (tenant, l));
            }
        }
        Ok(found.into_iter().map(|(id, (t, l))| (id, t, l)).collect())
    };
    let lineage = Lineage {
        order,
        sources,
        replaces,
        by_labels,
        rollups,
    };
    let merged = Block::write(dir, lineage, &ids, &mut from_sources, &mut series)?;
    if let Some(merged) = &merged {
        let all_in_head = blocks.iter().all(|b| b.all_in_head());
        merged.all_in_head.store(all_in_head, Ordering::Relaxed);
    }
    Ok(merged)
}

fn merge_into(out: &mut BTreeMap<u64, Vec<RollupRow>>, id: u64, rows: &[RollupRow]) {
    if rows.is_empty() {
        return;
    }
    let entry = out.entry(id).or_default();
    *entry = merge_rollups(std::mem::take(entry), rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_runs_keep_the_first_sample_and_older_runs_still_read() {
        let samples = [
            (7_000, 1.5),
            (290_000, 2.5),
            (300_000, f64::NAN),
            (301_000, 4.0),
        ];
        let samples: Vec<crate::model::Sample> = samples
            .iter()
            .map(|&(t, v)| crate::model::Sample { t, v })
            .collect();
        let rows = rollup(&samples, Resolution::FiveMinutes);
        let back = decode_rollups(&encode_rollups(&rows)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{rows:?}"));
        assert_eq!((back[0].first_t, back[1].first_t), (7_000, 300_000));
        assert!(back[1].first.is_nan(), "{back:?}");
        // A run of five columns, as written before the first sample was kept.
        let times: Vec<i64> = rows.iter().map(|r| r.t).collect();
        let column = |f: fn(&RollupRow) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
        let old = codec::encode_columns(
            &times,
            &[
                column(|r| r.min),
                column(|r| r.max),
                column(|r| r.sum),
                column(|r| r.count),
                column(|r| r.last),
            ],
        );
        let back = decode_rollups(&old).unwrap();
        assert!(back.iter().all(|r| r.first_t == RollupRow::UNKNOWN));
        assert_eq!(back[0].sum, rows[0].sum);
    }

    fn samples(from: i64, n: i64, step: i64) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                t: from + i * step,
                v: (i * 3 % 7) as f64,
            })
            .collect()
    }

    /// Blocks written without labels (so without an index), as before blocks had one.
    fn no_labels(_: &[u64]) -> io::Result<Vec<index::SeriesLabels>> {
        Ok(Vec::new())
    }

    #[test]
    fn a_metrics_series_share_frames_in_every_file_of_a_block() {
        use crate::model::{Label, Labels};
        // 96 series whose ids alternate between two metrics, as series arrive.
        let labels_of = |id: u64| {
            let name = if id.is_multiple_of(2) { "a" } else { "b" };
            let labels = Labels::from_trusted(vec![
                Label::new("__name__", name),
                Label::new("i", format!("{id:03}")),
            ]);
            (id, Arc::<str>::from("t"), PackedLabels::from(&labels))
        };
        let ids: Vec<u64> = (0..96).collect();
        let mut labels = |ids: &[u64]| Ok(ids.iter().map(|&id| labels_of(id)).collect());
        let mut samples_of = |id: u64| Ok(samples(id as i64 * 1_000, 30, 15_000));
        let dir = tempfile::tempdir().unwrap();
        let write = |n: &str,
                     ids: &[u64],
                     labels: LabelSource,
                     samples: &mut dyn FnMut(u64) -> io::Result<Vec<Sample>>| {
            Block::write(&dir.path().join(n), Lineage::flush(1), ids, labels, samples)
                .unwrap()
                .unwrap()
        };
        let frames = |file: &RunFile, ids: &[u64]| {
            let offsets: std::collections::BTreeSet<u64> =
                file.lookup(ids).unwrap().iter().map(|e| e.offset).collect();
            offsets.len()
        };
        let evens: Vec<u64> = ids.iter().copied().filter(|id| id % 2 == 0).collect();
        let check = |block: &Block| {
            // 48 series of metric `a`: three frames of 16 in each file, not 48.
            assert_eq!(frames(block.chunks.as_ref().unwrap(), &evens), 3);
            for (_, file) in &block.rollups {
                assert_eq!(frames(file, &evens), 3);
            }
            // The index's frames take up to 256 series' labels.
            let index = block.index.as_ref().unwrap();
            assert_eq!(frames(&index.file, &evens), 1);
            // Answers are by id, as before.
            let (read, skipped) = index.labels(&evens).unwrap();
            assert_eq!(skipped, 0);
            assert_eq!(read.iter().map(|r| r.0).collect::<Vec<_>>(), evens);
            assert_eq!(read[5].2, labels_of(10).2.to_labels());
            let mut out = BTreeMap::new();
            block.read_samples(&ids, 0, i64::MAX, 0, &mut out).unwrap();
            assert_eq!(out.len(), 96);
            assert_eq!(out[&7], samples(7_000, 30, 15_000));
        };
        let one = write("1", &ids, &mut labels, &mut samples_of);
        check(&one);
        // Compaction keeps the order: sources read frame by frame, the merged block by labels.
        let mut later = |id: u64| Ok(samples(id as i64 * 1_000 + 30 * 15_000, 30, 15_000));
        let two = write("2", &ids, &mut labels, &mut later);
        let merged = compact(&dir.path().join("3"), &[&one, &two], &mut no_labels, true)
            .unwrap()
            .unwrap();
        assert_eq!(frames(merged.chunks.as_ref().unwrap(), &evens), 3);
        let mut out = BTreeMap::new();
        merged.read_samples(&[4], 0, i64::MAX, 0, &mut out).unwrap();
        let want = [
            samples(4_000, 30, 15_000),
            samples(4_000 + 30 * 15_000, 30, 15_000),
        ]
        .concat();
        assert_eq!(out[&4], want);
        // A source in id order (as blocks were written before): the merged block keeps id
        // order, so compaction reads that source frame by frame; evens then span all 6 frames.
        let old_order = Block::write(
            &dir.path().join("4"),
            Lineage {
                by_labels: false,
                ..Lineage::flush(1)
            },
            &ids,
            &mut labels,
            &mut samples_of,
        )
        .unwrap()
        .unwrap();
        assert_eq!(frames(old_order.chunks.as_ref().unwrap(), &evens), 6);
        let kept = compact(
            &dir.path().join("5"),
            &[&old_order, &two],
            &mut no_labels,
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(frames(kept.chunks.as_ref().unwrap(), &evens), 6);
        let mut got = BTreeMap::new();
        kept.read_samples(&ids, 0, i64::MAX, 0, &mut got).unwrap();
        assert_eq!(got.len(), 96);
        assert_eq!(got[&4], want);
        assert_eq!(
            merged.index.as_ref().unwrap().labels(&[4]).unwrap().0[0].2,
            labels_of(4).2.to_labels()
        );
    }

    #[test]
    fn blocks_round_trip_samples_and_rollups() {
        let dir = tempfile::tempdir().unwrap();
        let a = samples(0, 1000, 15_000);
        let b = samples(7_000, 10, 60_000);
        let block = Block::write(
            &dir.path().join("1"),
            Lineage::flush(1),
            &[3, 9],
            &mut no_labels,
            &mut |id| Ok(if id == 3 { a.clone() } else { b.clone() }),
        )
        .unwrap()
        .unwrap();
        assert_eq!(block.meta.samples, 1010);
        let mut out = BTreeMap::new();
        block
            .read_samples(&[1, 3, 9], 0, i64::MAX, 0, &mut out)
            .unwrap();
        assert_eq!(out[&3], a);
        assert_eq!(out[&9], b);
        assert!(!out.contains_key(&1));
        let mut part = BTreeMap::new();
        block
            .read_samples(&[3], 30_000, 60_000, 0, &mut part)
            .unwrap();
        assert_eq!(part[&3], a[2..=4].to_vec());
        for r in Resolution::ALL {
            let mut rows = BTreeMap::new();
            block.read_rollups(&[3], r, 0, i64::MAX, &mut rows).unwrap();
            assert_eq!(rows[&3], rollup(&a, r));
        }
        // Reopen: the same answers from disk.
        let (again, damage) = Block::open(&dir.path().join("1")).unwrap();
        assert_eq!(damage, 0);
        assert_eq!(again.all_samples().unwrap()[&3], a);
        assert_eq!(again.max_times().unwrap(), [(3, a[999].t), (9, b[9].t)]);
    }

    #[test]
    fn only_runs_of_several_pieces_compress_their_pieces() {
        // After a piece's four header varints, the codec's first byte: 0 raw, 1 zstd.
        let marker = |payload: &[u8]| {
            let mut r = codec::Reader(payload);
            for _ in 0..4 {
                r.varint().unwrap();
            }
            r.0[0]
        };
        let short = samples(0, 100, 15_000);
        let long = samples(0, 1000, 15_000);
        assert_eq!(
            marker(&encode_samples(&short)),
            0,
            "left to the run file's frame"
        );
        assert_eq!(marker(&encode_samples(&long)), 1, "each piece on its own");
        for s in [short, long] {
            assert_eq!(decode_samples(&encode_samples(&s), 0, i64::MAX).unwrap(), s);
        }
    }

    #[test]
    fn blocks_of_the_previous_format_still_read_and_compact() {
        // What the release before run files version 3 wrote: a version 2 run file whose
        // pieces are each compressed with zstd, and rollup runs compressed one by one.
        let dir = tempfile::tempdir().unwrap();
        let old_dir = dir.path().join("1");
        std::fs::create_dir_all(&old_dir).unwrap();
        let a = samples(0, 1000, 15_000);
        let mut payload = Vec::new();
        for piece in a.chunks(PIECE_SAMPLES) {
            let bytes = codec::encode(piece);
            assert_eq!(bytes[0], 1, "a zstd-compressed piece");
            codec::put_varint(&mut payload, codec::zigzag(piece[0].t));
            codec::put_varint(&mut payload, (piece[piece.len() - 1].t - piece[0].t) as u64);
            codec::put_varint(&mut payload, piece.len() as u64);
            codec::put_varint(&mut payload, bytes.len() as u64);
            payload.extend_from_slice(&bytes);
        }
        let mut w = RunWriter::create_v2(&old_dir.join("chunks")).unwrap();
        w.add(3, a[0].t, a[999].t, &payload).unwrap();
        w.finish().unwrap();
        let rows = rollup(&a, Resolution::OneHour);
        let times: Vec<i64> = rows.iter().map(|r| r.t).collect();
        let column = |f: fn(&RollupRow) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
        let mut w = RunWriter::create_v2(&old_dir.join("samples_1h")).unwrap();
        let columns = [
            column(|r| r.min),
            column(|r| r.max),
            column(|r| r.sum),
            column(|r| r.count),
            column(|r| r.last),
            column(|r| (r.first_t - r.t) as f64),
            column(|r| r.first),
        ];
        w.add(
            3,
            rows[0].t,
            rows[rows.len() - 1].t,
            &codec::encode_columns(&times, &columns),
        )
        .unwrap();
        w.finish().unwrap();
        let meta = Meta {
            order: 1,
            min_t: a[0].t,
            max_t: a[999].t,
            series: 1,
            samples: 1000,
            sources: 1,
            replaces: Vec::new(),
            max_series_id: None,
        };
        std::fs::write(
            old_dir.join("meta.json"),
            serde_json::to_vec(&meta).unwrap(),
        )
        .unwrap();
        let (old, damage) = Block::open(&old_dir).unwrap();
        assert_eq!(damage, 0);
        assert_eq!(old.all_samples().unwrap()[&3], a);
        let mut got = BTreeMap::new();
        old.read_rollups(&[3], Resolution::OneHour, 0, i64::MAX, &mut got)
            .unwrap();
        assert_eq!(format!("{:?}", got[&3]), format!("{rows:?}"));
        // Compaction reads it beside a block of the current format.
        let b = samples(a[999].t + 15_000, 100, 15_000);
        let new = Block::write(
            &dir.path().join("2"),
            Lineage::flush(2),
            &[3],
            &mut no_labels,
            &mut |_| Ok(b.clone()),
        )
        .unwrap()
        .unwrap();
        let merged = compact(&dir.path().join("3"), &[&old, &new], &mut no_labels, true)
            .unwrap()
            .unwrap();
        let all: Vec<Sample> = a.iter().chain(&b).copied().collect();
        assert_eq!(merged.all_samples().unwrap()[&3], all);
    }

    #[test]
    fn rollup_rows_merge_like_one_aggregate() {
        let all = vec![
            Sample { t: 0, v: f64::NAN },
            Sample { t: 10, v: 4.0 },
            Sample { t: 20, v: 2.0 },
            Sample { t: 30, v: 5.0 },
        ];
        let whole = rollup(&all, Resolution::FiveMinutes);
        let merged = merge_rollups(
            rollup(&all[..2], Resolution::FiveMinutes),
            &rollup(&all[2..], Resolution::FiveMinutes),
        );
        assert_eq!(format!("{whole:?}"), format!("{merged:?}"));
        assert_eq!(merged[0].min, 2.0);
        assert_eq!(merged[0].max, 5.0);
        assert_eq!(merged[0].count, 4.0);
        assert_eq!(merged[0].last, 5.0);
        assert!(merged[0].sum.is_nan());
    }
}
