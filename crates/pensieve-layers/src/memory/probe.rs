//! Probes: where memory numbers come from.

use std::fs;
use std::path::{Path, PathBuf};

use super::Source;

/// One raw reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeReading {
    /// Bytes new work can still use.
    pub available_bytes: u64,
    /// Physical memory, or the cgroup limit.
    pub total_bytes: u64,
    /// Where the numbers came from.
    pub source: Source,
    /// PSI memory "some" avg10 in percent, where known.
    pub pressure_some_avg10: Option<f32>,
    /// The kernel's own pressure level, where it has one (macOS); its warning and critical
    /// levels raise the tier.
    pub kernel_pressure: Option<super::macos::KernelPressure>,
}

/// Something that can tell how much memory is left. Only the sampler calls it.
pub trait MemoryProbe: Send + 'static {
    /// Takes one reading.
    fn read(&mut self) -> ProbeReading;
}

impl<F: FnMut() -> ProbeReading + Send + 'static> MemoryProbe for F {
    fn read(&mut self) -> ProbeReading {
        self()
    }
}

/// The machine's memory: on Linux through sysinfo, narrowed to the memory cgroup when it has a
/// limit, with PSI from `/proc/pressure/memory`; on macOS from the VM statistics and the
/// kernel's pressure level ([`macos`](super::macos)).
pub struct SystemProbe {
    system: sysinfo::System,
    cgroup: Option<cgroup::Cgroup>,
    psi: Option<PathBuf>,
    #[cfg(target_os = "macos")]
    host: super::macos::sys::Host,
}

impl std::fmt::Debug for SystemProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemProbe")
            .field("cgroup", &self.cgroup)
            .field("psi", &self.psi)
            .finish()
    }
}

impl SystemProbe {
    /// Finds this process's memory cgroup (v1 or v2) and PSI, once.
    pub fn new() -> std::io::Result<Self> {
        let system = sysinfo::System::new().map_err(|e| std::io::Error::other(e.to_string()))?;
        let cgroup = fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| cgroup::Cgroup::discover(&text, Path::new("/sys/fs/cgroup")));
        let psi = Path::new("/proc/pressure/memory");
        let psi = fs::read_to_string(psi)
            .ok()
            .and_then(|t| psi_some_avg10(&t))
            .map(|_| psi.to_owned());
        Ok(Self {
            system,
            cgroup,
            psi,
            #[cfg(target_os = "macos")]
            host: super::macos::sys::Host::new(),
        })
    }

    /// The cgroup found at start-up, if any (with or without a limit).
    pub fn cgroup(&self) -> Option<&cgroup::Cgroup> {
        self.cgroup.as_ref()
    }
}

impl MemoryProbe for SystemProbe {
    fn read(&mut self) -> ProbeReading {
        self.system.refresh_memory();
        let sys_total = self.system.total_memory();
        #[cfg(target_os = "macos")]
        if let Some(reading) = self.host.read(sys_total) {
            return reading;
        }
        let sys_available = self.system.available_memory();
        let pressure_some_avg10 = self
            .psi
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .and_then(|t| psi_some_avg10(&t));
        match self.cgroup.as_ref().and_then(|c| c.read()) {
            Some(cg) if cg.limit < sys_total => ProbeReading {
                // The machine as a whole can run short before the cgroup does.
                available_bytes: cg.limit.saturating_sub(cg.working_set).min(sys_available),
                total_bytes: cg.limit,
                source: Source::Cgroup,
                pressure_some_avg10,
                kernel_pressure: None,
            },
            _ => ProbeReading {
                available_bytes: sys_available,
                total_bytes: sys_total,
                source: Source::System,
                pressure_some_avg10,
                kernel_pressure: None,
            },
        }
    }
}

/// Parses the "some" line of `/proc/pressure/memory`: `some avg10=0.12 avg60=… total=…`.
pub fn psi_some_avg10(text: &str) -> Option<f32> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

/// Memory cgroups, v1 and v2.
pub mod cgroup {
    use std::fs;
    use std::path::{Path, PathBuf};

    /// Limits at or above this are "no limit" (v1 writes 2⁶³ − 4096 for unlimited).
    const UNLIMITED: u64 = 1 << 60;

    /// Which cgroup interface.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Version {
        /// `memory.limit_in_bytes`, `memory.usage_in_bytes`
        V1,
        /// `memory.max`, `memory.current`
        V2,
    }

    /// This process's memory cgroup folder.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Cgroup {
        /// v1 or v2.
        pub version: Version,
        /// The folder holding the `memory.*` files.
        pub dir: PathBuf,
    }

    /// A limit and what counts against it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Usage {
        /// The effective limit in bytes.
        pub limit: u64,
        /// Usage minus inactive file cache, which the kernel reclaims before it kills anything.
        pub working_set: u64,
    }

    impl Cgroup {
        /// Finds the memory cgroup from the text of `/proc/self/cgroup`, under `root`
        /// (normally `/sys/fs/cgroup`). A v1 memory controller wins over a v2 entry.
        pub fn discover(proc_self_cgroup: &str, root: &Path) -> Option<Cgroup> {
            let mut v2 = None;
            for line in proc_self_cgroup.lines() {
                let mut parts = line.splitn(3, ':');
                let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let rel = path.trim_start_matches('/');
                if controllers.split(',').any(|c| c == "memory") {
                    let dir = root.join("memory").join(rel);
                    if dir.join("memory.limit_in_bytes").exists() {
                        return Some(Cgroup {
                            version: Version::V1,
                            dir,
                        });
                    }
                } else if controllers.is_empty() {
                    for base in [root.to_owned(), root.join("unified")] {
                        let dir = base.join(rel);
                        if dir.join("memory.max").exists() {
                            v2 = Some(Cgroup {
                                version: Version::V2,
                                dir,
                            });
                            break;
                        }
                    }
                }
            }
            v2
        }

        /// Reads the limit and usage; `None` when there is no limit or the files are gone.
        pub fn read(&self) -> Option<Usage> {
            let num = |name: &str| read_u64(&self.dir.join(name));
            let stat = fs::read_to_string(self.dir.join("memory.stat")).unwrap_or_default();
            let (limit, usage, inactive) = match self.version {
                Version::V1 => {
                    let mut limit = num("memory.limit_in_bytes")?;
                    if let Some(h) = stat_value(&stat, "hierarchical_memory_limit") {
                        limit = limit.min(h);
                    }
                    let inactive =
                        stat_value(&stat, "total_inactive_file").or_else(|| stat_value(&stat, "inactive_file"));
                    (limit, num("memory.usage_in_bytes")?, inactive)
                }
                Version::V2 => {
                    let max = fs::read_to_string(self.dir.join("memory.max")).ok()?;
                    let limit = if max.trim() == "max" {
                        u64::MAX
                    } else {
                        max.trim().parse().ok()?
                    };
                    (limit, num("memory.current")?, stat_value(&stat, "inactive_file"))
                }
            };
            if limit >= UNLIMITED {
                return None;
            }
            Some(Usage {
                limit,
                working_set: usage.saturating_sub(inactive.unwrap_or(0)),
            })
        }
    }

    fn read_u64(path: &Path) -> Option<u64> {
        fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    fn stat_value(stat: &str, key: &str) -> Option<u64> {
        stat.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::cgroup::{Cgroup, Usage, Version};
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn v1_limit_and_usage_minus_inactive_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("memory/app/x");
        write(&dir, "memory.limit_in_bytes", "1073741824\n");
        write(&dir, "memory.usage_in_bytes", "600000000\n");
        write(
            &dir,
            "memory.stat",
            "cache 1000\nhierarchical_memory_limit 2147483648\ntotal_inactive_file 100000000\n",
        );
        let cg = Cgroup::discover("4:memory:/app/x\n3:cpu:/\n0::/\n", root.path()).unwrap();
        assert_eq!(
            cg,
            Cgroup {
                version: Version::V1,
                dir: dir.clone()
            }
        );
        assert_eq!(
            cg.read(),
            Some(Usage {
                limit: 1 << 30,
                working_set: 500_000_000
            })
        );
    }

    #[test]
    fn v1_hierarchical_limit_narrows_an_unlimited_group() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("memory/child");
        write(&dir, "memory.limit_in_bytes", "9223372036854771712\n");
        write(&dir, "memory.usage_in_bytes", "1000\n");
        write(&dir, "memory.stat", "hierarchical_memory_limit 4096000\n");
        let cg = Cgroup::discover("7:memory:/child\n", root.path()).unwrap();
        assert_eq!(
            cg.read(),
            Some(Usage {
                limit: 4_096_000,
                working_set: 1000
            })
        );
    }

    #[test]
    fn v1_unlimited_means_no_cgroup_reading() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("memory/u");
        write(&dir, "memory.limit_in_bytes", "9223372036854771712\n");
        write(&dir, "memory.usage_in_bytes", "1000\n");
        let cg = Cgroup::discover("4:memory:/u\n", root.path()).unwrap();
        assert_eq!(cg.read(), None);
    }

    #[test]
    fn v2_max_current_and_inactive_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("user.slice/app");
        write(&dir, "memory.max", "536870912\n");
        write(&dir, "memory.current", "300000000\n");
        write(&dir, "memory.stat", "anon 1\nfile 2\ninactive_file 50000000\n");
        let cg = Cgroup::discover("0::/user.slice/app\n", root.path()).unwrap();
        assert_eq!(cg.version, Version::V2);
        assert_eq!(
            cg.read(),
            Some(Usage {
                limit: 536_870_912,
                working_set: 250_000_000
            })
        );
        write(&dir, "memory.max", "max\n");
        assert_eq!(cg.read(), None);
    }

    #[test]
    fn v2_under_a_hybrid_unified_mount() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("unified/svc");
        write(&dir, "memory.max", "1000000\n");
        write(&dir, "memory.current", "1000\n");
        let cg = Cgroup::discover("1:name=systemd:/\n0::/svc\n", root.path()).unwrap();
        assert_eq!(cg.dir, dir);
        assert_eq!(cg.read().unwrap().limit, 1_000_000);
    }

    #[test]
    fn no_memory_files_means_no_cgroup() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(Cgroup::discover("4:memory:/gone\n0::/\n", root.path()), None);
    }

    #[test]
    fn psi_some_line_is_parsed() {
        let text = "some avg10=1.25 avg60=0.50 avg300=0.00 total=123\nfull avg10=9.00 avg60=0 avg300=0 total=1\n";
        assert_eq!(psi_some_avg10(text), Some(1.25));
        assert_eq!(psi_some_avg10("garbage"), None);
    }

    #[test]
    fn system_probe_reads_this_machine() {
        let mut probe = SystemProbe::new().unwrap();
        let r = probe.read();
        assert!(
            r.total_bytes > 0 && r.available_bytes > 0 && r.available_bytes <= r.total_bytes,
            "{r:?}"
        );
    }
}
