//! The OpenAPI 3.1 document of SecuMon's own endpoints (the agents registry, agent metrics,
//! the live feed, OpAMP and token administration), served at `/api/v1/openapi.json`. The
//! paths are declared on the handlers themselves (`#[utoipa::path]`); the answers' shapes are
//! the schemas below. The Prometheus HTTP API is Prometheus's own and is not repeated here. A
//! test checks real answers against this document.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::fleet::remote::{ConfigFile, ConfigStatus, RemoteConfig};
use std::collections::BTreeMap;

/// An agent. Listings and `/ws/agents` leave out `health`, `effective_config`, `attributes`
/// and `remote_config`; `GET /api/v1/agents/{id}` has them.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Agent {
    /// The registry's id (a UUIDv7).
    id: String,
    tenant_id: String,
    /// The agent's own id, unique in its tenant: an OpAMP `instance_uid`, or one an operator
    /// chose.
    agent_id: String,
    name: String,
    hostname: String,
    ip_address: String,
    os: String,
    os_version: String,
    agent_type: String,
    agent_version: String,
    #[schema(pattern = "^(active|inactive)$")]
    status: String,
    auto_registered: bool,
    tags: BTreeMap<String, String>,
    heartbeat_secs: i64,
    online: bool,
    /// OpAMP `AgentCapabilities` bits.
    capabilities: i64,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    #[schema(format = DateTime)]
    last_seen_at: Option<String>,
    #[schema(value_type = Option<Object>)]
    health: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    effective_config: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    attributes: Option<serde_json::Value>,
    remote_config: Option<RemoteConfigSummary>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RemoteConfigSummary {
    config_hash: String,
    files: i64,
    /// What the agent reported of this configuration; null until it reports its hash.
    status: Option<ConfigStatus>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AgentAnswer {
    #[schema(pattern = "^success$")]
    status: String,
    data: Agent,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AgentPage {
    agents: Vec<Agent>,
    /// Agents the filters match, whatever the page.
    total: i64,
    limit: i64,
    offset: i64,
    /// Pass as `cursor` (with the same `sort`) for the next page; null on the last.
    next_cursor: Option<String>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AgentPageAnswer {
    #[schema(pattern = "^success$")]
    status: String,
    data: AgentPage,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct OsCount {
    os: String,
    agents: i64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct VersionCount {
    agent_version: String,
    agents: i64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AgentStats {
    total: i64,
    active: i64,
    inactive: i64,
    online: i64,
    offline: i64,
    by_os: Vec<OsCount>,
    by_version: Vec<VersionCount>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AgentStatsAnswer {
    #[schema(pattern = "^success$")]
    status: String,
    data: AgentStats,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Deleted {
    id: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct DeletedAnswer {
    #[schema(pattern = "^success$")]
    status: String,
    data: Deleted,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AgentConfig {
    config_map: BTreeMap<String, ConfigFile>,
    /// Hex of the SHA-256 the OpAMP server offers it with.
    config_hash: String,
    /// What the agent last reported (for this configuration or an earlier one).
    reported: Option<ConfigStatus>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AgentConfigAnswer {
    #[schema(pattern = "^success$")]
    status: String,
    data: AgentConfig,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LatestMetric {
    name: String,
    labels: BTreeMap<String, String>,
    /// A number, or `"NaN"`, `"+Inf"`, `"-Inf"`.
    #[schema(value_type = Object)]
    value: serde_json::Value,
    /// Unix milliseconds.
    timestamp: i64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Latest {
    agent_id: String,
    metrics: Vec<LatestMetric>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LatestAnswer {
    #[schema(pattern = "^success$")]
    status: String,
    data: Latest,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct MatrixSeries {
    metric: BTreeMap<String, String>,
    /// `[<unix seconds>, "<value>"]` pairs, as Prometheus's range queries answer.
    #[schema(value_type = Vec<Vec<Object>>)]
    values: Vec<Vec<serde_json::Value>>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Matrix {
    #[serde(rename = "resultType")]
    #[schema(pattern = "^matrix$")]
    result_type: String,
    result: Vec<MatrixSeries>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct HistoryAnswer {
    #[schema(pattern = "^success$")]
    status: String,
    data: Matrix,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Token {
    id: String,
    tenant: String,
    name: String,
    scopes: Vec<String>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    #[schema(format = DateTime)]
    last_used_at: Option<String>,
    /// The token itself: in the answer to its creation only.
    token: Option<String>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TokenListAnswer {
    #[schema(pattern = "^success$")]
    status: String,
    data: Vec<Token>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TokenAnswer {
    #[schema(pattern = "^success$")]
    status: String,
    data: Token,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FieldError {
    field: String,
    message: String,
}

/// Every error: Prometheus's error shape, with the invalid fields listed for the registry.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorAnswer {
    #[schema(pattern = "^error$")]
    status: String,
    #[serde(rename = "errorType")]
    error_type: String,
    error: String,
    errors: Option<Vec<FieldError>>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`secumon token create`, or POST /api/v1/admin/tokens); GET needs the read scope, changes admin, OpAMP ingest. WebSocket clients may send it as the subprotocol `bearer.<token>` beside `secumon.v1`.",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "SecuMon API",
        description = "SecuMon's own endpoints: the agents registry, agent metrics, the live feed, OpAMP and token administration. The Prometheus HTTP API (/api/v1/query and the rest), remote-write and OTLP are those projects' own and are not repeated here."
    ),
    paths(
        super::agents::list,
        super::agents::create,
        super::agents::stats,
        super::agents::get_one,
        super::agents::change,
        super::agents::delete,
        super::agents::get_config,
        super::agents::set_config,
        super::agent_metrics::latest,
        super::agent_metrics::history,
        super::live::metrics,
        super::live::agents,
        super::opamp::http,
        super::opamp::websocket,
        super::admin::list,
        super::admin::create,
        super::admin::revoke,
        openapi_json,
    ),
    components(schemas(RemoteConfig, ConfigFile, ConfigStatus)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "agents", description = "The tenant's agents registry"),
        (name = "metrics", description = "An agent's metrics"),
        (name = "live", description = "The live feed (WebSocket)"),
        (name = "opamp", description = "OpAMP, the agents' management protocol"),
        (name = "admin", description = "API tokens"),
    )
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "admin", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub(super) async fn openapi_json() -> axum::response::Response {
    use axum::response::IntoResponse;
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let document = DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serialises")
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document.clone(),
    )
        .into_response()
}
