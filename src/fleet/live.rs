//! The live hub: samples as they are ingested, coalesced per agent and pushed to WebSocket
//! clients (`/ws/metrics/{agent}`), and registry changes pushed to fleet pages
//! (`/ws/agents`). Ingest never waits for a client: it records the latest sample of each
//! watched series in the agent's pending map (a short lock), and a ticker sends each agent's
//! pending readings once per `--live-interval` over a bounded broadcast channel; a client that
//! falls behind loses messages, is told how many, and is closed.
//!
//! An agent's series are those whose `instance` label is its `agent_id`, as for the metrics
//! API. Nothing is kept for agents nobody watches: with no client, ingest pays one atomic load.

use crate::catalog::AgentRecord;
use crate::model::{LabelsRef, TenantId};
use crate::storage::WriteBatch;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use tokio::sync::broadcast;

/// Most distinct series kept for one watched agent; readings of more are dropped (and
/// counted) until no one watches it.
pub const MAX_PENDING_SERIES: usize = 10_000;

/// The latest reading of one series.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reading {
    pub name: String,
    pub value: f64,
    pub t: i64,
}

/// One coalesced message for an agent: the latest reading of each series that had one since
/// the previous message.
#[derive(Debug)]
pub struct Snapshot {
    pub agent_id: String,
    /// When it was made (Unix ms).
    pub timestamp: i64,
    /// By series key (`name{label="value",…}`), in key order.
    pub readings: Vec<(String, Reading)>,
    /// The readings' distinct metric names: a client's filter is checked once per name, not
    /// once per reading.
    names: Vec<String>,
    /// The unfiltered message, made once and shared (not copied) by every client that wants
    /// all of it.
    whole: OnceLock<bytes::Bytes>,
}

/// A sample value as JSON: a number, or `"NaN"`, `"+Inf"`, `"-Inf"`.
pub fn value_json(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else if v.is_nan() {
        serde_json::json!("NaN")
    } else if v > 0.0 {
        serde_json::json!("+Inf")
    } else {
        serde_json::json!("-Inf")
    }
}

impl Snapshot {
    pub fn new(agent_id: String, timestamp: i64, readings: Vec<(String, Reading)>) -> Snapshot {
        let mut names: Vec<String> = readings.iter().map(|(_, r)| r.name.clone()).collect();
        names.sort_unstable();
        names.dedup();
        Snapshot {
            agent_id,
            timestamp,
            readings,
            names,
            whole: OnceLock::new(),
        }
    }

    /// The envelope `{"type":"metrics","agent_id","timestamp","data":{key:{"value","timestamp"}}}`
    /// with the readings whose metric name `filter` matches (all without one); `None` when none
    /// does.
    /// (UTF-8 JSON text.)
    pub fn to_json(&self, filter: Option<&regex::Regex>) -> Option<bytes::Bytes> {
        let Some(filter) = filter else {
            return Some(self.whole.get_or_init(|| self.render(None).into()).clone());
        };
        let wanted: std::collections::HashSet<&str> = self
            .names
            .iter()
            .filter(|name| filter.is_match(name))
            .map(String::as_str)
            .collect();
        (!wanted.is_empty()).then(|| self.render(Some(&wanted)).into())
    }

    /// The envelope with every reading, or those of the `wanted` names.
    fn render(&self, wanted: Option<&std::collections::HashSet<&str>>) -> String {
        let data: serde_json::Map<String, serde_json::Value> = self
            .readings
            .iter()
            .filter(|(_, r)| wanted.is_none_or(|w| w.contains(r.name.as_str())))
            .map(|(key, r)| {
                (
                    key.clone(),
                    serde_json::json!({"value": value_json(r.value), "timestamp": r.t}),
                )
            })
            .collect();
        serde_json::json!({
            "type": "metrics",
            "agent_id": self.agent_id,
            "timestamp": self.timestamp,
            "data": data,
        })
        .to_string()
    }
}

/// A change in a tenant's registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentEventKind {
    Registered,
    Updated,
    Deleted,
    Online,
    Offline,
}

impl AgentEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentEventKind::Registered => "registered",
            AgentEventKind::Updated => "updated",
            AgentEventKind::Deleted => "deleted",
            AgentEventKind::Online => "online",
            AgentEventKind::Offline => "offline",
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AgentEvent {
    pub kind: AgentEventKind,
    pub agent: AgentRecord,
}

/// The agents watched in one tenant.
struct Topic {
    pending: Mutex<Pending>,
    sender: broadcast::Sender<Arc<Snapshot>>,
    /// Until when (Unix ms) a client on another server node watches this agent: its readings
    /// are then also sent to NATS.
    remote_until: std::sync::atomic::AtomicI64,
}

impl Topic {
    fn remotely_watched(&self, now_ms: i64) -> bool {
        self.remote_until.load(Ordering::Relaxed) > now_ms
    }
}

/// An agent's readings since the last message, by series fingerprint, and the series' keys
/// and names, made once per series while the agent is watched (not once per sample).
#[derive(Default)]
struct Pending {
    known: HashMap<u128, (Arc<str>, Arc<str>)>,
    readings: HashMap<u128, (f64, i64)>,
}

/// What this node tells the other nodes (over NATS), queued without waiting.
#[derive(Debug)]
pub enum Outbound {
    Readings(TenantId, Arc<Snapshot>),
    Event(Arc<AgentEvent>),
}

/// Most messages queued for NATS; more are dropped (and counted) rather than waited for.
const OUTBOUND_QUEUE: usize = 4096;

pub struct LiveHub {
    interval: Duration,
    queue: usize,
    max_clients: usize,
    clients: AtomicUsize,
    /// Agents watched, in every tenant (ingest's fast path reads this alone).
    watched: AtomicUsize,
    /// Watched agents by tenant and `agent_id`.
    topics: RwLock<HashMap<TenantId, HashMap<String, Arc<Topic>>>>,
    /// Registry changes by tenant, while someone watches.
    registries: Mutex<HashMap<TenantId, broadcast::Sender<Arc<AgentEvent>>>>,
    /// Readings left out past [`MAX_PENDING_SERIES`].
    pub dropped_readings: AtomicUsize,
    /// Set when the server stops: clients close with 1001.
    closing: tokio::sync::watch::Sender<bool>,
    /// To the NATS bridge, when there is one.
    outbound: OnceLock<tokio::sync::mpsc::Sender<Outbound>>,
    /// Messages for NATS dropped because the bridge was behind.
    pub outbound_dropped: AtomicUsize,
}

/// A connected client's place in the hub; leaving (drop) frees it.
pub struct Client {
    hub: Arc<LiveHub>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.hub.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's subscription to one agent's readings; dropping it stops the hub keeping them
/// once no one else watches that agent.
pub struct Subscription {
    hub: Arc<LiveHub>,
    tenant: TenantId,
    agent_id: String,
    pub receiver: broadcast::Receiver<Arc<Snapshot>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut topics = self.hub.topics.write().expect("live topics lock");
        let Some(agents) = topics.get_mut(&self.tenant) else {
            return;
        };
        // Under the write lock no one subscribes: 1 is this subscription's own receiver.
        let now = chrono::Utc::now().timestamp_millis();
        if agents
            .get(&self.agent_id)
            .is_some_and(|t| t.sender.receiver_count() <= 1 && !t.remotely_watched(now))
        {
            agents.remove(&self.agent_id);
            self.hub.watched.fetch_sub(1, Ordering::Relaxed);
            if agents.is_empty() {
                topics.remove(&self.tenant);
            }
        }
    }
}

/// `name{label="value", …}` without `__name__`, as Prometheus writes a series.
fn series_key(name: &str, labels: &LabelsRef<'_>) -> String {
    let mut key = String::with_capacity(64);
    key.push_str(name);
    key.push('{');
    let mut first = true;
    for (n, v) in labels.iter() {
        if n == crate::model::METRIC_NAME_LABEL {
            continue;
        }
        if !first {
            key.push(',');
        }
        first = false;
        key.push_str(n);
        key.push('=');
        key.push_str(&format!("{v:?}"));
    }
    key.push('}');
    key
}

impl LiveHub {
    pub fn new(interval: Duration, queue: usize, max_clients: usize) -> LiveHub {
        LiveHub {
            interval: interval.max(Duration::from_millis(10)),
            queue: queue.max(1),
            max_clients,
            clients: AtomicUsize::new(0),
            watched: AtomicUsize::new(0),
            topics: RwLock::default(),
            registries: Mutex::default(),
            dropped_readings: AtomicUsize::new(0),
            closing: tokio::sync::watch::channel(false).0,
            outbound: OnceLock::new(),
            outbound_dropped: AtomicUsize::new(0),
        }
    }

    /// Connects the hub to other server nodes: what it must tell them comes out of the
    /// returned queue (the NATS bridge drains it).
    pub fn bridge(&self) -> tokio::sync::mpsc::Receiver<Outbound> {
        let (sender, receiver) = tokio::sync::mpsc::channel(OUTBOUND_QUEUE);
        assert!(self.outbound.set(sender).is_ok(), "the hub has one bridge");
        receiver
    }

    fn send_out(&self, message: Outbound) {
        if let Some(outbound) = self.outbound.get() {
            if outbound.try_send(message).is_err() {
                self.outbound_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The agents clients of this node watch, to tell the other nodes.
    pub fn local_interest(&self) -> Vec<(TenantId, String)> {
        let topics = self.topics.read().expect("live topics lock");
        topics
            .iter()
            .flat_map(|(tenant, agents)| {
                agents
                    .iter()
                    .filter(|(_, t)| t.sender.receiver_count() > 0)
                    .map(|(id, _)| (tenant.clone(), id.clone()))
            })
            .collect()
    }

    /// Another node's clients watch the tenant's agent `agent_id` until `until_ms`: this node
    /// keeps its readings and sends them out until then.
    pub fn watch_remotely(&self, tenant: &TenantId, agent_id: &str, until_ms: i64) {
        let mut topics = self.topics.write().expect("live topics lock");
        let topic = topics
            .entry(tenant.clone())
            .or_default()
            .entry(agent_id.to_owned())
            .or_insert_with(|| {
                self.watched.fetch_add(1, Ordering::Relaxed);
                Arc::new(self.topic())
            });
        topic.remote_until.fetch_max(until_ms, Ordering::Relaxed);
    }

    /// Readings another node sent: to this node's clients of that agent, if any.
    pub fn deliver(&self, tenant: &TenantId, snapshot: Snapshot) {
        let topics = self.topics.read().expect("live topics lock");
        if let Some(topic) = topics.get(tenant).and_then(|a| a.get(&snapshot.agent_id)) {
            let _ = topic.sender.send(Arc::new(snapshot));
        }
    }

    /// A registry change another node made: to this node's watchers of the tenant.
    pub fn deliver_event(&self, event: AgentEvent) {
        self.event_here(Arc::new(event));
    }

    fn topic(&self) -> Topic {
        Topic {
            pending: Mutex::default(),
            sender: broadcast::channel(self.queue).0,
            remote_until: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Drops topics no client here or elsewhere watches any more.
    fn sweep(&self, now_ms: i64) {
        let mut topics = self.topics.write().expect("live topics lock");
        for agents in topics.values_mut() {
            agents.retain(|_, t| {
                let keep = t.sender.receiver_count() > 0 || t.remotely_watched(now_ms);
                if !keep {
                    self.watched.fetch_sub(1, Ordering::Relaxed);
                }
                keep
            });
        }
        topics.retain(|_, agents| !agents.is_empty());
    }

    /// Changes to `true` when the server stops.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// A place for one more client, unless `--fleet-live-max-clients` are connected.
    pub fn join(self: &Arc<Self>) -> Option<Client> {
        let joined = self
            .clients
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_clients).then_some(n + 1)
            })
            .is_ok();
        joined.then(|| Client { hub: self.clone() })
    }

    /// Watches the readings of the tenant's agent `agent_id`.
    pub fn subscribe(self: &Arc<Self>, tenant: &TenantId, agent_id: &str) -> Subscription {
        let mut topics = self.topics.write().expect("live topics lock");
        let agents = topics.entry(tenant.clone()).or_default();
        let topic = agents.entry(agent_id.to_owned()).or_insert_with(|| {
            self.watched.fetch_add(1, Ordering::Relaxed);
            Arc::new(self.topic())
        });
        Subscription {
            hub: self.clone(),
            tenant: tenant.clone(),
            agent_id: agent_id.to_owned(),
            receiver: topic.sender.subscribe(),
        }
    }

    /// Records the last sample of each series of `batch` (just stored for `tenant`) whose
    /// agent someone watches.
    pub fn publish(&self, tenant: &TenantId, batch: &WriteBatch) {
        if self.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        let topics = self.topics.read().expect("live topics lock");
        let Some(agents) = topics.get(tenant) else {
            return;
        };
        for series in batch.iter() {
            let Some(topic) = series.labels.get("instance").and_then(|i| agents.get(i)) else {
                continue;
            };
            let Some(last) = series.samples.last() else {
                continue;
            };
            let mut pending = topic.pending.lock().expect("live pending lock");
            if !pending.known.contains_key(&series.fingerprint) {
                if pending.known.len() >= MAX_PENDING_SERIES {
                    self.dropped_readings.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let name = series.labels.metric_name().unwrap_or_default();
                let key = series_key(name, &series.labels);
                pending
                    .known
                    .insert(series.fingerprint, (key.into(), name.into()));
            }
            match pending.readings.entry(series.fingerprint) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    if e.get().1 <= last.t {
                        e.insert((last.v, last.t));
                    }
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert((last.v, last.t));
                }
            }
        }
    }

    /// Sends every watched agent's pending readings (one message each), as the ticker does
    /// every interval.
    pub fn send_pending(&self, now_ms: i64) {
        let topics: Vec<(TenantId, String, Arc<Topic>)> = {
            let topics = self.topics.read().expect("live topics lock");
            topics
                .iter()
                .flat_map(|(tenant, agents)| {
                    agents
                        .iter()
                        .map(|(id, t)| (tenant.clone(), id.clone(), t.clone()))
                })
                .collect()
        };
        for (tenant, agent_id, topic) in topics {
            let mut readings: Vec<(String, Reading)> = {
                let mut pending = topic.pending.lock().expect("live pending lock");
                let taken = std::mem::take(&mut pending.readings);
                taken
                    .into_iter()
                    .filter_map(|(fingerprint, (value, t))| {
                        let (key, name) = pending.known.get(&fingerprint)?;
                        Some((
                            key.to_string(),
                            Reading {
                                name: name.to_string(),
                                value,
                                t,
                            },
                        ))
                    })
                    .collect()
            };
            if readings.is_empty() {
                continue;
            }
            readings.sort_by(|a, b| a.0.cmp(&b.0));
            let snapshot = Arc::new(Snapshot::new(agent_id, now_ms, readings));
            if topic.remotely_watched(now_ms) {
                self.send_out(Outbound::Readings(tenant, snapshot.clone()));
            }
            // No receiver here: the message goes nowhere, as it should.
            let _ = topic.sender.send(snapshot);
        }
        self.sweep(now_ms);
    }

    /// Sends pending readings every interval until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.send_pending(chrono::Utc::now().timestamp_millis()),
                _ = stop.wait_for(|stop| *stop) => {
                    self.closing.send_replace(true);
                    return;
                }
            }
        }
    }

    /// Watches the tenant's registry changes.
    pub fn watch_agents(&self, tenant: &TenantId) -> broadcast::Receiver<Arc<AgentEvent>> {
        self.registries
            .lock()
            .expect("live registries lock")
            .entry(tenant.clone())
            // Deeper than the metrics queue: a network blip turns many agents offline at once.
            .or_insert_with(|| broadcast::channel(self.queue.max(1024)).0)
            .subscribe()
    }

    /// Tells the tenant's registry watchers of a change, here and (for changes made here:
    /// registrations, updates, deletions) on the other nodes. Online and offline are noticed
    /// by every node itself.
    pub fn agent_event(&self, kind: AgentEventKind, agent: &AgentRecord) {
        let event = Arc::new(AgentEvent {
            kind,
            agent: agent.clone(),
        });
        if !matches!(kind, AgentEventKind::Online | AgentEventKind::Offline) {
            self.send_out(Outbound::Event(event.clone()));
        }
        self.event_here(event);
    }

    fn event_here(&self, event: Arc<AgentEvent>) {
        let mut registries = self.registries.lock().expect("live registries lock");
        let Some(sender) = registries.get(&event.agent.tenant) else {
            return;
        };
        if sender.receiver_count() == 0 {
            registries.remove(&event.agent.tenant);
            return;
        }
        let _ = sender.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Label, Labels, Sample};
    use crate::storage::SeriesWrite;

    fn batch(instance: &str, samples: &[(i64, f64)]) -> WriteBatch {
        WriteBatch::from_series(&[SeriesWrite {
            labels: Labels::from_trusted(vec![
                Label::new("__name__", "cpu"),
                Label::new("instance", instance),
                Label::new("mode", "idle"),
            ]),
            samples: samples.iter().map(|&(t, v)| Sample { t, v }).collect(),
        }])
    }

    #[tokio::test]
    async fn readings_are_coalesced_per_agent_and_only_for_watched_ones() {
        let hub = Arc::new(LiveHub::new(Duration::from_secs(2), 4, 10));
        let tenant = TenantId::new("t");
        hub.publish(&tenant, &batch("a", &[(1, 1.0)]));
        assert_eq!(hub.watched.load(Ordering::Relaxed), 0);
        let mut subscription = hub.subscribe(&tenant, "a");
        hub.publish(&tenant, &batch("a", &[(1, 1.0), (2, 2.0)]));
        hub.publish(&tenant, &batch("a", &[(3, 3.0)]));
        hub.publish(&tenant, &batch("b", &[(3, 9.0)]));
        hub.publish(&TenantId::new("other"), &batch("a", &[(4, 9.0)]));
        hub.send_pending(10);
        let snapshot = subscription.receiver.try_recv().unwrap();
        assert_eq!(
            snapshot.readings,
            [(
                r#"cpu{instance="a",mode="idle"}"#.to_string(),
                Reading {
                    name: "cpu".into(),
                    value: 3.0,
                    t: 3
                }
            )]
        );
        let json: serde_json::Value =
            serde_json::from_slice(&snapshot.to_json(None).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "metrics", "agent_id": "a", "timestamp": 10,
                "data": {"cpu{instance=\"a\",mode=\"idle\"}": {"value": 3.0, "timestamp": 3}}})
        );
        let other = regex::Regex::new("^(?:mem.*)$").unwrap();
        assert!(snapshot.to_json(Some(&other)).is_none());
        // Nothing new: nothing sent.
        hub.send_pending(20);
        assert!(subscription.receiver.try_recv().is_err());
        drop(subscription);
        assert_eq!(hub.watched.load(Ordering::Relaxed), 0);
        assert!(hub.topics.read().unwrap().is_empty());
    }

    #[test]
    fn clients_are_bounded() {
        let hub = Arc::new(LiveHub::new(Duration::from_secs(2), 4, 2));
        let a = hub.join().unwrap();
        let _b = hub.join().unwrap();
        assert!(hub.join().is_none());
        drop(a);
        assert!(hub.join().is_some());
    }
}
