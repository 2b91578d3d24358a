//! The memory gate: one decision, made at the door (the admission layer) and again when a
//! queued generation is about to start (the backend), from the same snapshot and thresholds.

use std::fmt;

use super::{MemorySnapshot, SnapshotHandle, Thresholds, Tier, GIB};

/// Decides, from the latest [`MemorySnapshot`], whether new work is admitted.
#[derive(Clone, Debug)]
pub struct Gate {
    snapshot: SnapshotHandle,
    thresholds: Thresholds,
    retry_after_secs: u32,
}

impl Gate {
    /// A gate over `snapshot`; refusals say `thresholds` and carry `retry_after_secs`.
    pub fn new(snapshot: SnapshotHandle, thresholds: Thresholds, retry_after_secs: u32) -> Self {
        Self {
            snapshot,
            thresholds,
            retry_after_secs,
        }
    }

    /// The snapshot it reads.
    #[inline]
    pub fn snapshot(&self) -> &SnapshotHandle {
        &self.snapshot
    }

    /// The thresholds it names in refusals.
    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// `retry-after` of its refusals.
    pub fn retry_after_secs(&self) -> u32 {
        self.retry_after_secs
    }

    /// Admits (with the tier) or refuses, by the latest snapshot: one atomic load.
    #[inline]
    pub fn check(&self) -> Result<Tier, Refusal> {
        self.decide(&self.snapshot.load())
    }

    /// Admits (with the tier) or refuses, by `snapshot`.
    #[inline]
    pub fn decide(&self, snapshot: &MemorySnapshot) -> Result<Tier, Refusal> {
        if snapshot.tier.admits() {
            return Ok(snapshot.tier);
        }
        Err(Refusal {
            tier: snapshot.tier,
            available_bytes: snapshot.available_bytes,
            threshold_bytes: self.thresholds.threshold_of(snapshot.tier),
            retry_after_secs: self.retry_after_secs,
        })
    }
}

/// Memory is too short for new work. Its `Display` is the message clients get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The tier that refused (Critical or Emergency).
    pub tier: Tier,
    /// Memory available when it refused.
    pub available_bytes: u64,
    /// The threshold whose crossing raised the tier.
    pub threshold_bytes: u64,
    /// When to try again.
    pub retry_after_secs: u32,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory tier {}: {:.2} GB available, at or below the {} threshold of {:.2} GB; \
             new generations are refused until memory recovers",
            self.tier,
            self.available_bytes as f64 / GIB,
            self.tier.as_str().to_lowercase(),
            self.threshold_bytes as f64 / GIB,
        )
    }
}

impl std::error::Error for Refusal {}

/// A memory refusal: 503 `overloaded_error` with `retry-after`, the message naming the tier,
/// the memory available and the threshold.
impl From<Refusal> for crate::wire::ApiError {
    fn from(r: Refusal) -> Self {
        let mut e = crate::wire::ApiError::new(crate::wire::ErrorKind::Overloaded, r.to_string())
            .retry_after(r.retry_after_secs);
        e.refused_by = Some(crate::wire::RefusedBy::Memory(r.tier.as_str()));
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Source;

    fn gate(tier: Tier, gb: f64) -> Gate {
        let snapshot = SnapshotHandle::new(MemorySnapshot {
            tier,
            available_bytes: (gb * GIB) as u64,
            source: Source::Custom,
            ..MemorySnapshot::unknown()
        });
        let thresholds = Thresholds {
            warning: 2 << 30,
            critical: 1 << 30,
            emergency: 1 << 29,
            hysteresis: 0.1,
        };
        Gate::new(snapshot, thresholds, 7)
    }

    #[test]
    fn safe_and_warning_admit_with_their_tier() {
        assert_eq!(gate(Tier::Safe, 8.0).check(), Ok(Tier::Safe));
        assert_eq!(gate(Tier::Warning, 1.5).check(), Ok(Tier::Warning));
    }

    #[test]
    fn critical_and_emergency_refuse_naming_tier_memory_and_threshold() {
        let r = gate(Tier::Critical, 0.8).check().unwrap_err();
        assert_eq!((r.tier, r.retry_after_secs), (Tier::Critical, 7));
        let msg = r.to_string();
        assert!(
            msg.contains("Critical") && msg.contains("0.80 GB") && msg.contains("critical threshold of 1.00 GB"),
            "{msg}"
        );
        let r = gate(Tier::Emergency, 0.1).check().unwrap_err();
        assert!(r.to_string().contains("emergency threshold of 0.50 GB"));
    }
}
