//! Aggregation operators (`sum`, `avg`, `min`, `max`, `count`, `group`, `stddev`, `stdvar`,
//! `topk`, `bottomk`, `quantile`, `count_values`) with `by` and `without`, step by step as
//! prometheus/promql/engine.go `aggregation` computes them.

use super::eval::Evaluator;
use super::functions::{cmp_nan_last, quantile};
use super::value::Value;
use super::QueryError;
use crate::model::{labels::is_valid_label_name, Label, Labels, SeriesSamples, METRIC_NAME_LABEL};
use promql_parser::parser::{AggregateExpr, LabelModifier};
use std::collections::HashMap;

/// The output labels of a series' group: `by` keeps the listed labels, `without` drops them and
/// the metric name.
fn group_labels(labels: &Labels, modifier: &Option<LabelModifier>) -> Labels {
    match modifier {
        None => Labels::empty(),
        Some(LabelModifier::Include(names)) => Labels::from_trusted(
            labels
                .iter()
                .filter(|l| names.labels.iter().any(|n| n == &l.name))
                .cloned()
                .collect(),
        ),
        Some(LabelModifier::Exclude(names)) => Labels::from_trusted(
            labels
                .iter()
                .filter(|l| {
                    l.name != METRIC_NAME_LABEL && !names.labels.iter().any(|n| n == &l.name)
                })
                .cloned()
                .collect(),
        ),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Sum,
    Avg,
    Min,
    Max,
    Count,
    Group,
    Stddev,
    Stdvar,
    Topk,
    Bottomk,
    Quantile,
    CountValues,
}

/// Whether Prometheus 2.42 has an aggregation of this name.
pub(super) fn is_known(op: &str) -> bool {
    op_by_name(op).is_some()
}

fn op_by_name(op: &str) -> Option<Op> {
    Some(match op {
        "sum" => Op::Sum,
        "avg" => Op::Avg,
        "min" => Op::Min,
        "max" => Op::Max,
        "count" => Op::Count,
        "group" => Op::Group,
        "stddev" => Op::Stddev,
        "stdvar" => Op::Stdvar,
        "topk" => Op::Topk,
        "bottomk" => Op::Bottomk,
        "quantile" => Op::Quantile,
        "count_values" => Op::CountValues,
        _ => return None,
    })
}

fn op_of(agg: &AggregateExpr) -> Result<Op, QueryError> {
    let name = agg.op.to_string();
    op_by_name(&name)
        .ok_or_else(|| QueryError::Execution(format!("aggregation {name} is not supported")))
}

/// Running state of one group at one step.
struct Group {
    value: f64,
    mean: f64,
    count: usize,
    /// topk/bottomk members (series index, value), quantile values.
    members: Vec<(usize, f64)>,
}

pub(super) fn eval(ev: &mut Evaluator, agg: &AggregateExpr) -> Result<Value, QueryError> {
    let op = op_of(agg)?;
    let mut param_scalar: Option<Vec<f64>> = None;
    let mut param_string: Option<String> = None;
    if let Some(param) = &agg.param {
        match ev.eval(param)? {
            Value::Scalar(values) => param_scalar = Some(values),
            Value::String(s) => param_string = Some(s),
            _ => {
                return Err(QueryError::Execution(
                    "aggregation parameter must be a scalar or a string".into(),
                ))
            }
        }
    }
    let input = ev.eval_vector(&agg.expr)?;
    if op == Op::CountValues {
        let label = param_string.unwrap_or_default();
        if !is_valid_label_name(&label) {
            return Err(QueryError::Execution(format!(
                "invalid label name {label:?}"
            )));
        }
        return count_values(ev, &input, &agg.modifier, &label);
    }

    // Groups are fixed per series: compute each series' group once.
    let mut group_of = Vec::with_capacity(input.len());
    let mut group_index: HashMap<Labels, usize> = HashMap::new();
    let mut groups: Vec<Labels> = Vec::new();
    for s in &input {
        let labels = group_labels(&s.labels, &agg.modifier);
        let i = match group_index.get(&labels) {
            Some(&i) => i,
            None => {
                group_index.insert(labels.clone(), groups.len());
                groups.push(labels);
                groups.len() - 1
            }
        };
        group_of.push(i);
    }

    // Per-step state by group number, reused from step to step; `seen_at` tells whether a
    // group already has a value at this step.
    let keeps_members = matches!(op, Op::Topk | Op::Bottomk | Op::Quantile);
    let mut state: Vec<Group> = (0..groups.len())
        .map(|_| Group {
            value: 0.0,
            mean: 0.0,
            count: 0,
            members: Vec::new(),
        })
        .collect();
    let mut seen_at = vec![usize::MAX; groups.len()];
    let mut order: Vec<usize> = Vec::new();

    let series = ev.step_eval(&[&input], |step, _t, columns| {
        let column = &columns[0];
        let param = param_scalar.as_ref().map_or(0.0, |p| p[step]);
        let k = if matches!(op, Op::Topk | Op::Bottomk) {
            if !(param >= i64::MIN as f64 && param <= i64::MAX as f64) {
                return Err(QueryError::Execution(format!(
                    "Scalar value {param} overflows int64"
                )));
            }
            let k = param as i64;
            if k < 1 {
                return Ok(Vec::new());
            }
            k as usize
        } else {
            0
        };
        // Groups in order of first appearance at this step, as Prometheus emits them.
        order.clear();
        for &(i, v) in column {
            let g = group_of[i];
            let group = &mut state[g];
            if seen_at[g] != step {
                seen_at[g] = step;
                order.push(g);
                group.value = match op {
                    Op::Stddev | Op::Stdvar => 0.0,
                    Op::Group => 1.0,
                    _ => v,
                };
                group.mean = v;
                group.count = 1;
                group.members.clear();
                if keeps_members {
                    group.members.push((i, v));
                }
                continue;
            }
            group.count += 1;
            match op {
                Op::Sum => group.value += v,
                Op::Avg => {
                    // Incremental mean, kept infinite once it is (engine.go AVG).
                    let n = group.count as f64;
                    if group.mean.is_infinite() {
                        if v.is_infinite() && (group.mean > 0.0) == (v > 0.0) {
                            continue;
                        }
                        if !v.is_infinite() && !v.is_nan() {
                            continue;
                        }
                    }
                    group.mean += v / n - group.mean / n;
                }
                Op::Group | Op::Count => {}
                Op::Max => {
                    if group.value < v || group.value.is_nan() {
                        group.value = v;
                    }
                }
                Op::Min => {
                    if group.value > v || group.value.is_nan() {
                        group.value = v;
                    }
                }
                Op::Stddev | Op::Stdvar => {
                    let delta = v - group.mean;
                    group.mean += delta / group.count as f64;
                    group.value += delta * (v - group.mean);
                }
                Op::Topk | Op::Bottomk => push_k(&mut group.members, (i, v), k, op == Op::Topk),
                Op::Quantile => group.members.push((i, v)),
                Op::CountValues => unreachable!("handled above"),
            }
        }
        let mut out = Vec::with_capacity(order.len());
        for &g in &order {
            let group = &state[g];
            let value = match op {
                Op::Avg => group.mean,
                Op::Count => group.count as f64,
                Op::Stdvar => group.value / group.count as f64,
                Op::Stddev => (group.value / group.count as f64).sqrt(),
                Op::Quantile => quantile(param, group.members.iter().map(|m| m.1).collect()),
                Op::Topk | Op::Bottomk => {
                    let mut members = group.members.clone();
                    sort_k(&mut members, op == Op::Topk);
                    out.extend(
                        members
                            .into_iter()
                            .map(|(i, v)| (input[i].labels.clone(), v)),
                    );
                    continue;
                }
                _ => group.value,
            };
            out.push((groups[g].clone(), value));
        }
        Ok(out)
    })?;
    Ok(Value::Vector(series))
}

/// Prometheus's value heap order (engine.go `vectorByValueHeap`, and its reverse for bottomk):
/// NaN is always "less", so it is the first to go.
fn heap_less(a: f64, b: f64, top: bool) -> bool {
    if a.is_nan() {
        return true;
    }
    if top {
        a < b
    } else {
        a > b
    }
}

/// Go's `container/heap` up and down, so that ties resolve exactly as in Prometheus.
fn heap_up(h: &mut [(usize, f64)], mut j: usize, top: bool) {
    while j > 0 {
        let i = (j - 1) / 2;
        if !heap_less(h[j].1, h[i].1, top) {
            break;
        }
        h.swap(i, j);
        j = i;
    }
}

fn heap_down(h: &mut [(usize, f64)], mut i: usize, n: usize, top: bool) {
    loop {
        let j1 = 2 * i + 1;
        if j1 >= n {
            break;
        }
        let mut j = j1;
        if j1 + 1 < n && heap_less(h[j1 + 1].1, h[j1].1, top) {
            j = j1 + 1;
        }
        if !heap_less(h[j].1, h[i].1, top) {
            break;
        }
        h.swap(i, j);
        i = j;
    }
}

/// Offers a sample to a topk/bottomk group's heap (engine.go `aggregation`, TOPK/BOTTOMK).
fn push_k(heap: &mut Vec<(usize, f64)>, candidate: (usize, f64), k: usize, top: bool) {
    let root = heap[0].1;
    let better = if top {
        root < candidate.1
    } else {
        root > candidate.1
    };
    if heap.len() < k || better || root.is_nan() {
        if heap.len() == k {
            if k == 1 {
                heap[0] = candidate;
                return;
            }
            let n = heap.len() - 1;
            heap.swap(0, n);
            heap_down(heap, 0, n, top);
            heap.pop();
        }
        heap.push(candidate);
        let last = heap.len() - 1;
        heap_up(heap, last, top);
    }
}

/// Orders topk output largest first, bottomk smallest first (NaN last in both).
fn sort_k(members: &mut [(usize, f64)], top: bool) {
    members.sort_by(|a, b| cmp_nan_last(a.1, b.1, top));
}

/// `count_values("label", v)`: counts series per distinct value, the value (Go's shortest
/// float format) becoming a label.
fn count_values(
    ev: &mut Evaluator,
    input: &[SeriesSamples],
    modifier: &Option<LabelModifier>,
    label: &str,
) -> Result<Value, QueryError> {
    let series = ev.step_eval(&[input], |_step, _t, columns| {
        let mut counts: Vec<(Labels, f64)> = Vec::new();
        let mut index: HashMap<Labels, usize> = HashMap::new();
        for &(i, v) in &columns[0] {
            let mut labels: Vec<Label> = input[i]
                .labels
                .iter()
                .filter(|l| l.name != label)
                .cloned()
                .collect();
            labels.push(Label::new(label, format_go_float(v)));
            let with_value = Labels::from_trusted(labels);
            // `by` (or no modifier) groups by the listed labels plus the value label.
            let group = match modifier {
                Some(LabelModifier::Exclude(_)) => group_labels(&with_value, modifier),
                Some(LabelModifier::Include(names)) => {
                    let mut names = names.clone();
                    names.labels.push(label.to_owned());
                    group_labels(&with_value, &Some(LabelModifier::Include(names)))
                }
                None => {
                    Labels::from_trusted(vec![Label::new(label, with_value.value_or_empty(label))])
                }
            };
            match index.get(&group) {
                Some(&g) => counts[g].1 += 1.0,
                None => {
                    index.insert(group.clone(), counts.len());
                    counts.push((group, 1.0));
                }
            }
        }
        Ok(counts)
    })?;
    Ok(Value::Vector(series))
}

/// Go's `strconv.FormatFloat(v, 'f', -1, 64)` with Prometheus's special values.
fn format_go_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}
