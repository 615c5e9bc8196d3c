use secumon::config::{self, CheckCommand, Command, ConfigError, TokenCommand};
use secumon::server;
use secumon::storage::postgres::{Mode, PostgresStorage};
use std::process::ExitCode;

/// mimalloc: ingest decodes and frees many small strings per request (labels, OTLP
/// attributes); it halves the decode-and-translate time of an OTLP export against the system
/// allocator (see docs/benchmarks.md). The `system-allocator` feature leaves it out, for heap
/// profilers that watch the C allocator (`heaptrack`).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option number for the purge delay (`mi_option_purge_delay` in mimalloc 3's
/// `mimalloc.h`; the Rust bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed memory before returning it to the system.
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Keeps the resident set close to what the server uses (docs/storage.md, "Memory"):
/// - no transparent huge pages: mimalloc marks its arenas MADV_HUGEPAGE, and a 2 MiB page is
///   resident as a whole however little of it is in use (with them the storage benchmark's
///   peak RSS was 1.4x its peak without);
/// - memory freed is returned to the system after 10 ms instead of mimalloc's 1 s (peak RSS
///   287 instead of 327-331 MiB for about 4 % more ingest CPU; purging at once cost 70 %).
///
/// Either is left to mimalloc when its variable (`MIMALLOC_ALLOW_THP`, `MIMALLOC_PURGE_DELAY`
/// or its older name `MIMALLOC_RESET_DELAY`, in any case) is set. Runs before any other thread
/// exists. Returns a warning to log when the kernel refused.
fn tune_allocator() -> Option<String> {
    let set = |name: &str| std::env::vars_os().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut warning = None;
    #[cfg(target_os = "linux")]
    if !set("MIMALLOC_ALLOW_THP") {
        let off: libc::c_ulong = 0;
        // SAFETY: prctl(PR_SET_THP_DISABLE) reads four unsigned long arguments and no memory.
        let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, off, off, off) };
        if r != 0 {
            warning = Some(format!(
                "could not turn transparent huge pages off (prctl: {}); resident memory may be higher",
                std::io::Error::last_os_error()
            ));
        }
    }
    if !set("MIMALLOC_PURGE_DELAY") && !set("MIMALLOC_RESET_DELAY") {
        // SAFETY: no other thread runs yet; the option is read at each later purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    warning
}

fn main() -> ExitCode {
    let allocator_warning = tune_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(secumon::promql::limits::THREAD_STACK_BYTES)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("secumon: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(allocator_warning))
}

async fn run(allocator_warning: Option<String>) -> ExitCode {
    let (command, config) = match config::parse(std::env::args_os()) {
        Ok(parsed) => parsed,
        // --help and --version end here too, with clap's own exit code.
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("secumon: {e}");
            return ExitCode::from(2);
        }
    };
    secumon::telemetry::init_logging(&config.log_level, config.log_format);
    if let Some(warning) = allocator_warning {
        tracing::warn!("{warning}");
    }
    if let Command::Check(CheckCommand::Rules { files }) = &command {
        return check_rules(files, config.rules.max_file_bytes);
    }
    let result = match command {
        Command::Check(_) => Ok(()),
        Command::Migrate => migrate(&config).await,
        Command::Token(action) => token(&config, action).await,
        Command::Serve => server::serve(config).await,
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

/// `secumon check rules`: each file's verdict as `promtool check rules` prints it (its name on
/// stdout, then `  SUCCESS: N rules found` on stdout or `  FAILED:` and every problem on
/// stderr); exit code 1 when a file failed.
fn check_rules(files: &[std::path::PathBuf], max_bytes: u64) -> ExitCode {
    let mut failed = false;
    for file in files {
        let name = file.display().to_string();
        println!("Checking {name}");
        match secumon::rules::read(&name, max_bytes) {
            Ok(groups) => {
                let rules: usize = groups.groups.iter().map(|g| g.rules.len()).sum();
                println!("  SUCCESS: {rules} rules found");
            }
            Err(invalid) => {
                failed = true;
                eprintln!("  FAILED:");
                for problem in &invalid.0 {
                    eprintln!("{name}: {problem}");
                }
            }
        }
        println!();
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
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

/// `secumon token …`: manages the tokens of the catalog of `--storage`.
async fn token(config: &secumon::config::Config, action: TokenCommand) -> anyhow::Result<()> {
    let catalog = secumon::catalog::open(&config.storage).await?;
    match action {
        TokenCommand::Create {
            tenant,
            scopes,
            name,
            expires,
        } => {
            let scopes: secumon::auth::Scopes = scopes.parse().map_err(anyhow::Error::msg)?;
            let lifetime = expires
                .map(|e| {
                    secumon::api::params::parse_duration(&e)
                        .map_err(|m| anyhow::anyhow!("--expires {e:?}: {m}"))
                })
                .transpose()?;
            let (token, record) = secumon::auth::create_token(
                catalog.as_ref(),
                &tenant,
                scopes,
                &name,
                lifetime,
                config.auth.max_tokens_per_tenant,
            )
            .await?;
            eprintln!(
                "token {} of tenant {} ({}) created; it is shown this once:",
                record.id, record.tenant, record.scopes
            );
            println!("{token}");
        }
        TokenCommand::List { tenant } => {
            let tenant = tenant.map(secumon::model::TenantId::new);
            let tokens = catalog.list_tokens(tenant.as_ref()).await?;
            println!("ID\tTENANT\tSCOPES\tNAME\tCREATED\tEXPIRES\tLAST USED");
            let time = |ms: Option<i64>| {
                ms.and_then(chrono::DateTime::from_timestamp_millis)
                    .map_or_else(
                        || "-".to_owned(),
                        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    )
            };
            for t in tokens {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    t.id,
                    t.tenant,
                    t.scopes,
                    t.name,
                    time(Some(t.created_at)),
                    time(t.expires_at),
                    time(t.last_used_at)
                );
            }
        }
        TokenCommand::Revoke { id } => {
            if !catalog.delete_token(&id, None).await? {
                anyhow::bail!("no token with id {id}");
            }
            eprintln!(
                "token {id} revoked; servers that checked it lately accept it for up to --auth-cache-secs more"
            );
        }
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
