-- Rule groups managed over the ruler API, per tenant and namespace; `body` is the group in
-- Prometheus's YAML. Times are Unix milliseconds.
CREATE TABLE rule_groups (
    tenant_id  TEXT   NOT NULL,
    namespace  TEXT   NOT NULL,
    name       TEXT   NOT NULL,
    body       TEXT   NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, namespace, name)
);
