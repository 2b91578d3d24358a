//! Continuous batching and the prompt cache, on the real server and the real MLX backend.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Claude Code's request (the recorded shape), with its billing header's per-request values.
fn claude_code(cch: &str, question: &str) -> Value {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/claude-code-request.json")).unwrap();
    let mut body = fixture["body"].clone();
    body["stream"] = json!(false);
    body["max_tokens"] = json!(8);
    body["temperature"] = json!(0);
    let first = body["system"][0]["text"].as_str().unwrap().to_owned();
    assert!(first.starts_with("x-anthropic-billing-header:"), "{first}");
    body["system"][0]["text"] = json!(format!("{first} cch={cch};"));
    body["messages"][0]["content"][1]["text"] = json!(question);
    body
}

async fn usage(s: &Server, body: &Value) -> Value {
    let res = s.post(body).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    v["usage"].clone()
}

#[tokio::test]
async fn claude_codes_next_request_reads_its_prompt_from_the_cache_despite_a_new_billing_header() {
    let s = Server::start();
    let cold = usage(&s, &claude_code("a1b2c", "say hi")).await;
    assert_eq!(cold["cache_read_input_tokens"], 0, "{cold}");
    let total = cold["input_tokens"].as_u64().unwrap();
    assert!(total > 1000, "{cold}");
    let h = s.health().await;
    assert!(h["backend"]["prompt_cache_bytes"].as_u64().unwrap() > 0, "{h}");

    // The next turn: another billing value, another question. Everything before the question
    // comes from the cache.
    let warm = usage(&s, &claude_code("ffff9", "now list the files")).await;
    let read = warm["cache_read_input_tokens"].as_u64().unwrap();
    let fresh = warm["input_tokens"].as_u64().unwrap();
    assert!(read > 0 && fresh < 300, "{warm}");
    assert!(
        read + fresh > total - 10 && read + fresh < total + 10,
        "{cold} then {warm}"
    );

    let m = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&m, "pensieve_prompt_cache_hits_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "pensieve_prompt_cache_hit_tokens_total"), read as f64);
    assert!(metric(&m, "pensieve_prompt_cache_bytes") > 0.0);
    // Idle, the allocator cache is empty even though cached prompts are kept.
    assert_eq!(s.idle_backend().await["cache_bytes"], 0);
}

#[tokio::test]
async fn the_prompt_cache_can_be_turned_off() {
    let s = Server::start_with(&[("PENSIEVE_BACKEND__PROMPT_CACHE_MB", "0")]);
    usage(&s, &claude_code("1", "say hi")).await;
    let warm = usage(&s, &claude_code("2", "say hi")).await;
    assert_eq!(warm["cache_read_input_tokens"], 0, "{warm}");
    assert_eq!(s.health().await["backend"]["prompt_cache_bytes"], 0);
}

/// Reads a stream until its first text delta.
async fn first_delta(
    res: reqwest::Response,
) -> (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>>, String) {
    let mut stream = Box::pin(res.bytes_stream());
    let mut seen = String::new();
    while !seen.contains("content_block_delta") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("no token within 30 s: the generations are not decoded together")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    (stream, seen)
}

#[tokio::test]
async fn generations_are_decoded_together_each_with_its_own_sampling_stops_and_cancel() {
    let s = Server::start_with(&[("PENSIEVE_BACKEND__MAX_CONCURRENT", "4")]);
    // Four long streams: each has produced text while none has finished, so all four run at once.
    let mut streams = Vec::new();
    for i in 0..4 {
        let mut body = hello(100_000);
        body["messages"][0]["content"] = json!(format!("stream number {i}"));
        let res = s.post_stream(&body).await;
        assert_eq!(res.status(), 200);
        streams.push(first_delta(res).await);
    }
    let h = s.health().await;
    assert_eq!(h["backend"]["active_generations"], 4, "{h}");
    // A token count is answered while the batch is full (it needs no slot).
    let count = tokio::time::timeout(
        Duration::from_secs(20),
        reqwest::Client::new()
            .post(s.url("/v1/messages/count_tokens"))
            .json(&json!({"model": "demo", "messages": [{"role": "user", "content": "count me"}]}))
            .send(),
    )
    .await
    .expect("count_tokens waited for a generation slot")
    .unwrap();
    assert_eq!(count.status(), 200);
    assert!(count.json::<Value>().await.unwrap()["input_tokens"].as_u64().unwrap() > 2);

    // Meanwhile, short requests with their own settings queue behind and are answered as the
    // long ones leave: drop two streams (cancel), and the short ones run beside the others.
    streams.truncate(2);
    let greedy = |max: u32| {
        let mut b = hello(max);
        b["temperature"] = json!(0);
        b
    };
    let reference: Value = s.post(&greedy(12)).await.json().await.unwrap();
    let text = reference["content"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(reference["stop_reason"], "max_tokens");
    // A stop sequence taken from the greedy answer ends that request only, at that point.
    let word = text.split_whitespace().nth(2).expect("three words").to_owned();
    let mut stop = greedy(12);
    stop["stop_sequences"] = json!([word]);
    let (g12, g3) = (greedy(12), greedy(3));
    let (a, b, c) = tokio::join!(s.post(&g12), s.post(&stop), s.post(&g3));
    let (a, b, c): (Value, Value, Value) = (
        a.json().await.unwrap(),
        b.json().await.unwrap(),
        c.json().await.unwrap(),
    );
    assert_eq!(
        a["content"][0]["text"],
        text.as_str(),
        "greedy is deterministic in a batch too"
    );
    assert_eq!(b["stop_reason"], "stop_sequence", "{b}");
    assert_eq!(b["stop_sequence"], word.as_str());
    assert!(text.starts_with(b["content"][0]["text"].as_str().unwrap()), "{b}");
    assert_eq!(c["stop_reason"], "max_tokens");
    assert_eq!(c["usage"]["output_tokens"], 3);

    // The two long streams are still going; dropping them leaves nothing running and no cache.
    let h = s.health().await;
    assert_eq!(h["backend"]["active_generations"], 2, "{h}");
    drop(streams);
    let b = s.idle_backend().await;
    assert_eq!(
        (b["active_generations"].clone(), b["cache_bytes"].clone()),
        (json!(0), json!(0)),
        "{b}"
    );
    assert!(!s.log().contains("panicked"));
}

#[tokio::test]
async fn a_stream_the_client_cut_leaves_its_prompt_in_the_cache() {
    let s = Server::start();
    let mut body = hello(100_000);
    body["system"] = json!("You are a coding agent working in a large repository. ".repeat(100));
    let (stream, _) = first_delta(s.post_stream(&body).await).await;
    drop(stream);
    s.idle_backend().await;
    body["max_tokens"] = json!(4);
    let u = usage(&s, &body).await;
    let read = u["cache_read_input_tokens"].as_u64().unwrap();
    assert!(read > 500 && u["input_tokens"] == 1, "{u}");
}

#[tokio::test]
async fn a_long_prompt_reports_its_progress_in_health_and_the_log_while_a_stream_decodes() {
    // 1 ms of prefill a step: the long prompt is read in the budget's smallest chunks while
    // the other stream decodes, so its progress is seen many times.
    let s = Server::start_with(&[("PENSIEVE_BACKEND__MAX_DECODE_STALL_MS", "1")]);
    let mut running = s.post_stream(&hello(4_000)).await.bytes_stream();
    // Decoding: its first text has come.
    while !String::from_utf8_lossy(&running.next().await.unwrap().unwrap()).contains("text_delta") {}
    let long = json!({"model": "demo", "max_tokens": 3, "stream": true,
        "messages": [{"role": "user", "content": "word ".repeat(6_000)}]});
    let ask = async {
        let text = s.post_stream(&long).await.text().await.unwrap();
        let events = parse_sse(&text);
        events[0].data["message"]["usage"]["input_tokens"].as_u64().unwrap()
    };
    let watch = async {
        let mut seen: Vec<(u64, u64)> = Vec::new();
        for _ in 0..20_000 {
            let health = s.health().await;
            let progress = &health["backend"]["models"][0]["prefill_progress"];
            match progress.as_array().unwrap().as_slice() {
                [] if !seen.is_empty() => return seen,
                [] => {}
                [p] => {
                    let now = (p["done_tokens"].as_u64().unwrap(), p["total_tokens"].as_u64().unwrap());
                    if seen.last() != Some(&now) {
                        seen.push(now);
                    }
                }
                more => panic!("one long prompt is read, not {more:?}"),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("the long prompt's progress never ended: {seen:?}");
    };
    let (input_tokens, seen) = tokio::join!(ask, watch);
    println!(
        "{input_tokens} prompt tokens; progress seen: {} readings, {:?} … {:?}",
        seen.len(),
        seen.first(),
        seen.last()
    );
    assert!(seen.len() >= 5, "{seen:?}");
    assert!(seen.iter().all(|&(_, total)| total == input_tokens), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "not monotonic: {seen:?}");
    assert!(seen[0].0 <= 64, "the first chunk is small: {seen:?}");
    let log = s.log();
    assert!(log.contains("reading the prompt"), "{log}");
    assert!(log.contains("read the prompt"), "{log}");
    // Tokens are counted as they come, not when generations end: the running stream's show.
    let counted = |h: Value| h["backend"]["models"][0]["output_tokens"].as_u64().unwrap();
    let before = counted(s.health().await);
    running.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(counted(s.health().await) > before);
    drop(running);
}
