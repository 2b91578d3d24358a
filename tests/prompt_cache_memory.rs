//! The prompt cache holds the memory it reports: a soak of mixed requests on the real server,
//! measured with MLX's own active-memory counter (`/health`'s `backend.active_bytes`).

mod common;

use std::time::Duration;

use common::*;
use futures_util::{stream, StreamExt};
use serde_json::json;

/// Requests in each soak.
const REQUESTS: usize = 2000;
/// Sent at once, so that continuous batching mixes them.
const CONCURRENCY: usize = 6;
/// What MLX's allocator may hold beyond the arrays' bytes when idle (alignment, small buffers).
const ALLOWANCE: f64 = 1024.0 * 1024.0;

/// Request `i` of a soak: shared system prompts (so that prefixes are cached and reused),
/// questions of varied length, non-streamed, streamed, and streams cut after their first token.
async fn one(s: &Server, client: &reqwest::Client, i: usize) {
    let system = format!("You are assistant number {} of a small team. ", i % 5).repeat(10 + i % 7);
    let body = json!({
        "model": "demo", "max_tokens": 1 + (i * 7) % 24, "temperature": 0.7,
        "system": system,
        "messages": [{"role": "user", "content": format!("question {} {}", i % 40, "x".repeat((i * 13) % 200))}],
        "stream": i % 3 != 0,
    });
    let res = client.post(s.url("/v1/messages")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200, "request {i}");
    if i % 3 == 2 {
        // Cut: read the first chunk, then hang up.
        let mut body = res.bytes_stream();
        let _ = tokio::time::timeout(Duration::from_secs(30), body.next()).await;
    } else {
        res.bytes().await.unwrap();
    }
}

/// Runs the soak and returns `(active bytes above the weights, reported prompt-cache bytes,
/// entries)` once the server is idle.
async fn soak(s: &Server) -> (f64, f64, u64) {
    let weights = s.idle_backend().await["active_bytes"].as_f64().unwrap();
    let client = reqwest::Client::new();
    stream::iter(0..REQUESTS)
        .for_each_concurrent(CONCURRENCY, |i| {
            let client = &client;
            async move { one(s, client, i).await }
        })
        .await;
    // Cut streams leave the batch on the backend's next turn; entries the cap evicted are
    // written to the disk tier, and held until written.
    let mut b = s.idle_backend().await;
    for _ in 0..50 {
        if b["active_generations"] == 0 && b["queued"] == 0 && b["prompt_cache_disk"]["pending_bytes"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        b = s.idle_backend().await;
    }
    assert_eq!(b["cache_bytes"], 0, "{b}");
    let held = b["active_bytes"].as_f64().unwrap() - weights;
    let reported = b["prompt_cache_bytes"].as_f64().unwrap();
    eprintln!(
        "weights {weights} B; idle: {held} B above the weights, prompt cache reports {reported} B in {} entries",
        b["prompt_cache_entries"]
    );
    (held, reported, b["prompt_cache_entries"].as_u64().unwrap())
}

#[tokio::test]
async fn after_a_soak_idle_memory_above_the_weights_is_what_the_prompt_cache_reports() {
    let s = Server::start();
    let (held, reported, entries) = soak(&s).await;
    assert!(
        entries > 10 && reported > 1e6,
        "the soak filled the cache: {reported} B, {entries} entries"
    );
    // Before entries owned their memory: 64.1 MB held while 18.6 MB were reported.
    assert!(
        held <= 1.25 * reported + ALLOWANCE,
        "{held} B held, {reported} B reported"
    );
    let m = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    let line = m
        .lines()
        .find(|l| l.starts_with("pensieve_prompt_cache_bytes "))
        .unwrap();
    assert_eq!(
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap(),
        reported,
        "{line}"
    );
    assert!(!s.log().contains("panicked"));
}

#[tokio::test]
async fn with_a_one_megabyte_cap_idle_memory_stays_within_the_weights_plus_the_cap() {
    let s = Server::start_with(&[("PENSIEVE_BACKEND__PROMPT_CACHE_MB", "1")]);
    let (held, reported, _) = soak(&s).await;
    assert!(reported <= 1048576.0, "{reported}");
    assert!(held <= 1048576.0 + ALLOWANCE, "{held} B held with a 1 MB cap");
    assert!(
        held <= 1.25 * reported + ALLOWANCE,
        "{held} B held, {reported} B reported"
    );
}
