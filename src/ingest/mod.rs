//! Ingest: decodes what clients push, validates it at the edge, and hands storage batches of
//! valid series. It keeps whatever is valid in a request and reports the rest with reasons;
//! it never knows which backend stores the data.

pub mod otlp;
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
}

impl Default for IngestConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

/// A series or sample refused before storage, with the reason label `/metrics` uses.
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
    /// Metadata already stored, by [`metadata_key`]: OTLP repeats it with every export,
    /// remote-write every minute.
    stored_metadata: Arc<std::sync::Mutex<std::collections::HashSet<u128>>>,
}

impl Ingester {
    pub fn new(storage: DynStorage, metrics: Arc<Metrics>) -> Ingester {
        Ingester {
            storage,
            metrics,
            stored_metadata: Arc::default(),
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

    /// Stores the valid part of `batch`. Fails only when storage fails; then nothing in the
    /// error is claimed stored and the client may retry if the error says so.
    pub async fn write(
        &self,
        protocol: &'static str,
        tenant: &TenantId,
        batch: Batch,
    ) -> Result<WriteSummary, StorageError> {
        let mut summary = WriteSummary::default();
        for rejection in &batch.rejections {
            self.metrics
                .rejected(protocol, rejection.reason, rejection.samples);
            summary.rejected += rejection.samples;
            if summary.first_error.is_none() {
                summary.first_error = Some(rejection.message.clone());
            }
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
