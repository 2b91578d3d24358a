//! The embedding examples: pensieve's whole `/v1` stack, built from a configuration file, in
//! front of someone else's hyper (and axum) handler, with this crate alone (no Python);
//! policies dropped into that file's `policies.dir` refuse requests there, and reload when the
//! file changes; refusals come in the shape of the route's API.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn built_policy(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../../policies/examples/target/wasm32-wasip2/release/{name}.wasm"
    ));
    assert!(p.exists(), "{} is missing: run `make policies`", p.display());
    p
}

/// Starts an example with `config` as its configuration file; its child and address.
fn start(example: &str, config: &Path) -> (Child, String) {
    // `cargo test` builds examples beside the folder of the test binaries (`deps`).
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join(format!("examples/{example}"));
    assert!(exe.exists(), "example not built at {}", exe.display());
    let mut child = Command::new(&exe)
        .arg(config)
        .env("EXAMPLE_PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("address line, got {line:?}"))
        .to_owned();
    (child, addr)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config_file(dir: &Path, policies: &Path) -> PathBuf {
    let file = dir.join("app.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[server]
api_keys = ["secret"]
max_body_mb = 1

[policies]
dir = "{}"

[policies.settings.gate]
max_tokens = 100
from_tier = "safe"
paused = ["acme"]
"#,
            policies.display()
        ),
    )
    .unwrap();
    file
}

#[tokio::test]
async fn the_stack_and_its_policies_work_in_front_of_a_plain_hyper_app() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    // A cap on max_tokens, as `gate`.
    std::fs::copy(built_policy("max_tokens_cap"), policies.join("gate.wasm")).unwrap();
    let (child, addr) = start("embed_hyper", &config_file(dir.path(), &policies));
    let _child = Killed(child);
    let url = format!("http://{addr}/v1/messages");
    let client = reqwest::Client::new();
    let send = |max_tokens: u32| {
        client
            .post(&url)
            .header("x-api-key", "secret")
            .header("x-tenant", "acme")
            .json(&json!({"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let res = send(10).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["request-id"].to_str().unwrap().starts_with("req_"));
    assert!(res.headers().contains_key("x-memory-status"));
    assert!(res.headers().contains_key("x-available-memory-gb"));
    assert!(res
        .text()
        .await
        .unwrap()
        .starts_with("hello from my own app; you sent "));

    // The policy refuses in the embedded app, with the status and message it chose.
    let res = send(500).await.unwrap();
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("at most 100"), "{v}");

    // Replaced by a tenant gate: the new decision, without a restart.
    let next = policies.join("gate.wasm.new");
    std::fs::copy(built_policy("tenant_gate"), &next).unwrap();
    std::fs::rename(&next, policies.join("gate.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let res = loop {
        let res = send(10).await.unwrap();
        if res.status() != 200 || Instant::now() > deadline {
            break res;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(res.status(), 429, "the reloaded policy did not decide");
    let v: Value = res.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`acme` is paused"),
        "{v}"
    );

    // On an OpenAI route, the same refusal in OpenAI's shape, rendered inside the stack.
    let res = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("x-api-key", "secret")
        .header("x-tenant", "acme")
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let request_id = res.headers()["request-id"].to_str().unwrap().to_owned();
    let v: Value = res.json().await.unwrap();
    assert!(v.get("type").is_none(), "Anthropic's envelope on an OpenAI route: {v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`acme` is paused"),
        "{v}"
    );
    assert_eq!(v["error"]["request_id"], request_id.as_str(), "{v}");
    assert!(
        v["error"].get("param").is_some() && v["error"].get("code").is_some(),
        "{v}"
    );

    // API keys and the body limit from the same file.
    let res = client.post(&url).body("x").send().await.unwrap();
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let res = client
        .post(format!("http://{addr}/v1/responses"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
        (Some("authentication_error"), Some("invalid_api_key")),
        "{v}"
    );
    // A declared length over the limit is refused before any body is read. (Sent by hand, so
    // that the client is not still writing a body when the server answers and closes.)
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\nx-api-key: secret\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        2 << 20
    );
    let raw = raw_response(&addr, &head);
    assert!(
        raw.starts_with("HTTP/1.1 413") && raw.contains("request_too_large"),
        "{raw}"
    );
}

#[tokio::test]
async fn the_stack_is_one_layer_in_an_axum_app() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::copy(built_policy("tenant_gate"), policies.join("gate.wasm")).unwrap();
    let (child, addr) = start("embed_axum", &config_file(dir.path(), &policies));
    let _child = Killed(child);
    let client = reqwest::Client::new();
    let post = |tenant: &'static str| {
        client
            .post(format!("http://{addr}/v1/hello"))
            .header("authorization", "Bearer secret")
            .header("x-tenant", tenant)
            .body("12345")
            .send()
    };
    let res = post("globex").await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-memory-status"));
    assert_eq!(res.text().await.unwrap(), "hello; you sent 5 bytes\n");
    assert_eq!(post("acme").await.unwrap().status(), 429);
}

fn raw_response(addr: &str, head: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
