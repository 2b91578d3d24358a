//! WebAssembly admission policies: components dropped into `policies/` that classify memory
//! samples and decide on requests.
//!
//! Each policy is compiled once ([`Component`] then an `InstancePre`); calls run on configured
//! instances kept in a small pool, because a fresh `Store` with a WASI context, instantiation
//! and `configure` cost tens of microseconds, far more than `decide` itself. Every call has an
//! epoch deadline (`policies.timeout_ms`) and a memory cap (`policies.memory_limit_mb`); an
//! instance that traps, runs out of time or memory is dropped, never reused. WASI-importing
//! components get a context that grants nothing; what they print goes to the log.
//!
//! The interface is `policies/wit/policy.wit`; `policies/README.md` explains how to write one.

mod bindings;
mod engine;
mod watch;

pub use bindings::{Memory, Rejection, Request, Tier as WitTier, Verdict};
pub use engine::{
    host_tier, memory_record, wit_tier, Decision, EngineError, PolicyEngine, PolicyFailure, PolicyStatus,
};
pub use watch::Watcher;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
