//! Collectors: what the host says about itself, read from `/proc`, `/sys` and `statvfs` under
//! the root path (`/`, or `/hostfs` in a container with the host's filesystems mounted).
//!
//! Collectors gather neutral facts ([`HostFacts`]); the naming schemes in `crate::names` turn
//! them into metrics. A collector that fails leaves its part empty and says why once per
//! failure kind in the log: one unreadable file never costs the other collectors' readings.
//! Collectors never write anything under the root path.

mod cpu;
mod disk;
mod filesystem;
mod host;
mod memory;
mod network;
mod process;

pub use cpu::CpuTimes;
pub use disk::{DiskStat, SECTOR_BYTES};
pub use filesystem::Filesystem;
pub use host::HostInfo;
pub use memory::{MemInfo, Swap};
pub use network::NetDev;
pub use process::{ProcessCounts, ProcessInfo};

use crate::config::CollectorsConfig;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Everything one collection read, each part `None` when its collector is off or failed.
#[derive(Debug, Default)]
pub struct HostFacts {
    /// When the collection started.
    pub time: Option<SystemTime>,
    /// Seconds since the Unix epoch at which the host booted (`btime` of `/proc/stat`).
    pub boot_time: Option<u64>,
    pub cpu: Option<Vec<CpuTimes>>,
    /// Fraction of each core's time per state since the previous collection.
    pub cpu_utilization: Option<Vec<CpuTimes>>,
    pub load: Option<[f64; 3]>,
    pub memory: Option<MemInfo>,
    pub swaps: Option<Vec<Swap>>,
    /// `/proc/vmstat` counters (pgpgin, pswpin, pgfault, …).
    pub vmstat: Option<BTreeMap<String, i64>>,
    pub disks: Option<Vec<DiskStat>>,
    pub filesystems: Option<Vec<Filesystem>>,
    pub networks: Option<Vec<NetDev>>,
    /// TCP connections (IPv4 and IPv6) by kernel state name (`ESTABLISHED`, `LISTEN`, …).
    pub tcp_states: Option<BTreeMap<&'static str, u64>>,
    pub processes: Option<ProcessCounts>,
    pub top_processes: Option<Vec<ProcessInfo>>,
    pub uptime: Option<f64>,
    pub host: HostInfo,
}

/// The root path and the host's `/proc` under it.
#[derive(Clone, Debug)]
pub struct Roots {
    pub root: PathBuf,
    pub proc: PathBuf,
}

impl Roots {
    pub fn new(root: &Path) -> Roots {
        Roots {
            root: root.to_owned(),
            proc: root.join("proc"),
        }
    }

    /// A path of the host (`/etc/machine-id`) as seen under the root path.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

/// The collectors with what they remember between collections (previous CPU times for
/// utilisation and top processes by CPU, mounts that hang).
pub struct Collector {
    roots: Roots,
    config: CollectorsConfig,
    filters: Filters,
    previous_cpu: Option<Vec<CpuTimes>>,
    processes: process::Tracker,
    stuck_mounts: filesystem::StuckMounts,
    /// Failures already logged, so a collector broken for good logs once, not every interval.
    logged: HashSet<String>,
    host: HostInfo,
}

/// The configured exclusion patterns, compiled once.
struct Filters {
    fs_types: regex::Regex,
    mount_points: regex::Regex,
    disks: regex::Regex,
    network: Option<regex::Regex>,
}

impl Filters {
    fn new(config: &CollectorsConfig) -> Result<Filters, regex::Error> {
        Ok(Filters {
            fs_types: regex::Regex::new(&config.filesystem_exclude_types)?,
            mount_points: regex::Regex::new(&config.filesystem_exclude_mount_points)?,
            disks: regex::Regex::new(&config.disk_exclude_devices)?,
            network: match config.network_exclude_devices.as_str() {
                "" => None,
                pattern => Some(regex::Regex::new(pattern)?),
            },
        })
    }
}

impl Collector {
    pub fn new(root: &Path, config: CollectorsConfig) -> Result<Collector, regex::Error> {
        let roots = Roots::new(root);
        let filters = Filters::new(&config)?;
        let host = HostInfo::read(&roots);
        Ok(Collector {
            roots,
            config,
            filters,
            previous_cpu: None,
            processes: process::Tracker::default(),
            stuck_mounts: filesystem::StuckMounts::default(),
            logged: HashSet::new(),
            host,
        })
    }

    /// The host's identity, read at start.
    pub fn host(&self) -> &HostInfo {
        &self.host
    }

    /// Applies a collectors configuration (from a remote configuration) when it differs from
    /// the one in use; a configuration whose patterns do not compile leaves the old one.
    pub fn reconfigure_if_changed(
        &mut self,
        config: &CollectorsConfig,
    ) -> Result<(), regex::Error> {
        if *config != self.config {
            self.filters = Filters::new(config)?;
            self.config = config.clone();
        }
        Ok(())
    }

    /// One collection. Blocking: reads files and calls `statvfs` (run it off the async tasks).
    pub fn collect(&mut self) -> HostFacts {
        let config = self.config.clone();
        let mut facts = HostFacts {
            time: Some(SystemTime::now()),
            host: self.host.clone(),
            ..HostFacts::default()
        };
        let stat = self.ok("cpu", cpu::read_stat(&self.roots));
        if let Some(stat) = &stat {
            facts.boot_time = Some(stat.boot_time);
        }
        if config.cpu {
            if let Some(stat) = &stat {
                if let Some(previous) = &self.previous_cpu {
                    facts.cpu_utilization = Some(cpu::utilization(previous, &stat.cores));
                }
                self.previous_cpu = Some(stat.cores.clone());
                facts.cpu = Some(stat.cores.clone());
            }
        }
        if config.load {
            facts.load = self.ok("load", host::read_load(&self.roots));
        }
        if config.memory {
            facts.memory = self.ok("memory", memory::read_meminfo(&self.roots));
        }
        if config.paging {
            facts.swaps = self.ok("paging", memory::read_swaps(&self.roots));
            facts.vmstat = self.ok("paging", memory::read_vmstat(&self.roots));
        }
        if config.disk {
            facts.disks = self.ok("disk", disk::read(&self.roots, &self.filters.disks));
        }
        if config.filesystem {
            let read = filesystem::read(
                &self.roots,
                &self.filters.fs_types,
                &self.filters.mount_points,
                &self.stuck_mounts,
            );
            facts.filesystems = self.ok("filesystem", read);
        }
        if config.network {
            let read = network::read_devices(&self.roots, self.filters.network.as_ref());
            facts.networks = self.ok("network", read);
            facts.tcp_states = self.ok("network", network::read_tcp_states(&self.roots));
        }
        if config.processes || config.top_processes {
            let read = self
                .processes
                .scan(&self.roots, stat.as_ref(), usize::from(config.top_n));
            if let Some((counts, top)) = self.ok("processes", read) {
                if config.processes {
                    facts.processes = Some(counts);
                }
                if config.top_processes {
                    facts.top_processes = Some(top);
                }
            }
        }
        if config.uptime {
            facts.uptime = self.ok("uptime", host::read_uptime(&self.roots));
        }
        facts
    }

    /// The value, or `None` with the error logged once per collector and message.
    fn ok<T>(&mut self, collector: &str, read: std::io::Result<T>) -> Option<T> {
        match read {
            Ok(value) => Some(value),
            Err(e) => {
                let key = format!("{collector}: {e}");
                if self.logged.insert(key) {
                    tracing::warn!(collector, error = %e, "collector failed; its metrics are left out");
                }
                None
            }
        }
    }
}

/// A procfs error as an I/O error with the path it concerns.
pub(crate) fn io_error(what: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{}: {e}", what.display()))
}
