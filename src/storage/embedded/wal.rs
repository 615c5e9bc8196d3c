//! The write-ahead log: append-only segment files of checksummed records. A write is
//! acknowledged only after its records are written and (by policy) fsynced; on open the log is
//! replayed, and a torn or damaged tail is cut off at the last intact record and reported.
//!
//! With fsync before acknowledgement, the current segment is kept zero-filled about a
//! megabyte past its last record, and records overwrite the zeros: an fdatasync then writes
//! the data and flushes the disk, without a synchronous write of the file's inode for the
//! size that changed at every append (about a third less time per fsync on ext4). Replay
//! takes zeros after the last record for the end of the log, not for damage; a rotated
//! segment is cut to its records.
//!
//! Record framing: `len: u32 LE | crc32(payload): u32 LE | payload`. The frames of one
//! append (and of a checkpoint, about a megabyte at a time) are written compressed, as one
//! frame whose payload is `7 | raw length (varint) | zstd frame of the frames` (Prometheus
//! compresses its log too); frames that compression would not shrink are written as they are,
//! and logs written before compression replay unchanged.

use super::codec;
use crate::model::{Label, Labels, MetricMetadata, MetricType, PackedLabels, Sample};
use crate::varint;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Largest record accepted on replay; anything bigger is damage.
const MAX_RECORD_BYTES: u32 = 256 << 20;
/// Records are written no larger than this: bigger ones are split (samples, exemplars and
/// flush marks by entries), far below what replay accepts, so no request's shape can make a
/// record that replay would take for damage.
const MAX_WRITTEN_PAYLOAD: usize = 64 << 20;
/// A new segment is started past this size.
const SEGMENT_BYTES: u64 = 128 << 20;
/// The current segment is zero-filled this far past its end, in steps of this size.
const PADDING_BYTES: u64 = 1 << 20;
/// Appends up to this size that need no new segment and no zero fill are written on the
/// writer's own thread (see [`Wal::append_may_block`]).
const QUICK_APPEND_BYTES: u64 = 256 << 10;
/// Payload kind of a frame holding other frames, compressed.
const COMPRESSED: u8 = 7;
/// Frames are compressed together up to this many bytes (one frame larger goes alone).
const BATCH_RAW_BYTES: usize = 1 << 20;
/// Frames shorter than this are written as they are.
const MIN_COMPRESSED_BYTES: usize = 256;
/// zstd's fastest levels compress at several hundred megabytes a second on one core.
const ZSTD_LEVEL: i32 = 1;

/// Compresses runs of frames into frames of kind [`COMPRESSED`].
struct Packer {
    compressor: zstd::bulk::Compressor<'static>,
}

impl Packer {
    fn new() -> io::Result<Packer> {
        Ok(Packer {
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
        })
    }

    /// Appends `frames` (whole frames, one after another) to `out`, compressed in batches of
    /// at most [`BATCH_RAW_BYTES`] (cut between frames); a batch compression does not shrink
    /// is appended as it is.
    fn pack(&mut self, frames: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let mut rest = frames;
        while !rest.is_empty() {
            let mut cut = 0;
            while cut + 8 <= rest.len() {
                let len = u32::from_le_bytes(rest[cut..cut + 4].try_into().unwrap_or([0; 4]));
                let next = cut + 8 + len as usize;
                if cut > 0 && next > BATCH_RAW_BYTES {
                    break;
                }
                cut = next.min(rest.len());
            }
            let cut = cut.max(1).min(rest.len());
            let (batch, tail) = rest.split_at(cut);
            rest = tail;
            if batch.len() < MIN_COMPRESSED_BYTES {
                out.extend_from_slice(batch);
                continue;
            }
            let compressed = self.compressor.compress(batch)?;
            if compressed.len() + 16 >= batch.len() {
                out.extend_from_slice(batch);
                continue;
            }
            let mut payload = Vec::with_capacity(compressed.len() + 11);
            payload.push(COMPRESSED);
            varint::put_varint(&mut payload, batch.len() as u64);
            payload.extend_from_slice(&compressed);
            frame_payload(out, &payload);
        }
        Ok(())
    }
}

/// Records framed and compressed as an append writes them, ready to be written by
/// [`Wal::append_packed`] (built with no lock held).
pub struct Packed {
    bytes: Vec<u8>,
    /// The earliest and latest sample times among the records.
    span: Span,
}

impl Packed {
    fn of(records: &[Record], packer: &mut Packer) -> io::Result<Packed> {
        let mut frames = Vec::new();
        let mut payloads = Vec::new();
        for record in records {
            payloads.clear();
            record.encode_parts(MAX_WRITTEN_PAYLOAD, &mut payloads);
            for payload in &payloads {
                frame_payload(&mut frames, payload);
            }
        }
        let mut bytes = Vec::with_capacity(frames.len() / 2);
        packer.pack(&frames, &mut bytes)?;
        Ok(Packed {
            bytes,
            span: Span::of(records),
        })
    }
}

/// Compressors for writers packing their records side by side: one per writer at a time,
/// kept for the next (as many as writers ever packed at once).
#[derive(Default)]
pub struct Packers(Mutex<Vec<Packer>>);

impl Packers {
    pub fn pack(&self, records: &[Record]) -> io::Result<Packed> {
        let taken = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut packer = match taken {
            Some(packer) => packer,
            None => Packer::new()?,
        };
        let packed = Packed::of(records, &mut packer);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(packer);
        packed
    }
}

/// The records of one frame's payload: itself, or for a [`COMPRESSED`] frame, every frame it
/// holds; `None` if any of them does not decode (the frame is then damage, as a bad checksum).
fn unpack(payload: &[u8], decompressor: &mut zstd::bulk::Decompressor) -> Option<Vec<Record>> {
    if payload.first() != Some(&COMPRESSED) {
        return Record::decode(payload).map(|r| vec![r]);
    }
    let mut d = Decoder(&payload[1..]);
    let raw_len = d.varint()?;
    if raw_len > u64::from(MAX_RECORD_BYTES) {
        return None;
    }
    let raw = decompressor.decompress(d.0, raw_len as usize).ok()?;
    if raw.len() as u64 != raw_len {
        return None;
    }
    let mut records = Vec::new();
    let mut rest = &raw[..];
    while !rest.is_empty() {
        let header = rest.get(..8)?;
        let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
        let inner = rest.get(8..8 + len)?;
        // Frames inside a compressed frame are never compressed themselves.
        if crc32fast::hash(inner) != crc || inner.first() == Some(&COMPRESSED) {
            return None;
        }
        records.push(Record::decode(inner)?);
        rest = &rest[8 + len..];
    }
    Some(records)
}

/// What the log holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A new series of a tenant and the id it gets.
    Series {
        tenant: String,
        id: u64,
        labels: Labels,
    },
    /// Samples by series id.
    Samples { samples: Vec<(u64, i64, f64)> },
    Metadata {
        tenant: String,
        metadata: MetricMetadata,
    },
    /// Exemplars by series id.
    Exemplars {
        exemplars: Vec<(u64, i64, f64, Labels)>,
    },
    /// Per series, the latest sample time already in blocks (checkpoints): replay skips the
    /// log's samples up to it even after retention deleted those blocks.
    Flushed { marks: Vec<(u64, i64)> },
    /// One series' samples, ascending, in the blocks' sample encoding (checkpoints written
    /// by a compaction of the log: about a byte a sample where sample records take two to
    /// three).
    SeriesSamples { id: u64, samples: Vec<Sample> },
}

/// Integers below this are exact in an f64.
const MAX_EXACT: f64 = 4_503_599_627_370_496.0;
/// Scales of the decimal places a logged value may have (exact in an f64).
const POW10: [f64; 7] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];

struct Encoder(Vec<u8>);

impl Encoder {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    fn varint(&mut self, v: u64) {
        varint::put_varint(&mut self.0, v);
    }
    fn signed(&mut self, v: i64) {
        self.varint(varint::zigzag(v));
    }
    /// A value: small integers (what counters and many gauges hold) as a varint (`2 x
    /// zigzag`), decimals of at most six places that come back bit for bit (what text
    /// exposition gives, `123.45`) as `zigzag(mantissa) << 4 | places << 1 | 1`, anything else
    /// as its 8 bytes after a 1.
    fn value(&mut self, v: f64) {
        if v.fract() == 0.0 && v.abs() < MAX_EXACT && !(v == 0.0 && v.is_sign_negative()) {
            let m = v as i64;
            self.varint(((m << 1) ^ (m >> 63)) as u64 * 2);
            return;
        }
        if v.is_finite() {
            for (places, &scale) in POW10.iter().enumerate().skip(1) {
                let scaled = (v * scale).round();
                if scaled.abs() >= MAX_EXACT {
                    break;
                }
                let m = scaled as i64;
                if ((m as f64) / scale).to_bits() == v.to_bits() {
                    self.varint(varint::zigzag(m) << 4 | (places as u64) << 1 | 1);
                    return;
                }
            }
        }
        self.varint(1);
        self.0.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn labels<'a>(&mut self, count: usize, pairs: impl Iterator<Item = (&'a str, &'a str)>) {
        self.u64(count as u64);
        for (name, value) in pairs {
            self.str(name);
            self.str(value);
        }
    }
}

struct Decoder<'a>(&'a [u8]);

impl Decoder<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }
    fn f64(&mut self) -> Option<f64> {
        self.u64().map(f64::from_bits)
    }
    fn varint(&mut self) -> Option<u64> {
        varint::take_varint(&mut self.0)
    }
    fn signed(&mut self) -> Option<i64> {
        self.varint().map(varint::unzigzag)
    }
    fn value(&mut self) -> Option<f64> {
        match self.varint()? {
            1 => self.f64(),
            h if h % 2 == 0 => {
                let z = h / 2;
                Some((((z >> 1) as i64) ^ -((z & 1) as i64)) as f64)
            }
            h => {
                let scale = *POW10.get(((h >> 1) & 7) as usize).filter(|&&s| s > 1.0)?;
                let z = h >> 4;
                let m = ((z >> 1) as i64) ^ -((z & 1) as i64);
                Some((m as f64) / scale)
            }
        }
    }
    fn str(&mut self) -> Option<String> {
        let n = usize::try_from(self.u64()?).ok()?;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn labels(&mut self) -> Option<Labels> {
        let n = self.u64()?;
        let mut labels = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            labels.push(Label::new(self.str()?, self.str()?));
        }
        Some(Labels::from_trusted(labels))
    }
}

impl Record {
    /// The payloads of this record as written: one, or, past `max` bytes, the payloads of
    /// records of halves of its entries, each at most `max` bytes (a single entry past `max`
    /// stays whole: no request can make one near the replay limit).
    fn encode_parts(&self, max: usize, out: &mut Vec<Vec<u8>>) {
        let payload = self.encode();
        if payload.len() <= max {
            out.push(payload);
            return;
        }
        fn halves<T: Clone>(entries: &[T], record: fn(Vec<T>) -> Record) -> [Record; 2] {
            let (a, b) = entries.split_at(entries.len() / 2);
            [record(a.to_vec()), record(b.to_vec())]
        }
        let halves = match self {
            Record::Samples { samples } if samples.len() > 1 => {
                halves(samples, |samples| Record::Samples { samples })
            }
            Record::Exemplars { exemplars } if exemplars.len() > 1 => {
                halves(exemplars, |exemplars| Record::Exemplars { exemplars })
            }
            Record::Flushed { marks } if marks.len() > 1 => {
                halves(marks, |marks| Record::Flushed { marks })
            }
            Record::SeriesSamples { id, samples } if samples.len() > 1 => {
                let (a, b) = samples.split_at(samples.len() / 2);
                [a, b].map(|samples| Record::SeriesSamples {
                    id: *id,
                    samples: samples.to_vec(),
                })
            }
            _ => {
                out.push(payload);
                return;
            }
        };
        drop(payload);
        for half in &halves {
            half.encode_parts(max, out);
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder(Vec::new());
        match self {
            Record::Series { tenant, id, labels } => {
                e.u8(1);
                e.str(tenant);
                e.u64(*id);
                e.labels(labels.len(), labels.pairs());
            }
            Record::Samples { samples } => {
                // Ids and times as varint deltas from the previous sample: a request's
                // samples share times and have neighbouring ids, so most take 2 bytes plus
                // the value.
                e.u8(5);
                e.varint(samples.len() as u64);
                let (mut id0, mut t0) = (0u64, 0i64);
                for &(id, t, v) in samples {
                    e.signed(id.wrapping_sub(id0) as i64);
                    e.signed(t.wrapping_sub(t0));
                    e.value(v);
                    (id0, t0) = (id, t);
                }
            }
            Record::Metadata { tenant, metadata } => {
                e.u8(3);
                e.str(tenant);
                e.str(&metadata.metric_family_name);
                e.str(metadata.metric_type.as_str());
                e.str(&metadata.help);
                e.str(&metadata.unit);
            }
            Record::Exemplars { exemplars } => {
                e.u8(4);
                e.u64(exemplars.len() as u64);
                for (id, t, v, labels) in exemplars {
                    e.u64(*id);
                    e.i64(*t);
                    e.f64(*v);
                    e.labels(labels.len(), labels.pairs());
                }
            }
            Record::Flushed { marks } => {
                e.u8(6);
                e.varint(marks.len() as u64);
                for &(id, t) in marks {
                    e.varint(id);
                    e.signed(t);
                }
            }
            Record::SeriesSamples { id, samples } => {
                e.u8(8);
                e.varint(*id);
                // Compressed with the other records of its batch.
                let bytes = codec::encode_uncompressed(samples);
                e.varint(bytes.len() as u64);
                e.0.extend_from_slice(&bytes);
            }
        }
        e.0
    }

    fn decode(payload: &[u8]) -> Option<Record> {
        let mut d = Decoder(payload);
        let record = match d.u8()? {
            1 => Record::Series {
                tenant: d.str()?,
                id: d.u64()?,
                labels: d.labels()?,
            },
            2 => {
                let n = d.u64()?;
                let mut samples = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    samples.push((d.u64()?, d.i64()?, d.f64()?));
                }
                Record::Samples { samples }
            }
            5 => {
                let n = d.varint()?;
                let mut samples = Vec::with_capacity(n.min(1 << 20) as usize);
                let (mut id, mut t) = (0u64, 0i64);
                for _ in 0..n {
                    id = id.wrapping_add(d.signed()? as u64);
                    t = t.wrapping_add(d.signed()?);
                    samples.push((id, t, d.value()?));
                }
                Record::Samples { samples }
            }
            3 => Record::Metadata {
                tenant: d.str()?,
                metadata: MetricMetadata {
                    metric_family_name: d.str()?,
                    metric_type: MetricType::parse(&d.str()?),
                    help: d.str()?,
                    unit: d.str()?,
                },
            },
            4 => {
                let n = d.u64()?;
                let mut exemplars = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    exemplars.push((d.u64()?, d.i64()?, d.f64()?, d.labels()?));
                }
                Record::Exemplars { exemplars }
            }
            6 => {
                let n = d.varint()?;
                let mut marks = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    marks.push((d.varint()?, d.signed()?));
                }
                Record::Flushed { marks }
            }
            8 => {
                let id = d.varint()?;
                let n = usize::try_from(d.varint()?).ok()?;
                let samples = codec::decode(d.take(n)?).ok()?;
                Record::SeriesSamples { id, samples }
            }
            _ => return None,
        };
        d.0.is_empty().then_some(record)
    }
}

/// When appends reach the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync before every acknowledgement: nothing acknowledged is lost, even on power loss.
    #[default]
    Always,
    /// Leave flushing to the operating system: survives a process crash, not a power loss.
    Never,
}

/// What replay found.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub records: usize,
    /// Bytes cut off a damaged or torn tail, and where.
    pub truncated: Option<(PathBuf, u64)>,
}

/// Where a write ended in the log: what must be durable before it is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    segment: u64,
    offset: u64,
}

/// Group commit: writers append under the log's lock and ask for an fsync up to where
/// their write ended; one thread (the flusher) fsyncs the log while they go on (applying
/// their samples to the head), and each fsync makes every write before it durable, so
/// concurrent requests share fsyncs instead of queueing one each, and a request's fsync
/// overlaps its own work. Writers then wait (blocking or async) until their position is
/// durable; an async writer that finds no fsync running runs it itself.
#[derive(Debug)]
pub struct Syncer {
    state: Mutex<SyncState>,
    /// Wakes the flusher: a writer asked for more, or the log closed.
    work: Condvar,
    /// Wakes blocked waiters: more is durable, or the log broke.
    done: Condvar,
    /// Wakes async waiters, as `done`.
    done_async: tokio::sync::Notify,
    /// The end of the last write and the segment file it went to.
    current: Mutex<(Position, Arc<File>)>,
    /// Set when an fsync failed: what was written may not be on disk, so the log refuses
    /// writes until a restart replays what is.
    broken: AtomicBool,
    /// Whether writes are fsynced at all (`--embedded-fsync always`): if not, there is no
    /// flusher and waits return at once (the operating system writes the log back).
    fsyncs: bool,
}

#[derive(Debug, Default)]
struct SyncState {
    /// The furthest position a writer asked to be durable.
    asked: Position,
    /// Everything up to here is durable.
    synced: Position,
    /// Why the log broke (an fsync failed).
    failure: Option<String>,
    /// The log closed: the flusher stops.
    stop: bool,
    /// An fsync is running (the flusher's or a writer's).
    in_flight: bool,
    /// The last fsync took longer than [`QUICK_FSYNC`].
    slow: bool,
}

/// A writer runs an fsync on its runtime thread as it is while the last one took at most
/// this long; after a slower one it hands the thread's other work to another thread first.
const QUICK_FSYNC: std::time::Duration = std::time::Duration::from_millis(2);

impl Syncer {
    fn new(end: Position, file: Arc<File>, fsync: FsyncPolicy) -> Syncer {
        Syncer {
            state: Mutex::new(SyncState {
                asked: end,
                synced: end,
                ..SyncState::default()
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            done_async: tokio::sync::Notify::new(),
            current: Mutex::new((end, file)),
            broken: AtomicBool::new(false),
            fsyncs: fsync == FsyncPolicy::Always,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the flusher thread (for `--embedded-fsync always`); it stops when the log
    /// closes.
    fn start(self: &Arc<Syncer>) -> io::Result<()> {
        if !self.fsyncs {
            return Ok(());
        }
        let syncer = self.clone();
        std::thread::Builder::new()
            .name("secumon-wal-fsync".into())
            .spawn(move || syncer.flush_loop())
            .map(|_| ())
    }

    fn flush_loop(&self) {
        let mut state = self.state();
        loop {
            if state.stop {
                return;
            }
            if state.failure.is_some() || state.asked <= state.synced || state.in_flight {
                state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            state = self.fsync(state, false);
        }
    }

    /// Fsyncs the log up to its last write, `state` let go meanwhile; the caller saw no
    /// fsync running. Wakes every waiter, and the flusher if more was asked for meanwhile.
    /// `on_runtime`: the caller is a task on a multi-threaded runtime. While fsyncs are
    /// quick (the last took at most [`QUICK_FSYNC`]) it runs as it is: handing the thread's
    /// other work to another thread (`block_in_place`) costs a thread wake-up, 0.96x
    /// samples/s at 2 connections. After a slow one (a journal commit, a slow or failing
    /// disk) it is handed off, so a runtime thread is held by at most one slow fsync.
    fn fsync<'s>(
        &'s self,
        mut state: std::sync::MutexGuard<'s, SyncState>,
        on_runtime: bool,
    ) -> std::sync::MutexGuard<'s, SyncState> {
        state.in_flight = true;
        let hand_off = on_runtime && state.slow;
        drop(state);
        let (end, file) = {
            let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            (current.0, current.1.clone())
        };
        let began = std::time::Instant::now();
        let result = if hand_off {
            tokio::task::block_in_place(|| file.sync_data())
        } else {
            file.sync_data()
        };
        let mut state = self.state();
        state.slow = began.elapsed() > QUICK_FSYNC;
        match result {
            Ok(()) if !self.broken.load(Ordering::SeqCst) => state.synced = state.synced.max(end),
            Ok(()) => {}
            // What was written may not be on disk, and a second fsync would wrongly
            // report success: the log refuses writes until a restart.
            Err(e) => {
                self.broken.store(true, Ordering::SeqCst);
                state.failure = Some(format!("fsync of the write-ahead log failed: {e}"));
            }
        }
        self.finished(state)
    }

    /// Ends an fsync (its outcome in `state`): none runs now; wakes the flusher if more was
    /// asked for meanwhile, and every waiter.
    fn finished<'s>(
        &'s self,
        mut state: std::sync::MutexGuard<'s, SyncState>,
    ) -> std::sync::MutexGuard<'s, SyncState> {
        state.in_flight = false;
        if state.asked > state.synced {
            self.work.notify_one();
        }
        self.wake_waiters();
        state
    }

    /// Wakes every waiter, blocked or async, to look at the state again.
    fn wake_waiters(&self) {
        self.done.notify_all();
        self.done_async.notify_waiters();
    }

    /// Asks the flusher to make everything up to `to` durable, without waiting.
    pub fn request(&self, to: Position) {
        if !self.fsyncs {
            return;
        }
        let mut state = self.state();
        if to > state.asked {
            state.asked = to;
            if to > state.synced {
                self.work.notify_one();
            }
        }
    }

    /// `Ok(true)` once `to` is durable; `Err` once the log broke before it was.
    fn reached(&self, state: &SyncState, to: Position) -> io::Result<bool> {
        if state.synced >= to || !self.fsyncs {
            return Ok(true);
        }
        match &state.failure {
            Some(failure) => Err(io::Error::other(format!("{failure}; restart to recover"))),
            None => Ok(false),
        }
    }

    /// Returns once everything up to `to` is durable, blocking the thread.
    #[cfg(test)]
    pub fn sync_to(&self, to: Position) -> io::Result<()> {
        self.request(to);
        let mut state = self.state();
        while !self.reached(&state, to)? {
            state = self.done.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    /// [`Syncer::sync_to`] for async callers: the thread runs other tasks while an fsync
    /// runs. If none runs (the flusher, woken when the write asked, has not started yet:
    /// on a busy machine it waits for a core), the caller fsyncs itself rather than wait
    /// for the flusher to be scheduled and then for its own wake-up; one fsync runs at a
    /// time, so this holds at most one runtime thread, and only where the runtime has
    /// another for the rest of the work.
    pub async fn synced_to_async(&self, to: Position) -> io::Result<()> {
        if !self.fsyncs {
            return Ok(());
        }
        self.request(to);
        loop {
            let notified = self.done_async.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake-up between the two is not lost.
            notified.as_mut().enable();
            {
                let state = self.state();
                if self.reached(&state, to)? {
                    return Ok(());
                }
                if !state.in_flight && !state.stop && spare_runtime_thread() {
                    drop(self.fsync(state, true));
                    continue;
                }
            }
            notified.await;
        }
    }

    /// Runs `sync` (an fsync of the log's file outside the syncer: the log's rotation) as
    /// the only one running: Linux reports a failed write-back to one fsync of a file only,
    /// so of two at once one could report success for data not on disk.
    fn alone<T>(&self, sync: impl FnOnce() -> T) -> T {
        let mut state = self.state();
        while state.in_flight {
            state = self.done.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.in_flight = true;
        drop(state);
        let result = sync();
        drop(self.finished(self.state()));
        result
    }

    fn written(&self, end: Position, file: &Arc<File>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = (end, file.clone());
    }

    fn synced_to(&self, end: Position) {
        let mut state = self.state();
        state.synced = state.synced.max(end);
        self.wake_waiters();
    }

    /// Marks the log broken (a failed fsync elsewhere) and wakes every waiter.
    fn break_with(&self, failure: String) {
        self.broken.store(true, Ordering::SeqCst);
        self.state().failure.get_or_insert(failure);
        self.wake_waiters();
    }

    /// Stops the flusher (the log closed); a writer still waiting for a position not yet
    /// durable gets an error rather than waiting forever.
    fn stop(&self) {
        let mut state = self.state();
        state.stop = true;
        state.failure.get_or_insert_with(|| {
            "the write-ahead log closed before the write was durable".into()
        });
        drop(state);
        self.work.notify_all();
        self.wake_waiters();
    }
}

/// Whether the calling task runs on a runtime with more than one thread: a writer may then
/// hold its thread for an fsync while the others go on.
fn spare_runtime_thread() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|h| h.metrics().num_workers() > 1)
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.syncer.stop();
    }
}

pub struct Wal {
    dir: PathBuf,
    file: Arc<File>,
    syncer: Arc<Syncer>,
    segment: u64,
    /// Each segment's sample times and size: a segment whose samples are all flushed to
    /// blocks can go once a checkpoint holds its series; one whose samples are in part, once
    /// the checkpoint holds the rest too. (Sizes kept here, not asked of the file system
    /// under the log's lock.)
    spans: BTreeMap<u64, Segment>,
    /// Bytes of intact records in the current segment.
    size: u64,
    /// Bytes of the current segment's file: `size` and the zeros past it.
    allocated: u64,
    fsync: FsyncPolicy,
    /// Set when a failed write could not be undone: the log refuses writes until a restart
    /// (replay then cuts the torn tail).
    broken: bool,
    /// Bytes of records appended since the log was opened.
    appended: u64,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.wal"))
}

/// Bytes of the files directly in `dir` (0 when it cannot be read).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn checkpoint_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("checkpoint.{n:08}"))
}

fn numbered(dir: &Path, parse: impl Fn(&str) -> Option<u64>) -> io::Result<Vec<u64>> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| parse(e.file_name().to_str()?))
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    numbered(dir, |name| name.strip_suffix(".wal")?.parse().ok())
}

fn checkpoints(dir: &Path) -> io::Result<Vec<u64>> {
    numbered(dir, |name| name.strip_prefix("checkpoint.")?.parse().ok())
}

/// The earliest and latest sample times of a segment or of records (`EMPTY` when they hold
/// no sample).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub min_t: i64,
    pub max_t: i64,
}

impl Span {
    pub const EMPTY: Span = Span {
        min_t: i64::MAX,
        max_t: i64::MIN,
    };

    fn of(records: &[Record]) -> Span {
        let mut span = Span::EMPTY;
        let mut add = |t: i64| {
            span.min_t = span.min_t.min(t);
            span.max_t = span.max_t.max(t);
        };
        for record in records {
            match record {
                Record::Samples { samples } => samples.iter().for_each(|s| add(s.1)),
                Record::SeriesSamples { samples, .. } => samples.iter().for_each(|s| add(s.t)),
                _ => {}
            }
        }
        span
    }

    fn join(self, other: Span) -> Span {
        Span {
            min_t: self.min_t.min(other.min_t),
            max_t: self.max_t.max(other.max_t),
        }
    }
}

/// What the log knows of one of its segments.
#[derive(Debug, Clone, Copy)]
struct Segment {
    span: Span,
    /// Bytes of its intact records.
    bytes: u64,
}

impl Segment {
    const EMPTY: Segment = Segment {
        span: Span::EMPTY,
        bytes: 0,
    };
}

/// What a flush with a checkpoint at segment `before` lets go of the log (see
/// [`Wal::truncation`]).
#[derive(Debug, Default, PartialEq)]
pub struct Truncation {
    /// Segments all of whose samples are older than the cutoff.
    pub delete: Vec<u64>,
    /// Segments some of whose samples are older than the cutoff and some not, before any
    /// segment all of whose samples are as new: the checkpoint carries their newer samples,
    /// in their order, and they go too.
    pub carry: Vec<u64>,
}

impl Wal {
    /// Opens the log in `dir`, feeding every intact record to `apply` in order. A damaged
    /// record ends replay: the rest of that segment is cut off (later segments cannot be
    /// trusted to follow and are set aside as `*.wal.damaged`).
    pub fn open(
        dir: &Path,
        fsync: FsyncPolicy,
        mut apply: impl FnMut(Record),
    ) -> io::Result<(Wal, ReplayReport)> {
        std::fs::create_dir_all(dir)?;
        let mut report = ReplayReport::default();
        // The latest checkpoint first (series, metadata and exemplars of deleted segments).
        let _ = std::fs::remove_file(dir.join("checkpoint.tmp"));
        if let Some(&n) = checkpoints(dir)?.last() {
            let path = checkpoint_path(dir, n);
            let (records, valid_len, file_len, _) = replay_segment(&path, false, &mut apply)?;
            report.records += records;
            if valid_len < file_len {
                report.truncated = Some((path, file_len - valid_len));
            }
        }
        let list = segments(dir)?;
        let mut last = 0;
        let mut spans = BTreeMap::new();
        for (i, &n) in list.iter().enumerate() {
            let path = segment_path(dir, n);
            let (records, valid_len, file_len, span) = replay_segment(&path, true, &mut apply)?;
            report.records += records;
            if valid_len == file_len && std::fs::metadata(&path)?.len() > valid_len {
                // Zeros past the last record: the end of the log, cut.
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(valid_len)?;
            }
            spans.insert(
                n,
                Segment {
                    span,
                    bytes: valid_len,
                },
            );
            last = n;
            if valid_len < file_len {
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(valid_len)?;
                report.truncated = Some((path.clone(), file_len - valid_len));
                for &later in &list[i + 1..] {
                    let p = segment_path(dir, later);
                    std::fs::rename(&p, p.with_extension("wal.damaged"))?;
                }
                break;
            }
        }
        let segment = last
            .max(checkpoints(dir)?.last().copied().unwrap_or(0))
            .max(1);
        let path = segment_path(dir, segment);
        let file = Arc::new(
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?,
        );
        // The directory entries must be durable too, or a fresh log can vanish on power loss.
        File::open(dir)?.sync_all()?;
        if let Some(parent) = dir.parent() {
            File::open(parent)?.sync_all()?;
        }
        let size = file.metadata()?.len();
        // What replay read may have been written and never fsynced (the process was killed):
        // durable before a request that repeats it is acknowledged on it.
        if fsync == FsyncPolicy::Always && size > 0 {
            file.sync_data()?;
        }
        spans.entry(segment).or_insert(Segment::EMPTY).bytes = size;
        let end = Position {
            segment,
            offset: size,
        };
        let syncer = Arc::new(Syncer::new(end, file.clone(), fsync));
        syncer.start()?;
        Ok((
            Wal {
                dir: dir.to_owned(),
                file,
                syncer,
                segment,
                spans,
                size,
                allocated: size,
                fsync,
                broken: false,
                appended: 0,
            },
            report,
        ))
    }

    /// The group-commit handle: [`Syncer::request`] the position an append returned as soon
    /// as it is written, and wait for it ([`Syncer::synced_to_async`]) before acknowledging
    /// it (both return at once with `--embedded-fsync never`).
    pub fn syncer(&self) -> Arc<Syncer> {
        self.syncer.clone()
    }

    /// Where the last write ended: a request that wrote nothing itself (all its samples were
    /// already there) still waits for this before it is acknowledged.
    pub fn end(&self) -> Position {
        Position {
            segment: self.segment,
            offset: self.size,
        }
    }

    /// Appends records (written, not yet fsynced); returns where they end. On failure (a full
    /// disk, an I/O error) the partial write is cut off again, so the log stays a sequence of
    /// intact records and a later append can succeed.
    #[cfg(test)]
    pub fn append(&mut self, records: &[Record]) -> io::Result<Position> {
        let packed = Packed::of(records, &mut Packer::new()?)?;
        self.append_packed(&packed)
    }

    /// Whether appending `packed` may take long: it starts a new segment (an fsync and a
    /// new file), zero-fills the next megabyte, or is large. Any other append is a copy of
    /// at most [`QUICK_APPEND_BYTES`] into the page cache, usually microseconds (it can
    /// still wait, rarely, for the file system's journal or write-back throttling).
    pub fn append_may_block(&self, packed: &Packed) -> bool {
        let len = packed.bytes.len() as u64;
        self.size > SEGMENT_BYTES
            || len > QUICK_APPEND_BYTES
            || (self.fsync == FsyncPolicy::Always && self.size + len > self.allocated)
    }

    /// [`Wal::append`] of records packed beforehand.
    pub fn append_packed(&mut self, packed: &Packed) -> io::Result<Position> {
        if self.broken || self.syncer.broken.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "an earlier write failed and could not be undone; restart to recover",
            ));
        }
        let result = self.try_append(packed);
        if result.is_err() {
            if self.file.set_len(self.size).is_err() {
                self.broken = true;
            }
            self.allocated = self.size;
        }
        result
    }

    /// Starts a new segment; returns its number. Every record appended before is in lower
    /// segments.
    pub fn rotate(&mut self) -> io::Result<u64> {
        if self.broken || self.syncer.broken.load(Ordering::SeqCst) {
            return Err(io::Error::other("the log is broken; restart to recover"));
        }
        // The old segment is cut to its records and made durable first: a position in it
        // counts as synced from here. A failed fsync breaks the log, as in the flusher: what
        // was written may not be on disk, and a second fsync would wrongly report success.
        if self.allocated > self.size {
            self.file.set_len(self.size)?;
        }
        if self.fsync == FsyncPolicy::Always {
            if let Err(e) = self.syncer.alone(|| self.file.sync_data()) {
                self.broken = true;
                self.syncer
                    .break_with(format!("fsync of the write-ahead log failed: {e}"));
                return Err(e);
            }
        }
        self.syncer.synced_to(Position {
            segment: self.segment,
            offset: self.size,
        });
        let file = Arc::new(
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(segment_path(&self.dir, self.segment + 1))?,
        );
        File::open(&self.dir)?.sync_all()?;
        self.segment += 1;
        self.file = file;
        self.size = 0;
        self.allocated = 0;
        self.spans.insert(self.segment, Segment::EMPTY);
        self.syncer.written(
            Position {
                segment: self.segment,
                offset: 0,
            },
            &self.file,
        );
        Ok(self.segment)
    }

    /// Which segments below `before` can go once every sample older than `cutoff` is in
    /// blocks and a checkpoint holds the rest of what they carry: those whose samples are all
    /// older go whatever their place; those with older and newer samples go with their newer
    /// samples carried into the checkpoint, up to the first segment whose samples are all as
    /// new (it and those after it stay, so replay still meets the samples in their order).
    /// In time order, as a real-time load writes, that carries the one segment that straddles
    /// the cutoff; a load that writes hours of data time in one segment (a backfill, a
    /// catch-up) has every segment straddle, and the checkpoint then carries what the head
    /// holds of them instead of the log keeping them whole until their newest sample is
    /// older than the cutoff.
    pub fn truncation(&self, before: u64, cutoff: i64) -> Truncation {
        let mut plan = Truncation::default();
        let mut carrying = true;
        for (&n, Segment { span, .. }) in self.spans.range(..before) {
            if span.max_t < cutoff {
                plan.delete.push(n);
            } else if span.min_t >= cutoff {
                carrying = false;
            } else if carrying {
                plan.carry.push(n);
            }
        }
        plan
    }

    /// Forgets segments a checkpoint made redundant whose files [`delete_redundant`] deleted
    /// (with the log's lock let go: unlinking a large file and syncing the directory take
    /// long enough to hold up writers). One whose file could not be deleted stays known, so
    /// the next truncation deletes it again.
    pub fn forget(&mut self, gone: &[u64]) {
        for n in gone.iter().filter(|&&n| n < self.segment) {
            self.spans.remove(n);
        }
    }

    /// Bytes of the segments, the current one included (not of checkpoints).
    pub fn segment_bytes(&self) -> u64 {
        self.spans.values().map(|s| s.bytes).sum()
    }

    /// Bytes of records appended since the log was opened.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Bytes of these segments.
    pub fn bytes_of(&self, segments: &[u64]) -> u64 {
        segments
            .iter()
            .filter_map(|n| self.spans.get(n))
            .map(|s| s.bytes)
            .sum()
    }

    /// The segments before `n`.
    pub fn segments_before(&self, n: u64) -> Vec<u64> {
        self.spans.range(..n).map(|(&n, _)| n).collect()
    }

    /// Bytes of all segments and checkpoints.
    pub fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }

    /// Zero-fills the current segment up to the next multiple of [`PADDING_BYTES`] past its
    /// end (see the module's documentation). Not done (a full disk) is no error: the next
    /// append tries again.
    fn pad(&mut self) {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let end = (self.size / PADDING_BYTES + 1) * PADDING_BYTES;
        let mut at = self.size;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64);
            if self.file.write_all_at(&ZEROS[..n as usize], at).is_err() {
                break;
            }
            at += n;
        }
        self.allocated = at;
    }

    fn try_append(&mut self, packed: &Packed) -> io::Result<Position> {
        if self.size > SEGMENT_BYTES {
            self.rotate()?;
        }
        self.file.write_all_at(&packed.bytes, self.size)?;
        self.size += packed.bytes.len() as u64;
        self.appended += packed.bytes.len() as u64;
        if self.fsync == FsyncPolicy::Always && self.size > self.allocated {
            self.pad();
        }
        let seg = self.spans.entry(self.segment).or_insert(Segment::EMPTY);
        seg.span = seg.span.join(packed.span);
        seg.bytes = self.size;
        let end = Position {
            segment: self.segment,
            offset: self.size,
        };
        self.syncer.written(end, &self.file);
        Ok(end)
    }
}

/// Appends a record, framed as in the log (as several records past the written size), to
/// `out`.
fn frame_into(out: &mut Vec<u8>, record: &Record) {
    let mut payloads = Vec::new();
    record.encode_parts(MAX_WRITTEN_PAYLOAD, &mut payloads);
    for payload in &payloads {
        frame_payload(out, payload);
    }
}

/// Appends a framed series record without building a [`Record`] (no copy of the labels).
fn frame_series_into(out: &mut Vec<u8>, tenant: &str, id: u64, labels: &PackedLabels) {
    let mut e = Encoder(Vec::new());
    e.u8(1);
    e.str(tenant);
    e.u64(id);
    e.labels(labels.len(), labels.pairs());
    frame_payload(out, &e.0);
}

fn frame_payload(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// A checkpoint being written: records stream into a temporary file as they are framed (a
/// checkpoint of 100k series is tens of megabytes, never held in memory whole); `commit`
/// fsyncs it and renames it into place, so a checkpoint is either whole or absent.
pub struct CheckpointWriter {
    dir: PathBuf,
    out: io::BufWriter<File>,
    /// Frames not written yet: compressed and written a batch at a time.
    scratch: Vec<u8>,
    packed: Vec<u8>,
    packer: Packer,
}

impl CheckpointWriter {
    pub fn create(dir: &Path) -> io::Result<CheckpointWriter> {
        Ok(CheckpointWriter {
            dir: dir.to_owned(),
            out: io::BufWriter::with_capacity(1 << 18, File::create(dir.join("checkpoint.tmp"))?),
            scratch: Vec::new(),
            packed: Vec::new(),
            packer: Packer::new()?,
        })
    }

    /// Appends one record, framed.
    pub fn record(&mut self, record: &Record) -> io::Result<()> {
        frame_into(&mut self.scratch, record);
        self.write_batch(false)
    }

    /// Appends a series record without building a [`Record`] (no copy of the labels).
    pub fn series(&mut self, tenant: &str, id: u64, labels: &PackedLabels) -> io::Result<()> {
        frame_series_into(&mut self.scratch, tenant, id, labels);
        self.write_batch(false)
    }

    /// Writes the frames held, compressed, once they fill a batch (or at the end).
    fn write_batch(&mut self, last: bool) -> io::Result<()> {
        let full = self.scratch.len() >= BATCH_RAW_BYTES;
        if self.scratch.is_empty() || !(full || last) {
            return Ok(());
        }
        self.packed.clear();
        self.packer.pack(&self.scratch, &mut self.packed)?;
        self.scratch.clear();
        self.out.write_all(&self.packed)
    }

    /// Makes it checkpoint number `n`: durable, then in place.
    pub fn commit(mut self, n: u64) -> io::Result<()> {
        self.write_batch(true)?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(
            self.dir.join("checkpoint.tmp"),
            checkpoint_path(&self.dir, n),
        )?;
        File::open(&self.dir)?.sync_all()
    }
}

/// Replays one segment or checkpoint: (records, bytes of intact records, bytes up to the end
/// of what was written, sample times). Intact bytes short of that end are damage. The end is
/// the file's length, or, for a log segment (`zeros_end`), where its non-zero bytes end: the
/// intact bytes when only zeros follow them (a zero-filled segment's end).
fn replay_segment(
    path: &Path,
    zeros_end: bool,
    apply: &mut impl FnMut(Record),
) -> io::Result<(usize, u64, u64, Span)> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut decompressor = zstd::bulk::Decompressor::new()?;
    let (mut records, mut valid, mut span) = (0, 0u64, Span::EMPTY);
    loop {
        let mut header = [0u8; 8];
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(header[..4].try_into().unwrap_or([0; 4]));
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or([0; 4]));
        if len > MAX_RECORD_BYTES {
            break;
        }
        let mut payload = vec![0u8; len as usize];
        if reader.read_exact(&mut payload).is_err() || crc32fast::hash(&payload) != crc {
            break;
        }
        let Some(unpacked) = unpack(&payload, &mut decompressor) else {
            break;
        };
        span = span.join(Span::of(&unpacked));
        records += unpacked.len();
        unpacked.into_iter().for_each(&mut *apply);
        valid += 8 + u64::from(len);
    }
    // In a log segment, zeros after the last record are the end of the log (see the
    // module's documentation), and zeros after damage are not counted in it.
    let end = if valid < file_len && zeros_end {
        data_end(reader.into_inner(), valid)?
    } else {
        file_len
    };
    Ok((records, valid, end, span))
}

/// Where the bytes of `file` from `at` on end, zeros after them left out (`at` if all are).
fn data_end(mut file: File, at: u64) -> io::Result<u64> {
    file.seek(io::SeekFrom::Start(at))?;
    let mut reader = BufReader::with_capacity(64 << 10, file);
    let (mut offset, mut end) = (at, at);
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(end);
        }
        if let Some(last) = chunk.iter().rposition(|&b| b != 0) {
            end = offset + last as u64 + 1;
        }
        let n = chunk.len();
        offset += n as u64;
        reader.consume(n);
    }
}

/// Bytes of the newest checkpoint in `dir` (0 when there is none).
pub fn checkpoint_bytes(dir: &Path) -> u64 {
    checkpoints(dir)
        .ok()
        .and_then(|list| list.last().copied())
        .and_then(|n| std::fs::metadata(checkpoint_path(dir, n)).ok())
        .map_or(0, |m| m.len())
}

/// Deletes the files of `segments` (all before the current one) and the checkpoints older
/// than `checkpoint`, then syncs the directory. Returns the segments whose files are gone
/// (for [`Wal::forget`]), even when a later step failed, and that step's error.
pub fn delete_redundant(
    dir: &Path,
    segments: &[u64],
    checkpoint: u64,
) -> (Vec<u64>, io::Result<()>) {
    let mut gone = Vec::with_capacity(segments.len());
    for &n in segments {
        match std::fs::remove_file(segment_path(dir, n)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return (gone, Err(e)),
            _ => gone.push(n),
        }
    }
    let rest = (|| {
        for n in checkpoints(dir)? {
            if n < checkpoint {
                std::fs::remove_file(checkpoint_path(dir, n))?;
            }
        }
        File::open(dir)?.sync_all()
    })();
    (gone, rest)
}

/// Samples a checkpoint carries are written this many to a record.
const CARRIED_PER_RECORD: usize = 1 << 16;

/// Writes into `out` the samples at or after `cutoff` of the latest checkpoint in `dir` (those
/// it carried itself) and of the segments `plan` carries, in their order; returns how many.
/// A carried segment or checkpoint that does not read whole is an error of kind
/// `InvalidData`.
pub fn carry_samples(
    dir: &Path,
    plan: &Truncation,
    cutoff: i64,
    out: &mut CheckpointWriter,
) -> io::Result<u64> {
    let mut batch: Vec<(u64, i64, f64)> = Vec::new();
    let mut carried = 0u64;
    let mut failed = None;
    let mut keep = |record: Record, batch: &mut Vec<(u64, i64, f64)>| {
        // After a failed write nothing more is gathered: the flush fails anyway.
        if failed.is_some() {
            return;
        }
        let mut one = None;
        match record {
            Record::Samples { samples } => {
                batch.extend(samples.into_iter().filter(|s| s.1 >= cutoff));
            }
            // A compacted log's checkpoint: its series' samples stay in their encoding.
            Record::SeriesSamples { id, mut samples } => {
                samples.retain(|s| s.t >= cutoff);
                if !samples.is_empty() {
                    one = Some(Record::SeriesSamples { id, samples });
                }
            }
            _ => {}
        }
        if (batch.len() >= CARRIED_PER_RECORD || (one.is_some() && !batch.is_empty()))
            && failed.is_none()
        {
            carried += batch.len() as u64;
            let samples = std::mem::take(batch);
            failed = out.record(&Record::Samples { samples }).err();
        }
        if let (Some(record), true) = (one, failed.is_none()) {
            if let Record::SeriesSamples { samples, .. } = &record {
                carried += samples.len() as u64;
            }
            failed = out.record(&record).err();
        }
    };
    // A file that does not read whole (damaged on disk, now or before the start) is an
    // error of its own kind: the flush then checkpoints the head's samples instead.
    let damaged = |what: String, valid: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} is damaged at byte {valid}"),
        )
    };
    if let Some(&n) = checkpoints(dir)?.last() {
        let (_, valid, len, _) = replay_segment(&checkpoint_path(dir, n), false, &mut |r| {
            keep(r, &mut batch)
        })?;
        if valid < len {
            return Err(damaged(format!("checkpoint {n}"), valid));
        }
    }
    for &n in &plan.carry {
        let (_, valid, len, _) =
            replay_segment(&segment_path(dir, n), true, &mut |r| keep(r, &mut batch))?;
        if valid < len {
            return Err(damaged(format!("log segment {n}"), valid));
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if !batch.is_empty() {
        carried += batch.len() as u64;
        out.record(&Record::Samples { samples: batch })?;
    }
    Ok(carried)
}

#[cfg(test)]
mod tests {
    #[test]
    fn records_past_the_written_size_are_split_and_replay_whole() {
        let samples: Vec<(u64, i64, f64)> = (0..10_000)
            .map(|i| (i % 97, i as i64 * 1000, i as f64))
            .collect();
        let exemplars: Vec<(u64, i64, f64, Labels)> = (0..1_000)
            .map(|i| {
                let labels =
                    Labels::from_trusted(vec![Label::new("trace_id", "x".repeat(i % 50 + 1))]);
                (i as u64, i as i64, 0.5, labels)
            })
            .collect();
        let marks: Vec<(u64, i64)> = (0..5_000).map(|i| (i, i as i64)).collect();
        let series: Vec<Sample> = (0..10_000)
            .map(|i| Sample {
                t: i * 15_000,
                v: (i * i % 1013) as f64 / 7.0,
            })
            .collect();
        for record in [
            Record::Samples { samples },
            Record::Exemplars { exemplars },
            Record::Flushed { marks },
            Record::SeriesSamples {
                id: 7,
                samples: series,
            },
        ] {
            let mut parts = Vec::new();
            record.encode_parts(4096, &mut parts);
            assert!(parts.len() > 4, "{} parts", parts.len());
            assert!(parts.iter().all(|p| p.len() <= 4096));
            // The parts' entries, in order, are the record's.
            let decoded: Vec<Record> = parts
                .iter()
                .map(|p| Record::decode(p).expect("a part decodes"))
                .collect();
            let joined = match &record {
                Record::Samples { .. } => Record::Samples {
                    samples: decoded
                        .into_iter()
                        .flat_map(|r| match r {
                            Record::Samples { samples } => samples,
                            _ => unreachable!(),
                        })
                        .collect(),
                },
                Record::Exemplars { .. } => Record::Exemplars {
                    exemplars: decoded
                        .into_iter()
                        .flat_map(|r| match r {
                            Record::Exemplars { exemplars } => exemplars,
                            _ => unreachable!(),
                        })
                        .collect(),
                },
                Record::Flushed { .. } => Record::Flushed {
                    marks: decoded
                        .into_iter()
                        .flat_map(|r| match r {
                            Record::Flushed { marks } => marks,
                            _ => unreachable!(),
                        })
                        .collect(),
                },
                _ => Record::SeriesSamples {
                    id: 7,
                    samples: decoded
                        .into_iter()
                        .flat_map(|r| match r {
                            Record::SeriesSamples { id: 7, samples } => samples,
                            _ => unreachable!(),
                        })
                        .collect(),
                },
            };
            assert_eq!(joined, record);
        }
    }

    use super::*;

    #[test]
    fn a_series_framed_from_packed_labels_is_the_record_logged_before() {
        let labels = Labels::from_trusted(vec![
            Label::new("__name__", "up"),
            Label::new("instance", "a:9100"),
            Label::new("path", "/é".repeat(100)),
        ]);
        let mut from_record = Vec::new();
        frame_into(
            &mut from_record,
            &Record::Series {
                tenant: "t".into(),
                id: 300,
                labels: labels.clone(),
            },
        );
        let mut from_packed = Vec::new();
        frame_series_into(&mut from_packed, "t", 300, &PackedLabels::from(&labels));
        assert_eq!(from_packed, from_record);
    }

    #[test]
    fn a_full_disk_is_an_error_not_a_crash() {
        // /dev/full refuses every write with ENOSPC, like a full disk.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join("00000001.wal")).unwrap();
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Always, |_| {}).unwrap();
        let error = wal.append(&records()).unwrap_err();
        assert!(error.to_string().contains("space"), "{error}");
    }

    fn labels(name: &str) -> Labels {
        Labels::from_trusted(vec![Label::new("__name__", name)])
    }

    fn records() -> Vec<Record> {
        vec![
            Record::Series {
                tenant: "t".into(),
                id: 1,
                labels: labels("up"),
            },
            Record::Samples {
                samples: vec![
                    (1, 1000, 1.0),
                    (1, 2000, f64::from_bits(crate::model::STALE_NAN_BITS)),
                ],
            },
            Record::Metadata {
                tenant: "t".into(),
                metadata: MetricMetadata {
                    metric_family_name: "up".into(),
                    metric_type: MetricType::Gauge,
                    help: "h".into(),
                    unit: "".into(),
                },
            },
            Record::Exemplars {
                exemplars: vec![(
                    1,
                    1500,
                    0.5,
                    Labels::from_trusted(vec![Label::new("trace_id", "ab")]),
                )],
            },
            Record::Flushed {
                marks: vec![(1, 1_700_000_000_000), (u64::MAX, i64::MIN + 1)],
            },
        ]
    }

    #[test]
    fn sample_records_round_trip_bit_exact() {
        let values = [
            0.0,
            -0.0,
            1.0,
            -7.0,
            4_503_599_627_370_495.0,
            4_503_599_627_370_496.0,
            -9.007_199_254_740_993e15,
            0.1,
            1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::from_bits(crate::model::STALE_NAN_BITS),
            // Decimals: some come back from a mantissa and places, the rest as bits.
            123_456.78,
            -0.01,
            0.000_001,
            0.000_000_1,
            1.0 / 3.0,
            5e-324,
            4_503_599_627_370.495,
            9_007_199_254_740.993,
            -1e-6,
            f64::MIN_POSITIVE,
        ];
        let mut values = values.to_vec();
        // Every two-decimal value a counter of CPU seconds passes through, and neighbours.
        for i in 0..20_000i64 {
            let v = (i * 7_919) as f64 / 100.0;
            values.extend([v, v.next_up(), v.next_down(), -v, v * 1e-4]);
        }
        let samples: Vec<(u64, i64, f64)> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                (
                    (i as u64 * 7919 % 13).wrapping_add(u64::MAX * (i % 2) as u64),
                    i64::MIN / (i as i64 + 1),
                    v,
                )
            })
            .collect();
        let record = Record::Samples {
            samples: samples.clone(),
        };
        let Some(Record::Samples { samples: back }) = Record::decode(&record.encode()) else {
            panic!("not decoded");
        };
        assert_eq!(back.len(), samples.len());
        for (a, b) in samples.iter().zip(&back) {
            assert_eq!((a.0, a.1, a.2.to_bits()), (b.0, b.1, b.2.to_bits()));
        }
        // Integers take a few bytes instead of eight.
        let small = Record::Samples {
            samples: (0..100)
                .map(|i| (i, 1_700_000_000_000, (i * 3) as f64))
                .collect(),
        };
        assert!(small.encode().len() < 100 * 5, "{}", small.encode().len());
        // And so do values of two decimals.
        let decimals = Record::Samples {
            samples: (0..100)
                .map(|i| (i, 1_700_000_000_000, 123_456.0 + i as f64 * 0.37))
                .collect(),
        };
        assert!(
            decimals.encode().len() < 100 * 8,
            "{}",
            decimals.encode().len()
        );
    }

    #[test]
    fn concurrent_writers_share_fsyncs_and_every_record_survives() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), FsyncPolicy::Always, |_| {}).unwrap();
        let syncer = wal.syncer();
        let wal = Arc::new(Mutex::new(wal));
        let threads: Vec<_> = (0..4u64)
            .map(|w| {
                let (wal, syncer) = (wal.clone(), syncer.clone());
                std::thread::spawn(move || {
                    for i in 0..50i64 {
                        let record = Record::Samples {
                            samples: vec![(w, i, i as f64)],
                        };
                        let end = wal.lock().unwrap().append(&[record]).unwrap();
                        syncer.sync_to(end).unwrap();
                        // Durable now: a position already covered returns at once.
                        syncer.sync_to(end).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(wal);
        let mut count = 0;
        Wal::open(dir.path(), FsyncPolicy::Always, |_| count += 1).unwrap();
        assert_eq!(count, 200);
    }

    #[test]
    fn a_flush_carries_the_straddling_segments_before_the_first_all_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Never, |_| {}).unwrap();
        // Segments 1-4 hold samples over these times; 5 is the current one.
        for (from, to) in [(0, 100), (200, 300), (50, 60), (0, 500)] {
            let samples = vec![(1, from, 1.0), (2, to, 2.0)];
            wal.append(&[Record::Samples { samples }]).unwrap();
            wal.rotate().unwrap();
        }
        let plan = |wal: &Wal, cutoff| {
            let t = wal.truncation(5, cutoff);
            (t.delete, t.carry)
        };
        // Segment 2 is all newer: 4 stays behind it although it straddles.
        assert_eq!(plan(&wal, 150), (vec![1, 3], vec![]));
        assert_eq!(plan(&wal, 250), (vec![1, 3], vec![2, 4]));
        assert_eq!(plan(&wal, 0), (vec![], vec![]));
        assert_eq!(plan(&wal, 501), (vec![1, 2, 3, 4], vec![]));
        // The checkpoint carries the newer samples in the segments' order.
        let mut out = CheckpointWriter::create(dir.path()).unwrap();
        let carried = carry_samples(dir.path(), &wal.truncation(5, 250), 250, &mut out).unwrap();
        out.commit(5).unwrap();
        assert_eq!(carried, 2);
        let mut seen = Vec::new();
        replay_segment(&checkpoint_path(dir.path(), 5), false, &mut |r| {
            seen.push(r)
        })
        .unwrap();
        let samples = vec![(2, 300, 2.0), (2, 500, 2.0)];
        assert_eq!(seen, [Record::Samples { samples }]);
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Always, |_| {}).unwrap();
        wal.append(&records()).unwrap();
        drop(wal);
        let mut seen = Vec::new();
        let (_, report) = Wal::open(dir.path(), FsyncPolicy::Always, |r| seen.push(r)).unwrap();
        assert_eq!(report.records, 5);
        assert!(report.truncated.is_none());
        // NaN payloads compare by bits.
        assert_eq!(format!("{seen:?}"), format!("{:?}", records()));
    }

    #[test]
    fn a_torn_or_damaged_tail_is_cut_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Never, |_| {}).unwrap();
        wal.append(&records()[..2]).unwrap();
        wal.append(&records()[2..]).unwrap();
        drop(wal);
        let path = segment_path(dir.path(), 1);
        let full = std::fs::metadata(&path).unwrap().len();
        // Tear the last record in half.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(full - 5)
            .unwrap();
        let mut seen = 0;
        let (mut wal, report) = Wal::open(dir.path(), FsyncPolicy::Never, |_| seen += 1).unwrap();
        assert_eq!(seen, records().len() - 1);
        assert!(report.truncated.is_some());
        // Appending after the cut works and replays.
        wal.append(&records()[..1]).unwrap();
        drop(wal);
        let mut seen = 0;
        let (_, report) = Wal::open(dir.path(), FsyncPolicy::Never, |_| seen += 1).unwrap();
        assert_eq!((seen, report.truncated.is_none()), (records().len(), true));

        // Flip a byte inside the first record: replay stops there.
        assert_eq!(replay_after_damage(dir.path(), 12, 0xff), (0, true));
    }

    #[test]
    fn zeros_after_the_last_record_end_the_log_and_a_torn_record_before_them_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Always, |_| {}).unwrap();
        let end = wal.append(&records()[..2]).unwrap();
        wal.append(&records()[2..]).unwrap();
        let written = wal.size;
        drop(wal);
        // The segment is zero-filled past its records, to the next step.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PADDING_BYTES);
        let mut seen = 0;
        let (mut wal, report) = Wal::open(dir.path(), FsyncPolicy::Always, |_| seen += 1).unwrap();
        assert_eq!((seen, report.truncated), (records().len(), None));
        // Cut to its records on open, then appended to where they end.
        assert_eq!(wal.size, written);
        wal.append(&records()[..1]).unwrap();
        drop(wal);
        let mut seen = 0;
        let (_, report) = Wal::open(dir.path(), FsyncPolicy::Always, |_| seen += 1).unwrap();
        assert_eq!((seen, report.truncated), (records().len() + 1, None));

        // A record torn in the middle, zeros after it: replay stops before it, as damage.
        let mut bytes = std::fs::read(&path).unwrap();
        let torn = end.offset as usize + 10;
        bytes[torn..].fill(0);
        bytes.resize(PADDING_BYTES as usize, 0);
        std::fs::write(&path, bytes).unwrap();
        let mut seen = 0;
        let (wal, report) = Wal::open(dir.path(), FsyncPolicy::Always, |_| seen += 1).unwrap();
        assert_eq!(seen, 2);
        // The damage reported is the torn record's bytes, not the zeros after them.
        let (cut, bytes) = report.truncated.unwrap();
        assert_eq!(cut, path);
        assert!(bytes > 0 && bytes <= 10, "{bytes}");
        assert_eq!(wal.size, end.offset);
        drop(wal);

        // A rotated segment is cut to its records; a later one left zero-filled by a power
        // loss (its cut not durable) still replays whole, and so do the segments after it.
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Always, |_| {}).unwrap();
        wal.rotate().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), end.offset);
        wal.append(&records()[2..]).unwrap();
        drop(wal);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(PADDING_BYTES)
            .unwrap();
        let mut seen = 0;
        let (_, report) = Wal::open(dir.path(), FsyncPolicy::Always, |_| seen += 1).unwrap();
        assert_eq!((seen, report.truncated), (records().len(), None));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), end.offset);
    }

    #[test]
    fn only_appends_that_start_a_segment_fill_ahead_or_are_large_may_block() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Always, |_| {}).unwrap();
        let small = Packed::of(&records(), &mut Packer::new().unwrap()).unwrap();
        // The first append zero-fills the first megabyte; the next ones fit in it.
        assert!(wal.append_may_block(&small));
        wal.append_packed(&small).unwrap();
        assert!(!wal.append_may_block(&small));
        // Past the filled megabyte: fill again.
        wal.size = wal.allocated - 1;
        assert!(wal.append_may_block(&small));
        // Past a segment's size: a new segment.
        wal.size = SEGMENT_BYTES + 1;
        wal.allocated = SEGMENT_BYTES + PADDING_BYTES;
        assert!(wal.append_may_block(&small));
        // A large append.
        let samples = (0..100_000u64)
            .map(|i| {
                (
                    1,
                    i as i64,
                    f64::from_bits(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                )
            })
            .collect();
        let large =
            Packed::of(&[Record::Samples { samples }], &mut Packer::new().unwrap()).unwrap();
        assert!(
            large.bytes.len() as u64 > QUICK_APPEND_BYTES,
            "{}",
            large.bytes.len()
        );
        drop(wal);
        let (wal, _) = Wal::open(dir.path(), FsyncPolicy::Never, |_| {}).unwrap();
        assert!(!wal.append_may_block(&small));
        assert!(wal.append_may_block(&large));
    }

    #[test]
    fn zeros_after_a_checkpoint_s_records_are_damage() {
        // A checkpoint is written whole and renamed, never zero-filled: zeros in it are
        // damage, reported, unlike a log segment's.
        let written = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(written.path(), FsyncPolicy::Never, |_| {}).unwrap();
        wal.append(&records()).unwrap();
        drop(wal);
        let mut bytes = std::fs::read(segment_path(written.path(), 1)).unwrap();
        bytes.resize(bytes.len() + 4096, 0);
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = checkpoint_path(dir.path(), 1);
        std::fs::write(&checkpoint, &bytes).unwrap();
        let mut seen = 0;
        let (_, report) = Wal::open(dir.path(), FsyncPolicy::Never, |_| seen += 1).unwrap();
        assert_eq!(seen, records().len());
        assert_eq!(report.truncated, Some((checkpoint, 4096)));
    }

    #[tokio::test]
    async fn writers_wait_for_the_flusher_as_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), FsyncPolicy::Always, |_| {}).unwrap();
        let syncer = wal.syncer();
        let wal = Arc::new(Mutex::new(wal));
        // Many writers on one thread: each asks for its fsync and waits without blocking the
        // others; every wait ends with its position durable.
        let writers = (0..50i64).map(|i| {
            let (wal, syncer) = (wal.clone(), syncer.clone());
            async move {
                let record = Record::Samples {
                    samples: vec![(1, i, i as f64)],
                };
                let end = wal.lock().unwrap().append(&[record]).unwrap();
                syncer.synced_to_async(end).await.unwrap();
                assert!(syncer.state().synced >= end);
            }
        });
        futures::future::join_all(writers).await;
        drop(wal);
        let mut count = 0;
        Wal::open(dir.path(), FsyncPolicy::Always, |_| count += 1).unwrap();
        assert_eq!(count, 50);
        // A wait past what is durable once the log closed ends with an error, not never.
        let beyond = Position {
            segment: 99,
            offset: 0,
        };
        let err = syncer.synced_to_async(beyond).await.unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
        // The flusher stopped with the log: nothing holds the syncer but this test.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&syncer) > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the flusher did not stop"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_fsyncs_itself_when_no_fsync_runs_and_another_thread_is_spare() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(File::create(dir.path().join("log")).unwrap());
        // No flusher started: only a writer can make a position durable.
        let syncer = Arc::new(Syncer::new(
            Position::default(),
            file.clone(),
            FsyncPolicy::Always,
        ));
        // Writes six bytes at `offset`; returns where they end.
        let write = |offset: u64| {
            file.write_all_at(b"record", offset).unwrap();
            let end = Position {
                segment: 0,
                offset: offset + 6,
            };
            syncer.written(end, &file);
            end
        };
        let wait = |to: Position| {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                syncer.synced_to_async(to),
            )
        };
        let end = write(0);
        let waited = wait(end).await;
        assert!(matches!(waited, Ok(Ok(()))), "{waited:?}");
        assert!(syncer.state().synced >= end && !syncer.state().in_flight);
        // After a slow fsync the next is handed off (`block_in_place`), and still durable.
        syncer.state().slow = true;
        let handed = write(6);
        let waited = wait(handed).await;
        assert!(matches!(waited, Ok(Ok(()))), "{waited:?}");
        assert!(syncer.state().synced >= handed && !syncer.state().in_flight);
        // On a runtime of one thread it leaves the fsync to the flusher (here: none) and waits.
        let later = write(12);
        let waiter = syncer.clone();
        let waited = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
                .block_on(async {
                    tokio::time::timeout(
                        std::time::Duration::from_millis(200),
                        waiter.synced_to_async(later),
                    )
                    .await
                })
        })
        .join()
        .unwrap();
        assert!(waited.is_err(), "{waited:?}");
        assert!(syncer.state().synced < later);
    }

    #[test]
    fn rotation_fsyncs_only_when_no_other_fsync_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Always, |_| {}).unwrap();
        wal.append(&records()).unwrap();
        let syncer = wal.syncer();
        // As while the flusher's or a writer's fsync runs.
        syncer.state().in_flight = true;
        let rotating = std::thread::spawn(move || {
            wal.rotate().unwrap();
            wal
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!rotating.is_finished(), "rotated beside a running fsync");
        let mut state = syncer.state();
        state.in_flight = false;
        drop(state);
        syncer.done.notify_all();
        let wal = rotating.join().unwrap();
        assert_eq!(wal.segment, 2);
        assert!(!syncer.state().in_flight);
    }

    #[tokio::test]
    async fn a_broken_log_fails_every_wait_short_of_the_durable_end() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Always, |_| {}).unwrap();
        let first = wal.append(&records()[..1]).unwrap();
        wal.syncer().synced_to_async(first).await.unwrap();
        let syncer = wal.syncer();
        // As the flusher does when an fsync fails (an I/O error cannot be made here).
        syncer.break_with("fsync of the write-ahead log failed: test".into());
        let err = wal.append(&records()[1..2]).unwrap_err();
        assert!(err.to_string().contains("restart"), "{err}");
        let later = Position {
            segment: first.segment,
            offset: first.offset + 1,
        };
        let err = syncer.synced_to_async(later).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("fsync of the write-ahead log failed"),
            "{err}"
        );
        // What was durable before stays so.
        syncer.synced_to_async(first).await.unwrap();
    }

    /// Flips `mask` into byte `at` of the first segment, then replays: (records applied,
    /// whether a cut was reported).
    fn replay_after_damage(dir: &Path, at: usize, mask: u8) -> (usize, bool) {
        let path = segment_path(dir, 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at] ^= mask;
        std::fs::write(&path, bytes).unwrap();
        let mut seen = 0;
        let (_, report) = Wal::open(dir, FsyncPolicy::Never, |_| seen += 1).unwrap();
        (seen, report.truncated.is_some())
    }

    #[test]
    fn appends_are_compressed_and_logs_written_before_replay_unchanged() {
        // A request's worth: 2,000 series, one float sample each, and their series records.
        let mut batch: Vec<Record> = (0..2_000u64)
            .map(|id| Record::Series {
                tenant: "t".into(),
                id,
                labels: Labels::from_trusted(vec![
                    Label::new("__name__", "node_cpu_seconds_total"),
                    Label::new("cpu", format!("{}", id % 8)),
                    Label::new("instance", format!("host-{:04}.example.net:9100", id / 64)),
                    Label::new(
                        "mode",
                        ["idle", "user", "system", "iowait"][id as usize % 4],
                    ),
                ]),
            })
            .collect();
        batch.push(Record::Samples {
            samples: (0..2_000u64)
                .map(|id| (id, 1_700_000_000_000, id as f64 * 1.37 + 0.25))
                .collect(),
        });
        let raw: usize = batch.iter().map(|r| 8 + r.encode().len()).sum();

        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), FsyncPolicy::Never, |_| {}).unwrap();
        wal.append(&batch).unwrap();
        wal.append(&records()).unwrap();
        drop(wal);
        let written = std::fs::metadata(segment_path(dir.path(), 1))
            .unwrap()
            .len() as usize;
        assert!(
            written * 4 < raw,
            "{written} bytes written for {raw} bytes of frames"
        );
        let mut seen = Vec::new();
        let (_, report) = Wal::open(dir.path(), FsyncPolicy::Never, |r| seen.push(r)).unwrap();
        assert!(report.truncated.is_none());
        let expected: Vec<Record> = batch.iter().cloned().chain(records()).collect();
        assert_eq!(format!("{seen:?}"), format!("{expected:?}"));

        // A log of plain frames, as written before compression, replays as it did.
        let old = tempfile::tempdir().unwrap();
        let mut plain = Vec::new();
        for record in &expected {
            frame_into(&mut plain, record);
        }
        std::fs::write(segment_path(old.path(), 1), &plain).unwrap();
        let mut seen = Vec::new();
        let (_, report) = Wal::open(old.path(), FsyncPolicy::Never, |r| seen.push(r)).unwrap();
        assert!(report.truncated.is_none());
        assert_eq!(format!("{seen:?}"), format!("{expected:?}"));

        // A damaged byte inside the compressed frame: none of its records is applied, and
        // the log is cut there.
        assert_eq!(replay_after_damage(dir.path(), 100, 0x55), (0, true));
    }

    #[test]
    fn the_fuzzers_compressed_seeds_are_valid_logs() {
        // fuzz/corpus/wal_replay: a selector byte, then a log (even) or a checkpoint (odd)
        // of one compressed frame holding 40 series records and a sample record of decimals.
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/wal_replay");
        for (seed, file) in [
            ("compressed-log-seed", "00000001.wal"),
            ("compressed-checkpoint-seed", "checkpoint.00000001"),
        ] {
            let bytes = std::fs::read(corpus.join(seed)).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(file), &bytes[1..]).unwrap();
            let mut seen = Vec::new();
            let (_, report) = Wal::open(dir.path(), FsyncPolicy::Never, |r| seen.push(r)).unwrap();
            assert!(report.truncated.is_none(), "{seed}");
            assert_eq!(seen.len(), 41, "{seed}");
            let Some(Record::Samples { samples }) = seen.last() else {
                panic!("{seed}: {:?}", seen.last());
            };
            assert_eq!(samples[1], (1, 1_700_000_000_000, 123.82), "{seed}");
        }
    }
}
