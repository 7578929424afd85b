//! The sandbox: the only module with `unsafe`.
//!
//! tqproxy never applies isolation inside its own multi-threaded process. The supervisor
//! describes an instance's sandbox as a [`SpawnSpec`] and calls [`spawn`], which starts
//! `tqproxy` itself again (`/proc/self/exe __sandbox`) as a single-threaded helper. Between
//! fork and exec of that helper only raw syscalls run (`dup2` of the listening socket to fd 3,
//! `prctl(PR_SET_PDEATHSIG)`). The helper ([`helper_main`]) then applies, in this order, and
//! execs the worker:
//!
//! 1. join the instance's cgroup (write `0` to every `cgroup.procs` in the spec)
//! 2. rlimits (`RLIMIT_NOFILE`, `RLIMIT_CORE` = 0 unless configured, …)
//! 3. `setsid` (own process group, so the whole tree can be signalled without cgroups)
//! 4. namespaces (+ mounts, hostname, `lo` up); with a pid namespace the helper forks a tiny
//!    init that is PID 1, forwards signals and reaps
//! 5. setgroups → setgid → setuid; parent-death signal again (credential changes clear it)
//! 6. no_new_privs, landlock, seccomp (last: it must still allow `execve`)
//!
//! Cgroups are created and removed by the parent through [`cgroup`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Name of the hidden subcommand that runs [`helper_main`].
pub const HELPER_ARG: &str = "__sandbox";

/// Exit status of the helper when it could not apply the sandbox or exec the worker. The
/// reason is written to stderr (which is the instance's log) on one line starting with
/// `tqproxy-sandbox:`.
pub const HELPER_FAILED: i32 = 121;

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

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceSpec {
    pub mount: bool,
    pub pid: bool,
    pub ipc: bool,
    pub uts: bool,
    pub net: bool,
    pub user: bool,
}

impl NamespaceSpec {
    pub fn any(&self) -> bool {
        self.mount || self.pid || self.ipc || self.uts || self.net || self.user
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MountSpec {
    /// Remount the whole tree read-only (recursively).
    pub read_only_root: bool,
    /// A fresh tmpfs on /tmp (and /var/tmp).
    pub private_tmp: bool,
    /// Paths bind-mounted read-write on top of the read-only root (created by the supervisor).
    pub read_write: Vec<PathBuf>,
    /// Paths made read-only even when the root is not.
    pub read_only: Vec<PathBuf>,
    /// Paths hidden behind an empty read-only tmpfs (other workers' directories, tqproxy's run
    /// and config directories). Paths that do not exist are skipped.
    pub hide: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LandlockSpec {
    pub read_write: Vec<PathBuf>,
    pub read_only: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub enum SeccompSpec {
    #[default]
    Off,
    /// tqproxy's built-in deny-list, returning EPERM.
    Default,
    /// A profile in the OCI/Docker JSON format.
    Profile(PathBuf),
}

// --- TEMPORARY minimal implementation (replaced by the full sandbox module) ---------------
pub mod cgroup;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    Io(String),
}

pub struct SpawnIo {
    pub stdout: std::process::Stdio,
    pub stderr: std::process::Stdio,
    pub listen: Option<OwnedFd>,
}

pub struct Spawner {
    helper_exe: PathBuf,
}

impl Spawner {
    pub fn current() -> Spawner {
        Spawner {
            helper_exe: PathBuf::from("/proc/self/exe"),
        }
    }
    pub fn with_exe(p: &Path) -> Spawner {
        Spawner {
            helper_exe: p.to_path_buf(),
        }
    }
    pub fn spawn(
        &self,
        spec: &SpawnSpec,
        io: SpawnIo,
    ) -> Result<tokio::process::Child, SandboxError> {
        let json = serde_json::to_string(spec).map_err(|e| SandboxError::Io(e.to_string()))?;
        let mut cmd = tokio::process::Command::new(&self.helper_exe);
        cmd.arg(HELPER_ARG)
            .env_clear()
            .env("TQPROXY_SANDBOX_SPEC", json)
            .stdin(std::process::Stdio::null())
            .stdout(io.stdout)
            .stderr(io.stderr)
            .kill_on_drop(false);
        let listen = io.listen.map(|f| f.as_raw_fd());
        let parent = std::process::id() as i32;
        // SAFETY: only async-signal-safe raw syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = listen {
                    if fd == 3 {
                        let flags = libc::fcntl(3, libc::F_GETFD);
                        libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    } else if libc::dup2(fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        cmd.spawn()
            .map_err(|e| SandboxError::Io(format!("spawn helper: {e}")))
    }
}

pub fn check_seccomp(_spec: &SeccompSpec) -> Result<(), SandboxError> {
    Ok(())
}

pub fn block_device_of(path: &Path) -> std::io::Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    let d = m.dev();
    Ok((libc::major(d), libc::minor(d)))
}

pub fn helper_main() -> ! {
    use std::os::unix::process::CommandExt;
    let spec: SpawnSpec = match std::env::var("TQPROXY_SANDBOX_SPEC")
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
    {
        Some(s) => s,
        None => {
            eprintln!("tqproxy-sandbox: spec: missing or invalid");
            std::process::exit(HELPER_FAILED);
        }
    };
    for p in &spec.cgroup_procs {
        if let Err(e) = std::fs::write(p, "0") {
            eprintln!("tqproxy-sandbox: join cgroup {}: {e}", p.display());
            std::process::exit(HELPER_FAILED);
        }
    }
    let _ = nix::unistd::setsid();
    let mut cmd = std::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd);
    if spec.listen_fd {
        cmd.env("LISTEN_FDS", "1")
            .env("LISTEN_PID", std::process::id().to_string());
    }
    let e = cmd.exec();
    eprintln!("tqproxy-sandbox: exec {}: {e}", spec.program.display());
    std::process::exit(HELPER_FAILED);
}
