//! The write batch storage takes: every series of a request in a few flat buffers (label text,
//! label spans, samples), each series with its label fingerprint computed once.
//!
//! A request of a thousand series costs a handful of allocations however many labels it
//! carries; a backend materialises owned [`Labels`] only for a series it has not seen before.

use crate::model::{LabelSpan, Labels, LabelsRef, Sample};
use std::ops::Range;

/// Samples of one series, with owned labels (already validated and sorted): the convenient form
/// for producers that build label sets anyway; [`WriteBatch::from_series`] takes them.
#[derive(Clone, Debug)]
pub struct SeriesWrite {
    pub labels: Labels,
    pub samples: Vec<Sample>,
}

#[derive(Clone, Debug)]
struct Entry {
    fingerprint: u128,
    labels: Range<usize>,
    samples: Range<usize>,
}

/// Series to store. A series may appear more than once; backends judge every sample on its own
/// (order, duplicates) as if the series came once with all of them.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    text: String,
    spans: Vec<LabelSpan>,
    samples: Vec<Sample>,
    series: Vec<Entry>,
}

/// One series of a [`WriteBatch`].
#[derive(Clone, Copy, Debug)]
pub struct SeriesRef<'a> {
    pub labels: LabelsRef<'a>,
    /// [`Labels::fingerprint`] of `labels`.
    pub fingerprint: u128,
    pub samples: &'a [Sample],
}

impl WriteBatch {
    /// An empty batch with room for about `series` series of `samples` samples in all.
    pub fn with_capacity(series: usize, samples: usize) -> WriteBatch {
        WriteBatch {
            text: String::with_capacity(series * 64),
            spans: Vec::with_capacity(series * 8),
            samples: Vec::with_capacity(samples),
            series: Vec::with_capacity(series),
        }
    }

    pub fn from_series(series: &[SeriesWrite]) -> WriteBatch {
        let mut batch =
            WriteBatch::with_capacity(series.len(), series.iter().map(|s| s.samples.len()).sum());
        for s in series {
            batch.push(s.labels.pairs(), s.samples.iter().copied());
        }
        batch
    }

    /// The series of these label sets, without samples (to resolve their ids).
    pub fn of_labels<'l>(labels: impl ExactSizeIterator<Item = &'l Labels>) -> WriteBatch {
        let mut batch = WriteBatch::with_capacity(labels.len(), 0);
        for set in labels {
            batch.push(set.pairs(), []);
        }
        batch
    }

    /// Adds a series. `labels` must be a set valid as [`Labels`] (sorted by name, unique, no
    /// empty values): validated by [`Labels`] or [`crate::model::labels::validate_wire_pairs`].
    pub fn push<'l>(
        &mut self,
        labels: impl Iterator<Item = (&'l str, &'l str)>,
        samples: impl IntoIterator<Item = Sample>,
    ) {
        let first_span = self.spans.len();
        for (name, value) in labels {
            let start = self.text.len();
            self.text.push_str(name);
            let value_start = self.text.len();
            self.text.push_str(value);
            self.spans.push(LabelSpan {
                name: start,
                value: value_start,
                end: self.text.len(),
            });
        }
        let labels = first_span..self.spans.len();
        let first_sample = self.samples.len();
        self.samples.extend(samples);
        let fingerprint = self.labels(&labels).fingerprint();
        self.series.push(Entry {
            fingerprint,
            labels,
            samples: first_sample..self.samples.len(),
        });
    }

    fn labels(&self, range: &Range<usize>) -> LabelsRef<'_> {
        LabelsRef::new(&self.text, &self.spans[range.clone()])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = SeriesRef<'_>> + '_ {
        self.series.iter().map(|e| SeriesRef {
            labels: self.labels(&e.labels),
            fingerprint: e.fingerprint,
            samples: &self.samples[e.samples.clone()],
        })
    }

    /// This batch without the series at `positions` (ascending, as [`WriteBatch::iter`]
    /// numbers them).
    pub fn without(&self, positions: &[usize]) -> WriteBatch {
        let mut out = WriteBatch::with_capacity(self.len(), self.sample_count());
        let mut skip = positions.iter().peekable();
        for (i, series) in self.iter().enumerate() {
            if skip.next_if_eq(&&i).is_some() {
                continue;
            }
            out.push(series.labels.iter(), series.samples.iter().copied());
        }
        out
    }

    /// Number of series entries.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    pub fn sample_count(&self) -> usize {
        self.samples.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Label;

    #[test]
    fn keeps_each_series_with_its_labels_samples_and_fingerprint() {
        let up =
            Labels::from_wire(vec![Label::new("__name__", "up"), Label::new("job", "a")]).unwrap();
        let down = Labels::from_wire(vec![Label::new("__name__", "down")]).unwrap();
        let series = [
            SeriesWrite {
                labels: up.clone(),
                samples: vec![Sample { t: 1, v: 1.0 }, Sample { t: 2, v: 2.0 }],
            },
            SeriesWrite {
                labels: down.clone(),
                samples: vec![],
            },
            SeriesWrite {
                labels: up.clone(),
                samples: vec![Sample { t: 3, v: 3.0 }],
            },
        ];
        let batch = WriteBatch::from_series(&series);
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.sample_count(), 3);
        let seen: Vec<(Labels, u128, Vec<i64>)> = batch
            .iter()
            .map(|s| {
                (
                    s.labels.to_labels(),
                    s.fingerprint,
                    s.samples.iter().map(|s| s.t).collect(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (up.clone(), up.fingerprint(), vec![1, 2]),
                (down.clone(), down.fingerprint(), vec![]),
                (up.clone(), up.fingerprint(), vec![3]),
            ]
        );
        let rest = batch.without(&[0, 2]);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest.sample_count(), 0);
        let only = rest.iter().next().unwrap();
        assert_eq!(
            (only.labels.to_labels(), only.fingerprint),
            (down.clone(), down.fingerprint())
        );
        let first = batch.iter().next().unwrap();
        assert_eq!(first.labels.to_string(), up.to_string());
        assert_eq!(first.labels.metric_name(), Some("up"));
        assert_eq!(first.labels.get("job"), Some("a"));
        assert_eq!(first.labels.get("instance"), None);
    }
}
