//! Exemplars: one row per series and timestamp in `exemplars`, keyed by the series ids of
//! `series`.

use super::write::{labels_to_json, MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS};
use super::{db_error, read::labels_from_json, PostgresStorage};
use crate::model::{Exemplar, Labels, SeriesExemplars, TenantId};
use crate::storage::{ExemplarWrite, SeriesQuery, StorageResult, WriteBatch};
use chrono::{DateTime, Utc};
use std::collections::HashMap;

fn time(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.clamp(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS)).unwrap_or_default()
}

impl PostgresStorage {
    pub(super) async fn store_exemplars(
        &self,
        tenant: &TenantId,
        batch: &[ExemplarWrite],
    ) -> StorageResult<()> {
        let series = WriteBatch::of_labels(batch.iter().map(|w| &w.series));
        let ids = self.resolve_series(tenant, &series).await?;
        let (mut series_ids, mut times, mut values, mut labels) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (write, id) in batch.iter().zip(ids) {
            for e in &write.exemplars {
                if (MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&e.t) {
                    series_ids.push(id.0);
                    times.push(time(e.t));
                    values.push(e.value);
                    labels.push(labels_to_json(&e.labels));
                }
            }
        }
        if series_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO exemplars (series_id, time, value, labels)
             SELECT s, t, v, l::jsonb FROM unnest($1::int8[], $2::timestamptz[], $3::float8[], $4::text[]) AS x(s, t, v, l)
             ON CONFLICT (series_id, time) DO NOTHING",
        )
        .bind(&series_ids)
        .bind(&times)
        .bind(&values)
        .bind(&labels)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// Deletes exemplars older than raw retention, then the oldest past the configured
    /// number; returns how many went.
    pub(super) async fn prune_exemplars(&self, now_ms: i64) -> StorageResult<u64> {
        let oldest = time(now_ms.saturating_sub(self.retention.keep_ms(None)));
        let mut pruned = sqlx::query("DELETE FROM exemplars WHERE time < $1")
            .bind(oldest)
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected();
        let keep = i64::try_from(self.max_exemplars).unwrap_or(i64::MAX);
        pruned += sqlx::query(
            "DELETE FROM exemplars WHERE (time, series_id) < (
                 SELECT time, series_id FROM exemplars
                 ORDER BY time DESC, series_id DESC OFFSET $1 LIMIT 1)",
        )
        .bind(keep.saturating_sub(1).max(0))
        .execute(&self.pool)
        .await
        .map_err(db_error)?
        .rows_affected();
        if keep == 0 {
            pruned += sqlx::query("DELETE FROM exemplars")
                .execute(&self.pool)
                .await
                .map_err(db_error)?
                .rows_affected();
        }
        Ok(pruned)
    }

    pub(super) async fn load_exemplars(
        &self,
        tenant: &TenantId,
        query: &SeriesQuery,
    ) -> StorageResult<Vec<SeriesExemplars>> {
        let mut series: HashMap<i64, Labels> = HashMap::new();
        for set in &query.matcher_sets {
            series.extend(self.find_series(tenant, set).await?);
        }
        let ids: Vec<i64> = series.keys().copied().collect();
        let rows: Vec<(i64, DateTime<Utc>, f64, String)> = sqlx::query_as(
            "SELECT series_id, time, value, labels::text FROM exemplars
             WHERE series_id = ANY($1) AND time >= $2 AND time <= $3
             ORDER BY series_id, time",
        )
        .bind(&ids)
        .bind(time(query.start))
        .bind(time(query.end))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let mut grouped: HashMap<i64, Vec<Exemplar>> = HashMap::new();
        for (id, t, value, labels) in rows {
            grouped.entry(id).or_default().push(Exemplar {
                labels: labels_from_json(&labels)?,
                value,
                t: t.timestamp_millis(),
            });
        }
        let mut out: Vec<SeriesExemplars> = grouped
            .into_iter()
            .filter_map(|(id, exemplars)| {
                Some(SeriesExemplars {
                    labels: series.get(&id)?.clone(),
                    exemplars,
                })
            })
            .collect();
        out.sort_by(|a, b| a.labels.cmp(&b.labels));
        Ok(out)
    }
}
