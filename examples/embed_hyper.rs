//! Run with `cargo run --release --example embed_hyper -- config/pensieve.toml`, then
//! `curl -i localhost:7878/anything`.
//!
//! A plain hyper server with a handler of its own behind pensieve's whole `/v1` stack, built
//! from a configuration file (the first argument, or `PENSIEVE_CONFIG`; the same `[memory]`,
//! `[server]`, `[layers]` and `[policies]` keys as `config/pensieve.toml`): request ids,
//! logging, memory headers, API keys, the body limit, the WASM policies in `policies.dir`
//! (reloaded when a file changes, with their `classify` hook in the memory sampler) and memory
//! admission. No axum router and no model: the stack is an ordinary tower service. The port
//! is `EXAMPLE_PORT` (0 for any free one), 7878 by default.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use pensieve::config::{Config, Flags};
use pensieve::layers::{read_body, MaxBody};
use pensieve::memory::{Gate, Hooks, MemorySnapshot, Sampler, SnapshotHandle, SystemProbe, Thresholds};
use pensieve::policy::{PolicyEngine, Watcher};
use pensieve::stack::{Body, Stack};
use tower::Layer;

/// The application's own handler: says how much body it got.
async fn handler(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let limit = req.extensions().get::<MaxBody>().copied();
    Ok(match read_body(req.into_body(), limit).await {
        Ok(body) => Response::new(Body::from(format!(
            "hello from my own app; you sent {} bytes\n",
            body.len()
        ))),
        Err(e) => e.to_response(None),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let file = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("PENSIEVE_CONFIG").ok())
        .map(PathBuf::from);
    let config = Config::load(file.as_deref(), &Flags::default())?;

    let thresholds = Thresholds::from_config(&config.memory);
    let snapshot = SnapshotHandle::new(MemorySnapshot::unknown());
    let policies = Arc::new(PolicyEngine::new(&config.policies)?);
    policies.load_dir();
    let _watcher = Watcher::spawn(policies.clone())?;
    let hooks = Hooks {
        backend: None,
        proposer: Some(policies.clone()),
    };
    let interval = Duration::from_millis(config.memory.sample_interval_ms);
    let _sampler = Sampler::spawn(
        Box::new(SystemProbe::new()?),
        thresholds,
        interval,
        snapshot.clone(),
        hooks,
    )?;
    let gate = Gate::new(snapshot, thresholds, config.memory.retry_after_secs);
    let service = Stack::new(&config, gate)
        .policies(policies)
        .layer(tower::service_fn(handler));

    let port: u16 = std::env::var("EXAMPLE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7878);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            if let Err(e) = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}
