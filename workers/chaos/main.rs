//! `chaos` — a worker that misbehaves on request, for tqproxy's supervisor and isolation tests.
//!
//! It follows the worker contract (DESIGN.md, "Worker contract") like `hello` does — fd 3 socket
//! passing, graceful SIGTERM, keep-alive HTTP/1.1 with `X-Worker`/`X-Instance`/`X-Generation` —
//! through the worker kit (`workers/kit`).
//!
//! | request                        | effect                                                          |
//! |--------------------------------|-----------------------------------------------------------------|
//! | `GET /`                        | `chaos <instance> gen <gen> pid <pid>`                          |
//! | `GET /health`                  | 200; 503 after `/unhealthy` or with `CHAOS_NEVER_READY=1`       |
//! | `GET /version`                 | `$CHAOS_VERSION` or `1`                                         |
//! | `GET /slow?ms=N`               | `slow done` after N ms                                          |
//! | `GET /crash`                   | answers `crashing`, then `abort()` 50 ms later                  |
//! | `GET /exit?code=N`             | answers, then exits with N (default 1)                          |
//! | `GET /hang`                    | answers `hanging`; from then on every request hangs forever     |
//! | `GET /unhealthy`               | `/health` answers 503 from now on                               |
//! | `GET /leak?mb=N&rate_ms=M`     | background thread leaks (and touches) 1 MiB every M ms, up to N |
//! | `GET /leak-now?mb=N`           | leaks N MiB now, answers the total                              |
//! | `GET /burn?threads=T&secs=S`   | T busy threads for S seconds (default forever)                  |
//! | `GET /fork-bomb?max=N`         | background thread spawns sleeping children until N or failure   |
//! | `GET /fork-stats`              | `{"forked","failed","last_error"}`                              |
//! | `GET /fd-leak?n=N`             | opens /dev/null N times (default: until it fails), keeps them   |
//! | `GET /open-file`               | can one more file be opened?                                    |
//! | `GET /ptrace?pid=P`            | is ptrace access to the parent (or P) allowed?                  |
//! | `GET /mount?path=P`            | can a tmpfs be mounted on /mnt (or P)? (unmounted at once)      |
//! | `GET /unshare`                 | can a new mount namespace be created?                           |
//! | `GET /connect?addr=HOST:PORT`  | does a TCP connect succeed within 1 s?                          |
//!
//! Start-up knobs: `CHAOS_CRASH_ON_START=1` (exit 3 at once), `CHAOS_START_DELAY_MS=N` (sleep
//! before serving), `CHAOS_NEVER_READY=1` (`/health` always 503), `CHAOS_ERROR_PERMILLE=N`
//! (`GET /` answers 500 for N of every 1000 requests, spread evenly: a bad version for canary
//! tests).
#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use kit::{Handler, Io, Request, env_var as var, log, query_param, url_decode};

/// Set in the children of `/fork-bomb` and `/ptrace`: sleep this many seconds, then exit.
const CHILD_SLEEP_ENV: &str = "CHAOS_CHILD_SLEEP_S";

// ---------------------------------------------------------------------------------------------
// Process-wide chaos state

static HANG: AtomicBool = AtomicBool::new(false);
static UNHEALTHY: AtomicBool = AtomicBool::new(false);
static LEAKED_MIB: AtomicU64 = AtomicU64::new(0);
static LEAK: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
static FDS: Mutex<Vec<File>> = Mutex::new(Vec::new());
static FORKS: Mutex<ForkStats> = Mutex::new(ForkStats {
    forked: 0,
    failed: 0,
    last_error: None,
});

struct ForkStats {
    forked: u64,
    failed: u64,
    last_error: Option<String>,
}

struct App {
    instance: String,
    generation: String,
    version: String,
    never_ready: bool,
    /// `GET /` answers 500 for this many of every 1000 requests.
    error_permille: u64,
    served: std::sync::atomic::AtomicU64,
}

fn main() {
    if let Some(secs) = std::env::var(CHILD_SLEEP_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
    {
        std::thread::sleep(Duration::from_secs(secs));
        return;
    }
    let worker = kit::Worker::from_env("chaos");
    let (instance, generation) = (worker.instance.clone(), worker.generation.clone());
    if var("CHAOS_CRASH_ON_START").as_deref() == Some("1") {
        log!("instance {instance} gen {generation}: CHAOS_CRASH_ON_START=1, exiting with 3");
        std::process::exit(3);
    }
    if let Some(ms) = var("CHAOS_START_DELAY_MS").and_then(|v| v.trim().parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let app = App {
        instance,
        generation,
        version: kit::clean(var("CHAOS_VERSION").unwrap_or_else(|| "1".into())),
        never_ready: var("CHAOS_NEVER_READY").as_deref() == Some("1"),
        error_permille: var("CHAOS_ERROR_PERMILLE")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0u64)
            .min(1000),
        served: std::sync::atomic::AtomicU64::new(0),
    };
    kit::serve(worker, app)
}

// ---------------------------------------------------------------------------------------------
// Endpoints

/// What happens after the response has been written.
#[derive(Clone, Copy, Default)]
enum After {
    #[default]
    Nothing,
    Abort,
    Exit(i32),
}

type Reply = kit::Reply<After>;

fn bad(msg: &str) -> Reply {
    Reply::text(400, format!("{msg}\n"))
}

/// A numeric query parameter: `Ok(None)` when absent, `Err` when malformed.
fn num<T: std::str::FromStr>(req: &Request, key: &str) -> Result<Option<T>, Reply> {
    match query_param(&req.query, key) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| bad(&format!("{key} must be a number"))),
    }
}

fn errno_json(result: nix::Result<()>) -> Value {
    match result {
        Ok(()) => json!({"ok": true, "errno": null, "error": null}),
        Err(e) => json!({"ok": false, "errno": format!("{e:?}"), "error": e.desc()}),
    }
}

async fn blocking<F: FnOnce() -> Reply + Send + 'static>(f: F) -> Reply {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Reply::text(500, format!("task failed: {e}\n")))
}

impl Handler for App {
    type After = After;

    async fn handle(&self, req: &Request) -> Reply {
        if HANG.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        match endpoint(self, req).await {
            Ok(reply) | Err(reply) => reply,
        }
    }

    async fn health(&self) -> Reply {
        if HANG.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.never_ready || UNHEALTHY.load(Ordering::SeqCst) {
            Reply::text(503, "unhealthy\n")
        } else {
            Reply::text(200, "ok\n")
        }
    }

    async fn after(&self, after: After, stream: &mut dyn Io) {
        match after {
            After::Nothing => {}
            After::Abort => {
                std::thread::spawn(|| {
                    std::thread::sleep(Duration::from_millis(50));
                    log!("/crash: aborting");
                    std::process::abort();
                });
            }
            After::Exit(code) => {
                let _ = stream.shutdown().await;
                log!("/exit: exiting with {code}");
                std::process::exit(code);
            }
        }
    }
}

async fn endpoint(app: &App, req: &Request) -> Result<Reply, Reply> {
    let pid = std::process::id();
    Ok(match req.path.as_str() {
        "/" => {
            let n = app.served.fetch_add(1, Ordering::Relaxed);
            let p = app.error_permille;
            if (n + 1) * p / 1000 > n * p / 1000 {
                Reply::text(
                    500,
                    "chaos: a failing request (CHAOS_ERROR_PERMILLE)\n".to_string(),
                )
            } else {
                Reply::text(
                    200,
                    format!("chaos {} gen {} pid {pid}\n", app.instance, app.generation),
                )
            }
        }
        "/version" => Reply::text(200, format!("{}\n", app.version)),
        "/slow" => {
            let ms: u64 = num(req, "ms")?.unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
            Reply::text(200, "slow done\n")
        }
        "/crash" => Reply {
            after: After::Abort,
            ..Reply::text(200, "crashing\n")
        },
        "/exit" => {
            let code: i32 = num(req, "code")?.unwrap_or(1);
            Reply {
                after: After::Exit(code),
                ..Reply::text(200, format!("exiting with {code}\n"))
            }
        }
        "/hang" => {
            HANG.store(true, Ordering::SeqCst);
            log!("/hang: every further request hangs");
            Reply::text(200, "hanging\n")
        }
        "/unhealthy" => {
            UNHEALTHY.store(true, Ordering::SeqCst);
            Reply::text(200, "unhealthy from now on\n")
        }
        "/leak" => {
            let limit: Option<u64> = num(req, "mb")?;
            let rate_ms: u64 = num(req, "rate_ms")?.unwrap_or(10);
            std::thread::spawn(move || {
                let mut n = 0;
                while limit.is_none_or(|l| n < l) {
                    leak_mib(1);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(rate_ms));
                }
            });
            Reply::text(200, "leaking\n")
        }
        "/leak-now" => {
            let mb: u64 = num(req, "mb")?.unwrap_or(1);
            blocking(move || {
                leak_mib(mb);
                let total = LEAKED_MIB.load(Ordering::SeqCst);
                Reply::text(200, format!("leaked {total} MiB\n"))
            })
            .await
        }
        "/burn" => {
            let threads: u32 = num(req, "threads")?.unwrap_or(1).min(1024);
            let secs: Option<u64> = num(req, "secs")?;
            for t in 0..threads {
                std::thread::spawn(move || burn(u64::from(t) + 1, secs));
            }
            Reply::text(200, format!("burning {threads} threads\n"))
        }
        "/fork-bomb" => {
            let max: u64 = num(req, "max")?.unwrap_or(100_000);
            // Answer once the first few attempts are made (a test that asks for 3 children
            // finds them), without waiting for a large bomb.
            let (first, first_done) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || fork_bomb(max, first));
            let _ = tokio::time::timeout(Duration::from_secs(2), first_done).await;
            let stats = FORKS.lock().unwrap_or_else(|e| e.into_inner());
            let (forked, failed) = (stats.forked, stats.failed);
            Reply::text(
                200,
                format!("forking (so far: {forked} forked, {failed} failed)\n"),
            )
        }
        "/fork-stats" => {
            let stats = FORKS.lock().unwrap_or_else(|e| e.into_inner());
            Reply::json(json!({
                "forked": stats.forked, "failed": stats.failed, "last_error": stats.last_error,
            }))
        }
        "/fd-leak" => {
            let n: u64 = num(req, "n")?.unwrap_or(1 << 20);
            blocking(move || {
                let mut fds = FDS.lock().unwrap_or_else(|e| e.into_inner());
                let mut error = None;
                let mut opened = 0u64;
                while opened < n {
                    match File::open("/dev/null") {
                        Ok(f) => fds.push(f),
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                    opened += 1;
                }
                Reply::json(json!({"opened": opened, "total": fds.len(), "error": error}))
            })
            .await
        }
        "/open-file" => match File::open("/dev/null") {
            Ok(_) => Reply::json(json!({"ok": true, "error": null})),
            Err(e) => Reply::json(json!({"ok": false, "error": e.to_string()})),
        },
        "/ptrace" => {
            let target: Option<i32> = num(req, "pid")?;
            blocking(move || Reply::json(ptrace_access(target))).await
        }
        "/mount" => {
            let path = query_param(&req.query, "path").map_or("/mnt".to_string(), url_decode);
            blocking(move || {
                use nix::mount::{MsFlags, mount, umount};
                let r = mount(
                    Some("tmpfs"),
                    path.as_str(),
                    Some("tmpfs"),
                    MsFlags::empty(),
                    None::<&str>,
                );
                let mounted = r.is_ok();
                let mut v = errno_json(r);
                v["path"] = json!(path);
                if mounted {
                    // Leave no trace, in case this ran unsandboxed.
                    v["unmounted"] = json!(umount(path.as_str()).is_ok());
                }
                Reply::json(v)
            })
            .await
        }
        "/unshare" => {
            // On a thread of its own: the new namespace dies with the thread.
            let r = std::thread::spawn(|| nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS))
                .join()
                .unwrap_or(Err(nix::errno::Errno::EINVAL));
            Reply::json(errno_json(r))
        }
        "/connect" => {
            let Some(addr) = query_param(&req.query, "addr").map(url_decode) else {
                return Err(bad("addr=HOST:PORT is required"));
            };
            let attempt = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&addr));
            let error = match attempt.await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out after 1s".to_string()),
            };
            Reply::json(json!({"addr": addr, "ok": error.is_none(), "error": error}))
        }
        _ => Reply::text(404, "not found\n"),
    })
}

fn leak_mib(mb: u64) {
    for _ in 0..mb {
        let mut chunk = vec![0u8; 1 << 20];
        for page in chunk.iter_mut().step_by(4096) {
            *page = 1;
        }
        std::hint::black_box(&mut chunk);
        LEAK.lock().unwrap_or_else(|e| e.into_inner()).push(chunk);
        LEAKED_MIB.fetch_add(1, Ordering::SeqCst);
    }
}

fn burn(seed: u64, secs: Option<u64>) {
    let end = secs.map(|s| Instant::now() + Duration::from_secs(s));
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    loop {
        for _ in 0..1_000_000 {
            // xorshift64: cheap, and black_box keeps the optimiser from dropping it.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        x = std::hint::black_box(x);
        if end.is_some_and(|e| Instant::now() >= e) {
            return;
        }
    }
}

/// A child that only sleeps: this binary again (no dependency on `sleep` existing in a sandbox),
/// or `sleep` when our own path is unknown.
fn sleeper(secs: u32) -> Command {
    let mut cmd = match std::env::current_exe() {
        Ok(exe) => {
            let mut c = Command::new(exe);
            c.env(CHILD_SLEEP_ENV, secs.to_string());
            c
        }
        Err(_) => {
            let mut c = Command::new("sleep");
            c.arg(secs.to_string());
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    cmd
}

/// How many spawn attempts `/fork-bomb` waits for before it answers.
const FORK_FIRST_BATCH: u64 = 16;

fn fork_bomb(max: u64, first: tokio::sync::oneshot::Sender<()>) {
    let mut first = Some(first);
    let mut consecutive_failures = 0;
    for attempt in 0..max {
        if attempt == FORK_FIRST_BATCH
            && let Some(tx) = first.take()
        {
            let _ = tx.send(());
        }
        let result = sleeper(600).spawn();
        let mut stats = FORKS.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            // The child is not waited for: it sleeps until it is killed (with the cgroup).
            Ok(_child) => {
                stats.forked += 1;
                consecutive_failures = 0;
            }
            Err(e) => {
                stats.failed += 1;
                stats.last_error = Some(e.to_string());
                consecutive_failures += 1;
                drop(stats);
                if consecutive_failures >= 1000 {
                    log!("/fork-bomb: giving up after 1000 failures in a row: {e}");
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    if let Some(tx) = first.take() {
        let _ = tx.send(());
    }
}

/// Whether this process may ptrace its parent (or `target`).
///
/// Asked with `process_vm_readv`, which passes the same `PTRACE_MODE_ATTACH` check as
/// `ptrace(PTRACE_ATTACH)` (credentials, capabilities, Yama) without stopping the target. An
/// `EFAULT` (we read from address 0) means the access check itself passed.
fn ptrace_access(target: Option<i32>) -> Value {
    use nix::sys::uio::{RemoteIoVec, process_vm_readv};
    use nix::unistd::{Pid, getppid};
    // Outside our pid namespace the parent is pid 0: then try its init, pid 1.
    let pid = target.unwrap_or_else(|| match getppid().as_raw() {
        0 => 1,
        p => p,
    });
    let mut byte = [0u8; 1];
    let remote = [RemoteIoVec { base: 0, len: 1 }];
    let r = process_vm_readv(
        Pid::from_raw(pid),
        &mut [io::IoSliceMut::new(&mut byte)],
        &remote,
    );
    let allowed = matches!(r, Ok(_) | Err(nix::errno::Errno::EFAULT));
    let mut v = errno_json(if allowed { Ok(()) } else { r.map(drop) });
    v["target"] = json!(pid);
    v["method"] = json!("process_vm_readv");
    v
}
