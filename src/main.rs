use clap::Parser;

/// mimalloc: ingest decodes and frees many small strings per request (labels, OTLP
/// attributes); it halves the decode-and-translate time of an OTLP export against the system
/// allocator (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option number for the purge delay (`mi_option_purge_delay` in mimalloc 3's
/// `mimalloc.h`; the Rust bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the resident set close to what the server uses (docs/storage.md, "Memory"):
/// - no transparent huge pages: mimalloc marks its arenas MADV_HUGEPAGE, and a 2 MiB page is
///   resident as a whole however little of it is in use (with them the storage benchmark's
///   peak RSS was 1.4x its peak without);
/// - memory freed is returned to the system at once rather than after a delay (another
///   ~15 % off the peak, at no measurable CPU cost).
///
/// Either is left to the operator when `MIMALLOC_ALLOW_THP` or `MIMALLOC_PURGE_DELAY` is set.
fn tune_allocator() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is allowed at any time; it applies to later purges.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}
use secumon::config::{Cli, Command};
use secumon::server;
use secumon::storage::postgres::{Mode, PostgresStorage};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let (migrate_only, args) = match cli.command {
        Some(Command::Migrate(args)) => (true, args),
        Some(Command::Serve(args)) => (false, args),
        None => (false, cli.serve),
    };
    let config = match args.load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("secumon: {e}");
            return ExitCode::from(2);
        }
    };
    secumon::telemetry::init_logging(&config.log_level, config.log_format);
    let result = if migrate_only {
        migrate(&config).await
    } else {
        server::serve(config).await
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("secumon: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `secumon migrate`: applies migrations and sets up the data lifecycle, then prints what the
/// database runs (TimescaleDB's jobs, or the server-run lifecycle of plain PostgreSQL).
async fn migrate(config: &secumon::config::Config) -> anyhow::Result<()> {
    let storage =
        PostgresStorage::connect(&config.storage, &config.postgres, &config.retention).await?;
    match storage.mode() {
        Mode::TimescaleDb => {
            println!("TimescaleDB: samples is a hypertable; samples_5m and samples_1h are continuous aggregates");
            for job in storage.jobs() {
                println!("{job}");
            }
        }
        Mode::Plain => println!(
            "plain PostgreSQL: the server creates and drops samples partitions and maintains \
             samples_5m and samples_1h every {} s (retention {} / {} / {} days)",
            config.postgres.lifecycle_interval_secs,
            config.retention.raw_days,
            config.retention.rollup_5m_days,
            config.retention.rollup_1h_days
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The option number is mimalloc 3's purge delay: its documented default is 1000 ms, and
    /// the next option is the one the bindings name `mi_option_use_numa_nodes`.
    #[test]
    fn the_purge_delay_option_number_is_mimallocs() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reading an option.
            let delay = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
            assert_eq!(delay, 1000);
        }
        assert_eq!(
            libmimalloc_sys::mi_option_use_numa_nodes,
            super::MI_OPTION_PURGE_DELAY + 1
        );
    }
}
