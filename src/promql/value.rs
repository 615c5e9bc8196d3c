//! Values during evaluation and the final result a query returns.

use super::EvalRange;
use crate::model::{Labels, Sample, SeriesSamples};

/// A value over all steps of an evaluation.
#[derive(Clone, Debug)]
pub enum Value {
    /// One value per step.
    Scalar(Vec<f64>),
    String(String),
    /// An instant vector at every step: each series holds its points at step timestamps.
    Vector(Vec<SeriesSamples>),
    /// A range vector (raw samples of a selector, or a subquery's points); only an instant
    /// query can return one, otherwise it is a function argument.
    Matrix(Vec<SeriesSamples>),
}

/// A query's answer, as the Prometheus HTTP API returns it.
#[derive(Clone, Debug, PartialEq)]
pub enum QueryValue {
    Scalar {
        t: i64,
        v: f64,
    },
    String {
        t: i64,
        v: String,
    },
    /// Each element: labels and one sample at the evaluation time.
    Vector(Vec<(Labels, Sample)>),
    Matrix(Vec<SeriesSamples>),
}

/// Turns an evaluated value into the answer: instant queries keep their type and their order;
/// range queries become a matrix sorted by labels, as Prometheus sorts them.
pub(super) fn finish(value: Value, range: EvalRange, instant: bool) -> QueryValue {
    if instant {
        let t = range.start;
        return match value {
            Value::Scalar(v) => QueryValue::Scalar { t, v: v[0] },
            Value::String(v) => QueryValue::String { t, v },
            Value::Vector(series) => QueryValue::Vector(
                series
                    .into_iter()
                    .filter_map(|s| s.samples.first().map(|p| (s.labels, Sample { t, v: p.v })))
                    .collect(),
            ),
            Value::Matrix(series) => QueryValue::Matrix(series),
        };
    }
    let mut series = match value {
        Value::Scalar(values) => vec![SeriesSamples {
            labels: Labels::empty(),
            samples: range
                .timestamps()
                .zip(values)
                .map(|(t, v)| Sample { t, v })
                .collect(),
        }],
        Value::Vector(series) | Value::Matrix(series) => series,
        // Rejected before evaluation: a range query must yield a scalar or a vector.
        Value::String(_) => Vec::new(),
    };
    series.retain(|s| !s.samples.is_empty());
    series.sort_by(|a, b| a.labels.cmp(&b.labels));
    QueryValue::Matrix(series)
}

/// Builds an instant vector step by step: samples output at each step are appended to the
/// series of the same labels (Prometheus's `rangeEval` output assembly).
pub(super) struct VectorBuilder {
    index: std::collections::HashMap<Labels, usize>,
    series: Vec<SeriesSamples>,
}

impl VectorBuilder {
    pub(super) fn new() -> Self {
        VectorBuilder {
            index: std::collections::HashMap::new(),
            series: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, labels: Labels, sample: Sample) {
        match self.index.get(&labels) {
            Some(&i) => self.series[i].samples.push(sample),
            None => {
                self.index.insert(labels.clone(), self.series.len());
                self.series.push(SeriesSamples {
                    labels,
                    samples: vec![sample],
                });
            }
        }
    }

    /// The timestamp of the latest sample of the series with these labels.
    pub(super) fn last_time(&self, labels: &Labels) -> Option<i64> {
        let &i = self.index.get(labels)?;
        self.series[i].samples.last().map(|p| p.t)
    }

    pub(super) fn finish(self) -> Vec<SeriesSamples> {
        self.series
    }
}
