//! On-disk blocks: what the head flushes and compaction merges.
//!
//! A block is a directory `blocks/<id>/` with a `meta.json` and up to three *run files*:
//! `chunks` (raw samples as compressed chunks), `samples_5m` and `samples_1h` (rollups). Each
//! is deleted on its own when its retention passes, so raw data can leave the disk while the
//! rollups of the same time range stay.
//!
//! Run file layout (integers little-endian):
//!
//! ```text
//! "SMRUNS01"
//! run*   : series u64 | len u32 | crc32(payload) u32 | payload
//! index  : series u64 | offset u64 | len u32 | min_t i64 | max_t i64      (sorted by series)
//! footer : index_offset u64 | entries u64 | crc32(index) u32 | 0u32 | "SMINDEX1"
//! ```
//!
//! Every run is self-describing and checksummed, so a file whose footer or index is damaged is
//! recovered by scanning its runs up to the first damaged one; the index is then rewritten.
//! Memory holds only every 64th index entry; a lookup reads one index page.

use super::codec;
use crate::model::{Sample, TimestampMs};
use crate::storage::{merge_rollups, rollup, Resolution, RollupRow};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const FILE_MAGIC: &[u8; 8] = b"SMRUNS01";
const FOOTER_MAGIC: &[u8; 8] = b"SMINDEX1";
const RUN_HEADER: usize = 16;
const ENTRY: usize = 36;
const FOOTER: usize = 32;
/// Index entries per page kept in memory by their first series id.
const PAGE: usize = 64;
/// Largest run accepted when scanning a damaged file.
const MAX_RUN: u32 = 1 << 30;

/// Samples per separately decodable piece of a run.
const PIECE_SAMPLES: usize = 720;

/// Where a series' run is in a run file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub series: u64,
    pub offset: u64,
    pub len: u32,
    pub min_t: TimestampMs,
    pub max_t: TimestampMs,
}

impl Entry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.series.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.min_t.to_le_bytes());
        out.extend_from_slice(&self.max_t.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        Entry {
            series: le_u64(&b[0..8]),
            offset: le_u64(&b[8..16]),
            len: le_u32(&b[16..20]),
            min_t: le_u64(&b[20..28]) as i64,
            max_t: le_u64(&b[28..36]) as i64,
        }
    }
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap_or([0; 4]))
}

fn damaged(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Writes a run file: runs in any order, then the index and footer; durable on `finish`.
pub(super) struct RunWriter {
    path: PathBuf,
    out: BufWriter<File>,
    offset: u64,
    entries: Vec<Entry>,
}

impl RunWriter {
    pub fn create(path: &Path) -> io::Result<RunWriter> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        out.write_all(FILE_MAGIC)?;
        Ok(RunWriter {
            path: path.to_owned(),
            out,
            offset: FILE_MAGIC.len() as u64,
            entries: Vec::new(),
        })
    }

    pub fn add(
        &mut self,
        series: u64,
        min_t: TimestampMs,
        max_t: TimestampMs,
        payload: &[u8],
    ) -> io::Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| damaged("run too large".into()))?;
        let mut header = Vec::with_capacity(RUN_HEADER);
        header.extend_from_slice(&series.to_le_bytes());
        header.extend_from_slice(&len.to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.out.write_all(&header)?;
        self.out.write_all(payload)?;
        self.entries.push(Entry {
            series,
            offset: self.offset,
            len,
            min_t,
            max_t,
        });
        self.offset += (RUN_HEADER + payload.len()) as u64;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes index and footer, fsyncs, and opens the file for reading.
    pub fn finish(mut self) -> io::Result<RunFile> {
        self.entries.sort_by_key(|e| e.series);
        write_index(&mut self.out, self.offset, &self.entries)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io::Error::other(e.to_string()))?;
        file.sync_all()?;
        Ok(RunFile::from_entries(
            File::open(&self.path)?,
            self.path,
            self.offset,
            &self.entries,
        ))
    }
}

fn write_index(out: &mut impl Write, index_offset: u64, entries: &[Entry]) -> io::Result<()> {
    let mut index = Vec::with_capacity(entries.len() * ENTRY);
    for e in entries {
        e.encode(&mut index);
    }
    out.write_all(&index)?;
    let mut footer = Vec::with_capacity(FOOTER);
    footer.extend_from_slice(&index_offset.to_le_bytes());
    footer.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    footer.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
    footer.extend_from_slice(&0u32.to_le_bytes());
    footer.extend_from_slice(FOOTER_MAGIC);
    out.write_all(&footer)?;
    out.flush()
}

/// A run file open for reading.
pub(super) struct RunFile {
    path: PathBuf,
    file: File,
    index_offset: u64,
    entries: u64,
    /// First series id of each index page.
    pages: Vec<u64>,
}

/// What opening a run file found.
pub(super) struct Opened {
    pub file: RunFile,
    /// Bytes that could not be recovered (0 when the file was intact).
    pub damaged_bytes: u64,
}

impl RunFile {
    fn from_entries(file: File, path: PathBuf, index_offset: u64, entries: &[Entry]) -> RunFile {
        RunFile {
            path,
            file,
            index_offset,
            entries: entries.len() as u64,
            pages: entries.iter().step_by(PAGE).map(|e| e.series).collect(),
        }
    }

    /// Opens a run file, recovering the intact runs of a damaged one (and rewriting its index;
    /// `time_range` reads a run's first and last time from its payload).
    pub fn open(path: &Path, time_range: TimeRange) -> io::Result<Opened> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        match read_index(&file, len) {
            Ok((index_offset, entries)) => Ok(Opened {
                file: RunFile::from_entries(file, path.to_owned(), index_offset, &entries),
                damaged_bytes: 0,
            }),
            Err(_) => {
                let (valid_end, entries) = scan_runs(&file, len, time_range)?;
                file.set_len(valid_end)?;
                let mut tail = Vec::new();
                write_index(&mut tail, valid_end, &entries)?;
                file.write_all_at(&tail, valid_end)?;
                file.sync_all()?;
                Ok(Opened {
                    file: RunFile::from_entries(file, path.to_owned(), valid_end, &entries),
                    damaged_bytes: len.saturating_sub(valid_end),
                })
            }
        }
    }

    pub fn size(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    fn read_entries(&self, first: u64, count: u64) -> io::Result<Vec<Entry>> {
        let mut buf = vec![0u8; count as usize * ENTRY];
        self.file
            .read_exact_at(&mut buf, self.index_offset + first * ENTRY as u64)?;
        Ok(buf.chunks_exact(ENTRY).map(Entry::decode).collect())
    }

    /// Every index entry, sorted by series.
    pub fn all_entries(&self) -> io::Result<Vec<Entry>> {
        self.read_entries(0, self.entries)
    }

    /// Index entries of `ids` (sorted ascending), each index page read once.
    pub fn lookup(&self, ids: &[u64]) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut page: Option<(usize, Vec<Entry>)> = None;
        for &id in ids {
            let p = self.pages.partition_point(|&first| first <= id);
            if p == 0 {
                continue;
            }
            let p = p - 1;
            if page.as_ref().is_none_or(|(n, _)| *n != p) {
                let first = (p * PAGE) as u64;
                let count = (self.entries - first).min(PAGE as u64);
                page = Some((p, self.read_entries(first, count)?));
            }
            if let Some((_, entries)) = &page {
                if let Ok(i) = entries.binary_search_by_key(&id, |e| e.series) {
                    out.push(entries[i]);
                }
            }
        }
        Ok(out)
    }

    /// A run's payload, checksum verified.
    pub fn read(&self, entry: &Entry) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; RUN_HEADER + entry.len as usize];
        self.file.read_exact_at(&mut buf, entry.offset)?;
        let (header, payload) = buf.split_at(RUN_HEADER);
        if le_u64(&header[0..8]) != entry.series
            || le_u32(&header[8..12]) != entry.len
            || le_u32(&header[12..16]) != crc32fast::hash(payload)
        {
            return Err(damaged(format!(
                "{}: damaged run of series {} at offset {}",
                self.path.display(),
                entry.series,
                entry.offset
            )));
        }
        Ok(payload.to_vec())
    }
}

fn read_index(file: &File, len: u64) -> io::Result<(u64, Vec<Entry>)> {
    if len < (FILE_MAGIC.len() + FOOTER) as u64 {
        return Err(damaged("too short".into()));
    }
    let mut footer = [0u8; FOOTER];
    file.read_exact_at(&mut footer, len - FOOTER as u64)?;
    let index_offset = le_u64(&footer[0..8]);
    let entries = le_u64(&footer[8..16]);
    let index_len = entries
        .checked_mul(ENTRY as u64)
        .ok_or_else(|| damaged("bad footer".into()))?;
    if &footer[24..32] != FOOTER_MAGIC
        || index_offset.checked_add(index_len) != Some(len - FOOTER as u64)
    {
        return Err(damaged("bad footer".into()));
    }
    let mut index = vec![0u8; index_len as usize];
    file.read_exact_at(&mut index, index_offset)?;
    if crc32fast::hash(&index) != le_u32(&footer[16..20]) {
        return Err(damaged("index checksum mismatch".into()));
    }
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0)?;
    if &magic != FILE_MAGIC {
        return Err(damaged("bad magic".into()));
    }
    Ok((
        index_offset,
        index.chunks_exact(ENTRY).map(Entry::decode).collect(),
    ))
}

/// Intact runs from the start of a damaged file: (end of the last intact run, their entries).
/// Reads the first and last sample (or bucket) time of a run's payload.
pub(super) type TimeRange = fn(&[u8]) -> Option<(TimestampMs, TimestampMs)>;

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

fn scan_runs(file: &File, len: u64, time_range: TimeRange) -> io::Result<(u64, Vec<Entry>)> {
    let mut magic = [0u8; 8];
    if file.read_exact_at(&mut magic, 0).is_err() || &magic != FILE_MAGIC {
        // Not even the header: nothing to recover, keep an empty valid file.
        file.set_len(0)?;
        file.write_all_at(FILE_MAGIC, 0)?;
        return Ok((FILE_MAGIC.len() as u64, Vec::new()));
    }
    let mut offset = FILE_MAGIC.len() as u64;
    let mut entries = Vec::new();
    let mut header = [0u8; RUN_HEADER];
    while offset + RUN_HEADER as u64 <= len {
        file.read_exact_at(&mut header, offset)?;
        let run_len = le_u32(&header[8..12]);
        if run_len > MAX_RUN || offset + (RUN_HEADER as u64) + u64::from(run_len) > len {
            break;
        }
        let mut payload = vec![0u8; run_len as usize];
        file.read_exact_at(&mut payload, offset + RUN_HEADER as u64)?;
        if crc32fast::hash(&payload) != le_u32(&header[12..16]) {
            break;
        }
        let Some((min_t, max_t)) = time_range(&payload) else {
            break;
        };
        entries.push(Entry {
            series: le_u64(&header[0..8]),
            offset,
            len: run_len,
            min_t,
            max_t,
        });
        offset += RUN_HEADER as u64 + u64::from(run_len);
    }
    entries.sort_by_key(|e| e.series);
    entries.dedup_by_key(|e| e.series);
    Ok((offset, entries))
}

/// Payload of a run: the samples in pieces of up to [`PIECE_SAMPLES`], each
/// `min_t i64 | max_t i64 | count u32 | len u32 | bytes` with the bytes from `codec.rs`, so a
/// read decodes only the pieces its range overlaps.
pub(super) fn encode_samples(samples: &[Sample]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in samples.chunks(PIECE_SAMPLES) {
        let (Some(first), Some(last)) = (piece.first(), piece.last()) else {
            continue;
        };
        let bytes = codec::encode(piece);
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
        if max_t >= start && min_t <= end {
            let samples = codec::decode(bytes)?;
            if samples.len() != count {
                return Err(damaged("piece holds another sample count".into()));
            }
            out.extend(samples.into_iter().filter(|s| s.t >= start && s.t <= end));
        }
        r.0 = rest;
    }
    Ok(out)
}

/// Payload of a rollup run: the bucket starts and seven value columns (min, max, sum, count,
/// last, the first sample's offset in its bucket in ms, the first sample's value) in one
/// compressed frame. Runs written before the first sample was kept have five columns.
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
    codec::encode_columns(&times, &columns)
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
}

/// A block on disk.
pub(super) struct Block {
    pub dir: PathBuf,
    pub meta: Meta,
    pub chunks: Option<RunFile>,
    pub rollups: Vec<(Resolution, RunFile)>,
}

fn file_name(resolution: Option<Resolution>) -> &'static str {
    resolution.map_or("chunks", Resolution::name)
}

impl Block {
    /// Writes a block from per-series samples (sorted by series; each series' samples sorted
    /// by time), with both rollups. Written into `<dir>.tmp` and renamed, so a crash leaves
    /// either the whole block or a `.tmp` directory that opening removes.
    pub fn write(
        dir: &Path,
        order: u64,
        sources: u64,
        replaces: Vec<u64>,
        series: impl Iterator<Item = io::Result<(u64, Vec<Sample>)>>,
    ) -> io::Result<Option<Block>> {
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let mut chunks = RunWriter::create(&tmp.join(file_name(None)))?;
        let mut rollups = Resolution::ALL
            .iter()
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
        };
        for item in series {
            let (id, samples) = item?;
            let samples = samples.as_slice();
            let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
                continue;
            };
            chunks.add(id, first.t, last.t, &encode_samples(samples))?;
            for (resolution, writer) in &mut rollups {
                let rows = rollup(samples, *resolution);
                if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
                    writer.add(id, a.t, b.t, &encode_rollups(&rows))?;
                }
            }
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
        let mut open = |name: &str| -> io::Result<Option<RunFile>> {
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
            Ok(Some(opened.file))
        };
        let chunks = open(file_name(None))?;
        let mut rollups = Vec::new();
        for r in Resolution::ALL {
            if let Some(f) = open(file_name(Some(r)))? {
                rollups.push((r, f));
            }
        }
        Ok((
            Block {
                dir: dir.to_owned(),
                meta,
                chunks,
                rollups,
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
            .map(|(_, f)| f)
    }

    /// Bytes on disk of the raw chunks, or of the rollups.
    pub fn size(&self, rollups: bool) -> u64 {
        if rollups {
            self.rollups.iter().map(|(_, f)| f.size()).sum()
        } else {
            self.chunks.iter().map(RunFile::size).sum()
        }
    }

    /// Deletes the raw chunks (`None`) or a rollup file from disk.
    pub fn drop_file(&mut self, resolution: Option<Resolution>) -> io::Result<()> {
        let path = self.dir.join(file_name(resolution));
        match resolution {
            None => self.chunks = None,
            Some(r) => self.rollups.retain(|(x, _)| *x != r),
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_none() && self.rollups.is_empty()
    }

    /// Samples in `[start, end]` of the given series (sorted ascending), appended per series
    /// to `out`. A damaged run is logged and skipped; the rest is still answered.
    pub fn read_samples(
        &self,
        ids: &[u64],
        start: TimestampMs,
        end: TimestampMs,
        out: &mut BTreeMap<u64, Vec<Sample>>,
    ) -> io::Result<()> {
        let Some(file) = &self.chunks else {
            return Ok(());
        };
        if self.meta.max_t < start || self.meta.min_t > end {
            return Ok(());
        }
        for entry in file.lookup(ids)? {
            if entry.max_t < start || entry.min_t > end {
                continue;
            }
            match file
                .read(&entry)
                .and_then(|p| decode_samples(&p, start, end))
            {
                Ok(samples) => out.entry(entry.series).or_default().extend(samples),
                Err(e) => tracing::error!(error = %e, "skipping a damaged run"),
            }
        }
        Ok(())
    }

    /// Rollup rows with bucket starts in `[start, end]`, merged into `out` per series. Reads
    /// the block's rollup file, or aggregates its raw chunks if the rollup is gone.
    pub fn read_rollups(
        &self,
        ids: &[u64],
        resolution: Resolution,
        start: TimestampMs,
        end: TimestampMs,
        out: &mut BTreeMap<u64, Vec<RollupRow>>,
    ) -> io::Result<()> {
        if self.meta.max_t < start || self.meta.min_t > end.saturating_add(resolution.ms()) {
            return Ok(());
        }
        let Some(file) = self.rollup_file(resolution) else {
            let mut raw = BTreeMap::new();
            self.read_samples(
                ids,
                start,
                end.saturating_add(resolution.ms() - 1),
                &mut raw,
            )?;
            for (id, samples) in raw {
                let rows: Vec<RollupRow> = rollup(&samples, resolution)
                    .into_iter()
                    .filter(|r| r.t >= start && r.t <= end)
                    .collect();
                merge_into(out, id, &rows);
            }
            return Ok(());
        };
        for entry in file.lookup(ids)? {
            if entry.max_t < start || entry.min_t > end {
                continue;
            }
            match file.read(&entry).and_then(|p| decode_rollups(&p)) {
                Ok(rows) => {
                    let rows: Vec<RollupRow> = rows
                        .into_iter()
                        .filter(|r| r.t >= start && r.t <= end)
                        .collect();
                    merge_into(out, entry.series, &rows);
                }
                Err(e) => tracing::error!(error = %e, "skipping a damaged rollup run"),
            }
        }
        Ok(())
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
            self.read_samples(&ids, i64::MIN, i64::MAX, &mut out)?;
        }
        Ok(out)
    }

    /// The latest raw sample time per series, for replay (samples up to it are on disk).
    pub fn max_times(&self) -> io::Result<Vec<(u64, TimestampMs)>> {
        Ok(match &self.chunks {
            Some(file) => file
                .all_entries()?
                .iter()
                .map(|e| (e.series, e.max_t))
                .collect(),
            None => Vec::new(),
        })
    }
}

/// Merges blocks (consecutive in read order, all with raw chunks) into one block at `dir`,
/// one series at a time: chunks are re-cut to full size and rollups recomputed.
pub(super) fn compact(dir: &Path, blocks: &[&Block]) -> io::Result<Option<Block>> {
    let mut indexes = Vec::with_capacity(blocks.len());
    for block in blocks {
        let file = block
            .chunks
            .as_ref()
            .ok_or_else(|| io::Error::other("cannot compact a block without raw chunks"))?;
        indexes.push((file, file.all_entries()?));
    }
    let ids: std::collections::BTreeSet<u64> = indexes
        .iter()
        .flat_map(|(_, entries)| entries.iter().map(|e| e.series))
        .collect();
    let order = blocks.iter().map(|b| b.meta.order).min().unwrap_or(0);
    let sources = blocks.iter().map(|b| b.meta.sources).sum();
    let series = ids.into_iter().map(|id| {
        let mut samples: Vec<Sample> = Vec::new();
        for (file, entries) in &indexes {
            if let Ok(i) = entries.binary_search_by_key(&id, |e| e.series) {
                match file
                    .read(&entries[i])
                    .and_then(|p| decode_samples(&p, i64::MIN, i64::MAX))
                {
                    Ok(run) => samples.extend(run),
                    // Compaction must not spread damage or lose the rest: stop here, the
                    // sources stay as they are.
                    Err(e) => return Err(e),
                }
            }
        }
        if !samples.windows(2).all(|w| w[0].t < w[1].t) {
            samples.sort_by_key(|s| s.t);
            samples.dedup_by_key(|s| s.t);
        }
        Ok((id, samples))
    });
    let replaces = blocks.iter().filter_map(|b| b.number()).collect();
    Block::write(dir, order, sources, replaces, series)
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

    #[test]
    fn blocks_round_trip_samples_and_rollups() {
        let dir = tempfile::tempdir().unwrap();
        let a = samples(0, 1000, 15_000);
        let b = samples(7_000, 10, 60_000);
        let block = Block::write(
            &dir.path().join("1"),
            1,
            1,
            Vec::new(),
            [Ok((3u64, a.clone())), Ok((9u64, b.clone()))].into_iter(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(block.meta.samples, 1010);
        let mut out = BTreeMap::new();
        block
            .read_samples(&[1, 3, 9], 0, i64::MAX, &mut out)
            .unwrap();
        assert_eq!(out[&3], a);
        assert_eq!(out[&9], b);
        assert!(!out.contains_key(&1));
        let mut part = BTreeMap::new();
        block.read_samples(&[3], 30_000, 60_000, &mut part).unwrap();
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
    fn a_damaged_run_file_keeps_its_intact_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        let mut w = RunWriter::create(&path).unwrap();
        for id in 0..200u64 {
            w.add(id, 0, 1, &[id as u8; 50]).unwrap();
        }
        w.finish().unwrap();
        // Cut into the 150th run: the index and footer are gone, runs 0..149 intact.
        let cut = (FILE_MAGIC.len() + 150 * (RUN_HEADER + 50) + 10) as u64;
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let opened = RunFile::open(&path, |_| Some((0, 1))).unwrap();
        assert_eq!(opened.damaged_bytes, 10);
        let ids: Vec<u64> = (0..200).collect();
        let found = opened.file.lookup(&ids).unwrap();
        assert_eq!(found.len(), 150);
        assert_eq!(opened.file.read(&found[149]).unwrap(), vec![149u8; 50]);
        // The rebuilt file opens cleanly.
        assert_eq!(
            RunFile::open(&path, |_| Some((0, 1)))
                .unwrap()
                .damaged_bytes,
            0
        );
        // A flipped byte inside a run is caught on read.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xFF], found[7].offset + RUN_HEADER as u64 + 3)
            .unwrap();
        let reopened = RunFile::open(&path, |_| Some((0, 1))).unwrap().file;
        assert!(reopened.read(&found[7]).is_err());
        assert!(reopened.read(&found[8]).is_ok());
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
