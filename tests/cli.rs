//! The command line: `config`, `memory`, and start-up failures that must stop the server clearly.

mod common;

use std::process::Command;

use common::BIN;

fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn config_prints_every_value_and_its_source() {
    let (ok, out, err) = run(
        &["config", "--config", "config/pensieve.toml"],
        &[("PENSIEVE_MEMORY__CRITICAL_GB", "1.5")],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("memory.critical_gb = 1.5  # environment PENSIEVE_MEMORY__CRITICAL_GB"),
        "{out}"
    );
    assert!(out.contains("server.port = 7777  # file config/pensieve.toml"), "{out}");
    assert!(
        out.contains("config/pensieve.toml\"  # --config"),
        "the file read is named: {out}"
    );
    assert!(out.contains("backend.model = \"demo\""), "{out}");
}

#[test]
fn an_invalid_config_file_stops_start_up_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[memory]\nwarning_gb = 0.5\ncritical_gb = 1.0\n").unwrap();
    let (ok, _, err) = run(&["serve", "--config", bad.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("memory.warning_gb") && err.contains("bad.toml"), "{err}");
    std::fs::write(&bad, "[memory]\ncritical_gb = \"lots\"\n").unwrap();
    let (ok, _, err) = run(&["serve", "--config", bad.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("critical_gb") && err.contains("bad.toml"), "{err}");
}

#[test]
fn a_model_that_cannot_load_stops_the_server_with_a_clear_message() {
    let (ok, _, err) = run(&["serve", "--port", "0", "--model", "/nonexistent/model-folder"], &[]);
    assert!(!ok);
    assert!(
        err.contains("could not load model `model-folder` from `/nonexistent/model-folder`"),
        "{err}"
    );
    assert!(err.contains("backend.model"), "{err}");
}

#[test]
fn memory_prints_the_snapshot_as_the_server_sees_it() {
    let (ok, out, err) = run(&["memory"], &[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(["Safe", "Warning", "Critical", "Emergency"].contains(&v["tier"].as_str().unwrap()));
    assert!(v["total_bytes"].as_u64().unwrap() > 0);
    assert!(v["source"] == "system" || v["source"] == "cgroup");
}

#[test]
fn serve_on_a_terminal_draws_a_progress_bar_for_the_load_and_the_log_around_it() {
    use std::io::{BufRead, BufReader};
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let cache = tempfile::tempdir().unwrap();
    // util-linux's `script` gives the server a terminal (a pty) and copies what it draws.
    let mut script = Command::new("script")
        .args(["-qfec", &format!("{BIN} serve --port 0 --model {model}"), "/dev/null"])
        .env("PENSIEVE_BACKEND__PROMPT_CACHE_DIR", cache.path())
        .env("COLUMNS", "160")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut drawn = String::new();
    let mut out = BufReader::new(script.stdout.take().unwrap());
    let mut line = Vec::new();
    while out.read_until(b'\n', &mut line).unwrap() > 0 {
        drawn.push_str(&String::from_utf8_lossy(&line));
        line.clear();
        if drawn.contains("pensieve is serving") {
            break;
        }
    }
    let _ = script.kill();
    let _ = script.wait();
    assert!(drawn.contains("pensieve is serving"), "{drawn}");
    // The bar: the model's name, a bar, bytes of the total; redrawn as the load goes.
    let bars: Vec<&str> = drawn
        .split(['\r', '\n'])
        .filter(|l| l.contains("loading SmolLM2-135M-Instruct.Q4_1 ["))
        .collect();
    assert!(bars.len() >= 2, "{drawn}");
    assert!(bars.iter().any(|b| b.contains("MiB/93.79 MiB")), "{bars:?}");
    assert!(drawn.contains("\x1b[2K"), "the bar is cleared and redrawn: {drawn}");
    // With a bar, the log says where the load starts and ends, not every step between.
    let logged = drawn.matches("loading the model's weights").count();
    assert!((1..=2).contains(&logged), "{logged} progress lines: {drawn}");
    assert!(drawn.contains("model loaded"), "{drawn}");
}
