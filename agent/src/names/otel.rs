//! The OpenTelemetry Collector's hostmetrics receiver's metrics (its `metadata.yaml`: names,
//! units, instruments, attributes and attribute values), so that after Prometheus's OTLP
//! translation they read as the collector's do (`system.cpu.time` in `s`, a monotonic sum, is
//! `system_cpu_time_seconds_total`).
//!
//! Per-process metrics carry the process's identity (`process.pid`, `process.parent_pid`,
//! `process.executable.name`, `process.owner`) as data-point attributes, where the collector
//! puts it on one resource per process: Prometheus's translation keeps only `job` and
//! `instance` of a resource, so resource attributes would make every process one series.

use super::{attrs, Kind, Metric};
use crate::collect::HostFacts;

pub fn metrics(f: &HostFacts) -> Vec<Metric> {
    let boot = f.boot_time.map(|b| b as f64);
    let mut out = Vec::new();
    if let Some(cores) = &f.cpu {
        let mut time = Metric::new(
            "system.cpu.time",
            "Seconds each logical CPU spent on each mode.",
            "s",
            Kind::Counter,
        );
        for core in cores {
            let cpu = format!("cpu{}", core.cpu);
            for (state, seconds) in core.states() {
                time = time.double(
                    attrs([("cpu", &cpu), ("state", cpu_state(state))]),
                    seconds,
                    boot,
                );
            }
        }
        out.push(time);
    }
    if let Some(cores) = &f.cpu_utilization {
        let mut util = Metric::new("system.cpu.utilization", "Difference in system.cpu.time since the last measurement, divided by the elapsed time and number of logical CPUs.", "1", Kind::Gauge);
        for core in cores {
            let cpu = format!("cpu{}", core.cpu);
            for (state, share) in core.states() {
                util = util.double(
                    attrs([("cpu", &cpu), ("state", cpu_state(state))]),
                    share,
                    None,
                );
            }
        }
        out.push(util);
    }
    if let Some([one, five, fifteen]) = f.load {
        for (name, value) in [
            ("system.cpu.load_average.1m", one),
            ("system.cpu.load_average.5m", five),
            ("system.cpu.load_average.15m", fifteen),
        ] {
            out.push(
                Metric::new(
                    name,
                    "Average CPU Load over the period.",
                    "{thread}",
                    Kind::Gauge,
                )
                .double(vec![], value, None),
            );
        }
    }
    if let Some(mem) = &f.memory {
        let total = mem.get("MemTotal");
        let free = mem.get("MemFree");
        let buffered = mem.get("Buffers");
        // As gopsutil (and so the collector) reports it: cached includes the reclaimable slab,
        // and used, free, buffered and cached add up to the total; the slab states overlap
        // cached (reclaimable) and used (unreclaimable).
        let cached = mem.get("Cached") + mem.get("SReclaimable");
        let used = total.saturating_sub(free + buffered + cached);
        let states = [
            ("used", used),
            ("free", free),
            ("buffered", buffered),
            ("cached", cached),
            ("slab_reclaimable", mem.get("SReclaimable")),
            ("slab_unreclaimable", mem.get("SUnreclaim")),
        ];
        let mut usage = Metric::new(
            "system.memory.usage",
            "Bytes of memory in use.",
            "By",
            Kind::UpDownCounter,
        );
        let mut util = Metric::new(
            "system.memory.utilization",
            "Percentage of memory bytes in use.",
            "1",
            Kind::Gauge,
        );
        for (state, bytes) in states {
            usage = usage.int(attrs([("state", state)]), bytes, None);
            if total > 0 {
                util = util.double(attrs([("state", state)]), bytes as f64 / total as f64, None);
            }
        }
        out.push(usage);
        out.push(util);
        out.push(
            Metric::new(
                "system.memory.limit",
                "Total bytes of memory available.",
                "By",
                Kind::UpDownCounter,
            )
            .int(vec![], total, None),
        );
    }
    if let Some(swaps) = &f.swaps {
        let mut usage = Metric::new(
            "system.paging.usage",
            "Swap (unix) or pagefile (windows) usage.",
            "By",
            Kind::UpDownCounter,
        );
        let mut util = Metric::new(
            "system.paging.utilization",
            "Swap (unix) or pagefile (windows) utilization.",
            "1",
            Kind::Gauge,
        );
        for swap in swaps {
            let free = swap.size.saturating_sub(swap.used);
            for (state, bytes) in [("used", swap.used), ("free", free)] {
                usage = usage.int(
                    attrs([("device", &swap.device), ("state", state)]),
                    bytes,
                    None,
                );
                if swap.size > 0 {
                    util = util.double(
                        attrs([("device", &swap.device), ("state", state)]),
                        bytes as f64 / swap.size as f64,
                        None,
                    );
                }
            }
        }
        out.push(usage);
        out.push(util);
    }
    if let Some(vm) = &f.vmstat {
        let get = |k: &str| vm.get(k).copied().unwrap_or(0).max(0) as u64;
        let mut ops = Metric::new(
            "system.paging.operations",
            "The number of paging operations.",
            "{operations}",
            Kind::Counter,
        );
        for (direction, kind, key) in [
            ("page_in", "major", "pswpin"),
            ("page_out", "major", "pswpout"),
            ("page_in", "minor", "pgpgin"),
            ("page_out", "minor", "pgpgout"),
        ] {
            ops = ops.int(
                attrs([("direction", direction), ("type", kind)]),
                get(key),
                boot,
            );
        }
        out.push(ops);
        let major = get("pgmajfault");
        out.push(
            Metric::new(
                "system.paging.faults",
                "The number of page faults.",
                "{faults}",
                Kind::Counter,
            )
            .int(attrs([("type", "major")]), major, boot)
            .int(
                attrs([("type", "minor")]),
                get("pgfault").saturating_sub(major),
                boot,
            ),
        );
    }
    if let Some(disks) = &f.disks {
        use crate::collect::SECTOR_BYTES;
        let mut io = Metric::new(
            "system.disk.io",
            "Disk bytes transferred.",
            "By",
            Kind::Counter,
        );
        let mut ops = Metric::new(
            "system.disk.operations",
            "Disk operations count.",
            "{operations}",
            Kind::Counter,
        );
        let mut io_time = Metric::new("system.disk.io_time", "Time disk spent activated. On Windows, this is calculated as the inverse of disk idle time.", "s", Kind::Counter);
        let mut op_time = Metric::new(
            "system.disk.operation_time",
            "Time spent in disk operations.",
            "s",
            Kind::Counter,
        );
        let mut weighted = Metric::new(
            "system.disk.weighted_io_time",
            "Time disk spent activated multiplied by the queue length.",
            "s",
            Kind::Counter,
        );
        let mut merged = Metric::new(
            "system.disk.merged",
            "The number of disk reads/writes merged into single physical disk access operations.",
            "{operations}",
            Kind::Counter,
        );
        let mut pending = Metric::new(
            "system.disk.pending_operations",
            "The queue size of pending I/O operations.",
            "{operations}",
            Kind::UpDownCounter,
        );
        for d in disks {
            let dev = d.name.as_str();
            let rw = |dir| attrs([("device", dev), ("direction", dir)]);
            io = io
                .int(
                    rw("read"),
                    d.sectors_read.saturating_mul(SECTOR_BYTES),
                    boot,
                )
                .int(
                    rw("write"),
                    d.sectors_written.saturating_mul(SECTOR_BYTES),
                    boot,
                );
            ops = ops
                .int(rw("read"), d.reads, boot)
                .int(rw("write"), d.writes, boot);
            op_time = op_time
                .double(rw("read"), d.time_reading as f64 / 1000.0, boot)
                .double(rw("write"), d.time_writing as f64 / 1000.0, boot);
            merged = merged
                .int(rw("read"), d.merged, boot)
                .int(rw("write"), d.writes_merged, boot);
            io_time = io_time.double(
                attrs([("device", dev)]),
                d.time_in_progress as f64 / 1000.0,
                boot,
            );
            weighted = weighted.double(
                attrs([("device", dev)]),
                d.weighted_time_in_progress as f64 / 1000.0,
                boot,
            );
            pending = pending.int(attrs([("device", dev)]), d.in_progress, None);
        }
        out.extend([io, ops, io_time, op_time, weighted, merged, pending]);
    }
    if let Some(filesystems) = &f.filesystems {
        let mut usage = Metric::new(
            "system.filesystem.usage",
            "Filesystem bytes used.",
            "By",
            Kind::UpDownCounter,
        );
        let mut inodes = Metric::new(
            "system.filesystem.inodes.usage",
            "FileSystem inodes used.",
            "{inodes}",
            Kind::UpDownCounter,
        );
        let mut util = Metric::new(
            "system.filesystem.utilization",
            "Fraction of filesystem bytes used.",
            "1",
            Kind::Gauge,
        );
        for fs in filesystems {
            let mode = if fs.read_only { "ro" } else { "rw" };
            let labels = |state| {
                attrs([
                    ("device", fs.device.as_str()),
                    ("mode", mode),
                    ("mountpoint", fs.mountpoint.as_str()),
                    ("type", fs.fstype.as_str()),
                    ("state", state),
                ])
            };
            let used = fs.size.saturating_sub(fs.free);
            usage = usage
                .int(labels("used"), used, None)
                .int(labels("free"), fs.avail, None)
                .int(labels("reserved"), fs.free.saturating_sub(fs.avail), None);
            inodes = inodes
                .int(labels("used"), fs.files.saturating_sub(fs.files_free), None)
                .int(labels("free"), fs.files_free, None);
            // gopsutil's UsedPercent: of what users can have (used + available), so a disk
            // full for users reads 1 even with root's reserve left.
            if used + fs.avail > 0 {
                let mut l = labels("");
                l.pop();
                util = util.double(l, used as f64 / (used + fs.avail) as f64, None);
            }
        }
        out.extend([usage, inodes, util]);
    }
    if let Some(devices) = &f.networks {
        let mut io = Metric::new(
            "system.network.io",
            "The number of bytes transmitted and received.",
            "By",
            Kind::Counter,
        );
        let mut packets = Metric::new(
            "system.network.packets",
            "The number of packets transferred.",
            "{packets}",
            Kind::Counter,
        );
        let mut errors = Metric::new(
            "system.network.errors",
            "The number of errors encountered.",
            "{errors}",
            Kind::Counter,
        );
        let mut dropped = Metric::new(
            "system.network.dropped",
            "The number of packets dropped.",
            "{packets}",
            Kind::Counter,
        );
        for d in devices {
            let dir = |direction| attrs([("device", d.name.as_str()), ("direction", direction)]);
            io =
                io.int(dir("receive"), d.recv_bytes, boot)
                    .int(dir("transmit"), d.sent_bytes, boot);
            packets = packets.int(dir("receive"), d.recv_packets, boot).int(
                dir("transmit"),
                d.sent_packets,
                boot,
            );
            errors = errors.int(dir("receive"), d.recv_errs, boot).int(
                dir("transmit"),
                d.sent_errs,
                boot,
            );
            dropped = dropped.int(dir("receive"), d.recv_drop, boot).int(
                dir("transmit"),
                d.sent_drop,
                boot,
            );
        }
        out.extend([io, packets, errors, dropped]);
    }
    if let Some(states) = &f.tcp_states {
        let mut conns = Metric::new(
            "system.network.connections",
            "The number of connections.",
            "{connections}",
            Kind::UpDownCounter,
        );
        for (state, count) in states {
            conns = conns.int(attrs([("protocol", "tcp"), ("state", state)]), *count, None);
        }
        out.push(conns);
    }
    if let Some(p) = &f.processes {
        let mut count = Metric::new(
            "system.processes.count",
            "Total number of processes in each state.",
            "{processes}",
            Kind::UpDownCounter,
        );
        // As the collector does: counts by each process's state, then running and blocked
        // from /proc/stat (one read, more exact than the walk), and `unknown` what the
        // kernel's task count (loadavg) has beyond the known ones.
        let mut by_status = std::collections::BTreeMap::<&str, u64>::new();
        for (state, n) in &p.by_state {
            *by_status.entry(process_status(*state)).or_default() += n;
        }
        by_status.insert("running", p.procs_running);
        by_status.insert("blocked", p.procs_blocked);
        let known: u64 = by_status.values().sum();
        if let Some(unknown) = p
            .tasks
            .and_then(|t| t.checked_sub(known))
            .filter(|&u| u > 0)
        {
            *by_status.entry("unknown").or_default() += unknown;
        }
        for (status, n) in by_status {
            count = count.int(attrs([("status", status)]), n, None);
        }
        out.push(count);
        out.push(
            Metric::new(
                "system.processes.created",
                "Total number of created processes.",
                "{processes}",
                Kind::Counter,
            )
            .int(vec![], p.forks, boot),
        );
    }
    if let Some(top) = &f.top_processes {
        let mut cpu = Metric::new(
            "process.cpu.time",
            "Total CPU seconds broken down by different states.",
            "s",
            Kind::Counter,
        );
        let mut rss = Metric::new(
            "process.memory.usage",
            "The amount of physical memory in use.",
            "By",
            Kind::UpDownCounter,
        );
        let mut virt = Metric::new(
            "process.memory.virtual",
            "Virtual memory size.",
            "By",
            Kind::UpDownCounter,
        );
        let mut threads = Metric::new(
            "process.threads",
            "Process threads count.",
            "{threads}",
            Kind::UpDownCounter,
        );
        let mut fds = Metric::new(
            "process.open_file_descriptors",
            "Number of file descriptors in use by the process.",
            "{count}",
            Kind::UpDownCounter,
        );
        for p in top {
            let pid = p.pid.to_string();
            let ppid = p.parent_pid.to_string();
            let id = || {
                attrs([
                    ("process.pid", pid.as_str()),
                    ("process.parent_pid", ppid.as_str()),
                    ("process.executable.name", p.name.as_str()),
                    ("process.owner", p.owner.as_str()),
                ])
            };
            let with_state = |state| {
                let mut a = id();
                a.push(("state", String::from(state)));
                a
            };
            cpu = cpu
                .double(with_state("user"), p.user_seconds, Some(p.start_time))
                .double(with_state("system"), p.system_seconds, Some(p.start_time));
            if let Some(wait) = p.wait_seconds {
                cpu = cpu.double(with_state("wait"), wait, Some(p.start_time));
            }
            rss = rss.int(id(), p.rss, None);
            virt = virt.int(id(), p.virtual_bytes, None);
            threads = threads.int(id(), p.threads, None);
            if let Some(n) = p.open_fds {
                fds = fds.int(id(), n, None);
            }
        }
        out.extend([cpu, rss, virt, threads, fds]);
    }
    if let Some(uptime) = f.uptime {
        out.push(
            Metric::new(
                "system.uptime",
                "The time the system has been running.",
                "s",
                Kind::Gauge,
            )
            .double(vec![], uptime, None),
        );
    }
    out
}

/// hostmetrics's `state` values for `/proc/stat`'s columns.
fn cpu_state(state: &'static str) -> &'static str {
    match state {
        "iowait" => "wait",
        "irq" => "interrupt",
        other => other,
    }
}

/// hostmetrics's `status` values for the kernel's state letters (its `charToState`).
fn process_status(state: char) -> &'static str {
    match state {
        'R' => "running",
        'S' => "sleeping",
        'D' => "blocked",
        'Z' => "zombies",
        'T' | 't' => "stopped",
        'I' => "idle",
        'W' => "paging",
        _ => "unknown",
    }
}
