//! The Debian package (issue 13, part 4): `scripts/package.sh --no-build` packages the release
//! build (test.sh builds it before the tests); the test installs it into this machine with
//! `dpkg -i`, checks what it put where (and that installing it again keeps a local edit of a
//! conffile), runs `tqproxy check` on the installed configuration,
//! starts the installed /usr/bin/tqproxy directly (no systemd as PID 1 here) on the installed
//! configuration and workers with only its addresses moved (listeners, ports, control socket,
//! logs and run directory: the packaged 127.0.0.1:8080, 8090 and 9000-9999 could be taken by a
//! development tqproxy or another test), serves a request through the installed `hello`, stops
//! it, and purges the package: nothing of it is left. A package left installed by an earlier,
//! failed run is purged first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::*;

const LOCK: &str = "/tmp/tq-apt.lock";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `dpkg ARGS` under the machine's apt/dpkg lock (others install packages too).
fn dpkg(args: &[&str]) -> Output {
    Command::new("flock")
        .args([LOCK, "dpkg"])
        .args(args)
        .output()
        .expect("run flock dpkg")
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "tqproxy"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Purges the package when dropped, whatever the test did.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let o = dpkg(&["--purge", "tqproxy"]);
        if !o.status.success() {
            eprintln!("dpkg --purge tqproxy: {}", text(&o));
        }
    }
}

/// Whether the package can be built and installed here; outside CI a missing piece skips the
/// test, saying so (in CI, scripts/deps.sh --test and test.sh provide them all).
fn can_package() -> bool {
    let release = repo().join("target/release");
    let missing: Vec<String> = [
        ("root", nix::unistd::geteuid().is_root()),
        (
            "dpkg",
            Path::new("/usr/bin/dpkg").is_file() && Path::new("/usr/bin/flock").is_file(),
        ),
        (
            "cargo-deb",
            Command::new("cargo")
                .args(["deb", "--version"])
                .output()
                .is_ok_and(|o| o.status.success()),
        ),
        (
            "target/release/tqproxy and hello (cargo build --release)",
            release.join("tqproxy").is_file() && release.join("hello").is_file(),
        ),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(what, _)| what.to_string())
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot build and install the package: missing {missing:?} (scripts/deps.sh --test, test.sh)"
    );
    eprintln!("skipped: cannot build and install the package: missing {missing:?}");
    false
}

/// The installed configuration with its addresses moved into `env` (the harness's free ports
/// and temporary directory); every other key as installed, workers_dir the installed one.
fn moved_config(env: &Env) -> String {
    let installed = std::fs::read_to_string("/etc/tqproxy/tqproxy.yaml").unwrap();
    let mut c: serde_yaml::Value = serde_yaml::from_str(&installed).unwrap();
    let d = env.dir.path();
    let set = |c: &mut serde_yaml::Value, path: &[&str], v: serde_yaml::Value| {
        let mut at = c;
        for k in &path[..path.len() - 1] {
            at = at
                .get_mut(*k)
                .unwrap_or_else(|| panic!("no `{k}` in {installed}"));
        }
        let last = path[path.len() - 1];
        assert!(
            at.get(last).is_some(),
            "no `{}` in {installed}",
            path.join(".")
        );
        at[last] = v;
    };
    let s = |v: String| serde_yaml::Value::String(v);
    set(
        &mut c,
        &["listen"],
        serde_yaml::Value::Sequence(vec![s(env.listen.to_string())]),
    );
    set(
        &mut c,
        &["ports"],
        s(format!("{}-{}", env.ports.0, env.ports.1)),
    );
    set(
        &mut c,
        &["control", "socket"],
        s(env.socket().display().to_string()),
    );
    set(&mut c, &["control", "admin"], s("off".into()));
    set(&mut c, &["workers_dir"], s("/etc/tqproxy/workers".into()));
    set(
        &mut c,
        &["logs_dir"],
        s(d.join("logs").display().to_string()),
    );
    set(&mut c, &["run_dir"], s(d.join("run").display().to_string()));
    set(
        &mut c,
        &["log", "access_log"],
        s(d.join("logs/access.log").display().to_string()),
    );
    set(&mut c, &["cgroups", "base"], s("tqproxy-it-pkg".into()));
    // Not under the unit here: nothing delegated it a cgroup.
    set(
        &mut c,
        &["cgroups", "delegated"],
        serde_yaml::Value::Bool(false),
    );
    serde_yaml::to_string(&c).unwrap()
}

#[test]
fn the_debian_package_installs_serves_and_purges() {
    if !can_package() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(repo().join("scripts/package.sh"))
        .args(["--no-build", "--fast", "--output"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "scripts/package.sh: {}", text(&o));
    let deb = PathBuf::from(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap_or(""),
    );
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(format!("tqproxy_{}-1_amd64.deb", env!("CARGO_PKG_VERSION")).as_str()),
        "{}",
        text(&o)
    );
    assert!(deb.is_file(), "{}", deb.display());

    // The conffiles are the /etc files.
    let o = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .collect::<Vec<_>>(),
        [
            "/etc/tqproxy/tqproxy.yaml",
            "/etc/tqproxy/workers/hello/worker.yaml"
        ],
        "{}",
        text(&o)
    );

    if installed() {
        eprintln!("tqproxy is installed (an earlier run?): purging it first");
    }
    let _purge = Purge;
    let o = dpkg(&["--purge", "tqproxy"]);
    assert!(o.status.success(), "dpkg --purge: {}", text(&o));
    let o = dpkg(&["-i", &deb.display().to_string()]);
    assert!(o.status.success(), "dpkg -i: {}", text(&o));
    assert!(installed());

    let files = [
        "/usr/bin/tqproxy",
        "/usr/lib/tqproxy/workers/hello",
        "/lib/systemd/system/tqproxy.service",
        "/etc/tqproxy/tqproxy.yaml",
        "/etc/tqproxy/workers/hello/worker.yaml",
        "/usr/share/man/man1/tqproxy.1.gz",
        "/usr/share/man/man1/tqproxy-deploy.1.gz",
        "/usr/share/man/man1/tqproxy-completions.1.gz",
        "/usr/share/bash-completion/completions/tqproxy",
        "/usr/share/zsh/vendor-completions/_tqproxy",
        "/usr/share/fish/vendor_completions.d/tqproxy.fish",
        "/usr/share/doc/tqproxy/README.md",
    ];
    for f in files {
        assert!(Path::new(f).is_file(), "{f} not installed");
    }
    let unit = std::fs::read_to_string("/lib/systemd/system/tqproxy.service").unwrap();
    for line in [
        "ExecStart=/usr/bin/tqproxy -c /etc/tqproxy/tqproxy.yaml run",
        "LogsDirectory=tqproxy",
        "RuntimeDirectory=tqproxy",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line:?} in the unit");
    }
    let conf = std::fs::read_to_string("/etc/tqproxy/tqproxy.yaml").unwrap();
    for line in [
        "logs_dir: /var/log/tqproxy",
        "run_dir: /run/tqproxy",
        "socket: /run/tqproxy/tqproxy.sock",
    ] {
        assert!(
            conf.contains(line),
            "no {line:?} in /etc/tqproxy/tqproxy.yaml"
        );
    }
    // The man page is the binary's (gzipped roff), the bash completion sources.
    let o = Command::new("sh")
        .args([
            "-c",
            "zcat /usr/share/man/man1/tqproxy-deploy.1.gz | head -c 200",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(".TH tqproxy-deploy 1"),
        "{}",
        text(&o)
    );
    let o = Command::new("bash")
        .args([
            "-c",
            "source /usr/share/bash-completion/completions/tqproxy && complete -p tqproxy",
        ])
        .output()
        .unwrap();
    assert!(text(&o).contains("-F _tqproxy tqproxy"), "{}", text(&o));

    // Conffiles: installing the package again keeps a local edit (dpkg asks only when the
    // package's own copy changed too).
    let edit = "# a local edit, kept across upgrades\n";
    let mut edited = conf.clone();
    edited.push_str(edit);
    std::fs::write("/etc/tqproxy/tqproxy.yaml", &edited).unwrap();
    let o = dpkg(&["-i", &deb.display().to_string()]);
    assert!(o.status.success(), "dpkg -i again: {}", text(&o));
    let after = std::fs::read_to_string("/etc/tqproxy/tqproxy.yaml").unwrap();
    assert!(after.ends_with(edit), "the local edit is gone:\n{after}");

    // The installed configuration checks, as shipped.
    let o = Command::new("/usr/bin/tqproxy")
        .args(["check", "-c", "/etc/tqproxy/tqproxy.yaml"])
        .output()
        .unwrap();
    assert!(o.status.success(), "check: {}", text(&o));
    assert!(text(&o).contains(": ok (1 worker: hello)"), "{}", text(&o));

    // Started directly from the installed files, its addresses moved.
    let mut env = Env::new(&[]);
    std::fs::write(env.conf(), moved_config(&env)).unwrap();
    let log = std::fs::File::create(env.log_path()).unwrap();
    env.child = Some(
        Command::new("/usr/bin/tqproxy")
            .arg("-c")
            .arg(env.conf())
            .arg("run")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    env.wait_running();
    let inst = env.wait_ready("hello", 2);
    assert!(inst.iter().all(|i| i.pid.is_some()), "{inst:?}");
    let r = env.get("/");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.starts_with("hello from hello instance"),
        "{}",
        r.body
    );
    let o = Command::new("/usr/bin/tqproxy")
        .arg("-c")
        .arg(env.conf())
        .arg("stop")
        .output()
        .unwrap();
    assert!(o.status.success(), "stop: {}", text(&o));
    let status = env.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        env.output()
    );

    drop(_purge);
    assert!(!installed(), "still installed after the purge");
    for f in files
        .iter()
        .copied()
        .chain(["/etc/tqproxy", "/usr/lib/tqproxy", "/var/log/tqproxy"])
    {
        assert!(!Path::new(f).exists(), "{f} left after dpkg --purge");
    }
}
