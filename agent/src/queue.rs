//! The on-disk queue every reading goes through before it is sent: a reading is on disk
//! (written and synced) before the exporter sees it, and leaves only when the server
//! accepted it (or refused it for good), so neither a server outage nor an agent restart
//! loses one.
//!
//! Layout: numbered segment files (`00000000000000000001.seg`, at most [`SEGMENT_BYTES`]
//! each, the last one appended to) and `cursor` (the segment and offset of the oldest unsent
//! reading, replaced atomically after each send). A record is
//! `length u32 | crc32 u32 | created unix ms u64 | payload`, little-endian, the checksum over
//! the time and the payload: a crash in the middle of a write leaves a torn last record,
//! which opening cuts off; a record whose checksum fails is skipped with the rest of its
//! segment and counted. Sending is at least once: a crash between a send and the cursor's
//! update sends that reading again (the same samples, which the server takes as duplicates).
//!
//! Bounds: past `max_bytes` on disk the oldest segment goes (its unsent readings counted as
//! dropped), and a reading older than `max_age` is dropped unsent when it comes up.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest segment file; the size limit drops data a segment at a time.
const SEGMENT_BYTES: u64 = 4 << 20;
const HEADER_BYTES: u64 = 16;
/// Largest record that can be read back: a length beyond it is corruption.
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// Why readings left the queue unsent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// The queue was at `max_bytes`: the oldest went.
    pub full: u64,
    /// Older than `max_age`.
    pub age: u64,
    /// Failed their checksum (or followed one that did in the same segment).
    pub corrupt: u64,
}

/// A reading read back from the queue.
#[derive(Debug)]
pub struct Record {
    pub created_ms: u64,
    pub payload: Vec<u8>,
    segment: u64,
    next_offset: u64,
}

pub struct Queue {
    dir: PathBuf,
    max_bytes: u64,
    max_age: Duration,
    /// (segment id, bytes), oldest first; the last is written to.
    segments: VecDeque<(u64, u64)>,
    writer: Option<File>,
    cursor: (u64, u64),
    pub dropped: Dropped,
}

/// Makes a created or renamed file's directory entry durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn segment_name(id: u64) -> String {
    format!("{id:020}.seg")
}

impl Queue {
    /// Opens (creating) the queue in `dir`, cutting off a torn last record.
    pub fn open(dir: &Path, max_bytes: u64, max_age: Duration) -> io::Result<Queue> {
        std::fs::create_dir_all(dir)?;
        let mut ids: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".seg")?
                    .parse()
                    .ok()
            })
            .collect();
        ids.sort_unstable();
        let mut segments = VecDeque::new();
        for id in ids {
            let len = std::fs::metadata(dir.join(segment_name(id)))?.len();
            segments.push_back((id, len));
        }
        let mut queue = Queue {
            dir: dir.to_owned(),
            max_bytes,
            max_age,
            segments,
            writer: None,
            cursor: (0, 0),
            dropped: Dropped::default(),
        };
        if let Some(&(last, len)) = queue.segments.back() {
            let good = queue.valid_prefix(last)?;
            if good < len {
                tracing::warn!(
                    segment = last,
                    cut = len - good,
                    "queue: cut off a torn last record"
                );
                OpenOptions::new()
                    .write(true)
                    .open(queue.path(last))?
                    .set_len(good)?;
                queue.segments.back_mut().expect("just read").1 = good;
            }
        }
        queue.cursor = queue.read_cursor();
        let first = queue.segments.front().map(|s| s.0);
        match first {
            Some(first)
                if queue.cursor.0 < first
                    || !queue.segments.iter().any(|s| s.0 == queue.cursor.0) =>
            {
                queue.cursor = (first, 0);
            }
            // Empty: the next segment is numbered after any the cursor names, so a cursor left
            // from before can never point into a new segment.
            None => queue.cursor = (queue.cursor.0.saturating_add(1).max(1), 0),
            _ => {}
        }
        queue.write_cursor()?;
        Ok(queue)
    }

    /// Opens segment `id` for appending, its directory entry made durable.
    fn open_segment(&self, id: u64) -> io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(id))?;
        sync_dir(&self.dir)?;
        Ok(file)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    fn read_cursor(&self) -> (u64, u64) {
        std::fs::read_to_string(self.dir.join("cursor"))
            .ok()
            .and_then(|text| {
                let (seg, off) = text.trim().split_once(' ')?;
                Some((seg.parse().ok()?, off.parse().ok()?))
            })
            .unwrap_or((0, 0))
    }

    fn write_cursor(&self) -> io::Result<()> {
        let tmp = self.dir.join("cursor.tmp");
        let mut f = File::create(&tmp)?;
        writeln!(f, "{} {}", self.cursor.0, self.cursor.1)?;
        f.sync_data()?;
        std::fs::rename(tmp, self.dir.join("cursor"))?;
        sync_dir(&self.dir)
    }

    /// Bytes of the longest run of whole, checksummed records from the segment's start.
    fn valid_prefix(&self, id: u64) -> io::Result<u64> {
        let mut file = io::BufReader::new(File::open(self.path(id))?);
        let mut offset = 0;
        while let Ok(Some((len, _))) = read_at(&mut file, offset, false) {
            offset += HEADER_BYTES + len;
        }
        Ok(offset)
    }

    /// Bytes on disk (sent readings of the oldest segment included until it is deleted).
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// Unsent bytes: everything from the cursor on.
    pub fn pending_bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.0 >= self.cursor.0)
            .map(|s| {
                if s.0 == self.cursor.0 {
                    s.1.saturating_sub(self.cursor.1)
                } else {
                    s.1
                }
            })
            .sum()
    }

    /// Appends a reading and syncs it to disk.
    pub fn push(&mut self, created_ms: u64, payload: &[u8]) -> io::Result<()> {
        let record_len = HEADER_BYTES + payload.len() as u64;
        if record_len > self.max_bytes {
            // It could never fit: dropped (and counted) rather than emptying the queue for it.
            self.dropped.full += 1;
            return Ok(());
        }
        // Only segments other than the one written to can go; once none is left, the one
        // written to is emptied too and the record fits (it is below max_bytes).
        while !self.segments.is_empty() && self.bytes() + record_len > self.max_bytes {
            self.drop_oldest_segment()?;
        }
        let needs_new = match self.segments.back() {
            None => true,
            Some(&(_, len)) => len > 0 && len + record_len > SEGMENT_BYTES,
        };
        if needs_new || self.writer.is_none() {
            let id = match self.segments.back() {
                Some(&(id, _)) if !needs_new => id,
                Some(&(id, _)) => id + 1,
                None => self.cursor.0.max(1),
            };
            if needs_new {
                self.segments.push_back((id, 0));
            }
            self.writer = Some(self.open_segment(id)?);
        }
        let mut record = Vec::with_capacity(record_len as usize);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&created_ms.to_le_bytes());
        crc.update(payload);
        record.extend_from_slice(&crc.finalize().to_le_bytes());
        record.extend_from_slice(&created_ms.to_le_bytes());
        record.extend_from_slice(payload);
        let writer = self.writer.as_mut().expect("opened above");
        writer.write_all(&record)?;
        writer.sync_data()?;
        self.segments.back_mut().expect("a segment").1 += record_len;
        Ok(())
    }

    /// The oldest unsent reading, after dropping those older than `max_age` at `now_ms`.
    pub fn peek(&mut self, now_ms: u64) -> io::Result<Option<Record>> {
        // Readings dropped for age move the cursor; it is written once, not once each.
        let mut expired = false;
        loop {
            let Some(&(seg, len)) = self.segments.iter().find(|s| s.0 == self.cursor.0) else {
                return Ok(None);
            };
            let is_last = self.segments.back().map(|s| s.0) == Some(seg);
            if self.cursor.1 >= len {
                if is_last {
                    if expired {
                        self.write_cursor()?;
                    }
                    return Ok(None);
                }
                self.advance_to_next_segment(seg)?;
                continue;
            }
            let mut file = File::open(self.path(seg))?;
            match read_at(&mut file, self.cursor.1, true) {
                Ok(Some((payload_len, Some((created_ms, payload))))) => {
                    let next_offset = self.cursor.1 + HEADER_BYTES + payload_len;
                    if now_ms.saturating_sub(created_ms) > self.max_age.as_millis() as u64 {
                        self.dropped.age += 1;
                        self.cursor.1 = next_offset;
                        expired = true;
                        continue;
                    }
                    if expired {
                        self.write_cursor()?;
                    }
                    return Ok(Some(Record {
                        created_ms,
                        payload,
                        segment: seg,
                        next_offset,
                    }));
                }
                Err(e) if !is_damage(&e) => return Err(e),
                _ => {
                    // Corrupt from here to the segment's end: count what can be told apart.
                    self.dropped.corrupt += 1;
                    tracing::warn!(
                        segment = seg,
                        offset = self.cursor.1,
                        "queue: corrupt record; rest of segment skipped"
                    );
                    self.cursor.1 = len;
                    if is_last {
                        // New readings must not land after the damage: start a new segment.
                        self.writer = None;
                        self.segments.push_back((seg + 1, 0));
                        self.writer = Some(self.open_segment(seg + 1)?);
                    }
                    self.write_cursor()?;
                }
            }
        }
    }

    /// The reading was delivered (or refused for good): it leaves the queue.
    pub fn ack(&mut self, record: &Record) -> io::Result<()> {
        if record.segment == self.cursor.0 && record.next_offset > self.cursor.1 {
            self.cursor.1 = record.next_offset;
            self.write_cursor()?;
        } else if record.segment < self.cursor.0 {
            // Its segment was dropped for room while it was being sent, and it was counted as
            // dropped then; it was sent (or refused) after all.
            self.dropped.full = self.dropped.full.saturating_sub(1);
        }
        Ok(())
    }

    fn advance_to_next_segment(&mut self, seg: u64) -> io::Result<()> {
        let next = self.segments.iter().find(|s| s.0 > seg).map(|s| s.0);
        if let Some(next) = next {
            self.cursor = (next, 0);
            self.write_cursor()?;
        }
        while self.segments.front().is_some_and(|s| s.0 < self.cursor.0) {
            let (old, _) = self.segments.pop_front().expect("checked");
            std::fs::remove_file(self.path(old))?;
        }
        Ok(())
    }

    /// Deletes the oldest segment to make room, counting its unsent readings as dropped.
    fn drop_oldest_segment(&mut self) -> io::Result<()> {
        let (old, _) = *self.segments.front().expect("checked by the caller");
        if old >= self.cursor.0 {
            let from = if old == self.cursor.0 {
                self.cursor.1
            } else {
                0
            };
            self.dropped.full += self.count_records(old, from);
        }
        if self.segments.len() == 1 {
            // The only segment is the one written to: the next push starts a new one.
            self.writer = None;
            self.segments.pop_front();
            self.segments.push_back((old + 1, 0));
            self.writer = Some(self.open_segment(old + 1)?);
        } else {
            self.segments.pop_front();
        }
        std::fs::remove_file(self.path(old))?;
        if self.cursor.0 <= old {
            self.cursor = (self.segments.front().expect("one at least").0, 0);
            self.write_cursor()?;
        }
        Ok(())
    }

    fn count_records(&self, id: u64, mut offset: u64) -> u64 {
        let Ok(file) = File::open(self.path(id)) else {
            return 0;
        };
        let mut file = io::BufReader::new(file);
        let mut n = 0;
        while let Ok(Some((len, _))) = read_at(&mut file, offset, false) {
            offset += HEADER_BYTES + len;
            n += 1;
        }
        n
    }
}

type Read_ = Option<(u64, Option<(u64, Vec<u8>)>)>;

/// Whether a read failed on what the file holds (a torn or damaged record), not on the
/// reading itself (an I/O error, which is returned for the exporter to try again).
fn is_damage(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
    )
}

fn damaged(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The record at `offset`: its payload length and, when `load`, its time and payload.
/// `Ok(None)` at the end; `Err` for a torn or corrupt record. Without `load` the checksum is
/// still verified (the payload is read and dropped).
fn read_at(file: &mut (impl Read + Seek), offset: u64, load: bool) -> io::Result<Read_> {
    file.seek(SeekFrom::Start(offset))?;
    let mut header = [0u8; HEADER_BYTES as usize];
    match file.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            // Nothing at all is the end; a part of a header is a torn write.
            let mut probe = [0u8; 1];
            file.seek(SeekFrom::Start(offset))?;
            return if file.read(&mut probe)? == 0 {
                Ok(None)
            } else {
                Err(damaged("torn header"))
            };
        }
        Err(e) => return Err(e),
    }
    let len = u64::from(u32::from_le_bytes(
        header[0..4].try_into().expect("4 bytes"),
    ));
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let created_ms = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if len > MAX_RECORD_BYTES {
        return Err(damaged("record length out of range"));
    }
    let mut payload = vec![0u8; len as usize];
    file.read_exact(&mut payload)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[8..16]);
    hasher.update(&payload);
    if hasher.finalize() != crc {
        return Err(damaged("checksum mismatch"));
    }
    Ok(Some((len, load.then_some((created_ms, payload)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn drain(q: &mut Queue, now: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(r) = q.peek(now).unwrap() {
            out.push(r.payload.clone());
            q.ack(&r).unwrap();
        }
        out
    }

    #[test]
    fn readings_come_back_in_order_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        for i in 0..5u8 {
            q.push(1000 + u64::from(i), &[i; 100]).unwrap();
        }
        let first = q.peek(2000).unwrap().unwrap();
        assert_eq!(first.payload, vec![0; 100]);
        q.ack(&first).unwrap();
        drop(q);
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        assert_eq!(
            drain(&mut q, 2000),
            (1..5u8).map(|i| vec![i; 100]).collect::<Vec<_>>()
        );
        assert_eq!(q.pending_bytes(), 0);
        q.push(3000, b"after").unwrap();
        assert_eq!(drain(&mut q, 3000), vec![b"after".to_vec()]);
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        q.push(1, b"one").unwrap();
        q.push(2, b"two").unwrap();
        drop(q);
        let seg = dir.path().join(segment_name(1));
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        q.push(3, b"three").unwrap();
        assert_eq!(drain(&mut q, 10), vec![b"one".to_vec(), b"three".to_vec()]);
        assert_eq!(
            q.dropped,
            Dropped::default(),
            "a torn write is the reading being written, not a drop"
        );
    }

    #[test]
    fn a_flipped_bit_is_caught_by_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        q.push(1, b"good").unwrap();
        q.push(2, b"flipped").unwrap();
        drop(q);
        let seg = dir.path().join(segment_name(1));
        let mut bytes = std::fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&seg, bytes).unwrap();
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        q.push(3, b"new").unwrap();
        assert_eq!(drain(&mut q, 10), vec![b"good".to_vec(), b"new".to_vec()]);
    }

    #[test]
    fn when_full_the_oldest_go_first_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let payload = vec![7u8; 1 << 20];
        // Room for about 9 readings of 1 MiB, in segments of 4.
        let mut q = Queue::open(dir.path(), 9 << 20, DAY).unwrap();
        for i in 0..20u64 {
            q.push(i, &payload).unwrap();
            assert!(
                q.bytes() <= 9 << 20,
                "over the limit after push {i}: {}",
                q.bytes()
            );
        }
        let mut times = Vec::new();
        while let Some(r) = q.peek(100).unwrap() {
            times.push(r.created_ms);
            q.ack(&r).unwrap();
        }
        assert_eq!(
            q.dropped.full + times.len() as u64,
            20,
            "every reading sent or counted"
        );
        assert!(q.dropped.full >= 11, "{:?}", q.dropped);
        assert_eq!(*times.last().unwrap(), 19, "the newest are kept");
        assert!(
            times.windows(2).all(|w| w[0] + 1 == w[1]),
            "in order, no hole: {times:?}"
        );
    }

    #[test]
    fn a_reading_larger_than_the_whole_queue_is_dropped_not_looped_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1000, DAY).unwrap();
        q.push(1, &[0; 500]).unwrap();
        q.push(2, &[0; 2000]).unwrap();
        assert_eq!(q.dropped.full, 1);
        q.push(3, &[0; 600]).unwrap();
        assert_eq!(q.dropped.full, 2, "the first went to make room");
        assert_eq!(drain(&mut q, 10), vec![vec![0; 600]]);
    }

    #[test]
    fn a_reading_sent_while_its_segment_is_dropped_is_not_counted_twice() {
        let dir = tempfile::tempdir().unwrap();
        let payload = vec![7u8; 3 << 20];
        let mut q = Queue::open(dir.path(), 8 << 20, DAY).unwrap();
        q.push(1, &payload).unwrap();
        let in_flight = q.peek(10).unwrap().unwrap();
        q.push(2, &payload).unwrap();
        q.push(3, &payload).unwrap(); // drops segment 1, with the reading being sent
        assert_eq!(q.dropped.full, 1);
        q.ack(&in_flight).unwrap();
        assert_eq!(q.dropped.full, 0, "it was delivered after all");
        assert_eq!(drain(&mut q, 10).len(), 2);
    }

    #[test]
    fn a_stale_cursor_never_points_into_new_segments() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cursor"), "1 40\n").unwrap();
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        q.push(1, b"first").unwrap();
        drop(q);
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        assert_eq!(drain(&mut q, 10), vec![b"first".to_vec()]);
    }

    #[test]
    fn readings_past_the_age_limit_are_dropped_unsent() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 30, Duration::from_secs(60)).unwrap();
        q.push(1_000, b"old").unwrap();
        q.push(100_000, b"fresh").unwrap();
        assert_eq!(drain(&mut q, 120_000), vec![b"fresh".to_vec()]);
        assert_eq!(q.dropped.age, 1);
    }

    #[test]
    fn segments_roll_over_and_sent_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        let payload = vec![1u8; 3 << 20];
        for i in 0..4 {
            q.push(i, &payload).unwrap();
        }
        assert_eq!(q.segments.len(), 4);
        assert_eq!(drain(&mut q, 10).len(), 4);
        assert_eq!(q.segments.len(), 1, "only the segment written to stays");
        let mut q = Queue::open(dir.path(), 1 << 30, DAY).unwrap();
        assert!(
            q.peek(10).unwrap().is_none(),
            "nothing sent twice after a restart"
        );
    }
}
