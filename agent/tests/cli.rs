//! The `secumon-agent` command as an operator runs it: `--once` in both namings, `--help`,
//! refused configurations with exit code 2.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_secumon-agent"))
}

#[test]
fn once_prints_one_reading_as_json_in_either_naming() {
    for (naming, expected) in [
        ("otel", "system.cpu.time"),
        ("node_exporter", "node_cpu_seconds_total"),
    ] {
        let output = agent()
            .args(["--once", "--naming", naming])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let snapshot: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(snapshot["naming"], naming);
        assert_eq!(snapshot["resource"]["service.name"], "secumon-agent");
        assert!(snapshot["resource"]["host.name"]
            .as_str()
            .is_some_and(|h| !h.is_empty()));
        let names: Vec<&str> = snapshot["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&expected), "{naming}: {names:?}");
    }
}

#[test]
fn collectors_can_be_turned_off() {
    let output = agent()
        .args([
            "--once",
            "--collectors-cpu",
            "false",
            "--collectors-top-processes",
            "false",
        ])
        .output()
        .unwrap();
    let snapshot: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let names: Vec<&str> = snapshot["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("system.cpu.time") || n.starts_with("process.")),
        "{names:?}"
    );
    assert!(names.contains(&"system.memory.usage"));
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
