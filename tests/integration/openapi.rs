//! The OpenAPI document at `/api/v1/openapi.json` describes SecuMon's own endpoints, and real
//! answers of each (successes and errors) validate against the schema it gives for their
//! path, method and status (JSON Schema 2020-12, as OpenAPI 3.1 has it).

use crate::support::{Backend, Secumon};
use prost::Message;
use serde_json::{json, Value};

struct Checker<'a> {
    s: &'a Secumon,
    token: String,
    document: Value,
    checked: usize,
}

impl Checker<'_> {
    /// Sends a request with the checker's token and checks its answer against the document.
    async fn check(
        &mut self,
        method: reqwest::Method,
        path: &str,
        template: &str,
        body: Option<Value>,
        want: u16,
    ) -> Value {
        let mut request = self
            .s
            .http
            .request(method.clone(), self.s.url(path))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap_or_default();
        assert_eq!(status, want, "{method} {path}: {answer}");
        let schema = &self.document["paths"][template][method.as_str().to_lowercase()]["responses"]
            [status.to_string()]["content"]["application/json"]["schema"];
        assert!(
            !schema.is_null(),
            "the document has no JSON answer for {method} {template} {status}"
        );
        // The whole document is the root, so `#/components/schemas/…` resolves.
        let mut root = self.document.clone();
        root["$defs"] = json!({"answer": schema});
        root["$ref"] = json!("#/$defs/answer");
        let validator = jsonschema::draft202012::new(&root).unwrap_or_else(|e| {
            panic!("{method} {template} {status}: the schema does not compile: {e}")
        });
        let errors: Vec<String> = validator
            .iter_errors(&answer)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {status} does not match the document: {errors:?}\n{answer}"
        );
        self.checked += 1;
        answer
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_the_openapi_document() {
    use reqwest::Method;
    let (s, catalog) = crate::auth::start(Backend::Embedded, |c| {
        c.fleet.status_interval_secs = 0;
    })
    .await;
    let admin = crate::auth::mint(&catalog, "team-a", "admin,read", None).await;
    let ingest = crate::auth::mint(&catalog, "team-a", "ingest", None).await;

    // Open, and an OpenAPI 3.1 document that lists every SecuMon endpoint.
    let response = s
        .http
        .get(s.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let document: Value = response.json().await.unwrap();
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        document["openapi"]
    );
    for (path, methods) in [
        ("/api/v1/agents", &["get", "post"][..]),
        ("/api/v1/agents/stats", &["get"]),
        ("/api/v1/agents/{id}", &["get", "put", "patch", "delete"]),
        ("/api/v1/agents/{id}/config", &["get", "put", "delete"]),
        ("/api/v1/metrics/latest/{agent}", &["get"]),
        ("/api/v1/metrics/history/{agent}", &["get"]),
        ("/ws/metrics/{agent}", &["get"]),
        ("/ws/agents", &["get"]),
        ("/v1/opamp", &["post"]),
        ("/api/v1/admin/tokens", &["get", "post"]),
        ("/api/v1/admin/tokens/{id}", &["delete"]),
        ("/api/v1/openapi.json", &["get"]),
    ] {
        for method in methods {
            assert!(
                document["paths"][path][method].is_object(),
                "{method} {path} is not in the document"
            );
        }
    }
    // The schemas are strict enough to fail: a wrong type and a missing field are caught.
    let mut root = document.clone();
    root["$ref"] = json!("#/components/schemas/AgentAnswer");
    let validator = jsonschema::draft202012::new(&root).unwrap();
    assert!(!validator.is_valid(&json!({"status": "success", "data": {"id": 1}})));
    assert!(!validator.is_valid(&json!({"status": "success"})));
    let mut c = Checker {
        s: &s,
        token: admin.clone(),
        document,
        checked: 0,
    };

    // An agent registered over OpAMP (so it has health-less attributes and a description).
    let uid = uuid::Uuid::now_v7();
    let (status, _) = crate::opamp::post(
        &s,
        &ingest,
        crate::opamp::message(&uid, 0, Some("web-1")).encode_to_vec(),
        false,
    )
    .await;
    assert_eq!(status, 200);
    let created = c
        .check(
            Method::POST,
            "/api/v1/agents",
            "/api/v1/agents",
            Some(json!({"agent_id": "planned", "tags": {"rack": "1"}})),
            201,
        )
        .await;
    let id = created["data"]["id"].as_str().unwrap().to_owned();
    c.check(
        Method::POST,
        "/api/v1/agents",
        "/api/v1/agents",
        Some(json!({"agent_id": "planned"})),
        409,
    )
    .await;
    c.check(
        Method::POST,
        "/api/v1/agents",
        "/api/v1/agents",
        Some(json!({"agent_id": "x", "ip_address": "nope"})),
        400,
    )
    .await;
    let page = c
        .check(
            Method::GET,
            "/api/v1/agents?limit=1",
            "/api/v1/agents",
            None,
            200,
        )
        .await;
    assert!(page["data"]["next_cursor"].is_string());
    c.check(
        Method::GET,
        "/api/v1/agents?limit=0",
        "/api/v1/agents",
        None,
        400,
    )
    .await;
    c.check(
        Method::GET,
        "/api/v1/agents/stats",
        "/api/v1/agents/stats",
        None,
        200,
    )
    .await;
    let listed = c
        .check(
            Method::GET,
            "/api/v1/agents?hostname=web-1",
            "/api/v1/agents",
            None,
            200,
        )
        .await;
    let opamp_id = listed["data"]["agents"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let one = "/api/v1/agents/{id}";
    let full = c
        .check(
            Method::GET,
            &format!("/api/v1/agents/{opamp_id}"),
            one,
            None,
            200,
        )
        .await;
    assert!(full["data"]["attributes"].is_object(), "{full}");
    c.check(Method::GET, "/api/v1/agents/nobody", one, None, 404)
        .await;
    c.check(
        Method::PATCH,
        &format!("/api/v1/agents/{id}"),
        one,
        Some(json!({"name": "db"})),
        200,
    )
    .await;
    c.check(
        Method::PUT,
        &format!("/api/v1/agents/{id}"),
        one,
        Some(json!({"agent_id": "planned", "status": "maybe"})),
        400,
    )
    .await;
    let config = "/api/v1/agents/{id}/config";
    let with_config = c
        .check(
            Method::PUT,
            &format!("/api/v1/agents/{opamp_id}/config"),
            config,
            Some(json!({"config_map": {"": {"body": "a: 1", "content_type": "text/yaml"}}})),
            200,
        )
        .await;
    assert!(
        with_config["data"]["remote_config"]["config_hash"].is_string(),
        "{with_config}"
    );
    c.check(
        Method::GET,
        &format!("/api/v1/agents/{opamp_id}/config"),
        config,
        None,
        200,
    )
    .await;
    c.check(
        Method::GET,
        &format!("/api/v1/agents/{id}/config"),
        config,
        None,
        404,
    )
    .await;
    c.check(
        Method::DELETE,
        &format!("/api/v1/agents/{opamp_id}/config"),
        config,
        None,
        200,
    )
    .await;
    c.check(
        Method::DELETE,
        &format!("/api/v1/agents/{id}"),
        one,
        None,
        200,
    )
    .await;

    let latest = "/api/v1/metrics/latest/{agent}";
    c.check(
        Method::GET,
        &format!("/api/v1/metrics/latest/{uid}"),
        latest,
        None,
        200,
    )
    .await;
    c.check(
        Method::GET,
        "/api/v1/metrics/latest/nobody",
        latest,
        None,
        404,
    )
    .await;
    let history = "/api/v1/metrics/history/{agent}";
    c.check(
        Method::GET,
        &format!("/api/v1/metrics/history/{uid}?metric=up"),
        history,
        None,
        200,
    )
    .await;
    c.check(
        Method::GET,
        &format!("/api/v1/metrics/history/{uid}"),
        history,
        None,
        400,
    )
    .await;

    let tokens = "/api/v1/admin/tokens";
    let token = c
        .check(
            Method::POST,
            tokens,
            tokens,
            Some(json!({"name": "ci", "scopes": ["read"], "expires": "1d"})),
            201,
        )
        .await;
    c.check(Method::GET, tokens, tokens, None, 200).await;
    let token_id = token["data"]["id"].as_str().unwrap();
    c.check(
        Method::DELETE,
        &format!("/api/v1/admin/tokens/{token_id}"),
        "/api/v1/admin/tokens/{id}",
        None,
        200,
    )
    .await;
    assert_eq!(c.checked, 23);
}
