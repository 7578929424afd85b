//! `transport: unix`: tqproxy creates a unix socket per instance under its run directory,
//! passes it as fd 3, and the proxy (HTTP/1.1 and HTTP/2) and the health checks reach the
//! instance over it. The socket files live exactly as long as their instances.

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

fn unix_backend(name: &str, instances: u32, extra: &str) -> WorkerDef {
    WorkerDef::backend(
        name,
        "[\"/\"]",
        instances,
        &format!("transport: unix\n{extra}"),
    )
}

/// `<run_dir>/sockets/<tqproxy pid>`: where this tqproxy's instance sockets live.
fn socket_dir(env: &Env) -> PathBuf {
    env.dir
        .path()
        .join("run/sockets")
        .join(env.pid().to_string())
}

/// Every file under `<run_dir>/sockets` (any tqproxy process).
fn socket_files(env: &Env) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(env.dir.path().join("run/sockets")) else {
        return out;
    };
    for d in dirs.flatten() {
        if let Ok(files) = std::fs::read_dir(d.path()) {
            out.extend(files.flatten().map(|f| f.path()));
        }
    }
    out.sort();
    out
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// The socket inodes a process holds open (`/proc/<pid>/fd/* -> socket:[inode]`).
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| {
            t.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Inodes of the sockets listed in `/proc/net/<table>` (of our network namespace), with the
/// `st` column equal to `state` when given (`0A` = TCP LISTEN). The inode is column 10 in the
/// tcp tables and column 7 in `unix`.
fn proc_net_inodes(table: &str, state: Option<&str>) -> BTreeSet<u64> {
    let (inode_col, state_col) = if table == "unix" { (6, 5) } else { (9, 3) };
    std::fs::read_to_string(format!("/proc/net/{table}"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if state.is_some_and(|s| cols.get(state_col) != Some(&s)) {
                return None;
            }
            cols.get(inode_col)?.parse().ok()
        })
        .collect()
}

fn has_env(pid: u32, key: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|b| *b == 0)
        .any(|kv| kv.starts_with(format!("{key}=").as_bytes()))
}

#[test]
fn unix_instances_serve_through_the_proxy_and_listen_on_no_port() {
    let mut env = Env::with_global(
        &[unix_backend("w", 2, "")],
        "log: { access_log: ../logs/access.log }\n",
    );
    env.start();
    let inst = env.wait_ready("w", 2);
    let dir = socket_dir(&env);
    for i in &inst {
        // The status names the socket instead of a port …
        assert_eq!(i.port, None, "{i:?}");
        let socket = PathBuf::from(i.socket.as_deref().expect("a unix instance has a socket"));
        // … a file under the run dir, named by the worker, the instance id and its epoch.
        assert_eq!(socket, dir.join(format!("w.{}.1.sock", i.id)));
        assert!(is_socket(&socket), "{} is not a socket", socket.display());
        // The worker got it as fd 3, and no PORT.
        let pid = i.pid.unwrap();
        assert!(has_env(pid, "LISTEN_FDS"), "LISTEN_FDS not set");
        assert!(!has_env(pid, "PORT") && !has_env(pid, "WORKER_PORT"));
        let fd3 = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
        let fd3_inode: u64 = fd3
            .to_str()
            .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
            .unwrap_or_else(|| panic!("fd 3 is {fd3:?}"));
        assert!(
            proc_net_inodes("unix", None).contains(&fd3_inode),
            "fd 3 is not a unix socket"
        );
        // Not one TCP socket of the worker listens.
        let listening: BTreeSet<u64> = proc_net_inodes("tcp", Some("0A"))
            .union(&proc_net_inodes("tcp6", Some("0A")))
            .copied()
            .collect();
        let held = socket_inodes(pid);
        assert!(
            held.is_disjoint(&listening),
            "instance {} (pid {pid}) listens on TCP",
            i.id
        );
    }

    // Both instances answer through the HTTP/1.1 listener.
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = env.get("/");
        assert_eq!(r.status, 200, "{}", r.body);
        seen.insert(r.header("x-instance").unwrap().to_string());
    }
    let ids: BTreeSet<String> = inst.iter().map(|i| i.id.to_string()).collect();
    assert_eq!(seen, ids);
    let r = env.get_host("front.test", "/echo-headers");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["x-forwarded-for"], "127.0.0.1");
    assert_eq!(v["x-forwarded-proto"], "http");
    assert_eq!(v["x-forwarded-host"], "front.test");
    assert_eq!(v["host"], "front.test");
    // A POST body goes through as well.
    let r = request(
        env.listen,
        "POST",
        "/echo",
        None,
        &[],
        b"over a unix socket",
    )
    .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "over a unix socket"));

    // The table shows `unix` and the path; the access log `id:unix`.
    let table = env.ok(&["status"]);
    for i in &inst {
        assert!(
            table.contains(&format!("socket {}", i.socket.as_deref().unwrap())),
            "{table}"
        );
    }
    assert!(table.contains(" unix ready "), "{table}");
    let log = env.dir.path().join("logs/access.log");
    wait_for("access log lines", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains(&format!("worker=w instance={}:unix ", inst[0].id))
            .then_some(())
    });
}

#[test]
fn rolling_restart_and_kill_9_under_load_fail_nothing_and_leave_no_socket() {
    let mut env = Env::new(&[unix_backend("w", 2, "")]);
    env.start();
    let before = env.wait_ready("w", 2);
    let old: Vec<PathBuf> = before
        .iter()
        .map(|i| PathBuf::from(i.socket.clone().unwrap()))
        .collect();
    assert!(old.iter().all(|p| is_socket(p)));

    let load = Load::start(env.listen, "/", 8);
    load.wait_progress(200);
    env.ok(&["restart", "w"]);
    load.wait_progress(200);
    let after = env.wait_ready("w", 2);
    let ids = |v: &[tqproxy::status::InstanceStatus]| -> BTreeSet<u64> {
        v.iter().map(|i| i.id).collect()
    };
    assert!(ids(&before).is_disjoint(&ids(&after)), "{after:?}");
    // `restart` returned once the old instances had exited: their sockets are gone.
    for p in &old {
        assert!(!p.exists(), "{} is left after the restart", p.display());
    }
    for i in &after {
        assert!(is_socket(Path::new(i.socket.as_deref().unwrap())));
    }

    // A crash: the instance is replaced in place with a fresh socket (next epoch).
    let victim = after[0].clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid.unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let replaced = wait_for(
        "the killed instance replaced",
        Duration::from_secs(20),
        || {
            env.instances("w")
                .into_iter()
                .find(|i| i.id == victim.id && i.state == "ready" && i.pid != victim.pid)
        },
    );
    let new_socket = socket_dir(&env).join(format!("w.{}.2.sock", victim.id));
    assert_eq!(replaced.socket.as_deref(), new_socket.to_str());
    assert!(is_socket(&new_socket));
    assert!(
        !Path::new(victim.socket.as_deref().unwrap()).exists(),
        "the dead instance's socket is left"
    );
    load.wait_progress(200);
    load.finish_without_failures("restart and kill -9 of a unix worker");
    assert_eq!(socket_files(&env).len(), 2, "{:?}", socket_files(&env));

    // `stop` removes every socket file and this process's directory.
    env.ok(&["stop"]);
    assert_eq!(socket_files(&env), Vec::<PathBuf>::new());
    assert!(!socket_dir(&env).exists());
}

#[test]
fn a_unix_worker_whose_health_check_fails_never_becomes_ready() {
    // Any program that accepts on fd 3 works unchanged: here a few lines of Python that
    // answer 500 to everything (and insist on the contract: fd 3, no PORT).
    let script = r#"
import os, socket, sys
assert os.environ["LISTEN_FDS"] == "1" and os.environ["LISTEN_PID"] == str(os.getpid())
assert "PORT" not in os.environ, "PORT is set"
s = socket.socket(fileno=3)
assert s.family == socket.AF_UNIX, s.family
while True:
    c, _ = s.accept()
    line = c.recv(65536).split(b"\r\n")[0].decode()
    print("got", line, flush=True)
    c.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbad\n")
    c.close()
"#;
    let mut env = Env::new(&[WorkerDef::new(
        "bad",
        "command: [\"/usr/bin/python3\", \"server.py\"]\nroutes: [\"/\"]\ntransport: unix\n\
         health: { path: /health, interval: 100ms, timeout: 500ms }\n\
         start_timeout: 1s\nqueue_timeout: 300ms\nstop_timeout: 2s\nrestart: { backoff: 5s }\n",
    )]);
    std::fs::write(env.worker_dir("bad").join("server.py"), script).unwrap();
    env.spawn(&[]);
    // The start fails on the health check (the reason is in tqproxy's log: the instance's
    // `last_exit` moves on to "killed by SIGKILL" once it has been stopped for it).
    let failed = wait_for(
        "the start to fail on the health check",
        Duration::from_secs(20),
        || {
            if let Some(w) = env.try_status().and_then(|s| s.workers.into_iter().next()) {
                assert!(
                    w.instances.iter().all(|i| i.state != "ready"),
                    "an instance answering 500 became ready: {w:?}"
                );
            }
            let out = env.output();
            let line = out.lines().find(|l| l.contains("initial start failed"))?;
            Some(line.to_string())
        },
    );
    assert!(
        failed.contains("not ready within 1s (last check: /health answered 500)"),
        "{failed}"
    );
    // The probe went over the socket: the worker saw it (its output is in the reason).
    assert!(
        failed.contains("last output: got GET /health HTTP/1.1"),
        "{failed}"
    );
    // Nothing is routed to it (tqproxy listens once the supervisor finished starting, which
    // may be just after that line).
    let r = wait_for("tqproxy to answer", Duration::from_secs(10), || {
        request(env.listen, "GET", "/", None, &[], b"").ok()
    });
    assert_eq!(r.status, 503, "{}", r.body);
}

#[test]
fn a_run_dir_too_long_for_a_socket_address_is_refused_with_the_reason() {
    let long = format!("r{}", "x".repeat(100));
    let global = format!("run_dir: ../{long}\ncontrol: {{ socket: ../ctl.sock, admin: off }}\n");
    let mut env = Env::with_global(&[unix_backend("w", 1, "")], &global);
    // `check` (and so `reload` and `deploy`) names the worker file and the key.
    let o = env.cli(&["check"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("w/worker.yaml: transport: unix: socket paths under ")
            && err.contains("more than the 107 a unix socket address holds: use a shorter run_dir"),
        "{err}"
    );
    // `run` starts, and the spawn fails saying why; the worker is down.
    env.spawn(&[]);
    wait_for(
        "the spawn error in tqproxy's log",
        Duration::from_secs(20),
        || {
            let out = env.output();
            (out.contains(&format!(
                "unix socket path {}",
                env.dir.path().join(&long).display()
            )) && out.contains("more than the 107 a socket address holds: use a shorter run_dir"))
            .then_some(())
        },
    );
    let st = wait_for("tqproxy running", Duration::from_secs(20), || {
        env.try_status().filter(|s| s.state == "running")
    });
    assert!(st.health().unwrap_err().contains("w (no instance)"));
    assert!(
        !env.dir
            .path()
            .join(&long)
            .join("sockets")
            .join(env.pid().to_string())
            .exists()
    );
    env.ok(&["stop"]);
}

#[test]
fn a_unix_worker_in_a_network_namespace_serves() {
    // With mount and net namespaces the worker sees neither the run dir nor tqproxy's
    // loopback: the socket it accepts on came as fd 3.
    let mut env = Env::new(&[unix_backend(
        "w",
        1,
        "sandbox: { namespaces: [mount, net] }\n",
    )]);
    env.start();
    let i = env.wait_ready("w", 1).remove(0);
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ns(i.pid.unwrap()), ns(env.pid()));
    let r = env.get("/");
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("hello from w"), "{}", r.body);
}

#[test]
fn sockets_left_by_a_killed_tqproxy_are_removed_at_the_next_start() {
    let mut env = Env::new(&[unix_backend("w", 1, "")]);
    env.start();
    let first = socket_dir(&env);
    assert!(first.is_dir());
    env.kill9();
    assert!(first.is_dir(), "nobody removed it yet");
    env.start();
    assert!(!first.exists(), "{} is left", first.display());
    assert!(
        env.output()
            .contains("removed the unix sockets left by an earlier tqproxy"),
        "{}",
        env.output()
    );
    assert_eq!(env.get("/").status, 200);
    assert_eq!(socket_files(&env).len(), 1, "{:?}", socket_files(&env));
}

#[test]
fn http2_over_tls_reaches_a_unix_worker() {
    let (env, tls, _) = crate::edge::tls_env_with(&[unix_backend("w", 2, "")], "");
    assert!(env.instances("w").iter().all(|i| i.socket.is_some()));
    let (out, err) = crate::edge::curl(&[
        "-k",
        "--http2",
        "-w",
        "\n%{http_version} %{http_code}",
        "--resolve",
        &format!("a.test:{tls}:127.0.0.1"),
        &format!("https://a.test:{tls}/echo-headers"),
    ]);
    let (body, tail) = out
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("{out} {err}"));
    assert_eq!(tail, "2 200", "{out}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["x-forwarded-proto"], "https");
}

#[test]
fn a_reload_moves_a_worker_from_tcp_to_unix_and_back_under_load() {
    let tcp = WorkerDef::backend("w", "[\"/\"]", 2, "");
    let mut env = Env::new(std::slice::from_ref(&tcp));
    env.start();
    assert!(env.instances("w").iter().all(|i| i.port.is_some()));
    let load = Load::start(env.listen, "/", 8);
    load.wait_progress(200);
    env.write_worker(&unix_backend("w", 2, ""));
    env.ok(&["reload"]);
    let unix = env.wait_ready("w", 2);
    assert!(
        unix.iter().all(|i| i.port.is_none() && i.socket.is_some()),
        "{unix:?}"
    );
    load.wait_progress(200);
    env.write_worker(&tcp);
    env.ok(&["reload"]);
    let back = env.wait_ready("w", 2);
    assert!(back.iter().all(|i| i.port.is_some() && i.socket.is_none()));
    load.wait_progress(200);
    load.finish_without_failures("tcp → unix → tcp reloads");
    assert_eq!(socket_files(&env), Vec::<PathBuf>::new());
}

#[test]
fn an_upgrade_keeps_the_sockets_of_both_processes_apart_and_fails_nothing() {
    let mut env = Env::new(&[unix_backend("w", 2, "")]);
    env.start();
    let old_pid = env.pid();
    let old_dir = socket_dir(&env);
    let load = Load::start(env.listen, "/", 8);
    load.wait_progress(200);
    // Both processes number their instances from 1: their sockets must not collide.
    let out = env.ok(&["upgrade"]);
    assert!(out.contains(&format!("upgraded: pid {old_pid} →")), "{out}");
    load.wait_progress(200);
    load.finish_without_failures("upgrade with unix instances");
    let st = env.status();
    assert_ne!(st.pid, old_pid);
    assert!(
        !old_dir.exists(),
        "the old process left {}",
        old_dir.display()
    );
    let new_dir = env.dir.path().join(format!("run/sockets/{}", st.pid));
    let mut expected: Vec<PathBuf> = st.workers[0]
        .instances
        .iter()
        .map(|i| PathBuf::from(i.socket.clone().unwrap()))
        .collect();
    expected.sort();
    assert!(
        expected.iter().all(|p| p.starts_with(&new_dir)),
        "{expected:?}"
    );
    assert_eq!(socket_files(&env), expected);
    // The new process is not our child: stop it through its control socket.
    env.ok(&["stop"]);
    assert!(!alive(st.pid));
    env.child = None;
    assert_eq!(socket_files(&env), Vec::<PathBuf>::new());
}
