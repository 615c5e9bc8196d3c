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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The configuration an operator set for it (JSON: `{"config_map": {name: {"body",
    /// "content_type"}}}`), empty when none.
    pub remote_config: String,
    /// How the agent last reported that configuration (JSON), empty before it did.
    pub remote_config_status: String,
    /// The OpAMP capabilities bits the agent last reported.
    pub capabilities: i64,
    /// The OpAMP `sequence_num` of the agent's last message; `None` before its first, and
    /// after it disconnected.
    pub sequence_num: Option<i64>,
    /// Every attribute of the agent's description (JSON object), `{}` when none.
    pub attributes: String,
    /// The API token the agent's OpAMP messages must come with (empty: any of the tenant's).
    pub token_id: String,
    /// How often the agent reports; it is online while seen within a multiple of this (and
    /// not disconnected since: `FleetConfig::online`).
    pub heartbeat_secs: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    pub last_seen_at: Option<i64>,
    /// Bumped by every change; the agent's ETag.
    pub revision: i64,
}

/// The heartbeat an agent is assumed to have until an operator says otherwise: OpAMP's
/// default polling interval.
pub const DEFAULT_HEARTBEAT_SECS: i64 = 30;

impl AgentRecord {
    /// A new active agent of `tenant` with its own id `agent_id`, registered at `now` (Unix
    /// ms), nothing else known.
    pub fn new(tenant: &TenantId, agent_id: impl Into<String>, now: i64) -> AgentRecord {
        AgentRecord {
            id: uuid::Uuid::now_v7().to_string(),
            tenant: tenant.clone(),
            agent_id: agent_id.into(),
            name: String::new(),
            hostname: String::new(),
            ip_address: String::new(),
            os: String::new(),
            os_version: String::new(),
            agent_type: String::new(),
            agent_version: String::new(),
            status: AgentStatus::Active,
            auto_registered: false,
            tags: BTreeMap::new(),
            health: String::new(),
            effective_config: String::new(),
            remote_config: String::new(),
            remote_config_status: String::new(),
            capabilities: 0,
            sequence_num: None,
            attributes: "{}".into(),
            token_id: String::new(),
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
            created_at: now,
            updated_at: now,
            last_seen_at: None,
            revision: 0,
        }
    }
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
     revision, remote_config_status, capabilities, sequence_num, attributes, token_id";

/// [`COLUMNS`] with the large ones an agent reports (health, configurations, attributes) left
/// empty: what listings read.
pub(super) const SLIM_COLUMNS: &str = "id, tenant_id, agent_id, name, hostname, ip_address, \
     os, os_version, agent_type, agent_version, status, auto_registered, tags, '' AS health, \
     '' AS effective_config, '' AS remote_config, heartbeat_secs, created_at, updated_at, \
     last_seen_at, revision, '' AS remote_config_status, capabilities, sequence_num, \
     '{}' AS attributes, token_id";

pub(super) fn insert_sql() -> String {
    format!(
        "INSERT INTO agents ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
         $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)"
    )
}

/// Every column but the agent's ids, bound as [`bind_agent!`] binds them, for the agent $1
/// of tenant $2 still at revision $21 (the revision the caller read); the revision goes up by
/// one. `last_seen_at` and `sequence_num` are written only when $27 (the change is an agent's
/// report): an operator's change, made from a read that heartbeats may have overtaken (they
/// move those two without a new revision), keeps the stored ones.
pub(super) const UPDATE_SQL: &str = "UPDATE agents SET agent_id = $3, name = $4, \
     hostname = $5, ip_address = $6, os = $7, os_version = $8, agent_type = $9, \
     agent_version = $10, status = $11, auto_registered = $12, tags = $13, health = $14, \
     effective_config = $15, remote_config = $16, heartbeat_secs = $17, created_at = $18, \
     updated_at = $19, last_seen_at = CASE WHEN $27 THEN $20 ELSE last_seen_at END, \
     remote_config_status = $22, capabilities = $23, \
     sequence_num = CASE WHEN $27 THEN $24 ELSE sequence_num END, attributes = $25, \
     token_id = $26, revision = revision + 1 \
     WHERE id = $1 AND tenant_id = $2 AND revision = $21";

pub(super) fn select_sql(condition: &str) -> String {
    format!("SELECT {COLUMNS} FROM agents WHERE {condition}")
}

pub(super) fn select_slim_sql(condition: &str) -> String {
    format!("SELECT {SLIM_COLUMNS} FROM agents WHERE {condition}")
}

/// What differs between the two stores' SQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    /// `sql` (written with PostgreSQL's `$n` placeholders) for this store: SQLite numbers its
    /// `?n` alike.
    pub(super) fn sql(self, sql: &str) -> String {
        match self {
            Dialect::Postgres => sql.to_owned(),
            Dialect::Sqlite => sql.replace('$', "?"),
        }
    }

    /// A condition true when the agent's JSON `tags` hold key `$key` with value `$value`.
    fn tag_is(self, key: usize, value: usize) -> String {
        match self {
            Dialect::Postgres => format!(
                "EXISTS (SELECT 1 FROM jsonb_each_text(agents.tags::jsonb) t \
                 WHERE t.key = ${key} AND t.value = ${value})"
            ),
            Dialect::Sqlite => format!(
                "EXISTS (SELECT 1 FROM json_each(agents.tags) t \
                 WHERE t.key = ${key} AND t.value = ${value})"
            ),
        }
    }

    /// `column` compared byte by byte, as SQLite compares text, so both stores sort alike.
    fn bytewise(self, column: &str) -> String {
        match self {
            Dialect::Postgres => format!("{column} COLLATE \"C\""),
            Dialect::Sqlite => column.to_owned(),
        }
    }
}

/// The order `GET /api/v1/agents` lists agents in; ties go by registry id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentSort {
    CreatedAt,
    Name,
    Hostname,
    AgentId,
    /// Never-seen agents count as seen before any other.
    LastSeenAt,
}

impl AgentSort {
    pub const ALL: [AgentSort; 5] = [
        AgentSort::CreatedAt,
        AgentSort::Name,
        AgentSort::Hostname,
        AgentSort::AgentId,
        AgentSort::LastSeenAt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentSort::CreatedAt => "created_at",
            AgentSort::Name => "name",
            AgentSort::Hostname => "hostname",
            AgentSort::AgentId => "agent_id",
            AgentSort::LastSeenAt => "last_seen_at",
        }
    }

    pub fn parse(text: &str) -> Option<AgentSort> {
        AgentSort::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether `key` is of this key's type (text or a number).
    pub fn fits(self, key: &SortKey) -> bool {
        let text = matches!(
            self,
            AgentSort::Name | AgentSort::Hostname | AgentSort::AgentId
        );
        text == matches!(key, SortKey::Text(_))
    }

    /// The agent's value of this key, as a cursor carries it.
    pub fn key_of(self, agent: &AgentRecord) -> SortKey {
        match self {
            AgentSort::CreatedAt => SortKey::Int(agent.created_at),
            AgentSort::Name => SortKey::Text(agent.name.clone()),
            AgentSort::Hostname => SortKey::Text(agent.hostname.clone()),
            AgentSort::AgentId => SortKey::Text(agent.agent_id.clone()),
            AgentSort::LastSeenAt => SortKey::Int(agent.last_seen_at.unwrap_or(-1)),
        }
    }

    fn expression(self, dialect: Dialect) -> String {
        match self {
            AgentSort::CreatedAt => "created_at".into(),
            AgentSort::Name => dialect.bytewise("name"),
            AgentSort::Hostname => dialect.bytewise("hostname"),
            AgentSort::AgentId => dialect.bytewise("agent_id"),
            AgentSort::LastSeenAt => "COALESCE(last_seen_at, -1)".into(),
        }
    }
}

/// A sort key's value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum SortKey {
    Int(i64),
    Text(String),
}

/// Which of a tenant's agents to list, in what order, from where.
#[derive(Clone, Debug)]
pub struct AgentQuery {
    pub status: Option<AgentStatus>,
    /// Online (`true`) or offline (`false`) at `now_ms`, as [`AgentQuery::online_heartbeats`]
    /// counts it.
    pub online: Option<bool>,
    pub now_ms: i64,
    pub online_heartbeats: i64,
    /// Agents with this tag (key, value).
    pub tag: Option<(String, String)>,
    /// Agents whose hostname contains this text, ignoring ASCII case.
    pub hostname: Option<String>,
    pub sort: AgentSort,
    pub descending: bool,
    /// Keyset pagination: agents after this (sort key, registry id) in the listing's order.
    pub after: Option<(SortKey, String)>,
    pub limit: i64,
    pub offset: i64,
}

impl Default for AgentQuery {
    /// The first 100 agents, oldest first.
    fn default() -> Self {
        AgentQuery {
            status: None,
            online: None,
            now_ms: 0,
            online_heartbeats: 3,
            tag: None,
            hostname: None,
            sort: AgentSort::CreatedAt,
            descending: false,
            after: None,
            limit: 100,
            offset: 0,
        }
    }
}

/// A value bound to a listing's statement.
pub(super) enum Param {
    Int(i64),
    Text(String),
}

/// The `WHERE` conditions of `query` (after `tenant_id = $1`), with the values they bind from
/// `$2` on; the cursor's condition only when `with_cursor`.
fn conditions(query: &AgentQuery, dialect: Dialect, with_cursor: bool) -> (String, Vec<Param>) {
    let mut sql = String::from("tenant_id = $1");
    let mut params = Vec::new();
    let next = |params: &mut Vec<Param>, p: Param| {
        params.push(p);
        params.len() + 1
    };
    if let Some(status) = query.status {
        let n = next(&mut params, Param::Text(status.as_str().into()));
        sql += &format!(" AND status = ${n}");
    }
    if let Some(online) = query.online {
        let now = next(&mut params, Param::Int(query.now_ms));
        let k = next(&mut params, Param::Int(query.online_heartbeats));
        sql += &if online {
            format!(
                " AND last_seen_at IS NOT NULL AND sequence_num IS NOT NULL \
                 AND ${now} - last_seen_at <= heartbeat_secs * ${k} * 1000"
            )
        } else {
            format!(
                " AND (last_seen_at IS NULL OR sequence_num IS NULL \
                 OR ${now} - last_seen_at > heartbeat_secs * ${k} * 1000)"
            )
        };
    }
    if let Some((key, value)) = &query.tag {
        let k = next(&mut params, Param::Text(key.clone()));
        let v = next(&mut params, Param::Text(value.clone()));
        sql += &format!(" AND {}", dialect.tag_is(k, v));
    }
    if let Some(text) = &query.hostname {
        let mut pattern = String::from("%");
        for c in text.to_ascii_lowercase().chars() {
            if matches!(c, '%' | '_' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('%');
        let n = next(&mut params, Param::Text(pattern));
        sql += &format!(" AND LOWER(hostname) LIKE ${n} ESCAPE '\\'");
    }
    if let (true, Some((key, id))) = (with_cursor, &query.after) {
        let expression = query.sort.expression(dialect);
        let v = next(
            &mut params,
            match key {
                SortKey::Int(i) => Param::Int(*i),
                SortKey::Text(t) => Param::Text(t.clone()),
            },
        );
        let i = next(&mut params, Param::Text(id.clone()));
        let op = if query.descending { "<" } else { ">" };
        sql += &format!(" AND ({expression} {op} ${v} OR ({expression} = ${v} AND id {op} ${i}))");
    }
    (sql, params)
}

/// The statement listing `query`'s page (`limit` rows from `offset`), and its values after
/// the tenant's.
pub(super) fn list_sql(query: &AgentQuery, dialect: Dialect) -> (String, Vec<Param>) {
    let (mut sql, mut params) = conditions(query, dialect, true);
    let direction = if query.descending { "DESC" } else { "ASC" };
    sql = select_slim_sql(&format!(
        "{sql} ORDER BY {} {direction}, id {direction}",
        query.sort.expression(dialect)
    ));
    params.push(Param::Int(query.limit));
    let limit = params.len() + 1;
    params.push(Param::Int(query.offset));
    sql += &format!(" LIMIT ${limit} OFFSET ${}", limit + 1);
    (dialect.sql(&sql), params)
}

/// The statement counting the agents `query` matches, whatever the page.
pub(super) fn count_sql(query: &AgentQuery, dialect: Dialect) -> (String, Vec<Param>) {
    let (sql, params) = conditions(query, dialect, false);
    (
        dialect.sql(&format!("SELECT COUNT(*) AS n FROM agents WHERE {sql}")),
        params,
    )
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
            .bind(&$a.remote_config_status)
            .bind($a.capabilities)
            .bind($a.sequence_num)
            .bind(&$a.attributes)
            .bind(&$a.token_id)
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
            remote_config_status: row.try_get("remote_config_status")?,
            capabilities: row.try_get("capabilities")?,
            sequence_num: row.try_get("sequence_num")?,
            attributes: row.try_get("attributes")?,
            token_id: row.try_get("token_id")?,
            id,
        }
    }};
}

/// Binds a listing's values after the tenant's.
macro_rules! bind_params {
    ($query:expr, $params:expr) => {{
        let mut query = $query;
        for param in $params {
            query = match param {
                $crate::catalog::agents::Param::Int(i) => query.bind(*i),
                $crate::catalog::agents::Param::Text(t) => query.bind(t.as_str()),
            };
        }
        query
    }};
}

/// The registry's queries for a store type with a `pool` field, in `$dialect`'s SQL.
macro_rules! agent_store {
    ($store:ty, $dialect:expr) => {
        #[async_trait::async_trait]
        impl $crate::catalog::Agents for $store {
            async fn insert_agent(
                &self,
                agent: &$crate::catalog::agents::AgentRecord,
            ) -> $crate::catalog::CatalogResult<()> {
                let sql = $dialect.sql(&$crate::catalog::agents::insert_sql());
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
                query: &$crate::catalog::agents::AgentQuery,
            ) -> $crate::catalog::CatalogResult<(Vec<$crate::catalog::agents::AgentRecord>, i64)>
            {
                use sqlx::Row;
                let (sql, params) = $crate::catalog::agents::list_sql(query, $dialect);
                let rows = $crate::catalog::agents::bind_params!(
                    sqlx::query(&sql).bind(tenant.as_str()),
                    &params
                )
                .fetch_all(&self.pool)
                .await?;
                let mut agents = Vec::with_capacity(rows.len());
                for row in &rows {
                    agents.push($crate::catalog::agents::agent_from_row!(row));
                }
                let (sql, params) = $crate::catalog::agents::count_sql(query, $dialect);
                let total: i64 = $crate::catalog::agents::bind_params!(
                    sqlx::query(&sql).bind(tenant.as_str()),
                    &params
                )
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?;
                Ok((agents, total))
            }

            async fn update_agent(
                &self,
                agent: &$crate::catalog::agents::AgentRecord,
                reported: bool,
            ) -> $crate::catalog::CatalogResult<$crate::catalog::agents::AgentUpdate> {
                use $crate::catalog::agents::AgentUpdate;
                let sql = $dialect.sql($crate::catalog::agents::UPDATE_SQL);
                let done = $crate::catalog::agents::bind_agent!(sqlx::query(&sql), agent)
                    .bind(reported)
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
                let sql = $dialect.sql(
                    "SELECT COUNT(*) AS total, \
                     COALESCE(SUM(CASE WHEN status = 'active' THEN 1 ELSE 0 END), 0) AS active, \
                     COALESCE(SUM(CASE WHEN last_seen_at IS NOT NULL AND sequence_num IS NOT NULL \
                         AND $2 - last_seen_at <= heartbeat_secs * $3 * 1000 THEN 1 ELSE 0 END), 0) \
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
                    let sql = $dialect.sql(&format!(
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

            async fn count_agents(
                &self,
                tenant: &$crate::model::TenantId,
            ) -> $crate::catalog::CatalogResult<i64> {
                use sqlx::Row;
                let sql = $dialect.sql("SELECT COUNT(*) AS n FROM agents WHERE tenant_id = $1");
                Ok(sqlx::query(&sql)
                    .bind(tenant.as_str())
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("n")?)
            }

            async fn touch_agent(
                &self,
                tenant: &$crate::model::TenantId,
                id: &str,
                last_seen_at: i64,
                sequence_num: Option<i64>,
            ) -> $crate::catalog::CatalogResult<bool> {
                let sql = $dialect.sql(
                    "UPDATE agents SET last_seen_at = $3, sequence_num = $4 \
                     WHERE tenant_id = $1 AND id = $2",
                );
                let done = sqlx::query(&sql)
                    .bind(tenant.as_str())
                    .bind(id)
                    .bind(last_seen_at)
                    .bind(sequence_num)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn agents_after(
                &self,
                after: Option<(&$crate::model::TenantId, &str)>,
                limit: i64,
            ) -> $crate::catalog::CatalogResult<Vec<$crate::catalog::agents::AgentRecord>> {
                // The (tenant_id, agent_id) unique index serves this order.
                let (tenant, agent_id) = after.map_or(("", ""), |(t, a)| (t.as_str(), a));
                let condition = if after.is_some() {
                    "(tenant_id, agent_id) > ($1, $2)"
                } else {
                    "$1 = $1 AND $2 = $2"
                };
                let sql = $dialect.sql(&$crate::catalog::agents::select_slim_sql(&format!(
                    "{condition} ORDER BY tenant_id, agent_id LIMIT $3"
                )));
                let rows = sqlx::query(&sql)
                    .bind(tenant)
                    .bind(agent_id)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                let mut agents = Vec::with_capacity(rows.len());
                for row in &rows {
                    agents.push($crate::catalog::agents::agent_from_row!(row));
                }
                Ok(agents)
            }

            async fn delete_agent(
                &self,
                tenant: &$crate::model::TenantId,
                id: &str,
                unseen_since_ms: Option<i64>,
            ) -> $crate::catalog::CatalogResult<bool> {
                let sql = $dialect.sql(
                    "DELETE FROM agents WHERE tenant_id = $1 AND id = $2 \
                     AND ($3 IS NULL OR (last_seen_at IS NOT NULL AND last_seen_at < $3))",
                );
                let done = sqlx::query(&sql)
                    .bind(tenant.as_str())
                    .bind(id)
                    .bind(unseen_since_ms)
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
                let sql = $dialect.sql(&$crate::catalog::agents::select_sql(&format!(
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

pub(super) use {agent_from_row, agent_store, bind_agent, bind_params};
