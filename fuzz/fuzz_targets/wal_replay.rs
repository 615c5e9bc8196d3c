//! Opening a data directory whose write-ahead log (or checkpoint) holds arbitrary bytes, then
//! reading everything back: never a panic; damage is cut off and reported.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secumon::model::{Matcher, TenantId};
use secumon::storage::embedded::{EmbeddedConfig, EmbeddedStorage};
use secumon::storage::{RetentionConfig, SelectHints, Storage};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    std::fs::create_dir_all(&wal).unwrap();
    let name = if which % 2 == 0 {
        "00000001.wal"
    } else {
        "checkpoint.00000001"
    };
    std::fs::write(wal.join(name), bytes).unwrap();
    let retention = RetentionConfig {
        raw_days: 100_000,
        ..RetentionConfig::default()
    };
    let Ok(storage) = EmbeddedStorage::open(dir.path(), &EmbeddedConfig::default(), &retention)
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let matchers = [Matcher::regex("__name__", ".*", false).unwrap()];
    let hints = SelectHints {
        start: i64::MIN,
        end: i64::MAX,
        max_samples: 100_000,
        ..SelectHints::default()
    };
    let _ = runtime.block_on(storage.select(&TenantId::default(), &matchers, &hints));
});
