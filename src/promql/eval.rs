//! Evaluating the AST over all steps, over what [`super::plan`] loaded.
//!
//! Selectors and range functions run series at a time over every step; operators and
//! aggregations that combine series run step by step over columns ([`Evaluator::step_eval`]),
//! which is how Prometheus's `rangeEval` defines their semantics.

use super::functions::{self, Fold};
use super::plan::{at_ms, duration_ms, node_key, offset_ms, subquery_range, Loaded, LoadedRollups};
use super::rollups::{RollupLoad, SourceResolution};
use super::value::{Value, VectorBuilder};
use super::{aggregate, binary, EvalRange, QueryError};
use crate::model::{is_stale_nan, Labels, Sample, SeriesSamples};
use promql_parser::parser::{Call, Expr, VectorSelector};
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

impl RangeArg {
    /// These series as a [`Streamed`] input folding each step's window with `fold`.
    fn streamed(self, fold: Fold, params: Vec<Vec<f64>>, drops_metric_name: bool) -> Streamed {
        Streamed {
            series: self.series,
            step_fn: StepFn::Window {
                window: self.window,
                offset: self.offset,
                at: self.at,
                fold,
                params,
            },
            drops_metric_name,
        }
    }
}

/// What a rollup sees besides the window: the step time and window bounds (ms), and the
/// scalar arguments at this step.
pub(super) struct WindowCtx<'a> {
    pub t: i64,
    pub start: i64,
    pub end: i64,
    pub window: i64,
    pub params: &'a [f64],
    /// No sample of the series is below the one before it (no NaN either): a window of it
    /// holds no counter reset, and a fold need not look for one.
    pub ascending: bool,
}

/// One step of an instant vector: `(index of the series in its input, value)`.
pub(super) type StepColumn = Vec<(usize, f64)>;

/// Steps a loop runs between checks of the deadline and the sample limit: a few hundred
/// microseconds of work, so a query stops well within a second of its deadline.
pub(super) const STEPS_BETWEEN_CHECKS: usize = 4096;

/// The threads a query's large parts are split over, and how large a part must be (series x
/// steps) before it is split.
#[derive(Clone)]
pub(super) struct Parallel {
    /// `None`: the process's query threads (rayon's global pool, `--query-threads`), which
    /// the storage's reads use too.
    pub pool: Option<Arc<rayon::ThreadPool>>,
    pub min_points: usize,
}

impl Parallel {
    fn threads(&self) -> usize {
        self.pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }

    fn install<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(work),
            None => work(),
        }
    }
}

/// The deadline and the sample limit, checked from every thread working on one part of a query.
pub(super) struct Budget {
    deadline: Instant,
    max_samples: usize,
    produced: AtomicUsize,
}

impl Budget {
    /// Fails once the deadline has passed or `held` more points would exceed the sample limit.
    pub(super) fn check(&self, held: usize) -> Result<(), QueryError> {
        if Instant::now() > self.deadline {
            return Err(QueryError::Timeout("expression evaluation"));
        }
        if self.produced.load(Ordering::Relaxed).saturating_add(held) > self.max_samples {
            return Err(QueryError::TooManySamples);
        }
        Ok(())
    }

    /// Accounts for `points` points produced.
    pub(super) fn charge(&self, points: usize) -> Result<(), QueryError> {
        let before = self.produced.fetch_add(points, Ordering::Relaxed);
        if before.saturating_add(points) > self.max_samples {
            return Err(QueryError::TooManySamples);
        }
        Ok(())
    }
}

/// How one series' raw samples become its points at the steps: an instant selector's latest
/// sample within the lookback, or a range function's fold over sliding windows. Either runs
/// over any block of steps on its own, so one series can be evaluated in parts, on several
/// threads, with the same result.
pub(super) enum StepFn {
    Select {
        offset: i64,
        at: Option<i64>,
        lookback: i64,
        /// Each point carries the picked sample's timestamp, in seconds (`timestamp()`).
        sample_time: bool,
    },
    Window {
        window: i64,
        offset: i64,
        at: Option<i64>,
        fold: Fold,
        /// Per-step scalar arguments.
        params: Vec<Vec<f64>>,
    },
}

impl StepFn {
    /// Calls `emit(step, t, v)` for each point of a series (its samples in time order; stale
    /// markers already removed for a window) at the steps `steps` of `range`, in step order.
    /// `check(emitted)` runs every [`STEPS_BETWEEN_CHECKS`] steps.
    pub(super) fn points(
        &self,
        samples: &[Sample],
        range: EvalRange,
        steps: Range<usize>,
        check: impl Fn(usize) -> Result<(), QueryError>,
        mut emit: impl FnMut(usize, i64, f64),
    ) -> Result<(), QueryError> {
        if steps.is_empty() {
            return Ok(());
        }
        // Every step lies in [start, end], so the products cannot overflow.
        let time = |step: usize| range.start + step as i64 * range.step;
        let mut emitted = 0usize;
        match self {
            StepFn::Select {
                offset,
                at,
                lookback,
                sample_time,
            } => {
                let read_at = |t: i64| at.unwrap_or(t).saturating_sub(*offset);
                // Index of the first sample after the read time.
                let mut next = count_until(samples, read_at(time(steps.start)));
                for step in steps {
                    if step % STEPS_BETWEEN_CHECKS == STEPS_BETWEEN_CHECKS - 1 {
                        check(emitted)?;
                    }
                    let t = time(step);
                    let read_at = read_at(t);
                    while next < samples.len() && samples[next].t <= read_at {
                        next += 1;
                    }
                    if next == 0 {
                        continue;
                    }
                    let latest = samples[next - 1];
                    if latest.t >= read_at.saturating_sub(*lookback) && !is_stale_nan(latest.v) {
                        let v = if *sample_time {
                            latest.t as f64 / 1000.0
                        } else {
                            latest.v
                        };
                        emitted += 1;
                        emit(step, t, v);
                    }
                }
            }
            StepFn::Window {
                window,
                offset,
                at,
                fold,
                params,
            } => {
                let bounds = |t: i64| {
                    let end = at.unwrap_or(t).saturating_sub(*offset);
                    (end.saturating_sub(*window), end)
                };
                // Two cursors: the window is samples[lo..hi].
                let (start, end) = bounds(time(steps.start));
                let mut hi = count_until(samples, end);
                let mut lo = match start.checked_sub(1) {
                    Some(before) => count_until(&samples[..hi], before),
                    None => 0,
                };
                let mut step_params = vec![0.0; params.len()];
                let ascending = samples.windows(2).all(|w| w[1].v >= w[0].v);
                for step in steps {
                    if step % STEPS_BETWEEN_CHECKS == STEPS_BETWEEN_CHECKS - 1 {
                        check(emitted)?;
                    }
                    let t = time(step);
                    let (start, end) = bounds(t);
                    while hi < samples.len() && samples[hi].t <= end {
                        hi += 1;
                    }
                    while lo < hi && samples[lo].t < start {
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
                        window: *window,
                        params: &step_params,
                        ascending,
                    };
                    if let Some(v) = fold(&samples[lo..hi], &ctx) {
                        emitted += 1;
                        emit(step, t, v);
                    }
                }
            }
        }
        Ok(())
    }
}

/// How many of `samples` (in time order) are at or before `t`: `partition_point`, but from a
/// guess made from the first and last times, then a short walk. A binary search over
/// samples that are not in the cache waits for one line after another; this reads the
/// ends and the neighbourhood of the answer, which the steps read next anyway.
fn count_until(samples: &[Sample], t: i64) -> usize {
    let n = samples.len();
    if n == 0 || samples[0].t > t {
        return 0;
    }
    let (first, last) = (samples[0].t, samples[n - 1].t);
    if last <= t {
        return n;
    }
    // first <= t < last, so n >= 2 and the span is positive.
    let span = i128::from(last) - i128::from(first);
    let guess = ((i128::from(t) - i128::from(first)) * (n - 1) as i128 / span) as usize;
    let mut i = guess.min(n - 1);
    const WALK: usize = 8;
    for _ in 0..WALK {
        if samples[i].t > t {
            if i == 0 || samples[i - 1].t <= t {
                return i;
            }
            i -= 1;
        } else {
            if samples[i + 1].t > t {
                return i + 1;
            }
            i += 1;
        }
    }
    samples.partition_point(|p| p.t <= t)
}

/// An instant vector an aggregation can fold one series at a time, never holding every
/// series' points: a selector, or a range function over a selector.
pub(super) struct Streamed {
    pub series: Vec<SeriesSamples>,
    pub step_fn: StepFn,
    /// The range function drops the metric name from its output.
    pub drops_metric_name: bool,
}

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
    parallel: Option<Parallel>,
    /// Aggregations fold [`Streamed`] arguments as they are evaluated (off only in tests
    /// that compare with step-by-step evaluation).
    streaming: bool,
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
            parallel: None,
            streaming: true,
        }
    }

    /// Evaluates every aggregation step by step over its argument's held points.
    #[cfg(test)]
    pub(super) fn without_streaming(mut self) -> Self {
        self.streaming = false;
        self
    }

    /// Splits large parts of the evaluation over these threads.
    pub(super) fn with_parallel(mut self, parallel: Option<Parallel>) -> Self {
        self.parallel = parallel;
        self
    }

    /// The threads to split work of `points` points (series x steps) over, if it is large
    /// enough and there are several.
    pub(super) fn pool_for(&self, points: usize) -> Option<&Parallel> {
        let parallel = self.parallel.as_ref()?;
        (points >= parallel.min_points && parallel.threads() > 1).then_some(parallel)
    }

    /// How many threads work of `points` points is split over.
    pub(super) fn threads_for(&self, points: usize) -> usize {
        self.pool_for(points).map_or(1, Parallel::threads)
    }

    /// The deadline and what is left of the sample limit, for work split over threads; give
    /// it back with [`Evaluator::settle`].
    pub(super) fn budget(&self) -> Budget {
        Budget {
            deadline: self.deadline,
            max_samples: self.options.max_samples,
            produced: AtomicUsize::new(self.produced),
        }
    }

    /// What is left of the sample limit.
    pub(super) fn samples_left(&self) -> usize {
        self.options.max_samples.saturating_sub(self.produced)
    }

    /// A [`Streamed`] argument's points, held as an instant vector.
    pub(super) fn hold(&mut self, input: Streamed) -> Result<Vec<SeriesSamples>, QueryError> {
        let drops = input.drops_metric_name;
        self.series_points(input.series, &input.step_fn, |labels| {
            if drops {
                labels.without_metric_name()
            } else {
                labels
            }
        })
    }

    /// Takes back the points a [`Budget`] accounted.
    pub(super) fn settle(&mut self, budget: Budget) {
        self.produced = budget.produced.into_inner();
    }

    /// `work` over each item, results in the items' order; on the query threads, at least
    /// `min_len` items a task, when `points` is large enough.
    pub(super) fn map_items<I: Send, T: Send>(
        &self,
        items: Vec<I>,
        points: usize,
        min_len: usize,
        work: impl Fn(I) -> Result<T, QueryError> + Sync + Send,
    ) -> Result<Vec<T>, QueryError> {
        match self.pool_for(points) {
            Some(parallel) => parallel.install(|| {
                items
                    .into_par_iter()
                    .with_min_len(min_len)
                    .map(work)
                    .collect()
            }),
            None => items.into_iter().map(work).collect(),
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
        let step_fn = self.select_fn(vs, sample_time);
        self.series_points(series, &step_fn, |labels| labels)
    }

    /// The [`StepFn`] of an instant selector.
    fn select_fn(&self, vs: &VectorSelector, sample_time: bool) -> StepFn {
        StepFn::Select {
            offset: offset_ms(&vs.offset),
            at: at_ms(&vs.at, self.query),
            lookback: self.options.lookback,
            sample_time,
        }
    }

    /// Each series' points at every step, series in their order, those with no point left
    /// out, labels mapped by `relabel`; split over the query threads when large.
    fn series_points(
        &mut self,
        series: Vec<SeriesSamples>,
        step_fn: &StepFn,
        relabel: impl Fn(Labels) -> Labels + Sync + Send,
    ) -> Result<Vec<SeriesSamples>, QueryError> {
        let range = self.range;
        let steps = range.steps();
        let budget = self.budget();
        let points = series.len().saturating_mul(steps);
        let out = self.map_items(series, points, 16, |s| {
            budget.check(0)?;
            let mut points = Vec::new();
            step_fn.points(
                &s.samples,
                range,
                0..steps,
                |held| budget.check(held),
                |_, t, v| points.push(Sample { t, v }),
            )?;
            if points.is_empty() {
                return Ok(None);
            }
            budget.charge(points.len())?;
            Ok(Some(SeriesSamples {
                labels: relabel(s.labels),
                samples: points,
            }))
        })?;
        self.settle(budget);
        Ok(out.into_iter().flatten().collect())
    }

    /// A range selector or subquery as a function argument.
    pub(super) fn eval_range_arg(&mut self, expr: &Expr) -> Result<RangeArg, QueryError> {
        match expr {
            Expr::Paren(p) => self.eval_range_arg(&p.expr),
            Expr::MatrixSelector(ms) => {
                let mut series = self.loaded_for(&ms.vs)?;
                let points = series.iter().map(|s| s.samples.len()).sum();
                let drop_stale = |s: &mut SeriesSamples| s.samples.retain(|p| !is_stale_nan(p.v));
                match self.pool_for(points) {
                    Some(parallel) => parallel
                        .install(|| series.par_iter_mut().with_min_len(64).for_each(drop_stale)),
                    None => series.iter_mut().for_each(drop_stale),
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
        fold: Fold,
    ) -> Result<Vec<SeriesSamples>, QueryError> {
        // Series of one metric name stay distinct without it.
        let unique = keep_metric_name || one_metric_name(&arg.series);
        let out = self.hold(arg.streamed(fold, params.to_vec(), !keep_metric_name))?;
        if !unique {
            check_unique_labels(&out)?;
        }
        Ok(out)
    }

    /// The argument of an aggregation as a [`Streamed`] input, when it is one: a selector, or
    /// a range function (not answered from rollups) over a selector whose series all have
    /// one metric name or keep it (so they stay distinct without duplicates to report).
    /// `None` (nothing evaluated) for anything else.
    pub(super) fn streamed(&mut self, expr: &Expr) -> Result<Option<Streamed>, QueryError> {
        if !self.streaming {
            return Ok(None);
        }
        match expr {
            Expr::Paren(p) => self.streamed(&p.expr),
            Expr::VectorSelector(vs) => {
                let step_fn = self.select_fn(vs, false);
                Ok(Some(Streamed {
                    series: self.loaded_for(vs)?,
                    step_fn,
                    drops_metric_name: false,
                }))
            }
            Expr::Call(call) => self.streamed_call(call),
            _ => Ok(None),
        }
    }

    fn streamed_call(&mut self, call: &Call) -> Result<Option<Streamed>, QueryError> {
        let Some((fold, keeps_metric_name)) = functions::range_fold(call.func.name) else {
            return Ok(None);
        };
        fn selector(expr: &Expr) -> Option<&VectorSelector> {
            match expr {
                Expr::Paren(p) => selector(&p.expr),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            }
        }
        let mut ranges = call.args.args.iter().filter(|a| selector(a).is_some());
        let (Some(range), None) = (ranges.next(), ranges.next()) else {
            return Ok(None);
        };
        let key = node_key(selector(range).expect("a matrix selector"));
        if self.rollups.contains_key(&key) {
            return Ok(None);
        }
        match self.loaded.get(&key) {
            Some(series)
                if keeps_metric_name
                    || names_one_metric(selector(range).expect("a matrix selector"))
                    || one_metric_name(series) => {}
            _ => return Ok(None),
        }
        let mut params = Vec::new();
        for arg in &call.args.args {
            if selector(arg).is_none() {
                params.push(self.eval_scalar(arg)?);
            }
        }
        let arg = self.eval_range_arg(range)?;
        Ok(Some(arg.streamed(fold, params, !keeps_metric_name)))
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

/// Whether every series has the same metric name (or none has one).
/// Whether a selector's series all have one metric name, from its matchers alone (an
/// equality on `__name__`): a look at every series' labels is then not needed.
fn names_one_metric(vs: &VectorSelector) -> bool {
    super::selector_matchers(vs).iter().any(|m| {
        m.name == crate::model::METRIC_NAME_LABEL && matches!(m.op, crate::model::MatchOp::Equal(_))
    })
}

fn one_metric_name(series: &[SeriesSamples]) -> bool {
    let first = series.first().and_then(|s| s.labels.metric_name());
    series.iter().all(|s| s.labels.metric_name() == first)
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

    /// The first selector of an expression (each test query has one).
    fn selector_of(expr: &Expr) -> &VectorSelector {
        match expr {
            Expr::VectorSelector(vs) => vs,
            Expr::MatrixSelector(ms) => &ms.vs,
            Expr::Paren(p) => selector_of(&p.expr),
            Expr::Aggregate(a) => selector_of(&a.expr),
            Expr::Call(call) => call
                .args
                .args
                .iter()
                .find(|a| !matches!(a.as_ref(), Expr::NumberLiteral(_)))
                .map(|a| selector_of(a))
                .expect("a selector argument"),
            other => panic!("unexpected expression {other:?}"),
        }
    }

    /// Series of three metric names over a few groups, with NaN, infinities, negative zero,
    /// counter resets, gaps and staleness markers.
    fn awkward_series(count: usize) -> Vec<SeriesSamples> {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut out = Vec::new();
        for i in 0..count {
            let name = ["a", "b", "c"][i % 3];
            let labels = Labels::from_trusted(vec![
                Label::new("__name__", name),
                Label::new("g", format!("{}", i % 7)),
                Label::new("h", format!("{}", i % 5)),
                Label::new("i", format!("{i}")),
            ]);
            let mut samples = Vec::new();
            let mut counter = 0.0;
            let mut t = (next() % 20_000) as i64;
            while t < 3_600_000 {
                let r = next();
                let v = match r % 97 {
                    0 => f64::NAN,
                    1 => f64::INFINITY,
                    2 => f64::NEG_INFINITY,
                    3 => -0.0,
                    4 => f64::from_bits(STALE_NAN_BITS),
                    5 => {
                        counter = 0.0;
                        counter
                    }
                    _ => {
                        counter += (r % 1000) as f64 / 7.0;
                        counter
                    }
                };
                samples.push(Sample { t, v });
                t += 10_000 + (r % 50_000) as i64;
            }
            out.push(SeriesSamples { labels, samples });
        }
        out
    }

    fn bits(value: Value) -> Vec<(Labels, Vec<(i64, u64)>)> {
        match value {
            Value::Vector(s) | Value::Matrix(s) => s
                .into_iter()
                .map(|s| {
                    let points = s.samples.iter().map(|p| (p.t, p.v.to_bits())).collect();
                    (s.labels, points)
                })
                .collect(),
            other => panic!("not a vector: {other:?}"),
        }
    }

    /// A pool of `threads` and every part split over it, however small.
    fn split_over(threads: usize) -> Parallel {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        Parallel {
            pool: Some(Arc::new(pool)),
            min_points: 0,
        }
    }

    #[test]
    fn streamed_and_parallel_evaluation_give_the_same_bits_in_the_same_order() {
        let data = awkward_series(100);
        let split = split_over(3);
        let ranges = [
            EvalRange::instant(1_800_000),
            EvalRange {
                start: 0,
                end: 3_600_000,
                step: 15_000,
            },
            EvalRange {
                start: 600_000,
                end: 660_000,
                step: 30_000,
            },
        ];
        let inners = [
            "a",
            "{__name__=~\"a|b\"}",
            "a offset 1m",
            "a @ 1000",
            "rate(a[5m])",
            "rate({__name__=~\".+\"}[5m])",
            "increase(b[2m] offset 30s)",
            "quantile_over_time(0.3, c[3m])",
            "predict_linear(a[10m], 600)",
            "last_over_time(a[1m])",
            "stddev_over_time(a[5m])",
        ];
        let mut queries: Vec<String> = inners.iter().map(|q| q.to_string()).collect();
        for op in [
            "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar",
        ] {
            for inner in inners {
                for modifier in ["", " by (g)", " without (h, i)", " by (__name__, g)"] {
                    queries.push(format!("{op}{modifier} ({inner})"));
                }
            }
        }
        queries.push("topk by (g) (2, rate(a[5m]))".into());
        queries.push("count_values(\"v\", a)".into());
        let mut compared = 0;
        for query in &queries {
            let expr = Box::new(promql_parser::parser::parse(query).unwrap());
            let vs = selector_of(&expr);
            for range in ranges {
                let run = |streaming: bool, parallel: bool| {
                    let loaded = Loaded::from([(node_key(vs), data.clone())]);
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut ev = Evaluator::new(range, options(100_000_000), deadline, loaded);
                    if !streaming {
                        ev = ev.without_streaming();
                    }
                    if parallel {
                        ev = ev.with_parallel(Some(split.clone()));
                    }
                    ev.eval(&expr).map(bits).map_err(|e| e.to_string())
                };
                let reference = run(false, false);
                for (streaming, parallel) in [(true, false), (false, true), (true, true)] {
                    assert_eq!(
                        run(streaming, parallel),
                        reference,
                        "{query} over {range:?}, streaming {streaming}, parallel {parallel}"
                    );
                }
                if let Ok(series) = &reference {
                    compared += series.len();
                }
            }
        }
        // The data makes the comparisons mean something: answers, and an error case.
        assert!(compared > 5_000, "{compared}");
        // Series of two names that are equal without them: the argument is refused whole.
        let mut twins = awkward_series(2);
        let labels = twins[0].labels.clone().without_metric_name();
        twins[0].labels = Labels::from_trusted(
            std::iter::once(Label::new("__name__", "a"))
                .chain(labels.iter().cloned())
                .collect(),
        );
        twins[1].labels = Labels::from_trusted(
            std::iter::once(Label::new("__name__", "b"))
                .chain(labels.iter().cloned())
                .collect(),
        );
        let duplicate = run_once(&twins, "sum(rate({__name__=~\".+\"}[5m]))", &split);
        assert!(
            matches!(&duplicate, Err(e) if e.to_string().contains("same labelset")),
            "{duplicate:?}"
        );
    }

    fn run_once(
        data: &[SeriesSamples],
        query: &str,
        split: &Parallel,
    ) -> Result<Value, QueryError> {
        let expr = Box::new(promql_parser::parser::parse(query).unwrap());
        let loaded = Loaded::from([(node_key(selector_of(&expr)), data.to_vec())]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let range = EvalRange {
            start: 0,
            end: 3_600_000,
            step: 15_000,
        };
        Evaluator::new(range, options(100_000_000), deadline, loaded)
            .with_parallel(Some(split.clone()))
            .eval(&expr)
    }

    #[test]
    fn split_evaluation_keeps_the_sample_limit_and_the_deadline() {
        let data = awkward_series(100);
        let split = split_over(2);
        let range = EvalRange {
            start: 0,
            end: 3_600_000,
            step: 15_000,
        };
        for query in ["a", "rate(a[5m])", "sum(rate(a[5m]))", "sum(a)"] {
            let expr = Box::new(promql_parser::parser::parse(query).unwrap());
            let vs = selector_of(&expr);
            let parallel = Some(split.clone());
            let loaded = Loaded::from([(node_key(vs), data.clone())]);
            let deadline = Instant::now() + Duration::from_secs(30);
            let result = Evaluator::new(range, options(1_000), deadline, loaded)
                .with_parallel(parallel.clone())
                .eval(&expr);
            assert!(
                matches!(result, Err(QueryError::TooManySamples)),
                "{query}: {result:?}"
            );
            let loaded = Loaded::from([(node_key(vs), data.clone())]);
            let past = Instant::now() - Duration::from_secs(1);
            let result = Evaluator::new(range, options(100_000_000), past, loaded)
                .with_parallel(parallel)
                .eval(&expr);
            assert!(
                matches!(result, Err(QueryError::Timeout(_))),
                "{query}: {result:?}"
            );
        }
        // An aggregation's state would be groups x steps: past the limit it is not
        // allocated, and the query fails at the limit as step-by-step evaluation does.
        let many_steps = EvalRange {
            start: 0,
            end: 3_600_000_000,
            step: 1,
        };
        for query in ["sum(a)", "sum by (i) (rate(a[5m]))"] {
            let expr = Box::new(promql_parser::parser::parse(query).unwrap());
            let loaded = Loaded::from([(node_key(selector_of(&expr)), data.clone())]);
            let deadline = Instant::now() + Duration::from_secs(30);
            let result = Evaluator::new(many_steps, options(1_000_000), deadline, loaded)
                .with_parallel(Some(split.clone()))
                .eval(&expr);
            assert!(
                matches!(result, Err(QueryError::TooManySamples)),
                "{query}: {result:?}"
            );
        }
    }

    #[test]
    fn counting_samples_until_a_time_agrees_with_a_binary_search() {
        let mut seed = 7u64;
        for n in 0..60 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut t = (seed >> 40) as i64 - 5_000;
            let samples: Vec<Sample> = (0..n)
                .map(|i| {
                    // Uneven gaps: some series are regular, some bunch up.
                    t += 1 + ((seed >> (i % 32)) % if n % 3 == 0 { 3 } else { 40_000 }) as i64;
                    Sample { t, v: 0.0 }
                })
                .collect();
            let lo = samples.first().map_or(0, |s| s.t) - 10;
            let hi = samples.last().map_or(0, |s| s.t) + 10;
            for probe in (lo..=hi).step_by(7).chain(samples.iter().map(|s| s.t)) {
                assert_eq!(
                    count_until(&samples, probe),
                    samples.partition_point(|p| p.t <= probe),
                    "{n} samples, at {probe}"
                );
            }
        }
    }
}
