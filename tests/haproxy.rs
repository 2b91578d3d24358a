//! Two pensieve instances behind a real HAProxy with the shipped configuration
//! (deploy/haproxy/haproxy.cfg, unchanged: its variables point it at this test's ports), under a
//! bounded client load, streamed and not:
//! - one instance runs in a memory cgroup, and a real allocator takes it to Critical, holds it
//!   there, then lets go: no client sees an error (every refusal is retried on the other
//!   instance), the pressured instance gets no request from shortly after it turned Critical
//!   (its own /metrics), and it gets traffic again once it recovers;
//! - then the other instance gets SIGTERM mid-load: its running streams finish, new requests go
//!   to the survivor, nothing is lost, and it exits cleanly.
//!
//! Needs haproxy (`make haproxy`: Debian's package), root and a memory cgroup hierarchy.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cgroup::{push_to, tier, Allocator, Cgroup};
use common::*;
use serde_json::{json, Value};

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy/haproxy.cfg");

struct Haproxy {
    child: Child,
    url: String,
}

impl Haproxy {
    async fn start(a: &Server, b: &Server) -> Haproxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = |s: &Server| s.base.trim_start_matches("http://").to_owned();
        let child = Command::new("haproxy")
            .args(["-db", "-f", CONFIG])
            .env("HAPROXY_BIND", format!("127.0.0.1:{port}"))
            .env("PENSIEVE_1", addr(a))
            .env("PENSIEVE_2", addr(b))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy is missing: `make haproxy` installs it");
        let h = Haproxy {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(reqwest::get(format!("{}/health/ready", h.url)).await, Ok(r) if r.status() == 200) {
            assert!(Instant::now() < deadline, "haproxy never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        h
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/v1/messages` requests an instance has answered, any status (its own /metrics).
async fn messages_seen(s: &Server) -> u64 {
    let text = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("pensieve_requests_total{route=\"/v1/messages\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

/// `/v1/messages` requests an instance refused with 503 (its own /metrics).
async fn refused(s: &Server) -> u64 {
    let text = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("pensieve_requests_total{route=\"/v1/messages\",status=\"503\"}"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU32,
    errors: Mutex<Vec<String>>,
}

/// One request through HAProxy; `Err` says what went wrong.
async fn one(client: &reqwest::Client, url: &str, stream: bool, max_tokens: u32) -> Result<(), String> {
    let body = json!({"model": "demo", "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": "hello there"}]});
    let r = client
        .post(format!("{url}/v1/messages"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = r.status();
    let text = r.text().await.map_err(|e| format!("body: {e}"))?;
    if status != 200 {
        return Err(format!("{status}: {text}"));
    }
    if stream {
        let events = parse_sse(&text);
        if events.last().map(|e| e.event.as_str()) != Some("message_stop") {
            return Err(format!("stream ended without message_stop: {text}"));
        }
    } else if serde_json::from_str::<Value>(&text).map_err(|e| e.to_string())?["type"] != "message" {
        return Err(format!("not a message: {text}"));
    }
    Ok(())
}

/// `workers` clients, each sending one request after another (every third a long stream), with
/// a short pause between two, until `stop`. No cap on the count: a cap reached before the
/// SIGTERM phase would leave nothing to send to the survivor (seen on a fast run: 600 reached,
/// and the only requests answered after SIGTERM were A's own).
fn load(url: &str, workers: u32, stop: Arc<AtomicBool>, tally: Arc<Tally>) -> Vec<tokio::task::JoinHandle<()>> {
    load_with_pause(url, workers, Duration::from_millis(40), stop, tally)
}

/// [`load`] with `pause` between two requests of a client (zero: none).
fn load_with_pause(
    url: &str,
    workers: u32,
    pause: Duration,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let sent = Arc::new(AtomicU32::new(0));
    (0..workers)
        .map(|w| {
            let (url, stop, tally, sent) = (url.to_owned(), stop.clone(), tally.clone(), sent.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !stop.load(Ordering::SeqCst) {
                    let n = sent.fetch_add(1, Ordering::SeqCst);
                    let (stream, max_tokens) = match (n + w) % 3 {
                        0 => (true, 96),
                        1 => (true, 8),
                        _ => (false, 8),
                    };
                    match one(&client, &url, stream, max_tokens).await {
                        Ok(()) => tally.ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            tally.errors.lock().unwrap().push(e);
                            0
                        }
                    };
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect()
}

/// The instance that memory pressure takes to Critical: in `cg`, with thresholds a real
/// allocator there can cross, sampled every 100 ms.
fn pressured(cg: &Cgroup) -> Server {
    Server::start_in_cgroup(
        &cg.procs(),
        &[
            ("PENSIEVE_MEMORY__WARNING_GB", "0.6"),
            ("PENSIEVE_MEMORY__CRITICAL_GB", "0.4"),
            ("PENSIEVE_MEMORY__EMERGENCY_GB", "0.2"),
            ("PENSIEVE_MEMORY__SAMPLE_INTERVAL_MS", "100"),
        ],
    )
}

#[tokio::test]
async fn haproxy_keeps_every_request_answered_while_an_instance_runs_out_of_memory_or_stops() {
    const LIMIT: u64 = 1 << 30;
    let cg = Cgroup::create(&format!("pensieve-haproxy-{}", std::process::id()), LIMIT);
    let grace = [("PENSIEVE_SERVER__SHUTDOWN_GRACE_SECS", "20")];
    let mut a = Server::start_with(&grace);
    let b = pressured(&cg);
    assert_eq!(tier(&b).await.0, "Safe");
    let proxy = Haproxy::start(&a, &b).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers = load(&proxy.url, 6, stop.clone(), tally.clone());

    // Both instances serve.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a0, b0) = (messages_seen(&a).await, messages_seen(&b).await);
    assert!(a0 > 0 && b0 > 0, "both instances serve: {a0} {b0}");

    // B to Critical with real memory, held there: step by step to Warning, then one jump (as
    // when another program on the machine takes a large block), so that requests reach B
    // between the tier's change and HAProxy's next check.
    let mut alloc = Allocator::start(&cg);
    let (t, _) = tier(&b).await;
    if push_to(&b, &cg, &mut alloc, &["Warning", "Critical"]).await["memory"]["status"] == "Warning" {
        assert_eq!(t, "Safe");
        alloc.send("alloc 250");
    }
    push_to(&b, &cg, &mut alloc, &["Critical"]).await;
    let critical_at = Instant::now();
    let at_critical = messages_seen(&b).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let settled = messages_seen(&b).await;
    let ok_before_hold = tally.ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (t, h) = tier(&b).await;
    assert_eq!(t, "Critical", "held at Critical: {h}");
    let after_hold = messages_seen(&b).await;
    let served_meanwhile = tally.ok.load(Ordering::SeqCst) - ok_before_hold;
    println!(
        "B Critical: requests reaching it in the 1.5 s after it turned Critical {}, in the 5 s after that {}; \
         {served_meanwhile} requests answered by A meanwhile; B refused {} with 503 (each retried on A)",
        settled - at_critical,
        after_hold - settled,
        refused(&b).await
    );
    assert_eq!(after_hold, settled, "HAProxy kept sending to the Critical instance");
    assert!(served_meanwhile > 10, "the load went on: {served_meanwhile}");

    // Memory comes back: B is ready again and gets traffic again.
    alloc.send("free");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(b.url("/health/ready")).await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "B never ready again: {}", b.health().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = messages_seen(&b).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after_recovery = messages_seen(&b).await;
    println!(
        "B recovered {:.1} s after turning Critical; {} requests reached it in the next 4 s",
        critical_at.elapsed().as_secs_f64(),
        after_recovery - recovered
    );
    assert!(after_recovery > recovered, "B got no traffic after recovering");

    // A gets SIGTERM mid-load: what runs there finishes, the rest goes to B.
    let ok_before_term = tally.ok.load(Ordering::SeqCst);
    let b_before_term = messages_seen(&b).await;
    let running_on_a = a.health().await["backend"]["active_generations"].clone();
    a.signal("TERM");
    let code = a.wait_exit(Duration::from_secs(25));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let after_term = tally.ok.load(Ordering::SeqCst) - ok_before_term;
    let b_after_term = messages_seen(&b).await - b_before_term;
    let errors = tally.errors.lock().unwrap().clone();
    let total = tally.ok.load(Ordering::SeqCst) + errors.len() as u32;
    println!(
        "{total} requests through HAProxy, {} errors; A had {running_on_a} generations running at SIGTERM and \
         exited with {code:?}; {after_term} answered after its SIGTERM, {b_after_term} of them reaching B",
        errors.len()
    );
    assert_eq!(code, Some(0), "A did not stop cleanly within its grace: {}", a.log());
    assert!(errors.is_empty(), "clients saw errors: {errors:#?}");
    assert!(total >= 200, "a few hundred requests: {total}");
    assert!(
        after_term > 0 && b_after_term > 0,
        "the survivor took the load after SIGTERM: {after_term} answered, {b_after_term} by B"
    );
    assert_eq!(cg.oom_kills(), 0);
}

#[tokio::test]
async fn with_clients_that_never_pause_no_request_gets_the_critical_instances_503() {
    const LIMIT: u64 = 1 << 30;
    let cg = Cgroup::create(&format!("pensieve-haproxy-np-{}", std::process::id()), LIMIT);
    let a = Server::start();
    let b = pressured(&cg);
    let proxy = Haproxy::start(&a, &b).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers = load_with_pause(&proxy.url, 4, Duration::ZERO, stop.clone(), tally.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut alloc = Allocator::start(&cg);
    // B at Critical for 8 s, then Safe again. A request reaches B in that window only if one
    // is sent to it before HAProxy's next health check (500 ms) takes B out: almost always, but
    // not every time, so up to three pushes until B has refused at least one request.
    for push in 1.. {
        if push_to(&b, &cg, &mut alloc, &["Warning", "Critical"]).await["memory"]["status"] == "Warning" {
            alloc.send("alloc 250");
        }
        push_to(&b, &cg, &mut alloc, &["Critical"]).await;
        tokio::time::sleep(Duration::from_secs(8)).await;
        alloc.send("free");
        tokio::time::sleep(Duration::from_secs(3)).await;
        if refused(&b).await > 0 || push == 3 {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let errors = tally.errors.lock().unwrap().clone();
    let total = tally.ok.load(Ordering::SeqCst) + errors.len() as u32;
    println!(
        "{total} requests through HAProxy with no pause, {} errors; B refused {} with 503",
        errors.len(),
        refused(&b).await
    );
    assert!(errors.is_empty(), "clients saw errors: {errors:#?}");
    assert!(
        refused(&b).await > 0,
        "B refused nothing in three pushes to Critical: the test did not test the retry"
    );
    assert_eq!(cg.oom_kills(), 0);
}
