//! The status document: `tqproxy status --json`, `GET /status.json`, and the input of the
//! terminal table; and the [`Outcome`] of a change with the [`ErrorKind`] of each failure.
//! Plain data, serialisable both ways (the CLI reads what the server writes).
//!
//! A leaf, like [`crate::metrics`]: the supervisor, the control socket, the CLI, the admin
//! listener and the metrics read or write these types, and this module imports none of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub pid: u32,
    pub version: String,
    pub uptime_secs: f64,
    pub config: String,
    pub listen: Vec<String>,
    pub admin: Option<String>,
    pub cgroups: Option<String>,
    /// `starting`, `running` or `stopping`.
    pub state: String,
    /// `tqproxy drain`: out of the load balancer's rotation (`/healthz` 503 `draining`).
    #[serde(default)]
    pub drained: bool,
    pub workers: Vec<WorkerStatus>,
    /// The ACME certificates (`tls.acme`); absent from an older tqproxy's document.
    #[serde(default)]
    pub certificates: Vec<CertificateStatus>,
}

/// One certificate obtained and renewed over ACME (`tqproxy certs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertificateStatus {
    pub domains: Vec<String>,
    /// `http-01` or `tls-alpn-01`.
    pub challenge: String,
    pub directory: String,
    pub state_dir: String,
    /// The certificate served now: none before the first issuance.
    pub issuer: Option<String>,
    pub serial: Option<String>,
    /// RFC 3339.
    pub not_after: Option<String>,
    pub expires_in_secs: Option<i64>,
    pub next_renewal: Option<String>,
    pub next_renewal_in_secs: Option<i64>,
    /// An attempt is under way.
    pub renewing: bool,
    /// Failed attempts in a row (0 after a success).
    pub failures: u32,
    pub last_error: Option<String>,
}

/// `/healthz` warns (and still answers 200) when an ACME certificate's renewal fails and it
/// expires within this many seconds (7 days), or when there is none yet and obtaining it fails.
pub const CERT_WARN_SECS: i64 = 7 * 86400;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub name: String,
    pub routes: Vec<String>,
    pub desired: u32,
    /// Generation of the worker's current configuration.
    pub generation: u64,
    /// Generation(s) the route table points at (two during a rolling deploy).
    pub routed_generations: Vec<u64>,
    pub strategy: String,
    /// Blue/green: the previous generation kept for `rollback`.
    pub standby: Option<StandbyStatus>,
    /// A canary deploy in progress: its step, share and both generations' figures.
    #[serde(default)]
    pub canary: Option<CanaryStatus>,
    /// What each generation with an instance answered since it started (two during a
    /// canary or a blue/green window).
    #[serde(default)]
    pub generations: Vec<GenerationStatus>,
    /// What is being done to the worker right now (`deploy`, `scale`, …).
    pub busy: Option<String>,
    pub restarts: BTreeMap<String, u64>,
    pub in_flight: u64,
    pub requests: u64,
    /// Latency of what the worker's live generations answered since they started (the
    /// upper bound of a histogram bucket, about 19 % wide); `None` before a request.
    #[serde(default)]
    pub p50_ms: Option<f64>,
    #[serde(default)]
    pub p99_ms: Option<f64>,
    pub instances: Vec<InstanceStatus>,
    pub log: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CanaryStatus {
    pub generation: u64,
    /// The generation it is compared with (the one serving before).
    pub baseline: u64,
    /// 1-based, of `steps`.
    pub step: usize,
    pub steps: usize,
    /// The canary's share of requests now (`25%`).
    pub share: String,
    /// The current step's window so far.
    pub canary_window: WindowStatus,
    pub baseline_window: WindowStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WindowStatus {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationStatus {
    pub generation: u64,
    /// Its instances now.
    pub instances: u32,
    pub requests: u64,
    /// 5xx answers, tqproxy's own 502/504 included.
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StandbyStatus {
    pub generation: u64,
    pub instances: Vec<u64>,
    pub expires_in_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceStatus {
    pub id: u64,
    pub pid: Option<u32>,
    /// The instance's port (`transport: tcp`); `None` with `transport: unix`.
    pub port: Option<u16>,
    /// The instance's unix socket path (`transport: unix`).
    #[serde(default)]
    pub socket: Option<String>,
    /// `starting|ready|draining|stopping|exited|crashloop`
    pub state: String,
    pub generation: u64,
    pub restarts: u32,
    /// In the route table right now.
    pub routed: bool,
    /// `serving`, `candidate` (deploy in progress), `standby` (blue/green rollback window),
    /// `retiring`.
    pub role: String,
    pub in_flight: u64,
    pub requests: u64,
    pub uptime_secs: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    /// CPU used between tqproxy's last two samples of `cpu_seconds` (one a second), in
    /// percent of one core; `None` until there are two.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    /// Latency of what this process answered since it started, as the worker's.
    #[serde(default)]
    pub p50_ms: Option<f64>,
    #[serde(default)]
    pub p99_ms: Option<f64>,
    pub last_exit: Option<String>,
    pub cgroup: Option<String>,
    /// The last `STATUS=` the instance sent (`ready: notify`).
    #[serde(default)]
    pub status: Option<String>,
}

/// The machine-readable half of an error, sent over the control socket next to the message
/// a person reads (in an [`OutcomeLine`] and in the control socket's error response). The CLI
/// decides its exit code from it, never from the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NoSuchWorker,
    WorkerExists,
    Busy,
    ShuttingDown,
    StartFailed,
    NotReady,
    DeployFailed,
    NothingToRollBack,
    InvalidConfig,
    BadRequest,
    /// `promote`/`abort` with no canary running.
    NoCanary,
    /// Anything else; also what an error response without a kind (an older tqproxy) and a
    /// kind this build does not know (a newer one) read as.
    #[default]
    #[serde(other)]
    Internal,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::NoSuchWorker,
        ErrorKind::WorkerExists,
        ErrorKind::Busy,
        ErrorKind::ShuttingDown,
        ErrorKind::StartFailed,
        ErrorKind::NotReady,
        ErrorKind::DeployFailed,
        ErrorKind::NothingToRollBack,
        ErrorKind::InvalidConfig,
        ErrorKind::BadRequest,
        ErrorKind::NoCanary,
        ErrorKind::Internal,
    ];

    /// The CLI's exit code for a verb that failed with this kind (documented in the README's
    /// CLI section). 1 stays "the operation failed"; 2 is clap's usage error; 3 is "cannot
    /// reach tqproxy".
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::StartFailed
            | ErrorKind::NotReady
            | ErrorKind::DeployFailed
            | ErrorKind::Internal => 1,
            ErrorKind::BadRequest => 2,
            ErrorKind::NoSuchWorker => 4,
            ErrorKind::Busy | ErrorKind::WorkerExists => 5,
            ErrorKind::ShuttingDown => 6,
            ErrorKind::InvalidConfig => 7,
            ErrorKind::NothingToRollBack => 8,
            ErrorKind::NoCanary => 9,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NoSuchWorker => "no_such_worker",
            ErrorKind::WorkerExists => "worker_exists",
            ErrorKind::Busy => "busy",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::StartFailed => "start_failed",
            ErrorKind::NotReady => "not_ready",
            ErrorKind::DeployFailed => "deploy_failed",
            ErrorKind::NothingToRollBack => "nothing_to_roll_back",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NoCanary => "no_canary",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error that knows its [`ErrorKind`]: its `Display` is the message a person reads.
/// Implemented by the supervisor's `SupervisorError` and the control socket's own errors, so
/// this module needs neither.
pub trait Failure: std::fmt::Display {
    fn kind(&self) -> ErrorKind;
}

/// The outcome of a change (scale, reload, deploy…), one line per worker touched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    pub lines: Vec<OutcomeLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutcomeLine {
    pub worker: String,
    pub ok: bool,
    pub message: String,
    /// What kind of failure a failed line is (`None` when it succeeded, and for failures that
    /// have no kind). Absent from the JSON when `None`, so that a CLI and a server of different
    /// versions still read each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
}

impl Outcome {
    /// One line about `worker` (`-`: about tqproxy itself), with the error's message and kind.
    pub fn from_result<E: Failure>(worker: &str, result: Result<String, E>) -> Outcome {
        let line = match result {
            Ok(message) => OutcomeLine {
                worker: worker.to_string(),
                ok: true,
                message,
                kind: None,
            },
            Err(e) => OutcomeLine {
                worker: worker.to_string(),
                ok: false,
                message: e.to_string(),
                kind: Some(e.kind()),
            },
        };
        Outcome {
            ok: line.ok,
            lines: vec![line],
        }
    }

    /// One line with an untyped error (no kind). Kept while the supervisor still reports
    /// `String` errors; [`Outcome::from_result`] replaces it.
    pub fn single(worker: &str, result: Result<String, String>) -> Outcome {
        let (ok, message) = match result {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        Outcome {
            ok,
            lines: vec![OutcomeLine {
                worker: worker.to_string(),
                ok,
                message,
                kind: None,
            }],
        }
    }

    /// The first failed line: its kind (if it has one) is what the CLI's exit code says.
    pub fn first_failure(&self) -> Option<&OutcomeLine> {
        self.lines.iter().find(|l| !l.ok)
    }
}

fn fmt_uptime(s: f64) -> String {
    let s = s as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}d{:02}h", s / 86400, s % 86400 / 3600)
    }
}

fn fmt_bytes(b: u64) -> String {
    bytesize::ByteSize(b).display().iec_short().to_string()
}

/// `s` on one line (control characters become spaces), at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s
        .split(|c: char| c.is_control())
        .filter(|p| !p.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if out.chars().count() > max {
        out = out.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
    }
    out
}

impl WorkerStatus {
    /// Whether the worker is expected to serve: it has instances configured and is not being
    /// removed. A worker scaled to 0 on purpose does not make the machine unhealthy.
    pub fn expected_up(&self) -> bool {
        self.desired > 0 && self.busy.as_deref() != Some("removing")
    }

    /// At least one instance is ready and in the route table.
    pub fn serving(&self) -> bool {
        self.instances
            .iter()
            .any(|i| i.state == "ready" && i.routed)
    }

    /// Why the worker is not serving, in a few words: instance states and the last exit.
    pub fn down_reason(&self) -> String {
        let mut states: BTreeMap<&str, usize> = BTreeMap::new();
        for i in &self.instances {
            *states.entry(i.state.as_str()).or_default() += 1;
        }
        let mut why = if states.is_empty() {
            "no instance".to_string()
        } else {
            states
                .iter()
                .map(|(s, n)| format!("{n} {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(exit) = self.instances.iter().find_map(|i| i.last_exit.as_deref()) {
            why.push_str("; last exit: ");
            why.push_str(&one_line(exit, 160));
        }
        why
    }
}

impl StatusReport {
    /// `Ok` when every worker expected up ([`WorkerStatus::expected_up`]) has at least one
    /// ready, routed instance; else one line naming each worker that has none, and why. This is
    /// `GET /healthz` (for external load balancers) and the health line of `tqproxy status`.
    pub fn health(&self) -> Result<(), String> {
        if self.state == "stopping" {
            return Err("tqproxy is stopping".into());
        }
        if self.drained {
            return Err("draining (`tqproxy undrain` puts the node back)".into());
        }
        let down: Vec<String> = self
            .workers
            .iter()
            .filter(|w| w.expected_up() && !w.serving())
            .map(|w| format!("{} ({})", w.name, w.down_reason()))
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!("no ready instance: {}", down.join(", ")))
        }
    }

    /// Warnings that do not make the machine unhealthy: ACME certificates whose renewal fails
    /// close to expiry (see [`CERT_WARN_SECS`]).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.certificates {
            let Some(err) = c.last_error.as_deref().filter(|_| c.failures > 0) else {
                continue;
            };
            let names = c.domains.join(", ");
            match c.expires_in_secs {
                None => out.push(format!("no certificate yet for {names}: {err}")),
                Some(s) if s < CERT_WARN_SECS => out.push(format!(
                    "the certificate for {names} expires in {} and its renewal fails: {err}",
                    fmt_secs(s)
                )),
                Some(_) => {}
            }
        }
        out
    }

    /// The terminal table of `tqproxy status`.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "tqproxy {} pid {} {}{} up {}  listen {}{}\n",
            self.version,
            self.pid,
            self.state,
            if self.drained { " DRAINED" } else { "" },
            fmt_uptime(self.uptime_secs),
            self.listen.join(", "),
            self.admin
                .as_ref()
                .map_or(String::new(), |a| format!("  admin {a}")),
        ));
        out.push_str(&match self.health() {
            Ok(()) => "health: ok\n".to_string(),
            Err(why) => format!("health: DOWN, {why}\n"),
        });
        for w in &self.workers {
            let restarts: Vec<String> = w
                .restarts
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            out.push_str(&format!(
                "\n{}  routes {}  desired {}  generation {} (routed {})  {}  in-flight {}{}{}{}{}\n",
                w.name,
                w.routes.join(" "),
                w.desired,
                w.generation,
                w.routed_generations
                    .iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join("+"),
                w.strategy,
                w.in_flight,
                latency(w.p50_ms, w.p99_ms),
                w.busy
                    .as_ref()
                    .map_or(String::new(), |b| format!("  [{b}]")),
                w.standby.as_ref().map_or(String::new(), |s| format!(
                    "  standby g{} for {:.0}s",
                    s.generation, s.expires_in_secs
                )) + &w.canary.as_ref().map_or(String::new(), |c| format!(
                    "  canary g{} {} (step {}/{}): {} req {:.3} err{} vs g{} {} req {:.3} err{}",
                    c.generation,
                    c.share,
                    c.step,
                    c.steps,
                    c.canary_window.requests,
                    c.canary_window.error_rate,
                    c.canary_window
                        .p99_ms
                        .map_or(String::new(), |p| format!(" p99 {p:.1}ms")),
                    c.baseline,
                    c.baseline_window.requests,
                    c.baseline_window.error_rate,
                    c.baseline_window
                        .p99_ms
                        .map_or(String::new(), |p| format!(" p99 {p:.1}ms")),
                )),
                if restarts.is_empty() {
                    String::new()
                } else {
                    format!("  restarts {}", restarts.join(" "))
                },
            ));
            // Two generations side by side (a blue/green window, a canary): each one's figures.
            if w.generations.len() > 1 {
                for g in &w.generations {
                    out.push_str(&format!(
                        "  g{}: {} instance{}, {} req, {} err{}\n",
                        g.generation,
                        g.instances,
                        if g.instances == 1 { "" } else { "s" },
                        g.requests,
                        g.errors,
                        latency(g.p50_ms, g.p99_ms)
                    ));
                }
            }
            if w.instances.is_empty() {
                out.push_str("  (no instance)\n");
                continue;
            }
            out.push_str(&format!(
                "  {:>4} {:>7} {:>5} {:<9} {:>3} {:<9} {:>6} {:>4} {:>5} {:>9} {:>8} {:>8} {:>7} {:>5}  {}\n",
                "ID",
                "PID",
                "PORT",
                "STATE",
                "GEN",
                "ROLE",
                "ROUTED",
                "RST",
                "INFL",
                "REQUESTS",
                "UPTIME",
                "MEMORY",
                "CPU",
                "CPU%",
                "LAST EXIT"
            ));
            for i in &w.instances {
                let row = format!(
                    "  {:>4} {:>7} {:>5} {:<9} {:>3} {:<9} {:>6} {:>4} {:>5} {:>9} {:>8} {:>8} {:>7} {:>5}  {}\n",
                    i.id,
                    i.pid.map_or("-".into(), |p| p.to_string()),
                    match (i.port, &i.socket) {
                        (Some(p), _) => p.to_string(),
                        (None, Some(_)) => "unix".into(),
                        (None, None) => "-".into(),
                    },
                    i.state,
                    i.generation,
                    i.role,
                    if i.routed { "yes" } else { "no" },
                    i.restarts,
                    i.in_flight,
                    i.requests,
                    i.uptime_secs.map_or("-".into(), fmt_uptime),
                    i.memory_bytes.map_or("-".into(), fmt_bytes),
                    i.cpu_seconds.map_or("-".into(), |c| format!("{c:.2}s")),
                    i.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
                    i.last_exit
                        .as_deref()
                        .map_or(String::new(), |e| one_line(e, 100)),
                );
                out.push_str(row.trim_end());
                out.push('\n');
                if let Some(socket) = &i.socket {
                    out.push_str(&format!("  {:>4} {:>7} socket {socket}\n", "", ""));
                }
                if let Some(status) = &i.status {
                    out.push_str(&format!(
                        "  {:>4} {:>7} status {}\n",
                        "",
                        "",
                        one_line(status, 100)
                    ));
                }
            }
        }
        for c in &self.certificates {
            out.push_str(&format!("\ncertificate {}  ", c.domains.join(", ")));
            out.push_str(&match c.expires_in_secs {
                Some(s) => format!("expires in {}", fmt_secs(s)),
                None => "not issued yet".into(),
            });
            if let Some(s) = c.next_renewal_in_secs {
                out.push_str(&format!("  next renewal in {}", fmt_secs(s.max(0))));
            }
            if let Some(e) = c.last_error.as_deref().filter(|_| c.failures > 0) {
                out.push_str(&format!(
                    "  renewal failing ({}x): {}",
                    c.failures,
                    one_line(e, 100)
                ));
            }
            out.push('\n');
        }
        for w in self.warnings() {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }
}

/// `3d 4h`, `5h 2m`, `40s`; `expired` for a negative count.
pub fn fmt_secs(s: i64) -> String {
    if s < 0 {
        return "expired".into();
    }
    let (d, h, m) = (s / 86400, s % 86400 / 3600, s % 3600 / 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {}s", s % 60)
    } else {
        format!("{s}s")
    }
}

/// `  p50 1.2ms p99 8.0ms`, or nothing before a request.
fn latency(p50: Option<f64>, p99: Option<f64>) -> String {
    match (p50, p99) {
        (Some(a), Some(b)) => format!("  p50 {a:.1}ms p99 {b:.1}ms"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: u64, state: &str, last_exit: Option<&str>) -> InstanceStatus {
        let up = state == "ready";
        InstanceStatus {
            id,
            pid: up.then_some(1000 + id as u32),
            port: up.then_some(9000 + id as u16),
            socket: None,
            state: state.into(),
            generation: 1,
            restarts: 2,
            routed: up,
            role: "serving".into(),
            in_flight: 0,
            requests: 42,
            uptime_secs: up.then_some(75.0),
            memory_bytes: up.then_some(3 << 20),
            cpu_seconds: up.then_some(1.5),
            cpu_percent: up.then_some(25.0),
            p50_ms: None,
            p99_ms: None,
            last_exit: last_exit.map(String::from),
            cgroup: None,
            status: None,
        }
    }

    fn worker(name: &str, desired: u32, instances: Vec<InstanceStatus>) -> WorkerStatus {
        WorkerStatus {
            name: name.into(),
            routes: vec!["/".into()],
            desired,
            generation: 1,
            routed_generations: vec![1],
            strategy: "rolling".into(),
            standby: None,
            canary: None,
            generations: Vec::new(),
            busy: None,
            restarts: BTreeMap::new(),
            in_flight: 0,
            requests: 42,
            p50_ms: None,
            p99_ms: None,
            instances,
            log: format!("logs/{name}.log"),
        }
    }

    fn report(workers: Vec<WorkerStatus>) -> StatusReport {
        StatusReport {
            pid: 1,
            version: "0.1.0".into(),
            uptime_secs: 3700.0,
            config: "conf/tqproxy.yaml".into(),
            listen: vec!["127.0.0.1:8080".into()],
            admin: Some("127.0.0.1:8090".into()),
            cgroups: Some("v2".into()),
            state: "running".into(),
            drained: false,
            workers,
            certificates: Vec::new(),
        }
    }

    /// A failure of a known kind, as the supervisor's errors are.
    #[derive(Debug)]
    struct Refused(ErrorKind);

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "refused ({})", self.0.as_str())
        }
    }

    impl Failure for Refused {
        fn kind(&self) -> ErrorKind {
            self.0
        }
    }

    #[test]
    fn an_outcome_line_carries_its_kind_and_reads_without_one() {
        let failed = Outcome::from_result("w", Err::<String, _>(Refused(ErrorKind::Busy)));
        assert!(!failed.ok);
        assert_eq!(
            failed.lines,
            [OutcomeLine {
                worker: "w".into(),
                ok: false,
                message: "refused (busy)".into(),
                kind: Some(ErrorKind::Busy),
            }]
        );
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(json["lines"][0]["kind"], "busy");
        assert_eq!(serde_json::from_value::<Outcome>(json).unwrap(), failed);
        // A success has no kind, and the field is left out of the document.
        let done = Outcome::from_result::<Refused>("w", Ok("scaled to 2".into()));
        assert!(done.ok && done.first_failure().is_none());
        let json = serde_json::to_value(&done).unwrap();
        assert!(json["lines"][0].get("kind").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<Outcome>(json).unwrap(), done);
        // A document from an older tqproxy, without `kind`, still reads.
        let old: Outcome = serde_json::from_str(
            r#"{"ok":false,"lines":[{"worker":"-","ok":true,"message":"tls"},{"worker":"w","ok":false,"message":"gone"}]}"#,
        )
        .unwrap();
        let first = old.first_failure().unwrap();
        assert_eq!((first.worker.as_str(), first.kind), ("w", None));
        assert_eq!(Outcome::single("w", Err("x".into())).lines[0].kind, None);
        // A kind this build does not know (a newer tqproxy) reads as `internal`: a failure.
        let newer: OutcomeLine =
            serde_json::from_str(r#"{"worker":"w","ok":false,"message":"m","kind":"exploded"}"#)
                .unwrap();
        assert_eq!(newer.kind, Some(ErrorKind::Internal));
    }

    #[test]
    fn an_error_kind_defaults_to_internal() {
        assert_eq!(ErrorKind::default(), ErrorKind::Internal);
        assert_eq!(ErrorKind::default().exit_code(), 1);
    }

    #[test]
    fn a_failing_renewal_warns_only_near_expiry() {
        let cert = |expires: Option<i64>, failures: u32| CertificateStatus {
            domains: vec!["a.test".into()],
            challenge: "http-01".into(),
            directory: "https://ca.test/dir".into(),
            state_dir: "/s".into(),
            issuer: expires.map(|_| "CN=CA".into()),
            serial: expires.map(|_| "01".into()),
            not_after: None,
            expires_in_secs: expires,
            next_renewal: None,
            next_renewal_in_secs: None,
            renewing: false,
            failures,
            last_error: (failures > 0).then(|| "new order: connection refused".into()),
        };
        let mut st = report(vec![]);
        st.certificates = vec![
            cert(Some(30 * 86400), 3),    // failing, far from expiry: quiet
            cert(Some(2 * 86400), 0),     // close, but no failure (a renewal is under way)
            cert(Some(2 * 86400 + 5), 1), // close and failing
            cert(None, 2),                // never obtained
        ];
        assert_eq!(
            st.warnings(),
            vec![
                "the certificate for a.test expires in 2d 0h and its renewal fails: new order: connection refused".to_string(),
                "no certificate yet for a.test: new order: connection refused".to_string(),
            ]
        );
        // A warning, not a failure.
        assert_eq!(st.health(), Ok(()));
        let t = st.render_table();
        assert!(t.contains("health: ok\n"), "{t}");
        assert!(t.contains("\ncertificate a.test  not issued yet  renewal failing (2x): new order: connection refused\n"), "{t}");
        assert!(t.contains("warning: no certificate yet for a.test"), "{t}");
        assert_eq!(fmt_secs(-1), "expired");
        assert_eq!(fmt_secs(3 * 3600 + 120), "3h 2m");
    }

    #[test]
    fn healthy_when_every_expected_worker_serves() {
        let st = report(vec![
            worker(
                "a",
                2,
                vec![instance(1, "ready", None), instance(2, "starting", None)],
            ),
            // Scaled to zero on purpose: not a reason to fail the machine.
            worker("off", 0, vec![]),
        ]);
        assert_eq!(st.health(), Ok(()));
        assert!(st.render_table().contains("health: ok\n"));
    }

    #[test]
    fn unhealthy_names_the_worker_on_one_line() {
        let st = report(vec![
            worker("a", 1, vec![instance(1, "ready", None)]),
            worker(
                "broken",
                1,
                vec![instance(
                    1,
                    "crashloop",
                    Some("exited with code 3\nlast output: boom"),
                )],
            ),
        ]);
        let why = st.health().unwrap_err();
        assert_eq!(
            why,
            "no ready instance: broken (1 crashloop; last exit: exited with code 3 last output: boom)"
        );
        assert!(!why.contains('\n'));
        let mut stopping = st.clone();
        stopping.state = "stopping".into();
        assert_eq!(stopping.health().unwrap_err(), "tqproxy is stopping");
        assert!(
            report(vec![worker("new", 1, vec![])])
                .health()
                .unwrap_err()
                .contains("new (no instance)")
        );
    }

    #[test]
    fn table_has_a_row_per_instance() {
        let st = report(vec![worker(
            "a",
            2,
            vec![
                instance(1, "ready", None),
                instance(2, "exited", Some("killed by SIGKILL")),
            ],
        )]);
        let t = st.render_table();
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("tqproxy 0.1.0 pid 1 running up 1h01m"),
            "{t}"
        );
        assert!(lines[1].starts_with("health: ok"), "{t}");
        let header = lines.iter().position(|l| l.contains("ID")).unwrap();
        let cols: Vec<&str> = lines[header].split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "ID", "PID", "PORT", "STATE", "GEN", "ROLE", "ROUTED", "RST", "INFL", "REQUESTS",
                "UPTIME", "MEMORY", "CPU", "CPU%", "LAST", "EXIT"
            ]
        );
        let row1: Vec<&str> = lines[header + 1].split_whitespace().collect();
        assert_eq!(
            row1,
            [
                "1", "1001", "9001", "ready", "1", "serving", "yes", "2", "0", "42", "1m15s",
                "3.0M", "1.50s", "25%"
            ]
        );
        assert!(lines[header + 2].ends_with("killed by SIGKILL"), "{t}");
        assert!(!t.contains("socket"), "{t}");
        // Columns line up: every row is as wide as the header up to LAST EXIT.
        let width = lines[header].find("LAST EXIT").unwrap();
        assert!(lines[header + 1].len() <= width, "{t}");
    }

    #[test]
    fn a_unix_instance_shows_its_socket_instead_of_a_port() {
        let mut unix = instance(1, "ready", None);
        unix.port = None;
        unix.socket = Some("/run/tqproxy/sockets/7214/a.1.1.sock".into());
        let st = report(vec![worker("a", 1, vec![unix])]);
        let t = st.render_table();
        let lines: Vec<&str> = t.lines().collect();
        let header = lines.iter().position(|l| l.contains("ID")).unwrap();
        let row: Vec<&str> = lines[header + 1].split_whitespace().collect();
        assert_eq!(row[..4], ["1", "1001", "unix", "ready"], "{t}");
        assert_eq!(
            lines[header + 2].trim(),
            "socket /run/tqproxy/sockets/7214/a.1.1.sock",
            "{t}"
        );
        // The JSON document carries both fields; an older document without `socket` reads.
        let json = serde_json::to_value(&st).unwrap();
        let i = &json["workers"][0]["instances"][0];
        assert_eq!(i["port"], serde_json::Value::Null);
        assert_eq!(i["socket"], "/run/tqproxy/sockets/7214/a.1.1.sock");
        let mut old = json.clone();
        old["workers"][0]["instances"][0]
            .as_object_mut()
            .unwrap()
            .remove("socket");
        let back: StatusReport = serde_json::from_value(old).unwrap();
        assert_eq!(back.workers[0].instances[0].socket, None);
    }
}
