//! Answering `*_over_time` calls from rollups (the 5-minute and 1-hour aggregates every
//! backend keeps, [`crate::storage::Storage::select_rollups`]) instead of raw samples.
//!
//! A range window is closed, `[t - range, t]` (prometheus/promql/engine.go v2.42,
//! `matrixIterSlice`: samples with `mint <= t`, then the sought sample if `t == maxt`). When the
//! range is a multiple of the bucket and every step's window starts on a bucket boundary, the
//! buckets `[t - range, t)` hold exactly the window's samples but the one at `t`, which is read
//! as a boundary sample ([`crate::storage::Storage::select_instants`]). Folding those gives
//! `min_over_time`, `max_over_time`, `count_over_time`, `last_over_time` and
//! `present_over_time` bit for bit (their folds only compare, count or pick, so the grouping
//! into buckets cannot change them), so those calls always read rollups when they qualify.
//! `sum_over_time` and `avg_over_time` add in another order and may differ in the last bits:
//! they read rollups only when the query allows a coarser source (`max_source_resolution`).
//!
//! This module must never change an answer in the exact mode: anything it cannot prove
//! aligned is left to raw evaluation.

use super::eval::{check_unique_labels, Evaluator};
use super::functions::kahan_inc;
use super::plan::{at_ms, duration_ms, offset_ms};
use super::{EvalRange, QueryError};
use crate::model::{is_stale_nan, Labels, Sample, SeriesSamples};
use crate::storage::{Resolution, RollupColumns, RollupRow, SeriesRollups};
use promql_parser::parser::{Call, Expr, VectorSelector};

/// The coarsest source a query may read where rollups give the answer only up to float
/// rounding (`sum_over_time`, `avg_over_time`): the `max_source_resolution` query parameter,
/// named as in Thanos. Exact functions read rollups whatever this says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
pub enum SourceResolution {
    /// Raw samples only.
    #[default]
    #[serde(rename = "raw", alias = "0s")]
    #[value(name = "raw", alias = "0s")]
    Raw,
    /// 5-minute rollups allowed.
    #[serde(rename = "5m")]
    #[value(name = "5m")]
    FiveMinutes,
    /// 5-minute or 1-hour rollups allowed.
    #[serde(rename = "1h")]
    #[value(name = "1h")]
    OneHour,
    /// Rollups no coarser than the query step (any, for an instant query).
    #[serde(rename = "auto")]
    #[value(name = "auto")]
    Auto,
}

impl std::str::FromStr for SourceResolution {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <SourceResolution as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| format!("unknown resolution {s:?}: use raw, 5m, 1h or auto"))
    }
}

/// The range functions rollups can answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RollupFn {
    Min,
    Max,
    Count,
    Last,
    Present,
    Sum,
    Avg,
}

impl RollupFn {
    fn of(name: &str) -> Option<RollupFn> {
        Some(match name {
            "min_over_time" => RollupFn::Min,
            "max_over_time" => RollupFn::Max,
            "count_over_time" => RollupFn::Count,
            "last_over_time" => RollupFn::Last,
            "present_over_time" => RollupFn::Present,
            "sum_over_time" => RollupFn::Sum,
            "avg_over_time" => RollupFn::Avg,
            _ => return None,
        })
    }

    /// The aggregates its fold reads, and the first sample (the boundary sample at a
    /// window's end is the next bucket's first).
    pub fn columns(self) -> RollupColumns {
        let mut c = RollupColumns {
            first: true,
            ..RollupColumns::default()
        };
        match self {
            RollupFn::Min => c.min = true,
            RollupFn::Max => c.max = true,
            RollupFn::Count => c.count = true,
            RollupFn::Last => c.last = true,
            // A row exists only for a bucket with a sample.
            RollupFn::Present => {}
            RollupFn::Sum => c.sum = true,
            RollupFn::Avg => (c.sum, c.count) = (true, true),
        }
        c
    }

    /// Whether the answer from rollups is bit-identical to raw evaluation.
    fn is_exact(self) -> bool {
        !matches!(self, RollupFn::Sum | RollupFn::Avg)
    }
}

/// How one call is answered from rollups, decided before anything is loaded.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RollupPlan {
    pub func: RollupFn,
    pub resolution: Resolution,
    /// The steps the call is evaluated at; the evaluator checks it evaluates these.
    pub steps: EvalRange,
    pub window: i64,
    pub offset: i64,
    pub at: Option<i64>,
    /// Rows of the buckets starting in `[first_bucket, last_bucket]` are read.
    pub first_bucket: i64,
    pub last_bucket: i64,
    /// Every step's window end (sorted, distinct): the boundary samples to read.
    pub instants: Vec<i64>,
}

/// The matrix selector a call of one argument applies to directly (through parentheses).
pub(super) fn call_selector(call: &Call) -> Option<&VectorSelector> {
    fn unwrap(expr: &Expr) -> Option<&VectorSelector> {
        match expr {
            Expr::Paren(p) => unwrap(&p.expr),
            Expr::MatrixSelector(ms) => Some(&ms.vs),
            _ => None,
        }
    }
    match call.args.args.as_slice() {
        [arg] => unwrap(arg),
        _ => None,
    }
}

fn matrix_range(call: &Call) -> Option<i64> {
    fn unwrap(expr: &Expr) -> Option<i64> {
        match expr {
            Expr::Paren(p) => unwrap(&p.expr),
            Expr::MatrixSelector(ms) => Some(duration_ms(&ms.range)),
            _ => None,
        }
    }
    unwrap(call.args.args.first()?)
}

/// Whether `call`, evaluated at `steps`, is answered from rollups, and how. `query` is the
/// query's own range (for `@ start()` / `@ end()`), `allowed` the query's
/// `max_source_resolution`. The finest bucket is the last resort: 1 h rows are read when they
/// qualify, else 5 min rows.
pub(super) fn plan(
    call: &Call,
    steps: EvalRange,
    query: EvalRange,
    allowed: SourceResolution,
) -> Option<(&VectorSelector, RollupPlan)> {
    let func = RollupFn::of(call.func.name)?;
    let vs = call_selector(call)?;
    let window = matrix_range(call)?;
    let offset = offset_ms(&vs.offset);
    let at = at_ms(&vs.at, query);
    let resolution = candidates(func, steps, allowed)
        .into_iter()
        .find(|r| qualifies(*r, window, offset, at, steps))?;
    let end_of = |t: i64| at.unwrap_or(t).checked_sub(offset);
    let mut instants = steps
        .timestamps()
        .map(end_of)
        .collect::<Option<Vec<i64>>>()?;
    instants.dedup();
    let first_bucket = instants.first()?.checked_sub(window)?;
    let last_bucket = instants.last()?.checked_sub(resolution.ms())?;
    Some((
        vs,
        RollupPlan {
            func,
            resolution,
            steps,
            window,
            offset,
            at,
            first_bucket,
            last_bucket,
            instants,
        },
    ))
}

/// Resolutions that may answer `func`, coarsest first.
fn candidates(func: RollupFn, steps: EvalRange, allowed: SourceResolution) -> Vec<Resolution> {
    let all = [Resolution::OneHour, Resolution::FiveMinutes];
    let limit = if func.is_exact() {
        i64::MAX
    } else {
        match allowed {
            SourceResolution::Raw => return Vec::new(),
            SourceResolution::FiveMinutes => Resolution::FiveMinutes.ms(),
            SourceResolution::OneHour => Resolution::OneHour.ms(),
            SourceResolution::Auto if steps.start == steps.end => i64::MAX,
            SourceResolution::Auto => steps.step,
        }
    };
    all.into_iter().filter(|r| r.ms() <= limit).collect()
}

/// Whether every step's window `[end - window, end]` starts on a bucket boundary and spans
/// whole buckets, so the buckets hold exactly the window's samples but the one at its end.
fn qualifies(
    resolution: Resolution,
    window: i64,
    offset: i64,
    at: Option<i64>,
    steps: EvalRange,
) -> bool {
    let bucket = resolution.ms();
    if window <= 0 || window % bucket != 0 || steps.step <= 0 {
        return false;
    }
    let first_start = at
        .unwrap_or(steps.start)
        .checked_sub(offset)
        .and_then(|end| end.checked_sub(window));
    let last_end = at.unwrap_or(steps.end).checked_sub(offset);
    let (Some(first_start), Some(_)) = (first_start, last_end) else {
        return false;
    };
    // With `@`, or one step, every step reads the same window; otherwise steps move the
    // window by the step, which must keep it on bucket boundaries.
    let same_window = at.is_some() || steps.start == steps.end;
    first_start.rem_euclid(bucket) == 0 && (same_window || steps.step % bucket == 0)
}

/// Rows and boundary samples loaded for a planned call.
pub(super) struct RollupLoad {
    pub plan: RollupPlan,
    pub rows: Vec<SeriesRollups>,
    pub boundary: Vec<SeriesSamples>,
}

/// A window's rows folded: min, max, count and last by [`RollupRow::merge`] (the order of the
/// raw folds), the sum with Kahan compensation over the rows (as `sum_over_time` over samples).
#[derive(Default)]
struct WindowFold {
    row: Option<RollupRow>,
    sum: f64,
    compensation: f64,
}

impl WindowFold {
    fn add(&mut self, row: &RollupRow) {
        match &mut self.row {
            Some(acc) => acc.merge(row),
            None => self.row = Some(*row),
        }
        (self.sum, self.compensation) = kahan_inc(row.sum, self.sum, self.compensation);
    }

    /// The function's value, or `None` for an empty window (no output, as raw).
    fn value(&self, func: RollupFn) -> Option<f64> {
        let row = self.row?;
        let sum = if self.sum.is_infinite() {
            self.sum
        } else {
            self.sum + self.compensation
        };
        Some(match func {
            RollupFn::Min => row.min,
            RollupFn::Max => row.max,
            RollupFn::Count => row.count,
            RollupFn::Last => row.last,
            RollupFn::Present => 1.0,
            RollupFn::Sum => sum,
            RollupFn::Avg => sum / row.count,
        })
    }
}

/// One series' points at every step: the rows of the buckets in `[end - window, end)` and
/// the boundary sample at `end` (unless it is a staleness marker), folded in time order.
fn series_points(plan: &RollupPlan, rows: &[RollupRow], boundary: &[Sample]) -> Vec<Sample> {
    let bucket = plan.resolution.ms();
    let (mut lo, mut hi, mut next) = (0, 0, 0);
    let mut points = Vec::new();
    for t in plan.steps.timestamps() {
        let end = plan.at.unwrap_or(t) - plan.offset;
        let start = end - plan.window;
        while hi < rows.len() && rows[hi].t <= end - bucket {
            hi += 1;
        }
        while lo < hi && rows[lo].t < start {
            lo += 1;
        }
        while next < boundary.len() && boundary[next].t < end {
            next += 1;
        }
        let mut fold = WindowFold::default();
        for row in &rows[lo..hi] {
            fold.add(row);
        }
        if let Some(p) = boundary.get(next) {
            if p.t == end && !is_stale_nan(p.v) {
                fold.add(&RollupRow::of(end, p.v));
            }
        }
        if let Some(v) = fold.value(plan.func) {
            points.push(Sample { t, v });
        }
    }
    points
}

/// The samples exactly at `instants`, from the rows' first samples (a sample on a bucket
/// boundary is its bucket's first), or `None` when some row does not know its first sample
/// (then the backend is asked with `select_instants`).
pub(super) fn boundary_from_rows(
    rows: &[SeriesRollups],
    instants: &[i64],
) -> Option<Vec<SeriesSamples>> {
    let mut out = Vec::new();
    for s in rows {
        let mut samples = Vec::new();
        for r in &s.rows {
            if r.first_t == RollupRow::UNKNOWN {
                return None;
            }
            if let Some(v) = r.sample_at(r.t) {
                if instants.binary_search(&r.t).is_ok() {
                    samples.push(Sample { t: r.t, v });
                }
            }
        }
        if !samples.is_empty() {
            out.push(SeriesSamples {
                labels: s.labels.clone(),
                samples,
            });
        }
    }
    Some(out)
}

/// Pairs each series' rows with its boundary samples (both lists sorted by labels).
fn by_series(
    rows: Vec<SeriesRollups>,
    boundary: Vec<SeriesSamples>,
) -> Vec<(Labels, Vec<RollupRow>, Vec<Sample>)> {
    let mut out = Vec::with_capacity(rows.len().max(boundary.len()));
    let mut rows = rows.into_iter().peekable();
    let mut boundary = boundary.into_iter().peekable();
    loop {
        let order = match (rows.peek(), boundary.peek()) {
            (None, None) => return out,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(r), Some(b)) => r.labels.cmp(&b.labels),
        };
        match order {
            std::cmp::Ordering::Less => {
                let r = rows.next().expect("peeked");
                out.push((r.labels, r.rows, Vec::new()));
            }
            std::cmp::Ordering::Greater => {
                let b = boundary.next().expect("peeked");
                out.push((b.labels, Vec::new(), b.samples));
            }
            std::cmp::Ordering::Equal => {
                let (r, b) = (
                    rows.next().expect("peeked"),
                    boundary.next().expect("peeked"),
                );
                out.push((r.labels, r.rows, b.samples));
            }
        }
    }
}

impl Evaluator {
    /// The answer of `call` over every step from the rollups loaded for it, or `None` when
    /// it was planned for raw samples.
    pub(super) fn eval_from_rollups(
        &mut self,
        call: &Call,
    ) -> Result<Option<Vec<SeriesSamples>>, QueryError> {
        let Some(load) = call_selector(call).and_then(|vs| self.take_rollups(vs)) else {
            return Ok(None);
        };
        if load.plan.steps != self.range {
            return Err(QueryError::Execution(
                "unexpected error: rollups were planned for other steps".into(),
            ));
        }
        // last_over_time acts like an offset and keeps the metric name (engine.go).
        let keep_metric_name = load.plan.func == RollupFn::Last;
        let mut out = Vec::new();
        for (labels, rows, boundary) in by_series(load.rows, load.boundary) {
            self.check_deadline()?;
            let points = series_points(&load.plan, &rows, &boundary);
            if points.is_empty() {
                continue;
            }
            self.account(points.len())?;
            out.push(SeriesSamples {
                labels: if keep_metric_name {
                    labels
                } else {
                    labels.without_metric_name()
                },
                samples: points,
            });
        }
        check_unique_labels(&out)?;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN5: i64 = 300_000;
    const HOUR: i64 = 3_600_000;
    /// A time on an hour boundary.
    const T0: i64 = 1_700_002_800_000;

    fn call(query: &str) -> Call {
        match promql_parser::parser::parse(query).unwrap() {
            Expr::Call(call) => call,
            other => panic!("not a call: {other:?}"),
        }
    }

    fn range(start: i64, end: i64, step: i64) -> EvalRange {
        EvalRange { start, end, step }
    }

    /// The resolution `query` is answered from, evaluated at `steps`.
    fn chosen(query: &str, steps: EvalRange, allowed: SourceResolution) -> Option<Resolution> {
        let call = call(query);
        plan(&call, steps, steps, allowed).map(|(_, p)| p.resolution)
    }

    fn exact(query: &str, steps: EvalRange) -> Option<Resolution> {
        chosen(query, steps, SourceResolution::Raw)
    }

    #[test]
    fn aligned_exact_functions_read_the_coarsest_qualifying_rollup() {
        let instant = EvalRange::instant(T0);
        for f in [
            "min_over_time",
            "max_over_time",
            "count_over_time",
            "last_over_time",
            "present_over_time",
        ] {
            assert_eq!(
                exact(&format!("{f}(m[1h])"), instant),
                Some(Resolution::OneHour),
                "{f}"
            );
            assert_eq!(
                exact(&format!("{f}(m[5m])"), instant),
                Some(Resolution::FiveMinutes)
            );
        }
        assert_eq!(
            exact("max_over_time(m[2h])", instant),
            Some(Resolution::OneHour)
        );
        // 1 h buckets do not tile a 65-minute window; 5 min ones do.
        assert_eq!(
            exact("max_over_time(m[65m])", instant),
            Some(Resolution::FiveMinutes)
        );
        // An instant on a 5-minute but not an hour boundary.
        assert_eq!(
            exact("max_over_time(m[1h])", EvalRange::instant(T0 + MIN5)),
            Some(Resolution::FiveMinutes)
        );
        assert_eq!(
            exact("max_over_time((m[1h]))", instant),
            Some(Resolution::OneHour),
            "parentheses do not matter"
        );
    }

    #[test]
    fn misaligned_windows_stay_raw() {
        let instant = EvalRange::instant(T0);
        assert_eq!(
            exact("max_over_time(m[4m])", instant),
            None,
            "range below a bucket"
        );
        assert_eq!(
            exact("max_over_time(m[7m])", instant),
            None,
            "range not a multiple"
        );
        assert_eq!(
            exact("max_over_time(m[5m])", EvalRange::instant(T0 + 1)),
            None
        );
        assert_eq!(exact("max_over_time(m[5m] offset 1m)", instant), None);
        assert_eq!(exact("max_over_time(m[5m] offset 10s)", instant), None);
        // Steps not a multiple of the bucket, or a start off the boundary.
        assert_eq!(
            exact("max_over_time(m[5m])", range(T0, T0 + HOUR, 60_000)),
            None
        );
        assert_eq!(
            exact("max_over_time(m[5m])", range(T0 + 60_000, T0 + HOUR, MIN5)),
            None
        );
        assert_eq!(
            exact("max_over_time(m[1h])", range(T0, T0 + 2 * HOUR, MIN5)),
            Some(Resolution::FiveMinutes),
            "5-minute steps move an hour window by 5-minute buckets"
        );
        assert_eq!(
            exact("max_over_time(m[1h])", range(T0, T0 + 2 * HOUR, HOUR)),
            Some(Resolution::OneHour)
        );
        // Functions rollups cannot answer, and arguments that are not a selector.
        assert_eq!(exact("rate(m[5m])", instant), None);
        assert_eq!(exact("quantile_over_time(0.5, m[5m])", instant), None);
        assert_eq!(exact("max_over_time(m[10m:5m])", instant), None);
        assert_eq!(exact("max_over_time(rate(m[5m])[10m:5m])", instant), None);
    }

    #[test]
    fn offset_and_at_move_the_window() {
        let instant = EvalRange::instant(T0);
        assert_eq!(
            exact("max_over_time(m[5m] offset 10m)", instant),
            Some(Resolution::FiveMinutes)
        );
        assert_eq!(
            exact("max_over_time(m[1h] offset -1h)", instant),
            Some(Resolution::OneHour)
        );
        assert_eq!(
            exact("max_over_time(m[1h] offset 5m)", instant),
            Some(Resolution::FiveMinutes)
        );
        // `@` pins every step to one window: the steps need no alignment then.
        let ragged = range(T0 + 7, T0 + HOUR, 61_000);
        let at = format!("max_over_time(m[1h] @ {})", T0 / 1000);
        assert_eq!(exact(&at, ragged), Some(Resolution::OneHour));
        let at_off = format!("max_over_time(m[1h] @ {})", (T0 + 1000) / 1000);
        assert_eq!(exact(&at_off, ragged), None);
        let at_offset = format!("max_over_time(m[1h] @ {} offset 5m)", T0 / 1000);
        assert_eq!(exact(&at_offset, ragged), Some(Resolution::FiveMinutes));
        // `@ start()` and `@ end()` are the query's times.
        let steps = range(T0, T0 + HOUR + 60_000, 60_000);
        assert_eq!(
            exact("max_over_time(m[1h] @ start())", steps),
            Some(Resolution::OneHour)
        );
        assert_eq!(exact("max_over_time(m[1h] @ end())", steps), None);
    }

    #[test]
    fn sum_and_avg_read_rollups_only_when_allowed() {
        let instant = EvalRange::instant(T0);
        let hourly = range(T0, T0 + 6 * HOUR, HOUR);
        let five = range(T0, T0 + HOUR, MIN5);
        for f in ["sum_over_time", "avg_over_time"] {
            let q = format!("{f}(m[1h])");
            assert_eq!(chosen(&q, instant, SourceResolution::Raw), None);
            assert_eq!(
                chosen(&q, instant, SourceResolution::FiveMinutes),
                Some(Resolution::FiveMinutes)
            );
            assert_eq!(
                chosen(&q, instant, SourceResolution::OneHour),
                Some(Resolution::OneHour)
            );
            assert_eq!(
                chosen(&q, five, SourceResolution::OneHour),
                Some(Resolution::FiveMinutes),
                "the finer rollup when the coarser one does not align"
            );
            // `auto`: no coarser than the step; an instant query has none.
            assert_eq!(
                chosen(&q, instant, SourceResolution::Auto),
                Some(Resolution::OneHour)
            );
            assert_eq!(
                chosen(&q, hourly, SourceResolution::Auto),
                Some(Resolution::OneHour)
            );
            assert_eq!(
                chosen(&q, five, SourceResolution::Auto),
                Some(Resolution::FiveMinutes)
            );
            assert_eq!(
                chosen(&q, range(T0, T0 + HOUR, 60_000), SourceResolution::Auto),
                None
            );
            assert_eq!(
                chosen(&format!("{f}(m[7m])"), instant, SourceResolution::OneHour),
                None,
                "alignment is still required"
            );
        }
    }

    #[test]
    fn plans_read_the_buckets_before_each_end_and_the_ends() {
        let call = call("max_over_time(m[10m] offset 5m)");
        let steps = range(T0, T0 + 2 * MIN5, MIN5);
        let (_, p) = plan(&call, steps, steps, SourceResolution::Raw).unwrap();
        assert_eq!(p.first_bucket, T0 - 3 * MIN5);
        assert_eq!(p.last_bucket, T0, "the bucket before the last end");
        assert_eq!(p.instants, [T0 - MIN5, T0, T0 + MIN5]);
    }

    #[test]
    fn source_resolutions_parse_like_the_parameter() {
        for (text, want) in [
            ("raw", SourceResolution::Raw),
            ("0s", SourceResolution::Raw),
            ("5m", SourceResolution::FiveMinutes),
            ("1h", SourceResolution::OneHour),
            ("auto", SourceResolution::Auto),
        ] {
            assert_eq!(text.parse::<SourceResolution>(), Ok(want));
        }
        assert!("10m".parse::<SourceResolution>().is_err());
        assert!("".parse::<SourceResolution>().is_err());
    }

    fn row(t: i64, values: &[f64]) -> RollupRow {
        let mut r = RollupRow::of(t, values[0]);
        for &v in &values[1..] {
            r.merge(&RollupRow::of(t, v));
        }
        r
    }

    #[test]
    fn boundary_samples_come_from_first_samples_on_bucket_starts() {
        let labels = Labels::from_trusted(vec![crate::model::Label::new("k", "v")]);
        let on_start = RollupRow::of_sample(T0, T0, 4.0);
        let inside = RollupRow::of_sample(T0 + MIN5, T0 + MIN5 + 1, 5.0);
        let not_an_end = RollupRow::of_sample(T0 + 2 * MIN5, T0 + 2 * MIN5, 6.0);
        let rows = vec![SeriesRollups {
            labels: labels.clone(),
            rows: vec![on_start, inside, not_an_end],
        }];
        let got = boundary_from_rows(&rows, &[T0, T0 + MIN5]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].samples, vec![Sample { t: T0, v: 4.0 }]);
        // Rows of an older embedded block do not know their first sample: ask the backend.
        let mut old = on_start;
        old.first_t = RollupRow::UNKNOWN;
        let rows = vec![SeriesRollups {
            labels,
            rows: vec![old],
        }];
        assert!(boundary_from_rows(&rows, &[T0]).is_none());
    }

    #[test]
    fn windows_fold_rows_then_the_boundary_sample() {
        let stale = f64::from_bits(crate::model::STALE_NAN_BITS);
        // Buckets at T0 - 10m and T0 - 5m, a boundary sample at T0, another at T0 + 5m that
        // is a staleness marker.
        let rows = [
            row(T0 - 2 * MIN5, &[f64::NAN, 4.0]),
            row(T0 - MIN5, &[2.0, 6.0]),
            row(T0, &[9.0]),
        ];
        let boundary = [
            Sample { t: T0, v: 1.0 },
            Sample {
                t: T0 + MIN5,
                v: stale,
            },
        ];
        for (query, want) in [
            ("min_over_time(m[10m])", [(T0, 1.0), (T0 + MIN5, 2.0)]),
            ("max_over_time(m[10m])", [(T0, 6.0), (T0 + MIN5, 9.0)]),
            ("count_over_time(m[10m])", [(T0, 5.0), (T0 + MIN5, 3.0)]),
            ("last_over_time(m[10m])", [(T0, 1.0), (T0 + MIN5, 9.0)]),
            ("sum_over_time(m[5m])", [(T0, 9.0), (T0 + MIN5, 9.0)]),
            ("avg_over_time(m[5m])", [(T0, 3.0), (T0 + MIN5, 9.0)]),
        ] {
            let call = call(query);
            let steps = range(T0, T0 + MIN5, MIN5);
            let (_, p) = plan(&call, steps, steps, SourceResolution::OneHour).unwrap();
            // The rows as a backend gives them that reads only the columns the call asks for.
            let rows: Vec<RollupRow> = rows.iter().map(|r| p.func.columns().project(r)).collect();
            let got: Vec<(i64, f64)> = series_points(&p, &rows, &boundary)
                .into_iter()
                .map(|s| (s.t, s.v))
                .collect();
            assert_eq!(got, want, "{query}");
        }
        // A window with neither rows nor a boundary sample has no point.
        let call = call("present_over_time(m[5m])");
        let steps = range(T0, T0 + 3 * MIN5, MIN5);
        let (_, p) = plan(&call, steps, steps, SourceResolution::Raw).unwrap();
        let got: Vec<i64> = series_points(&p, &rows, &boundary)
            .iter()
            .map(|s| s.t)
            .collect();
        assert_eq!(got, [T0, T0 + MIN5]);
    }

    /// Evaluates `query` at `steps` from raw samples and from rollups of `samples`.
    fn both_ways(
        query: &str,
        steps: EvalRange,
        samples: &[Sample],
    ) -> (Vec<SeriesSamples>, Vec<SeriesSamples>, Resolution) {
        use super::super::eval::EvalOptions;
        use super::super::plan::{node_key, Loaded};
        use super::super::value::Value;
        let expr = Box::new(promql_parser::parser::parse(query).unwrap());
        let Expr::Call(call) = expr.as_ref() else {
            panic!("not a call")
        };
        let (vs, plan) = plan(call, steps, steps, SourceResolution::OneHour)
            .unwrap_or_else(|| panic!("{query} does not qualify"));
        let labels = Labels::from_trusted(vec![
            crate::model::Label::new("__name__", "m"),
            crate::model::Label::new("k", "v"),
        ]);
        let options = EvalOptions {
            lookback: 300_000,
            max_samples: 1_000_000,
            default_subquery_step: 60_000,
            max_source_resolution: SourceResolution::OneHour,
            rollups: true,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let vector = |v: Value| match v {
            Value::Vector(s) => s,
            other => panic!("not a vector: {other:?}"),
        };
        let raw_data = SeriesSamples {
            labels: labels.clone(),
            samples: samples.to_vec(),
        };
        let raw = Evaluator::new(
            steps,
            options,
            deadline,
            Loaded::from([(node_key(vs), vec![raw_data])]),
        )
        .eval(&expr)
        .unwrap();
        let rows: Vec<RollupRow> = crate::storage::rollup(samples, plan.resolution)
            .into_iter()
            .filter(|r| r.t >= plan.first_bucket && r.t <= plan.last_bucket)
            .collect();
        let boundary: Vec<Sample> = samples
            .iter()
            .filter(|p| plan.instants.contains(&p.t))
            .copied()
            .collect();
        let resolution = plan.resolution;
        let load = RollupLoad {
            plan,
            rows: vec![SeriesRollups {
                labels: labels.clone(),
                rows,
            }],
            boundary: vec![SeriesSamples {
                labels,
                samples: boundary,
            }],
        };
        let from_rollups = Evaluator::new(steps, options, deadline, Loaded::new())
            .with_rollups([(node_key(vs), load)].into())
            .eval(&expr)
            .unwrap();
        (vector(raw), vector(from_rollups), resolution)
    }

    #[test]
    fn exact_functions_from_rollups_equal_raw_evaluation_bit_for_bit() {
        let stale = f64::from_bits(crate::model::STALE_NAN_BITS);
        let values = [
            1.5,
            -0.0,
            0.0,
            f64::NAN,
            f64::INFINITY,
            -2.0,
            stale,
            f64::NEG_INFINITY,
            3.25,
            0.0,
        ];
        // Every 50 s (on every 5-minute boundary) and every 7th value skipped, so windows
        // start and end both on samples and between them.
        let samples: Vec<Sample> = (0..600i64)
            .filter(|i| i % 7 != 3)
            .map(|i| Sample {
                t: T0 - 2 * HOUR + i * 50_000,
                v: values[(i as usize * 7 + i as usize / 13) % values.len()],
            })
            .collect();
        let bits = |s: &[SeriesSamples]| -> Vec<(String, Vec<(i64, u64)>)> {
            s.iter()
                .map(|s| {
                    let points = s.samples.iter().map(|p| (p.t, p.v.to_bits())).collect();
                    (format!("{:?}", s.labels), points)
                })
                .collect()
        };
        let mut checked = 0;
        for f in [
            "min_over_time",
            "max_over_time",
            "count_over_time",
            "last_over_time",
            "present_over_time",
        ] {
            for (arg, steps) in [
                ("m[5m]", range(T0 - HOUR, T0 + HOUR, MIN5)),
                ("m[10m] offset 5m", range(T0 - HOUR, T0 + HOUR, 2 * MIN5)),
                ("m[1h]", range(T0 - HOUR, T0 + 3 * HOUR, HOUR)),
                ("m[1h]", range(T0 - HOUR, T0 + HOUR, MIN5)),
                ("m[2h] offset -1h", range(T0 - 2 * HOUR, T0, HOUR)),
                ("m[5m]", EvalRange::instant(T0 + MIN5)),
            ] {
                let query = format!("{f}({arg})");
                let (raw, rolled, _) = both_ways(&query, steps, &samples);
                assert!(!raw.is_empty(), "{query}: no data");
                assert_eq!(bits(&raw), bits(&rolled), "{query} at {steps:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 30);
        // sum and avg agree up to rounding on finite data.
        let finite: Vec<Sample> = samples
            .iter()
            .map(|p| Sample {
                t: p.t,
                v: (p.t / 1000 % 97) as f64 * 0.1,
            })
            .collect();
        for f in ["sum_over_time", "avg_over_time"] {
            let query = format!("{f}(m[1h])");
            let (raw, rolled, resolution) =
                both_ways(&query, range(T0 - HOUR, T0 + HOUR, HOUR), &finite);
            assert_eq!(resolution, Resolution::OneHour);
            assert_eq!(raw.len(), rolled.len());
            for (a, b) in raw[0].samples.iter().zip(&rolled[0].samples) {
                assert_eq!(a.t, b.t);
                assert!(
                    (a.v - b.v).abs() <= 1e-12 * a.v.abs(),
                    "{query}: {a:?} {b:?}"
                );
            }
        }
    }
}
