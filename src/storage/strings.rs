//! [`StringList`]: label names or values as storage answers them, in one buffer.

use std::cmp::Ordering;

/// A list of strings in one buffer: a label's million values are two allocations, not a
/// million, and are merged, limited and written as JSON without one per value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StringList {
    text: String,
    /// Where each string ends in `text`.
    ends: Vec<usize>,
}

impl StringList {
    pub fn new() -> StringList {
        StringList::default()
    }

    /// Room for `strings` strings of `bytes` bytes in all.
    pub fn with_capacity(strings: usize, bytes: usize) -> StringList {
        StringList {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(strings),
        }
    }

    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The bytes of all the strings together.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.text[start..end])
    }

    pub fn last(&self) -> Option<&str> {
        self.get(self.len().checked_sub(1)?)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        let text = self.text.as_str();
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let s = &text[start..end];
            start = end;
            s
        })
    }

    /// Keeps the first `len` strings.
    pub fn truncate(&mut self, len: usize) {
        if len < self.ends.len() {
            self.ends.truncate(len);
            self.text.truncate(self.ends.last().copied().unwrap_or(0));
        }
    }

    /// The first `limit` strings (all when 0), as the HTTP API's `limit` asks.
    pub fn limited(mut self, limit: usize) -> StringList {
        if limit > 0 {
            self.truncate(limit);
        }
        self
    }

    /// Sorted ascending (bytewise, as Go compares strings), each string once.
    pub fn sorted_distinct(&self) -> StringList {
        // Sorted by each string's first 8 bytes as a big-endian number, the whole string
        // deciding only between equal prefixes: most comparisons are of two integers.
        let mut order: Vec<(u64, usize, usize)> = Vec::with_capacity(self.len());
        let mut start = 0;
        for &end in &self.ends {
            let s = &self.text.as_bytes()[start..end];
            let mut prefix = [0u8; 8];
            let n = s.len().min(8);
            prefix[..n].copy_from_slice(&s[..n]);
            order.push((u64::from_be_bytes(prefix), start, end));
            start = end;
        }
        let bytes = |&(_, a, b): &(u64, usize, usize)| &self.text.as_bytes()[a..b];
        order.sort_unstable_by(|x, y| x.0.cmp(&y.0).then_with(|| bytes(x).cmp(bytes(y))));
        let mut out = StringList::with_capacity(order.len(), self.text.len());
        for item in &order {
            let (a, b) = (item.1, item.2);
            let s = &self.text[a..b];
            if out.last() != Some(s) {
                out.push(s);
            }
        }
        out
    }
}

/// Merges ascending distinct strings with a [`StringList`] of them into a new one, as they
/// come ([`Merge::push`]): a block's values are merged while they are read, never held
/// apart.
pub struct Merge<'a> {
    from: &'a StringList,
    /// The next of `from`'s strings to merge.
    next: usize,
    out: StringList,
}

impl<'a> Merge<'a> {
    pub fn new(with: &'a StringList) -> Merge<'a> {
        Merge {
            from: with,
            next: 0,
            out: StringList::with_capacity(with.len(), with.text_len()),
        }
    }

    /// The next string of the other side; they must come strictly ascending (each once).
    pub fn push(&mut self, s: &str) {
        debug_assert!(self.out.last().is_none_or(|last| last < s), "not ascending");
        while let Some(mine) = self.from.get(self.next) {
            match mine.cmp(s) {
                Ordering::Less => {
                    self.out.push(mine);
                    self.next += 1;
                }
                Ordering::Equal => {
                    self.next += 1;
                    break;
                }
                Ordering::Greater => break,
            }
        }
        self.out.push(s);
    }

    pub fn finish(mut self) -> StringList {
        while let Some(mine) = self.from.get(self.next) {
            self.out.push(mine);
            self.next += 1;
        }
        self.out
    }
}

impl std::fmt::Debug for StringList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for StringList {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> StringList {
        let mut out = StringList::new();
        for s in iter {
            out.push(s.as_ref());
        }
        out
    }
}

impl<const N: usize> PartialEq<[&str; N]> for StringList {
    fn eq(&self, other: &[&str; N]) -> bool {
        self.len() == N && self.iter().zip(other).all(|(a, b)| a == *b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_limits_and_iterates() {
        let mut l: StringList = ["a", "", "ccc"].into_iter().collect();
        assert_eq!(l.len(), 3);
        assert_eq!(l.get(1), Some(""));
        assert_eq!(l.get(3), None);
        assert_eq!(l.iter().collect::<Vec<_>>(), ["a", "", "ccc"]);
        l.push("dd");
        assert_eq!(l.last(), Some("dd"));
        let l = l.limited(2);
        assert_eq!(l, ["a", ""]);
        assert_eq!(l.text_len(), 1);
        assert_eq!(l.limited(0).len(), 2);
    }

    #[test]
    fn sorts_bytewise_and_drops_repeats() {
        let l: StringList = [
            "pid-100000000b",
            "pid-100000000a",
            "b",
            "",
            "a\u{e9}",
            "az",
            "b",
            "pid-1",
            "pid-100000000a",
        ]
        .into_iter()
        .collect();
        let mut expected: Vec<&str> = l.iter().collect();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(l.sorted_distinct().iter().collect::<Vec<_>>(), expected);
        assert!(StringList::new().sorted_distinct().is_empty());
    }

    #[test]
    fn merges_as_values_come() {
        let mine: StringList = ["b", "d", "f"].into_iter().collect();
        let mut merge = Merge::new(&mine);
        for s in ["a", "b", "c", "g"] {
            merge.push(s);
        }
        assert_eq!(merge.finish(), ["a", "b", "c", "d", "f", "g"]);
        let empty = StringList::new();
        let mut merge = Merge::new(&empty);
        merge.push("x");
        assert_eq!(merge.finish(), ["x"]);
        assert_eq!(Merge::new(&mine).finish(), ["b", "d", "f"]);
    }
}
