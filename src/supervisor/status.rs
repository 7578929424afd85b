//! The status document: `tqproxy status --json`, `GET /status.json`, and the input of the
//! terminal table. Plain data, serialisable both ways (the CLI reads what the server writes).

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
    pub workers: Vec<WorkerStatus>,
}

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
    /// What is being done to the worker right now (`deploy`, `scale`, …).
    pub busy: Option<String>,
    pub restarts: BTreeMap<String, u64>,
    pub in_flight: u64,
    pub requests: u64,
    pub instances: Vec<InstanceStatus>,
    pub log: String,
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
    pub port: Option<u16>,
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
    pub last_exit: Option<String>,
    pub cgroup: Option<String>,
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
}

impl Outcome {
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
            }],
        }
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

impl StatusReport {
    /// The terminal table of `tqproxy status`.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "tqproxy {} pid {} {} up {}  listen {}{}\n",
            self.version,
            self.pid,
            self.state,
            fmt_uptime(self.uptime_secs),
            self.listen.join(", "),
            self.admin
                .as_ref()
                .map_or(String::new(), |a| format!("  admin {a}")),
        ));
        for w in &self.workers {
            let restarts: Vec<String> = w
                .restarts
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            out.push_str(&format!(
                "\n{}  routes {}  desired {}  generation {} (routed {})  {}{}{}{}\n",
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
                w.busy
                    .as_ref()
                    .map_or(String::new(), |b| format!("  [{b}]")),
                w.standby.as_ref().map_or(String::new(), |s| format!(
                    "  standby g{} for {:.0}s",
                    s.generation, s.expires_in_secs
                )),
                if restarts.is_empty() {
                    String::new()
                } else {
                    format!("  restarts {}", restarts.join(" "))
                },
            ));
            out.push_str(&format!(
                "  {:>4} {:>7} {:>5} {:<9} {:>3} {:<9} {:>6} {:>5} {:>9} {:>8} {:>8} {:>7}  {}\n",
                "ID",
                "PID",
                "PORT",
                "STATE",
                "GEN",
                "ROLE",
                "ROUTED",
                "INFL",
                "REQUESTS",
                "UPTIME",
                "MEMORY",
                "CPU",
                "LAST EXIT"
            ));
            for i in &w.instances {
                out.push_str(&format!(
                    "  {:>4} {:>7} {:>5} {:<9} {:>3} {:<9} {:>6} {:>5} {:>9} {:>8} {:>8} {:>7}  {}\n",
                    i.id,
                    i.pid.map_or("-".into(), |p| p.to_string()),
                    i.port.map_or("-".into(), |p| p.to_string()),
                    i.state,
                    i.generation,
                    i.role,
                    if i.routed { "yes" } else { "no" },
                    i.in_flight,
                    i.requests,
                    i.uptime_secs.map_or("-".into(), fmt_uptime),
                    i.memory_bytes.map_or("-".into(), fmt_bytes),
                    i.cpu_seconds.map_or("-".into(), |c| format!("{c:.2}s")),
                    i.last_exit.as_deref().unwrap_or(""),
                ));
            }
        }
        out
    }
}
