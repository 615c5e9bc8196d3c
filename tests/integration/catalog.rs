//! One conformance suite for both catalogs: the embedded SQLite file and the PostgreSQL tables
//! must store, find, list, delete and touch tokens, and keep the agents registry, identically.

use crate::support::Postgres;
use secumon::auth::Scopes;
use secumon::catalog::{
    AgentQuery, AgentRecord, AgentSort, AgentStatus, AgentUpdate, Catalog, CatalogError,
    PostgresCatalog, SqliteCatalog, TokenRecord,
};
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

/// `a` as a listing reads it: without the large fields agents report.
fn slim(a: &AgentRecord) -> AgentRecord {
    AgentRecord {
        health: String::new(),
        effective_config: String::new(),
        remote_config: String::new(),
        remote_config_status: String::new(),
        attributes: "{}".into(),
        ..a.clone()
    }
}

fn agent(id: &str, tenant: &str, agent_id: &str, created_at: i64) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        tenant: TenantId::new(tenant),
        agent_id: agent_id.into(),
        name: format!("agent {agent_id}"),
        hostname: format!("{agent_id}.example"),
        ip_address: "10.0.0.1".into(),
        os: "linux".into(),
        os_version: "6.1".into(),
        agent_type: "secumon-agent".into(),
        agent_version: "0.1.0".into(),
        status: AgentStatus::Active,
        auto_registered: id.ends_with('2'),
        tags: [("env".to_string(), "prod".to_string())].into(),
        health: r#"{"healthy":true}"#.into(),
        effective_config: String::new(),
        remote_config: String::new(),
        remote_config_status: String::new(),
        capabilities: 0x2001,
        sequence_num: Some(7),
        attributes: r#"{"host.name":"h"}"#.into(),
        token_id: "token-1".into(),
        heartbeat_secs: 30,
        created_at,
        updated_at: created_at,
        last_seen_at: (id == "a1").then_some(created_at + 5),
        revision: 0,
    }
}

async fn agents_conform(catalog: &dyn Catalog, store: &str) {
    let (t1, t2) = (TenantId::new("t1"), TenantId::new("t2"));
    let (a1, a2, b1) = (
        agent("a1", "t1", "host-a", 10),
        agent("a2", "t1", "host-b", 20),
        agent("b1", "t2", "host-a", 5),
    );
    for a in [&a2, &a1, &b1] {
        catalog.insert_agent(a).await.unwrap();
    }
    // One agent_id per tenant; one id in all.
    for clash in [
        agent("a3", "t1", "host-a", 30),
        agent("a1", "t2", "host-z", 30),
    ] {
        assert!(
            matches!(
                catalog.insert_agent(&clash).await,
                Err(CatalogError::Conflict)
            ),
            "{store}: {clash:?}"
        );
    }
    assert_eq!(
        catalog.agent(&t1, "a1").await.unwrap().as_ref(),
        Some(&a1),
        "{store}"
    );
    assert_eq!(
        catalog.agent(&t2, "a1").await.unwrap(),
        None,
        "{store}: other tenant"
    );
    assert_eq!(
        catalog
            .agent_by_agent_id(&t1, "host-b")
            .await
            .unwrap()
            .as_ref(),
        Some(&a2),
        "{store}"
    );
    assert_eq!(
        catalog
            .agent_by_agent_id(&t2, "host-a")
            .await
            .unwrap()
            .as_ref(),
        Some(&b1),
        "{store}"
    );
    // Every tenant's agents, in (tenant, agent_id) order, page by page.
    let all: Vec<String> = catalog
        .agents_after(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(all, ["a1", "a2", "b1"], "{store}");
    let rest: Vec<String> = catalog
        .agents_after(Some((&t1, "host-b")), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(rest, ["b1"], "{store}");
    assert_eq!(
        catalog.agents_after(None, 1).await.unwrap().len(),
        1,
        "{store}"
    );
    let page = |limit, offset| AgentQuery {
        limit,
        offset,
        ..Default::default()
    };
    assert_eq!(
        catalog.list_agents(&t1, &page(10, 0)).await.unwrap(),
        (vec![slim(&a1), slim(&a2)], 2),
        "{store}: listings leave the large fields out"
    );
    assert_eq!(
        catalog.list_agents(&t1, &page(1, 1)).await.unwrap(),
        (vec![slim(&a2)], 2),
        "{store}"
    );
    assert!(
        catalog
            .list_agents(&t1, &page(10, 2))
            .await
            .unwrap()
            .0
            .is_empty(),
        "{store}"
    );

    // Updates are conditional on the revision the caller saw.
    let mut changed = a1.clone();
    changed.name = "renamed".into();
    changed.status = AgentStatus::Inactive;
    changed.tags.insert("team".into(), "infra".into());
    changed.updated_at = 99;
    assert_eq!(
        catalog.update_agent(&changed, true).await.unwrap(),
        AgentUpdate::Updated(1),
        "{store}"
    );
    let stored = catalog.agent(&t1, "a1").await.unwrap().unwrap();
    assert_eq!(
        (
            stored.name.as_str(),
            stored.status,
            stored.tags.len(),
            stored.updated_at,
            stored.revision
        ),
        ("renamed", AgentStatus::Inactive, 2, 99, 1),
        "{store}"
    );
    assert_eq!(
        catalog.update_agent(&changed, true).await.unwrap(),
        AgentUpdate::Stale,
        "{store}"
    );
    let mut elsewhere = changed.clone();
    elsewhere.tenant = t2.clone();
    elsewhere.revision = 1;
    assert_eq!(
        catalog.update_agent(&elsewhere, true).await.unwrap(),
        AgentUpdate::Missing,
        "{store}"
    );

    // a1 is inactive now; a1 was seen at 15 with a 30 s heartbeat, a2 never.
    let stats = catalog.agent_stats(&t1, 15 + 90_000, 3).await.unwrap();
    assert_eq!(
        (stats.total, stats.active, stats.online),
        (2, 1, 1),
        "{store}: {stats:?}"
    );
    assert_eq!(stats.by_os, [("linux".to_string(), 2)], "{store}");
    let later = catalog.agent_stats(&t1, 15 + 90_001, 3).await.unwrap();
    assert_eq!(later.online, 0, "{store}: one ms past three heartbeats");
    assert_eq!(
        catalog
            .agent_stats(&TenantId::new("t3"), 0, 3)
            .await
            .unwrap(),
        Default::default(),
        "{store}"
    );

    // A heartbeat moves last_seen_at and the sequence number, not the revision.
    let before = catalog.agent(&t1, "a2").await.unwrap().unwrap();
    assert!(
        catalog.touch_agent(&t1, "a2", 77, Some(8)).await.unwrap(),
        "{store}"
    );
    assert!(
        !catalog.touch_agent(&t2, "a2", 77, Some(8)).await.unwrap(),
        "{store}"
    );
    let after = catalog.agent(&t1, "a2").await.unwrap().unwrap();
    assert_eq!(
        (after.last_seen_at, after.sequence_num, after.revision),
        (Some(77), Some(8), before.revision),
        "{store}"
    );
    assert_eq!(
        (after.capabilities, after.attributes.as_str()),
        (0x2001, r#"{"host.name":"h"}"#),
        "{store}"
    );
    // An operator's change made from a read older than the heartbeat keeps the heartbeat.
    let mut renamed = before.clone();
    renamed.name = "renamed by an operator".into();
    renamed.last_seen_at = None;
    renamed.sequence_num = None;
    assert!(matches!(
        catalog.update_agent(&renamed, false).await.unwrap(),
        AgentUpdate::Updated(_)
    ));
    let kept = catalog.agent(&t1, "a2").await.unwrap().unwrap();
    assert_eq!(
        (kept.name.as_str(), kept.last_seen_at, kept.sequence_num),
        ("renamed by an operator", Some(77), Some(8)),
        "{store}"
    );
    assert_eq!(catalog.count_agents(&t1).await.unwrap(), 2, "{store}");
    // Deleting an agent unseen since a time leaves one seen then or later.
    assert!(
        !catalog.delete_agent(&t1, "a2", Some(77)).await.unwrap(),
        "{store}"
    );
    assert!(catalog.agent(&t1, "a2").await.unwrap().is_some(), "{store}");
    let mut reset = kept.clone();
    reset.last_seen_at = None;
    catalog.update_agent(&reset, true).await.unwrap();

    listings_conform(catalog, store, &t1).await;

    assert!(
        !catalog.delete_agent(&t2, "a1", None).await.unwrap(),
        "{store}"
    );
    // Unseen since a time: an agent never seen is not "unseen since", one seen before is.
    let never = catalog.agent(&t1, "a2").await.unwrap().unwrap();
    assert_eq!(never.last_seen_at, None, "{store}");
    assert!(
        !catalog
            .delete_agent(&t1, "a2", Some(i64::MAX))
            .await
            .unwrap(),
        "{store}"
    );
    assert!(catalog.touch_agent(&t1, "a1", 50, Some(1)).await.unwrap());
    assert!(
        !catalog.delete_agent(&t1, "a1", Some(50)).await.unwrap(),
        "{store}"
    );
    assert!(
        catalog.delete_agent(&t1, "a1", Some(51)).await.unwrap(),
        "{store}"
    );
    assert_eq!(catalog.agent(&t1, "a1").await.unwrap(), None, "{store}");
}

/// Filters, orders and cursors of a listing, over the agents `agents_conform` left: a1
/// (inactive, "renamed", tagged team=infra) and a2 ("renamed by an operator", never seen),
/// plus three more.
async fn listings_conform(catalog: &dyn Catalog, store: &str, t1: &TenantId) {
    for (id, agent_id, name, seen) in [
        ("a4", "host-c", "Zeta", Some(40)),
        ("a5", "host_d", "alpha", Some(50)),
        ("a6", "HOST-E", "beta", None),
    ] {
        let mut a = agent(id, "t1", agent_id, 100);
        a.name = name.into();
        a.last_seen_at = seen;
        catalog.insert_agent(&a).await.unwrap();
    }
    let ids = |listed: (Vec<AgentRecord>, i64)| -> (Vec<String>, i64) {
        (listed.0.into_iter().map(|a| a.id).collect(), listed.1)
    };
    let list =
        |query: AgentQuery| async move { ids(catalog.list_agents(t1, &query).await.unwrap()) };
    let all = AgentQuery::default;
    let names = |expected: &[&str], total: i64| -> (Vec<String>, i64) {
        (expected.iter().map(|s| s.to_string()).collect(), total)
    };
    assert_eq!(
        list(all()).await,
        names(&["a1", "a2", "a4", "a5", "a6"], 5),
        "{store}"
    );
    let inactive = AgentQuery {
        status: Some(AgentStatus::Inactive),
        ..all()
    };
    assert_eq!(list(inactive).await, names(&["a1"], 1), "{store}");
    // a1 seen at 15 with a 30 s heartbeat is online until 90,015 over three heartbeats.
    let at = |now_ms, online| AgentQuery {
        online: Some(online),
        now_ms,
        ..all()
    };
    assert_eq!(
        list(at(90_015, true)).await,
        names(&["a1", "a4", "a5"], 3),
        "{store}"
    );
    assert_eq!(list(at(90_045, true)).await, names(&["a5"], 1), "{store}");
    assert_eq!(
        list(at(90_045, false)).await,
        names(&["a1", "a2", "a4", "a6"], 4),
        "{store}"
    );
    let tagged = |key: &str, value: &str| AgentQuery {
        tag: Some((key.into(), value.into())),
        ..all()
    };
    assert_eq!(
        list(tagged("team", "infra")).await,
        names(&["a1"], 1),
        "{store}"
    );
    assert_eq!(list(tagged("env", "prod")).await.1, 5, "{store}");
    assert_eq!(list(tagged("env", "dev")).await.1, 0, "{store}");
    assert_eq!(list(tagged("prod", "env")).await.1, 0, "{store}");
    let host = |text: &str| AgentQuery {
        hostname: Some(text.into()),
        ..all()
    };
    // Contains, ignoring ASCII case; `%` and `_` are themselves, not patterns.
    assert_eq!(list(host("host-E")).await, names(&["a6"], 1), "{store}");
    assert_eq!(list(host("_")).await, names(&["a5"], 1), "{store}");
    assert_eq!(list(host("%")).await.1, 0, "{store}");
    assert_eq!(list(host(".EXAMPLE")).await.1, 5, "{store}");
    // Names byte by byte in both stores: upper case before lower.
    let sorted = |sort, descending| AgentQuery {
        sort,
        descending,
        ..all()
    };
    assert_eq!(
        list(sorted(AgentSort::Name, false)).await,
        names(&["a4", "a5", "a6", "a1", "a2"], 5),
        "{store}"
    );
    assert_eq!(
        list(sorted(AgentSort::LastSeenAt, true)).await,
        names(&["a5", "a4", "a1", "a6", "a2"], 5),
        "{store}: never seen last, ties by id"
    );
    // A cursor walks every order to its end with no repeat and no gap, in both directions.
    for sort in AgentSort::ALL {
        for descending in [false, true] {
            let whole = list(sorted(sort, descending)).await.0;
            let mut walked = Vec::new();
            let mut after = None;
            loop {
                let query = AgentQuery {
                    sort,
                    descending,
                    after: after.clone(),
                    limit: 2,
                    ..all()
                };
                let (agents, total) = catalog.list_agents(t1, &query).await.unwrap();
                assert_eq!(total, 5, "{store}");
                let Some(last) = agents.last() else { break };
                after = Some((sort.key_of(last), last.id.clone()));
                walked.extend(agents.iter().map(|a| a.id.clone()));
            }
            assert_eq!(walked, whole, "{store}: {sort:?} descending {descending}");
        }
    }
    for id in ["a4", "a5", "a6"] {
        assert!(catalog.delete_agent(t1, id, None).await.unwrap(), "{store}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgresql_catalogs_conform() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteCatalog::open(&dir.path().join("catalog.db"))
        .await
        .unwrap();
    conforms(&sqlite, "sqlite").await;
    agents_conform(&sqlite, "sqlite").await;
    // Reopened, it has what it had.
    drop(sqlite);
    let again = SqliteCatalog::open(&dir.path().join("catalog.db"))
        .await
        .unwrap();
    assert_eq!(again.list_tokens(None).await.unwrap().len(), 1);

    let url = Postgres::shared().database().await;
    let postgres = PostgresCatalog::connect(&url).await.unwrap();
    conforms(&postgres, "postgresql").await;
    agents_conform(&postgres, "postgresql").await;
}
