//! Writing run files.

use super::*;

/// Writes a run file: runs in any order, then the index and footer; durable on `finish`.
pub(in crate::storage::embedded) struct RunWriter {
    path: PathBuf,
    version: Version,
    out: BufWriter<File>,
    offset: u64,
    pub(super) entries: Vec<Entry>,
    header: Vec<u8>,
    /// Version 3: the runs of the frame being filled, and how many.
    frame: Vec<u8>,
    frame_runs: usize,
    /// A frame is closed at this many runs ([`FRAME_RUNS`] unless
    /// [`RunWriter::with_runs_per_frame`]).
    max_frame_runs: usize,
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
    pub(super) fn create_version(path: &Path, version: Version) -> io::Result<RunWriter> {
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
            max_frame_runs: FRAME_RUNS,
        })
    }

    /// This writer closing frames at `runs` runs (or [`FRAME_BYTES`]) instead of
    /// [`FRAME_RUNS`]: for runs read a few at a time and rarely, where the bytes count for
    /// more than a larger frame's decompression.
    pub fn with_runs_per_frame(mut self, runs: usize) -> RunWriter {
        self.max_frame_runs = runs.max(1);
        self
    }

    /// Room for `more` runs' index entries (a writer that knows how many avoids the slack
    /// of a growing list).
    pub fn reserve(&mut self, more: usize) {
        self.entries.reserve_exact(more);
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
            if self.frame_runs >= self.max_frame_runs || self.frame.len() >= FRAME_BYTES {
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
    pub(super) fn write_frame(&mut self) -> io::Result<()> {
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
pub(super) fn write_index(
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
