//! Who the host is (name, id, operating system, kernel), load averages and uptime.

use super::Roots;
use std::io;

/// The host's identity, read once at start (under the root path, so a containerised agent
/// describes the host, not its container).
#[derive(Clone, Debug, Default)]
pub struct HostInfo {
    pub hostname: String,
    pub domainname: String,
    /// `/etc/machine-id` (systemd's stable host id), empty when the host has none.
    pub machine_id: String,
    /// The kernel's machine name (`uname -m`: `x86_64`, `aarch64`).
    pub machine: String,
    /// OpenTelemetry's `host.arch` (`amd64`, `arm64`, …).
    pub arch: &'static str,
    /// The kernel release (`uname -r`) and version (`uname -v`).
    pub kernel_release: String,
    pub kernel_version: String,
    /// `PRETTY_NAME` of `os-release` (`Debian GNU/Linux 12 (bookworm)`), else `Linux`.
    pub os_name: String,
    /// `VERSION_ID` of `os-release`, else the kernel release.
    pub os_version: String,
}

impl HostInfo {
    pub fn read(roots: &Roots) -> HostInfo {
        let kernel = |name: &str| {
            std::fs::read_to_string(roots.proc.join("sys/kernel").join(name))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let os_release = std::fs::read_to_string(roots.host_path("/etc/os-release"))
            .or_else(|_| std::fs::read_to_string(roots.host_path("/usr/lib/os-release")))
            .unwrap_or_default();
        let os_field = |key: &str| {
            os_release.lines().find_map(|line| {
                let value = line.strip_prefix(key)?.strip_prefix('=')?;
                Some(value.trim().trim_matches('"').to_owned())
            })
        };
        let mut hostname = kernel("hostname");
        if hostname.is_empty() {
            hostname = rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned();
        }
        let kernel_release = kernel("osrelease");
        HostInfo {
            hostname,
            domainname: kernel("domainname"),
            machine_id: std::fs::read_to_string(roots.host_path("/etc/machine-id"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            machine: rustix::system::uname()
                .machine()
                .to_string_lossy()
                .into_owned(),
            arch: otel_arch(std::env::consts::ARCH),
            kernel_version: kernel("version"),
            os_name: os_field("PRETTY_NAME").unwrap_or_else(|| "Linux".into()),
            os_version: os_field("VERSION_ID").unwrap_or_else(|| kernel_release.clone()),
            kernel_release,
        }
    }
}

/// OpenTelemetry's `host.arch` values for Rust's architecture names.
fn otel_arch(arch: &str) -> &'static str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm32",
        "x86" => "x86",
        "powerpc64" => "ppc64",
        "powerpc" => "ppc32",
        "s390x" => "s390x",
        _ => "unknown",
    }
}

pub fn read_load(roots: &Roots) -> io::Result<[f64; 3]> {
    let path = roots.proc.join("loadavg");
    let text = std::fs::read_to_string(&path)?;
    let mut fields = text.split_ascii_whitespace().map(str::parse::<f64>);
    let mut load = [0.0; 3];
    for slot in &mut load {
        *slot = fields
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| super::io_error(&path, "not three load averages"))?;
    }
    Ok(load)
}

pub fn read_uptime(roots: &Roots) -> io::Result<f64> {
    let path = roots.proc.join("uptime");
    let text = std::fs::read_to_string(&path)?;
    text.split_ascii_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| super::io_error(&path, "no uptime"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_hosts_identity() {
        let info = HostInfo::read(&Roots::new(std::path::Path::new("/")));
        assert!(!info.hostname.is_empty());
        assert!(!info.kernel_release.is_empty());
        assert_ne!(info.arch, "unknown");
    }

    #[test]
    fn reads_load_and_uptime_under_another_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("proc")).unwrap();
        std::fs::write(
            dir.path().join("proc/loadavg"),
            "0.50 1.25 2.00 3/456 7890\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("proc/uptime"), "12345.67 23456.78\n").unwrap();
        let roots = Roots::new(dir.path());
        assert_eq!(read_load(&roots).unwrap(), [0.5, 1.25, 2.0]);
        assert_eq!(read_uptime(&roots).unwrap(), 12345.67);
        std::fs::write(dir.path().join("proc/loadavg"), "0.5\n").unwrap();
        assert!(read_load(&roots).is_err());
    }
}
