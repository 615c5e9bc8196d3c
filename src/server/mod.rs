//! Wiring: builds storage, engine and ingest from the configuration and serves HTTP until
//! shutdown.

pub mod listener;
pub mod tls;

pub use listener::{GrpcConfig, HttpConfig};

use crate::api::{self, AppState};
use crate::config::Config;
use crate::ingest::Ingester;
use crate::promql::Engine;
use crate::storage::embedded::EmbeddedStorage;
use crate::storage::postgres::PostgresStorage;
use crate::storage::DynStorage;
use crate::telemetry::Metrics;
use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Opens the storage the configuration names.
pub async fn open_storage(config: &Config) -> anyhow::Result<DynStorage> {
    let url = config.storage.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let storage = PostgresStorage::connect(url, &config.postgres, &config.retention)
            .await
            .context("cannot open PostgreSQL storage")?;
        for job in storage.jobs() {
            tracing::info!(%job, "TimescaleDB job");
        }
        return Ok(Arc::new(storage));
    }
    if url.contains("://") {
        bail!(
            "unsupported storage {url:?}: give a directory (embedded engine) or a postgres:// URL"
        );
    }
    let storage = EmbeddedStorage::open(
        std::path::Path::new(url),
        &config.embedded,
        &config.retention,
    )
    .context("cannot open the embedded storage")?;
    Ok(Arc::new(storage))
}

/// A server running in the background, for tests and embedding.
pub struct RunningServer {
    /// The HTTP listener (Prometheus API, ingest, health, metrics).
    pub addr: SocketAddr,
    /// The OTLP/gRPC listener, unless disabled.
    pub otlp_grpc_addr: Option<SocketAddr>,
    /// The OTLP/HTTP listener, unless disabled.
    pub otlp_http_addr: Option<SocketAddr>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn bind(address: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))
}

/// Binds `address` and serves `app` there in a background task until shutdown, within the
/// listener limits of `config`.
async fn serve_http(
    address: &str,
    app: axum::Router,
    config: &Config,
    tls: Option<&tls::Tls>,
    stop: &tokio::sync::watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    let listener = bind(address).await?;
    let addr = listener.local_addr()?;
    let acceptor = listener::Acceptor::new(listener, config.http.max_connections);
    tasks.push(tokio::spawn(listener::serve_http(
        acceptor,
        app,
        config.http.clone(),
        tls.map(tls::Tls::http_acceptor),
        stop.clone(),
    )));
    Ok(addr)
}

/// Resolves when `shutdown` turns true.
async fn shutdown_requested(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// How often tokens' last use is written to the catalog.
const LAST_USED_EVERY: Duration = Duration::from_secs(30);

/// Writes tokens' last use to the catalog every [`LAST_USED_EVERY`], and once more at
/// shutdown.
async fn last_used_loop(state: Arc<AppState>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(LAST_USED_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown_requested(stop.clone()) => true,
        };
        if let Err(e) = state.auth.flush_last_used().await {
            tracing::warn!(error = %e, "cannot record when tokens were last used");
        }
        if stopping {
            return;
        }
    }
}

/// Writes the fleet's status series every `--fleet-status-interval-secs`, on the interval's
/// boundaries, until shutdown.
async fn fleet_status_loop(state: Arc<AppState>, stop: tokio::sync::watch::Receiver<bool>) {
    let every_ms = state.fleet.status_interval_secs.max(1) * 1000;
    let mut presence = crate::fleet::status::Presence::default();
    loop {
        let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let wait = every_ms - now % every_ms;
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {}
            _ = shutdown_requested(stop.clone()) => return,
        }
        let now = chrono::Utc::now().timestamp_millis();
        if let Err(e) = crate::fleet::status::write_all(
            state.auth.catalog().as_ref(),
            &state.ingester,
            &state.fleet,
            Some((&state.live, &mut presence)),
            now,
        )
        .await
        {
            tracing::warn!(error = %e, "cannot write the fleet's status series; retrying at the next interval");
        }
    }
}

/// Reads the rule files again on SIGHUP, until shutdown; then stops every group.
async fn rules_loop(state: Arc<AppState>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        tokio::select! {
            _ = async {
                match hangup.as_mut() {
                    Some(signal) => { signal.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                match state.rules.reload(&state, false, crate::rules::Files::Read).await {
                    Ok(groups) => tracing::info!(groups, "rule files reloaded"),
                    Err(e) => tracing::error!(error = %e, "rule files not reloaded"),
                }
            }
            _ = shutdown_requested(stop.clone()) => {
                state.rules.stop();
                return;
            }
        }
    }
}

/// Records the server's own metrics into its own storage every `--self-monitor-interval-secs`,
/// on the interval's boundaries, until shutdown (docs/operations.md, "Self-monitoring").
async fn self_monitor_loop(
    state: Arc<AppState>,
    every_secs: u64,
    tenant: crate::model::TenantId,
    instance: String,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let every_ms = every_secs.max(1) * 1000;
    loop {
        let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let wait = every_ms - now % every_ms;
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {}
            _ = shutdown_requested(stop.clone()) => return,
        }
        // Storage sizes take the engine's locks: off the async threads.
        let observed = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            observed.metrics.observe_storage(observed.storage.as_ref());
        })
        .await;
        state.metrics.live_clients.set(state.live.clients() as i64);
        let now = chrono::Utc::now().timestamp_millis();
        let t_ms = now - now.rem_euclid(every_ms as i64);
        if let Err(e) = crate::telemetry::record::record(
            &state.metrics,
            &state.ingester,
            &tenant,
            &instance,
            t_ms,
        )
        .await
        {
            tracing::warn!(error = %e, "cannot record the server's own metrics; retrying at the next interval");
        }
    }
}

/// Runs the storage's data lifecycle (flush, compaction, retention) every `every` until
/// shutdown; a run in progress finishes first.
async fn maintenance_loop(
    state: Arc<AppState>,
    every: std::time::Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown_requested(stop.clone()) => return,
        }
        if let Err(e) = state.storage.run_maintenance().await {
            tracing::error!(error = %e, "storage maintenance failed; retrying at the next run");
        }
        state.metrics.observe_storage(state.storage.as_ref());
    }
}

/// The addresses the configured listeners name (a host name resolved; one that does not
/// resolve counts as beyond loopback, so `--auth auto` errs towards requiring tokens).
fn listen_addresses(config: &Config) -> Vec<SocketAddr> {
    use std::net::ToSocketAddrs;
    [
        &config.http_listen,
        &config.otlp_grpc_listen,
        &config.otlp_http_listen,
    ]
    .into_iter()
    .filter(|a| !a.is_empty())
    .flat_map(|a| {
        a.to_socket_addrs()
            .map(Iterator::collect::<Vec<_>>)
            .unwrap_or_else(|_| vec![SocketAddr::from(([0, 0, 0, 0], 0))])
    })
    .collect()
}

/// Binds the HTTP listener and serves in a background task.
pub async fn start(config: &Config, storage: DynStorage) -> anyhow::Result<RunningServer> {
    let metrics = Arc::new(Metrics::new());
    let engine_metrics = metrics.clone();
    metrics.observe_storage(storage.as_ref());
    let tls = tls::Tls::load(&config.tls)?;
    let self_monitor_tenant = config
        .self_monitor
        .tenant_id()
        .map_err(anyhow::Error::msg)?;
    let catalog = crate::catalog::open(&config.storage)
        .await
        .context("cannot open the catalog")?;
    if config.auth.mode == crate::auth::AuthMode::Off && !config.auth.trusted_proxies.is_empty() {
        anyhow::bail!("--auth-trusted-proxies needs authentication: drop --auth off");
    }
    let listening = listen_addresses(config);
    let required = config.auth.required(&listening);
    let exposed = listening.iter().any(|a| !a.ip().is_loopback());
    if !required && exposed {
        tracing::warn!(
            "authentication is off (--auth off) while listening beyond loopback: anyone who can reach the server reads and writes every series"
        );
    }
    let body_budget = Arc::new(tokio::sync::Semaphore::new(
        config
            .ingest
            .max_inflight_bytes
            .max(config.ingest.max_request_bytes)
            .min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let live = Arc::new(
        crate::fleet::live::LiveHub::new(
            config.fleet.live_interval,
            config.fleet.live_queue,
            config.fleet.live_max_clients,
        )
        .with_max_series(
            config.fleet.live_max_series as usize,
            metrics.live_dropped_readings.clone(),
        )
        .on_threads(config.fleet.live_threads)
        .map_err(|e| anyhow::anyhow!("cannot start the live feed's threads: {e}"))?,
    );
    let state = Arc::new(AppState {
        auth: Arc::new(
            crate::auth::Authenticator::new(catalog, required, &config.auth)
                .map_err(anyhow::Error::msg)?,
        ),
        auth_config: config.auth.clone(),
        fleet: config.fleet.clone(),
        live: live.clone(),
        opamp_sessions: Arc::default(),
        exposed,
        body_limits: listener::BodyLimits {
            timeout: Duration::from_secs(config.http.body_timeout_secs.max(1)),
            max_bytes: config.ingest.max_request_bytes,
            budget: body_budget.clone(),
        },
        engine: Engine::new(storage.clone(), config.query.clone(), metrics.clone()),
        ingester: Ingester::new(
            storage.clone(),
            metrics.clone(),
            config.ingest.clone(),
            config.retention.raw_days,
        )
        .with_live(live.clone()),
        ingest_config: config.ingest.clone(),
        body_budget,
        otlp_config: config.otlp.clone(),
        otlp_labels: Arc::default(),
        storage,
        metrics,
        started: chrono::Utc::now(),
        rules: Arc::new(
            crate::rules::Manager::new(config.rules.clone(), engine_metrics.clone())
                .map_err(anyhow::Error::msg)?,
        ),
    });
    // Rule files that do not load stop the start, as they stop Prometheus's.
    state
        .rules
        .reload(&state, true, crate::rules::Files::Read)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (shutdown, stop) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    if state.auth.required() {
        tasks.push(tokio::spawn(last_used_loop(state.clone(), stop.clone())));
    }
    if let Some(tls) = &tls {
        tasks.push(tokio::spawn(tls.clone().watch(stop.clone())));
    }
    tasks.push(tokio::spawn(rules_loop(state.clone(), stop.clone())));
    let notifier = state.rules.notifier.clone();
    let notifier_stop = stop.clone();
    tasks.push(tokio::spawn(
        async move { notifier.run(notifier_stop).await },
    ));
    tasks.push(live.spawn(live.clone().run(stop.clone())));
    if !config.fleet.nats_url.is_empty() {
        let client = crate::fleet::nats::connect(&config.fleet.nats_url).await?;
        let (hub, outbound, stop) = (live.clone(), live.bridge(), stop.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::fleet::nats::run(client, hub, outbound, stop).await {
                tracing::error!(error = %e, "the NATS bridge stopped: this node's live feed now works alone");
            }
        }));
    }
    if state.fleet.status_interval_secs > 0 {
        tasks.push(tokio::spawn(fleet_status_loop(state.clone(), stop.clone())));
    }
    if let Some(every) = state.storage.maintenance_interval() {
        tasks.push(tokio::spawn(maintenance_loop(
            state.clone(),
            every,
            stop.clone(),
        )));
    }

    let addr = serve_http(
        &config.http_listen,
        api::router(state.clone()),
        config,
        tls.as_ref(),
        &stop,
        &mut tasks,
    )
    .await?;
    if config.self_monitor.interval_secs > 0 {
        tasks.push(tokio::spawn(self_monitor_loop(
            state.clone(),
            config.self_monitor.interval_secs,
            self_monitor_tenant,
            crate::telemetry::record::instance(addr.port()),
            stop.clone(),
        )));
    }
    let mut otlp_http_addr = None;
    if !config.otlp_http_listen.is_empty() {
        let app = api::otlp_http_router(state.clone());
        otlp_http_addr = Some(
            serve_http(
                &config.otlp_http_listen,
                app,
                config,
                tls.as_ref(),
                &stop,
                &mut tasks,
            )
            .await?,
        );
    }

    let mut otlp_grpc_addr = None;
    if !config.otlp_grpc_listen.is_empty() {
        let listener = bind(&config.otlp_grpc_listen).await?;
        otlp_grpc_addr = Some(listener.local_addr()?);
        let service = api::otlp::grpc::MetricsService::new(state.clone());
        let incoming = listener::Acceptor::new(listener, config.http.max_connections).into_stream(
            Duration::from_secs(config.http.header_timeout_secs.max(1)),
            tls.as_ref().map(tls::Tls::grpc_acceptor),
        );
        let stopped = shutdown_requested(stop.clone());
        let grpc = &config.grpc;
        let builder = tonic::transport::Server::builder()
            .max_concurrent_streams(grpc.max_concurrent_streams.max(1))
            .http2_keepalive_interval(Some(Duration::from_secs(
                grpc.keepalive_interval_secs.max(1),
            )))
            .http2_keepalive_timeout(Some(Duration::from_secs(
                grpc.keepalive_timeout_secs.max(1),
            )))
            .timeout(Duration::from_secs(grpc.request_timeout_secs.max(1)));
        let builder = if grpc.max_connection_age_secs > 0 {
            builder
                .max_connection_age(Duration::from_secs(grpc.max_connection_age_secs))
                .max_connection_age_grace(Duration::from_secs(grpc.request_timeout_secs.max(1)))
        } else {
            builder
        };
        tasks.push(tokio::spawn(async move {
            let mut builder = builder;
            let served = builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped)
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "OTLP/gRPC server failed");
            }
        }));
    }

    Ok(RunningServer {
        addr,
        otlp_grpc_addr,
        otlp_http_addr,
        shutdown,
        tasks,
    })
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let storage = open_storage(&config).await?;
    let server = start(&config, storage).await?;
    tracing::info!(
        addr = %server.addr,
        otlp_grpc = ?server.otlp_grpc_addr,
        otlp_http = ?server.otlp_http_addr,
        storage = %redact(&config.storage),
        "SecuMon listening"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}

/// The storage setting without a password, for logs.
pub fn redact(storage: &str) -> String {
    match (storage.find("://"), storage.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &storage[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    format!("{}{user}:***{}", &storage[..scheme + 3], &storage[at..])
                }
                None => storage.to_owned(),
            }
        }
        _ => storage.to_owned(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_the_logs() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("./data"), "./data");
    }
}
