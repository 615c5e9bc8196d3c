//! `/api/v1/rules` and `/api/v1/alerts` as Prometheus 2.42 answers them (`web/api/v1/api.go`:
//! `RuleDiscovery`, `AlertDiscovery`), field for field, for the caller's tenant; and
//! `POST /-/reload`, which reads the rule files again.

use super::auth::Tenant;
use super::errors::{ApiError, ErrorType};
use super::params::Params;
use super::SharedState;
use crate::rules::{Alert, AlertState, Group, LoadedRule};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

fn success(data: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": data}).to_string(),
    )
        .into_response()
}

/// A time as Go's `time.Time` marshals it: RFC 3339 with nanoseconds, trailing zeros trimmed;
/// the zero time when never.
fn go_time(t: Option<chrono::DateTime<chrono::Utc>>) -> Value {
    let Some(t) = t else {
        return json!("0001-01-01T00:00:00Z");
    };
    let mut text = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.timestamp_subsec_nanos();
    if nanos != 0 {
        text.push('.');
        text.push_str(format!("{nanos:09}").trim_end_matches('0'));
    }
    text.push('Z');
    json!(text)
}

fn go_time_ms(ms: i64) -> Value {
    go_time(chrono::DateTime::from_timestamp_millis(ms))
}

/// Seconds as Go's encoding/json writes a float64 (`10`, not `10.0`).
fn seconds(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// Go's `strconv.FormatFloat(v, 'e', -1, 64)`: `4.25e+01`, `1e+00`.
pub fn go_exponent(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let text = format!("{v:e}");
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exponent.abs())
}

fn string_map(m: &std::collections::BTreeMap<String, String>) -> Value {
    Value::Object(m.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

fn alert_json(alert: &Alert) -> Value {
    let mut out = Map::new();
    out.insert("labels".into(), string_map(&alert.labels));
    out.insert("annotations".into(), string_map(&alert.annotations));
    out.insert("state".into(), json!(alert.state.as_str()));
    out.insert("activeAt".into(), go_time_ms(alert.active_at));
    if let Some(since) = alert.keep_firing_since {
        out.insert("keepFiringSince".into(), go_time_ms(since));
    }
    out.insert("value".into(), json!(go_exponent(alert.value)));
    Value::Object(out)
}

/// The alerts the API shows: pending and firing (resolved ones are kept, not shown).
fn active(rule: &LoadedRule) -> Vec<Alert> {
    let status = rule.status.lock().unwrap_or_else(|e| e.into_inner());
    let mut alerts: Vec<Alert> = status
        .active
        .values()
        .filter(|a| a.resolved_at.is_none() && a.state != AlertState::Inactive)
        .cloned()
        .collect();
    alerts.sort_by(|a, b| a.labels.cmp(&b.labels));
    alerts
}

fn rule_json(rule: &LoadedRule) -> Value {
    let (health, last_error, evaluation, last) = {
        let s = rule.status.lock().unwrap_or_else(|e| e.into_inner());
        (
            s.health.as_str(),
            s.last_error.clone(),
            s.evaluation_seconds,
            s.last_evaluation,
        )
    };
    let r = &rule.rule;
    let mut out = Map::new();
    if r.is_alerting() {
        out.insert("state".into(), json!(rule.state().as_str()));
        out.insert("name".into(), json!(r.alert));
        out.insert("query".into(), json!(rule.query));
        out.insert("duration".into(), seconds(r.r#for as f64 / 1000.0));
        out.insert(
            "keepFiringFor".into(),
            seconds(r.keep_firing_for as f64 / 1000.0),
        );
        out.insert("labels".into(), string_map(&r.labels));
        out.insert("annotations".into(), string_map(&r.annotations));
        out.insert(
            "alerts".into(),
            Value::Array(active(rule).iter().map(alert_json).collect()),
        );
    } else {
        out.insert("name".into(), json!(r.record));
        out.insert("query".into(), json!(rule.query));
        if !r.labels.is_empty() {
            out.insert("labels".into(), string_map(&r.labels));
        }
    }
    out.insert("health".into(), json!(health));
    if let Some(e) = last_error {
        out.insert("lastError".into(), json!(e));
    }
    out.insert("evaluationTime".into(), seconds(evaluation));
    out.insert("lastEvaluation".into(), go_time(last));
    out.insert(
        "type".into(),
        json!(if r.is_alerting() {
            "alerting"
        } else {
            "recording"
        }),
    );
    Value::Object(out)
}

fn group_json(group: &Group, rules: Vec<Value>) -> Value {
    let status = group.status.lock().unwrap_or_else(|e| e.into_inner());
    json!({
        "name": group.name,
        "file": group.file,
        "rules": rules,
        "interval": seconds(group.interval_ms as f64 / 1000.0),
        "limit": group.limit,
        "evaluationTime": seconds(status.evaluation_seconds),
        "lastEvaluation": go_time(status.last_evaluation),
    })
}

/// `GET /api/v1/rules`: `type=alert|record`, and the filters of later Prometheus versions
/// (`rule_name[]`, `rule_group[]`, `file[]`), which 2.42 does not read.
pub(super) async fn rules(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = Params::parse(uri.query(), &headers, &body);
    let kind = params.get("type").to_ascii_lowercase();
    if !matches!(kind.as_str(), "" | "alert" | "record") {
        return Err(ApiError::invalid_param(
            "type",
            format!("not supported value {kind:?}"),
        ));
    }
    let names = params.get_all("rule_name[]");
    let group_names = params.get_all("rule_group[]");
    let files = params.get_all("file[]");
    let mut groups = Vec::new();
    for group in state.rules.groups() {
        if group.tenant != tenant
            || (!group_names.is_empty() && !group_names.contains(&group.name.as_str()))
            || (!files.is_empty() && !files.contains(&group.file.as_str()))
        {
            continue;
        }
        let rules: Vec<Value> = group
            .rules
            .iter()
            .filter(|r| match kind.as_str() {
                "alert" => r.rule.is_alerting(),
                "record" => !r.rule.is_alerting(),
                _ => true,
            })
            .filter(|r| names.is_empty() || names.contains(&r.rule.name()))
            .map(rule_json)
            .collect();
        groups.push(group_json(&group, rules));
    }
    Ok(success(json!({ "groups": groups })))
}

/// `GET /api/v1/alerts`: every pending and firing alert of the tenant.
pub(super) async fn alerts(State(state): State<SharedState>, Tenant(tenant): Tenant) -> Response {
    let mut alerts = Vec::new();
    for group in state.rules.groups() {
        if group.tenant != tenant {
            continue;
        }
        for rule in group.rules.iter().filter(|r| r.rule.is_alerting()) {
            alerts.extend(active(rule).iter().map(alert_json));
        }
    }
    success(json!({ "alerts": alerts }))
}

/// `POST /-/reload`: reads the rule files again; 500 with the reason when one is invalid
/// (the groups running before keep running), as Prometheus answers.
pub(super) async fn reload(State(state): State<SharedState>) -> Response {
    match state
        .rules
        .reload(&state, false, crate::rules::Files::Read)
        .await
    {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("failed to reload config: {e}\n"),
        )
            .into_response(),
    }
}

// The ruler API (Mimir's and Cortex's shape): each tenant's rule groups, by namespace, as
// Prometheus YAML, stored in the catalog and evaluated like the groups of rule files.

fn catalog_error(e: crate::catalog::CatalogError) -> ApiError {
    let id = super::errors::incident_id();
    tracing::error!(request_id = %id, error = %e, "rule group storage failed");
    ApiError {
        kind: match e {
            crate::catalog::CatalogError::Unavailable(_) => ErrorType::Unavailable,
            _ => ErrorType::Internal,
        },
        message: format!("catalog error (request id {id})"),
    }
}

fn not_found(message: &str) -> ApiError {
    ApiError {
        kind: ErrorType::NotFound,
        message: message.to_owned(),
    }
}

/// A namespace: 1 to 256 bytes, no `/` (it is a path segment) and no control character.
fn check_namespace(namespace: &str) -> Result<(), ApiError> {
    if namespace.is_empty()
        || namespace.len() > 256
        || namespace.chars().any(|c| c == '/' || c.is_control())
    {
        return Err(ApiError::bad_data(
            "invalid namespace: 1 to 256 bytes, without '/' or control characters",
        ));
    }
    Ok(())
}

fn yaml(text: String, status: StatusCode) -> Response {
    (status, [(header::CONTENT_TYPE, "application/yaml")], text).into_response()
}

/// `{namespace: [group, ...]}` in YAML.
fn namespace_yaml(
    namespace: &str,
    bodies: &[crate::rules::file::RuleGroup],
) -> Result<String, ApiError> {
    let mut map = std::collections::BTreeMap::new();
    map.insert(namespace.to_owned(), bodies.to_vec());
    yaml_serde::to_string(&map).map_err(|e| ApiError {
        kind: ErrorType::Internal,
        message: e.to_string(),
    })
}

async fn stored(
    state: &SharedState,
    tenant: &crate::model::TenantId,
    namespace: &str,
) -> Result<Vec<crate::rules::file::RuleGroup>, ApiError> {
    let records = state
        .auth
        .catalog()
        .rule_groups(Some(tenant))
        .await
        .map_err(catalog_error)?;
    Ok(records
        .iter()
        .filter(|r| r.namespace == namespace)
        .filter_map(|r| crate::rules::parse_group(&r.body).ok())
        .collect())
}

/// `GET /api/v1/rules/{namespace}`: the namespace's groups.
pub(super) async fn get_namespace(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(namespace): Path<String>,
) -> Result<Response, ApiError> {
    check_namespace(&namespace)?;
    let groups = stored(&state, &tenant, &namespace).await?;
    if groups.is_empty() {
        return Err(not_found("no rule groups found"));
    }
    Ok(yaml(namespace_yaml(&namespace, &groups)?, StatusCode::OK))
}

/// `GET /api/v1/rules/{namespace}/{group}`: one group.
pub(super) async fn get_group(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_namespace(&namespace)?;
    let group = stored(&state, &tenant, &namespace)
        .await?
        .into_iter()
        .find(|g| g.name == name)
        .ok_or_else(|| not_found("group does not exist"))?;
    let text = yaml_serde::to_string(&group).map_err(|e| ApiError {
        kind: ErrorType::Internal,
        message: e.to_string(),
    })?;
    Ok(yaml(text, StatusCode::OK))
}

fn accepted() -> Response {
    (
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": null, "errorType": "", "error": ""}).to_string(),
    )
        .into_response()
}

/// Evaluation follows a change at once; a reload that fails leaves the groups running.
async fn apply(state: &SharedState) {
    if let Err(e) = state
        .rules
        .reload(state, false, crate::rules::Files::Keep)
        .await
    {
        tracing::error!(error = %e, "rule groups not reloaded after a ruler API change");
    }
}

/// `POST /api/v1/rules/{namespace}`: stores the group in the body (YAML), replacing the one
/// of the same name; 202 once stored.
pub(super) async fn set_group(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(namespace): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_namespace(&namespace)?;
    let limits = state.rules.config();
    if body.len() as u64 > limits.max_file_bytes {
        return Err(ApiError::bad_data(format!(
            "rule group larger than --rules-max-file-bytes ({} bytes)",
            limits.max_file_bytes
        )));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_data("the rule group is not UTF-8"))?;
    let group = crate::rules::parse_group_within(text, limits.max_rules_per_group)
        .map_err(|e| ApiError::bad_data(e.to_string()))?;
    if group
        .interval
        .is_some_and(|i| i < limits.min_interval.as_millis() as i64)
    {
        return Err(ApiError::bad_data(format!(
            "interval below --rules-min-interval ({})",
            crate::rules::file::format_duration(limits.min_interval.as_millis() as i64)
        )));
    }
    if group.rules.len() > limits.max_rules_per_group {
        return Err(ApiError::bad_data(format!(
            "per-user rules per rule group limit (limit: {}) exceeded",
            limits.max_rules_per_group
        )));
    }
    let _one_at_a_time = state.rules.ruler_writes.lock().await;
    let catalog = state.auth.catalog();
    let existing = catalog
        .rule_groups(Some(&tenant))
        .await
        .map_err(catalog_error)?;
    let replaces = existing
        .iter()
        .any(|r| r.namespace == namespace && r.name == group.name);
    if !replaces && existing.len() >= limits.max_groups_per_tenant {
        return Err(ApiError::bad_data(format!(
            "per-user rule groups limit (limit: {}) exceeded",
            limits.max_groups_per_tenant
        )));
    }
    let body = yaml_serde::to_string(&group).map_err(|e| ApiError {
        kind: ErrorType::Internal,
        message: e.to_string(),
    })?;
    catalog
        .put_rule_group(&crate::catalog::rules::RuleGroupRecord {
            tenant,
            namespace,
            name: group.name.clone(),
            body,
            updated_at: chrono::Utc::now().timestamp_millis(),
        })
        .await
        .map_err(catalog_error)?;
    apply(&state).await;
    Ok(accepted())
}

/// `DELETE /api/v1/rules/{namespace}`: every group of the namespace.
pub(super) async fn delete_namespace(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(namespace): Path<String>,
) -> Result<Response, ApiError> {
    check_namespace(&namespace)?;
    let deleted = state
        .auth
        .catalog()
        .delete_rule_groups(&tenant, &namespace, None)
        .await
        .map_err(catalog_error)?;
    if deleted == 0 {
        return Err(not_found("no rule groups found"));
    }
    apply(&state).await;
    Ok(accepted())
}

/// `DELETE /api/v1/rules/{namespace}/{group}`: one group.
pub(super) async fn delete_group(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_namespace(&namespace)?;
    let deleted = state
        .auth
        .catalog()
        .delete_rule_groups(&tenant, &namespace, Some(&name))
        .await
        .map_err(catalog_error)?;
    if deleted == 0 {
        return Err(not_found("group does not exist"));
    }
    apply(&state).await;
    Ok(accepted())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_times_print_as_go_prints_them() {
        assert_eq!(go_exponent(42.5), "4.25e+01");
        assert_eq!(go_exponent(1.0), "1e+00");
        assert_eq!(go_exponent(1.187999963760376), "1.187999963760376e+00");
        assert_eq!(go_exponent(0.000125), "1.25e-04");
        assert_eq!(go_exponent(f64::NAN), "NaN");
        assert_eq!(go_exponent(f64::INFINITY), "+Inf");
        assert_eq!(go_time(None), json!("0001-01-01T00:00:00Z"));
        assert_eq!(
            go_time(chrono::DateTime::from_timestamp(1_796_512_841, 189_553_340)),
            json!("2026-12-05T23:20:41.18955334Z")
        );
        assert_eq!(seconds(10.0), json!(10));
        assert_eq!(seconds(0.5), json!(0.5));
    }
}
