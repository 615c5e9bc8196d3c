//! compose/: the compose file is valid (docker-compose's own `config`, which needs no engine)
//! and wires what it claims; the Dockerfiles are multi-stage, small and run as non-root.

use crate::support::find_binary;
use std::path::Path;
use std::process::Command;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_compose_file_is_valid_and_complete() {
    let compose = find_binary("docker-compose", "apt-get install -y docker-compose");
    let file = repo("compose/docker-compose.yml");
    let check = Command::new(&compose)
        .arg("-f")
        .arg(&file)
        .args(["config", "-q"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let services = Command::new(&compose)
        .arg("-f")
        .arg(&file)
        .args(["config", "--services"])
        .output()
        .unwrap();
    let mut services: Vec<String> = String::from_utf8(services.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    services.sort();
    assert_eq!(
        services,
        ["agent", "grafana", "secumon", "setup", "timescaledb"]
    );
    let resolved = Command::new(&compose)
        .arg("-f")
        .arg(&file)
        .arg("config")
        .output()
        .unwrap();
    let resolved = String::from_utf8(resolved.stdout).unwrap();
    // What the newcomer's first hour relies on.
    for expected in [
        "condition: service_healthy",
        "condition: service_completed_successfully",
        "SECUMON_AUTH: \"on\"",
        "SECUMON_AGENT_ROOT_PATH: /hostfs",
        "SECUMON_AGENT_EXPORT_TOKEN_FILE: /tokens/agent",
        "pid: host",
        "network_mode: host",
        "/etc/grafana/provisioning",
        "/var/lib/grafana/dashboards",
        "secumon migrate",
        "--scopes ingest",
        "--scopes read",
    ] {
        assert!(
            resolved.contains(expected),
            "compose file lacks {expected:?}:\n{resolved}"
        );
    }
    for path in [
        "grafana/provisioning/datasources/secumon.yaml",
        "grafana/provisioning/dashboards/secumon.yaml",
        "compose/Dockerfile.server",
        "compose/Dockerfile.agent",
    ] {
        assert!(repo(path).is_file(), "{path} is missing");
    }
}

#[test]
fn the_dockerfiles_build_in_one_stage_and_run_as_non_root_in_another() {
    for (file, binary) in [
        ("compose/Dockerfile.server", "secumon"),
        ("compose/Dockerfile.agent", "secumon-agent"),
    ] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        let instructions: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let froms: Vec<&&str> = instructions
            .iter()
            .filter(|l| l.starts_with("FROM "))
            .collect();
        assert_eq!(froms.len(), 2, "{file}: a build stage and a runtime stage");
        assert!(froms[0].ends_with(" AS build"), "{file}: {}", froms[0]);
        assert!(
            froms[1].contains("-slim"),
            "{file}: a slim runtime image, not {}",
            froms[1]
        );
        let runtime: Vec<&&str> = instructions
            .iter()
            .skip_while(|l| !l.starts_with("FROM ") || l.ends_with(" AS build"))
            .collect();
        assert!(
            runtime
                .iter()
                .any(|l| l.starts_with("COPY --from=build") && l.contains(binary)),
            "{file}: copies {binary} from the build stage"
        );
        let user = runtime
            .iter()
            .rev()
            .find(|l| l.starts_with("USER "))
            .unwrap_or_else(|| panic!("{file}: no USER"));
        assert!(
            !user.contains("root") && !user.ends_with(" 0"),
            "{file}: runs as {user}"
        );
        assert!(
            runtime
                .iter()
                .any(|l| l.starts_with("ENTRYPOINT [\"") && l.contains(binary)),
            "{file}: entrypoint"
        );
        assert!(
            text.contains("--locked"),
            "{file}: builds with the lock file"
        );
    }
    let server = std::fs::read_to_string(repo("compose/Dockerfile.server")).unwrap();
    assert!(
        server.contains("HEALTHCHECK") && server.contains("/ready"),
        "the server image checks /ready"
    );
    let ignore = std::fs::read_to_string(repo(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target/"),
        ".dockerignore keeps target/ out of the build context"
    );
}
