//! node_exporter's names and labels (its `cpu`, `loadavg`, `meminfo`, `vmstat`, `diskstats`,
//! `filesystem`, `netdev`, `tcpstat`, `stat`, `processes`, `time` and `uname`
//! collectors), so dashboards written for node_exporter work unchanged. Top processes have no
//! node_exporter counterpart and keep their OpenTelemetry names in this naming too.

use super::{attrs, Kind, Metric};
use crate::collect::{DiskStat, Filesystem, HostFacts, NetDev, SECTOR_BYTES};

/// A metric read off each item of one kind: name, help, value.
type Field<T, V> = (&'static str, &'static str, fn(&T) -> V);
/// A counter of one network device.
type NetField = fn(&NetDev) -> u64;

pub fn metrics(f: &HostFacts) -> Vec<Metric> {
    let mut out = Vec::new();
    if let Some(cores) = &f.cpu {
        let mut m = Metric::new(
            "node_cpu_seconds_total",
            "Seconds the CPUs spent in each mode.",
            "",
            Kind::Counter,
        );
        for core in cores {
            let cpu = core.cpu.to_string();
            for (mode, seconds) in core.states() {
                m = m.double(attrs([("cpu", &cpu), ("mode", mode)]), seconds, None);
            }
        }
        out.push(m);
    }
    if let Some([one, five, fifteen]) = f.load {
        out.push(
            Metric::new("node_load1", "1m load average.", "", Kind::Gauge).double(
                vec![],
                one,
                None,
            ),
        );
        out.push(
            Metric::new("node_load5", "5m load average.", "", Kind::Gauge).double(
                vec![],
                five,
                None,
            ),
        );
        out.push(
            Metric::new("node_load15", "15m load average.", "", Kind::Gauge).double(
                vec![],
                fifteen,
                None,
            ),
        );
    }
    if let Some(mem) = &f.memory {
        for (field, value, bytes) in &mem.fields {
            // node_exporter: `Active(anon)` is `Active_anon`, and `kB` fields end in `_bytes`.
            let name = field.replace('(', "_").replace(')', "");
            let name = if *bytes {
                format!("node_memory_{name}_bytes")
            } else {
                format!("node_memory_{name}")
            };
            out.push(
                Metric::new(
                    name,
                    "Memory information field from /proc/meminfo.",
                    "",
                    Kind::Gauge,
                )
                .int(vec![], *value, None),
            );
        }
    }
    if let Some(vm) = &f.vmstat {
        // node_exporter's default `--collector.vmstat.fields`.
        let fields =
            regex::Regex::new("^(oom_kill|pgpg|pswp|pg.*fault).*").expect("constant pattern");
        for (name, value) in vm.iter().filter(|(n, _)| fields.is_match(n)) {
            out.push(
                Metric::new(
                    format!("node_vmstat_{name}"),
                    "/proc/vmstat information field.",
                    "",
                    Kind::Gauge,
                )
                .int(vec![], (*value).max(0) as u64, None),
            );
        }
    }
    if let Some(disks) = &f.disks {
        let counters: [Field<DiskStat, f64>; 10] = [
            (
                "node_disk_reads_completed_total",
                "The total number of reads completed successfully.",
                |d| d.reads as f64,
            ),
            (
                "node_disk_reads_merged_total",
                "The total number of reads merged.",
                |d| d.merged as f64,
            ),
            (
                "node_disk_read_bytes_total",
                "The total number of bytes read successfully.",
                |d| (d.sectors_read.saturating_mul(SECTOR_BYTES)) as f64,
            ),
            (
                "node_disk_read_time_seconds_total",
                "The total number of seconds spent by all reads.",
                |d| d.time_reading as f64 / 1000.0,
            ),
            (
                "node_disk_writes_completed_total",
                "The total number of writes completed successfully.",
                |d| d.writes as f64,
            ),
            (
                "node_disk_writes_merged_total",
                "The number of writes merged.",
                |d| d.writes_merged as f64,
            ),
            (
                "node_disk_written_bytes_total",
                "The total number of bytes written successfully.",
                |d| (d.sectors_written.saturating_mul(SECTOR_BYTES)) as f64,
            ),
            (
                "node_disk_write_time_seconds_total",
                "This is the total number of seconds spent by all writes.",
                |d| d.time_writing as f64 / 1000.0,
            ),
            (
                "node_disk_io_time_seconds_total",
                "Total seconds spent doing I/Os.",
                |d| d.time_in_progress as f64 / 1000.0,
            ),
            (
                "node_disk_io_time_weighted_seconds_total",
                "The weighted # of seconds spent doing I/Os.",
                |d| d.weighted_time_in_progress as f64 / 1000.0,
            ),
        ];
        for (name, help, value) in counters {
            let mut m = Metric::new(name, help, "", Kind::Counter);
            for d in disks {
                m = m.double(attrs([("device", d.name.as_str())]), value(d), None);
            }
            out.push(m);
        }
        // Counters newer kernels add (4.18: discards, 5.5: flushes): only where present.
        let newer: [Field<DiskStat, Option<f64>>; 6] = [
            (
                "node_disk_discards_completed_total",
                "The total number of discards completed successfully.",
                |d| d.discards.map(|v| v as f64),
            ),
            (
                "node_disk_discards_merged_total",
                "The total number of discards merged.",
                |d| d.discards_merged.map(|v| v as f64),
            ),
            (
                "node_disk_discarded_sectors_total",
                "The total number of sectors discarded successfully.",
                |d| d.sectors_discarded.map(|v| v as f64),
            ),
            (
                "node_disk_discard_time_seconds_total",
                "This is the total number of seconds spent by all discards.",
                |d| d.time_discarding.map(|v| v as f64 / 1000.0),
            ),
            (
                "node_disk_flush_requests_total",
                "The total number of flush requests completed successfully",
                |d| d.flushes.map(|v| v as f64),
            ),
            (
                "node_disk_flush_requests_time_seconds_total",
                "This is the total number of seconds spent by all flush requests.",
                |d| d.time_flushing.map(|v| v as f64 / 1000.0),
            ),
        ];
        for (name, help, value) in newer {
            let mut m = Metric::new(name, help, "", Kind::Counter);
            for d in disks {
                if let Some(v) = value(d) {
                    m = m.double(attrs([("device", d.name.as_str())]), v, None);
                }
            }
            out.push(m);
        }
        let mut now = Metric::new(
            "node_disk_io_now",
            "The number of I/Os currently in progress.",
            "",
            Kind::Gauge,
        );
        for d in disks {
            now = now.int(attrs([("device", d.name.as_str())]), d.in_progress, None);
        }
        out.push(now);
    }
    if let Some(filesystems) = &f.filesystems {
        let gauges: [Field<Filesystem, u64>; 6] = [
            (
                "node_filesystem_size_bytes",
                "Filesystem size in bytes.",
                |fs| fs.size,
            ),
            (
                "node_filesystem_free_bytes",
                "Filesystem free space in bytes.",
                |fs| fs.free,
            ),
            (
                "node_filesystem_avail_bytes",
                "Filesystem space available to non-root users in bytes.",
                |fs| fs.avail,
            ),
            (
                "node_filesystem_files",
                "Filesystem total file nodes.",
                |fs| fs.files,
            ),
            (
                "node_filesystem_files_free",
                "Filesystem total free file nodes.",
                |fs| fs.files_free,
            ),
            (
                "node_filesystem_readonly",
                "Filesystem read-only status.",
                |fs| u64::from(fs.read_only),
            ),
        ];
        for (name, help, value) in gauges {
            let mut m = Metric::new(name, help, "", Kind::Gauge);
            for fs in filesystems {
                m = m.int(
                    attrs([
                        ("device", fs.device.as_str()),
                        ("fstype", fs.fstype.as_str()),
                        ("mountpoint", fs.mountpoint.as_str()),
                    ]),
                    value(fs),
                    None,
                );
            }
            out.push(m);
        }
    }
    if let Some(devices) = &f.networks {
        let counters: [(&str, NetField); 16] = [
            ("receive_bytes", |d| d.recv_bytes),
            ("receive_packets", |d| d.recv_packets),
            ("receive_errs", |d| d.recv_errs),
            ("receive_drop", |d| d.recv_drop),
            ("receive_fifo", |d| d.recv_fifo),
            ("receive_frame", |d| d.recv_frame),
            ("receive_compressed", |d| d.recv_compressed),
            ("receive_multicast", |d| d.recv_multicast),
            ("transmit_bytes", |d| d.sent_bytes),
            ("transmit_packets", |d| d.sent_packets),
            ("transmit_errs", |d| d.sent_errs),
            ("transmit_drop", |d| d.sent_drop),
            ("transmit_fifo", |d| d.sent_fifo),
            ("transmit_colls", |d| d.sent_colls),
            ("transmit_carrier", |d| d.sent_carrier),
            ("transmit_compressed", |d| d.sent_compressed),
        ];
        for (field, value) in counters {
            let mut m = Metric::new(
                format!("node_network_{field}_total"),
                "Network device statistic from /proc/net/dev.",
                "",
                Kind::Counter,
            );
            for d in devices {
                m = m.int(attrs([("device", d.name.as_str())]), value(d), None);
            }
            out.push(m);
        }
    }
    if let Some(states) = &f.tcp_states {
        let mut m = Metric::new(
            "node_tcp_connection_states",
            "Number of connection states.",
            "",
            Kind::Gauge,
        );
        // node_exporter's tcpstat reports the states that have connections.
        for (state, count) in states.iter().filter(|(_, n)| **n > 0) {
            if let Some(name) = node_tcp_state(state) {
                m = m.int(attrs([("state", name)]), *count, None);
            }
        }
        out.push(m);
    }
    if let Some(p) = &f.processes {
        out.push(
            Metric::new(
                "node_procs_running",
                "Number of processes in runnable state.",
                "",
                Kind::Gauge,
            )
            .int(vec![], p.procs_running, None),
        );
        out.push(
            Metric::new(
                "node_procs_blocked",
                "Number of processes blocked waiting for I/O to complete.",
                "",
                Kind::Gauge,
            )
            .int(vec![], p.procs_blocked, None),
        );
        out.push(
            Metric::new(
                "node_forks_total",
                "Total number of forks.",
                "",
                Kind::Counter,
            )
            .int(vec![], p.forks, None),
        );
        out.push(
            Metric::new(
                "node_context_switches_total",
                "Total number of context switches.",
                "",
                Kind::Counter,
            )
            .int(vec![], p.context_switches, None),
        );
        out.push(
            Metric::new(
                "node_intr_total",
                "Total number of interrupts serviced.",
                "",
                Kind::Counter,
            )
            .int(vec![], p.interrupts, None),
        );
        let mut states = Metric::new(
            "node_processes_state",
            "Number of processes in each state.",
            "",
            Kind::Gauge,
        );
        for (state, n) in &p.by_state {
            states = states.int(vec![("state", state.to_string())], *n, None);
        }
        out.push(states);
        out.push(
            Metric::new(
                "node_processes_threads",
                "Allocated threads in system.",
                "",
                Kind::Gauge,
            )
            .int(vec![], p.threads, None),
        );
    }
    if f.uptime.is_some() {
        if let Some(boot) = f.boot_time {
            out.push(
                Metric::new(
                    "node_boot_time_seconds",
                    "Node boot time, in unixtime.",
                    "",
                    Kind::Gauge,
                )
                .int(vec![], boot, None),
            );
        }
        if let Some(now) = f
            .time
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        {
            out.push(
                Metric::new(
                    "node_time_seconds",
                    "System time in seconds since epoch (1970).",
                    "",
                    Kind::Gauge,
                )
                .double(vec![], now.as_secs_f64(), None),
            );
        }
    }
    let h = &f.host;
    out.push(
        Metric::new(
            "node_uname_info",
            "Labeled system information as provided by the uname system call.",
            "",
            Kind::Gauge,
        )
        .int(
            attrs([
                ("domainname", h.domainname.as_str()),
                ("machine", h.machine.as_str()),
                ("nodename", h.hostname.as_str()),
                ("release", h.kernel_release.as_str()),
                ("sysname", "Linux"),
                ("version", h.kernel_version.as_str()),
            ]),
            1,
            None,
        ),
    );
    if f.top_processes.is_some() {
        let only_top = HostFacts {
            top_processes: f.top_processes.clone(),
            ..HostFacts::default()
        };
        out.extend(super::otel::metrics(&only_top));
    }
    out
}

/// node_exporter's tcpstat state names.
fn node_tcp_state(state: &str) -> Option<&'static str> {
    Some(match state {
        "ESTABLISHED" => "established",
        "SYN_SENT" => "syn_sent",
        "SYN_RECV" => "syn_recv",
        "FIN_WAIT_1" => "fin_wait1",
        "FIN_WAIT_2" => "fin_wait2",
        "TIME_WAIT" => "time_wait",
        "CLOSE" => "close",
        "CLOSE_WAIT" => "close_wait",
        "LAST_ACK" => "last_ack",
        "LISTEN" => "listen",
        "CLOSING" => "closing",
        _ => return None,
    })
}
