//! Network I/O per interface (`/proc/net/dev`) and TCP connections by state
//! (`/proc/net/tcp`, `/proc/net/tcp6`).

use super::Roots;
use procfs::FromRead;
use std::collections::BTreeMap;
use std::io::{self, BufRead};

pub use procfs::net::DeviceStatus as NetDev;

pub fn read_devices(roots: &Roots, exclude: Option<&regex::Regex>) -> io::Result<Vec<NetDev>> {
    let path = roots.proc.join("net/dev");
    let devices = procfs::net::InterfaceDeviceStatus::from_file(&path)
        .map_err(|e| super::io_error(&path, e))?;
    let mut devices: Vec<NetDev> = devices
        .0
        .into_values()
        .filter(|d| exclude.is_none_or(|re| !re.is_match(&d.name)))
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(devices)
}

/// The kernel's TCP states (`include/net/tcp_states.h`), by their number in the `st` column
/// less one. `NEW_SYN_RECV` (12) lives only in the request table, never in these files.
const KERNEL_TCP_STATES: [&str; 11] = [
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT_1",
    "FIN_WAIT_2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
];

/// The hostmetrics receiver's states (its `allTCPStates`): every one is reported, 0 when
/// none; `DELETE` is a Windows state, always 0 here.
const REPORTED_TCP_STATES: [&str; 12] = [
    "CLOSE",
    "CLOSE_WAIT",
    "CLOSING",
    "DELETE",
    "ESTABLISHED",
    "FIN_WAIT_1",
    "FIN_WAIT_2",
    "LAST_ACK",
    "LISTEN",
    "SYN_RECV",
    "SYN_SENT",
    "TIME_WAIT",
];

/// TCP connections of both families by state; every state appears, with 0 when none.
/// The tables are streamed line by line: a host with 100,000 connections has files of
/// megabytes that are never held whole.
pub fn read_tcp_states(roots: &Roots) -> io::Result<BTreeMap<&'static str, u64>> {
    let mut states: BTreeMap<&'static str, u64> =
        REPORTED_TCP_STATES.iter().map(|s| (*s, 0)).collect();
    let mut read_any = false;
    for file in ["net/tcp", "net/tcp6"] {
        let Ok(f) = std::fs::File::open(roots.proc.join(file)) else {
            continue; // IPv6 disabled, or no IPv4: the other table still counts.
        };
        read_any = true;
        count_states(io::BufReader::new(f), &mut states)?;
    }
    if !read_any {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no /proc/net/tcp or tcp6",
        ));
    }
    Ok(states)
}

fn count_states(reader: impl BufRead, states: &mut BTreeMap<&'static str, u64>) -> io::Result<()> {
    for line in reader.lines().skip(1) {
        let line = line?;
        let Some(st) = line.split_ascii_whitespace().nth(3) else {
            continue;
        };
        if let Ok(n) = u8::from_str_radix(st, 16) {
            if let Some(name) = KERNEL_TCP_STATES.get(usize::from(n).wrapping_sub(1)) {
                *states.entry(name).or_default() += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_connections_by_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000   0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:0CEA 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   0        0 2 1 0 20 4 30 10 -1\n\
   2: 0100007F:9C40 0100007F:0CEA 01 00000000:00000000 00:00000000 00000000   0        0 3 1 0 20 4 30 10 -1\n\
   3: 0100007F:9C41 0100007F:0CEA 06 00000000:00000000 03:00000000 00000000   0        0 0 3 0\n";
        let mut states = REPORTED_TCP_STATES.iter().map(|s| (*s, 0)).collect();
        count_states(table.as_bytes(), &mut states).unwrap();
        assert_eq!(states["ESTABLISHED"], 2);
        assert_eq!(states["LISTEN"], 1);
        assert_eq!(states["TIME_WAIT"], 1);
        assert_eq!(states["CLOSE_WAIT"], 0);
    }

    #[test]
    fn reads_this_hosts_tables() {
        let states = read_tcp_states(&Roots::new(std::path::Path::new("/"))).unwrap();
        assert_eq!(states.len(), REPORTED_TCP_STATES.len());
        assert_eq!(states["DELETE"], 0);
    }
}
