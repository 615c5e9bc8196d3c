//! Configuration of `secumon-agent`: a TOML file (`--config`), overridden by
//! `SECUMON_AGENT_*` environment variables, overridden by flags.
//!
//! Every key is declared once, as a field below: its doc comment is the help text, its
//! `#[arg]` the flag, the variable and the default, and serde reads the same field from the
//! file (`[queue] max_bytes` is `--queue-max-bytes` is `SECUMON_AGENT_QUEUE_MAX_BYTES`).
//! `Default` is what clap's defaults give, so the file, the flags and `--help` cannot
//! disagree. docs/agent.md lists every key (a test checks it).

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser};
use serde::{Deserialize, Deserializer};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// OTLP endpoint of the server: `http://host:4317` for gRPC, `http://host:4318` (the path
    /// `/v1/metrics` is added when the URL has none) for `--protocol http`; `https://` for TLS.
    #[arg(
        id = "server",
        long = "server",
        env = "SECUMON_AGENT_SERVER",
        default_value = "http://127.0.0.1:4317"
    )]
    pub server: String,
    /// OTLP transport: `grpc` or `http` (protobuf over HTTP).
    #[arg(id = "protocol", long = "protocol", env = "SECUMON_AGENT_PROTOCOL", value_enum, default_value_t = Protocol::Grpc)]
    pub protocol: Protocol,
    /// How often the host is read (`10s`, `1m`); readings are taken on multiples of it since the
    /// Unix epoch, so agents on different hosts read at the same instants.
    #[arg(id = "interval", long = "interval", env = "SECUMON_AGENT_INTERVAL", default_value = "10s", value_parser = parse_interval)]
    #[serde(deserialize_with = "deserialize_interval")]
    pub interval: Duration,
    /// Metric names: `otel` (the OpenTelemetry Collector's hostmetrics receiver) or
    /// `node_exporter` (node_exporter's names and labels, for existing dashboards).
    #[arg(id = "naming", long = "naming", env = "SECUMON_AGENT_NAMING", value_enum, default_value_t = Naming::Otel)]
    pub naming: Naming,
    /// Where the host's filesystems are: `/`, or `/hostfs` in a container with the host's `/`
    /// mounted there (then `/hostfs/proc`, `/hostfs/sys` and every mount point are read).
    #[arg(
        id = "root_path",
        long = "root-path",
        env = "SECUMON_AGENT_ROOT_PATH",
        default_value = "/"
    )]
    pub root_path: PathBuf,
    /// Directory for the agent's id and its on-disk queue (created if missing).
    #[arg(
        id = "state_dir",
        long = "state-dir",
        env = "SECUMON_AGENT_STATE_DIR",
        default_value = "secumon-agent-data"
    )]
    pub state_dir: PathBuf,
    /// Log filter in `RUST_LOG` syntax (`info`, `secumon_agent=debug`).
    #[arg(
        id = "log_level",
        long = "log-level",
        env = "SECUMON_AGENT_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
    #[command(flatten, next_help_heading = "Export")]
    pub export: ExportConfig,
    #[command(flatten, next_help_heading = "On-disk queue")]
    pub queue: QueueConfig,
    #[command(flatten, next_help_heading = "Collectors")]
    pub collectors: CollectorsConfig,
    #[command(flatten, next_help_heading = "OpAMP")]
    pub opamp: OpampConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Naming {
    Otel,
    #[value(name = "node_exporter")]
    NodeExporter,
}

/// `[export]`: how readings reach the server.
#[derive(Clone, Debug, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// Compress requests with gzip.
    #[arg(id = "export.gzip", long = "export-gzip", env = "SECUMON_AGENT_EXPORT_GZIP", action = clap::ArgAction::Set, default_value_t = true)]
    pub gzip: bool,
    /// How long one export may take before it is abandoned and retried.
    #[arg(id = "export.timeout", long = "export-timeout", env = "SECUMON_AGENT_EXPORT_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    #[serde(deserialize_with = "deserialize_interval")]
    pub timeout: Duration,
    /// File holding the bearer token sent with every request (`Authorization: Bearer …`);
    /// unset sends none. Read again at each retry, so a rotated token is picked up.
    #[arg(
        id = "export.token_file",
        long = "export-token-file",
        env = "SECUMON_AGENT_EXPORT_TOKEN_FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// PEM file of the certificate authorities that sign the server's certificate; unset
    /// trusts the system's.
    #[arg(
        id = "export.ca_file",
        long = "export-ca-file",
        env = "SECUMON_AGENT_EXPORT_CA_FILE"
    )]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate (and `--export-client-key`) the agent presents when the server asks
    /// for one (mutual TLS); unset presents none.
    #[arg(
        id = "export.client_cert",
        long = "export-client-cert",
        env = "SECUMON_AGENT_EXPORT_CLIENT_CERT"
    )]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `--export-client-cert`.
    #[arg(
        id = "export.client_key",
        long = "export-client-key",
        env = "SECUMON_AGENT_EXPORT_CLIENT_KEY"
    )]
    pub client_key: Option<PathBuf>,
    /// First wait after a retryable failure; it doubles at each failure in a row (with
    /// jitter) up to `--export-max-backoff`. A server's `Retry-After` is honoured.
    #[arg(id = "export.initial_backoff", long = "export-initial-backoff", env = "SECUMON_AGENT_EXPORT_INITIAL_BACKOFF", default_value = "1s", value_parser = parse_interval)]
    #[serde(deserialize_with = "deserialize_interval")]
    pub initial_backoff: Duration,
    /// Longest wait between retries.
    #[arg(id = "export.max_backoff", long = "export-max-backoff", env = "SECUMON_AGENT_EXPORT_MAX_BACKOFF", default_value = "30s", value_parser = parse_interval)]
    #[serde(deserialize_with = "deserialize_interval")]
    pub max_backoff: Duration,
}

/// `[queue]`: the on-disk queue every reading goes through before it is sent.
#[derive(Clone, Debug, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Most bytes the queue holds on disk; past it the oldest readings are dropped (and
    /// counted). Readings are kept gzip-compressed: 256 MiB is about 5 days at
    /// 10 s on a small host (5.4 KiB per reading with 2 cores and 3 interfaces).
    #[arg(id = "queue.max_bytes", long = "queue-max-bytes", env = "SECUMON_AGENT_QUEUE_MAX_BYTES", default_value_t = 256 << 20)]
    pub max_bytes: u64,
    /// Oldest reading the queue keeps; older ones are dropped (and counted) unsent.
    #[arg(id = "queue.max_age", long = "queue-max-age", env = "SECUMON_AGENT_QUEUE_MAX_AGE", default_value = "24h", value_parser = parse_interval)]
    #[serde(deserialize_with = "deserialize_interval")]
    pub max_age: Duration,
}

/// `[collectors]`: what is read. Each can be turned off; a remote configuration may change
/// this section, `interval` and `naming` (see docs/agent.md).
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorsConfig {
    /// CPU time per core and state, and utilisation.
    #[arg(id = "collectors.cpu", long = "collectors-cpu", env = "SECUMON_AGENT_COLLECTORS_CPU", action = clap::ArgAction::Set, default_value_t = true)]
    pub cpu: bool,
    /// Load averages (1, 5 and 15 minutes).
    #[arg(id = "collectors.load", long = "collectors-load", env = "SECUMON_AGENT_COLLECTORS_LOAD", action = clap::ArgAction::Set, default_value_t = true)]
    pub load: bool,
    /// Memory by state.
    #[arg(id = "collectors.memory", long = "collectors-memory", env = "SECUMON_AGENT_COLLECTORS_MEMORY", action = clap::ArgAction::Set, default_value_t = true)]
    pub memory: bool,
    /// Swap usage per device, paging operations and faults.
    #[arg(id = "collectors.paging", long = "collectors-paging", env = "SECUMON_AGENT_COLLECTORS_PAGING", action = clap::ArgAction::Set, default_value_t = true)]
    pub paging: bool,
    /// Disk I/O per block device.
    #[arg(id = "collectors.disk", long = "collectors-disk", env = "SECUMON_AGENT_COLLECTORS_DISK", action = clap::ArgAction::Set, default_value_t = true)]
    pub disk: bool,
    /// Filesystem usage and inodes per mount point.
    #[arg(id = "collectors.filesystem", long = "collectors-filesystem", env = "SECUMON_AGENT_COLLECTORS_FILESYSTEM", action = clap::ArgAction::Set, default_value_t = true)]
    pub filesystem: bool,
    /// Network I/O per interface and TCP connections by state.
    #[arg(id = "collectors.network", long = "collectors-network", env = "SECUMON_AGENT_COLLECTORS_NETWORK", action = clap::ArgAction::Set, default_value_t = true)]
    pub network: bool,
    /// Process counts by state, processes created, context switches.
    #[arg(id = "collectors.processes", long = "collectors-processes", env = "SECUMON_AGENT_COLLECTORS_PROCESSES", action = clap::ArgAction::Set, default_value_t = true)]
    pub processes: bool,
    /// The top processes by CPU and by memory (`--collectors-top-n` each).
    #[arg(id = "collectors.top_processes", long = "collectors-top-processes", env = "SECUMON_AGENT_COLLECTORS_TOP_PROCESSES", action = clap::ArgAction::Set, default_value_t = true)]
    pub top_processes: bool,
    /// Uptime (and, in node_exporter naming, boot time and the time now).
    #[arg(id = "collectors.uptime", long = "collectors-uptime", env = "SECUMON_AGENT_COLLECTORS_UPTIME", action = clap::ArgAction::Set, default_value_t = true)]
    pub uptime: bool,
    /// How many processes the top-by-CPU and the top-by-memory lists each hold (at most 1000).
    #[arg(id = "collectors.top_n", long = "collectors-top-n", env = "SECUMON_AGENT_COLLECTORS_TOP_N", default_value_t = 10, value_parser = clap::value_parser!(u16).range(0..=1000))]
    pub top_n: u16,
    /// Filesystem types left out (a regular expression; node_exporter's default: pseudo and
    /// virtual filesystems).
    #[arg(id = "collectors.filesystem_exclude_types", long = "collectors-filesystem-exclude-types", env = "SECUMON_AGENT_COLLECTORS_FILESYSTEM_EXCLUDE_TYPES", default_value = FS_TYPES_EXCLUDE)]
    pub filesystem_exclude_types: String,
    /// Mount points left out (a regular expression; node_exporter's default).
    #[arg(id = "collectors.filesystem_exclude_mount_points", long = "collectors-filesystem-exclude-mount-points", env = "SECUMON_AGENT_COLLECTORS_FILESYSTEM_EXCLUDE_MOUNT_POINTS", default_value = MOUNT_POINTS_EXCLUDE)]
    pub filesystem_exclude_mount_points: String,
    /// Block devices left out (a regular expression; node_exporter's default: partitions,
    /// RAM, loop and floppy devices).
    #[arg(id = "collectors.disk_exclude_devices", long = "collectors-disk-exclude-devices", env = "SECUMON_AGENT_COLLECTORS_DISK_EXCLUDE_DEVICES", default_value = DISKS_EXCLUDE)]
    pub disk_exclude_devices: String,
    /// Network interfaces left out (a regular expression; empty keeps every interface).
    #[arg(
        id = "collectors.network_exclude_devices",
        long = "collectors-network-exclude-devices",
        env = "SECUMON_AGENT_COLLECTORS_NETWORK_EXCLUDE_DEVICES",
        default_value = ""
    )]
    pub network_exclude_devices: String,
}

/// Smallest queue: room for a few hundred readings (a reading is a few KiB compressed).
const MIN_QUEUE_BYTES: u64 = 1 << 20;

/// node_exporter 1.5's `--collector.filesystem.fs-types-exclude`.
const FS_TYPES_EXCLUDE: &str = "^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|sysfs|tracefs)$";
/// node_exporter 1.5's `--collector.filesystem.mount-points-exclude`.
const MOUNT_POINTS_EXCLUDE: &str =
    "^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)";
/// node_exporter 1.5's `--collector.diskstats.device-exclude`.
const DISKS_EXCLUDE: &str = "^(ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\\d+n\\d+p)\\d+$";

/// `[opamp]`: the agent's registration with the server's fleet (OpAMP over HTTP).
#[derive(Clone, Debug, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct OpampConfig {
    /// The server's OpAMP endpoint (`http://host:8080/v1/opamp`); empty turns OpAMP off.
    /// Sends the export's bearer token and uses its TLS settings.
    #[arg(
        id = "opamp.url",
        long = "opamp-url",
        env = "SECUMON_AGENT_OPAMP_URL",
        default_value = ""
    )]
    pub url: String,
    /// How often the agent reports to the OpAMP server when nothing changed (its heartbeat).
    #[arg(id = "opamp.heartbeat", long = "opamp-heartbeat", env = "SECUMON_AGENT_OPAMP_HEARTBEAT", default_value = "30s", value_parser = parse_interval)]
    #[serde(deserialize_with = "deserialize_interval")]
    pub heartbeat: Duration,
}

macro_rules! clap_default {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                clap_defaults()
            }
        }
    )*};
}
clap_default!(
    Config,
    ExportConfig,
    QueueConfig,
    CollectorsConfig,
    OpampConfig
);

fn clap_defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"))
        .mut_args(|arg| arg.env(None::<&str>).required(false));
    let matches = command.get_matches_from(["defaults"]);
    T::from_arg_matches(&matches).expect("every configuration key declares a default")
}

/// A duration such as `500ms`, `10s`, `5m`, `1h30m` or `7d` (Prometheus's units, largest first).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 10s, 5m or 1h30m");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let ms_per_unit = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 604_800_000,
            _ => return Err(bad()),
        };
        total_ms = value
            .checked_mul(ms_per_unit)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_millis(total_ms))
}

/// A duration as [`parse_duration`] reads it, in its largest exact unit (`90s` is `90s`,
/// `120s` is `2m`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= per && ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// A duration of at least one second (what every interval and timeout of the agent needs).
fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{text:?}: at least 1s"));
    }
    Ok(d)
}

fn deserialize_interval<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_interval(&text).map_err(serde::de::Error::custom)
}

#[derive(Debug, Parser)]
#[command(
    name = "secumon-agent",
    version,
    about = "SecuMon host agent: reads the host and pushes its metrics as OTLP"
)]
struct Cli {
    /// TOML configuration file (keys as in docs/agent.md); flags and environment override it.
    #[arg(long, env = "SECUMON_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Take one reading, print it as JSON and exit (nothing is sent or queued).
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    settings: Config,
}

/// What the command line asks for.
pub struct Invocation {
    pub once: bool,
    pub config: Config,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Args(#[from] clap::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub fn command() -> clap::Command {
    Cli::command()
}

/// Parses a command line (program name first): the file's settings, or the defaults,
/// overridden by the environment and the flags.
pub fn parse<I, T>(args: I) -> Result<Invocation, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    let once = matches.get_flag("once");
    let path = matches.get_one::<PathBuf>("config").cloned();
    let config = load(path.as_deref(), &matches)?;
    config.validate()?;
    Ok(Invocation { once, config })
}

fn load(path: Option<&Path>, matches: &ArgMatches) -> Result<Config, ConfigError> {
    let mut config = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?
        }
        None => Config::default(),
    };
    // clap fills in defaults; only what was given may override the file.
    let mut given = matches.clone();
    let defaulted: Vec<String> = matches
        .ids()
        .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::DefaultValue))
        .map(|id| id.as_str().to_owned())
        .collect();
    for id in defaulted {
        given
            .try_clear_id(&id)
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::InvalidValue, e))?;
    }
    config.update_from_arg_matches(&given)?;
    Ok(config)
}

impl Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.collectors.validate().map_err(ConfigError::Invalid)?;
        if self.queue.max_bytes < MIN_QUEUE_BYTES {
            return Err(ConfigError::Invalid(format!(
                "queue.max_bytes {} is below {MIN_QUEUE_BYTES} (1 MiB)",
                self.queue.max_bytes
            )));
        }
        if self.export.client_cert.is_some() != self.export.client_key.is_some() {
            return Err(ConfigError::Invalid(
                "export.client_cert and export.client_key go together".into(),
            ));
        }
        if !(self.server.starts_with("http://") || self.server.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!(
                "server {:?}: an http:// or https:// URL",
                self.server
            )));
        }
        Ok(())
    }
}

impl CollectorsConfig {
    /// Every exclusion pattern compiles and `top_n` is in range (values from a file or a
    /// remote configuration do not pass through clap's checks).
    pub fn validate(&self) -> Result<(), String> {
        for (key, pattern) in [
            ("filesystem_exclude_types", &self.filesystem_exclude_types),
            (
                "filesystem_exclude_mount_points",
                &self.filesystem_exclude_mount_points,
            ),
            ("disk_exclude_devices", &self.disk_exclude_devices),
            ("network_exclude_devices", &self.network_exclude_devices),
        ] {
            regex::Regex::new(pattern).map_err(|e| format!("collectors.{key}: {e}"))?;
        }
        if self.top_n > 1000 {
            return Err(format!("collectors.top_n: {} is over 1000", self.top_n));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        for bad in ["", "10", "s", "1x", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_interval("500ms").is_err());
    }

    #[test]
    fn defaults_then_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "interval = \"30s\"\nnaming = \"node_exporter\"\n[collectors]\ntop_n = 3\ncpu = false\n[queue]\nmax_bytes = 2000000\n").unwrap();
        let defaults = parse(["secumon-agent"]).unwrap().config;
        assert_eq!(defaults.interval, Duration::from_secs(10));
        assert_eq!(defaults.collectors.top_n, 10);
        assert_eq!(defaults.queue.max_bytes, 256 << 20);
        let invocation = parse([
            "secumon-agent",
            "--config",
            file.to_str().unwrap(),
            "--interval",
            "5s",
            "--collectors-load",
            "false",
            "--once",
        ])
        .unwrap();
        let config = invocation.config;
        assert!(invocation.once);
        assert_eq!(
            config.interval,
            Duration::from_secs(5),
            "a flag beats the file"
        );
        assert_eq!(
            config.naming,
            Naming::NodeExporter,
            "the file beats the default"
        );
        assert_eq!(config.collectors.top_n, 3);
        assert!(!config.collectors.cpu && !config.collectors.load && config.collectors.memory);
        assert_eq!(config.queue.max_bytes, 2_000_000);
    }

    #[test]
    fn the_packaged_example_sets_every_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, include_str!("../packaging/agent.toml")).unwrap();
        let example = parse(["secumon-agent", "--config", file.to_str().unwrap()])
            .unwrap()
            .config;
        let defaults = Config::default();
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn refuses_what_cannot_work() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        for (text, says) in [
            ("intervall = \"5s\"\n", "unknown field"),
            (
                "[collectors]\ndisk_exclude_devices = \"(\"\n",
                "disk_exclude_devices",
            ),
            ("[export]\nclient_cert = \"c.pem\"\n", "go together"),
            ("server = \"127.0.0.1:4317\"\n", "http://"),
            ("interval = \"0s\"\n", "at least 1s"),
            ("[queue]\nmax_bytes = 1000\n", "below"),
        ] {
            std::fs::write(&file, text).unwrap();
            let error = parse(["secumon-agent", "--config", file.to_str().unwrap()])
                .err()
                .unwrap();
            assert!(error.to_string().contains(says), "{text}: {error}");
        }
    }
}
