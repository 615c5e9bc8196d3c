//! The live hub: samples as they are ingested, coalesced per agent and pushed to WebSocket
//! clients (`/ws/metrics/{agent}`), and registry changes pushed to fleet pages
//! (`/ws/agents`). Ingest never waits for a client: it records the latest sample of each
//! watched series in the agent's slots (a lock held for at most 256 series), and a ticker sends each agent's
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
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Longest the server's stop waits for its live-feed clients to be sent their close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Most series recorded under one hold of an agent's pending lock.
const PUBLISH_LOCK_RUN: usize = 256;

/// Most distinct series kept for one watched agent unless told otherwise
/// (`--fleet-live-max-series`); readings of more are dropped (and counted) until no one
/// watches it.
pub const MAX_PENDING_SERIES: usize = 10_000;

/// The latest reading of one series.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reading {
    /// Shared with the hub's record of the series: a message copies no name.
    pub name: Arc<str>,
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
    /// By series key (`name{label="value",…}`), each series once, in the order the readings
    /// arrived (a JSON object's members have no order).
    pub readings: Vec<(Arc<str>, Reading)>,
    /// The readings' distinct metric names, made for the first client with a filter: a
    /// filter is checked once per name, not once per reading.
    names: OnceLock<Vec<Arc<str>>>,
    /// The unfiltered message, made once and shared (not copied, nor checked again as UTF-8)
    /// by every client that wants all of it.
    whole: OnceLock<Utf8Bytes>,
}

/// A sample value as JSON: a number, or `"NaN"`, `"+Inf"`, `"-Inf"`.
pub fn value_json(v: f64) -> serde_json::Value {
    serde_json::to_value(JsonValue(v)).expect("a number or a string")
}

/// A sample value as the feed and the metrics API write it (see [`value_json`]).
struct JsonValue(f64);

impl serde::Serialize for JsonValue {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.is_finite() {
            serializer.serialize_f64(v)
        } else if v.is_nan() {
            serializer.serialize_str("NaN")
        } else if v > 0.0 {
            serializer.serialize_str("+Inf")
        } else {
            serializer.serialize_str("-Inf")
        }
    }
}

/// `{"type":"metrics","agent_id":…,"timestamp":…,"data":{key:{"value":…,"timestamp":…}}}`,
/// written straight into the message's bytes.
#[derive(serde::Serialize)]
struct Envelope<'a> {
    r#type: &'static str,
    agent_id: &'a str,
    timestamp: i64,
    data: Data<'a>,
}

/// The readings of a snapshot (those of the `wanted` names, when given) as a JSON object.
struct Data<'a> {
    readings: &'a [(Arc<str>, Reading)],
    wanted: Option<&'a std::collections::HashSet<&'a str>>,
}

impl serde::Serialize for Data<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Point {
            value: JsonValue,
            timestamp: i64,
        }
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        for (key, reading) in self.readings {
            if self.wanted.is_none_or(|w| w.contains(&*reading.name)) {
                let point = Point {
                    value: JsonValue(reading.value),
                    timestamp: reading.t,
                };
                map.serialize_entry(&**key, &point)?;
            }
        }
        map.end()
    }
}

impl Snapshot {
    pub fn new(agent_id: String, timestamp: i64, readings: Vec<(Arc<str>, Reading)>) -> Snapshot {
        Snapshot {
            agent_id,
            timestamp,
            readings,
            names: OnceLock::new(),
            whole: OnceLock::new(),
        }
    }

    fn names(&self) -> &[Arc<str>] {
        self.names.get_or_init(|| {
            let mut names: Vec<Arc<str>> =
                self.readings.iter().map(|(_, r)| r.name.clone()).collect();
            names.sort_unstable();
            names.dedup();
            names
        })
    }

    /// The envelope `{"type":"metrics","agent_id","timestamp","data":{key:{"value","timestamp"}}}`
    /// with the readings whose metric name `filter` matches (all without one); `None` when none
    /// does.
    pub fn to_json(&self, filter: Option<&regex::Regex>) -> Option<Utf8Bytes> {
        let Some(filter) = filter else {
            return Some(self.whole.get_or_init(|| self.render(None)).clone());
        };
        let wanted: std::collections::HashSet<&str> = self
            .names()
            .iter()
            .map(|name| &**name)
            .filter(|name| filter.is_match(name))
            .collect();
        (!wanted.is_empty()).then(|| self.render(Some(&wanted)))
    }

    /// The envelope with every reading, or those of the `wanted` names.
    fn render(&self, wanted: Option<&std::collections::HashSet<&str>>) -> Utf8Bytes {
        let envelope = Envelope {
            r#type: "metrics",
            agent_id: &self.agent_id,
            timestamp: self.timestamp,
            data: Data {
                readings: &self.readings,
                wanted,
            },
        };
        // About 100 bytes a reading.
        let mut json = Vec::with_capacity(128 + self.readings.len() * 100);
        serde_json::to_writer(&mut json, &envelope).expect("a message serialises");
        String::from_utf8(json)
            .expect("serde_json writes UTF-8")
            .into()
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

/// The series of a watched agent, each with its key and name (made once per series while the
/// agent is watched, not once per sample) and its latest reading since the last message.
#[derive(Default)]
struct Pending {
    /// Each series' place in `series`, by fingerprint.
    slots: HashMap<u128, u32>,
    series: Vec<Watched>,
    /// The places of the series with a reading since the last message, in the order their
    /// first reading arrived.
    fresh: Vec<u32>,
}

struct Watched {
    key: Arc<str>,
    name: Arc<str>,
    latest: Option<(f64, i64)>,
}

impl Pending {
    /// Records `(v, t)` as the series' latest reading unless a later one is there; false when
    /// the series is new and `max_series` are kept already.
    fn record(
        &mut self,
        series: &crate::storage::SeriesRef<'_>,
        v: f64,
        t: i64,
        max_series: usize,
    ) -> bool {
        let slot = match self.slots.get(&series.fingerprint) {
            Some(&slot) => slot,
            None => {
                if self.series.len() >= max_series {
                    return false;
                }
                let name = series.labels.metric_name().unwrap_or_default();
                let slot = self.series.len() as u32;
                self.series.push(Watched {
                    key: series_key(name, &series.labels).into(),
                    name: name.into(),
                    latest: None,
                });
                self.slots.insert(series.fingerprint, slot);
                slot
            }
        };
        let watched = &mut self.series[slot as usize];
        match watched.latest {
            None => self.fresh.push(slot),
            Some((_, latest)) if latest > t => return true,
            Some(_) => {}
        }
        watched.latest = Some((v, t));
        true
    }

    /// The readings since the last message, taken.
    fn take(&mut self) -> Vec<(Arc<str>, Reading)> {
        let series = &mut self.series;
        self.fresh
            .drain(..)
            .filter_map(|slot| {
                let watched = &mut series[slot as usize];
                let (value, t) = watched.latest.take()?;
                let reading = Reading {
                    name: watched.name.clone(),
                    value,
                    t,
                };
                Some((watched.key.clone(), reading))
            })
            .collect()
    }
}

/// What this node tells the other nodes (over NATS), queued without waiting.
#[derive(Debug)]
pub enum Outbound {
    Readings(TenantId, Arc<Snapshot>),
    Event(Arc<AgentEvent>),
}

/// Most messages queued for NATS; more are dropped (and counted) rather than waited for.
const OUTBOUND_QUEUE: usize = 4096;

/// The live feed's own threads (`--fleet-live-threads`): the ticker and every client's socket
/// run there, not on the workers that serve ingest and queries. They stop when the hub is
/// dropped.
struct FeedThreads {
    handle: tokio::runtime::Handle,
    /// Dropped with the hub: the runtime then shuts down on its own thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FeedThreads {
    /// Thread names (at most 15 bytes, as Linux keeps them): the workers, and the thread that
    /// holds their runtime.
    const WORKER: &'static str = "secumon-live";
    const HOLDER: &'static str = "secumon-live-rt";

    fn start(threads: u16) -> std::io::Result<FeedThreads> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (started, handle) = std::sync::mpsc::channel();
        // The runtime is made, run and dropped on the holder thread alone: a runtime may not
        // be dropped on an async task's thread, as a failed start would otherwise do.
        std::thread::Builder::new()
            .name(Self::HOLDER.into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(usize::from(threads.max(1)))
                    .thread_name(Self::WORKER)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                let _ = started.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        let handle = handle.recv().map_err(|_| {
            std::io::Error::other("the live feed's runtime thread ended before it started")
        })??;
        Ok(FeedThreads {
            handle,
            _stop: stop,
        })
    }
}

pub struct LiveHub {
    interval: Duration,
    /// Where the feed runs; the caller's runtime without them (unit tests).
    threads: Option<FeedThreads>,
    queue: usize,
    max_clients: usize,
    clients: AtomicUsize,
    /// Agents watched, in every tenant (ingest's fast path reads this alone).
    watched: AtomicUsize,
    /// Watched agents by tenant and `agent_id`.
    topics: RwLock<HashMap<TenantId, HashMap<String, Arc<Topic>>>>,
    /// Registry changes by tenant, while someone watches.
    registries: Mutex<HashMap<TenantId, broadcast::Sender<Arc<AgentEvent>>>>,
    /// Most series kept per watched agent.
    max_series: usize,
    /// Readings left out past `max_series` (`secumon_live_dropped_readings_total`).
    dropped_readings: prometheus_client::metrics::counter::Counter,
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
            threads: None,
            queue: queue.max(1),
            max_clients,
            clients: AtomicUsize::new(0),
            watched: AtomicUsize::new(0),
            topics: RwLock::default(),
            registries: Mutex::default(),
            max_series: MAX_PENDING_SERIES,
            dropped_readings: Default::default(),
            closing: tokio::sync::watch::channel(false).0,
            outbound: OnceLock::new(),
            outbound_dropped: AtomicUsize::new(0),
        }
    }

    /// Keeps at most `max_series` series per watched agent (at least 1), counting readings left
    /// out in `dropped`.
    pub fn with_max_series(
        mut self,
        max_series: usize,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> LiveHub {
        self.max_series = max_series.max(1);
        self.dropped_readings = dropped;
        self
    }

    /// Runs the feed (the ticker and the clients' sockets) on `threads` threads of its own.
    pub fn on_threads(mut self, threads: u16) -> std::io::Result<LiveHub> {
        self.threads = Some(FeedThreads::start(threads)?);
        Ok(self)
    }

    /// Runs `task` where the feed runs: on its own threads when it has them.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.threads {
            Some(threads) => threads.handle.spawn(task),
            None => tokio::spawn(task),
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
        // A batch usually holds one agent's series: its topic is looked up (and its lock taken)
        // once per run of series with the same `instance`, not once per series.
        let mut instance: Option<&str> = None;
        let mut pending = None;
        for (i, series) in batch.iter().enumerate() {
            let Some(this) = series.labels.get("instance") else {
                continue;
            };
            // The lock is let go now and then, so the ticker never waits for a whole batch
            // (the first batch of a newly watched agent makes up to 10,000 keys).
            if instance != Some(this) || i % PUBLISH_LOCK_RUN == 0 {
                drop(pending.take());
                instance = Some(this);
                pending = agents
                    .get(this)
                    .map(|topic| topic.pending.lock().expect("live pending lock"));
            }
            let (Some(pending), Some(last)) = (pending.as_mut(), series.samples.last()) else {
                continue;
            };
            if !pending.record(&series, last.v, last.t, self.max_series) {
                self.dropped_readings.inc();
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
            let readings = topic.pending.lock().expect("live pending lock").take();
            if readings.is_empty() {
                continue;
            }
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
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        self.closing.send_replace(true);
        // Every client's task now sends its close (1001) and ends. The server's stop waits
        // for them, a bounded time, so that clients see a close frame rather than a reset.
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        while self.clients() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
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
                Arc::from(r#"cpu{instance="a",mode="idle"}"#),
                Reading {
                    name: "cpu".into(),
                    value: 3.0,
                    t: 3
                }
            )]
        );
        let json: serde_json::Value =
            serde_json::from_str(snapshot.to_json(None).unwrap().as_str()).unwrap();
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
    fn an_older_sample_never_replaces_a_newer_one_and_the_series_are_capped() {
        let max = 100;
        let dropped = prometheus_client::metrics::counter::Counter::default();
        let hub = Arc::new(
            LiveHub::new(Duration::from_secs(2), 4, 10).with_max_series(max, dropped.clone()),
        );
        let tenant = TenantId::new("t");
        let mut subscription = hub.subscribe(&tenant, "a");
        hub.publish(&tenant, &batch("a", &[(5, 5.0)]));
        hub.publish(&tenant, &batch("a", &[(4, 4.0)]));
        hub.send_pending(10);
        let snapshot = subscription.receiver.try_recv().unwrap();
        assert_eq!(
            (snapshot.readings[0].1.t, snapshot.readings[0].1.value),
            (5, 5.0)
        );

        let many = WriteBatch::from_series(
            &(0..max + 3)
                .map(|i| SeriesWrite {
                    labels: Labels::from_trusted(vec![
                        Label::new("__name__", "cpu"),
                        Label::new("core", format!("{i:05}")),
                        Label::new("instance", "a"),
                    ]),
                    samples: vec![Sample { t: 20, v: i as f64 }],
                })
                .collect::<Vec<_>>(),
        );
        hub.publish(&tenant, &many);
        // The series of the first message holds one of the places.
        assert_eq!(
            dropped.get(),
            4,
            "counted where the server's metric reads it"
        );
        hub.send_pending(30);
        let snapshot = subscription.receiver.try_recv().unwrap();
        assert_eq!(snapshot.readings.len(), max - 1);
        // In the order the readings arrived.
        assert_eq!(
            &*snapshot.readings[0].0,
            r#"cpu{core="00000",instance="a"}"#
        );
        assert_eq!(
            &*snapshot.readings[1].0,
            r#"cpu{core="00001",instance="a"}"#
        );
    }

    #[test]
    fn messages_are_written_as_the_api_documents_them() {
        let reading = |name: &str, value: f64| Reading {
            name: name.into(),
            value,
            t: 7,
        };
        let snapshot = Snapshot::new(
            "a\"b".into(),
            9,
            vec![
                (r#"z{q="\""}"#.into(), reading("z", f64::NAN)),
                ("up{}".into(), reading("up", f64::INFINITY)),
                ("down{}".into(), reading("down", f64::NEG_INFINITY)),
                ("zero{}".into(), reading("zero", -0.0)),
                ("one{}".into(), reading("one", 1.0)),
            ],
        );
        assert_eq!(
            snapshot.to_json(None).unwrap().as_str(),
            r#"{"type":"metrics","agent_id":"a\"b","timestamp":9,"data":{"z{q=\"\\\"\"}":{"value":"NaN","timestamp":7},"up{}":{"value":"+Inf","timestamp":7},"down{}":{"value":"-Inf","timestamp":7},"zero{}":{"value":-0.0,"timestamp":7},"one{}":{"value":1.0,"timestamp":7}}}"#
        );
        let filter = regex::Regex::new("^(?:up|one)$").unwrap();
        assert_eq!(
            snapshot.to_json(Some(&filter)).unwrap().as_str(),
            r#"{"type":"metrics","agent_id":"a\"b","timestamp":9,"data":{"up{}":{"value":"+Inf","timestamp":7},"one{}":{"value":1.0,"timestamp":7}}}"#
        );
        assert_eq!(value_json(f64::NAN), serde_json::json!("NaN"));
        assert_eq!(value_json(2.5), serde_json::json!(2.5));
    }

    #[tokio::test]
    async fn the_feed_runs_on_its_own_threads_and_they_stop_with_the_hub() {
        let hub = LiveHub::new(Duration::from_secs(2), 4, 10)
            .on_threads(1)
            .unwrap();
        let name = hub
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some(FeedThreads::WORKER));
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        let pending = hub.spawn(async move {
            let _ = rx.await;
        });
        drop(hub);
        // The runtime shut down: its unfinished task is cancelled, not left running.
        let ended = tokio::time::timeout(Duration::from_secs(5), pending).await;
        assert!(ended
            .expect("the feed's runtime stops")
            .unwrap_err()
            .is_cancelled());
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
