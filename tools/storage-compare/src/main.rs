//! storage-compare: fjall vs redb vs plain append-only segment files for
//! storing compressed time-series chunks (opaque blobs) in SecuMon's engine.
//! See README.md for what is measured and RESULTS.md for numbers.
//!
//! Segment files: one append-only file per write round (round-NNNNNN.seg), records in
//! (series, min_t) order, index written as a footer; `segment-compacted` rewrites all
//! round files into one series-major file.
//!
//! The parent process runs every backend in a child process of this same
//! binary (`--backend <name>`), so each backend's peak RSS is measured alone.
//! A child prints `RESULT key=value` lines; the parent collects them and
//! prints a markdown table.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const SEED: u64 = 0x5EC0_0015_2026;
const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z in ms
const SCRAPE_MS: i64 = 15_000;
const SAMPLES_PER_CHUNK: i64 = 120;
const CHUNK_SPAN_MS: i64 = SAMPLES_PER_CHUNK * SCRAPE_MS; // 30 min
const READ_QUERIES: usize = 10_000;
const SCAN_SERIES: u64 = 1_000;

const BACKENDS: [&str; 7] = [
    "fjall",
    "fjall-gc0",
    "redb",
    "redb-32m",
    "segment",
    "segment-compacted",
    "baseline",
];

// ---------------------------------------------------------------- workload

#[derive(Clone, Copy)]
struct Params {
    series: u64,
    rounds: u64, // chunks per series
}

impl Params {
    fn min_t(&self, series: u64, round: u64) -> i64 {
        // each series has its own scrape offset within the 15 s interval
        T0 + round as i64 * CHUNK_SPAN_MS + (series as i64 % SCRAPE_MS)
    }
    fn max_t(&self, series: u64, round: u64) -> i64 {
        self.min_t(series, round) + (SAMPLES_PER_CHUNK - 1) * SCRAPE_MS
    }
    /// Retention cut: every chunk with max_t < midpoint is deleted (= first half of rounds).
    fn retention_cut(&self) -> i64 {
        T0 + (self.rounds / 2) as i64 * CHUNK_SPAN_MS
    }
    /// Query range for the "middle 50% of its chunks": chunks whose min_t is in [lo, hi].
    fn query_range(&self, series: u64) -> (i64, i64) {
        let first = self.rounds / 4;
        let n = (self.rounds / 2).max(1);
        (self.min_t(series, first), self.min_t(series, first + n - 1))
    }
}

struct Chunk {
    series: u64,
    min_t: i64,
    max_t: i64,
    blob: Vec<u8>,
}

/// Generates the chunks of one round. Driven by one RNG in (round, series) order,
/// so the byte stream is identical for every backend.
struct Gen {
    rng: SmallRng,
    p: Params,
}

impl Gen {
    fn new(p: Params) -> Self {
        Gen {
            rng: SmallRng::seed_from_u64(SEED),
            p,
        }
    }
    fn round(&mut self, round: u64) -> Vec<Chunk> {
        (0..self.p.series)
            .map(|s| {
                let len = self.rng.gen_range(120..=220usize);
                let mut blob = vec![0u8; len];
                self.rng.fill_bytes(&mut blob);
                Chunk {
                    series: s,
                    min_t: self.p.min_t(s, round),
                    max_t: self.p.max_t(s, round),
                    blob,
                }
            })
            .collect()
    }
}

fn kv_key(series: u64, min_t: i64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&series.to_be_bytes());
    k[8..].copy_from_slice(&((min_t as u64) ^ (1u64 << 63)).to_be_bytes());
    k
}

fn kv_value(c: &Chunk, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&c.max_t.to_be_bytes());
    buf.extend_from_slice(&c.blob);
}

fn value_max_t(v: &[u8]) -> i64 {
    i64::from_be_bytes(v[..8].try_into().unwrap())
}

// ---------------------------------------------------------------- measuring helpers

/// (apparent bytes like `du -b`, allocated bytes like `du -B1`)
fn dir_bytes(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut app = 0;
    let mut alloc = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let md = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if md.is_dir() {
                let (a, b) = dir_bytes(&e.path());
                app += a;
                alloc += b;
            } else {
                app += md.len();
                alloc += md.blocks() * 512;
            }
        }
    }
    (app, alloc)
}

fn proc_status(field: &str) -> u64 {
    let s = fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix(field) {
            let kb: u64 = rest
                .trim_start_matches(':')
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            return kb * 1024;
        }
    }
    0
}

/// bytes this process caused to be written to the block layer (/proc/self/io write_bytes)
fn io_write_bytes() -> Option<u64> {
    let s = fs::read_to_string("/proc/self/io").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("write_bytes:").and_then(|v| v.trim().parse().ok()))
}

struct Out {
    kv: Vec<(String, String)>,
}

impl Out {
    fn new() -> Self {
        Out { kv: vec![] }
    }
    fn put(&mut self, k: &str, v: impl ToString) {
        let v = v.to_string();
        eprintln!("  {k} = {v}");
        self.kv.push((k.to_string(), v));
    }
    fn put_dur(&mut self, k: &str, d: Duration) {
        self.put(k, format!("{:.6}", d.as_secs_f64()));
    }
    fn put_disk(&mut self, k: &str, dir: &Path) {
        let (a, b) = dir_bytes(dir);
        self.put(k, a);
        self.put(&format!("{k}_alloc"), b);
    }
    fn emit(&self) {
        for (k, v) in &self.kv {
            println!("RESULT {k}={v}");
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn query_series(p: &Params) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(SEED ^ 0xABCD);
    (0..READ_QUERIES.min(p.series as usize))
        .map(|_| rng.gen_range(0..p.series))
        .collect()
}

/// Drops the OS page cache for every file under `dir` (posix_fadvise DONTNEED; files are
/// synced at this point). Only this benchmark's own files are affected. The store's
/// in-process caches are NOT cleared.
fn evict_page_cache(dir: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                evict_page_cache(&path);
            } else if let Ok(f) = File::open(&path) {
                let _ = f.sync_data();
                unsafe {
                    libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
    }
}

/// Cold-ish (page cache of the store's files dropped) then warm run of the same reads and scan.
fn read_phase(
    out: &mut Out,
    dir: &Path,
    p: &Params,
    mut q: impl FnMut(u64, i64, i64) -> (usize, usize),
    mut scan: impl FnMut(u64, u64) -> usize,
) {
    // cold-ish run, then the same queries again (now every touched page is cached)
    evict_page_cache(dir);
    run_reads(out, "cold", p, &mut q);
    run_reads(out, "warm", p, &mut q);
    evict_page_cache(dir);
    let s0 = scan_start(p);
    for pre in ["cold", "warm"] {
        let t = Instant::now();
        let n = scan(s0, s0 + SCAN_SERIES);
        out.put_dur(&format!("{pre}_scan_s"), t.elapsed());
        out.put(&format!("{pre}_scan_chunks"), n);
    }
}

fn scan_start(p: &Params) -> u64 {
    (p.series / 2).min(p.series.saturating_sub(SCAN_SERIES))
}

/// Common read benchmark driver. `q(series, lo, hi)` returns (chunks, blob bytes).
fn run_reads(out: &mut Out, pre: &str, p: &Params, mut q: impl FnMut(u64, i64, i64) -> (usize, usize)) {
    let ids = query_series(p);
    let want = (p.rounds / 2).max(1) as usize;
    let mut lat = Vec::with_capacity(ids.len());
    let mut total = 0usize;
    let t = Instant::now();
    for &s in &ids {
        let (lo, hi) = p.query_range(s);
        let t1 = Instant::now();
        let (n, _) = q(s, lo, hi);
        lat.push(t1.elapsed());
        assert_eq!(n, want, "series {s}: expected {want} chunks, got {n}");
        total += n;
    }
    let all = t.elapsed();
    lat.sort();
    out.put(&format!("{pre}_read_queries"), ids.len());
    out.put(&format!("{pre}_read_chunks"), total);
    out.put_dur(&format!("{pre}_read_total_s"), all);
    out.put_dur(&format!("{pre}_read_p50_s"), percentile(&lat, 0.5));
    out.put_dur(&format!("{pre}_read_p99_s"), percentile(&lat, 0.99));
}

// ---------------------------------------------------------------- fjall

/// Seal the active memtable and wait until it is written out as a disk segment.
/// (`rotate_memtable_and_wait` only waits for the flush queue to drain, not for the flush.)
fn fjall_flush(part: &fjall::PartitionHandle) {
    use fjall::AbstractTree;
    part.rotate_memtable_and_wait().expect("rotate");
    while part.tree.sealed_memtable_count() > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn bench_fjall(dir: &Path, p: Params, out: &mut Out, nudge_gc: bool) {
    use fjall::{Config, PartitionCreateOptions, PersistMode};
    let ks = Config::new(dir).open().expect("open fjall");
    let part = ks
        .open_partition("chunks", PartitionCreateOptions::default())
        .expect("partition");
    let stats = |out: &mut Out, tag: &str| {
        out.put(&format!("fjall_{tag}_journals"), ks.journal_count());
        out.put(&format!("fjall_{tag}_journal_bytes"), ks.journal_disk_space());
        out.put(&format!("fjall_{tag}_partition_bytes"), part.disk_space());
        out.put(&format!("fjall_{tag}_segments"), part.segment_count());
    };
    out.put(
        "cache_note",
        "fjall default Config (block cache 32 MiB default), default partition options, no KV separation",
    );

    let mut gen = Gen::new(p);
    let io0 = io_write_bytes();
    let mut write = Duration::ZERO;
    let mut raw = 0u64;
    let mut vbuf = Vec::with_capacity(256);
    for r in 0..p.rounds {
        let chunks = gen.round(r);
        let t = Instant::now();
        let mut batch = ks.batch();
        for c in &chunks {
            raw += c.blob.len() as u64;
            kv_value(c, &mut vbuf);
            batch.insert(&part, kv_key(c.series, c.min_t), vbuf.as_slice());
        }
        batch.commit().expect("commit");
        ks.persist(PersistMode::SyncAll).expect("persist");
        write += t.elapsed();
    }
    out.put("raw_bytes", raw);
    out.put_dur("write_s", write);
    if let (Some(a), Some(b)) = (io0, io_write_bytes()) {
        out.put("io_written_during_write", b - a);
    }
    out.put_disk("disk_after_write", dir);
    stats(out, "write");

    // settle: flush memtable to a segment, then major compaction (both #[doc(hidden)] pub APIs in fjall 2.x)
    let t = Instant::now();
    fjall_flush(&part);
    part.major_compact().expect("major compact");
    out.put_dur("settle_s", t.elapsed());
    out.put_disk("disk_after_settle", dir);
    stats(out, "settle");
    // reopen so the read phase starts with an empty block cache
    drop(part);
    drop(ks);
    let t = Instant::now();
    let ks = Config::new(dir).open().expect("reopen fjall");
    let part = ks
        .open_partition("chunks", PartitionCreateOptions::default())
        .expect("partition");
    out.put_dur("reopen_s", t.elapsed());
    let stats = |out: &mut Out, tag: &str| {
        out.put(&format!("fjall_{tag}_journals"), ks.journal_count());
        out.put(&format!("fjall_{tag}_journal_bytes"), ks.journal_disk_space());
        out.put(&format!("fjall_{tag}_partition_bytes"), part.disk_space());
        out.put(&format!("fjall_{tag}_segments"), part.segment_count());
    };

    read_phase(
        out,
        dir,
        &p,
        |s, lo, hi| {
            let (mut n, mut b) = (0, 0);
            for kv in part.range(kv_key(s, lo)..=kv_key(s, hi)) {
                let (_k, v) = kv.expect("read");
                n += 1;
                b += v.len() - 8;
            }
            (n, b)
        },
        |s0, s1| {
            let (mut n, mut b) = (0, 0);
            for kv in part.range(kv_key(s0, i64::MIN)..kv_key(s1, i64::MIN)) {
                let (_k, v) = kv.expect("scan");
                n += 1;
                b += v.len();
            }
            std::hint::black_box(b);
            n
        },
    );

    // retention: find expired keys (max_t < cut) and delete them in one durable batch
    let cut = p.retention_cut();
    let t = Instant::now();
    let mut batch = ks.batch();
    let mut deleted = 0u64;
    for kv in part.iter() {
        let (k, v) = kv.expect("iter");
        if value_max_t(&v) < cut {
            batch.remove(&part, k);
            deleted += 1;
        }
    }
    batch.commit().expect("commit deletes");
    ks.persist(PersistMode::SyncAll).expect("persist");
    out.put_dur("retention_s", t.elapsed());
    out.put("retention_deleted", deleted);
    out.put("fjall_live_keys_right_after_deletes", part.len().expect("len"));
    out.put_disk("disk_after_retention", dir);
    stats(out, "retention");
    std::thread::sleep(Duration::from_secs(2));
    out.put_disk("disk_after_retention_2s", dir);
    // fjall 2.x advances its MVCC GC watermark (only below it may compaction drop shadowed
    // versions) solely when snapshots are closed, every 50th close; plain reads/writes do not.
    // With the watermark still at 0, we observed that a major compaction drops the tombstones at
    // the last level but keeps the values they shadowed (deleted chunks come back). `fjall`
    // therefore advances the watermark first, as an application taking snapshots would;
    // `fjall-gc0` skips that to show the effect.
    let t = Instant::now();
    if nudge_gc {
        for _ in 0..100 {
            drop(part.snapshot());
        }
    }
    fjall_flush(&part);
    out.put("fjall_live_keys_after_flush", part.len().expect("len"));
    stats(out, "retention_flushed");
    part.major_compact().expect("major compact");
    out.put_dur("retention_compact_s", t.elapsed());
    out.put_disk("disk_after_retention_compact", dir);
    stats(out, "retention_compact");
    out.put("live_chunks_end", part.len().expect("len"));
    std::thread::sleep(Duration::from_secs(3));
    out.put_disk("disk_after_retention_compact_3s", dir);
    drop(part);
    drop(ks);
}

// ---------------------------------------------------------------- redb

fn bench_redb(dir: &Path, p: Params, out: &mut Out, cache: Option<usize>) {
    use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};
    const T: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("chunks");
    let path = dir.join("chunks.redb");
    let open = |create: bool| {
        let mut b = Database::builder();
        if let Some(c) = cache {
            b.set_cache_size(c);
        }
        if create { b.create(&path) } else { b.open(&path) }.expect("open redb")
    };
    let mut db = open(true);
    out.put(
        "cache_note",
        match cache {
            Some(c) => format!("redb Builder::set_cache_size({c}), Durability::Immediate commits"),
            None => "redb default Builder (1 GiB cache), Durability::Immediate commits".to_string(),
        },
    );

    let mut gen = Gen::new(p);
    let io0 = io_write_bytes();
    let mut write = Duration::ZERO;
    let mut raw = 0u64;
    let mut vbuf = Vec::with_capacity(256);
    for r in 0..p.rounds {
        let chunks = gen.round(r);
        let t = Instant::now();
        let tx = db.begin_write().expect("begin");
        {
            let mut tbl = tx.open_table(T).expect("table");
            for c in &chunks {
                raw += c.blob.len() as u64;
                kv_value(c, &mut vbuf);
                tbl.insert(&kv_key(c.series, c.min_t), vbuf.as_slice())
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
        write += t.elapsed();
    }
    out.put("raw_bytes", raw);
    out.put_dur("write_s", write);
    if let (Some(a), Some(b)) = (io0, io_write_bytes()) {
        out.put("io_written_during_write", b - a);
    }
    out.put_disk("disk_after_write", dir);

    let t = Instant::now();
    let mut passes = 0;
    while db.compact().expect("compact") {
        passes += 1;
        if passes >= 20 {
            break;
        }
    }
    out.put_dur("settle_s", t.elapsed());
    out.put("settle_compact_passes", passes);
    out.put_disk("disk_after_settle", dir);
    // reopen so the read phase starts with an empty page cache inside redb
    drop(db);
    let t = Instant::now();
    let mut db = open(false);
    out.put_dur("reopen_s", t.elapsed());

    {
        let rtx = db.begin_read().expect("read tx");
        let tbl = rtx.open_table(T).expect("table");
        read_phase(
            out,
            dir,
            &p,
            |s, lo, hi| {
                let (mut n, mut b) = (0, 0);
                for kv in tbl
                    .range::<&[u8; 16]>(&kv_key(s, lo)..=&kv_key(s, hi))
                    .expect("range")
                {
                    let (_k, v) = kv.expect("read");
                    n += 1;
                    b += v.value().len() - 8;
                }
                (n, b)
            },
            |s0, s1| {
                let (mut n, mut b) = (0, 0);
                for kv in tbl
                    .range::<&[u8; 16]>(&kv_key(s0, i64::MIN)..&kv_key(s1, i64::MIN))
                    .expect("range")
                {
                    let (_k, v) = kv.expect("scan");
                    n += 1;
                    b += v.value().len();
                }
                std::hint::black_box(b);
                n
            },
        );
    }

    let cut = p.retention_cut();
    let t = Instant::now();
    let before;
    let after;
    {
        let tx = db.begin_write().expect("begin");
        {
            let mut tbl = tx.open_table(T).expect("table");
            before = tbl.len().expect("len");
            tbl.retain(|_k, v| value_max_t(v) >= cut).expect("retain");
            after = tbl.len().expect("len");
        }
        tx.commit().expect("commit");
    }
    out.put_dur("retention_s", t.elapsed());
    out.put("retention_deleted", before - after);
    out.put_disk("disk_after_retention", dir);
    std::thread::sleep(Duration::from_secs(2));
    out.put_disk("disk_after_retention_2s", dir);
    let t = Instant::now();
    let mut passes = 0;
    while db.compact().expect("compact") {
        passes += 1;
        if passes >= 20 {
            break;
        }
    }
    out.put_dur("retention_compact_s", t.elapsed());
    out.put("retention_compact_passes", passes);
    out.put_disk("disk_after_retention_compact", dir);
    {
        let rtx = db.begin_read().expect("read tx");
        out.put(
            "live_chunks_end",
            rtx.open_table(T).expect("table").len().expect("len"),
        );
    }
}

// ---------------------------------------------------------------- segment files
//
// Record: [series u64][min_t i64][max_t i64][len u32][crc32 u32][blob]   (32-byte header, LE)
// Footer: index entries [series u64][min_t i64][max_t i64][offset u64][len u32] (36 B each),
//         then trailer [index_off u64][count u64][file_min_t i64][file_max_t i64][magic u64].

const REC_HDR: usize = 32;
const IDX_ENT: usize = 36;
const TRAILER: usize = 40;
const MAGIC: u64 = 0x5345_4753_4547_3031; // "SEGSEG01"

#[derive(Clone, Copy)]
struct IdxEnt {
    series: u64,
    min_t: i64,
    max_t: i64,
    off: u64,
    len: u32, // record length incl. header
}

struct Segment {
    path: PathBuf,
    file: File,
    idx: Vec<IdxEnt>, // sorted by (series, min_t)
    min_t: i64,
    max_t: i64,
}

fn put_rec(buf: &mut Vec<u8>, series: u64, min_t: i64, max_t: i64, blob: &[u8]) {
    buf.extend_from_slice(&series.to_le_bytes());
    buf.extend_from_slice(&min_t.to_le_bytes());
    buf.extend_from_slice(&max_t.to_le_bytes());
    buf.extend_from_slice(&(blob.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(blob).to_le_bytes());
    buf.extend_from_slice(blob);
}

/// Parses records in `buf`, verifying CRCs. Returns (chunks, blob bytes).
fn parse_recs(buf: &[u8]) -> (usize, usize) {
    let mut pos = 0;
    let mut n = 0;
    let mut b = 0;
    while pos + REC_HDR <= buf.len() {
        let len = u32::from_le_bytes(buf[pos + 24..pos + 28].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(buf[pos + 28..pos + 32].try_into().unwrap());
        let blob = &buf[pos + REC_HDR..pos + REC_HDR + len];
        assert_eq!(crc32fast::hash(blob), crc, "crc mismatch");
        n += 1;
        b += len;
        pos += REC_HDR + len;
    }
    (n, b)
}

struct SegWriter {
    w: BufWriter<File>,
    path: PathBuf,
    off: u64,
    idx: Vec<IdxEnt>,
    rec: Vec<u8>,
    min_t: i64,
    max_t: i64,
}

impl SegWriter {
    fn create(path: PathBuf) -> Self {
        let f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .expect("create segment");
        SegWriter {
            w: BufWriter::with_capacity(1 << 20, f),
            path,
            off: 0,
            idx: vec![],
            rec: Vec::with_capacity(512),
            min_t: i64::MAX,
            max_t: i64::MIN,
        }
    }
    /// Records must be appended in (series, min_t) order.
    fn append(&mut self, series: u64, min_t: i64, max_t: i64, blob: &[u8]) {
        self.rec.clear();
        put_rec(&mut self.rec, series, min_t, max_t, blob);
        self.w.write_all(&self.rec).expect("write");
        self.idx.push(IdxEnt {
            series,
            min_t,
            max_t,
            off: self.off,
            len: self.rec.len() as u32,
        });
        self.off += self.rec.len() as u64;
        self.min_t = self.min_t.min(min_t);
        self.max_t = self.max_t.max(max_t);
    }
    /// Writes the footer, fsyncs the file and its directory, returns the reopened segment.
    fn finish(mut self) -> Segment {
        let index_off = self.off;
        let mut ib = Vec::with_capacity(self.idx.len() * IDX_ENT + TRAILER);
        for e in &self.idx {
            ib.extend_from_slice(&e.series.to_le_bytes());
            ib.extend_from_slice(&e.min_t.to_le_bytes());
            ib.extend_from_slice(&e.max_t.to_le_bytes());
            ib.extend_from_slice(&e.off.to_le_bytes());
            ib.extend_from_slice(&e.len.to_le_bytes());
        }
        ib.extend_from_slice(&index_off.to_le_bytes());
        ib.extend_from_slice(&(self.idx.len() as u64).to_le_bytes());
        ib.extend_from_slice(&self.min_t.to_le_bytes());
        ib.extend_from_slice(&self.max_t.to_le_bytes());
        ib.extend_from_slice(&MAGIC.to_le_bytes());
        self.w.write_all(&ib).expect("write footer");
        let f = self.w.into_inner().expect("flush");
        f.sync_all().expect("fsync");
        sync_dir(self.path.parent().unwrap());
        let file = File::open(&self.path).expect("reopen");
        Segment {
            path: self.path,
            file,
            idx: self.idx,
            min_t: self.min_t,
            max_t: self.max_t,
        }
    }
}

fn sync_dir(dir: &Path) {
    File::open(dir).and_then(|d| d.sync_all()).expect("fsync dir");
}

impl Segment {
    /// Reload a segment from its footer (what the engine does on startup).
    fn open(path: &Path) -> Segment {
        let file = File::open(path).expect("open");
        let size = file.metadata().unwrap().len();
        let mut tr = [0u8; TRAILER];
        file.read_exact_at(&mut tr, size - TRAILER as u64)
            .expect("trailer");
        let rd = |i: usize| u64::from_le_bytes(tr[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(rd(4), MAGIC, "bad magic");
        let (index_off, count) = (rd(0), rd(1) as usize);
        let mut ib = vec![0u8; count * IDX_ENT];
        file.read_exact_at(&mut ib, index_off).expect("index");
        let idx = ib
            .chunks_exact(IDX_ENT)
            .map(|e| IdxEnt {
                series: u64::from_le_bytes(e[0..8].try_into().unwrap()),
                min_t: i64::from_le_bytes(e[8..16].try_into().unwrap()),
                max_t: i64::from_le_bytes(e[16..24].try_into().unwrap()),
                off: u64::from_le_bytes(e[24..32].try_into().unwrap()),
                len: u32::from_le_bytes(e[32..36].try_into().unwrap()),
            })
            .collect();
        Segment {
            path: path.to_path_buf(),
            file,
            idx,
            min_t: rd(2) as i64,
            max_t: rd(3) as i64,
        }
    }

    /// Index positions [a, b) of entries with (series, min_t) in [(s, lo), (s, hi)].
    fn find(&self, s: u64, lo: i64, hi: i64) -> (usize, usize) {
        let a = self.idx.partition_point(|e| (e.series, e.min_t) < (s, lo));
        let b = self.idx.partition_point(|e| (e.series, e.min_t) <= (s, hi));
        (a, b.max(a))
    }

    /// Reads entries [a, b) with one pread per contiguous run, verifying CRCs.
    fn read_range(&self, a: usize, b: usize, buf: &mut Vec<u8>) -> (usize, usize) {
        let (mut n, mut bytes) = (0, 0);
        let mut i = a;
        while i < b {
            let start = self.idx[i].off;
            let mut end = start + self.idx[i].len as u64;
            let mut j = i + 1;
            while j < b && self.idx[j].off == end {
                end += self.idx[j].len as u64;
                j += 1;
            }
            buf.resize((end - start) as usize, 0);
            self.file.read_exact_at(buf, start).expect("pread");
            let (n1, b1) = parse_recs(buf);
            n += n1;
            bytes += b1;
            i = j;
        }
        (n, bytes)
    }
}

fn seg_reads(out: &mut Out, dir: &Path, p: &Params, segs: &[Segment]) {
    let buf = std::cell::RefCell::new(Vec::with_capacity(1 << 16));
    read_phase(
        out,
        dir,
        p,
        |s, lo, hi| {
            let (mut n, mut b) = (0, 0);
            for seg in segs {
                if seg.max_t < lo || seg.min_t > hi {
                    continue; // file-level time pruning
                }
                let (x, y) = seg.find(s, lo, hi);
                let (n1, b1) = seg.read_range(x, y, &mut buf.borrow_mut());
                n += n1;
                b += b1;
            }
            (n, b)
        },
        |s0, s1| {
            let mut n = 0;
            for seg in segs {
                let a = seg.idx.partition_point(|e| e.series < s0);
                let b = seg.idx.partition_point(|e| e.series < s1);
                n += seg.read_range(a, b, &mut buf.borrow_mut()).0;
            }
            n
        },
    );
}

fn index_mem(segs: &[Segment]) -> usize {
    segs.iter()
        .map(|s| s.idx.capacity() * std::mem::size_of::<IdxEnt>())
        .sum()
}

fn seg_write_rounds(dir: &Path, p: Params, out: &mut Out) -> Vec<Segment> {
    let mut gen = Gen::new(p);
    let io0 = io_write_bytes();
    let mut write = Duration::ZERO;
    let mut raw = 0u64;
    let mut segs = vec![];
    for r in 0..p.rounds {
        let chunks = gen.round(r);
        let t = Instant::now();
        let mut w = SegWriter::create(dir.join(format!("round-{r:06}.seg")));
        for c in &chunks {
            raw += c.blob.len() as u64;
            w.append(c.series, c.min_t, c.max_t, &c.blob);
        }
        segs.push(w.finish());
        write += t.elapsed();
    }
    out.put("raw_bytes", raw);
    out.put_dur("write_s", write);
    if let (Some(a), Some(b)) = (io0, io_write_bytes()) {
        out.put("io_written_during_write", b - a);
    }
    out.put_disk("disk_after_write", dir);
    out.put("index_mem_bytes", index_mem(&segs));
    segs
}

fn bench_segment(dir: &Path, p: Params, out: &mut Out) {
    let segs = seg_write_rounds(dir, p, out);
    out.put("settle_s", 0);
    out.put_disk("disk_after_settle", dir);

    // reload from footers, as on startup
    let paths: Vec<PathBuf> = segs.iter().map(|s| s.path.clone()).collect();
    drop(segs);
    let t = Instant::now();
    let segs: Vec<Segment> = paths.iter().map(|p| Segment::open(p)).collect();
    out.put_dur("reopen_s", t.elapsed());

    seg_reads(out, dir, &p, &segs);

    // retention: rounds are time-ordered, so expired data = whole files whose max_t < cut
    let cut = p.retention_cut();
    let t = Instant::now();
    let mut deleted = 0u64;
    let mut keep = vec![];
    for s in segs {
        if s.max_t < cut {
            deleted += s.idx.len() as u64;
            fs::remove_file(&s.path).expect("rm");
        } else {
            keep.push(s);
        }
    }
    sync_dir(dir);
    out.put_dur("retention_s", t.elapsed());
    out.put("retention_deleted", deleted);
    out.put_disk("disk_after_retention", dir);
    out.put_disk("disk_after_retention_2s", dir);
    out.put("retention_compact_s", 0);
    out.put_disk("disk_after_retention_compact", dir);
    out.put("live_chunks_end", keep.iter().map(|s| s.idx.len()).sum::<usize>());
    drop(keep);
}

/// Rewrites `segs` (only entries accepted by `keep`) into one series-major file.
fn seg_compact(segs: &[Segment], path: PathBuf, keep: impl Fn(&IdxEnt) -> bool) -> Segment {
    let mut w = SegWriter::create(path);
    let mut cursors = vec![0usize; segs.len()];
    let mut buf = Vec::with_capacity(512);
    // k-way merge by (series, min_t); every input is sorted by (series, min_t)
    loop {
        let mut best: Option<(usize, (u64, i64))> = None;
        for (i, seg) in segs.iter().enumerate() {
            if let Some(e) = seg.idx.get(cursors[i]) {
                let k = (e.series, e.min_t);
                if best.map_or(true, |(_, bk)| k < bk) {
                    best = Some((i, k));
                }
            }
        }
        let Some((i, _)) = best else { break };
        let e = segs[i].idx[cursors[i]];
        cursors[i] += 1;
        if !keep(&e) {
            continue;
        }
        buf.resize(e.len as usize, 0);
        segs[i].file.read_exact_at(&mut buf, e.off).expect("pread");
        let blob = &buf[REC_HDR..];
        let crc = u32::from_le_bytes(buf[28..32].try_into().unwrap());
        assert_eq!(crc32fast::hash(blob), crc);
        w.append(e.series, e.min_t, e.max_t, blob);
    }
    w.finish()
}

fn bench_segment_compacted(dir: &Path, p: Params, out: &mut Out) {
    let segs = seg_write_rounds(dir, p, out);
    // compaction: all rounds -> one series-major file, then drop the round files
    let t = Instant::now();
    let c = seg_compact(&segs, dir.join("compacted-000.seg"), |_| true);
    for s in &segs {
        fs::remove_file(&s.path).expect("rm");
    }
    sync_dir(dir);
    drop(segs);
    out.put_dur("settle_s", t.elapsed());
    out.put_disk("disk_after_settle", dir);
    out.put("index_mem_bytes", index_mem(std::slice::from_ref(&c)));
    let path = c.path.clone();
    drop(c);
    let t = Instant::now();
    let c = Segment::open(&path);
    out.put_dur("reopen_s", t.elapsed());
    let segs = vec![c];

    seg_reads(out, dir, &p, &segs);

    // retention on a single all-time file: the file must be rewritten without expired chunks
    // (an engine would avoid this by compacting into time-bounded blocks aligned with retention).
    let cut = p.retention_cut();
    let t = Instant::now();
    let before = segs[0].idx.len();
    let n = seg_compact(&segs, dir.join("compacted-001.seg"), |e| e.max_t >= cut);
    fs::remove_file(&segs[0].path).expect("rm");
    sync_dir(dir);
    out.put_dur("retention_s", t.elapsed());
    out.put("retention_deleted", before - n.idx.len());
    out.put(
        "retention_note",
        "single compacted file rewritten (copy surviving half, fsync, unlink old)",
    );
    out.put("live_chunks_end", n.idx.len());
    out.put_disk("disk_after_retention", dir);
    out.put_disk("disk_after_retention_2s", dir);
    out.put("retention_compact_s", 0);
    out.put_disk("disk_after_retention_compact", dir);
}

// ---------------------------------------------------------------- driver

struct Args {
    series: u64,
    rounds: u64,
    dir: PathBuf,
    backend: Option<String>,
    only: Option<Vec<String>>,
}

fn parse_args() -> Args {
    let mut a = Args {
        series: 100_000,
        rounds: 10,
        dir: PathBuf::from("/var/tmp/storage-compare-data"),
        backend: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--series" => a.series = val().parse().expect("--series N"),
            "--chunks-per-series" => a.rounds = val().parse().expect("--chunks-per-series M"),
            "--dir" => a.dir = PathBuf::from(val()),
            "--backend" => a.backend = Some(val()),
            "--only" => a.only = Some(val().split(',').map(String::from).collect()),
            "-h" | "--help" => {
                println!(
                    "storage-compare [--series N] [--chunks-per-series M] [--dir DIR] [--only fjall,fjall-gc0,redb,redb-32m,segment,segment-compacted,baseline]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn run_child(a: &Args, backend: &str) {
    let p = Params {
        series: a.series,
        rounds: a.rounds,
    };
    let dir = a.dir.join(backend);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("mkdir");
    let mut out = Out::new();
    eprintln!("[{backend}] series={} chunks/series={}", p.series, p.rounds);
    let t = Instant::now();
    match backend {
        "fjall" => bench_fjall(&dir, p, &mut out, true),
        "fjall-gc0" => bench_fjall(&dir, p, &mut out, false),
        "redb" => bench_redb(&dir, p, &mut out, None),
        "redb-32m" => bench_redb(&dir, p, &mut out, Some(32 << 20)),
        "segment" => bench_segment(&dir, p, &mut out),
        "baseline" => {
            // workload generator only: the RSS floor shared by every backend
            let mut gen = Gen::new(p);
            let mut raw = 0u64;
            for r in 0..p.rounds {
                raw += gen.round(r).iter().map(|c| c.blob.len() as u64).sum::<u64>();
            }
            out.put("raw_bytes", raw);
        }
        "segment-compacted" => bench_segment_compacted(&dir, p, &mut out),
        other => panic!("unknown backend {other}"),
    }
    out.put_dur("total_s", t.elapsed());
    out.put("peak_rss_bytes", proc_status("VmHWM"));
    out.emit();
    let _ = fs::remove_dir_all(&dir);
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn fmt_mb(b: f64) -> String {
    format!("{:.1} MB", b / 1e6)
}

fn fmt_dur(s: f64) -> String {
    if s == 0.0 {
        "0".to_string()
    } else if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn main() {
    let a = parse_args();
    if let Some(b) = &a.backend {
        run_child(&a, b);
        return;
    }
    fs::create_dir_all(&a.dir).expect("mkdir data dir");
    let exe = std::env::current_exe().expect("current exe");
    let backends: Vec<String> = a
        .only
        .clone()
        .unwrap_or_else(|| BACKENDS.iter().map(|s| s.to_string()).collect());
    let mut results: Vec<(String, BTreeMap<String, String>)> = vec![];
    for b in &backends {
        let o = Command::new(&exe)
            .args(["--backend", b, "--series", &a.series.to_string()])
            .args(["--chunks-per-series", &a.rounds.to_string()])
            .arg("--dir")
            .arg(&a.dir)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("spawn child");
        assert!(o.status.success(), "backend {b} failed: {:?}", o.status);
        let mut m = BTreeMap::new();
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(kv) = line.strip_prefix("RESULT ") {
                if let Some((k, v)) = kv.split_once('=') {
                    m.insert(k.to_string(), v.to_string());
                }
            }
        }
        results.push((b.clone(), m));
    }

    let _ = fs::remove_dir(&a.dir); // only succeeds if the children left it empty
    let chunks = a.series * a.rounds;
    println!();
    println!(
        "workload: {} series x {} chunks = {} chunks, blobs 120..=220 random bytes, 1 durable commit per round of {} chunks",
        a.series, a.rounds, chunks, a.series
    );
    println!();
    println!("disk columns: apparent size (`du -b`) / allocated blocks (`du`), per chunk or total, overhead vs raw blob bytes");
    println!();
    println!("| backend | write chunks/s | write MB/s | disk after write, B/chunk | after settle (compaction), B/chunk [time] | retention: delete+sync time | disk right after retention | after retention + compaction [time] | read p50 / p99 per series, cold-ish | warm | scan 1k series cold / warm | chunks live at end (expected {}) | peak RSS MiB | crates (normal deps) |", chunks - chunks / 2);
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (b, m) in &results {
        let f = |k: &str| m.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
        if b == "baseline" {
            println!(
                "| baseline (workload generator only, no storage) | | | | | | | | | | | | {:.0} | |",
                f("peak_rss_bytes") / 1048576.0
            );
            continue;
        }
        let raw = f("raw_bytes");
        let ws = f("write_s");
        let n = chunks as f64;
        let per_chunk = |k: &str| {
            let (d, al) = (f(k), f(&format!("{k}_alloc")));
            format!(
                "{:.0} / {:.0} ({:+.0}% / {:+.0}%)",
                d / n,
                al / n,
                (d / raw - 1.0) * 100.0,
                (al / raw - 1.0) * 100.0
            )
        };
        let total = |k: &str| {
            let (d, al) = (f(k), f(&format!("{k}_alloc")));
            format!("{} / {} ({:.0}% of raw)", fmt_mb(d), fmt_mb(al), al / raw * 100.0)
        };
        let deps = match b.as_str() {
            "fjall" | "fjall-gc0" => "44 (fjall, lsm-tree, value-log, ...)",
            "redb" | "redb-32m" => "2 (redb, libc)",
            _ => "2 (crc32fast, cfg-if)",
        };
        println!(
            "| {b} | {} | {:.1} | {} | {} [{}] | {} | {} | {} [{}] | {} / {} | {} / {} | {} / {} | {} | {:.0} | {deps} |",
            fmt_rate(n / ws),
            raw / ws / 1e6,
            per_chunk("disk_after_write"),
            per_chunk("disk_after_settle"),
            fmt_dur(f("settle_s")),
            fmt_dur(f("retention_s")),
            total("disk_after_retention"),
            total("disk_after_retention_compact"),
            fmt_dur(f("retention_compact_s")),
            fmt_dur(f("cold_read_p50_s")),
            fmt_dur(f("cold_read_p99_s")),
            fmt_dur(f("warm_read_p50_s")),
            fmt_dur(f("warm_read_p99_s")),
            fmt_dur(f("cold_scan_s")),
            fmt_dur(f("warm_scan_s")),
            m.get("live_chunks_end").map(String::as_str).unwrap_or("?"),
            f("peak_rss_bytes") / 1048576.0,
        );
    }
    println!();
    println!("details (seconds / bytes):");
    for (b, m) in &results {
        println!("- {b}:");
        for (k, v) in m {
            println!("    {k} = {v}");
        }
    }
}
