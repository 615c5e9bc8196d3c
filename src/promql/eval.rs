//! Evaluating the AST over all steps, over what [`super::plan`] loaded.
//!
//! Selectors and range functions run series at a time over every step; operators and
//! aggregations that combine series run step by step over columns ([`Evaluator::step_eval`]),
//! which is how Prometheus's `rangeEval` defines their semantics.

use super::functions;
use super::plan::{at_ms, duration_ms, node_key, offset_ms, subquery_range, Loaded, LoadedRollups};
use super::rollups::{RollupLoad, SourceResolution};
use super::value::{Value, VectorBuilder};
use super::{aggregate, binary, EvalRange, QueryError};
use crate::model::{is_stale_nan, Labels, Sample, SeriesSamples};
use promql_parser::parser::{Expr, VectorSelector};
use std::collections::HashMap;
use std::time::Instant;

/// Engine settings the evaluator needs, in ms.
#[derive(Clone, Copy, Debug)]
pub(super) struct EvalOptions {
    pub lookback: i64,
    pub max_samples: usize,
    pub default_subquery_step: i64,
    pub max_source_resolution: SourceResolution,
    /// Whether rollups may answer at all (`[query] rollups`).
    pub rollups: bool,
}

/// A range-vector argument ready for sliding windows: its series (stale markers removed)
/// and how a step time maps to a window.
pub(super) struct RangeArg {
    pub series: Vec<SeriesSamples>,
    pub window: i64,
    pub offset: i64,
    pub at: Option<i64>,
}

/// What a rollup sees besides the window: the step time and window bounds (ms), and the
/// scalar arguments at this step.
pub(super) struct WindowCtx<'a> {
    pub t: i64,
    pub start: i64,
    pub end: i64,
    pub window: i64,
    pub params: &'a [f64],
}

/// One step of an instant vector: `(index of the series in its input, value)`.
pub(super) type StepColumn = Vec<(usize, f64)>;

/// Steps a loop runs between checks of the deadline and the sample limit: a few hundred
/// microseconds of work, so a query stops well within a second of its deadline.
pub(super) const STEPS_BETWEEN_CHECKS: usize = 4096;

/// Evaluates an AST over the steps of one query.
pub(super) struct Evaluator {
    /// The steps being evaluated (a subquery's inside a subquery).
    pub(super) range: EvalRange,
    /// The query's own range, for `@ start()` and `@ end()`.
    query: EvalRange,
    options: EvalOptions,
    produced: usize,
    deadline: Instant,
    loaded: Loaded,
    rollups: LoadedRollups,
}

impl Evaluator {
    pub(super) fn new(
        range: EvalRange,
        options: EvalOptions,
        deadline: Instant,
        loaded: Loaded,
    ) -> Self {
        Evaluator {
            range,
            query: range,
            options,
            produced: 0,
            deadline,
            loaded,
            rollups: LoadedRollups::new(),
        }
    }

    /// Adds the rollups loaded for calls planned to read them.
    pub(super) fn with_rollups(mut self, rollups: LoadedRollups) -> Self {
        self.rollups = rollups;
        self
    }

    /// Fails once the query's deadline has passed; called between series and steps.
    pub(super) fn check_deadline(&self) -> Result<(), QueryError> {
        if Instant::now() > self.deadline {
            return Err(QueryError::Timeout("expression evaluation"));
        }
        Ok(())
    }

    /// Accounts for points an evaluation holds, against the per-query sample limit.
    pub(super) fn account(&mut self, points: usize) -> Result<(), QueryError> {
        self.produced = self.produced.saturating_add(points);
        if self.produced > self.options.max_samples {
            return Err(QueryError::TooManySamples);
        }
        Ok(())
    }

    /// The number of steps of the current range, charged against the sample limit before a
    /// caller allocates a value per step (literals, `time()`, `vector()`, `scalar()`...): a
    /// subquery of a literal can name more steps than memory holds.
    pub(super) fn charge_steps(&mut self) -> Result<usize, QueryError> {
        let steps = self.range.steps();
        self.account(steps)?;
        Ok(steps)
    }

    /// Called at every step of a loop over steps that holds `held` points it has not
    /// accounted yet: every [`STEPS_BETWEEN_CHECKS`] steps, fails once the deadline has passed
    /// or the points would exceed the sample limit, so neither a range of many steps nor one
    /// series of many points runs on unchecked.
    #[inline]
    pub(super) fn step_check(&self, step: usize, held: usize) -> Result<(), QueryError> {
        if step % STEPS_BETWEEN_CHECKS != STEPS_BETWEEN_CHECKS - 1 {
            return Ok(());
        }
        self.check_deadline()?;
        if self.produced.saturating_add(held) > self.options.max_samples {
            return Err(QueryError::TooManySamples);
        }
        Ok(())
    }

    /// The rollups loaded for the call over a selector node, if it was planned to read them.
    pub(super) fn take_rollups(&mut self, vs: &VectorSelector) -> Option<RollupLoad> {
        self.rollups.remove(&node_key(vs))
    }

    /// The series loaded for a selector node; each node is evaluated once. A node the plan
    /// did not load is a bug, reported as one (it used to read as a selector of no series).
    fn loaded_for(&mut self, vs: &VectorSelector) -> Result<Vec<SeriesSamples>, QueryError> {
        self.loaded.remove(&node_key(vs)).ok_or_else(|| {
            QueryError::Storage(crate::storage::StorageError::Internal(format!(
                "selector {vs} was not loaded before evaluation"
            )))
        })
    }

    pub(super) fn eval(&mut self, expr: &Expr) -> Result<Value, QueryError> {
        self.check_deadline()?;
        match expr {
            Expr::NumberLiteral(n) => {
                let steps = self.charge_steps()?;
                Ok(Value::Scalar(vec![n.val; steps]))
            }
            Expr::StringLiteral(s) => Ok(Value::String(s.val.clone())),
            Expr::Paren(p) => self.eval(&p.expr),
            Expr::Unary(u) => match self.eval(&u.expr)? {
                Value::Scalar(values) => {
                    Ok(Value::Scalar(values.into_iter().map(|v| -v).collect()))
                }
                Value::Vector(mut series) => {
                    for s in &mut series {
                        s.labels.drop_metric_name();
                        for p in &mut s.samples {
                            p.v = -p.v;
                        }
                    }
                    check_unique_labels(&series)?;
                    Ok(Value::Vector(series))
                }
                _ => Err(QueryError::Execution(
                    "unary minus applies to scalars and instant vectors only".into(),
                )),
            },
            Expr::VectorSelector(vs) => self.eval_vector_selector(vs),
            Expr::MatrixSelector(_) | Expr::Subquery(_) => {
                // Only an instant query (one step) returns a range vector as such.
                let arg = self.eval_range_arg(expr)?;
                let t = self.range.start;
                let end = arg.at.unwrap_or(t).saturating_sub(arg.offset);
                let start = end.saturating_sub(arg.window);
                let mut out = Vec::with_capacity(arg.series.len());
                for s in arg.series {
                    let samples: Vec<Sample> = s
                        .samples
                        .into_iter()
                        .filter(|p| p.t >= start && p.t <= end)
                        .collect();
                    if !samples.is_empty() {
                        self.account(samples.len())?;
                        out.push(SeriesSamples {
                            labels: s.labels,
                            samples,
                        });
                    }
                }
                Ok(Value::Matrix(out))
            }
            Expr::Call(call) => functions::eval_call(self, call),
            Expr::Aggregate(agg) => aggregate::eval(self, agg),
            Expr::Binary(bin) => binary::eval(self, bin),
            Expr::Extension(_) => Err(QueryError::Execution(
                "extension expressions are not supported".into(),
            )),
        }
    }

    /// Evaluates `expr` and requires a scalar (function and aggregation parameters).
    pub(super) fn eval_scalar(&mut self, expr: &Expr) -> Result<Vec<f64>, QueryError> {
        match self.eval(expr)? {
            Value::Scalar(values) => Ok(values),
            _ => Err(QueryError::Execution(format!("expected a scalar: {expr}"))),
        }
    }

    /// Evaluates `expr` and requires an instant vector.
    pub(super) fn eval_vector(&mut self, expr: &Expr) -> Result<Vec<SeriesSamples>, QueryError> {
        match self.eval(expr)? {
            Value::Vector(series) => Ok(series),
            _ => Err(QueryError::Execution(format!(
                "expected an instant vector: {expr}"
            ))),
        }
    }

    /// An instant selector at every step: the latest sample in `[t - lookback, t]` at the
    /// selector's read time, unless that sample is a staleness marker
    /// (prometheus/promql/engine.go `vectorSelectorSingle`). One pass per series. With
    /// `keep_sample_time`, each point carries the sample's own timestamp in its value slot's
    /// place for `timestamp()`.
    pub(super) fn eval_vector_selector(
        &mut self,
        vs: &VectorSelector,
    ) -> Result<Value, QueryError> {
        Ok(Value::Vector(self.select_steps(vs, false)?))
    }

    /// `timestamp(selector)`: the timestamp of the sample each step picks, in seconds.
    pub(super) fn eval_selector_timestamps(
        &mut self,
        vs: &VectorSelector,
    ) -> Result<Vec<SeriesSamples>, QueryError> {
        self.select_steps(vs, true)
    }

    fn select_steps(
        &mut self,
        vs: &VectorSelector,
        sample_time: bool,
    ) -> Result<Vec<SeriesSamples>, QueryError> {
        let series = self.loaded_for(vs)?;
        let offset = offset_ms(&vs.offset);
        let at = at_ms(&vs.at, self.query);
        let range = self.range;
        let lookback = self.options.lookback;
        let mut out = Vec::with_capacity(series.len());
        for s in series {
            self.check_deadline()?;
            let mut points = Vec::new();
            let mut next = 0; // index of the first sample after the read time
            for (step, t) in range.timestamps().enumerate() {
                self.step_check(step, points.len())?;
                let read_at = at.unwrap_or(t).saturating_sub(offset);
                while next < s.samples.len() && s.samples[next].t <= read_at {
                    next += 1;
                }
                if next == 0 {
                    continue;
                }
                let latest = s.samples[next - 1];
                if latest.t >= read_at.saturating_sub(lookback) && !is_stale_nan(latest.v) {
                    let v = if sample_time {
                        latest.t as f64 / 1000.0
                    } else {
                        latest.v
                    };
                    points.push(Sample { t, v });
                }
            }
            if !points.is_empty() {
                self.account(points.len())?;
                out.push(SeriesSamples {
                    labels: s.labels,
                    samples: points,
                });
            }
        }
        Ok(out)
    }

    /// A range selector or subquery as a function argument.
    pub(super) fn eval_range_arg(&mut self, expr: &Expr) -> Result<RangeArg, QueryError> {
        match expr {
            Expr::Paren(p) => self.eval_range_arg(&p.expr),
            Expr::MatrixSelector(ms) => {
                let mut series = self.loaded_for(&ms.vs)?;
                for s in &mut series {
                    s.samples.retain(|p| !is_stale_nan(p.v));
                }
                series.retain(|s| !s.samples.is_empty());
                Ok(RangeArg {
                    series,
                    window: duration_ms(&ms.range),
                    offset: offset_ms(&ms.vs.offset),
                    at: at_ms(&ms.vs.at, self.query),
                })
            }
            Expr::Subquery(sq) => {
                let inner = subquery_range(
                    sq,
                    self.range,
                    self.query,
                    self.options.default_subquery_step,
                );
                let outer = std::mem::replace(&mut self.range, inner);
                let value = self.eval(&sq.expr);
                self.range = outer;
                let series = match value? {
                    Value::Vector(series) => series,
                    Value::Scalar(values) => vec![SeriesSamples {
                        labels: Labels::empty(),
                        samples: inner
                            .timestamps()
                            .zip(values)
                            .map(|(t, v)| Sample { t, v })
                            .collect(),
                    }],
                    _ => return Err(QueryError::Execution("subquery of a non-vector".into())),
                };
                Ok(RangeArg {
                    series,
                    window: duration_ms(&sq.range),
                    offset: offset_ms(&sq.offset),
                    at: at_ms(&sq.at, self.query),
                })
            }
            other => Err(QueryError::Execution(format!(
                "expected a range vector: {other}"
            ))),
        }
    }

    /// Slides each step's window `[t - range, t]` (closed, as in Prometheus 2.x) over every
    /// series of a range argument with two cursors, so no sample is located twice, and folds
    /// each non-empty window with `fold`. `params` holds per-step scalar arguments.
    pub(super) fn rollup(
        &mut self,
        arg: RangeArg,
        params: &[Vec<f64>],
        keep_metric_name: bool,
        mut fold: impl FnMut(&[Sample], &WindowCtx) -> Option<f64>,
    ) -> Result<Vec<SeriesSamples>, QueryError> {
        let range = self.range;
        let mut step_params = vec![0.0; params.len()];
        let mut out = Vec::with_capacity(arg.series.len());
        for s in arg.series {
            self.check_deadline()?;
            let (mut lo, mut hi) = (0, 0);
            let mut points = Vec::new();
            for (step, t) in range.timestamps().enumerate() {
                self.step_check(step, points.len())?;
                let end = arg.at.unwrap_or(t).saturating_sub(arg.offset);
                let start = end.saturating_sub(arg.window);
                while hi < s.samples.len() && s.samples[hi].t <= end {
                    hi += 1;
                }
                while lo < hi && s.samples[lo].t < start {
                    lo += 1;
                }
                if lo == hi {
                    continue;
                }
                for (slot, values) in step_params.iter_mut().zip(params) {
                    *slot = values[step];
                }
                let ctx = WindowCtx {
                    t,
                    start,
                    end,
                    window: arg.window,
                    params: &step_params,
                };
                if let Some(v) = fold(&s.samples[lo..hi], &ctx) {
                    points.push(Sample { t, v });
                }
            }
            if !points.is_empty() {
                self.account(points.len())?;
                let labels = if keep_metric_name {
                    s.labels
                } else {
                    s.labels.without_metric_name()
                };
                out.push(SeriesSamples {
                    labels,
                    samples: points,
                });
            }
        }
        check_unique_labels(&out)?;
        Ok(out)
    }

    /// Evaluates step by step: at each step, `f` gets the step time and one column per input
    /// (the series of that input with a point at the step), and returns the output samples.
    /// Outputs are assembled into series by labels; two outputs with the same labels at one
    /// step are Prometheus's "vector cannot contain metrics with the same labelset".
    pub(super) fn step_eval(
        &mut self,
        inputs: &[&[SeriesSamples]],
        mut f: impl FnMut(usize, i64, &[StepColumn]) -> Result<Vec<(Labels, f64)>, QueryError>,
    ) -> Result<Vec<SeriesSamples>, QueryError> {
        let mut cursors: Vec<Vec<usize>> =
            inputs.iter().map(|series| vec![0; series.len()]).collect();
        let mut columns: Vec<StepColumn> = inputs.iter().map(|_| Vec::new()).collect();
        let mut builder = VectorBuilder::new();
        let range = self.range;
        for (step, t) in range.timestamps().enumerate() {
            self.step_check(step, 0)?;
            for ((series, cursor), column) in inputs.iter().zip(&mut cursors).zip(&mut columns) {
                column.clear();
                for (i, s) in series.iter().enumerate() {
                    if let Some(p) = s.samples.get(cursor[i]) {
                        if p.t == t {
                            column.push((i, p.v));
                            cursor[i] += 1;
                        }
                    }
                }
            }
            let output = f(step, t, &columns)?;
            self.account(output.len())?;
            for (labels, v) in output {
                builder.push_unique(labels, Sample { t, v })?;
            }
        }
        Ok(builder.finish())
    }
}

/// Fails when two series of a vector have the same labels.
pub(super) fn check_unique_labels(series: &[SeriesSamples]) -> Result<(), QueryError> {
    if series.len() < 2 {
        return Ok(());
    }
    let mut seen = std::collections::HashSet::with_capacity(series.len());
    for s in series {
        if !seen.insert(&s.labels) {
            return Err(duplicate_labelset());
        }
    }
    Ok(())
}

/// Merges series that share labels after an operation changed them, as Prometheus assembles
/// step results by labels; fails if two of them have a point at the same step.
pub(super) fn merge_by_labels(
    series: Vec<SeriesSamples>,
) -> Result<Vec<SeriesSamples>, QueryError> {
    if series.len() < 2 {
        return Ok(series);
    }
    let mut index: HashMap<Labels, usize> = HashMap::with_capacity(series.len());
    let mut out: Vec<SeriesSamples> = Vec::with_capacity(series.len());
    for s in series {
        match index.get(&s.labels) {
            None => {
                index.insert(s.labels.clone(), out.len());
                out.push(s);
            }
            Some(&i) => {
                let target = &mut out[i].samples;
                target.extend(s.samples);
                target.sort_by_key(|p| p.t);
                if target.windows(2).any(|w| w[0].t == w[1].t) {
                    return Err(duplicate_labelset());
                }
            }
        }
    }
    Ok(out)
}

pub(super) fn duplicate_labelset() -> QueryError {
    QueryError::Execution("vector cannot contain metrics with the same labelset".into())
}

impl VectorBuilder {
    /// Adds a sample, failing if its series already has one at this timestamp.
    pub(super) fn push_unique(&mut self, labels: Labels, sample: Sample) -> Result<(), QueryError> {
        if self.last_time(&labels) == Some(sample.t) {
            return Err(duplicate_labelset());
        }
        self.push(labels, sample);
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Label, Labels, STALE_NAN_BITS};
    use crate::promql::value::Value;
    use std::time::Duration;

    fn loaded_for(expr: &Expr, series: Vec<SeriesSamples>) -> Loaded {
        let vs = match expr {
            Expr::VectorSelector(vs) => vs,
            Expr::MatrixSelector(ms) => &ms.vs,
            Expr::Call(call) => match call.args.args[0].as_ref() {
                Expr::MatrixSelector(ms) => &ms.vs,
                other => panic!("unexpected argument {other:?}"),
            },
            other => panic!("unexpected expression {other:?}"),
        };
        Loaded::from([(node_key(vs), series)])
    }

    fn options(max_samples: usize) -> EvalOptions {
        EvalOptions {
            lookback: 300_000,
            max_samples,
            default_subquery_step: 60_000,
            max_source_resolution: SourceResolution::Raw,
            rollups: true,
        }
    }

    fn series(samples: &[(i64, f64)]) -> SeriesSamples {
        SeriesSamples {
            labels: Labels::from_trusted(vec![Label::new("__name__", "m")]),
            samples: samples.iter().map(|&(t, v)| Sample { t, v }).collect(),
        }
    }

    fn eval(query: &str, range: EvalRange, data: &[(i64, f64)]) -> Result<Value, QueryError> {
        let expr = Box::new(promql_parser::parser::parse(query).unwrap());
        let loaded = loaded_for(&expr, vec![series(data)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        Evaluator::new(range, options(1_000), deadline, loaded).eval(&expr)
    }

    fn points(value: Value) -> Vec<(i64, f64)> {
        match value {
            Value::Vector(s) | Value::Matrix(s) => s
                .into_iter()
                .flat_map(|s| s.samples)
                .map(|p| (p.t, p.v))
                .collect(),
            other => panic!("not a vector: {other:?}"),
        }
    }

    #[test]
    fn selector_steps_use_lookback_and_stop_at_staleness() {
        let stale = f64::from_bits(STALE_NAN_BITS);
        let range = EvalRange {
            start: 0,
            end: 400_000,
            step: 100_000,
        };
        let got = points(
            eval(
                "m",
                range,
                &[(50_000, 1.0), (150_000, 2.0), (250_000, stale)],
            )
            .unwrap(),
        );
        assert_eq!(got, [(100_000, 1.0), (200_000, 2.0)]);
        // Without the marker the last sample lasts exactly the lookback (inclusive).
        let range = EvalRange {
            start: 450_000,
            end: 460_000,
            step: 5_000,
        };
        assert_eq!(
            points(eval("m", range, &[(150_000, 2.0)]).unwrap()),
            [(450_000, 2.0)]
        );
    }

    #[test]
    fn rollup_windows_are_closed_and_skip_stale_markers() {
        let stale = f64::from_bits(STALE_NAN_BITS);
        let data = [(0, 1.0), (10_000, 1.0), (20_000, stale), (30_000, 1.0)];
        let range = EvalRange {
            start: 30_000,
            end: 40_000,
            step: 10_000,
        };
        let got = points(eval("count_over_time(m[30s])", range, &data).unwrap());
        assert_eq!(got, [(30_000, 3.0), (40_000, 2.0)]);
    }

    #[test]
    fn at_pins_every_step_to_one_time() {
        let range = EvalRange {
            start: 0,
            end: 20_000,
            step: 10_000,
        };
        let got = points(eval("m @ 5", range, &[(4_000, 7.0), (6_000, 8.0)]).unwrap());
        assert_eq!(got, [(0, 7.0), (10_000, 7.0), (20_000, 7.0)]);
    }

    #[test]
    fn the_deadline_and_the_sample_limit_stop_evaluation() {
        let expr = Box::new(promql_parser::parser::parse("m").unwrap());
        let loaded = loaded_for(&expr, vec![series(&[(0, 1.0)])]);
        let past = Instant::now() - Duration::from_secs(1);
        let result = Evaluator::new(EvalRange::instant(0), options(10), past, loaded).eval(&expr);
        assert!(matches!(
            result,
            Err(QueryError::Timeout("expression evaluation"))
        ));

        let many: Vec<(i64, f64)> = (0..20).map(|i| (i * 1000, 1.0)).collect();
        let range = EvalRange {
            start: 0,
            end: 19_000,
            step: 1000,
        };
        let expr = Box::new(promql_parser::parser::parse("m").unwrap());
        let loaded = loaded_for(&expr, vec![series(&many)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let result = Evaluator::new(range, options(10), deadline, loaded).eval(&expr);
        assert!(matches!(result, Err(QueryError::TooManySamples)));
    }

    #[test]
    fn step_arithmetic_saturates_instead_of_wrapping() {
        let full = EvalRange {
            start: i64::MIN,
            end: i64::MAX,
            step: 1,
        };
        assert_eq!(full.steps(), usize::MAX);
        let reversed = EvalRange {
            start: 10,
            end: 5,
            step: 10,
        };
        assert_eq!(reversed.steps(), 0);
        assert_eq!(reversed.timestamps().count(), 0);
        for query in [
            "x[1y:1ms] offset -292y",
            "x[292y:1ms] offset 292y",
            "x[1ms:1ms] @ 0",
        ] {
            let Expr::Subquery(sq) = promql_parser::parser::parse(query).unwrap() else {
                panic!("{query} is not a subquery");
            };
            for outer in [
                EvalRange::instant(i64::MIN),
                EvalRange::instant(i64::MAX),
                full,
            ] {
                let inner = subquery_range(&sq, outer, outer, 60_000);
                assert!(inner.step >= 1, "{query}");
                let _ = inner.steps();
            }
        }
    }

    #[test]
    fn a_selector_the_plan_did_not_load_is_an_error() {
        let expr = Box::new(promql_parser::parser::parse("m + 1").unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        let result =
            Evaluator::new(EvalRange::instant(0), options(10), deadline, Loaded::new()).eval(&expr);
        assert!(
            matches!(&result, Err(QueryError::Storage(e)) if e.to_string().contains("was not loaded")),
            "{result:?}"
        );
    }

    #[test]
    fn literals_are_charged_before_their_steps_are_allocated() {
        let expr = Box::new(promql_parser::parser::parse("1").unwrap());
        let range = EvalRange {
            start: 0,
            end: i64::MAX,
            step: 1,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let result = Evaluator::new(range, options(1_000), deadline, Loaded::new()).eval(&expr);
        assert!(matches!(result, Err(QueryError::TooManySamples)));
    }
}
