//! The catalog: what the server knows besides samples (API tokens now; agents and rule groups
//! later). On the PostgreSQL backend its tables live in the same database (`migrations/`); on
//! the embedded engine it is a SQLite database, `catalog.db`, in the data directory
//! (`migrations/sqlite/`). Both implement [`Catalog`] and pass one conformance suite
//! (`tests/integration/catalog.rs`).
//!
//! The catalog stores what it is given: it never sees a token, only its hash, and it judges
//! nothing (expiry and scopes are the `auth` module's).

pub mod agents;
mod postgres;
pub mod rules;
mod sqlite;

pub use agents::{
    AgentQuery, AgentRecord, AgentSort, AgentStats, AgentStatus, AgentUpdate, SortKey,
    DEFAULT_HEARTBEAT_SECS,
};

pub use postgres::PostgresCatalog;
pub use sqlite::SqliteCatalog;

use crate::auth::Scopes;
use crate::model::TenantId;
use async_trait::async_trait;
use std::sync::Arc;

/// The file name of the embedded catalog in the data directory.
pub const SQLITE_FILE: &str = "catalog.db";

/// One API token as stored: everything but the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public identifier (16 hex digits), for listing and revoking.
    pub id: String,
    pub tenant: TenantId,
    pub name: String,
    pub scopes: Scopes,
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The store cannot be reached now; a retry may succeed.
    #[error("catalog unavailable: {0}")]
    Unavailable(String),
    #[error("catalog: {0}")]
    Internal(String),
    /// A token with this id or hash exists already.
    #[error("catalog: a token with this id or hash exists already")]
    Conflict,
}

impl From<sqlx::Error> for CatalogError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => CatalogError::Unavailable(e.to_string()),
            sqlx::Error::Database(ref db) if db.is_unique_violation() => CatalogError::Conflict,
            _ => CatalogError::Internal(e.to_string()),
        }
    }
}

pub type CatalogResult<T> = Result<T, CatalogError>;

/// The agents registry of a catalog.
#[async_trait]
pub trait Agents: Send + Sync {
    /// Stores a new agent; [`CatalogError::Conflict`] when its id, or its `agent_id` in its
    /// tenant, is taken.
    async fn insert_agent(&self, agent: &AgentRecord) -> CatalogResult<()>;

    /// The tenant's agent by registry id.
    async fn agent(&self, tenant: &TenantId, id: &str) -> CatalogResult<Option<AgentRecord>>;

    /// The tenant's agent by its own identity (`agent_id`).
    async fn agent_by_agent_id(
        &self,
        tenant: &TenantId,
        agent_id: &str,
    ) -> CatalogResult<Option<AgentRecord>>;

    /// The page of the tenant's agents that `query` selects, and how many agents match its
    /// filters in all. Listed agents leave out the large fields agents report (`health`,
    /// `effective_config`, `remote_config`, `remote_config_status`, `attributes` are empty).
    async fn list_agents(
        &self,
        tenant: &TenantId,
        query: &AgentQuery,
    ) -> CatalogResult<(Vec<AgentRecord>, i64)>;

    /// Stores `agent`'s fields if the stored agent is still at `agent.revision` (the revision
    /// the caller read); the stored revision then goes up by one. `last_seen_at` and
    /// `sequence_num` are stored only for an agent's own report (`reported`), never from an
    /// operator's change.
    async fn update_agent(&self, agent: &AgentRecord, reported: bool)
        -> CatalogResult<AgentUpdate>;

    /// How many agents the tenant has.
    async fn count_agents(&self, tenant: &TenantId) -> CatalogResult<i64>;

    /// Records that the tenant's agent `id` was heard from at `last_seen_at`, with this
    /// OpAMP sequence number; the revision stays (a heartbeat is no change an operator's
    /// `If-Match` should trip on). Whether there was such an agent.
    async fn touch_agent(
        &self,
        tenant: &TenantId,
        id: &str,
        last_seen_at: i64,
        sequence_num: Option<i64>,
    ) -> CatalogResult<bool>;

    /// Up to `limit` agents of every tenant, in (tenant, `agent_id`) order, after the agent
    /// `after` names (from the first when `None`), without the large fields (as listed).
    async fn agents_after(
        &self,
        after: Option<(&TenantId, &str)>,
        limit: i64,
    ) -> CatalogResult<Vec<AgentRecord>>;

    /// Deletes the tenant's agent `id`; whether there was one. With `unseen_since_ms`, only
    /// if it was last seen before then (an agent that reported meanwhile stays).
    async fn delete_agent(
        &self,
        tenant: &TenantId,
        id: &str,
        unseen_since_ms: Option<i64>,
    ) -> CatalogResult<bool>;

    /// Counts of the tenant's agents at `now_ms`; online means seen within
    /// `online_heartbeats` of the agent's heartbeat and not disconnected since
    /// (`FleetConfig::online`).
    async fn agent_stats(
        &self,
        tenant: &TenantId,
        now_ms: i64,
        online_heartbeats: i64,
    ) -> CatalogResult<AgentStats>;
}

#[async_trait]
pub trait Catalog: Agents + rules::RuleGroups + Send + Sync + 'static {
    /// Stores a new token.
    async fn insert_token(&self, token: &TokenRecord) -> CatalogResult<()>;

    /// The token of this hash, if one is stored.
    async fn token_by_hash(&self, hash: &str) -> CatalogResult<Option<TokenRecord>>;

    /// Tokens of one tenant, or of every tenant, oldest first.
    async fn list_tokens(&self, tenant: Option<&TenantId>) -> CatalogResult<Vec<TokenRecord>>;

    /// Deletes the token `id` (of `tenant` when given); whether one was deleted.
    async fn delete_token(&self, id: &str, tenant: Option<&TenantId>) -> CatalogResult<bool>;

    /// Records when tokens were last used (id, Unix ms); a later time never goes back.
    async fn touch_tokens(&self, used: &[(String, i64)]) -> CatalogResult<()>;
}

pub type DynCatalog = Arc<dyn Catalog>;

/// Reads a token row of either store (their columns are the same).
trait RowLike {
    fn record(&self) -> CatalogResult<TokenRecord>;
}

#[allow(clippy::too_many_arguments)]
fn token_row(
    id: String,
    tenant: String,
    name: String,
    scopes: String,
    hash: String,
    created_at: i64,
    expires_at: Option<i64>,
    last_used_at: Option<i64>,
) -> CatalogResult<TokenRecord> {
    let scopes = scopes
        .parse()
        .map_err(|e| CatalogError::Internal(format!("token {id}: {e}")))?;
    Ok(TokenRecord {
        id,
        tenant: TenantId::new(tenant),
        name,
        scopes,
        hash,
        created_at,
        expires_at,
        last_used_at,
    })
}

/// The catalog of the store `--storage` names: the PostgreSQL database of a `postgres://`
/// URL (its migrations applied), else `catalog.db` in the embedded data directory (created).
pub async fn open(storage: &str) -> anyhow::Result<DynCatalog> {
    if storage.starts_with("postgres://") || storage.starts_with("postgresql://") {
        Ok(Arc::new(PostgresCatalog::connect(storage).await?))
    } else {
        let dir = std::path::Path::new(storage);
        std::fs::create_dir_all(dir)?;
        Ok(Arc::new(SqliteCatalog::open(&dir.join(SQLITE_FILE)).await?))
    }
}
