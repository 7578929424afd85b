//! The supervisor: the single owner of all instance state.
//!
//! One task (the *owner*, [`Owner::run`]) holds every worker and instance record, the port
//! pool and the cgroup driver, and is the only writer of the route table. Everything else
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
pub mod health;
pub mod instance;
pub mod logs;
pub mod ports;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, mpsc, oneshot, watch};

use crate::config::{Config, Namespace, SeccompSetting, Strategy, WorkerConfig};
use crate::metrics::{METRICS, WorkerMetrics};
use crate::routes::{
    Backend, BackendSettings, Instance, Route, RouteHandle, RouteTable, WorkerShared,
};
use crate::sandbox::cgroup::{self, CgroupDriver, CgroupLimits, InstanceCgroup, IoLimit};
use crate::sandbox::{
    Credentials, LandlockSpec, MountSpec, NamespaceSpec, RlimitSpec, SeccompSpec, SpawnSpec,
    Spawner,
};
use instance::{Ctl, Fact, Launch};
use logs::{Tail, WorkerLog};
use ports::PortPool;
use status::{InstanceStatus, Outcome, StandbyStatus, StatusReport, WorkerStatus};

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

// ---------------------------------------------------------------------------------------------
// The owner
// ---------------------------------------------------------------------------------------------

struct Record {
    id: u64,
    generation: u64,
    config: Arc<WorkerConfig>,
    role: Role,
    state: State,
    port: Option<u16>,
    pid: Option<u32>,
    shared: Arc<Instance>,
    /// Published in the route table (once ready).
    routed: bool,
    publish_on_ready: bool,
    ctl: Option<mpsc::UnboundedSender<Ctl>>,
    phase: watch::Sender<Phase>,
    /// Incremented per process of this record; stale facts are ignored.
    epoch: u64,
    restarts: u32,
    /// Consecutive failures (crash, failed start), for backoff and crashloop.
    failures: u32,
    started_at: Instant,
    ready_at: Option<Instant>,
    last_exit: Option<String>,
    cgroup: Option<Arc<InstanceCgroup>>,
    tail: Tail,
    /// A recycle of this instance is underway.
    recycling: bool,
    /// Remove the record when the process exits (no restart).
    remove_on_exit: bool,
    failed_start: bool,
    stats: InstanceStats,
}

#[derive(Debug, Default, Clone, Copy)]
struct InstanceStats {
    memory: Option<u64>,
    cpu_seconds: Option<f64>,
}

struct WorkerState {
    name: Arc<str>,
    config: Arc<WorkerConfig>,
    generation: u64,
    next_generation: u64,
    desired: u32,
    previous: Option<(Arc<WorkerConfig>, u64)>,
    standby: Option<StandbyInfo>,
    records: BTreeMap<u64, Record>,
    next_id: u64,
    shared: Arc<WorkerShared>,
    log: WorkerLog,
    restarts: BTreeMap<Cause, u64>,
    removing: bool,
    busy: Option<String>,
}

/// Owner-only state.
struct Owner {
    config: Arc<Config>,
    workers: BTreeMap<String, WorkerState>,
    ports: PortPool,
    routes: Arc<RouteHandle>,
    handle: SupervisorHandle,
    cgroups: Option<Arc<CgroupDriver>>,
    spawner: Spawner,
    table_version: u64,
    started: Instant,
    shutting_down: bool,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    stopping_all: bool,
    ready: bool,
}

/// What the owner task needs when the service starts.
type Init = (Arc<Config>, mpsc::UnboundedReceiver<Msg>, Arc<RouteHandle>);

/// The supervisor as a pingora background service.
pub struct Supervisor {
    handle: SupervisorHandle,
    init: std::sync::Mutex<Option<Init>>,
    /// Called once every initial instance is ready (or failed): systemd READY=1.
    on_ready: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Called after a graceful shutdown finished: flush and exit the process.
    on_stopped: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    watch: std::sync::atomic::AtomicBool,
}

impl Supervisor {
    pub fn new(config: Arc<Config>, routes: Arc<RouteHandle>) -> Supervisor {
        let (tx, rx) = mpsc::unbounded_channel();
        Supervisor {
            handle: SupervisorHandle {
                tx,
                tls_reloader: Default::default(),
                locks: Default::default(),
                reload_lock: Default::default(),
            },
            init: std::sync::Mutex::new(Some((config, rx, routes))),
            on_ready: std::sync::Mutex::new(None),
            on_stopped: std::sync::Mutex::new(None),
            watch: std::sync::atomic::AtomicBool::new(false),
        }
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
        let Some((config, rx, routes)) = self.init.lock().unwrap_or_else(|p| p.into_inner()).take()
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
        let owner = match Owner::new(config.clone(), routes, handle.clone()) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "supervisor cannot start");
                ready_notifier.notify_ready();
                return;
            }
        };
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
        // SIGHUP = reload.
        let h = handle.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                let o = h.request(Request::Reload).await;
                for l in &o.lines {
                    tracing::info!(worker = %l.worker, ok = l.ok, "{}", l.message);
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

impl Owner {
    fn new(
        config: Arc<Config>,
        routes: Arc<RouteHandle>,
        handle: SupervisorHandle,
    ) -> Result<Owner, String> {
        let cgroups = setup_cgroups(&config);
        std::fs::create_dir_all(&config.logs_dir)
            .map_err(|e| format!("cannot create {}: {e}", config.logs_dir.display()))?;
        Ok(Owner {
            ports: PortPool::new(config.ports.clone()),
            config,
            workers: BTreeMap::new(),
            routes,
            handle,
            cgroups,
            spawner: Spawner::current(),
            table_version: 0,
            started: Instant::now(),
            shutting_down: false,
            shutdown_waiters: Vec::new(),
            stopping_all: false,
            ready: false,
        })
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let workers: Vec<Arc<WorkerConfig>> = self.config.workers.values().cloned().collect();
        for w in workers {
            if let Err(e) = self.add_worker(w.clone()) {
                tracing::error!(worker = %w.name, error = %e, "cannot add worker");
            }
        }
        self.publish();
        while let Some(msg) = rx.recv().await {
            self.handle_msg(msg);
            if self.stopping_all && self.workers.values().all(|w| w.records.is_empty()) {
                for w in self.workers.values() {
                    w.log.close_and_wait(Duration::from_secs(2));
                }
                if let Some(cg) = &self.cgroups
                    && let Err(e) = cg.remove()
                {
                    tracing::warn!(error = %e, "cgroup parent not removed");
                }
                tracing::info!("every instance stopped");
                for w in self.shutdown_waiters.drain(..) {
                    let _ = w.send(());
                }
                return;
            }
        }
    }

    fn handle_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Msg::Request(req, reply) => {
                if self.shutting_down {
                    let _ = reply.send(Outcome::single("-", Err(GONE.into())));
                    return;
                }
                let h = self.handle.clone();
                tokio::spawn(async move {
                    let o = deploy::run_request(&h, req).await;
                    let _ = reply.send(o);
                });
            }
            Msg::Instance {
                worker,
                id,
                epoch,
                fact,
            } => self.on_fact(&worker, id, epoch, fact),
            Msg::Start {
                worker,
                config,
                generation,
                role,
                publish,
                restarts,
                reply,
            } => {
                let r = self.start_new(&worker, config, generation, role, publish, restarts);
                let _ = reply.send(r);
            }
            Msg::Switch {
                worker,
                route,
                unroute,
                roles,
                reply,
            } => {
                self.switch(&worker, &route, &unroute, &roles);
                let _ = reply.send(());
            }
            Msg::Stop {
                worker,
                id,
                drain,
                reply,
            } => {
                let _ = reply.send(self.stop(&worker, id, drain));
            }
            Msg::View(worker, reply) => {
                let _ = reply.send(self.workers.get(&worker).map(view_of));
            }
            Msg::Commit {
                worker,
                commit,
                reply,
            } => {
                self.commit(&worker, commit);
                let _ = reply.send(());
            }
            Msg::AddWorker(config, reply) => {
                let r = self.add_worker(config);
                self.publish();
                let _ = reply.send(r);
            }
            Msg::RemoveWorker(name, reply) => {
                if let Some(w) = self.workers.get_mut(&name) {
                    w.removing = true;
                    let ids: Vec<u64> = w.records.keys().copied().collect();
                    for id in ids {
                        self.stop(&name, id, true);
                    }
                }
                self.publish();
                self.gc_workers();
                let _ = reply.send(());
            }
            Msg::SetConfig(c) => {
                self.ports.set_range(c.ports.clone());
                self.config = c;
            }
            Msg::Config(reply) => {
                let _ = reply.send(self.config.clone());
            }
            Msg::RestartDue { worker, id, epoch } => self.restart_in_place(&worker, id, epoch),
            Msg::DrainDone { worker, id, epoch } => {
                if let Some(r) = self.record_mut(&worker, id)
                    && r.epoch == epoch
                    && r.state == State::Draining
                {
                    r.state = State::Stopping;
                    r.phase.send_replace(Phase::Stopping);
                    if let Some(ctl) = &r.ctl {
                        let _ = ctl.send(Ctl::Stop {
                            timeout: r.config.stop_timeout,
                        });
                    }
                }
            }
            Msg::StandbyExpired { worker, generation } => {
                let ids = match self.workers.get_mut(&worker) {
                    Some(w)
                        if w.standby
                            .as_ref()
                            .is_some_and(|s| s.generation == generation) =>
                    {
                        w.standby.take().map(|s| s.ids).unwrap_or_default()
                    }
                    _ => Vec::new(),
                };
                for id in ids {
                    if self
                        .record(&worker, id)
                        .is_some_and(|r| r.role == Role::Standby)
                    {
                        tracing::info!(worker = %worker, instance = id, generation, "rollback window over: stopping standby instance");
                        self.stop(&worker, id, true);
                    }
                }
            }
            Msg::RecycleDone { worker, id } => {
                if let Some(r) = self.record_mut(&worker, id) {
                    r.recycling = false;
                }
            }
            Msg::Tick => self.tick(),
            Msg::Shutdown(reply) => {
                self.shutdown_waiters.push(reply);
                if !self.shutting_down {
                    self.shutting_down = true;
                    let instances: Vec<(Arc<Instance>, Duration)> = self
                        .workers
                        .values()
                        .flat_map(|w| w.records.values())
                        .map(|r| (r.shared.clone(), r.config.drain_timeout))
                        .collect();
                    let tx = self.handle.tx.clone();
                    tokio::spawn(async move {
                        let limit = instances.iter().map(|(_, d)| *d).max().unwrap_or_default();
                        let deadline = Instant::now() + limit;
                        while Instant::now() < deadline
                            && instances.iter().any(|(i, _)| i.in_flight() > 0)
                        {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        let _ = tx.send(Msg::AllDrained);
                    });
                }
            }
            Msg::AllDrained => {
                self.stopping_all = true;
                let all: Vec<(String, u64)> = self
                    .workers
                    .iter()
                    .flat_map(|(n, w)| w.records.keys().map(move |id| (n.clone(), *id)))
                    .collect();
                for (w, id) in all {
                    self.stop(&w, id, false);
                }
            }
        }
    }

    fn record(&self, worker: &str, id: u64) -> Option<&Record> {
        self.workers.get(worker).and_then(|w| w.records.get(&id))
    }

    fn record_mut(&mut self, worker: &str, id: u64) -> Option<&mut Record> {
        self.workers
            .get_mut(worker)
            .and_then(|w| w.records.get_mut(&id))
    }

    fn add_worker(&mut self, config: Arc<WorkerConfig>) -> Result<(), String> {
        let name = config.name.clone();
        if self.workers.get(&name).is_some_and(|w| !w.removing) {
            return Err(format!("worker `{name}` already exists"));
        }
        prepare_dirs(&config)?;
        let log = WorkerLog::open(
            &self.config.logs_dir,
            &name,
            self.config.log.worker_log_max_size,
            self.config.log.worker_log_keep,
        )
        .map_err(|e| {
            format!(
                "cannot open log for `{name}` in {}: {e}",
                self.config.logs_dir.display()
            )
        })?;
        for c in Cause::ALL {
            METRICS.restarts.with_label_values(&[&name, c.as_str()]);
        }
        let (records, next_id) = match self.workers.remove(&name) {
            // Re-added while its old instances were still stopping: keep them until they exit.
            Some(old) => (old.records, old.next_id),
            None => (BTreeMap::new(), 1),
        };
        self.workers.insert(
            name.clone(),
            WorkerState {
                name: name.as_str().into(),
                desired: config.instances,
                config,
                generation: 1,
                next_generation: 2,
                previous: None,
                standby: None,
                records,
                next_id,
                shared: Arc::new(WorkerShared {
                    cursor: AtomicUsize::new(0),
                    metrics: WorkerMetrics::new(&name),
                }),
                log,
                restarts: BTreeMap::new(),
                removing: false,
                busy: None,
            },
        );
        Ok(())
    }

    /// Drops workers that are being removed and have no instance left.
    fn gc_workers(&mut self) {
        let gone: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.removing && w.records.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            if let Some(w) = self.workers.remove(&n) {
                w.log.close();
                for st in [
                    "starting",
                    "ready",
                    "draining",
                    "stopping",
                    "exited",
                    "crashloop",
                ] {
                    let _ = METRICS.instances.remove_label_values(&[&n, st]);
                }
            }
        }
    }

    /// Starts a new record (new id).
    fn start_new(
        &mut self,
        worker: &str,
        config: Arc<WorkerConfig>,
        generation: u64,
        role: Role,
        publish: bool,
        restarts: u32,
    ) -> Result<(u64, watch::Receiver<Phase>), String> {
        if self.shutting_down {
            return Err(GONE.into());
        }
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| format!("no worker named `{worker}`"))?;
        if w.removing {
            return Err(format!("worker `{worker}` is being removed"));
        }
        let id = w.next_id;
        w.next_id += 1;
        let (phase, rx) = watch::channel(Phase::Starting);
        let placeholder = Arc::new(Instance::new(
            w.name.clone(),
            id,
            generation,
            SocketAddr::from(([127, 0, 0, 1], 0)),
        ));
        w.records.insert(
            id,
            Record {
                id,
                generation,
                config,
                role,
                state: State::Starting,
                port: None,
                pid: None,
                shared: placeholder,
                routed: false,
                publish_on_ready: publish,
                ctl: None,
                phase,
                epoch: 0,
                restarts,
                failures: 0,
                started_at: Instant::now(),
                ready_at: None,
                last_exit: None,
                cgroup: None,
                tail: Tail::default(),
                recycling: false,
                remove_on_exit: false,
                failed_start: false,
                stats: InstanceStats::default(),
            },
        );
        if let Err(e) = self.spawn_record(worker, id) {
            if let Some(w) = self.workers.get_mut(worker) {
                w.records.remove(&id);
            }
            return Err(e);
        }
        Ok((id, rx))
    }

    /// Starts (or restarts) the process of an existing record.
    fn spawn_record(&mut self, worker: &str, id: u64) -> Result<(), String> {
        let tx = self.handle.tx.clone();
        let run_dir = self.config.run_dir.clone();
        let conf_dir = self
            .config
            .file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let logs_dir = self.config.logs_dir.clone();
        let others: Vec<Arc<WorkerConfig>> = self
            .workers
            .iter()
            .filter(|(n, _)| n.as_str() != worker)
            .map(|(_, w)| w.config.clone())
            .collect();
        let cgroups = self.cgroups.clone();
        let Some(w) = self.workers.get_mut(worker) else {
            return Err(format!("no worker named `{worker}`"));
        };
        let log = w.log.clone();
        let wname = w.name.clone();
        let Some(r) = w.records.get_mut(&id) else {
            return Err(format!("no instance {id}"));
        };
        let config = r.config.clone();
        let (port, listener) = self
            .ports
            .allocate(config.passes_socket())
            .ok_or_else(|| "no free port in the worker port range".to_string())?;
        r.epoch += 1;
        let epoch = r.epoch;
        let cgroup = match &cgroups {
            Some(driver) => {
                let limits = cgroup_limits(&config);
                match driver.create(&format!("{worker}.{id}.{epoch}"), &limits) {
                    Ok(cg) => Some(Arc::new(cg)),
                    Err(e) if config.resources.needs_cgroup() => {
                        self.ports.release(port);
                        return Err(format!("cannot create cgroup: {e}"));
                    }
                    Err(e) => {
                        tracing::warn!(worker, instance = id, error = %e, "no cgroup for instance");
                        None
                    }
                }
            }
            None => None,
        };
        let spec = build_spec(
            &config,
            id,
            r.generation,
            port,
            cgroup.as_deref(),
            &others,
            &[run_dir, conf_dir, logs_dir],
        );
        r.shared = Arc::new(Instance::new(
            wname.clone(),
            id,
            r.generation,
            SocketAddr::from(([127, 0, 0, 1], port)),
        ));
        r.port = Some(port);
        r.pid = None;
        r.state = State::Starting;
        r.started_at = Instant::now();
        r.ready_at = None;
        r.failed_start = false;
        r.tail = Tail::default();
        r.cgroup = cgroup.clone();
        r.stats = InstanceStats::default();
        r.phase.send_replace(Phase::Starting);
        let launch = Launch {
            worker: wname,
            id,
            generation: r.generation,
            port,
            listener,
            config,
            spec,
            cgroup: cgroup.clone(),
            log,
            tail: r.tail.clone(),
            epoch,
        };
        match instance::launch(&self.spawner, launch, tx) {
            Ok(ctl) => {
                r.ctl = Some(ctl);
                tracing::info!(
                    worker,
                    instance = id,
                    port,
                    generation = r.generation,
                    "starting"
                );
                Ok(())
            }
            Err(e) => {
                self.ports.release(port);
                if let Some(cg) = cgroup {
                    let _ = cg.remove();
                }
                r.ctl = None;
                Err(e)
            }
        }
    }

    fn on_fact(&mut self, worker: &str, id: u64, epoch: u64, fact: Fact) {
        let shutting_down = self.shutting_down;
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        let wlog = w.log.clone();
        let Some(r) = w.records.get_mut(&id) else {
            return;
        };
        if r.epoch != epoch {
            return;
        }
        match fact {
            Fact::Spawned { pid } => r.pid = Some(pid),
            Fact::Ready { after } => {
                if r.state != State::Starting {
                    return;
                }
                r.state = State::Ready;
                r.ready_at = Some(Instant::now());
                tracing::info!(
                    worker,
                    instance = id,
                    port = r.port,
                    ms = after.as_millis() as u64,
                    "ready"
                );
                wlog.event(id, &format!("ready after {} ms", after.as_millis()));
                if r.publish_on_ready && !shutting_down {
                    r.routed = true;
                }
                r.phase.send_replace(Phase::Ready);
                self.publish();
            }
            Fact::StartFailed { reason } => {
                if r.failed_start {
                    return;
                }
                r.failed_start = true;
                tracing::warn!(worker, instance = id, %reason, "start failed");
                r.last_exit = Some(reason.clone());
                r.phase.send_replace(Phase::Failed { reason });
                if let Some(ctl) = &r.ctl {
                    let _ = ctl.send(Ctl::Kill);
                }
            }
            Fact::Unhealthy { reason } => {
                if r.state != State::Ready || r.role == Role::Retiring {
                    return;
                }
                tracing::warn!(worker, instance = id, %reason, "unhealthy: replacing");
                wlog.event(id, &format!("unhealthy: {reason}; replacing"));
                r.last_exit = Some(format!("unhealthy: {reason}"));
                let (config, generation, restarts, role) =
                    (r.config.clone(), r.generation, r.restarts, r.role);
                // Out of the route table now; a hung process gets SIGTERM and then SIGKILL.
                self.stop(worker, id, false);
                self.count_restart(worker, Cause::Liveness);
                if role == Role::Serving
                    && let Err(e) = self.start_new(
                        worker,
                        config,
                        generation,
                        Role::Serving,
                        true,
                        restarts + 1,
                    )
                {
                    tracing::error!(worker, error = %e, "cannot start replacement");
                }
            }
            Fact::Exited {
                status,
                crashed,
                oom_kills,
            } => {
                if let Some(p) = r.port.take() {
                    self.ports.release(p);
                }
                r.pid = None;
                r.ctl = None;
                r.cgroup = None;
                let was_routed = r.routed;
                r.routed = false;
                r.shared.routed.store(false, Ordering::SeqCst);
                METRICS.forget_instance(worker, &id.to_string());
                let restart = r.role == Role::Serving && !r.remove_on_exit && !shutting_down;
                if !restart {
                    r.phase.send_replace(Phase::Exited {
                        reason: status.clone(),
                    });
                    w.records.remove(&id);
                    if was_routed {
                        self.publish();
                    }
                    self.gc_workers();
                    return;
                }
                // A serving instance died on its own: restart in place after a backoff.
                let cause = if oom_kills > 0 {
                    Cause::Memory
                } else {
                    Cause::Crash
                };
                let lived = r.ready_at.map(|t| t.elapsed());
                if lived.is_some_and(|l| l >= r.config.restart.reset_after) {
                    r.failures = 0;
                }
                r.failures += 1;
                let policy = &r.config.restart;
                let exp = (r.failures - 1).min(16);
                let backoff = policy
                    .backoff
                    .saturating_mul(1 << exp)
                    .min(policy.backoff_max);
                r.state = if r.failures >= policy.crashloop_after {
                    State::Crashloop
                } else {
                    State::Exited
                };
                let status = if oom_kills > 0 {
                    format!("{status} (out of memory)")
                } else {
                    status
                };
                r.last_exit = Some(status.clone());
                r.phase.send_replace(Phase::Exited {
                    reason: status.clone(),
                });
                let _ = crashed;
                tracing::warn!(worker, instance = id, %status, failures = r.failures, backoff_ms = backoff.as_millis() as u64, state = r.state.as_str(), "instance exited: restarting");
                wlog.event(
                    id,
                    &format!(
                        "{status}; restarting in {} ms ({} consecutive failures)",
                        backoff.as_millis(),
                        r.failures
                    ),
                );
                let tx = self.handle.tx.clone();
                let worker_s = worker.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep(backoff).await;
                    let _ = tx.send(Msg::RestartDue {
                        worker: worker_s,
                        id,
                        epoch,
                    });
                });
                self.count_restart(worker, cause);
                if was_routed {
                    self.publish();
                }
            }
        }
    }

    fn restart_in_place(&mut self, worker: &str, id: u64, epoch: u64) {
        if self.shutting_down {
            return;
        }
        let Some(r) = self.record_mut(worker, id) else {
            return;
        };
        if r.epoch != epoch || r.state.has_process() || r.role != Role::Serving || r.remove_on_exit
        {
            return;
        }
        r.restarts += 1;
        r.publish_on_ready = true;
        if let Err(e) = self.spawn_record(worker, id) {
            tracing::error!(worker, instance = id, error = %e, "restart failed; retrying");
            let Some(r) = self.record_mut(worker, id) else {
                return;
            };
            r.last_exit = Some(e);
            r.failures += 1;
            let backoff = r.config.restart.backoff_max;
            let epoch = r.epoch;
            let tx = self.handle.tx.clone();
            let worker_s = worker.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(backoff).await;
                let _ = tx.send(Msg::RestartDue {
                    worker: worker_s,
                    id,
                    epoch,
                });
            });
        }
    }

    fn count_restart(&mut self, worker: &str, cause: Cause) {
        if let Some(w) = self.workers.get_mut(worker) {
            *w.restarts.entry(cause).or_default() += 1;
        }
        METRICS
            .restarts
            .with_label_values(&[worker, cause.as_str()])
            .inc();
    }

    fn switch(&mut self, worker: &str, route: &[u64], unroute: &[u64], roles: &[(u64, Role)]) {
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        for (id, role) in roles {
            if let Some(r) = w.records.get_mut(id) {
                r.role = *role;
            }
        }
        for id in unroute {
            if let Some(r) = w.records.get_mut(id) {
                r.routed = false;
                r.publish_on_ready = false;
                r.shared.routed.store(false, Ordering::SeqCst);
            }
        }
        for id in route {
            if let Some(r) = w.records.get_mut(id) {
                r.routed = true;
                r.publish_on_ready = true;
            }
        }
        self.publish();
    }

    /// Unroutes an instance, drains it (optionally) and stops it; the record goes when the
    /// process exits. Never signals an instance that is still in the route table.
    fn stop(&mut self, worker: &str, id: u64, drain: bool) -> Option<watch::Receiver<Phase>> {
        let tx = self.handle.tx.clone();
        let w = self.workers.get_mut(worker)?;
        let r = w.records.get_mut(&id)?;
        let rx = r.phase.subscribe();
        r.role = Role::Retiring;
        r.remove_on_exit = true;
        let was_routed = r.routed;
        r.routed = false;
        r.publish_on_ready = false;
        r.shared.routed.store(false, Ordering::SeqCst);
        match r.state {
            State::Exited | State::Crashloop => {
                // No process: nothing to stop.
                r.phase.send_replace(Phase::Exited {
                    reason: "stopped".into(),
                });
                w.records.remove(&id);
                if was_routed {
                    self.publish();
                }
                self.gc_workers();
                return Some(rx);
            }
            State::Stopping => {}
            State::Draining if drain => {}
            State::Ready if drain => {
                r.state = State::Draining;
                r.phase.send_replace(Phase::Draining);
                let inst = r.shared.clone();
                let timeout = r.config.drain_timeout;
                let epoch = r.epoch;
                let worker_s = worker.to_string();
                tokio::spawn(async move {
                    let deadline = Instant::now() + timeout;
                    while inst.in_flight() > 0 && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let _ = tx.send(Msg::DrainDone {
                        worker: worker_s,
                        id,
                        epoch,
                    });
                });
            }
            _ => {
                r.state = State::Stopping;
                r.phase.send_replace(Phase::Stopping);
                if let Some(ctl) = &r.ctl {
                    let _ = ctl.send(Ctl::Stop {
                        timeout: r.config.stop_timeout,
                    });
                }
            }
        }
        if was_routed {
            self.publish();
        }
        Some(rx)
    }

    fn commit(&mut self, worker: &str, c: Commit) {
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if let Some((config, generation)) = c.config {
            w.config = config;
            w.generation = generation;
            w.next_generation = w.next_generation.max(generation + 1);
        }
        if let Some(d) = c.desired {
            w.desired = d;
        }
        if let Some(p) = c.previous {
            w.previous = p;
        }
        if let Some(b) = c.busy {
            w.busy = b;
        }
        if let Some(s) = c.standby {
            if let Some(info) = &s {
                let tx = self.handle.tx.clone();
                let worker_s = worker.to_string();
                let generation = info.generation;
                let wait = info.until.saturating_duration_since(Instant::now());
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(Msg::StandbyExpired {
                        worker: worker_s,
                        generation,
                    });
                });
            }
            w.standby = s;
        }
        for (cause, n) in c.count_restarts {
            *w.restarts.entry(cause).or_default() += n;
            METRICS
                .restarts
                .with_label_values(&[worker, cause.as_str()])
                .inc_by(n);
        }
        self.publish();
    }

    /// Builds and stores a new route table from the records (one store).
    fn publish(&mut self) {
        self.table_version += 1;
        let mut table = RouteTable::new(self.table_version);
        for w in self.workers.values() {
            if w.removing {
                continue;
            }
            let mut instances = Vec::new();
            for r in w.records.values() {
                if r.routed && r.state == State::Ready {
                    r.shared.routed.store(true, Ordering::SeqCst);
                    instances.push(r.shared.clone());
                }
            }
            let c = &w.config;
            let backend = Arc::new(Backend {
                worker: w.name.clone(),
                instances,
                settings: BackendSettings {
                    connect_timeout: c.connect_timeout,
                    read_timeout: c.read_timeout,
                    queue_timeout: c.queue_timeout,
                    idle_timeout: self.config.proxy.upstream_idle_timeout,
                },
                shared: w.shared.clone(),
            });
            for spec in &c.routes {
                table.add(
                    spec.host.as_deref(),
                    Route {
                        prefix: spec.prefix.as_str().into(),
                        strip_prefix: spec.strip_prefix,
                        backend: backend.clone(),
                    },
                );
            }
        }
        self.routes.store(table);
    }

    /// Once a second: resource usage, recycling, gauges.
    fn tick(&mut self) {
        let proc_stats = ProcStats::read_if_needed(
            self.workers
                .values()
                .flat_map(|w| w.records.values())
                .any(|r| r.cgroup.is_none() && r.pid.is_some()),
        );
        let mut recycle: Vec<(String, u64, Cause)> = Vec::new();
        for (name, w) in self.workers.iter_mut() {
            let mut counts: BTreeMap<&'static str, i64> = BTreeMap::new();
            for st in [
                "starting",
                "ready",
                "draining",
                "stopping",
                "exited",
                "crashloop",
            ] {
                counts.insert(st, 0);
            }
            for r in w.records.values_mut() {
                *counts.entry(r.state.as_str()).or_default() += 1;
                if let Some(pid) = r.pid {
                    let (mem, cpu) = match &r.cgroup {
                        Some(cg) => (cg.memory_current(), cg.cpu_usage().map(|d| d.as_secs_f64())),
                        None => proc_stats.as_ref().map_or((None, None), |p| p.session(pid)),
                    };
                    r.stats = InstanceStats {
                        memory: mem,
                        cpu_seconds: cpu,
                    };
                    let label = r.id.to_string();
                    if let Some(m) = mem {
                        METRICS
                            .instance_memory
                            .with_label_values(&[name, &label])
                            .set(m as i64);
                    }
                    if let Some(c) = cpu {
                        METRICS
                            .instance_cpu
                            .with_label_values(&[name, &label])
                            .set(c);
                    }
                }
                if r.state == State::Ready
                    && r.role == Role::Serving
                    && !r.recycling
                    && !r.remove_on_exit
                {
                    if r.config.max_requests > 0
                        && r.shared.requests.load(Ordering::Relaxed) >= r.config.max_requests
                    {
                        recycle.push((name.clone(), r.id, Cause::MaxRequests));
                    } else if let (Some(limit), Some(mem)) =
                        (r.config.recycle_memory, r.stats.memory)
                        && mem >= limit
                    {
                        recycle.push((name.clone(), r.id, Cause::Memory));
                    }
                }
            }
            for (st, n) in counts {
                METRICS.instances.with_label_values(&[name, st]).set(n);
            }
            let in_flight: u64 = w.records.values().map(|r| r.shared.in_flight()).sum();
            METRICS
                .in_flight
                .with_label_values(&[name])
                .set(in_flight as i64);
        }
        for (worker, id, cause) in recycle {
            if let Some(r) = self.record_mut(&worker, id) {
                r.recycling = true;
            }
            let h = self.handle.clone();
            tokio::spawn(async move {
                deploy::recycle(&h, &worker, id, cause).await;
                h.send(Msg::RecycleDone { worker, id });
            });
        }
    }

    fn status(&self) -> StatusReport {
        let now = Instant::now();
        let workers = self
            .workers
            .values()
            .map(|w| {
                let mut routed_generations: Vec<u64> = w
                    .records
                    .values()
                    .filter(|r| r.routed && r.state == State::Ready)
                    .map(|r| r.generation)
                    .collect();
                routed_generations.sort_unstable();
                routed_generations.dedup();
                let instances: Vec<InstanceStatus> = w
                    .records
                    .values()
                    .map(|r| InstanceStatus {
                        id: r.id,
                        pid: r.pid,
                        port: r.port,
                        state: r.state.as_str().to_string(),
                        generation: r.generation,
                        restarts: r.restarts,
                        routed: r.routed && r.state == State::Ready,
                        role: r.role.as_str().to_string(),
                        in_flight: r.shared.in_flight(),
                        requests: r.shared.requests.load(Ordering::Relaxed),
                        uptime_secs: r
                            .pid
                            .map(|_| now.duration_since(r.started_at).as_secs_f64()),
                        memory_bytes: r.stats.memory,
                        cpu_seconds: r.stats.cpu_seconds,
                        last_exit: r.last_exit.clone(),
                        cgroup: r.cgroup.as_ref().map(|c| c.path().display().to_string()),
                    })
                    .collect();
                let mut restarts: BTreeMap<String, u64> = Cause::ALL
                    .iter()
                    .map(|c| (c.as_str().to_string(), 0))
                    .collect();
                for (c, n) in &w.restarts {
                    restarts.insert(c.as_str().to_string(), *n);
                }
                WorkerStatus {
                    name: w.name.to_string(),
                    routes: w.config.routes.iter().map(|r| r.to_string()).collect(),
                    desired: w.desired,
                    generation: w.generation,
                    routed_generations,
                    strategy: w.config.deploy.strategy.to_string(),
                    standby: w.standby.as_ref().map(|s| StandbyStatus {
                        generation: s.generation,
                        instances: s.ids.clone(),
                        expires_in_secs: s.until.saturating_duration_since(now).as_secs_f64(),
                    }),
                    busy: if w.removing {
                        Some("removing".into())
                    } else {
                        w.busy.clone()
                    },
                    restarts,
                    in_flight: instances.iter().map(|i| i.in_flight).sum(),
                    requests: instances.iter().map(|i| i.requests).sum(),
                    instances,
                    log: w.log.path().display().to_string(),
                }
            })
            .collect();
        StatusReport {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: now.duration_since(self.started).as_secs_f64(),
            config: self.config.file.display().to_string(),
            listen: self.config.listen.iter().map(|a| a.to_string()).collect(),
            admin: self.config.admin.map(|a| a.to_string()),
            cgroups: self.cgroups.as_ref().map(|c| format!("v{}", c.version())),
            state: if self.shutting_down {
                "stopping"
            } else if self.ready
                || self
                    .workers
                    .values()
                    .all(|w| w.records.values().all(|r| r.state != State::Starting))
            {
                "running"
            } else {
                "starting"
            }
            .to_string(),
            workers,
        }
    }
}

fn view_of(w: &WorkerState) -> WorkerView {
    WorkerView {
        config: w.config.clone(),
        generation: w.generation,
        next_generation: w.next_generation,
        desired: w.desired,
        previous: w.previous.clone(),
        standby: w.standby.clone(),
        instances: w
            .records
            .values()
            .map(|r| InstanceView {
                id: r.id,
                restarts: r.restarts,
                generation: r.generation,
                state: r.state,
                role: r.role,
                routed: r.routed,
            })
            .collect(),
    }
}

fn setup_cgroups(config: &Config) -> Option<Arc<CgroupDriver>> {
    use crate::config::CgroupMode;
    let mode = config.cgroups.mode;
    if mode == CgroupMode::Off {
        return None;
    }
    let detected = cgroup::detect(&config.cgroups.root);
    let h = match (mode, detected) {
        (_, None) => {
            tracing::warn!(root = %config.cgroups.root.display(), "no usable cgroup hierarchy: instances run without cgroups (no resource limits)");
            return None;
        }
        (CgroupMode::V1, Some(h @ cgroup::Hierarchy::V1 { .. }))
        | (CgroupMode::V2, Some(h @ cgroup::Hierarchy::V2 { .. }))
        | (CgroupMode::Auto, Some(h)) => h,
        (m, Some(h)) => {
            tracing::warn!(wanted = ?m, found = ?h, "configured cgroup version not found; using what is there");
            h
        }
    };
    match CgroupDriver::new(h, &config.cgroups.base, &std::process::id().to_string()) {
        Ok(d) => {
            for s in d.cleanup_stale() {
                tracing::warn!(cgroup = %s, "removed a stale cgroup left by an earlier tqproxy");
            }
            tracing::info!(version = d.version(), "cgroups enabled");
            Some(Arc::new(d))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cgroups unavailable: instances run without resource limits");
            None
        }
    }
}

/// What only the sandbox can check before anything runs: seccomp profiles compile, landlock
/// is available, mount paths make sense, and there is a cgroup hierarchy for the configured
/// limits. Used by `tqproxy check` and by reload/deploy before they change anything.
pub fn check_worker(config: &Config, w: &WorkerConfig) -> Result<(), String> {
    use crate::config::CgroupMode;
    let others: Vec<Arc<WorkerConfig>> = config
        .workers
        .values()
        .filter(|o| o.name != w.name)
        .cloned()
        .collect();
    let conf_dir = config
        .file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let private = [config.run_dir.clone(), conf_dir, config.logs_dir.clone()];
    let spec = build_spec(w, 1, 1, *config.ports.start(), None, &others, &private);
    crate::sandbox::check_spec(&spec).map_err(|e| format!("sandbox: {e}"))?;
    if w.resources.needs_cgroup() {
        if config.cgroups.mode == CgroupMode::Off {
            return Err(
                "resources: memory/cpu/pids/io limits need cgroups, but cgroups.mode is off".into(),
            );
        }
        match (config.cgroups.mode, cgroup::detect(&config.cgroups.root)) {
            (_, None) => {
                return Err(format!(
                    "resources: limits need cgroups, and there is no usable cgroup hierarchy at {}",
                    config.cgroups.root.display()
                ));
            }
            (CgroupMode::V1, Some(cgroup::Hierarchy::V2 { .. })) => {
                return Err("resources: cgroups.mode is v1 but the hierarchy is v2".into());
            }
            (CgroupMode::V2, Some(cgroup::Hierarchy::V1 { .. })) => {
                return Err("resources: cgroups.mode is v2 but the hierarchy is v1".into());
            }
            (_, Some(h)) => {
                let r = &w.resources;
                let needed = [
                    ("memory", r.memory.is_some() || r.memory_high.is_some()),
                    ("cpu", r.cpu.is_some() || r.cpu_weight.is_some()),
                    ("pids", r.pids.is_some()),
                    (
                        if matches!(h, cgroup::Hierarchy::V1 { .. }) {
                            "blkio"
                        } else {
                            "io"
                        },
                        r.io.is_some(),
                    ),
                ];
                let available: Vec<String> = match &h {
                    cgroup::Hierarchy::V2 { root } => {
                        std::fs::read_to_string(root.join("cgroup.controllers"))
                            .unwrap_or_default()
                            .split_whitespace()
                            .map(str::to_string)
                            .collect()
                    }
                    cgroup::Hierarchy::V1 { root } => needed
                        .iter()
                        .filter(|(c, _)| root.join(c).is_dir())
                        .map(|(c, _)| c.to_string())
                        .collect(),
                };
                for (controller, wanted) in needed {
                    if wanted && !available.iter().any(|a| a == controller) {
                        return Err(format!(
                            "resources: the `{controller}` cgroup controller is not available in {}",
                            config.cgroups.root.display()
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Checks every worker of a configuration (see [`check_worker`]); one message per problem.
pub fn check_workers(config: &Config) -> Vec<String> {
    config
        .workers
        .values()
        .filter_map(|w| {
            check_worker(config, w)
                .err()
                .map(|e| format!("{}: {e}", w.file.display()))
        })
        .collect()
}

/// Creates the worker's `read_write` directories, owned by its user, mode 0700.
fn prepare_dirs(config: &WorkerConfig) -> Result<(), String> {
    for d in &config.sandbox.read_write {
        if !d.exists() {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
        }
        if let Some((uid, gid)) = config.sandbox.user.ids() {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(|e| format!("cannot chown {} to {uid}:{gid}: {e}", d.display()))?;
        }
    }
    Ok(())
}

fn cgroup_limits(c: &WorkerConfig) -> CgroupLimits {
    let r = &c.resources;
    CgroupLimits {
        memory_max: r.memory,
        memory_high: r.memory_high,
        cpu_cores: r.cpu,
        cpu_weight: r.cpu_weight,
        pids_max: r.pids,
        io: r
            .io
            .iter()
            .map(|io| IoLimit {
                device: io.numbers,
                read_bps: io.read_bps,
                write_bps: io.write_bps,
                read_iops: io.read_iops,
                write_iops: io.write_iops,
            })
            .collect(),
    }
}

/// Whether `p` is `q` or inside it.
fn within(p: &Path, q: &Path) -> bool {
    p.starts_with(q)
}

/// The spawn spec of one instance: environment, limits and sandbox.
fn build_spec(
    c: &WorkerConfig,
    id: u64,
    generation: u64,
    port: u16,
    cgroup: Option<&InstanceCgroup>,
    others: &[Arc<WorkerConfig>],
    private_dirs: &[PathBuf],
) -> SpawnSpec {
    let mut env: Vec<(String, String)> =
        c.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.push(("PORT".into(), port.to_string()));
    env.push(("WORKER_PORT".into(), port.to_string()));
    env.push(("WORKER_NAME".into(), c.name.clone()));
    env.push(("WORKER_INSTANCE".into(), id.to_string()));
    env.push(("WORKER_GENERATION".into(), generation.to_string()));
    let sb = &c.sandbox;
    let mount = sb.has(Namespace::Mount) || sb.has(Namespace::Pid);
    let mut mounts = MountSpec::default();
    if mount {
        // What this worker needs to see: its own directory, program, cwd and paths.
        let own: Vec<&Path> = [c.dir.as_path(), c.program.as_path(), c.cwd.as_path()]
            .into_iter()
            .chain(sb.read_write.iter().map(PathBuf::as_path))
            .chain(sb.read_only.iter().map(PathBuf::as_path))
            .collect();
        let mut hide: Vec<PathBuf> = Vec::new();
        let candidates = others
            .iter()
            .flat_map(|o| {
                std::iter::once(o.dir.clone()).chain(o.sandbox.read_write.iter().cloned())
            })
            .chain(private_dirs.iter().cloned());
        for h in candidates {
            // Never hide something this worker needs (or a parent of it).
            if own.iter().any(|p| within(p, &h)) || hide.contains(&h) {
                continue;
            }
            hide.push(h);
        }
        mounts = MountSpec {
            read_only_root: sb.read_only_root,
            private_tmp: sb.private_tmp,
            read_write: sb.read_write.clone(),
            read_only: sb.read_only.clone(),
            hide,
        };
    }
    SpawnSpec {
        program: c.program.clone(),
        args: c.args.clone(),
        env,
        cwd: c.cwd.clone(),
        cgroup_procs: cgroup.map(|cg| cg.procs_files()).unwrap_or_default(),
        rlimits: RlimitSpec {
            open_files: c.resources.open_files,
            core: c.resources.core,
            address_space: c.resources.address_space,
            file_size: c.resources.file_size,
        },
        namespaces: NamespaceSpec {
            mount,
            pid: sb.has(Namespace::Pid),
            ipc: sb.has(Namespace::Ipc),
            uts: sb.has(Namespace::Uts),
            net: sb.has(Namespace::Net),
            user: sb.has(Namespace::User),
        },
        hostname: sb.has(Namespace::Uts).then(|| format!("{}-{id}", c.name)),
        mounts,
        credentials: sb.user.ids().map(|(uid, gid)| Credentials { uid, gid }),
        landlock: sb.landlock.then(|| LandlockSpec {
            read_write: sb.read_write.clone(),
            read_only: sb
                .read_only
                .iter()
                .cloned()
                .chain([c.dir.clone(), c.cwd.clone()])
                .chain(c.program.parent().map(Path::to_path_buf))
                .collect(),
        }),
        seccomp: match &sb.seccomp {
            SeccompSetting::Off => SeccompSpec::Off,
            SeccompSetting::Default => SeccompSpec::Default,
            SeccompSetting::Profile(p) => SeccompSpec::Profile(p.clone()),
        },
        listen_fd: c.passes_socket(),
    }
}

/// Memory and CPU of process sessions from /proc, for instances without a cgroup.
struct ProcStats {
    /// session id → (rss bytes, cpu seconds)
    sessions: HashMap<u32, (u64, f64)>,
}

impl ProcStats {
    fn read_if_needed(needed: bool) -> Option<ProcStats> {
        if !needed {
            return None;
        }
        let page = 4096u64;
        let ticks = 100.0f64;
        let mut sessions: HashMap<u32, (u64, f64)> = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return None;
        };
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command name (which may contain spaces) start after ") ".
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            // rest[0] = state (field 3); session = field 6; utime = 14; stime = 15; rss = 24
            let (Some(sid), Some(ut), Some(stt), Some(rss)) = (
                f.get(3).and_then(|s| s.parse::<u32>().ok()),
                f.get(11).and_then(|s| s.parse::<u64>().ok()),
                f.get(12).and_then(|s| s.parse::<u64>().ok()),
                f.get(21).and_then(|s| s.parse::<u64>().ok()),
            ) else {
                continue;
            };
            let entry = sessions.entry(sid).or_default();
            entry.0 += rss * page;
            entry.1 += (ut + stt) as f64 / ticks;
        }
        Some(ProcStats { sessions })
    }

    fn session(&self, pid: u32) -> (Option<u64>, Option<f64>) {
        match self.sessions.get(&pid) {
            Some((m, c)) => (Some(*m), Some(*c)),
            None => (None, None),
        }
    }
}
