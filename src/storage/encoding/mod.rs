//! The sample encoding of on-disk blocks: smaller than the head's Gorilla chunks because it
//! can look at a whole run of samples before choosing.
//!
//! - Timestamps: the first, then delta-of-deltas, as zigzag varints (regular scrapes give a run
//!   of zeros).
//! - Values: when every value of the run is a decimal with at most 15 digits after the point
//!   that converts back bit-exactly (`m / 10^e` is the nearest double, as IEEE division
//!   guarantees), the integers `m` are stored as first or second differences (whichever is
//!   smaller), as zigzag varints; counters and gauges with few decimals become small integers.
//!   Other runs (NaN, ±Inf, staleness markers, -0.0, values with long fractions) keep the
//!   exact bits as Gorilla XOR (`chunk.rs`).
//! - The whole is compressed with zstd, which removes the repetition varints leave.
//!
//! The idea is VictoriaMetrics's (decimal mantissas, deltas, zstd); the numbers that justify it
//! are in docs/storage.md and docs/benchmarks.md.

pub(crate) mod chunk;

use crate::model::Sample;
use chunk::Chunk;
use std::io;

const ZSTD_LEVEL: i32 = 3;
/// Exact powers of ten as doubles (every one up to 1e22 is exact).
const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];
const MAX_MANTISSA: f64 = 9_007_199_254_740_992.0; // 2^53

const VALUES_DECIMAL_DELTA: u8 = 1;
const VALUES_DECIMAL_DELTA2: u8 = 2;
const VALUES_XOR: u8 = 3;

pub(super) use crate::varint::{put_varint, unzigzag, zigzag};

pub(super) struct Reader<'a>(pub &'a [u8]);

/// The timestamp column as it is decoded: the first timestamp, then delta-of-deltas (the
/// second one's delta-of-delta is its delta, since the delta before it counts as 0).
#[derive(Default)]
struct Times {
    started: bool,
    t: i64,
    delta: i64,
}

impl Times {
    fn next(&mut self, v: i64) -> i64 {
        if self.started {
            self.delta = self.delta.wrapping_add(v);
            self.t = self.t.wrapping_add(self.delta);
        } else {
            self.started = true;
            self.t = v;
        }
        self.t
    }
}

impl Reader<'_> {
    #[inline]
    pub fn varint(&mut self) -> io::Result<u64> {
        crate::varint::take_varint(&mut self.0).ok_or_else(short)
    }

    fn byte(&mut self) -> io::Result<u8> {
        let (&b, rest) = self.0.split_first().ok_or_else(short)?;
        self.0 = rest;
        Ok(b)
    }
}

fn short() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "encoded samples cut short")
}

/// The smallest exponent with which every value is an exact decimal, and the mantissas.
fn decimals(values: &[f64]) -> Option<(u8, Vec<i64>)> {
    let mut exp = 0usize;
    for &v in values {
        if !v.is_finite() || (v == 0.0 && v.is_sign_negative()) {
            return None;
        }
        while exp < POW10.len() {
            let m = (v * POW10[exp]).round();
            if m.abs() < MAX_MANTISSA && (m / POW10[exp]).to_bits() == v.to_bits() {
                break;
            }
            exp += 1;
        }
        if exp == POW10.len() {
            return None;
        }
    }
    let mut mantissas = Vec::with_capacity(values.len());
    for &v in values {
        let m = (v * POW10[exp]).round();
        if m.abs() >= MAX_MANTISSA || (m / POW10[exp]).to_bits() != v.to_bits() {
            return None;
        }
        mantissas.push(m as i64);
    }
    Some((exp as u8, mantissas))
}

fn differences(values: &[i64]) -> Vec<i64> {
    let mut out = Vec::with_capacity(values.len());
    let mut prev = 0i64;
    for &v in values {
        out.push(v.wrapping_sub(prev));
        prev = v;
    }
    out
}

fn varints_len(values: &[i64]) -> usize {
    values
        .iter()
        .map(|&v| (64 - zigzag(v).leading_zeros() as usize).max(1).div_ceil(7))
        .sum()
}

/// Encodes samples (sorted by time, at least one).
pub fn encode(samples: &[Sample]) -> Vec<u8> {
    let times: Vec<i64> = samples.iter().map(|s| s.t).collect();
    let values: Vec<f64> = samples.iter().map(|s| s.v).collect();
    encode_columns(&times, &[values])
}

/// Decodes what [`encode`] wrote.
pub fn decode(bytes: &[u8]) -> io::Result<Vec<Sample>> {
    let (times, values) = decode_one_column(bytes)?;
    Ok(times
        .into_iter()
        .zip(values)
        .map(|(t, v)| Sample { t, v })
        .collect())
}

/// Appends the samples in `[start, end]` of what [`encode`] wrote to `out` and returns how many
/// the run holds. Values are decoded only up to the last sample kept, and nothing is copied
/// first; on an error, `out` may hold part of the run.
pub fn decode_range_into(
    bytes: &[u8],
    start: i64,
    end: i64,
    out: &mut Vec<Sample>,
) -> io::Result<usize> {
    let decompressed;
    let raw: &[u8] = match bytes.split_first() {
        Some((&FRAME_ZSTD, frame)) => {
            decompressed = decompress(frame)?;
            &decompressed
        }
        Some((&FRAME_RAW, raw)) => raw,
        _ => return Err(short()),
    };
    let mut r = Reader(raw);
    let count = usize::try_from(r.varint()?).map_err(|_| short())?;
    if count > raw.len() || r.varint()? != 1 {
        return Err(short());
    }
    // Timestamps: the kept ones are `lo..hi`, pushed with their values still to come.
    let base = out.len();
    let (mut lo, mut hi) = (0, 0);
    let mut times_of = Times::default();
    for i in 0..count {
        let t = times_of.next(unzigzag(r.varint()?));
        if t >= start && t <= end {
            if hi == lo {
                lo = i;
            } else if i != hi {
                // Not sorted (never written so): keep the general path's filter.
                out.truncate(base);
                let (times, values) = decode_one_column(bytes)?;
                out.extend(
                    times
                        .into_iter()
                        .zip(values)
                        .filter(|&(t, _)| t >= start && t <= end)
                        .map(|(t, v)| Sample { t, v }),
                );
                return Ok(count);
            }
            hi = i + 1;
            out.push(Sample { t, v: 0.0 });
        }
    }
    if hi == lo {
        return Ok(count);
    }
    let kept = &mut out[base..];
    match r.byte()? {
        mode @ (VALUES_DECIMAL_DELTA | VALUES_DECIMAL_DELTA2) => {
            let scale = *POW10.get(usize::from(r.byte()?)).ok_or_else(short)?;
            let (mut m, mut d) = (0i64, 0i64);
            for i in 0..hi {
                let x = unzigzag(r.varint()?);
                if mode == VALUES_DECIMAL_DELTA2 {
                    d = d.wrapping_add(x);
                    m = m.wrapping_add(d);
                } else {
                    m = m.wrapping_add(x);
                }
                if i >= lo {
                    kept[i - lo].v = m as f64 / scale;
                }
            }
        }
        VALUES_XOR => {
            let len = usize::try_from(r.varint()?).map_err(|_| short())?;
            let bits = r.0.get(..len).ok_or_else(short)?;
            let chunk = Chunk::from_parts(0, 0, count as u32, bits.to_vec());
            let values = chunk.decode();
            if values.len() != count {
                return Err(short());
            }
            for (slot, s) in kept.iter_mut().zip(&values[lo..hi]) {
                slot.v = s.v;
            }
        }
        _ => return Err(short()),
    }
    Ok(count)
}

/// The timestamps and the one value column of what [`encode`] wrote.
fn decode_one_column(bytes: &[u8]) -> io::Result<(Vec<i64>, Vec<f64>)> {
    let (times, mut columns) = decode_columns(bytes)?;
    let values = columns
        .pop()
        .filter(|_| columns.is_empty())
        .ok_or_else(short)?;
    Ok((times, values))
}

/// Encodes samples without compressing them, for a container that compresses many runs
/// together (run files version 3).
pub fn encode_uncompressed(samples: &[Sample]) -> Vec<u8> {
    let times: Vec<i64> = samples.iter().map(|s| s.t).collect();
    let values: Vec<f64> = samples.iter().map(|s| s.v).collect();
    encode_columns_with(&times, &[values], false)
}

/// Encodes timestamps (sorted) and value columns of the same length in one compressed frame.
pub fn encode_columns(times: &[i64], columns: &[Vec<f64>]) -> Vec<u8> {
    encode_columns_with(times, columns, true)
}

/// [`encode_columns`], compressed with zstd only when `compress` (and it comes out smaller).
pub fn encode_columns_with(times: &[i64], columns: &[Vec<f64>], compress: bool) -> Vec<u8> {
    let mut raw = Vec::with_capacity(times.len() * (1 + 2 * columns.len()));
    put_varint(&mut raw, times.len() as u64);
    put_varint(&mut raw, columns.len() as u64);
    let (mut prev_t, mut prev_delta) = (0i64, 0i64);
    for (i, &t) in times.iter().enumerate() {
        let delta = t.wrapping_sub(prev_t);
        let v = match i {
            0 => t,
            1 => delta,
            _ => delta.wrapping_sub(prev_delta),
        };
        put_varint(&mut raw, zigzag(v));
        prev_t = t;
        prev_delta = delta;
    }
    for values in columns {
        match decimals(values) {
            Some((exp, mantissas)) => {
                let first = differences(&mantissas);
                let second = differences(&first);
                let (mode, stream) = if varints_len(&second) < varints_len(&first) {
                    (VALUES_DECIMAL_DELTA2, second)
                } else {
                    (VALUES_DECIMAL_DELTA, first)
                };
                raw.push(mode);
                raw.push(exp);
                for v in stream {
                    put_varint(&mut raw, zigzag(v));
                }
            }
            None => {
                raw.push(VALUES_XOR);
                let samples: Vec<Sample> = times
                    .iter()
                    .zip(values)
                    .map(|(&t, &v)| Sample { t, v })
                    .collect();
                let chunk = Chunk::encode(&samples);
                put_varint(&mut raw, chunk.bytes().len() as u64);
                raw.extend_from_slice(chunk.bytes());
            }
        }
    }
    // Short streams often come out larger from zstd (its frame costs about a dozen bytes):
    // keep whichever is smaller, behind a one-byte marker.
    let compressed = if compress { self::compress(&raw) } else { None };
    let mut out = Vec::with_capacity(raw.len() + 1);
    match compressed {
        Some(c) if c.len() < raw.len() => {
            out.push(FRAME_ZSTD);
            out.extend_from_slice(&c);
        }
        _ => {
            out.push(FRAME_RAW);
            out.extend_from_slice(&raw);
        }
    }
    out
}

const FRAME_RAW: u8 = 0;
const FRAME_ZSTD: u8 = 1;

/// One zstd compressor and decompressor per thread: creating contexts per call costs more than
/// compressing a short run.
struct Zstd(
    zstd::bulk::Compressor<'static>,
    zstd::bulk::Decompressor<'static>,
);

thread_local! {
    static ZSTD: std::cell::RefCell<Zstd> = std::cell::RefCell::new(Zstd(
        zstd::bulk::Compressor::new(ZSTD_LEVEL).unwrap_or_else(|_| zstd::bulk::Compressor::default()),
        zstd::bulk::Decompressor::new().unwrap_or_else(|_| zstd::bulk::Decompressor::default()),
    ));
}

/// `raw` as one zstd frame (level 3), with the thread's compressor.
pub(super) fn compress(raw: &[u8]) -> Option<Vec<u8>> {
    ZSTD.with(|z| z.borrow_mut().0.compress(raw).ok())
}

/// What [`compress`] wrote, if its frame says it holds exactly `size` bytes (checked
/// before anything is allocated).
pub(super) fn decompress_exact(bytes: &[u8], size: usize) -> io::Result<Vec<u8>> {
    let claimed = zstd::zstd_safe::get_frame_content_size(bytes)
        .ok()
        .flatten()
        .ok_or_else(short)?;
    if claimed != size as u64 || size > 64 << 20 {
        return Err(short());
    }
    ZSTD.with(|z| z.borrow_mut().1.decompress(bytes, size))
}

/// What [`compress`] wrote (at most 64 MiB).
fn decompress(bytes: &[u8]) -> io::Result<Vec<u8>> {
    // The frame says how large it is; refuse absurd sizes instead of allocating them.
    let size = zstd::zstd_safe::get_frame_content_size(bytes)
        .ok()
        .flatten()
        .ok_or_else(short)?;
    if size > 64 << 20 {
        return Err(short());
    }
    ZSTD.with(|z| z.borrow_mut().1.decompress(bytes, size as usize))
}

/// Decodes what [`encode_columns`] wrote: the timestamps and the value columns.
pub fn decode_columns(bytes: &[u8]) -> io::Result<(Vec<i64>, Vec<Vec<f64>>)> {
    let raw = match bytes.split_first() {
        Some((&FRAME_ZSTD, frame)) => decompress(frame)?,
        Some((&FRAME_RAW, raw)) => raw.to_vec(),
        _ => return Err(short()),
    };
    let mut r = Reader(&raw);
    let count = usize::try_from(r.varint()?).map_err(|_| short())?;
    let width = usize::try_from(r.varint()?).map_err(|_| short())?;
    if count > raw.len() || width > 64 {
        return Err(short());
    }
    let mut times = Vec::with_capacity(count);
    let mut times_of = Times::default();
    for _ in 0..count {
        times.push(times_of.next(unzigzag(r.varint()?)));
    }
    let mut columns = Vec::with_capacity(width);
    for _ in 0..width {
        let mode = r.byte()?;
        let values: Vec<f64> = match mode {
            VALUES_DECIMAL_DELTA | VALUES_DECIMAL_DELTA2 => {
                let exp = usize::from(r.byte()?);
                let scale = *POW10.get(exp).ok_or_else(short)?;
                let mut stream = Vec::with_capacity(count);
                for _ in 0..count {
                    stream.push(unzigzag(r.varint()?));
                }
                let integrate = |s: &mut Vec<i64>| {
                    let mut acc = 0i64;
                    for v in s.iter_mut() {
                        acc = acc.wrapping_add(*v);
                        *v = acc;
                    }
                };
                if mode == VALUES_DECIMAL_DELTA2 {
                    integrate(&mut stream);
                }
                integrate(&mut stream);
                stream.iter().map(|&m| m as f64 / scale).collect()
            }
            VALUES_XOR => {
                let len = usize::try_from(r.varint()?).map_err(|_| short())?;
                if len > r.0.len() {
                    return Err(short());
                }
                let (bits, rest) = r.0.split_at(len);
                r.0 = rest;
                let chunk = Chunk::from_parts(0, 0, count as u32, bits.to_vec());
                chunk.decode().into_iter().map(|s| s.v).collect()
            }
            _ => return Err(short()),
        };
        if values.len() != count {
            return Err(short());
        }
        columns.push(values);
    }
    Ok((times, columns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::STALE_NAN_BITS;

    fn round_trip(samples: &[Sample]) -> usize {
        let bytes = encode(samples);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.len(), samples.len());
        for (a, b) in samples.iter().zip(&back) {
            assert_eq!(a.t, b.t);
            assert_eq!(a.v.to_bits(), b.v.to_bits(), "{} vs {}", a.v, b.v);
        }
        bytes.len()
    }

    fn series(f: impl Fn(i64) -> f64) -> Vec<Sample> {
        (0..720)
            .map(|i| Sample {
                t: 1_700_000_000_000 + i * 15_000 + (i * 7 % 3),
                v: f(i),
            })
            .collect()
    }

    #[test]
    fn every_value_comes_back_bit_exact() {
        round_trip(&series(|i| (i * 37 % 11) as f64));
        round_trip(&series(|i| (i as f64) * 0.1));
        round_trip(&series(|i| 63.27 + (i % 13) as f64 / 100.0));
        round_trip(&series(|i| 1e15 + i as f64));
        round_trip(&series(|i| -(i as f64) * 1.5e-7));
        round_trip(&series(|i| (i as f64).sqrt()));
        round_trip(&series(|i| if i == 3 { f64::NAN } else { 1.0 }));
        round_trip(&series(|i| {
            if i == 5 {
                f64::from_bits(STALE_NAN_BITS)
            } else {
                2.0
            }
        }));
        round_trip(&series(|i| if i % 2 == 0 { -0.0 } else { 0.0 }));
        round_trip(&series(|i| if i == 9 { f64::INFINITY } else { 1e300 }));
        round_trip(&[Sample {
            t: i64::MIN,
            v: f64::MAX,
        }]);
        round_trip(&[
            Sample { t: -5, v: 0.3 },
            Sample {
                t: i64::MAX,
                v: 0.1 + 0.2,
            },
        ]);
    }

    #[test]
    fn a_range_decodes_to_the_filtered_run_bit_exact() {
        let families: Vec<Vec<Sample>> = vec![
            series(|i| (i * 1000 + i * 7 % 13) as f64), // second differences
            series(|i| 63.27 + (i % 13) as f64 / 100.0), // first differences
            series(|i| (i as f64).sqrt()),              // XOR
            series(|i| if i == 3 { f64::NAN } else { 1.0 }),
            // Not sorted: never written so, but decoded as the filter would.
            [5_000, 1_000, 3_000, 2_000, 9_000]
                .iter()
                .map(|&t| Sample { t, v: t as f64 })
                .collect(),
        ];
        for samples in &families {
            let (first, last) = (samples[0].t, samples[samples.len() - 1].t);
            let mut ranges = vec![
                (i64::MIN, i64::MAX),
                (i64::MIN, first - 1),
                (last + 1, i64::MAX),
                (first, first),
                (last, last),
                (1_000, 3_000),
            ];
            for k in [1, 100, 357, 719] {
                if let Some(s) = samples.get(k) {
                    ranges.push((s.t, s.t));
                    ranges.push((s.t - 1, s.t + 60_000));
                    ranges.push((first + 1, s.t));
                }
            }
            for bytes in [encode(samples), encode_uncompressed(samples)] {
                for &(start, end) in &ranges {
                    let mut out = vec![Sample { t: -1, v: -1.0 }];
                    let count = decode_range_into(&bytes, start, end, &mut out).unwrap();
                    assert_eq!(count, samples.len());
                    let want: Vec<(i64, u64)> = std::iter::once((-1, (-1.0f64).to_bits()))
                        .chain(
                            samples
                                .iter()
                                .filter(|s| s.t >= start && s.t <= end)
                                .map(|s| (s.t, s.v.to_bits())),
                        )
                        .collect();
                    let got: Vec<(i64, u64)> = out.iter().map(|s| (s.t, s.v.to_bits())).collect();
                    assert_eq!(got, want, "[{start}, {end}]");
                }
            }
        }
        let bytes = encode_uncompressed(&families[0]);
        for cut in [0, 1, 3, bytes.len() / 2, bytes.len() - 1] {
            let mut out = Vec::new();
            assert!(decode_range_into(&bytes[..cut], i64::MIN, i64::MAX, &mut out).is_err());
        }
    }

    #[test]
    fn regular_counters_and_gauges_take_about_a_byte_a_sample() {
        let counter = round_trip(&series(|i| (i * 1000 + i * 7 % 13) as f64));
        let gauge = round_trip(&series(|i| {
            ((50.0 + 30.0 * (i as f64 / 17.0).sin()) * 100.0).round() / 100.0
        }));
        let gorilla_counter = Chunk::encode(&series(|i| (i * 1000 + i * 7 % 13) as f64)).size();
        assert!(
            counter * 3 < gorilla_counter,
            "{counter} vs Gorilla {gorilla_counter}"
        );
        assert!(counter < 720, "counter: {counter} bytes for 720 samples");
        assert!(gauge < 2 * 720, "gauge: {gauge} bytes for 720 samples");
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let bytes = encode(&series(|i| i as f64));
        for cut in [0, 1, bytes.len() / 2] {
            assert!(decode(&bytes[..cut]).is_err());
        }
        let raw = [0x05u8, 0x01, 0x00];
        let mut fake = vec![FRAME_ZSTD];
        fake.extend(zstd::bulk::compress(&raw, 1).unwrap());
        assert!(decode(&fake).is_err());
        assert!(decode(&[FRAME_RAW, 0x05, 0x01]).is_err());
        assert!(decode(&[7, 1, 2]).is_err());
    }
}
