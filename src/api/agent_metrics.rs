//! An agent's metrics: `GET /api/v1/metrics/latest/{agent}` (the latest sample of each of its
//! series) and `GET /api/v1/metrics/history/{agent}?metric=…` (one metric over time). An
//! agent's series are those whose `instance` is its `agent_id` (OpenTelemetry's
//! `service.instance.id` becomes `instance` in translation). Both run through the PromQL engine
//! in the caller's tenant, under the query limits (`--query-timeout-secs`,
//! `--query-max-samples`, the evaluation slots), and the history uses rollups as range queries
//! do. `{agent}` is the registry `id` or the `agent_id`; an agent the tenant does not have is 404.

use super::auth::Tenant;
use super::errors::{ApiError, ErrorType};
use super::params::{parse_duration, parse_time, Params};
use super::SharedState;
use crate::catalog::AgentRecord;
use crate::model::TenantId;
use crate::promql::{EvalRange, QueryOptions, QueryValue};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Most points per series of a history, as Prometheus bounds range queries.
const MAX_POINTS: i64 = 11_000;
/// The history's range when `start` is not given.
const DEFAULT_RANGE_MS: i64 = 3_600_000;
/// Points of a history when `step` is not given.
const DEFAULT_POINTS: i64 = 240;

/// The tenant's agent by registry id, else by `agent_id`.
pub(super) async fn find_agent(
    state: &SharedState,
    tenant: &TenantId,
    key: &str,
) -> Result<AgentRecord, ApiError> {
    match super::agents::load_agent(state, tenant, key).await {
        Err(e) if e.kind == ErrorType::NotFound => state
            .auth
            .catalog()
            .agent_by_agent_id(tenant, key)
            .await
            .map_err(super::agents::catalog_error)?
            .ok_or(e),
        found => found,
    }
}

/// `{instance="<agent_id>"}` with the id quoted as a PromQL string (JSON's escapes are Go's).
fn selector(name: &str, agent: &AgentRecord) -> String {
    format!(
        "{name}{{instance={}}}",
        serde_json::to_string(&agent.agent_id).expect("a string serialises")
    )
}

/// `GET /api/v1/metrics/latest/{agent}`: `{"agent_id", "metrics": [{"name", "labels", "value",
/// "timestamp"}]}` (timestamps in Unix ms), for every series of the agent with a sample
/// within the lookback (`--query-lookback-delta-secs`), by name then labels.
#[utoipa::path(get, path = "/api/v1/metrics/latest/{agent}", tag = "metrics",
    params(("agent" = String, Path, description = "The registry id or the agent_id")),
    responses(
        (status = 200, description = "The latest sample of each of the agent's series", body = super::openapi::LatestAnswer),
        (status = 404, description = "The tenant has no such agent", body = super::openapi::ErrorAnswer)))]
pub(super) async fn latest(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let agent = find_agent(&state, &tenant, &key).await?;
    let window = state.engine.config().lookback_delta_secs.max(1);
    let query = format!("{}[{window}s]", selector("", &agent));
    let expr = state
        .engine
        .parse(&query)
        .map_err(|e| ApiError::bad_data(e.to_string()))?;
    let now = chrono::Utc::now().timestamp_millis();
    let value = state
        .engine
        .instant_query(&tenant, expr, now, QueryOptions::default())
        .await?;
    let QueryValue::Matrix(series) = value else {
        return Err(ApiError::bad_data(
            "the agent's series are not a range vector",
        ));
    };
    let mut metrics: Vec<(String, serde_json::Value)> = series
        .iter()
        .filter_map(|s| {
            let last = s.samples.last()?;
            let name = s.labels.get("__name__").unwrap_or_default().to_owned();
            let labels: serde_json::Map<String, serde_json::Value> = s
                .labels
                .iter()
                .filter(|l| l.name != "__name__")
                .map(|l| (l.name.clone(), json!(l.value)))
                .collect();
            let key = format!("{name}{}", serde_json::Value::Object(labels.clone()));
            Some((
                key,
                json!({"name": name, "labels": labels, "value": crate::fleet::live::value_json(last.v), "timestamp": last.t}),
            ))
        })
        .collect();
    metrics.sort_by(|a, b| a.0.cmp(&b.0));
    let data = json!({
        "agent_id": agent.agent_id,
        "metrics": metrics.into_iter().map(|(_, m)| m).collect::<Vec<_>>(),
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": data}).to_string(),
    )
        .into_response())
}

/// `GET /api/v1/metrics/history/{agent}?metric=<name>&start=&end=&step=`: the metric's series
/// of the agent as a range query answers them (Prometheus's `matrix`). `end` defaults to now,
/// `start` to an hour before `end`, `step` to a 240th of the range (at least a second).
#[utoipa::path(get, path = "/api/v1/metrics/history/{agent}", tag = "metrics",
    params(("agent" = String, Path, description = "The registry id or the agent_id"),
        ("metric" = String, Query, description = "A metric name"),
        ("start" = Option<String>, Query, description = "A Prometheus time; an hour before end by default"),
        ("end" = Option<String>, Query, description = "A Prometheus time; now by default"),
        ("step" = Option<String>, Query, description = "A Prometheus duration; a 240th of the range by default")),
    responses(
        (status = 200, description = "The metric's series of the agent over the range", body = super::openapi::HistoryAnswer),
        (status = 400, description = "Invalid parameters", body = super::openapi::ErrorAnswer),
        (status = 404, description = "The tenant has no such agent", body = super::openapi::ErrorAnswer)))]
pub(super) async fn history(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(key): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = Params::parse(uri.query(), &headers, &[]);
    let metric = params.get("metric");
    let valid_name = !metric.is_empty()
        && metric.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
    if !valid_name {
        return Err(ApiError::invalid_param(
            "metric",
            "a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*) is required",
        ));
    }
    let now = chrono::Utc::now().timestamp_millis();
    let time = |name: &str, default: i64| match params.get(name) {
        "" => Ok(default),
        text => parse_time(text).map_err(|e| ApiError::invalid_param(name, e)),
    };
    let end = time("end", now)?;
    let start = time("start", end.saturating_sub(DEFAULT_RANGE_MS))?;
    if end < start {
        return Err(ApiError::invalid_param("end", "before start"));
    }
    let step = match params.get("step") {
        "" => ((i128::from(end) - i128::from(start)) / i128::from(DEFAULT_POINTS))
            .clamp(1000, i128::from(i64::MAX)) as i64,
        text => parse_duration(text).map_err(|e| ApiError::invalid_param("step", e))?,
    };
    if step <= 0 {
        return Err(ApiError::invalid_param("step", "must be positive"));
    }
    if (i128::from(end) - i128::from(start)) / i128::from(step) > i128::from(MAX_POINTS) {
        return Err(ApiError::bad_data(format!(
            "more than {MAX_POINTS} points per series: increase step"
        )));
    }
    let agent = find_agent(&state, &tenant, &key).await?;
    let expr = state
        .engine
        .parse(&selector(metric, &agent))
        .map_err(|e| ApiError::bad_data(e.to_string()))?;
    let value = state
        .engine
        .range_query(
            &tenant,
            expr,
            EvalRange { start, end, step },
            QueryOptions::default(),
        )
        .await?;
    let mut data = String::new();
    super::json::write_query_data(&mut data, &value);
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"status":"success","data":{data}}}"#),
    )
        .into_response())
}
