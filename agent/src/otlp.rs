//! A reading as an OTLP `ExportMetricsServiceRequest`: one resource (the host and the agent),
//! one scope (the agent), every metric with its points at the reading's time.

use crate::collect::HostInfo;
use crate::names::{Kind, Metric, Value};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, Gauge, Metric as OtlpMetric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use std::time::{SystemTime, UNIX_EPOCH};

pub const SERVICE_NAME: &str = "secumon-agent";

/// The resource every reading carries: `service.name` and `service.instance.id` give each
/// series `job="secumon-agent"` and `instance="<agent id>"` after Prometheus's translation.
pub fn resource(host: &HostInfo, agent_id: &str) -> Vec<(&'static str, String)> {
    let mut attributes = vec![
        ("service.name", SERVICE_NAME.to_owned()),
        ("service.version", env!("CARGO_PKG_VERSION").to_owned()),
        ("host.name", host.hostname.clone()),
        ("host.arch", host.arch.to_owned()),
        ("os.type", "linux".to_owned()),
        ("os.description", host.os_name.clone()),
        ("os.version", host.os_version.clone()),
    ];
    if !agent_id.is_empty() {
        attributes.push(("service.instance.id", agent_id.to_owned()));
    }
    if !host.machine_id.is_empty() {
        attributes.push(("host.id", host.machine_id.clone()));
    }
    attributes
}

fn key_value(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The request for one reading taken at `time`.
pub fn request(
    resource: &[(&'static str, String)],
    time: SystemTime,
    metrics: &[Metric],
) -> ExportMetricsServiceRequest {
    let time_ns = unix_nanos(time);
    let metrics = metrics
        .iter()
        .map(|m| {
            let points: Vec<NumberDataPoint> = m
                .points
                .iter()
                .map(|p| NumberDataPoint {
                    attributes: p.attributes.iter().map(|(k, v)| key_value(k, v)).collect(),
                    start_time_unix_nano: p.start_time.map_or(0, |s| (s * 1e9) as u64),
                    time_unix_nano: time_ns,
                    value: Some(match p.value {
                        Value::Int(v) => number_data_point::Value::AsInt(v),
                        Value::Double(v) => number_data_point::Value::AsDouble(v),
                    }),
                    ..Default::default()
                })
                .collect();
            let data = match m.kind {
                Kind::Gauge => Data::Gauge(Gauge {
                    data_points: points,
                }),
                Kind::Counter | Kind::UpDownCounter => Data::Sum(Sum {
                    data_points: points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: m.kind == Kind::Counter,
                }),
            };
            OtlpMetric {
                name: m.name.clone(),
                description: m.description.to_owned(),
                unit: m.unit.to_owned(),
                data: Some(data),
                ..Default::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| key_value(k, v)).collect(),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: SERVICE_NAME.to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Metric;

    #[test]
    fn counters_are_cumulative_monotonic_sums_with_their_start() {
        let m = Metric::new("system.cpu.time", "", "s", Kind::Counter).double(
            crate::names::attrs([("cpu", "cpu0")]),
            1.5,
            Some(100.0),
        );
        let g = Metric::new("system.uptime", "", "s", Kind::Gauge).double(vec![], 7.0, None);
        let req = request(
            &[("service.name", "x".into())],
            UNIX_EPOCH + std::time::Duration::from_secs(200),
            &[m, g],
        );
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let Some(Data::Sum(sum)) = &metrics[0].data else {
            panic!("a sum")
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(sum.data_points[0].start_time_unix_nano, 100_000_000_000);
        assert_eq!(sum.data_points[0].time_unix_nano, 200_000_000_000);
        assert!(matches!(metrics[1].data, Some(Data::Gauge(_))));
    }
}
