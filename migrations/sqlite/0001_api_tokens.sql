-- The embedded catalog (catalog.db in the data directory): the same tables as the PostgreSQL
-- catalog (migrations/0004_api_tokens.sql), with SQLite's types.
CREATE TABLE api_tokens (
    id           TEXT    PRIMARY KEY,
    tenant_id    TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    scopes       TEXT    NOT NULL,
    hash         TEXT    NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    last_used_at INTEGER
) STRICT;

CREATE INDEX api_tokens_tenant_idx ON api_tokens (tenant_id);
