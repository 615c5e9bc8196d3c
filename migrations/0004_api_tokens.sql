-- API tokens (catalog): only the SHA-256 of a token is kept; the token itself is shown once.
-- Times are Unix milliseconds, as in the SQLite catalog, so both stores share their queries.
CREATE TABLE api_tokens (
    id           TEXT   PRIMARY KEY,
    tenant_id    TEXT   NOT NULL,
    name         TEXT   NOT NULL,
    -- Comma-separated: ingest, read, admin, operator.
    scopes       TEXT   NOT NULL,
    -- Hex SHA-256 of the whole token.
    hash         TEXT   NOT NULL UNIQUE,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    last_used_at BIGINT
);

CREATE INDEX api_tokens_tenant_idx ON api_tokens (tenant_id);
