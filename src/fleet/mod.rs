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

/// Whether the tenant may register one more agent (`--fleet-max-agents-per-tenant`): `Err`
/// says why not.
pub async fn room_for_agent(
    catalog: &dyn Catalog,
    tenant: &TenantId,
    fleet: &FleetConfig,
) -> Result<Result<(), String>, CatalogError> {
    let held = catalog.count_agents(tenant).await?;
    let most = fleet.max_agents_per_tenant;
    Ok(if held >= most {
        Err(format!(
            "tenant {tenant} has {held} agents, the most it may register ({most}, --fleet-max-agents-per-tenant); delete some first"
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
    /// Most agents one tenant may have, pre-registered by operators or registered by their
    /// own first OpAMP message: past it, a registration is refused (409 over REST, an error
    /// answer over OpAMP). Bounds what clients can make the registry hold.
    #[arg(
        id = "fleet.max_agents_per_tenant",
        long = "fleet-max-agents-per-tenant",
        env = "SECUMON_FLEET_MAX_AGENTS_PER_TENANT",
        default_value_t = 100_000,
        value_parser = clap::value_parser!(i64).range(1..)
    )]
    pub max_agents_per_tenant: i64,
    /// Most series of one watched agent whose latest reading the live feed keeps (1 to
    /// 1,000,000): readings of further series are left out of its messages while it is
    /// watched (counted in `secumon_live_dropped_readings_total`). Bounds the feed's memory
    /// per watched agent, whatever its clients ingest.
    #[arg(
        id = "fleet.live_max_series",
        long = "fleet-live-max-series",
        env = "SECUMON_FLEET_LIVE_MAX_SERIES",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub live_max_series: u32,
    /// Removes an agent that registered itself over OpAMP once it has not been heard from for
    /// this long (a Prometheus duration such as `7d`; `0s`, the default: never): collectors
    /// that make a new `instance_uid` at every start leave a row per start. Agents an operator
    /// registered, gave tags or a remote configuration, and agents still online are never
    /// removed. Checked at each `--fleet-status-interval-secs` run (so
    /// never when that is 0); each removal is a `deleted` event on `/ws/agents`.
    #[arg(
        id = "fleet.forget_auto_registered_after",
        long = "fleet-forget-auto-registered-after",
        env = "SECUMON_FLEET_FORGET_AUTO_REGISTERED_AFTER",
        default_value = "0s",
        value_parser = parse_forget_after
    )]
    #[serde(deserialize_with = "deserialize_forget_after")]
    pub forget_auto_registered_after: std::time::Duration,
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

fn parse_forget_after(text: &str) -> Result<std::time::Duration, String> {
    crate::config::duration_within(text, 0, 10 * 365 * 86_400_000, "from 0s (never) to 10y")
}

fn deserialize_forget_after<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<std::time::Duration, D::Error> {
    crate::config::deserialize_duration(deserializer, parse_forget_after)
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
    /// Whether `agent` is online at `now_ms` (Unix ms): seen within `online_heartbeats` of its
    /// heartbeat, and not gone since with an OpAMP `AgentDisconnect` (which ends its sequence:
    /// an agent that said goodbye is offline at once, as OpAMP servers show it). The catalog's
    /// `online` filter and counts are the same test in SQL.
    pub fn online(&self, agent: &crate::catalog::agents::AgentRecord, now_ms: i64) -> bool {
        agent.sequence_num.is_some()
            && agent.last_seen_at.is_some_and(|seen| {
                now_ms - seen <= agent.heartbeat_secs.saturating_mul(self.online_heartbeats) * 1000
            })
    }
}
