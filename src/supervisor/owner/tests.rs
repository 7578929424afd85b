//! The driver and the orchestrations together, with a fake launcher (no process, no root,
//! no cgroup) and paused tokio time: what only shows when commands, timers and drains run
//! concurrently.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;

use super::*;
use crate::supervisor::instance::Fact;
use crate::supervisor::{Request, SupervisorHandle, wait_exited};

/// How a fake instance behaves, from its worker's `env: { FAKE: ... }`: `ready:<ms>` (ready
/// after that long, then serves until signalled), `crash:<ms>` (exits with code 1 that long
/// after being ready).
#[derive(Default)]
struct Fake {
    launches: AtomicU32,
    /// Instances launched and not ready yet, now and at most.
    starting: AtomicU32,
    max_starting: AtomicU32,
    pids: Mutex<HashMap<u64, u32>>,
}

impl Launcher for Arc<Fake> {
    fn launch(
        &self,
        l: Launch,
        tx: mpsc::UnboundedSender<Msg>,
    ) -> Result<mpsc::UnboundedSender<lifecycle::Signal>, String> {
        let n = self.launches.fetch_add(1, Ordering::SeqCst) + 1;
        let spec = l.config.env.get("FAKE").cloned().unwrap_or_default();
        let (kind, ms) = spec.split_once(':').unwrap_or(("ready", "10"));
        let ms: u64 = ms.parse().unwrap_or(10);
        let crash = kind == "crash";
        let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<lifecycle::Signal>();
        let (worker, id, epoch) = (l.worker.clone(), l.id, l.epoch);
        self.pids.lock().unwrap().insert(id, 1000 + n);
        let me = self.clone();
        let now = me.starting.fetch_add(1, Ordering::SeqCst) + 1;
        me.max_starting.fetch_max(now, Ordering::SeqCst);
        tokio::spawn(async move {
            let send = |fact| {
                let _ = tx.send(Msg::Instance {
                    worker: worker.clone(),
                    id,
                    epoch,
                    fact,
                });
            };
            send(Fact::Spawned { pid: 1000 + n });
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                _ = ctl_rx.recv() => {
                    me.starting.fetch_sub(1, Ordering::SeqCst);
                    return send(exit("killed"));
                }
            }
            me.starting.fetch_sub(1, Ordering::SeqCst);
            send(Fact::Ready {
                after: Duration::from_millis(ms),
            });
            if crash {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => send(exit("exited with code 1")),
                    _ = ctl_rx.recv() => send(exit("exited with code 0")),
                }
            } else {
                // Serves until signalled (or until the owner drops the channel).
                let _ = ctl_rx.recv().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                send(exit("exited with code 0"));
            }
        });
        Ok(ctl_tx)
    }
}

fn exit(status: &str) -> Fact {
    Fact::Exited {
        status: status.into(),
        oom: false,
    }
}

struct Setup {
    h: SupervisorHandle,
    routes: Arc<RouteHandle>,
    fake: Arc<Fake>,
    owner: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// A tqproxy.yaml and one worker `w` with `extra` in its worker.yaml, loaded as tqproxy
/// loads them; the owner running with the fake launcher.
fn setup(instances: u32, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("conf")).unwrap();
    std::fs::create_dir_all(root.join("workers/w")).unwrap();
    std::fs::write(
        root.join("conf/tqproxy.yaml"),
        "listen: [\"127.0.0.1:1\"]\nworkers_dir: ../workers\nlogs_dir: ../logs\nrun_dir: ../run\n\
         ports: \"41000-41999\"\ncgroups: { mode: off }\n",
    )
    .unwrap();
    std::fs::write(
        root.join("workers/w/worker.yaml"),
        format!(
            "command: [\"/bin/true\"]\nroutes: [\"/\"]\ninstances: {instances}\n\
             health: {{ interval: 1s, timeout: 1s }}\n\
             deploy: {{ strategy: rolling, max_surge: 1 }}\n{extra}"
        ),
    )
    .unwrap();
    let config = Arc::new(Config::load(&root.join("conf/tqproxy.yaml")).expect("config"));
    let (tx, rx) = mpsc::unbounded_channel();
    let h = SupervisorHandle {
        tx,
        tls_reloader: Default::default(),
        locks: Default::default(),
        reload_lock: Default::default(),
        canaries: Default::default(),
    };
    let routes = RouteHandle::new();
    let fake = Arc::new(Fake::default());
    let env = Env {
        launcher: Arc::new(fake.clone()),
        cgroups: None,
        metrics: Arc::new(GlobalMetrics),
    };
    let owner = tokio::spawn(Owner::new(config, routes.clone(), h.clone(), env).run(rx));
    Setup {
        h,
        routes,
        fake,
        owner,
        _dir: dir,
    }
}

/// The instances of `w` in the current route table.
fn routed(s: &Setup) -> Vec<Arc<Instance>> {
    s.routes
        .load()
        .lookup(None, "/")
        .map(|r| r.backend.instances.clone())
        .unwrap_or_default()
}

async fn serving(s: &Setup) -> usize {
    s.h.view("w").await.unwrap().serving().len()
}

/// Samples the route table every virtual millisecond; returns the smallest count seen.
fn sample_min(
    s: &Setup,
) -> (
    tokio::task::JoinHandle<usize>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let routes = s.routes.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let t = tokio::spawn(async move {
        let mut min = usize::MAX;
        for _ in 0..1_000_000 {
            if st.load(Ordering::SeqCst) {
                break;
            }
            let n = routes
                .load()
                .lookup(None, "/")
                .map_or(0, |r| r.backend.instances.len());
            min = min.min(n);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        min
    });
    (t, stop)
}

#[tokio::test(start_paused = true)]
async fn boot_routes_every_instance_once_ready() {
    let s = setup(2, "env: { FAKE: \"ready:20\" }\n");
    let out = deploy::boot(&s.h, "w").await.unwrap();
    assert!(out.starts_with("started 2 instances"), "{out}");
    assert_eq!(routed(&s).len(), 2);
    assert_eq!(s.fake.launches.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_crashing_instance_is_restarted_with_backoff_in_place() {
    let s = setup(
        1,
        "env: { FAKE: \"crash:50\" }\n\
         restart: { backoff: 1s, backoff_max: 8s, crashloop_after: 3 }\n",
    );
    deploy::boot(&s.h, "w").await.unwrap();
    // Ready at 50 ms, exits at 100 ms, restarts 1 s later, and so on: 1 s, 2 s, 4 s.
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    let st = s.h.status().await.unwrap();
    let w = &st.workers[0];
    assert_eq!(w.instances.len(), 1, "restarted in place, same record");
    assert_eq!(w.restarts["crash"], 3, "{w:?}");
    assert_eq!(w.instances[0].state, "crashloop");
    assert_eq!(s.fake.launches.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_drain_ends_when_in_flight_reaches_zero_not_at_the_timeout() {
    let s = setup(1, "env: { FAKE: \"ready:10\" }\ndrain_timeout: 60s\n");
    deploy::boot(&s.h, "w").await.unwrap();
    let inst = routed(&s).pop().unwrap();
    assert!(inst.try_acquire());
    let mut rx = s.h.stop("w", inst.id, true).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        *rx.borrow(),
        Phase::Draining,
        "a request is still in flight"
    );
    assert!(!inst.routed.load(Ordering::SeqCst));
    assert!(!inst.try_acquire(), "no new request once unrouted");
    let t = tokio::time::Instant::now();
    inst.release(true);
    wait_exited(&mut rx).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the last release ends the drain (virtual time: {:?})",
        t.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn scale_up_and_down_during_a_deploy() {
    let s = setup(2, "env: { FAKE: \"ready:30\" }\n");
    deploy::boot(&s.h, "w").await.unwrap();
    let (sampler, stop) = sample_min(&s);
    let h = s.h.clone();
    let deploy =
        tokio::spawn(async move { h.request(Request::Restart { worker: "w".into() }).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let h = s.h.clone();
    let up = tokio::spawn(async move {
        h.request(Request::Scale {
            worker: "w".into(),
            instances: 4,
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let h = s.h.clone();
    let down = tokio::spawn(async move {
        h.request(Request::Scale {
            worker: "w".into(),
            instances: 1,
        })
        .await
    });
    let (d, u, n) = (
        deploy.await.unwrap(),
        up.await.unwrap(),
        down.await.unwrap(),
    );
    assert!(d.ok && u.ok && n.ok, "{d:?} {u:?} {n:?}");
    assert!(u.lines[0].message.contains("from 2 to 4"), "{u:?}");
    assert!(n.lines[0].message.contains("from 4 to 1"), "{n:?}");
    stop.store(true, Ordering::SeqCst);
    assert!(
        sampler.await.unwrap() >= 1,
        "the worker was never without a routed instance"
    );
    assert_eq!(serving(&s).await, 1);
    assert_eq!(routed(&s).len(), 1);
    assert_eq!(s.h.view("w").await.unwrap().desired, 1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_commands_are_serialized() {
    let s = setup(2, "env: { FAKE: \"ready:40\" }\n");
    deploy::boot(&s.h, "w").await.unwrap();
    s.fake.max_starting.store(0, Ordering::SeqCst);
    // A rolling restart (one at a time: max_surge 1) and two scale-ups by one, at once: if
    // they interleaved, two candidates would be starting together.
    let mut tasks = Vec::new();
    for req in [
        Request::Restart { worker: "w".into() },
        Request::Scale {
            worker: "w".into(),
            instances: 3,
        },
        Request::Scale {
            worker: "w".into(),
            instances: 4,
        },
        Request::Restart { worker: "w".into() },
    ] {
        let h = s.h.clone();
        tasks.push(tokio::spawn(async move { h.request(req).await }));
    }
    for t in tasks {
        let o = t.await.unwrap();
        assert!(o.ok, "{o:?}");
    }
    assert_eq!(s.fake.max_starting.load(Ordering::SeqCst), 1);
    assert_eq!(routed(&s).len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_failed_rolling_batch_leaves_the_old_generation_serving() {
    let s = setup(2, "env: { FAKE: \"ready:10\" }\n");
    deploy::boot(&s.h, "w").await.unwrap();
    let before: Vec<u64> = routed(&s).iter().map(|i| i.id).collect();
    // A configuration whose instances crash before they are ready (start timeout 1 s).
    let v = s.h.view("w").await.unwrap();
    let mut bad = (*v.config).clone();
    bad.env.insert("FAKE".into(), "ready:5000".into());
    bad.start_timeout = Duration::from_millis(100);
    let bad = Arc::new(bad);
    // The fake does not enforce start_timeout (the monitor does): fail it by hand.
    let h = s.h.clone();
    let t = tokio::spawn(async move { deploy::rolling(&h, "w", bad, 2, 2, Cause::Deploy).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cand =
        s.h.view("w")
            .await
            .unwrap()
            .instances
            .iter()
            .find(|i| i.generation == 2)
            .map(|i| i.id)
            .unwrap();
    let epoch = 1;
    s.h.send(Msg::Instance {
        worker: "w".into(),
        id: cand,
        epoch,
        fact: Fact::StartFailed {
            reason: "not ready within 100ms".into(),
        },
    });
    let err = t.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), crate::supervisor::ErrorKind::DeployFailed);
    assert!(
        err.to_string().contains("generation 1 keeps serving"),
        "{err}"
    );
    let after: Vec<u64> = routed(&s).iter().map(|i| i.id).collect();
    assert_eq!(before, after);
}

#[tokio::test(start_paused = true)]
async fn nothing_outlives_the_owner() {
    let s = setup(
        1,
        "env: { FAKE: \"crash:20\" }\n\
         restart: { backoff: 10s, backoff_max: 10s }\n",
    );
    deploy::boot(&s.h, "w").await.unwrap();
    // It crashed, and its restart is 10 s away.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.fake.launches.load(Ordering::SeqCst), 1);
    s.h.shutdown().await;
    s.owner.await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        s.fake.launches.load(Ordering::SeqCst),
        1,
        "no restart after the owner stopped"
    );
    assert!(s.h.view("w").await.is_none(), "the owner is gone");
}

/// The CPU rate comes from two reads of the counter and their own times; the first read has
/// none, a counter that went back (a new process) has none, and a second without growth is 0.
#[test]
fn the_cpu_rate_is_computed_between_two_samples() {
    let t0 = std::time::Instant::now();
    let first = InstanceStats::default().next(Some(1), Some(10.0), t0);
    assert_eq!(first.cpu_rate, None);
    let second = first.next(Some(1), Some(10.5), t0 + Duration::from_secs(2));
    assert_eq!(second.cpu_rate, Some(0.25));
    let idle = second.next(Some(1), Some(10.5), t0 + Duration::from_secs(3));
    assert_eq!(idle.cpu_rate, Some(0.0));
    let reset = idle.next(Some(1), Some(0.1), t0 + Duration::from_secs(4));
    assert_eq!(reset.cpu_rate, None);
    let unknown = reset.next(None, None, t0 + Duration::from_secs(5));
    assert_eq!((unknown.cpu_rate, unknown.cpu_seconds), (None, None));
}
