//! A node among several: `tqproxy drain`/`undrain` against the real binary and a real worker
//! (healthz 503 `draining`, `Connection: close` on a keep-alive connection's next response, new
//! connections still served, in-flight requests finishing, the timeout, reload keeps it),
//! HAProxy's agent-check answered to a real TCP client, `check --json`, and the Kubernetes
//! manifest's structure.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::harness::*;

/// An environment with the `control.health` and `control.agent` listeners on free loopback
/// ports.
fn node(workers: &[WorkerDef]) -> (Env, SocketAddr, SocketAddr) {
    let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let env = Env::with_global(
        workers,
        &format!("control: {{ admin: off, health: \"{health}\", agent: \"{agent}\" }}\n"),
    );
    (env, health, agent)
}

/// What the agent-check listener writes to a fresh TCP connection before it closes it.
fn agent_line(agent: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&agent, Duration::from_secs(5)).expect("agent connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("agent read until close");
    out
}

fn cli_out(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `tqproxy_drained` as the admin listener's /metrics shows it.
fn drained_gauge(admin: SocketAddr) -> Option<String> {
    let m = http_get(admin, "/metrics", None);
    m.body
        .lines()
        .find_map(|l| l.strip_prefix("tqproxy_drained "))
        .map(str::to_string)
}

#[test]
fn a_drained_node_fails_health_checks_closes_keepalive_and_still_serves() {
    let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut env = Env::with_global(
        &[WorkerDef::backend("api", "[\"/\"]", 2, "")],
        &format!("control: {{ admin: \"{admin}\", health: \"{health}\", agent: \"{agent}\" }}\n"),
    );
    env.start();
    assert_eq!(drained_gauge(admin).as_deref(), Some("0"));
    env.wait_ready("api", 2);
    assert_eq!(http_get(health, "/healthz", None).status, 200);
    assert_eq!(agent_line(agent), "ready up 100%\n");
    // The health listener serves /healthz alone.
    assert_eq!(http_get(health, "/metrics", None).status, 404);

    let mut kept = Conn::open(env.listen).unwrap();
    let r = kept.get("/").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), None, "{:?}", r.headers);

    let out = env.ok(&["drain", "--timeout", "10s"]);
    assert!(out.contains("drained: no request in flight"), "{out}");

    let h = http_get(health, "/healthz", None);
    assert_eq!(h.status, 503);
    assert!(h.body.contains("draining"), "{}", h.body);
    assert_eq!(agent_line(agent), "drain\n");
    // The keep-alive client is served once more and told to reconnect.
    let r = kept.get("/").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    assert!(kept.get("/").is_err(), "the connection was closed after it");
    // New connections are still served.
    assert_eq!(env.get("/").status, 200);
    let st = env.status();
    assert!(st.drained);
    assert!(env.ok(&["status"]).contains("DRAINED"));
    assert_eq!(drained_gauge(admin).as_deref(), Some("1"));

    // A reload keeps the node drained.
    env.ok(&["reload"]);
    assert!(env.status().drained);
    assert_eq!(http_get(health, "/healthz", None).status, 503);
    // A second drain says so.
    assert!(env.ok(&["drain"]).contains("already drained"));

    let out = env.ok(&["undrain"]);
    assert!(out.starts_with("undrained"), "{out}");
    assert_eq!(http_get(health, "/healthz", None).status, 200);
    assert_eq!(agent_line(agent), "ready up 100%\n");
    assert!(!env.status().drained);
    assert_eq!(drained_gauge(admin).as_deref(), Some("0"));
    let mut again = Conn::open(env.listen).unwrap();
    let r = again.get("/").unwrap();
    assert_eq!(r.header("connection"), None, "{:?}", r.headers);
    assert_eq!(again.get("/").unwrap().status, 200, "keep-alive again");
    env.stop(Duration::from_secs(20));
}

#[test]
fn drain_returns_when_in_flight_requests_finish_or_says_it_timed_out() {
    let (mut env, _health, _agent) = node(&[WorkerDef::backend("api", "[\"/\"]", 1, "")]);
    env.start();
    env.wait_ready("api", 1);
    let listen = env.listen;
    let done = Arc::new(AtomicBool::new(false));
    let slow = {
        let done = done.clone();
        std::thread::spawn(move || {
            let r = http_get(listen, "/slow?ms=1500", None);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    wait_for(
        "the slow request in flight",
        Duration::from_secs(10),
        || (env.worker("api").in_flight == 1).then_some(()),
    );
    let o = env.cli(&["drain", "--timeout", "30s"]);
    assert!(o.status.success(), "{}", cli_out(&o));
    assert!(
        done.load(Ordering::SeqCst),
        "drain returned before the in-flight request finished: {}",
        cli_out(&o)
    );
    let r = slow.join().unwrap();
    assert_eq!(r.status, 200, "the in-flight request finished: {}", r.body);
    env.ok(&["undrain"]);

    // One that outlasts the timeout: exit 1, and the output says so; the node stays drained.
    let slow = std::thread::spawn(move || http_get(listen, "/slow?ms=3000", None));
    wait_for(
        "the slow request in flight",
        Duration::from_secs(10),
        || (env.worker("api").in_flight == 1).then_some(()),
    );
    let o = env.cli(&["drain", "--timeout", "300ms"]);
    assert_eq!(o.status.code(), Some(1), "{}", cli_out(&o));
    let text = cli_out(&o);
    assert!(
        text.contains("timed out after") && text.contains("1 request still in flight"),
        "{text}"
    );
    assert!(env.status().drained);
    assert_eq!(slow.join().unwrap().status, 200);
    env.stop(Duration::from_secs(20));
}

#[test]
fn drain_without_tqproxy_running_exits_3() {
    let env = Env::new(&[WorkerDef::backend("api", "[\"/\"]", 1, "")]);
    let o = env.cli(&["drain", "--timeout", "1s"]);
    assert_eq!(o.status.code(), Some(3), "{}", cli_out(&o));
    assert!(
        cli_out(&o).contains("cannot reach tqproxy"),
        "{}",
        cli_out(&o)
    );
}

#[test]
fn check_json_is_a_machine_readable_verdict() {
    let env = Env::new(&[WorkerDef::backend("api", "[\"/\"]", 1, "")]);
    let o = env.cli(&["check", "--json"]);
    assert!(o.status.success(), "{}", cli_out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["workers"], serde_json::json!(["api"]));
    assert!(v["errors"].as_array().unwrap().is_empty());
    // The harness's workers have no memory limit: a warning, and --strict fails on it.
    assert!(!v["warnings"].as_array().unwrap().is_empty(), "{v}");
    let o = env.cli(&["check", "--json", "--strict"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);

    env.write_worker(&WorkerDef::new(
        "api",
        "command: [\"/bin/true\"]\nroutes: [\"/\"]\ninstances: 1\nresources: { memory: lots }\n",
    ));
    let o = env.cli(&["check", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", cli_out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let e = &v["errors"][0];
    assert!(
        e["file"]
            .as_str()
            .unwrap()
            .ends_with("workers/api/worker.yaml"),
        "{v}"
    );
    assert_eq!(e["line"], 4, "{v}");
    assert_eq!(e["key"], "resources.memory", "{v}");
    assert!(e["message"].as_str().unwrap().contains("lots"), "{v}");
}

/// The Kubernetes manifest parses, and has what running tqproxy there needs: readiness on
/// /healthz through `control.health`, a preStop drain, a grace period above the drain timeout,
/// the capabilities the sandbox uses, and the config it mounts.
#[test]
fn the_kubernetes_manifest_has_what_a_node_needs() {
    let path = repo().join("conf/kubernetes/tqproxy.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert!(kinds.contains(&"DaemonSet"), "{kinds:?}");
    assert!(kinds.contains(&"ConfigMap"), "{kinds:?}");
    for d in &docs {
        assert!(d["apiVersion"].as_str().is_some(), "{d:?}");
        assert!(d["metadata"]["name"].as_str().is_some(), "{d:?}");
    }
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let spec = &ds["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    for (k, v) in spec["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&labels[k], v, "the selector matches the pod's labels");
    }
    let pod = &spec["template"]["spec"];
    let c = &pod["containers"][0];
    assert!(c["image"].as_str().is_some());
    // Readiness on /healthz, on the port `control.health` listens on in the ConfigMap.
    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/healthz");
    let port = probe["port"].as_u64().unwrap();
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let conf = cm["data"]["tqproxy.yaml"].as_str().unwrap();
    let conf: serde_yaml::Value = serde_yaml::from_str(conf).unwrap();
    let health = conf["control"]["health"].as_str().unwrap();
    assert!(health.ends_with(&format!(":{port}")), "{health} vs {port}");
    // preStop drain, within the grace period; the grace period above every drain_timeout.
    let pre_stop: Vec<&str> = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(pre_stop.contains(&"drain"), "{pre_stop:?}");
    let drain_secs = pre_stop
        .iter()
        .find_map(|s| s.strip_suffix('s')?.parse::<u64>().ok())
        .expect("a --timeout in seconds");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let drain_timeout = conf["defaults"]["drain_timeout"]
        .as_str()
        .and_then(|s| s.strip_suffix('s')?.parse::<u64>().ok())
        .unwrap();
    let stop_timeout = conf["defaults"]["stop_timeout"]
        .as_str()
        .and_then(|s| s.strip_suffix('s')?.parse::<u64>().ok())
        .unwrap();
    assert!(
        grace > drain_secs + drain_timeout + stop_timeout,
        "grace {grace} s vs preStop {drain_secs} s + drain {drain_timeout} s + stop {stop_timeout} s"
    );
    // The capabilities the sandbox uses, and no privileged container.
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true);
    let caps: Vec<&str> = sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for cap in ["SYS_ADMIN", "SETUID", "SETGID"] {
        assert!(caps.contains(&cap), "{cap} in {caps:?}");
    }
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    // The shipped config and the workers reach the pod.
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.iter().any(|m| m.ends_with("/conf")), "{mounts:?}");

    // Against Kubernetes' own schemas, strictly (unknown fields are errors), where the
    // validator is installed (`scripts/deps.sh --test` installs it; CI must have it).
    match std::process::Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&path)
        .output()
    {
        Ok(o) => assert!(o.status.success(), "kubernetes-validate: {}", cli_out(&o)),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("kubernetes-validate not run ({e}); `scripts/deps.sh --test` installs it")
        }
        Err(e) => panic!("kubernetes-validate: {e} (scripts/deps.sh --test installs it)"),
    }
}

#[test]
fn a_bad_agent_or_health_address_is_a_config_error_naming_the_key() {
    for (key, value) in [("agent", "nope"), ("health", "0.0.0.0")] {
        let env = Env::with_global(
            &[WorkerDef::backend("api", "[\"/\"]", 1, "")],
            &format!("control: {{ admin: off, {key}: \"{value}\" }}\n"),
        );
        let o = env.cli(&["check"]);
        assert_eq!(o.status.code(), Some(1), "{}", cli_out(&o));
        let text = cli_out(&o);
        assert!(
            text.contains(&format!(
                "tqproxy.yaml:5: control.{key}: invalid address `{value}`"
            )),
            "{text}"
        );
    }
}

/// An h2c connection (prior knowledge) and the task driving it.
async fn h2c(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// GET / on `client`: the status, or the error (a GOAWAY'd connection refuses new streams).
async fn h2_get(client: &h2::client::SendRequest<bytes::Bytes>) -> Result<u16, h2::Error> {
    let mut c = client.clone().ready().await?;
    let req = http::Request::get("http://a.test/").body(()).unwrap();
    let (resp, _) = c.send_request(req, true)?;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(d) = body.data().await {
        let d = d?;
        let _ = body.flow_control().release_capacity(d.len());
    }
    Ok(status)
}

#[test]
fn a_drained_node_sends_goaway_to_http2_clients_after_their_next_stream() {
    let (env, _health, _agent) = node(&[WorkerDef::backend("api", "[\"/\"]", 1, "")]);
    let conf = std::fs::read_to_string(env.conf())
        .unwrap()
        .replace("proxy: { threads: 1 }", "proxy: { threads: 1, h2c: true }");
    std::fs::write(env.conf(), conf).unwrap();
    let mut env = env;
    env.start();
    env.wait_ready("api", 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listen = env.listen;
    let client = rt.block_on(h2c(listen));
    assert_eq!(rt.block_on(h2_get(&client)).unwrap(), 200);
    env.ok(&["drain", "--timeout", "10s"]);
    // The next stream is served, and the connection is told to go away.
    assert_eq!(rt.block_on(h2_get(&client)).unwrap(), 200);
    let refused = wait_for(
        "the drained connection to refuse new streams (GOAWAY)",
        Duration::from_secs(10),
        || rt.block_on(h2_get(&client)).err(),
    );
    assert!(
        refused.is_go_away() || refused.is_io() || refused.to_string().contains("closed"),
        "{refused}"
    );
    // A new connection is still served.
    let fresh = rt.block_on(h2c(listen));
    assert_eq!(rt.block_on(h2_get(&fresh)).unwrap(), 200);
    env.ok(&["undrain"]);
    let after = rt.block_on(h2c(listen));
    assert_eq!(rt.block_on(h2_get(&after)).unwrap(), 200);
    assert_eq!(rt.block_on(h2_get(&after)).unwrap(), 200, "kept open again");
    env.stop(Duration::from_secs(20));
}

#[test]
fn an_upgrade_of_a_drained_node_starts_drained_and_a_fresh_start_does_not() {
    let (mut env, health, _agent) = node(&[WorkerDef::backend("api", "[\"/\"]", 1, "")]);
    env.start();
    env.wait_ready("api", 1);
    let old = env.status().pid;
    env.ok(&["drain", "--timeout", "10s"]);
    let out = env.ok(&["upgrade"]);
    assert!(out.contains(&format!("upgraded: pid {old} →")), "{out}");
    let st = env.status();
    assert_ne!(st.pid, old);
    assert!(st.drained, "the new process inherited the drained state");
    assert_eq!(http_get(health, "/healthz", None).status, 503);
    let new_pid = st.pid;
    env.ok(&["stop"]);
    wait_for("the upgraded tqproxy gone", Duration::from_secs(30), || {
        (!alive(new_pid)).then_some(())
    });
    env.child = None;
    // Stopped while drained (the marker is still in run_dir); a fresh start is not drained.
    assert!(env.dir.path().join("run/drained").exists());
    env.start();
    assert!(!env.status().drained);
    assert!(!env.dir.path().join("run/drained").exists());
    assert_eq!(http_get(health, "/healthz", None).status, 200);
    env.stop(Duration::from_secs(20));
}

/// The shipped unit drains before systemd's SIGTERM, within its stop timeout, and a failed drain
/// (a timeout, tqproxy already gone) does not fail the stop. (`observability.rs` verifies the
/// whole unit with systemd-analyze.)
#[test]
fn the_systemd_unit_drains_before_it_stops() {
    let unit = std::fs::read_to_string(repo().join("conf/tqproxy.service")).unwrap();
    let stop = unit
        .lines()
        .find(|l| l.starts_with("ExecStop="))
        .expect("an ExecStop= line");
    let cmd = stop
        .strip_prefix("ExecStop=-")
        .expect("`-`: a failed drain is no failed stop");
    let args: Vec<&str> = cmd.split_whitespace().collect();
    assert!(args.contains(&"drain"), "{stop}");
    let secs = |v: &str| v.strip_suffix('s').and_then(|n| n.parse::<u64>().ok());
    let drain = args
        .iter()
        .skip_while(|a| **a != "--timeout")
        .nth(1)
        .and_then(|v| secs(v))
        .expect("drain --timeout Ns");
    let stop_timeout = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(secs)
        .expect("TimeoutStopSec=Ns");
    // The drain, then the longest drain_timeout + stop_timeout of the shipped configs (40 s).
    assert!(
        drain + 40 < stop_timeout,
        "{drain} s + 40 s vs {stop_timeout} s"
    );
}
