//! The router and the whole `/v1` stack in process, in milliseconds: a fake [`Backend`] (no
//! Python) behind the real handlers and layers. What only the real model can show is in
//! `tests/`.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower::ServiceExt;

use super::router;
use crate::backend::{
    Backend, BackendError, BackendStatus, Chat, Event, GenerateRequest, Generation, StopReason, TokenCount,
};
use crate::config::{Config, OnError};
use crate::memory::{Gate, MemorySnapshot, SnapshotHandle, Source, Thresholds, Tier, GIB};
use crate::policy::{testing, PolicyEngine};

/// Answers every generation with "Hello there" in two pieces; remembers what it was asked.
#[derive(Default)]
struct FakeBackend {
    asked: Mutex<Vec<GenerateRequest>>,
}

impl Backend for FakeBackend {
    fn generate(&self, request: GenerateRequest) -> Result<Generation, BackendError> {
        assert!(
            request.chat.messages[0].content != "panic",
            "the fake backend was told to panic"
        );
        let input_tokens = request.chat.messages.len() as u32 * 10;
        self.asked.lock().unwrap().push(request);
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let events = [
                Event::Started {
                    input_tokens,
                    cached_tokens: 4,
                },
                Event::Text("Hello".into()),
                Event::Text(" there".into()),
                Event::Done {
                    reason: StopReason::EndTurn,
                    stop_sequence: None,
                    output_tokens: 2,
                },
            ];
            for e in events {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        });
        Ok(Generation::new(rx))
    }

    fn count_tokens(&self, _model: &str, chat: Chat) -> Result<TokenCount, BackendError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Ok(chat.messages.len() as u32 * 10));
        Ok(rx)
    }

    fn resolve(&self, _name: &str) -> Result<String, BackendError> {
        Ok("fake".into())
    }

    fn context_length(&self, _model: &str) -> u32 {
        4096
    }

    fn status(&self) -> BackendStatus {
        BackendStatus {
            model: "fake".into(),
            ready: true,
            models: vec![crate::backend::ModelStatus {
                name: "fake".into(),
                state: "loaded",
                loaded: true,
                default: true,
                context_length: 4096,
                ..Default::default()
            }],
            ..BackendStatus::default()
        }
    }
}

fn snapshot(tier: Tier, gb: f64) -> SnapshotHandle {
    SnapshotHandle::new(MemorySnapshot {
        tier,
        available_bytes: (gb * GIB) as u64,
        total_bytes: 16 << 30,
        source: Source::Custom,
        ..MemorySnapshot::unknown()
    })
}

struct App {
    router: axum::Router,
    backend: Arc<FakeBackend>,
    _policies: Option<tempfile::TempDir>,
}

/// The router over a fake backend; `policy` puts a policy that always refuses (429) in place.
fn app(config: &Config, tier: Tier, policy: bool) -> App {
    let gate = Gate::new(
        snapshot(tier, if tier.admits() { 8.0 } else { 0.7 }),
        Thresholds::from_config(&config.memory),
        config.memory.retry_after_secs,
    );
    let backend = Arc::new(FakeBackend::default());
    let (engine, dir) = if policy {
        let dir = tempfile::tempdir().unwrap();
        let wasm = testing::core_policy(testing::OK, testing::NONE, testing::REJECT);
        std::fs::write(dir.path().join("refuse.wasm"), wasm).unwrap();
        let mut policies = config.policies.clone();
        policies.dir = dir.path().to_owned();
        policies.on_error = OnError::Admit;
        let engine = Arc::new(PolicyEngine::new(&policies).unwrap());
        engine.load_dir();
        (Some(engine), Some(dir))
    } else {
        (None, None)
    };
    let mut stack = crate::stack::Stack::new(&config.guard(), gate).metrics(Arc::default());
    if let Some(engine) = engine {
        stack = stack.policies(engine);
    }
    App {
        router: router(config, backend.clone(), stack),
        backend,
        _policies: dir,
    }
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

async fn send(app: &App, req: Request<Body>) -> Answer {
    let res = app.router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    Answer { status, headers, body }
}

fn post(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn hello() -> Value {
    json!({"model": "anything", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
}

async fn metrics(app: &App) -> String {
    send(app, Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .body
}

#[tokio::test]
async fn a_message_goes_through_the_stack_to_the_backend_and_back() {
    let app = app(&Config::default(), Tier::Safe, false);
    let a = send(&app, post("/v1/messages?beta=true", hello())).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert_eq!(v["content"][0]["text"], "Hello there");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["model"], "fake");
    assert_eq!(
        (
            v["usage"]["input_tokens"].clone(),
            v["usage"]["cache_read_input_tokens"].clone()
        ),
        (json!(6), json!(4))
    );
    assert!(a.headers["request-id"].to_str().unwrap().starts_with("req_"));
    assert_eq!(a.headers["x-memory-status"], "Safe");
    let asked = app.backend.asked.lock().unwrap();
    assert_eq!(asked[0].chat.messages[0].content, "hi");
    assert_eq!(asked[0].sampling.max_tokens, 16);
}

#[tokio::test]
async fn a_stream_keeps_anthropics_event_order() {
    let app = app(&Config::default(), Tier::Safe, false);
    let mut body = hello();
    body["stream"] = json!(true);
    let a = send(&app, post("/v1/messages", body)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "text/event-stream");
    let events: Vec<&str> = a
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .filter(|e| *e != "ping")
        .collect();
    assert_eq!(
        events,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
}

#[tokio::test]
async fn count_tokens_models_and_unknown_paths() {
    let app = app(&Config::default(), Tier::Safe, false);
    let a = send(
        &app,
        post(
            "/v1/messages/count_tokens",
            json!({"model": "m", "messages": [{"role": "user", "content": "a"}]}),
        ),
    )
    .await;
    assert_eq!(a.json(), json!({"input_tokens": 10}));
    let a = send(&app, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(a.json()["data"][0]["id"], "fake");
    let a = send(&app, Request::get("/v1/nothing/here").body(Body::empty()).unwrap()).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["error"]["type"], "not_found_error");
    // Unknown /v1 paths go through the stack too: memory headers and a request id.
    assert!(a.headers.contains_key("x-memory-status"));
    assert_eq!(a.json()["request_id"], a.headers["request-id"].to_str().unwrap());
    let a = send(&app, Request::get("/v1/messages").body(Body::empty()).unwrap()).await;
    assert_eq!(a.status, 405);
    let a = send(&app, post("/v1/messages", json!({"model": "m", "messages": []}))).await;
    assert_eq!(a.status, 400);
    assert!(
        a.json()["error"]["message"].as_str().unwrap().contains("max_tokens"),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn memory_refusals_are_responses_counted_by_tier_from_the_error_not_a_header() {
    let app = app(&Config::default(), Tier::Critical, false);
    let a = send(&app, post("/v1/messages", hello())).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"]["type"], "overloaded_error");
    assert_eq!(a.headers["retry-after"], "5");
    // Reads are not refused.
    let a = send(&app, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(a.status, 200);
    let m = metrics(&app).await;
    assert!(
        m.contains(r#"pensieve_memory_refusals_total{name="Critical"} 1"#),
        "{m}"
    );
    assert!(app.backend.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_policy_refuses_in_the_layer_before_the_handler_and_is_counted() {
    let app = app(&Config::default(), Tier::Safe, true);
    let a = send(&app, post("/v1/messages", hello())).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.json()["error"]["message"], "not today");
    assert_eq!(a.headers["retry-after"], "7");
    assert!(app.backend.asked.lock().unwrap().is_empty());
    let m = metrics(&app).await;
    assert!(m.contains(r#"pensieve_policy_refusals_total{name="refuse"} 1"#), "{m}");
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_api_error_and_is_counted() {
    let app = app(&Config::default(), Tier::Safe, false);
    let mut body = hello();
    body["messages"][0]["content"] = json!("panic");
    let a = send(&app, post("/v1/messages", body)).await;
    assert_eq!(a.status, 500);
    assert_eq!(a.json()["error"]["type"], "api_error");
    assert!(a.headers.contains_key("request-id"));
    let m = metrics(&app).await;
    assert!(
        m.contains(r#"pensieve_requests_total{route="/v1/messages",status="500"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_final_assistant_message_is_a_prefill_and_may_not_end_in_whitespace() {
    let app = app(&Config::default(), Tier::Safe, false);
    let mut body = hello();
    body["messages"] = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]);
    assert_eq!(send(&app, post("/v1/messages", body.clone())).await.status, 200);
    assert!(app.backend.asked.lock().unwrap()[0].chat.continue_final);
    body["messages"][1]["content"] = json!("Well, ");
    let a = send(&app, post("/v1/messages", body)).await;
    assert_eq!(a.status, 400);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("messages[1]: the final assistant message"),
        "{}",
        a.body
    );
    // A conversation that ends with the user's turn opens a new assistant turn.
    send(&app, post("/v1/messages", hello())).await;
    assert!(!app.backend.asked.lock().unwrap()[1].chat.continue_final);
}

// === [layers]: each switch removes its layer ===

fn with_layers(f: impl FnOnce(&mut crate::config::LayersConfig)) -> Config {
    let mut config = Config::default();
    f(&mut config.layers);
    config
}

#[tokio::test]
async fn layers_admission_off_lets_requests_through_while_memory_is_critical() {
    let config = with_layers(|l| l.admission = false);
    let a = send(&app(&config, Tier::Critical, false), post("/v1/messages", hello())).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test]
async fn layers_policies_off_does_not_run_the_policies() {
    let config = with_layers(|l| l.policies = false);
    let a = send(&app(&config, Tier::Safe, true), post("/v1/messages", hello())).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test]
async fn layers_auth_off_ignores_the_api_keys() {
    let mut config = Config::default();
    config.server.api_keys = vec!["sk-1".into()];
    assert_eq!(
        send(&app(&config, Tier::Safe, false), post("/v1/messages", hello()))
            .await
            .status,
        401
    );
    config.layers.auth = false;
    assert_eq!(
        send(&app(&config, Tier::Safe, false), post("/v1/messages", hello()))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn layers_memory_headers_off_sends_no_memory_or_static_headers() {
    let mut config = with_layers(|l| l.memory_headers = false);
    config.server.headers.insert("x-served-by".into(), "pensieve".into());
    let a = send(&app(&config, Tier::Safe, false), post("/v1/messages", hello())).await;
    assert_eq!(a.status, 200);
    assert!(!a.headers.contains_key("x-memory-status"));
    assert!(!a.headers.contains_key("x-served-by"));
    assert!(a.headers.contains_key("request-id"));
}

/// A do-nothing global subscriber, once per test binary. tracing caches each callsite's
/// interest process-wide, resolved on the thread that first reaches it: a test thread with no
/// subscriber at all would cache "never" for the logging layer's lines and blind the scoped
/// subscriber below (seen once in CI: an empty capture).
fn a_global_subscriber() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
}

#[tokio::test]
async fn layers_logging_off_writes_no_request_lines() {
    a_global_subscriber();
    let logged = |config: Config| async move {
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let buf = buf.clone();
            move || Writer(buf.clone())
        };
        let subscriber = tracing_subscriber::fmt().with_writer(writer).with_ansi(false).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        let a = send(&app(&config, Tier::Safe, false), post("/v1/messages", hello())).await;
        assert_eq!(a.status, 200);
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        text
    };
    let on = logged(Config::default()).await;
    assert!(on.contains("request finished"), "{on}");
    let off = logged(with_layers(|l| l.logging = false)).await;
    assert!(!off.contains("request finished"), "{off}");
}

/// A log sink for one test.
struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn openai_routes_answer_in_openais_shape_refusals_by_layers_included() {
    let chat = || {
        post(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
    };
    // Through the stack to the backend: a chat.completion.
    let app = app(&Config::default(), Tier::Safe, false);
    let a = send(&app, chat()).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello there");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
    // Memory admission (a layer) refuses in OpenAI's shape, with retry-after and memory headers.
    let app = self::app(&Config::default(), Tier::Critical, false);
    let a = send(&app, chat()).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.headers["retry-after"], "5");
    assert_eq!(a.headers["x-memory-status"], "Critical");
    let e = &a.json()["error"];
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("server_error"), Some("overloaded")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("Critical"), "{e}");
    // So does a policy.
    let app = self::app(&Config::default(), Tier::Safe, true);
    let a = send(&app, chat()).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.json()["error"]["message"], "not today");
    assert!(a.json()["error"].get("code").is_some());
    // The Messages API keeps Anthropic's.
    assert_eq!(send(&app, post("/v1/messages", hello())).await.json()["type"], "error");
    let m = metrics(&app).await;
    assert!(m.contains(r#"route="/v1/chat/completions""#), "{m}");
}
