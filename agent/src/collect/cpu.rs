//! CPU time per core and state, and the other counters of `/proc/stat`.

use super::Roots;
use std::io;

/// Seconds one core spent in each state (or, for utilisation, the fraction of the interval).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuTimes {
    /// The kernel's core number (`cpu3` is 3), kept even when cores before it are offline.
    pub cpu: u32,
    pub user: f64,
    pub nice: f64,
    pub system: f64,
    pub idle: f64,
    pub iowait: f64,
    pub irq: f64,
    pub softirq: f64,
    pub steal: f64,
}

impl CpuTimes {
    /// The states with the names both namings share (`wait` is OpenTelemetry's `iowait`).
    pub fn states(&self) -> [(&'static str, f64); 8] {
        [
            ("user", self.user),
            ("nice", self.nice),
            ("system", self.system),
            ("idle", self.idle),
            ("iowait", self.iowait),
            ("irq", self.irq),
            ("softirq", self.softirq),
            ("steal", self.steal),
        ]
    }

    fn total(&self) -> f64 {
        self.states().iter().map(|(_, v)| v).sum()
    }
}

/// What `/proc/stat` says.
#[derive(Clone, Debug, Default)]
pub struct Stat {
    pub cores: Vec<CpuTimes>,
    pub boot_time: u64,
    pub context_switches: u64,
    pub interrupts: u64,
    pub forks: u64,
    pub procs_running: u64,
    pub procs_blocked: u64,
}

/// Clock ticks per second of `/proc/stat` times (`USER_HZ`).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant of the running system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

pub fn read_stat(roots: &Roots) -> io::Result<Stat> {
    let path = roots.proc.join("stat");
    let text = std::fs::read_to_string(&path)?;
    parse_stat(&text, ticks_per_second()).map_err(|e| super::io_error(&path, e))
}

pub fn parse_stat(text: &str, ticks: f64) -> Result<Stat, String> {
    let mut stat = Stat::default();
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(key) = fields.next() else { continue };
        let first = || -> u64 {
            line.split_ascii_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        match key {
            "btime" => stat.boot_time = first(),
            "ctxt" => stat.context_switches = first(),
            "intr" => stat.interrupts = first(),
            "processes" => stat.forks = first(),
            "procs_running" => stat.procs_running = first(),
            "procs_blocked" => stat.procs_blocked = first(),
            _ if key.starts_with("cpu") && key.len() > 3 => {
                let cpu = key[3..]
                    .parse()
                    .map_err(|_| format!("bad CPU line {line:?}"))?;
                let mut v = [0.0f64; 8];
                for (slot, field) in v.iter_mut().zip(fields) {
                    *slot = field
                        .parse::<u64>()
                        .map_err(|_| format!("bad CPU line {line:?}"))?
                        as f64
                        / ticks;
                }
                stat.cores.push(CpuTimes {
                    cpu,
                    user: v[0],
                    nice: v[1],
                    system: v[2],
                    idle: v[3],
                    iowait: v[4],
                    irq: v[5],
                    softirq: v[6],
                    steal: v[7],
                });
            }
            _ => {}
        }
    }
    if stat.cores.is_empty() {
        return Err("no per-CPU lines".into());
    }
    Ok(stat)
}

/// Each core's share of time per state between two readings (cores matched by number; a core
/// that was not in the previous reading, or whose counters went back, is left out).
pub fn utilization(previous: &[CpuTimes], now: &[CpuTimes]) -> Vec<CpuTimes> {
    now.iter()
        .filter_map(|core| {
            let before = previous.iter().find(|p| p.cpu == core.cpu)?;
            let total = core.total() - before.total();
            if total <= 0.0 {
                return None;
            }
            let share = |a: f64, b: f64| ((a - b) / total).clamp(0.0, 1.0);
            Some(CpuTimes {
                cpu: core.cpu,
                user: share(core.user, before.user),
                nice: share(core.nice, before.nice),
                system: share(core.system, before.system),
                idle: share(core.idle, before.idle),
                iowait: share(core.iowait, before.iowait),
                irq: share(core.irq, before.irq),
                softirq: share(core.softirq, before.softirq),
                steal: share(core.steal, before.steal),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  300 0 100 1000 10 0 5 0 0 0\n\
cpu0 200 0 50 500 5 0 3 0 0 0\n\
cpu2 100 0 50 500 5 0 2 0 0 0\n\
intr 12345 1 2 3\nctxt 999\nbtime 1700000000\nprocesses 4242\nprocs_running 3\nprocs_blocked 1\n";

    #[test]
    fn reads_cores_by_their_number_and_counters() {
        let stat = parse_stat(STAT, 100.0).unwrap();
        assert_eq!(stat.cores.len(), 2);
        assert_eq!(stat.cores[1].cpu, 2);
        assert_eq!(stat.cores[0].user, 2.0);
        assert_eq!(stat.cores[0].softirq, 0.03);
        assert_eq!(stat.boot_time, 1_700_000_000);
        assert_eq!(
            (stat.forks, stat.procs_running, stat.procs_blocked),
            (4242, 3, 1)
        );
        assert_eq!((stat.context_switches, stat.interrupts), (999, 12345));
    }

    #[test]
    fn utilization_is_each_states_share_of_the_interval() {
        let before = parse_stat(STAT, 100.0).unwrap().cores;
        let mut after = before.clone();
        after[0].user += 3.0;
        after[0].idle += 1.0;
        let shares = utilization(&before, &after);
        assert_eq!(shares.len(), 1, "a core with no time passed is left out");
        assert_eq!(shares[0].user, 0.75);
        assert_eq!(shares[0].idle, 0.25);
        assert_eq!(shares[0].system, 0.0);
    }

    #[test]
    fn a_file_without_cores_is_an_error() {
        assert!(parse_stat("btime 1\n", 100.0).is_err());
    }
}
