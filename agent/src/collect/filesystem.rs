//! Filesystem usage and inodes per mount point (the host's mount table and `statvfs`).
//!
//! A mount that hangs (an NFS server gone away) must not hang the agent: each `statvfs` runs
//! on its own short-lived thread and is given [`STATFS_TIMEOUT`]; a mount that does not answer
//! in time is left out, and skipped until the call that hung returns (node_exporter does the
//! same with its stuck-mount tracking).

use super::Roots;
use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// How long one `statvfs` may take before its mount is reported stuck.
const STATFS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq)]
pub struct Filesystem {
    pub device: String,
    /// As the host sees it (without the root path).
    pub mountpoint: String,
    pub fstype: String,
    pub read_only: bool,
    /// Bytes: whole size, free (including the blocks reserved for root), free for users.
    pub size: u64,
    pub free: u64,
    pub avail: u64,
    pub files: u64,
    pub files_free: u64,
}

/// Mount points whose `statvfs` has not returned yet.
#[derive(Clone, Default)]
pub struct StuckMounts(Arc<Mutex<HashSet<String>>>);

impl StuckMounts {
    fn contains(&self, mountpoint: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(mountpoint)
    }

    fn set(&self, mountpoint: &str, stuck: bool) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if stuck {
            set.insert(mountpoint.to_owned());
        } else {
            set.remove(mountpoint);
        }
    }
}

/// One line of a mount table.
#[derive(Debug, PartialEq)]
struct Mount {
    device: String,
    mountpoint: String,
    fstype: String,
    read_only: bool,
}

pub fn read(
    roots: &Roots,
    exclude_types: &regex::Regex,
    exclude_mount_points: &regex::Regex,
    stuck: &StuckMounts,
) -> io::Result<Vec<Filesystem>> {
    // The host's mount table is init's (/proc/self is the agent's own mount namespace, which
    // in a container is the container's).
    let table = std::fs::read_to_string(roots.proc.join("1/mounts"))
        .or_else(|_| std::fs::read_to_string(roots.proc.join("self/mounts")))?;
    let mut seen = HashSet::new();
    let mut filesystems = Vec::new();
    for mount in parse_mounts(&table) {
        if exclude_types.is_match(&mount.fstype)
            || exclude_mount_points.is_match(&mount.mountpoint)
            || !seen.insert((mount.device.clone(), mount.mountpoint.clone()))
            || stuck.contains(&mount.mountpoint)
        {
            continue;
        }
        let path = roots.host_path(&mount.mountpoint);
        match statvfs_with_timeout(path, &mount.mountpoint, stuck) {
            Some(Ok(fs)) => filesystems.push(Filesystem {
                device: mount.device,
                mountpoint: mount.mountpoint,
                fstype: mount.fstype,
                read_only: mount.read_only,
                size: fs.f_blocks.saturating_mul(fs.f_frsize),
                free: fs.f_bfree.saturating_mul(fs.f_frsize),
                avail: fs.f_bavail.saturating_mul(fs.f_frsize),
                files: fs.f_files,
                files_free: fs.f_ffree,
            }),
            Some(Err(e)) => {
                tracing::debug!(mountpoint = %mount.mountpoint, error = %e, "statvfs failed");
            }
            None => {
                tracing::warn!(mountpoint = %mount.mountpoint, "statvfs did not answer in time; mount skipped until it does");
            }
        }
    }
    Ok(filesystems)
}

/// `statvfs` on its own thread; `None` when it did not answer within [`STATFS_TIMEOUT`].
fn statvfs_with_timeout(
    path: PathBuf,
    mountpoint: &str,
    stuck: &StuckMounts,
) -> Option<io::Result<rustix::fs::StatVfs>> {
    let (tx, rx) = mpsc::channel();
    let stuck_after = stuck.clone();
    let name = mountpoint.to_owned();
    stuck.set(mountpoint, true);
    let spawned = std::thread::Builder::new()
        .name("statvfs".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let result = rustix::fs::statvfs(&path).map_err(io::Error::from);
            stuck_after.set(&name, false);
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        stuck.set(mountpoint, false);
        return Some(Err(e));
    }
    rx.recv_timeout(STATFS_TIMEOUT).ok()
}

/// A mount table (`/proc/<pid>/mounts`), with the kernel's octal escapes (`\040` for a space)
/// undone.
fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let device = unescape(fields.next()?);
            let mountpoint = unescape(fields.next()?);
            let fstype = fields.next()?.to_owned();
            let options = fields.next().unwrap_or("");
            Some(Mount {
                device,
                mountpoint,
                fstype,
                read_only: options.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("0");
            out.push(u8::from_str_radix(octal, 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mounts_with_escapes_and_read_only() {
        let mounts = parse_mounts(
            "/dev/sda1 / ext4 rw,relatime 0 0\n/dev/sdb1 /mnt/my\\040disk vfat ro,noatime 0 0\n",
        );
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[1].mountpoint, "/mnt/my disk");
        assert!(mounts[1].read_only);
        assert!(!mounts[0].read_only);
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("end\\04"), "end\\04");
    }

    #[test]
    fn reads_this_hosts_root_filesystem() {
        let none = regex::Regex::new("^$").unwrap();
        let fs = read(
            &Roots::new(std::path::Path::new("/")),
            &none,
            &none,
            &StuckMounts::default(),
        )
        .unwrap();
        let root = fs.iter().find(|f| f.mountpoint == "/").expect("a / mount");
        assert!(root.size > 0 && root.avail <= root.free && root.free <= root.size);
    }
}
