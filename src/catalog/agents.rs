//! The agents registry's rows and the SQL both catalogs run for them (PostgreSQL's `$n`
//! placeholders; SQLite takes the same text with `?n`, which it numbers alike).

use crate::model::TenantId;
use std::collections::BTreeMap;

/// Whether operators count an agent in: set by them, never by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Active,
    Inactive,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Inactive => "inactive",
        }
    }

    pub fn parse(text: &str) -> Option<AgentStatus> {
        match text {
            "active" => Some(AgentStatus::Active),
            "inactive" => Some(AgentStatus::Inactive),
            _ => None,
        }
    }
}

/// One agent of a tenant. Text the agent has not reported is empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    /// The registry's id: a UUIDv7, so ids sort in the order agents were registered.
    pub id: String,
    pub tenant: TenantId,
    /// The agent's own identity, unique in its tenant: an OpAMP `instance_uid`, or an id an
    /// operator chose when pre-registering it.
    pub agent_id: String,
    pub name: String,
    pub hostname: String,
    pub ip_address: String,
    pub os: String,
    pub os_version: String,
    pub agent_type: String,
    pub agent_version: String,
    pub status: AgentStatus,
    /// Registered by the agent's first message rather than by an operator.
    pub auto_registered: bool,
    pub tags: BTreeMap<String, String>,
    /// Health as the agent last reported it (JSON).
    pub health: String,
    /// The configuration the agent reports running.
    pub effective_config: String,
    /// The configuration an operator set for it.
    pub remote_config: String,
    /// How often the agent reports; it is online while seen within a multiple of this.
    pub heartbeat_secs: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    pub last_seen_at: Option<i64>,
    /// Bumped by every change; the agent's ETag.
    pub revision: i64,
}

/// Counts of a tenant's agents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    pub total: i64,
    pub active: i64,
    pub online: i64,
    /// Agents per operating system and per agent version, most first (then by name).
    pub by_os: Vec<(String, i64)>,
    pub by_version: Vec<(String, i64)>,
}

/// What an update of an agent did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentUpdate {
    /// Stored, with this revision.
    Updated(i64),
    /// The agent changed since the revision the caller had (412 for an `If-Match`).
    Stale,
    /// No such agent in the tenant.
    Missing,
}

pub(super) const COLUMNS: &str = "id, tenant_id, agent_id, name, hostname, ip_address, os, \
     os_version, agent_type, agent_version, status, auto_registered, tags, health, \
     effective_config, remote_config, heartbeat_secs, created_at, updated_at, last_seen_at, \
     revision";

pub(super) fn insert_sql() -> String {
    format!(
        "INSERT INTO agents ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
         $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)"
    )
}

/// Every column but the agent's ids, bound as [`bind_agent!`] binds them, for the agent $1
/// of tenant $2 still at revision $21 (the revision the caller read); the revision goes up by
/// one.
pub(super) const UPDATE_SQL: &str = "UPDATE agents SET agent_id = $3, name = $4, \
     hostname = $5, ip_address = $6, os = $7, os_version = $8, agent_type = $9, \
     agent_version = $10, status = $11, auto_registered = $12, tags = $13, health = $14, \
     effective_config = $15, remote_config = $16, heartbeat_secs = $17, created_at = $18, \
     updated_at = $19, last_seen_at = $20, revision = revision + 1 \
     WHERE id = $1 AND tenant_id = $2 AND revision = $21";

pub(super) fn select_sql(condition: &str) -> String {
    format!("SELECT {COLUMNS} FROM agents WHERE {condition}")
}

/// `sql` with SQLite's numbered placeholders.
pub(super) fn for_sqlite(sql: &str) -> String {
    sql.replace('$', "?")
}

pub(super) fn tags_json(tags: &BTreeMap<String, String>) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "{}".into())
}

/// Binds an agent's columns in [`COLUMNS`] order (as [`insert_sql`] and [`UPDATE_SQL`] take
/// them).
macro_rules! bind_agent {
    ($query:expr, $a:expr) => {
        $query
            .bind(&$a.id)
            .bind($a.tenant.as_str())
            .bind(&$a.agent_id)
            .bind(&$a.name)
            .bind(&$a.hostname)
            .bind(&$a.ip_address)
            .bind(&$a.os)
            .bind(&$a.os_version)
            .bind(&$a.agent_type)
            .bind(&$a.agent_version)
            .bind($a.status.as_str())
            .bind($a.auto_registered)
            .bind($crate::catalog::agents::tags_json(&$a.tags))
            .bind(&$a.health)
            .bind(&$a.effective_config)
            .bind(&$a.remote_config)
            .bind($a.heartbeat_secs)
            .bind($a.created_at)
            .bind($a.updated_at)
            .bind($a.last_seen_at)
            .bind($a.revision)
    };
}

/// Reads an agent row of either store.
macro_rules! agent_from_row {
    ($row:expr) => {{
        use sqlx::Row;
        let row = $row;
        let status: String = row.try_get("status")?;
        let tags: String = row.try_get("tags")?;
        let id: String = row.try_get("id")?;
        $crate::catalog::agents::AgentRecord {
            status: $crate::catalog::agents::AgentStatus::parse(&status).ok_or_else(|| {
                $crate::catalog::CatalogError::Internal(format!("agent {id}: status {status:?}"))
            })?,
            tags: serde_json::from_str(&tags).map_err(|e| {
                $crate::catalog::CatalogError::Internal(format!("agent {id}: tags: {e}"))
            })?,
            tenant: $crate::model::TenantId::new(row.try_get::<String, _>("tenant_id")?),
            agent_id: row.try_get("agent_id")?,
            name: row.try_get("name")?,
            hostname: row.try_get("hostname")?,
            ip_address: row.try_get("ip_address")?,
            os: row.try_get("os")?,
            os_version: row.try_get("os_version")?,
            agent_type: row.try_get("agent_type")?,
            agent_version: row.try_get("agent_version")?,
            auto_registered: row.try_get("auto_registered")?,
            health: row.try_get("health")?,
            effective_config: row.try_get("effective_config")?,
            remote_config: row.try_get("remote_config")?,
            heartbeat_secs: row.try_get("heartbeat_secs")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            last_seen_at: row.try_get("last_seen_at")?,
            revision: row.try_get("revision")?,
            id,
        }
    }};
}

/// The registry's queries for a store type with a `pool` field, its SQL passed through `$sql`
/// (the text as written for PostgreSQL, or [`for_sqlite`]).
macro_rules! agent_store {
    ($store:ty, $sql:expr) => {
        #[async_trait::async_trait]
        impl $crate::catalog::Agents for $store {
            async fn insert_agent(
                &self,
                agent: &$crate::catalog::agents::AgentRecord,
            ) -> $crate::catalog::CatalogResult<()> {
                let sql = $sql(&$crate::catalog::agents::insert_sql());
                $crate::catalog::agents::bind_agent!(sqlx::query(&sql), agent)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn agent(
                &self,
                tenant: &$crate::model::TenantId,
                id: &str,
            ) -> $crate::catalog::CatalogResult<Option<$crate::catalog::agents::AgentRecord>> {
                agent_where(self, tenant, "id", id).await
            }

            async fn agent_by_agent_id(
                &self,
                tenant: &$crate::model::TenantId,
                agent_id: &str,
            ) -> $crate::catalog::CatalogResult<Option<$crate::catalog::agents::AgentRecord>> {
                agent_where(self, tenant, "agent_id", agent_id).await
            }

            async fn list_agents(
                &self,
                tenant: &$crate::model::TenantId,
                limit: i64,
                offset: i64,
            ) -> $crate::catalog::CatalogResult<Vec<$crate::catalog::agents::AgentRecord>> {
                let sql = $sql(&$crate::catalog::agents::select_sql(
                    "tenant_id = $1 ORDER BY created_at, id LIMIT $2 OFFSET $3",
                ));
                let rows = sqlx::query(&sql)
                    .bind(tenant.as_str())
                    .bind(limit)
                    .bind(offset)
                    .fetch_all(&self.pool)
                    .await?;
                let mut agents = Vec::with_capacity(rows.len());
                for row in &rows {
                    agents.push($crate::catalog::agents::agent_from_row!(row));
                }
                Ok(agents)
            }

            async fn update_agent(
                &self,
                agent: &$crate::catalog::agents::AgentRecord,
            ) -> $crate::catalog::CatalogResult<$crate::catalog::agents::AgentUpdate> {
                use $crate::catalog::agents::AgentUpdate;
                let sql = $sql($crate::catalog::agents::UPDATE_SQL);
                let done = $crate::catalog::agents::bind_agent!(sqlx::query(&sql), agent)
                    .execute(&self.pool)
                    .await?;
                if done.rows_affected() == 1 {
                    return Ok(AgentUpdate::Updated(agent.revision + 1));
                }
                let exists = agent_where(self, &agent.tenant, "id", &agent.id).await?;
                Ok(if exists.is_some() {
                    AgentUpdate::Stale
                } else {
                    AgentUpdate::Missing
                })
            }

            async fn agent_stats(
                &self,
                tenant: &$crate::model::TenantId,
                now_ms: i64,
                online_heartbeats: i64,
            ) -> $crate::catalog::CatalogResult<$crate::catalog::agents::AgentStats> {
                use sqlx::Row;
                let sql = $sql(
                    "SELECT COUNT(*) AS total, \
                     COALESCE(SUM(CASE WHEN status = 'active' THEN 1 ELSE 0 END), 0) AS active, \
                     COALESCE(SUM(CASE WHEN last_seen_at IS NOT NULL AND \
                         $2 - last_seen_at <= heartbeat_secs * $3 * 1000 THEN 1 ELSE 0 END), 0) \
                         AS online \
                     FROM agents WHERE tenant_id = $1",
                );
                let row = sqlx::query(&sql)
                    .bind(tenant.as_str())
                    .bind(now_ms)
                    .bind(online_heartbeats)
                    .fetch_one(&self.pool)
                    .await?;
                let mut stats = $crate::catalog::agents::AgentStats {
                    total: row.try_get("total")?,
                    active: row.try_get("active")?,
                    online: row.try_get("online")?,
                    ..Default::default()
                };
                for (column, into) in [("os", &mut stats.by_os), ("agent_version", &mut stats.by_version)] {
                    let sql = $sql(&format!(
                        "SELECT {column} AS value, COUNT(*) AS n FROM agents WHERE tenant_id = $1 \
                         GROUP BY {column} ORDER BY n DESC, value"
                    ));
                    for row in sqlx::query(&sql)
                        .bind(tenant.as_str())
                        .fetch_all(&self.pool)
                        .await?
                    {
                        into.push((row.try_get("value")?, row.try_get("n")?));
                    }
                }
                Ok(stats)
            }

            async fn delete_agent(
                &self,
                tenant: &$crate::model::TenantId,
                id: &str,
            ) -> $crate::catalog::CatalogResult<bool> {
                let sql = $sql("DELETE FROM agents WHERE tenant_id = $1 AND id = $2");
                let done = sqlx::query(&sql)
                    .bind(tenant.as_str())
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }
        }

            async fn agent_where(
                store: &$store,
                tenant: &$crate::model::TenantId,
                column: &str,
                value: &str,
            ) -> $crate::catalog::CatalogResult<Option<$crate::catalog::agents::AgentRecord>> {
                let sql = $sql(&$crate::catalog::agents::select_sql(&format!(
                    "tenant_id = $1 AND {column} = $2"
                )));
                let row = sqlx::query(&sql)
                    .bind(tenant.as_str())
                    .bind(value)
                    .fetch_optional(&store.pool)
                    .await?;
                Ok(match row {
                    Some(row) => Some($crate::catalog::agents::agent_from_row!(&row)),
                    None => None,
                })
            }
    };
}

pub(super) use {agent_from_row, agent_store, bind_agent};
