//! Ingest: decodes what clients push, validates it at the edge, and hands storage batches of
//! valid series. It keeps whatever is valid in a request and reports the rest with reasons;
//! it never knows which backend stores the data.

pub mod active_series;
pub mod otlp;
pub mod rate;
pub mod remote_write;

use crate::model::{MetricMetadata, TenantId};
use crate::storage::{DynStorage, ExemplarWrite, StorageError, WriteBatch};
use crate::telemetry::Metrics;
use std::sync::Arc;

/// Limits on what one ingest request may carry.
#[derive(Clone, Debug, serde::Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Largest ingest request body as sent (compressed), in bytes; also the largest OTLP/gRPC
    /// message.
    #[arg(
        id = "ingest.max_request_bytes",
        long = "ingest-max-request-bytes",
        env = "SECUMON_INGEST_MAX_REQUEST_BYTES",
        default_value_t = 16 * 1024 * 1024
    )]
    pub max_request_bytes: usize,
    /// Largest ingest request body after decompression, in bytes (guards against compression
    /// bombs).
    #[arg(
        id = "ingest.max_decompressed_bytes",
        long = "ingest-max-decompressed-bytes",
        env = "SECUMON_INGEST_MAX_DECOMPRESSED_BYTES",
        default_value_t = 32 * 1024 * 1024
    )]
    pub max_decompressed_bytes: usize,
    /// Most labels one series may have, its metric name included (Mimir: 30; Prometheus:
    /// unbounded). A series with more is refused.
    #[arg(
        id = "ingest.max_labels_per_series",
        long = "ingest-max-labels-per-series",
        env = "SECUMON_INGEST_MAX_LABELS_PER_SERIES",
        default_value_t = 128
    )]
    pub max_labels_per_series: usize,
    /// Longest label name, in bytes (Mimir: 1024).
    #[arg(
        id = "ingest.max_label_name_bytes",
        long = "ingest-max-label-name-bytes",
        env = "SECUMON_INGEST_MAX_LABEL_NAME_BYTES",
        default_value_t = 1024
    )]
    pub max_label_name_bytes: usize,
    /// Longest label value, in bytes (Mimir: 2048).
    #[arg(
        id = "ingest.max_label_value_bytes",
        long = "ingest-max-label-value-bytes",
        env = "SECUMON_INGEST_MAX_LABEL_VALUE_BYTES",
        default_value_t = 4096
    )]
    pub max_label_value_bytes: usize,
    /// Most series one request may carry (remote-write time series, OTLP series after
    /// translation); a request with more is refused whole with 400.
    #[arg(
        id = "ingest.max_series_per_request",
        long = "ingest-max-series-per-request",
        env = "SECUMON_INGEST_MAX_SERIES_PER_REQUEST",
        default_value_t = 100_000
    )]
    pub max_series_per_request: usize,
    /// Most samples (OTLP data points) one request may carry; a request with more is refused
    /// whole with 400.
    #[arg(
        id = "ingest.max_samples_per_request",
        long = "ingest-max-samples-per-request",
        env = "SECUMON_INGEST_MAX_SAMPLES_PER_REQUEST",
        default_value_t = 2_000_000
    )]
    pub max_samples_per_request: usize,
    /// Most exemplars kept per series of one request; the rest are dropped and counted in
    /// `secumon_exemplars_dropped_total`.
    #[arg(
        id = "ingest.max_exemplars_per_series",
        long = "ingest-max-exemplars-per-series",
        env = "SECUMON_INGEST_MAX_EXEMPLARS_PER_SERIES",
        default_value_t = 100
    )]
    pub max_exemplars_per_series: usize,
    /// Seconds past the server's clock a sample may be; later ones are refused (Mimir's
    /// `creation_grace_period` is 10 minutes).
    #[arg(
        id = "ingest.max_future_secs",
        long = "ingest-max-future-secs",
        env = "SECUMON_INGEST_MAX_FUTURE_SECS",
        default_value_t = 600
    )]
    pub max_future_secs: u64,
    /// Most active series per tenant (a sample in the last hour, as Mimir's
    /// `max_global_series_per_user`); a request's new series past it are refused, its known
    /// series stored. 0: no limit.
    #[arg(
        id = "ingest.max_series_per_tenant",
        long = "ingest-max-series-per-tenant",
        env = "SECUMON_INGEST_MAX_SERIES_PER_TENANT",
        default_value_t = 5_000_000
    )]
    pub max_series_per_tenant: usize,
    /// Samples a second each tenant may write, over every protocol (Mimir's
    /// `ingestion_rate`); a request past it is refused whole with 429 (gRPC
    /// `RESOURCE_EXHAUSTED`) and `Retry-After`. 0: no limit.
    #[arg(
        id = "ingest.tenant_samples_per_second",
        long = "ingest-tenant-samples-per-second",
        env = "SECUMON_INGEST_TENANT_SAMPLES_PER_SECOND",
        default_value_t = 0
    )]
    pub tenant_samples_per_second: u64,
    /// Samples a tenant may write at once above its rate (Mimir's `ingestion_burst_size`);
    /// at least --ingest-max-samples-per-request.
    #[arg(
        id = "ingest.tenant_burst_samples",
        long = "ingest-tenant-burst-samples",
        env = "SECUMON_INGEST_TENANT_BURST_SAMPLES",
        default_value_t = 2_000_000
    )]
    pub tenant_burst_samples: u64,
    /// Ingest requests handled at once (remote-write, OTLP over HTTP and gRPC); more wait
    /// up to a second, then get 503 (gRPC `UNAVAILABLE`) with `Retry-After`.
    #[arg(
        id = "ingest.max_inflight_requests",
        long = "ingest-max-inflight-requests",
        env = "SECUMON_INGEST_MAX_INFLIGHT_REQUESTS",
        default_value_t = 256
    )]
    pub max_inflight_requests: usize,
    /// Request bodies held at once, in bytes, across every HTTP endpoint and OTLP/gRPC: a
    /// body is read only while the total stays under this (at least the largest request),
    /// so many large requests wait instead of filling memory.
    #[arg(
        id = "ingest.max_inflight_bytes",
        long = "ingest-max-inflight-bytes",
        env = "SECUMON_INGEST_MAX_INFLIGHT_BYTES",
        default_value_t = 256 * 1024 * 1024
    )]
    pub max_inflight_bytes: usize,
}

/// The bounds one request is held to, from [`IngestConfig`] and the time it arrived.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    pub labels: crate::model::labels::LabelLimits,
    pub max_series: usize,
    pub max_samples: usize,
    pub max_exemplars_per_series: usize,
    /// Samples before this (ms) are older than raw retention.
    pub min_time: i64,
    /// Samples after this (ms) are too far in the future.
    pub max_time: i64,
}

impl RequestLimits {
    /// No bound but the sample times: for tests and benchmarks of decoding alone.
    pub const NONE: RequestLimits = RequestLimits {
        labels: crate::model::labels::LabelLimits::NONE,
        max_series: usize::MAX,
        max_samples: usize::MAX,
        max_exemplars_per_series: usize::MAX,
        min_time: i64::MIN,
        max_time: i64::MAX,
    };

    /// Why a sample at `t` cannot be stored, if it cannot.
    #[inline]
    pub fn refuse_time(&self, t: i64) -> Option<&'static str> {
        if t < self.min_time {
            Some(TOO_OLD)
        } else if t > self.max_time {
            Some(TOO_FAR_IN_FUTURE)
        } else {
            None
        }
    }

    /// The client's description of a refused sample time.
    pub fn time_message(&self, reason: &'static str, t: i64) -> String {
        if reason == TOO_OLD {
            format!(
                "sample at {t} ms is older than raw retention (earliest {} ms)",
                self.min_time
            )
        } else {
            format!(
                "sample at {t} ms is too far in the future (latest {} ms, --ingest-max-future-secs)",
                self.max_time
            )
        }
    }
}

/// Rejection reason of the samples of a request past `--ingest-tenant-samples-per-second`.
pub const RATE_LIMITED: &str = "rate_limited";

/// Rejection reason of the samples of a series past `--ingest-max-series-per-tenant`.
pub const SERIES_LIMIT: &str = "per_tenant_series_limit";

/// Rejection reasons of sample times.
pub const TOO_OLD: &str = "too_old";
pub const TOO_FAR_IN_FUTURE: &str = "too_far_in_future";

impl IngestConfig {
    /// The bounds of a request arriving at `now_ms`, with raw samples kept `raw_days`.
    pub fn limits(&self, raw_days: u32, now_ms: i64) -> RequestLimits {
        let keep_ms = i64::from(raw_days) * 86_400_000;
        RequestLimits {
            labels: crate::model::labels::LabelLimits {
                max_labels: self.max_labels_per_series,
                max_name_bytes: self.max_label_name_bytes,
                max_value_bytes: self.max_label_value_bytes,
            },
            max_series: self.max_series_per_request,
            max_samples: self.max_samples_per_request,
            max_exemplars_per_series: self.max_exemplars_per_series,
            min_time: now_ms.saturating_sub(keep_ms),
            max_time: now_ms.saturating_add((self.max_future_secs as i64).saturating_mul(1000)),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

/// Samples refused before storage for one reason (the label `/metrics` uses), with the
/// description of the first of them.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub reason: &'static str,
    pub samples: usize,
    pub message: String,
}

/// A decoded, validated request.
#[derive(Debug, Default)]
pub struct Batch {
    pub series: WriteBatch,
    pub exemplars: Vec<ExemplarWrite>,
    pub metadata: Vec<MetricMetadata>,
    pub rejections: Vec<Rejection>,
    /// Exemplars left out past the per-series limit (the samples are stored all the same).
    pub dropped_exemplars: usize,
}

impl Batch {
    /// Records `samples` refused for `reason`. The message is made only for the first refusal
    /// of each reason: a request of a million invalid series costs a counter per reason, not a
    /// million strings.
    pub fn reject(
        &mut self,
        reason: &'static str,
        samples: usize,
        message: impl FnOnce() -> String,
    ) {
        match self.rejections.iter_mut().find(|r| r.reason == reason) {
            Some(r) => r.samples += samples,
            None => self.rejections.push(Rejection {
                reason,
                samples,
                message: message(),
            }),
        }
    }
}

/// What a write did; the protocol handler turns it into its own response.
#[derive(Debug, Default)]
pub struct WriteSummary {
    pub accepted: usize,
    pub rejected: usize,
    /// A description of the first refused sample or series, for the client.
    pub first_error: Option<String>,
}

/// Metadata entries remembered as stored; past this the memory is cleared (and entries are
/// written once more, harmlessly).
const METADATA_MEMORY: usize = 100_000;

/// Identity of one metadata entry of a tenant, without keeping a copy of its strings.
fn metadata_key(tenant: &TenantId, m: &MetricMetadata) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for field in [
        tenant.as_str(),
        &m.metric_family_name,
        m.metric_type.as_str(),
        &m.help,
        &m.unit,
    ] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    h.digest128()
}

#[derive(Clone)]
pub struct Ingester {
    storage: DynStorage,
    metrics: Arc<Metrics>,
    config: IngestConfig,
    /// Days raw samples are kept: older samples are refused at the door.
    raw_days: u32,
    /// Active series of each tenant, for `--ingest-max-series-per-tenant`.
    active: Arc<active_series::ActiveSeries>,
    /// Each tenant's ingest rate, for `--ingest-tenant-samples-per-second`.
    rates: Arc<rate::TenantRates>,
    /// One permit per ingest request being handled.
    slots: Arc<tokio::sync::Semaphore>,
    /// Metadata already stored, by [`metadata_key`]: OTLP repeats it with every export,
    /// remote-write every minute.
    stored_metadata: Arc<std::sync::Mutex<std::collections::HashSet<u128>>>,
    /// Where stored samples of watched agents go (the live feed).
    live: Option<Arc<crate::fleet::live::LiveHub>>,
}

/// How long an ingest request waits for a slot before it is answered "retry later".
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Seconds a client is asked to wait (`Retry-After`) when every slot is taken or storage is
/// unavailable.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Every ingest slot was taken for [`SLOT_WAIT`]: the client should retry later.
#[derive(Debug, thiserror::Error)]
#[error("too many ingest requests at once (--ingest-max-inflight-requests {0}); retry later")]
pub struct Busy(pub usize);

impl Ingester {
    pub fn new(
        storage: DynStorage,
        metrics: Arc<Metrics>,
        config: IngestConfig,
        raw_days: u32,
    ) -> Ingester {
        Ingester {
            storage,
            metrics,
            slots: Arc::new(tokio::sync::Semaphore::new(
                config.max_inflight_requests.max(1),
            )),
            rates: Arc::new(rate::TenantRates::new(
                config.tenant_samples_per_second,
                config.tenant_burst_samples,
                config.max_samples_per_request,
            )),
            active: Arc::new(active_series::ActiveSeries::new(
                config.max_series_per_tenant,
            )),
            config,
            raw_days,
            stored_metadata: Arc::default(),
            live: None,
        }
    }

    /// This ingester, telling `hub` of every batch it stores.
    pub fn with_live(mut self, hub: Arc<crate::fleet::live::LiveHub>) -> Ingester {
        self.live = Some(hub);
        self
    }

    /// The bounds of a request arriving now.
    pub fn limits(&self) -> RequestLimits {
        self.config
            .limits(self.raw_days, chrono::Utc::now().timestamp_millis())
    }

    /// A slot to handle one request in, waiting up to a second for one.
    pub async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Busy> {
        match tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Busy(self.config.max_inflight_requests)),
        }
    }

    /// The metadata not stored before, each once, with its key.
    fn new_metadata(
        &self,
        tenant: &TenantId,
        metadata: Vec<MetricMetadata>,
    ) -> Vec<(u128, MetricMetadata)> {
        let stored = self
            .stored_metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut seen = std::collections::HashSet::new();
        metadata
            .into_iter()
            .filter_map(|m| {
                let key = metadata_key(tenant, &m);
                (!stored.contains(&key) && seen.insert(key)).then_some((key, m))
            })
            .collect()
    }

    fn remember_metadata(&self, keys: impl ExactSizeIterator<Item = u128>) {
        let mut stored = self
            .stored_metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if stored.len() + keys.len() > METADATA_MEMORY {
            stored.clear();
        }
        stored.extend(keys);
    }

    /// Takes a request's samples from its tenant's rate, or says when to retry.
    pub fn take_rate(&self, tenant: &TenantId, batch: &Batch) -> Result<(), rate::RateLimited> {
        self.rates.take(tenant, batch.series.sample_count())
    }

    /// Holds `batch` to its tenant's active-series limit: the series (and exemplars) of new
    /// series past it are taken out and counted as refused.
    fn admit(&self, tenant: &TenantId, batch: &mut Batch) {
        let limit = self.active.limit();
        if limit == 0 {
            return;
        }
        let (refused, mut active) = self
            .active
            .admit(tenant, batch.series.iter().map(|s| s.fingerprint));
        if let Some(&first) = refused.first() {
            let mut samples = 0;
            let mut example = String::new();
            for (i, series) in batch.series.iter().enumerate() {
                if refused.binary_search(&i).is_ok() {
                    samples += series.samples.len();
                    if i == first {
                        example = series.labels.to_string();
                    }
                }
            }
            batch.reject(SERIES_LIMIT, samples, || {
                format!(
                    "series {example} is new and tenant {tenant} has {limit} active series, the limit (--ingest-max-series-per-tenant)"
                )
            });
            batch.series = batch.series.without(&refused);
        }
        if !batch.exemplars.is_empty() {
            let (refused, after) = self.active.admit(
                tenant,
                batch.exemplars.iter().map(|e| e.series.fingerprint()),
            );
            active = after;
            for &i in refused.iter().rev() {
                batch.dropped_exemplars += batch.exemplars.swap_remove(i).exemplars.len();
            }
        }
        self.metrics
            .active_series
            .get_or_create(&crate::telemetry::TenantLabels {
                tenant: tenant.as_str().to_owned(),
            })
            .set(active as i64);
        for idle in self.active.forget_idle_tenants() {
            self.metrics
                .active_series
                .remove(&crate::telemetry::TenantLabels { tenant: idle });
        }
    }

    /// Stores the valid part of `batch`. Fails only when storage fails; then nothing in the
    /// error is claimed stored and the client may retry if the error says so.
    pub async fn write(
        &self,
        protocol: &'static str,
        tenant: &TenantId,
        mut batch: Batch,
    ) -> Result<WriteSummary, StorageError> {
        self.admit(tenant, &mut batch);
        let mut summary = WriteSummary::default();
        for rejection in &batch.rejections {
            self.metrics
                .rejected(protocol, rejection.reason, rejection.samples);
            summary.rejected += rejection.samples;
            if summary.first_error.is_none() {
                summary.first_error = Some(rejection.message.clone());
            }
        }
        if batch.dropped_exemplars > 0 {
            self.metrics
                .exemplars_dropped
                .get_or_create(&crate::telemetry::ProtocolLabels { protocol })
                .inc_by(batch.dropped_exemplars as u64);
        }
        let fresh = self.new_metadata(tenant, batch.metadata);
        if !fresh.is_empty() {
            let (keys, metadata): (Vec<u128>, Vec<MetricMetadata>) = fresh.into_iter().unzip();
            self.storage.append_metadata(tenant, &metadata).await?;
            self.remember_metadata(keys.into_iter());
        }
        if !batch.exemplars.is_empty() {
            self.storage
                .append_exemplars(tenant, &batch.exemplars)
                .await?;
        }
        if !batch.series.is_empty() {
            let outcome = self.storage.append_batch(tenant, &batch.series).await?;
            if let Some(live) = &self.live {
                live.publish(tenant, &batch.series);
            }
            for (reason, count) in &outcome.rejected {
                self.metrics.rejected(protocol, reason.as_str(), *count);
            }
            summary.accepted = outcome.accepted;
            summary.rejected += outcome.rejected_total();
            if summary.first_error.is_none() {
                summary.first_error = outcome.first_rejection;
            }
        }
        self.metrics
            .samples_ingested
            .get_or_create(&crate::telemetry::ProtocolLabels { protocol })
            .inc_by(summary.accepted as u64);
        Ok(summary)
    }
}
