//! The data model every layer shares: tenants, series labels, samples, matchers and metadata.
//!
//! Values here are validated once, at the edge (ingest or query parsing); code below the edge
//! trusts them. This module knows no protocol and no backend.

pub mod labels;
mod matcher;

pub use labels::{
    Label, LabelError, LabelLookup, LabelSpan, Labels, LabelsRef, PackedLabels, METRIC_NAME_LABEL,
};
pub use matcher::{matches_all, MatchOp, Matcher};

use std::fmt;

/// Milliseconds since the Unix epoch, the unit of Prometheus timestamps.
pub type TimestampMs = i64;

/// The bit pattern Prometheus writes as a staleness marker (`value.StaleNaN` in
/// prometheus/model/value/value.go). It is a NaN, but one that must survive storage bit for bit.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// Whether `v` is a Prometheus staleness marker (not any NaN: only the exact bit pattern).
pub fn is_stale_nan(v: f64) -> bool {
    v.to_bits() == STALE_NAN_BITS
}

/// The tenant that owns a series. Every read and write is scoped to one.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    /// The tenant used while authentication is disabled.
    pub const DEFAULT: &'static str = "default";

    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TenantId {
    fn default() -> Self {
        Self::new(Self::DEFAULT)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A backend's identifier for one series of one tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesId(pub i64);

/// One float sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub t: TimestampMs,
    pub v: f64,
}

impl Sample {
    /// Equality as storage sees it: the same timestamp and the same value bits, so that a
    /// staleness marker is not equal to an ordinary NaN and NaN equals itself.
    pub fn same_as(&self, other: &Sample) -> bool {
        self.t == other.t && self.v.to_bits() == other.v.to_bits()
    }
}

/// A series with its samples, sorted by time.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesSamples {
    pub labels: Labels,
    pub samples: Vec<Sample>,
}

/// An exemplar: a sample with its own labels (usually `trace_id`, `span_id`) attached to a
/// series, as Prometheus keeps them.
#[derive(Clone, Debug, PartialEq)]
pub struct Exemplar {
    pub labels: Labels,
    pub value: f64,
    pub t: TimestampMs,
}

/// The exemplars of one series.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesExemplars {
    pub labels: Labels,
    pub exemplars: Vec<Exemplar>,
}

/// The metric types Prometheus metadata knows, with their API spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricType {
    Unknown,
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
}

impl MetricType {
    /// The name `/api/v1/metadata` uses (prometheus/model/textparse: `MetricType`).
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Unknown => "unknown",
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            MetricType::GaugeHistogram => "gaugehistogram",
            MetricType::Summary => "summary",
            MetricType::Info => "info",
            MetricType::StateSet => "stateset",
        }
    }

    pub fn parse(s: &str) -> MetricType {
        match s {
            "counter" => MetricType::Counter,
            "gauge" => MetricType::Gauge,
            "histogram" => MetricType::Histogram,
            "gaugehistogram" => MetricType::GaugeHistogram,
            "summary" => MetricType::Summary,
            "info" => MetricType::Info,
            "stateset" => MetricType::StateSet,
            _ => MetricType::Unknown,
        }
    }
}

/// Metadata of one metric family, as remote-write and `/api/v1/metadata` carry it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MetricMetadata {
    pub metric_family_name: String,
    pub metric_type: MetricType,
    pub help: String,
    pub unit: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_nan_is_a_nan_but_not_every_nan_is_stale() {
        let stale = f64::from_bits(STALE_NAN_BITS);
        assert!(stale.is_nan());
        assert!(is_stale_nan(stale));
        assert!(!is_stale_nan(f64::NAN));
    }

    #[test]
    fn samples_compare_by_bits() {
        let a = Sample { t: 1, v: f64::NAN };
        assert!(a.same_as(&a));
        let stale = Sample {
            t: 1,
            v: f64::from_bits(STALE_NAN_BITS),
        };
        assert!(!a.same_as(&stale));
    }
}
