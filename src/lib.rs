//! pensieve: a local LLM server that speaks the Anthropic Messages API on MLX, and never lets a
//! request push the machine into swap or the OOM killer.
//!
//! This crate is the server: the APIs ([`api`]: Anthropic Messages, OpenAI Chat Completions and
//! Responses), the MLX backend and its Python bridge ([`backend`]), the configuration
//! ([`config`]) and the process ([`server`]). The tower layers, the memory sampler and gate, the
//! policy engine, the stack builder and the HTTP seam under both APIs live in the
//! `pensieve-layers` crate (no Python), re-exported here under the same names; an app that
//! embeds the layers depends on that crate alone (`crates/pensieve-layers/examples`).

#![deny(missing_docs)]

pub mod alloc;
pub mod api;
pub mod backend;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod server;

pub use pensieve_layers::{guard, layers, memory, policy, stack, wire};
