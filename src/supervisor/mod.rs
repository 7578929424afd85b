//! The supervisor: the single owner of all instance state.
//!
//! One task (the *owner*, `Owner::run`) holds every worker and instance record, the port
//! pool, the unix sockets of `transport: unix` instances ([`sockets`]) and the cgroup driver,
//! and is the only writer of the route table. Everything else
//! talks to it through [`SupervisorHandle`] messages:
//!
//! - instance monitors ([`instance`]) report facts: spawned, ready, unhealthy, exited;
//! - orchestrations ([`deploy`]: scale, rolling and blue/green deploys, reload, recycle) are
//!   async tasks that ask the owner for primitive steps — start an instance, switch routing,
//!   drain and stop an instance — and await each step's [`Phase`];
//! - the control service asks for status and starts orchestrations.
//!
//! Lifecycle of an instance (see DESIGN.md "A swap"):
//!
//! ```text
//! Starting ──ready──> Ready ──drain──> Draining ──in-flight=0 or drain_timeout──> Stopping ──exit──> Exited
//!    │                  │                                                       (SIGTERM, then SIGKILL
//!    └─fail/timeout─────┴─crash/liveness fail──────────────────────────────────>  after stop_timeout)
//! ```
//!
//! A crashed *serving* instance is restarted in place (same id, new process and port) after a
//! capped exponential backoff; after `crashloop_after` consecutive failures it shows as
//! `crashloop` while it keeps backing off.

pub mod deploy;
pub mod devwatch;
pub mod error;
pub mod health;
pub mod instance;
pub mod logs;
mod owner;
pub mod ports;
pub mod sockets;
mod spec;
mod stats;
pub use crate::status;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, mpsc, oneshot, watch};

use crate::config::{Config, Strategy, WorkerConfig};
use crate::routes::RouteHandle;
pub use error::{ErrorKind, SupervisorError};
use instance::Fact;
use owner::Owner;
use status::{Outcome, StatusReport};

/// Why an instance was (re)placed. Recorded per restart and exported as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    Crash,
    Liveness,
    MaxRequests,
    Memory,
    Deploy,
    Scale,
}

impl Cause {
    pub const ALL: [Cause; 6] = [
        Cause::Crash,
        Cause::Liveness,
        Cause::MaxRequests,
        Cause::Memory,
        Cause::Deploy,
        Cause::Scale,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Crash => "crash",
            Cause::Liveness => "liveness",
            Cause::MaxRequests => "max_requests",
            Cause::Memory => "memory",
            Cause::Deploy => "deploy",
            Cause::Scale => "scale",
        }
    }
}

/// An instance's lifecycle as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Ready,
    Draining,
    Stopping,
    /// The process is gone (for good, or until a crash restart).
    Exited {
        reason: String,
    },
    /// It never became ready.
    Failed {
        reason: String,
    },
}

/// The state shown in `status` (`starting|ready|draining|stopping|exited|crashloop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Ready,
    Draining,
    Stopping,
    Exited,
    Crashloop,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
            State::Stopping => "stopping",
            State::Exited => "exited",
            State::Crashloop => "crashloop",
        }
    }

    /// Whether a process is (or may still be) running.
    fn has_process(self) -> bool {
        matches!(
            self,
            State::Starting | State::Ready | State::Draining | State::Stopping
        )
    }
}

/// What an instance is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Part of the worker's capacity; restarted when it crashes.
    Serving,
    /// Started by a deploy that has not committed it yet; never restarted.
    Candidate,
    /// Blue/green: the previous generation, alive but unrouted, for `rollback`.
    Standby,
    /// Being drained and stopped; removed when it exits.
    Retiring,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Serving => "serving",
            Role::Candidate => "candidate",
            Role::Standby => "standby",
            Role::Retiring => "retiring",
        }
    }
}

/// Everything the supervisor can be asked from the outside (control socket, signals).
#[derive(Debug, Clone)]
pub enum Request {
    Scale {
        worker: String,
        instances: u32,
    },
    Restart {
        worker: String,
    },
    Deploy {
        worker: String,
        strategy: Option<Strategy>,
    },
    Rollback {
        worker: String,
    },
    Reload,
}

/// Messages to the owner.
pub enum Msg {
    Status(oneshot::Sender<StatusReport>),
    Request(Request, oneshot::Sender<Outcome>),
    /// From instance monitors.
    Instance {
        worker: Arc<str>,
        id: u64,
        epoch: u64,
        fact: Fact,
    },
    /// Orchestration primitives.
    Start {
        worker: String,
        config: Arc<WorkerConfig>,
        generation: u64,
        role: Role,
        publish: bool,
        restarts: u32,
        reply: oneshot::Sender<Result<(u64, watch::Receiver<Phase>), String>>,
    },
    Switch {
        worker: String,
        route: Vec<u64>,
        unroute: Vec<u64>,
        roles: Vec<(u64, Role)>,
        reply: oneshot::Sender<()>,
    },
    Stop {
        worker: String,
        id: u64,
        drain: bool,
        reply: oneshot::Sender<Option<watch::Receiver<Phase>>>,
    },
    View(String, oneshot::Sender<Option<WorkerView>>),
    Commit {
        worker: String,
        commit: Commit,
        reply: oneshot::Sender<()>,
    },
    AddWorker(Arc<WorkerConfig>, oneshot::Sender<Result<(), String>>),
    RemoveWorker(String, oneshot::Sender<()>),
    SetConfig(Arc<Config>),
    Config(oneshot::Sender<Arc<Config>>),
    RestartDue {
        worker: String,
        id: u64,
        epoch: u64,
    },
    DrainDone {
        worker: String,
        id: u64,
        epoch: u64,
    },
    StandbyExpired {
        worker: String,
        generation: u64,
    },
    RecycleDone {
        worker: String,
        id: u64,
    },
    Tick,
    Shutdown(oneshot::Sender<()>),
    AllDrained,
}

/// A change to a worker's bookkeeping made when an orchestration commits.
#[derive(Debug, Default)]
pub struct Commit {
    pub config: Option<(Arc<WorkerConfig>, u64)>,
    pub desired: Option<u32>,
    /// `Some(None)` clears the previous revision.
    pub previous: Option<Option<(Arc<WorkerConfig>, u64)>>,
    pub standby: Option<Option<StandbyInfo>>,
    pub count_restarts: Vec<(Cause, u64)>,
    pub busy: Option<Option<String>>,
}

#[derive(Debug, Clone)]
pub struct StandbyInfo {
    pub generation: u64,
    pub config: Arc<WorkerConfig>,
    pub ids: Vec<u64>,
    pub until: Instant,
}

/// A snapshot of one worker for orchestrations.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub config: Arc<WorkerConfig>,
    pub generation: u64,
    pub next_generation: u64,
    pub desired: u32,
    pub previous: Option<(Arc<WorkerConfig>, u64)>,
    pub standby: Option<StandbyInfo>,
    pub instances: Vec<InstanceView>,
}

#[derive(Debug, Clone)]
pub struct InstanceView {
    pub id: u64,
    pub restarts: u32,
    pub generation: u64,
    pub state: State,
    pub role: Role,
    pub routed: bool,
}

/// Cheap, cloneable access to the supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    tx: mpsc::UnboundedSender<Msg>,
    tls_reloader: Arc<std::sync::OnceLock<TlsReloader>>,
    locks: Arc<std::sync::Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    reload_lock: Arc<AsyncMutex<()>>,
}

const GONE: &str = "tqproxy is shutting down";

/// Reloads the TLS certificates of every listener from a new configuration (all or nothing);
/// returns one line per listener.
pub type TlsReloader = Arc<dyn Fn(&Config) -> Result<Vec<String>, String> + Send + Sync>;

impl SupervisorHandle {
    /// Installs the certificate reload step of `tqproxy reload` (once, at startup).
    pub fn set_tls_reloader(&self, f: TlsReloader) {
        let _ = self.tls_reloader.set(f);
    }

    fn send(&self, m: Msg) {
        let _ = self.tx.send(m);
    }

    pub async fn status(&self) -> Option<StatusReport> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Status(tx));
        rx.await.ok()
    }

    /// Runs a request to completion and returns its outcome.
    pub async fn request(&self, r: Request) -> Outcome {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Request(r, tx));
        rx.await
            .unwrap_or_else(|_| Outcome::single("-", Err(GONE.into())))
    }

    /// The per-worker operation lock: one deploy/scale/restart at a time per worker.
    pub async fn lock(&self, worker: &str) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(worker.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    pub fn try_lock(&self, worker: &str) -> Option<OwnedMutexGuard<()>> {
        let m = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(worker.to_string()).or_default().clone()
        };
        m.try_lock_owned().ok()
    }

    pub async fn start(
        &self,
        worker: &str,
        config: Arc<WorkerConfig>,
        generation: u64,
        role: Role,
        publish: bool,
        restarts: u32,
    ) -> Result<(u64, watch::Receiver<Phase>), String> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Start {
            worker: worker.to_string(),
            config,
            generation,
            role,
            publish,
            restarts,
            reply: tx,
        });
        rx.await.map_err(|_| GONE.to_string())?
    }

    /// Routes `route`, unroutes `unroute` and sets roles, in one route-table store.
    pub async fn switch(
        &self,
        worker: &str,
        route: Vec<u64>,
        unroute: Vec<u64>,
        roles: Vec<(u64, Role)>,
    ) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Switch {
            worker: worker.to_string(),
            route,
            unroute,
            roles,
            reply: tx,
        });
        let _ = rx.await;
    }

    /// Drains (optionally) and stops an instance; the receiver reports its exit.
    pub async fn stop(&self, worker: &str, id: u64, drain: bool) -> Option<watch::Receiver<Phase>> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Stop {
            worker: worker.to_string(),
            id,
            drain,
            reply: tx,
        });
        rx.await.ok().flatten()
    }

    pub async fn view(&self, worker: &str) -> Option<WorkerView> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::View(worker.to_string(), tx));
        rx.await.ok().flatten()
    }

    pub async fn commit(&self, worker: &str, commit: Commit) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Commit {
            worker: worker.to_string(),
            commit,
            reply: tx,
        });
        let _ = rx.await;
    }

    pub async fn add_worker(&self, config: Arc<WorkerConfig>) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::AddWorker(config, tx));
        rx.await.map_err(|_| GONE.to_string())?
    }

    pub async fn remove_worker(&self, name: &str) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::RemoveWorker(name.to_string(), tx));
        let _ = rx.await;
    }

    pub async fn config(&self) -> Option<Arc<Config>> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Config(tx));
        rx.await.ok()
    }

    pub fn set_config(&self, c: Arc<Config>) {
        self.send(Msg::SetConfig(c));
    }

    /// Graceful stop: wait for in-flight requests, stop every instance; resolves when done.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Shutdown(tx));
        let _ = rx.await;
    }
}

/// Waits until a started instance is ready (Ok) or failed/exited (Err with the reason).
pub async fn wait_ready(rx: &mut watch::Receiver<Phase>) -> Result<(), String> {
    let r = rx
        .wait_for(|p| {
            matches!(
                p,
                Phase::Ready | Phase::Exited { .. } | Phase::Failed { .. }
            )
        })
        .await;
    match r.as_deref() {
        Ok(Phase::Ready) => Ok(()),
        Ok(Phase::Exited { reason }) | Ok(Phase::Failed { reason }) => Err(reason.clone()),
        _ => Err(GONE.into()),
    }
}

/// Waits until an instance's process has exited for good.
pub async fn wait_exited(rx: &mut watch::Receiver<Phase>) {
    let _ = rx
        .wait_for(|p| matches!(p, Phase::Exited { .. } | Phase::Failed { .. }))
        .await;
}

/// What the owner task needs when the service starts.
type Init = (Arc<Config>, Owner, mpsc::UnboundedReceiver<Msg>);

/// The supervisor as a pingora background service.
pub struct Supervisor {
    handle: SupervisorHandle,
    init: std::sync::Mutex<Option<Init>>,
    /// Called once every initial instance is ready (or failed): systemd READY=1.
    on_ready: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Called after a graceful shutdown finished (every instance stopped).
    on_stopped: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    watch: std::sync::atomic::AtomicBool,
}

impl Supervisor {
    /// Sets up the owner (cgroup tree, logs directory) now, so that a failure is a startup
    /// error; its task starts with the service.
    pub fn new(config: Arc<Config>, routes: Arc<RouteHandle>) -> Result<Supervisor, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = SupervisorHandle {
            tx,
            tls_reloader: Default::default(),
            locks: Default::default(),
            reload_lock: Default::default(),
        };
        let owner = Owner::new(config.clone(), routes, handle.clone())?;
        Ok(Supervisor {
            handle,
            init: std::sync::Mutex::new(Some((config, owner, rx))),
            on_ready: std::sync::Mutex::new(None),
            on_stopped: std::sync::Mutex::new(None),
            watch: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Development hot reload (`run --watch`).
    pub fn set_watch(&self, on: bool) {
        self.watch.store(on, Ordering::Relaxed);
    }

    pub fn handle(&self) -> SupervisorHandle {
        self.handle.clone()
    }

    pub fn on_ready(&self, f: impl FnOnce() + Send + 'static) {
        *self.on_ready.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }

    pub fn on_stopped(&self, f: impl FnOnce() + Send + 'static) {
        *self.on_stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Supervisor {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: pingora::server::ShutdownWatch,
        ready_notifier: pingora::services::ServiceReadyNotifier,
    ) {
        let Some((config, owner, rx)) = self.init.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return;
        };
        let handle = self.handle.clone();
        let on_ready = self
            .on_ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let on_stopped = self
            .on_stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let owner_task = tokio::spawn(owner.run(rx));
        let watch = self.watch.load(Ordering::Relaxed);
        // Initial start: every worker to its desired count, in parallel.
        let h = handle.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for w in config.workers.values() {
                let h = h.clone();
                let w = w.clone();
                tasks.push(tokio::spawn(async move {
                    let r = deploy::boot(&h, &w.name).await;
                    if let Err(e) = &r {
                        tracing::error!(worker = %w.name, error = %e, "initial start failed");
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            tracing::info!("all workers started");
            ready_notifier.notify_ready();
            if let Some(f) = on_ready {
                f();
            }
            if watch {
                devwatch::run(h).await;
            }
        });
        // Ticks for stats, recycling and standby expiry.
        let h = handle.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_secs(1));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                if h.tx.send(Msg::Tick).is_err() {
                    return;
                }
            }
        });
        let _ = shutdown.changed().await;
        tracing::info!("graceful shutdown: draining and stopping every instance");
        handle.shutdown().await;
        let _ = owner_task.await;
        if let Some(f) = on_stopped {
            f();
        }
    }
}

pub use crate::config::{check_worker, check_workers};
