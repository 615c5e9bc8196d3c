//! OTLP decoding (protobuf and JSON, plain and as gzip would hand it over) and translation to
//! series, within the default limits: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secumon::ingest::otlp::{self, Encoding, LabelCache, OtlpConfig};
use secumon::ingest::IngestConfig;

fuzz_target!(|data: &[u8]| {
    let config = IngestConfig::default();
    let limits = config.limits(30, 1_700_000_000_000);
    let cache = LabelCache::default();
    for encoding in [Encoding::Protobuf, Encoding::Json] {
        if let Ok(request) = otlp::decode(data, encoding) {
            for translate_names in [true, false] {
                let otlp_config = OtlpConfig {
                    translate_names,
                    promote_resource_attributes: vec!["service.name".into()],
                };
                let _ = otlp::to_batch(request.clone(), &otlp_config, &cache, &limits);
            }
        }
    }
    let _ = otlp::decompress(data, Some("gzip"), &config);
});
