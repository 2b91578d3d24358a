//! Reading a request body whole, within the limit the body-limit layer set.

use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::Body;

use super::{ApiError, ErrorKind};

/// A refused body up to this many times the limit is read and discarded before the answer.
pub const DRAIN_FACTOR: u64 = 4;
/// The longest a refused body is read for.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The error for a body over `limit` bytes.
pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorKind::RequestTooLarge,
        format!(
            "request body is larger than the limit of {} bytes (server.max_body_mb)",
            limit
        ),
    )
}

/// The limit of the [`BodyLimit`] a request went through, in its extensions: what a handler
/// (or the policy layer) that reads the body says in its 413.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxBody(pub usize);

/// Reads a whole body. A body over its [`Limited`](http_body_util::Limited) limit is a 413 that names `limit`, answered
/// only once the rest of the body has been read (for at most [`DRAIN_TIMEOUT`]), as the layer
/// does for a declared length: a client still sending when the server closes sees a reset, not
/// the 413.
pub async fn read_body<B>(body: B, limit: Option<MaxBody>) -> Result<Bytes, ApiError>
where
    B: Body,
    B::Error: Into<tower::BoxError>,
{
    use http_body_util::BodyExt;
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(buf.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(data.chunk());
                }
            }
            Some(Err(e)) => {
                let e: tower::BoxError = e.into();
                if !is_over_limit(&*e) {
                    return Err(ApiError::invalid(format!("could not read the request body: {e}")));
                }
                break;
            }
        }
    }
    drop(buf);
    // Past the limit, every frame reads as an error; only the time is bounded.
    let rest = async { while body.frame().await.is_some() {} };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, rest).await;
    Err(match limit {
        Some(MaxBody(limit)) => too_large(limit),
        None => ApiError::new(ErrorKind::RequestTooLarge, "request body is larger than the limit"),
    })
}

fn is_over_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}
