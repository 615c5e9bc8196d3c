//! Processes: counts by state (every `/proc/<pid>/stat`), and the top N processes by CPU
//! (over the last interval) and by resident memory, with their threads and open files.

use super::cpu::{ticks_per_second, Stat};
use super::Roots;
use std::collections::{BTreeMap, HashMap};
use std::io;

/// Process and thread counts of the whole host.
#[derive(Clone, Debug, Default)]
pub struct ProcessCounts {
    /// Processes by the state letter of `/proc/<pid>/stat` (`R`, `S`, `D`, `Z`, `T`, `I`, …).
    pub by_state: BTreeMap<char, u64>,
    pub threads: u64,
    /// From `/proc/stat`: processes created since boot, runnable and blocked tasks now,
    /// context switches and interrupts since boot.
    pub forks: u64,
    pub procs_running: u64,
    pub procs_blocked: u64,
    pub context_switches: u64,
    pub interrupts: u64,
    /// Scheduling entities (threads) the kernel has, from `/proc/loadavg`.
    pub tasks: Option<u64>,
}

/// One of the top processes.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessInfo {
    pub pid: i32,
    pub parent_pid: i32,
    /// The executable's name as the kernel keeps it (`comm`, at most 15 bytes).
    pub name: String,
    /// The owner's user name, or the uid when `/etc/passwd` does not name it.
    pub owner: String,
    pub user_seconds: f64,
    pub system_seconds: f64,
    /// Seconds waiting for block I/O (`delayacct_blkio_ticks`, when the kernel keeps it).
    pub wait_seconds: Option<f64>,
    /// Resident and virtual memory, bytes.
    pub rss: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    /// Open file descriptors; `None` when the agent may not look (another user's process).
    pub open_fds: Option<u64>,
    /// Seconds since the Unix epoch at which the process started.
    pub start_time: f64,
}

/// What the process scan remembers: each process's CPU seconds at the previous scan.
#[derive(Default)]
pub struct Tracker {
    previous_cpu: HashMap<(i32, u64), f64>,
    owners: HashMap<u32, String>,
}

struct Seen {
    pid: i32,
    stat: procfs::process::Stat,
    uid: u32,
    cpu_recent: f64,
}

impl Tracker {
    pub fn scan(
        &mut self,
        roots: &Roots,
        host_stat: Option<&Stat>,
        top_n: usize,
    ) -> io::Result<(ProcessCounts, Vec<ProcessInfo>)> {
        let ticks = ticks_per_second();
        let page = rustix::param::page_size() as u64;
        let mut counts = ProcessCounts::default();
        if let Some(stat) = host_stat {
            counts.forks = stat.forks;
            counts.procs_running = stat.procs_running;
            counts.procs_blocked = stat.procs_blocked;
            counts.context_switches = stat.context_switches;
            counts.interrupts = stat.interrupts;
        }
        counts.tasks = std::fs::read_to_string(roots.proc.join("loadavg"))
            .ok()
            .and_then(|text| {
                text.split_ascii_whitespace()
                    .nth(3)?
                    .split_once('/')?
                    .1
                    .parse()
                    .ok()
            });
        let mut seen = Vec::new();
        let mut cpu_now = HashMap::new();
        let processes = procfs::process::all_processes_with_root(&roots.proc)
            .map_err(|e| super::io_error(&roots.proc, e))?;
        for process in processes.flatten() {
            // A process may end between the listing and the read: it is simply not counted.
            let Ok(stat) = process.stat() else { continue };
            *counts.by_state.entry(stat.state).or_default() += 1;
            counts.threads += stat.num_threads.max(0) as u64;
            let cpu_seconds = (stat.utime + stat.stime) as f64 / ticks;
            // A pid can be reused: the start time tells two processes with one pid apart.
            let key = (stat.pid, stat.starttime);
            let cpu_recent = match self.previous_cpu.get(&key) {
                Some(before) => cpu_seconds - before,
                None => cpu_seconds,
            };
            cpu_now.insert(key, cpu_seconds);
            if top_n > 0 {
                let uid = process.uid().unwrap_or(u32::MAX);
                seen.push(Seen {
                    pid: stat.pid,
                    stat,
                    uid,
                    cpu_recent,
                });
            }
        }
        self.previous_cpu = cpu_now;
        let mut chosen: Vec<usize> = Vec::new();
        let mut order: Vec<usize> = (0..seen.len()).collect();
        order.sort_by(|&a, &b| {
            seen[b]
                .cpu_recent
                .total_cmp(&seen[a].cpu_recent)
                .then(seen[a].pid.cmp(&seen[b].pid))
        });
        chosen.extend(order.iter().take(top_n));
        order.sort_by(|&a, &b| {
            seen[b]
                .stat
                .rss
                .cmp(&seen[a].stat.rss)
                .then(seen[a].pid.cmp(&seen[b].pid))
        });
        for &i in order.iter().take(top_n) {
            if !chosen.contains(&i) {
                chosen.push(i);
            }
        }
        chosen.sort_by_key(|&i| seen[i].pid);
        let boot_time = host_stat.map_or(0, |s| s.boot_time) as f64;
        if chosen
            .iter()
            .any(|&i| !self.owners.contains_key(&seen[i].uid))
        {
            self.owners = read_passwd(roots);
        }
        let top = chosen
            .into_iter()
            .map(|i| {
                let p = &seen[i];
                ProcessInfo {
                    pid: p.pid,
                    parent_pid: p.stat.ppid,
                    name: p.stat.comm.clone(),
                    owner: self
                        .owners
                        .get(&p.uid)
                        .cloned()
                        .unwrap_or_else(|| p.uid.to_string()),
                    user_seconds: p.stat.utime as f64 / ticks,
                    system_seconds: p.stat.stime as f64 / ticks,
                    wait_seconds: p.stat.delayacct_blkio_ticks.map(|t| t as f64 / ticks),
                    rss: p.stat.rss.saturating_mul(page),
                    virtual_bytes: p.stat.vsize,
                    threads: p.stat.num_threads.max(0) as u64,
                    open_fds: count_fds(roots, p.pid),
                    start_time: boot_time + p.stat.starttime as f64 / ticks,
                }
            })
            .collect();
        Ok((counts, top))
    }
}

fn count_fds(roots: &Roots, pid: i32) -> Option<u64> {
    let entries = std::fs::read_dir(roots.proc.join(pid.to_string()).join("fd")).ok()?;
    Some(entries.count() as u64)
}

/// uid -> user name from the host's `/etc/passwd`.
fn read_passwd(roots: &Roots) -> HashMap<u32, String> {
    std::fs::read_to_string(roots.host_path("/etc/passwd"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((uid, name.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_process_among_the_top_by_memory() {
        let roots = Roots::new(std::path::Path::new("/"));
        let stat = super::super::cpu::read_stat(&roots).unwrap();
        let mut tracker = Tracker::default();
        // A top N larger than the machine's process count takes every process.
        let (counts, top) = tracker.scan(&roots, Some(&stat), 1000).unwrap();
        assert!(counts.by_state.values().sum::<u64>() >= 1);
        assert!(counts.threads >= counts.by_state.values().sum::<u64>());
        let me = top
            .iter()
            .find(|p| p.pid == std::process::id() as i32)
            .expect("this test's own process");
        assert!(me.rss > 0 && me.threads >= 1);
        assert!(me.open_fds.unwrap() >= 3, "stdin, stdout, stderr at least");
        let (_, top) = tracker.scan(&roots, Some(&stat), 2).unwrap();
        assert!(
            top.len() <= 4,
            "top 2 by CPU and top 2 by memory: {}",
            top.len()
        );
    }
}
