//! API errors in Prometheus's JSON envelope with its HTTP codes
//! (prometheus web/api/v1/api.go `respondError`).

use super::json;
use crate::promql::QueryError;
use crate::storage::StorageError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    BadData,
    Execution,
    Canceled,
    Timeout,
    Internal,
    NotFound,
    Unavailable,
    /// No or bad credentials (not a Prometheus error type: Prometheus has no authentication).
    Unauthorized,
    /// Credentials without the scope the endpoint needs.
    Forbidden,
    /// Refused for a while (too many failed authentications).
    TooManyRequests,
    /// The resource exists already (a duplicate identity).
    Conflict,
    /// `If-Match` names a version that is no longer current.
    PreconditionFailed,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::BadData => "bad_data",
            ErrorType::Execution => "execution",
            ErrorType::Canceled => "canceled",
            ErrorType::Timeout => "timeout",
            ErrorType::Internal => "internal",
            ErrorType::NotFound => "not_found",
            ErrorType::Unavailable => "unavailable",
            ErrorType::Unauthorized => "unauthorized",
            ErrorType::Forbidden => "forbidden",
            ErrorType::TooManyRequests => "too_many_requests",
            ErrorType::Conflict => "conflict",
            ErrorType::PreconditionFailed => "precondition_failed",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorType::BadData => StatusCode::BAD_REQUEST,
            ErrorType::Execution => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::Canceled | ErrorType::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::NotFound => StatusCode::NOT_FOUND,
            // Prometheus answers `unavailable` with 500; we use 503 so clients know a retry
            // may succeed (the backend is unreachable, not broken).
            ErrorType::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorType::Forbidden => StatusCode::FORBIDDEN,
            ErrorType::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorType::Conflict => StatusCode::CONFLICT,
            ErrorType::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub kind: ErrorType,
    pub message: String,
}

impl ApiError {
    pub fn bad_data(message: impl Into<String>) -> ApiError {
        ApiError {
            kind: ErrorType::BadData,
            message: message.into(),
        }
    }

    /// `invalid parameter "name": reason`, as Prometheus wraps parameter errors.
    pub fn invalid_param(name: &str, reason: impl std::fmt::Display) -> ApiError {
        ApiError::bad_data(format!("invalid parameter {name:?}: {reason}"))
    }
}

/// An id for one failure, to find its detail in the log: 16 hex digits, unique within the
/// process and unlikely to repeat across restarts.
pub fn incident_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut seed = [0u8; 28];
    seed[..16].copy_from_slice(&now.to_le_bytes());
    seed[16..24].copy_from_slice(&n.to_le_bytes());
    seed[24..].copy_from_slice(&std::process::id().to_le_bytes());
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&seed))
}

/// What a client is told of a storage failure. The detail (SQL, file paths, the database's
/// own words) goes to the log under an id; the client gets a short message with that id.
/// `what` names the request for the log.
pub fn client_message(e: &StorageError, what: &str) -> String {
    match e {
        StorageError::TooManySamples => e.to_string(),
        StorageError::Unavailable(detail) => {
            let id = incident_id();
            tracing::warn!(request_id = %id, error = %detail, "{what}: storage unavailable");
            format!("storage unavailable, retry later (request id {id})")
        }
        StorageError::Internal(detail) => {
            let id = incident_id();
            tracing::error!(request_id = %id, error = %detail, "{what}: internal error");
            format!("internal error (request id {id}; the server log has the detail)")
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        let kind = match e {
            StorageError::Unavailable(_) => ErrorType::Unavailable,
            StorageError::TooManySamples => ErrorType::Execution,
            StorageError::Internal(_) => ErrorType::Internal,
        };
        ApiError {
            kind,
            message: client_message(&e, "query"),
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Storage(e) => e.into(),
            QueryError::BadData(_) => ApiError::bad_data(e.to_string()),
            QueryError::Timeout(_) => ApiError {
                kind: ErrorType::Timeout,
                message: e.to_string(),
            },
            QueryError::Execution(_)
            | QueryError::TooManySamples
            | QueryError::TooManySeries(_) => ApiError {
                kind: ErrorType::Execution,
                message: e.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = String::from(r#"{"status":"error","errorType":"#);
        json::write_str(&mut body, self.kind.as_str());
        body.push_str(r#","error":"#);
        json::write_str(&mut body, &self.message);
        body.push('}');
        (
            self.kind.status(),
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}
