//! Math functions with arguments beyond the vector (functions.go `funcClamp*`, `funcRound`).

use crate::model::SeriesSamples;
use crate::promql::eval::{merge_by_labels, Evaluator};
use crate::promql::value::Value;
use crate::promql::QueryError;
use promql_parser::parser::Call;

pub(super) fn sgn(v: f64) -> f64 {
    if v < 0.0 {
        -1.0
    } else if v > 0.0 {
        1.0
    } else {
        v
    }
}

pub(super) fn pi(ev: &mut Evaluator, _call: &Call) -> Result<Value, QueryError> {
    let steps = ev.charge_steps()?;
    Ok(Value::Scalar(vec![std::f64::consts::PI; steps]))
}

/// Maps each point with the per-step scalar arguments; drops the metric name. `f` returning
/// `None` drops the point.
fn map_with_params(
    ev: &mut Evaluator,
    call: &Call,
    f: impl Fn(f64, &[f64]) -> Option<f64>,
) -> Result<Value, QueryError> {
    let mut series = ev.eval_vector(&call.args.args[0])?;
    let params = call.args.args[1..]
        .iter()
        .map(|a| ev.eval_scalar(a))
        .collect::<Result<Vec<_>, _>>()?;
    let (start, step) = (ev.range.start, ev.range.step);
    let mut step_params = vec![0.0; params.len()];
    for s in &mut series {
        s.labels.drop_metric_name();
        s.samples.retain_mut(|p| {
            let i = ((p.t - start) / step) as usize;
            for (slot, values) in step_params.iter_mut().zip(&params) {
                *slot = values[i];
            }
            match f(p.v, &step_params) {
                Some(v) => {
                    p.v = v;
                    true
                }
                None => false,
            }
        });
    }
    series.retain(|s: &SeriesSamples| !s.samples.is_empty());
    Ok(Value::Vector(merge_by_labels(series)?))
}

pub(super) fn clamp(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    // An empty range (max < min) yields no output.
    map_with_params(ev, call, |v, p| {
        (p[1] >= p[0]).then(|| go_max(p[0], go_min(p[1], v)))
    })
}

pub(super) fn clamp_min(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    map_with_params(ev, call, |v, p| Some(go_max(p[0], v)))
}

pub(super) fn clamp_max(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    map_with_params(ev, call, |v, p| Some(go_min(p[0], v)))
}

/// `round(v, to_nearest=1)`: halves round up (functions.go `funcRound`).
pub(super) fn round(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    map_with_params(ev, call, |v, p| {
        let inverse = 1.0 / p.first().copied().unwrap_or(1.0);
        Some((v * inverse + 0.5).floor() / inverse)
    })
}

/// Go's `math.Max`: NaN wins.
fn go_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Go's `math.Min`: NaN wins.
fn go_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}
