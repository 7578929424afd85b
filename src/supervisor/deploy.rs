//! Orchestrations: scale, rolling and blue/green deploys, rollback, reload and recycling.
//!
//! Each is a plain sequence of awaits on supervisor primitives (start an instance, switch
//! routing in one store, drain and stop an instance), holding the worker's operation lock so
//! two changes to one worker never interleave. The owner keeps serving events meanwhile.
//!
//! Invariants kept here:
//! - capacity never drops: new instances are routed in the same store that unroutes the old;
//! - nothing is signalled while routed: `stop` unroutes, drains, then signals;
//! - a new generation that does not become ready is stopped and the old one keeps serving.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

use super::status::{Outcome, OutcomeLine};
use super::{
    Cause, Commit, Request, Role, StandbyInfo, State, SupervisorHandle, WorkerView, wait_exited,
    wait_ready,
};
use crate::config::{Config, Strategy, WorkerConfig};
use crate::metrics::METRICS;

/// Entry point for requests from the control socket and signals.
pub async fn run_request(h: &SupervisorHandle, req: Request) -> Outcome {
    match req {
        Request::Reload => reload(h).await,
        Request::Scale { worker, instances } => {
            let _g = h.lock(&worker).await;
            busy(h, &worker, Some("scale")).await;
            let r = scale(h, &worker, instances, Cause::Scale).await;
            busy(h, &worker, None).await;
            Outcome::single(&worker, r)
        }
        Request::Restart { worker } => {
            let _g = h.lock(&worker).await;
            let r = match h.view(&worker).await {
                None => Err(format!("no worker named `{worker}`")),
                Some(v) => {
                    busy(h, &worker, Some("restart")).await;
                    let r =
                        rolling(h, &worker, v.config.clone(), v.generation, Cause::Deploy).await;
                    busy(h, &worker, None).await;
                    r
                }
            };
            Outcome::single(&worker, r)
        }
        Request::Deploy { worker, strategy } => {
            let _g = h.lock(&worker).await;
            let r = deploy_from_disk(h, &worker, strategy).await;
            Outcome::single(&worker, r)
        }
        Request::Rollback { worker } => {
            let _g = h.lock(&worker).await;
            busy(h, &worker, Some("rollback")).await;
            let r = rollback(h, &worker).await;
            busy(h, &worker, None).await;
            Outcome::single(&worker, r)
        }
    }
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

fn serving(v: &WorkerView) -> Vec<u64> {
    v.instances
        .iter()
        .filter(|i| i.role == Role::Serving)
        .map(|i| i.id)
        .collect()
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
) -> Result<Vec<u64>, String> {
    let mut started = Vec::new();
    let mut waits = Vec::new();
    let mut failure = None;
    for _ in 0..n {
        match h
            .start(
                worker,
                config.clone(),
                generation,
                Role::Candidate,
                false,
                restarts,
            )
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
            if let Err(e) = wait_ready(rx).await {
                failure = Some(format!("instance {id}: {e}"));
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

/// Stops instances (in parallel) and waits until they have exited.
async fn stop_all(h: &SupervisorHandle, worker: &str, ids: &[u64], drain: bool) {
    let mut rxs = Vec::new();
    for id in ids {
        if let Some(rx) = h.stop(worker, *id, drain).await {
            rxs.push(rx);
        }
    }
    for mut rx in rxs {
        wait_exited(&mut rx).await;
    }
}

/// Starts the instances of a worker that was just added (at boot or by a reload). Serving
/// from the start: an instance that fails is restarted with backoff, like any crash.
pub async fn boot(h: &SupervisorHandle, worker: &str) -> Result<String, String> {
    let v = h
        .view(worker)
        .await
        .ok_or_else(|| format!("no worker named `{worker}`"))?;
    let t = Instant::now();
    let mut waits = Vec::new();
    for _ in 0..v.desired {
        waits.push(
            h.start(
                worker,
                v.config.clone(),
                v.generation,
                Role::Serving,
                true,
                0,
            )
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
        Err(format!(
            "not ready: {} (restarting with backoff)",
            errors.join("; ")
        ))
    }
}

/// Scales a worker to `n` serving instances.
pub async fn scale(
    h: &SupervisorHandle,
    worker: &str,
    n: u32,
    cause: Cause,
) -> Result<String, String> {
    let v = h
        .view(worker)
        .await
        .ok_or_else(|| format!("no worker named `{worker}`"))?;
    let current = serving(&v);
    let t = Instant::now();
    if n as usize > current.len() {
        let add = n - current.len() as u32;
        let ids = start_batch(h, worker, &v.config, v.generation, add, 0).await?;
        let roles = ids.iter().map(|i| (*i, Role::Serving)).collect();
        h.switch(worker, ids.clone(), Vec::new(), roles).await;
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
            "scaled up from {} to {n} instances in {} ms",
            current.len(),
            ms(t)
        ))
    } else if (n as usize) < current.len() {
        // Stop the ones that are not serving traffic first, then the newest.
        let mut order: Vec<(bool, u64)> = v
            .instances
            .iter()
            .filter(|i| i.role == Role::Serving)
            .map(|i| (i.state == State::Ready, i.id))
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let victims: Vec<u64> = order
            .iter()
            .take(current.len() - n as usize)
            .map(|(_, id)| *id)
            .collect();
        h.commit(
            worker,
            Commit {
                desired: Some(n),
                ..Default::default()
            },
        )
        .await;
        stop_all(h, worker, &victims, true).await;
        h.commit(
            worker,
            Commit {
                count_restarts: vec![(cause, victims.len() as u64)],
                ..Default::default()
            },
        )
        .await;
        Ok(format!(
            "scaled down from {} to {n} instances in {} ms",
            current.len(),
            ms(t)
        ))
    } else {
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

/// Rolling deploy of `config` as `generation`: per batch of `max_surge`, start new instances,
/// wait until ready, route them and unroute as many old ones in one store, drain and stop the
/// old ones in the background. Fails safe: a batch that does not become ready is stopped and,
/// if earlier batches were already switched, the previous configuration is rolled back.
pub fn rolling(
    h: &SupervisorHandle,
    worker: &str,
    config: Arc<WorkerConfig>,
    generation: u64,
    cause: Cause,
) -> Boxed<Result<String, String>> {
    let h = h.clone();
    let worker = worker.to_string();
    Box::pin(async move {
        let v = h
            .view(&worker)
            .await
            .ok_or_else(|| format!("no worker named `{worker}`"))?;
        let t = Instant::now();
        let old = serving(&v);
        let target = config.instances;
        let surge = config.deploy.max_surge.max(1);
        let mut new_ids: Vec<u64> = Vec::new();
        let mut drains = Vec::new();
        let mut next_old = 0usize;
        while (new_ids.len() as u32) < target {
            let batch = surge.min(target - new_ids.len() as u32);
            let ids = match start_batch(&h, &worker, &config, generation, batch, 0).await {
                Ok(ids) => ids,
                Err(e) => {
                    for d in drains {
                        let _ = d.await;
                    }
                    if new_ids.is_empty() {
                        return Err(format!(
                            "new generation {generation} failed to start, generation {} keeps serving: {e}",
                            v.generation
                        ));
                    }
                    // Half switched: roll the new instances back to the previous configuration.
                    tracing::warn!(worker = %worker, error = %e, "rolling deploy failed midway: rolling back");
                    let back = rolling(
                        &h,
                        &worker,
                        v.config.clone(),
                        v.next_generation.max(generation) + 1,
                        Cause::Deploy,
                    )
                    .await;
                    return Err(match back {
                        Ok(_) => format!(
                            "generation {generation} failed to start ({e}); rolled back to the previous configuration"
                        ),
                        Err(b) => format!(
                            "generation {generation} failed to start ({e}); rolling back also failed: {b}"
                        ),
                    });
                }
            };
            let victims: Vec<u64> = old.iter().skip(next_old).take(ids.len()).copied().collect();
            next_old += victims.len();
            let mut roles: Vec<(u64, Role)> = ids.iter().map(|i| (*i, Role::Serving)).collect();
            roles.extend(victims.iter().map(|i| (*i, Role::Retiring)));
            h.switch(&worker, ids.clone(), victims.clone(), roles).await;
            if new_ids.is_empty() {
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
            new_ids.extend(&ids);
            for victim in victims {
                let h = h.clone();
                let w = worker.clone();
                drains.push(tokio::spawn(async move {
                    stop_all(&h, &w, &[victim], true).await
                }));
            }
        }
        // More old instances than the target (the deploy also scaled down).
        let rest: Vec<u64> = old.iter().skip(next_old).copied().collect();
        stop_all(&h, &worker, &rest, true).await;
        for d in drains {
            let _ = d.await;
        }
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
) -> Result<String, String> {
    let v = h
        .view(worker)
        .await
        .ok_or_else(|| format!("no worker named `{worker}`"))?;
    let t = Instant::now();
    // Only one standby generation is kept.
    if let Some(sb) = &v.standby {
        let ids: Vec<u64> = v
            .instances
            .iter()
            .filter(|i| i.role == Role::Standby && sb.ids.contains(&i.id))
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
    let old = serving(&v);
    let new_ids = start_batch(h, worker, &config, generation, config.instances, 0)
        .await
        .map_err(|e| {
            format!(
                "new generation {generation} failed to start, generation {} keeps serving: {e}",
                v.generation
            )
        })?;
    let window = config.deploy.rollback_window;
    let old_role = if window.is_zero() {
        Role::Retiring
    } else {
        Role::Standby
    };
    let mut roles: Vec<(u64, Role)> = new_ids.iter().map(|i| (*i, Role::Serving)).collect();
    roles.extend(old.iter().map(|i| (*i, old_role)));
    h.switch(worker, new_ids.clone(), old.clone(), roles).await;
    h.commit(
        worker,
        Commit {
            config: Some((config.clone(), generation)),
            desired: Some(config.instances),
            previous: Some(Some((v.config.clone(), v.generation))),
            standby: Some((!window.is_zero() && !old.is_empty()).then(|| StandbyInfo {
                generation: v.generation,
                config: v.config.clone(),
                ids: old.clone(),
                until: Instant::now() + window,
            })),
            count_restarts: vec![(Cause::Deploy, old.len() as u64)],
            ..Default::default()
        },
    )
    .await;
    if window.is_zero() {
        stop_all(h, worker, &old, true).await;
    }
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
pub async fn rollback(h: &SupervisorHandle, worker: &str) -> Result<String, String> {
    let v = h
        .view(worker)
        .await
        .ok_or_else(|| format!("no worker named `{worker}`"))?;
    let t = Instant::now();
    if let Some(sb) = &v.standby {
        let ready: Vec<u64> = v
            .instances
            .iter()
            .filter(|i| {
                i.role == Role::Standby && i.state == State::Ready && sb.ids.contains(&i.id)
            })
            .map(|i| i.id)
            .collect();
        if !ready.is_empty() {
            let current = serving(&v);
            let mut roles: Vec<(u64, Role)> = ready.iter().map(|i| (*i, Role::Serving)).collect();
            roles.extend(current.iter().map(|i| (*i, Role::Retiring)));
            h.switch(worker, ready.clone(), current.clone(), roles)
                .await;
            h.commit(
                worker,
                Commit {
                    config: Some((sb.config.clone(), sb.generation)),
                    previous: Some(Some((v.config.clone(), v.generation))),
                    standby: Some(None),
                    ..Default::default()
                },
            )
            .await;
            let switched = ms(t);
            let h2 = h.clone();
            let w = worker.to_string();
            tokio::spawn(async move { stop_all(&h2, &w, &current, true).await });
            let mut msg = format!(
                "switched back to generation {} in {switched} ms (no process started); draining generation {}",
                sb.generation, v.generation
            );
            if (ready.len() as u32) < v.desired {
                scale(h, worker, v.desired, Cause::Crash).await?;
                msg.push_str(&format!(
                    "; started {} instances to replace standby instances that had exited",
                    v.desired - ready.len() as u32
                ));
            }
            return Ok(msg);
        }
    }
    let Some((config, generation)) = v.previous.clone() else {
        return Err(format!(
            "nothing to roll back to: worker `{worker}` has not been deployed since tqproxy started"
        ));
    };
    let new_gen = v.next_generation;
    let r = match config.deploy.strategy {
        Strategy::Rolling => rolling(h, worker, config.clone(), new_gen, Cause::Deploy).await,
        Strategy::Bluegreen => bluegreen(h, worker, config.clone(), new_gen).await,
    }?;
    Ok(format!(
        "deployed the configuration of generation {generation} again as generation {new_gen}: {r}"
    ))
}

/// Deploys one worker's configuration as read from disk now.
async fn deploy_from_disk(
    h: &SupervisorHandle,
    worker: &str,
    strategy: Option<Strategy>,
) -> Result<String, String> {
    let current = h.config().await.ok_or("tqproxy is shutting down")?;
    let file = current.file.clone();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&file))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("configuration invalid, nothing changed:\n{e}"))?;
    let Some(cfg) = loaded.workers.get(worker).cloned() else {
        return Err(format!(
            "no worker named `{worker}` in {}",
            loaded.workers_dir.display()
        ));
    };
    super::check_worker(&loaded, &cfg).map_err(|e| {
        format!(
            "configuration invalid, nothing changed:\n{}: {e}",
            cfg.file.display()
        )
    })?;
    let v = h.view(worker).await.ok_or_else(|| {
        format!("worker `{worker}` is not running; use `tqproxy reload` to add it")
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
) -> Result<String, String> {
    match strategy.unwrap_or(cfg.deploy.strategy) {
        Strategy::Rolling => rolling(h, worker, cfg, generation, Cause::Deploy).await,
        Strategy::Bluegreen => bluegreen(h, worker, cfg, generation).await,
    }
}

/// Equal except for the instance count (a reload that only scales).
fn same_but_instances(a: &WorkerConfig, b: &WorkerConfig) -> bool {
    let mut b2 = b.clone();
    b2.instances = a.instances;
    *a == b2
}

/// Reload: validate everything first (any error: nothing changes), then per worker: start
/// added ones, stop removed ones, deploy changed ones, leave the rest alone. Reloads are
/// serialized: a second one waits for the first.
pub async fn reload(h: &SupervisorHandle) -> Outcome {
    let _g = h.reload_lock.clone().lock_owned().await;
    let Some(current) = h.config().await else {
        return Outcome::single("-", Err(super::GONE.into()));
    };
    let file = current.file.clone();
    let loaded = match tokio::task::spawn_blocking(move || Config::load(&file)).await {
        Ok(Ok(c)) => Arc::new(c),
        Ok(Err(e)) => {
            METRICS.reloads.with_label_values(&["failed"]).inc();
            return Outcome {
                ok: false,
                lines: vec![OutcomeLine {
                    worker: "-".into(),
                    ok: false,
                    message: format!("configuration invalid, nothing changed:\n{e}"),
                    kind: None,
                }],
            };
        }
        Err(e) => return Outcome::single("-", Err(e.to_string())),
    };
    let problems = super::check_workers(&loaded);
    if !problems.is_empty() {
        METRICS.reloads.with_label_values(&["failed"]).inc();
        return Outcome::single(
            "-",
            Err(format!(
                "configuration invalid, nothing changed:\n{}",
                problems.join("\n")
            )),
        );
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
            Err(e) => {
                METRICS.reloads.with_label_values(&["failed"]).inc();
                return Outcome::single(
                    "-",
                    Err(format!("configuration invalid, nothing changed:\n{e}")),
                );
            }
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
            Ok((name, Err(message))) => lines.push(OutcomeLine {
                worker: name,
                ok: false,
                message,
                kind: None,
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
) -> Result<Option<String>, String> {
    match (old, new) {
        (None, Some(cfg)) => {
            h.add_worker(cfg).await?;
            boot(h, name).await.map(|m| Some(format!("added: {m}")))
        }
        (Some(_), None) => {
            let t = Instant::now();
            h.remove_worker(name).await;
            let deadline = Instant::now() + Duration::from_secs(600);
            while h.view(name).await.is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
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
    if inst.role != Role::Serving || inst.state != State::Ready || inst.generation != v.generation {
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
    let mut roles: Vec<(u64, Role)> = ids.iter().map(|i| (*i, Role::Serving)).collect();
    roles.push((id, Role::Retiring));
    h.switch(worker, ids, vec![id], roles).await;
    h.commit(
        worker,
        Commit {
            count_restarts: vec![(cause, 1)],
            ..Default::default()
        },
    )
    .await;
    stop_all(h, worker, &[id], true).await;
}
