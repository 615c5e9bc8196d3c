//! PostgreSQL's binary COPY format for rows of eight-byte fields: `samples`
//! `(series_id int8, time timestamptz, value float8)` read and written, and rollup rows read
//! (the columns a query needs). Streaming `COPY (SELECT …) TO STDOUT
//! (FORMAT binary)` and parsing it here costs a fraction of decoding rows one by one, and keeps
//! every float bit (staleness markers included).

use crate::model::TimestampMs;

/// `PGCOPY\n\xff\r\n\0`, then flags and header-extension length.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed binary COPY data: {0}")]
pub struct CopyFormatError(&'static str);

/// Incremental parser of rows of a fixed number of eight-byte, non-null fields (int8,
/// float8, timestamptz): feed chunks as they arrive, take rows (raw big-endian values) as
/// they complete.
pub struct RowReader {
    fields: usize,
    buffer: Vec<u8>,
    header_done: bool,
    finished: bool,
}

/// The most fields a row may have.
pub const MAX_FIELDS: usize = 16;

fn be_i64(b: &[u8]) -> i64 {
    i64::from_be_bytes(b.try_into().unwrap_or([0; 8]))
}

/// A `timestamptz` field as milliseconds since the Unix epoch.
pub fn timestamp_ms(raw: i64) -> TimestampMs {
    (raw + PG_EPOCH_OFFSET_US).div_euclid(1000)
}

impl RowReader {
    /// A reader of rows of `fields` fields (at most [`MAX_FIELDS`]).
    pub fn new(fields: usize) -> RowReader {
        assert!(fields <= MAX_FIELDS, "{fields} fields in a row");
        RowReader {
            fields,
            buffer: Vec::new(),
            header_done: false,
            finished: false,
        }
    }

    /// Parses every complete row in `chunk` (plus what earlier chunks left) into `out`.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        out: &mut impl FnMut(&[i64]),
    ) -> Result<(), CopyFormatError> {
        // PostgreSQL sends a row per message: parse straight from the chunk and keep only
        // what a row split across chunks leaves over.
        if self.buffer.is_empty() {
            let used = self.parse(chunk, out)?;
            self.buffer.extend_from_slice(&chunk[used..]);
        } else {
            self.buffer.extend_from_slice(chunk);
            let buffer = std::mem::take(&mut self.buffer);
            let used = self.parse(&buffer, out);
            self.buffer = buffer;
            self.buffer.drain(..used?);
        }
        Ok(())
    }

    /// Parses the complete rows at the start of `buf`; returns the bytes consumed.
    fn parse(
        &mut self,
        buf: &[u8],
        out: &mut impl FnMut(&[i64]),
    ) -> Result<usize, CopyFormatError> {
        let n = self.fields;
        let mut pos = 0;
        if !self.header_done {
            if buf.len() < 19 {
                return Ok(0);
            }
            if &buf[..11] != SIGNATURE {
                return Err(CopyFormatError("bad signature"));
            }
            let extension = u32::from_be_bytes([buf[15], buf[16], buf[17], buf[18]]) as usize;
            if buf.len() < 19 + extension {
                return Ok(0);
            }
            pos = 19 + extension;
            self.header_done = true;
        }
        // A row: field count (2 bytes) = n, then n fields of 4-byte length + 8 bytes.
        let row_len = 2 + n * (4 + 8);
        let mut values = [0i64; MAX_FIELDS];
        while buf.len() - pos >= 2 && !self.finished {
            let fields = i16::from_be_bytes([buf[pos], buf[pos + 1]]);
            if fields == -1 {
                self.finished = true;
                pos += 2;
                break;
            }
            if fields as usize != n {
                return Err(CopyFormatError("unexpected field count"));
            }
            if buf.len() - pos < row_len {
                break;
            }
            let row = &buf[pos + 2..pos + row_len];
            for (field, value) in values[..n].iter_mut().enumerate() {
                let at = field * 12;
                let len = i32::from_be_bytes(row[at..at + 4].try_into().unwrap_or([0; 4]));
                if len != 8 {
                    return Err(CopyFormatError("unexpected field length"));
                }
                *value = be_i64(&row[at + 4..at + 12]);
            }
            out(&values[..n]);
            pos += row_len;
        }
        Ok(pos)
    }

    /// Whether the trailer has been seen.
    pub fn finished(&self) -> bool {
        self.finished
    }
}

/// Encodes rows for `COPY samples (series_id, time, value) FROM STDIN (FORMAT binary)`.
pub fn encode_rows(series_ids: &[i64], times_ms: &[TimestampMs], values: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(21 + series_ids.len() * 38);
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    for ((id, t), v) in series_ids.iter().zip(times_ms).zip(values) {
        out.extend_from_slice(&3i16.to_be_bytes());
        for field in [*id, t * 1000 - PG_EPOCH_OFFSET_US, v.to_bits() as i64] {
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&field.to_be_bytes());
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sample rows `(series_id, t_ms, value)` read from `data` fed in two pieces.
    fn read(data: &[u8], split: usize) -> Vec<(i64, TimestampMs, f64)> {
        let mut reader = RowReader::new(3);
        let mut rows = Vec::new();
        let mut take = |f: &[i64]| {
            rows.push((f[0], timestamp_ms(f[1]), f64::from_bits(f[2] as u64)));
        };
        reader.feed(&data[..split], &mut take).unwrap();
        reader.feed(&data[split..], &mut take).unwrap();
        assert!(reader.finished());
        rows
    }

    fn assert_rows(rows: &[(i64, TimestampMs, f64)]) {
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], (7, 1_700_000_000_123, 1.5));
        assert_eq!((rows[1].0, rows[1].1), (8, -1_000));
        assert_eq!(rows[1].2.to_bits(), crate::model::STALE_NAN_BITS);
    }

    #[test]
    fn encoded_rows_read_back_bit_exact() {
        let stale = f64::from_bits(crate::model::STALE_NAN_BITS);
        let data = encode_rows(&[7, 8], &[1_700_000_000_123, -1_000], &[1.5, stale]);
        assert_rows(&read(&data, data.len()));
    }

    /// One row as PostgreSQL documents the format, written out by hand.
    fn row(series_id: i64, t_ms: i64, v: f64) -> Vec<u8> {
        let mut out = 3i16.to_be_bytes().to_vec();
        for field in [
            series_id,
            t_ms * 1000 - PG_EPOCH_OFFSET_US,
            v.to_bits() as i64,
        ] {
            out.extend(8i32.to_be_bytes());
            out.extend(field.to_be_bytes());
        }
        out
    }

    #[test]
    fn parses_rows_split_anywhere() {
        let mut data = SIGNATURE.to_vec();
        data.extend(0u32.to_be_bytes());
        data.extend(0u32.to_be_bytes());
        let stale = f64::from_bits(crate::model::STALE_NAN_BITS);
        data.extend(row(7, 1_700_000_000_123, 1.5));
        data.extend(row(8, -1_000, stale));
        data.extend((-1i16).to_be_bytes());
        for split in 1..data.len() {
            assert_rows(&read(&data, split));
        }
    }

    #[test]
    fn refuses_other_data() {
        let mut reader = RowReader::new(3);
        let result = reader.feed(b"PGCOPY\n\xff\r\n\x01garbage....", &mut |_| {});
        assert!(result.is_err());
        let mut reader = RowReader::new(9);
        let mut data = SIGNATURE.to_vec();
        data.extend([0u8; 8]);
        data.extend(row(7, 0, 1.0));
        assert!(
            reader.feed(&data, &mut |_| {}).is_err(),
            "three fields where nine are due"
        );
    }
}
