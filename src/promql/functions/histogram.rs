//! `histogram_quantile` over classic buckets and the quantile used by `quantile` and
//! `quantile_over_time` (prometheus/promql/quantile.go).

use crate::model::{Labels, METRIC_NAME_LABEL};
use crate::promql::eval::Evaluator;
use crate::promql::value::Value;
use crate::promql::QueryError;
use promql_parser::parser::Call;
use std::collections::HashMap;

const BUCKET_LABEL: &str = "le";

/// The φ-quantile of `values`, interpolating between the nearest ranks; NaN sorts first
/// (quantile.go `quantile`).
pub(crate) fn quantile(q: f64, mut values: Vec<f64>) -> f64 {
    if values.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    values.sort_by(|a, b| match (a.is_nan(), b.is_nan()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
        _ => a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal),
    });
    let n = values.len() as f64;
    let rank = q * (n - 1.0);
    let lower = rank.floor().max(0.0);
    let upper = (lower + 1.0).min(n - 1.0);
    let weight = rank - rank.floor();
    values[lower as usize] * (1.0 - weight) + values[upper as usize] * weight
}

/// The quantile of cumulative buckets `(upper bound, count)`: needs a `+Inf` bucket; merges
/// equal bounds and repairs non-monotonic counts as Prometheus does (quantile.go
/// `bucketQuantile`, `coalesceBuckets`, `ensureMonotonic`).
pub(crate) fn bucket_quantile(q: f64, mut buckets: Vec<(f64, f64)>) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) {
        return f64::NAN;
    }
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(buckets.len());
    for (bound, count) in buckets {
        match merged.last_mut() {
            Some(last) if last.0 == bound => last.1 += count,
            _ => merged.push((bound, count)),
        }
    }
    let mut max = merged[0].1;
    for b in merged.iter_mut().skip(1) {
        if b.1 > max {
            max = b.1;
        } else if b.1 < max {
            b.1 = max;
        }
    }
    if merged.len() < 2 {
        return f64::NAN;
    }
    let observations = merged[merged.len() - 1].1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let b = merged[..merged.len() - 1]
        .iter()
        .position(|b| b.1 >= rank)
        .unwrap_or(merged.len() - 1);
    if b == merged.len() - 1 {
        return merged[merged.len() - 2].0;
    }
    if b == 0 && merged[0].0 <= 0.0 {
        return merged[0].0;
    }
    let (mut start, end, mut count) = (0.0, merged[b].0, merged[b].1);
    if b > 0 {
        start = merged[b - 1].0;
        count -= merged[b - 1].1;
        rank -= merged[b - 1].1;
    }
    start + (end - start) * (rank / count)
}

/// Parses an `le` value as Go's `strconv.ParseFloat` would for bucket bounds.
fn parse_bound(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// `histogram_quantile(φ, buckets)`: per step, groups bucket series by their labels without
/// `le`, and computes the quantile of each group; series without a parsable `le` are ignored.
pub(super) fn histogram_quantile(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    let q = ev.eval_scalar(&call.args.args[0])?;
    let input = ev.eval_vector(&call.args.args[1])?;
    // Group and bound of each series, computed once.
    let mut group_index: HashMap<Labels, usize> = HashMap::new();
    let mut group_labels: Vec<Labels> = Vec::new();
    let mut membership: Vec<Option<(usize, f64)>> = Vec::with_capacity(input.len());
    for s in &input {
        let Some(bound) = s.labels.get(BUCKET_LABEL).and_then(parse_bound) else {
            membership.push(None);
            continue;
        };
        let key = Labels::from_trusted(
            s.labels
                .iter()
                .filter(|l| l.name != BUCKET_LABEL)
                .cloned()
                .collect(),
        );
        let next = group_labels.len();
        let g = *group_index.entry(key.clone()).or_insert(next);
        if g == next {
            group_labels.push(Labels::from_trusted(
                key.iter()
                    .filter(|l| l.name != METRIC_NAME_LABEL)
                    .cloned()
                    .collect(),
            ));
        }
        membership.push(Some((g, bound)));
    }
    let series = ev.step_eval(&[&input], |step, _t, columns| {
        let mut buckets: HashMap<usize, Vec<(f64, f64)>> = HashMap::new();
        for &(i, v) in &columns[0] {
            if let Some((g, bound)) = membership[i] {
                buckets.entry(g).or_default().push((bound, v));
            }
        }
        // Prometheus emits groups in map order; sort for a stable answer.
        let mut out: Vec<(Labels, f64)> = buckets
            .into_iter()
            .map(|(g, b)| (group_labels[g].clone(), bucket_quantile(q[step], b)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    })?;
    Ok(Value::Vector(series))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_between_ranks() {
        assert_eq!(quantile(0.5, vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(quantile(0.0, vec![f64::NAN, 1.0]).is_nan());
        assert_eq!(quantile(2.0, vec![1.0]), f64::INFINITY);
        assert_eq!(quantile(-1.0, vec![1.0]), f64::NEG_INFINITY);
    }

    #[test]
    fn bucket_quantile_follows_prometheus() {
        let buckets = vec![(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (f64::INFINITY, 40.0)];
        assert!((bucket_quantile(0.5, buckets.clone()) - 0.3).abs() < 1e-12);
        assert!((bucket_quantile(0.99, buckets) - 0.98).abs() < 1e-12);
        assert!(
            bucket_quantile(0.5, vec![(1.0, 1.0)]).is_nan(),
            "no +Inf bucket"
        );
        // Non-monotonic counts are repaired upwards.
        let broken = vec![(1.0, 10.0), (2.0, 5.0), (f64::INFINITY, 10.0)];
        assert_eq!(bucket_quantile(0.5, broken), 0.5);
    }
}
