//! Child processes that never outlive the tests: each is spawned from one long-lived thread
//! with `PR_SET_PDEATHSIG`, so it dies with the test binary even when that is killed, and is
//! stopped (and its directory removed) on drop or at exit.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Entry {
    id: u64,
    child: Child,
    dir: Option<PathBuf>,
}

fn registry() -> &'static Mutex<Vec<Entry>> {
    static REGISTRY: OnceLock<Mutex<Vec<Entry>>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        extern "C" fn cleanup_at_exit() {
            if let Ok(mut entries) = registry().lock() {
                for entry in entries.drain(..) {
                    stop(entry);
                }
            }
        }
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
        Mutex::new(Vec::new())
    })
}

fn stop(mut entry: Entry) {
    // SIGQUIT: PostgreSQL's immediate shutdown; other programs exit on it too.
    unsafe {
        libc::kill(entry.child.id() as i32, libc::SIGQUIT);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = entry.child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = entry.child.kill();
    let _ = entry.child.wait();
    if let Some(dir) = entry.dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns on a thread that lives as long as the process, so `PR_SET_PDEATHSIG` (which fires
/// when the spawning *thread* exits) fires only when the test binary dies.
fn spawn_from_long_lived_thread(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((command, reply_tx))
        .expect("spawner thread alive");
    reply_rx.recv().expect("spawner replied")
}

/// A running child process owned by a test.
pub struct Managed {
    id: u64,
}

impl Managed {
    pub fn spawn(name: &str, mut command: Command, dir: Option<PathBuf>) -> Managed {
        // SAFETY: prctl is async-signal-safe and touches no state of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        if std::env::var_os("SECUMON_TEST_VERBOSE").is_none() {
            // Keep the output beside the data for a post-mortem, out of the test's output.
            let log = dir
                .as_ref()
                .and_then(|d| std::fs::File::create(d.join(format!("{name}.log"))).ok());
            match log {
                Some(file) => {
                    command.stdout(Stdio::null()).stderr(file);
                }
                None => {
                    command.stdout(Stdio::null()).stderr(Stdio::null());
                }
            }
        }
        let child = spawn_from_long_lived_thread(command)
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        registry().lock().unwrap().push(Entry { id, child, dir });
        Managed { id }
    }

    pub fn pid(&self) -> u32 {
        registry()
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.id == self.id)
            .map_or(0, |e| e.child.id())
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        let entry = {
            let mut entries = registry().lock().unwrap_or_else(|e| e.into_inner());
            entries
                .iter()
                .position(|e| e.id == self.id)
                .map(|i| entries.remove(i))
        };
        if let Some(entry) = entry {
            stop(entry);
        }
    }
}

/// A port the kernel reports free on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn wait_for_port(port: u16, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A new empty directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
        .keep()
}

/// The user to run PostgreSQL as: itself when not root (PostgreSQL refuses root), else the
/// `postgres` account the Debian package creates, else `nobody`.
pub fn unprivileged_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in ["postgres", "nobody"] {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: getpwnam returns a pointer into static storage or null; read at once.
        let entry = unsafe { libc::getpwnam(cname.as_ptr()) };
        if !entry.is_null() {
            let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
            return Some((uid, gid));
        }
    }
    panic!("running as root and no `postgres` or `nobody` user exists to run PostgreSQL as")
}

pub fn chown_to(dir: &Path, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown test dir");
    }
}

pub fn command_as(program: &Path, user: Option<(u32, u32)>) -> Command {
    let mut command = Command::new(program);
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
        command.env("HOME", "/tmp");
    }
    command
}

/// The built `secumon` binary serving `storage` on `127.0.0.1:port` (OTLP listeners off unless
/// `extra` sets them), started and listening. Benchmarks may name another build in
/// `SECUMON_BENCH_BINARY` (an earlier commit's, to compare side by side).
pub fn spawn_secumon(storage: &str, port: u16, extra: &[&str]) -> Managed {
    let binary = std::env::var_os("SECUMON_BENCH_BINARY").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_secumon")),
        PathBuf::from,
    );
    let mut cmd = Command::new(binary);
    cmd.args(["serve", "--storage", storage])
        .args(["--http-listen", &format!("127.0.0.1:{port}")]);
    let defaults = [
        ("--otlp-grpc-listen", ""),
        ("--otlp-http-listen", ""),
        ("--log-level", "warn"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.args(extra);
    // Benches only: more flags for the server under test (`SECUMON_BENCH_ARGS="--a 1 --b 2"`).
    if let Ok(more) = std::env::var("SECUMON_BENCH_ARGS") {
        cmd.args(more.split_whitespace());
    }
    let process = Managed::spawn("secumon", cmd, None);
    wait_for_port(port, Duration::from_secs(30), "secumon");
    process
}
