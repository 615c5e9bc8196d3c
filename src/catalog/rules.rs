//! Rule groups managed over the ruler API, kept in the catalog: per tenant and namespace, each
//! group as the YAML it was given.

use super::{CatalogResult, PostgresCatalog, SqliteCatalog};
use crate::model::TenantId;
use async_trait::async_trait;
use sqlx::Row;

/// One stored group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleGroupRecord {
    pub tenant: TenantId,
    pub namespace: String,
    pub name: String,
    /// The group in Prometheus's YAML (checked when it was stored).
    pub body: String,
    pub updated_at: i64,
}

#[async_trait]
pub trait RuleGroups: Send + Sync {
    /// Stores `group`, replacing the group of the same tenant, namespace and name.
    async fn put_rule_group(&self, group: &RuleGroupRecord) -> CatalogResult<()>;

    /// The groups of `tenant`, or of every tenant, by tenant, namespace and name.
    async fn rule_groups(&self, tenant: Option<&TenantId>) -> CatalogResult<Vec<RuleGroupRecord>>;

    /// Deletes the group `name` of a namespace, or the whole namespace; how many went.
    async fn delete_rule_groups(
        &self,
        tenant: &TenantId,
        namespace: &str,
        name: Option<&str>,
    ) -> CatalogResult<u64>;
}

const COLUMNS: &str = "tenant_id, namespace, name, body, updated_at";

/// The statements of both stores, with their placeholders (`$n` or `?`).
fn statements(p: fn(usize) -> String) -> [String; 5] {
    [
        format!(
            "INSERT INTO rule_groups ({COLUMNS}) VALUES ({}, {}, {}, {}, {}) \
             ON CONFLICT (tenant_id, namespace, name) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
            p(1), p(2), p(3), p(4), p(5)
        ),
        format!("SELECT {COLUMNS} FROM rule_groups WHERE tenant_id = {} ORDER BY tenant_id, namespace, name", p(1)),
        format!("SELECT {COLUMNS} FROM rule_groups ORDER BY tenant_id, namespace, name"),
        format!("DELETE FROM rule_groups WHERE tenant_id = {} AND namespace = {} AND name = {}", p(1), p(2), p(3)),
        format!("DELETE FROM rule_groups WHERE tenant_id = {} AND namespace = {}", p(1), p(2)),
    ]
}

macro_rules! rule_groups_impl {
    ($store:ty, $placeholder:expr) => {
        #[async_trait]
        impl RuleGroups for $store {
            async fn put_rule_group(&self, group: &RuleGroupRecord) -> CatalogResult<()> {
                let [put, ..] = statements($placeholder);
                sqlx::query(&put)
                    .bind(group.tenant.as_str())
                    .bind(&group.namespace)
                    .bind(&group.name)
                    .bind(&group.body)
                    .bind(group.updated_at)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn rule_groups(
                &self,
                tenant: Option<&TenantId>,
            ) -> CatalogResult<Vec<RuleGroupRecord>> {
                let [_, of_tenant, all, ..] = statements($placeholder);
                let rows = match tenant {
                    Some(t) => {
                        sqlx::query(&of_tenant)
                            .bind(t.as_str())
                            .fetch_all(&self.pool)
                            .await?
                    }
                    None => sqlx::query(&all).fetch_all(&self.pool).await?,
                };
                rows.iter()
                    .map(|row| {
                        Ok(RuleGroupRecord {
                            tenant: TenantId::new(row.try_get::<String, _>("tenant_id")?),
                            namespace: row.try_get("namespace")?,
                            name: row.try_get("name")?,
                            body: row.try_get("body")?,
                            updated_at: row.try_get("updated_at")?,
                        })
                    })
                    .collect()
            }

            async fn delete_rule_groups(
                &self,
                tenant: &TenantId,
                namespace: &str,
                name: Option<&str>,
            ) -> CatalogResult<u64> {
                let [_, _, _, one, namespace_all] = statements($placeholder);
                let done = match name {
                    Some(name) => {
                        sqlx::query(&one)
                            .bind(tenant.as_str())
                            .bind(namespace)
                            .bind(name)
                            .execute(&self.pool)
                            .await?
                    }
                    None => {
                        sqlx::query(&namespace_all)
                            .bind(tenant.as_str())
                            .bind(namespace)
                            .execute(&self.pool)
                            .await?
                    }
                };
                Ok(done.rows_affected())
            }
        }
    };
}

rule_groups_impl!(PostgresCatalog, |n| format!("${n}"));
rule_groups_impl!(SqliteCatalog, |_| "?".to_owned());
