//! Loading the series each selector needs, then evaluating the AST over all steps.

use super::functions::{self, FunctionImpl};
use super::selector_matchers;
use super::value::Value;
use super::{EvalRange, QueryError};
use crate::model::{is_stale_nan, Sample, SeriesSamples, TenantId};
use crate::storage::{DynStorage, SelectHints};
use promql_parser::parser::{AtModifier, Expr, MatrixSelector, Offset, VectorSelector};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Series loaded per selector node, keyed by the node's address in the AST (the AST is not
/// moved between loading and evaluation).
pub(super) type Loaded = HashMap<usize, Vec<SeriesSamples>>;

fn node_key(vs: &VectorSelector) -> usize {
    vs as *const VectorSelector as usize
}

fn duration_ms(d: &Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn offset_ms(offset: &Option<Offset>) -> i64 {
    match offset {
        None => 0,
        Some(Offset::Pos(d)) => duration_ms(d),
        Some(Offset::Neg(d)) => -duration_ms(d),
    }
}

fn system_time_ms(t: &SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => duration_ms(&d),
        Err(e) => -duration_ms(&e.duration()),
    }
}

/// The time a selector reads at for evaluation time `t`: its `@` time if any, minus its offset
/// (Prometheus applies both the same way whatever their order in the query).
fn at_ms(at: &Option<AtModifier>, range: EvalRange) -> Option<i64> {
    match at {
        None => None,
        Some(AtModifier::Start) => Some(range.start),
        Some(AtModifier::End) => Some(range.end),
        Some(AtModifier::At(t)) => Some(system_time_ms(t)),
    }
}

/// A selector to load: its node, matchers and the inclusive time range its evaluation reads.
struct Fetch<'a> {
    vs: &'a VectorSelector,
    hints: SelectHints,
}

fn collect_fetches<'a>(
    expr: &'a Expr,
    range: EvalRange,
    lookback: i64,
    func: Option<&str>,
    out: &mut Vec<Fetch<'a>>,
) {
    let mut push = |vs: &'a VectorSelector, window: i64, selector_range: i64| {
        let offset = offset_ms(&vs.offset);
        let (start, end) = match at_ms(&vs.at, range) {
            Some(at) => (at, at),
            None => (range.start, range.end),
        };
        out.push(Fetch {
            vs,
            hints: SelectHints {
                start: start.saturating_sub(offset).saturating_sub(window),
                end: end.saturating_sub(offset),
                step: if range.start == range.end {
                    0
                } else {
                    range.step
                },
                range: selector_range,
                func: func.map(str::to_owned),
                max_samples: 0,
            },
        });
    };
    match expr {
        Expr::VectorSelector(vs) => push(vs, lookback, 0),
        Expr::MatrixSelector(MatrixSelector { vs, range: r }) => {
            let r = duration_ms(r);
            push(vs, r, r)
        }
        Expr::Paren(p) => collect_fetches(&p.expr, range, lookback, func, out),
        Expr::Unary(u) => collect_fetches(&u.expr, range, lookback, func, out),
        Expr::Binary(b) => {
            collect_fetches(&b.lhs, range, lookback, None, out);
            collect_fetches(&b.rhs, range, lookback, None, out);
        }
        Expr::Aggregate(a) => {
            collect_fetches(&a.expr, range, lookback, None, out);
            if let Some(param) = &a.param {
                collect_fetches(param, range, lookback, None, out);
            }
        }
        Expr::Call(call) => {
            for arg in &call.args.args {
                collect_fetches(arg, range, lookback, Some(call.func.name), out);
            }
        }
        // Subqueries change the evaluation range of their inner expression; they are
        // refused at evaluation until they are implemented.
        Expr::Subquery(_)
        | Expr::NumberLiteral(_)
        | Expr::StringLiteral(_)
        | Expr::Extension(_) => {}
    }
}

/// Loads every selector's series, one storage call per selector, within the sample limit.
pub(super) async fn fetch(
    storage: &DynStorage,
    tenant: &TenantId,
    expr: &Expr,
    range: EvalRange,
    lookback: i64,
    max_samples: usize,
) -> Result<Loaded, QueryError> {
    let mut fetches = Vec::new();
    collect_fetches(expr, range, lookback, None, &mut fetches);
    let mut loaded = Loaded::with_capacity(fetches.len());
    let mut total = 0usize;
    for mut fetch in fetches {
        fetch.hints.max_samples = max_samples.saturating_sub(total).max(1);
        let series = storage
            .select(tenant, &selector_matchers(fetch.vs), &fetch.hints)
            .await?;
        total += series.iter().map(|s| s.samples.len()).sum::<usize>();
        if total > max_samples {
            return Err(QueryError::TooManySamples);
        }
        loaded.insert(node_key(fetch.vs), series);
    }
    Ok(loaded)
}

/// Evaluates an AST over the steps of one query.
pub(super) struct Evaluator {
    pub(super) range: EvalRange,
    lookback: i64,
    max_samples: usize,
    produced: usize,
    deadline: Instant,
    loaded: Loaded,
}

impl Evaluator {
    pub(super) fn new(
        range: EvalRange,
        lookback: i64,
        max_samples: usize,
        deadline: Instant,
        loaded: Loaded,
    ) -> Self {
        Evaluator {
            range,
            lookback,
            max_samples,
            produced: 0,
            deadline,
            loaded,
        }
    }

    /// Fails once the query's deadline has passed; called between series.
    pub(super) fn check_deadline(&self) -> Result<(), QueryError> {
        if Instant::now() > self.deadline {
            return Err(QueryError::Timeout("expression evaluation"));
        }
        Ok(())
    }

    /// Accounts for points a step of evaluation holds, against the per-query sample limit.
    pub(super) fn account(&mut self, points: usize) -> Result<(), QueryError> {
        self.produced += points;
        if self.produced > self.max_samples {
            return Err(QueryError::TooManySamples);
        }
        Ok(())
    }

    fn take_loaded(&mut self, vs: &VectorSelector) -> Vec<SeriesSamples> {
        self.loaded.remove(&node_key(vs)).unwrap_or_default()
    }

    pub(super) fn eval(&mut self, expr: &Expr) -> Result<Value, QueryError> {
        self.check_deadline()?;
        match expr {
            Expr::NumberLiteral(n) => Ok(Value::Scalar(vec![n.val; self.range.steps()])),
            Expr::StringLiteral(s) => Ok(Value::String(s.val.clone())),
            Expr::Paren(p) => self.eval(&p.expr),
            Expr::Unary(u) => match self.eval(&u.expr)? {
                Value::Scalar(values) => {
                    Ok(Value::Scalar(values.into_iter().map(|v| -v).collect()))
                }
                Value::Vector(mut series) => {
                    for s in &mut series {
                        s.labels = s.labels.without_metric_name();
                        for p in &mut s.samples {
                            p.v = -p.v;
                        }
                    }
                    Ok(Value::Vector(series))
                }
                _ => Err(QueryError::Execution(
                    "unary minus applies to scalars and instant vectors only".into(),
                )),
            },
            Expr::VectorSelector(vs) => self.eval_vector_selector(vs),
            Expr::MatrixSelector(ms) => {
                let range = duration_ms(&ms.range);
                let series = self.take_loaded(&ms.vs);
                let at = at_ms(&ms.vs.at, self.range).unwrap_or(self.range.start);
                let end = at - offset_ms(&ms.vs.offset);
                let mut out = Vec::with_capacity(series.len());
                for s in series {
                    let samples: Vec<Sample> = s
                        .samples
                        .into_iter()
                        .filter(|p| p.t >= end - range && p.t <= end && !is_stale_nan(p.v))
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
            Expr::Call(call) => match functions::lookup(call.func.name) {
                Some(FunctionImpl::Rollup(rollup)) => {
                    let Some(Expr::MatrixSelector(ms)) = call.args.args.first().map(|a| a.as_ref())
                    else {
                        return Err(QueryError::Execution(format!(
                            "function {} expects a range vector selector",
                            call.func.name
                        )));
                    };
                    self.eval_rollup(rollup, ms)
                }
                Some(FunctionImpl::Instant(f)) => {
                    let args = call
                        .args
                        .args
                        .iter()
                        .map(|a| self.eval(a))
                        .collect::<Result<Vec<_>, _>>()?;
                    f(self, args)
                }
                None => Err(not_supported(&format!("function {}()", call.func.name))),
            },
            Expr::Aggregate(_) => Err(not_supported("aggregations")),
            Expr::Binary(_) => Err(not_supported("binary operators")),
            Expr::Subquery(_) => Err(not_supported("subqueries")),
            Expr::Extension(_) => Err(not_supported("extension expressions")),
        }
    }

    /// An instant selector at every step: the latest sample in `[t - lookback, t]` at the
    /// selector's read time, unless that sample is a staleness marker
    /// (prometheus/promql/engine.go `vectorSelectorSingle`). One pass per series.
    fn eval_vector_selector(&mut self, vs: &VectorSelector) -> Result<Value, QueryError> {
        let series = self.take_loaded(vs);
        let offset = offset_ms(&vs.offset);
        let at = at_ms(&vs.at, self.range);
        let range = self.range;
        let mut out = Vec::with_capacity(series.len());
        for s in series {
            self.check_deadline()?;
            let mut points = Vec::new();
            let mut next = 0; // index of the first sample after the read time
            for t in range.timestamps() {
                let read_at = at.unwrap_or(t) - offset;
                while next < s.samples.len() && s.samples[next].t <= read_at {
                    next += 1;
                }
                if next == 0 {
                    continue;
                }
                let latest = s.samples[next - 1];
                if latest.t >= read_at - self.lookback && !is_stale_nan(latest.v) {
                    points.push(Sample { t, v: latest.v });
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
        Ok(Value::Vector(out))
    }

    /// A range function over a range selector at every step: each step's window
    /// `[t - range, t]` (closed, as in Prometheus 2.x) slides over the series' samples with two
    /// cursors, so no sample is located twice.
    fn eval_rollup(
        &mut self,
        rollup: &functions::Rollup,
        ms: &MatrixSelector,
    ) -> Result<Value, QueryError> {
        let window = duration_ms(&ms.range);
        let series = self.take_loaded(&ms.vs);
        let offset = offset_ms(&ms.vs.offset);
        let at = at_ms(&ms.vs.at, self.range);
        let range = self.range;
        let mut out = Vec::with_capacity(series.len());
        for s in series {
            self.check_deadline()?;
            let samples: Vec<Sample> = s
                .samples
                .into_iter()
                .filter(|p| !is_stale_nan(p.v))
                .collect();
            let (mut lo, mut hi) = (0, 0);
            let mut points = Vec::new();
            for t in range.timestamps() {
                let end = at.unwrap_or(t) - offset;
                let start = end - window;
                while hi < samples.len() && samples[hi].t <= end {
                    hi += 1;
                }
                while lo < hi && samples[lo].t < start {
                    lo += 1;
                }
                if lo < hi {
                    if let Some(v) = (rollup.fold)(&samples[lo..hi], t) {
                        points.push(Sample { t, v });
                    }
                }
            }
            if !points.is_empty() {
                self.account(points.len())?;
                let labels = if rollup.keeps_metric_name {
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
        Ok(Value::Vector(out))
    }
}

fn not_supported(what: &str) -> QueryError {
    QueryError::Execution(format!("{what} are not supported yet"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Label, Labels, STALE_NAN_BITS};
    use crate::promql::value::Value;

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
        Evaluator::new(range, 300_000, 1_000, deadline, loaded).eval(&expr)
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
        let result = Evaluator::new(EvalRange::instant(0), 300_000, 10, past, loaded).eval(&expr);
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
        let result = Evaluator::new(range, 300_000, 10, deadline, loaded).eval(&expr);
        assert!(matches!(result, Err(QueryError::TooManySamples)));
    }
}
