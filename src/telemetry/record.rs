//! Self-monitoring: every `--self-monitor-interval-secs` the server records what `/metrics`
//! shows into its own storage, as a Prometheus scraping it would (`job="secumon"`,
//! `instance="<host>:<port>"`, the exposition's metadata), so the SecuMon dashboard works
//! with no Prometheus and alerting rules can watch the server itself.

use super::Metrics;
use crate::ingest::{Batch, Ingester};
use crate::model::{Label, Labels, MetricMetadata, MetricType, Sample, TenantId};
use crate::storage::{SeriesWrite, WriteBatch};
use clap::Args;
use serde::Deserialize;

/// The protocol the recorded samples are counted under in `secumon_samples_ingested_total`.
pub const PROTOCOL: &str = "self";
pub const JOB: &str = "secumon";

/// Recording of the server's own metrics (`[self_monitor]` in the config file).
#[derive(Clone, Debug, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct SelfMonitorConfig {
    /// Seconds between recordings of the server's own metrics (what `/metrics` shows) into its
    /// own storage as `job="secumon"`, for the SecuMon dashboard and for rules; 0: never (let
    /// a Prometheus scrape `/metrics` instead).
    #[arg(
        id = "self_monitor.interval_secs",
        long = "self-monitor-interval-secs",
        env = "SECUMON_SELF_MONITOR_INTERVAL_SECS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(0..=3600)
    )]
    pub interval_secs: u64,
    /// Tenant the server's own metrics are recorded into: give its tokens read access to see
    /// them.
    #[arg(
        id = "self_monitor.tenant",
        long = "self-monitor-tenant",
        env = "SECUMON_SELF_MONITOR_TENANT",
        default_value = TenantId::DEFAULT
    )]
    pub tenant: String,
}

impl Default for SelfMonitorConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

impl SelfMonitorConfig {
    /// The tenant, checked by the rule every tenant id follows.
    pub fn tenant_id(&self) -> Result<TenantId, String> {
        if crate::auth::valid_tenant(&self.tenant) {
            Ok(TenantId::new(self.tenant.as_str()))
        } else {
            Err(format!(
                "--self-monitor-tenant {:?} is not a valid tenant id: 1 to 150 letters, digits or !-_.*'() (not . or ..)",
                self.tenant
            ))
        }
    }
}

/// The `instance` label of this node: the host's name and the HTTP port, as a Prometheus
/// scraping it would name the target.
pub fn instance(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{port}")
}

/// Records `metrics` at `t_ms` into `tenant`; how many samples were stored.
pub async fn record(
    metrics: &Metrics,
    ingester: &Ingester,
    tenant: &TenantId,
    instance: &str,
    t_ms: i64,
) -> Result<usize, String> {
    let (series, metadata) = parse(&metrics.encode(), instance, t_ms)?;
    let batch = Batch {
        series: WriteBatch::from_series(&series),
        metadata,
        ..Default::default()
    };
    let summary = ingester
        .write(PROTOCOL, tenant, batch)
        .await
        .map_err(|e| e.to_string())?;
    Ok(summary.accepted)
}

/// The series and metadata of an exposition in the text format the server's registry writes
/// (OpenMetrics 1.0 as `prometheus_client` encodes it: no timestamps, no exemplars), each
/// series with `job` and `instance` added and one sample at `t_ms`.
pub fn parse(
    text: &str,
    instance: &str,
    t_ms: i64,
) -> Result<(Vec<SeriesWrite>, Vec<MetricMetadata>), String> {
    let mut series = Vec::new();
    let mut metadata: Vec<MetricMetadata> = Vec::new();
    let mut help = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), text) => {
                    help.insert(name, unescape_help(text.unwrap_or("")));
                }
                (Some("TYPE"), Some(name), Some(kind)) => metadata.push(MetricMetadata {
                    metric_family_name: name.to_owned(),
                    metric_type: MetricType::parse(kind),
                    help: String::new(),
                    unit: String::new(),
                }),
                _ => {}
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (labels, value) = sample_line(line).ok_or_else(|| format!("cannot parse {line:?}"))?;
        let mut labels = labels;
        labels.push(Label::new("job", JOB));
        labels.push(Label::new("instance", instance));
        let labels = Labels::from_wire(labels).map_err(|e| format!("{line:?}: {e}"))?;
        series.push(SeriesWrite {
            labels,
            samples: vec![Sample { t: t_ms, v: value }],
        });
    }
    for m in &mut metadata {
        if let Some(text) = help.remove(m.metric_family_name.as_str()) {
            m.help = text;
        }
    }
    Ok((series, metadata))
}

/// `name{a="x",b="y"} value` or `name value`.
fn sample_line(line: &str) -> Option<(Vec<Label>, f64)> {
    let name_end = line.find(['{', ' '])?;
    let mut labels = vec![Label::new("__name__", &line[..name_end])];
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        rest = body;
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (name, after) = rest.split_once("=\"")?;
            let (value, after) = quoted(after)?;
            labels.push(Label::new(name, value));
            rest = after;
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some((labels, value))
}

/// A label value up to its closing quote (`\\`, `\"` and `\n` escaped), and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

fn unescape_help(text: &str) -> String {
    text.replace("\\n", "\n").replace("\\\\", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_exposition_reads_back() {
        let metrics = Metrics::new();
        metrics.rejected("remote_write", "out_of_order", 3);
        metrics
            .http_requests
            .get_or_create(&super::super::RequestLabels {
                handler: "/api/v1/query \"odd\" \\ \n".into(),
                code: 200,
            })
            .inc();
        metrics
            .query_duration
            .get_or_create(&super::super::QueryLabels { kind: "range" })
            .observe(0.2);
        let (series, metadata) = parse(&metrics.encode(), "host:8080", 1_000).unwrap();
        let find = |name: &str, label: (&str, &str)| {
            series
                .iter()
                .find(|s| {
                    s.labels.get("__name__") == Some(name) && s.labels.get(label.0) == Some(label.1)
                })
                .unwrap_or_else(|| panic!("no {name} with {label:?}"))
        };
        let rejected = find("secumon_samples_rejected_total", ("reason", "out_of_order"));
        assert_eq!(rejected.samples, [Sample { t: 1_000, v: 3.0 }]);
        assert_eq!(rejected.labels.get("job"), Some("secumon"));
        assert_eq!(rejected.labels.get("instance"), Some("host:8080"));
        assert_eq!(rejected.labels.get("protocol"), Some("remote_write"));
        let odd = find(
            "secumon_http_requests_total",
            ("handler", "/api/v1/query \"odd\" \\ \n"),
        );
        assert_eq!(odd.labels.get("code"), Some("200"));
        assert_eq!(
            find("secumon_query_duration_seconds_bucket", ("le", "+Inf")).samples[0].v,
            1.0
        );
        assert_eq!(
            find("secumon_query_duration_seconds_count", ("kind", "range")).samples[0].v,
            1.0
        );
        assert!(find("process_resident_memory_bytes", ("job", "secumon")).samples[0].v > 0.0);
        let build = find("secumon_build_info", ("version", env!("CARGO_PKG_VERSION")));
        assert_eq!(build.samples[0].v, 1.0);
        assert!(find("process_cpu_seconds_total", ("job", "secumon")).samples[0].v >= 0.0);
        let counter = metadata
            .iter()
            .find(|m| m.metric_family_name == "secumon_samples_rejected")
            .unwrap();
        assert_eq!(counter.metric_type, MetricType::Counter);
        assert!(counter.help.starts_with("Samples refused"), "{counter:?}");
        // Every series is valid: what the ingest path takes from a client.
        for s in &series {
            let pairs: Vec<Label> = s.labels.pairs().map(|(n, v)| Label::new(n, v)).collect();
            assert!(Labels::from_wire(pairs).is_ok(), "{:?}", s.labels);
        }
    }

    #[test]
    fn malformed_lines_are_refused() {
        assert!(parse("name{a=\"x} 1\n", "i", 0).is_err());
        assert!(parse("name{a=\"x\"} one\n", "i", 0).is_err());
        assert!(parse("name\n", "i", 0).is_err());
        let (series, _) = parse("name 1.5\n# EOF\n", "i", 0).unwrap();
        assert_eq!(series[0].samples[0].v, 1.5);
    }

    #[test]
    fn the_tenant_is_checked() {
        let mut config = SelfMonitorConfig::default();
        assert_eq!(config.interval_secs, 15);
        assert_eq!(config.tenant_id().unwrap().as_str(), "default");
        config.tenant = "..".into();
        assert!(config.tenant_id().is_err());
    }
}
