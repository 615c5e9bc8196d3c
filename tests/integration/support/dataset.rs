//! A seeded dataset for differential PromQL tests: counters with resets, gauges, classic
//! histograms, summaries, NaN and ±Inf, series that stop with and without staleness markers,
//! sparse series, unicode and escaped label values. The same seed gives the same data.

use secumon_proto::prometheus::{Label, Sample, TimeSeries, WriteRequest};

/// Prometheus's staleness marker.
pub const STALE_NAN: f64 = f64::from_bits(0x7ff0_0000_0000_0002);
/// Scrape interval of the dataset.
pub const INTERVAL_MS: i64 = 15_000;

/// xorshift64*: small, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One series with all its samples, in time order.
pub struct Series {
    pub labels: Vec<(String, String)>,
    pub samples: Vec<(i64, f64)>,
}

fn series(name: &str, labels: &[(&str, &str)]) -> Series {
    let mut all = vec![("__name__".to_owned(), name.to_owned())];
    all.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Series {
        labels: all,
        samples: Vec::new(),
    }
}

/// The dataset: `points` scrapes from `start` (ms) every [`INTERVAL_MS`].
pub fn generate(seed: u64, start: i64, points: usize) -> Vec<Series> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let times: Vec<i64> = (0..points as i64)
        .map(|i| start + i * INTERVAL_MS)
        .collect();

    // Counters with occasional resets.
    for job in ["api", "db"] {
        for instance in ["a:80", "b:80", "c:80"] {
            for code in ["200", "500"] {
                let mut s = series(
                    "test_requests_total",
                    &[("job", job), ("instance", instance), ("code", code)],
                );
                let mut v = rng.below(100) as f64;
                for &t in &times {
                    if rng.below(60) == 0 {
                        v = 0.0;
                    } else {
                        v += rng.below(if code == "200" { 20 } else { 3 }) as f64;
                    }
                    s.samples.push((t, v));
                }
                out.push(s);
            }
        }
    }

    // Gauges: random walks, one with NaN and ±Inf mixed in.
    for room in ["kitchen", "hall", "lab"] {
        let mut s = series("test_temperature_celsius", &[("room", room)]);
        let mut v = 20.0 + rng.f64() * 5.0;
        for &t in &times {
            v += rng.f64() - 0.5;
            let value = if room == "lab" {
                match rng.below(40) {
                    0 => f64::NAN,
                    1 => f64::INFINITY,
                    2 => f64::NEG_INFINITY,
                    _ => v,
                }
            } else {
                v
            };
            s.samples.push((t, (value * 1000.0).round() / 1000.0));
        }
        out.push(s);
    }

    // A classic histogram per job: cumulative buckets, _sum and _count.
    let bounds = ["0.1", "0.5", "1", "+Inf"];
    for job in ["api", "db"] {
        let mut counts = [0.0f64; 4];
        let mut sum = 0.0;
        let mut bucket_series: Vec<Series> = bounds
            .iter()
            .map(|le| series("test_latency_seconds_bucket", &[("job", job), ("le", le)]))
            .collect();
        let mut sum_series = series("test_latency_seconds_sum", &[("job", job)]);
        let mut count_series = series("test_latency_seconds_count", &[("job", job)]);
        for &t in &times {
            for _ in 0..rng.below(10) {
                let observed = rng.f64() * 1.5;
                sum += observed;
                for (i, bound) in [0.1, 0.5, 1.0, f64::INFINITY].iter().enumerate() {
                    if observed <= *bound {
                        counts[i] += 1.0;
                    }
                }
            }
            for (i, s) in bucket_series.iter_mut().enumerate() {
                s.samples.push((t, counts[i]));
            }
            sum_series.samples.push((t, (sum * 1e6).round() / 1e6));
            count_series.samples.push((t, counts[3]));
        }
        out.extend(bucket_series);
        out.push(sum_series);
        out.push(count_series);
    }

    // A summary.
    for quantile in ["0.5", "0.9"] {
        let mut s = series("test_rpc_seconds", &[("quantile", quantile)]);
        for &t in &times {
            s.samples.push((t, (rng.f64() * 100.0).round() / 100.0));
        }
        out.push(s);
    }
    let mut count = series("test_rpc_seconds_count", &[]);
    for (i, &t) in times.iter().enumerate() {
        count.samples.push((t, i as f64 * 3.0));
    }
    out.push(count);

    // Series that stop at two thirds, with and without a staleness marker.
    let stop = points * 2 / 3;
    for (kind, marked) in [("marked", true), ("unmarked", false)] {
        let mut s = series("test_stopping", &[("kind", kind)]);
        for &t in &times[..stop] {
            s.samples.push((t, rng.below(10) as f64));
        }
        if marked {
            s.samples.push((times[stop], STALE_NAN));
        }
        out.push(s);
    }

    // A sparse series: one sample every 10 minutes.
    let mut sparse = series("test_sparse", &[("every", "10m")]);
    for (i, &t) in times.iter().enumerate() {
        if i % 40 == 0 {
            sparse.samples.push((t, i as f64));
        }
    }
    out.push(sparse);

    // Unicode and escaped label values.
    let mut unicode = series(
        "test_unicode",
        &[
            ("name", "héllo wörld ✓"),
            ("path", "a\"b\\c\nd"),
            ("tag", "<&>"),
        ],
    );
    for &t in &times {
        unicode.samples.push((t, 1.0));
    }
    out.push(unicode);
    out
}

/// Remote-write requests carrying the dataset in time order (every series' samples of one
/// slice of time per request), as a receiver that refuses out-of-order data needs.
pub fn requests(series: &[Series], samples_per_series: usize) -> Vec<WriteRequest> {
    let mut requests = Vec::new();
    let mut first_time = i64::MIN;
    let times: Vec<i64> = {
        let mut all: Vec<i64> = series
            .iter()
            .flat_map(|s| s.samples.iter().map(|p| p.0))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    };
    for chunk in times.chunks(samples_per_series.max(1)) {
        let (lo, hi) = (chunk[0], chunk[chunk.len() - 1]);
        if lo <= first_time {
            continue;
        }
        first_time = hi;
        let timeseries = series
            .iter()
            .filter_map(|s| {
                let samples: Vec<Sample> = s
                    .samples
                    .iter()
                    .filter(|p| p.0 >= lo && p.0 <= hi)
                    .map(|&(timestamp, value)| Sample { value, timestamp })
                    .collect();
                (!samples.is_empty()).then(|| TimeSeries {
                    labels: s
                        .labels
                        .iter()
                        .map(|(name, value)| Label {
                            name: name.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                    samples,
                    ..Default::default()
                })
            })
            .collect();
        requests.push(WriteRequest {
            timeseries,
            metadata: vec![],
        });
    }
    requests
}

/// Remote-writes the dataset's requests into SecuMon and into Prometheus, each request to both
/// in turn; either refusing one fails the test.
pub async fn load_into_both(
    secumon: &super::Secumon,
    prometheus: &super::Prometheus,
    requests: Vec<WriteRequest>,
) {
    let http = reqwest::Client::new();
    for request in requests {
        let body = super::remote_write::encode(&request);
        let (status, text) = secumon.write_raw(body.clone()).await;
        assert_eq!(status, 204, "SecuMon refused the dataset: {text}");
        let response = http
            .post(prometheus.url("/api/v1/write"))
            .header("Content-Encoding", "snappy")
            .header("Content-Type", "application/x-protobuf")
            .body(body)
            .send()
            .await
            .expect("remote-write to Prometheus");
        assert_eq!(
            response.status().as_u16(),
            204,
            "Prometheus refused the dataset"
        );
    }
}
