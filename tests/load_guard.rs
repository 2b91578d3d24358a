//! A model that would not fit is refused before a byte of it is read: its size comes from its
//! headers alone. Tested with a GGUF file whose tensor infos claim 64 GB (a sparse file: no
//! disk), run inside a 512 MiB memory cgroup so that a failure of the check could not hurt
//! the machine; and with the real SmolLM2 file against thresholds set above the machine.
//! Likewise a request whose KV cache would not fit is refused before its prompt is processed.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cgroup::Cgroup;
use common::*;

/// Writes a GGUF file that claims one float16 tensor of `values` values in a llama model of 40
/// layers (8 KV heads of 128): header and tensor info only, the data a hole.
fn sparse_gguf(path: &Path, values: u64) {
    let mut b = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(6u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "llama");
    for (key, value) in [
        ("llama.block_count", 40u32),
        ("llama.attention.head_count", 32),
        ("llama.attention.head_count_kv", 8),
        ("llama.embedding_length", 4096),
    ] {
        string(&mut b, key);
        b.extend(4u32.to_le_bytes());
        b.extend(value.to_le_bytes());
    }
    string(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    string(&mut b, "<s>");
    string(&mut b, "</s>");
    string(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(4096u64.to_le_bytes());
    b.extend((values / 4096).to_le_bytes());
    b.extend(1u32.to_le_bytes()); // F16
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&b).unwrap();
    f.set_len(b.len() as u64 + values * 2).unwrap();
}

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
    let probe = Server::start();
    let h = probe.health().await;
    let available = h["memory"]["available_gb"].as_f64().unwrap();
    let per_token = h["backend"]["kv_bytes_per_token"].as_u64().unwrap();
    assert!(per_token > 0, "{h}");
    drop(probe);
    // Admitted at the door (Warning), with a critical line 2 GB below what is available now.
    let (warning, critical, emergency) = (
        format!("{}", available + 100.0),
        format!("{:.2}", available - 2.0),
        format!("{:.2}", available - 2.5),
    );
    let s = Server::start_with(&[
        ("PENSIEVE_MEMORY__WARNING_GB", &warning),
        ("PENSIEVE_MEMORY__CRITICAL_GB", &critical),
        ("PENSIEVE_MEMORY__EMERGENCY_GB", &emergency),
    ]);
    // 4 GB of KV cache: it would cross the critical line, and with these thresholds it would
    // even on an empty machine (total - 4 GB is below them): a 400 that says so. (Memory that
    // may free up later gets a 503 with retry-after: the worker's unit test.)
    let big = hello(((4u64 << 30) / per_token) as u32);
    let res = s.post(&big).await;
    assert_eq!(res.status(), 400);
    let v: serde_json::Value = res.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("needs about 4.00 GB of KV cache")
            && msg.contains("memory.critical_gb")
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
