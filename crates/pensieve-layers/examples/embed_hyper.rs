//! Run with `cargo run --release -p pensieve-layers --example embed_hyper -- config/pensieve.toml`,
//! then `curl -i localhost:7878/anything`.
//!
//! A plain hyper server with a handler of its own behind pensieve's whole `/v1` stack, built
//! from a configuration file (the first argument, or `PENSIEVE_CONFIG`; the same `[memory]`,
//! `[server]`, `[layers]` and `[policies]` keys as `config/pensieve.toml`): request ids,
//! logging, memory headers, API keys, the body limit, the WASM policies in `policies.dir`
//! (reloaded when a file changes, with their `classify` hook in the memory sampler) and memory
//! admission, all started by one [`Guard`]. Refusals on `/v1/chat/completions` and
//! `/v1/responses` come in OpenAI's error shape, elsewhere in Anthropic's. No axum router, no
//! model and no Python: the stack is an ordinary tower service from `pensieve-layers` alone.
//! The port is `EXAMPLE_PORT` (0 for any free one), 7878 by default.

use std::convert::Infallible;
use std::path::PathBuf;

use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use pensieve_layers::config::GuardConfig;
use pensieve_layers::guard::Guard;
use pensieve_layers::stack::Body;
use pensieve_layers::wire::{read_body, MaxBody};
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
    let config = GuardConfig::load(file.as_deref())?;
    // The sampler, the policies and their watcher, the gate and the metrics; stopped on drop.
    let guard = Guard::start(&config)?;
    let service = guard.stack().layer(tower::service_fn(handler));

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
