//! `probe` — a worker that reports the sandbox it runs in, as seen from inside.
//!
//! tqproxy's isolation tests start it under a worker config and compare what it reports with
//! that config (youki's habit: verify isolation from inside). It follows the worker contract
//! (DESIGN.md, "Worker contract") with a compact HTTP core duplicated from `chaos`.
//!
//! | request            | answer                                                                  |
//! |--------------------|-------------------------------------------------------------------------|
//! | `GET /`            | JSON: credentials, no_new_privs, seccomp, cgroups and their limits, rlimits, pids, hostname, namespaces, interfaces, mounts, cwd, env |
//! | `GET /read?path=P` | `{"path","readable","error","is_dir"}`: can P be read (a dir: listed)?   |
//! | `GET /write?path=P`| `{"path","writable","error"}`: can P be created/appended to?             |
//! | `GET /health`      | `ok`                                                                    |
//!
//! Anything unreadable becomes `null` with a line in the report's `errors` list.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

const PROG: &str = "probe";
const MAX_HEAD: usize = 64 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// v1 reports "no limit" as a huge number (`PAGE_COUNTER_MAX` pages, or `i64::MAX`).
const V1_UNLIMITED: u64 = 1 << 62;

macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("{}: {}\n", PROG, format_args!($($arg)*));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

struct App {
    instance: String,
    generation: String,
    port: u16,
    ident: String,
    stopping: AtomicBool,
}

fn main() {
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
    let inherited = inherited_listener();
    let name = clean(var("WORKER_NAME").unwrap_or_else(|| PROG.into()));
    let instance = clean(var("WORKER_INSTANCE").unwrap_or_else(|| "0".into()));
    let generation = clean(var("WORKER_GENERATION").unwrap_or_else(|| "0".into()));
    let ident =
        format!("X-Worker: {name}\r\nX-Instance: {instance}\r\nX-Generation: {generation}\r\n");
    let app = App {
        instance,
        generation,
        port,
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

struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain",
            body: body.into().into_bytes(),
        }
    }

    fn json(value: Value) -> Reply {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        Reply {
            status: 200,
            content_type: "application/json",
            body,
        }
    }
}

async fn handle(_app: &App, req: &Request) -> Reply {
    let path = query_param(&req.query, "path").map(url_decode);
    match (req.path.as_str(), path) {
        ("/", _) => Reply::json(report()),
        ("/health", _) => Reply::text(200, "ok\n"),
        ("/read", Some(p)) => Reply::json(try_read(&p)),
        ("/write", Some(p)) => Reply::json(try_write(&p)),
        ("/read" | "/write", None) => Reply::text(400, "path=P is required\n"),
        _ => Reply::text(404, "not found\n"),
    }
}

fn err_str(e: impl std::fmt::Display) -> Value {
    Value::String(e.to_string())
}

fn try_read(path: &str) -> Value {
    let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
    let result = if is_dir {
        std::fs::read_dir(path).map(drop)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read(&mut [0u8; 1]).map(drop))
    };
    let error = result.err().map_or(Value::Null, err_str);
    json!({"path": path, "readable": error.is_null(), "error": error, "is_dir": is_dir})
}

fn try_write(path: &str) -> Value {
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(b"probe\n"));
    let error = result.err().map_or(Value::Null, err_str);
    json!({"path": path, "writable": error.is_null(), "error": error})
}

/// Collects the `GET /` report; whatever cannot be read is `null` plus a line in `errors`.
fn report() -> Value {
    use nix::sys::resource::{Resource, getrlimit};
    use nix::unistd;
    let mut errors: Vec<String> = Vec::new();
    let mut read = |path: &str| match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) => {
            errors.push(format!("{path}: {e}"));
            None
        }
    };
    let status = read("/proc/self/status").unwrap_or_default();
    let cgroup = read("/proc/self/cgroup").unwrap_or_default();
    let mountinfo = read("/proc/self/mountinfo").unwrap_or_default();
    let field = |key: &str| status_field(&status, key);
    let field_u32 = |key: &str| field(key).and_then(|v| v.parse::<u32>().ok());

    let mut limit = |controller: &str, v1_file: &str, v2_file: &str| -> Option<String> {
        let (dir, v1) = cgroup_dir(&cgroup, &mountinfo, controller)?;
        let file = format!("{dir}/{}", if v1 { v1_file } else { v2_file });
        match std::fs::read_to_string(&file) {
            Ok(s) => Some(s.trim().to_string()),
            Err(e) => {
                errors.push(format!("{controller}: {file}: {e}"));
                None
            }
        }
    };
    let memory_limit =
        limit("memory", "memory.limit_in_bytes", "memory.max").and_then(|v| parse_limit(&v));
    let pids_max = limit("pids", "pids.max", "pids.max").and_then(|v| parse_limit(&v));
    let cpu_quota = match cgroup_dir(&cgroup, &mountinfo, "cpu") {
        Some((_, true)) => {
            let quota = limit("cpu", "cpu.cfs_quota_us", "");
            let period = limit("cpu", "cpu.cfs_period_us", "");
            quota
                .zip(period)
                .and_then(|(q, p)| parse_cpu_max(&format!("{q} {p}")))
        }
        Some((_, false)) => limit("cpu", "", "cpu.max").and_then(|v| parse_cpu_max(&v)),
        None => None,
    };
    let cpu_quota = cpu_quota.map(|(q, p)| json!({"quota_us": q, "period_us": p}));

    let mut rlimit = |r: Resource, name: &str| match getrlimit(r) {
        Ok((soft, hard)) => json!([soft, hard]),
        Err(e) => {
            errors.push(format!("getrlimit({name}): {e}"));
            Value::Null
        }
    };
    let rlimit_nofile = rlimit(Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE");
    let rlimit_core = rlimit(Resource::RLIMIT_CORE, "RLIMIT_CORE");

    let mut namespaces = serde_json::Map::new();
    for ns in ["pid", "mnt", "net", "ipc", "uts", "user", "cgroup"] {
        let path = format!("/proc/self/ns/{ns}");
        let value = match std::fs::read_link(&path) {
            Ok(t) => Value::String(t.to_string_lossy().into_owned()),
            Err(e) => {
                errors.push(format!("{path}: {e}"));
                Value::Null
            }
        };
        namespaces.insert(ns.into(), value);
    }

    let interfaces = match std::fs::read_to_string("/proc/self/net/dev") {
        Ok(dev) => net_dev_interfaces(&dev),
        Err(e) => {
            errors.push(format!("/proc/self/net/dev: {e}"));
            let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            names
        }
    };
    let hostname = match unistd::gethostname() {
        Ok(h) => Value::String(h.to_string_lossy().into_owned()),
        Err(e) => {
            errors.push(format!("gethostname: {e}"));
            Value::Null
        }
    };
    let groups = match unistd::getgroups() {
        Ok(g) => json!(g.iter().map(|g| g.as_raw()).collect::<Vec<_>>()),
        Err(e) => {
            errors.push(format!("getgroups: {e}"));
            Value::Null
        }
    };
    let cwd = match std::env::current_dir() {
        Ok(d) => Value::String(d.to_string_lossy().into_owned()),
        Err(e) => {
            errors.push(format!("getcwd: {e}"));
            Value::Null
        }
    };
    let env: BTreeMap<&str, Option<String>> = [
        "WORKER_NAME",
        "WORKER_INSTANCE",
        "WORKER_GENERATION",
        "PORT",
        "WORKER_PORT",
        "LISTEN_FDS",
        "LISTEN_PID",
    ]
    .into_iter()
    .map(|k| (k, std::env::var(k).ok()))
    .collect();
    // Asked of the paths themselves (a mount stacked on "/" does not change our root); the
    // mountinfo entry is the fallback.
    let mounts_ro_root = match nix::sys::statvfs::statvfs("/") {
        Ok(st) => st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        Err(e) => {
            errors.push(format!("statvfs(/): {e}"));
            last_mount(&mountinfo, "/").is_some_and(|m| m.options.split(',').any(|o| o == "ro"))
        }
    };
    let tmp_is_private = match nix::sys::statfs::statfs("/tmp") {
        Ok(st) => st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC,
        Err(e) => {
            errors.push(format!("statfs(/tmp): {e}"));
            last_mount(&mountinfo, "/tmp").is_some_and(|m| m.fstype == "tmpfs")
        }
    };
    json!({
        "uid": unistd::getuid().as_raw(),
        "gid": unistd::getgid().as_raw(),
        "euid": unistd::geteuid().as_raw(),
        "egid": unistd::getegid().as_raw(),
        "groups": groups,
        "no_new_privs": field("NoNewPrivs") == Some("1"),
        "seccomp": field_u32("Seccomp").unwrap_or(0),
        "seccomp_filters": field_u32("Seccomp_filters").unwrap_or(0),
        "cap_eff": field("CapEff"),
        "cgroups": cgroup.lines().collect::<Vec<_>>(),
        "memory_limit_bytes": memory_limit,
        "pids_max": pids_max,
        "cpu_quota": cpu_quota,
        "rlimit_nofile": rlimit_nofile,
        "rlimit_core": rlimit_core,
        "pid": std::process::id(),
        "ppid": unistd::getppid().as_raw(),
        "hostname": hostname,
        "namespaces": namespaces,
        "interfaces": interfaces,
        "mounts_ro_root": mounts_ro_root,
        "tmp_is_private": tmp_is_private,
        "cwd": cwd,
        "env": env,
        "errors": errors,
    })
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers (pure)

/// The value of `key:` in /proc/self/status (e.g. `Seccomp:\t2` → `2`).
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// One line of /proc/self/cgroup: `4:memory:/a/b` → (4, ["memory"], "/a/b").
fn parse_cgroup_line(line: &str) -> Option<(u32, Vec<&str>, &str)> {
    let mut parts = line.splitn(3, ':');
    let id = parts.next()?.parse().ok()?;
    let controllers = parts.next()?;
    let path = parts.next()?;
    let controllers = controllers.split(',').filter(|c| !c.is_empty()).collect();
    Some((id, controllers, path))
}

/// One line of /proc/self/mountinfo (only the fields the probe needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mount<'a> {
    root: &'a str,
    mount_point: &'a str,
    options: &'a str,
    fstype: &'a str,
    super_options: &'a str,
}

/// `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
fn parse_mountinfo_line(line: &str) -> Option<Mount<'_>> {
    let (before, after) = line.split_once(" - ")?;
    let mut f = before.split(' ');
    let (_id, _parent, _dev) = (f.next()?, f.next()?, f.next()?);
    let (root, mount_point, options) = (f.next()?, f.next()?, f.next()?);
    let mut a = after.split(' ');
    let (fstype, _source) = (a.next()?, a.next()?);
    Some(Mount {
        root,
        mount_point,
        options,
        fstype,
        super_options: a.next().unwrap_or(""),
    })
}

/// The mount that is visible at `mount_point` (the last one mounted there).
fn last_mount<'a>(mountinfo: &'a str, mount_point: &str) -> Option<Mount<'a>> {
    mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .rfind(|m| m.mount_point == mount_point)
}

/// The cgroup directory holding `controller`'s files for this process, and whether it is v1.
///
/// A v1 line naming the controller wins (hybrid hosts also have a `0::` line for an empty
/// cgroup2); the mount point comes from mountinfo, else `/sys/fs/cgroup[/<controller>]`.
fn cgroup_dir(cgroup: &str, mountinfo: &str, controller: &str) -> Option<(String, bool)> {
    let lines: Vec<_> = cgroup.lines().filter_map(parse_cgroup_line).collect();
    let mounts: Vec<_> = mountinfo.lines().filter_map(parse_mountinfo_line).collect();
    let join = |mount: Option<&Mount>, default: String, path: &str| {
        let (base, root) = mount.map_or((default, "/"), |m| (m.mount_point.to_string(), m.root));
        let rel = match path.strip_prefix(root) {
            Some(rest) if root != "/" => rest,
            _ => path,
        };
        format!(
            "{}/{}",
            base.trim_end_matches('/'),
            rel.trim_start_matches('/')
        )
        .trim_end_matches('/')
        .to_string()
    };
    if let Some((_, _, path)) = lines
        .iter()
        .find(|(id, c, _)| *id != 0 && c.contains(&controller))
    {
        let mount = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == controller));
        return Some((
            join(mount, format!("/sys/fs/cgroup/{controller}"), path),
            true,
        ));
    }
    let (_, _, path) = lines.iter().find(|(id, c, _)| *id == 0 && c.is_empty())?;
    let mount = mounts.iter().find(|m| m.fstype == "cgroup2");
    Some((join(mount, "/sys/fs/cgroup".to_string(), path), false))
}

/// `memory.max`/`pids.max`/`memory.limit_in_bytes` → bytes or count; "max" and huge v1 values
/// (≥ 2^62) mean unlimited → `None`.
fn parse_limit(v: &str) -> Option<u64> {
    v.trim().parse::<u64>().ok().filter(|n| *n < V1_UNLIMITED)
}

/// `cpu.max` ("50000 100000", "max 100000") or v1 "quota period" (quota -1 = none).
fn parse_cpu_max(v: &str) -> Option<(i64, u64)> {
    let (quota, period) = v.trim().split_once(' ')?;
    let quota: i64 = quota.parse().ok().filter(|q| *q >= 0)?;
    Some((quota, period.trim().parse().ok()?))
}

/// Interface names from /proc/net/dev (two header lines, then `  name: counters`).
fn net_dev_interfaces(dev: &str) -> Vec<String> {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect()
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
// HTTP core (the same compact copy as chaos's; each worker is one self-contained file)

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
    // Children must not inherit the listening socket.
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
        let reply = handle(&app, &req).await;
        let close = !req.keep_alive || app.stopping.load(Ordering::SeqCst);
        let written = stream
            .write_all(&render(&app, Some(&req), &reply, close))
            .await;
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
    fn status_fields() {
        let status = "Name:\tprobe\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert_eq!(status_field(status, "Seccomp"), Some("2"));
        assert_eq!(status_field(status, "Seccomp_filters"), Some("1"));
        assert_eq!(status_field(status, "NoNewPrivs"), Some("1"));
        assert_eq!(status_field(status, "Missing"), None);
    }

    #[test]
    fn cgroup_lines() {
        assert_eq!(
            parse_cgroup_line("4:memory:/a/b"),
            Some((4, vec!["memory"], "/a/b"))
        );
        assert_eq!(
            parse_cgroup_line("3:cpu,cpuacct:/x:y"),
            Some((3, vec!["cpu", "cpuacct"], "/x:y"))
        );
        assert_eq!(parse_cgroup_line("0::/w/i-1"), Some((0, vec![], "/w/i-1")));
        assert_eq!(parse_cgroup_line("garbage"), None);
    }

    const HYBRID_CGROUP: &str =
        "9:name=systemd:/\n8:pids:/tq/w\n4:memory:/tq/w\n2:cpu,cpuacct:/tq/w\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
25 1 0:22 / / ro,relatime - overlay overlay rw\n\
30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n\
32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
40 25 0:40 / /tmp rw,nosuid - tmpfs tmpfs rw,size=65536k\n";

    #[test]
    fn cgroup_dirs_v1_hybrid_and_v2() {
        let dir = |c, m, ctl| cgroup_dir(c, m, ctl);
        assert_eq!(
            dir(HYBRID_CGROUP, HYBRID_MOUNTS, "memory"),
            Some(("/sys/fs/cgroup/memory/tq/w".to_string(), true))
        );
        assert_eq!(
            dir(HYBRID_CGROUP, HYBRID_MOUNTS, "cpu"),
            Some(("/sys/fs/cgroup/cpu,cpuacct/tq/w".to_string(), true))
        );
        // No mountinfo entry for pids: the conventional place.
        assert_eq!(
            dir(HYBRID_CGROUP, HYBRID_MOUNTS, "pids"),
            Some(("/sys/fs/cgroup/pids/tq/w".to_string(), true))
        );
        let v2_mounts = "22 1 0:20 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            dir("0::/tq/w/i-1\n", v2_mounts, "memory"),
            Some(("/sys/fs/cgroup/tq/w/i-1".to_string(), false))
        );
        // A cgroup namespace mount whose root is the worker's own cgroup.
        let ns_mount = "22 1 0:20 /tq/w /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            dir("0::/tq/w/i-1\n", ns_mount, "pids"),
            Some(("/sys/fs/cgroup/i-1".to_string(), false))
        );
        assert_eq!(
            dir("0::/\n", "", "memory"),
            Some(("/sys/fs/cgroup".to_string(), false))
        );
        assert_eq!(dir("", "", "memory"), None);
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit("max"), None);
        assert_eq!(parse_limit("268435456\n"), Some(268_435_456));
        assert_eq!(parse_limit("9223372036854771712"), None);
        assert_eq!(parse_cpu_max("max 100000"), None);
        assert_eq!(parse_cpu_max("50000 100000\n"), Some((50_000, 100_000)));
        assert_eq!(parse_cpu_max("-1 100000"), None);
    }

    #[test]
    fn mounts() {
        assert!(last_mount(HYBRID_MOUNTS, "/").is_some_and(|m| m.options.starts_with("ro")));
        assert_eq!(
            last_mount(HYBRID_MOUNTS, "/tmp").map(|m| m.fstype),
            Some("tmpfs")
        );
        assert_eq!(last_mount(HYBRID_MOUNTS, "/var"), None);
        let optional = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue";
        let m = parse_mountinfo_line(optional).unwrap();
        assert_eq!(
            (m.root, m.mount_point, m.fstype),
            ("/mnt1", "/mnt2", "ext3")
        );
        assert_eq!(m.super_options, "rw,errors=continue");
    }

    #[test]
    fn interfaces() {
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n  eth0: 4 5 6\n";
        assert_eq!(net_dev_interfaces(dev), vec!["lo", "eth0"]);
    }

    #[test]
    fn url_decoding() {
        assert_eq!(url_decode("%2Fetc%2Fpasswd"), "/etc/passwd");
        assert_eq!(url_decode("a+b%2"), "a b%2");
        assert_eq!(url_decode("%zz%41%e2%82%ac"), "%zzA\u{20ac}");
    }

    #[test]
    fn heads_and_chunked_bodies() {
        let (r, body, _) = parse_head(b"GET /read?path=%2Ftmp HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.path.as_str(), query_param(&r.query, "path")),
            ("/read", Some("%2Ftmp"))
        );
        assert_eq!(body, BodyKind::None);
        assert_eq!(parse_head(b"nope\r\n\r\n").err(), Some(400));
        assert_eq!(skip_chunked(b"1\r\nx\r\n0\r\n\r\n"), Ok(Some(11)));
    }
}
