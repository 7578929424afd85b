//! Socket passing (the worker contract's `LISTEN_FDS`): the listening socket tqproxy created
//! for an instance arrives as fd 3 — a TCP socket (network namespace, `pass_socket`) or a unix
//! stream socket (`transport: unix`). Used by every example worker, the backend included.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;

/// The listening socket tqproxy passed, by kind.
#[derive(Debug)]
pub enum Inherited {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// fd 3 as a non-blocking listener when tqproxy passed one (`LISTEN_FDS=1` and `LISTEN_PID`
/// is this process); `Ok(None)` when it did not; `Err` when it did but fd 3 is unusable.
/// Call it first thing, before anything else can be given fd 3.
#[allow(unsafe_code)]
pub fn inherited() -> Result<Option<Inherited>, String> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::socket::{
        AddressFamily, Backlog, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt,
        listen, sockopt,
    };
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    match getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(t) => return Err(format!("fd 3 is a {t:?} socket, not a stream socket")),
        Err(e) => return Err(format!("fd 3 is not a socket: {e}")),
    }
    let family = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map_err(|e| format!("fd 3: getsockname: {e}"))?
        .family();
    if !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(true) {
        let backlog = Backlog::new(1024).unwrap_or(Backlog::MAXCONN);
        listen(&fd, backlog)
            .map_err(|e| format!("fd 3 is not listening and listen() failed: {e}"))?;
    }
    let listener = match family {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {
            let l = TcpListener::from(fd);
            l.set_nonblocking(true).map(|()| Inherited::Tcp(l))
        }
        Some(AddressFamily::Unix) => {
            let l = UnixListener::from(fd);
            l.set_nonblocking(true).map(|()| Inherited::Unix(l))
        }
        other => return Err(format!("fd 3 has an unexpected address family {other:?}")),
    };
    listener
        .map(Some)
        .map_err(|e| format!("fd 3: cannot make it non-blocking: {e}"))
}

/// Like [`inherited`], for workers that serve TCP only (`rawecho`): a passed unix socket is an
/// error that says so.
pub fn inherited_listener() -> Result<Option<TcpListener>, String> {
    match inherited()? {
        None => Ok(None),
        Some(Inherited::Tcp(l)) => Ok(Some(l)),
        Some(Inherited::Unix(l)) => {
            drop(l);
            Err("fd 3 is a unix socket (transport: unix), but this worker serves TCP only".into())
        }
    }
}
