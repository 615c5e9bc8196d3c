//! Built-in receivers, for users without an Alertmanager: the alerts the rules send are grouped,
//! held and notified to a webhook (Alertmanager's webhook JSON, version 4) or by email over
//! SMTP, as Alertmanager 0.25 does it for a configuration with one route
//! (`dispatch/dispatch.go`, `notify/notify.go`, `notify/webhook`, `notify/email`).
//!
//! The configuration is a file in Alertmanager's own format (`--alert-receivers`), of which
//! these keys are read: `global` (`smtp_*`, `resolve_timeout`), `route` (`receiver`, `group_by`,
//! `group_wait`, `group_interval`, `repeat_interval`) and `receivers` with `webhook_configs`
//! and `email_configs`. Anything else (a routing tree, inhibition, templates, other
//! integrations) is refused by name: that is Alertmanager's job.
//!
//! Semantics kept from Alertmanager: alerts are grouped by the route's `group_by` labels (`...`
//! groups by all of them); a new group is notified `group_wait` after its first alert (at once
//! when that alert started longer ago than that), then looked at every `group_interval`: it is
//! notified when an alert started firing or, for an integration with `send_resolved`,
//! resolved since the last notification, and otherwise again every `repeat_interval` while
//! something fires. A notification that fails is tried again with exponential backoff until
//! `group_interval` (at least 10 s) has passed; every attempt and every final failure is
//! counted. Resolved alerts leave a group once notified; an empty group is removed.

use super::notify::Notification;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most alerts held across all groups: past it, new alerts are dropped and counted in
/// `secumon_notifications_dropped_total`.
pub const MAX_ALERTS: usize = 10_000;
/// Alertmanager's `minTimeout` of a flush.
const MIN_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Most alerts listed in one email body (the subject counts them all).
const MAX_EMAIL_ALERTS: usize = 100;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Configuration, in Alertmanager's format.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    global: Global,
    route: RouteConfig,
    #[serde(default)]
    receivers: Vec<ReceiverConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Global {
    resolve_timeout: String,
    smtp_from: String,
    smtp_hello: String,
    smtp_smarthost: String,
    smtp_auth_username: String,
    smtp_auth_password: String,
    smtp_auth_password_file: String,
    smtp_require_tls: bool,
}

impl Default for Global {
    fn default() -> Global {
        Global {
            resolve_timeout: "5m".into(),
            smtp_from: String::new(),
            smtp_hello: "localhost".into(),
            smtp_smarthost: String::new(),
            smtp_auth_username: String::new(),
            smtp_auth_password: String::new(),
            smtp_auth_password_file: String::new(),
            smtp_require_tls: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteConfig {
    receiver: String,
    #[serde(default)]
    group_by: Vec<String>,
    group_wait: Option<String>,
    group_interval: Option<String>,
    repeat_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiverConfig {
    name: String,
    #[serde(default)]
    webhook_configs: Vec<WebhookConfig>,
    #[serde(default)]
    email_configs: Vec<EmailConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TlsConfig {
    ca_file: String,
    server_name: String,
    insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Authorization {
    #[serde(rename = "type", default = "bearer")]
    kind: String,
    #[serde(default)]
    credentials: String,
    #[serde(default)]
    credentials_file: String,
}

fn bearer() -> String {
    "Bearer".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicAuth {
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    password_file: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct HttpConfig {
    authorization: Option<Authorization>,
    basic_auth: Option<BasicAuth>,
    tls_config: TlsConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookConfig {
    url: String,
    #[serde(default = "yes")]
    send_resolved: bool,
    #[serde(default)]
    max_alerts: usize,
    #[serde(default)]
    http_config: HttpConfig,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailConfig {
    to: String,
    from: Option<String>,
    smarthost: Option<String>,
    hello: Option<String>,
    auth_username: Option<String>,
    auth_password: Option<String>,
    auth_password_file: Option<String>,
    require_tls: Option<bool>,
    #[serde(default)]
    tls_config: TlsConfig,
    #[serde(default)]
    send_resolved: bool,
}

fn duration(text: Option<&str>, default_ms: i64, what: &str) -> Result<Duration, String> {
    let ms = match text {
        Some(t) => super::file::parse_duration(t).map_err(|e| format!("{what}: {e}"))?,
        None => default_ms,
    };
    Ok(Duration::from_millis(ms as u64))
}

/// A parsed and checked receivers file, its clients built.
pub struct Config {
    receiver: String,
    /// `None`: group by every label (`...`).
    group_by: Option<Vec<String>>,
    group_wait: Duration,
    group_interval: Duration,
    repeat_interval: Duration,
    /// Bounds each attempt at a notification (`--rules-alertmanager-timeout`).
    timeout: Duration,
    integrations: Vec<Integration>,
    /// The file's text and that of every file it names (secrets, CAs): a reload that finds
    /// them all unchanged changes nothing.
    identity: String,
}

/// One webhook or email of the route's receiver.
struct Integration {
    /// `webhook` or `email`, with its index among the receiver's integrations of that kind,
    /// as Alertmanager names them in its notification log.
    kind: &'static str,
    index: usize,
    send_resolved: bool,
    target: Target,
}

enum Target {
    Webhook {
        url: String,
        max_alerts: usize,
        client: reqwest::Client,
        authorization: Option<String>,
    },
    Email(Box<Email>),
}

struct Email {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
    to: Vec<lettre::message::Mailbox>,
}

impl Config {
    /// Parses and checks `text`; `timeout` bounds each request to a receiver.
    pub fn parse(text: &str, timeout: Duration) -> Result<Config, String> {
        let mut files = Files::default();
        let file: FileConfig = yaml_serde::from_str(text).map_err(|e| {
            let message = e.to_string();
            if message.contains("unknown field") {
                format!("{message} (SecuMon's built-in receivers take one route with webhook_configs and email_configs; for more, use Alertmanager with --alertmanager-url)")
            } else {
                message
            }
        })?;
        super::file::parse_duration(&file.global.resolve_timeout)
            .map_err(|e| format!("global.resolve_timeout: {e}"))?;
        let route = &file.route;
        let group_wait = duration(route.group_wait.as_deref(), 30_000, "route.group_wait")?;
        let group_interval = duration(
            route.group_interval.as_deref(),
            300_000,
            "route.group_interval",
        )?;
        let repeat_interval = duration(
            route.repeat_interval.as_deref(),
            4 * 3_600_000,
            "route.repeat_interval",
        )?;
        if group_interval.is_zero() {
            return Err("route.group_interval cannot be zero".into());
        }
        if repeat_interval.is_zero() {
            return Err("route.repeat_interval cannot be zero".into());
        }
        let group_by = if route.group_by.iter().any(|l| l == "...") {
            if route.group_by.len() > 1 {
                return Err(
                    "route.group_by: cannot have wildcard group_by (`...`) and other labels at the same time"
                        .into(),
                );
            }
            None
        } else {
            for label in &route.group_by {
                if !crate::model::labels::is_valid_label_name(label) {
                    return Err(format!("route.group_by: invalid label name {label:?}"));
                }
            }
            let mut labels = route.group_by.clone();
            labels.sort();
            if let Some(twice) = labels.windows(2).find(|w| w[0] == w[1]) {
                return Err(format!("duplicated label {:?} in group_by", twice[0]));
            }
            Some(labels)
        };
        if route.receiver.is_empty() {
            return Err("root route must specify a default receiver".into());
        }
        let global = &file.global;
        if !global.smtp_auth_password.is_empty() && !global.smtp_auth_password_file.is_empty() {
            return Err(
                "at most one of smtp_auth_password & smtp_auth_password_file must be configured"
                    .into(),
            );
        }
        let mut names = BTreeSet::new();
        for r in &file.receivers {
            if r.name.is_empty() {
                return Err("missing name on receiver".into());
            }
            if !names.insert(r.name.as_str()) {
                return Err(format!(
                    "notification config name {:?} is not unique",
                    r.name
                ));
            }
        }
        let receiver = file
            .receivers
            .iter()
            .find(|r| r.name == route.receiver)
            .ok_or_else(|| format!("undefined receiver {:?} used in route", route.receiver))?;
        // Every receiver is checked, as Alertmanager checks them; the route's is kept.
        let mut integrations = Vec::new();
        for r in &file.receivers {
            let mut built = Vec::new();
            for (index, w) in r.webhook_configs.iter().enumerate() {
                let what = format!("receiver {:?} webhook_configs[{index}]", r.name);
                built.push(Integration {
                    kind: "webhook",
                    index,
                    send_resolved: w.send_resolved,
                    target: webhook(w, timeout, &mut files).map_err(|e| format!("{what}: {e}"))?,
                });
            }
            for (index, e) in r.email_configs.iter().enumerate() {
                let what = format!("receiver {:?} email_configs[{index}]", r.name);
                built.push(Integration {
                    kind: "email",
                    index,
                    send_resolved: e.send_resolved,
                    target: email(e, global, timeout, &mut files)
                        .map_err(|e| format!("{what}: {e}"))?,
                });
            }
            if r.name == receiver.name {
                integrations = built;
            }
        }
        Ok(Config {
            receiver: receiver.name.clone(),
            group_by,
            group_wait,
            group_interval,
            repeat_interval,
            integrations,
            identity: format!("{text}\0{}", files.0),
            timeout,
        })
    }
}

/// The contents of the files a configuration read, in order.
#[derive(Default)]
struct Files(String);

impl Files {
    fn read(&mut self, path: &str, what: &str) -> Result<Vec<u8>, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{what} {path:?}: {e}"))?;
        self.0.push_str(path);
        self.0.push('\0');
        self.0.push_str(&String::from_utf8_lossy(&bytes));
        self.0.push('\0');
        Ok(bytes)
    }

    /// A secret from a `*_file` setting, trimmed of its final newline.
    fn secret(&mut self, path: &str, what: &str) -> Result<String, String> {
        let bytes = self.read(path, what)?;
        Ok(String::from_utf8_lossy(&bytes)
            .trim_end_matches(['\n', '\r'])
            .to_owned())
    }
}

fn webhook(w: &WebhookConfig, timeout: Duration, files: &mut Files) -> Result<Target, String> {
    let url: reqwest::Url = w.url.parse().map_err(|e| format!("url {:?}: {e}", w.url))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("url {:?}: not an http:// or https:// URL", w.url));
    }
    let http = &w.http_config;
    if http.authorization.is_some() && http.basic_auth.is_some() {
        return Err("at most one of basic_auth and authorization must be configured".into());
    }
    if !http.tls_config.server_name.is_empty() {
        return Err("tls_config.server_name is not supported for webhooks".into());
    }
    let authorization = if let Some(a) = &http.authorization {
        if a.kind.eq_ignore_ascii_case("basic") {
            return Err(
                "authorization type cannot be set to \"basic\", use \"basic_auth\" instead".into(),
            );
        }
        if !a.credentials.is_empty() && !a.credentials_file.is_empty() {
            return Err(
                "at most one of authorization credentials & credentials_file must be configured"
                    .into(),
            );
        }
        let credentials = if a.credentials_file.is_empty() {
            a.credentials.clone()
        } else {
            files.secret(&a.credentials_file, "authorization.credentials_file")?
        };
        let kind = if a.kind.is_empty() { "Bearer" } else { &a.kind };
        Some(format!("{kind} {credentials}"))
    } else if let Some(b) = &http.basic_auth {
        use base64::Engine;
        if !b.password.is_empty() && !b.password_file.is_empty() {
            return Err(
                "at most one of basic_auth password & password_file must be configured".into(),
            );
        }
        let password = if b.password_file.is_empty() {
            b.password.clone()
        } else {
            files.secret(&b.password_file, "basic_auth.password_file")?
        };
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{password}", b.username))
        ))
    } else {
        None
    };
    let mut client = reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("SecuMon/", env!("CARGO_PKG_VERSION")))
        .danger_accept_invalid_certs(http.tls_config.insecure_skip_verify);
    if !http.tls_config.ca_file.is_empty() {
        let pem = files.read(&http.tls_config.ca_file, "tls_config.ca_file")?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("tls_config.ca_file: {e}"))?;
        client = client.tls_built_in_root_certs(false);
        for cert in certs {
            client = client.add_root_certificate(cert);
        }
    }
    Ok(Target::Webhook {
        url: w.url.clone(),
        max_alerts: w.max_alerts,
        client: client.build().map_err(|e| e.to_string())?,
        authorization,
    })
}

fn email(
    e: &EmailConfig,
    global: &Global,
    timeout: Duration,
    files: &mut Files,
) -> Result<Target, String> {
    use lettre::transport::smtp::{authentication::Credentials, client, extension::ClientId};
    let pick = |own: &Option<String>, global: &str| -> String {
        own.clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| global.to_owned())
    };
    let smarthost = pick(&e.smarthost, &global.smtp_smarthost);
    if smarthost.is_empty() {
        return Err("no global SMTP smarthost set".into());
    }
    let from = pick(&e.from, &global.smtp_from);
    if from.is_empty() {
        return Err("no global SMTP from set".into());
    }
    let (host, port) = smarthost
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("smarthost {smarthost:?}: not host:port"))?;
    let from: lettre::message::Mailbox = from
        .parse()
        .map_err(|err| format!("from {from:?}: {err}"))?;
    let to =
        e.to.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|t| t.parse().map_err(|err| format!("to {t:?}: {err}")))
            .collect::<Result<Vec<lettre::message::Mailbox>, String>>()?;
    if to.is_empty() {
        return Err("missing to address".into());
    }
    let require_tls = e.require_tls.unwrap_or(global.smtp_require_tls);
    let tls = &e.tls_config;
    let server_name = if tls.server_name.is_empty() {
        host.to_owned()
    } else {
        tls.server_name.clone()
    };
    let mut params = client::TlsParameters::builder(server_name)
        .dangerous_accept_invalid_certs(tls.insecure_skip_verify);
    if !tls.ca_file.is_empty() {
        let pem = files.read(&tls.ca_file, "tls_config.ca_file")?;
        let cert = client::Certificate::from_pem(&pem)
            .map_err(|err| format!("tls_config.ca_file: {err}"))?;
        params = params
            .certificate_store(client::CertificateStore::None)
            .add_root_certificate(cert);
    }
    let params = params.build_rustls().map_err(|err| err.to_string())?;
    // As Alertmanager: port 465 speaks TLS from the start; otherwise STARTTLS, required
    // unless `require_tls` is false (then none).
    let tls_mode = if port == 465 {
        client::Tls::Wrapper(params)
    } else if require_tls {
        client::Tls::Required(params)
    } else {
        client::Tls::None
    };
    let plain = matches!(tls_mode, client::Tls::None);
    let hello = pick(&e.hello, &global.smtp_hello);
    let mut builder = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .tls(tls_mode)
        .hello_name(ClientId::Domain(hello))
        .timeout(Some(timeout));
    let username = pick(&e.auth_username, &global.smtp_auth_username);
    if !username.is_empty() {
        // Go's PLAIN auth, which Alertmanager uses, refuses to send a password in clear text
        // except to localhost; so does this.
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if plain && !loopback {
            return Err(format!(
                "auth_username is set but require_tls is false: the password would cross the network to {host} in clear text"
            ));
        }
        // As Alertmanager: the email's own password or password file, else the global ones.
        let own_password = e.auth_password.as_deref().unwrap_or_default();
        let own_file = e.auth_password_file.as_deref().unwrap_or_default();
        if !own_password.is_empty() && !own_file.is_empty() {
            return Err(
                "at most one of auth_password & auth_password_file must be configured".into(),
            );
        }
        let (password, file) = if own_password.is_empty() && own_file.is_empty() {
            (
                global.smtp_auth_password.as_str(),
                global.smtp_auth_password_file.as_str(),
            )
        } else {
            (own_password, own_file)
        };
        let password = if file.is_empty() {
            password.to_owned()
        } else {
            files.secret(file, "auth_password_file")?
        };
        builder = builder.credentials(Credentials::new(username, password));
    }
    Ok(Target::Email(Box::new(Email {
        transport: builder.build(),
        from,
        to,
    })))
}

// ---------------------------------------------------------------------------------------------
// Alerts, groups and what was last notified.

/// Alertmanager's `model.LabelSet.Fingerprint`: FNV-1a over sorted names and values, each
/// followed by 0xff.
pub fn fingerprint(labels: &BTreeMap<String, String>) -> u64 {
    const OFFSET: u64 = 14_695_981_039_346_656_037;
    const PRIME: u64 = 1_099_511_628_211;
    let mut hash = OFFSET;
    let mut add = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    for (name, value) in labels {
        add(name.as_bytes());
        add(&[0xff]);
        add(value.as_bytes());
        add(&[0xff]);
    }
    hash
}

/// `model.LabelSet.String`: `{a="1", b="2"}`.
fn label_set_string(labels: &BTreeMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect();
    // Go sorts the `name="value"` strings, not the names.
    pairs.sort();
    format!("{{{}}}", pairs.join(", "))
}

/// Go's `%q` of a string: `\"`, `\\`, the usual escapes, `\xNN` for other control bytes.
fn go_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Alertmanager's `regexp.QuoteMeta` of the receiver name in its messages.
fn quote_meta(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `model.LabelSet.Before`: fewer labels first, then by sorted names and values.
fn labels_before(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// An alert as a group holds it.
#[derive(Clone, Debug)]
struct Held {
    alert: Notification,
    /// Bumped on each update, so a flush removes only the resolved alerts it notified.
    version: u64,
}

impl Held {
    fn resolved(&self, now_ms: i64) -> bool {
        self.alert.ends_at.is_some_and(|t| t <= now_ms)
    }
}

struct Group {
    labels: BTreeMap<String, String>,
    alerts: BTreeMap<u64, Held>,
    next_flush: Instant,
    has_flushed: bool,
    flushing: bool,
}

/// What an integration was last told about a group (Alertmanager's notification log entry).
#[derive(Clone, Debug)]
struct Logged {
    firing: BTreeSet<u64>,
    resolved: BTreeSet<u64>,
    at: Instant,
}

/// Alertmanager's `DedupStage.needsUpdate`.
fn needs_update(
    entry: Option<&Logged>,
    firing: &BTreeSet<u64>,
    resolved: &BTreeSet<u64>,
    send_resolved: bool,
    repeat: Duration,
    now: Instant,
) -> bool {
    let Some(entry) = entry else {
        return !firing.is_empty();
    };
    // An alert firing that was not, the last time.
    if !firing.is_subset(&entry.firing) {
        return true;
    }
    if firing.is_empty() {
        return !entry.firing.is_empty();
    }
    // One resolved since, for an integration told of resolved alerts.
    if send_resolved && !resolved.is_subset(&entry.resolved) {
        return true;
    }
    now.duration_since(entry.at) > repeat
}

/// Most notifications being sent at once, across groups and integrations.
const MAX_CONCURRENT_SENDS: usize = 16;

/// A notification log entry's key: group key, receiver name, integration kind and index.
type LogKey = (String, String, &'static str, usize);

/// Groups alerts and notifies the configured receiver.
pub struct Dispatcher {
    config: Mutex<Option<Arc<Config>>>,
    groups: Mutex<HashMap<String, Group>>,
    log: Mutex<HashMap<LogKey, Logged>>,
    wake: tokio::sync::Notify,
    /// Bumped by each new configuration: a flush begun under an older one leaves the groups
    /// as they are.
    generation: std::sync::atomic::AtomicU64,
    sending: tokio::sync::Semaphore,
    external_url: String,
    metrics: Arc<crate::telemetry::Metrics>,
}

impl Dispatcher {
    pub fn new(external_url: &str, metrics: Arc<crate::telemetry::Metrics>) -> Dispatcher {
        Dispatcher {
            config: Mutex::new(None),
            groups: Mutex::new(HashMap::new()),
            log: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            generation: std::sync::atomic::AtomicU64::new(0),
            sending: tokio::sync::Semaphore::new(MAX_CONCURRENT_SENDS),
            external_url: external_url.trim_end_matches('/').to_owned(),
            metrics,
        }
    }

    pub fn enabled(&self) -> bool {
        lock(&self.config).is_some()
    }

    /// Replaces the configuration; `None` turns the receivers off. Alerts held are grouped
    /// again by the new route (as Alertmanager rebuilds its dispatcher on reload); what each
    /// integration was last told is kept, so nothing unchanged is notified again early.
    pub fn configure(&self, config: Option<Config>) {
        let mut current = lock(&self.config);
        if current.as_ref().map(|c| c.identity.as_str())
            == config.as_ref().map(|c| c.identity.as_str())
        {
            return;
        }
        *current = config.map(Arc::new);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut groups = lock(&self.groups);
        // A group still being flushed stays marked so under its key until that flush ends,
        // so two flushes never notify one group at once.
        let flushing: BTreeSet<String> = groups
            .iter()
            .filter(|(_, g)| g.flushing)
            .map(|(k, _)| k.clone())
            .collect();
        let held: Vec<Notification> = groups
            .drain()
            .flat_map(|(_, g)| g.alerts.into_values().map(|h| h.alert))
            .collect();
        drop(groups);
        let config = current.clone();
        drop(current);
        if let Some(config) = &config {
            self.insert(config, held);
        }
        let groups = lock(&self.groups);
        let mut log = lock(&self.log);
        log.retain(|(key, receiver, kind, index), _| {
            groups.contains_key(key)
                && config.as_ref().is_some_and(|c| {
                    &c.receiver == receiver
                        && c.integrations
                            .iter()
                            .any(|i| i.kind == *kind && i.index == *index)
                })
        });
        drop(log);
        drop(groups);
        let mut groups = lock(&self.groups);
        for key in flushing {
            if let Some(g) = groups.get_mut(&key) {
                g.flushing = true;
            }
        }
        drop(groups);
        self.wake.notify_one();
    }

    /// Takes alerts from the rules.
    pub fn receive(&self, alerts: &[Notification]) {
        let Some(config) = lock(&self.config).clone() else {
            return;
        };
        self.insert(&config, alerts.to_vec());
        self.wake.notify_one();
    }

    fn insert(&self, config: &Config, alerts: Vec<Notification>) {
        let now = Instant::now();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut groups = lock(&self.groups);
        let mut held: usize = groups.values().map(|g| g.alerts.len()).sum();
        for alert in alerts {
            let labels: BTreeMap<String, String> = match &config.group_by {
                None => alert.labels.clone(),
                Some(names) => names
                    .iter()
                    .filter_map(|n| alert.labels.get(n).map(|v| (n.clone(), v.clone())))
                    .collect(),
            };
            let key = format!("{{}}:{}", label_set_string(&labels));
            let fp = fingerprint(&alert.labels);
            let exists = groups.get(&key).is_some_and(|g| g.alerts.contains_key(&fp));
            if !exists && held >= MAX_ALERTS {
                self.metrics.notifications_dropped.inc();
                continue;
            }
            let group = groups.entry(key).or_insert_with(|| Group {
                labels,
                alerts: BTreeMap::new(),
                next_flush: now + config.group_wait,
                has_flushed: false,
                flushing: false,
            });
            // An alert older than the group wait is notified at once.
            if !group.has_flushed
                && alert
                    .starts_at
                    .is_some_and(|s| s + (config.group_wait.as_millis() as i64) < now_ms)
            {
                group.next_flush = now;
            }
            match group.alerts.get_mut(&fp) {
                Some(old) => {
                    old.alert = merge(&old.alert, alert, now_ms);
                    old.version += 1;
                }
                None => {
                    held += 1;
                    group.alerts.insert(fp, Held { alert, version: 0 });
                }
            }
        }
    }

    /// Flushes groups when they are due, until `stop`.
    pub async fn run(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let mut stop = stop;
        loop {
            let now = Instant::now();
            let config = lock(&self.config).clone();
            let mut next = now + Duration::from_secs(1);
            if let Some(config) = config {
                let mut due = Vec::new();
                {
                    let mut groups = lock(&self.groups);
                    for (key, group) in groups.iter_mut() {
                        if group.flushing {
                            continue;
                        }
                        if group.next_flush <= now {
                            group.flushing = true;
                            due.push(key.clone());
                        } else {
                            next = next.min(group.next_flush);
                        }
                    }
                }
                for key in due {
                    let (this, config) = (self.clone(), config.clone());
                    tokio::spawn(async move { this.flush(&config, key).await });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.wake.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One flush of a group (`aggrGroup.flush` and the notification pipeline).
    async fn flush(&self, config: &Config, key: String) {
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let now = Instant::now();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let Some((labels, alerts)) = lock(&self.groups)
            .get(&key)
            .map(|g| (g.labels.clone(), g.alerts.clone()))
        else {
            return;
        };
        let firing: BTreeSet<u64> = alerts
            .iter()
            .filter(|(_, h)| !h.resolved(now_ms))
            .map(|(fp, _)| *fp)
            .collect();
        let resolved: BTreeSet<u64> = alerts
            .iter()
            .filter(|(_, h)| h.resolved(now_ms))
            .map(|(fp, _)| *fp)
            .collect();
        let deadline = now + config.group_interval.max(MIN_FLUSH_TIMEOUT);
        let sends = config.integrations.iter().map(|integration| {
            let log_key = (
                key.clone(),
                config.receiver.clone(),
                integration.kind,
                integration.index,
            );
            let (firing, resolved, labels, alerts, key) =
                (&firing, &resolved, &labels, &alerts, key.as_str());
            async move {
                let entry = lock(&self.log).get(&log_key).cloned();
                if !needs_update(
                    entry.as_ref(),
                    firing,
                    resolved,
                    integration.send_resolved,
                    config.repeat_interval,
                    now,
                ) {
                    return true;
                }
                // Only resolved alerts and an integration that is not told of them: logged
                // as notified, nothing sent.
                let ok = if !integration.send_resolved && firing.is_empty() {
                    true
                } else {
                    let sent: Vec<&Notification> = alerts
                        .iter()
                        .filter(|(fp, _)| integration.send_resolved || firing.contains(fp))
                        .map(|(_, h)| &h.alert)
                        .collect();
                    self.notify_with_retries(
                        config,
                        integration,
                        key,
                        labels,
                        &sent,
                        now_ms,
                        deadline,
                    )
                    .await
                };
                if ok {
                    lock(&self.log).insert(
                        log_key,
                        Logged {
                            firing: firing.clone(),
                            resolved: resolved.clone(),
                            at: now,
                        },
                    );
                }
                ok
            }
        });
        let all_ok = futures::future::join_all(sends).await.iter().all(|ok| *ok);
        let mut groups = lock(&self.groups);
        let Some(group) = groups.get_mut(&key) else {
            return;
        };
        group.flushing = false;
        group.next_flush = now + config.group_interval;
        if generation != self.generation.load(std::sync::atomic::Ordering::SeqCst) {
            // Regrouped since this flush began: its alerts are the new configuration's.
            return;
        }
        group.has_flushed = true;
        if all_ok {
            // Resolved alerts notified, and not updated since, leave the group.
            for fp in &resolved {
                if group.alerts.get(fp).map(|h| h.version) == alerts.get(fp).map(|h| h.version) {
                    group.alerts.remove(fp);
                }
            }
        }
        if group.alerts.is_empty() {
            groups.remove(&key);
            lock(&self.log).retain(|k, _| k.0 != key);
        }
    }

    /// Sends one notification, again with exponential backoff (from 0.5 s, ×1.5, at most
    /// 60 s) until it is taken or `deadline` passes.
    #[allow(clippy::too_many_arguments)]
    async fn notify_with_retries(
        &self,
        config: &Config,
        integration: &Integration,
        key: &str,
        group_labels: &BTreeMap<String, String>,
        alerts: &[&Notification],
        now_ms: i64,
        deadline: Instant,
    ) -> bool {
        let labels = crate::telemetry::ReceiverLabels {
            receiver: config.receiver.clone(),
            integration: integration.kind,
        };
        let max_alerts = match &integration.target {
            Target::Webhook { max_alerts, .. } => *max_alerts,
            Target::Email(_) => 0,
        };
        let data = Data::new(
            &config.receiver,
            key,
            group_labels,
            alerts,
            now_ms,
            &self.external_url,
            max_alerts,
        );
        self.metrics
            .receiver_notifications
            .get_or_create(&labels)
            .inc();
        let mut backoff = Duration::from_millis(500);
        loop {
            // Each attempt within the timeout and the flush's deadline, with a bounded number
            // under way at once: a receiver that stalls or streams holds little for long.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = tokio::time::timeout(remaining.min(config.timeout), async {
                let _permit = self.sending.acquire().await;
                self.metrics.receiver_requests.get_or_create(&labels).inc();
                send(integration, &data).await
            })
            .await;
            let (error, retry) = match attempt {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => e,
                Err(_) => ("timed out".to_owned(), true),
            };
            self.metrics
                .receiver_requests_failed
                .get_or_create(&labels)
                .inc();
            let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
            if wait.is_zero() || !retry {
                tracing::error!(receiver = %config.receiver, integration = integration.kind, error = %error, "notification failed, giving up until the next group interval");
                self.metrics
                    .receiver_notifications_failed
                    .get_or_create(&labels)
                    .inc();
                return false;
            }
            tracing::warn!(receiver = %config.receiver, integration = integration.kind, error = %error, "notification failed, trying again");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 3 / 2).min(Duration::from_secs(60));
        }
    }
}

/// Alertmanager's `Alert.Merge` for an update of a held alert, and its store's rule: an update
/// that does not overlap the held alert replaces it.
fn merge(old: &Notification, new: Notification, now_ms: i64) -> Notification {
    let start = |a: &Notification| a.starts_at.unwrap_or(i64::MIN);
    let end = |a: &Notification| a.ends_at.unwrap_or(i64::MAX);
    let overlaps = (end(&new) > start(old) && end(&new) < end(old))
        || (start(&new) > start(old) && start(&new) < end(old));
    if !overlaps {
        return new;
    }
    let mut out = new;
    if start(old) < start(&out) {
        out.starts_at = old.starts_at;
    }
    let resolved = |a: &Notification| a.ends_at.is_some_and(|t| t <= now_ms);
    if resolved(&out) {
        if resolved(old) && end(old) > end(&out) {
            out.ends_at = old.ends_at;
        }
    } else if end(old) > end(&out) {
        out.ends_at = old.ends_at;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// What is sent.

/// Alertmanager's `template.Data`, which the webhook sends and emails are written from.
struct Data {
    receiver: String,
    /// Alerts left out by a webhook's `max_alerts`.
    truncated: usize,
    group_key: String,
    status: &'static str,
    alerts: Vec<Value>,
    firing: usize,
    group_labels: BTreeMap<String, String>,
    common_labels: BTreeMap<String, String>,
    common_annotations: BTreeMap<String, String>,
    external_url: String,
}

/// Go's `time.Time` in JSON: RFC 3339 with the fraction's trailing zeros dropped.
fn go_time(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "0001-01-01T00:00:00Z".into();
    };
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    let fraction = format!("{:03}", ms.rem_euclid(1000));
    let fraction = fraction.trim_end_matches('0');
    let head = t.format("%Y-%m-%dT%H:%M:%S");
    if fraction.is_empty() {
        format!("{head}Z")
    } else {
        format!("{head}.{fraction}Z")
    }
}

fn common(maps: &[&BTreeMap<String, String>]) -> BTreeMap<String, String> {
    let Some((first, rest)) = maps.split_first() else {
        return BTreeMap::new();
    };
    first
        .iter()
        .filter(|(k, v)| rest.iter().all(|m| m.get(*k) == Some(v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn strings(m: &BTreeMap<String, String>) -> Value {
    Value::Object(m.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

impl Data {
    fn new(
        receiver: &str,
        group_key: &str,
        group_labels: &BTreeMap<String, String>,
        alerts: &[&Notification],
        now_ms: i64,
        external_url: &str,
        max_alerts: usize,
    ) -> Data {
        let resolved = |a: &Notification| a.ends_at.is_some_and(|t| t <= now_ms);
        // In Alertmanager's order (`types.AlertSlice`): by job, then instance (an alert
        // without one after those with it), then by all labels.
        let mut sorted: Vec<&Notification> = alerts.to_vec();
        sorted.sort_by(|a, b| {
            let by = |name: &str| match (a.labels.get(name), b.labels.get(name)) {
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            by("job")
                .then_with(|| by("instance"))
                .then_with(|| labels_before(&a.labels, &b.labels))
        });
        // A webhook's `max_alerts` keeps the first ones; the rest is computed from those.
        let mut truncated = 0;
        if max_alerts > 0 && sorted.len() > max_alerts {
            truncated = sorted.len() - max_alerts;
            sorted.truncate(max_alerts);
        }
        let firing = sorted.iter().filter(|a| !resolved(a)).count();
        let json_alerts = sorted
            .iter()
            .map(|a| {
                json!({
                    "status": if resolved(a) { "resolved" } else { "firing" },
                    "labels": strings(&a.labels),
                    "annotations": strings(&a.annotations),
                    "startsAt": go_time(a.starts_at),
                    // As Alertmanager: a firing alert's end is not shown.
                    "endsAt": go_time(a.ends_at.filter(|_| resolved(a))),
                    "generatorURL": a.generator_url,
                    "fingerprint": format!("{:016x}", fingerprint(&a.labels)),
                })
            })
            .collect();
        let labels: Vec<&BTreeMap<String, String>> = sorted.iter().map(|a| &a.labels).collect();
        let annotations: Vec<&BTreeMap<String, String>> =
            sorted.iter().map(|a| &a.annotations).collect();
        Data {
            receiver: quote_meta(receiver),
            truncated,
            group_key: group_key.to_owned(),
            status: if firing > 0 { "firing" } else { "resolved" },
            alerts: json_alerts,
            firing,
            group_labels: group_labels.clone(),
            common_labels: common(&labels),
            common_annotations: common(&annotations),
            external_url: external_url.to_owned(),
        }
    }

    /// Alertmanager's webhook message, version 4.
    fn webhook(&self) -> Value {
        let alerts = self.alerts.clone();
        let truncated = self.truncated;
        let mut out = Map::new();
        out.insert("receiver".into(), json!(self.receiver));
        out.insert("status".into(), json!(self.status));
        out.insert("alerts".into(), Value::Array(alerts));
        out.insert("groupLabels".into(), strings(&self.group_labels));
        out.insert("commonLabels".into(), strings(&self.common_labels));
        out.insert(
            "commonAnnotations".into(),
            strings(&self.common_annotations),
        );
        out.insert("externalURL".into(), json!(self.external_url));
        out.insert("version".into(), json!("4"));
        out.insert("groupKey".into(), json!(self.group_key));
        out.insert("truncatedAlerts".into(), json!(truncated));
        Value::Object(out)
    }

    /// Alertmanager's default email subject (`__subject`):
    /// `[FIRING:2] HighLoad (page team)`.
    fn subject(&self) -> String {
        let mut out = format!("[{}", self.status.to_uppercase());
        if self.status == "firing" {
            out.push_str(&format!(":{}", self.firing));
        }
        out.push(']');
        let values: Vec<&str> = self.group_labels.values().map(String::as_str).collect();
        out.push(' ');
        out.push_str(&values.join(" "));
        // The template's space, there whether or not a parenthesis follows.
        out.push(' ');
        if self.common_labels.len() > self.group_labels.len() {
            let rest: Vec<&str> = self
                .common_labels
                .iter()
                .filter(|(k, _)| !self.group_labels.contains_key(*k))
                .map(|(_, v)| v.as_str())
                .collect();
            out.push_str(&format!("({})", rest.join(" ")));
        }
        out
    }

    /// A plain-text body: each alert's labels, annotations, times and source.
    fn email_body(&self) -> String {
        let mut out = String::new();
        for (title, status) in [("Firing", "firing"), ("Resolved", "resolved")] {
            let alerts: Vec<&Value> = self
                .alerts
                .iter()
                .filter(|a| a["status"] == status)
                .collect();
            if alerts.is_empty() {
                continue;
            }
            out.push_str(&format!("{title} alerts: {}\n\n", alerts.len()));
            for a in alerts.iter().take(MAX_EMAIL_ALERTS) {
                out.push_str("Labels:\n");
                for (k, v) in a["labels"].as_object().into_iter().flatten() {
                    out.push_str(&format!("  {k} = {}\n", v.as_str().unwrap_or_default()));
                }
                let annotations = a["annotations"].as_object();
                if annotations.is_some_and(|m| !m.is_empty()) {
                    out.push_str("Annotations:\n");
                    for (k, v) in annotations.into_iter().flatten() {
                        out.push_str(&format!("  {k} = {}\n", v.as_str().unwrap_or_default()));
                    }
                }
                out.push_str(&format!(
                    "Started: {}\n",
                    a["startsAt"].as_str().unwrap_or("")
                ));
                if status == "resolved" {
                    out.push_str(&format!("Ended: {}\n", a["endsAt"].as_str().unwrap_or("")));
                }
                if let Some(url) = a["generatorURL"].as_str().filter(|u| !u.is_empty()) {
                    out.push_str(&format!("Source: {url}\n"));
                }
                out.push('\n');
            }
            if alerts.len() > MAX_EMAIL_ALERTS {
                out.push_str(&format!(
                    "... and {} more\n\n",
                    alerts.len() - MAX_EMAIL_ALERTS
                ));
            }
        }
        if !self.external_url.is_empty() {
            out.push_str(&format!("Sent by SecuMon, {}\n", self.external_url));
        }
        out
    }
}

/// One attempt at one integration; an error says whether trying again may help (as
/// Alertmanager: not after a 4xx answer).
async fn send(integration: &Integration, data: &Data) -> Result<(), (String, bool)> {
    match &integration.target {
        Target::Webhook {
            url,
            client,
            authorization,
            ..
        } => {
            let mut request = client
                .post(url)
                .header("Content-Type", "application/json")
                .body(data.webhook().to_string());
            if let Some(a) = authorization {
                request = request.header("Authorization", a);
            }
            let response = request.send().await.map_err(|e| (e.to_string(), true))?;
            let status = response.status();
            if status.is_success() {
                Ok(())
            } else {
                Err((
                    format!("unexpected status code {}", status.as_u16()),
                    !status.is_client_error(),
                ))
            }
        }
        Target::Email(email) => {
            use lettre::AsyncTransport;
            let mut message = lettre::Message::builder()
                .from(email.from.clone())
                .subject(data.subject());
            for to in &email.to {
                message = message.to(to.clone());
            }
            let message = message
                .header(lettre::message::header::ContentType::TEXT_PLAIN)
                .body(data.email_body())
                .map_err(|e| (e.to_string(), false))?;
            email
                .transport
                .send(message)
                .await
                .map(|_| ())
                .map_err(|e| (e.to_string(), true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fingerprints_and_keys_are_alertmanager_s() {
        // Values from Alertmanager's own webhook payloads (`model.LabelSet.Fingerprint`).
        assert_eq!(fingerprint(&BTreeMap::new()), 0xcbf2_9ce4_8422_2325);
        assert_eq!(
            label_set_string(&labels(&[("alertname", "High"), ("job", "a\"b\u{1}")])),
            r#"{alertname="High", job="a\"b\x01"}"#
        );
        // Go sorts `name="value"` strings: `env2=` before `env=`.
        assert_eq!(
            label_set_string(&labels(&[("env", "x"), ("env2", "y")])),
            r#"{env2="y", env="x"}"#
        );
        assert_eq!(quote_meta("a.b*(c)"), r"a\.b\*\(c\)");
        assert_eq!(
            labels_before(&labels(&[("z", "1")]), &labels(&[("a", "1"), ("b", "1")])),
            std::cmp::Ordering::Less
        );
        assert_eq!(go_time(Some(1_500)), "1970-01-01T00:00:01.5Z");
        assert_eq!(go_time(Some(2_000)), "1970-01-01T00:00:02Z");
        assert_eq!(go_time(None), "0001-01-01T00:00:00Z");
    }

    #[test]
    fn a_group_is_notified_again_only_when_alertmanager_would() {
        let now = Instant::now();
        let repeat = Duration::from_secs(60);
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        // Nothing logged yet: only firing alerts are news.
        assert!(needs_update(None, &set(&[1]), &set(&[]), true, repeat, now));
        assert!(!needs_update(
            None,
            &set(&[]),
            &set(&[1]),
            true,
            repeat,
            now
        ));
        let entry = Logged {
            firing: set(&[1, 2]),
            resolved: set(&[]),
            at: now,
        };
        // Unchanged: not before the repeat interval.
        assert!(!needs_update(
            Some(&entry),
            &set(&[1, 2]),
            &set(&[]),
            true,
            repeat,
            now
        ));
        assert!(needs_update(
            Some(&entry),
            &set(&[1, 2]),
            &set(&[]),
            true,
            repeat,
            now + Duration::from_secs(61)
        ));
        // A new firing alert is news...
        assert!(needs_update(
            Some(&entry),
            &set(&[1, 2, 3]),
            &set(&[]),
            false,
            repeat,
            now
        ));
        // ...one that resolved only to an integration told of resolved alerts.
        assert!(needs_update(
            Some(&entry),
            &set(&[1]),
            &set(&[2]),
            true,
            repeat,
            now
        ));
        assert!(!needs_update(
            Some(&entry),
            &set(&[1]),
            &set(&[2]),
            false,
            repeat,
            now
        ));
        // All resolved: notified once, whether or not resolved alerts are sent.
        assert!(needs_update(
            Some(&entry),
            &set(&[]),
            &set(&[1, 2]),
            false,
            repeat,
            now
        ));
    }

    #[test]
    fn messages_are_alertmanager_s() {
        let a = Notification {
            labels: labels(&[
                ("alertname", "High"),
                ("instance", "a"),
                ("severity", "page"),
            ]),
            annotations: labels(&[("summary", "a is high")]),
            starts_at: Some(1_000),
            ends_at: Some(100_000),
            generator_url: "http://x/graph".into(),
        };
        let mut b = a.clone();
        b.labels.insert("instance".into(), "b".into());
        b.ends_at = Some(5_000);
        let group = labels(&[("alertname", "High")]);
        let key = "{}:{alertname=\"High\"}";
        let data = Data::new("team.a", key, &group, &[&b, &a], 10_000, "http://s", 0);
        assert_eq!(data.subject(), "[FIRING:1] High (page)");
        let message = data.webhook();
        assert_eq!(message["receiver"], "team\\.a");
        assert_eq!(message["truncatedAlerts"], 0);
        assert_eq!(message["alerts"][0]["labels"]["instance"], "a");
        assert_eq!(message["alerts"][0]["status"], "firing");
        assert_eq!(message["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(message["alerts"][1]["endsAt"], "1970-01-01T00:00:05Z");
        assert_eq!(
            message["commonLabels"],
            json!({"alertname": "High", "severity": "page"})
        );
        // max_alerts: the first alerts kept, and what is common computed from them.
        let truncated = Data::new("team", key, &group, &[&b, &a], 10_000, "", 1).webhook();
        assert_eq!(truncated["truncatedAlerts"], 1);
        assert_eq!(truncated["commonLabels"]["instance"], "a");
        assert_eq!(
            message["commonAnnotations"],
            json!({"summary": "a is high"})
        );
        assert_eq!(message["version"], "4");
        let resolved = Data::new("team", "k", &group, &[&b], 10_000, "", 0);
        assert_eq!(resolved.subject(), "[RESOLVED] High (b page)");
        let only_group = Data::new("team", "k", &group, &[&b], 10_000, "", 0);
        let mut bare = b.clone();
        bare.labels = group.clone();
        let bare = Data::new("team", "k", &group, &[&bare], 10_000, "", 0);
        // Alertmanager's template keeps its space when no parenthesis follows.
        assert_eq!(bare.subject(), "[RESOLVED] High ");
        assert_ne!(only_group.subject(), bare.subject());
        assert!(resolved.email_body().contains("Resolved alerts: 1"));
    }

    #[test]
    fn files_alertmanager_refuses_are_refused() {
        let timeout = Duration::from_secs(1);
        let bad = [
            ("route:\n  receiver: x\nreceivers:\n  - name: y\n", "undefined receiver \"x\""),
            (
                "route:\n  receiver: x\n  routes: []\nreceivers:\n  - name: x\n",
                "use Alertmanager",
            ),
            (
                "route:\n  receiver: x\nreceivers:\n  - name: x\n    slack_configs: []\n",
                "unknown field `slack_configs`",
            ),
            (
                "route:\n  receiver: x\n  group_by: ['...', a]\nreceivers:\n  - name: x\n",
                "wildcard",
            ),
            (
                "route:\n  receiver: x\nreceivers:\n  - name: x\n    email_configs:\n      - to: a@b.c\n",
                "no global SMTP smarthost set",
            ),
            (
                "global:\n  smtp_smarthost: mail.example.com:25\n  smtp_from: a@b.c\n  smtp_require_tls: false\n  smtp_auth_username: u\nroute:\n  receiver: x\nreceivers:\n  - name: x\n    email_configs:\n      - to: a@b.c\n",
                "clear text",
            ),
            (
                "route:\n  receiver: x\nreceivers:\n  - name: x\n    webhook_configs:\n      - url: ftp://x\n",
                "not an http",
            ),
            ("route:\n  receiver: x\n  group_interval: 0s\nreceivers:\n  - name: x\n", "cannot be zero"),
            ("route:\n  receiver: x\n  group_by: [a, a]\nreceivers:\n  - name: x\n", "duplicated label \"a\""),
            ("route:\n  receiver: ''\nreceivers:\n  - name: x\n", "default receiver"),
            (
                "route:\n  receiver: x\nreceivers:\n  - name: x\n  - name: y\n    webhook_configs:\n      - url: ftp://y\n",
                "receiver \"y\" webhook_configs[0]: url",
            ),
            (
                "route:\n  receiver: x\nreceivers:\n  - name: x\n    webhook_configs:\n      - url: http://x\n        http_config:\n          authorization: {type: Basic, credentials: c}\n",
                "use \"basic_auth\"",
            ),
            (
                "route:\n  receiver: x\nreceivers:\n  - name: x\n    webhook_configs:\n      - url: http://x\n        http_config:\n          authorization: {credentials: c, credentials_file: /f}\n",
                "at most one of authorization credentials",
            ),
            (
                "route:\n  receiver: x\nreceivers:\n  - name: x\n    webhook_configs:\n      - url: https://x\n        http_config:\n          tls_config: {server_name: y}\n",
                "server_name is not supported",
            ),
            (
                "global:\n  smtp_auth_password: a\n  smtp_auth_password_file: /f\nroute:\n  receiver: x\nreceivers:\n  - name: x\n",
                "at most one of smtp_auth_password",
            ),
        ];
        for (text, message) in bad {
            let error = Config::parse(text, timeout).err().unwrap_or_default();
            assert!(error.contains(message), "{text}: {error}");
        }
        let good = Config::parse(
            "global:\n  smtp_smarthost: localhost:2525\n  smtp_from: secumon@example.com\n  smtp_require_tls: false\nroute:\n  receiver: team\n  group_by: [alertname]\n  group_wait: 1s\nreceivers:\n  - name: team\n    webhook_configs:\n      - url: http://127.0.0.1:1/hook\n    email_configs:\n      - to: 'a@example.com, b@example.com'\n",
            timeout,
        )
        .unwrap();
        assert_eq!(good.integrations.len(), 2);
        assert_eq!(good.group_wait, Duration::from_secs(1));
        assert_eq!(good.repeat_interval, Duration::from_secs(4 * 3600));
    }
}
