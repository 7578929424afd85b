//! The compact HTTP/1.1 core shared by the `chaos` and `probe` workers.
//!
//! Each binary includes this file as a module (`#[macro_use] #[path = "../common/http.rs"] mod
//! http;`, which also gives it `log!`) and its crate root defines `const PROG: &str`, the name
//! that prefixes its log lines. The core
//! implements the worker contract (DESIGN.md, "Worker contract"): the identity from `PORT` and
//! `WORKER_*`, fd 3 socket passing (`LISTEN_FDS`/`LISTEN_PID`), graceful SIGTERM/SIGINT (stop
//! accepting, finish the requests in flight, exit 0; a second signal exits at once), and
//! keep-alive HTTP/1.1 answers carrying `X-Worker`/`X-Instance`/`X-Generation`. Request bodies
//! (`Content-Length` or chunked) are read and discarded; the binary's [`Handler`] answers.
//!
//! `hello` has its own, performance-tuned core: it is the benchmark backend.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

const MAX_HEAD: usize = 64 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// One line on stderr, prefixed with the binary's `PROG`.
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}: {}\n", $crate::PROG, format_args!($($arg)*));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

// ---------------------------------------------------------------------------------------------
// What a worker binary plugs in

/// A worker's endpoints.
pub trait Handler: Send + Sync + 'static {
    /// What a reply asks for once it has been written (`()` when there is nothing).
    type After: Default + Send;

    /// Answers one request; its body has already been read and discarded.
    fn handle(&self, req: &Request) -> impl Future<Output = Reply<Self::After>> + Send;

    /// Runs once a reply has been written (whether or not the write succeeded), before the
    /// connection reads its next request.
    fn after(
        &self,
        _after: Self::After,
        _stream: &mut TcpStream,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub http10: bool,
    pub keep_alive: bool,
}

pub struct Reply<A = ()> {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub after: A,
}

impl<A: Default> Reply<A> {
    pub fn text(status: u16, body: impl Into<String>) -> Reply<A> {
        Reply {
            status,
            content_type: "text/plain",
            body: body.into().into_bytes(),
            after: A::default(),
        }
    }

    pub fn json(value: Value) -> Reply<A> {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        Reply {
            status: 200,
            content_type: "application/json",
            body,
            after: A::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Start-up

/// A non-empty environment variable.
pub fn env_var(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// `s` without control characters (it ends up in response headers and log lines).
pub fn clean(s: String) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// The worker's identity and port, from the environment tqproxy sets.
pub struct Worker {
    pub instance: String,
    pub generation: String,
    port: u16,
    /// The identity response headers, each ending in CRLF.
    ident: String,
    /// Set once a signal asked us to stop: connections close after their current request.
    stopping: AtomicBool,
}

impl Worker {
    /// Reads `PORT` (exits with 2 when it is missing or not a port number) and
    /// `WORKER_NAME`/`WORKER_INSTANCE`/`WORKER_GENERATION` (defaults `PROG`, `0`, `0`).
    pub fn from_env() -> Worker {
        let Some(port) = env_var("PORT") else {
            // `transport: unix` sets no PORT: say that this worker cannot serve it.
            match crate::listen::inherited_listener() {
                Err(e) => log!("{e}"),
                Ok(_) => log!("PORT is not set"),
            }
            std::process::exit(2);
        };
        let Ok(port) = port.trim().parse::<u16>() else {
            log!("PORT={port:?} is not a port number");
            std::process::exit(2);
        };
        let (name, instance, generation) = (
            clean(env_var("WORKER_NAME").unwrap_or_else(|| crate::PROG.into())),
            clean(env_var("WORKER_INSTANCE").unwrap_or_else(|| "0".into())),
            clean(env_var("WORKER_GENERATION").unwrap_or_else(|| "0".into())),
        );
        let ident =
            format!("X-Worker: {name}\r\nX-Instance: {instance}\r\nX-Generation: {generation}\r\n");
        Worker {
            instance,
            generation,
            port,
            ident,
            stopping: AtomicBool::new(false),
        }
    }
}

/// fd 3 when tqproxy passed a listening socket (see `listen.rs`); a passed but unusable fd 3
/// is logged and ignored.
pub fn inherited_listener() -> Option<std::net::TcpListener> {
    crate::listen::inherited_listener().unwrap_or_else(|e| {
        log!("{e}");
        None
    })
}

/// Serves on a current-thread runtime until SIGTERM/SIGINT, then exits the process.
pub fn run<H: Handler>(worker: Worker, handler: H, inherited: Option<std::net::TcpListener>) -> ! {
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
    let server = Arc::new(Server { worker, handler });
    let code = runtime.block_on(serve(server, inherited));
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Serving

struct Server<H> {
    worker: Worker,
    handler: H,
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

async fn serve<H: Handler>(
    server: Arc<Server<H>>,
    inherited: Option<std::net::TcpListener>,
) -> i32 {
    let worker = &server.worker;
    let bound = match inherited {
        Some(l) => TcpListener::from_std(l),
        None => TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], worker.port))).await,
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            log!("cannot listen on 127.0.0.1:{}: {e}", worker.port);
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
    let (pid, inst, generation) = (std::process::id(), &worker.instance, &worker.generation);
    log!("instance {inst} gen {generation} listening on {addr} (pid {pid})");
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut accept_errors = (0u64, None);
    let signame = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, server.clone(), stop_rx.clone(), done_tx.clone()));
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
    worker.stopping.store(true, Ordering::SeqCst);
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

/// The raw (still URL-encoded) value of `key` in a query string.
pub fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// `%XX` and `+` decoding of a query value (invalid escapes are kept as they are).
pub fn url_decode(s: &str) -> String {
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

fn render<A>(ident: &str, req: Option<&Request>, reply: &Reply<A>, close: bool) -> Vec<u8> {
    let reason = reason(reply.status);
    let connection = match (close, req.is_some_and(|r| r.http10)) {
        (true, _) => "Connection: close\r\n",
        (false, true) => "Connection: keep-alive\r\n",
        (false, false) => "",
    };
    let head_only = req.is_some_and(|r| r.method == "HEAD");
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{ident}{connection}\r\n",
        reply.status,
        reply.content_type,
        reply.body.len(),
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
    worker: &Worker,
    idle: bool,
) -> bool {
    buf.reserve(8192);
    if idle && worker.stopping.load(Ordering::SeqCst) {
        return matches!(stream.try_read_buf(buf), Ok(n) if n > 0);
    }
    tokio::select! {
        r = tokio::time::timeout(IDLE_TIMEOUT, stream.read_buf(buf)) => matches!(r, Ok(Ok(n)) if n > 0),
        _ = stop.changed(), if idle => matches!(stream.try_read_buf(buf), Ok(n) if n > 0),
    }
}

async fn connection<H: Handler>(
    mut stream: TcpStream,
    server: Arc<Server<H>>,
    mut stop: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
) {
    let worker = &server.worker;
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
                if !fill(&mut stream, &mut buf, &mut stop, worker, idle).await {
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
                if !fill(&mut stream, &mut buf, &mut stop, worker, false).await {
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
                        if !fill(&mut stream, &mut buf, &mut stop, worker, false).await {
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
        let reply = server.handler.handle(&req).await;
        let close = !req.keep_alive || worker.stopping.load(Ordering::SeqCst);
        let written = stream
            .write_all(&render(&worker.ident, Some(&req), &reply, close))
            .await;
        server.handler.after(reply.after, &mut stream).await;
        if written.is_err() || close {
            break None;
        }
    };
    if let Some(status) = error {
        let reply = Reply::<H::After>::text(
            status,
            format!("{status} {}\n", reason(status).to_lowercase()),
        );
        let _ = stream
            .write_all(&render(&worker.ident, None, &reply, true))
            .await;
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

// These run in each including binary's test harness.
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
        let (r, body, _) = parse_head(b"GET /read?path=%2Ftmp HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.path.as_str(), query_param(&r.query, "path"), r.keep_alive),
            ("/read", Some("%2Ftmp"), true)
        );
        assert_eq!(body, BodyKind::None);
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
        assert_eq!(skip_chunked(b"1\r\nx\r\n0\r\n\r\n"), Ok(Some(11)));
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
        assert_eq!(url_decode("%2Fetc%2Fpasswd"), "/etc/passwd");
        assert_eq!(url_decode("a+b%2"), "a b%2");
        assert_eq!(url_decode("%zz%41%e2%82%ac"), "%zzA\u{20ac}");
    }
}
