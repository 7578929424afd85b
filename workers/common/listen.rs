//! Socket passing (the worker contract's `LISTEN_FDS`): the listening socket tqproxy created
//! for an instance in a network namespace arrives as fd 3. Shared by every example worker
//! (`#[path]`-included; each binary declares `mod listen`).

use std::io;
use std::net::TcpListener;

/// fd 3 as a non-blocking listener when tqproxy passed one (`LISTEN_FDS=1` and `LISTEN_PID`
/// is this process); `Ok(None)` when it did not; `Err` when it did but fd 3 is unusable.
/// Call it first thing, before anything else can be given fd 3.
#[allow(unsafe_code)]
pub fn inherited_listener() -> Result<Option<TcpListener>, String> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::socket::{Backlog, getsockopt, listen, sockopt};
    use std::os::fd::{FromRawFd, OwnedFd};
    let var = |k: &str| std::env::var(k).map(|v| v.trim().to_owned()).ok();
    if var("LISTEN_FDS").as_deref() != Some("1")
        || var("LISTEN_PID") != Some(std::process::id().to_string())
    {
        return Ok(None);
    }
    // Best effort check that fd 3 is open and a socket (/proc may be absent in a sandbox).
    match std::fs::read_link("/proc/self/fd/3") {
        Ok(t) if !t.to_string_lossy().starts_with("socket:") => {
            return Err(format!("LISTEN_FDS=1 but fd 3 is {t:?}, not a socket"));
        }
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                && std::path::Path::new("/proc/self/fd").is_dir() =>
        {
            return Err("LISTEN_FDS=1 but fd 3 is not open".into());
        }
        _ => {}
    }
    // SAFETY: LISTEN_FDS=1 with LISTEN_PID equal to our pid means tqproxy handed this process
    // fd 3 as its listening socket; nothing else in this process opened, owns or closes fd 3.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    // Children (chaos's `/fork-bomb`) must not inherit the socket: it would keep the port.
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| format!("fd 3: cannot set FD_CLOEXEC: {e}"))?;
    if !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(true) {
        let backlog = Backlog::new(1024).unwrap_or(Backlog::MAXCONN);
        listen(&fd, backlog)
            .map_err(|e| format!("fd 3 is not listening and listen() failed: {e}"))?;
    }
    let listener = TcpListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("fd 3: cannot make it non-blocking: {e}"))?;
    Ok(Some(listener))
}
