//! Aggregation operators (`sum`, `avg`, `min`, `max`, `count`, `group`, `stddev`, `stdvar`,
//! `topk`, `bottomk`, `quantile`, `count_values`) with `by` and `without`, step by step as
//! prometheus/promql/engine.go `aggregation` computes them.

use super::eval::{Evaluator, Streamed};
use super::functions::{cmp_nan_last, quantile};
use super::value::Value;
use super::QueryError;
use crate::model::{
    labels::is_valid_label_name, Label, Labels, Sample, SeriesSamples, METRIC_NAME_LABEL,
};
use promql_parser::parser::{AggregateExpr, LabelModifier};
use std::collections::HashMap;
use std::ops::Range;

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

/// Running value of one group at one step for the operators that fold values one by one
/// (all but topk, bottomk, quantile and count_values): the operations and their order are
/// engine.go `aggregation`'s, so every path that uses it gives the same bits.
#[derive(Clone, Copy)]
struct Acc {
    value: f64,
    mean: f64,
    /// Values folded; 0: none yet.
    count: usize,
}

impl Acc {
    const EMPTY: Acc = Acc {
        value: 0.0,
        mean: 0.0,
        count: 0,
    };

    /// The state after the group's first value at a step.
    fn start(op: Op, v: f64) -> Acc {
        Acc {
            value: match op {
                Op::Stddev | Op::Stdvar => 0.0,
                Op::Group => 1.0,
                _ => v,
            },
            mean: v,
            count: 1,
        }
    }

    /// Folds in one more value (topk, bottomk and quantile keep members instead).
    fn add(&mut self, op: Op, v: f64) {
        self.count += 1;
        match op {
            Op::Sum => self.value += v,
            Op::Avg => {
                // Incremental mean, kept infinite once it is (engine.go AVG).
                let n = self.count as f64;
                if self.mean.is_infinite() {
                    if v.is_infinite() && (self.mean > 0.0) == (v > 0.0) {
                        return;
                    }
                    if !v.is_infinite() && !v.is_nan() {
                        return;
                    }
                }
                self.mean += v / n - self.mean / n;
            }
            Op::Group | Op::Count => {}
            Op::Max => {
                if self.value < v || self.value.is_nan() {
                    self.value = v;
                }
            }
            Op::Min => {
                if self.value > v || self.value.is_nan() {
                    self.value = v;
                }
            }
            Op::Stddev | Op::Stdvar => {
                let delta = v - self.mean;
                self.mean += delta / self.count as f64;
                self.value += delta * (v - self.mean);
            }
            Op::Topk | Op::Bottomk | Op::Quantile | Op::CountValues => {}
        }
    }

    /// The group's value at the step.
    fn result(&self, op: Op) -> f64 {
        match op {
            Op::Avg => self.mean,
            Op::Count => self.count as f64,
            Op::Stdvar => self.value / self.count as f64,
            Op::Stddev => (self.value / self.count as f64).sqrt(),
            _ => self.value,
        }
    }
}

/// Running state of one group at one step.
struct Group {
    acc: Acc,
    /// topk/bottomk members (series index, value), quantile values.
    members: Vec<(usize, f64)>,
}

/// Each series' group number, and each group's labels in order of first appearance.
fn groups<'a>(
    labels: impl Iterator<Item = &'a Labels>,
    modifier: &Option<LabelModifier>,
    drops_metric_name: bool,
) -> (Vec<usize>, Vec<Labels>) {
    let mut group_of = Vec::new();
    let mut group_index: HashMap<Labels, usize> = HashMap::new();
    let mut groups: Vec<Labels> = Vec::new();
    for labels in labels {
        let mut labels = group_labels(labels, modifier);
        if drops_metric_name {
            labels.drop_metric_name();
        }
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
    (group_of, groups)
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
    let folds = !matches!(op, Op::Topk | Op::Bottomk | Op::Quantile | Op::CountValues);
    if folds {
        if let Some(input) = ev.streamed(&agg.expr)? {
            return streamed(ev, op, &agg.modifier, input);
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

    step_by_step(ev, op, &agg.modifier, param_scalar.as_deref(), input)
}

/// An aggregation evaluated step by step over its argument's held points (engine.go
/// `aggregation`): every operator but `count_values`.
fn step_by_step(
    ev: &mut Evaluator,
    op: Op,
    modifier: &Option<LabelModifier>,
    param_scalar: Option<&[f64]>,
    input: Vec<SeriesSamples>,
) -> Result<Value, QueryError> {
    // Groups are fixed per series: compute each series' group once.
    let (group_of, groups) = groups(input.iter().map(|s| &s.labels), modifier, false);

    // Per-step state by group number, reused from step to step; `seen_at` tells whether a
    // group already has a value at this step.
    let keeps_members = matches!(op, Op::Topk | Op::Bottomk | Op::Quantile);
    let mut state: Vec<Group> = (0..groups.len())
        .map(|_| Group {
            acc: Acc::EMPTY,
            members: Vec::new(),
        })
        .collect();
    let mut seen_at = vec![usize::MAX; groups.len()];
    let mut order: Vec<usize> = Vec::new();

    let series = ev.step_eval(&[&input], |step, _t, columns| {
        let column = &columns[0];
        let param = param_scalar.map_or(0.0, |p| p[step]);
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
                group.acc = Acc::start(op, v);
                group.members.clear();
                if keeps_members {
                    group.members.push((i, v));
                }
                continue;
            }
            match op {
                Op::Topk | Op::Bottomk => {
                    group.acc.count += 1;
                    push_k(&mut group.members, (i, v), k, op == Op::Topk)
                }
                Op::Quantile => {
                    group.acc.count += 1;
                    group.members.push((i, v))
                }
                _ => group.acc.add(op, v),
            }
        }
        let mut out = Vec::with_capacity(order.len());
        for &g in &order {
            let group = &state[g];
            let value = match op {
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
                _ => group.acc.result(op),
            };
            out.push((groups[g].clone(), value));
        }
        Ok(out)
    })?;
    Ok(Value::Vector(series))
}

/// One block of steps of a streamed aggregation: each group's state at each step of the
/// block (`groups x steps`, by group), and each group's first point in the block as
/// (step, series index).
struct Block {
    steps: Range<usize>,
    acc: Vec<Acc>,
    first: Vec<(usize, usize)>,
}

/// An aggregation that folds values one by one over a [`Streamed`] input: each series'
/// points are computed and folded into their group's state at once, series after series,
/// never held. The steps are split into blocks folded on the query threads side by side;
/// within a block, every group's state at every step sees its values in series order, as
/// step-by-step evaluation does, so the bits are the same. Groups come out in the order
/// step-by-step evaluation creates them (first step with a value, then first series at it).
fn streamed(
    ev: &mut Evaluator,
    op: Op,
    modifier: &Option<LabelModifier>,
    input: Streamed,
) -> Result<Value, QueryError> {
    let Streamed {
        series,
        step_fn,
        drops_metric_name,
    } = input;
    let (group_of, groups) = groups(
        series.iter().map(|s| &s.labels),
        modifier,
        drops_metric_name,
    );
    let range = ev.range;
    let steps = range.steps();
    if series.is_empty() {
        return Ok(Value::Vector(Vec::new()));
    }
    // The state is groups x steps whatever the data: past what is left of the sample limit
    // (many groups, or a subquery's many steps), hold the points and go step by step, which
    // fails at the limit as it always did.
    if groups.len().saturating_mul(steps) > ev.samples_left() {
        let input = ev.hold(Streamed {
            series,
            step_fn,
            drops_metric_name,
        })?;
        return step_by_step(ev, op, modifier, None, input);
    }
    let points = series.len().saturating_mul(steps);
    let threads = ev.threads_for(points);
    let budget = ev.budget();
    let fold_block = |block: Range<usize>| -> Result<Block, QueryError> {
        let len = block.len();
        let mut acc = vec![Acc::EMPTY; groups.len().saturating_mul(len)];
        let mut first = vec![(usize::MAX, usize::MAX); groups.len()];
        for (i, s) in series.iter().enumerate() {
            if i % 256 == 0 {
                budget.check(0)?;
            }
            let g = group_of[i];
            let row = &mut acc[g * len..(g + 1) * len];
            let first = &mut first[g];
            // The points the argument produces count as they would have if it were held.
            let mut folded = 0usize;
            step_fn.points(
                &s.samples,
                range,
                block.clone(),
                |held| budget.check(held),
                |step, _t, v| {
                    folded += 1;
                    let state = &mut row[step - block.start];
                    if state.count == 0 {
                        *state = Acc::start(op, v);
                        if step < first.0 {
                            *first = (step, i);
                        }
                    } else {
                        state.add(op, v);
                    }
                },
            )?;
            budget.charge(folded)?;
        }
        Ok(Block {
            steps: block,
            acc,
            first,
        })
    };
    let blocks = if threads > 1 && steps > 1 {
        // Two blocks per thread, so a busy thread holds up the others less; not more, as
        // every block reads each series again.
        let n = steps.min(threads * 2);
        (0..n).map(|b| b * steps / n..(b + 1) * steps / n).collect()
    } else {
        std::iter::once(0..steps).collect()
    };
    let blocks = ev.map_items(blocks, points, 1, fold_block)?;
    ev.settle(budget);
    // The input's series (tens of thousands of label sets and sample vectors) are freed on
    // a query thread while the answer is assembled and sent, not before it.
    rayon::spawn(move || drop(series));

    let mut first = vec![(usize::MAX, usize::MAX); groups.len()];
    for block in &blocks {
        for (earliest, &f) in first.iter_mut().zip(&block.first) {
            *earliest = (*earliest).min(f);
        }
    }
    let mut order: Vec<usize> = (0..groups.len())
        .filter(|&g| first[g].0 != usize::MAX)
        .collect();
    order.sort_by_key(|&g| first[g]);
    let mut out = Vec::with_capacity(order.len());
    let mut produced = 0usize;
    for g in order {
        let mut samples = Vec::new();
        for block in &blocks {
            let len = block.steps.len();
            for (step, state) in block.steps.clone().zip(&block.acc[g * len..(g + 1) * len]) {
                if state.count > 0 {
                    samples.push(Sample {
                        t: range.start + step as i64 * range.step,
                        v: state.result(op),
                    });
                }
            }
        }
        produced += samples.len();
        out.push(SeriesSamples {
            labels: groups[g].clone(),
            samples,
        });
    }
    ev.account(produced)?;
    Ok(Value::Vector(out))
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
