//! Orchestrations: scale, rolling and blue/green deploys, rollback, reload and recycling.
//!
//! Each is a plain sequence of awaits on supervisor primitives (start an instance, switch
//! routing in one store, drain and stop an instance), holding the worker's operation lock so
//! two changes to one worker never interleave. What to start, route and retire is decided by
//! the pure plans of [`lifecycle`](super::lifecycle) ([`RollingPlan`], [`plan_scale`],
//! [`plan_bluegreen`], [`plan_rollback`]); this file only carries them out and waits.
//!
//! Invariants kept (and tested in `lifecycle`):
//! - capacity never drops: new instances are routed in the same store that retires the old;
//! - nothing is signalled while routed: retiring unroutes, drains, then signals;
//! - a new generation that does not become ready is stopped and the old one keeps serving.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

use super::error::SupervisorError;
use super::lifecycle::{
    OnBatchFailure, RollbackPlan, RollingPlan, ScalePlan, Verdict, Window, judge, percent,
    plan_bluegreen, plan_rollback, plan_scale,
};
use super::status::{Outcome, OutcomeLine};
use super::{
    CanaryCmd, CanaryState, Cause, Commit, InstanceState, OnReady, Phase, Request, StandbyInfo,
    SupervisorHandle, WorkerView, wait_exited, wait_ready,
};
use crate::config::{Config, Strategy, WorkerConfig};
use crate::metrics::METRICS;
use crate::routes::AnsweredSnapshot;

type Result<T> = std::result::Result<T, SupervisorError>;

fn outcome(worker: &str, r: Result<String>) -> Outcome {
    Outcome::from_result(worker, r)
}

/// Entry point for requests from the control socket and signals.
pub async fn run_request(h: &SupervisorHandle, req: Request) -> Outcome {
    // Nothing else changes a worker while its canary runs: promote or abort it first.
    let target = match &req {
        Request::Scale { worker, .. }
        | Request::Restart { worker }
        | Request::Deploy { worker, .. }
        | Request::Rollback { worker } => Some(worker.clone()),
        _ => None,
    };
    if let Some(w) = target
        && h.in_canary(&w)
    {
        return outcome(&w, Err(in_canary(&w)));
    }
    match req {
        Request::Reload => reload(h).await,
        Request::Promote { worker } => {
            let r = h
                .canary_command(&worker, CanaryCmd::Promote)
                .map(|()| "promoting: the canary takes 100% now".to_string());
            outcome(&worker, r)
        }
        Request::Abort { worker } => {
            let r = h
                .canary_command(&worker, CanaryCmd::Abort)
                .map(|()| "aborting: the canary is being rolled back".to_string());
            outcome(&worker, r)
        }
        Request::Scale { worker, instances } => {
            let _g = h.lock(&worker).await;
            busy(h, &worker, Some("scale")).await;
            let r = scale(h, &worker, instances, Cause::Scale).await;
            busy(h, &worker, None).await;
            outcome(&worker, r)
        }
        Request::Restart { worker } => {
            let _g = h.lock(&worker).await;
            let r = match h.view(&worker).await {
                None => Err(no_worker(&worker)),
                Some(v) => {
                    busy(h, &worker, Some("restart")).await;
                    // Every instance replaced, as many as run now (a `scale` is kept).
                    let r = rolling(
                        h,
                        &worker,
                        v.config.clone(),
                        v.generation,
                        v.desired,
                        Cause::Deploy,
                    )
                    .await;
                    busy(h, &worker, None).await;
                    r
                }
            };
            outcome(&worker, r)
        }
        Request::Deploy { worker, strategy } => {
            let _g = h.lock(&worker).await;
            let r = deploy_from_disk(h, &worker, strategy).await;
            outcome(&worker, r)
        }
        Request::Rollback { worker } => {
            let _g = h.lock(&worker).await;
            busy(h, &worker, Some("rollback")).await;
            let r = rollback(h, &worker).await;
            busy(h, &worker, None).await;
            outcome(&worker, r)
        }
    }
}

fn in_canary(worker: &str) -> SupervisorError {
    SupervisorError::Busy {
        worker: worker.into(),
        what: "a canary deploy is running: `tqproxy promote` or `tqproxy abort` it first".into(),
    }
}

fn no_worker(worker: &str) -> SupervisorError {
    SupervisorError::NoSuchWorker {
        worker: worker.into(),
    }
}

async fn view(h: &SupervisorHandle, worker: &str) -> Result<WorkerView> {
    h.view(worker).await.ok_or_else(|| no_worker(worker))
}

async fn busy(h: &SupervisorHandle, worker: &str, what: Option<&str>) {
    h.commit(
        worker,
        Commit {
            busy: Some(what.map(str::to_string)),
            ..Default::default()
        },
    )
    .await;
}

fn ms(since: Instant) -> u128 {
    since.elapsed().as_millis()
}

/// Starts `n` unrouted candidate instances of `config` and waits until every one is ready. On any
/// failure the ones started here are stopped and the first reason is returned.
async fn start_batch(
    h: &SupervisorHandle,
    worker: &str,
    config: &Arc<WorkerConfig>,
    generation: u64,
    n: u32,
    restarts: u32,
) -> Result<Vec<u64>> {
    let mut started = Vec::new();
    let mut waits = Vec::new();
    let mut failure = None;
    for _ in 0..n {
        match h
            .start(worker, config.clone(), generation, OnReady::Hold, restarts)
            .await
        {
            Ok((id, rx)) => {
                started.push(id);
                waits.push((id, rx));
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() {
        for (id, rx) in waits.iter_mut() {
            if let Err(reason) = wait_ready(rx).await {
                failure = Some(SupervisorError::NotReady {
                    worker: worker.into(),
                    instance: *id,
                    generation,
                    reason,
                });
                break;
            }
        }
    }
    match failure {
        None => Ok(started),
        Some(e) => {
            stop_all(h, worker, &started, false).await;
            Err(e)
        }
    }
}

/// Stops instances and waits until they have exited.
async fn stop_all(h: &SupervisorHandle, worker: &str, ids: &[u64], drain: bool) {
    let mut rxs = Vec::new();
    for id in ids {
        if let Some(rx) = h.stop(worker, *id, drain).await {
            rxs.push(rx);
        }
    }
    wait_all(rxs).await;
}

async fn wait_all(rxs: Vec<watch::Receiver<Phase>>) {
    for mut rx in rxs {
        wait_exited(&mut rx).await;
    }
}

/// Starts the instances of a worker that was just added (at boot or by a reload). Serving
/// from the start: an instance that fails is restarted with backoff, like any crash.
pub async fn boot(h: &SupervisorHandle, worker: &str) -> Result<String> {
    let v = view(h, worker).await?;
    let t = Instant::now();
    let mut waits = Vec::new();
    for _ in 0..v.desired {
        waits.push(
            h.start(worker, v.config.clone(), v.generation, OnReady::Route, 0)
                .await?,
        );
    }
    let mut errors = Vec::new();
    for (id, rx) in waits.iter_mut() {
        if let Err(e) = wait_ready(rx).await {
            errors.push(format!("instance {id}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(format!("started {} instances in {} ms", v.desired, ms(t)))
    } else {
        Err(SupervisorError::NotReady {
            worker: worker.into(),
            instance: waits.first().map_or(0, |w| w.0),
            generation: v.generation,
            reason: format!("{} (restarting with backoff)", errors.join("; ")),
        })
    }
}

/// Scales a worker to `n` serving instances.
pub async fn scale(h: &SupervisorHandle, worker: &str, n: u32, cause: Cause) -> Result<String> {
    let v = view(h, worker).await?;
    let current = v.serving().len();
    let t = Instant::now();
    match plan_scale(&v, n) {
        ScalePlan::Up { add } => {
            let ids = start_batch(h, worker, &v.config, v.generation, add, 0).await?;
            h.switch(worker, ids, Vec::new(), Vec::new()).await;
            h.commit(
                worker,
                Commit {
                    desired: Some(n),
                    count_restarts: vec![(cause, add as u64)],
                    ..Default::default()
                },
            )
            .await;
            Ok(format!(
                "scaled up from {current} to {n} instances in {} ms",
                ms(t)
            ))
        }
        ScalePlan::Down { stop } => {
            h.commit(
                worker,
                Commit {
                    desired: Some(n),
                    ..Default::default()
                },
            )
            .await;
            stop_all(h, worker, &stop, true).await;
            h.commit(
                worker,
                Commit {
                    count_restarts: vec![(cause, stop.len() as u64)],
                    ..Default::default()
                },
            )
            .await;
            Ok(format!(
                "scaled down from {current} to {n} instances in {} ms",
                ms(t)
            ))
        }
        ScalePlan::Same => {
            h.commit(
                worker,
                Commit {
                    desired: Some(n),
                    ..Default::default()
                },
            )
            .await;
            Ok(format!("already at {n} instances"))
        }
    }
}

/// Rolling deploy of `config` as `generation` to `target` instances: per batch of `max_surge`, start new instances,
/// wait until ready, route them and retire as many old ones in one store; the old ones drain
/// and stop meanwhile. Fails safe: a batch that does not become ready is stopped and, if
/// earlier batches were already switched, the previous configuration is rolled back.
pub fn rolling(
    h: &SupervisorHandle,
    worker: &str,
    config: Arc<WorkerConfig>,
    generation: u64,
    target: u32,
    cause: Cause,
) -> Boxed<Result<String>> {
    let h = h.clone();
    let worker = worker.to_string();
    Box::pin(async move {
        let v = view(&h, &worker).await?;
        let t = Instant::now();
        let old = v.serving();
        let fixed_port = config.port.is_some() && config.port == v.config.port;
        let mut plan = RollingPlan::new(old.clone(), target, config.deploy.max_surge, fixed_port);
        if !plan.stop_first().is_empty() {
            let stop = plan.stop_first().to_vec();
            wait_all(h.switch(&worker, Vec::new(), stop, Vec::new()).await).await;
        }
        let mut drains = Vec::new();
        let mut new_ids: Vec<u64> = Vec::new();
        while let Some(batch) = plan.next_batch() {
            let ids = match start_batch(&h, &worker, &config, generation, batch, 0).await {
                Ok(ids) => ids,
                Err(e) => {
                    wait_all(drains).await;
                    return Err(match plan.on_failure() {
                        OnBatchFailure::KeepOld => SupervisorError::DeployFailed {
                            worker: worker.clone(),
                            generation,
                            cause: Box::new(e),
                            outcome: format!("generation {} keeps serving", v.generation),
                        },
                        OnBatchFailure::RollBack => {
                            // Half switched: roll the new instances back to the previous
                            // configuration.
                            tracing::warn!(worker = %worker, error = %e, "rolling deploy failed midway: rolling back");
                            let back = rolling(
                                &h,
                                &worker,
                                v.config.clone(),
                                v.next_generation.max(generation) + 1,
                                v.desired,
                                Cause::Deploy,
                            )
                            .await;
                            SupervisorError::DeployFailed {
                                worker: worker.clone(),
                                generation,
                                cause: Box::new(e),
                                outcome: match back {
                                    Ok(_) => "rolled back to the previous configuration".into(),
                                    Err(b) => format!("rolling back also failed: {b}"),
                                },
                            }
                        }
                    });
                }
            };
            let first = plan.first_switch();
            let sw = plan.switch(&ids);
            drains.extend(h.switch(&worker, sw.route, sw.retire, Vec::new()).await);
            if first {
                h.commit(
                    &worker,
                    Commit {
                        config: Some((config.clone(), generation)),
                        desired: Some(target),
                        previous: if generation != v.generation {
                            Some(Some((v.config.clone(), v.generation)))
                        } else {
                            None
                        },
                        ..Default::default()
                    },
                )
                .await;
            }
            new_ids.extend(ids);
        }
        // More old instances than the target (the deploy also scaled down).
        drains.extend(
            h.switch(&worker, Vec::new(), plan.leftover(), Vec::new())
                .await,
        );
        wait_all(drains).await;
        h.commit(
            &worker,
            Commit {
                count_restarts: vec![(cause, old.len() as u64)],
                ..Default::default()
            },
        )
        .await;
        Ok(format!(
            "rolled {} instances to generation {generation} in {} ms",
            new_ids.len(),
            ms(t)
        ))
    })
}

/// Blue/green deploy: start the whole new generation unrouted, switch in one store once all
/// are ready, keep the old generation alive (unrouted) for `rollback_window`.
pub async fn bluegreen(
    h: &SupervisorHandle,
    worker: &str,
    config: Arc<WorkerConfig>,
    generation: u64,
) -> Result<String> {
    let v = view(h, worker).await?;
    let t = Instant::now();
    // Only one standby generation is kept.
    if let Some(sb) = &v.standby {
        let ids: Vec<u64> = v
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Standby && sb.ids.contains(&i.id))
            .map(|i| i.id)
            .collect();
        h.commit(
            worker,
            Commit {
                standby: Some(None),
                ..Default::default()
            },
        )
        .await;
        stop_all(h, worker, &ids, true).await;
    }
    let old = v.serving();
    let new_ids = start_batch(h, worker, &config, generation, config.instances, 0)
        .await
        .map_err(|e| SupervisorError::DeployFailed {
            worker: worker.into(),
            generation,
            cause: Box::new(e),
            outcome: format!("generation {} keeps serving", v.generation),
        })?;
    let window = config.deploy.rollback_window;
    let (route, retire, standby) = plan_bluegreen(&old, &new_ids, window);
    let drains = h.switch(worker, route, retire, standby.clone()).await;
    h.commit(
        worker,
        Commit {
            config: Some((config.clone(), generation)),
            desired: Some(config.instances),
            previous: Some(Some((v.config.clone(), v.generation))),
            standby: Some((!standby.is_empty()).then(|| StandbyInfo {
                generation: v.generation,
                config: v.config.clone(),
                ids: standby,
                until: Instant::now() + window,
            })),
            count_restarts: vec![(Cause::Deploy, old.len() as u64)],
            ..Default::default()
        },
    )
    .await;
    wait_all(drains).await;
    Ok(format!(
        "switched to generation {generation} ({} instances) in {} ms; generation {} kept for rollback for {}",
        new_ids.len(),
        ms(t),
        v.generation,
        humantime::format_duration(window)
    ))
}

/// Inside the blue/green window: route the standby generation again, in one store, starting
/// no process. Otherwise: deploy the previous configuration as a new generation.
pub async fn rollback(h: &SupervisorHandle, worker: &str) -> Result<String> {
    let v = view(h, worker).await?;
    let t = Instant::now();
    match plan_rollback(&v) {
        RollbackPlan::SwitchBack {
            generation,
            config,
            route,
            retire,
            missing,
        } => {
            // The current generation drains in the background (the owner carries it out).
            let _drains = h.switch(worker, route, retire, Vec::new()).await;
            h.commit(
                worker,
                Commit {
                    config: Some((config, generation)),
                    previous: Some(Some((v.config.clone(), v.generation))),
                    standby: Some(None),
                    ..Default::default()
                },
            )
            .await;
            let mut msg = format!(
                "switched back to generation {generation} in {} ms (no process started); draining generation {}",
                ms(t),
                v.generation
            );
            if missing > 0 {
                scale(h, worker, v.desired, Cause::Crash).await?;
                msg.push_str(&format!(
                    "; started {missing} instances to replace standby instances that had exited"
                ));
            }
            Ok(msg)
        }
        RollbackPlan::Redeploy {
            config,
            was,
            generation,
        } => {
            let r = match config.deploy.strategy {
                Strategy::Rolling => {
                    rolling(
                        h,
                        worker,
                        config.clone(),
                        generation,
                        config.instances,
                        Cause::Deploy,
                    )
                    .await
                }
                Strategy::Bluegreen => bluegreen(h, worker, config.clone(), generation).await,
                // Going back is not an experiment: the previous configuration rolls in.
                Strategy::Canary => {
                    rolling(
                        h,
                        worker,
                        config.clone(),
                        generation,
                        config.instances,
                        Cause::Deploy,
                    )
                    .await
                }
            }?;
            Ok(format!(
                "deployed the configuration of generation {was} again as generation {generation}: {r}"
            ))
        }
        RollbackPlan::Nothing => Err(SupervisorError::NothingToRollBack {
            worker: worker.into(),
        }),
    }
}

/// Deploys one worker's configuration as read from disk now.
async fn deploy_from_disk(
    h: &SupervisorHandle,
    worker: &str,
    strategy: Option<Strategy>,
) -> Result<String> {
    let current = h.config().await.ok_or(SupervisorError::ShuttingDown)?;
    let file = current.file.clone();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&file))
        .await
        .map_err(|e| SupervisorError::Internal(e.to_string()))?
        .map_err(|e| SupervisorError::InvalidConfig(e.to_string()))?;
    let Some(cfg) = loaded.workers.get(worker).cloned() else {
        return Err(SupervisorError::NotInConfig {
            worker: worker.into(),
            dir: loaded.workers_dir.display().to_string(),
        });
    };
    super::check_worker(&loaded, &cfg)
        .map_err(|e| SupervisorError::InvalidConfig(format!("{}: {e}", cfg.file.display())))?;
    let v = h
        .view(worker)
        .await
        .ok_or_else(|| SupervisorError::NotRunning {
            worker: worker.into(),
        })?;
    busy(h, worker, Some("deploy")).await;
    let r = deploy_config(h, worker, cfg, v.next_generation, strategy).await;
    busy(h, worker, None).await;
    r
}

async fn deploy_config(
    h: &SupervisorHandle,
    worker: &str,
    cfg: Arc<WorkerConfig>,
    generation: u64,
    strategy: Option<Strategy>,
) -> Result<String> {
    match strategy.unwrap_or(cfg.deploy.strategy) {
        Strategy::Rolling => {
            let n = cfg.instances;
            rolling(h, worker, cfg, generation, n, Cause::Deploy).await
        }
        Strategy::Bluegreen => bluegreen(h, worker, cfg, generation).await,
        Strategy::Canary => canary(h, worker, cfg, generation).await,
    }
}

/// Equal except for the instance count (a reload that only scales).
fn same_but_instances(a: &WorkerConfig, b: &WorkerConfig) -> bool {
    let mut b2 = b.clone();
    b2.instances = a.instances;
    *a == b2
}

/// A reload that changed nothing because the configuration is invalid.
fn refused(why: String) -> Outcome {
    METRICS.reloads.with_label_values(&["failed"]).inc();
    outcome("-", Err(SupervisorError::InvalidConfig(why)))
}

/// Reload: validate everything first (any error: nothing changes), then per worker: start
/// added ones, stop removed ones, deploy changed ones, leave the rest alone. Reloads are
/// serialized: a second one waits for the first.
pub async fn reload(h: &SupervisorHandle) -> Outcome {
    let _g = h.reload_lock.clone().lock_owned().await;
    let Some(current) = h.config().await else {
        return outcome("-", Err(SupervisorError::ShuttingDown));
    };
    let file = current.file.clone();
    let loaded = match tokio::task::spawn_blocking(move || Config::load(&file)).await {
        Ok(Ok(c)) => Arc::new(c),
        Ok(Err(e)) => return refused(e.to_string()),
        Err(e) => return outcome("-", Err(SupervisorError::Internal(e.to_string()))),
    };
    let problems = super::check_workers(&loaded);
    if !problems.is_empty() {
        return refused(problems.join("\n"));
    }
    let mut lines = Vec::new();
    // Certificates first: a broken one fails the whole reload before anything changed.
    if let Some(reload_tls) = h.tls_reloader.get() {
        match reload_tls(&loaded) {
            Ok(l) => lines.extend(l.into_iter().map(|message| OutcomeLine {
                worker: "-".into(),
                ok: true,
                message,
                kind: None,
            })),
            Err(e) => return refused(e),
        }
    }
    if loaded.listen != current.listen {
        lines.push(OutcomeLine {
            worker: "-".into(),
            ok: false,
            message: format!(
                "listen changed ({:?} → {:?}): listeners are not rebound by reload; run `tqproxy upgrade` to apply",
                current.listen, loaded.listen
            ),
            kind: None,
        });
    }
    if loaded.control_socket != current.control_socket || loaded.admin != current.admin {
        lines.push(OutcomeLine {
            worker: "-".into(),
            ok: false,
            message: "control.socket/control.admin changed: takes effect after `tqproxy upgrade` or a restart".into(),
            kind: None,
        });
    }
    // The request path reads its settings once (upstream_idle_timeout goes into each route
    // table, so it applies now).
    let proxy_now = crate::config::ProxySettings {
        upstream_idle_timeout: current.proxy.upstream_idle_timeout,
        ..loaded.proxy.clone()
    };
    if proxy_now != current.proxy {
        lines.push(OutcomeLine {
            worker: "-".into(),
            ok: false,
            message:
                "proxy settings changed: they take effect after `tqproxy upgrade` or a restart"
                    .into(),
            kind: None,
        });
    }
    if loaded.log.access_log != current.log.access_log
        || loaded.log.access_format != current.log.access_format
    {
        lines.push(OutcomeLine {
            worker: "-".into(),
            ok: false,
            message: "log.access_log/access_format changed: takes effect after `tqproxy upgrade` or a restart (reload only reopens the same file)".into(),
            kind: None,
        });
    }
    h.set_config(loaded.clone());
    let names: BTreeSet<String> = current
        .workers
        .keys()
        .chain(loaded.workers.keys())
        .cloned()
        .collect();
    let mut tasks = Vec::new();
    for name in names {
        let h = h.clone();
        let old = current.workers.get(&name).cloned();
        let new = loaded.workers.get(&name).cloned();
        tasks.push(tokio::spawn(async move {
            if h.in_canary(&name) {
                return (name.clone(), Err(in_canary(&name)));
            }
            let _g = h.lock(&name).await;
            let r = reload_worker(&h, &name, old, new).await;
            (name, r)
        }));
    }
    for t in tasks {
        match t.await {
            Ok((name, Ok(Some(message)))) => lines.push(OutcomeLine {
                worker: name,
                ok: true,
                message,
                kind: None,
            }),
            Ok((_, Ok(None))) => {}
            Ok((name, Err(e))) => lines.push(OutcomeLine {
                worker: name,
                ok: false,
                message: e.to_string(),
                kind: Some(e.kind()),
            }),
            Err(e) => lines.push(OutcomeLine {
                worker: "-".into(),
                ok: false,
                message: e.to_string(),
                kind: None,
            }),
        }
    }
    let ok = lines.iter().all(|l| l.ok);
    METRICS
        .reloads
        .with_label_values(&[if ok { "ok" } else { "failed" }])
        .inc();
    Outcome { ok, lines }
}

async fn reload_worker(
    h: &SupervisorHandle,
    name: &str,
    old: Option<Arc<WorkerConfig>>,
    new: Option<Arc<WorkerConfig>>,
) -> Result<Option<String>> {
    match (old, new) {
        (None, Some(cfg)) => {
            h.add_worker(cfg).await?;
            boot(h, name).await.map(|m| Some(format!("added: {m}")))
        }
        (Some(_), None) => {
            let t = Instant::now();
            // Returns once every instance has exited (the worker goes with the last).
            h.remove_worker(name).await;
            Ok(Some(format!(
                "removed (drained and stopped in {} ms)",
                ms(t)
            )))
        }
        (Some(_), Some(cfg)) => {
            let Some(v) = h.view(name).await else {
                h.add_worker(cfg).await?;
                return boot(h, name).await.map(|m| Some(format!("added: {m}")));
            };
            if *v.config == *cfg {
                return Ok(Some(format!("unchanged (generation {})", v.generation)));
            }
            if same_but_instances(&v.config, &cfg) {
                let r = scale(h, name, cfg.instances, Cause::Scale).await?;
                h.commit(
                    name,
                    Commit {
                        config: Some((cfg, v.generation)),
                        ..Default::default()
                    },
                )
                .await;
                return Ok(Some(r));
            }
            busy(h, name, Some("deploy")).await;
            let r = deploy_config(h, name, cfg, v.next_generation, None).await;
            busy(h, name, None).await;
            r.map(Some)
        }
        (None, None) => Ok(None),
    }
}

/// Replaces one instance gracefully (max_requests, memory): start its successor, route it,
/// then drain and stop the old one. Skipped while another operation holds the worker.
pub async fn recycle(h: &SupervisorHandle, worker: &str, id: u64, cause: Cause) {
    let Some(_g) = h.try_lock(worker) else { return };
    let Some(v) = h.view(worker).await else {
        return;
    };
    let Some(inst) = v.instances.iter().find(|i| i.id == id) else {
        return;
    };
    if !inst.state.is_routed() || inst.generation != v.generation {
        return;
    }
    tracing::info!(worker, instance = id, cause = cause.as_str(), "recycling");
    let ids = match start_batch(h, worker, &v.config, v.generation, 1, inst.restarts + 1).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(worker, instance = id, error = %e, "recycle: successor failed to start; keeping the instance");
            return;
        }
    };
    let drains = h.switch(worker, ids, vec![id], Vec::new()).await;
    h.commit(
        worker,
        Commit {
            count_restarts: vec![(cause, 1)],
            ..Default::default()
        },
    )
    .await;
    wait_all(drains).await;
}

/// A canary deploy of `config` as `generation`: the whole new generation starts unrouted, then
/// takes the share of each step of `deploy.canary.steps` (least outstanding within each
/// generation), judged by [`judge`] against the old generation over the same window. A breach,
/// or `tqproxy abort`, unroutes the canary, drains and stops it; after the last step (or
/// `tqproxy promote`) the old generation is retired.
pub async fn canary(
    h: &SupervisorHandle,
    worker: &str,
    config: Arc<WorkerConfig>,
    generation: u64,
) -> Result<String> {
    let Some(mut ctl) = h.canary_begin(worker) else {
        return Err(SupervisorError::Busy {
            worker: worker.into(),
            what: "a canary deploy".into(),
        });
    };
    let r = canary_steps(h, worker, config, generation, &mut ctl).await;
    h.set_canary(worker, None).await;
    h.canary_end(worker);
    r
}

async fn canary_steps(
    h: &SupervisorHandle,
    worker: &str,
    config: Arc<WorkerConfig>,
    generation: u64,
    ctl: &mut watch::Receiver<CanaryCmd>,
) -> Result<String> {
    let v = view(h, worker).await?;
    let t = Instant::now();
    let old = v.serving();
    let cfg = &config.deploy.canary;
    let new_ids = start_batch(h, worker, &config, generation, config.instances, 0)
        .await
        .map_err(|e| SupervisorError::DeployFailed {
            worker: worker.into(),
            generation,
            cause: Box::new(e),
            outcome: format!("generation {} keeps serving", v.generation),
        })?;
    let mut state = CanaryState {
        generation,
        baseline: v.generation,
        step: 0,
        steps: cfg.steps.clone(),
        permille: cfg.steps[0],
        window: Default::default(),
    };
    // The split first: until the new instances are routed, its share falls back to the old.
    h.set_canary(worker, Some(state.clone())).await;
    h.switch(worker, new_ids.clone(), Vec::new(), Vec::new())
        .await;
    tracing::info!(worker, generation, share = %percent(state.permille), "canary: first step");
    let mut by_hand = false;
    loop {
        let started = Instant::now();
        let before = h.answered(worker).await;
        let verdict = loop {
            tokio::select! {
                _ = tokio::time::sleep(CANARY_SAMPLE) => {}
                _ = ctl.changed() => {}
            }
            match *ctl.borrow() {
                CanaryCmd::Abort => break Verdict::Breach("aborted by `tqproxy abort`".into()),
                CanaryCmd::Promote => {
                    by_hand = true;
                    break Verdict::Pass;
                }
                CanaryCmd::Run => {}
            }
            let now = h.answered(worker).await;
            state.window = windows(&before, &now, generation);
            h.set_canary(worker, Some(state.clone())).await;
            match judge(
                cfg,
                state.permille,
                started.elapsed(),
                &state.window.0,
                &state.window.1,
            ) {
                Verdict::Wait => continue,
                v => break v,
            }
        };
        match verdict {
            Verdict::Breach(reason) => {
                tracing::warn!(worker, generation, %reason, "canary: rolling back");
                let drains = h
                    .switch(worker, Vec::new(), new_ids.clone(), Vec::new())
                    .await;
                h.set_canary(worker, None).await;
                wait_all(drains).await;
                return Err(SupervisorError::CanaryRolledBack {
                    worker: worker.into(),
                    generation,
                    baseline: v.generation,
                    reason,
                });
            }
            Verdict::Pass if by_hand || state.step + 1 == state.steps.len() => break,
            Verdict::Pass | Verdict::Wait => {
                state.step += 1;
                state.permille = state.steps[state.step];
                state.window = Default::default();
                h.set_canary(worker, Some(state.clone())).await;
                tracing::info!(worker, generation, share = %percent(state.permille), "canary: next step");
            }
        }
    }
    // 100 %: the old generation drains out of a table that already sends it nothing.
    let drains = h.switch(worker, Vec::new(), old.clone(), Vec::new()).await;
    h.set_canary(worker, None).await;
    h.commit(
        worker,
        Commit {
            config: Some((config.clone(), generation)),
            desired: Some(config.instances),
            previous: Some(Some((v.config.clone(), v.generation))),
            count_restarts: vec![(Cause::Deploy, old.len() as u64)],
            ..Default::default()
        },
    )
    .await;
    wait_all(drains).await;
    Ok(format!(
        "canary generation {generation} promoted to 100% at step {} of {}{} in {} ms; generation {} retired",
        state.step + 1,
        state.steps.len(),
        if by_hand { " by `tqproxy promote`" } else { "" },
        ms(t),
        v.generation
    ))
}

/// How often a canary step's figures are read.
const CANARY_SAMPLE: Duration = Duration::from_millis(200);

/// The canary's and the baseline's figures between two readings.
fn windows(
    before: &BTreeMap<u64, AnsweredSnapshot>,
    now: &BTreeMap<u64, AnsweredSnapshot>,
    canary: u64,
) -> (Window, Window) {
    let empty = AnsweredSnapshot::default();
    let mut base = AnsweredSnapshot::default();
    let mut can = AnsweredSnapshot::default();
    for (generation, snap) in now {
        let d = snap.since(before.get(generation).unwrap_or(&empty));
        if *generation == canary {
            can.add(&d);
        } else {
            base.add(&d);
        }
    }
    let w = |s: &AnsweredSnapshot| Window {
        requests: s.requests,
        errors: s.errors,
        p99: s.quantile(0.99),
    };
    (w(&can), w(&base))
}
