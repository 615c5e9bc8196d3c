//! Time functions: `time()`, `timestamp()`, and the calendar functions of a Unix time in UTC
//! (functions.go `dateWrapper`).

use crate::model::{Labels, Sample, SeriesSamples};
use crate::promql::eval::{merge_by_labels, Evaluator};
use crate::promql::value::Value;
use crate::promql::QueryError;
use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use promql_parser::parser::{Call, Expr};

/// `time()`: the evaluation time in seconds at every step.
pub(super) fn time(ev: &mut Evaluator, _call: &Call) -> Result<Value, QueryError> {
    ev.charge_steps()?;
    Ok(Value::Scalar(
        ev.range.timestamps().map(|t| t as f64 / 1000.0).collect(),
    ))
}

/// `timestamp(v)`: the timestamp of each sample in seconds. On a selector it is the sample's
/// own time (engine.go special-cases it), elsewhere the step time.
pub(super) fn timestamp(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    let mut arg = call.args.args[0].as_ref();
    while let Expr::Paren(p) = arg {
        arg = &p.expr;
    }
    let mut series = match arg {
        Expr::VectorSelector(vs) => ev.eval_selector_timestamps(vs)?,
        other => {
            let mut series = ev.eval_vector(other)?;
            for s in &mut series {
                for p in &mut s.samples {
                    p.v = p.t as f64 / 1000.0;
                }
            }
            series
        }
    };
    for s in &mut series {
        s.labels.drop_metric_name();
    }
    Ok(Value::Vector(merge_by_labels(series)?))
}

/// Applies a calendar function to each value (Unix seconds), or to the step time when called
/// without argument.
fn date_function(
    ev: &mut Evaluator,
    call: &Call,
    f: fn(DateTime<Utc>) -> f64,
) -> Result<Value, QueryError> {
    let to_time = |seconds: f64| DateTime::from_timestamp(seconds as i64, 0).unwrap_or_default();
    if call.args.args.is_empty() {
        ev.charge_steps()?;
        let samples: Vec<Sample> = ev
            .range
            .timestamps()
            .map(|t| Sample {
                t,
                v: f(to_time((t / 1000) as f64)),
            })
            .collect();
        return Ok(Value::Vector(vec![SeriesSamples {
            labels: Labels::empty(),
            samples,
        }]));
    }
    let mut series = ev.eval_vector(&call.args.args[0])?;
    for s in &mut series {
        s.labels.drop_metric_name();
        for p in &mut s.samples {
            p.v = f(to_time(p.v));
        }
    }
    Ok(Value::Vector(merge_by_labels(series)?))
}

pub(super) fn minute(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    date_function(ev, call, |t| t.minute() as f64)
}

pub(super) fn hour(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    date_function(ev, call, |t| t.hour() as f64)
}

pub(super) fn day_of_week(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    date_function(ev, call, |t| t.weekday().num_days_from_sunday() as f64)
}

pub(super) fn day_of_month(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    date_function(ev, call, |t| t.day() as f64)
}

pub(super) fn day_of_year(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    date_function(ev, call, |t| t.ordinal() as f64)
}

pub(super) fn days_in_month(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    date_function(ev, call, |t| {
        let (year, month) = if t.month() == 12 {
            (t.year() + 1, 1)
        } else {
            (t.year(), t.month() + 1)
        };
        NaiveDate::from_ymd_opt(year, month, 1)
            .and_then(|d| d.pred_opt())
            .map_or(f64::NAN, |d| d.day() as f64)
    })
}

pub(super) fn month(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    date_function(ev, call, |t| t.month() as f64)
}

pub(super) fn year(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    date_function(ev, call, |t| t.year() as f64)
}
