//! Metric and label names as Prometheus's OTLP translator builds them
//! (prometheus v2.53 storage/remote/otlptranslator/prometheus/normalize_name.go and
//! normalize_label.go).

/// Go's `unicode.IsLetter || unicode.IsDigit`. Rust's `is_alphanumeric` is a close superset
/// (it also admits letter-like numbers and marks); the difference only ever concerns names that
/// the legacy charset refuses afterwards anyway.
fn is_name_char(c: char) -> bool {
    c.is_alphanumeric()
}

/// Main units: OTel (UCUM) to Prometheus words (`unitMap`).
fn main_unit(unit: &str) -> &str {
    match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "1" => "",
        "%" => "percent",
        other => other,
    }
}

/// Units after a `/` (`perUnitMap`): note `m` is minute here.
fn per_unit(unit: &str) -> &str {
    match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        other => other,
    }
}

/// Splits on every rune that is not a letter or digit (Go `strings.FieldsFunc`).
fn tokens(s: &str) -> Vec<String> {
    s.split(|c: char| !is_name_char(c))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `CleanUpString`: tokens joined with `_`.
fn clean_up(s: &str) -> String {
    tokens(s).join("_")
}

/// What kind of metric a name is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    /// A monotonic sum: gets `_total`.
    Counter,
    /// A gauge: gets `_ratio` when its unit is exactly `1`.
    Gauge,
    /// Anything else (non-monotonic sums, histograms, summaries): unit suffix only.
    Other,
}

/// The Prometheus name of an OTel metric: name tokens, then the unit (and `per` unit) unless
/// already present, then `total` or `ratio`, joined with `_`, with `_` before a leading digit.
pub fn metric_name(name: &str, unit: &str, kind: NameKind) -> String {
    let mut name_tokens = tokens(name);
    let mut parts = unit.splitn(2, '/');
    let main = parts.next().unwrap_or("").trim();
    if !main.is_empty() && !main.contains(['{', '}']) {
        let word = clean_up(main_unit(main));
        if !word.is_empty() && !name_tokens.contains(&word) {
            name_tokens.push(word);
        }
    }
    if let Some(per) = parts.next().map(str::trim).filter(|p| !p.is_empty()) {
        if !per.contains(['{', '}']) {
            let word = clean_up(per_unit(per));
            if !word.is_empty() && !name_tokens.contains(&word) {
                name_tokens.push("per".into());
                name_tokens.push(word);
            }
        }
    }
    match kind {
        NameKind::Counter => {
            name_tokens.retain(|t| t != "total");
            name_tokens.push("total".into());
        }
        NameKind::Gauge if unit == "1" => {
            name_tokens.retain(|t| t != "ratio");
            name_tokens.push("ratio".into());
        }
        _ => {}
    }
    let mut joined = name_tokens.join("_");
    if joined.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        joined.insert(0, '_');
    }
    joined
}

/// The Prometheus word for a metric's unit (for metadata), `""` when none applies.
pub fn unit_word(unit: &str) -> String {
    let main = unit.split('/').next().unwrap_or("").trim();
    if main.is_empty() || main.contains(['{', '}']) {
        return String::new();
    }
    clean_up(main_unit(main))
}

/// `NormalizeLabel`: every rune that is not a letter or digit becomes `_` (one for one); a
/// leading digit gets `key_`, a single leading `_` gets `key`; `__` prefixes stay.
pub fn label_name(key: &str) -> String {
    if key.is_empty() {
        return String::new();
    }
    let mut label: String = key
        .chars()
        .map(|c| if is_name_char(c) { c } else { '_' })
        .collect();
    if label.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        label.insert_str(0, "key_");
    } else if label.starts_with('_') && !label.starts_with("__") {
        label.insert_str(0, "key");
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases from Prometheus's own normalize_name_test.go and normalize_label_test.go.
    #[test]
    fn metric_names_match_prometheus() {
        let cases = [
            (
                "system.filesystem.usage",
                "By",
                NameKind::Gauge,
                "system_filesystem_usage_bytes",
            ),
            (
                "system.network.io",
                "By",
                NameKind::Counter,
                "system_network_io_bytes_total",
            ),
            (
                "network_transmitted_bytes_total",
                "By",
                NameKind::Counter,
                "network_transmitted_bytes_total",
            ),
            (
                "http.server.duration",
                "ms",
                NameKind::Other,
                "http_server_duration_milliseconds",
            ),
            (
                "hw.fan.speed_ratio",
                "1",
                NameKind::Gauge,
                "hw_fan_speed_ratio",
            ),
            ("objects", "1", NameKind::Counter, "objects_total"),
            (
                "cpu.utilization",
                "1",
                NameKind::Gauge,
                "cpu_utilization_ratio",
            ),
            ("speed", "km/h", NameKind::Gauge, "speed_km_per_hour"),
            ("rate", "{objects}/s", NameKind::Gauge, "rate_per_second"),
            ("scans", "{scanned}/{returned}", NameKind::Gauge, "scans"),
            ("temperature", "°F", NameKind::Gauge, "temperature_F"),
            (
                "envoy__rule_engine_zlib_buf_error",
                "",
                NameKind::Gauge,
                "envoy_rule_engine_zlib_buf_error",
            ),
            (":foo::bar", "", NameKind::Gauge, "foo_bar"),
            ("3.14 digits", "", NameKind::Gauge, "_3_14_digits"),
            ("requests", "%", NameKind::Gauge, "requests_percent"),
            (
                "transfer",
                "MiBy/s",
                NameKind::Counter,
                "transfer_mebibytes_per_second_total",
            ),
            ("disk.io", "By", NameKind::Other, "disk_io_bytes"),
            ("weird", "+=.:,!* & #", NameKind::Gauge, "weird"),
        ];
        for (name, unit, kind, expected) in cases {
            assert_eq!(metric_name(name, unit, kind), expected, "{name} [{unit}]");
        }
    }

    #[test]
    fn label_names_match_prometheus() {
        for (key, expected) in [
            ("foo.bar", "foo_bar"),
            ("foo..bar", "foo__bar"),
            ("0abc", "key_0abc"),
            ("_foo", "key_foo"),
            ("_", "key_"),
            ("__foo", "__foo"),
            ("http.status_code", "http_status_code"),
            ("", ""),
        ] {
            assert_eq!(label_name(key), expected, "{key}");
        }
    }
}
