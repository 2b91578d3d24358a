//! The tower layers in front of the API, each usable in any hyper or axum app.
//!
//! - [`AdmissionLayer`]: 503 while memory is Critical or Emergency (a [`Gate`](crate::memory::Gate)).
//! - [`PolicyLayer`]: the WASM admission policies' `decide`.
//! - [`MemoryHeadersLayer`]: `x-memory-status`, `x-available-memory-gb` and static headers.
//! - [`ApiKeyLayer`]: optional API keys, compared in constant time.
//! - [`BodyLimitLayer`]: 413 `request_too_large` above a size.
//! - [`LoggingLayer`]: one tracing span per request.
//! - [`MetricsLayer`]: requests by route and status, refusals by who refused.
//! - [`ErrorShapeLayer`]: error responses in the shape of the route's API.
//!
//! Refusals are [`ApiError`](crate::wire::ApiError)s, built without knowing the route. Request
//! ids come from tower-http's `SetRequestIdLayer` with [`MakeRequestId`]. Each layer
//! takes plain values; [`Stack`](crate::stack::Stack) builds the whole `/v1` stack from the
//! configuration (`examples/embed_hyper.rs` puts it in front of a handler of your own).

pub mod admission;
mod auth;
mod body;
mod future;
mod headers;
mod limit;
mod logging;
mod metrics;
#[cfg(feature = "policies")]
mod policy;
mod shape;

use http::{HeaderMap, HeaderValue};

pub use admission::{Admission, AdmissionLayer};
pub use auth::{ApiKey, ApiKeyLayer};
pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use headers::{HeaderMode, MemoryHeaders, MemoryHeadersLayer};
pub use limit::{BodyLimit, BodyLimitLayer, LimitFuture};
pub use logging::{Logging, LoggingLayer};
pub use metrics::{MetricsLayer, RecordMetrics};
#[cfg(feature = "policies")]
pub use policy::{BodyFields, Describe, Policies, PolicyBody, PolicyLayer};
pub use shape::{ErrorShape, ErrorShapeLayer};

use crate::memory::MemorySnapshot;
use crate::wire::{X_AVAILABLE_MEMORY_GB, X_MEMORY_STATUS};

/// How many generations run now, for a policy's `in_flight`.
pub type InFlight = std::sync::Arc<dyn Fn() -> u32 + Send + Sync>;

/// Sets both memory headers from `snapshot`.
pub fn memory_headers(headers: &mut HeaderMap, snapshot: &MemorySnapshot) {
    headers.insert(X_MEMORY_STATUS, HeaderValue::from_static(snapshot.tier.as_str()));
    let gb = format!("{:.2}", snapshot.available_gb());
    headers.insert(
        X_AVAILABLE_MEMORY_GB,
        HeaderValue::from_str(&gb).expect("digits are a valid header"),
    );
}
