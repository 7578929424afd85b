//! `backend` — the upstream of tqproxy's benchmarks and the worker its integration tests and
//! load tests talk to (`workers/hello` is the example to read; this one is tuned).
//!
//! A hand-rolled HTTP/1.1 server on tokio + httparse that follows the worker contract
//! (DESIGN.md, "Worker contract"):
//!
//! - listens on `127.0.0.1:$PORT`, or on the inherited fd 3 when `LISTEN_FDS=1` and
//!   `LISTEN_PID` is this process: a TCP socket (socket passing into a network namespace) or
//!   a unix stream socket (`transport: unix`, then without `PORT`);
//! - SIGTERM (or SIGINT) is graceful: stop accepting, finish every in-flight request, close idle
//!   keep-alive connections, send WebSockets a 1001 close, exit 0. A second signal exits at once;
//! - keep-alive, pipelining, HTTP/1.0, `Content-Length` and chunked request bodies, `Content-Length`
//!   on every response (except `/stream`), 400 + close on malformed input, never a panic.
//!
//! Endpoints:
//!
//! | request                          | answer                                                        |
//! |----------------------------------|---------------------------------------------------------------|
//! | `GET /`                          | `hello from <name> instance <id> generation <gen> (pid <pid>)` |
//! | `GET /health`                    | `ok`                                                          |
//! | `GET /version`                   | `$HELLO_VERSION` or `1`                                       |
//! | `GET /echo-headers`              | JSON: request headers (lower-cased, repeats joined), `method`, `path` |
//! | `POST`/`PUT /echo`               | the request body, same content type                           |
//! | `GET /bytes/<n>`                 | n bytes (≤ 1 GiB, streamed) of `abc…z\n`                      |
//! | `GET /slow?ms=N`                 | `slow done` after N ms (≤ 600000)                             |
//! | `GET /stream?chunks=N&interval_ms=M` | chunked: N chunks `chunk i` every M ms                   |
//! | `GET /ws`                        | WebSocket echo (RFC 6455)                                     |
//! | anything else                    | 404, or the `/` answer when `HELLO_CATCH_ALL=1`               |
//!
//! Other environment: `WORKER_THREADS` (runtime threads, default 1 = current-thread runtime),
//! `HELLO_WS_DRAIN_MS` (delay before open WebSockets get their 1001 close on SIGTERM, default 0).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};

use kit::listen;

const PROG: &str = "backend";
/// Largest request head (request line + headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Largest request body `/echo` buffers.
const MAX_BODY: usize = 64 << 20;
const MAX_BYTES: u64 = 1 << 30;
const MAX_SLOW_MS: u64 = 600_000;
const MAX_STREAM_CHUNKS: u64 = 1_000_000;
/// How long a keep-alive connection (or a half-received request) may stay silent.
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a closing connection drains what the client still sends, so it gets no RST.
const LINGER: Duration = Duration::from_secs(1);
/// How long a WebSocket may take to answer our 1001 close during shutdown.
const WS_CLOSE_GRACE: Duration = Duration::from_secs(5);
const WS_MAX_PAYLOAD: u64 = 16 << 20;
const READ_RESERVE: usize = 16 * 1024;
/// Buffers that grew past this (a big echo) are dropped after the request.
const KEEP_CAPACITY: usize = 1 << 20;
const PATTERN: &[u8; 27] = b"abcdefghijklmnopqrstuvwxyz\n";

/// One line to stderr, prefixed with the program name, in a single `write` so that lines from
/// concurrent tasks never interleave in tqproxy's per-instance log.
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}: {}\n", PROG, format_args!($($arg)*));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

// ---------------------------------------------------------------------------------------------
// Configuration and shared state

struct Config {
    name: String,
    instance: String,
    generation: String,
    /// `None` is fine when tqproxy passes the listening socket (`transport: unix` sets no
    /// `PORT`).
    port: Option<u16>,
    threads: usize,
    catch_all: bool,
    version: String,
    ws_drain: Duration,
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let port = match var("PORT") {
            None => None,
            Some(port) => Some(
                port.trim()
                    .parse()
                    .map_err(|_| format!("PORT={port:?} is not a port number"))?,
            ),
        };
        let threads = match var("WORKER_THREADS") {
            None => 1,
            Some(t) => t
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .ok_or(format!("WORKER_THREADS={t:?} is not a number in 1..=1024"))?,
        };
        let ws_drain = match var("HELLO_WS_DRAIN_MS") {
            None => 0,
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| format!("HELLO_WS_DRAIN_MS={v:?} is not a number"))?,
        };
        Ok(Config {
            name: header_safe(var("WORKER_NAME").unwrap_or_else(|| PROG.into())),
            instance: header_safe(var("WORKER_INSTANCE").unwrap_or_else(|| "0".into())),
            generation: header_safe(var("WORKER_GENERATION").unwrap_or_else(|| "0".into())),
            port,
            threads,
            catch_all: var("HELLO_CATCH_ALL").as_deref() == Some("1"),
            version: header_safe(var("HELLO_VERSION").unwrap_or_else(|| "1".into())),
            ws_drain: Duration::from_millis(ws_drain),
        })
    }
}

/// Environment values end up in response headers: keep them to one printable line.
fn header_safe(s: String) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Immutable per-process state shared by every connection.
struct App {
    cfg: Config,
    /// `X-Worker`, `X-Instance`, `X-Generation` header lines, pre-rendered.
    ident: Vec<u8>,
    root_body: Vec<u8>,
    version_body: Vec<u8>,
    /// The whole keep-alive `GET /` response, pre-rendered for the benchmark path.
    root_response: Vec<u8>,
    /// `PATTERN` repeated to a little under 64 KiB (a whole number of periods).
    pattern_block: Vec<u8>,
    /// Set once at SIGTERM; cheaper to check per request than the watch channel.
    stopping: AtomicBool,
}

impl App {
    fn new(cfg: Config) -> App {
        let ident = format!(
            "X-Worker: {}\r\nX-Instance: {}\r\nX-Generation: {}\r\n",
            cfg.name, cfg.instance, cfg.generation
        )
        .into_bytes();
        let root_body = format!(
            "hello from {} instance {} generation {} (pid {})\n",
            cfg.name,
            cfg.instance,
            cfg.generation,
            std::process::id()
        )
        .into_bytes();
        let version_body = format!("{}\n", cfg.version).into_bytes();
        let mut app = App {
            cfg,
            ident,
            root_body,
            version_body,
            root_response: Vec::new(),
            pattern_block: PATTERN.repeat(65536 / PATTERN.len()),
            stopping: AtomicBool::new(false),
        };
        let meta = Meta {
            close: false,
            http10_keep_alive: false,
            head_only: false,
        };
        let mut out = Vec::new();
        render(&mut out, &app, meta, 200, TEXT, &app.root_body, b"");
        app.root_response = out;
        app
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point, listener, signals

fn main() {
    let cfg = match Config::from_env() {
        Ok(cfg) => cfg,
        Err(msg) => {
            log!("{msg}");
            std::process::exit(2);
        }
    };
    // Claim fd 3 before anything else (the runtime's epoll) can be given that number.
    let inherited = listen::inherited().unwrap_or_else(|e| {
        log!("{e}");
        None
    });
    if inherited.is_none() && cfg.port.is_none() {
        log!("PORT is not set (and no listening socket was passed as fd 3)");
        std::process::exit(2);
    }
    let mut builder = if cfg.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cfg.threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(run(Arc::new(App::new(cfg)), inherited));
    std::process::exit(code);
}

/// Where connections come from: TCP, or the unix socket tqproxy passed (`transport: unix`).
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// The inherited fd 3, or a fresh TCP listener on `127.0.0.1:port`.
    fn open(
        port: Option<u16>,
        inherited: Option<listen::Inherited>,
    ) -> io::Result<(Listener, &'static str)> {
        match inherited {
            Some(listen::Inherited::Tcp(l)) => {
                Ok((Listener::Tcp(TcpListener::from_std(l)?), " (fd 3)"))
            }
            Some(listen::Inherited::Unix(l)) => {
                Ok((Listener::Unix(UnixListener::from_std(l)?), " (fd 3)"))
            }
            None => {
                let port = port.unwrap_or(0);
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.set_reuseaddr(true)?;
                socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
                Ok((Listener::Tcp(socket.listen(1024)?), ""))
            }
        }
    }

    fn local_addr(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Listener::Unix(l) => l.local_addr().map(|a| match a.as_pathname() {
                Some(p) => format!("unix:{}", p.display()),
                None => "an unnamed unix socket".into(),
            }),
        }
    }

    /// Accepts one connection and starts its task (a `Conn` per stream type: no dynamic
    /// dispatch on the request path).
    async fn accept_and_spawn(
        &self,
        app: &Arc<App>,
        stop: &watch::Receiver<bool>,
        done: &mpsc::Sender<()>,
    ) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                tokio::spawn(Conn::new(s, app.clone(), stop.clone(), done.clone()).run());
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                tokio::spawn(Conn::new(s, app.clone(), stop.clone(), done.clone()).run());
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

async fn run(app: Arc<App>, inherited: Option<listen::Inherited>) -> i32 {
    let cfg = &app.cfg;
    let (listener, how) = match Listener::open(cfg.port, inherited) {
        Ok(l) => l,
        Err(e) => {
            log!("cannot listen on 127.0.0.1:{}: {e}", cfg.port.unwrap_or(0));
            return 1;
        }
    };
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            log!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| format!("127.0.0.1:{}", cfg.port.unwrap_or(0)));
    log!(
        "instance {} gen {} listening on {addr}{how} (pid {})",
        cfg.instance,
        cfg.generation,
        std::process::id()
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone of `done_tx`; `done_rx` yields `None` once all are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut accept_errors = (0u64, None);
    let signame = loop {
        tokio::select! {
            accepted = listener.accept_and_spawn(&app, &stop_rx, &done_tx) => match accepted {
                Ok(()) => {}
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
            log!(
                "instance {} gen {} exiting after {signame}: all requests finished (pid {})",
                cfg.instance, cfg.generation, std::process::id()
            );
            0
        }
        _ = term.recv() => { log!("second signal (SIGTERM), exiting now"); 143 }
        _ = int.recv() => { log!("second signal (SIGINT), exiting now"); 130 }
    }
}

// ---------------------------------------------------------------------------------------------
// Request head parsing (pure)

/// Why a request was rejected before it could be routed; the connection is closed after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    BadRequest,
    HeadTooLarge,
    NotImplemented,
}

impl Reject {
    fn status(self) -> u16 {
        match self {
            Reject::BadRequest => 400,
            Reject::HeadTooLarge => 431,
            Reject::NotImplemented => 501,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Root,
    Health,
    Version,
    EchoHeaders,
    Echo,
    Bytes(u64),
    Slow(u64),
    Stream {
        chunks: u64,
        interval_ms: u64,
    },
    /// A valid WebSocket upgrade; carries the `Sec-WebSocket-Accept` value.
    Ws([u8; 28]),
    /// `/ws` without a usable upgrade: 426 (or 400 for a bad key).
    WsRefused(u16),
    NotFound,
    MethodNotAllowed(&'static str),
    BadParam(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    /// Length of the head in bytes (request line, headers and the blank line).
    len: usize,
    http10: bool,
    keep_alive: bool,
    is_head: bool,
    body: BodyKind,
    expect_continue: bool,
    route: Route,
}

/// Parses one request head from the start of `buf`.
///
/// `Ok(None)` means incomplete. Route-specific bytes are left in `scratch`: the content type for
/// `/echo`, the JSON document for `/echo-headers`.
fn parse_head(buf: &[u8], catch_all: bool, scratch: &mut Vec<u8>) -> Result<Option<Head>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(Reject::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadTooLarge),
        Err(_) => return Err(Reject::BadRequest),
    };
    if len > MAX_HEAD {
        return Err(Reject::HeadTooLarge);
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Reject::BadRequest);
    };
    let http10 = version == 0;

    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let (mut conn_close, mut conn_keep_alive, mut conn_upgrade) = (false, false, false);
    let (mut upgrade_ws, mut ws_key, mut ws_version) = (false, None, None);
    let mut expect_continue = false;
    let mut content_type: &[u8] = b"";
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(h.value).ok_or(Reject::BadRequest)?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(Reject::BadRequest);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            // Only a final "chunked" tells where the body ends.
            chunked = tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for t in tokens(h.value) {
                conn_close |= t.eq_ignore_ascii_case(b"close");
                conn_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                conn_upgrade |= t.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            ws_key = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            ws_version = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = trim(h.value).eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = h.value;
        }
    }
    let body = match (transfer_encoding, content_length) {
        // Both framings at once is the classic smuggling vector: refuse it.
        (true, Some(_)) => return Err(Reject::BadRequest),
        (true, None) if chunked => BodyKind::Chunked,
        (true, None) => return Err(Reject::NotImplemented),
        (false, Some(0) | None) => BodyKind::None,
        (false, Some(n)) => BodyKind::Length(n),
    };
    let keep_alive = if http10 {
        conn_keep_alive && !conn_close
    } else {
        !conn_close
    };

    let path_and_query = origin_form(target);
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let is_head = method == "HEAD";
    let route = match path {
        "/" => Route::Root,
        "/health" => Route::Health,
        "/version" => Route::Version,
        "/echo-headers" => {
            scratch.clear();
            echo_headers_json(scratch, method, target, req.headers);
            Route::EchoHeaders
        }
        "/echo" if method == "POST" || method == "PUT" => {
            scratch.clear();
            scratch.extend_from_slice(content_type);
            Route::Echo
        }
        "/echo" => Route::MethodNotAllowed("POST, PUT"),
        "/slow" => match query_num(query, "ms", 0, MAX_SLOW_MS) {
            Some(ms) => Route::Slow(ms),
            None => Route::BadParam("ms must be a number <= 600000\n"),
        },
        "/stream" => match (
            query_num(query, "chunks", 10, MAX_STREAM_CHUNKS),
            query_num(query, "interval_ms", 100, MAX_SLOW_MS),
        ) {
            (Some(chunks), Some(interval_ms)) => Route::Stream {
                chunks,
                interval_ms,
            },
            _ => Route::BadParam("chunks <= 1000000 and interval_ms <= 600000 must be numbers\n"),
        },
        "/ws" if method != "GET" => Route::MethodNotAllowed("GET"),
        "/ws" => match (upgrade_ws && conn_upgrade && !http10, ws_key, ws_version) {
            (false, _, _) => Route::WsRefused(426),
            (true, _, Some(v)) if v != b"13" => Route::WsRefused(426),
            (true, Some(key), Some(_)) if valid_ws_key(key) => Route::Ws(ws_accept(key)),
            _ => Route::WsRefused(400),
        },
        p if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse::<u64>() {
            Ok(n) if n <= MAX_BYTES => Route::Bytes(n),
            _ => Route::BadParam("n must be a number <= 67108864\n"),
        },
        _ if catch_all => Route::Root,
        _ => Route::NotFound,
    };
    Ok(Some(Head {
        len,
        http10,
        keep_alive,
        is_head,
        body,
        expect_continue,
        route,
    }))
}

/// The path of an absolute-form target (`http://host/p?q` → `/p?q`); others unchanged.
fn origin_form(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &target[scheme.len()..];
            return rest.find(['/', '?']).map_or("/", |i| &rest[i..]);
        }
    }
    target
}

fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// Comma-separated tokens of a header value, trimmed, empty ones skipped.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim).filter(|t| !t.is_empty())
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// A numeric query parameter: `default` when absent, `None` when malformed or above `max`.
fn query_num(query: &str, key: &str, default: u64, max: u64) -> Option<u64> {
    match query_param(query, key) {
        None => Some(default),
        Some(v) => v.parse().ok().filter(|n| *n <= max),
    }
}

fn echo_headers_json(out: &mut Vec<u8>, method: &str, target: &str, headers: &[httparse::Header]) {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for h in headers {
        let value = String::from_utf8_lossy(h.value);
        map.entry(h.name.to_ascii_lowercase())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map.insert("method".into(), method.into());
    map.insert("path".into(), target.into());
    if serde_json::to_writer(&mut *out, &map).is_err() {
        out.clear();
        out.extend_from_slice(b"{}");
    }
    out.push(b'\n');
}

// ---------------------------------------------------------------------------------------------
// Chunked transfer-coding (pure, incremental)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a chunk size.
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeSpace,
    /// A chunk extension, skipped up to CR.
    Ext,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// Start of a trailer line (or of the final CRLF).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug)]
struct ChunkedDecoder {
    state: ChunkState,
    size: u64,
    digits: u32,
    /// Length of the current extension or trailer line, bounded.
    line: usize,
}

#[derive(Debug, PartialEq, Eq)]
struct BadChunk;

impl ChunkedDecoder {
    const MAX_LINE: usize = 8 * 1024;

    fn new() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            size: 0,
            digits: 0,
            line: 0,
        }
    }

    fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from `input`, appending data to `out` when given; returns the bytes consumed.
    /// Stops right after the body ends, so what follows (a pipelined request) is left alone.
    fn feed(&mut self, input: &[u8], mut out: Option<&mut Vec<u8>>) -> Result<usize, BadChunk> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            if let Data(left) = self.state {
                let n = left.min((input.len() - i) as u64) as usize;
                if let Some(out) = out.as_deref_mut() {
                    out.extend_from_slice(&input[i..i + n]);
                }
                i += n;
                let left = left - n as u64;
                self.state = if left == 0 { DataCr } else { Data(left) };
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size, _) if b.is_ascii_hexdigit() => {
                    let digit = (b as char).to_digit(16).unwrap_or(0);
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(digit)))
                        .ok_or(BadChunk)?;
                    self.digits += 1;
                    Size
                }
                (Size | SizeSpace, b' ' | b'\t') if self.digits > 0 => SizeSpace,
                (Size | SizeSpace, b';') if self.digits > 0 => Ext,
                (Size | SizeSpace | Ext, b'\r') if self.digits > 0 => SizeLf,
                (Ext, _) if b != b'\n' => {
                    self.line += 1;
                    if self.line > Self::MAX_LINE {
                        return Err(BadChunk);
                    }
                    Ext
                }
                (SizeLf, b'\n') => {
                    let size = self.size;
                    (self.size, self.digits, self.line) = (0, 0, 0);
                    if size == 0 { TrailerStart } else { Data(size) }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (TrailerStart, b'\r') => EndLf,
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, _) if b != b'\n' => {
                    self.line += 1;
                    if self.line > Self::MAX_LINE {
                        return Err(BadChunk);
                    }
                    Trailer
                }
                (TrailerLf, b'\n') => {
                    self.line = 0;
                    TrailerStart
                }
                (EndLf, b'\n') => {
                    self.state = Done;
                    return Ok(i);
                }
                (Done, _) => {
                    return Ok(i - 1);
                }
                _ => return Err(BadChunk),
            };
        }
        Ok(i)
    }
}

// ---------------------------------------------------------------------------------------------
// SHA-1, base64, WebSocket framing (pure)

fn sha1(data: &[u8]) -> [u8; 20] {
    fn compress(h: &mut [u32; 5], block: &[u8]) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = *h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut h = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        compress(&mut h, block);
    }
    let rest = blocks.remainder();
    let mut tail = [0u8; 128];
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let tail_len = if rest.len() < 56 { 64 } else { 128 };
    let bits = (data.len() as u64).wrapping_mul(8);
    tail[tail_len - 8..tail_len].copy_from_slice(&bits.to_be_bytes());
    for block in tail[..tail_len].chunks_exact(64) {
        compress(&mut h, block);
    }
    let mut out = [0u8; 20];
    for (o, v) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&v.to_be_bytes());
    }
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        let sextets = [n >> 18, n >> 12, n >> 6, n].map(|s| B64[(s & 63) as usize]);
        let keep = chunk.len() + 1;
        out.extend_from_slice(&sextets[..keep]);
        out.extend(std::iter::repeat_n(b'=', 4 - keep));
    }
}

/// A `Sec-WebSocket-Key` must be the base64 form of 16 bytes: 22 characters and `==`.
fn valid_ws_key(key: &[u8]) -> bool {
    key.len() == 24 && key.ends_with(b"==") && key[..22].iter().all(|b| B64.contains(b))
}

fn ws_accept(key: &[u8]) -> [u8; 28] {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut input = [0u8; 24 + 36];
    let key = &key[..key.len().min(24)];
    input[..key.len()].copy_from_slice(key);
    input[key.len()..key.len() + GUID.len()].copy_from_slice(GUID);
    let mut encoded = Vec::with_capacity(28);
    base64_encode(&sha1(&input[..key.len() + GUID.len()]), &mut encoded);
    let mut out = [0u8; 28];
    out.copy_from_slice(&encoded);
    out
}

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: u64,
}

/// Parses a client frame header. `Ok(None)`: need more bytes; `Err(code)`: close with `code`.
fn parse_frame_header(buf: &[u8]) -> Result<Option<FrameHeader>, u16> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if b0 & 0x70 != 0
        || !matches!(
            opcode,
            OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        )
    {
        return Err(1002);
    }
    if b1 & 0x80 == 0 {
        return Err(1002); // client frames must be masked
    }
    let (ext, payload_len) = match b1 & 0x7F {
        126 if buf.len() >= 4 => (2, u64::from(u16::from_be_bytes([buf[2], buf[3]]))),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (8, u64::from_be_bytes(n))
        }
        126 | 127 => return Ok(None),
        n => (0, u64::from(n)),
    };
    if opcode >= OP_CLOSE && (!fin || payload_len > 125) {
        return Err(1002);
    }
    if payload_len > WS_MAX_PAYLOAD {
        return Err(1009);
    }
    let header_len = 2 + ext + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[2 + ext..header_len]);
    Ok(Some(FrameHeader {
        fin,
        opcode,
        mask,
        header_len,
        payload_len,
    }))
}

/// Appends an unmasked server frame.
fn push_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=65535 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

// ---------------------------------------------------------------------------------------------
// Response rendering (pure)

const TEXT: &str = "text/plain";
const JSON: &str = "application/json";

#[derive(Debug, Clone, Copy)]
struct Meta {
    /// Send `Connection: close` and close after this response.
    close: bool,
    /// An HTTP/1.0 client that asked for keep-alive gets it confirmed.
    http10_keep_alive: bool,
    /// HEAD: headers only.
    head_only: bool,
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

fn push_num(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Renders the head of a response whose body is `len` bytes (or chunked when `len` is `None`).
fn render_head(
    out: &mut Vec<u8>,
    app: &App,
    meta: Meta,
    status: u16,
    content_type: &[u8],
    len: Option<u64>,
    extra: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_num(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type);
    match len {
        Some(n) => {
            out.extend_from_slice(b"\r\nContent-Length: ");
            push_num(out, n);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"\r\nTransfer-Encoding: chunked\r\n"),
    }
    out.extend_from_slice(&app.ident);
    out.extend_from_slice(extra);
    if meta.close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if meta.http10_keep_alive {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn render(
    out: &mut Vec<u8>,
    app: &App,
    meta: Meta,
    status: u16,
    content_type: &str,
    body: &[u8],
    extra: &[u8],
) {
    let ct = content_type.as_bytes();
    render_head(out, app, meta, status, ct, Some(body.len() as u64), extra);
    if !meta.head_only {
        out.extend_from_slice(body);
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

/// Why a connection ends without another response.
enum End {
    /// EOF, I/O error, idle timeout or shutdown while idle: just close.
    Quiet,
    /// Answer with this status, then close.
    Status(u16),
}

/// What a connection runs on: a TCP or a unix stream. `Conn` is generic over it, so each
/// kind gets its own monomorphised code.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// A non-blocking read into `buf` (`WouldBlock` when nothing is there).
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
}

impl Stream for TcpStream {
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }
}

impl Stream for UnixStream {
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        UnixStream::try_read_buf(self, buf)
    }
}

struct Conn<S> {
    stream: S,
    app: Arc<App>,
    buf: BytesMut,
    out: Vec<u8>,
    body: Vec<u8>,
    scratch: Vec<u8>,
    stop: watch::Receiver<bool>,
    /// Idle timer: fires at most once per `IDLE_TIMEOUT`, re-armed lazily from `deadline`.
    timer: Pin<Box<Sleep>>,
    deadline: Instant,
    _done: mpsc::Sender<()>,
}

impl<S: Stream> Conn<S> {
    fn new(
        stream: S,
        app: Arc<App>,
        stop: watch::Receiver<bool>,
        done: mpsc::Sender<()>,
    ) -> Conn<S> {
        let deadline = Instant::now() + IDLE_TIMEOUT;
        Conn {
            stream,
            app,
            buf: BytesMut::with_capacity(READ_RESERVE),
            out: Vec::with_capacity(1024),
            body: Vec::new(),
            scratch: Vec::new(),
            stop,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            deadline,
            _done: done,
        }
    }

    fn stopping(&self) -> bool {
        self.app.stopping.load(Ordering::Relaxed)
    }

    /// Reads more bytes into `buf`. False on EOF, error or idle timeout, and — when `idle`
    /// (between requests) — on shutdown, after picking up a request that had already arrived.
    async fn fill(&mut self, idle: bool) -> bool {
        if self.buf.capacity() - self.buf.len() < READ_RESERVE / 4 {
            self.buf.reserve(READ_RESERVE);
        }
        if idle && self.stopping() {
            return matches!(self.stream.try_read_buf(&mut self.buf), Ok(n) if n > 0);
        }
        self.deadline = Instant::now() + IDLE_TIMEOUT;
        loop {
            tokio::select! {
                biased;
                r = self.stream.read_buf(&mut self.buf) => return matches!(r, Ok(n) if n > 0),
                _ = self.stop.changed(), if idle => {
                    return matches!(self.stream.try_read_buf(&mut self.buf), Ok(n) if n > 0);
                }
                _ = &mut self.timer => {
                    if Instant::now() >= self.deadline {
                        return false;
                    }
                    let deadline = self.deadline;
                    self.timer.as_mut().reset(deadline);
                }
            }
        }
    }

    async fn run(mut self) {
        let end = loop {
            let head = match self.next_head().await {
                Ok(head) => head,
                Err(end) => break end,
            };
            self.buf.advance(head.len);
            match self.handle(head).await {
                Ok(true) => {}
                Ok(false) => break End::Quiet,
                Err(end) => break end,
            }
            if self.out.capacity() > KEEP_CAPACITY {
                self.out = Vec::with_capacity(1024);
            }
            if self.body.capacity() > KEEP_CAPACITY {
                self.body = Vec::new();
            }
        };
        if let End::Status(status) = end {
            let meta = Meta {
                close: true,
                http10_keep_alive: false,
                head_only: false,
            };
            self.out.clear();
            let body = format!("{} {}\n", status, reason(status).to_ascii_lowercase());
            render(
                &mut self.out,
                &self.app,
                meta,
                status,
                TEXT,
                body.as_bytes(),
                b"",
            );
            let _ = self.stream.write_all(&self.out).await;
        }
        self.linger().await;
    }

    async fn next_head(&mut self) -> Result<Head, End> {
        loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf, self.app.cfg.catch_all, &mut self.scratch) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(reject) => return Err(End::Status(reject.status())),
                }
            }
            let idle = self.buf.is_empty();
            if !self.fill(idle).await {
                return Err(End::Quiet);
            }
        }
    }

    /// Closes our side, then drains what the client still sends for a moment, so a response
    /// followed by unread input is not destroyed by a RST.
    async fn linger(mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let deadline = Instant::now() + LINGER;
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < (1 << 20) {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => total += n,
                _ => break,
            }
        }
    }

    /// Reads (and keeps, when `keep`) the request body.
    async fn read_body(&mut self, kind: BodyKind, keep: bool) -> Result<(), End> {
        self.body.clear();
        match kind {
            BodyKind::None => Ok(()),
            BodyKind::Length(n) if keep && n > MAX_BODY as u64 => Err(End::Status(413)),
            BodyKind::Length(mut left) => loop {
                let take = left.min(self.buf.len() as u64) as usize;
                if keep {
                    self.body.extend_from_slice(&self.buf[..take]);
                }
                self.buf.advance(take);
                left -= take as u64;
                if left == 0 {
                    return Ok(());
                }
                if !self.fill(false).await {
                    return Err(End::Quiet);
                }
            },
            BodyKind::Chunked => {
                let mut decoder = ChunkedDecoder::new();
                loop {
                    let out = if keep { Some(&mut self.body) } else { None };
                    let used = decoder
                        .feed(&self.buf, out)
                        .map_err(|BadChunk| End::Status(400))?;
                    self.buf.advance(used);
                    if decoder.is_done() {
                        return Ok(());
                    }
                    if self.body.len() > MAX_BODY {
                        return Err(End::Status(413));
                    }
                    if !self.fill(false).await {
                        return Err(End::Quiet);
                    }
                }
            }
        }
    }

    /// Serves one request whose head was just consumed. `Ok(false)`: close quietly after it.
    async fn handle(&mut self, head: Head) -> Result<bool, End> {
        let app = self.app.clone();
        if head.expect_continue && !head.http10 && head.body != BodyKind::None {
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        self.read_body(head.body, head.route == Route::Echo).await?;
        let close = !head.keep_alive || self.stopping();
        let meta = Meta {
            close,
            http10_keep_alive: head.http10 && !close,
            head_only: head.is_head,
        };
        self.out.clear();
        match head.route {
            Route::Root if !close && !head.http10 && !head.is_head => {
                // The benchmark path: one pre-rendered buffer, no copy.
                self.stream
                    .write_all(&app.root_response)
                    .await
                    .map_err(|_| End::Quiet)?;
                return Ok(true);
            }
            Route::Root => self.render(meta, 200, TEXT, &app.root_body, b""),
            Route::Health => self.render(meta, 200, TEXT, b"ok\n", b""),
            Route::Version => self.render(meta, 200, TEXT, &app.version_body, b""),
            Route::NotFound => self.render(meta, 404, TEXT, b"not found\n", b""),
            Route::BadParam(msg) => self.render(meta, 400, TEXT, msg.as_bytes(), b""),
            Route::MethodNotAllowed(allow) => {
                let extra = format!("Allow: {allow}\r\n");
                self.render(meta, 405, TEXT, b"method not allowed\n", extra.as_bytes());
            }
            Route::EchoHeaders => {
                render(&mut self.out, &app, meta, 200, JSON, &self.scratch, b"");
            }
            Route::Echo => {
                let ct: &[u8] = if self.scratch.is_empty() {
                    b"application/octet-stream"
                } else {
                    &self.scratch
                };
                render_head(
                    &mut self.out,
                    &app,
                    meta,
                    200,
                    ct,
                    Some(self.body.len() as u64),
                    b"",
                );
                if !meta.head_only {
                    self.out.extend_from_slice(&self.body);
                }
            }
            Route::Bytes(n) => return self.bytes(meta, n).await.map(|()| !close),
            Route::Slow(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                // Shutdown may have begun while we slept: tell the client we are closing.
                let close = close || self.stopping();
                let meta = Meta {
                    close,
                    http10_keep_alive: meta.http10_keep_alive && !close,
                    ..meta
                };
                self.render(meta, 200, TEXT, b"slow done\n", b"");
                self.flush().await?;
                return Ok(!close);
            }
            Route::Stream {
                chunks,
                interval_ms,
            } => {
                return self
                    .stream_chunks(meta, head.http10, chunks, interval_ms)
                    .await
                    .map(|()| !meta.close && !head.http10);
            }
            Route::WsRefused(status) => {
                let extra: &[u8] = if status == 426 {
                    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                } else {
                    b""
                };
                let body: &[u8] = if status == 426 {
                    b"websocket upgrade required\n"
                } else {
                    b"bad websocket handshake\n"
                };
                self.render(meta, status, TEXT, body, extra);
            }
            Route::Ws(accept) => {
                self.out.extend_from_slice(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Accept: ",
                );
                self.out.extend_from_slice(&accept);
                self.out.extend_from_slice(b"\r\n");
                self.out.extend_from_slice(&app.ident);
                self.out.extend_from_slice(b"\r\n");
                self.flush().await?;
                self.websocket().await;
                return Ok(false);
            }
        }
        self.flush().await?;
        Ok(!close)
    }

    fn render(&mut self, meta: Meta, status: u16, ct: &str, body: &[u8], extra: &[u8]) {
        render(&mut self.out, &self.app, meta, status, ct, body, extra);
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), End> {
        self.stream.write_all(bytes).await.map_err(|_| End::Quiet)
    }

    async fn flush(&mut self) -> Result<(), End> {
        let r = self.stream.write_all(&self.out).await;
        self.out.clear();
        r.map_err(|_| End::Quiet)
    }

    async fn bytes(&mut self, meta: Meta, n: u64) -> Result<(), End> {
        let app = self.app.clone();
        render_head(
            &mut self.out,
            &app,
            meta,
            200,
            TEXT.as_bytes(),
            Some(n),
            b"",
        );
        if meta.head_only {
            return self.flush().await;
        }
        let block = &app.pattern_block;
        let mut left = n as usize;
        // The first block goes out with the head in one write; the block is a whole number of
        // pattern periods, so consecutive blocks continue the pattern.
        let first = left.min(block.len());
        self.out.extend_from_slice(&block[..first]);
        left -= first;
        self.flush().await?;
        while left > 0 {
            let take = left.min(block.len());
            self.write(&block[..take]).await?;
            left -= take;
        }
        Ok(())
    }

    async fn stream_chunks(
        &mut self,
        meta: Meta,
        http10: bool,
        chunks: u64,
        interval_ms: u64,
    ) -> Result<(), End> {
        let app = self.app.clone();
        // HTTP/1.0 has no chunked coding; the body is known in advance, so send its length.
        let len = http10.then(|| (0..chunks).map(|i| chunk_text(i).len() as u64).sum());
        let meta = Meta {
            close: meta.close || http10,
            http10_keep_alive: false,
            ..meta
        };
        render_head(&mut self.out, &app, meta, 200, TEXT.as_bytes(), len, b"");
        if meta.head_only {
            return self.flush().await;
        }
        for i in 0..chunks {
            if i > 0 {
                self.flush().await?;
                tokio::time::sleep(Duration::from_millis(interval_ms)).await;
            }
            let text = chunk_text(i);
            if http10 {
                self.out.extend_from_slice(text.as_bytes());
            } else {
                self.out
                    .extend_from_slice(format!("{:x}\r\n{text}\r\n", text.len()).as_bytes());
            }
        }
        if !http10 {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
        self.flush().await
    }

    /// The WebSocket echo loop, after the 101. Returns when the connection should close.
    async fn websocket(&mut self) {
        let drain = self.app.cfg.ws_drain;
        // Shutdown: after `drain`, send 1001; then wait up to `WS_CLOSE_GRACE` for the reply.
        let mut going_away_at: Option<Instant> = None;
        let mut give_up_at: Option<Instant> = None;
        let mut payload = Vec::new();
        loop {
            if going_away_at.is_none() && self.stopping() {
                going_away_at = Some(Instant::now() + drain);
            }
            // Every complete frame in the buffer first.
            match parse_frame_header(&self.buf) {
                Err(code) => {
                    self.out.clear();
                    push_frame(&mut self.out, true, OP_CLOSE, &code.to_be_bytes());
                    let _ = self.flush().await;
                    return;
                }
                Ok(Some(h)) if (self.buf.len() as u64) >= h.header_len as u64 + h.payload_len => {
                    let len = h.payload_len as usize;
                    payload.clear();
                    payload.extend_from_slice(&self.buf[h.header_len..h.header_len + len]);
                    for (i, b) in payload.iter_mut().enumerate() {
                        *b ^= h.mask[i % 4];
                    }
                    self.buf.advance(h.header_len + len);
                    self.out.clear();
                    match h.opcode {
                        OP_CLOSE => {
                            if give_up_at.is_none() {
                                // Echo the status code (not the reason); a 1-byte body is invalid.
                                let reply: &[u8] = match payload.len() {
                                    0 => b"",
                                    1 => &[0x03, 0xEA], // 1002
                                    _ => &payload[..2],
                                };
                                push_frame(&mut self.out, true, OP_CLOSE, reply);
                                let _ = self.flush().await;
                            }
                            return;
                        }
                        OP_PING if give_up_at.is_none() => {
                            push_frame(&mut self.out, true, OP_PONG, &payload);
                        }
                        OP_PONG => {}
                        // After our close frame, data is ignored until the client's close.
                        _ if give_up_at.is_some() => {}
                        op => push_frame(&mut self.out, h.fin, op, &payload),
                    }
                    if self.flush().await.is_err() {
                        return;
                    }
                    if self.buf.capacity() > KEEP_CAPACITY && self.buf.is_empty() {
                        self.buf = BytesMut::with_capacity(READ_RESERVE);
                    }
                    continue;
                }
                Ok(_) => {}
            }
            if self.buf.capacity() - self.buf.len() < READ_RESERVE / 4 {
                self.buf.reserve(READ_RESERVE);
            }
            let far = Instant::now() + Duration::from_secs(86400);
            let send_close_at = if give_up_at.is_none() {
                going_away_at.unwrap_or(far)
            } else {
                far
            };
            tokio::select! {
                r = self.stream.read_buf(&mut self.buf) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        return;
                    }
                }
                _ = self.stop.changed(), if going_away_at.is_none() => {
                    going_away_at = Some(Instant::now() + drain);
                }
                _ = tokio::time::sleep_until(send_close_at), if going_away_at.is_some() && give_up_at.is_none() => {
                    self.out.clear();
                    push_frame(&mut self.out, true, OP_CLOSE, &1001u16.to_be_bytes());
                    if self.flush().await.is_err() {
                        return;
                    }
                    give_up_at = Some(Instant::now() + WS_CLOSE_GRACE);
                }
                _ = tokio::time::sleep_until(give_up_at.unwrap_or(far)), if give_up_at.is_some() => return,
            }
        }
    }
}

fn chunk_text(i: u64) -> String {
    format!("chunk {i}\n")
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn head(req: &str) -> Result<Option<Head>, Reject> {
        parse_head(req.as_bytes(), false, &mut Vec::new())
    }

    fn complete(req: &str) -> Head {
        head(req).expect("valid").expect("complete")
    }

    #[test]
    fn parses_a_simple_get() {
        let h = complete("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(h.route, Route::Root);
        assert_eq!(h.body, BodyKind::None);
        assert!(h.keep_alive && !h.http10 && !h.is_head);
        assert_eq!(h.len, 27);
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(head("GE"), Ok(None));
    }

    #[test]
    fn pipelined_requests_are_parsed_one_at_a_time() {
        let two = "GET /health HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\n\r\n";
        let first = complete(two);
        assert_eq!(first.route, Route::Health);
        let second = complete(&two[first.len..]);
        assert_eq!(second.route, Route::Version);
    }

    #[test]
    fn connection_semantics() {
        assert!(!complete("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!complete("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(complete("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!complete("GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
    }

    #[test]
    fn body_framing() {
        let h = complete("POST /echo HTTP/1.1\r\nContent-Length: 5\r\nContent-Type: a/b\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(5));
        assert_eq!(h.route, Route::Echo);
        let h = complete("PUT /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked);
        // Same length twice is fine, two different ones are not.
        let ok = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(complete(ok).body, BodyKind::Length(3));
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(head(bad), Err(Reject::BadRequest), "{bad:?}");
        }
        let gzip_only = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(head(gzip_only), Err(Reject::NotImplemented));
    }

    #[test]
    fn garbage_is_a_bad_request() {
        for bad in [
            "GET / HTTP/1.1\r\nHost x\r\n\r\n",
            "\x00\x01\x02\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET  HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(head(bad), Err(Reject::BadRequest), "{bad:?}");
        }
    }

    #[test]
    fn oversized_heads_are_refused() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(head(&big), Err(Reject::HeadTooLarge));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("H{i}: v\r\n"))
            .collect();
        assert_eq!(
            head(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(Reject::HeadTooLarge)
        );
    }

    #[test]
    fn routes_and_parameters() {
        let route = |t: &str| complete(&format!("GET {t} HTTP/1.1\r\n\r\n")).route;
        assert_eq!(route("/bytes/16384"), Route::Bytes(16384));
        assert!(matches!(route("/bytes/1073741825"), Route::BadParam(_)));
        assert!(matches!(route("/bytes/x"), Route::BadParam(_)));
        assert_eq!(route("/slow?ms=250"), Route::Slow(250));
        assert!(matches!(route("/slow?ms=600001"), Route::BadParam(_)));
        assert_eq!(
            route("/stream?interval_ms=5&chunks=3"),
            Route::Stream {
                chunks: 3,
                interval_ms: 5
            }
        );
        assert_eq!(route("/nope"), Route::NotFound);
        assert_eq!(route("/health?x=1"), Route::Health);
        assert_eq!(route("http://example.com/health"), Route::Health);
        assert_eq!(route("/echo"), Route::MethodNotAllowed("POST, PUT"));
        let catch_all = parse_head(b"GET /any/thing HTTP/1.1\r\n\r\n", true, &mut Vec::new());
        assert_eq!(catch_all.unwrap().unwrap().route, Route::Root);
    }

    #[test]
    fn echo_headers_joins_repeats_and_lowercases() {
        let mut scratch = Vec::new();
        let req = b"GET /echo-headers?a=b HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\nx-forwarded-for: 5.6.7.8\r\nHost: h\r\n\r\n";
        let h = parse_head(req, false, &mut scratch).unwrap().unwrap();
        assert_eq!(h.route, Route::EchoHeaders);
        let v: serde_json::Value = serde_json::from_slice(&scratch).unwrap();
        assert_eq!(v["x-forwarded-for"], "1.2.3.4, 5.6.7.8");
        assert_eq!(v["host"], "h");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/echo-headers?a=b");
    }

    #[test]
    fn websocket_handshake() {
        let req = "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(
            complete(req).route,
            Route::Ws(*b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert_eq!(
            complete("GET /ws HTTP/1.1\r\n\r\n").route,
            Route::WsRefused(426)
        );
        let bad_key = req.replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
        assert_eq!(complete(&bad_key).route, Route::WsRefused(400));
        let old = req.replace("Version: 13", "Version: 8");
        assert_eq!(complete(&old).route, Route::WsRefused(426));
    }

    #[test]
    fn sha1_known_vectors() {
        let hex = |d: [u8; 20]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        let two_blocks = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(
            hex(sha1(two_blocks)),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        let million = vec![b'a'; 1_000_000];
        assert_eq!(
            hex(sha1(&million)),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
    }

    #[test]
    fn base64_known_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = Vec::new();
            base64_encode(input.as_bytes(), &mut out);
            assert_eq!(out, expected.as_bytes(), "{input:?}");
        }
    }

    #[test]
    fn rfc6455_accept_example() {
        assert_eq!(
            &ws_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize), BadChunk> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let used = d.feed(input, Some(&mut out))?;
        assert!(d.is_done(), "incomplete: {:?}", d.state);
        Ok((out, used))
    }

    #[test]
    fn chunked_decoding() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nGET / HTTP/1.1";
        let (out, used) = decode_all(body).unwrap();
        assert_eq!(out, b"hello world");
        assert_eq!(&body[used..], b"GET / HTTP/1.1");
        let with_trailers = b"A \r\n0123456789\r\n0\r\nX-Sum: 1\r\nY: 2\r\n\r\n";
        assert_eq!(decode_all(with_trailers).unwrap().0, b"0123456789");
    }

    #[test]
    fn chunked_decoding_byte_by_byte() {
        let body = b"3\r\nabc\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nT: v\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        for b in body.chunks(1) {
            assert_eq!(d.feed(b, Some(&mut out)), Ok(1));
        }
        assert!(d.is_done());
        assert_eq!(out, b"abcabcdefghijklmnopqrstuvwxyz");
    }

    #[test]
    fn chunked_decoding_rejects_garbage() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"11111111111111111\r\n",
            b";ext\r\n",
        ] {
            let mut d = ChunkedDecoder::new();
            assert_eq!(d.feed(bad, None), Err(BadChunk), "{bad:?}");
        }
    }

    #[test]
    fn websocket_frames() {
        // A masked "Hello" text frame from RFC 6455 section 5.7.
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = parse_frame_header(&frame).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.header_len, h.payload_len),
            (true, OP_TEXT, 6, 5)
        );
        let text: Vec<u8> = frame[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ h.mask[i % 4])
            .collect();
        assert_eq!(text, b"Hello");
        assert_eq!(parse_frame_header(&frame[..1]), Ok(None));
        assert_eq!(parse_frame_header(&frame[..5]), Ok(None));
        // Unmasked client frame, reserved bits, fragmented ping, unknown opcode.
        assert_eq!(parse_frame_header(&[0x81, 0x05]), Err(1002));
        assert_eq!(parse_frame_header(&[0xC1, 0x80, 0, 0, 0, 0]), Err(1002));
        assert_eq!(parse_frame_header(&[0x09, 0x80, 0, 0, 0, 0]), Err(1002));
        assert_eq!(parse_frame_header(&[0x83, 0x80, 0, 0, 0, 0]), Err(1002));
        let huge = [0x82, 0xFF, 0, 0, 0, 0, 0xFF, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_frame_header(&huge), Err(1009));
        let mut out = Vec::new();
        push_frame(&mut out, true, OP_BINARY, &[7; 300]);
        assert_eq!(&out[..4], &[0x82, 126, 1, 44]);
        assert_eq!(out.len(), 304);
    }

    #[test]
    fn numbers_render_without_formatting() {
        for n in [0u64, 7, 10, 16384, u64::MAX] {
            let mut out = Vec::new();
            push_num(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    #[test]
    fn pattern_block_is_whole_periods() {
        let block = PATTERN.repeat(65536 / PATTERN.len());
        assert_eq!(block.len() % PATTERN.len(), 0);
        assert!(block.len() <= 65536);
    }
}
