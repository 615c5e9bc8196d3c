//! Range-vector functions: each folds the samples of one window (prometheus/promql/functions.go).

use super::histogram::quantile;
use crate::model::Sample;
use crate::promql::eval::WindowCtx;

/// Kahan-Babuška compensated addition (functions.go `kahanSumInc`).
pub(in crate::promql) fn kahan_inc(inc: f64, sum: f64, c: f64) -> (f64, f64) {
    let t = sum + inc;
    let c = if sum.abs() >= inc.abs() {
        c + ((sum - t) + inc)
    } else {
        c + ((inc - t) + sum)
    };
    (t, c)
}

/// rate, increase and delta: the change over the window, corrected for counter resets,
/// extrapolated towards the window's ends (functions.go `extrapolatedRate`).
fn extrapolated_rate(
    w: &[Sample],
    ctx: &WindowCtx,
    is_counter: bool,
    is_rate: bool,
) -> Option<f64> {
    if w.len() < 2 {
        return None;
    }
    let (first, last) = (w[0], w[w.len() - 1]);
    let mut result = last.v - first.v;
    // A series that never decreases has no reset to add back (the loop would add nothing).
    if is_counter && !ctx.ascending {
        let mut prev = first.v;
        for s in &w[1..] {
            if s.v < prev {
                result += prev;
            }
            prev = s.v;
        }
    }
    let mut duration_to_start = (first.t - ctx.start) as f64 / 1000.0;
    let duration_to_end = (ctx.end - last.t) as f64 / 1000.0;
    let sampled_interval = (last.t - first.t) as f64 / 1000.0;
    let average_between = sampled_interval / (w.len() - 1) as f64;
    if is_counter && result > 0.0 && first.v >= 0.0 {
        // Counters cannot go below zero: do not extrapolate past the zero point.
        let duration_to_zero = sampled_interval * (first.v / result);
        if duration_to_zero < duration_to_start {
            duration_to_start = duration_to_zero;
        }
    }
    let threshold = average_between * 1.1;
    let mut extrapolate_to = sampled_interval;
    extrapolate_to += if duration_to_start < threshold {
        duration_to_start
    } else {
        average_between / 2.0
    };
    extrapolate_to += if duration_to_end < threshold {
        duration_to_end
    } else {
        average_between / 2.0
    };
    let mut factor = extrapolate_to / sampled_interval;
    if is_rate {
        factor /= ctx.window as f64 / 1000.0;
    }
    Some(result * factor)
}

pub(super) fn rate(w: &[Sample], ctx: &WindowCtx) -> Option<f64> {
    extrapolated_rate(w, ctx, true, true)
}

pub(super) fn increase(w: &[Sample], ctx: &WindowCtx) -> Option<f64> {
    extrapolated_rate(w, ctx, true, false)
}

pub(super) fn delta(w: &[Sample], ctx: &WindowCtx) -> Option<f64> {
    extrapolated_rate(w, ctx, false, false)
}

/// irate and idelta: from the last two samples (functions.go `instantValue`).
fn instant_value(w: &[Sample], is_rate: bool) -> Option<f64> {
    if w.len() < 2 {
        return None;
    }
    let (prev, last) = (w[w.len() - 2], w[w.len() - 1]);
    let mut result = if is_rate && last.v < prev.v {
        last.v
    } else {
        last.v - prev.v
    };
    let interval = last.t - prev.t;
    if interval == 0 {
        return None;
    }
    if is_rate {
        result /= interval as f64 / 1000.0;
    }
    Some(result)
}

pub(super) fn irate(w: &[Sample], _: &WindowCtx) -> Option<f64> {
    instant_value(w, true)
}

pub(super) fn idelta(w: &[Sample], _: &WindowCtx) -> Option<f64> {
    instant_value(w, false)
}

/// Least-squares fit with compensated sums, x in seconds from `intercept_time`
/// (functions.go `linearRegression`).
fn linear_regression(w: &[Sample], intercept_time: i64) -> (f64, f64) {
    let (mut n, mut sum_x, mut c_x, mut sum_y, mut c_y) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut sum_xy, mut c_xy, mut sum_x2, mut c_x2) = (0.0, 0.0, 0.0, 0.0);
    let init_y = w[0].v;
    let mut const_y = true;
    for (i, s) in w.iter().enumerate() {
        if const_y && i > 0 && s.v != init_y {
            const_y = false;
        }
        n += 1.0;
        let x = (s.t - intercept_time) as f64 / 1e3;
        (sum_x, c_x) = kahan_inc(x, sum_x, c_x);
        (sum_y, c_y) = kahan_inc(s.v, sum_y, c_y);
        (sum_xy, c_xy) = kahan_inc(x * s.v, sum_xy, c_xy);
        (sum_x2, c_x2) = kahan_inc(x * x, sum_x2, c_x2);
    }
    if const_y {
        if init_y.is_infinite() {
            return (f64::NAN, f64::NAN);
        }
        return (0.0, init_y);
    }
    let (sum_x, sum_y, sum_xy, sum_x2) = (sum_x + c_x, sum_y + c_y, sum_xy + c_xy, sum_x2 + c_x2);
    let cov_xy = sum_xy - sum_x * sum_y / n;
    let var_x = sum_x2 - sum_x * sum_x / n;
    let slope = cov_xy / var_x;
    let intercept = sum_y / n - slope * sum_x / n;
    (slope, intercept)
}

pub(super) fn deriv(w: &[Sample], _: &WindowCtx) -> Option<f64> {
    if w.len() < 2 {
        return None;
    }
    Some(linear_regression(w, w[0].t).0)
}

pub(super) fn predict_linear(w: &[Sample], ctx: &WindowCtx) -> Option<f64> {
    if w.len() < 2 {
        return None;
    }
    let (slope, intercept) = linear_regression(w, ctx.t);
    Some(slope * ctx.params[0] + intercept)
}

pub(super) fn resets(w: &[Sample], _: &WindowCtx) -> Option<f64> {
    Some(w.windows(2).filter(|p| p[1].v < p[0].v).count() as f64)
}

pub(super) fn changes(w: &[Sample], _: &WindowCtx) -> Option<f64> {
    Some(
        w.windows(2)
            .filter(|p| p[1].v != p[0].v && !(p[1].v.is_nan() && p[0].v.is_nan()))
            .count() as f64,
    )
}

/// Double exponential smoothing (functions.go `funcHoltWinters`). The parser guarantees the two
/// scalar arguments; invalid factors are an execution error in Prometheus, reported here as
/// no value (see docs/promql.md).
pub(super) fn holt_winters(w: &[Sample], ctx: &WindowCtx) -> Option<f64> {
    let (sf, tf) = (ctx.params[0], ctx.params[1]);
    if !(sf > 0.0 && sf < 1.0 && tf > 0.0 && tf < 1.0) || w.len() < 2 {
        return None;
    }
    let trend = |i: usize, s0: f64, s1: f64, b: f64| {
        if i == 0 {
            b
        } else {
            tf * (s1 - s0) + (1.0 - tf) * b
        }
    };
    let (mut s0, mut s1, mut b) = (0.0, w[0].v, w[1].v - w[0].v);
    for (i, s) in w.iter().enumerate().skip(1) {
        let x = sf * s.v;
        b = trend(i - 1, s0, s1, b);
        let y = (1.0 - sf) * (s1 + b);
        s0 = s1;
        s1 = x + y;
    }
    Some(s1)
}

pub(super) fn avg_over_time(w: &[Sample], _: &WindowCtx) -> Option<f64> {
    let (mut mean, mut count, mut c) = (0.0f64, 0.0, 0.0);
    for s in w {
        count += 1.0;
        if mean.is_infinite() {
            if s.v.is_infinite() && (mean > 0.0) == (s.v > 0.0) {
                continue;
            }
            if !s.v.is_infinite() && !s.v.is_nan() {
                continue;
            }
        }
        (mean, c) = kahan_inc(s.v / count - mean / count, mean, c);
    }
    Some(if mean.is_infinite() { mean } else { mean + c })
}

pub(super) fn sum_over_time(w: &[Sample], _: &WindowCtx) -> Option<f64> {
    let (mut sum, mut c) = (0.0f64, 0.0);
    for s in w {
        (sum, c) = kahan_inc(s.v, sum, c);
    }
    Some(if sum.is_infinite() { sum } else { sum + c })
}

pub(super) fn min_over_time(w: &[Sample], _: &WindowCtx) -> Option<f64> {
    let mut min = w[0].v;
    for s in w {
        if s.v < min || min.is_nan() {
            min = s.v;
        }
    }
    Some(min)
}

pub(super) fn max_over_time(w: &[Sample], _: &WindowCtx) -> Option<f64> {
    let mut max = w[0].v;
    for s in w {
        if s.v > max || max.is_nan() {
            max = s.v;
        }
    }
    Some(max)
}

pub(super) fn quantile_over_time(w: &[Sample], ctx: &WindowCtx) -> Option<f64> {
    Some(quantile(ctx.params[0], w.iter().map(|s| s.v).collect()))
}

/// Population variance with compensated sums (functions.go `funcStdvarOverTime`).
pub(super) fn variance(w: &[Sample]) -> f64 {
    let (mut count, mut mean, mut c_mean, mut aux, mut c_aux) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for s in w {
        count += 1.0;
        let delta = s.v - (mean + c_mean);
        (mean, c_mean) = kahan_inc(delta / count, mean, c_mean);
        (aux, c_aux) = kahan_inc(delta * (s.v - (mean + c_mean)), aux, c_aux);
    }
    (aux + c_aux) / count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(t: i64, window: i64, params: &[f64]) -> WindowCtx<'_> {
        WindowCtx {
            t,
            start: t - window,
            end: t,
            window,
            params,
            ascending: false,
        }
    }

    fn samples(points: &[(i64, f64)]) -> Vec<Sample> {
        points.iter().map(|&(t, v)| Sample { t, v }).collect()
    }

    #[test]
    fn rate_extrapolates_and_handles_resets() {
        // 0..=10 every 30 s over a 5 min window ending on the last sample.
        let w = samples(
            &(0..=10)
                .map(|i| (i * 30_000, i as f64 * 10.0))
                .collect::<Vec<_>>(),
        );
        let c = ctx(300_000, 300_000, &[]);
        assert_eq!(increase(&w, &c), Some(100.0));
        assert!((rate(&w, &c).unwrap() - 100.0 / 300.0).abs() < 1e-12);
        // A reset from 50 to 5 adds the pre-reset value.
        let w = samples(&[(0, 10.0), (30_000, 50.0), (60_000, 5.0), (90_000, 25.0)]);
        let c = ctx(90_000, 90_000, &[]);
        assert_eq!(increase(&w, &c), Some(65.0));
    }

    #[test]
    fn irate_uses_the_last_two_samples() {
        let w = samples(&[(0, 1.0), (10_000, 5.0), (20_000, 2.0)]);
        let c = ctx(20_000, 60_000, &[]);
        assert_eq!(irate(&w, &c), Some(0.2), "a reset counts the new value");
        assert_eq!(idelta(&w, &c), Some(-3.0));
        assert_eq!(irate(&w[..1], &c), None);
    }

    #[test]
    fn regression_and_prediction() {
        let w = samples(&[(0, 1.0), (10_000, 2.0), (20_000, 3.0)]);
        assert!((deriv(&w, &ctx(20_000, 60_000, &[])).unwrap() - 0.1).abs() < 1e-12);
        let p = predict_linear(&w, &ctx(20_000, 60_000, &[10.0])).unwrap();
        assert!((p - 4.0).abs() < 1e-9);
    }

    #[test]
    fn over_time_aggregates() {
        let w = samples(&[(0, 1.0), (1, f64::NAN), (2, 3.0)]);
        let c = ctx(2, 10, &[0.5]);
        assert_eq!(max_over_time(&w, &c), Some(3.0), "NaN loses to numbers");
        assert_eq!(min_over_time(&w, &c), Some(1.0));
        assert!(sum_over_time(&w, &c).unwrap().is_nan());
        let w = samples(&[(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]);
        assert_eq!(quantile_over_time(&w, &ctx(3, 10, &[0.5])), Some(2.5));
        assert_eq!(variance(&w), 1.25);
        assert_eq!(changes(&w, &c), Some(3.0));
        assert_eq!(
            resets(&samples(&[(0, 3.0), (1, 1.0), (2, 2.0), (3, 0.0)]), &c),
            Some(2.0)
        );
    }

    #[test]
    fn a_series_known_to_ascend_skips_the_reset_scan_with_the_same_bits() {
        let rising = samples(&[(0, 1.0), (15, 1.5), (30, 1.5), (45, 7.25), (60, 1e9)]);
        for w in [&rising[..], &rising[1..4], &rising[..2]] {
            let t = w[w.len() - 1].t + 5;
            let scanned = ctx(t, 70, &[]);
            let known = WindowCtx {
                ascending: true,
                ..ctx(t, 70, &[])
            };
            for f in [rate, increase] {
                assert_eq!(
                    f(w, &known).map(f64::to_bits),
                    f(w, &scanned).map(f64::to_bits)
                );
            }
        }
        // The flag is what tells a reset apart: with it set wrongly a reset would be missed.
        let reset = samples(&[(0, 5.0), (15, 1.0)]);
        let known = WindowCtx {
            ascending: true,
            ..ctx(20, 70, &[])
        };
        assert_ne!(rate(&reset, &known), rate(&reset, &ctx(20, 70, &[])));
    }
}
