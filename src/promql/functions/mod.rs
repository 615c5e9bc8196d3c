//! PromQL functions, one table from name to implementation (as Prometheus's `FunctionCalls`).
//!
//! Two shapes: a [`Rollup`] folds the samples of one window of a range vector into a value and
//! is driven by the evaluator's sliding windows; an instant function maps its evaluated
//! arguments over all steps. A function family gets its own file beside this one.

use super::eval::Evaluator;
use super::value::Value;
use super::QueryError;
use crate::model::{Labels, Sample, SeriesSamples};

/// A range-vector function: folds one window (non-empty, stale markers removed) evaluated at
/// step time `t`; `None` means no output point at that step.
pub struct Rollup {
    pub fold: fn(window: &[Sample], t: i64) -> Option<f64>,
    /// Whether the result keeps `__name__` (most functions drop it).
    pub keeps_metric_name: bool,
}

pub type InstantFn = fn(&mut Evaluator, Vec<Value>) -> Result<Value, QueryError>;

pub enum FunctionImpl {
    Rollup(Rollup),
    Instant(InstantFn),
}

/// The implemented functions. `promql-parser` has already checked names, arity and argument
/// types against Prometheus's list.
pub fn lookup(name: &str) -> Option<&'static FunctionImpl> {
    static COUNT_OVER_TIME: FunctionImpl = FunctionImpl::Rollup(Rollup {
        fold: |window, _| Some(window.len() as f64),
        keeps_metric_name: false,
    });
    static TIME: FunctionImpl = FunctionImpl::Instant(time);
    static VECTOR: FunctionImpl = FunctionImpl::Instant(vector);
    match name {
        "count_over_time" => Some(&COUNT_OVER_TIME),
        "time" => Some(&TIME),
        "vector" => Some(&VECTOR),
        _ => None,
    }
}

/// `time()`: the evaluation time in seconds at every step.
fn time(ev: &mut Evaluator, _args: Vec<Value>) -> Result<Value, QueryError> {
    Ok(Value::Scalar(
        ev.range.timestamps().map(|t| t as f64 / 1000.0).collect(),
    ))
}

/// `vector(s)`: the scalar as a single series without labels.
fn vector(ev: &mut Evaluator, mut args: Vec<Value>) -> Result<Value, QueryError> {
    let Some(Value::Scalar(values)) = args.pop() else {
        return Err(QueryError::Execution("vector() expects a scalar".into()));
    };
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
