//! The server's errors on the wire: the typed errors of the HTTP seam
//! ([`pensieve_layers::wire`]), and the one place where a backend error becomes one.

use crate::backend::BackendError;
pub use pensieve_layers::wire::{ApiError, Dialect, ErrorKind, RefusedBy};

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::QueueFull { queued } => ApiError::new(
                ErrorKind::RateLimit,
                format!("too many requests: {queued} are already waiting for the model; retry shortly"),
            )
            .retry_after(1),
            BackendError::NotReady => {
                ApiError::new(ErrorKind::Overloaded, "the model is not loaded yet; retry shortly").retry_after(2)
            }
            BackendError::Memory(refusal) => refusal.into(),
            BackendError::TooLarge {
                message,
                fits_later: true,
                retry_after_secs,
            } => ApiError::new(ErrorKind::Overloaded, message).retry_after(retry_after_secs),
            BackendError::TooLarge { message, .. } => ApiError::invalid(message),
            BackendError::Aborted {
                message,
                retry_after_secs,
            } => ApiError::new(ErrorKind::Overloaded, message).retry_after(retry_after_secs),
            BackendError::Generation(msg) => ApiError::new(ErrorKind::Api, format!("generation failed: {msg}")),
            BackendError::InvalidRequest(msg) => ApiError::invalid(msg),
            BackendError::Refused { field, problem } => ApiError::invalid_field(field, problem),
            BackendError::Stopped => ApiError::new(ErrorKind::Overloaded, "the backend has stopped").retry_after(5),
            e @ BackendError::ShuttingDown => ApiError::new(ErrorKind::Overloaded, e.to_string()).retry_after(5),
            e @ BackendError::UnknownModel { .. } => ApiError::new(ErrorKind::NotFound, e.to_string()).param("model"),
            BackendError::LoadRefused {
                message,
                retry_after_secs,
            } => ApiError::new(ErrorKind::Overloaded, message).retry_after(retry_after_secs),
            e @ BackendError::LoadFailed { .. } => ApiError::new(ErrorKind::Api, e.to_string()),
        }
    }
}
