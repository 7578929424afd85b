//! The worker kit: tqproxy's worker contract (DESIGN.md, "Worker contract") in one place, for
//! the example workers. `hello` (workers/hello/main.rs) is the one to copy.
//!
//! | the contract                                                  | in the kit                     |
//! |---------------------------------------------------------------|--------------------------------|
//! | listen on `127.0.0.1:$PORT` (`WORKER_PORT` is the same)        | [`Worker::from_env`], [`serve`] |
//! | `WORKER_NAME`, `WORKER_INSTANCE`, `WORKER_GENERATION`          | [`Worker`]; every reply carries them as `X-Worker`, `X-Instance`, `X-Generation` |
//! | `LISTEN_FDS=1` and `LISTEN_PID`: the listening socket is fd 3, TCP (socket passing into a network namespace) or unix (`transport: unix`, then without `PORT`) | [`listen::inherited`], claimed by [`Worker::from_env`] |
//! | ready once the health path answers 2xx                        | [`Handler::health`] answers `/health` (`200 ok` unless the worker says otherwise) |
//! | SIGTERM: finish the requests in flight and exit               | [`serve`]: stop accepting, finish in-flight requests, close idle connections, exit 0; a second SIGTERM/SIGINT exits at once |
//! | `ready: notify`: `NOTIFY_SOCKET` (sd_notify), `WATCHDOG_USEC`  | [`serve`] through [`notify::Notifier`]: `READY=1` and a `STATUS=` once listening, `WATCHDOG=1` every half `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM |
//!
//! [`serve`] speaks keep-alive HTTP/1.1 (and 1.0) on a current-thread tokio runtime, parsed with
//! `httparse`: request bodies (`Content-Length` or chunked) are read and discarded, malformed
//! input gets a 4xx and a close, replies always carry a `Content-Length`. A worker is a
//! [`Handler`] plus a `main`:
//!
//! ```no_run
//! use kit::{Handler, Reply, Request, Worker};
//!
//! struct Hi;
//!
//! impl Handler for Hi {
//!     type After = ();
//!
//!     async fn handle(&self, req: &Request) -> Reply {
//!         match req.path.as_str() {
//!             "/" => Reply::text(200, "hi\n"),
//!             _ => Reply::text(404, "not found\n"),
//!         }
//!     }
//! }
//!
//! fn main() {
//!     let worker = Worker::from_env("hi");
//!     kit::serve(worker, Hi)
//! }
//! ```
//!
//! The benchmark backend (workers/backend) has its own tuned HTTP/1.1 engine and uses only
//! [`listen`] from here.
#![deny(unsafe_code)]

use std::sync::OnceLock;

pub mod http;
pub mod listen;
pub mod notify;

pub use http::{Handler, Io, Reply, Request, query_param, serve, url_decode};

static PROG: OnceLock<&'static str> = OnceLock::new();

/// The name that prefixes the kit's log lines (set by [`Worker::from_env`]).
pub fn prog() -> &'static str {
    PROG.get().copied().unwrap_or("worker")
}

/// One line on stderr, prefixed with the worker's program name, in a single `write` so that
/// lines from concurrent tasks never interleave in tqproxy's per-instance log.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}: {}\n", $crate::prog(), format_args!($($arg)*));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

/// A non-empty environment variable.
pub fn env_var(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// `s` without control characters (it ends up in response headers and log lines).
pub fn clean(s: String) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// What tqproxy told this instance: who it is and where to listen.
#[derive(Debug)]
pub struct Worker {
    /// `WORKER_NAME` (default: the program name).
    pub name: String,
    /// `WORKER_INSTANCE`, unique per instance of the worker (default `0`).
    pub instance: String,
    /// `WORKER_GENERATION`, the config generation the instance was started for (default `0`).
    pub generation: String,
    /// `PORT`; `None` with `transport: unix`, where the socket is fd 3.
    pub port: Option<u16>,
    /// The listening socket tqproxy passed as fd 3, if it did.
    pub inherited: Option<listen::Inherited>,
}

impl Worker {
    /// Claims fd 3 when tqproxy passed it (first thing: before the runtime's epoll can be given
    /// that number; a passed but unusable fd 3 is logged and ignored), then reads the
    /// environment. `prog` names the log lines and is the default `WORKER_NAME`. Exits with 2
    /// when `PORT` is not a port number, or is missing and no socket was passed.
    pub fn from_env(prog: &'static str) -> Worker {
        let _ = PROG.set(prog);
        let inherited = listen::inherited().unwrap_or_else(|e| {
            log!("{e}");
            None
        });
        let port = env_var("PORT").map(|port| {
            port.trim().parse::<u16>().unwrap_or_else(|_| {
                log!("PORT={port:?} is not a port number");
                std::process::exit(2);
            })
        });
        if port.is_none() && inherited.is_none() {
            log!("PORT is not set (and no listening socket was passed as fd 3)");
            std::process::exit(2);
        }
        let var = |key, default: &str| clean(env_var(key).unwrap_or_else(|| default.into()));
        Worker {
            name: var("WORKER_NAME", prog),
            instance: var("WORKER_INSTANCE", "0"),
            generation: var("WORKER_GENERATION", "0"),
            port,
            inherited,
        }
    }
}
