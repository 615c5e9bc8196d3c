//! Ingest endpoints. Status codes follow the remote-write spec: 204 when everything was
//! stored, 400 when something in the request can never be stored (senders drop it and do not
//! retry; the valid part of the request is stored all the same), 5xx only when a retry can
//! succeed.

use super::auth::Tenant;
use super::SharedState;
use crate::ingest::remote_write;
use crate::storage::StorageError;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

fn text(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message + "\n",
    )
        .into_response()
}

/// Bodies that decompress to at most this many bytes are decoded on the request's own
/// runtime thread: about a millisecond of work for 2,000 series (a sender's usual request),
/// where handing it to the blocking pool and back cost more than that on a loaded machine
/// (two thread wake-ups a request: ingest on 2 cores was 0.85 as fast). A larger body (up to
/// `--ingest-max-decompressed-bytes`) is decoded on the blocking pool, so no request holds a
/// runtime thread for long.
const INLINE_DECODE_BYTES: usize = 512 << 10;

pub(super) async fn remote_write(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = super::header_str(&headers, header::CONTENT_TYPE);
    if content_type.contains("io.prometheus.write.v2") {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "remote-write 2.0 is not supported yet; send remote-write 1.0 (prometheus.WriteRequest)".into(),
        );
    }
    let _slot = match state.ingester.slot().await {
        Ok(slot) => slot,
        // The remote-write spec: 5xx is retried; Retry-After says when.
        Err(busy) => {
            let mut response = text(StatusCode::SERVICE_UNAVAILABLE, busy.to_string());
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(crate::ingest::RETRY_AFTER_SECS),
            );
            return response;
        }
    };
    let config = state.ingest_config.clone();
    let limits = state.ingester.limits();
    // A body of usual size is decoded here; a larger one on the blocking pool.
    let inline = snap::raw::decompress_len(&body).is_ok_and(|n| n <= INLINE_DECODE_BYTES);
    let decoded = if inline {
        // A panic in decoding answers 500, as on the blocking pool.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            remote_write::decode(&body, &config, &limits)
        }))
        .map_err(|_| "decoding panicked".to_owned())
    } else {
        tokio::task::spawn_blocking(move || remote_write::decode(&body, &config, &limits))
            .await
            .map_err(|e| e.to_string())
    };
    let batch = match decoded {
        Ok(Ok(batch)) => batch,
        Ok(Err(e)) => {
            return text(StatusCode::BAD_REQUEST, e.to_string());
        }
        Err(e) => {
            let failure = StorageError::Internal(format!("remote-write decoding failed: {e}"));
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                super::errors::client_message(&failure, "remote write"),
            );
        }
    };
    if let Err(limited) = state.ingester.take_rate(&tenant, &batch) {
        state.metrics.rejected(
            remote_write::PROTOCOL,
            crate::ingest::RATE_LIMITED,
            batch.series.sample_count(),
        );
        // The remote-write spec: 429 is retried; Retry-After says when.
        let mut response = text(StatusCode::TOO_MANY_REQUESTS, limited.to_string());
        response.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(limited.retry_after_secs),
        );
        return response;
    }
    match state
        .ingester
        .write(remote_write::PROTOCOL, &tenant, batch)
        .await
    {
        Ok(summary) if summary.rejected == 0 => StatusCode::NO_CONTENT.into_response(),
        Ok(summary) => text(
            StatusCode::BAD_REQUEST,
            format!(
                "{} samples stored, {} refused; first refused: {}",
                summary.accepted,
                summary.rejected,
                summary.first_error.unwrap_or_default()
            ),
        ),
        Err(e) => {
            let status = if e.is_retryable() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            text(status, super::errors::client_message(&e, "remote write"))
        }
    }
}
