//! What each signal does to `tqproxy run`, in one place.
//!
//! | signal | effect |
//! |---|---|
//! | SIGHUP | reload, as `tqproxy reload`: the outcome is logged, one line per worker |
//! | SIGTERM, SIGINT | graceful stop, as `tqproxy stop`: systemd is told `STOPPING=1`, the proxy stops accepting, the supervisor drains and stops every instance, the process exits 0 |
//! | SIGQUIT | graceful upgrade (sent by the new process of `tqproxy upgrade`): the listening sockets go to the new process, kept connections are answered with `Connection: close`, and 5 s later the stop proceeds as for SIGTERM |
//!
//! [`Shutdown`] is pingora's shutdown trigger (its own `UnixShutdownSignalWatch` would make
//! SIGINT a fast shutdown that drains nothing); [`reload_on_sighup`] runs as a background
//! service. Once a stop has begun, a second SIGTERM, SIGINT or SIGQUIT changes nothing (the
//! handlers stay installed; SIGKILL still works). The handlers are installed when the pingora
//! server starts: a signal that arrives before that has its default action.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

use crate::server::sd_notify;
use crate::supervisor::{Request, SupervisorHandle};

/// SIGTERM, SIGINT, SIGQUIT and `tqproxy stop` (which notifies `stop`), as pingora's
/// shutdown trigger.
pub struct Shutdown {
    pub stop: Arc<Notify>,
}

#[async_trait]
impl ShutdownSignalWatch for Shutdown {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers");
            // Only `tqproxy stop` can stop this process now.
            self.stop.notified().await;
            return graceful_stop("stop requested on the control socket");
        };
        tokio::select! {
            _ = term.recv() => graceful_stop("SIGTERM: graceful stop"),
            _ = int.recv() => graceful_stop("SIGINT: graceful stop"),
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing the listening sockets to the new tqproxy");
                crate::proxy::CLOSE_CONNECTIONS.store(true, Ordering::Relaxed);
                ShutdownSignal::GracefulUpgrade
            }
            _ = self.stop.notified() => graceful_stop("stop requested on the control socket"),
        }
    }
}

fn graceful_stop(why: &str) -> ShutdownSignal {
    tracing::info!("{why}");
    sd_notify("STOPPING=1");
    ShutdownSignal::GracefulTerminate
}

/// SIGHUP = `tqproxy reload`, for as long as the process runs; each outcome line is logged.
pub async fn reload_on_sighup(supervisor: SupervisorHandle) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler: reload with `tqproxy reload`");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading");
        let o = supervisor.request(Request::Reload).await;
        for l in &o.lines {
            tracing::info!(worker = %l.worker, ok = l.ok, "{}", l.message);
        }
    }
}
