//! Sending readings to the server: OTLP/gRPC (default) or OTLP/HTTP protobuf, gzip, TLS with
//! an optional CA file and client certificate, a bearer token read from a file at each send.
//!
//! Every answer is sorted into what the OTLP specification says to do with it
//! (opentelemetry-proto `docs/specification.md`, "Failures"): delivered (perhaps with some
//! points refused: logged and counted), retry later (gRPC UNAVAILABLE, RESOURCE_EXHAUSTED and
//! the other retryable codes; HTTP 429, 502, 503, 504; no answer at all), or refused for good
//! (anything else: dropped and counted, as retrying cannot help).

use crate::config::{Config, Protocol};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    metrics_service_client::MetricsServiceClient, ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
};
use prost::Message;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// What became of one send.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The server took the reading; `rejected` of its points it refused (partial success).
    Delivered { rejected: i64, message: String },
    /// Try again later: after `after` if the server said (`Retry-After`, gRPC `RetryInfo`).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The server will never take this reading.
    Refused { reason: String },
}

/// Longest `Retry-After` honoured: a server asking for more is asked again sooner.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

pub struct Exporter {
    transport: Transport,
    token_file: Option<PathBuf>,
    timeout: Duration,
}

enum Transport {
    Grpc {
        client: MetricsServiceClient<tonic::transport::Channel>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        gzip: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, ExportError> {
    std::fs::read(path).map_err(|source| ExportError::Read {
        path: path.clone(),
        source,
    })
}

/// The OTLP/HTTP URL for a configured server: `/v1/metrics` added when it has no path.
pub fn http_metrics_url(server: &str) -> String {
    let after_scheme = server.split_once("://").map_or(server, |(_, rest)| rest);
    if after_scheme.trim_end_matches('/').contains('/') {
        server.to_owned()
    } else {
        format!("{}/v1/metrics", server.trim_end_matches('/'))
    }
}

impl Exporter {
    pub fn new(config: &Config) -> Result<Exporter, ExportError> {
        let export = &config.export;
        let ca = export.ca_file.as_ref().map(read_file).transpose()?;
        let identity = match (&export.client_cert, &export.client_key) {
            (Some(cert), Some(key)) => Some((read_file(cert)?, read_file(key)?)),
            _ => None,
        };
        let transport = match config.protocol {
            Protocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(config.server.clone())
                    .map_err(|e| ExportError::Setup(format!("server {:?}: {e}", config.server)))?
                    .connect_timeout(export.timeout)
                    .timeout(export.timeout);
                if config.server.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new();
                    tls = match &ca {
                        Some(pem) => {
                            tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
                        }
                        None => tls.with_native_roots(),
                    };
                    if let Some((cert, key)) = &identity {
                        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
                    }
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| ExportError::Setup(format!("TLS: {e}")))?;
                }
                let mut client = MetricsServiceClient::new(endpoint.connect_lazy())
                    // An answer is a few bytes: a larger one is refused, not read.
                    .max_decoding_message_size(MAX_ANSWER_BYTES);
                if export.gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                Transport::Grpc { client }
            }
            Protocol::Http => {
                let client = http_client(config)?;
                Transport::Http {
                    client,
                    url: http_metrics_url(&config.server),
                    gzip: export.gzip,
                }
            }
        };
        Ok(Exporter {
            transport,
            token_file: export.token_file.clone(),
            timeout: export.timeout,
        })
    }

    /// Sends one queued reading (a gzip-compressed `ExportMetricsServiceRequest`).
    pub async fn send(&mut self, compressed: &[u8]) -> Outcome {
        let token = match read_token(self.token_file.as_ref()) {
            Ok(token) => token,
            // A missing token file may be written by the operator soon: try again later.
            Err(reason) => {
                return Outcome::Retry {
                    after: None,
                    reason,
                }
            }
        };
        let timeout = self.timeout;
        match &mut self.transport {
            Transport::Grpc { client } => {
                let decoded = gunzip(compressed).and_then(|payload| {
                    ExportMetricsServiceRequest::decode(payload.as_slice())
                        .map_err(|e| e.to_string())
                });
                let request = match decoded {
                    Ok(r) => r,
                    Err(e) => {
                        return Outcome::Refused {
                            reason: format!("queued reading does not decode: {e}"),
                        }
                    }
                };
                let mut request = tonic::Request::new(request);
                request.set_timeout(timeout);
                if let Some(token) = token {
                    match format!("Bearer {token}").parse() {
                        Ok(value) => {
                            request.metadata_mut().insert("authorization", value);
                        }
                        Err(_) => {
                            return Outcome::Retry {
                                after: None,
                                reason: "token file holds characters a header cannot".into(),
                            }
                        }
                    }
                }
                match client.export(request).await {
                    Ok(response) => delivered(response.into_inner()),
                    Err(status) => grpc_outcome(&status),
                }
            }
            Transport::Http { client, url, gzip } => {
                let mut request = client
                    .post(url.as_str())
                    .header("content-type", "application/x-protobuf");
                let body = if *gzip {
                    request = request.header("content-encoding", "gzip");
                    compressed.to_vec()
                } else {
                    match gunzip(compressed) {
                        Ok(payload) => payload,
                        Err(e) => {
                            return Outcome::Refused {
                                reason: format!("queued reading does not decode: {e}"),
                            }
                        }
                    }
                };
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                match request.body(body).send().await {
                    Err(e) => Outcome::Retry {
                        after: None,
                        reason: format!("no answer: {e}"),
                    },
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let retry_after = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
                        // An answer is a few bytes; a server (or a proxy) sending more is not
                        // read past the limit.
                        let body = read_limited(response, MAX_ANSWER_BYTES)
                            .await
                            .unwrap_or_default();
                        http_outcome(status, retry_after, &body)
                    }
                }
            }
        }
    }
}

/// Most bytes of an HTTP answer read (an OTLP answer or an OpAMP message is a few KiB).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The body of `response`, up to `limit` bytes; an error past it.
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
    {
        if body.len() + chunk.len() > limit {
            return Err(format!("answer over {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Largest reading a queued record may expand to (a reading is tens of KiB).
const MAX_READING_BYTES: u64 = 64 << 20;

/// A reading as the queue keeps it.
pub fn gzip(payload: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(payload.len() / 4),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(payload)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

fn gunzip(compressed: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    // gzip's magic number; anything else is a reading queued before compression.
    if !compressed.starts_with(&[0x1f, 0x8b]) {
        return Ok(compressed.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(compressed)
        .take(MAX_READING_BYTES)
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip: {e}"))?;
    Ok(out)
}

/// The bearer token in `path` (read at each use, so a rotated token is picked up).
pub fn read_token(path: Option<&PathBuf>) -> Result<Option<String>, String> {
    let Some(path) = path else { return Ok(None) };
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    Ok(Some(text.trim().to_owned()))
}

/// An HTTP client with the export's TLS settings (OTLP/HTTP and OpAMP share it).
pub fn http_client(config: &Config) -> Result<reqwest::Client, ExportError> {
    let export = &config.export;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(export.timeout)
        .connect_timeout(export.timeout)
        .user_agent(concat!("secumon-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &export.ca_file {
        let pem = read_file(path)?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| ExportError::Setup(format!("CA file: {e}")))?;
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(cert);
    }
    if let (Some(cert), Some(key)) = (&export.client_cert, &export.client_key) {
        let mut pem = read_file(cert)?;
        pem.push(b'\n');
        pem.extend_from_slice(&read_file(key)?);
        let id = reqwest::Identity::from_pem(&pem)
            .map_err(|e| ExportError::Setup(format!("client certificate: {e}")))?;
        builder = builder.identity(id);
    }
    builder
        .build()
        .map_err(|e| ExportError::Setup(e.to_string()))
}

fn delivered(response: ExportMetricsServiceResponse) -> Outcome {
    let (rejected, message) = response.partial_success.map_or((0, String::new()), |p| {
        (p.rejected_data_points, p.error_message)
    });
    Outcome::Delivered { rejected, message }
}

/// What an OTLP/gRPC status means for the reading.
pub fn grpc_outcome(status: &tonic::Status) -> Outcome {
    use tonic::Code;
    let reason = format!("{:?}: {}", status.code(), status.message());
    let after = retry_info(status);
    match status.code() {
        // The specification's retryable codes; RESOURCE_EXHAUSTED only when the server says
        // it will recover (RetryInfo).
        Code::Unavailable
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::DataLoss => Outcome::Retry { after, reason },
        Code::ResourceExhausted if after.is_some() => Outcome::Retry { after, reason },
        // Not the server refusing the reading but the way to it being wrong (a token, a
        // URL, a proxy that ends the stream without a status, which tonic reads as UNKNOWN):
        // the operator fixes it and the queue is still there.
        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented | Code::Unknown => {
            Outcome::Retry { after, reason }
        }
        _ => Outcome::Refused { reason },
    }
}

/// The `google.rpc.RetryInfo` delay in a status's details, if any.
fn retry_info(status: &tonic::Status) -> Option<Duration> {
    let details = RpcStatus::decode(status.details()).ok()?;
    details.details.iter().find_map(|any| {
        if !any.type_url.ends_with("google.rpc.RetryInfo") {
            return None;
        }
        // RetryInfo { Duration retry_delay = 1; } with Duration { int64 seconds = 1; int32 nanos = 2; }
        let info = RetryInfo::decode(any.value.as_slice()).ok()?;
        let delay = info.retry_delay?;
        Some(
            Duration::new(delay.seconds.max(0) as u64, delay.nanos.max(0) as u32)
                .min(MAX_RETRY_AFTER),
        )
    })
}

/// `google.rpc.Status` with its `details` (the shared proto leaves them out).
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(repeated, message, tag = "3")]
    details: Vec<ProtoAny>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// What an OTLP/HTTP answer means for the reading.
pub fn http_outcome(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Outcome {
    match status {
        200..=299 => delivered(ExportMetricsServiceResponse::decode(body).unwrap_or_default()),
        429 | 502 | 503 | 504 => Outcome::Retry {
            after: retry_after,
            reason: format!("HTTP {status}"),
        },
        // The way to the server is wrong (token, URL, a proxy's method filter), not the
        // reading: held for the operator to fix, as for gRPC.
        401 | 403 | 404 | 405 => Outcome::Retry {
            after: retry_after,
            reason: format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(256)])
            ),
        },
        _ => {
            let message = secumon_proto::google_rpc::Status::decode(body)
                .map(|s| s.message)
                .unwrap_or_else(|_| {
                    String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned()
                });
            Outcome::Refused {
                reason: format!("HTTP {status}: {message}"),
            }
        }
    }
}

/// The wait before retry number `attempt` (0 first): doubling from `initial` up to `max`,
/// each drawn uniformly from its upper half, so agents that failed together spread out.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let ceiling = initial
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let mut random = [0u8; 4];
    let _ = getrandom::getrandom(&mut random);
    let fraction = 0.5 + 0.5 * (u32::from_le_bytes(random) as f64 / u32::MAX as f64);
    ceiling.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_path_is_added_only_when_missing() {
        assert_eq!(
            http_metrics_url("http://h:4318"),
            "http://h:4318/v1/metrics"
        );
        assert_eq!(
            http_metrics_url("http://h:4318/"),
            "http://h:4318/v1/metrics"
        );
        assert_eq!(
            http_metrics_url("https://h/otlp/v1/metrics"),
            "https://h/otlp/v1/metrics"
        );
    }

    #[test]
    fn answers_are_sorted_as_the_otlp_specification_says() {
        assert!(matches!(
            http_outcome(200, None, b""),
            Outcome::Delivered { rejected: 0, .. }
        ));
        assert_eq!(
            http_outcome(503, Some(Duration::from_secs(7)), b""),
            Outcome::Retry {
                after: Some(Duration::from_secs(7)),
                reason: "HTTP 503".into()
            }
        );
        let retry = |o: &Outcome| matches!(o, Outcome::Retry { .. });
        let refused = |o: &Outcome| matches!(o, Outcome::Refused { .. });
        for (status, is_retry) in [
            (429, true),
            (502, true),
            (504, true),
            (401, true),
            (403, true),
            (404, true),
            (400, false),
            (413, false),
            (500, false),
        ] {
            let outcome = http_outcome(status, None, b"");
            assert!(
                if is_retry {
                    retry(&outcome)
                } else {
                    refused(&outcome)
                },
                "HTTP {status}: {outcome:?}"
            );
        }
        let partial = ExportMetricsServiceResponse {
            partial_success: Some(
                opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsPartialSuccess {
                    rejected_data_points: 3,
                    error_message: "3 too old".into(),
                },
            ),
        };
        assert_eq!(
            http_outcome(200, None, &partial.encode_to_vec()),
            Outcome::Delivered {
                rejected: 3,
                message: "3 too old".into()
            }
        );
        use tonic::{Code, Status};
        for (code, is_retry) in [
            (Code::Unavailable, true),
            (Code::DeadlineExceeded, true),
            (Code::Unauthenticated, true),
            (Code::Unknown, true),
            (Code::ResourceExhausted, false),
            (Code::InvalidArgument, false),
            (Code::FailedPrecondition, false),
        ] {
            let outcome = grpc_outcome(&Status::new(code, "x"));
            assert!(
                if is_retry {
                    retry(&outcome)
                } else {
                    refused(&outcome)
                },
                "{code:?}: {outcome:?}"
            );
        }
        // RESOURCE_EXHAUSTED with RetryInfo: retried after the server's delay.
        let info = RetryInfo {
            retry_delay: Some(ProtoDuration {
                seconds: 3,
                nanos: 0,
            }),
        };
        let details = RpcStatus {
            details: vec![ProtoAny {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                value: info.encode_to_vec(),
            }],
        };
        let status = Status::with_details(
            Code::ResourceExhausted,
            "slow down",
            details.encode_to_vec().into(),
        );
        assert_eq!(
            grpc_outcome(&status),
            Outcome::Retry {
                after: Some(Duration::from_secs(3)),
                reason: "ResourceExhausted: slow down".into()
            }
        );
    }

    /// A one-shot HTTP server on loopback answering 200 with `body_len` bytes; its URL.
    fn serve_once(body_len: usize) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\nConnection: close\r\n\r\n"
            );
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = body_len;
            while left > 0 {
                let n = left.min(chunk.len());
                if stream.write_all(&chunk[..n]).is_err() {
                    break; // the client stopped reading: what the limit is for
                }
                left -= n;
            }
        });
        url
    }

    #[tokio::test]
    async fn answers_are_read_only_up_to_the_limit() {
        let client = reqwest::Client::new();
        let small = client.get(serve_once(1000)).send().await.unwrap();
        assert_eq!(
            read_limited(small, MAX_ANSWER_BYTES).await.unwrap().len(),
            1000
        );
        let huge = client.get(serve_once(64 << 20)).send().await.unwrap();
        let error = read_limited(huge, MAX_ANSWER_BYTES).await.unwrap_err();
        assert!(error.contains("over 1048576 bytes"), "{error}");
    }

    #[test]
    fn queued_readings_decompress_and_raw_ones_pass() {
        assert_eq!(gunzip(&gzip(b"reading")).unwrap(), b"reading");
        assert_eq!(gunzip(b"\x0a\x02raw").unwrap(), b"\x0a\x02raw");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(30));
        for attempt in 0..10 {
            let ceiling = Duration::from_secs(1 << attempt).min(max);
            let wait = backoff(attempt, initial, max);
            assert!(
                wait <= ceiling && wait >= ceiling / 2,
                "attempt {attempt}: {wait:?}"
            );
        }
        assert!(backoff(1000, initial, max) <= max);
    }
}
