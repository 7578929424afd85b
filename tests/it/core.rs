//! The core loop against the real binary and real worker processes: routing, balancing,
//! crash and hang recovery, crash-loop backoff, scaling, and no process outliving tqproxy.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn host_and_path_routing_on_segment_boundaries() {
    let mut env = Env::new(&[
        WorkerDef::backend("root", "[\"/\"]", 1, ""),
        WorkerDef::backend("api", "[\"/api\"]", 1, "strip_prefix: true\n"),
        WorkerDef::backend("keep", "[\"/keep\"]", 1, ""),
        WorkerDef::backend("host", "[\"h.example.test/\"]", 1, ""),
        WorkerDef::backend("wild", "[\"*.wild.test/v1\"]", 1, ""),
    ]);
    env.start();
    let who = |r: &Response| r.header("x-worker").unwrap_or("?").to_string();

    // Longest prefix, on a segment boundary.
    assert_eq!(who(&env.get("/api/echo-headers")), "api");
    assert_eq!(who(&env.get("/api")), "api");
    assert_eq!(who(&env.get("/apiary")), "root");
    assert_eq!(who(&env.get("/")), "root");
    assert_eq!(who(&env.get("/keepsake")), "root");
    assert_eq!(who(&env.get("/keep/x")), "keep");

    // Stripping: /api/echo-headers reaches the worker as /echo-headers, query kept.
    let r = env.get("/api/echo-headers?x=1");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["path"], "/echo-headers?x=1");
    // Without stripping the prefix stays.
    let r = env.get("/keep/echo-headers");
    assert_eq!(
        r.status, 404,
        "backend has no /keep/echo-headers: the prefix was kept"
    );

    // Hosts: exact, with port and case, wildcard; unknown hosts fall back to host-less routes.
    assert_eq!(who(&env.get_host("h.example.test", "/anything")), "host");
    assert_eq!(who(&env.get_host("H.EXAMPLE.TEST:8080", "/")), "host");
    assert_eq!(who(&env.get_host("a.wild.test", "/v1/x")), "wild");
    assert_eq!(who(&env.get_host("a.wild.test", "/v2")), "root");
    assert_eq!(who(&env.get_host("other.test", "/")), "root");
}

#[test]
fn forwarding_headers_and_request_ids() {
    let mut env = Env::new(&[WorkerDef::backend("root", "[\"/\"]", 1, "")]);
    env.start();
    let r = env.get_host("front.test", "/echo-headers");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["x-forwarded-for"], "127.0.0.1");
    assert_eq!(v["x-forwarded-proto"], "http");
    assert_eq!(v["x-forwarded-host"], "front.test");
    let id = v["x-request-id"].as_str().expect("request id generated");
    assert_eq!(id.len(), 16);
    assert_eq!(
        r.header("x-request-id"),
        Some(id),
        "the response carries the same id"
    );

    // A client's id is kept; a client's X-Forwarded-For is appended to.
    let r = request(
        env.listen,
        "GET",
        "/echo-headers",
        None,
        &[
            ("X-Request-Id", "client-id-42"),
            ("X-Forwarded-For", "203.0.113.9"),
        ],
        b"",
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["x-request-id"], "client-id-42");
    assert_eq!(v["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
}

#[test]
fn unknown_route_is_404_from_tqproxy() {
    let mut env = Env::new(&[WorkerDef::backend("api", "[\"/api\"]", 1, "")]);
    env.start();
    let r = env.get("/nothing-here");
    assert_eq!(r.status, 404);
    assert!(r.body.contains("tqproxy"), "{}", r.body);
    assert!(r.header("x-worker").is_none());
    let r = env.get("/apix");
    assert_eq!(r.status, 404);
}

#[test]
fn balancing_uses_every_instance() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 4, "")]);
    env.start();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..80 {
        let r = env.get("/");
        assert_eq!(r.status, 200);
        *seen
            .entry(r.header("x-instance").unwrap().to_string())
            .or_default() += 1;
    }
    let ids: BTreeSet<String> = env
        .instances("w")
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        ids,
        "every instance served: {seen:?}"
    );
    // Sequential requests with no load difference spread evenly (round-robin among ties).
    assert!(seen.values().all(|n| *n == 20), "{seen:?}");
}

#[test]
fn kill_9_of_an_instance_under_load_fails_no_request() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 2, "")]);
    env.start();
    let before = env.instances("w");
    let load = Load::start(env.listen, "/", 8);
    load.wait_progress(200);
    let victim = before[0].pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // A replacement becomes ready (same id, new pid), while requests keep flowing.
    let replaced = wait_for("replacement ready", Duration::from_secs(20), || {
        let i = env
            .instances("w")
            .into_iter()
            .find(|i| i.id == before[0].id)?;
        (i.state == "ready" && i.pid.is_some_and(|p| p != victim) && i.routed).then_some(i)
    });
    load.wait_progress(200);
    load.finish_without_failures("load");
    assert_eq!(replaced.restarts, 1);
    assert!(
        replaced
            .last_exit
            .as_deref()
            .unwrap_or("")
            .contains("SIGKILL"),
        "{:?}",
        replaced.last_exit
    );
    assert_eq!(env.worker("w").restarts["crash"], 1);
    assert!(!alive(victim));
}

/// Every instance killed at the same moment: the requests that found them dead wait (within
/// `queue_timeout`) for the restarted processes, which keep the ids of the ones they replace.
/// (They were excluded by id as "already tried", and got 503 after the whole queue_timeout.)
#[test]
fn kill_9_of_every_instance_at_once_fails_no_request() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 2, "")]);
    env.start();
    let before = env.instances("w");
    let load = Load::start(env.listen, "/", 8);
    load.wait_progress(200);
    let victims: Vec<u32> = before.iter().map(|i| i.pid.unwrap()).collect();
    for v in &victims {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*v as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    wait_for("both replaced and ready", Duration::from_secs(20), || {
        let now = env.instances("w");
        (now.len() == 2
            && now.iter().all(|i| {
                i.state == "ready" && i.routed && i.pid.is_some_and(|p| !victims.contains(&p))
            }))
        .then_some(())
    });
    load.wait_progress(200);
    load.finish_without_failures("load");
    assert_eq!(env.worker("w").restarts["crash"], 2);
}

#[test]
fn a_hung_instance_is_replaced() {
    let mut env = Env::new(&[WorkerDef::chaos("c", "[\"/\"]", 1, "")]);
    env.start();
    let old = env.instances("c")[0].clone();
    // /hang makes the whole worker stop answering (its health checks time out).
    let _ = request(env.listen, "GET", "/hang", None, &[], b"");
    let new = wait_for(
        "a new ready instance replacing the hung one",
        Duration::from_secs(30),
        || {
            let inst = env.instances("c");
            let fresh = inst
                .iter()
                .find(|i| i.id != old.id && i.state == "ready" && i.routed)?
                .clone();
            inst.iter().all(|i| i.id != old.id).then_some(fresh)
        },
    );
    assert_eq!(new.restarts, old.restarts + 1);
    assert_eq!(env.worker("c").restarts["liveness"], 1);
    wait_for("hung process gone", Duration::from_secs(10), || {
        (!alive(old.pid.unwrap())).then_some(())
    });
    assert_eq!(env.get("/").status, 200);
}

#[test]
fn a_crash_loop_backs_off_and_is_visible() {
    let mut env = Env::new(&[
        WorkerDef::backend("fine", "[\"/\"]", 1, ""),
        WorkerDef::chaos(
            "broken",
            "[\"/broken\"]",
            1,
            "env: { CHAOS_CRASH_ON_START: \"1\" }\nstart_timeout: 5s\nrestart: { backoff: 100ms, backoff_max: 2s, crashloop_after: 3 }\n",
        ),
    ]);
    env.spawn(&[]);
    let st = wait_for("crashloop state", Duration::from_secs(30), || {
        let w = env
            .try_status()?
            .workers
            .into_iter()
            .find(|w| w.name == "broken")?;
        let i = w.instances.first()?.clone();
        (i.state == "crashloop").then_some(i)
    });
    assert!(
        st.last_exit
            .as_deref()
            .unwrap_or("")
            .contains("exited with code 3"),
        "{:?}",
        st.last_exit
    );
    // Backing off: over the next two seconds only a handful of attempts (a hot loop would
    // make hundreds). Each attempt counts as a restart.
    let r0 = env.instances("broken")[0].restarts;
    std::thread::sleep(Duration::from_secs(2));
    let r1 = env.instances("broken")[0].restarts;
    assert!(
        r1 - r0 <= 3,
        "restarted {} times in 2 s with backoff up to 2 s",
        r1 - r0
    );
    // The neighbour is unaffected; the broken route answers 503 from tqproxy.
    assert_eq!(env.get("/").status, 200);
    let r = env.get("/broken");
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert!(r.body.contains("no ready instance"), "{}", r.body);
}

#[test]
fn scale_up_and_down() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    env.start();
    let out = env.ok(&["scale", "w", "3"]);
    assert!(out.contains("scaled up from 1 to 3"), "{out}");
    let inst = env.wait_ready("w", 3);
    let ports: BTreeSet<u16> = inst.iter().filter_map(|i| i.port).collect();
    assert_eq!(ports.len(), 3, "distinct ports");
    assert_eq!(env.worker("w").desired, 3);
    let load = Load::start(env.listen, "/", 4);
    load.wait_progress(100);
    env.ok(&["scale", "w", "1"]);
    load.wait_progress(100);
    load.finish_without_failures("load");
    let inst = env.wait_ready("w", 1);
    // Stopped instances are gone for good.
    for i in env.status().workers[0].instances.iter() {
        assert!(inst.iter().any(|j| j.id == i.id));
    }
    // Bad requests are refused with a reason, and an exit code that says which (4: no such
    // worker).
    let o = env.cli(&["scale", "nope", "2"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no worker named `nope`"));
    let o = env.cli(&["scale", "w", "-1"]);
    assert_eq!(o.status.code(), Some(2), "usage error");
}

#[test]
fn kill_9_of_tqproxy_leaves_no_worker_behind() {
    let mut env = Env::new(&[
        WorkerDef::backend("w", "[\"/\"]", 2, "env: { TQ_TEST_MARK: kill9-test }\n"),
        // A pid namespace: even processes the worker forks die with it.
        WorkerDef::chaos(
            "c",
            "[\"/c\"]",
            1,
            "strip_prefix: true\nenv: { TQ_TEST_MARK: kill9-test }\nsandbox: { namespaces: [pid] }\n",
        ),
    ]);
    env.start();
    // The chaos worker also forks children (its own process tree).
    let r = env.get("/c/fork-bomb?max=3");
    assert_eq!(r.status, 200);
    let pids: Vec<u32> = env
        .status()
        .workers
        .iter()
        .flat_map(|w| w.instances.iter().filter_map(|i| i.pid))
        .collect();
    assert_eq!(pids.len(), 3);
    let marker = "TQ_TEST_MARK=kill9-test";
    let before = processes_with_env(marker);
    assert!(
        before.len() >= 6,
        "3 instances and 3 forked children: {before:?}"
    );
    env.kill9();
    wait_for(
        "every worker process gone after kill -9 of tqproxy",
        Duration::from_secs(10),
        || (pids.iter().all(|p| !alive(*p)) && processes_with_env(marker).is_empty()).then_some(()),
    );
}

#[test]
fn graceful_stop_finishes_in_flight_requests() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    env.start();
    let pid = env.instances("w")[0].pid.unwrap();
    let addr = env.listen;
    let slow = std::thread::spawn(move || request(addr, "GET", "/slow?ms=1500", None, &[], b""));
    wait_for("slow request in flight", Duration::from_secs(10), || {
        (env.worker("w").in_flight == 1).then_some(())
    });
    let out = env.ok(&["stop"]);
    assert!(out.contains("stopped"), "{out}");
    let r = slow
        .join()
        .unwrap()
        .expect("the in-flight request completed");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "slow done\n");
    assert!(!alive(pid));
    assert!(!env.socket().exists(), "control socket removed");
    env.child = None;
}

/// Malformed HTTP from clients and malformed control-socket messages each get a clear answer
/// (or a closed connection) and change nothing: the same instances keep serving a steady load
/// without one failed request.
#[test]
fn hostile_clients_and_control_messages_change_nothing() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;
    use std::os::unix::net::UnixStream;

    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 2, "")]);
    env.start();
    let before: BTreeSet<u32> = env.instances("w").iter().filter_map(|i| i.pid).collect();
    let load = Load::start(env.listen, "/", 4);
    load.wait_progress(100);

    // Raw HTTP: the first status line tqproxy answers with, or "" when it just closes. A
    // truncated request is followed by a half-close (the client is done sending).
    let raw = |bytes: &[u8], half_close: bool| -> String {
        let mut s = TcpStream::connect(env.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(bytes);
        if half_close {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        line.trim_end().to_string()
    };
    let huge_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("not http", b"GARBAGE\r\n\r\n".to_vec(), false, "HTTP/1.1 400"),
        ("binary", (0u8..=255).cycle().take(4096).collect(), false, "HTTP/1.1 400"),
        ("header without colon", b"GET / HTTP/1.1\r\nHost x\r\n\r\n".to_vec(), false, "HTTP/1.1 400"),
        // Passed on; the worker refuses it, tqproxy relays the refusal.
        ("200 KiB header", huge_header.into_bytes(), false, "HTTP/1.1 431"),
        (
            "bad content-length",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400",
        ),
        (
            "conflicting content-lengths",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc"
                .to_vec(),
            false,
            "HTTP/1.1 400",
        ),
        (
            "bad chunk size",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
                .to_vec(),
            false,
            "HTTP/1.1 400",
        ),
        ("truncated request line", b"GET /".to_vec(), true, ""),
        // A complete request, then the client shuts its sending side: still answered.
        (
            "complete request, then half-close",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            true,
            "HTTP/1.1 200",
        ),
        (
            "body cut short",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc".to_vec(),
            true,
            "",
        ),
    ];
    for (what, bytes, half_close, expect) in &cases {
        let status = raw(bytes, *half_close);
        eprintln!("{what}: {status:?}");
        if expect.is_empty() {
            assert!(
                status.is_empty() || status.starts_with("HTTP/1.1 4"),
                "{what}: answered {status:?}"
            );
        } else {
            assert!(
                status.starts_with(expect),
                "{what}: answered {status:?}, not {expect}"
            );
        }
        // tqproxy itself is still there and serving after each one.
        assert_eq!(env.get("/").status, 200, "after {what}");
    }

    // The control socket: every malformed message gets a JSON error, nothing else happens.
    let control = |bytes: &[u8]| -> serde_json::Value {
        let mut s = UnixStream::connect(env.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    };
    let oversized = format!(
        "{{\"cmd\":\"status\",\"pad\":\"{}\"}}\n",
        "x".repeat(100 * 1024)
    );
    for (msg, expect) in [
        (&b"not json\n"[..], "invalid request"),
        (b"{\"cmd\":\"explode\"}\n", "invalid request"),
        (b"{\"cmd\":\"scale\",\"worker\":\"w\"}\n", "invalid request"),
        (
            b"{\"cmd\":\"scale\",\"worker\":\"w\",\"instances\":-1}\n",
            "invalid request",
        ),
        (
            b"{\"cmd\":\"scale\",\"worker\":\"w\",\"instances\":100000}\n",
            "at most 256",
        ),
        (
            b"{\"cmd\":\"scale\",\"worker\":\"nope\",\"instances\":1}\n",
            "no worker named",
        ),
        (b"{\"cmd\":\"rollback\",\"worker\":\"nope\"}\n", "nope"),
        (b"\xff\xfe\n", "cannot read request"),
        (oversized.as_bytes(), "larger than"),
    ] {
        let v = control(msg);
        let text = v.to_string();
        eprintln!("control: {text}");
        assert!(
            text.contains(expect),
            "{:?} → {text}",
            String::from_utf8_lossy(&msg[..msg.len().min(60)])
        );
        assert!(
            v["type"] == "error" || v["ok"] == false || text.contains("\"ok\":false"),
            "not reported as a failure: {text}"
        );
    }
    // A client that connects and says nothing does not block the others.
    let silent = UnixStream::connect(env.socket()).unwrap();
    assert!(env.ok(&["status"]).contains("w"));
    drop(silent);

    load.wait_progress(100);
    load.finish_without_failures("load");
    let after: BTreeSet<u32> = env.instances("w").iter().filter_map(|i| i.pid).collect();
    assert_eq!(before, after, "the same instances serve");
    assert!(env.exited().is_none(), "tqproxy is still running");
}

/// The client deadlines and the connection limit: a head that trickles in gets 408 and is
/// closed at `client_header_timeout` (slowloris), an idle keep-alive connection is closed at
/// `client_keepalive_timeout`, and beyond `max_connections` a request gets 503 and its
/// connection is closed — while an ordinary client is served throughout.
#[test]
fn client_deadlines_and_the_connection_limit() {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    let conf = std::fs::read_to_string(env.conf()).unwrap().replace(
        "proxy: { threads: 1 }",
        "proxy: { threads: 1, client_header_timeout: 1s, client_keepalive_timeout: 1s, max_connections: 4 }",
    );
    std::fs::write(env.conf(), conf).unwrap();
    env.start();
    assert_eq!(env.get("/").status, 200);

    // Everything a connection receives until the server closes it (bounded by a deadline).
    let until_closed = |s: &mut TcpStream, feed: &mut dyn FnMut(&mut TcpStream) -> bool| {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "never closed; got {got:?}");
            match s.read(&mut buf) {
                Ok(0) => return String::from_utf8_lossy(&got).into_owned(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if !feed(s) {
                        continue;
                    }
                }
                Err(_) => return String::from_utf8_lossy(&got).into_owned(),
            }
        }
    };

    // Slowloris: a head that never ends, one more header line at a time.
    let mut slow = TcpStream::connect(env.listen).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut n = 0;
    let got = until_closed(&mut slow, &mut |s| {
        n += 1;
        // The ordinary client is not held up meanwhile.
        assert_eq!(env.get("/").status, 200);
        s.write_all(format!("X-Slow-{n}: y\r\n").as_bytes()).is_ok()
    });
    assert!(got.starts_with("HTTP/1.1 408 "), "{got:?}");
    assert!(got.contains("Connection: close\r\n"), "{got:?}");
    assert!(
        n >= 2,
        "the head kept trickling in before the deadline ({n} lines)"
    );
    drop(slow);

    // A keep-alive connection that goes quiet after a request is closed, without a word.
    let mut idle = TcpStream::connect(env.listen).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = until_closed(&mut idle, &mut |_| false);
    assert!(got.starts_with("HTTP/1.1 200 "), "{got:?}");
    assert_eq!(
        got.matches("HTTP/1.1").count(),
        1,
        "one answer, then the close: {got:?}"
    );
    drop(idle);

    // The connection limit: 4 are served at once (as soon as tqproxy's side of the closed
    // ones is gone); a 5th gets 503 and is closed.
    let mut held = wait_for(
        "4 connections served at once",
        Duration::from_secs(10),
        || {
            let mut held = Vec::new();
            for _ in 0..4 {
                let mut s = TcpStream::connect(env.listen).ok()?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
                let mut head = [0u8; 12];
                s.read_exact(&mut head).ok()?;
                if &head != b"HTTP/1.1 200" {
                    return None;
                }
                held.push(s);
            }
            Some(held)
        },
    );
    let mut fifth = TcpStream::connect(env.listen).unwrap();
    fifth
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = until_closed(&mut fifth, &mut |_| false);
    assert!(got.starts_with("HTTP/1.1 503 "), "{got:?}");
    assert!(
        got.contains("Retry-After: 1\r\n") && got.contains("Connection: close\r\n"),
        "{got:?}"
    );
    // Once one of the four goes, a new connection is served again.
    drop(held.pop());
    wait_for(
        "a connection under the limit to be served",
        Duration::from_secs(10),
        || (env.get("/").status == 200).then_some(()),
    );
    drop(held);
}

/// The control socket file deleted under a running tqproxy (a cleanup script, `rm -rf run/`):
/// the CLI says clearly that it cannot reach it, serving goes on, and within a second or two
/// tqproxy binds the socket again, so that `status` and `stop` work once more.
#[test]
fn a_deleted_control_socket_is_bound_again() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    env.start();
    std::fs::remove_file(env.socket()).unwrap();
    let out = env.cli(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    // Unless the socket was already back (the check runs every second).
    if !out.status.success() {
        assert!(err.contains("cannot reach tqproxy"), "{err}");
    }
    assert_eq!(env.get("/").status, 200, "serving goes on");
    wait_for("the socket bound again", Duration::from_secs(10), || {
        env.cli(&["status"]).status.success().then_some(())
    });
    assert!(
        env.output()
            .contains("control socket file was deleted: bound it again")
    );
    // And it is the live process's: `stop` reaches it.
    env.ok(&["stop"]);
    assert!(
        env.stop(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    assert!(
        !env.socket().exists(),
        "the re-bound socket is removed at exit"
    );
}

/// Runs `tqproxy run` on `env` expecting it to refuse to start: returns its exit code and its
/// output. Panics if it is still running after 30 s (it would be serving without what it
/// could not set up).
fn refused_start(env: &Env) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(TQPROXY)
        .arg("-c")
        .arg(env.conf())
        .arg("run")
        .env("TQPROXY_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tqproxy");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().expect("wait");
            panic!(
                "tqproxy kept running instead of refusing to start:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().expect("wait");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code(), text)
}

/// A listen address that another process holds: `run` exits 1 naming it, before any worker
/// starts, and leaves no control socket behind (pingora would bind it only once the workers
/// are up, and a failure there left tqproxy running without that listener).
#[test]
fn run_exits_1_naming_a_listen_address_that_does_not_bind() {
    let env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    let _held = std::net::TcpListener::bind(env.listen).expect("hold the listen address");
    let (code, out) = refused_start(&env);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("cannot listen on {} (listener)", env.listen)),
        "{out}"
    );
    assert!(!out.contains("all workers started"), "{out}");
    assert!(!env.socket().exists(), "control socket left behind");
}

/// A TLS listener whose certificate cannot be read: `run` exits 1 naming the listener and the
/// file.
#[test]
fn run_exits_1_naming_a_certificate_it_cannot_read() {
    let env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    let tls_port = env.ports.1;
    let global = format!(
        "listen:\n  - \"{}\"\n  - addr: \"127.0.0.1:{tls_port}\"\n    tls: {{ cert: tls/gone.pem, key: tls/gone.key }}\nports: \"{}-{}\"\nproxy: {{ threads: 1 }}\ncgroups: {{ base: tqproxy-it }}\ncontrol: {{ admin: off }}\n",
        env.listen,
        env.ports.0,
        env.ports.1 - 1,
    );
    std::fs::write(env.conf(), global).unwrap();
    let (code, out) = refused_start(&env);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("listen[1].tls") && out.contains("cannot read") && out.contains("gone.pem"),
        "{out}"
    );
    assert!(!env.socket().exists(), "control socket left behind");
}

/// One raw HTTP/1.1 exchange on a new connection: the status line of the answer.
fn raw_status(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer (and close) before it read everything: a failed write is fine.
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// `max_body_size`: a declared larger body is refused with 413 before the worker sees it, a
/// chunked one is cut at the limit with 413, and bodies within it pass.
#[test]
fn max_body_size_answers_413_past_the_limit() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "max_body_size: 1K\n")]);
    env.start();
    let at_limit = vec![b'a'; 1024];
    let r = request(env.listen, "POST", "/echo", None, &[], &at_limit).unwrap();
    assert_eq!((r.status, r.body.len()), (200, 1024));
    let served = env.instances("w")[0].requests;

    let r = request(env.listen, "POST", "/echo", None, &[], &[b'a'; 1025]).unwrap();
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("max_body_size"), "{}", r.body);
    assert_eq!(r.header("connection"), Some("close"));

    let chunked = |sizes: &[usize]| {
        let mut b =
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for n in sizes {
            b.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            b.extend_from_slice(&vec![b'c'; *n]);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"0\r\n\r\n");
        b
    };
    // Past the limit in the first read, and past it only with the second chunk.
    assert!(raw_status(env.listen, &chunked(&[2000])).contains(" 413 "));
    assert!(raw_status(env.listen, &chunked(&[600, 600])).contains(" 413 "));
    assert!(raw_status(env.listen, &chunked(&[500, 500])).contains(" 200 "));
    // The worker completed the two bodies within the limit, and nothing else.
    wait_for("the instance's count", Duration::from_secs(5), || {
        (env.instances("w")[0].requests == served + 1).then_some(())
    });
}
