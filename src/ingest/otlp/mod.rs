//! OTLP metrics: decoding (protobuf or JSON, optionally gzip) and translation into Prometheus
//! series as Prometheus's OTLP receiver names them (see `docs/otlp.md`).
//!
//! Points that cannot be stored are refused one by one with a reason (reported to the client
//! as OTLP partial success); the rest of the request is stored.

mod naming;
mod translate;

pub use translate::{to_batch, LabelCache};

use super::IngestConfig;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use std::io::Read;

/// Protocol name in `/metrics`.
pub const PROTOCOL: &str = "otlp";

/// How OTLP metrics become Prometheus series (`[otlp]` in the config file).
#[derive(Clone, Debug, serde::Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// OTLP resource attributes copied onto every series of the resource, comma-separated
    /// (Prometheus's `otlp.promote_resource_attributes`); the others are only in `target_info`.
    #[arg(
        id = "otlp.promote_resource_attributes",
        long = "otlp-promote-resource-attributes",
        env = "SECUMON_OTLP_PROMOTE_RESOURCE_ATTRIBUTES",
        value_delimiter = ','
    )]
    pub promote_resource_attributes: Vec<String>,
    /// Translate OTLP names to Prometheus conventions (units and type suffixes, `_` for
    /// invalid characters); false keeps OpenTelemetry's UTF-8 names.
    #[arg(
        id = "otlp.translate_names",
        long = "otlp-translate-names",
        env = "SECUMON_OTLP_TRANSLATE_NAMES",
        action = clap::ArgAction::Set,
        default_value_t = true
    )]
    pub translate_names: bool,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

/// Body encodings OTLP/HTTP defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    /// From a `Content-Type` (parameters ignored); `None` for anything else.
    pub fn from_content_type(content_type: &str) -> Option<Encoding> {
        match content_type.split(';').next().unwrap_or("").trim() {
            "application/x-protobuf" => Some(Encoding::Protobuf),
            "application/json" => Some(Encoding::Json),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("request body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("decompressed request body exceeds the limit of {limit} bytes")]
    DecompressedTooLarge { limit: usize },
    #[error("unsupported content encoding {0:?}: send gzip or no encoding")]
    UnsupportedEncoding(String),
    #[error("gzip: {0}")]
    Gzip(String),
    #[error("protobuf: {0}")]
    Protobuf(String),
    #[error("json: {0}")]
    Json(String),
    #[error("request has more than {limit} series (--ingest-max-series-per-request)")]
    TooManySeries { limit: usize },
    #[error("request has more than {limit} data points (--ingest-max-samples-per-request)")]
    TooManySamples { limit: usize },
}

impl DecodeError {
    /// Whether the request was refused for its size (HTTP 413, gRPC RESOURCE_EXHAUSTED).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            DecodeError::TooLarge { .. } | DecodeError::DecompressedTooLarge { .. }
        )
    }
}

/// Undoes `Content-Encoding`, enforcing the size limits before and after decompression.
pub fn decompress(
    body: &[u8],
    content_encoding: Option<&str>,
    config: &IngestConfig,
) -> Result<Vec<u8>, DecodeError> {
    if body.len() > config.max_request_bytes {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            limit: config.max_request_bytes,
        });
    }
    match content_encoding.map(str::trim).unwrap_or("") {
        "" | "identity" => Ok(body.to_vec()),
        "gzip" => gunzip(body, config.max_decompressed_bytes),
        other => Err(DecodeError::UnsupportedEncoding(other.to_owned())),
    }
}

/// Inflates gzip, refusing to produce more than `limit` bytes (a gzip bomb stops there).
pub fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Gzip(e.to_string()))?;
    if out.len() > limit {
        return Err(DecodeError::DecompressedTooLarge { limit });
    }
    Ok(out)
}

/// Decodes an uncompressed request body.
pub fn decode(body: &[u8], encoding: Encoding) -> Result<ExportMetricsServiceRequest, DecodeError> {
    match encoding {
        Encoding::Protobuf => ExportMetricsServiceRequest::decode(body)
            .map_err(|e| DecodeError::Protobuf(e.to_string())),
        Encoding::Json => decode_json(body),
    }
}

/// Stand-ins for the special floats OTLP/JSON spells as strings (`"NaN"`, `"Infinity"`,
/// `"-Infinity"`, the protobuf JSON mapping), which the generated serde code cannot read: they
/// are swapped for these values before decoding and swapped back after. Exact bit patterns
/// (tiny negative subnormals) that no real measurement carries.
const SPECIALS: [(&str, u64, f64); 3] = [
    ("NaN", 0x8000_0000_0000_0d1d, f64::NAN),
    ("Infinity", 0x8000_0000_0000_0d1e, f64::INFINITY),
    ("-Infinity", 0x8000_0000_0000_0d1f, f64::NEG_INFINITY),
];

/// Fields of OTLP metric messages that hold doubles.
const DOUBLE_FIELDS: [&str; 8] = [
    "asDouble",
    "sum",
    "min",
    "max",
    "value",
    "quantile",
    "zeroThreshold",
    "explicitBounds",
];

fn replace_specials(value: &mut serde_json::Value, in_double_field: bool) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                replace_specials(field, DOUBLE_FIELDS.contains(&key.as_str()));
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                replace_specials(item, in_double_field);
            }
        }
        serde_json::Value::String(s) if in_double_field => {
            if let Some((_, bits, _)) = SPECIALS.iter().find(|(name, _, _)| name == s) {
                if let Some(n) = serde_json::Number::from_f64(f64::from_bits(*bits)) {
                    *value = serde_json::Value::Number(n);
                }
            }
        }
        _ => {}
    }
}

fn restore(v: &mut f64) {
    if let Some((_, _, special)) = SPECIALS.iter().find(|(_, bits, _)| v.to_bits() == *bits) {
        *v = *special;
    }
}

fn restore_opt(v: &mut Option<f64>) {
    if let Some(v) = v {
        restore(v)
    }
}

fn restore_specials(request: &mut ExportMetricsServiceRequest) {
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point::Value};
    let restore_number = |v: &mut Option<Value>| {
        if let Some(Value::AsDouble(v)) = v {
            restore(v)
        }
    };
    for rm in &mut request.resource_metrics {
        for sm in &mut rm.scope_metrics {
            for metric in &mut sm.metrics {
                match &mut metric.data {
                    Some(Data::Gauge(g)) => g
                        .data_points
                        .iter_mut()
                        .for_each(|p| restore_number(&mut p.value)),
                    Some(Data::Sum(s)) => s
                        .data_points
                        .iter_mut()
                        .for_each(|p| restore_number(&mut p.value)),
                    Some(Data::Histogram(h)) => h.data_points.iter_mut().for_each(|p| {
                        restore_opt(&mut p.sum);
                        restore_opt(&mut p.min);
                        restore_opt(&mut p.max);
                        p.explicit_bounds.iter_mut().for_each(restore);
                    }),
                    Some(Data::ExponentialHistogram(h)) => h.data_points.iter_mut().for_each(|p| {
                        restore_opt(&mut p.sum);
                        restore_opt(&mut p.min);
                        restore_opt(&mut p.max);
                        restore(&mut p.zero_threshold);
                    }),
                    Some(Data::Summary(s)) => s.data_points.iter_mut().for_each(|p| {
                        restore(&mut p.sum);
                        for q in &mut p.quantile_values {
                            restore(&mut q.quantile);
                            restore(&mut q.value);
                        }
                    }),
                    None => {}
                }
            }
        }
    }
}

fn decode_json(body: &[u8]) -> Result<ExportMetricsServiceRequest, DecodeError> {
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    replace_specials(&mut value, false);
    let mut request: ExportMetricsServiceRequest =
        serde_json::from_value(value).map_err(|e| DecodeError::Json(e.to_string()))?;
    restore_specials(&mut request);
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_bombs_stop_at_the_limit() {
        let bomb = gzip(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 64 * 1024);
        let config = IngestConfig {
            max_decompressed_bytes: 1 << 20,
            ..IngestConfig::default()
        };
        assert_eq!(
            decompress(&bomb, Some("gzip"), &config),
            Err(DecodeError::DecompressedTooLarge { limit: 1 << 20 })
        );
        assert_eq!(
            decompress(b"abc", Some("gzip"), &config)
                .unwrap_err()
                .to_string()
                .split(':')
                .next(),
            Some("gzip")
        );
        assert!(matches!(
            decompress(b"abc", Some("br"), &config),
            Err(DecodeError::UnsupportedEncoding(_))
        ));
    }

    #[test]
    fn decodes_json_and_protobuf() {
        let json = br#"{"resourceMetrics":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"shop"}}]},
            "scopeMetrics":[{"metrics":[{"name":"up","gauge":{"dataPoints":[{"timeUnixNano":"1700000000000000000","asDouble":1}]}}]}]}]}"#;
        let request = decode(json, Encoding::Json).unwrap();
        let bytes = request.encode_to_vec();
        assert_eq!(decode(&bytes, Encoding::Protobuf).unwrap(), request);
        assert!(matches!(
            decode(b"{\"resourceMetrics\": 5}", Encoding::Json),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode(b"\x0a\xff\xff\xff", Encoding::Protobuf),
            Err(DecodeError::Protobuf(_))
        ));
        assert_eq!(
            Encoding::from_content_type("application/json; charset=utf-8"),
            Some(Encoding::Json)
        );
        assert_eq!(Encoding::from_content_type("text/plain"), None);
        let special = br#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"g","gauge":{"dataPoints":[
            {"timeUnixNano":"1","asDouble":"NaN"},{"timeUnixNano":"1","asDouble":"-Infinity"},{"timeUnixNano":"1","asDouble":2.5}]}}]}]}]}"#;
        let request = decode(special, Encoding::Json).unwrap();
        let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Gauge(g)) =
            &request.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("not a gauge")
        };
        let values: Vec<String> = g
            .data_points
            .iter()
            .map(|p| format!("{:?}", p.value))
            .collect();
        assert_eq!(
            values,
            [
                "Some(AsDouble(NaN))",
                "Some(AsDouble(-inf))",
                "Some(AsDouble(2.5))"
            ]
        );
    }
}
