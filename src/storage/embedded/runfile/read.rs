//! Opening and reading run files.

use super::*;

/// A run file open for reading.
pub(in crate::storage::embedded) struct RunFile {
    /// This file's key in the frame cache.
    id: u64,
    path: PathBuf,
    file: File,
    pub(super) version: Version,
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
pub(in crate::storage::embedded) struct Opened {
    pub file: RunFile,
    /// Bytes that could not be recovered (0 when the file was intact).
    pub damaged_bytes: u64,
}

/// An index read whole: its entries and page positions.
pub(super) struct Index {
    offset: u64,
    len: u64,
    entries: Vec<Entry>,
    pages: Vec<u64>,
}

impl RunFile {
    pub(super) fn new(
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

    /// Index page `p`, decoded. Kept in the process's frame cache (keyed by the page's offset
    /// in the file, past every frame's) as fixed-width records: a query of a block's series
    /// looks up a page for each few series, in a few passes, and a `pread` each was a tenth
    /// of a regex's time, decoding the page's varints each time another tenth.
    fn read_page(&self, p: usize) -> io::Result<Page> {
        let start = self.pages[p].1;
        let end = self.pages.get(p + 1).map_or(self.index_len, |next| next.1);
        let offset = self.index_offset + start;
        let cache = frames::shared();
        if let Some(records) = cache.get(self.id, offset) {
            return Ok(Page(records));
        }
        let mut buf = vec![0u8; end.saturating_sub(start) as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        let count = (self.entries - (p * PAGE) as u64).min(PAGE as u64) as usize;
        let (entries, _) = self.version.decode_entries(&buf, count)?;
        let page = Page::of(&entries);
        cache.insert(self.id, offset, page.0.clone());
        Ok(page)
    }

    /// Every index entry, sorted by series.
    pub fn all_entries(&self) -> io::Result<Vec<Entry>> {
        let mut buf = vec![0u8; self.index_len as usize];
        self.file.read_exact_at(&mut buf, self.index_offset)?;
        Ok(self.version.decode_entries(&buf, self.entries as usize)?.0)
    }

    /// Index entries of `ids` (sorted ascending), each index page looked up once (decoded
    /// whole and kept in the frame cache on its first read).
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
            let page = self.read_page(p - 1)?;
            out.extend(here.iter().filter_map(|&id| page.find(id)));
            ids = rest;
        }
        Ok(out)
    }

    /// [`RunFile::lookup`] in the order the runs lie in the file, for reading many: runs of
    /// one frame come together, so a [`RunReader`] decompresses each frame once however the
    /// writer ordered series into frames.
    pub fn lookup_in_file_order(&self, ids: &[u64]) -> io::Result<Vec<Entry>> {
        let mut entries = self.lookup(ids)?;
        entries.sort_by_key(|e| e.offset);
        Ok(entries)
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

    pub(super) fn damaged_run(&self, entry: &Entry) -> io::Error {
        damaged(format!(
            "{}: damaged run of series {} at offset {}",
            self.path.display(),
            entry.series,
            entry.offset
        ))
    }

    /// The runs of the version 3 frame at `offset`, checksum verified and decompressed.
    pub(super) fn read_frame(&self, offset: u64) -> io::Result<Vec<u8>> {
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
    pub(super) fn read_run(&self, entry: &Entry) -> io::Result<Vec<u8>> {
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
pub(super) fn frame_runs(lengths: &[u8], crc: u32, raw: usize, stored: Vec<u8>) -> Option<Vec<u8>> {
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

/// An index page's entries as fixed-width records, sorted by series: version 1's index
/// entries (series, offset, len, min_t, max_t; little endian), found by binary search with
/// nothing decoded but what is found.
struct Page(Arc<[u8]>);

impl Page {
    const RECORD: usize = 36;

    fn of(entries: &[Entry]) -> Page {
        Page(Version::V1.encode_index(entries).0.into())
    }

    fn find(&self, series: u64) -> Option<Entry> {
        let count = self.0.len() / Page::RECORD;
        let record = |i: usize| &self.0[i * Page::RECORD..(i + 1) * Page::RECORD];
        let (mut lo, mut hi) = (0, count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match le_u64(&record(mid)[0..8]).cmp(&series) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(format::v1_entry(record(mid))),
            }
        }
        None
    }
}

/// The runs of a frame in order: (series, payload); `None` at the first that does not fit,
/// and nothing after it.
pub(super) fn runs_in(mut runs: &[u8]) -> impl Iterator<Item = Option<(u64, &[u8])>> {
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
pub(in crate::storage::embedded) struct RunReader<'a> {
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

pub(super) fn read_index(file: &File, version: Version, len: u64) -> io::Result<Index> {
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
    let (entries, pages) = version.decode_entries(&index, entries)?;
    Ok(Index {
        offset: index_offset,
        len: index_len,
        entries,
        pages,
    })
}
