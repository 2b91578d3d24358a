//! Tower layers that keep a machine out of swap and the OOM killer, from
//! [pensieve](https://github.com/pensieve-llm/pensieve), a local LLM server, for any hyper or
//! axum app. No Python, no model: this crate is what an app embeds.
//!
//! - [`memory`]: a background sampler (cgroup v1/v2, `/proc/meminfo`, PSI, macOS) that
//!   publishes an immutable snapshot and its tier; the request path only loads it.
//! - [`layers`]: memory admission (503 with `retry-after`), memory headers, API keys, body
//!   limit, logging, metrics and (feature `policies`, on by default) WebAssembly admission
//!   policies run by wasmtime.
//! - [`wire`]: the seam under both APIs: typed refusals, rendered in Anthropic's or OpenAI's
//!   error shape by route; body reading; request ids.
//! - [`stack::Stack`]: the whole `/v1` stack, built from the configuration ([`config`]).
//! - [`guard::Guard`]: what a process starts around the stack (sampler, policies and their
//!   watcher, gate, metrics), once.
//!
//! ```no_run
//! use pensieve_layers::config::GuardConfig;
//! use pensieve_layers::guard::Guard;
//! use pensieve_layers::stack::Body;
//! use tower::Layer;
//!
//! let guard = Guard::start(&GuardConfig::load(None)?)?;
//! let service = guard.stack().layer(tower::service_fn(|_req: http::Request<Body>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("hello")))
//! }));
//! # let _ = service;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod config;
pub mod guard;
pub mod layers;
pub mod memory;
pub mod metrics;
#[cfg(feature = "policies")]
pub mod policy;
pub mod stack;
pub mod wire;
