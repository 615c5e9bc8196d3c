//! Wiring: builds storage, engine and ingest from the configuration and serves HTTP until
//! shutdown.

use crate::api::{self, AppState};
use crate::config::Config;
use crate::ingest::Ingester;
use crate::promql::Engine;
use crate::storage::postgres::PostgresStorage;
use crate::storage::DynStorage;
use crate::telemetry::Metrics;
use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Opens the storage the configuration names.
pub async fn open_storage(config: &Config) -> anyhow::Result<DynStorage> {
    let url = config.storage.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let storage = PostgresStorage::connect(url, &config.postgres)
            .await
            .context("cannot open PostgreSQL storage")?;
        return Ok(Arc::new(storage));
    }
    bail!(
        "the embedded storage engine ({url}) is not available yet: pass --storage postgres://user:pass@host:port/db"
    )
}

/// A server running in the background, for tests and embedding.
pub struct RunningServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Binds the HTTP listener and serves in a background task.
pub async fn start(config: &Config, storage: DynStorage) -> anyhow::Result<RunningServer> {
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(AppState {
        engine: Engine::new(storage.clone(), config.query.clone()),
        ingester: Ingester::new(storage.clone(), metrics.clone()),
        ingest_config: config.ingest.clone(),
        storage,
        metrics,
        started: chrono::Utc::now(),
    });
    let listener = tokio::net::TcpListener::bind(&config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let app = api::router(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
    });
    Ok(RunningServer {
        addr,
        shutdown: Some(tx),
        task,
    })
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let storage = open_storage(&config).await?;
    let server = start(&config, storage).await?;
    tracing::info!(addr = %server.addr, storage = %redact(&config.storage), "SecuMon listening");
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
