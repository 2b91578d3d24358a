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
