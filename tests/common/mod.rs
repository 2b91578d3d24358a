//! Starts the real `pensieve` binary on the real demo model, on a free port.
#![allow(dead_code)]

pub mod cgroup;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_pensieve");

/// The test-only model id: the demo model served by the bridge's test batcher
/// (`pensieve_bridge.testing`): a prompt's `[[script]]…[[/script]]` is replayed as the answer,
/// and a prompt containing `PLEASE-FAIL` raises in Python after two tokens.
pub const SCRIPTED: &str = "scripted:demo";

pub struct Server {
    pub base: String,
    child: Child,
    pub log: Arc<Mutex<String>>,
    /// The prompt cache's disk tier, the server's own unless the test gives one (so that no
    /// test reads what another wrote); removed with the server.
    _cache_dir: tempfile::TempDir,
}

/// The port in the "pensieve is serving" line (pretty or JSON logs).
fn serving_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("pensieve is serving"))?;
    let rest = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    rest.chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    /// Starts `pensieve serve` with extra environment variables, and waits until it serves.
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(BIN);
        // Port 0: the server binds a free port and logs it, so parallel tests never collide.
        cmd.args(["serve", "--port", "0"]);
        Self::spawn(cmd, env)
    }

    /// Starts `cmd` (a `pensieve serve` command line of the test's own) and waits until it serves.
    pub fn start_command(cmd: Command) -> Server {
        Self::spawn(cmd, &[])
    }

    /// Starts the server inside the memory cgroup whose `cgroup.procs` file is `procs`, from its
    /// first instruction on (so that everything it allocates is charged there).
    pub fn start_in_cgroup(procs: &std::path::Path, env: &[(&str, &str)]) -> Server {
        Self::start_in_cgroup_with(procs, "", env)
    }

    /// [`Server::start_in_cgroup`] with more `serve` arguments (`--config FILE`).
    pub fn start_in_cgroup_with(procs: &std::path::Path, args: &str, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("echo $$ > {} && exec {BIN} serve --port 0 {args}", procs.display()),
        ]);
        Self::spawn(cmd, env)
    }

    fn spawn(mut cmd: Command, env: &[(&str, &str)]) -> Server {
        let cache_dir = tempfile::tempdir().expect("a temporary folder");
        if cmd.get_current_dir().is_none() {
            cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
        }
        // The server's own prompt cache folder, unless the command names one (or the default).
        let own = |name: &str| cmd.get_envs().any(|(k, _)| k == name);
        if !own("PENSIEVE_BACKEND__PROMPT_CACHE_DIR") {
            cmd.env("PENSIEVE_BACKEND__PROMPT_CACHE_DIR", cache_dir.path());
        }
        cmd.env("PENSIEVE_LOG__LEVEL", "info,pensieve=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start pensieve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut server = Server {
            base: String::new(),
            child,
            log,
            _cache_dir: cache_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(port) = serving_port(&server.log()) {
                server.base = format!("http://127.0.0.1:{port}");
                return server;
            }
            if Instant::now() > deadline || server.child.try_wait().unwrap().is_some() {
                panic!("server did not start; log:\n{}", server.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `INT`, …) to the server.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the server to exit; its exit code, or `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub async fn health(&self) -> Value {
        reqwest::get(self.url("/health")).await.unwrap().json().await.unwrap()
    }

    /// Waits until no generation runs, then returns `/health`'s backend section.
    pub async fn idle_backend(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let h = self.health().await;
            if h["backend"]["active_generations"] == 0 || Instant::now() > deadline {
                return h["backend"].clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Posts `body` with `"stream": true`.
    pub async fn post_stream(&self, body: &Value) -> reqwest::Response {
        let mut body = body.clone();
        body["stream"] = Value::Bool(true);
        self.post(&body).await
    }

    pub async fn post(&self, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url("/v1/messages"))
            .json(body)
            .send()
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn hello(max_tokens: u32) -> Value {
    serde_json::json!({
        "model": "demo", "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": "Hello, who are you?"}]
    })
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub event: String,
    pub data: Value,
}

/// Parses a complete SSE body.
pub fn parse_sse(text: &str) -> Vec<Sse> {
    text.split("\n\n")
        // Blank chunks, and comments (`: loading model …`), which SSE clients skip.
        .filter(|chunk| chunk.lines().any(|l| !l.trim().is_empty() && !l.starts_with(':')))
        .map(|chunk| {
            let mut event = String::new();
            let mut data = String::new();
            for line in chunk.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            Sse {
                event,
                data: serde_json::from_str(&data).unwrap_or(Value::Null),
            }
        })
        .collect()
}

pub fn text_of_stream(events: &[Sse]) -> String {
    events
        .iter()
        .filter(|e| e.event == "content_block_delta")
        .map(|e| e.data["delta"]["text"].as_str().unwrap().to_owned())
        .collect()
}

/// Writes a GGUF file that claims one float16 tensor of `values` values in a llama model of 40
/// layers (8 KV heads of 128): header and tensor info only, the data a hole.
pub fn sparse_gguf(path: &std::path::Path, values: u64) {
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
    std::io::Write::write_all(&mut f, &b).unwrap();
    f.set_len(b.len() as u64 + values * 2).unwrap();
}

/// The metric `name` (its full name) in `/metrics` text: its samples summed over their labels.
pub fn metric(text: &str, name: &str) -> f64 {
    // Every sample of `name`, whatever its labels, summed.
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!values.is_empty(), "no {name} in /metrics");
    values.iter().sum()
}
