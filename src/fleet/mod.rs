//! The fleet: agents that report to this server, as the registry (in the catalog) knows them,
//! and the OpAMP server they talk to.

pub mod live;
pub mod nats;
pub mod opamp;
pub mod remote;
pub mod status;

use crate::catalog::{Catalog, CatalogError};
use crate::model::TenantId;
use clap::Args;
use serde::Deserialize;

/// Most agents one tenant may have: bounds what clients (operators over REST, agents over
/// OpAMP) can make the registry hold.
pub const MAX_AGENTS_PER_TENANT: i64 = 100_000;

/// Whether the tenant may register one more agent: `Err` says why not.
pub async fn room_for_agent(
    catalog: &dyn Catalog,
    tenant: &TenantId,
) -> Result<Result<(), String>, CatalogError> {
    let held = catalog.count_agents(tenant).await?;
    Ok(if held >= MAX_AGENTS_PER_TENANT {
        Err(format!(
            "tenant {tenant} has {held} agents, the most it may register ({MAX_AGENTS_PER_TENANT}); delete some first"
        ))
    } else {
        Ok(())
    })
}

/// Settings of the fleet: when an agent counts as online, and the bounds of what agents send.
#[derive(Clone, Debug, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// An agent is online while seen within this many of its heartbeat intervals (1 to 1,000;
    /// an OpAMP agent's interval is the one it reports at, else 30 s).
    #[arg(
        id = "fleet.online_heartbeats",
        long = "fleet-online-heartbeats",
        env = "SECUMON_FLEET_ONLINE_HEARTBEATS",
        default_value_t = 3,
        value_parser = clap::value_parser!(i64).range(1..=1000)
    )]
    pub online_heartbeats: i64,
    /// Largest OpAMP message an agent may send, in bytes after decompression: 413 past it (the
    /// request body is also bounded by `--ingest-max-request-bytes`).
    #[arg(
        id = "fleet.opamp_max_message_bytes",
        long = "fleet-opamp-max-message-bytes",
        env = "SECUMON_FLEET_OPAMP_MAX_MESSAGE_BYTES",
        default_value_t = 4 * 1024 * 1024
    )]
    pub opamp_max_message_bytes: usize,
    /// Most bytes of file bodies in a remote configuration an operator sets (400 past it), and
    /// in an effective configuration an agent reports that is kept (a larger one is kept as a
    /// note of its size).
    #[arg(
        id = "fleet.max_config_bytes",
        long = "fleet-max-config-bytes",
        env = "SECUMON_FLEET_MAX_CONFIG_BYTES",
        default_value_t = 256 * 1024
    )]
    pub max_config_bytes: usize,
    /// Seconds between writes of `secumon_agent_up` and
    /// `secumon_agent_last_seen_timestamp_seconds` for every agent into its tenant (docs/fleet.md,
    /// "Fleet health as series"); 0: never.
    #[arg(
        id = "fleet.status_interval_secs",
        long = "fleet-status-interval-secs",
        env = "SECUMON_FLEET_STATUS_INTERVAL_SECS",
        default_value_t = 15
    )]
    pub status_interval_secs: u64,
    /// How often the live feed sends each watched agent's new readings (a Prometheus duration
    /// from `10ms` to `1h`): readings are coalesced to one message per interval.
    #[arg(
        id = "fleet.live_interval",
        long = "live-interval",
        env = "SECUMON_LIVE_INTERVAL",
        default_value = "2s",
        value_parser = parse_interval
    )]
    #[serde(deserialize_with = "deserialize_interval")]
    pub live_interval: std::time::Duration,
    /// Most live-feed WebSocket clients (`/ws/metrics/…`, `/ws/agents`) at once; each also
    /// holds one of `--http-max-connections`, so keep it below that. Past it, an upgrade is
    /// answered 503.
    #[arg(
        id = "fleet.live_max_clients",
        long = "fleet-live-max-clients",
        env = "SECUMON_FLEET_LIVE_MAX_CLIENTS",
        default_value_t = 256
    )]
    pub live_max_clients: usize,
    /// Messages queued for one live-feed client; a client further behind gets
    /// `{"type":"lagged","dropped":N}` and is closed (code 4429).
    #[arg(
        id = "fleet.live_queue",
        long = "fleet-live-queue",
        env = "SECUMON_FLEET_LIVE_QUEUE",
        default_value_t = 16
    )]
    pub live_queue: usize,
    /// Threads of the live feed's own (1 to 64): every client's socket is written there and
    /// the coalescing ticker runs there, so the fan-out to many clients takes no time from the
    /// threads that serve ingest and queries (a feed with more clients than these threads can
    /// serve drops the slowest clients, code 4429, rather than slowing ingest).
    #[arg(
        id = "fleet.live_threads",
        long = "fleet-live-threads",
        env = "SECUMON_FLEET_LIVE_THREADS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=64)
    )]
    pub live_threads: u16,
    /// A NATS server (`nats://host:4222`) through which several server nodes share the live
    /// feed and registry changes (docs/fleet.md, "Several server nodes"); empty: this node
    /// works alone. The server does not start when it cannot connect.
    #[arg(
        id = "fleet.nats_url",
        long = "nats-url",
        env = "SECUMON_NATS_URL",
        default_value = ""
    )]
    pub nats_url: String,
}

/// A live interval from 10 ms to an hour.
fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    crate::config::duration_within(text, 10, 3_600_000, "from 10ms to 1h")
}

fn deserialize_interval<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<std::time::Duration, D::Error> {
    crate::config::deserialize_duration(deserializer, parse_interval)
}

impl Default for FleetConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

impl FleetConfig {
    /// Whether an agent last seen at `last_seen_ms` (Unix ms) with this heartbeat is online at
    /// `now_ms`.
    pub fn online(&self, last_seen_ms: Option<i64>, heartbeat_secs: i64, now_ms: i64) -> bool {
        last_seen_ms.is_some_and(|seen| {
            now_ms - seen <= heartbeat_secs.saturating_mul(self.online_heartbeats) * 1000
        })
    }
}
