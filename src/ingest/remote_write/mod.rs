//! Prometheus remote-write 1.0: snappy (block format) over protobuf `prometheus.WriteRequest`.
//!
//! Decoding refuses what a retry cannot fix (a malformed body: HTTP 400, which remote-write
//! senders never retry). Validation is per series: a series with invalid labels is refused with
//! a reason while the other series of the same request are stored.
//!
//! The request is read straight from its protobuf bytes into a [`WriteBatch`] (as
//! VictoriaMetrics's `lib/prompb` does): label names and values are checked where they lie and
//! copied once into the batch's text, so a request costs a few allocations however many series
//! it carries. Generated decoders allocate a string per label name and value, which was most of
//! the allocator traffic of a loaded server. Exemplars, native histograms and metadata are rare
//! and still go through the generated types. One known difference from prost: groups nested in
//! unknown fields are limited to 100 levels per message, where prost counts the enclosing
//! messages too (it refuses two or three levels earlier); no sender writes groups.

use super::{Batch, IngestConfig, RequestLimits};
use crate::model::labels::validate_wire_pairs;
use crate::model::{Exemplar, Label, Labels, MetricMetadata, MetricType, Sample};
use crate::storage::{ExemplarWrite, WriteBatch};
use prost::Message;
use secumon_proto::prometheus::{self as pb, metric_metadata};
use wire::{expect, malformed, Reader, I64, LEN, VARINT};

mod wire;

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
    #[error("request has more than {limit} time series (--ingest-max-series-per-request)")]
    TooManySeries { limit: usize },
    #[error("request has more than {limit} samples (--ingest-max-samples-per-request)")]
    TooManySamples { limit: usize },
}

/// Decompresses, decodes and validates a request body into a batch, within `limits`.
pub fn decode(
    body: &[u8],
    config: &IngestConfig,
    limits: &RequestLimits,
) -> Result<Batch, DecodeError> {
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
    read_request(&raw, limits)
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

/// What one `TimeSeries` message holds, borrowed from the request; reused across series.
#[derive(Default)]
struct SeriesScratch<'a> {
    labels: Vec<(&'a str, &'a str)>,
    samples: Vec<Sample>,
    exemplars: Vec<pb::Exemplar>,
    /// Exemplars past the per-series limit, skipped undecoded.
    dropped_exemplars: usize,
    max_exemplars: usize,
    histograms: usize,
}

impl<'a> SeriesScratch<'a> {
    fn clear(&mut self) {
        self.labels.clear();
        self.samples.clear();
        self.exemplars.clear();
        self.dropped_exemplars = 0;
        self.histograms = 0;
    }

    /// Reads a `prometheus.TimeSeries` message.
    fn read(&mut self, mut r: Reader<'a>) -> Result<(), DecodeError> {
        self.clear();
        while !r.is_empty() {
            let (field, wire_type) = r.key()?;
            match field {
                1 => {
                    expect("TimeSeries", field, wire_type, LEN)?;
                    self.labels.push(read_label(Reader(r.bytes()?))?);
                }
                2 => {
                    expect("TimeSeries", field, wire_type, LEN)?;
                    self.samples.push(read_sample(Reader(r.bytes()?))?);
                }
                3 => {
                    expect("TimeSeries", field, wire_type, LEN)?;
                    let bytes = r.bytes()?;
                    if self.exemplars.len() >= self.max_exemplars {
                        self.dropped_exemplars += 1;
                        continue;
                    }
                    let exemplar =
                        pb::Exemplar::decode(bytes).map_err(|e| malformed(e.to_string()))?;
                    self.exemplars.push(exemplar);
                }
                4 => {
                    expect("TimeSeries", field, wire_type, LEN)?;
                    // Refused below; decoded only so that a malformed one fails the request
                    // as any malformed field does.
                    pb::Histogram::decode(r.bytes()?).map_err(|e| malformed(e.to_string()))?;
                    self.histograms += 1;
                }
                _ => r.skip(field, wire_type, 0)?,
            }
        }
        Ok(())
    }
}

/// Reads a `prometheus.Label` message: (name, value), "" when absent.
fn read_label(mut r: Reader<'_>) -> Result<(&str, &str), DecodeError> {
    let (mut name, mut value) = ("", "");
    while !r.is_empty() {
        let (field, wire_type) = r.key()?;
        match field {
            1 => {
                expect("Label", field, wire_type, LEN)?;
                name = r.string()?;
            }
            2 => {
                expect("Label", field, wire_type, LEN)?;
                value = r.string()?;
            }
            _ => r.skip(field, wire_type, 0)?,
        }
    }
    Ok((name, value))
}

/// Reads a `prometheus.Sample` message: value 0 and timestamp 0 when absent (proto3).
fn read_sample(mut r: Reader<'_>) -> Result<Sample, DecodeError> {
    let mut sample = Sample { t: 0, v: 0.0 };
    while !r.is_empty() {
        let (field, wire_type) = r.key()?;
        match field {
            1 => {
                expect("Sample", field, wire_type, I64)?;
                sample.v = r.double()?;
            }
            2 => {
                expect("Sample", field, wire_type, VARINT)?;
                sample.t = r.varint()? as i64;
            }
            _ => r.skip(field, wire_type, 0)?,
        }
    }
    Ok(sample)
}

/// Reads a `prometheus.WriteRequest` into a batch. A malformed message anywhere refuses the
/// whole request; a series with invalid labels is refused alone. A series repeated in one
/// request stays two entries of the batch (storage judges every sample the same either way).
fn read_request(raw: &[u8], limits: &RequestLimits) -> Result<Batch, DecodeError> {
    // A rough guess of what the request holds saves regrowing the buffers.
    let mut batch = Batch {
        series: WriteBatch::with_capacity(raw.len() / 128, raw.len() / 64),
        ..Batch::default()
    };
    let mut scratch = SeriesScratch {
        max_exemplars: limits.max_exemplars_per_series,
        ..SeriesScratch::default()
    };
    let (mut series, mut samples) = (0usize, 0usize);
    let mut r = Reader(raw);
    while !r.is_empty() {
        let (field, wire_type) = r.key()?;
        match field {
            1 => {
                expect("WriteRequest", field, wire_type, LEN)?;
                series += 1;
                if series > limits.max_series {
                    return Err(DecodeError::TooManySeries {
                        limit: limits.max_series,
                    });
                }
                scratch.read(Reader(r.bytes()?))?;
                samples += scratch.samples.len();
                if samples > limits.max_samples {
                    return Err(DecodeError::TooManySamples {
                        limit: limits.max_samples,
                    });
                }
                add_series(&mut batch, &mut scratch, limits);
            }
            3 => {
                expect("WriteRequest", field, wire_type, LEN)?;
                let m =
                    pb::MetricMetadata::decode(r.bytes()?).map_err(|e| malformed(e.to_string()))?;
                if !m.metric_family_name.is_empty() {
                    batch.metadata.push(MetricMetadata {
                        metric_type: metric_type(m.r#type),
                        metric_family_name: m.metric_family_name,
                        help: m.help,
                        unit: m.unit,
                    });
                }
            }
            _ => r.skip(field, wire_type, 0)?,
        }
    }
    // An empty request is a success with nothing to store, as Prometheus answers it.
    Ok(batch)
}

/// Validates one series read into `scratch` and adds it to the batch, or records why not.
fn add_series(batch: &mut Batch, scratch: &mut SeriesScratch<'_>, limits: &RequestLimits) {
    batch.dropped_exemplars += scratch.dropped_exemplars;
    let sample_count = scratch.samples.len();
    if scratch.histograms > 0 {
        let count = scratch.histograms;
        batch.reject("native_histogram_unsupported", count, || {
            format!(
                "{count} native histogram samples refused: native histograms are not supported yet"
            )
        });
    }
    if let Err(error) = limits
        .labels
        .check_pairs(&scratch.labels)
        .and_then(|()| validate_wire_pairs(&mut scratch.labels))
    {
        batch.reject(error.reason(), sample_count, || {
            format!("series refused: {error}")
        });
        return;
    }
    let exemplars: Vec<Exemplar> = scratch
        .exemplars
        .drain(..)
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
            series: Labels::from_trusted(
                scratch
                    .labels
                    .iter()
                    .map(|&(name, value)| Label::new(name, value))
                    .collect(),
            ),
            exemplars,
        });
    }
    // Times outside what storage keeps: before raw retention, or too far ahead.
    if scratch
        .samples
        .iter()
        .any(|s| limits.refuse_time(s.t).is_some())
    {
        scratch.samples.retain(|s| match limits.refuse_time(s.t) {
            None => true,
            Some(reason) => {
                batch.reject(reason, 1, || limits.time_message(reason, s.t));
                false
            }
        });
    }
    if !scratch.samples.is_empty() {
        batch
            .series
            .push(scratch.labels.iter().copied(), scratch.samples.drain(..));
    }
}

#[cfg(test)]
mod tests;
