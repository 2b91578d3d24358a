//! A real memory limit: the server runs inside a memory cgroup (v1 under
//! /sys/fs/cgroup/memory, or v2), and a second process in the same cgroup allocates real memory
//! until the cgroup is nearly full. No mocked probe anywhere.
//!
//! Needs root and a writable memory cgroup hierarchy; when it cannot make the cgroup it fails
//! and says why, it does not pass silently.

mod common;

use std::time::{Duration, Instant};

use common::cgroup::{push_to, tier, Allocator, Cgroup, ONE_GIB_TIERS};
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

const LIMIT: u64 = 1 << 30; // 1 GiB for the server and the allocator together

#[tokio::test]
async fn under_a_real_cgroup_limit_the_server_refuses_aborts_survives_and_recovers() {
    let cg = Cgroup::create(&format!("pensieve-test-{}", std::process::id()), LIMIT);
    let s = Server::start_in_cgroup(&cg.procs(), &ONE_GIB_TIERS);
    // The server sees the cgroup: its limit is the total.
    let h = s.health().await;
    assert_eq!(h["memory"]["source"], "cgroup", "{h}");
    assert_eq!(h["memory"]["total_bytes"], LIMIT, "{h}");
    assert_eq!(h["memory"]["status"], "Safe", "{h}");
    // A long prompt leaves its KV cache in the prompt cache.
    let mut long = hello(4);
    long["system"] = json!("You are a careful assistant who reads every line. ".repeat(300));
    assert_eq!(s.post(&long).await.status(), 200);
    let cached = s.health().await["backend"]["prompt_cache_bytes"].as_u64().unwrap();
    assert!(cached > 1_000_000, "{cached}");

    // A long stream runs while memory fills up.
    let res = s.post_stream(&hello(100_000)).await;
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("content_block_delta") {
        seen.push_str(&String::from_utf8_lossy(&stream.next().await.unwrap().unwrap()));
    }

    let mut alloc = Allocator::start(&cg);
    // Memory leaves Safe: the prompt cache is the first thing released.
    let warning = push_to(&s, &cg, &mut alloc, &["Warning", "Critical", "Emergency"]).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.health().await["backend"]["prompt_cache_bytes"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the prompt cache was kept out of Safe: {warning}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let critical = push_to(&s, &cg, &mut alloc, &["Critical", "Emergency"]).await;
    // Critical: new generations are refused with 503 before the kernel has to kill anything.
    let res = s.post(&hello(4)).await;
    assert_eq!(res.status(), 503, "{critical}");
    assert!(res.headers().contains_key("retry-after"));
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert_eq!(reqwest::get(s.url("/health/ready")).await.unwrap().status(), 503);

    // Emergency: the running stream is aborted with an overloaded_error event and the cache is cleared.
    push_to(&s, &cg, &mut alloc, &["Emergency"]).await;
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(rest.is_ok(), "the stream did not end in Emergency");
    let events = parse_sse(&seen);
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{seen}");
    assert_eq!(last.data["error"]["type"], "overloaded_error");
    let b = s.idle_backend().await;
    assert_eq!(
        (b["active_generations"].clone(), b["cache_bytes"].clone()),
        (json!(0), json!(0)),
        "{b}"
    );

    // Nothing was killed, and the server still answers.
    assert_eq!(cg.oom_kills(), 0, "the kernel killed something in the cgroup");
    assert_eq!(reqwest::get(s.url("/health/live")).await.unwrap().status(), 200);

    // Memory comes back: serving again within seconds.
    alloc.send("free");
    drop(alloc);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (t, h) = tier(&s).await;
        if t == "Safe" || t == "Warning" {
            break;
        }
        assert!(Instant::now() < deadline, "memory never recovered: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.post(&hello(4)).await.status(), 200);
    assert_eq!(cg.oom_kills(), 0);
    drop(s);
}

#[tokio::test]
async fn a_prompt_whose_tokenising_would_take_the_memory_left_is_refused_before_it_is_tokenised() {
    let cg = Cgroup::create(&format!("pensieve-test-parse-{}", std::process::id()), LIMIT);
    let s = Server::start_in_cgroup(&cg.procs(), &ONE_GIB_TIERS);
    assert_eq!(s.post(&hello(2)).await.status(), 200);
    // Another process takes memory until 0.65–0.7 GB is left: still Safe (above 0.6).
    let mut alloc = Allocator::start(&cg);
    let available = s.health().await["memory"]["available_bytes"].as_u64().unwrap();
    alloc.send(&format!("alloc {}", (available >> 20).saturating_sub(670)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = s.health().await;
    assert_eq!(h["memory"]["status"], "Safe", "{h}");
    let available = h["memory"]["available_bytes"].as_u64().unwrap();
    assert!(available < 720 << 20, "{h}");
    // 2.5 MB of text: under the demo model's context bound, and about 400 MB to tokenise (it
    // peaks at +375 MB), more than the cgroup has above the critical threshold (0.4 GB).
    let text = "word ".repeat((5 << 20) / 10);
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let res = reqwest::Client::new()
            .post(s.url(path))
            .json(&json!({"model": "demo", "max_tokens": 5, "messages": [{"role": "user", "content": text}]}))
            .send()
            .await
            .unwrap();
        let status = res.status();
        let retry = res.headers().get("retry-after").cloned();
        let v: Value = res.json().await.unwrap();
        assert_eq!(status, 503, "{path}: {v} (available {available})");
        assert!(retry.is_some(), "{path}: no retry-after");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("to tokenise") && message.contains("memory.critical_gb"),
            "{message}"
        );
    }
    // Nothing was tokenised: the server is as it was, and a prompt it can afford is served.
    let h = s.health().await;
    assert_eq!(h["memory"]["status"], "Safe", "{h}");
    let mut fits = hello(2);
    fits["messages"][0]["content"] = json!("word ".repeat(2_000));
    assert_eq!(s.post(&fits).await.status(), 200);
}
