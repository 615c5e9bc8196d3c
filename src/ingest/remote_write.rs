//! Prometheus remote-write 1.0: snappy (block format) over protobuf `prometheus.WriteRequest`.
//!
//! Decoding refuses what a retry cannot fix (a malformed body: HTTP 400, which remote-write
//! senders never retry). Validation is per series: a series with invalid labels is refused with
//! a reason while the other series of the same request are stored.

use super::{Batch, IngestConfig, Rejection};
use crate::model::{Exemplar, Label, Labels, MetricMetadata, MetricType, Sample};
use crate::storage::{ExemplarWrite, SeriesWrite};
use prost::Message;
use secumon_proto::prometheus::{metric_metadata, WriteRequest};
use std::collections::HashMap;

/// Protocol name in `/metrics`.
pub const PROTOCOL: &str = "remote_write";

/// Why a request body could not be read at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty request body")]
    Empty,
    #[error("request body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("snappy: corrupt input: {0}")]
    Snappy(String),
    #[error("snappy: decompressed size {size} exceeds the limit of {limit} bytes")]
    DecompressedTooLarge { size: usize, limit: usize },
    #[error("protobuf: {0}")]
    Protobuf(String),
    #[error("request contains no time series and no metadata")]
    NothingToWrite,
}

/// Decompresses and decodes a request body.
pub fn decode(body: &[u8], config: &IngestConfig) -> Result<WriteRequest, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::Empty);
    }
    if body.len() > config.max_request_bytes {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            limit: config.max_request_bytes,
        });
    }
    // The block format states its decompressed length up front: check it before allocating,
    // so a small bomb cannot make us reserve gigabytes.
    let size = snap::raw::decompress_len(body).map_err(|e| DecodeError::Snappy(e.to_string()))?;
    if size > config.max_decompressed_bytes {
        return Err(DecodeError::DecompressedTooLarge {
            size,
            limit: config.max_decompressed_bytes,
        });
    }
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| DecodeError::Snappy(e.to_string()))?;
    let request =
        WriteRequest::decode(raw.as_slice()).map_err(|e| DecodeError::Protobuf(e.to_string()))?;
    if request.timeseries.is_empty() && request.metadata.is_empty() {
        return Err(DecodeError::NothingToWrite);
    }
    Ok(request)
}

fn metric_type(t: i32) -> MetricType {
    match metric_metadata::MetricType::try_from(t) {
        Ok(metric_metadata::MetricType::Counter) => MetricType::Counter,
        Ok(metric_metadata::MetricType::Gauge) => MetricType::Gauge,
        Ok(metric_metadata::MetricType::Histogram) => MetricType::Histogram,
        Ok(metric_metadata::MetricType::Gaugehistogram) => MetricType::GaugeHistogram,
        Ok(metric_metadata::MetricType::Summary) => MetricType::Summary,
        Ok(metric_metadata::MetricType::Info) => MetricType::Info,
        Ok(metric_metadata::MetricType::Stateset) => MetricType::StateSet,
        Ok(metric_metadata::MetricType::Unknown) | Err(_) => MetricType::Unknown,
    }
}

/// Validates a decoded request into a batch. Series that appear twice in one request are
/// merged; samples keep their order (storage handles order and duplicates).
pub fn to_batch(request: WriteRequest) -> Batch {
    let mut batch = Batch::default();
    // Series of the batch by label fingerprint (checked equal on a hit): keying by the label
    // set itself copied every label string of every series once more.
    let mut index: HashMap<u128, usize> = HashMap::new();
    for series in request.timeseries {
        let sample_count = series.samples.len();
        if !series.histograms.is_empty() {
            let count = series.histograms.len();
            batch.rejections.push(Rejection {
                reason: "native_histogram_unsupported",
                samples: count,
                message: format!("{count} native histogram samples refused: native histograms are not supported yet"),
            });
        }
        let labels = series
            .labels
            .into_iter()
            .map(|l| Label::new(l.name, l.value))
            .collect();
        let labels = match Labels::from_wire(labels) {
            Ok(labels) => labels,
            Err(error) => {
                batch.rejections.push(Rejection {
                    reason: error.reason(),
                    samples: sample_count,
                    message: format!("series refused: {error}"),
                });
                continue;
            }
        };
        let exemplars: Vec<Exemplar> = series
            .exemplars
            .into_iter()
            .filter_map(|e| {
                let labels = e
                    .labels
                    .into_iter()
                    .map(|l| Label::new(l.name, l.value))
                    .collect();
                Some(Exemplar {
                    labels: Labels::exemplar_labels(labels).ok()?,
                    value: e.value,
                    t: e.timestamp,
                })
            })
            .collect();
        if !exemplars.is_empty() {
            batch.exemplars.push(ExemplarWrite {
                series: labels.clone(),
                exemplars,
            });
        }
        if sample_count == 0 {
            continue;
        }
        let samples = series.samples.iter().map(|s| Sample {
            t: s.timestamp,
            v: s.value,
        });
        let fingerprint = labels.fingerprint();
        match index.get(&fingerprint) {
            Some(&i) if batch.series[i].labels == labels => batch.series[i].samples.extend(samples),
            _ => {
                index.entry(fingerprint).or_insert(batch.series.len());
                batch.series.push(SeriesWrite {
                    labels,
                    samples: samples.collect(),
                });
            }
        }
    }
    batch.metadata = request
        .metadata
        .into_iter()
        .filter(|m| !m.metric_family_name.is_empty())
        .map(|m| MetricMetadata {
            metric_type: metric_type(m.r#type),
            metric_family_name: m.metric_family_name,
            help: m.help,
            unit: m.unit,
        })
        .collect();
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use secumon_proto::prometheus::{Label as PbLabel, Sample as PbSample, TimeSeries};

    fn series(labels: &[(&str, &str)], samples: &[(i64, f64)]) -> TimeSeries {
        TimeSeries {
            labels: labels
                .iter()
                .map(|(n, v)| PbLabel {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            samples: samples
                .iter()
                .map(|&(timestamp, value)| PbSample { value, timestamp })
                .collect(),
            ..Default::default()
        }
    }

    fn compress(request: &WriteRequest) -> Vec<u8> {
        snap::raw::Encoder::new()
            .compress_vec(&request.encode_to_vec())
            .unwrap()
    }

    #[test]
    fn decodes_a_valid_request() {
        let request = WriteRequest {
            timeseries: vec![series(&[("__name__", "up"), ("job", "a")], &[(1000, 1.0)])],
            metadata: vec![],
        };
        let decoded = decode(&compress(&request), &IngestConfig::default()).unwrap();
        assert_eq!(decoded, request);
    }

    #[test]
    fn refuses_malformed_bodies() {
        let config = IngestConfig::default();
        assert_eq!(decode(b"", &config), Err(DecodeError::Empty));
        assert!(matches!(
            decode(b"\xff\xff\xff\xff\xff\xff", &config),
            Err(DecodeError::Snappy(_))
        ));
        let garbage = snap::raw::Encoder::new()
            .compress_vec(b"\x0a\xff\xff\xff")
            .unwrap();
        assert!(matches!(
            decode(&garbage, &config),
            Err(DecodeError::Protobuf(_))
        ));
        let empty = compress(&WriteRequest::default());
        assert_eq!(decode(&empty, &config), Err(DecodeError::NothingToWrite));
    }

    #[test]
    fn refuses_a_snappy_bomb_before_inflating_it() {
        let config = IngestConfig {
            max_decompressed_bytes: 1024,
            ..IngestConfig::default()
        };
        let bomb = snap::raw::Encoder::new()
            .compress_vec(&vec![0u8; 1 << 20])
            .unwrap();
        assert!(bomb.len() < 64 * 1024);
        assert_eq!(
            decode(&bomb, &config),
            Err(DecodeError::DecompressedTooLarge {
                size: 1 << 20,
                limit: 1024
            })
        );
    }

    #[test]
    fn keeps_valid_series_and_reports_invalid_ones() {
        let request = WriteRequest {
            timeseries: vec![
                series(&[("job", "a"), ("__name__", "up")], &[(1, 1.0)]),
                series(
                    &[("__name__", "up"), ("a", "1"), ("a", "2")],
                    &[(1, 1.0), (2, 2.0)],
                ),
                series(&[("__name__", "up"), ("bad-name", "1")], &[(1, 1.0)]),
                series(&[("job", "a"), ("__name__", "up")], &[(2, 2.0)]),
            ],
            metadata: vec![],
        };
        let batch = to_batch(request);
        assert_eq!(batch.series.len(), 1, "the repeated series is merged");
        assert_eq!(batch.series[0].samples.len(), 2);
        assert_eq!(batch.series[0].labels.metric_name(), Some("up"));
        let reasons: Vec<_> = batch
            .rejections
            .iter()
            .map(|r| (r.reason, r.samples))
            .collect();
        assert_eq!(
            reasons,
            [("duplicate_label_name", 2), ("invalid_label_name", 1)]
        );
    }
}
