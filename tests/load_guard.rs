//! A model that would not fit is refused before a byte of it is read: its size comes from its
//! headers alone. Tested with a GGUF file whose tensor infos claim 64 GB (a sparse file: no
//! disk), run inside a 512 MiB memory cgroup so that a failure of the check could not hurt
//! the machine; and with the real SmolLM2 file against thresholds set above the machine.
//! Likewise a request whose KV cache would not fit is refused before its prompt is processed.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cgroup::Cgroup;
use common::*;

#[test]
fn a_model_whose_headers_claim_far_more_than_the_machine_has_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.gguf");
    sparse_gguf(&file, 32 << 30); // 64 GB of float16 claimed
    assert!(
        std::fs::metadata(&file).unwrap().len() > 60 << 30,
        "the file claims its size"
    );
    let cg = Cgroup::create(&format!("pensieve-load-{}", std::process::id()), 512 << 20);
    let started = Instant::now();
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!(
                "echo $$ > {} && exec {BIN} serve --port 0 --model {}",
                cg.procs().display(),
                file.display()
            ),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still running after 30 s: the model was not refused"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "exited by {status:?}, not a clean refusal: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    for needle in [
        "huge.gguf",
        "would not fit",
        "GB of weights",
        "is available",
        "memory.warning_gb",
        "--force",
    ] {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    // Nothing was read: the whole process stayed small, and nothing was killed.
    let peak = std::fs::read_to_string(cg.dir.join(if cg.v2 {
        "memory.peak"
    } else {
        "memory.max_usage_in_bytes"
    }))
    .ok()
    .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(peak) = peak {
        assert!(peak < 100 << 20, "peak memory {} MB", peak >> 20);
    }
    assert_eq!(cg.oom_kills(), 0);
}

#[tokio::test]
async fn a_real_model_is_refused_against_thresholds_above_the_machine_and_loads_with_force() {
    let gguf = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    assert!(Path::new(gguf).exists(), "{gguf} is missing: run `make smollm2`");
    let env = [
        ("PENSIEVE_MEMORY__WARNING_GB", "100000"),
        ("PENSIEVE_MEMORY__CRITICAL_GB", "90000"),
        ("PENSIEVE_MEMORY__EMERGENCY_GB", "80000"),
    ];
    let out = Command::new(BIN)
        .args(["serve", "--port", "0", "--model", gguf])
        .envs(env)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("SmolLM2-135M-Instruct.Q4_1.gguf") && err.contains("would not fit"),
        "{err}"
    );
    // The estimate is the weights as MLX holds them (about 94 MiB quantised) plus the KV cache.
    assert!(err.contains("0.09 GB of weights"), "{err}");

    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--port", "0", "--force", "--model", gguf]).envs(env);
    let s = Server::start_command(cmd);
    assert!(s.log().contains("loading anyway"), "{}", s.log());
    assert_eq!(s.health().await["backend"]["ready"], true);
}

#[tokio::test]
async fn a_request_whose_kv_cache_would_not_fit_is_refused_before_prefill_with_what_it_needs() {
    // MLX may hold 64 MB. The demo model's KV cache takes 1 KB a token (and prompt lookup's
    // index 192 bytes), and max_tokens counts at most to its context (131,072 tokens): 152 MB,
    // which can never fit: a 400 that says so.
    // (Memory that may free up later gets a 503 with retry-after, and memory.critical_gb is
    // the other line: the worker's unit tests, where memory is scripted and not this shared
    // machine's.)
    let s = Server::start_with(&[("PENSIEVE_BACKEND__MLX_MEMORY_LIMIT_MB", "64")]);
    let per_token = s.health().await["backend"]["kv_bytes_per_token"].as_u64().unwrap();
    assert_eq!(per_token, 1024 + 192);
    let res = s.post(&hello(1_000_000)).await;
    assert_eq!(res.status(), 400);
    let v: serde_json::Value = res.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("needs about 0.15 GB of KV cache")
            && msg.contains("max_tokens 1000000 (the context leaves 131")
            && msg.contains("backend.mlx_memory_limit_mb")
            && msg.contains("cannot fit on this machine"),
        "{msg}"
    );
    // Refused before any of it ran: nothing is left running, the MLX cache is empty.
    let b = s.idle_backend().await;
    assert_eq!(
        (b["active_generations"].as_u64(), b["cache_bytes"].as_u64()),
        (Some(0), Some(0)),
        "{b}"
    );
    // A request that fits is served.
    assert_eq!(s.post(&hello(8)).await.status(), 200);
}

#[tokio::test]
async fn a_step_over_mlxs_memory_limit_fails_that_request_cleanly_and_no_other() {
    // The demo model holds about 3 MB; a short request stays under 1 MB more, a 2,000-token
    // prompt's prefill in one chunk peaks near 35 MB (on a CPU its attention scores are numpy's,
    // a 32 MB block, counted with MLX's own peak). MLX gets a limit of 24 MB. The step
    // budget is off: beside a decoding stream it would read that prompt in chunks of a few
    // tokens, whose peak stays under the limit.
    let s = Server::start_with(&[
        ("PENSIEVE_BACKEND__MLX_MEMORY_LIMIT_MB", "24"),
        ("PENSIEVE_BACKEND__MAX_DECODE_STALL_MS", "0"),
    ]);
    // Running beside it, a short stream of 3,000 tokens (about 3 s here).
    let short_body = hello(3000);
    let short = s.post_stream(&short_body);
    let long = serde_json::json!({
        "model": "demo", "max_tokens": 8,
        "messages": [{"role": "user", "content": "hello world ".repeat(500)}]
    });
    let (short, res) = tokio::join!(short, async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let res = s.post(&long).await;
        assert_eq!(
            s.health().await["backend"]["active_generations"],
            1,
            "the short stream ended first"
        );
        res
    });
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("MLX went over its memory limit") && msg.contains("limit of 0.02 GB"),
        "{msg}"
    );
    // The short stream was not touched.
    let events = parse_sse(&short.text().await.unwrap());
    assert_eq!(
        events.last().map(|e| e.event.as_str()),
        Some("message_stop"),
        "{events:?}"
    );
    let delta = events.iter().find(|e| e.event == "message_delta").unwrap();
    assert_eq!(delta.data["usage"]["output_tokens"], 3000, "{delta:?}");
    // Nothing left running, the cache cleared, the limit in /health, and the next request works.
    let b = s.idle_backend().await;
    assert_eq!(
        (
            b["active_generations"].as_u64(),
            b["cache_bytes"].as_u64(),
            b["mlx_memory_limit_bytes"].as_u64()
        ),
        (Some(0), Some(0), Some(24 << 20)),
        "{b}"
    );
    assert_eq!(s.post(&hello(8)).await.status(), 200);
    assert!(s.log().contains("MLX went over its memory limit"));
}
