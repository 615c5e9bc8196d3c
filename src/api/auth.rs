//! Authentication of HTTP requests, before their bodies are read: which scope each endpoint
//! needs, and a refusal in the endpoint's own error format (Prometheus's JSON envelope,
//! remote-write's plain text, OTLP's `google.rpc.Status` in the request's encoding), 401 with
//! `WWW-Authenticate` or 403. The caller is handed to handlers as a request extension, read
//! with the [`Tenant`] extractor.

use super::errors::{ApiError, ErrorType};
use super::SharedState;
use crate::auth::{AuthError, Caller, Scope};
use crate::ingest::otlp::Encoding;
use crate::model::TenantId;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// How an endpoint answers errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Prometheus,
    RemoteWrite,
    Otlp,
}

/// The scope a route needs (`None`: open to everyone) and its error format. SecuMon's own
/// resources (`/api/v1/agents…`) are read with `read` and changed with `admin`.
fn route_needs(
    method: &axum::http::Method,
    path: &str,
    protect_metrics: bool,
) -> (Option<Scope>, Format) {
    use axum::http::Method;
    match path {
        p if p.starts_with("/api/v1/agents") => {
            let scope = if method == Method::GET || method == Method::HEAD {
                Scope::Read
            } else {
                Scope::Admin
            };
            (Some(scope), Format::Prometheus)
        }
        // The API's description: no tenant's data.
        "/health" | "/ready" | "/api/v1/openapi.json" => (None, Format::RemoteWrite),
        "/metrics" => (protect_metrics.then_some(Scope::Read), Format::RemoteWrite),
        "/api/v1/write" | "/v1/opamp" => (Some(Scope::Ingest), Format::RemoteWrite),
        "/api/v1/otlp/v1/metrics" | "/v1/metrics" => (Some(Scope::Ingest), Format::Otlp),
        p if p.starts_with("/api/v1/admin/") => (Some(Scope::Admin), Format::Prometheus),
        p if p.starts_with("/api/v1/rules/") => {
            let scope = if method == Method::GET || method == Method::HEAD {
                Scope::Read
            } else {
                Scope::Admin
            };
            (Some(scope), Format::Prometheus)
        }
        // Reads the server's rule files: every tenant's.
        "/-/reload" => (Some(Scope::Operator), Format::Prometheus),
        _ => (Some(Scope::Read), Format::Prometheus),
    }
}

/// gRPC status codes OTLP uses for refused credentials.
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_RESOURCE_EXHAUSTED: i32 = 8;
const CODE_UNAVAILABLE: i32 = 14;
const CODE_UNAUTHENTICATED: i32 = 16;

/// The caller of a request with these headers from `peer`, if it may do what `scope` allows;
/// every refusal is counted in `secumon_auth_refused_total`. HTTP and gRPC both come here.
pub(crate) async fn caller_for(
    state: &SharedState,
    headers: &axum::http::HeaderMap,
    peer: Option<std::net::IpAddr>,
    scope: Scope,
) -> Result<Caller, AuthError> {
    let checked = match state.auth.authenticate(headers, peer).await {
        Ok(caller) => caller.require(scope).map(|()| caller),
        Err(e) => Err(e),
    };
    if let Err(e) = &checked {
        state
            .metrics
            .auth_refused
            .get_or_create(&crate::telemetry::ReasonLabels { reason: e.reason() })
            .inc();
    }
    checked
}

/// The live feed's browser clients cannot set `Authorization` on a WebSocket; they offer the
/// token as a subprotocol instead, `bearer.<token>` beside `secumon.v1` (the server answers
/// with `secumon.v1` alone, never echoing the token). Unlike a query parameter, the token stays
/// out of URLs, so out of access logs, proxies' logs and browser history. For a `/ws/` request
/// without `Authorization`, the headers with the token moved there.
fn websocket_token(path: &str, headers: &axum::http::HeaderMap) -> Option<axum::http::HeaderMap> {
    if !path.starts_with("/ws/") || headers.contains_key(header::AUTHORIZATION) {
        return None;
    }
    let token = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("bearer."))?;
    let mut headers = headers.clone();
    headers.insert(
        header::AUTHORIZATION,
        axum::http::HeaderValue::from_str(&format!("Bearer {token}")).ok()?,
    );
    Some(headers)
}

/// Checks the request's credentials against the scope of its route.
pub(super) async fn authenticate(
    State(state): State<SharedState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_owned(),
        |p| p.as_str().to_owned(),
    );
    let (need, format) = route_needs(request.method(), &path, state.auth_config.protect_metrics);
    let Some(scope) = need else {
        return next.run(request).await;
    };
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let from_protocol = websocket_token(&path, request.headers());
    let headers = match &from_protocol {
        Some(headers) => headers,
        None => request.headers(),
    };
    match caller_for(&state, headers, peer, scope).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => {
            let encoding = Encoding::from_content_type(super::header_str(
                request.headers(),
                header::CONTENT_TYPE,
            ))
            .unwrap_or(Encoding::Protobuf);
            refuse(&e, format, encoding)
        }
    }
}

/// What a client is told of a refusal: a catalog failure's detail goes to the log under a
/// request id, never to a client that may not even have a token.
pub(super) fn client_text(e: &AuthError) -> String {
    match e {
        AuthError::Unavailable(detail) => {
            let id = super::errors::incident_id();
            tracing::warn!(request_id = %id, error = %detail, "cannot check a token");
            format!("cannot check the token now, retry later (request id {id})")
        }
        other => other.to_string(),
    }
}

/// The answer to a refused request.
fn refuse(e: &AuthError, format: Format, encoding: Encoding) -> Response {
    let message = client_text(e);
    let (status, kind, code) = match e {
        AuthError::Unauthenticated(_) => (
            StatusCode::UNAUTHORIZED,
            ErrorType::Unauthorized,
            CODE_UNAUTHENTICATED,
        ),
        AuthError::Forbidden(_) => (
            StatusCode::FORBIDDEN,
            ErrorType::Forbidden,
            CODE_PERMISSION_DENIED,
        ),
        AuthError::Unavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Unavailable,
            CODE_UNAVAILABLE,
        ),
        AuthError::Throttled(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            ErrorType::TooManyRequests,
            CODE_RESOURCE_EXHAUSTED,
        ),
    };
    let mut response = match format {
        Format::Prometheus => ApiError { kind, message }.into_response(),
        Format::RemoteWrite => (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            message + "\n",
        )
            .into_response(),
        Format::Otlp => (
            status,
            [(header::CONTENT_TYPE, encoding.content_type())],
            super::otlp::status_body(code, message, encoding),
        )
            .into_response(),
    };
    let headers = response.headers_mut();
    match e {
        AuthError::Unauthenticated(_) => {
            headers.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"secumon\""),
            );
            headers.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"secumon\""),
            );
        }
        AuthError::Unavailable(_) => {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(crate::ingest::RETRY_AFTER_SECS),
            );
        }
        AuthError::Throttled(wait) => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*wait));
        }
        AuthError::Forbidden(_) => {}
    }
    response
}

/// The caller of an authenticated request.
pub struct Authenticated(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .map(|c| Authenticated(c.clone()))
            .ok_or_else(no_caller)
    }
}

/// Every route that reads or writes data is behind `authenticate`, which always puts a caller
/// in; a route without one is a wiring mistake, refused rather than served in some tenant.
fn no_caller() -> ApiError {
    ApiError {
        kind: ErrorType::Internal,
        message: "request without an authenticated caller".into(),
    }
}

/// The tenant of an authenticated request.
pub struct Tenant(pub TenantId);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .map(|c| Tenant(c.tenant.clone()))
            .ok_or_else(no_caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_route_needs_a_scope_and_only_health_is_open() {
        use axum::http::Method;
        for (path, scope) in [
            ("/api/v1/query", Some(Scope::Read)),
            ("/api/v1/label/{name}/values", Some(Scope::Read)),
            ("/api/v1/status/tsdb", Some(Scope::Read)),
            ("/api/v1/write", Some(Scope::Ingest)),
            ("/v1/metrics", Some(Scope::Ingest)),
            ("/v1/opamp", Some(Scope::Ingest)),
            ("/api/v1/otlp/v1/metrics", Some(Scope::Ingest)),
            ("/api/v1/admin/tokens", Some(Scope::Admin)),
            ("/api/v1/admin/tokens/{id}", Some(Scope::Admin)),
            ("/health", None),
            ("/ready", None),
            ("/api/v1/openapi.json", None),
            ("/metrics", None),
        ] {
            assert_eq!(route_needs(&Method::GET, path, false).0, scope, "{path}");
        }
        assert_eq!(
            route_needs(&Method::GET, "/metrics", true).0,
            Some(Scope::Read)
        );
        for (method, scope) in [
            (Method::GET, Scope::Read),
            (Method::POST, Scope::Admin),
            (Method::PATCH, Scope::Admin),
            (Method::DELETE, Scope::Admin),
        ] {
            assert_eq!(
                route_needs(&method, "/api/v1/agents/{id}", false).0,
                Some(scope)
            );
        }
    }
}
