//! `/api/v1/admin/tokens`: a tenant's API tokens over HTTP, for callers with the `admin` scope
//! (in their own tenant) or `operator` (in the tenant `X-Scope-OrgID` names). A new token is in
//! the creation answer only; the catalog keeps its hash.

use super::auth::Authenticated;
use super::errors::{ApiError, ErrorType};
use super::SharedState;
use crate::auth::{Caller, CreateError, Scope, Scopes};
use crate::catalog::{CatalogError, TokenRecord};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

fn answer(status: StatusCode, data: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"status": "success", "data": data}).to_string(),
    )
        .into_response()
}

fn time(ms: Option<i64>) -> serde_json::Value {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or(serde_json::Value::Null, |t| {
            json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        })
}

fn describe(t: &TokenRecord) -> serde_json::Value {
    json!({
        "id": t.id,
        "tenant": t.tenant.as_str(),
        "name": t.name,
        "scopes": t.scopes.to_string().split(',').collect::<Vec<_>>(),
        "created_at": time(Some(t.created_at)),
        "expires_at": time(t.expires_at),
        "last_used_at": time(t.last_used_at),
    })
}

fn catalog_error(e: CatalogError) -> ApiError {
    let kind = match e {
        CatalogError::Unavailable(_) => ErrorType::Unavailable,
        CatalogError::Internal(_) | CatalogError::Conflict => ErrorType::Internal,
    };
    let id = super::errors::incident_id();
    tracing::error!(request_id = %id, error = %e, "token administration failed");
    ApiError {
        kind,
        message: format!("catalog error (request id {id})"),
    }
}

/// Token administration over HTTP needs authentication on: with it off every request would
/// be an operator, free to mint tokens that work once it is turned on.
fn enabled(state: &SharedState) -> Result<(), ApiError> {
    if state.auth.required() {
        Ok(())
    } else {
        Err(ApiError {
            kind: ErrorType::Forbidden,
            message: "token administration over HTTP needs authentication on (--auth on); use `secumon token` on the server".into(),
        })
    }
}

/// The tenant's tokens `caller` may see: operator tokens only to operators (a tenant's
/// admins must not revoke the operator's access).
async fn visible(state: &SharedState, caller: &Caller) -> Result<Vec<TokenRecord>, ApiError> {
    let tokens = state
        .auth
        .catalog()
        .list_tokens(Some(&caller.tenant))
        .await
        .map_err(catalog_error)?;
    let operator = caller.scopes.contains(Scope::Operator);
    Ok(tokens
        .into_iter()
        .filter(|t| operator || !t.scopes.contains(Scope::Operator))
        .collect())
}

/// `GET /api/v1/admin/tokens`: the tenant's tokens, oldest first.
#[utoipa::path(get, path = "/api/v1/admin/tokens", tag = "admin",
    responses((status = 200, description = "The tokens the caller may see", body = super::openapi::TokenListAnswer)))]
pub(super) async fn list(
    State(state): State<SharedState>,
    Authenticated(caller): Authenticated,
) -> Result<Response, ApiError> {
    enabled(&state)?;
    let tokens = visible(&state, &caller).await?;
    Ok(answer(
        StatusCode::OK,
        tokens.iter().map(describe).collect(),
    ))
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateRequest {
    name: String,
    scopes: Vec<String>,
    /// A Prometheus duration (`30d`); none: the token does not expire.
    #[serde(default)]
    expires: Option<String>,
}

/// `POST /api/v1/admin/tokens` with `{"name", "scopes": [...], "expires"?}`: 201 with the
/// token's description and, this once, the token.
#[utoipa::path(post, path = "/api/v1/admin/tokens", tag = "admin", request_body = CreateRequest,
    responses(
        (status = 201, description = "Created; the token is in the answer this once", body = super::openapi::TokenAnswer),
        (status = 400, description = "Invalid request", body = super::openapi::ErrorAnswer)))]
pub(super) async fn create(
    State(state): State<SharedState>,
    Authenticated(caller): Authenticated,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    enabled(&state)?;
    let request: CreateRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_data(format!("invalid token request: {e}")))?;
    let scopes: Scopes = request
        .scopes
        .join(",")
        .parse()
        .map_err(ApiError::bad_data)?;
    // Only operators create operator tokens.
    if scopes.contains(Scope::Operator) && !caller.scopes.contains(Scope::Operator) {
        return Err(ApiError {
            kind: ErrorType::Forbidden,
            message: "only an operator token may create operator tokens".into(),
        });
    }
    let lifetime = request
        .expires
        .as_deref()
        .map(|e| {
            super::params::parse_duration(e).map_err(|m| ApiError::invalid_param("expires", m))
        })
        .transpose()?;
    let created = crate::auth::create_token(
        state.auth.catalog().as_ref(),
        caller.tenant.as_str(),
        scopes,
        &request.name,
        lifetime,
        state.auth.max_tokens_per_tenant(),
    )
    .await;
    let (token, record) = match created {
        Ok(done) => done,
        Err(CreateError::Invalid(m)) => return Err(ApiError::bad_data(m)),
        Err(CreateError::Catalog(e)) => return Err(catalog_error(e)),
        Err(CreateError::Random(e)) => {
            return Err(ApiError {
                kind: ErrorType::Internal,
                message: e.to_string(),
            })
        }
    };
    tracing::info!(id = %record.id, tenant = %record.tenant, scopes = %record.scopes, by = ?caller.token_id, "token created");
    let mut data = describe(&record);
    data["token"] = json!(token);
    Ok(answer(StatusCode::CREATED, data))
}

/// `DELETE /api/v1/admin/tokens/{id}`: revokes a token of the tenant (404 if it has none by
/// that id). This server forgets it at once; others within `--auth-cache-secs`.
#[utoipa::path(delete, path = "/api/v1/admin/tokens/{id}", tag = "admin",
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 200, description = "Revoked", body = super::openapi::DeletedAnswer),
        (status = 404, description = "No such token", body = super::openapi::ErrorAnswer)))]
pub(super) async fn revoke(
    State(state): State<SharedState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    enabled(&state)?;
    let not_found = || ApiError {
        kind: ErrorType::NotFound,
        message: format!("tenant {} has no token {id:?}", caller.tenant),
    };
    if !visible(&state, &caller).await?.iter().any(|t| t.id == id) {
        return Err(not_found());
    }
    let deleted = state
        .auth
        .catalog()
        .delete_token(&id, Some(&caller.tenant))
        .await
        .map_err(catalog_error)?;
    if !deleted {
        return Err(not_found());
    }
    state.auth.forget_token(&id);
    tracing::info!(%id, tenant = %caller.tenant, by = ?caller.token_id, "token revoked");
    Ok(answer(StatusCode::OK, json!({"id": id})))
}
