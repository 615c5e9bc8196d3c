//! JSON encoding of query results exactly as Prometheus 2.42 writes them
//! (util/jsonutil/marshal.go, promql/value.go, and encoding/json's string escaping).

use crate::model::{Labels, Sample};
use crate::promql::QueryValue;
use std::fmt::Write;

/// Appends `s` as a JSON string escaped as Go's encoding/json does: `<`, `>`, `&`, U+2028 and
/// U+2029 as `\uXXXX`, control characters as `\n`, `\r`, `\t` or `\u00xx`.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    // Most strings need no escape (0xe2 leads U+2028 and U+2029): copied whole.
    if !s
        .bytes()
        .any(|b| b < 0x20 || matches!(b, b'"' | b'\\' | b'<' | b'>' | b'&' | 0xe2))
    {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `items` as a JSON array of strings ([`write_str`]).
pub fn write_strs(out: &mut String, items: &crate::storage::StringList) {
    out.reserve(items.text_len() + 3 * items.len() + 2);
    out.push('[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, s);
    }
    out.push(']');
}

/// Go's `strconv.FormatFloat(v, fmt, -1, 64)` for `fmt` 'f' or 'e', with Prometheus's
/// spellings of the special values.
fn format_float(out: &mut String, v: f64, exponent: bool) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else if exponent {
        // Rust prints `1e-7`; Go prints `1e-07`: sign always, at least two exponent digits.
        let s = format!("{v:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        let _ = write!(out, "{mantissa}e{sign}{digits:0>2}");
    } else {
        write_plain_float(out, v);
    }
}

/// `v` in thousandths, if `v` is a nonzero number under 1e12 that a decimal with at most three
/// fraction digits reads back as (gauges with a few decimals). The division is exact-rounded,
/// so it gives the float that decimal reads as.
fn three_decimals(v: f64) -> Option<i64> {
    if v == 0.0 || v.abs() >= 1e12 {
        return None;
    }
    let n = (v * 1000.0).round();
    (n / 1000.0 == v).then_some(n as i64)
}

/// Go's 'f' with precision -1: the shortest digits that round-trip, without exponent.
///
/// Query results are mostly this (a range query of 500 series writes 30,000 values), so the
/// common cases skip `core::fmt`: whole numbers (counters) as integers, values with up to three
/// decimals as such, and values from 1e-5 to below 1e13 as ryu's shortest digits (ryu writes
/// those without exponent; whole numbers never reach it, so it never adds `.0`). Both give the
/// shortest string that reads back as `v` and the closest of those; they differ only on an
/// exact tie between two, which needs a float with at most two fraction bits, so from 2^50
/// up (ryu picks the even digit, `Display` rounds half up). The rest goes to `Display`.
fn write_plain_float(out: &mut String, v: f64) {
    let abs = v.abs();
    if v.fract() == 0.0 && abs < 1e15 && (v != 0.0 || v.is_sign_positive()) {
        out.push_str(itoa::Buffer::new().format(v as i64));
    } else if let Some(thousandths) = three_decimals(v) {
        // The decimal with at most three fraction digits that reads back as `v`: below 1e12
        // floats are closer together than 0.001, so no other decimal as short reads back as
        // `v`, and it is the shortest.
        if v < 0.0 {
            out.push('-');
        }
        push_thousandths(out, thousandths.unsigned_abs(), true);
    } else if (1e-5..1e13).contains(&abs) {
        out.push_str(ryu::Buffer::new().format_finite(v));
    } else {
        let _ = write!(out, "{v}");
    }
}

/// `n` thousandths as units, then `.` and the three digits of the fraction unless it is zero;
/// `trim` drops the fraction's trailing zeros.
fn push_thousandths(out: &mut String, n: u64, trim: bool) {
    out.push_str(itoa::Buffer::new().format(n / 1000));
    let fraction = (n % 1000) as u32;
    if fraction != 0 {
        let digits = [fraction / 100, fraction / 10 % 10, fraction % 10];
        let len = if !trim || digits[2] != 0 {
            3
        } else if digits[1] != 0 {
            2
        } else {
            1
        };
        out.push('.');
        for digit in &digits[..len] {
            out.push(char::from(b'0' + *digit as u8));
        }
    }
}

/// A sample value in a vector or matrix (jsonutil.MarshalValue): 'e' format for magnitudes
/// below 1e-6 or from 1e21 up.
pub fn write_sample_value(out: &mut String, v: f64) {
    let abs = v.abs();
    let exponent = abs != 0.0 && !(1e-6..1e21).contains(&abs);
    out.push('"');
    format_float(out, v, exponent);
    out.push('"');
}

/// A sample timestamp in a vector or matrix (jsonutil.MarshalTimestamp): seconds, then `.` and
/// exactly three digits of ms when they are not zero.
pub fn write_sample_timestamp(out: &mut String, t: i64) {
    if t < 0 {
        out.push('-');
    }
    push_thousandths(out, t.unsigned_abs(), false);
}

/// A scalar or string result's timestamp: Go's shortest float64 of seconds.
fn write_float_seconds(out: &mut String, t: i64) {
    let seconds = t as f64 / 1000.0;
    if seconds.fract() == 0.0 && seconds.abs() < 1e21 {
        let _ = write!(out, "{}", seconds as i64);
    } else {
        let _ = write!(out, "{seconds}");
    }
}

pub fn write_labels(out: &mut String, labels: &Labels) {
    out.push('{');
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, &label.name);
        out.push(':');
        write_str(out, &label.value);
    }
    out.push('}');
}

fn write_point(out: &mut String, sample: &Sample) {
    out.push('[');
    write_sample_timestamp(out, sample.t);
    out.push(',');
    write_sample_value(out, sample.v);
    out.push(']');
}

/// `{"resultType":…,"result":…}`.
pub fn write_query_data(out: &mut String, value: &QueryValue) {
    match value {
        QueryValue::Scalar { t, v } => {
            out.push_str(r#"{"resultType":"scalar","result":["#);
            write_float_seconds(out, *t);
            out.push_str(",\"");
            // Scalars always use 'f' (promql.Scalar.MarshalJSON).
            format_float(out, *v, false);
            out.push_str("\"]}");
        }
        QueryValue::String { t, v } => {
            out.push_str(r#"{"resultType":"string","result":["#);
            write_float_seconds(out, *t);
            out.push(',');
            write_str(out, v);
            out.push_str("]}");
        }
        QueryValue::Vector(samples) => {
            out.push_str(r#"{"resultType":"vector","result":["#);
            for (i, (labels, sample)) in samples.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(r#"{"metric":"#);
                write_labels(out, labels);
                out.push_str(r#","value":"#);
                write_point(out, sample);
                out.push('}');
            }
            out.push_str("]}");
        }
        QueryValue::Matrix(series) => {
            out.push_str(r#"{"resultType":"matrix","result":["#);
            for (i, s) in series.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(r#"{"metric":"#);
                write_labels(out, &s.labels);
                out.push_str(r#","values":["#);
                for (j, sample) in s.samples.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    write_point(out, sample);
                }
                out.push_str("]}");
            }
            out.push_str("]}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(v: f64) -> String {
        let mut s = String::new();
        write_sample_value(&mut s, v);
        s
    }

    fn ts(t: i64) -> String {
        let mut s = String::new();
        write_sample_timestamp(&mut s, t);
        s
    }

    #[test]
    fn values_format_like_go() {
        assert_eq!(value(1.0), r#""1""#);
        assert_eq!(value(0.5), r#""0.5""#);
        assert_eq!(value(-0.0), r#""-0""#);
        assert_eq!(value(1e-7), r#""1e-07""#);
        assert_eq!(value(1.5e21), r#""1.5e+21""#);
        assert_eq!(value(1e20), r#""100000000000000000000""#);
        assert_eq!(value(123456.789), r#""123456.789""#);
        assert_eq!(value(f64::NAN), r#""NaN""#);
        assert_eq!(value(f64::INFINITY), r#""+Inf""#);
        assert_eq!(value(f64::NEG_INFINITY), r#""-Inf""#);
        assert_eq!(value(1e-300), r#""1e-300""#);
    }

    #[test]
    fn fast_value_paths_write_what_display_writes() {
        // Whole numbers, ryu's range and its edges, against `Display` (Go's 'f', -1).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut values = vec![
            0.0,
            1.0,
            -1.0,
            999_999_999_999_999.0,
            1e15,
            -1e15,
            1e15 + 2.0,
            1e-5,
            9.999e-6,
            1e16,
            9_999_999_999_999_998.0,
            0.1,
            0.3,
            2.5,
            1.0 / 3.0,
            51.23,
            123456.789,
            f64::EPSILON,
            4_503_599_627_370_497.0,
            0.000_012_345,
        ];
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(f64::from_bits(x));
            values.push((x % 10_000_000) as f64 / 100.0);
            values.push((x >> 11) as f64 * 1e-9);
            values.push((x % 1_000_000_000_000) as f64);
            values.push(-((x % 100_000_000) as f64) / 1000.0);
            values.push((x % 1_000_000_000_000_000) as f64 / 1000.0);
        }
        values.extend([
            0.001,
            -0.001,
            0.0005,
            0.01,
            0.1 + 0.2,
            999_999_999_999.999,
            -51.2,
        ]);
        for v in values.into_iter().filter(|v| v.is_finite()) {
            let abs = v.abs();
            if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
                continue;
            }
            let mut fast = String::new();
            write_plain_float(&mut fast, v);
            assert_eq!(fast, format!("{v}"), "{:#x}", v.to_bits());
        }
    }

    #[test]
    fn timestamps_format_like_prometheus() {
        assert_eq!(ts(1_435_781_451_781), "1435781451.781");
        assert_eq!(ts(1_435_781_451_780), "1435781451.780");
        assert_eq!(ts(1_435_781_451_000), "1435781451");
        assert_eq!(ts(50), "0.050");
        assert_eq!(ts(-1500), "-1.500");
    }

    #[test]
    fn scalars_use_plain_floats() {
        let mut s = String::new();
        write_query_data(&mut s, &QueryValue::Scalar { t: 1_500, v: 1e-7 });
        assert_eq!(s, r#"{"resultType":"scalar","result":[1.5,"0.0000001"]}"#);
    }

    #[test]
    fn strings_escape_like_go() {
        let mut s = String::new();
        write_str(&mut s, "a<b>&\"\\\n\u{1}");
        assert_eq!(s, r#""a\u003cb\u003e\u0026\"\\\n\u0001""#);
        // Copied whole when nothing needs escaping; U+2028 and U+2029 escaped, other
        // characters led by the same byte not.
        let mut s = String::new();
        write_strs(
            &mut s,
            &["plain/path-1", "a\u{2028}b\u{2029}", "€"]
                .into_iter()
                .collect(),
        );
        assert_eq!(s, r#"["plain/path-1","a\u2028b\u2029","€"]"#);
    }
}
