//! Sending alerts to Alertmanager's v2 API as Prometheus 2.42 sends them (`notifier/notifier.go`,
//! `rules/alerting.go` `sendAlerts`): a firing alert when it starts firing and again every
//! `--rules-resend-delay`, a resolved one at once and again every resend delay for as long as
//! it is kept (15 minutes); `endsAt` four times the larger of the resend delay and the group's
//! interval ahead while firing, the time it resolved once resolved. Alerts queue (at most
//! [`QUEUE_CAPACITY`], the oldest dropped past it) and go in batches of [`BATCH`] to every
//! Alertmanager at once; a batch that no Alertmanager took is tried again with backoff, then
//! dropped and counted.

use super::{Alert, AlertState};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Prometheus's `--alertmanager.notification-queue-capacity` default.
pub const QUEUE_CAPACITY: usize = 10_000;
/// Prometheus's `maxBatchSize`.
pub const BATCH: usize = 64;
/// Attempts of one batch before it is dropped.
const ATTEMPTS: u32 = 3;

/// One alert as Alertmanager's `PostableAlert` carries it.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    pub starts_at: Option<i64>,
    pub ends_at: Option<i64>,
    pub generator_url: String,
}

/// Milliseconds as `strfmt.DateTime` writes them: `2026-12-05T23:24:21.188Z`.
fn date_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

impl Notification {
    /// The v2 API's JSON (`models.PostableAlert`, its field order; annotations left out when
    /// there are none).
    pub fn to_json(&self) -> Value {
        let strings = |m: &std::collections::BTreeMap<String, String>| {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
        };
        let mut out = Map::new();
        if !self.annotations.is_empty() {
            out.insert("annotations".into(), strings(&self.annotations));
        }
        if let Some(t) = self.ends_at {
            out.insert("endsAt".into(), json!(date_time(t)));
        }
        if let Some(t) = self.starts_at {
            out.insert("startsAt".into(), json!(date_time(t)));
        }
        if !self.generator_url.is_empty() {
            out.insert("generatorURL".into(), json!(self.generator_url));
        }
        out.insert("labels".into(), strings(&self.labels));
        Value::Object(out)
    }
}

/// Whether `alert` is due to be sent at `t` (`Alert.needsSending`).
fn needs_sending(alert: &Alert, t: i64, resend_delay_ms: i64) -> bool {
    if alert.state == AlertState::Pending {
        return false;
    }
    if alert.resolved_at > alert.last_sent_at {
        return true;
    }
    alert
        .last_sent_at
        .is_none_or(|sent| sent + resend_delay_ms < t)
}

/// The alerts of a rule due at `t`, marked as sent (`AlertingRule.sendAlerts` and
/// `rules.SendAlerts`).
pub fn due(
    alerts: &mut std::collections::HashMap<u128, Alert>,
    t: i64,
    resend_delay_ms: i64,
    interval_ms: i64,
    generator_url: &str,
) -> Vec<Notification> {
    let mut out = Vec::new();
    for alert in alerts.values_mut() {
        if !needs_sending(alert, t, resend_delay_ms) {
            continue;
        }
        alert.last_sent_at = Some(t);
        alert.valid_until = Some(t + 4 * resend_delay_ms.max(interval_ms));
        out.push(Notification {
            labels: alert.labels.clone(),
            annotations: alert.annotations.clone(),
            starts_at: alert.fired_at,
            ends_at: alert.resolved_at.or(alert.valid_until),
            generator_url: generator_url.to_owned(),
        });
    }
    out.sort_by(|a, b| a.labels.cmp(&b.labels));
    out
}

/// `/graph?g0.expr=<expr>&g0.tab=1` under the external URL (`strutil.TableLinkForExpression`).
pub fn generator_url(external_url: &str, query: &str) -> String {
    let escaped: String = form_urlencoded::byte_serialize(query.as_bytes()).collect();
    format!(
        "{}/graph?g0.expr={escaped}&g0.tab=1",
        external_url.trim_end_matches('/')
    )
}

/// The queue of alerts and the Alertmanagers they go to.
pub struct Notifier {
    urls: Vec<String>,
    /// The built-in receivers (`--alert-receivers`), which get every alert sent too.
    pub receivers: std::sync::Arc<super::receivers::Dispatcher>,
    queue: Mutex<VecDeque<Notification>>,
    more: tokio::sync::Notify,
    http: reqwest::Client,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
}

impl Notifier {
    pub fn new(
        urls: &[String],
        timeout: Duration,
        external_url: &str,
        metrics: std::sync::Arc<crate::telemetry::Metrics>,
    ) -> Result<Notifier, String> {
        let urls = urls
            .iter()
            .filter(|u| !u.is_empty())
            .map(|u| {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(format!(
                        "--alertmanager-url {u:?}: not an http:// or https:// URL"
                    ));
                }
                Ok(format!("{}/api/v2/alerts", u.trim_end_matches('/')))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("SecuMon/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Notifier {
            urls,
            receivers: std::sync::Arc::new(super::receivers::Dispatcher::new(
                external_url,
                metrics.clone(),
            )),
            queue: Mutex::new(VecDeque::new()),
            more: tokio::sync::Notify::new(),
            http,
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        !self.urls.is_empty()
    }

    /// Queues `alerts` for the Alertmanagers (past the capacity the oldest are dropped, and
    /// counted) and hands them to the built-in receivers.
    pub fn send(&self, alerts: Vec<Notification>) {
        if alerts.is_empty() {
            return;
        }
        self.receivers.receive(&alerts);
        if !self.enabled() {
            return;
        }
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.extend(alerts);
        let excess = queue.len().saturating_sub(QUEUE_CAPACITY);
        if excess > 0 {
            queue.drain(..excess);
            self.metrics.notifications_dropped.inc_by(excess as u64);
            tracing::warn!(
                dropped = excess,
                "alert notification queue full, dropping alerts"
            );
        }
        self.metrics.notification_queue.set(queue.len() as i64);
        drop(queue);
        self.more.notify_one();
    }

    /// Sends batches as they come, and runs the built-in receivers, until `stop`.
    pub async fn run(&self, stop: tokio::sync::watch::Receiver<bool>) {
        let receivers = tokio::spawn(self.receivers.clone().run(stop.clone()));
        if !self.enabled() {
            let _ = receivers.await;
            return;
        }
        let mut stop = stop;
        loop {
            let batch: Vec<Notification> = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let n = queue.len().min(BATCH);
                let batch = queue.drain(..n).collect();
                self.metrics.notification_queue.set(queue.len() as i64);
                batch
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = self.more.notified() => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            self.deliver(&batch).await;
        }
    }

    /// Posts `batch` to every Alertmanager; tried again with backoff while none takes it.
    async fn deliver(&self, batch: &[Notification]) {
        let body = Value::Array(batch.iter().map(Notification::to_json).collect()).to_string();
        for attempt in 0..ATTEMPTS {
            let sends = self.urls.iter().map(|url| {
                let body = body.clone();
                async move {
                    let result = self
                        .http
                        .post(url)
                        .header("Content-Type", "application/json")
                        .body(body)
                        .send()
                        .await;
                    let ok = match result {
                        Ok(r) if r.status().is_success() => true,
                        Ok(r) => {
                            tracing::warn!(alertmanager = %url, status = %r.status(), "error sending alerts");
                            false
                        }
                        Err(e) => {
                            tracing::warn!(alertmanager = %url, error = %e, "error sending alerts");
                            false
                        }
                    };
                    let labels = crate::telemetry::AlertmanagerLabels {
                        alertmanager: url.clone(),
                    };
                    if ok {
                        self.metrics
                            .notifications_sent
                            .get_or_create(&labels)
                            .inc_by(batch.len() as u64);
                    } else {
                        self.metrics.notification_errors.get_or_create(&labels).inc();
                    }
                    ok
                }
            });
            let results = futures::future::join_all(sends).await;
            if results.iter().any(|ok| *ok) {
                return;
            }
            if attempt + 1 < ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
        }
        self.metrics
            .notifications_dropped
            .inc_by(batch.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(state: AlertState) -> Alert {
        Alert {
            state,
            labels: [("alertname".to_owned(), "A".to_owned())].into(),
            annotations: Default::default(),
            value: 1.0,
            active_at: 0,
            fired_at: Some(1_000),
            resolved_at: None,
            keep_firing_since: None,
            last_sent_at: None,
            valid_until: None,
        }
    }

    #[test]
    fn alerts_are_sent_and_resent_as_prometheus_sends_them() {
        let mut alerts = std::collections::HashMap::new();
        alerts.insert(1, alert(AlertState::Pending));
        assert!(due(&mut alerts, 1_000, 60_000, 10_000, "").is_empty());
        alerts.get_mut(&1).unwrap().state = AlertState::Firing;
        let sent = due(&mut alerts, 1_000, 60_000, 10_000, "http://x/prom");
        assert_eq!(sent[0].ends_at, Some(1_000 + 240_000));
        assert_eq!(sent[0].starts_at, Some(1_000));
        // Not again before the resend delay has passed (strictly).
        assert!(due(&mut alerts, 61_000, 60_000, 10_000, "").is_empty());
        assert_eq!(due(&mut alerts, 71_000, 60_000, 10_000, "").len(), 1);
        // Resolved: sent at once, with endsAt the time it resolved.
        let a = alerts.get_mut(&1).unwrap();
        a.state = AlertState::Inactive;
        a.resolved_at = Some(81_000);
        let sent = due(&mut alerts, 81_000, 60_000, 10_000, "");
        assert_eq!(sent[0].ends_at, Some(81_000));
        assert_eq!(
            sent[0].to_json(),
            json!({"endsAt": "1970-01-01T00:01:21.000Z", "startsAt": "1970-01-01T00:00:01.000Z", "labels": {"alertname": "A"}})
        );
        assert_eq!(
            generator_url("http://localhost:19090/prom/", "vector(42.5)"),
            "http://localhost:19090/prom/graph?g0.expr=vector%2842.5%29&g0.tab=1"
        );
    }
}
