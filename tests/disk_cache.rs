//! The prompt cache's disk tier, on the real server and the real demo model: Claude Code's
//! prompt read from disk after a restart and after memory left Safe (a real memory cgroup and a
//! real allocator); bad files removed at start-up; the cap held on disk; a read-only folder
//! turning the tier off while the server serves.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cgroup::{push_to, tier, Allocator, Cgroup, ONE_GIB_TIERS};
use common::*;
use serde_json::{json, Value};

/// Claude Code's request (the recorded shape): its system prompt and tools, then `question`.
fn claude_code(question: &str) -> Value {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/claude-code-request.json")).unwrap();
    let mut body = fixture["body"].clone();
    body["stream"] = json!(false);
    body["max_tokens"] = json!(8);
    body["temperature"] = json!(0);
    body["messages"][0]["content"][1]["text"] = json!(question);
    body
}

/// `(usage, text)` of a 200 answer.
async fn answer(s: &Server, body: &Value) -> (Value, String) {
    let res = s.post(body).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    (
        v["usage"].clone(),
        v["content"][0]["text"].as_str().unwrap_or("").to_owned(),
    )
}

fn disk(h: &Value) -> Value {
    h["backend"]["prompt_cache_disk"].clone()
}

/// The entry files under `dir` (every model's folder).
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for model in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(model.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "safetensors") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Waits until the disk tier has written what it was given.
async fn written(s: &Server) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = s.health().await;
        if disk(&h)["pending_bytes"] == 0 && disk(&h)["entries"].as_u64().unwrap() > 0 {
            return h;
        }
        assert!(Instant::now() < deadline, "the disk tier never wrote: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric_of(s: &Server, name: &str) -> f64 {
    let text = reqwest::get(s.url("/metrics")).await.unwrap().text().await.unwrap();
    metric(&text, name)
}

#[tokio::test]
async fn after_a_restart_claude_codes_prompt_is_read_from_disk_and_bad_files_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("PENSIEVE_BACKEND__PROMPT_CACHE_DIR", dir.path().to_str().unwrap())];
    let mut a = Server::start_with(&env);
    let (cold, text) = answer(&a, &claude_code("say hi")).await;
    assert_eq!(cold["cache_read_input_tokens"], 0, "{cold}");
    let total = cold["input_tokens"].as_u64().unwrap();
    assert!(total > 1000, "{cold}");
    // A stop writes the prompt cache out.
    a.signal("TERM");
    assert_eq!(a.wait_exit(Duration::from_secs(30)), Some(0), "{}", a.log());
    let files = entries(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let good = &files[0];
    let folder = good.parent().unwrap();
    // Bad files beside it: garbage, a truncated copy, and one written for another model (its
    // identity replaced in the header), each under a name an entry could have.
    let bytes = std::fs::read(good).unwrap();
    std::fs::write(folder.join(format!("{}.safetensors", "1".repeat(40))), b"not a cache").unwrap();
    std::fs::write(
        folder.join(format!("{}.safetensors", "2".repeat(40))),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let identity = folder.file_name().unwrap().to_str().unwrap().as_bytes().to_vec();
    let foreign = replace(&bytes, &identity, &[b'f'; 32]);
    std::fs::write(folder.join(format!("{}.safetensors", "3".repeat(40))), foreign).unwrap();
    // The folder of an earlier identity of the same model (as after an MLX upgrade), marked by
    // the stopped server: nothing can read it any more.
    let earlier = dir.path().join("0".repeat(32));
    std::fs::create_dir(&earlier).unwrap();
    std::fs::copy(good, earlier.join(good.file_name().unwrap())).unwrap();
    std::fs::copy(folder.join("model.json"), earlier.join("model.json")).unwrap();

    let b = Server::start_with(&env);
    let h = b.health().await;
    assert!(
        !earlier.exists(),
        "the earlier identity's folder is removed at start-up"
    );
    assert_eq!(disk(&h)["removed"], 3, "{h}");
    assert_eq!(disk(&h)["entries"], 1, "{h}");
    assert_eq!(entries(dir.path()), files, "the bad files are gone, the good one stays");
    // The same request after the restart: all but its last token from disk, the same answer.
    let (warm, warm_text) = answer(&b, &claude_code("say hi")).await;
    assert_eq!(warm["cache_read_input_tokens"].as_u64().unwrap(), total - 1, "{warm}");
    assert_eq!(warm_text, text);
    // The next turn of the session: its system prompt and tools from memory now.
    let (next, _) = answer(&b, &claude_code("now list the files")).await;
    assert!(
        next["cache_read_input_tokens"].as_u64().unwrap() > total - 100,
        "{next}"
    );
    let h = b.health().await;
    assert_eq!(disk(&h)["hits"], 1, "{h}");
    assert_eq!(disk(&h)["hit_tokens"], total - 1, "{h}");
    assert!(disk(&h)["read_seconds"].as_f64().unwrap() > 0.0, "{h}");
    assert_eq!(metric_of(&b, "pensieve_prompt_cache_disk_hits_total").await, 1.0);
    assert_eq!(metric_of(&b, "pensieve_prompt_cache_disk_removed_total").await, 3.0);
    assert_eq!(metric_of(&b, "pensieve_prompt_cache_disk_entries").await, 1.0);
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = haystack
        .windows(from.len())
        .position(|w| w == from)
        .expect("the identity is in the header");
    let mut out = haystack.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

#[tokio::test]
async fn the_prompt_cache_goes_to_disk_when_memory_leaves_safe_and_is_read_back_after() {
    const LIMIT: u64 = 1 << 30;
    let cg = Cgroup::create(&format!("pensieve-disk-cache-{}", std::process::id()), LIMIT);
    let s = Server::start_in_cgroup(&cg.procs(), &ONE_GIB_TIERS);
    let (cold, text) = answer(&s, &claude_code("say hi")).await;
    let total = cold["input_tokens"].as_u64().unwrap();
    let h = s.health().await;
    assert!(h["backend"]["prompt_cache_bytes"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(disk(&h)["entries"], 0, "nothing is written while memory is Safe: {h}");

    let mut alloc = Allocator::start(&cg);
    // 20 MB steps into a Warning band 200 MB wide: the push stops at Warning.
    let h = push_to(&s, &cg, &mut alloc, &["Warning", "Critical"]).await;
    assert_eq!(h["memory"]["status"], "Warning", "{h}");
    // Out of Safe: the entry leaves memory for disk instead of being dropped.
    let h = written(&s).await;
    assert_eq!(h["backend"]["prompt_cache_bytes"], 0, "{h}");
    assert_eq!(disk(&h)["spills"], 1, "{h}");
    let dir = PathBuf::from(disk(&h)["dir"].as_str().unwrap());
    assert_eq!(entries(&dir).len(), 1);
    assert!(s.log().contains("memory left Safe: releasing the prompt cache"));
    // The session's next turn, still at Warning: its prefix is read from disk, and its own
    // cache, which memory cannot keep, is written to disk as it finishes.
    let (turn, turn_text) = answer(&s, &claude_code("now list the files")).await;
    // (`input_tokens` counts what was not read from the cache.)
    let turn_total = turn["input_tokens"].as_u64().unwrap() + turn["cache_read_input_tokens"].as_u64().unwrap();
    assert!(
        turn["cache_read_input_tokens"].as_u64().unwrap() > total - 100,
        "{turn}"
    );
    let h = written(&s).await;
    assert_eq!(h["memory"]["status"], "Warning", "{h}");
    assert_eq!(disk(&h)["hits"], 1, "{h}");
    assert_eq!(
        (disk(&h)["spills"].as_u64(), disk(&h)["entries"].as_u64()),
        (Some(2), Some(2)),
        "{h}"
    );
    assert_eq!(h["backend"]["prompt_cache_bytes"], 0, "{h}");
    assert_eq!(entries(&dir).len(), 2);

    alloc.send("free");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tier(&s).await.0 != "Safe" {
        assert!(Instant::now() < deadline, "memory never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Safe again: the turn written at Warning is read back whole, with the same answer.
    let (again, again_text) = answer(&s, &claude_code("now list the files")).await;
    assert_eq!(
        again["cache_read_input_tokens"].as_u64().unwrap(),
        turn_total - 1,
        "{again}"
    );
    assert_eq!(again_text, turn_text);
    assert_eq!(disk(&s.health().await)["hits"], 2);
    // The first request answers as before the pressure (its prefix from memory now).
    let (warm, warm_text) = answer(&s, &claude_code("say hi")).await;
    assert!(
        warm["cache_read_input_tokens"].as_u64().unwrap() > total - 100,
        "{warm}"
    );
    assert_eq!(warm_text, text);
    assert_eq!(cg.oom_kills(), 0);
}

#[tokio::test]
async fn the_cap_on_disk_holds_while_the_memory_cap_spills_entries() {
    let dir = tempfile::tempdir().unwrap();
    const CAP_MB: u64 = 8;
    let s = Server::start_with(&[
        ("PENSIEVE_BACKEND__PROMPT_CACHE_DIR", dir.path().to_str().unwrap()),
        ("PENSIEVE_BACKEND__PROMPT_CACHE_MB", "6"),
        ("PENSIEVE_BACKEND__PROMPT_CACHE_DISK_MB", &CAP_MB.to_string()),
    ]);
    for i in 0..6 {
        // Prompts that share nothing: each is an entry of its own (3.7 MB on the demo model,
        // with Claude Code's tools): memory holds one, disk two.
        let mut body = claude_code("say hi");
        body["system"] = json!(format!("Session {i}. ").repeat(400));
        answer(&s, &body).await;
        let h = s.health().await;
        let on_disk: u64 = entries(dir.path()).iter().map(|p| p.metadata().unwrap().len()).sum();
        assert!(on_disk <= CAP_MB << 20, "{on_disk} bytes on disk: {h}");
        assert!(disk(&h)["bytes"].as_u64().unwrap() <= CAP_MB << 20, "{h}");
    }
    let h = written(&s).await;
    assert!(disk(&h)["spills"].as_u64().unwrap() >= 4, "the memory cap spilled: {h}");
    assert!(disk(&h)["entries"].as_u64().unwrap() >= 1, "{h}");
    // The oldest went first: the last spilled session is read back from disk.
    let mut body = claude_code("say hi");
    body["system"] = json!("Session 4. ".repeat(400));
    let (usage, _) = answer(&s, &body).await;
    assert!(usage["cache_read_input_tokens"].as_u64().unwrap() > 1000, "{usage}");
}

#[tokio::test]
async fn a_read_only_folder_turns_the_disk_tier_off_and_the_server_serves() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    // A read-only file system where it can be mounted (root); else a folder under a file.
    let mounted = Mount::tmpfs(&ro, "ro,size=1m");
    let folder = if mounted.is_some() {
        ro.clone()
    } else {
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        file.join("cache")
    };
    let mut s = Server::start_with(&[("PENSIEVE_BACKEND__PROMPT_CACHE_DIR", folder.to_str().unwrap())]);
    let (_, _) = answer(&s, &claude_code("say hi")).await;
    let (again, _) = answer(&s, &claude_code("say hi")).await;
    assert!(
        again["cache_read_input_tokens"].as_u64().unwrap() > 1000,
        "memory still caches"
    );
    let h = s.health().await;
    assert_eq!(disk(&h)["enabled"], false, "{h}");
    assert!(
        disk(&h)["off_reason"].as_str().unwrap().contains("cannot be written"),
        "{h}"
    );
    assert!(s.log().contains("the prompt cache's disk tier is off"));
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0), "{}", s.log());
}

/// A tmpfs mounted for a test, unmounted when the test ends, whether it passes or not.
struct Mount(PathBuf);

impl Mount {
    /// Mounts a tmpfs with `options` at `at`; None where mounting is not allowed (not root).
    fn tmpfs(at: &Path, options: &str) -> Option<Mount> {
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs", at.to_str().unwrap()])
            .status()
            .is_ok_and(|s| s.success())
            .then(|| Mount(at.to_owned()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_pauses_the_disk_tier_until_space_returns_and_the_server_serves() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    // A 1 MiB file system: the first entry (3.7 MB) does not fit. Root only; the test says so.
    let _mount = Mount::tmpfs(&small, "size=1m").expect("this test mounts a 1 MiB tmpfs: it needs root");
    let s = Server::start_with(&[
        ("PENSIEVE_BACKEND__PROMPT_CACHE_DIR", small.to_str().unwrap()),
        // Smaller than one entry: each finished generation goes straight to disk.
        ("PENSIEVE_BACKEND__PROMPT_CACHE_MB", "1"),
    ]);
    let mut body = claude_code("say hi");
    body["system"] = json!("A full disk. ".repeat(400));
    answer(&s, &body).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let h = loop {
        let h = s.health().await;
        if disk(&h)["enabled"] == false {
            break h;
        }
        assert!(Instant::now() < deadline, "the tier did not pause: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let why = disk(&h)["off_reason"].as_str().unwrap().to_owned();
    assert!(
        why.contains("No space left on device") && why.contains("paused"),
        "{why}"
    );
    // No half file is left under an entry's name, and serving goes on.
    assert!(entries(&small).is_empty(), "{:?}", entries(&small));
    answer(&s, &body).await;
    assert_eq!(disk(&s.health().await)["pending_bytes"], 0);
    // Space returns: once the pause is over, entries are written again.
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m", small.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(grown.success());
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut n = 0;
    while entries(&small).is_empty() {
        assert!(
            Instant::now() < deadline,
            "nothing written after space returned: {}",
            s.health().await
        );
        n += 1;
        body["system"] = json!(format!("Space again {n}. ").repeat(400));
        answer(&s, &body).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let h = s.health().await;
    assert_eq!(disk(&h)["enabled"], true, "{h}");
    drop(s); // before the file system goes
}
