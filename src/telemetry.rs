//! The server's own metrics (served on `/metrics` in the Prometheus text exposition format) and
//! log setup. Metric names follow Prometheus conventions with a `secumon_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub protocol: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub handler: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub kind: &'static str,
}

/// Every metric the server exports about itself.
pub struct Metrics {
    registry: Registry,
    pub samples_ingested: Family<ProtocolLabels, Counter>,
    pub samples_rejected: Family<RejectLabels, Counter>,
    pub http_requests: Family<RequestLabels, Counter>,
    pub query_duration: Family<QueryLabels, Histogram>,
    pub damaged_bytes_recovered: prometheus_client::metrics::gauge::Gauge,
}

/// Query latency buckets, 1 ms to ~1 min.
fn query_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("secumon");
        let samples_ingested = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "samples_ingested",
            "Samples stored, by ingest protocol",
            samples_ingested.clone(),
        );
        let samples_rejected = Family::<RejectLabels, Counter>::default();
        registry.register(
            "samples_rejected",
            "Samples refused, by ingest protocol and reason",
            samples_rejected.clone(),
        );
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status code",
            http_requests.clone(),
        );
        let query_duration = Family::<QueryLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(query_buckets())
        });
        registry.register(
            "query_duration_seconds",
            "PromQL evaluation latency, by query kind (instant, range)",
            query_duration.clone(),
        );
        let damaged_bytes_recovered = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "storage_damaged_bytes_recovered",
            "Bytes of damaged data (a torn write-ahead log tail) cut off when storage opened",
            damaged_bytes_recovered.clone(),
        );
        Metrics {
            registry,
            damaged_bytes_recovered,
            samples_ingested,
            samples_rejected,
            http_requests,
            query_duration,
        }
    }

    pub fn rejected(&self, protocol: &'static str, reason: &'static str, count: usize) {
        if count > 0 {
            self.samples_rejected
                .get_or_create(&RejectLabels { protocol, reason })
                .inc_by(count as u64);
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global `tracing` subscriber. `filter` uses `RUST_LOG` syntax.
pub fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
