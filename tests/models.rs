//! Several models in one server, for real: the demo model and the real SmolLM2 GGUF through the
//! real bridge, loaded on demand, routed by name, alias and glob, unloaded after their idle
//! time and when memory reaches Warning (a real memory cgroup and a real allocator), with the
//! memory back for real; a load that cannot fit refused; unknown names by both fallbacks.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cgroup::{push_to, tier, Allocator, Cgroup};
use common::*;
use serde_json::{json, Value};

const SMOLLM2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

fn smollm2() -> &'static str {
    assert!(Path::new(SMOLLM2).exists(), "{SMOLLM2} is missing: run `make smollm2`");
    SMOLLM2
}

/// Writes `toml` to a file in `dir`; its path.
fn config(dir: &Path, toml: &str) -> String {
    let path = dir.join("pensieve.toml");
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_owned()
}

fn ask(model: &str, max_tokens: u32) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Say hi"}]})
}

/// `/health`'s entry for `name`.
fn model_of(health: &Value, name: &str) -> Value {
    health["backend"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no model {name}: {health}"))
        .clone()
}

async fn wait_model(s: &Server, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = s.health().await;
        if f(&model_of(&h, name)) {
            return h;
        }
        assert!(Instant::now() < deadline, "{name} never {what}: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The server process's resident memory, from /proc.
fn rss(s: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

async fn metric(s: &Server, line_start: &str) -> f64 {
    let text = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start).map(|v| v.trim().parse::<f64>().unwrap()))
        .unwrap_or_else(|| panic!("no `{line_start}` in:\n{text}"))
}

#[tokio::test]
async fn models_load_on_demand_are_routed_by_alias_and_glob_and_unload_when_idle_giving_memory_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = config(
        dir.path(),
        &format!(
            r#"
[server]
default_model = "demo"
fallback = "404"
[models.demo]
path = "demo"
aliases = ["claude-sonnet-*", "claude-opus-*"]
[models.small]
path = "{}"
aliases = ["claude-haiku-*", "haiku"]
keep_alive_secs = 4
"#,
            smollm2()
        ),
    );
    // Its own cgroup (far above what it uses), so that the memory snapshot is this server's alone.
    let cg = Cgroup::create(&format!("pensieve-models-{}", std::process::id()), 6 << 30);
    let s = Server::start_in_cgroup_with(&cg.procs(), &format!("--config {file}"), &[]);
    let h = s.health().await;
    assert_eq!(h["memory"]["source"], "cgroup", "{h}");
    assert_eq!(model_of(&h, "demo")["state"], "loaded");
    assert_eq!(model_of(&h, "small")["state"], "unloaded");
    assert!(
        model_of(&h, "small")["estimated_bytes"].as_u64().unwrap() > 90 << 20,
        "{h}"
    );
    let listed: Value = reqwest::get(s.url("/v1/models")).await.unwrap().json().await.unwrap();
    let listed: Vec<(String, bool)> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_owned(), m["loaded"].as_bool().unwrap()))
        .collect();
    assert_eq!(listed, [("demo".to_owned(), true), ("small".to_owned(), false)]);
    let before_load = (rss(&s), h["memory"]["available_bytes"].as_u64().unwrap());

    // Claude Code's small-model name, by glob: SmolLM2 loads for it and answers.
    let r = s.post(&ask("claude-haiku-4-5-20251001", 8)).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["model"], "small", "{body}");
    assert!(!body["content"][0]["text"].as_str().unwrap().is_empty(), "{body}");
    let h = s.health().await;
    let small = model_of(&h, "small");
    let bytes = small["bytes"].as_u64().unwrap();
    assert!(
        small["loaded"] == true && small["loads"] == 1 && bytes > 80 << 20,
        "{small}"
    );
    let loaded = (rss(&s), h["memory"]["available_bytes"].as_u64().unwrap());
    assert!(
        loaded.0 > before_load.0 + bytes / 2,
        "RSS {before_load:?} -> {loaded:?}, model {bytes}"
    );
    let got: Value = reqwest::get(s.url("/v1/models/claude-haiku-3"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (got["id"].as_str(), got["loaded"].as_bool()),
        (Some("small"), Some(true)),
        "{got}"
    );

    // Both models at once: a long stream on the default model (by glob), SmolLM2 by exact alias.
    // 3,000 tokens: still running 300 ms in (the demo model gives ~1,000 tokens/s here).
    let long_body = ask("claude-sonnet-4-5", 3000);
    let (long, short) = tokio::join!(s.post_stream(&long_body), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let h = s.health().await;
        (s.post(&ask("haiku", 8)).await, h)
    });
    let (short, during) = short;
    assert_eq!(model_of(&during, "demo")["active_generations"], 1, "{during}");
    assert_eq!(short.status(), 200);
    assert_eq!(short.json::<Value>().await.unwrap()["model"], "small");
    let events = parse_sse(&long.text().await.unwrap());
    assert_eq!(events[0].data["message"]["model"], "demo");
    assert_eq!(events.last().unwrap().event, "message_stop");

    // A name nothing answers to, with fallback = "404".
    let r = s.post(&ask("gpt-4o", 8)).await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    let message = e["error"]["message"].as_str().unwrap();
    assert_eq!(e["error"]["type"], "not_found_error");
    assert!(message.contains("`gpt-4o`") && message.contains("claude-haiku-*") && message.contains("small"));

    // Idle past keep_alive_secs: unloaded, and the memory is back (MLX, the process, the cgroup).
    let h = wait_model(&s, "small", "unloaded", |m| m["state"] == "unloaded").await;
    let small = model_of(&h, "small");
    assert_eq!(
        (small["unloads_idle"].as_u64(), small["bytes"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(
        h["backend"]["active_bytes"].as_u64().unwrap() < 16 << 20,
        "MLX still holds memory: {h}"
    );
    tokio::time::sleep(Duration::from_millis(600)).await; // a memory sample or two
    let h = s.health().await;
    let after = (rss(&s), h["memory"]["available_bytes"].as_u64().unwrap());
    println!(
        "RSS and available: before load {before_load:?}, loaded {loaded:?}, unloaded {after:?}; model {bytes} bytes"
    );
    assert!(after.0 + bytes / 2 < loaded.0, "RSS {loaded:?} -> {after:?}");
    assert!(after.1 > loaded.1 + bytes / 2, "available {loaded:?} -> {after:?}");
    assert_eq!(metric(&s, "pensieve_model_loads_total{model=\"small\"}").await, 1.0);
    assert_eq!(
        metric(&s, "pensieve_model_unloads_total{model=\"small\",reason=\"idle\"}").await,
        1.0
    );
    assert_eq!(
        metric(&s, "pensieve_model_generations_total{model=\"small\"}").await,
        2.0
    );
    assert!(metric(&s, "pensieve_model_load_seconds_total{model=\"small\"}").await > 0.0);

    // A stream for an unloaded model: it loads again, and the stream is whole.
    let r = s.post_stream(&ask("haiku", 8)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    // A load longer than a second begins the stream with SSE comments (src/api/sse.rs tests it).
    println!(
        "stream while loading began with a comment: {}",
        text.starts_with(": loading model small")
    );
    let events = parse_sse(&text);
    assert_eq!(events[0].event, "message_start");
    assert_eq!(events[0].data["message"]["model"], "small");
    assert_eq!(events.last().unwrap().event, "message_stop");
    assert_eq!(model_of(&s.health().await, "small")["loads"], 2);
    assert_eq!(s.idle_backend().await["cache_bytes"], 0);

    // The same for an OpenAI stream, once it has unloaded again: chunks in OpenAI's shape.
    wait_model(&s, "small", "unloaded again", |m| m["state"] == "unloaded").await;
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "haiku", "max_tokens": 8, "stream": true,
            "messages": [{"role": "user", "content": "Say hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let first = text.lines().find(|l| l.starts_with("data: ")).unwrap();
    let chunk: Value = serde_json::from_str(&first["data: ".len()..]).unwrap();
    assert_eq!(
        (chunk["object"].as_str(), chunk["model"].as_str()),
        (Some("chat.completion.chunk"), Some("small"))
    );
    assert_eq!(model_of(&s.health().await, "small")["loads"], 3);
}

#[tokio::test]
async fn unknown_names_get_the_default_model_and_a_load_that_cannot_fit_is_a_503_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.gguf");
    sparse_gguf(&huge, 32 << 30); // 64 GB of float16 claimed
    let file = config(
        dir.path(),
        &format!(
            r#"
[server]
default_model = "demo"
[models.demo]
path = "demo"
[models.huge]
path = "{}"
aliases = ["claude-opus-*"]
"#,
            huge.display()
        ),
    );
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["serve", "--port", "0", "--config", &file]);
    let s = Server::start_command(cmd);
    let r = s.post(&ask("gpt-4o", 4)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["model"], "demo");

    let started = Instant::now();
    let r = s.post(&ask("claude-opus-4-1", 4)).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "overloaded_error");
    let message = e["error"]["message"].as_str().unwrap();
    for needle in [
        "`huge`",
        "would not fit",
        "64.00 GB of weights",
        "is available",
        "memory.warning_gb",
    ] {
        assert!(message.contains(needle), "`{needle}` not in {message}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "nothing was read");
    let h = s.health().await;
    assert_eq!(model_of(&h, "huge")["state"], "unloaded");
    assert_eq!(model_of(&h, "demo")["state"], "loaded");
    // Streamed: the same refusal, as an HTTP error (the refusal comes before any stream).
    let r = s.post_stream(&ask("huge", 4)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(s.post(&ask("demo", 4)).await.status(), 200);
    // On the OpenAI routes, the same refusal in OpenAI's shape.
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "huge", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "overloaded", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("`huge`"), "{e}");
}

#[tokio::test]
async fn an_idle_model_is_unloaded_when_memory_reaches_warning_and_the_default_stays() {
    const LIMIT: u64 = 2 << 30;
    let dir = tempfile::tempdir().unwrap();
    let file = config(
        dir.path(),
        &format!(
            r#"
[server]
default_model = "demo"
[memory]
warning_gb = 0.5
critical_gb = 0.3
emergency_gb = 0.2
sample_interval_ms = 100
[models.demo]
path = "demo"
[models.small]
path = "{}"
aliases = ["haiku"]
max_concurrent = 1
"#,
            smollm2()
        ),
    );
    let cg = Cgroup::create(&format!("pensieve-models-warn-{}", std::process::id()), LIMIT);
    let s = Server::start_in_cgroup_with(&cg.procs(), &format!("--config {file}"), &[]);
    assert_eq!(s.post(&ask("haiku", 4)).await.status(), 200);
    let h = s.health().await;
    assert_eq!(model_of(&h, "small")["state"], "loaded", "{h}");
    assert_eq!(h["memory"]["status"], "Safe", "{h}");
    let held = model_of(&h, "small")["bytes"].as_u64().unwrap();

    let mut alloc = Allocator::start(&cg);
    let pushed = push_to(&s, &cg, &mut alloc, &["Warning", "Critical", "Emergency"]).await;
    let at = Instant::now();
    let h = wait_model(&s, "small", "unloaded for memory", |m| m["state"] == "unloaded").await;
    println!(
        "unloaded {:?} after the tier left Safe ({} at {} GB available); the model held {held} bytes",
        at.elapsed(),
        pushed["memory"]["status"],
        pushed["memory"]["available_gb"]
    );
    assert_eq!(model_of(&h, "small")["unloads_memory"], 1, "{h}");
    assert_eq!(model_of(&h, "demo")["state"], "loaded", "the default model stays");
    assert!(s.log().contains("memory left Safe: unloading an idle model"));
    assert_eq!(cg.oom_kills(), 0);

    alloc.send("free");
    // Safe again, and room for SmolLM2 above the warning threshold (0.27 GB with its KV cache):
    // Safe alone (0.55 GB with hysteresis) is not enough for it to load.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (t, h) = tier(&s).await;
        if t == "Safe" && h["memory"]["available_gb"].as_f64().unwrap() > 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "memory never came back: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = s.post(&ask("haiku", 4)).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(model_of(&s.health().await, "small")["loads"], 2);
}

/// The demo model (default, loaded) and SmolLM2 as `small`, loaded on its first request; the
/// server, and the folder its configuration is in.
fn demo_and_small_smollm2() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = config(
        dir.path(),
        &format!(
            "[server]\ndefault_model = \"demo\"\n[models.demo]\npath = \"demo\"\n[models.small]\npath = \"{}\"\n",
            smollm2()
        ),
    );
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["serve", "--port", "0", "--config", &file]);
    (Server::start_command(cmd), dir)
}

#[tokio::test]
async fn a_prompt_over_the_context_of_a_model_not_loaded_yet_is_refused_before_it_is_tokenised() {
    let (s, _dir) = demo_and_small_smollm2();
    // SmolLM2 is not loaded: the API cannot bound the prompt yet. 2 MB is at least 12,900
    // tokens by its longest token (162 bytes), over its 8,192: refused once it is loaded,
    // by that bound ("at least"), not after rendering two megabytes.
    let text = "word ".repeat((2 << 20) / 5);
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let res = reqwest::Client::new()
            .post(s.url(path))
            .json(&json!({"model": "small", "max_tokens": 4, "messages": [{"role": "user", "content": text}]}))
            .send()
            .await
            .unwrap();
        let status = res.status();
        let v: Value = res.json().await.unwrap();
        assert_eq!(status, 400, "{path}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("prompt is too long: at least"), "{path}: {message}");
    }
    assert_eq!(s.post(&ask("small", 2)).await.status(), 200);
}

#[tokio::test]
async fn a_load_reports_monotonic_progress_in_health_before_the_model_is_loaded() {
    let (s, _dir) = demo_and_small_smollm2();
    // The request loads SmolLM2; /health is read every few milliseconds meanwhile.
    let body = ask("small", 2);
    let ask_small = s.post(&body);
    let watch = async {
        let mut seen: Vec<(u64, u64)> = Vec::new();
        loop {
            let small = model_of(&s.health().await, "small");
            if small["state"] == "loaded" {
                return seen;
            }
            if let Some(p) = small.get("load_progress") {
                let now = (p["done_bytes"].as_u64().unwrap(), p["total_bytes"].as_u64().unwrap());
                if seen.last() != Some(&now) {
                    seen.push(now);
                }
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    };
    let (res, seen) = tokio::join!(ask_small, watch);
    assert_eq!(res.status(), 200);
    println!("progress seen: {seen:?}");
    // The last reading (all read) stays until the load ends (tokenizer, float32 weights), so
    // it is always seen; how many come before it depends on how fast the weights are read.
    assert!(!seen.is_empty(), "no progress while loading");
    let total = seen[0].1;
    assert!(total > 50 << 20, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0 && w[1].1 == total),
        "not monotonic: {seen:?}"
    );
    assert!(seen.iter().all(|&(done, t)| done <= t));
    assert!(s.log().contains("loading the model's weights"), "{}", s.log());
    // Loaded: no progress any more.
    assert!(model_of(&s.health().await, "small").get("load_progress").is_none());
}

#[tokio::test]
async fn a_draft_model_drafts_free_text_for_its_model_with_the_same_text_and_another_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // `small` and `drafter` are the same SmolLM2 file: the drafts are the model's own argmax,
    // nearly all kept. Prompt lookup is off, so every draft comes from the draft model. A draft
    // model as large as its model makes steps slower on this CPU, so after its first steps
    // the batch speculates only to probe (one step in 16): drafts are few, and all verified.
    let file = config(
        dir.path(),
        &format!(
            r#"
[backend]
prompt_lookup_tokens = 0
[server]
default_model = "demo"
[models.demo]
path = "demo"
[models.small]
path = "{0}"
draft = "drafter"
[models.drafter]
path = "{0}"
[models.mismatched]
path = "{0}"
draft = "demo"
"#,
            smollm2()
        ),
    );
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["serve", "--port", "0", "--config", &file]);
    let s = Server::start_command(cmd);
    let question = |model: &str| {
        json!({"model": model, "max_tokens": 60, "temperature": 0,
               "messages": [{"role": "user", "content": "Write a short poem about the sea."}]})
    };
    let mut texts = Vec::new();
    for model in ["drafter", "small"] {
        let r = s.post(&question(model)).await;
        assert_eq!(r.status(), 200);
        let reply: Value = r.json().await.unwrap();
        assert_eq!(reply["usage"]["output_tokens"], 60, "{reply}");
        texts.push(reply["content"][0]["text"].as_str().unwrap().to_owned());
    }
    assert_eq!(texts[0], texts[1], "the text changed with a draft model");
    let speculation = &model_of(&s.health().await, "small")["speculation"];
    let drafted = speculation["drafted_tokens"].as_u64().unwrap();
    let accepted = speculation["accepted_tokens"].as_u64().unwrap();
    let steps = speculation["sequence_steps"].as_u64().unwrap();
    println!("draft model: drafted {drafted}, accepted {accepted}, 60 tokens in {steps} steps");
    assert!(accepted > 0 && accepted <= drafted, "{speculation}");
    assert!(steps < 60, "{speculation}");
    assert_eq!(
        model_of(&s.health().await, "drafter")["speculation"]["drafted_tokens"],
        0
    );
    // A draft model with another tokenizer: the load fails, and says why.
    let r = s.post(&question("mismatched")).await;
    assert_eq!(r.status(), 500);
    let e: Value = r.json().await.unwrap();
    let message = e["error"]["message"].as_str().unwrap();
    for needle in [
        "could not load model `mismatched`",
        "models.mismatched.draft: `demo` cannot draft for it: its tokenizer is not the model's",
    ] {
        assert!(message.contains(needle), "`{needle}` not in {message}");
    }
    assert!(!message.contains("a local folder with config.json"), "{message}");
    assert_eq!(model_of(&s.health().await, "mismatched")["state"], "unloaded");
    assert_eq!(s.post(&question("small")).await.status(), 200);
}
