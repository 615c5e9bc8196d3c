//! The OpAMP client (opentelemetry.io/docs/specs/opamp, plain-HTTP transport): the agent
//! registers with the server's `/v1/opamp` under its persisted instance uid, reports its
//! description, health and effective configuration, heartbeats, and applies the remote
//! configuration the server offers without a restart, reporting the result.
//!
//! A remote configuration is one TOML file (any name; `text/toml` or no content type) that
//! may set `interval`, `naming` and keys of `[collectors]`: what it sets replaces the local
//! file's values, what it leaves out keeps them. It is kept in the state directory and applied
//! again at the next start, so an agent restarted while the server is away keeps it. Anything
//! else in it (another key, a second file, a bad value) is refused with `FAILED` and the
//! reason, and the running configuration stays.

use crate::config::{CollectorsConfig, Config, Naming};
use crate::export::{backoff, read_limited, read_token, MAX_ANSWER_BYTES};
use crate::run::{Health, Settings};
use prost::Message;
use secumon_proto::opamp::{
    any_value, AgentCapabilities, AgentConfigFile, AgentConfigMap, AgentDescription,
    AgentDisconnect, AgentToServer, AnyValue, ComponentHealth, EffectiveConfig, KeyValue,
    RemoteConfigStatus, RemoteConfigStatuses, ServerErrorResponseType, ServerToAgent,
    ServerToAgentFlags,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Longest wait a server may ask for before the next exchange.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// The name the effective configuration is reported under.
const EFFECTIVE_CONFIG_NAME: &str = "agent.toml";

const CAPABILITIES: u64 = AgentCapabilities::ReportsStatus as u64
    | AgentCapabilities::AcceptsRemoteConfig as u64
    | AgentCapabilities::ReportsEffectiveConfig as u64
    | AgentCapabilities::ReportsHealth as u64
    | AgentCapabilities::ReportsRemoteConfig as u64
    | AgentCapabilities::ReportsHeartbeat as u64;

/// A remote configuration as kept in the state directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoredRemote {
    /// Hex of the server's `config_hash`.
    pub hash: String,
    pub body: String,
    /// `APPLIED` or `FAILED: <reason>`.
    pub status: String,
}

fn stored_path(state_dir: &Path) -> PathBuf {
    state_dir.join("remote-config.json")
}

pub fn load_stored(state_dir: &Path) -> Option<StoredRemote> {
    let text = std::fs::read_to_string(stored_path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

fn save_stored(state_dir: &Path, stored: &StoredRemote) -> std::io::Result<()> {
    let tmp = state_dir.join("remote-config.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(stored)?)?;
    std::fs::rename(tmp, stored_path(state_dir))
}

/// What the local configuration says, as a TOML table a remote configuration is laid over.
fn settings_table(settings: &Settings) -> toml::Table {
    let mut table = toml::Table::new();
    table.insert(
        "interval".into(),
        toml::Value::String(crate::config::format_duration(settings.interval)),
    );
    table.insert(
        "naming".into(),
        toml::Value::try_from(settings.naming).expect("an enum serialises"),
    );
    table.insert(
        "collectors".into(),
        toml::Value::try_from(&settings.collectors).expect("plain fields serialise"),
    );
    table
}

/// The settings `body` (a remote configuration) gives over `local`.
pub fn apply_remote(local: &Settings, body: &str) -> Result<Settings, String> {
    let remote: toml::Table = body
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    let mut merged = settings_table(local);
    for (key, value) in remote {
        match (key.as_str(), value) {
            ("interval" | "naming", value) => {
                merged.insert(key, value);
            }
            ("collectors", toml::Value::Table(keys)) => {
                let collectors = merged
                    .get_mut("collectors")
                    .and_then(toml::Value::as_table_mut)
                    .expect("built above");
                collectors.extend(keys);
            }
            (other, _) => {
                return Err(format!(
                    "{other:?} cannot be set remotely: only interval, naming and [collectors]"
                ));
            }
        }
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Remote {
        interval: String,
        naming: Naming,
        collectors: CollectorsConfig,
    }
    let remote: Remote = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    let interval = crate::config::parse_duration(&remote.interval)?;
    if interval < Duration::from_secs(1) {
        return Err(format!("interval {:?}: at least 1s", remote.interval));
    }
    remote.collectors.validate()?;
    Ok(Settings {
        interval,
        naming: remote.naming,
        collectors: remote.collectors,
    })
}

/// The effective configuration as the agent reports it.
pub fn effective_config_text(settings: &Settings) -> String {
    toml::to_string(&settings_table(settings)).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok())
        .collect()
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The OpAMP session's state.
pub struct Client {
    url: String,
    http: reqwest::Client,
    token_file: Option<PathBuf>,
    state_dir: PathBuf,
    heartbeat: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    /// Local settings (the file, environment and flags) a remote configuration is laid over.
    local: Settings,
    settings: watch::Sender<Settings>,
    identity: Arc<std::sync::RwLock<String>>,
    description: Vec<(&'static str, String)>,
    health: Arc<Health>,
    started: SystemTime,
    sequence: u64,
    full_state: bool,
    /// The health last delivered and since when it holds: a message carries health only when
    /// it changed (or with the full state), as the specification's compressed messages do, so a
    /// heartbeat is recorded by the server as a heartbeat, not as a change.
    health_sent: Option<(bool, String, String)>,
    /// The health at the last message built, and when it last changed.
    health_seen: Option<(bool, String, String)>,
    health_since: SystemTime,
    remote: Option<StoredRemote>,
}

impl Client {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        http: reqwest::Client,
        settings: watch::Sender<Settings>,
        identity: Arc<std::sync::RwLock<String>>,
        description: Vec<(&'static str, String)>,
        health: Arc<Health>,
        remote: Option<StoredRemote>,
    ) -> Client {
        Client {
            url: config.opamp.url.clone(),
            http,
            token_file: config.export.token_file.clone(),
            state_dir: config.state_dir.clone(),
            heartbeat: config.opamp.heartbeat,
            initial_backoff: config.export.initial_backoff,
            max_backoff: config.export.max_backoff,
            local: Settings::of(config),
            settings,
            identity,
            description,
            health,
            started: SystemTime::now(),
            sequence: 0,
            full_state: true,
            health_sent: None,
            health_seen: None,
            health_since: SystemTime::now(),
            remote,
        }
    }

    fn instance_uid(&self) -> Vec<u8> {
        let id = self
            .identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        uuid::Uuid::parse_str(&id)
            .map(|u| u.as_bytes().to_vec())
            .unwrap_or_default()
    }

    fn message(&mut self, disconnect: bool) -> AgentToServer {
        let report = self.health.report();
        if self
            .health_seen
            .as_ref()
            .is_some_and(|seen| *seen != report)
        {
            self.health_since = SystemTime::now();
        }
        self.health_seen = Some(report.clone());
        let changed = self.health_sent.as_ref() != Some(&report);
        let health = (self.full_state || changed).then(|| self.health_report(&report));
        let mut message = AgentToServer {
            instance_uid: self.instance_uid(),
            sequence_num: self.sequence,
            capabilities: CAPABILITIES,
            health,
            ..Default::default()
        };
        if disconnect {
            message.agent_disconnect = Some(AgentDisconnect {});
        }
        if self.full_state {
            let identifying = ["service.name", "service.version", "service.instance.id"];
            let (id, other): (Vec<_>, Vec<_>) = self
                .description
                .iter()
                .partition(|(k, _)| identifying.contains(k));
            message.agent_description = Some(AgentDescription {
                identifying_attributes: id.iter().map(|(k, v)| kv(k, v)).collect(),
                non_identifying_attributes: other.iter().map(|(k, v)| kv(k, v)).collect(),
            });
            let settings = self.settings.borrow().clone();
            message.effective_config = Some(EffectiveConfig {
                config_map: Some(AgentConfigMap {
                    config_map: [(
                        EFFECTIVE_CONFIG_NAME.to_owned(),
                        AgentConfigFile {
                            body: effective_config_text(&settings).into_bytes(),
                            content_type: "text/toml".into(),
                        },
                    )]
                    .into(),
                }),
            });
            message.remote_config_status = self.remote.as_ref().map(remote_status);
        }
        message
    }

    fn health_report(
        &self,
        (healthy, status, last_error): &(bool, String, String),
    ) -> ComponentHealth {
        ComponentHealth {
            healthy: *healthy,
            start_time_unix_nano: unix_nanos(self.started),
            status: status.clone(),
            last_error: last_error.clone(),
            status_time_unix_nano: unix_nanos(self.health_since),
            ..Default::default()
        }
    }

    /// One exchange; the wait before the next one.
    async fn exchange(&mut self, disconnect: bool) -> Result<Duration, Failure> {
        let message = self.message(disconnect);
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/x-protobuf")
            .body(message.encode_to_vec());
        if let Some(token) = read_token(self.token_file.as_ref()).map_err(Failure::from)? {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Failure::from(format!("no answer: {e}")))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if !status.is_success() {
            let text = read_limited(response, MAX_ANSWER_BYTES)
                .await
                .unwrap_or_default();
            let text: String = String::from_utf8_lossy(&text).chars().take(300).collect();
            return Err(Failure {
                reason: format!("HTTP {status}: {text}"),
                retry_after,
            });
        }
        let body = read_limited(response, MAX_ANSWER_BYTES)
            .await
            .map_err(Failure::from)?;
        let answer = ServerToAgent::decode(body.as_ref())
            .map_err(|e| Failure::from(format!("answer does not decode: {e}")))?;
        // Delivered: the next message is the next in sequence, and only what changed.
        self.sequence += 1;
        self.full_state = false;
        if let Some(h) = &message.health {
            self.health_sent = Some((h.healthy, h.status.clone(), h.last_error.clone()));
        }
        self.handle(answer)
    }

    fn handle(&mut self, answer: ServerToAgent) -> Result<Duration, Failure> {
        if let Some(error) = answer.error_response {
            self.full_state = true;
            let retry = error.details.map(|details| match details {
                secumon_proto::opamp::server_error_response::Details::RetryInfo(info) => {
                    Duration::from_nanos(info.retry_after_nanoseconds)
                }
            });
            if error.r#type == ServerErrorResponseType::Unavailable as i32 {
                return Err(Failure {
                    reason: format!("server unavailable: {}", error.error_message),
                    retry_after: retry,
                });
            }
            tracing::warn!(message = %error.error_message, "the OpAMP server refused a message");
        }
        let mut next = self.heartbeat;
        if let Some(ident) = answer.agent_identification {
            match uuid::Uuid::from_slice(&ident.new_instance_uid) {
                Ok(new) => {
                    tracing::warn!(new_instance_uid = %new, "the OpAMP server gave this agent a new instance uid");
                    if let Err(e) = crate::run::store_agent_id(&self.state_dir, &new.to_string()) {
                        tracing::error!("keeping the new instance uid: {e}");
                    }
                    *self.identity.write().unwrap_or_else(|p| p.into_inner()) = new.to_string();
                    self.full_state = true;
                    next = Duration::ZERO;
                }
                Err(_) => tracing::warn!(
                    "the OpAMP server offered an instance uid that is not 16 bytes; ignored"
                ),
            }
        }
        if answer.flags & ServerToAgentFlags::ReportFullState as u64 != 0 {
            self.full_state = true;
            next = Duration::ZERO;
        }
        if let Some(settings) = answer.connection_settings.and_then(|c| c.opamp) {
            if settings.heartbeat_interval_seconds > 0 {
                self.heartbeat = Duration::from_secs(settings.heartbeat_interval_seconds);
                next = next.min(self.heartbeat);
            }
        }
        if let Some(remote) = answer.remote_config {
            let hash = hex(&remote.config_hash);
            if self.remote.as_ref().map(|r| r.hash.as_str()) != Some(hash.as_str()) {
                self.apply_offer(hash, remote.config.unwrap_or_default());
                // Report the outcome (and the new effective configuration) at once.
                self.full_state = true;
                next = Duration::ZERO;
            }
        }
        Ok(next)
    }

    fn apply_offer(&mut self, hash: String, config: AgentConfigMap) {
        let result = match config.config_map.len() {
            0 => Ok((self.local.clone(), String::new())),
            1 => {
                let (name, file) = config.config_map.into_iter().next().expect("one file");
                match std::str::from_utf8(&file.body) {
                    Ok(body)
                        if matches!(
                            file.content_type.as_str(),
                            "" | "text/toml" | "application/toml"
                        ) =>
                    {
                        apply_remote(&self.local, body).map(|s| (s, body.to_owned()))
                    }
                    Ok(_) => Err(format!(
                        "file {name:?} is {:?}; a TOML file is expected",
                        file.content_type
                    )),
                    Err(_) => Err(format!("file {name:?} is not UTF-8 text")),
                }
            }
            n => Err(format!("{n} files offered; one TOML file is expected")),
        };
        let stored = match result {
            Ok((settings, body)) => {
                tracing::info!(interval = ?settings.interval, naming = ?settings.naming, "remote configuration applied");
                self.settings.send_replace(settings);
                StoredRemote {
                    hash,
                    body,
                    status: "APPLIED".into(),
                }
            }
            Err(reason) => {
                tracing::warn!(%reason, "remote configuration refused; the running one stays");
                let body = self
                    .remote
                    .as_ref()
                    .map(|r| r.body.clone())
                    .unwrap_or_default();
                StoredRemote {
                    hash,
                    body,
                    status: format!("FAILED: {reason}"),
                }
            }
        };
        if let Err(e) = save_stored(&self.state_dir, &stored) {
            tracing::error!("keeping the remote configuration: {e}");
        }
        self.remote = Some(stored);
    }

    /// Exchanges with the server until `stop` fires, then says goodbye (AgentDisconnect).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            let wait = match self.exchange(false).await {
                Ok(next) => {
                    if failures > 0 {
                        tracing::info!("OpAMP server reached again");
                    }
                    failures = 0;
                    next
                }
                Err(Failure {
                    reason,
                    retry_after,
                }) => {
                    self.full_state = true;
                    let wait = retry_after
                        .map(|after| after.min(MAX_RETRY_AFTER))
                        .unwrap_or_else(|| {
                            backoff(
                                failures,
                                self.initial_backoff,
                                self.max_backoff.max(self.heartbeat),
                            )
                        });
                    if failures == 0 {
                        tracing::warn!(%reason, ?wait, url = %self.url, "OpAMP exchange failed");
                    }
                    failures = failures.saturating_add(1);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.health.changed() => {}
                _ = stop.changed() => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.exchange(true)).await;
                    return;
                }
            }
        }
    }
}

/// An exchange that did not go through, and how long the server asked to wait.
struct Failure {
    reason: String,
    retry_after: Option<Duration>,
}

impl From<String> for Failure {
    fn from(reason: String) -> Failure {
        Failure {
            reason,
            retry_after: None,
        }
    }
}

fn remote_status(stored: &StoredRemote) -> RemoteConfigStatus {
    let (status, error_message) = match stored.status.strip_prefix("FAILED: ") {
        Some(reason) => (RemoteConfigStatuses::Failed, reason.to_owned()),
        None => (RemoteConfigStatuses::Applied, String::new()),
    };
    RemoteConfigStatus {
        last_remote_config_hash: unhex(&stored.hash),
        status: status as i32,
        error_message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Settings {
        Settings::of(&Config::default())
    }

    #[test]
    fn a_remote_configuration_replaces_only_what_it_sets() {
        let s = apply_remote(
            &local(),
            "interval = \"5s\"\n[collectors]\ntop_n = 3\ndisk = false\n",
        )
        .unwrap();
        assert_eq!(s.interval, Duration::from_secs(5));
        assert_eq!(s.naming, Naming::Otel);
        assert_eq!(s.collectors.top_n, 3);
        assert!(!s.collectors.disk && s.collectors.cpu);
        let s = apply_remote(&local(), "naming = \"node_exporter\"").unwrap();
        assert_eq!(s.naming, Naming::NodeExporter);
        assert_eq!(s.interval, Duration::from_secs(10));
        assert_eq!(apply_remote(&local(), "").unwrap(), local());
    }

    #[test]
    fn a_remote_configuration_that_cannot_work_is_refused_with_the_reason() {
        for (body, says) in [
            ("server = \"http://elsewhere\"", "cannot be set remotely"),
            ("interval = \"0s\"", "at least 1s"),
            ("interval = \"soon\"", "not a duration"),
            ("naming = \"graphite\"", "unknown variant"),
            ("[collectors]\ncpus = true", "unknown field"),
            (
                "[collectors]\ndisk_exclude_devices = \"(\"",
                "disk_exclude_devices",
            ),
            ("not toml", ""),
        ] {
            let error = apply_remote(&local(), body).unwrap_err();
            assert!(error.contains(says), "{body}: {error}");
        }
    }

    #[test]
    fn the_effective_configuration_reads_back_as_itself() {
        let mut s = local();
        s.interval = Duration::from_secs(90);
        s.collectors.top_n = 7;
        assert_eq!(
            apply_remote(&local(), &effective_config_text(&s)).unwrap(),
            s
        );
    }
}
