use clap::Parser;

/// mimalloc: ingest decodes and frees many small strings per request (labels, OTLP
/// attributes); it halves the decode-and-translate time of an OTLP export against the system
/// allocator (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use secumon::config::{Cli, Command};
use secumon::server;
use secumon::storage::postgres::{Mode, PostgresStorage};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
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
