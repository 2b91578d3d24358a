//! Tiers from GB thresholds, with hysteresis.

use std::fmt;

use serde::Serialize;

use crate::config::MemoryConfig;

use super::GIB;

/// Memory tier, least to most severe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Tier {
    /// Plenty of memory.
    Safe,
    /// Admitted, but the headers say so.
    Warning,
    /// New generations are refused.
    Critical,
    /// New generations are refused, running ones are aborted, the cache is cleared.
    Emergency,
}

impl Tier {
    /// The name used in headers and `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Safe => "Safe",
            Tier::Warning => "Warning",
            Tier::Critical => "Critical",
            Tier::Emergency => "Emergency",
        }
    }

    /// Whether new generations are admitted.
    pub fn admits(self) -> bool {
        self < Tier::Critical
    }

    fn less_severe(self) -> Tier {
        match self {
            Tier::Safe | Tier::Warning => Tier::Safe,
            Tier::Critical => Tier::Warning,
            Tier::Emergency => Tier::Critical,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The thresholds, in bytes, and the hysteresis band.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// At or below this: Warning.
    pub warning: u64,
    /// At or below this: Critical.
    pub critical: u64,
    /// At or below this: Emergency.
    pub emergency: u64,
    /// Fraction above a threshold that memory must reach to leave the tier it raised.
    pub hysteresis: f64,
}

impl Thresholds {
    /// From the `[memory]` section (GB = 2³⁰ bytes).
    pub fn from_config(c: &MemoryConfig) -> Self {
        let b = |gb: f64| (gb * GIB) as u64;
        Self {
            warning: b(c.warning_gb),
            critical: b(c.critical_gb),
            emergency: b(c.emergency_gb),
            hysteresis: c.hysteresis,
        }
    }

    /// The threshold whose crossing raises `tier` (0 for Safe).
    pub fn threshold_of(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Safe => 0,
            Tier::Warning => self.warning,
            Tier::Critical => self.critical,
            Tier::Emergency => self.emergency,
        }
    }

    /// The tier for `available` bytes, ignoring history.
    pub fn raw(&self, available: u64) -> Tier {
        if available > self.warning {
            Tier::Safe
        } else if available > self.critical {
            Tier::Warning
        } else if available > self.emergency {
            Tier::Critical
        } else {
            Tier::Emergency
        }
    }

    /// The tier for `available` bytes, coming from `previous`: more severe tiers are entered at
    /// once; a tier is left only when memory is `hysteresis` above the threshold that raised it.
    pub fn classify(&self, previous: Tier, available: u64) -> Tier {
        let raw = self.raw(available);
        let mut tier = previous;
        if raw >= tier {
            return raw;
        }
        while tier > raw && available as f64 > self.threshold_of(tier) as f64 * (1.0 + self.hysteresis) {
            tier = tier.less_severe();
        }
        tier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn t() -> Thresholds {
        Thresholds::from_config(&MemoryConfig::default())
    }

    #[test]
    fn raw_tiers_follow_the_documented_boundaries() {
        let t = t();
        assert_eq!(t.raw(8 * GB), Tier::Safe);
        assert_eq!(t.raw(2 * GB + 1), Tier::Safe);
        assert_eq!(t.raw(2 * GB), Tier::Warning);
        assert_eq!(t.raw(GB + 1), Tier::Warning);
        assert_eq!(t.raw(GB), Tier::Critical);
        assert_eq!(t.raw(GB / 2 + 1), Tier::Critical);
        assert_eq!(t.raw(GB / 2), Tier::Emergency);
        assert_eq!(t.raw(0), Tier::Emergency);
    }

    #[test]
    fn worse_tiers_are_entered_at_once() {
        let t = t();
        assert_eq!(t.classify(Tier::Safe, GB / 4), Tier::Emergency);
        assert_eq!(t.classify(Tier::Warning, GB), Tier::Critical);
    }

    #[test]
    fn a_tier_is_left_only_above_the_hysteresis_band() {
        let t = t();
        // Critical was raised at 1 GB; 1.05 GB is inside the 10% band.
        assert_eq!(t.classify(Tier::Critical, GB + GB / 20), Tier::Critical);
        // 1.2 GB is above 1.1 GB: back to Warning (still below 2 GB).
        assert_eq!(t.classify(Tier::Critical, GB + GB / 5), Tier::Warning);
        // Plenty again: all the way down to Safe in one sample.
        assert_eq!(t.classify(Tier::Emergency, 10 * GB), Tier::Safe);
        // Emergency raised at 0.5 GB; 0.52 GB stays in Emergency.
        assert_eq!(t.classify(Tier::Emergency, GB / 2 + GB / 50), Tier::Emergency);
        // 0.6 GB leaves Emergency for Critical but not Critical itself.
        assert_eq!(t.classify(Tier::Emergency, GB * 6 / 10), Tier::Critical);
        // Warning at 2.1 GB (inside 2.2) stays.
        assert_eq!(t.classify(Tier::Warning, 2 * GB + GB / 10), Tier::Warning);
    }

    #[test]
    fn zero_hysteresis_leaves_as_soon_as_above() {
        let t = Thresholds { hysteresis: 0.0, ..t() };
        assert_eq!(t.classify(Tier::Critical, GB + 1), Tier::Warning);
    }

    #[test]
    fn only_safe_and_warning_admit() {
        assert!(Tier::Safe.admits() && Tier::Warning.admits());
        assert!(!Tier::Critical.admits() && !Tier::Emergency.admits());
    }
}
