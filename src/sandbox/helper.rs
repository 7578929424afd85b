//! `tqproxy __sandbox`: the single-threaded helper that applies a [`SpawnSpec`] in a fixed
//! order and execs the worker (see the [module docs](super) for the order and the process
//! tree with a pid namespace).

use std::convert::Infallible;
use std::ffi::CString;
use std::io::Read as _;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::prctl;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{
    ForkResult, Gid, Pid, Uid, chdir, fork, getgid, getgroups, getpid, getppid, getresgid,
    getresuid, getuid, pipe2, setgid, setgroups, setpgid, setresgid, setresuid, setsid, setuid,
};

use super::spawn::LISTEN_FD;
use super::{
    Credentials, HELPER_FAILED, RlimitSpec, SPEC_ENV, SandboxError, SpawnSpec, fs_rules, mounts,
    seccomp, sys,
};

/// A failed step: printed as `tqproxy-sandbox: <step>: <error>`.
pub(crate) struct Failure {
    step: &'static str,
    error: SandboxError,
}

trait StepExt<T> {
    fn step(self, step: &'static str) -> Result<T, Failure>;
}

impl<T> StepExt<T> for Result<T, SandboxError> {
    fn step(self, step: &'static str) -> Result<T, Failure> {
        self.map_err(|error| Failure { step, error })
    }
}

/// `nix::Result` → `SandboxError::Sys` naming the call.
trait SysExt<T> {
    fn call(self, what: impl FnOnce() -> String) -> Result<T, SandboxError>;
}

impl<T> SysExt<T> for nix::Result<T> {
    fn call(self, what: impl FnOnce() -> String) -> Result<T, SandboxError> {
        self.map_err(|e| SandboxError::sys(what(), e))
    }
}

/// Signals the relay and init forward to the worker.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The forwarded signals plus SIGCHLD: blocked from the helper's start on, and waited for with
/// `sigwait` by the relay and init. The worker unblocks everything in step 6.
fn waited_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// The `tqproxy __sandbox` entry point. Call it first thing in `main`, before any thread
/// exists (no tokio runtime, no logger thread): it checks that the process is
/// single-threaded, since `unshare` and `fork` here rely on it.
///
/// Never returns: it execs the worker, becomes the relay of a pid namespace (and exits with
/// the worker's status), or exits with [`HELPER_FAILED`] after one `tqproxy-sandbox:` line on
/// stderr.
pub fn helper_main() -> ! {
    match run() {
        Ok(never) => match never {},
        Err(f) => fail(&f),
    }
}

fn fail(f: &Failure) -> ! {
    let line = format!("tqproxy-sandbox: {}: {}\n", f.step, f.error);
    sys::write_all_raw(2, line.as_bytes());
    sys::exit_now(HELPER_FAILED)
}

fn run() -> Result<Infallible, Failure> {
    // 0. Read the spec, make sure we are alone in this process, remove the spec from our
    //    environment, and put signals in a known state: default dispositions (tqproxy ignores
    //    SIGPIPE and exec keeps that), the forwarded signals and SIGCHLD blocked.
    ensure_single_threaded().step("start")?;
    let spec = read_spec().step("read spec")?;
    let original_parent = getppid();
    sys::reset_signal_dispositions();
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&waited_signals()), None)
        .call(|| "sigprocmask(SIG_SETMASK)".into())
        .step("start")?;

    // 1. Join the cgroup first, so that everything below is charged and limited.
    for path in &spec.cgroup_procs {
        join_cgroup(path).step("join cgroup")?;
    }

    // 2. Resource limits, and the CPU scheduling policy (inherited across exec and fork).
    apply_rlimits(&spec.rlimits).step("rlimits")?;
    sys::set_cpu_scheduling(spec.cpu_scheduling)
        .call(|| format!("sched_setscheduler({:?})", spec.cpu_scheduling))
        .step("cpu scheduling")?;

    // 3. New session and process group: the supervisor signals the group, and a terminal's
    //    Ctrl-C does not reach workers.
    setsid().call(|| "setsid()".into()).step("setsid")?;

    // Compile the seccomp filter now: before a mount namespace can hide the profile and before
    // any fork, so that the worker only installs it (no allocation at that point).
    let filter = seccomp::compile(&spec.seccomp).step("seccomp")?;

    // 4. Namespaces. The user namespace first, on its own: the others are then owned by it, and
    //    its uid/gid maps must be written (from outside) before anything else happens inside.
    let ns = spec.namespaces;
    if ns.user {
        user_namespace(&spec).step("user namespace")?;
        // The credential change cleared the parent-death signal set by the spawner.
        prctl::set_pdeathsig(Signal::SIGKILL)
            .call(|| "prctl(PR_SET_PDEATHSIG, SIGKILL)".into())
            .step("user namespace")?;
        if getppid() != original_parent {
            return Err(SandboxError::ParentGone(original_parent.as_raw())).step("user namespace");
        }
    }
    // A pid namespace implies a mount namespace, to mount a /proc that shows the namespace's
    // pids.
    let mut flags = CloneFlags::empty();
    if ns.needs_mount_ns() {
        flags |= CloneFlags::CLONE_NEWNS;
    }
    if ns.ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
    }
    if ns.uts {
        flags |= CloneFlags::CLONE_NEWUTS;
    }
    if ns.net {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if ns.pid {
        flags |= CloneFlags::CLONE_NEWPID;
    }
    if !flags.is_empty() {
        unshare(flags)
            .call(|| format!("unshare({flags:?})"))
            .step("namespaces")?;
    }
    let expected_parent = if ns.pid {
        // Forks twice; returns only in the worker, whose parent is init (pid 1).
        pid_namespace(&spec)?;
        Pid::from_raw(1)
    } else {
        // Mounts, hostname and loopback, right here in the process that becomes the worker.
        mounts::setup(&spec)?;
        original_parent
    };

    worker(&spec, filter, expected_parent)
}

/// Steps 5 to 10, in the process that becomes the worker.
fn worker(
    spec: &SpawnSpec,
    filter: Option<seccompiler::BpfProgram>,
    expected_parent: Pid,
) -> Result<Infallible, Failure> {
    // 5. Credentials: supplementary groups, gid, uid, in that order (setgid needs the
    //    privileges that setuid drops), then check that there is no way back.
    //    In a user namespace this happened in step 4 (root inside = the credentials outside):
    //    check it.
    if spec.namespaces.user {
        check_ids(Uid::from_raw(0), Gid::from_raw(0)).step("credentials")?;
    } else if let Some(c) = spec.credentials {
        switch_credentials(c).step("credentials")?;
    }
    // Parent-death signal again: a credential change clears it (we set it unconditionally,
    // it costs nothing). Then check that the parent did not die before that.
    prctl::set_pdeathsig(Signal::SIGKILL)
        .call(|| "prctl(PR_SET_PDEATHSIG, SIGKILL)".into())
        .step("credentials")?;
    if getppid() != expected_parent {
        return Err(SandboxError::ParentGone(expected_parent.as_raw())).step("credentials");
    }

    // 6. Working directory (after the credential change: the worker's user must be able to
    //    reach it), environment, fds, signals.
    chdir(&spec.cwd)
        .call(|| format!("chdir({})", spec.cwd.display()))
        .step("cwd")?;
    let exec = ExecArgs::new(spec, getpid()).step("exec")?;
    if spec.listen_fd {
        sys::set_cloexec(LISTEN_FD, false)
            .call(|| "fd 3 (listening socket) is not open: fcntl(3, F_SETFD)".into())
            .step("fds")?;
    }
    let first_closed = if spec.listen_fd {
        LISTEN_FD + 1
    } else {
        LISTEN_FD
    };
    sys::cloexec_from(first_closed)
        .call(|| format!("close_range({first_closed}, ~0, CLOSE_RANGE_CLOEXEC)"))
        .step("fds")?;
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .call(|| "sigprocmask(SIG_SETMASK, {})".into())
        .step("signals")?;

    // 7. no_new_privs: exec can no longer gain privileges (setuid binaries, file caps).
    prctl::set_no_new_privs()
        .call(|| "prctl(PR_SET_NO_NEW_PRIVS, 1)".into())
        .step("no_new_privs")?;

    // 8. Landlock.
    if let Some(l) = &spec.landlock {
        fs_rules::restrict(l, &spec.program, &spec.cwd).step("landlock")?;
    }

    // 9. Seccomp, last: from here on, no allocation (an allow-list profile may not allow
    //    brk/mmap) and failures are reported with raw writes.
    if let Some(prog) = &filter
        && let Err(e) = seccomp::install(prog)
    {
        sys::fail_noalloc("seccomp", c"install filter", e as i32);
    }

    // 10. Exec.
    let errno = exec.exec();
    sys::fail_noalloc("exec", &exec.program, errno)
}

/// Fails unless this process has exactly one thread: `unshare(CLONE_NEWNS)` and `fork` here
/// assume it.
fn ensure_single_threaded() -> Result<(), SandboxError> {
    let path = "/proc/self/task";
    let n = std::fs::read_dir(path)
        .map_err(|source| SandboxError::Read {
            path: path.into(),
            source,
        })?
        .count();
    if n == 1 {
        Ok(())
    } else {
        Err(SandboxError::InvalidSpec(format!(
            "the helper must be single-threaded but has {n} threads: call helper_main() \
             before starting any runtime"
        )))
    }
}

/// Moves this (single-threaded) process into the cgroup whose `cgroup.procs` is `procs`.
///
/// On v1 it writes `0` to the sibling `tasks` file instead: moving the calling thread alone
/// does not take the kernel's global `cgroup_threadgroup_rwsem` for writing, which
/// `cgroup.procs` does, and that write lock waits for an RCU grace period: measured 10-15 ms
/// per spawn here while namespaces of exited instances were being torn down (a rolling
/// restart), against well under 1 ms this way (load-tests/spawn-timing). With one thread,
/// the thread is the process, and children forked later are born in the cgroup. v2 has no
/// `tasks` file (and `cgroup.threads` only works in threaded subtrees): `cgroup.procs`.
fn join_cgroup(procs: &std::path::Path) -> Result<(), SandboxError> {
    let tasks = procs.with_file_name("tasks");
    let target =
        if procs.file_name() == Some(std::ffi::OsStr::new("cgroup.procs")) && tasks.is_file() {
            tasks
        } else {
            procs.to_path_buf()
        };
    std::fs::write(&target, "0").map_err(|source| SandboxError::Write {
        path: target,
        value: "0".into(),
        source,
    })
}

fn read_spec() -> Result<SpawnSpec, SandboxError> {
    let json = std::env::var(SPEC_ENV)
        .map_err(|e| SandboxError::DecodeSpec(format!("{SPEC_ENV}: {e}")))?;
    // SAFETY: the process is single-threaded (checked by ensure_single_threaded), so nothing
    // reads the environment concurrently.
    unsafe { std::env::remove_var(SPEC_ENV) };
    serde_json::from_str(&json).map_err(|e| SandboxError::DecodeSpec(e.to_string()))
}

fn apply_rlimits(r: &RlimitSpec) -> Result<(), SandboxError> {
    let set = |res: Resource, name: &str, v: u64| {
        setrlimit(res, v, v).call(|| format!("setrlimit({name}, {v})"))
    };
    if let Some(n) = r.open_files {
        set(Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE", n)?;
    }
    set(Resource::RLIMIT_CORE, "RLIMIT_CORE", r.core)?;
    if let Some(n) = r.address_space {
        set(Resource::RLIMIT_AS, "RLIMIT_AS", n)?;
    }
    if let Some(n) = r.file_size {
        set(Resource::RLIMIT_FSIZE, "RLIMIT_FSIZE", n)?;
    }
    Ok(())
}

fn switch_credentials(c: Credentials) -> Result<(), SandboxError> {
    let (uid, gid) = (Uid::from_raw(c.uid), Gid::from_raw(c.gid));
    setgroups(&[]).call(|| "setgroups([])".into())?;
    setgid(gid).call(|| format!("setgid({gid})"))?;
    setuid(uid).call(|| format!("setuid({uid})"))?;
    check_ids(uid, gid)?;
    if !uid.is_root() && setuid(Uid::from_raw(0)).is_ok() {
        return Err(SandboxError::Credentials(format!(
            "setuid(0) succeeded after switching to uid {uid}"
        )));
    }
    Ok(())
}

/// Real, effective and saved ids are `uid`/`gid`, and no supplementary group is left.
fn check_ids(uid: Uid, gid: Gid) -> Result<(), SandboxError> {
    let u = getresuid().call(|| "getresuid()".into())?;
    let g = getresgid().call(|| "getresgid()".into())?;
    if [u.real, u.effective, u.saved] != [uid; 3] || [g.real, g.effective, g.saved] != [gid; 3] {
        return Err(SandboxError::Credentials(format!(
            "wanted uid {uid} gid {gid}, have uid {}/{}/{} gid {}/{}/{}",
            u.real, u.effective, u.saved, g.real, g.effective, g.saved
        )));
    }
    let groups = getgroups().call(|| "getgroups()".into())?;
    if !groups.is_empty() {
        return Err(SandboxError::Credentials(format!(
            "supplementary groups {groups:?} remain after setgroups([])"
        )));
    }
    Ok(())
}

/// Step 4 for `user`: clears the supplementary groups (impossible once inside), unshares a
/// user namespace, has a process outside write `0 <uid> 1` / `0 <gid> 1` (`setgroups` denied)
/// with the spec's credentials (else our own ids), and becomes root of the namespace, which is
/// those credentials outside.
fn user_namespace(spec: &SpawnSpec) -> Result<(), SandboxError> {
    setgroups(&[]).call(|| "setgroups([])".into())?;
    let (uid, gid) = match spec.credentials {
        Some(c) => (c.uid, c.gid),
        None => (getuid().as_raw(), getgid().as_raw()),
    };
    let me = getpid();
    // helper → mapper: "unshared, go"; mapper → helper: an error message, if any.
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).call(|| "pipe2()".into())?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).call(|| "pipe2()".into())?;
    // SAFETY: the helper is single-threaded (ensure_single_threaded), so the child can run
    // arbitrary code after fork.
    match unsafe { fork() }.call(|| "fork() of the uid/gid mapper".into())? {
        ForkResult::Child => {
            drop(go_w);
            drop(err_r);
            let mut b = [0u8; 1];
            let code = match nix::unistd::read(go_r.as_fd(), &mut b) {
                Ok(1) => match write_id_maps(me, uid, gid) {
                    Ok(()) => 0,
                    Err(e) => {
                        sys::write_all_raw(err_w.as_raw_fd(), e.to_string().as_bytes());
                        HELPER_FAILED
                    }
                },
                // The helper could not unshare (or died): nothing to map.
                _ => HELPER_FAILED,
            };
            sys::exit_now(code)
        }
        ForkResult::Parent { child: mapper } => {
            drop(go_r);
            drop(err_w);
            let unshared =
                unshare(CloneFlags::CLONE_NEWUSER).call(|| "unshare(CLONE_NEWUSER)".into());
            if unshared.is_ok() {
                sys::write_all_raw(go_w.as_raw_fd(), b"1");
            }
            drop(go_w);
            let status = waitpid(mapper, None);
            unshared?;
            let mut msg = String::new();
            let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
            match status {
                Ok(WaitStatus::Exited(_, 0)) => {}
                _ if !msg.is_empty() => return Err(SandboxError::Credentials(msg)),
                other => {
                    return Err(SandboxError::Credentials(format!(
                        "the uid/gid mapper process ended with {other:?}"
                    )));
                }
            }
            // Root inside (the ids mapped above): gid first, while we may still change it.
            let zero_g = Gid::from_raw(0);
            setresgid(zero_g, zero_g, zero_g)
                .call(|| "setresgid(0, 0, 0) in the user namespace".into())?;
            let zero_u = Uid::from_raw(0);
            setresuid(zero_u, zero_u, zero_u)
                .call(|| "setresuid(0, 0, 0) in the user namespace".into())?;
            Ok(())
        }
    }
}

/// Written by the mapper, a process in the parent user namespace with CAP_SETUID and
/// CAP_SETGID there.
fn write_id_maps(pid: Pid, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    for (file, value) in [
        ("setgroups", "deny".to_owned()),
        ("uid_map", format!("0 {uid} 1")),
        ("gid_map", format!("0 {gid} 1")),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, &value).map_err(|source| SandboxError::Write {
            path,
            value,
            source,
        })?;
    }
    Ok(())
}

/// Everything `execve` needs, built before seccomp so that exec allocates nothing.
struct ExecArgs {
    program: CString,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

impl ExecArgs {
    fn new(spec: &SpawnSpec, pid: Pid) -> Result<Self, SandboxError> {
        let c = |what: &str, s: &[u8]| {
            CString::new(s).map_err(|_| SandboxError::InvalidSpec(format!("{what} contains NUL")))
        };
        let program = c("program", spec.program.as_os_str().as_bytes())?;
        let mut argv = vec![program.clone()];
        for a in &spec.args {
            argv.push(c("argument", a.as_bytes())?);
        }
        let mut envp = Vec::with_capacity(spec.env.len() + 2);
        for (k, v) in &spec.env {
            if spec.listen_fd && (k == "LISTEN_FDS" || k == "LISTEN_PID") {
                continue;
            }
            envp.push(c("environment", format!("{k}={v}").as_bytes())?);
        }
        if spec.listen_fd {
            envp.push(c("environment", b"LISTEN_FDS=1")?);
            envp.push(c("environment", format!("LISTEN_PID={pid}").as_bytes())?);
        }
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(Self {
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            program,
            _argv: argv,
            _envp: envp,
        })
    }

    /// `execve`; returns its errno on failure.
    fn exec(&self) -> i32 {
        // SAFETY: `program` is NUL-terminated; `argv_ptrs`/`envp_ptrs` are NULL-terminated
        // arrays of pointers into CStrings owned by `self`, all alive during the call.
        unsafe {
            libc::execve(
                self.program.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            )
        };
        Errno::last_raw()
    }
}

/// How the worker ended, as init reports it to the relay over the status pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited(i32),
    Signaled(Signal),
}

impl Ending {
    fn encode(self) -> [u8; 2] {
        match self {
            Ending::Exited(code) => [b'E', code as u8],
            Ending::Signaled(sig) => [b'S', sig as i32 as u8],
        }
    }

    fn decode(b: &[u8]) -> Option<Self> {
        match b {
            [b'E', code] => Some(Ending::Exited(i32::from(*code))),
            [b'S', sig] => Signal::try_from(i32::from(*sig)).ok().map(Ending::Signaled),
            _ => None,
        }
    }

    fn from_status(s: WaitStatus) -> Option<Self> {
        match s {
            WaitStatus::Exited(_, code) => Some(Ending::Exited(code)),
            WaitStatus::Signaled(_, sig, _) => Some(Ending::Signaled(sig)),
            _ => None,
        }
    }
}

/// Forks init (PID 1 of the new pid namespace); this process becomes the relay and never
/// returns. In init, does the namespace setup and forks the worker; returns in the worker.
fn pid_namespace(spec: &SpawnSpec) -> Result<(), Failure> {
    // init → relay: how the worker ended (2 bytes). Its write end also tells init whether the
    // relay is still alive (POLLERR once the read end is gone).
    let (status_r, status_w) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .call(|| "pipe2()".into())
        .step("pid namespace")?;
    // SAFETY: the helper is single-threaded (ensure_single_threaded), so the child can run
    // arbitrary code after fork.
    match unsafe { fork() }
        .call(|| "fork() of init".into())
        .step("pid namespace")?
    {
        ForkResult::Parent { child } => {
            drop(status_w);
            // The listening socket is the worker's alone: a copy here would keep accepting
            // into the backlog after the worker closed its own. (Only with `listen_fd`: without
            // it, fd 3 may be one of our pipes.)
            if spec.listen_fd {
                sys::close_listen_fd();
            }
            relay(child, status_r)
        }
        ForkResult::Child => {
            drop(status_r);
            init(spec, status_w)
        }
    }
}

/// The relay: forwards signals to init and ends like the worker.
fn relay(init: Pid, status_r: OwnedFd) -> ! {
    let set = waited_signals();
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = kill(init, sig);
            continue;
        }
        match waitpid(init, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => continue,
            Ok(status) => {
                let mut buf = [0u8; 2];
                let reported = nix::unistd::read(status_r.as_fd(), &mut buf)
                    .ok()
                    .and_then(|n| Ending::decode(&buf[..n]));
                match reported.or_else(|| Ending::from_status(status)) {
                    Some(ending) => end_like(ending),
                    None => continue,
                }
            }
            Err(_) => sys::exit_now(HELPER_FAILED),
        }
    }
}

/// Exits with the worker's code, or dies of the worker's signal (default disposition, no core
/// dump of the relay) so that the supervisor sees the same wait status.
fn end_like(ending: Ending) -> ! {
    match ending {
        Ending::Exited(code) => sys::exit_now(code),
        Ending::Signaled(sig) => {
            let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
            sys::reset_signal_dispositions();
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            let _ = kill(getpid(), sig);
            // Not fatal after all (cannot happen for a signal that killed the worker).
            sys::exit_now(128 + sig as i32)
        }
    }
}

/// PID 1 of the namespace: sets up the namespaces, forks the worker, then forwards signals
/// and reaps until the worker ends. Returns only in the worker.
fn init(spec: &SpawnSpec, status_w: OwnedFd) -> Result<(), Failure> {
    // Die with the relay. getppid() is 0 for a namespace's init whatever happened, so check
    // on the status pipe that the relay did not die before the prctl.
    prctl::set_pdeathsig(Signal::SIGKILL)
        .call(|| "prctl(PR_SET_PDEATHSIG, SIGKILL)".into())
        .step("init")?;
    if relay_gone(&status_w) {
        sys::exit_now(HELPER_FAILED);
    }
    // Own process group (see the module docs: each signal reaches the worker once).
    setpgid(Pid::from_raw(0), Pid::from_raw(0))
        .call(|| "setpgid(0, 0) of init".into())
        .step("init")?;

    // The namespace setup happens here, inside the pid namespace: /proc must be mounted by a
    // process of the namespace it shows.
    mounts::setup(spec)?;

    // SAFETY: init is single-threaded (forked from the single-threaded helper).
    match unsafe { fork() }
        .call(|| "fork() of the worker".into())
        .step("init")?
    {
        ForkResult::Parent { child } => {
            // Also set by the worker itself; whoever is first wins the race, both are fine.
            let _ = setpgid(child, child);
            if spec.listen_fd {
                sys::close_listen_fd();
            }
            init_loop(child, status_w)
        }
        ForkResult::Child => {
            drop(status_w);
            setpgid(Pid::from_raw(0), Pid::from_raw(0))
                .call(|| "setpgid(0, 0) of the worker".into())
                .step("init")?;
            Ok(())
        }
    }
}

fn relay_gone(status_w: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(status_w.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
        Err(_) => false,
    }
}

/// init's loop: forward signals to the worker's process group, reap every child, and when the
/// worker ends, report it to the relay and exit (the kernel then kills the rest of the
/// namespace).
fn init_loop(worker: Pid, status_w: OwnedFd) -> ! {
    let set = waited_signals();
    loop {
        let Ok(sig) = set.wait() else { continue };
        if sig != Signal::SIGCHLD {
            // The worker's group; if the worker left it (setsid), the worker itself.
            if killpg(worker, sig) == Err(Errno::ESRCH) {
                let _ = kill(worker, sig);
            }
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(status) if status.pid() == Some(worker) => {
                    if let Some(ending) = Ending::from_status(status) {
                        sys::write_all_raw(status_w.as_raw_fd(), &ending.encode());
                        let code = match ending {
                            Ending::Exited(code) => code,
                            Ending::Signaled(sig) => 128 + sig as i32,
                        };
                        sys::exit_now(code);
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }
}

impl From<(&'static str, SandboxError)> for Failure {
    fn from((step, error): (&'static str, SandboxError)) -> Self {
        Failure { step, error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_v1_cgroups_through_tasks_and_v2_through_cgroup_procs() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
        for d in [&v1, &v2] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("cgroup.procs"), "").unwrap();
        }
        std::fs::write(v1.join("tasks"), "").unwrap();
        join_cgroup(&v1.join("cgroup.procs")).unwrap();
        join_cgroup(&v2.join("cgroup.procs")).unwrap();
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(v1.join("tasks")), "0");
        assert_eq!(read(v1.join("cgroup.procs")), "");
        assert_eq!(read(v2.join("cgroup.procs")), "0");
        let err = join_cgroup(&dir.path().join("gone/cgroup.procs")).unwrap_err();
        assert!(err.to_string().contains("gone/cgroup.procs"), "{err}");
    }

    #[test]
    fn ending_round_trips() {
        for e in [
            Ending::Exited(0),
            Ending::Exited(7),
            Ending::Exited(121),
            Ending::Signaled(Signal::SIGKILL),
            Ending::Signaled(Signal::SIGTERM),
        ] {
            assert_eq!(Ending::decode(&e.encode()), Some(e));
        }
        assert_eq!(Ending::decode(b""), None);
        assert_eq!(Ending::decode(b"X1"), None);
    }

    #[test]
    fn exec_args_set_listen_vars_and_drop_user_ones() {
        let spec = SpawnSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "true".into()],
            env: vec![
                ("PORT".into(), "9000".into()),
                ("LISTEN_PID".into(), "1".into()),
            ],
            listen_fd: true,
            ..Default::default()
        };
        let e = ExecArgs::new(&spec, Pid::from_raw(42)).unwrap();
        let env: Vec<_> = e
            ._envp
            .iter()
            .map(|c| c.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(env, ["PORT=9000", "LISTEN_FDS=1", "LISTEN_PID=42"]);
        assert_eq!(e.argv_ptrs.len(), 4);
        assert!(e.argv_ptrs[3].is_null());
        let bad = SpawnSpec {
            args: vec!["a\0b".into()],
            ..spec
        };
        assert!(ExecArgs::new(&bad, Pid::from_raw(1)).is_err());
    }
}
