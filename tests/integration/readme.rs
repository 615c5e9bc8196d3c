//! The README's five-minute tour, run as written: the server command of "Run", the agent
//! command and the `curl` commands of "Five-minute tour", with `cargo run --release` standing
//! for the binaries this build made (the same programs, without a second, release build). The
//! tour uses the default ports (8080, 4317, 4318), as a newcomer would.

use crate::support::process::{temp_dir, wait_for_port, Managed};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The `sh` code blocks of the README section that starts with `heading`, up to the next
/// heading of the same or a higher level.
fn sh_blocks(readme: &str, heading: &str) -> Vec<Vec<String>> {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no {heading:?} section"));
    let section = &readme[start + 1 + heading.len()..];
    let end = section
        .lines()
        .scan(0, |offset, line| {
            let at = *offset;
            *offset += line.len() + 1;
            Some((at, line))
        })
        .find(|(_, line)| {
            let hashes = line.chars().take_while(|c| *c == '#').count();
            hashes > 0 && hashes <= level && line[hashes..].starts_with(' ')
        })
        .map_or(section.len(), |(at, _)| at);
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in section[..end].lines() {
        match (&mut current, line.trim()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(block), text) if !text.is_empty() => block.push(text.to_owned()),
            _ => {}
        }
    }
    blocks
}

fn binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_secumon")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: cargo build -p {name}",
        path.display()
    );
    path
}

/// A README command with `cargo run --release [-p secumon-agent] --` replaced by the binary.
fn as_built(command: &str) -> String {
    let agent = binary("secumon-agent").display().to_string();
    let server = binary("secumon").display().to_string();
    let command = command
        .replace("cargo run --release -p secumon-agent --", &agent)
        .replace("cargo run --release --", &server)
        .replace("cargo run --release", &server);
    assert!(!command.contains("cargo "), "cannot run {command:?}");
    command
}

fn shell(command: &str, dir: &Path) -> Command {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("exec {command}")])
        .current_dir(dir);
    cmd
}

#[test]
fn the_five_minute_tour_works_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let server = &sh_blocks(&readme, "## Run")[0];
    assert_eq!(
        server,
        &["cargo run --release"],
        "the README's server command"
    );
    let tour = sh_blocks(&readme, "### Five-minute tour");
    assert_eq!(tour.len(), 2, "the tour's blocks: agent, then queries");
    let (agent, queries) = (&tour[0], &tour[1]);
    assert_eq!(agent.len(), 1);
    assert!(
        queries.iter().all(|q| q.starts_with("curl ")),
        "{queries:?}"
    );

    for port in [8080, 4317, 4318] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is taken: the tour uses the default ports; free it to run this test"
        );
    }
    // A fresh working directory, as a newcomer's: ./data and the agent's state go there.
    let dir = temp_dir("secumon-readme");
    let _server = Managed::spawn(
        "secumon",
        shell(&as_built(&server[0]), &dir),
        Some(dir.clone()),
    );
    wait_for_port(8080, Duration::from_secs(30), "the server of the tour");
    let _agent = Managed::spawn(
        "secumon-agent",
        shell(&as_built(&agent[0]), &dir),
        Some(dir.clone()),
    );

    // "Twenty seconds later": every query answers with data once the agent has read twice.
    let deadline = Instant::now() + Duration::from_secs(90);
    let answers = loop {
        let answers: Vec<Value> = queries
            .iter()
            .map(|q| {
                let out = shell(q, &dir).output().expect("curl runs");
                assert!(
                    out.status.success(),
                    "{q}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    panic!("{q}: {e}: {}", String::from_utf8_lossy(&out.stdout))
                })
            })
            .collect();
        let filled = answers.iter().all(|a| {
            a["data"]["result"]
                .as_array()
                .or(a["data"]["agents"].as_array())
                .is_some_and(|r| !r.is_empty())
        });
        if filled {
            break answers;
        }
        assert!(
            Instant::now() < deadline,
            "the tour's queries have no data after 90 s: {answers:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let cpu = &answers[0]["data"]["result"];
    let states: Vec<&str> = cpu
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metric"]["state"].as_str().unwrap())
        .collect();
    assert!(
        states.contains(&"user") && states.contains(&"idle"),
        "{cpu}"
    );
    let memory = answers[1]["data"]["result"].as_array().unwrap();
    assert!(
        memory.iter().any(|s| s["metric"]["state"] == "used"),
        "{memory:?}"
    );
    let agents = answers[2]["data"]["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(agents[0]["agent_type"], "secumon-agent", "{agents:?}");
    assert_eq!(agents[0]["online"], true, "{agents:?}");
    assert!(dir.join("data").is_dir(), "the server's ./data");
    let _ = std::fs::remove_dir_all(&dir);
}
