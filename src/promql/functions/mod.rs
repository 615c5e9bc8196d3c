//! PromQL functions, one table from name to implementation (as Prometheus's `FunctionCalls`),
//! one file per family beside this one.
//!
//! Three shapes: a rollup folds each window of a range vector (driven by the evaluator's
//! sliding windows); a simple function maps every value of an instant vector and drops the
//! metric name; a custom function does anything else with its arguments.

mod histogram;
mod labels;
mod math;
mod rollup;
mod time;

pub(super) use histogram::quantile;
pub(super) use rollup::kahan_inc;

use super::eval::{merge_by_labels, Evaluator, WindowCtx};
use super::value::Value;
use super::QueryError;
use crate::model::{Labels, Sample, SeriesSamples};
use promql_parser::parser::{Call, Expr};

pub(super) type Fold = fn(&[Sample], &WindowCtx) -> Option<f64>;
pub(super) type CustomFn = fn(&mut Evaluator, &Call) -> Result<Value, QueryError>;

pub(super) enum FunctionImpl {
    /// Folds one window (non-empty, stale markers removed) of the range-vector argument; the
    /// other arguments are scalars, passed per step in `WindowCtx::params`.
    Rollup {
        fold: Fold,
        keeps_metric_name: bool,
    },
    /// Maps each value of the instant-vector argument; drops the metric name.
    Simple(fn(f64) -> f64),
    Custom(CustomFn),
}

use FunctionImpl::{Custom, Rollup, Simple};

/// Every implemented function. `promql-parser` has already checked names, arity and argument
/// types against Prometheus's list.
fn lookup(name: &str) -> Option<FunctionImpl> {
    let rollup = |fold: Fold| {
        Some(Rollup {
            fold,
            keeps_metric_name: false,
        })
    };
    match name {
        "rate" => rollup(rollup::rate),
        "increase" => rollup(rollup::increase),
        "delta" => rollup(rollup::delta),
        "irate" => rollup(rollup::irate),
        "idelta" => rollup(rollup::idelta),
        "deriv" => rollup(rollup::deriv),
        "predict_linear" => rollup(rollup::predict_linear),
        "resets" => rollup(rollup::resets),
        "changes" => rollup(rollup::changes),
        "holt_winters" => rollup(rollup::holt_winters),
        "avg_over_time" => rollup(rollup::avg_over_time),
        "count_over_time" => rollup(|w, _| Some(w.len() as f64)),
        "sum_over_time" => rollup(rollup::sum_over_time),
        "min_over_time" => rollup(rollup::min_over_time),
        "max_over_time" => rollup(rollup::max_over_time),
        "quantile_over_time" => rollup(rollup::quantile_over_time),
        "stddev_over_time" => rollup(|w, _| Some(rollup::variance(w).sqrt())),
        "stdvar_over_time" => rollup(|w, _| Some(rollup::variance(w))),
        "present_over_time" => rollup(|_, _| Some(1.0)),
        // Acts like an offset: the only rollup that keeps the metric name (engine.go).
        "last_over_time" => Some(Rollup {
            fold: |w, _| w.last().map(|s| s.v),
            keeps_metric_name: true,
        }),
        "absent_over_time" => Some(Custom(absent_over_time)),
        "abs" => Some(Simple(f64::abs)),
        "ceil" => Some(Simple(f64::ceil)),
        "floor" => Some(Simple(f64::floor)),
        "exp" => Some(Simple(f64::exp)),
        "sqrt" => Some(Simple(f64::sqrt)),
        "ln" => Some(Simple(f64::ln)),
        "log2" => Some(Simple(f64::log2)),
        "log10" => Some(Simple(f64::log10)),
        "sin" => Some(Simple(f64::sin)),
        "cos" => Some(Simple(f64::cos)),
        "tan" => Some(Simple(f64::tan)),
        "asin" => Some(Simple(f64::asin)),
        "acos" => Some(Simple(f64::acos)),
        "atan" => Some(Simple(f64::atan)),
        "sinh" => Some(Simple(f64::sinh)),
        "cosh" => Some(Simple(f64::cosh)),
        "tanh" => Some(Simple(f64::tanh)),
        "asinh" => Some(Simple(f64::asinh)),
        "acosh" => Some(Simple(f64::acosh)),
        "atanh" => Some(Simple(f64::atanh)),
        "deg" => Some(Simple(|v| v * 180.0 / std::f64::consts::PI)),
        "rad" => Some(Simple(|v| v * std::f64::consts::PI / 180.0)),
        "sgn" => Some(Simple(math::sgn)),
        "pi" => Some(Custom(math::pi)),
        "clamp" => Some(Custom(math::clamp)),
        "clamp_min" => Some(Custom(math::clamp_min)),
        "clamp_max" => Some(Custom(math::clamp_max)),
        "round" => Some(Custom(math::round)),
        "time" => Some(Custom(time::time)),
        "timestamp" => Some(Custom(time::timestamp)),
        "minute" => Some(Custom(time::minute)),
        "hour" => Some(Custom(time::hour)),
        "day_of_week" => Some(Custom(time::day_of_week)),
        "day_of_month" => Some(Custom(time::day_of_month)),
        "day_of_year" => Some(Custom(time::day_of_year)),
        "days_in_month" => Some(Custom(time::days_in_month)),
        "month" => Some(Custom(time::month)),
        "year" => Some(Custom(time::year)),
        "label_replace" => Some(Custom(labels::label_replace)),
        "label_join" => Some(Custom(labels::label_join)),
        "histogram_quantile" => Some(Custom(histogram::histogram_quantile)),
        "vector" => Some(Custom(vector)),
        "scalar" => Some(Custom(scalar)),
        "sort" => Some(Custom(|ev, call| sort(ev, call, false))),
        "sort_desc" => Some(Custom(|ev, call| sort(ev, call, true))),
        "absent" => Some(Custom(absent)),
        // Native-histogram functions: SecuMon stores no native histograms yet, and on float
        // samples Prometheus returns nothing, so neither do we.
        "histogram_count" | "histogram_sum" | "histogram_fraction" => {
            Some(Custom(no_native_histograms))
        }
        _ => None,
    }
}

/// The fold of a range function (`rate`, `*_over_time`...) and whether it keeps the metric
/// name; `None` for any other function.
pub(super) fn range_fold(name: &str) -> Option<(Fold, bool)> {
    match lookup(name)? {
        Rollup {
            fold,
            keeps_metric_name,
        } => Some((fold, keeps_metric_name)),
        _ => None,
    }
}

/// Whether Prometheus 2.42 has a function of this name.
pub(super) fn is_known(name: &str) -> bool {
    lookup(name).is_some()
}

fn no_native_histograms(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    for arg in &call.args.args {
        ev.eval(arg)?;
    }
    Ok(Value::Vector(Vec::new()))
}

pub(super) fn eval_call(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    let name = call.func.name;
    match lookup(name) {
        Some(Rollup {
            fold,
            keeps_metric_name,
        }) => {
            if let Some(series) = ev.eval_from_rollups(call)? {
                return Ok(Value::Vector(series));
            }
            let (arg, params) = range_and_scalar_args(ev, call)?;
            let series = ev.rollup(arg, &params, keeps_metric_name, fold)?;
            Ok(Value::Vector(series))
        }
        Some(Simple(f)) => {
            let mut series = ev.eval_vector(&call.args.args[0])?;
            for s in &mut series {
                s.labels.drop_metric_name();
                for p in &mut s.samples {
                    p.v = f(p.v);
                }
            }
            Ok(Value::Vector(merge_by_labels(series)?))
        }
        Some(Custom(f)) => f(ev, call),
        None => Err(QueryError::Execution(format!(
            "function {name}() is not supported"
        ))),
    }
}

/// A call's range-vector argument and its other (scalar) arguments, per step.
fn range_and_scalar_args(
    ev: &mut Evaluator,
    call: &Call,
) -> Result<(super::eval::RangeArg, Vec<Vec<f64>>), QueryError> {
    let mut params = Vec::new();
    let mut range = None;
    for arg in &call.args.args {
        if is_range(arg) && range.is_none() {
            range = Some(arg);
        } else {
            params.push(ev.eval_scalar(arg)?);
        }
    }
    let range = range.ok_or_else(|| {
        QueryError::Execution(format!(
            "function {}() expects a range vector",
            call.func.name
        ))
    })?;
    Ok((ev.eval_range_arg(range)?, params))
}

fn is_range(expr: &Expr) -> bool {
    match expr {
        Expr::Paren(p) => is_range(&p.expr),
        Expr::MatrixSelector(_) | Expr::Subquery(_) => true,
        _ => false,
    }
}

/// The value of a string-literal argument.
pub(super) fn string_arg(expr: &Expr) -> Result<String, QueryError> {
    match expr {
        Expr::StringLiteral(s) => Ok(s.val.clone()),
        Expr::Paren(p) => string_arg(&p.expr),
        other => Err(QueryError::Execution(format!(
            "expected a string literal, got {other}"
        ))),
    }
}

/// `vector(s)`: the scalar as one series without labels.
fn vector(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    let values = ev.eval_scalar(&call.args.args[0])?;
    ev.account(values.len())?;
    Ok(Value::Vector(vec![SeriesSamples {
        labels: Labels::empty(),
        samples: ev
            .range
            .timestamps()
            .zip(values)
            .map(|(t, v)| Sample { t, v })
            .collect(),
    }]))
}

/// `scalar(v)`: the single value of a one-element vector, else NaN, at every step.
fn scalar(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    // Charged first: the argument may run over every step before the value per step exists.
    let steps = ev.charge_steps()?;
    let series = ev.eval_vector(&call.args.args[0])?;
    let range = ev.range;
    let mut counts = vec![0u32; steps];
    let mut values = vec![f64::NAN; steps];
    for s in &series {
        for p in &s.samples {
            let i = ((p.t - range.start) / range.step) as usize;
            counts[i] += 1;
            values[i] = p.v;
        }
    }
    for (v, n) in values.iter_mut().zip(counts) {
        if n != 1 {
            *v = f64::NAN;
        }
    }
    Ok(Value::Scalar(values))
}

/// `sort` and `sort_desc`: order only matters for instant queries; NaN sorts last in both.
fn sort(ev: &mut Evaluator, call: &Call, descending: bool) -> Result<Value, QueryError> {
    let mut series = ev.eval_vector(&call.args.args[0])?;
    let value = |s: &SeriesSamples| s.samples.first().map_or(f64::NAN, |p| p.v);
    series.sort_by(|a, b| cmp_nan_last(value(a), value(b), descending));
    Ok(Value::Vector(series))
}

/// Orders values ascending (or descending), NaN last either way, as Prometheus's value heaps
/// order `sort`, `sort_desc`, `topk` and `bottomk` output.
pub(super) fn cmp_nan_last(x: f64, y: f64, descending: bool) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => {
            let o = x.partial_cmp(&y).unwrap_or(Ordering::Equal);
            if descending {
                o.reverse()
            } else {
                o
            }
        }
    }
}

/// The labels `absent()` reports: the equality matchers of a selector argument, except the
/// metric name and labels matched more than once (functions.go `createLabelsForAbsentFunction`).
fn absent_labels(expr: &Expr) -> Labels {
    let vs = match expr {
        Expr::VectorSelector(vs) => vs,
        Expr::MatrixSelector(ms) => &ms.vs,
        _ => return Labels::empty(),
    };
    let mut labels: Vec<crate::model::Label> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for m in &vs.matchers.matchers {
        if m.name == crate::model::METRIC_NAME_LABEL {
            continue;
        }
        let first = seen.insert(m.name.clone());
        labels.retain(|l| l.name != m.name);
        if first && matches!(m.op, promql_parser::label::MatchOp::Equal) {
            labels.push(crate::model::Label::new(m.name.clone(), m.value.clone()));
        }
    }
    labels.retain(|l| !l.value.is_empty());
    Labels::from_trusted(labels)
}

/// `absent(v)`: 1 at every step where `v` has no element.
fn absent(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    let steps = ev.charge_steps()?;
    let series = ev.eval_vector(&call.args.args[0])?;
    Ok(absent_at_empty_steps(
        ev.range,
        steps,
        &series,
        &call.args.args[0],
    ))
}

/// `absent_over_time(m[d])`: 1 at every step where no series has a sample in the window.
fn absent_over_time(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    let steps = ev.charge_steps()?;
    let arg = ev.eval_range_arg(&call.args.args[0])?;
    let series = ev.rollup(arg, &[], false, |_, _| Some(1.0))?;
    Ok(absent_at_empty_steps(
        ev.range,
        steps,
        &series,
        &call.args.args[0],
    ))
}

/// A vector of 1 at every step where `series` has no point, labelled from the argument.
fn absent_at_empty_steps(
    range: super::EvalRange,
    steps: usize,
    series: &[SeriesSamples],
    arg: &Expr,
) -> Value {
    let mut present = vec![false; steps];
    for s in series {
        for p in &s.samples {
            present[((p.t - range.start) / range.step) as usize] = true;
        }
    }
    Value::Vector(absent_points(range, &present, absent_labels(arg)))
}

fn absent_points(range: super::EvalRange, present: &[bool], labels: Labels) -> Vec<SeriesSamples> {
    let samples: Vec<Sample> = range
        .timestamps()
        .zip(present)
        .filter(|(_, &p)| !p)
        .map(|(t, _)| Sample { t, v: 1.0 })
        .collect();
    if samples.is_empty() {
        return Vec::new();
    }
    vec![SeriesSamples { labels, samples }]
}
