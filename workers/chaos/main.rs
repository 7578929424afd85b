//! `chaos` — a worker that misbehaves on request, for tqproxy's supervisor and isolation tests.
//!
//! It follows the worker contract (DESIGN.md, "Worker contract") like `hello` does — fd 3 socket
//! passing, graceful SIGTERM, keep-alive HTTP/1.1 with `X-Worker`/`X-Instance`/`X-Generation` —
//! with a deliberately duplicated, compact HTTP core (each worker binary is one file).
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
//! before serving), `CHAOS_NEVER_READY=1` (`/health` always 503).
#![deny(unsafe_code)]

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

const PROG: &str = "chaos";
/// Set in the children of `/fork-bomb` and `/ptrace`: sleep this many seconds, then exit.
const CHILD_SLEEP_ENV: &str = "CHAOS_CHILD_SLEEP_S";
const MAX_HEAD: usize = 64 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);

macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}: {}\n", PROG, format_args!($($arg)*));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

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
    port: u16,
    version: String,
    never_ready: bool,
    ident: String,
    stopping: AtomicBool,
}

fn main() {
    if let Some(secs) = std::env::var(CHILD_SLEEP_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
    {
        std::thread::sleep(Duration::from_secs(secs));
        return;
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let clean = |s: String| -> String { s.chars().filter(|c| !c.is_control()).collect() };
    let Some(port) = var("PORT") else {
        log!("PORT is not set");
        std::process::exit(2);
    };
    let Ok(port) = port.trim().parse::<u16>() else {
        log!("PORT={port:?} is not a port number");
        std::process::exit(2);
    };
    let (name, instance, generation) = (
        clean(var("WORKER_NAME").unwrap_or_else(|| PROG.into())),
        clean(var("WORKER_INSTANCE").unwrap_or_else(|| "0".into())),
        clean(var("WORKER_GENERATION").unwrap_or_else(|| "0".into())),
    );
    if var("CHAOS_CRASH_ON_START").as_deref() == Some("1") {
        log!("instance {instance} gen {generation}: CHAOS_CRASH_ON_START=1, exiting with 3");
        std::process::exit(3);
    }
    let inherited = inherited_listener();
    if let Some(ms) = var("CHAOS_START_DELAY_MS").and_then(|v| v.trim().parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let ident =
        format!("X-Worker: {name}\r\nX-Instance: {instance}\r\nX-Generation: {generation}\r\n");
    let app = App {
        instance,
        generation,
        port,
        version: clean(var("CHAOS_VERSION").unwrap_or_else(|| "1".into())),
        never_ready: var("CHAOS_NEVER_READY").as_deref() == Some("1"),
        ident,
        stopping: AtomicBool::new(false),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(serve(Arc::new(app), inherited));
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Endpoints

/// What happens after the response has been written.
#[derive(Clone, Copy)]
enum After {
    Nothing,
    Abort,
    Exit(i32),
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    after: After,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain",
            body: body.into().into_bytes(),
            after: After::Nothing,
        }
    }

    fn json(value: Value) -> Reply {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        Reply {
            status: 200,
            content_type: "application/json",
            body,
            after: After::Nothing,
        }
    }
}

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

async fn handle(app: &App, req: &Request) -> Reply {
    match endpoint(app, req).await {
        Ok(reply) | Err(reply) => reply,
    }
}

async fn endpoint(app: &App, req: &Request) -> Result<Reply, Reply> {
    let pid = std::process::id();
    Ok(match req.path.as_str() {
        "/" => Reply::text(
            200,
            format!("chaos {} gen {} pid {pid}\n", app.instance, app.generation),
        ),
        "/health" if app.never_ready || UNHEALTHY.load(Ordering::SeqCst) => {
            Reply::text(503, "unhealthy\n")
        }
        "/health" => Reply::text(200, "ok\n"),
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

/// EMFILE and friends: the caller backs off instead of spinning and never exits; this logs at
/// most once per 5 s.
fn log_accept_error(e: &io::Error, (count, last): &mut (u64, Option<std::time::Instant>)) {
    *count += 1;
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
        log!("accept: {e} ({count} accept errors so far)");
        *last = Some(std::time::Instant::now());
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP core (a compact copy of hello's; each worker is one self-contained file)

/// fd 3 when tqproxy passed a listening socket (`LISTEN_FDS=1`, `LISTEN_PID` = our pid).
#[allow(unsafe_code)]
fn inherited_listener() -> Option<std::net::TcpListener> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::socket::{Backlog, getsockopt, listen, sockopt};
    use std::os::fd::{FromRawFd, OwnedFd};
    if std::env::var("LISTEN_FDS").ok()?.trim() != "1"
        || std::env::var("LISTEN_PID").ok()?.trim() != std::process::id().to_string()
    {
        return None;
    }
    match std::fs::read_link("/proc/self/fd/3") {
        Ok(t) if !t.to_string_lossy().starts_with("socket:") => {
            log!("LISTEN_FDS=1 but fd 3 is {t:?}, not a socket");
            return None;
        }
        // NotFound with /proc present: fd 3 is not open (without /proc we cannot tell).
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                && std::path::Path::new("/proc/self/fd").is_dir() =>
        {
            log!("LISTEN_FDS=1 but fd 3 is not open");
            return None;
        }
        _ => {}
    }
    // SAFETY: LISTEN_FDS=1 with LISTEN_PID equal to our pid means tqproxy handed this process
    // fd 3 as its listening socket; nothing else in this process opened, owns or closes fd 3.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    // Children (`/fork-bomb`) must not inherit the listening socket.
    let _ = fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    if !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(true) {
        listen(&fd, Backlog::MAXCONN).ok()?;
    }
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true).ok()?;
    Some(listener)
}

async fn serve(app: Arc<App>, inherited: Option<std::net::TcpListener>) -> i32 {
    let bound = match inherited {
        Some(l) => TcpListener::from_std(l),
        None => TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], app.port))).await,
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            log!("cannot listen on 127.0.0.1:{}: {e}", app.port);
            return 1;
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log!("cannot install signal handlers");
        return 1;
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (pid, inst, generation) = (std::process::id(), &app.instance, &app.generation);
    log!("instance {inst} gen {generation} listening on {addr} (pid {pid})");
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut accept_errors = (0u64, None);
    let signame = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, app.clone(), stop_rx.clone(), done_tx.clone()));
                }
                Err(e) => {
                    log_accept_error(&e, &mut accept_errors);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    drop(listener);
    app.stopping.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    drop(done_tx);
    tokio::select! {
        _ = done_rx.recv() => {
            log!("instance {inst} gen {generation} exiting after {signame}: all requests finished (pid {pid})");
            0
        }
        _ = term.recv() => { log!("second signal, exiting now"); 143 }
        _ = int.recv() => { log!("second signal, exiting now"); 130 }
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    http10: bool,
    keep_alive: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// One request head from the start of `buf`: `Ok(None)` if incomplete, `Err(status)` if bad.
fn parse_head(buf: &[u8]) -> Result<Option<(Request, BodyKind, usize)>, u16> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(431),
        Err(_) => return Err(400),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(400);
    };
    let (mut length, mut chunked, mut te, mut close, mut keep) = (None, false, false, false, false);
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
        let tokens = || value.split(',').map(str::trim);
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value.trim();
            let n = n
                .parse::<u64>()
                .ok()
                .filter(|_| n.bytes().all(|b| b.is_ascii_digit()));
            match (n, length) {
                (None, _) => return Err(400),
                (Some(n), Some(prev)) if n != prev => return Err(400),
                (n, _) => length = n,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = tokens().next_back() == Some("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= tokens().any(|t| t == "close");
            keep |= tokens().any(|t| t == "keep-alive");
        }
    }
    let body = match (te, chunked, length) {
        (true, _, Some(_)) => return Err(400),
        (true, true, None) => BodyKind::Chunked,
        (true, false, None) => return Err(501),
        (false, _, None | Some(0)) => BodyKind::None,
        (false, _, Some(n)) => BodyKind::Length(n),
    };
    let http10 = version == 0;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let request = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        http10,
        keep_alive: !close && (!http10 || keep),
    };
    Ok(Some((request, body, len)))
}

/// Skips one chunked body at the start of `buf`: `Ok(Some(n))` once complete (n bytes long),
/// `Ok(None)` if more is needed. Stateless and re-run on each read: fine for small bodies.
fn skip_chunked(buf: &[u8]) -> Result<Option<usize>, u16> {
    fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, u16> {
        match buf[at..].windows(2).position(|w| w == b"\r\n") {
            Some(i) => Ok(Some((&buf[at..at + i], at + i + 2))),
            None if buf.len() - at > 8192 => Err(400),
            None => Ok(None),
        }
    }
    let mut at = 0;
    loop {
        let Some((size_line, next)) = line(buf, at)? else {
            return Ok(None);
        };
        let digits = size_line
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let size = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty())
            .and_then(|d| u64::from_str_radix(d, 16).ok())
            .ok_or(400u16)?;
        at = next;
        if size == 0 {
            // Trailer lines, then the empty line.
            loop {
                let Some((trailer, next)) = line(buf, at)? else {
                    return Ok(None);
                };
                at = next;
                if trailer.is_empty() {
                    return Ok(Some(at));
                }
            }
        }
        let end = usize::try_from(size)
            .map_err(|_| 400u16)?
            .checked_add(at)
            .ok_or(400u16)?;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(400);
        }
        at = end + 2;
    }
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// `%XX` and `+` decoding of a query value (invalid escapes are kept as they are).
fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |i: usize| b.get(i).and_then(|&c| (c as char).to_digit(16));
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn render(app: &App, req: Option<&Request>, reply: &Reply, close: bool) -> Vec<u8> {
    let reason = reason(reply.status);
    let connection = match (close, req.is_some_and(|r| r.http10)) {
        (true, _) => "Connection: close\r\n",
        (false, true) => "Connection: keep-alive\r\n",
        (false, false) => "",
    };
    let head_only = req.is_some_and(|r| r.method == "HEAD");
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}{connection}\r\n",
        reply.status,
        reply.content_type,
        reply.body.len(),
        app.ident
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(&reply.body);
    }
    out
}

/// Reads more into `buf`; false on EOF, error, idle timeout, or shutdown while `idle`.
async fn fill(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    stop: &mut watch::Receiver<bool>,
    app: &App,
    idle: bool,
) -> bool {
    buf.reserve(8192);
    if idle && app.stopping.load(Ordering::SeqCst) {
        return matches!(stream.try_read_buf(buf), Ok(n) if n > 0);
    }
    tokio::select! {
        r = tokio::time::timeout(IDLE_TIMEOUT, stream.read_buf(buf)) => matches!(r, Ok(Ok(n)) if n > 0),
        _ = stop.changed(), if idle => matches!(stream.try_read_buf(buf), Ok(n) if n > 0),
    }
}

async fn connection(
    mut stream: TcpStream,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(8192);
    let error = loop {
        let parsed = if buf.is_empty() {
            Ok(None)
        } else {
            parse_head(&buf)
        };
        let (req, body, len) = match parsed {
            Ok(Some(p)) => p,
            Ok(None) => {
                let idle = buf.is_empty();
                if !fill(&mut stream, &mut buf, &mut stop, &app, idle).await {
                    break None;
                }
                continue;
            }
            Err(status) => break Some(status),
        };
        buf.advance(len);
        // Read and discard the request body.
        let skipped = match body {
            BodyKind::None => Ok(()),
            BodyKind::Length(mut left) => loop {
                let n = left.min(buf.len() as u64);
                buf.advance(n as usize);
                left -= n;
                if left == 0 {
                    break Ok(());
                }
                if !fill(&mut stream, &mut buf, &mut stop, &app, false).await {
                    break Err(None);
                }
            },
            BodyKind::Chunked => loop {
                match skip_chunked(&buf) {
                    Ok(Some(n)) => {
                        buf.advance(n);
                        break Ok(());
                    }
                    Ok(None) if buf.len() > 16 << 20 => break Err(Some(413)),
                    Ok(None) => {
                        if !fill(&mut stream, &mut buf, &mut stop, &app, false).await {
                            break Err(None);
                        }
                    }
                    Err(status) => break Err(Some(status)),
                }
            },
        };
        if let Err(status) = skipped {
            break status;
        }
        if HANG.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let reply = handle(&app, &req).await;
        let close = !req.keep_alive || app.stopping.load(Ordering::SeqCst);
        let written = stream
            .write_all(&render(&app, Some(&req), &reply, close))
            .await;
        match reply.after {
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
        if written.is_err() || close {
            break None;
        }
    };
    if let Some(status) = error {
        let reply = Reply::text(
            status,
            format!("{status} {}\n", reason(status).to_lowercase()),
        );
        let _ = stream.write_all(&render(&app, None, &reply, true)).await;
    }
    // Close our side, then drain briefly so unread input does not turn into a RST.
    if stream.shutdown().await.is_ok() {
        let mut sink = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let (r, body, len) = parse_head(b"GET /exit?code=7 HTTP/1.0\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.path.as_str(), r.query.as_str(), r.keep_alive),
            ("/exit", "code=7", false)
        );
        assert_eq!((body, len), (BodyKind::None, 29));
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(chunked).unwrap().unwrap().1, BodyKind::Chunked);
        assert!(parse_head(b"GET / HTTP/1.1\r\n").unwrap().is_none());
        assert_eq!(parse_head(b"bogus\r\n\r\n").err(), Some(400));
        let both = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(both).err(), Some(400));
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(skip_chunked(b"3\r\nabc\r\n0\r\n\r\nNEXT"), Ok(Some(13)));
        assert_eq!(
            skip_chunked(b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"),
            Ok(Some(23))
        );
        assert_eq!(skip_chunked(b"3\r\nab"), Ok(None));
        assert_eq!(skip_chunked(b"zz\r\n"), Err(400));
        assert_eq!(skip_chunked(b"3\r\nabcXY"), Err(400));
    }

    #[test]
    fn url_decoding() {
        assert_eq!(url_decode("127.0.0.1%3A80"), "127.0.0.1:80");
        assert_eq!(url_decode("a+b%2"), "a b%2");
        assert_eq!(url_decode("%zz%41"), "%zzA");
    }
}
