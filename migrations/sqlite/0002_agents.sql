-- The agents registry: the same table as the PostgreSQL catalog's (migrations/0005_agents.sql).
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
    status           TEXT    NOT NULL,
    auto_registered  INTEGER NOT NULL,
    tags             TEXT    NOT NULL,
    health           TEXT    NOT NULL,
    effective_config TEXT    NOT NULL,
    remote_config    TEXT    NOT NULL,
    heartbeat_secs   INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    last_seen_at     INTEGER,
    revision         INTEGER NOT NULL,
    UNIQUE (tenant_id, agent_id)
) STRICT;

CREATE INDEX agents_tenant_created_idx ON agents (tenant_id, created_at, id);
