//! `/api/v1/agents`: the tenant's agents registry over REST (scope `read` to read, `admin` to
//! change). Each agent carries an ETag (its revision); a change with a stale `If-Match` is
//! refused with 412, so two operators never overwrite each other. Invalid fields are listed in
//! one error shape: `{"status":"error","errorType":"bad_data","error":…,"errors":[{"field",
//! "message"}]}`.

use super::auth::Tenant;
use super::errors::{ApiError, ErrorType};
use super::SharedState;
use crate::catalog::{AgentRecord, AgentStatus, AgentUpdate, CatalogError};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::BTreeMap;

/// Longest `agent_id`, name and other descriptive text, in characters.
const MAX_TEXT: usize = 256;
/// Most tags an agent has, and their lengths.
const MAX_TAGS: usize = 64;
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 512;
/// The heartbeat an agent is assumed to have until it says otherwise, and the longest allowed.
const DEFAULT_HEARTBEAT_SECS: i64 = 30;
const MAX_HEARTBEAT_SECS: i64 = 86_400;
/// An agent is online while seen within this many heartbeats.
pub const ONLINE_HEARTBEATS: i64 = 3;
/// Most agents one tenant may register: bounds what a client can make the registry hold.
pub const MAX_AGENTS_PER_TENANT: i64 = 100_000;
/// Default and largest page of `GET /api/v1/agents`.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1_000;

fn time(ms: Option<i64>) -> serde_json::Value {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or(serde_json::Value::Null, |t| {
            json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        })
}

fn describe(a: &AgentRecord, now: i64) -> serde_json::Value {
    let online = a
        .last_seen_at
        .is_some_and(|seen| now - seen <= a.heartbeat_secs * ONLINE_HEARTBEATS * 1000);
    json!({
        "id": a.id,
        "tenant_id": a.tenant.as_str(),
        "agent_id": a.agent_id,
        "name": a.name,
        "hostname": a.hostname,
        "ip_address": a.ip_address,
        "os": a.os,
        "os_version": a.os_version,
        "agent_type": a.agent_type,
        "agent_version": a.agent_version,
        "status": a.status.as_str(),
        "auto_registered": a.auto_registered,
        "tags": a.tags,
        "health": serde_json::from_str::<serde_json::Value>(&a.health).unwrap_or(serde_json::Value::Null),
        "effective_config": a.effective_config,
        "heartbeat_secs": a.heartbeat_secs,
        "online": online,
        "created_at": time(Some(a.created_at)),
        "updated_at": time(Some(a.updated_at)),
        "last_seen_at": time(a.last_seen_at),
    })
}

fn etag(revision: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).expect("digits and quotes are a header")
}

/// One agent with its ETag.
fn agent_answer(status: StatusCode, agent: &AgentRecord) -> Response {
    let now = chrono::Utc::now().timestamp_millis();
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": describe(agent, now)}).to_string(),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::ETAG, etag(agent.revision));
    response
}

fn catalog_error(e: CatalogError) -> ApiError {
    let id = super::errors::incident_id();
    tracing::error!(request_id = %id, error = %e, "agents registry failed");
    ApiError {
        kind: if matches!(e, CatalogError::Unavailable(_)) {
            ErrorType::Unavailable
        } else {
            ErrorType::Internal
        },
        message: format!("registry error (request id {id})"),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        kind: ErrorType::NotFound,
        message: format!("no agent {id:?}"),
    }
}

/// Field-level validation errors: a 400 `bad_data` listing each.
struct Invalid(Vec<(&'static str, String)>);

impl IntoResponse for Invalid {
    fn into_response(self) -> Response {
        let errors: Vec<serde_json::Value> = self
            .0
            .iter()
            .map(|(field, message)| json!({"field": field, "message": message}))
            .collect();
        (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            json!({
                "status": "error",
                "errorType": "bad_data",
                "error": format!("invalid agent: {}", self.0.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join("; ")),
                "errors": errors,
            })
            .to_string(),
        )
            .into_response()
    }
}

/// The fields a client may set, each optional (PATCH sets those given; PUT and POST start
/// from the defaults).
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentFields {
    agent_id: Option<String>,
    name: Option<String>,
    hostname: Option<String>,
    ip_address: Option<String>,
    os: Option<String>,
    os_version: Option<String>,
    agent_type: Option<String>,
    agent_version: Option<String>,
    status: Option<String>,
    tags: Option<BTreeMap<String, String>>,
    heartbeat_secs: Option<i64>,
}

impl AgentFields {
    /// Writes the given fields into `agent`, collecting what is invalid.
    fn apply(self, agent: &mut AgentRecord) -> Result<(), Invalid> {
        let mut errors = Vec::new();
        let mut text = |field: &'static str, value: Option<String>, into: &mut String| {
            if let Some(value) = value {
                if value.chars().count() > MAX_TEXT {
                    errors.push((field, format!("longer than {MAX_TEXT} characters")));
                } else {
                    *into = value;
                }
            }
        };
        text("agent_id", self.agent_id, &mut agent.agent_id);
        text("name", self.name, &mut agent.name);
        text("hostname", self.hostname, &mut agent.hostname);
        text("ip_address", self.ip_address, &mut agent.ip_address);
        text("os", self.os, &mut agent.os);
        text("os_version", self.os_version, &mut agent.os_version);
        text("agent_type", self.agent_type, &mut agent.agent_type);
        text(
            "agent_version",
            self.agent_version,
            &mut agent.agent_version,
        );
        if agent.agent_id.trim().is_empty() {
            errors.push(("agent_id", "required".into()));
        }
        if !agent.ip_address.is_empty() && agent.ip_address.parse::<std::net::IpAddr>().is_err() {
            errors.push(("ip_address", "not an IP address".into()));
        }
        if let Some(status) = self.status {
            match AgentStatus::parse(&status) {
                Some(status) => agent.status = status,
                None => errors.push(("status", "must be active or inactive".into())),
            }
        }
        if let Some(tags) = self.tags {
            if tags.len() > MAX_TAGS {
                errors.push(("tags", format!("more than {MAX_TAGS} tags")));
            } else if let Some((k, _)) = tags.iter().find(|(k, v)| {
                k.is_empty() || k.chars().count() > MAX_TAG_KEY || v.chars().count() > MAX_TAG_VALUE
            }) {
                errors.push((
                    "tags",
                    format!("tag {k:?}: keys are 1 to {MAX_TAG_KEY} characters, values at most {MAX_TAG_VALUE}"),
                ));
            } else {
                agent.tags = tags;
            }
        }
        if let Some(secs) = self.heartbeat_secs {
            if (1..=MAX_HEARTBEAT_SECS).contains(&secs) {
                agent.heartbeat_secs = secs;
            } else {
                errors.push(("heartbeat_secs", format!("from 1 to {MAX_HEARTBEAT_SECS}")));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Invalid(errors))
        }
    }
}

fn parse_fields(body: &[u8]) -> Result<AgentFields, Invalid> {
    serde_json::from_slice(body).map_err(|e| Invalid(vec![("body", e.to_string())]))
}

/// A new agent of `tenant`, pre-registered by an operator, before its fields are applied.
fn blank(tenant: &crate::model::TenantId, now: i64) -> AgentRecord {
    AgentRecord {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: tenant.clone(),
        agent_id: String::new(),
        name: String::new(),
        hostname: String::new(),
        ip_address: String::new(),
        os: String::new(),
        os_version: String::new(),
        agent_type: String::new(),
        agent_version: String::new(),
        status: AgentStatus::Active,
        auto_registered: false,
        tags: BTreeMap::new(),
        health: String::new(),
        effective_config: String::new(),
        remote_config: String::new(),
        heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
        created_at: now,
        updated_at: now,
        last_seen_at: None,
        revision: 0,
    }
}

#[derive(serde::Deserialize)]
pub(super) struct Page {
    limit: Option<i64>,
    offset: Option<i64>,
}

/// `GET /api/v1/agents?limit=&offset=`: a page of the tenant's agents, oldest first.
pub(super) async fn list(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let limit = page.limit.unwrap_or(DEFAULT_LIMIT);
    let offset = page.offset.unwrap_or(0);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_param(
            "limit",
            format!("from 1 to {MAX_LIMIT}"),
        ));
    }
    if offset < 0 {
        return Err(ApiError::invalid_param("offset", "must not be negative"));
    }
    let agents = state
        .auth
        .catalog()
        .list_agents(&tenant, limit, offset)
        .await
        .map_err(catalog_error)?;
    let now = chrono::Utc::now().timestamp_millis();
    let data = json!({
        "agents": agents.iter().map(|a| describe(a, now)).collect::<Vec<_>>(),
        "limit": limit,
        "offset": offset,
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": data}).to_string(),
    )
        .into_response())
}

/// `POST /api/v1/agents`: pre-registers an agent (201; 409 when its `agent_id` is taken).
pub(super) async fn create(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    body: axum::body::Bytes,
) -> Result<Response, Response> {
    let fields = parse_fields(&body).map_err(IntoResponse::into_response)?;
    let mut agent = blank(&tenant, chrono::Utc::now().timestamp_millis());
    fields
        .apply(&mut agent)
        .map_err(IntoResponse::into_response)?;
    let catalog = state.auth.catalog();
    let held = catalog
        .agent_stats(&tenant, agent.created_at, ONLINE_HEARTBEATS)
        .await
        .map_err(|e| catalog_error(e).into_response())?
        .total;
    if held >= MAX_AGENTS_PER_TENANT {
        return Err(ApiError {
            kind: ErrorType::Conflict,
            message: format!(
                "tenant {tenant} has {held} agents, the most it may register ({MAX_AGENTS_PER_TENANT}); delete some first"
            ),
        }
        .into_response());
    }
    match catalog.insert_agent(&agent).await {
        Ok(()) => Ok(agent_answer(StatusCode::CREATED, &agent)),
        Err(CatalogError::Conflict) => Err(ApiError {
            kind: ErrorType::Conflict,
            message: format!("agent_id {:?} is registered already", agent.agent_id),
        }
        .into_response()),
        Err(e) => Err(catalog_error(e).into_response()),
    }
}

/// `GET /api/v1/agents/{id}`, with its ETag.
pub(super) async fn get_one(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let agent = state
        .auth
        .catalog()
        .agent(&tenant, &id)
        .await
        .map_err(catalog_error)?
        .ok_or_else(|| not_found(&id))?;
    Ok(agent_answer(StatusCode::OK, &agent))
}

/// The revision an `If-Match` names, if the request has one (`*` matches any).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map(Some)
        .map_err(|_| ApiError::bad_data(format!("If-Match {text:?} is not an ETag of an agent")))
}

fn precondition_failed() -> ApiError {
    ApiError {
        kind: ErrorType::PreconditionFailed,
        message: "the agent changed since the ETag given in If-Match; read it again".into(),
    }
}

/// `PUT /api/v1/agents/{id}` (the settable fields start from their defaults) and `PATCH`
/// (the given fields only), conditional on `If-Match` when given and always on the revision
/// read.
pub(super) async fn change(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Response> {
    let replace = method == axum::http::Method::PUT;
    let fields = parse_fields(&body).map_err(IntoResponse::into_response)?;
    let wanted = if_match(&headers).map_err(IntoResponse::into_response)?;
    let catalog = state.auth.catalog();
    let current = catalog
        .agent(&tenant, &id)
        .await
        .map_err(|e| catalog_error(e).into_response())?
        .ok_or_else(|| not_found(&id).into_response())?;
    if wanted.is_some_and(|r| r != current.revision) {
        return Err(precondition_failed().into_response());
    }
    let mut agent = if replace {
        let mut fresh = blank(&tenant, current.created_at);
        // What the agent reports and the registry keeps stay; the operator's fields reset.
        fresh.id = current.id.clone();
        fresh.auto_registered = current.auto_registered;
        fresh.health = current.health.clone();
        fresh.effective_config = current.effective_config.clone();
        fresh.remote_config = current.remote_config.clone();
        fresh.last_seen_at = current.last_seen_at;
        fresh.revision = current.revision;
        fresh
    } else {
        current.clone()
    };
    fields
        .apply(&mut agent)
        .map_err(IntoResponse::into_response)?;
    agent.updated_at = chrono::Utc::now().timestamp_millis();
    match catalog.update_agent(&agent).await {
        Ok(AgentUpdate::Updated(revision)) => {
            agent.revision = revision;
            Ok(agent_answer(StatusCode::OK, &agent))
        }
        Ok(AgentUpdate::Stale) => Err(precondition_failed().into_response()),
        Ok(AgentUpdate::Missing) => Err(not_found(&id).into_response()),
        Err(CatalogError::Conflict) => Err(ApiError {
            kind: ErrorType::Conflict,
            message: format!("agent_id {:?} is registered already", agent.agent_id),
        }
        .into_response()),
        Err(e) => Err(catalog_error(e).into_response()),
    }
}

/// `DELETE /api/v1/agents/{id}`.
pub(super) async fn delete(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let deleted = state
        .auth
        .catalog()
        .delete_agent(&tenant, &id)
        .await
        .map_err(catalog_error)?;
    if !deleted {
        return Err(not_found(&id));
    }
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": {"id": id}}).to_string(),
    )
        .into_response())
}

/// `GET /api/v1/agents/stats`: counts of the tenant's agents: total, active, inactive, online,
/// offline, and per operating system and agent version.
pub(super) async fn stats(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
) -> Result<Response, ApiError> {
    let now = chrono::Utc::now().timestamp_millis();
    let s = state
        .auth
        .catalog()
        .agent_stats(&tenant, now, ONLINE_HEARTBEATS)
        .await
        .map_err(catalog_error)?;
    let counts = |key: &str, rows: &[(String, i64)]| -> Vec<serde_json::Value> {
        rows.iter()
            .map(|(value, n)| json!({key: value, "agents": n}))
            .collect()
    };
    let data = json!({
        "total": s.total,
        "active": s.active,
        "inactive": s.total - s.active,
        "online": s.online,
        "offline": s.total - s.online,
        "by_os": counts("os", &s.by_os),
        "by_version": counts("agent_version", &s.by_version),
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": data}).to_string(),
    )
        .into_response())
}
