//! Who is calling: credentials as clients send them (`Authorization: Bearer <token>`, or HTTP
//! basic auth with the token as password), checked against the catalog's token hashes, to a
//! [`Caller`] with a tenant and scopes. Protocol handlers turn an [`AuthError`] into their own
//! error format; this module knows no protocol.
//!
//! A check costs a SHA-256 and a map lookup: tokens are cached by hash for
//! `--auth-cache-secs` (so a revoked token stops working within that time on every server
//! sharing the catalog), and their last use is written to the catalog in batches.

pub mod token;

pub use token::{Scope, Scopes};

use crate::catalog::{CatalogError, DynCatalog, TokenRecord};
use crate::model::TenantId;
use http::HeaderMap;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When requests must carry a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Off while every listener is on a loopback address, required as soon as one is not.
    Auto,
    On,
    /// Off, even beyond loopback (warned at start and in `/api/v1/status/flags`).
    Off,
}

/// Authentication settings.
#[derive(Clone, Debug, serde::Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether requests need a token: `auto` requires one as soon as a listener is not on a
    /// loopback address; `on`; `off` (warned at start when listening beyond loopback).
    #[arg(
        id = "auth.mode",
        long = "auth",
        env = "SECUMON_AUTH",
        value_enum,
        default_value_t = AuthMode::Auto
    )]
    pub mode: AuthMode,
    /// Seconds a token checked against the catalog is trusted before it is looked up again:
    /// the longest a revoked token keeps working.
    #[arg(
        id = "auth.cache_secs",
        long = "auth-cache-secs",
        env = "SECUMON_AUTH_CACHE_SECS",
        default_value_t = 10
    )]
    pub cache_secs: u64,
    /// Require a token with the `read` scope for `/metrics` too (open by default, as
    /// Prometheus's own; note it names tenants in `secumon_active_series`).
    #[arg(
        id = "auth.protect_metrics",
        long = "auth-protect-metrics",
        env = "SECUMON_AUTH_PROTECT_METRICS",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub protect_metrics: bool,
    /// Addresses of authenticating proxies (comma-separated IPs or CIDR ranges): a request
    /// from one of them that names its tenant in `X-Scope-OrgID` (as Mimir and Cortex take it)
    /// is served in that tenant with the ingest and read scopes, without a token.
    #[arg(
        id = "auth.trusted_proxies",
        long = "auth-trusted-proxies",
        env = "SECUMON_AUTH_TRUSTED_PROXIES",
        default_value = ""
    )]
    pub trusted_proxies: String,
    /// Failed authentications one client address may make in a minute; past it, its requests
    /// are refused with 429 (gRPC `RESOURCE_EXHAUSTED`) until the minute is over, valid token
    /// or not. 0: no limit.
    #[arg(
        id = "auth.max_failures_per_minute",
        long = "auth-max-failures-per-minute",
        env = "SECUMON_AUTH_MAX_FAILURES_PER_MINUTE",
        default_value_t = 20
    )]
    pub max_failures_per_minute: u32,
    /// Most API tokens one tenant may hold (revoked ones no longer count): past it, creating
    /// one is refused (`secumon token create`, `POST /api/v1/admin/tokens`). Bounds what an
    /// admin, or a script gone wrong, can make the catalog hold.
    #[arg(
        id = "auth.max_tokens_per_tenant",
        long = "auth-max-tokens-per-tenant",
        env = "SECUMON_AUTH_MAX_TOKENS_PER_TENANT",
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_tokens_per_tenant: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

impl AuthConfig {
    /// Whether requests need a token when the server listens on `addresses`.
    /// (Trusted proxies require it too: the tenant they name is only read when tokens are.)
    pub fn required(&self, addresses: &[std::net::SocketAddr]) -> bool {
        match self.mode {
            AuthMode::On => true,
            AuthMode::Off => false,
            AuthMode::Auto => {
                !self.trusted_proxies.trim().is_empty()
                    || addresses.iter().any(|a| !a.ip().is_loopback())
            }
        }
    }
}

/// The header naming the tenant a request of an operator token acts in (Mimir's and Cortex's).
pub const TENANT_HEADER: &str = "x-scope-orgid";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub tenant: TenantId,
    pub scopes: Scopes,
    /// The token's id; `None` when authentication is off.
    pub token_id: Option<String>,
}

impl Caller {
    /// The caller of every request while authentication is off.
    pub fn anonymous() -> Caller {
        Caller {
            tenant: TenantId::default(),
            scopes: Scopes::all(),
            token_id: None,
        }
    }

    /// Whether the caller may do what `scope` allows.
    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        if self.scopes.allows(scope) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "the token has scopes {}; this needs {}",
                self.scopes,
                scope.as_str()
            )))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials that are not a valid token: 401.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A valid token without the scope, or naming a tenant it may not act in: 403.
    #[error("{0}")]
    Forbidden(String),
    /// Too many failed authentications from the client's address lately: 429 with
    /// `Retry-After` (seconds).
    #[error("too many failed authentications from this address; retry in {0} s")]
    Throttled(u64),
    /// The catalog could not be read: 503, the client may retry.
    #[error("cannot check the token now: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// The `reason` label of `secumon_auth_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Unauthenticated(_) => "unauthenticated",
            AuthError::Forbidden(_) => "forbidden",
            AuthError::Throttled(_) => "throttled",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

/// An IPv4 client seen through an IPv6 socket (`::ffff:a.b.c.d`) as the IPv4 address.
fn unmapped(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// The address failures are counted under: an IPv4 address, or the /64 of an IPv6 one (a
/// single host commonly holds a whole /64).
fn failure_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Tenant ids as Mimir accepts them: 1 to 150 characters of letters, digits and `!-_.*'()`,
/// not `.` or `..`.
pub fn valid_tenant(id: &str) -> bool {
    (1..=150).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!-_.*'()".contains(&b))
}

/// A token found in the catalog, with when it was read.
struct Cached {
    record: TokenRecord,
    at: Instant,
}

/// Tokens the catalog had and had not, by hash, each trusted for the cache time. Hashes not
/// found are kept apart and fewer, so made-up tokens never push out real ones.
#[derive(Default)]
struct TokenCache {
    found: HashMap<String, Cached>,
    missing: HashMap<String, Instant>,
}

/// Most found tokens remembered (past it, the expired go, then the oldest half).
const CACHE_ENTRIES: usize = 100_000;
/// Most hashes remembered as missing from the catalog.
const MISSING_ENTRIES: usize = 10_000;

/// Keeps `map` under `most` entries: drops those older than `ttl`, then the older half.
fn trim<V>(map: &mut HashMap<String, V>, most: usize, ttl: Duration, at: impl Fn(&V) -> Instant) {
    if map.len() < most {
        return;
    }
    map.retain(|_, v| at(v).elapsed() < ttl);
    if map.len() >= most {
        let mut ages: Vec<Instant> = map.values().map(&at).collect();
        ages.sort_unstable();
        let cut = ages[ages.len() / 2];
        map.retain(|_, v| at(v) > cut);
    }
}

/// Checks credentials against the catalog.
pub struct Authenticator {
    catalog: DynCatalog,
    /// Whether requests need a token; when not, every request is [`Caller::anonymous`].
    required: bool,
    ttl: Duration,
    cache: Mutex<TokenCache>,
    /// Bumped by every revocation, so a lookup that began before one does not cache its answer.
    generation: std::sync::atomic::AtomicU64,
    /// Last use of each token since the last flush (token id, Unix ms).
    used: Mutex<HashMap<String, i64>>,
    /// Failed authentications per client address in the current minute of each.
    failures: Mutex<HashMap<std::net::IpAddr, Failures>>,
    max_failures: u32,
    /// `--auth-max-tokens-per-tenant`.
    max_tokens: u32,
    /// `--auth-trusted-proxies`.
    proxies: Vec<ipnet::IpNet>,
}

/// Parses `--auth-trusted-proxies`: IPs (a host each) or CIDR ranges, comma-separated.
pub fn parse_proxies(text: &str) -> Result<Vec<ipnet::IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<ipnet::IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    format!("--auth-trusted-proxies: {p:?} is not an IP address or CIDR range")
                })
        })
        .collect()
}

/// Failed authentications of one address since `since`.
struct Failures {
    count: u32,
    since: Instant,
}

/// The span failed authentications are counted over.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Most addresses whose failures are remembered; past it expired entries go, then all.
const FAILURE_ENTRIES: usize = 100_000;

impl Authenticator {
    pub fn new(
        catalog: DynCatalog,
        required: bool,
        config: &AuthConfig,
    ) -> Result<Authenticator, String> {
        Ok(Authenticator {
            catalog,
            required,
            ttl: Duration::from_secs(config.cache_secs),
            cache: Mutex::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
            used: Mutex::default(),
            failures: Mutex::default(),
            max_failures: config.max_failures_per_minute,
            max_tokens: config.max_tokens_per_tenant,
            proxies: parse_proxies(&config.trusted_proxies)?,
        })
    }

    pub fn required(&self) -> bool {
        self.required
    }

    pub fn catalog(&self) -> &DynCatalog {
        &self.catalog
    }

    /// Most tokens a tenant may hold (`--auth-max-tokens-per-tenant`).
    pub fn max_tokens_per_tenant(&self) -> u32 {
        self.max_tokens
    }

    /// The caller of a request with these headers from `peer`. Guesses (tokens of a wrong
    /// form or unknown to the catalog) are counted per client address (an IPv6 /64 counts as
    /// one); past `--auth-max-failures-per-minute` the address may still use tokens this
    /// server already knows valid, but nothing it would have to look up, for the rest of its
    /// minute. Missing credentials and expired tokens are refused without counting.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Caller, AuthError> {
        if !self.required {
            return Ok(Caller::anonymous());
        }
        if let Some(caller) = self.proxied_caller(headers, peer)? {
            return Ok(caller);
        }
        // A proxy's own requests are not held to the failure limit: it speaks for many.
        let counted = peer
            .map(unmapped)
            .filter(|ip| !self.is_proxy(*ip))
            .map(failure_key);
        let token = credentials(headers)?;
        let guessed = |e: AuthError| {
            if let Some(key) = counted {
                self.failed(key);
            }
            e
        };
        if !token::well_formed(&token) {
            return Err(guessed(AuthError::Unauthenticated("invalid token")));
        }
        let hash = token::hash(&token);
        let record = match counted.and_then(|key| self.throttled(key)) {
            Some(wait) => self.cached(&hash).ok_or(AuthError::Throttled(wait))?,
            None => self
                .lookup(&hash)
                .await?
                .ok_or_else(|| guessed(AuthError::Unauthenticated("invalid token")))?,
        };
        self.caller(record, &hash, headers)
    }

    /// Whether `ip` is one of `--auth-trusted-proxies`.
    fn is_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.proxies.iter().any(|net| net.contains(&ip))
    }

    /// The caller a trusted proxy names in `X-Scope-OrgID`, when the request comes from one
    /// and names a tenant.
    fn proxied_caller(
        &self,
        headers: &HeaderMap,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Option<Caller>, AuthError> {
        let Some(ip) = peer.map(unmapped) else {
            return Ok(None);
        };
        if !self.is_proxy(ip) {
            return Ok(None);
        }
        let Some(tenant) = headers.get(TENANT_HEADER) else {
            return Ok(None);
        };
        let tenant = tenant.to_str().unwrap_or_default();
        if !valid_tenant(tenant) {
            return Err(AuthError::Forbidden(format!(
                "X-Scope-OrgID {tenant:?} is not a valid tenant id"
            )));
        }
        Ok(Some(Caller {
            tenant: TenantId::new(tenant),
            scopes: [Scope::Ingest, Scope::Read].into_iter().collect(),
            token_id: None,
        }))
    }

    /// Seconds left in the address's minute if it is over its failures.
    fn throttled(&self, ip: std::net::IpAddr) -> Option<u64> {
        if self.max_failures == 0 {
            return None;
        }
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let f = failures.get(&ip)?;
        let elapsed = f.since.elapsed();
        (f.count >= self.max_failures && elapsed < FAILURE_WINDOW)
            .then(|| (FAILURE_WINDOW - elapsed).as_secs_f64().ceil().max(1.0) as u64)
    }

    fn failed(&self, ip: std::net::IpAddr) {
        if self.max_failures == 0 {
            return;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= FAILURE_ENTRIES && !failures.contains_key(&ip) {
            failures.retain(|_, f| f.since.elapsed() < FAILURE_WINDOW);
            // Still full: forget the addresses not refused yet before any refused one.
            let most = self.max_failures;
            if failures.len() >= FAILURE_ENTRIES {
                failures.retain(|_, f| f.count >= most);
            }
            if failures.len() >= FAILURE_ENTRIES {
                failures.clear();
            }
        }
        let f = failures.entry(ip).or_insert(Failures {
            count: 0,
            since: Instant::now(),
        });
        if f.since.elapsed() >= FAILURE_WINDOW {
            *f = Failures {
                count: 0,
                since: Instant::now(),
            };
        }
        f.count = f.count.saturating_add(1);
    }

    /// The caller of a token found in the catalog, once its expiry and `X-Scope-OrgID` are
    /// judged.
    fn caller(
        &self,
        record: TokenRecord,
        hash: &str,
        headers: &HeaderMap,
    ) -> Result<Caller, AuthError> {
        // The lookup was by hash; comparing in constant time as well costs nothing.
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            record.hash.as_bytes(),
            hash.as_bytes(),
        )) {
            return Err(AuthError::Unauthenticated("invalid token"));
        }
        let now = chrono::Utc::now().timestamp_millis();
        if record.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthError::Unauthenticated("token expired"));
        }
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.id.clone(), now);
        let mut tenant = record.tenant;
        if let Some(asked) = headers.get(TENANT_HEADER) {
            let asked = asked.to_str().unwrap_or_default();
            if asked != tenant.as_str() {
                if !record.scopes.contains(Scope::Operator) {
                    return Err(AuthError::Forbidden(format!(
                        "the token belongs to tenant {tenant}; only an operator token may name another in X-Scope-OrgID"
                    )));
                }
                if !valid_tenant(asked) {
                    return Err(AuthError::Forbidden(format!(
                        "X-Scope-OrgID {asked:?} is not a valid tenant id"
                    )));
                }
                tenant = TenantId::new(asked);
            }
        }
        Ok(Caller {
            tenant,
            scopes: record.scopes,
            token_id: Some(record.id),
        })
    }

    /// The token of `hash` if this server found it in the catalog within the cache time.
    fn cached(&self, hash: &str) -> Option<TokenRecord> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .found
            .get(hash)
            .filter(|c| c.at.elapsed() < self.ttl)
            .map(|c| c.record.clone())
    }

    async fn lookup(&self, hash: &str) -> Result<Option<TokenRecord>, AuthError> {
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(cached) = cache.found.get(hash).filter(|c| c.at.elapsed() < self.ttl) {
                return Ok(Some(cached.record.clone()));
            }
            if cache
                .missing
                .get(hash)
                .is_some_and(|at| at.elapsed() < self.ttl)
            {
                return Ok(None);
            }
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let record = self
            .catalog
            .token_by_hash(hash)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // A revocation since the lookup began may have removed what it found.
        if generation == self.generation.load(std::sync::atomic::Ordering::SeqCst) {
            let now = Instant::now();
            match &record {
                Some(record) => {
                    trim(&mut cache.found, CACHE_ENTRIES, self.ttl, |c| c.at);
                    cache.found.insert(
                        hash.to_owned(),
                        Cached {
                            record: record.clone(),
                            at: now,
                        },
                    );
                }
                None => {
                    trim(&mut cache.missing, MISSING_ENTRIES, self.ttl, |at| *at);
                    cache.missing.insert(hash.to_owned(), now);
                }
            }
        }
        Ok(record)
    }

    /// Forgets the cached token `id` (this server revoked it): refused from now on.
    pub fn forget_token(&self, id: &str) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .found
            .retain(|_, c| c.record.id != id);
    }

    /// Writes the last use of the tokens used since the last call to the catalog.
    pub async fn flush_last_used(&self) -> Result<(), CatalogError> {
        let used: Vec<(String, i64)> =
            std::mem::take(&mut *self.used.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        if used.is_empty() {
            return Ok(());
        }
        self.catalog.touch_tokens(&used).await
    }
}

/// The token a request carries: `Authorization: Bearer <token>`, or `Basic` with the token as
/// password (any user name, as Grafana's and many scrapers' basic auth send it).
fn credentials(headers: &HeaderMap) -> Result<Cow<'_, str>, AuthError> {
    const MALFORMED_BASIC: AuthError = AuthError::Unauthenticated("malformed basic credentials");
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::Unauthenticated(
            "no credentials: send Authorization: Bearer <token>",
        ))?
        .to_str()
        .map_err(|_| AuthError::Unauthenticated("malformed Authorization header"))?;
    let (scheme, rest) = value
        .split_once(' ')
        .ok_or(AuthError::Unauthenticated("malformed Authorization header"))?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Cow::Borrowed(rest.trim()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .map_err(|_| MALFORMED_BASIC)?;
        let text = String::from_utf8(decoded).map_err(|_| MALFORMED_BASIC)?;
        let (_, password) = text.split_once(':').ok_or(MALFORMED_BASIC)?;
        return Ok(Cow::Owned(password.to_owned()));
    }
    Err(AuthError::Unauthenticated(
        "unsupported Authorization scheme: use Bearer or Basic",
    ))
}

/// Longest token name, in characters.
pub const MAX_TOKEN_NAME: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("cannot draw random bytes: {0}")]
    Random(#[from] std::io::Error),
}

/// Creates a token of `tenant` with `scopes`, valid for `lifetime_ms` when given. Returns the
/// token, to be shown once, and what the catalog keeps of it.
pub async fn create_token(
    catalog: &dyn crate::catalog::Catalog,
    tenant: &str,
    scopes: Scopes,
    name: &str,
    lifetime_ms: Option<i64>,
    max_tokens: u32,
) -> Result<(String, TokenRecord), CreateError> {
    if !valid_tenant(tenant) {
        return Err(CreateError::Invalid(format!(
            "invalid tenant {tenant:?}: 1 to 150 letters, digits or !-_.*'() (not . or ..)"
        )));
    }
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_TOKEN_NAME {
        return Err(CreateError::Invalid(format!(
            "a token needs a name of 1 to {MAX_TOKEN_NAME} characters"
        )));
    }
    if scopes.is_empty() {
        return Err(CreateError::Invalid(
            "a token needs at least one scope".into(),
        ));
    }
    if lifetime_ms.is_some_and(|ms| ms <= 0) {
        return Err(CreateError::Invalid(
            "a token's lifetime must be positive".into(),
        ));
    }
    let held = catalog
        .list_tokens(Some(&TenantId::new(tenant)))
        .await?
        .len();
    if held >= max_tokens as usize {
        return Err(CreateError::Invalid(format!(
            "tenant {tenant} has {held} tokens, the most it may have ({max_tokens}, --auth-max-tokens-per-tenant); revoke some first"
        )));
    }
    let text = token::generate()?;
    let now = chrono::Utc::now().timestamp_millis();
    let record = TokenRecord {
        id: token::generate_id()?,
        tenant: TenantId::new(tenant),
        name: name.to_owned(),
        scopes,
        hash: token::hash(&text),
        created_at: now,
        expires_at: lifetime_ms.map(|ms| now.saturating_add(ms)),
        last_used_at: None,
    };
    catalog.insert_token(&record).await?;
    Ok((text, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn credentials_are_read_from_bearer_and_basic_auth() {
        let bearer = headers(&[("authorization", "Bearer smn_x ")]);
        assert_eq!(credentials(&bearer).unwrap(), "smn_x");
        let lower = headers(&[("authorization", "bearer smn_y")]);
        assert_eq!(credentials(&lower).unwrap(), "smn_y");
        // `grafana:smn_z`
        let basic = headers(&[("authorization", "Basic Z3JhZmFuYTpzbW5feg==")]);
        assert_eq!(credentials(&basic).unwrap(), "smn_z");
        for bad in ["Basic !!!", "Basic Z3JhZmFuYQ==", "Digest x", "Bearer"] {
            assert!(
                credentials(&headers(&[("authorization", bad)])).is_err(),
                "{bad}"
            );
        }
        assert!(credentials(&HeaderMap::new()).is_err());
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges() {
        let nets = parse_proxies(" 10.0.0.0/8, 192.168.1.5 ,::1").unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        assert!(!nets[1].contains(&"192.168.1.6".parse::<std::net::IpAddr>().unwrap()));
        assert!(parse_proxies("").unwrap().is_empty());
        assert!(parse_proxies("10.0.0.0/33")
            .unwrap_err()
            .contains("10.0.0.0/33"));
    }

    #[test]
    fn tenant_ids_follow_mimirs_rules() {
        for good in ["default", "team-a", "a.b_c", "x!*'()", &"t".repeat(150)] {
            assert!(valid_tenant(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"t".repeat(151)] {
            assert!(!valid_tenant(bad), "{bad}");
        }
    }

    #[test]
    fn auto_mode_requires_tokens_once_a_listener_leaves_loopback() {
        let mut config = AuthConfig::default();
        let local: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:8080".parse().unwrap(),
            "[::1]:4317".parse().unwrap(),
        ];
        let wide: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:8080".parse().unwrap(),
            "0.0.0.0:4317".parse().unwrap(),
        ];
        assert!(!config.required(&local) && config.required(&wide));
        config.mode = AuthMode::On;
        assert!(config.required(&local));
        config.mode = AuthMode::Off;
        assert!(!config.required(&wide));
    }
}
