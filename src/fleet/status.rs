//! Fleet health as series: every `--fleet-status-interval-secs` the server writes, into each
//! agent's tenant, `secumon_agent_up` (1 while the agent is online, else 0) and
//! `secumon_agent_last_seen_timestamp_seconds` (once it was seen), so Grafana panels and
//! alerting rules use the fleet like any other metric.
//!
//! Labels: `job="secumon-fleet"`, `instance` and `agent_id` (the agent's own id, which is the
//! `service.instance.id`, so the `instance` its telemetry carries), and `hostname`, `name`,
//! `agent_type`, `agent_version`, `os`, `status` when not empty. Sample times are aligned to
//! the interval, so several server nodes writing the same fleet write the same samples.

use super::live::{AgentEventKind, LiveHub};
use super::FleetConfig;
use crate::catalog::{AgentRecord, Catalog, CatalogError};
use crate::ingest::{Batch, Ingester};
use crate::model::{Label, Labels, Sample, TenantId};
use crate::storage::{SeriesWrite, WriteBatch};
use std::collections::HashMap;

/// The protocol name the written samples are counted under in `/metrics`.
pub const PROTOCOL: &str = "fleet";
pub const JOB: &str = "secumon-fleet";
/// Agents read from the catalog at once.
const PAGE: i64 = 1_000;

/// The two series of `agent` at `t_ms`.
pub fn agent_series(
    agent: &AgentRecord,
    fleet: &FleetConfig,
    now_ms: i64,
    t_ms: i64,
) -> Vec<SeriesWrite> {
    let labels = |name: &str| {
        let mut labels = vec![
            Label::new("__name__", name),
            Label::new("job", JOB),
            Label::new("instance", agent.agent_id.as_str()),
            Label::new("agent_id", agent.agent_id.as_str()),
            Label::new("status", agent.status.as_str()),
        ];
        for (label, value) in [
            ("hostname", &agent.hostname),
            ("name", &agent.name),
            ("agent_type", &agent.agent_type),
            ("agent_version", &agent.agent_version),
            ("os", &agent.os),
        ] {
            if !value.is_empty() {
                labels.push(Label::new(label, value.as_str()));
            }
        }
        Labels::from_trusted(labels)
    };
    let up = fleet.online(agent, now_ms);
    let mut series = vec![SeriesWrite {
        labels: labels("secumon_agent_up"),
        samples: vec![Sample {
            t: t_ms,
            v: if up { 1.0 } else { 0.0 },
        }],
    }];
    if let Some(seen) = agent.last_seen_at {
        series.push(SeriesWrite {
            labels: labels("secumon_agent_last_seen_timestamp_seconds"),
            samples: vec![Sample {
                t: t_ms,
                v: seen as f64 / 1000.0,
            }],
        });
    }
    series
}

/// Whether each agent was online at the previous run, to announce changes on `/ws/agents`.
#[derive(Default)]
pub struct Presence(HashMap<(TenantId, String), bool>);

impl Presence {
    /// Records `agent`'s state; its change since the previous run, if any (not on the first).
    fn observe(&mut self, agent: &AgentRecord, online: bool) -> Option<AgentEventKind> {
        let before = self
            .0
            .insert((agent.tenant.clone(), agent.id.clone()), online);
        match before {
            Some(was) if was != online => Some(if online {
                AgentEventKind::Online
            } else {
                AgentEventKind::Offline
            }),
            _ => None,
        }
    }
}

/// Writes the status series of every agent of every tenant at `now_ms`, and announces agents
/// that came online or went offline since the previous run; how many agents.
pub async fn write_all(
    catalog: &dyn Catalog,
    ingester: &Ingester,
    fleet: &FleetConfig,
    live: Option<(&LiveHub, &mut Presence)>,
    now_ms: i64,
) -> Result<usize, String> {
    let mut live = live;
    let mut seen = std::collections::HashSet::new();
    let every_ms = fleet.status_interval_secs.max(1) as i64 * 1000;
    let t_ms = now_ms - now_ms.rem_euclid(every_ms);
    let mut after: Option<(TenantId, String)> = None;
    let mut agents = 0;
    loop {
        let page = catalog
            .agents_after(after.as_ref().map(|(t, a)| (t, a.as_str())), PAGE)
            .await
            .map_err(|e: CatalogError| e.to_string())?;
        let Some(last) = page.last() else {
            forget_gone(&mut live, &seen);
            return Ok(agents);
        };
        after = Some((last.tenant.clone(), last.agent_id.clone()));
        let full_page = page.len() as i64 >= PAGE;
        let page = forget_stale(
            catalog,
            fleet,
            live.as_ref().map(|(hub, _)| *hub),
            page,
            now_ms,
        )
        .await;
        agents += page.len();
        if let Some((hub, presence)) = live.as_mut() {
            for agent in &page {
                seen.insert((agent.tenant.clone(), agent.id.clone()));
                let online = fleet.online(agent, now_ms);
                if let Some(kind) = presence.observe(agent, online) {
                    hub.agent_event(kind, agent);
                }
            }
        }
        // One write per tenant on the page.
        let mut start = 0;
        while start < page.len() {
            let tenant = page[start].tenant.clone();
            let end = page[start..]
                .iter()
                .position(|a| a.tenant != tenant)
                .map_or(page.len(), |n| start + n);
            let series: Vec<SeriesWrite> = page[start..end]
                .iter()
                .flat_map(|a| agent_series(a, fleet, now_ms, t_ms))
                .collect();
            let batch = Batch {
                series: WriteBatch::from_series(&series),
                ..Default::default()
            };
            // One tenant's failure (its storage, its limits) does not hold up the others.
            if let Err(e) = ingester.write(PROTOCOL, &tenant, batch).await {
                tracing::warn!(tenant = %tenant, error = %e, "cannot write the fleet's status series");
            }
            start = end;
        }
        if !full_page {
            forget_gone(&mut live, &seen);
            return Ok(agents);
        }
    }
}

/// Removes the auto-registered agents of `page` unheard of for
/// `--fleet-forget-auto-registered-after` (announcing each); the agents left.
async fn forget_stale(
    catalog: &dyn Catalog,
    fleet: &FleetConfig,
    hub: Option<&LiveHub>,
    page: Vec<AgentRecord>,
    now_ms: i64,
) -> Vec<AgentRecord> {
    let after = fleet.forget_auto_registered_after;
    if after.is_zero() {
        return page;
    }
    let cutoff = now_ms.saturating_sub(after.as_millis().min(i64::MAX as u128) as i64);
    let mut kept = Vec::with_capacity(page.len());
    for agent in page {
        // One an operator has taken up (tags, a remote configuration) stays, as does one
        // still counted online (a setting shorter than its heartbeat window).
        let adopted = !agent.tags.is_empty() || !agent.remote_config.is_empty();
        if agent.auto_registered
            && !adopted
            && !fleet.online(&agent, now_ms)
            && agent.last_seen_at.is_some_and(|seen| seen < cutoff)
        {
            // Only if still unseen: it may have reported since the page was read.
            match catalog
                .delete_agent(&agent.tenant, &agent.id, Some(cutoff))
                .await
            {
                Ok(true) => {
                    tracing::info!(tenant = %agent.tenant, agent_id = %agent.agent_id,
                        "removed an auto-registered agent not heard from for --fleet-forget-auto-registered-after");
                    if let Some(hub) = hub {
                        hub.agent_event(AgentEventKind::Deleted, &agent);
                    }
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(tenant = %agent.tenant, agent_id = %agent.agent_id, error = %e,
                        "cannot remove a stale auto-registered agent; retrying at the next run");
                }
            }
        }
        kept.push(agent);
    }
    kept
}

/// Drops deleted agents from `presence`.
fn forget_gone(
    live: &mut Option<(&LiveHub, &mut Presence)>,
    seen: &std::collections::HashSet<(TenantId, String)>,
) {
    if let Some((_, presence)) = live {
        presence.0.retain(|key, _| seen.contains(key));
    }
}
