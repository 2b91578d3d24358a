//! Builds the server around the API and serves it, with graceful shutdown.
//!
//! ```text
//! /v1/*:   the Stack (src/stack.rs), switched by [layers]:
//!          request-id ─ logging ─ propagate request-id ─ metrics ─ catch-panic ─ memory headers
//!            ─ auth ─ body limit ─ WASM policies ─ memory admission ─ handler
//! /health, /health/ready, /health/live, /metrics, anything else:
//!          request-id ─ logging ─ propagate request-id ─ metrics ─ catch-panic ─ handler
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{any, get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::api::{self, AppState};
use crate::backend::{Backend, MlxBackend};
use crate::config::Config;
use crate::guard::Guard;
use crate::layers::{LoggingLayer, MetricsLayer};
use crate::metrics::Metrics;
use crate::stack::{panic_response, PanicResponse, Stack};
use crate::wire::{MakeRequestId, REQUEST_ID};

/// The whole application: routes and layers, ready for `axum::serve`. `stack` is the `/v1`
/// stack of a [`Guard`] (its gate, policies and metrics); the server adds what only it knows
/// (how many generations run, how a Messages body is parsed).
pub fn router(config: &Config, backend: Arc<dyn Backend>, stack: Stack) -> Router {
    let http = stack.http_metrics().cloned().unwrap_or_default();
    let metrics = Arc::new(Metrics::new(http.clone()));
    let policies = stack.policy_engine().cloned();
    let state = AppState {
        backend: backend.clone(),
        gate: stack.gate().clone(),
        queue_timeout: Duration::from_millis(config.backend.queue_timeout_ms),
        policies,
        metrics: metrics.clone(),
        threads: Arc::default(),
        responses: Arc::default(),
    };
    let stack = stack
        .metrics(http.clone())
        .in_flight(Arc::new(move || backend.active_generations()))
        .describe(Arc::new(api::describe));
    let v1 = Router::new()
        .route("/v1/messages", post(api::messages).fallback(api::method_not_allowed))
        .route(
            "/v1/messages/count_tokens",
            post(api::count_tokens).fallback(api::method_not_allowed),
        )
        .route(
            "/v1/chat/completions",
            post(api::openai::chat::completions).fallback(api::method_not_allowed),
        )
        .route(
            "/v1/responses",
            post(api::openai::responses::create).fallback(api::method_not_allowed),
        )
        .route("/v1/models", get(api::list_models).fallback(api::method_not_allowed))
        .route("/v1/models/{id}", get(api::get_model).fallback(api::method_not_allowed))
        .route("/v1/{*rest}", any(api::not_found))
        .layer(stack);
    let plain = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestId))
        .layer(LoggingLayer)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(MetricsLayer::new(http))
        .layer(CatchPanicLayer::custom(panic_response as PanicResponse));
    // `/health` and `/metrics` show paths, models and counts: behind the API keys with
    // `server.protect_health`. Liveness and readiness stay open for probes.
    let mut details = Router::new()
        .route("/health", get(api::health).fallback(api::method_not_allowed))
        .route("/metrics", get(api::metrics).fallback(api::method_not_allowed));
    if config.server.protect_health && !config.server.api_keys.is_empty() {
        details = details.route_layer(crate::layers::ApiKeyLayer::new(config.server.api_keys.clone()));
    }
    let mut open = Router::new()
        .route("/health/ready", get(api::ready).fallback(api::method_not_allowed))
        .route("/health/live", get(api::live).fallback(api::method_not_allowed))
        .merge(details);
    if config.dashboard.enabled {
        api::dashboard::recent::recent().set_capacity(config.dashboard.recent_requests);
        let keys = crate::layers::ApiKeyLayer::new(config.server.api_keys.clone());
        let page = Router::new()
            .route("/", get(api::dashboard::page).fallback(api::method_not_allowed))
            .route(
                "/dashboard",
                get(api::dashboard::page).fallback(api::method_not_allowed),
            )
            .with_state(api::dashboard::Keys(keys.clone()));
        let snapshot = Router::new()
            .route(
                "/dashboard/snapshot",
                get(api::dashboard::snapshot).fallback(api::method_not_allowed),
            )
            .route_layer(keys);
        open = open.merge(page).merge(snapshot);
    }
    Router::new()
        .merge(open)
        .fallback(api::not_found)
        .layer(plain)
        .merge(v1)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            browser::BrowserRules::new(&config.server.host, &config.server.allowed_origins),
            browser::check,
        ))
}

pub mod browser;

/// Why the server could not serve (or stopped with an error); each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The sampler, the policies or their watcher could not start.
    #[error(transparent)]
    Guard(#[from] crate::guard::GuardError),
    /// The backend could not start (no Python environment, a model that does not fit or load).
    #[error(transparent)]
    Backend(#[from] crate::backend::StartError),
    /// Loading the models panicked (the panic is in the log).
    #[error("the model loader panicked")]
    Panicked,
    /// The address cannot be bound.
    #[error("cannot listen on {addr} (server.host, server.port): {source}")]
    Bind {
        /// `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// SIGINT or SIGTERM cannot be listened for.
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        /// Which.
        signal: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("server error: {0}")]
    Serve(#[source] std::io::Error),
}

/// Loads the model, starts the sampler, binds and serves until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    // Memory, policies, the sampler, the gate and the metrics: started once, as an app that
    // embeds the layers starts them.
    let guard = Guard::start(&config.guard())?;
    // The models to preload are checked against memory before a byte of them is read.
    let backend_config = config.clone();
    let backend_gate = guard.gate().clone();
    let backend = tokio::task::spawn_blocking(move || MlxBackend::start(&backend_config, backend_gate))
        .await
        .map_err(|_| ServeError::Panicked)??;
    guard.attach_backend(backend.memory_reporter());
    let backend: Arc<dyn Backend> = Arc::new(backend);
    let app = router(&config, backend, guard.stack());
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    // Armed before we say we serve: a signal sent from then on is never lost.
    let mut signals = Signals::listen()?;
    tracing::info!(%addr, "pensieve is serving");
    if !browser::is_loopback_host(&config.server.host) && config.server.api_keys.is_empty() {
        tracing::warn!(
            host = %config.server.host,
            "bound to an address other machines can reach, with no server.api_keys: anyone who can reach it can use it"
        );
    }
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    // Signals received so far: the first starts the shutdown, the second ends its grace.
    let (received_tx, received) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            signals.next().await;
            received_tx.send_modify(|n| *n += 1);
        }
    });
    let limits = conns::Limits {
        max_connections: config.server.max_connections,
        header_timeout: Duration::from_secs(config.server.header_timeout_secs),
        body_timeout: Duration::from_secs(config.server.body_timeout_secs),
    };
    let (mut first, mut second) = (received.clone(), received);
    let stopping = async move {
        let _ = first.wait_for(|n| *n >= 1).await;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: no new connections; running requests may finish (a second signal stops at once)"
        );
    };
    tokio::select! {
        _ = conns::serve(listener, app, limits, stopping) => {}
        _ = async move {
            let _ = second.wait_for(|n| *n >= 1).await;
            tokio::select! {
                _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; remaining requests are aborted"),
                _ = second.wait_for(|n| *n >= 2) => tracing::warn!("a second signal: remaining requests are aborted"),
            }
            // Running answers end with an error (a stream's `error` event) rather than a cut;
            // a moment for them to reach their clients.
            crate::backend::abort_generations();
            tokio::time::sleep(ABORT_FLUSH).await;
        } => {}
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long answers ended by the shutdown have to send their error before the process exits.
const ABORT_FLUSH: Duration = Duration::from_millis(300);

/// SIGINT and SIGTERM, listened for from the moment [`Signals::listen`] is called (not from
/// the first poll), so that a signal sent right after start-up is not lost.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> Result<Signals, ServeError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind, signal_name| {
                signal(kind).map_err(|source| ServeError::Signal {
                    signal: signal_name,
                    source,
                })
            };
            Ok(Signals {
                int: listen(SignalKind::interrupt(), "SIGINT")?,
                term: listen(SignalKind::terminate(), "SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! { _ = self.int.recv() => {}, _ = self.term.recv() => {} }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

mod conns;

#[cfg(test)]
mod tests;
