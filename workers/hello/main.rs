//! `hello` — the example worker: what a tqproxy worker needs, written on the worker kit
//! (`workers/kit`). Copy this directory (main.rs and worker.yaml) to start one of your own.
//!
//! tqproxy starts each instance with the environment of the worker contract (DESIGN.md,
//! "Worker contract"); [`kit::Worker::from_env`] reads it and [`kit::serve`] does the rest:
//!
//! - listens on `127.0.0.1:$PORT`, or on the socket tqproxy passed as fd 3 (`LISTEN_FDS=1`:
//!   socket passing into a network namespace, or `transport: unix`);
//! - answers `/health` with `ok`, the path worker.yaml's `health:` asks: tqproxy routes requests
//!   to an instance once it answers;
//! - on SIGTERM stops accepting, finishes the requests in flight and exits 0 (tqproxy sends
//!   SIGTERM when it drains an instance: deploy, scale down, restart, stop);
//! - with `ready: notify` in worker.yaml, tells tqproxy `READY=1` on `$NOTIFY_SOCKET` as soon
//!   as it listens (no health poll), `STOPPING=1` on SIGTERM, and pings `WATCHDOG=1` when
//!   `WATCHDOG_USEC` is set (`watchdog:`): the kit's `notify` module, a no-op otherwise.
//!
//! | request        | answer                                                           |
//! |----------------|------------------------------------------------------------------|
//! | `GET /`        | `hello from <name> instance <id> generation <gen> (pid <pid>)`   |
//! | `GET /health`  | `ok`                                                             |
//! | `GET /version` | `$HELLO_VERSION` (default `1`)                                   |
//! | anything else  | 404                                                              |
//!
//! To watch a rolling deploy, set `HELLO_VERSION` in worker.yaml's `env:` and run
//! `tqproxy deploy hello`: `/version` changes instance by instance, with no failed request.
//!
//! (The benchmarks and the integration tests use `workers/backend`, tuned and with many more
//! endpoints.)
#![forbid(unsafe_code)]

use kit::{Handler, Reply, Request, Worker};

/// The state of one instance: fixed once it has started.
struct Hello {
    /// The `GET /` answer.
    greeting: String,
    /// The `GET /version` answer.
    version: String,
}

impl Handler for Hello {
    /// Nothing to do once a reply has been written.
    type After = ();

    async fn handle(&self, req: &Request) -> Reply {
        match req.path.as_str() {
            "/" => Reply::text(200, self.greeting.as_str()),
            "/version" => Reply::text(200, self.version.as_str()),
            _ => Reply::text(404, "not found\n"),
        }
    }
}

fn main() {
    // First thing: this claims fd 3 if tqproxy passed a socket, and exits with 2 if there is
    // nothing to listen on.
    let worker = Worker::from_env("hello");
    let version = kit::env_var("HELLO_VERSION").unwrap_or_else(|| "1".into());
    let hello = Hello {
        greeting: format!(
            "hello from {} instance {} generation {} (pid {})\n",
            worker.name,
            worker.instance,
            worker.generation,
            std::process::id()
        ),
        version: format!("{}\n", kit::clean(version)),
    };
    kit::serve(worker, hello)
}
