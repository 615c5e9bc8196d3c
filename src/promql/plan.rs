//! Planning a query: which series each selector needs over which times (offsets, `@`,
//! lookback, ranges and subquery steps worked out in 128 bits), loading them through the
//! storage trait within the sample budget, and the rollup reads that answer some calls.
//! The evaluator then reads only what was planned: a selector it finds no load for is an
//! error, never an empty series.

use super::eval::EvalOptions;
use super::rollups::{self, RollupLoad, SourceResolution};
use super::selector_matchers;
use super::{EvalRange, QueryError};
use crate::model::{SeriesSamples, TenantId};
use crate::storage::{DynStorage, SelectHints};
use crate::telemetry::Metrics;
use promql_parser::parser::{
    AtModifier, Expr, MatrixSelector, Offset, SubqueryExpr, VectorSelector,
};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Series loaded per selector node, keyed by the node's address in the AST (the AST is boxed
/// and not moved between loading and evaluation).
pub(super) type Loaded = HashMap<usize, Vec<SeriesSamples>>;

/// Rollups loaded per call answered from them, keyed by its selector node's address.
pub(super) type LoadedRollups = HashMap<usize, RollupLoad>;

/// Everything a query's evaluation reads, loaded before it starts.
pub(super) struct Fetched {
    pub raw: Loaded,
    pub rollups: LoadedRollups,
}

pub(super) fn node_key(vs: &VectorSelector) -> usize {
    vs as *const VectorSelector as usize
}

pub(super) fn duration_ms(d: &Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn offset_ms(offset: &Option<Offset>) -> i64 {
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

/// The fixed time an `@` modifier names; `start()` and `end()` are the query's.
pub(super) fn at_ms(at: &Option<AtModifier>, query: EvalRange) -> Option<i64> {
    match at {
        None => None,
        Some(AtModifier::Start) => Some(query.start),
        Some(AtModifier::End) => Some(query.end),
        Some(AtModifier::At(t)) => Some(system_time_ms(t)),
    }
}

/// The steps a subquery evaluates its expression at, for an outer evaluation over `outer`:
/// multiples of the subquery step covering `[start - offset - range, end - offset]`
/// (prometheus/promql/engine.go, `case *parser.SubqueryExpr`). An `@` pins both ends.
pub(super) fn subquery_range(
    sq: &SubqueryExpr,
    outer: EvalRange,
    query: EvalRange,
    default_step: i64,
) -> EvalRange {
    let offset = offset_ms(&sq.offset);
    let range = duration_ms(&sq.range);
    let step = sq.step.as_ref().map_or(default_step, duration_ms).max(1);
    let (start, end) = match at_ms(&sq.at, query) {
        Some(at) => (at, at),
        None => (outer.start, outer.end),
    };
    // In 128 bits, then clamped: offsets, ranges and `@` times come from the query text.
    let clamp = |t: i128| t.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    let (offset, range, step128) = (i128::from(offset), i128::from(range), i128::from(step));
    let first = i128::from(start) - offset - range;
    let mut aligned = step128 * first.div_euclid(step128);
    if aligned < first {
        aligned += step128;
    }
    EvalRange {
        start: clamp(aligned),
        end: clamp(i128::from(end) - offset),
        step,
    }
}

/// A selector to load and the inclusive time range its evaluation reads.
struct Fetch<'a> {
    vs: &'a VectorSelector,
    hints: SelectHints,
}

struct Planner<'a> {
    query: EvalRange,
    lookback: i64,
    default_step: i64,
    max_source_resolution: SourceResolution,
    rollups: bool,
    fetches: Vec<Fetch<'a>>,
    /// Where storage reports what the answer lacks.
    warnings: crate::storage::Warnings,
    /// Calls answered from rollups, with their selector (whose raw samples are not loaded).
    rollup_fetches: Vec<(&'a VectorSelector, rollups::RollupPlan)>,
}

impl<'a> Planner<'a> {
    fn selector(
        &mut self,
        vs: &'a VectorSelector,
        range: EvalRange,
        window: i64,
        selector_range: i64,
        func: Option<&str>,
    ) {
        let offset = offset_ms(&vs.offset);
        let (start, end) = match at_ms(&vs.at, self.query) {
            Some(at) => (at, at),
            None => (range.start, range.end),
        };
        self.fetches.push(Fetch {
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
                warnings: self.warnings.clone(),
            },
        });
    }

    fn walk(&mut self, expr: &'a Expr, range: EvalRange, func: Option<&str>) {
        match expr {
            Expr::VectorSelector(vs) => self.selector(vs, range, self.lookback, 0, func),
            Expr::MatrixSelector(MatrixSelector { vs, range: r }) => {
                let r = duration_ms(r);
                self.selector(vs, range, r, r, func)
            }
            Expr::Subquery(sq) => {
                let inner = subquery_range(sq, range, self.query, self.default_step);
                self.walk(&sq.expr, inner, None)
            }
            Expr::Paren(p) => self.walk(&p.expr, range, func),
            Expr::Unary(u) => self.walk(&u.expr, range, func),
            Expr::Binary(b) => {
                self.walk(&b.lhs, range, None);
                self.walk(&b.rhs, range, None);
            }
            Expr::Aggregate(a) => {
                self.walk(&a.expr, range, None);
                if let Some(param) = &a.param {
                    self.walk(param, range, None);
                }
            }
            Expr::Call(call) => {
                let planned = if self.rollups {
                    rollups::plan(call, range, self.query, self.max_source_resolution)
                } else {
                    None
                };
                if let Some(fetch) = planned {
                    self.rollup_fetches.push(fetch);
                    return;
                }
                for arg in &call.args.args {
                    self.walk(arg, range, Some(call.func.name));
                }
            }
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }
}

/// Loads every selector's series, one storage call per selector (two for a call answered
/// from rollups: its rows and its boundary samples), within the sample limit; rollup rows
/// count as samples.
pub(super) async fn fetch(
    storage: &DynStorage,
    tenant: &TenantId,
    expr: &Expr,
    range: EvalRange,
    options: &EvalOptions,
    metrics: &Metrics,
    warnings: &crate::storage::Warnings,
) -> Result<Fetched, QueryError> {
    let mut planner = Planner {
        warnings: warnings.clone(),
        query: range,
        lookback: options.lookback,
        default_step: options.default_subquery_step,
        max_source_resolution: options.max_source_resolution,
        rollups: options.rollups,
        fetches: Vec::new(),
        rollup_fetches: Vec::new(),
    };
    planner.walk(expr, range, None);
    let mut loaded = Loaded::with_capacity(planner.fetches.len());
    let mut total = 0usize;
    for mut fetch in planner.fetches {
        fetch.hints.max_samples = options.max_samples.saturating_sub(total).max(1);
        let series = storage
            .select(tenant, &selector_matchers(fetch.vs), &fetch.hints)
            .await?;
        total += series.iter().map(|s| s.samples.len()).sum::<usize>();
        if total > options.max_samples {
            return Err(QueryError::TooManySamples);
        }
        // A node evaluated at several ranges (inside subqueries) keeps the widest load.
        match loaded.get_mut(&node_key(fetch.vs)) {
            Some(existing) => merge_series(existing, series),
            None => {
                loaded.insert(node_key(fetch.vs), series);
            }
        }
    }
    let mut rollups = LoadedRollups::with_capacity(planner.rollup_fetches.len());
    for (vs, plan) in planner.rollup_fetches {
        let matchers = selector_matchers(vs);
        // One bucket more than the windows need: its first sample is the one at the last
        // window's closed end when it sits there.
        let rows = storage
            .select_rollups(
                tenant,
                &matchers,
                plan.resolution,
                plan.first_bucket,
                plan.last_bucket.saturating_add(plan.resolution.ms()),
                crate::storage::RollupRead {
                    columns: plan.func.columns(),
                    max_rows: options.max_samples.saturating_sub(total).max(1),
                    warnings: warnings.clone(),
                },
            )
            .await?;
        metrics.rollup_select(plan.resolution);
        total += rows.iter().map(|s| s.rows.len()).sum::<usize>();
        if total > options.max_samples {
            return Err(QueryError::TooManySamples);
        }
        let boundary = match rollups::boundary_from_rows(&rows, &plan.instants) {
            Some(boundary) => boundary,
            None => {
                storage
                    .select_instants(tenant, &matchers, &plan.instants)
                    .await?
            }
        };
        total += boundary.iter().map(|s| s.samples.len()).sum::<usize>();
        if total > options.max_samples {
            return Err(QueryError::TooManySamples);
        }
        rollups.insert(
            node_key(vs),
            RollupLoad {
                plan,
                rows,
                boundary,
            },
        );
    }
    Ok(Fetched {
        raw: loaded,
        rollups,
    })
}

fn merge_series(existing: &mut Vec<SeriesSamples>, more: Vec<SeriesSamples>) {
    for s in more {
        match existing.binary_search_by(|e| e.labels.cmp(&s.labels)) {
            Ok(i) => {
                let target = &mut existing[i].samples;
                target.extend(s.samples);
                target.sort_by_key(|p| p.t);
                target.dedup_by_key(|p| p.t);
            }
            Err(i) => existing.insert(i, s),
        }
    }
}
