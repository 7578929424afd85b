//! Cgroups: tqproxy's own thin layer over cgroup v1 and v2.
//!
//! Instance cgroups live in `<base>/<run_id>/<name>` (v2: under the hierarchy root, or under
//! tqproxy's own unit cgroup when systemd delegated it, see [`enter_delegated`]; v1: under
//! each controller's directory), e.g. `/sys/fs/cgroup/memory/tqproxy/4242/hello-1`. The
//! supervisor creates one per instance with [`CgroupDriver::create`], passes
//! [`InstanceCgroup::procs_files`] in the [`super::SpawnSpec`] (the helper joins them before
//! anything else), reads the stats, and on stop calls [`InstanceCgroup::kill_all`] then
//! [`InstanceCgroup::remove`].
//!
//! Why not `cgroups-rs`: it discovers mounts from `/proc/self/mountinfo` itself, so it cannot
//! be pointed at a fixture directory in tests; it has no v1 "freeze, kill every pid, thaw"
//! (v1 has no `cgroup.kill`); and it pulls in dbus crates for systemd. Every path here is
//! derived from the root given to [`detect`]/[`CgroupDriver::new`], so the unit tests run
//! against temp directories.
//!
//! All calls are blocking file I/O; [`InstanceCgroup::kill_all`] and
//! [`InstanceCgroup::remove`] may wait (bounded: 2 s and 1 s). Call them from blocking
//! contexts (`spawn_blocking`).

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::SandboxError;

/// Which cgroup hierarchy, and where it is mounted (normally `/sys/fs/cgroup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// One directory per controller under `root` (`root/memory`, `root/cpu`, …).
    V1 { root: PathBuf },
    /// The unified hierarchy mounted at `root`.
    V2 { root: PathBuf },
}

/// The v1 controllers tqproxy uses, where they exist.
pub const V1_CONTROLLERS: [&str; 6] = ["memory", "cpu", "cpuacct", "pids", "blkio", "freezer"];
/// The v2 controllers tqproxy enables (only those the root offers).
pub const V2_CONTROLLERS: [&str; 4] = ["cpu", "io", "memory", "pids"];

/// v2 when `root/cgroup.controllers` exists (cgroup2 mounted at `root`); else v1 when
/// `root/memory` or `root/pids` exists. A cgroup2 mounted at `root/unified` beside a v1
/// hierarchy (hybrid mode) has no controllers and is not used for limits; it can still be
/// given explicitly as `Hierarchy::V2 { root: "/sys/fs/cgroup/unified" }` to group and kill.
pub fn detect(root: &Path) -> Option<Hierarchy> {
    if root.join("cgroup.controllers").is_file() {
        Some(Hierarchy::V2 {
            root: root.to_owned(),
        })
    } else if root.join("memory").is_dir() || root.join("pids").is_dir() {
        Some(Hierarchy::V1 {
            root: root.to_owned(),
        })
    } else {
        None
    }
}

/// The sub-cgroup of a delegated unit that tqproxy's own process lives in (systemd's name for
/// it in `DelegateSubgroup=` examples): v2 allows processes only in leaves of a subtree whose
/// controllers are enabled, so the unit's cgroup itself must be left empty.
pub const SUPERVISOR_CGROUP: &str = "supervisor";

/// This process's cgroup v2 path relative to the hierarchy root (`/system.slice/x.service`),
/// from the `0::` line of `/proc/self/cgroup`.
pub fn own_v2_cgroup() -> Option<String> {
    read(Path::new("/proc/self/cgroup"))?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// Delegation (systemd `Delegate=yes`): tqproxy builds its tree inside the cgroup of its own
/// unit instead of at the hierarchy root, so the workers are accounted to the unit and
/// systemd's final kill reaches them. `own` is this process's cgroup path (see
/// [`own_v2_cgroup`]). The unit's cgroup is `own`, or its parent when `own` is already
/// `…/supervisor` (systemd's `DelegateSubgroup=supervisor`, or a tqproxy started by
/// `tqproxy upgrade` from one that moved itself). tqproxy moves itself into
/// `<unit>/supervisor` (v2 keeps processes out of cgroups whose children have controllers)
/// and returns the unit's directory: the root to give [`CgroupDriver::new`] as
/// `Hierarchy::V2 { root }`.
pub fn enter_delegated(root: &Path, own: &str, pid: u32) -> Result<PathBuf, SandboxError> {
    let own = own.trim_matches('/');
    if own.is_empty() {
        return Err(SandboxError::Delegation(
            "tqproxy runs in the root cgroup, not in a delegated unit cgroup (Delegate=yes)".into(),
        ));
    }
    let (unit, inside) = match own.rsplit_once('/') {
        Some((parent, SUPERVISOR_CGROUP)) => (parent, true),
        _ => (own, false),
    };
    if !unit
        .rsplit('/')
        .next()
        .is_some_and(|u| u.ends_with(".service"))
    {
        // A login session's scope, a shell, a container: not ours to rearrange.
        return Err(SandboxError::Delegation(format!(
            "tqproxy's cgroup /{own} is not a systemd service's (run it as a service with Delegate=yes)"
        )));
    }
    let unit_dir = root.join(unit);
    if !unit_dir.join("cgroup.procs").is_file() {
        return Err(SandboxError::Delegation(format!(
            "{} is not a cgroup v2 directory",
            unit_dir.display()
        )));
    }
    if !inside {
        let supervisor = unit_dir.join(SUPERVISOR_CGROUP);
        mkdir(&supervisor)?;
        write(&supervisor.join("cgroup.procs"), &pid.to_string())?;
    }
    Ok(unit_dir)
}

/// Limits of one instance's cgroup. `None`/empty = not limited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupLimits {
    /// Hard memory limit in bytes (v2 `memory.max`, v1 `memory.limit_in_bytes` and
    /// `memory.memsw.limit_in_bytes`; v2 also `memory.swap.max` = 0 where it exists, so that
    /// neither version lets the instance use swap beyond the limit).
    pub memory_max: Option<u64>,
    /// Memory pressure threshold in bytes (v2 `memory.high`, v1 `memory.soft_limit_in_bytes`).
    pub memory_high: Option<u64>,
    /// CPU bandwidth in cores (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), period 100 ms.
    pub cpu_cores: Option<f64>,
    /// CPU weight 1..=10000, v2 semantics (default 100); v1 `cpu.shares` = weight × 1024 / 100.
    pub cpu_weight: Option<u64>,
    /// Maximum number of processes (threads count too), `pids.max`.
    pub pids_max: Option<u64>,
    /// Per-device throttling (v2 `io.max`, v1 `blkio.throttle.*_device`).
    pub io: Vec<IoLimit>,
}

/// Throttling of one block device (whole disk, see [`super::block_device_of`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoLimit {
    pub device: (u32, u32),
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
}

/// CFS period used for `cpu_cores`.
const CPU_PERIOD_US: u64 = 100_000;
/// How long [`InstanceCgroup::kill_all`] keeps trying.
const KILL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long freezing may take before we kill anyway.
const FREEZE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long [`InstanceCgroup::remove`] retries `rmdir` on EBUSY.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(5);

/// Creates, limits and removes the cgroups of one tqproxy run.
#[derive(Debug, Clone)]
pub struct CgroupDriver {
    hierarchy: Hierarchy,
    base: String,
    run_id: String,
    /// v1: the controllers present, with their directory (`root/<controller>`).
    v1: Vec<(&'static str, PathBuf)>,
    /// v2: the controllers enabled for instances.
    v2_enabled: Vec<&'static str>,
}

/// Checks a name that becomes a path component: `[A-Za-z0-9._-]`, not empty, no `..`.
pub fn validate_name(name: &str) -> Result<(), SandboxError> {
    let bad = |reason| {
        Err(SandboxError::InvalidName {
            name: name.into(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 200 {
        return bad("longer than 200 bytes");
    }
    if name.contains("..") || name == "." {
        return bad("contains \"..\" or is \".\"");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad("only A-Z a-z 0-9 . _ - are allowed");
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> Result<(), SandboxError> {
    std::fs::write(path, value).map_err(|source| SandboxError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`key value` per line: cpu.stat, memory.events,
/// memory.oom_control).
fn keyed(path: &Path, key: &str) -> Option<u64> {
    read(path)?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn mkdir(path: &Path) -> Result<bool, SandboxError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(SandboxError::CreateDir {
            path: path.to_owned(),
            source,
        }),
    }
}

fn pid_alive(pid: i32) -> bool {
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

impl CgroupDriver {
    /// Prepares `<base>/<run_id>` (e.g. `tqproxy/4242`). v2: enables in `cgroup.subtree_control`
    /// at each level from the root down to `<base>/<run_id>` exactly the controllers needed
    /// (those of [`V2_CONTROLLERS`] that the root's `cgroup.controllers` lists), and no more.
    /// `base` may have several `/`-separated components, each a valid name.
    pub fn new(h: Hierarchy, base: &str, run_id: &str) -> Result<Self, SandboxError> {
        for part in base.split('/') {
            validate_name(part)?;
        }
        validate_name(run_id)?;
        let mut d = CgroupDriver {
            hierarchy: h,
            base: base.to_owned(),
            run_id: run_id.to_owned(),
            v1: Vec::new(),
            v2_enabled: Vec::new(),
        };
        match d.hierarchy.clone() {
            Hierarchy::V1 { root } => {
                for c in V1_CONTROLLERS {
                    let dir = root.join(c);
                    if dir.is_dir() {
                        d.v1.push((c, dir));
                    }
                }
                if d.v1.is_empty() {
                    return Err(SandboxError::ControllerMissing {
                        controller: "memory",
                        path: root,
                        what: "a cgroup v1 hierarchy",
                    });
                }
                for dir in d.v1_unique_roots() {
                    let mut p = dir;
                    for part in base.split('/').chain([run_id]) {
                        p.push(part);
                        mkdir(&p)?;
                    }
                }
            }
            Hierarchy::V2 { root } => {
                let available_path = root.join("cgroup.controllers");
                let available = read(&available_path).ok_or_else(|| SandboxError::Read {
                    path: available_path.clone(),
                    source: std::io::Error::from(ErrorKind::NotFound),
                })?;
                let available: Vec<&str> = available.split_whitespace().collect();
                d.v2_enabled = V2_CONTROLLERS
                    .into_iter()
                    .filter(|c| available.contains(c))
                    .collect();
                let mut level = root.clone();
                d.enable_v2(&level)?;
                for part in base.split('/').chain([run_id]) {
                    level.push(part);
                    mkdir(&level)?;
                    d.enable_v2(&level)?;
                }
            }
        }
        Ok(d)
    }

    /// Writes `+c` for each needed controller not yet in `level/cgroup.subtree_control`.
    fn enable_v2(&self, level: &Path) -> Result<(), SandboxError> {
        let file = level.join("cgroup.subtree_control");
        let current = read(&file).unwrap_or_default();
        let current: Vec<&str> = current.split_whitespace().collect();
        let missing: Vec<String> = self
            .v2_enabled
            .iter()
            .filter(|c| !current.contains(c))
            .map(|c| format!("+{c}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        write(&file, &missing.join(" "))
    }

    /// One directory per distinct v1 hierarchy (`cpu` and `cpuacct` are often the same,
    /// mounted together and linked).
    fn v1_unique_roots(&self) -> Vec<PathBuf> {
        let mut seen = BTreeSet::new();
        self.v1
            .iter()
            .filter(|(_, dir)| seen.insert(std::fs::canonicalize(dir).unwrap_or(dir.clone())))
            .map(|(_, dir)| dir.clone())
            .collect()
    }

    pub fn version(&self) -> u8 {
        match self.hierarchy {
            Hierarchy::V1 { .. } => 1,
            Hierarchy::V2 { .. } => 2,
        }
    }

    /// `<base>` under `top` (a v1 controller directory or the v2 root).
    fn base_dir(&self, top: &Path) -> PathBuf {
        let mut p = top.to_owned();
        for part in self.base.split('/') {
            p.push(part);
        }
        p
    }

    /// `<base>/<run_id>` under `top`.
    fn run_dir(&self, top: &Path, run_id: &str) -> PathBuf {
        self.base_dir(top).join(run_id)
    }

    fn instance(&self, run_id: &str, name: &str) -> InstanceCgroup {
        match &self.hierarchy {
            Hierarchy::V1 { .. } => {
                let unique = self.v1_unique_roots();
                InstanceCgroup {
                    version: 1,
                    controllers: self
                        .v1
                        .iter()
                        .map(|(c, dir)| (*c, self.run_dir(dir, run_id).join(name)))
                        .collect(),
                    dirs: unique
                        .iter()
                        .map(|dir| self.run_dir(dir, run_id).join(name))
                        .collect(),
                }
            }
            Hierarchy::V2 { root } => InstanceCgroup {
                version: 2,
                controllers: Vec::new(),
                dirs: vec![self.run_dir(root, run_id).join(name)],
            },
        }
    }

    fn has_controller(&self, c: &str) -> bool {
        match self.hierarchy {
            Hierarchy::V1 { .. } => self.v1.iter().any(|(x, _)| *x == c),
            Hierarchy::V2 { .. } => self.v2_enabled.contains(&c),
        }
    }

    fn require(&self, controller: &'static str, what: &'static str) -> Result<(), SandboxError> {
        if self.has_controller(controller) {
            return Ok(());
        }
        let path = match &self.hierarchy {
            Hierarchy::V1 { root } => root.join(controller),
            Hierarchy::V2 { root } => root.join("cgroup.controllers"),
        };
        Err(SandboxError::ControllerMissing {
            controller,
            path,
            what,
        })
    }

    /// Creates `<base>/<run_id>/<name>` with `limits`. An existing empty cgroup of that name
    /// is reused (limits rewritten); one that still holds processes is an error.
    pub fn create(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<InstanceCgroup, SandboxError> {
        validate_name(name)?;
        validate_limits(limits)?;
        let v1 = self.version() == 1;
        if limits.memory_max.is_some() || limits.memory_high.is_some() {
            self.require("memory", "memory limits")?;
        }
        if limits.cpu_cores.is_some() || limits.cpu_weight.is_some() {
            self.require("cpu", "cpu limits")?;
        }
        if limits.pids_max.is_some() {
            self.require("pids", "pids_max")?;
        }
        if !limits.io.is_empty() {
            self.require(if v1 { "blkio" } else { "io" }, "io limits")?;
        }
        let cg = self.instance(&self.run_id, name);
        let mut created = Vec::new();
        for dir in &cg.dirs {
            match mkdir(dir) {
                Ok(true) => created.push(dir.clone()),
                Ok(false) => {}
                Err(e) => {
                    remove_dirs(&created);
                    return Err(e);
                }
            }
        }
        let busy = cg.pids();
        if !busy.is_empty() {
            return Err(SandboxError::CgroupBusy {
                path: cg.path(),
                pids: busy,
            });
        }
        let applied = if v1 {
            cg.apply_v1(limits)
        } else {
            cg.apply_v2(limits)
        };
        if let Err(e) = applied {
            remove_dirs(&created);
            return Err(e);
        }
        Ok(cg)
    }

    /// Cleans up after tqproxy runs that died without doing it: every sibling of our run dir
    /// under `<base>` whose name is a pid that is no longer alive has its processes killed and
    /// its cgroups removed. Returns the run ids cleaned. Errors are skipped (best effort: it
    /// runs at startup, and a leftover must not stop tqproxy).
    ///
    /// A run id whose pid has been reused by an unrelated live process is left alone.
    pub fn cleanup_stale(&self) -> Vec<String> {
        let tops: Vec<PathBuf> = match &self.hierarchy {
            Hierarchy::V1 { .. } => self.v1_unique_roots(),
            Hierarchy::V2 { root } => vec![root.clone()],
        };
        let mut stale = BTreeSet::new();
        for top in &tops {
            let Ok(entries) = std::fs::read_dir(self.base_dir(top)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                match name.parse::<i32>() {
                    Ok(pid) if is_dir && pid > 0 && name != self.run_id && !pid_alive(pid) => {
                        stale.insert(name);
                    }
                    _ => {}
                }
            }
        }
        for run_id in &stale {
            let mut names = BTreeSet::new();
            for top in &tops {
                if let Ok(entries) = std::fs::read_dir(self.run_dir(top, run_id)) {
                    for e in entries.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            names.insert(e.file_name().to_string_lossy().into_owned());
                        }
                    }
                }
            }
            for name in &names {
                let cg = self.instance(run_id, name);
                let _ = cg.kill_all();
                let _ = cg.remove();
            }
            let run_dirs: Vec<PathBuf> = tops.iter().map(|t| self.run_dir(t, run_id)).collect();
            remove_dirs(&run_dirs);
        }
        stale.into_iter().collect()
    }

    /// Removes `<base>/<run_id>`, and `<base>` when nothing else is in it. Call it after every
    /// instance cgroup is removed.
    pub fn remove(&self) -> Result<(), SandboxError> {
        let tops: Vec<PathBuf> = match &self.hierarchy {
            Hierarchy::V1 { .. } => self.v1_unique_roots(),
            Hierarchy::V2 { root } => vec![root.clone()],
        };
        for top in &tops {
            let run = self.run_dir(top, &self.run_id);
            rmdir_retry(&run)?;
            // <base> (and its parents inside the hierarchy) only if empty: other tqproxy runs
            // may share it.
            let mut p = run.parent().map(Path::to_owned);
            while let Some(dir) = p {
                if dir == *top || std::fs::remove_dir(&dir).is_err() {
                    break;
                }
                p = dir.parent().map(Path::to_owned);
            }
        }
        Ok(())
    }
}

fn validate_limits(l: &CgroupLimits) -> Result<(), SandboxError> {
    let bad = |what, value: String, reason| {
        Err(SandboxError::InvalidLimit {
            what,
            value,
            reason,
        })
    };
    if l.memory_max == Some(0) {
        return bad("memory_max", "0".into(), "must be > 0");
    }
    if l.memory_high == Some(0) {
        return bad("memory_high", "0".into(), "must be > 0");
    }
    if let Some(c) = l.cpu_cores
        && !(c.is_finite() && (0.01..=100_000.0).contains(&c))
    {
        return bad(
            "cpu_cores",
            c.to_string(),
            "must be between 0.01 and 100000",
        );
    }
    if let Some(w) = l.cpu_weight
        && !(1..=10_000).contains(&w)
    {
        return bad("cpu_weight", w.to_string(), "must be between 1 and 10000");
    }
    if l.pids_max == Some(0) {
        return bad("pids_max", "0".into(), "must be > 0");
    }
    for io in &l.io {
        let values = [io.read_bps, io.write_bps, io.read_iops, io.write_iops];
        if values.iter().all(Option::is_none) {
            return bad(
                "io",
                format!("{}:{}", io.device.0, io.device.1),
                "sets no limit",
            );
        }
        if values.contains(&Some(0)) {
            return bad(
                "io",
                format!("{}:{}", io.device.0, io.device.1),
                "a limit is 0",
            );
        }
    }
    Ok(())
}

fn remove_dirs(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

/// rmdir, retrying on EBUSY (a dying process can keep a cgroup busy for a moment). A missing
/// directory is fine.
fn rmdir_retry(dir: &Path) -> Result<(), SandboxError> {
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(POLL);
            }
            Err(source) => {
                return Err(SandboxError::RemoveDir {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
    }
}

/// The cgroup of one instance.
#[derive(Debug, Clone)]
pub struct InstanceCgroup {
    version: u8,
    /// v1: each controller with its directory (several may share one directory).
    controllers: Vec<(&'static str, PathBuf)>,
    /// The distinct directories: one per v1 hierarchy, or the v2 one.
    dirs: Vec<PathBuf>,
}

impl InstanceCgroup {
    /// The `cgroup.procs` files the helper writes `0` into (v1: one per hierarchy; v2: one).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The v1 directory of `controller`, or the v2 directory.
    fn dir_of(&self, controller: &str) -> Option<&Path> {
        if self.version == 2 {
            return self.dirs.first().map(PathBuf::as_path);
        }
        self.controllers
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, d)| d.as_path())
    }

    fn file(&self, controller: &str, name: &str) -> Option<PathBuf> {
        self.dir_of(controller).map(|d| d.join(name))
    }

    /// For status and logs: the v1 memory directory (else the first), or the v2 directory.
    pub fn path(&self) -> PathBuf {
        self.dir_of("memory")
            .or(self.dirs.first().map(PathBuf::as_path))
            .map(Path::to_owned)
            .unwrap_or_default()
    }

    /// Every process in the cgroup and in cgroups below it (a worker may create some), sorted.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = BTreeSet::new();
        let mut stack: Vec<PathBuf> = self.dirs.clone();
        while let Some(dir) = stack.pop() {
            if let Some(s) = read(&dir.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        out.into_iter().collect()
    }

    fn apply_v1(&self, l: &CgroupLimits) -> Result<(), SandboxError> {
        let f = |c: &str, name: &str| self.file(c, name).expect("controller checked by create");
        if let Some(m) = l.memory_max {
            let limit = f("memory", "memory.limit_in_bytes");
            let memsw = f("memory", "memory.memsw.limit_in_bytes");
            let value = m.to_string();
            // The kernel keeps memsw >= limit_in_bytes (EINVAL otherwise): lowering, memsw is
            // written last; raising above the current memsw (a reused cgroup), first.
            if !memsw.exists() {
                write(&limit, &value)?;
            } else if read_u64(&memsw).is_some_and(|current| m > current) {
                write(&memsw, &value)?;
                write(&limit, &value)?;
            } else {
                write(&limit, &value)?;
                write(&memsw, &value)?;
            }
        }
        if let Some(h) = l.memory_high {
            write(&f("memory", "memory.soft_limit_in_bytes"), &h.to_string())?;
        }
        if let Some(c) = l.cpu_cores {
            write(&f("cpu", "cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&f("cpu", "cpu.cfs_quota_us"), &cpu_quota(c).to_string())?;
        }
        if let Some(w) = l.cpu_weight {
            write(
                &f("cpu", "cpu.shares"),
                &(w * 1024 / 100).max(2).to_string(),
            )?;
        }
        if let Some(p) = l.pids_max {
            write(&f("pids", "pids.max"), &p.to_string())?;
        }
        for io in &l.io {
            let (ma, mi) = io.device;
            for (v, file) in [
                (io.read_bps, "blkio.throttle.read_bps_device"),
                (io.write_bps, "blkio.throttle.write_bps_device"),
                (io.read_iops, "blkio.throttle.read_iops_device"),
                (io.write_iops, "blkio.throttle.write_iops_device"),
            ] {
                if let Some(v) = v {
                    write(&f("blkio", file), &format!("{ma}:{mi} {v}"))?;
                }
            }
        }
        Ok(())
    }

    fn apply_v2(&self, l: &CgroupLimits) -> Result<(), SandboxError> {
        let dir = &self.dirs[0];
        if let Some(m) = l.memory_max {
            write(&dir.join("memory.max"), &m.to_string())?;
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        if let Some(h) = l.memory_high {
            write(&dir.join("memory.high"), &h.to_string())?;
        }
        if let Some(c) = l.cpu_cores {
            write(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", cpu_quota(c)),
            )?;
        }
        if let Some(w) = l.cpu_weight {
            write(&dir.join("cpu.weight"), &w.to_string())?;
        }
        if let Some(p) = l.pids_max {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        for io in &l.io {
            let (ma, mi) = io.device;
            let mut line = format!("{ma}:{mi}");
            for (v, key) in [
                (io.read_bps, "rbps"),
                (io.write_bps, "wbps"),
                (io.read_iops, "riops"),
                (io.write_iops, "wiops"),
            ] {
                if let Some(v) = v {
                    line.push_str(&format!(" {key}={v}"));
                }
            }
            write(&dir.join("io.max"), &line)?;
        }
        Ok(())
    }

    /// Kills every process in the cgroup (and below), including ones that fork meanwhile, and
    /// waits until it is empty (at most 2 s, then [`SandboxError::KillTimeout`]).
    ///
    /// v2: `cgroup.kill` where the kernel has it (5.14+); else freeze (`cgroup.freeze`, wait
    /// for `frozen 1` in `cgroup.events`), SIGKILL each pid, thaw. v1: freeze with the freezer
    /// controller (`freezer.state` FROZEN, polled), SIGKILL each pid, THAWED; without a freezer,
    /// SIGKILL repeatedly. Processes killed are not reaped here: the instance's parent does.
    pub fn kill_all(&self) -> Result<(), SandboxError> {
        self.kill_all_with(true)
    }

    /// `kill_all`, optionally ignoring `cgroup.kill` (tests of the v2 freeze path).
    fn kill_all_with(&self, use_cgroup_kill: bool) -> Result<(), SandboxError> {
        let start = Instant::now();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= KILL_TIMEOUT {
                return Err(SandboxError::KillTimeout {
                    path: self.path(),
                    pids,
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            self.kill_round(&pids, use_cgroup_kill)?;
            std::thread::sleep(POLL);
        }
    }

    fn kill_round(&self, pids: &[i32], use_cgroup_kill: bool) -> Result<(), SandboxError> {
        let kill_each = |pids: &[i32]| {
            for &p in pids {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        };
        if self.version == 2 {
            let dir = &self.dirs[0];
            let kill_file = dir.join("cgroup.kill");
            if use_cgroup_kill && kill_file.exists() {
                return write(&kill_file, "1");
            }
            let freeze = dir.join("cgroup.freeze");
            write(&freeze, "1")?;
            self.wait_until(|| keyed(&dir.join("cgroup.events"), "frozen") == Some(1));
            kill_each(&self.pids());
            write(&freeze, "0")
        } else if let Some(state) = self.file("freezer", "freezer.state") {
            write(&state, "FROZEN")?;
            self.wait_until(|| read(&state).is_some_and(|s| s.trim() == "FROZEN"));
            kill_each(&self.pids());
            write(&state, "THAWED")
        } else {
            kill_each(pids);
            Ok(())
        }
    }

    fn wait_until(&self, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        while !done() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
    }

    /// Removes the cgroup directories (children first), retrying briefly on EBUSY.
    pub fn remove(&self) -> Result<(), SandboxError> {
        for dir in &self.dirs {
            remove_tree(dir)?;
        }
        Ok(())
    }

    /// Memory in use, bytes (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub fn memory_current(&self) -> Option<u64> {
        let name = if self.version == 1 {
            "memory.usage_in_bytes"
        } else {
            "memory.current"
        };
        read_u64(&self.file("memory", name)?)
    }

    /// CPU time used (v1 `cpuacct.usage`, ns; v2 `usage_usec` of `cpu.stat`).
    pub fn cpu_usage(&self) -> Option<Duration> {
        if self.version == 1 {
            read_u64(&self.file("cpuacct", "cpuacct.usage")?).map(Duration::from_nanos)
        } else {
            keyed(&self.file("cpu", "cpu.stat")?, "usage_usec").map(Duration::from_micros)
        }
    }

    /// OOM kills in this cgroup (`oom_kill` of v1 `memory.oom_control`, v2 `memory.events`).
    pub fn oom_kills(&self) -> Option<u64> {
        let name = if self.version == 1 {
            "memory.oom_control"
        } else {
            "memory.events"
        };
        keyed(&self.file("memory", name)?, "oom_kill")
    }

    /// Processes and threads counted against `pids_max` (`pids.current`).
    pub fn pids_current(&self) -> Option<u64> {
        read_u64(&self.file("pids", "pids.current")?)
    }
}

fn remove_tree(dir: &Path) -> Result<(), SandboxError> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path())?;
            }
        }
    }
    rmdir_retry(dir)
}

fn cpu_quota(cores: f64) -> u64 {
    ((cores * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

#[cfg(test)]
mod tests;
