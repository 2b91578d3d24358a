//! The real server on the real demo model, over real HTTP.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn non_streamed_message_is_an_anthropic_message_with_memory_headers() {
    let s = Server::start();
    let res = s.post(&hello(12)).await;
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    assert!(h["request-id"].to_str().unwrap().starts_with("req_"));
    assert_eq!(h["x-memory-status"], "Safe");
    let gb: f64 = h["x-available-memory-gb"].to_str().unwrap().parse().unwrap();
    assert!(gb > 0.0);
    let m: Value = res.json().await.unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], "demo");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(m["content"][0]["type"], "text");
    assert!(!m["content"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(m["stop_reason"], "max_tokens");
    assert_eq!(m["usage"]["output_tokens"], 12);
    assert!(m["usage"]["input_tokens"].as_u64().unwrap() > 5);
    assert_eq!(m["usage"]["cache_read_input_tokens"], 0);
}

#[tokio::test]
async fn streamed_message_follows_anthropic_event_order_and_matches_the_non_streamed_text() {
    let s = Server::start();
    let mut body = hello(24);
    body["system"] = json!("You are a helpful assistant; answer in one short sentence.");
    let plain: Value = s.post(&body).await.json().await.unwrap();
    body["stream"] = json!(true);
    let res = reqwest::Client::new()
        .post(s.url("/v1/messages?beta=true"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let events = parse_sse(&res.text().await.unwrap());
    let names: Vec<&str> = events
        .iter()
        .map(|e| e.event.as_str())
        .filter(|e| *e != "ping")
        .collect();
    assert_eq!(names[0], "message_start");
    assert_eq!(names[1], "content_block_start");
    assert!(
        names[2..names.len() - 3].iter().all(|n| *n == "content_block_delta"),
        "{names:?}"
    );
    assert!(names.len() > 6, "token by token: {names:?}");
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let start = &events[0].data["message"];
    assert_eq!(start["content"], json!([]));
    assert!(start["stop_reason"].is_null());
    // The same prompt again: all of it but the last token comes from the prompt cache.
    let total = |u: &Value| u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap();
    assert_eq!(total(&start["usage"]), total(&plain["usage"]));
    assert_eq!(plain["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(start["usage"]["input_tokens"], 1, "{}", start["usage"]);
    let delta = events.iter().find(|e| e.event == "message_delta").unwrap();
    assert_eq!(delta.data["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta.data["usage"]["output_tokens"], 24);
    // Temperature 0 is deterministic: the stream says what the plain answer said.
    assert_eq!(text_of_stream(&events), plain["content"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn a_stream_arrives_token_by_token_not_buffered() {
    let s = Server::start();
    let res = s.post_stream(&hello(200)).await;
    let mut stream = res.bytes_stream();
    // The first chunks must arrive while the generation is still running.
    let mut seen = String::new();
    while !seen.contains("content_block_delta") {
        seen.push_str(&String::from_utf8_lossy(&stream.next().await.unwrap().unwrap()));
    }
    assert!(!seen.contains("message_stop"), "the whole stream came at once");
    let h = s.health().await;
    assert_eq!(
        h["backend"]["active_generations"], 1,
        "the generation runs while we read"
    );
}

#[tokio::test]
async fn bad_json_and_missing_or_wrong_fields_are_400s_naming_the_problem() {
    let s = Server::start();
    let client = reqwest::Client::new();
    let send = |body: &'static str| {
        client
            .post(s.url("/v1/messages"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases = [
        ("{oops", "not valid JSON"),
        (
            r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#,
            "max_tokens",
        ),
        (r#"{"model":"demo","max_tokens":"ten","messages":[]}"#, "max_tokens"),
        (
            r#"{"model":"demo","max_tokens":5,"messages":[{"role":"robot","content":"hi"}]}"#,
            "messages[0].role",
        ),
        (
            r#"{"model":"demo","max_tokens":5,"messages":[{"role":"user","content":[{"type":"hologram"}]}]}"#,
            "hologram",
        ),
        (r#"{"model":"demo","max_tokens":5,"messages":[]}"#, "messages"),
        (
            r#"{"model":"demo","max_tokens":5,"temperature":7,"messages":[{"role":"user","content":"x"}]}"#,
            "temperature",
        ),
    ];
    for (body, needle) in cases {
        let res = send(body).await.unwrap();
        assert_eq!(res.status(), 400, "{body}");
        assert!(res.headers().contains_key("request-id"));
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body} -> {msg}");
        assert!(v["request_id"].as_str().unwrap().starts_with("req_"));
    }
    // And the server still serves.
    assert_eq!(s.post(&hello(3)).await.status(), 200);
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_anthropic_errors() {
    let s = Server::start();
    let res = reqwest::get(s.url("/v1/nothing-here")).await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["x-memory-status"], "Safe");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("/v1/nothing-here"));
    let res = reqwest::get(s.url("/v1/messages")).await.unwrap();
    assert_eq!(res.status(), 405);
    let v: Value = res.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("GET"));
}

#[tokio::test]
async fn cache_is_empty_after_a_success() {
    let s = Server::start();
    assert_eq!(s.post(&hello(40)).await.status(), 200);
    // Checked at once: the client hears of the end only after the cache was cleared.
    let b = s.health().await["backend"].clone();
    assert_eq!(b["active_generations"], 0);
    assert_eq!(b["cache_bytes"], 0, "{b}");
    assert!(b["peak_bytes"].as_u64().unwrap() > 0);
}

/// On Linux the binary's allocator is jemalloc for the whole process: the embedded Python's and
/// MLX's `malloc` resolve to the binary's own (it exports them), and jemalloc runs with the
/// options of `src/alloc.rs` (its background thread, which gives freed pages back).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_binary_allocates_with_jemalloc_for_python_and_mlx_too() {
    let exported = std::process::Command::new("nm")
        .args(["-D", "--defined-only", BIN])
        .output()
        .expect("nm (binutils) runs");
    let exported = String::from_utf8_lossy(&exported.stdout);
    for name in ["malloc", "free", "calloc", "realloc", "posix_memalign"] {
        assert!(
            exported.lines().any(|l| l.split_whitespace().last() == Some(name)),
            "the binary does not export {name}: Python and MLX would allocate with glibc's"
        );
    }
    let s = Server::start();
    assert_eq!(s.post(&hello(20)).await.status(), 200);
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", s.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    assert!(
        threads.iter().any(|n| n == "jemalloc_bg_thd"),
        "no jemalloc background thread: its options were not read ({threads:?})"
    );
    assert!(s.log().contains("allocator=\"jemalloc\""), "{}", s.log());
    drop(s);

    // Another allocator in LD_PRELOAD (Debian's jemalloc library, `make libjemalloc`): the
    // binary starts again without it, says so, and serves (with it, loading the model crashed).
    let other = format!("/usr/lib/{}-linux-gnu/libjemalloc.so.2", std::env::consts::ARCH);
    assert!(
        std::path::Path::new(&other).exists(),
        "{other} is missing: `make libjemalloc` installs it"
    );
    let s = Server::start_with(&[("LD_PRELOAD", &other)]);
    let reply = s.post(&hello(20)).await;
    assert_eq!(reply.status(), 200);
    assert!(
        s.log().contains("LD_PRELOAD brings another memory allocator"),
        "{}",
        s.log()
    );
    let environ = std::fs::read(format!("/proc/{}/environ", s.pid())).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("libjemalloc.so"),
        "the server still runs with the preloaded allocator"
    );
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_stops_its_generation_and_leaves_no_cache() {
    let s = Server::start();
    let res = s.post_stream(&hello(2000)).await;
    let mut stream = res.bytes_stream();
    let mut seen = 0;
    while seen < 5 {
        let chunk = stream.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("content_block_delta").count();
    }
    drop(stream);
    let b = s.idle_backend().await;
    assert_eq!(
        b["active_generations"], 0,
        "generation still running after the client left"
    );
    assert_eq!(b["cache_bytes"], 0, "{b}");
    assert!(s.log().contains("client went away"), "{}", s.log());
    assert!(!s.log().contains("panicked"));
    assert_eq!(s.post(&hello(3)).await.status(), 200);
}

#[tokio::test]
async fn a_python_exception_is_a_500_that_says_what_failed_and_the_next_request_works() {
    let s = Server::start_with(&[("PENSIEVE_BACKEND__MODEL", SCRIPTED)]);
    let mut body = hello(50);
    body["messages"][0]["content"] = json!("PLEASE-FAIL now");
    let res = s.post(&body).await;
    assert_eq!(res.status(), 500);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("injected fault"),
        "{v}"
    );
    let b = s.health().await["backend"].clone();
    assert_eq!(
        (b["active_generations"].clone(), b["cache_bytes"].clone()),
        (json!(0), json!(0)),
        "{b}"
    );

    // Streamed: the failure after the start is an SSE error event, and the stream ends.
    body["stream"] = json!(true);
    let res = s.post(&body).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["request-id"].to_str().unwrap().to_owned();
    let events = parse_sse(&res.text().await.unwrap());
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.data["type"], "error");
    assert_eq!(last.data["error"]["type"], "api_error");
    // Like a JSON error, the SSE error event names the request.
    assert_eq!(last.data["request_id"], id.as_str());
    assert_eq!(s.health().await["backend"]["cache_bytes"], 0);
    assert_eq!(s.post(&hello(3)).await.status(), 200);
}

#[tokio::test]
async fn memory_refusal_is_a_503_with_retry_after_headers_and_an_overloaded_body() {
    // Thresholds far above this machine's memory: the real sampler puts us in Emergency.
    let s = Server::start_with(&[
        ("PENSIEVE_MEMORY__WARNING_GB", "100000"),
        ("PENSIEVE_MEMORY__CRITICAL_GB", "90000"),
        ("PENSIEVE_MEMORY__EMERGENCY_GB", "80000"),
        ("PENSIEVE_MEMORY__RETRY_AFTER_SECS", "9"),
    ]);
    let res = s.post(&hello(5)).await;
    assert_eq!(res.status(), 503);
    let h = res.headers().clone();
    assert_eq!(h["retry-after"], "9");
    assert_eq!(h["x-memory-status"], "Emergency");
    assert!(h["x-available-memory-gb"].to_str().unwrap().parse::<f64>().is_ok());
    assert!(h.contains_key("request-id"));
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Emergency") && msg.contains("GB available") && msg.contains("80000.00 GB"),
        "{msg}"
    );
    let ready = reqwest::get(s.url("/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let health = reqwest::get(s.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    let hv: Value = health.json().await.unwrap();
    assert_eq!(hv["status"], "unhealthy");
    assert_eq!(hv["memory"]["accepting_requests"], false);
    assert_eq!(reqwest::get(s.url("/health/live")).await.unwrap().status(), 200);
    let metrics = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"pensieve_memory_refusals_total{name="Emergency"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("pensieve_memory_tier 3"), "{metrics}");
}

#[tokio::test]
async fn health_endpoints_have_the_documented_bodies() {
    let s = Server::start();
    let h = s.health().await;
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["service"], "pensieve");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    let m = &h["memory"];
    assert_eq!(m["status"], "Safe");
    assert_eq!(m["accepting_requests"], true);
    assert!(m["source"] == "system" || m["source"] == "cgroup");
    assert!(m["available_gb"].as_f64().unwrap() > 0.0 && m["total_gb"].as_f64().unwrap() > 0.0);
    let b = &h["backend"];
    assert_eq!((b["model"].clone(), b["ready"].clone()), (json!("demo"), json!(true)));
    for k in ["active_generations", "active_bytes", "cache_bytes", "peak_bytes"] {
        assert!(b[k].is_u64(), "{k}");
    }
    assert!(h["policies"].is_array());
    let r = reqwest::get(s.url("/health/ready")).await.unwrap();
    assert_eq!(r.status(), 200);
    let l: Value = reqwest::get(s.url("/health/live")).await.unwrap().json().await.unwrap();
    assert_eq!(l["status"], "alive");
}

#[tokio::test]
async fn stop_sequences_end_the_text_before_the_stop_also_across_tokens() {
    let s = Server::start();
    let full: Value = s.post(&hello(40)).await.json().await.unwrap();
    let text = full["content"][0]["text"].as_str().unwrap().to_owned();
    // A stop that starts mid-text and spans several characters (and so, likely, tokens).
    let at = text.len() / 2;
    let at = (at..text.len()).find(|i| text.is_char_boundary(*i)).unwrap();
    let stop: String = text[at..].chars().take(6).collect();
    let expected = &text[..text.find(&stop).unwrap()];
    let mut body = hello(40);
    body["stop_sequences"] = json!([stop]);
    let m: Value = s.post(&body).await.json().await.unwrap();
    assert_eq!(m["stop_reason"], "stop_sequence");
    assert_eq!(m["stop_sequence"], json!(stop));
    assert_eq!(m["content"][0]["text"], expected);
    body["stream"] = json!(true);
    let events = parse_sse(&s.post(&body).await.text().await.unwrap());
    assert_eq!(text_of_stream(&events), expected);
    let delta = events.iter().find(|e| e.event == "message_delta").unwrap();
    assert_eq!(delta.data["delta"]["stop_reason"], "stop_sequence");
    assert_eq!(delta.data["delta"]["stop_sequence"], json!(stop));
}

#[tokio::test]
async fn sampling_parameters_change_what_is_generated() {
    let s = Server::start();
    let greedy: Value = s.post(&hello(30)).await.json().await.unwrap();
    // top_k = 1 at temperature 1 is greedy too; a high temperature without it is not.
    let mut body = hello(30);
    body["temperature"] = json!(1.0);
    body["top_k"] = json!(1);
    let k1: Value = s.post(&body).await.json().await.unwrap();
    assert_eq!(k1["content"], greedy["content"]);
    body["top_k"] = json!(0);
    let mut differs = false;
    for _ in 0..3 {
        let hot: Value = s.post(&body).await.json().await.unwrap();
        differs |= hot["content"] != greedy["content"];
    }
    assert!(differs, "temperature 1 never changed the text");
}

#[tokio::test]
async fn claude_code_shaped_requests_are_accepted() {
    let s = Server::start();
    let fixture: Value = serde_json::from_str(include_str!("fixtures/claude-code-request.json")).unwrap();
    let mut body = fixture["body"].clone();
    body["max_tokens"] = json!(8);
    let res = reqwest::Client::new()
        .post(s.url("/v1/messages?beta=true"))
        .header("anthropic-beta", fixture["headers"]["anthropic-beta"].as_str().unwrap())
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-local")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = parse_sse(&res.text().await.unwrap());
    assert_eq!(events.last().unwrap().event, "message_stop");
    // The loaded model answers, whatever name the client asked for.
    assert_eq!(events[0].data["message"]["model"], "demo");
}

#[tokio::test]
async fn api_keys_are_required_when_configured() {
    let s = Server::start_with(&[("PENSIEVE_SERVER__API_KEYS", "[\"sk-one\", \"sk-two\"]")]);
    let client = reqwest::Client::new();
    let res = client.post(s.url("/v1/messages")).json(&hello(2)).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let res = client
        .post(s.url("/v1/messages"))
        .header("x-api-key", "sk-bad")
        .json(&hello(2))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .post(s.url("/v1/messages"))
        .header("x-api-key", "sk-two")
        .json(&hello(2))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = client
        .post(s.url("/v1/messages"))
        .bearer_auth("sk-one")
        .json(&hello(2))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Health stays open for local tools.
    assert_eq!(client.get(s.url("/health")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn protect_health_puts_health_and_metrics_behind_the_keys_but_not_the_probes() {
    let s = Server::start_with(&[
        ("PENSIEVE_SERVER__API_KEYS", "[\"sk-one\"]"),
        ("PENSIEVE_SERVER__PROTECT_HEALTH", "true"),
    ]);
    let client = reqwest::Client::new();
    for path in ["/health", "/metrics"] {
        assert_eq!(client.get(s.url(path)).send().await.unwrap().status(), 401, "{path}");
        let res = client
            .get(s.url(path))
            .header("x-api-key", "sk-one")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(client.get(s.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_request_too_large() {
    let s = Server::start_with(&[("PENSIEVE_SERVER__MAX_BODY_MB", "1")]);
    // A declared length over the limit, sent by hand: with `expect: 100-continue` the client
    // sends no body and gets the 413 at once; without it, the 413 comes after the body was read
    // (so that the client is never reset while still writing).
    let addr = s.base.trim_start_matches("http://").to_owned();
    let raw = |expect: bool| {
        use std::io::{Read, Write};
        let head = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: 1200000\r\n{}\r\n",
            if expect { "expect: 100-continue\r\n" } else { "" }
        );
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.write_all(head.as_bytes()).unwrap();
        if !expect {
            c.write_all(&vec![b' '; 1_200_000]).unwrap();
        }
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).expect("an answer within 3 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    for expect in [true, false] {
        let raw = raw(expect);
        assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
        assert!(
            raw.contains("request_too_large") && raw.contains("x-memory-status"),
            "{raw}"
        );
    }
    // Without content-length (chunked): refused once the limit is crossed, after the rest of the
    // body was read; three times the limit, so that it cannot all sit in a socket buffer.
    let chunks =
        futures_util::stream::iter((0..30).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 100_000]))));
    let res = reqwest::Client::new()
        .post(s.url("/v1/messages"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(s.post(&hello(2)).await.status(), 200);
}

#[tokio::test]
async fn static_headers_from_config_and_on_reject_mode() {
    let s = Server::start_with(&[
        ("PENSIEVE_SERVER__HEADERS", "{x-served-by=\"pensieve-test\"}"),
        ("PENSIEVE_MEMORY__HEADERS", "on_reject"),
    ]);
    let res = s.post(&hello(2)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-served-by"], "pensieve-test");
    assert!(!res.headers().contains_key("x-memory-status"));
    assert!(res.headers().contains_key("request-id"));
}

#[tokio::test]
async fn json_logs_carry_one_span_per_request_with_tokens() {
    let s = Server::start_with(&[("PENSIEVE_LOG__FORMAT", "json")]);
    assert_eq!(s.post(&hello(7)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = s.log();
    let finished: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == "request finished" && v["span"]["path"] == "/v1/messages")
        .unwrap_or_else(|| panic!("no finished line in:\n{log}"));
    let span = &finished["span"];
    assert!(span["id"].as_str().unwrap().starts_with("req_"));
    assert_eq!(span["method"], "POST");
    assert_eq!(span["tier"], "Safe");
    assert_eq!(span["output_tokens"], 7);
    assert!(span["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(finished["fields"]["status"], 200);
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_time_to_first_token() {
    let s = Server::start();
    assert_eq!(s.post(&hello(5)).await.status(), 200);
    assert_eq!(
        s.post_stream(&hello(4))
            .await
            .text()
            .await
            .unwrap()
            .matches("event: message_stop")
            .count(),
        1
    );
    assert_eq!(reqwest::get(s.url("/v1/nope")).await.unwrap().status(), 404);
    let res = reqwest::get(s.url("/metrics")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().contains("openmetrics"));
    let text = res.text().await.unwrap();
    for line in [
        r#"pensieve_requests_total{route="/v1/messages",status="200"} 2"#,
        r#"pensieve_requests_total{route="other",status="404"} 1"#,
        "pensieve_output_tokens_total 9",
        "pensieve_time_to_first_token_seconds_count 2",
        "pensieve_generation_tokens_per_second_count 2",
        "pensieve_generations_running 0",
        "pensieve_backend_cache_bytes 0",
        "pensieve_memory_tier 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    let avail = text
        .lines()
        .find(|l| l.starts_with("pensieve_memory_available_bytes "))
        .unwrap();
    assert!(avail.split(' ').nth(1).unwrap().parse::<f64>().unwrap() > 0.0);
}
