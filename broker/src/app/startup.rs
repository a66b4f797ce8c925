//! Builds the running application: store, service, gRPC server with health and reflection, the
//! HTTP listener when `[http]` sets one, and graceful shutdown.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokenbroker_proto::v1::token_broker_server::TokenBrokerServer;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::StreamExt as _;
use tonic::transport::{Server, server::Connected as _};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

use super::{
    listener::{ConnectionLimits, ListenerMetrics, plain_incoming},
    settings::{ServerSettings, Settings},
    tls::{GRPC_ALPN, HTTP_ALPN, TlsServer},
};
use crate::{
    domain::{
        Broker, DomainMetrics,
        admission::{AdmissionMetrics, Limiter},
        audit::AuditLog,
    },
    grpc::{
        GrpcAdapter, InFlightLimit, SizeLimited, Traced,
        metered::{MeteredService, RpcMetrics},
    },
    http::{HttpAdapter, Peer, ServeOptions, observe::HttpMetrics},
    identity::{
        Authenticator,
        cognito::{COGNITO_HEALTH_SERVICE, CognitoMetrics, CognitoVerifier},
    },
    model::clock::{Clock, SystemClock},
    obs::metrics::{MetricsServer, Registry},
    store::{
        CachedStore, EmbeddedStore, EmbeddedStoreConfig, FaunaStore, ObservedStore, PostgresStore,
        RotationPolicy, StoreBackend, StoreMetrics, TokenStore,
    },
};

/// A broker bound to its listener, ready to serve.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    adapter: GrpcAdapter,
    max_request_bytes: usize,
    store: Arc<dyn TokenStore>,
    shutdown_grace: Duration,
    cognito: Option<Arc<CognitoVerifier>>,
    rpc_metrics: Arc<RpcMetrics>,
    listener_metrics: Arc<ListenerMetrics>,
    metrics_server: Option<MetricsServer>,
    tls: Option<TlsServer>,
    server: ServerSettings,
    http: Option<HttpListener>,
}

/// The HTTP listener (`[http]`), bound, with its routes.
#[derive(Debug)]
struct HttpListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: axum::Router,
    tls: Option<TlsServer>,
    header_read_timeout: Duration,
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
        // Each layer's metrics, rendered in this order by the endpoint.
        let mut registry = Registry::new();
        let rpc_metrics = registry.register(RpcMetrics::default());
        let store_metrics = registry.register(StoreMetrics::default());
        let cognito_metrics = registry.register(CognitoMetrics::default());
        let domain_metrics = registry.register(DomainMetrics::default());
        let admission_metrics = registry.register(AdmissionMetrics::default());
        let listener_metrics = registry.register(ListenerMetrics::default());
        let http_metrics = registry.register(HttpMetrics::default());
        let audit = AuditLog::open(&settings.audit, Arc::clone(&domain_metrics))
            .context("invalid audit settings")?;
        let mut auth = Authenticator::new(&settings.api_keys)
            .map_err(anyhow::Error::msg)
            .context("invalid api_keys")?
            .with_cert_callers(&settings.cert_callers)
            .map_err(anyhow::Error::msg)
            .context("invalid cert_callers")?;
        // With grpc-web on, browsers reach this listener over HTTP/1.1 as well as HTTP/2.
        let grpc_alpn = if settings.server.grpc_web {
            HTTP_ALPN
        } else {
            GRPC_ALPN
        };
        let tls = settings
            .server
            .tls
            .as_ref()
            .map(|tls| TlsServer::load_with_alpn(tls, grpc_alpn))
            .transpose()
            .context("invalid server.tls")?;
        let cognito = if settings.cognito.is_enabled() {
            let verifier = CognitoVerifier::new(&settings.cognito, Arc::clone(&clock))
                .context("invalid cognito settings")?
                .with_metrics(cognito_metrics);
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
                        max_queued_writes: settings.store.embedded.max_queued_writes,
                    },
                    Arc::clone(&clock),
                )
                .context("failed to open the embedded store")?;
                registry.add(embedded.queue_metrics());
                Arc::new(
                    CachedStore::new(
                        ObservedStore::new(embedded, Arc::clone(&store_metrics), "sqlite"),
                        settings.store.account_cache_capacity,
                    )
                    .with_metrics(Arc::clone(&store_metrics)),
                )
            }
            StoreBackend::Fauna => {
                let fauna = &settings.store.fauna;
                let store = FaunaStore::new(fauna)
                    .context("failed to set up the fauna store")?
                    .with_metrics(Arc::clone(&store_metrics));
                // The limits the schema's functions hold refresh secrets to (RefreshTokens' own).
                let tokens = &settings.tokens;
                store
                    .publish_policy(&RotationPolicy {
                        access_ttl: tokens.access_ttl(),
                        refresh_ttl: tokens.refresh_ttl(),
                        grace: Duration::from_secs(tokens.refresh_grace_seconds),
                        session_ttl: tokens.max_session(),
                        any_client: !tokens.require_client_id,
                    })
                    .await
                    .context("failed to write the broker policy to fauna")?;
                info!(endpoint = %fauna.endpoint, "fauna store configured");
                Arc::new(
                    CachedStore::new(
                        ObservedStore::new(store, Arc::clone(&store_metrics), "fauna"),
                        settings.store.account_cache_capacity,
                    )
                    .with_metrics(Arc::clone(&store_metrics)),
                )
            }
            StoreBackend::Postgres => {
                let store = PostgresStore::connect(&settings.store.postgres, Arc::clone(&clock))
                    .await
                    .context("failed to open the postgres store")?;
                // The account cache is safe on a shared store: accounts are never deleted, so
                // a cached email → account mapping cannot go stale on another replica.
                Arc::new(
                    CachedStore::new(
                        ObservedStore::new(store, Arc::clone(&store_metrics), "postgres"),
                        settings.store.account_cache_capacity,
                    )
                    .with_metrics(Arc::clone(&store_metrics)),
                )
            }
        };
        let mut broker = Broker::new(Arc::clone(&store), settings.tokens.clone(), clock)
            .with_audit(Arc::new(audit))
            .with_metrics(domain_metrics);
        if let Some(verifier) = &cognito {
            broker = broker.with_cognito(Arc::clone(verifier));
        }
        match settings.tokens.replay_key()? {
            Some(key)
                if matches!(
                    settings.store.backend,
                    StoreBackend::Postgres | StoreBackend::Fauna
                ) =>
            {
                info!(
                    key_id = key.id(),
                    backend = ?settings.store.backend,
                    "idempotent replays and rotation successors are kept in the store, sealed"
                );
                broker = broker.with_replay_key(key);
            }
            Some(_) => {
                warn!(
                    backend = ?settings.store.backend,
                    "tokens.replay_key is set, but only the shared stores (postgres, fauna) keep \
                     idempotent replays and rotation successors; the embedded store keeps both \
                     in memory"
                );
            }
            None if settings.store.backend != StoreBackend::Embedded && settings.replicas.0 > 1 => {
                warn!(
                    replicas = settings.replicas.0,
                    backend = ?settings.store.backend,
                    "no tokens.replay_key: each replica replays idempotent IssueTokens calls and \
                     coalesces parallel refreshes of one token from its own memory, so a retry \
                     that reaches another replica mints a second pair, and parallel refreshes \
                     spread over replicas supersede each other's successors; set \
                     tokens.replay_key(_file) to share both through the store"
                );
            }
            None => {}
        }
        let broker = Arc::new(broker);
        let auth = Arc::new(auth);
        let limits =
            Arc::new(Limiter::new(settings.limits.clone()).with_metrics(admission_metrics));
        let request_timeout = Duration::from_secs(settings.server.request_timeout_seconds);
        let http = match settings.http.listen {
            None => None,
            Some(addr) => {
                let adapter = HttpAdapter::new(
                    Arc::clone(&broker),
                    Arc::clone(&auth),
                    Arc::clone(&limits),
                    http_metrics,
                    request_timeout,
                    &settings.http,
                );
                // The same certificate files and reload as the gRPC listener; ALPN offers
                // HTTP/1.1 as well.
                let tls = settings
                    .server
                    .tls
                    .as_ref()
                    .map(|tls| TlsServer::load_with_alpn(tls, HTTP_ALPN))
                    .transpose()
                    .context("invalid server.tls")?;
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("failed to listen on {addr} (http.listen)"))?;
                let local_addr = listener.local_addr().context("listener has no address")?;
                Some(HttpListener {
                    listener,
                    local_addr,
                    router: adapter.router(),
                    tls,
                    header_read_timeout: Duration::from_secs(
                        settings.http.header_read_timeout_seconds,
                    ),
                })
            }
        };
        let adapter = GrpcAdapter::new(broker, auth, Arc::clone(&limits), request_timeout);
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| format!("failed to listen on {}", settings.server.listen))?;
        let local_addr = listener.local_addr().context("listener has no address")?;
        let metrics_server = match settings.metrics.listen {
            Some(addr) => Some(MetricsServer::bind(addr, Arc::new(registry)).await?),
            None => None,
        };
        Ok(Self {
            listener,
            local_addr,
            adapter,
            max_request_bytes: limits.max_request_bytes(),
            store,
            shutdown_grace: Duration::from_secs(settings.server.shutdown_grace_seconds),
            cognito,
            rpc_metrics,
            listener_metrics,
            metrics_server,
            tls,
            server: settings.server,
            http,
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

    /// Returns the HTTP listener's bound address, if `http.listen` is set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|http| http.local_addr)
    }

    /// Returns the metrics listener's bound address, if `metrics.listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(MetricsServer::local_addr)
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
        let limits = &self.server;
        let keepalive = |seconds| Some(Duration::from_secs(seconds));
        let meta_limit = InFlightLimit::new(limits.max_concurrent_health_and_reflection);
        // Outside every service, so a grpc-web call becomes a native one before it is traced,
        // metered, limited and audited (see `grpc::web`); no-ops while grpc-web is off.
        let (cors, grpc_web) = crate::grpc::web::layers(limits.grpc_web.then_some(&limits.cors));
        // tonic leaves hyper's stream limit and its count of locally reset streams unset
        // unless told, so every HTTP/2 limit is set here, explicitly.
        let router = Server::builder()
            // HTTP/1.1 only for grpc-web: without it the listener speaks HTTP/2 alone. hyper
            // then holds HTTP/1.1 requests to a 30 s header read timeout (tonic sets its timer).
            .accept_http1(limits.grpc_web)
            .layer(cors)
            .layer(grpc_web)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_max_pending_accept_reset_streams(Some(limits.max_pending_reset_streams))
            .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
            .http2_keepalive_interval(keepalive(limits.keepalive_interval_seconds))
            .http2_keepalive_timeout(keepalive(limits.keepalive_timeout_seconds))
            // A connection lives this long at most, then is drained with GOAWAY: idle
            // connections cannot be held forever, and clients rebalance across replicas.
            .max_connection_age(Duration::from_secs(limits.max_connection_age_seconds))
            .max_connection_age_grace(self.shutdown_grace)
            .add_service(meta_limit.limit(health))
            .add_service(meta_limit.limit(reflection_v1))
            .add_service(meta_limit.limit(reflection_v1alpha))
            .add_service(Traced::new(MeteredService::new(
                SizeLimited::new(self.adapter, self.max_request_bytes),
                Arc::clone(&self.rpc_metrics),
            )));
        let stopped = async {
            let _ = stopped.await;
        };
        let caps = ConnectionLimits::new(
            limits.max_connections,
            limits.max_tls_handshakes,
            Duration::from_secs(limits.tcp_keepalive_seconds),
            Arc::clone(&self.listener_metrics),
        );
        // The accept loop and the TLS file watcher end with this function, however it returns.
        let mut accept_tasks = AbortOnDrop(Vec::new());
        let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match &self.tls {
                None => {
                    let (incoming, accept) = plain_incoming(self.listener, caps);
                    accept_tasks.0.push(accept);
                    Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
                }
                Some(tls) => {
                    let (incoming, accept) = tls.incoming(self.listener, caps);
                    accept_tasks.0.extend([accept, tls.spawn_reloader()]);
                    Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
                }
            };
        let mut server = tokio::spawn(server);
        let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let http_task = self.http.map(|http| {
            let caps = ConnectionLimits::new(
                limits.max_connections,
                limits.max_tls_handshakes,
                Duration::from_secs(limits.tcp_keepalive_seconds),
                Arc::clone(&self.listener_metrics),
            );
            let options = ServeOptions {
                max_concurrent_streams: limits.max_concurrent_streams,
                max_pending_reset_streams: limits.max_pending_reset_streams,
                max_local_error_reset_streams: limits.max_local_error_reset_streams,
                keepalive_interval: Duration::from_secs(limits.keepalive_interval_seconds),
                keepalive_timeout: Duration::from_secs(limits.keepalive_timeout_seconds),
                header_read_timeout: http.header_read_timeout,
                max_connection_age: Duration::from_secs(limits.max_connection_age_seconds),
                shutdown_grace: self.shutdown_grace,
            };
            let stopped = async {
                let _ = http_stopped.await;
            };
            info!(address = %http.local_addr, tls = http.tls.is_some(), "tokenbroker serving http");
            match &http.tls {
                None => {
                    let (incoming, accept) = plain_incoming(http.listener, caps);
                    accept_tasks.0.push(accept);
                    let incoming = incoming.map(|io| {
                        io.map(|io| {
                            let peer = Peer {
                                addr: io.connect_info().remote_addr(),
                                certificate: None,
                            };
                            (io, peer)
                        })
                    });
                    tokio::spawn(crate::http::serve(incoming, http.router, options, stopped))
                }
                Some(tls) => {
                    let (incoming, accept) = tls.incoming(http.listener, caps);
                    accept_tasks.0.extend([accept, tls.spawn_reloader()]);
                    let incoming = incoming.map(|io| {
                        io.map(|io| {
                            let info = io.connect_info();
                            let peer = Peer {
                                addr: info.get_ref().remote_addr(),
                                certificate: info
                                    .peer_certs()
                                    .and_then(|certs| certs.first().cloned()),
                            };
                            (io, peer)
                        })
                    });
                    tokio::spawn(crate::http::serve(incoming, http.router, options, stopped))
                }
            }
        });
        info!(
            address = %self.local_addr,
            tls = self.tls.is_some(),
            grpc_web = limits.grpc_web,
            client_auth = ?self.tls.as_ref().and_then(TlsServer::client_auth),
            "tokenbroker serving"
        );
        let metrics_task = self.metrics_server.map(|m| tokio::spawn(m.serve()));

        tokio::select! {
            result = &mut server => {
                result.context("server task failed")?.context("server failed")?;
            }
            () = shutdown => {
                info!("shutdown requested; draining in-flight calls");
                set_not_serving(&reporter).await;
                let _ = stop.send(());
                let _ = http_stop.send(());
                match tokio::time::timeout(self.shutdown_grace, &mut server).await {
                    Ok(result) => result.context("server task failed")?.context("server failed")?,
                    Err(_) => {
                        warn!(grace_seconds = self.shutdown_grace.as_secs(), "calls still running after the grace period; stopping anyway");
                        server.abort();
                    }
                }
            }
        }
        if let Some(task) = http_task {
            // It drains its own connections within the grace period.
            let _ = tokio::time::timeout(self.shutdown_grace * 2, task).await;
        }
        if let Some(keeper) = cognito_keeper {
            keeper.abort();
        }
        if let Some(task) = metrics_task {
            task.abort();
        }
        drop(accept_tasks);
        self.store
            .close()
            .await
            .context("failed to flush the store")?;
        info!("tokenbroker stopped");
        Ok(())
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
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
