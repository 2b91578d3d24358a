//! Run with `cargo run --release -p pensieve-layers --example embed_axum -- config/pensieve.toml`, then
//! `curl -i localhost:7879/v1/hello -d '{}'`.
//!
//! An axum app of its own with pensieve's whole `/v1` stack as one `.layer(...)`, built from a
//! configuration file (the first argument, or `PENSIEVE_CONFIG`), policies and their reloading
//! included. The port is `EXAMPLE_PORT` (0 for any free one), 7879 by default.

use std::path::PathBuf;

use axum::routing::post;
use axum::Router;
use pensieve_layers::config::GuardConfig;
use pensieve_layers::guard::Guard;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let file = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("PENSIEVE_CONFIG").ok())
        .map(PathBuf::from);
    let config = GuardConfig::load(file.as_deref())?;
    let guard = Guard::start(&config)?;

    let app = Router::new()
        .route(
            "/v1/hello",
            post(|body: String| async move { format!("hello; you sent {} bytes\n", body.len()) }),
        )
        .layer(guard.stack());

    let port: u16 = std::env::var("EXAMPLE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7879);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
