//! Fixture tests (temp directories shaped like cgroupfs) and real tests on this machine's
//! hierarchy (v1 under /sys/fs/cgroup, the empty v2 at /sys/fs/cgroup/unified). The real
//! tests skip themselves, saying so, where the hierarchy is not there or not writable.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command};

use super::*;

fn content(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn full_limits() -> CgroupLimits {
    CgroupLimits {
        memory_max: Some(536_870_912),
        memory_high: Some(402_653_184),
        cpu_cores: Some(1.5),
        cpu_weight: Some(200),
        pids_max: Some(128),
        io: vec![IoLimit {
            device: (254, 0),
            read_bps: Some(1_048_576),
            write_bps: Some(2_097_152),
            read_iops: Some(100),
            write_iops: Some(200),
        }],
    }
}

fn v2_fixture(controllers: &str, subtree: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("cgroup.controllers"), controllers).unwrap();
    fs::write(dir.path().join("cgroup.subtree_control"), subtree).unwrap();
    dir
}

fn v1_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for c in V1_CONTROLLERS {
        fs::create_dir(dir.path().join(c)).unwrap();
    }
    dir
}

#[test]
fn detect_tells_versions_apart() {
    let v2 = v2_fixture("cpu memory", "");
    assert_eq!(
        detect(v2.path()),
        Some(Hierarchy::V2 {
            root: v2.path().into()
        })
    );
    let v1 = v1_fixture();
    assert_eq!(
        detect(v1.path()),
        Some(Hierarchy::V1 {
            root: v1.path().into()
        })
    );
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(detect(empty.path()), None);
}

#[test]
fn v2_enables_exactly_the_needed_controllers_at_each_level() {
    let fx = v2_fixture("cpuset cpu io memory hugetlb pids\n", "");
    let root = fx.path();
    let d = CgroupDriver::new(Hierarchy::V2 { root: root.into() }, "tqproxy", "123").unwrap();
    assert_eq!(d.version(), 2);
    for level in ["", "tqproxy", "tqproxy/123"] {
        assert_eq!(
            content(&root.join(level).join("cgroup.subtree_control")),
            "+cpu +io +memory +pids",
            "level {level:?}"
        );
    }
}

/// systemd `Delegate=yes`: tqproxy moves itself into `<unit>/supervisor` and builds its tree in
/// the unit's cgroup, enabling the controllers there (which v2 allows only once the unit's
/// cgroup holds no process of its own).
#[test]
fn delegation_builds_inside_the_unit_cgroup() {
    let fx = v2_fixture("cpu io memory pids", "cpu io memory pids");
    let root = fx.path();
    let unit = root.join("system.slice/tqproxy.service");
    fs::create_dir_all(&unit).unwrap();
    for f in ["cgroup.procs", "cgroup.subtree_control"] {
        fs::write(unit.join(f), "").unwrap();
    }
    fs::write(unit.join("cgroup.controllers"), "cpu io memory pids").unwrap();

    let dir = enter_delegated(root, "/system.slice/tqproxy.service", 4242).unwrap();
    assert_eq!(dir, unit);
    assert_eq!(content(&unit.join("supervisor/cgroup.procs")), "4242");
    let d = CgroupDriver::new(Hierarchy::V2 { root: dir }, "tqproxy", "4242").unwrap();
    for level in ["", "tqproxy", "tqproxy/4242"] {
        assert_eq!(
            content(&unit.join(level).join("cgroup.subtree_control")),
            "+cpu +io +memory +pids",
            "level {level:?}"
        );
    }
    let c = d.create("w.1.1", &CgroupLimits::default()).unwrap();
    assert_eq!(c.path(), unit.join("tqproxy/4242/w.1.1"));

    // Already in `<unit>/supervisor` (systemd's DelegateSubgroup=, or a successor started by
    // `tqproxy upgrade`): the unit is the parent, nothing is moved.
    fs::write(unit.join("supervisor/cgroup.procs"), "").unwrap();
    let dir = enter_delegated(root, "/system.slice/tqproxy.service/supervisor", 4343).unwrap();
    assert_eq!(dir, unit);
    assert_eq!(content(&unit.join("supervisor/cgroup.procs")), "");
    assert!(!unit.join("supervisor/supervisor").exists());

    // Not a delegated service cgroup: refused with the reason, nothing created.
    for (own, why) in [
        ("/", "root cgroup"),
        (
            "/user.slice/user-0.slice/session-3.scope",
            "not a systemd service",
        ),
        ("/system.slice/gone.service", "not a cgroup v2 directory"),
    ] {
        let e = enter_delegated(root, own, 1).unwrap_err().to_string();
        assert!(e.contains(why), "{own}: {e}");
    }
    assert!(!root.join("user.slice").exists());
}

#[test]
fn v2_writes_only_what_is_missing_and_only_what_exists() {
    let fx = v2_fixture("cpuset cpu io memory pids", "cpu memory\n");
    CgroupDriver::new(
        Hierarchy::V2 {
            root: fx.path().into(),
        },
        "tqproxy",
        "1",
    )
    .unwrap();
    assert_eq!(
        content(&fx.path().join("cgroup.subtree_control")),
        "+io +pids"
    );

    let fx = v2_fixture("cpuset memory", "");
    let d = CgroupDriver::new(
        Hierarchy::V2 {
            root: fx.path().into(),
        },
        "tqproxy",
        "1",
    )
    .unwrap();
    assert_eq!(
        content(&fx.path().join("cgroup.subtree_control")),
        "+memory"
    );
    let err = d
        .create(
            "a",
            &CgroupLimits {
                pids_max: Some(5),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::ControllerMissing {
                controller: "pids",
                ..
            }
        ),
        "{err}"
    );

    // No controllers at all (like /sys/fs/cgroup/unified here): nothing is written.
    let fx = v2_fixture("", "");
    CgroupDriver::new(
        Hierarchy::V2 {
            root: fx.path().into(),
        },
        "tqproxy",
        "1",
    )
    .unwrap();
    assert_eq!(content(&fx.path().join("cgroup.subtree_control")), "");
    assert!(!fx.path().join("tqproxy/cgroup.subtree_control").exists());
}

#[test]
fn v2_limit_files() {
    let fx = v2_fixture("cpuset cpu io memory hugetlb pids", "");
    let root = fx.path();
    let d = CgroupDriver::new(Hierarchy::V2 { root: root.into() }, "tqproxy", "123").unwrap();
    let cg = d.create("hello-1", &full_limits()).unwrap();
    let dir = root.join("tqproxy/123/hello-1");
    assert_eq!(cg.path(), dir);
    assert_eq!(cg.procs_files(), [dir.join("cgroup.procs")]);
    assert_eq!(content(&dir.join("memory.max")), "536870912");
    assert_eq!(content(&dir.join("memory.high")), "402653184");
    assert_eq!(content(&dir.join("cpu.max")), "150000 100000");
    assert_eq!(content(&dir.join("cpu.weight")), "200");
    assert_eq!(content(&dir.join("pids.max")), "128");
    assert_eq!(
        content(&dir.join("io.max")),
        "254:0 rbps=1048576 wbps=2097152 riops=100 wiops=200"
    );
    // memory.swap.max only where the kernel has it.
    assert!(!dir.join("memory.swap.max").exists());
    let pre = root.join("tqproxy/123/hello-2");
    fs::create_dir(&pre).unwrap();
    fs::write(pre.join("memory.swap.max"), "max").unwrap();
    d.create(
        "hello-2",
        &CgroupLimits {
            memory_max: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(content(&pre.join("memory.swap.max")), "0");
    // Unset limits write nothing.
    let cg = d.create("bare", &CgroupLimits::default()).unwrap();
    assert_eq!(fs::read_dir(cg.path()).unwrap().count(), 0);
}

#[test]
fn v1_limit_files() {
    let fx = v1_fixture();
    let root = fx.path();
    let d = CgroupDriver::new(Hierarchy::V1 { root: root.into() }, "tqproxy", "123").unwrap();
    assert_eq!(d.version(), 1);
    // memsw exists only with swap accounting: pre-create the directory with it.
    let mem = root.join("memory/tqproxy/123/hello-1");
    fs::create_dir(&mem).unwrap();
    fs::write(mem.join("memory.memsw.limit_in_bytes"), "").unwrap();
    let cg = d.create("hello-1", &full_limits()).unwrap();
    let at = |c: &str, f: &str| content(&root.join(c).join("tqproxy/123/hello-1").join(f));
    assert_eq!(at("memory", "memory.limit_in_bytes"), "536870912");
    assert_eq!(at("memory", "memory.memsw.limit_in_bytes"), "536870912");
    assert_eq!(at("memory", "memory.soft_limit_in_bytes"), "402653184");
    assert_eq!(at("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(at("cpu", "cpu.cfs_quota_us"), "150000");
    assert_eq!(at("cpu", "cpu.shares"), "2048");
    assert_eq!(at("pids", "pids.max"), "128");
    assert_eq!(
        at("blkio", "blkio.throttle.read_bps_device"),
        "254:0 1048576"
    );
    assert_eq!(
        at("blkio", "blkio.throttle.write_bps_device"),
        "254:0 2097152"
    );
    assert_eq!(at("blkio", "blkio.throttle.read_iops_device"), "254:0 100");
    assert_eq!(at("blkio", "blkio.throttle.write_iops_device"), "254:0 200");
    let expected: Vec<PathBuf> = V1_CONTROLLERS
        .iter()
        .map(|c| root.join(c).join("tqproxy/123/hello-1/cgroup.procs"))
        .collect();
    assert_eq!(cg.procs_files(), expected);
    assert_eq!(cg.path(), mem);
    // cpu weight 1 (the minimum) → 1 × 1024 / 100 = 10 shares.
    d.create(
        "w",
        &CgroupLimits {
            cpu_weight: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(content(&root.join("cpu/tqproxy/123/w/cpu.shares")), "10");
}

#[test]
fn v1_shared_cpu_cpuacct_hierarchy_is_joined_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for c in ["memory", "pids", "cpu,cpuacct"] {
        fs::create_dir(root.join(c)).unwrap();
    }
    std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpu")).unwrap();
    std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpuacct")).unwrap();
    let d = CgroupDriver::new(Hierarchy::V1 { root: root.into() }, "tqproxy", "7").unwrap();
    let cg = d
        .create(
            "x",
            &CgroupLimits {
                cpu_cores: Some(0.25),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(cg.procs_files().len(), 3, "{:?}", cg.procs_files());
    assert_eq!(
        content(&root.join("cpu,cpuacct/tqproxy/7/x/cpu.cfs_quota_us")),
        "25000"
    );
    let err = d
        .create(
            "y",
            &CgroupLimits {
                io: vec![IoLimit {
                    device: (8, 0),
                    read_bps: Some(1),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("blkio"), "{err}");
}

#[test]
fn write_errors_name_the_file_and_the_value() {
    let fx = v2_fixture("memory", "");
    let root = fx.path();
    let d = CgroupDriver::new(Hierarchy::V2 { root: root.into() }, "tqproxy", "123").unwrap();
    // A directory where the limit file should be: the write fails.
    fs::create_dir_all(root.join("tqproxy/123/hello-1/memory.max")).unwrap();
    let err = d
        .create(
            "hello-1",
            &CgroupLimits {
                memory_max: Some(536_870_912),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    let file = root.join("tqproxy/123/hello-1/memory.max");
    assert!(
        err.starts_with(&format!(
            "failed to write 536870912 to {}: ",
            file.display()
        )),
        "{err}"
    );
}

#[test]
fn names_and_limits_are_validated() {
    for ok in ["hello-1", "a", "w.2_x", "A-Z"] {
        validate_name(ok).unwrap();
    }
    for bad in ["", "..", "a..b", ".", "a/b", "a b", "ä", "x\0"] {
        assert!(validate_name(bad).is_err(), "{bad:?}");
    }
    let fx = v2_fixture("cpu memory pids io", "");
    let d = CgroupDriver::new(
        Hierarchy::V2 {
            root: fx.path().into(),
        },
        "tqproxy",
        "1",
    )
    .unwrap();
    assert!(d.create("../x", &CgroupLimits::default()).is_err());
    assert!(
        CgroupDriver::new(
            Hierarchy::V2 {
                root: fx.path().into()
            },
            "tq/../x",
            "1"
        )
        .is_err()
    );
    for bad in [
        CgroupLimits {
            cpu_weight: Some(0),
            ..Default::default()
        },
        CgroupLimits {
            cpu_weight: Some(10_001),
            ..Default::default()
        },
        CgroupLimits {
            cpu_cores: Some(f64::NAN),
            ..Default::default()
        },
        CgroupLimits {
            cpu_cores: Some(0.0),
            ..Default::default()
        },
        CgroupLimits {
            memory_max: Some(0),
            ..Default::default()
        },
        CgroupLimits {
            io: vec![IoLimit {
                device: (8, 0),
                ..Default::default()
            }],
            ..Default::default()
        },
    ] {
        let err = d.create("x", &bad).unwrap_err();
        assert!(
            matches!(err, SandboxError::InvalidLimit { .. }),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn stats_are_parsed_from_the_files() {
    let fx = v1_fixture();
    let root = fx.path();
    let d = CgroupDriver::new(Hierarchy::V1 { root: root.into() }, "tq", "1").unwrap();
    let cg = d.create("s", &CgroupLimits::default()).unwrap();
    let at = |c: &str| root.join(c).join("tq/1/s");
    assert_eq!(cg.memory_current(), None);
    fs::write(at("memory").join("memory.usage_in_bytes"), "12345\n").unwrap();
    fs::write(at("cpuacct").join("cpuacct.usage"), "2500000000\n").unwrap();
    fs::write(
        at("memory").join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    )
    .unwrap();
    fs::write(at("pids").join("pids.current"), "4\n").unwrap();
    fs::write(at("pids").join("cgroup.procs"), "10\n12\n").unwrap();
    fs::write(at("memory").join("cgroup.procs"), "12\n11\n").unwrap();
    assert_eq!(cg.memory_current(), Some(12345));
    assert_eq!(cg.cpu_usage(), Some(Duration::from_millis(2500)));
    assert_eq!(cg.oom_kills(), Some(3));
    assert_eq!(cg.pids_current(), Some(4));
    assert_eq!(cg.pids(), [10, 11, 12]);

    let fx = v2_fixture("cpu memory pids", "");
    let d = CgroupDriver::new(
        Hierarchy::V2 {
            root: fx.path().into(),
        },
        "tq",
        "1",
    )
    .unwrap();
    let cg = d.create("s", &CgroupLimits::default()).unwrap();
    let dir = cg.path();
    fs::write(dir.join("memory.current"), "777\n").unwrap();
    fs::write(
        dir.join("cpu.stat"),
        "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
    )
    .unwrap();
    fs::write(
        dir.join("memory.events"),
        "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n",
    )
    .unwrap();
    fs::write(dir.join("pids.current"), "9").unwrap();
    assert_eq!(cg.memory_current(), Some(777));
    assert_eq!(cg.cpu_usage(), Some(Duration::from_micros(1500)));
    assert_eq!(cg.oom_kills(), Some(2));
    assert_eq!(cg.pids_current(), Some(9));
}

#[test]
fn existing_cgroup_with_processes_is_not_reused() {
    let fx = v2_fixture("memory", "");
    let root = fx.path();
    let d = CgroupDriver::new(Hierarchy::V2 { root: root.into() }, "tq", "1").unwrap();
    let dir = root.join("tq/1/busy");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("cgroup.procs"), "4242\n").unwrap();
    let err = d.create("busy", &CgroupLimits::default()).unwrap_err();
    assert!(
        matches!(err, SandboxError::CgroupBusy { ref pids, .. } if pids == &[4242]),
        "{err}"
    );
}

#[test]
fn cleanup_stale_removes_dead_runs_only() {
    let fx = v2_fixture("", "");
    let root = fx.path();
    let d = CgroupDriver::new(Hierarchy::V2 { root: root.into() }, "tq", "555").unwrap();
    // A dead run (pids never reach 999999999) with an instance, a live one (pid 1), a
    // non-pid directory, and our own run.
    fs::create_dir_all(root.join("tq/999999999/hello-1")).unwrap();
    fs::create_dir_all(root.join("tq/1/hello-1")).unwrap();
    fs::create_dir_all(root.join("tq/notapid")).unwrap();
    assert_eq!(d.cleanup_stale(), ["999999999"]);
    assert!(!root.join("tq/999999999").exists());
    assert!(root.join("tq/1/hello-1").exists());
    assert!(root.join("tq/notapid").exists());
    assert!(root.join("tq/555").exists());
    assert!(d.cleanup_stale().is_empty());
}

// ---- real hierarchies ---------------------------------------------------------------------

/// Kills and reaps a child by pid when a test ends, however it ends.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Removes a test's cgroups when it ends, however it ends.
struct DriverGuard(CgroupDriver, Vec<InstanceCgroup>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        for cg in &self.1 {
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
        let _ = self.0.remove();
    }
}

fn sleeper() -> ChildGuard {
    ChildGuard(Some(
        Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep"),
    ))
}

/// Waits (bounded) for the child to end and returns the signal that killed it.
fn wait_signal(guard: &mut ChildGuard) -> Option<i32> {
    let child = guard.0.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            guard.0 = None;
            return status.signal();
        }
        assert!(Instant::now() < deadline, "child never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn writable_v1() -> Option<PathBuf> {
    let root = PathBuf::from("/sys/fs/cgroup");
    match detect(&root) {
        Some(Hierarchy::V1 { .. }) if nix::unistd::geteuid().is_root() => Some(root),
        _ => {
            eprintln!("skipped: no writable cgroup v1 hierarchy at /sys/fs/cgroup");
            None
        }
    }
}

#[test]
fn real_v1_create_join_limit_kill_remove() {
    let Some(root) = writable_v1() else { return };
    let base = format!("tqproxy-test-{}", std::process::id());
    let d = CgroupDriver::new(Hierarchy::V1 { root: root.clone() }, &base, "v1").unwrap();
    let mut guard = DriverGuard(d.clone(), Vec::new());
    let disk = super::super::block_device_of(Path::new("/")).unwrap();
    let limits = CgroupLimits {
        memory_max: Some(256 << 20),
        memory_high: Some(200 << 20),
        cpu_cores: Some(0.5),
        cpu_weight: Some(50),
        pids_max: Some(64),
        io: vec![IoLimit {
            device: disk,
            read_bps: Some(10 << 20),
            ..Default::default()
        }],
    };
    let cg = d.create("inst", &limits).unwrap();
    guard.1.push(cg.clone());
    let mut child = sleeper();
    let pid = child.0.as_ref().unwrap().id() as i32;
    for f in cg.procs_files() {
        fs::write(&f, pid.to_string()).unwrap();
    }
    assert_eq!(cg.pids(), [pid]);
    let at = |c: &str, f: &str| content(&root.join(c).join(&base).join("v1/inst").join(f));
    assert_eq!(at("memory", "memory.limit_in_bytes").trim(), "268435456");
    assert_eq!(at("cpu", "cpu.cfs_quota_us").trim(), "50000");
    assert_eq!(at("cpu", "cpu.shares").trim(), "512");
    assert_eq!(at("pids", "pids.max").trim(), "64");
    assert!(
        at("blkio", "blkio.throttle.read_bps_device")
            .contains(&format!("{}:{} 10485760", disk.0, disk.1))
    );
    assert_eq!(cg.pids_current(), Some(1));
    // v1 charges pages where they were allocated, not where the process moved: may be 0.
    assert!(cg.memory_current().is_some());
    assert!(cg.cpu_usage().is_some());
    assert_eq!(cg.oom_kills(), Some(0));

    cg.kill_all().unwrap();
    assert_eq!(wait_signal(&mut child), Some(libc::SIGKILL));
    assert!(cg.pids().is_empty());
    cg.remove().unwrap();
    for f in cg.procs_files() {
        assert!(!f.parent().unwrap().exists(), "{} remains", f.display());
    }
    d.remove().unwrap();
    for c in V1_CONTROLLERS {
        assert!(!root.join(c).join(&base).exists(), "{c}/{base} remains");
    }
}

#[test]
fn real_v2_unified_create_join_kill_remove() {
    let root = PathBuf::from("/sys/fs/cgroup/unified");
    if !root.join("cgroup.procs").exists() || !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: no cgroup2 at {}", root.display());
        return;
    }
    let base = format!("tqproxy-test-{}", std::process::id());
    let d = CgroupDriver::new(Hierarchy::V2 { root: root.clone() }, &base, "v2").unwrap();
    let mut guard = DriverGuard(d.clone(), Vec::new());
    // Both kill paths: cgroup.kill, and freeze/kill/thaw as on kernels before 5.14.
    for (name, use_cgroup_kill) in [("kill", true), ("freeze", false)] {
        let cg = d.create(name, &CgroupLimits::default()).unwrap();
        guard.1.push(cg.clone());
        let mut child = sleeper();
        let pid = child.0.as_ref().unwrap().id() as i32;
        let procs = cg.procs_files();
        assert_eq!(procs.len(), 1);
        fs::write(&procs[0], pid.to_string()).unwrap();
        assert_eq!(cg.pids(), [pid]);
        cg.kill_all_with(use_cgroup_kill).unwrap();
        assert_eq!(wait_signal(&mut child), Some(libc::SIGKILL), "{name}");
        cg.remove().unwrap();
        assert!(!cg.path().exists());
    }
    d.remove().unwrap();
    assert!(!root.join(&base).exists());
}

#[test]
fn real_v1_reused_cgroup_takes_a_higher_or_lower_memory_limit() {
    // An empty cgroup of the same name is reused (a tqproxy restarted with the same pid, as
    // PID 1 of a container is): its memory.memsw.limit_in_bytes, which must never be below
    // memory.limit_in_bytes, still holds the old value.
    let Some(root) = writable_v1() else { return };
    let base = format!("tqproxy-test-reuse-{}", std::process::id());
    let d = CgroupDriver::new(Hierarchy::V1 { root: root.clone() }, &base, "v1").unwrap();
    let mut guard = DriverGuard(d.clone(), Vec::new());
    let dir = root.join("memory").join(&base).join("v1/inst");
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    for mib in [64u64, 256, 32] {
        let limits = CgroupLimits {
            memory_max: Some(mib << 20),
            ..Default::default()
        };
        let cg = d
            .create("inst", &limits)
            .unwrap_or_else(|e| panic!("{mib} MiB: {e}"));
        guard.1.push(cg.clone());
        assert_eq!(
            content(&dir.join("memory.limit_in_bytes")).trim(),
            (mib << 20).to_string()
        );
        if memsw.exists() {
            assert_eq!(content(&memsw).trim(), (mib << 20).to_string());
        }
    }
}
