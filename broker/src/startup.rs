//! Builds the running application: store, service, gRPC server with health and reflection, and
//! graceful shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokenbroker_proto::v1::token_broker_server::TokenBrokerServer;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

use crate::{
    auth::Authenticator,
    clock::{Clock, SystemClock},
    cognito::{COGNITO_HEALTH_SERVICE, CognitoVerifier},
    config::{Settings, StoreBackend},
    grpc::{GrpcAdapter, Traced},
    service::Broker,
    store::{
        CachedStore, EmbeddedStore, EmbeddedStoreConfig, FaunaConfig, FaunaStore, TokenStore,
        TracedStore,
    },
};

/// A broker bound to its listener, ready to serve.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    adapter: GrpcAdapter,
    store: Arc<dyn TokenStore>,
    shutdown_grace: Duration,
    cognito: Option<Arc<CognitoVerifier>>,
}

impl Application {
    /// Opens the store and binds the listener (port 0 picks a free port).
    ///
    /// # Errors
    ///
    /// When the API key table is invalid, the store cannot be opened, or the address cannot be
    /// bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// Like [`Application::build`], with an injected clock (tests move time by hand).
    ///
    /// # Errors
    ///
    /// As [`Application::build`].
    pub async fn build_with_clock(
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let mut auth = Authenticator::new(&settings.api_keys)
            .map_err(anyhow::Error::msg)
            .context("invalid api_keys")?;
        let cognito = if settings.cognito.is_enabled() {
            let verifier = CognitoVerifier::new(&settings.cognito, Arc::clone(&clock))
                .context("invalid cognito settings")?;
            Some(Arc::new(verifier))
        } else {
            None
        };
        if let Some(verifier) = &cognito {
            // Hydrate: load every pool's keys before serving. A pool whose endpoint is down
            // does not stop the start; its keys are fetched in the background and the
            // cognito health service stays NOT_SERVING until they arrive.
            if !verifier.hydrate().await {
                warn!("cognito keys not loaded yet; retrying in the background");
            }
            auth = auth.with_cognito(Arc::clone(verifier));
        }
        let store: Arc<dyn TokenStore> = match settings.store.backend {
            StoreBackend::Embedded => {
                let embedded = EmbeddedStore::open(
                    &EmbeddedStoreConfig {
                        dir: settings.store.embedded.dir.clone(),
                        durability: settings.store.embedded.durability,
                        cleanup_interval: Duration::from_secs(
                            settings.store.embedded.cleanup_interval_seconds,
                        ),
                    },
                    Arc::clone(&clock),
                )
                .context("failed to open the embedded store")?;
                Arc::new(TracedStore::new(
                    CachedStore::new(embedded, settings.store.account_cache_capacity),
                    "sqlite",
                ))
            }
            StoreBackend::Fauna => {
                let fauna = &settings.store.fauna;
                let store = FaunaStore::new(FaunaConfig {
                    endpoint: fauna.endpoint.clone(),
                    secret: fauna.server_key()?,
                    query_timeout: Duration::from_millis(fauna.query_timeout_ms),
                    max_contention_retries: fauna.max_contention_retries,
                    max_attempts: fauna.max_attempts,
                })
                .context("failed to set up the fauna store")?;
                info!(endpoint = %fauna.endpoint, "fauna store configured");
                Arc::new(TracedStore::new(
                    CachedStore::new(store, settings.store.account_cache_capacity),
                    "fauna",
                ))
            }
        };
        let mut broker = Broker::new(Arc::clone(&store), settings.tokens.clone(), clock);
        if let Some(verifier) = &cognito {
            broker = broker.with_cognito(Arc::clone(verifier));
        }
        let broker = Arc::new(broker);
        let adapter = GrpcAdapter::new(
            broker,
            Arc::new(auth),
            Duration::from_secs(settings.server.request_timeout_seconds),
        );
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| format!("failed to listen on {}", settings.server.listen))?;
        let local_addr = listener.local_addr().context("listener has no address")?;
        Ok(Self {
            listener,
            local_addr,
            adapter,
            store,
            shutdown_grace: Duration::from_secs(settings.server.shutdown_grace_seconds),
            cognito,
        })
    }

    /// Returns the bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Returns the bound port.
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// Returns the store (tests inspect it).
    pub fn store(&self) -> Arc<dyn TokenStore> {
        Arc::clone(&self.store)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls finish
    /// (for at most the configured grace) and closes the store.
    ///
    /// # Errors
    ///
    /// When the server fails or the store cannot be flushed.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (reporter, health) = tonic_health::server::health_reporter();
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tokenbroker_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("failed to build reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tokenbroker_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("failed to build reflection v1alpha")?;
        reporter
            .set_serving::<TokenBrokerServer<GrpcAdapter>>()
            .await;
        let mut cognito_keeper = None;
        if let Some(verifier) = &self.cognito {
            let status = if verifier.is_ready() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter
                .set_service_status(COGNITO_HEALTH_SERVICE, status)
                .await;
            if !verifier.is_ready() {
                let keeper = keep_cognito_keys(Arc::clone(verifier), reporter.clone());
                cognito_keeper = Some(tokio::spawn(keeper));
            }
        }

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming =
            tonic::transport::server::TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let server = Server::builder()
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(Traced::new(TokenBrokerServer::new(self.adapter)))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            });
        let mut server = tokio::spawn(server);
        info!(address = %self.local_addr, "tokenbroker serving");

        tokio::select! {
            result = &mut server => {
                result.context("server task failed")?.context("server failed")?;
            }
            () = shutdown => {
                info!("shutdown requested; draining in-flight calls");
                set_not_serving(&reporter).await;
                let _ = stop.send(());
                match tokio::time::timeout(self.shutdown_grace, &mut server).await {
                    Ok(result) => result.context("server task failed")?.context("server failed")?,
                    Err(_) => {
                        warn!(grace_seconds = self.shutdown_grace.as_secs(), "calls still running after the grace period; stopping anyway");
                        server.abort();
                    }
                }
            }
        }
        if let Some(keeper) = cognito_keeper {
            keeper.abort();
        }
        self.store
            .close()
            .await
            .context("failed to flush the store")?;
        info!("tokenbroker stopped");
        Ok(())
    }
}

/// Retries the pools whose keys did not load at start-up, as often as the JWKS cooldown
/// allows, then turns the cognito health service to `SERVING`. It never turns back: the last
/// good keys keep serving through later JWKS outages.
async fn keep_cognito_keys(verifier: Arc<CognitoVerifier>, reporter: HealthReporter) {
    /// How often the keeper looks; the per-URL cooldown decides whether it actually fetches.
    const TICK: Duration = Duration::from_millis(250);
    while !verifier.hydrate().await {
        tokio::time::sleep(TICK).await;
    }
    info!("cognito keys loaded for every pool");
    reporter
        .set_service_status(COGNITO_HEALTH_SERVICE, ServingStatus::Serving)
        .await;
}

async fn set_not_serving(reporter: &HealthReporter) {
    reporter
        .set_not_serving::<TokenBrokerServer<GrpcAdapter>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
