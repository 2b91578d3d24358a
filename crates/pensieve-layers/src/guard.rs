//! Set-up once: what a process starts around the stack, in one place, for the server and for
//! an app that embeds the layers alike.
//!
//! [`Guard::start`] reads memory once (so that what starts next knows what it may use), loads
//! the policies in `policies.dir` and watches the folder for changes, starts the memory
//! sampler (with the policies' `classify` hook) and builds the [`Gate`] admission asks and
//! the [`Metrics`] the layers count into. [`Guard::stack`] is the `/v1` stack wired to all of
//! it. Dropping the guard stops its threads.
//!
//! ```no_run
//! use pensieve_layers::config::GuardConfig;
//! use pensieve_layers::guard::Guard;
//! let guard = Guard::start(&GuardConfig::load(None)?)?;
//! println!("memory is {}", guard.snapshot().load().tier);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::config::GuardConfig;
use crate::memory::{
    BackendMemory, Gate, Hooks, MemoryProbe, MemorySnapshot, Sampler, SnapshotHandle, SystemProbe, Thresholds,
};
use crate::metrics::Metrics;
#[cfg(feature = "policies")]
use crate::policy::{PolicyEngine, Watcher};
use crate::stack::Stack;

/// Why a guard could not start.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The machine's memory cannot be read.
    #[error("cannot read this machine's memory: {0}")]
    Probe(#[source] std::io::Error),
    /// wasmtime could not start (a policy that fails to load is not an error: it is listed).
    #[cfg(feature = "policies")]
    #[error("cannot start the policy engine: {0}")]
    Policies(#[source] crate::policy::EngineError),
    /// `policies.dir` cannot be watched.
    #[error("cannot watch policies.dir: {0}")]
    Watcher(#[source] std::io::Error),
    /// The sampler thread could not start.
    #[error("cannot start the memory sampler: {0}")]
    Sampler(#[source] std::io::Error),
}

/// The running set-up around a stack. See the [module docs](self).
pub struct Guard {
    config: GuardConfig,
    snapshot: SnapshotHandle,
    thresholds: Thresholds,
    gate: Gate,
    metrics: Arc<Metrics>,
    backend: Arc<LateBackend>,
    #[cfg(feature = "policies")]
    policies: Arc<PolicyEngine>,
    #[cfg(feature = "policies")]
    _watcher: Watcher,
    _sampler: Sampler,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// Starts everything with the machine's own memory probe (cgroup-aware).
    pub fn start(config: &GuardConfig) -> Result<Guard, GuardError> {
        let probe = SystemProbe::new().map_err(GuardError::Probe)?;
        if let Some(cg) = probe.cgroup() {
            tracing::info!(dir = %cg.dir.display(), version = ?cg.version, "memory cgroup found");
        }
        Self::with_probe(config, Box::new(probe))
    }

    /// Starts everything, reading memory from `probe`.
    pub fn with_probe(config: &GuardConfig, probe: Box<dyn MemoryProbe>) -> Result<Guard, GuardError> {
        let thresholds = Thresholds::from_config(&config.memory);
        let snapshot = SnapshotHandle::new(MemorySnapshot::unknown());
        let backend = Arc::new(LateBackend::default());
        #[cfg(feature = "policies")]
        let policies = {
            let engine = Arc::new(PolicyEngine::new(&config.policies).map_err(GuardError::Policies)?);
            // On a thread of its own, as reloads are: a policy that waits on the host in
            // `configure` (a sleep, a socket) makes wasmtime-wasi block on a Tokio runtime, which
            // panics on a runtime's own thread, and start-up may run on one.
            let loaded = std::thread::scope(|s| s.spawn(|| engine.load_dir()).join())
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            for p in loaded {
                if !p.loaded {
                    tracing::error!(policy = %p.name, error = ?p.last_error, "policy not loaded; serving without it");
                }
            }
            engine
        };
        #[cfg(feature = "policies")]
        let watcher = Watcher::spawn(policies.clone()).map_err(GuardError::Watcher)?;
        let hooks = Hooks {
            backend: Some(backend.clone()),
            #[cfg(feature = "policies")]
            proposer: Some(policies.clone()),
            #[cfg(not(feature = "policies"))]
            proposer: None,
        };
        // Takes its first reading before it returns: nothing after this sees an empty snapshot.
        let sampler = Sampler::spawn(
            probe,
            thresholds,
            Duration::from_millis(config.memory.sample_interval_ms),
            snapshot.clone(),
            hooks,
        )
        .map_err(GuardError::Sampler)?;
        let gate = Gate::new(snapshot.clone(), thresholds, config.memory.retry_after_secs);
        Ok(Guard {
            config: config.clone(),
            snapshot,
            thresholds,
            gate,
            metrics: Arc::new(Metrics::default()),
            backend,
            #[cfg(feature = "policies")]
            policies,
            #[cfg(feature = "policies")]
            _watcher: watcher,
            _sampler: sampler,
        })
    }

    /// Lets the sampler read a backend's own memory counters from now on (a backend starts
    /// after the guard, knowing the memory it may use). Only the first call counts.
    pub fn attach_backend(&self, backend: Arc<dyn BackendMemory>) {
        let _ = self.backend.0.set(backend);
    }

    /// The `/v1` stack, admitting by this guard's gate, running its policies, counting into its
    /// metrics.
    pub fn stack(&self) -> Stack {
        let stack = Stack::new(&self.config, self.gate.clone()).metrics(self.metrics.clone());
        #[cfg(feature = "policies")]
        let stack = stack.policies(self.policies.clone());
        stack
    }

    /// The configuration it started with.
    pub fn config(&self) -> &GuardConfig {
        &self.config
    }

    /// The latest memory snapshot, published by the sampler.
    pub fn snapshot(&self) -> &SnapshotHandle {
        &self.snapshot
    }

    /// The thresholds of `[memory]`.
    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    /// What admission asks.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// What the layers count into (add your own with [`Metrics::register`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The policy engine (loaded from `policies.dir`, reloaded on change).
    #[cfg(feature = "policies")]
    pub fn policies(&self) -> &Arc<PolicyEngine> {
        &self.policies
    }
}

/// A backend's memory counters, known once the backend has started.
#[derive(Default)]
struct LateBackend(OnceLock<Arc<dyn BackendMemory>>);

impl BackendMemory for LateBackend {
    fn backend_memory(&self) -> Option<(u64, u64)> {
        self.0.get().and_then(|b| b.backend_memory())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{ProbeReading, Source, Tier};

    #[test]
    fn a_guard_samples_before_it_returns_and_reads_a_backend_attached_later() {
        let probe = || ProbeReading {
            available_bytes: 600 << 20,
            total_bytes: 8 << 30,
            source: Source::Custom,
            pressure_some_avg10: None,
            kernel_pressure: None,
        };
        let mut config = GuardConfig::default();
        config.memory.sample_interval_ms = 5;
        config.policies.dir = std::env::temp_dir().join("pensieve-guard-test-no-such-dir");
        let guard = Guard::with_probe(&config, Box::new(probe)).unwrap();
        let first = guard.snapshot().load();
        assert_eq!(first.tier, Tier::Critical);
        assert_eq!(first.backend_active_bytes, None);
        assert!(guard.gate().check().is_err());
        struct Fixed;
        impl BackendMemory for Fixed {
            fn backend_memory(&self) -> Option<(u64, u64)> {
                Some((7, 3))
            }
        }
        guard.attach_backend(Arc::new(Fixed));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while guard.snapshot().load().backend_active_bytes != Some(7) {
            assert!(
                std::time::Instant::now() < deadline,
                "the sampler never read the backend"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
