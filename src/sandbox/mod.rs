//! The sandbox: the only module with `unsafe`.
//!
//! tqproxy never applies isolation inside its own multi-threaded process. The supervisor
//! describes an instance's sandbox as a [`SpawnSpec`] and calls [`Spawner::spawn`], which starts
//! `tqproxy` itself again (`/proc/self/exe __sandbox`) as a single-threaded helper. Between
//! fork and exec of that helper only raw syscalls run (`dup2` of the listening socket to fd 3,
//! `prctl(PR_SET_PDEATHSIG)`). The helper ([`helper_main`]) then applies, in this order, and
//! execs the worker:
//!
//! 1. join the instance's cgroup (write `0` to every `cgroup.procs` in the spec; on v1 to the
//!    sibling `tasks`, which moves the single thread without the kernel's global lock)
//! 2. rlimits (`RLIMIT_NOFILE`, `RLIMIT_CORE` = 0 unless configured, …)
//! 3. `setsid` (own session and process group)
//! 4. namespaces: the user namespace first (uid/gid maps written by a short-lived process
//!    outside), then mount, ipc, uts, net, pid in one `unshare`; mounts, hostname, `lo` up; with
//!    a pid namespace the helper forks a tiny init that is PID 1, forwards signals and reaps
//!    (see [Process tree](#process-tree))
//! 5. setgroups → setgid → setuid (in a user namespace: already root inside = the credentials
//!    outside); parent-death signal again (credential changes clear it)
//! 6. cwd, `LISTEN_FDS`/`LISTEN_PID`, no fd but 0-2 (and 3) survives exec, signals reset
//! 7. no_new_privs, 8. landlock, 9. seccomp (last: it must still allow `execve`), 10. execve
//!
//! Any failure writes one line `tqproxy-sandbox: <step>: <error>` to the instance's stderr and
//! exits with [`HELPER_FAILED`].
//!
//! Cgroups are created and removed by the parent through [`cgroup`].
//!
//! # Process tree
//!
//! Without a pid namespace the helper *becomes* the worker (it execs in place): the pid the
//! supervisor got from [`Spawner::spawn`] is the worker's, and it leads its own process group.
//!
//! With a pid namespace, `unshare(CLONE_NEWPID)` only affects children, so the tree is
//!
//! ```text
//! tqproxy ── relay (the spawned pid; own process group)
//!              └─ init (PID 1 in the namespace; own process group)
//!                   └─ worker (PID 2; own process group, shared with its children)
//! ```
//!
//! * The relay forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to init, init
//!   forwards them to the worker's process group. Each of the three leads its own process
//!   group, so [`signal_group`]`(child.id(), sig)` delivers `sig` **exactly once** to the
//!   worker's group in both modes (a shared group would deliver it once directly and again
//!   through each forwarder).
//! * The relay exits with the worker's exit code, or re-raises the worker's fatal signal on
//!   itself, so the supervisor sees the same wait status in both modes.
//! * SIGKILL of the relay kills init (parent-death signal), and when init dies the kernel kills
//!   every process of the namespace: nothing an instance started can outlive it.
//! * The relay and init are processes of the instance's cgroup: a `pids` limit counts them.

mod fs_rules;
mod helper;
mod mounts;
mod seccomp;
mod spawn;
mod sys;

pub mod cgroup;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use helper::helper_main;
pub use seccomp::{DEFAULT_DENY, check_seccomp};
pub use spawn::{SpawnIo, Spawner};
pub use sys::default_sigpipe;

/// Name of the hidden subcommand that runs [`helper_main`].
pub const HELPER_ARG: &str = "__sandbox";

/// Exit status of the helper when it could not apply the sandbox or exec the worker. The
/// reason is written to stderr (which is the instance's log) on one line starting with
/// `tqproxy-sandbox:`.
pub const HELPER_FAILED: i32 = 121;

/// Environment variable that carries the [`SpawnSpec`] (JSON) from [`Spawner::spawn`] to
/// [`helper_main`]. The helper removes it; the worker's environment is `SpawnSpec::env` only.
pub const SPEC_ENV: &str = "TQPROXY_SANDBOX_SPEC";

/// Everything the helper needs to start one instance. Built by the supervisor from a worker's
/// validated config; every path is absolute.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SpawnSpec {
    /// Absolute path of the program to exec.
    pub program: PathBuf,
    /// argv[1..].
    pub args: Vec<String>,
    /// The complete environment of the worker (tqproxy's own environment is not inherited).
    pub env: Vec<(String, String)>,
    /// Working directory of the worker.
    pub cwd: PathBuf,
    /// `cgroup.procs` files the helper writes itself into, first of all.
    pub cgroup_procs: Vec<PathBuf>,
    pub rlimits: RlimitSpec,
    /// The CPU scheduling policy the worker runs under (inherited by its children).
    #[serde(default)]
    pub cpu_scheduling: CpuScheduling,
    pub namespaces: NamespaceSpec,
    /// Hostname inside a uts namespace.
    pub hostname: Option<String>,
    /// Filesystem view inside a mount namespace.
    pub mounts: MountSpec,
    /// Credentials to switch to; `None` keeps tqproxy's (root in production).
    pub credentials: Option<Credentials>,
    /// Landlock rules; `None` = landlock off.
    pub landlock: Option<LandlockSpec>,
    pub seccomp: SeccompSpec,
    /// fd 3 is the instance's listening socket: set `LISTEN_FDS=1` and `LISTEN_PID` to the pid
    /// of the process that execs the worker.
    pub listen_fd: bool,
}

/// A worker's CPU scheduling policy (systemd's `CPUSchedulingPolicy=`), all at priority 0.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CpuScheduling {
    /// SCHED_OTHER: the kernel's default.
    #[default]
    Other,
    /// SCHED_BATCH: like `other`, but a wake-up does not preempt the running task. Woken by
    /// the front end with a request, the worker runs once the front end waits, instead of
    /// interrupting it halfway through forwarding a burst.
    Batch,
    /// SCHED_IDLE: only when nothing else wants the CPU.
    Idle,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RlimitSpec {
    /// RLIMIT_NOFILE (soft = hard).
    pub open_files: Option<u64>,
    /// RLIMIT_CORE in bytes; 0 (no core dumps) unless configured.
    pub core: u64,
    /// RLIMIT_AS in bytes.
    pub address_space: Option<u64>,
    /// RLIMIT_FSIZE in bytes.
    pub file_size: Option<u64>,
}

/// Namespaces to unshare. A pid namespace implies a mount namespace (the worker gets a fresh
/// `/proc` that shows its own pids), whatever `mount` says.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceSpec {
    pub mount: bool,
    pub pid: bool,
    pub ipc: bool,
    pub uts: bool,
    pub net: bool,
    /// A user namespace whose root is `credentials` outside (`0 <uid> 1`, `0 <gid> 1`,
    /// `setgroups` denied); without credentials, tqproxy's own ids (root in production, which
    /// gains little: set credentials). The worker runs as uid/gid 0 inside, with capabilities
    /// over its own namespaces only; the other namespaces are owned by it.
    pub user: bool,
}

impl NamespaceSpec {
    pub fn any(&self) -> bool {
        self.mount || self.pid || self.ipc || self.uts || self.net || self.user
    }

    /// Whether the helper creates a mount namespace: asked for, or implied by `pid`.
    pub fn needs_mount_ns(&self) -> bool {
        self.mount || self.pid
    }
}

/// Applied only inside a mount namespace ([`NamespaceSpec::needs_mount_ns`]); outside one,
/// [`check_spec`] rejects a non-default `MountSpec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MountSpec {
    /// Remount the whole tree read-only (recursively). With a pid namespace, the fresh `/proc`
    /// keeps `/proc/sys`, `/proc/sysrq-trigger`, `/proc/irq`, `/proc/bus` and `/proc/fs`
    /// read-only too.
    pub read_only_root: bool,
    /// A fresh tmpfs (mode 1777, 64 MiB, nosuid, nodev) on /tmp, and on /var/tmp and /dev/shm
    /// where they exist.
    pub private_tmp: bool,
    /// Paths bind-mounted read-write on top of the read-only root (created by the supervisor).
    pub read_write: Vec<PathBuf>,
    /// Paths made read-only even when the root is not.
    pub read_only: Vec<PathBuf>,
    /// Paths hidden behind an empty read-only tmpfs (other workers' directories, tqproxy's run
    /// and config directories). Paths that do not exist are skipped.
    pub hide: Vec<PathBuf>,
}

impl MountSpec {
    fn is_empty(&self) -> bool {
        *self == MountSpec::default()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

/// Landlock rules on top of the base set every program needs (documented on
/// [`LANDLOCK_BASE`]), the program's directory and `cwd`. Rules apply *beneath* a path: a
/// `cwd` of `/` grants read + execute everywhere, so give workers their own directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LandlockSpec {
    /// Full access beneath these paths.
    pub read_write: Vec<PathBuf>,
    /// Read and execute beneath these paths.
    pub read_only: Vec<PathBuf>,
}

pub use fs_rules::{BaseAccess, LANDLOCK_BASE};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub enum SeccompSpec {
    #[default]
    Off,
    /// tqproxy's built-in deny-list, returning EPERM (see [`check_seccomp`] for the list).
    Default,
    /// A profile in the OCI/Docker JSON format.
    Profile(PathBuf),
}

/// Errors of the sandbox. Every variant names what it acted on: a path, a step, a value.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid spawn spec: {0}")]
    InvalidSpec(String),
    #[error("failed to encode the spawn spec: {0}")]
    EncodeSpec(#[source] serde_json::Error),
    #[error("failed to decode the spawn spec from {SPEC_ENV}: {0}")]
    DecodeSpec(String),
    #[error("failed to start the sandbox helper {exe}: {source}")]
    SpawnHelper {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write {value} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to remove directory {path}: {source}")]
    RemoveDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A system call of the helper failed: `what` names the call and its arguments.
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid limit {what} = {value}: {reason}")]
    InvalidLimit {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("cgroup controller {controller} is not available under {path} (needed for {what})")]
    ControllerMissing {
        controller: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("cgroup delegation: {0}")]
    Delegation(String),
    #[error("cgroup {path} already exists and holds processes {pids:?}")]
    CgroupBusy { path: PathBuf, pids: Vec<i32> },
    #[error("processes {pids:?} still in cgroup {path} after {waited_ms} ms of killing")]
    KillTimeout {
        path: PathBuf,
        pids: Vec<i32>,
        waited_ms: u128,
    },
    #[error("seccomp profile {path}: {reason}")]
    SeccompProfile { path: PathBuf, reason: String },
    #[error("seccomp filter: {0}")]
    SeccompCompile(String),
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("credentials check failed: {0}")]
    Credentials(String),
    #[error("parent process {0} exited before the worker started")]
    ParentGone(i32),
    #[error("not supported: {0}")]
    Unsupported(&'static str),
}

impl SandboxError {
    pub(crate) fn sys(what: impl Into<String>, source: nix::Error) -> Self {
        SandboxError::Sys {
            what: what.into(),
            source,
        }
    }
}

/// Checks a spec without side effects, for `tqproxy check` and reload: consistency (absolute
/// paths, mounts only with a mount namespace, …), Landlock available when asked for, and the
/// seccomp filter compiles ([`check_seccomp`]). [`Spawner::spawn`] runs the same checks but
/// the seccomp one (the helper compiles the filter anyway, and reports a failure).
pub fn check_spec(spec: &SpawnSpec) -> Result<(), SandboxError> {
    check_consistency(spec)?;
    check_seccomp(&spec.seccomp)
}

fn check_consistency(spec: &SpawnSpec) -> Result<(), SandboxError> {
    let invalid = |m: String| Err(SandboxError::InvalidSpec(m));
    if !spec.program.is_absolute() {
        return invalid(format!(
            "program {} is not absolute",
            spec.program.display()
        ));
    }
    if !spec.cwd.is_absolute() {
        return invalid(format!("cwd {} is not absolute", spec.cwd.display()));
    }
    if !spec.namespaces.needs_mount_ns() && !spec.mounts.is_empty() {
        return invalid("mounts are set but neither a mount nor a pid namespace is".into());
    }
    if spec.hostname.is_some() && !spec.namespaces.uts {
        return invalid("hostname is set without a uts namespace".into());
    }
    let all_paths = spec
        .mounts
        .read_write
        .iter()
        .chain(&spec.mounts.read_only)
        .chain(&spec.mounts.hide)
        .chain(
            spec.landlock
                .iter()
                .flat_map(|l| l.read_write.iter().chain(&l.read_only)),
        );
    for p in all_paths {
        if !p.is_absolute() {
            return invalid(format!("path {} is not absolute", p.display()));
        }
    }
    if spec.mounts.private_tmp {
        let shadowed = spec.mounts.read_write.iter().chain(&spec.mounts.read_only);
        for p in shadowed {
            if ["/tmp", "/var/tmp", "/dev/shm"]
                .iter()
                .any(|t| p.starts_with(t))
            {
                return invalid(format!(
                    "{} is under a private tmp directory, which would cover it",
                    p.display()
                ));
            }
        }
    }
    for (k, _) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return invalid(format!("environment variable name {k:?}"));
        }
    }
    if spec.landlock.is_some() && landlock_supported().is_none() {
        return Err(SandboxError::Unsupported(
            "landlock (the running kernel does not provide it)",
        ));
    }
    Ok(())
}

/// The Landlock ABI version of the running kernel, or `None` when Landlock is not available.
pub fn landlock_supported() -> Option<i32> {
    sys::landlock_abi()
}

/// `killpg(pgid, sig)`, so the supervisor needs neither `unsafe` nor nix's process API.
///
/// Pass the pid of the spawned child: it leads the instance's process group. See the
/// [process tree](self#process-tree) for what the signal reaches.
pub fn signal_group(pgid: i32, sig: nix::sys::signal::Signal) -> nix::Result<()> {
    if pgid <= 1 {
        // killpg(0) would signal our own group, killpg(1) init's: never what is meant.
        return Err(nix::Error::EINVAL);
    }
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig)
}

/// The whole-disk `major:minor` of a block device node, or of the device holding the file
/// system of any other path: what cgroup io limits (`io.max`, `blkio.throttle.*`) take.
///
/// A partition (`/dev/vda1`, 254:1) resolves to its disk (254:0) through
/// `/sys/dev/block/MAJ:MIN/partition`. File systems without a block device (tmpfs, overlay,
/// proc: major 0) are an error.
pub fn block_device_of(path: &Path) -> io::Result<(u32, u32)> {
    block_device_in(path, Path::new("/sys/dev/block"))
}

fn block_device_in(path: &Path, sys_dev_block: &Path) -> io::Result<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path)?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if major == 0 {
        return Err(io::Error::other(format!(
            "{} is on a file system without a block device ({major}:{minor})",
            path.display()
        )));
    }
    let node = sys_dev_block.join(format!("{major}:{minor}"));
    if !node.join("partition").exists() {
        return Ok((major, minor));
    }
    // A partition: its sysfs directory sits inside its disk's directory.
    let disk_dev = std::fs::read_to_string(node.join("..").join("dev"))
        .map_err(|e| io::Error::new(e.kind(), format!("{}/../dev: {e}", node.display())))?;
    parse_major_minor(disk_dev.trim()).ok_or_else(|| {
        io::Error::other(format!(
            "{}/../dev: unexpected content {disk_dev:?}",
            node.display()
        ))
    })
}

fn parse_major_minor(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_device_of_root_is_a_whole_disk() {
        let (major, minor) = block_device_of(Path::new("/")).expect("root has a block device");
        assert!(major > 0);
        let node = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        assert!(node.exists(), "{} missing", node.display());
        assert!(
            !node.join("partition").exists(),
            "{major}:{minor} is a partition"
        );
    }

    #[test]
    fn block_device_of_tmpfs_fails() {
        // /dev/shm is a tmpfs on every Linux we run on.
        let err = block_device_of(Path::new("/dev/shm")).unwrap_err();
        assert!(err.to_string().contains("without a block device"), "{err}");
    }

    #[test]
    fn block_device_of_partition_resolves_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        // Fake sysfs: 8:0 disk with partition 8:1 inside it, like /sys/block/sda/sda1.
        let root = std::fs::metadata("/").unwrap();
        use std::os::unix::fs::MetadataExt;
        let (ma, mi) = (libc::major(root.dev()), libc::minor(root.dev()));
        let disk = dir.path().join("devices/sda");
        std::fs::create_dir_all(disk.join("sda1")).unwrap();
        std::fs::write(disk.join("dev"), "8:0\n").unwrap();
        std::fs::write(disk.join("sda1/partition"), "1\n").unwrap();
        std::os::unix::fs::symlink(disk.join("sda1"), dir.path().join(format!("{ma}:{mi}")))
            .unwrap();
        assert_eq!(block_device_in(Path::new("/"), dir.path()).unwrap(), (8, 0));
    }

    #[test]
    fn check_spec_rejects_inconsistent_specs() {
        let base = SpawnSpec {
            program: "/bin/true".into(),
            cwd: "/".into(),
            ..Default::default()
        };
        check_spec(&base).unwrap();
        let mut s = base.clone();
        s.program = "bin/true".into();
        assert!(check_spec(&s).unwrap_err().to_string().contains("bin/true"));
        let mut s = base.clone();
        s.mounts.private_tmp = true;
        assert!(check_spec(&s).unwrap_err().to_string().contains("mount"));
        s.namespaces.pid = true;
        check_spec(&s).unwrap();
        let mut s = base;
        s.env.push(("A=B".into(), "x".into()));
        assert!(check_spec(&s).unwrap_err().to_string().contains("A=B"));
    }

    #[test]
    fn signal_group_refuses_own_and_init_group() {
        use nix::sys::signal::Signal;
        assert_eq!(signal_group(0, Signal::SIGTERM), Err(nix::Error::EINVAL));
        assert_eq!(signal_group(1, Signal::SIGTERM), Err(nix::Error::EINVAL));
    }
}
