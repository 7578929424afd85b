//! Configuration: YAML → validated model.
//!
//! Two kinds of files: the global `conf/tqproxy.yaml` and one `workers/<name>/worker.yaml` per
//! worker. The `Raw*` structs mirror the YAML (unknown keys are rejected); the public structs are
//! the validated model the rest of tqproxy uses. The conversion *is* the validation: per-field
//! checks happen while deserializing (so serde reports the line), cross-field checks afterwards
//! (and locate their line in the source text). Every error names the file, the line and the key.
//!
//! Relative paths resolve against the directory of the file they are written in, so tqproxy can
//! be started from any directory.
//!
//! Here: the errors and the validated model. `raw` holds the YAML structs, `units` the
//! human durations and sizes, `load` the global file and the path/route helpers, `worker` a
//! worker file, `locate` the file:line of every error.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

mod load;
mod locate;
mod raw;
mod units;
mod worker;

pub use load::*;
use locate::*;
use raw::*;
pub use units::*;
pub use worker::RESERVED_ENV;
use worker::*;

/// A configuration error: which file, which line (when known), which key, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// All errors found in a configuration (files are checked independently, so one bad worker
/// does not hide the errors of another).
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------------------------
// The validated model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    Combined,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    Auto,
    V1,
    V2,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Rolling,
    Bluegreen,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Rolling => "rolling",
            Strategy::Bluegreen => "bluegreen",
        })
    }
}

/// How the proxy reaches a worker's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TCP on `127.0.0.1:$PORT`, a port from the `ports` range (the default).
    #[default]
    Tcp,
    /// A unix stream socket tqproxy creates under `run_dir` and passes as fd 3; the instance
    /// has no port (`PORT` is not set).
    Unix,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Namespace {
    Mount,
    Pid,
    Ipc,
    Uts,
    Net,
    User,
}

/// A public listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub kind: ListenerKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ListenerKind {
    /// Plain HTTP (HTTP/1.1; HTTP/2 too with `proxy.h2c`).
    Plain,
    /// TLS with certificates chosen by SNI (the first is the default); HTTP/2 via ALPN.
    Tls {
        certificates: Vec<crate::tls::CertFiles>,
        h2: bool,
    },
    /// Answers every request with a redirect to `https://<host>:<port>` (port 443 omitted).
    RedirectHttps { port: u16 },
}

/// The whole configuration: the global file plus every enabled worker.
#[derive(Debug, Clone)]
pub struct Config {
    /// The global file, absolute.
    pub file: PathBuf,
    /// Every listener's address (see `listeners` for what each does).
    pub listen: Vec<SocketAddr>,
    pub listeners: Vec<Listener>,
    pub control_socket: PathBuf,
    pub admin: Option<SocketAddr>,
    pub workers_dir: PathBuf,
    pub logs_dir: PathBuf,
    pub run_dir: PathBuf,
    pub ports: RangeInclusive<u16>,
    pub proxy: ProxySettings,
    pub log: LogSettings,
    pub cgroups: CgroupSettings,
    /// Enabled workers by name.
    pub workers: BTreeMap<String, Arc<WorkerConfig>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    /// Accept HTTP/2 without TLS (prior knowledge) on plain listeners.
    pub h2c: bool,
    /// Proxy threads (default: available cores).
    pub threads: usize,
    /// Idle upstream connections kept per proxy thread (default 1024: at least the expected
    /// client concurrency, or requests open new upstream connections).
    pub upstream_keepalive_pool: usize,
    /// How long an idle upstream connection is kept (default 30s; keep it below the workers'
    /// own keep-alive timeout so tqproxy closes pooled connections first).
    pub upstream_idle_timeout: Duration,
    /// Attempts per request, first included (default 3).
    pub max_retries: usize,
    /// The whole request head must arrive within this (default 10s), else 408 and close.
    pub client_header_timeout: Duration,
    /// How long an idle client connection is kept between requests (default 60s).
    pub client_keepalive_timeout: Duration,
    /// Longest pause between two reads of a request body or two writes of a response to
    /// the client (default 60s).
    pub client_body_timeout: Duration,
    /// Client connections served at once; beyond it requests get 503 and the connection is
    /// closed (default: no limit).
    pub max_connections: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
    pub access_log: Option<PathBuf>,
    pub access_format: AccessLogFormat,
    pub worker_log_max_size: u64,
    pub worker_log_keep: u32,
    /// Lines per second read from each stream of each instance (0: no limit); beyond it the
    /// pipe fills and the worker's own writes wait.
    pub worker_log_rate: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CgroupSettings {
    pub mode: CgroupMode,
    pub root: PathBuf,
    pub base: String,
    /// cgroup v2: build the tree inside tqproxy's own (systemd `Delegate=yes`) unit cgroup,
    /// with tqproxy itself moved to `<unit>/supervisor`, instead of at `<root>/<base>`.
    pub delegated: bool,
}

/// A route: optional host, path prefix (no trailing slash, `/` for everything), stripping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct RouteSpec {
    pub host: Option<String>,
    pub prefix: String,
    pub strip_prefix: bool,
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.host {
            f.write_str(h)?;
        }
        f.write_str(&self.prefix)?;
        if self.strip_prefix {
            f.write_str(" (strip)")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// HTTP path answered with 2xx when ready; `None` = ready when the port accepts.
    pub path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failed liveness checks before the instance is replaced.
    pub unhealthy_after: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeployConfig {
    pub strategy: Strategy,
    /// New instances started at once by a rolling deploy.
    pub max_surge: u32,
    /// How long a blue/green deploy keeps the previous generation alive for `rollback`.
    pub rollback_window: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Consecutive failures after which the instance is shown as `crashloop`.
    pub crashloop_after: u32,
    /// Time ready after which the failure count is forgotten.
    pub reset_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IoSettings {
    /// As configured (a device node or a path on the device).
    pub device: PathBuf,
    /// The whole disk's major:minor.
    pub numbers: (u32, u32),
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    pub memory: Option<u64>,
    pub memory_high: Option<u64>,
    pub cpu: Option<f64>,
    pub cpu_weight: Option<u64>,
    pub pids: Option<u64>,
    pub open_files: Option<u64>,
    pub core: u64,
    pub address_space: Option<u64>,
    pub file_size: Option<u64>,
    pub io: Option<IoSettings>,
    /// CPU scheduling policy of the instances (default `batch`).
    pub cpu_scheduling: crate::sandbox::CpuScheduling,
}

impl Resources {
    /// Whether any limit needs a cgroup.
    pub fn needs_cgroup(&self) -> bool {
        self.memory.is_some()
            || self.memory_high.is_some()
            || self.cpu.is_some()
            || self.cpu_weight.is_some()
            || self.pids.is_some()
            || self.io.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum UserSpec {
    /// Keep tqproxy's credentials.
    Inherit,
    /// A user (and group) that exist on the host.
    Named {
        user: String,
        group: String,
        uid: u32,
        gid: u32,
    },
    /// A uid/gid allocated by tqproxy from 61184–65519 (systemd's DynamicUser range), stable
    /// per worker name, with no passwd entry.
    Dynamic { uid: u32, gid: u32 },
}

impl UserSpec {
    pub fn ids(&self) -> Option<(u32, u32)> {
        match self {
            UserSpec::Inherit => None,
            UserSpec::Named { uid, gid, .. } | UserSpec::Dynamic { uid, gid } => Some((*uid, *gid)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SeccompSetting {
    Off,
    Default,
    Profile(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SandboxConfig {
    pub user: UserSpec,
    pub namespaces: Vec<Namespace>,
    pub seccomp: SeccompSetting,
    pub landlock: bool,
    pub read_write: Vec<PathBuf>,
    pub read_only: Vec<PathBuf>,
    pub read_only_root: bool,
    pub private_tmp: bool,
}

impl SandboxConfig {
    pub fn has(&self, ns: Namespace) -> bool {
        self.namespaces.contains(&ns)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BuildConfig {
    pub command: Vec<String>,
    pub watch: Vec<PathBuf>,
    pub timeout: Duration,
}

/// Identity of the worker's program file, so that replacing the binary counts as a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileStamp {
    pub fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }
}

/// One worker's validated configuration. Two revisions are "the same" (a reload leaves the
/// worker untouched) when they compare equal, which includes the program file's identity.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    pub name: String,
    /// The worker's `worker.yaml`, absolute.
    pub file: PathBuf,
    /// The worker's directory.
    pub dir: PathBuf,
    /// Absolute program path.
    pub program: PathBuf,
    pub program_stamp: Option<FileStamp>,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub routes: Vec<RouteSpec>,
    pub instances: u32,
    pub env: BTreeMap<String, String>,
    pub health: HealthConfig,
    pub deploy: DeployConfig,
    pub drain_timeout: Duration,
    pub stop_timeout: Duration,
    pub queue_timeout: Duration,
    pub start_timeout: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_requests: u64,
    pub recycle_memory: Option<u64>,
    pub restart: RestartPolicy,
    pub resources: Resources,
    pub sandbox: SandboxConfig,
    pub build: Option<BuildConfig>,
    /// Pass the listening socket as fd 3 (always on with a network namespace and with
    /// `transport: unix`).
    pub pass_socket: bool,
    /// TCP (default) or a unix socket between the proxy and the instances.
    pub transport: Transport,
}

impl WorkerConfig {
    /// Whether the instance gets its listening socket from tqproxy.
    pub fn passes_socket(&self) -> bool {
        self.pass_socket || self.sandbox.has(Namespace::Net) || self.transport == Transport::Unix
    }

    /// Whether an instance needs a port from the `ports` range.
    pub fn uses_port(&self) -> bool {
        self.transport == Transport::Tcp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1M").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(
            parse_duration("30")
                .unwrap_err()
                .contains("unit is required")
        );
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn routes() {
        assert_eq!(parse_route("/").unwrap(), (None, "/".into()));
        assert_eq!(parse_route("/api/").unwrap(), (None, "/api".into()));
        assert_eq!(
            parse_route("API.example.com/v1").unwrap(),
            (Some("api.example.com".into()), "/v1".into())
        );
        assert_eq!(
            parse_route("example.com").unwrap(),
            (Some("example.com".into()), "/".into())
        );
        assert_eq!(
            parse_route("*.example.com/").unwrap(),
            (Some("*.example.com".into()), "/".into())
        );
        assert!(parse_route("/a/../b").is_err());
        assert!(parse_route("bad host/x").is_err());
        assert!(parse_route("ex_ample.com/").is_err());
        assert!(parse_route("/a?b").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("hello").is_ok());
        assert!(validate_name("api-v2_x").is_ok());
        assert!(validate_name("Hello").is_err());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
    }

    #[test]
    fn locate_lines() {
        let t = "a: 1\nresources:\n  cpu: 2\n  memory: 5\nsandbox:\n  memory: 9\nroutes:\n  - /x\n  - /y\n";
        assert_eq!(locate(t, &["resources", "memory"], None), Some(4));
        assert_eq!(locate(t, &["sandbox", "memory"], None), Some(6));
        assert_eq!(locate(t, &["routes"], Some("/y")), Some(9));
        assert_eq!(locate(t, &["nothing"], None), None);
        let flow = "resources: { memory: 256M, cpu: 1.0 }\n";
        assert_eq!(locate(flow, &["resources", "cpu"], None), Some(1));
    }

    #[test]
    fn a_syntax_error_at_the_end_names_the_last_line() {
        // Found by fuzz/ (worker_yaml, tqproxy_yaml): libyaml puts the end of a text without
        // a final newline on the line after it.
        let file = Path::new("/w/worker.yaml");
        for (text, line, message) in [
            (
                "listen: [\"1\"]\ncontro.admin",
                2,
                "could not find expected ':', while scanning a simple key",
            ),
            (
                "listen: [\"1\"]\ncontro.admin\n",
                3,
                "could not find expected ':'",
            ),
            ("listen: []\r\rb", 3, "could not find expected ':'"),
        ] {
            let e = parse_yaml::<RawGlobal>(file, text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text:?}: {e}");
            assert!(e.message.starts_with(message), "{text:?}: {e}");
            assert!(!e.message.contains("at line"), "{text:?}: {e}");
        }
        let e = parse_yaml::<RawWorker>(file, "# nothing").unwrap_err();
        assert_eq!(e.to_string(), "/w/worker.yaml:1: missing field `command`");
    }

    #[test]
    fn the_cli_finds_the_socket_the_server_binds() {
        // Found by fuzz/ (tqproxy_yaml): `socket: 123` was bound as `conf/123` by the server
        // but looked for at the default path by the CLI.
        let file = Path::new("/etc/tq/conf/tqproxy.yaml");
        for (text, socket) in [
            ("control:\n  socket: 123\n", "/etc/tq/conf/123"),
            (
                "control: { socket: /run/t.sock, admin: off }\n",
                "/run/t.sock",
            ),
            ("proxy: { threads: many }\n", "/etc/tq/run/tqproxy.sock"),
            // Refused by the server; the CLI still reads what it can.
            (
                "control: { socket: a.sock, admin: [x] }\nbad: 1\n",
                "/etc/tq/conf/a.sock",
            ),
            ("control: 5\n", "/etc/tq/run/tqproxy.sock"),
            // Valid for the server (a string), too large for a YAML `Value`: was an error.
            (
                "logs_dir: 0x07777777777777777777777777777777\n",
                "/etc/tq/run/tqproxy.sock",
            ),
        ] {
            assert_eq!(
                Config::control_socket_from_text(file, text),
                Ok(PathBuf::from(socket)),
                "{text:?}"
            );
        }
        assert!(Config::control_socket_from_text(file, "control: [\n").is_err());
    }

    #[test]
    fn a_log_level_that_panicked_tracing_is_refused() {
        // Found by fuzz/ (tqproxy_yaml): EnvFilter::try_new panicked on it.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("workers")).unwrap();
        let conf = d.path().join("conf/tqproxy.yaml");
        for level in [" \u{2004} c:=", " é=info", "info,\u{a0}x=debug"] {
            let text = format!("log: {{ level: \"{level}\" }}\n");
            let e = Config::from_text(&conf, &text).unwrap_err();
            assert!(
                e.to_string().contains("log.level: invalid level"),
                "{level:?}: {e}"
            );
        }
    }

    #[test]
    fn from_text_is_load_without_the_read() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("conf/tqproxy.yaml");
        let wdir = d.path().join("workers/a");
        std::fs::create_dir_all(conf.parent().unwrap()).unwrap();
        std::fs::create_dir_all(&wdir).unwrap();
        let global = "listen: [\"127.0.0.1:18080\"]\ndefaults: { instances: 2 }\n";
        let worker = "command: [\"/bin/true\"]\nroutes: [\"/x/\"]\n";
        std::fs::write(&conf, global).unwrap();
        std::fs::write(wdir.join("worker.yaml"), worker).unwrap();
        let loaded = Config::load(&conf).unwrap();
        let parsed = Config::from_text(&conf, global).unwrap();
        assert_eq!(format!("{loaded:?}"), format!("{parsed:?}"));
        // A worker on its own gets the built-in defaults, not the global file's.
        let w = WorkerConfig::from_text(&wdir, worker).unwrap().unwrap();
        assert_eq!(w.instances, 1);
        assert_eq!(*loaded.workers["a"], WorkerConfig { instances: 2, ..w });
        let e = WorkerConfig::from_text(&wdir, "command: []\n").unwrap_err();
        assert_eq!(e.0[0].file, wdir.join("worker.yaml"));
        assert_eq!(
            Config::control_socket_from_text(&conf, global),
            Ok(d.path().join("run/tqproxy.sock"))
        );
    }

    #[test]
    fn dynamic_uids_are_stable_and_in_range() {
        let a = dynamic_uid("hello");
        assert_eq!(a, dynamic_uid("hello"));
        assert!((61184..=65519).contains(&a));
        assert_ne!(dynamic_uid("hello"), dynamic_uid("probe"));
    }
}
