//! Binary operators: arithmetic, comparison (with and without `bool`), and set operators,
//! between scalars and vectors, with `on`/`ignoring` and `group_left`/`group_right`
//! (prometheus/promql/engine.go `VectorBinop`, `VectorAnd`/`Or`/`Unless`, `VectorscalarBinop`).

use super::eval::{Evaluator, StepColumn};
use super::value::Value;
use super::QueryError;
use crate::model::{Label, Labels, SeriesSamples, METRIC_NAME_LABEL};
use promql_parser::parser::{BinaryExpr, LabelModifier, VectorMatchCardinality};
use std::collections::HashMap;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Atan2,
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    And,
    Or,
    Unless,
}

impl Op {
    fn parse(token: &str) -> Result<Op, QueryError> {
        Ok(match token {
            "+" => Op::Add,
            "-" => Op::Sub,
            "*" => Op::Mul,
            "/" => Op::Div,
            "%" => Op::Mod,
            "^" => Op::Pow,
            "atan2" => Op::Atan2,
            "==" => Op::Eq,
            "!=" => Op::Ne,
            ">" => Op::Gt,
            "<" => Op::Lt,
            ">=" => Op::Ge,
            "<=" => Op::Le,
            "and" => Op::And,
            "or" => Op::Or,
            "unless" => Op::Unless,
            other => {
                return Err(QueryError::Execution(format!(
                    "operator {other} is not supported"
                )))
            }
        })
    }

    fn is_comparison(self) -> bool {
        matches!(self, Op::Eq | Op::Ne | Op::Gt | Op::Lt | Op::Ge | Op::Le)
    }

    /// Arithmetic drops the metric name (engine.go `shouldDropMetricName`).
    fn drops_metric_name(self) -> bool {
        matches!(
            self,
            Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Mod | Op::Pow
        )
    }

    /// `(value, keep)` for two floats (engine.go `vectorElemBinop`); comparisons keep the
    /// left value when true.
    fn apply(self, l: f64, r: f64) -> (f64, bool) {
        match self {
            Op::Add => (l + r, true),
            Op::Sub => (l - r, true),
            Op::Mul => (l * r, true),
            Op::Div => (l / r, true),
            Op::Mod => (go_mod(l, r), true),
            Op::Pow => (l.powf(r), true),
            Op::Atan2 => (l.atan2(r), true),
            Op::Eq => (l, l == r),
            Op::Ne => (l, l != r),
            Op::Gt => (l, l > r),
            Op::Lt => (l, l < r),
            Op::Ge => (l, l >= r),
            Op::Le => (l, l <= r),
            Op::And | Op::Or | Op::Unless => (l, true),
        }
    }

    /// Between two scalars comparisons yield 0 or 1 (engine.go `scalarBinop`).
    fn scalar(self, l: f64, r: f64) -> f64 {
        let (v, keep) = self.apply(l, r);
        if self.is_comparison() {
            if keep {
                1.0
            } else {
                0.0
            }
        } else {
            v
        }
    }
}

/// Go's `math.Mod`: the result has the sign of `l` (Rust's `%` on f64 agrees).
fn go_mod(l: f64, r: f64) -> f64 {
    l % r
}

pub(super) fn eval(ev: &mut Evaluator, bin: &BinaryExpr) -> Result<Value, QueryError> {
    let op = Op::parse(&bin.op.to_string())?;
    let return_bool = bin.modifier.as_ref().is_some_and(|m| m.return_bool);
    let lhs = ev.eval(&bin.lhs)?;
    let rhs = ev.eval(&bin.rhs)?;
    match (lhs, rhs) {
        (Value::Scalar(l), Value::Scalar(r)) => Ok(Value::Scalar(
            l.iter().zip(&r).map(|(&a, &b)| op.scalar(a, b)).collect(),
        )),
        (Value::Vector(l), Value::Scalar(r)) => vector_scalar(ev, op, l, &r, false, return_bool),
        (Value::Scalar(l), Value::Vector(r)) => vector_scalar(ev, op, r, &l, true, return_bool),
        (Value::Vector(l), Value::Vector(r)) => vector_vector(ev, op, bin, &l, &r, return_bool),
        _ => Err(QueryError::Execution(format!(
            "binary operator {} needs scalar or vector operands",
            bin.op
        ))),
    }
}

/// A vector and a scalar, series at a time (`swap` when the scalar is on the left).
fn vector_scalar(
    ev: &mut Evaluator,
    op: Op,
    mut series: Vec<SeriesSamples>,
    scalar: &[f64],
    swap: bool,
    return_bool: bool,
) -> Result<Value, QueryError> {
    let start = ev.range.start;
    let step = ev.range.step;
    for s in &mut series {
        s.samples.retain_mut(|p| {
            let r = scalar[((p.t - start) / step) as usize];
            let (l, r) = if swap { (r, p.v) } else { (p.v, r) };
            let (mut value, mut keep) = op.apply(l, r);
            if op.is_comparison() && swap {
                value = r;
            }
            if return_bool {
                value = if keep { 1.0 } else { 0.0 };
                keep = true;
            }
            p.v = value;
            keep
        });
        if op.drops_metric_name() || return_bool {
            s.labels.drop_metric_name();
        }
    }
    series.retain(|s| !s.samples.is_empty());
    Ok(Value::Vector(super::eval::merge_by_labels(series)?))
}

/// The part of a series' labels that matching compares: the `on` labels, or all but the
/// `ignoring` labels and the metric name.
fn signature(labels: &Labels, matching: &Option<LabelModifier>) -> Vec<Label> {
    match matching {
        Some(LabelModifier::Include(names)) => labels
            .iter()
            .filter(|l| names.labels.iter().any(|n| n == &l.name))
            .cloned()
            .collect(),
        Some(LabelModifier::Exclude(names)) => labels
            .iter()
            .filter(|l| l.name != METRIC_NAME_LABEL && !names.labels.iter().any(|n| n == &l.name))
            .cloned()
            .collect(),
        None => labels
            .iter()
            .filter(|l| l.name != METRIC_NAME_LABEL)
            .cloned()
            .collect(),
    }
}

fn vector_vector(
    ev: &mut Evaluator,
    op: Op,
    bin: &BinaryExpr,
    lhs: &[SeriesSamples],
    rhs: &[SeriesSamples],
    return_bool: bool,
) -> Result<Value, QueryError> {
    let modifier = bin.modifier.as_ref();
    let matching = modifier.and_then(|m| m.matching.clone());
    let card = modifier.map_or(VectorMatchCardinality::OneToOne, |m| m.card.clone());
    // Signatures are fixed per series: intern them once.
    let mut interned: HashMap<Vec<Label>, usize> = HashMap::new();
    let mut intern = |labels: &Labels| {
        let sig = signature(labels, &matching);
        let next = interned.len();
        *interned.entry(sig).or_insert(next)
    };
    let lsig: Vec<usize> = lhs.iter().map(|s| intern(&s.labels)).collect();
    let rsig: Vec<usize> = rhs.iter().map(|s| intern(&s.labels)).collect();

    if matches!(op, Op::And | Op::Or | Op::Unless) {
        let series = ev.step_eval(&[lhs, rhs], |_, _, columns| {
            Ok(set_operation(op, &columns[0], &columns[1], &lsig, &rsig)
                .into_iter()
                .map(|(side, i, v)| {
                    let labels = if side == 0 {
                        &lhs[i].labels
                    } else {
                        &rhs[i].labels
                    };
                    (labels.clone(), v)
                })
                .collect())
        })?;
        return Ok(Value::Vector(series));
    }

    // one-to-many is many-to-one with the sides swapped.
    let (include, swapped) = match &card {
        VectorMatchCardinality::ManyToOne(l) => (l.labels.clone(), false),
        VectorMatchCardinality::OneToMany(l) => (l.labels.clone(), true),
        _ => (Vec::new(), false),
    };
    let one_to_one = matches!(card, VectorMatchCardinality::OneToOne);
    let (many, one, many_sig, one_sig) = if swapped {
        (rhs, lhs, &rsig, &lsig)
    } else {
        (lhs, rhs, &lsig, &rsig)
    };
    let mut result_labels: HashMap<(usize, usize), Labels> = HashMap::new();
    let series = ev.step_eval(&[many, one], |_, _, columns| {
        if columns[0].is_empty() || columns[1].is_empty() {
            return Ok(Vec::new());
        }
        let mut one_by_sig: HashMap<usize, (usize, f64)> = HashMap::with_capacity(columns[1].len());
        for &(i, v) in &columns[1] {
            if let Some(&(dup, _)) = one_by_sig.get(&one_sig[i]).as_ref() {
                let side = if swapped { "left" } else { "right" };
                return Err(QueryError::Execution(format!(
                    "found duplicate series for the match group {} on the {side} hand-side of the operation: [{}, {}];many-to-many matching not allowed: matching labels must be unique on one side",
                    Labels::from_trusted(signature(&one[i].labels, &matching)),
                    one[i].labels,
                    one[*dup].labels
                )));
            }
            one_by_sig.insert(one_sig[i], (i, v));
        }
        let mut matched: HashMap<usize, Vec<Labels>> = HashMap::new();
        let mut out = Vec::new();
        for &(i, v) in &columns[0] {
            let sig = many_sig[i];
            let Some(&(j, w)) = one_by_sig.get(&sig) else {
                continue;
            };
            let (l, r) = if swapped { (w, v) } else { (v, w) };
            let (mut value, keep) = op.apply(l, r);
            if return_bool {
                value = if keep { 1.0 } else { 0.0 };
            } else if !keep {
                continue;
            }
            let labels = result_labels
                .entry((i, j))
                .or_insert_with(|| {
                    let mut labels = result_metric(&many[i].labels, &one[j].labels, op, &matching, one_to_one, &include);
                    if return_bool {
                        labels = labels.without_metric_name();
                    }
                    labels
                })
                .clone();
            let seen = matched.entry(sig).or_default();
            if one_to_one {
                if !seen.is_empty() {
                    return Err(QueryError::Execution(
                        "multiple matches for labels: many-to-one matching must be explicit (group_left/group_right)".into(),
                    ));
                }
                seen.push(Labels::empty());
            } else if seen.contains(&labels) {
                return Err(QueryError::Execution(
                    "multiple matches for labels: grouping labels must ensure unique matches".into(),
                ));
            } else {
                seen.push(labels.clone());
            }
            out.push((labels, value));
        }
        Ok(out)
    })?;
    Ok(Value::Vector(series))
}

/// The labels of a result sample (engine.go `resultMetric`): the "many" side's labels, without
/// the metric name for arithmetic, reduced to the matching labels for one-to-one matching,
/// plus `group_left`/`group_right` labels copied from the "one" side.
fn result_metric(
    many: &Labels,
    one: &Labels,
    op: Op,
    matching: &Option<LabelModifier>,
    one_to_one: bool,
    include: &[String],
) -> Labels {
    let mut labels: Vec<Label> = many.iter().cloned().collect();
    if op.drops_metric_name() {
        labels.retain(|l| l.name != METRIC_NAME_LABEL);
    }
    if one_to_one {
        match matching {
            Some(LabelModifier::Include(names)) => {
                labels.retain(|l| names.labels.iter().any(|n| n == &l.name))
            }
            Some(LabelModifier::Exclude(names)) => {
                labels.retain(|l| !names.labels.iter().any(|n| n == &l.name))
            }
            None => {}
        }
    }
    for name in include {
        labels.retain(|l| &l.name != name);
        if let Some(v) = one.get(name) {
            labels.push(Label::new(name.clone(), v));
        }
    }
    Labels::from_trusted(labels)
}

/// `and`, `or`, `unless` at one step: `(side, series index, value)` in Prometheus's order.
fn set_operation(
    op: Op,
    lhs: &StepColumn,
    rhs: &StepColumn,
    lsig: &[usize],
    rsig: &[usize],
) -> Vec<(u8, usize, f64)> {
    use std::collections::HashSet;
    match op {
        Op::And => {
            if lhs.is_empty() || rhs.is_empty() {
                return Vec::new();
            }
            let right: HashSet<usize> = rhs.iter().map(|&(i, _)| rsig[i]).collect();
            lhs.iter()
                .filter(|&&(i, _)| right.contains(&lsig[i]))
                .map(|&(i, v)| (0, i, v))
                .collect()
        }
        Op::Or => {
            let left: HashSet<usize> = lhs.iter().map(|&(i, _)| lsig[i]).collect();
            let mut out: Vec<(u8, usize, f64)> = lhs.iter().map(|&(i, v)| (0, i, v)).collect();
            out.extend(
                rhs.iter()
                    .filter(|&&(i, _)| lhs.is_empty() || !left.contains(&rsig[i]))
                    .map(|&(i, v)| (1, i, v)),
            );
            out
        }
        Op::Unless => {
            let right: HashSet<usize> = rhs.iter().map(|&(i, _)| rsig[i]).collect();
            lhs.iter()
                .filter(|&&(i, _)| rhs.is_empty() || !right.contains(&lsig[i]))
                .map(|&(i, v)| (0, i, v))
                .collect()
        }
        _ => Vec::new(),
    }
}
