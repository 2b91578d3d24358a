//! Overload, vanishing clients, bad input and shutdown, against the real server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn overload_gets_prompt_429s_and_every_request_an_answer() {
    let s = Server::start_with(&[
        ("PENSIEVE_BACKEND__MAX_QUEUE", "2"),
        ("PENSIEVE_BACKEND__QUEUE_TIMEOUT_MS", "1500"),
    ]);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let client = client.clone();
            let url = s.url("/v1/messages");
            tokio::spawn(async move {
                let t = Instant::now();
                let res = client
                    .post(url)
                    .json(&hello(300))
                    .send()
                    .await
                    .expect("no connection reset");
                let status = res.status().as_u16();
                let retry = res.headers().get("retry-after").is_some();
                let body: Value = res.json().await.unwrap();
                (status, retry, body, t.elapsed())
            })
        })
        .collect();
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        let (status, retry, body, took) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert!(retry, "429 without retry-after");
                assert_eq!(body["error"]["type"], "rate_limit_error");
                // Refused at once (queue full) or after the queue timeout, never later.
                assert!(took < Duration::from_secs(5), "429 took {took:?}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok >= 1 && limited >= 1, "ok {ok}, limited {limited}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let b = s.idle_backend().await;
    assert_eq!(
        (
            b["active_generations"].clone(),
            b["queued"].clone(),
            b["cache_bytes"].clone()
        ),
        (json!(0), json!(0), json!(0)),
        "{b}"
    );
}

#[tokio::test]
async fn a_disconnect_storm_leaves_nothing_running_and_no_cache() {
    let s = Server::start_with(&[("PENSIEVE_BACKEND__MAX_QUEUE", "64")]);
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..30u64)
        .map(|i| {
            let client = client.clone();
            let url = s.url("/v1/messages");
            tokio::spawn(async move {
                let mut body = hello(2000);
                body["stream"] = json!(true);
                // Cut at different points: before the answer, during it, after some tokens.
                let cut = Duration::from_millis((i * 37) % 600);
                let _ = tokio::time::timeout(cut, async {
                    let res = client.post(url).json(&body).send().await.unwrap();
                    let mut stream = res.bytes_stream();
                    while stream.next().await.is_some() {}
                })
                .await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let b = loop {
        let b = s.health().await["backend"].clone();
        if (b["active_generations"] == 0 && b["queued"] == 0) || Instant::now() > deadline {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(b["active_generations"], 0, "{b}");
    assert_eq!(b["queued"], 0, "{b}");
    assert_eq!(b["cache_bytes"], 0, "{b}");
    let log = s.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(s.post(&hello(3)).await.status(), 200);
}

/// Malformed requests: every one a 4xx in Anthropic's shape whose message names the problem.
#[tokio::test]
async fn a_corpus_of_bad_requests_gets_named_4xx_errors_and_the_server_serves_on() {
    let s = Server::start_with(&[("PENSIEVE_SERVER__MAX_BODY_MB", "1")]);
    let ok = r#""model":"demo","max_tokens":5"#;
    let user = r#"[{"role":"user","content":"hi"}]"#;
    let deep = format!(
        r#"{{"model":"demo","max_tokens":5,"messages":[],"metadata":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let long = "word ".repeat(160_000);
    let mut cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("POST", "/v1/messages", b"".to_vec(), 400, "empty"),
        ("POST", "/v1/messages", b"hello".to_vec(), 400, "not valid JSON"),
        ("POST", "/v1/messages", b"{".to_vec(), 400, "not valid JSON"),
        ("POST", "/v1/messages", b"[]".to_vec(), 400, "JSON object"),
        ("POST", "/v1/messages", b"null".to_vec(), 400, "JSON object"),
        ("POST", "/v1/messages", b"42".to_vec(), 400, "JSON object"),
        ("POST", "/v1/messages", b"\"text\"".to_vec(), 400, "JSON object"),
        ("POST", "/v1/messages", deep.into_bytes(), 400, "recursion limit"),
        (
            "POST",
            "/v1/messages",
            b"{\"model\":\"demo\",\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"
                .to_vec(),
            400,
            "not valid JSON",
        ),
    ];
    let fields: Vec<(String, &str)> = vec![
        (format!(r#"{{"max_tokens":5,"messages":{user}}}"#), "model"),
        (format!(r#"{{"model":"demo","messages":{user}}}"#), "max_tokens"),
        (format!(r#"{{{ok}}}"#), "messages"),
        (format!(r#"{{"model":5,"max_tokens":5,"messages":{user}}}"#), "model"),
        (
            format!(r#"{{"model":"demo","max_tokens":-1,"messages":{user}}}"#),
            "max_tokens",
        ),
        (
            format!(r#"{{"model":"demo","max_tokens":1.5,"messages":{user}}}"#),
            "max_tokens",
        ),
        (
            format!(r#"{{"model":"demo","max_tokens":99999999999,"messages":{user}}}"#),
            "max_tokens",
        ),
        (
            format!(r#"{{"model":"demo","max_tokens":0,"messages":{user}}}"#),
            "max_tokens",
        ),
        (format!(r#"{{{ok},"messages":{{}}}}"#), "messages"),
        (format!(r#"{{{ok},"messages":[]}}"#), "messages"),
        (format!(r#"{{{ok},"messages":[1]}}"#), "messages[0]"),
        (format!(r#"{{{ok},"messages":[{{"content":"hi"}}]}}"#), "role"),
        (format!(r#"{{{ok},"messages":[{{"role":"user"}}]}}"#), "content"),
        (
            format!(r#"{{{ok},"messages":[{{"role":"wizard","content":"hi"}}]}}"#),
            "messages[0].role",
        ),
        (
            format!(r#"{{{ok},"messages":[{{"role":"user","content":5}}]}}"#),
            "messages[0].content",
        ),
        (
            format!(r#"{{{ok},"messages":[{{"role":"user","content":[5]}}]}}"#),
            "messages[0].content",
        ),
        (
            format!(r#"{{{ok},"messages":[{{"role":"user","content":[{{"text":"x"}}]}}]}}"#),
            "type",
        ),
        (
            format!(r#"{{{ok},"messages":[{{"role":"user","content":[{{"type":"hologram"}}]}}]}}"#),
            "hologram",
        ),
        (
            format!(r#"{{{ok},"messages":[{{"role":"user","content":[{{"type":"text"}}]}}]}}"#),
            "text",
        ),
        (
            format!(r#"{{{ok},"messages":[{{"role":"user","content":[{{"type":"text","text":7}}]}}]}}"#),
            "messages[0].content[0]",
        ),
        (
            format!(
                r#"{{{ok},"messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"!!!not base64"}}}}]}}]}}"#
            ),
            "images",
        ),
        (
            format!(r#"{{{ok},"messages":[{{"role":"user","content":[{{"type":"document","source":{{}}}}]}}]}}"#),
            "document",
        ),
        (
            format!(
                r#"{{{ok},"messages":[{{"role":"user","content":[{{"type":"tool_use","id":"t","name":"n","input":{{}}}}]}}]}}"#
            ),
            "tool_use",
        ),
        (
            format!(r#"{{{ok},"messages":[{{"role":"user","content":[{{"type":"tool_result"}}]}}]}}"#),
            "tool_use_id",
        ),
        (format!(r#"{{{ok},"messages":{user},"system":5}}"#), "system"),
        (
            format!(r#"{{{ok},"messages":{user},"system":[{{"type":"image","source":{{}}}}]}}"#),
            "system",
        ),
        (format!(r#"{{{ok},"messages":{user},"stream":"yes"}}"#), "stream"),
        (
            format!(r#"{{{ok},"messages":{user},"temperature":"hot"}}"#),
            "temperature",
        ),
        (
            format!(r#"{{{ok},"messages":{user},"temperature":1.5}}"#),
            "temperature",
        ),
        (format!(r#"{{{ok},"messages":{user},"top_p":2}}"#), "top_p"),
        (format!(r#"{{{ok},"messages":{user},"top_k":-3}}"#), "top_k"),
        (
            format!(r#"{{{ok},"messages":{user},"stop_sequences":"END"}}"#),
            "stop_sequences",
        ),
        (
            format!(r#"{{{ok},"messages":{user},"stop_sequences":[1]}}"#),
            "stop_sequences",
        ),
        (format!(r#"{{{ok},"messages":{user},"tools":{{}}}}"#), "tools"),
        (
            format!(r#"{{{ok},"messages":{user},"tools":[{{"description":"no name"}}]}}"#),
            "name",
        ),
        (
            format!(r#"{{{ok},"messages":{user},"tool_choice":{{"type":"sometimes"}}}}"#),
            "tool_choice",
        ),
        (
            format!(r#"{{{ok},"messages":{user},"tool_choice":{{"type":"tool","name":"missing"}}}}"#),
            "missing",
        ),
        (
            format!(r#"{{{ok},"messages":[{{"role":"user","content":"{long}"}}]}}"#),
            "prompt is too long",
        ),
    ];
    // Conversations Anthropic refuses: the same call id twice, a call left unanswered, a call
    // answered twice; and bytes after the body's object.
    let call = |id: &str| {
        format!(r#"{{"role":"assistant","content":[{{"type":"tool_use","id":"{id}","name":"t","input":{{}}}}]}}"#)
    };
    let result = |id: &str| format!(r#"{{"type":"tool_result","tool_use_id":"{id}","content":"ok"}}"#);
    let turn = |blocks: &str| format!(r#"{{"role":"user","content":[{blocks}]}}"#);
    let conversations = [
        (
            format!(
                r#"{{{ok},"messages":[{{"role":"user","content":"go"}},{},{},{},{}]}}"#,
                call("a"),
                turn(&result("a")),
                call("a"),
                turn(&result("a"))
            ),
            "ids must be unique",
        ),
        (
            format!(
                r#"{{{ok},"messages":[{{"role":"user","content":"go"}},{},{{"role":"user","content":"and?"}}]}}"#,
                call("a")
            ),
            "has no tool_result",
        ),
        (
            format!(
                r#"{{{ok},"messages":[{{"role":"user","content":"go"}},{},{}]}}"#,
                call("a"),
                turn(&format!("{},{}", result("a"), result("a")))
            ),
            "answered twice",
        ),
        (format!(r#"{{{ok},"messages":{user}}} {{}}"#), "not valid JSON"),
    ];
    for (body, needle) in &fields {
        cases.push(("POST", "/v1/messages", body.clone().into_bytes(), 400, needle));
    }
    for (body, needle) in &conversations {
        cases.push(("POST", "/v1/messages", body.clone().into_bytes(), 400, needle));
    }
    // OpenAI's ranges and conversations, named in OpenAI's `param`.
    let chat = |more: &str| format!(r#"{{"model":"demo","max_tokens":5,"messages":{user}{more}}}"#).into_bytes();
    let openai: Vec<(&str, Vec<u8>, &str)> = vec![
        ("/v1/chat/completions", chat(r#","temperature":3"#), "temperature"),
        ("/v1/chat/completions", chat(r#","temperature":-1"#), "temperature"),
        ("/v1/chat/completions", chat(r#","temperature":1e308"#), "temperature"),
        ("/v1/chat/completions", chat(r#","top_p":2"#), "top_p"),
        (
            "/v1/chat/completions",
            br#"{"model":"demo","messages":[{"role":"user","content":"hi"},{"role":"tool","tool_call_id":"call_9","content":"x"}]}"#.to_vec(),
            "call_9",
        ),
        ("/v1/responses", br#"{"model":"demo","input":[]}"#.to_vec(), "input"),
        ("/v1/responses", br#"{"model":"demo","input":"hi","top_p":-1}"#.to_vec(), "top_p"),
        (
            "/v1/responses",
            br#"{"model":"demo","input":[{"type":"function_call_output","call_id":"call_9","output":"x"}]}"#.to_vec(),
            "call_9",
        ),
    ];
    for (path, body, needle) in openai {
        cases.push(("POST", path, body, 400, needle));
    }
    // Over the limit by content-length: answered after the body is read, never a reset
    // (several times, and large enough that the body cannot sit in a socket buffer).
    for size in [1_100_000, 3_900_000, 1_100_000, 3_900_000] {
        cases.push(("POST", "/v1/messages", vec![b' '; size], 413, "larger than the limit"));
    }
    cases.push(("GET", "/v1/unknown", vec![], 404, "/v1/unknown"));
    cases.push(("GET", "/v2/messages", vec![], 404, "/v2/messages"));
    cases.push(("GET", "/v1/messages", vec![], 405, "GET"));
    cases.push(("DELETE", "/v1/messages", vec![], 405, "DELETE"));
    cases.push(("PUT", "/v1/models", vec![], 405, "PUT"));
    cases.push((
        "POST",
        "/v1/messages/count_tokens",
        b"{]".to_vec(),
        400,
        "not valid JSON",
    ));
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let client = reqwest::Client::new();
    for (method, path, body, status, needle) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let len = body.len();
        let res = client
            .request(method.clone(), s.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} ({len} bytes): {e}"));
        let what = format!("{method} {path} expecting {status}/{needle}");
        assert_eq!(res.status().as_u16(), status, "{what}");
        assert!(res.headers().contains_key("request-id"), "{what}");
        let v: Value = res.json().await.unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        if path.starts_with("/v1/chat/") || path.starts_with("/v1/responses") {
            assert!(
                v["error"]["param"].is_string(),
                "{what}: OpenAI's param names the field: {v}"
            );
        } else {
            assert_eq!(v["type"], "error", "{what}");
        }
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{what}: {msg}");
        assert!(
            v["error"]["type"].as_str().unwrap().ends_with("error") || status == 413,
            "{what}"
        );
    }
    assert!(!s.log().contains("panicked"));
    assert_eq!(s.post(&hello(3)).await.status(), 200);
    assert_eq!(s.health().await["backend"]["cache_bytes"], 0);
}

#[tokio::test]
async fn sigterm_lets_a_running_stream_finish_then_exits_zero() {
    let mut s = Server::start();
    let res = s.post_stream(&hello(300)).await;
    let mut stream = res.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("message_start"));
    s.signal("TERM");
    let mut rest = String::new();
    while let Some(chunk) = stream.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(rest.contains("message_stop"), "the stream was cut: {rest}");
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Some(0), "{}", s.log());
    assert!(s.log().contains("shutting down"));
}

#[tokio::test]
async fn sigterm_with_no_grace_aborts_running_work_and_exits_zero() {
    let mut s = Server::start_with(&[("PENSIEVE_SERVER__SHUTDOWN_GRACE_SECS", "0")]);
    let res = s.post_stream(&hello(20_000)).await;
    let mut stream = res.bytes_stream();
    stream.next().await.unwrap().unwrap();
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Some(0), "{}", s.log());
    // The client sees the stream end with an error event that says why, not a bare cut.
    let mut rest = String::new();
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(chunk)) = stream.next().await {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(drained.is_ok());
    let error = rest
        .split("event: error\ndata: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no error event: {rest}"));
    assert!(
        error.contains("overloaded_error") && error.contains("shutting down"),
        "{error}"
    );
    assert!(!rest.contains("message_stop"));
    assert!(s.log().contains("answer cut"), "the cut is logged: {}", s.log());
}

#[tokio::test]
async fn a_second_signal_ends_the_grace_at_once() {
    let mut s = Server::start_with(&[("PENSIEVE_SERVER__SHUTDOWN_GRACE_SECS", "60")]);
    // A request in flight (its body still coming) keeps the server in its grace...
    let _busy = raw(
        &s,
        b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(1)), None, "it waits for the request");
    // ...until a second signal.
    s.signal("INT");
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0), "{}", s.log());
    assert!(s.log().contains("a second signal"), "{}", s.log());
}

/// Sends `bytes` on a raw connection to `s`.
fn raw(s: &Server, bytes: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
    c.write_all(bytes).unwrap();
    c
}

/// Seconds until the server closes `c` (reads to its end), at most `limit`.
fn closed_after(c: &mut std::net::TcpStream, limit: Duration) -> (f64, String) {
    use std::io::Read;
    c.set_read_timeout(Some(limit)).unwrap();
    let t = Instant::now();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    (t.elapsed().as_secs_f64(), String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn idle_and_slow_sockets_cannot_keep_a_request_out() {
    let s = Server::start_with(&[
        ("PENSIEVE_SERVER__MAX_CONNECTIONS", "8"),
        ("PENSIEVE_SERVER__HEADER_TIMEOUT_SECS", "3"),
        ("PENSIEVE_SERVER__BODY_TIMEOUT_SECS", "3"),
    ]);
    // Slowloris: 16 connections (twice the limit) sending their heads a byte every 2 s, and 40
    // that send nothing at all. A normal request is served at once all the same: a connection
    // without a whole head does not keep a new one out.
    let slow: Vec<_> = (0..16).map(|_| raw(&s, b"POST /v1/messages HTTP/1.1\r\n")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drip = std::thread::spawn({
        let stop = stop.clone();
        let mut slow: Vec<_> = slow.iter().map(|c| c.try_clone().unwrap()).collect();
        move || {
            use std::io::Write;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for c in &mut slow {
                    let _ = c.write_all(b"X");
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    });
    let idle: Vec<_> = (0..40).map(|_| raw(&s, b"")).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let t = Instant::now();
        let res = reqwest::Client::new()
            .post(s.url("/v1/messages"))
            .json(&hello(2))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("served");
        assert_eq!(res.status(), 200);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "waited {:?} behind idle sockets",
            t.elapsed()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drip.join().unwrap();
    drop((slow, idle));

    // A head that never ends is closed at the header timeout; so is a keep-alive connection
    // left idle after its answer.
    let mut c = raw(&s, b"GET /health HTTP/1.1\r\nHost: localhost\r\n");
    let (secs, _) = closed_after(&mut c, Duration::from_secs(10));
    assert!((2.5..6.0).contains(&secs), "a half head held {secs} s");
    let mut c = raw(&s, b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (secs, answer) = closed_after(&mut c, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        (2.5..6.0).contains(&secs),
        "an idle keep-alive connection held {secs} s"
    );
    // A body sent a byte at a time fails at the body timeout, with a 400 that says so.
    let mut c = raw(
        &s,
        b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
    );
    let writer = {
        use std::io::Write;
        let mut w = c.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..8 {
                std::thread::sleep(Duration::from_secs(1));
                if w.write_all(b" ").is_err() {
                    return;
                }
            }
        })
    };
    let (secs, answer) = closed_after(&mut c, Duration::from_secs(15));
    let _ = writer.join();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("server.body_timeout_secs"), "{answer}");
    assert!(secs < 6.0, "the slow body held {secs} s");
}

#[tokio::test]
async fn connections_with_requests_in_flight_are_bounded_and_new_ones_wait_for_them() {
    let s = Server::start_with(&[("PENSIEVE_SERVER__MAX_CONNECTIONS", "2")]);
    // Two requests in flight (their heads in, their bodies still coming) take both slots: a
    // third connection waits...
    let head = b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{";
    let busy = [raw(&s, head), raw(&s, head)];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let blocked = reqwest::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .unwrap()
        .get(s.url("/health"))
        .send()
        .await;
    assert!(
        blocked.is_err(),
        "a third connection was served while two requests ran: {blocked:?}"
    );
    assert!(s.log().contains("connection limit reached"));
    // ...and is served once one of them ends.
    drop(busy);
    let res = reqwest::Client::new()
        .get(s.url("/health/live"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("served once a slot was free");
    assert_eq!(res.status(), 200);
    assert_eq!(s.post(&hello(2)).await.status(), 200);
}

#[tokio::test]
async fn a_web_page_cannot_drive_the_local_server() {
    let s = Server::start_with(&[("PENSIEVE_SERVER__ALLOWED_ORIGINS", r#"["https://app.example"]"#)]);
    let client = reqwest::Client::new();
    let body = serde_json::to_vec(&hello(2)).unwrap();
    let post = |content_type: &'static str, origin: Option<&'static str>| {
        let mut req = client
            .post(s.url("/v1/messages"))
            .header("content-type", content_type)
            .body(body.clone());
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        req.send()
    };
    // A form or a `text/plain` POST (what a page sends without a preflight) is refused, from
    // anywhere: a 415 that says why.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let res = post(ct, None).await.unwrap();
        assert_eq!(res.status(), 415, "{ct}");
        let v: Value = res.json().await.unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains("application/json"),
            "{v}"
        );
    }
    // A cross-site page is refused even with JSON; a page of this machine, or an allowed
    // origin, is served with CORS headers.
    let res = post("application/json", Some("https://evil.example")).await.unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["type"], "permission_error");
    for origin in ["http://localhost:3000", "https://app.example"] {
        let res = post("application/json", Some(origin)).await.unwrap();
        assert_eq!(res.status(), 200, "{origin}");
        assert_eq!(res.headers()["access-control-allow-origin"], origin);
    }
    let preflight = client
        .request(reqwest::Method::OPTIONS, s.url("/v1/messages"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert!(preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("x-api-key"));
    // DNS rebinding: a name that resolves here but is not a loopback name is refused, on every
    // route (the server is bound to 127.0.0.1).
    for path in ["/v1/messages", "/health"] {
        let res = client
            .get(s.url(path))
            .header("host", "rebind.evil.example:7777")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 403, "{path}");
    }
    assert_eq!(client.get(s.url("/health")).send().await.unwrap().status(), 200);
}

/// The server's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The longest wait between two chunks of a running stream, until it ends.
fn longest_gap(
    mut running: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        let (mut last, mut worst) = (Instant::now(), Duration::ZERO);
        while let Some(chunk) = running.next().await {
            chunk.unwrap();
            worst = worst.max(last.elapsed());
            last = Instant::now();
        }
        worst
    })
}

#[tokio::test]
async fn a_prompt_far_over_the_context_is_refused_before_it_is_tokenised() {
    let s = Server::start();
    let pid = s.pid();
    // Warm: the model has answered once (its context and vocabulary are known).
    assert_eq!(s.post(&hello(2)).await.status(), 200);
    let before = rss(pid);
    // Peak memory while the big requests are handled, sampled every 5 ms.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        }
    });
    // A stream runs meanwhile; its tokens keep coming.
    let mut running = s.post_stream(&hello(2_000)).await.bytes_stream();
    running.next().await.unwrap().unwrap();
    let gaps = longest_gap(running);
    for (mb, path) in [
        (8usize, "/v1/messages"),
        (30, "/v1/messages"),
        (8, "/v1/messages/count_tokens"),
    ] {
        let body = json!({"model": "demo", "max_tokens": 5,
            "messages": [{"role": "user", "content": "word ".repeat((mb << 20) / 5)}]});
        let t = Instant::now();
        let res = reqwest::Client::new()
            .post(s.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let took = t.elapsed();
        assert_eq!(res.status(), 400, "{mb} MB on {path}");
        let v: Value = res.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("prompt is too long: at least"),
            "{v}"
        );
        assert!(took < Duration::from_secs(5), "{mb} MB on {path} took {took:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let grew = peak.saturating_sub(before);
    println!(
        "RSS {} MB before, peak {} MB (+{} MB)",
        before >> 20,
        peak >> 20,
        grew >> 20
    );
    assert!(grew < 100 << 20, "RSS grew {} MB", grew >> 20);
    let worst = gaps.await.unwrap();
    println!("the running stream's longest gap: {worst:?}");
    assert!(worst < Duration::from_secs(2), "the running stream stalled {worst:?}");
    assert_eq!(s.post(&hello(2)).await.status(), 200);
}

#[tokio::test]
async fn a_long_prompt_under_the_bound_is_tokenised_off_the_batch_thread() {
    let s = Server::start();
    assert_eq!(s.post(&hello(2)).await.status(), 200);
    // A stream runs meanwhile; its tokens keep coming.
    let mut running = s.post_stream(&hello(4_000)).await.bytes_stream();
    running.next().await.unwrap().unwrap();
    let gaps = longest_gap(running);
    // 2.5 MB: under the cheap bound (the demo model's context × its longest token's bytes), so
    // it is really tokenised: ~1.5 s of template and tokenizer here, which on the batch thread
    // would stall the stream that long, each time.
    let text = "word ".repeat((5 << 20) / 10);
    let t = Instant::now();
    let res = reqwest::Client::new()
        .post(s.url("/v1/messages/count_tokens"))
        .json(&json!({"model": "demo", "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let v: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(v["input_tokens"].as_u64().unwrap() > 131_072, "{v}");
    let counted = t.elapsed();
    let res = s
        .post(&json!({"model": "demo", "max_tokens": 5, "messages": [{"role": "user", "content": text}]}))
        .await;
    let status = res.status();
    let v: Value = res.json().await.unwrap();
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("prompt is too long"),
        "{v}"
    );
    let worst = gaps.await.unwrap();
    println!("count_tokens of 2.5 MB took {counted:?}; the running stream's longest gap: {worst:?}");
    assert!(
        worst < counted / 2,
        "the running stream stalled {worst:?} while a prompt took {counted:?} to count"
    );
    assert_eq!(s.post(&hello(2)).await.status(), 200);
}
