//! `/v1/opamp`: OpAMP's plain HTTP transport (`POST`: the body is one protobuf
//! `AgentToServer`, gzip allowed, the answer one `ServerToAgent`) and its WebSocket transport
//! (`GET` upgraded). The agent's token gives its tenant (scope `ingest`, the one agents hold).
//! What the server does with a message is `fleet::opamp`'s.

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

/// The address a request came from.
fn peer_of(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// What the server does with a message of `caller`'s, now.
fn exchange<'a>(
    state: &'a SharedState,
    caller: &'a crate::auth::Caller,
    peer: Option<std::net::IpAddr>,
) -> Exchange<'a> {
    Exchange {
        catalog: state.auth.catalog().as_ref(),
        fleet: &state.fleet,
        tenant: &caller.tenant,
        token_id: caller.token_id.as_deref(),
        peer,
        now_ms: chrono::Utc::now().timestamp_millis(),
        live: Some(&state.live),
    }
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
    match exchange(&state, &caller, peer_of(&extensions))
        .answer(&message)
        .await
    {
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

/// `GET /v1/opamp` upgraded to a WebSocket: OpAMP's WebSocket transport. Each binary message is
/// a varint header (0) and one protobuf message, `AgentToServer` from the agent and
/// `ServerToAgent` from the server. Every agent message is answered as over HTTP; besides, the
/// server sends a remote configuration an operator sets for the agent at once, without
/// waiting for the agent's next message.
#[utoipa::path(get, path = "/v1/opamp", tag = "opamp",
    responses(
        (status = 101, description = "OpAMP's WebSocket transport: binary messages of a 0 header byte and one AgentToServer (agent) or ServerToAgent (server)"),
        (status = 401, description = "No valid token")))]
pub(super) async fn websocket(
    State(state): State<SharedState>,
    Authenticated(caller): Authenticated,
    extensions: axum::http::Extensions,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let peer = peer_of(&extensions);
    let limit = state.fleet.opamp_max_message_bytes;
    ws.max_message_size(limit + 16)
        .max_frame_size(limit + 16)
        .on_upgrade(move |socket| session(socket, state, caller, peer))
}

/// `message` with the transport's header (a varint 0).
fn framed(message: &ServerToAgent) -> axum::extract::ws::Message {
    let mut bytes = Vec::with_capacity(message.encoded_len() + 1);
    bytes.push(0);
    message.encode(&mut bytes).expect("a Vec grows");
    axum::extract::ws::Message::Binary(bytes.into())
}

/// The protobuf of a transport message: after the varint header, which must be 0.
fn unframed(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes.first() {
        Some(0) => Ok(&bytes[1..]),
        Some(_) => Err("the message header is not 0: not an OpAMP message of this version".into()),
        None => Err("an empty message".into()),
    }
}

async fn session(
    mut socket: axum::extract::ws::WebSocket,
    state: SharedState,
    caller: crate::auth::Caller,
    peer: Option<std::net::IpAddr>,
) {
    use axum::extract::ws::Message as Ws;
    // Set once the agent's first message names it: pokes when its configuration changes.
    let mut poked: Option<(
        String,
        tokio::sync::mpsc::Receiver<()>,
        crate::fleet::opamp::Registration,
    )> = None;
    let mut closing = state.live.closing();
    loop {
        let poke = async {
            match poked.as_mut() {
                Some((_, receiver, _)) => receiver.recv().await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            message = socket.recv() => Some(message),
            _ = poke => None,
            _ = closing.wait_for(|c| *c) => return,
        };
        let answer = match event {
            // An operator set a configuration: offer it now.
            None => {
                let Some((agent_id, _, _)) = &poked else {
                    continue;
                };
                match crate::fleet::opamp::push_offer(
                    state.auth.catalog().as_ref(),
                    &caller.tenant,
                    agent_id,
                )
                .await
                {
                    Ok(Some(answer)) => answer,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot offer a remote configuration over OpAMP");
                        continue;
                    }
                }
            }
            Some(None | Some(Err(_)) | Some(Ok(Ws::Close(_)))) => return,
            Some(Some(Ok(Ws::Binary(bytes)))) => {
                let message = unframed(&bytes).and_then(|protobuf| {
                    AgentToServer::decode(protobuf)
                        .map_err(|e| format!("not an AgentToServer message: {e}"))
                });
                match message {
                    Err(e) => error_answer(Vec::new(), ServerErrorResponseType::BadRequest, e),
                    Ok(message) => {
                        match exchange(&state, &caller, peer).answer(&message).await {
                            Ok(answer) => {
                                if answer.error_response.is_none() {
                                    let uid = answer
                                        .agent_identification
                                        .as_ref()
                                        .map_or(&message.instance_uid, |i| &i.new_instance_uid);
                                    if let Ok(uid) = uuid::Uuid::from_slice(uid) {
                                        let agent_id = uid.to_string();
                                        if poked.as_ref().is_none_or(|(id, _, _)| *id != agent_id) {
                                            let (registration, receiver) = state
                                                .opamp_sessions
                                                .register(&caller.tenant, &agent_id);
                                            poked = Some((agent_id, receiver, registration));
                                        }
                                    }
                                }
                                answer
                            }
                            Err(e) => {
                                let id = super::errors::incident_id();
                                tracing::error!(request_id = %id, error = %e, "OpAMP message not recorded");
                                let mut answer = error_answer(
                                    message.instance_uid.clone(),
                                    ServerErrorResponseType::Unavailable,
                                    format!("the agents registry cannot record this now, retry later (request id {id})"),
                                );
                                if let Some(error) = answer.error_response.as_mut() {
                                    error.details = Some(secumon_proto::opamp::server_error_response::Details::RetryInfo(
                                        secumon_proto::opamp::RetryInfo {
                                            retry_after_nanoseconds: crate::ingest::RETRY_AFTER_SECS * 1_000_000_000,
                                        },
                                    ));
                                }
                                answer
                            }
                        }
                    }
                }
            }
            Some(Some(Ok(Ws::Text(_)))) => error_answer(
                Vec::new(),
                ServerErrorResponseType::BadRequest,
                "OpAMP over WebSocket sends binary messages",
            ),
            // Pings are answered by the library; pongs need nothing.
            Some(Some(Ok(_))) => continue,
        };
        let sent = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            socket.send(framed(&answer)),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
    }
}
