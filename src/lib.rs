//! pensieve: a local LLM server that speaks the Anthropic Messages API on MLX, and never lets a
//! request push the machine into swap or the OOM killer.
//!
//! The public face is the tower layers ([`layers`]), the configuration ([`config`]), the memory
//! sampler and snapshot ([`memory`]) and the backend trait ([`backend`]). [`server::router`]
//! assembles them; `examples/embed_hyper.rs` shows the layers in front of a handler of your own.

#![deny(missing_docs)]

pub mod api;
pub mod backend;
pub mod config;
pub mod layers;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod server;
