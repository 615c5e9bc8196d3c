//! `POST /v1/opamp`: OpAMP's plain HTTP transport. The body is one protobuf `AgentToServer`
//! (gzip allowed), the answer one `ServerToAgent`; the agent's token gives its tenant (scope
//! `ingest`, the one agents hold). What the server does with a message is `fleet::opamp`'s.

use super::auth::Authenticated;
use super::SharedState;
use crate::fleet::opamp::{error_answer, Exchange};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prost::Message;
use secumon_proto::opamp::{AgentToServer, ServerErrorResponseType, ServerToAgent};

const PROTOBUF: &str = "application/x-protobuf";

fn protobuf(status: StatusCode, message: &ServerToAgent) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, PROTOBUF)],
        message.encode_to_vec(),
    )
        .into_response()
}

/// The OpAMP HTTP endpoint.
#[utoipa::path(post, path = "/v1/opamp", tag = "opamp",
    request_body(content = Vec<u8>, content_type = "application/x-protobuf", description = "One OpAMP AgentToServer message (gzip allowed)"),
    responses(
        (status = 200, description = "One OpAMP ServerToAgent message (a malformed message is answered with error_response)", content_type = "application/x-protobuf"),
        (status = 413, description = "Over --fleet-opamp-max-message-bytes"),
        (status = 415, description = "Not application/x-protobuf, or an unknown content encoding"),
        (status = 503, description = "The registry cannot be written now; retry after Retry-After")))]
pub(super) async fn http(
    State(state): State<SharedState>,
    Authenticated(caller): Authenticated,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = super::header_str(&headers, header::CONTENT_TYPE);
    if !content_type.starts_with(PROTOBUF) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported content type {content_type:?}: OpAMP over HTTP sends {PROTOBUF}\n"
            ),
        )
            .into_response();
    }
    let limit = state.fleet.opamp_max_message_bytes;
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("OpAMP message over {limit} bytes (--fleet-opamp-max-message-bytes)\n"),
        )
            .into_response()
    };
    if body.len() > limit {
        return too_large();
    }
    let bytes = match super::header_str(&headers, header::CONTENT_ENCODING).trim() {
        "" | "identity" => body.to_vec(),
        "gzip" => match crate::ingest::otlp::gunzip(&body, limit) {
            Ok(bytes) => bytes,
            Err(e) if e.is_too_large() => return too_large(),
            Err(e) => {
                return protobuf(
                    StatusCode::OK,
                    &error_answer(
                        Vec::new(),
                        ServerErrorResponseType::BadRequest,
                        e.to_string(),
                    ),
                )
            }
        },
        other => {
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported content encoding {other:?}: send gzip or no encoding\n"),
            )
                .into_response()
        }
    };
    // A malformed message is answered in the protocol (BadRequest: the agent does not retry).
    let message = match AgentToServer::decode(bytes.as_slice()) {
        Ok(message) => message,
        Err(e) => {
            return protobuf(
                StatusCode::OK,
                &error_answer(
                    Vec::new(),
                    ServerErrorResponseType::BadRequest,
                    format!("not an AgentToServer message: {e}"),
                ),
            )
        }
    };
    let peer = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let exchange = Exchange {
        catalog: state.auth.catalog().as_ref(),
        fleet: &state.fleet,
        tenant: &caller.tenant,
        token_id: caller.token_id.as_deref(),
        peer,
        now_ms: chrono::Utc::now().timestamp_millis(),
        live: Some(&state.live),
    };
    match exchange.answer(&message).await {
        Ok(answer) => protobuf(StatusCode::OK, &answer),
        Err(e) => {
            let id = super::errors::incident_id();
            tracing::error!(request_id = %id, error = %e, "OpAMP message not recorded");
            // 503 with Retry-After: the agent retries later (the specification's throttling).
            let mut response = (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the agents registry cannot record this now, retry later (request id {id})\n"
                ),
            )
                .into_response();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(crate::ingest::RETRY_AFTER_SECS),
            );
            response
        }
    }
}
