//! The `embed_hyper` example: pensieve's layers in front of someone else's hyper handler.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn the_layers_work_in_front_of_a_plain_hyper_app() {
    // `cargo test` builds examples next to the test binaries.
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_pensieve"))
        .parent()
        .unwrap()
        .join("examples/embed_hyper");
    assert!(exe.exists(), "example not built at {}", exe.display());
    let mut child = Command::new(&exe)
        .env("EXAMPLE_PORT", "0")
        .env("EXAMPLE_API_KEY", "secret")
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
        .expect("address line")
        .to_owned();
    let url = format!("http://{addr}/anything");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let res = loop {
        match client
            .post(&url)
            .header("x-api-key", "secret")
            .body("12345")
            .send()
            .await
        {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(res.status(), 200);
    assert!(res.headers()["request-id"].to_str().unwrap().starts_with("req_"));
    assert!(res.headers().contains_key("x-memory-status"));
    assert!(res.headers().contains_key("x-available-memory-gb"));
    assert_eq!(res.text().await.unwrap(), "hello from my own app; you sent 5 bytes\n");
    let res = client.post(&url).body("x").send().await.unwrap();
    assert_eq!(res.status(), 401);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    // A declared length over the limit is refused before any body is read. (Sent by hand, so
    // that the client is not still writing a body when the server answers and closes.)
    let head = format!(
        "POST /anything HTTP/1.1\r\nhost: {addr}\r\nx-api-key: secret\r\ncontent-length: {}\r\n\r\n",
        2 << 20
    );
    let raw = raw_response(&addr, &head);
    assert!(
        raw.starts_with("HTTP/1.1 413") && raw.contains("request_too_large"),
        "{raw}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn raw_response(addr: &str, head: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
