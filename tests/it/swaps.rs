//! Zero-downtime swaps under continuous load: reload, rolling restart, blue/green deploy and
//! rollback, recycling; failures that must leave the old generation serving.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A marker in every instance's environment, unique to the running test (tests run in
/// parallel threads named after the test).
fn mark(worker: &str) -> String {
    let test = std::thread::current()
        .name()
        .unwrap_or("main")
        .replace("::", "-");
    format!("{test}-{worker}")
}

fn versioned(name: &str, instances: u32, version: &str, extra: &str) -> WorkerDef {
    WorkerDef::backend(
        name,
        "[\"/\"]",
        instances,
        &format!(
            "env: {{ HELLO_VERSION: \"{version}\", TQ_TEST_MARK: \"{}\" }}\n{extra}",
            mark(name)
        ),
    )
}

fn pids(env: &Env, worker: &str) -> BTreeSet<u32> {
    env.instances(worker).iter().filter_map(|i| i.pid).collect()
}

fn routed_pids(env: &Env, worker: &str) -> BTreeSet<u32> {
    env.instances(worker)
        .iter()
        .filter(|i| i.routed)
        .filter_map(|i| i.pid)
        .collect()
}

/// Every process of this test's worker still alive (instances and anything they started).
fn live_processes(worker: &str) -> usize {
    processes_with_env(&format!("TQ_TEST_MARK={}", mark(worker))).len()
}

fn assert_no_failures(load: Load) -> u64 {
    let ok = load.finish_without_failures("load");
    assert!(ok > 0);
    ok
}

#[test]
fn twenty_reloads_of_a_changed_worker_under_load_fail_nothing() {
    let mut env = Env::new(&[versioned("w", 4, "v0", "")]);
    env.start();
    let fds_before = std::fs::read_dir(format!("/proc/{}/fd", env.pid()))
        .unwrap()
        .count();
    let load = Load::start(env.listen, "/", 8);
    load.wait_progress(100);
    let mut swap_ms = Vec::new();
    for i in 1..=20 {
        env.write_worker(&versioned("w", 4, &format!("v{i}"), ""));
        let t = Instant::now();
        let out = env.ok(&["reload"]);
        swap_ms.push(t.elapsed().as_millis());
        assert!(
            out.contains("w: ok: rolled 4 instances to generation"),
            "{out}"
        );
        // Every instance now runs the new version.
        let inst = env.wait_ready("w", 4);
        assert!(
            inst.iter().all(|x| x.generation == i as u64 + 1),
            "{inst:?}"
        );
        for _ in 0..8 {
            assert_eq!(env.get("/version").body.trim(), format!("v{i}"));
        }
        load.wait_progress(20);
    }
    let served = assert_no_failures(load);
    eprintln!("20 reloads, {served} requests, swap ms: {swap_ms:?}");
    // Nothing leaked: exactly the 4 live instances, their ports, no stray process.
    assert_eq!(live_processes("w"), 4);
    let st = env.worker("w");
    assert_eq!(st.restarts["deploy"], 80);
    assert_eq!(
        st.instances
            .iter()
            .filter_map(|i| i.port)
            .collect::<BTreeSet<_>>()
            .len(),
        4
    );
    let log_files = std::fs::read_dir(env.dir.path().join("logs"))
        .unwrap()
        .count();
    assert!(
        log_files <= 2,
        "one log per worker (+ access log), found {log_files}"
    );
    // Open file descriptors of tqproxy itself do not grow with reloads.
    // (the 8 load clients and their pooled upstream connections account for the difference)
    let fds = std::fs::read_dir(format!("/proc/{}/fd", env.pid()))
        .unwrap()
        .count();
    assert!(
        fds <= fds_before + 8 * 2 + 8,
        "tqproxy held {fds_before} fds before and {fds} after 20 reloads"
    );
}

#[test]
fn rolling_restart_keeps_the_generation_and_replaces_every_process() {
    let mut env = Env::new(&[versioned("w", 3, "v1", "deploy: { max_surge: 2 }\n")]);
    env.start();
    let before = pids(&env, "w");
    let generation = env.worker("w").generation;
    let load = Load::start(env.listen, "/", 6);
    load.wait_progress(100);
    let out = env.ok(&["restart", "w"]);
    assert!(out.contains("rolled 3 instances"), "{out}");
    load.wait_progress(100);
    assert_no_failures(load);
    let after = pids(&env, "w");
    assert!(before.is_disjoint(&after), "{before:?} vs {after:?}");
    assert_eq!(env.worker("w").generation, generation);
    for p in before {
        assert!(!alive(p));
    }
}

#[test]
fn five_bluegreen_deploys_and_rollbacks_under_load() {
    let bg = "deploy: { strategy: bluegreen, rollback_window: 60s }\n";
    let mut env = Env::new(&[versioned("w", 2, "blue", bg)]);
    env.start();
    let load = Load::start(env.listen, "/", 8);
    load.wait_progress(100);
    for round in 0..5 {
        // The routed ones: the previous round's rolled-back generation may still be draining.
        let old_pids = routed_pids(&env, "w");
        let old_gen = env.worker("w").generation;
        env.write_worker(&versioned("w", 2, &format!("green{round}"), bg));
        let out = env.ok(&["deploy", "w"]);
        assert!(out.contains("switched to generation"), "{out}");
        let st = env.worker("w");
        assert_eq!(st.routed_generations, vec![st.generation]);
        let sb = st.standby.as_ref().expect("previous generation kept");
        assert_eq!(sb.generation, old_gen);
        // The old generation is alive but unrouted.
        for i in st.instances.iter().filter(|i| i.generation == old_gen) {
            assert_eq!(
                (i.role.as_str(), i.routed, i.state.as_str()),
                ("standby", false, "ready")
            );
        }
        for _ in 0..6 {
            assert_eq!(env.get("/version").body.trim(), format!("green{round}"));
        }
        load.wait_progress(50);
        // Rollback inside the window: one switch, no process started.
        let out = env.ok(&["rollback", "w"]);
        assert!(out.contains("no process started"), "{out}");
        let st = env.worker("w");
        assert_eq!(st.routed_generations, vec![old_gen]);
        let routed: BTreeSet<u32> = st
            .instances
            .iter()
            .filter(|i| i.routed)
            .filter_map(|i| i.pid)
            .collect();
        assert_eq!(routed, old_pids, "rollback routes the very same processes");
        for _ in 0..6 {
            assert_eq!(env.get("/version").body.trim(), "blue");
        }
        load.wait_progress(50);
        // Put the file back so the next round deploys from "blue".
        env.write_worker(&versioned("w", 2, "blue", bg));
    }
    assert_no_failures(load);
    // The rolled-back generations drain away; only the blue instances remain.
    wait_for("only 2 processes left", Duration::from_secs(30), || {
        (live_processes("w") == 2).then_some(())
    });
}

#[test]
fn rollback_after_the_window_deploys_the_previous_config() {
    let bg = "deploy: { strategy: bluegreen, rollback_window: 1s }\n";
    let mut env = Env::new(&[versioned("w", 1, "one", bg)]);
    env.start();
    env.write_worker(&versioned("w", 1, "two", bg));
    env.ok(&["deploy", "w"]);
    wait_for("standby expired", Duration::from_secs(10), || {
        env.worker("w").standby.is_none().then_some(())
    });
    wait_for("old generation stopped", Duration::from_secs(10), || {
        (env.instances("w").len() == 1).then_some(())
    });
    let out = env.ok(&["rollback", "w"]);
    assert!(
        out.contains("deployed the configuration of generation 1 again"),
        "{out}"
    );
    assert_eq!(env.get("/version").body.trim(), "one");
    // Nothing to roll back to on a fresh worker.
    let mut fresh = Env::new(&[versioned("f", 1, "x", "")]);
    fresh.start();
    let o = fresh.cli(&["rollback", "f"]);
    assert_eq!(o.status.code(), Some(8), "nothing to roll back to");
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to roll back to"));
}

#[test]
fn max_requests_recycles_gracefully() {
    let mut env = Env::new(&[versioned("w", 2, "v", "max_requests: 300\n")]);
    env.start();
    let load = Load::start(env.listen, "/", 4);
    wait_for("a max_requests recycle", Duration::from_secs(60), || {
        (env.worker("w").restarts["max_requests"] >= 2).then_some(())
    });
    load.wait_progress(50);
    assert_no_failures(load);
    let st = env.worker("w");
    assert!(
        st.instances.iter().any(|i| i.restarts >= 1),
        "{:?}",
        st.instances
    );
}

#[test]
fn a_broken_config_changes_nothing() {
    let mut env = Env::new(&[versioned("w", 2, "v1", "")]);
    env.start();
    let before = pids(&env, "w");
    std::fs::write(
        env.worker_dir("w").join("worker.yaml"),
        "command: [\"/nonexistent\"]\ninstances: lots\n",
    )
    .unwrap();
    let o = env.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(7), "invalid configuration");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("configuration invalid, nothing changed")
            && out.contains("worker.yaml:2: instances"),
        "{out}"
    );
    assert_eq!(pids(&env, "w"), before);
    assert_eq!(env.get("/version").body.trim(), "v1");
    // SIGHUP with the same broken file: logged, nothing changes either.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(env.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("failed reload logged", Duration::from_secs(10), || {
        env.output().contains("configuration invalid").then_some(())
    });
    assert_eq!(pids(&env, "w"), before);
}

#[test]
fn a_new_version_that_cannot_start_leaves_the_old_one_serving() {
    let mut env = Env::new(&[versioned("w", 2, "good", "start_timeout: 5s\n")]);
    env.start();
    let before = pids(&env, "w");
    let load = Load::start(env.listen, "/", 4);
    load.wait_progress(50);
    // The new "version" crashes on start.
    env.write_worker(&WorkerDef::chaos(
        "w",
        "[\"/\"]",
        2,
        &format!(
            "env: {{ CHAOS_CRASH_ON_START: \"1\", TQ_TEST_MARK: \"{}\" }}\nstart_timeout: 5s\n",
            mark("w")
        ),
    ));
    let o = env.cli(&["deploy", "w"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("failed to start")
            && out.contains("keeps serving")
            && out.contains("exited with code 3"),
        "{out}"
    );
    // And one that never becomes healthy.
    env.write_worker(&WorkerDef::chaos(
        "w",
        "[\"/\"]",
        2,
        &format!(
            "env: {{ CHAOS_NEVER_READY: \"1\", TQ_TEST_MARK: \"{}\" }}\nstart_timeout: 1s\n",
            mark("w")
        ),
    ));
    let o = env.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("not ready within 1s"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    load.wait_progress(50);
    assert_no_failures(load);
    assert_eq!(pids(&env, "w"), before);
    assert_eq!(env.get("/version").body.trim(), "good");
    wait_for(
        "failed instances cleaned up",
        Duration::from_secs(10),
        || (live_processes("w") == 2).then_some(()),
    );
}

#[test]
fn reload_adds_removes_and_leaves_unchanged_workers_alone() {
    let mut env = Env::new(&[
        WorkerDef::backend("stay", "[\"/stay\"]", 2, ""),
        WorkerDef::backend("go", "[\"/go\"]", 1, ""),
    ]);
    env.start();
    let stay = pids(&env, "stay");
    env.remove_worker("go");
    env.write_worker(&WorkerDef::backend("new", "[\"/new\"]", 1, ""));
    let out = env.ok(&["reload"]);
    assert!(out.contains("stay: ok: unchanged"), "{out}");
    assert!(out.contains("go: ok: removed"), "{out}");
    assert!(out.contains("new: ok: added"), "{out}");
    assert_eq!(pids(&env, "stay"), stay);
    assert_eq!(
        env.get("/new").status,
        404,
        "backend has no /new path but the route reached it"
    );
    assert_eq!(env.get("/new").header("x-worker"), Some("new"));
    assert_eq!(env.get("/go").status, 404);
    assert!(env.get("/go").header("x-worker").is_none());
    let names: Vec<String> = env.status().workers.into_iter().map(|w| w.name).collect();
    assert_eq!(names, vec!["new", "stay"]);
    // Only the instance count changed: a scale, not a redeploy.
    env.write_worker(&WorkerDef::backend("stay", "[\"/stay\"]", 3, ""));
    let out = env.ok(&["reload"]);
    assert!(out.contains("scaled up from 2 to 3"), "{out}");
    assert!(stay.is_subset(&pids(&env, "stay")));
}

#[test]
fn concurrent_reloads_are_serialized() {
    let mut env = Env::new(&[versioned("w", 2, "a", "")]);
    env.start();
    env.write_worker(&versioned("w", 2, "b", ""));
    let conf = env.conf();
    let run = |conf: std::path::PathBuf| {
        std::thread::spawn(move || {
            std::process::Command::new(TQPROXY)
                .arg("-c")
                .arg(conf)
                .arg("reload")
                .output()
                .unwrap()
        })
    };
    let (a, b) = (run(conf.clone()), run(conf));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert!(a.status.success() && b.status.success());
    let outs = [
        String::from_utf8_lossy(&a.stdout).to_string(),
        String::from_utf8_lossy(&b.stdout).to_string(),
    ];
    // One of them rolled the worker, the other found it already up to date.
    assert_eq!(
        outs.iter()
            .filter(|o| o.contains("rolled 2 instances"))
            .count(),
        1,
        "{outs:?}"
    );
    assert_eq!(
        outs.iter().filter(|o| o.contains("unchanged")).count(),
        1,
        "{outs:?}"
    );
}

#[test]
fn long_requests_finish_during_a_rolling_restart() {
    let mut env = Env::new(&[versioned("w", 1, "v", "drain_timeout: 10s\n")]);
    env.start();
    let addr = env.listen;
    let slow = std::thread::spawn(move || request(addr, "GET", "/slow?ms=1500", None, &[], b""));
    let stream = std::thread::spawn(move || {
        request(
            addr,
            "GET",
            "/stream?chunks=10&interval_ms=150",
            None,
            &[],
            b"",
        )
    });
    wait_for("requests in flight", Duration::from_secs(10), || {
        (env.worker("w").in_flight == 2).then_some(())
    });
    env.ok(&["restart", "w"]);
    let r = slow.join().unwrap().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "slow done\n"));
    let r = stream.join().unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.lines().count(), 10, "{}", r.body);
}

#[test]
fn drain_timeout_bounds_a_request_that_never_ends() {
    let mut env = Env::new(&[versioned(
        "w",
        1,
        "v",
        "drain_timeout: 500ms\nstop_timeout: 500ms\n",
    )]);
    env.start();
    let addr = env.listen;
    let slow = std::thread::spawn(move || request(addr, "GET", "/slow?ms=60000", None, &[], b""));
    wait_for("request in flight", Duration::from_secs(10), || {
        (env.worker("w").in_flight == 1).then_some(())
    });
    env.ok(&["restart", "w"]);
    // The endless request was cut when its instance was stopped (not hung forever).
    let _ = slow.join().unwrap();
    assert_eq!(env.get("/version").status, 200);
}

#[test]
fn watch_rolls_a_rewritten_binary_and_survives_a_failed_build() {
    let mut env = Env::new(&[]);
    let bin = env.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(BACKEND, bin.join("app")).unwrap();
    let src = env.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // The "build" fails while src/broken exists.
    env.write_worker(&WorkerDef::new(
        "w",
        &format!(
            "command: [\"{}\"]\nroutes: [\"/\"]\ninstances: 2\nhealth: {{ path: /health, interval: 200ms }}\nbuild: {{ command: [\"sh\", \"-c\", \"test ! -e {0}/broken || {{ echo 'error: it does not compile' >&2; exit 1; }}\"], watch: [\"{}\"] }}\n",
            bin.join("app").display(),
            src.display()
        )
        .replace(&format!("{0}/broken", bin.join("app").display()), &format!("{}/broken", src.display())),
    ));
    env.spawn(&["--watch"]);
    env.wait_running();
    assert!(env.get("/").body.starts_with("hello from w"));
    let before: BTreeSet<u32> = pids(&env, "w");

    // A failed build: the old instances keep serving, and the log says why.
    std::fs::write(src.join("broken"), "x").unwrap();
    wait_for("build failure logged", Duration::from_secs(20), || {
        env.output()
            .contains("build failed, the running instances keep serving")
            .then_some(())
    });
    assert!(env.output().contains("it does not compile"));
    assert_eq!(pids(&env, "w"), before);
    std::fs::remove_file(src.join("broken")).unwrap();

    // A new binary written next to the old one and renamed over it (how deploys and linkers
    // replace a running executable): rolled within moments.
    let load = Load::start(env.listen, "/health", 2);
    let tmp = bin.join("app.new");
    std::fs::copy(CHAOS, &tmp).unwrap();
    let t = Instant::now();
    std::fs::rename(&tmp, bin.join("app")).unwrap();
    wait_for("new binary serving", Duration::from_secs(20), || {
        env.get("/").body.starts_with("chaos").then_some(())
    });
    let served_after = t.elapsed();
    eprintln!(
        "--watch: binary written → new version serving in {} ms",
        served_after.as_millis()
    );
    wait_for("old instances gone", Duration::from_secs(20), || {
        pids(&env, "w").is_disjoint(&before).then_some(())
    });
    assert_no_failures(load);
}
