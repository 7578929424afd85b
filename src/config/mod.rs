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
//! worker file, `locate` the file:line of every error, `check` what only the host can tell
//! (run by `tqproxy check`, reload and deploy on a loaded model).

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

mod acme;
mod check;
mod load;
mod locate;
mod raw;
mod units;
mod worker;

pub use check::{advice, check_worker, check_workers, sandbox_spec, unix_socket_paths_fit};
pub use load::*;
use locate::*;
use raw::*;
pub use units::*;
pub use worker::RESERVED_ENV;
use worker::*;

/// A configuration error: which file, which line (when known), which key, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the error is in, absolute.
    pub file: PathBuf,
    /// 1-based, when the key or value is found in the text.
    pub line: Option<usize>,
    /// The key's path (`resources.memory`, `routes[1]`); empty for the file as a whole.
    pub key: String,
    /// What is wrong, and what would be right.
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
    /// The new generation takes a growing share of requests, step by step, and is rolled back
    /// on its own when its error rate or p99 breaks the limits (`deploy.canary`).
    Canary,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Rolling => "rolling",
            Strategy::Bluegreen => "bluegreen",
            Strategy::Canary => "canary",
        })
    }
}

/// When a starting instance counts as ready (`ready:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ready {
    /// Its health path answers 2xx (without one: its port accepts), polled (the default).
    #[default]
    Health,
    /// It sends `READY=1` on the `NOTIFY_SOCKET` tqproxy gives it (systemd's sd_notify).
    Notify,
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

/// A public listener: an item of `listen` (default: one, `127.0.0.1:8080`, plain).
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// `addr` (or the item itself, `"IP:PORT"`): required.
    pub addr: SocketAddr,
    /// Default [`ListenerKind::Plain`]; `tls` or `redirect_https` make it another.
    pub kind: ListenerKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ListenerKind {
    /// Plain HTTP (HTTP/1.1; HTTP/2 too with `proxy.h2c`).
    Plain,
    /// TLS with certificates chosen by SNI (the first is the default); HTTP/2 via ALPN.
    Tls {
        /// `tls.cert` + `tls.key`, then `tls.certificates`: at least one is required.
        certificates: Vec<crate::tls::CertFiles>,
        /// `tls.h2`: the ALPN offered is `h2, http/1.1` (default true), else `http/1.1` only.
        h2: bool,
        /// `tls.session_cache`: sessions kept for resumption by session id (TLS 1.2) and by
        /// ticket id when tickets are off (default 20000; 0 keeps none).
        session_cache: usize,
        /// `tls.tickets`: stateless session tickets, keys rotated every 6 hours (default true).
        tickets: bool,
        /// `tls.acme`: a certificate obtained and renewed over ACME (see [`crate::acme`]),
        /// served by SNI next to `certificates` (which may then be empty).
        acme: Option<crate::acme::AcmeSettings>,
    },
    /// Answers every request with a redirect to `https://<host>:<port>` (port 443 omitted).
    RedirectHttps {
        /// `redirect_https: PORT`, or 443 for `redirect_https: true`.
        port: u16,
    },
}

/// The whole configuration: the global file plus every enabled worker.
#[derive(Debug, Clone)]
pub struct Config {
    /// The global file (`tqproxy -c`, default `conf/tqproxy.yaml`), absolute. Paths below
    /// resolve against its directory.
    pub file: PathBuf,
    /// Every listener's address (see `listeners` for what each does): `listen`, default
    /// `["127.0.0.1:8080"]`; at least one.
    pub listen: Vec<SocketAddr>,
    /// The listeners of `listen`, in its order.
    pub listeners: Vec<Listener>,
    /// `control.socket`: default `../run/tqproxy.sock`.
    pub control_socket: PathBuf,
    /// `control.admin`: default `127.0.0.1:8090`; loopback only; `off` is `None`.
    pub admin: Option<SocketAddr>,
    /// `control.agent`: HAProxy's agent-check listener (any address); default none.
    pub agent: Option<SocketAddr>,
    /// `control.health`: a listener that serves `GET /healthz` only, for load balancers and
    /// orchestrators on other machines (any address); default none.
    pub health: Option<SocketAddr>,
    /// `workers_dir`: default `../workers`.
    pub workers_dir: PathBuf,
    /// `logs_dir`: default `../logs`.
    pub logs_dir: PathBuf,
    /// `run_dir`: default `../run`.
    pub run_dir: PathBuf,
    /// `ports`, the instance ports: default `9000-9999`.
    pub ports: RangeInclusive<u16>,
    /// `proxy` (each field's default on it).
    pub proxy: ProxySettings,
    /// `log` (each field's default on it).
    pub log: LogSettings,
    /// `cgroups` (each field's default on it).
    pub cgroups: CgroupSettings,
    /// The enabled workers of `workers_dir`, by name (default: none).
    pub workers: BTreeMap<String, Arc<WorkerConfig>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    /// Accept HTTP/2 without TLS (prior knowledge) on plain listeners (default false).
    pub h2c: bool,
    /// Proxy threads, 1-256 (default: available cores).
    pub threads: usize,
    /// Idle upstream connections kept per proxy thread (default 1024: at least the expected
    /// client concurrency, or requests open new upstream connections).
    pub upstream_keepalive_pool: usize,
    /// How long an idle upstream connection is kept (default 30s; keep it below the workers'
    /// own keep-alive timeout so tqproxy closes pooled connections first).
    pub upstream_idle_timeout: Duration,
    /// Attempts per request, first included (default 3; 0 counts as 1).
    pub max_retries: usize,
    /// The whole request head must arrive within this (default 10s), else 408 and close; a TLS
    /// handshake too (then the connection is closed).
    pub client_header_timeout: Duration,
    /// How long an idle client connection is kept between requests (default 60s).
    pub client_keepalive_timeout: Duration,
    /// Longest pause between two reads of a request body or two writes of a response to
    /// the client (default 60s).
    pub client_body_timeout: Duration,
    /// Client connections served at once; beyond it requests get 503 and the connection is
    /// closed (default: no limit).
    pub max_connections: Option<usize>,
    /// HTTP/2 streams open at once per connection, SETTINGS_MAX_CONCURRENT_STREAMS, 1-10000
    /// (default 128).
    pub h2_max_concurrent_streams: u32,
    /// Largest decoded HTTP/2 header list, SETTINGS_MAX_HEADER_LIST_SIZE, 1 KiB-16 MiB
    /// (default 64 KiB).
    pub max_header_list_size: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    /// tqproxy's log filter, tracing-subscriber's syntax (default `info`); `TQPROXY_LOG`
    /// overrides it.
    pub level: String,
    /// tqproxy's log lines (default text).
    pub format: LogFormat,
    /// The access log file (default: none, no access log).
    pub access_log: Option<PathBuf>,
    /// The access log's lines (default combined).
    pub access_format: AccessLogFormat,
    /// Bytes after which `logs/<worker>.log` is rotated (default 64M).
    pub worker_log_max_size: u64,
    /// Rotated worker logs kept (default 5).
    pub worker_log_keep: u32,
    /// Lines per second read from each stream of each instance (default
    /// [`DEFAULT_WORKER_LOG_RATE`]; 0: no limit); beyond it the pipe fills and the worker's
    /// own writes wait.
    pub worker_log_rate: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CgroupSettings {
    /// Which hierarchy to use (default auto: what `root` holds; off: no cgroups, no limits).
    pub mode: CgroupMode,
    /// Where the hierarchy is mounted (default `/sys/fs/cgroup`).
    pub root: PathBuf,
    /// The directory of tqproxy's cgroups under `root` (default `tqproxy`; [`NAME_RULE`]).
    pub base: String,
    /// cgroup v2: build the tree inside tqproxy's own (systemd `Delegate=yes`) unit cgroup,
    /// with tqproxy itself moved to `<unit>/supervisor`, instead of at `<root>/<base>`
    /// (default false).
    pub delegated: bool,
}

/// A route: optional host, path prefix (no trailing slash, `/` for everything), stripping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct RouteSpec {
    /// The host before the first `/`, lowercase, maybe `*.` (default: none, any host).
    pub host: Option<String>,
    /// The path from the first `/` (required; `example.com` alone means `/`).
    pub prefix: String,
    /// The route's `strip_prefix`, else the worker's (default false).
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
    /// HTTP path answered with 2xx when ready (default: none, ready when the port accepts).
    pub path: Option<String>,
    /// Time between two checks (default 1s; at least 10ms).
    pub interval: Duration,
    /// How long a check may take (default 500ms).
    pub timeout: Duration,
    /// Consecutive failed liveness checks before the instance is replaced (default 3).
    pub unhealthy_after: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeployConfig {
    /// How a new revision replaces the running one (default rolling).
    pub strategy: Strategy,
    /// New instances started at once by a rolling deploy (default 1).
    pub max_surge: u32,
    /// How long a blue/green deploy keeps the previous generation alive for `rollback`
    /// (default 60s).
    pub rollback_window: Duration,
    /// The canary's steps and limits (used by `strategy: canary` and `deploy --canary`).
    pub canary: CanaryConfig,
}

/// `deploy.canary`.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryConfig {
    /// The new generation's share of requests at each step, in thousandths, rising, the last
    /// 1000 (default `[5%, 25%, 50%, 100%]`).
    pub steps: Vec<u32>,
    /// How long each step lasts at least (default 30s).
    pub step_interval: Duration,
    /// The largest error rate (5xx and upstream errors, a fraction) the canary may have over a
    /// step, when it is also above the old generation's (default 0.01).
    pub max_error_rate: f64,
    /// The largest p99 the canary may have over a step, when it is also above the old
    /// generation's (default none).
    pub max_p99: Option<Duration>,
    /// Requests the canary must have answered in a step before it is judged (default 100).
    pub min_requests: u64,
}

impl Default for CanaryConfig {
    fn default() -> CanaryConfig {
        CanaryConfig {
            steps: vec![50, 250, 500, 1000],
            step_interval: Duration::from_secs(30),
            max_error_rate: 0.01,
            max_p99: None,
            min_requests: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// Wait before the first restart, doubled after each further failure (default 100ms).
    pub backoff: Duration,
    /// The longest wait (default 30s; not below `backoff`).
    pub backoff_max: Duration,
    /// Consecutive failures after which the instance is shown as `crashloop` (default 5).
    pub crashloop_after: u32,
    /// Time ready after which the failure count is forgotten (default 10s).
    pub reset_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IoSettings {
    /// As configured, a device node or a path on the device (default `.`: the worker's
    /// directory's disk).
    pub device: PathBuf,
    /// The whole disk's major:minor (found from `device`).
    pub numbers: (u32, u32),
    /// Bytes read per second (default: no limit). At least one of the four is required.
    pub read_bps: Option<u64>,
    /// Bytes written per second (default: no limit).
    pub write_bps: Option<u64>,
    /// Read operations per second (default: no limit).
    pub read_iops: Option<u64>,
    /// Write operations per second (default: no limit).
    pub write_iops: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    /// Hard memory limit in bytes, per instance (default: none; at least 1M).
    pub memory: Option<u64>,
    /// Soft memory limit in bytes (default: none; not above `memory`).
    pub memory_high: Option<u64>,
    /// CPU cores, as a CFS quota (default: none; 0.01 to 1024).
    pub cpu: Option<f64>,
    /// CPU weight, 1 to 10000 (default: none, the kernel's 100).
    pub cpu_weight: Option<u64>,
    /// Processes and threads (default: none; at least 1).
    pub pids: Option<u64>,
    /// RLIMIT_NOFILE (default: none, tqproxy's own; 16 to 1048576).
    pub open_files: Option<u64>,
    /// RLIMIT_CORE in bytes (default 0: no core dumps).
    pub core: u64,
    /// RLIMIT_AS in bytes (default: none).
    pub address_space: Option<u64>,
    /// RLIMIT_FSIZE in bytes (default: none).
    pub file_size: Option<u64>,
    /// Block I/O limits (default: none).
    pub io: Option<IoSettings>,
    /// CPU scheduling policy of the instances (default `batch`).
    pub cpu_scheduling: crate::sandbox::CpuScheduling,
    /// Bytes per second of body traffic through tqproxy, shared by the worker's instances
    /// (default: none).
    pub bandwidth: Bandwidth,
}

/// `resources.bandwidth`: enforced by the proxy on body bytes, one token bucket per worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bandwidth {
    /// To the worker: request bodies and WebSocket/upgrade bytes from clients (default: none).
    pub ingress: Option<u64>,
    /// From the worker: response bodies and upgrade bytes to clients (default: none).
    pub egress: Option<u64>,
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
        /// `sandbox.user`.
        user: String,
        /// `sandbox.group`, else the user's own group.
        group: String,
        /// The user's uid.
        uid: u32,
        /// The group's gid.
        gid: u32,
    },
    /// A uid/gid allocated by tqproxy from 61184–65519 (systemd's DynamicUser range), stable
    /// per worker name, with no passwd entry.
    Dynamic {
        /// See [`dynamic_uid`].
        uid: u32,
        /// The same number as `uid`.
        gid: u32,
    },
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
    /// `user` (+ `group`) or `dynamic_user` (default: inherit tqproxy's).
    pub user: UserSpec,
    /// Namespaces to unshare, each once (default: none).
    pub namespaces: Vec<Namespace>,
    /// The syscall filter (default off).
    pub seccomp: SeccompSetting,
    /// Landlock filesystem rules (default false).
    pub landlock: bool,
    /// Writable paths, created for the worker's user (default: none; not `/`).
    pub read_write: Vec<PathBuf>,
    /// Paths made read-only, which must exist (default: none).
    pub read_only: Vec<PathBuf>,
    /// Mount the root read-only (default: true with a mount or pid namespace, else false).
    pub read_only_root: bool,
    /// A private /tmp (default: true with a mount or pid namespace, else false; false when
    /// the worker's own files live under /tmp).
    pub private_tmp: bool,
}

impl SandboxConfig {
    pub fn has(&self, ns: Namespace) -> bool {
        self.namespaces.contains(&ns)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BuildConfig {
    /// The build command, run in the worker's directory (required, not empty).
    pub command: Vec<String>,
    /// Paths whose changes start a build (default: none).
    pub watch: Vec<PathBuf>,
    /// How long a build may take (default 5m).
    pub timeout: Duration,
}

/// Identity of the worker's program file, so that replacing the binary counts as a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// The device of the file system.
    pub dev: u64,
    /// The inode.
    pub ino: u64,
    /// The size in bytes.
    pub size: u64,
    /// The modification time, in nanoseconds since the epoch.
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
    /// The name of the worker's directory ([`NAME_RULE`]).
    pub name: String,
    /// The worker's `worker.yaml`, absolute.
    pub file: PathBuf,
    /// The worker's directory.
    pub dir: PathBuf,
    /// `command[0]`, required: absolute, relative to the worker's directory, or looked up
    /// in `PATH`; executable.
    pub program: PathBuf,
    /// The program file's identity when loaded (`None` if it could not be read).
    pub program_stamp: Option<FileStamp>,
    /// The rest of `command` (default: none).
    pub args: Vec<String>,
    /// The working directory (default: the worker's directory).
    pub cwd: PathBuf,
    /// The routes served (default: none).
    pub routes: Vec<RouteSpec>,
    /// Instances kept running (default: the global `defaults.instances`, 1; at most 256).
    pub instances: u32,
    /// The instances' environment besides what tqproxy sets ([`RESERVED_ENV`]): `env`, over
    /// a default `PATH`.
    pub env: BTreeMap<String, String>,
    /// `health` (each field's default on it).
    pub health: HealthConfig,
    /// `ready`: the health poll (default) or `notify` (`READY=1` on `NOTIFY_SOCKET`).
    pub ready: Ready,
    /// `watchdog` (needs `ready: notify`; default none): an instance that sends no
    /// `WATCHDOG=1` for this long once ready is replaced. At least 10ms, at most 1h.
    pub watchdog: Option<Duration>,
    /// `deploy` (each field's default on it).
    pub deploy: DeployConfig,
    /// In-flight requests get this long before an instance is stopped (default: the global
    /// `defaults.drain_timeout`, 30s).
    pub drain_timeout: Duration,
    /// SIGTERM → SIGKILL (default: `defaults.stop_timeout`, 10s).
    pub stop_timeout: Duration,
    /// A request waits this long for a ready instance, then 503 (default:
    /// `defaults.queue_timeout`, 5s).
    pub queue_timeout: Duration,
    /// A new instance must be ready within this (default: `defaults.start_timeout`, 30s).
    pub start_timeout: Duration,
    /// Longest wait to connect to an instance (default: `defaults.connect_timeout`, 2s).
    pub connect_timeout: Duration,
    /// Longest wait on each read from (and write to) an instance's connection (default:
    /// `defaults.read_timeout`, 60s).
    pub read_timeout: Duration,
    /// Requests after which an instance is recycled (default 0: never).
    pub max_requests: u64,
    /// The largest request body the worker gets (nginx's `client_max_body_size`): a larger
    /// declared one is answered 413 before anything is sent to the worker, a chunked (or
    /// HTTP/2) one that grows past it is cut there, 413 if no response had begun (default:
    /// `defaults.max_body_size`, none; `0`: none).
    pub max_body_size: Option<u64>,
    /// Memory above which an instance is recycled gracefully (default: none; below
    /// `resources.memory`).
    pub recycle_memory: Option<u64>,
    /// `restart` (each field's default on it).
    pub restart: RestartPolicy,
    /// `resources` (each field's default on it; default: no limits).
    pub resources: Resources,
    /// `sandbox` (each field's default on it; default: no isolation).
    pub sandbox: SandboxConfig,
    /// `build`, for `run --watch` (default: none).
    pub build: Option<BuildConfig>,
    /// Pass the listening socket as fd 3 (default false; always on with a network namespace
    /// and with `transport: unix`).
    pub pass_socket: bool,
    /// TCP (default) or a unix socket between the proxy and the instances.
    pub transport: Transport,
    /// A fixed port instead of one from the `ports` range (default: none): for a service
    /// other workers connect to (e.g. Redis), which every other worker finds in
    /// `TQ_SERVICE_<NAME>=127.0.0.1:<port>`. One instance, TCP, rolling, outside `ports`.
    pub port: Option<u16>,
}

impl WorkerConfig {
    /// Whether the instance gets its listening socket from tqproxy.
    pub fn passes_socket(&self) -> bool {
        self.pass_socket || self.sandbox.has(Namespace::Net) || self.transport == Transport::Unix
    }

    /// Whether an instance needs a port from the `ports` range.
    pub fn uses_port(&self) -> bool {
        self.transport == Transport::Tcp && self.port.is_none()
    }

    /// `TQ_SERVICE_<NAME>` (the name upper-cased, `-` as `_`) and `127.0.0.1:<port>`: how the
    /// other workers find a worker with a fixed `port`; `None` without one.
    pub fn service_env(&self) -> Option<(String, String)> {
        let port = self.port?;
        let name: String = self
            .name
            .chars()
            .map(|c| match c {
                '-' | '.' => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect();
        Some((format!("TQ_SERVICE_{name}"), format!("127.0.0.1:{port}")))
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
        assert!(validate_name("0x").is_ok());
        assert!(validate_name(&"a".repeat(48)).is_ok());
        assert!(validate_name(&"a".repeat(49)).is_err());
        assert!(validate_name("Hello").is_err());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("a.b").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("_x").is_err());
        assert_eq!(
            validate_name("Bad_Name"),
            Err(format!("invalid worker name `Bad_Name`: {NAME_RULE}"))
        );
    }

    #[test]
    fn every_name_the_rule_accepts_passes_the_sandbox_check() {
        // The sandbox checks each cgroup directory it creates (`<base>`, `<worker>.<id>.<n>`)
        // with its own, wider rule: no name the config accepts may fail there.
        use crate::sandbox::cgroup::validate_name as sandbox_ok;
        let mut names: Vec<String> = (0..=255u8)
            .map(|b| (b as char).to_string())
            .chain(["a-", "a_", "9-_z", "tqproxy-it"].map(String::from))
            .chain([
                "z".repeat(48),
                format!("a{}", "-".repeat(47)),
                format!("0{}", "_".repeat(47)),
            ])
            .collect();
        names.retain(|n| is_valid_name(n));
        assert_eq!(names.iter().filter(|n| n.len() == 1).count(), 36);
        for n in &names {
            assert!(sandbox_ok(n).is_ok(), "{n:?}");
            let instance = format!("{n}.999999.999999");
            assert!(sandbox_ok(&instance).is_ok(), "{instance:?}");
        }
    }

    #[test]
    fn an_invalid_cgroup_base_names_the_rule() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("workers")).unwrap();
        let conf = d.path().join("conf/tqproxy.yaml");
        for base in ["Tq", "a/b", "x.y", ""] {
            let text = format!("cgroups:\n  base: \"{base}\"\n");
            let e = Config::from_text(&conf, &text).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "{}:2: cgroups.base: invalid cgroup name `{base}`: {NAME_RULE}",
                    conf.display()
                )
            );
        }
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        // The doc comments of the model name these; a change here is a change there (and in
        // the README's configuration section).
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("conf/tqproxy.yaml");
        let wdir = d.path().join("workers/w");
        std::fs::create_dir_all(&wdir).unwrap();
        std::fs::write(wdir.join("worker.yaml"), "command: [\"/bin/true\"]\n").unwrap();
        let c = Config::from_text(&conf, "").unwrap();
        let root = d.path();
        assert_eq!(c.listen, [SocketAddr::from(([127, 0, 0, 1], 8080))]);
        assert_eq!(
            c.listeners,
            [Listener {
                addr: c.listen[0],
                kind: ListenerKind::Plain
            }]
        );
        assert_eq!(c.control_socket, root.join("run/tqproxy.sock"));
        assert_eq!(c.admin, Some(SocketAddr::from(([127, 0, 0, 1], 8090))));
        assert_eq!(c.workers_dir, root.join("workers"));
        assert_eq!(c.logs_dir, root.join("logs"));
        assert_eq!(c.run_dir, root.join("run"));
        assert_eq!(c.ports, 9000..=9999);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            c.proxy,
            ProxySettings {
                h2c: false,
                threads: cores.clamp(1, 256),
                upstream_keepalive_pool: 1024,
                upstream_idle_timeout: Duration::from_secs(30),
                max_retries: 3,
                client_header_timeout: Duration::from_secs(10),
                client_keepalive_timeout: Duration::from_secs(60),
                client_body_timeout: Duration::from_secs(60),
                max_connections: None,
                h2_max_concurrent_streams: 128,
                max_header_list_size: 64 << 10,
            }
        );
        assert_eq!(
            c.log,
            LogSettings {
                level: "info".into(),
                format: LogFormat::Text,
                access_log: None,
                access_format: AccessLogFormat::Combined,
                worker_log_max_size: 64 << 20,
                worker_log_keep: 5,
                worker_log_rate: 10_000,
            }
        );
        assert_eq!(
            c.cgroups,
            CgroupSettings {
                mode: CgroupMode::Auto,
                root: "/sys/fs/cgroup".into(),
                base: "tqproxy".into(),
                delegated: false,
            }
        );
        let w = &*c.workers["w"];
        let expected = WorkerConfig {
            name: "w".into(),
            file: wdir.join("worker.yaml"),
            dir: wdir.clone(),
            program: "/bin/true".into(),
            program_stamp: FileStamp::of(Path::new("/bin/true")),
            args: vec![],
            cwd: wdir.clone(),
            routes: vec![],
            instances: 1,
            env: BTreeMap::from([("PATH".to_string(), DEFAULT_PATH_ENV.to_string())]),
            health: HealthConfig {
                path: None,
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                unhealthy_after: 3,
            },
            ready: Ready::Health,
            watchdog: None,
            deploy: DeployConfig {
                strategy: Strategy::Rolling,
                max_surge: 1,
                rollback_window: Duration::from_secs(60),
                canary: CanaryConfig::default(),
            },
            drain_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            queue_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(60),
            max_requests: 0,
            max_body_size: None,
            recycle_memory: None,
            restart: RestartPolicy {
                backoff: Duration::from_millis(100),
                backoff_max: Duration::from_secs(30),
                crashloop_after: 5,
                reset_after: Duration::from_secs(10),
            },
            resources: Resources {
                core: 0,
                cpu_scheduling: crate::sandbox::CpuScheduling::Batch,
                bandwidth: Bandwidth::default(),
                ..Resources::default()
            },
            sandbox: SandboxConfig {
                user: UserSpec::Inherit,
                namespaces: vec![],
                seccomp: SeccompSetting::Off,
                landlock: false,
                read_write: vec![],
                read_only: vec![],
                read_only_root: false,
                private_tmp: false,
            },
            build: None,
            pass_socket: false,
            transport: Transport::Tcp,
            port: None,
        };
        assert_eq!(*w, expected);
        // With a mount namespace, a read-only root and a private /tmp (the worker lives
        // under /tmp here: its private /tmp is off, see `private_tmp`).
        let text = "command: [\"/bin/true\"]\nsandbox: { namespaces: [mount] }\nbuild: { command: [make] }\n";
        let w = WorkerConfig::from_text(&wdir, text).unwrap().unwrap();
        assert!(w.sandbox.read_only_root);
        assert_eq!(w.sandbox.private_tmp, !wdir.starts_with("/tmp"));
        let b = w.build.unwrap();
        assert_eq!((b.watch, b.timeout), (vec![], Duration::from_secs(300)));
        let text = "command: [\"/bin/true\"]\nresources: { io: { read_iops: 1 } }\n";
        if let Ok(Some(w)) = WorkerConfig::from_text(&wdir, text) {
            // (Only where the temp dir is on a block device.)
            assert_eq!(w.resources.io.unwrap().device, wdir);
        }
    }

    #[test]
    fn canary_settings_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let wdir = dir.path().join("w");
        let text = "command: [\"/bin/true\"]\ndeploy:\n  strategy: canary\n  canary: { steps: [1%, 0.1, 50%, 100%], step_interval: 10s, max_error_rate: 0.05, max_p99: 300ms, min_requests: 7 }\n";
        let w = WorkerConfig::from_text(&wdir, text).unwrap().unwrap();
        assert_eq!(w.deploy.strategy, Strategy::Canary);
        assert_eq!(
            w.deploy.canary,
            CanaryConfig {
                steps: vec![10, 100, 500, 1000],
                step_interval: Duration::from_secs(10),
                max_error_rate: 0.05,
                max_p99: Some(Duration::from_millis(300)),
                min_requests: 7,
            }
        );
        for (canary, says) in [
            ("{ steps: [50%, 25%, 100%] }", "shares must rise"),
            ("{ steps: [5%, 50%] }", "the last step must be 100%"),
            ("{ steps: [0%, 100%] }", "not a share above 0.1%"),
            ("{ steps: [lots, 100%] }", "`lots` is not a share"),
            ("{ steps: [] }", "at least one share"),
            ("{ max_error_rate: 2 }", "not a fraction between 0 and 1"),
            ("{ step_interval: 0s }", "must be more than 0"),
            ("{ stepz: [100%] }", "unknown field `stepz`"),
        ] {
            let text = format!("command: [\"/bin/true\"]\ndeploy:\n  canary: {canary}\n");
            let e = WorkerConfig::from_text(&wdir, &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{canary}: {e}");
            assert!(e.contains("worker.yaml:"), "{canary}: {e}");
        }
    }

    #[test]
    fn bandwidth_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let wdir = dir.path().join("w");
        let text =
            "command: [\"/bin/true\"]\nresources: { bandwidth: { ingress: 1M, egress: 10M } }\n";
        let w = WorkerConfig::from_text(&wdir, text).unwrap().unwrap();
        assert_eq!(
            w.resources.bandwidth,
            Bandwidth {
                ingress: Some(1 << 20),
                egress: Some(10 << 20)
            }
        );
        assert!(
            !w.resources.needs_cgroup(),
            "enforced by the proxy, not a cgroup"
        );
        let text = "command: [\"/bin/true\"]\nresources:\n  bandwidth: { egress: 100 }\n";
        let e = WorkerConfig::from_text(&wdir, text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("worker.yaml:3: resources.bandwidth.egress: must be at least 1K"),
            "{e}"
        );
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
