//! Run with `cargo run --release --example embed_axum -- config/pensieve.toml`, then
//! `curl -i localhost:7879/v1/hello -d '{}'`.
//!
//! An axum app of its own with pensieve's whole `/v1` stack as one `.layer(...)`, built from a
//! configuration file (the first argument, or `PENSIEVE_CONFIG`), policies and their reloading
//! included. The port is `EXAMPLE_PORT` (0 for any free one), 7879 by default.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use pensieve::config::{Config, Flags};
use pensieve::memory::{Gate, Hooks, MemorySnapshot, Sampler, SnapshotHandle, SystemProbe, Thresholds};
use pensieve::policy::{PolicyEngine, Watcher};
use pensieve::stack::Stack;

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

    let app = Router::new()
        .route(
            "/v1/hello",
            post(|body: String| async move { format!("hello; you sent {} bytes\n", body.len()) }),
        )
        .layer(Stack::new(&config, gate).policies(policies));

    let port: u16 = std::env::var("EXAMPLE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7879);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
