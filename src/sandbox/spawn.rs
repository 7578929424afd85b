//! The parent side: starts the helper from tqproxy's multi-threaded runtime.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;

use super::{HELPER_ARG, SPEC_ENV, SandboxError, SpawnSpec, check_consistency};

/// The fd a listening socket is passed on (systemd's `SD_LISTEN_FDS_START`).
pub(crate) const LISTEN_FD: RawFd = 3;

/// Set in the helper's environment: no eager arena commit by mimalloc (see [`Spawner::spawn`]).
pub(crate) const HELPER_ALLOCATOR_ENV: (&str, &str) = ("MIMALLOC_ARENA_EAGER_COMMIT", "0");

/// Where the instance's output goes and the socket it serves on.
pub struct SpawnIo {
    pub stdout: Stdio,
    pub stderr: Stdio,
    /// The instance's listening socket, passed as fd 3. Ownership moves to the instance:
    /// tqproxy's copy is closed once the helper runs (dup it first to keep one).
    pub listen: Option<OwnedFd>,
}

/// Starts sandboxed instances through the `tqproxy __sandbox` helper.
#[derive(Debug, Clone)]
pub struct Spawner {
    helper_exe: PathBuf,
}

impl Spawner {
    /// The running executable (`/proc/self/exe`): tqproxy spawns itself as the helper.
    pub fn current() -> Self {
        Self::with_exe("/proc/self/exe")
    }

    /// A given helper executable (tests: a binary whose `main` dispatches [`super::HELPER_ARG`]
    /// to [`super::helper_main`] first thing).
    pub fn with_exe(path: impl Into<PathBuf>) -> Self {
        Self {
            helper_exe: path.into(),
        }
    }

    /// Starts one instance: the helper applies `spec` and execs the worker.
    ///
    /// The returned child's pid is the worker's (no pid namespace) or the relay's (pid
    /// namespace); either way it leads the instance's process group: signal it with
    /// [`super::signal_group`], and its exit status is the worker's. `kill_on_drop` is off.
    ///
    /// **Call this from a long-lived thread** (the supervisor's runtime thread), never from
    /// `spawn_blocking` or another short-lived thread: the helper's parent-death signal fires
    /// when the *thread* that forked it exits, which would SIGKILL the instance.
    ///
    /// Errors here are about starting the helper; errors applying the sandbox show up as exit
    /// status [`super::HELPER_FAILED`] and a `tqproxy-sandbox:` line on the instance's stderr.
    pub fn spawn(
        &self,
        spec: &SpawnSpec,
        io: SpawnIo,
    ) -> Result<tokio::process::Child, SandboxError> {
        check_consistency(spec)?;
        if spec.listen_fd != io.listen.is_some() {
            return Err(SandboxError::InvalidSpec(format!(
                "spec.listen_fd is {} but a listening socket was {}given",
                spec.listen_fd,
                if io.listen.is_some() { "" } else { "not " }
            )));
        }
        let json = serde_json::to_string(spec).map_err(SandboxError::EncodeSpec)?;
        // The child's stdio is set up (dup2 onto 0-2) before `pre_exec` runs: a listening
        // socket on fd 0-2 would be overwritten, so move it to a number >= 3 first
        // (try_clone uses F_DUPFD_CLOEXEC from 3).
        let listen = match io.listen {
            Some(fd) if fd.as_raw_fd() < LISTEN_FD => {
                Some(fd.try_clone().map_err(|source| SandboxError::SpawnHelper {
                    exe: self.helper_exe.clone(),
                    source,
                })?)
            }
            other => other,
        };
        let listen_raw = listen.as_ref().map(|fd| fd.as_raw_fd());
        let parent = std::process::id() as libc::pid_t;

        let mut cmd = tokio::process::Command::new(&self.helper_exe);
        cmd.arg(HELPER_ARG)
            .env_clear()
            .env(SPEC_ENV, json)
            // tqproxy's allocator (mimalloc, src/main.rs) commits its first arena eagerly, on
            // huge pages where it can: 4 MiB resident in a helper that allocates a few KiB, and
            // with a pid namespace the relay and init keep theirs for the instance's lifetime
            // (measured: 4.6 MiB anonymous each, 0.75 MiB without). This reaches the helper
            // only: the worker's environment is `spec.env`.
            .env(HELPER_ALLOCATOR_ENV.0, HELPER_ALLOCATOR_ENV.1)
            .stdin(Stdio::null())
            .stdout(io.stdout)
            .stderr(io.stderr)
            .kill_on_drop(false);
        // SAFETY: the closure runs in the child between fork and exec of a multi-threaded
        // process; `child_setup` only issues async-signal-safe raw syscalls and allocates
        // nothing (see there).
        unsafe {
            cmd.pre_exec(move || child_setup(listen_raw, parent));
        }
        let child = cmd.spawn().map_err(|source| SandboxError::SpawnHelper {
            exe: self.helper_exe.clone(),
            source,
        });
        // The helper has its own copy on fd 3 now; ours closes here.
        drop(listen);
        child
    }
}

/// Runs in the forked child before exec of the helper: only raw syscalls (dup2, fcntl, prctl,
/// getppid, _exit), no allocation, no locks.
fn child_setup(listen: Option<RawFd>, parent: libc::pid_t) -> io::Result<()> {
    if let Some(fd) = listen {
        if fd == LISTEN_FD {
            // dup2(3, 3) is a no-op that would leave FD_CLOEXEC set: clear it by hand.
            super::sys::set_cloexec(fd, false)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        } else {
            // SAFETY: dup2 on two integer fds touches no memory; the new fd 3 has no
            // FD_CLOEXEC.
            if unsafe { libc::dup2(fd, LISTEN_FD) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The parent may have died between fork and prctl: then the signal will never come.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        super::sys::exit_now(1);
    }
    Ok(())
}
