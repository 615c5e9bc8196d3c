//! Naming schemes: the metrics a collection becomes. `otel` gives the OpenTelemetry
//! Collector's hostmetrics receiver's names, units, instruments and attributes; `node` gives
//! node_exporter's names and labels. Both read the same [`HostFacts`]; neither reads the host.

mod node;
mod otel;

use crate::collect::HostFacts;
use crate::config::Naming;
use serde::Serialize;

/// One metric of a reading.
#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    pub name: String,
    pub description: &'static str,
    /// UCUM unit as OpenTelemetry writes it (`s`, `By`, `{packets}`, `1`); empty for
    /// node_exporter names, which already end in theirs.
    pub unit: &'static str,
    pub kind: Kind,
    pub points: Vec<Point>,
}

/// OpenTelemetry instrument the metric is sent as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A cumulative monotonic sum (a Prometheus counter).
    Counter,
    /// A cumulative non-monotonic sum (a Prometheus gauge).
    UpDownCounter,
    Gauge,
}

#[derive(Clone, Debug, Serialize)]
pub struct Point {
    #[serde(serialize_with = "attributes_as_object")]
    pub attributes: Vec<(&'static str, String)>,
    pub value: Value,
    /// Unix seconds since which a counter counts (boot, or a process's start); `None` for
    /// gauges and when not known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Double(f64),
}

impl Metric {
    pub fn new(
        name: impl Into<String>,
        description: &'static str,
        unit: &'static str,
        kind: Kind,
    ) -> Metric {
        Metric {
            name: name.into(),
            description,
            unit,
            kind,
            points: Vec::new(),
        }
    }

    pub fn point(
        &mut self,
        attributes: Vec<(&'static str, String)>,
        value: Value,
        start_time: Option<f64>,
    ) {
        self.points.push(Point {
            attributes,
            value,
            start_time,
        });
    }

    /// A point of a double value (seconds, ratios, load).
    pub fn double(
        mut self,
        attributes: Vec<(&'static str, String)>,
        value: f64,
        start_time: Option<f64>,
    ) -> Metric {
        self.point(attributes, Value::Double(value), start_time);
        self
    }

    /// A point of an integer value (bytes, counts).
    pub fn int(
        mut self,
        attributes: Vec<(&'static str, String)>,
        value: u64,
        start_time: Option<f64>,
    ) -> Metric {
        self.point(
            attributes,
            Value::Int(i64::try_from(value).unwrap_or(i64::MAX)),
            start_time,
        );
        self
    }
}

/// The metrics a collection gives in the chosen naming. Metrics with no point are left out.
pub fn metrics(facts: &HostFacts, naming: Naming) -> Vec<Metric> {
    let mut metrics = match naming {
        Naming::Otel => otel::metrics(facts),
        Naming::NodeExporter => node::metrics(facts),
    };
    metrics.retain(|m| !m.points.is_empty());
    metrics
}

/// Attributes as a JSON object (`{"cpu": "cpu0"}`), as `--once` prints them.
fn attributes_as_object<S: serde::Serializer>(
    attributes: &[(&'static str, String)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(attributes.len()))?;
    for (k, v) in attributes {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// Attributes from `(key, value)` pairs.
pub(crate) fn attrs<const N: usize>(
    pairs: [(&'static str, &str); N],
) -> Vec<(&'static str, String)> {
    pairs.into_iter().map(|(k, v)| (k, v.to_owned())).collect()
}
