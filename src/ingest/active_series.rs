//! The active-series limit of each tenant (`--ingest-max-series-per-tenant`), as Mimir's
//! `max_global_series_per_user`: a series is active while it has received a sample (or an
//! exemplar) within the last [`WINDOW_SECS`]; a request's series that would take its tenant
//! past the limit are refused, the tenant's known series are always taken.
//!
//! The count is kept here, at the edge, the same way for every backend: the backends keep a
//! series' identity for as long as they keep its data, so their own counts measure every series
//! ever seen rather than the ones a tenant feeds now.

use crate::model::TenantId;
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex};

/// How long a series stays active after its last sample, in seconds (Prometheus's head keeps
/// a series through about the same span after its last sample).
pub const WINDOW_SECS: u32 = 3_600;

/// Seconds between sweeps of a tenant's idle series, and at the limit the shortest time
/// between two sweeps (so a full tenant frees idle series promptly but not on every request).
const SWEEP_EVERY_SECS: u32 = WINDOW_SECS / 12;
const SWEEP_AT_LIMIT_SECS: u32 = 10;

/// The series a tenant sent within the window: the low 64 bits of each fingerprint (two series
/// sharing them, about one chance in 10¹² among 5 million, count as one), with the second of
/// its last sample.
#[derive(Default)]
struct Tenant {
    last_seen: FxHashMap<u64, u32>,
    swept_at: u32,
}

impl Tenant {
    fn sweep(&mut self, now: u32) {
        self.last_seen
            .retain(|_, seen| now.saturating_sub(*seen) < WINDOW_SECS);
        self.swept_at = now;
    }
}

/// Active series of every tenant; 0 as the limit turns counting off.
pub struct ActiveSeries {
    limit: usize,
    /// When every tenant was last swept (seconds since `epoch`).
    swept_all: std::sync::atomic::AtomicU32,
    /// Seconds are counted from here, so a last-seen time fits in 32 bits.
    epoch: std::time::Instant,
    /// Seconds added to the clock (tests move time with it).
    offset: u32,
    tenants: Mutex<FxHashMap<String, Arc<Mutex<Tenant>>>>,
}

impl ActiveSeries {
    pub fn new(limit: usize) -> ActiveSeries {
        ActiveSeries {
            limit,
            swept_all: std::sync::atomic::AtomicU32::new(0),
            epoch: std::time::Instant::now(),
            offset: 0,
            tenants: Mutex::default(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs())
            .unwrap_or(u32::MAX)
            .saturating_add(self.offset)
    }

    fn tenant(&self, tenant: &TenantId) -> Arc<Mutex<Tenant>> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        match tenants.get(tenant.as_str()) {
            Some(t) => t.clone(),
            None => tenants
                .entry(tenant.as_str().to_owned())
                .or_default()
                .clone(),
        }
    }

    /// Marks the series of `fingerprints` (in request order) active now, taking new ones while
    /// the tenant stays within the limit. Returns the positions of the refused ones (empty when
    /// every series is taken, or when the limit is off) and the tenant's active series after.
    pub fn admit(
        &self,
        tenant: &TenantId,
        fingerprints: impl Iterator<Item = u128>,
    ) -> (Vec<usize>, usize) {
        if self.limit == 0 {
            return (Vec::new(), 0);
        }
        let now = self.now();
        let tenant = self.tenant(tenant);
        let mut t = tenant.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_sub(t.swept_at) >= SWEEP_EVERY_SECS {
            t.sweep(now);
        }
        let mut refused = Vec::new();
        for (i, fp) in fingerprints.enumerate() {
            let key = fp as u64;
            if let Some(seen) = t.last_seen.get_mut(&key) {
                // Most series come every scrape: write only when the second changed.
                if *seen != now {
                    *seen = now;
                }
                continue;
            }
            if t.last_seen.len() >= self.limit
                && now.saturating_sub(t.swept_at) >= SWEEP_AT_LIMIT_SECS
            {
                t.sweep(now);
            }
            if t.last_seen.len() < self.limit {
                t.last_seen.insert(key, now);
            } else {
                refused.push(i);
            }
        }
        (refused, t.last_seen.len())
    }

    /// Every [`SWEEP_EVERY_SECS`], sweeps every tenant's idle series and forgets the tenants
    /// left with none (a tenant that stopped writing is otherwise swept only when it writes
    /// again). Returns the forgotten tenants.
    pub fn forget_idle_tenants(&self) -> Vec<String> {
        use std::sync::atomic::Ordering;
        let now = self.now();
        let last = self.swept_all.load(Ordering::Relaxed);
        if self.limit == 0
            || now.saturating_sub(last) < SWEEP_EVERY_SECS
            || self
                .swept_all
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Vec::new();
        }
        let tenants: Vec<(String, Arc<Mutex<Tenant>>)> = self
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, t)| (name.clone(), t.clone()))
            .collect();
        let mut idle = Vec::new();
        for (name, tenant) in tenants {
            let mut t = tenant.lock().unwrap_or_else(|e| e.into_inner());
            t.sweep(now);
            if t.last_seen.is_empty() {
                idle.push(name);
            }
        }
        let mut all = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|name| {
            // A tenant that wrote since its sweep is kept.
            let empty = all.get(name).is_some_and(|t| {
                t.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .last_seen
                    .is_empty()
            });
            if empty {
                all.remove(name);
            }
            empty
        });
        idle
    }

    #[cfg(test)]
    fn advance(&mut self, secs: u32) {
        self.offset += secs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_series_always_pass_new_ones_only_within_the_limit() {
        let active = ActiveSeries::new(3);
        let t = TenantId::default();
        assert_eq!(active.admit(&t, [1, 2].into_iter()), (vec![], 2));
        // 1 and 2 are known; 3 fits; 4 does not; 3 again is now known.
        assert_eq!(active.admit(&t, [1, 3, 4, 2, 3].into_iter()), (vec![2], 3));
        // Another tenant has its own count.
        let other = TenantId::new("other");
        assert_eq!(active.admit(&other, [4, 5, 6, 7].into_iter()), (vec![3], 3));
    }

    #[test]
    fn idle_series_leave_the_count_after_the_window() {
        let mut active = ActiveSeries::new(2);
        let t = TenantId::default();
        assert_eq!(active.admit(&t, [1, 2].into_iter()), (vec![], 2));
        active.advance(WINDOW_SECS - 60);
        // 1 is fed again; 2 goes idle.
        assert_eq!(active.admit(&t, [1, 3].into_iter()), (vec![1], 2));
        active.advance(120);
        // 2 left the count, so 3 now fits; 2 comes back as a new series, past the limit.
        assert_eq!(active.admit(&t, [3].into_iter()), (vec![], 2));
        assert_eq!(active.admit(&t, [2].into_iter()), (vec![0], 2));
    }

    #[test]
    fn tenants_that_stopped_writing_are_forgotten() {
        let mut active = ActiveSeries::new(10);
        let (a, b) = (TenantId::new("a"), TenantId::new("b"));
        active.admit(&a, [1].into_iter());
        active.admit(&b, [1].into_iter());
        assert!(active.forget_idle_tenants().is_empty());
        active.advance(WINDOW_SECS - 10);
        active.admit(&b, [1].into_iter());
        active.advance(20);
        assert_eq!(active.forget_idle_tenants(), ["a"]);
        assert_eq!(active.tenants.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_limit_of_zero_counts_nothing() {
        let active = ActiveSeries::new(0);
        let t = TenantId::default();
        assert_eq!(active.admit(&t, 0..1_000_000u128), (vec![], 0));
        assert!(active.tenants.lock().unwrap().is_empty());
    }
}
