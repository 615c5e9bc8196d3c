//! The embedded catalog: SQLite through sqlx, in write-ahead-log mode so the server and a
//! `secumon token` command can use it at once (the embedded engine's own lock covers only its
//! sample files).

use super::{token_row, Catalog, CatalogResult, RowLike, TokenRecord};
use crate::model::TenantId;
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;
use std::path::Path;
use std::time::Duration;

pub struct SqliteCatalog {
    pub(super) pool: SqlitePool,
}

/// How long a statement waits for another process's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl SqliteCatalog {
    /// Opens (creating) the catalog at `path` and applies its migrations.
    pub async fn open(path: &Path) -> CatalogResult<SqliteCatalog> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| super::CatalogError::Internal(format!("migration failed: {e}")))?;
        Ok(SqliteCatalog { pool })
    }
}

impl RowLike for sqlx::sqlite::SqliteRow {
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

super::agents::agent_store!(SqliteCatalog, super::agents::Dialect::Sqlite);

const COLUMNS: &str = "id, tenant_id, name, scopes, hash, created_at, expires_at, last_used_at";

#[async_trait]
impl Catalog for SqliteCatalog {
    async fn insert_token(&self, token: &TokenRecord) -> CatalogResult<()> {
        sqlx::query(&format!(
            "INSERT INTO api_tokens ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
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
        sqlx::query(&format!("SELECT {COLUMNS} FROM api_tokens WHERE hash = ?"))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.record())
            .transpose()
    }

    async fn list_tokens(&self, tenant: Option<&TenantId>) -> CatalogResult<Vec<TokenRecord>> {
        let rows = match tenant {
            Some(t) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM api_tokens WHERE tenant_id = ? ORDER BY created_at, id"
                ))
                .bind(t.as_str())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM api_tokens ORDER BY created_at, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(RowLike::record).collect()
    }

    async fn delete_token(&self, id: &str, tenant: Option<&TenantId>) -> CatalogResult<bool> {
        let done = match tenant {
            Some(t) => {
                sqlx::query("DELETE FROM api_tokens WHERE id = ? AND tenant_id = ?")
                    .bind(id)
                    .bind(t.as_str())
                    .execute(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("DELETE FROM api_tokens WHERE id = ?")
                    .bind(id)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected() > 0)
    }

    async fn touch_tokens(&self, used: &[(String, i64)]) -> CatalogResult<()> {
        let mut tx = self.pool.begin().await?;
        for (id, at) in used {
            sqlx::query(
                "UPDATE api_tokens SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE id = ?",
            )
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
