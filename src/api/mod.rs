//! HTTP API: the Prometheus HTTP API, ingest endpoints, and the server's own `/health`,
//! `/ready` and `/metrics`. Handlers translate between HTTP and the `ingest` and `promql`
//! layers; they never touch a storage backend directly beyond the storage trait.

mod admin;
mod agent_metrics;
mod agents;
pub(crate) mod auth;
pub mod errors;
pub mod json;
mod live;
mod opamp;
pub mod openapi;
pub mod otlp;
pub mod params;
mod prometheus;
mod rules;
mod status;
mod write;

use crate::ingest::{IngestConfig, Ingester};
use crate::promql::Engine;
use crate::storage::DynStorage;
use crate::telemetry::{Metrics, RequestLabels};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

/// What every handler shares.
pub struct AppState {
    pub storage: DynStorage,
    pub engine: Engine,
    pub ingester: Ingester,
    pub ingest_config: IngestConfig,
    /// Request body bytes held at once, across every listener (`--ingest-max-inflight-bytes`).
    pub body_budget: Arc<tokio::sync::Semaphore>,
    pub otlp_config: crate::ingest::otlp::OtlpConfig,
    /// Label sets of OTLP series seen before.
    pub otlp_labels: Arc<crate::ingest::otlp::LabelCache>,
    pub metrics: Arc<Metrics>,
    /// Checks credentials; every request is the default tenant's when authentication is off.
    pub auth: Arc<crate::auth::Authenticator>,
    pub auth_config: crate::auth::AuthConfig,
    /// When agents count as online.
    pub fleet: crate::fleet::FleetConfig,
    /// The live feed's hub.
    pub live: Arc<crate::fleet::live::LiveHub>,
    /// Agents connected over OpAMP's WebSocket transport.
    pub opamp_sessions: Arc<crate::fleet::opamp::Sessions>,
    /// Whether a listener is beyond loopback (so authentication off is worth a warning).
    pub exposed: bool,
    /// How request bodies are read (after authentication).
    pub body_limits: crate::server::listener::BodyLimits,
    /// When the server started, for `/api/v1/status/runtimeinfo`.
    pub started: chrono::DateTime<chrono::Utc>,
    /// Recording and alerting rule groups.
    pub rules: Arc<crate::rules::Manager>,
}

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState) -> Router {
    let routes = Router::new()
        .route(
            "/api/v1/query",
            get(prometheus::query).post(prometheus::query),
        )
        .route(
            "/api/v1/query_range",
            get(prometheus::query_range).post(prometheus::query_range),
        )
        .route(
            "/api/v1/series",
            get(prometheus::series).post(prometheus::series),
        )
        .route(
            "/api/v1/labels",
            get(prometheus::labels).post(prometheus::labels),
        )
        .route("/api/v1/label/{name}/values", get(prometheus::label_values))
        .route("/api/v1/metadata", get(prometheus::metadata))
        .route(
            "/api/v1/format_query",
            get(prometheus::format_query).post(prometheus::format_query),
        )
        .route(
            "/api/v1/query_exemplars",
            get(prometheus::query_exemplars).post(prometheus::query_exemplars),
        )
        .route("/api/v1/status/buildinfo", get(status::buildinfo))
        .route("/api/v1/rules", get(rules::rules).post(rules::rules))
        .route("/api/v1/alerts", get(rules::alerts))
        .route(
            "/api/v1/rules/{namespace}",
            get(rules::get_namespace)
                .post(rules::set_group)
                .delete(rules::delete_namespace),
        )
        .route(
            "/api/v1/rules/{namespace}/{group}",
            get(rules::get_group).delete(rules::delete_group),
        )
        .route("/-/reload", post(rules::reload).put(rules::reload))
        .route("/api/v1/status/flags", get(status::flags))
        .route("/api/v1/status/runtimeinfo", get(status::runtimeinfo))
        .route("/api/v1/status/tsdb", get(status::tsdb))
        .route("/api/v1/write", post(write::remote_write))
        .route("/api/v1/otlp/v1/metrics", post(otlp::http_export))
        .route("/v1/opamp", post(opamp::http).get(opamp::websocket))
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route("/ws/metrics/{agent}", get(live::metrics))
        .route("/ws/agents", get(live::agents))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/admin/tokens", get(admin::list).post(admin::create))
        .route(
            "/api/v1/admin/tokens/{id}",
            axum::routing::delete(admin::revoke),
        )
        .route("/api/v1/agents", get(agents::list).post(agents::create))
        .route("/api/v1/agents/stats", get(agents::stats))
        .route(
            "/api/v1/agents/{id}",
            get(agents::get_one)
                .put(agents::change)
                .patch(agents::change)
                .delete(agents::delete),
        )
        .route("/api/v1/metrics/latest/{agent}", get(agent_metrics::latest))
        .route(
            "/api/v1/metrics/history/{agent}",
            get(agent_metrics::history),
        )
        .route(
            "/api/v1/agents/{id}/config",
            get(agents::get_config)
                .put(agents::set_config)
                .delete(agents::set_config),
        );
    guarded(routes, state)
}

/// `routes` with what every request goes through, outermost first: counting by route and
/// status, authentication (before any body is read), then reading the body whole within the
/// limits (`server::listener`).
fn guarded(routes: Router<SharedState>, state: SharedState) -> Router {
    let body_limit = state.ingest_config.max_request_bytes;
    routes
        .layer(middleware::from_fn_with_state(
            state.body_limits.clone(),
            crate::server::listener::read_body_within,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        // Bodies are read whole within the limit before the handler runs; this keeps
        // extractors from refusing what was read.
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Counts every answered request by route pattern and status code.
async fn count_requests(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let handler = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .get_or_create(&RequestLabels {
            handler,
            code: response.status().as_u16(),
        })
        .inc();
    response
}

/// The OTLP/HTTP listener's routes: `POST /v1/metrics`, the OpenTelemetry default path.
pub fn otlp_http_router(state: SharedState) -> Router {
    guarded(
        Router::new().route("/v1/metrics", post(otlp::http_export)),
        state,
    )
}

/// A request header as text, or "" when absent or not ASCII.
pub(crate) fn header_str(headers: &axum::http::HeaderMap, name: header::HeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn health() -> &'static str {
    "OK"
}

async fn ready(State(state): State<SharedState>) -> Response {
    match state.storage.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: {}",
                errors::client_message(&e, "readiness check")
            ),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<SharedState>) -> Response {
    state.metrics.live_clients.set(state.live.clients() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
