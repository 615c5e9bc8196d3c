//! Remote-write decoding of arbitrary protobuf bytes (snappy-framed here, so the fuzzer works
//! on the message), within small limits: never a panic, and what is accepted stays within the
//! limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secumon::ingest::{remote_write, IngestConfig};

fuzz_target!(|data: &[u8]| {
    let config = IngestConfig::default();
    let limits = config.limits(30, 1_700_000_000_000);
    let body = snap::raw::Encoder::new()
        .compress_vec(data)
        .expect("compressible");
    if let Ok(batch) = remote_write::decode(&body, &config, &limits) {
        assert!(batch.series.len() <= limits.max_series);
        for series in batch.series.iter() {
            assert!(series
                .samples
                .iter()
                .all(|s| limits.refuse_time(s.t).is_none()));
        }
    }
    // The raw bytes as a body too: snappy's own framing under attack.
    let _ = remote_write::decode(data, &config, &limits);
});
