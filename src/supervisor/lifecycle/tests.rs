//! The rules, one named test each: no process, no root, no runtime, no clock but the one
//! passed in.

use std::path::Path;

use super::*;

const W: &str = "api";

fn config(extra: &str) -> Arc<WorkerConfig> {
    let text = format!(
        "command: [\"/bin/true\"]\nroutes: [\"/\"]\ninstances: 2\n\
         restart: {{ backoff: 100ms, backoff_max: 1s, crashloop_after: 4, reset_after: 10s }}\n\
         drain_timeout: 7s\nstop_timeout: 3s\n{extra}"
    );
    Arc::new(
        WorkerConfig::from_text(Path::new("/tmp/tqproxy-lifecycle-test/api"), &text)
            .expect("valid worker.yaml")
            .expect("enabled"),
    )
}

struct World {
    r: Records,
    t0: Instant,
}

impl World {
    fn new(extra: &str) -> World {
        let mut r = Records::default();
        r.add_worker(config(extra)).unwrap();
        World {
            r,
            t0: Instant::now(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn cfg(&self) -> Arc<WorkerConfig> {
        self.r.worker(W).unwrap().config.clone()
    }

    fn state(&self, id: u64) -> Option<InstanceState> {
        self.r.record(W, id).map(|r| r.state)
    }

    fn epoch(&self, id: u64) -> u64 {
        self.r.record(W, id).unwrap().epoch
    }

    fn ev(&mut self, id: u64, e: Event, ms: u64) -> Vec<Effect> {
        let epoch = self.epoch(id);
        let now = self.at(ms);
        self.r.apply(W, id, epoch, e, now)
    }

    /// A new record started with `on_ready`, spawned and ready.
    fn ready(&mut self, on_ready: OnReady, ms: u64) -> u64 {
        let cfg = self.cfg();
        let (id, fx) = self.r.start(W, cfg, 1, on_ready, 0, self.at(ms)).unwrap();
        assert!(matches!(fx[..], [Effect::Spawn { first: true, .. }]));
        self.ev(
            id,
            Event::Spawned {
                pid: 100 + id as u32,
            },
            ms,
        );
        self.ev(
            id,
            Event::Ready {
                after: Duration::from_millis(5),
            },
            ms,
        );
        id
    }

    fn routed(&self) -> Vec<u64> {
        self.r.routed().map(|(_, r)| r.id).collect()
    }

    fn crash(&mut self, id: u64, ms: u64) -> Vec<Effect> {
        self.ev(
            id,
            Event::Exited {
                status: "exited with code 1".into(),
                oom: false,
            },
            ms,
        )
    }
}

fn timers(fx: &[Effect]) -> Vec<Duration> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::ArmTimer { after, .. } => Some(*after),
            _ => None,
        })
        .collect()
}

fn position(fx: &[Effect], f: impl Fn(&Effect) -> bool) -> Option<usize> {
    fx.iter().position(f)
}

fn signals(fx: &[Effect]) -> Vec<(u64, Signal)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Signal { id, signal, .. } => Some((*id, *signal)),
            _ => None,
        })
        .collect()
}

// --- guards -----------------------------------------------------------------------------

#[test]
fn guards_say_what_each_state_allows() {
    use InstanceState as S;
    let start = S::Starting {
        on_ready: OnReady::Route,
        failed: false,
    };
    // (state, can_route, can_signal, can_drain)
    let table = [
        (start, false, true, false),
        (S::Routed, true, false, true),
        (S::Held, true, true, true),
        (S::Standby, true, true, true),
        (S::Draining, false, false, false),
        (S::Stopping, false, true, false),
        (S::Exited { crashloop: false }, false, false, false),
        (S::Exited { crashloop: true }, false, false, false),
    ];
    for (s, route, signal, drain) in table {
        assert_eq!(s.can_route(), route, "{s:?} can_route");
        assert_eq!(s.can_signal(), signal, "{s:?} can_signal");
        assert_eq!(s.can_drain(), drain, "{s:?} can_drain");
    }
    assert_eq!(S::Routed.as_str(), "ready");
    // Every state has its label value in the instances gauge.
    for (s, ..) in table {
        assert!(
            crate::metrics::INSTANCE_STATES.contains(&s.as_str()),
            "{s:?}"
        );
    }
    assert_eq!(S::Standby.role_str(), "standby");
    assert_eq!(S::Exited { crashloop: true }.as_str(), "crashloop");
    assert_eq!(S::Exited { crashloop: false }.role_str(), "serving");
    assert_eq!(S::Draining.role_str(), "retiring");
    assert_eq!(
        S::Starting {
            on_ready: OnReady::Hold,
            failed: false
        }
        .role_str(),
        "candidate"
    );
}

// --- readiness ---------------------------------------------------------------------------

#[test]
fn a_serving_instance_is_routed_when_ready_and_a_candidate_is_held() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    let b = w.ready(OnReady::Hold, 0);
    assert_eq!(w.state(a), Some(InstanceState::Routed));
    assert_eq!(w.state(b), Some(InstanceState::Held));
    assert_eq!(w.routed(), vec![a]);
}

#[test]
fn ready_publishes_and_tells_watchers() {
    let mut w = World::new("");
    let cfg = w.cfg();
    let (id, _) = w.r.start(W, cfg, 1, OnReady::Route, 0, w.at(0)).unwrap();
    let fx = w.ev(
        id,
        Event::Ready {
            after: Duration::from_millis(4),
        },
        4,
    );
    assert!(fx.contains(&Effect::Publish));
    assert!(fx.contains(&Effect::Phase {
        worker: W.into(),
        id,
        phase: Phase::Ready
    }));
    // A second Ready (a stale duplicate) changes nothing.
    assert!(
        w.ev(
            id,
            Event::Ready {
                after: Duration::ZERO
            },
            5
        )
        .is_empty()
    );
}

#[test]
fn facts_of_an_older_process_are_ignored() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    w.crash(a, 10);
    w.ev(a, Event::RestartDue, 200);
    assert_eq!(w.epoch(a), 2);
    // The first process's late exit must not touch the second.
    let fx = w.r.apply(
        W,
        a,
        1,
        Event::Exited {
            status: "late".into(),
            oom: false,
        },
        w.at(210),
    );
    assert!(fx.is_empty());
    assert!(matches!(w.state(a), Some(InstanceState::Starting { .. })));
}

// --- crash backoff -----------------------------------------------------------------------

#[test]
fn crash_backoff_doubles_up_to_its_cap() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    let mut waits = Vec::new();
    let mut t = 0;
    for _ in 0..6 {
        t += 1;
        let fx = w.crash(a, t);
        waits.extend(timers(&fx));
        assert!(fx.contains(&Effect::CountRestart {
            worker: W.into(),
            cause: Cause::Crash
        }));
        let fx = w.ev(a, Event::RestartDue, t);
        assert!(matches!(fx[..], [Effect::Spawn { first: false, .. }]));
    }
    let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
    assert_eq!(w.r.record(W, a).unwrap().restarts, 6);
    assert_eq!(w.r.worker(W).unwrap().restarts[&Cause::Crash], 6);
}

#[test]
fn crashloop_after_consecutive_failures() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    for n in 1..=4u64 {
        w.crash(a, n);
        let expect = n >= 4;
        assert_eq!(
            w.state(a),
            Some(InstanceState::Exited { crashloop: expect }),
            "after {n} failures"
        );
        w.ev(a, Event::RestartDue, n);
    }
}

#[test]
fn reset_after_forgets_failures() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    w.crash(a, 1);
    w.ev(a, Event::RestartDue, 101);
    w.ev(
        a,
        Event::Ready {
            after: Duration::ZERO,
        },
        110,
    );
    w.crash(a, 120);
    assert_eq!(
        w.r.record(W, a).unwrap().failures,
        2,
        "short-lived: counted"
    );
    w.ev(a, Event::RestartDue, 400);
    w.ev(
        a,
        Event::Ready {
            after: Duration::ZERO,
        },
        400,
    );
    // Ready for 10 s (reset_after): the next crash starts the backoff from the beginning.
    let fx = w.crash(a, 10_400);
    assert_eq!(w.r.record(W, a).unwrap().failures, 1);
    assert_eq!(timers(&fx), vec![Duration::from_millis(100)]);
}

#[test]
fn an_out_of_memory_exit_counts_as_memory() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    let fx = w.ev(
        a,
        Event::Exited {
            status: "killed by SIGKILL".into(),
            oom: true,
        },
        1,
    );
    assert!(fx.contains(&Effect::CountRestart {
        worker: W.into(),
        cause: Cause::Memory
    }));
    assert_eq!(
        w.r.record(W, a).unwrap().last_exit.as_deref(),
        Some("killed by SIGKILL (out of memory)")
    );
}

#[test]
fn a_candidate_that_exits_is_removed_not_restarted() {
    let mut w = World::new("");
    let b = w.ready(OnReady::Hold, 0);
    let fx = w.crash(b, 5);
    assert!(timers(&fx).is_empty());
    assert!(w.state(b).is_none());
    let rel = position(&fx, |e| matches!(e, Effect::Release { .. })).unwrap();
    let forget = position(&fx, |e| matches!(e, Effect::Forget { .. })).unwrap();
    assert!(rel < forget);
}

#[test]
fn a_failed_start_is_killed_once_and_a_serving_one_backs_off() {
    let mut w = World::new("");
    let cfg = w.cfg();
    let (id, _) = w.r.start(W, cfg, 1, OnReady::Route, 0, w.at(0)).unwrap();
    let fx = w.ev(
        id,
        Event::StartFailed {
            reason: "not ready within 30s".into(),
        },
        30_000,
    );
    assert_eq!(signals(&fx), vec![(id, Signal::Kill)]);
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Phase {
            phase: Phase::Failed { .. },
            ..
        }
    )));
    // The monitor reports it again when the process exits before ready: no second kill.
    assert!(
        w.ev(
            id,
            Event::StartFailed {
                reason: "again".into()
            },
            30_001
        )
        .is_empty()
    );
    // A Ready that races the kill does not route it.
    assert!(
        w.ev(
            id,
            Event::Ready {
                after: Duration::ZERO
            },
            30_001
        )
        .is_empty()
    );
    let fx = w.crash(id, 30_002);
    assert_eq!(timers(&fx), vec![Duration::from_millis(100)]);
}

#[test]
fn a_restart_that_cannot_spawn_retries_after_backoff_max() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    w.crash(a, 1);
    w.ev(a, Event::RestartDue, 101);
    let fx = w.ev(
        a,
        Event::SpawnFailed {
            reason: "no free port in the worker port range".into(),
        },
        101,
    );
    assert_eq!(timers(&fx), vec![Duration::from_secs(1)]);
    assert_eq!(w.state(a), Some(InstanceState::Exited { crashloop: false }));
}

// --- liveness ----------------------------------------------------------------------------

#[test]
fn a_hung_instance_is_replaced_after_unhealthy_after() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    let fx = w.ev(
        a,
        Event::Unhealthy {
            reason: "3 consecutive failed health checks".into(),
        },
        1000,
    );
    // Unrouted first, then SIGTERM (no drain: it is hung), then a replacement.
    let unroute = position(&fx, |e| matches!(e, Effect::Unroute { id, .. } if *id == a)).unwrap();
    let sig = position(&fx, |e| matches!(e, Effect::Signal { id, .. } if *id == a)).unwrap();
    assert!(unroute < sig);
    assert_eq!(
        signals(&fx),
        vec![(
            a,
            Signal::Stop {
                timeout: Duration::from_secs(3)
            }
        )]
    );
    assert!(fx.contains(&Effect::CountRestart {
        worker: W.into(),
        cause: Cause::Liveness
    }));
    let new = fx
        .iter()
        .find_map(|e| match e {
            Effect::Spawn {
                id, first: true, ..
            } => Some(*id),
            _ => None,
        })
        .expect("a replacement");
    assert_eq!(w.state(a), Some(InstanceState::Stopping));
    assert_eq!(
        w.state(new),
        Some(InstanceState::Starting {
            on_ready: OnReady::Route,
            failed: false
        })
    );
    assert_eq!(w.r.record(W, new).unwrap().restarts, 1);
    // Its exit removes it; it is not restarted.
    w.crash(a, 1100);
    assert!(w.state(a).is_none());
}

#[test]
fn unhealthy_is_ignored_while_starting_or_retiring() {
    let mut w = World::new("");
    let cfg = w.cfg();
    let (s, _) = w.r.start(W, cfg, 1, OnReady::Route, 0, w.at(0)).unwrap();
    assert!(
        w.ev(s, Event::Unhealthy { reason: "x".into() }, 1)
            .is_empty()
    );
    let a = w.ready(OnReady::Route, 0);
    w.r.stop(W, a, true);
    assert!(
        w.ev(a, Event::Unhealthy { reason: "x".into() }, 1)
            .is_empty()
    );
}

#[test]
fn an_unhealthy_standby_is_stopped_without_replacement() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    w.r.switch(W, &[], &[], &[a]);
    let fx = w.ev(a, Event::Unhealthy { reason: "x".into() }, 1);
    assert!(!fx.iter().any(|e| matches!(e, Effect::Spawn { .. })));
    assert_eq!(w.state(a), Some(InstanceState::Stopping));
}

// --- stopping and draining ---------------------------------------------------------------

#[test]
fn unroute_comes_before_reading_in_flight() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    let fx = w.r.stop(W, a, true);
    let unroute = position(&fx, |e| matches!(e, Effect::Unroute { .. })).unwrap();
    let watch = position(&fx, |e| matches!(e, Effect::WatchDrain { .. })).unwrap();
    assert!(unroute < watch);
    assert!(fx.contains(&Effect::Publish));
    assert!(
        signals(&fx).is_empty(),
        "a draining instance is not signalled"
    );
    assert!(matches!(
        fx[watch],
        Effect::WatchDrain { timeout, .. } if timeout == Duration::from_secs(7)
    ));
    assert_eq!(w.state(a), Some(InstanceState::Draining));
    // The same through a switch that retires it.
    let b = w.ready(OnReady::Route, 0);
    let c = w.ready(OnReady::Hold, 0);
    let fx = w.r.switch(W, &[c], &[b], &[]);
    let unroute = position(&fx, |e| matches!(e, Effect::Unroute { id, .. } if *id == b)).unwrap();
    let watch = position(
        &fx,
        |e| matches!(e, Effect::WatchDrain { id, .. } if *id == b),
    )
    .unwrap();
    assert!(unroute < watch);
}

#[test]
fn a_drained_instance_gets_sigterm_with_its_stop_timeout() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    w.r.stop(W, a, true);
    let fx = w.ev(a, Event::Drained, 50);
    assert_eq!(
        signals(&fx),
        vec![(
            a,
            Signal::Stop {
                timeout: Duration::from_secs(3)
            }
        )]
    );
    assert_eq!(w.state(a), Some(InstanceState::Stopping));
    // A drain watch that ends late (the instance is stopping already) changes nothing.
    assert!(w.ev(a, Event::Drained, 60).is_empty());
}

#[test]
fn stopping_an_exited_instance_removes_it_at_once() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    w.crash(a, 1);
    let fx = w.r.stop(W, a, true);
    assert!(signals(&fx).is_empty());
    assert!(w.state(a).is_none());
    // Its restart timer then finds nothing.
    assert!(w.r.apply(W, a, 1, Event::RestartDue, w.at(200)).is_empty());
}

#[test]
fn stop_without_drain_signals_a_starting_instance() {
    let mut w = World::new("");
    let cfg = w.cfg();
    let (s, _) = w.r.start(W, cfg, 1, OnReady::Hold, 0, w.at(0)).unwrap();
    let fx = w.r.stop(W, s, false);
    assert_eq!(signals(&fx).len(), 1);
    assert!(!fx.contains(&Effect::Publish), "it was never routed");
}

#[test]
fn a_port_is_released_only_after_its_holder_exited() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    let mut all = w.r.stop(W, a, true);
    all.extend(w.ev(a, Event::Drained, 10));
    assert!(
        !all.iter().any(|e| matches!(e, Effect::Release { .. })),
        "stopping is not exiting"
    );
    let fx = w.crash(a, 20);
    assert!(fx.contains(&Effect::Release {
        worker: W.into(),
        id: a
    }));
}

#[test]
fn never_signals_a_routed_instance() {
    // Random sequences of every command and event; after each step, every signal went to an
    // instance that is not routed, and one that was routed was unrouted earlier in the same
    // step. A draining instance is only signalled by its Drained event.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..200 {
        let mut w = World::new("");
        for step in 0..60u64 {
            let ids: Vec<u64> =
                w.r.worker(W)
                    .map_or(Vec::new(), |x| x.instances.keys().copied().collect());
            let pick = |r: &mut dyn FnMut(u64) -> u64| {
                if ids.is_empty() {
                    None
                } else {
                    Some(ids[r(ids.len() as u64) as usize])
                }
            };
            let before: BTreeMap<u64, InstanceState> =
                ids.iter().map(|id| (*id, w.state(*id).unwrap())).collect();
            let t = step * 10;
            let (fx, event) = match rand(12) {
                0 | 1 => {
                    let on = if rand(2) == 0 {
                        OnReady::Route
                    } else {
                        OnReady::Hold
                    };
                    let cfg = w.cfg();
                    (
                        w.r.start(W, cfg, 1, on, 0, w.at(t))
                            .map(|x| x.1)
                            .unwrap_or_default(),
                        None,
                    )
                }
                2 => match pick(&mut rand) {
                    Some(id) => {
                        let drain = rand(2) == 0;
                        // An explicit stop without drain (the shutdown after its drain
                        // timeout) may cut a drain short.
                        let label = (!drain).then_some((id, Event::Drained));
                        (w.r.stop(W, id, drain), label)
                    }
                    None => continue,
                },
                3 => {
                    let a = pick(&mut rand);
                    let b = pick(&mut rand);
                    let (route, retire): (Vec<u64>, Vec<u64>) = match (a, b) {
                        (Some(a), Some(b)) if a != b => (vec![a], vec![b]),
                        _ => continue,
                    };
                    (w.r.switch(W, &route, &retire, &[]), None)
                }
                4 => match pick(&mut rand) {
                    Some(id) => (w.r.switch(W, &[], &[], &[id]), None),
                    None => continue,
                },
                n => {
                    let Some(id) = pick(&mut rand) else { continue };
                    let e = match n {
                        5 => Event::Ready {
                            after: Duration::ZERO,
                        },
                        6 => Event::StartFailed { reason: "x".into() },
                        7 => Event::Unhealthy { reason: "x".into() },
                        8 => Event::Exited {
                            status: "x".into(),
                            oom: false,
                        },
                        9 => Event::Drained,
                        10 => Event::RestartDue,
                        _ => Event::SpawnFailed { reason: "x".into() },
                    };
                    (w.ev(id, e.clone(), t), Some((id, e)))
                }
            };
            for (i, e) in fx.iter().enumerate() {
                let Effect::Signal { id, .. } = e else {
                    continue;
                };
                if let Some(s) = w.state(*id) {
                    assert!(
                        !s.is_routed(),
                        "round {round} step {step}: {id} signalled routed"
                    );
                }
                if before.get(id).is_some_and(|s| s.is_routed()) {
                    assert!(
                        fx[..i]
                            .iter()
                            .any(|x| matches!(x, Effect::Unroute { id: u, .. } if u == id)),
                        "round {round} step {step}: routed {id} signalled without unroute: {fx:?}"
                    );
                }
                if before.get(id) == Some(&InstanceState::Draining) {
                    assert!(
                        matches!(&event, Some((e_id, Event::Drained)) if e_id == id),
                        "round {round} step {step}: draining {id} signalled by {event:?}"
                    );
                }
            }
        }
    }
}

// --- switches, rolling, blue/green, rollback ---------------------------------------------

#[test]
fn a_switch_is_one_store() {
    let mut w = World::new("");
    let old = [w.ready(OnReady::Route, 0), w.ready(OnReady::Route, 0)];
    let new = [w.ready(OnReady::Hold, 0), w.ready(OnReady::Hold, 0)];
    let fx = w.r.switch(W, &new, &old, &[]);
    assert_eq!(fx.iter().filter(|e| **e == Effect::Publish).count(), 1);
    assert_eq!(w.routed(), new.to_vec());
    for id in old {
        assert_eq!(w.state(id), Some(InstanceState::Draining));
    }
}

/// Runs a rolling deploy of `target` instances over `old` routed ones with `surge`, as
/// deploy.rs does, checking the routed count after every store.
fn roll(old_n: u32, target: u32, surge: u32) -> Vec<usize> {
    let mut w = World::new("");
    let old: Vec<u64> = (0..old_n).map(|_| w.ready(OnReady::Route, 0)).collect();
    let mut plan = RollingPlan::new(old, target, surge, false);
    let mut routed_after = Vec::new();
    while let Some(n) = plan.next_batch() {
        assert!(n <= surge.max(1));
        let ids: Vec<u64> = (0..n).map(|_| w.ready(OnReady::Hold, 0)).collect();
        let sw = plan.switch(&ids);
        w.r.switch(W, &sw.route, &sw.retire, &[]);
        routed_after.push(w.routed().len());
    }
    w.r.switch(W, &[], &plan.leftover(), &[]);
    routed_after.push(w.routed().len());
    routed_after
}

#[test]
fn rolling_capacity_never_below_desired() {
    for (old, target, surge) in [
        (4, 4, 1),
        (4, 4, 2),
        (4, 4, 3),
        (3, 3, 5),
        (2, 4, 1),
        (4, 2, 1),
    ] {
        let counts = roll(old, target, surge);
        let (last, steps) = counts.split_last().unwrap();
        for c in steps {
            assert!(
                *c >= old.min(target) as usize,
                "old {old} target {target} surge {surge}: {counts:?}"
            );
        }
        assert_eq!(
            *last, target as usize,
            "old {old} target {target} surge {surge}"
        );
    }
}

#[test]
fn rolling_rolls_back_when_a_later_batch_fails() {
    let mut plan = RollingPlan::new(vec![1, 2, 3], 3, 1, false);
    assert!(plan.stop_first().is_empty());
    assert_eq!(plan.on_failure(), OnBatchFailure::KeepOld);
    assert!(plan.first_switch());
    assert_eq!(plan.next_batch(), Some(1));
    assert_eq!(
        plan.switch(&[10]),
        Switch {
            route: vec![10],
            retire: vec![1]
        }
    );
    assert!(!plan.first_switch());
    assert_eq!(plan.on_failure(), OnBatchFailure::RollBack);
}

/// A fixed port is held by one process: the old instances stop before the first batch, none
/// is retired by a batch, and a failed first batch rolls back (nothing old is left serving).
#[test]
fn rolling_on_a_fixed_port_stops_the_old_first() {
    let mut plan = RollingPlan::new(vec![1], 1, 1, true);
    assert_eq!(plan.stop_first(), &[1]);
    assert_eq!(plan.on_failure(), OnBatchFailure::RollBack);
    assert_eq!(plan.next_batch(), Some(1));
    assert_eq!(
        plan.switch(&[7]),
        Switch {
            route: vec![7],
            retire: vec![]
        }
    );
    assert!(plan.leftover().is_empty());
    assert_eq!(plan.next_batch(), None);
    // No old instance (a first start on the port): nothing to stop, nothing to roll back to.
    let plan = RollingPlan::new(vec![], 1, 1, true);
    assert!(plan.stop_first().is_empty());
    assert_eq!(plan.on_failure(), OnBatchFailure::KeepOld);
}

#[test]
fn bluegreen_keeps_the_old_generation_as_standby_for_the_window() {
    let mut w = World::new("");
    let old = vec![w.ready(OnReady::Route, 0), w.ready(OnReady::Route, 0)];
    let new = vec![w.ready(OnReady::Hold, 0), w.ready(OnReady::Hold, 0)];
    let (route, retire, standby) = plan_bluegreen(&old, &new, Duration::from_secs(60));
    assert!(retire.is_empty());
    let fx = w.r.switch(W, &route, &retire, &standby);
    assert_eq!(fx.iter().filter(|e| **e == Effect::Publish).count(), 1);
    assert!(signals(&fx).is_empty());
    assert_eq!(w.routed(), new);
    for id in &old {
        assert_eq!(w.state(*id), Some(InstanceState::Standby));
    }
    // No window: the old generation is retired in the same store.
    let (_, retire, standby) = plan_bluegreen(&old, &new, Duration::ZERO);
    assert_eq!((retire, standby), (old, Vec::new()));
}

fn with_standby(w: &mut World) -> (Vec<u64>, Vec<u64>) {
    let old = vec![w.ready(OnReady::Route, 0), w.ready(OnReady::Route, 0)];
    let new = vec![w.ready(OnReady::Hold, 0), w.ready(OnReady::Hold, 0)];
    w.r.switch(W, &new, &[], &old);
    let cfg = w.cfg();
    w.r.commit(
        W,
        Commit {
            config: Some((cfg.clone(), 2)),
            previous: Some(Some((cfg.clone(), 1))),
            standby: Some(Some(StandbyInfo {
                generation: 1,
                config: cfg,
                ids: old.clone(),
                until: w.at(60_000),
            })),
            ..Default::default()
        },
        w.at(0),
    );
    (old, new)
}

#[test]
fn rollback_inside_the_window_switches_back_without_a_process() {
    let mut w = World::new("");
    let (old, new) = with_standby(&mut w);
    let v = w.r.view(W).unwrap();
    let RollbackPlan::SwitchBack {
        generation,
        route,
        retire,
        missing,
        ..
    } = plan_rollback(&v)
    else {
        panic!("expected a switch back");
    };
    assert_eq!((generation, &route, &retire, missing), (1, &old, &new, 0));
    let fx = w.r.switch(W, &route, &retire, &[]);
    assert!(!fx.iter().any(|e| matches!(e, Effect::Spawn { .. })));
    assert_eq!(w.routed(), old);
}

#[test]
fn rollback_inside_the_window_replaces_standby_instances_that_exited() {
    let mut w = World::new("");
    let (old, _) = with_standby(&mut w);
    w.crash(old[0], 5);
    let RollbackPlan::SwitchBack { route, missing, .. } = plan_rollback(&w.r.view(W).unwrap())
    else {
        panic!("expected a switch back");
    };
    assert_eq!((route, missing), (vec![old[1]], 1));
}

#[test]
fn rollback_after_the_window_redeploys_the_previous_configuration() {
    let mut w = World::new("");
    let (old, new) = with_standby(&mut w);
    let fx = w.r.standby_expired(W, 1);
    for id in &old {
        assert_eq!(w.state(*id), Some(InstanceState::Draining));
    }
    assert!(fx.iter().any(|e| matches!(e, Effect::WatchDrain { .. })));
    assert_eq!(w.routed(), new, "the current generation is untouched");
    match plan_rollback(&w.r.view(W).unwrap()) {
        RollbackPlan::Redeploy {
            was, generation, ..
        } => assert_eq!((was, generation), (1, 3)),
        other => panic!("expected a redeploy, got {other:?}"),
    }
}

#[test]
fn a_stale_standby_expiry_changes_nothing() {
    let mut w = World::new("");
    let (old, _) = with_standby(&mut w);
    assert!(w.r.standby_expired(W, 7).is_empty());
    assert_eq!(w.state(old[0]), Some(InstanceState::Standby));
}

#[test]
fn a_standby_window_arms_its_timer() {
    let mut w = World::new("");
    let old = w.ready(OnReady::Route, 0);
    let cfg = w.cfg();
    let fx = w.r.commit(
        W,
        Commit {
            standby: Some(Some(StandbyInfo {
                generation: 1,
                config: cfg,
                ids: vec![old],
                until: w.at(30_000),
            })),
            ..Default::default()
        },
        w.at(10_000),
    );
    assert!(fx.contains(&Effect::ArmTimer {
        after: Duration::from_secs(20),
        timer: Timer::StandbyExpiry {
            worker: W.into(),
            generation: 1
        }
    }));
}

#[test]
fn nothing_to_roll_back_before_any_deploy() {
    let w = World::new("");
    assert!(matches!(
        plan_rollback(&w.r.view(W).unwrap()),
        RollbackPlan::Nothing
    ));
}

// --- scale -------------------------------------------------------------------------------

#[test]
fn scale_down_stops_instances_not_serving_traffic_first_then_the_newest() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    let b = w.ready(OnReady::Route, 0);
    let c = w.ready(OnReady::Route, 0);
    w.crash(a, 1); // exited: serving but not ready
    let v = w.r.view(W).unwrap();
    assert_eq!(plan_scale(&v, 1), ScalePlan::Down { stop: vec![a, c] });
    assert_eq!(plan_scale(&v, 5), ScalePlan::Up { add: 2 });
    assert_eq!(plan_scale(&v, 3), ScalePlan::Same);
    let _ = b;
}

#[test]
fn candidates_and_standby_are_not_capacity() {
    let mut w = World::new("");
    w.ready(OnReady::Route, 0);
    w.ready(OnReady::Hold, 0);
    let s = w.ready(OnReady::Route, 0);
    w.r.switch(W, &[], &[], &[s]);
    assert_eq!(w.r.view(W).unwrap().serving().len(), 1);
}

// --- recycling ---------------------------------------------------------------------------

#[test]
fn max_requests_and_memory_recycle_once() {
    let mut w = World::new("max_requests: 1000\nrecycle_memory: 100MiB\n");
    let a = w.ready(OnReady::Route, 0);
    let b = w.ready(OnReady::Route, 0);
    let c = w.ready(OnReady::Hold, 0);
    let usage = |_: &str, id: u64| Usage {
        requests: if id == a || id == c { 1000 } else { 10 },
        memory: Some(if id == b { 200 << 20 } else { 1 << 20 }),
    };
    let due = recycle_due(&mut w.r, usage);
    assert_eq!(
        due,
        vec![
            (W.to_string(), a, Cause::MaxRequests),
            (W.to_string(), b, Cause::Memory)
        ],
        "only routed instances, each once"
    );
    assert!(recycle_due(&mut w.r, usage).is_empty(), "already underway");
    w.r.recycle_done(W, a);
    assert_eq!(recycle_due(&mut w.r, usage).len(), 1);
}

// --- workers and shutdown ----------------------------------------------------------------

#[test]
fn a_worker_cannot_be_added_twice_but_can_be_re_added_while_removing() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    assert_eq!(
        w.r.add_worker(w.cfg()),
        Err(SupervisorError::WorkerExists { worker: W.into() })
    );
    w.r.remove_worker(W);
    assert!(w.r.worker(W).unwrap().removing);
    assert!(w.routed().is_empty());
    assert!(matches!(
        w.r.start(W, w.cfg(), 1, OnReady::Route, 0, w.at(0)),
        Err(SupervisorError::WorkerRemoving { .. })
    ));
    w.r.add_worker(w.cfg()).unwrap();
    // The draining instance is kept until it exits.
    assert_eq!(w.state(a), Some(InstanceState::Draining));
}

#[test]
fn a_removed_worker_goes_with_its_last_instance() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    w.r.remove_worker(W);
    w.ev(a, Event::Drained, 1);
    let fx = w.crash(a, 2);
    assert!(fx.contains(&Effect::WorkerGone { worker: W.into() }));
    assert!(w.r.worker(W).is_none());
}

#[test]
fn commands_on_unknown_workers_say_so() {
    let mut r = Records::default();
    assert_eq!(
        r.start("nope", config(""), 1, OnReady::Route, 0, Instant::now())
            .map(|x| x.0),
        Err(SupervisorError::NoSuchWorker {
            worker: "nope".into()
        })
    );
    assert!(r.stop("nope", 1, true).is_empty());
    assert!(r.view("nope").is_none());
}

#[test]
fn shutdown_starts_nothing_and_restarts_nothing() {
    let mut w = World::new("");
    let a = w.ready(OnReady::Route, 0);
    let cfg = w.cfg();
    let (s, _) = w.r.start(W, cfg, 1, OnReady::Route, 0, w.at(0)).unwrap();
    let fx = w.r.shutdown();
    assert!(matches!(
        fx[..],
        [Effect::WatchAllDrained { timeout }] if timeout == Duration::from_secs(7)
    ));
    assert!(w.r.shutdown().is_empty(), "once");
    assert!(matches!(
        w.r.start(W, w.cfg(), 1, OnReady::Route, 0, w.at(1)),
        Err(SupervisorError::ShuttingDown)
    ));
    // Ready during shutdown: not routed.
    w.ev(
        s,
        Event::Ready {
            after: Duration::ZERO,
        },
        2,
    );
    assert_eq!(w.state(s), Some(InstanceState::Held));
    // A crash now is final.
    let fx = w.crash(a, 3);
    assert!(timers(&fx).is_empty());
    assert!(w.state(a).is_none());
    let fx = w.r.all_drained();
    assert_eq!(signals(&fx).len(), 1);
    w.crash(s, 4);
    assert!(w.r.finished());
}

// --- canary ------------------------------------------------------------------------------

fn canary_cfg() -> crate::config::CanaryConfig {
    crate::config::CanaryConfig {
        steps: vec![50, 250, 1000],
        step_interval: Duration::from_secs(30),
        max_error_rate: 0.01,
        max_p99: Some(Duration::from_millis(200)),
        min_requests: 100,
    }
}

fn win(requests: u64, errors: u64, p99_ms: u64) -> Window {
    Window {
        requests,
        errors,
        p99: Some(Duration::from_millis(p99_ms)),
    }
}

#[test]
fn a_canary_step_waits_for_min_requests_and_its_interval() {
    let cfg = canary_cfg();
    let base = win(2000, 0, 10);
    let t = Duration::from_secs;
    assert_eq!(
        judge(&cfg, 50, t(60), &win(99, 0, 10), &base),
        Verdict::Wait
    );
    assert_eq!(
        judge(&cfg, 50, t(29), &win(500, 0, 10), &base),
        Verdict::Wait
    );
    assert_eq!(
        judge(&cfg, 50, t(30), &win(100, 0, 10), &base),
        Verdict::Pass
    );
}

#[test]
fn a_canary_breach_is_called_as_soon_as_it_has_min_requests() {
    let cfg = canary_cfg();
    let v = judge(
        &cfg,
        250,
        Duration::from_secs(1),
        &win(812, 154, 10),
        &win(3000, 3, 10),
    );
    let Verdict::Breach(why) = v else {
        panic!("{v:?}")
    };
    assert_eq!(
        why,
        "canary error rate 0.19 > 0.01 over 812 requests at step 25% (old generation 0.00 over 3000)"
    );
    let v = judge(
        &cfg,
        50,
        Duration::from_secs(1),
        &win(100, 0, 450),
        &win(3000, 0, 20),
    );
    assert!(
        matches!(&v, Verdict::Breach(w) if w.starts_with("canary p99 450 ms > 200 ms over 100 requests at step 5%")),
        "{v:?}"
    );
}

#[test]
fn a_canary_no_worse_than_the_old_generation_is_not_blamed() {
    // Both fail alike (a dependency is down): not the canary's fault.
    let cfg = canary_cfg();
    let t = Duration::from_secs(30);
    assert_eq!(
        judge(&cfg, 50, t, &win(200, 20, 300), &win(4000, 800, 400)),
        Verdict::Pass
    );
}

#[test]
fn a_canary_split_and_its_end_republish_the_table() {
    let mut w = World::new("");
    let state = CanaryState {
        generation: 2,
        baseline: 1,
        step: 0,
        steps: vec![50, 1000],
        permille: 50,
        window: Default::default(),
    };
    assert_eq!(
        w.r.set_canary(W, Some(state.clone())),
        vec![Effect::Publish]
    );
    // New figures, same share: nothing to publish.
    let mut later = state.clone();
    later.window.0.requests = 10;
    assert!(w.r.set_canary(W, Some(later)).is_empty());
    let mut next = state;
    next.permille = 1000;
    assert_eq!(w.r.set_canary(W, Some(next)), vec![Effect::Publish]);
    assert_eq!(w.r.set_canary(W, None), vec![Effect::Publish]);
    assert_eq!(percent(50), "5%");
    assert_eq!(percent(5), "0.5%");
}

#[test]
fn a_status_line_is_kept_on_the_record_without_effects_and_forgotten_by_a_restart() {
    let mut w = World::new("");
    let id = w.ready(OnReady::Route, 0);
    let fx = w.ev(
        id,
        Event::Status {
            text: "warming up".into(),
        },
        1,
    );
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(
        w.r.record(W, id).unwrap().status.as_deref(),
        Some("warming up")
    );
    // A status of an older process changes nothing.
    let epoch = w.epoch(id);
    w.r.apply(
        W,
        id,
        epoch + 1,
        Event::Status {
            text: "stale".into(),
        },
        w.at(2),
    );
    assert_eq!(
        w.r.record(W, id).unwrap().status.as_deref(),
        Some("warming up")
    );
    // The next process of the record starts without one.
    let fx = w.crash(id, 10);
    let after = timers(&fx)[0];
    w.ev(id, Event::RestartDue, 10 + after.as_millis() as u64);
    assert_eq!(w.r.record(W, id).unwrap().status, None);
}
