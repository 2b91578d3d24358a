//! The background sampler: the only caller of the probe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{MemoryProbe, MemorySnapshot, SnapshotHandle, Thresholds, Tier};

/// What the backend reports of its own memory, read by the sampler on each sample.
pub trait BackendMemory: Send + Sync + 'static {
    /// `(active, cache)` bytes, or `None` before the backend is up.
    fn backend_memory(&self) -> Option<(u64, u64)>;
}

/// Something that may propose a more severe tier for a sample (the WASM policies' `classify`).
pub trait TierProposer: Send + Sync + 'static {
    /// A tier for `snapshot` (whose `tier` is the host's own), or `None`.
    fn propose(&self, snapshot: &MemorySnapshot) -> Option<Tier>;
}

/// What the sampler consults besides the probe.
#[derive(Clone, Default)]
pub struct Hooks {
    /// The backend's own memory counters.
    pub backend: Option<Arc<dyn BackendMemory>>,
    /// Policies that may raise the tier.
    pub proposer: Option<Arc<dyn TierProposer>>,
}

/// A running sampler thread; stops when dropped.
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Takes one snapshot now (so that the first request never sees an empty one), then starts
    /// a thread that samples every `interval` and publishes into `handle`.
    pub fn spawn(
        mut probe: Box<dyn MemoryProbe>,
        thresholds: Thresholds,
        interval: Duration,
        handle: SnapshotHandle,
        hooks: Hooks,
    ) -> std::io::Result<Sampler> {
        let first = Self::sample(probe.as_mut(), &thresholds, &handle.load(), &hooks);
        handle.store(first);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("pensieve-memory".into()).spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(interval);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let previous = handle.load_full();
                    let next = Self::sample(probe.as_mut(), &thresholds, &previous, &hooks);
                    if next.tier != previous.tier {
                        let level = if next.tier > previous.tier { "worse" } else { "better" };
                        tracing::warn!(
                            from = %previous.tier, to = %next.tier, change = level,
                            available_gb = format_args!("{:.2}", next.available_gb()),
                            "memory tier changed"
                        );
                    }
                    handle.store(next);
                }
            }
        })?;
        Ok(Sampler {
            stop,
            thread: Some(thread),
        })
    }

    /// One sample from `probe`, classified against `previous`.
    pub fn sample(
        probe: &mut dyn MemoryProbe,
        thresholds: &Thresholds,
        previous: &MemorySnapshot,
        hooks: &Hooks,
    ) -> MemorySnapshot {
        let r = probe.read();
        let prev_tier = if previous.seq == 0 { Tier::Safe } else { previous.tier };
        let (active, cache) = match hooks.backend.as_ref().and_then(|b| b.backend_memory()) {
            Some((a, c)) => (Some(a), Some(c)),
            None => (None, None),
        };
        let mut snapshot = MemorySnapshot {
            tier: thresholds.classify(prev_tier, r.available_bytes),
            available_bytes: r.available_bytes,
            total_bytes: r.total_bytes,
            source: r.source,
            pressure_some_avg10: r.pressure_some_avg10,
            kernel_pressure: r.kernel_pressure,
            backend_active_bytes: active,
            backend_cache_bytes: cache,
            seq: previous.seq + 1,
        };
        // The kernel's own level (macOS) raises the tier, whatever the GB thresholds say.
        if let Some(level) = r.kernel_pressure {
            snapshot.tier = snapshot.tier.max(level.tier());
        }
        // The most severe of the host's tier and the policies' proposals wins.
        if let Some(proposed) = hooks.proposer.as_ref().and_then(|p| p.propose(&snapshot)) {
            snapshot.tier = snapshot.tier.max(proposed);
        }
        snapshot
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl SnapshotHandle {
    fn load_full(&self) -> Arc<MemorySnapshot> {
        arc_swap::Guard::into_inner(self.load())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{ProbeReading, Source};
    use std::sync::atomic::AtomicU64;

    const GB: u64 = 1 << 30;

    #[test]
    fn the_kernels_pressure_level_raises_the_tier_and_lets_it_fall_again() {
        use crate::memory::macos::KernelPressure;
        let thresholds = Thresholds {
            warning: 2 * GB,
            critical: GB,
            emergency: GB / 2,
            hysteresis: 0.1,
        };
        let mut previous = MemorySnapshot::unknown();
        let mut tiers = Vec::new();
        for level in [
            KernelPressure::Normal,
            KernelPressure::Warning,
            KernelPressure::Critical,
            KernelPressure::Normal,
        ] {
            // 8 GB available: the thresholds alone say Safe.
            let mut probe = move || ProbeReading {
                available_bytes: 8 * GB,
                total_bytes: 16 * GB,
                source: Source::Macos,
                pressure_some_avg10: None,
                kernel_pressure: Some(level),
            };
            previous = Sampler::sample(&mut probe, &thresholds, &previous, &Hooks::default());
            assert_eq!(previous.kernel_pressure, Some(level));
            tiers.push(previous.tier);
        }
        assert_eq!(tiers, [Tier::Safe, Tier::Warning, Tier::Critical, Tier::Safe]);
    }

    #[test]
    fn sampler_publishes_tiers_with_hysteresis_from_a_probe() {
        // A scripted probe: the one fault we cannot cause on demand is the machine running short.
        let avail = Arc::new(AtomicU64::new(8 * GB));
        let a = avail.clone();
        let probe = move || ProbeReading {
            available_bytes: a.load(Ordering::SeqCst),
            total_bytes: 16 * GB,
            source: Source::Custom,
            pressure_some_avg10: None,
            kernel_pressure: None,
        };
        let handle = SnapshotHandle::new(MemorySnapshot::unknown());
        let thresholds = Thresholds {
            warning: 2 * GB,
            critical: GB,
            emergency: GB / 2,
            hysteresis: 0.1,
        };
        let _s = Sampler::spawn(
            Box::new(probe),
            thresholds,
            Duration::from_millis(5),
            handle.clone(),
            Hooks::default(),
        )
        .unwrap();
        assert_eq!(handle.load().tier, Tier::Safe);
        assert!(handle.load().seq >= 1);
        let wait_for = |tier: Tier| {
            for _ in 0..400 {
                if handle.load().tier == tier {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("tier never became {tier}: {:?}", handle.load());
        };
        avail.store(GB / 4, Ordering::SeqCst);
        wait_for(Tier::Emergency);
        avail.store(GB / 2 + GB / 50, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(handle.load().tier, Tier::Emergency, "inside the hysteresis band");
        avail.store(4 * GB, Ordering::SeqCst);
        wait_for(Tier::Safe);
    }
}
