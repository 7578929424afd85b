//! The kit's HTTP/1.1 server: [`serve`] runs a [`Handler`] on the socket of a [`Worker`]
//! (TCP, or the unix socket of `transport: unix`) until SIGTERM/SIGINT.
//!
//! Keep-alive and pipelining, HTTP/1.0, request bodies (`Content-Length` or chunked) read and
//! discarded, replies with `Content-Length` and the identity headers
//! `X-Worker`/`X-Instance`/`X-Generation`. Graceful stop: stop accepting, finish the requests
//! in flight, close idle connections, exit 0; a second signal exits at once.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::listen::Inherited;
use crate::{Worker, log};

const MAX_HEAD: usize = 64 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);

// ---------------------------------------------------------------------------------------------
// What a worker plugs in

/// A connection's byte stream (TCP or unix), as [`Handler::after`] sees it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A worker's endpoints.
pub trait Handler: Send + Sync + 'static {
    /// What a reply asks for once it has been written (`()` when there is nothing).
    type After: Default + Send;

    /// Answers one request (every path but `/health`); its body has already been read and
    /// discarded.
    fn handle(&self, req: &Request) -> impl Future<Output = Reply<Self::After>> + Send;

    /// Answers `/health`, the path tqproxy's health checks ask (`health: { path: /health }`):
    /// `200 ok` unless the worker says otherwise.
    fn health(&self) -> impl Future<Output = Reply<Self::After>> + Send {
        async { Reply::text(200, "ok\n") }
    }

    /// Runs once a reply has been written (whether or not the write succeeded), before the
    /// connection reads its next request.
    fn after(&self, _after: Self::After, _stream: &mut dyn Io) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A request head (the body is not kept).
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The raw query string (without `?`; see [`query_param`]).
    pub query: String,
    pub http10: bool,
    pub keep_alive: bool,
}

/// A reply; the kit adds `Content-Length`, the identity headers and `Connection`.
pub struct Reply<A = ()> {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// What [`Handler::after`] gets once the reply has been written.
    pub after: A,
}

impl<A: Default> Reply<A> {
    /// A `text/plain` reply.
    pub fn text(status: u16, body: impl Into<String>) -> Reply<A> {
        Reply {
            status,
            content_type: "text/plain",
            body: body.into().into_bytes(),
            after: A::default(),
        }
    }

    /// A `200` `application/json` reply (one line).
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
// Serving

/// Serves `handler` on a current-thread runtime until SIGTERM/SIGINT, then exits the process:
/// 0 once every request in flight has been answered, 143/130 on a second signal, 1 when it
/// cannot listen.
pub fn serve<H: Handler>(worker: Worker, handler: H) -> ! {
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
    let code = runtime.block_on(run(worker, handler));
    std::process::exit(code);
}

struct Server<H> {
    handler: H,
    /// The identity response headers, each ending in CRLF.
    ident: String,
    /// Set once a signal asked us to stop: connections close after their current request.
    stopping: AtomicBool,
}

/// Where connections come from.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    async fn open(worker: &mut Worker) -> io::Result<(Listener, String)> {
        let listener = match worker.inherited.take() {
            Some(Inherited::Tcp(l)) => Listener::Tcp(TcpListener::from_std(l)?),
            Some(Inherited::Unix(l)) => Listener::Unix(UnixListener::from_std(l)?),
            None => {
                let addr = SocketAddr::from(([127, 0, 0, 1], worker.port.unwrap_or(0)));
                Listener::Tcp(TcpListener::bind(addr).await?)
            }
        };
        let addr = match &listener {
            Listener::Tcp(l) => l.local_addr()?.to_string(),
            Listener::Unix(l) => match l.local_addr()?.as_pathname() {
                Some(p) => format!("unix:{}", p.display()),
                None => "an unnamed unix socket".into(),
            },
        };
        Ok((listener, addr))
    }

    /// Accepts one connection and starts its task.
    async fn accept_and_spawn<H: Handler>(
        &self,
        server: &Arc<Server<H>>,
        stop: &watch::Receiver<bool>,
        done: &mpsc::Sender<()>,
    ) -> io::Result<()> {
        let (server, stop, done) = (server.clone(), stop.clone(), done.clone());
        match self {
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, server, stop, done));
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                tokio::spawn(connection(stream, server, stop, done));
            }
        }
        Ok(())
    }
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

/// The next watchdog tick; never without a watchdog.
async fn tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn run<H: Handler>(mut worker: Worker, handler: H) -> i32 {
    let (listener, addr) = match Listener::open(&mut worker).await {
        Ok(l) => l,
        Err(e) => {
            log!(
                "cannot listen on 127.0.0.1:{}: {e}",
                worker.port.unwrap_or(0)
            );
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
    let (pid, inst, generation) = (std::process::id(), &worker.instance, &worker.generation);
    log!("instance {inst} gen {generation} listening on {addr} (pid {pid})");
    // `ready: notify`: ready as soon as the socket accepts (before the first request).
    let notifier = crate::notify::Notifier::from_env();
    notifier.send(&format!("READY=1\nSTATUS=listening on {addr}"));
    let mut watchdog = notifier.watchdog_every().map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let server = Arc::new(Server {
        handler,
        ident: format!(
            "X-Worker: {}\r\nX-Instance: {inst}\r\nX-Generation: {generation}\r\n",
            worker.name
        ),
        stopping: AtomicBool::new(false),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone of `done_tx`; `done_rx` yields `None` once all are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut accept_errors = (0u64, None);
    let signame = loop {
        tokio::select! {
            accepted = listener.accept_and_spawn(&server, &stop_rx, &done_tx) => {
                if let Err(e) = accepted {
                    log_accept_error(&e, &mut accept_errors);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            _ = tick(&mut watchdog) => notifier.send("WATCHDOG=1"),
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    notifier.send(&format!("STOPPING=1\nSTATUS=stopping after {signame}"));
    drop(listener);
    server.stopping.store(true, Ordering::SeqCst);
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

/// Reads what has already arrived, without waiting: false when nothing has (or EOF, error).
async fn read_ready<S: Io>(stream: &mut S, buf: &mut BytesMut) -> bool {
    let mut read = pin!(stream.read_buf(buf));
    std::future::poll_fn(|cx| {
        Poll::Ready(matches!(read.as_mut().poll(cx), Poll::Ready(Ok(n)) if n > 0))
    })
    .await
}

/// Reads more into `buf`; false on EOF, error, idle timeout, or shutdown while `idle`.
async fn fill<S: Io>(
    stream: &mut S,
    buf: &mut BytesMut,
    stop: &mut watch::Receiver<bool>,
    stopping: &AtomicBool,
    idle: bool,
) -> bool {
    buf.reserve(8192);
    if idle && stopping.load(Ordering::SeqCst) {
        return read_ready(stream, buf).await;
    }
    tokio::select! {
        r = tokio::time::timeout(IDLE_TIMEOUT, stream.read_buf(buf)) => matches!(r, Ok(Ok(n)) if n > 0),
        _ = stop.changed(), if idle => read_ready(stream, buf).await,
    }
}

async fn connection<H: Handler, S: Io>(
    mut stream: S,
    server: Arc<Server<H>>,
    mut stop: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
) {
    let stopping = &server.stopping;
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
                if !fill(&mut stream, &mut buf, &mut stop, stopping, idle).await {
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
                if !fill(&mut stream, &mut buf, &mut stop, stopping, false).await {
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
                        if !fill(&mut stream, &mut buf, &mut stop, stopping, false).await {
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
        let reply = if req.path == "/health" {
            server.handler.health().await
        } else {
            server.handler.handle(&req).await
        };
        let close = !req.keep_alive || stopping.load(Ordering::SeqCst);
        let written = stream
            .write_all(&render(&server.ident, Some(&req), &reply, close))
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
            .write_all(&render(&server.ident, None, &reply, true))
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
