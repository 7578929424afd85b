//! Observability against the real binary and real workers: the Prometheus metrics move exactly
//! as requests, crashes, scaling and reloads happen; `/status.json` is the document of
//! `tqproxy status --json`; `/healthz` names the worker that is down; the status page works in
//! a real browser and follows a scale live; the access log, worker log rotation and JSON logs;
//! systemd's `READY=1`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An environment with the admin listener on a free loopback port; `extra` is more global
/// YAML.
fn env_with_admin(workers: &[WorkerDef], extra: &str) -> (Env, SocketAddr) {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let env = Env::with_global(
        workers,
        &format!("control: {{ admin: \"{admin}\" }}\n{extra}"),
    );
    (env, admin)
}

/// One scrape of `/metrics`: samples by `name{label="v",…}` (labels sorted by name, as the
/// exposition writes them) and the `# TYPE` of every family.
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
    text: String,
}

fn scrape(admin: SocketAddr) -> Scrape {
    let r = http_get(admin, "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.headers
    );
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in r.body.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, ty) = t.split_once(' ').expect("# TYPE name type");
            types.insert(name.to_string(), ty.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (key, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
            samples.insert(key.to_string(), value);
        }
    }
    Scrape {
        samples,
        types,
        text: r.body,
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    // Label names sorted, except a histogram's `le`, which the exposition writes last.
    let mut l = labels.to_vec();
    l.sort_by_key(|(k, _)| (*k == "le", *k));
    let inner: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&key(name, labels)).copied()
    }

    /// The value, which must exist.
    fn v(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "no sample {} in the scrape:\n{}",
                key(name, labels),
                self.text
            )
        })
    }

    /// Sum of every sample of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(name).is_some_and(|rest| {
                    rest.starts_with('{')
                        && labels
                            .iter()
                            .all(|(lk, lv)| rest.contains(&format!("{lk}=\"{lv}\"")))
                })
            })
            .map(|(_, v)| *v)
            .sum()
    }

    fn ty(&self, name: &str) -> &str {
        self.types
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no # TYPE for {name} in:\n{}", self.text))
    }
}

/// Polls `/metrics` until `pred` holds; returns that scrape.
fn wait_metrics(admin: SocketAddr, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut last = None;
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(what, Duration::from_secs(30), || {
            let s = scrape(admin);
            if pred(&s) {
                Some(s)
            } else {
                last = Some(s.text);
                None
            }
        })
    }));
    match found {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "---- last /metrics ----\n{}",
                last.unwrap_or_default()
                    .lines()
                    .filter(|l| l.starts_with("tqproxy_") && !l.contains("_bucket"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::panic::resume_unwind(e)
        }
    }
}

fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn the_admin_listener_defaults_to_loopback_8090_and_stays_on_loopback() {
    let load = |control: &str| {
        let env = Env::with_global(
            &[WorkerDef::backend("w", "[\"/\"]", 1, "")],
            &format!("control: {{ {control} }}\n"),
        );
        tqproxy::config::Config::load(&env.conf()).map(|c| c.admin)
    };
    assert_eq!(
        load("socket: ../run/tqproxy.sock").unwrap(),
        Some(SocketAddr::from(([127, 0, 0, 1], 8090)))
    );
    assert_eq!(load("admin: off").unwrap(), None);
    let e = load("admin: \"0.0.0.0:8090\"").unwrap_err().to_string();
    assert!(e.contains("control.admin") && e.contains("loopback"), "{e}");
}

/// A response the worker breaks off after its head went out reaches the client truncated (and
/// closed); it is counted under its status, and as an upstream error, so that a dashboard of
/// errors shows it.
#[test]
fn a_response_cut_mid_body_counts_as_an_upstream_error() {
    use std::io::{Read, Write};
    let (mut env, admin) = env_with_admin(&[WorkerDef::rawecho("w", "[\"/\"]", "")], "");
    env.start();
    let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b";
    let hex: String = reply.iter().map(|b| format!("{b:02x}")).collect();
    let mut s = std::net::TcpStream::connect(env.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: x\r\nX-Rawecho-Reply: {hex}\r\nX-Rawecho-Close: 1\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .expect("tqproxy closes the truncated response");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nonly ten b"), "{got}");

    let m = wait_metrics(admin, "the cut response counted", |m| {
        m.get(
            "tqproxy_requests_total",
            &[("worker", "w"), ("code", "2xx")],
        ) == Some(1.0)
    });
    assert_eq!(
        m.v(
            "tqproxy_upstream_errors_total",
            &[("worker", "w"), ("kind", "closed")]
        ),
        1.0,
        "the worker closed mid-body"
    );
    assert_eq!(
        m.sum("tqproxy_upstream_errors_total", &[("worker", "w")]),
        1.0
    );
    // No retry: the head had gone out.
    assert_eq!(m.v("tqproxy_retries_total", &[("worker", "w")]), 0.0);
}

#[test]
fn request_counters_move_exactly_by_worker_and_status_class() {
    let (mut env, admin) = env_with_admin(
        &[
            WorkerDef::backend("w", "[\"/w\"]", 1, "strip_prefix: true\n"),
            WorkerDef::backend("other", "[\"/o\"]", 1, "strip_prefix: true\n"),
            // Scaled to zero: its requests wait queue_timeout for an instance, then 503.
            WorkerDef::backend("idle", "[\"/idle\"]", 0, "queue_timeout: 300ms\n"),
        ],
        "",
    );
    env.start();
    let before = scrape(admin);
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        assert_eq!(
            before.v(
                "tqproxy_requests_total",
                &[("worker", "w"), ("code", class)]
            ),
            0.0
        );
    }

    for _ in 0..10 {
        assert_eq!(env.get("/w/").status, 200);
    }
    for _ in 0..3 {
        // backend answers 404 itself: a worker's 4xx.
        let r = env.get("/w/no-such-page");
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-worker"), Some("w"));
    }
    for _ in 0..2 {
        assert_eq!(env.get("/o/").status, 200);
    }
    // No route: tqproxy's own 404, counted apart from every worker.
    assert_eq!(env.get("/nowhere").status, 404);
    // No instance: tqproxy's own 503 after waiting in the queue, counted for the worker.
    let r = env.get("/idle");
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());

    let w = |code| [("worker", "w"), ("code", code)];
    // Counted in the logging phase, after the response went out: poll until they settle.
    let m = wait_metrics(admin, "10 × 2xx and 3 × 4xx for w", |m| {
        m.get("tqproxy_requests_total", &w("2xx")) == Some(10.0)
            && m.get("tqproxy_requests_total", &w("4xx")) == Some(3.0)
            && m.get(
                "tqproxy_requests_total",
                &[("worker", "other"), ("code", "2xx")],
            ) == Some(2.0)
    });
    for code in ["1xx", "3xx", "5xx"] {
        assert_eq!(m.v("tqproxy_requests_total", &w(code)), 0.0, "{code}");
    }
    assert_eq!(
        m.v(
            "tqproxy_requests_total",
            &[("worker", "other"), ("code", "4xx")]
        ),
        0.0
    );
    assert_eq!(
        m.v("tqproxy_unrouted_requests_total", &[("reason", "no_route")]),
        1.0
    );
    assert_eq!(
        m.v("tqproxy_request_duration_seconds_count", &[("worker", "w")]),
        13.0
    );
    assert_eq!(
        m.v(
            "tqproxy_request_duration_seconds_bucket",
            &[("worker", "w"), ("le", "+Inf")]
        ),
        13.0
    );
    assert!(m.v("tqproxy_request_duration_seconds_sum", &[("worker", "w")]) > 0.0);
    // Nothing failed, nothing waited, nothing is in flight.
    assert_eq!(
        m.sum("tqproxy_upstream_errors_total", &[("worker", "w")]),
        0.0
    );
    assert_eq!(m.v("tqproxy_retries_total", &[("worker", "w")]), 0.0);
    assert_eq!(
        m.v("tqproxy_queue_wait_seconds_count", &[("worker", "w")]),
        0.0
    );
    assert_eq!(m.v("tqproxy_in_flight_requests", &[("worker", "w")]), 0.0);
    assert_eq!(
        m.v(
            "tqproxy_worker_instances",
            &[("worker", "w"), ("state", "ready")]
        ),
        1.0
    );
    for cause in [
        "crash",
        "liveness",
        "max_requests",
        "memory",
        "deploy",
        "scale",
    ] {
        assert_eq!(
            m.v(
                "tqproxy_worker_restarts_total",
                &[("worker", "w"), ("cause", cause)]
            ),
            0.0,
            "{cause}"
        );
    }
    // The status document agrees on the number of requests.
    assert_eq!(env.worker("w").requests, 13);
    // The request that found no instance: one wait of queue_timeout, one 5xx.
    let idle = |code| [("worker", "idle"), ("code", code)];
    let m = wait_metrics(admin, "the 503 of idle counted", |m| {
        m.get("tqproxy_requests_total", &idle("5xx")) == Some(1.0)
    });
    assert_eq!(m.v("tqproxy_requests_total", &idle("2xx")), 0.0);
    assert_eq!(
        m.v("tqproxy_queue_wait_seconds_count", &[("worker", "idle")]),
        1.0
    );
    assert!(m.v("tqproxy_queue_wait_seconds_sum", &[("worker", "idle")]) >= 0.3);
    assert_eq!(
        m.v(
            "tqproxy_worker_instances",
            &[("worker", "idle"), ("state", "ready")]
        ),
        0.0
    );
    // A worker scaled to zero on purpose does not make the machine unhealthy.
    assert_eq!(http_get(admin, "/healthz", None).status, 200);

    // Memory and CPU per instance, labelled with the instance id (read once a second).
    let ids: Vec<String> = env
        .instances("w")
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    let m = wait_metrics(admin, "memory and CPU of every instance", |m| {
        ids.iter().all(|id| {
            m.get(
                "tqproxy_instance_memory_bytes",
                &[("worker", "w"), ("instance", id)],
            )
            .is_some_and(|v| v > 0.0)
                && m.get(
                    "tqproxy_instance_cpu_seconds_total",
                    &[("worker", "w"), ("instance", id)],
                )
                .is_some()
        })
    });

    // Types as Prometheus expects them (counters, and only counters, end in _total).
    for (name, ty) in [
        ("tqproxy_requests_total", "counter"),
        ("tqproxy_request_duration_seconds", "histogram"),
        ("tqproxy_upstream_errors_total", "counter"),
        ("tqproxy_retries_total", "counter"),
        ("tqproxy_in_flight_requests", "gauge"),
        ("tqproxy_queue_wait_seconds", "histogram"),
        ("tqproxy_worker_instances", "gauge"),
        ("tqproxy_worker_restarts_total", "counter"),
        ("tqproxy_instance_memory_bytes", "gauge"),
        ("tqproxy_instance_cpu_seconds_total", "counter"),
        ("tqproxy_reloads_total", "counter"),
        ("tqproxy_build_info", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
    ] {
        assert_eq!(m.ty(name), ty, "{name}");
    }
    for (name, ty) in &m.types {
        assert_eq!(
            ty == "counter",
            name.ends_with("_total"),
            "{name} is a {ty}"
        );
    }
    assert_eq!(
        m.v(
            "tqproxy_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(m.v("process_resident_memory_bytes", &[]) > 0.0);

    // pingora's own log output (via the `log` crate) comes out through tracing.
    let out = env.output();
    assert!(
        out.lines()
            .any(|l| l.contains(" INFO ") && l.contains("Server starting")),
        "pingora's startup lines are not in tqproxy's log:\n{out}"
    );
}

#[test]
fn crash_scale_and_reload_move_their_counters() {
    let (mut env, admin) = env_with_admin(&[WorkerDef::backend("w", "[\"/\"]", 1, "")], "");
    env.start();
    let first = env.instances("w")[0].clone();
    let ready = [("worker", "w"), ("state", "ready")];
    let restarts = |cause| [("worker", "w"), ("cause", cause)];

    // kill -9: one crash restart, back to one ready instance (same id, new process).
    kill9(first.pid.unwrap());
    wait_metrics(admin, "a crash restart and 1 ready instance", |m| {
        m.get("tqproxy_worker_restarts_total", &restarts("crash")) == Some(1.0)
            && m.get("tqproxy_worker_instances", &ready) == Some(1.0)
    });
    let again = env.wait_ready("w", 1);
    assert_eq!(again[0].id, first.id);
    assert_ne!(again[0].pid, first.pid);
    assert_eq!(env.get("/").status, 200);

    // Scale 1 → 3: two instances started by `scale`, each with its memory and CPU series.
    env.ok(&["scale", "w", "3"]);
    let ids: Vec<String> = env
        .wait_ready("w", 3)
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    let m = wait_metrics(admin, "3 ready instances with memory and CPU", |m| {
        m.get("tqproxy_worker_instances", &ready) == Some(3.0)
            && ids.iter().all(|id| {
                m.get(
                    "tqproxy_instance_memory_bytes",
                    &[("worker", "w"), ("instance", id)],
                )
                .is_some()
                    && m.get(
                        "tqproxy_instance_cpu_seconds_total",
                        &[("worker", "w"), ("instance", id)],
                    )
                    .is_some()
            })
    });
    assert_eq!(
        m.v("tqproxy_worker_restarts_total", &restarts("scale")),
        2.0
    );
    assert_eq!(
        m.v("tqproxy_worker_restarts_total", &restarts("crash")),
        1.0
    );

    // Scale 3 → 1: two more by `scale`; the series of the stopped instances go away.
    env.ok(&["scale", "w", "1"]);
    let kept = env.wait_ready("w", 1)[0].id.to_string();
    let gone: Vec<&String> = ids.iter().filter(|id| **id != kept).collect();
    assert_eq!(gone.len(), 2);
    let m = wait_metrics(admin, "1 ready instance, stopped ones forgotten", |m| {
        m.get("tqproxy_worker_instances", &ready) == Some(1.0)
            && gone.iter().all(|id| {
                m.get(
                    "tqproxy_instance_memory_bytes",
                    &[("worker", "w"), ("instance", id)],
                )
                .is_none()
            })
    });
    assert_eq!(
        m.v("tqproxy_worker_restarts_total", &restarts("scale")),
        4.0
    );

    // Reloads, by result.
    assert_eq!(m.v("tqproxy_reloads_total", &[("result", "ok")]), 0.0);
    env.ok(&["reload"]);
    let m = scrape(admin);
    assert_eq!(m.v("tqproxy_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(m.v("tqproxy_reloads_total", &[("result", "failed")]), 0.0);
    let conf = std::fs::read_to_string(env.conf()).unwrap();
    std::fs::write(env.conf(), format!("{conf}no_such_key: 1\n")).unwrap();
    let o = env.cli(&["reload"]);
    assert!(!o.status.success(), "a broken config must fail the reload");
    std::fs::write(env.conf(), conf).unwrap();
    let m = scrape(admin);
    assert_eq!(m.v("tqproxy_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(m.v("tqproxy_reloads_total", &[("result", "failed")]), 1.0);
}

#[test]
fn an_instance_dying_mid_request_counts_an_upstream_error_and_a_retry() {
    let (mut env, admin) = env_with_admin(&[WorkerDef::backend("w", "[\"/\"]", 2, "")], "");
    env.start();
    let addr = env.listen;
    let slow = std::thread::spawn(move || request(addr, "GET", "/slow?ms=2000", None, &[], b""));
    // The instance holding the request…
    let victim = wait_for(
        "the slow request in flight",
        Duration::from_secs(10),
        || env.instances("w").into_iter().find(|i| i.in_flight == 1),
    );
    assert_eq!(
        scrape(admin).v("tqproxy_in_flight_requests", &[("worker", "w")]),
        1.0
    );
    // …dies before answering: the GET is retried on its sibling and succeeds.
    kill9(victim.pid.unwrap());
    let r = slow.join().unwrap().expect("the request was retried");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "slow done\n");
    assert_ne!(r.header("x-instance"), Some(victim.id.to_string().as_str()));

    let m = wait_metrics(admin, "the request counted", |m| {
        m.get(
            "tqproxy_requests_total",
            &[("worker", "w"), ("code", "2xx")],
        ) == Some(1.0)
    });
    assert_eq!(
        m.sum("tqproxy_upstream_errors_total", &[("worker", "w")]),
        1.0,
        "one failed attempt"
    );
    let lost = m.v(
        "tqproxy_upstream_errors_total",
        &[("worker", "w"), ("kind", "closed")],
    ) + m.v(
        "tqproxy_upstream_errors_total",
        &[("worker", "w"), ("kind", "reset")],
    );
    assert_eq!(lost, 1.0, "the connection was lost (closed or reset)");
    assert_eq!(m.v("tqproxy_retries_total", &[("worker", "w")]), 1.0);
    assert_eq!(
        m.v(
            "tqproxy_requests_total",
            &[("worker", "w"), ("code", "5xx")]
        ),
        0.0
    );
    wait_metrics(admin, "the crash counted", |m| {
        m.get(
            "tqproxy_worker_restarts_total",
            &[("worker", "w"), ("cause", "crash")],
        ) == Some(1.0)
    });
}

// ---------------------------------------------------------------------------------------------
// Status document, table, health
// ---------------------------------------------------------------------------------------------

/// The document with the fields that move by themselves (time, CPU, memory) blanked.
fn steady(mut v: Value) -> Value {
    v["uptime_secs"] = Value::Null;
    for w in v["workers"].as_array_mut().expect("workers") {
        if let Some(s) = w.get_mut("standby").filter(|s| !s.is_null()) {
            s["expires_in_secs"] = Value::Null;
        }
        for i in w["instances"].as_array_mut().expect("instances") {
            for k in ["uptime_secs", "cpu_seconds", "memory_bytes"] {
                i[k] = Value::Null;
            }
        }
    }
    v
}

#[test]
fn status_json_is_the_cli_document_and_the_table_lists_instances() {
    let (mut env, admin) = env_with_admin(
        &[
            WorkerDef::backend("w", "[\"/\"]", 2, ""),
            WorkerDef::backend("api", "[\"api.test/v1\"]", 1, ""),
        ],
        "",
    );
    env.start();
    for _ in 0..5 {
        assert_eq!(env.get("/").status, 200);
    }
    wait_for("5 requests counted", Duration::from_secs(10), || {
        (env.worker("w").requests == 5).then_some(())
    });

    let cli: Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    let r = http_get(admin, "/status.json", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let web: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(steady(web.clone()), steady(cli));
    assert_eq!(web["admin"], admin.to_string());
    let w = web["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "w")
        .expect("w in status.json");
    assert_eq!(w["instances"].as_array().unwrap().len(), 2);
    assert_eq!(w["requests"], 5);

    // The table: a health line, a block per worker, a row per instance.
    let table = env.ok(&["status"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("tqproxy "), "{table}");
    assert!(lines[0].contains(&format!("admin {admin}")), "{table}");
    assert_eq!(lines[1], "health: ok", "{table}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("api  routes api.test/v1")),
        "{table}"
    );
    let header = lines
        .iter()
        .position(|l| l.starts_with("w  routes /"))
        .expect("w's block")
        + 1;
    for c in [
        "ID", "PID", "PORT", "STATE", "GEN", "ROLE", "ROUTED", "RST", "INFL", "REQUESTS", "UPTIME",
        "MEMORY", "CPU",
    ] {
        assert!(lines[header].contains(c), "{c} in {}", lines[header]);
    }
    for (row, inst) in lines[header + 1..header + 3].iter().zip(env.instances("w")) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[0], inst.id.to_string(), "{row}");
        assert_eq!(cells[1], inst.pid.unwrap().to_string(), "{row}");
        assert_eq!(cells[2], inst.port.unwrap().to_string(), "{row}");
        assert_eq!(cells[3], "ready", "{row}");
        assert_eq!(cells[6], "yes", "{row}");
    }

    // The other admin endpoints.
    let r = http_get(admin, "/healthz", None);
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = http_get(admin, "/status", None);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(
        r.header("content-security-policy")
            .is_some_and(|c| c.contains("default-src 'none'")),
        "the page loads nothing from elsewhere"
    );
    assert!(r.body.contains("status.json"));
    assert_eq!(http_get(admin, "/nope", None).status, 404);
    let r = request(admin, "POST", "/metrics", None, &[], b"x").unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = request(admin, "HEAD", "/healthz", None, &[], b"").unwrap();
    assert_eq!(r.status, 200);
    // The admin listener is not the proxy: its paths are not routed to workers.
    assert_eq!(env.get("/healthz").header("x-worker"), Some("w"));
}

#[test]
fn healthz_goes_503_naming_the_worker_that_is_down_and_recovers() {
    let (mut env, admin) = env_with_admin(&[WorkerDef::backend("fine", "[\"/\"]", 1, "")], "");
    // `flaky` runs chaos through a script that fails while a flag file exists.
    let dir = env.worker_dir("flaky");
    std::fs::create_dir_all(&dir).unwrap();
    let flag = dir.join("broken");
    std::fs::write(
        dir.join("run.sh"),
        format!(
            "if [ -e '{}' ]; then echo 'flag set: refusing to start' >&2; exit 3; fi\nexec '{CHAOS}'\n",
            flag.display()
        ),
    )
    .unwrap();
    env.write_worker(&WorkerDef::chaos(
        "flaky",
        "[\"/flaky\"]",
        1,
        &format!(
            "command: [\"/bin/sh\", \"{}\"]\nrestart: {{ backoff: 100ms, backoff_max: 500ms, crashloop_after: 2 }}\n",
            dir.join("run.sh").display()
        ),
    ));
    // WorkerDef::chaos put its own command first; keep only ours.
    let yaml = std::fs::read_to_string(dir.join("worker.yaml")).unwrap();
    let yaml: String = yaml
        .lines()
        .filter(|l| !l.starts_with(&format!("command: [\"{CHAOS}\"]")))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("worker.yaml"), yaml).unwrap();
    env.start();

    let r = http_get(admin, "/healthz", None);
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    // The worker goes down for good: its instance is killed and cannot start again.
    std::fs::write(&flag, "").unwrap();
    kill9(env.instances("flaky")[0].pid.unwrap());
    let r = wait_for(
        "/healthz 503 with the failed start as the reason",
        Duration::from_secs(30),
        || {
            let r = http_get(admin, "/healthz", None);
            (r.status == 503 && r.body.contains("exited with code 3")).then_some(r)
        },
    );
    assert!(r.body.ends_with('\n'));
    assert_eq!(r.body.lines().count(), 1, "one line: {:?}", r.body);
    assert!(
        r.body.starts_with("no ready instance: flaky ("),
        "{:?}",
        r.body
    );
    assert!(!r.body.contains("fine"), "{:?}", r.body);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let table = env.ok(&["status"]);
    assert!(
        table.contains("health: DOWN, no ready instance: flaky ("),
        "{table}"
    );
    // The neighbour keeps serving meanwhile.
    assert_eq!(env.get("/").status, 200);

    // Fixed: the next restart attempt succeeds, and the machine is healthy again.
    std::fs::remove_file(&flag).unwrap();
    wait_for("/healthz 200 again", Duration::from_secs(30), || {
        let r = http_get(admin, "/healthz", None);
        (r.status == 200).then_some(())
    });
}

// ---------------------------------------------------------------------------------------------
// The status page in a real browser
// ---------------------------------------------------------------------------------------------

pub(crate) mod browser {
    //! Just enough of the Chrome DevTools Protocol (a WebSocket client, std only) to load a
    //! page in headless chromium, evaluate JavaScript in it and take screenshots.

    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use serde_json::{Value, json};

    use crate::harness::wait_for;

    pub struct Browser {
        child: Child,
        port: u16,
        _profile: tempfile::TempDir,
    }

    fn find_chromium() -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
            .find(|p| p.is_file())
    }

    impl Browser {
        pub fn launch() -> Browser {
            let exe = find_chromium().unwrap_or_else(|| {
                panic!(
                    "chromium is not installed: the status page test runs a real browser. \
                     Run `scripts/deps.sh --test` (it installs Debian's chromium; CI does)."
                )
            });
            let profile = tempfile::Builder::new()
                .prefix("tqproxy-chromium-")
                .tempdir()
                .unwrap();
            let child = Command::new(&exe)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-extensions",
                    "--remote-debugging-port=0",
                    "--window-size=1280,900",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own process group, so that Drop ends every process it started.
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
            // With port 0, chromium writes the port it chose into the profile directory.
            let active = profile.path().join("DevToolsActivePort");
            let port = wait_for("chromium's DevTools port", Duration::from_secs(30), || {
                std::fs::read_to_string(&active)
                    .ok()?
                    .lines()
                    .next()?
                    .trim()
                    .parse::<u16>()
                    .ok()
            });
            Browser {
                child,
                port,
                _profile: profile,
            }
        }

        /// The first page (tab) of the browser.
        pub fn page(&self) -> Page {
            let list = get_json(self.port, "/json/list");
            let url = list
                .as_array()
                .and_then(|a| a.iter().find(|t| t["type"] == "page"))
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .unwrap_or_else(|| panic!("no page target in {list}"))
                .to_string();
            Page::connect(&url)
        }
    }

    impl Drop for Browser {
        fn drop(&mut self) {
            // The whole process group we created (browser, zygote, renderers): by its id.
            let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }

    fn get_json(port: u16, path: &str) -> Value {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        // DevTools' HTTP server may keep the connection open: read by Content-Length.
        let mut r = BufReader::new(s);
        let mut len = 0;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&body)))
    }

    /// A DevTools session with one page over a WebSocket.
    pub struct Page {
        r: BufReader<TcpStream>,
        w: TcpStream,
        next_id: u64,
        /// Uncaught exceptions and error log entries the page produced.
        pub errors: Vec<String>,
    }

    impl Page {
        fn connect(ws_url: &str) -> Page {
            let rest = ws_url.strip_prefix("ws://").expect("ws:// URL");
            let (host, path) = rest.split_at(rest.find('/').expect("path"));
            let s = TcpStream::connect(host).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            write!(
                w,
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .unwrap();
            let mut status = String::new();
            r.read_line(&mut status).unwrap();
            assert!(
                status.contains(" 101 "),
                "WebSocket upgrade refused: {status}"
            );
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
            }
            let mut page = Page {
                r,
                w,
                next_id: 1,
                errors: Vec::new(),
            };
            page.call("Runtime.enable", json!({}));
            page.call("Log.enable", json!({}));
            page.call("Page.enable", json!({}));
            page
        }

        fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
            let mut f = vec![0x80 | opcode];
            match payload.len() {
                n if n < 126 => f.push(0x80 | n as u8),
                n if n < 65536 => {
                    f.push(0x80 | 126);
                    f.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    f.push(0x80 | 127);
                    f.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            // Client frames are masked (RFC 6455 §5.3); the key needs no secrecy here.
            let mask = (self.next_id as u32)
                .wrapping_mul(0x9E37_79B9)
                .to_be_bytes();
            f.extend_from_slice(&mask);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            self.w.write_all(&f).unwrap();
        }

        /// The next complete message (text or binary), answering pings on the way.
        fn read_message(&mut self) -> Vec<u8> {
            let mut msg = Vec::new();
            loop {
                let mut h = [0u8; 2];
                self.r.read_exact(&mut h).expect("DevTools connection");
                let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
                let mut len = (h[1] & 0x7f) as u64;
                if len == 126 {
                    let mut b = [0u8; 2];
                    self.r.read_exact(&mut b).unwrap();
                    len = u16::from_be_bytes(b) as u64;
                } else if len == 127 {
                    let mut b = [0u8; 8];
                    self.r.read_exact(&mut b).unwrap();
                    len = u64::from_be_bytes(b);
                }
                let mask = if h[1] & 0x80 != 0 {
                    let mut m = [0u8; 4];
                    self.r.read_exact(&mut m).unwrap();
                    Some(m)
                } else {
                    None
                };
                let mut payload = vec![0u8; len as usize];
                self.r.read_exact(&mut payload).unwrap();
                if let Some(m) = mask {
                    for (i, b) in payload.iter_mut().enumerate() {
                        *b ^= m[i % 4];
                    }
                }
                match opcode {
                    0x8 => panic!("DevTools closed the connection"),
                    0x9 => self.send_frame(0xA, &payload),
                    0xA => {}
                    _ => {
                        msg.extend_from_slice(&payload);
                        if fin {
                            return msg;
                        }
                    }
                }
            }
        }

        /// Calls a DevTools method and returns its result; events on the way are scanned for
        /// errors.
        pub fn call(&mut self, method: &str, params: Value) -> Value {
            let id = self.next_id;
            self.next_id += 1;
            let req = json!({"id": id, "method": method, "params": params}).to_string();
            self.send_frame(0x1, req.as_bytes());
            loop {
                let m: Value = serde_json::from_slice(&self.read_message()).unwrap();
                if m["id"] == id {
                    if let Some(e) = m.get("error") {
                        panic!("{method}: {e}");
                    }
                    return m["result"].clone();
                }
                match m["method"].as_str() {
                    Some("Runtime.exceptionThrown") => self
                        .errors
                        .push(m["params"]["exceptionDetails"].to_string()),
                    Some("Log.entryAdded") if m["params"]["entry"]["level"] == "error" => {
                        self.errors.push(m["params"]["entry"].to_string())
                    }
                    _ => {}
                }
            }
        }

        /// Evaluates a JavaScript expression and returns its value.
        pub fn eval(&mut self, expr: &str) -> Value {
            let r = self.call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            );
            if let Some(e) = r.get("exceptionDetails") {
                panic!("{expr}: {e}");
            }
            r["result"]["value"].clone()
        }

        pub fn navigate(&mut self, url: &str) {
            self.call("Page.navigate", json!({ "url": url }));
        }

        /// Sets the viewport (CSS pixels); `mobile` also emulates a phone.
        pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
            self.call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
            );
        }

        /// A PNG of the page as it is now, written to `path`.
        pub fn screenshot(&mut self, path: &Path) {
            let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
            let data = base64_decode(r["data"].as_str().expect("screenshot data"));
            std::fs::write(path, data).unwrap();
        }
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        };
        let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').map(val).collect();
        let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            for (i, b) in chunk.iter().enumerate() {
                n |= (*b as u32) << (18 - 6 * i);
            }
            out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
        }
        out
    }

    #[test]
    fn base64_roundtrip() {
        assert_eq!(base64_decode("aGVsbG8="), b"hello");
        assert_eq!(base64_decode("aGk="), b"hi");
        assert_eq!(base64_decode("YWJj"), b"abc");
    }
}

/// A light, steady trickle of requests (about 50/s) until dropped, so rates are not zero.
struct Trickle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Trickle {
    fn start(addr: SocketAddr) -> Trickle {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut conn = None;
            while !s.load(Ordering::Relaxed) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Conn::open(addr) {
                        Ok(c) => conn.insert(c),
                        Err(_) => return,
                    },
                };
                if c.get("/").is_err() {
                    conn = None;
                }
                // Pacing, not waiting for anything.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Trickle {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn status_page_renders_in_a_browser_and_follows_a_scale_live() {
    let browser = browser::Browser::launch();
    let (mut env, admin) = env_with_admin(&[WorkerDef::backend("w", "[\"/\"]", 1, "")], "");
    env.start();
    let _load = Trickle::start(env.listen);
    let mut page = browser.page();
    page.navigate(&format!("http://{admin}/status"));

    let rows = r#"document.querySelectorAll('[data-worker="w"] tr[data-instance]').length"#;
    wait_for(
        "the page shows w's one instance",
        Duration::from_secs(30),
        || (page.eval(rows) == 1).then_some(()),
    );
    let inst = env.instances("w")[0].clone();
    let cells = page.eval(
        r#"[...document.querySelectorAll('[data-worker="w"] tr[data-instance] td')].map(td => td.textContent.trim())"#,
    );
    let cells: Vec<&str> = cells
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cells[0], inst.id.to_string(), "{cells:?}");
    assert_eq!(cells[1], inst.pid.unwrap().to_string(), "{cells:?}");
    assert_eq!(cells[2], inst.port.unwrap().to_string(), "{cells:?}");
    assert_eq!(cells[3], "ready", "{cells:?}");
    assert_eq!(
        page.eval("document.getElementById('health').textContent"),
        "healthy"
    );
    // Rates need two documents: requests/s of the worker becomes a positive number.
    wait_for("a positive requests/s", Duration::from_secs(30), || {
        let v = page.eval(r#"document.querySelector('[data-worker="w"] .spark .v').textContent"#);
        v.as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|r| *r > 0.0)
    });
    wait_for(
        "memory of the instance shown",
        Duration::from_secs(10),
        || {
            let v = page.eval(r#"document.querySelector('[data-worker="w"] td[data-label="memory"]').textContent"#);
            v.as_str().filter(|s| s.ends_with("iB")).map(|_| ())
        },
    );
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    page.screenshot(&shots.join("status-page-desktop.png"));

    // A scale shows up without reloading the page.
    page.eval("window.__sameDocument = 42");
    env.ok(&["scale", "w", "3"]);
    wait_for(
        "the page shows 3 ready instances after `tqproxy scale w 3`",
        Duration::from_secs(30),
        || {
            let n = page.eval(
                r#"document.querySelectorAll('[data-worker="w"] tr[data-instance][data-state="ready"]').length"#,
            );
            (n == 3).then_some(())
        },
    );
    assert_eq!(
        page.eval("window.__sameDocument"),
        42,
        "the page was not reloaded"
    );

    // On a phone: nothing scrolls sideways.
    page.viewport(390, 844, true);
    let refreshes = page
        .eval("+document.body.dataset.refreshes")
        .as_u64()
        .unwrap();
    wait_for("a refresh at phone width", Duration::from_secs(10), || {
        (page
            .eval("+document.body.dataset.refreshes")
            .as_u64()
            .unwrap()
            > refreshes)
            .then_some(())
    });
    assert_eq!(
        page.eval("document.documentElement.scrollWidth <= window.innerWidth"),
        true,
        "horizontal overflow at 390 px: {}",
        page.eval("document.documentElement.scrollWidth")
    );
    page.screenshot(&shots.join("status-page-phone.png"));
    eprintln!(
        "status page screenshots: {}/status-page-{{desktop,phone}}.png",
        shots.display()
    );
    assert!(
        page.errors.is_empty(),
        "the page logged errors: {:?}",
        page.errors
    );
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    wait_for(
        &format!("{n} lines in {}", path.display()),
        Duration::from_secs(10),
        || {
            let s = std::fs::read_to_string(path).ok()?;
            let lines: Vec<String> = s.lines().map(String::from).collect();
            (lines.len() >= n).then_some(lines)
        },
    )
}

#[test]
fn access_log_has_one_line_per_request_in_json_and_combined() {
    let w = WorkerDef::backend("w", "[\"/w\"]", 1, "strip_prefix: true\n");
    let mut env = Env::with_global(
        std::slice::from_ref(&w),
        "log: { access_log: ../logs/access.log, access_format: json }\n",
    );
    env.start();
    let inst = env.instances("w")[0].clone();
    for _ in 0..5 {
        assert_eq!(env.get("/w/").status, 200);
    }
    for _ in 0..2 {
        assert_eq!(env.get("/w/missing").status, 404);
    }
    assert_eq!(env.get("/nowhere").status, 404);
    let r = request(
        env.listen,
        "GET",
        "/w/?q=1",
        Some("front.test"),
        &[("X-Request-Id", "rid-test-1"), ("User-Agent", "it/1.0")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200);

    let path = env.dir.path().join("logs/access.log");
    let lines = wait_lines(&path, 9);
    assert_eq!(
        lines.len(),
        9,
        "one line per request:\n{}",
        lines.join("\n")
    );
    let entries: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let count = |status: u64, worker: Value| {
        entries
            .iter()
            .filter(|e| e["status"] == status && e["worker"] == worker)
            .count()
    };
    assert_eq!(count(200, "w".into()), 6);
    assert_eq!(count(404, "w".into()), 2);
    assert_eq!(count(404, Value::Null), 1, "the unrouted request");
    let last = &entries[8];
    assert_eq!(last["request_id"], "rid-test-1");
    assert_eq!(last["target"], "/w/?q=1");
    assert_eq!(last["host"], "front.test");
    assert_eq!(last["user_agent"], "it/1.0");
    assert_eq!(last["method"], "GET");
    assert_eq!(last["instance"], inst.id);
    assert_eq!(last["port"], inst.port.unwrap());
    assert!(last["duration_s"].as_f64().unwrap() > 0.0);
    assert!(last["time"].as_str().unwrap().ends_with('Z'));
    env.stop(Duration::from_secs(30));

    // The combined format (the default).
    let mut env = Env::with_global(&[w], "log: { access_log: ../logs/access.log }\n");
    env.start();
    let inst = env.instances("w")[0].clone();
    assert_eq!(env.get("/w/").status, 200);
    assert_eq!(env.get("/w/missing").status, 404);
    let lines = wait_lines(&env.dir.path().join("logs/access.log"), 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let tail = format!(" worker=w instance={}:{} rid=", inst.id, inst.port.unwrap());
    for (line, status) in lines.iter().zip([200, 404]) {
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        assert!(
            line.contains(&format!(
                "] \"GET /w/{} HTTP/1.1\" {status} ",
                if status == 404 { "missing" } else { "" }
            )),
            "{line}"
        );
        assert!(line.contains(&tail), "{line}");
    }

    // logrotate's way: move the file away, `tqproxy reload` reopens the path.
    let path = env.dir.path().join("logs/access.log");
    let moved = env.dir.path().join("logs/access.log.1");
    std::fs::rename(&path, &moved).unwrap();
    assert_eq!(env.get("/w/").status, 200);
    env.ok(&["reload"]);
    assert_eq!(env.get("/w/missing").status, 404);
    let lines = wait_lines(&path, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("\"GET /w/missing HTTP/1.1\" 404 "),
        "{lines:?}"
    );
    let old = std::fs::read_to_string(&moved).unwrap();
    assert_eq!(old.lines().count(), 3, "written before the reopen:\n{old}");
    env.stop(Duration::from_secs(30));
}

#[test]
fn worker_logs_rotate_at_the_configured_size_keeping_n_files() {
    let noisy = WorkerDef::backend(
        "noisy",
        "[\"/\"]",
        1,
        &format!(
            "command: [\"/bin/sh\", \"-c\", \"i=0; while [ $i -lt 400 ]; do echo \\\"noisy line $i ..............................\\\"; i=$((i+1)); done; exec {BACKEND}\"]\n"
        ),
    );
    // WorkerDef::backend put its own command first; keep only ours.
    let yaml: String = noisy
        .yaml
        .lines()
        .filter(|l| !l.starts_with(&format!("command: [\"{BACKEND}\"]")))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut env = Env::with_global(
        &[WorkerDef::new("noisy", &yaml)],
        "log: { worker_log_max_size: 4K, worker_log_keep: 2 }\n",
    );
    env.start();
    let logs = env.dir.path().join("logs");
    let read = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_default();
    wait_for(
        "the last noisy line logged",
        Duration::from_secs(10),
        || {
            (read("noisy.log") + &read("noisy.log.1"))
                .contains("noisy line 399 ")
                .then_some(())
        },
    );
    assert!(logs.join("noisy.log.1").is_file());
    assert!(logs.join("noisy.log.2").is_file());
    assert!(
        !logs.join("noisy.log.3").exists(),
        "only worker_log_keep = 2 old files are kept"
    );
    for f in ["noisy.log", "noisy.log.1", "noisy.log.2"] {
        let len = std::fs::metadata(logs.join(f)).unwrap().len();
        assert!(len <= 4096, "{f} is {len} bytes, above worker_log_max_size");
    }
    // Oldest to newest, the kept lines are consecutive: rotation loses nothing it keeps.
    let numbers: Vec<u32> = ["noisy.log.2", "noisy.log.1", "noisy.log"]
        .iter()
        .flat_map(|f| {
            read(f)
                .lines()
                .filter_map(|l| {
                    let rest = l.split("| noisy line ").nth(1)?;
                    rest.split(' ').next()?.parse().ok()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(numbers.len() > 50, "{numbers:?}");
    assert_eq!(*numbers.last().unwrap(), 399);
    assert!(numbers[0] > 0, "the oldest lines were rotated away");
    assert!(
        numbers.windows(2).all(|p| p[1] == p[0] + 1),
        "gaps or disorder: {numbers:?}"
    );
    // Lines are tagged with the instance and the stream.
    assert!(
        read("noisy.log.2")
            .lines()
            .all(|l| l.contains(" #1 g1 out| "))
    );
}

#[test]
fn json_log_format_gives_parseable_lines_including_pingoras() {
    let mut env = Env::with_global(
        &[WorkerDef::backend("w", "[\"/\"]", 1, "")],
        "log: { format: json }\n",
    );
    env.start();
    assert_eq!(env.get("/").status, 200);
    env.stop(Duration::from_secs(30));
    let out = env.output();
    let lines: Vec<Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 5, "{out}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
        assert!(l["fields"]["message"].is_string(), "{l}");
    }
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "ready"
            && l["fields"]["worker"] == "w"
            && l["fields"]["instance"] == 1),
        "tqproxy's structured fields: {out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "Server starting"
                && l["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("pingora"))),
        "pingora's own lines, bridged from `log`: {out}"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------

#[test]
fn sd_notify_ready_arrives_once_every_instance_is_ready() {
    let mut env = Env::new(&[WorkerDef::chaos(
        "slow",
        "[\"/\"]",
        2,
        "env: { CHAOS_START_DELAY_MS: \"1500\" }\nstart_timeout: 20s\n",
    )]);
    let path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    env.spawn_with_env(&[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 4096];
    let msg = wait_for(
        "READY=1 on NOTIFY_SOCKET",
        Duration::from_secs(30),
        || match sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => {
                assert!(env.exited().is_none(), "tqproxy exited:\n{}", env.output());
                None
            }
        },
    );
    // The instances take 1.5 s to come up: a READY=1 sent early would find them starting.
    let st = env.status();
    let inst = &st.workers[0].instances;
    assert_eq!(inst.len(), 2);
    assert!(
        inst.iter().all(|i| i.state == "ready" && i.routed),
        "READY=1 before the instances were ready: {inst:?}"
    );
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    // …and the proxy serves at once.
    assert_eq!(env.get("/").status, 200);
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("conf/tqproxy.service")).unwrap();
    for needed in [
        "Type=notify",
        "ExecStart=/usr/bin/tqproxy -c /etc/tqproxy/tqproxy.yaml run",
        "ExecReload=/usr/bin/tqproxy -c /etc/tqproxy/tqproxy.yaml reload",
        "KillMode=mixed",
    ] {
        assert!(unit.lines().any(|l| l == needed), "missing {needed:?}");
    }
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .find(|p| std::path::Path::new(p).is_file())
    else {
        eprintln!("systemd-analyze not installed: only the unit's key lines were checked");
        return;
    };
    // Verify a copy that points at this build (verify checks that the binary exists).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tqproxy.service");
    std::fs::write(&copy, unit.replace("/usr/bin/tqproxy", TQPROXY)).unwrap();
    let o = std::process::Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    // Lines about other units on this machine (or the absence of a running systemd) are not
    // ours; anything naming our file is.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tqproxy.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{stderr}");
}
