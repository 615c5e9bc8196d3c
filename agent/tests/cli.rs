//! The `secumon-agent` command as an operator runs it: `--once` in both namings, `--help`,
//! refused configurations with exit code 2.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_secumon-agent"))
}

/// `secumon-agent --once` with `args` (it must succeed): the snapshot it prints.
fn once(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let output = agent().arg("--once").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn os<'a>(args: &[&'a str]) -> Vec<&'a std::ffi::OsStr> {
    args.iter().map(|a| std::ffi::OsStr::new(*a)).collect()
}

/// The names of a snapshot's metrics.
fn metric_names(snapshot: &serde_json::Value) -> Vec<String> {
    snapshot["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn once_prints_one_reading_as_json_in_either_naming() {
    for (naming, expected) in [
        ("otel", "system.cpu.time"),
        ("node_exporter", "node_cpu_seconds_total"),
    ] {
        let snapshot = once(&os(&["--naming", naming]));
        assert_eq!(snapshot["naming"], naming);
        assert_eq!(snapshot["resource"]["service.name"], "secumon-agent");
        assert!(snapshot["resource"]["host.name"]
            .as_str()
            .is_some_and(|h| !h.is_empty()));
        let names = metric_names(&snapshot);
        assert!(names.iter().any(|n| n == expected), "{naming}: {names:?}");
    }
}

#[test]
fn collectors_can_be_turned_off() {
    let snapshot = once(&os(&[
        "--collectors-cpu",
        "false",
        "--collectors-top-processes",
        "false",
    ]));
    let names = metric_names(&snapshot);
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("system.cpu.time") || n.starts_with("process.")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "system.memory.usage"),
        "{names:?}"
    );
}

#[test]
fn a_configuration_that_cannot_work_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "[collectors]\ntop_n = 5000\n").unwrap();
    for args in [
        vec!["--interval", "soon"],
        vec!["--protocol", "smtp"],
        vec!["--config", file.to_str().unwrap()],
        vec!["--config", "/nonexistent/agent.toml"],
    ] {
        let output = agent().args(&args).output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!output.stderr.is_empty());
    }
}

#[test]
fn docs_agent_md_lists_every_flag() {
    let help = agent().arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/agent.md")).unwrap();
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '`', ')']))
        .filter(|w| !matches!(*w, "--help" | "--version"))
        .collect();
    assert!(flags.len() > 30, "{flags:?}");
    let missing: Vec<&&str> = flags
        .iter()
        .filter(|f| !docs.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/agent.md does not list {missing:?}"
    );
}

/// Writes `files` (path under the root, text) under `root`.
fn write_tree(root: &std::path::Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

#[test]
fn root_path_reads_the_host_mounted_there() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_tree(
        root,
        &[
            ("proc/stat", "cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 100 0 50 1000 5 0 3 0 0 0\ncpu1 200 0 60 900 6 0 4 0 0 0\nbtime 1700000000\nprocesses 42\nprocs_running 2\nprocs_blocked 1\nctxt 7\nintr 9 1\n"),
            ("proc/loadavg", "1.50 0.75 0.25 2/99 1234\n"),
            ("proc/uptime", "4242.5 1000.0\n"),
            ("proc/meminfo", "MemTotal:       2048 kB\nMemFree:         512 kB\nMemAvailable:   1024 kB\nBuffers:          64 kB\nCached:          256 kB\nSReclaimable:     32 kB\nSUnreclaim:       16 kB\n"),
            ("proc/swaps", "Filename Type Size Used Priority\n"),
            ("proc/vmstat", "pgpgin 10\npgpgout 20\npswpin 1\npswpout 2\npgfault 100\npgmajfault 3\n"),
            ("proc/diskstats", "   8       0 sda 10 1 80 5 20 2 160 7 0 12 13 0 0 0 0\n"),
            ("proc/net/dev", "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n  eth9: 5000 50 1 2 0 0 0 0 7000 70 3 4 0 0 0 0\n"),
            ("proc/1/mounts", "/dev/fake / ext4 rw 0 0\nproc /proc proc rw 0 0\n"),
            ("proc/sys/kernel/hostname", "mounted-host\n"),
            ("proc/sys/kernel/osrelease", "6.1.0-test\n"),
            ("etc/os-release", "PRETTY_NAME=\"Test Linux 1\"\nVERSION_ID=\"1\"\n"),
            ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
        ],
    );
    let mut args = os(&[
        "--collectors-top-processes",
        "false",
        "--collectors-processes",
        "false",
        "--root-path",
    ]);
    args.push(root.as_os_str());
    let snapshot = once(&args);
    assert_eq!(snapshot["resource"]["host.name"], "mounted-host");
    assert_eq!(
        snapshot["resource"]["host.id"],
        "0123456789abcdef0123456789abcdef"
    );
    assert_eq!(snapshot["resource"]["os.description"], "Test Linux 1");
    let value = |name: &str, attrs: &[(&str, &str)]| -> f64 {
        let metric = snapshot["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"));
        let point = metric["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| attrs.iter().all(|(k, v)| p["attributes"][k] == *v))
            .unwrap_or_else(|| panic!("no {name} {attrs:?}"));
        point["value"].as_f64().unwrap()
    };
    let ticks = 100.0; // USER_HZ on Linux
    assert_eq!(
        value("system.cpu.time", &[("cpu", "cpu1"), ("state", "user")]),
        200.0 / ticks
    );
    assert_eq!(value("system.cpu.load_average.1m", &[]), 1.5);
    assert_eq!(value("system.uptime", &[]), 4242.5);
    assert_eq!(value("system.memory.limit", &[]), 2048.0 * 1024.0);
    assert_eq!(
        value("system.memory.usage", &[("state", "cached")]),
        (256.0 + 32.0) * 1024.0
    );
    assert_eq!(
        value(
            "system.disk.io",
            &[("device", "sda"), ("direction", "read")]
        ),
        80.0 * 512.0
    );
    assert_eq!(
        value(
            "system.network.io",
            &[("device", "eth9"), ("direction", "transmit")]
        ),
        7000.0
    );
    // TCP connections are counted over netlink in the agent's own network namespace (a
    // container shares the host's with `--network host`), not from the root path's files.
    assert!(value("system.network.connections", &[("state", "LISTEN")]) >= 0.0);
    // The mount table is the host's: `/` is measured under the root path (the temporary
    // directory's filesystem), `/proc` is left out by type.
    let mounts: Vec<&str> = snapshot["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "system.filesystem.usage")
        .unwrap()["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["attributes"]["mountpoint"].as_str().unwrap())
        .collect();
    assert!(
        !mounts.is_empty() && mounts.iter().all(|m| *m == "/"),
        "{mounts:?}"
    );
}
