//! The config loader's targets: the text of `tqproxy.yaml` or of a `worker.yaml`, validated by
//! tqproxy's own loader (`Config::from_text`, `WorkerConfig::from_text`, which `Config::load`
//! calls after reading the file).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tqproxy::config::{
    Config, ConfigError, ConfigErrors, RESERVED_ENV, WorkerConfig, parse_route, validate_name,
};

/// The installation the fuzzed files live in, made once per process under the temp dir:
/// `conf/` (the global file's directory, the file itself never written), `workers/` (no
/// worker.yaml in it, so a global file loads no worker unless it points elsewhere) and
/// `workers/fz/` (the worker's directory: its name is `fz`). The programs the shipped worker
/// files and the config tests name exist, so those files can be accepted: `bin/run` in the
/// worker's directory, `target/release/{hello,chaos,probe}` at the root.
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join("tqproxy-fuzz");
        let worker = root.join("workers/fz");
        std::fs::create_dir_all(root.join("conf")).expect("temp dir");
        let programs = [
            worker.join("bin/run"),
            root.join("target/release/hello"),
            root.join("target/release/chaos"),
            root.join("target/release/probe"),
        ];
        for p in programs {
            std::fs::create_dir_all(p.parent().expect("has a parent")).expect("temp dir");
            // Written once: the worker's model holds the program's mtime.
            if !p.is_file() {
                std::fs::write(&p, "#!/bin/sh\nexit 0\n").expect("temp file");
            }
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        root
    })
}

/// The lines of `text` as YAML counts them (the last one possibly empty): a break is CR LF,
/// or a lone CR or LF, or NEL, LS or PS (libyaml follows YAML 1.1 there). tqproxy's own line
/// finder counts LF only, so it never goes past this.
fn yaml_lines(text: &str) -> usize {
    let mut n = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                n += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => n += 1,
            _ => {}
        }
    }
    n
}

/// What every rejection promises: at least one error, each naming a file (`file`, or a
/// worker's file when `workers` is true), with a message, and a line inside the text.
fn check_errors(errors: &ConfigErrors, file: &Path, text: &str, workers: bool) {
    assert!(!errors.0.is_empty(), "rejected without an error");
    let lines = yaml_lines(text);
    for e in &errors.0 {
        let ConfigError {
            file: named,
            line,
            message,
            ..
        } = e;
        assert!(named.is_absolute(), "{e}");
        assert!(
            named == file || (workers && named.ends_with("worker.yaml")),
            "the error names {} instead of {}: {e}",
            named.display(),
            file.display()
        );
        assert!(!message.trim().is_empty(), "an empty message: {e:?}");
        assert!(
            e.to_string().starts_with(&named.display().to_string()),
            "{e}"
        );
        if named == file
            && let Some(l) = line
        {
            assert!(
                (1..=lines).contains(l),
                "line {l} of a {lines}-line file: {e}"
            );
        }
    }
    assert!(!errors.to_string().is_empty());
}

/// What the rest of tqproxy relies on in an accepted worker.
fn check_worker(w: &WorkerConfig) {
    assert!(validate_name(&w.name).is_ok(), "{}", w.name);
    assert!(w.file.is_absolute() && w.dir.is_absolute());
    assert!(w.program.is_absolute(), "{}", w.program.display());
    assert!(w.instances <= 256);
    assert!(w.deploy.max_surge >= 1);
    assert!(w.health.interval >= Duration::from_millis(10));
    assert!(!w.health.timeout.is_zero());
    assert!(w.health.unhealthy_after >= 1);
    assert!(w.restart.backoff <= w.restart.backoff_max);
    if let Some(p) = &w.health.path {
        assert!(
            p.starts_with('/') && !p.contains(char::is_whitespace),
            "{p}"
        );
    }
    for (i, r) in w.routes.iter().enumerate() {
        assert!(r.prefix.starts_with('/'), "{r}");
        assert!(r.prefix == "/" || !r.prefix.ends_with('/'), "{r}");
        // The route is kept in its normal form: written again, it reads the same (two
        // workers' routes are compared in that form).
        let written = format!("{}{}", r.host.as_deref().unwrap_or(""), r.prefix);
        assert_eq!(
            parse_route(&written),
            Ok((r.host.clone(), r.prefix.clone())),
            "{written}"
        );
        assert!(
            !w.routes[..i]
                .iter()
                .any(|o| o.host == r.host && o.prefix == r.prefix),
            "{r} twice"
        );
    }
    assert!(w.env.contains_key("PATH"));
    for k in RESERVED_ENV {
        assert!(!w.env.contains_key(*k), "{k}");
    }
    let res = &w.resources;
    assert!(res.memory.is_none_or(|m| m >= 1 << 20));
    assert!(res.cpu.is_none_or(|c| (0.01..=1024.0).contains(&c)));
    if let (Some(h), Some(m)) = (res.memory_high, res.memory) {
        assert!(h <= m);
    }
    if let (Some(r), Some(m)) = (w.recycle_memory, res.memory) {
        assert!(r < m);
    }
}

fn same<T: PartialEq + std::fmt::Debug>(
    a: &Result<T, ConfigErrors>,
    b: &Result<T, ConfigErrors>,
) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => a.0 == b.0,
        _ => false,
    }
}

/// `workers/<name>/worker.yaml`: never a panic; a rejection is a list of clear errors naming
/// the file; an accepted worker holds the invariants the supervisor relies on; and validating
/// the same text again gives the same answer.
pub fn worker_yaml(data: &[u8]) {
    // tqproxy reads the file as UTF-8 text ("cannot read" otherwise).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = root().join("workers/fz");
    let file = dir.join("worker.yaml");
    let first = WorkerConfig::from_text(&dir, text);
    match &first {
        Err(errors) => check_errors(errors, &file, text, false),
        Ok(None) => {}
        Ok(Some(w)) => {
            assert_eq!(w.file, file);
            assert_eq!(w.name, "fz");
            check_worker(w);
        }
    }
    let again = WorkerConfig::from_text(&dir, text);
    assert!(same(&first, &again), "{first:?}\nthen\n{again:?}");
}

/// `conf/tqproxy.yaml`: as for a worker file; and the lenient reader the CLI uses to find
/// the control socket (`Config::control_socket_of`) finds the socket the server binds.
pub fn tqproxy_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = root().join("conf/tqproxy.yaml");
    let first = Config::from_text(&file, text);
    match &first {
        Err(errors) => check_errors(errors, &file, text, true),
        Ok(c) => {
            assert_eq!(c.file, file);
            assert!(!c.listen.is_empty());
            assert_eq!(c.listen.len(), c.listeners.len());
            for (i, a) in c.listen.iter().enumerate() {
                assert!(!c.listen[..i].contains(a), "{a} twice");
                assert!(!c.ports.contains(&a.port()), "{a} in the worker ports");
            }
            assert!(*c.ports.start() >= 1 && c.ports.start() <= c.ports.end());
            assert!(c.admin.is_none_or(|a| a.ip().is_loopback()));
            assert!((1..=256).contains(&c.proxy.threads));
            assert!(c.proxy.max_retries >= 1);
            assert!(c.proxy.max_connections != Some(0));
            for d in [
                c.proxy.client_header_timeout,
                c.proxy.client_keepalive_timeout,
                c.proxy.client_body_timeout,
                c.proxy.upstream_idle_timeout,
            ] {
                assert!(!d.is_zero());
            }
            assert!(validate_name(&c.cgroups.base).is_ok());
            for w in c.workers.values() {
                check_worker(w);
            }
            assert_eq!(
                Config::control_socket_from_text(&file, text).as_ref(),
                Ok(&c.control_socket),
                "the CLI would look for the control socket elsewhere"
            );
        }
    }
    let again = Config::from_text(&file, text);
    // `Config` is not `PartialEq` (its workers are); its `Debug` text shows every field.
    let show = |r: &Result<Config, ConfigErrors>| match r {
        Ok(c) => format!("{c:?}"),
        Err(e) => format!("{:?}", e.0),
    };
    assert_eq!(show(&first), show(&again));
}
