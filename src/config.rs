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
// Human units
// ---------------------------------------------------------------------------------------------

/// A duration written for humans: `500ms`, `30s`, `2m`, `1h 30m` (humantime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(de::Error::custom)
    }
}

/// Parses `500ms`, `30s`, `1m 30s`. A bare number is rejected: the unit must be explicit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "invalid duration `{s}`: a unit is required (e.g. 500ms, 30s, 2m)"
        ));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration `{s}`: {e} (expected e.g. 500ms, 30s, 2m)"))
}

/// A size written for humans. `K`, `M`, `G`, `T` (and `KiB`…`TiB`) are powers of 1024, as in
/// systemd and Docker; `KB`, `MB`, `GB`, `TB` are powers of 1000; a bare number is bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        parse_size(&s).map(HumanSize).map_err(de::Error::custom)
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid size `{s}` (expected e.g. 512M, 1G, 64KiB, 4096)");
    if num.is_empty() {
        return Err(bad());
    }
    let value: f64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "Ki" => 1 << 10,
        "M" | "m" | "MiB" | "Mi" => 1 << 20,
        "G" | "g" | "GiB" | "Gi" => 1 << 30,
        "T" | "t" | "TiB" | "Ti" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// A size in the units the configuration uses (`512M`, `1G`, `1536K`, `1000`).
pub fn fmt_size(n: u64) -> String {
    for (unit, m) in [
        ("T", 1u64 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ] {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    n.to_string()
}

/// Accepts a YAML string or number and returns it as text (so `port: 8080` and sizes like
/// `4096` both work).
fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        U(u64),
        F(f64),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s,
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Raw YAML: the global file
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    #[serde(default = "default_listen_items")]
    listen: Vec<RawListenItem>,
    #[serde(default)]
    control: RawControl,
    #[serde(default = "default_workers_dir")]
    workers_dir: String,
    #[serde(default = "default_logs_dir")]
    logs_dir: String,
    #[serde(default = "default_run_dir")]
    run_dir: String,
    #[serde(default = "default_ports")]
    ports: String,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    cgroups: RawCgroups,
}

fn default_listen() -> Vec<RawListen> {
    vec![RawListen {
        addr: "127.0.0.1:8080".into(),
        tls: None,
        redirect_https: None,
    }]
}

fn default_listen_items() -> Vec<RawListenItem> {
    default_listen().into_iter().map(RawListenItem).collect()
}

/// A listener: `"IP:PORT"` or `{ addr, tls: {…}, redirect_https: true|PORT }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    addr: String,
    tls: Option<RawTls>,
    redirect_https: Option<RawRedirect>,
}

impl RawListen {
    fn deserialize_any<'de, D: Deserializer<'de>>(d: D) -> Result<RawListen, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawListen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address like \"127.0.0.1:8080\" or a map with `addr`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawListen, E> {
                Ok(RawListen {
                    addr: v.to_string(),
                    tls: None,
                    redirect_https: None,
                })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawListen, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Full {
                    addr: String,
                    tls: Option<RawTls>,
                    redirect_https: Option<RawRedirect>,
                }
                let f = Full::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawListen {
                    addr: f.addr,
                    tls: f.tls,
                    redirect_https: f.redirect_https,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawListenItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawListen::deserialize_any(d).map(RawListenItem)
    }
}

/// Wrapper so `listen` entries accept both forms.
#[derive(Debug)]
struct RawListenItem(RawListen);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    #[serde(default)]
    certificates: Vec<RawCert>,
    h2: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    cert: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawRedirect {
    On(bool),
    Port(u16),
}
fn default_workers_dir() -> String {
    "../workers".into()
}
fn default_logs_dir() -> String {
    "../logs".into()
}
fn default_run_dir() -> String {
    "../run".into()
}
fn default_ports() -> String {
    "9000-9999".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<String>,
    admin: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    instances: Option<u32>,
    drain_timeout: Option<HumanDuration>,
    stop_timeout: Option<HumanDuration>,
    queue_timeout: Option<HumanDuration>,
    start_timeout: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    read_timeout: Option<HumanDuration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    #[serde(default)]
    h2c: bool,
    threads: Option<usize>,
    upstream_keepalive_pool: Option<usize>,
    upstream_idle_timeout: Option<HumanDuration>,
    max_retries: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
    access_log: Option<String>,
    access_format: Option<AccessLogFormat>,
    worker_log_max_size: Option<HumanSize>,
    worker_log_keep: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCgroups {
    mode: Option<CgroupMode>,
    root: Option<String>,
    base: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Raw YAML: a worker file
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    #[serde(default = "yes")]
    enabled: bool,
    command: Vec<String>,
    cwd: Option<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    strip_prefix: bool,
    instances: Option<u32>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    deploy: RawDeploy,
    drain_timeout: Option<HumanDuration>,
    stop_timeout: Option<HumanDuration>,
    queue_timeout: Option<HumanDuration>,
    start_timeout: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    read_timeout: Option<HumanDuration>,
    #[serde(default)]
    max_requests: u64,
    recycle_memory: Option<HumanSize>,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    resources: RawResources,
    #[serde(default)]
    sandbox: RawSandbox,
    build: Option<RawBuild>,
    #[serde(default)]
    pass_socket: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawRoute {
    Short(String),
    Full(RawRouteFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteFull {
    route: String,
    strip_prefix: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<String>,
    interval: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    unhealthy_after: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    strategy: Option<Strategy>,
    max_surge: Option<u32>,
    rollback_window: Option<HumanDuration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    backoff: Option<HumanDuration>,
    backoff_max: Option<HumanDuration>,
    crashloop_after: Option<u32>,
    reset_after: Option<HumanDuration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    memory: Option<HumanSize>,
    memory_high: Option<HumanSize>,
    cpu: Option<f64>,
    cpu_weight: Option<u64>,
    pids: Option<u64>,
    open_files: Option<u64>,
    core: Option<HumanSize>,
    address_space: Option<HumanSize>,
    file_size: Option<HumanSize>,
    io: Option<RawIo>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIo {
    device: Option<String>,
    read_bps: Option<HumanSize>,
    write_bps: Option<HumanSize>,
    read_iops: Option<u64>,
    write_iops: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    user: Option<String>,
    group: Option<String>,
    #[serde(default)]
    dynamic_user: bool,
    #[serde(default)]
    namespaces: Vec<Namespace>,
    seccomp: Option<String>,
    #[serde(default)]
    landlock: bool,
    #[serde(default)]
    read_write: Vec<String>,
    #[serde(default)]
    read_only: Vec<String>,
    read_only_root: Option<bool>,
    private_tmp: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    command: Vec<String>,
    #[serde(default)]
    watch: Vec<String>,
    timeout: Option<HumanDuration>,
}

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
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
    pub access_log: Option<PathBuf>,
    pub access_format: AccessLogFormat,
    pub worker_log_max_size: u64,
    pub worker_log_keep: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CgroupSettings {
    pub mode: CgroupMode,
    pub root: PathBuf,
    pub base: String,
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
    /// Pass the listening socket as fd 3 (always on with a network namespace).
    pub pass_socket: bool,
}

impl WorkerConfig {
    /// Whether the instance gets its listening socket from tqproxy.
    pub fn passes_socket(&self) -> bool {
        self.pass_socket || self.sandbox.has(Namespace::Net)
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

const DEFAULT_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Worker names become cgroup directories and log file names: keep them boring.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid worker name `{name}`: use 1-48 characters a-z, 0-9, '-', '_', starting with a letter or digit"
        ))
    }
}

impl Config {
    /// Loads and validates the global file and every worker. Collects all errors.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = absolute(path);
        let text = std::fs::read_to_string(&file).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                line: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let mut errors = Vec::new();
        let raw: RawGlobal = match parse_yaml(&file, &text) {
            Ok(r) => r,
            Err(e) => return Err(ConfigErrors(vec![e])),
        };
        let dir = file.parent().unwrap_or(Path::new("/")).to_path_buf();
        let ctx = Ctx {
            file: &file,
            text: &text,
        };

        let mut listen = Vec::new();
        let mut listeners = Vec::new();
        for (i, item) in raw.listen.iter().enumerate() {
            let l = &item.0;
            let key = format!("listen[{i}]");
            let addr = match l.addr.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    errors.push(ctx.err(
                        &["listen"],
                        Some(&l.addr),
                        key,
                        format!("invalid address `{}` (expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080)", l.addr),
                    ));
                    continue;
                }
            };
            if listen.contains(&addr) {
                errors.push(ctx.err(
                    &["listen"],
                    Some(&l.addr),
                    key.clone(),
                    format!("`{}` is listed twice", l.addr),
                ));
            }
            listen.push(addr);
            let kind = match (&l.tls, &l.redirect_https) {
                (Some(_), Some(_)) => {
                    errors.push(ctx.err(
                        &["listen"],
                        Some(&l.addr),
                        key,
                        "a listener is either `tls` or `redirect_https`, not both".into(),
                    ));
                    continue;
                }
                (None, None) => ListenerKind::Plain,
                (None, Some(RawRedirect::On(false))) => ListenerKind::Plain,
                (None, Some(RawRedirect::On(true))) => ListenerKind::RedirectHttps { port: 443 },
                (None, Some(RawRedirect::Port(p))) => ListenerKind::RedirectHttps { port: *p },
                (Some(t), None) => {
                    let mut certificates: Vec<crate::tls::CertFiles> = t
                        .certificates
                        .iter()
                        .map(|c| crate::tls::CertFiles {
                            cert: resolve(&dir, &c.cert),
                            key: resolve(&dir, &c.key),
                        })
                        .collect();
                    match (&t.cert, &t.key) {
                        (Some(c), Some(k)) => certificates.insert(
                            0,
                            crate::tls::CertFiles {
                                cert: resolve(&dir, c),
                                key: resolve(&dir, k),
                            },
                        ),
                        (None, None) => {}
                        _ => errors.push(ctx.err(
                            &["listen", "tls"],
                            None,
                            format!("{key}.tls"),
                            "`cert` and `key` go together".into(),
                        )),
                    }
                    if certificates.is_empty() {
                        errors.push(ctx.err(
                            &["listen", "tls"],
                            None,
                            format!("{key}.tls"),
                            "needs `cert` and `key` (or `certificates: [{cert, key}, …]`)".into(),
                        ));
                    } else if let Err(e) = crate::tls::CertStore::load(&certificates) {
                        errors.push(ctx.err(&["listen", "tls"], None, format!("{key}.tls"), e));
                    }
                    ListenerKind::Tls {
                        certificates,
                        h2: t.h2.unwrap_or(true),
                    }
                }
            };
            listeners.push(Listener { addr, kind });
        }
        if raw.listen.is_empty() {
            errors.push(ctx.err(
                &["listen"],
                None,
                "listen",
                "at least one address is required".into(),
            ));
        }

        let control_socket = resolve(
            &dir,
            raw.control
                .socket
                .as_deref()
                .unwrap_or("../run/tqproxy.sock"),
        );
        // The admin listener is on by default (loopback); `admin: off` disables it.
        let admin = match raw.control.admin.as_deref() {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 8090))),
            Some("off") => None,
            Some(a) => match a.parse::<SocketAddr>() {
                Ok(addr) if addr.ip().is_loopback() => Some(addr),
                Ok(_) => {
                    errors.push(ctx.err(
                        &["control", "admin"],
                        None,
                        "control.admin",
                        format!("`{a}` is not a loopback address; the admin listener serves /metrics and /status and must stay on 127.0.0.0/8 or ::1"),
                    ));
                    None
                }
                Err(_) => {
                    errors.push(ctx.err(
                        &["control", "admin"],
                        None,
                        "control.admin",
                        format!("invalid address `{a}` (expected e.g. 127.0.0.1:8090)"),
                    ));
                    None
                }
            },
        };

        let ports = match parse_port_range(&raw.ports) {
            Ok(r) => r,
            Err(m) => {
                errors.push(ctx.err(&["ports"], None, "ports", m));
                9000..=9999
            }
        };
        for a in &listen {
            if ports.contains(&a.port()) {
                errors.push(ctx.err(
                    &["listen"],
                    None,
                    "listen",
                    format!(
                        "{a} is inside the worker port range {}-{}",
                        ports.start(),
                        ports.end()
                    ),
                ));
            }
        }

        let d = &raw.defaults;
        let defaults = Defaults {
            instances: d.instances.unwrap_or(1),
            drain_timeout: d.drain_timeout.map_or(Duration::from_secs(30), |x| x.0),
            stop_timeout: d.stop_timeout.map_or(Duration::from_secs(10), |x| x.0),
            queue_timeout: d.queue_timeout.map_or(Duration::from_secs(5), |x| x.0),
            start_timeout: d.start_timeout.map_or(Duration::from_secs(30), |x| x.0),
            connect_timeout: d.connect_timeout.map_or(Duration::from_secs(2), |x| x.0),
            read_timeout: d.read_timeout.map_or(Duration::from_secs(60), |x| x.0),
        };
        if defaults.instances == 0 {
            errors.push(ctx.err(
                &["defaults", "instances"],
                None,
                "defaults.instances",
                "must be at least 1".into(),
            ));
        }

        let threads = raw
            .proxy
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 || threads > 256 {
            errors.push(ctx.err(
                &["proxy", "threads"],
                None,
                "proxy.threads",
                "must be between 1 and 256".into(),
            ));
        }
        let proxy = ProxySettings {
            h2c: raw.proxy.h2c,
            threads: threads.clamp(1, 256),
            upstream_keepalive_pool: raw.proxy.upstream_keepalive_pool.unwrap_or(1024),
            upstream_idle_timeout: raw
                .proxy
                .upstream_idle_timeout
                .map_or(Duration::from_secs(30), |x| x.0),
            max_retries: raw.proxy.max_retries.unwrap_or(3).max(1),
        };

        let level = raw.log.level.clone().unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            errors.push(ctx.err(
                &["log", "level"],
                None,
                "log.level",
                format!("invalid level `{level}` (e.g. info, debug, tqproxy=debug,pingora=warn)"),
            ));
        }
        let log = LogSettings {
            level,
            format: raw.log.format.unwrap_or(LogFormat::Text),
            access_log: raw.log.access_log.as_deref().map(|p| resolve(&dir, p)),
            access_format: raw.log.access_format.unwrap_or(AccessLogFormat::Combined),
            worker_log_max_size: raw.log.worker_log_max_size.map_or(64 << 20, |s| s.0),
            worker_log_keep: raw.log.worker_log_keep.unwrap_or(5),
        };
        let cgroups = CgroupSettings {
            mode: raw.cgroups.mode.unwrap_or(CgroupMode::Auto),
            root: PathBuf::from(raw.cgroups.root.as_deref().unwrap_or("/sys/fs/cgroup")),
            base: raw.cgroups.base.clone().unwrap_or_else(|| "tqproxy".into()),
        };
        if validate_name(&cgroups.base).is_err() {
            errors.push(ctx.err(
                &["cgroups", "base"],
                None,
                "cgroups.base",
                format!("invalid cgroup name `{}`", cgroups.base),
            ));
        }

        let workers_dir = resolve(&dir, &raw.workers_dir);
        let mut workers = BTreeMap::new();
        match std::fs::read_dir(&workers_dir) {
            Err(e) => errors.push(ctx.err(
                &["workers_dir"],
                None,
                "workers_dir",
                format!("cannot read {}: {e}", workers_dir.display()),
            )),
            Ok(entries) => {
                let mut dirs: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.join("worker.yaml").is_file())
                    .collect();
                dirs.sort();
                for wdir in dirs {
                    match load_worker(&wdir, &defaults) {
                        Ok(Some(w)) => {
                            workers.insert(w.name.clone(), Arc::new(w));
                        }
                        Ok(None) => {}
                        Err(mut es) => errors.append(&mut es),
                    }
                }
            }
        }

        // Cross-worker checks: a route served by two workers, the port pool size.
        let mut seen: HashMap<(Option<String>, String), String> = HashMap::new();
        for w in workers.values() {
            let wtext = std::fs::read_to_string(&w.file).unwrap_or_default();
            let wctx = Ctx {
                file: &w.file,
                text: &wtext,
            };
            for r in &w.routes {
                let key = (r.host.clone(), r.prefix.clone());
                if let Some(other) = seen.get(&key) {
                    errors.push(wctx.err(
                        &["routes"],
                        Some(&format!("{}{}", r.host.as_deref().unwrap_or(""), r.prefix)),
                        "routes",
                        format!(
                            "route `{}{}` is already served by worker `{other}`",
                            r.host.as_deref().unwrap_or(""),
                            r.prefix
                        ),
                    ));
                } else {
                    seen.insert(key, w.name.clone());
                }
            }
        }
        let needed: u64 = workers
            .values()
            .map(|w| w.instances as u64 * 2 + w.deploy.max_surge as u64)
            .sum();
        let pool = (*ports.end() as u64) - (*ports.start() as u64) + 1;
        if needed > pool {
            errors.push(ctx.err(
                &["ports"],
                None,
                "ports",
                format!("range {}-{} has {pool} ports but the workers may need {needed} during a deploy (2 × instances + max_surge each)", ports.start(), ports.end()),
            ));
        }

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            file,
            listen,
            listeners,
            control_socket,
            admin,
            workers_dir,
            logs_dir: resolve(&dir, &raw.logs_dir),
            run_dir: resolve(&dir, &raw.run_dir),
            ports,
            proxy,
            log,
            cgroups,
            workers,
        })
    }

    /// Reads just `control.socket` from the global file, tolerating every other error, so the
    /// client verbs (`status`, `stop`, …) work even while the file is being edited.
    pub fn control_socket_of(path: &Path) -> Result<PathBuf, String> {
        let file = absolute(path);
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
        let value: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let dir = file.parent().unwrap_or(Path::new("/"));
        let socket = value
            .get("control")
            .and_then(|c| c.get("socket"))
            .and_then(|s| s.as_str())
            .unwrap_or("../run/tqproxy.sock");
        Ok(resolve(dir, socket))
    }
}

struct Defaults {
    instances: u32,
    drain_timeout: Duration,
    stop_timeout: Duration,
    queue_timeout: Duration,
    start_timeout: Duration,
    connect_timeout: Duration,
    read_timeout: Duration,
}

fn load_worker(dir: &Path, defaults: &Defaults) -> Result<Option<WorkerConfig>, Vec<ConfigError>> {
    let file = dir.join("worker.yaml");
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = std::fs::read_to_string(&file).map_err(|e| {
        vec![ConfigError {
            file: file.clone(),
            line: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }]
    })?;
    let raw: RawWorker = parse_yaml(&file, &text).map_err(|e| vec![e])?;
    if !raw.enabled {
        return Ok(None);
    }
    let ctx = Ctx {
        file: &file,
        text: &text,
    };
    let mut errors = Vec::new();
    if let Err(m) = validate_name(&name) {
        errors.push(ctx.err(&[], None, "", format!("directory name: {m}")));
    }

    // command
    let (program, args) = match raw.command.split_first() {
        None => {
            errors.push(ctx.err(
                &["command"],
                None,
                "command",
                "must name a program (e.g. [\"bin/hello\"])".into(),
            ));
            (PathBuf::new(), Vec::new())
        }
        Some((prog, args)) => match resolve_program(dir, prog) {
            Ok(p) => (p, args.to_vec()),
            Err(m) => {
                errors.push(ctx.err(&["command"], None, "command", m));
                (PathBuf::new(), Vec::new())
            }
        },
    };
    let cwd = resolve(dir, raw.cwd.as_deref().unwrap_or("."));
    if raw.cwd.is_some() && !cwd.is_dir() {
        errors.push(ctx.err(
            &["cwd"],
            None,
            "cwd",
            format!("{} is not a directory", cwd.display()),
        ));
    }

    // routes
    let mut routes = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let (text_route, strip) = match r {
            RawRoute::Short(s) => (s.as_str(), raw.strip_prefix),
            RawRoute::Full(f) => (f.route.as_str(), f.strip_prefix.unwrap_or(raw.strip_prefix)),
        };
        match parse_route(text_route) {
            Ok((host, prefix)) => {
                let spec = RouteSpec {
                    host,
                    prefix,
                    strip_prefix: strip,
                };
                if routes
                    .iter()
                    .any(|x: &RouteSpec| x.host == spec.host && x.prefix == spec.prefix)
                {
                    errors.push(ctx.err(
                        &["routes"],
                        Some(text_route),
                        format!("routes[{i}]"),
                        format!("route `{text_route}` is listed twice"),
                    ));
                }
                routes.push(spec);
            }
            Err(m) => {
                errors.push(ctx.err(&["routes"], Some(text_route), format!("routes[{i}]"), m))
            }
        }
    }

    for k in raw.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            errors.push(ctx.err(
                &["env"],
                Some(k),
                format!("env.{k}"),
                "invalid variable name".into(),
            ));
        }
        if RESERVED_ENV.contains(&k.as_str()) {
            errors.push(ctx.err(
                &["env"],
                Some(k),
                format!("env.{k}"),
                format!("`{k}` is set by tqproxy for every instance and cannot be overridden"),
            ));
        }
    }
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH_ENV.to_string());
    env.extend(raw.env.clone());

    let instances = raw.instances.unwrap_or(defaults.instances);
    if instances > 256 {
        errors.push(ctx.err(
            &["instances"],
            None,
            "instances",
            "at most 256 instances per worker".into(),
        ));
    }

    let health = HealthConfig {
        path: raw.health.path.clone(),
        interval: raw.health.interval.map_or(Duration::from_secs(1), |x| x.0),
        timeout: raw
            .health
            .timeout
            .map_or(Duration::from_millis(500), |x| x.0),
        unhealthy_after: raw.health.unhealthy_after.unwrap_or(3),
    };
    if let Some(p) = &health.path
        && (!p.starts_with('/') || p.contains(char::is_whitespace))
    {
        errors.push(ctx.err(
            &["health", "path"],
            None,
            "health.path",
            format!("`{p}` must be an absolute path without spaces, e.g. /health"),
        ));
    }
    if health.interval < Duration::from_millis(10) {
        errors.push(ctx.err(
            &["health", "interval"],
            None,
            "health.interval",
            "must be at least 10ms".into(),
        ));
    }
    if health.timeout.is_zero() {
        errors.push(ctx.err(
            &["health", "timeout"],
            None,
            "health.timeout",
            "must be more than 0".into(),
        ));
    }
    if health.unhealthy_after == 0 {
        errors.push(ctx.err(
            &["health", "unhealthy_after"],
            None,
            "health.unhealthy_after",
            "must be at least 1".into(),
        ));
    }

    let deploy = DeployConfig {
        strategy: raw.deploy.strategy.unwrap_or(Strategy::Rolling),
        max_surge: raw.deploy.max_surge.unwrap_or(1),
        rollback_window: raw
            .deploy
            .rollback_window
            .map_or(Duration::from_secs(60), |x| x.0),
    };
    if deploy.max_surge == 0 {
        errors.push(ctx.err(
            &["deploy", "max_surge"],
            None,
            "deploy.max_surge",
            "must be at least 1".into(),
        ));
    }

    let restart = RestartPolicy {
        backoff: raw
            .restart
            .backoff
            .map_or(Duration::from_millis(100), |x| x.0),
        backoff_max: raw
            .restart
            .backoff_max
            .map_or(Duration::from_secs(30), |x| x.0),
        crashloop_after: raw.restart.crashloop_after.unwrap_or(5),
        reset_after: raw
            .restart
            .reset_after
            .map_or(Duration::from_secs(10), |x| x.0),
    };
    if restart.backoff_max < restart.backoff {
        errors.push(ctx.err(
            &["restart", "backoff_max"],
            None,
            "restart.backoff_max",
            "must not be less than restart.backoff".into(),
        ));
    }

    let resources = worker_resources(&raw.resources, dir, &ctx, &mut errors);
    let mut sandbox = worker_sandbox(&raw.sandbox, &name, dir, &ctx, &mut errors);
    // A private /tmp would hide the worker's own files if they live under /tmp.
    let tmp = Path::new("/tmp");
    let own_under_tmp = [dir, program.as_path(), cwd.as_path()]
        .into_iter()
        .chain(sandbox.read_write.iter().map(PathBuf::as_path))
        .chain(sandbox.read_only.iter().map(PathBuf::as_path))
        .find(|p| p.starts_with(tmp));
    if let (true, Some(p)) = (sandbox.private_tmp, own_under_tmp) {
        if raw.sandbox.private_tmp == Some(true) {
            errors.push(ctx.err(
                &["sandbox", "private_tmp"],
                None,
                "sandbox.private_tmp",
                format!(
                    "a private /tmp would hide {}, which this worker needs",
                    p.display()
                ),
            ));
        }
        sandbox.private_tmp = false;
    }
    if sandbox.has(Namespace::Net) && raw.health.path.is_none() {
        // Port readiness still works: tqproxy owns the listening socket and probes it.
    }

    let build = raw.build.as_ref().map(|b| {
        if b.command.is_empty() {
            errors.push(ctx.err(
                &["build", "command"],
                None,
                "build.command",
                "must name a program".into(),
            ));
        }
        BuildConfig {
            command: b.command.clone(),
            watch: b.watch.iter().map(|w| resolve(dir, w)).collect(),
            timeout: b.timeout.map_or(Duration::from_secs(300), |x| x.0),
        }
    });

    let recycle_memory = raw.recycle_memory.map(|s| s.0);
    if let (Some(r), Some(m)) = (recycle_memory, resources.memory)
        && r >= m
    {
        errors.push(ctx.err(&["recycle_memory"], None, "recycle_memory", format!("{} is not below resources.memory ({}); the kernel would OOM-kill the instance before tqproxy recycles it", fmt_size(r), fmt_size(m))));
    }

    let w = WorkerConfig {
        name,
        program_stamp: FileStamp::of(&program),
        program,
        args,
        cwd,
        routes,
        instances,
        env,
        health,
        deploy,
        drain_timeout: raw.drain_timeout.map_or(defaults.drain_timeout, |x| x.0),
        stop_timeout: raw.stop_timeout.map_or(defaults.stop_timeout, |x| x.0),
        queue_timeout: raw.queue_timeout.map_or(defaults.queue_timeout, |x| x.0),
        start_timeout: raw.start_timeout.map_or(defaults.start_timeout, |x| x.0),
        connect_timeout: raw
            .connect_timeout
            .map_or(defaults.connect_timeout, |x| x.0),
        read_timeout: raw.read_timeout.map_or(defaults.read_timeout, |x| x.0),
        max_requests: raw.max_requests,
        recycle_memory,
        restart,
        resources,
        sandbox,
        build,
        pass_socket: raw.pass_socket,
        file: file.clone(),
        dir: dir.to_path_buf(),
    };
    if errors.is_empty() {
        Ok(Some(w))
    } else {
        Err(errors)
    }
}

/// Environment variables tqproxy sets itself.
pub const RESERVED_ENV: &[&str] = &[
    "PORT",
    "WORKER_PORT",
    "WORKER_NAME",
    "WORKER_INSTANCE",
    "WORKER_GENERATION",
    "LISTEN_FDS",
    "LISTEN_PID",
];

fn worker_resources(
    r: &RawResources,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> Resources {
    let mut res = Resources {
        memory: r.memory.map(|s| s.0),
        memory_high: r.memory_high.map(|s| s.0),
        cpu: r.cpu,
        cpu_weight: r.cpu_weight,
        pids: r.pids,
        open_files: r.open_files,
        core: r.core.map_or(0, |s| s.0),
        address_space: r.address_space.map(|s| s.0),
        file_size: r.file_size.map(|s| s.0),
        io: None,
    };
    if let Some(m) = res.memory
        && m < 1 << 20
    {
        errors.push(ctx.err(
            &["resources", "memory"],
            None,
            "resources.memory",
            "must be at least 1M".into(),
        ));
    }
    if let (Some(h), Some(m)) = (res.memory_high, res.memory)
        && h > m
    {
        errors.push(ctx.err(
            &["resources", "memory_high"],
            None,
            "resources.memory_high",
            "must not exceed resources.memory".into(),
        ));
    }
    if let Some(c) = res.cpu
        && !(0.01..=1024.0).contains(&c)
    {
        errors.push(ctx.err(
            &["resources", "cpu"],
            None,
            "resources.cpu",
            format!("{c} cores is out of range (0.01 to 1024)"),
        ));
    }
    if let Some(w) = res.cpu_weight
        && !(1..=10000).contains(&w)
    {
        errors.push(ctx.err(
            &["resources", "cpu_weight"],
            None,
            "resources.cpu_weight",
            format!("{w} is out of range (1 to 10000, default 100)"),
        ));
    }
    if res.pids == Some(0) {
        errors.push(ctx.err(
            &["resources", "pids"],
            None,
            "resources.pids",
            "must be at least 1".into(),
        ));
    }
    if let Some(n) = res.open_files
        && !(16..=1 << 20).contains(&n)
    {
        errors.push(ctx.err(
            &["resources", "open_files"],
            None,
            "resources.open_files",
            format!("{n} is out of range (16 to 1048576)"),
        ));
    }
    if let Some(io) = &r.io {
        let device = resolve(dir, io.device.as_deref().unwrap_or("."));
        // The block device (whole disk) whose bandwidth is limited: the device node itself,
        // or the one holding the given path.
        let numbers = match crate::sandbox::block_device_of(&device) {
            Ok(n) => n,
            Err(e) => {
                errors.push(ctx.err(
                    &["resources", "io", "device"],
                    None,
                    "resources.io.device",
                    format!("{}: no block device to limit ({e})", device.display()),
                ));
                (0, 0)
            }
        };
        if io.read_bps.is_none()
            && io.write_bps.is_none()
            && io.read_iops.is_none()
            && io.write_iops.is_none()
        {
            errors.push(ctx.err(
                &["resources", "io"],
                None,
                "resources.io",
                "set at least one of read_bps, write_bps, read_iops, write_iops".into(),
            ));
        }
        res.io = Some(IoSettings {
            device,
            numbers,
            read_bps: io.read_bps.map(|s| s.0),
            write_bps: io.write_bps.map(|s| s.0),
            read_iops: io.read_iops,
            write_iops: io.write_iops,
        });
    }
    res
}

fn worker_sandbox(
    s: &RawSandbox,
    name: &str,
    dir: &Path,
    ctx: &Ctx,
    errors: &mut Vec<ConfigError>,
) -> SandboxConfig {
    let user = if s.dynamic_user {
        if s.user.is_some() || s.group.is_some() {
            errors.push(ctx.err(
                &["sandbox", "dynamic_user"],
                None,
                "sandbox.dynamic_user",
                "cannot be combined with sandbox.user or sandbox.group".into(),
            ));
        }
        let uid = dynamic_uid(name);
        UserSpec::Dynamic { uid, gid: uid }
    } else if let Some(u) = &s.user {
        match nix::unistd::User::from_name(u) {
            Ok(Some(pw)) => {
                let (group, gid) = match &s.group {
                    None => (
                        nix::unistd::Group::from_gid(pw.gid)
                            .ok()
                            .flatten()
                            .map_or_else(|| pw.gid.to_string(), |g| g.name),
                        pw.gid.as_raw(),
                    ),
                    Some(g) => match nix::unistd::Group::from_name(g) {
                        Ok(Some(gr)) => (gr.name, gr.gid.as_raw()),
                        _ => {
                            errors.push(ctx.err(&["sandbox", "group"], None, "sandbox.group", format!("group `{g}` does not exist (create it, e.g. `groupadd --system {g}`)")));
                            (g.clone(), 0)
                        }
                    },
                };
                UserSpec::Named {
                    user: u.clone(),
                    group,
                    uid: pw.uid.as_raw(),
                    gid,
                }
            }
            _ => {
                errors.push(ctx.err(&["sandbox", "user"], None, "sandbox.user", format!("user `{u}` does not exist (create it with `useradd --system --no-create-home {u}`, or use dynamic_user: true)")));
                UserSpec::Inherit
            }
        }
    } else {
        if s.group.is_some() {
            errors.push(ctx.err(
                &["sandbox", "group"],
                None,
                "sandbox.group",
                "needs sandbox.user".into(),
            ));
        }
        UserSpec::Inherit
    };
    let mut namespaces = Vec::new();
    for ns in &s.namespaces {
        if namespaces.contains(ns) {
            errors.push(ctx.err(
                &["sandbox", "namespaces"],
                None,
                "sandbox.namespaces",
                format!("{ns:?} is listed twice").to_lowercase(),
            ));
        } else {
            namespaces.push(*ns);
        }
    }
    let seccomp = match s.seccomp.as_deref() {
        None | Some("off") => SeccompSetting::Off,
        Some("default") => SeccompSetting::Default,
        Some(p) => {
            let path = resolve(dir, p);
            if !path.is_file() {
                errors.push(ctx.err(
                    &["sandbox", "seccomp"],
                    None,
                    "sandbox.seccomp",
                    format!(
                        "expected `default`, `off` or a profile file; {} does not exist",
                        path.display()
                    ),
                ));
            }
            SeccompSetting::Profile(path)
        }
    };
    let read_write: Vec<PathBuf> = s.read_write.iter().map(|p| resolve(dir, p)).collect();
    let read_only: Vec<PathBuf> = s.read_only.iter().map(|p| resolve(dir, p)).collect();
    for (i, p) in read_only.iter().enumerate() {
        if !p.exists() {
            errors.push(ctx.err(
                &["sandbox", "read_only"],
                Some(&s.read_only[i]),
                format!("sandbox.read_only[{i}]"),
                format!("{} does not exist", p.display()),
            ));
        }
    }
    for (i, p) in read_write.iter().enumerate() {
        if p == Path::new("/") {
            errors.push(ctx.err(
                &["sandbox", "read_write"],
                Some(&s.read_write[i]),
                format!("sandbox.read_write[{i}]"),
                "cannot be /".into(),
            ));
        }
    }
    let has_mount = namespaces.contains(&Namespace::Mount) || namespaces.contains(&Namespace::Pid);
    let read_only_root = s.read_only_root.unwrap_or(has_mount);
    let private_tmp = s.private_tmp.unwrap_or(has_mount);
    if (s.read_only_root == Some(true) || s.private_tmp == Some(true)) && !has_mount {
        errors.push(ctx.err(
            &["sandbox"],
            None,
            "sandbox",
            "read_only_root and private_tmp need the `mount` namespace".into(),
        ));
    }
    SandboxConfig {
        user,
        namespaces,
        seccomp,
        landlock: s.landlock,
        read_write,
        read_only,
        read_only_root,
        private_tmp,
    }
}

/// A stable uid in systemd's DynamicUser range (61184–65519) derived from the worker name.
pub fn dynamic_uid(name: &str) -> u32 {
    // FNV-1a: stable across runs and versions (std's hasher is not).
    let mut h: u32 = 0x811c9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    61184 + h % (65519 - 61184 + 1)
}

/// `/api`, `/api/`, `example.com/api`, `*.example.com/`, `example.com` → (host, prefix).
pub fn parse_route(s: &str) -> Result<(Option<String>, String), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty route".into());
    }
    if s.contains(char::is_whitespace) || s.contains('?') || s.contains('#') {
        return Err(format!(
            "invalid route `{s}`: no spaces, `?` or `#` allowed"
        ));
    }
    let (host, path) = match s.find('/') {
        Some(0) => (None, s),
        Some(i) => (Some(&s[..i]), &s[i..]),
        None => (Some(s), "/"),
    };
    let host = match host {
        None => None,
        Some(h) => {
            let h = h.to_ascii_lowercase();
            let bare = h.strip_prefix("*.").unwrap_or(&h);
            let valid = !bare.is_empty()
                && bare.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !valid {
                return Err(format!(
                    "invalid host `{h}` in route `{s}` (expected e.g. api.example.com/v1 or *.example.com/)"
                ));
            }
            Some(h)
        }
    };
    if path.contains("//") || path.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(format!("invalid path in route `{s}`"));
    }
    let prefix = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    Ok((host, prefix.to_string()))
}

fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("invalid port range `{s}` (expected e.g. 9000-9999)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok(a..=b)
}

fn resolve_program(dir: &Path, prog: &str) -> Result<PathBuf, String> {
    let path = if prog.contains('/') {
        resolve(dir, prog)
    } else {
        let search = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH_ENV.into());
        match std::env::split_paths(&search)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
        {
            Some(p) => p,
            None => return Err(format!("program `{prog}` not found in PATH")),
        }
    };
    match std::fs::metadata(&path) {
        Err(e) => Err(format!("program {} : {e}", path.display())),
        Ok(m) if !m.is_file() => Err(format!("program {} is not a file", path.display())),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => {
            Err(format!("program {} is not executable", path.display()))
        }
        Ok(_) => Ok(path),
    }
}

/// Makes `path` absolute against the current directory, without touching the filesystem.
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        normalize(path)
    } else {
        normalize(
            &std::env::current_dir()
                .unwrap_or_else(|_| PathBuf::from("/"))
                .join(path),
        )
    }
}

/// Resolves `p` against `dir` (the directory of the file it was written in).
pub fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        normalize(p)
    } else {
        normalize(&dir.join(p))
    }
}

/// Removes `.` and `..` lexically (symlinks are not followed, on purpose: paths are shown to the
/// operator as written).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Errors with lines
// ---------------------------------------------------------------------------------------------

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    /// An error at `path` (YAML keys from the root); `value` narrows the line to where that
    /// value appears under the key (list items).
    fn err(
        &self,
        path: &[&str],
        value: Option<&str>,
        key: impl Into<String>,
        message: String,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: locate(self.text, path, value),
            key: key.into(),
            message,
        }
    }
}

fn parse_yaml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_yaml reports where the *value* failed; for a value under a known key we
        // prefer the key's own line (serde points at the enclosing mapping for some errors).
        let keys: Vec<&str> = path
            .split('.')
            .map(|k| k.split('[').next().unwrap_or(k))
            .filter(|k| !k.is_empty() && *k != "?")
            .collect();
        let line = locate(text, &keys, None).or_else(|| inner.location().map(|l| l.line()));
        let mut message = inner.to_string();
        // serde_yaml appends " at line L column C" and prefixes the path; we report both
        // ourselves, so strip them.
        if let Some(i) = message.rfind(" at line ")
            && !message[i..].contains(", ")
        {
            message.truncate(i);
        }
        for prefix in [format!("{path}: "), format!("{}: ", parent_path(&path))] {
            if let Some(rest) = message.strip_prefix(&prefix) {
                message = rest.to_string();
                break;
            }
        }
        ConfigError {
            file: file.to_path_buf(),
            line,
            key: if path == "." { String::new() } else { path },
            message,
        }
    })
}

fn parent_path(path: &str) -> &str {
    match path.rfind('.') {
        Some(i) => &path[..i],
        None => path,
    }
}

/// Finds the 1-based line of a key path in block-style YAML (or of `value` below it).
/// Best effort: falls back to the deepest key found.
fn locate(text: &str, path: &[&str], value: Option<&str>) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0usize;
    let mut found: Option<usize> = None;
    let mut min_indent: Option<usize> = None;
    for key in path {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if found.is_some()
                && !trimmed.is_empty()
                && !trimmed.starts_with('#')
                && let Some(mi) = min_indent
                && indent <= mi
                && i > start
            {
                break;
            }
            let bare = trimmed.trim_start_matches("- ");
            if bare.starts_with(&format!("{key}:"))
                || trimmed.contains(&format!("{{{key}:"))
                || trimmed.contains(&format!(" {key}:"))
            {
                hit = Some((i, indent));
                break;
            }
        }
        match hit {
            Some((i, indent)) => {
                found = Some(i);
                start = i;
                min_indent = Some(indent);
            }
            None => break,
        }
    }
    if let (Some(v), Some(f)) = (value, found) {
        for (i, line) in lines.iter().enumerate().skip(f) {
            if line.contains(v) {
                return Some(i + 1);
            }
        }
    }
    found.map(|i| i + 1)
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
    fn dynamic_uids_are_stable_and_in_range() {
        let a = dynamic_uid("hello");
        assert_eq!(a, dynamic_uid("hello"));
        assert!((61184..=65519).contains(&a));
        assert_ne!(dynamic_uid("hello"), dynamic_uid("probe"));
    }
}
