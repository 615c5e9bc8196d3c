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
//!          up to 16 runs (a writer may ask for more) or 32 KiB (one run larger than
//!          that is a frame of its own)
//! index  : pages as version 2, an entry giving its frame's offset instead of its own
//!          (varint series | varint offset | zigzag min_t | varint max_t - min_t for the first
//!          of a page; varint series delta | zigzag offset delta | zigzag min_t delta | varint
//!          max_t - min_t for the others)
//! footer : as version 2, ending "SMINDEX3"
//! ```
//!
//! A read decompresses its frame and walks the frame's run headers to its series;
//! [`RunReader`] keeps the last frame, so reading series in file order
//! ([`RunFile::lookup_in_file_order`]) decompresses each frame once. Runs may be written in any
//! series order (blocks write theirs by labels); the index is sorted by series either way.
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

mod format;
mod read;
mod recover;
mod write;

use super::codec::{self, put_varint, unzigzag, zigzag, Reader};
use super::frames;
use crate::model::TimestampMs;
use crate::varint::varint_len;
use format::Version;
pub(super) use read::RunFile;
use read::{frame_runs, runs_in};
use recover::scan_runs;
use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use write::write_index;
pub(super) use write::RunWriter;

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

/// Reads the first and last sample (or bucket) time of a run's payload.
pub(super) type TimeRange = fn(&[u8]) -> Option<(TimestampMs, TimestampMs)>;

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
