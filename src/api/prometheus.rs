//! The Prometheus HTTP API (`/api/v1/...`): the same parameters, envelope, error types and
//! status codes as Prometheus 2.42's web/api/v1/api.go.

use super::auth::Tenant;
use super::errors::ApiError;
use super::json;
use super::params::{
    parse_duration, parse_time, parse_time_param, Params, MAX_TIME_MS, MIN_TIME_MS,
};
use super::SharedState;
use crate::model::{labels::is_valid_label_name, Matcher, MetricMetadata};
use crate::promql::{self, EvalRange};
use crate::storage::SeriesQuery;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use promql_parser::parser::Expr;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Prometheus refuses range queries with more points per series than this.
const MAX_POINTS_PER_SERIES: i64 = 11_000;

fn params(uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Params {
    Params::parse(uri.query(), headers, body)
}

/// `{"status":"success","data":<data>}` with `data` already encoded.
/// The start of a success's body: its `data` is written after it, in place (an answer of
/// tens of megabytes is not copied once more).
fn success_body() -> String {
    String::from(r#"{"status":"success","data":"#)
}

/// `body` ([`success_body`] and the data) as a success.
fn success(body: String) -> Response {
    success_warned(body, &[])
}

/// A success with Prometheus's `warnings` when there are any: what the answer lacks.
fn success_warned(mut body: String, warnings: &[String]) -> Response {
    if !warnings.is_empty() {
        body.push_str(r#","warnings":["#);
        for (i, warning) in warnings.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            json::write_str(&mut body, warning);
        }
        body.push(']');
    }
    body.push('}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The warnings a query gathered, counted in `/metrics`.
fn warnings_of(state: &SharedState, options: &promql::QueryOptions) -> Vec<String> {
    let warnings = options.warnings.take();
    if !warnings.is_empty() {
        state.metrics.query_warnings.inc();
    }
    warnings
}

fn success_json(data: serde_json::Value) -> Response {
    let mut body = success_body();
    body.push_str(&data.to_string());
    success(body)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The `timeout` parameter, if given (the configured timeout bounds it).
fn timeout_param(params: &Params) -> Result<Option<Duration>, ApiError> {
    match params.get("timeout") {
        "" => Ok(None),
        value => {
            let ms = parse_duration(value).map_err(|e| ApiError::invalid_param("timeout", e))?;
            Ok(Some(Duration::from_millis(ms.max(0) as u64)))
        }
    }
}

/// The per-request query settings: `timeout` and `max_source_resolution` (`raw`, `5m`, `1h`
/// or `auto`, named as in Thanos).
fn query_options(params: &Params) -> Result<promql::QueryOptions, ApiError> {
    let timeout = timeout_param(params)?;
    let max_source_resolution = match params.get("max_source_resolution") {
        "" => None,
        value => Some(
            value
                .parse::<promql::SourceResolution>()
                .map_err(|e| ApiError::invalid_param("max_source_resolution", e))?,
        ),
    };
    Ok(promql::QueryOptions {
        timeout,
        max_source_resolution,
        warnings: Default::default(),
    })
}

pub(super) async fn query(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = params(&uri, &headers, &body);
    let t = parse_time_param(&params, "time", now_ms())
        .map_err(|e| ApiError::invalid_param("time", e))?;
    let options = query_options(&params)?;
    let expr = state
        .engine
        .parse(params.get("query"))
        .map_err(|e| ApiError::invalid_param("query", e))?;
    let started = Instant::now();
    let value = state
        .engine
        .instant_query(&tenant, expr, t, options.clone())
        .await;
    observe(&state, "instant", started);
    let mut data = success_body();
    json::write_query_data(&mut data, &value?);
    Ok(success_warned(data, &warnings_of(&state, &options)))
}

pub(super) async fn query_range(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = params(&uri, &headers, &body);
    let start = parse_time(params.get("start")).map_err(|e| ApiError::invalid_param("start", e))?;
    let end = parse_time(params.get("end")).map_err(|e| ApiError::invalid_param("end", e))?;
    if end < start {
        return Err(ApiError::invalid_param(
            "end",
            "end timestamp must not be before start time",
        ));
    }
    let step =
        parse_duration(params.get("step")).map_err(|e| ApiError::invalid_param("step", e))?;
    if step <= 0 {
        return Err(ApiError::invalid_param(
            "step",
            "zero or negative query resolution step widths are not accepted. Try a positive integer",
        ));
    }
    // In 128 bits: `end - start` overflows i64 for times at Prometheus's extremes.
    if (i128::from(end) - i128::from(start)) / i128::from(step) > i128::from(MAX_POINTS_PER_SERIES)
    {
        return Err(ApiError::bad_data(
            "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)",
        ));
    }
    let options = query_options(&params)?;
    let expr: Expr = state
        .engine
        .parse(params.get("query"))
        .map_err(|e| ApiError::bad_data(e.to_string()))?;
    let started = Instant::now();
    let value = state
        .engine
        .range_query(
            &tenant,
            expr,
            EvalRange { start, end, step },
            options.clone(),
        )
        .await;
    observe(&state, "range", started);
    let mut data = success_body();
    json::write_query_data(&mut data, &value?);
    Ok(success_warned(data, &warnings_of(&state, &options)))
}

fn observe(state: &SharedState, kind: &'static str, started: Instant) {
    state
        .metrics
        .query_duration
        .get_or_create(&crate::telemetry::QueryLabels { kind })
        .observe(started.elapsed().as_secs_f64());
}

/// Parses `match[]` selectors (prometheus `parseMatchersParam`).
fn matcher_sets(engine: &promql::Engine, values: &[&str]) -> Result<Vec<Vec<Matcher>>, String> {
    let mut sets = Vec::with_capacity(values.len());
    for value in values {
        let matchers = engine.parse_selector(value)?;
        if matchers.iter().all(Matcher::matches_empty) {
            return Err("match[] must contain at least one non-empty matcher".into());
        }
        sets.push(matchers);
    }
    Ok(sets)
}

fn limit_param(params: &Params) -> Result<usize, ApiError> {
    match params.get("limit") {
        "" => Ok(0),
        value => value
            .parse::<usize>()
            .map_err(|_| ApiError::bad_data("limit must be a number")),
    }
}

/// `start`, `end`, `match[]` and `limit` of the series, labels and label values endpoints.
/// Optional `start` and `end`, defaulting to all of time (Prometheus's minTime, maxTime).
fn time_range(params: &Params) -> Result<(i64, i64), ApiError> {
    let start = parse_time_param(params, "start", MIN_TIME_MS)
        .map_err(|e| ApiError::invalid_param("start", e))?;
    let end = parse_time_param(params, "end", MAX_TIME_MS)
        .map_err(|e| ApiError::invalid_param("end", e))?;
    Ok((start, end))
}

fn series_query(
    engine: &promql::Engine,
    params: &Params,
    wrap_matcher_errors: bool,
) -> Result<SeriesQuery, ApiError> {
    let (start, end) = time_range(params)?;
    let matcher_sets = matcher_sets(engine, &params.get_all("match[]")).map_err(|e| {
        if wrap_matcher_errors {
            ApiError::invalid_param("match[]", e)
        } else {
            ApiError::bad_data(e)
        }
    })?;
    Ok(SeriesQuery {
        matcher_sets,
        start,
        end,
        limit: limit_param(params)?,
    })
}

pub(super) async fn series(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = params(&uri, &headers, &body);
    if params.get_all("match[]").is_empty() {
        return Err(ApiError::bad_data("no match[] parameter provided"));
    }
    let query = series_query(&state.engine, &params, true)?;
    let timeout = timeout_param(&params)?;
    let series = state
        .engine
        .limited(timeout, state.storage.series(&tenant, &query))
        .await?;
    let mut data = success_body();
    data.push('[');
    for (i, labels) in series.iter().enumerate() {
        if i > 0 {
            data.push(',');
        }
        json::write_labels(&mut data, labels);
    }
    data.push(']');
    Ok(success(data))
}

pub(super) async fn labels(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = params(&uri, &headers, &body);
    let query = series_query(&state.engine, &params, false)?;
    let timeout = timeout_param(&params)?;
    let names = state
        .engine
        .limited(timeout, state.storage.label_names(&tenant, &query))
        .await?;
    let mut data = success_body();
    json::write_strs(&mut data, &names);
    Ok(success(data))
}

pub(super) async fn label_values(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !is_valid_label_name(&name) {
        return Err(ApiError::bad_data(format!("invalid label name: {name:?}")));
    }
    let params = params(&uri, &headers, &Bytes::new());
    let query = series_query(&state.engine, &params, false)?;
    let timeout = timeout_param(&params)?;
    let values = state
        .engine
        .limited(timeout, state.storage.label_values(&tenant, &name, &query))
        .await?;
    let mut data = success_body();
    json::write_strs(&mut data, &values);
    Ok(success(data))
}

pub(super) async fn metadata(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = params(&uri, &headers, &Bytes::new());
    let limit = match params.get("limit") {
        "" => -1,
        value => value
            .parse::<i64>()
            .map_err(|_| ApiError::bad_data("limit must be a number"))?,
    };
    if limit == 0 {
        return Ok(success_json(serde_json::json!({})));
    }
    let metric = Some(params.get("metric")).filter(|m| !m.is_empty());
    let timeout = timeout_param(&params)?;
    let rows = state
        .engine
        .limited(
            timeout,
            state
                .storage
                .metadata(&tenant, metric, limit.max(0) as usize),
        )
        .await?;
    let mut families: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for MetricMetadata {
        metric_family_name,
        metric_type,
        help,
        unit,
    } in rows
    {
        families
            .entry(metric_family_name)
            .or_default()
            .push(serde_json::json!({"type": metric_type.as_str(), "help": help, "unit": unit}));
    }
    Ok(success_json(serde_json::json!(families)))
}

/// `/api/v1/format_query`: the query pretty-printed.
pub(super) async fn format_query(
    State(state): State<SharedState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = params(&uri, &headers, &body);
    let expr = state
        .engine
        .parse(params.get("query"))
        .map_err(|e| ApiError::invalid_param("query", e))?;
    Ok(success_json(serde_json::Value::String(expr.prettify())))
}

/// `/api/v1/query_exemplars`: the exemplars of every series any selector of the query selects,
/// in `[start, end]`.
pub(super) async fn query_exemplars(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = params(&uri, &headers, &body);
    let (start, end) = time_range(&params)?;
    let expr = state
        .engine
        .parse(params.get("query"))
        .map_err(|e| ApiError::invalid_param("query", e))?;
    let mut matcher_sets = Vec::new();
    collect_selectors(&expr, &mut matcher_sets);
    let query = SeriesQuery {
        matcher_sets,
        start,
        end,
        limit: 0,
    };
    let timeout = timeout_param(&params)?;
    let series = if query.matcher_sets.is_empty() {
        Vec::new()
    } else {
        state
            .engine
            .limited(timeout, state.storage.exemplars(&tenant, &query))
            .await?
    };
    let mut data = success_body();
    data.push('[');
    for (i, s) in series.iter().enumerate() {
        if i > 0 {
            data.push(',');
        }
        data.push_str(r#"{"seriesLabels":"#);
        json::write_labels(&mut data, &s.labels);
        data.push_str(r#","exemplars":["#);
        for (j, e) in s.exemplars.iter().enumerate() {
            if j > 0 {
                data.push(',');
            }
            data.push_str(r#"{"labels":"#);
            json::write_labels(&mut data, &e.labels);
            data.push_str(r#","value":"#);
            json::write_sample_value(&mut data, e.value);
            data.push_str(r#","timestamp":"#);
            json::write_sample_timestamp(&mut data, e.t);
            data.push('}');
        }
        data.push_str("]}");
    }
    data.push(']');
    Ok(success(data))
}

/// The matchers of every selector in an expression (Prometheus's `parser.ExtractSelectors`).
fn collect_selectors(expr: &Expr, out: &mut Vec<Vec<Matcher>>) {
    match expr {
        Expr::VectorSelector(vs) => out.push(crate::promql::selector_matchers(vs)),
        Expr::MatrixSelector(ms) => out.push(crate::promql::selector_matchers(&ms.vs)),
        Expr::Aggregate(a) => {
            collect_selectors(&a.expr, out);
            if let Some(p) = &a.param {
                collect_selectors(p, out);
            }
        }
        Expr::Binary(b) => {
            collect_selectors(&b.lhs, out);
            collect_selectors(&b.rhs, out);
        }
        Expr::Paren(p) => collect_selectors(&p.expr, out),
        Expr::Unary(u) => collect_selectors(&u.expr, out),
        Expr::Subquery(s) => collect_selectors(&s.expr, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| collect_selectors(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}
