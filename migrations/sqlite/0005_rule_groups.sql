-- The same table as the PostgreSQL catalog's (migrations/0008_rule_groups.sql).
CREATE TABLE rule_groups (
    tenant_id  TEXT    NOT NULL,
    namespace  TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, namespace, name)
) STRICT;
