//! What only the host can tell about a loaded configuration, checked before anything starts
//! (`tqproxy check`, and reload and deploy before they change anything): seccomp profiles
//! compile, Landlock is available, the mount paths make sense, there is a cgroup hierarchy
//! with the controllers the limits need, and unix socket paths fit a socket address.
//!
//! It asks the sandbox ([`crate::sandbox::check_spec`], [`cgroup::detect`]); it does not use
//! the supervisor, which builds the real spawn spec and binds the real sockets from the same
//! model.

use super::*;
use crate::sandbox::cgroup;
use crate::sandbox::{LandlockSpec, MountSpec, NamespaceSpec, SeccompSpec, SpawnSpec};
use crate::supervisor::sockets::SUN_PATH_MAX;

/// Checks one worker of `config` against the host; the message starts with the part that
/// is wrong (`sandbox: …`, `transport: unix: …`, `resources: …`).
pub fn check_worker(config: &Config, w: &WorkerConfig) -> Result<(), String> {
    crate::sandbox::check_spec(&sandbox_spec(w, 1)).map_err(|e| format!("sandbox: {e}"))?;
    if w.transport == Transport::Unix {
        unix_socket_paths_fit(&config.run_dir, &w.name)
            .map_err(|e| format!("transport: unix: {e}"))?;
    }
    if w.ready == Ready::Notify {
        // `<run_dir>/notify/<pid>/<worker>.<id>.<epoch>.sock`: one byte shorter than the
        // sockets of `transport: unix`, so the same bound holds.
        unix_socket_paths_fit(&config.run_dir, &w.name)
            .map_err(|e| format!("ready: notify: {e}"))?;
    }
    if w.resources.needs_cgroup() {
        cgroups_available(&config.cgroups, &w.resources)?;
    }
    Ok(())
}

/// What the seed asks of every worker and `tqproxy check` reminds of ("Always set limits",
/// least privilege): a memory and a CPU limit, and not running as root. Warnings, not
/// errors (`check --strict` makes them errors); one line each, starting with the worker's file.
pub fn advice(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for w in config.workers.values() {
        let mut say = |what: &str| out.push(format!("{}: warning: {what}", w.file.display()));
        if w.resources.memory.is_none() {
            say("no resources.memory: a leak can take the host's memory (set e.g. `memory: 256M`)");
        }
        if w.resources.cpu.is_none() {
            say("no resources.cpu: a busy loop can take every core (set e.g. `cpu: 1.0`)");
        }
        let own_user = w.sandbox.user.ids().is_some_and(|(uid, _)| uid != 0);
        if !own_user && !w.sandbox.has(Namespace::User) {
            say("runs as root: set sandbox.user, sandbox.dynamic_user: true, or a user namespace");
        }
    }
    out
}

/// Checks every worker of a configuration (see [`check_worker`]); one message per problem,
/// each starting with the worker's file.
pub fn check_workers(config: &Config) -> Vec<String> {
    config
        .workers
        .values()
        .filter_map(|w| {
            check_worker(config, w)
                .err()
                .map(|e| format!("{}: {e}", w.file.display()))
        })
        .collect()
}

/// The spawn spec of instance `id` as far as the worker's own configuration says it: the
/// program and directory, its environment, the namespaces, the mounts, Landlock and seccomp.
/// [`crate::sandbox::check_spec`] judges it for `tqproxy check`, and the supervisor starts each
/// instance from it, adding what only it knows: its own environment variables (valid names),
/// the paths it hides (other workers' directories and its own, all absolute), credentials,
/// rlimits and the cgroup; with them the sandbox would judge the same.
pub fn sandbox_spec(w: &WorkerConfig, id: u64) -> SpawnSpec {
    let sb = &w.sandbox;
    let mount = sb.has(Namespace::Mount) || sb.has(Namespace::Pid);
    SpawnSpec {
        program: w.program.clone(),
        args: w.args.clone(),
        env: w.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        cwd: w.cwd.clone(),
        namespaces: NamespaceSpec {
            mount,
            pid: sb.has(Namespace::Pid),
            ipc: sb.has(Namespace::Ipc),
            uts: sb.has(Namespace::Uts),
            net: sb.has(Namespace::Net),
            user: sb.has(Namespace::User),
        },
        hostname: sb.has(Namespace::Uts).then(|| format!("{}-{id}", w.name)),
        mounts: if mount {
            MountSpec {
                read_only_root: sb.read_only_root,
                private_tmp: sb.private_tmp,
                read_write: sb.read_write.clone(),
                read_only: sb.read_only.clone(),
                hide: Vec::new(),
            }
        } else {
            MountSpec::default()
        },
        landlock: sb.landlock.then(|| LandlockSpec {
            read_write: sb.read_write.clone(),
            read_only: sb
                .read_only
                .iter()
                .cloned()
                .chain([w.dir.clone(), w.cwd.clone()])
                .chain(w.program.parent().map(Path::to_path_buf))
                .collect(),
        }),
        seccomp: match &sb.seccomp {
            SeccompSetting::Off => SeccompSpec::Off,
            SeccompSetting::Default => SeccompSpec::Default,
            SeccompSetting::Profile(p) => SeccompSpec::Profile(p.clone()),
        },
        listen_fd: w.passes_socket(),
        ..SpawnSpec::default()
    }
}

/// Whether the socket paths of the unix worker `worker` fit under `run_dir`: they are
/// `<run_dir>/sockets/<tqproxy pid>/<worker>.<id>.<epoch>.sock` (README, "`transport:
/// unix`"), counted here with a 7-digit pid and 6-digit instance ids and epochs.
pub fn unix_socket_paths_fit(run_dir: &Path, worker: &str) -> Result<(), String> {
    let base = run_dir.join("sockets");
    let worst = base
        .join("9999999")
        .join(format!("{worker}.999999.999999.sock"));
    let len = worst.as_os_str().len();
    if len <= SUN_PATH_MAX {
        return Ok(());
    }
    Err(format!(
        "socket paths under {} can reach {len} bytes, more than the {SUN_PATH_MAX} a unix socket address holds: use a shorter run_dir (at most {} bytes for this worker)",
        base.display(),
        run_dir.as_os_str().len().saturating_sub(len - SUN_PATH_MAX)
    ))
}

/// Limits need cgroups: a hierarchy of the configured version at `cgroups.root`, with the
/// controllers of the limits set in `r`.
fn cgroups_available(cgroups: &CgroupSettings, r: &Resources) -> Result<(), String> {
    if cgroups.mode == CgroupMode::Off {
        return Err(
            "resources: memory/cpu/pids/io limits need cgroups, but cgroups.mode is off".into(),
        );
    }
    let h = match (cgroups.mode, cgroup::detect(&cgroups.root)) {
        (_, None) => {
            return Err(format!(
                "resources: limits need cgroups, and there is no usable cgroup hierarchy at {}",
                cgroups.root.display()
            ));
        }
        (CgroupMode::V1, Some(cgroup::Hierarchy::V2 { .. })) => {
            return Err("resources: cgroups.mode is v1 but the hierarchy is v2".into());
        }
        (CgroupMode::V2, Some(cgroup::Hierarchy::V1 { .. })) => {
            return Err("resources: cgroups.mode is v2 but the hierarchy is v1".into());
        }
        (_, Some(h)) => h,
    };
    let needed = [
        ("memory", r.memory.is_some() || r.memory_high.is_some()),
        ("cpu", r.cpu.is_some() || r.cpu_weight.is_some()),
        ("pids", r.pids.is_some()),
        (
            if matches!(h, cgroup::Hierarchy::V1 { .. }) {
                "blkio"
            } else {
                "io"
            },
            r.io.is_some(),
        ),
    ];
    let available: Vec<String> = match &h {
        cgroup::Hierarchy::V2 { root } => std::fs::read_to_string(root.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        cgroup::Hierarchy::V1 { root } => needed
            .iter()
            .filter(|(c, _)| root.join(c).is_dir())
            .map(|(c, _)| c.to_string())
            .collect(),
    };
    for (controller, wanted) in needed {
        if wanted && !available.iter().any(|a| a == controller) {
            return Err(format!(
                "resources: the `{controller}` cgroup controller is not available in {}",
                cgroups.root.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration of the workers `(name, worker.yaml)` in a temporary installation
    /// (under target/, not /tmp: a worker living under /tmp gets no private /tmp).
    fn config(global: &str, workers: &[(&str, &str)]) -> (tempfile::TempDir, Config) {
        // Not under /tmp or /var/tmp (a worker living there gets no private /tmp, which
        // `the_sandbox_judges_the_mounts` needs), wherever the checkout is: /run as root (CI),
        // else the target directory.
        let base = if nix::unistd::geteuid().is_root() && Path::new("/run").is_dir() {
            PathBuf::from("/run")
        } else {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target"))
        };
        let d = tempfile::Builder::new()
            .prefix("tqproxy-check-test")
            .tempdir_in(base)
            .unwrap();
        std::fs::create_dir_all(d.path().join("conf")).unwrap();
        for (name, yaml) in workers {
            let wd = d.path().join("workers").join(name);
            std::fs::create_dir_all(&wd).unwrap();
            std::fs::write(wd.join("worker.yaml"), yaml).unwrap();
        }
        std::fs::create_dir_all(d.path().join("workers")).unwrap();
        let c = Config::from_text(&d.path().join("conf/tqproxy.yaml"), global).unwrap();
        (d, c)
    }

    #[test]
    fn advice_names_missing_limits_and_root() {
        let bare = "command: [\"/bin/true\"]\nroutes: [\"/\"]\n";
        let (_d, c) = config("cgroups: { mode: off }\n", &[("w", bare)]);
        let a = advice(&c);
        assert_eq!(a.len(), 3, "{a:?}");
        assert!(
            a[0].contains("workers/w/worker.yaml: warning: no resources.memory"),
            "{a:?}"
        );
        assert!(a[1].contains("no resources.cpu"), "{a:?}");
        assert!(a[2].contains("runs as root"), "{a:?}");
        let good = "command: [\"/bin/true\"]\nroutes: [\"/\"]\nresources: { memory: 64M, cpu: 0.5 }\nsandbox: { dynamic_user: true }\n";
        let userns = "command: [\"/bin/true\"]\nroutes: [\"/u\"]\nresources: { memory: 64M, cpu: 0.5 }\nsandbox: { namespaces: [user] }\n";
        let (_d, c) = config("cgroups: { mode: off }\n", &[("g", good), ("u", userns)]);
        assert_eq!(advice(&c), Vec::<String>::new());
    }

    #[test]
    fn unix_socket_paths_fit_up_to_the_limit_it_names() {
        let long = PathBuf::from(format!("/run/{}", "d".repeat(90)));
        let e = unix_socket_paths_fit(&long, "hello").unwrap_err();
        assert!(
            e.starts_with(&format!(
                "socket paths under {}/sockets can reach 136 bytes, more than the 107",
                long.display()
            )) && e.ends_with("use a shorter run_dir (at most 66 bytes for this worker)"),
            "{e}"
        );
        // The limit it names is the real one.
        let fits = PathBuf::from(format!("/{}", "r".repeat(65)));
        unix_socket_paths_fit(&fits, "hello").unwrap();
        let too_long = PathBuf::from(format!("/{}", "r".repeat(66)));
        assert!(unix_socket_paths_fit(&too_long, "hello").is_err());
        // README: `run_dir: /run/tqproxy` leaves room for any worker name.
        unix_socket_paths_fit(Path::new("/run/tqproxy"), &"w".repeat(48)).unwrap();
    }

    #[test]
    fn a_unix_worker_with_too_long_a_run_dir_is_refused() {
        let global = format!("run_dir: /{}\ncontrol: {{ admin: off }}\n", "r".repeat(100));
        let worker = "command: [\"/bin/true\"]\nroutes: [\"/\"]\ntransport: unix\n";
        let (_d, c) = config(&global, &[("w", worker)]);
        let problems = check_workers(&c);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!(
                "{}: transport: unix: socket paths under /",
                c.workers["w"].file.display()
            )),
            "{problems:?}"
        );
        // The same worker over TCP needs no socket path.
        let (_d, c) = config(&global, &[("w", &worker.replace("unix", "tcp"))]);
        assert_eq!(check_workers(&c), Vec::<String>::new());
    }

    #[test]
    fn limits_without_cgroups_are_refused() {
        let worker = "command: [\"/bin/true\"]\nroutes: [\"/\"]\nresources: { pids: 10 }\n";
        let (_d, c) = config("cgroups: { mode: off }\n", &[("w", worker)]);
        assert_eq!(
            check_worker(&c, &c.workers["w"]),
            Err(
                "resources: memory/cpu/pids/io limits need cgroups, but cgroups.mode is off".into()
            )
        );
        let root = tempfile::tempdir().unwrap();
        let (_d, c) = config(
            &format!("cgroups: {{ root: {} }}\n", root.path().display()),
            &[("w", worker)],
        );
        assert_eq!(
            check_worker(&c, &c.workers["w"]),
            Err(format!(
                "resources: limits need cgroups, and there is no usable cgroup hierarchy at {}",
                root.path().display()
            ))
        );
        // Without limits, no cgroup is needed.
        let (_d, c) = config(
            "cgroups: { mode: off }\n",
            &[("w", "command: [\"/bin/true\"]\nroutes: [\"/\"]\n")],
        );
        assert_eq!(check_worker(&c, &c.workers["w"]), Ok(()));
    }

    #[test]
    fn a_v2_hierarchy_must_have_the_controllers_of_the_limits() {
        // A fake cgroup2 root: `detect` reads cgroup.controllers there.
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu pids\n").unwrap();
        let global = format!("cgroups: {{ mode: v2, root: {} }}\n", root.path().display());
        let ok = "command: [\"/bin/true\"]\nroutes: [\"/\"]\nresources: { pids: 10 }\n";
        let (_d, c) = config(&global, &[("w", ok)]);
        assert_eq!(check_worker(&c, &c.workers["w"]), Ok(()));
        let memory = "command: [\"/bin/true\"]\nroutes: [\"/\"]\nresources: { memory: 64M }\n";
        let (_d, c) = config(&global, &[("w", memory)]);
        assert_eq!(
            check_worker(&c, &c.workers["w"]),
            Err(format!(
                "resources: the `memory` cgroup controller is not available in {}",
                root.path().display()
            ))
        );
    }

    #[test]
    fn the_sandbox_judges_the_mounts() {
        // A private /tmp would cover a read_write path under /var/tmp: the sandbox refuses.
        let worker = "command: [\"/bin/true\"]\nroutes: [\"/\"]\nsandbox: { namespaces: [mount], read_write: [/var/tmp/tq-check-test] }\n";
        let (_d, c) = config("", &[("w", worker)]);
        let e = check_worker(&c, &c.workers["w"]).unwrap_err();
        assert!(
            e.starts_with("sandbox: ")
                && e.contains("/var/tmp/tq-check-test is under a private tmp directory"),
            "{e}"
        );
        let worker = worker.replace("[mount]", "[mount], private_tmp: false");
        let (_d, c) = config("", &[("w", &worker)]);
        assert_eq!(check_worker(&c, &c.workers["w"]), Ok(()));
    }
}
