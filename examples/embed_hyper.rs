//! Run with `cargo run --release --example embed_hyper`, then
//! `curl -i localhost:7878/anything`.
//!
//! A plain hyper server of its own, with its own handler, behind pensieve's layers: request
//! ids, logging, memory headers, API keys, body limit and memory admission. No axum, no model:
//! the layers are ordinary tower layers over `http::Request`/`http::Response`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use pensieve::config::{HeaderMode, MemoryConfig};
use pensieve::layers::{
    AdmissionLayer, ApiKeyLayer, BodyLimitLayer, LoggingLayer, MakeRequestId, MemoryHeadersLayer, REQUEST_ID,
};
use pensieve::memory::{MemorySnapshot, Sampler, SnapshotHandle, SystemProbe, Thresholds};
use tower::ServiceBuilder;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

/// The application's own handler: echoes how much body it got.
async fn handler(req: Request<Limited<Incoming>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(Response::builder()
                .status(413)
                .body(Full::new(Bytes::from("too large")))
                .unwrap())
        }
    };
    Ok(Response::new(Full::new(Bytes::from(format!(
        "hello from my own app; you sent {} bytes\n",
        body.len()
    )))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let memory = MemoryConfig::default();
    let thresholds = Thresholds::from_config(&memory);
    let snapshot = SnapshotHandle::new(MemorySnapshot::unknown());
    let _sampler = Sampler::spawn(
        Box::new(SystemProbe::new()?),
        thresholds,
        Duration::from_millis(memory.sample_interval_ms),
        snapshot.clone(),
        Default::default(),
    )?;
    let service = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestId))
        .layer(LoggingLayer)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(MemoryHeadersLayer::new(
            snapshot.clone(),
            HeaderMode::Always,
            Default::default(),
        ))
        .layer(ApiKeyLayer::new(std::env::var("EXAMPLE_API_KEY").ok()))
        .layer(BodyLimitLayer::new(1 << 20))
        .layer(AdmissionLayer::new(snapshot, thresholds, memory.retry_after_secs))
        .service_fn(handler);
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
