//! The ingest rate of each tenant (`--ingest-tenant-samples-per-second`), as Mimir's
//! `ingestion_rate` and `ingestion_burst_size`: a token bucket of samples per tenant, refilled
//! at the rate, holding at most the burst. A request whose samples the bucket does not hold is
//! refused whole, to be retried later (429 with `Retry-After`).

use crate::model::TenantId;
use rustc_hash::FxHashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A tenant over its rate: retry in `retry_after_secs`.
#[derive(Debug, thiserror::Error)]
#[error("tenant {tenant} is over its ingest rate of {rate} samples/s (--ingest-tenant-samples-per-second); retry in {retry_after_secs} s")]
pub struct RateLimited {
    pub tenant: TenantId,
    pub rate: u64,
    pub retry_after_secs: u64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct TenantRates {
    /// Samples a second; 0: no limit.
    rate: u64,
    burst: f64,
    buckets: Mutex<FxHashMap<String, Bucket>>,
}

impl TenantRates {
    /// `burst` is raised to `largest_request` so that every request the other limits let
    /// through can pass in time.
    pub fn new(rate: u64, burst: u64, largest_request: usize) -> TenantRates {
        TenantRates {
            rate,
            burst: burst.max(largest_request as u64) as f64,
            buckets: Mutex::default(),
        }
    }

    /// Takes `samples` from the tenant's bucket, or says when they would be there.
    pub fn take(&self, tenant: &TenantId, samples: usize) -> Result<(), RateLimited> {
        self.take_at(tenant, samples, Instant::now())
    }

    fn take_at(&self, tenant: &TenantId, samples: usize, now: Instant) -> Result<(), RateLimited> {
        if self.rate == 0 || samples == 0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(tenant.as_str()) {
            buckets.insert(
                tenant.as_str().to_owned(),
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let bucket = buckets
            .get_mut(tenant.as_str())
            .expect("inserted above when missing");
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate as f64;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        let wanted = samples as f64;
        if bucket.tokens >= wanted {
            bucket.tokens -= wanted;
            return Ok(());
        }
        let missing = wanted - bucket.tokens;
        Err(RateLimited {
            tenant: tenant.clone(),
            rate: self.rate,
            retry_after_secs: (missing / self.rate as f64).ceil().max(1.0) as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_holds_the_burst_refills_at_the_rate_and_tenants_are_apart() {
        let rates = TenantRates::new(100, 1_000, 500);
        let (a, b) = (TenantId::new("a"), TenantId::new("b"));
        let t0 = Instant::now();
        assert!(rates.take_at(&a, 1_000, t0).is_ok());
        let refused = rates.take_at(&a, 250, t0).unwrap_err();
        assert_eq!(refused.retry_after_secs, 3);
        assert!(rates.take_at(&b, 1_000, t0).is_ok());
        // Two seconds refill 200.
        assert!(rates.take_at(&a, 200, t0 + Duration::from_secs(2)).is_ok());
        assert!(rates.take_at(&a, 1, t0 + Duration::from_secs(2)).is_err());
        // Never more than the burst.
        assert!(rates
            .take_at(&a, 1_001, t0 + Duration::from_secs(3600))
            .is_err());
        assert!(rates
            .take_at(&a, 1_000, t0 + Duration::from_secs(3600))
            .is_ok());
    }

    #[test]
    fn the_burst_holds_the_largest_request_and_zero_is_no_limit() {
        let rates = TenantRates::new(10, 5, 2_000);
        assert!(rates.take(&TenantId::default(), 2_000).is_ok());
        let off = TenantRates::new(0, 0, 0);
        assert!(off.take(&TenantId::default(), usize::MAX).is_ok());
    }
}
