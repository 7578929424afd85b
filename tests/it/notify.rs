//! `ready: notify`: the sd_notify protocol against real processes. tqproxy binds a datagram
//! socket per instance and passes it as `NOTIFY_SOCKET`; `READY=1` routes the instance without
//! a health poll, `STATUS=` shows in `status`, `STOPPING=1` takes it out of the route table and
//! replaces it, a missed `WATCHDOG=1` replaces it, and bad input (garbage, giant datagrams,
//! floods, strangers) hurts nobody.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

/// A test worker in Python (standard library): serves `GET /` on `$PORT`; `GET /stop` sends
/// `STOPPING=1`, `GET /status?x` sends `STATUS=x`. Its first argument says what it does first:
/// `ready` (READY=1), `never` (nothing), `garbage` (malformed lines, a giant datagram and a
/// flood, then READY=1).
const SCRIPT: &str = r#"
import os, signal, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH = os.environ["NOTIFY_SOCKET"]

def notify(data, block=True):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(block)
        try:
            s.sendto(data, PATH)
            return True
        except BlockingIOError:
            return False

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/status?"):
            notify(b"STATUS=" + self.path.split("?", 1)[1].encode())
        body = ("pid %d\n" % os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        # After the answer: the SIGTERM that follows STOPPING=1 must not cut it.
        if self.path == "/stop":
            notify(b"STOPPING=1")
    def log_message(self, *a):
        pass

srv = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
srv.daemon_threads = True
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=srv.shutdown).start())
mode = sys.argv[1]
if mode == "garbage":
    notify(b"READY=2\nhello\n\xff\xfe\nBOGUS=1\nMAINPID=1")
    notify(b"STATUS=" + b"y" * 5000)
    try:
        notify(b"z" * 65000)
    except OSError:
        pass
    # More than tqproxy reads in a second (the kernel queues few: the sends block).
    for i in range(300):
        notify(b"garbage %d" % i)
    print("flooded", file=sys.stderr, flush=True)
if mode != "never":
    notify(b"READY=1\nSTATUS=up")
srv.serve_forever()
"#;

/// Adds the [`SCRIPT`] worker `name` to `env`.
fn py_worker(env: &Env, name: &str, mode: &str, extra: &str) {
    let dir = env.worker_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("w.py"), SCRIPT).unwrap();
    env.write_worker(&WorkerDef::new(
        name,
        &format!(
            "command: [\"python3\", \"w.py\", \"{mode}\"]\nroutes: [\"/{name}\"]\nstrip_prefix: true\ninstances: 1\nready: notify\nstop_timeout: 2s\ndrain_timeout: 2s\n{extra}"
        ),
    ));
}

/// The `hello` worker (on the kit) with `ready: notify` and a health path it does not answer
/// (404), checked for liveness only once an hour: only READY=1 can make it ready.
fn hello_notify(name: &str, route: &str, extra: &str) -> WorkerDef {
    WorkerDef::new(
        name,
        &format!(
            "command: [\"{HELLO}\"]\nroutes: [\"{route}\"]\ninstances: 1\nready: notify\nhealth: {{ path: /never, interval: 1h }}\nstop_timeout: 2s\ndrain_timeout: 2s\n{extra}"
        ),
    )
}

/// `NOTIFY_SOCKET` of a running process.
fn notify_socket_of(pid: u32) -> PathBuf {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        .unwrap_or_else(|| panic!("pid {pid} has no NOTIFY_SOCKET"))
}

/// The worker's process: the spawned pid, or with a pid namespace the grandchild.
fn worker_pid(pid: u32, pid_ns: bool) -> u32 {
    if !pid_ns {
        return pid;
    }
    let child = |p: u32| -> u32 {
        std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    child(child(pid))
}

fn status_of(env: &Env, worker: &str) -> Option<String> {
    env.instances(worker).first().and_then(|i| i.status.clone())
}

#[test]
fn ready_1_routes_an_instance_whose_health_path_never_answers() {
    let mut env = Env::new(&[hello_notify("hello", "/", "")]);
    env.start();
    let inst = env.wait_ready("hello", 1);
    let r = env.get("/");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("hello from hello"), "{}", r.body);
    // The socket: per instance, under run_dir, 0600, named in its environment.
    let pid = inst[0].pid.unwrap();
    let sock = notify_socket_of(pid);
    assert_eq!(
        sock.parent().unwrap(),
        env.dir
            .path()
            .join("run/notify")
            .join(env.pid().to_string())
    );
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.mode() & 0o777, 0o600);
    // The kit said where it listens; `status` (JSON and table) shows it.
    let st = wait_for("STATUS= in status", Duration::from_secs(10), || {
        status_of(&env, "hello")
    });
    assert!(st.starts_with("listening on 127.0.0.1:"), "{st}");
    assert!(env.ok(&["status"]).contains(&format!("status {st}")));
    wait_for(
        "`ready after` in the worker log",
        Duration::from_secs(10),
        || {
            env.worker_log("hello")
                .contains("ready after")
                .then_some(())
        },
    );
    // A restart: the old socket goes with its process, the new one has its own.
    env.ok(&["restart", "hello"]);
    let again = env.wait_ready("hello", 1);
    let sock2 = notify_socket_of(again[0].pid.unwrap());
    assert_ne!(sock, sock2);
    wait_for(
        "the old socket file removed",
        Duration::from_secs(10),
        || (!sock.exists()).then_some(()),
    );
    env.stop(Duration::from_secs(20));
    assert!(
        !env.dir.path().join("run/notify").exists(),
        "the notify directory outlived tqproxy"
    );
}

#[test]
fn status_lines_show_and_stopping_1_replaces_the_instance() {
    let mut env = Env::new(&[]);
    py_worker(&env, "p", "ready", "health: { interval: 1h }\n");
    env.start();
    let first = env.wait_ready("p", 1);
    assert_eq!(env.get("/p/status?busy-with-42").status, 200);
    wait_for("STATUS=busy-with-42", Duration::from_secs(10), || {
        (status_of(&env, "p").as_deref() == Some("busy-with-42")).then_some(())
    });
    // STOPPING=1: out of the route table, replaced by a new instance, the old one stopped.
    let load = Load::start(env.listen, "/p/", 2);
    load.wait_progress(20);
    assert_eq!(env.get("/p/stop").status, 200);
    let after = wait_for("a replacement", Duration::from_secs(20), || {
        let i = env.instances("p");
        (i.len() == 1 && i[0].id != first[0].id && i[0].state == "ready").then_some(i)
    });
    load.wait_progress(20);
    load.finish_without_failures("STOPPING=1 and its replacement");
    assert_eq!(
        after[0].status.as_deref(),
        Some("up"),
        "a new process starts with its own status"
    );
    let w = env.worker("p");
    assert_eq!(w.restarts.get("liveness"), Some(&1), "{:?}", w.restarts);
    assert!(env.worker_log("p").contains("it sent STOPPING=1"));
}

#[test]
fn a_missed_watchdog_replaces_the_instance_and_pings_keep_it() {
    let mut env = Env::new(&[]);
    let example = repo().join("workers/pynotify/app.py");
    for (name, hang) in [("alive", "0"), ("hung", "1")] {
        let d = env.worker_dir(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(&example, d.join("app.py")).unwrap();
        env.write_worker(&WorkerDef::new(
            name,
            &format!(
                "command: [\"python3\", \"app.py\"]\nroutes: [\"/{name}\"]\nstrip_prefix: true\nready: notify\nwatchdog: 400ms\nhealth: {{ interval: 1h }}\nstop_timeout: 2s\ndrain_timeout: 1s\nenv: {{ PYNOTIFY_HANG: \"{hang}\" }}\n"
            ),
        ));
    }
    env.start();
    let alive = env.wait_ready("alive", 1)[0].id;
    let hung = env.wait_ready("hung", 1)[0].id;
    // The Python example serves and says so.
    let r = env.get("/alive/");
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("hello from pynotify"), "{}", r.body);
    let replaced = wait_for(
        "the hung instance replaced",
        Duration::from_secs(20),
        || {
            let i = env.instances("hung");
            i.iter()
                .any(|i| i.id != hung && i.state == "ready")
                .then_some(i)
        },
    );
    assert!(!replaced.is_empty());
    wait_for(
        "the missed watchdog in the log",
        Duration::from_secs(10),
        || {
            env.worker_log("hung")
                .contains("no WATCHDOG=1 for 400ms")
                .then_some(())
        },
    );
    // Pinging every 200 ms, the other one is still the same instance, many windows later.
    let i = env.instances("alive");
    assert_eq!((i.len(), i[0].id, i[0].restarts), (1, alive, 0), "{i:?}");
    assert_eq!(env.worker("alive").restarts.get("liveness"), Some(&0));
}

#[test]
fn garbage_floods_and_strangers_hurt_nobody() {
    let mut env = Env::new(&[hello_notify("hello", "/", "")]);
    py_worker(&env, "junk", "garbage", "health: { interval: 1h }\n");
    // The sender of garbage still gets its READY=1 through, after its flood.
    env.start();
    assert_eq!(env.get("/junk/").status, 200);
    for expected in [
        "notify: line 1: READY=2 is not 1",
        "notify: line 2: `hello` is not KEY=VALUE",
        "notify: MAINPID= is not supported: ignored (logged once)",
        "a datagram larger than 4096 bytes: ignored",
        "more not logged",
    ] {
        wait_for(
            &format!("{expected:?} in the log"),
            Duration::from_secs(10),
            || env.worker_log("junk").contains(expected).then_some(()),
        );
    }
    // A worker that never sends READY=1, added by a reload that waits for it (in the
    // background: it would wait for the start timeout).
    py_worker(
        &env,
        "shy",
        "never",
        "health: { interval: 1h }\nstart_timeout: 60s\n",
    );
    let mut reload = std::process::Command::new(TQPROXY)
        .arg("-c")
        .arg(env.conf())
        .arg("reload")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A datagram from a process that is not the instance (this test) is dropped.
    let shy = wait_for("the shy instance's pid", Duration::from_secs(10), || {
        env.try_status()?
            .workers
            .into_iter()
            .find(|w| w.name == "shy")?
            .instances
            .first()?
            .pid
    });
    let path = wait_for("its NOTIFY_SOCKET", Duration::from_secs(10), || {
        std::fs::read(format!("/proc/{shy}/environ"))
            .ok()
            .filter(|e| e.windows(14).any(|w| w == b"NOTIFY_SOCKET="))
            .map(|_| notify_socket_of(shy))
    });
    let c = UnixDatagram::unbound().unwrap();
    c.send_to(b"READY=1", &path).unwrap();
    wait_for("the stranger logged", Duration::from_secs(10), || {
        env.worker_log("shy")
            .contains("not a process of this instance")
            .then_some(())
    });
    assert_eq!(env.instances("shy")[0].state, "starting");
    // Nobody else noticed: hello serves, tqproxy answers.
    assert_eq!(env.get("/").status, 200);
    assert!(env.exited().is_none());
    let _ = reload.kill();
    let _ = reload.wait();
    env.stop(Duration::from_secs(20));
}

/// With a mount namespace (read-only root, run_dir's other entries hidden), a pid and a
/// network namespace, seccomp, Landlock and a dynamic user: the socket is reachable and only
/// the instance's user may send to it.
#[test]
fn notify_works_in_the_full_sandbox_with_a_dynamic_user() {
    let base = Path::new("/var/lib/tqproxy-it");
    let mut env = Env::new_in(
        base,
        &[hello_notify(
            "hello",
            "/",
            "sandbox:\n  dynamic_user: true\n  namespaces: [mount, pid, ipc, uts, net]\n  seccomp: default\n  landlock: true\n",
        )],
    );
    env.start();
    let inst = env.wait_ready("hello", 1);
    assert_eq!(env.get("/").status, 200);
    let worker = worker_pid(inst[0].pid.unwrap(), true);
    let sock = notify_socket_of(worker);
    let m = std::fs::metadata(&sock).unwrap();
    let uid = std::fs::metadata(format!("/proc/{worker}")).unwrap().uid();
    assert!(uid >= 61184, "a dynamic uid, not {uid}");
    assert_eq!((m.uid(), m.mode() & 0o777), (uid, 0o600));
    // Inside, run_dir shows only notify/ (the control socket and the pid file are hidden).
    let root = format!("/proc/{worker}/root");
    let inside = |p: &Path| PathBuf::from(&root).join(p.strip_prefix("/").unwrap());
    let run = env.dir.path().join("run");
    assert!(std::fs::symlink_metadata(inside(&sock)).is_ok_and(|m| m.file_type().is_socket()));
    let ctl = std::fs::symlink_metadata(inside(&run.join("tqproxy.sock"))).unwrap();
    assert!(
        !ctl.file_type().is_socket(),
        "the control socket is visible inside"
    );
    wait_for(
        "STATUS= from inside the sandbox",
        Duration::from_secs(10),
        || status_of(&env, "hello"),
    );
    env.stop(Duration::from_secs(20));
}

/// `ready` and `watchdog` are checked like every key: file, line, key, what is wrong.
#[test]
fn ready_and_watchdog_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let wdir = dir.path().join("w");
    for (yaml, says) in [
        (
            "command: [\"/bin/true\"]\nready: poll\n",
            "worker.yaml:2: ready: unknown variant `poll`, expected `health` or `notify`",
        ),
        (
            "command: [\"/bin/true\"]\nhealth: { interval: 1s }\nwatchdog: 5s\n",
            "worker.yaml:3: watchdog: needs `ready: notify` (the instance sends WATCHDOG=1 on its NOTIFY_SOCKET)",
        ),
        (
            "command: [\"/bin/true\"]\nready: notify\nwatchdog: 1ms\n",
            "worker.yaml:3: watchdog: must be between 10ms and 1h",
        ),
        (
            "command: [\"/bin/true\"]\nready: notify\nwatchdog: soon\n",
            "worker.yaml:3: watchdog:",
        ),
        (
            "command: [\"/bin/true\"]\nenv: { NOTIFY_SOCKET: /x }\n",
            "worker.yaml:2: env.NOTIFY_SOCKET: `NOTIFY_SOCKET` is set by tqproxy",
        ),
    ] {
        let e = tqproxy::config::WorkerConfig::from_text(&wdir, yaml)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{yaml}"))
            .to_string();
        assert!(e.contains(says), "{yaml}\n→ {e}\nnot: {says}");
    }
    let ok = tqproxy::config::WorkerConfig::from_text(
        &wdir,
        "command: [\"/bin/true\"]\nready: notify\nwatchdog: 5s\n",
    )
    .unwrap()
    .unwrap();
    assert_eq!(ok.ready, tqproxy::config::Ready::Notify);
    assert_eq!(ok.watchdog, Some(Duration::from_secs(5)));
}
