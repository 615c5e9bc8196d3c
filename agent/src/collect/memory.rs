//! Memory (`/proc/meminfo`), swap devices (`/proc/swaps`) and paging counters (`/proc/vmstat`).

use super::Roots;
use std::collections::BTreeMap;
use std::io;

/// `/proc/meminfo` in file order: name, value, and whether the value is bytes (the file's
/// `kB` fields, converted) or a count (`HugePages_Total`).
#[derive(Clone, Debug, Default)]
pub struct MemInfo {
    pub fields: Vec<(String, u64, bool)>,
}

impl MemInfo {
    /// A field's value (bytes for `kB` fields), 0 when the kernel does not report it.
    pub fn get(&self, name: &str) -> u64 {
        self.fields
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or(0, |(_, v, _)| *v)
    }

    pub fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|(n, _, _)| n == name)
    }
}

pub fn read_meminfo(roots: &Roots) -> io::Result<MemInfo> {
    let path = roots.proc.join("meminfo");
    let text = std::fs::read_to_string(&path)?;
    let info = parse_meminfo(&text);
    if !info.has("MemTotal") {
        return Err(super::io_error(&path, "no MemTotal"));
    }
    Ok(info)
}

pub fn parse_meminfo(text: &str) -> MemInfo {
    let fields = text
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let mut parts = rest.split_ascii_whitespace();
            let value: u64 = parts.next()?.parse().ok()?;
            Some(match parts.next() {
                Some("kB") => (name.trim().to_owned(), value.saturating_mul(1024), true),
                _ => (name.trim().to_owned(), value, false),
            })
        })
        .collect();
    MemInfo { fields }
}

/// One swap device or file of `/proc/swaps`, in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Swap {
    pub device: String,
    pub size: u64,
    pub used: u64,
}

pub fn read_swaps(roots: &Roots) -> io::Result<Vec<Swap>> {
    let text = std::fs::read_to_string(roots.proc.join("swaps"))?;
    Ok(parse_swaps(&text))
}

pub fn parse_swaps(text: &str) -> Vec<Swap> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            let kib = |i: usize| fields.get(i)?.parse::<u64>().ok().map(|v| v * 1024);
            Some(Swap {
                device: (*fields.first()?).to_owned(),
                size: kib(2)?,
                used: kib(3)?,
            })
        })
        .collect()
}

pub fn read_vmstat(roots: &Roots) -> io::Result<BTreeMap<String, i64>> {
    let text = std::fs::read_to_string(roots.proc.join("vmstat"))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_in_bytes_and_counts() {
        let info = parse_meminfo(
            "MemTotal:       16384 kB\nMemFree:  1024 kB\nActive(anon):  8 kB\nHugePages_Total:       4\n",
        );
        assert_eq!(info.get("MemTotal"), 16384 * 1024);
        assert_eq!(info.get("Active(anon)"), 8192);
        assert_eq!(info.fields[3], ("HugePages_Total".into(), 4, false));
        assert_eq!(info.get("Cached"), 0);
        assert!(!info.has("Cached"));
    }

    #[test]
    fn swaps_in_bytes() {
        let swaps = parse_swaps(
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/sda2 partition\t1000\t10\t-2\n",
        );
        assert_eq!(
            swaps,
            vec![Swap {
                device: "/dev/sda2".into(),
                size: 1_024_000,
                used: 10_240
            }]
        );
    }
}
