//! `tqproxy check`: every kind of bad configuration is rejected with a message naming the
//! file, the line and the key. A table of inputs → expected message.

use std::path::Path;
use std::process::Command;

use crate::harness::TQPROXY;

fn check(dir: &Path) -> (i32, String) {
    let o = Command::new(TQPROXY)
        .arg("check")
        .arg("-c")
        .arg(dir.join("conf/tqproxy.yaml"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

/// A minimal valid installation; returns its directory.
fn install(global: &str, workers: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("conf")).unwrap();
    std::fs::write(d.path().join("conf/tqproxy.yaml"), global).unwrap();
    for (name, yaml) in workers {
        let wd = d.path().join("workers").join(name);
        std::fs::create_dir_all(&wd).unwrap();
        std::fs::write(wd.join("worker.yaml"), yaml).unwrap();
    }
    d
}

const GLOBAL: &str = "listen: [\"127.0.0.1:18080\"]\n";
const OK_WORKER: &str = "command: [\"/bin/true\"]\nroutes: [\"/\"]\n";

#[test]
fn a_valid_configuration_passes() {
    let d = install(GLOBAL, &[("a", OK_WORKER)]);
    let (code, out) = check(d.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok (1 worker: a)"), "{out}");
}

#[test]
fn unix_workers_take_no_port_from_the_range() {
    // Two ports would not do for 4 TCP instances (2 × 4 + 1 during a deploy); unix ones
    // need none.
    let global = "listen: [\"127.0.0.1:18080\"]\nports: \"9000-9001\"\n";
    let unix = "command: [\"/bin/true\"]\nroutes: [\"/\"]\ninstances: 4\ntransport: unix\n";
    let d = install(global, &[("a", unix)]);
    let (code, out) = check(d.path());
    assert_eq!(code, 0, "{out}");
    let tcp = unix.replace("transport: unix", "transport: tcp");
    let d = install(global, &[("a", &tcp)]);
    let (code, out) = check(d.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ports: range 9000-9001 has 2 ports"), "{out}");
}

#[test]
fn worker_errors_name_file_line_and_key() {
    // (worker.yaml, expected "file:line: key: message" fragment)
    let cases: &[(&str, &str)] = &[
        (
            "comand: [x]\n",
            "a/worker.yaml:1: comand: unknown field `comand`",
        ),
        (
            "command: [\"/bin/true\"]\ndrain_timeout: 30\n",
            "a/worker.yaml:2: drain_timeout: invalid duration `30`: a unit is required",
        ),
        (
            "command: [\"/bin/true\"]\nhealth:\n  interval: 1s\n  timeout: soon\n",
            "a/worker.yaml:4: health.timeout: invalid duration `soon`",
        ),
        (
            "command: [\"/bin/true\"]\nresources:\n  cpu: 2\n  memory: 12X\n",
            "a/worker.yaml:4: resources.memory: invalid size `12X`",
        ),
        (
            "command: [\"/nonexistent/bin\"]\n",
            "a/worker.yaml:1: command: program /nonexistent/bin",
        ),
        (
            "command: [\"no-such-program-anywhere\"]\n",
            "a/worker.yaml:1: command: program `no-such-program-anywhere` not found in PATH",
        ),
        (
            "command: []\n",
            "a/worker.yaml:1: command: must name a program",
        ),
        (
            "command: [\"/etc/passwd\"]\n",
            "command: program /etc/passwd is not executable",
        ),
        (
            "command: [\"/bin/true\"]\nroutes: [\"/a/../b\"]\n",
            "a/worker.yaml:2: routes[0]: invalid path in route `/a/../b`",
        ),
        (
            "command: [\"/bin/true\"]\nroutes: [\"/x\", \"bad host/y\"]\n",
            "routes[1]: invalid route `bad host/y`",
        ),
        (
            "command: [\"/bin/true\"]\nroutes: [\"/x\", \"/x/\"]\n",
            "routes[1]: route `/x/` is listed twice",
        ),
        (
            "command: [\"/bin/true\"]\nresources:\n  cpu_scheduling: fifo\n",
            "a/worker.yaml:3: resources.cpu_scheduling: unknown variant `fifo`, expected one of `other`, `batch`, `idle`",
        ),
        (
            "command: [\"/bin/true\"]\nresources: { memory: 100M, memory_high: 200M }\n",
            "a/worker.yaml:2: resources.memory_high: must not exceed resources.memory",
        ),
        (
            "command: [\"/bin/true\"]\nresources:\n  cpu: 0\n",
            "a/worker.yaml:3: resources.cpu: 0 cores is out of range",
        ),
        (
            "command: [\"/bin/true\"]\nresources:\n  open_files: 3\n",
            "resources.open_files: 3 is out of range",
        ),
        (
            "command: [\"/bin/true\"]\nrecycle_memory: 300M\nresources: { memory: 256M }\n",
            "a/worker.yaml:2: recycle_memory: 300M is not below resources.memory (256M)",
        ),
        (
            "command: [\"/bin/true\"]\nsandbox:\n  user: nosuchuser-tq\n",
            "a/worker.yaml:3: sandbox.user: user `nosuchuser-tq` does not exist",
        ),
        (
            "command: [\"/bin/true\"]\nsandbox: { namespaces: [pid, moon] }\n",
            "a/worker.yaml:2: sandbox.namespaces[1]: unknown variant `moon`",
        ),
        (
            "command: [\"/bin/true\"]\nsandbox:\n  seccomp: profiles/missing.json\n",
            "a/worker.yaml:3: sandbox.seccomp: expected `default`, `off` or a profile file",
        ),
        (
            "command: [\"/bin/true\"]\nsandbox:\n  private_tmp: true\n",
            "sandbox: read_only_root and private_tmp need the `mount` namespace",
        ),
        (
            "command: [\"/bin/true\"]\ndeploy:\n  strategy: sideways\n",
            "a/worker.yaml:3: deploy.strategy: unknown variant `sideways`",
        ),
        (
            "command: [\"/bin/true\"]\ntransport: udp\n",
            "a/worker.yaml:2: transport: unknown variant `udp`, expected `tcp` or `unix`",
        ),
        (
            "command: [\"/bin/true\"]\ntransport: [unix]\n",
            "a/worker.yaml:2: transport: invalid type: sequence",
        ),
        (
            "command: [\"/bin/true\"]\ndeploy: { max_surge: 0 }\n",
            "deploy.max_surge: must be at least 1",
        ),
        (
            "command: [\"/bin/true\"]\nenv: { PORT: \"1\" }\n",
            "a/worker.yaml:2: env.PORT: `PORT` is set by tqproxy",
        ),
        (
            "command: [\"/bin/true\"]\ninstances: many\n",
            "a/worker.yaml:2: instances: invalid type: string \"many\"",
        ),
        (
            "command: [\"/bin/true\"]\nhealth: { path: health }\n",
            "health.path: `health` must be an absolute path",
        ),
        ("routes: [/\"\n", "a/worker.yaml:"),
        (
            "command: [\"/bin/true\"]\nrestart: { backoff: 10s, backoff_max: 1s }\n",
            "restart.backoff_max: must not be less than restart.backoff",
        ),
    ];
    let mut failures = Vec::new();
    for (yaml, expected) in cases {
        let d = install(GLOBAL, &[("a", yaml)]);
        let (code, out) = check(d.path());
        if code != 1 || !out.contains(expected) {
            failures.push(format!(
                "input:\n{yaml}expected exit 1 and {expected:?}\ngot exit {code}: {out}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

#[test]
fn global_errors_name_file_line_and_key() {
    let cases: &[(&str, &str)] = &[
        (
            "listen: [\"nope\"]\n",
            "conf/tqproxy.yaml:1: listen[0]: invalid address `nope`",
        ),
        ("listen: []\n", "listen: at least one address is required"),
        (
            "listen: [\"127.0.0.1:9500\"]\n",
            "listen: 127.0.0.1:9500 is inside the worker port range 9000-9999",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nports: \"9999-9000\"\n",
            "conf/tqproxy.yaml:2: ports: invalid port range `9999-9000`",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nports: \"9000-9001\"\n",
            "ports: range 9000-9001 has 2 ports but the workers may need",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\ncontrol: { admin: \"0.0.0.0:8090\" }\n",
            "control.admin: `0.0.0.0:8090` is not a loopback address",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nlisten_on: x\n",
            "conf/tqproxy.yaml:2: listen_on: unknown field `listen_on`",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\ndefaults:\n  drain_timeout: forever\n",
            "conf/tqproxy.yaml:3: defaults.drain_timeout: invalid duration `forever`",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nworkers_dir: /nonexistent/dir\n",
            "workers_dir: cannot read /nonexistent/dir",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nlog: { level: \"info,=\" }\n",
            "log.level: invalid level",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\ncgroups:\n  mode: v1\n  delegated: true\n",
            "conf/tqproxy.yaml:4: cgroups.delegated: delegation is a cgroup v2 feature",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\ncgroups: { base: Tq.proxy }\n",
            "conf/tqproxy.yaml:2: cgroups.base: invalid cgroup name `Tq.proxy`: use 1-48 characters a-z",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nproxy: { threads: 0 }\n",
            "proxy.threads: must be between 1 and 256",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nproxy:\n  client_header_timeout: 0s\n",
            "conf/tqproxy.yaml:3: proxy.client_header_timeout: must be more than 0",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nproxy:\n  threads: 1\n  client_body_timeout: soon\n",
            "conf/tqproxy.yaml:4: proxy.client_body_timeout: invalid duration `soon`",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nproxy:\n  max_connections: 0\n",
            "conf/tqproxy.yaml:3: proxy.max_connections: must be at least 1",
        ),
        (
            "listen: [\"127.0.0.1:18080\"]\nproxy:\n  client_keepalive: 5s\n",
            "conf/tqproxy.yaml:3: proxy.client_keepalive: unknown field `client_keepalive`",
        ),
        (
            "listen:\n  - addr: \"127.0.0.1:18443\"\n    tls:\n      cert: a.pem\n      key: a.key\n      session_cache: 20000000\n",
            "conf/tqproxy.yaml:6: listen[0].tls.session_cache: at most 10000000 sessions (0 keeps none)",
        ),
        (
            "listen:\n  - addr: \"127.0.0.1:18443\"\n    tls:\n      cert: a.pem\n      key: a.key\n      session_cache: -1\n",
            "conf/tqproxy.yaml:6: listen[0].tls.session_cache: invalid type: integer `-1`, expected usize",
        ),
        (
            "listen:\n  - addr: \"127.0.0.1:18443\"\n    tls:\n      cert: a.pem\n      key: a.key\n      tickets: sometimes\n",
            "conf/tqproxy.yaml:6: listen[0].tls.tickets: invalid type: string \"sometimes\", expected a boolean",
        ),
    ];
    let mut failures = Vec::new();
    for (yaml, expected) in cases {
        let d = install(yaml, &[("a", OK_WORKER)]);
        let (code, out) = check(d.path());
        if code != 1 || !out.contains(expected) {
            failures.push(format!(
                "input:\n{yaml}expected exit 1 and {expected:?}\ngot exit {code}: {out}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

#[test]
fn cross_worker_errors_and_every_error_is_reported() {
    // Two workers claim `/`; a third has a bad name; a fourth is broken on its own.
    let d = install(
        GLOBAL,
        &[
            ("a", OK_WORKER),
            (
                "b",
                "command: [\"/bin/true\"]\nroutes: [\"/other\", \"/\"]\n",
            ),
            ("Bad_Name", OK_WORKER),
            ("c", "command: [\"/bin/true\"]\nresources: { pids: 0 }\n"),
        ],
    );
    let (code, out) = check(d.path());
    assert_eq!(code, 1);
    for expected in [
        "b/worker.yaml:2: routes: route `/` is already served by worker `a`",
        "Bad_Name/worker.yaml: directory name: invalid worker name `Bad_Name`",
        "c/worker.yaml:2: resources.pids: must be at least 1",
    ] {
        assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
    }
}

#[test]
fn relative_paths_resolve_against_their_file_from_any_directory() {
    let d = install(
        GLOBAL,
        &[("a", "command: [\"bin/run\"]\nroutes: [\"/\"]\n")],
    );
    let bin = d.path().join("workers/a/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("run"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(
        bin.join("run"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // From an unrelated working directory, with a relative -c.
    let o = Command::new(TQPROXY)
        .current_dir(d.path().join("workers"))
        .args(["check", "-c", "../conf/tqproxy.yaml"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn shipped_configurations_are_valid() {
    let root = crate::harness::repo();
    for conf in ["conf/tqproxy.yaml"] {
        let Some((code, text)) = check_shipped(&root.join(conf)) else {
            continue;
        };
        assert_eq!(code, 0, "{conf}: {text}");
        assert!(
            text.contains(&format!(": ok ({}", shipped_workers())),
            "{conf}: {text}"
        );
    }
}

/// `tqproxy check -c conf`: (exit code, output); `None` (skipped, saying so) when the shipped
/// worker programs, release builds, are missing outside CI.
fn check_shipped(conf: &Path) -> Option<(i32, String)> {
    let o = Command::new(TQPROXY)
        .args(["check", "-c"])
        .arg(conf)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if text.contains("target/release")
        && text.contains("No such file")
        && std::env::var_os("CI").is_none()
    {
        eprintln!(
            "skipping {}: release binaries not built ({text})",
            conf.display()
        );
        return None;
    }
    Some((o.status.code().unwrap_or(-1), text))
}

/// "N workers: a, b": the enabled workers of the repository's workers/, as `check` lists them.
fn shipped_workers() -> String {
    let mut names: Vec<String> = std::fs::read_dir(crate::harness::repo().join("workers"))
        .unwrap()
        .filter_map(|e| {
            let dir = e.unwrap().path();
            let yaml = std::fs::read_to_string(dir.join("worker.yaml")).ok()?;
            let disabled = yaml
                .lines()
                .any(|l| l.trim_start().starts_with("enabled: false"));
            (!disabled).then(|| dir.file_name().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    format!("{} workers: {}", names.len(), names.join(", "))
}

/// A self-signed certificate for `name`, written as `<dir>/<name>.pem` and `<dir>/<name>.key`.
fn cert(dir: &Path, name: &str) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    let c = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), c.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

#[test]
fn the_production_configuration_is_valid() {
    // conf/tqproxy.prod.yaml names the host's paths (/etc/tqproxy/tls, /srv/tqproxy/workers,
    // /run/tqproxy, /var/log/tqproxy): checked here with each moved under a temporary root,
    // the certificates it names made there (self-signed, for the names they are for), and
    // workers_dir pointing at the repository's workers. Nothing else is changed: a key the
    // loader refuses, a bad listener, a cgroup setting the host cannot honour, or a shipped
    // worker that does not check under the production defaults fails this test.
    let root = crate::harness::repo();
    let prod = std::fs::read_to_string(root.join("conf/tqproxy.prod.yaml")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let host = d.path();
    let mut text = prod.clone();
    for (from, to) in [
        ("/etc/tqproxy/", host.join("etc/tqproxy/")),
        ("/run/tqproxy", host.join("run/tqproxy")),
        ("/var/log/tqproxy", host.join("var/log/tqproxy")),
        ("/srv/tqproxy/workers", root.join("workers")),
    ] {
        assert!(
            text.contains(from),
            "conf/tqproxy.prod.yaml no longer names {from}"
        );
        text = text.replace(from, &to.display().to_string());
    }
    for gone in [" /etc/", " /srv/", " /run/", " /var/"] {
        assert!(!text.contains(gone), "a host path is left: {gone}");
    }
    std::fs::create_dir_all(host.join("etc/tqproxy/tls")).unwrap();
    std::fs::create_dir_all(host.join("conf")).unwrap();
    for name in ["example.com", "api.example.com"] {
        cert(&host.join("etc/tqproxy/tls"), name);
    }
    let conf = host.join("conf/tqproxy.prod.yaml");
    std::fs::write(&conf, &text).unwrap();
    let Some((code, out)) = check_shipped(&conf) else {
        return;
    };
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{}: ok ({})", conf.display(), shipped_workers())),
        "{out}"
    );
    // The certificates were read: without them, check fails on the TLS listener.
    std::fs::remove_file(host.join("etc/tqproxy/tls/api.example.com.key")).unwrap();
    let (code, out) = check_shipped(&conf).unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("tqproxy.prod.yaml:14: listen[2].tls:") && out.contains("api.example.com.key"),
        "{out}"
    );
}

#[test]
fn check_warns_of_workers_without_limits_or_running_as_root_and_strict_refuses_them() {
    let d = install(GLOBAL, &[("w", OK_WORKER)]);
    let (code, text) = check(d.path());
    assert_eq!(code, 0, "{text}");
    for says in [
        "w/worker.yaml: warning: no resources.memory",
        "w/worker.yaml: warning: no resources.cpu",
        "w/worker.yaml: warning: runs as root",
    ] {
        assert!(text.contains(says), "{says}: {text}");
    }
    let o = Command::new(TQPROXY)
        .args(["check", "--strict", "-c"])
        .arg(d.path().join("conf/tqproxy.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("3 warnings (--strict)"), "{err}");
}
