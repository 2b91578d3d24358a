//! pensieve as a user meets it on a fresh machine: state in one folder per kind under `HOME`,
//! and a binary that finds its Python environment by configuration, wherever it is run from.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{hello, Server, BIN};

const SMOLLM2: &str = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";

async fn answers(server: &Server, model: &str) {
    let mut body = hello(4);
    body["model"] = model.into();
    // Long enough for its prompt cache entry to be kept on disk (64 tokens at least).
    body["messages"][0]["content"] = "Tell me about the weather in Paris in the spring, please. "
        .repeat(12)
        .into();
    let res = reqwest::Client::new()
        .post(server.url("/v1/messages"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", server.log());
}

#[tokio::test]
async fn a_gguf_model_then_the_demo_model_with_the_same_home() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    // The default state folder, under this HOME (no test-only prompt cache folder).
    let env = [
        ("HOME", h),
        ("PENSIEVE_CACHE_DIR", ""),
        ("XDG_CACHE_HOME", ""),
        ("PENSIEVE_BACKEND__PROMPT_CACHE_DIR", ""),
    ];
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--port", "0", "--model", SMOLLM2]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut gguf = Server::start_command(cmd);
    answers(&gguf, "m").await;
    // Stopping sends the prompt cache to disk: the disk tier's folder now exists.
    gguf.signal("TERM");
    assert_eq!(gguf.wait_exit(Duration::from_secs(60)), Some(0), "{}", gguf.log());
    let state = home.path().join(".cache/pensieve");
    assert!(
        state.join("prompt-cache").is_dir(),
        "no disk tier in {}",
        state.display()
    );

    let demo = Server::start_with(&env);
    answers(&demo, "demo").await;
    // One folder per kind of state, neither inside the other.
    assert!(state.join("models/demo-v1/model.safetensors").is_file());
    let mut kinds: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["models", "prompt-cache"]);
    let in_models: Vec<_> = std::fs::read_dir(state.join("models")).unwrap().collect();
    assert_eq!(in_models.len(), 1, "a leftover build folder: {in_models:?}");
}

#[tokio::test]
async fn a_copy_of_the_binary_elsewhere_finds_python_by_configuration_only() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin/pensieve");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(BIN, &bin).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let venv = std::path::absolute(".venv").unwrap();
    assert!(
        venv.join("lib").is_dir(),
        "run from the checkout, where `make venv` made .venv"
    );
    let pensieve = |args: &[&str], python: Option<&Path>| {
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .current_dir(&elsewhere)
            .env("HOME", dir.path())
            .env_remove("VIRTUAL_ENV")
            .env_remove("PENSIEVE_CACHE_DIR")
            .env_remove("PENSIEVE_BACKEND__PROMPT_CACHE_DIR");
        match python {
            Some(p) => cmd.env("PENSIEVE_PYTHON", p),
            None => cmd.env_remove("PENSIEVE_PYTHON"),
        };
        cmd
    };
    // Nothing configured, and no .venv here: it says so, and where it looked, instead of
    // falling back on the folder it was built in.
    let mut child = pensieve(&["serve", "--port", "0"], None)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("it started with no Python environment configured: it found one by itself");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("no Python environment") && err.contains("PENSIEVE_PYTHON"),
        "{err}"
    );
    // `pensieve config` shows what each path resolves to.
    let out = pensieve(&["config"], Some(&venv.join("bin/python"))).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = |key: &str| text.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_owned();
    assert!(line("resolved.python").contains(venv.to_str().unwrap()), "{text}");
    assert!(line("resolved.python").contains("PENSIEVE_PYTHON"), "{text}");
    let state = dir.path().join(".cache/pensieve");
    assert!(
        line("resolved.models_dir").contains(state.join("models").to_str().unwrap()),
        "{text}"
    );
    assert!(
        line("resolved.prompt_cache_dir").contains(state.join("prompt-cache").to_str().unwrap()),
        "{text}"
    );
    // Configured by PENSIEVE_PYTHON, it serves.
    let mut cmd = pensieve(&["serve", "--port", "0"], Some(&venv));
    cmd.current_dir(&elsewhere);
    let server = Server::start_command(cmd);
    assert!(server.log().contains("PENSIEVE_PYTHON"), "{}", server.log());
    answers(&server, "demo").await;
}
