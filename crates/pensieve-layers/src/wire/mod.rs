//! The seam every layer and every API shares: typed errors rendered per API ([`Dialect`]),
//! reading a body within its limit, request ids and the header names. It imports nothing else
//! of this crate, so that the layers above it and the server's APIs can all use it without
//! importing each other.

mod body;
mod error;

use http::{HeaderMap, HeaderName, HeaderValue};

pub use body::{read_body, too_large, MaxBody, DRAIN_FACTOR, DRAIN_TIMEOUT};
pub use error::{ApiError, Dialect, ErrorKind, RefusedBy};

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

/// Makes `req_<32 hex digits>` request ids for tower-http's `SetRequestIdLayer`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MakeRequestId;

impl tower_http::request_id::MakeRequestId for MakeRequestId {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<tower_http::request_id::RequestId> {
        let id = format!("req_{}", uuid::Uuid::new_v4().simple());
        Some(tower_http::request_id::RequestId::new(HeaderValue::from_str(&id).ok()?))
    }
}
