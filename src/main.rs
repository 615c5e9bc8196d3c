use clap::Parser;

/// mimalloc: ingest decodes and frees many small strings per request (labels, OTLP
/// attributes); it halves the decode-and-translate time of an OTLP export against the system
/// allocator (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use secumon::config::{Cli, Command};
use secumon::server;
use secumon::storage::postgres::PostgresStorage;
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
        PostgresStorage::connect(&config.storage, &config.postgres)
            .await
            .map(|_| tracing::info!("migrations applied"))
            .map_err(anyhow::Error::from)
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
