//! The live feed across server nodes, through NATS (`--nats-url`). Every node's clients see
//! samples ingested on any node, and registry changes made on any node.
//!
//! Three subjects, JSON messages, each carrying the sending node's id (a node ignores its own):
//! - `secumon.live.interest`: every `--live-interval`, the agents this node's clients watch. A
//!   node that hears of an agent keeps its readings and sends them out for three intervals
//!   (and a second) after the last announcement, so interest needs no unsubscribe and a node
//!   that dies stops costing anything.
//! - `secumon.live.readings`: one coalesced message of an agent's readings, as a local client
//!   would get it, sent by the node that ingested them.
//! - `secumon.agents.events`: registrations, updates and deletions made on the sending node
//!   (each node notices agents coming online or going offline itself).
//!
//! Ingest never waits for NATS: what goes out is queued ([`super::live::Outbound`]) and
//! dropped when the queue is full. NATS is infrastructure the nodes trust: what it carries is
//! not authenticated further.

use super::live::{AgentEvent, LiveHub, Outbound, Reading, Snapshot};
use crate::model::TenantId;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

const INTEREST: &str = "secumon.live.interest";
const READINGS: &str = "secumon.live.readings";
const EVENTS: &str = "secumon.agents.events";

#[derive(Serialize, Deserialize)]
struct Interest {
    node: String,
    watched: Vec<(TenantId, String)>,
}

#[derive(Serialize, Deserialize)]
struct Readings {
    node: String,
    tenant: TenantId,
    agent_id: String,
    timestamp: i64,
    readings: Vec<(std::sync::Arc<str>, Reading)>,
}

#[derive(Serialize, Deserialize)]
struct Event {
    node: String,
    event: AgentEvent,
}

/// Connects to the NATS server at `url`, failing after 10 s.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let connecting = async_nats::ConnectOptions::new()
        .name("secumon")
        .connect(url);
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "cannot connect to NATS at {url} (--nats-url): {e}"
        )),
        Err(_) => Err(anyhow::anyhow!(
            "cannot connect to NATS at {url} (--nats-url): no answer within 10 s"
        )),
    }
}

/// Carries the hub's interest, readings and registry changes to the other nodes, and theirs
/// to the hub, until `stop`.
pub async fn run(
    client: async_nats::Client,
    hub: Arc<LiveHub>,
    mut outbound: tokio::sync::mpsc::Receiver<Outbound>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    let node = uuid::Uuid::now_v7().to_string();
    let mut interest = client.subscribe(INTEREST).await?;
    let mut readings = client.subscribe(READINGS).await?;
    let mut events = client.subscribe(EVENTS).await?;
    let every = hub.interval().max(Duration::from_millis(100));
    let lasts_ms = every.as_millis() as i64 * 3 + 1000;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let publish = |subject: &'static str, payload: Vec<u8>| {
        let client = client.clone();
        async move {
            if let Err(e) = client.publish(subject, payload.into()).await {
                tracing::warn!(error = %e, subject, "cannot publish to NATS");
            }
        }
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let watched = hub.local_interest();
                if !watched.is_empty() {
                    let message = Interest { node: node.clone(), watched };
                    publish(INTEREST, serde_json::to_vec(&message)?).await;
                }
            }
            Some(out) = outbound.recv() => match out {
                Outbound::Readings(tenant, snapshot) => {
                    let message = Readings {
                        node: node.clone(),
                        tenant,
                        agent_id: snapshot.agent_id.clone(),
                        timestamp: snapshot.timestamp,
                        readings: snapshot.readings.clone(),
                    };
                    publish(READINGS, serde_json::to_vec(&message)?).await;
                }
                Outbound::Event(event) => {
                    let message = Event { node: node.clone(), event: (*event).clone() };
                    publish(EVENTS, serde_json::to_vec(&message)?).await;
                }
            },
            Some(message) = interest.next() => {
                if let Ok(heard) = serde_json::from_slice::<Interest>(&message.payload) {
                    if heard.node != node {
                        let until = chrono::Utc::now().timestamp_millis() + lasts_ms;
                        for (tenant, agent_id) in &heard.watched {
                            hub.watch_remotely(tenant, agent_id, until);
                        }
                    }
                }
            }
            Some(message) = readings.next() => {
                if let Ok(heard) = serde_json::from_slice::<Readings>(&message.payload) {
                    if heard.node != node {
                        hub.deliver(
                            &heard.tenant,
                            Snapshot::new(heard.agent_id, heard.timestamp, heard.readings),
                        );
                    }
                }
            }
            Some(message) = events.next() => {
                if let Ok(heard) = serde_json::from_slice::<Event>(&message.payload) {
                    if heard.node != node {
                        hub.deliver_event(heard.event);
                    }
                }
            }
            _ = &mut stopped => return Ok(()),
        }
    }
}
