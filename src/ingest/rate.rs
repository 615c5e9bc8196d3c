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
    buckets: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    by_tenant: FxHashMap<String, Bucket>,
    /// When buckets that have filled up again were last dropped.
    swept: Option<Instant>,
}

/// How often full buckets are dropped (a full bucket is what a new tenant gets anyway), so
/// tenants that stopped writing cost nothing.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

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
        let mut all = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if all
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY)
        {
            let (rate, burst) = (self.rate as f64, self.burst);
            all.by_tenant.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            all.swept = Some(now);
        }
        let buckets = &mut all.by_tenant;
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
        // A request larger than the burst (OTLP counts its limit in data points, a histogram
        // point is several samples) passes when the bucket is full, leaving it in debt:
        // refusing it would ask for a retry that could never succeed.
        if bucket.tokens >= wanted.min(self.burst) {
            bucket.tokens -= wanted;
            return Ok(());
        }
        let missing = wanted.min(self.burst) - bucket.tokens;
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
        // An hour refills the burst, not more.
        let later = t0 + Duration::from_secs(3600);
        assert!(rates.take_at(&a, 1_000, later).is_ok());
        assert!(rates.take_at(&a, 1, later).is_err());
    }

    #[test]
    fn a_request_past_the_burst_passes_on_a_full_bucket_and_leaves_a_debt() {
        let rates = TenantRates::new(100, 1_000, 0);
        let (t, t0) = (TenantId::default(), Instant::now());
        assert!(rates.take_at(&t, 1_500, t0).is_ok());
        // 500 in debt: 1,000 more need 15 s.
        assert_eq!(
            rates.take_at(&t, 1_000, t0).unwrap_err().retry_after_secs,
            15
        );
        assert!(rates
            .take_at(&t, 1_000, t0 + Duration::from_secs(15))
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
