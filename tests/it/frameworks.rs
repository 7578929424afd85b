//! Workers on real frameworks (issue 13, part 5), each the shipped `workers/<name>/` directory
//! as it is (with `enabled: false` taken out): a WSGI application under Debian's gunicorn on
//! the socket tqproxy passes as fd 3 inside a network namespace, a Node.js `http` server on
//! `PORT`, and a Go `net/http` server on fd 3 (socket activation). Each serves, and a rolling
//! restart under load fails not one request, every old process exiting 0 on its SIGTERM.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::harness::*;

/// Under /var/lib, not /tmp: the workers run as dynamic users that must reach their files.
const BASE: &str = "/var/lib/tqproxy-it";

/// Whether `program` is installed; in CI (which runs `scripts/deps.sh --test`) a missing one
/// fails the test instead of skipping it.
fn installed(program: &str) -> bool {
    if Path::new(program).is_file() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{program} is not installed: run scripts/deps.sh --test"
    );
    eprintln!("skipped: {program} is not installed (scripts/deps.sh --test installs it)");
    false
}

/// The shipped worker directory's worker.yaml, enabled, with faster health checks.
fn shipped_worker(name: &str) -> WorkerDef {
    let p = repo().join("workers").join(name).join("worker.yaml");
    let yaml = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        yaml.lines().any(|l| l == "enabled: false"),
        "{}: shipped disabled (the development config does not need its runtime)",
        p.display()
    );
    let yaml = yaml.replace("enabled: false\n", "").replace(
        "health: { path: /health, interval: 1s",
        "health: { path: /health, interval: 200ms",
    );
    assert!(yaml.contains("interval: 200ms"), "{yaml}");
    WorkerDef::new(name, &yaml)
}

/// Every file of the shipped worker directory but worker.yaml, copied next to the test's.
fn copy_sources(env: &Env, name: &str) {
    let from = repo().join("workers").join(name);
    for e in std::fs::read_dir(&from).unwrap().flatten() {
        let file = e.file_name();
        if file != "worker.yaml" && e.path().is_file() {
            std::fs::copy(e.path(), env.worker_dir(name).join(&file)).unwrap();
        }
    }
}

fn pids(env: &Env, worker: &str) -> BTreeSet<u32> {
    env.instances(worker).iter().filter_map(|i| i.pid).collect()
}

/// Starts the worker, checks its answer, then a rolling restart under 4 keep-alive clients:
/// 0 failed requests, every process replaced, each old one gone with exit code 0.
fn serves_and_rolls_without_a_failure(env: &mut Env, name: &str, expect: &str) {
    env.start();
    let path = format!("/{name}/");
    let r = env.get(&path);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains(expect), "{:?} not in {:?}", expect, r.body);
    let r = env.get(&format!("/{name}/slow?ms=50"));
    assert_eq!((r.status, r.body.as_str()), (200, "slow done\n"));

    let before = pids(env, name);
    assert_eq!(before.len(), 2, "{before:?}");
    let load = Load::start(env.listen, &path, 4);
    load.wait_progress(100);
    let out = env.ok(&["restart", name]);
    assert!(out.contains("rolled 2 instances"), "{out}");
    load.wait_progress(100);
    let ok = load.finish_without_failures(&format!("{name}: rolling restart"));
    assert!(ok >= 200, "{ok}");
    eprintln!("{name}: {ok} requests through a rolling restart, 0 failed");

    let after = pids(env, name);
    assert!(before.is_disjoint(&after), "{before:?} then {after:?}");
    for p in &before {
        wait_for(
            &format!("old {name} process {p} gone"),
            std::time::Duration::from_secs(15),
            || (!alive(*p)).then_some(()),
        );
    }
    // Graceful on SIGTERM: the two replaced instances exited on their own, with 0 (the log
    // line is written by the worker's log thread, a moment after the exit).
    let log = wait_for(
        &format!("two clean exits in {name}'s log"),
        std::time::Duration::from_secs(10),
        || {
            let log = env.worker_log(name);
            let clean = log
                .lines()
                .filter(|l| l.contains("tqproxy| exited: exited with code 0"))
                .count();
            (clean >= 2).then_some(log)
        },
    );
    assert!(!log.contains("SIGKILL"), "{name}: killed\n{log}");
}

#[test]
fn gunicorn_serves_a_wsgi_app_on_the_passed_socket_and_rolls_without_a_failure() {
    if !installed("/usr/bin/gunicorn") {
        return;
    }
    let w = shipped_worker("gunicorn");
    assert!(w.yaml.contains("\"--bind\", \"fd://3\""), "{}", w.yaml);
    assert!(w.yaml.contains("namespaces: [mount, pid, ipc, uts, net]"));
    let mut env = Env::new_in(Path::new(BASE), &[w]);
    copy_sources(&env, "gunicorn");
    serves_and_rolls_without_a_failure(&mut env, "gunicorn", "hello from gunicorn gunicorn");
    // The answer came through gunicorn itself, its arbiter a process of the instance.
    let r = env.get("/gunicorn/");
    assert_eq!(r.header("server"), Some("gunicorn"), "{:?}", r.headers);
}

#[test]
fn node_serves_on_port_and_rolls_without_a_failure() {
    if !installed("/usr/bin/node") {
        return;
    }
    let mut env = Env::new_in(Path::new(BASE), &[shipped_worker("node")]);
    copy_sources(&env, "node");
    serves_and_rolls_without_a_failure(&mut env, "node", "hello from node node instance");
    let log = env.worker_log("node");
    assert!(log.contains("listening on 127.0.0.1:"), "{log}");
    assert!(log.contains("node: SIGTERM: finishing"), "{log}");
}

/// `workers/go/build` once per test process: target/go/goworker.
fn goworker() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let o = std::process::Command::new(repo().join("workers/go/build"))
            .output()
            .expect("run workers/go/build");
        assert!(
            o.status.success(),
            "workers/go/build: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let bin = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        assert!(bin.is_file(), "{}", bin.display());
        bin
    })
}

#[test]
fn go_serves_on_the_socket_from_listen_fds_and_rolls_without_a_failure() {
    if !installed("/usr/bin/go") {
        return;
    }
    let bin = goworker();
    let mut w = shipped_worker("go");
    assert!(
        w.yaml.contains("\"../../target/go/goworker\""),
        "{}",
        w.yaml
    );
    w.yaml = w.yaml.replace(
        "\"../../target/go/goworker\"",
        &format!("\"{}\"", bin.display()),
    );
    let mut env = Env::new_in(Path::new(BASE), &[w]);
    copy_sources(&env, "go");
    // `via fd 3`: socket activation, the listener tqproxy bound outside the net namespace.
    serves_and_rolls_without_a_failure(&mut env, "go", "via fd 3");
    let log = env.worker_log("go");
    assert!(log.contains("goworker: SIGTERM: finishing"), "{log}");
}
