//! Memory on macOS, as macOS sees it.
//!
//! Linux's `MemAvailable` has no macOS twin, and a generic probe misreads a Mac: the kernel
//! keeps most of its "unused" memory as inactive and purgeable pages it hands out on demand,
//! squeezes pages into the compressor before it swaps, and Metal's wired memory never pages
//! out at all. So on macOS pensieve reads what the kernel itself reads:
//!
//! - the VM statistics (`host_statistics64(HOST_VM_INFO64)`, what `vm_stat` prints): available
//!   memory is free + inactive + purgeable pages. Wired memory (Metal buffers included) and the
//!   compressor's pages are not available; a compressor that grows shows as less available.
//! - the kernel's own pressure level (`sysctl kern.memorystatus_vm_pressure_level`: 1 normal,
//!   2 warning, 4 critical), the signal macOS uses to tell applications to give memory back.
//!   Its warning and critical levels raise the tier to Warning and Critical even when the GB
//!   thresholds do not (see [`KernelPressure::tier`]).
//!
//! The arithmetic is plain functions, unit-tested with fixture values on every platform; only
//! the two system calls are compiled on macOS alone.

use serde::Serialize;

use super::{ProbeReading, Source, Tier};

/// The kernel's memory-pressure level (`kern.memorystatus_vm_pressure_level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelPressure {
    /// `1`: no pressure.
    Normal,
    /// `2`: the kernel asks applications to give memory back.
    Warning,
    /// `4`: the kernel is about to kill processes (jetsam).
    Critical,
}

impl KernelPressure {
    /// From the sysctl's value; `None` for a value the kernel does not document.
    pub fn from_level(level: i32) -> Option<KernelPressure> {
        match level {
            1 => Some(KernelPressure::Normal),
            2 => Some(KernelPressure::Warning),
            4 => Some(KernelPressure::Critical),
            _ => None,
        }
    }

    /// The least severe tier this level allows.
    pub fn tier(self) -> Tier {
        match self {
            KernelPressure::Normal => Tier::Safe,
            KernelPressure::Warning => Tier::Warning,
            KernelPressure::Critical => Tier::Critical,
        }
    }

    /// The name used in `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelPressure::Normal => "normal",
            KernelPressure::Warning => "warning",
            KernelPressure::Critical => "critical",
        }
    }
}

/// The page counts of `vm_statistics64` that pensieve reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmPages {
    /// `free_count` (speculative pages included, as the kernel counts them).
    pub free: u64,
    /// `inactive_count`: reclaimable without writing anything.
    pub inactive: u64,
    /// `purgeable_count`: caches applications marked as discardable.
    pub purgeable: u64,
}

/// A reading from the VM page counts, the page size, the machine's memory and the kernel's
/// pressure level.
pub fn reading(pages: VmPages, page_size: u64, total_bytes: u64, level: Option<i32>) -> ProbeReading {
    let available = (pages.free + pages.inactive + pages.purgeable).saturating_mul(page_size);
    ProbeReading {
        available_bytes: available.min(total_bytes),
        total_bytes,
        source: Source::Macos,
        pressure_some_avg10: None,
        kernel_pressure: level.and_then(KernelPressure::from_level),
    }
}

/// The system calls: compiled on macOS only (`cargo check --target aarch64-apple-darwin`
/// checks them on Linux).
#[cfg(target_os = "macos")]
pub(super) mod sys {
    use super::{reading, VmPages};
    use crate::memory::ProbeReading;

    /// The host port, taken once (each `mach_host_self` call adds a reference).
    #[derive(Debug)]
    pub struct Host(libc::mach_port_t);

    impl Host {
        #[allow(deprecated)] // libc points at the mach2 crate; these two calls are all we need.
        pub fn new() -> Host {
            // SAFETY: no arguments; returns this task's send right to the host port.
            Host(unsafe { libc::mach_host_self() })
        }

        /// One reading; `None` if the kernel refuses the statistics.
        #[allow(deprecated)]
        pub fn read(&self, total_bytes: u64) -> Option<ProbeReading> {
            // SAFETY: `stats` is a plain C struct the call fills; `count` says its size in
            // `integer_t`s, as the kernel requires.
            let stats = unsafe {
                let mut stats: libc::vm_statistics64 = std::mem::zeroed();
                let mut count = libc::HOST_VM_INFO64_COUNT;
                let rc = libc::host_statistics64(
                    self.0,
                    libc::HOST_VM_INFO64,
                    &mut stats as *mut libc::vm_statistics64 as libc::host_info64_t,
                    &mut count,
                );
                if rc != libc::KERN_SUCCESS {
                    return None;
                }
                stats
            };
            // SAFETY: sysconf has no preconditions.
            let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let pages = VmPages {
                free: stats.free_count as u64,
                inactive: stats.inactive_count as u64,
                purgeable: stats.purgeable_count as u64,
            };
            Some(reading(
                pages,
                page_size.max(4096) as u64,
                total_bytes,
                pressure_level(),
            ))
        }
    }

    /// `kern.memorystatus_vm_pressure_level`.
    fn pressure_level() -> Option<i32> {
        let mut level: libc::c_int = 0;
        let mut size = std::mem::size_of::<libc::c_int>();
        // SAFETY: the name is NUL-terminated; `level` and `size` describe a c_int buffer.
        let rc = unsafe {
            libc::sysctlbyname(
                c"kern.memorystatus_vm_pressure_level".as_ptr(),
                &mut level as *mut libc::c_int as *mut libc::c_void,
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0).then_some(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vm_stat` on a 16 GB Apple silicon Mac (16 KiB pages) with a model loaded, and
    /// `hw.memsize`.
    const M1_16GB: VmPages = VmPages {
        free: 6_135,
        inactive: 301_288,
        purgeable: 3_456,
    };
    const MEMSIZE: u64 = 17_179_869_184;

    #[test]
    fn available_is_free_inactive_and_purgeable_pages() {
        let r = reading(M1_16GB, 16_384, MEMSIZE, Some(1));
        assert_eq!(r.available_bytes, (6_135 + 301_288 + 3_456) * 16_384);
        assert_eq!(r.total_bytes, MEMSIZE);
        assert_eq!(r.source, Source::Macos);
        assert_eq!(r.kernel_pressure, Some(KernelPressure::Normal));
        assert_eq!(r.pressure_some_avg10, None);
    }

    #[test]
    fn available_never_exceeds_the_machine() {
        let absurd = VmPages {
            free: u64::MAX / 2,
            ..VmPages::default()
        };
        assert_eq!(reading(absurd, 16_384, MEMSIZE, None).available_bytes, MEMSIZE);
    }

    #[test]
    fn the_kernels_levels_and_the_tiers_they_raise_to() {
        assert_eq!(KernelPressure::from_level(1), Some(KernelPressure::Normal));
        assert_eq!(KernelPressure::from_level(2), Some(KernelPressure::Warning));
        assert_eq!(KernelPressure::from_level(4), Some(KernelPressure::Critical));
        for undocumented in [0, 3, 8, -1] {
            assert_eq!(KernelPressure::from_level(undocumented), None);
        }
        assert_eq!(KernelPressure::Normal.tier(), Tier::Safe);
        assert_eq!(KernelPressure::Warning.tier(), Tier::Warning);
        assert_eq!(KernelPressure::Critical.tier(), Tier::Critical);
        assert_eq!(
            reading(M1_16GB, 16_384, MEMSIZE, Some(4)).kernel_pressure,
            Some(KernelPressure::Critical)
        );
    }
}
