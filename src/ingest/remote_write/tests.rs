//! The byte-level reader held to the generated decoder on generated and damaged requests.

use super::*;
use prost::Message;
use secumon_proto::prometheus::{Label as PbLabel, Sample as PbSample, TimeSeries, WriteRequest};

fn series(labels: &[(&str, &str)], samples: &[(i64, f64)]) -> TimeSeries {
    TimeSeries {
        labels: labels
            .iter()
            .map(|(n, v)| PbLabel {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        samples: samples
            .iter()
            .map(|&(timestamp, value)| PbSample { value, timestamp })
            .collect(),
        ..Default::default()
    }
}

fn compress(raw: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new().compress_vec(raw).unwrap()
}

/// Labels as text, fingerprint, (timestamp, value bits) of each sample.
type SeriesSummary = (String, u128, Vec<(i64, u64)>);
/// Series labels, then (labels, value bits, timestamp) of each exemplar.
type ExemplarsSummary = (String, Vec<(String, u64, i64)>);

/// What a batch holds, in a form to compare.
#[derive(Debug, PartialEq)]
struct Summary {
    series: Vec<SeriesSummary>,
    exemplars: Vec<ExemplarsSummary>,
    metadata: Vec<String>,
    rejections: Vec<(&'static str, usize, String)>,
}

fn summary(batch: &Batch) -> Summary {
    Summary {
        series: batch
            .series
            .iter()
            .map(|s| {
                (
                    s.labels.to_string(),
                    s.fingerprint,
                    s.samples.iter().map(|p| (p.t, p.v.to_bits())).collect(),
                )
            })
            .collect(),
        exemplars: batch
            .exemplars
            .iter()
            .map(|w| {
                (
                    w.series.to_string(),
                    w.exemplars
                        .iter()
                        .map(|e| (e.labels.to_string(), e.value.to_bits(), e.t))
                        .collect(),
                )
            })
            .collect(),
        metadata: batch.metadata.iter().map(|m| format!("{m:?}")).collect(),
        rejections: batch
            .rejections
            .iter()
            .map(|r| (r.reason, r.samples, r.message.clone()))
            .collect(),
    }
}

/// The batch a request must give, computed from the generated decoder's structs with the
/// owned label validation: the reference the byte-level reader is held to.
fn expected(request: &WriteRequest) -> Summary {
    let mut out = Summary {
        series: vec![],
        exemplars: vec![],
        metadata: vec![],
        rejections: vec![],
    };
    // Refusals merge by reason, keeping the first message.
    fn reject(out: &mut Summary, reason: &'static str, samples: usize, message: String) {
        match out.rejections.iter_mut().find(|r| r.0 == reason) {
            Some(r) => r.1 += samples,
            None => out.rejections.push((reason, samples, message)),
        }
    }
    for ts in &request.timeseries {
        if !ts.histograms.is_empty() {
            let n = ts.histograms.len();
            reject(
                &mut out,
                "native_histogram_unsupported",
                n,
                format!(
                    "{n} native histogram samples refused: native histograms are not supported yet"
                ),
            );
        }
        let owned = |labels: &[PbLabel]| -> Vec<Label> {
            labels
                .iter()
                .map(|l| Label::new(&l.name, &l.value))
                .collect()
        };
        let labels = match Labels::from_wire(owned(&ts.labels)) {
            Ok(labels) => labels,
            Err(e) => {
                reject(
                    &mut out,
                    e.reason(),
                    ts.samples.len(),
                    format!("series refused: {e}"),
                );
                continue;
            }
        };
        let exemplars: Vec<_> = ts
            .exemplars
            .iter()
            .filter_map(|e| {
                let labels = Labels::exemplar_labels(owned(&e.labels)).ok()?;
                Some((labels.to_string(), e.value.to_bits(), e.timestamp))
            })
            .collect();
        if !exemplars.is_empty() {
            out.exemplars.push((labels.to_string(), exemplars));
        }
        if !ts.samples.is_empty() {
            out.series.push((
                labels.to_string(),
                labels.fingerprint(),
                ts.samples
                    .iter()
                    .map(|s| (s.timestamp, s.value.to_bits()))
                    .collect(),
            ));
        }
    }
    out.metadata = request
        .metadata
        .iter()
        .filter(|m| !m.metric_family_name.is_empty())
        .map(|m| {
            format!(
                "{:?}",
                MetricMetadata {
                    metric_type: metric_type(m.r#type),
                    metric_family_name: m.metric_family_name.clone(),
                    help: m.help.clone(),
                    unit: m.unit.clone(),
                }
            )
        })
        .collect();
    out
}

/// A small deterministic generator (xorshift64*), enough to vary requests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const NAMES: &[&str] = &[
    "job", "instance", "le", "a", "zone", "__name__", "bad-name", "0x", "ünï", "",
];
const VALUES: &[&str] = &[
    "",
    "node",
    "1.5",
    "+Inf",
    "ütf8 ✓",
    "a\"b",
    "x\ny",
    "up",
    "1up",
    "job:rate5m",
];

fn random_request(rng: &mut Rng) -> WriteRequest {
    let mut request = WriteRequest::default();
    for _ in 0..rng.below(6) {
        let mut ts = TimeSeries::default();
        let n = rng.below(6);
        if rng.below(10) > 0 {
            ts.labels.push(PbLabel {
                name: "__name__".into(),
                value: rng
                    .pick(&["up", "http_requests_total", "", "1up", "a:b"])
                    .into(),
            });
        }
        for _ in 0..n {
            ts.labels.push(PbLabel {
                name: rng.pick(NAMES).into(),
                value: rng.pick(VALUES).into(),
            });
        }
        if rng.below(3) == 0 {
            let k = rng.below(ts.labels.len() + 1).min(ts.labels.len());
            ts.labels.rotate_left(k);
        }
        for _ in 0..rng.below(4) {
            let bits = match rng.below(4) {
                0 => f64::NAN.to_bits(),
                1 => 0x7ff0_0000_0000_0002, // a staleness marker
                _ => rng.next(),
            };
            ts.samples.push(PbSample {
                value: f64::from_bits(bits),
                timestamp: rng.next() as i64 >> rng.below(64),
            });
        }
        if rng.below(5) == 0 {
            ts.exemplars.push(pb::Exemplar {
                labels: vec![PbLabel {
                    name: rng.pick(&["trace_id", "bad-name", ""]).into(),
                    value: rng.pick(VALUES).into(),
                }],
                value: 1.5,
                timestamp: 7,
            });
        }
        if rng.below(8) == 0 {
            ts.histograms.push(pb::Histogram {
                sum: 2.0,
                ..Default::default()
            });
        }
        request.timeseries.push(ts);
    }
    if rng.below(4) == 0 {
        request.metadata.push(pb::MetricMetadata {
            r#type: rng.below(9) as i32,
            metric_family_name: rng.pick(&["up", ""]).into(),
            help: "help".into(),
            unit: "".into(),
        });
    }
    request
}

#[test]
fn decodes_a_valid_request() {
    let request = WriteRequest {
        timeseries: vec![series(&[("__name__", "up"), ("job", "a")], &[(1000, 1.0)])],
        metadata: vec![],
    };
    let batch = decode(
        &compress(&request.encode_to_vec()),
        &IngestConfig::default(),
        &RequestLimits::NONE,
    )
    .unwrap();
    let up = batch.series.iter().next().unwrap();
    assert_eq!(up.labels.to_string(), r#"{__name__="up", job="a"}"#);
    assert_eq!(up.samples, [Sample { t: 1000, v: 1.0 }]);
    assert_eq!(summary(&batch), expected(&request));
}

#[test]
fn reads_every_generated_request_as_the_generated_decoder_does() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let request = random_request(&mut rng);
        let raw = request.encode_to_vec();
        let batch = read_request(&raw, &RequestLimits::NONE).unwrap();
        assert_eq!(summary(&batch), expected(&request), "{request:?}");
    }
}

/// Bytes of an unknown field of every wire type, a group with a nested group among them.
fn unknown_fields() -> Vec<u8> {
    let mut out = vec![];
    out.extend([9 << 3, 0x96, 0x01]); // varint
    out.extend([(10 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]); // i64
    out.extend([(11 << 3) | 2, 2, b'h', b'i']); // len
    out.extend([(12 << 3) | 5, 1, 2, 3, 4]); // i32
    out.extend([
        (13 << 3) | 3,
        (14 << 3) | 3,
        8,
        1,
        (14 << 3) | 4,
        (13 << 3) | 4,
    ]); // groups
    out
}

#[test]
fn skips_unknown_fields_and_takes_fields_in_any_order() {
    // A label with its value first and an unknown field between; a series with its samples
    // before its labels; a sample with its timestamp first and the value given twice
    // (the last wins, as protobuf merges scalars).
    let mut label = vec![(2 << 3) | 2, 1, b'a'];
    label.extend(unknown_fields());
    label.extend([(1 << 3) | 2, 3, b'j', b'o', b'b']);
    let mut sample = vec![2 << 3, 5, (1 << 3) | 1];
    sample.extend(1.0f64.to_le_bytes());
    sample.push((1 << 3) | 1);
    sample.extend(2.5f64.to_le_bytes());
    let name = PbLabel {
        name: "__name__".into(),
        value: "up".into(),
    }
    .encode_to_vec();
    let mut ts = vec![(2 << 3) | 2, sample.len() as u8];
    ts.extend(&sample);
    ts.extend(unknown_fields());
    ts.extend([(1 << 3) | 2, label.len() as u8]);
    ts.extend(&label);
    ts.extend([(1 << 3) | 2, name.len() as u8]);
    ts.extend(&name);
    let mut raw = unknown_fields();
    raw.extend([(1 << 3) | 2, ts.len() as u8]);
    raw.extend(&ts);
    raw.extend([2 << 3, 1]); // the reserved field 2
    let reference = WriteRequest::decode(raw.as_slice()).unwrap();
    let batch = read_request(&raw, &RequestLimits::NONE).unwrap();
    assert_eq!(summary(&batch), expected(&reference));
    let up = batch.series.iter().next().unwrap();
    assert_eq!(up.labels.to_string(), r#"{__name__="up", job="a"}"#);
    assert_eq!(up.samples, [Sample { t: 5, v: 2.5 }]);
}

#[test]
fn refuses_what_the_generated_decoder_refuses() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let (mut refused, mut read) = (0, 0);
    for _ in 0..20_000 {
        let mut raw = random_request(&mut rng).encode_to_vec();
        if raw.is_empty() {
            continue;
        }
        match rng.below(4) {
            0 => raw.truncate(rng.below(raw.len())),
            1 => {
                let i = rng.below(raw.len());
                raw[i] ^= 1 << rng.below(8);
            }
            2 => {
                let i = rng.below(raw.len());
                raw[i] = rng.next() as u8;
            }
            _ => {
                let i = rng.below(raw.len());
                raw.insert(i, rng.next() as u8);
            }
        }
        let reference = WriteRequest::decode(raw.as_slice());
        let ours = read_request(&raw, &RequestLimits::NONE);
        match (&reference, &ours) {
            (Ok(request), Ok(batch)) => {
                read += 1;
                assert_eq!(summary(batch), expected(request), "{raw:?}");
            }
            (Err(_), Err(DecodeError::Protobuf(_))) => refused += 1,
            _ => panic!(
                "{raw:?}: generated decoder {reference:?}, ours {:?}",
                ours.map(|b| summary(&b))
            ),
        }
    }
    assert!(
        refused > 1000 && read > 1000,
        "refused {refused}, read {read}"
    );
}

#[test]
fn refuses_malformed_bodies() {
    let config = IngestConfig::default();
    assert_eq!(
        decode(b"", &config, &RequestLimits::NONE).unwrap_err(),
        DecodeError::Empty
    );
    assert!(matches!(
        decode(b"\xff\xff\xff\xff\xff\xff", &config, &RequestLimits::NONE),
        Err(DecodeError::Snappy(_))
    ));
    assert!(matches!(
        decode(
            &compress(b"\x0a\xff\xff\xff"),
            &config,
            &RequestLimits::NONE
        ),
        Err(DecodeError::Protobuf(_))
    ));
    // An empty request is well formed: nothing to store, nothing refused.
    let empty = decode(
        &compress(&WriteRequest::default().encode_to_vec()),
        &config,
        &RequestLimits::NONE,
    )
    .unwrap();
    assert!(empty.series.is_empty() && empty.rejections.is_empty() && empty.metadata.is_empty());
    // A length past the end; a label value that is not UTF-8.
    let raw = [0x0a, 0x07, 0x0a, 0x05, 0x0a, 0x01, b'a', 0x12, 0x7f];
    assert!(WriteRequest::decode(&raw[..]).is_err());
    assert_eq!(
        read_request(&raw, &RequestLimits::NONE).unwrap_err(),
        DecodeError::Protobuf("truncated: 127 bytes announced, 0 left".into())
    );
    let raw = [0x0a, 0x08, 0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, 0xff];
    assert!(WriteRequest::decode(&raw[..]).is_err());
    assert_eq!(
        read_request(&raw, &RequestLimits::NONE).unwrap_err(),
        DecodeError::Protobuf("invalid string value: data is not UTF-8 encoded".into())
    );
}

#[test]
fn refuses_a_snappy_bomb_before_inflating_it() {
    let config = IngestConfig {
        max_decompressed_bytes: 1024,
        ..IngestConfig::default()
    };
    let bomb = snap::raw::Encoder::new()
        .compress_vec(&vec![0u8; 1 << 20])
        .unwrap();
    assert!(bomb.len() < 64 * 1024);
    assert_eq!(
        decode(&bomb, &config, &RequestLimits::NONE).unwrap_err(),
        DecodeError::DecompressedTooLarge {
            size: 1 << 20,
            limit: 1024
        }
    );
}

#[test]
fn keeps_valid_series_and_reports_invalid_ones() {
    let request = WriteRequest {
        timeseries: vec![
            series(&[("job", "a"), ("__name__", "up")], &[(1, 1.0)]),
            series(
                &[("__name__", "up"), ("a", "1"), ("a", "2")],
                &[(1, 1.0), (2, 2.0)],
            ),
            series(&[("__name__", "up"), ("bad-name", "1")], &[(1, 1.0)]),
            series(&[("job", "a"), ("__name__", "up")], &[(2, 2.0)]),
        ],
        metadata: vec![],
    };
    let batch = read_request(&request.encode_to_vec(), &RequestLimits::NONE).unwrap();
    let kept: Vec<_> = batch
        .series
        .iter()
        .map(|s| (s.labels.to_string(), s.samples.len()))
        .collect();
    let up = r#"{__name__="up", job="a"}"#.to_string();
    assert_eq!(
        kept,
        [(up.clone(), 1), (up, 1)],
        "a repeated series stays two entries"
    );
    let reasons: Vec<_> = batch
        .rejections
        .iter()
        .map(|r| (r.reason, r.samples))
        .collect();
    assert_eq!(
        reasons,
        [("duplicate_label_name", 2), ("invalid_label_name", 1)]
    );
}

#[test]
fn exemplars_past_the_per_series_limit_are_dropped_and_counted_not_refused() {
    let mut ts = series(&[("__name__", "up")], &[(1000, 1.0)]);
    ts.exemplars = (0..5)
        .map(|i| pb::Exemplar {
            labels: vec![PbLabel {
                name: "trace_id".into(),
                value: format!("t{i}"),
            }],
            value: 1.0,
            timestamp: 1000 + i,
        })
        .collect();
    let request = WriteRequest {
        timeseries: vec![ts],
        metadata: vec![],
    };
    let limits = RequestLimits {
        max_exemplars_per_series: 2,
        ..RequestLimits::NONE
    };
    let batch = read_request(&request.encode_to_vec(), &limits).unwrap();
    assert_eq!(batch.dropped_exemplars, 3);
    assert_eq!(batch.exemplars[0].exemplars.len(), 2);
    assert!(batch.rejections.is_empty(), "{:?}", batch.rejections);
    assert_eq!(batch.series.sample_count(), 1);
}
