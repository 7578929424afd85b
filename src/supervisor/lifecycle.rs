//! The rules of an instance's life, pure: no I/O, no tokio, no globals.
//!
//! [`Records`] holds every worker and instance the supervisor knows. Everything that happens
//! to them — a fact from a process monitor, a timer, a command from an orchestration — is an
//! [`Event`] or a command method, and returns the [`Effect`]s the driver (`owner.rs`) must
//! perform: spawn, signal, publish the route table, arm a timer, count a restart, tell the
//! watchers. The driver turns what then happens back into events. So "may this instance be
//! signalled now?" is answered here, in [`InstanceState::can_signal`], and every transition
//! that emits [`Effect::Signal`] goes through it.
//!
//! ```text
//!              ready (route)            drain                in-flight = 0 / drain_timeout
//! Starting ───────────────> Routed ─────────────> Draining ──────────────────────────────> Stopping ──exit──> (removed)
//!    │  ready (hold)          │ ▲ switch            ▲                                        ▲
//!    ├──────────> Held ───────┘ │                   │ rollback window over / drain            │ stop without drain
//!    │                          │ rollback           │                                        │
//!    │            Standby <─────┴── blue/green switch (old generation) ───────────────────────┘
//!    └─exit (serving)─> Exited ──backoff──> Starting          Exited after `crashloop_after` failures: crashloop
//! ```
//!
//! Deploy planning ([`RollingPlan`], [`plan_scale`], [`plan_rollback`], [`recycle_due`]) is
//! pure too: the orchestrations in `deploy.rs` only wait and carry its decisions out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::SupervisorError;
use super::{Cause, Phase};
use crate::config::WorkerConfig;

/// What a starting instance does once it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReady {
    /// Join the route table at once (boot, crash restart, liveness replacement): the instance
    /// is part of the worker's capacity and is restarted when it crashes.
    Route,
    /// Wait, unrouted, for a deploy's switch (a candidate); never restarted.
    Hold,
}

/// The states an instance really has. Today's "routed", "standby", "retiring" and "restart
/// on exit" are all readable from it; nothing else is kept beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// The process was spawned and is not ready yet. `failed`: it was reported as failed to
    /// start (start timeout) and has been killed; its exit is awaited.
    Starting { on_ready: OnReady, failed: bool },
    /// Ready and in the route table.
    Routed,
    /// Ready and out of the route table: a deploy candidate waiting for its switch (or a
    /// serving instance that became ready during shutdown).
    Held,
    /// Ready and out of the route table: the previous blue/green generation, kept alive for
    /// `rollback` until the window closes.
    Standby,
    /// Out of the route table; waiting until its in-flight requests finish or
    /// `drain_timeout` passes. Not signalled yet.
    Draining,
    /// SIGTERM sent (SIGKILL after `stop_timeout`); the record goes when the process exits.
    Stopping,
    /// A serving instance whose process exited; restarted in place when its backoff timer
    /// fires. `crashloop`: it has failed `crashloop_after` times in a row.
    Exited { crashloop: bool },
}

impl InstanceState {
    /// Whether the instance may be in the route table. Only a ready instance ever is.
    pub fn can_route(self) -> bool {
        matches!(
            self,
            InstanceState::Routed | InstanceState::Held | InstanceState::Standby
        )
    }

    /// Whether it is in the route table now.
    pub fn is_routed(self) -> bool {
        self == InstanceState::Routed
    }

    /// Whether tqproxy may send the process a signal now. Never while it is routed (a request
    /// could be on its way to it), and never while it drains (its in-flight requests finish
    /// first); a process that exited has nothing to signal.
    pub fn can_signal(self) -> bool {
        matches!(
            self,
            InstanceState::Starting { .. }
                | InstanceState::Held
                | InstanceState::Standby
                | InstanceState::Stopping
        )
    }

    /// Whether it may start draining: it is ready (routed or not).
    pub fn can_drain(self) -> bool {
        self.can_route()
    }

    /// Whether a process is (or may still be) running.
    pub fn has_process(self) -> bool {
        !matches!(self, InstanceState::Exited { .. })
    }

    /// Whether it counts as the worker's capacity: restarted when it crashes, replaced when it
    /// hangs.
    pub fn is_serving(self) -> bool {
        matches!(
            self,
            InstanceState::Starting {
                on_ready: OnReady::Route,
                ..
            } | InstanceState::Routed
                | InstanceState::Exited { .. }
        )
    }

    /// Whether it is on its way out (removed when its process exits).
    pub fn is_retiring(self) -> bool {
        matches!(self, InstanceState::Draining | InstanceState::Stopping)
    }

    pub fn is_ready(self) -> bool {
        self.can_route()
    }

    /// The state shown in `status`: `starting|ready|draining|stopping|exited|crashloop`.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting { .. } => "starting",
            InstanceState::Routed | InstanceState::Held | InstanceState::Standby => "ready",
            InstanceState::Draining => "draining",
            InstanceState::Stopping => "stopping",
            InstanceState::Exited { crashloop: false } => "exited",
            InstanceState::Exited { crashloop: true } => "crashloop",
        }
    }

    /// The role shown in `status`: `serving|candidate|standby|retiring`.
    pub fn role_str(self) -> &'static str {
        match self {
            InstanceState::Standby => "standby",
            InstanceState::Draining | InstanceState::Stopping => "retiring",
            s if s.is_serving() => "serving",
            _ => "candidate",
        }
    }
}

/// One instance record (one slot: a crash restart keeps the id and bumps `epoch`).
#[derive(Debug, Clone)]
pub struct Record {
    pub id: u64,
    pub generation: u64,
    pub config: Arc<WorkerConfig>,
    pub state: InstanceState,
    /// Incremented per process of this record; facts of an older process are ignored.
    pub epoch: u64,
    pub pid: Option<u32>,
    pub restarts: u32,
    /// Consecutive failures (crash, failed start), for backoff and crashloop.
    pub failures: u32,
    pub started_at: Instant,
    pub ready_at: Option<Instant>,
    pub last_exit: Option<String>,
    /// The last `STATUS=` this process sent on its notify socket (`ready: notify`).
    pub status: Option<String>,
}

/// Blue/green: the previous generation kept for rollback.
#[derive(Debug, Clone)]
pub struct StandbyInfo {
    pub generation: u64,
    pub config: Arc<WorkerConfig>,
    pub ids: Vec<u64>,
    pub until: Instant,
}

/// One worker's bookkeeping and its instances.
#[derive(Debug)]
pub struct WorkerRecords {
    pub name: Arc<str>,
    pub config: Arc<WorkerConfig>,
    pub generation: u64,
    pub next_generation: u64,
    pub desired: u32,
    pub previous: Option<(Arc<WorkerConfig>, u64)>,
    pub standby: Option<StandbyInfo>,
    pub instances: BTreeMap<u64, Record>,
    pub next_id: u64,
    pub restarts: BTreeMap<Cause, u64>,
    pub removing: bool,
    /// What an orchestration is doing to it (`deploy`, `scale`, …), for `status`.
    pub busy: Option<String>,
    /// Instances whose recycling is underway.
    pub recycling: BTreeSet<u64>,
    /// A canary deploy in progress: both generations are routed, split by share.
    pub canary: Option<CanaryState>,
}

/// Every worker and instance.
#[derive(Debug, Default)]
pub struct Records {
    pub workers: BTreeMap<String, WorkerRecords>,
    /// A graceful stop began: nothing new starts, nothing restarts.
    pub shutting_down: bool,
    /// Every in-flight request finished (or the drain timed out): every instance is stopping.
    pub stopping_all: bool,
}

/// Something that happened to one process of one instance (`epoch` says which process).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Spawned {
        pid: u32,
    },
    Ready {
        after: Duration,
    },
    /// It will not become ready (start timeout): it is killed, its exit follows.
    StartFailed {
        reason: String,
    },
    /// `unhealthy_after` liveness checks failed in a row.
    Unhealthy {
        reason: String,
    },
    Exited {
        status: String,
        oom: bool,
    },
    /// A draining instance's in-flight requests reached 0, or its `drain_timeout` passed.
    Drained,
    /// Its restart backoff is over.
    RestartDue,
    /// The driver could not start the process of a restart (no port, no cgroup, spawn failed).
    SpawnFailed {
        reason: String,
    },
    /// It sent `STATUS=<text>` on its notify socket: shown in `status`, nothing else.
    Status {
        text: String,
    },
}

/// How to signal a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM now, SIGKILL of the whole tree after `timeout`.
    Stop { timeout: Duration },
    /// SIGKILL of the whole tree now.
    Kill,
}

/// A timer the driver arms; when it fires the driver calls back with the same value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    /// → [`Event::RestartDue`] for that process.
    Restart { worker: String, id: u64, epoch: u64 },
    /// → [`Records::standby_expired`].
    StandbyExpiry { worker: String, generation: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start the process of this record (port or socket, cgroup, sandbox, monitor) as
    /// `epoch`. `first`: the record was just created, and a failure removes it (the driver
    /// calls [`Records::abandon`]); otherwise a failure is [`Event::SpawnFailed`].
    Spawn {
        worker: String,
        id: u64,
        epoch: u64,
        first: bool,
    },
    /// Clear the instance's "routed" flag, which the proxy checks after counting a request in:
    /// always before anything reads its in-flight count.
    Unroute {
        worker: String,
        id: u64,
    },
    /// Build the route table from [`Records::routed`] and store it (one store).
    Publish,
    /// Send [`Event::Drained`] once the instance's in-flight count is 0, or after `timeout`.
    WatchDrain {
        worker: String,
        id: u64,
        epoch: u64,
        timeout: Duration,
    },
    /// Signal the process. Only emitted where [`InstanceState::can_signal`] holds.
    Signal {
        worker: String,
        id: u64,
        signal: Signal,
    },
    ArmTimer {
        after: Duration,
        timer: Timer,
    },
    /// The process exited: its port, socket and cgroup may be given to another.
    Release {
        worker: String,
        id: u64,
    },
    /// The record is gone: drop what the driver holds for it.
    Forget {
        worker: String,
        id: u64,
    },
    /// The worker was removed and has no instance left.
    WorkerGone {
        worker: String,
    },
    /// Tell whoever watches the instance.
    Phase {
        worker: String,
        id: u64,
        phase: Phase,
    },
    CountRestart {
        worker: String,
        cause: Cause,
    },
    /// A line for tqproxy's log (`what`, a fixed message, with `text` as its detail) and the
    /// worker's log (`text`).
    Note {
        worker: String,
        id: u64,
        level: Level,
        what: &'static str,
        text: String,
    },
    /// Send [`Records::all_drained`] once no instance has a request in flight, or after
    /// `timeout`.
    WatchAllDrained {
        timeout: Duration,
    },
}

/// The capped exponential backoff after `failures` consecutive failures (1 = the first).
pub fn backoff(policy: &crate::config::RestartPolicy, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    policy
        .backoff
        .saturating_mul(1 << exp)
        .min(policy.backoff_max)
}

impl Records {
    pub fn worker(&self, worker: &str) -> Option<&WorkerRecords> {
        self.workers.get(worker)
    }

    pub fn record(&self, worker: &str, id: u64) -> Option<&Record> {
        self.workers.get(worker)?.instances.get(&id)
    }

    /// The routed instances of every worker that is not being removed, in id order.
    pub fn routed(&self) -> impl Iterator<Item = (&WorkerRecords, &Record)> {
        self.workers
            .values()
            .filter(|w| !w.removing)
            .flat_map(|w| w.instances.values().map(move |r| (w, r)))
            .filter(|(_, r)| r.state.is_routed())
    }

    /// Whether a graceful stop has finished: every instance is gone.
    pub fn finished(&self) -> bool {
        self.stopping_all && self.workers.values().all(|w| w.instances.is_empty())
    }

    /// Adds a worker (at boot or by a reload). A worker re-added while its old instances are
    /// still stopping keeps them until they exit.
    pub fn add_worker(&mut self, config: Arc<WorkerConfig>) -> Result<(), SupervisorError> {
        let name = config.name.clone();
        if self.workers.get(&name).is_some_and(|w| !w.removing) {
            return Err(SupervisorError::WorkerExists { worker: name });
        }
        let (instances, next_id) = match self.workers.remove(&name) {
            Some(old) => (old.instances, old.next_id),
            None => (BTreeMap::new(), 1),
        };
        self.workers.insert(
            name.clone(),
            WorkerRecords {
                name: name.as_str().into(),
                desired: config.instances,
                config,
                generation: 1,
                next_generation: 2,
                previous: None,
                standby: None,
                instances,
                next_id,
                restarts: BTreeMap::new(),
                removing: false,
                busy: None,
                recycling: BTreeSet::new(),
                canary: None,
            },
        );
        Ok(())
    }

    /// Creates a record of `config` as `generation` and asks for its process.
    pub fn start(
        &mut self,
        worker: &str,
        config: Arc<WorkerConfig>,
        generation: u64,
        on_ready: OnReady,
        restarts: u32,
        now: Instant,
    ) -> Result<(u64, Vec<Effect>), SupervisorError> {
        if self.shutting_down {
            return Err(SupervisorError::ShuttingDown);
        }
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| no_worker(worker))?;
        if w.removing {
            return Err(SupervisorError::WorkerRemoving {
                worker: worker.into(),
            });
        }
        let id = w.next_id;
        w.next_id += 1;
        w.instances.insert(
            id,
            Record {
                id,
                generation,
                config,
                state: InstanceState::Starting {
                    on_ready,
                    failed: false,
                },
                epoch: 1,
                pid: None,
                restarts,
                failures: 0,
                started_at: now,
                ready_at: None,
                last_exit: None,
                status: None,
            },
        );
        Ok((
            id,
            vec![Effect::Spawn {
                worker: worker.into(),
                id,
                epoch: 1,
                first: true,
            }],
        ))
    }

    /// The first spawn of a record failed: it never existed.
    pub fn abandon(&mut self, worker: &str, id: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if let Some(w) = self.workers.get_mut(worker)
            && w.instances.remove(&id).is_some()
        {
            fx.push(Effect::Forget {
                worker: worker.into(),
                id,
            });
        }
        self.gc(worker, &mut fx);
        fx
    }

    /// Applies something that happened to process `epoch` of an instance. Facts about an
    /// older process of the same record, or about a record that is gone, change nothing.
    pub fn apply(
        &mut self,
        worker: &str,
        id: u64,
        epoch: u64,
        event: Event,
        now: Instant,
    ) -> Vec<Effect> {
        let fx = self.transition(worker, id, epoch, event, now);
        self.tally(&fx);
        fx
    }

    /// Restarts counted by effects also count in the worker's record (for `status`).
    fn tally(&mut self, fx: &[Effect]) {
        for e in fx {
            if let Effect::CountRestart { worker, cause } = e
                && let Some(w) = self.workers.get_mut(worker)
            {
                *w.restarts.entry(*cause).or_default() += 1;
            }
        }
    }

    /// [`Self::apply`] before the restarts are tallied.
    fn transition(
        &mut self,
        worker: &str,
        id: u64,
        epoch: u64,
        event: Event,
        now: Instant,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        let shutting_down = self.shutting_down;
        let Some(r) = self
            .workers
            .get_mut(worker)
            .and_then(|w| w.instances.get_mut(&id))
        else {
            return fx;
        };
        if r.epoch != epoch {
            return fx;
        }
        let wk = || worker.to_string();
        match event {
            Event::Spawned { pid } => r.pid = Some(pid),
            Event::Ready { after } => {
                let InstanceState::Starting {
                    on_ready,
                    failed: false,
                } = r.state
                else {
                    return fx;
                };
                r.ready_at = Some(now);
                let route = on_ready == OnReady::Route && !shutting_down;
                r.state = if route {
                    InstanceState::Routed
                } else {
                    InstanceState::Held
                };
                fx.push(Effect::Note {
                    worker: wk(),
                    id,
                    level: Level::Info,
                    what: "ready",
                    text: format!("ready after {} ms", after.as_millis()),
                });
                fx.push(Effect::Phase {
                    worker: wk(),
                    id,
                    phase: Phase::Ready,
                });
                if route {
                    fx.push(Effect::Publish);
                }
            }
            Event::StartFailed { reason } => {
                let InstanceState::Starting {
                    on_ready,
                    failed: false,
                } = r.state
                else {
                    return fx;
                };
                r.state = InstanceState::Starting {
                    on_ready,
                    failed: true,
                };
                r.last_exit = Some(reason.clone());
                fx.push(Effect::Note {
                    worker: wk(),
                    id,
                    level: Level::Warn,
                    what: "start failed",
                    text: format!("start failed: {reason}"),
                });
                fx.push(Effect::Phase {
                    worker: wk(),
                    id,
                    phase: Phase::Failed { reason },
                });
                fx.push(signal(worker, r, Signal::Kill));
            }
            Event::Unhealthy { reason } => {
                if !r.state.can_drain() {
                    return fx;
                }
                let serving = r.state.is_serving();
                r.last_exit = Some(format!("unhealthy: {reason}"));
                let (config, generation, restarts) = (r.config.clone(), r.generation, r.restarts);
                fx.push(Effect::Note {
                    worker: wk(),
                    id,
                    level: Level::Warn,
                    what: "unhealthy: replacing",
                    text: format!("unhealthy: {reason}; replacing"),
                });
                // Out of the route table now; a hung process gets SIGTERM and then SIGKILL.
                fx.extend(self.stop(worker, id, false));
                fx.push(Effect::CountRestart {
                    worker: wk(),
                    cause: Cause::Liveness,
                });
                if serving {
                    match self.start(
                        worker,
                        config,
                        generation,
                        OnReady::Route,
                        restarts + 1,
                        now,
                    ) {
                        Ok((_, spawn)) => fx.extend(spawn),
                        Err(e) => fx.push(Effect::Note {
                            worker: wk(),
                            id,
                            level: Level::Warn,
                            what: "cannot start a replacement",
                            text: format!("cannot start a replacement: {e}"),
                        }),
                    }
                }
            }
            Event::Exited { status, oom } => {
                let was = r.state;
                r.pid = None;
                fx.push(Effect::Release { worker: wk(), id });
                if was.is_routed() {
                    fx.push(Effect::Unroute { worker: wk(), id });
                    fx.push(Effect::Publish);
                }
                let restart = was.is_serving() && was.has_process() && !shutting_down;
                if !restart {
                    fx.push(Effect::Phase {
                        worker: wk(),
                        id,
                        phase: Phase::Exited { reason: status },
                    });
                    if let Some(w) = self.workers.get_mut(worker) {
                        w.instances.remove(&id);
                        w.recycling.remove(&id);
                    }
                    fx.push(Effect::Forget { worker: wk(), id });
                    self.gc(worker, &mut fx);
                    return fx;
                }
                // A serving instance died on its own: restart in place after a backoff.
                let cause = if oom { Cause::Memory } else { Cause::Crash };
                let policy = &r.config.restart;
                if r.ready_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= policy.reset_after)
                {
                    r.failures = 0;
                }
                r.failures += 1;
                let wait = backoff(policy, r.failures);
                r.state = InstanceState::Exited {
                    crashloop: r.failures >= policy.crashloop_after,
                };
                let status = if oom {
                    format!("{status} (out of memory)")
                } else {
                    status
                };
                r.last_exit = Some(status.clone());
                fx.push(Effect::Phase {
                    worker: wk(),
                    id,
                    phase: Phase::Exited {
                        reason: status.clone(),
                    },
                });
                fx.push(Effect::Note {
                    worker: wk(),
                    id,
                    level: Level::Warn,
                    what: "instance exited: restarting",
                    text: format!(
                        "{status}; restarting in {} ms ({} consecutive failures)",
                        wait.as_millis(),
                        r.failures
                    ),
                });
                fx.push(Effect::ArmTimer {
                    after: wait,
                    timer: Timer::Restart {
                        worker: wk(),
                        id,
                        epoch,
                    },
                });
                fx.push(Effect::CountRestart {
                    worker: wk(),
                    cause,
                });
            }
            Event::Drained => {
                if r.state != InstanceState::Draining {
                    return fx;
                }
                terminate(worker, r, &mut fx);
            }
            Event::RestartDue => {
                if shutting_down || !matches!(r.state, InstanceState::Exited { .. }) {
                    return fx;
                }
                r.restarts += 1;
                r.epoch += 1;
                r.state = InstanceState::Starting {
                    on_ready: OnReady::Route,
                    failed: false,
                };
                r.started_at = now;
                r.ready_at = None;
                r.status = None;
                fx.push(Effect::Spawn {
                    worker: wk(),
                    id,
                    epoch: r.epoch,
                    first: false,
                });
            }
            Event::Status { text } => r.status = Some(text),
            Event::SpawnFailed { reason } => {
                if !matches!(r.state, InstanceState::Starting { .. }) {
                    return fx;
                }
                r.failures += 1;
                r.state = InstanceState::Exited {
                    crashloop: r.failures >= r.config.restart.crashloop_after,
                };
                fx.push(Effect::Note {
                    worker: wk(),
                    id,
                    level: Level::Warn,
                    what: "restart failed; retrying",
                    text: format!("restart failed: {reason}; retrying"),
                });
                r.last_exit = Some(reason);
                fx.push(Effect::ArmTimer {
                    after: r.config.restart.backoff_max,
                    timer: Timer::Restart {
                        worker: wk(),
                        id,
                        epoch,
                    },
                });
            }
        }
        fx
    }

    /// Routes `route` and retires (unroute, drain, stop) `retire` or keeps `standby` unrouted
    /// for rollback, in one route-table store: capacity never drops between the two.
    pub fn switch(
        &mut self,
        worker: &str,
        route: &[u64],
        retire: &[u64],
        standby: &[u64],
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(w) = self.workers.get_mut(worker) else {
            return fx;
        };
        for id in route {
            if let Some(r) = w.instances.get_mut(id) {
                r.state = match r.state {
                    InstanceState::Held | InstanceState::Standby | InstanceState::Routed => {
                        InstanceState::Routed
                    }
                    // Not ready yet: it joins when it is.
                    InstanceState::Starting { failed, .. } => InstanceState::Starting {
                        on_ready: OnReady::Route,
                        failed,
                    },
                    other => other,
                };
            }
        }
        for id in standby {
            if let Some(r) = w.instances.get_mut(id)
                && r.state.can_route()
            {
                if r.state.is_routed() {
                    fx.push(Effect::Unroute {
                        worker: worker.into(),
                        id: *id,
                    });
                }
                r.state = InstanceState::Standby;
            }
        }
        // One store for both halves; the retired ones drain out of the new table.
        let mut drain = Vec::new();
        for id in retire {
            drain.extend(self.stop_inner(worker, *id, true, false));
        }
        fx.push(Effect::Publish);
        fx.extend(drain);
        fx
    }

    /// Unroutes an instance, drains it (optionally) and stops it; the record goes when the
    /// process exits. Never signals an instance that is still in the route table: the
    /// route-table store comes first, the drain watch after the routed flag is cleared.
    pub fn stop(&mut self, worker: &str, id: u64, drain: bool) -> Vec<Effect> {
        self.stop_inner(worker, id, drain, true)
    }

    fn stop_inner(&mut self, worker: &str, id: u64, drain: bool, publish: bool) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(w) = self.workers.get_mut(worker) else {
            return fx;
        };
        let Some(r) = w.instances.get_mut(&id) else {
            return fx;
        };
        let wk = || worker.to_string();
        let was_routed = r.state.is_routed();
        if was_routed || r.state.can_route() {
            fx.push(Effect::Unroute { worker: wk(), id });
        }
        if was_routed && publish {
            fx.push(Effect::Publish);
        }
        match r.state {
            InstanceState::Exited { .. } => {
                // No process: nothing to stop.
                fx.push(Effect::Phase {
                    worker: wk(),
                    id,
                    phase: Phase::Exited {
                        reason: "stopped".into(),
                    },
                });
                w.instances.remove(&id);
                w.recycling.remove(&id);
                fx.push(Effect::Forget { worker: wk(), id });
                self.gc(worker, &mut fx);
            }
            InstanceState::Stopping => {}
            InstanceState::Draining if drain => {}
            s if drain && s.can_drain() => {
                r.state = InstanceState::Draining;
                fx.push(Effect::Phase {
                    worker: wk(),
                    id,
                    phase: Phase::Draining,
                });
                fx.push(Effect::WatchDrain {
                    worker: wk(),
                    id,
                    epoch: r.epoch,
                    timeout: r.config.drain_timeout,
                });
            }
            _ => {
                terminate(worker, r, &mut fx);
            }
        }
        fx
    }

    /// An orchestration commits its bookkeeping.
    pub fn commit(&mut self, worker: &str, c: Commit, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(w) = self.workers.get_mut(worker) else {
            return fx;
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
                fx.push(Effect::ArmTimer {
                    after: info.until.saturating_duration_since(now),
                    timer: Timer::StandbyExpiry {
                        worker: worker.into(),
                        generation: info.generation,
                    },
                });
            }
            w.standby = s;
        }
        for (cause, n) in c.count_restarts {
            for _ in 0..n {
                fx.push(Effect::CountRestart {
                    worker: worker.into(),
                    cause,
                });
            }
        }
        fx.push(Effect::Publish);
        self.tally(&fx);
        fx
    }

    /// The blue/green rollback window of `generation` closed: its standby instances go.
    pub fn standby_expired(&mut self, worker: &str, generation: u64) -> Vec<Effect> {
        let ids = match self.workers.get_mut(worker) {
            Some(w)
                if w.standby
                    .as_ref()
                    .is_some_and(|s| s.generation == generation) =>
            {
                w.standby.take().map(|s| s.ids).unwrap_or_default()
            }
            _ => return Vec::new(),
        };
        let mut fx = Vec::new();
        for id in ids {
            if self
                .record(worker, id)
                .is_some_and(|r| r.state == InstanceState::Standby)
            {
                fx.push(Effect::Note {
                    worker: worker.into(),
                    id,
                    level: Level::Info,
                    what: "rollback window over: stopping standby instance",
                    text: format!("rollback window of generation {generation} over: stopping"),
                });
                fx.extend(self.stop(worker, id, true));
            }
        }
        fx
    }

    /// Removes a worker: every instance drains and stops; the worker goes with the last.
    pub fn remove_worker(&mut self, worker: &str) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(w) = self.workers.get_mut(worker) else {
            return fx;
        };
        w.removing = true;
        let ids: Vec<u64> = w.instances.keys().copied().collect();
        for id in ids {
            fx.extend(self.stop(worker, id, true));
        }
        fx.push(Effect::Publish);
        self.gc(worker, &mut fx);
        fx
    }

    /// A graceful stop: nothing starts or restarts from now on; once in-flight requests are
    /// done (or the longest `drain_timeout` passed), [`Self::all_drained`].
    pub fn shutdown(&mut self) -> Vec<Effect> {
        if self.shutting_down {
            return Vec::new();
        }
        self.shutting_down = true;
        let timeout = self
            .workers
            .values()
            .flat_map(|w| w.instances.values())
            .map(|r| r.config.drain_timeout)
            .max()
            .unwrap_or_default();
        vec![Effect::WatchAllDrained { timeout }]
    }

    /// Every instance stops now (no further drain).
    pub fn all_drained(&mut self) -> Vec<Effect> {
        self.stopping_all = true;
        let all: Vec<(String, u64)> = self
            .workers
            .iter()
            .flat_map(|(n, w)| w.instances.keys().map(move |id| (n.clone(), *id)))
            .collect();
        let mut fx = Vec::new();
        for (w, id) in all {
            fx.extend(self.stop(&w, id, false));
        }
        fx
    }

    /// Marks a recycle finished (done or given up).
    pub fn recycle_done(&mut self, worker: &str, id: u64) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.recycling.remove(&id);
        }
    }

    /// Starts, moves or ends a canary: the route table splits the worker's requests by it.
    pub fn set_canary(&mut self, worker: &str, canary: Option<CanaryState>) -> Vec<Effect> {
        let Some(w) = self.workers.get_mut(worker) else {
            return Vec::new();
        };
        let republish = w.canary.as_ref().map(|c| (c.generation, c.permille))
            != canary.as_ref().map(|c| (c.generation, c.permille));
        w.canary = canary;
        if republish {
            vec![Effect::Publish]
        } else {
            Vec::new()
        }
    }

    fn gc(&mut self, worker: &str, fx: &mut Vec<Effect>) {
        if self
            .workers
            .get(worker)
            .is_some_and(|w| w.removing && w.instances.is_empty())
        {
            self.workers.remove(worker);
            fx.push(Effect::WorkerGone {
                worker: worker.into(),
            });
        }
    }

    /// The view an orchestration plans from.
    pub fn view(&self, worker: &str) -> Option<WorkerView> {
        let w = self.workers.get(worker)?;
        Some(WorkerView {
            config: w.config.clone(),
            generation: w.generation,
            next_generation: w.next_generation,
            desired: w.desired,
            previous: w.previous.clone(),
            standby: w.standby.clone(),
            instances: w
                .instances
                .values()
                .map(|r| InstanceView {
                    id: r.id,
                    restarts: r.restarts,
                    generation: r.generation,
                    state: r.state,
                })
                .collect(),
        })
    }
}

fn no_worker(worker: &str) -> SupervisorError {
    SupervisorError::NoSuchWorker {
        worker: worker.into(),
    }
}

/// Stopping: SIGTERM now, SIGKILL after `stop_timeout`; the record goes when it exits.
fn terminate(worker: &str, r: &mut Record, fx: &mut Vec<Effect>) {
    r.state = InstanceState::Stopping;
    fx.push(Effect::Phase {
        worker: worker.into(),
        id: r.id,
        phase: Phase::Stopping,
    });
    let timeout = r.config.stop_timeout;
    fx.push(signal(worker, r, Signal::Stop { timeout }));
}

/// The one place a [`Effect::Signal`] is made: the guard is checked here.
fn signal(worker: &str, r: &Record, signal: Signal) -> Effect {
    debug_assert!(
        r.state.can_signal(),
        "signal to instance {} in state {:?}",
        r.id,
        r.state
    );
    Effect::Signal {
        worker: worker.into(),
        id: r.id,
        signal,
    }
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
    pub state: InstanceState,
}

impl WorkerView {
    /// The worker's capacity: the instances that are serving (or restarting to serve).
    pub fn serving(&self) -> Vec<u64> {
        self.instances
            .iter()
            .filter(|i| i.state.is_serving())
            .map(|i| i.id)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Deploy planning
// ---------------------------------------------------------------------------------------

/// What a scale to `n` instances does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScalePlan {
    /// Start this many candidates, route them once all are ready.
    Up {
        add: u32,
    },
    /// Drain and stop these: first the ones not serving traffic, then the newest.
    Down {
        stop: Vec<u64>,
    },
    Same,
}

pub fn plan_scale(v: &WorkerView, n: u32) -> ScalePlan {
    let current = v.serving();
    let have = current.len() as u32;
    if n > have {
        ScalePlan::Up { add: n - have }
    } else if n < have {
        let mut order: Vec<(bool, u64)> = v
            .instances
            .iter()
            .filter(|i| i.state.is_serving())
            .map(|i| (i.state.is_ready(), i.id))
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        ScalePlan::Down {
            stop: order
                .iter()
                .take((have - n) as usize)
                .map(|(_, id)| *id)
                .collect(),
        }
    } else {
        ScalePlan::Same
    }
}

/// A rolling deploy to `target` instances, `surge` new ones at a time: each batch is routed
/// in the same store that retires as many old ones, so the routed count never drops below
/// what it was.
#[derive(Debug, Clone)]
pub struct RollingPlan {
    old: Vec<u64>,
    /// The old instances stopped before the first batch (a fixed port: see [`RollingPlan::new`]).
    stop_first: Vec<u64>,
    target: u32,
    surge: u32,
    switched: u32,
    next_old: usize,
}

/// One batch's switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    pub route: Vec<u64>,
    pub retire: Vec<u64>,
}

/// What to do when a batch does not become ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBatchFailure {
    /// Nothing was switched yet: stop the batch, the old generation keeps serving as it was.
    KeepOld,
    /// Earlier batches were switched: deploy the previous configuration again.
    RollBack,
}

impl RollingPlan {
    /// `fixed_port`: the old and the new instances listen on the same fixed port (a service
    /// worker's `port:`), which one process holds at a time, so every old instance stops before
    /// the first batch starts ([`RollingPlan::stop_first`]) and a failed batch brings the old
    /// configuration back rather than leaving nothing.
    pub fn new(old: Vec<u64>, target: u32, max_surge: u32, fixed_port: bool) -> RollingPlan {
        let (old, stop_first) = if fixed_port {
            (Vec::new(), old)
        } else {
            (old, Vec::new())
        };
        RollingPlan {
            old,
            stop_first,
            target,
            surge: max_surge.max(1),
            switched: 0,
            next_old: 0,
        }
    }

    /// How many instances the next batch starts (`None`: every new instance is routed).
    pub fn next_batch(&self) -> Option<u32> {
        (self.switched < self.target).then(|| self.surge.min(self.target - self.switched))
    }

    /// The batch `ready` is ready: route it and retire as many old instances.
    pub fn switch(&mut self, ready: &[u64]) -> Switch {
        let retire: Vec<u64> = self
            .old
            .iter()
            .skip(self.next_old)
            .take(ready.len())
            .copied()
            .collect();
        self.next_old += retire.len();
        self.switched += ready.len() as u32;
        Switch {
            route: ready.to_vec(),
            retire,
        }
    }

    /// Whether this is the first switch (the deploy commits its configuration with it).
    pub fn first_switch(&self) -> bool {
        self.switched == 0
    }

    /// Old instances beyond the target (the deploy also scaled down): retired at the end.
    pub fn leftover(&self) -> Vec<u64> {
        self.old.iter().skip(self.next_old).copied().collect()
    }

    /// The old instances to stop (and wait for) before the first batch starts.
    pub fn stop_first(&self) -> &[u64] {
        &self.stop_first
    }

    pub fn on_failure(&self) -> OnBatchFailure {
        if self.switched == 0 && self.stop_first.is_empty() {
            OnBatchFailure::KeepOld
        } else {
            OnBatchFailure::RollBack
        }
    }
}

/// The blue/green switch: the whole new generation routed, the old one kept as standby for
/// `window` (or retired at once when the window is zero).
pub fn plan_bluegreen(
    old: &[u64],
    new: &[u64],
    window: Duration,
) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    if window.is_zero() {
        (new.to_vec(), old.to_vec(), Vec::new())
    } else {
        (new.to_vec(), Vec::new(), old.to_vec())
    }
}

/// What `rollback` does.
#[derive(Debug, Clone)]
pub enum RollbackPlan {
    /// Inside the blue/green window: route the ready standby instances again and retire the
    /// current ones, starting no process; `missing` standby instances had exited and are
    /// replaced by a scale afterwards.
    SwitchBack {
        generation: u64,
        config: Arc<WorkerConfig>,
        route: Vec<u64>,
        retire: Vec<u64>,
        missing: u32,
    },
    /// After the window: deploy the previous configuration as a new generation.
    Redeploy {
        config: Arc<WorkerConfig>,
        was: u64,
        generation: u64,
    },
    Nothing,
}

pub fn plan_rollback(v: &WorkerView) -> RollbackPlan {
    if let Some(sb) = &v.standby {
        let route: Vec<u64> = v
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Standby && sb.ids.contains(&i.id))
            .map(|i| i.id)
            .collect();
        if !route.is_empty() {
            return RollbackPlan::SwitchBack {
                generation: sb.generation,
                config: sb.config.clone(),
                missing: v.desired.saturating_sub(route.len() as u32),
                route,
                retire: v.serving(),
            };
        }
    }
    match &v.previous {
        Some((config, was)) => RollbackPlan::Redeploy {
            config: config.clone(),
            was: *was,
            generation: v.next_generation,
        },
        None => RollbackPlan::Nothing,
    }
}

/// What the driver measured of one instance, for recycling.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub requests: u64,
    pub memory: Option<u64>,
}

/// The routed instances of the current generation that reached `max_requests` or
/// `recycle_memory`, and are not being recycled already; marks them as being recycled.
pub fn recycle_due(
    records: &mut Records,
    usage: impl Fn(&str, u64) -> Usage,
) -> Vec<(String, u64, Cause)> {
    let mut due = Vec::new();
    for (name, w) in records.workers.iter_mut() {
        for r in w.instances.values() {
            if !r.state.is_routed() || w.recycling.contains(&r.id) {
                continue;
            }
            let u = usage(name, r.id);
            if r.config.max_requests > 0 && u.requests >= r.config.max_requests {
                due.push((name.clone(), r.id, Cause::MaxRequests));
            } else if let (Some(limit), Some(mem)) = (r.config.recycle_memory, u.memory)
                && mem >= limit
            {
                due.push((name.clone(), r.id, Cause::Memory));
            }
        }
        for (n, id, _) in &due {
            if n == name {
                w.recycling.insert(*id);
            }
        }
    }
    due
}

// ---------------------------------------------------------------------------------------
// Canary
// ---------------------------------------------------------------------------------------

/// A canary deploy in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryState {
    /// The new generation, and the one it is compared with.
    pub generation: u64,
    pub baseline: u64,
    /// The current step (an index into `steps`) and its share in thousandths.
    pub step: usize,
    pub steps: Vec<u32>,
    pub permille: u32,
    /// The step's window so far: the canary's figures and the baseline's.
    pub window: (Window, Window),
}

/// What one generation answered over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    pub p99: Option<Duration>,
}

impl Window {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// A share in thousandths as people write it (`5%`, `0.5%`).
pub fn percent(permille: u32) -> String {
    if permille.is_multiple_of(10) {
        format!("{}%", permille / 10)
    } else {
        format!("{}.{}%", permille / 10, permille % 10)
    }
}

/// What a step's figures say.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough time or requests yet.
    Wait,
    /// Within the limits for the whole step: go on.
    Pass,
    /// A limit is broken: roll back, for this reason.
    Breach(String),
}

/// Judges a step. A breach is called as soon as the canary has `min_requests` in the step
/// (no need to let a bad version fail for the rest of the step); a pass needs both
/// `min_requests` and `step_interval`. A limit counts as broken only when the canary is also
/// worse than the baseline over the same window (the old generation failing too is not the
/// canary's fault).
pub fn judge(
    cfg: &crate::config::CanaryConfig,
    permille: u32,
    elapsed: Duration,
    canary: &Window,
    baseline: &Window,
) -> Verdict {
    if canary.requests < cfg.min_requests.max(1) {
        return Verdict::Wait;
    }
    let rate = canary.error_rate();
    if rate > cfg.max_error_rate && rate > baseline.error_rate() {
        return Verdict::Breach(format!(
            "canary error rate {rate:.2} > {} over {} requests at step {} (old generation {:.2} over {})",
            cfg.max_error_rate,
            canary.requests,
            percent(permille),
            baseline.error_rate(),
            baseline.requests
        ));
    }
    if let (Some(limit), Some(p99)) = (cfg.max_p99, canary.p99)
        && p99 > limit
        && baseline.p99.is_none_or(|b| p99 > b)
    {
        return Verdict::Breach(format!(
            "canary p99 {} ms > {} ms over {} requests at step {} (old generation {})",
            p99.as_millis(),
            limit.as_millis(),
            canary.requests,
            percent(permille),
            baseline
                .p99
                .map_or("-".to_string(), |b| format!("{} ms", b.as_millis()))
        ));
    }
    if elapsed >= cfg.step_interval {
        Verdict::Pass
    } else {
        Verdict::Wait
    }
}

#[cfg(test)]
mod tests;
