//! PromQL text through the whole engine: the length and nesting limits, parsing, planning and
//! evaluation as an instant and a range query over a small fixed dataset, with small sample
//! and time limits. Never a panic, never a stack overflow, never unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secumon::model::TenantId;
use secumon::promql::{Engine, EngineConfig, EvalRange, QueryOptions};
use secumon::storage::embedded::{EmbeddedConfig, EmbeddedStorage};
use secumon::storage::{DynStorage, RetentionConfig, WriteBatch};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const T0: i64 = 1_700_000_000_000;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    engine: Engine,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // libfuzzer-sys's panic hook aborts at once, before the server's own `catch_unwind`
        // around the parser can turn a parser panic into an error; the default hook only
        // prints. A panic that escapes the target still aborts (libfuzzer-sys checks).
        drop(std::panic::take_hook());
        // Multi-threaded as the server's (the embedded engine's writes block in place), with
        // its stacks.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_stack_size(secumon::promql::limits::THREAD_STACK_BYTES)
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let retention = RetentionConfig {
            raw_days: 100_000,
            ..RetentionConfig::default()
        };
        let storage: DynStorage = Arc::new(
            EmbeddedStorage::open(dir.path(), &EmbeddedConfig::default(), &retention).unwrap(),
        );
        let mut batch = WriteBatch::default();
        for (name, job, base) in [
            ("up", "a", 1.0),
            ("up", "b", 0.0),
            ("requests_total", "a", 10.0),
        ] {
            let labels = [("__name__", name), ("job", job), ("le", "0.5")];
            let samples = (0..40).map(|i| secumon::model::Sample {
                t: T0 + i * 15_000,
                v: base + i as f64,
            });
            batch.push(labels.into_iter(), samples);
        }
        let tenant = TenantId::default();
        runtime
            .block_on(storage.append_batch(&tenant, &batch))
            .unwrap();
        let config = EngineConfig {
            max_samples: 20_000,
            timeout_secs: 1,
            ..EngineConfig::default()
        };
        let metrics = Arc::new(secumon::telemetry::Metrics::new());
        Fixture {
            runtime,
            engine: Engine::new(storage, config, metrics),
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let f = fixture();
    let tenant = TenantId::default();
    let options = QueryOptions {
        timeout: Some(Duration::from_millis(200)),
        ..QueryOptions::default()
    };
    let Ok(expr) = f.engine.parse(text) else {
        return;
    };
    let _ = f.runtime.block_on(f.engine.instant_query(
        &tenant,
        expr.clone(),
        T0 + 300_000,
        options.clone(),
    ));
    let range = EvalRange {
        start: T0,
        end: T0 + 600_000,
        step: 15_000,
    };
    let _ = f
        .runtime
        .block_on(f.engine.range_query(&tenant, expr, range, options));
});
