//! OTLP points to Prometheus series (prometheus v2.53 storage/remote/otlptranslator:
//! prometheusremotewrite/helper.go, number_data_points.go, histograms.go), with SecuMon's
//! additions documented in docs/otlp.md: per-point refusal with reasons instead of dropping or
//! failing the whole request, exponential histograms as classic buckets, metadata kept.

use super::naming::{label_name, metric_name, unit_word, NameKind};
use super::DecodeError;
use super::OtlpConfig;
use crate::ingest::{Batch, RequestLimits};
use crate::model::{
    Exemplar, Label, LabelError, Labels, MetricMetadata, MetricType, Sample, STALE_NAN_BITS,
};
use crate::storage::{ExemplarWrite, SeriesWrite, WriteBatch};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, ExponentialHistogramDataPoint,
    HistogramDataPoint, Metric, NumberDataPoint, SummaryDataPoint,
};
use std::collections::HashMap;

const SERVICE_NAME: &str = "service.name";
const SERVICE_NAMESPACE: &str = "service.namespace";
const SERVICE_INSTANCE_ID: &str = "service.instance.id";
/// `DataPointFlags.FLAG_NO_RECORDED_VALUE_MASK`: the point marks the series stale.
const FLAG_NO_RECORDED_VALUE: u32 = 1;

/// Label sets already built, by a hash of everything they are built from (resource identity,
/// series name, extra label, raw attributes in the order sent). Exporters send the same series
/// with every export; normalizing and validating their attributes once saves most of the
/// translation's cost. Bounded: emptied when full. The hash is seeded at random per process,
/// so no client can craft attributes whose key collides with another series' (another
/// tenant's, maybe) and be given its labels.
pub struct LabelCache {
    capacity: usize,
    seed: u64,
    map: std::sync::RwLock<HashMap<u128, Labels>>,
}

impl LabelCache {
    pub fn new(capacity: usize) -> Self {
        let mut seed = [0u8; 8];
        // Without randomness the fixed seed is still correct, only predictable.
        let _ = getrandom::getrandom(&mut seed);
        Self {
            capacity,
            seed: u64::from_le_bytes(seed),
            map: std::sync::RwLock::new(HashMap::new()),
        }
    }

    fn get(&self, key: u128) -> Option<Labels> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
    }

    fn insert(&self, key: u128, labels: Labels) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(key, labels);
    }
}

impl Default for LabelCache {
    fn default() -> Self {
        Self::new(1_000_000)
    }
}

/// Label keys are already uniform hashes: a map of them needs no hashing of its own.
#[derive(Default, Clone, Copy)]
struct BuildKeyHasher;

#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.0 ^= value as u64;
    }
}

impl std::hash::BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

/// Collects series (merging repeats by labels) and refusals.
struct Builder<'a> {
    config: &'a OtlpConfig,
    limits: &'a RequestLimits,
    cache: &'a LabelCache,
    /// Series of this batch by label key.
    index: HashMap<u128, usize, BuildKeyHasher>,
    /// Series of this batch, filled point by point; the batch takes them at the end.
    series: Vec<SeriesWrite>,
    batch: Batch,
}

impl Builder<'_> {
    /// The batch index of a point's series, created on first sight. Labels come from the
    /// request-local index, else the cache, else are built (and cached).
    fn series_for(
        &mut self,
        resource: &ResourceLabels,
        attributes: &[KeyValue],
        name: &str,
        extra: Option<(&str, String)>,
    ) -> Result<usize, LabelError> {
        let key = label_key(self.cache.seed, resource, attributes, name, &extra);
        if let Some(&i) = self.index.get(&key) {
            return Ok(i);
        }
        let labels = match self.cache.get(key) {
            Some(labels) => labels,
            None => {
                let labels = point_labels(self, resource, attributes, name, extra)?;
                self.cache.insert(key, labels.clone());
                labels
            }
        };
        let i = self.series.len();
        self.series.push(SeriesWrite {
            labels,
            samples: Vec::new(),
        });
        self.index.insert(key, i);
        Ok(i)
    }

    fn add_exemplars(&mut self, series: usize, mut exemplars: Vec<Exemplar>) {
        let limit = self.limits.max_exemplars_per_series;
        if exemplars.len() > limit {
            self.batch.dropped_exemplars += exemplars.len() - limit;
            exemplars.truncate(limit);
        }
        if !exemplars.is_empty() {
            self.batch.exemplars.push(ExemplarWrite {
                series: self.series[series].labels.clone(),
                exemplars,
            });
        }
    }

    fn push(&mut self, series: usize, sample: Sample) {
        if let Some(reason) = self.limits.refuse_time(sample.t) {
            let limits = self.limits;
            self.batch
                .reject(reason, 1, || limits.time_message(reason, sample.t));
            return;
        }
        self.series[series].samples.push(sample);
    }

    fn reject(&mut self, reason: &'static str, points: usize, message: impl FnOnce() -> String) {
        if points > 0 {
            self.batch.reject(reason, points, message);
        }
    }

    fn labels(&self, labels: Vec<Label>) -> Result<Labels, LabelError> {
        self.limits.labels.check_labels(&labels)?;
        if self.config.translate_names {
            Labels::from_wire(labels)
        } else {
            Labels::from_wire_utf8(labels)
        }
    }

    fn label_key(&self, key: &str) -> String {
        if self.config.translate_names {
            label_name(key)
        } else {
            key.to_owned()
        }
    }
}

/// An attribute value as text (pdata `Value.AsString`).
fn value_string(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => es6_number(*d),
        Some(any_value::Value::BytesValue(b)) => base64(b),
        Some(any_value::Value::StringValueStrindex(i)) => i.to_string(),
        Some(other) => json_value(other).to_string(),
    }
}

fn json_value(value: &any_value::Value) -> serde_json::Value {
    match value {
        any_value::Value::StringValue(s) => s.clone().into(),
        any_value::Value::BoolValue(b) => (*b).into(),
        any_value::Value::IntValue(i) => (*i).into(),
        any_value::Value::DoubleValue(d) => {
            serde_json::Number::from_f64(*d).map_or(serde_json::Value::Null, Into::into)
        }
        any_value::Value::BytesValue(b) => base64(b).into(),
        any_value::Value::StringValueStrindex(i) => (*i).into(),
        any_value::Value::ArrayValue(a) => a
            .values
            .iter()
            .map(|v| v.value.as_ref().map_or(serde_json::Value::Null, json_value))
            .collect(),
        any_value::Value::KvlistValue(kv) => kv
            .values
            .iter()
            .map(|kv| {
                let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
                (
                    kv.key.clone(),
                    v.map_or(serde_json::Value::Null, json_value),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

/// ECMAScript number formatting, as pdata prints doubles.
fn es6_number(v: f64) -> String {
    let abs = v.abs();
    if abs != 0.0 && (!(1e-6..1e21).contains(&abs)) && v.is_finite() {
        let s = format!("{v:e}");
        match s.split_once('e') {
            Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e}"),
            _ => s,
        }
    } else {
        format!("{v}")
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What every series of one resource shares: `job`, `instance` and promoted attributes.
struct ResourceLabels {
    job: Option<String>,
    instance: Option<String>,
    promoted: Vec<(String, String)>,
}

fn find<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a KeyValue> {
    attributes.iter().find(|kv| kv.key == key)
}

impl ResourceLabels {
    fn new(attributes: &[KeyValue], builder: &Builder) -> ResourceLabels {
        let name = find(attributes, SERVICE_NAME).map(|kv| value_string(&kv.value));
        let namespace = find(attributes, SERVICE_NAMESPACE).map(|kv| value_string(&kv.value));
        let job = name.map(|name| match namespace {
            Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
            _ => name,
        });
        let instance = find(attributes, SERVICE_INSTANCE_ID).map(|kv| value_string(&kv.value));
        let mut promoted: Vec<(String, String)> = builder
            .config
            .promote_resource_attributes
            .iter()
            .filter_map(|key| {
                find(attributes, key).map(|kv| (key.clone(), value_string(&kv.value)))
            })
            .collect();
        promoted.sort_by(|a, b| a.0.cmp(&b.0));
        ResourceLabels {
            job,
            instance,
            promoted,
        }
    }
}

/// The cache key of a point's labels.
fn label_key(
    seed: u64,
    resource: &ResourceLabels,
    attributes: &[KeyValue],
    name: &str,
    extra: &Option<(&str, String)>,
) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::with_seed(seed);
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(name.as_bytes());
    if let Some((k, v)) = extra {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    field(resource.job.as_deref().unwrap_or("\u{0}").as_bytes());
    field(resource.instance.as_deref().unwrap_or("\u{0}").as_bytes());
    for (k, v) in &resource.promoted {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    for kv in attributes {
        field(kv.key.as_bytes());
        // Encoded form of the value: tells types and contents apart.
        field(
            &kv.value
                .as_ref()
                .map(prost::Message::encode_to_vec)
                .unwrap_or_default(),
        );
    }
    h.digest128()
}

/// A point's labels (helper.go `createAttributes`): attributes sorted by key, normalized, values
/// of colliding names joined with `;`; promoted resource attributes where absent; `job` and
/// `instance` from the resource, overriding; then `extra` (e.g. `le`) and `__name__`.
fn point_labels(
    builder: &Builder<'_>,
    resource: &ResourceLabels,
    attributes: &[KeyValue],
    name: &str,
    extra: Option<(&str, String)>,
) -> Result<Labels, LabelError> {
    let mut sorted: Vec<&KeyValue> = attributes.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut labels: Vec<Label> = Vec::with_capacity(sorted.len() + 4);
    for kv in sorted {
        let key = builder.label_key(&kv.key);
        let value = value_string(&kv.value);
        match labels.iter_mut().find(|l| l.name == key) {
            Some(existing) => {
                existing.value.push(';');
                existing.value.push_str(&value);
            }
            None => labels.push(Label::new(key, value)),
        }
    }
    for (key, value) in &resource.promoted {
        let key = builder.label_key(key);
        if !labels.iter().any(|l| l.name == key) {
            labels.push(Label::new(key, value.clone()));
        }
    }
    for (key, value) in [("job", &resource.job), ("instance", &resource.instance)] {
        if let Some(value) = value {
            labels.retain(|l| l.name != key);
            labels.push(Label::new(key, value.clone()));
        }
    }
    // `le` and `quantile` may not also be attributes: Prometheus would store a duplicate label.
    if let Some((key, value)) = extra {
        labels.push(Label::new(key, value));
    }
    labels.retain(|l| l.name != crate::model::METRIC_NAME_LABEL);
    labels.push(Label::new(crate::model::METRIC_NAME_LABEL, name));
    builder.labels(labels)
}

/// A point's time in ms, or why it has none.
fn timestamp_ms(time_unix_nano: u64) -> Result<i64, &'static str> {
    if time_unix_nano == 0 {
        return Err("missing_timestamp");
    }
    i64::try_from(time_unix_nano / 1_000_000).map_err(|_| "timestamp_out_of_range")
}

/// Go's `strconv.FormatFloat(f, 'f', -1, 64)` for `le` and `quantile` values.
fn format_bound(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn stale_or(flags: u32, value: f64) -> f64 {
    if flags & FLAG_NO_RECORDED_VALUE != 0 {
        f64::from_bits(STALE_NAN_BITS)
    } else {
        value
    }
}

/// Translates a whole request into a batch of series plus refused points, within `limits`;
/// a request of more points or series than they allow is refused whole.
pub fn to_batch(
    request: ExportMetricsServiceRequest,
    config: &OtlpConfig,
    cache: &LabelCache,
    limits: &RequestLimits,
) -> Result<Batch, DecodeError> {
    let points: usize = request
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(point_count)
        .sum();
    if points > limits.max_samples {
        return Err(DecodeError::TooManySamples {
            limit: limits.max_samples,
        });
    }
    let mut builder = Builder {
        config,
        limits,
        cache,
        index: HashMap::default(),
        series: Vec::new(),
        batch: Batch::default(),
    };
    for resource_metrics in &request.resource_metrics {
        let attributes: &[KeyValue] = resource_metrics
            .resource
            .as_ref()
            .map_or(&[], |r| r.attributes.as_slice());
        let resource = ResourceLabels::new(attributes, &builder);
        let mut latest_ns = 0u64;
        for scope in &resource_metrics.scope_metrics {
            for metric in &scope.metrics {
                latest_ns = latest_ns.max(latest_time(metric));
                translate_metric(&mut builder, &resource, metric);
            }
        }
        target_info(&mut builder, &resource, attributes, latest_ns);
    }
    // A point refused half-way (histogram, summary) may leave series without samples.
    builder.series.retain(|s| !s.samples.is_empty());
    if builder.series.len() > limits.max_series {
        return Err(DecodeError::TooManySeries {
            limit: limits.max_series,
        });
    }
    builder.batch.series = WriteBatch::from_series(&builder.series);
    Ok(builder.batch)
}

/// Data points of one metric, whatever its kind.
fn point_count(metric: &Metric) -> usize {
    match &metric.data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }
}

fn latest_time(metric: &Metric) -> u64 {
    match &metric.data {
        Some(Data::Gauge(g)) => g.data_points.iter().map(|p| p.time_unix_nano).max(),
        Some(Data::Sum(s)) => s.data_points.iter().map(|p| p.time_unix_nano).max(),
        Some(Data::Histogram(h)) => h.data_points.iter().map(|p| p.time_unix_nano).max(),
        Some(Data::ExponentialHistogram(h)) => h.data_points.iter().map(|p| p.time_unix_nano).max(),
        Some(Data::Summary(s)) => s.data_points.iter().map(|p| p.time_unix_nano).max(),
        None => None,
    }
    .unwrap_or(0)
}

/// `target_info`: the resource's other attributes, value 1 at the resource's latest point time,
/// when the resource has such attributes and a `job` or `instance` (helper.go
/// `addResourceTargetInfo`).
fn target_info(
    builder: &mut Builder,
    resource: &ResourceLabels,
    attributes: &[KeyValue],
    latest_ns: u64,
) {
    let others: Vec<KeyValue> = attributes
        .iter()
        .filter(|kv| {
            ![SERVICE_NAME, SERVICE_NAMESPACE, SERVICE_INSTANCE_ID].contains(&kv.key.as_str())
        })
        .cloned()
        .collect();
    if latest_ns == 0
        || others.is_empty()
        || (resource.job.is_none() && resource.instance.is_none())
    {
        return;
    }
    let Ok(t) = timestamp_ms(latest_ns) else {
        return;
    };
    match builder.series_for(resource, &others, "target_info", None) {
        Ok(series) => builder.push(series, Sample { t, v: 1.0 }),
        Err(e) => builder.reject(e.reason(), 1, || format!("target_info refused: {e}")),
    }
}

fn is_cumulative(temporality: i32) -> bool {
    temporality == AggregationTemporality::Cumulative as i32
}

fn translate_metric(builder: &mut Builder, resource: &ResourceLabels, metric: &Metric) {
    let translate = builder.config.translate_names;
    let name_for = |kind: NameKind| {
        if translate {
            metric_name(&metric.name, &metric.unit, kind)
        } else {
            metric.name.clone()
        }
    };
    let (family, metric_type) = match &metric.data {
        None => return,
        Some(Data::Gauge(gauge)) => {
            let name = name_for(NameKind::Gauge);
            for point in &gauge.data_points {
                number_point(builder, resource, &name, point, false);
            }
            (name, MetricType::Gauge)
        }
        Some(Data::Sum(sum)) => {
            let kind = if sum.is_monotonic {
                NameKind::Counter
            } else {
                NameKind::Other
            };
            let name = name_for(kind);
            let temporality = sum.aggregation_temporality;
            if !cumulative_points(
                builder,
                resource,
                &name,
                &sum.data_points,
                temporality,
                sum_point,
            ) {
                return;
            }
            let metric_type = if sum.is_monotonic {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            (name, metric_type)
        }
        Some(Data::Histogram(h)) => {
            let name = name_for(NameKind::Other);
            if !cumulative_points(
                builder,
                resource,
                &name,
                &h.data_points,
                h.aggregation_temporality,
                histogram_point,
            ) {
                return;
            }
            (name, MetricType::Histogram)
        }
        Some(Data::ExponentialHistogram(h)) => {
            let name = name_for(NameKind::Other);
            if !cumulative_points(
                builder,
                resource,
                &name,
                &h.data_points,
                h.aggregation_temporality,
                exponential_point,
            ) {
                return;
            }
            (name, MetricType::Histogram)
        }
        Some(Data::Summary(summary)) => {
            let name = name_for(NameKind::Other);
            for point in &summary.data_points {
                summary_point(builder, resource, &name, point);
            }
            (name, MetricType::Summary)
        }
    };
    builder.batch.metadata.push(MetricMetadata {
        metric_family_name: family,
        metric_type,
        help: metric.description.clone(),
        unit: unit_word(&metric.unit),
    });
}

/// Translates each point of a metric that must be cumulative, or refuses them all (false).
fn cumulative_points<P>(
    builder: &mut Builder,
    resource: &ResourceLabels,
    name: &str,
    points: &[P],
    temporality: i32,
    translate: fn(&mut Builder, &ResourceLabels, &str, &P),
) -> bool {
    if !cumulative_or_refuse(builder, name, points.len(), temporality) {
        return false;
    }
    for point in points {
        translate(builder, resource, name, point);
    }
    true
}

/// A sum's point: a number point whose exemplars are kept.
fn sum_point(
    builder: &mut Builder,
    resource: &ResourceLabels,
    name: &str,
    point: &NumberDataPoint,
) {
    number_point(builder, resource, name, point, true);
}

/// Whether points of this temporality can be stored; refuses them all with a reason if not.
fn cumulative_or_refuse(
    builder: &mut Builder,
    name: &str,
    points: usize,
    temporality: i32,
) -> bool {
    if is_cumulative(temporality) {
        return true;
    }
    let which = if temporality == AggregationTemporality::Delta as i32 {
        "delta"
    } else {
        "unspecified"
    };
    builder.reject("unsupported_temporality", points, || {
        format!("{name}: {which} temporality is not supported; export cumulative temporality")
    });
    false
}

/// The series of one point, or its refusal.
fn series_or_reject(
    builder: &mut Builder,
    resource: &ResourceLabels,
    attributes: &[KeyValue],
    name: &str,
    extra: Option<(&str, String)>,
) -> Option<usize> {
    match builder.series_for(resource, attributes, name, extra) {
        Ok(series) => Some(series),
        Err(e) => {
            builder.reject(e.reason(), 1, || format!("{name}: point refused: {e}"));
            None
        }
    }
}

fn time_or_reject(builder: &mut Builder, name: &str, time_unix_nano: u64) -> Option<i64> {
    match timestamp_ms(time_unix_nano) {
        Ok(t) => Some(t),
        Err(reason) => {
            builder.reject(reason, 1, || {
                format!("{name}: point refused: {}", reason.replace('_', " "))
            });
            None
        }
    }
}

fn number_point(
    builder: &mut Builder,
    resource: &ResourceLabels,
    name: &str,
    point: &NumberDataPoint,
    keep_exemplars: bool,
) {
    let Some(t) = time_or_reject(builder, name, point.time_unix_nano) else {
        return;
    };
    let value = match point.value {
        Some(number_data_point::Value::AsDouble(v)) => v,
        Some(number_data_point::Value::AsInt(v)) => v as f64,
        None if point.flags & FLAG_NO_RECORDED_VALUE != 0 => 0.0,
        None => {
            builder.reject("missing_value", 1, || {
                format!("{name}: point refused: no value")
            });
            return;
        }
    };
    let Some(series) = series_or_reject(builder, resource, &point.attributes, name, None) else {
        return;
    };
    builder.push(
        series,
        Sample {
            t,
            v: stale_or(point.flags, value),
        },
    );
    if keep_exemplars {
        let exemplars = point
            .exemplars
            .iter()
            .filter_map(|e| exemplar(e, t))
            .collect();
        builder.add_exemplars(series, exemplars);
    }
}

fn histogram_point(
    builder: &mut Builder,
    resource: &ResourceLabels,
    name: &str,
    point: &HistogramDataPoint,
) {
    let Some(t) = time_or_reject(builder, name, point.time_unix_nano) else {
        return;
    };
    let bounds = &point.explicit_bounds;
    let well_formed = bounds.iter().all(|b| b.is_finite())
        && bounds.windows(2).all(|w| w[0] < w[1])
        && (point.bucket_counts.is_empty() || point.bucket_counts.len() == bounds.len() + 1);
    if !well_formed {
        builder.reject(
            "invalid_histogram",
            1,
            || format!("{name}: point refused: bounds must be finite and increasing, with one more bucket count than bounds"),
        );
        return;
    }
    let mut series = Vec::with_capacity(bounds.len() + 3);
    let mut cumulative = 0u64;
    for (bound, count) in bounds.iter().zip(&point.bucket_counts) {
        cumulative += count;
        series.push((
            format!("{name}_bucket"),
            Some(("le", format_bound(*bound))),
            cumulative as f64,
        ));
    }
    series.push((
        format!("{name}_bucket"),
        Some(("le", "+Inf".to_owned())),
        point.count as f64,
    ));
    series.push((format!("{name}_count"), None, point.count as f64));
    if let Some(sum) = point.sum {
        series.push((format!("{name}_sum"), None, sum));
    }
    let Some(indices) = push_all(builder, resource, &point.attributes, point.flags, t, series)
    else {
        return;
    };
    // Each exemplar goes to the first bucket that holds its value (helper.go `addExemplars`).
    let mut by_bucket: Vec<Vec<Exemplar>> = vec![Vec::new(); bounds.len() + 1];
    for e in point.exemplars.iter().filter_map(|e| exemplar(e, t)) {
        if let Some(i) = bounds
            .iter()
            .position(|b| e.value <= *b)
            .or((!e.value.is_nan()).then_some(bounds.len()))
        {
            by_bucket[i].push(e);
        }
    }
    for (bucket, exemplars) in by_bucket.into_iter().enumerate() {
        builder.add_exemplars(indices[bucket], exemplars);
    }
}

/// An OTLP exemplar as Prometheus keeps it (helper.go `getPromExemplars`): `trace_id` and
/// `span_id` in hex, then the filtered attributes, these only while all labels stay within
/// Prometheus's 128-character exemplar label limit. Without a time it takes the point's.
fn exemplar(
    e: &opentelemetry_proto::tonic::metrics::v1::Exemplar,
    point_time: i64,
) -> Option<Exemplar> {
    use opentelemetry_proto::tonic::metrics::v1::exemplar::Value;
    const MAX_LABEL_RUNES: usize = 128;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut labels = Vec::new();
    if !e.trace_id.is_empty() {
        labels.push(Label::new("trace_id", hex(&e.trace_id)));
    }
    if !e.span_id.is_empty() {
        labels.push(Label::new("span_id", hex(&e.span_id)));
    }
    let attributes: Vec<Label> = e
        .filtered_attributes
        .iter()
        .map(|kv| Label::new(label_name(&kv.key), value_string(&kv.value)))
        .collect();
    let runes = |ls: &[Label]| {
        ls.iter()
            .map(|l| l.name.chars().count() + l.value.chars().count())
            .sum::<usize>()
    };
    if runes(&labels) + runes(&attributes) <= MAX_LABEL_RUNES {
        labels.extend(attributes);
    }
    let value = match e.value {
        Some(Value::AsDouble(v)) => v,
        Some(Value::AsInt(v)) => v as f64,
        None => return None,
    };
    let t = if e.time_unix_nano == 0 {
        point_time
    } else {
        timestamp_ms(e.time_unix_nano).ok()?
    };
    Some(Exemplar {
        labels: Labels::exemplar_labels(labels).ok()?,
        value,
        t,
    })
}

/// One series a point contributes: its name, an extra label (`le`, `quantile`), its value.
type PointSeries<'a> = (String, Option<(&'a str, String)>, f64);

/// Stores a point's series all or nothing: if any label set is refused, none is stored.
fn push_all(
    builder: &mut Builder,
    resource: &ResourceLabels,
    attributes: &[KeyValue],
    flags: u32,
    t: i64,
    series: Vec<PointSeries>,
) -> Option<Vec<usize>> {
    let mut ready = Vec::with_capacity(series.len());
    for (series_name, extra, value) in series {
        let index = series_or_reject(builder, resource, attributes, &series_name, extra)?;
        ready.push((index, value));
    }
    let indices = ready.iter().map(|(index, _)| *index).collect();
    for (index, value) in ready {
        builder.push(
            index,
            Sample {
                t,
                v: stale_or(flags, value),
            },
        );
    }
    Some(indices)
}

/// An exponential histogram becomes classic cumulative buckets whose `le` are the exponential
/// bucket boundaries (negative buckets, the zero bucket, positive buckets, `+Inf`), so that
/// `histogram_quantile` answers over it (docs/otlp.md).
fn exponential_point(
    builder: &mut Builder,
    resource: &ResourceLabels,
    name: &str,
    point: &ExponentialHistogramDataPoint,
) {
    let Some(t) = time_or_reject(builder, name, point.time_unix_nano) else {
        return;
    };
    if !(-10..=20).contains(&point.scale) || point.zero_threshold.is_nan() {
        builder.reject("invalid_histogram", 1, || {
            format!(
                "{name}: point refused: scale {} outside [-10, 20] or NaN zero threshold",
                point.scale
            )
        });
        return;
    }
    let base = 2f64.powf(2f64.powi(-point.scale));
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    if let Some(negative) = &point.negative {
        // Bucket i covers [-base^(i+1), -base^i): walk from the most negative.
        for (k, count) in negative.bucket_counts.iter().enumerate().rev() {
            let index = negative.offset as i64 + k as i64;
            buckets.push((-base.powf(index as f64), *count));
        }
    }
    buckets.push((point.zero_threshold, point.zero_count));
    if let Some(positive) = &point.positive {
        for (k, count) in positive.bucket_counts.iter().enumerate() {
            let index = positive.offset as i64 + k as i64;
            buckets.push((base.powf((index + 1) as f64), *count));
        }
    }
    let mut series = Vec::with_capacity(buckets.len() + 3);
    let mut cumulative = 0u64;
    for (bound, count) in buckets {
        cumulative += count;
        series.push((
            format!("{name}_bucket"),
            Some(("le", format_bound(bound))),
            cumulative as f64,
        ));
    }
    series.push((
        format!("{name}_bucket"),
        Some(("le", "+Inf".to_owned())),
        point.count as f64,
    ));
    series.push((format!("{name}_count"), None, point.count as f64));
    if let Some(sum) = point.sum {
        series.push((format!("{name}_sum"), None, sum));
    }
    let _ = push_all(builder, resource, &point.attributes, point.flags, t, series);
}

fn summary_point(
    builder: &mut Builder,
    resource: &ResourceLabels,
    name: &str,
    point: &SummaryDataPoint,
) {
    let Some(t) = time_or_reject(builder, name, point.time_unix_nano) else {
        return;
    };
    let mut series = Vec::with_capacity(point.quantile_values.len() + 2);
    for q in &point.quantile_values {
        series.push((
            name.to_owned(),
            Some(("quantile", format_bound(q.quantile))),
            q.value,
        ));
    }
    series.push((format!("{name}_sum"), None, point.sum));
    series.push((format!("{name}_count"), None, point.count as f64));
    let _ = push_all(builder, resource, &point.attributes, point.flags, t, series);
}

#[cfg(test)]
mod tests {
    //! Golden tests of the translation table: OTLP in, Prometheus series out.

    use super::*;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::{
        exponential_histogram_data_point::Buckets, summary_data_point::ValueAtQuantile,
        ExponentialHistogram, Gauge, Histogram, ResourceMetrics, ScopeMetrics, Sum, Summary,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    const T: u64 = 1_700_000_000_123_456_789;
    const T_MS: i64 = 1_700_000_000_123;

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn s(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.into())
    }

    fn request(resource: Vec<KeyValue>, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: resource,
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn metric(name: &str, unit: &str, data: Data) -> Metric {
        Metric {
            name: name.into(),
            description: format!("{name} help"),
            unit: unit.into(),
            data: Some(data),
            ..Default::default()
        }
    }

    fn number(attributes: Vec<KeyValue>, value: f64) -> NumberDataPoint {
        NumberDataPoint {
            attributes,
            time_unix_nano: T,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..Default::default()
        }
    }

    /// Every series as `name{labels} value` lines, sorted.
    fn lines(batch: &Batch) -> Vec<String> {
        let mut out: Vec<String> = batch
            .series
            .iter()
            .flat_map(|series| {
                series.samples.iter().map(move |p| {
                    assert_eq!(p.t, T_MS);
                    format!("{} {}", series.labels, p.v)
                })
            })
            .collect();
        out.sort();
        out
    }

    fn service() -> Vec<KeyValue> {
        vec![
            kv("service.name", s("shop")),
            kv("service.namespace", s("prod")),
            kv("service.instance.id", s("i-1")),
            kv("host.name", s("web-1")),
        ]
    }

    #[test]
    fn gauges_counters_and_target_info() {
        let batch = to_batch(
            request(
                service(),
                vec![
                    metric(
                        "system.cpu.utilization",
                        "1",
                        Data::Gauge(Gauge {
                            data_points: vec![number(
                                vec![
                                    kv("cpu", any_value::Value::IntValue(0)),
                                    kv("state", s("idle")),
                                ],
                                0.5,
                            )],
                        }),
                    ),
                    metric(
                        "http.server.requests",
                        "{request}",
                        Data::Sum(Sum {
                            data_points: vec![number(
                                vec![kv("http.method", s("GET")), kv("http_method", s("x"))],
                                7.0,
                            )],
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                        }),
                    ),
                    metric(
                        "queue.size",
                        "By",
                        Data::Sum(Sum {
                            data_points: vec![number(
                                vec![kv("0queue", s("a")), kv("_private", s("b"))],
                                3.0,
                            )],
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: false,
                        }),
                    ),
                ],
            ),
            &OtlpConfig::default(),
            &LabelCache::default(),
            &RequestLimits::NONE,
        )
        .unwrap();
        assert!(batch.rejections.is_empty(), "{:?}", batch.rejections);
        assert_eq!(
            lines(&batch),
            [
                r#"{__name__="http_server_requests_total", http_method="GET;x", instance="i-1", job="prod/shop"} 7"#,
                r#"{__name__="queue_size_bytes", instance="i-1", job="prod/shop", key_0queue="a", key_private="b"} 3"#,
                r#"{__name__="system_cpu_utilization_ratio", cpu="0", instance="i-1", job="prod/shop", state="idle"} 0.5"#,
                r#"{__name__="target_info", host_name="web-1", instance="i-1", job="prod/shop"} 1"#,
            ]
        );
        let types: Vec<_> = batch
            .metadata
            .iter()
            .map(|m| {
                (
                    m.metric_family_name.as_str(),
                    m.metric_type,
                    m.unit.as_str(),
                )
            })
            .collect();
        assert_eq!(
            types,
            [
                ("system_cpu_utilization_ratio", MetricType::Gauge, ""),
                ("http_server_requests_total", MetricType::Counter, ""),
                ("queue_size_bytes", MetricType::Gauge, "bytes"),
            ]
        );
        assert_eq!(batch.metadata[0].help, "system.cpu.utilization help");
    }

    #[test]
    fn histograms_and_summaries() {
        let histogram = HistogramDataPoint {
            time_unix_nano: T,
            count: 10,
            sum: Some(4.5),
            bucket_counts: vec![2, 3, 5],
            explicit_bounds: vec![0.1, 1.0],
            ..Default::default()
        };
        let summary = SummaryDataPoint {
            time_unix_nano: T,
            count: 4,
            sum: 2.0,
            quantile_values: vec![
                ValueAtQuantile {
                    quantile: 0.5,
                    value: 0.4,
                },
                ValueAtQuantile {
                    quantile: 0.99,
                    value: 0.9,
                },
            ],
            ..Default::default()
        };
        let batch = to_batch(
            request(
                vec![kv("service.name", s("api"))],
                vec![
                    metric(
                        "http.server.duration",
                        "s",
                        Data::Histogram(Histogram {
                            data_points: vec![histogram],
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        }),
                    ),
                    metric(
                        "rpc.latency",
                        "ms",
                        Data::Summary(Summary {
                            data_points: vec![summary],
                        }),
                    ),
                ],
            ),
            &OtlpConfig::default(),
            &LabelCache::default(),
            &RequestLimits::NONE,
        )
        .unwrap();
        assert_eq!(
            lines(&batch),
            [
                r#"{__name__="http_server_duration_seconds_bucket", job="api", le="+Inf"} 10"#,
                r#"{__name__="http_server_duration_seconds_bucket", job="api", le="0.1"} 2"#,
                r#"{__name__="http_server_duration_seconds_bucket", job="api", le="1"} 5"#,
                r#"{__name__="http_server_duration_seconds_count", job="api"} 10"#,
                r#"{__name__="http_server_duration_seconds_sum", job="api"} 4.5"#,
                r#"{__name__="rpc_latency_milliseconds", job="api", quantile="0.5"} 0.4"#,
                r#"{__name__="rpc_latency_milliseconds", job="api", quantile="0.99"} 0.9"#,
                r#"{__name__="rpc_latency_milliseconds_count", job="api"} 4"#,
                r#"{__name__="rpc_latency_milliseconds_sum", job="api"} 2"#,
            ]
        );
    }

    #[test]
    fn exponential_histograms_become_classic_buckets() {
        let point = ExponentialHistogramDataPoint {
            time_unix_nano: T,
            count: 7,
            sum: Some(10.0),
            scale: 0,
            zero_count: 1,
            positive: Some(Buckets {
                offset: 0,
                bucket_counts: vec![2, 3],
            }),
            negative: Some(Buckets {
                offset: 1,
                bucket_counts: vec![1],
            }),
            ..Default::default()
        };
        let batch = to_batch(
            request(
                vec![],
                vec![metric(
                    "size",
                    "By",
                    Data::ExponentialHistogram(ExponentialHistogram {
                        data_points: vec![point],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    }),
                )],
            ),
            &OtlpConfig::default(),
            &LabelCache::default(),
            &RequestLimits::NONE,
        )
        .unwrap();
        // Scale 0: base 2; positive bucket i covers (2^i, 2^(i+1)], negative i [-2^(i+1), -2^i).
        assert_eq!(
            lines(&batch),
            [
                r#"{__name__="size_bytes_bucket", le="+Inf"} 7"#,
                r#"{__name__="size_bytes_bucket", le="-2"} 1"#,
                r#"{__name__="size_bytes_bucket", le="0"} 2"#,
                r#"{__name__="size_bytes_bucket", le="2"} 4"#,
                r#"{__name__="size_bytes_bucket", le="4"} 7"#,
                r#"{__name__="size_bytes_count"} 7"#,
                r#"{__name__="size_bytes_sum"} 10"#,
            ]
        );
    }

    #[test]
    fn bad_points_are_refused_one_by_one() {
        let mut no_time = number(vec![], 1.0);
        no_time.time_unix_nano = 0;
        let mut no_value = number(vec![], 1.0);
        no_value.value = None;
        let stale = NumberDataPoint {
            flags: FLAG_NO_RECORDED_VALUE,
            ..number(vec![kv("k", s("stale"))], 5.0)
        };
        let bad_histogram = HistogramDataPoint {
            time_unix_nano: T,
            bucket_counts: vec![1, 2],
            explicit_bounds: vec![f64::NAN],
            ..Default::default()
        };
        let batch = to_batch(
            request(
                vec![],
                vec![
                    metric(
                        "g",
                        "",
                        Data::Gauge(Gauge {
                            data_points: vec![
                                number(vec![kv("ok", s("1"))], 1.0),
                                no_time,
                                no_value,
                                number(vec![kv("", s("x"))], 1.0),
                                number(vec![kv("名前", s("x"))], 1.0),
                                stale,
                            ],
                        }),
                    ),
                    metric(
                        "d",
                        "",
                        Data::Sum(Sum {
                            data_points: vec![number(vec![], 1.0), number(vec![], 2.0)],
                            aggregation_temporality: AggregationTemporality::Delta as i32,
                            is_monotonic: true,
                        }),
                    ),
                    metric(
                        "h",
                        "",
                        Data::Histogram(Histogram {
                            data_points: vec![bad_histogram],
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        }),
                    ),
                ],
            ),
            &OtlpConfig::default(),
            &LabelCache::default(),
            &RequestLimits::NONE,
        )
        .unwrap();
        let mut reasons: Vec<_> = batch
            .rejections
            .iter()
            .map(|r| (r.reason, r.samples))
            .collect();
        reasons.sort();
        assert_eq!(
            reasons,
            [
                ("invalid_histogram", 1),
                ("invalid_label_name", 2),
                ("missing_timestamp", 1),
                ("missing_value", 1),
                ("unsupported_temporality", 2),
            ]
        );
        assert_eq!(batch.series.len(), 2);
        let stale = batch
            .series
            .iter()
            .find(|s| s.labels.get("k") == Some("stale"))
            .unwrap();
        assert_eq!(stale.samples[0].v.to_bits(), STALE_NAN_BITS);
    }

    #[test]
    fn untranslated_names_keep_opentelemetry_spelling() {
        let config = OtlpConfig {
            translate_names: false,
            promote_resource_attributes: vec!["deployment.environment".into()],
        };
        let batch = to_batch(
            request(
                vec![
                    kv("service.name", s("api")),
                    kv("deployment.environment", s("prod")),
                ],
                vec![metric(
                    "http.server.requests",
                    "{request}",
                    Data::Gauge(Gauge {
                        data_points: vec![number(vec![kv("http.method", s("GET"))], 1.0)],
                    }),
                )],
            ),
            &config,
            &LabelCache::default(),
            &RequestLimits::NONE,
        )
        .unwrap();
        assert_eq!(
            lines(&batch)[0],
            r#"{__name__="http.server.requests", deployment.environment="prod", http.method="GET", job="api"} 1"#
        );
    }

    #[test]
    fn attribute_values_print_like_pdata() {
        assert_eq!(es6_number(1e-7), "1e-7");
        assert_eq!(es6_number(1e21), "1e+21");
        assert_eq!(es6_number(0.5), "0.5");
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"hi"), "aGk=");
        assert_eq!(base64(b"abc"), "YWJj");
    }
}
