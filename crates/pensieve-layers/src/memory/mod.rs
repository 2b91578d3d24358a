//! Memory: what the machine (or the cgroup the server runs in) has left, sampled off the
//! request path.
//!
//! A [`Sampler`] thread reads a [`MemoryProbe`] every `memory.sample_interval_ms`, turns the
//! reading into a [`Tier`] (with hysteresis, see [`Thresholds`]) and publishes an immutable
//! [`MemorySnapshot`] into a [`SnapshotHandle`]. The request path only loads that snapshot:
//! one atomic load, no syscall, no lock.
//!
//! ```
//! use pensieve_layers::memory::{SnapshotHandle, MemorySnapshot, Tier};
//! let handle = SnapshotHandle::new(MemorySnapshot::unknown());
//! assert_eq!(handle.load().tier, Tier::Safe);
//! ```

mod gate;
pub mod macos;
mod probe;
mod sampler;
mod tier;

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

pub use gate::{Gate, Refusal};
pub use probe::{cgroup, psi_some_avg10, MemoryProbe, ProbeReading, SystemProbe};
pub use sampler::{BackendMemory, Hooks, Sampler, TierProposer};
pub use tier::{Thresholds, Tier};

/// Where a reading came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The machine's own memory (`MemAvailable`).
    System,
    /// The memory cgroup the server runs in (limit − usage).
    Cgroup,
    /// macOS's VM statistics and the kernel's pressure level (see [`macos`]).
    Macos,
    /// A probe made by a test or an embedding application.
    Custom,
}

impl Source {
    /// The name used in `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::System => "system",
            Source::Cgroup => "cgroup",
            Source::Macos => "macos",
            Source::Custom => "custom",
        }
    }
}

/// One published memory sample; immutable once published.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemorySnapshot {
    /// Tier after thresholds and hysteresis.
    pub tier: Tier,
    /// Bytes new work can still use.
    pub available_bytes: u64,
    /// Physical memory, or the cgroup limit.
    pub total_bytes: u64,
    /// Where the numbers came from.
    pub source: Source,
    /// PSI memory "some" avg10, in percent, where the kernel has it.
    pub pressure_some_avg10: Option<f32>,
    /// The kernel's own pressure level, where it has one (macOS).
    pub kernel_pressure: Option<macos::KernelPressure>,
    /// Bytes the backend holds in live arrays, where known.
    pub backend_active_bytes: Option<u64>,
    /// Bytes the backend holds in its allocator cache, where known.
    pub backend_cache_bytes: Option<u64>,
    /// Increases with every sample; 0 before the first.
    pub seq: u64,
}

impl MemorySnapshot {
    /// The snapshot before anything was sampled: Safe, nothing known.
    pub fn unknown() -> Self {
        Self {
            tier: Tier::Safe,
            available_bytes: 0,
            total_bytes: 0,
            source: Source::System,
            pressure_some_avg10: None,
            kernel_pressure: None,
            backend_active_bytes: None,
            backend_cache_bytes: None,
            seq: 0,
        }
    }

    /// Available memory in GB (2³⁰ bytes, the unit of the thresholds).
    pub fn available_gb(&self) -> f64 {
        self.available_bytes as f64 / GIB
    }

    /// Total memory in the same unit as [`available_gb`](Self::available_gb).
    pub fn total_gb(&self) -> f64 {
        self.total_bytes as f64 / GIB
    }
}

/// Bytes in one "GB" of the configuration: 2³⁰.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Where the latest snapshot lives; cheap to clone and to read.
#[derive(Clone, Debug)]
pub struct SnapshotHandle(Arc<ArcSwap<MemorySnapshot>>);

impl SnapshotHandle {
    /// A handle holding `first` until something stores another.
    pub fn new(first: MemorySnapshot) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(first)))
    }

    /// The latest snapshot: one atomic load, no syscall, no lock.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<MemorySnapshot>> {
        self.0.load()
    }

    /// Publishes a new snapshot.
    pub fn store(&self, snapshot: MemorySnapshot) {
        self.0.store(Arc::new(snapshot));
    }
}
