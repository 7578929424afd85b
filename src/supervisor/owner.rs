//! The owner task: the effect driver of [`lifecycle`](super::lifecycle).
//!
//! It holds the [`Records`] (the rules' state) and, beside them, what only a running process
//! has: its shared request counters, phase watch, control channel, port or socket, cgroup and
//! log tail. It handles one message at a time (see [`Msg`]): it turns the message into a call
//! of the rules, performs the [`Effect`]s they return, and turns what then happens (a fact from
//! a monitor, a timer, a drain that finished) back into events. It never waits itself: timers
//! and drain watches are tasks in one [`JoinSet`] that the owner polls, so nothing outlives it.
//!
//! What it touches in the world comes in through [`Env`] (the launcher, the cgroup driver,
//! the metrics sink), so the whole supervisor runs in tests with a fake launcher and paused
//! time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::error::SupervisorError;
use super::health::Target;
use super::instance::{self, Launch};
use super::lifecycle::{self, Effect, Event, InstanceState, Level, OnReady, Records, Timer};
use super::logs::{Tail, WorkerLog};
use super::notify;
use super::ports::PortPool;
use super::sockets;
use super::spec::{build_spec, cgroup_limits, prepare_dirs, setup_cgroups, with_notify};
use super::stats::ProcStats;
use super::status::{
    CanaryStatus, GenerationStatus, InstanceStatus, Outcome, StandbyStatus, StatusReport,
    WindowStatus, WorkerStatus,
};
use super::{Cause, Msg, Phase, SupervisorHandle, deploy};
use crate::config::{Config, Transport};
use crate::metrics::{METRICS, WorkerMetrics};
use crate::routes::{
    AnsweredSnapshot, Backend, BackendSettings, Instance, Route, RouteHandle, RouteTable,
    WorkerShared,
};
use crate::sandbox::Spawner;
use crate::sandbox::cgroup::{CgroupDriver, InstanceCgroup};

/// Starts processes. The real one goes through the sandbox ([`instance::launch`]); tests
/// pass a fake that reports facts without a process.
pub trait Launcher: Send + Sync {
    /// Spawns the process of `l` and starts whatever reports its facts to `tx`; returns the
    /// channel that signals it.
    fn launch(
        &self,
        l: Launch,
        tx: mpsc::UnboundedSender<Msg>,
    ) -> Result<mpsc::UnboundedSender<lifecycle::Signal>, String>;
}

/// The sandboxed launcher of production.
pub struct SandboxLauncher(pub Spawner);

impl Launcher for SandboxLauncher {
    fn launch(
        &self,
        l: Launch,
        tx: mpsc::UnboundedSender<Msg>,
    ) -> Result<mpsc::UnboundedSender<lifecycle::Signal>, String> {
        instance::launch(&self.0, l, tx)
    }
}

/// Where the supervisor's counters and gauges go.
pub trait MetricsSink: Send + Sync {
    fn worker_added(&self, worker: &str);
    fn worker_gone(&self, worker: &str);
    fn restart(&self, worker: &str, cause: Cause);
    fn instance_usage(&self, worker: &str, id: u64, memory: Option<u64>, cpu: Option<f64>);
    fn instance_gone(&self, worker: &str, id: u64);
    fn instance_states(&self, worker: &str, counts: &BTreeMap<&'static str, i64>);
    fn in_flight(&self, worker: &str, n: u64);
}

/// The process-wide Prometheus registry ([`METRICS`]).
pub struct GlobalMetrics;

impl MetricsSink for GlobalMetrics {
    fn worker_added(&self, worker: &str) {
        for c in Cause::ALL {
            METRICS.restarts.with_label_values(&[worker, c.as_str()]);
        }
    }
    fn worker_gone(&self, worker: &str) {
        for st in crate::metrics::INSTANCE_STATES {
            let _ = METRICS.instances.remove_label_values(&[worker, st]);
        }
    }
    fn restart(&self, worker: &str, cause: Cause) {
        METRICS
            .restarts
            .with_label_values(&[worker, cause.as_str()])
            .inc();
    }
    fn instance_usage(&self, worker: &str, id: u64, memory: Option<u64>, cpu: Option<f64>) {
        let label = id.to_string();
        if let Some(m) = memory {
            METRICS
                .instance_memory
                .with_label_values(&[worker, &label])
                .set(m as i64);
        }
        if let Some(c) = cpu {
            METRICS
                .instance_cpu
                .with_label_values(&[worker, &label])
                .set(c);
        }
    }
    fn instance_gone(&self, worker: &str, id: u64) {
        METRICS.forget_instance(worker, &id.to_string());
    }
    fn instance_states(&self, worker: &str, counts: &BTreeMap<&'static str, i64>) {
        for (st, n) in counts {
            METRICS.instances.with_label_values(&[worker, st]).set(*n);
        }
    }
    fn in_flight(&self, worker: &str, n: u64) {
        METRICS.in_flight.with_label_values(&[worker]).set(n as i64);
    }
}

/// What the owner touches in the world.
pub struct Env {
    pub launcher: Arc<dyn Launcher>,
    pub cgroups: Option<Arc<CgroupDriver>>,
    pub metrics: Arc<dyn MetricsSink>,
}

impl Env {
    /// The real world: the sandbox, the configured cgroup hierarchy, the global registry.
    /// Also creates the logs directory and removes unix sockets an earlier tqproxy left.
    pub fn production(config: &Config) -> Result<Env, SupervisorError> {
        std::fs::create_dir_all(&config.logs_dir).map_err(|e| {
            SupervisorError::Internal(format!("cannot create {}: {e}", config.logs_dir.display()))
        })?;
        for d in sockets::cleanup_stale(&config.run_dir, std::process::id()) {
            tracing::warn!(dir = %d.display(), "removed the unix sockets left by an earlier tqproxy");
        }
        Ok(Env {
            launcher: Arc::new(SandboxLauncher(Spawner::current())),
            cgroups: setup_cgroups(config),
            metrics: Arc::new(GlobalMetrics),
        })
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct InstanceStats {
    memory: Option<u64>,
    cpu_seconds: Option<f64>,
    /// When `cpu_seconds` was read.
    sampled_at: Option<std::time::Instant>,
    /// Cores used between the last two samples.
    cpu_rate: Option<f64>,
}

impl InstanceStats {
    /// The sample taken `at`, with the CPU rate since `self` (the previous sample of the same
    /// process). The rate is computed here, between two reads of the counter with their own
    /// times: a reader that divided the counter's growth by the time between two status
    /// documents mixed two clocks, and saw 0 % whenever no sample fell between them.
    fn next(&self, memory: Option<u64>, cpu: Option<f64>, at: std::time::Instant) -> Self {
        let cpu_rate = match (self.cpu_seconds, self.sampled_at, cpu) {
            (Some(before), Some(then), Some(now)) if now >= before => {
                let dt = at.saturating_duration_since(then).as_secs_f64();
                (dt > 0.0).then(|| (now - before) / dt)
            }
            _ => None,
        };
        InstanceStats {
            memory,
            cpu_seconds: cpu,
            sampled_at: Some(at),
            cpu_rate,
        }
    }
}

/// What one record's current process has, beside its record.
struct Running {
    shared: Arc<Instance>,
    phase: watch::Sender<Phase>,
    ctl: Option<mpsc::UnboundedSender<lifecycle::Signal>>,
    port: Option<u16>,
    /// With `transport: unix`: the socket file of the current process (removed when it exits).
    socket: Option<Arc<Path>>,
    cgroup: Option<Arc<InstanceCgroup>>,
    tail: Tail,
    stats: InstanceStats,
}

struct WorkerRuntime {
    shared: Arc<WorkerShared>,
    log: WorkerLog,
    instances: BTreeMap<u64, Running>,
}

pub(super) struct Owner {
    config: Arc<Config>,
    records: Records,
    rt: BTreeMap<String, WorkerRuntime>,
    ports: PortPool,
    /// The sockets directories (`<run_dir>/sockets/<pid>`) this process created; removed when
    /// every instance has stopped.
    socket_dirs: BTreeSet<PathBuf>,
    routes: Arc<RouteHandle>,
    handle: SupervisorHandle,
    env: Env,
    table_version: u64,
    started: tokio::time::Instant,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    /// Timers and drain watches; each ends in a message to this task.
    timers: JoinSet<Msg>,
    /// Orchestrations started from here (requests, recycles).
    tasks: JoinSet<()>,
    /// What gone processes answered, by worker and generation (while the generation has a
    /// record).
    retired: BTreeMap<(String, u64), AnsweredSnapshot>,
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl Owner {
    pub(super) fn new(
        config: Arc<Config>,
        routes: Arc<RouteHandle>,
        handle: SupervisorHandle,
        env: Env,
    ) -> Owner {
        Owner {
            ports: PortPool::new(config.ports.clone()),
            socket_dirs: BTreeSet::new(),
            config,
            records: Records::default(),
            rt: BTreeMap::new(),
            routes,
            handle,
            env,
            table_version: 0,
            started: tokio::time::Instant::now(),
            shutdown_waiters: Vec::new(),
            timers: JoinSet::new(),
            tasks: JoinSet::new(),
            retired: BTreeMap::new(),
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let workers: Vec<_> = self.config.workers.values().cloned().collect();
        for w in workers {
            if let Err(e) = self.add_worker(w.clone()) {
                tracing::error!(worker = %w.name, error = %e, "cannot add worker");
            }
        }
        self.publish();
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => self.handle_msg(m),
                    None => return,
                },
                Some(done) = self.timers.join_next(), if !self.timers.is_empty() => {
                    if let Ok(m) = done {
                        self.handle_msg(m);
                    }
                }
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
            if self.records.finished() {
                self.finish();
                return;
            }
        }
    }

    /// Every instance stopped after a graceful stop: close logs, remove cgroups and sockets,
    /// wake the waiters.
    fn finish(&mut self) {
        for w in self.rt.values() {
            w.log.close_and_wait(Duration::from_secs(2));
        }
        if let Some(cg) = &self.env.cgroups
            && let Err(e) = cg.remove()
        {
            tracing::warn!(error = %e, "cgroup parent not removed");
        }
        for d in std::mem::take(&mut self.socket_dirs) {
            sockets::remove_dir(&d);
            // `<run_dir>/sockets` too, once no other tqproxy uses it.
            if let Some(base) = d.parent() {
                let _ = std::fs::remove_dir(base);
            }
        }
        tracing::info!("every instance stopped");
        for w in self.shutdown_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn handle_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Msg::Request(req, reply) => {
                if self.records.shutting_down {
                    let _ = reply.send(Outcome::from_result(
                        "-",
                        Err(SupervisorError::ShuttingDown),
                    ));
                    return;
                }
                let h = self.handle.clone();
                self.tasks.spawn(async move {
                    let o = deploy::run_request(&h, req).await;
                    let _ = reply.send(o);
                });
            }
            Msg::Instance {
                worker,
                id,
                epoch,
                fact,
            } => {
                let fx = self.records.apply(&worker, id, epoch, fact, now());
                self.perform(fx);
            }
            Msg::Start {
                worker,
                config,
                generation,
                on_ready,
                restarts,
                reply,
            } => {
                let _ = reply.send(self.start(&worker, config, generation, on_ready, restarts));
            }
            Msg::Switch {
                worker,
                route,
                retire,
                standby,
                reply,
            } => {
                let watches = self.watch(&worker, &retire);
                let fx = self.records.switch(&worker, &route, &retire, &standby);
                self.perform(fx);
                let _ = reply.send(watches);
            }
            Msg::Stop {
                worker,
                id,
                drain,
                reply,
            } => {
                let watch = self.watch(&worker, &[id]).pop();
                let fx = self.records.stop(&worker, id, drain);
                self.perform(fx);
                let _ = reply.send(watch);
            }
            Msg::View(worker, reply) => {
                let _ = reply.send(self.records.view(&worker));
            }
            Msg::Commit {
                worker,
                commit,
                reply,
            } => {
                let fx = self.records.commit(&worker, commit, now());
                self.perform(fx);
                let _ = reply.send(());
            }
            Msg::AddWorker(config, reply) => {
                let r = self.add_worker(config);
                self.publish();
                let _ = reply.send(r);
            }
            Msg::RemoveWorker(name, reply) => {
                let ids: Vec<u64> = self
                    .records
                    .worker(&name)
                    .map(|w| w.instances.keys().copied().collect())
                    .unwrap_or_default();
                let watches = self.watch(&name, &ids);
                let fx = self.records.remove_worker(&name);
                self.perform(fx);
                let _ = reply.send(watches);
            }
            Msg::SetConfig(c) => {
                self.ports.set_range(c.ports.clone());
                self.config = c;
            }
            Msg::Config(reply) => {
                let _ = reply.send(self.config.clone());
            }
            Msg::Timer(Timer::Restart { worker, id, epoch }) => {
                let fx = self
                    .records
                    .apply(&worker, id, epoch, Event::RestartDue, now());
                self.perform(fx);
            }
            Msg::Timer(Timer::StandbyExpiry { worker, generation }) => {
                let fx = self.records.standby_expired(&worker, generation);
                self.perform(fx);
            }
            Msg::Drained { worker, id, epoch } => {
                let fx = self
                    .records
                    .apply(&worker, id, epoch, Event::Drained, now());
                self.perform(fx);
            }
            Msg::RecycleDone { worker, id } => self.records.recycle_done(&worker, id),
            Msg::Tick => self.tick(),
            Msg::Shutdown(reply) => {
                self.shutdown_waiters.push(reply);
                let fx = self.records.shutdown();
                self.perform(fx);
            }
            Msg::AllDrained => {
                let fx = self.records.all_drained();
                self.perform(fx);
            }
            Msg::Canary {
                worker,
                state,
                reply,
            } => {
                let fx = self.records.set_canary(&worker, state);
                self.perform(fx);
                let _ = reply.send(());
            }
            Msg::Answered(worker, reply) => {
                let _ = reply.send(self.answered(&worker));
            }
        }
    }

    /// What each generation of `worker` answered: its live processes' figures plus those of
    /// its processes that are gone.
    fn answered(&self, worker: &str) -> BTreeMap<u64, AnsweredSnapshot> {
        let mut out: BTreeMap<u64, AnsweredSnapshot> = self
            .retired
            .range((worker.to_string(), 0)..=(worker.to_string(), u64::MAX))
            .map(|((_, g), s)| (*g, s.clone()))
            .collect();
        if let (Some(w), Some(wrt)) = (self.records.worker(worker), self.rt.get(worker)) {
            for r in w.instances.values() {
                if let Some(run) = wrt.instances.get(&r.id) {
                    out.entry(r.generation)
                        .or_default()
                        .add(&run.shared.answered.snapshot());
                }
            }
        }
        out
    }

    /// Keeps what a process of `worker`'s generation `generation` answered, once its shared
    /// counters are dropped.
    fn retire_answered(&mut self, worker: &str, generation: u64, shared: &Instance) {
        let snap = shared.answered.snapshot();
        if snap.requests > 0 {
            self.retired
                .entry((worker.to_string(), generation))
                .or_default()
                .add(&snap);
        }
    }

    /// Watches of the phases of `ids` (those that exist).
    fn watch(&self, worker: &str, ids: &[u64]) -> Vec<watch::Receiver<Phase>> {
        let Some(w) = self.rt.get(worker) else {
            return Vec::new();
        };
        ids.iter()
            .filter_map(|id| w.instances.get(id).map(|r| r.phase.subscribe()))
            .collect()
    }

    fn add_worker(
        &mut self,
        config: Arc<crate::config::WorkerConfig>,
    ) -> Result<(), SupervisorError> {
        let name = config.name.clone();
        if self.records.worker(&name).is_some_and(|w| !w.removing) {
            return Err(SupervisorError::WorkerExists { worker: name });
        }
        prepare_dirs(&config).map_err(SupervisorError::Internal)?;
        let log = WorkerLog::open(
            &self.config.logs_dir,
            &name,
            self.config.log.worker_log_max_size,
            self.config.log.worker_log_keep,
            self.config.log.worker_log_rate,
        )
        .map_err(|e| {
            SupervisorError::Internal(format!(
                "cannot open log for `{name}` in {}: {e}",
                self.config.logs_dir.display()
            ))
        })?;
        self.records.add_worker(config)?;
        self.env.metrics.worker_added(&name);
        // Re-added while its old instances were still stopping: keep them until they exit.
        let instances = self
            .rt
            .remove(&name)
            .map(|old| old.instances)
            .unwrap_or_default();
        self.rt.insert(
            name.clone(),
            WorkerRuntime {
                shared: Arc::new(WorkerShared {
                    cursor: AtomicUsize::new(0),
                    split_cursor: Default::default(),
                    ingress: Default::default(),
                    egress: Default::default(),
                    metrics: WorkerMetrics::new(&name),
                }),
                log,
                instances,
            },
        );
        Ok(())
    }

    fn start(
        &mut self,
        worker: &str,
        config: Arc<crate::config::WorkerConfig>,
        generation: u64,
        on_ready: OnReady,
        restarts: u32,
    ) -> Result<(u64, watch::Receiver<Phase>), SupervisorError> {
        let (id, fx) = self
            .records
            .start(worker, config, generation, on_ready, restarts, now())?;
        let rx = self.running(worker, id).map(|r| r.phase.subscribe());
        match self.try_perform(fx) {
            Err(cause) => Err(SupervisorError::StartFailed {
                worker: worker.into(),
                instance: id,
                generation,
                cause,
            }),
            Ok(()) => rx
                .ok_or_else(|| SupervisorError::NoSuchWorker {
                    worker: worker.into(),
                })
                .map(|rx| (id, rx)),
        }
    }

    /// The runtime entry of a record, created on first use.
    fn running(&mut self, worker: &str, id: u64) -> Option<&mut Running> {
        let generation = self.records.record(worker, id)?.generation;
        let w = self.rt.get_mut(worker)?;
        let name: Arc<str> = worker.into();
        Some(w.instances.entry(id).or_insert_with(|| Running {
            shared: Arc::new(Instance::new(
                name,
                id,
                generation,
                SocketAddr::from(([127, 0, 0, 1], 0)),
            )),
            phase: watch::channel(Phase::Starting).0,
            ctl: None,
            port: None,
            socket: None,
            cgroup: None,
            tail: Tail::default(),
            stats: InstanceStats::default(),
        }))
    }

    /// Performs effects in order, and those they lead to. A new record whose first spawn
    /// fails (a liveness replacement) is logged and removed again.
    fn perform(&mut self, fx: Vec<Effect>) {
        let _logged = self.try_perform(fx);
    }

    /// [`Self::perform`]; `Err`: the first spawn of a new record failed (the record is gone
    /// again), with the reason.
    fn try_perform(&mut self, fx: Vec<Effect>) -> Result<(), String> {
        let mut queue: VecDeque<Effect> = fx.into();
        let mut result = Ok(());
        let mut publish = false;
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Spawn {
                    worker,
                    id,
                    epoch,
                    first,
                } => {
                    if let Err(reason) = self.spawn(&worker, id, epoch) {
                        if first {
                            tracing::warn!(worker, instance = id, %reason, "cannot start");
                            queue.extend(self.records.abandon(&worker, id));
                            if result.is_ok() {
                                result = Err(reason);
                            }
                        } else {
                            queue.extend(self.records.apply(
                                &worker,
                                id,
                                epoch,
                                Event::SpawnFailed { reason },
                                now(),
                            ));
                        }
                    }
                }
                Effect::Unroute { worker, id } => {
                    if let Some(r) = self.rt.get(&worker).and_then(|w| w.instances.get(&id)) {
                        r.shared.routed.store(false, Ordering::SeqCst);
                    }
                }
                // Once, after everything else of this step: one store per step.
                Effect::Publish => publish = true,
                Effect::WatchDrain {
                    worker,
                    id,
                    epoch,
                    timeout,
                } => {
                    let inst = self
                        .rt
                        .get(&worker)
                        .and_then(|w| w.instances.get(&id))
                        .map(|r| r.shared.clone());
                    self.timers.spawn(async move {
                        if let Some(inst) = inst {
                            let _ = tokio::time::timeout(timeout, inst.drained()).await;
                        }
                        Msg::Drained { worker, id, epoch }
                    });
                }
                Effect::Signal { worker, id, signal } => {
                    if let Some(ctl) = self
                        .rt
                        .get(&worker)
                        .and_then(|w| w.instances.get(&id))
                        .and_then(|r| r.ctl.as_ref())
                    {
                        let _ = ctl.send(signal);
                    }
                }
                Effect::ArmTimer { after, timer } => {
                    self.timers.spawn(async move {
                        tokio::time::sleep(after).await;
                        Msg::Timer(timer)
                    });
                }
                Effect::Release { worker, id } => {
                    if let Some(r) = self
                        .rt
                        .get_mut(&worker)
                        .and_then(|w| w.instances.get_mut(&id))
                    {
                        if let Some(p) = r.port.take() {
                            self.ports.release(p);
                        }
                        if let Some(path) = r.socket.take() {
                            sockets::remove(&path);
                        }
                        r.ctl = None;
                        r.cgroup = None;
                    }
                    self.env.metrics.instance_gone(&worker, id);
                }
                Effect::Forget { worker, id } => {
                    if let Some(w) = self.rt.get_mut(&worker)
                        && let Some(r) = w.instances.remove(&id)
                    {
                        let generation = r.shared.generation;
                        self.retire_answered(&worker, generation, &r.shared);
                        let left = self.records.worker(&worker).is_some_and(|w| {
                            w.instances.values().any(|x| x.generation == generation)
                        });
                        if !left {
                            self.retired.remove(&(worker.clone(), generation));
                        }
                        // A record that goes without an exit (its first spawn failed).
                        if let Some(p) = r.port {
                            self.ports.release(p);
                        }
                        if let Some(path) = &r.socket {
                            sockets::remove(path);
                        }
                    }
                }
                Effect::WorkerGone { worker } => {
                    if let Some(w) = self.rt.remove(&worker) {
                        w.log.close();
                    }
                    self.retired.retain(|(w, _), _| *w != worker);
                    self.env.metrics.worker_gone(&worker);
                }
                Effect::Phase { worker, id, phase } => {
                    if let Some(r) = self.rt.get(&worker).and_then(|w| w.instances.get(&id)) {
                        r.phase.send_replace(phase);
                    }
                }
                Effect::CountRestart { worker, cause } => self.env.metrics.restart(&worker, cause),
                Effect::Note {
                    worker,
                    id,
                    level,
                    what,
                    text,
                } => {
                    match level {
                        Level::Info => {
                            tracing::info!(worker, instance = id, detail = %text, "{what}")
                        }
                        Level::Warn => {
                            tracing::warn!(worker, instance = id, detail = %text, "{what}")
                        }
                    }
                    let generation = self
                        .records
                        .workers
                        .get(&*worker)
                        .and_then(|w| w.instances.get(&id))
                        .map_or(0, |r| r.generation);
                    if let Some(w) = self.rt.get(&worker) {
                        w.log.event(id, generation, &text);
                    }
                }
                Effect::WatchAllDrained { timeout } => {
                    let all: Vec<Arc<Instance>> = self
                        .rt
                        .values()
                        .flat_map(|w| w.instances.values().map(|r| r.shared.clone()))
                        .collect();
                    self.timers.spawn(async move {
                        let _ = tokio::time::timeout(timeout, async {
                            for i in &all {
                                i.drained().await;
                            }
                        })
                        .await;
                        Msg::AllDrained
                    });
                }
            }
        }
        if publish {
            self.publish();
        }
        result
    }

    /// Starts the process of record `id` as `epoch`: its port or socket, cgroup, sandbox spec
    /// and monitor.
    fn spawn(&mut self, worker: &str, id: u64, epoch: u64) -> Result<(), String> {
        let tx = self.handle.tx.clone();
        let run_dir = self.config.run_dir.clone();
        let conf_dir = self
            .config
            .file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let logs_dir = self.config.logs_dir.clone();
        let others: Vec<_> = self
            .records
            .workers
            .iter()
            .filter(|(n, _)| n.as_str() != worker)
            .map(|(_, w)| w.config.clone())
            .collect();
        let cgroups = self.env.cgroups.clone();
        let Some(rec) = self.records.record(worker, id) else {
            return Err(format!("no instance {id}"));
        };
        let (config, generation) = (rec.config.clone(), rec.generation);
        let Some(log) = self.rt.get(worker).map(|w| w.log.clone()) else {
            return Err(format!("no worker named `{worker}`"));
        };
        // Where the instance accepts: a port of the pool (bound here when the socket is
        // passed), or a unix socket created here.
        let (target, port, socket, listener): (
            Target,
            Option<u16>,
            Option<Arc<Path>>,
            Option<OwnedFd>,
        ) = match config.transport {
            Transport::Tcp => {
                let (port, l) = match config.port {
                    Some(p) => fixed_port(p, config.passes_socket())?,
                    None => self
                        .ports
                        .allocate(config.passes_socket())
                        .ok_or_else(|| "no free port in the worker port range".to_string())?,
                };
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                (Target::Tcp(addr), Some(port), None, l.map(OwnedFd::from))
            }
            Transport::Unix => {
                let dir = sockets::process_dir(&run_dir, std::process::id());
                let path = sockets::path(&dir, worker, id, epoch)?;
                let l = sockets::bind(&path)?;
                self.socket_dirs.insert(dir);
                let path: Arc<Path> = path.into();
                (
                    Target::Unix(path.clone()),
                    None,
                    Some(path),
                    Some(OwnedFd::from(l)),
                )
            }
        };
        let release = |ports: &mut PortPool| {
            if let Some(p) = port {
                ports.release(p);
            }
            if let Some(s) = &socket {
                sockets::remove(s);
            }
        };
        let cgroup = match &cgroups {
            Some(driver) => {
                let limits = cgroup_limits(&config);
                match driver.create(&format!("{worker}.{id}.{epoch}"), &limits) {
                    Ok(cg) => Some(Arc::new(cg)),
                    Err(e) if config.resources.needs_cgroup() => {
                        release(&mut self.ports);
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
        // `ready: notify`: its datagram socket, reachable from inside its sandbox.
        let notify = match notify::bind_for(&config, &run_dir, id, epoch) {
            Ok(n) => n,
            Err(e) => {
                release(&mut self.ports);
                if let Some(cg) = &cgroup {
                    let _ = cg.remove();
                }
                return Err(e);
            }
        };
        let notify_path = notify.as_ref().map(|n| n.path.clone());
        if notify.is_some() {
            self.socket_dirs
                .insert(notify::process_dir(&run_dir, std::process::id()));
        }
        let mut spec = build_spec(
            &config,
            id,
            generation,
            port,
            cgroup.as_deref(),
            &others,
            &[run_dir.clone(), conf_dir, logs_dir],
        );
        if let Some(p) = &notify_path {
            with_notify(&mut spec, &config, p, &run_dir);
        }
        // A unix instance has no address of its own: port 0 stands for "none" in the access
        // log; the proxy connects to `unix_path`.
        let mut shared = Instance::new(
            worker.into(),
            id,
            generation,
            SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0))),
        );
        shared.unix_path = socket.clone();
        let tail = Tail::default();
        let launch = Launch {
            worker: worker.into(),
            id,
            generation,
            target: target.clone(),
            listener,
            config,
            spec,
            cgroup: cgroup.clone(),
            log,
            tail: tail.clone(),
            epoch,
            notify,
        };
        match self.env.launcher.launch(launch, tx) {
            Ok(ctl) => {
                let Some(r) = self.running(worker, id) else {
                    return Err(format!("no instance {id}"));
                };
                let old = std::mem::replace(&mut r.shared, Arc::new(shared));
                r.ctl = Some(ctl);
                r.port = port;
                r.socket = socket;
                r.cgroup = cgroup;
                r.tail = tail;
                r.stats = InstanceStats::default();
                r.phase.send_replace(Phase::Starting);
                self.retire_answered(worker, old.generation, &old);
                tracing::info!(worker, instance = id, %target, generation, "starting");
                Ok(())
            }
            Err(e) => {
                release(&mut self.ports);
                if let Some(cg) = cgroup {
                    let _ = cg.remove();
                }
                if let Some(p) = &notify_path {
                    notify::remove(p);
                }
                Err(e)
            }
        }
    }

    /// Builds and stores a new route table from the records (one store).
    fn publish(&mut self) {
        self.table_version += 1;
        let mut table = RouteTable::new(self.table_version);
        for w in self.records.workers.values() {
            if w.removing {
                continue;
            }
            let Some(wrt) = self.rt.get(&*w.name) else {
                continue;
            };
            let mut instances = Vec::new();
            for r in w.instances.values() {
                if r.state.is_routed()
                    && let Some(run) = wrt.instances.get(&r.id)
                {
                    run.shared.routed.store(true, Ordering::SeqCst);
                    instances.push(run.shared.clone());
                }
            }
            let c = &w.config;
            wrt.shared.ingress.set_rate(c.resources.bandwidth.ingress);
            wrt.shared.egress.set_rate(c.resources.bandwidth.egress);
            let backend = Arc::new(Backend {
                worker: w.name.clone(),
                instances,
                settings: BackendSettings {
                    connect_timeout: c.connect_timeout,
                    read_timeout: c.read_timeout,
                    queue_timeout: c.queue_timeout,
                    idle_timeout: self.config.proxy.upstream_idle_timeout,
                    max_body_size: c.max_body_size,
                },
                shared: wrt.shared.clone(),
                split: w.canary.as_ref().map(|c| crate::routes::Split {
                    generation: c.generation,
                    permille: c.permille,
                }),
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
        let proc_stats = ProcStats::read_if_needed(self.records.workers.values().any(|w| {
            w.instances.values().any(|r| {
                r.pid.is_some()
                    && self
                        .rt
                        .get(&*w.name)
                        .and_then(|x| x.instances.get(&r.id))
                        .is_some_and(|x| x.cgroup.is_none())
            })
        }));
        for (name, w) in &self.records.workers {
            let Some(wrt) = self.rt.get_mut(name) else {
                continue;
            };
            let mut counts: BTreeMap<&'static str, i64> = crate::metrics::INSTANCE_STATES
                .iter()
                .map(|s| (*s, 0))
                .collect();
            for r in w.instances.values() {
                *counts.entry(r.state.as_str()).or_default() += 1;
                if let (Some(pid), Some(run)) = (r.pid, wrt.instances.get_mut(&r.id)) {
                    let (memory, cpu) = match &run.cgroup {
                        Some(cg) => (cg.memory_current(), cg.cpu_usage().map(|d| d.as_secs_f64())),
                        None => proc_stats.as_ref().map_or((None, None), |p| p.session(pid)),
                    };
                    run.stats = run.stats.next(memory, cpu, now());
                    self.env.metrics.instance_usage(name, r.id, memory, cpu);
                }
            }
            self.env.metrics.instance_states(name, &counts);
            let in_flight: u64 = wrt.instances.values().map(|r| r.shared.in_flight()).sum();
            self.env.metrics.in_flight(name, in_flight);
        }
        let rt = &self.rt;
        let due = lifecycle::recycle_due(&mut self.records, |worker, id| {
            rt.get(worker)
                .and_then(|w| w.instances.get(&id))
                .map_or(Default::default(), |r| lifecycle::Usage {
                    requests: r.shared.requests.load(Ordering::Relaxed),
                    memory: r.stats.memory,
                })
        });
        for (worker, id, cause) in due {
            let h = self.handle.clone();
            self.tasks.spawn(async move {
                deploy::recycle(&h, &worker, id, cause).await;
                h.send(Msg::RecycleDone { worker, id });
            });
        }
    }

    fn status(&self) -> StatusReport {
        let now = tokio::time::Instant::now();
        let std_now = now.into_std();
        let workers = self
            .records
            .workers
            .values()
            .map(|w| {
                let wrt = self.rt.get(&*w.name);
                let mut routed_generations: Vec<u64> = w
                    .instances
                    .values()
                    .filter(|r| r.state.is_routed())
                    .map(|r| r.generation)
                    .collect();
                routed_generations.sort_unstable();
                routed_generations.dedup();
                let instances: Vec<InstanceStatus> = w
                    .instances
                    .values()
                    .map(|r| {
                        let run = wrt.and_then(|x| x.instances.get(&r.id));
                        let answered = run.map(|x| x.shared.answered.snapshot());
                        InstanceStatus {
                            id: r.id,
                            pid: r.pid,
                            port: run.and_then(|x| x.port),
                            socket: run
                                .and_then(|x| x.socket.as_ref())
                                .map(|p| p.display().to_string()),
                            state: r.state.as_str().to_string(),
                            generation: r.generation,
                            restarts: r.restarts,
                            routed: r.state.is_routed(),
                            role: r.state.role_str().to_string(),
                            in_flight: run.map_or(0, |x| x.shared.in_flight()),
                            requests: run.map_or(0, |x| x.shared.requests.load(Ordering::Relaxed)),
                            uptime_secs: r.pid.map(|_| {
                                std_now
                                    .saturating_duration_since(r.started_at)
                                    .as_secs_f64()
                            }),
                            memory_bytes: run.and_then(|x| x.stats.memory),
                            cpu_seconds: run.and_then(|x| x.stats.cpu_seconds),
                            cpu_percent: run.and_then(|x| x.stats.cpu_rate).map(|r| r * 100.0),
                            p50_ms: answered.as_ref().and_then(|a| ms(a.quantile(0.5))),
                            p99_ms: answered.as_ref().and_then(|a| ms(a.quantile(0.99))),
                            last_exit: r.last_exit.clone(),
                            cgroup: run
                                .and_then(|x| x.cgroup.as_ref())
                                .map(|c| c.path().display().to_string()),
                            status: r.status.clone(),
                        }
                    })
                    .collect();
                let mut restarts: BTreeMap<String, u64> = Cause::ALL
                    .iter()
                    .map(|c| (c.as_str().to_string(), 0))
                    .collect();
                for (c, n) in &w.restarts {
                    restarts.insert(c.as_str().to_string(), *n);
                }
                // What each generation that has an instance answered, and all of them.
                let live: Vec<(u64, usize, AnsweredSnapshot)> = self
                    .answered(&w.name)
                    .into_iter()
                    .filter_map(|(g, a)| {
                        let n = w.instances.values().filter(|r| r.generation == g).count();
                        (n > 0).then_some((g, n, a))
                    })
                    .collect();
                let mut all_live = AnsweredSnapshot::default();
                for (_, _, a) in &live {
                    all_live.add(a);
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
                        expires_in_secs: s.until.saturating_duration_since(std_now).as_secs_f64(),
                    }),
                    busy: if w.removing {
                        Some("removing".into())
                    } else {
                        w.busy.clone()
                    },
                    canary: w.canary.as_ref().map(|c| {
                        let win = |x: &lifecycle::Window| WindowStatus {
                            requests: x.requests,
                            errors: x.errors,
                            error_rate: x.error_rate(),
                            p99_ms: x.p99.map(|d| d.as_secs_f64() * 1000.0),
                        };
                        CanaryStatus {
                            generation: c.generation,
                            baseline: c.baseline,
                            step: c.step + 1,
                            steps: c.steps.len(),
                            share: lifecycle::percent(c.permille),
                            canary_window: win(&c.window.0),
                            baseline_window: win(&c.window.1),
                        }
                    }),
                    generations: live
                        .iter()
                        .map(|(g, n, a)| GenerationStatus {
                            generation: *g,
                            instances: *n as u32,
                            requests: a.requests,
                            errors: a.errors,
                            p50_ms: ms(a.quantile(0.5)),
                            p99_ms: ms(a.quantile(0.99)),
                        })
                        .collect(),
                    p50_ms: ms(all_live.quantile(0.5)),
                    p99_ms: ms(all_live.quantile(0.99)),
                    restarts,
                    in_flight: instances.iter().map(|i| i.in_flight).sum(),
                    requests: instances.iter().map(|i| i.requests).sum(),
                    instances,
                    log: wrt
                        .map(|x| x.log.path().display().to_string())
                        .unwrap_or_default(),
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
            cgroups: self
                .env
                .cgroups
                .as_ref()
                .map(|c| format!("v{}", c.version())),
            state: if self.records.shutting_down {
                "stopping"
            } else if self.records.workers.values().all(|w| {
                w.instances
                    .values()
                    .all(|r| !matches!(r.state, InstanceState::Starting { .. }))
            }) {
                "running"
            } else {
                "starting"
            }
            .to_string(),
            drained: crate::drain::drained(),
            workers,
            certificates: crate::acme::report(),
        }
    }
}

/// A worker's fixed `port` (config `port:`), bound here to see that it is free (and kept when
/// the socket is passed). Not from the pool, so releasing it there changes nothing.
fn fixed_port(port: u16, keep: bool) -> Result<(u16, Option<std::net::TcpListener>), String> {
    match std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))) {
        Ok(l) => Ok((port, keep.then_some(l))),
        Err(e) => Err(format!(
            "fixed port {port} is taken ({e}): a worker with `port:` runs one process at a time"
        )),
    }
}

/// A latency in milliseconds, as the status document has it.
fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests;
