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

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        let kind = match e {
            StorageError::Unavailable(_) => ErrorType::Unavailable,
            StorageError::TooManySamples => ErrorType::Execution,
            StorageError::Internal(_) => ErrorType::Internal,
        };
        ApiError {
            kind,
            message: e.to_string(),
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
            QueryError::Execution(_) | QueryError::TooManySamples => ApiError {
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
