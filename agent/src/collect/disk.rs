//! Disk I/O per block device (`/proc/diskstats`).

use super::Roots;
use procfs::FromRead;
use std::io;

pub use procfs::DiskStat;

/// Bytes per sector in `/proc/diskstats`: the kernel always counts 512-byte units there,
/// whatever the device's own sector size.
pub const SECTOR_BYTES: u64 = 512;

/// Every device whose name the exclusion pattern does not match (node_exporter's default
/// leaves out partitions, RAM and loop devices, which would count the same bytes twice).
pub fn read(roots: &Roots, exclude: &regex::Regex) -> io::Result<Vec<DiskStat>> {
    let path = roots.proc.join("diskstats");
    let stats = procfs::DiskStats::from_file(&path).map_err(|e| super::io_error(&path, e))?;
    Ok(stats
        .0
        .into_iter()
        .filter(|d| !exclude.is_match(&d.name))
        .collect())
}
