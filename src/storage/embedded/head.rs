//! The in-memory state of the embedded engine: series with their samples, a postings index
//! per tenant (label name → value → series ids) and metadata. Everything here is rebuilt from
//! the write-ahead log on start.

use crate::model::{
    matches_all, Exemplar, Labels, MatchOp, Matcher, MetricMetadata, Sample, SeriesExemplars,
    TimestampMs,
};
use std::collections::{BTreeMap, HashMap};

pub(super) struct SeriesData {
    pub labels: Labels,
    /// Sorted by time, unique timestamps.
    pub samples: Vec<Sample>,
    pub exemplars: Vec<Exemplar>,
}

#[derive(Default)]
pub(super) struct TenantIndex {
    pub by_fingerprint: HashMap<u128, u64>,
    /// label name → value → series ids (ascending).
    pub postings: HashMap<String, HashMap<String, Vec<u64>>>,
    pub all: Vec<u64>,
    pub metadata: BTreeMap<String, Vec<MetricMetadata>>,
}

#[derive(Default)]
pub(super) struct Head {
    pub series: HashMap<u64, SeriesData>,
    pub tenants: HashMap<String, TenantIndex>,
    pub next_id: u64,
}

/// Where a sample goes in a series, or why it does not.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Placement {
    /// New timestamp: store it.
    Insert,
    /// Same timestamp and value bits as stored: nothing to do (a sender's retry).
    Duplicate,
    /// Same timestamp, other value.
    Conflict,
    /// Older than the out-of-order window allows.
    TooOld,
}

/// Decides a sample's fate against what a series holds (`samples` sorted).
pub(super) fn place(samples: &[Sample], sample: &Sample, window_ms: i64) -> Placement {
    match samples.binary_search_by_key(&sample.t, |s| s.t) {
        Ok(i) if samples[i].v.to_bits() == sample.v.to_bits() => Placement::Duplicate,
        Ok(_) => Placement::Conflict,
        Err(i) if i < samples.len() => {
            let latest = samples[samples.len() - 1].t;
            if sample.t >= latest.saturating_sub(window_ms) {
                Placement::Insert
            } else {
                Placement::TooOld
            }
        }
        Err(_) => Placement::Insert,
    }
}

/// Inserts keeping order (appends in the common case).
pub(super) fn insert_sample(samples: &mut Vec<Sample>, sample: Sample) {
    match samples.last() {
        Some(last) if last.t >= sample.t => {
            if let Err(i) = samples.binary_search_by_key(&sample.t, |s| s.t) {
                samples.insert(i, sample);
            }
        }
        _ => samples.push(sample),
    }
}

impl Head {
    pub fn create_series(&mut self, tenant: &str, id: u64, labels: Labels) {
        let index = self.tenants.entry(tenant.to_owned()).or_default();
        index.by_fingerprint.insert(labels.fingerprint(), id);
        for label in labels.iter() {
            index
                .postings
                .entry(label.name.clone())
                .or_default()
                .entry(label.value.clone())
                .or_default()
                .push(id);
        }
        index.all.push(id);
        self.series.insert(
            id,
            SeriesData {
                labels,
                samples: Vec::new(),
                exemplars: Vec::new(),
            },
        );
        self.next_id = self.next_id.max(id + 1);
    }

    pub fn add_metadata(&mut self, tenant: &str, metadata: MetricMetadata) {
        let entries = self
            .tenants
            .entry(tenant.to_owned())
            .or_default()
            .metadata
            .entry(metadata.metric_family_name.clone())
            .or_default();
        if !entries.contains(&metadata) {
            entries.push(metadata);
        }
    }

    /// Series ids of a tenant matching every matcher: postings intersect the equality
    /// matchers; the rest are checked on the labels.
    pub fn matching(&self, tenant: &str, matchers: &[Matcher]) -> Vec<u64> {
        let Some(index) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        let mut candidates: Option<Vec<u64>> = None;
        for m in matchers {
            if let MatchOp::Equal(value) = &m.op {
                if value.is_empty() {
                    continue;
                }
                let ids = index
                    .postings
                    .get(&m.name)
                    .and_then(|values| values.get(value))
                    .cloned()
                    .unwrap_or_default();
                candidates = Some(match candidates {
                    None => ids,
                    Some(current) => intersect(&current, &ids),
                });
            }
        }
        let candidates = candidates.unwrap_or_else(|| index.all.clone());
        candidates
            .into_iter()
            .filter(|id| {
                self.series
                    .get(id)
                    .is_some_and(|s| matches_all(matchers, &s.labels))
            })
            .collect()
    }

    /// Whether a series has a sample in `[start, end]`.
    pub fn has_samples(&self, id: u64, start: TimestampMs, end: TimestampMs) -> bool {
        self.series.get(&id).is_some_and(|s| {
            let i = s.samples.partition_point(|p| p.t < start);
            i < s.samples.len() && s.samples[i].t <= end
        })
    }

    pub fn exemplars_in(
        &self,
        id: u64,
        start: TimestampMs,
        end: TimestampMs,
    ) -> Option<SeriesExemplars> {
        let s = self.series.get(&id)?;
        let exemplars: Vec<Exemplar> = s
            .exemplars
            .iter()
            .filter(|e| e.t >= start && e.t <= end)
            .cloned()
            .collect();
        (!exemplars.is_empty()).then(|| SeriesExemplars {
            labels: s.labels.clone(),
            exemplars,
        })
    }
}

fn intersect(a: &[u64], b: &[u64]) -> Vec<u64> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: i64, v: f64) -> Sample {
        Sample { t, v }
    }

    #[test]
    fn placement_follows_prometheus_duplicate_rules_and_the_window() {
        let samples = vec![s(10, 1.0), s(20, 2.0), s(30, 3.0)];
        assert_eq!(place(&samples, &s(40, 4.0), 0), Placement::Insert);
        assert_eq!(place(&samples, &s(20, 2.0), 0), Placement::Duplicate);
        assert_eq!(place(&samples, &s(20, 9.0), 0), Placement::Conflict);
        assert_eq!(place(&samples, &s(25, 9.0), 0), Placement::TooOld);
        assert_eq!(place(&samples, &s(25, 9.0), 10), Placement::Insert);
        assert_eq!(place(&samples, &s(5, 9.0), 10), Placement::TooOld);
        let mut v = samples.clone();
        insert_sample(&mut v, s(25, 9.0));
        insert_sample(&mut v, s(50, 5.0));
        assert_eq!(
            v.iter().map(|p| p.t).collect::<Vec<_>>(),
            [10, 20, 25, 30, 50]
        );
    }

    #[test]
    fn postings_intersect() {
        assert_eq!(intersect(&[1, 3, 5, 7], &[3, 4, 5, 8]), [3, 5]);
    }
}
