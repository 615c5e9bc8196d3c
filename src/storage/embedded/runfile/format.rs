//! The versions of the run file format: magics, run headers, index pages and frame headers
//! (version 1 and 2 are still read; version 3 is written).

use super::*;

/// A run's header: (series, payload length, payload checksum).
pub(super) type RunHeader = (u64, u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Version {
    V1,
    V2,
    V3,
}

impl Version {
    pub(super) fn magic(self) -> &'static [u8; 8] {
        match self {
            Version::V1 => b"SMRUNS01",
            Version::V2 => b"SMRUNS02",
            Version::V3 => b"SMRUNS03",
        }
    }

    pub(super) fn footer_magic(self) -> &'static [u8; 8] {
        match self {
            Version::V1 => b"SMINDEX1",
            Version::V2 => b"SMINDEX2",
            Version::V3 => b"SMINDEX3",
        }
    }

    pub(super) fn of_magic(magic: &[u8]) -> Option<Version> {
        [Version::V1, Version::V2, Version::V3]
            .into_iter()
            .find(|v| v.magic() == magic)
    }

    /// The length of a run's header (version 3: inside its frame, no checksum).
    pub(super) fn header_len(self, series: u64, len: u32) -> usize {
        match self {
            Version::V1 => 16,
            Version::V2 => varint_len(series) + varint_len(u64::from(len)) + 4,
            Version::V3 => varint_len(series) + varint_len(u64::from(len)),
        }
    }

    pub(super) fn encode_header(self, (series, len, crc): RunHeader, out: &mut Vec<u8>) {
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
    pub(super) fn decode_header(self, b: &[u8]) -> Option<(RunHeader, usize)> {
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
    pub(super) fn encode_index(self, entries: &[Entry]) -> (Vec<u8>, Vec<u64>) {
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
    /// page in `b`.
    pub(super) fn decode_entries(
        self,
        b: &[u8],
        count: usize,
    ) -> io::Result<(Vec<Entry>, Vec<u64>)> {
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
                    out.push(v1_entry(e));
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
    pub(super) fn run_end(self, e: &Entry) -> u64 {
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
    pub(super) fn decode_frame_header(b: &[u8]) -> Option<(usize, usize, u32, usize)> {
        let mut r = Reader(b);
        let raw = usize::try_from(r.varint().ok()?).ok()?;
        let stored = usize::try_from(r.varint().ok()?).ok()?;
        let used = b.len() - r.0.len();
        let crc = le_u32(b.get(used..used + 4)?);
        (raw <= MAX_RUN as usize && stored <= raw).then_some((raw, stored, crc, used + 4))
    }
}

/// An index entry of version 1: 36 bytes, series, offset, len, min_t, max_t (little endian).
/// Also the layout an index page is cached in.
pub(super) fn v1_entry(e: &[u8]) -> Entry {
    Entry {
        series: le_u64(&e[0..8]),
        offset: le_u64(&e[8..16]),
        len: le_u32(&e[16..20]),
        min_t: le_u64(&e[20..28]) as i64,
        max_t: le_u64(&e[28..36]) as i64,
    }
}
