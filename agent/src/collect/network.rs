//! Network I/O per interface (`/proc/net/dev`) and TCP connections by state (sock_diag
//! netlink, else `/proc/net/tcp` and `/proc/net/tcp6`).
//!
//! Counting TCP states costs a walk of the kernel's whole established-connections hash table
//! (262,144 buckets on a 24 GiB machine, about 1.7 ms each), however few connections there
//! are. Reading `/proc/net/tcp` to its end walks it twice (once more for the read that finds
//! the end); a sock_diag dump walks it once per family, halving the collector's cost.

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
    match sock_diag_states(&mut states) {
        Ok(()) => return Ok(states),
        Err(e) => {
            // Netlink refused (a seccomp profile, an old kernel): the tables in /proc count the same.
            tracing::debug!(error = %e, "sock_diag unavailable; reading /proc/net/tcp");
            states.values_mut().for_each(|v| *v = 0);
        }
    }
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

/// Counts TCP sockets by state over NETLINK_SOCK_DIAG, IPv4 then IPv6.
fn sock_diag_states(states: &mut BTreeMap<&'static str, u64>) -> io::Result<()> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut receive = vec![0u8; 32 * 1024];
    for (family, socket_id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        });
        let mut packet = NetlinkMessage::new(header, request.into());
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        socket.send(&buf, 0)?;
        'dump: loop {
            let size = socket.recv(&mut &mut receive[..], 0)?;
            if size == 0 {
                return Err(io::Error::other(
                    "sock_diag: the dump ended without NLMSG_DONE",
                ));
            }
            let mut offset = 0;
            while offset < size {
                let message =
                    <NetlinkMessage<SockDiagMessage>>::deserialize(&receive[offset..size])
                        .map_err(|e| io::Error::other(format!("sock_diag: {e}")))?;
                let length = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        if let Some(name) = KERNEL_TCP_STATES
                            .get(usize::from(response.header.state).wrapping_sub(1))
                        {
                            *states.entry(name).or_default() += 1;
                        }
                    }
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => {
                        return Err(io::Error::other(format!("sock_diag: {e:?}")))
                    }
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
    Ok(())
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
    fn netlink_and_proc_count_the_same_connections() {
        // Connections that stay put while both are read: a listener and one established pair.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server = listener.accept().unwrap();
        let mut netlink: BTreeMap<&'static str, u64> =
            REPORTED_TCP_STATES.iter().map(|s| (*s, 0)).collect();
        sock_diag_states(&mut netlink).unwrap();
        let mut proc: BTreeMap<&'static str, u64> =
            REPORTED_TCP_STATES.iter().map(|s| (*s, 0)).collect();
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(f) = std::fs::File::open(file) {
                count_states(io::BufReader::new(f), &mut proc).unwrap();
            }
        }
        assert!(
            netlink["LISTEN"] >= 1 && netlink["ESTABLISHED"] >= 2,
            "{netlink:?}"
        );
        // Other tests open and close connections meanwhile: the stable states must agree
        // within what they may change.
        assert!(
            netlink["LISTEN"].abs_diff(proc["LISTEN"]) <= 8,
            "{netlink:?} vs {proc:?}"
        );
    }

    #[test]
    fn reads_this_hosts_tables() {
        let states = read_tcp_states(&Roots::new(std::path::Path::new("/"))).unwrap();
        assert_eq!(states.len(), REPORTED_TCP_STATES.len());
        assert_eq!(states["DELETE"], 0);
    }
}
