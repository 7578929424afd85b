//! Node drain: take this whole tqproxy out of an external load balancer's rotation without
//! refusing anyone (`tqproxy drain`, `tqproxy undrain`).
//!
//! While drained:
//! - `GET /healthz` answers 503 `draining` ([`crate::status::StatusReport::health`]), so a
//!   balancer's health check takes the node out; HAProxy's agent-check hears `drain`
//!   ([`agent_reply`]);
//! - every response asks its client to reconnect: HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY
//!   on the connection's next stream (the engines read [`crate::proxy::policy::closing`], the
//!   same flag as an upgrade's handover), so keep-alive clients move to another node;
//! - new connections are still served: a balancer that has not noticed yet loses nothing.
//!
//! The drained state is one flag of the process ([`drained`]): a `reload` does not touch it.
//! It is also written to `run_dir/drained`, so that the new process of a `tqproxy upgrade`
//! starts drained too ([`restore`]); a fresh `tqproxy run` starts undrained and removes the
//! file (a node restarted by systemd or Kubernetes comes back into rotation by itself).
//!
//! `drain` returns once the node is quiet ([`wait_quiet`]): no request in flight and none
//! started for [`QUIET`], or at its timeout.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::status::StatusReport;

static DRAINED: AtomicBool = AtomicBool::new(false);

/// The file in `run_dir` that says "drained" to the next process of an upgrade.
pub const MARKER: &str = "drained";

/// How long the node must see no request in flight and no new one before `drain` says it is
/// done.
pub const QUIET: Duration = Duration::from_millis(250);

/// Requests in flight per ready instance beyond which the node counts as busy for the
/// agent-check weight.
pub const BUSY_PER_INSTANCE: u64 = 8;

/// How often `drain` samples the in-flight and request counters.
const SAMPLE: Duration = Duration::from_millis(50);

/// Whether this process is drained.
pub fn drained() -> bool {
    DRAINED.load(Ordering::Relaxed)
}

fn marker(run_dir: &Path) -> PathBuf {
    run_dir.join(MARKER)
}

/// Drains (`on`) or undrains this process, and records it in `run_dir` for an upgrade's next
/// process. The flag is set even when the file cannot be written (the error says so).
pub fn set(run_dir: &Path, on: bool) -> Result<(), String> {
    DRAINED.store(on, Ordering::SeqCst);
    crate::metrics::METRICS.drained.set(i64::from(on));
    write_marker(run_dir, on)
}

/// Writes (`on`) or removes the marker file.
fn write_marker(run_dir: &Path, on: bool) -> Result<(), String> {
    let path = marker(run_dir);
    let r = if on {
        std::fs::write(
            &path,
            b"drained by `tqproxy drain`; `tqproxy undrain` removes this\n",
        )
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    };
    r.map_err(|e| format!("{}: {e}", path.display()))
}

/// Whether a process starting now inherits the drained state: only the new process of an
/// upgrade (`upgrading`), and only when the marker is there.
fn inherits(run_dir: &Path, upgrading: bool) -> bool {
    upgrading && marker(run_dir).is_file()
}

/// At startup: the new process of an upgrade takes the drained state over from the marker
/// file; a fresh start removes a stale one and starts undrained.
pub fn restore(run_dir: &Path, upgrading: bool) {
    let inherited = inherits(run_dir, upgrading);
    if let Err(e) = set(run_dir, inherited) {
        tracing::warn!(error = %e, "cannot record the drained state");
    }
    if inherited {
        tracing::info!("starting drained (the tqproxy it upgrades was drained)");
    }
}

/// What `tqproxy drain` and `tqproxy undrain` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrainReport {
    /// The node's state now.
    pub drained: bool,
    /// It already was (a second `drain`, or `undrain` of a node that was not drained).
    pub already: bool,
    /// `drain`: no request in flight and none started for [`QUIET`] before the timeout.
    pub quiet: bool,
    /// Requests in flight when the answer was sent.
    pub in_flight: u64,
    /// How long `drain` waited.
    pub waited_ms: u64,
    /// The marker file could not be written or removed (an upgrade would not carry it).
    #[serde(default)]
    pub warning: Option<String>,
}

/// The node's in-flight requests and requests so far, from a status document.
pub fn load(st: &StatusReport) -> (u64, u64) {
    st.workers
        .iter()
        .fold((0, 0), |(f, r), w| (f + w.in_flight, r + w.requests))
}

/// Waits until `sample` (in-flight, requests so far) shows nothing in flight and no new
/// request for [`QUIET`], or until `timeout`. Returns whether it got quiet, the last in-flight
/// count and how long it waited. `sample` returning `None` (the supervisor is gone) ends the
/// wait as quiet: there is nothing left to wait for.
pub async fn wait_quiet<F, Fut>(timeout: Duration, mut sample: F) -> (bool, u64, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<(u64, u64)>>,
{
    let started = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    let mut last_requests = None;
    loop {
        let Some((in_flight, requests)) = sample().await else {
            return (true, 0, started.elapsed());
        };
        let now = Instant::now();
        if in_flight == 0 && last_requests == Some(requests) {
            let since = *quiet_since.get_or_insert(now);
            if now.duration_since(since) >= QUIET {
                return (true, 0, started.elapsed());
            }
        } else {
            quiet_since = None;
        }
        last_requests = Some(requests);
        if started.elapsed() >= timeout {
            return (false, in_flight, started.elapsed());
        }
        tokio::time::sleep(SAMPLE).await;
    }
}

/// HAProxy's agent-check answer for this node (one line, `\n` included):
/// - `maint` while tqproxy is stopping (or its supervisor is gone);
/// - `drain` while drained: no new connections, the existing ones go on;
/// - otherwise `ready up N%`, N being the share of the instances that should run which are
///   ready and routed (instances still starting lower it), halved while the node is busy
///   (more than [`BUSY_PER_INSTANCE`] requests in flight per ready instance), at least 1 %.
///   HAProxy applies the percentage to the server's configured weight: give servers
///   `weight 100`, since with the default weight 1 anything below 100 % rounds to 0.
pub fn agent_reply(st: Option<&StatusReport>, drained: bool) -> String {
    let Some(st) = st else {
        return "maint\n".into();
    };
    if st.state == "stopping" {
        return "maint\n".into();
    }
    if drained {
        return "drain\n".into();
    }
    let desired: u64 = st.workers.iter().map(|w| u64::from(w.desired)).sum();
    let ready: u64 = st
        .workers
        .iter()
        .map(|w| {
            let n = w
                .instances
                .iter()
                .filter(|i| i.state == "ready" && i.routed)
                .count() as u64;
            n.min(u64::from(w.desired))
        })
        .sum();
    let (in_flight, _) = load(st);
    // No worker that should run: nothing to be short of.
    let mut weight = (ready * 100).checked_div(desired).unwrap_or(100);
    if ready > 0 && in_flight > BUSY_PER_INSTANCE * ready {
        weight /= 2;
    }
    format!("ready up {}%\n", weight.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: &str, workers: serde_json::Value) -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "pid": 1, "version": "x", "uptime_secs": 1.0, "config": "c", "listen": [],
            "admin": null, "cgroups": null, "state": state, "workers": workers,
        }))
        .unwrap()
    }

    fn worker(desired: u32, states: &[&str], in_flight: u64) -> serde_json::Value {
        let instances: Vec<_> = states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({
                    "id": i, "pid": null, "port": null, "state": s, "generation": 1,
                    "restarts": 0, "routed": *s == "ready", "role": "serving", "in_flight": 0,
                    "requests": 0, "uptime_secs": null, "memory_bytes": null,
                    "cpu_seconds": null, "last_exit": null, "cgroup": null,
                })
            })
            .collect();
        serde_json::json!({
            "name": "w", "routes": ["/"], "desired": desired, "generation": 1,
            "routed_generations": [1], "strategy": "rolling", "standby": null, "busy": null,
            "restarts": {}, "in_flight": in_flight, "requests": 0, "instances": instances,
            "log": "",
        })
    }

    #[test]
    fn the_agent_says_maint_drain_or_ready_with_a_weight() {
        let up = report(
            "running",
            serde_json::json!([worker(2, &["ready", "ready"], 0)]),
        );
        assert_eq!(agent_reply(Some(&up), false), "ready up 100%\n");
        assert_eq!(agent_reply(Some(&up), true), "drain\n");
        let stopping = report("stopping", serde_json::json!([]));
        assert_eq!(agent_reply(Some(&stopping), true), "maint\n");
        assert_eq!(agent_reply(None, false), "maint\n");
        let starting = report(
            "running",
            serde_json::json!([worker(4, &["ready", "starting", "starting", "ready"], 0)]),
        );
        assert_eq!(agent_reply(Some(&starting), false), "ready up 50%\n");
        let busy = report(
            "running",
            serde_json::json!([worker(2, &["ready", "ready"], 17)]),
        );
        assert_eq!(agent_reply(Some(&busy), false), "ready up 50%\n");
        let loaded = report(
            "running",
            serde_json::json!([worker(2, &["ready", "ready"], 16)]),
        );
        assert_eq!(agent_reply(Some(&loaded), false), "ready up 100%\n");
        let none = report("running", serde_json::json!([worker(2, &["starting"], 0)]));
        assert_eq!(agent_reply(Some(&none), false), "ready up 1%\n");
        let empty = report("running", serde_json::json!([]));
        assert_eq!(agent_reply(Some(&empty), false), "ready up 100%\n");
        // More ready than desired (a rolling deploy's overlap) does not count twice.
        let overlap = report(
            "running",
            serde_json::json!([worker(1, &["ready", "ready"], 0)]),
        );
        assert_eq!(agent_reply(Some(&overlap), false), "ready up 100%\n");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_quiet_or_its_timeout() {
        // In flight for three samples, then nothing: quiet after QUIET more.
        let mut n = 0;
        let (quiet, left, waited) = wait_quiet(Duration::from_secs(5), || {
            n += 1;
            let r = if n <= 3 { (1, n) } else { (0, 3) };
            async move { Some(r) }
        })
        .await;
        assert!(quiet);
        assert_eq!(left, 0);
        assert!(waited >= QUIET, "{waited:?}");
        // Requests keep starting (each finishing between samples): never quiet.
        let mut n = 0;
        let (quiet, _, _) = wait_quiet(Duration::from_secs(1), || {
            n += 1;
            async move { Some((0, n)) }
        })
        .await;
        assert!(!quiet);
        // One stuck request: the timeout, with it counted.
        let (quiet, left, _) = wait_quiet(Duration::from_secs(1), || async { Some((1, 7)) }).await;
        assert!(!quiet);
        assert_eq!(left, 1);
        // The supervisor is gone: nothing to wait for.
        let (quiet, _, _) = wait_quiet(Duration::from_secs(1), || async { None }).await;
        assert!(quiet);
    }

    #[test]
    fn the_marker_carries_the_state_to_an_upgrade_only() {
        // The process-wide flag is left alone: other tests read it through the engines.
        let dir = tempfile::tempdir().unwrap();
        assert!(!inherits(dir.path(), true));
        write_marker(dir.path(), true).unwrap();
        assert!(dir.path().join(MARKER).is_file());
        assert!(
            inherits(dir.path(), true),
            "an upgrade's new process starts drained"
        );
        assert!(!inherits(dir.path(), false), "a fresh start is not drained");
        write_marker(dir.path(), false).unwrap();
        assert!(!dir.path().join(MARKER).exists());
        write_marker(dir.path(), false).unwrap();
        let gone = dir.path().join("no/such/dir");
        assert!(
            write_marker(&gone, true)
                .unwrap_err()
                .contains("no/such/dir")
        );
    }
}
