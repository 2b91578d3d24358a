//! The dashboard: one page at `GET /` and `GET /dashboard` (`dashboard/index.html`, embedded
//! in the binary: no build step, nothing fetched from elsewhere), and the JSON it polls,
//! `GET /dashboard/snapshot`, which tools may read too:
//!
//! ```text
//! {"version": "0.1.0", "at_ms": 1765000000000,
//!  "health": {...},                       the body of GET /health
//!  "metrics": {"pensieve_requests_total": [{"labels": {"route": "/v1/messages", "status": "200"}, "value": 3}], ...},
//!  "recent": [{"at_ms", "id", "method", "path", "model", "tier", "status", "input_tokens",
//!              "output_tokens", "latency_ms"}, ...]}   newest first, no prompt text
//! ```
//!
//! With `server.api_keys`, the snapshot needs a key (the API's own check); the page answers
//! 401 without one and asks for it once (kept in the browser's local storage), then sends it
//! with every poll. `[dashboard] enabled = false` serves neither.

pub mod recent;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use http::{HeaderMap, StatusCode};
use serde_json::{json, Map, Value};

use super::AppState;

/// The page (HTML, CSS and JavaScript in one file, hand-drawn SVG charts).
pub const PAGE: &str = include_str!("dashboard/index.html");

/// `GET /`, `GET /dashboard`: the page; 401 (the same page, which asks for the key) when keys
/// are set and the request carries none that is valid.
pub async fn page(State(keys): State<Keys>, headers: HeaderMap) -> Response {
    let status = if keys.admit(&headers) {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    (status, [(http::header::CACHE_CONTROL, "no-store")], Html(PAGE)).into_response()
}

/// The API keys the page is checked against (none: every request).
#[derive(Clone, Debug)]
pub struct Keys(pub crate::layers::ApiKeyLayer);

impl Keys {
    fn admit(&self, headers: &HeaderMap) -> bool {
        self.0.check(headers).is_ok()
    }
}

/// `GET /dashboard/snapshot`: health, every metric as JSON, the recent requests.
pub async fn snapshot(State(app): State<AppState>) -> Json<Value> {
    let policies = app.policies.as_ref().map(|p| p.status()).unwrap_or_default();
    let text = app
        .metrics
        .render(&app.gate.snapshot().load(), &app.backend.status(), &policies);
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "at_ms": at_ms,
        "health": super::health::health_json(&app),
        "metrics": metrics_json(&text),
        "recent": recent::recent().newest_first(),
    }))
}

/// OpenMetrics text as `{name: [{"labels": {...}, "value": n}]}` (comments and `# EOF` left
/// out; values that are not numbers are skipped).
pub fn metrics_json(text: &str) -> Value {
    let mut out = Map::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, Map::new()),
        };
        let sample = json!({"labels": labels, "value": value});
        match out.get_mut(name) {
            Some(Value::Array(samples)) => samples.push(sample),
            _ => {
                out.insert(name.to_owned(), Value::Array(vec![sample]));
            }
        }
    }
    Value::Object(out)
}

/// `a="x",b="y"` (values with `\"` and `\\` escapes).
fn parse_labels(text: &str) -> Map<String, Value> {
    let mut labels = Map::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), Value::String(value));
        rest = &after[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_becomes_json_samples_with_their_labels() {
        let text = "# HELP pensieve_requests HTTP requests\n# TYPE pensieve_requests counter\n\
                    pensieve_requests_total{route=\"/v1/messages\",status=\"200\"} 3\n\
                    pensieve_requests_total{route=\"/v1/a\\\"b\",status=\"503\"} 1\n\
                    pensieve_memory_tier 2\npensieve_odd NaNish\n# EOF\n";
        let v = metrics_json(text);
        assert_eq!(v["pensieve_requests_total"][0]["labels"]["route"], "/v1/messages");
        assert_eq!(v["pensieve_requests_total"][0]["labels"]["status"], "200");
        assert_eq!(v["pensieve_requests_total"][0]["value"], 3.0);
        assert_eq!(v["pensieve_requests_total"][1]["labels"]["route"], "/v1/a\"b");
        assert_eq!(v["pensieve_memory_tier"][0]["value"], 2.0);
        assert!(v.get("pensieve_odd").is_none());
    }
}
