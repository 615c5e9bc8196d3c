//! The agents registry over REST, with tokens: creation, validation with field-level errors,
//! conflicts, ETags and `If-Match`, PUT and PATCH, pages, deletion, and another tenant seeing
//! nothing of the first.

use crate::support::{Backend, Secumon};
use serde_json::{json, Value};

struct Client<'a> {
    s: &'a Secumon,
    token: String,
}

impl Client<'_> {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> (u16, Option<String>, Value) {
        let mut request = self
            .s
            .http
            .request(method, self.s.url(path))
            .header("Authorization", format!("Bearer {}", self.token));
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        if let Some(etag) = if_match {
            request = request.header("If-Match", etag);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let etag = response
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, etag, response.json().await.unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_registry_over_rest() {
    let (s, catalog) = crate::auth::start(Backend::Embedded, |_| {}).await;
    let mint = |tenant, scopes| crate::auth::mint(&catalog, tenant, scopes, None);
    let admin = Client {
        s: &s,
        token: mint("team-a", "admin,read").await,
    };
    let reader = Client {
        s: &s,
        token: mint("team-a", "read").await,
    };
    let other = Client {
        s: &s,
        token: mint("team-b", "admin,read").await,
    };
    use reqwest::Method;

    let web = json!({"agent_id": "host-1", "name": "web-1", "ip_address": "10.0.0.5",
        "tags": {"env": "prod"}, "heartbeat_secs": 10});
    let (status, _, _) = reader
        .send(Method::POST, "/api/v1/agents", Some(web.clone()), None)
        .await;
    assert_eq!(status, 403, "read scope cannot register");
    let (status, etag, created) = admin
        .send(Method::POST, "/api/v1/agents", Some(web.clone()), None)
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(etag.as_deref(), Some("\"0\""));
    let agent = &created["data"];
    assert_eq!(
        (
            &agent["agent_id"],
            &agent["name"],
            &agent["tenant_id"],
            &agent["status"],
            &agent["online"],
            &agent["tags"]["env"]
        ),
        (
            &json!("host-1"),
            &json!("web-1"),
            &json!("team-a"),
            &json!("active"),
            &json!(false),
            &json!("prod")
        ),
        "{created}"
    );
    let id = agent["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let (status, _, conflict) = admin
        .send(Method::POST, "/api/v1/agents", Some(web.clone()), None)
        .await;
    assert_eq!(
        (status, &conflict["errorType"]),
        (409, &json!("conflict")),
        "{conflict}"
    );
    // The same agent_id in another tenant is another agent.
    let (status, _, _) = other
        .send(Method::POST, "/api/v1/agents", Some(web.clone()), None)
        .await;
    assert_eq!(status, 201);

    let bad = json!({"agent_id": "", "ip_address": "ten", "status": "on", "heartbeat_secs": 0});
    let (status, _, invalid) = admin
        .send(Method::POST, "/api/v1/agents", Some(bad), None)
        .await;
    assert_eq!(status, 400, "{invalid}");
    let mut fields: Vec<&str> = invalid["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        ["agent_id", "heartbeat_secs", "ip_address", "status"],
        "{invalid}"
    );
    let (status, _, invalid) = admin
        .send(
            Method::POST,
            "/api/v1/agents",
            Some(json!({"agent_id": "x", "color": "red"})),
            None,
        )
        .await;
    assert_eq!(
        (status, &invalid["errors"][0]["field"]),
        (400, &json!("body")),
        "{invalid}"
    );

    // Reads are the tenant's.
    let path = format!("/api/v1/agents/{id}");
    let (status, etag, _) = reader.send(Method::GET, &path, None, None).await;
    assert_eq!((status, etag.as_deref()), (200, Some("\"0\"")));
    let (status, _, _) = other.send(Method::GET, &path, None, None).await;
    assert_eq!(status, 404);
    let (_, _, listed) = other.send(Method::GET, "/api/v1/agents", None, None).await;
    assert!(!listed.to_string().contains(&id), "{listed}");

    // PATCH and PUT, conditional on the ETag.
    let (status, etag, patched) = admin
        .send(
            Method::PATCH,
            &path,
            Some(json!({"name": "web-01"})),
            Some("\"0\""),
        )
        .await;
    assert_eq!((status, etag.as_deref()), (200, Some("\"1\"")), "{patched}");
    assert_eq!(
        patched["data"]["tags"]["env"], "prod",
        "PATCH keeps what it does not name"
    );
    let (status, _, stale) = admin
        .send(
            Method::PATCH,
            &path,
            Some(json!({"name": "lost"})),
            Some("\"0\""),
        )
        .await;
    assert_eq!(
        (status, &stale["errorType"]),
        (412, &json!("precondition_failed")),
        "{stale}"
    );
    let (status, etag, _) = admin
        .send(
            Method::PATCH,
            &path,
            Some(json!({"status": "inactive"})),
            None,
        )
        .await;
    assert_eq!((status, etag.as_deref()), (200, Some("\"2\"")));
    let (status, etag, replaced) = admin
        .send(
            Method::PUT,
            &path,
            Some(json!({"agent_id": "host-1"})),
            Some("\"2\""),
        )
        .await;
    assert_eq!(
        (status, etag.as_deref()),
        (200, Some("\"3\"")),
        "{replaced}"
    );
    assert_eq!(
        (
            &replaced["data"]["name"],
            &replaced["data"]["tags"],
            &replaced["data"]["status"]
        ),
        (&json!(""), &json!({}), &json!("active")),
        "PUT resets what it does not name"
    );
    let (status, _, _) = admin
        .send(Method::PATCH, "/api/v1/agents/nope", Some(json!({})), None)
        .await;
    assert_eq!(status, 404);

    // Pages, oldest first.
    for n in 2..=5 {
        let (status, _, _) = admin
            .send(
                Method::POST,
                "/api/v1/agents",
                Some(
                    json!({"agent_id": format!("host-{n}"), "hostname": format!("Node-{n}.dc1"),
                    "tags": {"rack": (n % 2).to_string()}}),
                ),
                None,
            )
            .await;
        assert_eq!(status, 201);
    }
    let (status, _, page) = reader
        .send(Method::GET, "/api/v1/agents?limit=2&offset=2", None, None)
        .await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<&str> = page["data"]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["host-3", "host-4"], "{page}");
    let (status, _, _) = reader
        .send(Method::GET, "/api/v1/agents?limit=0", None, None)
        .await;
    assert_eq!(status, 400);
    assert_eq!(page["data"]["total"], 5, "{page}");

    // A cursor walks the listing newest first, two at a time, to a last page without one.
    let mut walked = Vec::new();
    let mut next = "/api/v1/agents?limit=2&sort=-created_at".to_string();
    loop {
        let (status, _, page) = reader.send(Method::GET, &next, None, None).await;
        assert_eq!(status, 200, "{page}");
        walked.extend(
            page["data"]["agents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["agent_id"].as_str().unwrap().to_owned()),
        );
        match page["data"]["next_cursor"].as_str() {
            Some(cursor) => {
                next = format!("/api/v1/agents?limit=2&sort=-created_at&cursor={cursor}")
            }
            None => break,
        }
    }
    assert_eq!(walked, ["host-5", "host-4", "host-3", "host-2", "host-1"]);
    let (_, _, first) = reader
        .send(Method::GET, "/api/v1/agents?limit=2", None, None)
        .await;
    let cursor = first["data"]["next_cursor"].as_str().unwrap().to_owned();
    // Filters: tag, hostname, status, online.
    let listed = |page: &Value| -> Vec<String> {
        page["data"]["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["agent_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, _, tagged) = reader
        .send(Method::GET, "/api/v1/agents?tag=rack:0", None, None)
        .await;
    assert_eq!(listed(&tagged), ["host-2", "host-4"], "{tagged}");
    let (_, _, found) = reader
        .send(
            Method::GET,
            "/api/v1/agents?hostname=NODE-3&tag=rack:1",
            None,
            None,
        )
        .await;
    assert_eq!(listed(&found), ["host-3"], "{found}");
    let (_, _, offline) = reader
        .send(
            Method::GET,
            "/api/v1/agents?online=false&status=active",
            None,
            None,
        )
        .await;
    assert_eq!(offline["data"]["total"], 5, "{offline}");
    // Every bad parameter is named, in one answer.
    let (status, _, bad) = reader
        .send(
            Method::GET,
            &format!(
                "/api/v1/agents?sort=name&cursor={cursor}&status=gone&online=maybe&tag=novalue"
            ),
            None,
            None,
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    let fields: Vec<&str> = bad["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["cursor", "status", "online", "tag"], "{bad}");
    let (status, _, _) = reader
        .send(Method::GET, "/api/v1/agents?cursor=bm90LWpzb24", None, None)
        .await;
    assert_eq!(status, 400, "a cursor the server did not give");

    let (status, _, stats) = reader
        .send(Method::GET, "/api/v1/agents/stats", None, None)
        .await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(
        (
            &stats["data"]["total"],
            &stats["data"]["active"],
            &stats["data"]["online"],
            &stats["data"]["offline"]
        ),
        (&json!(5), &json!(5), &json!(0), &json!(5)),
        "{stats}"
    );
    assert_eq!(
        stats["data"]["by_os"],
        json!([{"os": "", "agents": 5}]),
        "{stats}"
    );
    let (_, _, theirs) = other
        .send(Method::GET, "/api/v1/agents/stats", None, None)
        .await;
    assert_eq!(theirs["data"]["total"], 1, "{theirs}");

    let (status, _, _) = reader.send(Method::DELETE, &path, None, None).await;
    assert_eq!(status, 403);
    let (status, _, _) = admin.send(Method::DELETE, &path, None, None).await;
    assert_eq!(status, 200);
    let (status, _, _) = admin.send(Method::GET, &path, None, None).await;
    assert_eq!(status, 404);
    let (status, _, _) = admin.send(Method::DELETE, &path, None, None).await;
    assert_eq!(status, 404);
}
