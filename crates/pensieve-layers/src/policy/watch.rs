//! Reloading `policies/` while the server runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::engine::{policy_files, Policy, PolicyEngine, PolicyFailure};

/// How often the folder is looked at.
pub const POLL: Duration = Duration::from_millis(500);

/// A thread that applies new, changed and deleted policy files; stops when dropped.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Watcher {
    /// Watches `engine.config().dir`. Requests in flight keep the policies they started with;
    /// a new version that fails to load leaves the previous one in force.
    pub fn spawn(engine: Arc<PolicyEngine>) -> std::io::Result<Watcher> {
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::Builder::new().name("pensieve-policies".into()).spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(POLL);
                    rescan(&engine);
                }
            }
        })?;
        Ok(Watcher { stop })
    }
}

/// One pass over the folder; returns whether anything changed.
pub(crate) fn rescan(engine: &PolicyEngine) -> bool {
    let current = engine.current();
    let by_path: HashMap<PathBuf, &Arc<Policy>> = current.iter().map(|p| (p.path.clone(), p)).collect();
    let mut next = Vec::new();
    let mut changed = false;
    for path in policy_files(&engine.config().dir) {
        let stamp = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        match by_path.get(&path) {
            Some(old) if old.stamp == stamp => next.push(Arc::clone(old)),
            old => {
                changed = true;
                let fresh = engine.load(&path);
                match old {
                    Some(old) if old.loaded() && !fresh.loaded() => {
                        let why = fresh.last_error().unwrap_or_default();
                        old.fail(PolicyFailure(format!(
                            "a new version failed to load, the previous one stays in force: {why}"
                        )));
                        next.push(Arc::clone(old));
                    }
                    _ => next.push(Arc::new(fresh)),
                }
            }
        }
    }
    changed |= next.len() != current.len();
    if changed {
        engine.replace(next);
    }
    changed
}
