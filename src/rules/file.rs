//! Rule files in Prometheus's format (`model/rulefmt` of Prometheus 2.42): groups of recording
//! and alerting rules in YAML, checked as `promtool check rules` checks them, with the same
//! messages, so a file Prometheus takes is taken and one it refuses is refused for the same
//! reason.

use crate::model::labels::{is_valid_label_name, is_valid_metric_name};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// A rule file: `groups:`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleGroups {
    #[serde(default)]
    pub groups: Vec<RuleGroup>,
}

/// One group: its rules are evaluated in order, every `interval`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleGroup {
    #[serde(default)]
    pub name: String,
    /// A Prometheus duration; the global evaluation interval when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration_opt"
    )]
    pub interval: Option<i64>,
    /// Most series an alerting rule may yield or a recording rule may write in one evaluation
    /// (0 or less: no limit, as Prometheus takes it); past it the rule's whole evaluation
    /// fails.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub limit: i64,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A recording (`record`) or alerting (`alert`) rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub record: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub alert: String,
    #[serde(default)]
    pub expr: String,
    #[serde(default, skip_serializing_if = "is_zero_i64", with = "duration")]
    pub r#for: i64,
    #[serde(default, skip_serializing_if = "is_zero_i64", with = "duration")]
    pub keep_firing_for: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Rule {
    /// `record` or `alert`, whichever is set.
    pub fn name(&self) -> &str {
        if self.record.is_empty() {
            &self.alert
        } else {
            &self.record
        }
    }

    pub fn is_alerting(&self) -> bool {
        !self.alert.is_empty()
    }
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// Durations as Prometheus writes them (`1m`, `90s`, `1h30m`), in milliseconds.
mod duration {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod duration_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match ms {
            Some(ms) => s.serialize_str(&super::format_duration(*ms)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// The longest rule expression, in bytes, and its deepest nesting: the bounds of the query
/// API's defaults (`--query-max-length-bytes`, `--query-max-depth`), checked on the text before
/// the parser recurses, so no rule can exhaust the parser's stack.
pub const MAX_EXPR_BYTES: usize = 65_536;
pub const MAX_EXPR_DEPTH: usize = 200;
/// The longest duration Prometheus takes (`model.ParseDuration`: what fits in nanoseconds).
const MAX_DURATION_MS: i64 = i64::MAX / 1_000_000;

/// A duration as Prometheus's `model.ParseDuration` takes it.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let ms = crate::api::params::parse_prometheus_duration(text)
        .ok_or_else(|| format!("not a valid duration string: {text:?}"))?;
    if ms > MAX_DURATION_MS {
        return Err("duration out of range".into());
    }
    Ok(ms)
}

/// A duration as Prometheus's `model.Duration.String` writes it: `1h30m`, `90s` is `1m30s`,
/// `0s` for zero.
pub fn format_duration(ms: i64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, size) in [
        ("y", 365 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

/// Why a rule file is refused: each problem with where it is.
#[derive(Debug, PartialEq)]
pub struct Invalid(pub Vec<String>);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for Invalid {}

/// Parses and checks a rule file's text (`max_bytes` already enforced by the caller).
pub fn parse(text: &str) -> Result<RuleGroups, Invalid> {
    // An empty file is an empty set of groups, as Prometheus takes it.
    if text.trim().is_empty() {
        return Ok(RuleGroups::default());
    }
    let groups: RuleGroups =
        yaml_serde::from_str(text).map_err(|e| Invalid(vec![e.to_string()]))?;
    let errors = validate(&groups);
    if errors.is_empty() {
        Ok(groups)
    } else {
        Err(Invalid(errors))
    }
}

/// Every problem of `groups`, in Prometheus's words (`rulefmt.RuleGroups.Validate`).
pub fn validate(groups: &RuleGroups) -> Vec<String> {
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for group in &groups.groups {
        if group.name.is_empty() {
            errors.push("Groupname must not be empty".to_owned());
        }
        if !seen.insert(group.name.as_str()) {
            errors.push(format!(
                "groupname: \"{}\" is repeated in the same file",
                group.name
            ));
        }
        for (i, rule) in group.rules.iter().enumerate() {
            for problem in validate_rule(rule) {
                errors.push(format!(
                    "group {:?}, rule {}, {:?}: {problem}",
                    group.name,
                    i + 1,
                    rule.name()
                ));
            }
        }
    }
    errors
}

/// The problems of one rule (`rulefmt.RuleNode.Validate` and its template check).
fn validate_rule(rule: &Rule) -> Vec<String> {
    let mut errors = Vec::new();
    match (rule.record.is_empty(), rule.alert.is_empty()) {
        (false, false) => errors.push("only one of 'record' and 'alert' must be set".into()),
        (true, true) => errors.push("one of 'record' or 'alert' must be set".into()),
        _ => {}
    }
    if rule.expr.is_empty() {
        errors.push("field 'expr' must be set in rule".into());
    } else if let Err(e) = crate::promql::limits::check_text(
        &rule.expr,
        MAX_EXPR_BYTES,
        crate::promql::limits::MAX_DEPTH_CEILING.min(MAX_EXPR_DEPTH),
    )
    .and_then(|()| crate::promql::parse(&rule.expr))
    {
        errors.push(format!("could not parse expression: {e}"));
    }
    if !rule.record.is_empty() {
        if !rule.annotations.is_empty() {
            errors.push("invalid field 'annotations' in recording rule".into());
        }
        if rule.r#for != 0 {
            errors.push("invalid field 'for' in recording rule".into());
        }
        if rule.keep_firing_for != 0 {
            errors.push("invalid field 'keep_firing_for' in recording rule".into());
        }
        if !is_valid_metric_name(&rule.record) {
            errors.push(format!("invalid recording rule name: {}", rule.record));
        }
    }
    // Every label value is valid: a Rust string is UTF-8.
    for name in rule.labels.keys() {
        if !is_valid_label_name(name) || name == "__name__" {
            errors.push(format!("invalid label name: {name}"));
        }
    }
    for name in rule.annotations.keys() {
        if !is_valid_label_name(name) {
            errors.push(format!("invalid annotation name: {name}"));
        }
    }
    if rule.is_alerting() {
        for (kind, map) in [("label", &rule.labels), ("annotation", &rule.annotations)] {
            for (name, text) in map {
                if let Err(e) = super::template::check(&rule.alert, text) {
                    errors.push(format!("{kind} {name:?}: {e}"));
                }
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_file_reads_back() {
        let groups = parse(
            "groups:\n  - name: g\n    interval: 90s\n    limit: 10\n    rules:\n      - record: job:up:sum\n        expr: sum by (job) (up)\n      - alert: Down\n        expr: up == 0\n        for: 5m\n        keep_firing_for: 1m\n        labels: {severity: page}\n        annotations: {summary: \"{{ $labels.instance }} down\"}\n",
        )
        .unwrap();
        let g = &groups.groups[0];
        assert_eq!((g.interval, g.limit), (Some(90_000), 10));
        assert_eq!(g.rules[1].r#for, 300_000);
        assert_eq!(g.rules[1].keep_firing_for, 60_000);
        assert_eq!(parse("").unwrap(), RuleGroups::default());
        // Prometheus takes a negative limit as none.
        assert_eq!(
            parse("groups:\n  - name: g\n    limit: -1\n    rules: []\n")
                .unwrap()
                .groups[0]
                .limit,
            -1
        );
        assert_eq!(format_duration(5_400_000), "1h30m");
        assert_eq!(format_duration(0), "0s");
    }

    #[test]
    fn problems_are_named_as_prometheus_names_them() {
        let problems = |text: &str| parse(text).unwrap_err().0;
        assert_eq!(
            problems("groups:\n  - name: g\n    rules:\n      - record: a\n        alert: A\n        expr: up\n"),
            ["group \"g\", rule 1, \"a\": only one of 'record' and 'alert' must be set"]
        );
        assert_eq!(
            problems("groups:\n  - name: g\n    rules:\n      - record: bad-name\n        expr: up\n        for: 1m\n"),
            [
                "group \"g\", rule 1, \"bad-name\": invalid field 'for' in recording rule",
                "group \"g\", rule 1, \"bad-name\": invalid recording rule name: bad-name",
            ]
        );
        assert_eq!(
            problems("groups:\n  - name: g\n    rules: []\n  - name: g\n    rules: []\n"),
            ["groupname: \"g\" is repeated in the same file"]
        );
        let unknown = problems("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        annotation: {}\n");
        assert!(
            unknown[0].contains("unknown field `annotation`"),
            "{unknown:?}"
        );
        // Bounded before parsing: a nesting far past the limit is refused, not parsed.
        let deep = format!(
            "groups:\n  - name: g\n    rules:\n      - record: a\n        expr: {}1\n",
            "-".repeat(100_000)
        );
        assert!(
            problems(&deep)[0].contains("could not parse expression"),
            "refused"
        );
        let far = problems("groups:\n  - name: g\n    interval: 300000y\n    rules: []\n");
        assert!(far[0].contains("duration out of range"), "{far:?}");
        let template = problems("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        labels: {x: \"{{ $nope }}\"}\n");
        assert!(
            template[0]
                .contains("label \"x\": template: __alert_A:1: undefined variable \"$nope\""),
            "{template:?}"
        );
    }
}
