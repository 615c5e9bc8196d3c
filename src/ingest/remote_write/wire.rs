//! Protobuf wire format, read in place (protobuf.dev/programming-guides/encoding): a cursor
//! that hands out varints, fixed-width numbers and length-delimited slices of the request
//! without copying them, and skips fields it is not asked about, groups included.

use super::DecodeError;

// Wire types.
pub(super) const VARINT: u8 = 0;
pub(super) const I64: u8 = 1;
pub(super) const LEN: u8 = 2;
const SGROUP: u8 = 3;
const EGROUP: u8 = 4;
const I32: u8 = 5;

/// How deep groups in unknown fields may nest (prost's recursion limit).
const MAX_GROUP_DEPTH: u32 = 100;

pub(super) fn malformed(message: impl Into<String>) -> DecodeError {
    DecodeError::Protobuf(message.into())
}

/// A cursor over protobuf bytes.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(malformed(format!(
                "truncated: {n} bytes announced, {} left",
                self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    #[inline]
    pub(super) fn varint(&mut self) -> Result<u64, DecodeError> {
        // Keys, lengths of short strings and small numbers take one byte: most varints of a
        // request.
        match self.0.split_first() {
            Some((&byte, rest)) if byte < 0x80 => {
                self.0 = rest;
                Ok(u64::from(byte))
            }
            _ => self.long_varint(),
        }
    }

    fn long_varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                if i == 9 && byte > 1 {
                    break;
                }
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(malformed(if self.0.len() < 10 {
            "truncated varint"
        } else {
            "invalid varint"
        }))
    }

    /// The next field's number and wire type.
    pub(super) fn key(&mut self) -> Result<(u32, u8), DecodeError> {
        let key = self.varint()?;
        let (field, wire_type) = (key >> 3, (key & 7) as u8);
        if field == 0 || key > u64::from(u32::MAX) {
            return Err(malformed(format!("invalid field key {key}")));
        }
        if wire_type > I32 {
            return Err(malformed(format!("invalid wire type {wire_type}")));
        }
        Ok((field as u32, wire_type))
    }

    pub(super) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        self.take(usize::try_from(n).unwrap_or(usize::MAX))
    }

    pub(super) fn string(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?)
            .map_err(|_| malformed("invalid string value: data is not UTF-8 encoded"))
    }

    pub(super) fn double(&mut self) -> Result<f64, DecodeError> {
        let bytes = self.take(8)?;
        Ok(f64::from_le_bytes(bytes.try_into().unwrap_or_default()))
    }

    /// Skips a field this reader does not know, groups included.
    pub(super) fn skip(
        &mut self,
        field: u32,
        wire_type: u8,
        depth: u32,
    ) -> Result<(), DecodeError> {
        match wire_type {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            I32 => self.take(4).map(drop),
            SGROUP if depth < MAX_GROUP_DEPTH => loop {
                let (inner, inner_type) = self.key()?;
                if inner_type == EGROUP {
                    return if inner == field {
                        Ok(())
                    } else {
                        Err(malformed("unexpected end group tag"))
                    };
                }
                self.skip(inner, inner_type, depth + 1)?;
            },
            SGROUP => Err(malformed("recursion limit reached")),
            _ => Err(malformed("unexpected end group tag")),
        }
    }
}

/// Fails unless a known field came with the wire type its declaration gives.
pub(super) fn expect(
    message: &str,
    field: u32,
    wire_type: u8,
    expected: u8,
) -> Result<(), DecodeError> {
    if wire_type == expected {
        Ok(())
    } else {
        Err(malformed(format!(
            "{message} field {field}: invalid wire type {wire_type} (expected {expected})"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_varints_to_their_limits() {
        let mut r = Reader(&[
            0x00, 0x96, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]);
        assert_eq!(r.varint(), Ok(0));
        assert_eq!(r.varint(), Ok(150));
        assert_eq!(r.varint(), Ok(u64::MAX));
        assert!(r.is_empty());
        // A tenth byte past the 64th bit, an eleventh byte, an unfinished varint.
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(Reader(&over).varint(), Err(malformed("invalid varint")));
        let long = [
            0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
        ];
        assert_eq!(Reader(&long).varint(), Err(malformed("invalid varint")));
        assert_eq!(Reader(&[0x80]).varint(), Err(malformed("truncated varint")));
    }

    #[test]
    fn refuses_bad_keys_and_unbalanced_groups() {
        assert_eq!(Reader(&[0x00]).key(), Err(malformed("invalid field key 0")));
        assert_eq!(Reader(&[0x0e]).key(), Err(malformed("invalid wire type 6")));
        // Group 1 closed by group 2's end; an end without a start.
        let mut r = Reader(&[0x0b, 0x14]);
        let (field, wire_type) = r.key().unwrap();
        assert_eq!(
            r.skip(field, wire_type, 0),
            Err(malformed("unexpected end group tag"))
        );
        let mut r = Reader(&[0x0c]);
        let (field, wire_type) = r.key().unwrap();
        assert_eq!(
            r.skip(field, wire_type, 0),
            Err(malformed("unexpected end group tag"))
        );
        // Groups nested past the limit.
        let mut deep = vec![0x0b; MAX_GROUP_DEPTH as usize + 1];
        deep.extend(vec![0x0c; MAX_GROUP_DEPTH as usize + 1]);
        let mut r = Reader(&deep);
        let (field, wire_type) = r.key().unwrap();
        assert_eq!(
            r.skip(field, wire_type, 0),
            Err(malformed("recursion limit reached"))
        );
    }
}
