//! A real memory cgroup (v1 under /sys/fs/cgroup/memory, or v2) for one test: needs root and a
//! writable hierarchy, and says so when it cannot make one (it never passes silently).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Server;

const MB: u64 = 1 << 20;

/// A memory cgroup made for one test, removed when dropped.
pub struct Cgroup {
    pub dir: PathBuf,
    pub v2: bool,
    /// Its memory limit in bytes.
    pub limit: u64,
}

impl Cgroup {
    pub fn create(name: &str, limit: u64) -> Cgroup {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let (dir, v2) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(name), false)
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (Path::new("/sys/fs/cgroup").join(name), true)
        } else {
            panic!("no memory cgroup hierarchy at /sys/fs/cgroup/memory (v1) or /sys/fs/cgroup (v2): cannot run a real memory-pressure test here");
        };
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create the memory cgroup {} ({e}); this test needs root and a writable cgroup hierarchy",
                dir.display()
            )
        });
        let cg = Cgroup { dir, v2, limit };
        let (file, value) = if v2 {
            ("memory.max", limit.to_string())
        } else {
            ("memory.limit_in_bytes", limit.to_string())
        };
        std::fs::write(cg.dir.join(file), value)
            .unwrap_or_else(|e| panic!("cannot set {file} in {}: {e}", cg.dir.display()));
        if v2 {
            let _ = std::fs::write(cg.dir.join("memory.swap.max"), "0");
        } else {
            // No swap either, so that "full" means full.
            let _ = std::fs::write(cg.dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
        }
        cg
    }

    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    pub fn usage(&self) -> u64 {
        let f = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn oom_kills(&self) -> u64 {
        let text = if self.v2 {
            std::fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default()
        } else {
            std::fs::read_to_string(self.dir.join("memory.oom_control")).unwrap_or_default()
        };
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// A Python process in the cgroup that allocates (and touches) memory on command.
pub struct Allocator {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Allocator {
    pub fn start(cg: &Cgroup) -> Allocator {
        let script = r#"
import ctypes, sys
chunks = []
for line in sys.stdin:
    cmd, _, n = line.strip().partition(" ")
    if cmd == "alloc":
        chunks.append(b"\x01" * (int(n) << 20))  # filled, so every page is really used
    elif cmd == "free":
        chunks.clear()
        ctypes.CDLL(None).malloc_trim(0)  # glibc keeps freed 20 MB chunks in its heap otherwise
    print("ok", flush=True)
"#;
        let mut child = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "echo $$ > {} && exec python3 -c '{}'",
                    cg.procs().display(),
                    script.replace('\'', "'\\''")
                ),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Allocator { child, out }
    }

    pub fn send(&mut self, cmd: &str) {
        writeln!(self.child.stdin.as_mut().unwrap(), "{cmd}").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ok", "allocator died (OOM?) on `{cmd}`");
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn tier(s: &Server) -> (String, Value) {
    let h = s.health().await;
    (h["memory"]["status"].as_str().unwrap().to_owned(), h)
}

/// Allocates in steps until the server reports `want` (or worse), never past `limit - margin`.
pub async fn push_to(s: &Server, cg: &Cgroup, alloc: &mut Allocator, want: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (t, h) = tier(s).await;
        if want.contains(&t.as_str()) {
            return h;
        }
        assert!(Instant::now() < deadline, "never reached {want:?}: {h}");
        assert!(
            cg.usage() + 40 * MB < cg.limit,
            "cgroup nearly full ({} MB) and still {t}: {h}",
            cg.usage() / MB
        );
        alloc.send("alloc 20");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Thresholds for a server in a 1 GiB cgroup, sampled every 50 ms: Warning below 0.6 GB,
/// Critical below 0.4, Emergency below 0.25.
pub const ONE_GIB_TIERS: [(&str, &str); 4] = [
    ("PENSIEVE_MEMORY__WARNING_GB", "0.6"),
    ("PENSIEVE_MEMORY__CRITICAL_GB", "0.4"),
    ("PENSIEVE_MEMORY__EMERGENCY_GB", "0.25"),
    ("PENSIEVE_MEMORY__SAMPLE_INTERVAL_MS", "50"),
];
