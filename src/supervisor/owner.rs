//! The owner task: every worker and instance record, the port pool, the cgroup driver, and
//! the only writer of the route table. It handles one message at a time (see [`Msg`]); all
//! waiting happens elsewhere (monitors, orchestrations, timers), so it never blocks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::health::Target;
use super::instance::{self, Ctl, Fact, Launch};
use super::logs::{Tail, WorkerLog};
use super::ports::PortPool;
use super::sockets;
use super::spec::{build_spec, cgroup_limits, prepare_dirs, setup_cgroups};
use super::stats::ProcStats;
use super::status::{InstanceStatus, Outcome, StandbyStatus, StatusReport, WorkerStatus};
use super::{
    Cause, Commit, GONE, InstanceView, Msg, Phase, Role, StandbyInfo, State, SupervisorHandle,
    WorkerView, deploy,
};
use crate::config::{Config, Transport, WorkerConfig};
use crate::metrics::{METRICS, WorkerMetrics};
use crate::routes::{
    Backend, BackendSettings, Instance, Route, RouteHandle, RouteTable, WorkerShared,
};
use crate::sandbox::Spawner;
use crate::sandbox::cgroup::{CgroupDriver, InstanceCgroup};

struct Record {
    id: u64,
    generation: u64,
    config: Arc<WorkerConfig>,
    role: Role,
    state: State,
    port: Option<u16>,
    /// With `transport: unix`: the socket file of the current process (removed when it exits).
    socket: Option<Arc<Path>>,
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
pub(super) struct Owner {
    config: Arc<Config>,
    workers: BTreeMap<String, WorkerState>,
    ports: PortPool,
    /// The sockets directories (`<run_dir>/sockets/<pid>`) this process created; removed when
    /// every instance has stopped.
    socket_dirs: BTreeSet<PathBuf>,
    routes: Arc<RouteHandle>,
    handle: SupervisorHandle,
    cgroups: Option<Arc<CgroupDriver>>,
    spawner: Spawner,
    table_version: u64,
    started: Instant,
    shutting_down: bool,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    stopping_all: bool,
}

impl Owner {
    pub(super) fn new(
        config: Arc<Config>,
        routes: Arc<RouteHandle>,
        handle: SupervisorHandle,
    ) -> Result<Owner, String> {
        let cgroups = setup_cgroups(&config);
        std::fs::create_dir_all(&config.logs_dir)
            .map_err(|e| format!("cannot create {}: {e}", config.logs_dir.display()))?;
        for d in sockets::cleanup_stale(&config.run_dir, std::process::id()) {
            tracing::warn!(dir = %d.display(), "removed the unix sockets left by an earlier tqproxy");
        }
        Ok(Owner {
            ports: PortPool::new(config.ports.clone()),
            socket_dirs: BTreeSet::new(),
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
        })
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
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
            self.config.log.worker_log_rate,
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
                socket: None,
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
        let epoch = r.epoch + 1;
        // Where the instance accepts: a port of the pool (bound here when the socket is
        // passed), or a unix socket created here.
        let (target, port, socket, listener): (
            Target,
            Option<u16>,
            Option<Arc<Path>>,
            Option<OwnedFd>,
        ) = match config.transport {
            Transport::Tcp => {
                let (port, l) = self
                    .ports
                    .allocate(config.passes_socket())
                    .ok_or_else(|| "no free port in the worker port range".to_string())?;
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
        r.epoch = epoch;
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
        let spec = build_spec(
            &config,
            id,
            r.generation,
            port,
            cgroup.as_deref(),
            &others,
            &[run_dir, conf_dir, logs_dir],
        );
        // A unix instance has no address of its own: port 0 stands for "none" in the access
        // log; the proxy connects to `unix_path`.
        let mut shared = Instance::new(
            wname.clone(),
            id,
            r.generation,
            SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0))),
        );
        shared.unix_path = socket.clone();
        r.shared = Arc::new(shared);
        r.port = port;
        r.socket = socket.clone();
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
            target: target.clone(),
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
                    %target,
                    generation = r.generation,
                    "starting"
                );
                Ok(())
            }
            Err(e) => {
                release(&mut self.ports);
                r.port = None;
                r.socket = None;
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
                if let Some(path) = r.socket.take() {
                    sockets::remove(&path);
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
                self.restart_after(worker, id, epoch, backoff);
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
            self.restart_after(worker, id, epoch, backoff);
        }
    }

    /// Asks this task to restart the instance in place once `backoff` has passed (the message
    /// is ignored if the instance has moved on to another epoch by then).
    fn restart_after(&self, worker: &str, id: u64, epoch: u64, backoff: Duration) {
        let tx = self.handle.tx.clone();
        let worker = worker.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            let _ = tx.send(Msg::RestartDue { worker, id, epoch });
        });
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
                        socket: r.socket.as_ref().map(|p| p.display().to_string()),
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
            } else if self
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
