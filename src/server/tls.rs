//! TLS for every listener (HTTP, OTLP/HTTP, OTLP/gRPC) with rustls: one certificate and key
//! from PEM files, read again when either file changes or on SIGHUP (a bad new pair is logged
//! and the old one kept), and optionally client certificates required, verified against a CA.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// TLS settings of the listeners.
#[derive(Clone, Debug, Default, serde::Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain for every listener (HTTP, OTLP/HTTP, OTLP/gRPC); with --tls-key,
    /// the listeners speak only TLS. Read again when it changes or on SIGHUP.
    #[arg(
        id = "tls.cert",
        long = "tls-cert",
        env = "SECUMON_TLS_CERT",
        default_value = ""
    )]
    pub cert: String,
    /// PEM private key of --tls-cert.
    #[arg(
        id = "tls.key",
        long = "tls-key",
        env = "SECUMON_TLS_KEY",
        default_value = ""
    )]
    pub key: String,
    /// PEM CA certificates: when set, clients must present a certificate signed by one of
    /// them (mutual TLS), besides any token.
    #[arg(
        id = "tls.client_ca",
        long = "tls-client-ca",
        env = "SECUMON_TLS_CLIENT_CA",
        default_value = ""
    )]
    pub client_ca: String,
}

/// How often the certificate files are looked at for changes.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// The current certificate, replaced when the files change.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of the pair last loaded.
    loaded: RwLock<Stamps>,
    /// Modification times of a pair that failed to load, so it is reported once while it is
    /// tried again at every look.
    failed: RwLock<Option<Stamps>>,
}

type Stamps = (Option<SystemTime>, Option<SystemTime>);

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_pair(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    use anyhow::Context;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read --tls-cert {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("--tls-cert {}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "--tls-cert {} holds no certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from --tls-key {}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .context("--tls-cert and --tls-key do not make a usable pair")?;
    Ok(Arc::new(certified))
}

/// rustls's ring provider: ring builds with a C compiler alone (aws-lc-rs, which rustls now
/// prefers for its post-quantum key exchange, needs a larger native build), and sqlx's TLS to
/// PostgreSQL uses it too. Deprecated in rustls 0.23.48 only for lacking post-quantum groups.
#[allow(deprecated)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The listeners' TLS, when configured.
#[derive(Clone)]
pub struct Tls {
    reloading: Arc<Reloading>,
    http: Arc<rustls::ServerConfig>,
    grpc: Arc<rustls::ServerConfig>,
}

impl Tls {
    /// `None` without a certificate; an error when only one of cert and key is given or they
    /// cannot be loaded.
    pub fn load(config: &TlsConfig) -> anyhow::Result<Option<Tls>> {
        match (config.cert.is_empty(), config.key.is_empty()) {
            (true, true) => {
                anyhow::ensure!(
                    config.client_ca.is_empty(),
                    "--tls-client-ca needs --tls-cert and --tls-key"
                );
                return Ok(None);
            }
            (false, false) => {}
            _ => anyhow::bail!("give both --tls-cert and --tls-key, or neither"),
        }
        let (cert, key) = (PathBuf::from(&config.cert), PathBuf::from(&config.key));
        let pair = load_pair(&cert, &key)?;
        let reloading = Arc::new(Reloading {
            loaded: RwLock::new((modified(&cert), modified(&key))),
            failed: RwLock::new(None),
            cert,
            key,
            current: RwLock::new(pair),
        });
        let provider = Arc::new(provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = if config.client_ca.is_empty() {
            builder.with_no_client_auth()
        } else {
            use anyhow::Context;
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(&config.client_ca)
                .with_context(|| format!("cannot read --tls-client-ca {}", config.client_ca))?
            {
                roots.add(ca?)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        };
        let server = builder.with_cert_resolver(reloading.clone());
        let mut http = server.clone();
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut grpc = server;
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Tls {
            reloading,
            http: Arc::new(http),
            grpc: Arc::new(grpc),
        }))
    }

    pub fn http_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.http.clone())
    }

    pub fn grpc_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.grpc.clone())
    }

    /// Reads the pair again; on failure the one in use stays (and the failure is logged once
    /// per version of the files).
    pub fn reload(&self) {
        let r = &self.reloading;
        let stamps = (modified(&r.cert), modified(&r.key));
        match load_pair(&r.cert, &r.key) {
            Ok(pair) => {
                *r.current.write().unwrap_or_else(|e| e.into_inner()) = pair;
                *r.loaded.write().unwrap_or_else(|e| e.into_inner()) = stamps;
                *r.failed.write().unwrap_or_else(|e| e.into_inner()) = None;
                tracing::info!(cert = %r.cert.display(), "TLS certificate loaded");
            }
            Err(e) => {
                let mut failed = r.failed.write().unwrap_or_else(|e| e.into_inner());
                if *failed != Some(stamps) {
                    tracing::error!(error = %format!("{e:#}"), "cannot load the new TLS certificate; keeping the one in use");
                    *failed = Some(stamps);
                }
            }
        }
    }

    /// Reloads the pair whenever its files change or the process gets SIGHUP, until `stop`.
    pub async fn watch(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<()>();
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = hup => self.reload(),
                _ = tick.tick() => {
                    let r = &self.reloading;
                    let stamps = (modified(&r.cert), modified(&r.key));
                    if stamps != *r.loaded.read().unwrap_or_else(|e| e.into_inner()) {
                        self.reload();
                    }
                }
            }
        }
    }
}
