//! A real memory cgroup (v1 under /sys/fs/cgroup/memory, or v2) for one test: needs root and a
//! writable hierarchy, and says so when it cannot make one (it never passes silently).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A memory cgroup made for one test, removed when dropped.
pub struct Cgroup {
    pub dir: PathBuf,
    pub v2: bool,
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
        let cg = Cgroup { dir, v2 };
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
