-- The agents registry (catalog): one row per agent of a tenant. `agent_id` is the agent's own
-- identity (an OpAMP instance_uid, or one an operator chose), unique within its tenant; `id` is
-- the registry's. Times are Unix milliseconds, as in the SQLite catalog.
CREATE TABLE agents (
    id               TEXT    PRIMARY KEY,
    tenant_id        TEXT    NOT NULL,
    agent_id         TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    hostname         TEXT    NOT NULL,
    ip_address       TEXT    NOT NULL,
    os               TEXT    NOT NULL,
    os_version       TEXT    NOT NULL,
    agent_type       TEXT    NOT NULL,
    agent_version    TEXT    NOT NULL,
    -- 'active' or 'inactive', set by operators.
    status           TEXT    NOT NULL,
    auto_registered  BOOLEAN NOT NULL,
    -- A JSON object of string tags.
    tags             TEXT    NOT NULL,
    health           TEXT    NOT NULL,
    effective_config TEXT    NOT NULL,
    remote_config    TEXT    NOT NULL,
    heartbeat_secs   BIGINT  NOT NULL,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    last_seen_at     BIGINT,
    -- Bumped by every change: the agent's ETag.
    revision         BIGINT  NOT NULL,
    CONSTRAINT agents_identity UNIQUE (tenant_id, agent_id)
);

CREATE INDEX agents_tenant_created_idx ON agents (tenant_id, created_at, id);
