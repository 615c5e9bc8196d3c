//! `/api/v1/status/*`: what Prometheus reports about itself, where it means something for
//! SecuMon.

use super::auth::Tenant;
use super::errors::ApiError;
use super::params::{MAX_TIME_MS, MIN_TIME_MS};
use super::SharedState;
use crate::storage::SeriesQuery;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::HashMap;

/// Entries in each top list of `/api/v1/status/tsdb`, as Prometheus shows.
const TOP_ENTRIES: usize = 10;

fn success(data: serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": data}).to_string(),
    )
        .into_response()
}

pub(super) async fn buildinfo() -> Response {
    success(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "revision": option_env!("SECUMON_GIT_REVISION").unwrap_or("unknown"),
        "branch": "",
        "buildUser": "",
        "buildDate": "",
        "goVersion": "",
    }))
}

/// The settings that shape query answers, under Prometheus's flag names where one exists.
pub(super) async fn flags(State(state): State<SharedState>) -> Response {
    let query = state.engine.config();
    success(json!({
        "query.lookback-delta": format!("{}s", query.lookback_delta_secs),
        "query.max-concurrency": query.max_concurrency.to_string(),
        "query.max-samples": query.max_samples.to_string(),
        "query.timeout": format!("{}s", query.timeout_secs),
        "web.enable-remote-write-receiver": "true",
        "auth": match (state.auth.required(), state.exposed) {
            (true, _) => "on",
            (false, false) => "off",
            (false, true) => "off (WARNING: listening beyond loopback without authentication)",
        },
    }))
}

pub(super) async fn runtimeinfo(State(state): State<SharedState>) -> Response {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    success(json!({
        "startTime": state.started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "CWD": std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
        "reloadConfigSuccess": true,
        "lastConfigTime": state.started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "corruptionCount": 0,
        "goroutineCount": 0,
        "GOMAXPROCS": cores,
        "GOGC": "",
        "GODEBUG": "",
        "storageRetention": "",
    }))
}

fn top(counts: HashMap<String, u64>) -> serde_json::Value {
    let mut entries: Vec<(String, u64)> = counts.into_iter().collect();
    entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    entries.truncate(TOP_ENTRIES);
    json!(entries
        .into_iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect::<Vec<_>>())
}

/// Cardinality statistics over the tenant's series (Prometheus reports its head block).
pub(super) async fn tsdb(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
) -> Result<Response, ApiError> {
    let query = SeriesQuery {
        matcher_sets: Vec::new(),
        start: MIN_TIME_MS,
        end: MAX_TIME_MS,
        limit: 0,
    };
    let series = state
        .engine
        .limited(None, state.storage.series(&tenant, &query))
        .await?;
    let mut by_metric: HashMap<String, u64> = HashMap::new();
    let mut values_by_name: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    let mut bytes_by_name: HashMap<String, u64> = HashMap::new();
    let mut by_pair: HashMap<String, u64> = HashMap::new();
    for labels in &series {
        *by_metric
            .entry(labels.metric_name().unwrap_or_default().to_owned())
            .or_default() += 1;
        for label in labels.iter() {
            if values_by_name
                .entry(label.name.clone())
                .or_default()
                .insert(label.value.clone())
            {
                *bytes_by_name.entry(label.name.clone()).or_default() += label.value.len() as u64;
            }
            *by_pair
                .entry(format!("{}={}", label.name, label.value))
                .or_default() += 1;
        }
    }
    let label_pairs: u64 = values_by_name.values().map(|v| v.len() as u64).sum();
    let value_counts = values_by_name
        .into_iter()
        .map(|(name, values)| (name, values.len() as u64))
        .collect();
    Ok(success(json!({
        "headStats": {
            "numSeries": series.len(),
            "numLabelPairs": label_pairs,
            "chunkCount": 0,
            "minTime": 0,
            "maxTime": 0,
        },
        "seriesCountByMetricName": top(by_metric),
        "labelValueCountByLabelName": top(value_counts),
        "memoryInBytesByLabelName": top(bytes_by_name),
        "seriesCountByLabelValuePair": top(by_pair),
    })))
}
