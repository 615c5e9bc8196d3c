//! Authentication and tenants over real HTTP and gRPC: every endpoint refuses a request
//! without, with a wrong, an expired, a revoked or a wrong-scope token in its own error format,
//! and takes the right one; two tenants writing the same series names each read only their own
//! through every read endpoint, on every backend.

use crate::support::raw_grpc;
use crate::support::remote_write::{encode, request, series};
use crate::support::{Backend, Secumon};
use prost::Message;
use secumon::auth::AuthMode;
use secumon::catalog::DynCatalog;
use secumon_proto::prometheus::{Exemplar, Label, MetricMetadata};
use std::time::{Duration, Instant};

/// A server requiring tokens, looking each up on every request (so a revocation is seen at
/// once), and its catalog.
pub(crate) async fn start(
    backend: Backend,
    customize: impl FnOnce(&mut secumon::config::Config),
) -> (Secumon, DynCatalog) {
    let s = Secumon::start_on(backend, |c| {
        c.auth.mode = AuthMode::On;
        c.auth.cache_secs = 0;
        customize(c);
    })
    .await;
    let catalog = secumon::catalog::open(&s.storage).await.unwrap();
    (s, catalog)
}

pub(crate) async fn mint(
    catalog: &DynCatalog,
    tenant: &str,
    scopes: &str,
    lifetime_ms: Option<i64>,
) -> String {
    secumon::auth::create_token(
        catalog.as_ref(),
        tenant,
        scopes.parse().unwrap(),
        "test",
        lifetime_ms,
        secumon::auth::AuthConfig::default().max_tokens_per_tenant,
    )
    .await
    .unwrap()
    .0
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Prometheus,
    Text,
    OtlpJson,
    OtlpProtobuf,
}

struct Endpoint {
    method: reqwest::Method,
    url: String,
    body: Vec<u8>,
    content_type: &'static str,
    ingest: bool,
    format: Format,
    /// The status of an authorized request.
    ok: u16,
}

fn endpoints(s: &Secumon) -> Vec<Endpoint> {
    let get = |path: &str| Endpoint {
        method: reqwest::Method::GET,
        url: s.url(path),
        body: Vec::new(),
        content_type: "",
        ingest: false,
        format: Format::Prometheus,
        ok: 200,
    };
    let mut all: Vec<Endpoint> = [
        "/api/v1/query?query=up",
        "/api/v1/query_range?query=up&start=0&end=60&step=15",
        "/api/v1/series?match[]=up",
        "/api/v1/labels",
        "/api/v1/label/job/values",
        "/api/v1/metadata",
        "/api/v1/query_exemplars?query=up&start=0&end=60",
        "/api/v1/format_query?query=up",
        "/api/v1/status/tsdb",
        "/api/v1/status/flags",
        "/api/v1/status/buildinfo",
    ]
    .into_iter()
    .map(get)
    .collect();
    all.push(Endpoint {
        method: reqwest::Method::POST,
        url: s.url("/api/v1/query"),
        body: b"query=up".to_vec(),
        content_type: "application/x-www-form-urlencoded",
        ..get("/")
    });
    all.push(Endpoint {
        method: reqwest::Method::POST,
        url: s.url("/api/v1/write"),
        body: encode(&request(vec![], vec![])),
        content_type: "application/x-protobuf",
        ingest: true,
        format: Format::Text,
        ok: 204,
    });
    all.push(Endpoint {
        method: reqwest::Method::POST,
        url: s.url("/api/v1/otlp/v1/metrics"),
        body: b"{}".to_vec(),
        content_type: "application/json",
        ingest: true,
        format: Format::OtlpJson,
        ok: 200,
    });
    all.push(Endpoint {
        method: reqwest::Method::POST,
        url: format!("http://{}/v1/metrics", s.server.otlp_http_addr.unwrap()),
        body: Vec::new(),
        content_type: "application/x-protobuf",
        ingest: true,
        format: Format::OtlpProtobuf,
        ok: 200,
    });
    all
}

/// Sends `e` with `authorization` (a header value) and checks a refusal's status, format and
/// challenge, or that an accepted request got its endpoint's answer.
async fn check(s: &Secumon, e: &Endpoint, authorization: Option<&str>, want: u16, why: &str) {
    let mut request = s
        .http
        .request(e.method.clone(), &e.url)
        .body(e.body.clone());
    if !e.content_type.is_empty() {
        request = request.header("Content-Type", e.content_type);
    }
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenges: Vec<String> = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.bytes().await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, want, "{why}: {} {}: {text}", e.method, e.url);
    if want != 401 && want != 403 {
        return;
    }
    assert_eq!(
        !challenges.is_empty(),
        want == 401,
        "{why}: {}: challenges {challenges:?}",
        e.url
    );
    if want == 401 {
        assert!(
            challenges.iter().any(|c| c.starts_with("Bearer")),
            "{challenges:?}"
        );
    }
    match e.format {
        Format::Prometheus => {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["status"], "error", "{why}: {text}");
            let kind = if want == 401 {
                "unauthorized"
            } else {
                "forbidden"
            };
            assert_eq!(json["errorType"], kind, "{why}: {text}");
        }
        Format::Text => assert!(
            content_type.starts_with("text/plain"),
            "{why}: {content_type}"
        ),
        Format::OtlpJson => {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                json["code"],
                if want == 401 { 16 } else { 7 },
                "{why}: {text}"
            );
        }
        Format::OtlpProtobuf => {
            let status = secumon_proto::google_rpc::Status::decode(&body[..]).unwrap();
            assert_eq!(
                status.code,
                if want == 401 { 16 } else { 7 },
                "{why}: {status:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_refuses_missing_wrong_expired_revoked_and_wrong_scope_tokens() {
    // Dozens of failures from one address: the brute-force limit is the next test's.
    let (s, catalog) = start(Backend::Embedded, |c| c.auth.max_failures_per_minute = 0).await;
    let read = mint(&catalog, "team-a", "read", None).await;
    let ingest = mint(&catalog, "team-a", "ingest", None).await;
    let expired = mint(&catalog, "team-a", "ingest,read", Some(1)).await;
    let revoked = mint(&catalog, "team-a", "ingest,read", None).await;
    let operator = mint(&catalog, "ops", "operator", None).await;
    let id = catalog
        .list_tokens(None)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.hash == secumon::auth::token::hash(&revoked))
        .unwrap()
        .id;
    assert!(catalog.delete_token(&id, None).await.unwrap());
    tokio::time::sleep(Duration::from_millis(5)).await;
    // A token of the right form that the catalog does not know.
    let unknown = secumon::auth::token::generate().unwrap();
    let bearer = |t: &str| format!("Bearer {t}");
    for e in endpoints(&s) {
        check(&s, &e, None, 401, "no credentials").await;
        check(&s, &e, Some("Bearer smn_nonsense"), 401, "malformed").await;
        check(&s, &e, Some(&bearer(&unknown)), 401, "unknown").await;
        check(&s, &e, Some(&bearer(&expired)), 401, "expired").await;
        check(&s, &e, Some(&bearer(&revoked)), 401, "revoked").await;
        let (right, wrong) = if e.ingest {
            (&ingest, &read)
        } else {
            (&read, &ingest)
        };
        check(&s, &e, Some(&bearer(wrong)), 403, "wrong scope").await;
        check(&s, &e, Some(&bearer(right)), e.ok, "right scope").await;
        check(&s, &e, Some(&bearer(&operator)), e.ok, "operator").await;
        // Basic auth with the token as password, as Grafana sends it.
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("grafana:{right}"));
        check(&s, &e, Some(&format!("Basic {basic}")), e.ok, "basic").await;
    }
    // Health, readiness and the server's metrics stay open.
    for path in ["/health", "/ready", "/metrics"] {
        let status = s.http.get(s.url(path)).send().await.unwrap().status();
        assert_eq!(status.as_u16(), 200, "{path}");
    }

    // OTLP/gRPC: UNAUTHENTICATED, PERMISSION_DENIED, then accepted.
    let grpc = s.server.otlp_grpc_addr.unwrap();
    for (authorization, code) in [
        (None, tonic::Code::Unauthenticated),
        (Some(bearer(&unknown)), tonic::Code::Unauthenticated),
        (Some(bearer(&expired)), tonic::Code::Unauthenticated),
        (Some(bearer(&revoked)), tonic::Code::Unauthenticated),
        (Some(bearer(&read)), tonic::Code::PermissionDenied),
    ] {
        let answer = raw_grpc::export_authorized(grpc, Vec::new(), authorization.as_deref()).await;
        assert_eq!(answer.unwrap_err().code(), code, "{authorization:?}");
    }
    raw_grpc::export_authorized(grpc, Vec::new(), Some(&bearer(&ingest)))
        .await
        .unwrap();

    // Only an operator token may name another tenant.
    let e = &endpoints(&s)[0];
    let named = |token: &str| {
        s.http
            .get(&e.url)
            .header("Authorization", bearer(token))
            .header("X-Scope-OrgID", "team-b")
            .send()
    };
    assert_eq!(named(&read).await.unwrap().status().as_u16(), 403);
    assert_eq!(named(&operator).await.unwrap().status().as_u16(), 200);

    // Last use reaches the catalog (at the latest at shutdown).
    s.server.stop().await;
    let tokens = catalog.list_tokens(None).await.unwrap();
    let used = |t: &str| {
        let hash = secumon::auth::token::hash(t);
        tokens.iter().find(|r| r.hash == hash).unwrap().last_used_at
    };
    assert!(used(&read).is_some() && used(&operator).is_some());
    assert_eq!(used(&expired), None);
}

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

/// What tenant `who` writes: `iso{who}` only it has, `same{job}` both have (with the tenant's
/// value), metadata and an exemplar of its own.
fn tenant_write(who: &str, value: f64, h0: i64) -> Vec<u8> {
    let samples: Vec<(i64, f64)> = (0..=120).map(|i| (h0 + i * MINUTE, value)).collect();
    let mut same = series(&[("__name__", "same"), ("job", "x")], &samples);
    same.exemplars = vec![Exemplar {
        labels: vec![Label {
            name: "trace_id".into(),
            value: format!("trace-{who}"),
        }],
        value,
        timestamp: h0 + 60 * MINUTE,
    }];
    let only = series(&[("__name__", "iso"), ("only", who)], &samples);
    let metadata = MetricMetadata {
        r#type: secumon_proto::prometheus::metric_metadata::MetricType::Gauge as i32,
        metric_family_name: "same".into(),
        help: format!("help of {who}"),
        unit: String::new(),
    };
    encode(&request(vec![same, only], vec![metadata]))
}

/// Makes rollups of what was written readable: TimescaleDB's refresh jobs run (PGlite runs no
/// background jobs); the embedded engine and plain PostgreSQL do it themselves.
async fn materialize(s: &Secumon, backend: Backend) {
    if backend != Backend::TimescaleDb {
        return;
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(s.database_url.as_deref().unwrap())
        .await
        .unwrap();
    let jobs: Vec<i32> = sqlx::query_scalar(
        "SELECT job_id FROM timescaledb_information.jobs
         WHERE proc_name = 'policy_refresh_continuous_aggregate' ORDER BY job_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for id in jobs {
        sqlx::raw_sql(&format!("CALL run_job({id})"))
            .execute(&pool)
            .await
            .unwrap();
    }
}

fn rollup_selects(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("secumon_query_rollup_selects_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn tenants_read_only_their_own(backend: Backend) {
    let (s, catalog) = start(backend, |c| {
        c.embedded.flush_interval_secs = 1;
        c.postgres.lifecycle_interval_secs = 1;
    })
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let h0 = (now - 4 * HOUR).div_euclid(HOUR) * HOUR;
    let mut tokens = Vec::new();
    for (who, value) in [("a", 1.0), ("b", 2.0)] {
        let ingest = mint(&catalog, &format!("team-{who}"), "ingest", None).await;
        let response = s
            .http
            .post(s.url("/api/v1/write"))
            .header("Authorization", format!("Bearer {ingest}"))
            .body(tenant_write(who, value, h0))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 204, "{backend:?} {who}");
        tokens.push((
            who,
            value,
            mint(&catalog, &format!("team-{who}"), "read", None).await,
        ));
    }
    materialize(&s, backend).await;
    let (start, end) = (
        (h0 / 1000).to_string(),
        ((h0 + 2 * HOUR) / 1000).to_string(),
    );
    let at = ((h0 + 2 * HOUR) / 1000).to_string();
    for (who, value, token) in &tokens {
        let other = if *who == "a" { "b" } else { "a" };
        let get = |path: &'static str, params: Vec<(&'static str, String)>| {
            let token = token.clone();
            let s = &s;
            async move {
                let response = s
                    .http
                    .get(s.url(path))
                    .query(&params)
                    .header("Authorization", format!("Bearer {token}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200, "{path}");
                response.json::<serde_json::Value>().await.unwrap()["data"].clone()
            }
        };
        let why = format!("{backend:?} tenant {who}");
        let v = get(
            "/api/v1/query",
            vec![("query", "same".into()), ("time", at.clone())],
        )
        .await;
        assert_eq!(v["result"].as_array().unwrap().len(), 1, "{why}: {v}");
        assert_eq!(v["result"][0]["value"][1], value.to_string(), "{why}: {v}");
        let v = get(
            "/api/v1/query_range",
            vec![
                ("query", "count(iso)".into()),
                ("start", start.clone()),
                ("end", end.clone()),
                ("step", "600".into()),
            ],
        )
        .await;
        assert!(
            v["result"][0]["values"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p[1] == "1"),
            "{why}: {v}"
        );
        let v = get(
            "/api/v1/series",
            vec![
                ("match[]", "{__name__=~\".+\"}".into()),
                ("start", start.clone()),
                ("end", end.clone()),
            ],
        )
        .await;
        let names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(names.len(), 2, "{why}: {v}");
        assert!(
            !v.to_string().contains(&format!("\"only\":\"{other}\"")),
            "{why}: {v}"
        );
        let v = get(
            "/api/v1/labels",
            vec![("start", start.clone()), ("end", end.clone())],
        )
        .await;
        assert_eq!(v, serde_json::json!(["__name__", "job", "only"]), "{why}");
        let v = get(
            "/api/v1/label/only/values",
            vec![("start", start.clone()), ("end", end.clone())],
        )
        .await;
        assert_eq!(v, serde_json::json!([who]), "{why}");
        let v = get("/api/v1/metadata", vec![]).await;
        assert_eq!(v["same"][0]["help"], format!("help of {who}"), "{why}: {v}");
        assert_eq!(v["same"].as_array().unwrap().len(), 1, "{why}: {v}");
        let v = get(
            "/api/v1/query_exemplars",
            vec![
                ("query", "same".into()),
                ("start", start.clone()),
                ("end", end.clone()),
            ],
        )
        .await;
        assert_eq!(v.as_array().unwrap().len(), 1, "{why}: {v}");
        assert_eq!(
            v[0]["exemplars"][0]["labels"]["trace_id"],
            format!("trace-{who}"),
            "{why}: {v}"
        );
        let v = get("/api/v1/status/tsdb", vec![]).await;
        assert_eq!(v["headStats"]["numSeries"], 2, "{why}: {v}");

        // Rollup reads: an aligned max_over_time is answered from rollups once they exist.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let before = rollup_selects(&s.metrics_text().await);
            let v = get(
                "/api/v1/query",
                vec![
                    ("query", "max_over_time(same[1h])".into()),
                    ("time", ((h0 + HOUR) / 1000).to_string()),
                ],
            )
            .await;
            assert_eq!(v["result"].as_array().unwrap().len(), 1, "{why}: {v}");
            assert_eq!(v["result"][0]["value"][1], value.to_string(), "{why}: {v}");
            if rollup_selects(&s.metrics_text().await) > before {
                break;
            }
            assert!(Instant::now() < deadline, "{why}: rollups never answered");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_read_only_their_own_on_the_embedded_engine() {
    tenants_read_only_their_own(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_read_only_their_own_on_postgresql() {
    tenants_read_only_their_own(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_read_only_their_own_on_timescaledb() {
    tenants_read_only_their_own(Backend::TimescaleDb).await;
}

/// The admin API creates, lists and revokes a tenant's tokens; it hands out no more than the
/// caller holds and touches no other tenant's tokens; a revoked token stops working on this
/// server at once, however long tokens are cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_manages_only_its_tenants_tokens() {
    let (s, catalog) = start(Backend::Embedded, |c| c.auth.cache_secs = 3600).await;
    let admin = mint(&catalog, "team-a", "admin", None).await;
    let read = mint(&catalog, "team-a", "read", None).await;
    let other = mint(&catalog, "team-b", "read", None).await;
    let send =
        |method: reqwest::Method, path: String, token: String, body: Option<serde_json::Value>| {
            let s = &s;
            async move {
                let mut request = s
                    .http
                    .request(method, s.url(&path))
                    .header("Authorization", format!("Bearer {token}"));
                if let Some(body) = body {
                    request = request.body(body.to_string());
                }
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                (
                    status,
                    response
                        .json::<serde_json::Value>()
                        .await
                        .unwrap_or_default(),
                )
            }
        };
    let (status, created) = send(
        reqwest::Method::POST,
        "/api/v1/admin/tokens".into(),
        admin.clone(),
        Some(serde_json::json!({"name": "grafana", "scopes": ["read"], "expires": "1h"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let data = &created["data"];
    assert_eq!(data["tenant"], "team-a");
    assert_eq!(data["scopes"], serde_json::json!(["read"]));
    assert!(data["expires_at"].is_string(), "{created}");
    let new = data["token"].as_str().unwrap().to_owned();
    let id = data["id"].as_str().unwrap().to_owned();
    let query = |token: String| {
        let s = &s;
        async move {
            s.http
                .get(s.url("/api/v1/labels"))
                .header("Authorization", format!("Bearer {token}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(query(new.clone()).await, 200);

    let (status, listed) = send(
        reqwest::Method::GET,
        "/api/v1/admin/tokens".into(),
        admin.clone(),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let listed = listed["data"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed
        .iter()
        .all(|t| t["tenant"] == "team-a" && t.get("token").is_none()));

    for (token, body, want) in [
        (
            admin.clone(),
            serde_json::json!({"name": "x", "scopes": ["operator"]}),
            403,
        ),
        (
            read.clone(),
            serde_json::json!({"name": "x", "scopes": ["read"]}),
            403,
        ),
        (
            admin.clone(),
            serde_json::json!({"name": "x", "scopes": ["write"]}),
            400,
        ),
        (
            admin.clone(),
            serde_json::json!({"name": "", "scopes": ["read"]}),
            400,
        ),
        (admin.clone(), serde_json::json!({"scopes": ["read"]}), 400),
    ] {
        let (status, answer) = send(
            reqwest::Method::POST,
            "/api/v1/admin/tokens".into(),
            token,
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, want, "{body}: {answer}");
    }

    // An operator token kept in the tenant is neither listed to nor revocable by its admins.
    let operator = mint(&catalog, "team-a", "operator", None).await;
    let operator_id = catalog
        .list_tokens(None)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.hash == secumon::auth::token::hash(&operator))
        .unwrap()
        .id;
    let (_, listed) = send(
        reqwest::Method::GET,
        "/api/v1/admin/tokens".into(),
        admin.clone(),
        None,
    )
    .await;
    assert!(!listed.to_string().contains(&operator_id), "{listed}");
    let (status, _) = send(
        reqwest::Method::DELETE,
        format!("/api/v1/admin/tokens/{operator_id}"),
        admin.clone(),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (_, listed) = send(
        reqwest::Method::GET,
        "/api/v1/admin/tokens".into(),
        operator.clone(),
        None,
    )
    .await;
    assert!(listed.to_string().contains(&operator_id), "{listed}");

    // Another tenant's token is not found; the tenant's own is revoked and refused at once.
    let other_id = catalog
        .list_tokens(Some(&secumon::model::TenantId::new("team-b")))
        .await
        .unwrap()[0]
        .id
        .clone();
    let (status, _) = send(
        reqwest::Method::DELETE,
        format!("/api/v1/admin/tokens/{other_id}"),
        admin.clone(),
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(query(other.clone()).await, 200);
    let (status, _) = send(
        reqwest::Method::DELETE,
        format!("/api/v1/admin/tokens/{id}"),
        admin.clone(),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(query(new).await, 401);

    // With authentication off every caller would be an operator: no token administration.
    let open = Secumon::start_on(Backend::Embedded, |_| {}).await;
    let response = open
        .http
        .post(open.url("/api/v1/admin/tokens"))
        .body(serde_json::json!({"name": "x", "scopes": ["operator"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
}

/// Past `--auth-max-failures-per-minute` guesses from one address, over HTTP or gRPC, the
/// address may still use tokens this server checked lately, but anything it would have to look
/// up is refused with 429 (gRPC `RESOURCE_EXHAUSTED` with `RetryInfo`) for the rest of the
/// minute. Missing credentials and expired tokens are not guesses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_past_its_guesses_is_refused_for_the_rest_of_the_minute() {
    let (s, catalog) = start(Backend::Embedded, |c| {
        c.auth.max_failures_per_minute = 5;
        c.auth.cache_secs = 3600;
    })
    .await;
    let read = mint(&catalog, "team-a", "read,ingest", None).await;
    let fresh = mint(&catalog, "team-a", "read,ingest", None).await;
    let expired = mint(&catalog, "team-a", "read", Some(1)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let wrong = format!("Bearer {}", secumon::auth::token::generate().unwrap());
    let labels = |authorization: Option<String>| {
        let s = &s;
        async move {
            let mut request = s.http.get(s.url("/api/v1/labels"));
            if let Some(value) = authorization {
                request = request.header("Authorization", value);
            }
            request.send().await.unwrap()
        }
    };
    // Not guesses: no credentials, an expired token.
    for _ in 0..10 {
        assert_eq!(labels(None).await.status().as_u16(), 401);
        assert_eq!(
            labels(Some(format!("Bearer {expired}")))
                .await
                .status()
                .as_u16(),
            401
        );
    }
    assert_eq!(
        labels(Some(format!("Bearer {read}")))
            .await
            .status()
            .as_u16(),
        200
    );

    let grpc = s.server.otlp_grpc_addr.unwrap();
    for _ in 0..3 {
        let answer = raw_grpc::export_authorized(grpc, Vec::new(), Some(&wrong)).await;
        assert_eq!(answer.unwrap_err().code(), tonic::Code::Unauthenticated);
    }
    for _ in 0..2 {
        assert_eq!(labels(Some(wrong.clone())).await.status().as_u16(), 401);
    }
    // Throttled: a token checked lately still works, one to look up does not.
    assert_eq!(
        labels(Some(format!("Bearer {read}")))
            .await
            .status()
            .as_u16(),
        200
    );
    let throttled = labels(Some(format!("Bearer {fresh}"))).await;
    assert_eq!(throttled.status().as_u16(), 429);
    let wait: u64 = throttled.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let body: serde_json::Value = throttled.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("too many failed"),
        "{body}"
    );
    let refused = raw_grpc::export_authorized(grpc, Vec::new(), Some(&format!("Bearer {fresh}")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    use tonic_types::StatusExt;
    assert!(refused.get_details_retry_info().is_some(), "{refused:?}");
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains("secumon_auth_refused_total{reason=\"unauthenticated\"} 25"),
        "{metrics}"
    );
    assert!(
        metrics.contains("secumon_auth_refused_total{reason=\"throttled\"} 2"),
        "{metrics}"
    );
}

/// The real clients, configured the way their users configure them: Prometheus 2.42 with
/// `remote_write.authorization.credentials`, the OpenTelemetry Python SDK with
/// `OTEL_EXPORTER_OTLP_HEADERS` over gRPC and HTTP; each lands in its token's tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_and_the_opentelemetry_sdk_write_into_their_tenants() {
    let (s, catalog) = start(Backend::Embedded, |_| {}).await;
    let sdk_ingest = mint(&catalog, "apps", "ingest", None).await;
    let sdk_read = mint(&catalog, "apps", "read", None).await;
    let prom_ingest = mint(&catalog, "infra", "ingest", None).await;
    let prom_read = mint(&catalog, "infra", "read", None).await;

    let headers = format!("authorization=Bearer%20{sdk_ingest}");
    let env = [("OTEL_EXPORTER_OTLP_HEADERS", headers.as_str())];
    let grpc = format!("http://{}", s.server.otlp_grpc_addr.unwrap());
    let (ok, log) = crate::otlp::python_export_with("grpc", &grpc, "cumulative", "grpc-run", &env);
    assert!(ok, "gRPC export failed: {log}");
    let http = format!("http://{}", s.server.otlp_http_addr.unwrap());
    let (ok, log) = crate::otlp::python_export_with("http", &http, "cumulative", "http-run", &env);
    assert!(ok, "HTTP export failed: {log}");
    // Without the header the SDK's export fails.
    let (ok, _) = crate::otlp::python_export_with("http", &http, "cumulative", "anon-run", &[]);
    assert!(!ok, "an export without a token was accepted");

    let write_url = s.url("/api/v1/write");
    let _prometheus = crate::support::Prometheus::start(|port| {
        format!(
            r#"
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
remote_write:
  - url: {write_url}
    authorization: {{credentials: {prom_ingest}}}
    queue_config: {{batch_send_deadline: 500ms, min_backoff: 100ms, max_backoff: 1s}}
"#
        )
    });

    let query = |token: String, q: &'static str| {
        let s = &s;
        async move {
            let response = s
                .http
                .get(s.url("/api/v1/query"))
                .query(&[("query", q)])
                .header("Authorization", format!("Bearer {token}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
            let body: serde_json::Value = response.json().await.unwrap();
            body["data"]["result"].clone()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while query(prom_read.clone(), "up{job=\"prometheus\"}").await[0]["value"][1] != "1" {
        assert!(
            Instant::now() < deadline,
            "Prometheus's samples never arrived"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let runs = query(sdk_read.clone(), "count by (instance) (requests_total)").await;
    let mut instances: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metric"]["instance"].as_str().unwrap())
        .collect();
    instances.sort();
    assert_eq!(instances, ["grpc-run", "http-run"], "{runs}");
    // Neither tenant sees the other's series.
    assert_eq!(query(sdk_read, "up").await, serde_json::json!([]));
    assert_eq!(
        query(prom_read, "requests_total").await,
        serde_json::json!([])
    );
}

/// Each tenant has its own ingest rate: past it a request is refused whole with 429 and
/// `Retry-After` (gRPC `RESOURCE_EXHAUSTED`) while other tenants write on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_is_held_to_its_own_ingest_rate() {
    let (s, catalog) = start(Backend::Embedded, |c| {
        c.ingest.tenant_samples_per_second = 100;
        c.ingest.tenant_burst_samples = 1_000;
        c.ingest.max_samples_per_request = 1_000;
    })
    .await;
    let a = mint(&catalog, "team-a", "ingest", None).await;
    let b = mint(&catalog, "team-b", "ingest", None).await;
    let now = chrono::Utc::now().timestamp_millis();
    let body = |n: i64| {
        let samples: Vec<(i64, f64)> = (0..1_000)
            .map(|i| (now - 100_000 + i * 10 + n, 1.0))
            .collect();
        encode(&request(
            vec![series(&[("__name__", "rated")], &samples)],
            vec![],
        ))
    };
    let write = |token: &str, body: Vec<u8>| {
        s.http
            .post(s.url("/api/v1/write"))
            .header("Authorization", format!("Bearer {token}"))
            .body(body)
            .send()
    };
    assert_eq!(write(&a, body(0)).await.unwrap().status().as_u16(), 204);
    let limited = write(&a, body(1)).await.unwrap();
    assert_eq!(limited.status().as_u16(), 429);
    let wait: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((9..=11).contains(&wait), "retry after {wait}");
    assert!(limited
        .text()
        .await
        .unwrap()
        .contains("--ingest-tenant-samples-per-second"));
    assert_eq!(write(&b, body(0)).await.unwrap().status().as_u16(), 204);

    // OTLP/HTTP and gRPC for the tenant over its rate: 500 points the bucket does not hold.
    let points: Vec<serde_json::Value> = (0..500)
        .map(|i| {
            let t = (now - 50_000 + i * 10) as u64 * 1_000_000;
            serde_json::json!({"timeUnixNano": t.to_string(), "asDouble": 1.0})
        })
        .collect();
    let point = serde_json::json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "g",
        "gauge": {"dataPoints": points}}]}]}]});
    let response = s
        .http
        .post(format!(
            "http://{}/v1/metrics",
            s.server.otlp_http_addr.unwrap()
        ))
        .header("Authorization", format!("Bearer {a}"))
        .header("Content-Type", "application/json")
        .body(point.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let status: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status["code"], 8, "{status}");
    let mut export = Vec::new();
    let sample = serde_json::from_value::<
        opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
    >(point)
    .unwrap();
    sample.encode(&mut export).unwrap();
    let answer = raw_grpc::export_authorized(
        s.server.otlp_grpc_addr.unwrap(),
        export,
        Some(&format!("Bearer {a}")),
    )
    .await;
    let refused = answer.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    use tonic_types::StatusExt;
    let retry = refused.get_details_retry_info().expect("RetryInfo");
    assert!(
        retry.retry_delay.is_some_and(|d| d.as_secs() >= 1),
        "{retry:?}"
    );
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains("secumon_samples_rejected_total{protocol=\"remote_write\",reason=\"rate_limited\"} 1000"),
        "{metrics}"
    );
}

/// `--auth auto` (the default) requires tokens as soon as a listener leaves loopback; `--auth
/// off` there is served, with a warning in `/api/v1/status/flags`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_requires_tokens_beyond_loopback() {
    let s = Secumon::start_on(Backend::Embedded, |c| c.http_listen = "0.0.0.0:0".into()).await;
    let url = format!(
        "http://127.0.0.1:{}/api/v1/status/flags",
        s.server.addr.port()
    );
    let response = s.http.get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);

    let open = Secumon::start_on(Backend::Embedded, |c| {
        c.http_listen = "0.0.0.0:0".into();
        c.auth.mode = AuthMode::Off;
    })
    .await;
    let url = format!(
        "http://127.0.0.1:{}/api/v1/status/flags",
        open.server.addr.port()
    );
    let flags: serde_json::Value = open
        .http
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        flags["data"]["auth"].as_str().unwrap().contains("WARNING"),
        "{flags}"
    );
    // On loopback, auto leaves it off.
    let local = Secumon::start_on(Backend::Embedded, |_| {}).await;
    let (status, flags) = local.get_json("/api/v1/status/flags", &[]).await;
    assert_eq!((status, flags["data"]["auth"].as_str()), (200, Some("off")));
}

/// Behind an authenticating proxy: requests from `--auth-trusted-proxies` that name a tenant in
/// `X-Scope-OrgID` are served in it without a token; from elsewhere the header grants nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_names_the_tenant() {
    let (s, _) = start(Backend::Embedded, |c| {
        c.auth.trusted_proxies = "127.0.0.0/8".into()
    })
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let send = |tenant: &'static str, body: Vec<u8>| {
        s.http
            .post(s.url("/api/v1/write"))
            .header("X-Scope-OrgID", tenant)
            .body(body)
            .send()
    };
    let body = |v: f64| {
        encode(&request(
            vec![series(&[("__name__", "proxied")], &[(now, v)])],
            vec![],
        ))
    };
    assert_eq!(
        send("team-a", body(1.0)).await.unwrap().status().as_u16(),
        204
    );
    assert_eq!(
        send("team-b", body(2.0)).await.unwrap().status().as_u16(),
        204
    );
    assert_eq!(send("a/b", body(3.0)).await.unwrap().status().as_u16(), 403);
    for (tenant, value) in [("team-a", "1"), ("team-b", "2")] {
        let answer: serde_json::Value = s
            .http
            .get(s.url("/api/v1/query"))
            .query(&[("query", "proxied")])
            .header("X-Scope-OrgID", tenant)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["data"]["result"][0]["value"][1], value, "{answer}");
    }
    // Without the header, a token is needed; admin is not granted through the proxy.
    let status = s
        .http
        .get(s.url("/api/v1/labels"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 401);
    let status = s
        .http
        .get(s.url("/api/v1/admin/tokens"))
        .header("X-Scope-OrgID", "team-a")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 403);

    // A server that trusts another address takes the header from no one.
    let (other, _) = start(Backend::Embedded, |c| {
        c.auth.trusted_proxies = "10.0.0.1".into()
    })
    .await;
    let status = other
        .http
        .post(other.url("/api/v1/write"))
        .header("X-Scope-OrgID", "team-a")
        .body(body(1.0))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 401);
}

/// A tenant holds at most `--auth-max-tokens-per-tenant` tokens (1,000 by default); another
/// tenant is not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_holds_a_bounded_number_of_tokens() {
    use secumon::auth::{create_token, AuthConfig, CreateError};
    assert_eq!(AuthConfig::default().max_tokens_per_tenant, 1000);
    let dir = tempfile::tempdir().unwrap();
    let catalog = secumon::catalog::open(&dir.path().display().to_string())
        .await
        .unwrap();
    let read = || "read".parse().unwrap();
    let most = 20;
    for _ in 0..most {
        create_token(catalog.as_ref(), "full", read(), "t", None, most)
            .await
            .unwrap();
    }
    match create_token(catalog.as_ref(), "full", read(), "t", None, most).await {
        Err(CreateError::Invalid(m)) => assert!(m.contains("20 tokens"), "{m}"),
        other => panic!("token past the limit: {other:?}"),
    }
    create_token(catalog.as_ref(), "other", read(), "t", None, most)
        .await
        .unwrap();
}
