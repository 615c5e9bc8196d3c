//! Each block's series index (`blocks/<id>/index`): the label set and tenant of every series
//! the block holds, and per tenant its label names, the values of each name and the postings
//! (series ids) of each pair. It lets the head forget series that stopped receiving samples
//! (their labels live on here) and lets a read find a block's series without the head.
//!
//! The file is a run file (`runfile/`, version 3: checksummed frames of zstd-compressed runs,
//! an index sorted by key, recovery of a damaged file), keyed two ways:
//!
//! ```text
//! key < 2^63 (a series id): str tenant | varint n | (str name | str value){n}
//! key = 2^63 | xxh3(kind, tenant, name, value) >> 1: tables, each
//!     u8 kind | str tenant | str name | str value | varint len | bytes
//!   (several when their keys collide), where bytes are, by kind:
//!     1 names of a tenant:            varint n | str{n}, sorted
//!     4 every series of a tenant:     ids
//!     5 every series of the block (tenant and name empty): varint n |
//!                                      (u64 le fingerprint | varint id){n}, by fingerprint
//!     6 pieces of a (tenant, name):    varint n | str{n}, the first value of each piece
//!     7 piece k of a (tenant, name), value = k in decimal:
//!                                      varint m | (str value | varint len | ids){m},
//!                                      values sorted (len: the ids' bytes)
//!     8 layout (everything empty):     varint 2
//!   and in indexes written before the layout table (no kind 6, 7 or 8):
//!     2 values of a (tenant, name):    varint n | str{n}, sorted
//!     3 postings of (tenant, name, value): ids
//! ids = varint n | varint id delta{n}, ascending
//! str = varint len | UTF-8 bytes
//! ```
//!
//! A label's postings lie in pieces of at most [`PIECE_BYTES`] (a value with more series
//! makes a piece of its own), in value order: an equality matcher reads the directory and one
//! piece, a regex every piece of its label (skipping the ids of values it refuses), and the
//! values of a label are read from them too. A table for every pair, as indexes were written
//! before, cost each pair its table header and its entry in the run file's index: in the
//! steady benchmark's blocks (100,000 series, 64,000 `instance` values) the postings and
//! values tables took 2.41 MB compressed and their entries about 0.6 MB of a 6.13 MB index;
//! the pieces take about 0.25 MB.
//!
//! Memory holds the run file's page positions and the block's (fingerprint, id) table, 16
//! bytes a series: a series that comes back after the head forgot it is found there and keeps
//! its id. Everything else is read from the file when a query needs it.

use super::codec::{put_varint, Reader};
use super::runfile::{damaged, RunFile, RunWriter};
use crate::model::{Label, Labels, MatchOp, Matcher, PackedLabels};
use crate::varint::varint_len;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub(super) const FILE_NAME: &str = "index";

/// Keys at or above this are tables; below, series ids.
const TABLE: u64 = 1 << 63;

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Names = 1,
    Values = 2,
    Postings = 3,
    All = 4,
    Fingerprints = 5,
    Pieces = 6,
    Piece = 7,
    Layout = 8,
}

/// How an index lays out its postings (the layout table says which).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// A values table per label and a postings table per pair (indexes written before the
    /// layout table; [`write`] writes them only for tests).
    Pairs,
    /// A label's values and their postings together, in pieces ([`PIECE_BYTES`]).
    Pieces,
}

/// A series' run is about a hundred bytes of labels, read when a query needs a series the
/// head forgot, a returning series is looked up or blocks are merged: frames of up to this
/// many runs take about half the bytes frames of 16 runs did (the steady benchmark's
/// 100,000 series: 2.35 MB in frames of 16, 1.28 MB of 64, 0.97 MB of 256, which would make
/// a sparse read decompress and cache 16 times as much).
const SERIES_PER_FRAME: usize = 64;

/// The layout table's number for [`Layout::Pieces`].
const LAYOUT_PIECES: u64 = 2;

/// A piece of a label's postings holds at most this many bytes (a value with more series
/// makes a piece of its own): an equality matcher decompresses one piece.
const PIECE_BYTES: usize = 16 << 10;

fn table_key(kind: Kind, tenant: &str, name: &str, value: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&[kind as u8]);
    for part in [tenant, name, value] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    TABLE | (h.digest() >> 1)
}

/// The 64-bit fingerprint of a tenant's series, for the block's lookup table.
pub(super) fn fingerprint(tenant: &str, fingerprint: u128) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(tenant.len() as u64).to_le_bytes());
    h.update(tenant.as_bytes());
    h.update(&fingerprint.to_le_bytes());
    h.digest()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn take_str<'a>(r: &mut Reader<'a>) -> io::Result<&'a str> {
    std::str::from_utf8(take_str_bytes(r)?).map_err(|_| damaged("string not UTF-8".into()))
}

/// `varint len | bytes`: the bytes.
fn take_str_bytes<'a>(r: &mut Reader<'a>) -> io::Result<&'a [u8]> {
    let len = usize::try_from(r.varint()?).map_err(|_| damaged("bad string".into()))?;
    if r.0.len() < len {
        return Err(damaged("string cut short".into()));
    }
    let (s, rest) = r.0.split_at(len);
    r.0 = rest;
    Ok(s)
}

fn count(r: &mut Reader) -> io::Result<usize> {
    // Every item takes at least a byte: a count beyond what is left is damage, not an
    // allocation to make.
    let n = usize::try_from(r.varint()?).map_err(|_| damaged("bad count".into()))?;
    if n > r.0.len() {
        return Err(damaged("count beyond the table".into()));
    }
    Ok(n)
}

fn take_ids(r: &mut Reader) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    take_ids_into(r, &mut out)?;
    Ok(out)
}

/// [`take_ids`] into `out` (cleared first), for a caller that reads many lists in turn.
fn take_ids_into(r: &mut Reader, out: &mut Vec<u64>) -> io::Result<()> {
    let n = count(r)?;
    out.clear();
    out.reserve(n);
    let mut last = 0u64;
    for _ in 0..n {
        last = last
            .checked_add(r.varint()?)
            .ok_or_else(|| damaged("bad id".into()))?;
        out.push(last);
    }
    Ok(())
}

fn put_strs<'a>(out: &mut Vec<u8>, items: impl ExactSizeIterator<Item = &'a str>) {
    put_varint(out, items.len() as u64);
    for s in items {
        put_str(out, s);
    }
}

fn take_strs(bytes: &[u8]) -> io::Result<Vec<String>> {
    let mut r = Reader(bytes);
    let n = count(&mut r)?;
    (0..n)
        .map(|_| take_str(&mut r).map(str::to_owned))
        .collect()
}

/// One tenant's part while writing: name → value → ids (ascending, as series come in id
/// order).
type TenantPostings<'a> = BTreeMap<&'a str, BTreeMap<&'a str, Posting>>;

/// (id, tenant, labels) of a series, as flushes and compactions hand them to [`write`]:
/// packed, so a block of many series costs a flush no more memory than the head's own sets.
pub(super) type SeriesLabels = (u64, Arc<str>, PackedLabels);

/// The order a block writes its series in: by tenant, then by the packed label set's bytes
/// (series with the same first label, usually the metric name, lie together), then by id.
pub(super) fn label_order(a: &SeriesLabels, b: &SeriesLabels) -> std::cmp::Ordering {
    (&*a.1, a.2.as_bytes(), a.0).cmp(&(&*b.1, b.2.as_bytes(), b.0))
}

/// Writes the index of a block's series, their runs in the order given (the block's other
/// files' order, [`label_order`] or ids), so the labels of one metric's series share frames.
/// Each run: the tenant, the label count, then the packed set as it is.
///
/// The tables follow, in (tenant, name, piece) order (a regex reads one label's pieces from
/// neighbouring frames), encoded before any is written (for the check of their keys: the
/// postings then take memory twice, a few bytes a series and label); were two of their
/// 64-bit keys to collide, the colliding ones share a run.
/// Postings are built already encoded (varint deltas), a byte or two an id.
pub(super) fn write(path: &Path, series: &[SeriesLabels]) -> io::Result<BlockIndex> {
    write_tables(path, series, Layout::Pieces, false)
}

/// [`write`] in `layout`, the tables gathered by key before they are written when `gather`
/// is set (or keys collide).
fn write_tables(
    path: &Path,
    series: &[SeriesLabels],
    layout: Layout,
    gather: bool,
) -> io::Result<BlockIndex> {
    let mut writer = RunWriter::create(path)?.with_runs_per_frame(SERIES_PER_FRAME);
    writer.reserve(series.len());
    let mut tenants: BTreeMap<&str, (TenantPostings, Posting)> = BTreeMap::new();
    let mut fingerprints = Vec::with_capacity(series.len());
    let mut run = Vec::new();
    for (id, tenant, labels) in series {
        if *id >= TABLE {
            return Err(damaged(format!("series id {id} out of range")));
        }
        run.clear();
        put_str(&mut run, tenant);
        put_varint(&mut run, labels.len() as u64);
        run.extend_from_slice(labels.as_bytes());
        writer.add(*id, 0, 0, &run)?;
    }
    // Postings and the per-tenant lists are by id.
    let mut by_id: Vec<&SeriesLabels> = series.iter().collect();
    by_id.sort_unstable_by_key(|s| s.0);
    for (id, tenant, labels) in by_id {
        let (id, tenant) = (*id, &**tenant);
        let (postings, all) = tenants.entry(tenant).or_default();
        for (name, value) in labels.pairs() {
            postings
                .entry(name)
                .or_default()
                .entry(value)
                .or_default()
                .push(id);
        }
        all.push(id);
        fingerprints.push((fingerprint(tenant, labels.fingerprint()), id));
    }
    fingerprints.sort_unstable();
    // Every table, in writing order: (kind, tenant, name, value) and its bytes.
    let mut tables: Vec<Table> = Vec::new();
    // Each posting is dropped once encoded: postings are in memory once.
    for (tenant, (postings, all)) in tenants {
        let mut bytes = Vec::new();
        put_strs(&mut bytes, postings.keys().copied());
        tables.push((Kind::Names, tenant, "", "".into(), bytes));
        let mut bytes = Vec::new();
        all.encode(&mut bytes);
        tables.push((Kind::All, tenant, "", "".into(), bytes));
        for (name, values) in postings {
            match layout {
                Layout::Pairs => {
                    let mut bytes = Vec::new();
                    put_strs(&mut bytes, values.keys().copied());
                    tables.push((Kind::Values, tenant, name, "".into(), bytes));
                    for (value, posting) in values {
                        let mut bytes = Vec::new();
                        posting.encode(&mut bytes);
                        tables.push((Kind::Postings, tenant, name, value.into(), bytes));
                    }
                }
                Layout::Pieces => {
                    let pieces = pieces(values);
                    let mut bytes = Vec::new();
                    put_strs(&mut bytes, pieces.iter().map(|(first, _)| *first));
                    tables.push((Kind::Pieces, tenant, name, "".into(), bytes));
                    for (k, (_, bytes)) in pieces.into_iter().enumerate() {
                        tables.push((Kind::Piece, tenant, name, k.to_string().into(), bytes));
                    }
                }
            }
        }
    }
    if layout == Layout::Pieces {
        let mut bytes = Vec::new();
        put_varint(&mut bytes, LAYOUT_PIECES);
        tables.push((Kind::Layout, "", "", "".into(), bytes));
    }
    let mut bytes = Vec::new();
    put_varint(&mut bytes, fingerprints.len() as u64);
    for &(fp, id) in &fingerprints {
        bytes.extend_from_slice(&fp.to_le_bytes());
        put_varint(&mut bytes, id);
    }
    tables.push((Kind::Fingerprints, "", "", "".into(), bytes));
    let mut keys: Vec<u64> = tables
        .iter()
        .map(|(kind, t, n, v, _)| table_key(*kind, t, n, v))
        .collect();
    keys.sort_unstable();
    let collide = gather || keys.windows(2).any(|w| w[0] == w[1]);
    writer.reserve(keys.len());
    drop(keys);
    let mut gathered: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut entry = Vec::new();
    for (kind, tenant, name, value, bytes) in &tables {
        let key = table_key(*kind, tenant, name, value);
        let out = if collide {
            gathered.entry(key).or_default()
        } else {
            entry.clear();
            &mut entry
        };
        out.push(*kind as u8);
        put_str(out, tenant);
        put_str(out, name);
        put_str(out, value);
        put_varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
        if !collide {
            writer.add(key, 0, 0, &entry)?;
        }
    }
    for (key, payload) in &gathered {
        writer.add(*key, 0, 0, payload)?;
    }
    Ok(BlockIndex {
        file: Arc::new(writer.finish()?),
        fingerprints,
        layout: Some(layout),
    })
}

/// A table being written: (kind, tenant, name, value) and its bytes.
type Table<'a> = (Kind, &'a str, &'a str, Cow<'a, str>, Vec<u8>);

/// A label's values and postings cut into pieces of about [`PIECE_BYTES`], in value order:
/// (first value, `varint m | (str value | ids){m}`).
fn pieces<'a>(values: BTreeMap<&'a str, Posting>) -> Vec<(&'a str, Vec<u8>)> {
    let mut out = Vec::new();
    let (mut first, mut count, mut entries) = ("", 0u64, Vec::new());
    let mut entry = Vec::new();
    let mut close = |first: &'a str, count: &mut u64, entries: &mut Vec<u8>| {
        let mut bytes = Vec::with_capacity(entries.len() + 10);
        put_varint(&mut bytes, *count);
        bytes.append(entries);
        out.push((first, bytes));
        *count = 0;
    };
    for (value, posting) in values {
        entry.clear();
        posting.encode(&mut entry);
        let len = varint_len(value.len() as u64)
            + value.len()
            + varint_len(entry.len() as u64)
            + entry.len();
        // A value that would take the piece past its size starts the next one.
        if count > 0 && entries.len() + len > PIECE_BYTES {
            close(first, &mut count, &mut entries);
        }
        if count == 0 {
            first = value;
        }
        put_str(&mut entries, value);
        put_varint(&mut entries, entry.len() as u64);
        entries.extend_from_slice(&entry);
        count += 1;
    }
    if count > 0 {
        close(first, &mut count, &mut entries);
    }
    out
}

/// A postings list being written: ids pushed in ascending order, kept as the table holds
/// them (varint deltas after a count).
#[derive(Default)]
struct Posting {
    count: u64,
    last: u64,
    deltas: Vec<u8>,
}

impl Posting {
    fn push(&mut self, id: u64) {
        put_varint(&mut self.deltas, id - self.last);
        self.last = id;
        self.count += 1;
    }

    /// The table's bytes, as [`take_ids`] reads them.
    fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.count);
        out.extend_from_slice(&self.deltas);
    }
}

/// (id, tenant, labels) of series read from an index, and the damaged runs skipped.
pub(super) type SeriesRead = (Vec<(u64, String, Labels)>, usize);

/// A block's series index, open for reading.
pub(super) struct BlockIndex {
    pub(super) file: Arc<RunFile>,
    /// (fingerprint of tenant and labels, id), sorted.
    fingerprints: Vec<(u64, u64)>,
    /// None when the layout table is unreadable: the postings are then answered from the
    /// series.
    layout: Option<Layout>,
}

impl BlockIndex {
    /// Opens an index file: (index, damaged bytes recovered).
    pub fn open(path: &Path) -> io::Result<(BlockIndex, u64)> {
        let opened = RunFile::open(path, |_| Some((0, 0)))?;
        let mut index = BlockIndex {
            file: Arc::new(opened.file),
            fingerprints: Vec::new(),
            layout: None,
        };
        let layout = index.table(Kind::Layout, "", "", "");
        let fingerprints = index.read_fingerprints();
        index.layout = match layout {
            // No layout table: an index written before pieces, if the fingerprint table
            // (written after it) is there; else a file cut short by recovery, whose tables
            // cannot all be there.
            Ok(None) if fingerprints.is_ok() => Some(Layout::Pairs),
            Ok(Some(bytes)) if Reader(&bytes).varint().ok() == Some(LAYOUT_PIECES) => {
                Some(Layout::Pieces)
            }
            Ok(_) => {
                tracing::warn!(file = %path.display(), "series index: layout unknown; matching the series");
                None
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "series index: layout table unreadable; matching the series");
                None
            }
        };
        match fingerprints {
            Ok(fingerprints) => index.fingerprints = fingerprints,
            Err(e) => {
                // Derived data: rebuilt from the series' runs (a damaged one is left out).
                tracing::warn!(file = %path.display(), error = %e, "series index: fingerprint table unreadable; rebuilt from the series");
                let (series, _) = index.scan()?;
                index.fingerprints = series
                    .iter()
                    .map(|(id, tenant, labels)| (fingerprint(tenant, labels.fingerprint()), *id))
                    .collect();
                index.fingerprints.sort_unstable();
            }
        }
        Ok((index, opened.damaged_bytes))
    }

    fn read_fingerprints(&self) -> io::Result<Vec<(u64, u64)>> {
        let bytes = self
            .table(Kind::Fingerprints, "", "", "")?
            .ok_or_else(|| damaged("no fingerprint table".into()))?;
        let mut r = Reader(&bytes);
        let n = count(&mut r)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if r.0.len() < 8 {
                return Err(damaged("fingerprint table cut short".into()));
            }
            let (fp, rest) = r.0.split_at(8);
            r.0 = rest;
            let fp = u64::from_le_bytes(fp.try_into().expect("8 bytes"));
            out.push((fp, r.varint()?));
        }
        Ok(out)
    }

    /// Every series whose run reads, and the number of damaged runs skipped: what a damaged
    /// table falls back on.
    fn scan(&self) -> io::Result<SeriesRead> {
        let ids: Vec<u64> = self
            .file
            .all_entries()?
            .iter()
            .map(|e| e.series)
            .filter(|&id| id < TABLE)
            .collect();
        self.labels(&ids)
    }

    pub fn size(&self) -> u64 {
        self.file.size()
    }

    /// Every series id of the block, in no order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.fingerprints.iter().map(|&(_, id)| id)
    }

    fn table(
        &self,
        kind: Kind,
        tenant: &str,
        name: &str,
        value: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        let key = table_key(kind, tenant, name, value);
        let Some(entry) = self.file.lookup(&[key])?.pop() else {
            return Ok(None);
        };
        let mut reader = self.file.reader();
        let payload = reader.read(&entry)?;
        let mut r = Reader(&payload);
        while !r.0.is_empty() {
            let k = *r.0.first().expect("not empty");
            r.0 = &r.0[1..];
            let (t, n, v) = (take_str(&mut r)?, take_str(&mut r)?, take_str(&mut r)?);
            let len = usize::try_from(r.varint()?).map_err(|_| damaged("bad table".into()))?;
            if r.0.len() < len {
                return Err(damaged("table cut short".into()));
            }
            let (bytes, rest) = r.0.split_at(len);
            if k == kind as u8 && (t, n, v) == (tenant, name, value) {
                return Ok(Some(bytes.to_vec()));
            }
            r.0 = rest;
        }
        Ok(None)
    }

    /// The label names of a tenant's series, sorted (from the series themselves when the
    /// table is damaged).
    pub fn names(&self, tenant: &str) -> io::Result<Vec<String>> {
        self.table(Kind::Names, tenant, "", "")
            .and_then(|t| t.map_or(Ok(Vec::new()), |b| take_strs(&b)))
            .or_else(|e| {
                self.answer_from_series(e, tenant, |l, out| {
                    out.extend(l.iter().map(|l| l.name.clone()))
                })
            })
    }

    /// The values of a label among a tenant's series, sorted (from the series themselves when
    /// the table is damaged); `stopped` is asked before each piece.
    pub fn values(
        &self,
        tenant: &str,
        name: &str,
        stopped: &dyn Fn() -> io::Result<()>,
    ) -> io::Result<Vec<String>> {
        stopped()?;
        let read = || match self.layout()? {
            Layout::Pairs => self
                .table(Kind::Values, tenant, name, "")
                .and_then(|t| t.map_or(Ok(Vec::new()), |b| take_strs(&b))),
            Layout::Pieces => {
                let mut out = Vec::new();
                self.each_value(tenant, name, stopped, &mut |value, _| {
                    out.push(value.to_owned());
                    Ok(())
                })?;
                Ok(out)
            }
        };
        read().or_else(|e| {
            self.answer_from_series(e, tenant, |l, out| {
                out.extend(l.get(name).map(str::to_owned))
            })
        })
    }

    /// Calls `visit` with each value of a label, ascending, as it is read: no copy of each.
    /// An error is returned as it is (after some values, perhaps): the caller answers from
    /// [`BlockIndex::values`] then, which reads the block's series when a table is damaged.
    pub fn each_value_of(
        &self,
        tenant: &str,
        name: &str,
        stopped: &dyn Fn() -> io::Result<()>,
        visit: &mut dyn FnMut(&str),
    ) -> io::Result<()> {
        stopped()?;
        match self.layout()? {
            Layout::Pairs => {
                let values = self
                    .table(Kind::Values, tenant, name, "")?
                    .map_or(Ok(Vec::new()), |b| take_strs(&b))?;
                values.iter().for_each(|v| visit(v));
                Ok(())
            }
            Layout::Pieces => self.each_value(tenant, name, stopped, &mut |value, _| {
                visit(value);
                Ok(())
            }),
        }
    }

    fn layout(&self) -> io::Result<Layout> {
        self.layout
            .ok_or_else(|| damaged("series index: layout table unreadable".into()))
    }

    /// The first value of each piece of a label's postings (none when no series has it).
    fn directory(&self, tenant: &str, name: &str) -> io::Result<Vec<String>> {
        self.table(Kind::Pieces, tenant, name, "")?
            .map_or(Ok(Vec::new()), |b| take_strs(&b))
    }

    /// Piece `k` of a label's postings, which its directory names.
    fn piece(&self, tenant: &str, name: &str, k: usize) -> io::Result<Vec<u8>> {
        self.table(Kind::Piece, tenant, name, &k.to_string())?
            .ok_or_else(|| damaged(format!("series index: piece {k} of {name} missing")))
    }

    /// Calls `visit` with every value of a label, in order, and the bytes of its ids;
    /// `stopped` is asked before each piece.
    fn each_value(
        &self,
        tenant: &str,
        name: &str,
        stopped: &dyn Fn() -> io::Result<()>,
        visit: &mut dyn FnMut(&str, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        for k in 0..self.directory(tenant, name)?.len() {
            stopped()?;
            let bytes = self.piece(tenant, name, k)?;
            let mut r = Reader(&bytes);
            for _ in 0..count(&mut r)? {
                let value = take_str(&mut r)?;
                visit(value, take_str_bytes(&mut r)?)?;
            }
        }
        Ok(())
    }

    /// What `pick` takes from each of a tenant's series, sorted and distinct: the answer of a
    /// damaged table, logged (`error`).
    fn answer_from_series(
        &self,
        error: io::Error,
        tenant: &str,
        pick: impl Fn(&Labels, &mut Vec<String>),
    ) -> io::Result<Vec<String>> {
        if error.kind() == io::ErrorKind::Interrupted {
            return Err(error);
        }
        tracing::warn!(error = %error, "series index: a table is unreadable; answering from the series");
        let mut out = Vec::new();
        for (_, t, labels) in self.scan()?.0 {
            if t == tenant {
                pick(&labels, &mut out);
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn postings(&self, tenant: &str, name: &str, value: &str) -> io::Result<Vec<u64>> {
        match self.layout()? {
            Layout::Pairs => self
                .table(Kind::Postings, tenant, name, value)?
                .map_or(Ok(Vec::new()), |b| take_ids(&mut Reader(&b))),
            Layout::Pieces => {
                let firsts = self.directory(tenant, name)?;
                let k = firsts.partition_point(|first| first.as_str() <= value);
                if k == 0 {
                    return Ok(Vec::new());
                }
                let bytes = self.piece(tenant, name, k - 1)?;
                let mut r = Reader(&bytes);
                for _ in 0..count(&mut r)? {
                    let (v, ids) = (take_str(&mut r)?, take_str_bytes(&mut r)?);
                    if v == value {
                        return take_ids(&mut Reader(ids));
                    }
                }
                Ok(Vec::new())
            }
        }
    }

    /// Hands `each` the postings of every value of a label that `keep` accepts, from its
    /// pieces ([`Layout::Pieces`]; the older layout reads its values and then each pair).
    fn postings_of(
        &self,
        tenant: &str,
        name: &str,
        keep: &dyn Fn(&str) -> bool,
        each: &mut dyn FnMut(&[u64]),
        stopped: &dyn Fn() -> io::Result<()>,
    ) -> io::Result<()> {
        // One buffer for every value's ids.
        let mut buffer = Vec::new();
        self.each_value(tenant, name, stopped, &mut |value, ids| {
            if keep(value) {
                take_ids_into(&mut Reader(ids), &mut buffer)?;
                each(&buffer);
            }
            Ok(())
        })
    }

    /// The ids of a tenant's series that every matcher accepts, ascending, and the number of
    /// damaged series runs skipped when a damaged table made the series' own labels answer
    /// (their series are missing). Fails (with `Interrupted`) once `stop` is set: a regex
    /// over many values reads many postings.
    pub fn matching(
        &self,
        tenant: &str,
        matchers: &[Matcher],
        stop: &AtomicBool,
    ) -> io::Result<(Vec<u64>, usize)> {
        let stopped = || abandoned(stop);
        // An unreadable layout goes straight to the series (else each lookup would fail, some
        // after a scan of their own).
        let layout = self.layout();
        layout.and_then(|layout| postings_for_matchers(
            matchers,
            PostingsSource {
                all: &|| {
                    self.table(Kind::All, tenant, "", "")?
                        .map_or(Ok(Vec::new()), |b| take_ids(&mut Reader(&b)))
                },
                values: &|name| self.values(tenant, name, &stopped),
                postings: &|name, value| {
                    stopped()?;
                    self.postings(tenant, name, value)
                },
                postings_of: (layout == Layout::Pieces).then_some(
                    &|name, keep, each| self.postings_of(tenant, name, keep, each, &stopped),
                ),
                few: 0,
            },
        ))
        .map(|found| (found.ids, 0))
        .or_else(|e| {
            if e.kind() == io::ErrorKind::Interrupted {
                return Err(e);
            }
            // A damaged table: the series' own labels answer (derived data, rebuilt here).
            tracing::warn!(error = %e, "series index: a table is unreadable; matching the series");
            let (series, skipped) = self.scan()?;
            let ids = series
                .into_iter()
                .filter(|(_, t, labels)| t == tenant && crate::model::matches_all(matchers, labels))
                .map(|(id, _, _)| id)
                .collect();
            Ok((ids, skipped))
        })
    }

    /// (tenant, labels) of the given series (ascending), those the block holds, and the
    /// number of damaged runs skipped (logged).
    pub fn labels(&self, ids: &[u64]) -> io::Result<SeriesRead> {
        let (read, skipped) = self.read_series(ids, |tenant, n, mut r| {
            let mut labels = Vec::with_capacity(n);
            for _ in 0..n {
                let name = take_str(&mut r)?;
                labels.push(Label::new(name, take_str(&mut r)?));
            }
            Ok((tenant.to_owned(), Labels::from_trusted(labels)))
        })?;
        let read = read.into_iter().map(|(id, (t, l))| (id, t, l)).collect();
        Ok((read, skipped))
    }

    /// [`BlockIndex::labels`] packed, for writing another index: no allocation a label, and
    /// a tenant's name shared by its series.
    pub fn packed_labels(&self, ids: &[u64]) -> io::Result<(Vec<SeriesLabels>, usize)> {
        let mut last_tenant: Option<Arc<str>> = None;
        let (read, skipped) = self.read_series(ids, |tenant, n, r| {
            let labels =
                PackedLabels::from_bytes(r.0, n).ok_or_else(|| damaged("bad label set".into()))?;
            let shared = match &last_tenant {
                Some(t) if &**t == tenant => t.clone(),
                _ => last_tenant.insert(Arc::from(tenant)).clone(),
            };
            Ok((shared, labels))
        })?;
        let read = read.into_iter().map(|(id, (t, l))| (id, t, l)).collect();
        Ok((read, skipped))
    }

    /// The series runs of `ids` (those the block holds), ascending, each made into a `T` by `parse`
    /// from its tenant, label count and the label pairs' bytes; damaged runs are skipped
    /// (logged) and counted.
    fn read_series<T>(
        &self,
        ids: &[u64],
        mut parse: impl FnMut(&str, usize, Reader) -> io::Result<T>,
    ) -> io::Result<(Vec<(u64, T)>, usize)> {
        let mut reader = self.file.reader();
        let (mut out, mut skipped) = (Vec::new(), 0);
        for entry in self.file.lookup_in_file_order(ids)? {
            let read = reader.read(&entry).and_then(|payload| {
                let mut r = Reader(&payload);
                let tenant = take_str(&mut r)?;
                let n = count(&mut r)?;
                parse(tenant, n, r)
            });
            match read {
                Ok(t) => out.push((entry.series, t)),
                Err(e) => {
                    tracing::error!(error = %e, series = entry.series, "series index: skipping a damaged run");
                    skipped += 1;
                }
            }
        }
        // Read in file order (by labels), answered by id.
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok((out, skipped))
    }

    /// The id this block gives a tenant's series (`fingerprint`: its labels'), if it holds
    /// it: the fingerprint table in memory says whether it may, its labels on disk whether it
    /// does.
    pub fn find(
        &self,
        tenant: &str,
        fingerprint_: u128,
        labels: &Labels,
    ) -> io::Result<Option<u64>> {
        let fp = fingerprint(tenant, fingerprint_);
        let from = self.fingerprints.partition_point(|&(f, _)| f < fp);
        let mut candidates: Vec<u64> = self.fingerprints[from..]
            .iter()
            .take_while(|&&(f, _)| f == fp)
            .map(|&(_, id)| id)
            .collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        candidates.sort_unstable();
        // A candidate whose run is damaged cannot be this series' home any more: its labels
        // answer no query.
        Ok(self
            .labels(&candidates)?
            .0
            .into_iter()
            .find(|(_, t, l)| t == tenant && l == labels)
            .map(|(id, _, _)| id))
    }
}

/// What [`postings_for_matchers`] reads from an index.
pub(super) struct PostingsSource<'a> {
    /// Every series id, ascending.
    pub all: &'a dyn Fn() -> io::Result<Vec<u64>>,
    /// The values a label takes.
    pub values: &'a dyn Fn(&str) -> io::Result<Vec<String>>,
    /// The series ids with a label pair, ascending.
    pub postings: &'a dyn Fn(&str, &str) -> io::Result<Vec<u64>>,
    /// When the source reads a label's values with their postings: hands the callback the
    /// postings of every value of a label the filter accepts (else `values` and `postings`).
    #[allow(clippy::type_complexity)]
    pub postings_of:
        Option<&'a dyn Fn(&str, &dyn Fn(&str) -> bool, &mut dyn FnMut(&[u64])) -> io::Result<()>>,
    /// When the matchers applied so far (equality first) leave at most this many series and
    /// others remain, those series are the answer, for the caller to check every matcher on
    /// their label sets: the head holds them in memory, where that costs less than reading the
    /// postings of every value a regex accepts. 0: never (a block's label sets are on disk).
    pub few: usize,
}

/// Fails with `Interrupted` once `stop` is set: the check a long read of an index makes
/// between tables.
pub(super) fn abandoned(stop: &AtomicBool) -> io::Result<()> {
    if stop.load(Ordering::Relaxed) {
        Err(io::Error::new(io::ErrorKind::Interrupted, "read abandoned"))
    } else {
        Ok(())
    }
}

/// The series every matcher accepts, ascending, from postings alone (Prometheus's
/// `PostingsForMatchers`): an equality matcher reads its pair's postings; any other matcher
/// runs over the label's values, not over series. A matcher that accepts the empty value
/// (`!=`, `!~`, or one that also matches a missing label) takes away the series whose value it
/// refuses, from the others' result or from every series when no matcher selects by value.
///
/// Equality matchers go first, so a regex beside a metric name reads each matching value's
/// postings only to keep what the name's series already selected: a label's values have
/// disjoint postings, so the union is a concatenation of small parts, sorted once.
pub(super) fn postings_for_matchers(
    matchers: &[Matcher],
    source: PostingsSource,
) -> io::Result<Candidates> {
    // 0: selects one pair's postings; 1: selects by values; 2: refuses by values.
    let kind = |m: &Matcher| match &m.op {
        MatchOp::Equal(value) if !value.is_empty() => 0,
        _ if !m.matches_empty() => 1,
        _ => 2,
    };
    let mut ordered: Vec<&Matcher> = matchers.iter().collect();
    ordered.sort_by_key(|m| kind(m));
    // The postings of a label's values that `keep` accepts, within `within` if given.
    let union_of =
        |name: &str, keep: &dyn Fn(&str) -> bool, within: Option<&[u64]>| -> io::Result<Vec<u64>> {
            let mut out = Vec::new();
            let mut within = within.map(IdFilter::new);
            let mut add = |ids: &[u64]| match &mut within {
                Some(within) => within.keep(ids, &mut out),
                None => out.extend_from_slice(ids),
            };
            match source.postings_of {
                Some(postings_of) => postings_of(name, keep, &mut add)?,
                None => {
                    for value in (source.values)(name)?.iter().filter(|v| keep(v)) {
                        add(&(source.postings)(name, value)?);
                    }
                }
            }
            out.sort_unstable();
            out.dedup();
            Ok(out)
        };
    let mut selected: Option<Vec<u64>> = None;
    let exact = |ids: Vec<u64>| Candidates { ids, exact: true };
    for m in ordered {
        if let Some(few) = selected.take_if(|ids| ids.len() <= source.few) {
            return Ok(Candidates {
                ids: few,
                exact: false,
            });
        }
        let next = match kind(m) {
            0 => {
                let MatchOp::Equal(value) = &m.op else {
                    unreachable!("kind 0 is an equality matcher")
                };
                let ids = (source.postings)(&m.name, value)?;
                match &selected {
                    None => ids,
                    Some(current) => intersect(current, &ids),
                }
            }
            1 => union_of(&m.name, &|v| m.matches_value(v), selected.as_deref())?,
            _ => {
                let current = match selected.take() {
                    Some(current) => current,
                    None => (source.all)()?,
                };
                let refused = union_of(&m.name, &|v| !m.matches_value(v), Some(&current))?;
                difference(&current, &refused)
            }
        };
        if next.is_empty() {
            return Ok(exact(next));
        }
        selected = Some(next);
    }
    match selected {
        Some(ids) => Ok(exact(ids)),
        None => (source.all)().map(exact),
    }
}

/// The ids of an ascending list, asked of many other lists (a regex's values within the
/// series an equality matcher selected): each list intersected with it, until the ids probed
/// pass twice the words a bitmap over its span would take; then that bitmap, one probe an id.
/// The bitmap is built only when it takes at most 64 bytes an id of the list (or 128 KiB),
/// and never more than 4 MiB.
struct IdFilter<'a> {
    within: &'a [u64],
    /// Words of the bitmap over `within`'s span, if one may be built.
    words: Option<usize>,
    probed: usize,
    /// (the first id, the bitmap from it).
    bits: Option<(u64, Vec<u64>)>,
}

impl<'a> IdFilter<'a> {
    fn new(within: &'a [u64]) -> IdFilter<'a> {
        let words = match (within.first(), within.last()) {
            (Some(&min), Some(&max)) => {
                let words = (max - min) / 64 + 1;
                let cap = (within.len() as u64 * 8).clamp(1 << 14, 1 << 19);
                (words <= cap).then_some(words as usize)
            }
            _ => None,
        };
        IdFilter {
            within,
            words,
            probed: 0,
            bits: None,
        }
    }

    /// Appends the ids of `ids` (ascending) that it holds to `out`.
    fn keep(&mut self, ids: &[u64], out: &mut Vec<u64>) {
        if self.bits.is_none() {
            self.probed += ids.len();
            match self.words {
                Some(words) if self.probed > 2 * words => {
                    let min = self.within[0];
                    let mut bits = vec![0u64; words];
                    for &id in self.within {
                        let at = id - min;
                        bits[(at / 64) as usize] |= 1 << (at % 64);
                    }
                    self.bits = Some((min, bits));
                }
                _ => return out.extend(intersect(self.within, ids)),
            }
        }
        let (min, words) = self.bits.as_ref().expect("built above");
        out.extend(ids.iter().copied().filter(|&id| {
            id.checked_sub(*min).is_some_and(|at| {
                words
                    .get((at / 64) as usize)
                    .is_some_and(|w| w & (1 << (at % 64)) != 0)
            })
        }));
    }
}

/// The series [`postings_for_matchers`] found, ascending.
pub(super) struct Candidates {
    pub ids: Vec<u64>,
    /// Every matcher was applied from postings: the ids are the answer. Otherwise they are a
    /// few candidates whose label sets the caller checks against every matcher.
    pub exact: bool,
}

/// Ids in both (ascending) lists: each id of the shorter searched for in the longer from where
/// the last one was found, galloping ([`gallop`]): about a step an id for lists of one size,
/// a few for a short list beside a long one.
pub(super) fn intersect(a: &[u64], b: &[u64]) -> Vec<u64> {
    let (short, mut long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let mut out = Vec::new();
    for &id in short {
        long = &long[gallop(long, id)..];
        match long.split_first() {
            Some((&first, rest)) if first == id => {
                out.push(id);
                long = rest;
            }
            Some(_) => {}
            None => break,
        }
    }
    out
}

/// The position of the first id at or above `id` in `ids` (ascending), searched for over
/// twice the distance covered so far (exponential search): cheap when it is near the start.
pub(super) fn gallop(ids: &[u64], id: u64) -> usize {
    let mut bound = 1;
    while bound < ids.len() && ids[bound - 1] < id {
        bound *= 2;
    }
    let bound = bound.min(ids.len());
    ids[..bound].partition_point(|&x| x < id)
}

/// Ids of `a` not in `b` (both ascending).
fn difference(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut j = 0;
    a.iter()
        .copied()
        .filter(|&id| {
            while j < b.len() && b[j] < id {
                j += 1;
            }
            b.get(j) != Some(&id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::matches_all;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_trusted(pairs.iter().map(|(n, v)| Label::new(*n, *v)).collect())
    }

    #[test]
    fn id_filters_keep_exactly_the_ids_they_hold() {
        let lists: Vec<Vec<u64>> = vec![
            vec![],
            vec![5],
            (0..5_000).map(|i| 1_000 + i * 7).collect(),
            // Spread too far for a bitmap: searched.
            vec![3, 1 << 40, u64::MAX - 1],
        ];
        let probes: Vec<u64> = (0..40_000)
            .chain([1 << 40, u64::MAX - 1, u64::MAX])
            .collect();
        for (within, bitmap) in lists.iter().zip([false, true, true, false]) {
            // In pieces: the first ones intersected, the rest probed in the bitmap if one
            // comes.
            let mut filter = IdFilter::new(within);
            let mut got = Vec::new();
            for piece in probes.chunks(700) {
                filter.keep(piece, &mut got);
            }
            let want: Vec<u64> = probes
                .iter()
                .copied()
                .filter(|id| within.contains(id))
                .collect();
            assert_eq!(got, want, "within {} ids", within.len());
            assert_eq!(filter.bits.is_some(), bitmap, "{} ids", within.len());
        }
    }

    #[test]
    fn intersections_of_lists_of_any_lengths_are_exact() {
        let evens: Vec<u64> = (0..2_000).map(|i| i * 2).collect();
        for short in [
            vec![],
            vec![0],
            vec![1, 3, 5],
            vec![2, 3, 4, 3_998, 3_999, 5_000],
            (0..50).map(|i| i * 37).collect::<Vec<u64>>(),
            (0..500).map(|i| i * 7).collect(),
            (0..3_000).collect(),
            (0..9_000).map(|i| i * 3).collect(),
        ] {
            let want: Vec<u64> = short
                .iter()
                .copied()
                .filter(|i| i % 2 == 0 && *i < 4_000)
                .collect();
            assert_eq!(intersect(&short, &evens), want, "{short:?}");
            assert_eq!(intersect(&evens, &short), want, "{short:?}");
        }
    }

    #[test]
    fn a_label_of_many_values_is_read_from_its_pieces() {
        // 30,000 series: `host` takes 20,000 values (one or two series each), `zone` one
        // value with most series (a piece of its own) and a few others around it.
        let dir = tempfile::tempdir().unwrap();
        let host = |i: u64| format!("h{:05}", i % 20_000);
        let zone = |i: u64| match i % 1_000 {
            0 => "a",
            1 => "z",
            _ => "m",
        };
        let rows: Vec<SeriesLabels> = (0..30_000u64)
            .map(|i| {
                let l = labels(&[("host", &host(i)), ("zone", zone(i))]);
                (i, Arc::from("t"), PackedLabels::from(&l))
            })
            .collect();
        let path = dir.path().join(FILE_NAME);
        write(&path, &rows).unwrap();
        let (index, _) = BlockIndex::open(&path).unwrap();
        assert_eq!(index.layout, Some(Layout::Pieces));
        let firsts = index.directory("t", "host").unwrap();
        assert!(firsts.len() > 4, "{} pieces", firsts.len());
        let stop = AtomicBool::new(false);
        let ids_of = |matchers: &[Matcher]| index.matching("t", matchers, &stop).unwrap().0;
        for value in firsts.iter().cloned().chain([
            host(0),
            host(19_999),
            host(12_345),
            "h".into(),
            "h20000".into(),
            "a".into(),
        ]) {
            let want: Vec<u64> = (0..30_000).filter(|&i| host(i) == value).collect();
            assert_eq!(ids_of(&[Matcher::equal("host", &value)]), want, "{value}");
        }
        let all_values: Vec<String> = (0..20_000).map(host).collect();
        assert_eq!(index.values("t", "host", &|| Ok(())).unwrap(), all_values);
        assert_eq!(
            index.values("t", "zone", &|| Ok(())).unwrap(),
            ["a", "m", "z"]
        );
        // `m`'s 29,940 ids take a piece of their own, between `a`'s and `z`'s.
        assert_eq!(index.directory("t", "zone").unwrap(), ["a", "m", "z"]);
        let m: Vec<u64> = (0..30_000).filter(|i| zone(*i) == "m").collect();
        assert_eq!(ids_of(&[Matcher::equal("zone", "m")]), m);
        let re = Matcher::regex("host", "h1234.|h0000.", false).unwrap();
        let want: Vec<u64> = (0..30_000)
            .filter(|&i| {
                let h = host(i);
                h.starts_with("h1234") || h.starts_with("h0000")
            })
            .collect();
        assert_eq!(ids_of(&[re]), want);
        let not_a = || Matcher::regex("zone", "a|z", true).unwrap();
        assert_eq!(
            ids_of(&[not_a(), Matcher::equal("host", host(7))]),
            [7, 20_007]
        );
        assert!(ids_of(&[not_a(), Matcher::equal("host", host(3_000))]).is_empty());
        let mut visited = Vec::new();
        index
            .each_value_of("t", "host", &|| Ok(()), &mut |v| visited.push(v.to_owned()))
            .unwrap();
        assert_eq!(visited, all_values);
        // Label values abandoned after the second piece: no further piece is read, and the
        // caller is told (not answered from the series, as a damaged table would be).
        let asked = std::cell::Cell::new(0);
        let stop_after_two = || {
            asked.set(asked.get() + 1);
            if asked.get() > 3 {
                Err(io::Error::new(io::ErrorKind::Interrupted, "read abandoned"))
            } else {
                Ok(())
            }
        };
        let err = index.values("t", "host", &stop_after_two).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert_eq!(
            asked.get(),
            4,
            "asked once before reading, then before each piece"
        );
        asked.set(0);
        let mut visited = 0;
        let err = index
            .each_value_of("t", "host", &stop_after_two, &mut |_| visited += 1)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert!(
            visited > 0 && visited < all_values.len() / 2,
            "{visited} values read of {}",
            all_values.len()
        );
        // An abandoned read stops between pieces.
        stop.store(true, Ordering::Relaxed);
        let err = index
            .matching("t", &[Matcher::regex("host", ".+", false).unwrap()], &stop)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn matchers_over_postings_select_what_matching_each_label_set_selects() {
        let dir = tempfile::tempdir().unwrap();
        let mut series = Vec::new();
        for i in 0..300u64 {
            let job = format!("job{}", i % 7);
            let pid = i.to_string();
            let mut pairs = vec![
                ("__name__", if i % 3 == 0 { "a" } else { "b" }),
                ("job", job.as_str()),
            ];
            // Unique label sets: series without `pid` have `seq`.
            pairs.push((if i % 5 != 0 { "pid" } else { "seq" }, pid.as_str()));
            pairs.sort();
            let tenant = if i % 11 == 0 { "other" } else { "t" };
            series.push((i * 2 + 1, tenant.to_owned(), labels(&pairs)));
        }
        let rows: Vec<SeriesLabels> = series
            .iter()
            .map(|(id, t, l)| (*id, Arc::from(t.as_str()), PackedLabels::from(l)))
            .collect();
        for (layout, gather) in [
            (Layout::Pieces, false),
            (Layout::Pieces, true),
            (Layout::Pairs, false),
        ] {
            // Tables written as they are encoded, gathered by key first (as when keys
            // collide), and as indexes were written before pieces.
            let path = dir.path().join(format!("{FILE_NAME}-{layout:?}-{gather}"));
            write_tables(&path, &rows, layout, gather).unwrap();
            let (index, damaged) = BlockIndex::open(&path).unwrap();
            assert_eq!(damaged, 0);
            let re =
                |name: &str, pattern: &str, negate| Matcher::regex(name, pattern, negate).unwrap();
            let not_equal = |name: &str, value: &str| Matcher {
                name: name.into(),
                op: MatchOp::NotEqual(value.into()),
            };
            let cases: Vec<Vec<Matcher>> = vec![
                vec![Matcher::equal("__name__", "a")],
                vec![
                    Matcher::equal("__name__", "a"),
                    Matcher::equal("job", "job3"),
                ],
                vec![re("job", "job[12]", false)],
                vec![re("job", "job[12]", true)],
                vec![Matcher::equal("pid", "")],
                vec![not_equal("pid", "")],
                vec![re("pid", "1.*|", false)],
                vec![re("pid", ".*", false), Matcher::equal("__name__", "b")],
                vec![not_equal("job", "job0"), re("pid", "2.*", true)],
                vec![Matcher::equal("job", "nope")],
                vec![],
            ];
            for matchers in &cases {
                for tenant in ["t", "other", "none"] {
                    let want: Vec<u64> = series
                        .iter()
                        .filter(|(_, t, l)| t == tenant && matches_all(matchers, l))
                        .map(|(id, _, _)| *id)
                        .collect();
                    assert_eq!(
                        index
                            .matching(tenant, matchers, &AtomicBool::new(false))
                            .unwrap()
                            .0,
                        want,
                        "{tenant} {matchers:?}"
                    );
                }
            }
            let jobs: Vec<String> = (0..7).map(|i| format!("job{i}")).collect();
            assert_eq!(index.values("t", "job", &|| Ok(())).unwrap(), jobs);
            assert_eq!(index.names("t").unwrap(), ["__name__", "job", "pid", "seq"]);
            assert!(index.names("none").unwrap().is_empty());
            for (id, tenant, l) in &series {
                assert_eq!(index.find(tenant, l.fingerprint(), l).unwrap(), Some(*id));
                // The same labels in the other tenant are another series.
                let other = if tenant == "t" { "other" } else { "t" };
                let want = series.iter().find(|(_, t, x)| t == other && x == l);
                assert_eq!(
                    index.find(other, l.fingerprint(), l).unwrap(),
                    want.map(|s| s.0)
                );
            }
            let got = index.labels(&[1, 3, 4, 599]).unwrap().0;
            assert_eq!(got.len(), 3);
            assert_eq!(got[1].2, series[1].2);
            let (packed, skipped) = index.packed_labels(&[1, 3, 4, 599]).unwrap();
            assert_eq!(skipped, 0);
            let unpacked: Vec<(u64, String, Labels)> = packed
                .iter()
                .map(|(id, t, l)| (*id, t.to_string(), l.to_labels()))
                .collect();
            assert_eq!(unpacked, got);
            assert_eq!(index.ids().count(), series.len());
        }
    }
}
