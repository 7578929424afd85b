//! Automatic HTTPS against a real ACME server: Debian's `pebble` (installed by
//! `scripts/deps.sh --test`), run per test with a config written here. Its validation is
//! pointed at tqproxy's own listeners (`httpPort` = the plain listener, `tlsPort` = the TLS
//! listener) and its DNS at `pebble-challtestsrv`, whose mock DNS answers 127.0.0.1 for every
//! name: the `*.acme.test` names below are validated for real (no `PEBBLE_VA_ALWAYS_VALID` in
//! any test). `PEBBLE_VA_NOSLEEP=1` keeps validation instant except where a test wants an
//! order to take a while.
//!
//! pebble's directory speaks HTTPS with a certificate made here (`directory_ca` trusts its
//! CA); the certificates pebble issues chain to a root that only its management API knows
//! (`/roots/0`), which the clients here trust.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

const PEBBLE: &str = "/usr/bin/pebble";
const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";

/// A pebble and its mock DNS, for one test; both killed on drop.
struct Pebble {
    dir: tempfile::TempDir,
    children: Vec<Child>,
    port: u16,
    mgmt: u16,
    /// The CA of pebble's own HTTPS certificate (`directory_ca`).
    ca: PathBuf,
}

impl Pebble {
    /// pebble validating http-01 on `http_port` and tls-alpn-01 on `tls_port` of 127.0.0.1.
    fn start(http_port: u16, tls_port: u16, vars: &[(&str, &str)]) -> Pebble {
        assert!(
            Path::new(PEBBLE).exists() && Path::new(CHALLTESTSRV).exists(),
            "pebble is not installed: run scripts/deps.sh --test"
        );
        let dir = tempfile::Builder::new()
            .prefix("tqproxy-pebble-")
            .tempdir()
            .unwrap();
        let ca = write_pebble_tls(dir.path());
        let (port, mgmt, dns, dns_mgmt) = (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": dir.path().join("pebble.pem"),
            "privateKey": dir.path().join("pebble.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        let cfg = dir.path().join("pebble.json");
        std::fs::write(&cfg, config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let dns_child = Command::new(CHALLTESTSRV)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
            .stdout(log("dns.log"))
            .stderr(log("dns.err"))
            .spawn()
            .expect("pebble-challtestsrv");
        let mut cmd = Command::new(PEBBLE);
        cmd.arg("-config")
            .arg(&cfg)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"));
        if !vars.iter().any(|(k, _)| *k == "PEBBLE_VA_SLEEPTIME") {
            cmd.env("PEBBLE_VA_NOSLEEP", "1");
        }
        let pebble = cmd.spawn().expect("pebble");
        let p = Pebble {
            dir,
            children: vec![pebble, dns_child],
            port,
            mgmt,
            ca,
        };
        wait_for("pebble listening", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        p
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The root pebble issues under (from its management API), as a PEM file.
    fn root(&self) -> PathBuf {
        let path = self.dir.path().join("root.pem");
        let url = format!("https://127.0.0.1:{}/roots/0", self.mgmt);
        let ca = self.ca.display().to_string();
        wait_for("pebble's root", Duration::from_secs(10), || {
            let o = Command::new("curl")
                .args(["-s", "--max-time", "5", "--cacert", &ca, "-o"])
                .arg(&path)
                .arg(&url)
                .output()
                .ok()?;
            let pem = std::fs::read_to_string(&path).ok()?;
            (o.status.success() && pem.contains("BEGIN CERTIFICATE")).then_some(())
        });
        path
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// Certificates pebble issued so far.
    fn issued(&self) -> usize {
        self.log().matches("Issued certificate serial").count()
    }

    fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

/// pebble's HTTPS certificate (127.0.0.1, signed by a CA of its own, as webpki wants) and that
/// CA, written to `dir`; returns the CA's file.
fn write_pebble_tls(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pebble directory test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("pebble.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("pebble.key"), key.serialize_pem()).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    ca
}

/// What the `tls.acme` block of a test says.
struct Acme<'a> {
    domains: &'a str,
    challenge: &'a str,
    renew_before: &'a str,
    directory: String,
    ca: &'a Path,
    /// Also an explicit certificate (`x.test`) on the same listener.
    mixed: bool,
}

/// A test environment: the harness's plain listener (pebble's `httpPort`), a TLS listener on
/// the top port of its block (pebble's `tlsPort`), an admin listener, one backend worker.
struct AcmeEnv {
    env: Env,
    tls: u16,
    admin: u16,
}

impl AcmeEnv {
    fn new() -> AcmeEnv {
        let env = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
        let tls = env.ports.1;
        AcmeEnv {
            env,
            tls,
            admin: free_port(),
        }
    }

    fn http_port(&self) -> u16 {
        self.env.listen.port()
    }

    fn write(&self, a: &Acme) {
        let explicit = if a.mixed {
            let tls_dir = self.env.dir.path().join("conf/tls");
            std::fs::create_dir_all(&tls_dir).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec!["x.test".to_string()]).unwrap();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "explicit x.test");
            let c = p.self_signed(&key).unwrap();
            std::fs::write(tls_dir.join("x.pem"), c.pem()).unwrap();
            std::fs::write(tls_dir.join("x.key"), key.serialize_pem()).unwrap();
            "      certificates:\n        - { cert: tls/x.pem, key: tls/x.key }\n"
        } else {
            ""
        };
        let yaml = format!(
            "listen:\n  - \"{listen}\"\n  - addr: \"127.0.0.1:{tls}\"\n    tls:\n{explicit}      acme:\n        domains: {domains}\n        email: ops@acme.test\n        directory: {directory}\n        directory_ca: {ca}\n        challenge: {challenge}\n        renew_before: {rb}\n        state_dir: ../acme\nports: \"{p0}-{p1}\"\nproxy: {{ threads: 1 }}\ncgroups: {{ base: tqproxy-it }}\ncontrol: {{ admin: \"127.0.0.1:{admin}\" }}\n",
            listen = self.env.listen,
            tls = self.tls,
            domains = a.domains,
            directory = a.directory,
            ca = a.ca.display(),
            challenge = a.challenge,
            rb = a.renew_before,
            p0 = self.env.ports.0,
            p1 = self.env.ports.1 - 1,
            admin = self.admin,
        );
        std::fs::write(self.env.conf(), yaml).unwrap();
    }

    fn state_dir(&self) -> PathBuf {
        self.env.dir.path().join("acme")
    }

    /// The status document's first certificate once `f` holds for it.
    fn wait_cert(
        &self,
        what: &str,
        f: impl Fn(&tqproxy::status::CertificateStatus) -> bool,
    ) -> tqproxy::status::CertificateStatus {
        wait_for(what, Duration::from_secs(30), || {
            let st = self.env.try_status()?;
            st.certificates.first().filter(|c| f(c)).cloned()
        })
    }

    fn admin_get(&self, path: &str) -> Response {
        http_get(
            std::net::SocketAddr::from(([127, 0, 0, 1], self.admin)),
            path,
            None,
        )
    }
}

impl Drop for AcmeEnv {
    fn drop(&mut self) {
        self.env.stop(Duration::from_secs(10));
    }
}

/// curl over HTTP/2, trusting only `root`: (HTTP version, status, curl's -v lines).
fn curl_h2(root: &Path, name: &str, port: u16) -> (String, String, String) {
    let o = Command::new("curl")
        .args(["-s", "-v", "--max-time", "10", "--http2", "--cacert"])
        .arg(root)
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(["-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
        .arg(format!("https://{name}:{port}/"))
        .output()
        .expect("curl");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (v, s) = out.split_once(' ').unwrap_or(("", ""));
    (
        v.to_string(),
        s.to_string(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A TLS client trusting only `root`, HTTP/1.1 by ALPN.
fn client_config(root: &Path) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(root).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A resumed session shows no certificate: every handshake a full one.
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

/// One GET on a new TLS connection: (status, serial of the certificate served).
fn tls_get(
    config: &Arc<rustls::ClientConfig>,
    name: &str,
    port: u16,
) -> Result<(u16, String), String> {
    let server =
        rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(config.clone(), server).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let r = tls.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("no response ({r:?}): {text:?}"))?;
    let der = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate")?
        .clone();
    Ok((status, serial_of(&der)))
}

fn serial_of(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(der).unwrap();
    x.raw_serial_as_string()
}

/// TLS clients, each request on a new connection (a new handshake: it sees the certificate
/// served at that moment), counting answers and the serials seen.
struct TlsLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    serials: Arc<Mutex<BTreeSet<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TlsLoad {
    fn start(config: Arc<rustls::ClientConfig>, name: &str, port: u16, clients: usize) -> TlsLoad {
        let l = TlsLoad {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(Mutex::new(Vec::new())),
            serials: Arc::new(Mutex::new(BTreeSet::new())),
            threads: Vec::new(),
        };
        let mut l = l;
        for _ in 0..clients {
            let (stop, ok, failed, serials) = (
                l.stop.clone(),
                l.ok.clone(),
                l.failed.clone(),
                l.serials.clone(),
            );
            let (config, name) = (config.clone(), name.to_string());
            l.threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match tls_get(&config, &name, port) {
                        Ok((200, serial)) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            serials.lock().unwrap().insert(serial);
                        }
                        Ok((s, _)) => failed.lock().unwrap().push(format!("status {s}")),
                        Err(e) => failed.lock().unwrap().push(e),
                    }
                }
            }));
        }
        l
    }

    fn serials(&self) -> BTreeSet<String> {
        self.serials.lock().unwrap().clone()
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.lock().unwrap().clone(),
        )
    }
}

fn issued_lines(out: &str) -> usize {
    out.matches("ACME certificate issued").count()
}

fn orders_placed(out: &str) -> usize {
    out.matches("ACME order placed").count()
}

#[test]
fn a_fresh_start_obtains_the_certificate_and_serves_it_over_http2_next_to_an_explicit_one() {
    let mut a = AcmeEnv::new();
    let pebble = Pebble::start(a.http_port(), a.tls, &[]);
    a.write(&Acme {
        domains: "[a.acme.test, b.acme.test]",
        challenge: "http-01",
        renew_before: "30d",
        directory: pebble.directory(),
        ca: &pebble.ca,
        mixed: true,
    });
    a.env.start();
    let c = a.wait_cert("certificate issued", |c| c.serial.is_some());
    assert_eq!(c.domains, ["a.acme.test", "b.acme.test"]);
    assert!(
        c.issuer.as_deref().unwrap_or("").contains("Pebble"),
        "{c:?}"
    );
    assert_eq!((c.failures, c.last_error.as_deref()), (0, None));
    assert!(c.next_renewal_in_secs.unwrap() > 86400, "{c:?}");
    let root = pebble.root();
    for name in ["a.acme.test", "b.acme.test"] {
        let (version, status, verbose) = curl_h2(&root, name, a.tls);
        assert_eq!(
            (version.as_str(), status.as_str()),
            ("2", "200"),
            "{name}: {verbose}"
        );
        assert!(
            verbose.contains("issuer: CN=Pebble Intermediate CA"),
            "{verbose}"
        );
    }
    // The explicit certificate keeps its name; it is also the default for unknown names.
    let (_, err) = crate::edge::curl(&[
        "-k",
        "-v",
        "-o",
        "/dev/null",
        "--resolve",
        &format!("x.test:{}:127.0.0.1", a.tls),
        &format!("https://x.test:{}/", a.tls),
    ]);
    assert!(err.contains("subject: CN=explicit x.test"), "{err}");
    // State: 0700, one key + chain file (0600), the account; no challenge left behind.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let sd = a.state_dir();
    assert_eq!(mode(&sd), 0o700);
    let pem = sd.join("certs/a.acme.test.pem");
    assert_eq!(mode(&pem), 0o600);
    let text = std::fs::read_to_string(&pem).unwrap();
    assert!(text.contains("PRIVATE KEY") && text.contains("BEGIN CERTIFICATE"));
    assert_eq!(std::fs::read_dir(sd.join("challenges")).unwrap().count(), 0);
    // `tqproxy certs` and the metrics say the same.
    let out = a.env.ok(&["certs"]);
    assert!(
        out.contains("a.acme.test, b.acme.test") && out.contains("Pebble"),
        "{out}"
    );
    assert!(out.contains(c.serial.as_deref().unwrap()), "{out}");
    let m = a.admin_get("/metrics").body;
    assert!(
        m.contains("tqproxy_acme_renewals_total{result=\"ok\"} 1"),
        "{m}"
    );
    assert!(m.contains("tqproxy_certificate_expiry_timestamp_seconds{domain=\"a.acme.test\"}"));
    assert_eq!(pebble.issued(), 1);
}

#[test]
fn tls_alpn_01_alone_validates_on_the_tls_listener() {
    let mut a = AcmeEnv::new();
    // pebble's http-01 port has nothing listening: only tls-alpn-01 can succeed.
    let pebble = Pebble::start(free_port(), a.tls, &[]);
    a.write(&Acme {
        domains: "[alpn.acme.test]",
        challenge: "tls-alpn-01",
        renew_before: "30d",
        directory: pebble.directory(),
        ca: &pebble.ca,
        mixed: false,
    });
    a.env.start();
    let c = a.wait_cert("certificate issued", |c| c.serial.is_some());
    assert_eq!(c.challenge, "tls-alpn-01");
    let (version, status, verbose) = curl_h2(&pebble.root(), "alpn.acme.test", a.tls);
    assert_eq!(
        (version.as_str(), status.as_str()),
        ("2", "200"),
        "{verbose}"
    );
    // A client offering only acme-tls/1 for a name with no challenge pending gets no
    // certificate (the handshake fails), not the real one.
    let o = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{}", a.tls)])
        .args(["-servername", "alpn.acme.test", "-alpn", "acme-tls/1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!text.contains("alpn.acme.test"), "{text}");
}

/// Obtains a certificate with `renew_before: 30d` and stops; returns its serial.
fn obtain_once(a: &mut AcmeEnv, pebble: &Pebble) -> String {
    a.write(&Acme {
        domains: "[r.acme.test]",
        challenge: "http-01",
        renew_before: "30d",
        directory: pebble.directory(),
        ca: &pebble.ca,
        mixed: false,
    });
    a.env.start();
    let c = a.wait_cert("certificate issued", |c| c.serial.is_some());
    a.env.stop(Duration::from_secs(10));
    c.serial.unwrap()
}

#[test]
fn a_restart_uses_the_certificate_on_disk_without_contacting_the_ca() {
    let mut a = AcmeEnv::new();
    let mut pebble = Pebble::start(a.http_port(), a.tls, &[]);
    let serial = obtain_once(&mut a, &pebble);
    let root = pebble.root();
    let before = a.env.output();
    // No CA at all now: an attempt would fail and show.
    pebble.stop();
    a.env.start();
    let c = a.wait_cert("certificate loaded", |c| c.serial.is_some());
    assert_eq!(c.serial.as_deref(), Some(serial.as_str()));
    let (version, status, verbose) = curl_h2(&root, "r.acme.test", a.tls);
    assert_eq!(
        (version.as_str(), status.as_str()),
        ("2", "200"),
        "{verbose}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let c = a.env.status().certificates[0].clone();
    assert_eq!((c.failures, c.renewing), (0, false), "{c:?}");
    let after = a.env.output()[before.len()..].to_string();
    assert!(
        after.contains("ACME certificate loaded from the state directory"),
        "{after}"
    );
    assert_eq!(orders_placed(&after), 0, "{after}");
}

#[test]
fn renewal_under_load_fails_no_request_and_changes_the_certificate() {
    let mut a = AcmeEnv::new();
    let pebble = Pebble::start(a.http_port(), a.tls, &[]);
    let first = obtain_once(&mut a, &pebble);
    // renew_before longer than pebble's 5-year certificates: due at once. The test holds the
    // state directory's lock, so the renewal waits until the load runs.
    a.write(&Acme {
        domains: "[r.acme.test]",
        challenge: "http-01",
        renew_before: "3000d",
        directory: pebble.directory(),
        ca: &pebble.ca,
        mixed: false,
    });
    let lock = tqproxy::acme::store::try_lock(&a.state_dir())
        .unwrap()
        .expect("lock");
    a.env.start();
    a.wait_cert("renewal waiting for the lock", |c| c.renewing);
    let load = TlsLoad::start(client_config(&pebble.root()), "r.acme.test", a.tls, 4);
    wait_for(
        "load on the old certificate",
        Duration::from_secs(10),
        || (load.ok.load(Ordering::SeqCst) >= 50).then_some(()),
    );
    assert_eq!(load.serials(), BTreeSet::from([first.clone()]));
    drop(lock);
    let c = a.wait_cert("renewed", |c| c.serial.as_deref() != Some(first.as_str()));
    let second = c.serial.unwrap();
    wait_for(
        "load on the new certificate",
        Duration::from_secs(10),
        || load.serials().contains(&second).then_some(()),
    );
    let before = load.ok.load(Ordering::SeqCst);
    wait_for("more load", Duration::from_secs(10), || {
        (load.ok.load(Ordering::SeqCst) >= before + 50).then_some(())
    });
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} failed of {ok}: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!("renewal under load: {ok} requests, 0 failed, serial {first} -> {second}");
    // Renewed once, not in a loop (renewals are an hour apart at least).
    let c = a.env.status().certificates[0].clone();
    assert!(c.next_renewal_in_secs.unwrap() > 3000, "{c:?}");
    assert_eq!(issued_lines(&a.env.output()), 2);
    assert_eq!(pebble.issued(), 2);
}

#[test]
fn a_ca_unreachable_at_renewal_keeps_the_old_certificate_and_says_so() {
    let mut a = AcmeEnv::new();
    let mut pebble = Pebble::start(a.http_port(), a.tls, &[]);
    a.write(&Acme {
        domains: "[r.acme.test]",
        challenge: "http-01",
        renew_before: "30d",
        directory: pebble.directory(),
        ca: &pebble.ca,
        mixed: false,
    });
    a.env.start();
    let serial = a
        .wait_cert("certificate issued", |c| c.serial.is_some())
        .serial
        .unwrap();
    let root = pebble.root();
    // The CA goes away; a renewal (forced, as an operator would) fails.
    pebble.stop();
    let out = a.env.ok(&["certs", "renew", "r.acme.test"]);
    assert!(out.contains("renewal of r.acme.test started"), "{out}");
    let out = a.env.cli(&["certs", "renew", "other.acme.test"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("no ACME certificate covers `other.acme.test`")
    );
    let c = a.wait_cert("a failed renewal", |c| c.failures >= 1);
    let err = c.last_error.clone().unwrap();
    assert!(err.contains("Connect") || err.contains("refused"), "{err}");
    assert_eq!(c.serial.as_deref(), Some(serial.as_str()));
    // A retry is scheduled (backoff), not a tight loop.
    assert!(c.next_renewal_in_secs.unwrap() >= 15, "{c:?}");
    let (version, status, verbose) = curl_h2(&root, "r.acme.test", a.tls);
    assert_eq!(
        (version.as_str(), status.as_str()),
        ("2", "200"),
        "{verbose}"
    );
    let m = a.admin_get("/metrics").body;
    assert!(
        m.contains("tqproxy_acme_renewals_total{result=\"failed\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tqproxy_acme_renewals_total{result=\"ok\"} 1"),
        "{m}"
    );
    let doc = a.admin_get("/status.json").body;
    assert!(doc.contains("\"failures\":1"), "{doc}");
    let out = a.env.ok(&["certs"]);
    assert!(
        out.contains("last error:") && out.contains("1 failed in a row"),
        "{out}"
    );
    // Five years left: no /healthz warning yet (that comes within 7 days of expiry).
    let h = a.admin_get("/healthz");
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    assert!(a.env.output().contains("ACME certificate renewal failed"));
}

#[test]
fn an_upgrade_during_an_order_completes_it_once() {
    let mut a = AcmeEnv::new();
    // Validation sleeps (0 to 4 s, pebble's random draw) so the order is under way when the
    // upgrade starts.
    let pebble = Pebble::start(a.http_port(), a.tls, &[("PEBBLE_VA_SLEEPTIME", "5")]);
    a.write(&Acme {
        domains: "[u.acme.test]",
        challenge: "http-01",
        renew_before: "30d",
        directory: pebble.directory(),
        ca: &pebble.ca,
        mixed: false,
    });
    a.env.start();
    wait_for("order placed", Duration::from_secs(20), || {
        (orders_placed(&a.env.output()) >= 1).then_some(())
    });
    let old = a.env.pid();
    // pebble's sleep is a random draw (0 to 4 s): usually the order is still under way here.
    let under_way = issued_lines(&a.env.output()) == 0;
    let out = a.env.ok(&["upgrade"]);
    assert!(out.contains("upgraded"), "{out}");
    let new_log = out
        .split("its output goes to ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .map(PathBuf::from)
        .expect("new process's log");
    let c = a.wait_cert("certificate issued", |c| c.serial.is_some());
    let st = a.env.status();
    assert_ne!(st.pid, old);
    let new_out = std::fs::read_to_string(&new_log).unwrap_or_default();
    let old_out = a.env.output();
    // Exactly one process completed an order; the other adopted its certificate.
    assert_eq!(
        issued_lines(&old_out) + issued_lines(&new_out),
        1,
        "old:\n{old_out}\nnew:\n{new_out}"
    );
    assert_eq!(pebble.issued(), 1, "{}", pebble.log());
    if under_way {
        // The old process finished its order before exiting; the new one waited for the
        // lock and took the certificate from disk: one order in all.
        assert_eq!(issued_lines(&old_out), 1, "{old_out}");
        assert!(
            new_out.contains("holds the ACME lock") && new_out.contains("adopted"),
            "{new_out}"
        );
        assert_eq!(orders_placed(&old_out) + orders_placed(&new_out), 1);
    }
    let (version, status, verbose) = curl_h2(&pebble.root(), "u.acme.test", a.tls);
    assert_eq!(
        (version.as_str(), status.as_str()),
        ("2", "200"),
        "{verbose}"
    );
    eprintln!(
        "upgrade during an order: under way at the upgrade: {under_way}; serial {}, issued by the {} process; the new one waited for the lock: {}, adopted: {}",
        c.serial.unwrap(),
        if issued_lines(&old_out) == 1 {
            "old"
        } else {
            "new"
        },
        new_out.contains("holds the ACME lock"),
        new_out.contains("adopted"),
    );
    let new_pid = st.pid;
    a.env.ok(&["stop"]);
    assert!(!alive(new_pid));
    a.env.child = None;
}

#[test]
fn bad_acme_inputs_are_refused_with_the_reason() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("conf")).unwrap();
    std::fs::create_dir_all(d.path().join("workers")).unwrap();
    std::fs::write(d.path().join("afile"), "").unwrap();
    let check = |acme: &str| {
        let yaml = format!(
            "listen:\n  - \"127.0.0.1:18080\"\n  - addr: \"127.0.0.1:18443\"\n    tls:\n      acme:\n{acme}"
        );
        std::fs::write(d.path().join("conf/tqproxy.yaml"), yaml).unwrap();
        let o = Command::new(TQPROXY)
            .arg("check")
            .arg("-c")
            .arg(d.path().join("conf/tqproxy.yaml"))
            .output()
            .unwrap();
        (
            o.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let cases: &[(&str, &str)] = &[
        (
            "        domains: [a.example.com]\n        directory: letsencrypt-stagin\n",
            "tqproxy.yaml:7: listen[1].tls.acme.directory: `letsencrypt-stagin` is not a directory URL",
        ),
        (
            "        domains: [a.example.com, \"*.example.com\"]\n        challenge: http-01\n",
            "tqproxy.yaml:6: listen[1].tls.acme.domains: `*.example.com`: a wildcard certificate needs the dns-01 challenge",
        ),
        (
            "        domains: [a.example.com]\n        state_dir: ../afile/acme\n",
            "listen[1].tls.acme.state_dir:",
        ),
        (
            "        domains: [a.example.com]\n        challenge: dns-01\n",
            "listen[1].tls.acme.challenge: `dns-01` is not a challenge tqproxy answers",
        ),
        (
            "        domains: [\"exa mple.com\"]\n",
            "listen[1].tls.acme.domains: `exa mple.com`: not a domain name",
        ),
        (
            "        domains: [a.example.com]\n        renew_before: soon\n",
            "listen[1].tls.acme.renew_before:",
        ),
        (
            "        domains: [a.example.com]\n        colour: blue\n",
            "unknown field `colour`",
        ),
    ];
    for (acme, want) in cases {
        let (code, out) = check(acme);
        assert_eq!(code, Some(1), "{acme}: {out}");
        assert!(out.contains(want), "{acme}:\nwant {want}\ngot {out}");
    }
    let (_, out) = check("        domains: [a.example.com]\n        state_dir: ../afile/acme\n");
    assert!(out.contains("not a directory"), "{out}");
    // Well-formed: passes.
    let (code, out) =
        check("        domains: [a.example.com]\n        directory: letsencrypt-staging\n");
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn an_unknown_directory_url_is_a_visible_failure_not_a_crash() {
    let mut a = AcmeEnv::new();
    let pebble = Pebble::start(a.http_port(), a.tls, &[]);
    a.write(&Acme {
        domains: "[n.acme.test]",
        challenge: "http-01",
        renew_before: "30d",
        directory: format!("https://127.0.0.1:{}/no-such-directory", pebble.port),
        ca: &pebble.ca,
        mixed: false,
    });
    a.env.start();
    let c = a.wait_cert("a failed order", |c| c.failures >= 1);
    assert_eq!(c.serial, None);
    let err = c.last_error.unwrap();
    assert!(err.starts_with("new account:"), "{err}");
    // Not yet a certificate and failing: /healthz warns, still 200 (the workers serve).
    let h = a.admin_get("/healthz");
    assert_eq!(h.status, 200);
    assert!(
        h.body
            .contains("warning: no certificate yet for n.acme.test"),
        "{}",
        h.body
    );
    assert!(a.env.exited().is_none());
}
