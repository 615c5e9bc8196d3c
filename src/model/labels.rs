//! Label sets: validated once at the edge, then sorted by name and unique.

use std::fmt;

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
}

impl LabelError {
    /// The `reason` label of `secumon_samples_rejected_total` for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            LabelError::InvalidName(_) => "invalid_label_name",
            LabelError::Duplicate(_) => "duplicate_label_name",
            LabelError::MissingMetricName => "missing_metric_name",
            LabelError::InvalidMetricName(_) => "invalid_metric_name",
        }
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
    pub fn from_wire(labels: Vec<Label>) -> Result<Labels, LabelError> {
        let mut labels: Vec<Label> = labels.into_iter().filter(|l| !l.value.is_empty()).collect();
        for label in &labels {
            if !is_valid_label_name(&label.name) {
                return Err(LabelError::InvalidName(label.name.clone()));
            }
        }
        labels.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = labels.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(LabelError::Duplicate(pair[0].name.clone()));
        }
        let labels = Labels(labels);
        match labels.get(METRIC_NAME_LABEL) {
            None => Err(LabelError::MissingMetricName),
            Some(name) if !is_valid_metric_name(name) => {
                Err(LabelError::InvalidMetricName(name.to_string()))
            }
            Some(_) => Ok(labels),
        }
    }

    /// Like [`Labels::from_wire`], but any non-empty UTF-8 name is accepted (for OTLP metrics
    /// kept under their OpenTelemetry names).
    pub fn from_wire_utf8(labels: Vec<Label>) -> Result<Labels, LabelError> {
        let mut labels: Vec<Label> = labels.into_iter().filter(|l| !l.value.is_empty()).collect();
        if let Some(bad) = labels.iter().find(|l| l.name.is_empty()) {
            return Err(LabelError::InvalidName(bad.name.clone()));
        }
        labels.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = labels.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(LabelError::Duplicate(pair[0].name.clone()));
        }
        let labels = Labels(labels);
        if labels.get(METRIC_NAME_LABEL).is_none() {
            return Err(LabelError::MissingMetricName);
        }
        Ok(labels)
    }

    /// An exemplar's labels: valid names, unique, no metric name required.
    pub fn exemplar_labels(labels: Vec<Label>) -> Result<Labels, LabelError> {
        let mut labels: Vec<Label> = labels.into_iter().filter(|l| !l.value.is_empty()).collect();
        if let Some(bad) = labels.iter().find(|l| !is_valid_label_name(&l.name)) {
            return Err(LabelError::InvalidName(bad.name.clone()));
        }
        labels.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = labels.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(LabelError::Duplicate(pair[0].name.clone()));
        }
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
    pub fn without_metric_name(&self) -> Labels {
        Labels(
            self.0
                .iter()
                .filter(|l| l.name != METRIC_NAME_LABEL)
                .cloned()
                .collect(),
        )
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
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
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for label in &self.0 {
            hasher.update(label.name.as_bytes());
            hasher.update(&[0xff]);
            hasher.update(label.value.as_bytes());
            hasher.update(&[0xfe]);
        }
        hasher.digest128()
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, label) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}={:?}", label.name, label.value)?;
        }
        f.write_str("}")
    }
}

/// `[a-zA-Z_][a-zA-Z0-9_]*` (prometheus/model `LabelNameRE`, legacy validation as in 2.42).
pub fn is_valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` (prometheus/model `MetricNameRE`).
pub fn is_valid_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_' | b':'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

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

    #[test]
    fn fingerprint_separates_name_value_boundaries() {
        let a = Labels::from_trusted(vec![l("ab", "c")]);
        let b = Labels::from_trusted(vec![l("a", "bc")]);
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
    }
}
