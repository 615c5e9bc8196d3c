//! OTLP/HTTP (`POST /v1/metrics` on the OTLP port, `POST /api/v1/otlp/v1/metrics` on the main
//! port) and OTLP/gRPC (`MetricsService/Export`). Answers follow the OTLP specification:
//! success with partial success for refused points, 400/`INVALID_ARGUMENT` for a malformed
//! request, 413/`RESOURCE_EXHAUSTED` for one over the size limits, 503/`UNAVAILABLE` with
//! `Retry-After` only when storage is unreachable (a retry can succeed), in the request's
//! encoding.

use super::auth::Tenant;
use super::SharedState;
use crate::ingest::otlp::{self, DecodeError, Encoding};
use crate::ingest::WriteSummary;
use crate::model::TenantId;
use crate::storage::StorageError;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use secumon_proto::google_rpc::Status as RpcStatus;

/// gRPC codes used in OTLP/HTTP error bodies.
const CODE_INVALID_ARGUMENT: i32 = 3;
const CODE_RESOURCE_EXHAUSTED: i32 = 8;
const CODE_INTERNAL: i32 = 13;
const CODE_UNAVAILABLE: i32 = 14;

/// Why an export failed as a whole.
enum ExportError {
    Decode(DecodeError),
    Storage(StorageError),
    /// The tenant is over its ingest rate: retry later.
    RateLimited(crate::ingest::rate::RateLimited),
}

/// Takes the batch's samples from the tenant's rate, counting a refusal.
fn take_rate(
    state: &SharedState,
    tenant: &TenantId,
    batch: &crate::ingest::Batch,
) -> Result<(), ExportError> {
    state.ingester.take_rate(tenant, batch).map_err(|limited| {
        state.metrics.rejected(
            otlp::PROTOCOL,
            crate::ingest::RATE_LIMITED,
            batch.series.sample_count(),
        );
        ExportError::RateLimited(limited)
    })
}

/// Decodes, translates and stores one export request body (already decompressed or not).
async fn export(
    state: &SharedState,
    tenant: &TenantId,
    body: Bytes,
    content_encoding: Option<String>,
    encoding: Encoding,
) -> Result<WriteSummary, ExportError> {
    let config = state.ingest_config.clone();
    let otlp_config = state.otlp_config.clone();
    let labels = state.otlp_labels.clone();
    let limits = state.ingester.limits();
    let batch = tokio::task::spawn_blocking(move || {
        let raw = otlp::decompress(&body, content_encoding.as_deref(), &config)?;
        let request = otlp::decode(&raw, encoding)?;
        otlp::to_batch(request, &otlp_config, &labels, &limits)
    })
    .await
    .map_err(|e| ExportError::Storage(StorageError::Internal(e.to_string())))?
    .map_err(ExportError::Decode)?;
    take_rate(state, tenant, &batch)?;
    state
        .ingester
        .write(otlp::PROTOCOL, tenant, batch)
        .await
        .map_err(ExportError::Storage)
}

/// Stores an already decoded request (gRPC).
async fn export_decoded(
    state: &SharedState,
    tenant: &TenantId,
    request: ExportMetricsServiceRequest,
) -> Result<WriteSummary, ExportError> {
    let otlp_config = state.otlp_config.clone();
    let labels = state.otlp_labels.clone();
    let limits = state.ingester.limits();
    let batch = tokio::task::spawn_blocking(move || {
        otlp::to_batch(request, &otlp_config, &labels, &limits)
    })
    .await
    .map_err(|e| ExportError::Storage(StorageError::Internal(e.to_string())))?
    .map_err(ExportError::Decode)?;
    take_rate(state, tenant, &batch)?;
    state
        .ingester
        .write(otlp::PROTOCOL, tenant, batch)
        .await
        .map_err(ExportError::Storage)
}

fn response_for(summary: &WriteSummary) -> ExportMetricsServiceResponse {
    ExportMetricsServiceResponse {
        partial_success: (summary.rejected > 0).then(|| ExportMetricsPartialSuccess {
            rejected_data_points: summary.rejected as i64,
            error_message: summary.first_error.clone().unwrap_or_default(),
        }),
    }
}

/// The success body; in JSON an absent partial success is an absent field, not `null`, and
/// the int64 count is a decimal string, as the protobuf JSON mapping (and so the collector)
/// writes it.
fn response_body(response: &ExportMetricsServiceResponse, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => response.encode_to_vec(),
        Encoding::Json => match &response.partial_success {
            None => b"{}".to_vec(),
            Some(partial) => serde_json::json!({"partialSuccess": {
                "rejectedDataPoints": partial.rejected_data_points.to_string(),
                "errorMessage": partial.error_message,
            }})
            .to_string()
            .into_bytes(),
        },
    }
}

pub(super) fn status_body(code: i32, message: String, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => RpcStatus { code, message }.encode_to_vec(),
        Encoding::Json => serde_json::json!({"code": code, "message": message})
            .to_string()
            .into_bytes(),
    }
}

fn reply(status: StatusCode, encoding: Encoding, body: Vec<u8>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, encoding.content_type())],
        body,
    )
        .into_response()
}

/// 503 `UNAVAILABLE` with `Retry-After`: OTLP/HTTP clients retry it.
fn retry_later(encoding: Encoding, message: String) -> Response {
    let mut response = reply(
        StatusCode::SERVICE_UNAVAILABLE,
        encoding,
        status_body(CODE_UNAVAILABLE, message, encoding),
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from(crate::ingest::RETRY_AFTER_SECS),
    );
    response
}

/// The OTLP/HTTP metrics endpoint.
pub(super) async fn http_export(
    State(state): State<SharedState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = super::header_str(&headers, header::CONTENT_TYPE);
    let Some(encoding) = Encoding::from_content_type(content_type) else {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported content type {content_type:?}: send application/x-protobuf or application/json\n"),
        )
            .into_response();
    };
    let content_encoding = Some(super::header_str(&headers, header::CONTENT_ENCODING))
        .filter(|e| !e.is_empty())
        .map(str::to_owned);
    let _slot = match state.ingester.slot().await {
        Ok(slot) => slot,
        Err(busy) => return retry_later(encoding, busy.to_string()),
    };
    match export(&state, &tenant, body, content_encoding, encoding).await {
        Ok(summary) => reply(
            StatusCode::OK,
            encoding,
            response_body(&response_for(&summary), encoding),
        ),
        Err(ExportError::Decode(e)) if e.is_too_large() => reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            encoding,
            status_body(CODE_RESOURCE_EXHAUSTED, e.to_string(), encoding),
        ),
        Err(ExportError::Decode(e)) => reply(
            StatusCode::BAD_REQUEST,
            encoding,
            status_body(CODE_INVALID_ARGUMENT, e.to_string(), encoding),
        ),
        Err(ExportError::Storage(e @ StorageError::Unavailable(_))) => {
            retry_later(encoding, super::errors::client_message(&e, "OTLP export"))
        }
        // OTLP/HTTP: 429 is retryable, after Retry-After.
        Err(ExportError::RateLimited(limited)) => {
            let mut response = reply(
                StatusCode::TOO_MANY_REQUESTS,
                encoding,
                status_body(CODE_RESOURCE_EXHAUSTED, limited.to_string(), encoding),
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(limited.retry_after_secs),
            );
            response
        }
        Err(ExportError::Storage(e)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            encoding,
            status_body(
                CODE_INTERNAL,
                super::errors::client_message(&e, "OTLP export"),
                encoding,
            ),
        ),
    }
}

pub mod grpc {
    //! `opentelemetry.proto.collector.metrics.v1.MetricsService/Export` over gRPC. The request
    //! is taken as bytes and decoded here, so that a malformed message is `INVALID_ARGUMENT`
    //! (tonic's protobuf codec would answer `INTERNAL`).

    use super::{export_decoded, response_for, SharedState};
    use crate::storage::StorageError;
    use axum::body::Bytes;
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use prost::Message;
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tonic::codec::{
        Codec, CompressionEncoding, DecodeBuf, Decoder, EnabledCompressionEncodings, EncodeBuf,
        Encoder,
    };
    use tonic::{Request, Response, Status};

    const EXPORT_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

    /// Passes request bytes through and encodes responses with prost.
    #[derive(Default)]
    struct BytesCodec;

    struct BytesDecoder;
    struct ResponseEncoder;

    impl Decoder for BytesDecoder {
        type Item = Bytes;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
            use bytes::Buf;
            Ok(Some(buf.copy_to_bytes(buf.remaining())))
        }
    }

    impl Encoder for ResponseEncoder {
        type Item = ExportMetricsServiceResponse;
        type Error = Status;

        fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            item.encode(buf)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }

    impl Codec for BytesCodec {
        type Encode = ExportMetricsServiceResponse;
        type Decode = Bytes;
        type Encoder = ResponseEncoder;
        type Decoder = BytesDecoder;

        fn encoder(&mut self) -> Self::Encoder {
            ResponseEncoder
        }

        fn decoder(&mut self) -> Self::Decoder {
            BytesDecoder
        }
    }

    type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

    struct Export(SharedState, crate::model::TenantId);

    impl tonic::server::UnaryService<Bytes> for Export {
        type Response = ExportMetricsServiceResponse;
        type Future = BoxFuture<Response<Self::Response>, Status>;

        fn call(&mut self, request: Request<Bytes>) -> Self::Future {
            let (state, tenant) = (self.0.clone(), self.1.clone());
            Box::pin(async move {
                let bytes = request.into_inner();
                let decoded =
                    tokio::task::spawn_blocking(move || ExportMetricsServiceRequest::decode(bytes))
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?;
                let request =
                    decoded.map_err(|e| Status::invalid_argument(format!("protobuf: {e}")))?;
                match export_decoded(&state, &tenant, request).await {
                    Ok(summary) => Ok(Response::new(response_for(&summary))),
                    Err(super::ExportError::Decode(e)) => {
                        Err(Status::invalid_argument(e.to_string()))
                    }
                    Err(super::ExportError::RateLimited(limited)) => {
                        Err(retry_in(limited.to_string(), limited.retry_after_secs))
                    }
                    Err(super::ExportError::Storage(e @ StorageError::Unavailable(_))) => Err(
                        Status::unavailable(crate::api::errors::client_message(&e, "OTLP export")),
                    ),
                    Err(super::ExportError::Storage(e)) => Err(Status::internal(
                        crate::api::errors::client_message(&e, "OTLP export"),
                    )),
                }
            })
        }
    }

    /// `RESOURCE_EXHAUSTED` with a `google.rpc.RetryInfo`: the OTLP specification makes it
    /// retryable only with one, after its delay.
    fn retry_in(message: String, secs: u64) -> Status {
        use tonic_types::{ErrorDetails, StatusExt};
        Status::with_error_details(
            tonic::Code::ResourceExhausted,
            message,
            ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(secs))),
        )
    }

    /// The gRPC status of refused credentials.
    fn refused(e: &crate::auth::AuthError) -> Status {
        use crate::auth::AuthError;
        match e {
            AuthError::Unauthenticated(m) => Status::unauthenticated(*m),
            AuthError::Forbidden(m) => Status::permission_denied(m.clone()),
            AuthError::Unavailable(_) => Status::unavailable(crate::api::auth::client_text(e)),
            AuthError::Throttled(wait) => retry_in(e.to_string(), *wait),
        }
    }

    /// The gRPC service, to be served by tonic.
    #[derive(Clone)]
    pub struct MetricsService {
        state: SharedState,
    }

    impl MetricsService {
        pub fn new(state: SharedState) -> Self {
            Self { state }
        }
    }

    impl tonic::server::NamedService for MetricsService {
        const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    }

    impl<B> tower_service::Service<http::Request<B>> for MetricsService
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Infallible>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<B>) -> Self::Future {
            let state = self.state.clone();
            if request.uri().path() != EXPORT_PATH {
                return Box::pin(
                    async move { Ok(Status::unimplemented("unknown method").into_http()) },
                );
            }
            Box::pin(async move {
                // Checked before anything else: an unknown client costs no slot and no body.
                let peer = request
                    .extensions()
                    .get::<tonic::transport::server::TcpConnectInfo>()
                    .and_then(|c| c.remote_addr())
                    .map(|a| a.ip());
                let caller = crate::api::auth::caller_for(
                    &state,
                    request.headers(),
                    peer,
                    crate::auth::Scope::Ingest,
                )
                .await;
                let tenant = match caller {
                    Ok(caller) => caller.tenant,
                    Err(e) => return Ok(refused(&e).into_http()),
                };
                // Taken before the body is read: a busy server reads no more bodies.
                let _slot = match state.ingester.slot().await {
                    Ok(slot) => slot,
                    Err(busy) => return Ok(Status::unavailable(busy.to_string()).into_http()),
                };
                let mut accept = EnabledCompressionEncodings::default();
                accept.enable(CompressionEncoding::Gzip);
                // The limits of OTLP over HTTP: the body as received, then the message after
                // inflating.
                let most = state.ingest_config.max_request_bytes;
                let budget = state.body_budget.clone();
                let request = request.map(|body| {
                    let body = crate::server::listener::BudgetedBody::new(body, budget);
                    // tonic answers a body error that is a Status with that status.
                    http_body_util::BodyExt::map_err(
                        http_body_util::Limited::new(body, most),
                        move |e| {
                            if e.is::<http_body_util::LengthLimitError>() {
                                Status::out_of_range(format!(
                                    "message larger than {most} bytes (--ingest-max-request-bytes)"
                                ))
                            } else {
                                Status::from_error(e)
                            }
                        },
                    )
                });
                let limit = state.ingest_config.max_decompressed_bytes;
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .apply_compression_config(accept, EnabledCompressionEncodings::default())
                    .apply_max_message_size_config(Some(limit), None);
                Ok(grpc.unary(Export(state, tenant), request).await)
            })
        }
    }
}
