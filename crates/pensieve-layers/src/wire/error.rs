//! Every error the server answers, and the one place where each becomes HTTP.
//!
//! An [`ApiError`] is typed: a kind, a message, the field it is about (`param`), who refused.
//! It is rendered in the wire shape of the API the request was for ([`Dialect`]):
//! - Anthropic: `{"type": "error", "error": {"type": "invalid_request_error", "message": "…"},
//!   "request_id": "…"}`;
//! - OpenAI: `{"error": {"message": "…", "type": "…", "param": "…", "code": "…"}}`.
//!
//! Layers (admission, auth, body limit, policies) and handlers all build their refusals here,
//! without knowing the route; the error rides in the response's extensions, and the
//! [`Stack`](crate::stack::Stack) renders it for the route's API. Internal detail goes to the
//! log; the client gets a message that names what is wrong.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Which API's error shape a route speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dialect {
    /// Anthropic's Messages API (and everything that is not OpenAI's).
    #[default]
    Anthropic,
    /// OpenAI's Chat Completions and Responses APIs.
    OpenAi,
}

impl Dialect {
    /// The dialect of a request path: OpenAI's for `/v1/chat/completions` and `/v1/responses`
    /// (and what lies below them), Anthropic's for the rest.
    pub fn of_path(path: &str) -> Dialect {
        let openai = ["/v1/chat/completions", "/v1/responses"].iter().any(|route| {
            path.strip_prefix(route)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        });
        if openai {
            Dialect::OpenAi
        } else {
            Dialect::Anthropic
        }
    }
}

/// The Anthropic error types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400
    InvalidRequest,
    /// 401
    Authentication,
    /// 403: a request the server will not take from where it came (a cross-site page).
    Forbidden,
    /// 404
    NotFound,
    /// 405 (Anthropic has no type of its own for it; the message says which methods work)
    MethodNotAllowed,
    /// 413
    RequestTooLarge,
    /// 415: a body that is not JSON where JSON is read.
    UnsupportedMediaType,
    /// 429
    RateLimit,
    /// 500
    Api,
    /// 503
    Overloaded,
}

impl ErrorKind {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Authentication => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::RateLimit => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Api => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error.type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::MethodNotAllowed | ErrorKind::UnsupportedMediaType => {
                "invalid_request_error"
            }
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Forbidden => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Api => "api_error",
            ErrorKind::Overloaded => "overloaded_error",
        }
    }
}

/// An error on its way to the client.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{} ({}): {message}", self.type_str(), self.status().as_u16())]
pub struct ApiError {
    /// Which Anthropic error.
    pub kind: ErrorKind,
    /// What the client is told.
    pub message: String,
    /// Sent as `retry-after`.
    pub retry_after_secs: Option<u32>,
    /// Status and type chosen by an admission policy, instead of `kind`'s.
    pub custom: Option<Box<(StatusCode, String)>>,
    /// Who refused the request, when it was an admission decision (for metrics and logs).
    pub refused_by: Option<RefusedBy>,
    /// `error.details`: what a client's code acts on (`{"error_code": "thread_not_found"}`).
    pub details: Option<Box<serde_json::Value>>,
    /// The request field the error is about (`max_tokens`, `messages.0.content`): OpenAI's `param`.
    pub param: Option<String>,
}

/// The admission decision behind a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusedBy {
    /// The memory gate, in the tier of this name (`Critical`, `Emergency`).
    Memory(&'static str),
    /// This WASM policy.
    Policy(String),
}

impl ApiError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after_secs: None,
            custom: None,
            refused_by: None,
            details: None,
            param: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    /// 400 `invalid_request_error` about the field `param`: the message is `param: problem`.
    pub fn invalid_field(param: impl Into<String>, problem: impl std::fmt::Display) -> Self {
        let param = param.into();
        Self::invalid(format!("{param}: {problem}")).param(param)
    }

    /// Names the request field the error is about.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// A refusal by the admission policy `policy`, with the status and type it chose (400 to 599).
    pub fn from_policy(
        policy: String,
        status: u16,
        error_type: String,
        message: String,
        retry_after_secs: Option<u32>,
    ) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let kind = if status.is_client_error() {
            ErrorKind::InvalidRequest
        } else {
            ErrorKind::Overloaded
        };
        Self {
            kind,
            message,
            retry_after_secs,
            custom: Some(Box::new((status, error_type))),
            refused_by: Some(RefusedBy::Policy(policy)),
            details: None,
            param: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.custom.as_ref().map_or_else(|| self.kind.status(), |c| c.0)
    }

    fn type_str(&self) -> &str {
        self.custom
            .as_ref()
            .map_or_else(|| self.kind.as_str(), |c| c.1.as_str())
    }

    /// Adds `error.details`.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    /// Adds `retry-after`.
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The JSON body in `dialect`'s shape, with the request id when there is one.
    pub fn body_in(&self, dialect: Dialect, request_id: Option<&str>) -> Bytes {
        match dialect {
            Dialect::Anthropic => self.body(request_id),
            Dialect::OpenAi => self.openai_body(request_id),
        }
    }

    /// The body in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
    fn openai_body(&self, request_id: Option<&str>) -> Bytes {
        let (kind, code) = match self.kind {
            ErrorKind::InvalidRequest | ErrorKind::MethodNotAllowed => ("invalid_request_error", None),
            ErrorKind::UnsupportedMediaType => ("invalid_request_error", Some("unsupported_media_type")),
            ErrorKind::Authentication => ("authentication_error", Some("invalid_api_key")),
            ErrorKind::Forbidden => ("permission_error", Some("forbidden_origin")),
            ErrorKind::NotFound => ("invalid_request_error", Some("not_found")),
            ErrorKind::RequestTooLarge => ("invalid_request_error", Some("request_too_large")),
            ErrorKind::RateLimit => ("rate_limit_error", Some("rate_limit_exceeded")),
            ErrorKind::Api => ("server_error", None),
            ErrorKind::Overloaded => ("server_error", Some("overloaded")),
        };
        let mut v = serde_json::json!({"error": {"message": self.message, "type": kind,
            "param": self.param, "code": code}});
        if let Some(id) = request_id {
            v["error"]["request_id"] = id.into();
        }
        Bytes::from(serde_json::to_vec(&v).expect("error body serialises"))
    }

    /// The JSON body in Anthropic's shape, with the request id when there is one.
    pub fn body(&self, request_id: Option<&str>) -> Bytes {
        let mut v = serde_json::json!({
            "type": "error",
            "error": {"type": self.type_str(), "message": self.message},
        });
        if let Some(details) = &self.details {
            v["error"]["details"] = (**details).clone();
        }
        if let Some(id) = request_id {
            v["request_id"] = id.into();
        }
        Bytes::from(serde_json::to_vec(&v).expect("error body serialises"))
    }

    /// The `data:` of an SSE `error` event: the same body, with the request id.
    pub fn sse_data(&self, request_id: Option<&str>) -> String {
        String::from_utf8(self.body(request_id).to_vec()).expect("json is utf-8")
    }

    /// The whole HTTP response in Anthropic's shape, for any body type that can hold bytes.
    /// The error itself rides in the extensions, so the logging layer can record it and the
    /// stack can render it again for an OpenAI route.
    pub fn to_response<B: From<Bytes>>(&self, request_id: Option<&str>) -> Response<B> {
        self.to_response_in(Dialect::Anthropic, request_id)
    }

    /// The whole HTTP response in `dialect`'s shape.
    pub fn to_response_in<B: From<Bytes>>(&self, dialect: Dialect, request_id: Option<&str>) -> Response<B> {
        let mut res = Response::new(B::from(self.body_in(dialect, request_id)));
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after_secs {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res.extensions_mut().insert(self.clone());
        res
    }
}

impl axum_core::response::IntoResponse for ApiError {
    fn into_response(self) -> axum_core::response::Response {
        self.to_response(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_anthropic_shape() {
        let e = ApiError::invalid("max_tokens: missing field");
        let v: serde_json::Value = serde_json::from_slice(&e.body(Some("req_1"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "error", "error": {"type": "invalid_request_error",
                "message": "max_tokens: missing field"}, "request_id": "req_1"})
        );
    }

    #[test]
    fn statuses_and_types_are_decided_here() {
        let r: Response<Bytes> = ApiError::new(ErrorKind::RateLimit, "x")
            .retry_after(3)
            .to_response(None);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(ErrorKind::RequestTooLarge.as_str(), "request_too_large");
        assert_eq!(ErrorKind::Overloaded.status(), 503);
    }

    #[test]
    fn openai_shape_names_the_param_from_the_error_not_its_text() {
        let e = ApiError::invalid_field("max_tokens", "must be at least 1");
        let v: serde_json::Value = serde_json::from_slice(&e.body_in(Dialect::OpenAi, None)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "max_tokens: must be at least 1",
                "type": "invalid_request_error", "param": "max_tokens", "code": null}})
        );
        // A message that merely looks like `field: …` names no param.
        let e = ApiError::invalid("messages: look like a field");
        let v: serde_json::Value = serde_json::from_slice(&e.body_in(Dialect::OpenAi, None)).unwrap();
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
    }

    #[test]
    fn routes_choose_their_dialect() {
        assert_eq!(Dialect::of_path("/v1/chat/completions"), Dialect::OpenAi);
        assert_eq!(Dialect::of_path("/v1/responses"), Dialect::OpenAi);
        assert_eq!(Dialect::of_path("/v1/responses/resp_1"), Dialect::OpenAi);
        assert_eq!(Dialect::of_path("/v1/responsesx"), Dialect::Anthropic);
        assert_eq!(Dialect::of_path("/v1/messages"), Dialect::Anthropic);
        assert_eq!(Dialect::of_path("/anything"), Dialect::Anthropic);
    }
}
