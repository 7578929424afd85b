//! The public edge: TLS with SNI and certificate reload, HTTP/2 (TLS and h2c), redirect to
//! https, WebSockets through the proxy and across a restart, and `tqproxy upgrade` under load.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

/// A self-signed certificate for `names`, written as `<dir>/<stem>.pem` and `.key`.
fn cert(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, stem);
    let c = params.self_signed(&key).unwrap();
    let (pem, k) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&pem, c.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (pem, k)
}

/// An environment with a plain listener (the harness's), a TLS listener with two
/// certificates, and a redirect listener. Returns (env, tls port, redirect port).
fn tls_env(extra_global: &str) -> (Env, u16, u16) {
    tls_env_with(&[WorkerDef::backend("w", "[\"/\"]", 2, "")], extra_global)
}

/// [`tls_env`] with these workers.
pub(crate) fn tls_env_with(workers: &[WorkerDef], extra_global: &str) -> (Env, u16, u16) {
    tls_env_opts(workers, "", extra_global)
}

/// [`tls_env_with`] with more keys for the TLS listener's `tls:` (lines indented by 6).
fn tls_env_opts(workers: &[WorkerDef], tls_extra: &str, extra_global: &str) -> (Env, u16, u16) {
    let mut env = Env::new(workers);
    // The extra listeners take the top two ports of the env's block, out of the worker pool.
    let (tls_port, redirect_port) = (env.ports.1, env.ports.1 - 1);
    let tls_dir = env.dir.path().join("conf/tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    cert(&tls_dir, "a", &["a.test"]);
    cert(&tls_dir, "b", &["b.test", "*.b.test"]);
    let global = format!(
        "listen:\n  - \"{}\"\n  - {{ addr: \"127.0.0.1:{redirect_port}\", redirect_https: {tls_port} }}\n  - addr: \"127.0.0.1:{tls_port}\"\n    tls:\n      certificates:\n        - {{ cert: tls/a.pem, key: tls/a.key }}\n        - {{ cert: tls/b.pem, key: tls/b.key }}\n{tls_extra}ports: \"{}-{}\"\nproxy: {{ threads: 1 }}\ncgroups: {{ base: tqproxy-it }}\ncontrol: {{ admin: off }}\n{extra_global}",
        env.listen,
        env.ports.0,
        env.ports.1 - 2,
    );
    std::fs::write(env.conf(), global).unwrap();
    env.start();
    (env, tls_port, redirect_port)
}

/// curl with `args`; returns (stdout, stderr).
pub(crate) fn curl(args: &[&str]) -> (String, String) {
    let o = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The subject CN of the certificate the server presents for `name`.
fn served_cert(port: u16, name: &str) -> String {
    let (_, err) = curl(&[
        "-k",
        "-v",
        "-o",
        "/dev/null",
        "--resolve",
        &format!("{name}:{port}:127.0.0.1"),
        &format!("https://{name}:{port}/"),
    ]);
    err.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("* ")
                .and_then(|l| l.trim().strip_prefix("subject:"))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no certificate subject in curl output:\n{err}"))
}

#[test]
fn tls_with_sni_and_http2() {
    let (env, tls, _) = tls_env("");
    let url = |n: &str, p: &str| format!("https://{n}:{tls}{p}");
    // HTTP/2 negotiated by ALPN with a real client; the worker still speaks HTTP/1.1.
    let (out, _) = curl(&[
        "-k",
        "--http2",
        "-w",
        "\n%{http_version} %{http_code}",
        "--resolve",
        &format!("a.test:{tls}:127.0.0.1"),
        &url("a.test", "/echo-headers"),
    ]);
    let (body, tail) = out.rsplit_once('\n').unwrap();
    assert_eq!(tail, "2 200", "{out}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["x-forwarded-proto"], "https");
    assert_eq!(v["host"], format!("a.test:{tls}"));
    // SNI picks the certificate (exact, then wildcard); unknown names get the first one.
    assert_eq!(served_cert(tls, "a.test"), "CN=a");
    assert_eq!(served_cert(tls, "b.test"), "CN=b");
    assert_eq!(served_cert(tls, "x.b.test"), "CN=b");
    assert_eq!(
        served_cert(tls, "y.x.b.test"),
        "CN=a",
        "a wildcard covers one label"
    );
    assert_eq!(served_cert(tls, "other.test"), "CN=a");
    // TLS 1.0/1.1 are refused (modern defaults).
    let (_, err) = curl(&[
        "-k",
        "-v",
        "--tls-max",
        "1.1",
        "--resolve",
        &format!("a.test:{tls}:127.0.0.1"),
        &url("a.test", "/"),
    ]);
    assert!(
        !err.contains("HTTP/2 200") && !err.contains("HTTP/1.1 200"),
        "{err}"
    );
    drop(env);
}

#[test]
fn plain_listeners_redirect_and_h2c() {
    let (env, tls, redirect) = tls_env("");
    let r = request(
        std::net::SocketAddr::from(([127, 0, 0, 1], redirect)),
        "GET",
        "/some/path?q=1",
        Some(&format!("a.test:{redirect}")),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some(format!("https://a.test:{tls}/some/path?q=1").as_str())
    );
    let r = request(
        std::net::SocketAddr::from(([127, 0, 0, 1], redirect)),
        "POST",
        "/form",
        Some("a.test"),
        &[],
        b"x=1",
    )
    .unwrap();
    assert_eq!(r.status, 308, "non-GET keeps its method");
    // ACME challenges are not redirected.
    let r = request(
        std::net::SocketAddr::from(([127, 0, 0, 1], redirect)),
        "GET",
        "/.well-known/acme-challenge/t",
        Some("a.test"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(r.header("x-worker"), Some("w"));
    // Without h2c, prior-knowledge HTTP/2 on the plain listener is refused.
    let (out, _) = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{}/", env.listen),
    ]);
    assert_ne!(out, "200");
    drop(env);
}

#[test]
fn h2c_when_enabled() {
    let mut env = Env::with_global(&[WorkerDef::backend("w", "[\"/\"]", 1, "")], "");
    let conf = std::fs::read_to_string(env.conf())
        .unwrap()
        .replace("proxy: { threads: 1 }", "proxy: { threads: 1, h2c: true }");
    std::fs::write(env.conf(), conf).unwrap();
    env.start();
    let (out, _) = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        &format!("http://{}/", env.listen),
    ]);
    assert_eq!(out, "2 200");
}

#[test]
fn certificates_reload_and_a_broken_one_changes_nothing() {
    let (env, tls, _) = tls_env("");
    let dir = env.dir.path().join("conf/tls");
    assert_eq!(served_cert(tls, "a.test"), "CN=a");
    // A broken certificate: reload fails, the old certificates keep being served.
    let good = std::fs::read(dir.join("a.pem")).unwrap();
    std::fs::write(
        dir.join("a.pem"),
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let o = env.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(7), "invalid configuration");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("nothing changed") && out.contains("a.pem"),
        "{out}"
    );
    let o = env.cli(&["check"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("listen[2].tls"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(served_cert(tls, "a.test"), "CN=a");
    // A key that does not match its certificate is refused too.
    std::fs::write(dir.join("a.pem"), &good).unwrap();
    let b_key = std::fs::read(dir.join("b.key")).unwrap();
    let a_key = std::fs::read(dir.join("a.key")).unwrap();
    std::fs::write(dir.join("a.key"), &b_key).unwrap();
    let o = env.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(7), "invalid configuration");
    assert!(String::from_utf8_lossy(&o.stdout).contains("does not belong to"));
    std::fs::write(dir.join("a.key"), &a_key).unwrap();
    // A new certificate is picked up by reload, on a live listener, without a restart.
    let pid = env.pid();
    let (pem, key) = cert(&dir, "a2", &["a.test", "new.a.test"]);
    std::fs::rename(pem, dir.join("a.pem")).unwrap();
    std::fs::rename(key, dir.join("a.key")).unwrap();
    let out = env.ok(&["reload"]);
    assert!(
        out.contains("TLS 127.0.0.1") && out.contains("new.a.test"),
        "{out}"
    );
    assert_eq!(served_cert(tls, "new.a.test"), "CN=a2");
    assert_eq!(served_cert(tls, "a.test"), "CN=a2");
    assert_eq!(env.pid(), pid);
}

/// One `openssl s_client` connection to the TLS listener (TLS `version`: "1.2" or "1.3"), with
/// one `GET /` that asks the server to close, so that the client reads to the end (TLS 1.3
/// tickets come after the handshake); the session is saved to `out` and, with `resume`, offered
/// from that file. Returns s_client's verdict: "Reused" or "New", and the HTTP status line.
fn s_client(port: u16, version: &str, extra: &[&str], resume: Option<&Path>, out: &Path) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "a.test", "-ign_eof", "-sess_out"])
        .arg(out)
        .arg(if version == "1.3" {
            "-tls1_3"
        } else {
            "-tls1_2"
        })
        .args(extra);
    if let Some(f) = resume {
        cmd.arg("-sess_in").arg(f);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let o = wait_output(child, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&o.stdout);
    let verdict = text
        .lines()
        .find_map(|l| {
            l.starts_with("Reused,")
                .then_some("Reused")
                .or(l.starts_with("New,").then_some("New"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no session verdict from s_client:\n{text}\n{}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
    let status = text
        .lines()
        .find(|l| l.starts_with("HTTP/1.1 "))
        .unwrap_or("no response");
    format!("{verdict} {}", status.trim())
}

/// Waits for a child up to `limit` (killing it then), and collects its output.
fn wait_output(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn tls_sessions_resume_and_survive_a_certificate_reload() {
    let (env, tls, _) = tls_env("");
    let dir = env.dir.path();
    // With h2 offered, a client that asks for http/1.1 by ALPN gets it.
    let (out, err) = curl(&[
        "-k",
        "-v",
        "--http1.1",
        "-w",
        "\n%{http_version} %{http_code}",
        "--resolve",
        &format!("a.test:{tls}:127.0.0.1"),
        &format!("https://a.test:{tls}/"),
    ]);
    assert!(out.ends_with("\n1.1 200"), "{out}");
    assert!(err.contains("ALPN: server accepted http/1.1"), "{err}");
    // (version, s_client options): a TLS 1.3 ticket, a TLS 1.2 ticket, a TLS 1.2 session id
    // (the session cache).
    let kinds: [(&str, &[&str]); 3] = [("1.3", &[]), ("1.2", &[]), ("1.2", &["-no_ticket"])];
    let sessions: Vec<PathBuf> = (0..kinds.len())
        .map(|i| dir.join(format!("session-{i}")))
        .collect();
    for ((version, extra), file) in kinds.iter().zip(&sessions) {
        let first = s_client(tls, version, extra, None, file);
        assert_eq!(first, "New HTTP/1.1 200 OK", "TLS {version} {extra:?}");
        let again = s_client(tls, version, extra, Some(file), &dir.join("unused"));
        assert_eq!(again, "Reused HTTP/1.1 200 OK", "TLS {version} {extra:?}");
    }
    // A certificate reload swaps certificates only: the sessions made before it resume after
    // it (ticket keys and cache are the listener's), and new handshakes get the new certificate.
    let tls_dir = dir.join("conf/tls");
    let (pem, key) = cert(&tls_dir, "a2", &["a.test"]);
    std::fs::rename(pem, tls_dir.join("a.pem")).unwrap();
    std::fs::rename(key, tls_dir.join("a.key")).unwrap();
    env.ok(&["reload"]);
    assert_eq!(served_cert(tls, "a.test"), "CN=a2");
    for ((version, extra), file) in kinds.iter().zip(&sessions) {
        let again = s_client(tls, version, extra, Some(file), &dir.join("unused"));
        assert_eq!(
            again, "Reused HTTP/1.1 200 OK",
            "TLS {version} {extra:?} after reload"
        );
    }
}

#[test]
fn tls_settings_alpn_without_h2_and_no_resumption() {
    let (env, tls, _) = tls_env_opts(
        &[WorkerDef::backend("w", "[\"/\"]", 1, "")],
        "      h2: false\n      tickets: false\n      session_cache: 0\n",
        "",
    );
    let dir = env.dir.path();
    // h2: false offers http/1.1 only: a client asking for HTTP/2 gets HTTP/1.1, served by the
    // HTTP/1.1 engine.
    let (out, err) = curl(&[
        "-k",
        "-v",
        "--http2",
        "-w",
        "\n%{http_version} %{http_code}",
        "--resolve",
        &format!("a.test:{tls}:127.0.0.1"),
        &format!("https://a.test:{tls}/echo-headers"),
    ]);
    assert!(out.ends_with("\n1.1 200"), "{out}");
    assert!(err.contains("ALPN: server accepted http/1.1"), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.rsplit_once('\n').unwrap().0).unwrap();
    assert_eq!(v["x-forwarded-proto"], "https");
    // No tickets and no cache: every connection is a full handshake. The server hands out
    // nothing to resume with (no ticket, an empty TLS 1.2 session id), so s_client (OpenSSL 3.0)
    // saves no session at all; should a client have one anyway, it is not resumed.
    let kinds: [(&str, &[&str]); 3] = [("1.3", &[]), ("1.2", &[]), ("1.2", &["-no_ticket"])];
    for (i, (version, extra)) in kinds.into_iter().enumerate() {
        let file = dir.join(format!("session-{i}"));
        assert_eq!(
            s_client(tls, version, extra, None, &file),
            "New HTTP/1.1 200 OK"
        );
        if file.exists() {
            assert_eq!(
                s_client(tls, version, extra, Some(&file), &dir.join("unused")),
                "New HTTP/1.1 200 OK",
                "TLS {version} {extra:?} resumed with tickets and the cache off"
            );
        }
    }
    // These settings are the listener's until `tqproxy upgrade`: a reload says so.
    let conf = std::fs::read_to_string(env.conf()).unwrap();
    std::fs::write(env.conf(), conf.replace("h2: false", "h2: true")).unwrap();
    let out = env.ok(&["reload"]);
    assert!(
        out.contains("changed; they apply at `tqproxy upgrade`"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// WebSockets
// ---------------------------------------------------------------------------------------------

struct Ws(TcpStream);

impl Ws {
    fn connect(addr: std::net::SocketAddr) -> Ws {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        Ws(s)
    }

    fn send_text(&mut self, text: &str) {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x81, 0x80 | text.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&f).unwrap();
    }

    /// (opcode, payload)
    fn recv(&mut self) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        self.0.read_exact(&mut h).unwrap();
        let mut len = (h[1] & 0x7f) as usize;
        if len == 126 {
            let mut l = [0u8; 2];
            self.0.read_exact(&mut l).unwrap();
            len = u16::from_be_bytes(l) as usize;
        }
        let mut p = vec![0u8; len];
        self.0.read_exact(&mut p).unwrap();
        (h[0] & 0x0f, p)
    }
}

#[test]
fn websocket_echo_through_the_proxy_and_across_a_rolling_restart() {
    let mut env = Env::new(&[WorkerDef::backend(
        "w",
        "[\"/\"]",
        1,
        "drain_timeout: 1s\nstop_timeout: 5s\n",
    )]);
    env.start();
    let mut ws = Ws::connect(env.listen);
    ws.send_text("hello");
    assert_eq!(ws.recv(), (1, b"hello".to_vec()));
    // A WebSocket counts as in flight.
    wait_for("websocket in flight", Duration::from_secs(10), || {
        (env.worker("w").in_flight == 1).then_some(())
    });
    let conf = env.conf();
    let restart = std::thread::spawn(move || {
        Command::new(TQPROXY)
            .arg("-c")
            .arg(conf)
            .args(["restart", "w"])
            .output()
            .unwrap()
    });
    // Still echoing while its instance drains…
    ws.send_text("during drain");
    assert_eq!(ws.recv(), (1, b"during drain".to_vec()));
    // …until drain_timeout: then the worker closes it cleanly with 1001 (going away).
    let (op, payload) = ws.recv();
    assert_eq!(op, 8, "close frame");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
    let out = restart.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // New WebSockets reach the new instance.
    let mut ws = Ws::connect(env.listen);
    ws.send_text("again");
    assert_eq!(ws.recv(), (1, b"again".to_vec()));
}

// ---------------------------------------------------------------------------------------------
// Upgrading tqproxy itself
// ---------------------------------------------------------------------------------------------

#[test]
fn upgrade_under_load_fails_nothing() {
    let mut env = Env::new(&[WorkerDef::backend(
        "w",
        "[\"/\"]",
        2,
        "env: { TQ_TEST_MARK: upgrade-test }\n",
    )]);
    env.start();
    let old_pid = env.pid();
    let old_workers: Vec<u32> = env.instances("w").iter().filter_map(|i| i.pid).collect();
    let load = Load::start(env.listen, "/", 8);
    load.wait_progress(200);
    let out = env.ok(&["upgrade"]);
    assert!(out.contains(&format!("upgraded: pid {old_pid} →")), "{out}");
    load.wait_progress(200);
    load.finish_without_failures("load");
    // The new process serves with its own instances; the old one and its instances are gone.
    let st = env.status();
    assert_ne!(st.pid, old_pid);
    assert!(!alive(old_pid));
    for p in &old_workers {
        assert!(!alive(*p), "old instance {p} still running");
    }
    let new_workers: Vec<u32> = st.workers[0]
        .instances
        .iter()
        .filter_map(|i| i.pid)
        .collect();
    assert_eq!(new_workers.len(), 2);
    assert_eq!(processes_with_env("TQ_TEST_MARK=upgrade-test").len(), 2);
    // The new process is not our child: stop it through its control socket.
    let new_pid = st.pid;
    env.ok(&["stop"]);
    assert!(!alive(new_pid));
    env.child = None;
}

#[test]
fn an_upgrade_whose_workers_cannot_start_leaves_the_old_process_serving() {
    let mut env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    env.start();
    let old_pid = env.pid();
    // The new process will read a worker that cannot start.
    env.write_worker(&WorkerDef::chaos(
        "w",
        "[\"/\"]",
        1,
        "env: { CHAOS_CRASH_ON_START: \"1\" }\nstart_timeout: 2s\n",
    ));
    let o = env.cli(&["upgrade"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("keeps serving"));
    assert_eq!(env.status().pid, old_pid);
    assert_eq!(env.get("/").status, 200);
    let log = std::fs::read_to_string(env.dir.path().join("logs/tqproxy.log")).unwrap_or_default();
    assert!(log.contains("upgrade aborted"), "{log}");
}
