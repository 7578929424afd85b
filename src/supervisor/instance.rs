//! One instance's process: spawn it through the sandbox helper, watch it become ready, check
//! its liveness, stop it (SIGTERM, then SIGKILL of the whole tree), and report facts to the
//! supervisor. The supervisor decides what the facts mean.

use std::os::fd::OwnedFd;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::mpsc;

use super::Msg;
use super::health;
use super::logs::{Tail, WorkerLog};
use super::notify::{self, Message, NotifySocket, Received};
use crate::config::{Ready, WorkerConfig};
use crate::sandbox::cgroup::InstanceCgroup;
use crate::sandbox::{HELPER_FAILED, SpawnIo, SpawnSpec, Spawner};

/// What the supervisor tells a running instance.
pub use super::lifecycle::Signal as Ctl;

/// Facts an instance reports (wrapped in [`Msg::Instance`]) are the rules' events.
pub use super::lifecycle::Event as Fact;

/// Everything needed to start one instance.
pub struct Launch {
    pub worker: Arc<str>,
    pub id: u64,
    pub generation: u64,
    /// Where the instance accepts: `127.0.0.1:port`, or its unix socket.
    pub target: health::Target,
    /// The listening socket tqproxy created for it (TCP or unix), passed as fd 3.
    pub listener: Option<OwnedFd>,
    pub config: Arc<WorkerConfig>,
    pub spec: SpawnSpec,
    pub cgroup: Option<Arc<InstanceCgroup>>,
    pub log: WorkerLog,
    pub tail: Tail,
    /// Monotonic per instance record: facts of an older process of the same slot are ignored.
    pub epoch: u64,
    /// With `ready: notify`: the socket bound for this process (its path is `NOTIFY_SOCKET`
    /// in `spec`).
    pub notify: Option<NotifySocket>,
}

/// Spawns the process (synchronously, on the caller's thread: that thread is the parent for
/// PR_SET_PDEATHSIG, so it must be the supervisor's long-lived runtime thread) and starts the
/// monitor task.
pub fn launch(
    spawner: &Spawner,
    l: Launch,
    to_supervisor: mpsc::UnboundedSender<Msg>,
) -> Result<mpsc::UnboundedSender<Ctl>, String> {
    let io = SpawnIo {
        stdout: Stdio::piped(),
        stderr: Stdio::piped(),
        listen: l.listener,
    };
    let mut child = spawner
        .spawn(&l.spec, io)
        .map_err(|e| format!("cannot start {}: {e}", l.spec.program.display()))?;
    // The listening socket now lives in the child; our copy was dropped with `io`.
    let pid = child.id().unwrap_or(0);
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(l.log.clone().pump(
            out,
            l.id,
            l.generation,
            "out",
            l.tail.clone(),
        )));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(l.log.clone().pump(
            err,
            l.id,
            l.generation,
            "err",
            l.tail.clone(),
        )));
    }
    let at = match &l.target {
        health::Target::Tcp(a) => format!("port {}", a.port()),
        health::Target::Unix(p) => format!("socket {}", p.display()),
    };
    l.log.event(
        l.id,
        l.generation,
        &format!("started pid {pid} {at} generation {}", l.generation),
    );
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let report = Reporter {
        tx: to_supervisor,
        worker: l.worker.clone(),
        id: l.id,
        epoch: l.epoch,
    };
    report.send(Fact::Spawned { pid });
    let notify_path = l.notify.as_ref().map(|s| s.path.clone());
    let notify = match l.notify.map(|s| s.into_receiver(pid)) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            // The instance is started; without its socket it will not be ready in time,
            // and the start timeout says so.
            l.log.event(
                l.id,
                l.generation,
                &format!("notify socket unusable: {e}; READY=1 cannot arrive"),
            );
            None
        }
    };
    let monitor = Monitor {
        notify,
        notify_path,
        status: None,
        ignored: Vec::new(),
        watchdog_at: None,
        pumps,
        target: l.target,
        config: l.config,
        cgroup: l.cgroup,
        tail: l.tail,
        log: l.log,
        id: l.id,
        generation: l.generation,
        pid,
        report,
    };
    tokio::spawn(monitor.run(child, ctl_rx));
    Ok(ctl_tx)
}

struct Reporter {
    tx: mpsc::UnboundedSender<Msg>,
    worker: Arc<str>,
    id: u64,
    epoch: u64,
}

impl Reporter {
    fn send(&self, fact: Fact) {
        let _ = self.tx.send(Msg::Instance {
            worker: self.worker.clone(),
            id: self.id,
            epoch: self.epoch,
            fact,
        });
    }
}

struct Monitor {
    /// `ready: notify`: the instance's notify socket.
    notify: Option<notify::Receiver>,
    /// Its file, removed when the process is gone.
    notify_path: Option<std::path::PathBuf>,
    /// The last `STATUS=` reported.
    status: Option<String>,
    /// Ignored keys already logged once (at most [`MAX_IGNORED_LOGGED`]).
    ignored: Vec<String>,
    /// `watchdog:` once ready: when the next `WATCHDOG=1` is due.
    watchdog_at: Option<tokio::time::Instant>,
    /// The tasks copying the instance's stdout/stderr into its log.
    pumps: Vec<tokio::task::JoinHandle<()>>,
    target: health::Target,
    config: Arc<WorkerConfig>,
    cgroup: Option<Arc<InstanceCgroup>>,
    tail: Tail,
    log: WorkerLog,
    id: u64,
    generation: u64,
    pid: u32,
    report: Reporter,
}

/// Distinct ignored keys logged per instance (the protocol has fewer).
const MAX_IGNORED_LOGGED: usize = 16;

enum Phase {
    Starting { since: Instant },
    Live { failures: u32, reported: bool },
    Stopping,
}

impl Monitor {
    async fn run(mut self, mut child: Child, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
        let config = self.config.clone();
        let health = &config.health;
        let mut phase = Phase::Starting {
            since: Instant::now(),
        };
        // Readiness is polled quickly, from 1 ms and doubling (a new version should serve
        // within milliseconds of being able to); liveness at the configured interval.
        let mut poll = Duration::from_millis(1);
        let mut next_check = tokio::time::Instant::now() + poll;
        let mut kill_deadline: Option<tokio::time::Instant> = None;
        let start_deadline = tokio::time::Instant::now() + self.config.start_timeout;
        let notify_ready = self.config.ready == Ready::Notify;
        if notify_ready {
            // No poll: the start timeout is the only check before READY=1.
            next_check = start_deadline;
        }
        let status = loop {
            let check_at = match phase {
                Phase::Stopping => kill_deadline.unwrap_or_else(far_future),
                _ => next_check,
            };
            let watchdog_at = match phase {
                Phase::Live {
                    reported: false, ..
                } => self.watchdog_at.unwrap_or_else(far_future),
                _ => far_future(),
            };
            tokio::select! {
                st = child.wait() => break st,
                got = recv(&mut self.notify) => self.on_notify(got, &mut phase, &mut next_check),
                _ = tokio::time::sleep_until(watchdog_at) => {
                    if let (Some(wd), Phase::Live { reported, .. }) = (self.config.watchdog, &mut phase) {
                        *reported = true;
                        self.watchdog_at = None;
                        self.report.send(Fact::Unhealthy {
                            reason: format!("no WATCHDOG=1 for {}", humantime::format_duration(wd)),
                        });
                    }
                }
                cmd = ctl.recv() => match cmd {
                    Some(Ctl::Stop { timeout }) => {
                        if !matches!(phase, Phase::Stopping) {
                            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
                            kill_deadline = Some(tokio::time::Instant::now() + timeout);
                            phase = Phase::Stopping;
                        }
                    }
                    Some(Ctl::Kill) => {
                        self.kill_tree();
                        phase = Phase::Stopping;
                        kill_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                    }
                    None => {
                        // The supervisor is gone (tqproxy is exiting): nothing may outlive it.
                        self.kill_tree();
                        phase = Phase::Stopping;
                        kill_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                    }
                },
                _ = tokio::time::sleep_until(check_at) => match &mut phase {
                    Phase::Stopping => {
                        self.log.event(self.id, self.generation, "did not exit after SIGTERM: killing the process tree");
                        self.kill_tree();
                        kill_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                    }
                    Phase::Starting { .. } if notify_ready => {
                        let reason = format!(
                            "no READY=1 on NOTIFY_SOCKET within {}{}",
                            humantime::format_duration(self.config.start_timeout),
                            self.last_output()
                        );
                        self.report.send(Fact::StartFailed { reason });
                        phase = Phase::Live { failures: 0, reported: true };
                        next_check = far_future();
                    }
                    Phase::Starting { since } => {
                        match health::probe(&self.target, health.path.as_deref(), health.timeout.min(Duration::from_secs(2))).await {
                            Ok(()) => {
                                self.report.send(Fact::Ready { after: since.elapsed() });
                                phase = Phase::Live { failures: 0, reported: false };
                                next_check = tokio::time::Instant::now() + health.interval;
                            }
                            Err(e) => {
                                if tokio::time::Instant::now() >= start_deadline {
                                    let reason = format!(
                                        "not ready within {} (last check: {e}){}",
                                        humantime::format_duration(self.config.start_timeout),
                                        self.last_output()
                                    );
                                    self.report.send(Fact::StartFailed { reason });
                                    // The supervisor will stop it; keep watching.
                                    phase = Phase::Live { failures: 0, reported: true };
                                    next_check = far_future();
                                } else {
                                    poll = (poll * 2).min(Duration::from_millis(250)).min(health.interval.max(Duration::from_millis(1)));
                                    next_check = tokio::time::Instant::now() + poll;
                                }
                            }
                        }
                    }
                    Phase::Live { failures, reported } => {
                        match health::probe(&self.target, health.path.as_deref(), health.timeout).await {
                            Ok(()) => *failures = 0,
                            Err(e) => {
                                *failures += 1;
                                if *failures >= health.unhealthy_after && !*reported {
                                    *reported = true;
                                    self.report.send(Fact::Unhealthy {
                                        reason: format!("{} consecutive failed health checks, last: {e}", failures),
                                    });
                                }
                            }
                        }
                        next_check = tokio::time::Instant::now() + health.interval;
                    }
                },
            }
        };
        let was_starting = matches!(phase, Phase::Starting { .. });
        // Its notify socket goes with it.
        self.notify = None;
        if let Some(p) = self.notify_path.take() {
            notify::remove(&p);
        }
        // The main process is gone; whatever it left behind goes too.
        self.kill_tree();
        let oom_kills = self
            .cgroup
            .as_ref()
            .and_then(|c| c.oom_kills())
            .unwrap_or(0);
        if let Some(cg) = self.cgroup.clone() {
            // Freezing, killing and rmdir of a cgroup can block (the kernel tears processes
            // down asynchronously): off the supervisor's thread.
            let id = self.id;
            let _ = tokio::task::spawn_blocking(move || {
                for _ in 0..50 {
                    if cg.pids().is_empty() {
                        break;
                    }
                    let _ = cg.kill_all();
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Err(e) = cg.remove() {
                    tracing::warn!(instance = id, error = %e, "cgroup not removed");
                }
            })
            .await;
        }
        // Its last words (a panic message, the sandbox helper's reason) belong in the log and
        // in the exit description: let the pumps drain the pipes first (bounded: a leftover
        // process could hold them open).
        let pumps = std::mem::take(&mut self.pumps);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            for p in pumps {
                let _ = p.await;
            }
        })
        .await;
        let description = match &status {
            Ok(st) => describe(st, &self.tail),
            Err(e) => format!("wait failed: {e}"),
        };
        if was_starting {
            self.report.send(Fact::StartFailed {
                reason: format!("{description} before becoming ready{}", self.last_output()),
            });
        }
        self.log
            .event(self.id, self.generation, &format!("exited: {description}"));
        self.report.send(Fact::Exited {
            status: description,
            oom: oom_kills > 0,
        });
    }

    /// What a notify datagram says, acted on in order.
    fn on_notify(
        &mut self,
        got: Received,
        phase: &mut Phase,
        next_check: &mut tokio::time::Instant,
    ) {
        let parsed = match got {
            Received::Dropped(why) => {
                self.log_bad(&why);
                return;
            }
            Received::Datagram(p) => p,
        };
        for problem in &parsed.problems {
            self.log_bad(problem);
        }
        for m in parsed.messages {
            match m {
                Message::Ready => {
                    if let Phase::Starting { since } = phase {
                        self.report.send(Fact::Ready {
                            after: since.elapsed(),
                        });
                        *phase = Phase::Live {
                            failures: 0,
                            reported: false,
                        };
                        *next_check = tokio::time::Instant::now() + self.config.health.interval;
                        self.watchdog_at = self
                            .config
                            .watchdog
                            .map(|w| tokio::time::Instant::now() + w);
                    }
                }
                Message::Watchdog => {
                    if let (Some(w), Phase::Live { .. }) = (self.config.watchdog, &*phase) {
                        self.watchdog_at = Some(tokio::time::Instant::now() + w);
                    }
                }
                Message::WatchdogTrigger => {
                    if let Phase::Live {
                        reported: reported @ false,
                        ..
                    } = phase
                    {
                        *reported = true;
                        self.report.send(Fact::Unhealthy {
                            reason: "it sent WATCHDOG=trigger".into(),
                        });
                    }
                }
                Message::Stopping => match phase {
                    Phase::Starting { .. } => {
                        self.report.send(Fact::StartFailed {
                            reason: "it sent STOPPING=1 before READY=1".into(),
                        });
                        *phase = Phase::Live {
                            failures: 0,
                            reported: true,
                        };
                        *next_check = far_future();
                    }
                    Phase::Live {
                        reported: reported @ false,
                        ..
                    } => {
                        // It is going down on its own: out of the route table at once and
                        // replaced, as an unhealthy report does (its SIGTERM is graceful).
                        *reported = true;
                        self.report.send(Fact::Unhealthy {
                            reason: "it sent STOPPING=1".into(),
                        });
                    }
                    _ => {}
                },
                Message::Status(text) => {
                    if self.status.as_deref() != Some(text.as_str()) {
                        self.status = Some(text.clone());
                        self.report.send(Fact::Status { text });
                    }
                }
                Message::Ignored(key) => {
                    if self.ignored.len() < MAX_IGNORED_LOGGED && !self.ignored.contains(&key) {
                        self.log.event(
                            self.id,
                            self.generation,
                            &format!("notify: {key}= is not supported: ignored (logged once)"),
                        );
                        self.ignored.push(key);
                    }
                }
            }
        }
    }

    /// A line about bad notify input, in the worker's log and tqproxy's (rate-limited).
    fn log_bad(&mut self, what: &str) {
        let Some(n) = self.notify.as_mut().and_then(|r| r.may_log()) else {
            return;
        };
        let more = if n > 0 {
            format!(" ({n} more not logged)")
        } else {
            String::new()
        };
        tracing::warn!(worker = %self.report.worker, instance = self.id, problem = %what, "notify socket: bad input{more}");
        self.log
            .event(self.id, self.generation, &format!("notify: {what}{more}"));
    }

    fn last_output(&self) -> String {
        let lines = self.tail.last(3);
        if lines.is_empty() {
            String::new()
        } else {
            format!("; last output: {}", lines.join(" | "))
        }
    }

    /// SIGKILL to the process group (the helper made itself a session leader) and to every
    /// process in the instance's cgroup (which also catches processes that left the group).
    fn kill_tree(&self) {
        if self.pid > 0 {
            let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        if let Some(cg) = self.cgroup.clone() {
            let id = self.id;
            tokio::task::spawn_blocking(move || {
                if let Err(e) = cg.kill_all() {
                    tracing::warn!(instance = id, error = %e, "cgroup kill failed");
                }
            });
        }
    }
}

/// The next datagram of the notify socket; never, without one.
async fn recv(r: &mut Option<notify::Receiver>) -> Received {
    match r {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

/// "exited with code 3", "killed by SIGKILL", "sandbox setup failed: …".
fn describe(st: &ExitStatus, tail: &Tail) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = st.code() {
        if code == HELPER_FAILED
            && let Some(line) = tail
                .last(20)
                .into_iter()
                .rev()
                .find(|l| l.starts_with("tqproxy-sandbox:"))
        {
            return format!("sandbox setup failed ({line})");
        }
        return format!("exited with code {code}");
    }
    if let Some(sig) = st.signal() {
        let name =
            Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.as_str().to_string());
        return format!(
            "killed by {name}{}",
            if st.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        );
    }
    "exited".to_string()
}
