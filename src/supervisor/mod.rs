//! The supervisor: the single owner of all instance state.
//!
//! It reads as three layers:
//!
//! - **the rules** ([`lifecycle`]): every worker and instance record, what each event and
//!   command does to them, and the effects that follow; pure (no I/O, no tokio, no
//!   globals), so every rule has a unit test that runs in microseconds. Whether an instance
//!   may be signalled now is [`InstanceState::can_signal`].
//! - **the driver** (`owner.rs`): one task that performs the effects (spawn through the
//!   sandbox, signal, publish the route table, timers, drain watches) and turns what happens
//!   back into events. It is the only writer of the route table.
//! - **orchestrations** ([`deploy`]: scale, rolling and blue/green deploys, rollback, reload,
//!   recycle): async tasks that carry out the pure plans of [`lifecycle`] through
//!   [`SupervisorHandle`] primitives, one at a time per worker.
//!
//! Plumbing around them: instance monitors ([`instance`]) report facts (spawned, ready,
//! unhealthy, exited); [`health`] probes; [`ports`], [`sockets`], [`logs`], `spec` (the
//! sandbox spec of an instance), `stats`.

pub mod deploy;
pub mod devwatch;
pub mod error;
pub mod health;
pub mod instance;
pub mod lifecycle;
pub mod logs;
pub mod notify;
mod owner;
pub mod ports;
pub mod sockets;
mod spec;
mod stats;
pub use crate::status;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, mpsc, oneshot, watch};

use crate::config::{Config, Strategy, WorkerConfig};
use crate::routes::RouteHandle;
pub use error::{ErrorKind, SupervisorError};
use instance::Fact;
pub use lifecycle::{
    CanaryState, Commit, InstanceState, InstanceView, OnReady, StandbyInfo, Timer, WorkerView,
};
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
    /// A canary in progress: go to 100 % now.
    Promote {
        worker: String,
    },
    /// A canary in progress: roll back now.
    Abort {
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
        on_ready: OnReady,
        restarts: u32,
        reply: oneshot::Sender<Result<(u64, watch::Receiver<Phase>), SupervisorError>>,
    },
    /// Route `route`, retire `retire`, keep `standby` unrouted, in one route-table store; the
    /// reply watches the retired instances.
    Switch {
        worker: String,
        route: Vec<u64>,
        retire: Vec<u64>,
        standby: Vec<u64>,
        reply: oneshot::Sender<Vec<watch::Receiver<Phase>>>,
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
    AddWorker(
        Arc<WorkerConfig>,
        oneshot::Sender<Result<(), SupervisorError>>,
    ),
    /// The reply watches every instance of the worker until it has exited.
    RemoveWorker(String, oneshot::Sender<Vec<watch::Receiver<Phase>>>),
    SetConfig(Arc<Config>),
    Config(oneshot::Sender<Arc<Config>>),
    /// A timer of the owner's fired.
    Timer(Timer),
    /// A drain watch ended (in-flight reached 0, or the drain timeout).
    Drained {
        worker: String,
        id: u64,
        epoch: u64,
    },
    RecycleDone {
        worker: String,
        id: u64,
    },
    Tick,
    Shutdown(oneshot::Sender<()>),
    AllDrained,
    /// Starts, moves or ends a worker's canary split.
    Canary {
        worker: String,
        state: Option<CanaryState>,
        reply: oneshot::Sender<()>,
    },
    /// What each generation of a worker answered so far.
    Answered(
        String,
        oneshot::Sender<std::collections::BTreeMap<u64, crate::routes::AnsweredSnapshot>>,
    ),
}

/// Cheap, cloneable access to the supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    tx: mpsc::UnboundedSender<Msg>,
    tls_reloader: Arc<std::sync::OnceLock<TlsReloader>>,
    locks: Arc<std::sync::Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    reload_lock: Arc<AsyncMutex<()>>,
    /// The canary deploys running now, by worker: how `promote` and `abort` reach them.
    canaries: Arc<std::sync::Mutex<HashMap<String, watch::Sender<CanaryCmd>>>>,
}

/// What `promote` and `abort` tell a running canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryCmd {
    Run,
    Promote,
    Abort,
}

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
            .unwrap_or_else(|_| Outcome::from_result("-", Err(SupervisorError::ShuttingDown)))
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

    /// Starts an instance of `config` as `generation`; the receiver follows its phase.
    pub async fn start(
        &self,
        worker: &str,
        config: Arc<WorkerConfig>,
        generation: u64,
        on_ready: OnReady,
        restarts: u32,
    ) -> Result<(u64, watch::Receiver<Phase>), SupervisorError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Start {
            worker: worker.to_string(),
            config,
            generation,
            on_ready,
            restarts,
            reply: tx,
        });
        rx.await.map_err(|_| SupervisorError::ShuttingDown)?
    }

    /// Routes `route`, retires (drains and stops) `retire` and keeps `standby` unrouted, in
    /// one route-table store; returns watches of the retired instances.
    pub async fn switch(
        &self,
        worker: &str,
        route: Vec<u64>,
        retire: Vec<u64>,
        standby: Vec<u64>,
    ) -> Vec<watch::Receiver<Phase>> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Switch {
            worker: worker.to_string(),
            route,
            retire,
            standby,
            reply: tx,
        });
        rx.await.unwrap_or_default()
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

    pub async fn add_worker(&self, config: Arc<WorkerConfig>) -> Result<(), SupervisorError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::AddWorker(config, tx));
        rx.await.map_err(|_| SupervisorError::ShuttingDown)?
    }

    /// Removes a worker: drains and stops every instance; returns once all have exited.
    pub async fn remove_worker(&self, name: &str) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::RemoveWorker(name.to_string(), tx));
        for mut w in rx.await.unwrap_or_default() {
            wait_exited(&mut w).await;
        }
    }

    pub async fn config(&self) -> Option<Arc<Config>> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Config(tx));
        rx.await.ok()
    }

    pub fn set_config(&self, c: Arc<Config>) {
        self.send(Msg::SetConfig(c));
    }

    pub async fn set_canary(&self, worker: &str, state: Option<CanaryState>) {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Canary {
            worker: worker.to_string(),
            state,
            reply: tx,
        });
        let _ = rx.await;
    }

    pub async fn answered(
        &self,
        worker: &str,
    ) -> std::collections::BTreeMap<u64, crate::routes::AnsweredSnapshot> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Answered(worker.to_string(), tx));
        rx.await.unwrap_or_default()
    }

    /// Registers a canary of `worker`; `None` if one runs already.
    fn canary_begin(&self, worker: &str) -> Option<watch::Receiver<CanaryCmd>> {
        let mut map = self.canaries.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(worker) {
            return None;
        }
        let (tx, rx) = watch::channel(CanaryCmd::Run);
        map.insert(worker.to_string(), tx);
        Some(rx)
    }

    fn canary_end(&self, worker: &str) {
        let mut map = self.canaries.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(worker);
    }

    /// Whether a canary of `worker` runs now.
    pub fn in_canary(&self, worker: &str) -> bool {
        let map = self.canaries.lock().unwrap_or_else(|p| p.into_inner());
        map.contains_key(worker)
    }

    /// Tells the running canary of `worker` to promote or abort.
    fn canary_command(&self, worker: &str, cmd: CanaryCmd) -> Result<(), SupervisorError> {
        let map = self.canaries.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(worker) {
            Some(tx) => {
                tx.send_replace(cmd);
                Ok(())
            }
            None => Err(SupervisorError::NoCanary {
                worker: worker.into(),
            }),
        }
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
        _ => Err(SupervisorError::ShuttingDown.to_string()),
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
            canaries: Default::default(),
        };
        let env = owner::Env::production(&config).map_err(|e| e.to_string())?;
        let owner = Owner::new(config.clone(), routes, handle.clone(), env);
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
