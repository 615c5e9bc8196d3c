//! One conformance suite for both catalogs: the embedded SQLite file and the PostgreSQL tables
//! must store, find, list, delete and touch tokens identically.

use crate::support::Postgres;
use secumon::auth::Scopes;
use secumon::catalog::{Catalog, CatalogError, PostgresCatalog, SqliteCatalog, TokenRecord};
use secumon::model::TenantId;

fn token(id: &str, tenant: &str, hash: &str, created_at: i64) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        tenant: TenantId::new(tenant),
        name: format!("name of {id}"),
        scopes: "ingest,read".parse::<Scopes>().unwrap(),
        hash: hash.into(),
        created_at,
        expires_at: (id == "b").then_some(created_at + 1000),
        last_used_at: None,
    }
}

async fn conforms(catalog: &dyn Catalog, store: &str) {
    let (a, b, c) = (
        token("a", "t1", "h-a", 10),
        token("b", "t2", "h-b", 20),
        token("c", "t1", "h-c", 30),
    );
    for t in [&c, &a, &b] {
        catalog.insert_token(t).await.unwrap();
    }
    // Another token with a hash or id already stored is refused.
    for clash in [token("d", "t1", "h-a", 40), token("a", "t1", "h-d", 40)] {
        assert!(
            matches!(
                catalog.insert_token(&clash).await,
                Err(CatalogError::Conflict)
            ),
            "{store}: {clash:?} was taken"
        );
    }
    assert_eq!(
        catalog.token_by_hash("h-b").await.unwrap().as_ref(),
        Some(&b),
        "{store}"
    );
    assert_eq!(catalog.token_by_hash("h-x").await.unwrap(), None, "{store}");
    let all = catalog.list_tokens(None).await.unwrap();
    assert_eq!(all, vec![a.clone(), b.clone(), c.clone()], "{store}");
    let t1 = catalog
        .list_tokens(Some(&TenantId::new("t1")))
        .await
        .unwrap();
    assert_eq!(t1, vec![a.clone(), c.clone()], "{store}");

    // Last use only moves forward.
    catalog
        .touch_tokens(&[("a".into(), 500), ("c".into(), 700), ("zz".into(), 1)])
        .await
        .unwrap();
    catalog.touch_tokens(&[("a".into(), 400)]).await.unwrap();
    let used: Vec<Option<i64>> = catalog
        .list_tokens(None)
        .await
        .unwrap()
        .iter()
        .map(|t| t.last_used_at)
        .collect();
    assert_eq!(used, [Some(500), None, Some(700)], "{store}");

    // A tenant-scoped delete touches only that tenant's token.
    let t2 = TenantId::new("t2");
    assert!(
        !catalog.delete_token("a", Some(&t2)).await.unwrap(),
        "{store}"
    );
    assert!(
        catalog.delete_token("b", Some(&t2)).await.unwrap(),
        "{store}"
    );
    assert!(catalog.delete_token("a", None).await.unwrap(), "{store}");
    assert!(!catalog.delete_token("a", None).await.unwrap(), "{store}");
    let left: Vec<String> = catalog
        .list_tokens(None)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(left, ["c"], "{store}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgresql_catalogs_conform() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteCatalog::open(&dir.path().join("catalog.db"))
        .await
        .unwrap();
    conforms(&sqlite, "sqlite").await;
    // Reopened, it has what it had.
    drop(sqlite);
    let again = SqliteCatalog::open(&dir.path().join("catalog.db"))
        .await
        .unwrap();
    assert_eq!(again.list_tokens(None).await.unwrap().len(), 1);

    let url = Postgres::shared().database().await;
    let postgres = PostgresCatalog::connect(&url).await.unwrap();
    conforms(&postgres, "postgresql").await;
}
