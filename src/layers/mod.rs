//! The tower layers in front of the API, each usable in any hyper or axum app.
//!
//! - [`AdmissionLayer`]: 503 while memory is Critical or Emergency (a [`Gate`](crate::memory::Gate)).
//! - [`PolicyLayer`]: the WASM admission policies' `decide`.
//! - [`MemoryHeadersLayer`]: `x-memory-status`, `x-available-memory-gb` and static headers.
//! - [`ApiKeyLayer`]: optional API keys, compared in constant time.
//! - [`BodyLimitLayer`]: 413 `request_too_large` above a size.
//! - [`LoggingLayer`]: one tracing span per request.
//! - [`MetricsLayer`]: requests by route and status, refusals by who refused.
//!
//! Request ids come from tower-http's `SetRequestIdLayer` with [`MakeRequestId`]. Each layer
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
mod policy;

use http::{HeaderMap, HeaderName, HeaderValue};

pub use admission::{Admission, AdmissionLayer};
pub use auth::{ApiKey, ApiKeyLayer};
pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use headers::{HeaderMode, MemoryHeaders, MemoryHeadersLayer};
pub use limit::{read_body, too_large, BodyLimit, BodyLimitLayer, LimitFuture, MaxBody, DRAIN_FACTOR, DRAIN_TIMEOUT};
pub use logging::{Logging, LoggingLayer};
pub use metrics::{MetricsLayer, RecordMetrics};
pub use policy::{InFlight, ParsedMessages, Policies, PolicyBody, PolicyLayer};

use crate::memory::MemorySnapshot;

/// `request-id`, as Anthropic names it.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
/// `x-memory-status`: Safe, Warning, Critical or Emergency.
pub const X_MEMORY_STATUS: HeaderName = HeaderName::from_static("x-memory-status");
/// `x-available-memory-gb`, two decimals.
pub const X_AVAILABLE_MEMORY_GB: HeaderName = HeaderName::from_static("x-available-memory-gb");
/// `x-api-key`
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The request id of a request, once `SetRequestIdLayer` has set it.
pub fn request_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(REQUEST_ID).and_then(|v| v.to_str().ok())
}

/// Sets both memory headers from `snapshot`.
pub fn memory_headers(headers: &mut HeaderMap, snapshot: &MemorySnapshot) {
    headers.insert(X_MEMORY_STATUS, HeaderValue::from_static(snapshot.tier.as_str()));
    let gb = format!("{:.2}", snapshot.available_gb());
    headers.insert(
        X_AVAILABLE_MEMORY_GB,
        HeaderValue::from_str(&gb).expect("digits are a valid header"),
    );
}

/// Makes `req_<32 hex digits>` request ids for tower-http's `SetRequestIdLayer`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MakeRequestId;

impl tower_http::request_id::MakeRequestId for MakeRequestId {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<tower_http::request_id::RequestId> {
        let id = format!("req_{}", uuid::Uuid::new_v4().simple());
        Some(tower_http::request_id::RequestId::new(HeaderValue::from_str(&id).ok()?))
    }
}
