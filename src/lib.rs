//! pensieve: a local LLM server that speaks the Anthropic Messages API on MLX, and never lets a
//! request push the machine into swap or the OOM killer.
//!
//! The public face is the tower layers ([`layers`]), the configuration ([`config`]), the memory
//! sampler, snapshot and gate ([`memory`]) and the backend trait ([`backend`]). [`stack::Stack`]
//! builds the `/v1` layer stack from the configuration, for the server ([`server::router`]) and
//! for an app of your own (`examples/embed_hyper.rs`, `examples/embed_axum.rs`).

#![deny(missing_docs)]

pub mod api;
pub mod backend;
pub mod config;
pub mod layers;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod stack;
