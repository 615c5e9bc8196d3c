//! Building remote-write request bodies for tests.

use prost::Message;
use secumon_proto::prometheus::{Label, MetricMetadata, Sample, TimeSeries, WriteRequest};

pub fn series(labels: &[(&str, &str)], samples: &[(i64, f64)]) -> TimeSeries {
    TimeSeries {
        labels: labels
            .iter()
            .map(|(name, value)| Label {
                name: name.to_string(),
                value: value.to_string(),
            })
            .collect(),
        samples: samples
            .iter()
            .map(|&(timestamp, value)| Sample { value, timestamp })
            .collect(),
        ..Default::default()
    }
}

pub fn request(timeseries: Vec<TimeSeries>, metadata: Vec<MetricMetadata>) -> WriteRequest {
    WriteRequest {
        timeseries,
        metadata,
    }
}

/// Protobuf-encodes and snappy-compresses (block format), as remote-write senders do.
pub fn encode(request: &WriteRequest) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(&request.encode_to_vec())
        .expect("snappy")
}
