//! `/api/v1/agents`: the tenant's agents registry over REST (scope `read` to read, `admin` to
//! change). Each agent carries an ETag (its revision); a change with a stale `If-Match` is
//! refused with 412, so two operators never overwrite each other. Invalid fields are listed in
//! one error shape: `{"status":"error","errorType":"bad_data","error":…,"errors":[{"field",
//! "message"}]}`.

use super::auth::Tenant;
use super::errors::{ApiError, ErrorType};
use super::SharedState;
use crate::catalog::{
    AgentQuery, AgentRecord, AgentSort, AgentStatus, AgentUpdate, CatalogError, SortKey,
};
use crate::fleet::live::AgentEventKind;
#[allow(unused_imports)]
use crate::fleet::remote::ConfigFile;
use crate::fleet::remote::{hex, ConfigStatus, RemoteConfig};
use crate::fleet::FleetConfig;
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
const MAX_HEARTBEAT_SECS: i64 = 86_400;
/// Default and largest page of `GET /api/v1/agents`.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1_000;

fn time(ms: Option<i64>) -> serde_json::Value {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or(serde_json::Value::Null, |t| {
            json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        })
}

/// An agent as JSON; `full` adds what its own page shows beyond a listing's: health,
/// effective configuration, description attributes and the remote configuration's summary.
pub(super) fn describe(
    a: &AgentRecord,
    now: i64,
    fleet: &FleetConfig,
    full: bool,
) -> serde_json::Value {
    let online = fleet.online(a, now);
    let mut json = json!({
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
        "capabilities": a.capabilities,
        "heartbeat_secs": a.heartbeat_secs,
        "online": online,
        "created_at": time(Some(a.created_at)),
        "updated_at": time(Some(a.updated_at)),
        "last_seen_at": time(a.last_seen_at),
    });
    if full {
        let parsed = |text: &str| {
            serde_json::from_str::<serde_json::Value>(text).unwrap_or(serde_json::Value::Null)
        };
        json["health"] = parsed(&a.health);
        json["effective_config"] = parsed(&a.effective_config);
        json["attributes"] = parsed(&a.attributes);
        json["remote_config"] = remote_summary(a);
    }
    json
}

/// The remote configuration of an agent in brief: its hash and how the agent reported it.
fn remote_summary(a: &AgentRecord) -> serde_json::Value {
    let Some(config) = RemoteConfig::from_stored(&a.remote_config) else {
        return serde_json::Value::Null;
    };
    let hash = hex(&config.hash());
    let status = ConfigStatus::from_stored(&a.remote_config_status);
    json!({
        "config_hash": hash,
        "files": config.config_map.len(),
        // What the agent said of this configuration; null until it reports this hash.
        "status": status.filter(|s| s.config_hash == hash),
    })
}

fn etag(revision: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).expect("digits and quotes are a header")
}

/// One agent with its ETag.
fn agent_answer(status: StatusCode, agent: &AgentRecord, fleet: &FleetConfig) -> Response {
    let now = chrono::Utc::now().timestamp_millis();
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": describe(agent, now, fleet, true)}).to_string(),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::ETAG, etag(agent.revision));
    response
}

pub(super) fn catalog_error(e: CatalogError) -> ApiError {
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
#[derive(Clone, Default, serde::Deserialize, utoipa::ToSchema)]
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
    AgentRecord::new(tenant, "", now)
}

/// The query string of `GET /api/v1/agents`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListParams {
    /// 1 to 1,000; 100 by default.
    limit: Option<i64>,
    offset: Option<i64>,
    /// The `next_cursor` of the page before (not with `offset`).
    cursor: Option<String>,
    /// `active` or `inactive`.
    status: Option<String>,
    /// `true` or `false`.
    online: Option<String>,
    /// `key:value`.
    tag: Option<String>,
    /// Contained in the hostname, ASCII case ignored.
    hostname: Option<String>,
    /// `created_at` (default), `name`, `hostname`, `agent_id` or `last_seen_at`, `-` first
    /// for descending.
    sort: Option<String>,
}

/// Where the next page of a listing starts: the last agent's sort key and id, and the order
/// they belong to. Opaque to clients (URL-safe base64 of JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct Cursor {
    sort: String,
    key: SortKey,
    id: String,
}

impl Cursor {
    fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).expect("a cursor serialises"))
    }

    fn decode(text: &str) -> Option<Cursor> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// The listing a query string asks for, or what is wrong with it.
fn list_query(params: ListParams, fleet: &FleetConfig, now: i64) -> Result<AgentQuery, Invalid> {
    let mut errors = Vec::new();
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        errors.push(("limit", format!("from 1 to {MAX_LIMIT}")));
    }
    let offset = params.offset.unwrap_or(0);
    if offset < 0 {
        errors.push(("offset", "must not be negative".into()));
    }
    let sort_text = params.sort.as_deref().unwrap_or("created_at");
    let (descending, sort_name) = match sort_text.strip_prefix('-') {
        Some(name) => (true, name),
        None => (false, sort_text),
    };
    let sort = AgentSort::parse(sort_name).unwrap_or_else(|| {
        let keys: Vec<&str> = AgentSort::ALL.iter().map(|s| s.as_str()).collect();
        errors.push((
            "sort",
            format!("one of {}, with - first for descending", keys.join(", ")),
        ));
        AgentSort::CreatedAt
    });
    let mut after = None;
    if let Some(text) = &params.cursor {
        match Cursor::decode(text) {
            // The key's type is checked too: a forged cursor must not reach SQL as text
            // compared with a number.
            Some(cursor) if cursor.sort == sort_text && sort.fits(&cursor.key) => {
                after = Some((cursor.key, cursor.id))
            }
            Some(cursor) => errors.push((
                "cursor",
                format!(
                    "belongs to sort={}: repeat the sort the first page used",
                    cursor.sort
                ),
            )),
            None => errors.push(("cursor", "not a cursor this server gave".into())),
        }
        if params.offset.is_some() {
            errors.push(("offset", "cannot be combined with a cursor".into()));
        }
    }
    let status = params.status.as_deref().and_then(|text| {
        let status = AgentStatus::parse(text);
        if status.is_none() {
            errors.push(("status", "active or inactive".into()));
        }
        status
    });
    let online = params.online.as_deref().and_then(|text| match text {
        "true" => Some(true),
        "false" => Some(false),
        _ => {
            errors.push(("online", "true or false".into()));
            None
        }
    });
    let tag = params.tag.and_then(|text| match text.split_once(':') {
        Some((key, value))
            if !key.is_empty() && key.len() <= MAX_TAG_KEY && value.len() <= MAX_TAG_VALUE =>
        {
            Some((key.to_owned(), value.to_owned()))
        }
        _ => {
            errors.push((
                "tag",
                format!("key:value, a key of 1 to {MAX_TAG_KEY} bytes"),
            ));
            None
        }
    });
    let hostname = params.hostname.filter(|text| {
        let fits = text.chars().count() <= MAX_TEXT;
        if !fits {
            errors.push(("hostname", format!("at most {MAX_TEXT} characters")));
        }
        fits && !text.is_empty()
    });
    if !errors.is_empty() {
        return Err(Invalid(errors));
    }
    Ok(AgentQuery {
        status,
        online,
        now_ms: now,
        online_heartbeats: fleet.online_heartbeats,
        tag,
        hostname,
        sort,
        descending,
        after,
        // One more than the page, to know whether another follows.
        limit: limit + 1,
        offset,
    })
}

/// `GET /api/v1/agents`: a page of the tenant's agents (filters `status`, `online`,
/// `tag=key:value`, `hostname` (contains, ignoring case); `sort` (`created_at` by default, `-`
/// first for descending); `limit` with `offset` or the `next_cursor` of the page before).
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", params(ListParams),
    responses(
        (status = 200, description = "A page of the tenant's agents", body = super::openapi::AgentPageAnswer),
        (status = 400, description = "Invalid parameters, each named in `errors`", body = super::openapi::ErrorAnswer)))]
pub(super) async fn list(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Query(params): Query<ListParams>,
) -> Result<Response, Response> {
    let now = chrono::Utc::now().timestamp_millis();
    let sort_text = params.sort.clone().unwrap_or_else(|| "created_at".into());
    let query = list_query(params, &state.fleet, now).map_err(IntoResponse::into_response)?;
    let (mut agents, total) = state
        .auth
        .catalog()
        .list_agents(&tenant, &query)
        .await
        .map_err(|e| catalog_error(e).into_response())?;
    let limit = query.limit - 1;
    let next_cursor = (agents.len() as i64 > limit).then(|| {
        agents.truncate(limit as usize);
        let last = agents.last().expect("a full page has a last agent");
        Cursor {
            sort: sort_text,
            key: query.sort.key_of(last),
            id: last.id.clone(),
        }
        .encode()
    });
    let data = json!({
        "agents": agents.iter().map(|a| describe(a, now, &state.fleet, false)).collect::<Vec<_>>(),
        "total": total,
        "limit": limit,
        "offset": query.offset,
        "next_cursor": next_cursor,
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": data}).to_string(),
    )
        .into_response())
}

/// `POST /api/v1/agents`: pre-registers an agent (201; 409 when its `agent_id` is taken).
#[utoipa::path(post, path = "/api/v1/agents", tag = "agents", request_body = AgentFields,
    responses(
        (status = 201, description = "Registered, with its ETag", body = super::openapi::AgentAnswer),
        (status = 400, description = "Invalid fields, each named in `errors`", body = super::openapi::ErrorAnswer),
        (status = 409, description = "The agent_id is taken, or the tenant holds the most agents it may", body = super::openapi::ErrorAnswer)))]
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
    if let Err(full) = crate::fleet::room_for_agent(catalog.as_ref(), &tenant, &state.fleet)
        .await
        .map_err(|e| catalog_error(e).into_response())?
    {
        return Err(ApiError {
            kind: ErrorType::Conflict,
            message: full,
        }
        .into_response());
    }
    match catalog.insert_agent(&agent).await {
        Ok(()) => {
            state.live.agent_event(AgentEventKind::Registered, &agent);
            Ok(agent_answer(StatusCode::CREATED, &agent, &state.fleet))
        }
        Err(CatalogError::Conflict) => Err(ApiError {
            kind: ErrorType::Conflict,
            message: format!("agent_id {:?} is registered already", agent.agent_id),
        }
        .into_response()),
        Err(e) => Err(catalog_error(e).into_response()),
    }
}

/// The tenant's agent by registry id; 404 when it has none.
pub(super) async fn load_agent(
    state: &SharedState,
    tenant: &crate::model::TenantId,
    id: &str,
) -> Result<AgentRecord, ApiError> {
    state
        .auth
        .catalog()
        .agent(tenant, id)
        .await
        .map_err(catalog_error)?
        .ok_or_else(|| not_found(id))
}

/// `GET /api/v1/agents/{id}`, with its ETag.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "The registry id")),
    responses(
        (status = 200, description = "The agent, with its ETag", body = super::openapi::AgentAnswer),
        (status = 404, description = "The tenant has no such agent", body = super::openapi::ErrorAnswer)))]
pub(super) async fn get_one(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &tenant, &id).await?;
    Ok(agent_answer(StatusCode::OK, &agent, &state.fleet))
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
#[utoipa::path(method(put, patch), path = "/api/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "The registry id"),
        ("If-Match" = Option<String>, Header, description = "The ETag the change is made from")),
    request_body = AgentFields,
    responses(
        (status = 200, description = "Changed (PUT: every operator field, PATCH: those given)", body = super::openapi::AgentAnswer),
        (status = 400, description = "Invalid fields", body = super::openapi::ErrorAnswer),
        (status = 404, description = "No such agent", body = super::openapi::ErrorAnswer),
        (status = 409, description = "The agent_id is taken", body = super::openapi::ErrorAnswer),
        (status = 412, description = "The agent changed since the If-Match ETag", body = super::openapi::ErrorAnswer)))]
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
    let agent = change_agent(&state, &tenant, &id, wanted, |current| {
        let mut agent = if replace {
            let mut fresh = blank(&tenant, current.created_at);
            // What the agent reports and the registry keeps stay; the operator's fields
            // reset.
            fresh.id = current.id.clone();
            fresh.auto_registered = current.auto_registered;
            fresh.health = current.health.clone();
            fresh.effective_config = current.effective_config.clone();
            fresh.remote_config = current.remote_config.clone();
            fresh.remote_config_status = current.remote_config_status.clone();
            fresh.capabilities = current.capabilities;
            // What the agent described is reset too: with no description held, its next
            // message is asked for its full state (ReportFullState) and describes it again.
            // Its sequence (and so whether it is online) is the heartbeat's, which an
            // operator's change never writes.
            fresh.sequence_num = current.sequence_num;
            fresh.token_id = current.token_id.clone();
            fresh.attributes = "{}".into();
            fresh.last_seen_at = current.last_seen_at;
            fresh.revision = current.revision;
            fresh
        } else {
            current.clone()
        };
        fields.clone().apply(&mut agent)?;
        Ok(agent)
    })
    .await?;
    Ok(agent_answer(StatusCode::OK, &agent, &state.fleet))
}

/// Changes the tenant's agent `id` with `edit`; the stored agent. With an
/// `If-Match`, the agent must still be at that revision (else 412); without one the caller
/// asked for no precondition, so an agent's report that lands between the read and the write
/// is merged by starting over from the stored agent.
async fn change_agent(
    state: &SharedState,
    tenant: &crate::model::TenantId,
    id: &str,
    wanted: Option<i64>,
    edit: impl Fn(&AgentRecord) -> Result<AgentRecord, Invalid>,
) -> Result<AgentRecord, Response> {
    let mut attempts = 0;
    loop {
        match change_once(state, tenant, id, wanted, &edit).await {
            Err(Changed::Stale) if wanted.is_none() && attempts < 5 => attempts += 1,
            Err(Changed::Stale) => return Err(precondition_failed().into_response()),
            Err(Changed::Refused(response)) => return Err(response),
            Ok(agent) => {
                state.live.agent_event(AgentEventKind::Updated, &agent);
                return Ok(agent);
            }
        }
    }
}

/// Why [`change_once`] did not store a change.
enum Changed {
    /// The agent changed after it was read.
    Stale,
    Refused(Response),
}

/// Reads the tenant's agent `id`, checks the `If-Match` revision, makes the changed agent
/// with `edit` and stores it if nothing changed it meanwhile.
async fn change_once(
    state: &SharedState,
    tenant: &crate::model::TenantId,
    id: &str,
    wanted: Option<i64>,
    edit: &impl Fn(&AgentRecord) -> Result<AgentRecord, Invalid>,
) -> Result<AgentRecord, Changed> {
    let current = load_agent(state, tenant, id)
        .await
        .map_err(|e| Changed::Refused(e.into_response()))?;
    let catalog = state.auth.catalog();
    if wanted.is_some_and(|r| r != current.revision) {
        return Err(Changed::Refused(precondition_failed().into_response()));
    }
    let mut agent = edit(&current).map_err(|e| Changed::Refused(e.into_response()))?;
    agent.updated_at = chrono::Utc::now().timestamp_millis();
    match catalog.update_agent(&agent, false).await {
        Ok(AgentUpdate::Updated(revision)) => {
            agent.revision = revision;
            Ok(agent)
        }
        Ok(AgentUpdate::Stale) => Err(Changed::Stale),
        Ok(AgentUpdate::Missing) => Err(Changed::Refused(not_found(id).into_response())),
        Err(CatalogError::Conflict) => Err(Changed::Refused(
            ApiError {
                kind: ErrorType::Conflict,
                message: format!("agent_id {:?} is registered already", agent.agent_id),
            }
            .into_response(),
        )),
        Err(e) => Err(Changed::Refused(catalog_error(e).into_response())),
    }
}

/// `GET /api/v1/agents/{id}/config`: the remote configuration set for the agent (404 when
/// none), its hash, and what the agent reported of it.
#[utoipa::path(get, path = "/api/v1/agents/{id}/config", tag = "agents",
    params(("id" = String, Path, description = "The registry id")),
    responses(
        (status = 200, description = "The remote configuration set for the agent", body = super::openapi::AgentConfigAnswer),
        (status = 404, description = "No such agent, or none set", body = super::openapi::ErrorAnswer)))]
pub(super) async fn get_config(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &tenant, &id).await?;
    let config = RemoteConfig::from_stored(&agent.remote_config).ok_or_else(|| ApiError {
        kind: ErrorType::NotFound,
        message: format!("agent {id:?} has no remote configuration"),
    })?;
    let mut data = serde_json::to_value(&config).expect("a configuration serialises");
    data["config_hash"] = json!(hex(&config.hash()));
    data["reported"] = json!(ConfigStatus::from_stored(&agent.remote_config_status));
    let mut response = (
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": data}).to_string(),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::ETAG, etag(agent.revision));
    Ok(response)
}

/// `PUT /api/v1/agents/{id}/config` (`{"config_map": {name: {"body", "content_type"}}}`)
/// sets the configuration the OpAMP server offers the agent; `DELETE` stops offering one.
/// Both take `If-Match` as the agent's other changes do.
#[utoipa::path(method(put, delete), path = "/api/v1/agents/{id}/config", tag = "agents",
    params(("id" = String, Path, description = "The registry id"),
        ("If-Match" = Option<String>, Header, description = "The ETag the change is made from")),
    request_body(content = RemoteConfig, description = "PUT: the configuration to offer; DELETE: none"),
    responses(
        (status = 200, description = "Set (or removed)", body = super::openapi::AgentAnswer),
        (status = 400, description = "Invalid configuration", body = super::openapi::ErrorAnswer),
        (status = 404, description = "No such agent", body = super::openapi::ErrorAnswer),
        (status = 412, description = "The agent changed since the If-Match ETag", body = super::openapi::ErrorAnswer)))]
pub(super) async fn set_config(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Response> {
    let stored = if method == axum::http::Method::DELETE {
        String::new()
    } else {
        RemoteConfig::parse(&body, state.fleet.max_config_bytes)
            .map_err(|e| Invalid(vec![("config_map", e)]).into_response())?
            .to_stored()
    };
    let wanted = if_match(&headers).map_err(IntoResponse::into_response)?;
    let agent = change_agent(&state, &tenant, &id, wanted, |current| {
        let mut agent = current.clone();
        agent.remote_config = stored.clone();
        Ok(agent)
    })
    .await?;
    // An agent connected over OpAMP's WebSocket transport gets it now.
    state.opamp_sessions.poke(&tenant, &agent.agent_id);
    Ok(agent_answer(StatusCode::OK, &agent, &state.fleet))
}

/// `DELETE /api/v1/agents/{id}`.
#[utoipa::path(delete, path = "/api/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "The registry id")),
    responses(
        (status = 200, description = "Deleted", body = super::openapi::DeletedAnswer),
        (status = 404, description = "No such agent", body = super::openapi::ErrorAnswer)))]
pub(super) async fn delete(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &tenant, &id).await?;
    let deleted = state
        .auth
        .catalog()
        .delete_agent(&tenant, &id, None)
        .await
        .map_err(catalog_error)?;
    if !deleted {
        return Err(not_found(&id));
    }
    state.live.agent_event(AgentEventKind::Deleted, &agent);
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": {"id": id}}).to_string(),
    )
        .into_response())
}

/// `GET /api/v1/agents/stats`: counts of the tenant's agents: total, active, inactive, online,
/// offline, and per operating system and agent version.
#[utoipa::path(get, path = "/api/v1/agents/stats", tag = "agents",
    responses((status = 200, description = "Counts of the tenant's agents", body = super::openapi::AgentStatsAnswer)))]
pub(super) async fn stats(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
) -> Result<Response, ApiError> {
    let now = chrono::Utc::now().timestamp_millis();
    let s = state
        .auth
        .catalog()
        .agent_stats(&tenant, now, state.fleet.online_heartbeats)
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
