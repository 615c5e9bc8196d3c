//! The catalog in the PostgreSQL database of the PostgreSQL backend (tables from
//! `migrations/`, applied as the storage applies them).

use super::{token_row, Catalog, CatalogResult, RowLike, TokenRecord};
use crate::model::TenantId;
use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;

pub struct PostgresCatalog {
    pub(super) pool: PgPool,
}

impl PostgresCatalog {
    /// Connects to `url` with a small pool of its own and applies the migrations.
    pub async fn connect(url: &str) -> CatalogResult<PostgresCatalog> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        crate::storage::postgres::migrate(&pool)
            .await
            .map_err(|e| super::CatalogError::Internal(e.to_string()))?;
        Ok(PostgresCatalog { pool })
    }
}

impl RowLike for sqlx::postgres::PgRow {
    fn record(&self) -> CatalogResult<TokenRecord> {
        token_row(
            self.try_get("id")?,
            self.try_get("tenant_id")?,
            self.try_get("name")?,
            self.try_get("scopes")?,
            self.try_get("hash")?,
            self.try_get("created_at")?,
            self.try_get("expires_at")?,
            self.try_get("last_used_at")?,
        )
    }
}

super::agents::agent_store!(PostgresCatalog, super::agents::Dialect::Postgres);

const COLUMNS: &str = "id, tenant_id, name, scopes, hash, created_at, expires_at, last_used_at";

#[async_trait]
impl Catalog for PostgresCatalog {
    async fn insert_token(&self, token: &TokenRecord) -> CatalogResult<()> {
        sqlx::query(&format!(
            "INSERT INTO api_tokens ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&token.id)
        .bind(token.tenant.as_str())
        .bind(&token.name)
        .bind(token.scopes.to_string())
        .bind(&token.hash)
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(token.last_used_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn token_by_hash(&self, hash: &str) -> CatalogResult<Option<TokenRecord>> {
        sqlx::query(&format!("SELECT {COLUMNS} FROM api_tokens WHERE hash = $1"))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.record())
            .transpose()
    }

    async fn list_tokens(&self, tenant: Option<&TenantId>) -> CatalogResult<Vec<TokenRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_tokens WHERE $1::text IS NULL OR tenant_id = $1
             ORDER BY created_at, id"
        ))
        .bind(tenant.map(TenantId::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(RowLike::record).collect()
    }

    async fn delete_token(&self, id: &str, tenant: Option<&TenantId>) -> CatalogResult<bool> {
        let done = sqlx::query(
            "DELETE FROM api_tokens WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)",
        )
        .bind(id)
        .bind(tenant.map(TenantId::as_str))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn touch_tokens(&self, used: &[(String, i64)]) -> CatalogResult<()> {
        let (ids, times): (Vec<&str>, Vec<i64>) =
            used.iter().map(|(id, t)| (id.as_str(), *t)).unzip();
        sqlx::query(
            "UPDATE api_tokens t SET last_used_at = greatest(coalesce(t.last_used_at, 0), u.at)
             FROM unnest($1::text[], $2::int8[]) AS u(id, at) WHERE t.id = u.id",
        )
        .bind(&ids)
        .bind(&times)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
