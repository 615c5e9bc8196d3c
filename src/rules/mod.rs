//! Recording and alerting rules, as Prometheus 2.42 evaluates them (`rules/manager.go`,
//! `recording.go`, `alerting.go`): groups loaded from rule files (`--rules`), each evaluated on
//! its own schedule, at the times Prometheus would pick for the same file and group name;
//! recording rules written back through the ingest path into `--rules-tenant`; alert states
//! inactive, pending and firing with `for` and `keep_firing_for`, and the `ALERTS` and
//! `ALERTS_FOR_STATE` series. docs/alerting.md says what is built and what is not yet.

pub mod file;
pub mod notify;
pub mod receivers;
pub mod template;

use crate::ingest::Batch;
use crate::model::{Label, Labels, Sample, TenantId, STALE_NAN_BITS};
use crate::promql::{Engine, QueryOptions, QueryValue};
use crate::storage::{SeriesWrite, WriteBatch};
use clap::Args;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// The protocol rule output is counted under in `secumon_samples_ingested_total`.
pub const PROTOCOL: &str = "rules";
/// How long a resolved alert is kept (and sent as resolved), as Prometheus's
/// `resolvedRetention`.
const RESOLVED_RETENTION_MS: i64 = 15 * 60 * 1000;

/// Rules settings (`[rules]` in the config file).
#[derive(Clone, Debug, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// Rule files in Prometheus's format, comma-separated; each may be a glob
    /// (`/etc/secumon/rules/*.yml`). Read at start, again on SIGHUP and on `POST /-/reload`.
    #[arg(
        id = "rules.files",
        long = "rules",
        env = "SECUMON_RULES",
        default_value = "",
        value_delimiter = ','
    )]
    pub files: Vec<String>,
    /// How often a group without its own `interval` is evaluated (Prometheus's global
    /// `evaluation_interval`).
    #[arg(
        id = "rules.evaluation_interval",
        long = "rules-evaluation-interval",
        env = "SECUMON_RULES_EVALUATION_INTERVAL",
        default_value = "1m",
        value_parser = parse_interval
    )]
    #[serde(deserialize_with = "deserialize_interval")]
    pub evaluation_interval: std::time::Duration,
    /// Tenant whose series the rules of `--rules` files read and into which they write.
    #[arg(
        id = "rules.tenant",
        long = "rules-tenant",
        env = "SECUMON_RULES_TENANT",
        default_value = TenantId::DEFAULT
    )]
    pub tenant: String,
    /// The URL users reach SecuMon at, for `$externalURL`, `externalURL` and `pathPrefix` in
    /// templates (Prometheus's `--web.external-url`).
    #[arg(
        id = "rules.external_url",
        long = "rules-external-url",
        env = "SECUMON_RULES_EXTERNAL_URL",
        default_value = ""
    )]
    pub external_url: String,
    /// Labels added to every alert sent (when it lacks them) and shown to templates as
    /// `$externalLabels`, comma-separated `name=value` pairs (Prometheus's
    /// `global.external_labels`; a value cannot hold a comma).
    #[arg(
        id = "rules.external_labels",
        long = "rules-external-labels",
        env = "SECUMON_RULES_EXTERNAL_LABELS",
        default_value = "",
        value_delimiter = ','
    )]
    pub external_labels: Vec<String>,
    /// Largest rule file read, in bytes; a larger one is refused as invalid.
    #[arg(
        id = "rules.max_file_bytes",
        long = "rules-max-file-bytes",
        env = "SECUMON_RULES_MAX_FILE_BYTES",
        default_value_t = 4 * 1024 * 1024
    )]
    pub max_file_bytes: u64,
    /// Alertmanagers alerts are sent to (their base URLs, comma-separated:
    /// `http://alertmanager:9093`), on its v2 API; none: alerts are only shown.
    #[arg(
        id = "rules.alertmanager_urls",
        long = "alertmanager-url",
        env = "SECUMON_ALERTMANAGER_URL",
        default_value = "",
        value_delimiter = ','
    )]
    pub alertmanager_urls: Vec<String>,
    /// A file in Alertmanager's format whose route and webhook and email receivers SecuMon
    /// notifies itself, for users without an Alertmanager (docs/alerting.md says which keys
    /// it reads). Read with the rule files.
    #[arg(
        id = "rules.alert_receivers",
        long = "alert-receivers",
        env = "SECUMON_ALERT_RECEIVERS",
        default_value = ""
    )]
    pub alert_receivers: String,
    /// Least time between two sends of the same firing or resolved alert (Prometheus's
    /// `--rules.alert.resend-delay`).
    #[arg(
        id = "rules.resend_delay",
        long = "rules-resend-delay",
        env = "SECUMON_RULES_RESEND_DELAY",
        default_value = "1m",
        value_parser = parse_interval
    )]
    #[serde(deserialize_with = "deserialize_interval")]
    pub resend_delay: std::time::Duration,
    /// How long one send to an Alertmanager may take.
    #[arg(
        id = "rules.alertmanager_timeout",
        long = "rules-alertmanager-timeout",
        env = "SECUMON_RULES_ALERTMANAGER_TIMEOUT",
        default_value = "10s",
        value_parser = parse_interval
    )]
    #[serde(deserialize_with = "deserialize_interval")]
    pub alertmanager_timeout: std::time::Duration,
    /// Longest outage of the server after which an alert's `for` state is still restored from
    /// `ALERTS_FOR_STATE` (Prometheus's `--rules.alert.for-outage-tolerance`).
    #[arg(
        id = "rules.for_outage_tolerance",
        long = "rules-for-outage-tolerance",
        env = "SECUMON_RULES_FOR_OUTAGE_TOLERANCE",
        default_value = "1h",
        value_parser = parse_interval
    )]
    #[serde(deserialize_with = "deserialize_interval")]
    pub for_outage_tolerance: std::time::Duration,
    /// Least time between a restart and a restored alert firing; only alerts whose `for` is
    /// longer are restored (Prometheus's `--rules.alert.for-grace-period`).
    #[arg(
        id = "rules.for_grace_period",
        long = "rules-for-grace-period",
        env = "SECUMON_RULES_FOR_GRACE_PERIOD",
        default_value = "10m",
        value_parser = parse_interval
    )]
    #[serde(deserialize_with = "deserialize_interval")]
    pub for_grace_period: std::time::Duration,
    /// Shortest evaluation interval of a group stored over the ruler API; a shorter one is
    /// refused (files, the operator's, may use any).
    #[arg(
        id = "rules.min_interval",
        long = "rules-min-interval",
        env = "SECUMON_RULES_MIN_INTERVAL",
        default_value = "10s",
        value_parser = parse_interval
    )]
    #[serde(deserialize_with = "deserialize_interval")]
    pub min_interval: std::time::Duration,
    /// Most rule groups a tenant may store over the ruler API (Mimir's
    /// `ruler_max_rule_groups_per_tenant`).
    #[arg(
        id = "rules.max_groups_per_tenant",
        long = "rules-max-groups-per-tenant",
        env = "SECUMON_RULES_MAX_GROUPS_PER_TENANT",
        default_value_t = 70
    )]
    pub max_groups_per_tenant: usize,
    /// Most rules in a group stored over the ruler API (Mimir's
    /// `ruler_max_rules_per_rule_group`).
    #[arg(
        id = "rules.max_rules_per_group",
        long = "rules-max-rules-per-group",
        env = "SECUMON_RULES_MAX_RULES_PER_GROUP",
        default_value_t = 20
    )]
    pub max_rules_per_group: usize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

/// An evaluation interval from 1 s to a day.
fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    crate::config::duration_within(text, 1_000, 86_400_000, "from 1s to 1d")
}

fn deserialize_interval<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<std::time::Duration, D::Error> {
    crate::config::deserialize_duration(deserializer, parse_interval)
}

/// `ok`, `err`, or `unknown` before the first evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Unknown,
    Good,
    Bad,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Good => "ok",
            Health::Bad => "err",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlertState {
    Inactive,
    Pending,
    Firing,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Inactive => "inactive",
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
        }
    }
}

/// One alert of an alerting rule: a series of its result, with the rule's labels.
#[derive(Clone, Debug)]
pub struct Alert {
    pub state: AlertState,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub value: f64,
    /// Evaluation times, in milliseconds.
    pub active_at: i64,
    pub fired_at: Option<i64>,
    pub resolved_at: Option<i64>,
    pub keep_firing_since: Option<i64>,
    pub last_sent_at: Option<i64>,
    pub valid_until: Option<i64>,
}

/// What a rule's last evaluation left.
#[derive(Debug)]
pub struct RuleStatus {
    pub health: Health,
    pub last_error: Option<String>,
    pub evaluation_seconds: f64,
    pub last_evaluation: Option<chrono::DateTime<chrono::Utc>>,
    /// Series written by the previous successful evaluation (to mark those that went away).
    previous: HashMap<u128, Labels>,
    /// Alerts by the fingerprint of their labels.
    pub active: HashMap<u128, Alert>,
}

/// A rule of a loaded group.
#[derive(Debug)]
pub struct LoadedRule {
    pub rule: file::Rule,
    /// An alerting rule's label and annotation templates, parsed once.
    label_templates: Vec<(String, template::Compiled)>,
    annotation_templates: Vec<(String, template::Compiled)>,
    pub expr: promql_parser::parser::Expr,
    /// The expression as Prometheus prints it (`query` in the API).
    pub query: String,
    pub status: Mutex<RuleStatus>,
}

impl LoadedRule {
    /// The highest state of its alerts, resolved ones included (Prometheus's `State()`).
    pub fn state(&self) -> AlertState {
        lock(&self.status)
            .active
            .values()
            .map(|a| a.state)
            .max()
            .unwrap_or(AlertState::Inactive)
    }
}

/// Why a group's evaluation ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Running,
    /// A reload dropped it: what it wrote is marked stale two intervals later, as Prometheus
    /// marks it.
    Removed,
    /// A reload changed it: the new group carries its state on.
    Replaced,
    /// The server stops: nothing is marked stale, so a restart restores the alerts' state.
    Shutdown,
}

/// A loaded group.
pub struct Group {
    pub file: String,
    pub name: String,
    pub interval_ms: i64,
    pub limit: i64,
    pub tenant: TenantId,
    pub rules: Vec<LoadedRule>,
    pub status: Mutex<GroupStatus>,
    /// Where alerts go, and how often they are sent again.
    notifier: Arc<notify::Notifier>,
    resend_delay_ms: i64,
    external_url: String,
    external_labels: Arc<BTreeMap<String, String>>,
    metrics: Arc<crate::telemetry::Metrics>,
    /// `--rules-for-outage-tolerance` and `--rules-for-grace-period`, in ms.
    outage_tolerance_ms: i64,
    grace_period_ms: i64,
    /// ALERTS and ALERTS_FOR_STATE are written once the group has evaluated twice after
    /// the server started, as Prometheus writes them once its `for` state is restored.
    restored: std::sync::atomic::AtomicBool,
    stop: tokio::sync::watch::Sender<Stop>,
    /// Stored over the ruler API (a tenant's), not read from a file (the operator's).
    pub from_api: bool,
    /// Series of rules a reload removed from the group, marked stale after its first
    /// evaluation (Prometheus's `staleSeries`).
    stale: Mutex<Vec<Labels>>,
}

#[derive(Debug, Default)]
pub struct GroupStatus {
    pub evaluation_seconds: f64,
    pub last_evaluation: Option<chrono::DateTime<chrono::Utc>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Group {
    /// The `rule_group` label of its metrics: `file;name`, as Prometheus's.
    fn key(&self) -> crate::telemetry::RuleGroupLabels {
        crate::telemetry::RuleGroupLabels {
            tenant: self.tenant.to_string(),
            rule_group: format!("{};{}", self.file, self.name),
        }
    }

    /// Drops the group's series from `/metrics`.
    fn forget_metrics(&self) {
        let key = self.key();
        let rules = &self.metrics.rules;
        rules.evaluations.remove(&key);
        rules.failures.remove(&key);
        rules.missed.remove(&key);
        rules.last_duration.remove(&key);
        rules.last_evaluation.remove(&key);
    }

    /// Prometheus's `Group.hash`: xxhash64 of the labels `file` and `name`.
    fn hash(&self) -> u64 {
        let mut bytes = Vec::new();
        for (name, value) in [("file", &self.file), ("name", &self.name)] {
            bytes.extend_from_slice(name.as_bytes());
            bytes.push(0xff);
            bytes.extend_from_slice(value.as_bytes());
            bytes.push(0xff);
        }
        xxhash_rust::xxh64::xxh64(&bytes, 0)
    }

    /// The evaluation slot at or before `now_ns` (`Group.EvalTimestamp`): slots are offset
    /// from the interval's boundaries by the group's hash, so groups spread over the interval
    /// and Prometheus evaluates the same group at the same times.
    pub fn eval_timestamp_ns(&self, now_ns: i128) -> i128 {
        let interval = i128::from(self.interval_ms) * 1_000_000;
        let offset = i128::from(self.hash() % interval as u64);
        let adjusted = now_ns - offset;
        adjusted - adjusted.rem_euclid(interval) + offset
    }
}

/// The groups being evaluated, and how to reload them.
pub struct Manager {
    config: RulesConfig,
    /// `--rules-external-labels`, parsed.
    external_labels: Arc<BTreeMap<String, String>>,
    /// The groups of the rule files as last read without error.
    last_files: Mutex<Vec<(String, file::RuleGroups)>>,
    /// Held by a ruler API write from its limit checks to its store, so concurrent writes
    /// cannot pass a limit together.
    pub ruler_writes: tokio::sync::Mutex<()>,
    /// Set at shutdown: reloads then do nothing.
    stopping: std::sync::atomic::AtomicBool,
    pub notifier: Arc<notify::Notifier>,
    metrics: Arc<crate::telemetry::Metrics>,
    groups: Mutex<Vec<Arc<Group>>>,
    /// Serialises reloads.
    reloading: tokio::sync::Mutex<()>,
}

/// Whether a reload reads the rule files again or keeps the groups last read from them (a
/// ruler API change: a file broken since does not hold it up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Files {
    Read,
    Keep,
}

/// Why a reload failed: the files' problems (the groups running before stay).
#[derive(Debug, thiserror::Error)]
#[error("error loading rules, previous rule set restored: {0}")]
pub struct LoadError(pub String);

impl Manager {
    pub fn new(
        config: RulesConfig,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> Result<Manager, String> {
        let stopping = std::sync::atomic::AtomicBool::new(false);
        if !crate::auth::valid_tenant(&config.tenant) {
            return Err(format!(
                "--rules-tenant {:?} is not a valid tenant id",
                config.tenant
            ));
        }
        let mut external_labels = BTreeMap::new();
        for pair in config.external_labels.iter().filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("--rules-external-labels {pair:?}: not name=value"))?;
            if !crate::model::labels::is_valid_label_name(name) {
                return Err(format!(
                    "--rules-external-labels: {name:?} is not a valid label name"
                ));
            }
            if external_labels
                .insert(name.to_owned(), value.to_owned())
                .is_some()
            {
                return Err(format!("--rules-external-labels: {name:?} is given twice"));
            }
        }
        let notifier = Arc::new(notify::Notifier::new(
            &config.alertmanager_urls,
            config.alertmanager_timeout,
            &config.external_url,
            metrics.clone(),
        )?);
        Ok(Manager {
            external_labels: Arc::new(external_labels),
            last_files: Mutex::new(Vec::new()),
            ruler_writes: tokio::sync::Mutex::new(()),
            config,
            notifier,
            metrics,
            stopping,
            groups: Mutex::new(Vec::new()),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The groups, sorted by file and name.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        lock(&self.groups).clone()
    }

    /// The files `--rules` names, globs expanded, sorted, each once.
    fn files(&self) -> Result<Vec<String>, String> {
        let mut files = Vec::new();
        for pattern in self.config.files.iter().filter(|p| !p.is_empty()) {
            let paths = glob::glob(pattern).map_err(|e| format!("{pattern}: {e}"))?;
            for path in paths {
                let path = path.map_err(|e| e.to_string())?;
                files.push(path.display().to_string());
            }
        }
        files.sort();
        files.dedup();
        Ok(files)
    }

    /// The `--alert-receivers` file, parsed, or `None` when there is none.
    async fn read_receivers(&self) -> Result<Option<receivers::Config>, String> {
        let path = self.config.alert_receivers.clone();
        if path.is_empty() {
            return Ok(None);
        }
        let (max_bytes, timeout) = (self.config.max_file_bytes, self.config.alertmanager_timeout);
        tokio::task::spawn_blocking(move || {
            let text = read_text(&path, max_bytes).map_err(|e| format!("{path}: {e}"))?;
            receivers::Config::parse(&text, timeout)
                .map(Some)
                .map_err(|e| format!("{path}: {e}"))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Reads every rule file and, when all are valid, replaces the running groups with theirs
    /// (a group whose file, name, interval, limit and rules are unchanged keeps running with
    /// its state). `state` is what evaluations run with; `first` tells whether this is the
    /// load at start.
    pub async fn reload(
        self: &Arc<Self>,
        state: &Arc<crate::api::AppState>,
        first: bool,
        files: Files,
    ) -> Result<usize, LoadError> {
        let _one = self.reloading.lock().await;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LoadError("the server is stopping".into()));
        }
        let parsed = if files == Files::Read {
            let files = self.files().map_err(LoadError)?;
            let max_bytes = self.config.max_file_bytes;
            let (parsed, errors) = tokio::task::spawn_blocking(move || {
                let mut parsed = Vec::new();
                let mut errors = Vec::new();
                for path in &files {
                    match read(path, max_bytes) {
                        Ok(groups) => parsed.push((path.clone(), groups)),
                        Err(e) => errors.extend(e.0.into_iter().map(|m| format!("{path}: {m}"))),
                    }
                }
                (parsed, errors)
            })
            .await
            .map_err(|e| LoadError(e.to_string()))?;
            if !errors.is_empty() {
                for e in &errors {
                    tracing::error!(error = %e, "loading rule groups failed");
                }
                return Err(LoadError(errors.join("; ")));
            }
            let receivers = self.read_receivers().await.map_err(|e| {
                tracing::error!(error = %e, "loading the alert receivers failed");
                LoadError(e)
            })?;
            self.notifier.receivers.configure(receivers);
            *lock(&self.last_files) = parsed.clone();
            parsed
        } else {
            lock(&self.last_files).clone()
        };
        let tenant = TenantId::new(self.config.tenant.as_str());
        let mut sources: Vec<(TenantId, String, file::RuleGroups, bool)> = parsed
            .into_iter()
            .map(|(path, groups)| (tenant.clone(), path, groups, false))
            .collect();
        // Groups stored over the ruler API: each tenant's, its namespace as their file. They
        // were checked when stored; one that no longer reads is left out, not the others.
        let stored = state
            .auth
            .catalog()
            .rule_groups(None)
            .await
            .map_err(|e| LoadError(format!("cannot read the stored rule groups: {e}")))?;
        for record in stored {
            match parse_group(&record.body) {
                Ok(group) => sources.push((
                    record.tenant,
                    record.namespace,
                    file::RuleGroups {
                        groups: vec![group],
                    },
                    true,
                )),
                Err(e) => {
                    tracing::error!(tenant = %record.tenant, namespace = %record.namespace, group = %record.name, error = %e, "a stored rule group does not load")
                }
            }
        }
        let default_interval = self.config.evaluation_interval.as_millis() as i64;
        let old = self.groups();
        let mut new_groups = Vec::new();
        let mut started = Vec::new();
        let mut replaced: Vec<Arc<Group>> = Vec::new();
        let min_api_interval = self.config.min_interval.as_millis() as i64;
        for (tenant, path, groups, from_api) in sources {
            for g in groups.groups {
                let mut interval_ms = g.interval.filter(|i| *i > 0).unwrap_or(default_interval);
                if from_api {
                    interval_ms = interval_ms.max(min_api_interval);
                }
                let same = old.iter().find(|o| {
                    o.tenant == tenant
                        && o.from_api == from_api
                        && o.file == path
                        && o.name == g.name
                        && o.interval_ms == interval_ms
                        && o.limit == g.limit
                        && o.rules.iter().map(|r| &r.rule).eq(g.rules.iter())
                });
                if let Some(same) = same {
                    // Each group once, even where a ruler namespace repeats a file's path.
                    if !new_groups.iter().any(|n: &Arc<Group>| Arc::ptr_eq(n, same)) {
                        new_groups.push(same.clone());
                    }
                    continue;
                }
                let rules = g
                    .rules
                    .into_iter()
                    .map(|rule| {
                        // Checked when the file was read.
                        let expr = crate::promql::parse(&rule.expr).expect("validated expression");
                        let compile = |map: &BTreeMap<String, String>| {
                            if !rule.is_alerting() {
                                return Vec::new();
                            }
                            map.iter()
                                .map(|(k, v)| {
                                    let t = template::Compiled::new(
                                        &rule.alert,
                                        v,
                                        &self.config.external_url,
                                    );
                                    (k.clone(), t)
                                })
                                .collect()
                        };
                        LoadedRule {
                            label_templates: compile(&rule.labels),
                            annotation_templates: compile(&rule.annotations),
                            query: expr.to_string(),
                            expr,
                            rule,
                            status: Mutex::new(RuleStatus {
                                health: Health::Unknown,
                                last_error: None,
                                evaluation_seconds: 0.0,
                                last_evaluation: None,
                                previous: HashMap::new(),
                                active: HashMap::new(),
                            }),
                        }
                    })
                    .collect();
                let group = Arc::new(Group {
                    file: path.clone(),
                    name: g.name,
                    interval_ms,
                    limit: g.limit,
                    tenant: tenant.clone(),
                    rules,
                    status: Mutex::new(GroupStatus::default()),
                    notifier: self.notifier.clone(),
                    resend_delay_ms: self.config.resend_delay.as_millis() as i64,
                    external_url: self.config.external_url.clone(),
                    external_labels: self.external_labels.clone(),
                    metrics: self.metrics.clone(),
                    outage_tolerance_ms: self.config.for_outage_tolerance.as_millis() as i64,
                    grace_period_ms: self.config.for_grace_period.as_millis() as i64,
                    restored: std::sync::atomic::AtomicBool::new(!first),
                    stop: tokio::sync::watch::channel(Stop::Running).0,
                    from_api,
                    stale: Mutex::new(Vec::new()),
                });
                // A changed group keeps the state of the one it replaces.
                if let Some(before) = old.iter().find(|o| {
                    o.tenant == group.tenant
                        && o.from_api == group.from_api
                        && o.file == group.file
                        && o.name == group.name
                }) {
                    copy_state(before, &group);
                    replaced.push(before.clone());
                }
                started.push(group.clone());
                new_groups.push(group);
            }
        }
        new_groups
            .sort_by(|a, b| (&a.tenant, &a.file, &a.name).cmp(&(&b.tenant, &b.file, &b.name)));
        for gone in old
            .iter()
            .filter(|o| !new_groups.iter().any(|n| Arc::ptr_eq(n, o)))
        {
            let reason = if replaced.iter().any(|r| Arc::ptr_eq(r, gone)) {
                Stop::Replaced
            } else {
                Stop::Removed
            };
            let _ = gone.stop.send(reason);
        }
        let count = new_groups.len();
        *lock(&self.groups) = new_groups;
        for group in started {
            tokio::spawn(run(group, state.clone()));
        }
        Ok(count)
    }

    /// Stops every group, for good: a reload after this loads nothing.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for group in lock(&self.groups).drain(..) {
            let _ = group.stop.send(Stop::Shutdown);
        }
    }
}

/// Carries the state of `before` on to `after`, its new version (`Group.CopyState`): each rule
/// takes the alerts and written series of the rule of the same name and labels (in order);
/// the series of rules that are gone are marked stale after `after`'s first evaluation.
fn copy_state(before: &Group, after: &Group) {
    let mut taken = vec![false; before.rules.len()];
    for rule in &after.rules {
        let found = before.rules.iter().enumerate().find(|(i, old)| {
            !taken[*i] && old.rule.name() == rule.rule.name() && old.rule.labels == rule.rule.labels
        });
        if let Some((i, old)) = found {
            taken[i] = true;
            let mut from = lock(&old.status);
            let mut to = lock(&rule.status);
            to.previous = std::mem::take(&mut from.previous);
            to.active = std::mem::take(&mut from.active);
        }
    }
    let mut stale = lock(&after.stale);
    for (i, old) in before.rules.iter().enumerate() {
        if !taken[i] {
            stale.extend(lock(&old.status).previous.values().cloned());
        }
    }
    let (evaluation_seconds, last_evaluation) = {
        let status = lock(&before.status);
        (status.evaluation_seconds, status.last_evaluation)
    };
    *lock(&after.status) = GroupStatus {
        evaluation_seconds,
        last_evaluation,
    };
}

/// One group in Prometheus's YAML (a ruler API body), checked as a file's groups are.
pub fn parse_group(text: &str) -> Result<file::RuleGroup, file::Invalid> {
    parse_group_within(text, usize::MAX)
}

/// [`parse_group`], refusing more than `max_rules` rules before checking any.
pub fn parse_group_within(text: &str, max_rules: usize) -> Result<file::RuleGroup, file::Invalid> {
    let group: file::RuleGroup =
        yaml_serde::from_str(text).map_err(|e| file::Invalid(vec![e.to_string()]))?;
    if group.rules.len() > max_rules {
        return Err(file::Invalid(vec![format!(
            "per-user rules per rule group limit (limit: {max_rules}) exceeded"
        )]));
    }
    let wrapped = file::RuleGroups {
        groups: vec![group],
    };
    let errors = file::validate(&wrapped);
    if !errors.is_empty() {
        return Err(file::Invalid(errors));
    }
    Ok(wrapped.groups.into_iter().next().expect("one group"))
}

impl Manager {
    pub fn config(&self) -> &RulesConfig {
        &self.config
    }
}

/// A rule file read and checked, within `max_bytes`.
pub fn read(path: &str, max_bytes: u64) -> Result<file::RuleGroups, file::Invalid> {
    let text = read_text(path, max_bytes).map_err(|e| file::Invalid(vec![e]))?;
    file::parse(&text)
}

/// A file's text, refused past `max_bytes` (`--rules-max-file-bytes`).
fn read_text(path: &str, max_bytes: u64) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(max_bytes + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > max_bytes {
        return Err(format!(
            "larger than --rules-max-file-bytes ({max_bytes} bytes)"
        ));
    }
    Ok(text)
}

/// Evaluates `group` on its schedule until it is stopped (`Group.run`).
async fn run(group: Arc<Group>, state: Arc<crate::api::AppState>) {
    let mut stop = group.stop.subscribe();
    let interval_ns = i128::from(group.interval_ms) * 1_000_000;
    let now_ns = || {
        chrono::Utc::now()
            .timestamp_nanos_opt()
            .map_or(0, i128::from)
    };
    let mut slot = group.eval_timestamp_ns(now_ns()) + interval_ns;
    let mut evaluations = 0u64;
    loop {
        let wait = (slot - now_ns()).max(0) as u64;
        let stopped = tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_nanos(wait)) => false,
            _ = stop.wait_for(|s| *s != Stop::Running) => true,
        };
        if stopped {
            let reason = *stop.borrow();
            if reason == Stop::Removed {
                // Two intervals later, unless the server stops first.
                let wait = std::time::Duration::from_millis(2 * group.interval_ms as u64);
                let shutdown = tokio::select! {
                    _ = tokio::time::sleep(wait) => false,
                    _ = stop.wait_for(|s| *s == Stop::Shutdown) => true,
                };
                if !shutdown {
                    mark_gone_stale(&group, &state, now_ns()).await;
                }
                group.forget_metrics();
            }
            return;
        }
        // Slots missed while the previous evaluation ran are skipped, not caught up.
        let behind = (now_ns() - slot) / interval_ns;
        if behind > 0 {
            slot += behind * interval_ns;
            group
                .metrics
                .rules
                .missed
                .get_or_create(&group.key())
                .inc_by(behind as u64);
        }
        evaluate(&group, &state, (slot / 1_000_000) as i64).await;
        evaluations += 1;
        let stale: Vec<SeriesWrite> = std::mem::take(&mut *lock(&group.stale))
            .into_iter()
            .map(|labels| SeriesWrite {
                labels,
                samples: vec![Sample {
                    t: (slot / 1_000_000) as i64,
                    v: f64::from_bits(STALE_NAN_BITS),
                }],
            })
            .collect();
        // Logged by `write`; a series that could not be marked stale ends at its lookback.
        let _ = write(&state, &group.tenant, &stale).await;
        if evaluations == 2 && !group.restored.load(std::sync::atomic::Ordering::Relaxed) {
            restore_for_state(&group, &state, chrono::Utc::now().timestamp_millis()).await;
            group
                .restored
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        slot += interval_ns;
    }
}

/// Restores when the alerts of `group` became active from the `ALERTS_FOR_STATE` series
/// written before the server restarted (`Group.RestoreForState`): an alert that was pending
/// keeps the time it had spent pending before the outage, one that was firing fires again at
/// once, and none fires sooner than `--rules-for-grace-period` after the restart. Only alerts
/// whose `for` is at least the grace period are restored; an outage longer than
/// `--rules-for-outage-tolerance` restores nothing.
async fn restore_for_state(group: &Group, state: &crate::api::AppState, now: i64) {
    for rule in group.rules.iter().filter(|r| r.rule.is_alerting()) {
        let hold = rule.rule.r#for;
        if hold < group.grace_period_ms {
            continue;
        }
        let alerts: Vec<(u128, Alert)> = lock(&rule.status)
            .active
            .iter()
            .filter(|(_, a)| a.state != AlertState::Inactive)
            .map(|(fp, a)| (*fp, a.clone()))
            .collect();
        for (fp, alert) in alerts {
            let [_, for_state] = alert_series(rule, &alert, now);
            let matchers: Vec<crate::model::Matcher> = for_state
                .labels
                .pairs()
                .map(|(n, v)| crate::model::Matcher::equal(n, v))
                .collect();
            let hints = crate::storage::SelectHints {
                start: now - group.outage_tolerance_ms,
                end: now,
                range: group.outage_tolerance_ms,
                ..Default::default()
            };
            let series = match state.storage.select(&group.tenant, &matchers, &hints).await {
                Ok(series) => series,
                Err(e) => {
                    tracing::warn!(rule = %rule.rule.alert, error = %e, "failed to restore 'for' state");
                    continue;
                }
            };
            // The series with exactly these labels, not one with more.
            let Some(last) = series
                .iter()
                .find(|s| s.labels.len() == matchers.len())
                .and_then(|s| s.samples.iter().rev().find(|p| p.t <= now))
            else {
                continue;
            };
            // A value no evaluation writes (one remote-written by hand) restores nothing.
            if crate::model::is_stale_nan(last.v) || !(0.0..=1e12).contains(&last.v) {
                continue;
            }
            let down_at = last.t.div_euclid(1000) * 1000;
            let mut active_at = last.v as i64 * 1000;
            let remaining = hold - (down_at - active_at);
            if remaining <= 0 {
                // It was firing: it fires again at the next evaluation.
            } else if remaining < group.grace_period_ms {
                active_at = now + group.grace_period_ms - hold;
            } else {
                active_at += now - down_at;
            }
            if let Some(a) = lock(&rule.status).active.get_mut(&fp) {
                a.active_at = active_at;
            }
        }
    }
}

/// Writes stale markers for everything a removed group wrote last.
async fn mark_gone_stale(group: &Group, state: &crate::api::AppState, now_ns: i128) {
    let t = (now_ns / 1_000_000) as i64;
    let mut series = Vec::new();
    for rule in &group.rules {
        let status = lock(&rule.status);
        series.extend(status.previous.values().map(|labels| SeriesWrite {
            labels: labels.clone(),
            samples: vec![Sample {
                t,
                v: f64::from_bits(STALE_NAN_BITS),
            }],
        }));
    }
    let _ = write(state, &group.tenant, &series).await;
}

/// Writes rule output; a storage failure or a refused sample is the error (Prometheus sets the
/// rule's health from its appender's errors the same way).
async fn write(
    state: &crate::api::AppState,
    tenant: &TenantId,
    series: &[SeriesWrite],
) -> Result<(), String> {
    if series.is_empty() {
        return Ok(());
    }
    let batch = Batch {
        series: WriteBatch::from_series(series),
        ..Default::default()
    };
    match state.ingester.write(PROTOCOL, tenant, batch).await {
        Ok(summary) => match summary.first_error {
            Some(e) if summary.rejected > 0 => Err(e),
            _ => Ok(()),
        },
        Err(e) => {
            tracing::warn!(tenant = %tenant, error = %e, "cannot write rule results");
            Err(e.to_string())
        }
    }
}

/// One evaluation of every rule of `group` at `t` (ms), in order (`Group.Eval`).
pub async fn evaluate(group: &Group, state: &crate::api::AppState, t: i64) {
    let started = std::time::Instant::now();
    let wall = chrono::Utc::now();
    let restored = group.restored.load(std::sync::atomic::Ordering::Relaxed);
    for rule in &group.rules {
        let rule_started = std::time::Instant::now();
        let rule_wall = chrono::Utc::now();
        let result = if rule.rule.is_alerting() {
            eval_alerting(rule, &state.engine, group, t, restored).await
        } else {
            eval_recording(rule, &state.engine, group, t).await
        };
        let key = group.key();
        group.metrics.rules.evaluations.get_or_create(&key).inc();
        if result.is_err() {
            group.metrics.rules.failures.get_or_create(&key).inc();
        } else if rule.rule.is_alerting() && !group.from_api {
            // A tenant's alerts (ruler API) are shown, not sent: the Alertmanagers of
            // --alertmanager-url are the operator's (docs/alerting.md).
            let mut due = notify::due(
                &mut lock(&rule.status).active,
                t,
                group.resend_delay_ms,
                group.interval_ms,
                &notify::generator_url(&group.external_url, &rule.query),
            );
            // External labels, where the alert has none of that name (Prometheus's notifier;
            // an empty one sets nothing).
            for alert in &mut due {
                for (name, value) in group.external_labels.iter().filter(|(_, v)| !v.is_empty()) {
                    alert
                        .labels
                        .entry(name.clone())
                        .or_insert_with(|| value.clone());
                }
            }
            group.notifier.send(due);
        }
        let outcome = match result {
            Ok(series) => {
                let stale = {
                    let mut status = lock(&rule.status);
                    let current: HashMap<u128, Labels> = series
                        .iter()
                        .map(|s| (s.labels.fingerprint(), s.labels.clone()))
                        .collect();
                    let stale: Vec<SeriesWrite> = status
                        .previous
                        .iter()
                        .filter(|(fp, _)| !current.contains_key(*fp))
                        .map(|(_, labels)| SeriesWrite {
                            labels: labels.clone(),
                            samples: vec![Sample {
                                t,
                                v: f64::from_bits(STALE_NAN_BITS),
                            }],
                        })
                        .collect();
                    status.previous = current;
                    stale
                };
                let written = write(state, &group.tenant, &series).await;
                let marked = write(state, &group.tenant, &stale).await;
                written.and(marked)
            }
            Err(e) => {
                tracing::warn!(group = %group.name, rule = %rule.rule.name(), error = %e, "evaluating rule failed");
                Err(e)
            }
        };
        let mut status = lock(&rule.status);
        match outcome {
            Ok(()) => {
                status.health = Health::Good;
                status.last_error = None;
            }
            Err(e) => {
                status.health = Health::Bad;
                status.last_error = Some(e);
            }
        }
        status.evaluation_seconds = rule_started.elapsed().as_secs_f64();
        status.last_evaluation = Some(rule_wall);
    }
    let mut status = lock(&group.status);
    status.evaluation_seconds = started.elapsed().as_secs_f64();
    status.last_evaluation = Some(wall);
    let key = group.key();
    group
        .metrics
        .rules
        .last_duration
        .get_or_create(&key)
        .set(status.evaluation_seconds);
    group
        .metrics
        .rules
        .last_evaluation
        .get_or_create(&key)
        .set(wall.timestamp_millis() as f64 / 1000.0);
}

/// The rule's expression at `t` as a vector (a scalar is one series without labels).
async fn query(
    engine: &Engine,
    tenant: &TenantId,
    rule: &LoadedRule,
    t: i64,
) -> Result<Vec<(Labels, f64)>, String> {
    let value = engine
        .instant_query(tenant, rule.expr.clone(), t, QueryOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    match value {
        QueryValue::Vector(samples) => Ok(samples.into_iter().map(|(l, s)| (l, s.v)).collect()),
        QueryValue::Scalar { v, .. } => Ok(vec![(Labels::empty(), v)]),
        _ => Err("rule result is not a vector or scalar".into()),
    }
}

/// Labels with `overrides` applied: set, or removed when empty (Prometheus's label builder).
fn with_labels(
    base: impl Iterator<Item = (String, String)>,
    overrides: impl Iterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = base.collect();
    for (name, value) in overrides {
        if value.is_empty() {
            labels.remove(&name);
        } else {
            labels.insert(name, value);
        }
    }
    labels.retain(|_, v| !v.is_empty());
    labels
}

fn to_labels(map: &BTreeMap<String, String>) -> Labels {
    Labels::from_trusted(
        map.iter()
            .map(|(k, v)| Label::new(k.as_str(), v.as_str()))
            .collect(),
    )
}

fn pairs(labels: &Labels) -> impl Iterator<Item = (String, String)> + '_ {
    labels.pairs().map(|(n, v)| (n.to_owned(), v.to_owned()))
}

/// `RecordingRule.Eval`: the result renamed and relabelled, one sample each at `t`.
async fn eval_recording(
    rule: &LoadedRule,
    engine: &Engine,
    group: &Group,
    t: i64,
) -> Result<Vec<SeriesWrite>, String> {
    let vector = query(engine, &group.tenant, rule, t).await?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(vector.len());
    for (labels, v) in vector {
        let map = with_labels(
            pairs(&labels).chain([("__name__".to_owned(), rule.rule.record.clone())]),
            rule.rule.labels.clone().into_iter(),
        );
        let labels = to_labels(&map);
        if !seen.insert(labels.fingerprint()) {
            return Err(
                "vector contains metrics with the same labelset after applying rule labels".into(),
            );
        }
        out.push(SeriesWrite {
            labels,
            samples: vec![Sample { t, v }],
        });
    }
    if group.limit > 0 && out.len() as i64 > group.limit {
        return Err(format!(
            "exceeded limit of {} with {} series",
            group.limit,
            out.len()
        ));
    }
    Ok(out)
}

/// `AlertingRule.Eval`: the state machine, and the ALERTS and ALERTS_FOR_STATE samples of the
/// pending and firing alerts.
async fn eval_alerting(
    rule: &LoadedRule,
    engine: &Engine,
    group: &Group,
    t: i64,
    restored: bool,
) -> Result<Vec<SeriesWrite>, String> {
    let vector = query(engine, &group.tenant, rule, t).await?;
    let name = rule.rule.alert.as_str();
    let context = template::QueryContext {
        engine: engine.clone(),
        tenant: group.tenant.clone(),
        t,
    };
    // Templates run synchronously, their `query` calls at this evaluation's time.
    let current = template::with_query(context, || alerts_of(rule, group, name, vector, t))?;
    let hold = rule.rule.r#for;
    let keep_firing_for = rule.rule.keep_firing_for;
    let mut status = lock(&rule.status);
    let present: std::collections::HashSet<u128> = current.keys().copied().collect();
    for (fp, alert) in current {
        match status.active.get_mut(&fp) {
            Some(known) if known.state != AlertState::Inactive => {
                known.value = alert.value;
                known.annotations = alert.annotations;
            }
            _ => {
                status.active.insert(fp, alert);
            }
        }
    }
    let mut out = Vec::new();
    let mut pending_or_firing = 0i64;
    let mut remove = Vec::new();
    for (fp, alert) in status.active.iter_mut() {
        if !present.contains(fp) {
            let mut keep_firing = false;
            if alert.state == AlertState::Firing && keep_firing_for > 0 {
                let since = *alert.keep_firing_since.get_or_insert(t);
                keep_firing = t - since < keep_firing_for;
            }
            if alert.state == AlertState::Pending
                || alert
                    .resolved_at
                    .is_some_and(|r| t - r > RESOLVED_RETENTION_MS)
            {
                remove.push(*fp);
            }
            if alert.state != AlertState::Inactive && !keep_firing {
                alert.state = AlertState::Inactive;
                alert.resolved_at = Some(t);
            }
            if !keep_firing {
                continue;
            }
        } else {
            alert.keep_firing_since = None;
        }
        pending_or_firing += 1;
        if alert.state == AlertState::Pending && t - alert.active_at >= hold {
            alert.state = AlertState::Firing;
            alert.fired_at = Some(t);
        }
        if restored {
            out.extend(alert_series(rule, alert, t));
        }
    }
    for fp in remove {
        status.active.remove(&fp);
    }
    if group.limit > 0 && pending_or_firing > group.limit {
        status.active.clear();
        return Err(format!(
            "exceeded limit of {} with {pending_or_firing} alerts",
            group.limit
        ));
    }
    Ok(out)
}

/// The alerts of one evaluation's result: labels and annotations expanded, as new pending
/// alerts.
fn alerts_of(
    rule: &LoadedRule,
    group: &Group,
    name: &str,
    vector: Vec<(Labels, f64)>,
    t: i64,
) -> Result<HashMap<u128, Alert>, String> {
    let mut current: HashMap<u128, Alert> = HashMap::new();
    for (series, value) in vector {
        let series_map: BTreeMap<String, String> = pairs(&series).collect();
        let data = template::data(&template::AlertData {
            labels: &series_map,
            external_labels: &group.external_labels,
            external_url: &group.external_url,
            value,
        });
        let expanded = rule
            .label_templates
            .iter()
            .map(|(k, t)| (k.clone(), t.expand(&data)));
        let mut labels = with_labels(pairs(&series).filter(|(n, _)| n != "__name__"), expanded);
        labels.insert("alertname".into(), name.to_owned());
        let annotations = rule
            .annotation_templates
            .iter()
            .map(|(k, t)| (k.clone(), t.expand(&data)))
            .collect();
        let fingerprint = to_labels(&labels).fingerprint();
        if current.contains_key(&fingerprint) {
            return Err(
                "vector contains metrics with the same labelset after applying alert labels".into(),
            );
        }
        current.insert(
            fingerprint,
            Alert {
                state: AlertState::Pending,
                labels,
                annotations,
                value,
                active_at: t,
                fired_at: None,
                resolved_at: None,
                keep_firing_since: None,
                last_sent_at: None,
                valid_until: None,
            },
        );
    }
    Ok(current)
}

/// `ALERTS` (1) and `ALERTS_FOR_STATE` (when it became active, in seconds) of `alert`: the
/// rule's labels as written (templates unexpanded), then the alert's.
fn alert_series(rule: &LoadedRule, alert: &Alert, t: i64) -> [SeriesWrite; 2] {
    let base = |metric: &str, state: Option<&str>| {
        let mut map = with_labels(
            rule.rule.labels.clone().into_iter(),
            alert.labels.clone().into_iter(),
        );
        map.insert("__name__".into(), metric.to_owned());
        map.insert("alertname".into(), rule.rule.alert.clone());
        if let Some(state) = state {
            map.insert("alertstate".into(), state.to_owned());
        }
        to_labels(&map)
    };
    [
        SeriesWrite {
            labels: base("ALERTS", Some(alert.state.as_str())),
            samples: vec![Sample { t, v: 1.0 }],
        },
        SeriesWrite {
            labels: base("ALERTS_FOR_STATE", None),
            samples: vec![Sample {
                t,
                v: alert.active_at.div_euclid(1000) as f64,
            }],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_evaluated_at_prometheus_s_times() {
        // Prometheus 2.42 evaluated the group "alerts" of "rules.yml" every 10 s at
        // ...x1.188674269 s.
        let group = Group {
            file: "rules.yml".into(),
            name: "alerts".into(),
            interval_ms: 10_000,
            limit: 0,
            tenant: TenantId::default(),
            rules: Vec::new(),
            status: Mutex::default(),
            notifier: Arc::new(
                notify::Notifier::new(&[], std::time::Duration::from_secs(1), "", Arc::default())
                    .unwrap(),
            ),
            resend_delay_ms: 60_000,
            external_url: String::new(),
            external_labels: Arc::default(),
            metrics: Arc::default(),
            outage_tolerance_ms: 3_600_000,
            grace_period_ms: 600_000,
            restored: std::sync::atomic::AtomicBool::new(true),
            stop: tokio::sync::watch::channel(Stop::Running).0,
            from_api: false,
            stale: Mutex::default(),
        };
        assert_eq!(group.hash() % 10_000_000_000, 1_188_674_269);
        let now = 1_796_512_805_000_000_000i128;
        assert_eq!(group.eval_timestamp_ns(now), 1_796_512_801_188_674_269);
    }
}
