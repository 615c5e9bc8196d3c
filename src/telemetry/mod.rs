//! The server's own metrics (served on `/metrics` in the Prometheus text exposition format) and
//! log setup. Metric names follow Prometheus conventions with a `secumon_` prefix.

pub mod process;
pub mod record;

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
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertmanagerLabels {
    pub alertmanager: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReceiverLabels {
    pub receiver: String,
    pub integration: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleGroupLabels {
    pub tenant: String,
    pub rule_group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResolutionLabels {
    pub resolution: &'static str,
}

/// Every metric the server exports about itself.
pub struct Metrics {
    registry: Registry,
    pub samples_ingested: Family<ProtocolLabels, Counter>,
    pub samples_rejected: Family<RejectLabels, Counter>,
    /// Exemplars dropped past the per-series limit of a request, by ingest protocol.
    pub exemplars_dropped: Family<ProtocolLabels, Counter>,
    /// Series with a sample in the last hour, by tenant, while `--ingest-max-series-per-tenant`
    /// is on.
    pub active_series: Family<TenantLabels, prometheus_client::metrics::gauge::Gauge>,
    pub http_requests: Family<RequestLabels, Counter>,
    /// Requests refused by authentication, by reason.
    pub auth_refused: Family<ReasonLabels, Counter>,
    pub query_duration: Family<QueryLabels, Histogram>,
    /// Queries and metadata reads refused by a limit, by which.
    pub queries_refused: Family<RefusedLabels, Counter>,
    pub query_rollup_selects: Family<ResolutionLabels, Counter>,
    pub damaged_bytes_recovered: prometheus_client::metrics::gauge::Gauge,
    /// Query answers sent with a warning (damaged data skipped).
    pub query_warnings: Counter,
    pub storage_series: prometheus_client::metrics::gauge::Gauge,
    storage_head_series_removed: prometheus_client::metrics::gauge::Gauge,
    storage_log_compactions: prometheus_client::metrics::gauge::Gauge,
    pub storage_blocks: prometheus_client::metrics::gauge::Gauge,
    pub storage_block_samples: prometheus_client::metrics::gauge::Gauge,
    storage_writer_hold_max:
        prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    pub storage_disk_bytes: Family<DiskLabels, prometheus_client::metrics::gauge::Gauge>,
    pub lifecycle: LifecycleMetrics,
    /// Live-feed WebSocket clients connected now.
    pub live_clients: prometheus_client::metrics::gauge::Gauge,
    /// Readings the live feed left out of watched agents' messages (`--fleet-live-max-series`).
    pub live_dropped_readings: Counter,
    pub rules: RuleMetrics,
    pub notifications_sent: Family<AlertmanagerLabels, Counter>,
    pub notification_errors: Family<AlertmanagerLabels, Counter>,
    pub notifications_dropped: Counter,
    pub notification_queue: prometheus_client::metrics::gauge::Gauge,
    pub receiver_notifications: Family<ReceiverLabels, Counter>,
    pub receiver_notifications_failed: Family<ReceiverLabels, Counter>,
    pub receiver_requests: Family<ReceiverLabels, Counter>,
    pub receiver_requests_failed: Family<ReceiverLabels, Counter>,
}

/// Rule evaluation, by group (`file;name`, Prometheus's `rule_group` label).
#[derive(Default)]
pub struct RuleMetrics {
    pub evaluations: Family<RuleGroupLabels, Counter>,
    pub failures: Family<RuleGroupLabels, Counter>,
    pub missed: Family<RuleGroupLabels, Counter>,
    pub last_duration: Family<
        RuleGroupLabels,
        prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    >,
    pub last_evaluation: Family<
        RuleGroupLabels,
        prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    >,
}

/// Progress of a lifecycle the server runs itself (plain PostgreSQL).
#[derive(Default)]
pub struct LifecycleMetrics {
    pub rollup_watermark: Family<RelationLabels, prometheus_client::metrics::gauge::Gauge>,
    pub rollup_rows_written: prometheus_client::metrics::gauge::Gauge,
    pub partitions_dropped: prometheus_client::metrics::gauge::Gauge,
    pub failures: prometheus_client::metrics::gauge::Gauge,
    pub runs: prometheus_client::metrics::gauge::Gauge,
}

impl LifecycleMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "rollup_watermark_seconds",
            "Every bucket of the rollup relation before this time is materialized (plain PostgreSQL)",
            self.rollup_watermark.clone(),
        );
        registry.register(
            "rollup_rows_written",
            "Rollup rows written by the lifecycle job since start",
            self.rollup_rows_written.clone(),
        );
        registry.register(
            "storage_partitions_dropped",
            "Partitions of samples dropped by raw retention since start",
            self.partitions_dropped.clone(),
        );
        registry.register(
            "storage_lifecycle_failures",
            "Lifecycle job runs that failed since start (each is retried at the next run)",
            self.failures.clone(),
        );
        registry.register(
            "storage_lifecycle_runs",
            "Lifecycle job runs completed since start",
            self.runs.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelationLabels {
    pub relation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiskLabels {
    pub kind: &'static str,
}

/// Query latency buckets, 1 ms to ~1 min.
fn query_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

impl Metrics {
    pub fn new() -> Metrics {
        // The process metrics keep their standard names; the server's own are `secumon_*`.
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("secumon");
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
        let exemplars_dropped = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "exemplars_dropped",
            "Exemplars dropped past --ingest-max-exemplars-per-series or with a series refused by --ingest-max-series-per-tenant, by ingest protocol",
            exemplars_dropped.clone(),
        );
        let active_series =
            Family::<TenantLabels, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "active_series",
            "Series that received a sample in the last hour, by tenant (counted while --ingest-max-series-per-tenant is not 0)",
            active_series.clone(),
        );
        let auth_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "auth_refused",
            "Requests refused by authentication, by reason (unauthenticated, forbidden, throttled, unavailable)",
            auth_refused.clone(),
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
        let queries_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "queries_refused",
            "Queries and metadata reads refused by a limit: too_many_samples (--query-max-samples), too_many_series (--query-max-series), timeout (--query-timeout-secs, waiting or running)",
            queries_refused.clone(),
        );
        for reason in ["too_many_samples", "too_many_series", "timeout"] {
            let _ = queries_refused.get_or_create(&RefusedLabels { reason });
        }
        let query_rollup_selects = Family::<ResolutionLabels, Counter>::default();
        registry.register(
            "query_rollup_selects",
            "Rollup reads by PromQL range functions answered from rollups, by resolution (5m, 1h)",
            query_rollup_selects.clone(),
        );
        // Both series exist from the start, so a first increase shows as one.
        for resolution in crate::storage::Resolution::ALL {
            let _ = query_rollup_selects.get_or_create(&ResolutionLabels {
                resolution: resolution.label(),
            });
        }
        let query_warnings = Counter::default();
        registry.register(
            "query_warnings",
            "Query answers sent with warnings: data the answer lacks (damaged block runs skipped)",
            query_warnings.clone(),
        );
        let damaged_bytes_recovered = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "storage_damaged_bytes_recovered",
            "Bytes of damaged data found in storage (a torn write-ahead log tail, damaged block files); the intact rest was recovered",
            damaged_bytes_recovered.clone(),
        );
        let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default;
        let (storage_series, storage_blocks, storage_block_samples) = (gauge(), gauge(), gauge());
        registry.register(
            "storage_series_in_memory",
            "Series the storage holds in memory",
            storage_series.clone(),
        );
        let storage_head_series_removed = gauge();
        registry.register(
            "storage_head_series_removed",
            "Series the embedded engine's head forgot since start (no sample left in memory; their labels live on in the blocks' indexes)",
            storage_head_series_removed.clone(),
        );
        let storage_log_compactions = gauge();
        registry.register(
            "storage_log_compactions",
            "Compactions of the embedded engine's write-ahead log since start (the head's samples written into a checkpoint, the segments before it deleted)",
            storage_log_compactions.clone(),
        );
        registry.register(
            "storage_blocks",
            "On-disk blocks of the embedded engine",
            storage_blocks.clone(),
        );
        registry.register(
            "storage_block_samples",
            "Raw samples in on-disk blocks of the embedded engine",
            storage_block_samples.clone(),
        );
        let storage_writer_hold_max =
            prometheus_client::metrics::gauge::Gauge::<f64, std::sync::atomic::AtomicU64>::default(
            );
        registry.register(
            "storage_maintenance_writer_hold_max_seconds",
            "Longest time writers waited for one step of the embedded engine's maintenance since start (a flush works in bounded batches)",
            storage_writer_hold_max.clone(),
        );
        let storage_disk_bytes =
            Family::<DiskLabels, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "storage_disk_bytes",
            "Bytes on disk by kind (chunks: raw samples in blocks, rollups, wal) of the embedded engine",
            storage_disk_bytes.clone(),
        );
        let live_clients = gauge();
        registry.register(
            "live_clients",
            "Live-feed WebSocket clients connected now (/ws/metrics, /ws/agents)",
            live_clients.clone(),
        );
        let live_dropped_readings = Counter::default();
        registry.register(
            "live_dropped_readings",
            "Readings the live feed left out of a watched agent's messages: that agent had more series than --fleet-live-max-series",
            live_dropped_readings.clone(),
        );
        let lifecycle = LifecycleMetrics::default();
        lifecycle.register(registry);
        let rules = RuleMetrics::default();
        registry.register(
            "rule_evaluations",
            "Rule evaluations, by group",
            rules.evaluations.clone(),
        );
        registry.register(
            "rule_evaluation_failures",
            "Rule evaluations that failed, by group (the rule's lastError on /api/v1/rules says why)",
            rules.failures.clone(),
        );
        registry.register(
            "rule_group_iterations_missed",
            "Group evaluations skipped because the one before ran past its slot, by group",
            rules.missed.clone(),
        );
        registry.register(
            "rule_group_last_duration_seconds",
            "How long the group's last evaluation took",
            rules.last_duration.clone(),
        );
        registry.register(
            "rule_group_last_evaluation_timestamp_seconds",
            "When the group was last evaluated",
            rules.last_evaluation.clone(),
        );
        let notifications_sent = Family::<AlertmanagerLabels, Counter>::default();
        registry.register(
            "notifications_sent",
            "Alerts an Alertmanager took, by Alertmanager",
            notifications_sent.clone(),
        );
        let notification_errors = Family::<AlertmanagerLabels, Counter>::default();
        registry.register(
            "notification_errors",
            "Batches of alerts an Alertmanager did not take, by Alertmanager",
            notification_errors.clone(),
        );
        let notifications_dropped = Counter::default();
        registry.register(
            "notifications_dropped",
            "Alerts dropped: the queue was full, or no Alertmanager took them after every attempt",
            notifications_dropped.clone(),
        );
        let notification_queue = gauge();
        registry.register(
            "notification_queue_length",
            "Alerts waiting to be sent",
            notification_queue.clone(),
        );
        let receiver_notifications = Family::<ReceiverLabels, Counter>::default();
        registry.register(
            "receiver_notifications",
            "Notifications of the built-in receivers (--alert-receivers), by receiver and integration (as alertmanager_notifications_total)",
            receiver_notifications.clone(),
        );
        let receiver_notifications_failed = Family::<ReceiverLabels, Counter>::default();
        registry.register(
            "receiver_notifications_failed",
            "Notifications that failed after every attempt, by receiver and integration",
            receiver_notifications_failed.clone(),
        );
        let receiver_requests = Family::<ReceiverLabels, Counter>::default();
        registry.register(
            "receiver_notification_requests",
            "Attempts at notifications, retries included, by receiver and integration",
            receiver_requests.clone(),
        );
        let receiver_requests_failed = Family::<ReceiverLabels, Counter>::default();
        registry.register(
            "receiver_notification_requests_failed",
            "Attempts at notifications that failed, by receiver and integration",
            receiver_requests_failed.clone(),
        );
        registry.register(
            "build",
            "The running build: 1, with its version (as prometheus_build_info)",
            prometheus_client::metrics::info::Info::new(vec![(
                "version",
                env!("CARGO_PKG_VERSION"),
            )]),
        );
        Metrics {
            rules,
            notifications_sent,
            notification_errors,
            notifications_dropped,
            notification_queue,
            receiver_notifications,
            receiver_notifications_failed,
            receiver_requests,
            receiver_requests_failed,
            live_clients,
            live_dropped_readings,
            lifecycle,
            registry: root,
            queries_refused,
            damaged_bytes_recovered,
            active_series,
            auth_refused,
            query_warnings,
            storage_series,
            storage_head_series_removed,
            storage_log_compactions,
            storage_blocks,
            storage_block_samples,
            storage_writer_hold_max,
            storage_disk_bytes,
            samples_ingested,
            samples_rejected,
            exemplars_dropped,
            http_requests,
            query_duration,
            query_rollup_selects,
        }
    }

    /// Counts one read of rollups by a query.
    pub fn rollup_select(&self, resolution: crate::storage::Resolution) {
        self.query_rollup_selects
            .get_or_create(&ResolutionLabels {
                resolution: resolution.label(),
            })
            .inc();
    }

    /// Publishes a storage's sizes and damage count.
    pub fn observe_storage(&self, storage: &dyn crate::storage::Storage) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.damaged_bytes_recovered
            .set(clamp(storage.damaged_bytes_recovered()));
        if let Some(stats) = storage.stats() {
            self.storage_series.set(clamp(stats.series_in_memory));
            self.storage_head_series_removed
                .set(clamp(stats.head_series_removed));
            self.storage_log_compactions
                .set(clamp(stats.log_compactions));
            self.storage_blocks.set(clamp(stats.blocks));
            self.storage_block_samples.set(clamp(stats.block_samples));
            self.storage_writer_hold_max
                .set(stats.maintenance_writer_hold_max.as_secs_f64());
            for (kind, bytes) in [
                ("chunks", stats.block_bytes),
                ("rollups", stats.rollup_bytes),
                ("wal", stats.wal_bytes),
            ] {
                self.storage_disk_bytes
                    .get_or_create(&DiskLabels { kind })
                    .set(clamp(bytes));
            }
            for (resolution, watermark) in &stats.rollup_watermarks {
                self.lifecycle
                    .rollup_watermark
                    .get_or_create(&RelationLabels {
                        relation: resolution.name(),
                    })
                    .set(watermark.div_euclid(1000));
            }
            let lifecycle = &self.lifecycle;
            lifecycle
                .rollup_rows_written
                .set(clamp(stats.rollup_rows_written));
            lifecycle
                .partitions_dropped
                .set(clamp(stats.partitions_dropped));
            lifecycle.failures.set(clamp(stats.lifecycle_failures));
            lifecycle.runs.set(clamp(stats.lifecycle_runs));
        }
    }

    /// Counts a query refused by a limit (other failures are not counted here).
    pub fn query_refused(&self, error: &crate::promql::QueryError) {
        use crate::promql::QueryError;
        let reason = match error {
            QueryError::TooManySamples => "too_many_samples",
            QueryError::TooManySeries(_) => "too_many_series",
            QueryError::Timeout(_) => "timeout",
            _ => return,
        };
        self.queries_refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
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
