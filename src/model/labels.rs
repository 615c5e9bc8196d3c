//! Label sets: validated once at the edge, then sorted by name and unique.

use crate::varint::{put_varint, take_varint, varint_len};
use std::fmt;
use std::sync::Arc;

/// The label that carries the metric name.
pub const METRIC_NAME_LABEL: &str = "__name__";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    pub name: String,
    pub value: String,
}

impl Label {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// Why a label set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("invalid label name {0:?}")]
    InvalidName(String),
    #[error("label name {0:?} is not unique")]
    Duplicate(String),
    #[error("series has no metric name (__name__ label missing or empty)")]
    MissingMetricName,
    #[error("invalid metric name {0:?}")]
    InvalidMetricName(String),
    #[error("series has {count} labels, more than the limit of {limit} (--ingest-max-labels-per-series)")]
    TooManyLabels { count: usize, limit: usize },
    #[error("label name {name:?}… is {len} bytes, more than the limit of {limit} (--ingest-max-label-name-bytes)")]
    NameTooLong {
        name: String,
        len: usize,
        limit: usize,
    },
    #[error("value of label {name:?} is {len} bytes, more than the limit of {limit} (--ingest-max-label-value-bytes)")]
    ValueTooLong {
        name: String,
        len: usize,
        limit: usize,
    },
}

impl LabelError {
    /// The `reason` label of `secumon_samples_rejected_total` for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            LabelError::InvalidName(_) => "invalid_label_name",
            LabelError::Duplicate(_) => "duplicate_label_name",
            LabelError::MissingMetricName => "missing_metric_name",
            LabelError::InvalidMetricName(_) => "invalid_metric_name",
            LabelError::TooManyLabels { .. } => "too_many_labels",
            LabelError::NameTooLong { .. } => "label_name_too_long",
            LabelError::ValueTooLong { .. } => "label_value_too_long",
        }
    }
}

/// Bounds on one label set from a client (ingest limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelLimits {
    pub max_labels: usize,
    pub max_name_bytes: usize,
    pub max_value_bytes: usize,
}

impl LabelLimits {
    /// No bound: for label sets the server makes itself.
    pub const NONE: LabelLimits = LabelLimits {
        max_labels: usize::MAX,
        max_name_bytes: usize::MAX,
        max_value_bytes: usize::MAX,
    };

    /// Checks a set's size before anything else looks at it; a name in a message is cut to
    /// 64 bytes, so a refusal costs little however long what it refuses.
    fn check<P: Pair>(&self, labels: &[P]) -> Result<(), LabelError> {
        if labels.len() > self.max_labels {
            return Err(LabelError::TooManyLabels {
                count: labels.len(),
                limit: self.max_labels,
            });
        }
        let cut = |name: &str| {
            let mut end = name.len().min(64);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            name[..end].to_owned()
        };
        for label in labels {
            if label.name().len() > self.max_name_bytes {
                return Err(LabelError::NameTooLong {
                    name: cut(label.name()),
                    len: label.name().len(),
                    limit: self.max_name_bytes,
                });
            }
            if label.value().len() > self.max_value_bytes {
                return Err(LabelError::ValueTooLong {
                    name: cut(label.name()),
                    len: label.value().len(),
                    limit: self.max_value_bytes,
                });
            }
        }
        Ok(())
    }

    /// [`LabelLimits::check`] for a set read in place from a request.
    pub fn check_pairs(&self, pairs: &[(&str, &str)]) -> Result<(), LabelError> {
        self.check(pairs)
    }

    /// [`LabelLimits::check`] for owned labels.
    pub fn check_labels(&self, labels: &[Label]) -> Result<(), LabelError> {
        self.check(labels)
    }
}

/// A label set sorted by name with unique names and no empty values.
///
/// The derived ordering compares label by label (name, then value) and then by length, which is
/// exactly Prometheus's `labels.Compare`; results are sorted with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Vec<Label>);

impl Labels {
    /// Validates and sorts a label set from the wire, as Prometheus's TSDB accepts it:
    /// label names must match `[a-zA-Z_][a-zA-Z0-9_]*`, names must be unique, the metric name
    /// must be present and valid. Labels with empty values are dropped (an empty value means
    /// "no such label" in Prometheus).
    pub fn from_wire(mut labels: Vec<Label>) -> Result<Labels, LabelError> {
        Rules::PROMETHEUS.apply(&mut labels)?;
        Ok(Labels(labels))
    }

    /// Like [`Labels::from_wire`], but any non-empty UTF-8 name is accepted (for OTLP metrics
    /// kept under their OpenTelemetry names).
    pub fn from_wire_utf8(mut labels: Vec<Label>) -> Result<Labels, LabelError> {
        Rules::UTF8_NAMES.apply(&mut labels)?;
        Ok(Labels(labels))
    }

    /// An exemplar's labels: valid names, unique, no metric name required.
    pub fn exemplar_labels(mut labels: Vec<Label>) -> Result<Labels, LabelError> {
        Rules::EXEMPLAR.apply(&mut labels)?;
        Ok(Labels(labels))
    }

    /// Builds a label set from labels already known to be valid, sorting them.
    pub fn from_trusted(mut labels: Vec<Label>) -> Labels {
        labels.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Labels(labels)
    }

    pub fn empty() -> Labels {
        Labels(Vec::new())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|l| l.name.as_str().cmp(name))
            .ok()
            .map(|i| self.0[i].value.as_str())
    }

    /// The value of `name`, or "" when absent, as Prometheus matchers see it.
    pub fn value_or_empty(&self, name: &str) -> &str {
        self.get(name).unwrap_or("")
    }

    pub fn metric_name(&self) -> Option<&str> {
        self.get(METRIC_NAME_LABEL)
    }

    /// The same set without `__name__` (what Prometheus returns once a function or operator has
    /// changed a sample's meaning).
    pub fn without_metric_name(mut self) -> Labels {
        self.drop_metric_name();
        self
    }

    /// Removes `__name__` in place.
    pub fn drop_metric_name(&mut self) {
        if let Ok(i) = self
            .0
            .binary_search_by(|l| l.name.as_str().cmp(METRIC_NAME_LABEL))
        {
            self.0.remove(i);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    /// The labels as (name, value) pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        self.0.iter().map(|l| (l.name.as_str(), l.value.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A 128-bit identity of the set, stable across processes and releases (xxh3-128 over the
    /// names and values with separators that cannot occur in a valid name).
    pub fn fingerprint(&self) -> u128 {
        fingerprint_of(self.pairs())
    }
}

/// [`Labels::fingerprint`] of a sorted, validated set given as (name, value) pairs.
///
/// The bytes are gathered on the stack and hashed at once: feeding xxh3's streaming state four
/// short slices a label cost three times the hash itself. A set longer than the buffer streams
/// the rest, which gives the same digest.
fn fingerprint_of<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>) -> u128 {
    const BUFFER: usize = 512;
    let mut buffer = [0u8; BUFFER];
    let mut len = 0;
    let mut streamed: Option<xxhash_rust::xxh3::Xxh3> = None;
    for (name, value) in labels {
        for part in [name.as_bytes(), &[0xff], value.as_bytes(), &[0xfe]] {
            if len + part.len() > BUFFER {
                let hasher = streamed.get_or_insert_with(xxhash_rust::xxh3::Xxh3::new);
                hasher.update(&buffer[..len]);
                len = 0;
                if part.len() > BUFFER {
                    hasher.update(part);
                    continue;
                }
            }
            buffer[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
    }
    match streamed {
        None => xxhash_rust::xxh3::xxh3_128(&buffer[..len]),
        Some(mut hasher) => {
            hasher.update(&buffer[..len]);
            hasher.digest128()
        }
    }
}

fn fmt_pairs<'a>(
    f: &mut fmt::Formatter<'_>,
    labels: impl Iterator<Item = (&'a str, &'a str)>,
) -> fmt::Result {
    f.write_str("{")?;
    for (i, (name, value)) in labels.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{name}={value:?}")?;
    }
    f.write_str("}")
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_pairs(f, self.pairs())
    }
}

/// Validates and sorts (name, value) pairs read from a remote-write request by the rules of
/// [`Labels::from_wire`], without copying a string: the caller keeps the strings where they
/// are and copies a set only once it is accepted.
pub fn validate_wire_pairs(pairs: &mut Vec<(&str, &str)>) -> Result<(), LabelError> {
    Rules::PROMETHEUS.apply(pairs)
}

/// A label as the validation rules see it, owned or borrowed.
trait Pair {
    fn name(&self) -> &str;
    fn value(&self) -> &str;
}

impl Pair for Label {
    fn name(&self) -> &str {
        &self.name
    }
    fn value(&self) -> &str {
        &self.value
    }
}

impl Pair for (&str, &str) {
    fn name(&self) -> &str {
        self.0
    }
    fn value(&self) -> &str {
        self.1
    }
}

/// What a metric name must be for a set to be accepted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MetricNameRule {
    /// Not required (exemplar labels).
    Optional,
    /// Required, any value (OpenTelemetry names).
    Present,
    /// Required and `[a-zA-Z_:][a-zA-Z0-9_:]*`.
    Valid,
}

/// The checks a label set from a client goes through, in Prometheus's order: empty values
/// dropped, names checked, sorted, names unique, metric name.
#[derive(Clone, Copy)]
struct Rules {
    legacy_names: bool,
    metric_name: MetricNameRule,
}

impl Rules {
    const PROMETHEUS: Rules = Rules {
        legacy_names: true,
        metric_name: MetricNameRule::Valid,
    };
    const UTF8_NAMES: Rules = Rules {
        legacy_names: false,
        metric_name: MetricNameRule::Present,
    };
    const EXEMPLAR: Rules = Rules {
        legacy_names: true,
        metric_name: MetricNameRule::Optional,
    };

    fn apply<P: Pair>(self, labels: &mut Vec<P>) -> Result<(), LabelError> {
        labels.retain(|l| !l.value().is_empty());
        let bad_name = |name: &str| {
            if self.legacy_names {
                !is_valid_label_name(name)
            } else {
                name.is_empty()
            }
        };
        if let Some(bad) = labels.iter().find(|l| bad_name(l.name())) {
            return Err(LabelError::InvalidName(bad.name().to_string()));
        }
        // Senders almost always send sets sorted already: strictly ascending names are sorted
        // and unique in one pass.
        if !labels.windows(2).all(|w| w[0].name() < w[1].name()) {
            labels.sort_unstable_by(|a, b| a.name().cmp(b.name()));
            if let Some(pair) = labels.windows(2).find(|w| w[0].name() == w[1].name()) {
                return Err(LabelError::Duplicate(pair[0].name().to_string()));
            }
        }
        if self.metric_name == MetricNameRule::Optional {
            return Ok(());
        }
        let name = labels
            .binary_search_by(|l| l.name().cmp(METRIC_NAME_LABEL))
            .map(|i| labels[i].value());
        match name {
            Err(_) => Err(LabelError::MissingMetricName),
            Ok(name)
                if self.metric_name == MetricNameRule::Valid && !is_valid_metric_name(name) =>
            {
                Err(LabelError::InvalidMetricName(name.to_string()))
            }
            Ok(_) => Ok(()),
        }
    }
}

/// Where one label of a [`LabelsRef`] lies in its text: the name is `text[name..value]`, the
/// value `text[value..end]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelSpan {
    pub name: usize,
    pub value: usize,
    pub end: usize,
}

/// A validated label set borrowed from a buffer of many (a write batch keeps every set of a
/// request in one string): sorted by name, unique, no empty values, exactly as [`Labels`].
#[derive(Clone, Copy, Debug)]
pub struct LabelsRef<'a> {
    text: &'a str,
    spans: &'a [LabelSpan],
}

impl<'a> LabelsRef<'a> {
    /// `spans` must describe a set valid as a [`Labels`] (the writer of the buffer checked it).
    pub fn new(text: &'a str, spans: &'a [LabelSpan]) -> LabelsRef<'a> {
        LabelsRef { text, spans }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let text = self.text;
        self.spans
            .iter()
            .map(move |s| (&text[s.name..s.value], &text[s.value..s.end]))
    }

    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    pub fn metric_name(&self) -> Option<&'a str> {
        self.get(METRIC_NAME_LABEL)
    }

    /// The set as owned [`Labels`] (for a series storage sees for the first time).
    pub fn to_labels(&self) -> Labels {
        Labels(self.iter().map(|(n, v)| Label::new(n, v)).collect())
    }

    pub fn fingerprint(&self) -> u128 {
        fingerprint_of(self.iter())
    }
}

impl fmt::Display for LabelsRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_pairs(f, self.iter())
    }
}

/// What matchers need of a label set: a label's value by name, "" when absent.
pub trait LabelLookup {
    fn value_or_empty(&self, name: &str) -> &str;
}

impl LabelLookup for Labels {
    fn value_or_empty(&self, name: &str) -> &str {
        Labels::value_or_empty(self, name)
    }
}

impl LabelLookup for PackedLabels {
    fn value_or_empty(&self, name: &str) -> &str {
        self.get(name).unwrap_or("")
    }
}

/// A validated label set packed into one allocation, for sets held long (the embedded head
/// keeps one per series): each label as varint name length, name, varint value length, value,
/// sorted by name as [`Labels`]. About a third of the memory of a [`Labels`], whose every name
/// and value is a `String` of its own (Prometheus's `stringlabels` build packs the same way).
/// Shared: a clone (a flush's or checkpoint's copy of the head's sets) costs a reference
/// count, not the set.
#[derive(Clone, PartialEq, Eq)]
pub struct PackedLabels(Arc<[u8]>);

impl PackedLabels {
    /// Packs a set valid as [`Labels`] (sorted by name, unique, no empty values): lookups
    /// rely on the order.
    fn pack<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> PackedLabels {
        debug_assert!(
            {
                let names: Vec<&str> = pairs.clone().map(|(n, _)| n).collect();
                names.windows(2).all(|w| w[0] < w[1])
            },
            "a packed set is sorted by name and unique"
        );
        let size = pairs
            .clone()
            .flat_map(|(n, v)| [n, v])
            .map(|part| part.len() + varint_len(part.len() as u64))
            .sum();
        let mut out = Vec::with_capacity(size);
        for part in pairs.flat_map(|(n, v)| [n, v]) {
            put_varint(&mut out, part.len() as u64);
            out.extend_from_slice(part.as_bytes());
        }
        PackedLabels(out.into())
    }

    /// The labels as (name, value) pairs, in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        self.raw_pairs()
            .map(|(n, v)| (packed_str(n), packed_str(v)))
    }

    /// Pairs as bytes: every part was a `&str` when packed.
    fn raw_pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
        let mut rest: &[u8] = &self.0;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let name = take_part(&mut rest);
            let value = take_part(&mut rest);
            Some((name, value))
        })
    }

    /// The value of `name` (names are compared as bytes; only the value found is checked as
    /// UTF-8, so a matcher over many series costs no more than with [`Labels`]).
    pub fn get(&self, name: &str) -> Option<&str> {
        use std::cmp::Ordering::*;
        let name = name.as_bytes();
        let first = name.first();
        for (n, v) in self.raw_pairs() {
            // Sorted by name: past a name whose first byte is greater none can match. Whole
            // names are compared only when first bytes agree (most names differ there).
            match n.first().cmp(&first) {
                Less => {}
                Greater => return None,
                Equal => match n.cmp(name) {
                    Less => {}
                    Equal => return Some(packed_str(v)),
                    Greater => return None,
                },
            }
        }
        None
    }

    /// Asks the processor to bring the set's first bytes into its cache: a loop over many
    /// series' sets (each its own allocation) issues this some sets ahead of its reads, so
    /// their memory latencies overlap instead of adding up.
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint; it never faults, whatever the address.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p = self.0.as_ptr() as *const i8;
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p.wrapping_add(64), _MM_HINT_T0);
        }
    }

    /// The number of labels.
    pub fn len(&self) -> usize {
        self.raw_pairs().count()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_labels(&self) -> Labels {
        Labels(self.pairs().map(|(n, v)| Label::new(n, v)).collect())
    }

    pub fn fingerprint(&self) -> u128 {
        fingerprint_of(self.pairs())
    }

    /// The packed form: (varint length, bytes) of each name and value in turn, as files
    /// that store label sets (the embedded engine's series indexes) write them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A set from its packed form ([`PackedLabels::as_bytes`]), if `bytes` are exactly
    /// `count` pairs of UTF-8 with names in strictly ascending order.
    pub fn from_bytes(bytes: &[u8], count: usize) -> Option<PackedLabels> {
        fn part<'a>(rest: &mut &'a [u8]) -> Option<&'a str> {
            let len = usize::try_from(take_varint(rest)?).ok()?;
            let (part, after) = (rest.get(..len)?, &rest[len..]);
            *rest = after;
            std::str::from_utf8(part).ok()
        }
        let mut rest = bytes;
        let mut previous: Option<&str> = None;
        for _ in 0..count {
            let name = part(&mut rest)?;
            part(&mut rest)?;
            if previous.is_some_and(|p| p >= name) {
                return None;
            }
            previous = Some(name);
        }
        rest.is_empty().then(|| PackedLabels(bytes.into()))
    }
}

impl From<&Labels> for PackedLabels {
    fn from(labels: &Labels) -> PackedLabels {
        PackedLabels::pack(labels.pairs())
    }
}

impl fmt::Display for PackedLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_pairs(f, self.pairs())
    }
}

impl fmt::Debug for PackedLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One length-prefixed part of a packed set; `rest` moves past it. (The set was packed by
/// [`PackedLabels::pack`], so lengths are well formed.)
fn take_part<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
    let len = take_varint(rest).map_or(usize::MAX, |len| len as usize);
    let (part, after) = rest.split_at(len.min(rest.len()));
    *rest = after;
    part
}

fn packed_str(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("a packed label set holds the UTF-8 it was built from")
}

/// `[a-zA-Z_][a-zA-Z0-9_]*` (prometheus/model `LabelNameRE`, legacy validation as in 2.42).
pub fn is_valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
        && bytes.all(|b| NAME_BYTES[usize::from(b)] & LABEL_NAME != 0)
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` (prometheus/model `MetricNameRE`).
pub fn is_valid_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_' | b':'))
        && bytes.all(|b| NAME_BYTES[usize::from(b)] & METRIC_NAME != 0)
}

/// Which bytes may follow the first in a label name and in a metric name: every label of
/// every series written is checked, and one lookup a byte is about three times faster than the
/// comparisons.
const LABEL_NAME: u8 = 1;
const METRIC_NAME: u8 = 2;
const NAME_BYTES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || c == b'_' {
            table[b] = LABEL_NAME | METRIC_NAME;
        } else if c == b':' {
            table[b] = METRIC_NAME;
        }
        b += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn l(name: &str, value: &str) -> Label {
        Label::new(name, value)
    }

    #[test]
    fn sorts_and_drops_empty_values() {
        let labels =
            Labels::from_wire(vec![l("job", "node"), l("__name__", "up"), l("empty", "")]).unwrap();
        let names: Vec<_> = labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["__name__", "job"]);
        assert_eq!(labels.get("job"), Some("node"));
        assert_eq!(labels.value_or_empty("empty"), "");
    }

    #[test]
    fn rejects_duplicates_bad_names_and_missing_metric_name() {
        assert_eq!(
            Labels::from_wire(vec![l("__name__", "up"), l("a", "1"), l("a", "2")]),
            Err(LabelError::Duplicate("a".into()))
        );
        assert_eq!(
            Labels::from_wire(vec![l("__name__", "up"), l("0a", "1")]),
            Err(LabelError::InvalidName("0a".into()))
        );
        assert_eq!(
            Labels::from_wire(vec![l("__name__", "up"), l("a-b", "1")]),
            Err(LabelError::InvalidName("a-b".into()))
        );
        assert_eq!(
            Labels::from_wire(vec![l("job", "x")]),
            Err(LabelError::MissingMetricName)
        );
        assert_eq!(
            Labels::from_wire(vec![l("__name__", "")]),
            Err(LabelError::MissingMetricName)
        );
        assert_eq!(
            Labels::from_wire(vec![l("__name__", "1up")]),
            Err(LabelError::InvalidMetricName("1up".into()))
        );
        assert!(Labels::from_wire(vec![l("__name__", "job:up:rate5m")]).is_ok());
    }

    #[test]
    fn ordering_matches_prometheus_labels_compare() {
        let a = Labels::from_trusted(vec![l("__name__", "a"), l("x", "1")]);
        let b = Labels::from_trusted(vec![l("__name__", "a"), l("x", "2")]);
        let c = Labels::from_trusted(vec![l("__name__", "a")]);
        assert!(a < b);
        assert!(c < a, "a prefix sorts first");
    }

    const FINGERPRINT_OF_UP_JOB_NODE: u128 = 0x6470_bf12_7c7b_46c3_fffc_c1f2_ab05_f929;

    #[test]
    fn fingerprints_never_change() {
        // PostgreSQL stores them and the embedded engine's log and checkpoints key series by
        // them: a change of this value orphans every stored series.
        let labels = Labels::from_trusted(vec![l("__name__", "up"), l("job", "node")]);
        assert_eq!(
            labels.fingerprint(),
            FINGERPRINT_OF_UP_JOB_NODE,
            "{:#x}",
            labels.fingerprint()
        );
    }

    #[test]
    fn fingerprints_of_long_sets_are_the_hash_of_all_their_bytes() {
        // Sets past the stack buffer stream their bytes; the digest must not depend on where
        // the buffer ended.
        for len in [0, 1, 100, 250, 251, 252, 253, 500, 511, 512, 513, 2000] {
            let value = "v".repeat(len);
            let labels = Labels::from_trusted(vec![
                l("__name__", "up"),
                l("a", &value),
                l("b", &value),
                l("c", "x"),
            ]);
            let mut bytes = Vec::new();
            for (name, value) in labels.pairs() {
                bytes.extend_from_slice(name.as_bytes());
                bytes.push(0xff);
                bytes.extend_from_slice(value.as_bytes());
                bytes.push(0xfe);
            }
            assert_eq!(
                labels.fingerprint(),
                xxhash_rust::xxh3::xxh3_128(&bytes),
                "{len}"
            );
        }
    }

    #[test]
    fn name_rules_match_prometheus_patterns_byte_for_byte() {
        for c in (0u8..128)
            .map(char::from)
            .chain(['é', 'ü', '\u{80}', '\u{ff}'])
        {
            // After the first character, then as the first: [a-zA-Z0-9_] then [a-zA-Z_], with
            // `:` also allowed in metric names.
            let rest = c.is_ascii_alphanumeric() || c == '_';
            let first = c.is_ascii_alphabetic() || c == '_';
            for (name, valid) in [(format!("a{c}"), rest), (format!("{c}a"), first)] {
                assert_eq!(is_valid_label_name(&name), valid, "{c:?}");
                assert_eq!(is_valid_metric_name(&name), valid || c == ':', "{c:?}");
            }
        }
        assert!(!is_valid_label_name("") && !is_valid_metric_name(""));
    }

    #[test]
    fn fingerprint_separates_name_value_boundaries() {
        let a = Labels::from_trusted(vec![l("ab", "c")]);
        let b = Labels::from_trusted(vec![l("a", "bc")]);
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
    }

    #[test]
    fn packed_sets_give_back_the_set_they_were_packed_from() {
        let long = "x".repeat(200);
        let longer = "é".repeat(10_000);
        let sets = [
            Labels::empty(),
            Labels::from_trusted(vec![l("__name__", "up")]),
            Labels::from_trusted(vec![
                l("__name__", "http_requests_total"),
                l("a", &long),
                l("b", &longer),
                l("ünïcode", "välue \"quoted\"\n"),
                l("z", "0"),
            ]),
        ];
        for labels in &sets {
            let packed = PackedLabels::from(labels);
            assert_eq!(&packed.to_labels(), labels);
            assert_eq!(packed.fingerprint(), labels.fingerprint());
            assert_eq!(packed.to_string(), labels.to_string());
            for (name, value) in labels.pairs() {
                assert_eq!(packed.get(name), Some(value));
            }
            for absent in ["", "A", "__name", "m", "zz", "ünïcod"] {
                assert_eq!(packed.get(absent), labels.get(absent), "{absent}");
            }
            let text: usize = labels.pairs().map(|(n, v)| n.len() + v.len()).sum();
            assert!(packed.0.len() <= text + 3 * 2 * labels.len());
            let bytes = packed.as_bytes();
            assert_eq!(
                PackedLabels::from_bytes(bytes, labels.len()),
                Some(packed.clone())
            );
            // Wrong count, cut short, trailing bytes: refused.
            assert_eq!(PackedLabels::from_bytes(bytes, labels.len() + 1), None);
            if !bytes.is_empty() {
                assert_eq!(
                    PackedLabels::from_bytes(&bytes[..bytes.len() - 1], labels.len()),
                    None
                );
            }
            assert_eq!(
                PackedLabels::from_bytes(&[bytes, &[0, 0]].concat(), labels.len()),
                None
            );
        }
        // Names out of order, and bytes that are not UTF-8, are refused.
        assert_eq!(
            PackedLabels::from_bytes(&[1, b'b', 1, b'1', 1, b'a', 1, b'2'], 2),
            None
        );
        assert_eq!(
            PackedLabels::from_bytes(&[1, b'a', 1, b'1', 1, b'a', 1, b'2'], 2),
            None
        );
        assert_eq!(PackedLabels::from_bytes(&[1, b'a', 1, 0xff], 1), None);
        assert!(PackedLabels::from_bytes(&[1, b'a', 1, b'1', 1, b'b', 1, b'2'], 2).is_some());
        let packed = PackedLabels::from(&sets[2]);
        assert_eq!(packed.get("b").map(str::len), Some(20_000));
        let m = crate::model::Matcher::regex("a", "x+", false).unwrap();
        assert!(m.matches(&packed));
        assert!(crate::model::Matcher::equal("missing", "").matches(&packed));
        assert!(!crate::model::Matcher::equal("z", "1").matches(&packed));
    }
}
