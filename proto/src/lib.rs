//! Protocol types SecuMon speaks on the wire, generated from our own `.proto` files.
//!
//! `prometheus` holds the Prometheus remote-write 1.0 messages (`WriteRequest` and friends);
//! `google_rpc` the `Status` message OTLP/HTTP error responses carry; `opamp` the OpAMP
//! messages agents and the server exchange.
//! OTLP types come from the `opentelemetry-proto` crate, not from here.

/// `google.rpc.Status`, the error body of OTLP/HTTP.
pub mod google_rpc {
    include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
}

/// OpAMP (`opamp.proto.AgentToServer`, `ServerToAgent` and what they carry), as the OpAMP
/// specification's wire format has them.
pub mod opamp {
    include!(concat!(env!("OUT_DIR"), "/opamp.proto.rs"));
}

/// Prometheus remote-write 1.0 (`prometheus.WriteRequest`).
pub mod prometheus {
    include!(concat!(env!("OUT_DIR"), "/prometheus.rs"));
}

#[cfg(test)]
mod tests {
    use super::prometheus::{Label, Sample, TimeSeries, WriteRequest};
    use prost::Message;

    #[test]
    fn write_request_round_trips() {
        let request = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![Label {
                    name: "__name__".into(),
                    value: "up".into(),
                }],
                samples: vec![Sample {
                    value: 1.0,
                    timestamp: 1_700_000_000_000,
                }],
                ..Default::default()
            }],
            metadata: vec![],
        };
        let bytes = request.encode_to_vec();
        assert_eq!(WriteRequest::decode(bytes.as_slice()).unwrap(), request);
    }
}
