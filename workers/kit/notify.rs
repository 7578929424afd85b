//! The sd_notify protocol (systemd's, and tqproxy's `ready: notify`): when tqproxy (or
//! systemd) set `NOTIFY_SOCKET`, tell it `READY=1` once listening, `STOPPING=1` on SIGTERM,
//! `STATUS=…` lines, and `WATCHDOG=1` pings at half of `WATCHDOG_USEC`. Without
//! `NOTIFY_SOCKET` every call does nothing, so a worker works with or without it.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where state goes, if anywhere.
pub struct Notifier {
    target: Option<(UnixDatagram, Target)>,
    watchdog: Option<Duration>,
}

enum Target {
    Path(PathBuf),
    /// `@name`: a socket in the abstract namespace (systemd allows it; tqproxy uses paths).
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC` (a socket that cannot be created is logged and
    /// the notifier does nothing).
    pub fn from_env() -> Notifier {
        let watchdog = crate::env_var("WATCHDOG_USEC")
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0)
            .map(Duration::from_micros);
        let target = crate::env_var("NOTIFY_SOCKET").and_then(|p| {
            let t = match p.strip_prefix('@') {
                Some(name) => Target::Abstract(name.as_bytes().to_vec()),
                None => Target::Path(PathBuf::from(p)),
            };
            // Non-blocking: a receiver that stops reading never stalls the worker (a send
            // that would block fails and is logged).
            match UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => Some((s, t)),
                Err(e) => {
                    crate::log!("NOTIFY_SOCKET: cannot create a socket: {e}");
                    None
                }
            }
        });
        Notifier { target, watchdog }
    }

    /// Whether there is somewhere to send to.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`, as systemd advises), if a
    /// watchdog is on.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.target.as_ref()?;
        self.watchdog.map(|w| w / 2)
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines); failures are logged, never fatal.
    pub fn send(&self, state: &str) {
        let Some((sock, target)) = &self.target else {
            return;
        };
        let r = match target {
            Target::Path(p) => sock.send_to(state.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
            }
        };
        if let Err(e) = r {
            crate::log!(
                "NOTIFY_SOCKET: cannot send {:?}: {e}",
                state.lines().next().unwrap_or("")
            );
        }
    }
}
