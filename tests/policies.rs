//! WASM admission policies in the real server: the shipped examples, hostile policies held to
//! their bounds, reloading, and `pensieve policy check`. The policies are real components built
//! by `make policies` (wit-bindgen, wasm32-wasip2); the hostile ones misbehave as their
//! settings say.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn built(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("policies/examples/target/wasm32-wasip2/release/{name}.wasm"));
    assert!(p.exists(), "{} is missing: run `make policies`", p.display());
    p
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (target, source) in files {
        std::fs::copy(built(source), dir.path().join(format!("{target}.wasm"))).unwrap();
    }
    dir
}

fn policy<'a>(health: &'a Value, name: &str) -> &'a Value {
    health["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {health}"))
}

#[tokio::test]
async fn hostile_policies_are_contained_and_the_server_keeps_serving() {
    let dir = dir_with(&[
        ("loop_decide", "hostile"),
        ("loop_configure", "hostile"),
        ("memory_bomb", "hostile"),
        ("trap", "hostile"),
        ("refuse", "hostile"),
        ("printer", "hostile"),
        ("socket_configure", "hostile"),
        ("socket_decide", "hostile"),
    ]);
    std::fs::write(dir.path().join("wrong_world.wat"), "(component)").unwrap();
    std::fs::write(
        dir.path().join("random.wasm"),
        (0..400u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let s = Server::start_with(&[
        ("PENSIEVE_POLICIES__DIR", d),
        ("PENSIEVE_POLICIES__SETTINGS__LOOP_DECIDE", r#"{mode="loop_decide"}"#),
        (
            "PENSIEVE_POLICIES__SETTINGS__LOOP_CONFIGURE",
            r#"{mode="loop_configure"}"#,
        ),
        ("PENSIEVE_POLICIES__SETTINGS__MEMORY_BOMB", r#"{mode="memory_bomb"}"#),
        ("PENSIEVE_POLICIES__SETTINGS__TRAP", r#"{mode="trap"}"#),
        ("PENSIEVE_POLICIES__SETTINGS__REFUSE", r#"{mode="refuse"}"#),
        ("PENSIEVE_POLICIES__SETTINGS__PRINTER", r#"{mode="print"}"#),
        // Waits on the host and opens a socket in `configure`, at start-up (the server used to
        // panic there) and in `decide`.
        (
            "PENSIEVE_POLICIES__SETTINGS__SOCKET_CONFIGURE",
            r#"{mode="socket_configure"}"#,
        ),
        (
            "PENSIEVE_POLICIES__SETTINGS__SOCKET_DECIDE",
            r#"{mode="socket_decide"}"#,
        ),
        ("PENSIEVE_POLICIES__ON_ERROR", "admit"),
    ]);
    let h = s.health().await;
    assert!(
        policy(&h, "socket_configure")["last_error"]
            .as_str()
            .unwrap()
            .contains("socket"),
        "a policy that tries the network is listed as not loaded, with why: {h}"
    );
    // Its decide is refused the network too, and says so in its rejection.
    let res = s.post(&hello(3)).await;
    assert_eq!(res.status(), 403);
    assert!(res.text().await.unwrap().contains("socket"));
    std::fs::remove_file(dir.path().join("socket_decide.wasm")).unwrap();
    wait_for(&s, 200).await;
    let h = s.health().await;
    for bad in ["loop_configure", "refuse", "wrong_world", "random", "socket_configure"] {
        let p = policy(&h, bad);
        assert_eq!(p["loaded"], false, "{p}");
        assert!(p["last_error"].is_string(), "{p}");
    }
    assert!(
        policy(&h, "loop_configure")["last_error"]
            .as_str()
            .unwrap()
            .contains("timeout_ms"),
        "{h}"
    );
    assert!(
        policy(&h, "refuse")["last_error"]
            .as_str()
            .unwrap()
            .contains("refuses to run"),
        "{h}"
    );
    assert!(
        policy(&h, "wrong_world")["last_error"]
            .as_str()
            .unwrap()
            .contains("admission-policy"),
        "{h}"
    );
    for good in ["loop_decide", "memory_bomb", "trap", "printer"] {
        assert_eq!(policy(&h, good)["loaded"], true, "{h}");
    }
    // Every request runs every decide: the loop times out, the bomb hits its memory cap, the
    // trap traps; with on_error = "admit" the request is served all the same.
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(s.post(&hello(3)).await.status(), 200);
        assert!(t.elapsed() < Duration::from_secs(10));
    }
    let h = s.health().await;
    let err = |n: &str| policy(&h, n)["last_error"].as_str().unwrap_or_default().to_owned();
    assert!(policy(&h, "loop_decide")["errors"].as_u64().unwrap() >= 3, "{h}");
    assert!(err("loop_decide").contains("timeout_ms"), "{h}");
    assert!(err("memory_bomb").contains("decide"), "{h}");
    assert!(err("trap").contains("trapped"), "{h}");
    assert_eq!(policy(&h, "printer")["errors"], 0);
    assert!(
        s.log().contains("hello from a policy's stdout"),
        "policy output not logged"
    );
    assert!(!s.log().contains("panicked"));
}

#[tokio::test]
async fn on_error_reject_fails_closed() {
    let dir = dir_with(&[("trap", "hostile")]);
    let s = Server::start_with(&[
        ("PENSIEVE_POLICIES__DIR", dir.path().to_str().unwrap()),
        ("PENSIEVE_POLICIES__ON_ERROR", "reject"),
        ("PENSIEVE_POLICIES__SETTINGS__TRAP", r#"{mode="trap"}"#),
    ]);
    let res = s.post(&hello(3)).await;
    assert_eq!(res.status(), 503);
    let v: Value = res.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("trap"), "{v}");
}

#[tokio::test]
async fn the_shipped_policies_gate_tenants_cap_tokens_and_raise_tiers() {
    let dir = dir_with(&[("tenant_gate", "tenant_gate"), ("max_tokens_cap", "max_tokens_cap")]);
    let s = Server::start_with(&[
        ("PENSIEVE_POLICIES__DIR", dir.path().to_str().unwrap()),
        (
            "PENSIEVE_POLICIES__SETTINGS__TENANT_GATE",
            r#"{header="x-tenant", paused=["acme"], retry_after_secs=30}"#,
        ),
        (
            "PENSIEVE_POLICIES__SETTINGS__MAX_TOKENS_CAP",
            r#"{max_tokens=50, from_tier="safe"}"#,
        ),
    ]);
    let client = reqwest::Client::new();
    let res = client
        .post(s.url("/v1/messages"))
        .header("x-tenant", "acme")
        .json(&hello(3))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "30");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("acme"));
    let res = client
        .post(s.url("/v1/messages"))
        .header("x-tenant", "globex")
        .json(&hello(3))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = s.post(&hello(80)).await;
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("at most 50"), "{v}");
    // The same policies hold on OpenAI's routes, whose token fields are named differently,
    // and refuse in OpenAI's error shape.
    let chat = json!({"model": "m", "max_completion_tokens": 80, "messages": [{"role": "user", "content": "hi"}]});
    let res = client
        .post(s.url("/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("at most 50"), "{v}");
    assert!(v["error"].get("param").is_some() && v.get("type").is_none(), "{v}");
    let responses = json!({"model": "m", "max_output_tokens": 80, "input": "hi"});
    let res = client
        .post(s.url("/v1/responses"))
        .json(&responses)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = client
        .post(s.url("/v1/responses"))
        .header("x-tenant", "acme")
        .json(&json!({"model": "m", "max_output_tokens": 3, "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);

    // Thresholds as a policy: its classify raises the tier above the host's own.
    let dir = dir_with(&[("thresholds", "thresholds")]);
    let s = Server::start_with(&[
        ("PENSIEVE_POLICIES__DIR", dir.path().to_str().unwrap()),
        (
            "PENSIEVE_POLICIES__SETTINGS__THRESHOLDS",
            r#"{warning_gb=100000, critical_gb=90000, emergency_gb=1}"#,
        ),
    ]);
    let h = s.health().await;
    assert_eq!(h["memory"]["status"], "Critical", "{h}");
    assert_eq!(s.post(&hello(3)).await.status(), 503);
}

#[tokio::test]
async fn policies_reload_without_a_restart_and_a_bad_version_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(&[
        ("PENSIEVE_POLICIES__DIR", dir.path().to_str().unwrap()),
        ("PENSIEVE_POLICIES__SETTINGS__GATE", r#"{paused=["acme"]}"#),
    ]);
    let acme = || {
        reqwest::Client::new()
            .post(s.url("/v1/messages"))
            .header("x-tenant", "acme")
            .json(&hello(3))
            .send()
    };
    assert_eq!(acme().await.unwrap().status(), 200);
    let file = dir.path().join("gate.wasm");
    std::fs::copy(built("tenant_gate"), &file).unwrap();
    wait_for(&s, 429).await;
    // A broken new version: the old one stays in force.
    std::fs::write(&file, b"\0asm garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(acme().await.unwrap().status(), 429);
    let h = s.health().await;
    assert_eq!(policy(&h, "gate")["loaded"], true, "{h}");
    assert!(policy(&h, "gate")["errors"].as_u64().unwrap() >= 1, "{h}");
    // Deleted: gone.
    std::fs::remove_file(&file).unwrap();
    wait_for(&s, 200).await;
    assert_eq!(s.health().await["policies"], json!([]));
}

#[test]
fn policy_check_reports_and_exits_non_zero_on_problems() {
    let ok = std::process::Command::new(BIN)
        .args(["policy", "check"])
        .args([built("thresholds"), built("tenant_gate"), built("max_tokens_cap")])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}{}", String::from_utf8_lossy(&ok.stderr));
    assert!(
        out.contains("thresholds: loaded") && out.contains("decide(") && out.contains("classify("),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"not wasm at all").unwrap();
    let res = std::process::Command::new(BIN)
        .args(["policy", "check"])
        .arg(built("thresholds"))
        .arg(&bad)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!res.status.success());
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(out.contains("FAIL") && out.contains("bad.wasm"), "{out}");
}

async fn wait_for(s: &Server, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = reqwest::Client::new()
            .post(s.url("/v1/messages"))
            .header("x-tenant", "acme")
            .json(&hello(3))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "still {got}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
