//! Gorilla-style compressed chunks, as Prometheus's `tsdb/chunkenc/xor.go`: timestamps as
//! delta-of-delta with variable-width buckets, values XOR-ed with the previous value storing
//! only the meaningful bits. Typical scrape data takes 1 to 2 bytes per sample.

use crate::model::Sample;

/// Appends bits, most significant first.
#[derive(Default, Clone, Debug)]
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte (0 = start a new byte).
    used: u8,
}

impl BitWriter {
    fn bit(&mut self, bit: bool) {
        if self.used == 0 {
            self.bytes.push(0);
        }
        if bit {
            let last = self.bytes.len() - 1;
            self.bytes[last] |= 1 << (7 - self.used);
        }
        self.used = (self.used + 1) % 8;
    }

    /// Appends the low `count` bits of `value`, a byte's worth at a time.
    fn bits(&mut self, value: u64, count: u8) {
        let mut remaining = u32::from(count);
        while remaining > 0 {
            if self.used == 0 {
                self.bytes.push(0);
            }
            let free = 8 - u32::from(self.used);
            let take = free.min(remaining);
            let part = ((value >> (remaining - take)) & ((1u64 << take) - 1)) as u8;
            if let Some(last) = self.bytes.last_mut() {
                *last |= part << (free - take);
            }
            self.used = ((u32::from(self.used) + take) % 8) as u8;
            remaining -= take;
        }
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Option<bool> {
        let byte = *self.bytes.get(self.position / 8)?;
        let bit = (byte >> (7 - (self.position % 8))) & 1 == 1;
        self.position += 1;
        Some(bit)
    }

    /// Reads `count` (at most 64) bits at once from a 128-bit window of the bytes they lie in.
    fn bits(&mut self, count: u8) -> Option<u64> {
        let count = u32::from(count.min(64));
        if count == 0 {
            return Some(0);
        }
        if self.position + count as usize > self.bytes.len() * 8 {
            return None;
        }
        let first = self.position / 8;
        let window = match self.bytes.get(first..first + 16) {
            Some(bytes) => u128::from_be_bytes(bytes.try_into().unwrap_or_default()),
            None => {
                // The last 15 bytes: padded with zeros past the end.
                let mut padded = [0u8; 16];
                let tail = &self.bytes[first..];
                padded[..tail.len()].copy_from_slice(tail);
                u128::from_be_bytes(padded)
            }
        };
        // At most 7 bits before and 64 taken: inside the window.
        let value = (window << (self.position % 8)) >> (128 - count);
        self.position += count as usize;
        Some(value as u64)
    }
}

/// Reads a `bits`-wide delta-of-delta the way xor.go writes it: the range is
/// `-(2^(bits-1) - 1) ..= 2^(bits-1)`, so only values above `2^(bits-1)` are negative.
fn signed(value: u64, bits: u8) -> i64 {
    if value > 1 << (bits - 1) {
        value as i64 - (1i64 << bits)
    } else {
        value as i64
    }
}

/// A closed, compressed run of samples of one series, sorted by time.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub min_t: i64,
    pub max_t: i64,
    pub count: u32,
    bytes: Vec<u8>,
}

/// A chunk being written: samples are appended one at a time (the head's open chunk), so
/// recent samples are compressed as they arrive.
#[derive(Clone, Debug, Default)]
pub struct Appender {
    w: BitWriter,
    count: u32,
    min_t: i64,
    prev_t: i64,
    prev_delta: i64,
    prev_v: u64,
    leading: u8,
    trailing: u8,
}

impl Appender {
    /// Appends a sample later than every sample appended before.
    pub fn append(&mut self, s: Sample) {
        let v = s.v.to_bits();
        let w = &mut self.w;
        if self.count == 0 {
            w.bits(s.t as u64, 64);
            w.bits(v, 64);
            self.min_t = s.t;
            self.leading = u8::MAX;
        } else {
            let delta = s.t.wrapping_sub(self.prev_t);
            let dod = delta.wrapping_sub(self.prev_delta);
            // Buckets of xor.go: 0 | 10+14 bits | 110+17 | 1110+20 | 1111+64.
            match dod {
                0 => w.bit(false),
                d if (-8191..=8192).contains(&d) => {
                    w.bits(0b10, 2);
                    w.bits(d as u64, 14);
                }
                d if (-65535..=65536).contains(&d) => {
                    w.bits(0b110, 3);
                    w.bits(d as u64, 17);
                }
                d if (-524287..=524288).contains(&d) => {
                    w.bits(0b1110, 4);
                    w.bits(d as u64, 20);
                }
                d => {
                    w.bits(0b1111, 4);
                    w.bits(d as u64, 64);
                }
            }
            self.prev_delta = delta;
            let xor = v ^ self.prev_v;
            if xor == 0 {
                w.bit(false);
            } else {
                w.bit(true);
                let lz = (xor.leading_zeros() as u8).min(31);
                let tz = xor.trailing_zeros() as u8;
                if self.leading != u8::MAX && lz >= self.leading && tz >= self.trailing {
                    w.bit(false);
                    w.bits(xor >> self.trailing, 64 - self.leading - self.trailing);
                } else {
                    self.leading = lz;
                    self.trailing = tz;
                    w.bit(true);
                    w.bits(u64::from(lz), 5);
                    let significant = 64 - lz - tz;
                    // 64 significant bits are written as 0 (6 bits cannot hold 64).
                    w.bits(u64::from(significant % 64), 6);
                    w.bits(xor >> tz, significant);
                }
            }
        }
        self.prev_t = s.t;
        self.prev_v = v;
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Asks the CPU to bring the line the next [`Appender::append`] writes into its cache
    /// (its own allocation, apart from the series': a writer judging many series' samples
    /// calls this for each, so the misses overlap instead of stalling its apply one by one).
    pub fn prefetch_tail(&self) {
        #[cfg(target_arch = "x86_64")]
        if let Some(last) = self.w.bytes.last() {
            // SAFETY: a prefetch is a hint; it never faults, even on an invalid address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    std::ptr::from_ref(last).cast(),
                )
            };
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The first and last sample times.
    pub fn min_t(&self) -> i64 {
        self.min_t
    }

    pub fn max_t(&self) -> i64 {
        self.prev_t
    }

    /// The last sample's value bits.
    pub fn last_bits(&self) -> u64 {
        self.prev_v
    }

    /// The samples appended so far.
    pub fn decode(&self) -> Vec<Sample> {
        decode_bits(&self.w.bytes, self.count)
    }

    /// Appends the samples in `[start, end]` to `out`.
    pub fn decode_range_into(&self, start: i64, end: i64, out: &mut Vec<Sample>) {
        decode_bits_into(&self.w.bytes, self.count, start, end, out);
    }

    /// Closes the chunk.
    pub fn finish(self) -> Chunk {
        let mut bytes = self.w.bytes;
        bytes.shrink_to_fit();
        Chunk {
            min_t: self.min_t,
            max_t: self.prev_t,
            count: self.count,
            bytes,
        }
    }

    /// An appender holding `samples` (sorted by time).
    pub fn of(samples: &[Sample]) -> Appender {
        let mut a = Appender::default();
        for &s in samples {
            a.append(s);
        }
        a
    }
}

impl Chunk {
    /// Encodes samples (sorted by time, at least one).
    pub fn encode(samples: &[Sample]) -> Chunk {
        Appender::of(samples).finish()
    }

    /// All samples of the chunk.
    pub fn decode(&self) -> Vec<Sample> {
        decode_bits(&self.bytes, self.count)
    }

    /// Appends the samples in `[start, end]` to `out`.
    pub fn decode_range_into(&self, start: i64, end: i64, out: &mut Vec<Sample>) {
        decode_bits_into(&self.bytes, self.count, start, end, out);
    }

    /// Compressed size in bytes.
    #[cfg(test)]
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// The encoded bit stream, for writing to disk.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A chunk read back from disk (its checksum already verified).
    pub fn from_parts(min_t: i64, max_t: i64, count: u32, bytes: Vec<u8>) -> Chunk {
        Chunk {
            min_t,
            max_t,
            count,
            bytes,
        }
    }
}

/// Decodes `count` samples from a Gorilla bit stream (damaged input gives wrong samples, never
/// a panic).
fn decode_bits(bytes: &[u8], count: u32) -> Vec<Sample> {
    let mut out = Vec::with_capacity(count as usize);
    decode_bits_into(bytes, count, i64::MIN, i64::MAX, &mut out);
    out
}

/// [`decode_bits`], appending only the samples in `[start, end]` to `out`.
fn decode_bits_into(bytes: &[u8], count: u32, start: i64, end: i64, out: &mut Vec<Sample>) {
    let mut r = BitReader { bytes, position: 0 };
    let (mut t, mut delta, mut v) = (0i64, 0i64, 0u64);
    let (mut leading, mut trailing) = (0u8, 0u8);
    for i in 0..count {
        if i == 0 {
            let (Some(t0), Some(v0)) = (r.bits(64), r.bits(64)) else {
                break;
            };
            t = t0 as i64;
            v = v0;
        } else {
            let dod = if !r.bit().unwrap_or(false) {
                0
            } else if !r.bit().unwrap_or(false) {
                signed(r.bits(14).unwrap_or(0), 14)
            } else if !r.bit().unwrap_or(false) {
                signed(r.bits(17).unwrap_or(0), 17)
            } else if !r.bit().unwrap_or(false) {
                signed(r.bits(20).unwrap_or(0), 20)
            } else {
                r.bits(64).unwrap_or(0) as i64
            };
            delta = if i == 1 { dod } else { delta.wrapping_add(dod) };
            t = t.wrapping_add(delta);
            if r.bit().unwrap_or(false) {
                if r.bit().unwrap_or(false) {
                    leading = r.bits(5).unwrap_or(0) as u8;
                    let significant = match r.bits(6).unwrap_or(0) as u8 {
                        0 => 64,
                        n => n,
                    };
                    // Damaged input can claim more than 64 bits: stop, never overflow.
                    let Some(t) = 64u8
                        .checked_sub(leading)
                        .and_then(|rest| rest.checked_sub(significant))
                    else {
                        break;
                    };
                    trailing = t;
                }
                let significant = 64 - leading - trailing;
                let bits = r.bits(significant).unwrap_or(0);
                v ^= bits << trailing;
            }
        }
        if t >= start && t <= end {
            out.push(Sample {
                t,
                v: f64::from_bits(v),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::STALE_NAN_BITS;

    fn round_trip(samples: &[Sample]) -> Chunk {
        let chunk = Chunk::encode(samples);
        let decoded = chunk.decode();
        assert_eq!(decoded.len(), samples.len());
        for (a, b) in decoded.iter().zip(samples) {
            assert_eq!((a.t, a.v.to_bits()), (b.t, b.v.to_bits()));
        }
        chunk
    }

    #[test]
    fn regular_scrapes_compress_to_about_a_byte_or_two() {
        let samples: Vec<Sample> = (0..120)
            .map(|i| Sample {
                t: 1_700_000_000_000 + i * 15_000 + (i % 3),
                v: 1000.0 + (i / 10) as f64,
            })
            .collect();
        let chunk = round_trip(&samples);
        assert!(
            chunk.size() < 120 * 3,
            "{} bytes for 120 samples",
            chunk.size()
        );
    }

    #[test]
    fn every_kind_of_value_and_gap_round_trips() {
        let values = [
            0.0,
            -0.0,
            1.5,
            f64::NAN,
            f64::from_bits(STALE_NAN_BITS),
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            f64::MAX,
            -123456.789,
            1e-300,
            42.0,
            42.0,
        ];
        let gaps = [
            1i64,
            15_000,
            15_001,
            8_000_000,
            -5,
            0,
            1 << 40,
            3,
            600_000,
            15_000,
            1,
            2,
            3,
        ];
        let mut t = -1_000_000i64;
        let samples: Vec<Sample> = values
            .iter()
            .zip(gaps)
            .map(|(&v, gap)| {
                t += gap.abs().max(1);
                Sample { t, v }
            })
            .collect();
        round_trip(&samples);
        round_trip(&samples[..1]);
        // A value whose XOR with the previous one has 64 significant bits.
        round_trip(&[
            Sample {
                t: 0,
                v: f64::from_bits(1),
            },
            Sample {
                t: 1,
                v: f64::from_bits(0x8000_0000_0000_0000),
            },
        ]);
    }

    #[test]
    fn bucket_edges_of_delta_of_delta_round_trip() {
        let mut samples = vec![Sample { t: 0, v: 1.0 }, Sample { t: 1000, v: 1.0 }];
        let mut delta = 1000i64;
        for dod in [
            8192, -8191, 8193, 65536, -65535, 65537, 524288, -524287, 524289, -8192, 0,
        ] {
            delta += dod;
            let t = samples.last().unwrap().t + delta;
            samples.push(Sample { t, v: 2.0 });
        }
        round_trip(&samples);
    }

    /// The next number of a xorshift sequence.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn pseudo_random_series_round_trip() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut t = 0i64;
        let samples: Vec<Sample> = (0..1000)
            .map(|_| {
                let x = next(&mut x);
                t += (x % 100_000) as i64 + 1;
                Sample {
                    t,
                    v: if x.is_multiple_of(5) {
                        f64::from_bits(x)
                    } else {
                        (x % 1000) as f64 / 7.0
                    },
                }
            })
            .collect();
        round_trip(&samples);
    }

    #[test]
    fn damaged_or_cut_streams_decode_without_panicking() {
        let samples: Vec<Sample> = (0..300)
            .map(|i| Sample {
                t: 1_700_000_000_000 + i * 15_000 + (i * i) % 7_000,
                v: if i % 3 == 0 {
                    i as f64 / 3.0
                } else {
                    1e6 + i as f64
                },
            })
            .collect();
        let chunk = Chunk::encode(&samples);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for cut in 0..chunk.bytes.len() {
            // Every prefix, claiming every sample: the first sample once its 16 bytes are
            // there (the rest reads as zeros past the end, so it is wrong, but bounded).
            let decoded = decode_bits(&chunk.bytes[..cut], chunk.count);
            assert!(decoded.len() <= samples.len());
            if cut >= 16 {
                assert_eq!((decoded[0].t, decoded[0].v), (samples[0].t, samples[0].v));
            }
            // A flipped bit anywhere: wrong samples, no panic.
            let mut damaged = chunk.bytes.clone();
            damaged[cut] ^= 1 << (next(&mut x) % 8);
            decode_bits(&damaged, chunk.count);
            decode_bits(&damaged, chunk.count * 4);
        }
    }
}
