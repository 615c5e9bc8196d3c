//! Opening a data directory one of whose block files (runs, index, rollups, meta) holds
//! arbitrary bytes, then reading every series and rollup back: never a panic; a damaged block
//! is recovered or set aside.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secumon::model::{Matcher, TenantId};
use secumon::storage::embedded::{EmbeddedConfig, EmbeddedStorage};
use secumon::storage::{DynStorage, Resolution, RetentionConfig, SelectHints, Storage, WriteBatch};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

fn retention() -> RetentionConfig {
    RetentionConfig {
        raw_days: 100_000,
        rollup_5m_days: 100_000,
        rollup_1h_days: 100_000,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A data directory holding one flushed block, made once: (the directory, its block files).
fn template() -> &'static (tempfile::TempDir, Vec<PathBuf>) {
    static TEMPLATE: OnceLock<(tempfile::TempDir, Vec<PathBuf>)> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbeddedConfig {
            out_of_order_window_secs: 1,
            ..EmbeddedConfig::default()
        };
        let storage: DynStorage =
            Arc::new(EmbeddedStorage::open(dir.path(), &config, &retention()).unwrap());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let mut batch = WriteBatch::default();
        for job in ["a", "b", "c"] {
            let samples = (0..200).map(|i| secumon::model::Sample {
                t: now - 7_200_000 + i * 15_000,
                v: i as f64 * 1.5,
            });
            batch.push([("__name__", "m"), ("job", job)].into_iter(), samples);
        }
        let rt = runtime();
        rt.block_on(storage.append_batch(&TenantId::default(), &batch))
            .unwrap();
        rt.block_on(storage.run_maintenance()).unwrap();
        drop(storage);
        let mut files = Vec::new();
        collect(&dir.path().join("blocks"), &mut files);
        files.sort();
        assert!(!files.is_empty(), "no block was flushed");
        (dir, files)
    })
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else if path.file_name().is_some_and(|n| n != "LOCK") {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let (template_dir, files) = template();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(template_dir.path(), dir.path());
    let damaged = &files[usize::from(which) % files.len()];
    let relative = damaged.strip_prefix(template_dir.path()).unwrap();
    std::fs::write(dir.path().join(relative), bytes).unwrap();
    let Ok(storage) = EmbeddedStorage::open(dir.path(), &EmbeddedConfig::default(), &retention())
    else {
        return;
    };
    let rt = runtime();
    let tenant = TenantId::default();
    let matchers = [Matcher::regex("__name__", ".*", false).unwrap()];
    let hints = SelectHints {
        start: i64::MIN,
        end: i64::MAX,
        max_samples: 100_000,
        ..SelectHints::default()
    };
    let _ = rt.block_on(storage.select(&tenant, &matchers, &hints));
    for resolution in [Resolution::FiveMinutes, Resolution::OneHour] {
        let _ = rt.block_on(storage.select_rollups(
            &tenant,
            &matchers,
            resolution,
            i64::MIN / 2,
            i64::MAX / 2,
            secumon::storage::RollupColumns::ALL.into(),
        ));
    }
});
