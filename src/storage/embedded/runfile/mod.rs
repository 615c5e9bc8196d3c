//! Run files: the container every block file uses. A run is one series' payload (raw chunks
//! or rollup rows, which this module never looks into); an index sorted by series finds it.
//!
//! Layout, version 2 (integers little-endian; varints LEB128, signed ones zigzag):
//!
//! ```text
//! "SMRUNS02"
//! run*   : varint series | varint len | crc32(payload) u32 | payload
//! index  : pages of up to 64 entries sorted by series, the first entry of a page absolute
//!          (varint series | varint offset | varint len | zigzag min_t | varint max_t - min_t),
//!          the others relative to the entry before it (varint series delta | zigzag offset
//!          minus the end of that entry's run | varint len | zigzag min_t delta | varint
//!          max_t - min_t)
//! footer : index_offset u64 | entries u64 | crc32(index) u32 | 0u32 | "SMINDEX2"
//! ```
//!
//! Version 3 (`SMRUNS03` … `SMINDEX3`, written now) compresses the runs of many series
//! together, because one series' run in a block is a few hundred bytes, too short for zstd to
//! find much in, and every run paid its own frame, checksum and headers (docs/storage.md,
//! "Blocks"):
//!
//! ```text
//! "SMRUNS03"
//! frame* : varint raw_len | varint stored_len | crc32(those two varints, stored) u32 | stored
//!          stored: zstd of the frame's runs, or the runs as they are when that is not
//!          smaller (stored_len == raw_len); runs: (varint series | varint len | payload)*,
//!          up to 16 runs or 32 KiB (one run larger than that is a frame of its own)
//! index  : pages as version 2, an entry giving its frame's offset instead of its own
//!          (varint series | varint offset | zigzag min_t | varint max_t - min_t for the first
//!          of a page; varint series delta | zigzag offset delta | zigzag min_t delta | varint
//!          max_t - min_t for the others)
//! footer : as version 2, ending "SMINDEX3"
//! ```
//!
//! A read decompresses its frame and walks the frame's run headers to its series;
//! [`RunReader`] keeps the last frame, so reading series in order decompresses each frame once.
//!
//! Version 1 (`SMRUNS01` … `SMINDEX1`, written before) had a fixed 16-byte run header
//! (series u64 | len u32 | crc32 u32) and fixed 36-byte index entries (series u64 | offset u64 |
//! len u32 | min_t i64 | max_t i64); it is still read. Version 2 exists because those fixed
//! fields cost 52 bytes per series per block, as much as the compressed samples of a
//! half-hour block (docs/storage.md, "Blocks").
//!
//! Every run (version 3: every frame) is self-describing and checksummed, so a file whose
//! footer or index is damaged is recovered by scanning its runs up to the first damaged one;
//! the index is then rewritten in the file's own version. Memory holds the first series id and position of each index page;
//! a lookup reads one page.

use super::codec::{self, put_varint, unzigzag, zigzag, Reader};
use super::frames;
use crate::model::TimestampMs;
use crate::varint::varint_len;
use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const FOOTER: usize = 32;
/// Index entries per page.
const PAGE: usize = 64;
/// Largest run accepted when scanning a damaged file.
const MAX_RUN: u32 = 1 << 30;
/// The longest version 2 run header or version 3 frame header: two 10-byte varints and the
/// checksum.
const MAX_HEADER: usize = 24;
/// The shortest index entry: five one-byte varints (version 2), four (version 3).
const MIN_ENTRY: usize = 4;
/// A version 3 frame is closed at this many runs, or once its runs take [`FRAME_BYTES`]: a
/// read of one series decompresses its whole frame, and frames of 64 runs made sparse reads
/// (500 series of 100,000) 1.5x slower for 7 % less disk than frames of 16.
const FRAME_RUNS: usize = 16;
const FRAME_BYTES: usize = 32 << 10;
/// Frames larger than this are stored uncompressed (a run of many pieces, whose pieces are
/// compressed one by one): the decompressor refuses more.
const MAX_COMPRESSED_FRAME: usize = 64 << 20;

/// Where a series' run is in a run file (`offset` is where its header starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub series: u64,
    pub offset: u64,
    /// The payload's length (version 3: 0, the frame's run header has it).
    pub len: u32,
    pub min_t: TimestampMs,
    pub max_t: TimestampMs,
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap_or([0; 4]))
}

pub(super) fn damaged(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A run's header: (series, payload length, payload checksum).
type RunHeader = (u64, u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
    V3,
}

impl Version {
    fn magic(self) -> &'static [u8; 8] {
        match self {
            Version::V1 => b"SMRUNS01",
            Version::V2 => b"SMRUNS02",
            Version::V3 => b"SMRUNS03",
        }
    }

    fn footer_magic(self) -> &'static [u8; 8] {
        match self {
            Version::V1 => b"SMINDEX1",
            Version::V2 => b"SMINDEX2",
            Version::V3 => b"SMINDEX3",
        }
    }

    fn of_magic(magic: &[u8]) -> Option<Version> {
        [Version::V1, Version::V2, Version::V3]
            .into_iter()
            .find(|v| v.magic() == magic)
    }

    /// The length of a run's header (version 3: inside its frame, no checksum).
    fn header_len(self, series: u64, len: u32) -> usize {
        match self {
            Version::V1 => 16,
            Version::V2 => varint_len(series) + varint_len(u64::from(len)) + 4,
            Version::V3 => varint_len(series) + varint_len(u64::from(len)),
        }
    }

    fn encode_header(self, (series, len, crc): RunHeader, out: &mut Vec<u8>) {
        match self {
            Version::V1 => {
                out.extend_from_slice(&series.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Version::V2 | Version::V3 => {
                put_varint(out, series);
                put_varint(out, u64::from(len));
            }
        }
        if self != Version::V3 {
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }

    /// The header at the start of `b` and its length; `None` when `b` does not hold one.
    fn decode_header(self, b: &[u8]) -> Option<(RunHeader, usize)> {
        match self {
            Version::V1 => {
                let b = b.get(..16)?;
                Some((
                    (le_u64(&b[0..8]), le_u32(&b[8..12]), le_u32(&b[12..16])),
                    16,
                ))
            }
            Version::V2 | Version::V3 => {
                let mut r = Reader(b);
                let series = r.varint().ok()?;
                let len = u32::try_from(r.varint().ok()?).ok()?;
                let used = b.len() - r.0.len();
                if self == Version::V3 {
                    return Some(((series, len, 0), used));
                }
                let crc = le_u32(b.get(used..used + 4)?);
                Some(((series, len, crc), used + 4))
            }
        }
    }

    /// The index bytes of `entries` (sorted by series) and the byte position of each page.
    fn encode_index(self, entries: &[Entry]) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::with_capacity(entries.len() * 12);
        let mut pages = Vec::with_capacity(entries.len().div_ceil(PAGE));
        for (i, e) in entries.iter().enumerate() {
            if i % PAGE == 0 {
                pages.push(out.len() as u64);
            }
            match self {
                Version::V1 => {
                    out.extend_from_slice(&e.series.to_le_bytes());
                    out.extend_from_slice(&e.offset.to_le_bytes());
                    out.extend_from_slice(&e.len.to_le_bytes());
                    out.extend_from_slice(&e.min_t.to_le_bytes());
                    out.extend_from_slice(&e.max_t.to_le_bytes());
                }
                Version::V2 | Version::V3 => {
                    let v2 = self == Version::V2;
                    match (i % PAGE, i.checked_sub(1).map(|p| &entries[p])) {
                        (1.., Some(prev)) => {
                            put_varint(&mut out, e.series.wrapping_sub(prev.series));
                            let expected = self.run_end(prev);
                            put_varint(&mut out, zigzag(e.offset.wrapping_sub(expected) as i64));
                            if v2 {
                                put_varint(&mut out, u64::from(e.len));
                            }
                            put_varint(&mut out, zigzag(e.min_t.wrapping_sub(prev.min_t)));
                        }
                        _ => {
                            put_varint(&mut out, e.series);
                            put_varint(&mut out, e.offset);
                            if v2 {
                                put_varint(&mut out, u64::from(e.len));
                            }
                            put_varint(&mut out, zigzag(e.min_t));
                        }
                    }
                    put_varint(&mut out, e.max_t.wrapping_sub(e.min_t) as u64);
                }
            }
        }
        (out, pages)
    }

    /// Decodes `count` entries from `b`, the start of a page, with the byte position of each
    /// page in `b`; or fewer, ending with the first entry of series `until` or above.
    fn decode_entries(
        self,
        b: &[u8],
        count: usize,
        until: Option<u64>,
    ) -> io::Result<(Vec<Entry>, Vec<u64>)> {
        let until = |series: u64| until.is_some_and(|until| series >= until);
        let bad = || damaged("index entry cut short".into());
        // `count` comes from the footer: never reserve more than the bytes can hold.
        let mut out: Vec<Entry> = Vec::with_capacity(count.min(b.len() / MIN_ENTRY));
        let mut pages = Vec::new();
        match self {
            Version::V1 => {
                for (i, e) in b.chunks_exact(36).take(count).enumerate() {
                    if i % PAGE == 0 {
                        pages.push((i * 36) as u64);
                    }
                    let series = le_u64(&e[0..8]);
                    out.push(Entry {
                        series,
                        offset: le_u64(&e[8..16]),
                        len: le_u32(&e[16..20]),
                        min_t: le_u64(&e[20..28]) as i64,
                        max_t: le_u64(&e[28..36]) as i64,
                    });
                    if until(series) {
                        return Ok((out, pages));
                    }
                }
            }
            Version::V2 | Version::V3 => {
                let v2 = self == Version::V2;
                let mut r = Reader(b);
                for i in 0..count {
                    if i % PAGE == 0 {
                        pages.push((b.len() - r.0.len()) as u64);
                    }
                    let (series, offset, len, min_t) = match (i % PAGE, out.last()) {
                        (1.., Some(prev)) => (
                            prev.series.wrapping_add(r.varint()?),
                            self.run_end(prev)
                                .wrapping_add(unzigzag(r.varint()?) as u64),
                            if v2 { r.varint()? } else { 0 },
                            prev.min_t.wrapping_add(unzigzag(r.varint()?)),
                        ),
                        _ => (
                            r.varint()?,
                            r.varint()?,
                            if v2 { r.varint()? } else { 0 },
                            unzigzag(r.varint()?),
                        ),
                    };
                    let max_t = min_t.wrapping_add(r.varint()? as i64);
                    let len = u32::try_from(len).map_err(|_| bad())?;
                    out.push(Entry {
                        series,
                        offset,
                        len,
                        min_t,
                        max_t,
                    });
                    if until(series) {
                        return Ok((out, pages));
                    }
                }
            }
        }
        if out.len() == count {
            Ok((out, pages))
        } else {
            Err(bad())
        }
    }

    /// Where the run after `e` would start if written right after it (version 3: the frame
    /// `e` is in, which the next run most often shares).
    fn run_end(self, e: &Entry) -> u64 {
        if self == Version::V3 {
            return e.offset;
        }
        // Wrapping like the deltas around it: a damaged entry gives a wrong offset, which the
        // run's header check refuses, never an overflow.
        e.offset
            .wrapping_add(self.header_len(e.series, e.len) as u64)
            .wrapping_add(u64::from(e.len))
    }

    /// The header of the version 3 frame at the start of `b`: (raw length, stored length,
    /// checksum, header length).
    fn decode_frame_header(b: &[u8]) -> Option<(usize, usize, u32, usize)> {
        let mut r = Reader(b);
        let raw = usize::try_from(r.varint().ok()?).ok()?;
        let stored = usize::try_from(r.varint().ok()?).ok()?;
        let used = b.len() - r.0.len();
        let crc = le_u32(b.get(used..used + 4)?);
        (raw <= MAX_RUN as usize && stored <= raw).then_some((raw, stored, crc, used + 4))
    }
}

/// Writes a run file: runs in any order, then the index and footer; durable on `finish`.
pub(super) struct RunWriter {
    path: PathBuf,
    version: Version,
    out: BufWriter<File>,
    offset: u64,
    entries: Vec<Entry>,
    header: Vec<u8>,
    /// Version 3: the runs of the frame being filled, and how many.
    frame: Vec<u8>,
    frame_runs: usize,
}

impl RunWriter {
    pub fn create(path: &Path) -> io::Result<RunWriter> {
        RunWriter::create_version(path, Version::V3)
    }

    /// A writer of version 2, for tests of what earlier releases wrote.
    #[cfg(test)]
    pub fn create_v2(path: &Path) -> io::Result<RunWriter> {
        RunWriter::create_version(path, Version::V2)
    }

    /// A writer of an older version, for tests of what earlier releases wrote.
    fn create_version(path: &Path, version: Version) -> io::Result<RunWriter> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        out.write_all(version.magic())?;
        Ok(RunWriter {
            path: path.to_owned(),
            version,
            out,
            offset: version.magic().len() as u64,
            entries: Vec::new(),
            header: Vec::with_capacity(MAX_HEADER),
            frame: Vec::new(),
            frame_runs: 0,
        })
    }

    pub fn add(
        &mut self,
        series: u64,
        min_t: TimestampMs,
        max_t: TimestampMs,
        payload: &[u8],
    ) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&len| len <= MAX_RUN)
            .ok_or_else(|| damaged("run too large".into()))?;
        if self.version == Version::V3 {
            if self.frame_runs > 0 && self.frame.len() + payload.len() > FRAME_BYTES {
                self.write_frame()?;
            }
            self.version
                .encode_header((series, len, 0), &mut self.frame);
            self.frame.extend_from_slice(payload);
            self.frame_runs += 1;
            // Offsets are those of frames: this run's frame starts where the file ends now.
            self.entries.push(Entry {
                series,
                offset: self.offset,
                len: 0,
                min_t,
                max_t,
            });
            if self.frame_runs == FRAME_RUNS || self.frame.len() >= FRAME_BYTES {
                self.write_frame()?;
            }
            return Ok(());
        }
        self.header.clear();
        self.version
            .encode_header((series, len, crc32fast::hash(payload)), &mut self.header);
        self.out.write_all(&self.header)?;
        self.out.write_all(payload)?;
        self.entries.push(Entry {
            series,
            offset: self.offset,
            len,
            min_t,
            max_t,
        });
        self.offset += (self.header.len() + payload.len()) as u64;
        Ok(())
    }

    /// Writes the version 3 frame being filled, compressed when that makes it smaller.
    fn write_frame(&mut self) -> io::Result<()> {
        if self.frame_runs == 0 {
            return Ok(());
        }
        let compressed = (self.frame.len() <= MAX_COMPRESSED_FRAME)
            .then(|| codec::compress(&self.frame))
            .flatten()
            .filter(|c| c.len() < self.frame.len());
        let stored = compressed.as_deref().unwrap_or(&self.frame);
        self.header.clear();
        put_varint(&mut self.header, self.frame.len() as u64);
        put_varint(&mut self.header, stored.len() as u64);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.header);
        crc.update(stored);
        self.header.extend_from_slice(&crc.finalize().to_le_bytes());
        self.out.write_all(&self.header)?;
        self.out.write_all(stored)?;
        self.offset += (self.header.len() + stored.len()) as u64;
        self.frame.clear();
        self.frame_runs = 0;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes index and footer, fsyncs, and opens the file for reading.
    pub fn finish(mut self) -> io::Result<RunFile> {
        self.write_frame()?;
        self.entries.sort_by_key(|e| e.series);
        let index = write_index(&mut self.out, self.version, self.offset, &self.entries)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io::Error::other(e.to_string()))?;
        file.sync_all()?;
        Ok(RunFile::new(
            File::open(&self.path)?,
            self.path,
            self.version,
            self.offset,
            &self.entries,
            index,
        ))
    }
}

/// Writes index and footer; returns the index's length and page positions.
fn write_index(
    out: &mut impl Write,
    version: Version,
    index_offset: u64,
    entries: &[Entry],
) -> io::Result<(u64, Vec<u64>)> {
    let (index, pages) = version.encode_index(entries);
    out.write_all(&index)?;
    let mut footer = Vec::with_capacity(FOOTER);
    footer.extend_from_slice(&index_offset.to_le_bytes());
    footer.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    footer.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
    footer.extend_from_slice(&0u32.to_le_bytes());
    footer.extend_from_slice(version.footer_magic());
    out.write_all(&footer)?;
    out.flush()?;
    Ok((index.len() as u64, pages))
}

/// A run file open for reading.
pub(super) struct RunFile {
    /// This file's key in the frame cache.
    id: u64,
    path: PathBuf,
    file: File,
    version: Version,
    index_offset: u64,
    index_len: u64,
    entries: u64,
    /// First series id and byte position in the index of each page.
    pages: Vec<(u64, u64)>,
}

impl Drop for RunFile {
    fn drop(&mut self) {
        frames::shared().forget(self.id);
    }
}

/// What opening a run file found.
pub(super) struct Opened {
    pub file: RunFile,
    /// Bytes that could not be recovered (0 when the file was intact).
    pub damaged_bytes: u64,
}

/// An index read whole: its entries and page positions.
struct Index {
    offset: u64,
    len: u64,
    entries: Vec<Entry>,
    pages: Vec<u64>,
}

impl RunFile {
    fn new(
        file: File,
        path: PathBuf,
        version: Version,
        index_offset: u64,
        entries: &[Entry],
        (index_len, pages): (u64, Vec<u64>),
    ) -> RunFile {
        RunFile {
            id: frames::file_id(),
            path,
            file,
            version,
            index_offset,
            index_len,
            entries: entries.len() as u64,
            pages: entries
                .iter()
                .step_by(PAGE)
                .map(|e| e.series)
                .zip(pages)
                .collect(),
        }
    }

    /// Opens a run file, recovering the intact runs of a damaged one (and rewriting its index;
    /// `time_range` reads a run's first and last time from its payload).
    pub fn open(path: &Path, time_range: TimeRange) -> io::Result<Opened> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        let mut magic = [0u8; 8];
        let version = file
            .read_exact_at(&mut magic, 0)
            .ok()
            .and_then(|()| Version::of_magic(&magic));
        if version.is_none() && magic.starts_with(b"SMRUNS") {
            // A version this release does not know (written by a later one): refuse it, the
            // caller sets the block aside; never recover it as damage.
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: run file version {:?} is not supported",
                    path.display(),
                    String::from_utf8_lossy(&magic[6..])
                ),
            ));
        }
        let (version, readable) = match version {
            Some(version) => (version, len),
            None => {
                // Not even the header: nothing to recover, keep an empty valid file.
                file.set_len(0)?;
                file.write_all_at(Version::V3.magic(), 0)?;
                (Version::V3, Version::V3.magic().len() as u64)
            }
        };
        match read_index(&file, version, readable) {
            Ok(index) => Ok(Opened {
                file: RunFile {
                    id: frames::file_id(),
                    path: path.to_owned(),
                    version,
                    index_offset: index.offset,
                    index_len: index.len,
                    entries: index.entries.len() as u64,
                    pages: index
                        .entries
                        .iter()
                        .step_by(PAGE)
                        .map(|e| e.series)
                        .zip(index.pages)
                        .collect(),
                    file,
                },
                damaged_bytes: 0,
            }),
            Err(_) => {
                let (valid_end, entries) = scan_runs(&file, version, readable, time_range)?;
                file.set_len(valid_end)?;
                let mut tail = Vec::new();
                let index = write_index(&mut tail, version, valid_end, &entries)?;
                file.write_all_at(&tail, valid_end)?;
                file.sync_all()?;
                Ok(Opened {
                    file: RunFile::new(file, path.to_owned(), version, valid_end, &entries, index),
                    damaged_bytes: len.saturating_sub(valid_end),
                })
            }
        }
    }

    pub fn size(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    /// The entries of index page `p` up to the first of series `until` or above.
    fn read_page(&self, p: usize, until: u64) -> io::Result<Vec<Entry>> {
        let start = self.pages[p].1;
        let end = self.pages.get(p + 1).map_or(self.index_len, |next| next.1);
        let mut buf = vec![0u8; end.saturating_sub(start) as usize];
        self.file
            .read_exact_at(&mut buf, self.index_offset + start)?;
        let count = (self.entries - (p * PAGE) as u64).min(PAGE as u64) as usize;
        Ok(self.version.decode_entries(&buf, count, Some(until))?.0)
    }

    /// Every index entry, sorted by series.
    pub fn all_entries(&self) -> io::Result<Vec<Entry>> {
        let mut buf = vec![0u8; self.index_len as usize];
        self.file.read_exact_at(&mut buf, self.index_offset)?;
        Ok(self
            .version
            .decode_entries(&buf, self.entries as usize, None)?
            .0)
    }

    /// Index entries of `ids` (sorted ascending), each index page read once and decoded only
    /// as far as the last id it can hold.
    pub fn lookup(&self, ids: &[u64]) -> io::Result<Vec<Entry>> {
        if !ids.is_sorted() {
            let mut sorted = ids.to_vec();
            sorted.sort_unstable();
            return self.lookup(&sorted);
        }
        let mut ids = ids;
        let mut out = Vec::new();
        while let Some(&id) = ids.first() {
            let p = self.pages.partition_point(|&(first, _)| first <= id);
            if p == 0 {
                ids = &ids[1..];
                continue;
            }
            let next = self.pages.get(p).map_or(u64::MAX, |&(first, _)| first);
            let (here, rest) = ids.split_at(ids.partition_point(|&id| id < next));
            let entries = self.read_page(p - 1, here[here.len() - 1])?;
            for &id in here {
                if let Ok(i) = entries.binary_search_by_key(&id, |e| e.series) {
                    out.push(entries[i]);
                }
            }
            ids = rest;
        }
        Ok(out)
    }

    /// A reader for queries: it keeps the last frame it decompressed (version 3) and shares
    /// the frames it reads through the process's frame cache.
    pub fn reader(&self) -> RunReader<'_> {
        RunReader {
            file: self,
            frame: None,
            cache: true,
        }
    }

    /// A reader that reads every frame once (compaction): it uses frames already cached but
    /// neither adds its own nor marks those as used, which would push out the ones queries use.
    pub fn reader_once(&self) -> RunReader<'_> {
        RunReader {
            cache: false,
            ..self.reader()
        }
    }

    /// A run's payload, checksum verified (for many runs, [`RunFile::reader`]).
    #[cfg(test)]
    pub fn read(&self, entry: &Entry) -> io::Result<Vec<u8>> {
        self.reader().read(entry).map(Cow::into_owned)
    }

    fn damaged_run(&self, entry: &Entry) -> io::Error {
        damaged(format!(
            "{}: damaged run of series {} at offset {}",
            self.path.display(),
            entry.series,
            entry.offset
        ))
    }

    /// The runs of the version 3 frame at `offset`, checksum verified and decompressed.
    fn read_frame(&self, offset: u64) -> io::Result<Vec<u8>> {
        let bad = || {
            damaged(format!(
                "{}: damaged frame at {offset}",
                self.path.display()
            ))
        };
        let available = self
            .index_offset
            .saturating_sub(offset)
            .min(MAX_HEADER as u64);
        let mut header = [0u8; MAX_HEADER];
        let header = &mut header[..available as usize];
        self.file.read_exact_at(header, offset)?;
        let (raw, stored, crc, header_len) =
            Version::decode_frame_header(header).ok_or_else(bad)?;
        let start = offset + header_len as u64;
        if start + stored as u64 > self.index_offset {
            return Err(bad());
        }
        let mut buf = vec![0u8; stored];
        self.file.read_exact_at(&mut buf, start)?;
        frame_runs(&header[..header_len - 4], crc, raw, buf).ok_or_else(bad)
    }

    /// A run's payload in versions 1 and 2, checksum verified.
    fn read_run(&self, entry: &Entry) -> io::Result<Vec<u8>> {
        let header_len = self.version.header_len(entry.series, entry.len);
        let mut buf = vec![0u8; header_len + entry.len as usize];
        self.file.read_exact_at(&mut buf, entry.offset)?;
        let header = self.version.decode_header(&buf);
        let payload = &buf[header_len..];
        if header
            != Some((
                (entry.series, entry.len, crc32fast::hash(payload)),
                header_len,
            ))
        {
            return Err(self.damaged_run(entry));
        }
        buf.drain(..header_len);
        Ok(buf)
    }
}

/// A frame's runs from its stored bytes, if the checksum (over the header's two varints
/// `lengths` and the stored bytes) holds and they decompress to `raw` bytes.
fn frame_runs(lengths: &[u8], crc: u32, raw: usize, stored: Vec<u8>) -> Option<Vec<u8>> {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(lengths);
    hasher.update(&stored);
    if hasher.finalize() != crc {
        return None;
    }
    let runs = if stored.len() == raw {
        stored
    } else {
        codec::decompress_exact(&stored, raw).ok()?
    };
    (runs.len() == raw).then_some(runs)
}

/// The runs of a frame in order: (series, payload); `None` at the first that does not fit,
/// and nothing after it.
fn runs_in(mut runs: &[u8]) -> impl Iterator<Item = Option<(u64, &[u8])>> {
    std::iter::from_fn(move || {
        if runs.is_empty() {
            return None;
        }
        let mut r = Reader(runs);
        let series = r.varint().ok();
        let len = r.varint().ok().and_then(|l| usize::try_from(l).ok());
        match (series, len) {
            (Some(series), Some(len)) if len <= r.0.len() => {
                let (payload, rest) = r.0.split_at(len);
                runs = rest;
                Some(Some((series, payload)))
            }
            _ => {
                runs = &[];
                Some(None)
            }
        }
    })
}

/// Reads runs of one file, keeping the last version 3 frame it decompressed.
pub(super) struct RunReader<'a> {
    file: &'a RunFile,
    frame: Option<(u64, Arc<[u8]>)>,
    cache: bool,
}

impl RunReader<'_> {
    /// A run's payload, checksum verified (borrowed from the reader's frame in version 3).
    pub fn read(&mut self, entry: &Entry) -> io::Result<Cow<'_, [u8]>> {
        if self.file.version != Version::V3 {
            return self.file.read_run(entry).map(Cow::Owned);
        }
        if self
            .frame
            .as_ref()
            .is_none_or(|(at, _)| *at != entry.offset)
        {
            self.frame = None;
            let cache = frames::shared();
            let cached = if self.cache {
                cache.get(self.file.id, entry.offset)
            } else {
                cache.peek(self.file.id, entry.offset)
            };
            let frame = match cached {
                Some(frame) => frame,
                None => {
                    let frame: Arc<[u8]> = self.file.read_frame(entry.offset)?.into();
                    if self.cache {
                        cache.insert(self.file.id, entry.offset, frame.clone());
                    }
                    frame
                }
            };
            self.frame = Some((entry.offset, frame));
        }
        let (_, runs) = self.frame.as_ref().expect("just read");
        for run in runs_in(runs) {
            match run {
                Some((series, payload)) if series == entry.series => {
                    return Ok(Cow::Borrowed(payload))
                }
                Some(_) => {}
                None => break,
            }
        }
        Err(self.file.damaged_run(entry))
    }
}

fn read_index(file: &File, version: Version, len: u64) -> io::Result<Index> {
    let magic_len = version.magic().len() as u64;
    if len < magic_len + FOOTER as u64 {
        return Err(damaged("too short".into()));
    }
    let mut footer = [0u8; FOOTER];
    file.read_exact_at(&mut footer, len - FOOTER as u64)?;
    let index_offset = le_u64(&footer[0..8]);
    let entries =
        usize::try_from(le_u64(&footer[8..16])).map_err(|_| damaged("bad footer".into()))?;
    if &footer[24..32] != version.footer_magic()
        || index_offset < magic_len
        || index_offset > len - FOOTER as u64
    {
        return Err(damaged("bad footer".into()));
    }
    let index_len = len - FOOTER as u64 - index_offset;
    let fits = match version {
        Version::V1 => Some(index_len) == (entries as u64).checked_mul(36),
        Version::V2 | Version::V3 => (entries as u64).saturating_mul(MIN_ENTRY as u64) <= index_len,
    };
    if !fits {
        return Err(damaged("bad footer".into()));
    }
    let mut index = vec![0u8; index_len as usize];
    file.read_exact_at(&mut index, index_offset)?;
    if crc32fast::hash(&index) != le_u32(&footer[16..20]) {
        return Err(damaged("index checksum mismatch".into()));
    }
    let (entries, pages) = version.decode_entries(&index, entries, None)?;
    Ok(Index {
        offset: index_offset,
        len: index_len,
        entries,
        pages,
    })
}

/// Reads the first and last sample (or bucket) time of a run's payload.
pub(super) type TimeRange = fn(&[u8]) -> Option<(TimestampMs, TimestampMs)>;

/// Intact runs from the start of a damaged file: (end of the last intact run, their entries).
fn scan_runs(
    file: &File,
    version: Version,
    len: u64,
    time_range: TimeRange,
) -> io::Result<(u64, Vec<Entry>)> {
    let mut offset = version.magic().len() as u64;
    let mut entries = Vec::new();
    let mut header = [0u8; MAX_HEADER];
    if version == Version::V3 {
        'frames: while offset < len {
            let available = (len - offset).min(MAX_HEADER as u64) as usize;
            file.read_exact_at(&mut header[..available], offset)?;
            let Some((raw, stored, crc, header_len)) =
                Version::decode_frame_header(&header[..available])
            else {
                break;
            };
            let start = offset + header_len as u64;
            if start + stored as u64 > len {
                break;
            }
            let mut buf = vec![0u8; stored];
            file.read_exact_at(&mut buf, start)?;
            let Some(runs) = frame_runs(&header[..header_len - 4], crc, raw, buf) else {
                break;
            };
            let mut found = Vec::new();
            for run in runs_in(&runs) {
                let Some((min_t, max_t)) = run.and_then(|(_, payload)| time_range(payload)) else {
                    break 'frames;
                };
                let series = run.map_or(0, |(series, _)| series);
                found.push(Entry {
                    series,
                    offset,
                    len: 0,
                    min_t,
                    max_t,
                });
            }
            entries.extend(found);
            offset = start + stored as u64;
        }
    }
    while version != Version::V3 && offset < len {
        let available = (len - offset).min(MAX_HEADER as u64) as usize;
        file.read_exact_at(&mut header[..available], offset)?;
        let Some(((series, run_len, crc), header_len)) =
            version.decode_header(&header[..available])
        else {
            break;
        };
        let start = offset + header_len as u64;
        if run_len > MAX_RUN || start + u64::from(run_len) > len {
            break;
        }
        let mut payload = vec![0u8; run_len as usize];
        file.read_exact_at(&mut payload, start)?;
        if crc32fast::hash(&payload) != crc {
            break;
        }
        let Some((min_t, max_t)) = time_range(&payload) else {
            break;
        };
        entries.push(Entry {
            series,
            offset,
            len: run_len,
            min_t,
            max_t,
        });
        offset = start + u64::from(run_len);
    }
    entries.sort_by_key(|e| e.series);
    entries.dedup_by_key(|e| e.series);
    Ok((offset, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, version: Version, ids: impl Iterator<Item = u64>) -> Vec<Entry> {
        let mut w = RunWriter::create_version(path, version).unwrap();
        for id in ids {
            let t = id as i64 * 1000 - 50_000;
            w.add(
                id * 7,
                t,
                t + id as i64,
                &vec![id as u8; 50 + id as usize % 5],
            )
            .unwrap();
        }
        let mut entries = w.entries.clone();
        entries.sort_by_key(|e| e.series);
        w.finish().unwrap();
        entries
    }

    #[test]
    fn both_versions_find_and_read_every_run() {
        let dir = tempfile::tempdir().unwrap();
        // Runs written out of series order, ids past one varint byte, negative and positive
        // times, more than three index pages.
        let ids = (0..300u64).rev().chain(1000..1030);
        for version in [Version::V1, Version::V2, Version::V3] {
            let path = dir.path().join(format!("{version:?}"));
            let written = write(&path, version, ids.clone());
            let opened = RunFile::open(&path, |_| None).unwrap();
            assert_eq!(opened.damaged_bytes, 0);
            let file = opened.file;
            assert_eq!(file.version, version);
            assert_eq!(file.all_entries().unwrap(), written);
            let wanted: Vec<u64> = (0..2000).step_by(3).collect();
            let found = file.lookup(&wanted).unwrap();
            let reversed: Vec<u64> = wanted.iter().rev().copied().collect();
            assert_eq!(file.lookup(&reversed).unwrap(), found, "unsorted ids");
            let expected: Vec<Entry> = written
                .iter()
                .filter(|e| e.series % 3 == 0 && e.series < 2000)
                .copied()
                .collect();
            assert_eq!(found, expected);
            let mut reader = file.reader();
            for e in &found {
                let id = e.series / 7;
                let run = vec![id as u8; 50 + id as usize % 5];
                assert_eq!(file.read(e).unwrap(), run);
                assert_eq!(reader.read(e).unwrap(), run);
            }
        }
        // Version 2's index: a few bytes an entry instead of 36.
        let v1 = std::fs::metadata(dir.path().join("V1")).unwrap().len();
        let v2 = std::fs::metadata(dir.path().join("V2")).unwrap().len();
        assert!(v1 - v2 > 330 * 30, "v1 {v1} bytes, v2 {v2}");
        // Version 3 compresses the runs together (these repeat one byte).
        let v3 = std::fs::metadata(dir.path().join("V3")).unwrap().len();
        assert!(v3 * 4 < v2, "v2 {v2} bytes, v3 {v3}");
    }

    #[test]
    fn version_3_frames_hold_16_runs_or_32_kib_and_big_runs_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        let mut w = RunWriter::create(&path).unwrap();
        // 100 small runs, then three of 40 KiB, then one of 200 KiB, then small ones again.
        let sizes: Vec<usize> = (0..100)
            .map(|_| 30)
            .chain([40 << 10, 40 << 10, 40 << 10, 200 << 10])
            .chain((0..10).map(|_| 30))
            .collect();
        // Pseudo-random bytes, so zstd cannot shrink big runs into one frame by accident.
        let payload = |i: usize, n: usize| -> Vec<u8> {
            (0..n)
                .map(|k| ((k as u64 ^ i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
                .collect()
        };
        for (i, &n) in sizes.iter().enumerate() {
            w.add(i as u64, i as i64, i as i64 + 1, &payload(i, n))
                .unwrap();
        }
        let file = w.finish().unwrap();
        let entries = file.all_entries().unwrap();
        let frames: Vec<u64> = entries.iter().map(|e| e.offset).collect();
        let mut distinct = frames.clone();
        distinct.dedup();
        // Frames: six of 16 small runs; the last 4 small ones (the 40 KiB run would pass
        // 32 KiB); each large run alone; the last 10 small runs.
        let alone = |i: usize| frames.iter().filter(|&&f| f == frames[i]).count() == 1;
        assert_eq!(frames[0], frames[15]);
        assert_ne!(frames[15], frames[16]);
        assert_eq!(frames[96], frames[99]);
        assert!((100..=103).all(alone), "{frames:?}");
        assert_eq!(frames[104], frames[113]);
        assert_eq!(distinct.len(), 12, "{distinct:?}");
        let mut reader = file.reader();
        for (e, &n) in entries.iter().zip(&sizes) {
            assert_eq!(reader.read(e).unwrap(), payload(e.series as usize, n));
        }
    }

    #[test]
    fn a_damaged_version_3_file_keeps_its_intact_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        let written = write(&path, Version::V3, 0..200);
        let frames: Vec<u64> = {
            let mut f: Vec<u64> = written.iter().map(|e| e.offset).collect();
            f.dedup();
            f
        };
        assert_eq!(frames.len(), 13, "16 runs a frame");
        // Cut into the third frame: the index and footer are gone, frames 1 and 2 intact.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(frames[2] + 10)
            .unwrap();
        let opened = RunFile::open(&path, |_| Some((0, 1))).unwrap();
        assert_eq!(opened.damaged_bytes, 10);
        let ids: Vec<u64> = (0..200).map(|i| i * 7).collect();
        let found = opened.file.lookup(&ids).unwrap();
        assert_eq!(found.len(), 32);
        assert_eq!(opened.file.read(&found[31]).unwrap(), vec![31u8; 51]);
        let again = RunFile::open(&path, |_| Some((0, 1))).unwrap();
        assert_eq!(again.damaged_bytes, 0);
        assert_eq!(again.file.version, Version::V3);
        // A flipped byte inside the second frame is caught on read; the first still reads.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xFF], frames[1] + 20).unwrap();
        let reopened = RunFile::open(&path, |_| Some((0, 1))).unwrap().file;
        let mut reader = reopened.reader();
        assert!(reader.read(&found[16]).is_err());
        assert!(reader.read(&found[20]).is_err());
        assert_eq!(reader.read(&found[3]).unwrap(), vec![3u8; 53]);
        // A frame whose lengths were damaged (not only its bytes) is refused too, once read
        // from disk (the file opened before may answer from the frame it cached).
        f.write_all_at(&[0x7F], frames[0]).unwrap();
        let fresh = RunFile::open(&path, |_| Some((0, 1))).unwrap().file;
        assert!(fresh.read(&found[0]).is_err());
    }

    #[test]
    fn a_damaged_run_file_keeps_its_intact_runs() {
        let dir = tempfile::tempdir().unwrap();
        for version in [Version::V1, Version::V2] {
            let path = dir.path().join(format!("{version:?}"));
            let written = write(&path, version, 0..200);
            // Cut into the 150th run: the index and footer are gone, runs 0..149 intact.
            let cut = written[149].offset
                + (version.header_len(written[149].series, written[149].len) as u64)
                + u64::from(written[149].len)
                + 10;
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let opened = RunFile::open(&path, |_| Some((0, 1))).unwrap();
            assert_eq!(opened.damaged_bytes, 10);
            let ids: Vec<u64> = (0..200).map(|i| i * 7).collect();
            let found = opened.file.lookup(&ids).unwrap();
            assert_eq!(found.len(), 150);
            assert_eq!(opened.file.read(&found[149]).unwrap(), vec![149u8; 54]);
            // The rebuilt file opens cleanly, in its own version.
            let again = RunFile::open(&path, |_| Some((0, 1))).unwrap();
            assert_eq!(again.damaged_bytes, 0);
            assert_eq!(again.file.version, version);
            // A flipped byte inside a run is caught on read.
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            let header = version.header_len(found[7].series, found[7].len) as u64;
            f.write_all_at(&[0xFF], found[7].offset + header + 3)
                .unwrap();
            let reopened = RunFile::open(&path, |_| Some((0, 1))).unwrap().file;
            assert!(reopened.read(&found[7]).is_err());
            assert!(reopened.read(&found[8]).is_ok());
        }
    }

    #[test]
    fn a_version_1_file_laid_out_by_hand_reads() {
        // The layout earlier releases wrote, byte by byte (not through this module's encoder).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        let mut bytes = b"SMRUNS01".to_vec();
        let mut index = Vec::new();
        for (series, payload) in [(3u64, &b"abc"[..]), (9, &b"defgh"[..])] {
            index.extend_from_slice(&series.to_le_bytes());
            index.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            index.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            index.extend_from_slice(&(-5i64).to_le_bytes());
            index.extend_from_slice(&(series as i64).to_le_bytes());
            bytes.extend_from_slice(&series.to_le_bytes());
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
            bytes.extend_from_slice(payload);
        }
        let index_offset = bytes.len() as u64;
        bytes.extend_from_slice(&index);
        bytes.extend_from_slice(&index_offset.to_le_bytes());
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(b"SMINDEX1");
        std::fs::write(&path, &bytes).unwrap();
        let opened = RunFile::open(&path, |_| None).unwrap();
        assert_eq!(opened.damaged_bytes, 0);
        let found = opened.file.lookup(&[3, 4, 9]).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!((found[1].min_t, found[1].max_t), (-5, 9));
        assert_eq!(opened.file.read(&found[0]).unwrap(), b"abc");
        assert_eq!(opened.file.read(&found[1]).unwrap(), b"defgh");
    }

    #[test]
    fn a_footer_claiming_too_many_entries_is_damage_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        write(&path, Version::V2, 0..100);
        // The entry count (footer bytes 8..16) is not under the index checksum.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&(1u64 << 40).to_le_bytes(), len - FOOTER as u64 + 8)
            .unwrap();
        let opened = RunFile::open(&path, |_| Some((0, 1))).unwrap();
        assert_eq!(opened.file.all_entries().unwrap().len(), 100);
        // A flipped bit inside an index page: caught by the checksum, runs scanned again.
        let len = std::fs::metadata(&path).unwrap().len();
        f.write_all_at(&[0x55], len - FOOTER as u64 - 20).unwrap();
        let opened = RunFile::open(&path, |_| Some((0, 1))).unwrap();
        assert_eq!(opened.file.all_entries().unwrap().len(), 100);
    }

    #[test]
    fn a_later_version_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        let bytes = b"SMRUNS04 and whatever a later release writes".to_vec();
        std::fs::write(&path, &bytes).unwrap();
        let error = RunFile::open(&path, |_| None).err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn a_file_without_its_magic_becomes_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs");
        std::fs::write(&path, b"garbage, not a run file at all").unwrap();
        let opened = RunFile::open(&path, |_| Some((0, 1))).unwrap();
        assert_eq!(opened.damaged_bytes, 30 - 8);
        assert!(opened.file.all_entries().unwrap().is_empty());
        assert_eq!(RunFile::open(&path, |_| None).unwrap().damaged_bytes, 0);
    }
}
