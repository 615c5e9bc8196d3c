//! `secumon-agent`: the native host agent. It reads the host every interval, writes the
//! reading to its on-disk queue, and sends the queue in order to the server as OTLP.
//! See docs/agent.md.

mod collect;
mod config;
mod export;
mod names;
mod opamp;
mod otlp;
mod queue;
mod run;

use std::process::ExitCode;

fn main() -> ExitCode {
    let invocation = match config::parse(std::env::args_os()) {
        Ok(invocation) => invocation,
        Err(config::ConfigError::Args(e)) => e.exit(),
        Err(e) => {
            eprintln!("secumon-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&invocation.config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if invocation.once {
        return match run::once(&invocation.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("secumon-agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // One thread: the agent's work is a few file reads and one request per interval, and a
    // single-threaded runtime keeps its memory small (blocking reads go to tokio's pool).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("secumon-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(invocation.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
