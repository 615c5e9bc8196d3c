//! The OpAMP server (opentelemetry.io/docs/specs/opamp): each `AgentToServer` an agent sends
//! is answered with one `ServerToAgent`. The registry row of the agent (its `agent_id` is the
//! `instance_uid` as a UUID string) is created on first contact and kept up to date from the
//! agent's reports; the remote configuration an operator set is offered until the agent
//! reports its hash back.
//!
//! Status compression as the specification has it: an agent may leave out whatever did not
//! change, so the server asks for the full state (`ReportFullState`) whenever it may have
//! missed something: a `sequence_num` that is not one more than the last, or the first message
//! of an agent it has no description of.

use super::remote::{truncate, ConfigStatus, RemoteConfig};
use super::FleetConfig;
use crate::catalog::{AgentRecord, AgentUpdate, Catalog, CatalogError};
use crate::model::TenantId;
use secumon_proto::opamp::{
    self, any_value, AgentCapabilities, AgentToServerFlags, ServerCapabilities,
    ServerErrorResponseType, ServerToAgentFlags,
};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// What this server does: accepts status and effective configuration, offers remote
/// configuration.
pub const SERVER_CAPABILITIES: u64 = ServerCapabilities::AcceptsStatus as u64
    | ServerCapabilities::OffersRemoteConfig as u64
    | ServerCapabilities::AcceptsEffectiveConfig as u64;

/// Most description attributes kept per agent, most bytes they take as JSON, and the longest
/// attribute value kept, in bytes.
const MAX_ATTRIBUTES: usize = 128;
const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;
const MAX_ATTRIBUTE_BYTES: usize = 512;
/// Longest descriptive text (hostname, versions, …) kept, in bytes.
const MAX_TEXT_BYTES: usize = 256;
/// Deepest component nesting and most components of a health report kept.
const MAX_HEALTH_DEPTH: usize = 8;
const MAX_HEALTH_COMPONENTS: usize = 256;
/// How often a change is retried when an operator changed the agent at the same moment.
const UPDATE_ATTEMPTS: usize = 5;

/// One message from an agent, and who sent it.
pub struct Exchange<'a> {
    pub catalog: &'a dyn Catalog,
    pub fleet: &'a FleetConfig,
    pub tenant: &'a TenantId,
    /// The address the request came from (the agent's own unless it reports one).
    pub peer: Option<IpAddr>,
    pub now_ms: i64,
    /// The API token the message came with (`None` when authentication is off or a trusted
    /// proxy named the tenant).
    pub token_id: Option<&'a str>,
    /// Where registrations and changes are announced (`/ws/agents`).
    pub live: Option<&'a super::live::LiveHub>,
}

/// An answer that carries only an error.
pub fn error_answer(
    instance_uid: Vec<u8>,
    kind: ServerErrorResponseType,
    message: impl Into<String>,
) -> opamp::ServerToAgent {
    opamp::ServerToAgent {
        instance_uid,
        error_response: Some(opamp::ServerErrorResponse {
            r#type: kind as i32,
            error_message: message.into(),
            details: None,
        }),
        ..Default::default()
    }
}

impl Exchange<'_> {
    /// Processes `message` and makes the answer. A catalog that cannot be reached is the
    /// error (the transport answers 503, so the agent retries).
    pub async fn answer(
        &self,
        message: &opamp::AgentToServer,
    ) -> Result<opamp::ServerToAgent, CatalogError> {
        let uid = message.instance_uid.clone();
        let Ok(instance) = uuid::Uuid::from_slice(&message.instance_uid) else {
            return Ok(error_answer(
                uid,
                ServerErrorResponseType::BadRequest,
                format!(
                    "instance_uid must be 16 bytes, not {}",
                    message.instance_uid.len()
                ),
            ));
        };
        let mut answer = opamp::ServerToAgent {
            instance_uid: uid,
            capabilities: SERVER_CAPABILITIES,
            ..Default::default()
        };
        let mut agent_id = instance.to_string();
        let mut known = self
            .catalog
            .agent_by_agent_id(self.tenant, &agent_id)
            .await?;
        if let Some(agent) = &known {
            if let Err(refusal) = self.may_speak_for(agent).await? {
                return Ok(error_answer(
                    answer.instance_uid,
                    ServerErrorResponseType::Unknown,
                    refusal,
                ));
            }
        }
        // A new identity when the agent asks for one, or when its uid is another running
        // agent's (a cloned machine): another host.name than the one that agent reported,
        // while that one is online.
        let requested = message.flags & AgentToServerFlags::RequestInstanceUid as u64 != 0;
        let duplicate = known.as_ref().is_some_and(|agent| {
            let reported = message
                .agent_description
                .as_ref()
                .and_then(|d| attribute_text(d, "host.name"))
                .map(|h| truncate(h, MAX_ATTRIBUTE_BYTES));
            let registered = serde_json::from_str::<serde_json::Value>(&agent.attributes)
                .ok()
                .and_then(|a| a.get("host.name")?.as_str().map(str::to_owned));
            matches!((reported, registered), (Some(r), Some(k)) if r != k)
                && self.fleet.online(agent, self.now_ms)
        });
        let mut renamed = None;
        if requested || duplicate {
            let new = uuid::Uuid::now_v7();
            answer.agent_identification = Some(opamp::AgentIdentification {
                new_instance_uid: new.as_bytes().to_vec(),
            });
            agent_id = new.to_string();
            if duplicate {
                tracing::warn!(tenant = %self.tenant, instance_uid = %instance, new_instance_uid = %new,
                    "two agents report the same instance_uid from different hosts; the newer one gets a new uid");
                known = None;
            } else if known.is_some() {
                // The old uid was the agent's temporary one: the row moves to the new uid.
                renamed = Some(agent_id.clone());
            }
        }
        // Asked for when a report may have been missed, or when the registry holds no
        // description of the agent (a new row, or one an operator replaced) and this message
        // brings none.
        let described = message.agent_description.is_some();
        let full_state_missing = match &known {
            Some(agent) => match agent.sequence_num {
                Some(last) => {
                    message.sequence_num as i64 != last.wrapping_add(1)
                        || (agent.attributes == "{}" && !described)
                }
                None => !described,
            },
            None => !described,
        };
        if full_state_missing {
            answer.flags |= ServerToAgentFlags::ReportFullState as u64;
        }
        let disconnect = message.agent_disconnect.is_some();
        let sequence = (!disconnect).then_some(message.sequence_num as i64);

        let agent = match known {
            Some(agent) => self.report(agent, message, sequence, renamed).await?,
            None => match self.register(agent_id, message, sequence).await? {
                Ok(agent) => agent,
                Err(refusal) => {
                    return Ok(error_answer(
                        answer.instance_uid,
                        ServerErrorResponseType::Unknown,
                        refusal,
                    ))
                }
            },
        };
        if !disconnect {
            answer.remote_config = offer(
                &agent,
                message.capabilities,
                message.remote_config_status.as_ref(),
            );
        }
        Ok(answer)
    }

    /// Registers an agent heard from for the first time (marked auto-registered), bound to
    /// the token it came with.
    async fn register(
        &self,
        agent_id: String,
        message: &opamp::AgentToServer,
        sequence: Option<i64>,
    ) -> Result<Result<AgentRecord, String>, CatalogError> {
        if let Err(full) = super::room_for_agent(self.catalog, self.tenant, self.fleet).await? {
            return Ok(Err(full));
        }
        let mut agent = AgentRecord::new(self.tenant, agent_id, self.now_ms);
        agent.auto_registered = true;
        agent.token_id = self.token_id.unwrap_or_default().to_owned();
        self.apply(&mut agent, message, sequence);
        match self.catalog.insert_agent(&agent).await {
            Ok(()) => {
                self.announce(super::live::AgentEventKind::Registered, &agent);
                Ok(Ok(agent))
            }
            // Registered meanwhile (the same agent's retry, or another server node): report.
            Err(CatalogError::Conflict) => {
                match self
                    .catalog
                    .agent_by_agent_id(self.tenant, &agent.agent_id)
                    .await?
                {
                    Some(known) => match self.may_speak_for(&known).await? {
                        Ok(()) => Ok(Ok(self.report(known, message, sequence, None).await?)),
                        Err(refusal) => Ok(Err(refusal)),
                    },
                    None => Err(CatalogError::Conflict),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Whether this message's token may speak for `agent`: the token the agent is bound to,
    /// or any while it is bound to none, or to a token that no longer exists (revoked or
    /// expired away: the agent's token was rotated). Authentication off binds nothing.
    async fn may_speak_for(&self, agent: &AgentRecord) -> Result<Result<(), String>, CatalogError> {
        let Some(token) = self.token_id else {
            return Ok(Ok(()));
        };
        if agent.token_id.is_empty() || agent.token_id == token {
            return Ok(Ok(()));
        }
        let tokens = self.catalog.list_tokens(Some(self.tenant)).await?;
        let now = self.now_ms;
        let bound_lives = tokens
            .iter()
            .any(|t| t.id == agent.token_id && t.expires_at.is_none_or(|at| at > now));
        Ok(if bound_lives {
            Err(format!(
                "instance_uid {} belongs to an agent bound to another API token; use that token, or revoke it to rebind",
                agent.agent_id
            ))
        } else {
            Ok(())
        })
    }

    /// Records a known agent's message: only `last_seen_at` and the sequence number when
    /// nothing else changed (no new revision), else the whole row, retried when an operator
    /// changed the agent at the same moment.
    async fn report(
        &self,
        mut agent: AgentRecord,
        message: &opamp::AgentToServer,
        sequence: Option<i64>,
        renamed: Option<String>,
    ) -> Result<AgentRecord, CatalogError> {
        for _ in 0..UPDATE_ATTEMPTS {
            // Most messages are polls that carry nothing new: no copy of the agent is made to
            // tell what changed.
            let poll = message.agent_description.is_none()
                && message.health.is_none()
                && message.effective_config.is_none()
                && message.remote_config_status.is_none()
                && renamed.is_none()
                && agent.capabilities == message.capabilities as i64
                && self.token_id.is_none_or(|t| t == agent.token_id);
            let before = (!poll).then(|| agent.clone());
            if let Some(agent_id) = &renamed {
                agent.agent_id = agent_id.clone();
            }
            if let Some(token) = self.token_id {
                agent.token_id = token.to_owned();
            }
            self.apply(&mut agent, message, sequence);
            let unchanged = before.is_none_or(|mut before| {
                before.last_seen_at = agent.last_seen_at;
                before.sequence_num = agent.sequence_num;
                before == agent
            });
            if unchanged {
                self.catalog
                    .touch_agent(self.tenant, &agent.id, self.now_ms, sequence)
                    .await?;
                return Ok(agent);
            }
            agent.updated_at = self.now_ms;
            match self.catalog.update_agent(&agent, true).await? {
                AgentUpdate::Updated(revision) => {
                    agent.revision = revision;
                    self.announce(super::live::AgentEventKind::Updated, &agent);
                    return Ok(agent);
                }
                AgentUpdate::Stale | AgentUpdate::Missing => {
                    let Some(fresh) = self.catalog.agent(self.tenant, &agent.id).await? else {
                        // Deleted by an operator meanwhile: the agent registers anew.
                        return Ok(agent);
                    };
                    agent = fresh;
                }
            }
        }
        Err(CatalogError::Unavailable(
            "the agent changed on every attempt to record its report".into(),
        ))
    }

    fn announce(&self, kind: super::live::AgentEventKind, agent: &AgentRecord) {
        if let Some(live) = self.live {
            live.agent_event(kind, agent);
        }
    }

    /// Writes what `message` reports into `agent`.
    fn apply(
        &self,
        agent: &mut AgentRecord,
        message: &opamp::AgentToServer,
        sequence: Option<i64>,
    ) {
        agent.last_seen_at = Some(self.now_ms);
        agent.sequence_num = sequence;
        agent.capabilities = message.capabilities as i64;
        if let Some(description) = &message.agent_description {
            describe(agent, description, self.peer);
        }
        if let Some(health) = &message.health {
            let mut components = 0;
            agent.health = health_json(health, 0, &mut components).to_string();
        }
        if let Some(config) = &message.effective_config {
            agent.effective_config = effective_config_json(config, self.fleet.max_config_bytes);
        }
        if let Some(status) = &message.remote_config_status {
            agent.remote_config_status = ConfigStatus::from_report(status).to_stored();
        }
    }
}

/// The remote configuration to offer `agent` (with these capabilities, having just reported
/// `reported`, or else what it reported before): the operator's, when the agent accepts
/// remote configuration and has not reported its hash back.
fn offer(
    agent: &AgentRecord,
    capabilities: u64,
    reported: Option<&opamp::RemoteConfigStatus>,
) -> Option<opamp::AgentRemoteConfig> {
    if capabilities & AgentCapabilities::AcceptsRemoteConfig as u64 == 0 {
        return None;
    }
    if agent.remote_config.is_empty() {
        return None;
    }
    // Every poll comes here: the stored text is hashed as it is, and read only to be offered.
    let hash = super::remote::hash_stored(&agent.remote_config);
    let reported = match reported {
        Some(status) => Some(status.last_remote_config_hash.clone()),
        None => ConfigStatus::from_stored(&agent.remote_config_status)
            .map(|s| s.config_hash)
            .map(|h| decode_hex(&h)),
    };
    if reported.as_deref() == Some(hash.as_slice()) {
        return None;
    }
    RemoteConfig::from_stored(&agent.remote_config).map(|config| config.to_offer())
}

fn decode_hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok())
        .collect()
}

/// The text of a string attribute of the description.
fn attribute_text<'a>(description: &'a opamp::AgentDescription, key: &str) -> Option<&'a str> {
    description
        .identifying_attributes
        .iter()
        .chain(&description.non_identifying_attributes)
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

/// An attribute value as JSON (nested values as arrays and objects), strings cut to
/// [`MAX_ATTRIBUTE_BYTES`].
fn value_json(value: Option<&opamp::AnyValue>, depth: usize) -> serde_json::Value {
    use serde_json::Value;
    let Some(value) = value.and_then(|v| v.value.as_ref()) else {
        return Value::Null;
    };
    match value {
        any_value::Value::StringValue(s) => Value::String(truncate(s, MAX_ATTRIBUTE_BYTES)),
        any_value::Value::BoolValue(b) => Value::Bool(*b),
        any_value::Value::IntValue(i) => Value::from(*i),
        any_value::Value::DoubleValue(d) => Value::from(*d),
        any_value::Value::BytesValue(b) => Value::String(super::remote::hex(&b[..b.len().min(64)])),
        _ if depth >= 2 => Value::Null,
        any_value::Value::ArrayValue(a) => Value::Array(
            a.values
                .iter()
                .take(16)
                .map(|v| value_json(Some(v), depth + 1))
                .collect(),
        ),
        any_value::Value::KvlistValue(l) => Value::Object(
            l.values
                .iter()
                .take(16)
                .map(|kv| {
                    (
                        truncate(&kv.key, 128),
                        value_json(kv.value.as_ref(), depth + 1),
                    )
                })
                .collect(),
        ),
    }
}

/// Sets the registry fields an OpAMP description gives (OpenTelemetry resource conventions:
/// `service.name` is the agent type, `service.version` its version, `host.name`, `os.type`,
/// `os.version` or `os.description`, `host.ip`), and keeps every attribute.
fn describe(agent: &mut AgentRecord, description: &opamp::AgentDescription, peer: Option<IpAddr>) {
    let text = |key| attribute_text(description, key).map(|s| truncate(s, MAX_TEXT_BYTES));
    let mut attributes = serde_json::Map::new();
    let mut bytes = 0;
    for kv in description
        .identifying_attributes
        .iter()
        .chain(&description.non_identifying_attributes)
        .take(MAX_ATTRIBUTES)
    {
        let value = value_json(kv.value.as_ref(), 0);
        bytes += kv.key.len().min(128) + value.to_string().len();
        if bytes > MAX_ATTRIBUTES_BYTES {
            break;
        }
        attributes.insert(truncate(&kv.key, 128), value);
    }
    agent.attributes = serde_json::Value::Object(attributes).to_string();
    if let Some(v) = text("service.name") {
        agent.agent_type = v;
    }
    if let Some(v) = text("service.version") {
        agent.agent_version = v;
    }
    if let Some(v) = text("host.name") {
        agent.hostname = v;
    }
    if let Some(v) = text("os.type") {
        agent.os = v;
    }
    if let Some(v) = text("os.version").or_else(|| text("os.description")) {
        agent.os_version = v;
    }
    if agent.name.is_empty() {
        agent.name = text("host.name")
            .or_else(|| text("service.name"))
            .unwrap_or_default();
    }
    // host.ip is a list in the conventions; a single string is taken too.
    let reported_ip = description
        .non_identifying_attributes
        .iter()
        .chain(&description.identifying_attributes)
        .find(|kv| kv.key == "host.ip")
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            any_value::Value::ArrayValue(a) => a.values.iter().find_map(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            }),
            _ => None,
        })
        .and_then(|s| s.parse::<IpAddr>().ok());
    if let Some(ip) = reported_ip.or(peer) {
        agent.ip_address = ip.to_string();
    }
}

/// A health report as JSON: `healthy`, `status`, `last_error`, `start_time` and
/// `status_time` (RFC 3339, absent when 0), and `components` by name, bounded in depth and
/// count.
fn health_json(
    health: &opamp::ComponentHealth,
    depth: usize,
    components: &mut usize,
) -> serde_json::Value {
    let time = |nanos: u64| {
        (nanos != 0)
            .then(|| chrono::DateTime::from_timestamp_nanos(nanos as i64))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    let mut json = serde_json::json!({
        "healthy": health.healthy,
        "status": truncate(&health.status, MAX_TEXT_BYTES),
        "last_error": truncate(&health.last_error, 1024),
        "start_time": time(health.start_time_unix_nano),
        "status_time": time(health.status_time_unix_nano),
    });
    if !health.component_health_map.is_empty() && depth < MAX_HEALTH_DEPTH {
        let mut map = serde_json::Map::new();
        let mut names: Vec<&String> = health.component_health_map.keys().collect();
        names.sort();
        for name in names {
            if *components >= MAX_HEALTH_COMPONENTS {
                break;
            }
            *components += 1;
            let child = &health.component_health_map[name];
            map.insert(
                truncate(name, MAX_TEXT_BYTES),
                health_json(child, depth + 1, components),
            );
        }
        json["components"] = serde_json::Value::Object(map);
    }
    json
}

/// An effective configuration as JSON (`{"config_map": {name: {"body", "content_type"}}}`,
/// bodies as text), or a note of its size when it is over `max_bytes`.
fn effective_config_json(config: &opamp::EffectiveConfig, max_bytes: usize) -> String {
    let files = config
        .config_map
        .as_ref()
        .map(|m| &m.config_map)
        .cloned()
        .unwrap_or_default();
    let bytes: usize = files.values().map(|f| f.body.len()).sum();
    if bytes > max_bytes || files.len() > super::remote::MAX_FILES {
        return serde_json::json!({"truncated": true, "files": files.len(), "bytes": bytes})
            .to_string();
    }
    let map: BTreeMap<String, serde_json::Value> = files
        .into_iter()
        .map(|(name, file)| {
            (
                truncate(&name, super::remote::MAX_NAME_BYTES),
                serde_json::json!({
                    "body": String::from_utf8_lossy(&file.body),
                    "content_type": truncate(&file.content_type, super::remote::MAX_NAME_BYTES),
                }),
            )
        })
        .collect();
    serde_json::json!({ "config_map": map }).to_string()
}

/// Agents connected over OpAMP's WebSocket transport, by tenant and `agent_id`: an operator's
/// new remote configuration is pushed to them at once (over HTTP, agents get it with their
/// next poll).
#[derive(Default)]
pub struct Sessions {
    next: std::sync::atomic::AtomicU64,
    by_agent: std::sync::Mutex<std::collections::HashMap<(TenantId, String), Vec<Poke>>>,
}

/// A session (by its number) and how to tell it its agent's configuration changed.
type Poke = (u64, tokio::sync::mpsc::Sender<()>);

/// A session's place in [`Sessions`]; dropping it removes it.
pub struct Registration {
    sessions: std::sync::Arc<Sessions>,
    key: (TenantId, String),
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut by_agent = self.sessions.by_agent.lock().expect("sessions lock");
        if let Some(list) = by_agent.get_mut(&self.key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                by_agent.remove(&self.key);
            }
        }
    }
}

impl Sessions {
    /// Registers a session of the tenant's agent `agent_id`; the receiver hears of changes to
    /// its remote configuration.
    pub fn register(
        self: &std::sync::Arc<Self>,
        tenant: &TenantId,
        agent_id: &str,
    ) -> (Registration, tokio::sync::mpsc::Receiver<()>) {
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = (tenant.clone(), agent_id.to_owned());
        self.by_agent
            .lock()
            .expect("sessions lock")
            .entry(key.clone())
            .or_default()
            .push((id, sender));
        (
            Registration {
                sessions: self.clone(),
                key,
                id,
            },
            receiver,
        )
    }

    /// Tells the sessions of the tenant's agent `agent_id` that its configuration changed (a
    /// session already told and not yet done is told once).
    pub fn poke(&self, tenant: &TenantId, agent_id: &str) {
        let by_agent = self.by_agent.lock().expect("sessions lock");
        if let Some(list) = by_agent.get(&(tenant.clone(), agent_id.to_owned())) {
            for (_, sender) in list {
                let _ = sender.try_send(());
            }
        }
    }
}

/// The answer that offers the tenant's agent `agent_id` its remote configuration now, when it
/// accepts one and has not reported having it; `None` otherwise.
pub async fn push_offer(
    catalog: &dyn Catalog,
    tenant: &TenantId,
    agent_id: &str,
) -> Result<Option<opamp::ServerToAgent>, CatalogError> {
    let Some(agent) = catalog.agent_by_agent_id(tenant, agent_id).await? else {
        return Ok(None);
    };
    let Ok(uid) = uuid::Uuid::parse_str(&agent.agent_id) else {
        return Ok(None);
    };
    let remote_config = offer(&agent, agent.capabilities as u64, None);
    Ok(remote_config.map(|remote_config| opamp::ServerToAgent {
        instance_uid: uid.as_bytes().to_vec(),
        capabilities: SERVER_CAPABILITIES,
        remote_config: Some(remote_config),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(json: &serde_json::Value) -> usize {
        json.get("components")
            .and_then(|c| c.as_object())
            .map_or(0, |m| 1 + m.values().map(depth).max().unwrap_or(0))
    }

    fn count(json: &serde_json::Value) -> usize {
        json.get("components")
            .and_then(|c| c.as_object())
            .map_or(0, |m| m.len() + m.values().map(count).sum::<usize>())
    }

    #[test]
    fn health_reports_are_bounded_in_depth_and_count() {
        let mut deep = opamp::ComponentHealth::default();
        for level in 0..60 {
            deep = opamp::ComponentHealth {
                healthy: level % 2 == 0,
                component_health_map: [("c".to_string(), deep)].into(),
                ..Default::default()
            };
        }
        let mut n = 0;
        assert_eq!(depth(&health_json(&deep, 0, &mut n)), MAX_HEALTH_DEPTH);
        let wide = opamp::ComponentHealth {
            component_health_map: (0..1000)
                .map(|i| (format!("c{i:04}"), opamp::ComponentHealth::default()))
                .collect(),
            status_time_unix_nano: 1_700_000_000_000_000_000,
            ..Default::default()
        };
        let mut n = 0;
        let json = health_json(&wide, 0, &mut n);
        assert_eq!(count(&json), MAX_HEALTH_COMPONENTS);
        assert_eq!(json["status_time"], "2023-11-14T22:13:20.000Z");
        assert!(
            json["components"].get("c0000").is_some(),
            "kept in name order"
        );
    }

    #[test]
    fn a_description_sets_the_registry_fields() {
        let kv = |k: &str, v: any_value::Value| opamp::KeyValue {
            key: k.into(),
            value: Some(opamp::AnyValue { value: Some(v) }),
        };
        let s = |t: &str| any_value::Value::StringValue(t.into());
        let description = opamp::AgentDescription {
            identifying_attributes: vec![
                kv("service.name", s("io.opentelemetry.collector")),
                kv("service.version", s("0.99.0")),
            ],
            non_identifying_attributes: vec![
                kv("host.name", s("db-1")),
                kv("os.type", s("linux")),
                kv("os.version", s("6.1")),
                kv("os.description", s("Debian 12")),
                kv(
                    "host.ip",
                    any_value::Value::ArrayValue(opamp::ArrayValue {
                        values: vec![opamp::AnyValue {
                            value: Some(s("10.1.2.3")),
                        }],
                    }),
                ),
                kv("long", s(&"é".repeat(1000))),
            ],
        };
        let mut agent = AgentRecord::new(&TenantId::new("t"), "", 0);
        agent.name = "chosen".into();
        describe(&mut agent, &description, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(
            (
                agent.name.as_str(),
                agent.hostname.as_str(),
                agent.agent_type.as_str(),
                agent.agent_version.as_str(),
                agent.os.as_str(),
                agent.os_version.as_str(),
                agent.ip_address.as_str()
            ),
            (
                "chosen",
                "db-1",
                "io.opentelemetry.collector",
                "0.99.0",
                "linux",
                "6.1",
                "10.1.2.3"
            )
        );
        let attributes: serde_json::Value = serde_json::from_str(&agent.attributes).unwrap();
        assert_eq!(attributes["host.ip"], serde_json::json!(["10.1.2.3"]));
        assert_eq!(
            attributes["long"].as_str().unwrap().len(),
            MAX_ATTRIBUTE_BYTES
        );
    }
}
