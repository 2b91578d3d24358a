//! What keeps a web page from driving a local server: a browser sends a cross-site "simple"
//! request (a form, `text/plain`) without asking first, and a DNS-rebinding page reaches
//! `127.0.0.1` under a name of its own. So, on every route:
//!
//! - a `POST` body must say it is JSON (`application/json`, or a `+json` type): 415 otherwise,
//!   which no form and no `text/plain` request can pass;
//! - a request with an `Origin` header is taken only from a loopback origin (local software) or
//!   one listed in `server.allowed_origins` (`"*"`: any), 403 otherwise; allowed origins get
//!   CORS headers, and their preflight (`OPTIONS`) a 204;
//! - when the server is bound to a loopback address, the `Host` must be a loopback name or
//!   address (`localhost`, `127.0.0.1`, `[::1]`, a `*.localhost` name), 403 otherwise.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, Method, StatusCode};

use crate::wire::{request_id, ApiError, Dialect, ErrorKind};

/// What the checks allow, from `[server]`.
#[derive(Clone, Debug)]
pub struct BrowserRules {
    /// Check `Host` (the server is bound to loopback).
    pub loopback_only: bool,
    /// `server.allowed_origins`.
    pub allowed_origins: Arc<Vec<String>>,
}

impl BrowserRules {
    /// The rules for a server bound to `host`.
    pub fn new(host: &str, allowed_origins: &[String]) -> BrowserRules {
        BrowserRules {
            loopback_only: is_loopback_host(host),
            allowed_origins: Arc::new(allowed_origins.to_vec()),
        }
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        if self
            .allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
        {
            return true;
        }
        // A page served from this machine is local software.
        let host = origin.split_once("://").map_or("", |(_, rest)| rest);
        is_loopback_host(strip_port(host))
    }
}

/// `localhost`, a `*.localhost` name, or a loopback address (`127.x.x.x`, `::1`).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `host:port` without its port (`[::1]:7777` gives `[::1]`).
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[..end + 2];
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The middleware (see the module docs).
pub async fn check(State(rules): State<BrowserRules>, req: Request, next: Next) -> Response {
    let refuse =
        |e: ApiError, req: &Request| e.to_response_in(Dialect::of_path(req.uri().path()), request_id(req.headers()));
    if rules.loopback_only {
        if let Some(host) = req.headers().get(header::HOST) {
            let host = host.to_str().unwrap_or_default();
            if !is_loopback_host(strip_port(host)) {
                let e = ApiError::new(
                    ErrorKind::Forbidden,
                    format!(
                        "Host `{host}` is not this machine: a server bound to loopback answers loopback names only \
                         (bind another address with server.host to serve others)"
                    ),
                );
                return refuse(e, &req);
            }
        }
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    if let Some(origin) = &origin {
        if !rules.origin_allowed(origin) {
            let e = ApiError::new(
                ErrorKind::Forbidden,
                format!("requests from the web page at `{origin}` are not allowed (server.allowed_origins)"),
            );
            return refuse(e, &req);
        }
        if req.method() == Method::OPTIONS {
            let mut res = StatusCode::NO_CONTENT.into_response();
            cors(&mut res, origin);
            let h = res.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("content-type, x-api-key, authorization, anthropic-version, anthropic-beta"),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
            return res;
        }
    }
    if req.method() == Method::POST && !is_json(req.headers()) {
        let given = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map_or("none".to_owned(), |v| format!("`{}`", v.to_str().unwrap_or("?")));
        let e = ApiError::new(
            ErrorKind::UnsupportedMediaType,
            format!("content-type must be application/json, got {given}"),
        );
        return refuse(e, &req);
    }
    let mut res = next.run(req).await;
    if let Some(origin) = &origin {
        cors(&mut res, origin);
    }
    res
}

fn cors(res: &mut Response, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
}

/// `application/json`, or a `+json` type, with any parameters.
fn is_json(headers: &http::HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins() {
        for host in [
            "localhost",
            "127.0.0.1",
            "[::1]",
            "app.localhost",
            "LOCALHOST.",
            "127.0.0.2",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["evil.com", "localhost.evil.com", "10.0.0.1", "0.0.0.0", ""] {
            assert!(!is_loopback_host(host), "{host}");
        }
        assert_eq!(strip_port("localhost:7777"), "localhost");
        assert_eq!(strip_port("[::1]:7777"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        let rules = BrowserRules::new("127.0.0.1", &["https://app.example".into()]);
        assert!(rules.loopback_only);
        assert!(rules.origin_allowed("http://localhost:3000"));
        assert!(rules.origin_allowed("https://app.example"));
        assert!(!rules.origin_allowed("https://evil.example"));
        assert!(!rules.origin_allowed("null"));
        assert!(!BrowserRules::new("0.0.0.0", &[]).loopback_only);
        assert!(BrowserRules::new("0.0.0.0", &["*".into()]).origin_allowed("https://any.where"));
    }

    #[test]
    fn json_content_types() {
        let mut h = http::HeaderMap::new();
        assert!(!is_json(&h));
        for (ct, json) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/vnd.api+json", true),
            ("text/plain", false),
            ("application/x-www-form-urlencoded", false),
            ("multipart/form-data; boundary=x", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_json(&h), json, "{ct}");
        }
    }
}
